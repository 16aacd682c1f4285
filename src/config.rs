//! config: the job's settings (stored in the manifest).
//!
//! Each side (source, destination) has its own endpoint, region, profile and checksum
//! settings: [`SideConfig`], which the s3 layer owns (`s3::side`) and the settings hold.
//! Credentials are never stored: they come from the standard AWS chain of each side
//! (environment, shared config and credentials files, profiles, assume-role), via aws-config.
//!
//! May call: the s3 layer (its records and side configuration), `filters` and `rules` (the
//! stored filters and replication configuration).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::filters::Filters;
use crate::rules::ReplicationConfig;
use crate::s3::VersionEntry;

/// A configuration error: bad input that the user must fix (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A location is not of the form `s3://BUCKET[/PREFIX]`.
    #[error("invalid location {0:?}: expected s3://BUCKET[/PREFIX]")]
    BadLocation(String),
    /// An option has a value outside its range.
    #[error("{0}")]
    Invalid(String),
}

pub use crate::s3::side::{ChecksumCalculation, SideConfig};
pub use crate::s3::Side;

/// A bucket and an optional key prefix: `s3://BUCKET[/PREFIX]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix (may be empty); kept byte for byte.
    pub prefix: String,
}

impl Location {
    /// Parses `s3://BUCKET[/PREFIX]`.
    ///
    /// ```
    /// use s3_backfill::config::Location;
    /// let l = Location::parse("s3://archive/2024/raw data/").unwrap();
    /// assert_eq!(l.bucket, "archive");
    /// assert_eq!(l.prefix, "2024/raw data/");
    /// assert!(Location::parse("archive").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<Location, ConfigError> {
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| ConfigError::BadLocation(s.to_string()))?;
        let (bucket, prefix) = match rest.split_once('/') {
            Some((b, p)) => (b, p),
            None => (rest, ""),
        };
        if bucket.is_empty() || bucket.len() > 255 {
            return Err(ConfigError::BadLocation(s.to_string()));
        }
        Ok(Location {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}", self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        Ok(())
    }
}

/// Which versions the job replicates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    /// Only keys under this prefix (keys keep their names).
    pub prefix: String,
    /// Replicate delete markers.
    pub delete_markers: bool,
    /// Only each key's current version.
    pub latest_only: bool,
}

impl Selection {
    /// Whether a listed entry is part of the job (the one selection rule: the lister and
    /// verify both ask here).
    ///
    /// ```
    /// use s3_backfill::config::Selection;
    /// use s3_backfill::s3::VersionEntry;
    /// let marker = VersionEntry { is_delete_marker: true, ..Default::default() };
    /// assert!(!Selection::default().selects(&marker));
    /// let sel = Selection { delete_markers: true, ..Default::default() };
    /// assert!(sel.selects(&marker));
    /// ```
    pub fn selects(&self, e: &VersionEntry) -> bool {
        if !e.key.starts_with(&self.prefix) {
            return false;
        }
        if self.latest_only {
            e.is_latest && !e.is_delete_marker
        } else {
            self.delete_markers || !e.is_delete_marker
        }
    }
}

/// Server-side encryption asked for at the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Sse {
    /// SSE-S3.
    #[serde(rename = "AES256")]
    #[value(name = "AES256")]
    Aes256,
    /// SSE-KMS.
    #[serde(rename = "aws:kms")]
    #[value(name = "aws:kms")]
    AwsKms,
    /// No encryption header: the destination bucket's default encryption applies (the
    /// source version's own encryption is not carried over, so no HEAD is needed for it).
    #[serde(rename = "bucket-default")]
    #[value(name = "bucket-default")]
    BucketDefault,
}

fn yes() -> bool {
    true
}

/// How versions are copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMode {
    /// Server-side when both sides use the same endpoint, streaming otherwise.
    #[default]
    Auto,
    /// CopyObject / UploadPartCopy issued with the destination's credentials.
    ServerSide,
    /// GET with the source client, upload with the destination client.
    Stream,
}

/// How a server-side copy of a multipart source is made (`--large-copy`). A single-part
/// source up to 5 GiB is always one `CopyObject` (its MD5 ETag is kept on every server), and
/// anything above 5 GiB (CopyObject's limit) is copied in parts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LargeCopy {
    /// By the server: on AWS endpoints (none configured, or `*.amazonaws.com`) `parts`, since
    /// AWS gives a multipart source copied by CopyObject a new single-part ETag; elsewhere
    /// `copy-object` while the server keeps multipart ETags (Ceph RGW does, without moving
    /// data): the first such copy of a run is checked, and if its ETag changed, multipart
    /// sources are copied in parts for the rest of the run (that first one is copied again
    /// in parts).
    #[default]
    Auto,
    /// One `CopyObject` for every source up to 5 GiB (fast where the server copies without
    /// moving data; a server that does not keep multipart ETags gives such copies new ones).
    CopyObject,
    /// `UploadPartCopy` in the source's own part layout (read, or inferred from its ETag):
    /// the multipart ETag is kept on every server.
    Parts,
}

