//! manifest::pg::read: what `status`, the reports, `verify`, the estimate and a run's
//! resume read from a PostgreSQL job, and the user's resolutions (`--retry-failed`,
//! `--retry-skipped`, `--skip-failed`, which also reopen the units of the tasks they
//! change). Rows decode into the same `Task` and `Problem` as SQLite's ([`task_of_row`] is
//! the one decoder of task rows, shared with the run); the counts come from the kept
//! `counters`, never a scan of tasks; reports and the estimate stream their rows in batches
//! of a portal (one snapshot, memory bounded by a batch). A running run is a row of
//! `workers` with a fresh heartbeat.
//!
//! May call: `pg::schema`, `manifest::codec`, `manifest::read` (what a problem shows, the
//! counters' meaning), the types of `manifest`.

use std::collections::BTreeMap;
use std::sync::mpsc;

use postgres::types::ToSql;
use postgres::{Client, IsolationLevel, Row, Transaction};

use super::{PgError, PgManifest};
use crate::manifest::codec::{
    class_code, class_of, side_of, DELETE_MARKER, ETAG_CHECKED, ETAG_PRESERVED, LATEST, SEQ_BITS,
    STREAM_ONLY, VERSION_TO_LEARN,
};
use crate::manifest::read::{
    add_counters, etag_change_reason, shown_problem, COUNTERS_SQL, OLDEST_FIRST, OUT_OF_ORDER_SQL,
    REQUESTS_SQL, RETRIED_OUT_OF_ORDER_WHY, TOTALS_SQL,
};
use crate::manifest::{
    CopyMethod, Counts, KeyGroup, ListingProgress, ManifestError, Problem, Result, RunProgress,
    State, Task, OUT_OF_ORDER,
};

/// The columns [`task_of_row`] decodes, in its order (`t` task, `u` uploads, `k` keys; see
/// [`TASK_FROM`]). More columns may follow them in a select.
pub(super) const TASK_COLUMNS: &str = "t.id, t.version_id, t.flags, t.size, t.etag, \
     t.last_modified, t.storage_class, t.checksum_algorithm, t.state, t.attempts, \
     t.dest_version_id, t.started_at, u.upload_id, t.error_class, k.key, t.dest";

/// The tables [`TASK_COLUMNS`] reads: each task with its key and its upload, if any.
pub(super) const TASK_FROM: &str =
    "task t JOIN keys k ON k.id = t.id >> 24 LEFT JOIN uploads u ON u.task = t.id";

// The SQL here writes a task's key as `id >> 24` and its range as `kid << 24` to
// `(kid << 24) + 16777215`.
const _: () = assert!(SEQ_BITS == 24);

/// A select of task rows for [`task_of_row`]: `cond` filters, `order` orders (or is empty).
pub(super) fn task_select(cond: &str, order: &str) -> String {
    format!("SELECT {TASK_COLUMNS} FROM {TASK_FROM} WHERE {cond} {order}")
}

/// Rows fetched from a portal at a time (and items queued to the caller at most).
const BATCH: i32 = 1000;

/// How recent a heartbeat makes a worker running (seconds).
const RUNNING_FOR: i64 = 30;

/// Each destination id's bucket group (the smallest destination id with the same bucket),
/// as `manifest::read::bucket_groups`; a CTE named `g` (id, grp).
const GROUPS_CTE: &str = "g AS (SELECT d1.id, min(d2.id) AS grp FROM destinations d1
    JOIN destinations d2 ON d2.bucket = d1.bucket GROUP BY d1.id)";

/// How many open tasks wait behind a failed older task of their key to the same bucket
/// group (`counts().blocked`, as SQLite derives it): the oldest failed task per key and
/// group, found from the failed tasks (indexed), then the key's newer open tasks. After
/// `WITH` [`GROUPS_CTE`]`,`.
const BLOCKED_SQL: &str = "oldest AS (SELECT DISTINCT ON (t.id >> 24, coalesce(g.grp, t.dest))
            t.id >> 24 AS kid, coalesce(g.grp, t.dest) AS grp, t.refresh, t.history_pos
        FROM task t LEFT JOIN g ON g.id = t.dest WHERE t.state >= 3 AND t.state = 3
        ORDER BY t.id >> 24, coalesce(g.grp, t.dest), t.refresh, t.history_pos DESC)
    SELECT count(*) FROM oldest o
    JOIN task t ON t.id BETWEEN o.kid << 24 AND (o.kid << 24) + 16777215
    LEFT JOIN g ON g.id = t.dest
    WHERE t.state < 2 AND coalesce(g.grp, t.dest) = o.grp
    AND (t.refresh > o.refresh OR (t.refresh = o.refresh AND t.history_pos < o.history_pos))";

/// Whether every listing part is complete, and the entries listed (`counts()`).
const PARTITIONS_SQL: &str = "SELECT coalesce(bool_and(complete), false),
    coalesce(sum(entries), 0)::bigint FROM partitions";

/// The next keys with open tasks after a task id (`$1`), at most `$2`: one index seek per
/// key, as SQLite's `NEXT_OPEN_SQL`.
const OPEN_KEYS_SQL: &str = "WITH RECURSIVE ks(kid, n) AS (
        SELECT (SELECT id FROM task WHERE id >= $1::bigint AND state < 2
                ORDER BY id LIMIT 1) >> 24, 1::bigint
        UNION ALL
        SELECT (SELECT id FROM task WHERE id >= (ks.kid + 1) << 24 AND state < 2
                ORDER BY id LIMIT 1) >> 24, ks.n + 1
        FROM ks WHERE ks.kid IS NOT NULL AND ks.n < $2::bigint)
    SELECT kid FROM ks WHERE kid IS NOT NULL";

/// Reopens the units of the tasks a resolution changed (ids in `$1`): a done or held-back
/// unit has open work again.
const REOPEN_UNITS_SQL: &str = "UPDATE units SET state = 0 WHERE id = ANY($1) AND state IN (2, 3)";

/// One process working on the job, as `status` shows the fleet.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct WorkerRow {
    /// The host it runs on.
    pub host: String,
    /// Its process id there.
    pub pid: i64,
    /// Its command (`run`, `replicate`).
    pub command: String,
    /// When it started (unix seconds).
    pub started_at: i64,
    /// Its last heartbeat (unix seconds, the database's clock).
    pub heartbeat_at: i64,
    /// Seconds since that heartbeat, by the database's clock.
    pub heartbeat_age_secs: i64,
    /// Its heartbeat is fresh (within 30 s): it is running; else it is silent (stalled or
    /// dead, its units to be taken over when their leases expire).
    pub running: bool,
    /// Units of work it holds, as its last heartbeat said.
    pub units: i64,
    /// Tasks it ended.
    pub tasks_done: i64,
    /// Tasks ended per second, recently.
    pub tasks_per_sec: f64,
    /// Bytes copied per second, recently.
    pub bytes_per_sec: f64,
}

fn bad(what: String) -> PgError {
    PgError::Bad(what)
}

fn state_of(code: i16) -> std::result::Result<State, PgError> {
    State::of_code(i64::from(code)).ok_or_else(|| bad(format!("state {code}")))
}

fn class_name(code: Option<i16>) -> std::result::Result<Option<String>, PgError> {
    code.map(|c| {
        class_of(i64::from(c))
            .map(|c| c.as_str().to_string())
            .ok_or_else(|| bad(format!("error class {c}")))
    })
    .transpose()
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A row whose first columns are [`TASK_COLUMNS`]; an unknown state or class is
/// [`PgError::Bad`], named as SQLite names it.
pub(super) fn task_of_row(r: &Row) -> std::result::Result<Task, PgError> {
    let flags: i64 = r.try_get(2)?;
    Ok(Task {
        id: r.try_get(0)?,
        entry: crate::s3::VersionEntry {
            key: r.try_get(14)?,
            version_id: r.try_get(1)?,
            is_delete_marker: flags & DELETE_MARKER != 0,
            is_latest: flags & LATEST != 0,
            size: count(r.try_get(3)?),
            etag: r.try_get(4)?,
            last_modified: r.try_get(5)?,
            storage_class: r.try_get(6)?,
            checksum_algorithm: r.try_get(7)?,
        },
        state: state_of(r.try_get(8)?)?,
        attempts: r.try_get(9)?,
        dest_version_id: r.try_get(10)?,
        started_at: r.try_get(11)?,
        upload_id: r.try_get(12)?,
        stream_only: flags & STREAM_ONLY != 0,
        version_to_learn: flags & VERSION_TO_LEARN != 0,
        error_class: class_name(r.try_get(13)?)?,
        dest: r.try_get(15)?,
        attempt_stamped: crate::manifest::codec::attempt_stamped(flags),
    })
}

/// A read-only transaction: every statement in it sees one snapshot.
fn snapshot(c: &mut Client) -> std::result::Result<Transaction<'_>, postgres::Error> {
    c.build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
}

