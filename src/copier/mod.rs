//! copier: the run stage, in parts.
//!
//! - [`scheduler`]: reads keys from the manifest in batches (memory does not grow with the
//!   job), runs keys in parallel and each key's versions one at a time, oldest first; a failed
//!   version blocks its key's later versions in this and every later run. It can run beside
//!   a listing ([`ListingState`]): a key is copied once its whole history is listed.
//! - [`reconcile`]: finds what an in-doubt write created at the destination (adopted instead
//!   of written again) and aborts multipart uploads it left.
//! - [`strategy`]: the copy plan (a pure choice) and how each plan is carried out:
//!   server-side `CopyObject`, multipart `UploadPartCopy`, streaming.
//! - [`learn`]: destination version ids a write's answer left out, learned from listings
//!   in batches instead of a HEAD per write.
//! - [`progress`]: counters, the progress bar and the lines printed during a run.
//! - [`task`]: the words of one task in flight (`TaskCtx`, what a copy made), shared by
//!   the others; it imports none of them.
//!
//! Crash safety: a task is marked `in_progress` (durably) before its first write request.
//! A task with an earlier attempt (left in progress by a killed run, or failed and put back
//! with `--retry-failed`), and a write that failed ambiguously, are reconciled against the
//! destination before anything is written again. This relies on one assumption, documented
//! in the README: nothing else writes to the destination keys of a job while it runs.
//!
//! May call: the s3 layer and the manifest.

mod learn;
mod progress;
mod reconcile;
mod scheduler;
mod strategy;
mod task;
#[cfg(test)]
pub(crate) mod tests;

pub use progress::RunSummary;
pub use scheduler::ListingState;
pub use strategy::{
    choose_layout, choose_plan, composite_etag, infer_part_sizes, CopyPlan, Layout, Route,
    SourceUpload, MAX_LAYOUT_TRIES, MEMORY_RESERVE,
};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use indicatif::ProgressBar;

use crate::config::JobSettings;
use crate::manifest::{Update, Writer};
use crate::s3::{RetryPolicy, S3Client, Sides, S3};

/// Seconds of clock difference tolerated between this machine and the destination when
/// deciding whether a destination delete marker was written by an attempt (reconciliation).
pub const CLOCK_SKEW_SECS: i64 = 300;

/// This machine's clock, in unix seconds.
fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Stop the job early when too many tasks fail (as S3 Batch Operations does).
#[derive(Clone, Copy, Debug)]
pub struct FailureThreshold {
    /// Only judge after this many tasks finished in this run.
    pub min_tasks: u64,
    /// Stop when more than this share (percent) of them failed.
    pub percent: f64,
}

impl Default for FailureThreshold {
    fn default() -> Self {
        // S3 Batch Operations fails a job when more than half of the first 1,000 tasks fail.
        FailureThreshold {
            min_tasks: 1000,
            percent: 50.0,
        }
    }
}

/// Options of one `run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Requests in flight at most (and keys in progress at most).
    pub concurrency: usize,
    /// Parts of one object in flight at most.
    pub part_concurrency: usize,
    /// Retry schedule.
    pub policy: RetryPolicy,
    /// Requests per second at most for the whole job.
    pub max_rps: Option<f64>,
    /// Early stop on failures.
    pub failure_threshold: FailureThreshold,
    /// Bytes held between GET and upload at most when streaming (see `strategy::Budget`).
    pub max_memory: u64,
    /// Restore archived source versions (`--restore-archived`): None skips them.
    pub restore: Option<RestoreAsk>,
    /// Hard limits of this run (`--max-requests`, `--max-bytes`, `--max-duration`,
    /// `--max-cost`).
    pub limits: Limits,
}

/// Hard limits of one run: once one is reached, no task starts, the tasks in flight finish
/// (so the overshoot is at most their requests and bytes), and the run ends with the limit
/// named; the next run continues.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Limits {
    /// Requests (both sides, every operation) this run.
    pub max_requests: Option<u64>,
    /// Bytes of copied object versions this run.
    pub max_bytes: Option<u64>,
    /// Wall time of this run.
    pub max_duration: Option<std::time::Duration>,
    /// Dollars of this run's requests and of its bytes across providers (`--max-cost`).
    pub max_cost: Option<crate::pricing::CostLimit>,
}

