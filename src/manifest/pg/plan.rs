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
//! destination and version id, and for a `null` version the same content).
//!
//! A refresh (a later listing generation) plans what SQLite's does (see `manifest::pages`):
//! entries known by their identity are matched, new ones added after the key's tasks (into
//! its unit, which opens again when it was done or held back), an entry below one an earlier
//! listing planned is stored skipped (out of order), and on a source without versioning the
//! page that completes the listing plans a delete of each key no longer listed. Its state
//! across pages (keys listed, each part's last key) is in tables, so a killed refresh resumes
//! to the same result; the page that completes the last part finishes the refresh, whichever
//! process lists it (pages that complete a part take the refresh's row lock first).
//!
//! May call: `pg::schema`, `manifest::codec`, `manifest::pages` (what identifies an entry,
//! the parts summed, the reasons stored), the types of `manifest`.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use postgres::error::SqlState;
use postgres::{GenericClient, Statement, Transaction};

use super::{now_secs, PgError, PgManifest};
use crate::manifest::codec::{class_code, task_id, DELETE_MARKER, LATEST, SEQ_BITS, SEQ_MASK};
use crate::manifest::pages::{
    aggregate, delete_task, note_planned, Identity, Planned, MAX_KEY_ID, OUT_OF_ORDER_WHY,
    REPLACED_WHY, SOURCE_CHANGED,
};
use crate::manifest::{
    ListedPage, Listing, ManifestError, NewTask, Partition, Refresh, Result, State, OUT_OF_ORDER,
};
use crate::s3::{ErrorClass, VersionEntry};

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
    t.last_modified, t.flags, t.refresh
    FROM unnest($1::bigint[]) AS k(id)
    JOIN task t ON t.id BETWEEN k.id << 24 AND (k.id << 24) | 16777215";

const INSERT_TASKS: &str = "INSERT INTO task (id, unit, dest, refresh, history_pos, version_id,
    flags, size, etag, last_modified, storage_class, checksum_algorithm, state)
    SELECT id, unit, dest, $12::bigint, pos, version_id, flags, size, etag, last_modified,
        storage_class, checksum_algorithm, state
    FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[],
        $6::bigint[], $7::bigint[], $8::text[], $9::text[], $10::text[], $11::text[],
        $13::smallint[])
    AS n(id, unit, dest, pos, version_id, flags, size, etag, last_modified, storage_class,
        checksum_algorithm, state)";

/// The task counts of keys stored before the page.
const KEY_TASKS: &str = "UPDATE keys SET tasks = n.tasks
    FROM unnest($1::bigint[], $2::bigint[]) AS n(id, tasks) WHERE keys.id = n.id";

const NEW_UNIT: &str =
    "INSERT INTO units (id, partition, last_key, tasks, state) VALUES ($1, $2, $3, $4, 0)";

/// Units whose keys got tasks: they grow, and a done (or held back) one that got a task to
/// copy is open again.
const GROWN_UNITS: &str = "UPDATE units SET tasks = units.tasks + n.tasks,
    state = CASE WHEN units.state IN (2, 3) AND n.open THEN 0 ELSE units.state END
    FROM unnest($1::bigint[], $2::bigint[], $3::bool[]) AS n(id, tasks, open)
    WHERE units.id = n.id";

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

/// The listing generation pages now add to (0: `plan`).
const GENERATION: &str = "SELECT max(generation) FROM refreshes";

/// What is stored of a refresh under way: whether it tracks deletions, whether it finished.
const OUTCOME: &str =
    "SELECT tracks_deletions, finished FROM refresh_outcome WHERE generation = $1";

const OPEN_KEY: &str = "SELECT key, dests, positions FROM refresh_open_key WHERE partition = $1";

const STORE_OPEN_KEY: &str = "INSERT INTO refresh_open_key (partition, key, dests, positions)
    VALUES ($1, $2, $3, $4) ON CONFLICT (partition) DO UPDATE SET key = excluded.key,
    dests = excluded.dests, positions = excluded.positions";

/// The reason of entries stored skipped as out of order.
const OUT_OF_ORDER_ERRORS: &str = "INSERT INTO errors (task, code, message)
    SELECT unnest($1::bigint[]), $2, $3";

/// Settles the failed tasks of keys' earlier `null` contents whose reads found the source
/// changed, once a refresh planned what replaced them (per key, destination, and the id
/// of the replacing task): skipped as gone, as `pages::settle_replaced_nulls`.
const SETTLE: &str = "WITH s AS (
        SELECT DISTINCT t.id FROM unnest($1::bigint[], $2::bigint[], $3::bigint[])
            AS n(kid, dest, before)
        JOIN task t ON t.id BETWEEN n.kid << 24 AND n.before - 1
        JOIN errors e ON e.task = t.id
        WHERE t.dest = n.dest AND t.state = 3 AND t.version_id = 'null' AND e.code = $4),
    m AS (UPDATE errors SET message = $5 FROM s WHERE errors.task = s.id)
    UPDATE task SET state = $6, error_class = $7 FROM s WHERE task.id = s.id";

/// What a refresh page's new tasks add: pending ($1-$3) and skipped out of order ($4-$6)
/// to the counters, keys with a second task of the generation ($7), the generation's ($8)
/// tasks, and entries it matched ($9).
const ADDED_REFRESH: &str = "WITH c AS (
        UPDATE counters
        SET tasks = tasks + CASE WHEN state = 0 THEN $1::bigint ELSE $4::bigint END,
            bytes = bytes + CASE WHEN state = 0 THEN $2::bigint ELSE $5::bigint END,
            delete_markers = delete_markers
                + CASE WHEN state = 0 THEN $3::bigint ELSE $6::bigint END,
            no_dest_version = no_dest_version
                + CASE WHEN state = 0 THEN $1::bigint ELSE $4::bigint END
        WHERE (state = 0 AND $1::bigint > 0) OR (state = 4 AND $4::bigint > 0)),
    r AS (UPDATE refreshes SET tasks = tasks + $1::bigint + $4::bigint WHERE generation = $8),
    o AS (UPDATE refresh_outcome SET matched = matched + $9::bigint,
        out_of_order = out_of_order + $4::bigint WHERE generation = $8)
    UPDATE totals SET multi_task_keys = multi_task_keys + $7::bigint WHERE id = 1";

/// Records the page's keys (those stored) as listed by the refresh.
const MARK_LISTED: &str = "INSERT INTO refresh_seen (key_id)
    SELECT id FROM keys WHERE key = ANY($1::text[]) ON CONFLICT DO NOTHING";

