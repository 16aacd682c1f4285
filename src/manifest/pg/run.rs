//! manifest::pg::run: a run on a PostgreSQL job, shared with any number of other
//! processes. Work is handed out in **units** (whole keys, about a listed page of versions
//! each, made by `plan`), each claimed with `FOR UPDATE SKIP LOCKED` under a new **lease**
//! epoch that expires unless renewed.
//!
//! - The writer (one thread, as SQLite's) answers the scheduler's reads of the next keys
//!   from the units it holds, claiming more when they run out, and commits the run's
//!   updates in groups: one transaction per group, its statements pipelined (one round
//!   trip), never one per version.
//! - **Fencing**: each group's transaction first locks the units this process holds and
//!   checks that each still carries this process's epoch; if one was taken over, nothing
//!   of the group is written and the writer stops (the run ends; the unit's new owner
//!   reconciles what this process wrote, as after a kill).
//! - **Heartbeat**: a thread renews every lease each quarter of the lease time, on the
//!   database's clock, and opens the process's S3 gate (`s3::gate`) until half the lease
//!   time after the renewal was sent; a process that cannot renew (paused, or cut off from
//!   the database) starts no S3 request after that, long before another process may take
//!   its units.
//! - A unit is done when each of its keys was handed out and none of its tasks is open;
//!   at the end of the run the units still held go back: open, or held back when a failed
//!   task blocks the rest (`--retry-failed` / `--skip-failed` reopen them).
//! - A connection lost mid-group (the database restarted) is made again and the group
//!   retried, for as long as the leases last.
//!
//! May call: `pg::read` (task rows), `manifest::writer` (the queue), `s3::gate`, the types
//! of `manifest`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Transaction};

use super::read::{task_of_row, task_select};
use super::{PgError, PgManifest};
use crate::manifest::backend::PgLocation;
use crate::manifest::codec::{
    attempt_flags, class_code, etag_flags, side_code, ATTEMPT_MODE, ATTEMPT_UNSTAMPED,
    ETAG_CHECKED, ETAG_PRESERVED, STREAM_ONLY, VERSION_TO_LEARN,
};
use crate::manifest::pg_error as pg;
use crate::manifest::writer::{first_to_claim, next_group, spawn, Msg, Shared};
use crate::manifest::{Copied, KeyGroup, ManifestError, Outcome, State, Update, Writer};
use crate::s3::{ErrorClass, S3Error};

/// The lease time, in seconds (`S3_BACKFILL_LEASE_SECS`, default 60): a unit whose owner
/// has not renewed for this long may be claimed by another process.
pub fn lease_secs() -> i64 {
    std::env::var("S3_BACKFILL_LEASE_SECS")
        .ok()
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|v| *v >= 2)
        .unwrap_or(60)
}

/// Queues a statement of a group: `op!(ops, SQL, params...)`.
macro_rules! op {
    ($ops:expr, $sql:expr, $($p:expr),* $(,)?) => {
        $ops.push(($sql, vec![$(Box::new($p) as Box<dyn ToSql + Sync + Send>),*]))
    };
}

/// Units claimed at a time.
const CLAIM: i64 = 2;

/// Starts the run's writer on `m` (see the module header).
pub(crate) fn start(m: PgManifest) -> Writer {
    let location = m.location().clone();
    drop(m);
    spawn("manifest-pg-writer", move |shared| {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => return shared.stop(&format!("manifest {}: {e}", location.shown)),
        };
        match rt.block_on(Run::start(location.clone())) {
            Ok(run) => run.serve(&rt, &shared),
            Err(e) => shared.stop(&e.to_string()),
        }
    })
}

/// What this process holds: unit → its lease epoch. Shared with the heartbeat.
type Held = Arc<Mutex<BTreeMap<i64, i64>>>;

/// The writer: its connection, and what it holds (see the module header).
struct Run {
    client: Client,
    /// The connection's prepared statements (made again with a new connection).
    prepared: Prepared,
    work: Work,
    heartbeat: Heartbeat,
}

/// What the writer holds and hands out.
struct Work {
    location: PgLocation,
    worker: i64,
    lease: i64,
    held: Held,
    /// Keys of held units not handed out yet, in order.
    queue: VecDeque<i64>,
    /// The unit of each key of a held unit.
    key_unit: HashMap<i64, i64>,
    /// Per held unit: keys not handed out yet, tasks open (as last read or since).
    units: BTreeMap<i64, UnitCount>,
    /// Each destination's bucket group (the lowest destination id with its bucket).
    buckets: BTreeMap<i64, i64>,
    /// Held units that were claimed before this process's claim: their open tasks are in
    /// doubt (see [`Doubt`]).
    doubt: HashMap<i64, Doubt>,
    /// Starts not written yet: task id → (start time, when it came). A start is written
    /// with its task's result, in the same row update; alone only once it is older than
    /// [`START_KEPT`] (so `status` shows a long copy in progress).
    starts: HashMap<i64, (i64, Instant)>,
}

/// How long a start waits for its task's result before it is written alone.
const START_KEPT: Duration = Duration::from_secs(1);

/// What is known of the earlier attempts at a re-claimed unit's tasks. A run does not wait
/// for an attempt's start to be committed (a group lingers; see `Run::serve`), so every
/// task still open in a unit that an earlier claim held may have been written by its
/// owner, and is reconciled as an attempt in doubt: since the unit's first claim, in the
/// mode its owners wrote with.
#[derive(Clone, Copy, Debug)]
struct Doubt {
    /// When the unit was first claimed (unix seconds).
    since: i64,
    /// Whether its owners wrote with the stamp (Some(false) if any wrote without it; None:
    /// not known, the job's setting decides).
    stamped: Option<bool>,
}

