//! metrics: the `--metrics ADDR:PORT` endpoint of `run`, `replicate` and `follow`:
//! OpenMetrics text (prometheus-client's encoder) at `GET /metrics`, served with hyper.
//!
//! What the manifest knows is read from the manifest at each scrape, through a connection of
//! the endpoint's own (tasks and bytes by destination bucket and state, blocked, archived,
//! retries, the listing, refresh generation, requests of all runs, the lag histogram), so
//! the numbers are those `status --json` prints. What only this process knows (requests by
//! side, operation and outcome, retries and throttling answers, the bound on requests in
//! flight) comes from the run's S3 handles, handed over as a [`Live`] once they exist.
//!
//! [`serve`] binds at once (a port in use is an error before any work) and serves until the
//! [`MetricsServer`] is dropped; [`MetricsServer::attach`] adds the live counters.
//!
//! May call: `manifest`, `s3` (the handles' counters).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use crate::manifest::{BucketStateCount, LagHistogram, Manifest, ManifestError};
use crate::s3::{ErrorClass, S3Client, Side, Sides};

/// The upper bounds (seconds) of the replication latency histogram's buckets: 0.1 s to 1 h
/// (`+Inf` is added).
pub const LAG_BOUNDS_SECS: [f64; 16] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 2700.0,
    3600.0,
];

/// The content type of the answer (OpenMetrics text).
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why the endpoint cannot start.
#[derive(Debug, thiserror::Error)]
#[error("--metrics {addr}: cannot listen: {source}")]
pub struct MetricsError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Requests of one side and operation with one outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestCount {
    /// The side the request went to.
    pub side: Side,
    /// The S3 operation.
    pub op: &'static str,
    /// `ok`, or the error class of a failed attempt (`retryable`, `throttled`, `fatal`,
    /// `source-gone`, `archived`).
    pub outcome: &'static str,
    /// Requests (attempts).
    pub count: u64,
}

/// What this process counted (since it started), read at each scrape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LiveCounts {
    /// Requests by side, operation and outcome.
    pub requests: Vec<RequestCount>,
    /// Retries by side (source, destination).
    pub retries: [u64; 2],
    /// Throttling answers by side (source, destination).
    pub throttles: [u64; 2],
    /// The bound on requests in flight now (it halves on throttling).
    pub in_flight_limit: u64,
}

/// The live counters of a run: reads its S3 handles at each scrape.
#[derive(Clone)]
pub struct Live(Arc<dyn Fn() -> LiveCounts + Send + Sync>);

impl Live {
    /// The counters of a run's two handles: each side's requests, failed attempts and
    /// retries (counted by its client), and the bound on requests in flight they share.
    pub fn of<C: S3Client + Clone + Send + Sync + 'static>(sides: &Sides<C>) -> Live {
        let sides = sides.clone();
        Live(Arc::new(move || live_counts(&sides)))
    }
}

fn side_index(side: Side) -> usize {
    match side {
        Side::Source => 0,
        Side::Dest => 1,
    }
}

fn live_counts<C: S3Client>(sides: &Sides<C>) -> LiveCounts {
    let mut out = LiveCounts {
        in_flight_limit: sides.dest.limiter().current_limit() as u64,
        ..LiveCounts::default()
    };
    for handle in [&sides.source, &sides.dest] {
        let (side, counts) = (handle.side(), handle.requests());
        let i = side_index(side);
        let outcomes = counts.outcomes();
        out.retries[i] += outcomes.retries();
        let mut failed: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (op, class, count) in outcomes.failures() {
            *failed.entry(op).or_default() += count;
            if class == ErrorClass::Throttled.as_str() {
                out.throttles[i] += count;
            }
            out.requests.push(RequestCount {
                side,
                op,
                outcome: class,
                count,
            });
        }
        for (op, n) in counts.snapshot() {
            let bad = failed.get(op).copied().unwrap_or(0);
            out.requests.push(RequestCount {
                side,
                op,
                outcome: "ok",
                count: n.saturating_sub(bad),
            });
        }
    }
    out.requests
        .sort_by_key(|r| (side_index(r.side), r.op, r.outcome));
    out
}

