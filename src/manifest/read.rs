//! manifest::read: tasks as the copier needs them (keys with open tasks, in key-id order,
//! each saying whether the listing may still add to its history; open uploads), where the
//! listing stands over all its parts, the counts `status` shows (kept counters, never a
//! scan of tasks), the problems a report lists (failed, skipped and blocked tasks,
//! streamed), and the two ways a user resolves failed tasks (`--retry-failed`,
//! `--skip-failed`).
//!
//! May call: `codec`, the types of `manifest`.

use std::collections::BTreeMap;

use rusqlite::{Connection, Row};

use super::codec::{
    class_of, etag_text, key_of, key_range, name_text, side_of, time_text, BLOCK_BITS, CHECKSUMS,
    DELETE_MARKER, ETAG_CHECKED, ETAG_PRESERVED, LATEST, SEQ_BITS, STORAGE_CLASSES, STREAM_ONLY,
    VERSION_TO_LEARN,
};
use super::{
    CopyMethod, Counts, DbError, KeyGroup, ListingProgress, Problem, Result, SqliteManifest, State,
    Task,
};

/// Task rows with their key and open upload, decoded by [`task_from_row`].
pub(super) fn task_select(cond: &str, order: &str) -> String {
    format!(
        "SELECT t.id, t.version_id, t.flags, t.size, t.etag, t.last_modified,
         t.storage_class, t.checksum_algorithm, t.state, t.attempts, t.dest_version_id,
         t.started_at, u.upload_id, t.error_class, k.key, t.dest
         FROM task t JOIN keys k ON k.id = t.id >> {SEQ_BITS}
         LEFT JOIN uploads u ON u.task = t.id
         WHERE {cond} {order}"
    )
}

/// Oldest first: earlier listings first, then the end of each key's history first.
pub(super) const OLDEST_FIRST: &str = "ORDER BY t.refresh, t.history_pos DESC, t.dest, t.id";

fn state_of(code: i64) -> std::result::Result<State, DbError> {
    State::of_code(code).ok_or_else(|| DbError::Bad(format!("state {code}")))
}

fn class_name(code: Option<i64>) -> std::result::Result<Option<String>, DbError> {
    code.map(|c| {
        class_of(c)
            .map(|c| c.as_str().to_string())
            .ok_or_else(|| DbError::Bad(format!("error class {c}")))
    })
    .transpose()
}

/// A row of [`task_select`].
pub(super) fn task_from_row(r: &Row<'_>) -> std::result::Result<Task, DbError> {
    let flags: i64 = r.get(2)?;
    let bad = DbError::Bad;
    Ok(Task {
        id: r.get(0)?,
        entry: crate::s3::VersionEntry {
            key: r.get(14)?,
            version_id: r.get(1)?,
            is_delete_marker: flags & DELETE_MARKER != 0,
            is_latest: flags & LATEST != 0,
            size: r.get::<_, i64>(3)? as u64,
            etag: etag_text(r.get_ref(4)?).map_err(bad)?,
            last_modified: time_text(r.get_ref(5)?).map_err(bad)?,
            storage_class: name_text(STORAGE_CLASSES, "storage class", r.get_ref(6)?)
                .map_err(bad)?,
            checksum_algorithm: name_text(CHECKSUMS, "checksum", r.get_ref(7)?).map_err(bad)?,
        },
        state: state_of(r.get(8)?)?,
        attempts: r.get(9)?,
        dest_version_id: r.get(10)?,
        started_at: r.get(11)?,
        upload_id: r.get(12)?,
        stream_only: flags & STREAM_ONLY != 0,
        version_to_learn: flags & VERSION_TO_LEARN != 0,
        error_class: class_name(r.get(13)?)?,
        dest: r.get(15)?,
        attempt_stamped: super::codec::attempt_stamped(flags),
    })
}

/// The statements `counts()` runs (tests check that none scans the tasks).
pub(super) const COUNTERS_SQL: &str = "SELECT state, tasks, bytes, delete_markers, attempts,
    etag_preserved, archived, no_dest_version FROM counters";