/// A claim's attempt mode as a bit of `units.modes`.
fn mode_bit(mode: Option<bool>) -> i16 {
    match mode {
        Some(true) => 1,
        Some(false) => 2,
        None => 0,
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct UnitCount {
    unhanded: usize,
    open: i64,
    failed: i64,
}

/// What survives a group that was rolled back: the in-memory state before it.
#[derive(Clone)]
struct Snapshot {
    held: BTreeMap<i64, i64>,
    queue: VecDeque<i64>,
    key_unit: HashMap<i64, i64>,
    units: BTreeMap<i64, UnitCount>,
    doubt: HashMap<i64, Doubt>,
    starts: HashMap<i64, (i64, Instant)>,
}

/// Whether the connection is gone or going: closed, or the server shutting down or
/// restarting (SQLSTATE classes 57 operator intervention and 08 connection exception).
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || e.code()
            .is_some_and(|c| c.code().starts_with("57") || c.code().starts_with("08"))
}

/// Whether PostgreSQL asks for the transaction to be tried again (a deadlock's victim, or
/// a serialization failure).
fn transient(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

pub(super) async fn connect(l: &PgLocation) -> Result<Client, String> {
    let (client, conn) = tokio_postgres::connect(&l.url, NoTls)
        .await
        .map_err(|e| pg(&l.shown, e))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let schema = super::schema::schema_of(&l.job);
    client
        .batch_execute(&format!("SET search_path TO {schema}, public"))
        .await
        .map_err(|e| pg(&l.shown, e))?;
    Ok(client)
}

impl Run {
    async fn start(location: PgLocation) -> Result<Run, String> {
        let client = connect(&location).await?;
        let host = hostname();
        let pid = i64::from(std::process::id());
        let row = client
            .query_one(
                "INSERT INTO workers (host, pid, command, started_at, heartbeat_at)
                 VALUES ($1, $2, 'run', extract(epoch FROM now())::bigint,
                         extract(epoch FROM now())::bigint) RETURNING id",
                &[&host, &pid],
            )
            .await
            .map_err(|e| pg(&location.shown, e))?;
        let worker: i64 = row.get(0);
        let buckets = client
            .query(
                "SELECT d1.id, min(d2.id) FROM destinations d1 JOIN destinations d2
                 ON d2.bucket = d1.bucket GROUP BY d1.id",
                &[],
            )
            .await
            .map_err(|e| pg(&location.shown, e))?
            .iter()
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
            .collect();
        let lease = lease_secs();
        let held: Held = Arc::default();
        let heartbeat = Heartbeat::start(location.clone(), worker, lease, held.clone());
        Ok(Run {
            client,
            prepared: Prepared::new(),
            work: Work {
                location,
                worker,
                lease,
                held,
                queue: VecDeque::new(),
                key_unit: HashMap::new(),
                units: BTreeMap::new(),
                buckets,
                doubt: HashMap::new(),
                starts: HashMap::new(),
            },
            heartbeat,
        })
    }

    fn serve(mut self, rt: &tokio::runtime::Runtime, shared: &Shared) {
        while let Some(batch) = next_group(&shared.rx, false) {
            let mode = shared.mode();
            let outcome = loop {
                if let Err(why) = self.heartbeat.gate_open() {
                    break Err(why);
                }
                let before = self.work.snapshot();
                let shown = self.work.location.shown.clone();
                match rt.block_on(self.apply(&batch, mode)) {
                    Ok(reads) => break Ok(reads),
                    Err(Failure::Lost(why)) => break Err(why),
                    Err(Failure::Db(e)) if connection_lost(&e) || self.client.is_closed() => {
                        // The database went away (a restart): the group was not kept;
                        // connect again and apply it again, while the leases last.
                        self.work.restore(before);
                        tracing::warn!("{}; reconnecting", pg(&shown, e));
                        std::thread::sleep(Duration::from_millis(500));
                        if let Ok(c) = rt.block_on(connect(&self.work.location)) {
                            self.client = c;
                            self.prepared.clear();
                        }
                    }
                    Err(Failure::Db(e)) if transient(&e) => {
                        // Chosen as a deadlock's victim: nothing was kept; again.
                        self.work.restore(before);
                        tracing::debug!("{}; trying the group again", pg(&shown, e));
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(Failure::Db(e)) => break Err(pg(&shown, e)),
                    Err(Failure::Bad(why)) => break Err(why),
                }
            };
            match outcome {
                Ok(mut reads) => {
                    for msg in batch {
                        match msg {
                            Msg::Update(_, ack) => {
                                if let Some(a) = ack {
                                    let _ = a.send(());
                                }
                            }
                            Msg::Flush(a) => {
                                let _ = a.send(());
                            }
                            Msg::WorkLeft(reply) => {
                                let left = rt.block_on(self.work.work_left(&self.client));
                                let _ = reply.send(left.map_err(ManifestError::WriterGone));
                            }
                            Msg::NextKeys { reply, .. } => {
                                let _ = reply.send(Ok(reads.remove(0)));
                            }
                        }
                    }
                }
                Err(why) => {
                    tracing::error!("{why}");
                    self.heartbeat.shut(&why);
                    shared.stop(&why);
                    for msg in batch {
                        if let Msg::NextKeys { reply, .. } = msg {
                            let _ = reply.send(Err(ManifestError::WriterGone(why.clone())));
                        }
                    }
                    self.heartbeat.stop();
                    return;
                }
            }
        }
        // The run is over: give the units back (see the module header).
        if let Err(e) = rt.block_on(self.work.release_all(&self.client)) {
            tracing::warn!("{}", pg(&self.work.location.shown, e));
        }
        self.heartbeat.stop();
    }

    /// Applies one group in one transaction (fenced); the reads of the next keys in it.
    async fn apply(
        &mut self,
        batch: &[Msg],
        mode: Option<bool>,
    ) -> Result<Vec<Vec<KeyGroup>>, Failure> {
        let work = &mut self.work;
        let held = work.held_now();
        let tx = self.client.transaction().await?;
        // This connection's counter shard, locked in one order first: a group changes
        // several of its rows (through the task trigger), and another connection of the
        // same shard taking them in another order could deadlock with it.
        tx.execute(
            "SELECT 1 FROM counter_shards WHERE shard = pg_backend_pid() % $1
             ORDER BY state FOR UPDATE",
            &[&(super::schema::COUNTER_SHARDS as i32)],
        )
        .await?;
        fence(&tx, &held).await?;
        let mut ops = Ops::default();
        let now = Instant::now();
        let old: Vec<i64> = work
            .starts
            .iter()
            .filter(|(_, (_, came))| now.duration_since(*came) >= START_KEPT)
            .map(|(id, _)| *id)
            .collect();
        for id in old {
            if let Some((at, _)) = work.starts.remove(&id) {
                ops.update(&Update::Started { id, at }, mode);
            }
        }
        let mut reads = Vec::new();
        let mut done = 0i64;
        for msg in batch {
            match msg {
                Msg::Update(Update::RunProgress(p), _) => {
                    let (tps, bps) = p.as_ref().map_or((0.0, 0.0), |p| {
                        (
                            p.tasks_per_sec.unwrap_or(0.0),
                            p.bytes_per_sec.unwrap_or(0.0),
                        )
                    });
                    op!(
                        ops,
                        "UPDATE workers SET tasks_per_sec = $2, bytes_per_sec = $3 WHERE id = $1",
                        work.worker,
                        tps,
                        bps
                    );
                }
                Msg::Update(Update::Started { id, at }, _) => {
                    work.starts.insert(*id, (*at, now));
                }
                // A start never written needs no undoing.
                Msg::Update(Update::Released { id, .. }, _) if work.starts.remove(id).is_some() => {
                }
                Msg::Update(u, _) => {
                    if let Update::Finished { id, outcome } = u {
                        if matches!(outcome, Outcome::Done { .. }) {
                            done += 1;
                        }
                        if let Some((at, _)) = work.starts.remove(id) {
                            // Folded into the result's statement when that is `Done`.
                            ops.update(&Update::Started { id: *id, at }, mode);
                        }
                    }
                    work.count(u);
                    ops.update(u, mode);
                }
                Msg::Flush(_) | Msg::WorkLeft(_) => {}
                Msg::NextKeys {
                    after,
                    limit,
                    claim_at,
                    ..
                } => {
                    ops.run(&tx, &mut self.prepared).await?;
                    let groups = work.next_keys(&tx, *after, *limit, mode).await?;
                    let groups = match claim_at {
                        Some(at) => work.claim_first(groups, *at),
                        None => groups,
                    };
                    reads.push(groups);
                }
            }
        }
        if done > 0 {
            op!(
                ops,
                "UPDATE workers SET tasks_done = tasks_done + $2 WHERE id = $1",
                work.worker,
                done
            );
        }
        ops.run(&tx, &mut self.prepared).await?;
        work.finish_units(&tx).await?;
        tx.commit().await?;
        Ok(reads)
    }
}

impl Work {
    fn held_now(&self) -> Vec<(i64, i64)> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(u, e)| (*u, *e))
            .collect()
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            held: self.held.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            queue: self.queue.clone(),
            key_unit: self.key_unit.clone(),
            units: self.units.clone(),
            doubt: self.doubt.clone(),
            starts: self.starts.clone(),
        }
    }

    fn restore(&mut self, s: Snapshot) {
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = s.held;
        self.queue = s.queue;
        self.key_unit = s.key_unit;
        self.units = s.units;
        self.doubt = s.doubt;
        self.starts = s.starts;
    }

    /// Counts a finished task against its unit.
    fn count(&mut self, u: &Update) {
        let Update::Finished { id, outcome } = u else {
            return;
        };
        let Some(unit) = self.key_unit.get(&crate::manifest::key_id_of_task(*id)) else {
            return;
        };
        let Some(c) = self.units.get_mut(unit) else {
            return;
        };
        match outcome {
            Outcome::Done { .. } | Outcome::Skipped { .. } => c.open -= 1,
            Outcome::Failed { .. } => {
                c.open -= 1;
                c.failed += 1;
            }
            Outcome::Requeued | Outcome::RestorePending { .. } => {}
        }
    }

    /// The next key groups for the scheduler: a deferred key read again (`limit` 1, a key
    /// of a held unit), else the next keys not handed out yet, claiming units as needed.
    async fn next_keys(
        &mut self,
        tx: &Transaction<'_>,
        after: i64,
        limit: usize,
        mode: Option<bool>,
    ) -> Result<Vec<KeyGroup>, Failure> {
        let ids: Vec<i64> = if limit == 1 && self.key_unit.contains_key(&(after + 1)) {
            vec![after + 1]
        } else {
            while self.queue.len() < limit {
                if self.claim_units(tx, mode).await? == 0 {
                    break;
                }
            }
            let n = limit.min(self.queue.len());
            let ids: Vec<i64> = self.queue.drain(..n).collect();
            for id in &ids {
                if let Some(c) = self.key_unit.get(id).and_then(|u| self.units.get_mut(u)) {
                    c.unhanded = c.unhanded.saturating_sub(1);
                }
            }
            ids
        };
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // The keys' units: the index the tasks are found by.
        let mut units: Vec<i64> = ids
            .iter()
            .filter_map(|k| self.key_unit.get(k))
            .copied()
            .collect();
        units.sort_unstable();
        units.dedup();
        let rows = tx
            .query(
                &task_select(
                    "t.unit = ANY($2) AND t.id >> 24 = ANY($1)",
                    "ORDER BY t.id >> 24, t.refresh, t.history_pos DESC, t.dest, t.id",
                ),
                &[&ids, &units],
            )
            .await?;
        let mut groups: Vec<KeyGroup> = Vec::with_capacity(ids.len());
        for row in &rows {
            let mut task = task_of_row(row).map_err(|e| match e {
                PgError::Pg(e) => Failure::Db(e),
                other => Failure::Bad(format!("manifest {}: {other:?}", self.location.shown)),
            })?;
            let key_id = crate::manifest::key_id_of_task(task.id);
            if let Some(d) = self.key_unit.get(&key_id).and_then(|u| self.doubt.get(u)) {
                in_doubt(&mut task, d);
            }
            match groups.last_mut() {
                Some(g) if g.key_id == key_id => g.tasks.push(task),
                _ => groups.push(KeyGroup {
                    key_id,
                    key: task.entry.key.clone(),
                    tasks: vec![task],
                    listing_open: false,
                    claimed: None,
                }),
            }
        }
        Ok(groups)
    }

    /// Claims up to [`CLAIM`] units (open, or leased and expired, and listed past); their
    /// keys join the queue. A unit claimed before is in doubt (see [`Doubt`]); each claim
    /// adds this run's attempt mode to the unit's. How many were claimed.
    async fn claim_units(
        &mut self,
        tx: &Transaction<'_>,
        mode: Option<bool>,
    ) -> Result<usize, Failure> {
        let rows = tx
            .query(
                "WITH c AS (
                    SELECT u.id, u.claims, u.first_claimed_at, u.modes
                    FROM units u JOIN partitions p ON p.id = u.partition
                    WHERE (u.state = 0 OR (u.state = 1
                           AND u.lease_expires < extract(epoch FROM clock_timestamp())))
                      AND (p.complete OR u.last_key < p.last_key)
                    ORDER BY u.id LIMIT $1 FOR UPDATE OF u SKIP LOCKED)
                 UPDATE units u SET state = 1, lease = nextval('lease_epochs'),
                    lease_expires = extract(epoch FROM clock_timestamp())::bigint + $2,
                    worker = $3, claims = u.claims + 1, modes = u.modes | $4,
                    first_claimed_at = coalesce(u.first_claimed_at,
                        extract(epoch FROM clock_timestamp())::bigint)
                 FROM c WHERE u.id = c.id
                 RETURNING u.id, u.lease, c.claims, u.first_claimed_at, c.modes",
                &[&CLAIM, &self.lease, &self.worker, &mode_bit(mode)],
            )
            .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let units: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            for r in &rows {
                held.insert(r.get(0), r.get(1));
            }
        }
        for r in &rows {
            let (unit, claims, since, modes): (i64, i64, Option<i64>, i16) =
                (r.get(0), r.get(2), r.get(3), r.get(4));
            if claims > 0 {
                let stamped = match modes {
                    m if m & 2 != 0 => Some(false),
                    m if m & 1 != 0 => Some(true),
                    _ => None,
                };
                let since = since.unwrap_or(0);
                self.doubt.insert(unit, Doubt { since, stamped });
            }
        }
        let keys = tx
            .query(
                "SELECT k.id, k.unit, count(t.id) FILTER (WHERE t.state < 2)
                 FROM keys k JOIN task t ON t.unit = k.unit AND t.id >> 24 = k.id
                 WHERE k.unit = ANY($1) GROUP BY k.id, k.unit ORDER BY k.id",
                &[&units],
            )
            .await?;
        for u in &units {
            self.units.insert(*u, UnitCount::default());
        }
        for r in &keys {
            let (key, unit, open): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
            self.queue.push_back(key);
            self.key_unit.insert(key, unit);
            let c = self.units.entry(unit).or_default();
            c.unhanded += 1;
            c.open += open;
        }
        Ok(units.len())
    }

    /// Claims the first task a key worker will attempt in each group (as the SQLite
    /// writer's claim: the first open task no failed older task of the same destination
    /// bucket blocks). Its start is kept with the others (`starts`), not waited for:
    /// the tasks of a unit claimed again are in doubt as a whole (see [`Doubt`]).
    fn claim_first(&mut self, mut groups: Vec<KeyGroup>, at: i64) -> Vec<KeyGroup> {
        for g in groups.iter_mut() {
            if let Some(id) = first_to_claim(g, &self.buckets) {
                self.starts.insert(id, (at, Instant::now()));
                g.claimed = Some(id);
            }
        }
        groups
    }

    /// Units whose keys were all handed out and have nothing open: done, lease dropped.
    async fn finish_units(&mut self, tx: &Transaction<'_>) -> Result<(), Failure> {
        let done: Vec<i64> = self
            .units
            .iter()
            .filter(|(_, c)| c.unhanded == 0 && c.open <= 0)
            .map(|(u, _)| *u)
            .collect();
        if done.is_empty() {
            return Ok(());
        }
        let epochs: Vec<i64> = {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            done.iter()
                .map(|u| held.get(u).copied().unwrap_or(0))
                .collect()
        };
        // Only what is really finished: a task added by a listing since counts too.
        tx.execute(
            "UPDATE units u SET state = 2, lease = NULL, lease_expires = NULL, worker = NULL
             FROM unnest($1::bigint[], $2::bigint[]) AS h(id, lease)
             WHERE u.id = h.id AND u.lease = h.lease
               AND NOT EXISTS (SELECT 1 FROM task t WHERE t.unit = u.id AND t.state < 2)",
            &[&done, &epochs],
        )
        .await?;
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for u in &done {
            held.remove(u);
            self.units.remove(u);
            self.doubt.remove(u);
        }
        self.key_unit.retain(|_, u| !done.contains(u));
        Ok(())
    }

    /// Whether work is left elsewhere: units open but not claimable yet (their part is
    /// still being listed), units leased to other live processes, or parts unlisted.
    async fn work_left(&self, client: &Client) -> Result<bool, String> {
        let row = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM units WHERE state = 0
                        OR (state = 1 AND worker IS DISTINCT FROM $1))
                     OR EXISTS (SELECT 1 FROM partitions WHERE NOT complete)",
                &[&self.worker],
            )
            .await
            .map_err(|e| pg(&self.location.shown, e))?;
        Ok(row.get(0))
    }

    /// Gives every held unit back at the end of the run.
    async fn release_all(&mut self, client: &Client) -> Result<(), tokio_postgres::Error> {
        let held: Vec<(i64, i64)> = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(u, e)| (*u, *e))
            .collect();
        let (units, epochs): (Vec<i64>, Vec<i64>) = held.into_iter().unzip();
        client
            .execute(
                "UPDATE units u SET lease = NULL, lease_expires = NULL, worker = NULL,
                    state = CASE
                        WHEN NOT EXISTS (SELECT 1 FROM task t WHERE t.unit = u.id AND t.state < 2)
                            THEN 2
                        WHEN EXISTS (SELECT 1 FROM task t WHERE t.unit = u.id AND t.state = 3)
                            THEN 3
                        ELSE 0 END
                 FROM unnest($1::bigint[], $2::bigint[]) AS h(id, lease)
                 WHERE u.id = h.id AND u.lease = h.lease",
                &[&units, &epochs],
            )
            .await?;
        client
            .execute(
                "UPDATE workers SET stopped_at = extract(epoch FROM now())::bigint,
                    tasks_per_sec = 0, bytes_per_sec = 0 WHERE id = $1",
                &[&self.worker],
            )
            .await?;
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clear();
        Ok(())
    }
}