/// Everything one scrape shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// The `job` label.
    pub job: String,
    /// Tasks and bytes by destination bucket and state.
    pub states: Vec<BucketStateCount>,
    /// Open tasks waiting behind a failed older version of their key.
    pub blocked: u64,
    /// Skipped because the source version is archived.
    pub archived: u64,
    /// Pending until the restore of their archived source version completes.
    pub restore_pending: u64,
    /// Retries spent on tasks, all runs.
    pub task_retries: u64,
    /// Attempts started on tasks, all runs.
    pub task_attempts: u64,
    /// Requests recorded in the manifest, all runs, by operation.
    pub job_requests: BTreeMap<String, u64>,
    /// Versions and delete markers the listing saw.
    pub listed_entries: u64,
    /// Listing pages committed.
    pub listed_pages: u64,
    /// Every listing part is complete.
    pub listing_complete: bool,
    /// The last refresh generation (0: the plan's listing).
    pub refresh_generation: i64,
    /// The replication latency histogram (`follow`'s lag table) over [`LAG_BOUNDS_SECS`].
    pub lag: LagHistogram,
    /// This process's counters (None before the run's handles exist).
    pub live: Option<LiveCounts>,
}

impl Snapshot {
    /// Reads the manifest's part of a scrape.
    pub fn read(m: &Manifest, job: &str) -> Result<Snapshot, ManifestError> {
        let c = m.counts()?;
        let listing = m.listing_progress()?;
        Ok(Snapshot {
            job: job.to_string(),
            states: m.counts_by_bucket()?,
            blocked: c.blocked,
            archived: c.archived,
            restore_pending: c.restore_pending,
            task_retries: c.retries,
            task_attempts: c.attempts,
            job_requests: c.requests,
            listed_entries: c.listed_entries,
            listed_pages: listing.pages,
            listing_complete: c.listing_complete,
            refresh_generation: m.refreshes()?.last().map_or(0, |r| r.generation),
            lag: m.lag_histogram(&LAG_BOUNDS_SECS)?,
            live: None,
        })
    }
}

/// A histogram given by its cumulative counts.
#[derive(Debug)]
struct ConstHistogram<'a>(&'a LagHistogram);

impl EncodeMetric for ConstHistogram<'_> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let lag = self.0;
        // The encoder takes each bucket's own count and sums them up again.
        let mut buckets = Vec::with_capacity(LAG_BOUNDS_SECS.len() + 1);
        let mut below = 0;
        for (i, bound) in LAG_BOUNDS_SECS.iter().enumerate() {
            let at = lag.cumulative.get(i).copied().unwrap_or(below).max(below);
            buckets.push((*bound, at - below));
            below = at;
        }
        buckets.push((f64::INFINITY, lag.count.saturating_sub(below)));
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            lag.sum_secs,
            lag.count,
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// Writes one metric family: its descriptor, then one sample per label set.
fn family<'v>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels<'v>, Sample<'v>)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, unit.as_ref(), kind)?;
    for (labels, sample) in samples {
        let e = m.encode_family(&labels)?;
        match sample {
            Sample::Gauge(v) => e_gauge(e, v)?,
            Sample::Counter(v) => e_counter(e, v)?,
            Sample::Histogram(h) => ConstHistogram(h).encode(e)?,
        }
    }
    Ok(())
}

fn e_gauge(mut e: MetricEncoder, v: i64) -> Result<(), std::fmt::Error> {
    e.encode_gauge(&v)
}

fn e_counter(mut e: MetricEncoder, v: u64) -> Result<(), std::fmt::Error> {
    e.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&v, None)
}

/// One sample's value.
enum Sample<'a> {
    Gauge(i64),
    Counter(u64),
    Histogram(&'a LagHistogram),
}

fn gauge(v: u64) -> Sample<'static> {
    Sample::Gauge(i64::try_from(v).unwrap_or(i64::MAX))
}

