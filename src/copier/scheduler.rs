//! copier::scheduler: which task runs when. Keys come from the manifest in batches and run
//! in parallel (at most `concurrency` keys at once); the versions of one key run one at a
//! time, oldest first. A failed version blocks its key's later versions, in this run and in
//! every later one, until the user retries it (`run --retry-failed`) or skips it
//! (`run --skip-failed`): the destination's history is never written out of order.
//!
//! Beside a listing ([`Copier::run_beside_listing`]), the walk copies the keys of committed
//! pages as they arrive. A key the manifest marks `listing_open` (the last key of an
//! unfinished listing part: its older versions may be on the next page) is deferred and
//! read again once more pages are committed; when the walk runs out of keys it waits for
//! the next page. Once the listing is complete, and every key in flight finished, it walks
//! once more from the first key: that catches tasks a listing added to keys already walked
//! (a refresh), and counts the blocked tasks afresh. Each key is in flight at most once.
//!
//! May call: the s3 layer and the manifest (through the copier's writer).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::learn::Pending;
use super::task::{adopted, CopyError, TaskCtx};
use super::{now_secs, Copier, RunSummary};
use crate::events::TaskEvent;
use crate::manifest::{KeyGroup, Outcome, State, Task, Update};
use crate::s3::{show_key, ErrorClass, Restore, S3Client, S3Error};

/// Keys read from the manifest at a time.
const KEY_BATCH: usize = 256;

/// What became of one task in this run.
enum Step {
    /// Finished (done, skipped or failed): the outcome to record.
    Finished(Outcome),
    /// Could not be decided (reconciliation failed): left for the next run.
    InDoubt,
    /// The run is stopping.
    Stopped,
}

/// What the scheduler knows of a listing that runs beside it, sent by whoever drives the
/// lister after each committed page and once more when it stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListingState {
    /// Pages committed so far (a new page may have closed an open key).
    pub pages: u64,
    /// The lister stopped: no more pages come in this run.
    pub finished: bool,
    /// It stopped because the listing is complete (every history is listed).
    pub complete: bool,
}

/// A deferred key that stays open for good in this run (the listing stopped short).
const NEVER: u64 = u64::MAX;

/// The walk over the manifest's keys: its position, the keys in flight, the deferred keys.
struct Walk {
    set: JoinSet<()>,
    /// Keys up to this id were read by the walk.
    after: i64,
    /// Open keys read and not copied yet: key id -> pages committed when last read.
    deferred: BTreeMap<i64, u64>,
}

impl Walk {
    fn new() -> Walk {
        Walk {
            set: JoinSet::new(),
            after: 0,
            deferred: BTreeMap::new(),
        }
    }

    /// Waits for every key in flight.
    async fn drain(&mut self) {
        while self.set.join_next().await.is_some() {}
    }
}

impl<C: S3Client> Copier<C> {
    /// Runs every open task until done, stopped, or aborted. At most `concurrency` keys are
    /// in progress at once (each has at least one request in flight when it runs).
    pub async fn run(self: Arc<Self>) -> RunSummary {
        let mut walk = Walk::new();
        while self.next_batch(&mut walk, NEVER).await == Some(true) {}
        walk.drain().await;
        self.learn_rest().await;
        self.summary()
    }

    /// Whether other processes sharing the manifest still hold work or may still make some
    /// (see `Writer::work_left`); false on a manifest error (said, and the run stops).
    pub async fn work_left(&self) -> bool {
        match self.writer.work_left().await {
            Ok(left) => left,
            Err(e) => {
                self.control.abort(format!("manifest: {e}"));
                false
            }
        }
    }

