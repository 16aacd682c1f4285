//! manifest: the SQLite file that is the job's only memory, and the only code that touches SQL.
//!
//! One file holds the job's settings, the listing checkpoints, and one row per task (a source
//! version or delete marker, per destination) with its state; see `schema` for the tables.
//! WAL mode with `synchronous=FULL`: a committed transaction survives a crash or a power loss.
//! A listed page and its checkpoint are committed together, and a replayed page is ignored.
//! During `run`, every write goes through one writer thread ([`Writer`]) that groups queued
//! updates into one transaction; once a commit fails the writer stops and every later call
//! says so ([`ManifestError::WriterGone`]). Files are created readable by their owner only.
//!
//! The surface the stages use is written down as traits in `store` ([`PlanStore`],
//! [`RunStore`], [`ResumeStore`], [`ReportStore`]; a second backend implements them): read
//! that first. Every write is one transaction (`Manifest::write_tx`): an operation says its
//! SQL, and errors name the file once.
//!
//! Layout: `store` (the traits, by stage), `codec` (compact encodings, task ids), `keys`
//! (keys stored once, found by search in sorted runs), `schema` (tables, triggers),
//! `migrate` (v1 and v2 files), `pages` (plan: pages and checkpoints), `read` (tasks,
//! counts, problems), `writer` (updates and the writer thread), `run_progress` (a running
//! run's rate and ETA), `estimate` (every task, key by key, for the cost estimate, and the
//! facts `plan` stores for it), `follow` (pending events, scoped refreshes, lag).
//!
//! May call: `crate::s3::{VersionEntry, S3Error, ErrorClass, Side}`,
//! `crate::config::JobSettings`.

mod backend;
mod codec;
mod estimate;
mod follow;
mod keys;
mod metrics_read;
mod migrate;
mod pages;
pub mod pg;
mod read;
mod run_progress;
mod schema;
mod store;
mod writer;

#[cfg(test)]
mod refresh_tests;
#[cfg(test)]
pub(crate) mod tests;

use std::path::Path;
use std::time::Duration;

use rusqlite::{
    params, Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior,
};
use serde::{Deserialize, Serialize};

use crate::config::JobSettings;

pub use backend::{job_name, shown, Location, Manifest, PgLocation};
pub use follow::{
    lag_stats_of, one_key_end, FollowFacts, LagHistogram, LagStats, PendingChange, PendingKeys,
    RefreshKind,
};
pub use metrics_read::BucketStateCount;
pub use pages::{ListedPage, Partition, Refresh, OUT_OF_ORDER};
pub use run_progress::RunProgress;
pub use store::{PlanStore, ReportStore, ResumeStore, RunStore};
pub use writer::{Copied, Outcome, Update, Writer};

