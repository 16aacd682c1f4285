//! copier: the bounded concurrent scheduler that replicates the manifest's tasks.
//!
//! Keys are read from the manifest in batches (memory does not grow with the job) and run in
//! parallel; the versions of one key run one at a time, oldest first, so the destination's
//! history reads like the source's. Every S3 request takes a slot from one [`Limiter`]
//! shared by all keys and parts. Results go back through the manifest's single writer.
//!
//! Crash safety: a task is marked `in_progress` (durably) before its first write request.
//! A task found `in_progress` at start-up, or a write that failed ambiguously, is in doubt:
//! it is reconciled against the destination's version list before anything is written again
//! (see [`Copier::find_adoptable`]). This relies on one assumption, documented in the README:
//! nothing else writes to the destination keys of a job while it runs.

mod strategy;

pub use strategy::{choose_layout, encode_copy_source, Layout, SourceAttrs};

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::Client;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::config::{JobSettings, Side};
use crate::lister::{list_page, show_key, Entry, ListError};
use crate::manifest::{CopyMethod, KeyGroup, Outcome, State, Task, Update, Writer};
use crate::s3::{classify, with_retry, ErrorClass, Limiter, RetryPolicy, S3Error};

/// Seconds of clock difference tolerated between this machine and the destination when
/// deciding whether a destination version was written by an attempt (see reconciliation).
pub const CLOCK_SKEW_SECS: i64 = 300;

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
    /// Draw a progress bar (on a terminal).
    pub progress: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            concurrency: 32,
            part_concurrency: 8,
            policy: RetryPolicy::default(),
            max_rps: None,
            failure_threshold: FailureThreshold::default(),
            progress: false,
        }
    }
}

/// How a run ended.
#[derive(Clone, Debug, Default)]
pub struct RunSummary {
    /// Tasks done in this run.
    pub done: u64,
    /// Tasks failed in this run.
    pub failed: u64,
    /// Tasks skipped in this run.
    pub skipped: u64,
    /// In-doubt tasks found already copied.
    pub reconciled: u64,
    /// Bytes copied in this run.
    pub bytes: u64,
    /// Retries in this run.
    pub retries: u64,
    /// Throttling answers seen.
    pub throttles: u64,
    /// Stopped by a signal before the end.
    pub interrupted: bool,
    /// Stopped by the failure threshold or a job-wide error: why.
    pub aborted: Option<String>,
}

/// The result of one task's copy.
#[derive(Clone, Debug)]
pub(crate) struct Copied {
    dest_version_id: Option<String>,
    method: CopyMethod,
    part_size: Option<u64>,
    parts: Option<u64>,
    etag_preserved: Option<bool>,
}

impl Copied {
    fn adopted(v: Option<String>) -> Copied {
        Copied {
            dest_version_id: v,
            method: CopyMethod::Reconciled,
            part_size: None,
            parts: None,
            etag_preserved: None,
        }
    }
}

/// The result of a write that creates a destination version.
pub(crate) enum Write<T> {
    /// This call's attempt succeeded.
    Done(T),
    /// An earlier, ambiguously failed attempt had succeeded: this destination version is it.
    Adopted(Option<String>),
}

/// One task being copied, with what reconciliation needs.
pub(crate) struct TaskCtx<'a> {
    task: &'a Task,
    dest_key: &'a str,
    /// Destination version ids recorded for this key's done tasks.
    recorded: &'a HashSet<String>,
    retries: AtomicU64,
    /// Unix seconds when this task's first attempt of this run started.
    started_at: i64,
    /// For version id `null`: whether it is the key's current version, so that requests
    /// may leave the version id out (some servers reject `versionId=null` on GET and HEAD).
    null_is_current: AtomicBool,
}

impl TaskCtx<'_> {
    /// The version id to send on GET/HEAD/tagging requests of the source version.
    fn version_arg(&self) -> Option<String> {
        if self.task.version_id == "null" && self.null_is_current.load(Ordering::Relaxed) {
            None
        } else {
            Some(self.task.version_id.clone())
        }
    }
}

