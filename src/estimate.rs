//! estimate: what a run will cost, before it runs, and what a run has spent.
//!
//! - [`Builder`] walks a job's tasks key by key (each key's tasks oldest first, as the
//!   scheduler runs them) and counts the S3 requests per operation that one run copying every
//!   task sends, by the same choices the copier makes (`copier::strategy`: the one-request
//!   `CopyObject`, the HEAD of the source, `choose_plan`, the part layout; `copier::learn`:
//!   destination version ids learned from listings; the run's bucket probes). What the
//!   destination server does where servers differ comes from a [`Server`] profile: `s3` (AWS
//!   S3, and servers answering as it does, e.g. moto) or `ceph-rgw` (CopyObject answers
//!   without the new version id, CompleteMultipartUpload without an ETag, HEAD with
//!   `partNumber` is ignored, CopyObject keeps a multipart source's ETag).
//! - [`Prices`]: a price table (built in: [`Prices::builtin`], S3 Standard in us-east-1; or a
//!   JSON file, `--prices`), by request class, with per-operation overrides, and a price per
//!   GB moved across providers. [`Estimate`] is the priced result; [`cost_of`] prices what a
//!   run counted (for `--max-cost`).
//! - What cannot be known before running is left out and said (retries, reconciliation after
//!   a crash or an ambiguous write, tags: a listing does not tell which versions have some).
//!
//! May call: config, cli (the estimate's flags), copier (its pure plan and layout choices),
//! manifest (the tasks and the facts `plan` stored), pricing (the tables and server
//! profiles), s3 (the operation names).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cli::EstimateArgs;
use crate::config::{JobSettings, LargeCopy, MIN_PART};
use crate::copier::{choose_layout, choose_plan, infer_part_sizes, CopyPlan, Route, SourceUpload};
use crate::manifest::{Manifest, ManifestError};
use crate::s3::client::OPERATIONS;

pub use crate::pricing::{class_of, cost_of, Class, CostLimit, Prices, Server, GB};

/// One task as the estimate sees it (from the manifest, or from a dry run's listing).
#[derive(Clone, Debug, Default)]
pub struct EstTask {
    /// The source version id (`null` is HEADed before a multipart upload completes).
    pub version_id: String,
    /// A delete marker.
    pub is_delete_marker: bool,
    /// Bytes.
    pub size: u64,
    /// ETag as listed (a multipart source's tells its part count).
    pub etag: Option<String>,
    /// Storage class as listed.
    pub storage_class: Option<String>,
    /// Checksum algorithm as listed.
    pub checksum_algorithm: Option<String>,
    /// Destination id.
    pub dest: i64,
    /// Streams whatever the mode (its server-side copy was denied in an earlier run).
    pub stream_only: bool,
}

impl From<&crate::manifest::Task> for EstTask {
    fn from(t: &crate::manifest::Task) -> EstTask {
        EstTask {
            version_id: t.entry.version_id.clone(),
            is_delete_marker: t.entry.is_delete_marker,
            size: t.entry.size,
            etag: t.entry.etag.clone(),
            storage_class: t.entry.storage_class.clone(),
            checksum_algorithm: t.entry.checksum_algorithm.clone(),
            dest: t.dest,
            stream_only: t.stream_only,
        }
    }
}

impl From<(&crate::s3::VersionEntry, i64)> for EstTask {
    fn from((e, dest): (&crate::s3::VersionEntry, i64)) -> EstTask {
        EstTask {
            version_id: e.version_id.clone(),
            is_delete_marker: e.is_delete_marker,
            size: e.size,
            etag: e.etag.clone(),
            storage_class: e.storage_class.clone(),
            checksum_algorithm: e.checksum_algorithm.clone(),
            dest,
            stream_only: false,
        }
    }
}

/// What the estimate knows of the job's buckets besides its settings (probed at `plan`).
#[derive(Clone, Copy, Debug)]
pub struct Facts {
    /// The destination keeps versions (ids are then learned where answers omit them).
    pub dest_versioned: bool,
    /// The source bucket has object lock (every small version is HEADed).
    pub source_lock: bool,
    /// The servers' behaviour.
    pub server: Server,
    /// `--max-memory` of the run (streamed parts fit it).
    pub max_memory: u64,
}

