//! manifest::pages: what the plan stage writes and asks. A listed page and the checkpoint
//! after it are one transaction; a replayed page (or entry) is recognised and ignored, so
//! the listing can resume from any committed checkpoint.
//!
//! May call: `codec`, `keys`, `schema` (insert counts), the types of `manifest`.

use std::collections::HashSet;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::codec::{
    etag_value, key_range, name_value, task_id, time_value, CHECKSUMS, DELETE_MARKER, LATEST,
    SEQ_BITS, SEQ_MASK, STORAGE_CLASSES,
};
use super::keys::{find_key, Keys};
use super::schema::{Counted, Tally};
use super::{Listing, Manifest, ManifestError, NewTask, Result, State};

/// The largest key id whose task ids fit in 63 bits.
const MAX_KEY_ID: i64 = i64::MAX >> SEQ_BITS;

/// The key being inserted, and what is needed to recognise a replayed entry of it.
struct KeyCursor {
    key: String,
    key_id: i64,
    next_seq: i64,
    /// The key had tasks before this page.
    existed: bool,
    /// The (refresh, history_pos) of its newest-inserted task before this page.
    last: Option<(i64, i64)>,
    /// (destination, version id) known to have a task (this page's, plus stored ones once
    /// loaded).
    seen: HashSet<(i64, String)>,
    loaded: bool,
}

impl KeyCursor {
    /// The cursor of `key`, stored now if it is new.
    fn open(
        conn: &Connection,
        keys: &mut Keys,
        key: &str,
        floor: Option<&str>,
        path: &str,
    ) -> Result<KeyCursor> {
        let sql = |source| ManifestError::Sql {
            path: path.to_string(),
            source,
        };
        let Some(key_id) = keys.find(conn, key).map_err(sql)? else {
            let key_id = keys.add(conn, key, floor).map_err(sql)?;
            if key_id > MAX_KEY_ID {
                let why = format!("more than {MAX_KEY_ID} keys");
                return Err(ManifestError::Limit(path.to_string(), why));
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
            })
            .map_err(sql)?;
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
            seen: HashSet::new(),
            loaded: false,
        }
    }

    /// Whether the key already has a task for this entry (a replayed page).
    fn has(&mut self, conn: &Connection, t: &NewTask, generation: i64) -> rusqlite::Result<bool> {
        if self.seen.contains(&(t.dest, t.entry.version_id.clone())) {
            return Ok(true);
        }
        if !self.existed {
            return Ok(false);
        }
        // Entries after the last stored one in the first listing are new: no lookup. (A
        // refresh stores only some of a key's entries: later ones may be stored already.)
        if let Some((refresh, pos)) = self.last {
            if generation == 0 && refresh == 0 && t.history_pos as i64 > pos {
                return Ok(false);
            }
        }
        if !self.loaded {
            let (lo, hi) = key_range(self.key_id);
            let mut stmt = conn
                .prepare_cached("SELECT dest, version_id FROM task WHERE id BETWEEN ?1 AND ?2")?;
            let versions = stmt.query_map([lo, hi], |r| Ok((r.get(0)?, r.get(1)?)))?;
            for v in versions {
                self.seen.insert(v?);
            }
            self.loaded = true;
        }
        Ok(self.seen.contains(&(t.dest, t.entry.version_id.clone())))
    }
}

fn insert_task(
    conn: &Connection,
    id: i64,
    generation: i64,
    t: &NewTask,
    tally: &mut Tally,
) -> rusqlite::Result<()> {
    let e = &t.entry;
    let flags =
        if e.is_delete_marker { DELETE_MARKER } else { 0 } | if e.is_latest { LATEST } else { 0 };
    conn.prepare_cached(
        "INSERT OR ROLLBACK INTO task (id, dest, refresh, history_pos, version_id, flags, size, etag,
         last_modified, storage_class, checksum_algorithm)
         VALUES (?1, ?11, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
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
    ])?;
    let counted = Counted {
        state: State::Pending.code(),
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
        Ok(())
    }
}

/// Inserts the tasks of one page that are not stored yet (`floor`: the start of the page's
/// partition, see `Keys::add`).
fn insert_tasks(
    conn: &Connection,
    keys: &mut Keys,
    tasks: &[NewTask],
    generation: i64,
    floor: Option<&str>,
    path: &str,
) -> Result<Added> {
    let sql = |source| ManifestError::Sql {
        path: path.to_string(),
        source,
    };
    let mut added = Added::default();
    let mut cur: Option<KeyCursor> = None;
    for t in tasks {
        let c = match cur.take() {
            Some(c) if c.key == t.entry.key => cur.insert(c),
            _ => cur.insert(KeyCursor::open(conn, keys, &t.entry.key, floor, path)?),
        };
        if c.has(conn, t, generation).map_err(sql)? {
            added.matched += 1;
            continue;
        }
        if c.next_seq > SEQ_MASK {
            return Err(ManifestError::Limit(
                path.to_string(),
                format!("key {:?} has more than {SEQ_MASK} tasks", c.key),
            ));
        }
        let id = task_id(c.key_id, c.next_seq);
        insert_task(conn, id, generation, t, &mut added.tally).map_err(sql)?;
        added.second += i64::from(c.next_seq == 1);
        c.next_seq += 1;
        c.seen.insert((t.dest, t.entry.version_id.clone()));
        added.tasks += 1;
    }
    Ok(added)
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
}