/// What `--restore-archived DAYS --restore-tier TIER` asks of each archived source version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreAsk {
    /// Days the restored copy is kept.
    pub days: u32,
    /// `Bulk`, `Standard` or `Expedited`.
    pub tier: String,
}

/// Default `--max-memory`: 256 MiB.
pub const DEFAULT_MAX_MEMORY: u64 = 256 * 1024 * 1024;

impl RunOptions {
    /// The run's two handles. The one decision about what shares a bound is made here: both
    /// sides, and a listing that runs beside the copy (`replicate`), share one retry loop
    /// whose bound is `--concurrency` (lowered on throttling) and whose pacer is `--max-rps`,
    /// so the flag holds for every request of the job.
    pub fn sides<C: S3Client>(&self, clients: (C, C)) -> Sides<C> {
        Sides::shared(clients, self.policy.clone(), self.concurrency, self.max_rps)
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            concurrency: 32,
            part_concurrency: 8,
            policy: RetryPolicy::default(),
            max_rps: None,
            failure_threshold: FailureThreshold::default(),
            max_memory: DEFAULT_MAX_MEMORY,
            restore: None,
            limits: Limits::default(),
        }
    }
}

/// What a run knows of the destination bucket.
#[derive(Clone, Copy, Debug)]
pub struct DestFacts {
    /// It keeps versions (an unversioned destination is overwritten, so in-doubt tasks are
    /// simply copied again).
    pub versioned: bool,
    /// Object lock is enabled (else lock settings are dropped, said once).
    pub object_lock: bool,
}

/// What a run knows of each destination bucket: destination 0's facts, and those of the
/// other buckets of a replication configuration (each probed on its own: one may keep
/// versions or have object lock and another not).
#[derive(Clone, Debug)]
pub struct DestinationFacts {
    /// The facts of a bucket not listed in `buckets` (the job's `--dest`).
    pub default: DestFacts,
    /// Per destination bucket.
    pub buckets: BTreeMap<String, DestFacts>,
}

impl From<DestFacts> for DestinationFacts {
    fn from(default: DestFacts) -> Self {
        DestinationFacts {
            default,
            buckets: BTreeMap::new(),
        }
    }
}

impl DestinationFacts {
    /// The facts of `bucket`.
    pub fn of(&self, bucket: &str) -> DestFacts {
        self.buckets.get(bucket).copied().unwrap_or(self.default)
    }
}

/// Asks a run to stop, and remembers why it stopped early.
#[derive(Debug, Default)]
struct Control {
    stopping: AtomicBool,
    aborted: Mutex<Option<String>>,
    /// The hard limit that stopped the run.
    limit: Mutex<Option<String>>,
    /// Wakes those waiting for the stop (a listing beside the run, the scheduler's wait).
    stopped: tokio::sync::Notify,
}

impl Control {
    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stopped.notify_waiters();
    }

    /// Returns once the run is asked to stop.
    async fn until_stopped(&self) {
        loop {
            let notified = self.stopped.notified();
            tokio::pin!(notified);
            // Registered before the flag is read: a stop in between still wakes it.
            notified.as_mut().enable();
            if self.stopping() {
                return;
            }
            notified.await;
        }
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn abort(&self, why: String) {
        self.aborted.lock().expect("abort lock").get_or_insert(why);
        self.stop();
    }

    fn aborted(&self) -> Option<String> {
        self.aborted.lock().expect("abort lock").clone()
    }

    fn reach_limit(&self, why: String) {
        let mut limit = self.limit.lock().expect("limit lock");
        if limit.is_none() {
            crate::events::limit(&why);
            *limit = Some(why);
        }
        drop(limit);
        self.stop();
    }

    fn limit(&self) -> Option<String> {
        self.limit.lock().expect("limit lock").clone()
    }
}

