//! manifest::pages: what the plan stage writes and asks. A listed page and the checkpoint
//! after it are one transaction; a replayed page (or entry) is recognised and ignored, so
//! the listing can resume from any committed checkpoint.
//!
//! A refresh (a later listing generation) adds what is new: an entry is known by its
//! destination and version id, and a `null` version also by its content (ETag, size,
//! last-modified, delete marker or not), since an unversioned or suspended source replaces
//! it in place. A new entry below one that an earlier listing planned would be written out of
//! order: it is stored skipped (`OUT_OF_ORDER`). On a source without versioning, the refresh
//! records the keys it lists, and the page that completes it plans a delete of each key no
//! longer listed (or records it as kept, when the job does not replicate deletes). The state
//! that spans pages (keys listed, the last key's planned places) is stored with them, so a
//! killed refresh resumes to the same result.
//!
//! May call: `codec`, `keys`, `schema` (insert counts), the types of `manifest`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rusqlite::{params, Connection, OptionalExtension};

use super::codec::{
    etag_text, etag_value, key_range, name_value, task_id, time_text, time_value, CHECKSUMS,
    DELETE_MARKER, LATEST, SEQ_BITS, SEQ_MASK, STORAGE_CLASSES,
};
use super::keys::{find_key, Keys};
use super::schema::{Counted, Tally};
use super::{DbError, Listing, NewTask, Result, SqliteManifest, State};

/// The largest key id whose task ids fit in 63 bits.
pub(super) const MAX_KEY_ID: i64 = i64::MAX >> SEQ_BITS;

/// The error code (and the reason) of an entry selected by a refresh below a version of its
/// key that already has a task: written now, it would become the destination's current
/// version over newer ones.
pub const OUT_OF_ORDER: &str = "OutOfOrder";
pub(super) const OUT_OF_ORDER_WHY: &str =
    "selected by a refresh after newer versions were copied: would be written out of order";

/// The error code of a read that found the source version changed since its listing (the
/// copier's `SourceChanged`).
pub(super) const SOURCE_CHANGED: &str = "SourceChanged";
pub(super) const REPLACED_WHY: &str = "replaced at the source before it was copied (a refresh planned what replaced it); its contents are no longer at the source";

/// A refresh that plans what replaced a key's `null` version (new contents, or its deletion
/// from a source without versioning) settles the failed tasks of that key's earlier `null`
/// contents whose reads found the source changed: their contents are gone from the source,
/// so they are skipped as gone (and block the key's later tasks no more).
fn settle_replaced_nulls(
    conn: &Connection,
    key_id: i64,
    dest: i64,
    before: i64,
) -> rusqlite::Result<()> {
    let (lo, _) = key_range(key_id);
    let failed = "SELECT t.id FROM task t JOIN errors e ON e.task = t.id
         WHERE t.id BETWEEN ?1 AND ?2 AND t.dest = ?3 AND t.state >= 3 AND t.state = 3
         AND t.version_id = 'null' AND e.code = ?4";
    let ids: Vec<i64> = conn
        .prepare_cached(failed)?
        .query_map(params![lo, before - 1, dest, SOURCE_CHANGED], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for id in ids {
        conn.prepare_cached("UPDATE errors SET message = ?2 WHERE task = ?1")?
            .execute(params![id, REPLACED_WHY])?;
        conn.prepare_cached(
            "UPDATE OR ROLLBACK task SET state = ?2, error_class = ?3 WHERE id = ?1",
        )?
        .execute(params![
            id,
            State::Skipped.code(),
            super::codec::class_code(crate::s3::ErrorClass::SourceGone)
        ])?;
    }
    Ok(())
}

/// What identifies a listed entry among a key's tasks: its destination and version id, and
/// for a `null` version also what identifies its content (ETag, size, last-modified, delete
/// marker or not): an unversioned or suspended source replaces the `null` version in place,
/// keeping its id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Identity {
    pub(super) dest: i64,
    version_id: String,
    content: Option<(Option<String>, i64, Option<String>, bool)>,
}

impl Identity {
    pub(super) fn of(dest: i64, e: &crate::s3::VersionEntry) -> Identity {
        Identity::new(
            dest,
            &e.version_id,
            e.etag.clone(),
            e.size as i64,
            e.last_modified.clone(),
            e.is_delete_marker,
        )
    }

    pub(super) fn new(
        dest: i64,
        version_id: &str,
        etag: Option<String>,
        size: i64,
        last_modified: Option<String>,
        is_delete_marker: bool,
    ) -> Identity {
        let content =
            (version_id == "null").then_some((etag, size, last_modified, is_delete_marker));
        Identity {
            dest,
            version_id: version_id.to_string(),
            content,
        }
    }
}

/// The key being inserted, and what is needed to recognise a replayed entry of it.
struct KeyCursor {
    key: String,
    key_id: i64,
    next_seq: i64,
    /// The key had tasks before this page.
    existed: bool,
    /// The (refresh, history_pos) of its newest-inserted task before this page.
    last: Option<(i64, i64)>,
    /// Entries known to have a task (this page's, plus stored ones once loaded), with the
    /// generation of that task.
    seen: HashMap<Identity, i64>,
    loaded: bool,
    /// Tasks of this generation the key has (None: not counted yet), for `multi_task_keys`.
    generation_tasks: Option<i64>,
}

