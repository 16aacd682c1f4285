//! manifest::writer: the single writer of a running job. One thread owns the connection,
//! applies queued [`Update`]s with cached statements, and commits them in groups (one
//! transaction per group). Reads of the next keys are answered in order with the updates
//! queued before them. If a group fails (its COMMIT included), it is rolled back and the
//! writer stops: every later call returns [`ManifestError::WriterGone`] with the cause, so a
//! run stops instead of going on with updates that are not kept.
//!
//! May call: `codec`, `read` (next key groups), the types of `manifest`.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};
use tokio::sync::oneshot;

use super::codec::{
    attempt_flags, class_code, etag_flags, side_code, ATTEMPT_MODE, ATTEMPT_UNSTAMPED,
    ETAG_CHECKED, ETAG_PRESERVED, STREAM_ONLY, VERSION_TO_LEARN,
};
use super::{CopyMethod, KeyGroup, ManifestError, Result, SqliteManifest, State};
use crate::s3::{ErrorClass, S3Error};

/// What one task's copy made at the destination (made by the copier, kept by
/// [`Outcome::Done`]).
#[derive(Clone, Debug)]
pub struct Copied {
    /// The destination's version id (None for an unversioned destination, or unknown).
    pub dest_version_id: Option<String>,
    /// How it was copied.
    pub method: CopyMethod,
    /// Part size of a multipart copy.
    pub part_size: Option<u64>,
    /// Part count of a multipart copy.
    pub parts: Option<u64>,
    /// Whether the destination ETag equals the source's (multipart).
    pub etag_preserved: Option<bool>,
}

impl Copied {
    /// A copy in one request (no parts).
    pub fn single(dest_version_id: Option<String>, method: CopyMethod) -> Copied {
        Copied {
            dest_version_id,
            method,
            part_size: None,
            parts: None,
            etag_preserved: None,
        }
    }

    /// Done; `to_learn`: its destination version id is learned later (see [`Outcome::Done`]).
    pub fn into_outcome(self, to_learn: bool) -> Outcome {
        Outcome::Done {
            copied: self,
            retries: 0,
            to_learn,
        }
    }
}

/// How a finished task ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Copied (or found copied by reconciliation).
    Done {
        /// What the copy made.
        copied: Copied,
        /// Retries spent.
        retries: u64,
        /// The write's answer named no version id and its HEAD was left out: the id is
        /// learned later from a listing (the task's `VERSION_TO_LEARN` flag until then).
        to_learn: bool,
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
        /// Why: `SourceGone`, `Archived`, or `Fatal` (skipped by the user).
        class: ErrorClass,
        /// The reason shown in reports.
        reason: String,
        /// Retries spent.
        retries: u64,
    },
    /// Back to pending (reconciliation found it was not copied, or the run stopped).
    Requeued,
    /// An archived source version whose restore was asked for (by this run or an earlier
    /// one) and is not complete: back to pending with the error class `Archived` (which
    /// marks it "restore pending"), the attempt taken back (nothing was written). A later
    /// run copies it once the restore is complete; until then its key's later versions to
    /// the same destination bucket wait.
    RestorePending {
        /// What was done and what is awaited, shown in reports.
        reason: String,
    },
}