/// The schema version this build writes and reads (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 3;

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
    /// `--manifest` is neither a file nor a PostgreSQL URL this build reads (shown without
    /// its password).
    #[error("{1} ({0})")]
    BadLocation(String, String),
    /// The stored settings do not parse.
    #[error("manifest {0}: stored job settings are unreadable: {1}")]
    BadSettings(String, String),
    /// The writer thread stopped (a commit failed, or it was closed).
    #[error("manifest writer stopped: {0}")]
    WriterGone(String),
    /// A row holds a value this build does not know (never read as something else).
    #[error(
        "manifest {0}: unknown value {1} in a task row; was it written by a newer s3-backfill?"
    )]
    BadState(String, String),
    /// An older manifest cannot be migrated.
    #[error("manifest {0} cannot be migrated to schema version {SCHEMA_VERSION}: {1}; plan the job again with a new --manifest")]
    Migration(String, String),
    /// A limit of the file's layout was reached.
    #[error("manifest {0}: {1}")]
    Limit(String, String),
    /// PostgreSQL failed (a `postgres://` manifest).
    #[error("manifest {path}: PostgreSQL: {}", pg_detail(source))]
    Pg {
        /// The manifest's URL (without its password) and job.
        path: String,
        /// The PostgreSQL error (its own message, with the server's detail when it sent one).
        #[source]
        source: postgres::Error,
    },
    /// This manifest's backend does not do this (yet).
    #[error("manifest {0}: {1} is not supported with a PostgreSQL manifest in this version; use a SQLite manifest (a file) for it")]
    Unsupported(String, &'static str),
    /// This process's lease on a unit of work was taken over (it was paused or cut off for
    /// longer than the lease): its results are not recorded; the unit's new owner
    /// reconciles what it wrote.
    #[error("manifest {0}: lease lost: {1}")]
    LeaseLost(String, String),
    /// A file operation failed (creating the manifest, writing problems out).
    #[error("manifest {path}: {what}: {source}")]
    Io {
        /// The manifest file.
        path: String,
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, ManifestError>;

/// An error inside one manifest operation, before the file is named: SQLite's (`?` converts
/// a `rusqlite::Error`), or one of the manifest's own. [`transaction`] and
/// [`Manifest::named`] turn it into a [`ManifestError`] that names the file, so the code of
/// an operation says only its SQL.
pub(super) enum DbError {
    /// SQLite failed.
    Sql(rusqlite::Error),
    /// A row holds a value this build does not know ([`ManifestError::BadState`]).
    Bad(String),
    /// A limit of the file's layout was reached ([`ManifestError::Limit`]).
    Limit(String),
    /// An older manifest cannot be migrated ([`ManifestError::Migration`]).
    Migration(String),
    /// A caller's stream failed while rows were handed to it ([`ManifestError::Io`]).
    Io(&'static str, std::io::Error),
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> DbError {
        DbError::Sql(e)
    }
}

impl DbError {
    /// The error, naming the manifest file `path`.
    fn at(self, path: &str) -> ManifestError {
        let path = path.to_string();
        match self {
            DbError::Sql(source) => ManifestError::Sql { path, source },
            DbError::Bad(what) => ManifestError::BadState(path, what),
            DbError::Limit(why) => ManifestError::Limit(path, why),
            DbError::Migration(why) => ManifestError::Migration(path, why),
            DbError::Io(what, source) => ManifestError::Io { path, what, source },
        }
    }
}

/// Runs `f` in one IMMEDIATE transaction of `conn` (the write lock taken at its start, so it
/// never fails half-way for a lock): committed when `f` returns Ok, rolled back when it
/// returns Err (the transaction is dropped). Errors name the manifest file `path`.
///
/// `conn` is shared (`&Connection`): a transaction opened inside another is an SQLite error,
/// reported like any other.
pub(super) fn transaction<T>(
    conn: &Connection,
    path: &str,
    f: impl FnOnce(&Transaction<'_>) -> std::result::Result<T, DbError>,
) -> Result<T> {
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)
        .map_err(|e| DbError::from(e).at(path))?;
    let out = f(&tx).map_err(|e| e.at(path))?;
    tx.commit().map_err(|e| DbError::from(e).at(path))?;
    Ok(out)
}

/// A task's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Nothing to copy (the source version is gone or archived), or skipped by the user.
    Skipped,
}

impl State {
    /// Every state, in code order.
    const ALL: [State; 5] = [
        State::Pending,
        State::InProgress,
        State::Done,
        State::Failed,
        State::Skipped,
    ];

    /// The state's name (`pending`, `in_progress`, `done`, `failed`, `skipped`).
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::InProgress => "in_progress",
            State::Done => "done",
            State::Failed => "failed",
            State::Skipped => "skipped",
        }
    }

    /// Parses a state's name; an unknown name is an error, never a default.
    pub fn parse(s: &str) -> std::result::Result<State, String> {
        State::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown task state {s:?}"))
    }

    /// The code stored in the manifest (open states are below 2).
    fn code(self) -> i64 {
        match self {
            State::Pending => 0,
            State::InProgress => 1,
            State::Done => 2,
            State::Failed => 3,
            State::Skipped => 4,
        }
    }

    fn of_code(code: i64) -> Option<State> {
        State::ALL.into_iter().find(|s| s.code() == code)
    }
}

/// How a task was copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMethod {
    /// One CopyObject.
    Copy,
    /// UploadPartCopy parts.
    MultipartCopy,
    /// GET and PutObject.
    Stream,
    /// GET and UploadPart parts.
    MultipartStream,
    /// A delete marker was written.
    DeleteMarker,
    /// Found already copied by reconciliation.
    Reconciled,
}

impl CopyMethod {
    /// Every method, in code order.
    const ALL: [CopyMethod; 6] = [
        CopyMethod::Copy,
        CopyMethod::MultipartCopy,
        CopyMethod::Stream,
        CopyMethod::MultipartStream,
        CopyMethod::DeleteMarker,
        CopyMethod::Reconciled,
    ];