    /// Runs the open tasks as [`Copier::run`] does, again and again while other processes
    /// sharing the manifest (PostgreSQL) still hold work or may still make some: units
    /// leased to them come back to be claimed when their owner dies (its lease expires),
    /// and a listing in progress elsewhere makes more. With a SQLite manifest, one pass.
    pub async fn run_shared(self: Arc<Self>, poll: std::time::Duration) -> RunSummary {
        loop {
            let summary = self.clone().run().await;
            if self.stopping() {
                return summary;
            }
            match self.writer.work_left().await {
                Ok(true) => {}
                Ok(false) => return summary,
                Err(e) => {
                    self.control.abort(format!("manifest: {e}"));
                    return self.summary();
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = self.until_stopped() => return self.summary(),
            }
        }
    }

    /// Runs the open tasks while a listing goes on beside it (`listing` says when pages are
    /// committed), then, once the listing is complete, walks once more from the first key.
    /// Ends when everything listed is done, or the run stops; keys still open when the
    /// listing stopped short are left for the next run.
    pub async fn run_beside_listing(
        self: Arc<Self>,
        mut listing: watch::Receiver<ListingState>,
    ) -> RunSummary {
        let mut walk = Walk::new();
        let complete = self.live_pass(&mut walk, &mut listing).await;
        walk.drain().await;
        if complete && !self.control.stopping() {
            // Every key of the first pass has finished: none is in flight twice.
            self.progress.reset_blocked();
            let mut sweep = Walk::new();
            while self.next_batch(&mut sweep, NEVER).await == Some(true) {}
            sweep.drain().await;
        }
        self.learn_rest().await;
        self.summary()
    }

    /// The walk while listing: returns whether it ended with a complete listing.
    async fn live_pass(
        self: &Arc<Self>,
        walk: &mut Walk,
        listing: &mut watch::Receiver<ListingState>,
    ) -> bool {
        loop {
            // Read before the manifest: a page committed after this wakes the wait below.
            let state = *listing.borrow_and_update();
            if !self.revisit(walk, state).await {
                return false;
            }
            match self.next_batch(walk, state.pages).await {
                None => return false,
                Some(true) => continue,
                Some(false) if state.finished => return state.complete,
                Some(false) => {}
            }
            tokio::select! {
                r = listing.changed() => {
                    if r.is_err() && !listing.borrow().finished {
                        return false;
                    }
                }
                _ = self.control.until_stopped() => return false,
            }
        }
    }

    /// Reads the next keys of the walk: spawns each one whose history is listed, defers the
    /// open ones (stamped with `pages`). Some(false) when there are no more keys now, None
    /// when the run stops.
    async fn next_batch(self: &Arc<Self>, walk: &mut Walk, pages: u64) -> Option<bool> {
        if self.control.stopping() {
            return None;
        }
        let claimed = self
            .writer
            .claim_key_groups(walk.after, KEY_BATCH, now_secs())
            .await;
        let groups = match claimed {
            Ok(g) => g,
            Err(e) => {
                self.control.abort(format!("manifest: {e}"));
                return None;
            }
        };
        let Some(last) = groups.last() else {
            return Some(false);
        };
        walk.after = last.key_id;
        self.record_requests();
        let mut groups = groups.into_iter();
        while let Some(g) = groups.next() {
            if g.listing_open {
                walk.deferred.insert(g.key_id, pages);
            } else if !self.spawn_key(&mut walk.set, g).await {
                groups.for_each(|g| self.release(&g));
                return None;
            }
        }
        Some(true)
    }

    /// Reads again the deferred keys that more pages may have closed; spawns the closed
    /// ones. False when the run stops.
    async fn revisit(self: &Arc<Self>, walk: &mut Walk, state: ListingState) -> bool {
        let due: Vec<i64> = walk
            .deferred
            .iter()
            .filter(|(_, stamp)| **stamp < state.pages || (state.finished && **stamp != NEVER))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let group = match self.writer.claim_key_groups(id - 1, 1, now_secs()).await {
                Ok(g) => g.into_iter().next().filter(|g| g.key_id == id),
                Err(e) => {
                    self.control.abort(format!("manifest: {e}"));
                    return false;
                }
            };
            match group {
                Some(g) if g.listing_open => {
                    let stamp = if state.finished { NEVER } else { state.pages };
                    walk.deferred.insert(id, stamp);
                }
                Some(g) => {
                    walk.deferred.remove(&id);
                    if !self.spawn_key(&mut walk.set, g).await {
                        return false;
                    }
                }
                // Nothing open any more.
                None => {
                    walk.deferred.remove(&id);
                }
            }
        }
        true
    }

    /// Starts a key's worker once fewer than `concurrency` keys are in flight; false when
    /// the run stops first.
    async fn spawn_key(self: &Arc<Self>, set: &mut JoinSet<()>, g: KeyGroup) -> bool {
        while set.len() >= self.key_concurrency {
            set.join_next().await;
        }
        if self.control.stopping() {
            self.release(&g);
            return false;
        }
        set.spawn(self.clone().key_worker(g));
        true
    }

    /// Gives back a group's claim (see `Writer::claim_key_groups`) when its attempt does
    /// not come in this run.
    fn release(&self, g: &KeyGroup) {
        let Some(t) = g.tasks.iter().find(|t| Some(t.id) == g.claimed) else {
            return;
        };
        self.send(Update::Released {
            id: t.id,
            state: t.state,
            started_at: t.started_at,
            attempt_stamped: t.attempt_stamped,
        });
    }

