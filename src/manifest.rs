//! manifest: the SQLite file that is the job's only memory, and the only code that touches SQL.
//!
//! One file holds the job's settings, the listing checkpoint, and one row per task (a source
//! version or delete marker) with its state. WAL mode with `synchronous=FULL`: a committed
//! transaction survives a crash or a power loss. During `run`, every write goes through one
//! writer thread ([`Writer`]) that groups queued updates into one transaction.

use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::config::JobSettings;
use crate::s3::S3Error;

/// The schema version this build writes and reads (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 1;

/// A manifest that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// SQLite failed.
    #[error("manifest {path}: {source}")]
    Sql {
        /// The manifest file.
        path: String,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// The file was written by a newer s3-backfill.
    #[error("manifest {0} has schema version {1}, newer than this s3-backfill understands ({SCHEMA_VERSION}); use a newer s3-backfill")]
    TooNew(String, i64),
    /// The file is not a manifest (or has no job in it).
    #[error("{0} is not an s3-backfill manifest; create one with `s3-backfill plan`")]
    NotAManifest(String),
    /// The manifest does not exist.
    #[error("manifest {0} does not exist; create it with `s3-backfill plan`")]
    Missing(String),
    /// The stored settings do not parse.
    #[error("manifest {0}: stored job settings are unreadable: {1}")]
    BadSettings(String, String),
    /// The writer thread stopped.
    #[error("manifest writer stopped: {0}")]
    WriterGone(String),
}

type Result<T> = std::result::Result<T, ManifestError>;

/// A task's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Not started.
    Pending,
    /// Started; if the process died, in doubt until reconciled against the destination.
    InProgress,
    /// Copied; the destination version id is recorded.
    Done,
    /// Gave up after retries or on a fatal error.
    Failed,
    /// Nothing to copy (e.g. the source version is gone).
    Skipped,
}

impl State {
    /// The name stored in the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::InProgress => "in_progress",
            State::Done => "done",
            State::Failed => "failed",
            State::Skipped => "skipped",
        }
    }

    fn parse(s: &str) -> State {
        match s {
            "in_progress" => State::InProgress,
            "done" => State::Done,
            "failed" => State::Failed,
            "skipped" => State::Skipped,
            _ => State::Pending,
        }
    }
}

/// One listed entry, as the lister hands it over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewTask {
    /// The source key, byte-exact.
    pub key: String,
    /// The source version id (`null` for unversioned objects).
    pub version_id: String,
    /// A delete marker rather than an object version.
    pub is_delete_marker: bool,
    /// The key's current version.
    pub is_latest: bool,
    /// Size in bytes (0 for delete markers).
    pub size: u64,
    /// The source ETag, quotes included.
    pub etag: Option<String>,
    /// Last-modified as listed (ISO 8601).
    pub last_modified: Option<String>,
    /// Storage class as listed.
    pub storage_class: Option<String>,
    /// Position in the key's history: 0 is the newest.
    pub history_pos: u64,
}

/// A task row as the copier needs it.
#[derive(Clone, Debug)]
pub struct Task {
    /// Row id; also the listing order.
    pub id: i64,
    /// The source key.
    pub key: String,
    /// The source version id.
    pub version_id: String,
    /// A delete marker.
    pub is_delete_marker: bool,
    /// Size in bytes.
    pub size: u64,
    /// Source ETag.
    pub etag: Option<String>,
    /// Source storage class.
    pub storage_class: Option<String>,
    /// Current state.
    pub state: State,
    /// Attempts so far (one per start).
    pub attempts: i64,
    /// The destination version id, once done.
    pub dest_version_id: Option<String>,
    /// When the last attempt started (unix seconds).
    pub started_at: Option<i64>,
    /// An open multipart upload at the destination.
    pub upload_id: Option<String>,
}

/// All tasks of one key, oldest first.
#[derive(Clone, Debug)]
pub struct KeyGroup {
    /// The source key.
    pub key: String,
    /// The key's tasks, oldest version first (every state).
    pub tasks: Vec<Task>,
}

