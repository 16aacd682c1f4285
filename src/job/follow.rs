//! job::follow: the `follow` command. It continues a job (a backfill finished or still
//! listing) and keeps every destination in step with the source until SIGINT/SIGTERM, in
//! rounds on one copier:
//!
//! - changes come from events (`--events`: an SQS queue or a push endpoint, see `follow`),
//!   stored in the manifest's pending table before they are acknowledged; a round takes the
//!   pending keys and lists each one's history (a scoped refresh), so an event only says
//!   "key K changed" and duplicates, reordering and loss of events do not matter;
//! - or from polling (`--poll-interval`): a full refresh listing;
//! - a reconciler (`--reconcile-interval`) runs a full refresh now and then, catching what
//!   events missed (its tasks are counted as found by reconcile);
//! - each round copies while it lists, exactly as `run` after `plan --refresh`; every
//!   version written gets its lag recorded (write committed − source last-modified).
//!
//! Killed anywhere, the next `follow` (or `run`) continues: an unfinished listing first,
//! then the pending keys. `--until-caught-up` ends with 0 once nothing is pending and a
//! reconcile started after that found nothing new.
//!
//! May call: every stage.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::run::{copy_while_listing, run_until_stopped, LiveListing, RunJob, Shutdown};
use super::{lock_manifest, JobError};
use crate::cli::FollowArgs;
use crate::copier::{Copier, RunSummary};
use crate::manifest::{Manifest, PendingChange, PendingKeys, RefreshKind};
use crate::s3::{S3Client, Side};

/// Keys listed per scoped round at most.
const KEYS_PER_ROUND: usize = 1000;

/// How a follow ended, besides its summary.
pub struct Followed {
    /// The copier's summary over all rounds (interrupted when a signal stopped it).
    pub summary: RunSummary,
    /// `--until-caught-up` reached.
    pub caught_up: bool,
}

/// The intake's side of the loop: wakes a round when changes were stored, and says whether
/// anything may still be queued outside the manifest.
#[derive(Clone, Default)]
pub(crate) struct Changes {
    /// Notified after each stored batch.
    pub(crate) stored: Arc<Notify>,
    /// Deliveries received and not acknowledged yet, or queued at the source of events.
    pub(crate) backlog: Arc<std::sync::atomic::AtomicU64>,
}