    /// The run's summary, once every key worker finished.
    fn summary(&self) -> RunSummary {
        self.record_requests();
        let mut s = self.progress.summary();
        s.throttles = self.dest.limiter().throttles();
        s.requests = self.source.requests().total() + self.dest.requests().total();
        s.aborted = self.control.aborted();
        s.limit = self.control.limit();
        s.interrupted = self.control.stopping() && s.aborted.is_none() && s.limit.is_none();
        s
    }

    /// Copies the open tasks of one key, oldest first; a failed one stops the key's later
    /// tasks to the same destination bucket (other destinations go on).
    async fn key_worker(self: Arc<Self>, group: KeyGroup) {
        let mut recorded: HashSet<String> = group
            .tasks
            .iter()
            .filter(|t| t.state == State::Done)
            .filter_map(|t| t.dest_version_id.clone())
            .collect();
        if !self.learn_before(&group, &mut recorded).await {
            self.release(&group);
            return;
        }
        // Destination buckets whose history of this key waits behind a failed version.
        let mut blocked: HashSet<&str> = HashSet::new();
        for (i, task) in group.tasks.iter().enumerate() {
            let dest = self.settings.destination(task.dest);
            let bucket = dest.bucket;
            if blocked.contains(bucket) {
                continue;
            }
            match task.state {
                State::Done | State::Skipped => continue,
                State::Failed => {
                    // Later versions wait: copying them would put the history out of order.
                    self.progress.add_blocked(self.open_after(&group.tasks, i));
                    blocked.insert(bucket);
                    continue;
                }
                State::Pending | State::InProgress => {}
            }
            let ctx = TaskCtx {
                task,
                dest: dest.object(&group.key),
                recorded: &recorded,
                retries: AtomicU64::new(0),
                started_at: now_secs(),
                last_open: !group.tasks[i + 1..].iter().any(|t| {
                    self.settings.destination(t.dest).bucket == bucket
                        && matches!(t.state, State::Pending | State::InProgress)
                }),
                id_to_learn: AtomicBool::new(false),
                claimed: group.claimed == Some(task.id),
                null_by_id: self.source_null_by_id.load(Ordering::Relaxed),
                attempted: AtomicBool::new(group.claimed == Some(task.id)),
            };
            let began = std::time::Instant::now();
            let step =
                crate::events::in_task(&task.entry.key, &task.entry.version_id, self.step(&ctx))
                    .await;
            let retries = ctx.retries.load(Ordering::Relaxed);
            self.progress.add_retries(retries);
            let outcome = match step {
                Step::Finished(o) => with_retries(o, retries),
                Step::InDoubt | Step::Stopped => {
                    // Nothing was written for it in this run.
                    if ctx.claimed {
                        self.release(&group);
                    }
                    return;
                }
            };
            // A version waiting for its restore holds back the key's later versions to the
            // same bucket, as a failed one does: the history is never written out of order.
            let failed = matches!(
                outcome,
                Outcome::Failed { .. } | Outcome::RestorePending { .. }
            );
            let learn = matches!(outcome, Outcome::Done { to_learn: true, .. })
                .then(|| Pending::of(task, bucket, ctx.dest.key.clone()));
            let event = crate::events::json()
                .then(|| {
                    let attempts = task.attempts.max(0) as u64
                        + u64::from(ctx.attempted.load(Ordering::Relaxed));
                    let dest = (bucket, ctx.dest.key.as_str());
                    TaskEvent::of(task, &outcome, dest, began.elapsed(), attempts)
                })
                .flatten();
            drop(ctx);
            if let Some(e) = event {
                crate::events::emit(crate::events::Event::Task(e));
            }
            if let Outcome::Done { copied, .. } = &outcome {
                if let Some(v) = &copied.dest_version_id {
                    recorded.insert(v.clone());
                }
            }
            self.finish(task, outcome);
            if let Some(p) = learn {
                self.learn_later(p);
            }
            if failed {
                self.progress.add_blocked(self.open_after(&group.tasks, i));
                blocked.insert(bucket);
            }
        }
    }