/// The replication engine of one run: what every key worker shares.
pub struct Copier<C: S3Client> {
    settings: JobSettings,
    source: S3<C>,
    dest: S3<C>,
    /// Every destination bucket's facts (see [`Copier::facts`]).
    all_facts: DestinationFacts,
    part_concurrency: usize,
    key_concurrency: usize,
    writer: Writer,
    control: Control,
    progress: progress::Progress,
    requests_sent: Mutex<BTreeMap<&'static str, u64>>,
    lock_warned: AtomicBool,
    stream_said: AtomicBool,
    /// The source bucket has or had versioning (see [`Copier::set_source_facts`]).
    source_null_by_id: AtomicBool,
    /// Whether the destination's server keeps a multipart source's ETag on CopyObject, as
    /// this run found (see `strategy::WholeCopy`).
    whole_copy: strategy::WholeCopy,
    /// Whether the source bucket has object lock, read once (see `strategy::one_request`).
    source_lock: tokio::sync::OnceCell<bool>,
    /// Bytes of streamed bodies held at once (see `strategy::Budget`).
    memory: strategy::Budget,
    /// Destination version ids to learn from listings (see [`learn`]).
    learner: learn::Learner,
    /// `--restore-archived`.
    restore: Option<RestoreAsk>,
    /// This run's hard limits, and when it started.
    limits: Limits,
    started: std::time::Instant,
}

impl<C: S3Client> Copier<C> {
    /// Sets up a run: `sides.source` reads the source, `sides.dest` writes the destination
    /// (and reads the source in server-side copies); see [`RunOptions::sides`].
    pub fn new(
        settings: JobSettings,
        sides: Sides<C>,
        dest_facts: impl Into<DestinationFacts>,
        writer: Writer,
        opts: &RunOptions,
        bar: ProgressBar,
    ) -> std::sync::Arc<Self> {
        let Sides { source, dest } = sides;
        let all_facts: DestinationFacts = dest_facts.into();
        writer.record_attempt_mode(settings.copy.stamp);
        std::sync::Arc::new(Copier {
            settings,
            source,
            dest,
            all_facts,
            part_concurrency: opts.part_concurrency.max(1),
            key_concurrency: opts.concurrency.max(1),
            writer,
            control: Control::default(),
            progress: progress::Progress::new(bar, opts.failure_threshold),
            requests_sent: Mutex::new(BTreeMap::new()),
            lock_warned: AtomicBool::new(false),
            stream_said: AtomicBool::new(false),
            source_null_by_id: AtomicBool::new(false),
            whole_copy: strategy::WholeCopy::default(),
            source_lock: tokio::sync::OnceCell::new(),
            memory: strategy::Budget::new(opts.max_memory),
            learner: learn::Learner::default(),
            restore: opts.restore.clone(),
            limits: opts.limits.clone(),
            started: std::time::Instant::now(),
        })
    }

    /// Whether a hard limit is reached; the first time, the run is stopped with that limit
    /// named (see [`Limits`]). Asked before a task starts and after one finishes.
    pub(super) fn over_limit(&self) -> bool {
        if self.control.limit().is_some() {
            return true;
        }
        let l = &self.limits;
        let requests = self.source.requests().total() + self.dest.requests().total();
        let bytes = self.progress.bytes();
        let elapsed = self.started.elapsed();
        let why = if l.max_requests.is_some_and(|m| requests >= m) {
            format!(
                "--max-requests {} reached ({requests} requests this run)",
                l.max_requests.unwrap_or_default()
            )
        } else if l.max_bytes.is_some_and(|m| bytes >= m) {
            format!(
                "--max-bytes {} reached ({} copied this run)",
                indicatif::HumanBytes(l.max_bytes.unwrap_or_default()),
                indicatif::HumanBytes(bytes)
            )
        } else if let Some(why) = self.over_cost() {
            why
        } else if l.max_duration.is_some_and(|m| elapsed >= m) {
            format!(
                "--max-duration {} reached",
                crate::events::show_duration(l.max_duration.unwrap_or_default())
            )
        } else {
            return false;
        };
        self.control.reach_limit(why);
        true
    }