/// Why a group was not applied.
enum Failure {
    Db(tokio_postgres::Error),
    Lost(String),
    Bad(String),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Failure {
        Failure::Db(e)
    }
}

/// Marks an open task of a re-claimed unit as an attempt in doubt (see [`Doubt`]): the
/// earliest time and the mode any earlier owner may have written it with.
fn in_doubt(task: &mut crate::manifest::Task, d: &Doubt) {
    if !matches!(task.state, State::Pending | State::InProgress) {
        return;
    }
    task.attempts = task.attempts.max(1);
    task.started_at = Some(task.started_at.map_or(d.since, |t| t.min(d.since)));
    if d.stamped == Some(false) || task.attempt_stamped.is_none() {
        task.attempt_stamped = d.stamped;
    }
}

/// Locks the held units and checks that each still carries this process's epoch.
async fn fence(tx: &Transaction<'_>, held: &[(i64, i64)]) -> Result<(), Failure> {
    if held.is_empty() {
        return Ok(());
    }
    let (units, epochs): (Vec<i64>, Vec<i64>) = held.iter().copied().unzip();
    let rows = tx
        .query(
            "SELECT u.id FROM units u JOIN unnest($1::bigint[], $2::bigint[]) AS h(id, lease)
             ON u.id = h.id WHERE u.lease = h.lease AND u.state = 1 FOR UPDATE OF u",
            &[&units, &epochs],
        )
        .await?;
    if rows.len() == held.len() {
        return Ok(());
    }
    let kept: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let lost: Vec<String> = units
        .iter()
        .filter(|u| !kept.contains(u))
        .map(|u| u.to_string())
        .collect();
    Err(Failure::Lost(format!(
        "lease lost: unit(s) {} were taken over by another process (this one was paused or cut off for longer than the lease); their results are not recorded here, and their new owner reconciles them",
        lost.join(", ")
    )))
}

