//! cli: the command-line arguments, validated into settings next to the flags that give
//! them (a bad value is one line and exit 2, before anything runs).
//!
//! May call: config (the settings it builds), `select` (a replication configuration made the
//! job's), and the option types of what it configures: `copier`, `lister` (the page size),
//! `estimate`, `events`, `filters`, `rules` and the s3 layer.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{
    ChecksumCalculation, ConfigError, CopyMode, CopyOptions, JobSettings, LargeCopy, Location,
    Selection, SideConfig, Sse,
};
use crate::copier::{FailureThreshold, Limits, RestoreAsk, RunOptions};
pub use crate::events::LogFormat;
use crate::filters::{self, Filters};
use crate::pricing::{Prices, Server};
use crate::rules::ReplicationConfig;
use crate::s3::bandwidth::{self, Bandwidth, Schedule};
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
// One value per process, parsed once at start: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List every version of the source into a new (or unfinished) manifest.
    Plan(PlanArgs),
    /// Copy the manifest's open tasks, finishing a listing that `plan` left unfinished.
    Run(RunArgs),
    /// Plan and run at once: copies each key as soon as its whole history is listed.
    Replicate(ReplicateArgs),
    /// Show the manifest's counts and progress.
    Status(StatusArgs),
    /// Print a completion report: the summary and every failed or skipped task.
    Report(ReportArgs),
    /// Compare the destination with the source, version by version.
    Verify(VerifyArgs),
    /// Keep the destination in step with the source after (or during) the backfill, until
    /// SIGINT/SIGTERM: changed keys from events or polling, a reconcile now and then.
    Follow(FollowArgs),
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
    pub source_checksum_calculation: Option<ChecksumArg>,
    /// When the SDK computes request checksums on the destination side (`when-required` for
    /// servers that reject aws-chunked uploads with trailing checksums).
    #[arg(long, value_enum, value_name = "WHEN")]
    pub dest_checksum_calculation: Option<ChecksumArg>,
}

/// The values of `--source-checksum-calculation` and `--dest-checksum-calculation`: the
/// s3 layer's [`ChecksumCalculation`] as the flags name it (the layer does not know clap).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ChecksumArg {
    /// The SDK default: compute a checksum whenever the operation supports one.
    WhenSupported,
    /// Only when the operation requires one.
    WhenRequired,
}

