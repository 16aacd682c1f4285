//! relay: event relays that lose events on purpose, between a server's notifications and
//! `follow`, so the tests can check that lost events do not matter.
//! - [`HttpRelay`]: the push endpoint of an RGW topic. Every POST is answered 200 at once;
//!   every Nth one is dropped (counted; the tests' N is [`DROP_EVERY`], 0 drops none), the others are forwarded to `follow`'s
//!   endpoint, retried while `follow` is down or answers anything but 200 (it is killed and
//!   restarted during the tests), for up to [`FORWARD_LIMIT`].
//! - [`QueueRelay`]: from the queue a bucket notifies to the queue `follow` reads (SQS on
//!   moto): every Nth message is deleted without being passed on; the others are
//!   sent to the second queue, then deleted from the first.
//!
//! Dropping is deterministic (a counter), so a run drops the same share every time. Each
//! relay runs on its own thread with its own small tokio runtime (like `fault_proxy`), so it
//! keeps working while a test blocks on a child process, and stops when dropped.
//!
//! May call: hyper, tokio, aws-sdk-sqs; nothing of the crate under test.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::server::{KEY_ID, SECRET};

/// One event in this many is dropped in the tests (5%).
pub const DROP_EVERY: u64 = 20;
/// How long the HTTP relay keeps retrying one event while `follow` does not take it.
pub const FORWARD_LIMIT: Duration = Duration::from_secs(120);

/// What a relay did, counted as it goes.
#[derive(Debug, Default)]
pub struct RelayCounts {
    /// Events (POSTs, messages) received.
    pub received: AtomicU64,
    /// Passed on (and taken: 200 from `follow`, or sent to the second queue).
    pub forwarded: AtomicU64,
    /// Dropped on purpose.
    pub dropped: AtomicU64,
    /// Not dropped on purpose but never passed on (the HTTP relay gave up after
    /// [`FORWARD_LIMIT`]; a queue relay's send failed).
    pub lost: AtomicU64,
    /// Forward attempts that `follow` refused or that found it down (then retried).
    pub refused: AtomicU64,
    /// Every this many events one is dropped (0: none).
    pub drop_every: u64,
}

/// A copy of [`RelayCounts`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Events received.
    pub received: u64,
    /// Passed on.
    pub forwarded: u64,
    /// Dropped on purpose.
    pub dropped: u64,
    /// Never passed on although not dropped on purpose.
    pub lost: u64,
    /// Forward attempts refused or that found nobody (retried).
    pub refused: u64,
}

impl RelayCounts {
    /// The counts now.
    pub fn now(&self) -> Counts {
        Counts {
            received: self.received.load(Ordering::Relaxed),
            forwarded: self.forwarded.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    /// Counts that drop every `drop_every`th event (0: none).
    fn dropping(drop_every: u64) -> Arc<RelayCounts> {
        Arc::new(RelayCounts {
            drop_every,
            ..RelayCounts::default()
        })
    }

    /// Counts one received event; true when it is to be dropped.
    fn arrive(&self) -> bool {
        let n = self.received.fetch_add(1, Ordering::Relaxed) + 1;
        let drop = self.drop_every > 0 && n.is_multiple_of(self.drop_every);
        if drop {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        drop
    }
}

/// Runs `work` on a thread of its own with a current-thread runtime until the returned
/// sender is dropped (or sends).
fn on_own_thread<F>(name: &str, work: F) -> oneshot::Sender<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (stop, stopped) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("relay runtime");
            rt.block_on(async move {
                tokio::select! {
                    _ = work => {}
                    _ = stopped => {}
                }
            });
        })
        .expect("relay thread");
    stop
}

/// Serves HTTP/1.1 on a free port of 127.0.0.1 with `handle` for every request, on a thread
/// of its own (see [`on_own_thread`]); its address and the sender that stops it.
fn serve<H, F>(name: &str, handle: H) -> (SocketAddr, oneshot::Sender<()>)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<Response<Full<Bytes>>, hyper::Error>> + Send + 'static,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("local address");
    let stop = on_own_thread(name, async move {
        let listener = TcpListener::from_std(listener).expect("listener");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(handle))
                    .await;
            });
        }
    });
    (addr, stop)
}

/// An HTTP relay in front of `follow`'s push endpoint (see the module header).
pub struct HttpRelay {
    /// Where the server pushes to.
    pub addr: SocketAddr,
    /// What it did.
    pub counts: Arc<RelayCounts>,
    _stop: oneshot::Sender<()>,
}

impl HttpRelay {
    /// Listens on a free port of 127.0.0.1 and forwards to `target` (`ADDR:PORT` of
    /// `follow --events http://ADDR:PORT`), dropping every `drop_every`th POST (0: none).
    pub fn start(target: SocketAddr, drop_every: u64) -> HttpRelay {
        let counts = RelayCounts::dropping(drop_every);
        let c = counts.clone();
        let (addr, stop) = serve("http-relay", move |req| relay_post(req, target, c.clone()));
        HttpRelay {
            addr,
            counts,
            _stop: stop,
        }
    }