/// A statement and its parameters, run pipelined with the others of the group.
type Op = (&'static str, Vec<Box<dyn ToSql + Sync + Send>>);

/// The statements of a group, in order. Attempts started and tasks done, the bulk of a
/// group, are gathered into one statement each (arrays), written where the next other
/// statement comes or at the end: a task's start is always applied before its result.
#[derive(Default)]
struct Ops {
    ordered: Vec<Op>,
    started: Vec<i64>,
    started_at: Vec<i64>,
    started_flags: Option<i64>,
    done: Vec<i64>,
    done_version: Vec<Option<String>>,
    done_method: Vec<i16>,
    done_flags: Vec<i64>,
    /// Done tasks whose upload (if any) is closed.
    closed: Vec<i64>,
}

/// Prepared statements of a connection, by their text.
type Prepared = HashMap<&'static str, tokio_postgres::Statement>;

fn code(s: State) -> i16 {
    s.code() as i16
}

impl Ops {
    /// Queues a statement after the gathered ones.
    fn push(&mut self, op: Op) {
        self.gathered();
        self.ordered.push(op);
    }

    /// Turns what was gathered into statements.
    fn gathered(&mut self) {
        // A start whose result is in the same statements is written with the result.
        let mut folded: HashMap<i64, i64> = HashMap::new();
        if !self.started.is_empty() && !self.done.is_empty() {
            let done: std::collections::HashSet<i64> = self.done.iter().copied().collect();
            let (mut ids, mut at) = (Vec::new(), Vec::new());
            for (id, t) in self.started.drain(..).zip(self.started_at.drain(..)) {
                if done.contains(&id) {
                    folded.insert(id, t);
                } else {
                    ids.push(id);
                    at.push(t);
                }
            }
            self.started = ids;
            self.started_at = at;
        }
        if !self.started.is_empty() {
            let modes = ATTEMPT_MODE | ATTEMPT_UNSTAMPED;
            let (ids, at) = (
                std::mem::take(&mut self.started),
                std::mem::take(&mut self.started_at),
            );
            self.ordered.push((
                "UPDATE task t SET state = 1, attempts = t.attempts + 1, started_at = u.at,
                 flags = CASE WHEN $3::bigint IS NULL THEN t.flags ELSE (t.flags & $4) | $3 END
                 FROM unnest($1::bigint[], $2::bigint[]) AS u(id, at) WHERE t.id = u.id",
                vec![
                    Box::new(ids),
                    Box::new(at),
                    Box::new(self.started_flags),
                    Box::new(!modes),
                ],
            ));
        }
        if !self.done.is_empty() {
            let ids = std::mem::take(&mut self.done);
            let at: Vec<Option<i64>> = ids.iter().map(|id| folded.get(id).copied()).collect();
            let modes = ATTEMPT_MODE | ATTEMPT_UNSTAMPED;
            self.ordered.push((
                "UPDATE task t SET state = 2, dest_version_id = u.v, method = u.m,
                 flags = (CASE WHEN u.at IS NULL OR $6::bigint IS NULL THEN t.flags
                          ELSE (t.flags & $7) | $6 END & $5) | u.f,
                 error_class = NULL,
                 attempts = t.attempts + (u.at IS NOT NULL)::int,
                 started_at = coalesce(u.at, t.started_at)
                 FROM unnest($1::bigint[], $2::text[], $3::smallint[], $4::bigint[],
                             $8::bigint[]) AS u(id, v, m, f, at)
                 WHERE t.id = u.id",
                vec![
                    Box::new(ids.clone()),
                    Box::new(std::mem::take(&mut self.done_version)),
                    Box::new(std::mem::take(&mut self.done_method)),
                    Box::new(std::mem::take(&mut self.done_flags)),
                    Box::new(!(ETAG_CHECKED | ETAG_PRESERVED | VERSION_TO_LEARN)),
                    Box::new(self.started_flags),
                    Box::new(!modes),
                    Box::new(at),
                ],
            ));
            self.ordered.push((
                "DELETE FROM errors WHERE task = ANY($1)",
                vec![Box::new(ids)],
            ));
        }
        if !self.closed.is_empty() {
            self.ordered.push((
                "UPDATE uploads SET upload_id = NULL
                 WHERE task = ANY($1) AND upload_id IS NOT NULL",
                vec![Box::new(std::mem::take(&mut self.closed))],
            ));
        }
    }

    /// Runs the statements queued so far, pipelined, in order (each prepared once per
    /// connection).
    async fn run(
        &mut self,
        tx: &Transaction<'_>,
        prepared: &mut Prepared,
    ) -> Result<(), tokio_postgres::Error> {
        self.gathered();
        let ops = std::mem::take(&mut self.ordered);
        for (sql, _) in &ops {
            if !prepared.contains_key(sql) {
                let stmt = tx.prepare(sql).await?;
                prepared.insert(sql, stmt);
            }
        }
        let futures = ops.iter().map(|(sql, params)| {
            let p: Vec<&(dyn ToSql + Sync)> = params
                .iter()
                .map(|b| b.as_ref() as &(dyn ToSql + Sync))
                .collect();
            let stmt = &prepared[sql];
            async move { tx.execute(stmt, &p).await }
        });
        futures::future::try_join_all(futures).await.map(drop)
    }

    fn update(&mut self, u: &Update, mode: Option<bool>) {
        let modes = ATTEMPT_MODE | ATTEMPT_UNSTAMPED;
        match u {
            Update::Started { id, at } => {
                self.started.push(*id);
                self.started_at.push(*at);
                self.started_flags = attempt_flags(mode);
            }
            Update::Released {
                id,
                state,
                started_at,
                attempt_stamped,
            } => op!(
                self,
                "UPDATE task SET state = $2, attempts = attempts - 1, started_at = $3,
                 flags = (flags & $5) | $6 WHERE id = $1 AND state = $4",
                *id,
                code(*state),
                *started_at,
                code(State::InProgress),
                !modes,
                attempt_flags(*attempt_stamped).unwrap_or(0)
            ),
            Update::Upload {
                id,
                upload_id,
                part_size,
                parts,
            } => self.upload(*id, upload_id.clone(), *part_size, *parts),
            Update::Finished { id, outcome } => self.finish(*id, outcome),
            Update::StreamOnly { id } => op!(
                self,
                "UPDATE task SET flags = flags | $2 WHERE id = $1",
                *id,
                STREAM_ONLY
            ),
            Update::DestVersion {
                id,
                dest_version_id,
            } => op!(
                self,
                "UPDATE task SET dest_version_id = coalesce($2, dest_version_id),
                 flags = flags & $3 WHERE id = $1",
                *id,
                dest_version_id.clone(),
                !VERSION_TO_LEARN
            ),
            Update::Requests { counts } => {
                for (op, n) in counts {
                    op!(
                        self,
                        "INSERT INTO requests (op, count) VALUES ($1, $2)",
                        op.to_string(),
                        *n as i64
                    );
                }
            }
            // Written by the group, with this process's worker id (see `Run::apply`).
            Update::RunProgress(_) => {}
        }
    }

    fn upload(
        &mut self,
        id: i64,
        upload_id: Option<String>,
        part_size: Option<u64>,
        parts: Option<u64>,
    ) {
        op!(
            self,
            "INSERT INTO uploads (task, upload_id, part_size, parts) VALUES ($1, $2, $3, $4)
             ON CONFLICT (task) DO UPDATE SET upload_id = excluded.upload_id,
             part_size = coalesce(excluded.part_size, uploads.part_size),
             parts = coalesce(excluded.parts, uploads.parts)",
            id,
            upload_id,
            part_size.map(|v| v as i64),
            parts.map(|v| v as i64)
        );
    }

    fn close_upload(&mut self, id: i64) {
        op!(
            self,
            "UPDATE uploads SET upload_id = NULL WHERE task = $1 AND upload_id IS NOT NULL",
            id
        );
    }

    fn ended(&mut self, id: i64, state: State, class: ErrorClass) {
        op!(
            self,
            "UPDATE task SET state = $2, error_class = $3 WHERE id = $1",
            id,
            code(state),
            class_code(class) as i16
        );
        self.close_upload(id);
    }

    fn error(&mut self, id: i64, error: Option<&S3Error>, message: &str) {
        op!(
            self,
            "INSERT INTO errors (task, code, http_status, message, side, op)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (task) DO UPDATE SET code = excluded.code,
             http_status = excluded.http_status, message = excluded.message,
             side = excluded.side, op = excluded.op",
            id,
            error.and_then(|e| e.code.clone()),
            error.and_then(|e| e.status).map(i64::from),
            message.to_string(),
            error.map(|e| side_code(e.side) as i16),
            error.map(|e| e.op.to_string())
        );
    }

    fn finish(&mut self, id: i64, outcome: &Outcome) {
        let retries = match outcome {
            Outcome::Done {
                copied,
                retries,
                to_learn,
            } => {
                self.done(id, copied, *to_learn);
                *retries
            }
            Outcome::Failed { error, retries } => {
                self.ended(id, State::Failed, error.class);
                self.error(id, Some(error), &error.to_string());
                *retries
            }
            Outcome::Skipped {
                class,
                reason,
                retries,
            } => {
                self.ended(id, State::Skipped, *class);
                self.error(id, None, reason);
                *retries
            }
            Outcome::Requeued => {
                op!(
                    self,
                    "UPDATE task SET state = $2 WHERE id = $1",
                    id,
                    code(State::Pending)
                );
                0
            }
            Outcome::RestorePending { reason } => {
                op!(
                    self,
                    "UPDATE task SET state = $2, error_class = $3,
                     attempts = greatest(attempts - 1, 0) WHERE id = $1",
                    id,
                    code(State::Pending),
                    class_code(ErrorClass::Archived) as i16
                );
                self.error(id, None, reason);
                0
            }
        };
        if retries > 0 {
            op!(
                self,
                "UPDATE totals SET retries = retries + $1 WHERE id = 1",
                retries as i64
            );
        }
    }

    fn done(&mut self, id: i64, c: &Copied, to_learn: bool) {
        self.done.push(id);
        self.done_version.push(c.dest_version_id.clone());
        self.done_method.push(c.method.code() as i16);
        self.done_flags
            .push(etag_flags(c.etag_preserved) | if to_learn { VERSION_TO_LEARN } else { 0 });
        if c.part_size.is_none() && c.parts.is_none() {
            self.closed.push(id);
        } else {
            self.upload(id, None, c.part_size, c.parts);
        }
    }
}

/// This host's name (for `status`).
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_string())
}