/// `follow`: see the module header.
pub async fn follow(args: &FollowArgs, mut shutdown: Shutdown) -> Result<Followed, JobError> {
    let _lock = lock_manifest(&args.run.manifest)?;
    let run = &args.run;
    let metrics = super::run::serve_metrics(run)?;
    let job = RunJob::open(run).await?;
    job.manifest.start_following()?;
    let opts = job.options()?;
    let (settings, dest_versioned) = (job.settings.clone(), job.dest_versioned());
    let bar = indicatif::ProgressBar::hidden();
    let (copier, sides) = job.copier(&opts, bar.clone()).await?;
    if let Some(m) = &metrics {
        m.attach(crate::metrics::Live::of(&sides));
    }
    copier.record_lag();
    let changes = Changes::default();
    let intake = match &args.events {
        Some(spec) => {
            let timeouts = run.exec.timeouts();
            Some(start_intake(spec, &run.manifest, &settings, timeouts, &changes).await?)
        }
        None => None,
    };
    let ticker = {
        let copier = copier.clone();
        let ticker = crate::events::ticker::Ticker {
            manifest: run.manifest.clone(),
            interval: run.log.interval(),
            lines: crate::ui::progress_lines(),
            persist: move |p| copier.record_progress(Some(p)),
        };
        tokio::spawn(ticker.run())
    };
    let mut m = Manifest::open(&run.manifest, false)?;
    m.wait_for_locks_briefly()?;
    let mut plan = Schedule::new(args, &m)?;
    crate::say!("{}", plan.describe(args));
    let mut caught_up = false;
    let mut source_versioned: Option<bool> = None;
    let mut stalled = false;
    let mut summary = RunSummary::default();
    loop {
        let round = plan.next_round(&m)?;
        let mut listed = None;
        if let Some(kind) = round {
            stalled = false;
            // Whether keys no longer listed are deletions: probed again by full listings.
            if kind != RefreshKind::Events || source_versioned.is_none() {
                let probe = sides
                    .source
                    .req()
                    .probe_bucket(&settings.source.bucket)
                    .await;
                source_versioned = Some(match probe {
                    Ok(f) => f.versioned,
                    Err(e) => {
                        return Err(super::bucket_error(
                            Side::Source,
                            &settings.source.bucket,
                            e,
                        ))
                    }
                });
            }
            let pending = match kind {
                RefreshKind::Events => m.pending_keys(KEYS_PER_ROUND)?,
                _ => PendingKeys::default(),
            };
            let versioned = source_versioned.unwrap_or(true);
            if let Some(g) = m.start_follow_refresh(kind, &pending, versioned)? {
                plan.started(kind, g, &m)?;
                listed = Some((kind, g, pending.keys.len()));
            }
        }
        let listing = !m.listing_progress()?.complete;
        let counts = m.counts()?;
        // Tasks a copy can take now (not those behind a failure or waiting for a restore).
        let open = (counts.pending + counts.in_progress)
            .saturating_sub(counts.blocked + counts.restore_pending);
        let settled = counts.done + counts.failed + counts.skipped;
        if listing || (open > 0 && !stalled) {
            // A scoped round (or one resumed after a kill) lists one key per request.
            let scoped = round == Some(RefreshKind::Events)
                || (round.is_none() && m.partitions()?.len() > 1);
            let listings = match scoped {
                true => opts.concurrency.clamp(1, 64),
                false => 1,
            };
            let work = async {
                if listing {
                    let live = LiveListing {
                        path: &run.manifest,
                        settings: &settings,
                        source: &sides.source,
                        dest: &sides.dest,
                        dest_versioned,
                        concurrency: (run.list_concurrency as usize).max(listings),
                        page_size: run.list_page_size,
                        bar: bar.clone(),
                        log_every: None,
                        quiet: true,
                    };
                    copy_while_listing(&copier, live).await
                } else {
                    Ok(copier.clone().run().await)
                }
            };
            match run_until_stopped(&copier, run.exec.grace_period, &mut shutdown, work).await {
                Some(Ok(s)) => summary = s,
                Some(Err(e)) => {
                    stop_ticker(ticker, &copier).await;
                    return Err(e);
                }
                None => {
                    summary.interrupted = true;
                    break;
                }
            }
            if copier.stopping() {
                break;
            }
            plan.round_done(&m)?;
            if let Some((kind, g, keys)) = listed {
                say_round(&m, kind, g, keys)?;
            }
            // A copy that settled nothing (its tasks wait for something else) is not run
            // again until a change, a poll or a reconcile comes.
            let c = m.counts()?;
            stalled = !listing && c.done + c.failed + c.skipped == settled;
            if !stalled {
                continue;
            }
        }
        // Nothing to list or copy now.
        if args.until_caught_up && plan.caught_up(&m, &changes)? {
            caught_up = true;
            break;
        }
        let wake = plan.next_due(args.until_caught_up);
        tokio::select! {
            _ = changes.stored.notified() => stalled = false,
            _ = tokio::time::sleep_until(wake) => {}
            r = shutdown.recv() => {
                if r.is_some() {
                    summary.interrupted = true;
                    break;
                }
            }
        }
    }
    drop(intake);
    stop_ticker(ticker, &copier).await;
    if summary.aborted.is_none() && summary.limit.is_none() && !caught_up {
        summary.interrupted = true;
    }
    let lag = crate::ui::lag_line(&m.lag_stats(None)?);
    match caught_up {
        true => crate::say!("caught up: {lag}"),
        false => crate::say!("follow stopped: {lag}"),
    }
    Ok(Followed { summary, caught_up })
}

/// A round's line, when its listing added tasks.
fn say_round(m: &Manifest, kind: RefreshKind, g: i64, keys: usize) -> Result<(), JobError> {
    let Some(r) = m.refreshes()?.into_iter().find(|r| r.generation == g) else {
        return Ok(());
    };
    if r.tasks == 0 || !m.listing_progress()?.complete {
        return Ok(());
    }
    let what = match kind {
        RefreshKind::Events => format!("{keys} changed keys listed"),
        RefreshKind::Poll => "poll".into(),
        RefreshKind::Reconcile => "reconcile (found what events missed)".into(),
    };
    crate::say!("follow: refresh {g}, {what}: {} new tasks", r.tasks);
    Ok(())
}

async fn stop_ticker<C: S3Client>(ticker: tokio::task::JoinHandle<()>, copier: &Arc<Copier<C>>) {
    ticker.abort();
    let _ = ticker.await;
    copier.record_progress(None);
    copier.flush().await;
}