impl KeyCursor {
    /// The cursor of `key`, stored now if it is new.
    fn open(
        conn: &Connection,
        keys: &mut Keys,
        key: &str,
        floor: Option<&str>,
    ) -> std::result::Result<KeyCursor, DbError> {
        let Some(key_id) = keys.find(conn, key)? else {
            let key_id = keys.add(conn, key, floor)?;
            if key_id > MAX_KEY_ID {
                return Err(DbError::Limit(format!("more than {MAX_KEY_ID} keys")));
            }
            return Ok(KeyCursor::new(key, key_id, 0, None));
        };
        let (lo, hi) = key_range(key_id);
        let last: Option<(i64, i64, i64)> = conn
            .prepare_cached(
                "SELECT id, refresh, history_pos FROM task WHERE id BETWEEN ?1 AND ?2
                 ORDER BY id DESC LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row([lo, hi], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()
            })?;
        let next_seq = last.map_or(0, |(id, _, _)| (id & SEQ_MASK) + 1);
        Ok(KeyCursor::new(
            key,
            key_id,
            next_seq,
            last.map(|(_, r, p)| (r, p)),
        ))
    }

    fn new(key: &str, key_id: i64, next_seq: i64, last: Option<(i64, i64)>) -> KeyCursor {
        KeyCursor {
            key: key.to_string(),
            key_id,
            next_seq,
            existed: last.is_some(),
            last,
            seen: HashMap::new(),
            loaded: false,
            generation_tasks: None,
        }
    }

    /// The cursor of `key` when it has tasks (a key is never stored for an entry that is
    /// not selected).
    fn existing(
        conn: &Connection,
        keys: &mut Keys,
        key: &str,
    ) -> rusqlite::Result<Option<KeyCursor>> {
        let Some(key_id) = keys.find(conn, key)? else {
            return Ok(None);
        };
        // Never inserted into (`next_seq` unused); its tasks are loaded when first asked.
        Ok(Some(KeyCursor {
            existed: true,
            ..KeyCursor::new(key, key_id, 0, None)
        }))
    }

    /// The destinations for which `e` (listed, not selected now) has a task of a generation
    /// before `generation`.
    fn planned_for(
        &mut self,
        conn: &Connection,
        e: &crate::s3::VersionEntry,
        generation: i64,
    ) -> rusqlite::Result<Vec<i64>> {
        let probe = NewTask {
            entry: e.clone(),
            history_pos: 0,
            dest: 0,
        };
        // Loads the key's tasks (the answer for destination 0 is read below with the rest).
        self.task_of(conn, &probe, generation)?;
        let dests: BTreeSet<i64> = self.seen.keys().map(|id| id.dest).collect();
        Ok(dests
            .into_iter()
            .filter(|d| {
                self.seen
                    .get(&Identity::of(*d, e))
                    .is_some_and(|g| *g < generation)
            })
            .collect())
    }

    /// The generation of the key's task for this entry, if it has one (a replayed page, or
    /// an entry an earlier listing planned).
    fn task_of(
        &mut self,
        conn: &Connection,
        t: &NewTask,
        generation: i64,
    ) -> rusqlite::Result<Option<i64>> {
        let id = Identity::of(t.dest, &t.entry);
        if let Some(g) = self.seen.get(&id) {
            return Ok(Some(*g));
        }
        if !self.existed {
            return Ok(None);
        }
        // Entries after the last stored one in the first listing are new: no lookup. (A
        // refresh stores only some of a key's entries: later ones may be stored already.)
        if let Some((refresh, pos)) = self.last {
            if generation == 0 && refresh == 0 && t.history_pos as i64 > pos {
                return Ok(None);
            }
        }
        if !self.loaded {
            let (lo, hi) = key_range(self.key_id);
            let mut stmt = conn.prepare_cached(
                "SELECT dest, version_id, refresh, flags, size, etag, last_modified FROM task
                 WHERE id BETWEEN ?1 AND ?2",
            )?;
            let mut rows = stmt.query([lo, hi])?;
            while let Some(r) = rows.next()? {
                let bad = |what: String| {
                    rusqlite::Error::FromSqlConversionFailure(
                        0,
                        rusqlite::types::Type::Text,
                        what.into(),
                    )
                };
                let flags: i64 = r.get(3)?;
                let id = Identity::new(
                    r.get(0)?,
                    &r.get::<_, String>(1)?,
                    etag_text(r.get_ref(5)?).map_err(bad)?,
                    r.get(4)?,
                    time_text(r.get_ref(6)?).map_err(bad)?,
                    flags & DELETE_MARKER != 0,
                );
                self.seen.insert(id, r.get(2)?);
            }
            self.loaded = true;
        }
        Ok(self.seen.get(&id).copied())
    }

