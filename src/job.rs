//! job: the commands (`plan`, `run`, `replicate`, `status`, `report`, `verify`), each a
//! short script of stages: arguments → settings → clients → lister → manifest → copier →
//! report/verify. It owns the manifest lock, bucket probes before work starts, signal
//! handling, and the lister running beside the copier (copy while listing).
//!
//! May call: every stage.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use indicatif::ProgressBar;
use tokio::sync::watch;

use crate::cli::{
    PlanArgs, ReplicateArgs, ReportArgs, ReportFormat, RunArgs, StatusArgs, VerifyArgs,
};
use crate::config::{ConfigError, JobSettings, SideConfig};
use crate::copier::{Copier, DestFacts, DestinationFacts, ListingState, RunSummary};
use crate::lister::supplied::{Supplied, SuppliedJob};
use crate::lister::{ListError, ListStats, Lister};
use crate::manifest::{Manifest, ManifestError};
use crate::s3::bandwidth::Bandwidth;
use crate::s3::{
    build, BucketFacts, ErrorClass, Limiter, Retrier, RetryPolicy, S3Client, S3Error, SdkClient,
    Side, Timeouts,
};
use crate::select::Selector;
use crate::verify::{Verifier, VerifyError, VerifyReport};
use crate::{estimate, report, ui};

/// Why a command could not do its work. Each maps to an exit code and prints as one line.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Bad input or configuration (exit 2).
    #[error("{0}")]
    Usage(String),
    /// Bad configuration value (exit 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The manifest cannot be used (exit 2 unless SQLite itself failed).
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// An S3 error that stopped the command.
    #[error("{0}")]
    S3(S3Error),
    /// Anything else (exit 3).
    #[error("{0}")]
    Other(String),
}

impl JobError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            JobError::Usage(_) | JobError::Config(_) => 2,
            JobError::Manifest(ManifestError::Sql { .. } | ManifestError::WriterGone(_)) => 3,
            JobError::Manifest(_) => 2,
            JobError::S3(e) if e.class == ErrorClass::Fatal => 2,
            _ => 3,
        }
    }

    /// The one line printed for this error, with a hint where one helps.
    pub fn line(&self) -> String {
        match self {
            JobError::S3(s) => match ui::checksum_hint(s) {
                Some(h) => format!("error: {self} ({h})"),
                None => format!("error: {self}"),
            },
            _ => format!("error: {self}"),
        }
    }
}

impl From<ListError> for JobError {
    fn from(e: ListError) -> Self {
        match e {
            ListError::S3(e) => JobError::S3(e),
            ListError::Manifest(m) => JobError::Manifest(m),
            ListError::Refused(m) => JobError::Usage(m),
        }
    }
}

impl From<S3Error> for JobError {
    fn from(e: S3Error) -> Self {
        JobError::S3(e)
    }
}

/// An exclusive lock on a manifest, held by a file lock beside it (`JOB.db.lock`, mode
/// 0600). The operating system releases it when the process dies, so a stale lock never
/// blocks.
pub struct ManifestLock {
    _file: File,
    lock_path: PathBuf,
    manifest: PathBuf,
}

impl Drop for ManifestLock {
    fn drop(&mut self) {
        // A plan that failed before creating its manifest leaves nothing behind.
        if !self.manifest.exists() {
            let _ = std::fs::remove_file(&self.lock_path);
        }
    }
}