    /// `--max-cost` reached: this run's requests (both sides) and bytes across providers,
    /// by the limit's price table.
    fn over_cost(&self) -> Option<String> {
        let c = self.limits.max_cost.as_ref()?;
        let counts = self
            .source
            .requests()
            .snapshot()
            .into_iter()
            .chain(self.dest.requests().snapshot());
        let across = if c.across { self.progress.bytes() } else { 0 };
        let spent = crate::pricing::cost_of(&c.prices, counts, across);
        (spent >= c.max_usd).then(|| {
            format!(
                "--max-cost ${} reached (${spent:.6} spent this run, prices {})",
                c.max_usd,
                c.prices.label()
            )
        })
    }

    /// Stops the run at `--max-duration` even while no task starts or ends (a long copy, a
    /// wait for the listing): spawned by whoever drives the run.
    pub async fn stop_at_max_duration(&self) {
        match self.limits.max_duration {
            Some(d) => {
                tokio::time::sleep(d.saturating_sub(self.started.elapsed())).await;
                self.over_limit();
            }
            None => std::future::pending().await,
        }
    }

    /// What the job's probe learned of the source bucket, before the run starts: where it
    /// has (or had) versioning, a `null` version is read as `versionId=null`; elsewhere (and
    /// when this is not called) by key. Either way pinned to its listed ETag.
    pub fn set_source_facts(&self, facts: &crate::s3::BucketFacts) {
        self.source_null_by_id
            .store(facts.versioned || facts.suspended, Ordering::Relaxed);
    }

    /// What the run knows of destination bucket `bucket` (versioning, object lock).
    pub(super) fn facts(&self, bucket: &str) -> DestFacts {
        self.all_facts.of(bucket)
    }

    /// Asks the run to stop taking new tasks; tasks in flight finish.
    pub fn stop(&self) {
        self.control.stop();
    }

    /// Stops the run for a reason outside the copier (e.g. the listing beside it failed):
    /// no new tasks; the summary says why.
    pub fn abort(&self, why: String) {
        self.control.abort(why);
    }

    /// Whether the run was asked to stop (a signal, an abort, a limit, the failure
    /// threshold): it takes no new tasks.
    pub fn stopping(&self) -> bool {
        self.control.stopping()
    }

    /// Records the lag of every task done from now on (`follow`; see `Writer::record_lag`).
    pub fn record_lag(&self) {
        self.writer.record_lag(true);
    }

    /// Returns once the run is asked to stop (a signal, an abort, the failure threshold).
    pub async fn until_stopped(&self) {
        self.control.until_stopped().await;
    }

    /// The lowest bound on requests in flight this run reached (it halves on throttling).
    pub fn lowest_limit(&self) -> usize {
        self.dest.limiter().lowest_limit()
    }

    /// Sends the requests made since the last call to the manifest's per-operation totals.
    fn record_requests(&self) {
        let mut now: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (op, n) in self
            .source
            .requests()
            .snapshot()
            .into_iter()
            .chain(self.dest.requests().snapshot())
        {
            *now.entry(op).or_default() += n;
        }
        let mut sent = self.requests_sent.lock().expect("requests lock");
        let counts: Vec<(&'static str, u64)> = now
            .iter()
            .map(|(op, n)| (*op, n - sent.get(op).copied().unwrap_or(0)))
            .filter(|(_, d)| *d > 0)
            .collect();
        *sent = now;
        drop(sent);
        if !counts.is_empty() {
            self.send(Update::Requests { counts });
        }
    }

    /// Stores the run's rate and ETA for `status` (None: the run ended); see
    /// `events::ticker`.
    pub fn record_progress(&self, p: Option<crate::manifest::RunProgress>) {
        self.send(Update::RunProgress(p));
    }

    /// Queues a manifest update; a manifest that cannot commit stops the run.
    fn send(&self, u: Update) {
        if let Err(e) = self.writer.send(u) {
            self.control.abort(format!("manifest: {e}"));
        }
    }

    /// Waits until every result queued for the manifest is committed.
    pub async fn flush(&self) {
        self.record_requests();
        if let Err(e) = self.writer.flush().await {
            self.control.abort(format!("manifest: {e}"));
            tracing::error!("{e}");
        }
    }
}
