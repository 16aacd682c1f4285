//! aws_report: the completion report in the shape S3 Batch Operations writes, so scripts that
//! parse AWS's reports parse ours: `job-<id>/manifest.json` (`Format: Report_CSV_20180820`,
//! `ReportCreationDate`, `Results[]`, `ReportSchema`) and `job-<id>/results/<n>.csv` — no
//! header, RFC 4180 quoting (the `csv` crate), one file per task status (a new one every
//! [`DEFAULT_ROWS_PER_FILE`] rows), keys URL-encoded so that a failed-tasks report can be fed
//! back as a CSV manifest. Also the mapping of this tool's failures onto S3 replication's
//! failure reasons ([`error_code`]).
//!
//! Column order: AWS's `ReportSchema` reads `Bucket, Key, VersionId, TaskStatus, ErrorCode,
//! HTTPStatusCode, ResultMessage`, but the rows AWS writes carry the HTTP status in the fifth
//! column and the error code in the sixth (`...,failed,403,AccessDenied,...`,
//! `...,succeeded,200,,Successful`). We write rows as AWS does, since scripts are written
//! against real reports.
//!
//! The report is built in `.job-<id>.partial` and renamed into place, `manifest.json` last, so
//! a reader never sees a half-written report; an earlier report of the same job is replaced.
//!
//! May call: `s3` (key encoding, side and error class names).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use md5::{Digest, Md5};
use serde::Serialize;
use time::OffsetDateTime;

use crate::s3::types::encode_key;
use crate::s3::{ErrorClass, Side};

/// The report format name AWS uses.
pub const FORMAT: &str = "Report_CSV_20180820";
/// The schema line of `manifest.json`.
pub const REPORT_SCHEMA: &str =
    "Bucket, Key, VersionId, TaskStatus, ErrorCode, HTTPStatusCode, ResultMessage";
/// Rows per results file before a new one starts.
pub const DEFAULT_ROWS_PER_FILE: u64 = 1_000_000;

/// Why a report could not be written (one line, naming the path).
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ReportError {
    /// The file or directory.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> ReportError + '_ {
    move |e| ReportError {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// A task's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TaskStatus {
    /// Copied (or skipped as already there).
    Succeeded,
    /// Failed for good.
    Failed,
}

impl TaskStatus {
    /// AWS's spelling: `succeeded`, `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
        }
    }
}

/// Which tasks the report lists (`--report-scope`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportScope {
    /// Every task.
    All,
    /// Failed tasks only.
    Failed,
}

/// One task of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportRow {
    /// Source bucket.
    pub bucket: String,
    /// Key, decoded (encoded when written).
    pub key: String,
    /// Version id (None: the report leaves the column empty).
    pub version_id: Option<String>,
    /// Outcome.
    pub task_status: TaskStatus,
    /// Error code (see [`error_code`]); None for a success.
    pub error_code: Option<String>,
    /// HTTP status of the last answer (200 for a success when None).
    pub http_status: Option<u16>,
    /// Result message (`Successful` for a success when empty).
    pub message: String,
}

/// What the report is for and where its manifest says the files are.
#[derive(Clone, Debug)]
pub struct ReportSpec {
    /// The job id (`job-<id>`).
    pub job_id: String,
    /// Which tasks are listed.
    pub scope: ReportScope,
    /// `ReportCreationDate`.
    pub created: OffsetDateTime,
    /// `Results[].Bucket`: the bucket the report is uploaded to (for a local directory, what
    /// the caller wants scripts to see, e.g. the directory).
    pub bucket: String,
    /// Key prefix of the report in that bucket (`""` or ending in `/`).
    pub prefix: String,
    /// Rows per results file.
    pub rows_per_file: u64,
}