/// When polls and reconciles are due, and what `--until-caught-up` has seen.
struct Schedule {
    poll_every: Option<Duration>,
    reconcile_every: Option<Duration>,
    next_poll: Option<Instant>,
    next_reconcile: Option<Instant>,
    /// The reconcile `--until-caught-up` started (its generation), and the changes
    /// received before it started.
    checking: Option<(i64, u64)>,
    /// The generation of this process's last reconcile, once it completed: its tasks.
    last_check: Option<(i64, u64, u64)>,
}

impl Schedule {
    fn new(args: &FollowArgs, m: &Manifest) -> Result<Schedule, JobError> {
        let now = Instant::now();
        let poll_every = args.poll_every();
        let reconcile_every = args.reconcile_every();
        // The reconciler goes on from the job's last reconcile (or first follow) across
        // restarts; a poll is due at once (what changed while no one followed).
        let facts = m.follow_facts()?;
        let since = facts
            .last_reconcile
            .map(|(_, started, _, _)| started)
            .unwrap_or_else(crate::events::ticker::now_secs);
        let next_reconcile = reconcile_every.map(|every| {
            let age = (crate::events::ticker::now_secs() - since).max(0) as u64;
            now + every.saturating_sub(Duration::from_secs(age))
        });
        Ok(Schedule {
            poll_every,
            reconcile_every,
            next_poll: poll_every.map(|_| now),
            next_reconcile,
            checking: None,
            last_check: None,
        })
    }

    fn describe(&self, args: &FollowArgs) -> String {
        let intake = match (&args.events, self.poll_every) {
            (Some(e), Some(p)) => format!("events from {e}, polling every {}s", p.as_secs()),
            (Some(e), None) => format!("events from {e}"),
            (None, Some(p)) => format!("polling every {}s", p.as_secs()),
            (None, None) => "no intake".into(),
        };
        let reconcile = match self.reconcile_every {
            Some(r) => format!("reconcile every {}s", r.as_secs()),
            None => "no reconcile".into(),
        };
        format!("following: {intake}; {reconcile}")
    }

    /// The round to run now: an unfinished listing is continued first (its kind is what
    /// started it); else a due reconcile, a due poll, pending keys, or nothing (copy what
    /// is open, or wait).
    fn next_round(&self, m: &Manifest) -> Result<Option<RefreshKind>, JobError> {
        if !m.listing_progress()?.complete {
            return Ok(None);
        }
        let now = Instant::now();
        let kind = if self.next_reconcile.is_some_and(|t| t <= now) {
            Some(RefreshKind::Reconcile)
        } else if self.next_poll.is_some_and(|t| t <= now) {
            Some(RefreshKind::Poll)
        } else if m.follow_facts()?.pending_keys > 0 {
            Some(RefreshKind::Events)
        } else {
            None
        };
        Ok(kind)
    }

    /// A refresh of `kind` started as generation `g`.
    fn started(&mut self, kind: RefreshKind, g: i64, m: &Manifest) -> Result<(), JobError> {
        let now = Instant::now();
        match kind {
            RefreshKind::Reconcile => {
                self.next_reconcile = self.reconcile_every.map(|e| now + e);
                // A poll is a full listing too: none is needed right after.
                self.next_poll = self.poll_every.map(|e| now + e);
                self.checking = Some((g, m.follow_facts()?.events));
            }
            RefreshKind::Poll => self.next_poll = self.poll_every.map(|e| now + e),
            RefreshKind::Events => {}
        }
        Ok(())
    }

    /// After a round: a reconcile whose listing completed is recorded.
    fn round_done(&mut self, m: &Manifest) -> Result<(), JobError> {
        if let Some((g, events)) = self.checking {
            if m.listing_progress()?.complete {
                let tasks = m
                    .refreshes()?
                    .iter()
                    .find(|r| r.generation == g)
                    .map_or(0, |r| r.tasks);
                self.last_check = Some((g, tasks, events));
                self.checking = None;
            }
        }
        Ok(())
    }

    /// `--until-caught-up`, with nothing open and nothing listing: caught up when nothing
    /// is pending or queued and this process's last reconcile found nothing new and no
    /// change came since it started; else a reconcile is due now.
    fn caught_up(&mut self, m: &Manifest, changes: &Changes) -> Result<bool, JobError> {
        let facts = m.follow_facts()?;
        let queued = changes.backlog.load(std::sync::atomic::Ordering::SeqCst);
        if facts.pending_keys > 0 || queued > 0 {
            return Ok(false);
        }
        if let Some((_, 0, events)) = self.last_check {
            if facts.events == events {
                return Ok(true);
            }
        }
        if self.checking.is_none() {
            self.next_reconcile = Some(Instant::now());
        }
        Ok(false)
    }

