//! job: the commands (`plan`, `run`, `status`, `report`, `verify`), wiring the stages
//! together: arguments → settings → clients → lister → manifest → copier → report/verify.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use aws_sdk_s3::Client;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{
    CopyArgs, ExecArgs, PlanArgs, ReportArgs, RunArgs, SideArgs, StatusArgs, VerifyArgs,
};
use crate::config::{
    build_client, build_side_client, ConfigError, CopyOptions, JobSettings, Location, RawBody,
    Selection, Side, SideConfig,
};
use crate::copier::{copy_bar, Copier, FailureThreshold, RunOptions, RunSummary};
use crate::lister::{list_into, ListError};
use crate::manifest::{Manifest, ManifestError};
use crate::report;
use crate::s3::{classify, with_retry, ErrorClass, Limiter, RetryPolicy, S3Error};
use crate::verify::{verify, VerifyReport};

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
}

impl From<ListError> for JobError {
    fn from(e: ListError) -> Self {
        match e {
            ListError::S3(e) => JobError::S3(e),
            ListError::Manifest(m) => JobError::Manifest(m),
            ListError::NeedsVersioning(m) => JobError::Usage(m),
            ListError::Parse(m) => JobError::Other(m),
        }
    }
}

/// An exclusive lock on a manifest, held by a file lock beside it (`JOB.db.lock`). The
/// operating system releases it when the process dies, so a stale lock never blocks.
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
    let mut f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
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

fn side_config(
    endpoint: &Option<String>,
    region: &Option<String>,
    profile: &Option<String>,
    a: &SideArgs,
    source: bool,
) -> SideConfig {
    SideConfig {
        endpoint: endpoint.clone(),
        region: region.clone(),
        profile: profile.clone(),
        path_style: a.path_style,
        checksum_calculation: if source {
            a.source_checksum_calculation
        } else {
            a.dest_checksum_calculation
        }
        .unwrap_or_default(),
    }
}

fn copy_options(c: &CopyArgs) -> Result<CopyOptions, ConfigError> {
    let o = CopyOptions {
        mode: c.copy_mode,
        multipart_threshold: c.multipart_threshold,
        part_size: c.part_size,
        storage_class: c.storage_class.clone(),
        sse: c.sse.clone(),
        sse_kms_key_id: c.sse_kms_key_id.clone(),
        acl: c.acl.clone(),
    };
    o.validate()?;
    Ok(o)
}

/// The job settings that `plan` arguments describe.
pub fn settings_from(args: &PlanArgs) -> Result<JobSettings, JobError> {
    let source = Location::parse(&args.source)?;
    if !source.prefix.is_empty() {
        return Err(JobError::Usage(format!(
            "--source takes a bucket only ({}); select keys with --prefix",
            args.source
        )));
    }
    let dest = Location::parse(&args.dest)?;
    let s = &args.sides;
    Ok(JobSettings {
        source,
        dest,
        source_side: side_config(
            &s.source_endpoint,
            &s.source_region,
            &s.source_profile,
            s,
            true,
        ),
        dest_side: side_config(&s.dest_endpoint, &s.dest_region, &s.dest_profile, s, false),
        selection: Selection {
            prefix: args.selection.prefix.clone().unwrap_or_default(),
            delete_markers: args.selection.delete_markers,
            latest_only: args.selection.latest_only,
        },
        copy: copy_options(&args.copy)?,
    })
}

/// Whether progress bars are drawn: asked for, and standard error is a terminal.
fn show_progress(no_progress: bool) -> bool {
    !no_progress && std::io::stderr().is_terminal()
}

async fn clients(s: &JobSettings) -> (Client, Client) {
    let source = build_client(&s.source_side).await;
    let dest = build_client(&s.dest_side).await;
    (source, dest)
}

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

