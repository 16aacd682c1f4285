//! job::run: the `run` command: the stored settings with this run's overrides, put-back
//! tasks, the run's clients and handles, the copier, the listing that runs beside it when
//! the listing is unfinished, the `--metrics` endpoint, and SIGINT/SIGTERM.
//!
//! May call: every stage.

use super::open::probe_other_dest;
use super::routed::RoutedClient;
use super::{bucket_error, lock_manifest, preflight, JobError};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use indicatif::ProgressBar;
use tokio::sync::watch;

use crate::cli::RunArgs;
use crate::config::JobSettings;
use crate::copier::{Copier, DestFacts, DestinationFacts, ListingState, RunOptions, RunSummary};
use crate::lister::{ListStats, Lister};
use crate::manifest::pg::limits::JobLimits;
use crate::manifest::Manifest;
use crate::metrics::{self, MetricsServer};
use crate::s3::bandwidth::Bandwidth;
use crate::s3::{build, BucketFacts, ErrorClass, S3Client, S3Error, Side, Sides, Timeouts, S3};
use crate::{estimate, ui};

/// The stored settings with this run's overrides of endpoints and profiles.
pub(super) fn run_settings(m: &Manifest, args: &RunArgs) -> Result<JobSettings, JobError> {
    let mut settings = m.require_settings()?;
    args.overrides.apply(&mut settings);
    Ok(settings)
}

/// Puts failed tasks back, or gives up on them, as the run's flags ask.
pub(super) fn requeue(m: &Manifest, args: &RunArgs) -> Result<(), JobError> {
    if args.retry_failed {
        let n = m.retry_failed()?;
        crate::say!("{n} failed tasks put back in the queue");
    }
    if args.skip_failed {
        let n = m.skip_failed()?;
        crate::say!(
            "{n} failed tasks recorded as skipped; their keys' later versions will be copied"
        );
    }
    if args.retry_skipped {
        let (n, kept) = m.retry_skipped()?;
        crate::say!(
            "{n} skipped tasks put back in the queue (versions gone from the source stay skipped)"
        );
        if kept > 0 {
            crate::say!("{kept} skipped tasks stay skipped: newer versions of their keys were copied since, and they would be written out of order (see `s3-backfill report`)");
        }
    }
    Ok(())
}

/// Both clients of a run, and what it knows of the destination. `auto` compares the
/// endpoints the clients really reach: two profiles that each set their own `endpoint_url`
/// are two providers, even though no endpoint option was given.
pub(super) async fn run_clients(
    settings: &mut JobSettings,
    timeouts: Timeouts,
    bandwidth: Option<Arc<Bandwidth>>,
) -> Result<((RoutedClient, RoutedClient), DestinationFacts), JobError> {
    let (source, source_endpoint) = build(Side::Source, &settings.source_side, timeouts).await;
    let (dest, dest_endpoint) = build(Side::Dest, &settings.dest_side, timeouts).await;
    let (source, dest) = (
        source.limited_by(bandwidth.clone()),
        dest.limited_by(bandwidth),
    );
    settings.source_side.endpoint = source_endpoint;
    settings.dest_side.endpoint = dest_endpoint;
    let probed = preflight(&dest)
        .req()
        .probe_bucket(&settings.dest.bucket)
        .await;
    let facts = dest_facts(&settings.dest.bucket, probed)?;
    let mut all = DestinationFacts::from(facts);
    let mut others: Vec<String> = settings
        .destinations
        .iter()
        .map(|d| d.bucket.clone())
        .filter(|b| *b != settings.dest.bucket)
        .collect();
    others.sort();
    others.dedup();
    let mut regional = std::collections::BTreeMap::new();
    for b in others {
        let probed = probe_other_dest(&dest, &settings.dest_side, &b, timeouts).await;
        let probed = probed.map(|(f, there)| {
            if let Some(c) = there {
                regional.insert(b.clone(), c);
            }
            f
        });
        let f = dest_facts(&b, probed)?;
        all.buckets.insert(b, f);
    }
    let dest = RoutedClient {
        main: dest,
        by_bucket: Arc::new(regional),
    };
    Ok(((RoutedClient::single(source), dest), all))
}

