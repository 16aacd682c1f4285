//! job::report: the `report` command: CSV or JSON streamed from the manifest, or the
//! AWS-shaped report written locally or uploaded to S3.
//!
//! May call: `manifest`, `report`, `aws_report`, `s3`.

use super::{preflight, JobError};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::cli::{ReportArgs, ReportFormat};
use crate::config::JobSettings;
use crate::manifest::{Manifest, ManifestError};
use crate::s3::{build, S3Error, Side, Timeouts};

/// `report --format aws`: S3 Batch Operations' completion report, written into a directory,
/// or built in a scratch directory and uploaded (results first, `manifest.json` last) with the
/// destination's credentials.
pub(super) async fn report_aws(
    args: &ReportArgs,
    m: &Manifest,
    settings: &JobSettings,
) -> Result<(), JobError> {
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
    let written = crate::report::write_aws(m, settings, &dir, &spec).map_err(|e| match e {
        crate::report::AwsReportError::Manifest(m) => JobError::Manifest(m),
        crate::report::AwsReportError::Write(w) => {
            JobError::Other(format!("writing the report: {w}"))
        }
    })?;
    let mut place = written.dir.display().to_string();
    if target.is_some() {
        let mut keys: Vec<String> = written.files.iter().map(|f| f.key.clone()).collect();
        keys.push(format!("{prefix}job-{}/manifest.json", spec.job_id));
        upload_report(settings, &bucket, &prefix, &dir, &keys).await?;
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

/// The AWS-shaped report's spec: job id (`--job-id`, else the job's name: a manifest file's
/// stem, a PostgreSQL job's name), scope,
/// and where its manifest says the files are.
pub(super) fn aws_spec(
    args: &ReportArgs,
    bucket: String,
    prefix: String,
) -> Result<crate::aws_report::ReportSpec, JobError> {
    use crate::aws_report::{ReportScope, ReportSpec, DEFAULT_ROWS_PER_FILE};
    let job_id = match &args.job_id {
        Some(id) => id.clone(),
        None => crate::manifest::job_name(&args.manifest),
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
pub(super) fn report_target(output: &str) -> Option<(String, String)> {
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
pub(super) async fn upload_report(
    settings: &JobSettings,
    bucket: &str,
    prefix: &str,
    dir: &Path,
    keys: &[String],
) -> Result<(), JobError> {
    let (client, _) = build(Side::Dest, &settings.dest_side, Timeouts::default()).await;
    let dest = preflight(&client);
    for key in keys {
        let local = dir.join(key.strip_prefix(prefix).unwrap_or(key));
        let body = std::fs::read(&local)
            .map_err(|e| JobError::Other(format!("{}: {e}", local.display())))?;
        let obj = crate::s3::ObjectRef::key(bucket, key);
        let body = bytes::Bytes::from(body);
        let attrs = crate::s3::WriteAttrs::default();
        // Written again after an ambiguous failure: a report file put twice is the same file.
        let no_reconcile = || async { Ok::<_, S3Error>(None::<()>) };
        dest.req()
            .write(|w| w.put_object(&obj, body.clone(), &attrs), no_reconcile)
            .await?;
    }
    Ok(())
}

/// `report`: the completion report (CSV, JSON or AWS-shaped), streamed from the manifest.
pub async fn report(args: &ReportArgs) -> Result<(), JobError> {
    let m = Manifest::open(&args.manifest, false)?;
    let settings = m.require_settings()?;
    if args.format == ReportFormat::Aws {
        return report_aws(args, &m, &settings).await;
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
    let to_stdout = args.output.is_none();
    let io = |e: std::io::Error| {
        if to_stdout {
            // `report | head`: the reader went away; quiet, as Unix tools are.
            crate::ui::exit_on_stdout_error(&e);
        }
        JobError::Other(format!("writing the report: {e}"))
    };
    match args.format {
        ReportFormat::Json => {
            let problems = m.problems(usize::MAX >> 1)?;
            let r = crate::report::Report::new(&settings, &counts, &problems);
            serde_json::to_writer_pretty(&mut out, &r).map_err(|e| io(e.into()))?;
            writeln!(out).map_err(io)?;
        }
        ReportFormat::Aws => return report_aws(args, &m, &settings).await,
        ReportFormat::Csv => {
            let mut failed: Option<ManifestError> = None;
            crate::report::write_csv(&mut out, &settings, |row| {
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