impl From<ChecksumArg> for ChecksumCalculation {
    fn from(a: ChecksumArg) -> Self {
        match a {
            ChecksumArg::WhenSupported => ChecksumCalculation::WhenSupported,
            ChecksumArg::WhenRequired => ChecksumCalculation::WhenRequired,
        }
    }
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
    /// Server-side copies of multipart sources: parts (UploadPartCopy in the source's own
    /// layout: its ETag is kept everywhere), copy-object (one CopyObject up to 5 GiB), or auto
    /// (parts on AWS; elsewhere one CopyObject while the server keeps multipart ETags, checked
    /// on the first). Single-part sources up to 5 GiB are always one CopyObject.
    #[arg(long, value_enum, default_value = "auto")]
    pub large_copy: LargeCopy,
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
            large_copy: self.large_copy,
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
    /// The destination: s3://BUCKET[/PREFIX] (not given with --replication-config).
    #[arg(
        long,
        value_name = "S3URL",
        required_unless_present = "replication_config"
    )]
    pub dest: Option<String>,
    /// Destinations from a replication configuration: the JSON given to `aws s3api
    /// put-bucket-replication` (or the XML GetBucketReplication returns), or `source` to read
    /// the source bucket's own (GetBucketReplication). Each version goes to every destination
    /// bucket whose matching rule of highest priority selects it, with that rule's storage
    /// class, owner override and KMS key; one --dest-endpoint/--dest-profile serves them all.
    /// Costs: tag rules read each version's tags (one GetObjectTagging per version whose key a
    /// tag rule covers); SSE-KMS objects that a rule leaves out are skipped by `run` after
    /// its HEAD of the source (no extra request).
    #[arg(long, value_name = "FILE|source", conflicts_with_all = ["dest", "delete_markers"])]
    pub replication_config: Option<String>,
    /// Batch Replication filters.
    #[command(flatten)]
    pub filters: FilterArgs,
    /// Print what would be copied (tasks and bytes by destination, storage class and rule)
    /// and write no manifest.
    #[arg(long)]
    pub dry_run: bool,
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
    /// Listings in flight at once: the keys are split into this many disjoint parts (by
    /// their first characters, found with a few one-entry listings), each listed and
    /// checkpointed on its own. Chosen when the listing starts; a resumed plan keeps its parts.
    #[arg(long, default_value_t = DEFAULT_LIST_CONCURRENCY, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub list_concurrency: u32,
    /// Entries per listing page (1..=1000): for tests, and servers that page less.
    #[arg(long, hide = true, default_value_t = crate::lister::PAGE_SIZE, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=i64::from(crate::lister::PAGE_SIZE)))]
    pub list_page_size: i32,
    /// Catch up a job whose listing is complete: list the source again and add the versions
    /// and delete markers that appeared since (versions that vanished are counted, not copied).
    #[arg(long)]
    pub refresh: bool,
    /// Change the copy settings (`--copy-mode`, thresholds, `--part-size`, `--storage-class`,
    /// `--sse`, `--acl`, `--no-stamp`) of a job that has copied, or started copying, with
    /// other ones (without it, such a change is refused and each change is printed).
    #[arg(long)]
    pub change_copy_settings: bool,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Logs and progress lines.
    #[command(flatten)]
    pub log: LogArgs,
    /// What the estimate of the job's cost assumes (stored with the job).
    #[command(flatten)]
    pub estimate: EstimateArgs,
    /// Plan from an S3 Batch Operations CSV manifest instead of listing: no header,
    /// `Bucket,Key[,VersionId]`, keys URL-encoded, every row with a version id or none (none:
    /// the key's current version); a local file or s3://BUCKET/KEY (read with the source's
    /// credentials). Costs one ListObjectVersions per distinct key (each row's size, ETag,
    /// time and place in its key's history). The results CSV of `report --format aws` reads
    /// as such a manifest.
    #[arg(long, value_name = "FILE|S3URL", conflicts_with = "from_inventory")]
    pub from_csv: Option<String>,
    /// Plan from an S3 Inventory report of all versions instead of listing: its manifest.json
    /// (local, or s3://BUCKET/.../manifest.json, read with the source's credentials; the
    /// data files, CSV.gz or Parquet, are checked against their MD5s). No request to the
    /// source bucket.
    #[arg(long, value_name = "MANIFEST_JSON")]
    pub from_inventory: Option<String>,
}

impl PlanArgs {
    /// The supplied manifest to plan from, if any.
    pub fn supplied(&self) -> Option<crate::config::Supplied> {
        use crate::config::Supplied;
        (self.from_csv.clone().map(Supplied::Csv))
            .or_else(|| self.from_inventory.clone().map(Supplied::Inventory))
    }
}

/// What the cost estimate assumes (`plan`, where it is stored with the job, and `status`).
#[derive(Debug, Args, Clone, Default)]
pub struct EstimateArgs {
    /// A price table (JSON; see the README's "What a job will cost") instead of the built-in
    /// one (S3 Standard, us-east-1); `plan` stores it with the job, and `run --max-cost`
    /// uses it.
    #[arg(long, value_name = "FILE", value_parser = parse_prices)]
    pub prices: Option<Prices>,
    /// How the servers answer where they differ: `s3` (AWS S3, moto) or `ceph-rgw`.
    /// Default: the one `plan` found (Ceph RGW says so in its HeadBucket answer), else s3.
    #[arg(long, value_enum, value_name = "SERVER")]
    pub server: Option<Server>,
    /// The request latency the time estimate assumes (e.g. 25ms); default: the mean of the
    /// plan's listing requests, as measured.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub latency: Option<Duration>,
    /// The requests in flight the time estimate assumes (run's `--concurrency`).
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub estimate_concurrency: u32,
}

/// A `--prices` file, read and checked.
fn parse_prices(s: &str) -> Result<Prices, String> {
    Prices::from_file(s)
}