/// Per key the refresh did not list and destination: its unit, task count, and whether its
/// newest task (out of order ones aside) is an object version.
const UNLISTED: &str = "SELECT DISTINCT ON (k.id, t.dest) k.id, k.key, k.unit, k.tasks, t.dest,
        t.flags & 1 = 0
    FROM keys k JOIN task t ON t.id BETWEEN k.id << 24 AND (k.id << 24) | 16777215
    LEFT JOIN errors e ON e.task = t.id
    WHERE NOT EXISTS (SELECT 1 FROM refresh_seen s WHERE s.key_id = k.id)
      AND e.code IS DISTINCT FROM $1
    ORDER BY k.id, t.dest, t.id DESC";

const GONE: &str = "INSERT INTO refresh_gone (generation, key_id, dest)
    SELECT $1::bigint, * FROM unnest($2::bigint[], $3::bigint[]) ON CONFLICT DO NOTHING";

const FINISHED: &str = "UPDATE refresh_outcome SET deleted = deleted + $2,
    not_deleted = not_deleted + $3, finished = true WHERE generation = $1";

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
    /// Entries known to have a task (stored ones when loaded, and this page's), with the
    /// generation of that task.
    seen: HashMap<Identity, i64>,
    /// Tasks of the refresh under way it has (for `multi_task_keys`, as SQLite counts them).
    generation_tasks: i64,
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
            seen: HashMap::new(),
            generation_tasks: 0,
        };
        (r.get(1), c)
    }

    /// Whether entry `t` may be one this key has stored (else it is new without a lookup:
    /// the first listing stores a key's history newest first, so an entry further down
    /// than its newest stored task is new). A refresh stores only some of a key's entries:
    /// any of them may be stored.
    fn may_have(&self, t: &NewTask, generation: i64) -> bool {
        self.stored > 0
            && (generation > 0 || self.last_pos.is_none_or(|p| t.history_pos as i64 <= p))
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
    state: Vec<i16>,
}

impl Rows {
    fn push(&mut self, id: i64, unit: i64, t: &NewTask, state: State) {
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
        self.state.push(state.code() as i16);
    }

    /// Inserts the rows as tasks of listing `generation`.
    fn insert(
        &self,
        tx: &mut Transaction<'_>,
        generation: i64,
    ) -> std::result::Result<(), postgres::Error> {
        let s = prepared(tx, INSERT_TASKS)?;
        tx.execute(
            &s,
            &[
                &self.id,
                &self.unit,
                &self.dest,
                &self.pos,
                &self.version_id,
                &self.flags,
                &self.size,
                &self.etag,
                &self.last_modified,
                &self.storage_class,
                &self.checksum,
                &generation,
                &self.state,
            ],
        )?;
        Ok(())
    }
}

/// One listed page, owned (it is sent to the connection's thread).
struct Page {
    tasks: Vec<NewTask>,
    keys: Vec<String>,
    others: Vec<(VersionEntry, u64)>,
}

/// Why a page's transaction was given up.
enum Stop {
    /// A limit of the id layout (a key with too many tasks, too many keys).
    Limit(String),
    /// The page completes a refresh that found these keys gone: where their deletes are
    /// replicated is asked of the lister (not on this thread), then the page is tried again.
    NeedDeletes(Vec<String>),
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

/// Loads what identifies the stored tasks of the keys whose entries may be stored (a
/// refresh: every stored key of the page), with their generations.
fn load_stored(
    tx: &mut Transaction<'_>,
    tasks: &[NewTask],
    generation: i64,
    cursors: &mut HashMap<String, Cursor>,
) -> std::result::Result<(), postgres::Error> {
    let mut ids: Vec<i64> = match generation {
        0 => tasks
            .iter()
            .filter_map(|t| {
                let c = cursors.get(&t.entry.key)?;
                c.may_have(t, generation).then_some(c.key_id)
            })
            .collect(),
        _ => cursors
            .values()
            .filter(|c| c.stored > 0)
            .map(|c| c.key_id)
            .collect(),
    };
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
        let (key_id, refresh): (i64, i64) = (r.get(0), r.get(7));
        if let Some(c) = by_id.get(&key_id).and_then(|k| cursors.get_mut(k)) {
            c.seen.insert(id, refresh);
            if refresh == generation && generation > 0 {
                c.generation_tasks += 1;
            }
        }
    }
    Ok(())
}

