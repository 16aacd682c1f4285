//! manifest::pg::plan: what `plan` writes to a PostgreSQL job: listing parts and their
//! checkpoints, listed pages (tasks added once, replays ignored), and the units of work
//! each page makes (whole keys; a key's later versions join its unit).
//!
//! A page is one transaction of a few statements, whatever its size (arrays bound as
//! parameters, `unnest`ed by the server): the page's keys are read and locked, its new keys
//! stored at once (with the new unit they make), its tasks inserted, then the keys' and
//! units' task counts, the part's checkpoint and the counters. A key's row is locked while a
//! page adds to it, so two listers (of different parts, or of one part after a lease moved
//! it) never give two tasks one id; a replayed entry is recognised as SQLite does it (same
//! destination and version id, and for a `null` version the same content). Only the first
//! listing (generation 0) is planned here: refreshes are not supported on PostgreSQL yet.
//!
//! May call: `pg::schema`, `manifest::codec`, `manifest::pages` (what identifies an entry,
//! the parts summed), the types of `manifest`.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};

use postgres::error::SqlState;
use postgres::{GenericClient, Statement, Transaction};

use super::unsupported::unsupported;
use super::{PgError, PgManifest};
use crate::manifest::codec::{task_id, DELETE_MARKER, LATEST, SEQ_BITS, SEQ_MASK};
use crate::manifest::pages::{aggregate, Identity, MAX_KEY_ID};
use crate::manifest::{
    ListedPage, Listing, ManifestError, NewTask, Partition, Refresh, Result, State,
};

unsupported! { "refresh":
    fn start_refresh(&mut self) -> Option<i64>;
    fn start_refresh_of(&mut self, source_versioned: bool) -> Option<i64>;
}

thread_local! {
    /// Statements prepared on this thread's connection (each `Db` has a thread of its own),
    /// by their text: a page's statements are parsed once per connection, not once per page.
    static PREPARED: RefCell<HashMap<&'static str, Statement>> = RefCell::new(HashMap::new());
}

/// `sql`, prepared once on the connection of this thread.
fn prepared(
    c: &mut impl GenericClient,
    sql: &'static str,
) -> std::result::Result<Statement, postgres::Error> {
    if let Some(s) = PREPARED.with(|p| p.borrow().get(sql).cloned()) {
        return Ok(s);
    }
    let s = c.prepare(sql)?;
    PREPARED.with(|p| p.borrow_mut().insert(sql, s.clone()));
    Ok(s)
}

/// `r`, after forgetting this thread's prepared statements if it failed: the statements
/// belong to one connection, and a failure may be that connection's end.
fn forget_on_error<T, E>(r: std::result::Result<T, E>) -> std::result::Result<T, E> {
    if r.is_err() {
        PREPARED.with(|p| p.borrow_mut().clear());
    }
    r
}

/// Times a page is tried again when PostgreSQL chose it as a deadlock's victim (a run's
/// writer updates the same counters and units) or could not serialize it.
const PAGE_TRIES: usize = 5;

/// Whether `e` says the transaction may simply be tried again.
fn transient(e: &PgError) -> bool {
    let PgError::Pg(e) = e else { return false };
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    )
}

const PARTITIONS: &str = "SELECT id, start_key, end_key, key_marker, version_marker, complete,
    pages, entries, last_key, last_key_seen FROM partitions ORDER BY id";

/// The page's keys that have a row, locked for this transaction, with the history position
/// of each one's newest task (its id is the key's `tasks - 1`).
const KEYS_OF_PAGE: &str = "SELECT k.id, k.key, k.unit, k.tasks, t.history_pos
    FROM keys k LEFT JOIN task t ON t.id = (k.id << 24) | (k.tasks - 1)
    WHERE k.key = ANY($1::text[]) ORDER BY k.key FOR UPDATE OF k";

/// Stores new keys with their task counts, in page order, all in one new unit (its id
/// taken now; its row is written once its task count is known).
const NEW_KEYS: &str = "WITH u AS (SELECT nextval('units_id_seq') AS id)
    INSERT INTO keys (id, key, unit, tasks)
    SELECT nextval('key_ids'), n.key, u.id, n.tasks
    FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS n(key, tasks, ord), u
    ORDER BY n.ord
    ON CONFLICT (key) DO NOTHING RETURNING id, key, unit";

/// What identifies the stored tasks of some keys (see `pages::Identity`).
const STORED_TASKS: &str = "SELECT t.id >> 24, t.dest, t.version_id, t.etag, t.size,
    t.last_modified, t.flags
    FROM unnest($1::bigint[]) AS k(id)
    JOIN task t ON t.id BETWEEN k.id << 24 AND (k.id << 24) | 16777215";

const INSERT_TASKS: &str = "INSERT INTO task (id, unit, dest, refresh, history_pos, version_id,
    flags, size, etag, last_modified, storage_class, checksum_algorithm, state)
    SELECT id, unit, dest, 0, pos, version_id, flags, size, etag, last_modified,
        storage_class, checksum_algorithm, $12
    FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[],
        $6::bigint[], $7::bigint[], $8::text[], $9::text[], $10::text[], $11::text[])
    AS n(id, unit, dest, pos, version_id, flags, size, etag, last_modified, storage_class,
        checksum_algorithm)";

/// The task counts of keys stored before the page.
const KEY_TASKS: &str = "UPDATE keys SET tasks = n.tasks
    FROM unnest($1::bigint[], $2::bigint[]) AS n(id, tasks) WHERE keys.id = n.id";

const NEW_UNIT: &str =
    "INSERT INTO units (id, partition, last_key, tasks, state) VALUES ($1, $2, $3, $4, 0)";

/// Units whose keys got tasks: they grow, and a done one is open again.
const GROWN_UNITS: &str = "UPDATE units SET tasks = units.tasks + n.tasks,
    state = CASE WHEN units.state = 2 THEN 0 ELSE units.state END
    FROM unnest($1::bigint[], $2::bigint[]) AS n(id, tasks) WHERE units.id = n.id";

const CHECKPOINT: &str = "UPDATE partitions SET key_marker = $2, version_marker = $3,
    complete = $4, pages = $5, entries = $6, last_key = $7, last_key_seen = $8 WHERE id = $1";

/// What a page's new tasks add (all pending, refresh 0): counters, the first listing's
/// task count, keys with more than one task.
const ADDED: &str = "WITH c AS (
        UPDATE counters SET tasks = tasks + $1, bytes = bytes + $2,
            delete_markers = delete_markers + $3, no_dest_version = no_dest_version + $1
        WHERE state = $5),
    r AS (UPDATE refreshes SET tasks = tasks + $1 WHERE generation = 0)
    UPDATE totals SET multi_task_keys = multi_task_keys + $4 WHERE id = 1";