/// A `--max-cost` in US dollars: more than 0.
fn parse_cost(s: &str) -> Result<f64, String> {
    let t = s.trim().trim_start_matches('$');
    match t.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!(
            "{s:?} is not an amount of US dollars above 0 (e.g. 25 or 0.50)"
        )),
    }
}

/// Listings in flight at once by default (`--list-concurrency`), chosen by measurement.
pub const DEFAULT_LIST_CONCURRENCY: u32 = 4;

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
            .map_or_else(ChecksumCalculation::default, Into::into),
        }
    }
}

/// S3 Batch Replication's manifest filters (stored in the job). Several values of one filter
/// select any of them; different filters must all hold.
#[derive(Debug, Args, Clone, Default)]
pub struct FilterArgs {
    /// Only versions created after this date or RFC 3339 date-time (2024-05-01, 2024-05-01T12:00:00Z).
    #[arg(long, value_name = "DATE")]
    pub created_after: Option<String>,
    /// Only versions created before this date or date-time.
    #[arg(long, value_name = "DATE")]
    pub created_before: Option<String>,
    /// Only versions larger than SIZE (strictly, as S3).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub min_size: Option<u64>,
    /// Only versions smaller than SIZE (strictly, as S3).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_size: Option<u64>,
    /// Only versions in one of these storage classes (S3's filter `--storage-class`; named so
    /// here because --storage-class sets the destination's).
    #[arg(long, value_name = "CLASS", value_delimiter = ',')]
    pub source_storage_class: Vec<String>,
    /// Only keys starting with one of these (repeatable).
    #[arg(long, value_name = "PREFIX")]
    pub key_prefix: Vec<String>,
    /// Only keys ending with one of these (repeatable).
    #[arg(long, value_name = "SUFFIX")]
    pub key_suffix: Vec<String>,
    /// Only keys containing one of these (repeatable).
    #[arg(long, value_name = "TEXT")]
    pub key_substring: Vec<String>,
    /// Only versions with one of these encryptions: SSE-S3, SSE-KMS, DSSE-KMS, SSE-C, NOT-SSE.
    /// Needs one HEAD of the source per version at plan.
    #[arg(long, value_name = "ENC", value_delimiter = ',')]
    pub encryption: Vec<String>,
    /// Only versions with one of these replication statuses: NONE, FAILED, COMPLETED, REPLICA.
    /// S3's x-amz-replication-status where the source HEAD shows it; otherwise COMPLETED when
    /// the destination's current version of the key is s3-backfill's stamped copy of this
    /// version (user metadata s3-backfill-source-version), else NONE. Needs one HEAD of the
    /// source per version at plan (and of the destination when S3 sets no status).
    #[arg(long, value_name = "STATUS", value_delimiter = ',')]
    pub replication_status: Vec<String>,
}

impl FilterArgs {
    /// The filters these flags give, checked.
    pub fn filters(&self) -> Result<Filters, ConfigError> {
        let bad = |e: filters::FilterError| ConfigError::Invalid(e.to_string());
        let instant = |flag, v: &Option<String>| {
            v.as_deref()
                .map(|v| filters::parse_instant(flag, v))
                .transpose()
        };
        let f = Filters {
            created_after: instant("--created-after", &self.created_after).map_err(bad)?,
            created_before: instant("--created-before", &self.created_before).map_err(bad)?,
            min_size: self.min_size,
            max_size: self.max_size,
            storage_classes: self
                .source_storage_class
                .iter()
                .map(|v| filters::parse_storage_class(v))
                .collect::<Result<_, _>>()
                .map_err(bad)?,
            key_prefixes: self.key_prefix.clone(),
            key_suffixes: self.key_suffix.clone(),
            key_substrings: self.key_substring.clone(),
            encryption: self
                .encryption
                .iter()
                .map(|v| filters::parse_encryption(v))
                .collect::<Result<_, _>>()
                .map_err(bad)?,
            replication_status: self
                .replication_status
                .iter()
                .map(|v| filters::parse_replication_status(v))
                .collect::<Result<_, _>>()
                .map_err(bad)?,
        };
        f.validate().map_err(bad)?;
        Ok(f)
    }
}

