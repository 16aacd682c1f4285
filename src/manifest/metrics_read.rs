//! manifest::metrics_read: what the `--metrics` endpoint reads of the manifest at each scrape
//! beyond [`Manifest::counts`]: tasks and bytes by destination bucket and state. A job with
//! one destination bucket reads the kept counters (the same rows `counts()` reads, so the
//! numbers agree with `status` by construction); a job whose rules write several buckets
//! groups the tasks (a scan).
//!
//! May call: `rusqlite`, the rest of `manifest`.

use super::{DbError, Result, SqliteManifest, State};

/// Tasks and bytes of one destination bucket in one state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketStateCount {
    /// The destination bucket.
    pub bucket: String,
    /// The state.
    pub state: State,
    /// Tasks.
    pub tasks: u64,
    /// Bytes of their object versions (delete markers weigh 0).
    pub bytes: u64,
}

const BUCKETS_SQL: &str = "SELECT DISTINCT bucket FROM destinations ORDER BY bucket";
const STATE_COUNTERS_SQL: &str = "SELECT state, tasks, bytes FROM counters ORDER BY state";
const BY_BUCKET_SQL: &str = "SELECT d.bucket, t.state, count(*), total(t.size) FROM task t
    JOIN destinations d ON d.id = t.dest GROUP BY d.bucket, t.state ORDER BY 1, 2";

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl SqliteManifest {
    /// Tasks and bytes by destination bucket and state, every state of every bucket present
    /// (zeros included), buckets in name order.
    pub fn counts_by_bucket(&self) -> Result<Vec<BucketStateCount>> {
        self.read_with(|conn| {
            let buckets: Vec<String> = conn
                .prepare_cached(BUCKETS_SQL)?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut out: Vec<BucketStateCount> = buckets
                .iter()
                .flat_map(|b| {
                    State::ALL.into_iter().map(|state| BucketStateCount {
                        bucket: b.clone(),
                        state,
                        tasks: 0,
                        bytes: 0,
                    })
                })
                .collect();
            let mut add = |bucket: Option<&str>, code: i64, tasks: u64, bytes: u64| {
                let state = State::of_code(code)
                    .ok_or_else(|| DbError::Bad(format!("task state {code}")))?;
                if let Some(row) = out
                    .iter_mut()
                    .find(|r| r.state == state && bucket.is_none_or(|b| r.bucket == b))
                {
                    row.tasks += tasks;
                    row.bytes += bytes;
                }
                Ok::<_, DbError>(())
            };
            if buckets.len() <= 1 {
                let mut stmt = conn.prepare_cached(STATE_COUNTERS_SQL)?;
                let mut rows = stmt.query([])?;
                while let Some(r) = rows.next()? {
                    add(None, r.get(0)?, count(r.get(1)?), count(r.get(2)?))?;
                }
            } else {
                let mut stmt = conn.prepare_cached(BY_BUCKET_SQL)?;
                let mut rows = stmt.query([])?;
                while let Some(r) = rows.next()? {
                    let bucket: String = r.get(0)?;
                    let bytes: f64 = r.get(3)?;
                    add(Some(&bucket), r.get(1)?, count(r.get(2)?), bytes as u64)?;
                }
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::{settings, task};
    use crate::manifest::Listing;

    fn planned() -> (tempfile::TempDir, SqliteManifest) {
        let dir = tempfile::tempdir().unwrap();
        let mut m = SqliteManifest::open(&dir.path().join("m.db"), true).unwrap();
        m.store_settings(&settings()).unwrap();
        let mut other = task("c", "1", 0);
        other.dest = 1;
        let page = vec![
            task("a", "2", 0),
            task("a", "1", 1),
            task("b", "1", 0),
            other,
        ];
        m.insert_page(&page, &Listing::default()).unwrap();
        (dir, m)
    }

    fn row<'a>(rows: &'a [BucketStateCount], bucket: &str, s: State) -> &'a BucketStateCount {
        rows.iter()
            .find(|r| r.bucket == bucket && r.state == s)
            .unwrap_or_else(|| panic!("no row {bucket} {s:?} in {rows:?}"))
    }

    #[test]
    fn one_bucket_reads_the_counters_and_agrees_with_counts() {
        let (_d, m) = planned();
        m.conn
            .execute("UPDATE task SET state = 2 WHERE version_id = '2'", [])
            .unwrap();
        // Destination 1 writes the same bucket as destination 0: one bucket.
        m.conn
            .execute(
                "INSERT INTO destinations (id, bucket) VALUES (1, 'dst')",
                [],
            )
            .unwrap();
        let rows = m.counts_by_bucket().unwrap();
        assert_eq!(rows.len(), 5, "every state of the one bucket: {rows:?}");
        let c = m.counts().unwrap();
        assert_eq!(row(&rows, "dst", State::Done).tasks, c.done);
        assert_eq!(row(&rows, "dst", State::Done).bytes, c.bytes_done);
        assert_eq!(row(&rows, "dst", State::Pending).tasks, c.pending);
        assert_eq!((c.done, c.pending), (1, 3));
        assert_eq!(row(&rows, "dst", State::Failed).tasks, 0);
    }

    #[test]
    fn several_buckets_are_counted_each() {
        let (_d, m) = planned();
        m.conn
            .execute(
                "INSERT INTO destinations (id, bucket) VALUES (1, 'other')",
                [],
            )
            .unwrap();
        m.conn
            .execute("UPDATE task SET state = 3 WHERE dest = 1", [])
            .unwrap();
        let rows = m.counts_by_bucket().unwrap();
        assert_eq!(rows.len(), 10, "{rows:?}");
        assert_eq!(row(&rows, "dst", State::Pending).tasks, 3);
        assert_eq!(row(&rows, "dst", State::Pending).bytes, 30);
        assert_eq!(row(&rows, "other", State::Failed).tasks, 1);
        assert_eq!(row(&rows, "other", State::Pending).tasks, 0);
        let sum: u64 = rows.iter().map(|r| r.tasks).sum();
        assert_eq!(sum, m.counts().unwrap().total);
    }
}