impl prometheus_client::collector::Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let job = self.job.as_str();
        let by_state = |bytes: bool| {
            self.states.iter().map(move |r| {
                let labels = vec![
                    ("job", job),
                    ("bucket", r.bucket.as_str()),
                    ("state", r.state.as_str()),
                ];
                (labels, gauge(if bytes { r.bytes } else { r.tasks }))
            })
        };
        use MetricType::{Counter, Gauge, Histogram};
        family(
            &mut enc,
            "s3_backfill_tasks",
            "Tasks (object versions and delete markers to copy, per destination) by state: pending, in_progress, done, failed, skipped",
            None,
            Gauge,
            by_state(false),
        )?;
        family(
            &mut enc,
            "s3_backfill_object",
            "Bytes of the tasks' object versions by state",
            Some(Unit::Bytes),
            Gauge,
            by_state(true),
        )?;
        let one = |v: u64| [(vec![("job", job)], gauge(v))];
        family(
            &mut enc,
            "s3_backfill_tasks_blocked",
            "Open tasks waiting behind a failed older version of their key",
            None,
            Gauge,
            one(self.blocked),
        )?;
        family(
            &mut enc,
            "s3_backfill_tasks_archived",
            "Tasks skipped because their source version is archived",
            None,
            Gauge,
            one(self.archived),
        )?;
        family(
            &mut enc,
            "s3_backfill_tasks_restore_pending",
            "Tasks waiting for the restore of their archived source version",
            None,
            Gauge,
            one(self.restore_pending),
        )?;
        let count = |v: u64| [(vec![("job", job)], Sample::Counter(v))];
        family(
            &mut enc,
            "s3_backfill_task_retries",
            "Retries spent on tasks, all runs (the manifest's count)",
            None,
            Counter,
            count(self.task_retries),
        )?;
        family(
            &mut enc,
            "s3_backfill_task_attempts",
            "Attempts started on tasks, all runs (the manifest's count)",
            None,
            Counter,
            count(self.task_attempts),
        )?;
        family(
            &mut enc,
            "s3_backfill_job_requests",
            "S3 requests recorded in the manifest by operation, all runs (both sides)",
            None,
            Counter,
            self.job_requests.iter().map(|(op, n)| {
                (
                    vec![("job", job), ("operation", op.as_str())],
                    Sample::Counter(*n),
                )
            }),
        )?;
        family(
            &mut enc,
            "s3_backfill_listed_entries",
            "Versions and delete markers the listing saw (selected or not)",
            None,
            Gauge,
            one(self.listed_entries),
        )?;
        family(
            &mut enc,
            "s3_backfill_listed_pages",
            "Listing pages committed",
            None,
            Gauge,
            one(self.listed_pages),
        )?;
        family(
            &mut enc,
            "s3_backfill_listing_complete",
            "1 once every listing part is complete, else 0",
            None,
            Gauge,
            one(u64::from(self.listing_complete)),
        )?;
        family(
            &mut enc,
            "s3_backfill_refresh_generation",
            "The last listing generation (0: the plan's listing; then one per refresh)",
            None,
            Gauge,
            [(vec![("job", job)], Sample::Gauge(self.refresh_generation))],
        )?;
        family(
            &mut enc,
            "s3_backfill_replication_latency",
            "Replication latency of the versions follow wrote: destination write completed minus the source version's last-modified",
            Some(Unit::Seconds),
            Histogram,
            [(vec![("job", job)], Sample::Histogram(&self.lag))],
        )?;
        let Some(live) = &self.live else {
            return Ok(());
        };
        family(
            &mut enc,
            "s3_backfill_requests",
            "S3 requests (attempts) of this process by side, operation and outcome (ok, or the error class)",
            None,
            Counter,
            live.requests.iter().map(|r| {
                let side = side_name(r.side);
                (
                    vec![
                        ("job", job),
                        ("side", side),
                        ("operation", r.op),
                        ("outcome", r.outcome),
                    ],
                    Sample::Counter(r.count),
                )
            }),
        )?;
        let by_side = |v: [u64; 2]| {
            [Side::Source, Side::Dest].map(|s| {
                (
                    vec![("job", job), ("side", side_name(s))],
                    Sample::Counter(v[side_index(s)]),
                )
            })
        };
        family(
            &mut enc,
            "s3_backfill_retries",
            "Requests of this process repeated after a retryable failure, by side",
            None,
            Counter,
            by_side(live.retries),
        )?;
        family(
            &mut enc,
            "s3_backfill_throttles",
            "Throttling answers (SlowDown, 503) this process received, by side",
            None,
            Counter,
            by_side(live.throttles),
        )?;
        family(
            &mut enc,
            "s3_backfill_requests_in_flight_limit",
            "The bound on requests in flight now (halves on throttling, grows back)",
            None,
            Gauge,
            one(live.in_flight_limit),
        )?;
        Ok(())
    }
}

