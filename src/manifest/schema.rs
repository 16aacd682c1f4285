//! manifest::schema: the v3 tables, indexes, triggers and the readable `tasks` view, and the
//! code that creates them in an empty file (or in a v1 file being migrated).
//!
//! Size: each key is stored once (`keys`), found by a search in its sorted run (`key_runs`,
//! see `keys`); a key's tasks are one range of task ids, so no index repeats a key or lists
//! the tasks of a key. States,
//! methods and classes are small integers (their names are in `names`). Counters for
//! `status` are kept by triggers as tasks change, so reading them never scans tasks.
//!
//! May call: `codec` (constants and names).

use std::collections::BTreeMap;

use rusqlite::{params, Connection};

use super::codec::{
    class_code, BLOCK_BITS, CHECKSUMS, DELETE_MARKER, ERROR_CLASSES, ETAG_CHECKED, ETAG_PRESERVED,
    SEQ_BITS, SIDES, STORAGE_CLASSES,
};
use super::{CopyMethod, State};
use crate::s3::ErrorClass;

/// Page size of new manifests (larger pages waste less per row).
pub(super) const PAGE_SIZE: i64 = 8192;

/// The tables. `{SEQ}` and `{BLOCK}` are replaced by the task id layout (see `codec`).
const TABLES: &str = "
CREATE TABLE job (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    settings TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
-- Where tasks are copied to. 0 is the job's own destination; replication rules add more.
CREATE TABLE destinations (
    id INTEGER PRIMARY KEY,
    bucket TEXT NOT NULL,
    prefix TEXT NOT NULL DEFAULT '',
    options TEXT -- JSON: what a replication rule decides for this destination
);
-- Listing checkpoints, one per disjoint part of the key space (0: the whole bucket).
CREATE TABLE partitions (
    id INTEGER PRIMARY KEY,
    start_key TEXT, -- the part's first key (inclusive); NULL: the bucket's start
    end_key TEXT, -- the part's end (exclusive); NULL: the bucket's end
    key_marker TEXT,
    version_marker TEXT,
    complete INTEGER NOT NULL DEFAULT 0,
    pages INTEGER NOT NULL DEFAULT 0,
    entries INTEGER NOT NULL DEFAULT 0,
    last_key TEXT,
    last_key_seen INTEGER NOT NULL DEFAULT 0
);
-- Listings that added tasks: 0 is `plan`, then one per refresh.
CREATE TABLE refreshes (
    generation INTEGER PRIMARY KEY,
    started_at INTEGER,
    tasks INTEGER NOT NULL DEFAULT 0
);
-- Every source key, once, with ids in the order they were listed.
CREATE TABLE keys (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL
);
-- Id ranges of `keys` in which the key text increases (a sorted listing is one run): a key
-- is found by a binary search in each run, without an index.
CREATE TABLE key_runs (
    first_id INTEGER PRIMARY KEY,
    last_id INTEGER NOT NULL
);
-- One task per source version (or delete marker) per destination.
-- id = key id << {SEQ} | number of the task within its key: a key's tasks are one id range.
CREATE TABLE task (
    id INTEGER PRIMARY KEY,
    dest INTEGER NOT NULL DEFAULT 0, -- destinations.id
    refresh INTEGER NOT NULL DEFAULT 0, -- refreshes.generation of the listing that added it
    history_pos INTEGER NOT NULL, -- place in its key's history in that listing, 0 = newest
    version_id TEXT NOT NULL,
    flags INTEGER NOT NULL DEFAULT 0, -- 1 delete marker, 2 latest, 4 stream only,
                                      -- 8 ETag compared, 16 ETag preserved
    size INTEGER NOT NULL,
    etag BLOB, -- 16 bytes for an MD5 ETag, else the text as listed
    last_modified, -- unix seconds when listed as YYYY-MM-DDTHH:MM:SS.000Z, else the text
    storage_class, -- names(storage_class) code, else the text
    checksum_algorithm, -- names(checksum) code, else the text
    state INTEGER NOT NULL DEFAULT 0, -- names(state)
    attempts INTEGER NOT NULL DEFAULT 0,
    error_class INTEGER, -- names(error_class) of the last error
    started_at INTEGER, -- unix seconds of the last attempt's start
    dest_version_id TEXT,
    method INTEGER -- names(method)
);
-- Failed and skipped tasks (few): problems, blocked keys, --retry-failed, --skip-failed.
CREATE INDEX task_problems ON task (state) WHERE state >= 3;
-- Multipart copies: the upload still open (aborted after a crash) and the layout used.
CREATE TABLE uploads (
    task INTEGER PRIMARY KEY REFERENCES task (id) DEFERRABLE INITIALLY DEFERRED,
    upload_id TEXT,
    part_size INTEGER,
    parts INTEGER
);
-- The last error of a task (failed, skipped, or retried). An S3 error keeps its fields:
-- side and operation (NULL for a reason that is no S3 error, and in rows written before v3),
-- code, HTTP status; its class is the task's `error_class`.
CREATE TABLE errors (
    task INTEGER PRIMARY KEY REFERENCES task (id) DEFERRABLE INITIALLY DEFERRED,
    code TEXT,
    http_status INTEGER,
    message TEXT,
    side INTEGER, -- names(side)
    op TEXT -- the S3 operation, e.g. GetObject
);
-- Kept by the triggers and by the code that inserts tasks: one row per state.
CREATE TABLE counters (
    state INTEGER PRIMARY KEY,
    tasks INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    delete_markers INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    etag_preserved INTEGER NOT NULL DEFAULT 0,
    archived INTEGER NOT NULL DEFAULT 0,
    no_dest_version INTEGER NOT NULL DEFAULT 0
);
-- Kept by the code: retries spent, keys with more than one task.
CREATE TABLE totals (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    retries INTEGER NOT NULL DEFAULT 0,
    multi_task_keys INTEGER NOT NULL DEFAULT 0
);
-- Kept like counters: open (pending or in-progress) tasks per block of 2^{BLOCK} key ids.
-- (No NOT NULL on `open`: the triggers' upsert could then abort, and every task write would
-- need a statement journal.)
CREATE TABLE open_blocks (
    block INTEGER PRIMARY KEY,
    open INTEGER
);
-- S3 requests per operation, all runs.
CREATE TABLE requests (
    op TEXT PRIMARY KEY,
    count INTEGER NOT NULL
);
-- What the small integer codes mean.
CREATE TABLE names (
    kind TEXT NOT NULL,
    code INTEGER NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (kind, code)
) WITHOUT ROWID;
";

/// The index of the tasks flagged `VERSION_TO_LEARN` (few at a time). Created with the first
/// flag, in the same transaction, so a manifest without it has none (and new manifests do
/// not carry its page).
pub(super) const LEARN_INDEX: &str =
    "CREATE INDEX IF NOT EXISTS task_to_learn ON task (id) WHERE flags & 32 != 0;";

/// The counter columns a task adds to its state's row (`R` is NEW or OLD).
const COUNTED: &str = "tasks = tasks {S} 1, bytes = bytes {S} R.size,
        delete_markers = delete_markers {S} (R.flags & {DM}),
        attempts = attempts {S} R.attempts,
        etag_preserved = etag_preserved {S} ((R.flags & {EP}) = {EP}),
        archived = archived {S} (R.error_class IS {AR}),
        no_dest_version = no_dest_version {S} (R.dest_version_id IS NULL)";

/// Triggers keeping `counters` and `open_blocks` as tasks change or go. Inserted tasks are
/// counted by the code that inserts them ([`Tally`]): once per page, not once per row.
const TRIGGERS: &str = "
CREATE TRIGGER task_changed
AFTER UPDATE OF state, attempts, size, flags, error_class, dest_version_id ON task BEGIN
    UPDATE counters SET {SUB_OLD} WHERE state = OLD.state;
    UPDATE counters SET {ADD_NEW} WHERE state = NEW.state;
    INSERT INTO open_blocks (block, open)
        SELECT NEW.id >> {BLOCKSHIFT}, (NEW.state < 2) - (OLD.state < 2)
        WHERE (NEW.state < 2) <> (OLD.state < 2)
        ON CONFLICT (block) DO UPDATE SET open = open + excluded.open;
END;
CREATE TRIGGER task_removed AFTER DELETE ON task BEGIN
    UPDATE counters SET {SUB_OLD} WHERE state = OLD.state;
    UPDATE open_blocks SET open = open - 1 WHERE block = OLD.id >> {BLOCKSHIFT} AND OLD.state < 2;
END;
";

/// One readable row per task, for people (`sqlite3 job.db 'select * from tasks'`) and tests.
const VIEW: &str = "
CREATE VIEW tasks AS
SELECT t.id AS id, k.key AS key, t.dest AS dest, t.refresh AS refresh,
    t.history_pos AS history_pos, t.version_id AS version_id,
    t.flags & 1 AS is_delete_marker, (t.flags >> 1) & 1 AS is_latest,
    (t.flags >> 2) & 1 AS stream_only, t.size AS size,
    CASE WHEN typeof(t.etag) = 'blob' THEN '\"' || lower(hex(t.etag)) || '\"' ELSE t.etag END
        AS etag,
    CASE WHEN typeof(t.last_modified) = 'integer'
        THEN strftime('%Y-%m-%dT%H:%M:%S.000Z', t.last_modified, 'unixepoch')
        ELSE t.last_modified END AS last_modified,
    coalesce((SELECT name FROM names WHERE kind = 'storage_class' AND code = t.storage_class),
        t.storage_class) AS storage_class,
    coalesce((SELECT name FROM names WHERE kind = 'checksum' AND code = t.checksum_algorithm),
        t.checksum_algorithm) AS checksum_algorithm,
    (SELECT name FROM names WHERE kind = 'state' AND code = t.state) AS state,
    t.attempts AS attempts,
    (SELECT name FROM names WHERE kind = 'error_class' AND code = t.error_class) AS error_class,
    e.code AS error_code, e.http_status AS http_status, e.message AS last_error,
    (SELECT name FROM names WHERE kind = 'side' AND code = e.side) AS error_side,
    e.op AS error_op,
    t.started_at AS started_at, t.dest_version_id AS dest_version_id,
    (SELECT name FROM names WHERE kind = 'method' AND code = t.method) AS copy_method,
    CASE WHEN t.flags & 8 THEN (t.flags >> 4) & 1 END AS etag_preserved,
    u.upload_id AS upload_id, u.part_size AS part_size, u.parts AS parts
FROM task t JOIN keys k ON k.id = t.id >> {SEQ}
LEFT JOIN uploads u ON u.task = t.id LEFT JOIN errors e ON e.task = t.id;
";

/// The `tasks` view's text, with the id layout filled in (a migration makes it again).
pub(super) fn view_sql() -> String {
    VIEW.replace("{SEQ}", &SEQ_BITS.to_string())
}

/// The full schema text, with the id layout filled in.
pub(super) fn schema_sql() -> String {
    let counted = |sign: &str, row: &str| {
        COUNTED
            .replace("{S}", sign)
            .replace("R.", &format!("{row}."))
            .replace("{DM}", &DELETE_MARKER.to_string())
            .replace("{EP}", &(ETAG_CHECKED | ETAG_PRESERVED).to_string())
            .replace("{AR}", &class_code(ErrorClass::Archived).to_string())
    };
    format!("{TABLES}{TRIGGERS}{VIEW}")
        .replace("{ADD_NEW}", &counted("+", "NEW"))
        .replace("{SUB_OLD}", &counted("-", "OLD"))
        .replace("{BLOCKSHIFT}", &(SEQ_BITS + BLOCK_BITS).to_string())
        .replace("{BLOCK}", &BLOCK_BITS.to_string())
        .replace("{SEQ}", &SEQ_BITS.to_string())
}

/// Creates the current schema and its fixed rows in `conn` (inside the caller's transaction).
pub(super) fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(&schema_sql())?;
    conn.execute_batch(
        "INSERT INTO partitions (id) VALUES (0);
         INSERT INTO refreshes (generation, started_at, tasks) VALUES (0, NULL, 0);
         INSERT INTO totals (id) VALUES (1);",
    )?;
    let mut counter = conn.prepare("INSERT INTO counters (state) VALUES (?1)")?;
    for s in State::ALL {
        counter.execute([s.code()])?;
    }
    let mut name = conn.prepare("INSERT INTO names (kind, code, name) VALUES (?1, ?2, ?3)")?;
    for s in State::ALL {
        name.execute(params!["state", s.code(), s.as_str()])?;
    }
    for m in CopyMethod::ALL {
        name.execute(params!["method", m.code(), m.as_str()])?;
    }
    for (code, c) in ERROR_CLASSES {
        name.execute(params!["error_class", code, c.as_str()])?;
    }
    store_side_names(conn)?;
    for (kind, table) in [("storage_class", STORAGE_CLASSES), ("checksum", CHECKSUMS)] {
        for (i, n) in table.iter().enumerate() {
            name.execute(params![kind, i as i64 + 1, n])?;
        }
    }
    conn.pragma_update(None, "user_version", super::SCHEMA_VERSION)
}

