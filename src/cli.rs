//! cli: the command-line arguments, validated into settings next to the flags that give
//! them (a bad value is one line and exit 2, before anything runs).
//!
//! May call: config (the settings it builds) and the s3 layer's option types.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{
    ChecksumCalculation, ConfigError, CopyMode, CopyOptions, JobSettings, Location, Selection,
    SideConfig, Sse,
};
use crate::copier::{FailureThreshold, RunOptions};
use crate::s3::{RetryPolicy, Timeouts};

/// Batch replication and backfill of every S3 object version, resumable from a SQLite manifest.
#[derive(Debug, Parser)]
#[command(name = "s3-backfill", version, about, long_about = None)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List every version of the source into a new (or unfinished) manifest.
    Plan(PlanArgs),
    /// Copy the manifest's open tasks to the destination.
    Run(RunArgs),
    /// Plan, then run.
    Replicate(ReplicateArgs),
    /// Show the manifest's counts and progress.
    Status(StatusArgs),
    /// Print a completion report: the summary and every failed or skipped task.
    Report(ReportArgs),
    /// Compare the destination with the source, version by version.
    Verify(VerifyArgs),
}

/// How each side is reached.
#[derive(Debug, Args, Clone, Default)]
pub struct SideArgs {
    /// Custom endpoint URL of the source (S3-compatible stores).
    #[arg(long, value_name = "URL")]
    pub source_endpoint: Option<String>,
    /// Custom endpoint URL of the destination.
    #[arg(long, value_name = "URL")]
    pub dest_endpoint: Option<String>,
    /// Region of the source.
    #[arg(long, value_name = "REGION")]
    pub source_region: Option<String>,
    /// Region of the destination.
    #[arg(long, value_name = "REGION")]
    pub dest_region: Option<String>,
    /// AWS config profile for the source.
    #[arg(long, value_name = "NAME")]
    pub source_profile: Option<String>,
    /// AWS config profile for the destination.
    #[arg(long, value_name = "NAME")]
    pub dest_profile: Option<String>,
    /// Path-style addressing on both sides (needed by most custom endpoints).
    #[arg(long)]
    pub path_style: bool,
    /// When the SDK computes request checksums on the source side.
    #[arg(long, value_enum, value_name = "WHEN")]
    pub source_checksum_calculation: Option<ChecksumCalculation>,
    /// When the SDK computes request checksums on the destination side (`when-required` for
    /// servers that reject aws-chunked uploads with trailing checksums).
    #[arg(long, value_enum, value_name = "WHEN")]
    pub dest_checksum_calculation: Option<ChecksumCalculation>,
}

/// Which versions to replicate.
#[derive(Debug, Args, Clone, Default)]
pub struct SelectionArgs {
    /// Only keys under this prefix (keys keep their names).
    #[arg(long, value_name = "PREFIX")]
    pub prefix: Option<String>,
    /// Replicate delete markers too (off by default, as in S3 replication rules).
    #[arg(long)]
    pub delete_markers: bool,
    /// Only each key's current version (a current delete marker means nothing to copy).
    #[arg(long)]
    pub latest_only: bool,
}

/// How versions are copied (stored in the job).
#[derive(Debug, Args, Clone)]
pub struct CopyArgs {
    /// server-side (CopyObject/UploadPartCopy), stream (GET then upload), or auto (server-side
    /// when both sides share an endpoint and profile).
    #[arg(long, value_enum, default_value = "auto")]
    pub copy_mode: CopyMode,
    /// Objects of this size or more are copied in parts (always above 5 GiB).
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub multipart_threshold: u64,
    /// Part size when the source's own layout cannot be kept (5MiB..5GiB).
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub part_size: u64,
    /// Storage class at the destination (default: the source version's).
    #[arg(long, value_name = "CLASS")]
    pub storage_class: Option<String>,
    /// Server-side encryption at the destination.
    #[arg(long, value_enum, value_name = "ALG")]
    pub sse: Option<Sse>,
    /// KMS key id for --sse aws:kms.
    #[arg(long, value_name = "KEY")]
    pub sse_kms_key_id: Option<String>,
    /// Canned ACL at the destination (e.g. bucket-owner-full-control across accounts).
    #[arg(long, value_name = "ACL")]
    pub acl: Option<String>,
    /// Do not stamp destination versions with their source version id (user metadata
    /// `s3-backfill-source-version`): metadata stays byte-identical, and reconciliation after a
    /// crash matches by size, ETag and time instead of exactly (see the README).
    #[arg(long)]
    pub no_stamp: bool,
}