/// A change sent to the writer.
#[derive(Clone, Debug)]
pub enum Update {
    /// An attempt starts: in progress, one more attempt, its start time.
    Started {
        /// Task id.
        id: i64,
        /// Unix seconds.
        at: i64,
    },
    /// A claim whose attempt did not come (the run stopped first, see
    /// [`Writer::claim_key_groups`]): the task's state and start time from before the claim
    /// come back, and its attempt is taken back.
    Released {
        /// Task id.
        id: i64,
        /// Its state before the claim.
        state: State,
        /// Its start time before the claim.
        started_at: Option<i64>,
        /// The reconciliation mode of its attempt before the claim (`Task::attempt_stamped`).
        attempt_stamped: Option<bool>,
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
    /// This task streams from now on (its server-side copy was denied); kept across runs.
    StreamOnly {
        /// Task id.
        id: i64,
    },
    /// The destination version id of a done task, learned later from a listing (None: it
    /// could not be told; the task stays done without one). Either way it is no longer to
    /// be learned.
    DestVersion {
        /// Task id.
        id: i64,
        /// The destination version id.
        dest_version_id: Option<String>,
    },
    /// Requests made, per S3 operation, added to the job's totals.
    Requests {
        /// (operation, count) pairs.
        counts: Vec<(&'static str, u64)>,
    },
    /// The running run's rate and ETA (None: the run ended), for `status`.
    RunProgress(Option<super::RunProgress>),
}

pub(crate) enum Msg {
    Update(Update, Option<oneshot::Sender<()>>),
    Flush(oneshot::Sender<()>),
    /// Whether other processes hold or may still make work of this job (a shared
    /// manifest; a SQLite file has no others: false).
    WorkLeft(oneshot::Sender<Result<bool>>),
    NextKeys {
        after: i64,
        limit: usize,
        /// Claim each closed group's first task, with this start time.
        claim_at: Option<i64>,
        reply: oneshot::Sender<Result<Vec<KeyGroup>>>,
    },
}

impl Msg {
    /// Someone waits for this message's commit (or answer).
    fn awaited(&self) -> bool {
        !matches!(self, Msg::Update(_, None))
    }
}

/// The single writer of a running job (see the module header). Dropping it (or
/// [`Writer::close`]) commits what is queued.
pub struct Writer {
    tx: mpsc::Sender<Msg>,
    thread: Option<JoinHandle<()>>,
    /// Why the writer stopped, once it did.
    stopped: Arc<Mutex<Option<String>>>,
    /// The reconciliation mode recorded with each attempt started from now on (see
    /// [`Writer::record_attempt_mode`]): 0 none, 1 stamped, 2 unstamped.
    mode: Arc<AtomicU8>,
    /// Whether each task done from now on gets its lag recorded (see
    /// [`Writer::record_lag`]).
    lag: Arc<AtomicBool>,
}

/// Starts the writer thread for `m`.
pub(super) fn start(m: SqliteManifest) -> Writer {
    spawn("manifest-writer", move |shared| writer_loop(m, shared))
}

/// What a writer thread shares with its [`Writer`]: the queue, why it stopped, the attempt
/// mode and the lag switch (see [`Writer::record_attempt_mode`], [`Writer::record_lag`]).
pub(crate) struct Shared {
    pub(crate) rx: mpsc::Receiver<Msg>,
    pub(crate) stopped: Arc<Mutex<Option<String>>>,
    pub(crate) mode: Arc<AtomicU8>,
    pub(crate) lag: Arc<AtomicBool>,
}

impl Shared {
    /// The reconciliation mode recorded with an attempt that starts now (None: none).
    pub(crate) fn mode(&self) -> Option<bool> {
        match self.mode.load(Ordering::SeqCst) {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }

    /// Records why the writer stopped: every later call on the [`Writer`] returns it.
    pub(crate) fn stop(&self, why: &str) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.to_string());
    }
}

/// Starts a writer thread named `name` running `body` (a backend's loop over the queue).
pub(crate) fn spawn(name: &str, body: impl FnOnce(Shared) + Send + 'static) -> Writer {
    let (tx, rx) = mpsc::channel::<Msg>();
    let stopped = Arc::new(Mutex::new(None));
    let mode = Arc::new(AtomicU8::new(0));
    let lag = Arc::new(AtomicBool::new(false));
    let shared = Shared {
        rx,
        stopped: stopped.clone(),
        mode: mode.clone(),
        lag: lag.clone(),
    };
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || body(shared))
        .expect("spawn the manifest writer thread");
    Writer {
        tx,
        thread: Some(thread),
        stopped,
        mode,
        lag,
    }
}