/// What a run knows of a destination bucket from its probe. A missing or unreadable bucket
/// is said and left to the tasks and the failure threshold, which stop the job with the
/// error; any other failure stops the run now.
fn dest_facts(bucket: &str, probed: Result<BucketFacts, S3Error>) -> Result<DestFacts, JobError> {
    match probed {
        Ok(f) => Ok(DestFacts {
            versioned: f.versioned,
            object_lock: f.object_lock,
        }),
        Err(e) if e.class == ErrorClass::Fatal => {
            crate::say!("warning: {}", bucket_error(Side::Dest, bucket, e));
            Ok(DestFacts {
                versioned: true,
                object_lock: false,
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// The source bucket's versioning, for reading `null` versions (see
/// `Copier::set_source_facts`); when the probe fails, said, and `null` versions are read by
/// key (pinned to their listed ETags either way).
pub(super) async fn source_facts<C: S3Client + Clone>(source: &C, bucket: &str) -> BucketFacts {
    match preflight(source).req().probe_bucket(bucket).await {
        Ok(f) => f,
        Err(e) => {
            crate::say!(
                "warning: {}; null versions are read by key, pinned to their listed ETags",
                bucket_error(Side::Source, bucket, e)
            );
            BucketFacts::default()
        }
    }
}

/// What stops a run from outside, an input of the run (main passes [`signals`], a test a
/// channel of its own): the first message stops taking new tasks (and stops the listing)
/// and lets requests in flight finish, bounded by the grace period; the second abandons
/// them at once (the next run reconciles what was in flight). Either way the run returns
/// its summary, marked interrupted.
pub type Shutdown = tokio::sync::mpsc::UnboundedReceiver<()>;

/// SIGINT and SIGTERM, each a message of a [`Shutdown`].
pub fn signals() -> Shutdown {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            wait_signal().await;
            if tx.send(()).is_err() {
                break;
            }
        }
    });
    rx
}

/// `run`: copies the manifest's open tasks; on an unfinished listing, it lists the rest
/// too (with the job's stored settings), copying while it lists, until done or stopped by
/// `shutdown`.
pub async fn run(args: &RunArgs, shutdown: Shutdown) -> Result<RunSummary, JobError> {
    let _lock = lock_manifest(&args.manifest)?;
    run_locked(args, shutdown).await
}

/// A run's job, opened (see [`RunJob::open`]); [`RunJob::copier`] hands out its copier.
pub(super) struct RunJob<'a> {
    args: &'a RunArgs,
    pub(super) manifest: Manifest,
    /// The stored settings with this run's overrides, the endpoints reached.
    pub(super) settings: JobSettings,
    clients: (RoutedClient, RoutedClient),
    facts: DestinationFacts,
}

impl<'a> RunJob<'a> {
    /// The manifest (locked by the caller), its settings with this run's overrides, the
    /// tasks put back as asked, the run's clients with every destination probed; a job
    /// copying several versions of a key into an unversioned bucket is refused.
    pub(super) async fn open(args: &'a RunArgs) -> Result<RunJob<'a>, JobError> {
        let manifest = Manifest::open(&args.manifest, false)?;
        let mut settings = run_settings(&manifest, args)?;
        requeue(&manifest, args)?;
        let (clients, facts) =
            run_clients(&mut settings, args.exec.timeouts(), args.exec.bandwidth()).await?;
        // Keys listed from here on are checked by the lister, page by page.
        let unversioned = std::iter::once((&settings.dest.bucket, facts.default))
            .chain(facts.buckets.iter().map(|(b, f)| (b, *f)))
            .find(|(_, f)| !f.versioned)
            .map(|(b, _)| b.clone());
        if let Some(bucket) = unversioned {
            if !settings.selection.latest_only && manifest.has_multi_version_key()? {
                return Err(JobError::Usage(format!(
                    "dest: bucket {bucket} does not have versioning enabled, but the job copies several versions of some keys; enable versioning on it"
                )));
            }
        }
        Ok(RunJob {
            args,
            manifest,
            settings,
            clients,
            facts,
        })
    }

    /// Whether every destination keeps versions (else a listed key with several is refused).
    pub(super) fn dest_versioned(&self) -> bool {
        let f = &self.facts;
        let all = f.default.versioned && f.buckets.values().all(|f| f.versioned);
        all || self.settings.selection.latest_only
    }

    /// The run's options: the flags, and `--max-cost` priced with the plan's stored facts.
    pub(super) fn options(&self) -> Result<RunOptions, JobError> {
        let (args, settings) = (self.args, &self.settings);
        let mut opts = args.exec.run_options();
        if let Some(max_usd) = args.exec.max_cost {
            let stored = self.manifest.estimate_facts()?;
            opts.limits.max_cost = Some(crate::pricing::CostLimit {
                max_usd,
                prices: estimate::prices_of(&stored, args.prices.as_ref()),
                across: !settings.server_side()
                    && settings.source_side.endpoint != settings.dest_side.endpoint,
            });
        }
        Ok(opts)
    }

    /// The copier, with the leftovers of earlier runs taken up (uploads aborted, version
    /// ids to learn), and the run's handles (a listing beside the copy shares them).
    pub(super) async fn copier(
        self,
        opts: &RunOptions,
        bar: ProgressBar,
    ) -> Result<(Arc<Copier<RoutedClient>>, Sides<RoutedClient>), JobError> {
        let m = self.manifest;
        let uploads = m.open_uploads()?;
        let to_learn = m.versions_to_learn()?;
        let source_bucket = source_facts(&self.clients.0, &self.settings.source.bucket).await;
        let sides = opts.sides(self.clients);
        let copier = Copier::new(
            self.settings,
            sides.clone(),
            self.facts,
            m.into_writer(),
            opts,
            bar,
        );
        copier.set_source_facts(&source_bucket);
        copier.abort_leftover_uploads(uploads).await;
        copier.learn_leftovers(to_learn);
        Ok((copier, sides))
    }
}

/// The `--metrics` endpoint of a run (None without the flag): bound before any work, so a
/// port in use stops the command (exit 2); it serves until dropped.
pub(crate) fn serve_metrics(args: &RunArgs) -> Result<Option<MetricsServer>, JobError> {
    let Some(addr) = args.exec.metrics else {
        return Ok(None);
    };
    let job = crate::manifest::job_name(&args.manifest);
    let server =
        metrics::serve(addr, &args.manifest, &job).map_err(|e| JobError::Usage(e.to_string()))?;
    crate::say!("metrics at http://{}/metrics", server.addr());
    Ok(Some(server))
}

/// `run` once the manifest is locked.
pub(super) async fn run_locked(
    args: &RunArgs,
    mut shutdown: Shutdown,
) -> Result<RunSummary, JobError> {
    let metrics = serve_metrics(args)?;
    let job = RunJob::open(args).await?;
    let shared = job.manifest.is_shared();
    let counts = job.manifest.counts()?;
    let listing = !job.manifest.listing_progress()?.complete;
    let show = ui::show_progress(args.no_progress);
    let open = counts.pending + counts.in_progress;
    let bar = match listing {
        true => ui::live_copy_bar(show, open),
        false => ui::copy_bar(show, open),
    };
    if listing {
        job.manifest.wait_for_locks_briefly()?;
    }
    let opts = job.options()?;
    let (settings, dest_versioned) = (job.settings.clone(), job.dest_versioned());
    let bandwidth = job.clients.1.main.bandwidth();
    let (copier, sides) = job.copier(&opts, bar.clone()).await?;
    // On a PostgreSQL job, --max-rps and --max-bandwidth hold for all its processes
    // together, with one AIMD on throttling (until dropped at the end of the run).
    let retriers = vec![sides.dest.retrier().clone()];
    let limits = JobLimits::for_run(&args.manifest, opts.max_rps, bandwidth, retriers).await;
    if let Some(m) = &metrics {
        m.attach(metrics::Live::of(&sides));
    }
    let grace = args.exec.grace_period;
    let timer = {
        let copier = copier.clone();
        tokio::spawn(async move { copier.stop_at_max_duration().await })
    };
    let ticker = {
        let copier = copier.clone();
        let ticker = crate::events::ticker::Ticker {
            manifest: args.manifest.clone(),
            interval: args.log.interval(),
            lines: ui::progress_lines(),
            persist: move |p| copier.record_progress(Some(p)),
        };
        tokio::spawn(ticker.run())
    };
    let live = || LiveListing {
        path: &args.manifest,
        settings: &settings,
        source: &sides.source,
        dest: &sides.dest,
        dest_versioned,
        concurrency: args.list_concurrency as usize,
        page_size: args.list_page_size,
        bar: bar.clone(),
        log_every: args.log.interval(),
        quiet: false,
    };
    let result = if shared {
        // A shared manifest: list the parts no one lists, copy the units no one holds, and
        // again while other processes hold work (a dead one's comes back when its leases
        // expire) or still list.
        let work = async {
            let poll = Duration::from_secs(2);
            loop {
                let open = Manifest::open(&args.manifest, false)?.listing_progress()?;
                let summary = match open.complete {
                    false => copy_while_listing(&copier, live()).await?,
                    true => copier.clone().run_shared(poll).await,
                };
                if copier.stopping() || !copier.work_left().await {
                    return Ok(summary);
                }
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = copier.until_stopped() => return Ok(summary),
                }
            }
        };
        run_until_stopped(&copier, grace, &mut shutdown, work).await
    } else if listing {
        run_until_stopped(
            &copier,
            grace,
            &mut shutdown,
            copy_while_listing(&copier, live()),
        )
        .await
    } else {
        let work = async { Ok(copier.clone().run().await) };
        run_until_stopped(&copier, grace, &mut shutdown, work).await
    };
    timer.abort();
    ticker.abort();
    let _ = ticker.await;
    // The run is over: `status` shows no rate or ETA for it.
    copier.record_progress(None);
    copier.flush().await;
    // This process's share of the job's limits goes back to the others.
    if let Some(limits) = limits {
        limits.stop().await;
    }
    result.unwrap_or_else(|| {
        Ok(RunSummary {
            interrupted: true,
            ..RunSummary::default()
        })
    })
}

/// What a listing beside a run needs, and the bar that shows both.
pub(crate) struct LiveListing<'a, C> {
    /// The manifest (the lister commits its pages through a connection of its own).
    pub(crate) path: &'a Path,
    /// The job.
    pub(crate) settings: &'a JobSettings,
    /// Reads the source (the run's handle: the listing is under the run's bound).
    pub(crate) source: &'a S3<C>,
    /// Reads destination 0 (for `--replication-status`).
    pub(crate) dest: &'a S3<C>,
    /// Whether the destination keeps versions (else a key with several is refused).
    pub(crate) dest_versioned: bool,
    /// Listing parts walked at once (an unstarted listing is split into this many).
    pub(crate) concurrency: usize,
    /// Entries per listing page (`--list-page-size`).
    pub(crate) page_size: i32,
    /// The run's bar: its length grows with each page's tasks.
    pub(crate) bar: ProgressBar,
    /// How often a `listing` event is written (JSON; None: only at the end).
    pub(crate) log_every: Option<Duration>,
    /// Nothing said when the listing completes (`follow` says its rounds its own way).
    pub(crate) quiet: bool,
}