/// Takes the manifest's lock or explains who holds it.
pub fn lock_manifest(path: &Path) -> Result<ManifestLock, JobError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let mut opts = File::options();
    opts.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(&lock_path)
        .map_err(|e| JobError::Usage(format!("cannot open lock {}: {e}", lock_path.display())))?;
    match f.try_lock() {
        Ok(()) => {
            let _ = f.set_len(0);
            let _ = writeln!(f, "{}", std::process::id());
            Ok(ManifestLock {
                _file: f,
                lock_path,
                manifest: path.to_path_buf(),
            })
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
            Err(JobError::Usage(format!(
                "manifest {} is in use by another s3-backfill process (pid {}); wait for it or stop it",
                path.display(),
                holder.trim()
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(JobError::Usage(format!(
            "cannot lock {}: {e}",
            lock_path.display()
        ))),
    }
}

/// The error of a bucket probe, said for a person.
fn bucket_error(side: Side, bucket: &str, e: S3Error) -> JobError {
    let what = match (e.status, e.code.as_deref()) {
        (_, Some("NoSuchBucket")) | (Some(404), _) => format!("bucket {bucket} does not exist"),
        (_, Some("AccessDenied")) | (Some(403), _) => format!(
            "access denied to bucket {bucket} (check the {side} credentials, profile and endpoint)"
        ),
        (_, Some("InvalidAccessKeyId")) | (_, Some("SignatureDoesNotMatch")) => format!(
            "the {side} credentials are not valid for bucket {bucket} ({})",
            e.code.as_deref().unwrap_or_default()
        ),
        _ => return JobError::S3(e),
    };
    JobError::S3(S3Error { message: what, ..e })
}

fn preflight() -> Retrier {
    Retrier::new(
        RetryPolicy {
            max_attempts: 4,
            ..RetryPolicy::default()
        },
        Limiter::new(4, None),
    )
}

/// Builds a side's client and probes its bucket. A bucket in another region than the one
/// asked for (S3 answers 301 naming it) is probed again in its own region, which is kept in
/// `side` so that `run` reads it there too.
async fn open_side(
    which: Side,
    side: &mut SideConfig,
    bucket: &str,
    timeouts: Timeouts,
) -> Result<(SdkClient, BucketFacts), JobError> {
    let retrier = preflight();
    let retries = Default::default();
    let (client, _) = build(which, side, timeouts).await;
    match retrier.call(&retries, || client.probe_bucket(bucket)).await {
        Ok(facts) => {
            if side.region.is_none() {
                side.region = facts.region.clone();
            }
            Ok((client, facts))
        }
        Err(e) if e.status == Some(301) && e.bucket_region.is_some() => {
            side.region = e.bucket_region.clone();
            let (client, _) = build(which, side, timeouts).await;
            let facts = retrier
                .call(&retries, || client.probe_bucket(bucket))
                .await
                .map_err(|e| bucket_error(which, bucket, e))?;
            Ok((client, facts))
        }
        Err(e) => Err(bucket_error(which, bucket, e)),
    }
}

/// An existing manifest of this job, checked: None when there is none yet.
fn existing_manifest(
    args: &PlanArgs,
    settings: &JobSettings,
) -> Result<Option<Manifest>, JobError> {
    if !args.manifest.exists() {
        return Ok(None);
    }
    // `create`: a plan killed while creating the file left it empty; this plan creates it.
    let m = Manifest::open(&args.manifest, true)?;
    if let Some(stored) = m.settings()? {
        if let Some(diff) = settings.identity_differs(&stored) {
            return Err(JobError::Usage(format!(
                "manifest {} belongs to another job: this plan has {diff}; use a new --manifest, or the same arguments to continue it",
                args.manifest.display()
            )));
        }
        change_copy_settings(args, &m, stored, settings)?;
    }
    Ok(Some(m))
}

/// Copy settings other than the job's: each change said in one line; refused on a job
/// whose tasks started or finished (their copies were made with the stored settings, and
/// an attempt in doubt must be found as it was written) unless `--change-copy-settings`;
/// otherwise stored, so that every later run (a `replicate` on a complete listing too)
/// copies with them.
fn change_copy_settings(
    args: &PlanArgs,
    m: &Manifest,
    mut stored: JobSettings,
    settings: &JobSettings,
) -> Result<(), JobError> {
    let changes = settings.copy.changes_from(&stored.copy);
    if changes.is_empty() {
        return Ok(());
    }
    let c = m.counts()?;
    let worked = c.done + c.in_progress + c.failed + c.skipped;
    if (worked > 0 || c.attempts > 0) && !args.change_copy_settings {
        for line in &changes {
            crate::say!("copy setting {line}");
        }
        return Err(JobError::Usage(format!(
            "manifest {} has {worked} tasks started or finished with its own copy settings, and this command changes them (above); pass --change-copy-settings to change them, or give the job's settings to continue it",
            args.manifest.display()
        )));
    }
    for line in &changes {
        crate::say!("copy setting changed: {line}");
    }
    stored.copy = settings.copy.clone();
    m.store_settings(&stored)?;
    Ok(())
}

/// Whether the manifest's listing is already complete (said in one line).
fn listing_done(m: Option<&Manifest>, path: &Path) -> Result<bool, JobError> {
    let Some(m) = m else { return Ok(false) };
    if !m.listing()?.complete {
        return Ok(false);
    }
    let c = m.counts()?;
    crate::say!(
        "listing already complete: {} tasks in {}; nothing to do (use `run`)",
        c.total,
        path.display()
    );
    Ok(true)
}

/// `--replication-config source`: the source bucket's own configuration.
async fn replication_from_source(
    source: &SdkClient,
    settings: &mut JobSettings,
) -> Result<(), JobError> {
    let bucket = settings.source.bucket.clone();
    let xml = preflight()
        .call(&Default::default(), || {
            source.get_bucket_replication(&bucket)
        })
        .await?;
    let from = format!("replication configuration of bucket {bucket}");
    let cfg = crate::rules::ReplicationConfig::from_xml(&xml)
        .map_err(|e| JobError::Usage(format!("{from}: {e}")))?;
    crate::select::use_replication_config(settings, cfg, &from)?;
    Ok(())
}

/// The source's client, and destination 0's client and facts; every other destination bucket
/// of a replication configuration is probed too (the job's destinations are versioned only
/// when all are).
async fn plan_clients(
    settings: &mut JobSettings,
    source: Option<SdkClient>,
) -> Result<(SdkClient, SdkClient, BucketFacts), JobError> {
    let timeouts = Timeouts::default();
    let source = match source {
        Some(c) => c,
        None => {
            let bucket = settings.source.bucket.clone();
            open_side(Side::Source, &mut settings.source_side, &bucket, timeouts)
                .await?
                .0
        }
    };
    let bucket = settings.dest.bucket.clone();
    let (dest, mut facts) =
        open_side(Side::Dest, &mut settings.dest_side, &bucket, timeouts).await?;
    let mut others: Vec<String> = settings
        .destinations
        .iter()
        .map(|d| d.bucket.clone())
        .collect();
    others.retain(|b| *b != bucket);
    others.sort();
    others.dedup();
    for b in others {
        let (f, _) = probe_other_dest(&dest, &settings.dest_side, &b, timeouts)
            .await
            .map_err(|e| bucket_error(Side::Dest, &b, e))?;
        facts.versioned &= f.versioned;
    }
    Ok((source, dest, facts))
}

/// Probes a destination bucket other than destination 0 with destination 0's client; a
/// bucket in another region (S3's 301 naming it) is probed again there, and the client of
/// that region is returned too (counting its requests with `dest`'s).
async fn probe_other_dest(
    dest: &SdkClient,
    side: &SideConfig,
    bucket: &str,
    timeouts: Timeouts,
) -> Result<(BucketFacts, Option<SdkClient>), S3Error> {
    let retrier = preflight();
    match retrier
        .call(&Default::default(), || dest.probe_bucket(bucket))
        .await
    {
        Err(e) if e.status == Some(301) && e.bucket_region.is_some() => {
            let mut there = side.clone();
            there.region = e.bucket_region.clone();
            let (client, _) = build(Side::Dest, &there, timeouts).await;
            let client = client
                .counting_in(dest.counts())
                .limited_by(dest.bandwidth());
            let facts = retrier
                .call(&Default::default(), || client.probe_bucket(bucket))
                .await?;
            Ok((facts, Some(client)))
        }
        r => r.map(|f| (f, None)),
    }
}

/// `plan --dry-run`: lists and selects, prints the tallies and the estimate of a run's
/// cost, writes nothing.
async fn dry_run(
    args: &PlanArgs,
    mut settings: JobSettings,
    source: Option<SdkClient>,
) -> Result<(), JobError> {
    let (source, dest, facts) = plan_clients(&mut settings, source).await?;
    let probe = plan_probe(&settings, &source, &facts).await;
    let retrier = Retrier::new(RetryPolicy::default(), Limiter::new(1, None));
    let selector = Selector {
        settings: &settings,
        source: &source,
        dest: Some(&dest),
        retrier: &retrier,
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
    let tally =
        crate::select::dry_run_each(&selector, args.list_page_size, |e, d| feed.entry(e, d))
            .await?;
    // The note `plan` prints when it cannot list in parts (the dry run itself lists in one).
    let bucket = &settings.source.bucket;
    if !crate::lister::markers_exact(&source, &retrier, bucket, &settings.selection.prefix).await? {
        crate::say!("note: {}", crate::lister::one_part_note(bucket));
    }
    for line in tally.lines() {
        println!("{line}");
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
        println!("{line}");
    }
    Ok(())
}

/// What the estimate needs to know of the buckets (see [`estimate::PlanProbe`]): the source's
/// object lock is read (one request) only where a small version may be copied in one
/// request (it then keeps the HEAD of every version).
async fn plan_probe(
    settings: &JobSettings,
    source: &SdkClient,
    dest: &BucketFacts,
) -> estimate::PlanProbe {
    let one_request = !settings.copy.stamp && settings.copy.sse.is_some();
    let source_lock = match one_request {
        true => preflight()
            .call(&Default::default(), || {
                source.object_lock_enabled(&settings.source.bucket)
            })
            .await
            .ok()
            .or(Some(true)),
        false => None,
    };
    estimate::PlanProbe {
        rgw: dest.rgw,
        dest_versioned: dest.versioned,
        source_lock,
        listing: source.requests().mean_listing(),
    }
}

/// `plan --dry-run --from-csv/--from-inventory`: reads and selects the supplied manifest's
/// entries, prints the tallies, writes nothing.
async fn dry_run_supplied(
    args: &PlanArgs,
    mut settings: JobSettings,
    source: Option<SdkClient>,
    input: &Supplied,
) -> Result<(), JobError> {
    let (source, dest, _) = plan_clients(&mut settings, source).await?;
    let job = SuppliedJob {
        client: &source,
        dest_client: Some(&dest),
        settings: &settings,
        manifest: &args.manifest,
        // Not refused in a dry run (as when listing).
        dest_versioned: true,
    };
    let tally = crate::lister::supplied::dry_run_supplied(&job, input).await?;
    for line in tally.lines() {
        println!("{line}");
    }
    Ok(())
}

/// The job's settings; with `--replication-config source` also the source's client (the
/// source bucket's configuration is needed before the job is known).
async fn plan_settings(args: &PlanArgs) -> Result<(JobSettings, Option<SdkClient>), JobError> {
    let mut settings = args.settings()?;
    if args.replication_config.as_deref() != Some("source") {
        return Ok((settings, None));
    }
    let bucket = settings.source.bucket.clone();
    let (c, _) = open_side(
        Side::Source,
        &mut settings.source_side,
        &bucket,
        Timeouts::default(),
    )
    .await?;
    replication_from_source(&c, &mut settings).await?;
    Ok((settings, Some(c)))
}

/// Before a listing: every bucket probed (a new manifest is only created once they
/// answered, so a mistyped bucket leaves no manifest behind), then the manifest opened or
/// created with the job's settings stored. Returns it, the settings (with the regions
/// found), the source client, destination 0's client and what the destinations are.
async fn prepare_listing(
    mut settings: JobSettings,
    source: Option<SdkClient>,
    existing: Option<Manifest>,
    path: &Path,
) -> Result<Prepared, JobError> {
    let (source, dest_client, dest) = plan_clients(&mut settings, source).await?;
    let m = match existing {
        Some(m) => m,
        None => Manifest::open(path, true)?,
    };
    if m.settings()?.as_ref() != Some(&settings) {
        // New, or the same job with other side or copy options (e.g. a moved endpoint).
        m.store_settings(&settings)?;
    }
    Ok((m, settings, source, dest_client, dest))
}

/// What [`prepare_listing`] returns.
type Prepared = (Manifest, JobSettings, SdkClient, SdkClient, BucketFacts);

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
        let job = SuppliedJob {
            client: &source,
            dest_client: Some(&dest_client),
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
    let retrier = Retrier::new(RetryPolicy::default(), Limiter::new(concurrency, None));
    let selector = Selector {
        settings: &settings,
        source: &source,
        dest: Some(&dest_client),
        retrier: &retrier,
    };
    let lister = Lister {
        client: &source,
        settings: &settings,
        retrier: &retrier,
        selector: &selector,
        dest_versioned: dest.versioned || settings.selection.latest_only,
        page_size: args.list_page_size,
    };
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

/// Refuses a `--refresh` that cannot be done: no job yet, or a job planned from a supplied
/// manifest (there is no listing to repeat).
fn check_refresh(
    args: &PlanArgs,
    existing: Option<&Manifest>,
    settings: &JobSettings,
) -> Result<(), JobError> {
    if !args.refresh {
        return Ok(());
    }
    if existing.is_none() {
        return Err(JobError::Usage(format!(
            "--refresh catches up an existing job, but {} does not exist; plan it first",
            args.manifest.display()
        )));
    }
    if settings.planned_from_supplied() {
        return Err(JobError::Usage(
            "a job planned from a supplied manifest cannot be refreshed by listing; plan a new job from the new manifest".into(),
        ));
    }
    Ok(())
}

/// `plan --refresh`: starts a new listing generation on a complete listing, or continues
/// the unfinished one (a killed refresh, or a first listing not finished yet). Whether the
/// source's versioning is enabled now decides how a key that is no longer listed is taken
/// (see [`Manifest::start_refresh_of`]).
async fn begin_refresh(
    m: &mut Manifest,
    source: &SdkClient,
    settings: &JobSettings,
) -> Result<(), JobError> {
    let bucket = &settings.source.bucket;
    let facts = preflight()
        .call(&Default::default(), || source.probe_bucket(bucket))
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
/// manifest appears only once complete (see `lister::supplied`).
async fn plan_supplied(
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
    let p = crate::lister::supplied::plan_supplied(job, input).await?;
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

/// The clients of one side of a run: the side's client, and for each destination bucket in
/// another region than destination 0's (S3's 301 at the probe) a client in that bucket's
/// region; each request goes to its bucket's client. All count their requests together.
#[derive(Clone, Debug)]
pub struct RoutedClient {
    main: SdkClient,
    by_bucket: Arc<std::collections::BTreeMap<String, SdkClient>>,
}

impl RoutedClient {
    fn single(main: SdkClient) -> RoutedClient {
        RoutedClient {
            main,
            by_bucket: Arc::default(),
        }
    }

    fn of(&self, bucket: &str) -> &SdkClient {
        self.by_bucket.get(bucket).unwrap_or(&self.main)
    }
}

impl S3Client for RoutedClient {
    fn side(&self) -> Side {
        self.main.side()
    }
    fn requests(&self) -> &crate::s3::RequestCounts {
        self.main.requests()
    }
    async fn list_versions(
        &self,
        from: &crate::s3::ListFrom,
    ) -> Result<crate::s3::VersionPage, S3Error> {
        self.of(&from.bucket).list_versions(from).await
    }
    async fn head_object(
        &self,
        obj: &crate::s3::ObjectRef,
        part: Option<i32>,
    ) -> Result<crate::s3::ObjectHead, S3Error> {
        self.of(&obj.bucket).head_object(obj, part).await
    }
    async fn get_object(
        &self,
        obj: &crate::s3::ObjectRef,
        range: Option<(u64, u64)>,
    ) -> Result<bytes::Bytes, S3Error> {
        self.of(&obj.bucket).get_object(obj, range).await
    }
    async fn get_object_stream(
        &self,
        obj: &crate::s3::ObjectRef,
        range: Option<(u64, u64)>,
    ) -> Result<(aws_sdk_s3::primitives::ByteStream, u64), S3Error> {
        self.of(&obj.bucket).get_object_stream(obj, range).await
    }
    async fn upload_part_stream(
        &self,
        dest: &crate::s3::ObjectRef,
        upload_id: &str,
        n: i32,
        body: aws_sdk_s3::primitives::ByteStream,
        len: u64,
    ) -> Result<crate::s3::PartResult, S3Error> {
        self.of(&dest.bucket)
            .upload_part_stream(dest, upload_id, n, body, len)
            .await
    }
    async fn put_object_stream(
        &self,
        dest: &crate::s3::ObjectRef,
        body: aws_sdk_s3::primitives::ByteStream,
        len: u64,
        attrs: &crate::s3::WriteAttrs,
    ) -> Result<crate::s3::WriteResult, S3Error> {
        self.of(&dest.bucket)
            .put_object_stream(dest, body, len, attrs)
            .await
    }
    async fn get_tagging(&self, obj: &crate::s3::ObjectRef) -> Result<String, S3Error> {
        self.of(&obj.bucket).get_tagging(obj).await
    }
    async fn copy_object(
        &self,
        dest: &crate::s3::ObjectRef,
        src: &crate::s3::ObjectRef,
        attrs: &crate::s3::WriteAttrs,
    ) -> Result<crate::s3::WriteResult, S3Error> {
        self.of(&dest.bucket).copy_object(dest, src, attrs).await
    }
    async fn put_object(
        &self,
        dest: &crate::s3::ObjectRef,
        body: bytes::Bytes,
        attrs: &crate::s3::WriteAttrs,
    ) -> Result<crate::s3::WriteResult, S3Error> {
        self.of(&dest.bucket).put_object(dest, body, attrs).await
    }
    async fn delete_object(
        &self,
        dest: &crate::s3::ObjectRef,
    ) -> Result<crate::s3::WriteResult, S3Error> {
        self.of(&dest.bucket).delete_object(dest).await
    }
    async fn put_tagging(&self, obj: &crate::s3::ObjectRef, tagging: &str) -> Result<(), S3Error> {
        self.of(&obj.bucket).put_tagging(obj, tagging).await
    }
    async fn create_multipart(
        &self,
        dest: &crate::s3::ObjectRef,
        attrs: &crate::s3::WriteAttrs,
    ) -> Result<String, S3Error> {
        self.of(&dest.bucket).create_multipart(dest, attrs).await
    }
    async fn upload_part_copy(
        &self,
        dest: &crate::s3::ObjectRef,
        upload_id: &str,
        n: i32,
        src: &crate::s3::ObjectRef,
        range: (u64, u64),
    ) -> Result<crate::s3::PartResult, S3Error> {
        self.of(&dest.bucket)
            .upload_part_copy(dest, upload_id, n, src, range)
            .await
    }
    async fn upload_part(
        &self,
        dest: &crate::s3::ObjectRef,
        upload_id: &str,
        n: i32,
        body: bytes::Bytes,
        md5: Option<&str>,
        algorithm: Option<crate::s3::ChecksumAlgorithm>,
    ) -> Result<crate::s3::PartResult, S3Error> {
        self.of(&dest.bucket)
            .upload_part(dest, upload_id, n, body, md5, algorithm)
            .await
    }
    async fn complete_multipart(
        &self,
        dest: &crate::s3::ObjectRef,
        upload_id: &str,
        parts: &[crate::s3::PartResult],
    ) -> Result<crate::s3::WriteResult, S3Error> {
        self.of(&dest.bucket)
            .complete_multipart(dest, upload_id, parts)
            .await
    }
    async fn abort_multipart(
        &self,
        dest: &crate::s3::ObjectRef,
        upload_id: &str,
    ) -> Result<(), S3Error> {
        self.of(&dest.bucket).abort_multipart(dest, upload_id).await
    }
    async fn list_uploads(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<(String, String)>, S3Error> {
        self.of(bucket).list_uploads(bucket, prefix).await
    }
    async fn probe_bucket(&self, bucket: &str) -> Result<BucketFacts, S3Error> {
        self.of(bucket).probe_bucket(bucket).await
    }
    async fn object_lock_enabled(&self, bucket: &str) -> Result<bool, S3Error> {
        self.of(bucket).object_lock_enabled(bucket).await
    }
    async fn restore_object(
        &self,
        obj: &crate::s3::ObjectRef,
        days: u32,
        tier: &str,
    ) -> Result<crate::s3::Restore, S3Error> {
        self.of(&obj.bucket).restore_object(obj, days, tier).await
    }
}

/// The stored settings with this run's overrides of endpoints and profiles.
fn run_settings(m: &Manifest, args: &RunArgs) -> Result<JobSettings, JobError> {
    let mut settings = m.require_settings()?;
    args.overrides.apply(&mut settings);
    Ok(settings)
}

/// Puts failed tasks back, or gives up on them, as the run's flags ask.
fn requeue(m: &Manifest, args: &RunArgs) -> Result<(), JobError> {
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
async fn run_clients(
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
    let retrier = preflight();
    let facts = match retrier
        .call(&Default::default(), || {
            dest.probe_bucket(&settings.dest.bucket)
        })
        .await
    {
        Ok(f) => DestFacts {
            versioned: f.versioned,
            object_lock: f.object_lock,
        },
        // A missing or unreadable destination is left to the tasks and the failure
        // threshold, which stop the job with the error.
        Err(e) if e.class == ErrorClass::Fatal => {
            crate::say!(
                "warning: {}",
                bucket_error(Side::Dest, &settings.dest.bucket, e)
            );
            DestFacts {
                versioned: true,
                object_lock: false,
            }
        }
        Err(e) => return Err(e.into()),
    };
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
        let f = match probe_other_dest(&dest, &settings.dest_side, &b, timeouts).await {
            Ok((f, there)) => {
                if let Some(c) = there {
                    regional.insert(b.clone(), c);
                }
                DestFacts {
                    versioned: f.versioned,
                    object_lock: f.object_lock,
                }
            }
            // As for destination 0: left to the tasks and the failure threshold.
            Err(e) if e.class == ErrorClass::Fatal => {
                crate::say!("warning: {}", bucket_error(Side::Dest, &b, e));
                DestFacts {
                    versioned: true,
                    object_lock: false,
                }
            }
            Err(e) => return Err(e.into()),
        };
        all.buckets.insert(b, f);
    }
    let dest = RoutedClient {
        main: dest,
        by_bucket: Arc::new(regional),
    };
    Ok(((RoutedClient::single(source), dest), all))
}

/// The source bucket's versioning, for reading `null` versions (see
/// `Copier::set_source_facts`); when the probe fails, said, and `null` versions are read by
/// key (pinned to their listed ETags either way).
async fn source_facts<C: S3Client>(source: &C, bucket: &str) -> BucketFacts {
    match preflight()
        .call(&Default::default(), || source.probe_bucket(bucket))
        .await
    {
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

/// `run`: copies the manifest's open tasks; on an unfinished listing, it lists the rest
/// too (with the job's stored settings), copying while it lists. Handles SIGINT/SIGTERM:
/// the first stops taking new tasks (and stops the listing) and lets requests in flight
/// finish (bounded by the grace period); the second exits at once (the next run reconciles
/// what was in flight).
pub async fn run(args: &RunArgs) -> Result<RunSummary, JobError> {
    let _lock = lock_manifest(&args.manifest)?;
    run_locked(args).await
}

/// `run` once the manifest is locked.
async fn run_locked(args: &RunArgs) -> Result<RunSummary, JobError> {
    let m = Manifest::open(&args.manifest, false)?;
    let mut settings = run_settings(&m, args)?;
    requeue(&m, args)?;
    let (clients, facts) =
        run_clients(&mut settings, args.exec.timeouts(), args.exec.bandwidth()).await?;
    let latest_only = settings.selection.latest_only;
    // Keys listed from here on are checked by the lister, page by page.
    let unversioned = std::iter::once((&settings.dest.bucket, facts.default))
        .chain(facts.buckets.iter().map(|(b, f)| (b, *f)))
        .find(|(_, f)| !f.versioned)
        .map(|(b, _)| b.clone());
    if let Some(bucket) = unversioned {
        if !latest_only && m.has_multi_version_key()? {
            return Err(JobError::Usage(format!(
                "dest: bucket {bucket} does not have versioning enabled, but the job copies several versions of some keys; enable versioning on it"
            )));
        }
    }
    let all_versioned = facts.default.versioned && facts.buckets.values().all(|f| f.versioned);
    let counts = m.counts()?;
    let uploads = m.open_uploads()?;
    let to_learn = m.versions_to_learn()?;
    let listing = !m.listing_progress()?.complete;
    let show = ui::show_progress(args.no_progress);
    let open = counts.pending + counts.in_progress;
    let bar = match listing {
        true => ui::live_copy_bar(show, open),
        false => ui::copy_bar(show, open),
    };
    if listing {
        m.wait_for_locks_briefly()?;
    }
    let (source, dest) = (clients.0.clone(), clients.1.clone());
    let mut opts = args.exec.run_options();
    if let Some(max_usd) = args.exec.max_cost {
        let stored = m.estimate_facts()?;
        opts.limits.max_cost = Some(estimate::CostLimit {
            max_usd,
            prices: estimate::prices_of(&stored, args.prices.as_ref()),
            across: !settings.server_side()
                && settings.source_side.endpoint != settings.dest_side.endpoint,
        });
    }
    let copier = Copier::new(
        settings.clone(),
        clients,
        facts,
        m.into_writer(),
        &opts,
        bar.clone(),
    );
    copier.set_source_facts(&source_facts(&source, &settings.source.bucket).await);
    copier.abort_leftover_uploads(uploads).await;
    copier.learn_leftovers(to_learn);
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
    let result = if listing {
        let live = LiveListing {
            path: &args.manifest,
            settings: &settings,
            source: &source,
            dest: &dest,
            dest_versioned: all_versioned || latest_only,
            concurrency: args.list_concurrency as usize,
            page_size: args.list_page_size,
            bar,
            log_every: args.log.interval(),
        };
        run_until_signal(&copier, grace, copy_while_listing(&copier, live)).await
    } else {
        run_until_signal(&copier, grace, async { Ok(copier.clone().run().await) }).await
    };
    timer.abort();
    ticker.abort();
    let _ = ticker.await;
    // The run is over: `status` shows no rate or ETA for it.
    copier.record_progress(None);
    copier.flush().await;
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
    /// Reads the source.
    pub(crate) source: &'a C,
    /// Reads destination 0 (for `--replication-status`).
    pub(crate) dest: &'a C,
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
    // One request in flight per listing part.
    let retrier = Retrier::new(RetryPolicy::default(), Limiter::new(live.concurrency, None));
    let selector = Selector {
        settings: live.settings,
        source: live.source,
        dest: Some(live.dest),
        retrier: &retrier,
    };
    let lister = Lister {
        client: live.source,
        settings: live.settings,
        retrier: &retrier,
        selector: &selector,
        dest_versioned: live.dest_versioned,
        page_size: live.page_size,
    };
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
            bar.say_listed(&stats);
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
struct LiveBar<'a> {
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

/// Runs `work` (the copier's run) until it ends, or until a signal asked it to stop and
/// the grace period ran out (None). The first signal stops new tasks.
async fn run_until_signal<C: S3Client, T>(
    copier: &Arc<Copier<C>>,
    grace: u64,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    let grace = Duration::from_secs(grace);
    let mut signals = {
        let copier = copier.clone();
        tokio::spawn(async move {
            wait_signal().await;
            crate::say!(
                "stopping: no new tasks; waiting up to {}s for requests in flight (press Ctrl-C again to exit now)",
                grace.as_secs()
            );
            copier.stop();
            tokio::select! {
                _ = wait_signal() => {
                    crate::say!("interrupted: exiting now; the next `run` reconciles what was in flight");
                    std::process::exit(130);
                }
                _ = tokio::time::sleep(grace) => {}
            }
        })
    };
    let work = std::pin::pin!(work);
    // The signal task ends only when a signal arrived and the grace period ran out.
    let out = tokio::select! {
        s = work => Some(s),
        _ = &mut signals => {
            crate::say!("grace period over: abandoning requests still in flight");
            None
        }
    };
    signals.abort();
    let _ = signals.await;
    out
}

async fn wait_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The manifest's counts after a run, for its summary line.
pub fn counts_after(manifest: &Path) -> Option<crate::manifest::Counts> {
    Manifest::open(manifest, false)
        .and_then(|m| m.counts())
        .ok()
}

/// `status`: counts and progress (works while a run is in progress).
pub fn status(args: &StatusArgs) -> Result<(), JobError> {
    let m = Manifest::open(&args.manifest, false)?;
    let settings = m.require_settings()?;
    let mut c = m.counts()?;
    c.etag_changes = m.etag_changes()?;
    c.etag_changed = c.etag_changes.values().sum();
    let now = crate::events::ticker::now_secs();
    let running = crate::events::ticker::fresh(m.run_progress()?, now);
    let estimate = estimate::of_manifest(&m, &settings, &args.estimate, c.total)?;
    if args.json {
        let json = |e: serde_json::Error| JobError::Other(e.to_string());
        let mut v = serde_json::to_value(&c).map_err(json)?;
        if let Some(o) = v.as_object_mut() {
            o.extend(running_fields(running.as_ref()));
        }
        v["estimate"] = serde_json::to_value(&estimate).map_err(json)?;
        println!("{}", serde_json::to_string(&v).map_err(json)?);
    } else {
        println!("{}", report::status_text(&settings, &c));
        if let Some(p) = &running {
            println!("{}", crate::events::ticker::status_line(p, now));
        }
        for r in m.refreshes()?.iter().filter(|r| r.generation > 0) {
            println!("refresh {}: {} tasks added", r.generation, r.tasks);
            for line in ui::refresh_findings(r) {
                println!("refresh {}: {line}", r.generation);
            }
        }
        if let Some(line) = ui::deleted_at_source_line(&c) {
            println!("{line}");
        }
        for line in estimate.lines(Some(&c.requests)) {
            println!("{line}");
        }
    }
    Ok(())
}

/// The fields `status --json` adds for a run in progress (null when none): `eta` (seconds),
/// `rate` (tasks and bytes per second) and `running` (pid, when the snapshot was stored).
fn running_fields(p: Option<&crate::manifest::RunProgress>) -> [(String, serde_json::Value); 3] {
    use serde_json::{json, Value};
    let rate = p.and_then(|p| Some((p.tasks_per_sec?, p.bytes_per_sec?)));
    [
        (
            "eta".into(),
            p.and_then(|p| p.eta_secs).map_or(Value::Null, Value::from),
        ),
        (
            "rate".into(),
            rate.map_or(
                Value::Null,
                |(t, b)| json!({"tasks_per_sec": t, "bytes_per_sec": b}),
            ),
        ),
        (
            "running".into(),
            p.map_or(
                Value::Null,
                |p| json!({"pid": p.pid, "updated_at": p.updated_at}),
            ),
        ),
    ]
}

/// `report --format aws`: S3 Batch Operations' completion report, written into a directory,
/// or built in a scratch directory and uploaded (results first, `manifest.json` last) with the
/// destination's credentials.
fn report_aws(args: &ReportArgs, m: &Manifest, settings: &JobSettings) -> Result<(), JobError> {
    let Some(output) = args.output.as_ref().and_then(|o| o.to_str()) else {
        return Err(JobError::Usage(
            "report --format aws needs --output DIR|s3://BUCKET[/PREFIX]".into(),
        ));
    };
    let target = report_target(output);
    let scratch =
        tempfile::tempdir().map_err(|e| JobError::Other(format!("scratch directory: {e}")))?;
    let (dir, bucket, prefix) = match &target {
        Some((b, p)) => (scratch.path().to_path_buf(), b.clone(), p.clone()),
        None => (PathBuf::from(output), output.to_string(), String::new()),
    };
    let spec = aws_spec(args, bucket.clone(), prefix.clone())?;
    std::fs::create_dir_all(&dir)
        .map_err(|e| JobError::Usage(format!("cannot create {}: {e}", dir.display())))?;
    let written = report::write_aws(m, settings, &dir, &spec).map_err(|e| match e {
        report::AwsReportError::Manifest(m) => JobError::Manifest(m),
        report::AwsReportError::Write(w) => JobError::Other(format!("writing the report: {w}")),
    })?;
    let mut place = written.dir.display().to_string();
    if target.is_some() {
        let mut keys: Vec<String> = written.files.iter().map(|f| f.key.clone()).collect();
        keys.push(format!("{prefix}job-{}/manifest.json", spec.job_id));
        // Its own thread and runtime: `report` is synchronous, whatever runtime calls it.
        std::thread::scope(|s| {
            s.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| JobError::Other(format!("cannot start the runtime: {e}")))?
                    .block_on(upload_report(settings, &bucket, &prefix, &dir, &keys))
            })
            .join()
            .unwrap_or_else(|_| Err(JobError::Other("the upload thread failed".into())))
        })?;
        place = format!("s3://{bucket}/{prefix}job-{}/", spec.job_id);
    }
    let c = m.counts()?;
    let pending = c.pending + c.in_progress;
    let left_out = match pending {
        0 => String::new(),
        n => format!(" ({n} tasks still pending are not in it)"),
    };
    crate::say!(
        "report {place}: {} succeeded, {} failed{left_out}",
        written.succeeded,
        written.failed
    );
    Ok(())
}

/// The AWS-shaped report's spec: job id (`--job-id`, else the manifest's file stem), scope,
/// and where its manifest says the files are.
fn aws_spec(
    args: &ReportArgs,
    bucket: String,
    prefix: String,
) -> Result<crate::aws_report::ReportSpec, JobError> {
    use crate::aws_report::{ReportScope, ReportSpec, DEFAULT_ROWS_PER_FILE};
    let job_id = match &args.job_id {
        Some(id) => id.clone(),
        None => args
            .manifest
            .file_stem()
            .map_or("job".into(), |s| s.to_string_lossy().into_owned()),
    };
    let fits = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if job_id.is_empty() || job_id.starts_with('.') || !job_id.chars().all(fits) {
        return Err(JobError::Usage(format!(
            "job id {job_id:?} cannot name a report directory (use letters, digits, '-', '_', '.'; set one with --job-id)"
        )));
    }
    Ok(ReportSpec {
        job_id,
        scope: match args.report_scope {
            crate::cli::ReportScopeArg::All => ReportScope::All,
            crate::cli::ReportScopeArg::Failed => ReportScope::Failed,
        },
        created: time::OffsetDateTime::now_utc(),
        bucket,
        prefix,
        rows_per_file: DEFAULT_ROWS_PER_FILE,
    })
}

/// Where `report --format aws` uploads: `s3://BUCKET[/PREFIX]` as (bucket, prefix ending in
/// `/` or empty); None for a directory.
fn report_target(output: &str) -> Option<(String, String)> {
    let rest = output.strip_prefix("s3://")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = prefix.trim_end_matches('/');
    let prefix = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    Some((bucket.to_string(), prefix))
}

/// Uploads report files (keys under `prefix`, read from `dir`), in order.
async fn upload_report(
    settings: &JobSettings,
    bucket: &str,
    prefix: &str,
    dir: &Path,
    keys: &[String],
) -> Result<(), JobError> {
    let (client, _) = build(Side::Dest, &settings.dest_side, Timeouts::default()).await;
    let retrier = preflight();
    for key in keys {
        let local = dir.join(key.strip_prefix(prefix).unwrap_or(key));
        let body = std::fs::read(&local)
            .map_err(|e| JobError::Other(format!("{}: {e}", local.display())))?;
        let obj = crate::s3::ObjectRef::key(bucket, key);
        let body = bytes::Bytes::from(body);
        let attrs = crate::s3::WriteAttrs::default();
        retrier
            .call(&Default::default(), || {
                client.put_object(&obj, body.clone(), &attrs)
            })
            .await?;
    }
    Ok(())
}

/// `report`: the completion report (CSV, JSON or AWS-shaped), streamed from the manifest.
pub fn report(args: &ReportArgs) -> Result<(), JobError> {
    let m = Manifest::open(&args.manifest, false)?;
    let settings = m.require_settings()?;
    if args.format == ReportFormat::Aws {
        return report_aws(args, &m, &settings);
    }
    let mut counts = m.counts()?;
    counts.etag_changes = m.etag_changes()?;
    counts.etag_changed = counts.etag_changes.values().sum();
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(std::io::BufWriter::new(File::create(p).map_err(|e| {
            JobError::Usage(format!("cannot write {}: {e}", p.display()))
        })?)),
        None => Box::new(std::io::stdout().lock()),
    };
    let io = |e: std::io::Error| JobError::Other(format!("writing the report: {e}"));
    match args.format {
        ReportFormat::Json => {
            let problems = m.problems(usize::MAX >> 1)?;
            let r = report::Report::new(&settings, &counts, &problems);
            serde_json::to_writer_pretty(&mut out, &r)
                .map_err(|e| JobError::Other(e.to_string()))?;
            writeln!(out).map_err(io)?;
        }
        ReportFormat::Aws => return report_aws(args, &m, &settings),
        ReportFormat::Csv => {
            let mut failed: Option<ManifestError> = None;
            report::write_csv(&mut out, &settings, |row| {
                m.for_each_problem(row).map_err(|e| {
                    let text = e.to_string();
                    failed = Some(e);
                    std::io::Error::other(text)
                })
            })
            .map_err(|e| match failed.take() {
                Some(m) => JobError::Manifest(m),
                None => io(e),
            })?;
        }
    }
    out.flush().map_err(io)?;
    if args.output.is_some() {
        crate::say!(
            "{} done, {} failed, {} blocked, {} skipped, {} pending of {} tasks",
            counts.done,
            counts.failed,
            counts.blocked,
            counts.skipped,
            counts.pending + counts.in_progress,
            counts.total
        );
    }
    Ok(())
}

/// `verify`: compares the destination with the source (each destination with the versions
/// the manifest selected for it, for jobs with a replication configuration, filters or a
/// supplied manifest).
pub async fn verify(args: &VerifyArgs) -> Result<VerifyReport, JobError> {
    let manifest = Manifest::open(&args.manifest, false)?;
    let mut settings = manifest.require_settings()?;
    // A supplied manifest (`--from-csv`/`--from-inventory`) selects too: the keys it names.
    let selected = settings.replication.is_some()
        || !settings.filters.is_empty()
        || settings.planned_from_supplied();
    args.overrides.apply(&mut settings);
    let timeouts = Timeouts::default();
    let (source, _) = build(Side::Source, &settings.source_side, timeouts).await;
    let (dest, _) = build(Side::Dest, &settings.dest_side, timeouts).await;
    let bar = ui::verify_spinner(ui::show_progress(args.no_progress));
    let retrier = Retrier::new(RetryPolicy::default(), Limiter::new(2, None));
    let verifier = Verifier {
        settings: &settings,
        source: &source,
        dest: &dest,
        retrier: &retrier,
        deep: args.deep,
    };
    let show = |r: &VerifyReport| {
        bar.set_position(r.keys);
        bar.set_message(format!(
            "{} versions, {} differ",
            r.versions, r.mismatched_keys
        ));
    };
    let r = if selected {
        verifier
            .run_selected(&manifest, show)
            .await
            .map_err(|e| match e {
                VerifyError::S3(e) => JobError::from(e),
                VerifyError::Manifest(e) => JobError::Manifest(e),
            })
    } else {
        verifier
            .run(Some(&manifest), show)
            .await
            .map_err(|e| match e {
                VerifyError::S3(e) => JobError::from(e),
                VerifyError::Manifest(e) => JobError::Manifest(e),
            })
    };
    bar.finish_and_clear();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_file_is_private_and_held_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("job.db");
        let lock = lock_manifest(&m).unwrap();
        let mode = std::fs::metadata(dir.path().join("job.db.lock"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "key names are private: lock {mode:o}");
        let second = lock_manifest(&m).err().expect("a second holder is refused");
        assert_eq!(second.exit_code(), 2);
        drop(lock);
    }
}