/// One results file written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResultFile {
    /// `succeeded` or `failed`.
    #[serde(rename = "TaskExecutionStatus")]
    pub status: &'static str,
    /// `ReportSpec::bucket`.
    #[serde(rename = "Bucket")]
    pub bucket: String,
    /// MD5 of the file, hex.
    #[serde(rename = "MD5Checksum")]
    pub md5: String,
    /// `<prefix>job-<id>/results/<n>.csv`.
    #[serde(rename = "Key")]
    pub key: String,
}

#[derive(Serialize)]
struct Manifest<'a> {
    #[serde(rename = "Format")]
    format: &'a str,
    #[serde(rename = "ReportCreationDate")]
    created: String,
    #[serde(rename = "Results")]
    results: &'a [ResultFile],
    #[serde(rename = "ReportSchema")]
    schema: &'a str,
}

/// What was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportWritten {
    /// `<dir>/job-<id>`.
    pub dir: PathBuf,
    /// The results files, in the manifest's order.
    pub files: Vec<ResultFile>,
    /// Rows of succeeded tasks written.
    pub succeeded: u64,
    /// Rows of failed tasks written.
    pub failed: u64,
}

/// A writer that keeps the MD5 of what passes through.
struct Md5Writer<W: Write> {
    inner: W,
    md5: Md5,
}

impl<W: Write> Write for Md5Writer<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.md5.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The results file being written for one status.
struct Open {
    number: u64,
    rows: u64,
    path: PathBuf,
    csv: csv::Writer<Md5Writer<BufWriter<File>>>,
}

/// Writes the report's files as rows arrive; one open file per status.
struct Writer<'a> {
    spec: &'a ReportSpec,
    results_dir: PathBuf,
    next_number: u64,
    open: [Option<Open>; 2],
    done: Vec<(u64, ResultFile)>,
}

impl Writer<'_> {
    fn slot(status: TaskStatus) -> usize {
        match status {
            TaskStatus::Succeeded => 0,
            TaskStatus::Failed => 1,
        }
    }

    fn write(&mut self, row: &ReportRow) -> Result<(), ReportError> {
        let slot = Self::slot(row.task_status);
        let full = self.open[slot]
            .as_ref()
            .is_some_and(|o| o.rows >= self.spec.rows_per_file.max(1));
        if full {
            self.close(row.task_status)?;
        }
        if self.open[slot].is_none() {
            self.next_number += 1;
            let path = self.results_dir.join(format!("{}.csv", self.next_number));
            let file = File::create(&path).map_err(io_err(&path))?;
            let csv = csv::WriterBuilder::new()
                .has_headers(false)
                .from_writer(Md5Writer {
                    inner: BufWriter::new(file),
                    md5: Md5::new(),
                });
            self.open[slot] = Some(Open {
                number: self.next_number,
                rows: 0,
                path,
                csv,
            });
        }
        let Some(open) = self.open[slot].as_mut() else {
            return Ok(());
        };
        open.csv
            .write_record(record(row))
            .map_err(|e| ReportError {
                path: open.path.display().to_string(),
                message: e.to_string(),
            })?;
        open.rows += 1;
        Ok(())
    }

    fn close(&mut self, status: TaskStatus) -> Result<(), ReportError> {
        let Some(open) = self.open[Self::slot(status)].take() else {
            return Ok(());
        };
        let path = open.path;
        let mut inner = open
            .csv
            .into_inner()
            .map_err(|e| io_err(&path)(e.into_error()))?;
        inner.flush().map_err(io_err(&path))?;
        let file = inner
            .inner
            .into_inner()
            .map_err(|e| io_err(&path)(e.into_error()))?;
        file.sync_all().map_err(io_err(&path))?;
        let md5 = hex::encode(inner.md5.finalize());
        let key = format!(
            "{}job-{}/results/{}.csv",
            self.spec.prefix, self.spec.job_id, open.number
        );
        let result = ResultFile {
            status: status.as_str(),
            bucket: self.spec.bucket.clone(),
            md5,
            key,
        };
        self.done.push((open.number, result));
        Ok(())
    }
}