impl LargeCopy {
    /// Whether a multipart source up to 5 GiB goes to `dest_endpoint` as one CopyObject:
    /// `auto` says no on AWS, and elsewhere yes unless the server was seen to give such
    /// copies new ETags (`changes_etags`). The copier and the estimate both ask here.
    pub fn whole_multipart(self, dest_endpoint: Option<&str>, changes_etags: bool) -> bool {
        match self {
            LargeCopy::CopyObject => true,
            LargeCopy::Parts => false,
            LargeCopy::Auto => !is_aws_endpoint(dest_endpoint) && !changes_etags,
        }
    }
}

/// Whether an endpoint is AWS S3's own: none configured (the SDK's default), or a host
/// under `amazonaws.com` (`.cn` included).
///
/// ```
/// use s3_backfill::config::is_aws_endpoint;
/// assert!(is_aws_endpoint(None));
/// assert!(is_aws_endpoint(Some("https://s3.eu-west-1.amazonaws.com")));
/// assert!(!is_aws_endpoint(Some("http://127.0.0.1:7480")));
/// ```
pub fn is_aws_endpoint(endpoint: Option<&str>) -> bool {
    let Some(e) = endpoint else { return true };
    let host = e.split("://").nth(1).unwrap_or(e);
    let host = host
        .split(['/', ':'])
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    host.ends_with(".amazonaws.com") || host.ends_with(".amazonaws.com.cn")
}

/// Options of the copy stage that a migration needs; stored with the job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyOptions {
    /// Server-side, streaming, or chosen by the endpoints.
    pub mode: CopyMode,
    /// Streamed objects of this size or more are copied in parts, unless that would change
    /// an ETag that can be kept (a single-part source that fits the memory budget is one
    /// PutObject; a multipart source keeps its layout).
    pub multipart_threshold: u64,
    /// Part size when the source's own layout is unknown or not uniform.
    pub part_size: u64,
    /// Storage class at the destination (default: the source version's).
    pub storage_class: Option<String>,
    /// Server-side encryption at the destination.
    pub sse: Option<Sse>,
    /// KMS key for `aws:kms`.
    pub sse_kms_key_id: Option<String>,
    /// Canned ACL at the destination (e.g. `bucket-owner-full-control`).
    pub acl: Option<String>,
    /// Stamp every destination version with the source version id in its user metadata
    /// (exact reconciliation; see the README). Off: metadata byte-identical.
    #[serde(default = "yes")]
    pub stamp: bool,
    /// How server-side copies of multipart sources are made.
    #[serde(default)]
    pub large_copy: LargeCopy,
}

/// Default multipart threshold: 64 MiB.
pub const DEFAULT_MULTIPART_THRESHOLD: u64 = 64 * 1024 * 1024;
/// Default part size: 16 MiB.
pub const DEFAULT_PART_SIZE: u64 = 16 * 1024 * 1024;
/// The largest object a single CopyObject can copy (5 GiB).
pub const MAX_COPY_OBJECT: u64 = 5 * 1024 * 1024 * 1024;
/// The smallest part S3 accepts (except the last one).
pub const MIN_PART: u64 = 5 * 1024 * 1024;
/// The largest part S3 accepts.
pub const MAX_PART: u64 = 5 * 1024 * 1024 * 1024;
/// The most parts one upload may have.
pub const MAX_PARTS: u64 = 10_000;

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            mode: CopyMode::Auto,
            multipart_threshold: DEFAULT_MULTIPART_THRESHOLD,
            part_size: DEFAULT_PART_SIZE,
            storage_class: None,
            sse: None,
            sse_kms_key_id: None,
            acl: None,
            stamp: true,
            large_copy: LargeCopy::Auto,
        }
    }
}

