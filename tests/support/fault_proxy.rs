//! Seeded fault-injecting HTTP/1.1 reverse proxy for integration tests.
//!
//! The proxy listens on `127.0.0.1`, forwards every request to a plain-http
//! upstream (a local moto, RGW or in-memory S3 server) and, for a seeded share of
//! requests, injects a fault instead: an S3 `SlowDown`/`InternalError` reply,
//! a dropped connection before or after the request reached upstream, a
//! truncated response body, an added delay, or a stall (no answer at all, before
//! or after upstream acted). Faults can be aimed at some S3 operations only
//! ([`FaultProxy::target_ops`], e.g. [`S3Op::WRITES`]). It can also emulate a
//! bucket that lives in another AWS region ([`FaultProxy::set_region`]): requests
//! signed for any other region get S3's `301 PermanentRedirect`. Point an S3
//! client (path-style, plain http) at [`FaultProxy::endpoint`] to exercise its
//! retry, timeout, reconciliation and region logic.
//!
//! The proxy always runs on its own thread with a small current-thread tokio
//! runtime, so it keeps working both from async tests and from synchronous
//! tests that block (for example on a child process). It calls nothing of the
//! crate under test: only hyper, tokio and the upstream server over loopback.
#![allow(dead_code)]

use std::collections::HashMap;
use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

type BoxError = Box<dyn StdError + Send + Sync>;
type UpstreamSender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Most idle upstream connections kept for reuse.
const MAX_IDLE_UPSTREAM: usize = 128;
/// Pause between sending the first half of a truncated body and aborting, so
/// the partial data is flushed to the client before the connection closes.
const TRUNCATE_PAUSE: Duration = Duration::from_millis(50);
/// Longest a stalled request is held before its connection is reset anyway. A stall
/// also ends when the client closes its connection, or when the proxy is dropped.
const STALL_LIMIT: Duration = Duration::from_secs(600);
/// Number of [`Fault`] kinds.
const FAULT_KINDS: usize = 8;

/// A kind of fault the proxy can inject into a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Not forwarded; answered with `503 SlowDown` (S3 XML error body).
    SlowDown,
    /// Not forwarded; answered with `500 InternalError` (S3 XML error body).
    InternalError,
    /// Not forwarded; the client connection is reset without any response.
    ResetBeforeForward,
    /// A lost answer after the server acted: forwarded, upstream's whole response
    /// is read, then the client connection is reset without any response.
    ResetAfterForward,
    /// A lost answer after the server acted: forwarded; upstream's status and
    /// headers (full `Content-Length`) are sent but only about half of the body,
    /// then the connection is closed. Falls back to [`Fault::ResetAfterForward`]
    /// when the body is empty (HEAD, PutObject, UploadPart, DeleteObject answers).
    TruncateBody,
    /// Sleeps for [`FaultConfig::delay`], then forwards normally.
    Delay,
    /// The request is read in full but never forwarded nor answered: the
    /// connection stays open (until the client closes it), as a server that
    /// accepted and hangs. Only a client-side per-attempt timeout gets past it.
    Stall,
    /// Forwarded and executed upstream, upstream's answer is read, and then the
    /// client gets nothing, as with [`Fault::Stall`]: a timeout after the server acted.
    StallAfterForward,
}

impl Fault {
    /// Every kind that ends a request by itself (all but the two stalls): what a client
    /// without per-attempt timeouts can survive.
    pub const ALL: [Fault; 6] = [
        Fault::SlowDown,
        Fault::InternalError,
        Fault::ResetBeforeForward,
        Fault::ResetAfterForward,
        Fault::TruncateBody,
        Fault::Delay,
    ];

    /// Every kind, stalls included.
    pub const EVERY: [Fault; FAULT_KINDS] = [
        Fault::SlowDown,
        Fault::InternalError,
        Fault::ResetBeforeForward,
        Fault::ResetAfterForward,
        Fault::TruncateBody,
        Fault::Delay,
        Fault::Stall,
        Fault::StallAfterForward,
    ];