    /// Whether a new task of this generation makes the key's second one of it (a key that
    /// gets one new version per refresh needs no versioned destination: each replaces the
    /// last).
    fn second_of_generation(
        &mut self,
        conn: &Connection,
        generation: i64,
    ) -> rusqlite::Result<bool> {
        let n = match self.generation_tasks {
            Some(n) => n,
            None if self.last.is_some_and(|(r, _)| r == generation) => {
                let (lo, hi) = key_range(self.key_id);
                conn.prepare_cached(
                    "SELECT count(*) FROM task WHERE id BETWEEN ?1 AND ?2 AND refresh = ?3",
                )?
                .query_row([lo, hi, generation], |r| r.get(0))?
            }
            None => 0,
        };
        self.generation_tasks = Some(n + 1);
        Ok(n == 1)
    }
}

/// What a new task is written as.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Pending: to be copied.
    Copy,
    /// Skipped at once: it would be written out of order.
    OutOfOrder,
}

fn insert_task(
    conn: &Connection,
    id: i64,
    generation: i64,
    t: &NewTask,
    planned: Plan,
    tally: &mut Tally,
) -> rusqlite::Result<()> {
    let e = &t.entry;
    let flags =
        if e.is_delete_marker { DELETE_MARKER } else { 0 } | if e.is_latest { LATEST } else { 0 };
    let state = match planned {
        Plan::Copy => State::Pending,
        Plan::OutOfOrder => State::Skipped,
    };
    conn.prepare_cached(
        "INSERT OR ROLLBACK INTO task (id, dest, refresh, history_pos, version_id, flags, size, etag,
         last_modified, storage_class, checksum_algorithm, state)
         VALUES (?1, ?11, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?12)",
    )?
    .execute(params![
        id,
        generation,
        t.history_pos as i64,
        e.version_id,
        flags,
        e.size as i64,
        etag_value(e.etag.as_deref()),
        time_value(e.last_modified.as_deref()),
        name_value(STORAGE_CLASSES, e.storage_class.as_deref()),
        name_value(CHECKSUMS, e.checksum_algorithm.as_deref()),
        t.dest,
        state.code(),
    ])?;
    if planned == Plan::OutOfOrder {
        conn.prepare_cached("INSERT INTO errors (task, code, message) VALUES (?1, ?2, ?3)")?
            .execute(params![id, OUT_OF_ORDER, OUT_OF_ORDER_WHY])?;
    }
    let counted = Counted {
        state: state.code(),
        size: e.size as i64,
        flags,
        attempts: 0,
        error_class: None,
        has_dest_version: false,
    };
    tally.add(id, &counted);
    Ok(())
}

/// What one page added: tasks, keys that got their second task, entries already stored.
#[derive(Default)]
struct Added {
    tasks: i64,
    second: i64,
    matched: i64,
    out_of_order: i64,
    tally: Tally,
}

impl Added {
    fn store(&self, conn: &Connection, generation: i64) -> rusqlite::Result<()> {
        self.tally.store(conn)?;
        if self.tasks > 0 {
            conn.prepare_cached("UPDATE refreshes SET tasks = tasks + ?1 WHERE generation = ?2")?
                .execute([self.tasks, generation])?;
        }
        if self.second > 0 {
            conn.prepare_cached("UPDATE totals SET multi_task_keys = multi_task_keys + ?1")?
                .execute([self.second])?;
        }
        if self.matched > 0 && generation > 0 {
            conn.prepare_cached(
                "INSERT INTO refresh_matched (generation, tasks) VALUES (?2, ?1)
                 ON CONFLICT (generation) DO UPDATE SET tasks = tasks + excluded.tasks",
            )?
            .execute([self.matched, generation])?;
        }
        if self.out_of_order > 0 {
            conn.prepare_cached(
                "UPDATE refresh_outcome SET out_of_order = out_of_order + ?1
                 WHERE generation = ?2",
            )?
            .execute([self.out_of_order, generation])?;
        }
        Ok(())
    }
}

/// Per destination, the highest place (smallest history position) in a key's history of
/// this listing at which an entry with a task of an earlier listing was met: a new entry
/// below it (a larger position) is older than a version already planned.
pub(super) type Planned = BTreeMap<i64, i64>;