/// Lists the rest of the source while the copier copies what is listed. The lister commits
/// each page with its checkpoint on its own connection (SQLite serializes it with the
/// copier's writer); each commit wakes the scheduler. A stop of the run stops the listing;
/// a listing error stops the run and is returned.
pub(crate) async fn copy_while_listing<C: S3Client + Clone>(
    copier: &Arc<Copier<C>>,
    live: LiveListing<'_, C>,
) -> Result<RunSummary, JobError> {
    let mut lm = Manifest::open(live.path, false)?;
    lm.wait_for_locks_briefly()?;
    let monitor = Manifest::open(live.path, false)?;
    let (tx, rx) = watch::channel(ListingState::default());
    let scheduler = tokio::spawn(copier.clone().run_beside_listing(rx));
    let mut lister = Lister::new(
        live.settings,
        live.source,
        Some(live.dest),
        live.dest_versioned,
    );
    lister.page_size = live.page_size;
    let mut bar = LiveBar::new(&monitor, live.bar);
    // The run's progress lines say how far the copy is; in JSON the listing has its events.
    let log = crate::events::ListingLog::new(live.log_every, false);
    let listed = tokio::select! {
        r = lister.list_parallel(&mut lm, live.concurrency, |cp| {
            tx.send_modify(|s| s.pages += 1);
            bar.page();
            log.page(cp.entries, cp.pages);
        }) => Some(r),
        _ = copier.until_stopped() => None,
    };
    let complete = matches!(listed, Some(Ok(_))) && lm.listing_progress().is_ok_and(|p| p.complete);
    tx.send_modify(|s| {
        s.finished = true;
        s.complete = complete;
    });
    bar.listed(complete);
    let error = match listed {
        Some(Ok(stats)) => {
            if let Ok(l) = lm.listing() {
                log.complete(l.entries, l.pages);
            }
            if !live.quiet {
                bar.say_listed(&stats);
            }
            None
        }
        Some(Err(e)) => {
            let e = JobError::from(e);
            copier.abort(format!("listing: {e}"));
            Some(e)
        }
        _ => None,
    };
    let summary = scheduler
        .await
        .map_err(|e| JobError::Other(format!("the copy scheduler failed: {e}")))?;
    error.map_or(Ok(summary), Err)
}

