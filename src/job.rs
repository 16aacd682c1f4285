//! job: the commands (`plan`, `run`, `status`, `report`, `verify`), each a short script of
//! stages: arguments → settings → clients → lister → manifest → copier → report/verify.
//! It owns the manifest lock, bucket probes before work starts, and signal handling.
//!
//! May call: every stage.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::cli::{PlanArgs, ReportArgs, ReportFormat, RunArgs, StatusArgs, VerifyArgs};
use crate::config::{ConfigError, JobSettings, SideConfig};
use crate::copier::{Copier, DestFacts, RunSummary};
use crate::lister::{ListError, Lister};
use crate::manifest::{Manifest, ManifestError};
use crate::s3::{
    build, BucketFacts, ErrorClass, Limiter, Retrier, RetryPolicy, S3Client, S3Error, SdkClient,
    Side, Timeouts,
};
use crate::verify::{Verifier, VerifyReport};
use crate::{report, ui};

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
    }
    Ok(Some(m))
}

/// Whether the manifest's listing is already complete (said in one line).
fn listing_done(m: Option<&Manifest>, path: &Path) -> Result<bool, JobError> {
    let Some(m) = m else { return Ok(false) };
    if !m.listing()?.complete {
        return Ok(false);
    }
    let c = m.counts()?;
    eprintln!(
        "listing already complete: {} tasks in {}; nothing to do (use `run`)",
        c.total,
        path.display()
    );
    Ok(true)
}

/// `plan`: lists the source into the manifest (resuming an unfinished listing).
pub async fn plan(args: &PlanArgs) -> Result<(), JobError> {
    let mut settings = args.settings()?;
    let _lock = lock_manifest(&args.manifest)?;
    // A new manifest is only created once both buckets answered, so a mistyped bucket
    // leaves no manifest behind.
    let existing = existing_manifest(args, &settings)?;
    if args.refresh && existing.is_none() {
        return Err(JobError::Usage(format!(
            "--refresh catches up an existing job, but {} does not exist; plan it first",
            args.manifest.display()
        )));
    }
    if !args.refresh && listing_done(existing.as_ref(), &args.manifest)? {
        return Ok(());
    }
    let timeouts = Timeouts::default();
    let (source, _) = open_side(
        Side::Source,
        &mut settings.source_side,
        &settings.source.bucket,
        timeouts,
    )
    .await?;
    let (_, dest) = open_side(
        Side::Dest,
        &mut settings.dest_side,
        &settings.dest.bucket,
        timeouts,
    )
    .await?;
    let mut m = match existing {
        Some(m) => m,
        None => Manifest::open(&args.manifest, true)?,
    };
    if m.settings()?.as_ref() != Some(&settings) {
        // New, or the same job with other side or copy options (e.g. a moved endpoint).
        m.store_settings(&settings)?;
    }
    if args.refresh {
        begin_refresh(&mut m)?;
    }
    let bar = ui::list_spinner(ui::show_progress(args.no_progress), m.listing()?.entries);
    let concurrency = args.list_concurrency as usize;
    // One request in flight per listing part.
    let retrier = Retrier::new(RetryPolicy::default(), Limiter::new(concurrency, None));
    let lister = Lister {
        client: &source,
        settings: &settings,
        retrier: &retrier,
        dest_versioned: dest.versioned || settings.selection.latest_only,
    };
    let stats = lister
        .list_parallel(&mut m, concurrency, |cp| bar.set_position(cp.entries))
        .await;
    bar.finish_and_clear();
    let stats = stats?;
    if let Some(why) = &stats.not_split {
        eprintln!("note: {why}");
    }
    let c = m.counts()?;
    eprintln!(
        "planned {} tasks ({} delete markers, {}) from {} listed versions and delete markers{}",
        c.total,
        c.delete_markers,
        indicatif::HumanBytes(c.bytes_total),
        c.listed_entries,
        if stats.resumed {
            " (listing resumed from its checkpoint)"
        } else {
            ""
        }
    );
    refresh_summary(&m)?;
    Ok(())
}

