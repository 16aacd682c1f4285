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
    fn open(conn: &Connection, keys: &mut Keys, key: &str, path: &str) -> Result<KeyCursor> {
        let sql = |source| ManifestError::Sql {
            path: path.to_string(),
            source,
        };
        let Some(key_id) = keys.find(conn, key).map_err(sql)? else {
            let key_id = keys.add(conn, key).map_err(sql)?;
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
        // Entries after the last stored one in the same listing are new: no lookup.
        if let Some((refresh, pos)) = self.last {
            if refresh == generation && t.history_pos as i64 > pos {
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

impl Manifest {
    /// The listing checkpoint (of partition 0, the whole bucket).
    pub fn listing(&self) -> Result<Listing> {
        self.conn
            .prepare_cached(
                "SELECT key_marker, version_marker, complete, pages, entries, last_key,
                 last_key_seen FROM partitions WHERE id = 0",
            )
            .and_then(|mut s| {
                s.query_row([], |r| {
                    Ok(Listing {
                        key_marker: r.get(0)?,
                        version_marker: r.get(1)?,
                        complete: r.get(2)?,
                        pages: r.get::<_, i64>(3)? as u64,
                        entries: r.get::<_, i64>(4)? as u64,
                        last_key: r.get(5)?,
                        last_key_seen: r.get::<_, i64>(6)? as u64,
                    })
                })
            })
            .map_err(|e| self.sql(e))
    }

    /// Writes one listed page and the checkpoint after it, in one transaction. Entries that
    /// already have a task (a replayed page) are ignored.
    pub fn insert_page(&mut self, tasks: &[NewTask], checkpoint: &Listing) -> Result<()> {
        let path = self.path.clone();
        let sql = |source| ManifestError::Sql {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        let generation: i64 = tx
            .prepare_cached("SELECT max(generation) FROM refreshes")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(sql)?;
        let (mut added, mut second) = (0i64, 0i64);
        let mut cur: Option<KeyCursor> = None;
        let mut tally = Tally::default();
        let mut keys = Keys::load(&tx).map_err(sql)?;
        for t in tasks {
            let c = match cur.take() {
                Some(c) if c.key == t.entry.key => cur.insert(c),
                _ => cur.insert(KeyCursor::open(&tx, &mut keys, &t.entry.key, &path)?),
            };
            if c.has(&tx, t, generation).map_err(sql)? {
                continue;
            }
            if c.next_seq > SEQ_MASK {
                return Err(ManifestError::Limit(
                    path.clone(),
                    format!("key {:?} has more than {SEQ_MASK} tasks", c.key),
                ));
            }
            let id = task_id(c.key_id, c.next_seq);
            insert_task(&tx, id, generation, t, &mut tally).map_err(sql)?;
            second += i64::from(c.next_seq == 1);
            c.next_seq += 1;
            c.seen.insert((t.dest, t.entry.version_id.clone()));
            added += 1;
        }
        tally.store(&tx).map_err(sql)?;
        store_checkpoint(&tx, 0, checkpoint).map_err(sql)?;
        if added > 0 {
            tx.prepare_cached("UPDATE refreshes SET tasks = tasks + ?1 WHERE generation = ?2")
                .and_then(|mut s| s.execute([added, generation]))
                .map_err(sql)?;
        }
        if second > 0 {
            tx.prepare_cached("UPDATE totals SET multi_task_keys = multi_task_keys + ?1")
                .and_then(|mut s| s.execute([second]))
                .map_err(sql)?;
        }
        tx.commit().map_err(sql)
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