/// Checks that a bucket answers, then returns whether versioning is enabled on it.
async fn probe_bucket(
    client: &Client,
    side: Side,
    bucket: &str,
    policy: &RetryPolicy,
    limiter: &Limiter,
) -> Result<bool, JobError> {
    let retries = AtomicU64::new(0);
    with_retry(policy, limiter, &retries, || async {
        client
            .head_bucket()
            .bucket(bucket)
            .send()
            .await
            .map_err(|e| classify(side, "HeadBucket", false, e))
    })
    .await
    .map_err(|e| bucket_error(side, bucket, e))?;
    let status = with_retry(policy, limiter, &retries, || async {
        let raw = RawBody::default();
        match client
            .get_bucket_versioning()
            .bucket(bucket)
            .customize()
            .interceptor(raw.clone())
            .send()
            .await
        {
            Ok(o) => Ok(o.status().map(|s| s.as_str().to_string())),
            Err(e) if e.raw_response().is_some_and(|r| r.status().is_success()) => {
                // Some servers (moto) answer with another root element; read <Status> from
                // the raw body instead of failing.
                Ok(raw.take().and_then(|b| {
                    let s = String::from_utf8_lossy(&b);
                    let start = s.find("<Status>")? + "<Status>".len();
                    let end = s[start..].find("</Status>")? + start;
                    Some(s[start..end].to_string())
                }))
            }
            Err(e) => Err(classify(side, "GetBucketVersioning", false, e)),
        }
    })
    .await
    .map_err(|e| bucket_error(side, bucket, e))?;
    Ok(status.as_deref() == Some("Enabled"))
}

fn preflight_policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        ..RetryPolicy::default()
    }
}

/// What `plan` did.
#[derive(Debug, Default)]
pub struct PlanOutcome {
    /// The listing was already complete.
    pub already_complete: bool,
}

/// `plan`: lists the source into the manifest (resuming an unfinished listing).
pub async fn plan(args: &PlanArgs) -> Result<PlanOutcome, JobError> {
    let settings = settings_from(args)?;
    let _lock = lock_manifest(&args.manifest)?;
    // An existing manifest is checked first; a new one is only created once both buckets
    // answered, so a mistyped bucket leaves no manifest behind.
    let existing = if args.manifest.exists() {
        Some(Manifest::open(&args.manifest, false)?)
    } else {
        None
    };
    if let Some(m) = &existing {
        if let Some(stored) = m.settings()? {
            if let Some(diff) = settings.identity_differs(&stored) {
                return Err(JobError::Usage(format!(
                    "manifest {} belongs to another job: this plan has {diff}; use a new --manifest, or the same arguments to continue it",
                    args.manifest.display()
                )));
            }
        }
        if m.listing()?.complete {
            let c = m.counts()?;
            eprintln!(
                "listing already complete: {} tasks in {}; nothing to do (use `run`)",
                c.total,
                args.manifest.display()
            );
            return Ok(PlanOutcome {
                already_complete: true,
            });
        }
    }
    let policy = preflight_policy();
    let limiter = Limiter::new(4, None);
    let (source, dest) = clients(&settings).await;
    probe_bucket(
        &source,
        Side::Source,
        &settings.source.bucket,
        &policy,
        &limiter,
    )
    .await?;
    let dest_versioned =
        probe_bucket(&dest, Side::Dest, &settings.dest.bucket, &policy, &limiter).await?;
    let mut m = match existing {
        Some(m) => m,
        None => Manifest::open(&args.manifest, true)?,
    };
    if m.settings()?.as_ref() != Some(&settings) {
        // New, or the same job with other side or copy options (e.g. a moved endpoint).
        m.store_settings(&settings)?;
    }
    let cp = m.listing()?;
    let bar = if show_progress(args.no_progress) {
        let b = ProgressBar::new_spinner();
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} listing [{elapsed_precise}] {human_pos} versions and delete markers ({per_sec}) {msg}",
            )
            .expect("template"),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b.set_position(cp.entries);
        b
    } else {
        ProgressBar::hidden()
    };
    let retries = AtomicU64::new(0);
    let stats = list_into(
        &source,
        &settings,
        &mut m,
        dest_versioned || settings.selection.latest_only,
        &RetryPolicy::default(),
        &Limiter::new(1, None),
        &retries,
        |cp| bar.set_position(cp.entries),
    )
    .await;
    bar.finish_and_clear();
    let stats = stats?;
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
    Ok(PlanOutcome::default())
}

fn run_options(e: &ExecArgs, no_progress: bool) -> RunOptions {
    RunOptions {
        concurrency: e.concurrency as usize,
        part_concurrency: e.part_concurrency as usize,
        policy: RetryPolicy {
            max_attempts: e.max_attempts as usize,
            min_delay: Duration::from_millis(e.retry_min_delay_ms),
            max_delay: Duration::from_millis(e.retry_max_delay_ms.max(e.retry_min_delay_ms)),
        },
        max_rps: e.max_rps,
        failure_threshold: FailureThreshold {
            min_tasks: e.failure_threshold_min_tasks,
            percent: e.failure_threshold_percent,
        },
        progress: show_progress(no_progress),
    }
}