/// The CSV fields of one row (see the module header for the column order).
fn record(row: &ReportRow) -> [String; 7] {
    let (status, code, message) = match row.task_status {
        TaskStatus::Succeeded => (
            row.http_status.unwrap_or(200).to_string(),
            row.error_code.clone().unwrap_or_default(),
            if row.message.is_empty() {
                "Successful".to_string()
            } else {
                row.message.clone()
            },
        ),
        TaskStatus::Failed => (
            row.http_status.map(|s| s.to_string()).unwrap_or_default(),
            row.error_code.clone().unwrap_or_default(),
            row.message.clone(),
        ),
    };
    [
        row.bucket.clone(),
        encode_key(&row.key),
        row.version_id.clone().unwrap_or_default(),
        row.task_status.as_str().to_string(),
        status,
        code,
        message,
    ]
}

/// Writes `<dir>/job-<id>/` (see the module header) and returns what it wrote.
pub fn write_aws_report(
    dir: &Path,
    spec: &ReportSpec,
    rows: impl IntoIterator<Item = ReportRow>,
) -> Result<ReportWritten, ReportError> {
    write_aws_report_streamed(dir, spec, |emit| rows.into_iter().try_for_each(emit))
}

/// [`write_aws_report`] for rows pushed by `feed` (e.g. streamed from the manifest): `feed`
/// calls `emit` once per row and returns its own errors (`E`), into which a write error
/// converts.
pub fn write_aws_report_streamed<E: From<ReportError>>(
    dir: &Path,
    spec: &ReportSpec,
    feed: impl FnOnce(&mut dyn FnMut(ReportRow) -> Result<(), ReportError>) -> Result<(), E>,
) -> Result<ReportWritten, E> {
    let partial = dir.join(format!(".job-{}.partial", spec.job_id));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
    }
    let results_dir = partial.join("results");
    std::fs::create_dir_all(&results_dir).map_err(io_err(&results_dir))?;
    let mut w = Writer {
        spec,
        results_dir,
        next_number: 0,
        open: [None, None],
        done: Vec::new(),
    };
    let (mut succeeded, mut failed) = (0u64, 0u64);
    feed(&mut |row: ReportRow| {
        match row.task_status {
            TaskStatus::Succeeded if spec.scope == ReportScope::Failed => return Ok(()),
            TaskStatus::Succeeded => succeeded += 1,
            TaskStatus::Failed => failed += 1,
        }
        w.write(&row)
    })?;
    w.close(TaskStatus::Succeeded)?;
    w.close(TaskStatus::Failed)?;
    w.done.sort_by_key(|(n, _)| *n);
    let files: Vec<ResultFile> = w.done.into_iter().map(|(_, f)| f).collect();
    write_manifest(&partial, spec, &files)?;
    let target = dir.join(format!("job-{}", spec.job_id));
    replace_dir(&partial, &target)?;
    Ok(ReportWritten {
        dir: target,
        files,
        succeeded,
        failed,
    })
}