/// Task rows of `sql` (a [`task_select`]) with int parameters.
fn tasks(
    c: &mut impl postgres::GenericClient,
    sql: &str,
    args: &[i64],
) -> std::result::Result<Vec<Task>, PgError> {
    let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as _).collect();
    c.query(sql, &params)?.iter().map(task_of_row).collect()
}

/// Where the listing stands (as SQLite's `listing_progress`), in `c`'s snapshot.
fn listing_progress_in(
    c: &mut impl postgres::GenericClient,
) -> std::result::Result<ListingProgress, PgError> {
    let rows = c.query(
        "SELECT complete, last_key, entries, pages FROM partitions ORDER BY id",
        &[],
    )?;
    let mut p = ListingProgress {
        // A job without any part has not started listing.
        complete: !rows.is_empty(),
        ..ListingProgress::default()
    };
    for r in &rows {
        let complete: bool = r.try_get(0)?;
        p.complete &= complete;
        p.entries += count(r.try_get(2)?);
        p.pages += count(r.try_get(3)?);
        if let (false, Some(k)) = (complete, r.try_get::<_, Option<String>>(1)?) {
            p.open_keys.push(k);
        }
    }
    Ok(p)
}

/// Streams the rows of `sql` from a portal in batches of [`BATCH`], in one read-only
/// snapshot, decoding each with `decode` (None: nothing to hand on) and sending the items
/// to `tx` until it is closed.
fn produce<T>(
    c: &mut Client,
    sql: &str,
    args: &[i64],
    mut decode: impl FnMut(&Row) -> std::result::Result<Option<T>, PgError>,
    tx: mpsc::SyncSender<T>,
) -> std::result::Result<(), PgError> {
    let mut t = snapshot(c)?;
    let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as _).collect();
    let portal = t.bind(sql, &params)?;
    loop {
        let rows = t.query_portal(&portal, BATCH)?;
        for r in &rows {
            if let Some(item) = decode(r)? {
                if tx.send(item).is_err() {
                    // The caller stopped reading.
                    return Ok(());
                }
            }
        }
        if rows.len() < BATCH as usize {
            break;
        }
    }
    Ok(t.commit()?)
}

/// The first column (ids) of the rows a resolution changed.
fn changed(rows: &[Row]) -> std::result::Result<Vec<i64>, PgError> {
    rows.iter()
        .map(|r| r.try_get::<_, i64>(0).map_err(PgError::from))
        .collect()
}