/// `run`: copies the manifest's open tasks. Handles SIGINT/SIGTERM: the first stops taking
/// new tasks and lets requests in flight finish (bounded by the grace period); the second
/// exits at once (the next run reconciles what was in flight).
pub async fn run(args: &RunArgs) -> Result<RunSummary, JobError> {
    let _lock = lock_manifest(&args.manifest)?;
    let m = Manifest::open(&args.manifest, false)?;
    let mut settings = m.require_settings()?;
    if let Some(e) = &args.source_endpoint {
        settings.source_side.endpoint = Some(e.clone());
    }
    if let Some(e) = &args.dest_endpoint {
        settings.dest_side.endpoint = Some(e.clone());
    }
    if let Some(p) = &args.source_profile {
        settings.source_side.profile = Some(p.clone());
    }
    if let Some(p) = &args.dest_profile {
        settings.dest_side.profile = Some(p.clone());
    }
    if !m.listing()?.complete {
        return Err(JobError::Usage(format!(
            "the listing of {} is not complete; run `plan` again with the same arguments to finish it",
            args.manifest.display()
        )));
    }
    if args.retry_failed {
        let n = m.retry_failed()?;
        eprintln!("{n} failed tasks put back in the queue");
    }
    let opts = run_options(&args.exec, args.no_progress);
    // `auto` compares the endpoints the clients really reach: two profiles that each set
    // their own `endpoint_url` are two providers, even though no endpoint option was given.
    let (source, source_endpoint) = build_side_client(&settings.source_side).await;
    let (dest, dest_endpoint) = build_side_client(&settings.dest_side).await;
    settings.source_side.endpoint = source_endpoint;
    settings.dest_side.endpoint = dest_endpoint;
    let policy = preflight_policy();
    let limiter = Limiter::new(4, None);
    let dest_versioned =
        probe_bucket(&dest, Side::Dest, &settings.dest.bucket, &policy, &limiter).await;
    let dest_versioned = match dest_versioned {
        Ok(v) => v,
        // A missing or unreadable destination is left to the tasks and the failure
        // threshold, which stop the job with the error.
        Err(JobError::S3(e)) if e.class == ErrorClass::Fatal => {
            eprintln!("warning: {e}");
            true
        }
        Err(e) => return Err(e),
    };
    if !dest_versioned && !settings.selection.latest_only && m.has_multi_version_key()? {
        return Err(JobError::Usage(format!(
            "dest: bucket {} does not have versioning enabled, but the job copies several versions of some keys; enable versioning on it",
            settings.dest.bucket
        )));
    }
    let counts = m.counts()?;
    let open = counts.pending + counts.in_progress;
    let uploads = m.open_uploads()?;
    let writer = m.into_writer();
    let bar = copy_bar(opts.progress, open);
    let copier = Copier::new(settings, source, dest, writer, dest_versioned, &opts, bar);
    copier.abort_leftover_uploads(uploads).await;

    let signals = {
        let copier = copier.clone();
        let grace = Duration::from_secs(args.exec.grace_period);
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
    let mut signals = signals;
    let mut run = Box::pin(copier.clone().run(opts.concurrency));
    // The signal task ends only when a signal arrived and the grace period ran out.
    let summary = tokio::select! {
        s = &mut run => Some(s),
        _ = &mut signals => None,
    };
    let summary = match summary {
        Some(s) => s,
        None => {
            eprintln!("grace period over: abandoning requests still in flight");
            drop(run);
            RunSummary {
                interrupted: true,
                ..RunSummary::default()
            }
        }
    };
    signals.abort();
    let _ = signals.await;
    copier.flush().await;
    drop(copier);
    Ok(summary)
}

async fn wait_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
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
    }
    Ok(())
}