/// Where a partition's refresh stands within its last listed key (its history may go on on
/// the next page): what was met of it so far (see [`Planned`]).
fn open_key_state(
    conn: &Connection,
    partition: i64,
) -> rusqlite::Result<Option<(String, Planned)>> {
    let row: Option<(String, String)> = conn
        .prepare_cached("SELECT key, dests FROM refresh_open_key WHERE partition = ?1")?
        .query_row([partition], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(row.map(|(k, d)| {
        let planned = d
            .split(',')
            .filter_map(|x| {
                let (dest, pos) = x.split_once(':')?;
                Some((dest.parse().ok()?, pos.parse().ok()?))
            })
            .collect();
        (k, planned)
    }))
}

fn store_open_key_state(
    conn: &Connection,
    partition: i64,
    key: &str,
    planned: &Planned,
) -> rusqlite::Result<()> {
    let dests: Vec<String> = planned.iter().map(|(d, p)| format!("{d}:{p}")).collect();
    conn.prepare_cached(
        "INSERT INTO refresh_open_key (partition, key, dests) VALUES (?1, ?2, ?3)
         ON CONFLICT (partition) DO UPDATE SET key = excluded.key, dests = excluded.dests",
    )?
    .execute(params![partition, key, dests.join(",")])?;
    Ok(())
}

/// Records that key `key`'s entry at `pos` has a task of an earlier listing for `dest`.
pub(super) fn note_planned(above: &mut HashMap<String, Planned>, key: &str, dest: i64, pos: i64) {
    let p = above
        .entry(key.to_string())
        .or_default()
        .entry(dest)
        .or_insert(pos);
    *p = (*p).min(pos);
}

/// Inserts the tasks of one page that are not stored yet (`floor`: the start of the page's
/// partition, see `Keys::add`). In a refresh, an entry below one of its key's entries that
/// an earlier listing planned (selected now or not: `others`) is stored skipped (out of
/// order); `partition` carries that knowledge across the partition's pages.
fn insert_tasks(
    conn: &Connection,
    keys: &mut Keys,
    page: &ListedPage<'_>,
    generation: i64,
    floor: Option<&str>,
    partition: i64,
) -> std::result::Result<Added, DbError> {
    let mut added = Added::default();
    let mut above: HashMap<String, Planned> = HashMap::new();
    if generation > 0 {
        if let Some((k, planned)) = open_key_state(conn, partition)? {
            above.insert(k, planned);
        }
        let mut cur: Option<KeyCursor> = None;
        for (e, pos) in page.others {
            let c = match cur.take() {
                Some(c) if c.key == e.key => Some(c),
                _ => KeyCursor::existing(conn, keys, &e.key)?,
            };
            let Some(mut c) = c else { continue };
            for dest in c.planned_for(conn, e, generation)? {
                note_planned(&mut above, &e.key, dest, *pos as i64);
            }
            cur = Some(c);
        }
    }
    let mut cur: Option<KeyCursor> = None;
    for t in page.tasks {
        let c = match cur.take() {
            Some(c) if c.key == t.entry.key => cur.insert(c),
            _ => cur.insert(KeyCursor::open(conn, keys, &t.entry.key, floor)?),
        };
        let pos = t.history_pos as i64;
        if let Some(g) = c.task_of(conn, t, generation)? {
            added.matched += 1;
            if g < generation {
                note_planned(&mut above, &c.key, t.dest, pos);
            }
            continue;
        }
        if c.next_seq > SEQ_MASK {
            let why = format!("key {:?} has more than {SEQ_MASK} tasks", c.key);
            return Err(DbError::Limit(why));
        }
        let out_of_order = generation > 0
            && above
                .get(&c.key)
                .and_then(|p| p.get(&t.dest))
                .is_some_and(|p| *p < pos);
        let planned = match out_of_order {
            true => Plan::OutOfOrder,
            false => Plan::Copy,
        };
        let id = task_id(c.key_id, c.next_seq);
        insert_task(conn, id, generation, t, planned, &mut added.tally)?;
        if generation > 0 && c.existed && t.entry.version_id == "null" {
            settle_replaced_nulls(conn, c.key_id, t.dest, id)?;
        }
        added.second += i64::from(match (generation, planned) {
            (0, _) => c.next_seq == 1,
            (_, Plan::Copy) => c.second_of_generation(conn, generation)?,
            (_, Plan::OutOfOrder) => false,
        });
        added.out_of_order += i64::from(out_of_order);
        c.next_seq += 1;
        c.seen.insert(Identity::of(t.dest, &t.entry), generation);
        added.tasks += 1;
    }
    // The page's last listed key may go on on the next page: what was met of it is kept.
    let last = page.keys.last().or(page.tasks.last().map(|t| &t.entry.key));
    if let Some(k) = last.filter(|_| generation > 0) {
        let planned = above.remove(k).unwrap_or_default();
        store_open_key_state(conn, partition, k, &planned)?;
    }
    Ok(added)
}

/// The tables of refreshes, created by the first one (older manifests lack them).
const REFRESH_TABLES: &str = "
CREATE TABLE IF NOT EXISTS refresh_matched (
    generation INTEGER PRIMARY KEY, -- refreshes.generation
    tasks INTEGER NOT NULL -- listed entries that already had a task
);
-- What each refresh found besides new entries.
CREATE TABLE IF NOT EXISTS refresh_outcome (
    generation INTEGER PRIMARY KEY, -- refreshes.generation
    tracks_deletions INTEGER NOT NULL, -- the source was not versioned: unlisted keys are deleted
    deleted INTEGER NOT NULL DEFAULT 0, -- delete tasks planned for keys deleted at the source
    not_deleted INTEGER NOT NULL DEFAULT 0, -- keys deleted at the source, delete not replicated
    out_of_order INTEGER NOT NULL DEFAULT 0, -- entries stored skipped: older than planned ones
    finished INTEGER NOT NULL DEFAULT 0 -- its listing completed and its deletions were planned
);
-- Keys listed by the refresh under way (one that tracks deletions).
CREATE TABLE IF NOT EXISTS refresh_seen (key_id INTEGER PRIMARY KEY);
-- Per listing part: its last key with a task so far, and the destinations for which the
-- refresh met an entry of it that an earlier listing planned.
CREATE TABLE IF NOT EXISTS refresh_open_key (
    partition INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    dests TEXT NOT NULL
);
-- Keys (per destination) a refresh found deleted at the source whose delete the job does
-- not replicate.
CREATE TABLE IF NOT EXISTS refresh_gone (
    generation INTEGER NOT NULL,
    key_id INTEGER NOT NULL,
    dest INTEGER NOT NULL,
    PRIMARY KEY (generation, key_id, dest)
) WITHOUT ROWID;
";

/// One listed page as the lister hands it over.
pub struct ListedPage<'a> {
    /// The entries selected, one task each.
    pub tasks: &'a [NewTask],
    /// Every key the page listed (selected or not), in listing order: keys a refresh of an
    /// unversioned source does not list are deleted.
    pub keys: &'a [String],
    /// The listed entries not selected, with their place in their key's history: a refresh
    /// must not write an older entry after one of them that an earlier listing planned.
    pub others: &'a [(crate::s3::VersionEntry, u64)],
    /// The destinations a delete of a key is replicated to (for keys deleted at an
    /// unversioned source: only called by the page that completes such a refresh).
    pub deletes: &'a dyn Fn(&str) -> Vec<i64>,
}