impl Default for Facts {
    fn default() -> Self {
        Facts {
            dest_versioned: true,
            source_lock: false,
            server: Server::S3,
            max_memory: crate::copier::DEFAULT_MAX_MEMORY,
        }
    }
}

/// Entries a learning walk reads per page.
const PAGE: u64 = 1000;
/// Ids learned together (as `copier::learn`).
const LEARN_BATCH: u64 = 1000;

/// A run of rising keys whose ids one paged listing learns (see `copier::learn`).
#[derive(Debug)]
struct LearnRun {
    last_key: String,
    /// Destination entries from the run's first key to its last.
    entries: u64,
    /// Entries of keys after its last key not (yet) in the run.
    after: u64,
}

/// The learning walks of one destination bucket.
#[derive(Debug, Default)]
struct Learning {
    in_batch: u64,
    run: Option<LearnRun>,
    listings: u64,
}

impl Learning {
    /// Ends the run; `more`: entries follow its last key (the walk reads the page that
    /// shows the next key).
    fn close(&mut self, more: bool) {
        if let Some(r) = self.run.take() {
            self.listings += if more || r.after > 0 {
                r.entries / PAGE + 1
            } else {
                r.entries.div_ceil(PAGE).max(1)
            };
        }
    }

    /// One key at this bucket: its entries there, and whether its id is learned later.
    fn key(&mut self, key: &str, entries: u64, learned: bool) {
        if !learned {
            if let Some(r) = &mut self.run {
                r.after += entries;
            }
            return;
        }
        let extends = self.in_batch < LEARN_BATCH
            && self.run.as_ref().is_some_and(|r| key > r.last_key.as_str());
        if self.in_batch >= LEARN_BATCH {
            self.in_batch = 0;
        }
        if extends {
            let r = self.run.as_mut().expect("a run");
            r.entries += r.after + entries;
            r.after = 0;
            r.last_key = key.to_string();
        } else {
            self.close(true);
            self.run = Some(LearnRun {
                last_key: key.to_string(),
                entries,
                after: 0,
            });
        }
        self.in_batch += 1;
    }
}

/// Counts the requests of one run over a job's tasks, key by key.
pub struct Builder<'a> {
    settings: &'a JobSettings,
    facts: Facts,
    counts: BTreeMap<&'static str, u64>,
    bytes_within: u64,
    bytes_across: u64,
    tasks: u64,
    one_request: bool,
    /// A multipart source's CopyObject was checked (`--large-copy auto`, see
    /// `strategy::check_whole_copy`).
    whole_copy_checked: bool,
    learning: BTreeMap<String, Learning>,
}

