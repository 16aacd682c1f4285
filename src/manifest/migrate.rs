//! manifest::migrate: brings an older manifest to the current schema, in one transaction:
//! either the whole file is migrated or it is left exactly as it was.
//!
//! - v1 (one wide `tasks` row per version, text states, keys repeated): rebuilt in the
//!   current schema. A value v1 could not have written (an unknown state, method or error
//!   class) stops the migration with a one-line reason.
//! - v2: `errors` gains the side and operation of an S3 error (`side`, `op`); the rows
//!   already there keep NULL in them (reports read their side and operation from the
//!   message, as v2 did), and the `tasks` view shows the two columns.
//!
//! May call: `codec`, `schema`, `keys`, the types of `manifest`.

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::codec::{
    class_code_of_name, etag_flags, etag_value, name_value, task_id, time_value, DELETE_MARKER,
    LATEST, SEQ_MASK, STORAGE_CLASSES,
};
use super::keys::Keys;
use super::schema::{Counted, Tally};
use super::{schema, CopyMethod, DbError, Result, State};
use crate::config::JobSettings;

/// One v1 task row.
struct V1Task {
    id: i64,
    key: String,
    version_id: String,
    flags: i64,
    size: i64,
    etag: Option<String>,
    last_modified: Option<String>,
    storage_class: Option<String>,
    history_pos: i64,
    state: String,
    attempts: i64,
    retries: i64,
    error_class: Option<String>,
    error: (Option<String>, Option<i64>, Option<String>),
    dest_version_id: Option<String>,
    copy_method: Option<String>,
    upload: (Option<String>, Option<i64>, Option<i64>),
    started_at: Option<i64>,
}

const V1_SELECT: &str = "SELECT id, key, version_id, is_delete_marker, is_latest, size, etag,
    last_modified, storage_class, history_pos, state, attempts, retries, error_class, error_code,
    http_status, last_error, dest_version_id, copy_method, upload_id, part_size, parts,
    etag_preserved, started_at FROM v1_tasks ORDER BY key, id";

fn v1_task(r: &Row<'_>) -> rusqlite::Result<V1Task> {
    let dm: bool = r.get(3)?;
    let latest: bool = r.get(4)?;
    let preserved: Option<bool> = r.get(22)?;
    Ok(V1Task {
        id: r.get(0)?,
        key: r.get(1)?,
        version_id: r.get(2)?,
        flags: (if dm { DELETE_MARKER } else { 0 })
            | (if latest { LATEST } else { 0 })
            | etag_flags(preserved),
        size: r.get(5)?,
        etag: r.get(6)?,
        last_modified: r.get(7)?,
        storage_class: r.get(8)?,
        history_pos: r.get(9)?,
        state: r.get(10)?,
        attempts: r.get(11)?,
        retries: r.get(12)?,
        error_class: r.get(13)?,
        error: (r.get(14)?, r.get(15)?, r.get(16)?),
        dest_version_id: r.get(17)?,
        copy_method: r.get(18)?,
        upload: (r.get(19)?, r.get(20)?, r.get(21)?),
        started_at: r.get(23)?,
    })
}

/// Migrates a v2 file to the current schema (v3) in one transaction.
pub(super) fn from_v2(conn: &Connection, path: &str) -> Result<()> {
    super::transaction(conn, path, |tx| {
        tx.execute_batch(
            "ALTER TABLE errors ADD COLUMN side INTEGER;
             ALTER TABLE errors ADD COLUMN op TEXT;
             DROP VIEW IF EXISTS tasks;",
        )
        .map_err(|e| DbError::Migration(format!("not a v2 manifest ({e})")))?;
        tx.execute_batch(&schema::view_sql())?;
        schema::store_side_names(tx)?;
        tx.pragma_update(None, "user_version", super::SCHEMA_VERSION)?;
        Ok(())
    })
}

/// Migrates a v1 file to the current schema in one transaction.
pub(super) fn from_v1(conn: &Connection, path: &str) -> Result<()> {
    super::transaction(conn, path, |tx| {
        tx.execute_batch(
            "ALTER TABLE job RENAME TO v1_job;
             ALTER TABLE listing RENAME TO v1_listing;
             ALTER TABLE tasks RENAME TO v1_tasks;",
        )
        .map_err(|e| DbError::Migration(format!("not a v1 manifest ({e})")))?;
        schema::create(tx)?;
        tx.execute_batch(
            "INSERT INTO job (id, settings, created_at) SELECT id, settings, created_at FROM v1_job;
             INSERT OR REPLACE INTO partitions (id, key_marker, version_marker, complete, pages,
                 entries, last_key, last_key_seen)
             SELECT 0, key_marker, version_marker, complete, pages, entries, last_key, last_key_seen
             FROM v1_listing WHERE id = 1;",
        )?;
        let settings: Option<String> = tx
            .query_row("SELECT settings FROM job WHERE id = 1", [], |r| r.get(0))
            .optional()?;
        // Unreadable settings are reported when they are read, as for any manifest.
        if let Some(s) = settings.and_then(|s| serde_json::from_str::<JobSettings>(&s).ok()) {
            schema::store_destination(tx, 0, &s.dest.bucket, &s.dest.prefix, None)?;
        }
        copy_tasks(tx)?;
        tx.execute_batch("DROP TABLE v1_tasks; DROP TABLE v1_listing; DROP TABLE v1_job;")?;
        Ok(())
    })
}