impl Writer {
    fn stop_reason(&self) -> Option<String> {
        self.stopped
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn gone(&self) -> ManifestError {
        ManifestError::WriterGone(self.stop_reason().unwrap_or_else(|| "it was closed".into()))
    }

    fn queue(&self, msg: Msg) -> Result<()> {
        if let Some(why) = self.stop_reason() {
            return Err(ManifestError::WriterGone(why));
        }
        self.tx.send(msg).map_err(|_| self.gone())
    }

    /// Records with every attempt started from now on (`Started`, claims) whether its
    /// writes carry the stamp, so that an attempt in doubt is reconciled with the mode it
    /// wrote with (`Task::attempt_stamped`) even when the job's setting changed since.
    pub fn record_attempt_mode(&self, stamped: bool) {
        self.mode
            .store(if stamped { 1 } else { 2 }, Ordering::SeqCst);
    }

    /// Records, for every task done from now on, its lag (the commit's time − the source
    /// version's last-modified), in the transaction of its `Done`: `follow` does.
    pub fn record_lag(&self, on: bool) {
        self.lag.store(on, Ordering::SeqCst);
    }

    /// Queues an update; it is committed with the next group. An error once the writer has
    /// stopped (a commit failed): the run must stop.
    pub fn send(&self, u: Update) -> Result<()> {
        self.queue(Msg::Update(u, None))
    }

    /// Queues an update and waits until it is committed.
    pub async fn send_durable(&self, u: Update) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.queue(Msg::Update(u, Some(tx)))?;
        rx.await.map_err(|_| self.gone())
    }

    /// The next key groups after key id `after_key_id` (see [`Manifest::next_key_groups`]),
    /// read after every update queued before this call.
    pub async fn next_key_groups(&self, after_key_id: i64, limit: usize) -> Result<Vec<KeyGroup>> {
        self.read_groups(after_key_id, limit, None).await
    }

    /// [`Writer::next_key_groups`] for a run that copies them now: in the same transaction,
    /// the first task a key worker will attempt in each group whose history is listed is
    /// marked in progress with start time `at` (one attempt more), and named in
    /// [`KeyGroup::claimed`]. The tasks read keep their state from before the claim. A claim
    /// whose attempt never comes (a kill, a stop) is reconciled like any attempt in doubt.
    pub async fn claim_key_groups(
        &self,
        after_key_id: i64,
        limit: usize,
        at: i64,
    ) -> Result<Vec<KeyGroup>> {
        self.read_groups(after_key_id, limit, Some(at)).await
    }

    async fn read_groups(
        &self,
        after: i64,
        limit: usize,
        claim_at: Option<i64>,
    ) -> Result<Vec<KeyGroup>> {
        let (tx, rx) = oneshot::channel();
        self.queue(Msg::NextKeys {
            after,
            limit,
            claim_at,
            reply: tx,
        })?;
        rx.await.map_err(|_| self.gone())?
    }

    /// Whether work of this job is still held by other processes, or may still be made
    /// (units leased to others, or listed parts not yet past them): a run on a shared
    /// manifest that found nothing to claim waits and claims again while this is true. A
    /// SQLite manifest has one process: false.
    pub async fn work_left(&self) -> Result<bool> {
        let (tx, rx) = oneshot::channel();
        self.queue(Msg::WorkLeft(tx))?;
        rx.await.map_err(|_| self.gone())?
    }