/// Done tasks whose ETag was compared and differs, by copy method (a scan: not in `counts()`).
pub(super) const ETAG_CHANGES_SQL: &str = "SELECT method, count(*) FROM task
    WHERE state = ?1 AND flags & ?2 = ?3 GROUP BY method";

/// Why a task copied this way has another ETag than its source.
pub(super) fn etag_change_reason(method: Option<CopyMethod>) -> &'static str {
    match method {
        Some(CopyMethod::Copy) => "the server gave a multipart source copied with CopyObject a new ETag (--large-copy parts keeps it)",
        Some(CopyMethod::MultipartCopy | CopyMethod::MultipartStream) => "copied in parts of --part-size: the source's part layout could not be read or inferred (parts not of one size), or is larger than the memory budget",
        _ => "the destination gave the copy a new ETag",
    }
}
pub(super) const TOTALS_SQL: &str = "SELECT retries FROM totals WHERE id = 1";
pub(super) const PARTITIONS_SQL: &str =
    "SELECT min(complete), coalesce(sum(entries), 0) FROM partitions";
/// Every listing part's state (`listing_progress()`).
pub(super) const LISTING_PROGRESS_SQL: &str =
    "SELECT complete, last_key, entries, pages FROM partitions ORDER BY id";
pub(super) const REQUESTS_SQL: &str = "SELECT op, count FROM requests";
/// Why a skipped task `--retry-skipped` did not put back stays skipped.
pub(super) const RETRIED_OUT_OF_ORDER_WHY: &str = "not retried: newer versions of its key were copied since it was skipped (an archived version restored late); written now it would be written out of order";

/// Tasks stored skipped as out of order (see `pages::OUT_OF_ORDER`): problems only.
pub(super) const OUT_OF_ORDER_SQL: &str = "SELECT count(*) FROM task t JOIN errors e
    ON e.task = t.id WHERE t.state >= 3 AND t.state = 4 AND e.code = 'OutOfOrder'";
/// Keys deleted at the source that `status` names at most.
pub(super) const NAMED_DELETED: usize = 20;
pub(super) const FAILED_SQL: &str = "SELECT id, dest, refresh, history_pos FROM task
    WHERE state >= 3 AND state = 3 ORDER BY id";
/// Open tasks of a key newer than a failed one, to the failed task's destination bucket
/// (several rules may send a key to one bucket, each its own destination id).
pub(super) const WAITING_SQL: &str = "SELECT count(*) FROM task
    WHERE id BETWEEN ?1 AND ?2 AND state < 2
    AND (dest = ?3 OR dest IN (SELECT id FROM destinations
        WHERE bucket = (SELECT bucket FROM destinations WHERE id = ?3)))
    AND (refresh > ?4 OR (refresh = ?4 AND history_pos < ?5))";