/// What is stored of a refresh under way.
#[derive(Clone, Copy)]
struct Outcome {
    tracks_deletions: bool,
    finished: bool,
}

/// The refresh's outcome row (created for a refresh that an older s3-backfill started).
fn refresh_outcome(conn: &Connection, generation: i64) -> rusqlite::Result<Option<Outcome>> {
    conn.execute_batch(REFRESH_TABLES)?;
    conn.prepare_cached(
        "INSERT OR IGNORE INTO refresh_outcome (generation, tracks_deletions) VALUES (?1, 0)",
    )?
    .execute([generation])?;
    conn.prepare_cached(
        "SELECT tracks_deletions, finished FROM refresh_outcome WHERE generation = ?1",
    )?
    .query_row([generation], |r| {
        Ok(Outcome {
            tracks_deletions: r.get(0)?,
            finished: r.get(1)?,
        })
    })
    .optional()
}

/// Records the page's keys (those with tasks) as listed by this refresh.
fn mark_listed(conn: &Connection, keys: &mut Keys, listed: &[String]) -> rusqlite::Result<()> {
    let mut last: Option<&String> = None;
    for k in listed {
        if last == Some(k) {
            continue;
        }
        last = Some(k);
        if let Some(id) = keys.find(conn, k)? {
            conn.prepare_cached("INSERT OR IGNORE INTO refresh_seen (key_id) VALUES (?1)")?
                .execute([id])?;
        }
    }
    Ok(())
}