    /// The method's name as reports show it.
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMethod::Copy => "copy",
            CopyMethod::MultipartCopy => "multipart-copy",
            CopyMethod::Stream => "stream",
            CopyMethod::MultipartStream => "multipart-stream",
            CopyMethod::DeleteMarker => "delete-marker",
            CopyMethod::Reconciled => "reconciled",
        }
    }

    fn code(self) -> i64 {
        CopyMethod::ALL
            .iter()
            .position(|m| *m == self)
            .map_or(0, |i| i as i64 + 1)
    }

    fn of_name(name: &str) -> Option<CopyMethod> {
        CopyMethod::ALL.into_iter().find(|m| m.as_str() == name)
    }
}

/// One listed entry with its place in the key's history (0 = newest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewTask {
    /// The entry as listed.
    pub entry: crate::s3::VersionEntry,
    /// Position in the key's history: 0 is the newest.
    pub history_pos: u64,
    /// The destination (`destinations.id`; 0 is the job's `--dest`).
    pub dest: i64,
}

/// A task as the copier needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// Task id (a key's tasks share one id range; see `codec`).
    pub id: i64,
    /// The source version (or delete marker) as listed.
    pub entry: crate::s3::VersionEntry,
    /// Current state.
    pub state: State,
    /// Attempts so far (one per start).
    pub attempts: i64,
    /// The destination version id, once known.
    pub dest_version_id: Option<String>,
    /// When the last attempt started (unix seconds).
    pub started_at: Option<i64>,
    /// An open multipart upload at the destination.
    pub upload_id: Option<String>,
    /// This task streams (its server-side copy was denied); kept across runs.
    pub stream_only: bool,
    /// Done, and its destination version id is still to be learned from a listing.
    pub version_to_learn: bool,
    /// The class of its last error, if any.
    pub error_class: Option<String>,
    /// The destination (`destinations.id`; 0 is the job's `--dest`).
    pub dest: i64,
    /// The reconciliation mode of the last attempt: whether its writes carried the stamp
    /// (None: not recorded, e.g. a manifest from before); an attempt in doubt is looked for
    /// with the mode it wrote with, whatever the job's setting is now.
    pub attempt_stamped: Option<bool>,
}

/// The key id of a task id (a task's id is its key's id and its place among the key's tasks).
pub fn key_id_of_task(task_id: i64) -> i64 {
    task_id >> codec::SEQ_BITS
}

/// All tasks of one key, oldest first.
#[derive(Clone, Debug)]
pub struct KeyGroup {
    /// The key's id.
    pub key_id: i64,
    /// The source key.
    pub key: String,
    /// The key's tasks, oldest version first (every state).
    pub tasks: Vec<Task>,
    /// The key is the last key of an unfinished listing part when read: older versions of
    /// it may still come on the next page, so its tasks must wait (copying them now could
    /// write its history out of order).
    pub listing_open: bool,
    /// The task marked in progress (durably) when the group was read for a run (see
    /// [`Writer::claim_key_groups`]): its attempt needs no `Started` of its own.
    pub claimed: Option<i64>,
}

/// Where the listing stands, over all of its parts (rows of `partitions`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListingProgress {
    /// Every part reached its end.
    pub complete: bool,
    /// The last key of each unfinished part (its history may go on on the next page).
    pub open_keys: Vec<String>,
    /// Entries seen, all parts.
    pub entries: u64,
    /// Pages listed, all parts.
    pub pages: u64,
}

/// A listing checkpoint.
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
    /// The last key seen (for history positions).
    pub last_key: Option<String>,
    /// Entries of `last_key` seen so far.
    pub last_key_seen: u64,
}