fn partition_of(r: &postgres::Row) -> Partition {
    Partition {
        id: r.get(0),
        start_key: r.get(1),
        end_key: r.get(2),
        listing: Listing {
            key_marker: r.get(3),
            version_marker: r.get(4),
            complete: r.get(5),
            pages: r.get::<_, i64>(6) as u64,
            entries: r.get::<_, i64>(7) as u64,
            last_key: r.get(8),
            last_key_seen: r.get::<_, i64>(9) as u64,
        },
    }
}

/// A key of the page being inserted.
struct Cursor {
    key_id: i64,
    unit: i64,
    /// The key's next task number (its task count).
    next_seq: i64,
    /// The tasks it had before this page.
    stored: i64,
    /// Stored by this page, with its task count.
    fresh: bool,
    /// The history position of its newest task before this page.
    last_pos: Option<i64>,
    /// Entries known to have a task: stored ones (when loaded) and this page's.
    seen: HashSet<Identity>,
}

impl Cursor {
    fn of_row(r: &postgres::Row) -> (String, Cursor) {
        let tasks: i64 = r.get(3);
        let c = Cursor {
            key_id: r.get(0),
            unit: r.get(2),
            next_seq: tasks,
            stored: tasks,
            fresh: false,
            last_pos: r.get(4),
            seen: HashSet::new(),
        };
        (r.get(1), c)
    }

    /// Whether entry `t` may be one this key has stored (else it is new without a lookup:
    /// the first listing stores a key's history newest first, so an entry further down
    /// than its newest stored task is new).
    fn may_have(&self, t: &NewTask) -> bool {
        self.stored > 0 && self.last_pos.is_none_or(|p| t.history_pos as i64 <= p)
    }
}

/// The columns of the tasks a page adds.
#[derive(Default)]
struct Rows {
    id: Vec<i64>,
    unit: Vec<i64>,
    dest: Vec<i64>,
    pos: Vec<i64>,
    version_id: Vec<String>,
    flags: Vec<i64>,
    size: Vec<i64>,
    etag: Vec<Option<String>>,
    last_modified: Vec<Option<String>>,
    storage_class: Vec<Option<String>>,
    checksum: Vec<Option<String>>,
}

impl Rows {
    fn push(&mut self, id: i64, unit: i64, t: &NewTask) {
        let e = &t.entry;
        let flags = if e.is_delete_marker { DELETE_MARKER } else { 0 }
            | if e.is_latest { LATEST } else { 0 };
        self.id.push(id);
        self.unit.push(unit);
        self.dest.push(t.dest);
        self.pos.push(t.history_pos as i64);
        self.version_id.push(e.version_id.clone());
        self.flags.push(flags);
        self.size.push(e.size as i64);
        self.etag.push(e.etag.clone());
        self.last_modified.push(e.last_modified.clone());
        self.storage_class.push(e.storage_class.clone());
        self.checksum.push(e.checksum_algorithm.clone());
    }
}

/// Reads (and locks) the rows of `keys` into `cursors`.
fn read_keys(
    tx: &mut Transaction<'_>,
    keys: &[String],
    cursors: &mut HashMap<String, Cursor>,
) -> std::result::Result<(), postgres::Error> {
    let s = prepared(tx, KEYS_OF_PAGE)?;
    for r in tx.query(&s, &[&keys])? {
        let (key, c) = Cursor::of_row(&r);
        cursors.insert(key, c);
    }
    Ok(())
}