/// The replication engine of one run.
pub struct Copier {
    settings: JobSettings,
    source: Client,
    dest: Client,
    writer: Writer,
    limiter: Limiter,
    policy: RetryPolicy,
    part_concurrency: usize,
    dest_versioned: bool,
    stopping: AtomicBool,
    stop_notify: Notify,
    threshold: FailureThreshold,
    done: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
    reconciled: AtomicU64,
    bytes: AtomicU64,
    retries: AtomicU64,
    aborted: std::sync::Mutex<Option<String>>,
    last_error: std::sync::Mutex<Option<String>>,
    stream_fallback: AtomicBool,
    bar: ProgressBar,
}

/// Failures printed as they happen; the rest are only in the manifest and the report.
const MAX_FAILURES_SHOWN: u64 = 10;

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Parses S3's `2026-01-02T03:04:05.000Z` into unix seconds.
fn parse_s3_time(s: &str) -> Option<i64> {
    aws_smithy_types::DateTime::from_str(s, aws_smithy_types::date_time::Format::DateTime)
        .ok()
        .map(|d| d.secs())
}

impl Copier {
    /// Sets up a run. `dest_versioned` tells whether the destination keeps versions (an
    /// unversioned destination is overwritten, so in-doubt tasks are simply copied again).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: JobSettings,
        source: Client,
        dest: Client,
        writer: Writer,
        dest_versioned: bool,
        opts: &RunOptions,
        bar: ProgressBar,
    ) -> Arc<Copier> {
        Arc::new(Copier {
            settings,
            source,
            dest,
            writer,
            limiter: Limiter::new(opts.concurrency, opts.max_rps),
            policy: opts.policy.clone(),
            part_concurrency: opts.part_concurrency.max(1),
            dest_versioned,
            stopping: AtomicBool::new(false),
            stop_notify: Notify::new(),
            threshold: opts.failure_threshold,
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            reconciled: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            aborted: std::sync::Mutex::new(None),
            last_error: std::sync::Mutex::new(None),
            stream_fallback: AtomicBool::new(false),
            bar,
        })
    }

    fn server_side(&self) -> bool {
        self.settings.server_side() && !self.stream_fallback.load(Ordering::Relaxed)
    }

    /// In `auto` mode, a server-side copy denied access (the destination's credentials may
    /// not read the source) switches the job to streaming, said once. Returns whether the
    /// failed copy should be tried again by streaming.
    fn fall_back_to_stream(&self, e: &S3Error) -> bool {
        let auto = self.settings.copy.mode == crate::config::CopyMode::Auto;
        let denied = e.class == ErrorClass::Fatal
            && (e.status == Some(403) || e.code.as_deref() == Some("AccessDenied"));
        if !(auto && denied) {
            return false;
        }
        if !self.stream_fallback.swap(true, Ordering::Relaxed) {
            self.say(format!(
                "server-side copy was denied ({e}); streaming through this machine from now on"
            ));
        }
        true
    }

    /// Prints one line to standard error, above the progress bar when there is one.
    fn say(&self, line: String) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    /// Asks the run to stop taking new tasks; tasks in flight finish.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop_notify.notify_waiters();
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn abort(&self, why: String) {
        let mut a = self.aborted.lock().expect("abort lock");
        if a.is_none() {
            *a = Some(why);
        }
        drop(a);
        self.stop();
    }

    /// One request with retries, counted on the task.
    async fn call<T, F, Fut>(&self, t: &TaskCtx<'_>, f: F) -> Result<T, S3Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, S3Error>>,
    {
        with_retry(&self.policy, &self.limiter, &t.retries, f).await
    }

    /// A write that creates the destination version. Retried like any request, but before
    /// each retry the destination is checked for the version an ambiguous failure may have
    /// created; if it is there, it is adopted instead of writing a second one.
    async fn commit_write<T, F, Fut>(
        &self,
        t: &TaskCtx<'_>,
        op: &'static str,
        f: F,
    ) -> Result<Write<T>, S3Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, S3Error>>,
    {
        let mut delays = backon::BackoffBuilder::build(self.policy.backoff());
        loop {
            let r = {
                let _permit = self.limiter.acquire().await;
                f().await
            };
            match r {
                Ok(v) => {
                    self.limiter.on_success();
                    return Ok(Write::Done(v));
                }
                Err(e) if e.is_retryable() => {
                    if e.class == ErrorClass::Throttled {
                        self.limiter.on_throttle();
                    }
                    let Some(d) = delays.next() else {
                        return Err(e);
                    };
                    t.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("{op} of {:?}: retrying in {d:?} after: {e}", t.task.key);
                    tokio::time::sleep(d).await;
                    if let Some(v) = self.find_adoptable(t, t.started_at).await? {
                        return Ok(Write::Adopted(v));
                    }
                }
                Err(e) => {
                    tracing::debug!("{op} of {:?} failed: {e}", t.task.key);
                    return Err(e);
                }
            }
        }
    }

    /// The destination's versions of exactly `dest_key`, oldest first.
    async fn dest_history(&self, t: &TaskCtx<'_>) -> Result<Vec<Entry>, S3Error> {
        let mut out = Vec::new();
        let (mut km, mut vm): (Option<String>, Option<String>) = (None, None);
        loop {
            let page = list_page(
                &self.dest,
                Side::Dest,
                &self.settings.dest.bucket,
                t.dest_key,
                km.as_deref(),
                vm.as_deref(),
                1000,
                &self.policy,
                &self.limiter,
                &t.retries,
            )
            .await
            .map_err(|e| match e {
                ListError::S3(e) => e,
                other => S3Error::other(
                    Side::Dest,
                    "ListObjectVersions",
                    ErrorClass::Retryable,
                    other.to_string(),
                ),
            })?;
            let mut past = false;
            for e in page.entries {
                if e.key == t.dest_key {
                    out.push(e);
                } else if e.key.as_str() > t.dest_key {
                    past = true;
                }
            }
            if !page.truncated || past {
                break;
            }
            km = page.next_key_marker;
            vm = page.next_version_marker;
        }
        out.reverse();
        Ok(out)
    }

    /// Whether the destination holds a version of this task written at or after
    /// `started_at` (less [`CLOCK_SKEW_SECS`]) that no done task recorded: then an earlier
    /// attempt created it, and its version id is returned. Matching is by kind (version or
    /// delete marker), size, and ETag where the copy keeps it.
    async fn find_adoptable(
        &self,
        t: &TaskCtx<'_>,
        started_at: i64,
    ) -> Result<Option<Option<String>>, S3Error> {
        if !self.dest_versioned {
            // An unversioned destination is overwritten by the next attempt: nothing to adopt.
            return Ok(None);
        }
        let history = self.dest_history(t).await?;
        let after_recorded = history
            .iter()
            .rposition(|e| t.recorded.contains(&e.version_id))
            .map(|i| i + 1)
            .unwrap_or(0);
        // A single-request copy keeps a plain MD5 ETag; a multipart one makes its own.
        let source_etag = t
            .task
            .etag
            .as_deref()
            .filter(|e| !e.contains('-'))
            .filter(|_| !self.goes_multipart(t.task.size, self.server_side()));
        let etag_comparable = self.settings.copy.sse.as_deref() != Some("aws:kms");
        for e in &history[after_recorded..] {
            if t.recorded.contains(&e.version_id) {
                continue;
            }
            let recent = e
                .last_modified
                .as_deref()
                .and_then(parse_s3_time)
                .is_none_or(|lm| lm >= started_at - CLOCK_SKEW_SECS);
            let same_kind = e.is_delete_marker == t.task.is_delete_marker;
            let same_body = t.task.is_delete_marker
                || (e.size == t.task.size
                    && match (source_etag, &e.etag) {
                        (Some(s), Some(d)) if etag_comparable => s == d,
                        _ => true,
                    });
            if recent && same_kind && same_body {
                return Ok(Some(Some(e.version_id.clone())));
            }
        }
        Ok(None)
    }

    async fn delete_marker(&self, t: &TaskCtx<'_>) -> Result<Copied, S3Error> {
        let w = self
            .commit_write(t, "DeleteObject", || async {
                self.dest
                    .delete_object()
                    .bucket(&self.settings.dest.bucket)
                    .key(t.dest_key)
                    .send()
                    .await
                    .map(|o| o.version_id().map(str::to_string))
                    .map_err(|e| classify(Side::Dest, "DeleteObject", false, e))
            })
            .await?;
        Ok(match w {
            Write::Adopted(v) => Copied::adopted(v),
            Write::Done(v) => Copied {
                dest_version_id: v,
                method: CopyMethod::DeleteMarker,
                part_size: None,
                parts: None,
                etag_preserved: None,
            },
        })
    }

    async fn copy_task(&self, t: &TaskCtx<'_>) -> Result<Copied, S3Error> {
        if t.task.is_delete_marker {
            return self.delete_marker(t).await;
        }
        let server_side = self.server_side();
        match self.copy_version(t).await {
            Err(e) if server_side && self.fall_back_to_stream(&e) => self.copy_version(t).await,
            r => r,
        }
    }

    fn finish(&self, task: &Task, outcome: Outcome) {
        match &outcome {
            Outcome::Done { method, .. } => {
                self.done.fetch_add(1, Ordering::Relaxed);
                if *method == CopyMethod::Reconciled {
                    self.reconciled.fetch_add(1, Ordering::Relaxed);
                }
                if !task.is_delete_marker {
                    self.bytes.fetch_add(task.size, Ordering::Relaxed);
                }
            }
            Outcome::Failed { error, .. } => {
                let n = self.failed.fetch_add(1, Ordering::Relaxed) + 1;
                *self.last_error.lock().expect("last error lock") = Some(error.to_string());
                // The first failures are shown as they happen; all are in the manifest.
                let line = match n {
                    1..=MAX_FAILURES_SHOWN => Some(format!(
                        "failed: {} version {}: {error}",
                        show_key(&task.key),
                        task.version_id
                    )),
                    n if n == MAX_FAILURES_SHOWN + 1 => Some(
                        "more tasks failed: see `s3-backfill report` for all of them".to_string(),
                    ),
                    _ => None,
                };
                if let Some(line) = line {
                    self.say(line);
                }
            }
            Outcome::Skipped { .. } => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Requeued => {}
        }
        if !matches!(outcome, Outcome::Requeued) {
            self.bar.inc(1);
            let bytes = self.bytes.load(Ordering::Relaxed);
            let secs = self.bar.elapsed().as_secs_f64().max(0.001);
            self.bar.set_message(format!(
                "{:.0} tasks/s, {} copied, {}/s",
                self.bar.position() as f64 / secs,
                HumanBytes(bytes),
                HumanBytes((bytes as f64 / secs) as u64)
            ));
        }
        if let Err(e) = self.writer.send(Update::Finished {
            id: task.id,
            outcome,
        }) {
            self.abort(format!("manifest: {e}"));
        }
        self.check_threshold();
    }

    fn check_threshold(&self) {
        let failed = self.failed.load(Ordering::Relaxed);
        let finished =
            failed + self.done.load(Ordering::Relaxed) + self.skipped.load(Ordering::Relaxed);
        let th = self.threshold;
        if finished >= th.min_tasks.max(1) && (failed as f64) * 100.0 > th.percent * finished as f64
        {
            let last = self
                .last_error
                .lock()
                .expect("last error lock")
                .clone()
                .unwrap_or_default();
            self.abort(format!(
                "stopped early: {failed} of the first {finished} tasks failed (more than {}%), last error: {last}; fix the cause, then `run --retry-failed`",
                th.percent
            ));
        }
    }

    /// Copies the open tasks of one key, oldest first.
    async fn key_worker(self: Arc<Self>, group: KeyGroup) {
        let dest_key = self.settings.dest_key(&group.key);
        let mut recorded: HashSet<String> = group
            .tasks
            .iter()
            .filter(|t| t.state == State::Done)
            .filter_map(|t| t.dest_version_id.clone())
            .collect();
        let open: Vec<&Task> = group
            .tasks
            .iter()
            .filter(|t| matches!(t.state, State::Pending | State::InProgress))
            .collect();
        for task in open {
            if self.stopping() {
                break;
            }
            let ctx = TaskCtx {
                task,
                dest_key: &dest_key,
                recorded: &recorded,
                retries: AtomicU64::new(0),
                started_at: now_secs(),
                null_is_current: AtomicBool::new(true),
            };
            // A task left in progress by an earlier process is in doubt: was it copied?
            if task.state == State::InProgress {
                let since = task.started_at.unwrap_or(0);
                match self.find_adoptable(&ctx, since).await {
                    Ok(Some(v)) => {
                        let retries = ctx.retries.load(Ordering::Relaxed);
                        if let Some(v) = &v {
                            recorded.insert(v.clone());
                        }
                        self.retries.fetch_add(retries, Ordering::Relaxed);
                        self.finish(
                            task,
                            Outcome::Done {
                                dest_version_id: v,
                                method: CopyMethod::Reconciled,
                                part_size: None,
                                parts: None,
                                etag_preserved: None,
                                retries,
                            },
                        );
                        continue;
                    }
                    Ok(None) => {
                        if self.goes_multipart(task.size, self.server_side()) {
                            if let Err(e) = self.abort_uploads_of_key(&ctx).await {
                                tracing::warn!("could not list uploads of {:?}: {e}", task.key);
                            }
                        }
                    }
                    Err(e) => {
                        // Cannot tell; copying now could make a duplicate. Leave it in doubt.
                        self.say(format!(
                            "in doubt, left for the next run: {} version {}: {e}",
                            show_key(&task.key),
                            task.version_id
                        ));
                        break;
                    }
                }
            }
            if let Err(e) = self
                .writer
                .send_durable(Update::Started {
                    id: task.id,
                    at: ctx.started_at,
                })
                .await
            {
                self.abort(format!("manifest: {e}"));
                break;
            }
            let result = self.copy_task(&ctx).await;
            let retries = ctx.retries.load(Ordering::Relaxed);
            self.retries.fetch_add(retries, Ordering::Relaxed);
            match result {
                Ok(c) => {
                    if let Some(v) = &c.dest_version_id {
                        recorded.insert(v.clone());
                    }
                    self.finish(
                        task,
                        Outcome::Done {
                            dest_version_id: c.dest_version_id,
                            method: c.method,
                            part_size: c.part_size,
                            parts: c.parts,
                            etag_preserved: c.etag_preserved,
                            retries,
                        },
                    );
                }
                Err(e) if e.class == ErrorClass::SourceGone => {
                    self.finish(
                        task,
                        Outcome::Skipped {
                            class: ErrorClass::SourceGone,
                            reason: format!("source version is gone: {e}"),
                            retries,
                        },
                    );
                }
                Err(e) => {
                    self.finish(task, Outcome::Failed { error: e, retries });
                    // Later versions wait: copying them now would put the history out of order.
                    break;
                }
            }
        }
    }

    /// Aborts multipart uploads that a killed run left open (their ids are in the manifest).
    pub async fn abort_leftover_uploads(&self, tasks: Vec<Task>) {
        for t in tasks {
            if let Some(u) = &t.upload_id {
                let key = self.settings.dest_key(&t.key);
                self.abort_upload(&key, u).await;
                if let Err(e) = self.writer.send(Update::Upload {
                    id: t.id,
                    upload_id: None,
                    part_size: None,
                    parts: None,
                }) {
                    self.abort(format!("manifest: {e}"));
                }
            }
        }
    }

    /// Runs every open task until done, stopped, or aborted.
    pub async fn run(self: Arc<Self>, key_concurrency: usize) -> RunSummary {
        let mut set = JoinSet::new();
        let mut after: i64 = 0;
        let batch = 256;
        'outer: while !self.stopping() {
            let groups = match self.writer.next_key_groups(after, batch).await {
                Ok(g) => g,
                Err(e) => {
                    self.abort(format!("manifest: {e}"));
                    break;
                }
            };
            if groups.is_empty() {
                break;
            }
            after = groups.last().map_or(after, |g| g.key_id);
            for g in groups {
                while set.len() >= key_concurrency.max(1) {
                    set.join_next().await;
                }
                if self.stopping() {
                    break 'outer;
                }
                set.spawn(self.clone().key_worker(g));
            }
        }
        while set.join_next().await.is_some() {}
        self.bar.finish_and_clear();
        RunSummary {
            done: self.done.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            reconciled: self.reconciled.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            throttles: self.limiter.throttles(),
            interrupted: self.stopping() && self.aborted.lock().expect("abort lock").is_none(),
            aborted: self.aborted.lock().expect("abort lock").clone(),
        }
    }

    /// Waits until every result queued for the manifest is committed.
    pub async fn flush(&self) {
        if let Err(e) = self.writer.flush().await {
            tracing::error!("{e}");
        }
    }
}

/// A progress bar for copying `total` tasks of `bytes` bytes; hidden when `show` is false.
pub fn copy_bar(show: bool, total: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} copying [{elapsed_precise}] {bar:30} {pos}/{len} tasks, ETA {eta}: {msg}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listing_times() {
        assert_eq!(parse_s3_time("1970-01-01T00:01:00.000Z"), Some(60));
        assert_eq!(parse_s3_time("junk"), None);
    }
}