/// Reads a replication configuration file: JSON, or XML when it starts with `<`.
pub fn read_replication_config(path: &str) -> Result<ReplicationConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Invalid(format!("--replication-config {path}: {e}")))?;
    let cfg = if text.trim_start().starts_with('<') {
        ReplicationConfig::from_xml(text.as_bytes())
    } else {
        ReplicationConfig::from_json(&text)
    };
    cfg.map_err(|e| ConfigError::Invalid(format!("{path}: {e}")))
}

impl PlanArgs {
    /// The job settings these arguments describe (`--replication-config source` is read
    /// later, from the source bucket).
    pub fn settings(&self) -> Result<JobSettings, ConfigError> {
        let source = Location::parse(&self.source)?;
        if !source.prefix.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "--source takes a bucket only ({}); select keys with --prefix",
                self.source
            )));
        }
        let dest = match &self.dest {
            Some(d) => Location::parse(d)?,
            // Filled from the replication configuration.
            None => Location {
                bucket: String::new(),
                prefix: String::new(),
            },
        };
        let mut settings = JobSettings {
            source,
            dest,
            source_side: self.sides.side(true),
            dest_side: self.sides.side(false),
            selection: Selection {
                prefix: self.selection.prefix.clone().unwrap_or_default(),
                delete_markers: self.selection.delete_markers,
                latest_only: self.selection.latest_only,
            },
            copy: self.copy.options()?,
            filters: self.filters.filters()?,
            replication: None,
            destinations: Vec::new(),
            supplied: self.supplied(),
        };
        match self.replication_config.as_deref() {
            None | Some("source") => {}
            Some(path) => {
                let cfg = read_replication_config(path)?;
                crate::select::use_replication_config(&mut settings, cfg, path)?;
            }
        }
        Ok(settings)
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
    /// Restore archived source versions (GLACIER, DEEP_ARCHIVE) for this many days: a
    /// `RestoreObject` each; the run does not wait, a later run copies them once restored
    /// (their keys' later versions wait until then).
    #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub restore_archived: Option<u32>,
    /// The retrieval tier of `--restore-archived`.
    #[arg(long, value_enum, default_value_t = RestoreTier::Standard, requires = "restore_archived")]
    pub restore_tier: RestoreTier,
    /// Stop once this run has made N requests (both sides, every operation): no task starts,
    /// those in flight finish, exit 4; the next run continues.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_requests: Option<u64>,
    /// Stop once this run has copied SIZE of object versions (e.g. 500GiB), as
    /// `--max-requests` does.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_bytes: Option<u64>,
    /// Stop once this run has lasted DURATION (e.g. 90s, 45m, 8h, 2d), as `--max-requests`
    /// does.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub max_duration: Option<Duration>,
    /// Streamed bytes per second at most, each direction as this machine's link sees them:
    /// GET bodies from the source (down), PUT and UploadPart bodies to the destination (up);
    /// server-side copies move no bytes here and are not limited. As rclone's --bwlimit:
    /// `20M` (MiB/s), `512k` (KiB/s), `1.5G`, `100B`; a bare number is KiB/s; binary units;
    /// `UP:DOWN` for two limits (`10M:off`); `off` or `0` for none.
    #[arg(long, value_name = "RATE", value_parser = parse_bandwidth, conflicts_with = "bandwidth_schedule")]
    pub max_bandwidth: Option<Schedule>,
    /// --max-bandwidth by local time of day, as rclone's --bwlimit timetable: entries
    /// `HH:MM,RATE` separated by spaces or semicolons, e.g. "08:00,10M 18:00,off"; the entry
    /// in force is the last one at or before now (before the first: the day's last one).
    /// The limit changes while the run goes on.
    #[arg(long, value_name = "TIMETABLE", value_parser = parse_bandwidth_schedule)]
    pub bandwidth_schedule: Option<Schedule>,
    /// Stop once this run's requests (and bytes streamed across providers) cost USD by the
    /// job's price table (`--prices`, else the built-in S3 Standard us-east-1 one), as
    /// `--max-requests` does.
    #[arg(long, value_name = "USD", value_parser = parse_cost)]
    pub max_cost: Option<f64>,
    /// Serve OpenMetrics text at http://ADDR:PORT/metrics while the command runs (e.g.
    /// 127.0.0.1:9100; port 0 picks a free one, said at the start): tasks and bytes by
    /// state, the listing, latency, requests by operation and outcome, retries, throttling.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_metrics_addr)]
    pub metrics: Option<std::net::SocketAddr>,
}

