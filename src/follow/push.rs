//! follow::push: `--events http://ADDR:PORT`, the HTTP endpoint `follow` serves for servers
//! that push their notifications: Ceph RGW topics with an HTTP `push-endpoint`, MinIO
//! webhooks, a plain `curl -d @event.json`. Every POST (any path) of an event body becomes a
//! [`Delivery`] and waits for its answer: 200 once the caller acknowledges it (its changes
//! are durable), 503 when it is dropped or the endpoint stops (the sender may retry), 400 for
//! a body that is not JSON, 413 above [`MAX_BODY`]. A JSON body without changes (a test
//! event, other sources, an unknown shape: said once, in one line) is answered 200 at once.
//!
//! May call: hyper (http1 server), hyper-util, http-body-util, tokio; [`super::records`],
//! [`super::intake`]'s types, `events` (`say!`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::intake::{Delivery, Handle, Held, IntakeError};
use super::records::{parse_body, BodyError, Change};

/// The largest body accepted (a notification holds one record, a few KiB).
pub const MAX_BODY: usize = 16 << 20;
/// POSTs queued for `receive` before the next ones wait for room.
const QUEUE: usize = 4096;
/// The most deliveries one receive hands over.
const MOST: usize = 1000;

/// A POST's changes and its answer.
struct Posted {
    changes: Vec<Change>,
    reply: Reply,
}

/// The answer a waiting POST gets: 200 when [`Reply::ok`] is called, 503 when this is
/// dropped.
#[derive(Debug)]
pub(super) struct Reply(oneshot::Sender<()>);

impl Reply {
    pub(super) fn ok(self) {
        // The sender may have gone (closed its connection): nothing to answer then.
        let _ = self.0.send(());
    }
}

/// The serving endpoint. Dropped, it stops: the listener closes, waiting POSTs get 503,
/// connections close.
#[derive(Debug)]
pub(super) struct Endpoint {
    addr: SocketAddr,
    rx: mpsc::Receiver<Posted>,
    /// Keeps the channel open while the endpoint lives (`recv` never sees its end).
    _tx: mpsc::Sender<Posted>,
    /// POSTs with changes not yet answered.
    waiting: Arc<AtomicU64>,
    /// Dropped with the endpoint: connections shut down.
    _stop: watch::Sender<()>,
    server: JoinHandle<()>,
}

impl std::fmt::Debug for Posted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Posted")
            .field("changes", &self.changes.len())
            .finish()
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Endpoint {
    pub(super) async fn bind(addr: SocketAddr) -> Result<Endpoint, IntakeError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| IntakeError::Listen {
                addr,
                reason: e.to_string(),
            })?;
        let local = listener.local_addr().map_err(|e| IntakeError::Listen {
            addr,
            reason: e.to_string(),
        })?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let (stop, stopped) = watch::channel(());
        let waiting = Arc::new(AtomicU64::new(0));
        let server = tokio::spawn(serve(listener, tx.clone(), waiting.clone(), stopped));
        Ok(Endpoint {
            addr: local,
            rx,
            _tx: tx,
            waiting,
            _stop: stop,
            server,
        })
    }

    pub(super) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits up to `wait` for a POST, then takes what else is queued (up to [`MOST`]).
    pub(super) async fn receive(&mut self, wait: Duration) -> Vec<Delivery> {
        let mut out = Vec::new();
        let Ok(Some(first)) = tokio::time::timeout(wait, self.rx.recv()).await else {
            return out;
        };
        out.push(first.into());
        while out.len() < MOST {
            match self.rx.try_recv() {
                Ok(p) => out.push(p.into()),
                Err(_) => break,
            }
        }
        out
    }

    pub(super) fn backlog(&self) -> u64 {
        self.waiting.load(Ordering::SeqCst)
    }

    /// The count behind [`Endpoint::backlog`], shared.
    pub(super) fn waiting(&self) -> Arc<AtomicU64> {
        self.waiting.clone()
    }
}

impl From<Posted> for Delivery {
    fn from(p: Posted) -> Delivery {
        Delivery {
            changes: p.changes,
            handle: Handle::Http(p.reply),
        }
    }
}