/// `plan --refresh`: starts a new listing generation on a complete listing, or continues
/// the unfinished one (a killed refresh, or a first listing not finished yet).
fn begin_refresh(m: &mut Manifest) -> Result<(), JobError> {
    if let Some(g) = m.start_refresh()? {
        eprintln!("refresh {g}: listing the source again");
        return Ok(());
    }
    match m.refreshes()?.last().map_or(0, |r| r.generation) {
        0 => eprintln!("the first listing is not complete: continuing it (nothing to refresh yet)"),
        g => eprintln!("refresh {g}: continuing its listing from its checkpoint"),
    }
    Ok(())
}

/// After a complete refresh: what it added, and how many tasks' versions are gone.
fn refresh_summary(m: &Manifest) -> Result<(), JobError> {
    let all = m.refreshes()?;
    let Some((last, earlier)) = all.split_last() else {
        return Ok(());
    };
    if last.generation == 0 || !m.listing()?.complete {
        return Ok(());
    }
    let before: u64 = earlier.iter().map(|r| r.tasks).sum();
    eprintln!(
        "refresh {}: {} new tasks; {} tasks of earlier listings are no longer in the source (not copied again)",
        last.generation,
        last.tasks,
        before.saturating_sub(last.matched)
    );
    Ok(())
}

/// The stored settings with this run's overrides of endpoints and profiles.
fn run_settings(m: &Manifest, args: &RunArgs) -> Result<JobSettings, JobError> {
    let mut settings = m.require_settings()?;
    let set = |slot: &mut Option<String>, v: &Option<String>| {
        if v.is_some() {
            slot.clone_from(v);
        }
    };
    set(&mut settings.source_side.endpoint, &args.source_endpoint);
    set(&mut settings.dest_side.endpoint, &args.dest_endpoint);
    set(&mut settings.source_side.profile, &args.source_profile);
    set(&mut settings.dest_side.profile, &args.dest_profile);
    if !m.listing()?.complete {
        return Err(JobError::Usage(format!(
            "the listing of {} is not complete; run `plan` again with the same arguments to finish it",
            args.manifest.display()
        )));
    }
    Ok(settings)
}

/// Puts failed tasks back, or gives up on them, as the run's flags ask.
fn requeue(m: &Manifest, args: &RunArgs) -> Result<(), JobError> {
    if args.retry_failed {
        let n = m.retry_failed()?;
        eprintln!("{n} failed tasks put back in the queue");
    }
    if args.skip_failed {
        let n = m.skip_failed()?;
        eprintln!(
            "{n} failed tasks recorded as skipped; their keys' later versions will be copied"
        );
    }
    Ok(())
}

