//! Seeded fault-injecting HTTP/1.1 reverse proxy for integration tests.
//!
//! The proxy listens on `127.0.0.1`, forwards every request to a plain-http
//! upstream (typically a local moto S3 server) and, for a seeded share of
//! requests, injects a fault instead: an S3 `SlowDown`/`InternalError` reply,
//! a dropped connection before or after the request reached upstream, a
//! truncated response body, or an added delay. Point an S3 client (path-style,
//! plain http) at [`FaultProxy::endpoint`] to exercise its retry and
//! resume logic.
//!
//! The proxy always runs on its own thread with a small current-thread tokio
//! runtime, so it keeps working both from async tests and from synchronous
//! tests that block (for example on a child process).
#![allow(dead_code)]

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
use hyper::{Request, Response, StatusCode};
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

/// A kind of fault the proxy can inject into a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Not forwarded; answered with `503 SlowDown` (S3 XML error body).
    SlowDown,
    /// Not forwarded; answered with `500 InternalError` (S3 XML error body).
    InternalError,
    /// Not forwarded; the client connection is reset without any response.
    ResetBeforeForward,
    /// Forwarded and executed upstream, then the client connection is reset
    /// without any response (an ambiguous failure for the client).
    ResetAfterForward,
    /// Forwarded; upstream's status and headers (full `Content-Length`) are
    /// sent but only about half of the body, then the connection is closed.
    /// Falls back to [`Fault::ResetAfterForward`] when the body is empty.
    TruncateBody,
    /// Sleeps for [`FaultConfig::delay`], then forwards normally.
    Delay,
}

impl Fault {
    /// Every fault kind, in declaration order.
    pub const ALL: [Fault; 6] = [
        Fault::SlowDown,
        Fault::InternalError,
        Fault::ResetBeforeForward,
        Fault::ResetAfterForward,
        Fault::TruncateBody,
        Fault::Delay,
    ];

    fn index(self) -> usize {
        match self {
            Fault::SlowDown => 0,
            Fault::InternalError => 1,
            Fault::ResetBeforeForward => 2,
            Fault::ResetAfterForward => 3,
            Fault::TruncateBody => 4,
            Fault::Delay => 5,
        }
    }
}

/// Configuration of a [`FaultProxy`].
#[derive(Debug, Clone)]
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
    per_fault: [AtomicU64; 6],
}

impl FaultStats {
    /// Number of requests received (faulted or not).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Number of requests that got a fault of any kind.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    /// Number of requests that got fault `f`.
    pub fn injected_of(&self, f: Fault) -> u64 {
        self.per_fault[f.index()].load(Ordering::SeqCst)
    }

    fn record(&self, f: Fault) {
        self.injected.fetch_add(1, Ordering::SeqCst);
        self.per_fault[f.index()].fetch_add(1, Ordering::SeqCst);
    }
}

/// State shared by all connections of one proxy.
struct Shared {
    upstream: SocketAddr,
    faults: Vec<Fault>,
    delay: Duration,
    deny: Option<String>,
    deny_key_id: Option<String>,
    rate_bits: AtomicU64,
    rng: Mutex<StdRng>,
    stats: Arc<FaultStats>,
    idle: Mutex<Vec<UpstreamSender>>,
}

impl Shared {
    /// Draws the fault (if any) for the next request.
    fn draw(&self) -> Option<Fault> {
        let rate = f64::from_bits(self.rate_bits.load(Ordering::SeqCst));
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let roll: f64 = rng.random();
        if self.faults.is_empty() || roll >= rate {
            return None;
        }
        Some(self.faults[rng.random_range(0..self.faults.len())])
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

async fn handle(
    shared: Arc<Shared>,
    reset: Arc<AtomicBool>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, BoxError> {
    shared.stats.requests.fetch_add(1, Ordering::SeqCst);
    if let Some(deny) = &shared.deny {
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
        if on_path && signer_matches {
            let _ = req.into_body().collect().await;
            return Ok(s3_error(
                StatusCode::FORBIDDEN,
                "AccessDenied",
                "Access Denied",
            ));
        }
    }
    let fault = shared.draw();
    if let Some(f) = fault {
        shared.stats.record(f);
    }

    if fault == Some(Fault::ResetBeforeForward) {
        reset.store(true, Ordering::SeqCst);
        return Err(Box::new(Abort("reset before forward")));
    }

    // Read the whole request body (this also answers `Expect: 100-continue`).
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();

    match fault {
        Some(Fault::SlowDown) => {
            return Ok(s3_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "SlowDown",
                "Please reduce your request rate.",
            ))
        }
        Some(Fault::InternalError) => {
            return Ok(s3_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "We encountered an internal error. Please try again.",
            ))
        }
        Some(Fault::Delay) => tokio::time::sleep(shared.delay).await,
        _ => {}
    }

    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut up_req = Request::builder().method(parts.method.clone()).uri(path);
    if let Some(h) = up_req.headers_mut() {
        *h = parts.headers.clone();
    }
    let up_req = up_req.body(Full::new(body))?;

    let resp = match forward(&shared, up_req).await {
        Ok(r) => r,
        Err(e) => {
            let mut r = Response::new(ProxyBody::full(Bytes::from(format!(
                "fault proxy: upstream request failed: {e}"
            ))));
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            return Ok(r);
        }
    };
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
        _ => Ok(Response::from_parts(rparts, ProxyBody::full(rbody))),
    }
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