fn write_manifest(
    partial: &Path,
    spec: &ReportSpec,
    files: &[ResultFile],
) -> Result<(), ReportError> {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    let created = spec
        .created
        .to_offset(time::UtcOffset::UTC)
        .format(&fmt)
        .map_err(|e| ReportError {
            path: partial.display().to_string(),
            message: e.to_string(),
        })?;
    let manifest = Manifest {
        format: FORMAT,
        created,
        results: files,
        schema: REPORT_SCHEMA,
    };
    let path = partial.join("manifest.json");
    let mut text = serde_json::to_vec_pretty(&manifest).map_err(|e| ReportError {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    text.push(b'\n');
    std::fs::write(&path, text).map_err(io_err(&path))
}

/// Moves `partial` to `target`, replacing an earlier report there (and nothing else: a
/// `target` that is not a report is left alone and refused).
fn replace_dir(partial: &Path, target: &Path) -> Result<(), ReportError> {
    if target.exists() {
        let is_report =
            std::fs::read_to_string(target.join("manifest.json")).is_ok_and(|m| m.contains(FORMAT));
        if !is_report {
            return Err(ReportError {
                path: target.display().to_string(),
                message: "exists and is not an AWS-shaped report; not replacing it".into(),
            });
        }
        std::fs::remove_dir_all(target).map_err(io_err(target))?;
    }
    std::fs::rename(partial, target).map_err(io_err(target))
}

/// What is known of one failure, as the manifest keeps it.
#[derive(Clone, Copy, Debug, Default)]
pub struct FailureFacts<'a> {
    /// Which side's request failed, when known.
    pub side: Option<Side>,
    /// The S3 operation (`GetObject`, `PutObject`, ...), when known.
    pub op: Option<&'a str>,
    /// The error class name as stored (`fatal`, `source-gone`, ...).
    pub class: Option<&'a str>,
    /// The S3 error code.
    pub code: Option<&'a str>,
    /// The HTTP status.
    pub status: Option<u16>,
    /// The message.
    pub message: &'a str,
}

impl<'a> FailureFacts<'a> {
    /// Facts from what the manifest records of a task's last error: side and operation as
    /// recorded from the S3 error's fields, with its class, code, status and message. A row
    /// without them (recorded before the manifest kept them: `side` None) falls back to
    /// [`FailureFacts::from_stored`], which reads them from the message.
    pub fn recorded(
        side: Option<Side>,
        op: Option<&'a str>,
        class: Option<&'a str>,
        code: Option<&'a str>,
        status: Option<u16>,
        message: &'a str,
    ) -> FailureFacts<'a> {
        match side {
            Some(side) => FailureFacts {
                side: Some(side),
                op,
                class,
                code,
                status,
                message,
            },
            None => FailureFacts::from_stored(class, code, status, message),
        }
    }

    /// Facts from a row recorded without side and operation (schema v2 and older): class,
    /// code, status and the last error's text, whose start (`source: GetObject failed ...`,
    /// as `S3Error` prints) gives side and op.
    pub fn from_stored(
        class: Option<&'a str>,
        code: Option<&'a str>,
        status: Option<u16>,
        message: &'a str,
    ) -> FailureFacts<'a> {
        let (side, op) = side_and_op(message);
        FailureFacts {
            side,
            op,
            class,
            code,
            status,
            message,
        }
    }
}

/// Side and operation from an `S3Error` message (`dest: PutObject failed ...`).
pub fn side_and_op(message: &str) -> (Option<Side>, Option<&str>) {
    let (side, rest) = match message.split_once(": ") {
        Some(("source", rest)) => (Some(Side::Source), rest),
        Some(("dest", rest)) => (Some(Side::Dest), rest),
        _ => return (None, None),
    };
    let op = rest
        .split_once(" failed")
        .map(|(op, _)| op)
        .filter(|op| !op.is_empty() && op.chars().all(|c| c.is_ascii_alphanumeric()));
    (side, op)
}

const SOURCE_OPS: &[&str] = &[
    "GetObject",
    "GetObjectTagging",
    "GetObjectRetention",
    "GetObjectLegalHold",
    "GetObjectAcl",
];
const DEST_OPS: &[&str] = &[
    "PutObject",
    "CreateMultipartUpload",
    "UploadPart",
    "CompleteMultipartUpload",
    "AbortMultipartUpload",
    "PutObjectTagging",
    "PutObjectRetention",
    "PutObjectLegalHold",
    "DeleteObject",
];
/// Server-side copies: one request reads the source and writes the destination, so an
/// access or bucket error cannot be put on one side.
const COPY_OPS: &[&str] = &["CopyObject", "UploadPartCopy"];