    /// The kinds where upstream executed the request but the client never learns
    /// its outcome.
    pub const LOST_ANSWERS: [Fault; 3] = [
        Fault::ResetAfterForward,
        Fault::TruncateBody,
        Fault::StallAfterForward,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// Whether upstream sees the request.
    fn forwards(self) -> bool {
        !matches!(
            self,
            Fault::SlowDown | Fault::InternalError | Fault::ResetBeforeForward | Fault::Stall
        )
    }
}

/// The S3 operation of a request, recognised from its method, path-style path, query
/// parameter names and `x-amz-copy-source` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum S3Op {
    ListBuckets,
    CreateBucket,
    DeleteBucket,
    HeadBucket,
    GetBucketLocation,
    GetBucketVersioning,
    PutBucketVersioning,
    ListObjectVersions,
    ListObjects,
    ListMultipartUploads,
    DeleteObjects,
    /// Any other bucket-level request (policy, tagging, object lock, ...).
    OtherBucketOp,
    HeadObject,
    GetObject,
    GetObjectTagging,
    PutObjectTagging,
    PutObject,
    CopyObject,
    DeleteObject,
    CreateMultipartUpload,
    UploadPart,
    UploadPartCopy,
    CompleteMultipartUpload,
    AbortMultipartUpload,
    ListParts,
    /// Any other object-level request (ACL, retention, restore, attributes, ...).
    OtherObjectOp,
}

impl S3Op {
    /// The requests that create an object version or a delete marker.
    pub const WRITES: [S3Op; 4] = [
        S3Op::PutObject,
        S3Op::CopyObject,
        S3Op::DeleteObject,
        S3Op::CompleteMultipartUpload,
    ];

    fn bit(self) -> u64 {
        1u64 << (self as u32)
    }

    /// Classifies a path-style request.
    pub fn of(method: &Method, path: &str, query: &str, copy_source: bool) -> S3Op {
        let has = |name: &str| query.split('&').any(|p| p.split('=').next() == Some(name));
        let rest = path.trim_start_matches('/');
        if rest.is_empty() {
            return S3Op::ListBuckets;
        }
        let object_level = rest.split_once('/').is_some_and(|(_, k)| !k.is_empty());
        if object_level {
            Self::object_op(method, &has, copy_source)
        } else {
            Self::bucket_op(method, &has)
        }
    }

    fn bucket_op(method: &Method, has: &dyn Fn(&str) -> bool) -> S3Op {
        let other = [
            "acl",
            "policy",
            "tagging",
            "object-lock",
            "encryption",
            "lifecycle",
        ];
        match *method {
            Method::HEAD => S3Op::HeadBucket,
            Method::GET if has("versioning") => S3Op::GetBucketVersioning,
            Method::GET if has("location") => S3Op::GetBucketLocation,
            Method::GET if has("versions") => S3Op::ListObjectVersions,
            Method::GET if has("uploads") => S3Op::ListMultipartUploads,
            Method::GET if other.iter().any(|o| has(o)) => S3Op::OtherBucketOp,
            Method::GET => S3Op::ListObjects,
            Method::PUT if has("versioning") => S3Op::PutBucketVersioning,
            Method::PUT if other.iter().any(|o| has(o)) => S3Op::OtherBucketOp,
            Method::PUT => S3Op::CreateBucket,
            Method::POST if has("delete") => S3Op::DeleteObjects,
            Method::DELETE if other.iter().any(|o| has(o)) => S3Op::OtherBucketOp,
            Method::DELETE => S3Op::DeleteBucket,
            _ => S3Op::OtherBucketOp,
        }
    }

    fn object_op(method: &Method, has: &dyn Fn(&str) -> bool, copy_source: bool) -> S3Op {
        let other = ["acl", "retention", "legal-hold", "attributes", "restore"];
        match *method {
            Method::HEAD => S3Op::HeadObject,
            Method::GET if has("tagging") => S3Op::GetObjectTagging,
            Method::GET if has("uploadId") => S3Op::ListParts,
            Method::GET if other.iter().any(|o| has(o)) => S3Op::OtherObjectOp,
            Method::GET => S3Op::GetObject,
            Method::PUT if has("tagging") => S3Op::PutObjectTagging,
            Method::PUT if has("uploadId") && copy_source => S3Op::UploadPartCopy,
            Method::PUT if has("uploadId") => S3Op::UploadPart,
            Method::PUT if other.iter().any(|o| has(o)) => S3Op::OtherObjectOp,
            Method::PUT if copy_source => S3Op::CopyObject,
            Method::PUT => S3Op::PutObject,
            Method::POST if has("uploads") => S3Op::CreateMultipartUpload,
            Method::POST if has("uploadId") => S3Op::CompleteMultipartUpload,
            Method::DELETE if has("uploadId") => S3Op::AbortMultipartUpload,
            Method::DELETE if has("tagging") => S3Op::OtherObjectOp,
            Method::DELETE => S3Op::DeleteObject,
            _ => S3Op::OtherObjectOp,
        }
    }