    /// The push endpoint to give the server's topic: `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// One request to the relay: answered 200 at once; dropped or forwarded in the background.
async fn relay_post(
    req: Request<Incoming>,
    target: SocketAddr,
    c: Arc<RelayCounts>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |p| p.to_string());
    let content_type = req.headers().get(hyper::header::CONTENT_TYPE).cloned();
    let body = req.into_body().collect().await?.to_bytes();
    if !c.arrive() {
        tokio::spawn(async move {
            let start = Instant::now();
            loop {
                match forward(target, &path, content_type.clone(), body.clone()).await {
                    Ok(s) if s == StatusCode::OK => {
                        c.forwarded.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    _ => {
                        c.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if start.elapsed() > FORWARD_LIMIT {
                    c.lost.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
    Ok(Response::new(Full::new(Bytes::new())))
}

/// One POST of `body` to `target` on a new connection; the answer's status.
async fn forward(
    target: SocketAddr,
    path: &str,
    content_type: Option<hyper::header::HeaderValue>,
    body: Bytes,
) -> Result<StatusCode, Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(target).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::post(path)
        .header(hyper::header::HOST, target.to_string())
        .header(hyper::header::CONTENT_LENGTH, body.len());
    if let Some(ct) = content_type {
        req = req.header(hyper::header::CONTENT_TYPE, ct);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(30),
        send.send_request(req.body(Full::new(body))?),
    )
    .await??;
    Ok(resp.status())
}

/// An SQS client for `endpoint` with the test credentials (region us-east-1). Built from
/// aws-config's shared settings, so it has aws-config's HTTP client whatever features the
/// SQS crate is built with.
pub async fn sqs_client(endpoint: &str) -> aws_sdk_sqs::Client {
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            KEY_ID, SECRET, None, None, "test",
        ))
        .load()
        .await;
    aws_sdk_sqs::Client::new(&conf)
}

/// Creates a queue and returns its URL.
pub async fn create_queue(c: &aws_sdk_sqs::Client, name: &str) -> String {
    c.create_queue()
        .queue_name(name)
        .send()
        .await
        .unwrap_or_else(|e| panic!("create queue {name}: {e:?}"))
        .queue_url()
        .expect("a queue url")
        .to_string()
}

/// A relay from one queue to another (see the module header).
pub struct QueueRelay {
    /// What it did.
    pub counts: Arc<RelayCounts>,
    _stop: oneshot::Sender<()>,
}

impl QueueRelay {
    /// Moves the messages of queue `from` to queue `to` (URLs) on `endpoint`, dropping
    /// every `drop_every`th (0: none).
    pub fn start(endpoint: &str, from: &str, to: &str, drop_every: u64) -> QueueRelay {
        let counts = RelayCounts::dropping(drop_every);
        let (c, endpoint, from, to) = (
            counts.clone(),
            endpoint.to_string(),
            from.to_string(),
            to.to_string(),
        );
        let stop = on_own_thread("queue-relay", async move {
            let sqs = sqs_client(&endpoint).await;
            loop {
                let got = match sqs
                    .receive_message()
                    .queue_url(&from)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1)
                    .send()
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        println!("queue relay: receive: {e:?}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                for m in got.messages() {
                    if !c.arrive() {
                        let sent = sqs
                            .send_message()
                            .queue_url(&to)
                            .message_body(m.body().unwrap_or_default())
                            .send()
                            .await;
                        match sent {
                            Ok(_) => c.forwarded.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                println!("queue relay: send: {e:?}");
                                c.lost.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                    if let Some(h) = m.receipt_handle() {
                        if let Err(e) = sqs
                            .delete_message()
                            .queue_url(&from)
                            .receipt_handle(h)
                            .send()
                            .await
                        {
                            println!("queue relay: delete: {e:?}");
                        }
                    }
                }
            }
        });
        QueueRelay {
            counts,
            _stop: stop,
        }
    }
}

/// An HTTP endpoint that answers every POST 200 and keeps its body: stands in for
/// `follow`'s endpoint when the relay is tested alone.
pub struct Sink {
    /// Where it listens.
    pub addr: SocketAddr,
    bodies: Arc<std::sync::Mutex<Vec<String>>>,
    _stop: oneshot::Sender<()>,
}

impl Sink {
    /// Listens on a free port of 127.0.0.1.
    pub fn start() -> Sink {
        let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = bodies.clone();
        let (addr, stop) = serve("sink", move |req: Request<Incoming>| {
            let kept = kept.clone();
            async move {
                let body = req.into_body().collect().await?.to_bytes();
                kept.lock()
                    .expect("sink bodies")
                    .push(String::from_utf8_lossy(&body).into_owned());
                Ok(Response::new(Full::new(Bytes::new())))
            }
        });
        Sink {
            addr,
            bodies,
            _stop: stop,
        }
    }

    /// Every body received so far.
    pub fn bodies(&self) -> Vec<String> {
        self.bodies.lock().expect("sink bodies").clone()
    }
}