/// A `--metrics` address: `IP:PORT` (or `localhost:PORT`), checked free by binding it once
/// (a port in use is refused here, before any work; the command binds it again to serve).
fn parse_metrics_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let addr = match s.parse() {
        Ok(a) => a,
        Err(_) => s
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                format!("{s:?} is not an ADDR:PORT to listen on (e.g. 127.0.0.1:9100)")
            })?,
    };
    std::net::TcpListener::bind(addr)
        .map(|_| addr)
        .map_err(|e| format!("cannot listen on {addr}: {e}"))
}

/// A `--max-bandwidth` rate (see [`crate::s3::bandwidth::parse_rate`]), as a timetable of
/// one entry.
fn parse_bandwidth(s: &str) -> Result<Schedule, String> {
    bandwidth::parse_rate(s).map(Schedule::constant)
}

/// A `--bandwidth-schedule` timetable (see [`Schedule::parse`]).
fn parse_bandwidth_schedule(s: &str) -> Result<Schedule, String> {
    Schedule::parse(s)
}

/// A duration: a number with a unit, `ms`, `s`, `m`, `h` or `d` (`90s`, `45m`, `8h`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (a number and a unit: 90s, 45m, 8h, 2d)"))?;
    let ms = match unit.trim() {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "{s:?} has no known unit (ms, s, m, h or d: 90s, 45m, 8h, 2d)"
            ))
        }
    };
    n.checked_mul(ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// A retrieval tier of `RestoreObject`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RestoreTier {
    /// Cheapest, slowest.
    #[value(name = "Bulk", alias = "bulk")]
    Bulk,
    /// The default.
    #[value(name = "Standard", alias = "standard")]
    Standard,
    /// Fastest (GLACIER only).
    #[value(name = "Expedited", alias = "expedited")]
    Expedited,
}

impl RestoreTier {
    /// The tier's name in S3's API.
    pub fn as_str(self) -> &'static str {
        match self {
            RestoreTier::Bulk => "Bulk",
            RestoreTier::Standard => "Standard",
            RestoreTier::Expedited => "Expedited",
        }
    }
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
            restore: self.restore_archived.map(|days| RestoreAsk {
                days,
                tier: self.restore_tier.as_str().to_string(),
            }),
            limits: Limits {
                max_requests: self.max_requests,
                max_bytes: self.max_bytes,
                max_duration: self.max_duration,
                max_cost: None,
            },
        }
    }

    /// The run's bandwidth limiter, shared by its clients: None when nothing is limited.
    pub fn bandwidth(&self) -> Option<std::sync::Arc<Bandwidth>> {
        let schedule = self
            .bandwidth_schedule
            .as_ref()
            .or(self.max_bandwidth.as_ref())?
            .clone();
        (!schedule.is_off()).then(|| std::sync::Arc::new(Bandwidth::new(schedule)))
    }

    /// Per-attempt time limits.
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            attempt: Duration::from_secs(self.request_timeout),
            ..Timeouts::default()
        }
    }
}

/// How `run` and `verify` reach a side otherwise than the job planned (e.g. through a
/// proxy); the stored settings are not changed.
#[derive(Debug, Args, Clone, Default)]
pub struct SideOverrides {
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
}

