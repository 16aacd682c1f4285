//! report: `status` (counts and progress) and the completion report (the summary plus every
//! failed, skipped or blocked task), read from the manifest and written as it streams.
//!
//! Also the AWS-shaped report's rows, streamed from the manifest ([`write_aws`]).
//!
//! May call: the manifest (its records), config, and `aws_report` (the AWS-shaped writer).

use std::io::Write;
use std::path::Path;

use indicatif::HumanBytes;
use serde::Serialize;

use crate::aws_report::{
    error_code, write_aws_report_streamed, FailureFacts, ReportError, ReportRow, ReportScope,
    ReportSpec, ReportWritten, TaskStatus,
};
use crate::config::JobSettings;
use crate::manifest::{Counts, Manifest, ManifestError, Problem, State};

/// Human-readable status lines.
pub fn status_text(settings: &JobSettings, c: &Counts) -> String {
    let pct = if c.total == 0 {
        100.0
    } else {
        (c.done + c.skipped) as f64 * 100.0 / c.total as f64
    };
    let listing = if c.listing_complete {
        "complete".to_string()
    } else {
        format!("in progress ({} entries so far)", c.listed_entries)
    };
    let requests: Vec<String> = c
        .requests
        .iter()
        .map(|(op, n)| format!("{op} {n}"))
        .collect();
    let mut text = format!(
        "job: {} -> {}\n\
         listing: {listing}\n\
         tasks: {} total ({} delete markers): {} done, {} pending, {} in progress, {} failed, {} blocked behind a failure, {} skipped ({} archived) ({pct:.1}% finished)\n\
         bytes: {} of {} copied\n\
         etags: {}\n\
         retries: {}\n\
         requests: {}",
        settings.source,
        settings.dest_label(),
        c.total,
        c.delete_markers,
        c.done,
        c.pending,
        c.in_progress,
        c.failed,
        c.blocked,
        c.skipped,
        c.archived,
        HumanBytes(c.bytes_done),
        HumanBytes(c.bytes_total),
        etag_line(c),
        c.retries,
        if requests.is_empty() { "none yet".to_string() } else { requests.join(", ") },
    );
    if c.restore_pending > 0 {
        text.push_str(&format!(
            "\nrestores pending: {} archived versions (run again once their restores complete)",
            c.restore_pending
        ));
    }
    text
}

/// What happened to the ETags that were at stake (multipart sources, copies in parts): how
/// many were kept, how many changed and why.
fn etag_line(c: &Counts) -> String {
    let mut s = format!(
        "{} multipart ETags kept, {} changed",
        c.etag_preserved, c.etag_changed
    );
    for (why, n) in &c.etag_changes {
        s.push_str(&format!("\n  {n} changed: {why}"));
    }
    s
}

/// The completion report as JSON: settings, counts, problems.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    /// The job.
    pub job: &'a JobSettings,
    /// The counts.
    pub counts: &'a Counts,
    /// Failed, skipped and blocked tasks, each with its destination bucket.
    pub problems: Vec<ProblemRow<'a>>,
}

/// A problem with the destination bucket it is for (a job with several destinations can be
/// fed back per bucket).
#[derive(Debug, Serialize)]
pub struct ProblemRow<'a> {
    /// The destination bucket.
    pub dest_bucket: &'a str,
    /// The task.
    #[serde(flatten)]
    pub problem: &'a Problem,
}

impl<'a> Report<'a> {
    /// The report of `problems`.
    pub fn new(job: &'a JobSettings, counts: &'a Counts, problems: &'a [Problem]) -> Self {
        let problems = problems
            .iter()
            .map(|problem| ProblemRow {
                dest_bucket: job.destination(problem.dest).bucket,
                problem,
            })
            .collect();
        Report {
            job,
            counts,
            problems,
        }
    }
}