/// The lease heartbeat: a thread with a connection of its own (see the module header).
struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    gate: &'static crate::s3::gate::Gate,
}

impl Heartbeat {
    fn start(location: PgLocation, worker: i64, lease: i64, held: Held) -> Heartbeat {
        let half = Duration::from_secs(lease as u64) / 2;
        let gate = crate::s3::gate::install(Instant::now() + half);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("manifest-pg-heartbeat".into())
            .spawn(move || beat(location, worker, lease, held, flag, gate))
            .ok();
        Heartbeat { stop, thread, gate }
    }

    fn gate_open(&self) -> Result<(), String> {
        self.gate.allows()
    }

    fn shut(&self, why: &str) {
        self.gate.shut(why);
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Renews this worker's leases every quarter of the lease time (every second while a
/// renewal fails), opening the gate until half the lease time after each renewal was sent.
fn beat(
    location: PgLocation,
    worker: i64,
    lease: i64,
    held: Held,
    stop: Arc<AtomicBool>,
    gate: &'static crate::s3::gate::Gate,
) {
    let period = Duration::from_millis((lease as u64 * 1000) / 4);
    let half = Duration::from_secs(lease as u64) / 2;
    let mut client: Option<postgres::Client> = None;
    let mut next = Instant::now() + period;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        if Instant::now() < next {
            continue;
        }
        let sent = Instant::now();
        let units: Vec<(i64, i64)> = held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(u, e)| (*u, *e))
            .collect();
        let renewed = renew(&location, &mut client, worker, lease, &units);
        match renewed {
            Ok(0) => {
                gate.open_until(sent + half);
                next = sent + period;
            }
            Ok(_) => {
                gate.shut(
                    "lease lost: some of this process's units were taken over by another process",
                );
                return;
            }
            Err(e) => {
                tracing::warn!("manifest {}: lease renewal failed: {e}", location.shown);
                client = None;
                next = Instant::now() + Duration::from_secs(1);
            }
        }
    }
}

