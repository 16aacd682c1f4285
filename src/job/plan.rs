//! job::plan: the `plan` command (a listing, a supplied manifest, `--dry-run`, `--refresh`)
//! and `replicate` (plan's checks and manifest, then a run that copies while listing).
//!
//! May call: every stage.

use super::open::{
    check_refresh, existing_manifest, listing_done, plan_clients, plan_probe, plan_settings,
    plan_sides, prepare_listing,
};
use super::run::run_locked;
use super::{bucket_error, lock_manifest, preflight, JobError};
use crate::cli::{PlanArgs, ReplicateArgs};
use crate::config::JobSettings;
use crate::copier::RunSummary;
use crate::inputs::plan::{Supplied, SuppliedJob};
use crate::lister::Lister;
use crate::manifest::Manifest;
use crate::s3::{RetryPolicy, SdkClient, Side, Sides};
use crate::select::Selector;
use crate::{estimate, ui};

/// `plan --dry-run`: lists and selects, prints the tallies and the estimate of a run's
/// cost, writes nothing.
pub(super) async fn dry_run(
    args: &PlanArgs,
    mut settings: JobSettings,
    source: Option<SdkClient>,
) -> Result<(), JobError> {
    let (source, dest, facts) = plan_clients(&mut settings, source).await?;
    let probe = plan_probe(&settings, &source, &facts).await;
    let sides = Sides::shared((source, dest), RetryPolicy::default(), 1, None);
    let selector = Selector {
        settings: &settings,
        source: &sides.source,
        dest: Some(&sides.dest),
    };
    let mut stored = std::collections::BTreeMap::new();
    if probe.source_lock == Some(true) {
        stored.insert("source_lock".to_string(), "true".to_string());
    }
    if probe.rgw {
        stored.insert("server".to_string(), "ceph-rgw".to_string());
    }
    stored.insert("dest_versioned".into(), facts.versioned.to_string());
    let (est_facts, _) = estimate::inputs_of(&stored, &args.estimate);
    let mut feed = estimate::ListingFeed::new(estimate::Builder::new(&settings, est_facts));
    let tally = crate::select::dry_run_each(&selector, crate::lister::page_size(), |e, d| {
        feed.entry(e, d)
    })
    .await?;
    // The note `plan` prints when it cannot list in parts (the dry run itself lists in one).
    let bucket = &settings.source.bucket;
    if !crate::lister::markers_exact(&sides.source, bucket, &settings.selection.prefix).await? {
        crate::say!("note: {}", crate::lister::one_part_note(bucket));
    }
    for line in tally.lines() {
        println!("{line}");
    }
    if let Some((mean, n)) = sides.source.requests().mean_listing() {
        stored.insert(
            "latency_ms".into(),
            (mean.as_secs_f64() * 1000.0).to_string(),
        );
        stored.insert("latency_listings".into(), n.to_string());
    }
    let (_, timing) = estimate::inputs_of(&stored, &args.estimate);
    let prices = estimate::prices_of(&stored, args.estimate.prices.as_ref());
    for line in feed.finish(&prices, timing).lines(None) {
        println!("{line}");
    }
    Ok(())
}

/// `plan --dry-run --from-csv/--from-inventory`: reads and selects the supplied manifest's
/// entries, prints the tallies, writes nothing.
pub(super) async fn dry_run_supplied(
    args: &PlanArgs,
    mut settings: JobSettings,
    source: Option<SdkClient>,
    input: &Supplied,
) -> Result<(), JobError> {
    let (source, dest, _) = plan_clients(&mut settings, source).await?;
    let sides = plan_sides(source, dest);
    let job = SuppliedJob {
        source: &sides.source,
        dest: Some(&sides.dest),
        settings: &settings,
        manifest: &args.manifest,
        // Not refused in a dry run (as when listing).
        dest_versioned: true,
    };
    let tally = crate::inputs::plan::dry_run_supplied(&job, input).await?;
    for line in tally.lines() {
        println!("{line}");
    }
    Ok(())
}