impl PgManifest {
    /// Runs `sql` (int parameters `args`) and hands the items `decode` makes of its rows to
    /// `take`, on this thread, while the connection's thread fetches the next batch; stops
    /// when `take` returns false. `what` names a failure of `take`. The connection is busy
    /// until the stream ends: `take` must not call this manifest.
    fn stream<T: Send + 'static>(
        &self,
        sql: String,
        args: Vec<i64>,
        decode: impl FnMut(&Row) -> std::result::Result<Option<T>, PgError> + Send + 'static,
        mut take: impl FnMut(T) -> std::io::Result<bool>,
        what: &'static str,
    ) -> Result<()> {
        let (tx, rx) = mpsc::sync_channel::<T>(BATCH as usize);
        let db = &self.db;
        let mut failed = None;
        let produced = std::thread::scope(|s| {
            let producer =
                s.spawn(move || db.call_with(move |c| produce(c, &sql, &args, decode, tx)));
            for item in rx {
                match take(item) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            producer.join()
        });
        let produced = produced.unwrap_or_else(|p| std::panic::resume_unwind(p));
        match failed {
            Some(source) => Err(ManifestError::Io {
                path: self.path().to_string(),
                what,
                source,
            }),
            None => produced,
        }
    }

    /// Every task of one key, oldest first (empty for a key the job does not hold).
    pub fn tasks_of_key(&self, key: &str) -> Result<Vec<Task>> {
        let key = key.to_string();
        let sql = task_select(
            "t.id BETWEEN (SELECT id FROM keys WHERE key = $1) << 24
             AND ((SELECT id FROM keys WHERE key = $1) << 24) + 16777215",
            OLDEST_FIRST,
        );
        self.db
            .call_with(move |c| c.query(&sql, &[&key])?.iter().map(task_of_row).collect())
    }

    /// Tasks with an open multipart upload recorded (left by a killed run).
    pub fn open_uploads(&self) -> Result<Vec<Task>> {
        // Not those of a unit another live process holds: its upload is in use.
        let sql = task_select(
            "u.upload_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM units un
                WHERE un.id = t.unit AND un.state = 1
                AND un.lease_expires >= extract(epoch FROM clock_timestamp()))",
            "ORDER BY t.id",
        );
        self.db.call_with(move |c| tasks(c, &sql, &[]))
    }

    /// Done tasks whose destination version id a stopped run left to be learned.
    pub fn versions_to_learn(&self) -> Result<Vec<Task>> {
        // The predicate of the index `task_to_learn`, as written there.
        let sql = task_select("t.flags & 32 <> 0", "ORDER BY t.id");
        debug_assert_eq!(VERSION_TO_LEARN, 32);
        self.db.call_with(move |c| tasks(c, &sql, &[]))
    }

    /// The next `limit` keys after key id `after_key_id` that have open (pending or
    /// in-progress) tasks, in key-id order, each with all of its tasks, oldest first, and
    /// whether its history may go on on a page not yet listed (one snapshot for both).
    pub fn next_key_groups(&self, after_key_id: i64, limit: usize) -> Result<Vec<KeyGroup>> {
        let from = (after_key_id.max(0) + 1) << SEQ_BITS;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = format!(
            "WITH open AS ({OPEN_KEYS_SQL}) SELECT {TASK_COLUMNS} FROM open
             JOIN task t ON t.id BETWEEN open.kid << 24 AND (open.kid << 24) + 16777215
             JOIN keys k ON k.id = open.kid LEFT JOIN uploads u ON u.task = t.id
             ORDER BY open.kid, {}",
            OLDEST_FIRST.trim_start_matches("ORDER BY ")
        );
        self.db.call_with(move |c| {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let mut t = snapshot(c)?;
            let open_keys = listing_progress_in(&mut t)?.open_keys;
            let mut groups: Vec<KeyGroup> = Vec::new();
            for task in tasks(&mut t, &sql, &[from, limit])? {
                let key_id = task.id >> SEQ_BITS;
                match groups.last_mut() {
                    Some(g) if g.key_id == key_id => g.tasks.push(task),
                    _ => groups.push(KeyGroup {
                        key_id,
                        key: task.entry.key.clone(),
                        listing_open: open_keys.contains(&task.entry.key),
                        tasks: vec![task],
                        claimed: None,
                    }),
                }
            }
            t.commit()?;
            Ok(groups)
        })
    }

    /// Where the listing stands, over every part: complete when every part is; the last key
    /// of each unfinished part is open.
    pub fn listing_progress(&self) -> Result<ListingProgress> {
        self.db.call_with(listing_progress_in)
    }

    /// Done tasks whose ETag changed at the destination, by reason (a scan of the tasks,
    /// for `status` and `report`).
    pub fn etag_changes(&self) -> Result<BTreeMap<String, u64>> {
        let rows: Vec<(Option<i16>, i64)> = self.db.call(|c| {
            let rows = c.query(
                "SELECT method, count(*) FROM task WHERE state = $1 AND flags & $2 = $3
                 GROUP BY method",
                &[
                    &(State::Done.code() as i16),
                    &(ETAG_CHECKED | ETAG_PRESERVED),
                    &ETAG_CHECKED,
                ],
            )?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect()
        })?;
        let mut out = BTreeMap::new();
        for (method, n) in rows {
            let method = CopyMethod::ALL
                .into_iter()
                .find(|m| Some(m.code()) == method.map(i64::from));
            *out.entry(etag_change_reason(method).to_string())
                .or_insert(0) += count(n);
        }
        Ok(out)
    }

    /// Counts for `status`, from the kept counters (no scan of tasks), in one snapshot;
    /// then the keys the last refresh found deleted at the source.
    pub fn counts(&self) -> Result<Counts> {
        let mut counts = self.read_counts()?;
        (counts.deleted_at_source, counts.deleted_at_source_keys) =
            self.deleted_at_source(crate::manifest::read::NAMED_DELETED)?;
        Ok(counts)
    }

    fn read_counts(&self) -> Result<Counts> {
        self.db.call_with(|c| {
            let mut t = snapshot(c)?;
            let mut counts = Counts::default();
            // The statements SQLite's `counts()` runs, where they read the same here.
            for r in t.query(COUNTERS_SQL, &[])? {
                let mut row = [0i64; 7];
                for (i, v) in row.iter_mut().enumerate() {
                    *v = r.try_get(i + 1)?;
                }
                add_counters(&mut counts, i64::from(r.try_get::<_, i16>(0)?), row);
            }
            counts.retries = count(t.query_one(TOTALS_SQL, &[])?.try_get(0)?);
            let parts = t.query_one(PARTITIONS_SQL, &[])?;
            counts.listing_complete = parts.try_get(0)?;
            counts.listed_entries = count(parts.try_get(1)?);
            for r in t.query(REQUESTS_SQL, &[])? {
                counts.requests.insert(r.try_get(0)?, count(r.try_get(1)?));
            }
            let blocked = format!("WITH {GROUPS_CTE}, {BLOCKED_SQL}");
            counts.blocked = count(t.query_one(&blocked, &[])?.try_get(0)?);
            counts.out_of_order = count(t.query_one(OUT_OF_ORDER_SQL, &[])?.try_get(0)?);
            t.commit()?;
            Ok(counts)
        })
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

    /// Walks the problems until `f` returns false: every task of each key that has a
    /// failed or skipped one, oldest first, shown as SQLite shows it.
    fn walk_problems(&self, f: impl FnMut(Problem) -> std::io::Result<bool>) -> Result<()> {
        let sql = format!(
            "WITH {GROUPS_CTE}, p AS (SELECT DISTINCT id >> 24 AS kid FROM task WHERE state >= 3)
             SELECT p.kid, k.key, t.version_id, t.state, t.error_class, t.attempts, t.dest,
             e.code, e.http_status, e.message, e.side, e.op, coalesce(g.grp, t.dest)
             FROM p JOIN keys k ON k.id = p.kid
             JOIN task t ON t.id BETWEEN p.kid << 24 AND (p.kid << 24) + 16777215
             LEFT JOIN errors e ON e.task = t.id LEFT JOIN g ON g.id = t.dest
             ORDER BY p.kid, {}",
            OLDEST_FIRST.trim_start_matches("ORDER BY ")
        );
        // Per destination bucket of the current key: the oldest failed version.
        let mut key = None;
        let mut failed: BTreeMap<i64, String> = BTreeMap::new();
        let decode = move |r: &Row| {
            let kid: i64 = r.try_get(0)?;
            if key != Some(kid) {
                key = Some(kid);
                failed.clear();
            }
            let state = state_of(r.try_get(3)?)?;
            let p = Problem {
                key: r.try_get(1)?,
                version_id: r.try_get(2)?,
                state: state.as_str().to_string(),
                error_class: class_name(r.try_get(4)?)?,
                error_code: r.try_get(7)?,
                http_status: r.try_get(8)?,
                message: r.try_get(9)?,
                error_side: match r.try_get::<_, Option<i16>>(10)? {
                    None => None,
                    Some(c) => {
                        Some(side_of(i64::from(c)).ok_or_else(|| bad(format!("error side {c}")))?)
                    }
                },
                error_op: r.try_get(11)?,
                attempts: r.try_get(5)?,
                dest: r.try_get(6)?,
            };
            Ok(shown_problem(p, state, r.try_get(12)?, &mut failed))
        };
        self.stream(sql, Vec::new(), decode, f, "writing problems out")
    }

    /// Streams the key, version id and destination of every task in `state`, in id order
    /// (a scan of the tasks, for reports).
    pub fn for_each_in_state(
        &self,
        state: State,
        mut f: impl FnMut(&str, &str, i64) -> std::io::Result<()>,
    ) -> Result<()> {
        let sql = "SELECT k.key, t.version_id, t.dest FROM task t
             JOIN keys k ON k.id = t.id >> 24 WHERE t.state = CAST($1::bigint AS smallint)
             ORDER BY t.id";
        let decode = |r: &Row| -> std::result::Result<_, PgError> {
            let row: (String, String, i64) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            Ok(Some(row))
        };
        self.stream(
            sql.to_string(),
            vec![state.code()],
            decode,
            |(key, version, dest)| f(&key, &version, dest).map(|()| true),
            "writing tasks out",
        )
    }

    /// Calls `f` with each key and all of its tasks, oldest first, in key-id order (the
    /// order the scheduler walks keys in), reading the tasks once, streamed.
    pub fn for_each_key(&self, mut f: impl FnMut(&str, &[Task])) -> Result<()> {
        let sql = task_select(
            "true",
            &format!(
                "ORDER BY t.id >> 24, {}",
                OLDEST_FIRST.trim_start_matches("ORDER BY ")
            ),
        );
        let mut key_tasks: Vec<Task> = Vec::new();
        let mut flush = |tasks: &mut Vec<Task>| {
            if let Some(first) = tasks.first() {
                f(&first.entry.key.clone(), tasks);
            }
            tasks.clear();
        };
        self.stream(
            sql,
            Vec::new(),
            |r| task_of_row(r).map(Some),
            |t| {
                if key_tasks
                    .first()
                    .is_some_and(|k| k.id >> SEQ_BITS != t.id >> SEQ_BITS)
                {
                    flush(&mut key_tasks);
                }
                key_tasks.push(t);
                Ok(true)
            },
            "reading tasks",
        )?;
        flush(&mut key_tasks);
        Ok(())
    }

    /// Puts failed tasks back in the queue (attempts kept, so they are reconciled before
    /// being written again), and their units; returns how many tasks.
    pub fn retry_failed(&self) -> Result<usize> {
        self.db.call_with(|c| {
            let mut t = c.transaction()?;
            let rows = t.query(
                "UPDATE task SET state = 0 WHERE state >= 3 AND state = 3 RETURNING unit",
                &[],
            )?;
            let units = changed(&rows)?;
            t.execute(REOPEN_UNITS_SQL, &[&units])?;
            t.commit()?;
            Ok(rows.len())
        })
    }

    /// Puts skipped tasks back in the queue, all but those whose source version is gone
    /// (as SQLite's `retry_skipped`): a skipped task with a newer task of its key already
    /// done at the same destination stays skipped, now as out of order. Their units are
    /// reopened. Returns how many were put back, and how many were kept out of order.
    pub fn retry_skipped(&self) -> Result<(usize, usize)> {
        let gone = class_code(crate::s3::ErrorClass::SourceGone) as i16;
        let candidates = "t.state >= 3 AND t.state = 4 AND t.error_class IS DISTINCT FROM $1
             AND t.id NOT IN (SELECT task FROM errors WHERE code = $2)";
        let newer_done = "EXISTS (SELECT 1 FROM task u
             WHERE u.id BETWEEN (t.id >> 24) << 24 AND ((t.id >> 24) << 24) + 16777215
             AND u.dest = t.dest AND u.state = 2
             AND (u.refresh > t.refresh OR (u.refresh = t.refresh AND u.history_pos < t.history_pos)))";
        let keep = format!(
            "WITH kept AS (SELECT t.id FROM task t WHERE {candidates} AND {newer_done}),
             e AS (INSERT INTO errors (task, code, message) SELECT id, $2, $3 FROM kept
                 ON CONFLICT (task) DO UPDATE SET code = excluded.code, http_status = NULL,
                 message = excluded.message, side = NULL, op = NULL)
             UPDATE task SET error_class = NULL WHERE id IN (SELECT id FROM kept) RETURNING id"
        );
        let requeue = format!(
            "UPDATE task SET state = 0, error_class = NULL
             WHERE id IN (SELECT t.id FROM task t WHERE {candidates}) RETURNING unit"
        );
        self.db.call_with(move |c| {
            let mut t = c.transaction()?;
            let kept = t
                .query(&keep, &[&gone, &OUT_OF_ORDER, &RETRIED_OUT_OF_ORDER_WHY])?
                .len();
            let rows = t.query(&requeue, &[&gone, &OUT_OF_ORDER])?;
            t.execute(REOPEN_UNITS_SQL, &[&changed(&rows)?])?;
            t.commit()?;
            Ok((rows.len(), kept))
        })
    }

    /// Marks failed tasks skipped, with the reason "skipped by --skip-failed after: <last
    /// error>"; the keys they blocked continue (their units reopened). Returns how many.
    pub fn skip_failed(&self) -> Result<usize> {
        self.db.call_with(|c| {
            let mut t = c.transaction()?;
            t.execute(
                "INSERT INTO errors (task, message)
                 SELECT id, 'skipped by --skip-failed (no error was recorded)' FROM task
                 WHERE state >= 3 AND state = 3
                 ON CONFLICT (task) DO UPDATE
                 SET message = 'skipped by --skip-failed after: '
                     || coalesce(errors.message, '?'),
                 side = NULL, op = NULL",
                &[],
            )?;
            let rows = t.query(
                "UPDATE task SET state = 4 WHERE state >= 3 AND state = 3 RETURNING unit",
                &[],
            )?;
            t.execute(REOPEN_UNITS_SQL, &[&changed(&rows)?])?;
            t.commit()?;
            Ok(rows.len())
        })
    }

    /// The facts stored for the estimate (none before a `plan` stored them).
    pub fn estimate_facts(&self) -> Result<BTreeMap<String, String>> {
        self.db.call(|c| {
            c.query("SELECT name, value FROM estimate_facts", &[])?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect()
        })
    }

    /// The processes working on the job (not stopped), longest running first: each with its
    /// units, tasks, rate and heartbeat.
    pub fn workers(&self) -> Result<Vec<WorkerRow>> {
        self.db.call(|c| {
            let rows = c.query(
                "SELECT host, pid, command, started_at, heartbeat_at,
                 extract(epoch FROM now())::bigint - heartbeat_at, units, tasks_done,
                 tasks_per_sec, bytes_per_sec FROM workers
                 WHERE stopped_at IS NULL ORDER BY started_at, id",
                &[],
            )?;
            rows.iter()
                .map(|r| {
                    let age: i64 = r.try_get(5)?;
                    Ok(WorkerRow {
                        host: r.try_get(0)?,
                        pid: r.try_get(1)?,
                        command: r.try_get(2)?,
                        started_at: r.try_get(3)?,
                        heartbeat_at: r.try_get(4)?,
                        heartbeat_age_secs: age.max(0),
                        running: age <= RUNNING_FOR,
                        units: r.try_get(6)?,
                        tasks_done: r.try_get(7)?,
                        tasks_per_sec: r.try_get(8)?,
                        bytes_per_sec: r.try_get(9)?,
                    })
                })
                .collect()
        })
    }

    /// The job's running runs as one: the rows of `workers` not stopped and with a
    /// heartbeat in the last 30 s (by the database's clock), their rates summed, the ETA of
    /// the open work at that rate (as a run's own ticker computes it: none while the
    /// listing goes on); the pid and time of the latest heartbeat. None when none runs.
    pub fn run_progress(&self) -> Result<Option<RunProgress>> {
        let running = self.db.call(|c| {
            let r = c.query_one(
                "SELECT count(*), max(heartbeat_at), sum(tasks_per_sec), sum(bytes_per_sec),
                 (array_agg(pid ORDER BY heartbeat_at DESC, id DESC))[1]
                 FROM workers WHERE stopped_at IS NULL
                 AND heartbeat_at >= extract(epoch FROM now())::bigint - $1",
                &[&RUNNING_FOR],
            )?;
            if r.try_get::<_, i64>(0)? == 0 {
                return Ok(None);
            }
            let rates: (f64, f64) = (r.try_get(2)?, r.try_get(3)?);
            Ok(Some((
                r.try_get::<_, i64>(1)?,
                rates,
                r.try_get::<_, i64>(4)?,
            )))
        })?;
        let Some((updated_at, (tasks_per_sec, bytes_per_sec), pid)) = running else {
            return Ok(None);
        };
        let c = self.counts()?;
        let remaining = (c.pending + c.in_progress).saturating_sub(c.blocked + c.restore_pending);
        let eta_secs = match (c.listing_complete, remaining) {
            (false, _) => None,
            (true, 0) => Some(0),
            (true, _) if tasks_per_sec > 0.0 => {
                Some((remaining as f64 / tasks_per_sec).round() as u64)
            }
            (true, _) => None,
        };
        Ok(Some(RunProgress {
            updated_at,
            pid: u32::try_from(pid).unwrap_or(0),
            tasks_per_sec: Some(tasks_per_sec),
            bytes_per_sec: Some(bytes_per_sec),
            eta_secs,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::store::tests::pg_job;
    use crate::manifest::tests::{error, settings, task};
    use crate::manifest::{Manifest, NewTask};
    use crate::s3::{ErrorClass, S3Error, Side};

    /// A new job of its own on the test server (None: no server, the test returns early).
    fn job(tag: &str) -> Option<PgManifest> {
        let path = pg_job(tag)?;
        match Manifest::open(&path, true).unwrap() {
            Manifest::Pg(m) => {
                m.store_settings(&settings()).unwrap();
                Some(m)
            }
            Manifest::Sqlite(_) => panic!("{} is no PostgreSQL job", path.display()),
        }
    }

    /// Runs one statement with bigint parameters; how many rows it changed.
    fn sql(m: &PgManifest, sql: &str, args: &[i64]) -> u64 {
        let (sql, args) = (sql.to_string(), args.to_vec());
        m.db.call(move |c| {
            let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as _).collect();
            c.execute(&sql, &params)
        })
        .unwrap()
    }

    /// One bigint of a query.
    fn one(m: &PgManifest, sql: &str) -> i64 {
        let sql = sql.to_string();
        m.db.call(move |c| c.query_one(&sql, &[])?.try_get(0))
            .unwrap()
    }

    /// Stores tasks as the plan side does (the contract): a key not seen before gets an id
    /// from `key_ids` and the one new unit of this call; a task's id is its key's id and its
    /// number among the key's tasks; inserted tasks are counted in `counters`. Returns the
    /// task ids, in the order given.
    fn seed(m: &PgManifest, page: &[NewTask]) -> Vec<i64> {
        let page = page.to_vec();
        m.db.call(move |c| {
            let mut t = c.transaction()?;
            let last = page.last().map_or(String::new(), |n| n.entry.key.clone());
            let unit: i64 = t
                .query_one(
                    "INSERT INTO units (partition, last_key) VALUES (0, $1) RETURNING id",
                    &[&last],
                )?
                .get(0);
            let mut ids = Vec::new();
            for n in &page {
                let e = &n.entry;
                t.execute(
                    "INSERT INTO keys (id, key, unit) VALUES (nextval('key_ids'), $1, $2)
                     ON CONFLICT (key) DO NOTHING",
                    &[&e.key, &unit],
                )?;
                let r = t.query_one(
                    "UPDATE keys SET tasks = tasks + 1 WHERE key = $1
                     RETURNING (id << 24) | (tasks - 1), unit",
                    &[&e.key],
                )?;
                let (id, unit): (i64, i64) = (r.get(0), r.get(1));
                let flags =
                    i64::from(e.is_delete_marker) * DELETE_MARKER + i64::from(e.is_latest) * LATEST;
                let size = e.size as i64;
                t.execute(
                    "INSERT INTO task (id, unit, dest, history_pos, version_id, flags, size, etag,
                     last_modified, storage_class, checksum_algorithm)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                    &[
                        &id,
                        &unit,
                        &n.dest,
                        &(n.history_pos as i64),
                        &e.version_id,
                        &flags,
                        &size,
                        &e.etag,
                        &e.last_modified,
                        &e.storage_class,
                        &e.checksum_algorithm,
                    ],
                )?;
                t.execute("UPDATE units SET tasks = tasks + 1 WHERE id = $1", &[&unit])?;
                t.execute(
                    "UPDATE counters SET tasks = tasks + 1, bytes = bytes + $1,
                     delete_markers = delete_markers + $2, no_dest_version = no_dest_version + 1
                     WHERE state = 0",
                    &[&size, &(flags & DELETE_MARKER)],
                )?;
                ids.push(id);
            }
            t.commit()?;
            Ok(ids)
        })
        .unwrap()
    }

    /// What a run's writer records, as SQL (the contract's columns and codes).
    enum Did<'a> {
        Started,
        Done,
        Failed(&'a S3Error, i64),
        Skipped(ErrorClass, &'a str),
        Requeued,
        Upload(Option<&'a str>),
    }

    fn did(m: &PgManifest, id: i64, what: Did<'_>) {
        let (failed, done, skipped) = (3, 2, 4);
        match what {
            Did::Started => {
                sql(m, "UPDATE task SET state = 1, attempts = attempts + 1, started_at = 9 WHERE id = $1", &[id]);
            }
            Did::Done => {
                sql(m, "UPDATE task SET state = $2::bigint, dest_version_id = 'd', method = 1, error_class = NULL WHERE id = $1", &[id, done]);
                sql(m, "DELETE FROM errors WHERE task = $1", &[id]);
                sql(
                    m,
                    "UPDATE uploads SET upload_id = NULL WHERE task = $1",
                    &[id],
                );
            }
            Did::Failed(e, retries) => {
                let class = class_code(e.class);
                sql(
                    m,
                    "UPDATE task SET state = $2::bigint, error_class = $3::bigint WHERE id = $1",
                    &[id, failed, class],
                );
                sql(
                    m,
                    "UPDATE uploads SET upload_id = NULL WHERE task = $1",
                    &[id],
                );
                let (id, code, status, message) =
                    (id, e.code.clone(), e.status.map(i64::from), e.to_string());
                let (side, op) = (crate::manifest::codec::side_code(e.side) as i16, e.op);
                m.db.call(move |c| {
                    c.execute(
                        "INSERT INTO errors (task, code, http_status, message, side, op)
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (task) DO UPDATE
                         SET code = excluded.code, http_status = excluded.http_status,
                         message = excluded.message, side = excluded.side, op = excluded.op",
                        &[&id, &code, &status, &message, &side, &op],
                    )
                })
                .unwrap();
                sql(m, "UPDATE totals SET retries = retries + $1", &[retries]);
            }
            Did::Skipped(class, reason) => {
                sql(
                    m,
                    "UPDATE task SET state = $2::bigint, error_class = $3::bigint WHERE id = $1",
                    &[id, skipped, class_code(class)],
                );
                let reason = reason.to_string();
                m.db.call(move |c| {
                    c.execute(
                        "INSERT INTO errors (task, message) VALUES ($1, $2)
                         ON CONFLICT (task) DO UPDATE SET code = NULL, http_status = NULL,
                         message = excluded.message, side = NULL, op = NULL",
                        &[&id, &reason],
                    )
                })
                .unwrap();
            }
            Did::Requeued => {
                sql(m, "UPDATE task SET state = 0 WHERE id = $1", &[id]);
            }
            Did::Upload(upload) => {
                let upload = upload.map(str::to_string);
                m.db.call(move |c| {
                    c.execute(
                        "INSERT INTO uploads (task, upload_id) VALUES ($1, $2)
                         ON CONFLICT (task) DO UPDATE SET upload_id = excluded.upload_id",
                        &[&id, &upload],
                    )
                })
                .unwrap();
            }
        }
    }

    fn all_keys(m: &PgManifest) -> Vec<KeyGroup> {
        m.next_key_groups(0, usize::MAX).unwrap()
    }

    fn denied() -> S3Error {
        error("AccessDenied", 403)
    }

    /// Key `k` with v1 done, v2 failed (AccessDenied), v3 and v4 pending; key `other`
    /// pending. Returns k's task ids, oldest first.
    fn key_with_a_failed_version(tag: &str) -> Option<(PgManifest, Vec<i64>)> {
        let m = job(tag)?;
        let ids = seed(
            &m,
            &[
                task("k", "v4", 0),
                task("k", "v3", 1),
                task("k", "v2", 2),
                task("k", "v1", 3),
                task("other", "x", 0),
            ],
        );
        let oldest_first = vec![ids[3], ids[2], ids[1], ids[0]];
        let e = denied();
        for (id, outcome) in [(ids[3], Did::Done), (ids[2], Did::Failed(&e, 1))] {
            did(&m, id, Did::Started);
            did(&m, id, outcome);
        }
        Some((m, oldest_first))
    }

    #[test]
    fn tasks_read_back_exactly_as_listed() {
        let Some(m) = job("read-fields") else { return };
        let etags = [
            Some("\"0123456789abcdef0123456789abcdef\""),
            Some("\"0123456789abcdef0123456789abcdef-12\""),
            None,
        ];
        let times = [
            Some("2024-05-06T07:08:09.000Z"),
            Some("2024-05-06T07:08:09.123Z"),
            None,
        ];
        let classes = [Some("STANDARD"), Some("placement-x"), None];
        let sums = [Some("CRC64NVME"), Some("XXH3"), None];
        let entries: Vec<NewTask> = (0..3)
            .map(|i| NewTask {
                entry: crate::s3::VersionEntry {
                    key: format!("k{i}/ünï cödé\n"),
                    version_id: format!("v{i}"),
                    is_delete_marker: i == 2,
                    is_latest: i != 1,
                    size: [0, 5 << 40, 7][i],
                    etag: etags[i].map(str::to_string),
                    last_modified: times[i].map(str::to_string),
                    storage_class: classes[i].map(str::to_string),
                    checksum_algorithm: sums[i].map(str::to_string),
                },
                history_pos: 0,
                dest: i as i64,
            })
            .collect();
        let ids = seed(&m, &entries);
        let groups = all_keys(&m);
        assert_eq!(groups.len(), 3);
        for ((g, n), id) in groups.iter().zip(&entries).zip(&ids) {
            let t = &g.tasks[0];
            assert_eq!(
                &t.entry, &n.entry,
                "the task keeps its listing entry as listed"
            );
            assert_eq!(
                (t.id, t.dest, g.key.as_str()),
                (*id, n.dest, n.entry.key.as_str())
            );
            assert_eq!(
                (t.state, t.attempts, t.stream_only, t.version_to_learn),
                (State::Pending, 0, false, false)
            );
            assert_eq!((t.upload_id.as_deref(), t.attempt_stamped), (None, None));
            assert_eq!(m.tasks_of_key(&n.entry.key).unwrap(), g.tasks);
        }
        assert!(m.tasks_of_key("none").unwrap().is_empty());
        // Flags and run columns decode as SQLite's do.
        sql(
            &m,
            "UPDATE task SET flags = flags | $2, attempts = 2, started_at = 77,
             dest_version_id = 'dv', error_class = 2 WHERE id = $1",
            &[ids[1], STREAM_ONLY | VERSION_TO_LEARN | 1024 | 2048],
        );
        did(&m, ids[1], Did::Upload(Some("up")));
        let t = &m.tasks_of_key(&entries[1].entry.key).unwrap()[0];
        assert_eq!(
            (t.stream_only, t.version_to_learn, t.attempt_stamped),
            (true, true, Some(false))
        );
        assert_eq!(
            (t.attempts, t.started_at, t.dest_version_id.as_deref()),
            (2, Some(77), Some("dv"))
        );
        assert_eq!(
            (t.upload_id.as_deref(), t.error_class.as_deref()),
            (Some("up"), Some("throttled"))
        );
        assert_eq!(&t.entry, &entries[1].entry);
    }

    #[test]
    fn key_groups_come_in_key_order_and_skip_finished_keys() {
        let Some(m) = job("read-groups") else { return };
        let n = 2600;
        let page: Vec<NewTask> = (0..n).map(|k| task(&format!("k{k:05}"), "v", 0)).collect();
        let mut ids = Vec::new();
        for chunk in page.chunks(1000) {
            ids.extend(seed(&m, chunk));
        }
        let groups = all_keys(&m);
        assert_eq!(groups.len(), n);
        sql(&m, "UPDATE task SET state = 2 WHERE id < $1", &[ids[2500]]);
        let next = m.next_key_groups(0, 3).unwrap();
        let keys: Vec<&str> = next.iter().map(|g| g.key.as_str()).collect();
        assert_eq!(keys, ["k02500", "k02501", "k02502"]);
        let rest = m.next_key_groups(next[2].key_id, 1000).unwrap();
        assert_eq!(rest.len(), 97);
        assert!(rest.windows(2).all(|w| w[0].key_id < w[1].key_id));
        assert!(m.next_key_groups(0, 0).unwrap().is_empty());
        // A failed task put back in the queue is found again.
        did(&m, ids[10], Did::Failed(&denied(), 0));
        assert_eq!(m.next_key_groups(0, 1).unwrap()[0].key, "k02500");
        m.retry_failed().unwrap();
        assert_eq!(m.next_key_groups(0, 1).unwrap()[0].key, "k00010");
    }

    #[test]
    fn a_key_is_listing_open_while_its_part_may_add_to_it() {
        let Some(m) = job("read-open") else { return };
        seed(
            &m,
            &[task("a", "2", 0), task("a", "1", 1), task("b", "1", 0)],
        );
        let p = m.listing_progress().unwrap();
        assert_eq!((p.complete, p.open_keys.len()), (false, 0));
        sql(
            &m,
            "UPDATE partitions SET last_key = 'b', pages = 1, entries = 3 WHERE id = 0",
            &[],
        );
        sql(
            &m,
            "INSERT INTO partitions (id, start_key, complete, pages, entries, last_key)
             VALUES (1, 'm', true, 2, 5, 'z')",
            &[],
        );
        let p = m.listing_progress().unwrap();
        assert_eq!(
            p,
            ListingProgress {
                complete: false,
                open_keys: vec!["b".into()],
                entries: 8,
                pages: 3,
            }
        );
        let g = all_keys(&m);
        assert_eq!(
            g.iter()
                .map(|g| (g.key.as_str(), g.listing_open, g.tasks.len()))
                .collect::<Vec<_>>(),
            [("a", false, 2), ("b", true, 1)]
        );
        assert_eq!(g[0].tasks[0].entry.version_id, "1", "oldest first");
        let c = m.counts().unwrap();
        assert_eq!((c.listing_complete, c.listed_entries), (false, 8));
        sql(&m, "UPDATE partitions SET complete = true", &[]);
        assert!(m.listing_progress().unwrap().complete);
        assert!(m.counts().unwrap().listing_complete);
        assert!(!all_keys(&m)[1].listing_open);
    }

    #[test]
    fn open_uploads_and_versions_to_learn_are_listed_until_closed() {
        let Some(m) = job("read-resume") else { return };
        let ids = seed(&m, &[task("k", "1", 0), task("j", "1", 0)]);
        assert!(m.open_uploads().unwrap().is_empty());
        did(&m, ids[0], Did::Started);
        did(&m, ids[0], Did::Upload(Some("u1")));
        let up = m.open_uploads().unwrap();
        assert_eq!(
            up.iter()
                .map(|t| (t.entry.key.as_str(), t.upload_id.as_deref()))
                .collect::<Vec<_>>(),
            [("k", Some("u1"))]
        );
        did(&m, ids[0], Did::Upload(None));
        assert!(m.open_uploads().unwrap().is_empty());
        assert!(m.versions_to_learn().unwrap().is_empty());
        did(&m, ids[1], Did::Done);
        sql(
            &m,
            "UPDATE task SET flags = flags | 32 WHERE id = $1",
            &[ids[1]],
        );
        let learn = m.versions_to_learn().unwrap();
        assert_eq!(learn.len(), 1);
        assert!(learn[0].version_to_learn && learn[0].state == State::Done);
        assert_eq!(learn[0].entry.key, "j");
    }

    /// What `counts()` says equals a recount of the tasks after each kind of change.
    fn check_recount(m: &PgManifest) {
        let c = m.counts().unwrap();
        let rows: Vec<Vec<i64>> =
            m.db.call(|c| {
                let rows = c.query(
                    "SELECT state::bigint, count(*), sum(size)::bigint,
                     sum(flags & 1)::bigint, sum(attempts)::bigint,
                     count(*) FILTER (WHERE flags & 24 = 24),
                     count(*) FILTER (WHERE error_class = 5),
                     count(*) FILTER (WHERE dest_version_id IS NULL)
                     FROM task GROUP BY state",
                    &[],
                )?;
                Ok(rows
                    .iter()
                    .map(|r| (0..8).map(|i| r.get(i)).collect())
                    .collect())
            })
            .unwrap();
        let mut want = Counts {
            listing_complete: c.listing_complete,
            listed_entries: c.listed_entries,
            retries: c.retries,
            blocked: c.blocked,
            requests: c.requests.clone(),
            out_of_order: c.out_of_order,
            ..Default::default()
        };
        for r in rows {
            add_counters(&mut want, r[0], [r[1], r[2], r[3], r[4], r[5], r[6], r[7]]);
        }
        assert_eq!(c, want);
        let open_keys = one(
            m,
            "SELECT count(DISTINCT id >> 24) FROM task WHERE state < 2",
        );
        assert_eq!(all_keys(m).len() as i64, open_keys);
    }

    #[test]
    fn counts_match_a_recount_through_every_resolution() {
        let Some(m) = job("read-recount") else { return };
        let mut page = Vec::new();
        for k in 0..40 {
            for v in 0..(k % 3 + 1) {
                let mut t = task(&format!("key{k:03}"), &format!("v{v}"), v);
                t.entry.size = k * 100 + v;
                t.entry.is_delete_marker = k % 7 == 0 && v == 0;
                page.push(t);
            }
        }
        let ids = seed(&m, &page);
        let e = denied();
        for (i, id) in ids.iter().enumerate() {
            if i % 5 != 4 {
                did(&m, *id, Did::Started);
            }
            let class = [ErrorClass::SourceGone, ErrorClass::Archived][i % 2];
            match i % 5 {
                0 => did(&m, *id, Did::Done),
                1 => did(&m, *id, Did::Failed(&e, 3)),
                2 => did(&m, *id, Did::Skipped(class, "gone")),
                3 => did(&m, *id, Did::Requeued),
                _ => {}
            }
        }
        sql(
            &m,
            "INSERT INTO requests (op, count) VALUES ('CopyObject', 7)",
            &[],
        );
        check_recount(&m);
        let c = m.counts().unwrap();
        assert_eq!(c.retries, 3 * ids.iter().skip(1).step_by(5).count() as u64);
        assert_eq!(c.requests.get("CopyObject"), Some(&7));
        assert!(c.archived > 0 && c.failed > 0 && c.done > 0 && c.skipped > c.archived);
        m.retry_failed().unwrap();
        check_recount(&m);
        let x = error("X", 500);
        for id in ids.iter().step_by(3) {
            did(&m, *id, Did::Failed(&x, 0));
        }
        check_recount(&m);
        m.skip_failed().unwrap();
        check_recount(&m);
        m.retry_skipped().unwrap();
        check_recount(&m);
        sql(&m, "DELETE FROM errors WHERE task = $1", &[ids[1]]);
        sql(&m, "DELETE FROM uploads WHERE task = $1", &[ids[1]]);
        sql(&m, "DELETE FROM task WHERE id = $1", &[ids[1]]);
        check_recount(&m);
    }

    #[test]
    fn a_failed_version_blocks_the_later_ones() {
        let Some((m, _ids)) = key_with_a_failed_version("read-blocked") else {
            return;
        };
        let c = m.counts().unwrap();
        assert_eq!((c.failed, c.blocked, c.pending), (1, 2, 3));
        let mut seen = Vec::new();
        m.for_each_problem(|p| {
            seen.push((p.version_id, p.state, p.error_code));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                ("v2".into(), "failed".into(), Some("AccessDenied".into())),
                ("v3".into(), "blocked".into(), None),
                ("v4".into(), "blocked".into(), None),
            ]
        );
        let p = m.problems(10).unwrap();
        assert!(p[1].message.as_deref().unwrap().contains("v2"), "{p:?}");
        assert_eq!(
            (p[0].error_side, p[0].error_op.as_deref(), p[0].http_status),
            (Some(Side::Dest), Some("CopyObject"), Some(403))
        );
        assert_eq!(
            (p[0].attempts, p[0].error_class.as_deref()),
            (1, Some("fatal"))
        );
        assert_eq!(m.problems(1).unwrap().len(), 1);
        // The next run still sees the failed task with the key's open ones.
        let g = all_keys(&m);
        let k = g.iter().find(|g| g.key == "k").unwrap();
        assert_eq!(k.tasks[1].state, State::Failed);
        assert_eq!(k.tasks[1].error_class.as_deref(), Some("fatal"));
    }

    #[test]
    fn retry_failed_queues_the_failed_version_and_reopens_its_unit() {
        let Some((m, ids)) = key_with_a_failed_version("read-retry") else {
            return;
        };
        sql(&m, "UPDATE units SET state = 3", &[]);
        sql(
            &m,
            "INSERT INTO units (partition, last_key, state) VALUES (0, 'zz', 3)",
            &[],
        );
        assert_eq!(m.retry_failed().unwrap(), 1);
        let c = m.counts().unwrap();
        assert_eq!((c.failed, c.blocked, c.pending), (0, 0, 4));
        let v2 = &m.tasks_of_key("k").unwrap()[1];
        assert_eq!(
            (v2.id, v2.state, v2.attempts),
            (ids[1], State::Pending, 1),
            "attempts kept"
        );
        assert_eq!(
            one(&m, "SELECT count(*) FROM units WHERE state = 0"),
            1,
            "the failed task's unit only"
        );
        assert_eq!(m.retry_failed().unwrap(), 0);
    }

    #[test]
    fn skip_failed_records_why_and_unblocks_the_key() {
        let Some((m, _ids)) = key_with_a_failed_version("read-skip") else {
            return;
        };
        sql(&m, "UPDATE units SET state = 3", &[]);
        assert_eq!(m.skip_failed().unwrap(), 1);
        let c = m.counts().unwrap();
        assert_eq!((c.failed, c.skipped, c.blocked, c.pending), (0, 1, 0, 3));
        let p = m.problems(10).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(
            (p[0].version_id.as_str(), p[0].state.as_str()),
            ("v2", "skipped")
        );
        let msg = p[0].message.as_deref().unwrap();
        assert!(
            msg.starts_with(
                "skipped by --skip-failed after: dest: CopyObject failed (AccessDenied"
            ),
            "{msg}"
        );
        assert_eq!(
            (p[0].error_side, p[0].error_code.as_deref()),
            (None, Some("AccessDenied"))
        );
        assert_eq!(one(&m, "SELECT count(*) FROM units WHERE state = 0"), 1);
        // A failed task without a recorded error says so.
        let other = m.tasks_of_key("other").unwrap()[0].id;
        sql(&m, "UPDATE task SET state = 3 WHERE id = $1", &[other]);
        assert_eq!(m.skip_failed().unwrap(), 1);
        let p = m.problems(10).unwrap();
        assert_eq!(
            p[1].message.as_deref(),
            Some("skipped by --skip-failed (no error was recorded)")
        );
    }

    #[test]
    fn retry_skipped_keeps_gone_and_out_of_order_versions_skipped() {
        let Some(m) = job("read-retry-skipped") else {
            return;
        };
        // k: v1 archived (skipped), v2 done after it; j: v1 archived, v2 gone; l: by rule.
        let ids = seed(
            &m,
            &[
                task("k", "v2", 0),
                task("k", "v1", 1),
                task("j", "v2", 0),
                task("j", "v1", 1),
                task("l", "v1", 0),
            ],
        );
        did(&m, ids[0], Did::Done);
        did(&m, ids[1], Did::Skipped(ErrorClass::Archived, "archived"));
        did(&m, ids[2], Did::Skipped(ErrorClass::SourceGone, "gone"));
        did(&m, ids[3], Did::Skipped(ErrorClass::Archived, "archived"));
        did(&m, ids[4], Did::Skipped(ErrorClass::Fatal, "a rule"));
        sql(
            &m,
            "UPDATE errors SET code = 'OutOfOrder' WHERE task = $1",
            &[ids[4]],
        );
        sql(&m, "UPDATE units SET state = 2", &[]);
        let c = m.counts().unwrap();
        assert_eq!((c.skipped, c.archived, c.out_of_order), (4, 2, 1));
        assert_eq!(m.retry_skipped().unwrap(), (1, 1));
        let c = m.counts().unwrap();
        assert_eq!(
            (c.skipped, c.archived, c.pending, c.out_of_order),
            (3, 0, 1, 2)
        );
        let j = m.tasks_of_key("j").unwrap();
        assert_eq!(
            (j[0].state, j[0].error_class.as_deref()),
            (State::Pending, None)
        );
        let k = m.tasks_of_key("k").unwrap();
        assert_eq!(
            (k[0].state, k[0].error_class.as_deref()),
            (State::Skipped, None)
        );
        let p = m.problems(10).unwrap();
        let kept = p.iter().find(|p| p.key == "k").unwrap();
        assert_eq!(kept.error_code.as_deref(), Some(OUT_OF_ORDER));
        assert_eq!(kept.message.as_deref(), Some(RETRIED_OUT_OF_ORDER_WHY));
        assert_eq!(one(&m, "SELECT count(*) FROM units WHERE state = 0"), 1);
        assert_eq!(m.retry_skipped().unwrap(), (0, 0));
    }

    #[test]
    fn two_rules_to_one_bucket_block_per_bucket() {
        use crate::config::{DestOptions, Destination};
        let Some(m) = job("read-buckets") else { return };
        let mut s = settings();
        s.destinations = [("r1", "same"), ("r2", "same"), ("r3", "other")]
            .iter()
            .map(|(rule, bucket)| Destination {
                bucket: bucket.to_string(),
                prefix: String::new(),
                options: DestOptions {
                    rule: rule.to_string(),
                    ..DestOptions::default()
                },
            })
            .collect();
        m.store_settings(&s).unwrap();
        let to = |v: &str, pos: u64, dest: i64| NewTask {
            dest,
            ..task("k", v, pos)
        };
        let ids = seed(&m, &[to("v2", 0, 1), to("v2", 0, 2), to("v1", 1, 0)]);
        did(&m, ids[2], Did::Failed(&denied(), 0));
        let c = m.counts().unwrap();
        assert_eq!(
            (c.failed, c.blocked),
            (1, 1),
            "v2 to 'same' waits behind v1"
        );
        let blocked: Vec<(String, i64)> = m
            .problems(10)
            .unwrap()
            .into_iter()
            .filter(|p| p.state == "blocked")
            .map(|p| (p.version_id, p.dest))
            .collect();
        assert_eq!(blocked, [("v2".to_string(), 1)]);
    }

    #[test]
    fn unknown_states_fail_loudly() {
        let Some(m) = job("read-unknown") else { return };
        let ids = seed(&m, &[task("k", "1", 0), task("k", "0", 1)]);
        did(&m, ids[0], Did::Upload(Some("u")));
        sql(&m, "UPDATE task SET state = 9 WHERE id = $1", &[ids[0]]);
        let bad = |r: Result<()>, want: &str| match r {
            Err(ManifestError::BadState(_, v)) => assert_eq!(v, want),
            other => panic!("{other:?}"),
        };
        bad(m.next_key_groups(0, 10).map(drop), "state 9");
        bad(m.open_uploads().map(drop), "state 9");
        bad(m.problems(10).map(drop), "state 9");
        bad(m.for_each_key(|_, _| {}), "state 9");
        sql(
            &m,
            "UPDATE task SET state = 3, error_class = 42 WHERE id = $1",
            &[ids[0]],
        );
        bad(m.next_key_groups(0, 10).map(drop), "error class 42");
        bad(m.problems(10).map(drop), "error class 42");
        sql(
            &m,
            "UPDATE task SET error_class = NULL WHERE id = $1",
            &[ids[0]],
        );
        sql(
            &m,
            "INSERT INTO errors (task, side) VALUES ($1, 7)",
            &[ids[0]],
        );
        bad(m.problems(10).map(drop), "error side 7");
    }

    #[test]
    fn reports_stream_every_row_in_batches_and_stop_when_asked() {
        let Some(m) = job("read-stream") else { return };
        // More rows than a batch, keys with several tasks across batch ends.
        let mut page = Vec::new();
        for k in 0..1500 {
            for v in 0..(1 + k % 2) {
                page.push(task(&format!("k{k:04}"), &format!("v{v}"), v as u64));
            }
        }
        let ids = seed(&m, &page);
        assert_eq!(ids.len(), 2250);
        for id in ids.iter().step_by(2) {
            did(&m, *id, Did::Done);
        }
        let mut done = Vec::new();
        m.for_each_in_state(State::Done, |k, v, d| {
            done.push((k.to_string(), v.to_string(), d));
            Ok(())
        })
        .unwrap();
        assert_eq!(done.len(), 1125);
        assert_eq!(done[0], ("k0000".to_string(), "v0".to_string(), 0));
        assert!(done.windows(2).all(|w| w[0] < w[1] || w[0].0 == w[1].0));
        let mut keys = Vec::new();
        m.for_each_key(|k, ts| {
            keys.push((k.to_string(), ts.len(), ts[0].entry.version_id.clone()))
        })
        .unwrap();
        assert_eq!(keys.len(), 1500);
        assert_eq!(
            keys[1],
            ("k0001".to_string(), 2, "v1".to_string()),
            "oldest first"
        );
        assert_eq!(keys.iter().map(|k| k.1).sum::<usize>(), 2250);
        // A stream that fails stops the read and says what failed; the connection is
        // usable after it.
        sql(&m, "UPDATE task SET state = 3, error_class = 3", &[]);
        let mut seen = 0;
        let r = m.for_each_problem(|_| {
            seen += 1;
            match seen {
                1500 => Err(std::io::Error::other("disk full")),
                _ => Ok(()),
            }
        });
        match r {
            Err(ManifestError::Io { what, source, .. }) => {
                assert_eq!(
                    (what, source.to_string().as_str()),
                    ("writing problems out", "disk full")
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(seen, 1500);
        assert_eq!(m.problems(3).unwrap().len(), 3);
        assert_eq!(m.counts().unwrap().failed, 2250);
    }

    #[test]
    fn etag_changes_name_their_reason() {
        let Some(m) = job("read-etags") else { return };
        let ids = seed(
            &m,
            &[task("a", "1", 0), task("b", "1", 0), task("c", "1", 0)],
        );
        for id in &ids {
            did(&m, *id, Did::Done);
        }
        // a: copied whole, ETag changed; b: in parts, changed; c: preserved.
        sql(
            &m,
            "UPDATE task SET flags = flags | 8, method = 1 WHERE id = $1",
            &[ids[0]],
        );
        sql(
            &m,
            "UPDATE task SET flags = flags | 8, method = 2 WHERE id = $1",
            &[ids[1]],
        );
        sql(
            &m,
            "UPDATE task SET flags = flags | 24, method = 2 WHERE id = $1",
            &[ids[2]],
        );
        let changes = m.etag_changes().unwrap();
        let want: BTreeMap<String, u64> = [
            (etag_change_reason(Some(CopyMethod::Copy)).to_string(), 1),
            (
                etag_change_reason(Some(CopyMethod::MultipartCopy)).to_string(),
                1,
            ),
        ]
        .into();
        assert_eq!(changes, want);
        assert_eq!(m.counts().unwrap().etag_preserved, 1);
    }

    /// `status` reads kept counters: with sequential scans priced out, none of the
    /// statements of `counts()` reads the tasks but by an index, nor does the search for the
    /// next keys with open tasks.
    #[test]
    fn counts_and_key_search_read_no_task_scan() {
        let Some((m, _ids)) = key_with_a_failed_version("read-plans") else {
            return;
        };
        let blocked = format!("WITH {GROUPS_CTE}, {BLOCKED_SQL}");
        let open = OPEN_KEYS_SQL.replace("$1", "1").replace("$2", "10");
        for sql in [
            COUNTERS_SQL,
            TOTALS_SQL,
            PARTITIONS_SQL,
            REQUESTS_SQL,
            OUT_OF_ORDER_SQL,
            &blocked,
            &open,
        ] {
            let explain = format!("EXPLAIN {sql}");
            let plan: Vec<String> =
                m.db.call(move |c| {
                    c.batch_execute("SET enable_seqscan = off")?;
                    let rows = c.query(&explain, &[])?;
                    c.batch_execute("RESET enable_seqscan")?;
                    rows.iter().map(|r| r.try_get(0)).collect()
                })
                .unwrap();
            let plan = plan.join("\n");
            assert!(!plan.contains("Seq Scan on task"), "{sql}: {plan}");
            if sql.contains("FROM task") {
                assert!(plan.contains("Index Scan"), "{sql}: {plan}");
            }
        }
    }

    #[test]
    fn estimate_facts_read_back() {
        let Some(m) = job("read-facts") else { return };
        assert!(m.estimate_facts().unwrap().is_empty());
        sql(
            &m,
            "INSERT INTO estimate_facts (name, value) VALUES ('profile', 'aws'), ('rtt', '12')",
            &[],
        );
        let facts = m.estimate_facts().unwrap();
        assert_eq!(facts.get("profile").map(String::as_str), Some("aws"));
        assert_eq!(facts.len(), 2);
    }

    #[test]
    fn the_running_workers_make_the_run_progress() {
        let Some(m) = job("read-progress") else {
            return;
        };
        assert_eq!(m.run_progress().unwrap(), None);
        let ids = seed(
            &m,
            &(0..10)
                .map(|k| task(&format!("k{k}"), "v", 0))
                .collect::<Vec<_>>(),
        );
        for id in &ids[..4] {
            did(&m, *id, Did::Done);
        }
        let now = one(&m, "SELECT extract(epoch FROM now())::bigint");
        let worker = |pid: i64, beat: i64, stopped: Option<i64>, rate: f64| {
            let sql = "INSERT INTO workers (host, pid, command, started_at, heartbeat_at,
                 stopped_at, tasks_per_sec, bytes_per_sec) VALUES ('h', $1, 'run', $2, $2, $3, $4, $5)";
            m.db.call(move |c| c.execute(sql, &[&pid, &beat, &stopped, &rate, &(rate * 100.0)]))
                .unwrap();
        };
        worker(1, now - 300, None, 50.0); // silent: dead
        worker(2, now - 5, Some(now - 1), 50.0); // stopped
        assert_eq!(m.run_progress().unwrap(), None);
        worker(3, now - 2, None, 1.0);
        worker(4, now - 1, None, 2.0);
        let p = m.run_progress().unwrap().unwrap();
        // The listing goes on: no ETA yet.
        assert_eq!(
            p,
            RunProgress {
                updated_at: now - 1,
                pid: 4,
                tasks_per_sec: Some(3.0),
                bytes_per_sec: Some(300.0),
                eta_secs: None,
            }
        );
        sql(&m, "UPDATE partitions SET complete = true", &[]);
        assert_eq!(
            m.run_progress().unwrap().unwrap().eta_secs,
            Some(2),
            "6 tasks at 3/s"
        );
        for id in &ids[4..] {
            did(&m, *id, Did::Done);
        }
        assert_eq!(m.run_progress().unwrap().unwrap().eta_secs, Some(0));
        // The fleet: every process not stopped, the silent one too.
        sql(
            &m,
            "UPDATE workers SET units = pid * 10, tasks_done = pid",
            &[],
        );
        let fleet = m.workers().unwrap();
        let seen: Vec<(i64, bool, i64, i64, f64)> = fleet
            .iter()
            .map(|w| (w.pid, w.running, w.units, w.tasks_done, w.tasks_per_sec))
            .collect();
        assert_eq!(
            seen,
            [
                (1, false, 10, 1, 50.0),
                (3, true, 30, 3, 1.0),
                (4, true, 40, 4, 2.0)
            ]
        );
        assert!(fleet[0].heartbeat_age_secs >= 300);
        assert_eq!(
            (fleet[2].host.as_str(), fleet[2].command.as_str()),
            ("h", "run")
        );
        assert_eq!(fleet[2].heartbeat_at, now - 1);
    }
}