impl CopyOptions {
    /// One line per copy setting that differs between the job's `stored` settings and these
    /// (`--flag: old → new`); empty when they are the same.
    pub fn changes_from(&self, stored: &CopyOptions) -> Vec<String> {
        fn show<T: Serialize>(v: &T) -> String {
            match serde_json::to_value(v) {
                Ok(serde_json::Value::Null) => "none".into(),
                Ok(serde_json::Value::String(s)) => s,
                Ok(v) => v.to_string(),
                Err(_) => "?".into(),
            }
        }
        let stamp = |on: bool| if on { "on" } else { "off (--no-stamp)" }.to_string();
        let pairs = [
            ("--copy-mode", show(&stored.mode), show(&self.mode)),
            (
                "--multipart-threshold",
                show(&stored.multipart_threshold),
                show(&self.multipart_threshold),
            ),
            (
                "--part-size",
                show(&stored.part_size),
                show(&self.part_size),
            ),
            (
                "--storage-class",
                show(&stored.storage_class),
                show(&self.storage_class),
            ),
            ("--sse", show(&stored.sse), show(&self.sse)),
            (
                "--sse-kms-key-id",
                show(&stored.sse_kms_key_id),
                show(&self.sse_kms_key_id),
            ),
            ("--acl", show(&stored.acl), show(&self.acl)),
            ("the stamp", stamp(stored.stamp), stamp(self.stamp)),
        ];
        pairs
            .into_iter()
            .filter(|(_, old, new)| old != new)
            .map(|(what, old, new)| format!("{what}: {old} → {new}"))
            .collect()
    }

    /// Checks the values against S3's limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.part_size < MIN_PART || self.part_size > MAX_PART {
            return Err(ConfigError::Invalid(format!(
                "--part-size must be between 5 MiB and 5 GiB, got {}",
                self.part_size
            )));
        }
        if self.multipart_threshold == 0 {
            return Err(ConfigError::Invalid(
                "--multipart-threshold must be positive".into(),
            ));
        }
        if self.sse_kms_key_id.is_some() && self.sse != Some(Sse::AwsKms) {
            return Err(ConfigError::Invalid(
                "--sse-kms-key-id needs --sse aws:kms".into(),
            ));
        }
        Ok(())
    }
}

/// Everything `plan` stores so that `run` needs only the manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSettings {
    /// What is read.
    pub source: Location,
    /// Where it goes.
    pub dest: Location,
    /// How the source is reached.
    pub source_side: SideConfig,
    /// How the destination is reached.
    pub dest_side: SideConfig,
    /// Which versions.
    pub selection: Selection,
    /// How they are copied.
    pub copy: CopyOptions,
    /// Batch Replication filters (empty: every selected version).
    #[serde(default, skip_serializing_if = "Filters::is_empty")]
    pub filters: Filters,
    /// The replication configuration whose rules choose the destinations (None: `dest` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationConfig>,
    /// The destinations of a replication configuration, by id (the manifest's `destinations`
    /// table; a task's `dest` indexes here). Empty: destination 0 is `dest` with `copy`'s options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<Destination>,
    /// The manifest the tasks came from instead of a listing (`plan --from-csv` or
    /// `--from-inventory`); None: the source was listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supplied: Option<Supplied>,
}

/// A manifest the user supplies instead of a listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Supplied {
    /// A Batch Operations CSV manifest: a path or `s3://BUCKET/KEY`.
    Csv(String),
    /// An S3 Inventory `manifest.json`: a path or `s3://BUCKET/KEY`.
    Inventory(String),
}

impl std::fmt::Display for Supplied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Supplied::Csv(s) => write!(f, "--from-csv {s}"),
            Supplied::Inventory(s) => write!(f, "--from-inventory {s}"),
        }
    }
}

/// One destination of a replication configuration: a bucket and what the deciding rule says
/// about the replicas written there (one per enabled rule, so a task's destination also names
/// its rule).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix at the destination (replication rules keep keys: empty).
    #[serde(default)]
    pub prefix: String,
    /// What the rule decides (stored as the `destinations.options` JSON).
    pub options: DestOptions,
}

/// Where one destination of a job writes (see [`JobSettings::destination`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestRef<'a> {
    /// Bucket name.
    pub bucket: &'a str,
    /// Key prefix at the destination (may be empty).
    pub prefix: &'a str,
    /// What its replication rule decides (None: the job's `dest`, no rule).
    pub rule: Option<&'a DestOptions>,
}

impl DestRef<'_> {
    /// The destination key of source key `key`: the prefix, then the key. The one place
    /// where a destination key is made.
    ///
    /// ```
    /// use s3_backfill::config::DestRef;
    /// let d = DestRef { bucket: "dst", prefix: "backup/", rule: None };
    /// assert_eq!(d.key("a/b"), "backup/a/b");
    /// ```
    pub fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The current version of source key `key` here.
    pub fn object(&self, key: &str) -> crate::s3::ObjectRef {
        crate::s3::ObjectRef::key(self.bucket, &self.key(key))
    }
}