/// Per destination, whether the newest task of key `key_id` (entries stored skipped out of
/// order aside) is an object version; and the key's next task number.
fn newest_per_dest(
    conn: &Connection,
    key_id: i64,
) -> rusqlite::Result<(std::collections::BTreeMap<i64, bool>, i64)> {
    let (lo, hi) = key_range(key_id);
    let mut stmt = conn.prepare_cached(
        "SELECT t.id, t.dest, t.flags, e.code FROM task t LEFT JOIN errors e ON e.task = t.id
         WHERE t.id BETWEEN ?1 AND ?2 ORDER BY t.id DESC",
    )?;
    let mut rows = stmt.query([lo, hi])?;
    let mut newest = std::collections::BTreeMap::new();
    let mut next_seq = 0;
    while let Some(r) = rows.next()? {
        let (id, dest, flags): (i64, i64, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
        next_seq = next_seq.max((id & SEQ_MASK) + 1);
        if r.get::<_, Option<String>>(3)?.as_deref() == Some(OUT_OF_ORDER) {
            continue;
        }
        newest.entry(dest).or_insert(flags & DELETE_MARKER == 0);
    }
    Ok((newest, next_seq))
}

/// The delete a refresh plans for key `key`, gone from a source without versioning, at
/// destination `dest`.
pub(super) fn delete_task(key: &str, dest: i64) -> NewTask {
    NewTask {
        entry: crate::s3::VersionEntry {
            key: key.to_string(),
            version_id: "null".into(),
            is_delete_marker: true,
            is_latest: true,
            ..Default::default()
        },
        history_pos: 0,
        dest,
    }
}

/// Ends a refresh whose listing just completed (in the transaction of its last page): when
/// it tracks deletions, each key it did not list whose newest task (per destination) is an
/// object version gets a delete task where `deletes` says the delete is replicated, and is
/// recorded as deleted at the source elsewhere.
fn finish_refresh(
    conn: &Connection,
    keys: &mut Keys,
    generation: i64,
    tracks_deletions: bool,
    deletes: &dyn Fn(&str) -> Vec<i64>,
) -> std::result::Result<(), DbError> {
    // A scoped refresh (`follow`'s events) looked only for its own keys.
    let scoped = super::follow::finish_scoped(conn, keys, generation)?;
    if tracks_deletions {
        let unlisted: Vec<(i64, String)> = match scoped {
            Some(unlisted) => unlisted,
            None => conn
                .prepare(
                    "SELECT id, key FROM keys WHERE id NOT IN (SELECT key_id FROM refresh_seen)
                     ORDER BY id",
                )
                .and_then(|mut s| {
                    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<rusqlite::Result<Vec<_>>>()
                })?,
        };
        let mut added = Added::default();
        let (mut deleted, mut not_deleted) = (0i64, 0i64);
        for (key_id, key) in unlisted {
            let (newest, mut next_seq) = newest_per_dest(conn, key_id)?;
            let objects: Vec<i64> = newest
                .into_iter()
                .filter(|(_, o)| *o)
                .map(|(d, _)| d)
                .collect();
            if objects.is_empty() {
                continue;
            }
            let replicated = deletes(&key);
            for dest in objects {
                let before = task_id(key_id, next_seq);
                settle_replaced_nulls(conn, key_id, dest, before)?;
                if !replicated.contains(&dest) {
                    conn.prepare_cached(
                        "INSERT OR IGNORE INTO refresh_gone (generation, key_id, dest)
                         VALUES (?1, ?2, ?3)",
                    )
                    .and_then(|mut s| s.execute([generation, key_id, dest]))?;
                    not_deleted += 1;
                    continue;
                }
                if next_seq > SEQ_MASK {
                    let why = format!("key {key:?} has more than {SEQ_MASK} tasks");
                    return Err(DbError::Limit(why));
                }
                let t = delete_task(&key, dest);
                let id = task_id(key_id, next_seq);
                insert_task(conn, id, generation, &t, Plan::Copy, &mut added.tally)?;
                next_seq += 1;
                added.tasks += 1;
                deleted += 1;
            }
        }
        added.store(conn, generation)?;
        conn.execute(
            "UPDATE refresh_outcome SET deleted = deleted + ?1, not_deleted = not_deleted + ?2
             WHERE generation = ?3",
            [deleted, not_deleted, generation],
        )?;
    }
    conn.execute_batch("DELETE FROM refresh_seen; DELETE FROM refresh_open_key;")?;
    conn.execute(
        "UPDATE refresh_outcome SET finished = 1 WHERE generation = ?1",
        [generation],
    )?;
    Ok(())
}

fn store_checkpoint(conn: &Connection, partition: i64, cp: &Listing) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE partitions SET key_marker = ?2, version_marker = ?3, complete = ?4, pages = ?5,
         entries = ?6, last_key = ?7, last_key_seen = ?8 WHERE id = ?1",
    )?
    .execute(params![
        partition,
        cp.key_marker,
        cp.version_marker,
        cp.complete,
        cp.pages as i64,
        cp.entries as i64,
        cp.last_key,
        cp.last_key_seen as i64
    ])?;
    Ok(())
}

/// One disjoint part of the key space, listed on its own, and its checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Its row id.
    pub id: i64,
    /// Its first key (inclusive); None: the start of the job's keys.
    pub start_key: Option<String>,
    /// Its end (exclusive); None: the end of the job's keys.
    pub end_key: Option<String>,
    /// Where its listing stands.
    pub listing: Listing,
}

fn partition_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Partition> {
    Ok(Partition {
        id: r.get(0)?,
        start_key: r.get(1)?,
        end_key: r.get(2)?,
        listing: Listing {
            key_marker: r.get(3)?,
            version_marker: r.get(4)?,
            complete: r.get(5)?,
            pages: r.get::<_, i64>(6)? as u64,
            entries: r.get::<_, i64>(7)? as u64,
            last_key: r.get(8)?,
            last_key_seen: r.get::<_, i64>(9)? as u64,
        },
    })
}

/// One listing generation: `plan` (0) or a refresh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refresh {
    /// Its number (`task.refresh` of the tasks it added).
    pub generation: i64,
    /// When it started (unix seconds; None for `plan`).
    pub started_at: Option<i64>,
    /// Tasks it added.
    pub tasks: u64,
    /// Listed entries that already had a task (a refresh; 0 for `plan`).
    pub matched: u64,
    /// Delete tasks it planned for keys deleted at an unversioned source.
    pub deleted: u64,
    /// Keys (per destination) it found deleted at an unversioned source whose delete the job
    /// does not replicate.
    pub not_deleted: u64,
    /// Entries it selected below versions already planned, stored skipped (out of order).
    pub out_of_order: u64,
}

/// The listing of all partitions together: complete when each is, pages and entries summed,
/// markers of the first incomplete one (of the only one, when there is one).
pub(super) fn aggregate(parts: &[Partition]) -> Listing {
    if let [only] = parts {
        return only.listing.clone();
    }
    let mut all = parts
        .iter()
        .find(|p| !p.listing.complete)
        .map(|p| p.listing.clone())
        .unwrap_or_default();
    all.complete = parts.iter().all(|p| p.listing.complete);
    all.pages = parts.iter().map(|p| p.listing.pages).sum();
    all.entries = parts.iter().map(|p| p.listing.entries).sum();
    all
}