fn side_name(s: Side) -> &'static str {
    match s {
        Side::Source => "source",
        Side::Dest => "dest",
    }
}

/// The OpenMetrics text of a snapshot (ends with `# EOF`).
pub fn encode(s: &Snapshot) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(s.clone()));
    let mut out = String::new();
    // Writing to a String cannot fail; an encoder error would be a bug in a metric above.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::error!("metrics: encoding failed: {e}");
    }
    out
}

/// What the endpoint's scrapes share: the manifest (a connection of their own, opened at
/// the first scrape), the job label, and the live counters once attached.
struct Source {
    path: PathBuf,
    job: String,
    manifest: Mutex<Option<Manifest>>,
    live: Mutex<Option<Live>>,
}

impl Source {
    /// One scrape's text, or the error that stopped it (a 500).
    fn scrape(&self) -> Result<String, ManifestError> {
        let mut conn = self.manifest.lock().expect("metrics manifest lock");
        let m = match conn.take() {
            Some(m) => m,
            None => Manifest::open(&self.path, false)?,
        };
        let snap = Snapshot::read(&m, &self.job);
        // A connection that failed is opened again at the next scrape.
        if snap.is_ok() {
            *conn = Some(m);
        }
        drop(conn);
        let mut snap = snap?;
        let live = self.live.lock().expect("metrics live lock").clone();
        snap.live = live.map(|l| (l.0)());
        Ok(encode(&snap))
    }
}

/// The endpoint, served until dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    source: Arc<Source>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl MetricsServer {
    /// The address it listens on (the port chosen when `:0` was asked).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds this process's live counters to every later scrape.
    pub fn attach(&self, live: Live) {
        *self.source.live.lock().expect("metrics live lock") = Some(live);
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Binds `addr` now and serves `GET /metrics` for the job of `manifest` (labelled `job`)
/// until the returned server is dropped. Must be called inside the tokio runtime.
pub fn serve(addr: SocketAddr, manifest: &Path, job: &str) -> Result<MetricsServer, MetricsError> {
    let err = |source| MetricsError { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(err)?;
    let source = Arc::new(Source {
        path: manifest.to_path_buf(),
        job: job.to_string(),
        manifest: Mutex::new(None),
        live: Mutex::new(None),
    });
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(accept(listener, Arc::clone(&source), stopped));
    Ok(MetricsServer {
        addr: bound,
        source,
        stop,
    })
}

/// Accepts connections until stopped; each is served on a task of its own, which ends with
/// the server too.
async fn accept(
    listener: tokio::net::TcpListener,
    source: Arc<Source>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = stopped.changed() => return,
        };
        let Ok((stream, _)) = conn else { continue };
        let source = Arc::clone(&source);
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let service = hyper::service::service_fn(move |req| {
                let source = Arc::clone(&source);
                async move { Ok::<_, std::convert::Infallible>(answer(req, source).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
            tokio::select! {
                _ = conn => {}
                _ = stopped.changed() => {}
            }
        });
    }
}

type Body = http_body_util::Full<bytes::Bytes>;

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    source: Arc<Source>,
) -> hyper::Response<Body> {
    let reply = |status: u16, ctype: &str, body: String| {
        hyper::Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, ctype)
            .body(Body::new(body.into()))
            .expect("a valid response")
    };
    let text = "text/plain; charset=utf-8";
    if req.uri().path() != "/metrics" {
        return reply(404, text, "not found: the metrics are at /metrics\n".into());
    }
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return reply(405, text, "only GET\n".into());
    }
    match tokio::task::spawn_blocking(move || source.scrape()).await {
        Ok(Ok(body)) => reply(200, CONTENT_TYPE, body),
        Ok(Err(e)) => reply(500, text, format!("{e}\n")),
        Err(e) => reply(500, text, format!("the scrape failed: {e}\n")),
    }
}

#[cfg(test)]
mod tests;
