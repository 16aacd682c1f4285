//! manifest::run_progress: the snapshot a running `run` stores every few seconds (its rate
//! and ETA, see `events::ticker`), so that `status` can show them while the run goes on. One
//! row in its own table, created when first written (older manifests have none); the run
//! deletes it when it ends, and `status` ignores a snapshot that is not fresh (a run that
//! was killed).
//!
//! May call: rusqlite.

use rusqlite::{params, Connection, OptionalExtension};

use super::{Result, SqliteManifest};

/// A running run's progress, as last stored.
#[derive(Clone, Debug, PartialEq)]
pub struct RunProgress {
    /// When it was stored (unix seconds).
    pub updated_at: i64,
    /// The running process.
    pub pid: u32,
    /// Tasks ended per second, recently.
    pub tasks_per_sec: Option<f64>,
    /// Bytes copied per second, recently.
    pub bytes_per_sec: Option<f64>,
    /// Seconds left at that rate (None while the listing goes on, or no rate yet).
    pub eta_secs: Option<u64>,
}

const TABLE: &str = "CREATE TABLE IF NOT EXISTS run_progress (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    updated_at INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    tasks_per_sec REAL,
    bytes_per_sec REAL,
    eta_secs INTEGER
)";

/// Stores the snapshot (Some) or removes it (None: the run ended). In the writer's
/// transaction.
pub(super) fn store(conn: &Connection, p: Option<&RunProgress>) -> rusqlite::Result<()> {
    conn.execute_batch(TABLE)?;
    match p {
        Some(p) => conn
            .prepare_cached(
                "INSERT INTO run_progress (id, updated_at, pid, tasks_per_sec, bytes_per_sec,
                 eta_secs) VALUES (1, ?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET updated_at = excluded.updated_at,
                 pid = excluded.pid, tasks_per_sec = excluded.tasks_per_sec,
                 bytes_per_sec = excluded.bytes_per_sec, eta_secs = excluded.eta_secs",
            )?
            .execute(params![
                p.updated_at,
                p.pid,
                p.tasks_per_sec,
                p.bytes_per_sec,
                p.eta_secs.map(|s| s as i64)
            ])
            .map(drop),
        None => conn.execute("DELETE FROM run_progress", []).map(drop),
    }
}

impl SqliteManifest {
    /// The last snapshot of a running run, if one is stored (fresh or not).
    pub fn run_progress(&self) -> Result<Option<RunProgress>> {
        if !self.has_schema_object("run_progress")? {
            return Ok(None);
        }
        self.conn
            .query_row(
                "SELECT updated_at, pid, tasks_per_sec, bytes_per_sec, eta_secs
                 FROM run_progress WHERE id = 1",
                [],
                |r| {
                    Ok(RunProgress {
                        updated_at: r.get(0)?,
                        pid: r.get(1)?,
                        tasks_per_sec: r.get(2)?,
                        bytes_per_sec: r.get(3)?,
                        eta_secs: r.get::<_, Option<i64>>(4)?.map(|s| s.max(0) as u64),
                    })
                },
            )
            .optional()
            .map_err(|e| self.sql(e))
    }
}