impl<'a> Builder<'a> {
    /// An empty count for a job with these settings.
    pub fn new(settings: &'a JobSettings, facts: Facts) -> Builder<'a> {
        Builder {
            settings,
            facts,
            counts: BTreeMap::new(),
            bytes_within: 0,
            bytes_across: 0,
            tasks: 0,
            one_request: false,
            whole_copy_checked: false,
            learning: BTreeMap::new(),
        }
    }

    fn add(&mut self, op: &'static str, n: u64) {
        if n > 0 {
            *self.counts.entry(op).or_default() += n;
        }
    }

    fn rgw(&self) -> bool {
        self.facts.server == Server::CephRgw
    }

    /// The memory budget of streamed bodies (as `strategy::Budget`).
    fn budget(&self) -> u64 {
        let bytes = self
            .facts
            .max_memory
            .saturating_sub(crate::copier::MEMORY_RESERVE)
            .max(MIN_PART);
        (bytes / 1024).clamp(1, u32::MAX as u64) * 1024
    }

    /// Copied bytes cross providers: streamed between two endpoints.
    fn across(&self, server_side: bool) -> bool {
        !server_side && self.settings.source_side.endpoint != self.settings.dest_side.endpoint
    }

    /// One key's tasks, oldest first (the scheduler's order).
    pub fn key(&mut self, key: &str, tasks: &[EstTask]) {
        let mut entries: BTreeMap<&str, (u64, bool)> = BTreeMap::new();
        for (i, t) in tasks.iter().enumerate() {
            let bucket = self.settings.destination(t.dest).bucket;
            let same = |u: &EstTask| self.settings.destination(u.dest).bucket == bucket;
            let last_open = !tasks[i + 1..].iter().any(same);
            let after_marker = tasks[..i]
                .iter()
                .rev()
                .find(|u| same(u))
                .is_some_and(|u| u.is_delete_marker);
            let learned = self.task(t, last_open, after_marker);
            let e = entries.entry(bucket).or_default();
            e.0 += 1;
            e.1 |= learned;
        }
        for (bucket, (n, learned)) in entries {
            self.learning
                .entry(bucket.to_string())
                .or_default()
                .key(key, n, learned);
        }
    }

    /// One task's requests; true when its destination version id is learned later from a
    /// listing.
    fn task(&mut self, t: &EstTask, last_open: bool, after_marker: bool) -> bool {
        self.tasks += 1;
        if t.is_delete_marker {
            self.add("DeleteObject", 1);
            // RGW writes no marker over a marker: the answer names none, read from the
            // key's history.
            if self.rgw() && self.facts.dest_versioned && after_marker {
                self.add("ListObjectVersions", 1);
            }
            return false;
        }
        let server_side = self.settings.server_side() && !t.stream_only;
        if self.across(server_side) {
            self.bytes_across += t.size;
        } else {
            self.bytes_within += t.size;
        }
        if server_side && self.one_request(t) {
            self.one_request = true;
            self.add("CopyObject", 1);
            return self.copy_answer(last_open);
        }
        self.add("HeadObject", 1);
        let mut c = self.settings.copy.clone();
        let budget = self.budget();
        if !server_side {
            c.part_size = c.part_size.min(budget).max(MIN_PART);
        }
        let source = SourceUpload::of(t.etag.as_deref(), true);
        let multipart = matches!(source, SourceUpload::Multipart(_));
        // A multipart source's checksum is composite unless it is a full-object one (CRC64NVME
        // always is; a listing does not tell for the others).
        let composite = multipart
            && t.checksum_algorithm
                .as_deref()
                .is_some_and(|a| a != "CRC64NVME");
        let route = if server_side {
            Route::ServerSide {
                whole_multipart: !composite && self.whole_multipart(),
            }
        } else {
            Route::Stream { budget }
        };
        match choose_plan(false, t.size, source, route, &c) {
            CopyPlan::Copy => {
                self.add("CopyObject", 1);
                let learned = self.copy_answer(last_open);
                if !multipart {
                    return learned;
                }
                // The new version's ETag is checked: RGW's answer names it (kept), elsewhere
                // a HEAD reads it.
                if !self.rgw() {
                    self.add("HeadObject", 1);
                }
                let redo = self.settings.copy.large_copy == LargeCopy::Auto
                    && !self.rgw()
                    && !self.whole_copy_checked;
                if redo {
                    // The server gave it a new ETag: the copy is removed and made again in
                    // parts, as are the later multipart sources of the run.
                    self.whole_copy_checked = true;
                    if self.facts.dest_versioned {
                        self.add("DeleteObject", 1);
                    }
                    self.multipart(t, source, &c, true);
                    return false;
                }
                learned
            }
            CopyPlan::Stream => {
                self.add("GetObject", 1);
                self.add("GetObjectTagging", 1);
                self.add("PutObject", 1);
                false
            }
            CopyPlan::MultipartCopy => {
                self.multipart(t, source, &c, true);
                false
            }
            CopyPlan::MultipartStream => {
                self.multipart(t, source, &c, false);
                false
            }
            CopyPlan::DeleteMarker => false,
        }
    }

    /// After a CopyObject: on a server whose answer names no version (RGW), a key's last
    /// version's id is learned later from a listing (true), another's with a HEAD.
    fn copy_answer(&mut self, last_open: bool) -> bool {
        if !self.rgw() || !self.facts.dest_versioned {
            return false;
        }
        if last_open {
            return true;
        }
        self.add("HeadObject", 1);
        false
    }

    /// `--large-copy` for a multipart source (as `Copier::whole_multipart`).
    fn whole_multipart(&self) -> bool {
        // A server other than RGW is taken to change such ETags once a copy was checked.
        self.settings.copy.large_copy.whole_multipart(
            self.settings.dest_side.endpoint.as_deref(),
            !self.rgw() && self.whole_copy_checked,
        )
    }

    /// The one-request copy (as `Copier::one_request`, the source's object lock as probed).
    fn one_request(&self, t: &EstTask) -> bool {
        let c = &self.settings.copy;
        let ruled = self.settings.destination(t.dest).rule.is_some();
        let plan = choose_plan(
            false,
            t.size,
            SourceUpload::of(t.etag.as_deref(), true),
            Route::ServerSide {
                whole_multipart: false,
            },
            c,
        );
        !(c.stamp
            || ruled
            || t.version_id == "null"
            || c.sse.is_none()
            || plan != CopyPlan::Copy
            || matches!(
                t.storage_class.as_deref(),
                Some("GLACIER" | "DEEP_ARCHIVE" | "INTELLIGENT_TIERING")
            )
            || self.facts.source_lock)
    }

    /// A multipart copy (as `Copier::multipart`): the layout's HEADs, the tags of a stream,
    /// the upload and its parts, the HEADs after completing.
    fn multipart(
        &mut self,
        t: &EstTask,
        source: SourceUpload,
        c: &crate::config::CopyOptions,
        server_side: bool,
    ) {
        let budget = self.budget();
        let fits = |p: u64| server_side || p <= budget;
        let fallback = choose_layout(t.size, c.part_size, None).parts;
        let parts = match source {
            SourceUpload::Multipart(n) => {
                // HEADs of part 1 and part n.
                self.add("HeadObject", if n > 1 { 2 } else { 1 });
                if self.rgw() {
                    // Hidden: inferred, the first candidate assumed to compose the ETag.
                    match infer_part_sizes(t.size, n).into_iter().find(|p| fits(*p)) {
                        Some(_) => n,
                        None => fallback,
                    }
                } else {
                    n
                }
            }
            _ => fallback,
        };
        if !server_side {
            self.add("GetObjectTagging", 1);
        }
        self.add("CreateMultipartUpload", 1);
        if server_side {
            self.add("UploadPartCopy", parts);
        } else {
            self.add("GetObject", parts);
            self.add("UploadPart", parts);
        }
        if t.version_id == "null" {
            self.add("HeadObject", 1);
        }
        self.add("CompleteMultipartUpload", 1);
        if self.rgw() {
            // The answer has no ETag: read back with a HEAD.
            self.add("HeadObject", 1);
        }
        if t.checksum_algorithm.is_some() {
            self.add("HeadObject", 1);
        }
    }

    /// The estimate, priced; `timing`: the request latency and where it comes from, and
    /// the requests in flight.
    pub fn finish(mut self, prices: &Prices, timing: Timing) -> Estimate {
        for l in self.learning.values_mut() {
            l.close(false);
        }
        let listings: u64 = self.learning.values().map(|l| l.listings).sum();
        self.add("ListObjectVersions", listings);
        // The run's probes: each bucket's HeadBucket and GetBucketVersioning.
        let mut buckets: Vec<&str> = std::iter::once(self.settings.dest.bucket.as_str())
            .chain(self.settings.destinations.iter().map(|d| d.bucket.as_str()))
            .collect();
        buckets.sort();
        buckets.dedup();
        let probes = 1 + buckets.len() as u64;
        self.add("HeadBucket", probes);
        self.add("GetBucketVersioning", probes);
        if self.one_request {
            self.add("GetObjectLockConfiguration", 1);
        }
        let operations: BTreeMap<String, OpEstimate> = OPERATIONS
            .iter()
            .filter_map(|op| {
                let n = *self.counts.get(op)?;
                Some((
                    op.to_string(),
                    OpEstimate {
                        requests: n,
                        dollars: n as f64 * prices.per_request(op),
                    },
                ))
            })
            .collect();
        let requests: u64 = operations.values().map(|o| o.requests).sum();
        let transfer_dollars = self.bytes_across as f64 / GB * prices.transfer_across_per_gb;
        let dollars = operations.values().map(|o| o.dollars).sum::<f64>() + transfer_dollars;
        let seconds =
            requests as f64 * timing.latency_ms / 1000.0 / timing.concurrency.max(1) as f64;
        Estimate {
            tasks: self.tasks,
            server: self.facts.server.as_str().to_string(),
            prices: prices.label(),
            operations,
            requests,
            bytes_within: self.bytes_within,
            bytes_across: self.bytes_across,
            transfer_dollars,
            dollars,
            latency_ms: timing.latency_ms,
            latency_from: timing.from,
            concurrency: timing.concurrency,
            seconds,
            left_out: LEFT_OUT.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// What the estimate leaves out (cannot be known before running).
pub const LEFT_OUT: [&str; 4] = [
    "retries (every attempt is a request) and throttling",
    "reconciliation after a crash, an interrupted run or an ambiguous write (a ListObjectVersions, ListMultipartUploads and aborts per task in doubt)",
    "tags: a listing does not say which versions have some (a server-side copy of a version with tags reads both tag sets: 2 GetObjectTagging, and 1 PutObjectTagging where the server dropped them)",
    "archived versions (GLACIER, DEEP_ARCHIVE): their HEAD says so and they are skipped or restored",
];

/// The request latency and concurrency an estimate's time is computed from.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Milliseconds per request.
    pub latency_ms: f64,
    /// Where that figure comes from.
    pub from: String,
    /// Requests in flight.
    pub concurrency: u64,
}

/// The latency used when none was measured or given.
pub const DEFAULT_LATENCY_MS: f64 = 20.0;

/// One operation's requests and dollars.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpEstimate {
    /// Requests.
    pub requests: u64,
    /// Dollars.
    pub dollars: f64,
}

/// What one run of every task of a job will cost (`status --json`'s `estimate`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// Tasks counted.
    pub tasks: u64,
    /// The server profile (`--server`).
    pub server: String,
    /// The price table used: name (date).
    pub prices: String,
    /// Requests and dollars per operation (only those the run sends).
    pub operations: BTreeMap<String, OpEstimate>,
    /// Requests in all.
    pub requests: u64,
    /// Bytes copied within one provider (server-side, or streamed on one endpoint).
    pub bytes_within: u64,
    /// Bytes streamed from one provider to another.
    pub bytes_across: u64,
    /// Dollars of the bytes across providers.
    pub transfer_dollars: f64,
    /// Dollars in all.
    pub dollars: f64,
    /// Milliseconds per request the time assumes.
    pub latency_ms: f64,
    /// Where the latency comes from.
    pub latency_from: String,
    /// Requests in flight the time assumes.
    pub concurrency: u64,
    /// Seconds: requests x latency / concurrency.
    pub seconds: f64,
    /// What the estimate leaves out.
    pub left_out: Vec<String>,
}

fn dollars(d: f64) -> String {
    if d == 0.0 {
        "$0".into()
    } else if d < 0.01 {
        format!("${d:.6}")
    } else if d < 1.0 {
        format!("${d:.4}")
    } else {
        format!("${d:.2}")
    }
}

fn seconds(s: f64) -> String {
    let s = s.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

impl Estimate {
    /// The text `plan --dry-run` and `status` print; `counted`: the requests the runs
    /// counted (shown beside the estimate).
    pub fn lines(&self, counted: Option<&BTreeMap<String, u64>>) -> Vec<String> {
        let mut out = vec![format!(
            "estimate for one run of {} tasks (server {}, prices {}):",
            self.tasks, self.server, self.prices
        )];
        let counted = counted.filter(|c| !c.is_empty());
        out.push(match counted {
            Some(_) => format!(
                "  {:<28} {:>12} {:>14} {:>12}",
                "operation", "requests", "dollars", "counted"
            ),
            None => format!("  {:<28} {:>12} {:>14}", "operation", "requests", "dollars"),
        });
        let mut ops: Vec<&str> = self.operations.keys().map(String::as_str).collect();
        if let Some(c) = counted {
            ops.extend(c.keys().map(String::as_str));
        }
        let ops: Vec<&str> = OPERATIONS
            .iter()
            .copied()
            .filter(|o| ops.contains(o))
            .collect();
        for op in ops {
            let e = self.operations.get(op);
            let (n, d) = e.map_or((0, 0.0), |e| (e.requests, e.dollars));
            let mut line = format!("  {op:<28} {n:>12} {:>14}", dollars(d));
            if let Some(c) = counted {
                line.push_str(&format!(" {:>12}", c.get(op).copied().unwrap_or(0)));
            }
            out.push(line);
        }
        let mut total = format!(
            "  {:<28} {:>12} {:>14}",
            "all requests",
            self.requests,
            dollars(self.dollars - self.transfer_dollars)
        );
        if let Some(c) = counted {
            total.push_str(&format!(" {:>12}", c.values().sum::<u64>()));
        }
        out.push(total);
        out.push(format!(
            "  bytes: {} within one provider, {} across providers ({})",
            indicatif::HumanBytes(self.bytes_within),
            indicatif::HumanBytes(self.bytes_across),
            dollars(self.transfer_dollars)
        ));
        out.push(format!("  total: {}", dollars(self.dollars)));
        out.push(format!(
            "  time: about {} at {} requests in flight and {:.1} ms per request ({})",
            seconds(self.seconds),
            self.concurrency,
            self.latency_ms,
            self.latency_from
        ));
        out.push(format!("  left out: {}", self.left_out.join("; ")));
        out
    }
}

/// What `plan` found for the estimate (stored with the job).
#[derive(Clone, Copy, Debug, Default)]
pub struct PlanProbe {
    /// The destination answered as Ceph RGW does.
    pub rgw: bool,
    /// The destination keeps versions.
    pub dest_versioned: bool,
    /// The source bucket's object lock, where it was read.
    pub source_lock: Option<bool>,
    /// The mean time of the plan's listing requests, and their number.
    pub listing: Option<(std::time::Duration, u64)>,
}

/// Stores what a plan found and what its flags chose (a later `status` estimates from it).
pub fn store_plan_facts(
    m: &Manifest,
    args: &EstimateArgs,
    probe: PlanProbe,
) -> Result<(), ManifestError> {
    let server = args.server.unwrap_or(if probe.rgw {
        Server::CephRgw
    } else {
        Server::S3
    });
    m.store_estimate_fact("server", server.as_str())?;
    m.store_estimate_fact("dest_versioned", &probe.dest_versioned.to_string())?;
    if let Some(lock) = probe.source_lock {
        m.store_estimate_fact("source_lock", &lock.to_string())?;
    }
    if let Some((mean, n)) = probe.listing {
        let ms = mean.as_secs_f64() * 1000.0;
        m.store_estimate_fact("latency_ms", &format!("{ms:.3}"))?;
        m.store_estimate_fact("latency_listings", &n.to_string())?;
    }
    if let Some(p) = &args.prices {
        let json = serde_json::to_string(p).unwrap_or_default();
        m.store_estimate_fact("prices", &json)?;
    }
    Ok(())
}

/// The price table: the one given, else the one stored with the job, else the built-in one.
pub fn prices_of(stored: &BTreeMap<String, String>, given: Option<&Prices>) -> Prices {
    given
        .cloned()
        .or_else(|| stored.get("prices").and_then(|j| Prices::from_json(j).ok()))
        .unwrap_or_else(Prices::builtin)
}

/// The estimate's facts and timing: the flags first, then what `plan` stored, then defaults.
pub fn inputs_of(stored: &BTreeMap<String, String>, args: &EstimateArgs) -> (Facts, Timing) {
    let flag = |name: &str| stored.get(name).map(|v| v == "true");
    let facts = Facts {
        dest_versioned: flag("dest_versioned").unwrap_or(true),
        source_lock: flag("source_lock").unwrap_or(false),
        server: args
            .server
            .or_else(|| stored.get("server").and_then(|s| Server::parse(s)))
            .unwrap_or_default(),
        ..Facts::default()
    };
    let measured = stored
        .get("latency_ms")
        .and_then(|v| v.parse::<f64>().ok())
        .map(|ms| {
            let n = stored.get("latency_listings").map_or("?", String::as_str);
            (
                ms,
                format!("measured: the mean of the plan's {n} listing requests"),
            )
        });
    let (latency_ms, from) = match (args.latency, measured) {
        (Some(d), _) => (d.as_secs_f64() * 1000.0, "given: --latency".to_string()),
        (None, Some(m)) => m,
        (None, None) => (
            DEFAULT_LATENCY_MS,
            "default: no listing was timed; give --latency".to_string(),
        ),
    };
    let timing = Timing {
        latency_ms,
        from,
        concurrency: args.estimate_concurrency as u64,
    };
    (facts, timing)
}

/// The estimate of one run over every task of a job, from its manifest: the counts stored
/// by [`store_estimate`] when they are still the job's (the same tasks, settings and server),
/// priced now; else from one scan of every task (about 2.5 s per million tasks, see the
/// manifest bench).
pub fn of_manifest(
    m: &Manifest,
    settings: &JobSettings,
    args: &EstimateArgs,
    tasks_now: u64,
) -> Result<Estimate, ManifestError> {
    let stored = m.estimate_facts()?;
    let (facts, timing) = inputs_of(&stored, args);
    let prices = prices_of(&stored, args.prices.as_ref());
    let kept = stored
        .get("estimate")
        .and_then(|j| serde_json::from_str::<Estimate>(j).ok())
        .filter(|e| e.tasks == tasks_now && e.server == facts.server.as_str())
        .filter(|_| stored.get("estimate_settings") == Some(&settings_key(settings)));
    if let Some(e) = kept {
        return Ok(e.priced(&prices, timing));
    }
    let mut b = Builder::new(settings, facts);
    let mut tasks: Vec<EstTask> = Vec::new();
    m.for_each_key(|key, ts| {
        tasks.clear();
        tasks.extend(ts.iter().map(EstTask::from));
        b.key(key, &tasks);
    })?;
    Ok(b.finish(&prices, timing))
}

/// What the stored counts depend on in the settings.
fn settings_key(settings: &JobSettings) -> String {
    serde_json::to_string(settings).unwrap_or_default()
}

/// Counts the job's estimate once (after `plan`) and stores it, so that `status` need not
/// scan every task again.
pub fn store_estimate(
    m: &Manifest,
    settings: &JobSettings,
    args: &EstimateArgs,
    tasks_now: u64,
) -> Result<(), ManifestError> {
    let e = of_manifest(m, settings, args, u64::MAX)?;
    if e.tasks != tasks_now {
        return Ok(());
    }
    m.store_estimate_fact("estimate", &serde_json::to_string(&e).unwrap_or_default())?;
    m.store_estimate_fact("estimate_settings", &settings_key(settings))
}

impl Estimate {
    /// The same counts priced by `prices`, timed by `timing`.
    pub fn priced(mut self, prices: &Prices, timing: Timing) -> Estimate {
        for (op, o) in self.operations.iter_mut() {
            o.dollars = o.requests as f64 * prices.per_request(op);
        }
        self.transfer_dollars = self.bytes_across as f64 / GB * prices.transfer_across_per_gb;
        self.dollars =
            self.operations.values().map(|o| o.dollars).sum::<f64>() + self.transfer_dollars;
        self.seconds =
            self.requests as f64 * timing.latency_ms / 1000.0 / timing.concurrency.max(1) as f64;
        self.prices = prices.label();
        self.latency_ms = timing.latency_ms;
        self.latency_from = timing.from;
        self.concurrency = timing.concurrency;
        self
    }
}

/// Feeds a dry run's listing (each key's history newest first, keys in order) to a
/// [`Builder`]: a key's tasks are given oldest first once its history ends.
pub struct ListingFeed<'a> {
    builder: Builder<'a>,
    key: Option<String>,
    /// The key's selected entries so far, newest first, with their destinations.
    history: Vec<(EstTask, u32)>,
}

impl<'a> ListingFeed<'a> {
    /// A feed into `builder`.
    pub fn new(builder: Builder<'a>) -> ListingFeed<'a> {
        ListingFeed {
            builder,
            key: None,
            history: Vec::new(),
        }
    }

    /// One listed entry and its destinations.
    pub fn entry(&mut self, e: &crate::s3::VersionEntry, dests: &[i64]) {
        if self.key.as_deref() != Some(e.key.as_str()) {
            self.flush();
            self.key = Some(e.key.clone());
        }
        let pos = self.history.len() as u32;
        for d in dests {
            self.history.push((EstTask::from((e, *d)), pos));
        }
    }

    fn flush(&mut self) {
        let Some(key) = self.key.take() else { return };
        // Oldest first, then by destination (the manifest's order).
        let mut h = std::mem::take(&mut self.history);
        h.sort_by_key(|(t, pos)| (std::cmp::Reverse(*pos), t.dest));
        let tasks: Vec<EstTask> = h.into_iter().map(|(t, _)| t).collect();
        if !tasks.is_empty() {
            self.builder.key(&key, &tasks);
        }
    }

    /// The estimate.
    pub fn finish(mut self, prices: &Prices, timing: Timing) -> Estimate {
        self.flush();
        self.builder.finish(prices, timing)
    }
}

#[cfg(test)]
mod tests;
