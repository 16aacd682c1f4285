//! manifest::keys: every source key stored once, and found again without an index.
//!
//! Keys get ids in the order they are listed, and S3 lists keys in order, so the keys table
//! is sorted by key within each *run*: an id range in which the key text strictly increases
//! (`key_runs`). A sorted listing makes one run; a key listed out of order (another listing
//! partition's page, a refresh, a server that sorts differently) starts a new one. Runs are
//! kept in *layers* of runs whose key intervals do not overlap (the partitions of one listing
//! are disjoint key ranges, so all their runs fit in one layer; a refresh adds a layer): a
//! key is looked for only in the one run of each layer whose interval holds it, by a
//! galloping binary search. Inserting keys in listing order only appends to the end of the
//! keys table: unlike a hash index, no random page is written per key (measured: a 64-bit
//! hash index cut planning to a third at 1M tasks).
//!
//! May call: nothing of the crate.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Included, Unbounded};

use rusqlite::{params, Connection};

/// One run: keys `first..=last` increase, from `first_key` to `last_key`; searches start at
/// `cursor`.
struct Run {
    first: i64,
    last: i64,
    last_key: String,
    /// A lower bound of where the next search of a larger key can start.
    cursor: i64,
}

/// Runs whose key intervals do not overlap, by first key.
type Layer = BTreeMap<String, Run>;

/// The runs of the keys table, read once per batch of lookups (one listed page).
pub(super) struct Keys {
    layers: Vec<Layer>,
    /// The newest run (the one a new key may extend): its layer and first key.
    newest: Option<(usize, String)>,
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

/// Whether the interval `first..=last` overlaps no run of `layer` (other than the one that
/// starts at `own`, if given).
fn fits(layer: &Layer, first: &str, last: &str, own: Option<&str>) -> bool {
    let before = layer
        .range::<str, _>((Unbounded, Excluded(first)))
        .next_back()
        .filter(|(k, _)| Some(k.as_str()) != own);
    if before.is_some_and(|(_, r)| r.last_key.as_str() >= first) {
        return false;
    }
    layer
        .range::<str, _>((Included(first), Unbounded))
        .find(|(k, _)| Some(k.as_str()) != own)
        .is_none_or(|(k, _)| k.as_str() > last)
}

impl Keys {
    /// Reads the runs.
    pub(super) fn load(conn: &Connection) -> rusqlite::Result<Keys> {
        let mut stmt = conn.prepare_cached(
            "SELECT r.first_id, r.last_id, f.key, l.key FROM key_runs r
             JOIN keys f ON f.id = r.first_id JOIN keys l ON l.id = r.last_id
             ORDER BY r.first_id",
        )?;
        let mut rows = stmt.query([])?;
        let mut keys = Keys {
            layers: Vec::new(),
            newest: None,
        };
        while let Some(r) = rows.next()? {
            let first_key: String = r.get(2)?;
            let run = Run {
                first: r.get(0)?,
                last: r.get(1)?,
                last_key: r.get(3)?,
                cursor: r.get(0)?,
            };
            let layer = keys.place(&first_key, &run.last_key, None);
            keys.layers[layer].insert(first_key.clone(), run);
            keys.newest = Some((layer, first_key));
        }
        Ok(keys)
    }

    /// The first layer where `first..=last` fits (a new one if none).
    fn place(&mut self, first: &str, last: &str, own: Option<&str>) -> usize {
        let at = self.layers.iter().position(|l| fits(l, first, last, own));
        at.unwrap_or_else(|| {
            self.layers.push(Layer::new());
            self.layers.len() - 1
        })
    }