/// The listing checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// Where the next page starts (key marker), if any page was listed.
    pub key_marker: Option<String>,
    /// Where the next page starts (version id marker).
    pub version_marker: Option<String>,
    /// The listing reached its end.
    pub complete: bool,
    /// Pages listed.
    pub pages: u64,
    /// Entries seen (selected or not).
    pub entries: u64,
    /// The last key seen and how many of its entries were seen (for history positions).
    pub last_key: Option<String>,
    /// Entries of `last_key` seen so far.
    pub last_key_seen: u64,
}

/// How a finished task ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Copied (or found copied by reconciliation).
    Done {
        /// The destination's version id (None for an unversioned destination).
        dest_version_id: Option<String>,
        /// How it was copied: `copy`, `multipart-copy`, `stream`, `multipart-stream`,
        /// `delete-marker`, or `reconciled`.
        method: &'static str,
        /// Part size used by a multipart copy.
        part_size: Option<u64>,
        /// Part count of a multipart copy.
        parts: Option<u64>,
        /// Whether the destination ETag equals the source's.
        etag_preserved: Option<bool>,
        /// Retries spent.
        retries: u64,
    },
    /// Gave up.
    Failed {
        /// The last error.
        error: S3Error,
        /// Retries spent.
        retries: u64,
    },
    /// Nothing to copy.
    Skipped {
        /// Why.
        reason: String,
        /// Retries spent.
        retries: u64,
    },
    /// Back to pending (reconciliation found it was not copied, or the run stopped).
    Requeued,
}

/// Task counts as `status` shows them.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    /// Every task.
    pub total: u64,
    /// Not started.
    pub pending: u64,
    /// Started, not finished.
    pub in_progress: u64,
    /// Copied.
    pub done: u64,
    /// Failed.
    pub failed: u64,
    /// Skipped.
    pub skipped: u64,
    /// Bytes of all object versions.
    pub bytes_total: u64,
    /// Bytes of done object versions.
    pub bytes_done: u64,
    /// Delete markers among the tasks.
    pub delete_markers: u64,
    /// Retries spent on all tasks.
    pub retries: u64,
    /// Attempts started on all tasks.
    pub attempts: u64,
    /// Done tasks whose multipart ETag was preserved.
    pub etag_preserved: u64,
    /// The listing is complete.
    pub listing_complete: bool,
    /// Versions and delete markers seen by the listing (selected or not).
    pub listed_entries: u64,
}

/// A failed or skipped task for reports.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    /// Source key.
    pub key: String,
    /// Source version id.
    pub version_id: String,
    /// `failed` or `skipped`.
    pub state: State,
    /// Error class.
    pub error_class: Option<String>,
    /// S3 error code.
    pub error_code: Option<String>,
    /// HTTP status.
    pub http_status: Option<i64>,
    /// The message.
    pub message: Option<String>,
    /// Attempts made.
    pub attempts: i64,
}

/// An open connection to a manifest file.
pub struct Manifest {
    conn: Connection,
    path: String,
}