/// Copies every v1 task, key by key; the tasks of a key keep their listing order.
fn copy_tasks(conn: &Connection) -> std::result::Result<(), DbError> {
    let mut stmt = conn.prepare(V1_SELECT)?;
    let mut rows = stmt.query([])?;
    let mut key: Option<(String, i64)> = None;
    let mut seq = 0;
    let (mut tasks, mut retries, mut multi) = (0i64, 0i64, 0i64);
    let mut tally = Tally::default();
    let mut keys = Keys::load(conn)?;
    while let Some(r) = rows.next()? {
        let t = v1_task(r)?;
        match &key {
            Some((k, _)) if *k == t.key => seq += 1,
            _ => {
                let id = keys.add(conn, &t.key, None)?;
                key = Some((t.key.clone(), id));
                seq = 0;
            }
        }
        if seq > SEQ_MASK {
            let why = format!("key {:?} has more than {SEQ_MASK} tasks", t.key);
            return Err(DbError::Migration(why));
        }
        let key_id = key.as_ref().map_or(0, |(_, id)| *id);
        insert_v1_task(conn, task_id(key_id, seq), &t, &mut tally).map_err(DbError::Migration)?;
        tasks += 1;
        retries += t.retries;
        multi += i64::from(seq == 1);
    }
    tally.store(conn)?;
    conn.execute(
        "UPDATE totals SET retries = ?1, multi_task_keys = ?2 WHERE id = 1",
        params![retries, multi],
    )?;
    conn.execute(
        "UPDATE refreshes SET tasks = ?1 WHERE generation = 0",
        [tasks],
    )?;
    Ok(())
}

/// The v2 codes of a v1 task's state, error class and copy method.
fn v1_codes(t: &V1Task) -> std::result::Result<(State, Option<i64>, Option<i64>), String> {
    let state = State::parse(&t.state).map_err(|e| format!("task {}: {e}", t.id))?;
    let class = match &t.error_class {
        None => None,
        Some(c) => Some(
            class_code_of_name(c)
                .ok_or_else(|| format!("task {}: unknown error class {c:?}", t.id))?,
        ),
    };
    let method = match &t.copy_method {
        None => None,
        Some(m) => Some(
            CopyMethod::of_name(m)
                .ok_or_else(|| format!("task {}: unknown copy method {m:?}", t.id))?
                .code(),
        ),
    };
    Ok((state, class, method))
}

/// Inserts one v1 task under its new id; the error says which value cannot be kept.
fn insert_v1_task(
    conn: &Connection,
    id: i64,
    t: &V1Task,
    tally: &mut Tally,
) -> std::result::Result<(), String> {
    let (state, class, method) = v1_codes(t)?;
    let db = |e: rusqlite::Error| format!("task {}: {e}", t.id);
    conn.prepare_cached(
        "INSERT OR ROLLBACK INTO task (id, dest, refresh, history_pos, version_id, flags, size,
         etag, last_modified, storage_class, checksum_algorithm, state, attempts, error_class,
         started_at, dest_version_id, method)
         VALUES (?1, 0, 0, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL, ?9, ?10, ?11, ?12, ?13, ?14)",
    )
    .and_then(|mut s| {
        s.execute(params![
            id,
            t.history_pos,
            t.version_id,
            t.flags,
            t.size,
            etag_value(t.etag.as_deref()),
            time_value(t.last_modified.as_deref()),
            name_value(STORAGE_CLASSES, t.storage_class.as_deref()),
            state.code(),
            t.attempts,
            class,
            t.started_at,
            t.dest_version_id,
            method,
        ])
    })
    .map_err(db)?;
    let counted = Counted {
        state: state.code(),
        size: t.size,
        flags: t.flags,
        attempts: t.attempts,
        error_class: class,
        has_dest_version: t.dest_version_id.is_some(),
    };
    tally.add(id, &counted);
    insert_v1_details(conn, id, t).map_err(db)
}

/// A v1 task's error and multipart upload, in their v2 tables.
fn insert_v1_details(conn: &Connection, id: i64, t: &V1Task) -> rusqlite::Result<()> {
    if t.error != (None, None, None) {
        conn.prepare_cached(
            "INSERT INTO errors (task, code, http_status, message) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![id, t.error.0, t.error.1, t.error.2])?;
    }
    if t.upload != (None, None, None) {
        conn.prepare_cached(
            "INSERT INTO uploads (task, upload_id, part_size, parts) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![id, t.upload.0, t.upload.1, t.upload.2])?;
    }
    Ok(())
}
