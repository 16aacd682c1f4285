//! job::plan: the `plan` command (a listing, a supplied manifest, `--dry-run`, `--refresh`)
//! and `replicate` (plan's checks and manifest, then a run that copies while listing).
//!
//! May call: every stage.

use super::open::{listing_done, Job, PlanJob};
use super::run::{run_locked, Shutdown};
use super::{bucket_error, lock_manifest, JobError};
use crate::cli::{PlanArgs, ReplicateArgs};
use crate::copier::RunSummary;
use crate::lister::supplied::Supplied;
use crate::manifest::Manifest;
use crate::s3::Side;
use crate::{estimate, ui};

/// `plan --dry-run`: lists and selects, prints the tallies and the estimate of a run's
/// cost, writes nothing.
async fn dry_run(job: Job<'_>) -> Result<(), JobError> {
    let (args, settings) = (job.args, &job.settings);
    let probe = job.estimate_probe().await;
    let mut stored = std::collections::BTreeMap::new();
    if probe.source_lock == Some(true) {
        stored.insert("source_lock".to_string(), "true".to_string());
    }
    if probe.rgw {
        stored.insert("server".to_string(), "ceph-rgw".to_string());
    }
    stored.insert("dest_versioned".into(), job.dest.versioned.to_string());
    let (est_facts, _) = estimate::inputs_of(&stored, &args.estimate);
    let mut feed = estimate::ListingFeed::new(estimate::Builder::new(settings, est_facts));
    let page_size = args.list_page_size;
    let tally =
        crate::select::dry_run_each(&job.selector(), page_size, |e, d| feed.entry(e, d)).await?;
    // The note `plan` prints when it cannot list in parts (the dry run itself lists in one):
    // a listing of one page is not split, so nothing is said of it.
    let (source, bucket) = (&job.sides.source, &settings.source.bucket);
    if args.list_concurrency > 1
        && tally.pages > 1
        && !crate::lister::markers_exact(source, bucket, &settings.selection.prefix).await?
    {
        crate::say!("note: {}", crate::lister::one_part_note(bucket));
    }
    for line in tally.lines() {
        crate::ui::outln!("{line}");
    }
    if let Some((mean, n)) = source.requests().mean_listing() {
        stored.insert(
            "latency_ms".into(),
            (mean.as_secs_f64() * 1000.0).to_string(),
        );
        stored.insert("latency_listings".into(), n.to_string());
    }
    let (_, timing) = estimate::inputs_of(&stored, &args.estimate);
    let prices = estimate::prices_of(&stored, args.estimate.prices.as_ref());
    for line in feed.finish(&prices, timing).lines(None) {
        crate::ui::outln!("{line}");
    }
    Ok(())
}

/// `plan --dry-run --from-csv/--from-inventory`: reads and selects the supplied manifest's
/// entries, prints the tallies, writes nothing.
async fn dry_run_supplied(job: Job<'_>, input: &Supplied) -> Result<(), JobError> {
    // Not refused in a dry run (as when listing).
    let tally = crate::lister::supplied::dry_run_supplied(&job.supplied(true), input).await?;
    for line in tally.lines() {
        crate::ui::outln!("{line}");
    }
    Ok(())
}

/// `plan`: lists the source into the manifest (resuming an unfinished listing).
pub async fn plan(args: &PlanArgs) -> Result<(), JobError> {
    // One request in flight per listing part; a supplied manifest's keys are read
    // CONCURRENCY at a time.
    let in_flight = match args.supplied() {
        Some(_) => crate::lister::supplied::CONCURRENCY,
        None => args.list_concurrency as usize,
    };
    if args.dry_run {
        let job = PlanJob::open_dry(args).await?.reach(in_flight).await?;
        return match args.supplied() {
            Some(input) => dry_run_supplied(job, &input).await,
            None => dry_run(job).await,
        };
    }
    let opened = PlanJob::open(args).await?;
    if !args.refresh && listing_done(opened.existing(), &args.manifest)? {
        return Ok(());
    }
    let mut job = opened.reach(in_flight).await?;
    if let Some(input) = args.supplied() {
        if job.has_manifest() {
            return Err(JobError::Usage(format!(
                "manifest {} exists with an unfinished listing; plan from a supplied manifest into a new --manifest",
                crate::manifest::shown(&args.manifest)
            )));
        }
        plan_supplied(&job, &input).await?;
        let probe = job.estimate_probe().await;
        let m = Manifest::open(&args.manifest, false)?;
        estimate::store_plan_facts(&m, &args.estimate, probe)?;
        let stored = m.require_settings()?;
        estimate::store_estimate(&m, &stored, &args.estimate, m.counts()?.total)?;
        return Ok(());
    }
    let mut m = job.manifest()?;
    if args.refresh {
        begin_refresh(&mut m, &job).await?;
    }
    let bar = ui::list_spinner(ui::show_progress(args.no_progress), m.listing()?.entries);
    let log = crate::events::ListingLog::new(args.log.interval(), ui::progress_lines());
    let stats = job
        .lister()
        .list_parallel(&mut m, in_flight, |cp| {
            bar.set_position(cp.entries);
            log.page(cp.entries, cp.pages);
        })
        .await;
    bar.finish_and_clear();
    let stats = stats?;
    let listed = m.listing()?;
    log.complete(listed.entries, listed.pages);
    let probe = job.estimate_probe().await;
    estimate::store_plan_facts(&m, &args.estimate, probe)?;
    estimate::store_estimate(&m, &job.settings, &args.estimate, m.counts()?.total)?;
    if let Some(why) = &stats.not_split {
        crate::say!("note: {why}");
    }
    let generation = m.refreshes()?.last().map(|r| r.generation);
    crate::say!(
        "{}",
        ui::listed_line(
            "planned",
            &m.counts()?,
            stats.resumed,
            generation.filter(|g| *g > 0)
        )
    );
    refresh_summary(&m)?;
    Ok(())
}