async fn serve(
    listener: TcpListener,
    tx: mpsc::Sender<Posted>,
    waiting: Arc<AtomicU64>,
    stopped: watch::Receiver<()>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: said, then tried again shortly.
                crate::say!("--events push endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let tx = tx.clone();
        let waiting = waiting.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| answer(req, peer, tx.clone(), waiting.clone()));
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stopped.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

fn reply(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// One request's answer.
async fn answer(
    req: Request<Incoming>,
    peer: SocketAddr,
    tx: mpsc::Sender<Posted>,
    waiting: Arc<AtomicU64>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::POST {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST S3 event notifications here",
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return Ok(r);
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            crate::say!(
                "--events push endpoint: a POST from {peer} over {} MiB refused (413)",
                MAX_BODY >> 20
            );
            return Ok(reply(StatusCode::PAYLOAD_TOO_LARGE, "body too large"));
        }
        // The sender went away while sending: nobody to answer.
        Err(e) => return Ok(reply(StatusCode::BAD_REQUEST, &e.to_string())),
    };
    let changes = match parse_body(&body) {
        Ok(c) => c,
        Err(e @ BodyError::NotJson(_)) => {
            crate::say!("--events push endpoint: a POST from {peer} refused (400): {e}");
            return Ok(reply(StatusCode::BAD_REQUEST, &e.to_string()));
        }
        Err(e) => {
            crate::say!("--events push endpoint: a POST from {peer} ignored: {e}");
            return Ok(reply(StatusCode::OK, &format!("ignored: {e}")));
        }
    };
    if changes.is_empty() {
        return Ok(reply(StatusCode::OK, "no changes"));
    }
    let _held = Held::new(&waiting);
    let (reply_tx, answered) = oneshot::channel();
    let posted = Posted {
        changes,
        reply: Reply(reply_tx),
    };
    if tx.send(posted).await.is_err() {
        return Ok(reply(StatusCode::SERVICE_UNAVAILABLE, "stopping"));
    }
    Ok(match answered.await {
        Ok(()) => reply(StatusCode::OK, "ok"),
        Err(_) => reply(StatusCode::SERVICE_UNAVAILABLE, "not taken; send it again"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const EVENT: &str = r#"{"Records":[{"eventSource":"ceph:s3","eventTime":"2026-12-03T14:35:27.056900Z","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"b"},"object":{"key":"a b","versionId":"v1"}}}]}"#;

    /// POSTs `body` and returns the answer's status code and body (one connection each).
    async fn post(addr: SocketAddr, body: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "POST /any/path HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let text = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
        (status, text)
    }

    async fn endpoint() -> Endpoint {
        Endpoint::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_post_is_answered_200_only_once_acknowledged() {
        let mut e = endpoint().await;
        let addr = e.local_addr();
        let poster = tokio::spawn(post(addr, EVENT));
        let got = e.receive(Duration::from_secs(10)).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].changes[0].key, "a b");
        assert_eq!(got[0].changes[0].version_id.as_deref(), Some("v1"));
        assert_eq!(e.backlog(), 1, "the POST waits for its answer");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!poster.is_finished(), "answered before the ack");
        for d in got {
            let Handle::Http(r) = d.handle else {
                unreachable!()
            };
            r.ok();
        }
        assert_eq!(poster.await.unwrap(), (200, "ok\n".into()));
        assert_eq!(e.backlog(), 0);
        assert!(e.receive(Duration::from_millis(50)).await.is_empty());
    }

    #[tokio::test]
    async fn a_dropped_delivery_or_a_stopped_endpoint_answers_503() {
        let mut e = endpoint().await;
        let addr = e.local_addr();
        let first = tokio::spawn(post(addr, EVENT));
        let got = e.receive(Duration::from_secs(10)).await;
        drop(got);
        assert_eq!(first.await.unwrap().0, 503);
        let second = tokio::spawn(post(addr, EVENT));
        let got = e.receive(Duration::from_secs(10)).await;
        assert_eq!(got.len(), 1);
        drop(e);
        drop(got);
        assert_eq!(second.await.unwrap().0, 503);
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "the port is closed"
        );
    }

    #[tokio::test]
    async fn bodies_without_changes_are_answered_at_once() {
        let mut e = endpoint().await;
        let addr = e.local_addr();
        let (status, text) = post(addr, "key=a&b").await;
        assert_eq!(status, 400);
        assert!(text.starts_with("not JSON"), "{text}");
        let test = r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Bucket":"b"}"#;
        assert_eq!(post(addr, test).await, (200, "no changes\n".into()));
        let (status, text) = post(addr, r#"{"hello":1}"#).await;
        assert_eq!(status, 200);
        assert!(text.starts_with("ignored: not an S3 event body"), "{text}");
        assert!(e.receive(Duration::from_millis(50)).await.is_empty());
        assert_eq!(e.backlog(), 0);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_413() {
        let mut e = endpoint().await;
        let mut s = tokio::net::TcpStream::connect(e.local_addr())
            .await
            .unwrap();
        let head = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1024
        );
        s.write_all(head.as_bytes()).await.unwrap();
        // One byte over the limit is enough; the rest is never sent.
        s.write_all(&vec![b' '; MAX_BODY + 1]).await.unwrap();
        let mut answer = vec![0u8; 12];
        tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut answer))
            .await
            .expect("answered before the whole body came")
            .unwrap();
        assert_eq!(&answer, b"HTTP/1.1 413");
        assert!(e.receive(Duration::from_millis(50)).await.is_empty());
    }

    #[tokio::test]
    async fn a_port_in_use_is_one_line_at_bind() {
        let e = endpoint().await;
        let err = Endpoint::bind(e.local_addr())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "--events http://{}: cannot listen: ",
                e.local_addr()
            )),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
    }
}
