//! copier::progress: what a run counts and shows while it works: task and byte counters,
//! the copy bar (rate, ETA), the first failures as one line each, the failure threshold.
//!
//! May call: nothing but indicatif (the bar is built by `ui`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use indicatif::{HumanBytes, ProgressBar};

use super::FailureThreshold;
use crate::manifest::{CopyMethod, Outcome, Task};
use crate::s3::show_key;

/// Failures printed as they happen; the rest are only in the manifest and the report.
const MAX_FAILURES_SHOWN: u64 = 10;

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
    /// Tasks left waiting behind a failed older version of their key.
    pub blocked: u64,
    /// Bytes copied in this run.
    pub bytes: u64,
    /// Retries in this run.
    pub retries: u64,
    /// Throttling answers seen.
    pub throttles: u64,
    /// Requests sent in this run.
    pub requests: u64,
    /// Archived versions whose restore is pending (asked for by this run or an earlier one):
    /// a later run copies them once restored.
    pub restores_pending: u64,
    /// Stopped by a signal before the end.
    pub interrupted: bool,
    /// Stopped by the failure threshold or a job-wide error: why.
    pub aborted: Option<String>,
    /// Stopped at a hard limit (`--max-requests`, `--max-bytes`, `--max-duration`, `--max-cost`): which.
    pub limit: Option<String>,
}

/// The counters of a run and its bar.
pub(super) struct Progress {
    bar: ProgressBar,
    threshold: FailureThreshold,
    done: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
    reconciled: AtomicU64,
    blocked: AtomicU64,
    restores: AtomicU64,
    bytes: AtomicU64,
    retries: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Progress {
    pub(super) fn new(bar: ProgressBar, threshold: FailureThreshold) -> Self {
        Progress {
            bar,
            threshold,
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            reconciled: AtomicU64::new(0),
            blocked: AtomicU64::new(0),
            restores: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    /// Prints one line to standard error, above the progress bar when there is one (a
    /// `message` event with `--log-format json`).
    pub(super) fn say(&self, line: String) {
        if self.bar.is_hidden() {
            crate::events::say(line);
        } else {
            self.bar.println(line);
        }
    }

    pub(super) fn add_retries(&self, n: u64) {
        self.retries.fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn add_blocked(&self, n: u64) {
        self.blocked.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes of object versions copied so far in this run.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Forgets the blocked tasks counted so far (a last walk over every key counts them
    /// afresh).
    pub(super) fn reset_blocked(&self) {
        self.blocked.store(0, Ordering::Relaxed);
    }

    /// Counts a finished task. Returns why the run must stop, when the failure threshold
    /// is crossed.
    pub(super) fn finished(&self, task: &Task, outcome: &Outcome) -> Option<String> {
        match outcome {
            Outcome::Done { copied, .. } => {
                self.done.fetch_add(1, Ordering::Relaxed);
                if copied.method == CopyMethod::Reconciled {
                    self.reconciled.fetch_add(1, Ordering::Relaxed);
                }
                if !task.entry.is_delete_marker {
                    self.bytes.fetch_add(task.entry.size, Ordering::Relaxed);
                }
            }
            Outcome::Failed { error, .. } => {
                let n = self.failed.fetch_add(1, Ordering::Relaxed) + 1;
                *self.last_error.lock().expect("last error lock") = Some(error.to_string());
                if crate::events::json() {
                    // Every failure is a `task` event of its own.
                } else if n <= MAX_FAILURES_SHOWN {
                    self.say(format!(
                        "failed: {} version {}: {error}",
                        show_key(&task.entry.key),
                        task.entry.version_id
                    ));
                } else if n == MAX_FAILURES_SHOWN + 1 {
                    self.say("more tasks failed: see `s3-backfill report` for all of them".into());
                }
            }
            Outcome::Skipped { .. } => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Requeued => return None,
            Outcome::RestorePending { .. } => {
                self.restores.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
        self.tick();
        self.over_threshold()
    }

    fn tick(&self) {
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

    fn over_threshold(&self) -> Option<String> {
        let failed = self.failed.load(Ordering::Relaxed);
        let finished =
            failed + self.done.load(Ordering::Relaxed) + self.skipped.load(Ordering::Relaxed);
        let th = self.threshold;
        if finished < th.min_tasks.max(1) || (failed as f64) * 100.0 <= th.percent * finished as f64
        {
            return None;
        }
        let last = self
            .last_error
            .lock()
            .expect("last error lock")
            .clone()
            .unwrap_or_default();
        Some(format!(
            "stopped early: {failed} of the first {finished} tasks failed (more than {}%), last error: {last}; fix the cause, then `run --retry-failed`",
            th.percent
        ))
    }

    /// The run's summary (without the interruption and abort facts, which the caller adds).
    pub(super) fn summary(&self) -> RunSummary {
        self.bar.finish_and_clear();
        RunSummary {
            done: self.done.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            reconciled: self.reconciled.load(Ordering::Relaxed),
            blocked: self.blocked.load(Ordering::Relaxed),
            restores_pending: self.restores.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            ..RunSummary::default()
        }
    }
}