/// Task counts as `status` shows them (`status --json` is exactly this).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
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
    /// Open tasks of keys whose older task failed (they wait).
    pub blocked: u64,
    /// Skipped because the source version is archived.
    pub archived: u64,
    /// Pending until the restore of their archived source version completes
    /// (`run --restore-archived`).
    #[serde(default)]
    pub restore_pending: u64,
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
    /// Done tasks whose multipart ETag was preserved (tasks where an ETag was at stake: a
    /// multipart source, or a copy made in parts; a single-part source copied whole keeps its
    /// ETag and is not counted).
    pub etag_preserved: u64,
    /// Done tasks (of those) whose destination ETag differs from the source's; filled by
    /// `status` and `report` from [`Manifest::etag_changes`] (a scan), 0 from `counts()`.
    #[serde(default)]
    pub etag_changed: u64,
    /// Why those ETags changed: reason, count.
    #[serde(default)]
    pub etag_changes: std::collections::BTreeMap<String, u64>,
    /// Done tasks without a recorded destination version id.
    pub done_without_dest_version: u64,
    /// Every listing part is complete.
    pub listing_complete: bool,
    /// Versions and delete markers seen by the listing (selected or not).
    pub listed_entries: u64,
    /// S3 requests per operation, all runs.
    pub requests: std::collections::BTreeMap<String, u64>,
    /// Skipped because a refresh selected them below versions already planned (they would
    /// have been written out of order).
    #[serde(default)]
    pub out_of_order: u64,
    /// Keys (per destination) that the last refresh found deleted at an unversioned source
    /// and that stay at the destination (the job does not replicate deletes).
    #[serde(default)]
    pub deleted_at_source: u64,
    /// The first of those keys by name.
    #[serde(default)]
    pub deleted_at_source_keys: Vec<String>,
}

/// A failed, skipped or blocked task, for reports.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Problem {
    /// Source key.
    pub key: String,
    /// Source version id.
    pub version_id: String,
    /// `failed`, `skipped` or `blocked`.
    pub state: String,
    /// Error class.
    pub error_class: Option<String>,
    /// S3 error code.
    pub error_code: Option<String>,
    /// HTTP status.
    pub http_status: Option<i64>,
    /// Which side's request failed, as recorded from the S3 error (None: no S3 error, or a
    /// row recorded before schema v3, whose side only its message tells).
    #[serde(skip)]
    pub error_side: Option<crate::s3::Side>,
    /// The S3 operation that failed (`GetObject`, ...), as recorded (None as for the side).
    #[serde(skip)]
    pub error_op: Option<String>,
    /// The message (for a blocked task: which failed version it waits for).
    pub message: Option<String>,
    /// Attempts made.
    pub attempts: i64,
    /// The destination (`destinations.id`; 0 is the job's `--dest`): reports name its
    /// bucket (`JobSettings::destination`).
    #[serde(skip)]
    pub dest: i64,
}

/// An open connection to a manifest file (the SQLite backend; [`Manifest`] is either
/// backend).
pub struct SqliteManifest {
    conn: Connection,
    path: String,
    /// The key runs as of this connection's last committed page, and the `data_version` they
    /// were read at (reused while no other connection committed: see `pages`).
    keys_cache: Option<(keys::Keys, i64)>,
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Creates `path` readable and writable by its owner only (before SQLite opens it).
fn create_private(path: &Path, p: &str) -> Result<()> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    match o.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(ManifestError::Io {
            path: p.to_string(),
            what: "cannot create the file",
            source: e,
        }),
    }
}