/// Inserts one page and `cp` in `tx` (for a refresh, with what it records across pages,
/// and the refresh's end when the page completes its listing; `deletes`: where the deletes
/// of keys found gone are replicated, as far as known).
fn insert_page_tx(
    tx: &mut Transaction<'_>,
    partition: i64,
    page: &Page,
    cp: &Listing,
    deletes: &HashMap<String, Vec<i64>>,
) -> std::result::Result<std::result::Result<(), Stop>, postgres::Error> {
    let s = prepared(tx, GENERATION)?;
    let generation: i64 = tx.query_one(&s, &[])?.get(0);
    // (tracks deletions, finished) of the refresh under way.
    let outcome: Option<(bool, bool)> = match generation {
        0 => None,
        g => {
            let s = prepared(tx, OUTCOME)?;
            tx.query_opt(&s, &[&g])?.map(|r| (r.get(0), r.get(1)))
        }
    };
    if !page.tasks.is_empty() || generation > 0 {
        if let Err(why) = insert_tasks(tx, partition, page, generation)? {
            return Ok(Err(Stop::Limit(why)));
        }
    }
    if outcome.is_some_and(|(tracks, finished)| tracks && !finished) && !page.keys.is_empty() {
        let s = prepared(tx, MARK_LISTED)?;
        tx.execute(&s, &[&page.keys])?;
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
    if let Some((tracks, false)) = outcome.filter(|_| cp.complete) {
        // Pages that complete a part take the refresh's row in turn: the last one sees
        // every other part complete, and finishes the refresh.
        let finished: bool = tx
            .query_one(
                "SELECT finished FROM refresh_outcome WHERE generation = $1 FOR UPDATE",
                &[&generation],
            )?
            .get(0);
        let all: bool = tx
            .query_one("SELECT bool_and(complete) FROM partitions", &[])?
            .get::<_, Option<bool>>(0)
            .unwrap_or(false);
        if all && !finished {
            return finish_refresh(tx, generation, tracks, deletes);
        }
    }
    Ok(Ok(()))
}

/// Stores the page's tasks that are not stored yet, their keys and units, and what they
/// add to the counters (see the module header). In a refresh, an entry below one of its
/// key's entries that an earlier listing planned (selected now or not: the page's others)
/// is stored skipped, out of order; `partition` carries that across its pages.
fn insert_tasks(
    tx: &mut Transaction<'_>,
    partition: i64,
    page: &Page,
    generation: i64,
) -> std::result::Result<std::result::Result<(), String>, postgres::Error> {
    let tasks = &page.tasks;
    let refresh = generation > 0;
    let mut names: Vec<String> = Vec::new();
    let mut listed: HashSet<&str> = HashSet::new();
    for t in tasks {
        if listed.insert(&t.entry.key) {
            names.push(t.entry.key.clone());
        }
    }
    // A refresh reads the stored keys of the entries it did not select too.
    let mut read: Vec<String> = names.clone();
    if refresh {
        for (e, _) in &page.others {
            if listed.insert(&e.key) {
                read.push(e.key.clone());
            }
        }
    }
    let mut cursors: HashMap<String, Cursor> = HashMap::new();
    if !read.is_empty() {
        read_keys(tx, &read, &mut cursors)?;
    }
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
                seen: HashMap::new(),
                generation_tasks: 0,
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
    load_stored(tx, tasks, generation, &mut cursors)?;

    // Per key and destination, where the refresh met an entry an earlier listing planned.
    let mut above: HashMap<String, Planned> = HashMap::new();
    if refresh {
        let s = prepared(tx, OPEN_KEY)?;
        if let Some(r) = tx.query_opt(&s, &[&partition])? {
            let (dests, positions): (Vec<i64>, Vec<i64>) = (r.get(1), r.get(2));
            above.insert(r.get(0), dests.into_iter().zip(positions).collect());
        }
        for (e, pos) in &page.others {
            let Some(c) = cursors.get(&e.key) else {
                continue;
            };
            let dests: BTreeSet<i64> = c.seen.keys().map(|id| id.dest).collect();
            for d in dests {
                if c.seen
                    .get(&Identity::of(d, e))
                    .is_some_and(|g| *g < generation)
                {
                    note_planned(&mut above, &e.key, d, *pos as i64);
                }
            }
        }
    }

    let mut rows = Rows::default();
    let (mut second, mut matched) = (0i64, 0i64);
    // Tasks, bytes and delete markers added pending [0] and skipped out of order [1].
    let mut added = [[0i64; 3]; 2];
    let mut out_of_order: Vec<i64> = Vec::new();
    let mut settle: (Vec<i64>, Vec<i64>, Vec<i64>) = Default::default();
    // Per unit: tasks added, and whether one of them is to be copied.
    let mut per_unit: BTreeMap<i64, (i64, bool)> = BTreeMap::new();
    for t in tasks {
        let Some(c) = cursors.get_mut(&t.entry.key) else {
            continue; // cannot happen: every key of the page was read or stored
        };
        let identity = Identity::of(t.dest, &t.entry);
        let pos = t.history_pos as i64;
        if let Some(g) = c.seen.get(&identity) {
            matched += 1;
            if *g < generation {
                note_planned(&mut above, &t.entry.key, t.dest, pos);
            }
            continue;
        }
        if c.next_seq > SEQ_MASK {
            return Ok(Err(format!(
                "key {:?} has more than {SEQ_MASK} tasks",
                t.entry.key
            )));
        }
        let skipped = refresh
            && above
                .get(&t.entry.key)
                .and_then(|p| p.get(&t.dest))
                .is_some_and(|p| *p < pos);
        let id = task_id(c.key_id, c.next_seq);
        let state = if skipped {
            State::Skipped
        } else {
            State::Pending
        };
        rows.push(id, c.unit, t, state);
        if skipped {
            out_of_order.push(id);
        }
        if refresh && c.stored > 0 && t.entry.version_id == "null" {
            settle.0.push(c.key_id);
            settle.1.push(t.dest);
            settle.2.push(id);
        }
        second += i64::from(match (refresh, skipped) {
            (false, _) => c.next_seq == 1,
            (true, false) => {
                c.generation_tasks += 1;
                c.generation_tasks == 2
            }
            (true, true) => false,
        });
        let a = &mut added[usize::from(skipped)];
        a[0] += 1;
        a[1] += t.entry.size as i64;
        a[2] += i64::from(t.entry.is_delete_marker);
        let u = per_unit.entry(c.unit).or_default();
        u.0 += 1;
        u.1 |= !skipped;
        c.next_seq += 1;
        c.seen.insert(identity, generation);
    }
    // The page's last listed key may go on on the next page: what was met of it is kept.
    let last = page.keys.last().or(tasks.last().map(|t| &t.entry.key));
    if let Some(k) = last.filter(|_| refresh) {
        let (dests, positions): (Vec<i64>, Vec<i64>) =
            above.remove(k).unwrap_or_default().into_iter().unzip();
        let s = prepared(tx, STORE_OPEN_KEY)?;
        tx.execute(&s, &[&partition, k, &dests, &positions])?;
    }
    if rows.id.is_empty() && (!refresh || matched == 0) {
        return Ok(Ok(()));
    }
    if !rows.id.is_empty() {
        rows.insert(tx, generation)?;
    }
    if !out_of_order.is_empty() {
        let s = prepared(tx, OUT_OF_ORDER_ERRORS)?;
        tx.execute(&s, &[&out_of_order, &OUT_OF_ORDER, &OUT_OF_ORDER_WHY])?;
    }
    if !settle.0.is_empty() {
        settle_replaced(tx, &settle)?;
    }
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
        let added = per_unit.remove(&unit).map_or(0, |u| u.0);
        let s = prepared(tx, NEW_UNIT)?;
        tx.execute(&s, &[&unit, &partition, &last_key, &added])?;
    }
    grow_units(tx, per_unit)?;
    let [pending, skipped] = added;
    if refresh {
        let s = prepared(tx, ADDED_REFRESH)?;
        tx.execute(
            &s,
            &[
                &pending[0],
                &pending[1],
                &pending[2],
                &skipped[0],
                &skipped[1],
                &skipped[2],
                &second,
                &generation,
                &matched,
            ],
        )?;
        return Ok(Ok(()));
    }
    let s = prepared(tx, ADDED)?;
    tx.execute(
        &s,
        &[
            &pending[0],
            &pending[1],
            &pending[2],
            &second,
            &(State::Pending.code() as i16),
        ],
    )?;
    Ok(Ok(()))
}

/// Adds the tasks of `per_unit` (count, and whether one is to be copied) to their units.
fn grow_units(
    tx: &mut Transaction<'_>,
    per_unit: BTreeMap<i64, (i64, bool)>,
) -> std::result::Result<(), postgres::Error> {
    if per_unit.is_empty() {
        return Ok(());
    }
    let mut units = Vec::with_capacity(per_unit.len());
    let mut added = Vec::with_capacity(per_unit.len());
    let mut open = Vec::with_capacity(per_unit.len());
    for (u, (n, o)) in per_unit {
        units.push(u);
        added.push(n);
        open.push(o);
    }
    let s = prepared(tx, GROWN_UNITS)?;
    tx.execute(&s, &[&units, &added, &open])?;
    Ok(())
}