/// Each destination id's bucket group: the smallest destination id with the same bucket
/// (a key's history in one bucket is one history, whichever rule sent each version).
pub(super) fn bucket_groups(conn: &Connection) -> rusqlite::Result<BTreeMap<i64, i64>> {
    let mut stmt = conn.prepare_cached(
        "SELECT d1.id, min(d2.id) FROM destinations d1 JOIN destinations d2
         ON d2.bucket = d1.bucket GROUP BY d1.id",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}
/// The statements `next_key_groups()` runs to find keys.
pub(super) const OPEN_BLOCKS_SQL: &str =
    "SELECT block FROM open_blocks WHERE block >= ?1 AND open > 0 ORDER BY block";
pub(super) const NEXT_OPEN_SQL: &str =
    "SELECT id FROM task WHERE id BETWEEN ?1 AND ?2 AND state < 2 ORDER BY id LIMIT 1";

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl SqliteManifest {
    /// Runs a task query and decodes its rows; an unknown value is [`ManifestError::BadState`].
    fn tasks_where(&self, cond: &str, order: &str, args: &[i64]) -> Result<Vec<Task>> {
        self.read_with(|conn| {
            let mut stmt = conn.prepare_cached(&task_select(cond, order))?;
            let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                out.push(task_from_row(r)?);
            }
            Ok(out)
        })
    }

    /// Every task of one key, oldest first (empty for a key the manifest does not hold).
    pub fn tasks_of_key(&self, key: &str) -> Result<Vec<Task>> {
        let Some(id) = super::keys::find_key(&self.conn, key).map_err(|e| self.sql(e))? else {
            return Ok(Vec::new());
        };
        let (lo, hi) = key_range(id);
        self.tasks_where("t.id BETWEEN ?1 AND ?2", OLDEST_FIRST, &[lo, hi])
    }

    /// Tasks with an open multipart upload recorded (left by a killed run).
    pub fn open_uploads(&self) -> Result<Vec<Task>> {
        self.tasks_where("u.upload_id IS NOT NULL", "ORDER BY t.id", &[])
    }

    /// Done tasks whose destination version id a stopped run left to be learned.
    pub fn versions_to_learn(&self) -> Result<Vec<Task>> {
        // The index comes with the first flag: without it, no task was ever flagged.
        if !self.has_schema_object("task_to_learn")? {
            return Ok(Vec::new());
        }
        self.tasks_where("t.flags & 32 != 0", "ORDER BY t.id", &[])
    }

    /// The next `limit` keys after key id `after_key_id` that have open (pending or
    /// in-progress) tasks, in key-id order, each with all of its tasks, oldest first, and
    /// whether its history may go on on a page not yet listed (read in the same snapshot).
    pub fn next_key_groups(&self, after_key_id: i64, limit: usize) -> Result<Vec<KeyGroup>> {
        // One snapshot for the listing's open keys and the tasks (a page committed between
        // the two reads could otherwise leave a key's newest tasks looking complete). The
        // writer thread calls this inside its own transaction.
        let tx = match self.conn.is_autocommit() {
            true => Some(self.conn.unchecked_transaction().map_err(|e| self.sql(e))?),
            false => None,
        };
        let open_keys = self.listing_progress()?.open_keys;
        let ids = self
            .open_keys_after(after_key_id, limit)
            .map_err(|e| self.sql(e))?;
        let mut groups = Vec::with_capacity(ids.len());
        for key_id in ids {
            let (lo, hi) = key_range(key_id);
            let tasks = self.tasks_where("t.id BETWEEN ?1 AND ?2", OLDEST_FIRST, &[lo, hi])?;
            let key = match tasks.first() {
                Some(t) => t.entry.key.clone(),
                None => continue,
            };
            let listing_open = open_keys.contains(&key);
            groups.push(KeyGroup {
                key_id,
                key,
                tasks,
                listing_open,
                claimed: None,
            });
        }
        if let Some(tx) = tx {
            tx.finish().map_err(|e| self.sql(e))?;
        }
        Ok(groups)
    }

    /// Where the listing stands, over every part (all rows of `partitions`): complete when
    /// every part is; the last key of each unfinished part is open (its older versions may
    /// come on the part's next page, so it must not be copied yet).
    pub fn listing_progress(&self) -> Result<ListingProgress> {
        self.read_with(|conn| {
            let mut stmt = conn.prepare_cached(LISTING_PROGRESS_SQL)?;
            let mut rows = stmt.query([])?;
            let mut p = ListingProgress {
                complete: true,
                ..ListingProgress::default()
            };
            let mut parts = 0;
            while let Some(r) = rows.next()? {
                parts += 1;
                let complete: bool = r.get(0)?;
                p.complete &= complete;
                p.entries += count(r.get(2)?);
                p.pages += count(r.get(3)?);
                if let (false, Some(k)) = (complete, r.get::<_, Option<String>>(1)?) {
                    p.open_keys.push(k);
                }
            }
            // A manifest without any part has not started listing.
            p.complete &= parts > 0;
            Ok(p)
        })
    }

    /// Ids of the next keys with open tasks: blocks of keys without open tasks are skipped
    /// (`open_blocks`), and within a block each key costs one index seek.
    fn open_keys_after(&self, after_key_id: i64, limit: usize) -> rusqlite::Result<Vec<i64>> {
        let mut ids = Vec::new();
        let start = after_key_id.max(0) + 1;
        let mut blocks = self.conn.prepare_cached(OPEN_BLOCKS_SQL)?;
        let mut next_open = self.conn.prepare_cached(NEXT_OPEN_SQL)?;
        let mut rows = blocks.query([start >> BLOCK_BITS])?;
        while let Some(r) = rows.next()? {
            if ids.len() >= limit {
                break;
            }
            let block: i64 = r.get(0)?;
            let mut from = start.max(block << BLOCK_BITS);
            let last = ((block + 1) << BLOCK_BITS) - 1;
            while ids.len() < limit && from <= last {
                let hit: Option<i64> = next_open
                    .query_row([key_range(from).0, key_range(last).1], |r| r.get(0))
                    .map(Some)
                    .or_else(|e| match e {
                        rusqlite::Error::QueryReturnedNoRows => Ok(None),
                        e => Err(e),
                    })?;
                let Some(id) = hit else { break };
                ids.push(key_of(id));
                from = key_of(id) + 1;
            }
        }
        Ok(ids)
    }

    /// Done tasks whose ETag changed at the destination, by reason (the reason follows from
    /// how the task was copied); a scan of the tasks, for `status` and `report`.
    pub fn etag_changes(&self) -> Result<BTreeMap<String, u64>> {
        self.read_with(|conn| {
            let mut stmt = conn.prepare_cached(ETAG_CHANGES_SQL)?;
            let mut rows = stmt.query([
                State::Done.code(),
                ETAG_CHECKED | ETAG_PRESERVED,
                ETAG_CHECKED,
            ])?;
            let mut out = BTreeMap::new();
            while let Some(r) = rows.next()? {
                let method: Option<i64> = r.get(0)?;
                let n = count(r.get(1)?);
                let why = etag_change_reason(
                    CopyMethod::ALL
                        .into_iter()
                        .find(|m| Some(m.code()) == method),
                );
                *out.entry(why.to_string()).or_insert(0) += n;
            }
            Ok(out)
        })
    }

    /// Counts for `status`, from the kept counters (no scan of tasks).
    pub fn counts(&self) -> Result<Counts> {
        let mut c = self.read_counts().map_err(|e| self.sql(e))?;
        (c.deleted_at_source, c.deleted_at_source_keys) = self.deleted_at_source(NAMED_DELETED)?;
        Ok(c)
    }

    fn read_counts(&self) -> rusqlite::Result<Counts> {
        let mut c = Counts::default();
        let mut stmt = self.conn.prepare_cached(COUNTERS_SQL)?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let mut row = [0i64; 7];
            for (i, v) in row.iter_mut().enumerate() {
                *v = r.get(i + 1)?;
            }
            add_counters(&mut c, r.get(0)?, row);
        }
        c.retries = self
            .conn
            .prepare_cached(TOTALS_SQL)?
            .query_row([], |r| r.get(0).map(count))?;
        let (complete, entries): (bool, i64) = self
            .conn
            .prepare_cached(PARTITIONS_SQL)?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        c.listing_complete = complete;
        c.listed_entries = count(entries);
        let mut stmt = self.conn.prepare_cached(REQUESTS_SQL)?;
        let requests = stmt.query_map([], |r| Ok((r.get(0)?, count(r.get(1)?))))?;
        c.requests = requests.collect::<rusqlite::Result<BTreeMap<_, _>>>()?;
        c.blocked = blocked(&self.conn)?;
        c.out_of_order = self
            .conn
            .prepare_cached(OUT_OF_ORDER_SQL)?
            .query_row([], |r| r.get(0).map(count))?;
        Ok(c)
    }

    /// Failed, skipped and blocked tasks, in key-id order (each key oldest first), at most
    /// `limit`. Key ids follow the listing: key order when it was listed as one part; with
    /// parts listed at once, each part's keys in order, the parts' pages interleaved as they
    /// came (so the order of keys from different parts can differ between two plans).
    pub fn problems(&self, limit: usize) -> Result<Vec<Problem>> {
        let mut out = Vec::new();
        self.walk_problems(|p| {
            if out.len() >= limit {
                return Ok(false);
            }
            out.push(p);
            Ok(true)
        })?;
        Ok(out)
    }

    /// Streams every failed, skipped and blocked task to `f`, in key-id order (each key
    /// oldest first; see [`Self::problems`]). Memory does not grow with the number of problems.
    pub fn for_each_problem(
        &self,
        mut f: impl FnMut(Problem) -> std::io::Result<()>,
    ) -> Result<()> {
        self.walk_problems(|p| f(p).map(|()| true))
    }

    /// Walks the problems until `f` returns false.
    fn walk_problems(&self, mut f: impl FnMut(Problem) -> std::io::Result<bool>) -> Result<()> {
        self.read_with(|conn| {
            let mut keys = conn.prepare_cached(&format!(
                "SELECT DISTINCT id >> {SEQ_BITS} FROM task WHERE state >= 3 ORDER BY 1"
            ))?;
            let mut rows = keys.query([])?;
            while let Some(r) = rows.next()? {
                if !key_problems(conn, r.get(0)?, &mut f)? {
                    break;
                }
            }
            Ok(())
        })
    }

    /// Streams the key, version id and destination of every task in `state`, in id order
    /// (the AWS-shaped report's `succeeded` rows). A full scan of the tasks: for reports, not
    /// for `status`.
    pub fn for_each_in_state(
        &self,
        state: State,
        mut f: impl FnMut(&str, &str, i64) -> std::io::Result<()>,
    ) -> Result<()> {
        self.read_with(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT k.key, t.version_id, t.dest FROM task t
                 JOIN keys k ON k.id = t.id >> {SEQ_BITS} WHERE t.state = ?1 ORDER BY t.id"
            ))?;
            let mut rows = stmt.query([state.code()])?;
            while let Some(r) = rows.next()? {
                let (key, version): (String, String) = (r.get(0)?, r.get(1)?);
                f(&key, &version, r.get(2)?)
                    .map_err(|source| DbError::Io("writing tasks out", source))?;
            }
            Ok(())
        })
    }

    /// Puts failed tasks back in the queue (attempts kept, so they are reconciled before
    /// being written again); returns how many.
    pub fn retry_failed(&self) -> Result<usize> {
        self.conn
            .prepare_cached("UPDATE OR ROLLBACK task SET state = 0 WHERE state >= 3 AND state = 3")
            .and_then(|mut s| s.execute([]))
            .map_err(|e| self.sql(e))
    }

    /// Puts skipped tasks back in the queue, all but those whose source version is gone
    /// (archived versions once restored, tasks skipped by `--skip-failed` or by a rule):
    /// attempts kept, so those attempted are reconciled before being written again; their
    /// class is cleared (an open task of class `archived` is one whose restore is awaited).
    ///
    /// A skipped task with a newer task of its key already done at the same destination
    /// stays skipped, now as out of order (copied now, it would become the destination's
    /// current version over the newer one): reported with that reason, no longer counted as
    /// archived. Returns how many were put back, and how many were kept out of order.
    pub fn retry_skipped(&self) -> Result<(usize, usize)> {
        let gone = super::codec::class_code(crate::s3::ErrorClass::SourceGone);
        let ooo = super::pages::OUT_OF_ORDER;
        let candidates = "t.state >= 3 AND t.state = 4 AND t.error_class IS NOT ?1
             AND t.id NOT IN (SELECT task FROM errors WHERE code = ?2)";
        let newer_done = "EXISTS (SELECT 1 FROM task u
             WHERE u.id BETWEEN (t.id >> 24) << 24 AND ((t.id >> 24) << 24) + 16777215
             AND u.dest = t.dest AND u.state = 2
             AND (u.refresh > t.refresh OR (u.refresh = t.refresh AND u.history_pos < t.history_pos)))";
        debug_assert_eq!(super::codec::SEQ_BITS, 24);
        self.write_tx(|tx| {
            let kept: Vec<i64> = tx
                .prepare(&format!(
                    "SELECT t.id FROM task t WHERE {candidates} AND {newer_done}"
                ))?
                .query_map(rusqlite::params![gone, ooo], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            for id in &kept {
                tx.execute(
                    "INSERT INTO errors (task, code, message) VALUES (?1, ?2, ?3)
                     ON CONFLICT (task) DO UPDATE SET code = excluded.code,
                     http_status = NULL, message = excluded.message, side = NULL, op = NULL",
                    rusqlite::params![id, ooo, RETRIED_OUT_OF_ORDER_WHY],
                )?;
                tx.execute(
                    "UPDATE OR ROLLBACK task SET error_class = NULL WHERE id = ?1",
                    [id],
                )?;
            }
            let requeued = tx.execute(
                &format!(
                    "UPDATE OR ROLLBACK task SET state = 0, error_class = NULL
                     WHERE id IN (SELECT t.id FROM task t WHERE {candidates})"
                ),
                rusqlite::params![gone, ooo],
            )?;
            Ok((requeued, kept.len()))
        })
    }

    /// Marks failed tasks skipped, with the reason "skipped by --skip-failed after: <last
    /// error>"; the keys they blocked continue. Returns how many.
    pub fn skip_failed(&self) -> Result<usize> {
        self.write_tx(|tx| {
            tx.execute(
                "INSERT INTO errors (task, message)
                 SELECT id, 'skipped by --skip-failed (no error was recorded)' FROM task
                 WHERE state >= 3 AND state = 3
                 ON CONFLICT (task) DO UPDATE
                 SET message = 'skipped by --skip-failed after: ' || coalesce(message, '?'),
                 side = NULL, op = NULL",
                [],
            )?;
            Ok(tx.execute(
                "UPDATE OR ROLLBACK task SET state = 4 WHERE state >= 3 AND state = 3",
                [],
            )?)
        })
    }
}