/// `plan`: lists the source into the manifest (resuming an unfinished listing).
pub async fn plan(args: &PlanArgs) -> Result<(), JobError> {
    let (mut settings, source) = plan_settings(args).await?;
    if args.dry_run {
        if let Some(input) = args.supplied() {
            return dry_run_supplied(args, settings, source, &input).await;
        }
        return dry_run(args, settings, source).await;
    }
    let _lock = lock_manifest(&args.manifest)?;
    let existing = existing_manifest(args, &settings)?;
    check_refresh(args, existing.as_ref(), &settings)?;
    if !args.refresh && listing_done(existing.as_ref(), &args.manifest)? {
        return Ok(());
    }
    if let Some(input) = args.supplied() {
        let (source, dest_client, dest) = plan_clients(&mut settings, source).await?;
        let sides = plan_sides(source.clone(), dest_client);
        let job = SuppliedJob {
            source: &sides.source,
            dest: Some(&sides.dest),
            settings: &settings,
            manifest: &args.manifest,
            dest_versioned: dest.versioned || settings.selection.latest_only,
        };
        plan_supplied(args, existing, &job, &input).await?;
        let probe = plan_probe(&settings, &source, &dest).await;
        let m = Manifest::open(&args.manifest, false)?;
        estimate::store_plan_facts(&m, &args.estimate, probe)?;
        let stored = m.require_settings()?;
        estimate::store_estimate(&m, &stored, &args.estimate, m.counts()?.total)?;
        return Ok(());
    }
    let (mut m, settings, source, dest_client, dest) =
        prepare_listing(settings, source, existing, &args.manifest).await?;
    if args.refresh {
        begin_refresh(&mut m, &source, &settings).await?;
    }
    let bar = ui::list_spinner(ui::show_progress(args.no_progress), m.listing()?.entries);
    let concurrency = args.list_concurrency as usize;
    // One request in flight per listing part.
    let sides = Sides::shared(
        (source.clone(), dest_client),
        RetryPolicy::default(),
        concurrency,
        None,
    );
    let dest_versioned = dest.versioned || settings.selection.latest_only;
    let lister = Lister::new(&settings, &sides.source, Some(&sides.dest), dest_versioned);
    let log = crate::events::ListingLog::new(args.log.interval(), ui::progress_lines());
    let stats = lister
        .list_parallel(&mut m, concurrency, |cp| {
            bar.set_position(cp.entries);
            log.page(cp.entries, cp.pages);
        })
        .await;
    bar.finish_and_clear();
    let stats = stats?;
    let listed = m.listing()?;
    log.complete(listed.entries, listed.pages);
    let probe = plan_probe(&settings, &source, &dest).await;
    estimate::store_plan_facts(&m, &args.estimate, probe)?;
    estimate::store_estimate(&m, &settings, &args.estimate, m.counts()?.total)?;
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
pub(super) async fn begin_refresh(
    m: &mut Manifest,
    source: &SdkClient,
    settings: &JobSettings,
) -> Result<(), JobError> {
    let bucket = &settings.source.bucket;
    let facts = preflight(source)
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
pub(super) fn refresh_summary(m: &Manifest) -> Result<(), JobError> {
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
pub async fn replicate(args: &ReplicateArgs) -> Result<RunSummary, JobError> {
    let plan = &args.plan;
    if plan.supplied().is_some() {
        // A supplied manifest is planned whole (no listing to copy beside), then copied.
        self::plan(plan).await?;
        let _lock = lock_manifest(&plan.manifest)?;
        return run_locked(&args.run()).await;
    }
    let (settings, source) = plan_settings(plan).await?;
    let _lock = lock_manifest(&plan.manifest)?;
    let existing = existing_manifest(plan, &settings)?;
    check_refresh(plan, existing.as_ref(), &settings)?;
    let complete = match &existing {
        Some(m) => m.listing_progress()?.complete,
        None => false,
    };
    if !complete || plan.refresh {
        let (mut m, settings, source, _, dest) =
            prepare_listing(settings, source, existing, &plan.manifest).await?;
        let probe = plan_probe(&settings, &source, &dest).await;
        estimate::store_plan_facts(&m, &plan.estimate, probe)?;
        if plan.refresh {
            begin_refresh(&mut m, &source, &settings).await?;
        }
    }
    run_locked(&args.run()).await
}

/// `plan --from-csv/--from-inventory`: the tasks come from the supplied manifest; the
/// manifest appears only once complete (see `inputs::plan`).
pub(super) async fn plan_supplied(
    args: &PlanArgs,
    existing: Option<Manifest>,
    job: &SuppliedJob<'_, SdkClient>,
    input: &Supplied,
) -> Result<(), JobError> {
    if existing.is_some() {
        return Err(JobError::Usage(format!(
            "manifest {} exists with an unfinished listing; plan from a supplied manifest into a new --manifest",
            args.manifest.display()
        )));
    }
    let p = crate::inputs::plan::plan_supplied(job, input).await?;
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