const SCHEMA: &str = "
CREATE TABLE job (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    settings TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE listing (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    key_marker TEXT,
    version_marker TEXT,
    complete INTEGER NOT NULL DEFAULT 0,
    pages INTEGER NOT NULL DEFAULT 0,
    entries INTEGER NOT NULL DEFAULT 0,
    last_key TEXT,
    last_key_seen INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE tasks (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    version_id TEXT NOT NULL,
    is_delete_marker INTEGER NOT NULL,
    is_latest INTEGER NOT NULL,
    size INTEGER NOT NULL,
    etag TEXT,
    last_modified TEXT,
    storage_class TEXT,
    history_pos INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    error_class TEXT,
    error_code TEXT,
    http_status INTEGER,
    last_error TEXT,
    dest_version_id TEXT,
    copy_method TEXT,
    upload_id TEXT,
    part_size INTEGER,
    parts INTEGER,
    etag_preserved INTEGER,
    started_at INTEGER,
    finished_at INTEGER,
    UNIQUE (key, version_id)
);
CREATE INDEX tasks_key ON tasks (key, id);
CREATE INDEX tasks_open ON tasks (key) WHERE state IN ('pending', 'in_progress');
INSERT INTO listing (id) VALUES (1);
";

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

const TASK_COLS: &str = "id, key, version_id, is_delete_marker, size, etag, storage_class, state, \
                         attempts, dest_version_id, started_at, upload_id";

fn task_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Task> {
    Ok(Task {
        id: r.get(0)?,
        key: r.get(1)?,
        version_id: r.get(2)?,
        is_delete_marker: r.get(3)?,
        size: r.get::<_, i64>(4)? as u64,
        etag: r.get(5)?,
        storage_class: r.get(6)?,
        state: State::parse(&r.get::<_, String>(7)?),
        attempts: r.get(8)?,
        dest_version_id: r.get(9)?,
        started_at: r.get(10)?,
        upload_id: r.get(11)?,
    })
}

impl Manifest {
    /// Opens an existing manifest, or creates it when `create` is true.
    pub fn open(path: &Path, create: bool) -> Result<Manifest> {
        let p = path.display().to_string();
        if !create && !path.exists() {
            return Err(ManifestError::Missing(p));
        }
        let flags = if create {
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE
        };
        let sql = |source| ManifestError::Sql {
            path: p.clone(),
            source,
        };
        let conn = Connection::open_with_flags(path, flags).map_err(sql)?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::NotADatabase) => ManifestError::NotAManifest(p.clone()),
                _ => sql(e),
            })?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql)?;
        if version > SCHEMA_VERSION {
            return Err(ManifestError::TooNew(p, version));
        }
        if version == 0 {
            let has_tables: i64 = conn
                .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
                .map_err(sql)?;
            if has_tables > 0 || !create {
                return Err(ManifestError::NotAManifest(p));
            }
            conn.execute_batch(&format!(
                "BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            ))
            .map_err(sql)?;
        }
        Ok(Manifest { conn, path: p })
    }

    fn sql(&self, source: rusqlite::Error) -> ManifestError {
        ManifestError::Sql {
            path: self.path.clone(),
            source,
        }
    }

    /// The manifest's path as given.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The stored job settings, if `plan` stored them.
    pub fn settings(&self) -> Result<Option<JobSettings>> {
        let s: Option<String> = self
            .conn
            .query_row("SELECT settings FROM job WHERE id = 1", [], |r| r.get(0))
            .optional()
            .map_err(|e| self.sql(e))?;
        match s {
            None => Ok(None),
            Some(s) => serde_json::from_str(&s)
                .map(Some)
                .map_err(|e| ManifestError::BadSettings(self.path.clone(), e.to_string())),
        }
    }

    /// The stored settings; an error when there are none.
    pub fn require_settings(&self) -> Result<JobSettings> {
        self.settings()?
            .ok_or_else(|| ManifestError::NotAManifest(self.path.clone()))
    }

    /// Stores (or replaces) the job settings.
    pub fn store_settings(&self, s: &JobSettings) -> Result<()> {
        let json = serde_json::to_string(s).expect("settings serialize");
        self.conn
            .execute(
                "INSERT INTO job (id, settings, created_at) VALUES (1, ?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET settings = excluded.settings",
                params![json, now_secs()],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// The listing checkpoint.
    pub fn listing(&self) -> Result<Listing> {
        self.conn
            .query_row(
                "SELECT key_marker, version_marker, complete, pages, entries, last_key, last_key_seen
                 FROM listing WHERE id = 1",
                [],
                |r| {
                    Ok(Listing {
                        key_marker: r.get(0)?,
                        version_marker: r.get(1)?,
                        complete: r.get(2)?,
                        pages: r.get::<_, i64>(3)? as u64,
                        entries: r.get::<_, i64>(4)? as u64,
                        last_key: r.get(5)?,
                        last_key_seen: r.get::<_, i64>(6)? as u64,
                    })
                },
            )
            .map_err(|e| self.sql(e))
    }

    /// Writes one listed page and the checkpoint after it, in one transaction.
    pub fn insert_page(&mut self, tasks: &[NewTask], checkpoint: &Listing) -> Result<()> {
        let path = self.path.clone();
        let sql = |source| ManifestError::Sql {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sql)?;
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO tasks (key, version_id, is_delete_marker, is_latest, size,
                     etag, last_modified, storage_class, history_pos)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(sql)?;
            for t in tasks {
                ins.execute(params![
                    t.key,
                    t.version_id,
                    t.is_delete_marker,
                    t.is_latest,
                    t.size as i64,
                    t.etag,
                    t.last_modified,
                    t.storage_class,
                    t.history_pos as i64
                ])
                .map_err(sql)?;
            }
            tx.execute(
                "UPDATE listing SET key_marker = ?1, version_marker = ?2, complete = ?3,
                 pages = ?4, entries = ?5, last_key = ?6, last_key_seen = ?7 WHERE id = 1",
                params![
                    checkpoint.key_marker,
                    checkpoint.version_marker,
                    checkpoint.complete,
                    checkpoint.pages as i64,
                    checkpoint.entries as i64,
                    checkpoint.last_key,
                    checkpoint.last_key_seen as i64
                ],
            )
            .map_err(sql)?;
        }
        tx.commit().map_err(sql)
    }

    /// How many tasks a key has.
    pub fn count_key(&self, key: &str) -> Result<u64> {
        self.conn
            .query_row("SELECT count(*) FROM tasks WHERE key = ?1", [key], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(|e| self.sql(e))
    }

    /// Whether some key has more than one task (a versioned destination is then needed).
    pub fn has_multi_version_key(&self) -> Result<bool> {
        self.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM tasks GROUP BY key HAVING count(*) > 1)",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.sql(e))
    }

    /// Counts for `status`.
    pub fn counts(&self) -> Result<Counts> {
        let mut c = Counts::default();
        let mut stmt = self
            .conn
            .prepare(
                "SELECT state, count(*), coalesce(sum(size), 0), coalesce(sum(is_delete_marker), 0),
                 coalesce(sum(retries), 0), coalesce(sum(attempts), 0),
                 coalesce(sum(etag_preserved), 0)
                 FROM tasks GROUP BY state",
            )
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                    r.get::<_, i64>(3)? as u64,
                    r.get::<_, i64>(4)? as u64,
                    r.get::<_, i64>(5)? as u64,
                    r.get::<_, i64>(6)? as u64,
                ))
            })
            .map_err(|e| self.sql(e))?;
        for row in rows {
            let (state, n, bytes, markers, retries, attempts, preserved) =
                row.map_err(|e| self.sql(e))?;
            c.total += n;
            c.bytes_total += bytes;
            c.delete_markers += markers;
            c.retries += retries;
            c.attempts += attempts;
            c.etag_preserved += preserved;
            match State::parse(&state) {
                State::Pending => c.pending += n,
                State::InProgress => c.in_progress += n,
                State::Done => {
                    c.done += n;
                    c.bytes_done += bytes;
                }
                State::Failed => c.failed += n,
                State::Skipped => c.skipped += n,
            }
        }
        let l = self.listing()?;
        c.listing_complete = l.complete;
        c.listed_entries = l.entries;
        Ok(c)
    }

    /// Failed and skipped tasks, in key order, at most `limit`.
    pub fn problems(&self, limit: usize) -> Result<Vec<Problem>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT key, version_id, state, error_class, error_code, http_status, last_error, attempts
                 FROM tasks WHERE state IN ('failed', 'skipped') ORDER BY key, id DESC LIMIT ?1",
            )
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([limit as i64], |r| {
                Ok(Problem {
                    key: r.get(0)?,
                    version_id: r.get(1)?,
                    state: State::parse(&r.get::<_, String>(2)?),
                    error_class: r.get(3)?,
                    error_code: r.get(4)?,
                    http_status: r.get(5)?,
                    message: r.get(6)?,
                    attempts: r.get(7)?,
                })
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.sql(e))
    }

    /// Puts failed tasks back in the queue; returns how many.
    pub fn retry_failed(&self) -> Result<usize> {
        self.conn
            .execute(
                "UPDATE tasks SET state = 'pending' WHERE state = 'failed'",
                [],
            )
            .map_err(|e| self.sql(e))
    }

    /// Tasks with an open multipart upload recorded (left by a killed run).
    pub fn open_uploads(&self) -> Result<Vec<Task>> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {TASK_COLS} FROM tasks WHERE upload_id IS NOT NULL ORDER BY id"
            ))
            .map_err(|e| self.sql(e))?;
        let rows = stmt.query_map([], task_from_row).map_err(|e| self.sql(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.sql(e))
    }

    /// The next `limit` keys after `after` that have open (pending or in-progress) tasks,
    /// each with all of its tasks, oldest version first.
    pub fn next_key_groups(&self, after: Option<&str>, limit: usize) -> Result<Vec<KeyGroup>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {TASK_COLS} FROM tasks WHERE key IN (
                    SELECT DISTINCT key FROM tasks
                    WHERE state IN ('pending', 'in_progress') AND key > ?1
                    ORDER BY key LIMIT ?2)
                 ORDER BY key, id DESC"
            ))
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map(params![after.unwrap_or(""), limit as i64], task_from_row)
            .map_err(|e| self.sql(e))?;
        let mut groups: Vec<KeyGroup> = Vec::new();
        for row in rows {
            let t = row.map_err(|e| self.sql(e))?;
            match groups.last_mut() {
                Some(g) if g.key == t.key => g.tasks.push(t),
                _ => groups.push(KeyGroup {
                    key: t.key.clone(),
                    tasks: vec![t],
                }),
            }
        }
        Ok(groups)
    }

    fn apply(&self, u: &Update) -> rusqlite::Result<()> {
        match u {
            Update::Started { id, at } => {
                self.conn.execute(
                    "UPDATE tasks SET state = 'in_progress', attempts = attempts + 1, started_at = ?2
                     WHERE id = ?1",
                    params![id, at],
                )?;
            }
            Update::Upload {
                id,
                upload_id,
                part_size,
                parts,
            } => {
                self.conn.execute(
                    "UPDATE tasks SET upload_id = ?2, part_size = coalesce(?3, part_size),
                     parts = coalesce(?4, parts) WHERE id = ?1",
                    params![
                        id,
                        upload_id,
                        part_size.map(|v| v as i64),
                        parts.map(|v| v as i64)
                    ],
                )?;
            }
            Update::Finished { id, outcome } => {
                let now = now_secs();
                match outcome {
                    Outcome::Done {
                        dest_version_id,
                        method,
                        part_size,
                        parts,
                        etag_preserved,
                        retries,
                    } => {
                        self.conn.execute(
                            "UPDATE tasks SET state = 'done', dest_version_id = ?2, copy_method = ?3,
                             part_size = ?4, parts = ?5, etag_preserved = ?6,
                             retries = retries + ?7, finished_at = ?8, upload_id = NULL,
                             error_class = NULL, error_code = NULL, http_status = NULL,
                             last_error = NULL
                             WHERE id = ?1",
                            params![
                                id,
                                dest_version_id,
                                method,
                                part_size.map(|v| v as i64),
                                parts.map(|v| v as i64),
                                etag_preserved,
                                *retries as i64,
                                now
                            ],
                        )?;
                    }
                    Outcome::Failed { error, retries } => {
                        self.conn.execute(
                            "UPDATE tasks SET state = 'failed', error_class = ?2, error_code = ?3,
                             http_status = ?4, last_error = ?5, retries = retries + ?6,
                             finished_at = ?7, upload_id = NULL WHERE id = ?1",
                            params![
                                id,
                                error.class.as_str(),
                                error.code,
                                error.status,
                                error.to_string(),
                                *retries as i64,
                                now
                            ],
                        )?;
                    }
                    Outcome::Skipped { reason, retries } => {
                        self.conn.execute(
                            "UPDATE tasks SET state = 'skipped', error_class = 'source-gone',
                             last_error = ?2, retries = retries + ?3, finished_at = ?4,
                             upload_id = NULL WHERE id = ?1",
                            params![id, reason, *retries as i64, now],
                        )?;
                    }
                    Outcome::Requeued => {
                        self.conn.execute(
                            "UPDATE tasks SET state = 'pending' WHERE id = ?1",
                            params![id],
                        )?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Starts the writer thread that owns this connection for the rest of a run.
    pub fn into_writer(self) -> Writer {
        let (tx, rx) = mpsc::channel::<Msg>();
        let thread = std::thread::Builder::new()
            .name("manifest-writer".into())
            .spawn(move || writer_loop(self, rx))
            .expect("spawn manifest writer");
        Writer {
            tx,
            thread: Some(thread),
        }
    }
}

/// A change to a task, sent to the writer.
#[derive(Clone, Debug)]
pub enum Update {
    /// An attempt starts (durable before the request is sent).
    Started {
        /// Task id.
        id: i64,
        /// Unix seconds.
        at: i64,
    },
    /// A multipart upload was opened (Some) or closed (None) at the destination.
    Upload {
        /// Task id.
        id: i64,
        /// The upload id.
        upload_id: Option<String>,
        /// Part size chosen.
        part_size: Option<u64>,
        /// Part count.
        parts: Option<u64>,
    },
    /// The task ended.
    Finished {
        /// Task id.
        id: i64,
        /// How.
        outcome: Outcome,
    },
}

enum Msg {
    Update(Update, Option<oneshot::Sender<()>>),
    Flush(oneshot::Sender<()>),
    NextKeys {
        after: Option<String>,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<KeyGroup>>>,
    },
}

/// The single writer of a running job: groups queued updates into one transaction and
/// answers reads in order with them. Dropping it (or [`Writer::close`]) commits what is queued.
pub struct Writer {
    tx: mpsc::Sender<Msg>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Queues an update; it is committed with the next group.
    pub fn send(&self, u: Update) {
        let _ = self.tx.send(Msg::Update(u, None));
    }

    /// Queues an update and waits until it is committed.
    pub async fn send_durable(&self, u: Update) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Update(u, Some(tx)))
            .map_err(|_| ManifestError::WriterGone("channel closed".into()))?;
        rx.await
            .map_err(|_| ManifestError::WriterGone("commit failed".into()))
    }

    /// The next key groups after `after` (see [`Manifest::next_key_groups`]), read after
    /// every update queued before it.
    pub async fn next_key_groups(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<KeyGroup>> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::NextKeys {
                after,
                limit,
                reply: tx,
            })
            .map_err(|_| ManifestError::WriterGone("channel closed".into()))?;
        rx.await
            .map_err(|_| ManifestError::WriterGone("reader failed".into()))?
    }

    /// Waits until everything queued before this call is committed.
    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Flush(tx))
            .map_err(|_| ManifestError::WriterGone("channel closed".into()))?;
        rx.await
            .map_err(|_| ManifestError::WriterGone("commit failed".into()))
    }

    /// Commits what is queued and stops the thread.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let (tx, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn writer_loop(m: Manifest, rx: mpsc::Receiver<Msg>) {
    const GROUP: usize = 2000;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < GROUP {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let mut acks = Vec::new();
        let mut reads = Vec::new();
        let result = (|| -> rusqlite::Result<()> {
            m.conn.execute_batch("BEGIN IMMEDIATE")?;
            for msg in batch {
                match msg {
                    Msg::Update(u, ack) => {
                        m.apply(&u)?;
                        if let Some(a) = ack {
                            acks.push(a);
                        }
                    }
                    Msg::Flush(ack) => acks.push(ack),
                    Msg::NextKeys {
                        after,
                        limit,
                        reply,
                    } => {
                        reads.push((reply, m.next_key_groups(after.as_deref(), limit)));
                    }
                }
            }
            m.conn.execute_batch("COMMIT")
        })();
        match result {
            Ok(()) => {
                for a in acks {
                    let _ = a.send(());
                }
                for (reply, r) in reads {
                    let _ = reply.send(r);
                }
            }
            Err(e) => {
                // Acks are dropped: their senders see the failure. Keep serving; the next
                // group may succeed (e.g. a transient disk error), and nothing unacked counts.
                let _ = m.conn.execute_batch("ROLLBACK");
                tracing::error!("manifest write failed: {e}");
                for (reply, _) in reads {
                    let _ = reply.send(Err(ManifestError::WriterGone(format!("{}: {e}", m.path))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(key: &str, v: &str, pos: u64) -> NewTask {
        NewTask {
            key: key.into(),
            version_id: v.into(),
            is_delete_marker: false,
            is_latest: pos == 0,
            size: 10,
            etag: Some("\"e\"".into()),
            last_modified: None,
            storage_class: None,
            history_pos: pos,
        }
    }

    #[test]
    fn pages_groups_and_states() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let mut m = Manifest::open(&path, true).unwrap();
        let page = vec![task("a", "2", 0), task("a", "1", 1), task("b\t?", "1", 0)];
        let cp = Listing {
            key_marker: Some("b\t?".into()),
            version_marker: Some("1".into()),
            pages: 1,
            entries: 3,
            ..Default::default()
        };
        m.insert_page(&page, &cp).unwrap();
        assert_eq!(m.listing().unwrap(), cp);
        // A replayed page is ignored.
        m.insert_page(&page, &cp).unwrap();
        let c = m.counts().unwrap();
        assert_eq!((c.total, c.pending, c.bytes_total), (3, 3, 30));
        let g = m.next_key_groups(None, 10).unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].tasks[0].version_id, "1", "oldest first");
        assert_eq!(m.next_key_groups(Some("a"), 10).unwrap().len(), 1);
        assert!(m.has_multi_version_key().unwrap());
    }

    #[test]
    fn refuses_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        drop(Manifest::open(&path, true).unwrap());
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        assert!(matches!(
            Manifest::open(&path, false),
            Err(ManifestError::TooNew(_, 99))
        ));
    }

    #[test]
    fn refuses_files_that_are_not_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        std::fs::write(&path, "this is not a database, just some text ".repeat(200)).unwrap();
        assert!(matches!(
            Manifest::open(&path, false),
            Err(ManifestError::NotAManifest(_))
        ));
    }

    #[tokio::test]
    async fn writer_commits_updates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let mut m = Manifest::open(&path, true).unwrap();
        m.insert_page(&[task("k", "1", 0)], &Listing::default())
            .unwrap();
        let w = m.into_writer();
        w.send_durable(Update::Started { id: 1, at: 5 })
            .await
            .unwrap();
        w.send(Update::Finished {
            id: 1,
            outcome: Outcome::Done {
                dest_version_id: Some("d1".into()),
                method: "copy",
                part_size: None,
                parts: None,
                etag_preserved: None,
                retries: 2,
            },
        });
        assert!(w.next_key_groups(None, 5).await.unwrap().is_empty());
        w.close();
        let m = Manifest::open(&path, false).unwrap();
        let c = m.counts().unwrap();
        assert_eq!((c.done, c.retries, c.attempts), (1, 2, 1));
    }
}
