//! events::ticker: a run's progress, sampled every few seconds from the manifest's counts:
//! fed to the [`Estimator`], stored in the manifest as the run's snapshot (rate and ETA, for
//! `status` while the run goes on), and printed every `--progress-interval` as a `progress`
//! event (JSON) or a text line (when stderr is not a terminal and no bar is drawn).
//!
//! May call: the manifest (its counts, read on a connection of its own), [`super`].

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::eta::Estimator;
use super::{emit, json, say, show_secs, Event, ProgressEvent};
use crate::manifest::{Counts, Manifest, RunProgress};

/// How often the counts are sampled and the snapshot stored (at most; a shorter
/// `--progress-interval` samples as often as it prints).
pub const SAMPLE: Duration = Duration::from_secs(5);

/// A snapshot older than this is no run in progress (`status` shows no rate or ETA): many
/// missed samples mean the run died.
pub const FRESH_FOR: Duration = Duration::from_secs(60);

/// What the progress of one run needs.
pub struct Ticker<F: Fn(RunProgress)> {
    /// The manifest (read on a connection of its own).
    pub manifest: PathBuf,
    /// `--progress-interval` (None: 0, no lines).
    pub interval: Option<Duration>,
    /// Print lines (JSON mode, or stderr is not a terminal); the snapshot is stored anyway.
    pub lines: bool,
    /// Stores a snapshot (through the run's manifest writer).
    pub persist: F,
}

/// The progress figures of `c` with the estimator's rate and ETA, `elapsed` into the run.
pub fn progress_of(c: &Counts, est: &Estimator, elapsed: Duration) -> ProgressEvent {
    let remaining = (c.pending + c.in_progress).saturating_sub(c.blocked + c.restore_pending);
    let rate = est.rate();
    ProgressEvent {
        done: c.done,
        failed: c.failed,
        skipped: c.skipped,
        total: c.total,
        remaining,
        bytes_done: c.bytes_done,
        tasks_per_sec: rate.map(|r| r.tasks_per_sec),
        bytes_per_sec: rate.map(|r| r.bytes_per_sec),
        // While the listing goes on the total is not known: no ETA.
        eta_secs: c
            .listing_complete
            .then(|| est.eta(remaining))
            .flatten()
            .map(|d| d.as_secs_f64().round() as u64),
        listing_complete: c.listing_complete,
        elapsed_secs: elapsed.as_secs(),
    }
}

/// The text progress line.
pub fn progress_line(p: &ProgressEvent) -> String {
    let ended = p.done + p.failed + p.skipped;
    let pct = (ended * 100).checked_div(p.total).unwrap_or(100);
    let rate = match (p.tasks_per_sec, p.bytes_per_sec) {
        (Some(t), Some(b)) => format!(
            "{t:.1} tasks/s, {}/s",
            indicatif::HumanBytes(b.round() as u64)
        ),
        _ => "rate not measured yet".into(),
    };
    let eta = match (p.eta_secs, p.listing_complete) {
        (Some(s), _) => format!("ETA {}", show_secs(s)),
        (None, false) => "ETA unknown: the listing goes on".into(),
        (None, true) => "ETA unknown".into(),
    };
    format!(
        "progress: {ended}/{} tasks ({pct}%; {} done, {} failed, {} skipped), {rate}, {eta}",
        p.total, p.done, p.failed, p.skipped
    )
}

impl<F: Fn(RunProgress)> Ticker<F> {
    /// Samples until dropped (the run aborts it when it ends).
    pub async fn run(self) {
        let Ok(m) = Manifest::open(&self.manifest, false) else {
            return;
        };
        let sample = self
            .interval
            .map_or(SAMPLE, |i| i.min(SAMPLE))
            .max(Duration::from_secs(1));
        let started = Instant::now();
        let mut est = Estimator::default();
        let mut printed = Instant::now();
        let mut tick = tokio::time::interval(sample);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Ok(c) = m.counts() else { continue };
            let elapsed = started.elapsed();
            est.observe(elapsed, c.done + c.failed + c.skipped, c.bytes_done);
            let p = progress_of(&c, &est, elapsed);
            (self.persist)(RunProgress {
                updated_at: now_secs(),
                pid: std::process::id(),
                tasks_per_sec: p.tasks_per_sec,
                bytes_per_sec: p.bytes_per_sec,
                eta_secs: p.eta_secs,
            });
            let Some(every) = self.interval else { continue };
            if self.lines && printed.elapsed() + Duration::from_millis(100) >= every {
                printed = Instant::now();
                if json() {
                    emit(Event::Progress(p));
                } else {
                    say(progress_line(&p));
                }
            }
        }
    }
}

/// This machine's clock, in unix seconds.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The snapshot of a run in progress, if `p` is fresh at `now` (unix seconds).
pub fn fresh(p: Option<RunProgress>, now: i64) -> Option<RunProgress> {
    p.filter(|p| now.saturating_sub(p.updated_at) <= FRESH_FOR.as_secs() as i64)
}

/// The `status` line of a run in progress.
pub fn status_line(p: &RunProgress, now: i64) -> String {
    let rate = match (p.tasks_per_sec, p.bytes_per_sec) {
        (Some(t), Some(b)) => format!(
            "{t:.1} tasks/s, {}/s",
            indicatif::HumanBytes(b.round() as u64)
        ),
        _ => "rate not measured yet".into(),
    };
    let eta = p
        .eta_secs
        .map_or("ETA unknown".into(), |s| format!("ETA {}", show_secs(s)));
    format!(
        "run in progress (pid {}): {rate}, {eta} (as of {}s ago)",
        p.pid,
        now.saturating_sub(p.updated_at).max(0)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_counts_rate_and_eta() {
        let mut est = Estimator::default();
        let c = |done| Counts {
            total: 100,
            done,
            pending: 100 - done,
            listing_complete: true,
            bytes_done: done * 1024,
            ..Counts::default()
        };
        est.observe(Duration::from_secs(0), 0, 0);
        est.observe(Duration::from_secs(10), 20, 20 * 1024);
        let p = progress_of(&c(20), &est, Duration::from_secs(10));
        assert_eq!(p.eta_secs, Some(40));
        assert_eq!(
            progress_line(&p),
            "progress: 20/100 tasks (20%; 20 done, 0 failed, 0 skipped), 2.0 tasks/s, 2.00 KiB/s, ETA 40s"
        );
        let listing = Counts {
            listing_complete: false,
            ..c(20)
        };
        assert_eq!(progress_of(&listing, &est, Duration::ZERO).eta_secs, None);
    }

    #[test]
    fn a_stale_snapshot_is_no_run() {
        let p = RunProgress {
            updated_at: 1000,
            pid: 1,
            tasks_per_sec: Some(1.0),
            bytes_per_sec: Some(1.0),
            eta_secs: Some(5),
        };
        assert!(fresh(Some(p.clone()), 1030).is_some());
        assert_eq!(
            status_line(&p, 1003),
            "run in progress (pid 1): 1.0 tasks/s, 1 B/s, ETA 5s (as of 3s ago)"
        );
        assert!(fresh(Some(p), 1000 + 61).is_none());
    }
}
