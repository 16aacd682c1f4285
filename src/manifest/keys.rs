//! manifest::keys: every source key stored once, and found again without an index.
//!
//! Keys get ids in the order they are listed, and S3 lists keys in order, so the keys table
//! is sorted by key within each *run*: an id range in which the key text strictly increases
//! (`key_runs`). A sorted listing makes one run; a key listed out of order (a refresh, a
//! server that sorts differently) starts a new one. A key is found by a galloping binary
//! search in each run whose last key is not smaller than it. Inserting keys in listing order
//! only appends to the end of the keys table: unlike a hash index, no random page is written
//! per key (measured: a 64-bit hash index cut planning to a third at 1M tasks).
//!
//! May call: nothing of the crate.

use rusqlite::{params, Connection};

/// One run: keys `first..=last` increase; searches start at `cursor`.
struct Run {
    first: i64,
    last: i64,
    last_key: String,
    /// A lower bound of where the next search of a larger key can start.
    cursor: i64,
}

/// The runs of the keys table, read once per batch of lookups (one listed page).
pub(super) struct Keys {
    runs: Vec<Run>,
}

fn key_at(conn: &Connection, id: i64) -> rusqlite::Result<String> {
    conn.prepare_cached("SELECT key FROM keys WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
}

/// The first id in `lo..=hi` whose key is not smaller than `key` (the caller knows the key
/// at `hi` is not smaller): gallop from `lo`, then bisect.
fn lower_bound(conn: &Connection, mut lo: i64, hi: i64, key: &str) -> rusqlite::Result<i64> {
    let mut step = 1;
    let mut probe = lo;
    while probe < hi && key_at(conn, probe)?.as_str() < key {
        lo = probe + 1;
        probe = (lo + step).min(hi);
        step *= 2;
    }
    let mut hi = probe;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if key_at(conn, mid)?.as_str() < key {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

impl Keys {
    /// Reads the runs.
    pub(super) fn load(conn: &Connection) -> rusqlite::Result<Keys> {
        let mut stmt = conn.prepare_cached(
            "SELECT r.first_id, r.last_id, k.key FROM key_runs r JOIN keys k ON k.id = r.last_id
             ORDER BY r.first_id",
        )?;
        let runs = stmt
            .query_map([], |r| {
                Ok(Run {
                    first: r.get(0)?,
                    last: r.get(1)?,
                    last_key: r.get(2)?,
                    cursor: r.get(0)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Keys { runs })
    }

    /// The id of `key`, if it is stored. Searches of increasing keys (a listed page) resume
    /// where the previous one stopped.
    pub(super) fn find(&mut self, conn: &Connection, key: &str) -> rusqlite::Result<Option<i64>> {
        for run in &mut self.runs {
            if key > run.last_key.as_str() {
                continue;
            }
            if key == run.last_key {
                return Ok(Some(run.last));
            }
            if run.cursor > run.first && key_at(conn, run.cursor)?.as_str() > key {
                run.cursor = run.first;
            }
            let at = lower_bound(conn, run.cursor, run.last, key)?;
            run.cursor = at;
            if key_at(conn, at)? == key {
                return Ok(Some(at));
            }
        }
        Ok(None)
    }

    /// Stores a new key and returns its id: it extends the newest run when it sorts after
    /// that run's last key, else it starts a run.
    pub(super) fn add(&mut self, conn: &Connection, key: &str) -> rusqlite::Result<i64> {
        conn.prepare_cached("INSERT INTO keys (key) VALUES (?1)")?
            .execute([key])?;
        let id = conn.last_insert_rowid();
        match self.runs.last_mut() {
            Some(run) if run.last + 1 == id && key > run.last_key.as_str() => {
                conn.prepare_cached("UPDATE key_runs SET last_id = ?2 WHERE first_id = ?1")?
                    .execute(params![run.first, id])?;
                run.last = id;
                run.last_key = key.to_string();
            }
            _ => {
                conn.prepare_cached("INSERT INTO key_runs (first_id, last_id) VALUES (?1, ?1)")?
                    .execute([id])?;
                self.runs.push(Run {
                    first: id,
                    last: id,
                    last_key: key.to_string(),
                    cursor: id,
                });
            }
        }
        Ok(id)
    }
}

/// The id of `key`, if it is stored (one lookup).
pub(super) fn find_key(conn: &Connection, key: &str) -> rusqlite::Result<Option<i64>> {
    Keys::load(conn)?.find(conn, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE keys (id INTEGER PRIMARY KEY, key TEXT NOT NULL);
             CREATE TABLE key_runs (first_id INTEGER PRIMARY KEY, last_id INTEGER NOT NULL);",
        )
        .unwrap();
        c
    }

    #[test]
    fn finds_every_key_in_any_order_and_no_other() {
        let c = db();
        let mut keys = Keys::load(&c).unwrap();
        let names: Vec<String> = (0..1000).map(|i| format!("k{:05}", i * 2)).collect();
        let ids: Vec<i64> = names.iter().map(|k| keys.add(&c, k).unwrap()).collect();
        let mut keys = Keys::load(&c).unwrap();
        assert_eq!(keys.runs.len(), 1, "a sorted listing is one run");
        for (k, id) in names.iter().zip(&ids) {
            assert_eq!(keys.find(&c, k).unwrap(), Some(*id), "{k}");
        }
        // Backwards (every search restarts), and keys between the stored ones.
        for (k, id) in names.iter().zip(&ids).rev() {
            assert_eq!(keys.find(&c, k).unwrap(), Some(*id), "{k}");
        }
        for i in [0, 1, 999, 1998, 1999, 5000] {
            let missing = format!("k{:05}", i * 2 + 1);
            assert_eq!(keys.find(&c, &missing).unwrap(), None, "{missing}");
        }
        assert_eq!(keys.find(&c, "a").unwrap(), None);
        assert_eq!(keys.find(&c, "z").unwrap(), None);
    }

    #[test]
    fn a_key_out_of_order_starts_a_run() {
        let c = db();
        let mut keys = Keys::load(&c).unwrap();
        for k in ["b", "d", "a", "c", "e", "a0"] {
            keys.add(&c, k).unwrap();
        }
        let mut keys = Keys::load(&c).unwrap();
        let runs: Vec<(i64, i64)> = keys.runs.iter().map(|r| (r.first, r.last)).collect();
        assert_eq!(runs, [(1, 2), (3, 5), (6, 6)]);
        for (k, id) in [("a", 3), ("a0", 6), ("b", 1), ("c", 4), ("d", 2), ("e", 5)] {
            assert_eq!(find_key(&c, k).unwrap(), Some(id), "{k}");
            assert_eq!(keys.find(&c, k).unwrap(), Some(id), "{k}");
        }
        assert_eq!(keys.find(&c, "bb").unwrap(), None);
    }
}