/// `report`: the completion report (CSV or JSON).
pub fn report(args: &ReportArgs) -> Result<(), JobError> {
    let m = Manifest::open(&args.manifest, false)?;
    let settings = m.require_settings()?;
    let counts = m.counts()?;
    let problems = m.problems(usize::MAX >> 1)?;
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(std::io::BufWriter::new(File::create(p).map_err(|e| {
            JobError::Usage(format!("cannot write {}: {e}", p.display()))
        })?)),
        None => Box::new(std::io::stdout().lock()),
    };
    let io = |e: std::io::Error| JobError::Other(format!("writing the report: {e}"));
    if args.format == "json" {
        let r = report::Report {
            job: &settings,
            counts: &counts,
            problems: &problems,
        };
        serde_json::to_writer_pretty(&mut out, &r).map_err(|e| JobError::Other(e.to_string()))?;
        writeln!(out).map_err(io)?;
    } else {
        report::write_csv(&mut out, &settings, &problems).map_err(io)?;
    }
    out.flush().map_err(io)?;
    if args.output.is_some() {
        eprintln!(
            "{} done, {} failed, {} skipped, {} pending of {} tasks",
            counts.done,
            counts.failed,
            counts.skipped,
            counts.pending + counts.in_progress,
            counts.total
        );
    }
    Ok(())
}

/// `verify`: compares the destination with the source; Ok(true) when they match.
pub async fn verify_cmd(args: &VerifyArgs) -> Result<VerifyReport, JobError> {
    let m = Manifest::open(&args.manifest, false)?;
    let mut settings = m.require_settings()?;
    drop(m);
    if let Some(e) = &args.source_endpoint {
        settings.source_side.endpoint = Some(e.clone());
    }
    if let Some(e) = &args.dest_endpoint {
        settings.dest_side.endpoint = Some(e.clone());
    }
    let (source, dest) = clients(&settings).await;
    let bar = if show_progress(args.no_progress) {
        let b = ProgressBar::new_spinner();
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} verifying [{elapsed_precise}] {pos} keys ({per_sec}) {msg}",
            )
            .expect("template"),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    } else {
        ProgressBar::hidden()
    };
    let r = verify(
        &settings,
        &source,
        &dest,
        &RetryPolicy::default(),
        &Limiter::new(2, None),
        |r| {
            bar.set_position(r.keys);
            bar.set_message(format!(
                "{} versions, {} differ",
                r.versions, r.mismatched_keys
            ));
        },
    )
    .await;
    bar.finish_and_clear();
    Ok(r?)
}

/// Prints a run's one-line summary to standard error and returns the exit code.
pub fn finish_run(s: &RunSummary, manifest: &Path) -> i32 {
    let counts = Manifest::open(manifest, false).and_then(|m| m.counts());
    let left = counts
        .as_ref()
        .map(|c| {
            format!(
                ", {} failed and {} open in the manifest",
                c.failed,
                c.pending + c.in_progress
            )
        })
        .unwrap_or_default();
    let line = format!(
        "{} done ({} reconciled), {} failed, {} skipped, {} copied, {} retries{left}",
        s.done,
        s.reconciled,
        s.failed,
        s.skipped,
        indicatif::HumanBytes(s.bytes),
        s.retries
    );
    if let Some(why) = &s.aborted {
        eprintln!("run stopped: {why} ({line})");
        return 1;
    }
    if s.interrupted {
        eprintln!("run interrupted: {line}; run again to continue");
        return 130;
    }
    eprintln!("run finished: {line}");
    match counts {
        Ok(c) if c.failed > 0 => 1,
        Ok(c) if c.pending + c.in_progress > 0 => 1,
        Ok(_) => 0,
        Err(_) => 3,
    }
}

/// The one line printed for an error, with a hint where one helps.
pub fn error_line(e: &JobError) -> String {
    match e {
        JobError::S3(s) => match checksum_hint(s) {
            Some(h) => format!("error: {e} ({h})"),
            None => format!("error: {e}"),
        },
        _ => format!("error: {e}"),
    }
}

/// A hint for checksum-related rejections from S3-compatible servers.
pub fn checksum_hint(e: &S3Error) -> Option<&'static str> {
    let m = e.message.to_ascii_lowercase();
    if m.contains("chunked")
        || m.contains("trailer")
        || m.contains("x-amz-checksum")
        || m.contains("x-amz-content-sha256")
    {
        Some("the server may not accept the SDK's streaming checksums: try --source-checksum-calculation when-required / --dest-checksum-calculation when-required")
    } else {
        None
    }
}