    fn of_request<B>(req: &Request<B>) -> S3Op {
        S3Op::of(
            req.method(),
            req.uri().path(),
            req.uri().query().unwrap_or_default(),
            req.headers().contains_key("x-amz-copy-source"),
        )
    }
}

/// Configuration of a [`FaultProxy`]. `FaultConfig::default()` injects nothing.
#[derive(Debug, Clone, Default)]
pub struct FaultConfig {
    /// Seed of the RNG that decides which requests get which fault.
    pub seed: u64,
    /// Share of requests that get a fault, `0.0..=1.0` (clamped).
    pub rate: f64,
    /// Fault kinds to draw from, uniformly; an empty list injects nothing.
    pub faults: Vec<Fault>,
    /// How long [`Fault::Delay`] sleeps before forwarding.
    pub delay: Duration,
    /// Requests whose path starts with this (e.g. `/bucket/private/`) are always answered
    /// 403 AccessDenied: a permanent error, as a bucket policy denying a prefix would give.
    pub deny_path_prefix: Option<String>,
    /// With [`FaultConfig::deny_path_prefix`]: deny only requests signed with this access key
    /// id, on that path or copying from it (`x-amz-copy-source`), as when one account's
    /// credentials may not read another account's bucket.
    pub deny_key_id: Option<String>,
}

/// Counters of a running [`FaultProxy`], shared with the proxy thread.
#[derive(Debug, Default)]
pub struct FaultStats {
    requests: AtomicU64,
    injected: AtomicU64,
    per_fault: [AtomicU64; FAULT_KINDS],
    redirects: AtomicU64,
    region_headers: AtomicU64,
    stalls_open: AtomicU64,
    per_op: Mutex<HashMap<S3Op, u64>>,
    per_op_fault: Mutex<HashMap<(S3Op, Fault), u64>>,
}

impl FaultStats {
    /// Number of requests received (faulted or not).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Number of requests of operation `op` received (faulted or not).
    pub fn requests_of(&self, op: S3Op) -> u64 {
        let m = self.per_op.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&op).copied().unwrap_or(0)
    }

    /// Number of requests that got a fault of any kind.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    /// Number of requests that got fault `f`.
    pub fn injected_of(&self, f: Fault) -> u64 {
        self.per_fault[f.index()].load(Ordering::SeqCst)
    }

    /// Number of requests of operation `op` that got fault `f`.
    pub fn injected_on(&self, op: S3Op, f: Fault) -> u64 {
        let m = self.per_op_fault.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&(op, f)).copied().unwrap_or(0)
    }

    /// Number of `301 PermanentRedirect` answers given by the region emulation.
    pub fn redirects(&self) -> u64 {
        self.redirects.load(Ordering::SeqCst)
    }

    /// Number of upstream answers the region emulation added `x-amz-bucket-region` to
    /// (HeadBucket) or rewrote (GetBucketLocation).
    pub fn region_answers(&self) -> u64 {
        self.region_headers.load(Ordering::SeqCst)
    }

    /// Number of stalled requests whose connection is still held open right now.
    pub fn stalls_open(&self) -> u64 {
        self.stalls_open.load(Ordering::SeqCst)
    }

    fn count_request(&self, op: S3Op) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let mut m = self.per_op.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(op).or_insert(0) += 1;
    }

    fn record(&self, op: S3Op, f: Fault) {
        self.injected.fetch_add(1, Ordering::SeqCst);
        self.per_fault[f.index()].fetch_add(1, Ordering::SeqCst);
        let mut m = self.per_op_fault.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((op, f)).or_insert(0) += 1;
    }
}