/// Loads what identifies the stored tasks of the keys whose entries may be stored.
fn load_stored(
    tx: &mut Transaction<'_>,
    tasks: &[NewTask],
    cursors: &mut HashMap<String, Cursor>,
) -> std::result::Result<(), postgres::Error> {
    let mut ids: Vec<i64> = tasks
        .iter()
        .filter_map(|t| {
            let c = cursors.get(&t.entry.key)?;
            c.may_have(t).then_some(c.key_id)
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok(());
    }
    let by_id: HashMap<i64, String> = cursors
        .iter()
        .filter(|(_, c)| ids.binary_search(&c.key_id).is_ok())
        .map(|(k, c)| (c.key_id, k.clone()))
        .collect();
    let s = prepared(tx, STORED_TASKS)?;
    for r in tx.query(&s, &[&ids])? {
        let flags: i64 = r.get(6);
        let id = Identity::new(
            r.get(1),
            r.get::<_, &str>(2),
            r.get(3),
            r.get(4),
            r.get(5),
            flags & DELETE_MARKER != 0,
        );
        let key_id: i64 = r.get(0);
        if let Some(c) = by_id.get(&key_id).and_then(|k| cursors.get_mut(k)) {
            c.seen.insert(id);
        }
    }
    Ok(())
}

/// Inserts one page of the first listing and `cp` in `tx`. The inner error is a limit of
/// the id layout (a key with too many tasks, too many keys).
fn insert_page_tx(
    tx: &mut Transaction<'_>,
    partition: i64,
    tasks: &[NewTask],
    cp: &Listing,
) -> std::result::Result<std::result::Result<(), String>, postgres::Error> {
    if !tasks.is_empty() {
        if let Err(why) = insert_tasks(tx, partition, tasks)? {
            return Ok(Err(why));
        }
    }
    let s = prepared(tx, CHECKPOINT)?;
    tx.execute(
        &s,
        &[
            &partition,
            &cp.key_marker,
            &cp.version_marker,
            &cp.complete,
            &(cp.pages as i64),
            &(cp.entries as i64),
            &cp.last_key,
            &(cp.last_key_seen as i64),
        ],
    )?;
    Ok(Ok(()))
}

/// Stores the page's tasks that are not stored yet, their keys and units, and what they
/// add to the counters (see the module header).
fn insert_tasks(
    tx: &mut Transaction<'_>,
    partition: i64,
    tasks: &[NewTask],
) -> std::result::Result<std::result::Result<(), String>, postgres::Error> {
    let mut names: Vec<String> = Vec::new();
    let mut listed: HashSet<&str> = HashSet::new();
    for t in tasks {
        if listed.insert(&t.entry.key) {
            names.push(t.entry.key.clone());
        }
    }
    let mut cursors: HashMap<String, Cursor> = HashMap::new();
    read_keys(tx, &names, &mut cursors)?;
    let missing: Vec<String> = names
        .iter()
        .filter(|k| !cursors.contains_key(*k))
        .cloned()
        .collect();
    // A new key gets a task per distinct entry of the page: its row is stored with them.
    let mut distinct: HashMap<&str, HashSet<Identity>> = HashMap::new();
    for t in tasks.iter().filter(|t| !cursors.contains_key(&t.entry.key)) {
        let ids = distinct.entry(&t.entry.key).or_default();
        ids.insert(Identity::of(t.dest, &t.entry));
    }
    let counts: Vec<i64> = missing
        .iter()
        .map(|k| distinct.get(k.as_str()).map_or(0, |ids| ids.len() as i64))
        .collect();
    // The page's new keys (those this transaction stored), and their unit.
    let mut new_unit: Option<(i64, String)> = None;
    if !missing.is_empty() {
        let s = prepared(tx, NEW_KEYS)?;
        for r in tx.query(&s, &[&missing, &counts])? {
            let (key_id, key, unit): (i64, String, i64) = (r.get(0), r.get(1), r.get(2));
            if key_id > MAX_KEY_ID {
                return Ok(Err(format!("more than {MAX_KEY_ID} keys")));
            }
            let last = match new_unit.take() {
                Some((_, last)) if last > key => last,
                _ => key.clone(),
            };
            new_unit = Some((unit, last));
            let c = Cursor {
                key_id,
                unit,
                next_seq: 0,
                stored: 0,
                fresh: true,
                last_pos: None,
                seen: HashSet::new(),
            };
            cursors.insert(key, c);
        }
        // Keys another transaction stored meanwhile (after it committed): read as stored.
        let raced: Vec<String> = missing
            .into_iter()
            .filter(|k| !cursors.contains_key(k))
            .collect();
        if !raced.is_empty() {
            read_keys(tx, &raced, &mut cursors)?;
        }
    }
    load_stored(tx, tasks, &mut cursors)?;

    let mut rows = Rows::default();
    let mut second = 0i64;
    let mut bytes = 0i64;
    let mut markers = 0i64;
    let mut per_unit: BTreeMap<i64, i64> = BTreeMap::new();
    for t in tasks {
        let Some(c) = cursors.get_mut(&t.entry.key) else {
            continue; // cannot happen: every key of the page was read or stored
        };
        if !c.seen.insert(Identity::of(t.dest, &t.entry)) {
            continue;
        }
        if c.next_seq > SEQ_MASK {
            return Ok(Err(format!(
                "key {:?} has more than {SEQ_MASK} tasks",
                t.entry.key
            )));
        }
        rows.push(task_id(c.key_id, c.next_seq), c.unit, t);
        second += i64::from(c.next_seq == 1);
        bytes += t.entry.size as i64;
        markers += i64::from(t.entry.is_delete_marker);
        *per_unit.entry(c.unit).or_default() += 1;
        c.next_seq += 1;
    }
    if rows.id.is_empty() {
        return Ok(Ok(()));
    }
    let n = rows.id.len() as i64;
    let s = prepared(tx, INSERT_TASKS)?;
    tx.execute(
        &s,
        &[
            &rows.id,
            &rows.unit,
            &rows.dest,
            &rows.pos,
            &rows.version_id,
            &rows.flags,
            &rows.size,
            &rows.etag,
            &rows.last_modified,
            &rows.storage_class,
            &rows.checksum,
            &(State::Pending.code() as i16),
        ],
    )?;
    let (key_ids, counts): (Vec<i64>, Vec<i64>) = cursors
        .values()
        .filter(|c| !c.fresh && c.next_seq > c.stored)
        .map(|c| (c.key_id, c.next_seq))
        .unzip();
    if !key_ids.is_empty() {
        let s = prepared(tx, KEY_TASKS)?;
        tx.execute(&s, &[&key_ids, &counts])?;
    }
    if let Some((unit, last_key)) = new_unit {
        let added = per_unit.remove(&unit).unwrap_or(0);
        let s = prepared(tx, NEW_UNIT)?;
        tx.execute(&s, &[&unit, &partition, &last_key, &added])?;
    }
    if !per_unit.is_empty() {
        let (units, added): (Vec<i64>, Vec<i64>) = per_unit.into_iter().unzip();
        let s = prepared(tx, GROWN_UNITS)?;
        tx.execute(&s, &[&units, &added])?;
    }
    let s = prepared(tx, ADDED)?;
    tx.execute(
        &s,
        &[
            &n,
            &bytes,
            &markers,
            &second,
            &(State::Pending.code() as i16),
        ],
    )?;
    Ok(Ok(()))
}

impl PgManifest {
    /// The listing checkpoint of the whole job (all partitions together, see [`Partition`]).
    pub fn listing(&self) -> Result<Listing> {
        Ok(aggregate(&self.partitions()?))
    }

    /// The listing partitions, by id (one, the whole bucket, unless `plan` split it).
    pub fn partitions(&self) -> Result<Vec<Partition>> {
        self.db.call(|c| {
            let rows = forget_on_error(prepared(c, PARTITIONS).and_then(|s| c.query(&s, &[])))?;
            Ok(rows.iter().map(partition_of).collect())
        })
    }

    /// Splits the job's keys into partitions at `starts` (sorted, each the first key of a
    /// partition), before anything is listed; false (and nothing changed) when the listing
    /// already started or was already split, as `SqliteManifest::split_partitions`.
    pub fn split_partitions(&mut self, starts: &[String]) -> Result<bool> {
        let starts = starts.to_vec();
        self.db.call(move |c| {
            let mut tx = c.transaction()?;
            // Two planners of one job split it once.
            tx.batch_execute("LOCK TABLE partitions IN SHARE ROW EXCLUSIVE MODE")?;
            let untouched: bool = tx
                .query_one(
                    "SELECT count(*) = 1 AND max(pages) = 0 AND NOT bool_or(complete)
                     AND max(end_key) IS NULL AND max(start_key) IS NULL FROM partitions",
                    &[],
                )?
                .get(0);
            if !untouched || starts.is_empty() || !starts.windows(2).all(|w| w[0] < w[1]) {
                return Ok(false);
            }
            let mut bounds: Vec<Option<&str>> = vec![None];
            bounds.extend(starts.iter().map(|s| Some(s.as_str())));
            bounds.push(None);
            let ids: Vec<i64> = (0..bounds.len() as i64 - 1).collect();
            let (first, end): (Vec<Option<&str>>, Vec<Option<&str>>) =
                bounds.windows(2).map(|w| (w[0], w[1])).unzip();
            tx.execute("DELETE FROM partitions", &[])?;
            tx.execute(
                "INSERT INTO partitions (id, start_key, end_key)
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[])",
                &[&ids, &first, &end],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    /// Writes one listed page and the checkpoint after it, in one transaction (the only
    /// partition). Entries that already have a task (a replayed page) are ignored.
    pub fn insert_page(&mut self, tasks: &[NewTask], checkpoint: &Listing) -> Result<()> {
        self.insert_partition_page(0, tasks, checkpoint)
    }

    /// Writes one page of partition `partition` and the partition's checkpoint after it, in
    /// one transaction. Entries that already have a task (a replayed page) are ignored.
    pub fn insert_partition_page(
        &mut self,
        partition: i64,
        tasks: &[NewTask],
        checkpoint: &Listing,
    ) -> Result<()> {
        let page = ListedPage {
            tasks,
            keys: &[],
            others: &[],
            deletes: &|_| Vec::new(),
        };
        self.insert_listed_page(partition, &page, checkpoint)
    }

    /// Writes one listed page of partition `partition` (its tasks, their keys and units)
    /// and the partition's checkpoint after it, in one transaction. Entries that already
    /// have a task (a replayed page) are ignored. The first listing only: the page's other
    /// entries and its keys matter to refreshes, which PostgreSQL jobs do not do yet.
    pub fn insert_listed_page(
        &mut self,
        partition: i64,
        page: &ListedPage<'_>,
        checkpoint: &Listing,
    ) -> Result<()> {
        let tasks = page.tasks.to_vec();
        let cp = checkpoint.clone();
        let limited = self.db.call_with(move |c| {
            let mut tries = 0;
            loop {
                tries += 1;
                let done = (|| -> std::result::Result<_, PgError> {
                    let mut tx = c.transaction()?;
                    let out = insert_page_tx(&mut tx, partition, &tasks, &cp)?;
                    if out.is_ok() {
                        tx.commit()?;
                    }
                    Ok(out)
                })();
                match forget_on_error(done) {
                    Err(e) if tries < PAGE_TRIES && transient(&e) => continue,
                    other => return other,
                }
            }
        })?;
        limited.map_err(|why| ManifestError::Limit(self.path().to_string(), why))
    }

    /// Every listing generation: on PostgreSQL only the first (`plan`), with the tasks it
    /// added.
    pub fn refreshes(&self) -> Result<Vec<Refresh>> {
        self.db.call(|c| {
            let rows = c.query(
                "SELECT generation, started_at, tasks FROM refreshes ORDER BY generation",
                &[],
            )?;
            Ok(rows
                .iter()
                .map(|r| Refresh {
                    generation: r.get(0),
                    started_at: r.get(1),
                    tasks: r.get::<_, i64>(2) as u64,
                    matched: 0,
                    deleted: 0,
                    not_deleted: 0,
                    out_of_order: 0,
                })
                .collect())
        })
    }

    /// Keys a finished refresh found deleted at the source: none, as PostgreSQL jobs have no
    /// refreshes yet.
    pub fn deleted_at_source(&self, limit: usize) -> Result<(u64, Vec<String>)> {
        let _ = limit;
        Ok((0, Vec::new()))
    }

    /// How many tasks a key has.
    pub fn count_key(&self, key: &str) -> Result<u64> {
        let key = key.to_string();
        self.db.call(move |c| {
            let n: i64 = c
                .query_one(
                    "SELECT count(t.id) FROM keys k
                     JOIN task t ON t.id BETWEEN k.id << 24 AND (k.id << 24) | 16777215
                     WHERE k.key = $1",
                    &[&key],
                )?
                .get(0);
            Ok(n as u64)
        })
    }

    /// Whether some key has more than one task (a versioned destination is then needed).
    pub fn has_multi_version_key(&self) -> Result<bool> {
        self.db.call(|c| {
            Ok(
                c.query_one("SELECT multi_task_keys > 0 FROM totals WHERE id = 1", &[])?
                    .get(0),
            )
        })
    }

    /// Stores one fact for the estimate (replacing an earlier value).
    pub fn store_estimate_fact(&self, name: &str, value: &str) -> Result<()> {
        let (name, value) = (name.to_string(), value.to_string());
        self.db.call(move |c| {
            c.execute(
                "INSERT INTO estimate_facts (name, value) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                &[&name, &value],
            )
            .map(|_| ())
        })
    }
}

// The SQL above shifts task ids by 24 bits.
const _: () = assert!(SEQ_BITS == 24);

#[cfg(test)]
mod tests {
    //! The SQLite tests of these methods (`manifest::tests`) on a PostgreSQL job, plus the
    //! units pages make. Each test returns early without `S3_BACKFILL_TEST_PG`.

    use super::*;
    use crate::manifest::backend::Location;
    use crate::manifest::store::tests::pg_job;
    use crate::manifest::tests::task;
    use crate::s3::VersionEntry;

    fn job(tag: &str) -> Option<(PgManifest, super::super::PgLocation)> {
        let url = pg_job(tag)?;
        let Location::Postgres(l) = Location::of(&url).unwrap() else {
            panic!("not a postgres location: {url:?}");
        };
        Some((PgManifest::open(&l, true).unwrap(), l))
    }

    /// Rows of `sql` (no parameters), each as text columns.
    fn rows(m: &PgManifest, sql: &'static str) -> Vec<Vec<Option<String>>> {
        m.db.call(move |c| {
            let rows = c.query(sql, &[])?;
            Ok(rows
                .iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| r.get::<_, Option<String>>(i))
                        .collect()
                })
                .collect())
        })
        .unwrap()
    }

    fn one(m: &PgManifest, sql: &'static str) -> i64 {
        m.db.call(move |c| Ok(c.query_one(sql, &[])?.get::<_, i64>(0)))
            .unwrap()
    }

    /// Pending tasks, bytes and delete markers as the counters have them.
    fn pending_counters(m: &PgManifest) -> (i64, i64, i64) {
        m.db.call(|c| {
            let r = c.query_one(
                "SELECT tasks, bytes, delete_markers FROM counters WHERE state = 0",
                &[],
            )?;
            Ok((r.get(0), r.get(1), r.get(2)))
        })
        .unwrap()
    }

    /// The counters against a recount of the tasks.
    fn check_recount(m: &PgManifest) {
        let stored = rows(
            m,
            "SELECT state::text, tasks::text, bytes::text, delete_markers::text,
             no_dest_version::text FROM counters WHERE tasks <> 0 ORDER BY state",
        );
        let recount = rows(
            m,
            "SELECT state::text, count(*)::text, sum(size)::text, sum(flags & 1)::text,
             count(*) FILTER (WHERE dest_version_id IS NULL)::text FROM task
             GROUP BY state ORDER BY state",
        );
        assert_eq!(stored, recount);
        // Keys' and units' task counts, and each task in its key's unit.
        let wrong = one(
            m,
            "SELECT (SELECT count(*) FROM keys k
                 WHERE k.tasks <> (SELECT count(*) FROM task t WHERE t.id >> 24 = k.id))
             + (SELECT count(*) FROM units u
                 WHERE u.tasks <> (SELECT count(*) FROM task t WHERE t.unit = u.id))
             + (SELECT count(*) FROM task t JOIN keys k ON k.id = t.id >> 24
                 WHERE t.unit <> k.unit)",
        );
        assert_eq!(wrong, 0, "keys' and units' task counts");
    }

    /// The key's version ids by history position, oldest first.
    fn versions(m: &PgManifest, key: &str) -> Vec<String> {
        let key = key.to_string();
        m.db.call(move |c| {
            let rows = c.query(
                "SELECT t.version_id FROM keys k
                 JOIN task t ON t.id BETWEEN k.id << 24 AND (k.id << 24) | 16777215
                 WHERE k.key = $1 ORDER BY t.history_pos DESC",
                &[&key],
            )?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
        .unwrap()
    }

    #[test]
    fn pages_and_replays() {
        let Some((mut m, _)) = job("plan-pages") else {
            return;
        };
        let page = vec![task("a", "2", 0), task("a", "1", 1), task("b\t?", "1", 0)];
        let cp = Listing {
            key_marker: Some("b\t?".into()),
            version_marker: Some("1".into()),
            pages: 1,
            entries: 3,
            last_key: Some("b\t?".into()),
            last_key_seen: 1,
            ..Default::default()
        };
        m.insert_page(&page, &cp).unwrap();
        assert_eq!(m.listing().unwrap(), cp);
        // A replayed page is ignored.
        m.insert_page(&page, &cp).unwrap();
        assert_eq!(pending_counters(&m), (3, 30, 0));
        check_recount(&m);
        assert!(m.has_multi_version_key().unwrap());
        assert_eq!(m.count_key("a").unwrap(), 2);
        assert_eq!(m.count_key("b\t?").unwrap(), 1);
        assert_eq!(m.count_key("zz").unwrap(), 0);
        assert_eq!(versions(&m, "a"), ["1", "2"]);
        // The newest version is the latest; ids are the key's, numbered in listing order.
        let a = rows(
            &m,
            "SELECT t.version_id, (t.flags & 2)::text, (t.id & 16777215)::text, t.state::text
             FROM task t JOIN keys k ON k.id = t.id >> 24 WHERE k.key = 'a' ORDER BY t.id",
        );
        let s = |v: &str| Some(v.to_string());
        assert_eq!(
            a,
            [
                [s("2"), s("2"), s("0"), s("0")],
                [s("1"), s("0"), s("1"), s("0")]
            ]
        );
        let r = m.refreshes().unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].generation, r[0].tasks, r[0].started_at), (0, 3, None));
        assert_eq!(m.deleted_at_source(10).unwrap(), (0, Vec::new()));
    }

    #[test]
    fn a_key_continued_on_the_next_page_keeps_its_order_and_replays_are_ignored() {
        let Some((mut m, _)) = job("plan-continued") else {
            return;
        };
        let first = vec![task("k", "v5", 0), task("k", "v4", 1)];
        let second = vec![task("k", "v3", 2), task("k", "v2", 3), task("l", "x", 0)];
        m.insert_page(&first, &Listing::default()).unwrap();
        m.insert_page(&second, &Listing::default()).unwrap();
        // Both pages again (a resumed listing that re-read them), and one entry twice in a page.
        m.insert_page(&first, &Listing::default()).unwrap();
        m.insert_page(&second, &Listing::default()).unwrap();
        m.insert_page(&[task("l", "y", 1), task("l", "y", 1)], &Listing::default())
            .unwrap();
        assert_eq!(m.count_key("k").unwrap(), 4);
        assert_eq!(m.count_key("l").unwrap(), 2);
        assert_eq!(versions(&m, "k"), ["v2", "v3", "v4", "v5"]);
        assert_eq!(pending_counters(&m).0, 6);
        assert_eq!(
            one(&m, "SELECT tasks FROM refreshes WHERE generation = 0"),
            6
        );
        assert_eq!(one(&m, "SELECT multi_task_keys FROM totals"), 2);
        assert_eq!(one(&m, "SELECT sum(tasks)::bigint FROM keys"), 6);
        check_recount(&m);
    }

    #[test]
    fn null_versions_are_told_apart_by_their_content() {
        let Some((mut m, _)) = job("plan-null") else {
            return;
        };
        let null = |etag: &str, pos| {
            let mut t = task("n", "null", pos);
            t.entry.etag = Some(etag.into());
            t
        };
        // The same `null` version twice (a replay), then other contents under the same id.
        m.insert_page(&[null("\"x\"", 0)], &Listing::default())
            .unwrap();
        m.insert_page(&[null("\"x\"", 0)], &Listing::default())
            .unwrap();
        assert_eq!(m.count_key("n").unwrap(), 1);
        m.insert_page(&[null("\"y\"", 0)], &Listing::default())
            .unwrap();
        assert_eq!(m.count_key("n").unwrap(), 2);
        // Another destination of the same entry is a task of its own.
        let mut other = null("\"x\"", 0);
        other.dest = 1;
        m.insert_page(&[other.clone(), other], &Listing::default())
            .unwrap();
        assert_eq!(m.count_key("n").unwrap(), 3);
    }

    #[test]
    fn keys_listed_out_of_order_are_stored_once_and_found() {
        let Some((mut m, _)) = job("plan-order") else {
            return;
        };
        let pages = [
            vec![task("b", "1", 0), task("d", "1", 0), task("f", "1", 0)],
            vec![task("a", "1", 0), task("c", "1", 0)],
            vec![task("e", "1", 0), task("g", "1", 0), task("c", "2", 1)],
        ];
        for p in pages.iter().chain(&pages) {
            m.insert_page(p, &Listing::default()).unwrap();
        }
        assert_eq!(pending_counters(&m).0, 8);
        for (k, n) in [
            ("a", 1),
            ("b", 1),
            ("c", 2),
            ("d", 1),
            ("e", 1),
            ("f", 1),
            ("g", 1),
        ] {
            assert_eq!(m.count_key(k).unwrap(), n, "{k}");
        }
        assert_eq!(
            one(&m, "SELECT count(*) FROM keys"),
            7,
            "each key stored once"
        );
        check_recount(&m);
    }

    #[test]
    fn pages_from_two_connections_store_each_key_once() {
        let Some((mut a, l)) = job("plan-two") else {
            return;
        };
        let mut b = PgManifest::open(&l, false).unwrap();
        let cp = Listing::default();
        a.insert_page(&[task("b", "1", 0), task("d", "1", 0)], &cp)
            .unwrap();
        b.insert_page(&[task("f", "1", 0), task("h", "1", 0)], &cp)
            .unwrap();
        a.insert_page(&[task("f", "2", 1), task("g", "1", 0)], &cp)
            .unwrap();
        b.insert_page(&[task("d", "2", 1), task("g", "2", 1)], &cp)
            .unwrap();
        // Replays on both connections are ignored.
        a.insert_page(&[task("h", "1", 0), task("d", "2", 1)], &cp)
            .unwrap();
        b.insert_page(&[task("b", "1", 0), task("f", "2", 1)], &cp)
            .unwrap();
        assert_eq!(
            one(&a, "SELECT count(*) FROM keys"),
            5,
            "each key stored once"
        );
        for (k, n) in [("b", 1), ("d", 2), ("f", 2), ("g", 2), ("h", 1)] {
            assert_eq!(a.count_key(k).unwrap(), n, "{k}");
            assert_eq!(b.count_key(k).unwrap(), n, "{k}");
        }
        assert_eq!(pending_counters(&a).0, 8);
        check_recount(&a);
    }

    #[test]
    fn single_version_keys_do_not_need_versioning() {
        let Some((mut m, _)) = job("plan-single") else {
            return;
        };
        m.insert_page(&[task("a", "1", 0), task("b", "1", 0)], &Listing::default())
            .unwrap();
        assert!(!m.has_multi_version_key().unwrap());
    }

    #[test]
    fn listed_fields_are_stored_as_listed() {
        let Some((mut m, _)) = job("plan-fields") else {
            return;
        };
        let entry = |i: usize| NewTask {
            entry: VersionEntry {
                key: format!("k{i}/ünï cödé\n"),
                version_id: format!("v{i}"),
                is_delete_marker: i == 1,
                is_latest: i == 1,
                size: [5 << 40, 0][i],
                etag: [Some("\"0123456789abcdef0123456789abcdef-12\""), None][i]
                    .map(str::to_string),
                last_modified: [Some("2024-05-06T07:08:09.123Z"), None][i].map(str::to_string),
                storage_class: [Some("placement-x"), None][i].map(str::to_string),
                checksum_algorithm: [Some("XXH3"), None][i].map(str::to_string),
            },
            history_pos: 3,
            dest: 2,
        };
        m.insert_page(&[entry(0), entry(1)], &Listing::default())
            .unwrap();
        let got = rows(
            &m,
            "SELECT k.key, t.version_id, t.flags::text, t.size::text, t.etag, t.last_modified,
             t.storage_class, t.checksum_algorithm, t.history_pos::text, t.dest::text,
             t.refresh::text, t.attempts::text, t.dest_version_id
             FROM task t JOIN keys k ON k.id = t.id >> 24 ORDER BY t.id",
        );
        let s = |v: &str| Some(v.to_string());
        assert_eq!(
            got[0],
            [
                s("k0/ünï cödé\n"),
                s("v0"),
                s("0"),
                s(&(5u64 << 40).to_string()),
                s("\"0123456789abcdef0123456789abcdef-12\""),
                s("2024-05-06T07:08:09.123Z"),
                s("placement-x"),
                s("XXH3"),
                s("3"),
                s("2"),
                s("0"),
                s("0"),
                None
            ]
        );
        assert_eq!(
            got[1][1..4],
            [s("v1"), s("3"), s("0")],
            "delete marker, latest"
        );
        assert_eq!(got[1][4..8], [None, None, None, None]);
        assert_eq!(pending_counters(&m), (2, 5 << 40, 1));
    }

    #[test]
    fn parts_are_split_before_listing_and_keep_their_own_checkpoints() {
        let Some((mut m, _)) = job("plan-parts") else {
            return;
        };
        assert_eq!(m.partitions().unwrap().len(), 1);
        assert!(
            !m.split_partitions(&["m".into(), "c".into()]).unwrap(),
            "unsorted"
        );
        assert!(m.split_partitions(&["g".into(), "p".into()]).unwrap());
        assert!(!m.split_partitions(&["x".into()]).unwrap(), "split once");
        let parts = m.partitions().unwrap();
        let bounds: Vec<(i64, Option<&str>, Option<&str>)> = parts
            .iter()
            .map(|p| (p.id, p.start_key.as_deref(), p.end_key.as_deref()))
            .collect();
        assert_eq!(
            bounds,
            [
                (0, None, Some("g")),
                (1, Some("g"), Some("p")),
                (2, Some("p"), None)
            ]
        );
        let cp = |key: &str, complete| Listing {
            key_marker: Some(key.into()),
            version_marker: Some("1".into()),
            complete,
            pages: 1,
            entries: 2,
            last_key: Some(key.into()),
            last_key_seen: 1,
        };
        m.insert_partition_page(1, &[task("h", "1", 0), task("i", "1", 0)], &cp("i", true))
            .unwrap();
        m.insert_partition_page(2, &[task("q", "1", 0)], &cp("q", false))
            .unwrap();
        let parts = m.partitions().unwrap();
        assert_eq!(parts[0].listing, Listing::default());
        assert_eq!(parts[1].listing, cp("i", true));
        assert_eq!(parts[2].listing, cp("q", false));
        // The whole listing: not complete, markers of the first incomplete part, sums.
        let all = m.listing().unwrap();
        assert!(!all.complete);
        assert_eq!((all.pages, all.entries, all.key_marker), (2, 4, None));
        // A listed job is not split again.
        assert!(!m.split_partitions(&["z".into()]).unwrap());
        assert_eq!(m.partitions().unwrap().len(), 3);
    }

    /// Units the lead's run may claim now (its claim's condition).
    fn claimable(m: &PgManifest) -> Vec<Vec<Option<String>>> {
        rows(
            m,
            "SELECT u.id::text, u.last_key, u.tasks::text FROM units u
             JOIN partitions p ON p.id = u.partition
             WHERE u.state = 0 AND (p.complete OR u.last_key < p.last_key) ORDER BY u.id",
        )
    }

    fn units(m: &PgManifest) -> Vec<Vec<Option<String>>> {
        rows(
            m,
            "SELECT u.id::text, u.partition::text, u.last_key, u.tasks::text, u.state::text,
             (SELECT string_agg(k.key, ',' ORDER BY k.key) FROM keys k WHERE k.unit = u.id)
             FROM units u ORDER BY u.id",
        )
    }

    #[test]
    fn pages_make_units_of_whole_keys() {
        let Some((mut m, _)) = job("plan-units") else {
            return;
        };
        let cp = |key: &str, pages, complete| Listing {
            key_marker: Some(key.into()),
            complete,
            pages,
            last_key: Some(key.into()),
            ..Listing::default()
        };
        // Page 1: a, and b whose history goes on on page 2.
        m.insert_page(
            &[task("a", "2", 0), task("a", "1", 1), task("b", "3", 0)],
            &cp("b", 1, false),
        )
        .unwrap();
        let u = units(&m);
        assert_eq!(u.len(), 1);
        let u1 = u[0][0].clone().unwrap();
        let s = |v: &str| Some(v.to_string());
        assert_eq!(u[0][1..], [s("0"), s("b"), s("3"), s("0"), s("a,b")]);
        assert!(claimable(&m).is_empty(), "b may get older versions");
        // Page 2: b's older versions join its unit; c makes a new one.
        let page2 = [task("b", "2", 1), task("b", "1", 2), task("c", "1", 0)];
        m.insert_page(&page2, &cp("c", 2, false)).unwrap();
        let u = units(&m);
        assert_eq!(u.len(), 2);
        assert_eq!(u[0][1..], [s("0"), s("b"), s("5"), s("0"), s("a,b")]);
        assert_eq!(u[1][1..], [s("0"), s("c"), s("1"), s("0"), s("c")]);
        assert_eq!(claimable(&m), [[s(&u1), s("b"), s("5")]]);
        // Every task is in its key's unit.
        assert_eq!(
            one(
                &m,
                "SELECT count(*) FROM task t JOIN keys k ON k.id = t.id >> 24
                 WHERE t.unit <> k.unit"
            ),
            0
        );
        // A replay changes no unit, even a done one.
        m.db.call(|c| c.execute("UPDATE units SET state = 2", &[]))
            .unwrap();
        m.insert_page(&page2, &cp("c", 2, false)).unwrap();
        assert_eq!(units(&m)[0][3..5], [s("5"), s("2")]);
        // A key of a done unit that gets a task opens its unit again.
        m.insert_page(&[task("c", "0", 1)], &cp("c", 3, true))
            .unwrap();
        let u = units(&m);
        assert_eq!(u[1][3..5], [s("2"), s("0")]);
        assert_eq!(u[0][4], s("2"), "the other unit stays done");
        assert_eq!(claimable(&m).len(), 1, "c's unit, the listing complete");
        assert_eq!(one(&m, "SELECT sum(tasks)::bigint FROM units"), 7);
        check_recount(&m);
    }

    #[test]
    fn two_listers_of_different_parts_at_once() {
        let Some((mut m, l)) = job("plan-parallel") else {
            return;
        };
        assert!(m.split_partitions(&["m".into()]).unwrap());
        let lister = |part: i64, prefix: &'static str| {
            let l = l.clone();
            std::thread::spawn(move || {
                let mut m = PgManifest::open(&l, false).unwrap();
                for p in 0..20u64 {
                    let key = |i: u64| format!("{prefix}{:04}", p * 10 + i);
                    // Ten keys of three versions per page; the last one goes on on the
                    // next page, and every page is sent twice (a replay).
                    let mut page: Vec<NewTask> = (0..10)
                        .flat_map(|i| (0..3).map(move |v| (i, v)))
                        .map(|(i, v)| task(&key(i), &format!("v{v}"), v))
                        .collect();
                    if p > 0 {
                        page.insert(0, task(&format!("{prefix}{:04}", p * 10 - 1), "v-old", 3));
                    }
                    let cp = Listing {
                        pages: p + 1,
                        last_key: Some(key(9)),
                        complete: p == 19,
                        ..Listing::default()
                    };
                    m.insert_partition_page(part, &page, &cp).unwrap();
                    m.insert_partition_page(part, &page, &cp).unwrap();
                }
            })
        };
        let (a, b) = (lister(0, "a"), lister(1, "n"));
        a.join().unwrap();
        b.join().unwrap();
        // 2 parts x 20 pages x 10 keys x 3 versions, plus 19 older versions per part.
        let tasks = 2 * (20 * 30 + 19);
        assert_eq!(pending_counters(&m).0, tasks);
        assert_eq!(one(&m, "SELECT count(*) FROM keys"), 400);
        assert_eq!(one(&m, "SELECT count(*) FROM units"), 40, "a unit per page");
        assert_eq!(one(&m, "SELECT sum(tasks)::bigint FROM units"), tasks);
        assert_eq!(one(&m, "SELECT multi_task_keys FROM totals"), 400);
        assert_eq!(
            one(&m, "SELECT count(DISTINCT partition) FROM units"),
            2,
            "each part's units are its own"
        );
        check_recount(&m);
        m.insert_page(&[], &Listing::default()).unwrap();
    }

    #[test]
    fn estimate_facts_are_stored_and_replaced() {
        let Some((m, _)) = job("plan-facts") else {
            return;
        };
        m.store_estimate_fact("server", "aws").unwrap();
        m.store_estimate_fact("server", "ceph").unwrap();
        m.store_estimate_fact("latency_ms", "1.5").unwrap();
        let facts = rows(&m, "SELECT name, value FROM estimate_facts ORDER BY name");
        let s = |v: &str| Some(v.to_string());
        assert_eq!(
            facts,
            [[s("latency_ms"), s("1.5")], [s("server"), s("ceph")]]
        );
    }

    #[test]
    fn refreshes_are_not_supported_yet() {
        let Some((mut m, _)) = job("plan-refresh") else {
            return;
        };
        m.insert_page(
            &[task("a", "1", 0)],
            &Listing {
                complete: true,
                ..Listing::default()
            },
        )
        .unwrap();
        let e = m.start_refresh_of(false).unwrap_err();
        assert!(matches!(e, ManifestError::Unsupported(_, "refresh")), "{e}");
    }

    /// The real lister (four parts, pages of 7 entries) against the s3 layer's fake, into
    /// a PostgreSQL job: every version once, in order, in units of whole keys of its part.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_lister_plans_a_postgres_job_in_parts() {
        use crate::lister::Lister;
        use crate::manifest::Manifest;
        use crate::s3::fake::FakeServer;
        use crate::s3::{Side, S3};

        let Some(url) = pg_job("plan-lister") else {
            return;
        };
        let server = FakeServer::new();
        server.create_bucket("src", true);
        let mut keys: Vec<String> = Vec::new();
        for p in ["a/", "b/", "c/", "d/", "e/", "f/"] {
            keys.extend((0..8).map(|i| format!("{p}{i:02}")));
        }
        for (i, k) in keys.iter().enumerate() {
            server.put("src", k, b"v1", &[]);
            if i % 3 == 0 {
                server.delete("src", k);
            }
            for _ in 0..i % 5 {
                server.put("src", k, b"v3", &[]);
            }
        }
        let mut job = crate::manifest::tests::settings();
        job.source.bucket = "src".into();
        job.selection.delete_markers = true;
        let mut m = Manifest::open(&url, true).unwrap();
        m.store_settings(&job).unwrap();
        let source = S3::alone(server.client(Side::Source), 8);
        let mut lister = Lister::new(&job, &source, None, true);
        lister.page_size = 7;
        lister.list_parallel(&mut m, 4, |_| {}).await.unwrap();
        let Manifest::Pg(m) = m else {
            panic!("not a PostgreSQL job");
        };
        assert!(m.listing().unwrap().complete);
        let parts = m.partitions().unwrap().len() as i64;
        assert!(parts > 1, "{parts} parts");
        for k in &keys {
            let source: Vec<String> = server.history("src", k).into_iter().map(|v| v.id).collect();
            assert_eq!(versions(&m, k), source, "{k}");
        }
        let entries: i64 = keys
            .iter()
            .map(|k| server.history("src", k).len() as i64)
            .sum();
        assert_eq!(pending_counters(&m).0, entries);
        check_recount(&m);
        // Units: of one part each, every key's last version listed, all claimable now.
        assert_eq!(
            one(&m, "SELECT count(DISTINCT partition) FROM units"),
            parts
        );
        let units = one(&m, "SELECT count(*) FROM units");
        assert!(units >= parts, "{units} units");
        assert_eq!(claimable(&m).len() as i64, units);
        assert_eq!(
            one(
                &m,
                "SELECT count(*) FROM keys k JOIN units u ON u.id = k.unit
                 JOIN partitions p ON p.id = u.partition
                 WHERE k.key > u.last_key OR k.key < coalesce(p.start_key, '')
                 OR k.key >= coalesce(p.end_key, k.key || 'x')"
            ),
            0,
            "each key in a unit of its own part, at or before the unit's last key"
        );
    }

    /// A page whose transaction PostgreSQL picks as a deadlock's victim (here against a
    /// stand-in for a run's writer that holds the counters and then wants the page's unit)
    /// is tried again, and stored once.
    #[test]
    fn a_page_caught_in_a_deadlock_is_tried_again() {
        let Some((mut m, l)) = job("plan-deadlock") else {
            return;
        };
        m.insert_page(&[task("k", "2", 0)], &Listing::default())
            .unwrap();
        let unit = one(&m, "SELECT unit FROM keys WHERE key = 'k'");
        // The page looks for a deadlock once it has waited 3 s, the writer after 60 s: the
        // page is the victim, whatever the machine's load.
        let pid =
            m.db.call(|c| {
                c.batch_execute("SET deadlock_timeout = '3s'")?;
                Ok(c.query_one("SELECT pg_backend_pid()", &[])?
                    .get::<_, i32>(0))
            })
            .unwrap();
        let connect = |sql: String| {
            let mut c = postgres::Client::connect(&l.url, postgres::NoTls).unwrap();
            c.batch_execute(&sql).unwrap();
            c
        };
        let schema = super::super::schema::schema_of(&l.job);
        let mut other = connect(format!(
            "SET search_path TO {schema}, public; SET deadlock_timeout = '60s'"
        ));
        // Watched from outside the writer's transaction, which sees one snapshot of the view.
        let mut watch = connect(String::new());
        let mut writer = other.transaction().unwrap();
        // The page's own counter shard (the counters are sharded by connection).
        writer
            .execute(
                "UPDATE counter_shards SET tasks = tasks WHERE state = 0 AND shard = $1::int % $2",
                &[&pid, &(super::super::schema::COUNTER_SHARDS as i32)],
            )
            .unwrap();
        let page = std::thread::spawn(move || {
            let r = m.insert_page(&[task("k", "1", 1)], &Listing::default());
            (m, r)
        });
        // Once the page waits for the counters, the writer wants the page's unit.
        let waiting = "SELECT count(*) FROM pg_stat_activity
            WHERE pid = $1 AND wait_event_type = 'Lock' AND query LIKE '%multi_task_keys%'";
        while watch.query_one(waiting, &[&pid]).unwrap().get::<_, i64>(0) == 0 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        writer
            .execute(
                "UPDATE units SET claims = claims + 1 WHERE id = $1",
                &[&unit],
            )
            .unwrap();
        writer.commit().unwrap();
        let (m, r) = page.join().unwrap();
        r.unwrap();
        assert_eq!(m.count_key("k").unwrap(), 2);
        assert_eq!(pending_counters(&m).0, 2);
        assert_eq!(
            one(&m, "SELECT claims FROM units"),
            1,
            "the writer's update stands"
        );
        check_recount(&m);
    }

    /// A new key that another transaction stores while the page stores it too (two
    /// listers of one part, its lease moved): the page waits for it, then adds its tasks to
    /// that key and its unit.
    #[test]
    fn a_key_stored_meanwhile_by_another_lister_is_shared() {
        let Some((mut m, l)) = job("plan-raced") else {
            return;
        };
        let pid =
            m.db.call(|c| {
                Ok(c.query_one("SELECT pg_backend_pid()", &[])?
                    .get::<_, i32>(0))
            })
            .unwrap();
        let mut other = postgres::Client::connect(&l.url, postgres::NoTls).unwrap();
        let schema = super::super::schema::schema_of(&l.job);
        other
            .batch_execute(&format!("SET search_path TO {schema}, public"))
            .unwrap();
        let mut watch = postgres::Client::connect(&l.url, postgres::NoTls).unwrap();
        let mut lister = other.transaction().unwrap();
        lister
            .batch_execute(
                "INSERT INTO units (id, partition, last_key, tasks) VALUES (77, 0, 'k', 0);
                 INSERT INTO keys (id, key, unit, tasks) VALUES (nextval('key_ids'), 'k', 77, 0)",
            )
            .unwrap();
        let page = std::thread::spawn(move || {
            let page = [task("j", "1", 0), task("k", "2", 0), task("k", "1", 1)];
            let r = m.insert_page(&page, &Listing::default());
            (m, r)
        });
        let waiting = "SELECT count(*) FROM pg_stat_activity
            WHERE pid = $1 AND wait_event_type = 'Lock' AND query LIKE '%key_ids%'";
        while watch.query_one(waiting, &[&pid]).unwrap().get::<_, i64>(0) == 0 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        lister.commit().unwrap();
        let (m, r) = page.join().unwrap();
        r.unwrap();
        assert_eq!(one(&m, "SELECT count(*) FROM keys"), 2);
        assert_eq!(m.count_key("k").unwrap(), 2);
        assert_eq!(one(&m, "SELECT unit FROM keys WHERE key = 'k'"), 77);
        let s = |v: &str| Some(v.to_string());
        let u = units(&m);
        assert_eq!(u[0][1..], [s("0"), s("j"), s("1"), s("0"), s("j")]);
        assert_eq!(u[1][1..], [s("0"), s("k"), s("2"), s("0"), s("k")]);
        check_recount(&m);
    }
}