impl SideOverrides {
    /// The job's stored settings with these endpoints and profiles in place of theirs.
    pub fn apply(&self, settings: &mut JobSettings) {
        let set = |slot: &mut Option<String>, v: &Option<String>| {
            if v.is_some() {
                slot.clone_from(v);
            }
        };
        set(&mut settings.source_side.endpoint, &self.source_endpoint);
        set(&mut settings.dest_side.endpoint, &self.dest_endpoint);
        set(&mut settings.source_side.profile, &self.source_profile);
        set(&mut settings.dest_side.profile, &self.dest_profile);
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
    /// Put skipped tasks back in the queue first (e.g. archived versions once restored),
    /// all but those whose source version is gone; each is checked against the destination
    /// before it is written.
    #[arg(long, conflicts_with = "skip_failed")]
    pub retry_skipped: bool,
    /// Endpoints and profiles other than the planned ones.
    #[command(flatten)]
    pub overrides: SideOverrides,
    /// Listings in flight at once when the manifest's listing is unfinished (see `plan
    /// --list-concurrency`; a listing that already started keeps its parts).
    #[arg(long, default_value_t = DEFAULT_LIST_CONCURRENCY, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub list_concurrency: u32,
    /// Entries per listing page (1..=1000): for tests, and servers that page less.
    #[arg(long, hide = true, default_value_t = crate::lister::PAGE_SIZE, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=i64::from(crate::lister::PAGE_SIZE)))]
    pub list_page_size: i32,
    /// Copy-stage knobs.
    #[command(flatten)]
    pub exec: ExecArgs,
    /// A price table for `--max-cost` instead of the job's (see `plan --prices`).
    #[arg(long, value_name = "FILE", value_parser = parse_prices)]
    pub prices: Option<Prices>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Logs and progress lines.
    #[command(flatten)]
    pub log: LogArgs,
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
    /// Put skipped tasks back in the queue first (see `run --retry-skipped`).
    #[arg(long)]
    pub retry_skipped: bool,
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
            retry_skipped: self.retry_skipped,
            overrides: SideOverrides::default(),
            list_concurrency: self.plan.list_concurrency,
            list_page_size: self.plan.list_page_size,
            exec: self.exec.clone(),
            prices: self.plan.estimate.prices.clone(),
            no_progress: self.plan.no_progress,
            log: self.plan.log.clone(),
        }
    }
}

/// Arguments of `follow`: the changes' intake, the reconciler, then `run`'s.
#[derive(Debug, Args, Clone)]
pub struct FollowArgs {
    /// Where changes come from: `sqs:QUEUE` (a queue URL or name, read with the source's
    /// profile, region and endpoint) or `http://ADDR:PORT` (an endpoint served here that
    /// accepts S3 event records: Ceph RGW topics, MinIO webhooks). Without it, polling.
    #[arg(long, value_name = "SOURCE", value_parser = crate::follow::intake::parse_events)]
    pub events: Option<crate::follow::intake::EventSource>,
    /// Seconds between full listings of what changed (default 60 without --events; off with
    /// --events unless given).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86400 * 7))]
    pub poll_interval: Option<u64>,
    /// Seconds between reconciles: a full listing in the background that catches what
    /// events missed (counted as found by reconcile); 0: never.
    #[arg(long, default_value_t = 3600, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=86400 * 30))]
    pub reconcile_interval: u64,
    /// Exit 0 once caught up: nothing pending (no open task, no changed key unlisted, no
    /// queued event) and a reconcile started after that found nothing new.
    #[arg(long)]
    pub until_caught_up: bool,
    /// `run`'s options.
    #[command(flatten)]
    pub run: RunArgs,
}

impl FollowArgs {
    /// Seconds between polls (None: no polling).
    pub fn poll_every(&self) -> Option<Duration> {
        match (self.poll_interval, &self.events) {
            (Some(s), _) => Some(Duration::from_secs(s)),
            (None, None) => Some(Duration::from_secs(60)),
            (None, Some(_)) => None,
        }
    }

    /// Seconds between reconciles (None: never).
    pub fn reconcile_every(&self) -> Option<Duration> {
        (self.reconcile_interval > 0).then(|| Duration::from_secs(self.reconcile_interval))
    }
}