    /// The id of `key`, if it is stored. Searches of increasing keys (a listed page) resume
    /// where the previous one stopped.
    pub(super) fn find(&mut self, conn: &Connection, key: &str) -> rusqlite::Result<Option<i64>> {
        for layer in &mut self.layers {
            let Some((_, run)) = layer
                .range_mut::<str, _>((Unbounded, Included(key)))
                .next_back()
            else {
                continue;
            };
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
    /// that run's last key and that run starts at `floor` or later (the start of the
    /// listing partition the key is in: runs of several partitions whose pages interleave
    /// are not merged, so they stay disjoint), else it starts a run.
    pub(super) fn add(
        &mut self,
        conn: &Connection,
        key: &str,
        floor: Option<&str>,
    ) -> rusqlite::Result<i64> {
        conn.prepare_cached("INSERT INTO keys (key) VALUES (?1)")?
            .execute([key])?;
        let id = conn.last_insert_rowid();
        if let Some((layer, first_key)) = self.newest.clone() {
            let same_part = floor.is_none_or(|f| first_key.as_str() >= f);
            if same_part && self.extend(conn, layer, &first_key, id, key)? {
                return Ok(id);
            }
        }
        conn.prepare_cached("INSERT INTO key_runs (first_id, last_id) VALUES (?1, ?1)")?
            .execute([id])?;
        let layer = self.place(key, key, None);
        let run = Run {
            first: id,
            last: id,
            last_key: key.to_string(),
            cursor: id,
        };
        self.layers[layer].insert(key.to_string(), run);
        self.newest = Some((layer, key.to_string()));
        Ok(id)
    }

    /// Extends the newest run with key `id` when it follows it and the longer run overlaps no
    /// other run of its layer (a page of another partition starts a run instead, so that
    /// the runs of one listing stay disjoint: one layer).
    fn extend(
        &mut self,
        conn: &Connection,
        layer: usize,
        first_key: &str,
        id: i64,
        key: &str,
    ) -> rusqlite::Result<bool> {
        let fits_longer = fits(&self.layers[layer], first_key, key, Some(first_key));
        let Some(run) = self.layers[layer].get_mut(first_key) else {
            return Ok(false);
        };
        if run.last + 1 != id || key <= run.last_key.as_str() || !fits_longer {
            return Ok(false);
        }
        conn.prepare_cached("UPDATE key_runs SET last_id = ?2 WHERE first_id = ?1")?
            .execute(params![run.first, id])?;
        run.last = id;
        run.last_key = key.to_string();
        Ok(true)
    }
}

/// The id of `key`, if it is stored (one lookup).
pub(super) fn find_key(conn: &Connection, key: &str) -> rusqlite::Result<Option<i64>> {
    Keys::load(conn)?.find(conn, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runs as (first id, last id), by first id.
    fn runs(keys: &Keys) -> Vec<(i64, i64)> {
        let mut v: Vec<(i64, i64)> = keys
            .layers
            .iter()
            .flat_map(|l| l.values().map(|r| (r.first, r.last)))
            .collect();
        v.sort();
        v
    }

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
        let ids: Vec<i64> = names
            .iter()
            .map(|k| keys.add(&c, k, None).unwrap())
            .collect();
        let mut keys = Keys::load(&c).unwrap();
        assert_eq!(runs(&keys).len(), 1, "a sorted listing is one run");
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
            keys.add(&c, k, None).unwrap();
        }
        let mut keys = Keys::load(&c).unwrap();
        // "c" would make the run of "a" overlap the run of "b": it starts its own.
        assert_eq!(runs(&keys), [(1, 2), (3, 3), (4, 5), (6, 6)]);
        for (k, id) in [("a", 3), ("a0", 6), ("b", 1), ("c", 4), ("d", 2), ("e", 5)] {
            assert_eq!(find_key(&c, k).unwrap(), Some(id), "{k}");
            assert_eq!(keys.find(&c, k).unwrap(), Some(id), "{k}");
        }
        assert_eq!(keys.find(&c, "bb").unwrap(), None);
    }

    #[test]
    fn interleaved_partitions_fit_one_layer_and_are_found() {
        // Four partitions of a listing, their pages interleaved: runs are disjoint.
        let c = db();
        let mut keys = Keys::load(&c).unwrap();
        let mut expect = Vec::new();
        for page in 0..25 {
            for part in 0..4 {
                for i in 0..7 {
                    let k = format!("{part}/{:04}", page * 7 + i);
                    let floor = format!("{part}/");
                    expect.push((k.clone(), keys.add(&c, &k, Some(&floor)).unwrap()));
                }
            }
        }
        let mut keys = Keys::load(&c).unwrap();
        assert_eq!(keys.layers.len(), 1, "disjoint runs share one layer");
        assert_eq!(runs(&keys).len(), 100, "one run per page");
        for (k, id) in &expect {
            assert_eq!(keys.find(&c, k).unwrap(), Some(*id), "{k}");
        }
        for k in ["0/", "0/0175", "1/00005", "3/9999", "4"] {
            assert_eq!(keys.find(&c, k).unwrap(), None, "{k}");
        }
        // A second listing (a refresh) of new keys between the old ones: another layer.
        let mut keys = Keys::load(&c).unwrap();
        let new: Vec<(String, i64)> = ["0/0000a", "2/0100a", "3/0174a"]
            .iter()
            .map(|k| (k.to_string(), keys.add(&c, k, None).unwrap()))
            .collect();
        let mut keys = Keys::load(&c).unwrap();
        assert_eq!(keys.layers.len(), 2);
        for (k, id) in new.iter().chain(&expect) {
            assert_eq!(keys.find(&c, k).unwrap(), Some(*id), "{k}");
        }
    }
}