/// Regions the proxy pretends buckets live in.
#[derive(Debug, Default)]
struct Regions {
    /// Region of every bucket not named in `buckets`.
    all: Option<String>,
    buckets: HashMap<String, String>,
}

/// State shared by all connections of one proxy.
struct Shared {
    upstream: SocketAddr,
    faults: Vec<Fault>,
    delay: Duration,
    deny: Option<String>,
    deny_key_id: Option<String>,
    rate_bits: AtomicU64,
    /// Bit set of the [`S3Op`]s faults are drawn for.
    targets: AtomicU64,
    regions: Mutex<Regions>,
    rng: Mutex<StdRng>,
    stats: Arc<FaultStats>,
    idle: Mutex<Vec<UpstreamSender>>,
}

impl Shared {
    /// Draws the fault (if any) for the next request, of operation `op`.
    fn draw(&self, op: S3Op) -> Option<Fault> {
        if self.targets.load(Ordering::SeqCst) & op.bit() == 0 {
            return None;
        }
        let rate = f64::from_bits(self.rate_bits.load(Ordering::SeqCst));
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let roll: f64 = rng.random();
        if self.faults.is_empty() || roll >= rate {
            return None;
        }
        Some(self.faults[rng.random_range(0..self.faults.len())])
    }

    /// The region bucket `bucket` is emulated in, if any.
    fn region_of(&self, bucket: &str) -> Option<String> {
        let r = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        r.buckets.get(bucket).or(r.all.as_ref()).cloned()
    }
}

fn clamp_rate(rate: f64) -> f64 {
    if rate.is_nan() {
        0.0
    } else {
        rate.clamp(0.0, 1.0)
    }
}

/// A running fault-injecting proxy. Dropping it shuts the proxy down.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl FaultProxy {
    /// Binds `127.0.0.1:0` and forwards to `http://{upstream}`.
    ///
    /// The proxy runs on its own thread with its own current-thread tokio
    /// runtime (not on the caller's runtime), so it keeps serving even if the
    /// calling runtime blocks.
    pub async fn start(upstream: SocketAddr, cfg: FaultConfig) -> io::Result<FaultProxy> {
        let (tx, rx) = oneshot::channel();
        let (shared, shutdown) = spawn_proxy_thread(upstream, cfg, move |r| {
            let _ = tx.send(r);
        })?;
        let addr = rx
            .await
            .map_err(|_| io::Error::other("fault proxy thread exited during start"))??;
        Ok(FaultProxy {
            addr,
            shared,
            shutdown: Some(shutdown),
        })
    }

    /// Same as the free function [`start_blocking`], for synchronous tests.
    pub fn start_blocking(upstream: SocketAddr, cfg: FaultConfig) -> io::Result<FaultProxy> {
        start_blocking(upstream, cfg)
    }

    /// Local address the proxy listens on (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Endpoint URL for an S3 client: `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Shared counters of this proxy.
    pub fn stats(&self) -> Arc<FaultStats> {
        self.shared.stats.clone()
    }

    /// Changes the fault rate at run time (clamped to `0.0..=1.0`; `0.0` disables faults).
    pub fn set_rate(&self, rate: f64) {
        self.shared
            .rate_bits
            .store(clamp_rate(rate).to_bits(), Ordering::SeqCst);
    }

    /// Draws faults only for requests of these operations (e.g. [`S3Op::WRITES`]); the
    /// others are forwarded untouched and do not use up the seeded random sequence.
    pub fn target_ops(&self, ops: &[S3Op]) {
        let mask = ops.iter().fold(0u64, |m, op| m | op.bit());
        self.shared.targets.store(mask, Ordering::SeqCst);
    }

    /// Draws faults for every request again (the default).
    pub fn target_all_ops(&self) {
        self.shared.targets.store(u64::MAX, Ordering::SeqCst);
    }

    /// Emulates every bucket living in AWS region `region` (`None`: no emulation).
    ///
    /// A bucket-addressed request signed with SigV4 for another region is answered
    /// `301 PermanentRedirect` with `x-amz-bucket-region: REGION`, as S3 answers a
    /// request sent to the wrong region; HeadBucket answers carry that header too, and
    /// GetBucketLocation (answered whatever the signing region, as on AWS) names the
    /// region. Unsigned requests, ListBuckets and CreateBucket pass through.
    pub fn set_region(&self, region: Option<&str>) {
        let mut r = self
            .shared
            .regions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        r.all = region.map(str::to_string);
    }

    /// Like [`FaultProxy::set_region`], for one bucket (overrides the all-bucket setting).
    pub fn set_bucket_region(&self, bucket: &str, region: &str) {
        let mut r = self
            .shared
            .regions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        r.buckets.insert(bucket.to_string(), region.to_string());
    }
}