/// Makes the manifest and its -wal and -shm files private to their owner, whatever the
/// umask was (SQLite creates -wal/-shm with the database's mode; this makes sure).
fn make_private(path: &Path) {
    #[cfg(unix)]
    for suffix in ["", "-wal", "-shm"] {
        use std::os::unix::fs::PermissionsExt;
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        if let Ok(m) = std::fs::metadata(&p) {
            if m.permissions().mode() & 0o077 != 0 {
                let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

impl SqliteManifest {
    /// Opens an existing manifest (migrating a v1 or v2 file), or creates it (mode 0600) when
    /// `create` is true.
    pub fn open(path: &Path, create: bool) -> Result<SqliteManifest> {
        let p = path.display().to_string();
        if !path.exists() {
            if !create {
                return Err(ManifestError::Missing(p));
            }
            create_private(path, &p)?;
        }
        let sql = |source| ManifestError::Sql {
            path: p.clone(),
            source,
        };
        // One thread at a time uses a connection (`Connection` is not `Sync`): no mutexes.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(sql)?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(sql)?;
        // Only takes effect in a new, empty file.
        conn.pragma_update(None, "page_size", schema::PAGE_SIZE)
            .map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::NotADatabase) => ManifestError::NotAManifest(p.clone()),
                _ => sql(e),
            })?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(sql)?;
        conn.set_prepared_statement_cache_capacity(64);
        let mut m = SqliteManifest {
            conn,
            path: p,
            keys_cache: None,
        };
        m.prepare_schema(path, create)?;
        Ok(m)
    }

    /// Creates the schema in a new file, migrates a v1 or v2 file, refuses newer or foreign
    /// ones.
    fn prepare_schema(&mut self, path: &Path, create: bool) -> Result<()> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| self.sql(e))?;
        match version {
            SCHEMA_VERSION => Ok(()),
            v if v > SCHEMA_VERSION => Err(ManifestError::TooNew(self.path.clone(), v)),
            1 => {
                migrate::from_v1(&self.conn, &self.path)?;
                make_private(path);
                Ok(())
            }
            2 => migrate::from_v2(&self.conn, &self.path),
            0 => {
                let tables: i64 = self
                    .conn
                    .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
                    .map_err(|e| self.sql(e))?;
                if tables > 0 || !create {
                    return Err(ManifestError::NotAManifest(self.path.clone()));
                }
                self.write_tx(|tx| Ok(schema::create(tx)?))?;
                make_private(path);
                Ok(())
            }
            v => Err(ManifestError::Migration(
                self.path.clone(),
                format!("unknown schema version {v}"),
            )),
        }
    }

    fn sql(&self, source: rusqlite::Error) -> ManifestError {
        ManifestError::Sql {
            path: self.path.clone(),
            source,
        }
    }

    /// `e`, naming this manifest's file.
    pub(super) fn named(&self, e: DbError) -> ManifestError {
        e.at(&self.path)
    }

    /// `f`'s reads of this manifest (outside a transaction of this call's own); errors name
    /// the file.
    pub(super) fn read_with<T>(
        &self,
        f: impl FnOnce(&Connection) -> std::result::Result<T, DbError>,
    ) -> Result<T> {
        f(&self.conn).map_err(|e| self.named(e))
    }

    /// `f` in one IMMEDIATE transaction of this manifest: committed on Ok, rolled back on
    /// Err; errors name the file (see [`transaction`]).
    pub(super) fn write_tx<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> std::result::Result<T, DbError>,
    ) -> Result<T> {
        transaction(&self.conn, &self.path, f)
    }

    /// Whether the schema has a table or index of this name (those created after the
    /// schema's first version, when first needed: `refresh_matched`, `task_to_learn`).
    fn has_schema_object(&self, name: &str) -> Result<bool> {
        follow::has_table(&self.conn, name).map_err(|e| self.sql(e))
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

    /// Stores (or replaces) the job settings, and the job's destination as destination 0.
    pub fn store_settings(&self, s: &JobSettings) -> Result<()> {
        let bad =
            |e: serde_json::Error| ManifestError::BadSettings(self.path.clone(), e.to_string());
        let json = serde_json::to_string(s).map_err(bad)?;
        let options = s
            .destinations
            .iter()
            .map(|d| serde_json::to_string(&d.options))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(bad)?;
        self.write_tx(|tx| {
            tx.execute(
                "INSERT INTO job (id, settings, created_at) VALUES (1, ?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET settings = excluded.settings",
                params![json, now_secs()],
            )?;
            schema::store_destination(tx, 0, &s.dest.bucket, &s.dest.prefix, None)?;
            for (id, (d, options)) in s.destinations.iter().zip(&options).enumerate() {
                schema::store_destination(tx, id as i64, &d.bucket, &d.prefix, Some(options))?;
            }
            Ok(())
        })
    }

    /// Waits for a lock held by another connection in short steps (1 ms, for 30 s at most)
    /// instead of SQLite's growing sleeps (up to 100 ms each): a lister beside a run and
    /// the run's writer share the file, each taking the lock often and briefly, and a long
    /// sleep would let one starve the other.
    pub fn wait_for_locks_briefly(&self) -> Result<()> {
        fn retry(tries: i32) -> bool {
            std::thread::sleep(Duration::from_millis(1));
            tries < 30_000
        }
        self.conn.busy_handler(Some(retry)).map_err(|e| self.sql(e))
    }

    /// Starts the writer thread that owns this connection for the rest of a run.
    pub fn into_writer(self) -> Writer {
        writer::start(self)
    }
}

/// A PostgreSQL error of the manifest `shown` in one line (see [`pg_detail`]).
pub(crate) fn pg_error(shown: &str, e: postgres::Error) -> String {
    format!("manifest {shown}: PostgreSQL: {}", pg_detail(&e))
}

/// A PostgreSQL error in one line: its own text, then its cause where the driver keeps the
/// cause apart (a refused connection says only "error connecting to server" itself).
pub(crate) fn pg_detail(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        // The error's own Display is only "db error": the server's message is the news.
        return format!("{} ({})", db.message(), db.code().code());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}
