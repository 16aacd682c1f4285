//! inputs::stage: a scratch SQLite file (deleted when dropped; not the job's manifest) where
//! supplied rows wait to be put in order. CSV rows are grouped by key; inventory entries,
//! which come in any order, are read back key by key in history order (the order of
//! [`super::inventory::history_cmp`]: the latest first, then newest last-modified first, then
//! the order the inventory gave them in: an inventory lists each key's versions as a listing
//! does, newest first, and a version id says nothing of age). SQLite sorts on disk, so memory
//! stays bounded however large the input.
//!
//! May call: `s3::types` (the listing record), `inputs::inventory` (time parsing).

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use super::inventory::last_modified_millis;
use crate::s3::VersionEntry;

const SCHEMA: &str = "
PRAGMA journal_mode = OFF;
PRAGMA synchronous = OFF;
PRAGMA temp_store = FILE;
CREATE TABLE rows (key TEXT NOT NULL, version_id TEXT, line INTEGER NOT NULL);
CREATE INDEX rows_key ON rows (key);
CREATE TABLE entries (
    key TEXT NOT NULL, version_id TEXT NOT NULL, latest INTEGER NOT NULL, lm INTEGER,
    lm_text TEXT, dm INTEGER NOT NULL, size INTEGER NOT NULL, etag TEXT, storage_class TEXT,
    checksum TEXT, UNIQUE (key, version_id)
);
";

/// The scratch file and the directory holding it (both removed on drop).
pub struct Scratch {
    conn: Connection,
    dir: tempfile::TempDir,
}

/// A CSV row waiting for its key's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedRow {
    /// The version asked for (None: the key's current entry).
    pub version_id: Option<String>,
    /// Its line in the CSV file.
    pub line: u64,
}

impl Scratch {
    /// A scratch file in a new hidden directory under `near` (the manifest's directory, so
    /// that the sort spills on the disk the user chose, not on a RAM-backed /tmp).
    pub fn new(near: &Path) -> std::io::Result<Scratch> {
        let dir = tempfile::Builder::new()
            .prefix(".s3-backfill-sort")
            .tempdir_in(near)?;
        let conn = Connection::open(dir.path().join("sort.db")).map_err(std::io::Error::other)?;
        conn.execute_batch(SCHEMA).map_err(std::io::Error::other)?;
        Ok(Scratch { conn, dir })
    }

    /// The scratch directory (downloads go there too).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the one transaction of the staging.
    pub fn begin(&self) -> rusqlite::Result<()> {
        self.conn.execute_batch("BEGIN")
    }

    /// Ends it.
    pub fn commit(&self) -> rusqlite::Result<()> {
        self.conn.execute_batch("COMMIT")
    }