impl Drop for FaultProxy {
    /// Stops the proxy: the listener is closed and all of its connections
    /// (client and upstream) are dropped.
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Synchronous variant of [`FaultProxy::start`], for tests without a tokio
/// runtime: binds `127.0.0.1:0`, forwards to `http://{upstream}`, and serves
/// from a dedicated thread running a current-thread tokio runtime.
pub fn start_blocking(upstream: SocketAddr, cfg: FaultConfig) -> io::Result<FaultProxy> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (shared, shutdown) = spawn_proxy_thread(upstream, cfg, move |r| {
        let _ = tx.send(r);
    })?;
    let addr = rx
        .recv()
        .map_err(|_| io::Error::other("fault proxy thread exited during start"))??;
    Ok(FaultProxy {
        addr,
        shared,
        shutdown: Some(shutdown),
    })
}

/// Spawns the proxy thread; `ready` receives the bound address (or error).
fn spawn_proxy_thread(
    upstream: SocketAddr,
    cfg: FaultConfig,
    ready: impl FnOnce(io::Result<SocketAddr>) + Send + 'static,
) -> io::Result<(Arc<Shared>, oneshot::Sender<()>)> {
    if !upstream.ip().is_loopback() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "fault proxy only forwards to loopback addresses",
        ));
    }
    let shared = Arc::new(Shared {
        upstream,
        faults: cfg.faults,
        delay: cfg.delay,
        deny: cfg.deny_path_prefix,
        deny_key_id: cfg.deny_key_id,
        rate_bits: AtomicU64::new(clamp_rate(cfg.rate).to_bits()),
        targets: AtomicU64::new(u64::MAX),
        regions: Mutex::new(Regions::default()),
        rng: Mutex::new(StdRng::seed_from_u64(cfg.seed)),
        stats: Arc::new(FaultStats::default()),
        idle: Mutex::new(Vec::new()),
    });
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let thread_shared = shared.clone();
    std::thread::Builder::new()
        .name("fault-proxy".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return ready(Err(e)),
            };
            rt.block_on(async move {
                let bind = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
                let listener = match TcpListener::bind(bind).await.and_then(|l| {
                    let a = l.local_addr()?;
                    Ok((l, a))
                }) {
                    Ok((l, a)) => {
                        ready(Ok(a));
                        l
                    }
                    Err(e) => return ready(Err(e)),
                };
                let accept = tokio::spawn(accept_loop(listener, thread_shared));
                // Resolves on an explicit shutdown or when the FaultProxy is gone.
                let _ = shutdown_rx.await;
                accept.abort();
            });
            // Dropping the runtime cancels every connection task.
            drop(rt);
        })?;
    Ok((shared, shutdown_tx))
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // E.g. out of file descriptors: back off briefly and retry.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_client(stream, shared.clone()));
    }
}

