//! filters: S3 Batch Replication's manifest filters, stored with the job and applied to each
//! listed version: creation dates, sizes (strict, as S3), storage classes, key prefixes /
//! suffixes / substrings (any of each), encryption and replication status. Also the parsers of
//! the command-line values (sizes are parsed by `cli::parse_size`).
//!
//! Two steps, because the last two filters need a HEAD per version:
//! [`Filters::matches_listing`] looks only at the listing; when [`Filters::needs_head`] is true
//! the caller HEADs each version that passed and asks [`Filters::matches_head`].
//!
//! Replication status, for a client-side tool: S3's own `x-amz-replication-status` header
//! when the HEAD shows one (`PENDING`, `COMPLETED`, `FAILED`, `REPLICA`); otherwise
//! `COMPLETED` when the destination holds a version stamped by s3-backfill as the copy of this
//! source version (the `s3-backfill-source-version` stamp), else `NONE`. A `PENDING` version
//! matches none of the four values, as in S3.
//!
//! Delete markers are filtered as what they are: size 0, no storage class, no encryption, no
//! replication status (`NONE`); they cannot be HEADed, so pass [`HeadFacts::default`] for them.
//!
//! May call: `s3::types` (the listing record). Nothing else of the crate.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime};

use crate::s3::types::{Encryption, VersionEntry};

/// A command-line filter value that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{flag} {value:?}: {reason}")]
pub struct FilterError {
    /// The flag (e.g. `--created-after`).
    pub flag: &'static str,
    /// The value given.
    pub value: String,
    /// What is wrong, and what would do.
    pub reason: String,
}

/// An instant, kept as milliseconds since the epoch, stored as RFC 3339 text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Instant(pub i64);

impl Instant {
    /// Parses an RFC 3339 date-time (`2024-05-01T12:00:00Z`, offsets and fractions allowed) or
    /// a date (`2024-05-01`, midnight UTC).
    pub fn parse(s: &str) -> Option<Instant> {
        let t = s.trim();
        if let Ok(dt) = OffsetDateTime::parse(t, &Rfc3339) {
            return Some(Instant::of(dt));
        }
        let fmt = time::macros::format_description!("[year]-[month]-[day]");
        let date = Date::parse(t, &fmt).ok()?;
        Some(Instant::of(date.midnight().assume_utc()))
    }

    fn of(dt: OffsetDateTime) -> Instant {
        Instant((dt.unix_timestamp_nanos() / 1_000_000) as i64)
    }
}

impl fmt::Display for Instant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dt = OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        match dt.format(&Rfc3339) {
            Ok(s) => f.write_str(&s),
            Err(_) => write!(f, "{}ms", self.0),
        }
    }
}

impl From<Instant> for String {
    fn from(i: Instant) -> String {
        i.to_string()
    }
}

impl TryFrom<String> for Instant {
    type Error = String;
    fn try_from(s: String) -> Result<Instant, String> {
        Instant::parse(&s).ok_or_else(|| format!("{s:?} is not an RFC 3339 date or date-time"))
    }
}

/// The encryption filter's values (`MatchAnyObjectEncryption`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EncryptionFilter {
    /// SSE-S3 (`AES256`).
    #[serde(rename = "SSE-S3")]
    SseS3,
    /// SSE-KMS (`aws:kms`).
    #[serde(rename = "SSE-KMS")]
    SseKms,
    /// DSSE-KMS (`aws:kms:dsse`).
    #[serde(rename = "DSSE-KMS")]
    DsseKms,
    /// SSE-C (customer key).
    #[serde(rename = "SSE-C")]
    SseC,
    /// Not encrypted.
    #[serde(rename = "NOT-SSE")]
    NotSse,
}

impl EncryptionFilter {
    const ALL: [(EncryptionFilter, &'static str); 5] = [
        (EncryptionFilter::SseS3, "SSE-S3"),
        (EncryptionFilter::SseKms, "SSE-KMS"),
        (EncryptionFilter::DsseKms, "DSSE-KMS"),
        (EncryptionFilter::SseC, "SSE-C"),
        (EncryptionFilter::NotSse, "NOT-SSE"),
    ];

    /// The command-line name (`SSE-S3`, ...).
    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(v, _)| *v == self)
            .map_or("", |(_, n)| n)
    }

    /// The kind of an encryption as HEAD reports it: a header value (`AES256`, `aws:kms`,
    /// `aws:kms:dsse`), one of this filter's names, or None (not encrypted).
    pub fn of_header(value: Option<&str>) -> Option<EncryptionFilter> {
        let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            return Some(EncryptionFilter::NotSse);
        };
        match v.to_ascii_lowercase().as_str() {
            "aes256" | "sse-s3" => Some(EncryptionFilter::SseS3),
            "aws:kms" | "sse-kms" => Some(EncryptionFilter::SseKms),
            "aws:kms:dsse" | "dsse-kms" => Some(EncryptionFilter::DsseKms),
            "sse-c" => Some(EncryptionFilter::SseC),
            "not-sse" | "none" => Some(EncryptionFilter::NotSse),
            _ => None,
        }
    }

    /// The name to pass as [`HeadFacts::encryption`] for the access layer's record.
    pub fn name_of(enc: Option<&Encryption>) -> &'static str {
        match enc {
            None => "NOT-SSE",
            Some(Encryption::SseS3) => "SSE-S3",
            Some(Encryption::SseKms(_)) => "SSE-KMS",
            Some(Encryption::DsseKms(_)) => "DSSE-KMS",
            Some(Encryption::SseC) => "SSE-C",
        }
    }
}