/// The copy bar while listing: its length grows with the tasks each page adds, its prefix
/// says how far the listing is. Reads the manifest's counters only when the bar is drawn.
pub(super) struct LiveBar<'a> {
    monitor: &'a Manifest,
    bar: ProgressBar,
    total: Option<u64>,
}

impl<'a> LiveBar<'a> {
    fn new(monitor: &'a Manifest, bar: ProgressBar) -> LiveBar<'a> {
        let mut b = LiveBar {
            monitor,
            bar,
            total: None,
        };
        b.page();
        b
    }

    /// After a committed page.
    fn page(&mut self) {
        if self.bar.is_hidden() {
            return;
        }
        let Ok(c) = self.monitor.counts() else { return };
        if let Some(before) = self.total {
            self.bar.inc_length(c.total.saturating_sub(before));
        }
        self.total = Some(c.total);
        self.bar.set_prefix(format!("{} listed", c.listed_entries));
    }

    /// The line said once the listing is complete (above the bar when there is one).
    fn say_listed(&self, stats: &ListStats) {
        let Ok(c) = self.monitor.counts() else { return };
        let note = stats.not_split.as_ref().map(|why| format!("note: {why}"));
        let generation = self
            .monitor
            .refreshes()
            .ok()
            .and_then(|r| r.last().map(|r| r.generation));
        let refresh = generation.filter(|g| *g > 0);
        let line = ui::listed_line("listing complete:", &c, stats.resumed, refresh);
        for line in note.into_iter().chain([line]) {
            match self.bar.is_hidden() {
                true => crate::say!("{line}"),
                false => self.bar.println(line),
            }
        }
    }

    /// Once the lister stopped.
    fn listed(&mut self, complete: bool) {
        self.page();
        if complete {
            self.bar.set_prefix("complete");
        }
    }
}

/// Runs `work` until it ends or `shutdown` stops it: the first message stops the copier
/// taking tasks, and `work` gets the grace period to finish what is in flight; a second
/// message, or the grace period running out, abandons it (None).
pub(super) async fn run_until_stopped<C: S3Client, T>(
    copier: &Arc<Copier<C>>,
    grace: u64,
    shutdown: &mut Shutdown,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    let grace = Duration::from_secs(grace);
    let stopped = async {
        if shutdown.recv().await.is_none() {
            // No one can stop this run.
            return std::future::pending().await;
        }
        crate::say!(
            "stopping: no new tasks; waiting up to {}s for requests in flight (press Ctrl-C again to stop now)",
            grace.as_secs()
        );
        copier.stop();
        tokio::select! {
            Some(()) = shutdown.recv() => {
                crate::say!("stopping now: abandoning requests in flight; the next `run` reconciles them");
            }
            _ = tokio::time::sleep(grace) => {
                crate::say!("grace period over: abandoning requests still in flight");
            }
        }
    };
    tokio::select! {
        s = work => Some(s),
        _ = stopped => None,
    }
}

async fn wait_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copier::tests::{copier, opts, plan_with, settings, DST, SRC};
    use crate::s3::fake::FakeServer;