/// One renewal: every held unit's lease extended on the database's clock; how many of
/// them another process took over meanwhile (a unit this process finished or gave back
/// since is not renewed, and not lost either).
fn renew(
    location: &PgLocation,
    client: &mut Option<postgres::Client>,
    worker: i64,
    lease: i64,
    units: &[(i64, i64)],
) -> Result<usize, postgres::Error> {
    if client.is_none() {
        let mut c = postgres::Client::connect(&location.url, postgres::NoTls)?;
        let schema = super::schema::schema_of(&location.job);
        c.batch_execute(&format!("SET search_path TO {schema}, public"))?;
        *client = Some(c);
    }
    let c = client.as_mut().expect("connected above");
    let (ids, epochs): (Vec<i64>, Vec<i64>) = units.iter().copied().unzip();
    let lost: i64 = c
        .query_one(
            "WITH h AS (SELECT * FROM unnest($1::bigint[], $2::bigint[]) AS h(id, lease)),
             renewed AS (
                UPDATE units u
                SET lease_expires = extract(epoch FROM clock_timestamp())::bigint + $3
                FROM h WHERE u.id = h.id AND u.lease = h.lease AND u.state = 1
                RETURNING u.id)
             SELECT count(*) FROM units u JOIN h ON u.id = h.id
             WHERE u.lease IS NOT NULL AND u.lease <> h.lease",
            &[&ids, &epochs, &lease],
        )?
        .get(0);
    c.execute(
        "UPDATE workers SET heartbeat_at = extract(epoch FROM now())::bigint, units = $2
         WHERE id = $1",
        &[&worker, &(units.len() as i64)],
    )?;
    Ok(lost as usize)
}