    /// When to look again while idle.
    fn next_due(&self, until_caught_up: bool) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let mut at = [self.next_poll, self.next_reconcile]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(far);
        if until_caught_up {
            // The queue's backlog is looked at again soon.
            at = at.min(Instant::now() + Duration::from_millis(500));
        }
        at
    }
}

/// The intake of `--events`, running beside the rounds until dropped.
struct IntakeTask(tokio::task::JoinHandle<()>);

impl Drop for IntakeTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Opens `--events` (a port in use, a queue that does not exist: an error now) and starts
/// its task: each batch received is filtered to the job's bucket and prefix, stored as
/// pending keys (durable), then acknowledged, and the rounds are woken. A batch that
/// cannot be stored is not acknowledged (the queue sends it again; a POST gets 503).
async fn start_intake(
    source: &crate::follow::intake::EventSource,
    manifest: &std::path::Path,
    settings: &crate::config::JobSettings,
    timeouts: crate::s3::Timeouts,
    changes: &Changes,
) -> Result<IntakeTask, JobError> {
    use crate::follow::intake::Intake;
    let mut intake = Intake::open(source, &settings.source_side, timeouts)
        .await
        .map_err(|e| JobError::Usage(e.to_string()))?;
    crate::say!("follow: listening to {}", intake.describe());
    let m = Manifest::open(manifest, false)?;
    m.wait_for_locks_briefly()?;
    let bucket = settings.source.bucket.clone();
    let prefix = settings.selection.prefix.clone();
    let changes = changes.clone();
    let task = tokio::spawn(async move {
        let mut failing = false;
        loop {
            let got = match intake.receive(Duration::from_secs(1)).await {
                Ok(got) => got,
                Err(e) => {
                    if !failing {
                        crate::say!("warning: events: {e} (trying again)");
                    }
                    failing = true;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if got.is_empty() {
                match intake.backlog().await {
                    Ok(n) => changes
                        .backlog
                        .store(n, std::sync::atomic::Ordering::SeqCst),
                    Err(_) => changes
                        .backlog
                        .store(1, std::sync::atomic::Ordering::SeqCst),
                }
                continue;
            }
            let pending: Vec<PendingChange> = got
                .iter()
                .flat_map(|d| &d.changes)
                .filter(|c| c.bucket == bucket && c.key.starts_with(&prefix))
                .map(|c| PendingChange {
                    key: c.key.clone(),
                    event_ms: c.event_time_ms,
                })
                .collect();
            if let Err(e) = m.add_pending(&pending) {
                crate::say!(
                    "warning: events: could not store {} changes: {e}",
                    pending.len()
                );
                drop(got);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            if let Err(e) = intake.ack(got).await {
                // Stored: a message received again is only listed once more.
                crate::say!("warning: events: acknowledging: {e}");
            }
            failing = false;
            changes.stored.notify_one();
        }
    });
    Ok(IntakeTask(task))
}

#[cfg(test)]
mod tests {
    use crate::copier::tests::{plan_with, settings, SRC};
    use crate::lister::Lister;
    use crate::manifest::{Manifest, PendingChange, PendingKeys, RefreshKind, State};
    use crate::s3::fake::FakeServer;
    use crate::s3::{Side, S3};

    fn changed(keys: &[&str]) -> Vec<PendingChange> {
        keys.iter()
            .map(|k| PendingChange {
                key: k.to_string(),
                event_ms: None,
            })
            .collect()
    }

    /// Lists what the manifest's unfinished listing asks (a scoped or full refresh).
    async fn list(s: &FakeServer, m: &mut Manifest) {
        let settings = m.require_settings().unwrap();
        let source = S3::alone(s.client(Side::Source), 4);
        let lister = Lister::new(&settings, &source, None, true);
        lister.list_parallel(m, 4, |_| {}).await.unwrap();
    }

    /// (version id, delete marker, state) of each task of `key`, oldest first.
    fn history(m: &Manifest, key: &str) -> Vec<(String, bool, State)> {
        m.tasks_of_key(key)
            .unwrap()
            .into_iter()
            .map(|t| (t.entry.version_id, t.entry.is_delete_marker, t.state))
            .collect()
    }

    #[tokio::test]
    async fn a_scoped_refresh_plans_only_the_changed_keys_and_puts_the_whole_listing_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.db");
        let s = FakeServer::new();
        s.create_bucket(SRC, true);
        s.create_bucket("dst", true);
        let a1 = s.put(SRC, "a", b"1", &[]);
        s.put(SRC, "b", b"1", &[]);
        s.put(SRC, "c", b"1", &[]);
        plan_with(&s, &path, &settings()).await;
        let mut m = Manifest::open(&path, false).unwrap();
        m.start_following().unwrap();
        // Changes: a new version of a, a new key d, b deleted; b's event is lost.
        let a2 = s.put(SRC, "a", b"2", &[]);
        let d1 = s.put(SRC, "d", b"1", &[]);
        let b_marker = s.delete(SRC, "b");
        m.add_pending(&changed(&["d", "a"])).unwrap();
        m.add_pending(&changed(&["a"])).unwrap();
        let pending = m.pending_keys(100).unwrap();
        assert_eq!(pending.keys, ["a", "d"]);
        let g = m
            .start_follow_refresh(RefreshKind::Events, &pending, true)
            .unwrap()
            .expect("the listing was complete");
        assert!(!m.listing_progress().unwrap().complete);
        assert_eq!(m.partitions().unwrap().len(), 2, "one partition per key");
        // A change to `a` that comes while the round lists stays pending.
        m.add_pending(&changed(&["a"])).unwrap();
        list(&s, &mut m).await;
        let pending_after: Vec<String> = m.pending_keys(100).unwrap().keys;
        assert_eq!(pending_after, ["a"], "the newer event of a stays pending");
        let p = m.partitions().unwrap();
        assert_eq!(p.len(), 1, "the whole bucket again: {p:?}");
        assert!(p[0].listing.complete && p[0].start_key.is_none() && p[0].end_key.is_none());
        assert_eq!(
            history(&m, "a"),
            [(a1, false, State::Pending), (a2, false, State::Pending)]
        );
        assert_eq!(history(&m, "d"), [(d1, false, State::Pending)]);
        assert_eq!(history(&m, "b").len(), 1, "b was not in the round");
        assert_eq!(m.refreshes().unwrap().last().unwrap().tasks, 2);
        assert_eq!(m.refreshes().unwrap().last().unwrap().generation, g);
        // A full reconcile catches the lost event and counts what it found.
        let g2 = m
            .start_follow_refresh(RefreshKind::Reconcile, &PendingKeys::default(), true)
            .unwrap()
            .unwrap();
        list(&s, &mut m).await;
        assert_eq!(
            history(&m, "b").last().map(|t| (&t.0, t.1)),
            Some((&b_marker, true))
        );
        let f = m.follow_facts().unwrap();
        assert_eq!(f.found_by_reconcile, 1);
        assert_eq!(
            f.last_reconcile.map(|r| (r.0, r.2, r.3)),
            Some((g2, 1, true))
        );
        assert_eq!(f.events, 4);
    }

    #[tokio::test]
    async fn a_scoped_refresh_of_an_unversioned_source_deletes_only_its_keys_found_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.db");
        let s = FakeServer::new();
        s.create_bucket(SRC, false);
        s.create_bucket("dst", true);
        for k in ["x", "y", "z"] {
            s.put(SRC, k, b"1", &[]);
        }
        plan_with(&s, &path, &settings()).await;
        let mut m = Manifest::open(&path, false).unwrap();
        m.start_following().unwrap();
        s.put(SRC, "x", b"2", &[]);
        s.delete(SRC, "y");
        // z is deleted too, but no event says so: a scoped round must not see it as gone.
        s.delete(SRC, "z");
        m.add_pending(&changed(&["x", "y"])).unwrap();
        let pending = m.pending_keys(100).unwrap();
        m.start_follow_refresh(RefreshKind::Events, &pending, false)
            .unwrap()
            .unwrap();
        list(&s, &mut m).await;
        let x = history(&m, "x");
        assert_eq!(x.len(), 2, "the overwrite is a new task: {x:?}");
        let y = history(&m, "y");
        assert_eq!(y.len(), 2, "y's delete is planned: {y:?}");
        assert!(y[1].1, "a delete");
        assert_eq!(history(&m, "z").len(), 1, "z was not looked for");
        assert_eq!(m.follow_facts().unwrap().pending_keys, 0);
    }
}