/// S3 replication's failure reason for a failure, where one fits; see [`error_code`].
pub fn replication_failure_reason(f: &FailureFacts<'_>) -> Option<&'static str> {
    let op = f.op.unwrap_or("");
    let code = f.code.unwrap_or("");
    let is_copy = COPY_OPS.contains(&op);
    let side = if is_copy {
        None
    } else if SOURCE_OPS.contains(&op) {
        Some(Side::Source)
    } else if DEST_OPS.contains(&op) {
        Some(Side::Dest)
    } else {
        f.side
    };
    let source_gone = f.class == Some(ErrorClass::SourceGone.as_str());
    // A copy names the source object; only the source can be missing a key or version.
    if code == "NoSuchKey" && (is_copy || side == Some(Side::Source)) {
        return Some("SrcKeyNotFound");
    }
    if code == "NoSuchVersion" || (source_gone && code != "NoSuchKey") {
        return Some("SrcVersionNotFound");
    }
    if code == "NoSuchBucket" {
        return (side == Some(Side::Dest)).then_some("DstBucketNotFound");
    }
    let denied = matches!(code, "AccessDenied" | "AllAccessDisabled")
        || (code.is_empty() && f.status == Some(403));
    if denied {
        return denied_reason(op, side);
    }
    kms_or_lock_reason(code, side, f.message)
}

fn denied_reason(op: &str, side: Option<Side>) -> Option<&'static str> {
    Some(match (op, side?) {
        ("GetObject", Side::Source) => "SrcGetObjectNotPermitted",
        ("HeadObject", Side::Source) => "SrcHeadObjectNotPermitted",
        ("GetObjectTagging", Side::Source) => "SrcGetTaggingNotPermitted",
        ("GetObjectRetention", Side::Source) => "SrcGetRetentionNotPermitted",
        ("GetObjectLegalHold", Side::Source) => "SrcGetLegalHoldNotPermitted",
        ("PutObject", Side::Dest) => "DstPutObjectNotPermitted",
        ("CreateMultipartUpload", Side::Dest) => "DstMultipartInitNotPermitted",
        ("UploadPart", Side::Dest) => "DstMultipartPartUploadNotPermitted",
        ("CompleteMultipartUpload", Side::Dest) => "DstMultipartCompleteNotPermitted",
        ("PutObjectTagging", Side::Dest) => "DstPutTaggingNotPermitted",
        ("PutObjectRetention", Side::Dest) => "DstPutRetentionNotPermitted",
        ("PutObjectLegalHold", Side::Dest) => "DstPutLegalHoldNotPermitted",
        ("DeleteObject", Side::Dest) => "DstDelObjNotPermitted",
        _ => return None,
    })
}

fn kms_or_lock_reason(code: &str, side: Option<Side>, message: &str) -> Option<&'static str> {
    let side = side?;
    match (code, side) {
        ("KMS.NotFoundException", Side::Dest) => Some("DstKmsKeyNotFound"),
        ("KMS.DisabledException" | "KMS.KMSInvalidStateException", Side::Dest) => {
            Some("DstKmsKeyInvalidState")
        }
        ("KMS.DisabledException" | "KMS.KMSInvalidStateException", Side::Source) => {
            Some("SrcKmsKeyInvalidState")
        }
        ("InvalidRequest", Side::Dest)
            if message
                .to_ascii_lowercase()
                .contains("object lock configuration") =>
        {
            Some("DstBucketObjectLockConfigMissing")
        }
        _ => None,
    }
}

/// The report's error code: S3 replication's failure reason where one fits, else the S3
/// error code, else the error class (`retryable`, ...), else `InternalError`.
pub fn error_code(f: &FailureFacts<'_>) -> String {
    if let Some(reason) = replication_failure_reason(f) {
        return reason.to_string();
    }
    f.code
        .filter(|c| !c.is_empty())
        .or(f.class)
        .unwrap_or("InternalError")
        .to_string()
}

#[cfg(test)]
mod tests;