/// `plan --refresh`: starts a new listing generation on a complete listing, or continues
/// the unfinished one (a killed refresh, or a first listing not finished yet). Whether the
/// source's versioning is enabled now decides how a key that is no longer listed is taken
/// (see [`Manifest::start_refresh_of`]).
async fn begin_refresh(m: &mut Manifest, job: &Job<'_>) -> Result<(), JobError> {
    let bucket = &job.settings.source.bucket;
    let facts = job
        .sides
        .source
        .req()
        .probe_bucket(bucket)
        .await
        .map_err(|e| bucket_error(Side::Source, bucket, e))?;
    if let Some(g) = m.start_refresh_of(facts.versioned)? {
        crate::say!("refresh {g}: listing the source again");
        return Ok(());
    }
    match m.refreshes()?.last().map_or(0, |r| r.generation) {
        0 => {
            crate::say!("the first listing is not complete: continuing it (nothing to refresh yet)")
        }
        g => crate::say!("refresh {g}: continuing its listing from its checkpoint"),
    }
    Ok(())
}

/// After a complete refresh: what it added, how many tasks' versions are no longer selected
/// or gone, what it found deleted at a source without versioning, and what it kept from
/// being written out of order.
fn refresh_summary(m: &Manifest) -> Result<(), JobError> {
    let all = m.refreshes()?;
    let Some((last, earlier)) = all.split_last() else {
        return Ok(());
    };
    if last.generation == 0 || !m.listing()?.complete {
        return Ok(());
    }
    let before: u64 = earlier.iter().map(|r| r.tasks).sum();
    crate::say!(
        "refresh {}: {} new tasks; {} tasks of earlier listings are no longer selected or gone (not copied again)",
        last.generation,
        last.tasks,
        before.saturating_sub(last.matched)
    );
    for line in ui::refresh_findings(last) {
        crate::say!("refresh {}: {line}", last.generation);
    }
    Ok(())
}

/// `replicate`: `plan`'s checks and manifest, then a `run` that copies while the listing
/// goes on (a key once its whole history is listed), under one lock. Killed anywhere, the
/// next `replicate` (or `run`) continues both.
pub async fn replicate(args: &ReplicateArgs, shutdown: Shutdown) -> Result<RunSummary, JobError> {
    let plan = &args.plan;
    if plan.supplied().is_some() {
        // A supplied manifest is planned whole (no listing to copy beside), then copied.
        self::plan(plan).await?;
        let _lock = lock_manifest(&plan.manifest)?;
        return run_locked(&args.run(), shutdown).await;
    }
    let opened = PlanJob::open(plan).await?;
    let complete = match opened.existing() {
        Some(m) => m.listing_progress()?.complete,
        None => false,
    };
    // The lock is held until the run ends.
    let _lock = if !complete || plan.refresh {
        let mut job = opened.reach(plan.list_concurrency as usize).await?;
        let mut m = job.manifest()?;
        let probe = job.estimate_probe().await;
        estimate::store_plan_facts(&m, &plan.estimate, probe)?;
        if plan.refresh {
            begin_refresh(&mut m, &job).await?;
        }
        job.into_lock()
    } else {
        opened.into_lock()
    };
    run_locked(&args.run(), shutdown).await
}

/// `plan --from-csv/--from-inventory`: the tasks come from the supplied manifest; the
/// manifest appears only once complete (see `lister::supplied`).
async fn plan_supplied(job: &Job<'_>, input: &Supplied) -> Result<(), JobError> {
    let p =
        crate::lister::supplied::plan_supplied(&job.supplied(job.dest_versioned()), input).await?;
    let (what, from) = match input {
        Supplied::Csv(f) => ("CSV rows", f),
        Supplied::Inventory(f) => ("inventory entries", f),
    };
    crate::say!(
        "planned {} tasks ({} delete markers, {}) from {} {what} of {from}",
        p.counts.total,
        p.counts.delete_markers,
        indicatif::HumanBytes(p.counts.bytes_total),
        p.rows
    );
    Ok(())
}
