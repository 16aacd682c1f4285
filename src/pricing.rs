//! pricing: what S3 requests and bytes cost, and what a server does where servers differ:
//! [`Prices`] (the built-in table, S3 Standard in us-east-1, or a `--prices` JSON file), by
//! request class with per-operation overrides and a price per GB moved across providers;
//! [`cost_of`] prices what a run counted and [`CostLimit`] is a run's `--max-cost`; a
//! [`Server`] profile (`--server`). Read by `estimate` (before a run), by `copier` (the
//! limit while it runs) and by `cli` (the flags): a leaf, so none of them depends on another
//! through it.
//!
//! May call: s3 (the operation names).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::s3::client::OPERATIONS;

/// What the destination (and source) server does where S3 servers differ.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Server {
    /// AWS S3 and servers that answer as it does (moto): write answers name the new version,
    /// HEAD with partNumber shows a part, CompleteMultipartUpload gives the ETag.
    #[default]
    S3,
    /// Ceph RGW (16.2): CopyObject answers without the new version id, CompleteMultipartUpload
    /// without an ETag, partNumber is ignored on HEAD, CopyObject keeps multipart ETags.
    CephRgw,
}

impl Server {
    /// The name `--server` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Server::S3 => "s3",
            Server::CephRgw => "ceph-rgw",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Server> {
        match s {
            "s3" => Some(Server::S3),
            "ceph-rgw" => Some(Server::CephRgw),
            _ => None,
        }
    }
}

/// The request classes providers price by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// PUT, COPY, POST, LIST.
    Write,
    /// GET, HEAD and every other request.
    Read,
    /// DELETE and CANCEL (free on AWS).
    Delete,
}

/// The class an operation is priced in (AWS's classes).
pub fn class_of(op: &str) -> Class {
    match op {
        "CopyObject"
        | "PutObject"
        | "UploadPart"
        | "UploadPartCopy"
        | "CreateMultipartUpload"
        | "CompleteMultipartUpload"
        | "PutObjectTagging"
        | "ListObjectVersions"
        | "ListMultipartUploads"
        | "RestoreObject" => Class::Write,
        "DeleteObject" | "AbortMultipartUpload" => Class::Delete,
        _ => Class::Read,
    }
}

/// Bytes in one GB as providers bill transfer (2^30).
pub const GB: f64 = 1024.0 * 1024.0 * 1024.0;

/// A price table, in US dollars (the `--prices` file is this, as JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    /// What the table is (said in the output).
    pub name: String,
    /// When its prices were read.
    pub date: String,
    /// Dollars per 1,000 PUT, COPY, POST and LIST requests.
    pub write_per_1000: f64,
    /// Dollars per 1,000 GET, HEAD and other requests.
    pub read_per_1000: f64,
    /// Dollars per 1,000 DELETE requests (and aborts of multipart uploads).
    #[serde(default)]
    pub delete_per_1000: f64,
    /// Dollars per 1,000 requests of one operation, instead of its class's price.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub operations_per_1000: BTreeMap<String, f64>,
    /// Dollars per GB (2^30 bytes) streamed from one provider to another (the source's
    /// transfer out to the internet).
    pub transfer_across_per_gb: f64,
}

impl Prices {
    /// The built-in table: S3 Standard in us-east-1 as AWS published it (aws.amazon.com/s3/pricing,
    /// read 2025-01): $0.005 per 1,000 PUT/COPY/POST/LIST requests, $0.0004 per 1,000 GET and
    /// other requests, DELETE free, $0.09 per GB of data transfer out to the internet (the
    /// first 10 TB of a month; the monthly free 100 GB left out).
    pub fn builtin() -> Prices {
        Prices {
            name: "aws-s3-standard-us-east-1".into(),
            date: "2025-01".into(),
            write_per_1000: 0.005,
            read_per_1000: 0.0004,
            delete_per_1000: 0.0,
            operations_per_1000: BTreeMap::new(),
            transfer_across_per_gb: 0.09,
        }
    }

    /// Reads and checks a `--prices` file: one line saying what is wrong.
    pub fn from_file(path: &str) -> Result<Prices, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("--prices {path}: {e}"))?;
        Prices::from_json(&text).map_err(|e| format!("--prices {path}: {e}"))
    }

    /// Parses and checks a price table.
    pub fn from_json(text: &str) -> Result<Prices, String> {
        let p: Prices = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let fixed = [
            ("write_per_1000", p.write_per_1000),
            ("read_per_1000", p.read_per_1000),
            ("delete_per_1000", p.delete_per_1000),
            ("transfer_across_per_gb", p.transfer_across_per_gb),
        ];
        for (what, v) in fixed
            .into_iter()
            .chain(p.operations_per_1000.iter().map(|(k, v)| (k.as_str(), *v)))
        {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("{what}: {v} is not a price (0 or more)"));
            }
        }
        if let Some(op) = p
            .operations_per_1000
            .keys()
            .find(|k| !OPERATIONS.contains(&k.as_str()))
        {
            return Err(format!(
                "operations_per_1000: {op:?} is not an operation s3-backfill sends ({})",
                OPERATIONS.join(", ")
            ));
        }
        Ok(p)
    }

    /// Dollars per request of `op`.
    pub fn per_request(&self, op: &str) -> f64 {
        let per_1000 = match self.operations_per_1000.get(op) {
            Some(p) => *p,
            None => match class_of(op) {
                Class::Write => self.write_per_1000,
                Class::Read => self.read_per_1000,
                Class::Delete => self.delete_per_1000,
            },
        };
        per_1000 / 1000.0
    }

    /// "name (date)", as the output names the table.
    pub fn label(&self) -> String {
        format!("{} ({})", self.name, self.date)
    }
}

/// Dollars of `requests` (per operation) and of `bytes_across` moved across providers.
pub fn cost_of<'a>(
    prices: &Prices,
    requests: impl IntoIterator<Item = (&'a str, u64)>,
    bytes_across: u64,
) -> f64 {
    let r: f64 = requests
        .into_iter()
        .map(|(op, n)| n as f64 * prices.per_request(op))
        .sum();
    r + bytes_across as f64 / GB * prices.transfer_across_per_gb
}

/// A `--max-cost` limit of one run: its dollars, the table, and whether the run's copied
/// bytes cross providers (streamed between two endpoints).
#[derive(Clone, Debug, PartialEq)]
pub struct CostLimit {
    /// Dollars at most.
    pub max_usd: f64,
    /// The prices of the run's requests and bytes.
    pub prices: Prices,
    /// Copied bytes are moved across providers (and priced as such).
    pub across: bool,
}