/// What a replication rule decides for its destination's replicas.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestOptions {
    /// The rule (its ID, or `#n` by position).
    pub rule: String,
    /// Storage class of the replicas (None: the source version's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
    /// Replicas owned by the destination bucket owner (`x-amz-acl: bucket-owner-full-control`).
    #[serde(default)]
    pub owner_override: bool,
    /// KMS key for replicas of SSE-KMS objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key: Option<String>,
    /// The rule replicates delete markers.
    #[serde(default)]
    pub delete_markers: bool,
    /// The rule replicates SSE-KMS objects (else the copier skips them after its HEAD).
    #[serde(default)]
    pub sse_kms_allowed: bool,
}

impl JobSettings {
    /// The destinations as `status` names them: `dest`, or every bucket of the replication
    /// rules.
    pub fn dest_label(&self) -> String {
        if self.destinations.is_empty() {
            return self.dest.to_string();
        }
        let mut buckets: Vec<String> = Vec::new();
        for d in &self.destinations {
            let b = format!("s3://{}", d.bucket);
            if !buckets.contains(&b) {
                buckets.push(b);
            }
        }
        format!("{} (replication rules)", buckets.join(", "))
    }

    /// Destination `id` (0 and unknown ids without a configuration: the job's `dest`).
    pub fn destination(&self, id: i64) -> DestRef<'_> {
        match usize::try_from(id)
            .ok()
            .and_then(|i| self.destinations.get(i))
        {
            Some(d) => DestRef {
                bucket: &d.bucket,
                prefix: &d.prefix,
                rule: Some(&d.options),
            },
            None => self.dest_ref(),
        }
    }

    /// The job's `dest` (`--dest`), with no rule.
    pub fn dest_ref(&self) -> DestRef<'_> {
        DestRef {
            bucket: &self.dest.bucket,
            prefix: &self.dest.prefix,
            rule: None,
        }
    }

    /// The current version of source key `key` at destination `id`.
    pub fn dest_object(&self, id: i64, key: &str) -> crate::s3::ObjectRef {
        self.destination(id).object(key)
    }

    /// The parts of the job that define its tasks: a manifest planned with other values
    /// cannot be continued with these.
    pub fn identity_differs(&self, other: &JobSettings) -> Option<String> {
        if self.source != other.source {
            return Some(format!(
                "source {} (manifest has {})",
                self.source, other.source
            ));
        }
        if self.dest != other.dest {
            return Some(format!(
                "destination {} (manifest has {})",
                self.dest, other.dest
            ));
        }
        if self.selection != other.selection {
            return Some(format!(
                "selection {:?} (manifest has {:?})",
                self.selection, other.selection
            ));
        }
        if self.filters != other.filters {
            return Some("other filters".into());
        }
        if self.replication != other.replication {
            return Some("another replication configuration".into());
        }
        if self.supplied != other.supplied {
            let says = |s: &Option<Supplied>| {
                s.as_ref()
                    .map_or_else(|| "a listing of the source".to_string(), |s| s.to_string())
            };
            return Some(format!(
                "{} (manifest has {})",
                says(&self.supplied),
                says(&other.supplied)
            ));
        }
        None
    }

    /// Whether the job's tasks came from a supplied manifest (`plan --from-csv` or
    /// `--from-inventory`) rather than a listing: such a job cannot be refreshed by listing.
    pub fn planned_from_supplied(&self) -> bool {
        self.supplied.is_some()
    }

    /// Whether copies start server-side (the destination reads the source itself).
    pub fn server_side(&self) -> bool {
        match self.copy.mode {
            CopyMode::ServerSide => true,
            CopyMode::Stream => false,
            // Same endpoint: try server-side; the copier falls back to streaming if the
            // destination's credentials may not read the source.
            CopyMode::Auto => self.source_side.endpoint == self.dest_side.endpoint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_setting_changes_are_said_one_per_line() {
        let stored = CopyOptions {
            stamp: false,
            ..CopyOptions::default()
        };
        let new = CopyOptions {
            sse: Some(Sse::Aes256),
            part_size: 8 * 1024 * 1024,
            ..CopyOptions::default()
        };
        assert_eq!(
            new.changes_from(&stored),
            [
                "--part-size: 16777216 → 8388608",
                "--sse: none → AES256",
                "the stamp: off (--no-stamp) → on"
            ]
        );
        assert!(new.changes_from(&new).is_empty());
    }

    #[test]
    fn parses_locations() {
        let l = Location::parse("s3://b/a/b c").unwrap();
        assert_eq!(l.bucket, "b");
        assert_eq!(l.prefix, "a/b c");
        assert_eq!(Location::parse("s3://b").unwrap().prefix, "");
        assert!(Location::parse("b/x").is_err());
        assert!(Location::parse("s3:///x").is_err());
    }
}