impl SqliteManifest {
    /// The listing checkpoint of the whole job (all partitions together, see [`Partition`]).
    pub fn listing(&self) -> Result<Listing> {
        Ok(aggregate(&self.partitions()?))
    }

    /// The listing partitions, by id (one, the whole bucket, unless `plan` split it).
    pub fn partitions(&self) -> Result<Vec<Partition>> {
        self.read_partitions(&self.conn).map_err(|e| self.sql(e))
    }

    fn read_partitions(&self, conn: &Connection) -> rusqlite::Result<Vec<Partition>> {
        let mut stmt = conn.prepare_cached(
            "SELECT id, start_key, end_key, key_marker, version_marker, complete, pages, entries,
             last_key, last_key_seen FROM partitions ORDER BY id",
        )?;
        let rows = stmt.query_map([], partition_from_row)?;
        rows.collect()
    }

    /// Splits the job's keys into partitions at `starts` (sorted, each the first key of a
    /// partition), before anything is listed: partition 0 ends at the first start, the last
    /// one has no end. Returns false (and changes nothing) when the listing already started
    /// or was already split: a resumed plan keeps its partitions.
    pub fn split_partitions(&mut self, starts: &[String]) -> Result<bool> {
        self.write_tx(|tx| {
            let untouched: bool = tx.query_row(
                "SELECT count(*) = 1 AND max(pages) = 0 AND max(complete) = 0
                 AND max(end_key) IS NULL AND max(start_key) IS NULL FROM partitions",
                [],
                |r| r.get(0),
            )?;
            if !untouched || starts.is_empty() || !starts.windows(2).all(|w| w[0] < w[1]) {
                // Nothing was written: the commit ends the read.
                return Ok(false);
            }
            let mut bounds: Vec<Option<&str>> = vec![None];
            bounds.extend(starts.iter().map(|s| Some(s.as_str())));
            bounds.push(None);
            tx.execute("DELETE FROM partitions", [])?;
            for (i, w) in bounds.windows(2).enumerate() {
                tx.execute(
                    "INSERT INTO partitions (id, start_key, end_key) VALUES (?1, ?2, ?3)",
                    params![i as i64, w[0], w[1]],
                )?;
            }
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

    /// Writes one listed page of partition `partition` (its tasks, and every key it listed)
    /// and the partition's checkpoint after it, in one transaction. Entries that already have
    /// a task (a replayed page) are ignored. The page that completes a refresh's listing
    /// also plans, in the same transaction, what the refresh found gone (see
    /// [`Manifest::start_refresh_of`]).
    pub fn insert_listed_page(
        &mut self,
        partition: i64,
        page: &ListedPage<'_>,
        checkpoint: &Listing,
    ) -> Result<()> {
        // Taken out: a page that fails leaves no cache behind (its keys were rolled back).
        let cached = self.keys_cache.take();
        let (keys, version) = self.write_tx(|tx| {
            let (generation, floor, version): (i64, Option<String>, i64) = tx
                .prepare_cached(
                    "SELECT (SELECT max(generation) FROM refreshes),
                     (SELECT start_key FROM partitions WHERE id = ?1),
                     (SELECT data_version FROM pragma_data_version)",
                )?
                .query_row([partition], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            // The runs read for the last page stay right while no other connection committed
            // (`data_version` changes only then): reading them again per page grew with the
            // number of runs, one per page and partition.
            let mut keys = match cached {
                Some((keys, v)) if v == version => keys,
                _ => Keys::load(tx)?,
            };
            let outcome = match generation {
                0 => None,
                g => refresh_outcome(tx, g)?,
            };
            let floor = floor.as_deref();
            let added = insert_tasks(tx, &mut keys, page, generation, floor, partition)?;
            if outcome.is_some_and(|o| o.tracks_deletions && !o.finished) {
                mark_listed(tx, &mut keys, page.keys)?;
            }
            store_checkpoint(tx, partition, checkpoint)?;
            added.store(tx, generation)?;
            if let Some(o) = outcome.filter(|o| !o.finished) {
                let complete: bool =
                    tx.query_row("SELECT min(complete) FROM partitions", [], |r| r.get(0))?;
                if complete {
                    finish_refresh(tx, &mut keys, generation, o.tracks_deletions, page.deletes)?;
                }
            }
            Ok((keys, version))
        })?;
        self.keys_cache = Some((keys, version));
        Ok(())
    }

    /// Starts a refresh: a new listing generation over the same partitions, whose new
    /// entries become tasks of that generation. Returns its number, or None when the
    /// current listing is not complete (finish it first). Keys that vanish from the listing
    /// are not looked for (a versioned source: see [`Manifest::start_refresh_of`]).
    pub fn start_refresh(&mut self) -> Result<Option<i64>> {
        self.start_refresh_of(true)
    }

    /// Starts a refresh of a source whose versioning is enabled (`source_versioned`) or not.
    /// On a source without versioning (never enabled, or suspended) a key that the refresh
    /// no longer lists was deleted: the refresh records the keys it lists, and the page
    /// that completes it plans a delete of each key no longer listed whose newest task is an
    /// object version, for the destinations that replicate deletes, and records the others
    /// as deleted at the source only. (On a versioned source a delete is a listed delete
    /// marker; versions that vanish were deleted for good, and stay copied.)
    pub fn start_refresh_of(&mut self, source_versioned: bool) -> Result<Option<i64>> {
        self.write_tx(|tx| {
            let complete: bool =
                tx.query_row("SELECT min(complete) FROM partitions", [], |r| r.get(0))?;
            if !complete {
                return Ok(None);
            }
            let generation: i64 =
                tx.query_row("SELECT max(generation) + 1 FROM refreshes", [], |r| {
                    r.get(0)
                })?;
            tx.execute_batch(REFRESH_TABLES)?;
            tx.execute_batch(
                "DELETE FROM refresh_seen;
                 DELETE FROM refresh_open_key;
                 UPDATE partitions SET key_marker = NULL, version_marker = NULL, complete = 0,
                     pages = 0, entries = 0, last_key = NULL, last_key_seen = 0;",
            )?;
            tx.execute(
                "INSERT INTO refreshes (generation, started_at, tasks) VALUES (?1, ?2, 0)",
                params![generation, super::now_secs()],
            )?;
            tx.execute(
                "INSERT INTO refresh_outcome (generation, tracks_deletions) VALUES (?1, ?2)",
                params![generation, !source_versioned],
            )?;
            Ok(Some(generation))
        })
    }

    /// Every listing generation (0 is `plan`, then one per refresh), oldest first.
    pub fn refreshes(&self) -> Result<Vec<Refresh>> {
        let matched = if self.has_schema_object("refresh_matched")? {
            "(SELECT tasks FROM refresh_matched m WHERE m.generation = r.generation)"
        } else {
            "NULL"
        };
        let outcome = if self.has_schema_object("refresh_outcome")? {
            "o.deleted, o.not_deleted, o.out_of_order FROM refreshes r
             LEFT JOIN refresh_outcome o ON o.generation = r.generation"
        } else {
            "NULL, NULL, NULL FROM refreshes r"
        };
        self.read_with(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT r.generation, r.started_at, r.tasks, coalesce({matched}, 0), {outcome}
                 ORDER BY r.generation"
            ))?;
            let n = |r: &rusqlite::Row<'_>, i| {
                r.get::<_, Option<i64>>(i).map(|v| v.unwrap_or(0) as u64)
            };
            let rows = stmt.query_map([], |r| {
                Ok(Refresh {
                    generation: r.get(0)?,
                    started_at: r.get(1)?,
                    tasks: r.get::<_, i64>(2)? as u64,
                    matched: r.get::<_, i64>(3)? as u64,
                    deleted: n(r, 4)?,
                    not_deleted: n(r, 5)?,
                    out_of_order: n(r, 6)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// The keys the last finished refresh found deleted at an unversioned source whose
    /// delete the job does not replicate: how many (per destination), and the first
    /// `limit` of them by name.
    pub fn deleted_at_source(&self, limit: usize) -> Result<(u64, Vec<String>)> {
        if !self.has_schema_object("refresh_outcome")? {
            return Ok((0, Vec::new()));
        }
        self.read_with(|conn| {
            let last: Option<i64> = conn
                .prepare_cached("SELECT max(generation) FROM refresh_outcome WHERE finished = 1")?
                .query_row([], |r| r.get(0))?;
            let Some(g) = last else {
                return Ok((0, Vec::new()));
            };
            let n: i64 = conn
                .prepare_cached("SELECT count(*) FROM refresh_gone WHERE generation = ?1")?
                .query_row([g], |r| r.get(0))?;
            let mut stmt = conn.prepare_cached(
                "SELECT DISTINCT k.key FROM refresh_gone g JOIN keys k ON k.id = g.key_id
                 WHERE g.generation = ?1 ORDER BY k.key LIMIT ?2",
            )?;
            let names = stmt
                .query_map(params![g, limit as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok((n as u64, names))
        })
    }

    /// How many tasks a key has.
    pub fn count_key(&self, key: &str) -> Result<u64> {
        let Some(id) = find_key(&self.conn, key).map_err(|e| self.sql(e))? else {
            return Ok(0);
        };
        let (lo, hi) = key_range(id);
        self.conn
            .prepare_cached("SELECT count(*) FROM task WHERE id BETWEEN ?1 AND ?2")
            .and_then(|mut s| s.query_row([lo, hi], |r| r.get::<_, i64>(0)))
            .map(|n| n as u64)
            .map_err(|e| self.sql(e))
    }

    /// Whether some key has more than one task (a versioned destination is then needed).
    pub fn has_multi_version_key(&self) -> Result<bool> {
        self.conn
            .prepare_cached("SELECT multi_task_keys > 0 FROM totals WHERE id = 1")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(|e| self.sql(e))
    }
}