/// Client socket wrapper: when `reset` is set, dropping it sends an RST
/// (SO_LINGER 0) instead of a graceful FIN.
struct ClientStream {
    inner: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        if self.reset.load(Ordering::SeqCst) {
            let _ = self.inner.set_zero_linger();
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Error returned from the service to make hyper drop the client connection.
#[derive(Debug)]
struct Abort(&'static str);

impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fault proxy: {}", self.0)
    }
}

impl StdError for Abort {}

async fn serve_client(stream: TcpStream, shared: Arc<Shared>) {
    let reset = Arc::new(AtomicBool::new(false));
    let io = TokioIo::new(ClientStream {
        inner: stream,
        reset: reset.clone(),
    });
    let svc = service_fn(move |req| handle(shared.clone(), reset.clone(), req));
    let _ = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .header_read_timeout(None)
        .serve_connection(io, svc)
        .await;
}

/// Serves one request: region emulation, then the deny rule, then a drawn fault (if
/// any) around forwarding it upstream.
async fn handle(
    shared: Arc<Shared>,
    reset: Arc<AtomicBool>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, BoxError> {
    let op = S3Op::of_request(&req);
    shared.stats.count_request(op);
    let region = bucket_of(req.uri().path()).and_then(|b| shared.region_of(b));
    if let Some(answer) = region
        .as_deref()
        .and_then(|r| wrong_region_answer(&req, op, r))
    {
        shared.stats.redirects.fetch_add(1, Ordering::SeqCst);
        let _ = req.into_body().collect().await;
        return Ok(answer);
    }
    if is_denied(&shared, &req) {
        let _ = req.into_body().collect().await;
        return Ok(s3_error(
            StatusCode::FORBIDDEN,
            "AccessDenied",
            "Access Denied",
        ));
    }
    let fault = shared.draw(op);
    if let Some(f) = fault {
        shared.stats.record(op, f);
    }
    if fault == Some(Fault::ResetBeforeForward) {
        reset.store(true, Ordering::SeqCst);
        return Err(Box::new(Abort("reset before forward")));
    }

    // Read the whole request body (this also answers `Expect: 100-continue`).
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    if let Some(answer) = answer_instead(&shared, &reset, fault).await {
        return answer;
    }
    let resp = match forward(&shared, upstream_request(&parts, body)?).await {
        Ok(r) => r,
        Err(e) => return Ok(bad_gateway(&e)),
    };
    let resp = answer_region(&shared, resp, op, region.as_deref());
    deliver(&shared, &reset, fault, resp).await
}

/// What a fault drawn for a request answers instead of forwarding it, if anything (a
/// [`Fault::Delay`] sleeps here, then lets the request go on).
async fn answer_instead(
    shared: &Shared,
    reset: &AtomicBool,
    fault: Option<Fault>,
) -> Option<Result<Response<ProxyBody>, BoxError>> {
    match fault? {
        Fault::SlowDown => Some(Ok(s3_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "SlowDown",
            "Please reduce your request rate.",
        ))),
        Fault::InternalError => Some(Ok(s3_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "We encountered an internal error. Please try again.",
        ))),
        Fault::Stall => Some(stall(shared, reset).await),
        Fault::Delay => {
            tokio::time::sleep(shared.delay).await;
            None
        }
        _ => None,
    }
}

fn bad_gateway(e: &BoxError) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(Bytes::from(format!(
        "fault proxy: upstream request failed: {e}"
    ))));
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

/// Whether the deny rule of the configuration refuses this request.
fn is_denied<B>(shared: &Shared, req: &Request<B>) -> bool {
    let Some(deny) = &shared.deny else {
        return false;
    };
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let copy_source = format!("/{}", header("x-amz-copy-source").trim_start_matches('/'));
    let on_path =
        req.uri().path().starts_with(deny.as_str()) || copy_source.starts_with(deny.as_str());
    let signer_matches = match &shared.deny_key_id {
        Some(id) => header("authorization").contains(&format!("Credential={id}/")),
        None => true,
    };
    on_path && signer_matches
}