    /// Waits until everything queued before this call is committed.
    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.queue(Msg::Flush(tx))?;
        rx.await.map_err(|_| self.gone())
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

/// Updates applied per transaction at most.
const GROUP: usize = 2000;

/// How long a group that nobody waits for stays open for more updates: fewer commits (each
/// one syncs the file), at the cost of the last few milliseconds of results when the
/// process is killed (those tasks are reconciled by the next run).
const LINGER: Duration = Duration::from_millis(20);

/// [`LINGER`] where starts are not durable (see [`next_group`]): fewer commits. Against 100
/// ms, 500 ms cuts the database CPU per task with 4 workers from about 0.06 ms to 0.04 ms
/// (`benches/many_machines.rs`). A stopped worker leaves up to that much of results
/// unrecorded, which the unit's next owner adopts (reconciliation).
const LINGER_UNITS: Duration = Duration::from_millis(500);

/// While a group lingers, the queue is read every `POLL`: the thread sleeps instead of
/// waiting on the channel, so senders do not wake it for every update, and an update that
/// is waited for is committed within `POLL`.
const POLL: Duration = Duration::from_millis(1);

/// The next group: what is queued, and, while nobody waits for any of it, what comes
/// within [`LINGER`]. Without `durable_starts` an attempt's start is answered on arrival
/// and committed with the group (a backend whose re-claimed work is in doubt as a whole:
/// PostgreSQL's units), and a group lingers [`LINGER_UNITS`]: a result lost with the process
/// costs a reconciliation there, not a durable start.
pub(crate) fn next_group(rx: &mpsc::Receiver<Msg>, durable_starts: bool) -> Option<Vec<Msg>> {
    let take = |msg: Msg| match msg {
        Msg::Update(u @ Update::Started { .. }, Some(ack)) if !durable_starts => {
            let _ = ack.send(());
            Msg::Update(u, None)
        }
        other => other,
    };
    let first = take(rx.recv().ok()?);
    let mut awaited = first.awaited();
    let mut batch = vec![first];
    let until = Instant::now() + if durable_starts { LINGER } else { LINGER_UNITS };
    loop {
        while batch.len() < GROUP {
            match rx.try_recv() {
                Ok(msg) => {
                    let msg = take(msg);
                    awaited |= msg.awaited();
                    batch.push(msg);
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return Some(batch),
            }
        }
        if awaited || batch.len() >= GROUP || Instant::now() >= until {
            return Some(batch);
        }
        std::thread::sleep(POLL);
    }
}

fn writer_loop(m: SqliteManifest, shared: Shared) {
    while let Some(batch) = next_group(&shared.rx, true) {
        let lag = shared.lag.load(Ordering::SeqCst);
        let mode = shared.mode();
        let mut acks = Vec::new();
        let mut reads = Vec::new();
        let result = m.write_tx(|tx| {
            for msg in batch {
                match msg {
                    Msg::Update(u, ack) => {
                        apply(tx, &u, mode)?;
                        if let Update::Finished {
                            id,
                            outcome: Outcome::Done { .. },
                        } = &u
                        {
                            if lag {
                                super::follow::record_lag(tx, *id)?;
                            }
                        }
                        acks.extend(ack);
                    }
                    Msg::Flush(ack) => acks.push(ack),
                    Msg::WorkLeft(reply) => {
                        let _ = reply.send(Ok(false));
                    }
                    Msg::NextKeys {
                        after,
                        limit,
                        claim_at,
                        reply,
                    } => {
                        let read = m.next_key_groups(after, limit);
                        let read = match (read, claim_at) {
                            (Ok(mut groups), Some(at)) => {
                                claim(tx, &mut groups, at, mode)?;
                                Ok(groups)
                            }
                            (read, _) => read,
                        };
                        reads.push((reply, read));
                    }
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            // Nothing of the group is kept (rolled back): stop, so that no later update is
            // applied on top of lost ones. Dropped acks and the closed channel tell every
            // caller.
            let why = e.to_string();
            tracing::error!("{why}");
            shared.stop(&why);
            for (reply, _) in reads {
                let _ = reply.send(Err(ManifestError::WriterGone(why.clone())));
            }
            return;
        }
        for a in acks {
            let _ = a.send(());
        }
        for (reply, r) in reads {
            let _ = reply.send(r);
        }
    }
}

/// Marks the first task a key worker will attempt in each listed group in progress (see
/// [`Writer::claim_key_groups`]): the first open task whose destination no failed older
/// task blocks.
fn claim(
    conn: &Connection,
    groups: &mut [KeyGroup],
    at: i64,
    mode: Option<bool>,
) -> rusqlite::Result<()> {
    // Blocking is per destination bucket, as the key worker's: several rules may send one
    // key to the same bucket, each with its own destination id.
    let buckets = super::read::bucket_groups(conn)?;
    for g in groups.iter_mut() {
        if let Some(id) = first_to_claim(g, &buckets) {
            apply(conn, &Update::Started { id, at }, mode)?;
            g.claimed = Some(id);
        }
    }
    Ok(())
}

/// The task a key worker will attempt first in `g` (None while its history may go on on
/// an unlisted page): the first open task whose destination bucket no failed older task
/// blocks. `buckets`: each destination's bucket group (`read::bucket_groups`). Both
/// backends' writers claim with it.
pub(crate) fn first_to_claim(
    g: &KeyGroup,
    buckets: &std::collections::BTreeMap<i64, i64>,
) -> Option<i64> {
    if g.listing_open {
        return None;
    }
    let bucket = |dest: i64| buckets.get(&dest).copied().unwrap_or(dest);
    let mut blocked = Vec::new();
    g.tasks
        .iter()
        .find(|t| match t.state {
            State::Failed => {
                blocked.push(bucket(t.dest));
                false
            }
            State::Pending | State::InProgress => !blocked.contains(&bucket(t.dest)),
            State::Done | State::Skipped => false,
        })
        .map(|t| t.id)
}

/// `mode`: the reconciliation mode recorded with an attempt that starts (None: none).
fn apply(conn: &Connection, u: &Update, mode: Option<bool>) -> rusqlite::Result<()> {
    let modes = ATTEMPT_MODE | ATTEMPT_UNSTAMPED;
    match u {
        Update::Started { id, at } => conn
            .prepare_cached(
                "UPDATE OR ROLLBACK task SET state = ?2, attempts = attempts + 1, started_at = ?3,
                 flags = CASE WHEN ?4 IS NULL THEN flags ELSE (flags & ?5) | ?4 END
                 WHERE id = ?1",
            )?
            .execute(params![
                id,
                State::InProgress.code(),
                at,
                attempt_flags(mode),
                !modes
            ])
            .map(drop),
        Update::Released {
            id,
            state,
            started_at,
            attempt_stamped,
        } => conn
            .prepare_cached(
                "UPDATE OR ROLLBACK task SET state = ?2, attempts = attempts - 1, started_at = ?3,
                 flags = (flags & ?5) | ?6
                 WHERE id = ?1 AND state = ?4",
            )?
            .execute(params![
                id,
                state.code(),
                started_at,
                State::InProgress.code(),
                !modes,
                attempt_flags(*attempt_stamped).unwrap_or(0)
            ])
            .map(drop),
        Update::Upload {
            id,
            upload_id,
            part_size,
            parts,
        } => conn
            .prepare_cached(
                "INSERT INTO uploads (task, upload_id, part_size, parts) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (task) DO UPDATE SET upload_id = excluded.upload_id,
                 part_size = coalesce(excluded.part_size, part_size),
                 parts = coalesce(excluded.parts, parts)",
            )?
            .execute(params![
                id,
                upload_id,
                part_size.map(|v| v as i64),
                parts.map(|v| v as i64)
            ])
            .map(drop),
        Update::Finished { id, outcome } => finish(conn, *id, outcome),
        Update::StreamOnly { id } => conn
            .prepare_cached("UPDATE OR ROLLBACK task SET flags = flags | ?2 WHERE id = ?1")?
            .execute(params![id, STREAM_ONLY])
            .map(drop),
        Update::DestVersion {
            id,
            dest_version_id,
        } => conn
            .prepare_cached(
                "UPDATE OR ROLLBACK task SET dest_version_id = coalesce(?2, dest_version_id),
                 flags = flags & ?3 WHERE id = ?1",
            )?
            .execute(params![id, dest_version_id, !VERSION_TO_LEARN])
            .map(drop),
        Update::Requests { counts } => {
            let mut stmt = conn.prepare_cached(
                "INSERT INTO requests (op, count) VALUES (?1, ?2)
                 ON CONFLICT (op) DO UPDATE SET count = count + excluded.count",
            )?;
            for (op, n) in counts {
                stmt.execute(params![op, *n as i64])?;
            }
            Ok(())
        }
        Update::RunProgress(p) => super::run_progress::store(conn, p.as_ref()),
    }
}

// Long on purpose: one arm per outcome, each a single statement with its counter changes.
fn finish(conn: &Connection, id: i64, outcome: &Outcome) -> rusqlite::Result<()> {
    let retries = match outcome {
        Outcome::Done { retries, .. } => {
            finish_done(conn, id, outcome)?;
            *retries
        }
        Outcome::Failed { error, retries } => {
            set_ended(conn, id, State::Failed, error.class)?;
            record_error(conn, id, Some(error), &error.to_string())?;
            *retries
        }
        Outcome::Skipped {
            class,
            reason,
            retries,
        } => {
            set_ended(conn, id, State::Skipped, *class)?;
            record_error(conn, id, None, reason)?;
            *retries
        }
        Outcome::Requeued => {
            conn.prepare_cached("UPDATE OR ROLLBACK task SET state = ?2 WHERE id = ?1")?
                .execute(params![id, State::Pending.code()])?;
            0
        }
        Outcome::RestorePending { reason } => {
            conn.prepare_cached(
                "UPDATE OR ROLLBACK task SET state = ?2, error_class = ?3,
                 attempts = max(attempts - 1, 0) WHERE id = ?1",
            )?
            .execute(params![
                id,
                State::Pending.code(),
                class_code(ErrorClass::Archived)
            ])?;
            record_error(conn, id, None, reason)?;
            0
        }
    };
    if retries > 0 {
        conn.prepare_cached("UPDATE totals SET retries = retries + ?1 WHERE id = 1")?
            .execute([retries as i64])?;
    }
    Ok(())
}

/// A copied task: done, its destination version and method, no error, its upload closed
/// (the layout of a multipart copy kept).
fn finish_done(conn: &Connection, id: i64, outcome: &Outcome) -> rusqlite::Result<()> {
    let Outcome::Done {
        copied:
            Copied {
                dest_version_id,
                method,
                part_size,
                parts,
                etag_preserved,
            },
        to_learn,
        ..
    } = outcome
    else {
        return Ok(());
    };
    if *to_learn {
        conn.prepare_cached(super::schema::LEARN_INDEX)?
            .execute([])?;
    }
    conn.prepare_cached(
        "UPDATE OR ROLLBACK task SET state = ?2, dest_version_id = ?3, method = ?4,
         flags = (flags & ?5) | ?6, error_class = NULL WHERE id = ?1",
    )?
    .execute(params![
        id,
        State::Done.code(),
        dest_version_id,
        method.code(),
        !(ETAG_CHECKED | ETAG_PRESERVED | VERSION_TO_LEARN),
        etag_flags(*etag_preserved) | if *to_learn { VERSION_TO_LEARN } else { 0 }
    ])?;
    conn.prepare_cached("DELETE FROM errors WHERE task = ?1")?
        .execute([id])?;
    if part_size.is_none() && parts.is_none() {
        return close_upload(conn, id);
    }
    let layout = Update::Upload {
        id,
        upload_id: None,
        part_size: *part_size,
        parts: *parts,
    };
    apply(conn, &layout, None)
}

fn set_ended(conn: &Connection, id: i64, state: State, class: ErrorClass) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE OR ROLLBACK task SET state = ?2, error_class = ?3 WHERE id = ?1")?
        .execute(params![id, state.code(), class_code(class)])?;
    close_upload(conn, id)
}

fn close_upload(conn: &Connection, id: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE uploads SET upload_id = NULL WHERE task = ?1 AND upload_id IS NOT NULL",
    )?
    .execute([id])
    .map(drop)
}

/// Records a task's last error: an S3 error's fields as they are (side, operation, code,
/// HTTP status: reports read them, never parse them back out of `message`), or, for a
/// reason that is no S3 error (`error` None), only the message.
fn record_error(
    conn: &Connection,
    id: i64,
    error: Option<&S3Error>,
    message: &str,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO errors (task, code, http_status, message, side, op)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (task) DO UPDATE SET code = excluded.code,
         http_status = excluded.http_status, message = excluded.message,
         side = excluded.side, op = excluded.op",
    )?
    .execute(params![
        id,
        error.and_then(|e| e.code.as_deref()),
        error.and_then(|e| e.status).map(i64::from),
        message,
        error.map(|e| side_code(e.side)),
        error.map(|e| e.op),
    ])
    .map(drop)
}