    /// Stages one CSV row.
    pub fn add_row(&self, key: &str, version_id: Option<&str>, line: u64) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached("INSERT INTO rows (key, version_id, line) VALUES (?1, ?2, ?3)")?
            .execute(params![key, version_id, line as i64])?;
        Ok(())
    }

    /// Up to `n` distinct keys of the CSV rows after `after`, in key order.
    pub fn keys_after(&self, after: Option<&str>, n: usize) -> rusqlite::Result<Vec<String>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT DISTINCT key FROM rows WHERE ?1 IS NULL OR key > ?1 ORDER BY key LIMIT ?2",
        )?;
        let keys = stmt.query_map(params![after, n as i64], |r| r.get(0))?;
        keys.collect()
    }

    /// The CSV rows of one key, in line order.
    pub fn rows_of(&self, key: &str) -> rusqlite::Result<Vec<StagedRow>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT version_id, line FROM rows WHERE key = ?1 ORDER BY line")?;
        let rows = stmt.query_map([key], |r| {
            Ok(StagedRow {
                version_id: r.get(0)?,
                line: r.get::<_, i64>(1)? as u64,
            })
        })?;
        rows.collect()
    }

    /// Stages one inventory entry; false when the same version was staged already. Entries
    /// are read back in the order they were staged where their times tie (the rowid).
    pub fn add_entry(&self, e: &VersionEntry) -> rusqlite::Result<bool> {
        let n = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO entries (key, version_id, latest, lm, lm_text, dm, size,
                 etag, storage_class, checksum) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                e.key,
                e.version_id,
                e.is_latest,
                last_modified_millis(e),
                e.last_modified,
                e.is_delete_marker,
                e.size as i64,
                e.etag,
                e.storage_class,
                e.checksum_algorithm
            ])?;
        Ok(n == 1)
    }

    /// The staged entries of up to `n` keys after `after` (keys in key order), each key's in
    /// history order (newest first).
    pub fn histories_after(
        &self,
        after: Option<&str>,
        n: usize,
    ) -> rusqlite::Result<Vec<Vec<VersionEntry>>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT key, version_id, latest, lm_text, dm, size, etag, storage_class, checksum
             FROM entries WHERE key IN (SELECT DISTINCT key FROM entries
                 WHERE ?1 IS NULL OR key > ?1 ORDER BY key LIMIT ?2)
             ORDER BY key, latest DESC, lm DESC, lm_text DESC, rowid",
        )?;
        let mut rows = stmt.query(params![after, n as i64])?;
        let mut out: Vec<Vec<VersionEntry>> = Vec::new();
        while let Some(r) = rows.next()? {
            let e = VersionEntry {
                key: r.get(0)?,
                version_id: r.get(1)?,
                is_latest: r.get(2)?,
                last_modified: r.get(3)?,
                is_delete_marker: r.get(4)?,
                size: r.get::<_, i64>(5)? as u64,
                etag: r.get(6)?,
                storage_class: r.get(7)?,
                checksum_algorithm: r.get(8)?,
            };
            match out.last_mut() {
                Some(h) if h[0].key == e.key => h.push(e),
                _ => out.push(vec![e]),
            }
        }
        Ok(out)
    }

    /// How many entries are staged.
    pub fn entries(&self) -> rusqlite::Result<u64> {
        self.conn
            .query_row("SELECT count(*) FROM entries", [], |r| r.get::<_, i64>(0))
            .optional()
            .map(|n| n.unwrap_or(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, v: &str, latest: bool, lm: &str) -> VersionEntry {
        VersionEntry {
            key: key.into(),
            version_id: v.into(),
            is_latest: latest,
            last_modified: Some(lm.into()),
            ..Default::default()
        }
    }

    #[test]
    fn entries_come_back_per_key_in_history_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = Scratch::new(dir.path()).unwrap();
        s.begin().unwrap();
        for e in [
            entry("b", "b1", false, "2024-01-01T00:00:01.000Z"),
            entry("a", "a1", false, "2024-01-01T00:00:01.000Z"),
            entry("b", "b3", true, "2024-01-01T00:00:01.000Z"),
            entry("a", "a3", true, "2024-01-01T00:00:03.000Z"),
            entry("b", "b2", false, "2024-01-01T00:00:02.000Z"),
            entry("a", "a2", false, "2024-01-01T00:00:02.000Z"),
        ] {
            assert!(s.add_entry(&e).unwrap());
        }
        assert!(
            !s.add_entry(&entry("a", "a2", false, "x")).unwrap(),
            "a repeat"
        );
        s.commit().unwrap();
        let ids = |hs: Vec<Vec<VersionEntry>>| {
            hs.into_iter()
                .map(|h| h.into_iter().map(|e| e.version_id).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        };
        let got = ids(s.histories_after(None, 10).unwrap());
        assert_eq!(got, [["a3", "a2", "a1"], ["b3", "b2", "b1"]]);
        let got = ids(s.histories_after(None, 1).unwrap());
        assert_eq!(got, [["a3", "a2", "a1"]], "one key at a time");
        let got = ids(s.histories_after(Some("a"), 1).unwrap());
        assert_eq!(got, [["b3", "b2", "b1"]]);
        assert!(s.histories_after(Some("b"), 1).unwrap().is_empty());
        assert_eq!(s.entries().unwrap(), 6);
    }

    #[test]
    fn same_time_versions_keep_the_inventory_order_not_the_version_id_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = Scratch::new(dir.path()).unwrap();
        s.begin().unwrap();
        // The inventory gives them newest first; their ids sort the other way.
        for e in [
            entry("k", "zz-current", true, "2024-01-01T00:00:05.000Z"),
            entry("k", "b-newer", false, "2024-01-01T00:00:01.000Z"),
            entry("k", "a-middle", false, "2024-01-01T00:00:01.000Z"),
            entry("k", "c-oldest", false, "2024-01-01T00:00:01.000Z"),
        ] {
            assert!(s.add_entry(&e).unwrap());
        }
        s.commit().unwrap();
        let got: Vec<String> = s.histories_after(None, 10).unwrap()[0]
            .iter()
            .map(|e| e.version_id.clone())
            .collect();
        assert_eq!(got, ["zz-current", "b-newer", "a-middle", "c-oldest"]);
    }

    #[test]
    fn csv_rows_are_grouped_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = Scratch::new(dir.path()).unwrap();
        s.add_row("k2", Some("v"), 1).unwrap();
        s.add_row("k1", None, 2).unwrap();
        s.add_row("k2", Some("w"), 3).unwrap();
        assert_eq!(s.keys_after(None, 10).unwrap(), ["k1", "k2"]);
        assert_eq!(s.keys_after(Some("k1"), 10).unwrap(), ["k2"]);
        assert_eq!(s.rows_of("k2").unwrap().len(), 2);
        let dir_path = s.dir().to_path_buf();
        drop(s);
        assert!(!dir_path.exists(), "the scratch directory goes with it");
    }
}