    /// One task: reconcile an earlier attempt, mark the start durably, copy.
    async fn step(&self, ctx: &TaskCtx<'_>) -> Step {
        if self.control.stopping() || self.over_limit() {
            return Step::Stopped;
        }
        if ctx.task.attempts > 0 {
            let found = match self.reconcile_earlier_attempt(ctx).await {
                Ok(Some(v)) => self
                    .repair_adopted(ctx, v.as_deref())
                    .await
                    .map(|_| Some(v)),
                other => other,
            };
            match found {
                Ok(Some(v)) => return Step::Finished(adopted(v)),
                Ok(None) => {}
                Err(e) if crate::s3::gate::refused(&e) => return self.lease_lost(&e),
                Err(e) => {
                    // Cannot tell whether it was copied; writing now could make a duplicate.
                    self.progress.say(format!(
                        "in doubt, left for the next run: {} version {}: {e}",
                        show_key(&ctx.task.entry.key),
                        ctx.task.entry.version_id
                    ));
                    return Step::InDoubt;
                }
            }
        }
        let started = Update::Started {
            id: ctx.task.id,
            at: ctx.started_at,
        };
        if !ctx.claimed {
            if let Err(e) = self.writer.send_durable(started).await {
                self.control.abort(format!("manifest: {e}"));
                return Step::Stopped;
            }
            ctx.attempted.store(true, Ordering::Relaxed);
        }
        Step::Finished(match self.copy_task(ctx).await {
            Ok(c) => c.into_outcome(ctx.id_to_learn.load(Ordering::Relaxed)),
            Err(CopyError::S3(e)) if crate::s3::gate::refused(&e) => return self.lease_lost(&e),
            Err(CopyError::S3(e)) if e.class == ErrorClass::Archived => self.archived(ctx, e).await,
            Err(e) => e.into_outcome(),
        })
    }

    /// A request the lease gate refused: the task is not failed (its unit's next owner
    /// reconciles it, as after a kill) and the run stops, saying why once.
    fn lease_lost(&self, e: &S3Error) -> Step {
        self.control.abort(crate::s3::gate::reason(e).to_string());
        Step::Stopped
    }

    /// An archived source version: its restore asked for (`--restore-archived`), or still
    /// awaited (asked for by an earlier run: the task is open with the class `archived`),
    /// or else skipped as archived (the run's summary says how to restore it).
    async fn archived(&self, ctx: &TaskCtx<'_>, error: S3Error) -> Outcome {
        let asked_before = ctx.task.error_class.as_deref() == Some(ErrorClass::Archived.as_str());
        let Some(ask) = &self.restore else {
            if asked_before {
                return Outcome::RestorePending {
                    reason: format!("archived, restore asked for by an earlier run and not complete yet ({error}); run again once it is"),
                };
            }
            return CopyError::S3(error).into_outcome();
        };
        let src = ctx.source(&self.settings.source.bucket);
        let r = self
            .source
            .counting(&ctx.retries)
            .restore_object(&src, ask.days, &ask.tier)
            .await;
        match r {
            Ok(Restore::Requested) => Outcome::RestorePending {
                reason: format!(
                    "archived ({error}): restore asked for ({} days, tier {}); run again once it is complete",
                    ask.days, ask.tier
                ),
            },
            Ok(Restore::InProgress) => Outcome::RestorePending {
                reason: format!(
                    "archived ({error}): a restore is in progress; run again once it is complete"
                ),
            },
            Err(e) => Outcome::Failed {
                error: e,
                retries: 0,
            },
        }
    }

    /// Records a finished task and applies the failure threshold.
    fn finish(&self, task: &Task, outcome: Outcome) {
        if let Some(why) = self.progress.finished(task, &outcome) {
            self.control.abort(why);
        }
        self.send(Update::Finished {
            id: task.id,
            outcome,
        });
        self.over_limit();
    }

    /// Aborts multipart uploads that a killed run left open (their ids are in the manifest).
    pub async fn abort_leftover_uploads(&self, tasks: Vec<Task>) {
        for t in tasks {
            let Some(u) = &t.upload_id else { continue };
            let dest = self.settings.dest_object(t.dest, &t.entry.key);
            let r = self.dest.req().abort_multipart(&dest, u).await;
            if let Err(e) = r {
                tracing::warn!("could not abort upload {u} of {}: {e}", show_key(&dest.key));
                continue;
            }
            self.send(Update::Upload {
                id: t.id,
                upload_id: None,
                part_size: None,
                parts: None,
            });
        }
    }
}

impl<C: S3Client> Copier<C> {
    /// Open tasks after position `i` of a key's tasks to the same destination bucket (they
    /// wait behind a failed one).
    fn open_after(&self, tasks: &[Task], i: usize) -> u64 {
        let bucket = self.settings.destination(tasks[i].dest).bucket;
        tasks[i + 1..]
            .iter()
            .filter(|t| matches!(t.state, State::Pending | State::InProgress))
            .filter(|t| self.settings.destination(t.dest).bucket == bucket)
            .count() as u64
    }
}

/// The outcome with the retries this run spent on its task.
fn with_retries(mut o: Outcome, n: u64) -> Outcome {
    match &mut o {
        Outcome::Done { retries, .. }
        | Outcome::Failed { retries, .. }
        | Outcome::Skipped { retries, .. } => *retries = n,
        Outcome::Requeued | Outcome::RestorePending { .. } => {}
    }
    o
}