#[cfg(test)]
mod tests {
    use crate::manifest::store::tests::pg_job;
    use crate::manifest::tests::{done, settings, task};
    use crate::manifest::{Listing, Manifest, State, Update};

    /// Starts are not waited for on PostgreSQL, so a unit claimed again after its owner
    /// died hands out each open task as an attempt in doubt: since the unit's first claim,
    /// in the mode its owner wrote with. The first claim's tasks are not in doubt, and a
    /// task done meanwhile stays done with its one attempt.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_unit_claimed_again_hands_out_its_open_tasks_in_doubt() {
        let Some(job) = pg_job("doubt") else {
            return;
        };
        let mut m = Manifest::open(&job, true).unwrap();
        m.store_settings(&settings()).unwrap();
        let listed = Listing {
            complete: true,
            pages: 1,
            entries: 3,
            ..Listing::default()
        };
        let page = [task("a", "v1", 0), task("b", "v2", 0), task("b", "v1", 1)];
        m.insert_page(&page, &listed).unwrap();
        let Manifest::Pg(pg) = Manifest::open(&job, false).unwrap() else {
            panic!("a PostgreSQL job");
        };

        let first = Manifest::open(&job, false).unwrap().into_writer();
        first.record_attempt_mode(false);
        let groups = first.claim_key_groups(0, 10, 100).await.unwrap();
        let tasks: Vec<_> = groups.iter().flat_map(|g| &g.tasks).collect();
        assert_eq!(tasks.len(), 3);
        assert!(tasks.iter().all(|t| t.attempts == 0), "{tasks:?}");
        let (a, b_v1) = (groups[0].tasks[0].id, groups[1].tasks[0].id);
        assert_eq!(groups[1].claimed, Some(b_v1), "the oldest version first");
        first
            .send(Update::Finished {
                id: a,
                outcome: done(0),
            })
            .unwrap();
        first.flush().await.unwrap();
        // The owner dies: its lease runs out with nothing given back.
        pg.db
            .call(|c| c.execute("UPDATE units SET lease_expires = 0", &[]))
            .unwrap();

        let second = Manifest::open(&job, false).unwrap().into_writer();
        second.record_attempt_mode(true);
        let again = second.claim_key_groups(0, 10, 200).await.unwrap();
        drop(first);
        assert_eq!(again.len(), 2);
        let a_task = &again[0].tasks[0];
        assert_eq!((a_task.state, a_task.attempts), (State::Done, 1));
        let (v1, v2) = (&again[1].tasks[0], &again[1].tasks[1]);
        assert_eq!(v1.entry.version_id, "v1");
        // v1's claim (a start, kept for its result) was never written; v2 never started.
        assert_eq!(v1.attempts, 1, "in doubt: {v1:?}");
        assert_eq!(v1.attempt_stamped, Some(false));
        assert_eq!(v1.started_at, v2.started_at);
        assert_eq!(v2.attempts, 1, "never started here, yet in doubt: {v2:?}");
        assert_eq!(v2.attempt_stamped, Some(false), "the first owner's mode");
        let first_claim = pg
            .db
            .call(|c| c.query_one("SELECT first_claimed_at FROM units", &[]))
            .unwrap()
            .get::<_, Option<i64>>(0);
        assert_eq!(v2.started_at, first_claim);
        assert!(first_claim.is_some());
        drop(second);
    }
}