/// Both clients of a run, and what it knows of the destination. `auto` compares the
/// endpoints the clients really reach: two profiles that each set their own `endpoint_url`
/// are two providers, even though no endpoint option was given.
async fn run_clients(
    settings: &mut JobSettings,
    timeouts: Timeouts,
) -> Result<((SdkClient, SdkClient), DestFacts), JobError> {
    let (source, source_endpoint) = build(Side::Source, &settings.source_side, timeouts).await;
    let (dest, dest_endpoint) = build(Side::Dest, &settings.dest_side, timeouts).await;
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
            eprintln!(
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
    Ok(((source, dest), facts))
}

/// `run`: copies the manifest's open tasks. Handles SIGINT/SIGTERM: the first stops taking
/// new tasks and lets requests in flight finish (bounded by the grace period); the second
/// exits at once (the next run reconciles what was in flight).
pub async fn run(args: &RunArgs) -> Result<RunSummary, JobError> {
    let _lock = lock_manifest(&args.manifest)?;
    let m = Manifest::open(&args.manifest, false)?;
    let mut settings = run_settings(&m, args)?;
    requeue(&m, args)?;
    let (clients, facts) = run_clients(&mut settings, args.exec.timeouts()).await?;
    if !facts.versioned && !settings.selection.latest_only && m.has_multi_version_key()? {
        return Err(JobError::Usage(format!(
            "dest: bucket {} does not have versioning enabled, but the job copies several versions of some keys; enable versioning on it",
            settings.dest.bucket
        )));
    }
    let counts = m.counts()?;
    let uploads = m.open_uploads()?;
    let bar = ui::copy_bar(
        ui::show_progress(args.no_progress),
        counts.pending + counts.in_progress,
    );
    let opts = args.exec.run_options();
    let copier = Copier::new(settings, clients, facts, m.into_writer(), &opts, bar);
    copier.abort_leftover_uploads(uploads).await;
    let summary = run_until_signal(&copier, args.exec.grace_period).await;
    copier.flush().await;
    Ok(summary)
}

/// Runs the copier; the first signal stops new tasks, the grace period bounds the wait.
async fn run_until_signal<C: S3Client>(copier: &Arc<Copier<C>>, grace: u64) -> RunSummary {
    let grace = Duration::from_secs(grace);
    let mut signals = {
        let copier = copier.clone();
        tokio::spawn(async move {
            wait_signal().await;
            eprintln!(
                "stopping: no new tasks; waiting up to {}s for requests in flight (press Ctrl-C again to exit now)",
                grace.as_secs()
            );
            copier.stop();
            tokio::select! {
                _ = wait_signal() => {
                    eprintln!("interrupted: exiting now; the next `run` reconciles what was in flight");
                    std::process::exit(130);
                }
                _ = tokio::time::sleep(grace) => {}
            }
        })
    };
    let mut run = Box::pin(copier.clone().run());
    // The signal task ends only when a signal arrived and the grace period ran out.
    let summary = tokio::select! {
        s = &mut run => s,
        _ = &mut signals => {
            eprintln!("grace period over: abandoning requests still in flight");
            RunSummary { interrupted: true, ..RunSummary::default() }
        }
    };
    signals.abort();
    let _ = signals.await;
    summary
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
    let c = m.counts()?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&c).map_err(|e| JobError::Other(e.to_string()))?
        );
    } else {
        println!("{}", report::status_text(&settings, &c));
        for r in m.refreshes()?.iter().filter(|r| r.generation > 0) {
            println!("refresh {}: {} tasks added", r.generation, r.tasks);
        }
    }
    Ok(())
}

/// `report`: the completion report (CSV or JSON), streamed from the manifest.
pub fn report(args: &ReportArgs) -> Result<(), JobError> {
    let m = Manifest::open(&args.manifest, false)?;
    let settings = m.require_settings()?;
    let counts = m.counts()?;
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
            let r = report::Report {
                job: &settings,
                counts: &counts,
                problems: &problems,
            };
            serde_json::to_writer_pretty(&mut out, &r)
                .map_err(|e| JobError::Other(e.to_string()))?;
            writeln!(out).map_err(io)?;
        }
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
        eprintln!(
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

/// `verify`: compares the destination with the source.
pub async fn verify(args: &VerifyArgs) -> Result<VerifyReport, JobError> {
    let mut settings = Manifest::open(&args.manifest, false)?.require_settings()?;
    if let Some(e) = &args.source_endpoint {
        settings.source_side.endpoint = Some(e.clone());
    }
    if let Some(e) = &args.dest_endpoint {
        settings.dest_side.endpoint = Some(e.clone());
    }
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
    };
    let r = verifier
        .run(|r| {
            bar.set_position(r.keys);
            bar.set_message(format!(
                "{} versions, {} differ",
                r.versions, r.mismatched_keys
            ));
        })
        .await;
    bar.finish_and_clear();
    Ok(r?)
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