/// Adds one row of `counters` (`COUNTERS_SQL`: the state's code, then tasks, bytes, delete
/// markers, attempts, ETags preserved, archived, without a destination version) to `c`.
pub(super) fn add_counters(c: &mut Counts, state: i64, row: [i64; 7]) {
    let [n, bytes, markers, attempts, preserved, archived, no_dest] = row.map(count);
    c.total += n;
    c.bytes_total += bytes;
    c.delete_markers += markers;
    c.attempts += attempts;
    c.etag_preserved += preserved;
    match State::of_code(state) {
        Some(State::Pending) => {
            c.pending = n;
            c.restore_pending = archived;
        }
        Some(State::InProgress) => c.in_progress = n,
        Some(State::Done) => {
            c.done = n;
            c.bytes_done = bytes;
            c.done_without_dest_version = no_dest;
        }
        Some(State::Failed) => c.failed = n,
        Some(State::Skipped) => {
            c.skipped = n;
            c.archived = archived;
        }
        None => {}
    }
}

/// Open tasks of keys whose older task failed (per destination), derived from the failed
/// tasks (few, indexed): for each key, those newer than its oldest failed task.
fn blocked(conn: &Connection) -> rusqlite::Result<u64> {
    let mut failed = conn.prepare_cached(FAILED_SQL)?;
    let mut rows = failed.query([])?;
    let groups = bucket_groups(conn)?;
    // The oldest failed task per (key, destination bucket) of the current key.
    let mut oldest: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    let mut key: Option<i64> = None;
    let mut total = 0;
    while let Some(r) = rows.next()? {
        let (id, dest, refresh, pos): (i64, i64, i64, i64) =
            (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
        if key != Some(key_of(id)) {
            if let Some(k) = key {
                total += waiting(conn, k, &oldest)?;
            }
            oldest.clear();
            key = Some(key_of(id));
        }
        let group = groups.get(&dest).copied().unwrap_or(dest);
        let e = oldest.entry(group).or_insert((refresh, pos));
        if (refresh, -pos) < (e.0, -e.1) {
            *e = (refresh, pos);
        }
    }
    if let Some(k) = key {
        total += waiting(conn, k, &oldest)?;
    }
    Ok(total)
}

/// Open tasks of key `key_id` newer than the given oldest failed task per destination.
fn waiting(
    conn: &Connection,
    key_id: i64,
    oldest: &BTreeMap<i64, (i64, i64)>,
) -> rusqlite::Result<u64> {
    let (lo, hi) = key_range(key_id);
    let mut stmt = conn.prepare_cached(WAITING_SQL)?;
    let mut n = 0;
    for (dest, (refresh, pos)) in oldest {
        n += stmt.query_row([lo, hi, *dest, *refresh, *pos], |r| r.get(0).map(count))?;
    }
    Ok(n)
}

/// The problems of one key, oldest first, streamed; false when `f` asked to stop.
fn key_problems(
    conn: &Connection,
    key_id: i64,
    f: &mut impl FnMut(Problem) -> std::io::Result<bool>,
) -> std::result::Result<bool, DbError> {
    let key: String = conn
        .prepare_cached("SELECT key FROM keys WHERE id = ?1")?
        .query_row([key_id], |r| r.get(0))?;
    let groups = bucket_groups(conn)?;
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT t.version_id, t.state, t.error_class, t.attempts, t.dest, e.code,
         e.http_status, e.message, e.side, e.op
         FROM task t LEFT JOIN errors e ON e.task = t.id
         WHERE t.id BETWEEN ?1 AND ?2 {OLDEST_FIRST}"
    ))?;
    let (lo, hi) = key_range(key_id);
    let mut rows = stmt.query([lo, hi])?;
    // Per destination: the oldest failed version, which later open tasks wait for.
    let mut failed: BTreeMap<i64, String> = BTreeMap::new();
    while let Some(r) = rows.next()? {
        let Some(p) = problem_from_row(r, &key, &groups, &mut failed)? else {
            continue;
        };
        if !f(p).map_err(|source| DbError::Io("writing problems out", source))? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The problem a task row of one key shows, if any: failed, skipped, or blocked (open and
/// newer than the oldest failed task of its destination, recorded in `failed`).
fn problem_from_row(
    r: &Row<'_>,
    key: &str,
    groups: &BTreeMap<i64, i64>,
    failed: &mut BTreeMap<i64, String>,
) -> std::result::Result<Option<Problem>, DbError> {
    let state = state_of(r.get(1)?)?;
    let dest: i64 = r.get(4)?;
    // A failed version blocks the later ones to its bucket, whichever rule sent them.
    let group = groups.get(&dest).copied().unwrap_or(dest);
    let p = Problem {
        key: key.to_string(),
        version_id: r.get(0)?,
        state: state.as_str().to_string(),
        error_class: class_name(r.get(2)?)?,
        error_code: r.get(5)?,
        http_status: r.get(6)?,
        message: r.get(7)?,
        error_side: match r.get::<_, Option<i64>>(8)? {
            None => None,
            Some(c) => Some(side_of(c).ok_or_else(|| DbError::Bad(format!("error side {c}")))?),
        },
        error_op: r.get(9)?,
        attempts: r.get(3)?,
        dest,
    };
    Ok(shown_problem(p, state, group, failed))
}

/// What a report shows of task `p` (in `state`, to destination bucket group `group`), read
/// in its key's order (oldest first): failed and skipped tasks as they are, open tasks
/// newer than a failed one to the same bucket (recorded in `failed`) as blocked, no other.
pub(super) fn shown_problem(
    mut p: Problem,
    state: State,
    group: i64,
    failed: &mut BTreeMap<i64, String>,
) -> Option<Problem> {
    let version_id = p.version_id.clone();
    match state {
        State::Failed => {
            failed.entry(group).or_insert(version_id);
        }
        State::Skipped => {}
        State::Done => return None,
        State::Pending | State::InProgress => {
            let v = failed.get(&group)?;
            p.state = "blocked".into();
            (p.error_class, p.error_code, p.http_status) = (None, None, None);
            (p.error_side, p.error_op) = (None, None);
            p.message = Some(format!(
                "waits for the older version {v} of this key, which failed; resolve it with `run --retry-failed` or `run --skip-failed`"
            ));
        }
    }
    Some(p)
}