    /// A copier over a planned job of one key (nothing of it runs in these tests: the work
    /// stands for the run).
    async fn planned() -> (tempfile::TempDir, Arc<Copier<crate::s3::fake::FakeS3>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.db");
        let s = FakeServer::new();
        s.create_bucket(SRC, true);
        s.create_bucket(DST, true);
        s.put(SRC, "k", b"1", &[]);
        plan_with(&s, &path, &settings()).await;
        let c = copier(&s, &path, &opts());
        (dir, c)
    }

    #[tokio::test]
    async fn a_second_stop_abandons_what_is_in_flight_at_once() {
        let (_dir, c) = planned().await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(()).unwrap();
        tx.send(()).unwrap();
        // Work that never ends by itself, and an hour of grace: only the second stop ends it.
        let work = std::future::pending::<()>();
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            run_until_stopped(&c, 3600, &mut rx, work),
        )
        .await
        .expect("returned without waiting for the grace period");
        assert!(out.is_none(), "abandoned");
        c.flush().await;
    }

    #[tokio::test]
    async fn a_first_stop_lets_the_work_finish_within_the_grace_period() {
        let (_dir, c) = planned().await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(()).unwrap();
        let work = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            "finished"
        };
        assert_eq!(
            run_until_stopped(&c, 3600, &mut rx, work).await,
            Some("finished")
        );
        // No one can stop a run whose sender is gone: it runs to its end.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        drop(tx);
        let work = async { "ran" };
        assert_eq!(run_until_stopped(&c, 0, &mut rx, work).await, Some("ran"));
        c.flush().await;
    }
}