/// The names of the side codes (`names` rows of kind `side`, added by schema v3).
pub(super) fn store_side_names(conn: &Connection) -> rusqlite::Result<()> {
    let mut name = conn.prepare("INSERT INTO names (kind, code, name) VALUES ('side', ?1, ?2)")?;
    for (code, side) in SIDES {
        name.execute(params![code, side.to_string()])?;
    }
    Ok(())
}

/// Records (or updates) destination `id`'s bucket and prefix.
pub(super) fn store_destination(
    conn: &Connection,
    id: i64,
    bucket: &str,
    prefix: &str,
    options: Option<&str>,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO destinations (id, bucket, prefix, options) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (id) DO UPDATE SET bucket = excluded.bucket, prefix = excluded.prefix,
         options = excluded.options",
    )?
    .execute(params![id, bucket, prefix, options])
    .map(|_| ())
}

/// What an inserted task adds to the counters.
pub(super) struct Counted {
    /// State code.
    pub state: i64,
    pub size: i64,
    pub flags: i64,
    pub attempts: i64,
    /// Error class code.
    pub error_class: Option<i64>,
    pub has_dest_version: bool,
}

/// What inserted tasks add to `counters` and `open_blocks`, stored once per transaction by
/// the code that inserts (the triggers count updates and deletes).
#[derive(Default)]
pub(super) struct Tally {
    /// Per state: tasks, bytes, delete markers, attempts, ETags preserved, archived, tasks
    /// without a destination version id (the columns of `counters`).
    states: BTreeMap<i64, [i64; 7]>,
    /// Open tasks per block of keys.
    blocks: BTreeMap<i64, i64>,
}