impl CopyArgs {
    /// The copy options these flags give, checked against S3's limits.
    pub fn options(&self) -> Result<CopyOptions, ConfigError> {
        let o = CopyOptions {
            mode: self.copy_mode,
            multipart_threshold: self.multipart_threshold,
            part_size: self.part_size,
            storage_class: self.storage_class.clone(),
            sse: self.sse,
            sse_kms_key_id: self.sse_kms_key_id.clone(),
            acl: self.acl.clone(),
            stamp: !self.no_stamp,
        };
        o.validate()?;
        Ok(o)
    }
}

/// Arguments of `plan`.
#[derive(Debug, Args, Clone)]
pub struct PlanArgs {
    /// The source: s3://BUCKET.
    #[arg(long, value_name = "S3URL")]
    pub source: String,
    /// The destination: s3://BUCKET[/PREFIX].
    #[arg(long, value_name = "S3URL")]
    pub dest: String,
    /// The manifest file (created if missing).
    #[arg(long, value_name = "FILE")]
    pub manifest: PathBuf,
    /// How each side is reached.
    #[command(flatten)]
    pub sides: SideArgs,
    /// Which versions.
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// How they are copied.
    #[command(flatten)]
    pub copy: CopyArgs,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

impl SideArgs {
    /// The settings of one side.
    pub fn side(&self, source: bool) -> SideConfig {
        let pick =
            |s: &Option<String>, d: &Option<String>| if source { s.clone() } else { d.clone() };
        SideConfig {
            endpoint: pick(&self.source_endpoint, &self.dest_endpoint),
            region: pick(&self.source_region, &self.dest_region),
            profile: pick(&self.source_profile, &self.dest_profile),
            path_style: self.path_style,
            checksum_calculation: if source {
                self.source_checksum_calculation
            } else {
                self.dest_checksum_calculation
            }
            .unwrap_or_default(),
        }
    }
}

impl PlanArgs {
    /// The job settings these arguments describe.
    pub fn settings(&self) -> Result<JobSettings, ConfigError> {
        let source = Location::parse(&self.source)?;
        if !source.prefix.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "--source takes a bucket only ({}); select keys with --prefix",
                self.source
            )));
        }
        Ok(JobSettings {
            source,
            dest: Location::parse(&self.dest)?,
            source_side: self.sides.side(true),
            dest_side: self.sides.side(false),
            selection: Selection {
                prefix: self.selection.prefix.clone().unwrap_or_default(),
                delete_markers: self.selection.delete_markers,
                latest_only: self.selection.latest_only,
            },
            copy: self.copy.options()?,
        })
    }
}

/// Knobs of the copy stage (not stored: each run chooses).
#[derive(Debug, Args, Clone)]
pub struct ExecArgs {
    /// Requests in flight at most (also keys in progress at most).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: u32,
    /// Parts of one multipart object in flight at most.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub part_concurrency: u32,
    /// Attempts per request, the first included.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,
    /// First retry delay in milliseconds (doubles each retry, with jitter).
    #[arg(long, default_value_t = 100)]
    pub retry_min_delay_ms: u64,
    /// Longest retry delay in milliseconds.
    #[arg(long, default_value_t = 20_000)]
    pub retry_max_delay_ms: u64,
    /// Requests per second at most, for the whole job.
    #[arg(long, value_name = "N")]
    pub max_rps: Option<f64>,
    /// Stop early when more than this percentage of the finished tasks failed...
    #[arg(long, default_value_t = 50.0, value_name = "PERCENT")]
    pub failure_threshold_percent: f64,
    /// ...once at least this many tasks finished in this run.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub failure_threshold_min_tasks: u64,
    /// Seconds that requests in flight may take to finish after Ctrl-C or SIGTERM.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub grace_period: u64,
    /// Seconds one request attempt may take, answer and body included (then it is retried).
    #[arg(long, default_value_t = 120, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub request_timeout: u64,
    /// Memory for streaming at most, whatever the part size and concurrency: 48MiB are kept
    /// for the program, the rest bounds the bytes held between GET and upload (parts are
    /// made smaller to fit). At least 56MiB.
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = parse_memory)]
    pub max_memory: u64,
}

/// A `--max-memory` size: the program's reserve and one smallest part (5 MiB) at least.
fn parse_memory(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if n < 56 * 1024 * 1024 {
        return Err(format!(
            "--max-memory {s} is below 56MiB (48MiB for the program, 5MiB for the smallest part S3 accepts)"
        ));
    }
    Ok(n)
}