/// How `plan`, `run` and `replicate` write to stderr (see `events`).
#[derive(Debug, Args, Clone)]
pub struct LogArgs {
    /// `text` for a person, or `json`: every line on stderr one JSON object (task ends,
    /// listing progress, retries, limits, progress, the summary, messages); no bar.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    pub log_format: LogFormat,
    /// Seconds between progress lines (tasks, rate, ETA), printed when stderr is not a
    /// terminal or with `--log-format json`; 0: none.
    #[arg(long, default_value_t = 30, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=86400))]
    pub progress_interval: u64,
}

impl LogArgs {
    /// The interval between progress lines (None: off).
    pub fn interval(&self) -> Option<Duration> {
        (self.progress_interval > 0).then(|| Duration::from_secs(self.progress_interval))
    }
}

impl Command {
    /// The command's log options (`plan`, `run` and `replicate` have them).
    pub fn log(&self) -> Option<&LogArgs> {
        match self {
            Command::Plan(a) => Some(&a.log),
            Command::Run(a) => Some(&a.log),
            Command::Replicate(a) => Some(&a.plan.log),
            Command::Follow(a) => Some(&a.run.log),
            _ => None,
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
    /// What the estimate assumes, instead of what `plan` stored.
    #[command(flatten)]
    pub estimate: EstimateArgs,
}

/// Arguments of `report`.
#[derive(Debug, Args, Clone)]
pub struct ReportArgs {
    /// The manifest.
    #[arg(long, value_name = "FILE")]
    pub manifest: PathBuf,
    /// csv (one line per failed, skipped or blocked task, after a header), json, or aws (S3
    /// Batch Operations' completion report: `job-<id>/manifest.json` and
    /// `job-<id>/results/*.csv` under --output, which it needs).
    #[arg(long, value_enum, default_value = "csv")]
    pub format: ReportFormat,
    /// Write to this file instead of standard output; with --format aws: a directory or
    /// s3://BUCKET[/PREFIX] (uploaded with the destination's credentials).
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// --format aws: all tasks (copied ones `succeeded`), or failed only (failed, skipped and
    /// blocked tasks: what was not copied). Pending tasks are in neither.
    #[arg(long, value_enum, default_value = "all")]
    pub report_scope: ReportScopeArg,
    /// --format aws: the job id in `job-<id>` (default: the manifest's file name without
    /// its extension; a PostgreSQL job's name).
    #[arg(long, value_name = "ID")]
    pub job_id: Option<String>,
}

/// `--report-scope`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportScopeArg {
    /// Every finished task.
    All,
    /// Tasks not copied.
    Failed,
}

/// The formats of `report`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    /// A header, then one line per failed, skipped or blocked task.
    Csv,
    /// One JSON object: the job, the counts, the problems.
    Json,
    /// S3 Batch Operations' completion report (`Report_CSV_20180820`).
    Aws,
}