impl Tally {
    /// Counts task `id`, just inserted.
    pub(super) fn add(&mut self, id: i64, t: &Counted) {
        let preserved = ETAG_CHECKED | ETAG_PRESERVED;
        let c = self.states.entry(t.state).or_default();
        c[0] += 1;
        c[1] += t.size;
        c[2] += t.flags & DELETE_MARKER;
        c[3] += t.attempts;
        c[4] += i64::from(t.flags & preserved == preserved);
        c[5] += i64::from(t.error_class == Some(class_code(ErrorClass::Archived)));
        c[6] += i64::from(!t.has_dest_version);
        if t.state < State::Done.code() {
            *self
                .blocks
                .entry(id >> (SEQ_BITS + BLOCK_BITS))
                .or_default() += 1;
        }
    }

    /// Adds what was counted to the stored counters.
    pub(super) fn store(&self, conn: &Connection) -> rusqlite::Result<()> {
        let mut counters = conn.prepare_cached(
            "UPDATE counters SET tasks = tasks + ?2, bytes = bytes + ?3,
             delete_markers = delete_markers + ?4, attempts = attempts + ?5,
             etag_preserved = etag_preserved + ?6, archived = archived + ?7,
             no_dest_version = no_dest_version + ?8 WHERE state = ?1",
        )?;
        for (state, c) in &self.states {
            counters.execute(params![state, c[0], c[1], c[2], c[3], c[4], c[5], c[6]])?;
        }
        let mut blocks = conn.prepare_cached(
            "INSERT INTO open_blocks (block, open) VALUES (?1, ?2)
             ON CONFLICT (block) DO UPDATE SET open = open + excluded.open",
        )?;
        for (block, n) in &self.blocks {
            blocks.execute([block, n])?;
        }
        Ok(())
    }
}