/// Runs [`SETTLE`] for (key ids, destinations, replacing task ids).
fn settle_replaced(
    tx: &mut Transaction<'_>,
    (keys, dests, before): &(Vec<i64>, Vec<i64>, Vec<i64>),
) -> std::result::Result<(), postgres::Error> {
    let gone = class_code(ErrorClass::SourceGone) as i16;
    let s = prepared(tx, SETTLE)?;
    tx.execute(
        &s,
        &[
            keys,
            dests,
            before,
            &SOURCE_CHANGED,
            &REPLACED_WHY,
            &(State::Skipped.code() as i16),
            &gone,
        ],
    )?;
    Ok(())
}

/// Ends a refresh whose listing just completed (in the transaction of its last page), as
/// `pages::finish_refresh`: when it tracks deletions, each key it did not list whose newest
/// task (per destination) is an object version gets a delete task where `deletes` says the
/// delete is replicated, and is recorded as deleted at the source elsewhere.
fn finish_refresh(
    tx: &mut Transaction<'_>,
    generation: i64,
    tracks_deletions: bool,
    deletes: &HashMap<String, Vec<i64>>,
) -> std::result::Result<std::result::Result<(), Stop>, postgres::Error> {
    let (mut deleted, mut not_deleted) = (0i64, 0i64);
    if tracks_deletions {
        // Per key (by id): its name, unit, task count, and destinations whose newest task
        // is an object version.
        let mut gone: BTreeMap<i64, (String, i64, i64, Vec<i64>)> = BTreeMap::new();
        for r in tx.query(UNLISTED, &[&OUT_OF_ORDER])? {
            let k = gone
                .entry(r.get(0))
                .or_insert_with(|| (r.get(1), r.get(2), r.get(3), Vec::new()));
            if r.get::<_, bool>(5) {
                k.3.push(r.get(4));
            }
        }
        gone.retain(|_, k| !k.3.is_empty());
        let unknown: Vec<String> = gone
            .values()
            .filter(|k| !deletes.contains_key(&k.0))
            .map(|k| k.0.clone())
            .collect();
        if !unknown.is_empty() {
            return Ok(Err(Stop::NeedDeletes(unknown)));
        }
        let mut rows = Rows::default();
        let mut settle: (Vec<i64>, Vec<i64>, Vec<i64>) = Default::default();
        let (mut gone_keys, mut gone_dests) = (Vec::new(), Vec::new());
        let (mut key_ids, mut counts) = (Vec::new(), Vec::new());
        let mut per_unit: BTreeMap<i64, (i64, bool)> = BTreeMap::new();
        for (key_id, (key, unit, tasks, objects)) in gone {
            let replicated = &deletes[&key];
            let mut next_seq = tasks;
            for dest in objects {
                settle.0.push(key_id);
                settle.1.push(dest);
                settle.2.push(task_id(key_id, next_seq));
                if !replicated.contains(&dest) {
                    gone_keys.push(key_id);
                    gone_dests.push(dest);
                    not_deleted += 1;
                    continue;
                }
                if next_seq > SEQ_MASK {
                    return Ok(Err(Stop::Limit(format!(
                        "key {key:?} has more than {SEQ_MASK} tasks"
                    ))));
                }
                let t = delete_task(&key, dest);
                rows.push(task_id(key_id, next_seq), unit, &t, State::Pending);
                next_seq += 1;
                deleted += 1;
                let u = per_unit.entry(unit).or_default();
                u.0 += 1;
                u.1 = true;
            }
            if next_seq > tasks {
                key_ids.push(key_id);
                counts.push(next_seq);
            }
        }
        if !rows.id.is_empty() {
            rows.insert(tx, generation)?;
        }
        if !settle.0.is_empty() {
            settle_replaced(tx, &settle)?;
        }
        if !gone_keys.is_empty() {
            tx.execute(GONE, &[&generation, &gone_keys, &gone_dests])?;
        }
        if !key_ids.is_empty() {
            let s = prepared(tx, KEY_TASKS)?;
            tx.execute(&s, &[&key_ids, &counts])?;
        }
        grow_units(tx, per_unit)?;
        if deleted > 0 {
            let s = prepared(tx, ADDED_REFRESH)?;
            let zero = 0i64;
            tx.execute(
                &s,
                &[
                    &deleted,
                    &zero,
                    &deleted,
                    &zero,
                    &zero,
                    &zero,
                    &zero,
                    &generation,
                    &zero,
                ],
            )?;
        }
    }
    tx.batch_execute("TRUNCATE refresh_seen, refresh_open_key")?;
    tx.execute(FINISHED, &[&generation, &deleted, &not_deleted])?;
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
            // Two planners of one job split it once. A refresh keeps the parts its keys'
            // units belong to.
            tx.batch_execute("LOCK TABLE partitions IN SHARE ROW EXCLUSIVE MODE")?;
            let untouched: bool = tx
                .query_one(
                    "SELECT count(*) = 1 AND max(pages) = 0 AND NOT bool_or(complete)
                     AND max(end_key) IS NULL AND max(start_key) IS NULL
                     AND NOT EXISTS (SELECT 1 FROM keys) FROM partitions",
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
    /// have a task (a replayed page) are ignored. The page that completes a refresh's
    /// listing also plans, in the same transaction, what the refresh found gone (see
    /// [`PgManifest::start_refresh_of`]).
    pub fn insert_listed_page(
        &mut self,
        partition: i64,
        page: &ListedPage<'_>,
        checkpoint: &Listing,
    ) -> Result<()> {
        let owned = std::sync::Arc::new(Page {
            tasks: page.tasks.to_vec(),
            keys: page.keys.to_vec(),
            others: page.others.to_vec(),
        });
        let mut deletes: HashMap<String, Vec<i64>> = HashMap::new();
        loop {
            let (page_, cp, known) = (owned.clone(), checkpoint.clone(), deletes.clone());
            let out = self.db.call_with(move |c| {
                let mut tries = 0;
                loop {
                    tries += 1;
                    let done = (|| -> std::result::Result<_, PgError> {
                        let mut tx = c.transaction()?;
                        let out = insert_page_tx(&mut tx, partition, &page_, &cp, &known)?;
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
            match out {
                Ok(()) => return Ok(()),
                Err(Stop::Limit(why)) => {
                    return Err(ManifestError::Limit(self.path().to_string(), why))
                }
                // The page completes a refresh that found these keys gone: their deletes'
                // destinations are asked here, and the page tried again with them.
                Err(Stop::NeedDeletes(keys)) => {
                    for k in keys {
                        let d = (page.deletes)(k.as_str());
                        deletes.insert(k, d);
                    }
                }
            }
        }
    }

    /// Starts a refresh: a new listing generation of a versioned source (see
    /// [`PgManifest::start_refresh_of`]).
    pub fn start_refresh(&mut self) -> Result<Option<i64>> {
        self.start_refresh_of(true)
    }

    /// Starts a refresh, as `SqliteManifest::start_refresh_of`: a new listing generation
    /// over the same parts (their checkpoints and leases cleared), whose new entries become
    /// tasks of that generation. None when the current listing is not complete. On a
    /// source without versioning, the keys it lists are recorded, and the page that
    /// completes it plans a delete of each key no longer listed.
    pub fn start_refresh_of(&mut self, source_versioned: bool) -> Result<Option<i64>> {
        self.db.call(move |c| {
            let mut tx = c.transaction()?;
            // One start at a time, and none while a page is written.
            tx.batch_execute("LOCK TABLE partitions IN SHARE ROW EXCLUSIVE MODE")?;
            let complete: Option<bool> = tx
                .query_one("SELECT bool_and(complete) FROM partitions", &[])?
                .get(0);
            if complete != Some(true) {
                return Ok(None);
            }
            let generation: i64 = tx
                .query_one("SELECT max(generation) + 1 FROM refreshes", &[])?
                .get(0);
            tx.batch_execute(super::schema::REFRESH_TABLES)?;
            tx.batch_execute(
                "TRUNCATE refresh_seen, refresh_open_key;
                 UPDATE partitions SET key_marker = NULL, version_marker = NULL,
                     complete = false, pages = 0, entries = 0, last_key = NULL,
                     last_key_seen = 0, lease = NULL, lease_expires = NULL, worker = NULL;",
            )?;
            tx.execute(
                "INSERT INTO refreshes (generation, started_at, tasks) VALUES ($1, $2, 0)",
                &[&generation, &now_secs()],
            )?;
            tx.execute(
                "INSERT INTO refresh_outcome (generation, tracks_deletions) VALUES ($1, $2)",
                &[&generation, &!source_versioned],
            )?;
            tx.commit()?;
            Ok(Some(generation))
        })
    }

    /// Every listing generation (0 is `plan`, then one per refresh), oldest first.
    pub fn refreshes(&self) -> Result<Vec<Refresh>> {
        self.db.call(|c| {
            let rows = c.query(
                "SELECT generation, started_at, tasks FROM refreshes ORDER BY generation",
                &[],
            )?;
            let mut all: Vec<Refresh> = rows
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
                .collect();
            // A job that was never refreshed may lack the refreshes' tables.
            if all.len() > 1 {
                let n = |r: &postgres::Row, i: usize| r.get::<_, i64>(i) as u64;
                for r in c.query(
                    "SELECT generation, matched, deleted, not_deleted, out_of_order
                     FROM refresh_outcome",
                    &[],
                )? {
                    let g: i64 = r.get(0);
                    if let Some(x) = all.iter_mut().find(|x| x.generation == g) {
                        (x.matched, x.deleted, x.not_deleted, x.out_of_order) =
                            (n(&r, 1), n(&r, 2), n(&r, 3), n(&r, 4));
                    }
                }
            }
            Ok(all)
        })
    }

    /// The keys the last finished refresh found deleted at an unversioned source whose
    /// delete the job does not replicate: how many (per destination), and the first
    /// `limit` of them by name.
    pub fn deleted_at_source(&self, limit: usize) -> Result<(u64, Vec<String>)> {
        let limit = limit as i64;
        self.db.call(move |c| {
            let refreshed: bool = c
                .query_one("SELECT max(generation) > 0 FROM refreshes", &[])?
                .get::<_, Option<bool>>(0)
                .unwrap_or(false);
            if !refreshed {
                return Ok((0, Vec::new()));
            }
            let r = c.query_one(
                "WITH g AS (SELECT max(generation) AS g FROM refresh_outcome WHERE finished)
                 SELECT (SELECT count(*) FROM refresh_gone r, g WHERE r.generation = g.g),
                     ARRAY(SELECT DISTINCT k.key FROM refresh_gone r
                         JOIN keys k ON k.id = r.key_id, g
                         WHERE r.generation = g.g ORDER BY k.key LIMIT $1)",
                &[&limit],
            )?;
            Ok((r.get::<_, i64>(0) as u64, r.get(1)))
        })
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
    use crate::manifest::refresh_tests::{
        done_listing, not_replicated, null, page_listing, refresh_pages, replicated, row, version,
    };
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

    /// A task as `refresh_tests` reads it: (version id, delete marker, refresh, state).
    type KeyRow = (String, bool, i64, State);

    /// Every task of `key`, oldest first (see [`KeyRow`]).
    fn key_rows(m: &PgManifest, key: &str) -> Vec<KeyRow> {
        let key = key.to_string();
        m.db.call(move |c| {
            let rows = c.query(
                "SELECT t.version_id, t.flags & 1 = 1, t.refresh, t.state FROM task t
                 JOIN keys k ON k.id = t.id >> 24 WHERE k.key = $1
                 ORDER BY t.refresh, t.history_pos DESC, t.dest, t.id",
                &[&key],
            )?;
            Ok(rows
                .iter()
                .map(|r| {
                    let state = State::of_code(i64::from(r.get::<_, i16>(3))).unwrap();
                    (r.get(0), r.get(1), r.get(2), state)
                })
                .collect())
        })
        .unwrap()
    }

    /// Lists `tasks` (and the keys `also`, listed but not selected) as one page.
    fn listed(
        m: &mut PgManifest,
        partition: i64,
        tasks: &[NewTask],
        also: &[&str],
        cp: &Listing,
        deletes: &dyn Fn(&str) -> Vec<i64>,
    ) {
        let mut keys: Vec<String> = tasks.iter().map(|t| t.entry.key.clone()).collect();
        keys.extend(also.iter().map(|k| k.to_string()));
        keys.sort();
        keys.dedup();
        let page = ListedPage {
            tasks,
            keys: &keys,
            others: &[],
            deletes,
        };
        m.insert_listed_page(partition, &page, cp).unwrap();
    }

    #[test]
    fn a_dropped_handle_gives_its_listing_parts_back() {
        let Some((first, l)) = job("parts-back") else {
            return;
        };
        let (id, epoch) = first.claim_partition().unwrap().expect("the one part");
        let second = PgManifest::open(&l, false).unwrap();
        assert_eq!(
            second.claim_partition().unwrap(),
            None,
            "leased by the first"
        );
        drop(first);
        let (again, new_epoch) = second.claim_partition().unwrap().expect("given back");
        assert_eq!(again, id);
        assert!(new_epoch > epoch, "a new lease: {new_epoch} after {epoch}");
        // A part given back by hand is not given back again (over a later owner's lease).
        second.release_partition(again, new_epoch).unwrap();
        let third = PgManifest::open(&l, false).unwrap();
        let (_, third_epoch) = third.claim_partition().unwrap().expect("released");
        drop(second);
        assert_eq!(
            third.claim_partition().unwrap(),
            None,
            "still leased by the third (epoch {third_epoch})"
        );
    }

    #[test]
    fn a_refresh_plans_overwritten_nulls_again_and_opens_their_unit() {
        let Some((mut m, _)) = job("refresh-null") else {
            return;
        };
        let plan = [
            null("a", "aaa", 1),
            null("b", "bbb", 1),
            null("c", "ccc", 1),
        ];
        m.insert_page(&plan, &done_listing()).unwrap();
        // A run copied it all (the unit is done), and the lister's lease is still there.
        m.db.call(|c| {
            c.batch_execute(
                "UPDATE units SET state = 2;
                 UPDATE partitions SET lease = 1, lease_expires = 9999999999",
            )
        })
        .unwrap();
        assert_eq!(m.start_refresh_of(false).unwrap(), Some(1));
        assert_eq!(
            m.start_refresh_of(false).unwrap(),
            None,
            "listing under way"
        );
        assert!(m.claim_partition().unwrap().is_some(), "leases cleared");
        let refresh = [
            null("a", "AAAA", 5),
            null("b", "bbb", 1),
            null("c", "ccc", 6),
        ];
        listed(&mut m, 0, &refresh, &[], &done_listing(), &replicated);
        assert_eq!(
            key_rows(&m, "a"),
            [
                row("null", false, 0, State::Pending),
                row("null", false, 1, State::Pending)
            ]
        );
        assert_eq!(key_rows(&m, "b"), [row("null", false, 0, State::Pending)]);
        assert_eq!(key_rows(&m, "c").len(), 2, "a new write is a new task");
        let a = m.tasks_of_key("a").unwrap();
        assert_eq!(a[1].entry.etag.as_deref(), Some("\"AAAA\""));
        assert_eq!(a[1].entry.size, 4);
        let r = m.refreshes().unwrap();
        assert_eq!((r[1].tasks, r[1].matched, r[1].deleted), (2, 1, 0));
        assert!(r[1].started_at.is_some());
        assert!(!m.has_multi_version_key().unwrap());
        // A replay adds nothing.
        listed(&mut m, 0, &refresh, &[], &done_listing(), &replicated);
        assert_eq!(m.counts().unwrap().total, 5);
        // The keys' unit is open again, and claimable (the listing is complete).
        let s = |v: &str| Some(v.to_string());
        assert_eq!(units(&m)[0][3..5], [s("5"), s("0")]);
        assert_eq!(claimable(&m).len(), 1);
        check_recount(&m);
    }

    #[test]
    fn a_refresh_adds_new_keys_in_a_new_unit_and_versions_by_id() {
        let Some((mut m, _)) = job("refresh-versions") else {
            return;
        };
        m.insert_page(&[version("k", "v1", 0)], &done_listing())
            .unwrap();
        assert_eq!(m.start_refresh_of(true).unwrap(), Some(1));
        // v1 with another ETag spelling is the same version; v2 is new, and so is key `l`
        // with two versions.
        let mut again = version("k", "v1", 1);
        again.entry.etag = Some("\"other\"".into());
        let page = [
            version("k", "v2", 0),
            again,
            version("l", "w2", 0),
            version("l", "w1", 1),
        ];
        listed(&mut m, 0, &page, &[], &done_listing(), &replicated);
        assert_eq!(m.count_key("k").unwrap(), 2);
        assert_eq!(m.count_key("l").unwrap(), 2);
        assert_eq!(
            key_rows(&m, "k"),
            [
                row("v1", false, 0, State::Pending),
                row("v2", false, 1, State::Pending)
            ]
        );
        let u = units(&m);
        assert_eq!(u.len(), 2, "new keys make a unit of their own");
        let s = |v: &str| Some(v.to_string());
        assert_eq!(u[1][2..], [s("l"), s("2"), s("0"), s("l")]);
        // `l` has two tasks of this refresh: a versioned destination is needed.
        assert!(m.has_multi_version_key().unwrap());
        let r = m.refreshes().unwrap();
        assert_eq!((r[1].tasks, r[1].matched), (3, 1));
        check_recount(&m);
    }

    #[test]
    fn keys_gone_from_an_unversioned_source_get_one_delete_each() {
        let Some((mut m, _)) = job("refresh-gone") else {
            return;
        };
        let plan = [null("a", "a", 1), null("b", "b", 1), null("c", "c", 1)];
        m.insert_page(&plan, &done_listing()).unwrap();
        m.db.call(|c| c.batch_execute("UPDATE units SET state = 2"))
            .unwrap();
        assert_eq!(m.start_refresh_of(false).unwrap(), Some(1));
        let page = [null("a", "a", 1), null("d", "d", 2)];
        listed(&mut m, 0, &page, &["c"], &done_listing(), &replicated);
        assert_eq!(
            key_rows(&m, "b"),
            [
                row("null", false, 0, State::Pending),
                row("null", true, 1, State::Pending)
            ]
        );
        assert_eq!(
            key_rows(&m, "c").len(),
            1,
            "listed, not selected: not deleted"
        );
        let r = m.refreshes().unwrap();
        assert_eq!((r[1].tasks, r[1].deleted, r[1].not_deleted), (2, 1, 0));
        let c = m.counts().unwrap();
        assert_eq!((c.delete_markers, c.deleted_at_source), (1, 0));
        assert_eq!(units(&m)[0][4], Some("0".into()), "b's unit is open again");
        check_recount(&m);
        // Still gone at the next refresh: nothing more.
        assert_eq!(m.start_refresh_of(false).unwrap(), Some(2));
        listed(&mut m, 0, &page, &["c"], &done_listing(), &replicated);
        assert_eq!(key_rows(&m, "b").len(), 2);
        assert_eq!(m.refreshes().unwrap()[2].deleted, 0);
        // Back at the source: copied again, after the delete.
        assert_eq!(m.start_refresh_of(false).unwrap(), Some(3));
        let back = [null("a", "a", 1), null("b", "b2", 9), null("d", "d", 2)];
        listed(&mut m, 0, &back, &["c"], &done_listing(), &replicated);
        assert_eq!(
            key_rows(&m, "b").last(),
            Some(&row("null", false, 3, State::Pending))
        );
        check_recount(&m);
    }

    #[test]
    fn without_replicated_deletes_gone_keys_are_counted_and_named() {
        let Some((mut m, _)) = job("refresh-kept") else {
            return;
        };
        let plan = [null("a", "a", 1), null("b b", "b", 1), null("c", "c", 1)];
        m.insert_page(&plan, &done_listing()).unwrap();
        assert_eq!(m.start_refresh_of(false).unwrap(), Some(1));
        let only_a = [null("a", "a", 1)];
        listed(&mut m, 0, &only_a, &[], &done_listing(), &not_replicated);
        let c = m.counts().unwrap();
        assert_eq!(
            c.total, 3,
            "no task for a delete the job does not replicate"
        );
        assert_eq!(c.deleted_at_source, 2);
        assert_eq!(c.deleted_at_source_keys, ["b b", "c"]);
        assert_eq!(m.refreshes().unwrap()[1].not_deleted, 2);
        // A versioned source: keys that vanish were deleted for good; nothing is planned.
        assert_eq!(m.start_refresh_of(true).unwrap(), Some(2));
        listed(&mut m, 0, &[], &[], &done_listing(), &replicated);
        let c = m.counts().unwrap();
        assert_eq!((c.total, c.deleted_at_source), (3, 0));
    }

    #[test]
    fn an_older_entry_selected_later_is_stored_skipped_not_written_out_of_order() {
        let Some((mut m, l)) = job("refresh-order") else {
            return;
        };
        m.insert_page(
            &[version("k", "v3", 0), version("k", "v1", 2)],
            &done_listing(),
        )
        .unwrap();
        assert_eq!(m.start_refresh_of(true).unwrap(), Some(1));
        let first = [version("k", "v4", 0), version("k", "v3", 1)];
        listed(&mut m, 0, &first, &[], &page_listing(), &replicated);
        drop(m);
        let mut m = PgManifest::open(&l, false).unwrap();
        let second = [version("k", "v2", 2), version("k", "v1", 3)];
        listed(&mut m, 0, &second, &[], &done_listing(), &replicated);
        assert_eq!(
            key_rows(&m, "k"),
            [
                row("v1", false, 0, State::Pending),
                row("v3", false, 0, State::Pending),
                row("v2", false, 1, State::Skipped),
                row("v4", false, 1, State::Pending),
            ]
        );
        let c = m.counts().unwrap();
        assert_eq!((c.skipped, c.out_of_order), (1, 1));
        assert_eq!(m.refreshes().unwrap()[1].out_of_order, 1);
        let p = m.problems(10).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].version_id, "v2");
        assert_eq!(p[0].error_code.as_deref(), Some(OUT_OF_ORDER));
        assert!(p[0].message.as_deref().unwrap().contains("out of order"));
        check_recount(&m);
        // Not planned again by a later refresh.
        assert_eq!(m.start_refresh_of(true).unwrap(), Some(2));
        let all = [
            version("k", "v4", 0),
            version("k", "v3", 1),
            version("k", "v2", 2),
            version("k", "v1", 3),
        ];
        listed(&mut m, 0, &all, &[], &done_listing(), &replicated);
        assert_eq!(m.counts().unwrap().total, 4);
    }

    #[test]
    fn an_entry_below_a_planned_one_no_longer_selected_is_out_of_order_too() {
        let Some((mut m, l)) = job("refresh-others") else {
            return;
        };
        m.insert_page(&[version("k", "v3", 0)], &done_listing())
            .unwrap();
        assert_eq!(m.start_refresh_of(true).unwrap(), Some(1));
        let v3 = version("k", "v3", 0).entry;
        let first = ListedPage {
            tasks: &[],
            keys: &["k".to_string()],
            others: &[(v3, 0)],
            deletes: &replicated,
        };
        m.insert_listed_page(0, &first, &page_listing()).unwrap();
        drop(m);
        let mut m = PgManifest::open(&l, false).unwrap();
        let v2 = [version("k", "v2", 1)];
        listed(&mut m, 0, &v2, &[], &done_listing(), &replicated);
        assert_eq!(
            key_rows(&m, "k"),
            [
                row("v3", false, 0, State::Pending),
                row("v2", false, 1, State::Skipped)
            ]
        );
        // An entry not selected that was never planned holds nothing back.
        assert_eq!(m.start_refresh_of(true).unwrap(), Some(2));
        let other = ListedPage {
            tasks: &[version("j", "w1", 1)],
            keys: &["j".to_string()],
            others: &[(version("j", "w2", 0).entry, 0)],
            deletes: &replicated,
        };
        m.insert_listed_page(0, &other, &done_listing()).unwrap();
        assert_eq!(key_rows(&m, "j"), [row("w1", false, 2, State::Pending)]);
        check_recount(&m);
    }

    /// `refresh_tests`' refresh of two parts, killed (the manifest closed) after page
    /// `kill_after` and resumed by listing that page again.
    fn refresh_killed_after(kill_after: Option<usize>) -> Option<Vec<Vec<KeyRow>>> {
        let (mut m, l) = job("refresh-killed")?;
        assert!(m.split_partitions(&["m".to_string()]).unwrap());
        let first = ["a", "b", "c", "d"].map(|k| null(k, k, 1));
        let second = ["m", "n", "o", "p"].map(|k| null(k, k, 1));
        listed(&mut m, 0, &first, &[], &done_listing(), &replicated);
        listed(&mut m, 1, &second, &[], &done_listing(), &replicated);
        assert_eq!(m.start_refresh_of(false).unwrap(), Some(1));
        let pages = refresh_pages();
        let mut i = 0;
        let mut killed = false;
        while i < pages.len() {
            let (part, tasks, also, last) = &pages[i];
            let cp = Listing {
                complete: *last,
                pages: i as u64 + 1,
                ..Listing::default()
            };
            listed(&mut m, *part, tasks, also, &cp, &replicated);
            if Some(i) == kill_after && !killed {
                killed = true;
                drop(m);
                m = PgManifest::open(&l, false).unwrap();
                continue;
            }
            i += 1;
        }
        let r = m.refreshes().unwrap();
        assert_eq!(
            (r[1].deleted, r[1].tasks),
            (3, 7),
            "killed after {kill_after:?}"
        );
        check_recount(&m);
        Some(
            ["a", "b", "c", "ca", "d", "m", "n", "o", "p", "z"]
                .iter()
                .map(|k| key_rows(&m, k))
                .collect(),
        )
    }

    #[test]
    fn a_refresh_with_deletions_killed_anywhere_plans_the_same() {
        let Some(whole) = refresh_killed_after(None) else {
            return;
        };
        let deleted: Vec<usize> = whole
            .iter()
            .enumerate()
            .filter(|(_, r)| r.last().is_some_and(|x| x.1))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(deleted, [2, 6, 7], "{whole:?}");
        assert_eq!((whole[0].len(), whole[8].len(), whole[4].len()), (2, 2, 1));
        for kill in 0..refresh_pages().len() {
            assert_eq!(
                refresh_killed_after(Some(kill)).unwrap(),
                whole,
                "killed after page {kill}"
            );
        }
    }

    #[test]
    fn a_refresh_settles_a_null_version_that_failed_as_changed_once_it_plans_its_replacement() {
        let Some((mut m, _)) = job("refresh-settle") else {
            return;
        };
        let plan = [null("a", "a1", 1), null("b", "b1", 1), null("c", "c1", 1)];
        m.insert_page(&plan, &done_listing()).unwrap();
        // Each key's task failed as changed, and the run held its unit back.
        let fatal = class_code(ErrorClass::Fatal) as i16;
        m.db.call(move |c| {
            c.execute("UPDATE task SET state = 3, error_class = $1", &[&fatal])?;
            c.batch_execute(
                "INSERT INTO errors (task, code, message)
                     SELECT id, 'SourceChanged', 'changed' FROM task;
                 UPDATE units SET state = 3",
            )
        })
        .unwrap();
        assert_eq!(m.counts().unwrap().failed, 3);
        assert_eq!(m.start_refresh_of(false).unwrap(), Some(1));
        let page = [null("a", "a2", 5), null("c", "c1", 1)];
        listed(&mut m, 0, &page, &[], &done_listing(), &replicated);
        assert_eq!(
            key_rows(&m, "a"),
            [
                row("null", false, 0, State::Skipped),
                row("null", false, 1, State::Pending)
            ]
        );
        assert_eq!(
            key_rows(&m, "b"),
            [
                row("null", false, 0, State::Skipped),
                row("null", true, 1, State::Pending)
            ]
        );
        assert_eq!(key_rows(&m, "c"), [row("null", false, 0, State::Failed)]);
        let c = m.counts().unwrap();
        assert_eq!((c.failed, c.blocked, c.skipped, c.pending), (1, 0, 2, 2));
        let p = m.problems(10).unwrap();
        assert!(
            p.iter().any(|p| p.key == "a"
                && p.message
                    .as_deref()
                    .is_some_and(|m| m.starts_with("replaced at the source before it was copied"))),
            "{p:?}"
        );
        assert_eq!(
            units(&m)[0][4],
            Some("0".into()),
            "open again: tasks to copy"
        );
        check_recount(&m);
    }

    /// The s3 layer's fake with an empty versioned bucket `src`, keys of `per_prefix` under
    /// each of `prefixes` (to be written), and a job from `src` with delete markers.
    fn fake_source(
        prefixes: &[&str],
        per_prefix: usize,
    ) -> (
        crate::s3::fake::FakeServer,
        Vec<String>,
        crate::config::JobSettings,
    ) {
        let server = crate::s3::fake::FakeServer::new();
        server.create_bucket("src", true);
        let keys = prefixes
            .iter()
            .flat_map(|p| (0..per_prefix).map(move |i| format!("{p}{i:02}")))
            .collect();
        let mut job = crate::manifest::tests::settings();
        job.source.bucket = "src".into();
        job.selection.delete_markers = true;
        (server, keys, job)
    }

    /// The real lister (four parts, pages of 7 entries) against the s3 layer's fake, into
    /// a PostgreSQL job: every version once, in order, in units of whole keys of its part.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_lister_plans_a_postgres_job_in_parts() {
        use crate::lister::Lister;
        use crate::manifest::Manifest;
        use crate::s3::{Side, S3};

        let Some(url) = pg_job("plan-lister") else {
            return;
        };
        let (server, keys, job) = fake_source(&["a/", "b/", "c/", "d/", "e/", "f/"], 8);
        for (i, k) in keys.iter().enumerate() {
            server.put("src", k, b"v1", &[]);
            if i % 3 == 0 {
                server.delete("src", k);
            }
            for _ in 0..i % 5 {
                server.put("src", k, b"v3", &[]);
            }
        }
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

    /// The real lister refreshes a PostgreSQL job in parts (their leases cleared, the parts
    /// kept): each key's tasks are its source history once, the earlier ones matched and
    /// the new ones after them; the units that got tasks are open again, new keys make new
    /// ones.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_lister_refreshes_a_postgres_job_in_parts() {
        use crate::lister::Lister;
        use crate::manifest::Manifest;
        use crate::s3::{Side, S3};

        let Some(url) = pg_job("refresh-lister") else {
            return;
        };
        let (server, keys, job) = fake_source(&["a/", "b/", "c/", "d/"], 6);
        for k in &keys {
            server.put("src", k, b"v1", &[]);
        }
        let mut m = Manifest::open(&url, true).unwrap();
        m.store_settings(&job).unwrap();
        let source = S3::alone(server.client(Side::Source), 8);
        let mut lister = Lister::new(&job, &source, None, true);
        lister.page_size = 5;
        lister.list_parallel(&mut m, 4, |_| {}).await.unwrap();
        let parts = m.partitions().unwrap().len();
        assert!(parts > 1, "{parts} parts");
        let Manifest::Pg(pg) = &m else {
            panic!("not a PostgreSQL job");
        };
        // A run copied it all.
        pg.db
            .call(|c| c.batch_execute("UPDATE units SET state = 2"))
            .unwrap();
        let units_before = one(pg, "SELECT count(*) FROM units");
        // The source moves on: new versions, delete markers, new keys.
        let (mut added, mut marked) = (0, 0);
        for (i, k) in keys.iter().enumerate() {
            if i % 3 == 0 {
                server.put("src", k, b"v2", &[]);
                added += 1;
            }
            if i % 5 == 0 {
                server.delete("src", k);
                marked += 1;
            }
        }
        let new_keys = ["a/99", "c/50", "e/00"].map(String::from);
        for k in &new_keys {
            server.put("src", k, b"new", &[]);
        }
        assert_eq!(m.start_refresh_of(true).unwrap(), Some(1));
        lister.list_parallel(&mut m, 4, |_| {}).await.unwrap();
        let Manifest::Pg(pg) = m else {
            panic!("not a PostgreSQL job");
        };
        assert!(pg.listing().unwrap().complete);
        assert_eq!(pg.partitions().unwrap().len(), parts, "the parts are kept");
        for k in keys.iter().chain(&new_keys) {
            let source: Vec<String> = server.history("src", k).into_iter().map(|v| v.id).collect();
            let planned: Vec<String> = key_rows(&pg, k).into_iter().map(|r| r.0).collect();
            assert_eq!(planned, source, "{k}");
        }
        let r = pg.refreshes().unwrap();
        assert_eq!(r[1].tasks, added + marked + 3);
        assert_eq!(r[1].matched, keys.len() as u64);
        // Units: the old ones that got tasks are open (and claimable), the others done.
        let open_old = one(
            &pg,
            "SELECT count(*) FROM units u WHERE u.state = 0
             AND EXISTS (SELECT 1 FROM task t WHERE t.unit = u.id AND t.refresh = 0)",
        );
        let with_new = one(
            &pg,
            "SELECT count(DISTINCT unit) FROM task WHERE refresh = 1",
        );
        let new_units = one(&pg, "SELECT count(*) FROM units") - units_before;
        assert!(new_units >= 1, "new keys make new units");
        assert_eq!(open_old + new_units, with_new);
        assert_eq!(
            one(&pg, "SELECT count(*) FROM units WHERE state = 2"),
            units_before - open_old
        );
        assert_eq!(claimable(&pg).len() as i64, with_new);
        check_recount(&pg);
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