/// The replication status filter's values (`ObjectReplicationStatuses`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ReplicationStatus {
    /// Never replicated.
    None,
    /// Replication failed.
    Failed,
    /// Replicated.
    Completed,
    /// The version is itself a replica.
    Replica,
}

impl ReplicationStatus {
    const ALL: [(ReplicationStatus, &'static str); 4] = [
        (ReplicationStatus::None, "NONE"),
        (ReplicationStatus::Failed, "FAILED"),
        (ReplicationStatus::Completed, "COMPLETED"),
        (ReplicationStatus::Replica, "REPLICA"),
    ];

    /// The command-line name.
    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(v, _)| *v == self)
            .map_or("", |(_, n)| n)
    }

    /// A version's status for a client-side tool (see the module header); None for `PENDING`
    /// or a value S3 does not define.
    pub fn of(header: Option<&str>, stamped: bool) -> Option<ReplicationStatus> {
        match header.map(str::trim).filter(|h| !h.is_empty()) {
            Some(h) => match h.to_ascii_uppercase().as_str() {
                "COMPLETED" | "COMPLETE" => Some(ReplicationStatus::Completed),
                "FAILED" => Some(ReplicationStatus::Failed),
                "REPLICA" => Some(ReplicationStatus::Replica),
                _ => None,
            },
            None if stamped => Some(ReplicationStatus::Completed),
            None => Some(ReplicationStatus::None),
        }
    }
}

/// What a HEAD of one version (and the destination's stamp) says, for [`Filters::matches_head`].
#[derive(Clone, Copy, Debug, Default)]
pub struct HeadFacts<'a> {
    /// The encryption: `x-amz-server-side-encryption` (`AES256`, `aws:kms`, `aws:kms:dsse`) or
    /// a filter name (`SSE-C`, ...); None when not encrypted.
    pub encryption: Option<&'a str>,
    /// S3's `x-amz-replication-status`, when present.
    pub replication_status: Option<&'a str>,
    /// The destination holds this version's copy, stamped by s3-backfill.
    pub stamped: bool,
}

/// The Batch Replication filters of a job. Empty lists and Nones select everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Filters {
    /// Only versions created strictly after this instant.
    pub created_after: Option<Instant>,
    /// Only versions created strictly before this instant.
    pub created_before: Option<Instant>,
    /// Only versions larger than this many bytes (size > min).
    pub min_size: Option<u64>,
    /// Only versions smaller than this many bytes (size < max).
    pub max_size: Option<u64>,
    /// Any of these storage classes (an unlisted class is `STANDARD`).
    pub storage_classes: Vec<String>,
    /// Keys starting with any of these.
    pub key_prefixes: Vec<String>,
    /// Keys ending with any of these.
    pub key_suffixes: Vec<String>,
    /// Keys containing any of these.
    pub key_substrings: Vec<String>,
    /// Any of these encryptions (needs a HEAD per version).
    pub encryption: Vec<EncryptionFilter>,
    /// Any of these replication statuses (needs a HEAD per version).
    pub replication_status: Vec<ReplicationStatus>,
}

impl Filters {
    /// Whether no filter is set.
    pub fn is_empty(&self) -> bool {
        *self == Filters::default()
    }

    /// Whether a HEAD per version is needed (encryption or replication status filters).
    pub fn needs_head(&self) -> bool {
        !self.encryption.is_empty() || !self.replication_status.is_empty()
    }

    /// Whether a version passes the filters a listing can decide.
    pub fn matches_listing(&self, v: &VersionEntry) -> bool {
        self.matches_key(&v.key) && self.matches_dates(v) && self.matches_object(v)
    }