/// The listing of all partitions together: complete when each is, pages and entries summed,
/// markers of the first incomplete one (of the only one, when there is one).
fn aggregate(parts: &[Partition]) -> Listing {
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

impl Manifest {
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
        let path = self.path.clone();
        let sql = |source| ManifestError::Sql {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        let untouched: bool = tx
            .query_row(
                "SELECT count(*) = 1 AND max(pages) = 0 AND max(complete) = 0
                 AND max(end_key) IS NULL AND max(start_key) IS NULL FROM partitions",
                [],
                |r| r.get(0),
            )
            .map_err(sql)?;
        if !untouched || starts.is_empty() || !starts.windows(2).all(|w| w[0] < w[1]) {
            return Ok(false);
        }
        let mut bounds: Vec<Option<&str>> = vec![None];
        bounds.extend(starts.iter().map(|s| Some(s.as_str())));
        bounds.push(None);
        tx.execute("DELETE FROM partitions", []).map_err(sql)?;
        for (i, w) in bounds.windows(2).enumerate() {
            tx.execute(
                "INSERT INTO partitions (id, start_key, end_key) VALUES (?1, ?2, ?3)",
                params![i as i64, w[0], w[1]],
            )
            .map_err(sql)?;
        }
        tx.commit().map_err(sql)?;
        Ok(true)
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
        let path = self.path.clone();
        let sql = |source| ManifestError::Sql {
            path: path.clone(),
            source,
        };
        // Taken out: a page that fails leaves no cache behind (its keys were rolled back).
        let cached = self.keys_cache.take();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        let (generation, floor, version): (i64, Option<String>, i64) = tx
            .prepare_cached(
                "SELECT (SELECT max(generation) FROM refreshes),
                 (SELECT start_key FROM partitions WHERE id = ?1),
                 (SELECT data_version FROM pragma_data_version)",
            )
            .and_then(|mut s| s.query_row([partition], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))))
            .map_err(sql)?;
        // The runs read for the last page stay right while no other connection committed
        // (`data_version` changes only then): reading them again per page grew with the
        // number of runs, one per page and partition.
        let mut keys = match cached {
            Some((keys, v)) if v == version => keys,
            _ => Keys::load(&tx).map_err(sql)?,
        };
        let added = insert_tasks(&tx, &mut keys, tasks, generation, floor.as_deref(), &path)?;
        store_checkpoint(&tx, partition, checkpoint).map_err(sql)?;
        added.store(&tx, generation).map_err(sql)?;
        tx.commit().map_err(sql)?;
        self.keys_cache = Some((keys, version));
        Ok(())
    }

    /// Starts a refresh: a new listing generation over the same partitions, whose new
    /// entries become tasks of that generation. Returns its number, or None when the
    /// current listing is not complete (finish it first).
    pub fn start_refresh(&mut self) -> Result<Option<i64>> {
        let path = self.path.clone();
        let sql = |source| ManifestError::Sql {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        let complete: bool = tx
            .query_row("SELECT min(complete) FROM partitions", [], |r| r.get(0))
            .map_err(sql)?;
        if !complete {
            return Ok(None);
        }
        let generation: i64 = tx
            .query_row("SELECT max(generation) + 1 FROM refreshes", [], |r| {
                r.get(0)
            })
            .map_err(sql)?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS refresh_matched (
                 generation INTEGER PRIMARY KEY, -- refreshes.generation
                 tasks INTEGER NOT NULL -- listed entries that already had a task
             );
             UPDATE partitions SET key_marker = NULL, version_marker = NULL, complete = 0,
                 pages = 0, entries = 0, last_key = NULL, last_key_seen = 0;",
        )
        .map_err(sql)?;
        tx.execute(
            "INSERT INTO refreshes (generation, started_at, tasks) VALUES (?1, ?2, 0)",
            params![generation, super::now_secs()],
        )
        .map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(Some(generation))
    }

    /// Every listing generation (0 is `plan`, then one per refresh), oldest first.
    pub fn refreshes(&self) -> Result<Vec<Refresh>> {
        let matched = if self.has_schema_object("refresh_matched")? {
            "(SELECT tasks FROM refresh_matched m WHERE m.generation = r.generation)"
        } else {
            "NULL"
        };
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT generation, started_at, tasks, coalesce({matched}, 0) FROM refreshes r
                 ORDER BY generation"
            ))
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Refresh {
                    generation: r.get(0)?,
                    started_at: r.get(1)?,
                    tasks: r.get::<_, i64>(2)? as u64,
                    matched: r.get::<_, i64>(3)? as u64,
                })
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.sql(e))
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