/// The request to send upstream: the client's method, path, query, headers and body.
fn upstream_request(
    parts: &hyper::http::request::Parts,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, BoxError> {
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut up_req = Request::builder().method(parts.method.clone()).uri(path);
    if let Some(h) = up_req.headers_mut() {
        *h = parts.headers.clone();
    }
    Ok(up_req.body(Full::new(body))?)
}

/// Sends upstream's answer to the client, or loses it as `fault` says.
async fn deliver(
    shared: &Shared,
    reset: &AtomicBool,
    fault: Option<Fault>,
    resp: Response<Bytes>,
) -> Result<Response<ProxyBody>, BoxError> {
    let (mut rparts, rbody) = resp.into_parts();
    for h in [CONNECTION, TRANSFER_ENCODING] {
        rparts.headers.remove(h);
    }
    rparts.headers.remove("keep-alive");

    match fault {
        Some(Fault::ResetAfterForward) => {
            reset.store(true, Ordering::SeqCst);
            Err(Box::new(Abort("reset after forward")))
        }
        Some(Fault::TruncateBody) if rbody.is_empty() => {
            reset.store(true, Ordering::SeqCst);
            Err(Box::new(Abort(
                "reset after forward (empty body, cannot truncate)",
            )))
        }
        Some(Fault::TruncateBody) => {
            let full_len = rbody.len();
            rparts
                .headers
                .insert(CONTENT_LENGTH, HeaderValue::from(full_len as u64));
            let half = rbody.slice(..(full_len / 2).min(full_len - 1));
            Ok(Response::from_parts(rparts, ProxyBody::truncated(half)))
        }
        Some(Fault::StallAfterForward) => stall(shared, reset).await,
        _ => Ok(Response::from_parts(rparts, ProxyBody::full(rbody))),
    }
}

/// Holds a stalled request open in [`FaultStats::stalls_open`] while it lasts.
struct StallGuard(Arc<FaultStats>);

impl Drop for StallGuard {
    fn drop(&mut self) {
        self.0.stalls_open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Never answers: waits until hyper drops this request (the client closed its
/// connection, or the proxy stopped), or resets the connection after [`STALL_LIMIT`].
async fn stall(shared: &Shared, reset: &AtomicBool) -> Result<Response<ProxyBody>, BoxError> {
    shared.stats.stalls_open.fetch_add(1, Ordering::SeqCst);
    let _open = StallGuard(shared.stats.clone());
    tokio::time::sleep(STALL_LIMIT).await;
    reset.store(true, Ordering::SeqCst);
    Err(Box::new(Abort("stall limit reached")))
}

/// The bucket of a path-style request path, if it names one.
fn bucket_of(path: &str) -> Option<&str> {
    let b = path.trim_start_matches('/').split('/').next()?;
    (!b.is_empty()).then_some(b)
}

/// The region of a SigV4 request's credential scope (`Credential=AKID/DATE/REGION/s3/
/// aws4_request` in `Authorization`, or a presigned URL's `X-Amz-Credential`).
fn signing_region<B>(req: &Request<B>) -> Option<String> {
    let from_header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|a| a.split("Credential=").nth(1))
        .map(|c| c.split(',').next().unwrap_or(c).trim().to_string());
    let scope = from_header.or_else(|| {
        let q = req.uri().query()?;
        let v = q
            .split('&')
            .find_map(|p| p.strip_prefix("X-Amz-Credential="))?;
        Some(
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned(),
        )
    })?;
    scope.split('/').nth(2).map(str::to_string)
}

/// S3's answer to a request signed for another region than the bucket's `region`:
/// `301 PermanentRedirect` naming the region (no body for HEAD), or `None` when the
/// request may pass.
fn wrong_region_answer<B>(req: &Request<B>, op: S3Op, region: &str) -> Option<Response<ProxyBody>> {
    if matches!(
        op,
        S3Op::ListBuckets | S3Op::CreateBucket | S3Op::GetBucketLocation
    ) {
        return None;
    }
    let signed = signing_region(req)?;
    if signed == region {
        return None;
    }
    let bucket = bucket_of(req.uri().path()).unwrap_or_default();
    let body = if req.method() == Method::HEAD {
        Bytes::new()
    } else {
        Bytes::from(format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>PermanentRedirect</Code>\
             <Message>The bucket you are attempting to access must be addressed using the \
             specified endpoint. Please send all future requests to this endpoint.</Message>\
             <Endpoint>s3.{region}.amazonaws.com</Endpoint><Bucket>{bucket}</Bucket>\
             <RequestId>fault-proxy</RequestId></Error>"
        ))
    };
    let with_body = !body.is_empty();
    let mut r = Response::new(ProxyBody::full(body));
    *r.status_mut() = StatusCode::MOVED_PERMANENTLY;
    if let Ok(v) = HeaderValue::from_str(region) {
        r.headers_mut().insert("x-amz-bucket-region", v);
    }
    if with_body {
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/xml"));
    }
    Some(r)
}

/// Makes upstream's successful HeadBucket and GetBucketLocation answers name the
/// emulated `region`.
fn answer_region(
    shared: &Shared,
    resp: Response<Bytes>,
    op: S3Op,
    region: Option<&str>,
) -> Response<Bytes> {
    let Some(region) = region else {
        return resp;
    };
    if !resp.status().is_success() {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let body = match op {
        S3Op::HeadBucket => {
            if let Ok(v) = HeaderValue::from_str(region) {
                parts.headers.insert("x-amz-bucket-region", v);
            }
            body
        }
        S3Op::GetBucketLocation => {
            let ns = "xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"";
            let xml = if region == "us-east-1" {
                format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><LocationConstraint {ns}/>")
            } else {
                format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
                     <LocationConstraint {ns}>{region}</LocationConstraint>"
                )
            };
            parts
                .headers
                .insert(CONTENT_LENGTH, HeaderValue::from(xml.len() as u64));
            Bytes::from(xml)
        }
        _ => return Response::from_parts(parts, body),
    };
    shared.stats.region_headers.fetch_add(1, Ordering::SeqCst);
    Response::from_parts(parts, body)
}

fn s3_error(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>\
         <Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>"
    );
    let mut r = Response::new(ProxyBody::full(Bytes::from(xml)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/xml"));
    r
}

/// Sends `req` upstream (reusing an idle connection when possible) and
/// returns the response with its body fully read.
async fn forward(shared: &Shared, req: Request<Full<Bytes>>) -> Result<Response<Bytes>, BoxError> {
    // Keep a copy so a request that failed on a stale pooled connection can
    // be retried once on a fresh one.
    let (parts, body) = req.into_parts();
    let rebuild = || {
        let mut r = Request::new(body.clone());
        *r.method_mut() = parts.method.clone();
        *r.uri_mut() = parts.uri.clone();
        *r.headers_mut() = parts.headers.clone();
        r
    };

    if let Some(mut sender) = take_idle(shared).await {
        match sender.try_send_request(rebuild()).await {
            Ok(resp) => return finish(shared, sender, resp).await,
            Err(e) => {
                let unsent = e.message().is_some();
                let err = e.into_error();
                if !(unsent || err.is_incomplete_message() || err.is_canceled()) {
                    return Err(err.into());
                }
            }
        }
    }
    let mut sender = connect(shared.upstream).await?;
    let resp = sender.send_request(rebuild()).await?;
    finish(shared, sender, resp).await
}

/// Reads the whole response body and returns the connection to the pool.
async fn finish(
    shared: &Shared,
    sender: UpstreamSender,
    resp: Response<Incoming>,
) -> Result<Response<Bytes>, BoxError> {
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await?.to_bytes();
    if !sender.is_closed() {
        let mut idle = shared.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_UPSTREAM {
            idle.push(sender);
        }
    }
    Ok(Response::from_parts(parts, bytes))
}

async fn take_idle(shared: &Shared) -> Option<UpstreamSender> {
    loop {
        let sender = shared.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut sender = sender?;
        if sender.is_closed() {
            continue;
        }
        // A connection that just finished a response may need a moment to
        // become ready again; a dead one errors out here.
        match tokio::time::timeout(Duration::from_secs(1), sender.ready()).await {
            Ok(Ok(())) => return Some(sender),
            _ => continue,
        }
    }
}

async fn connect(upstream: SocketAddr) -> Result<UpstreamSender, BoxError> {
    let stream = TcpStream::connect(upstream).await?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Response body: either complete, or a first part followed by an error
/// (which makes hyper abort the connection mid-body).
enum ProxyBody {
    Full(Option<Bytes>),
    Truncated {
        part: Option<Bytes>,
        pause: Option<Pin<Box<tokio::time::Sleep>>>,
    },
}

impl ProxyBody {
    fn full(b: Bytes) -> Self {
        ProxyBody::Full(if b.is_empty() { None } else { Some(b) })
    }

    fn truncated(part: Bytes) -> Self {
        ProxyBody::Truncated {
            part: Some(part),
            pause: None,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Truncated { part, pause } => {
                if let Some(p) = part.take().filter(|p| !p.is_empty()) {
                    return Poll::Ready(Some(Ok(Frame::data(p))));
                }
                // Stay pending for a moment so hyper flushes the partial
                // body, then fail to abort the connection.
                let sleep =
                    pause.get_or_insert_with(|| Box::pin(tokio::time::sleep(TRUNCATE_PAUSE)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        Poll::Ready(Some(Err(Box::new(Abort("truncated response body")))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ProxyBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Truncated { .. } => SizeHint::default(),
        }
    }
}