/// Arguments of `verify`.
#[derive(Debug, Args, Clone)]
pub struct VerifyArgs {
    /// The manifest (its job says what to compare).
    #[arg(long, value_name = "FILE")]
    pub manifest: PathBuf,
    /// Endpoints and profiles other than the planned ones.
    #[command(flatten)]
    pub overrides: SideOverrides,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also compare each version's user metadata, content headers, website redirect and
    /// tags (one HEAD and one GetObjectTagging per version and side).
    #[arg(long)]
    pub deep: bool,
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
    fn durations_read_and_show_with_their_units() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("45m"), Ok(Duration::from_secs(2700)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("1ms"), Ok(Duration::from_millis(1)));
        assert!(parse_duration("10").unwrap_err().contains("no known unit"));
        assert!(parse_duration("h").unwrap_err().contains("not a duration"));
        assert_eq!(
            crate::events::show_duration(Duration::from_secs(2700)),
            "45m"
        );
        assert_eq!(crate::events::show_duration(Duration::from_secs(90)), "90s");
        assert_eq!(
            crate::events::show_duration(Duration::from_millis(1500)),
            "1500ms"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5MiB"), Ok(5 << 20));
        assert_eq!(parse_size("5m"), Ok(5 << 20));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("x").is_err());
        assert!(parse_size("5XB").is_err());
    }

    #[test]
    fn bandwidth_flags_are_checked_where_they_are_given() {
        let parse = |cmd: &str, extra: &[&str]| {
            let mut args = vec!["s3-backfill", cmd, "--manifest", "m.db"];
            if cmd == "replicate" {
                args.extend(["--source", "s3://a", "--dest", "s3://b"]);
            }
            args.extend(extra);
            Cli::try_parse_from(args)
        };
        let exec = |cmd: &str, extra: &[&str]| match parse(cmd, extra).unwrap().command {
            Command::Run(a) => a.exec,
            Command::Replicate(a) => a.exec,
            _ => unreachable!(),
        };
        let twenty = bandwidth::parse_rate("20M").unwrap();
        for cmd in ["run", "replicate"] {
            let e = exec(cmd, &["--max-bandwidth", "20M"]);
            assert_eq!(e.max_bandwidth, Some(Schedule::constant(twenty)));
            let bw = e.bandwidth().expect("a limiter");
            assert_eq!(bw.schedule(), &Schedule::constant(twenty));
            let e = exec(cmd, &["--bandwidth-schedule", "08:00,10M 18:00,off"]);
            let bw = e.bandwidth().expect("a limiter");
            assert_eq!(bw.schedule().to_string(), "08:00,10Mi 18:00,off");
        }
        assert!(exec("run", &[]).bandwidth().is_none());
        assert!(exec("run", &["--max-bandwidth", "off"])
            .bandwidth()
            .is_none());
        for (extra, says) in [
            (&["--max-bandwidth", "20X"][..], "not a rate"),
            (&["--bandwidth-schedule", "8h,10M"][..], "not a time of day"),
            (
                &["--max-bandwidth", "1M", "--bandwidth-schedule", "08:00,1M"][..],
                "cannot be used with",
            ),
        ] {
            let e = parse("run", extra).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{extra:?}");
            assert!(e.to_string().contains(says), "{extra:?}: {e}");
        }
    }

    #[test]
    fn page_size_and_side_overrides_reach_the_settings() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["s3-backfill"], args].concat());
        let plan = [
            "plan",
            "--source",
            "s3://a",
            "--dest",
            "s3://b",
            "--manifest",
            "m.db",
        ];
        let Command::Replicate(r) =
            parse(&[&["replicate"], &plan[1..], &["--list-page-size", "3"]].concat())
                .unwrap()
                .command
        else {
            unreachable!()
        };
        assert_eq!((r.plan.list_page_size, r.run().list_page_size), (3, 3));
        let Command::Plan(p) = parse(&plan).unwrap().command else {
            unreachable!()
        };
        assert_eq!(p.list_page_size, 1000);
        for bad in ["0", "1001", "x"] {
            let e = parse(&[&plan[..], &["--list-page-size", bad]].concat()).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}");
        }
        let Command::Verify(v) = parse(&[
            "verify",
            "--manifest",
            "m.db",
            "--dest-endpoint",
            "http://proxy",
            "--source-profile",
            "p",
        ])
        .unwrap()
        .command
        else {
            unreachable!()
        };
        let mut s = p.settings().unwrap();
        s.dest_side.profile = Some("kept".into());
        v.overrides.apply(&mut s);
        assert_eq!(s.dest_side.endpoint.as_deref(), Some("http://proxy"));
        assert_eq!(s.source_side.profile.as_deref(), Some("p"));
        assert_eq!(
            s.dest_side.profile.as_deref(),
            Some("kept"),
            "not overridden"
        );
        assert_eq!(s.source_side.endpoint, None);
    }

    #[test]
    fn checksum_flags_reach_each_side() {
        let cli = Cli::try_parse_from([
            "s3-backfill",
            "plan",
            "--source",
            "s3://a",
            "--dest",
            "s3://b",
            "--manifest",
            "m.db",
            "--dest-checksum-calculation",
            "when-required",
        ])
        .unwrap();
        let Command::Plan(p) = cli.command else {
            unreachable!()
        };
        let s = p.settings().unwrap();
        assert_eq!(
            s.dest_side.checksum_calculation,
            ChecksumCalculation::WhenRequired
        );
        assert_eq!(
            s.source_side.checksum_calculation,
            ChecksumCalculation::WhenSupported
        );
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