impl ExecArgs {
    /// The run options these knobs give.
    pub fn run_options(&self) -> RunOptions {
        RunOptions {
            concurrency: self.concurrency as usize,
            part_concurrency: self.part_concurrency as usize,
            policy: RetryPolicy {
                max_attempts: self.max_attempts as usize,
                min_delay: Duration::from_millis(self.retry_min_delay_ms),
                max_delay: Duration::from_millis(
                    self.retry_max_delay_ms.max(self.retry_min_delay_ms),
                ),
            },
            max_rps: self.max_rps,
            max_memory: self.max_memory,
            failure_threshold: FailureThreshold {
                min_tasks: self.failure_threshold_min_tasks,
                percent: self.failure_threshold_percent,
            },
        }
    }

    /// Per-attempt time limits.
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            attempt: Duration::from_secs(self.request_timeout),
            ..Timeouts::default()
        }
    }
}

/// Arguments of `run`.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// The manifest written by `plan`.
    #[arg(long, value_name = "FILE")]
    pub manifest: PathBuf,
    /// Put failed tasks back in the queue first (each is checked against the destination
    /// before it is written again).
    #[arg(long, conflicts_with = "skip_failed")]
    pub retry_failed: bool,
    /// Give up on failed tasks: record them as skipped (with their last error), so their
    /// keys' later versions are copied.
    #[arg(long)]
    pub skip_failed: bool,
    /// Reach the source through another endpoint than the one planned (e.g. a proxy).
    #[arg(long, value_name = "URL")]
    pub source_endpoint: Option<String>,
    /// Reach the destination through another endpoint than the one planned.
    #[arg(long, value_name = "URL")]
    pub dest_endpoint: Option<String>,
    /// Use another profile for the source than the one planned.
    #[arg(long, value_name = "NAME")]
    pub source_profile: Option<String>,
    /// Use another profile for the destination than the one planned.
    #[arg(long, value_name = "NAME")]
    pub dest_profile: Option<String>,
    /// Copy-stage knobs.
    #[command(flatten)]
    pub exec: ExecArgs,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

/// Arguments of `replicate`: those of `plan`, then the copy-stage knobs.
#[derive(Debug, Args, Clone)]
pub struct ReplicateArgs {
    /// What `plan` takes.
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Put failed tasks back in the queue first.
    #[arg(long)]
    pub retry_failed: bool,
    /// Copy-stage knobs.
    #[command(flatten)]
    pub exec: ExecArgs,
}

impl ReplicateArgs {
    /// The `run` half.
    pub fn run(&self) -> RunArgs {
        RunArgs {
            manifest: self.plan.manifest.clone(),
            retry_failed: self.retry_failed,
            skip_failed: false,
            source_endpoint: None,
            dest_endpoint: None,
            source_profile: None,
            dest_profile: None,
            exec: self.exec.clone(),
            no_progress: self.plan.no_progress,
        }
    }
}

/// Arguments of `status`.
#[derive(Debug, Args, Clone)]
pub struct StatusArgs {
    /// The manifest.
    #[arg(long, value_name = "FILE")]
    pub manifest: PathBuf,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `report`.
#[derive(Debug, Args, Clone)]
pub struct ReportArgs {
    /// The manifest.
    #[arg(long, value_name = "FILE")]
    pub manifest: PathBuf,
    /// csv (one line per failed, skipped or blocked task, after a header) or json.
    #[arg(long, value_enum, default_value = "csv")]
    pub format: ReportFormat,
    /// Write to this file instead of standard output.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// The formats of `report`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    /// A header, then one line per failed, skipped or blocked task.
    Csv,
    /// One JSON object: the job, the counts, the problems.
    Json,
}

/// Arguments of `verify`.
#[derive(Debug, Args, Clone)]
pub struct VerifyArgs {
    /// The manifest (its job says what to compare).
    #[arg(long, value_name = "FILE")]
    pub manifest: PathBuf,
    /// Reach the source through another endpoint than the one planned.
    #[arg(long, value_name = "URL")]
    pub source_endpoint: Option<String>,
    /// Reach the destination through another endpoint than the one planned.
    #[arg(long, value_name = "URL")]
    pub dest_endpoint: Option<String>,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// No progress display.
    #[arg(long)]
    pub no_progress: bool,
}

/// Parses a byte size: `5242880`, `5MiB`, `5M`, `1GiB`, `64KiB`.
///
/// ```
/// use s3_backfill::cli::parse_size;
/// assert_eq!(parse_size("16MiB"), Ok(16 * 1024 * 1024));
/// assert!(parse_size("16 apples").is_err());
/// ```
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 16MiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("{s:?}: unknown unit (use KiB, MiB, GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5MiB"), Ok(5 << 20));
        assert_eq!(parse_size("5m"), Ok(5 << 20));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("x").is_err());
        assert!(parse_size("5XB").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