    /// Whether a version that passed [`Filters::matches_listing`] passes the HEAD filters.
    pub fn matches_head(&self, head: &HeadFacts<'_>) -> bool {
        let enc_ok = self.encryption.is_empty()
            || EncryptionFilter::of_header(head.encryption)
                .is_some_and(|e| self.encryption.contains(&e));
        let status_ok = self.replication_status.is_empty()
            || ReplicationStatus::of(head.replication_status, head.stamped)
                .is_some_and(|s| self.replication_status.contains(&s));
        enc_ok && status_ok
    }

    /// A refusal for contradictory settings (min not below max, after not before before).
    pub fn validate(&self) -> Result<(), FilterError> {
        if let (Some(min), Some(max)) = (self.min_size, self.max_size) {
            if max <= min.saturating_add(1) {
                return Err(FilterError {
                    flag: "--max-size",
                    value: max.to_string(),
                    reason: format!("no size is above --min-size {min} and below it"),
                });
            }
        }
        if let (Some(after), Some(before)) = (self.created_after, self.created_before) {
            if before <= after {
                return Err(FilterError {
                    flag: "--created-before",
                    value: before.to_string(),
                    reason: format!("not after --created-after {after}"),
                });
            }
        }
        Ok(())
    }

    fn matches_key(&self, key: &str) -> bool {
        let any = |list: &[String], f: &dyn Fn(&str) -> bool| {
            list.is_empty() || list.iter().any(|p| f(p))
        };
        any(&self.key_prefixes, &|p| key.starts_with(p))
            && any(&self.key_suffixes, &|s| key.ends_with(s))
            && any(&self.key_substrings, &|s| key.contains(s))
    }

    fn matches_dates(&self, v: &VersionEntry) -> bool {
        if self.created_after.is_none() && self.created_before.is_none() {
            return true;
        }
        // A version without a readable date cannot be shown to be in the range.
        let Some(t) = v.last_modified.as_deref().and_then(Instant::parse) else {
            return false;
        };
        self.created_after.is_none_or(|a| t > a) && self.created_before.is_none_or(|b| t < b)
    }

    fn matches_object(&self, v: &VersionEntry) -> bool {
        let size = if v.is_delete_marker { 0 } else { v.size };
        let size_ok =
            self.min_size.is_none_or(|m| size > m) && self.max_size.is_none_or(|m| size < m);
        let class_ok = self.storage_classes.is_empty() || {
            let class = match (&v.storage_class, v.is_delete_marker) {
                (_, true) => None,
                (Some(c), false) if !c.is_empty() => Some(c.as_str()),
                _ => Some("STANDARD"),
            };
            class.is_some_and(|c| {
                self.storage_classes
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(c))
            })
        };
        size_ok && class_ok
    }
}

fn err(flag: &'static str, value: &str, reason: impl Into<String>) -> FilterError {
    FilterError {
        flag,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Parses `--created-after` / `--created-before` (`flag` names it in the error).
pub fn parse_instant(flag: &'static str, value: &str) -> Result<Instant, FilterError> {
    Instant::parse(value).ok_or_else(|| {
        err(
            flag,
            value,
            "not a date (2024-05-01) or RFC 3339 date-time (2024-05-01T12:00:00Z)",
        )
    })
}

/// Parses one `--encryption` value (case-insensitive).
pub fn parse_encryption(value: &str) -> Result<EncryptionFilter, FilterError> {
    EncryptionFilter::ALL
        .iter()
        .find(|(_, n)| n.eq_ignore_ascii_case(value.trim()))
        .map(|(v, _)| *v)
        .ok_or_else(|| {
            err(
                "--encryption",
                value,
                "expected SSE-S3, SSE-KMS, DSSE-KMS, SSE-C or NOT-SSE",
            )
        })
}

/// Parses one `--replication-status` value (case-insensitive).
pub fn parse_replication_status(value: &str) -> Result<ReplicationStatus, FilterError> {
    ReplicationStatus::ALL
        .iter()
        .find(|(_, n)| n.eq_ignore_ascii_case(value.trim()))
        .map(|(v, _)| *v)
        .ok_or_else(|| {
            err(
                "--replication-status",
                value,
                "expected NONE, FAILED, COMPLETED or REPLICA",
            )
        })
}

/// Parses one `--storage-class` value: S3's spelling (`STANDARD_IA`), upper-cased.
pub fn parse_storage_class(value: &str) -> Result<String, FilterError> {
    let v = value.trim().to_ascii_uppercase();
    let ok = !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(v)
    } else {
        Err(err(
            "--storage-class",
            value,
            "expected a storage class such as STANDARD, STANDARD_IA, GLACIER",
        ))
    }
}

#[cfg(test)]
mod tests;