/// Writes CSV: a header, then one line per failed, skipped or blocked task (bucket, key,
/// version id, state, error class, code, HTTP status, attempts, message, destination
/// bucket). Rows come from
/// `rows`, which calls back once per problem, so the report streams.
pub fn write_csv<W: Write>(
    out: W,
    settings: &JobSettings,
    rows: impl FnOnce(&mut dyn FnMut(Problem) -> std::io::Result<()>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut w = csv::Writer::from_writer(out);
    let io = |e: csv::Error| std::io::Error::other(e.to_string());
    w.write_record([
        "bucket",
        "key",
        "version_id",
        "state",
        "error_class",
        "error_code",
        "http_status",
        "attempts",
        "message",
        "dest_bucket",
    ])
    .map_err(io)?;
    let bucket = settings.source.bucket.as_str();
    rows(&mut |p: Problem| {
        w.write_record([
            bucket,
            &p.key,
            &p.version_id,
            &p.state,
            p.error_class.as_deref().unwrap_or(""),
            p.error_code.as_deref().unwrap_or(""),
            &p.http_status.map(|s| s.to_string()).unwrap_or_default(),
            &p.attempts.to_string(),
            p.message.as_deref().unwrap_or(""),
            settings.destination(p.dest).bucket,
        ])
        .map_err(io)
    })?;
    w.flush()
}

/// Why an AWS-shaped report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AwsReportError {
    /// Reading the manifest failed.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// Writing the report failed.
    #[error(transparent)]
    Write(#[from] ReportError),
}

/// The error code of a task that blocks behind a failed older version of its key.
pub const BLOCKED_CODE: &str = "BlockedByFailedOlderVersion";

/// The AWS-shaped rows' message for a task to destination bucket `dest` (None: the job has
/// one destination): AWS's shape has no column for it, so the message names it
/// (`Successful: destination BUCKET`, `destination BUCKET: ...`).
fn with_dest(dest: Option<&str>, message: &str) -> String {
    match (dest, message) {
        (None, m) => m.to_string(),
        (Some(d), "") => format!("Successful: destination {d}"),
        (Some(d), m) => format!("destination {d}: {m}"),
    }
}

/// The destination bucket a report row names (None for a job with one destination).
fn row_dest(settings: &JobSettings, dest: i64) -> Option<&str> {
    (settings.destinations.len() > 1).then(|| settings.destination(dest).bucket)
}

/// The report row of a failed, skipped or blocked task: a failure whose code is S3
/// replication's reason where one fits (see `aws_report::error_code`); its message names
/// the destination bucket `dest` when there is one to name.
pub fn problem_row(bucket: &str, dest: Option<&str>, p: &Problem) -> ReportRow {
    let status = p.http_status.and_then(|s| u16::try_from(s).ok());
    let message = p.message.as_deref().unwrap_or("");
    let code = if p.state == "blocked" {
        BLOCKED_CODE.to_string()
    } else {
        let facts = FailureFacts::recorded(
            p.error_side,
            p.error_op.as_deref(),
            p.error_class.as_deref(),
            p.error_code.as_deref(),
            status,
            message,
        );
        error_code(&facts)
    };
    ReportRow {
        bucket: bucket.to_string(),
        key: p.key.clone(),
        version_id: Some(p.version_id.clone()),
        task_status: TaskStatus::Failed,
        error_code: Some(code),
        http_status: status,
        message: with_dest(dest, message),
    }
}

/// Writes the AWS-shaped report of the manifest's tasks into `dir` (streamed: memory does
/// not grow with the tasks): done tasks `succeeded` (scope all), failed, skipped and
/// blocked tasks `failed`. Pending tasks are left out.
pub fn write_aws(
    m: &Manifest,
    settings: &JobSettings,
    dir: &Path,
    spec: &ReportSpec,
) -> Result<ReportWritten, AwsReportError> {
    let bucket = settings.source.bucket.as_str();
    write_aws_report_streamed(dir, spec, |emit| {
        // The manifest's callbacks speak io::Error: a write error waits here.
        let mut failed: Option<ReportError> = None;
        let mut push = |row: ReportRow| {
            emit(row).map_err(|e| {
                let text = e.to_string();
                failed = Some(e);
                std::io::Error::other(text)
            })
        };
        let read = match spec.scope {
            ReportScope::All => m.for_each_in_state(State::Done, |key, version, dest| {
                push(ReportRow {
                    bucket: bucket.to_string(),
                    key: key.to_string(),
                    version_id: Some(version.to_string()),
                    task_status: TaskStatus::Succeeded,
                    error_code: None,
                    http_status: None,
                    message: with_dest(row_dest(settings, dest), ""),
                })
            }),
            ReportScope::Failed => Ok(()),
        }
        .and_then(|()| {
            m.for_each_problem(|p| push(problem_row(bucket, row_dest(settings, p.dest), &p)))
        });
        match (read, failed) {
            (_, Some(e)) => Err(AwsReportError::Write(e)),
            (r, None) => r.map_err(AwsReportError::Manifest),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_csv() {
        let settings: JobSettings = serde_json::from_str(
            r#"{"source":{"bucket":"b","prefix":""},"dest":{"bucket":"d","prefix":""},
            "source_side":{"endpoint":null,"region":null,"profile":null,"path_style":false},
            "dest_side":{"endpoint":null,"region":null,"profile":null,"path_style":false},
            "selection":{"prefix":"","delete_markers":false,"latest_only":false},
            "copy":{"mode":"auto","multipart_threshold":1,"part_size":5242880,"storage_class":null,"sse":null,"sse_kms_key_id":null,"acl":null}}"#,
        )
        .unwrap();
        let mut out = Vec::new();
        write_csv(&mut out, &settings, |f| {
            f(Problem {
                key: "a,b \"c\"".into(),
                version_id: "v1".into(),
                state: "failed".into(),
                error_class: Some("fatal".into()),
                error_code: Some("AccessDenied".into()),
                http_status: Some(403),
                error_side: None,
                error_op: None,
                message: Some("line".into()),
                attempts: 2,
                dest: 0,
            })
        })
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("b,\"a,b \"\"c\"\"\",v1,failed,fatal,AccessDenied,403,2,line,d"),
            "{text}"
        );
        assert!(
            settings.copy.stamp,
            "old settings without the field keep the stamp on"
        );
    }

    #[test]
    fn aws_rows_of_a_job_with_several_destinations_name_the_bucket() {
        let p = Problem {
            key: "k".into(),
            version_id: "v1".into(),
            state: "skipped".into(),
            error_class: Some("archived".into()),
            error_code: None,
            http_status: None,
            error_side: None,
            error_op: None,
            message: Some("archived: restore first".into()),
            attempts: 1,
            dest: 1,
        };
        let row = problem_row("src", Some("second"), &p);
        assert_eq!(
            row.bucket, "src",
            "AWS's Bucket column is the source bucket"
        );
        assert_eq!(row.message, "destination second: archived: restore first");
        assert_eq!(
            problem_row("src", None, &p).message,
            "archived: restore first"
        );
        assert_eq!(
            with_dest(Some("second"), ""),
            "Successful: destination second"
        );
    }
}
