//! In-process S3 server for tests and benches: answers at once from memory.
//!
//! [`MemS3::start`] serves path-style S3 over plain HTTP/1.1 on `127.0.0.1:0` from its own
//! thread (a small multi-thread tokio runtime), so it works from sync and async callers.
//! Buckets keep every version (versioning Enabled / Suspended / never enabled, null
//! versions, delete markers) in a `Mutex<BTreeMap>` per bucket; bodies are `Bytes`.
//! Requests are not authenticated (any signature passes). Answers use the XML shapes and
//! headers of AWS S3, including `encoding-type=url` (form encoding) in listings, versions
//! and delete markers interleaved newest first, and aws-chunked request bodies with
//! trailing checksums. [`MemS3::seed`] fills a bucket without HTTP (a million versions in
//! seconds), and the server counts requests per [`Op`].
//!
//! Operations: ListBuckets, CreateBucket, DeleteBucket, HeadBucket, GetBucketLocation,
//! Get/PutBucketVersioning, ListObjectVersions, ListObjects(V2), ListMultipartUploads,
//! DeleteObjects, HeadObject, GetObject (versionId, Range, partNumber), PutObject,
//! CopyObject (URL-encoded source, versionId, metadata and tagging directives, source
//! conditions), DeleteObject, Get/Put/DeleteObjectTagging, Create/UploadPart/UploadPartCopy/
//! Complete/AbortMultipartUpload. Anything else gets `501 NotImplemented`.
//!
//! It uses hyper, tokio, quick-xml, md-5 and percent-encoding only: nothing of the crate
//! under test.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use md5::{Digest, Md5};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use quick_xml::events::Event;
use quick_xml::Reader;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Smallest part size S3 accepts, except for an upload's last part.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
const XMLNS: &str = "http://s3.amazonaws.com/doc/2006-03-01/";
const XML_DECL: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
/// Version id 0 is the null version.
const NULL_VERSION: u64 = 0;
/// Headers that describe an object's content: kept or replaced with its user metadata
/// by CopyObject's metadata directive.
const CONTENT_HEADERS: [&str; 7] = [
    "content-type",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "expires",
    "x-amz-website-redirect-location",
];
/// Headers that describe how an object is stored: taken from each write request.
const STORAGE_HEADERS: [&str; 7] = [
    "x-amz-storage-class",
    "x-amz-server-side-encryption",
    "x-amz-server-side-encryption-aws-kms-key-id",
    "x-amz-server-side-encryption-bucket-key-enabled",
    "x-amz-object-lock-mode",
    "x-amz-object-lock-retain-until-date",
    "x-amz-object-lock-legal-hold",
];
/// Checksum algorithms, as named in `x-amz-checksum-ALG` headers.
const CHECKSUMS: [&str; 5] = ["crc32", "crc32c", "crc64nvme", "sha1", "sha256"];

/// An S3 operation, as the server recognised it (requests are counted per operation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    ListBuckets,
    CreateBucket,
    DeleteBucket,
    HeadBucket,
    GetBucketLocation,
    GetBucketVersioning,
    PutBucketVersioning,
    ListObjectVersions,
    ListObjectsV2,
    ListObjects,
    ListMultipartUploads,
    DeleteObjects,
    HeadObject,
    GetObject,
    GetObjectTagging,
    PutObjectTagging,
    DeleteObjectTagging,
    PutObject,
    CopyObject,
    DeleteObject,
    CreateMultipartUpload,
    UploadPart,
    UploadPartCopy,
    CompleteMultipartUpload,
    AbortMultipartUpload,
    /// Anything the server does not implement (answered 501).
    Unsupported,
}

impl Op {
    /// Every operation, in declaration order.
    pub const ALL: [Op; 26] = [
        Op::ListBuckets,
        Op::CreateBucket,
        Op::DeleteBucket,
        Op::HeadBucket,
        Op::GetBucketLocation,
        Op::GetBucketVersioning,
        Op::PutBucketVersioning,
        Op::ListObjectVersions,
        Op::ListObjectsV2,
        Op::ListObjects,
        Op::ListMultipartUploads,
        Op::DeleteObjects,
        Op::HeadObject,
        Op::GetObject,
        Op::GetObjectTagging,
        Op::PutObjectTagging,
        Op::DeleteObjectTagging,
        Op::PutObject,
        Op::CopyObject,
        Op::DeleteObject,
        Op::CreateMultipartUpload,
        Op::UploadPart,
        Op::UploadPartCopy,
        Op::CompleteMultipartUpload,
        Op::AbortMultipartUpload,
        Op::Unsupported,
    ];

    fn of(r: &Req) -> Op {
        if r.bucket.is_empty() {
            return if r.method == Method::GET {
                Op::ListBuckets
            } else {
                Op::Unsupported
            };
        }
        if r.key.is_empty() {
            Self::bucket_op(r)
        } else {
            Self::object_op(r)
        }
    }

    fn bucket_op(r: &Req) -> Op {
        let plain = r.query.is_empty();
        match r.method {
            Method::HEAD if plain => Op::HeadBucket,
            Method::GET if r.has("versioning") => Op::GetBucketVersioning,
            Method::GET if r.has("location") => Op::GetBucketLocation,
            Method::GET if r.has("versions") => Op::ListObjectVersions,
            Method::GET if r.has("uploads") => Op::ListMultipartUploads,
            Method::GET if r.q("list-type") == Some("2") => Op::ListObjectsV2,
            Method::GET if !r.has("list-type") && Self::listing_params(r) => Op::ListObjects,
            Method::PUT if r.has("versioning") => Op::PutBucketVersioning,
            Method::PUT if plain => Op::CreateBucket,
            Method::POST if r.has("delete") => Op::DeleteObjects,
            Method::DELETE if plain => Op::DeleteBucket,
            _ => Op::Unsupported,
        }
    }

    /// Whether a bucket GET carries only ListObjects (v1) parameters.
    fn listing_params(r: &Req) -> bool {
        let known = ["prefix", "delimiter", "marker", "max-keys", "encoding-type"];
        r.query.iter().all(|(n, _)| known.contains(&n.as_str()))
    }

    fn object_op(r: &Req) -> Op {
        let copy = r.h("x-amz-copy-source").is_some();
        let upload = r.has("uploadId");
        let sub = [
            "acl",
            "retention",
            "legal-hold",
            "attributes",
            "restore",
            "torrent",
        ];
        if sub.iter().any(|s| r.has(s)) {
            return Op::Unsupported;
        }
        match r.method {
            Method::HEAD => Op::HeadObject,
            Method::GET if r.has("tagging") => Op::GetObjectTagging,
            Method::GET if upload => Op::Unsupported,
            Method::GET => Op::GetObject,
            Method::PUT if r.has("tagging") => Op::PutObjectTagging,
            Method::PUT if upload && copy => Op::UploadPartCopy,
            Method::PUT if upload => Op::UploadPart,
            Method::PUT if copy => Op::CopyObject,
            Method::PUT => Op::PutObject,
            Method::POST if r.has("uploads") => Op::CreateMultipartUpload,
            Method::POST if upload => Op::CompleteMultipartUpload,
            Method::DELETE if r.has("tagging") => Op::DeleteObjectTagging,
            Method::DELETE if upload => Op::AbortMultipartUpload,
            Method::DELETE => Op::DeleteObject,
            _ => Op::Unsupported,
        }
    }
}

/// One entry of a seeded history (see [`MemS3::seed`]).
#[derive(Debug, Clone)]
pub enum Seed {
    /// An object version with this body.
    Put(Bytes),
    /// A delete marker.
    DeleteMarker,
}

/// One entry of a bucket, as [`MemS3::entries`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub version_id: String,
    pub is_delete_marker: bool,
    pub is_latest: bool,
    /// Quoted, as S3 shows it; empty for a delete marker.
    pub etag: String,
    pub size: u64,
    /// User metadata (`x-amz-meta-*`, names without the prefix), sorted.
    pub metadata: Vec<(String, String)>,
    /// Tags, sorted.
    pub tags: Vec<(String, String)>,
}

/// Versioning state of a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Versioning {
    Never,
    Enabled,
    Suspended,
}

/// Everything of an object version but its body and tags.
#[derive(Debug, Default)]
struct Meta {
    /// [`CONTENT_HEADERS`] present on the write, lowercase names.
    content: Vec<(&'static str, String)>,
    /// [`STORAGE_HEADERS`] present on the write.
    storage: Vec<(&'static str, String)>,
    /// User metadata, lowercase names without `x-amz-meta-`, sorted.
    user: Vec<(String, String)>,
    /// Checksum algorithm (e.g. `crc32`) and value, as the writer sent it.
    checksum: Option<(&'static str, String)>,
}

impl Meta {
    fn storage_class(&self) -> &str {
        self.storage
            .iter()
            .find(|(n, _)| *n == "x-amz-storage-class")
            .map_or("STANDARD", |(_, v)| v.as_str())
    }
}

#[derive(Debug)]
struct Object {
    body: Bytes,
    md5: [u8; 16],
    /// Part sizes of a multipart object; empty for a single-part one.
    parts: Vec<u64>,
    meta: Arc<Meta>,
    tags: Vec<(String, String)>,
}

impl Object {
    fn etag(&self) -> String {
        if self.parts.is_empty() {
            format!("\"{}\"", hex::encode(self.md5))
        } else {
            format!("\"{}-{}\"", hex::encode(self.md5), self.parts.len())
        }
    }

    /// A copy of this object with other tags (bodies are shared).
    fn with_tags(&self, tags: Vec<(String, String)>) -> Object {
        Object {
            body: self.body.clone(),
            md5: self.md5,
            parts: self.parts.clone(),
            meta: self.meta.clone(),
            tags,
        }
    }
}

#[derive(Debug, Clone)]
struct Version {
    id: u64,
    modified_ms: u64,
    /// `None`: a delete marker.
    obj: Option<Arc<Object>>,
}

#[derive(Debug)]
struct Bucket {
    created_ms: u64,
    versioning: Mutex<Versioning>,
    /// Each key's history, oldest first.
    keys: Mutex<BTreeMap<String, Vec<Version>>>,
}

impl Bucket {
    fn versioning(&self) -> Versioning {
        *self.versioning.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
struct Part {
    body: Bytes,
    md5: [u8; 16],
    modified_ms: u64,
}

#[derive(Debug)]
struct Upload {
    bucket: String,
    key: String,
    seq: u64,
    initiated_ms: u64,
    meta: Arc<Meta>,
    tags: Vec<(String, String)>,
    parts: BTreeMap<u32, Part>,
}

/// The server's whole state.
#[derive(Debug)]
struct State {
    buckets: RwLock<BTreeMap<String, Arc<Bucket>>>,
    uploads: Mutex<HashMap<String, Upload>>,
    seq: AtomicU64,
    clock_ms: AtomicU64,
    counts: [AtomicU64; Op::ALL.len()],
    default_meta: Arc<Meta>,
    /// How long every answer waits before it is made, in microseconds (0: none).
    latency_us: AtomicU64,
}

impl State {
    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Milliseconds since the epoch, never going back.
    fn now_ms(&self) -> u64 {
        let sys = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let prev = self.clock_ms.fetch_max(sys, Ordering::Relaxed);
        prev.max(sys)
    }

    fn bucket(&self, name: &str) -> Result<Arc<Bucket>, S3Err> {
        let b = self.buckets.read().unwrap_or_else(|e| e.into_inner());
        b.get(name).cloned().ok_or_else(|| {
            S3Err::new(
                StatusCode::NOT_FOUND,
                "NoSuchBucket",
                format!("The specified bucket does not exist: {name}"),
            )
        })
    }

    fn create_bucket(&self, name: &str, versioning: Versioning) -> bool {
        let mut b = self.buckets.write().unwrap_or_else(|e| e.into_inner());
        if b.contains_key(name) {
            return false;
        }
        let bucket = Bucket {
            created_ms: self.now_ms(),
            versioning: Mutex::new(versioning),
            keys: Mutex::new(BTreeMap::new()),
        };
        b.insert(name.to_string(), Arc::new(bucket));
        true
    }

    /// Adds a version (or delete marker) to `key` as the bucket's versioning state says:
    /// a new id when enabled, else the null version is replaced. Returns the version id.
    fn add_version(&self, bucket: &Bucket, key: &str, obj: Option<Arc<Object>>) -> u64 {
        let versioning = bucket.versioning();
        let id = match versioning {
            Versioning::Enabled => self.next_seq(),
            _ => NULL_VERSION,
        };
        let v = Version {
            id,
            modified_ms: self.now_ms(),
            obj,
        };
        let mut keys = bucket.keys.lock().unwrap_or_else(|e| e.into_inner());
        let history = keys.entry(key.to_string()).or_default();
        if id == NULL_VERSION {
            history.retain(|v| v.id != NULL_VERSION);
        }
        if versioning == Versioning::Never && v.obj.is_none() {
            // A delete on a bucket that never had versioning removes the object.
            if history.is_empty() {
                keys.remove(key);
            }
            return id;
        }
        history.push(v);
        id
    }
}

/// A running in-memory S3 server. Dropping it stops the server.
pub struct MemS3 {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl MemS3 {
    /// Starts a server with two worker threads.
    pub fn start() -> io::Result<MemS3> {
        Self::start_with_threads(2)
    }

    /// Starts a server whose runtime has `workers` threads (at least one).
    pub fn start_with_threads(workers: usize) -> io::Result<MemS3> {
        let state = Arc::new(State {
            buckets: RwLock::new(BTreeMap::new()),
            uploads: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            clock_ms: AtomicU64::new(0),
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            default_meta: Arc::new(Meta::default()),
            latency_us: AtomicU64::new(0),
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.max(1))
            .thread_name("mem-s3")
            .enable_all()
            .build()?;
        // Bound here (not on the runtime) so that this works from inside another runtime.
        let listener =
            std::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let served = state.clone();
        std::thread::Builder::new()
            .name("mem-s3-main".into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(listener) else {
                        return;
                    };
                    let accept = tokio::spawn(accept_loop(listener, served));
                    let _ = rx.await;
                    accept.abort();
                });
                rt.shutdown_timeout(Duration::from_millis(100));
            })?;
        Ok(MemS3 {
            addr,
            state,
            shutdown: Some(tx),
        })
    }

    /// Makes every later answer wait `latency` first (a server far away: a client bound by
    /// round trips, not by its CPU).
    #[allow(dead_code)] // not every test binary sets one
    pub fn set_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.state.latency_us.store(us, Ordering::Relaxed);
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Endpoint URL for an S3 client (path-style): `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates a bucket (no-op if it exists), with versioning enabled or never enabled.
    pub fn create_bucket(&self, name: &str, versioned: bool) {
        let v = if versioned {
            Versioning::Enabled
        } else {
            Versioning::Never
        };
        self.state.create_bucket(name, v);
    }

    /// Appends a history to `key` of `bucket`, oldest first, without HTTP. The bucket is
    /// created (versioned) when missing. Versions get bodies as given, no metadata, no
    /// tags; a bucket without versioning keeps only the last one, as S3 would.
    pub fn seed(&self, bucket: &str, key: &str, versions: impl IntoIterator<Item = Seed>) {
        self.state.create_bucket(bucket, Versioning::Enabled);
        let Ok(b) = self.state.bucket(bucket) else {
            return;
        };
        for s in versions {
            let obj = match s {
                Seed::Put(body) => Some(Arc::new(Object {
                    md5: Md5::digest(&body).into(),
                    body,
                    parts: Vec::new(),
                    meta: self.state.default_meta.clone(),
                    tags: Vec::new(),
                })),
                Seed::DeleteMarker => None,
            };
            self.state.add_version(&b, key, obj);
        }
    }

    /// Every entry of `bucket` in listing order (keys ascending, newest first); empty if
    /// the bucket does not exist.
    pub fn entries(&self, bucket: &str) -> Vec<Listed> {
        let Ok(b) = self.state.bucket(bucket) else {
            return Vec::new();
        };
        let keys = b.keys.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (key, history) in keys.iter() {
            for (i, v) in history.iter().rev().enumerate() {
                out.push(Listed {
                    key: key.clone(),
                    version_id: version_id(v.id),
                    is_delete_marker: v.obj.is_none(),
                    is_latest: i == 0,
                    etag: v.obj.as_ref().map(|o| o.etag()).unwrap_or_default(),
                    size: v.obj.as_ref().map_or(0, |o| o.body.len() as u64),
                    metadata: v
                        .obj
                        .as_ref()
                        .map(|o| o.meta.user.clone())
                        .unwrap_or_default(),
                    tags: v.obj.as_ref().map(|o| o.tags.clone()).unwrap_or_default(),
                });
            }
        }
        out
    }

    /// Number of entries (versions and delete markers) in `bucket`.
    pub fn count(&self, bucket: &str) -> usize {
        let Ok(b) = self.state.bucket(bucket) else {
            return 0;
        };
        let keys = b.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.values().map(Vec::len).sum()
    }

    /// Number of requests served.
    pub fn requests(&self) -> u64 {
        self.state
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Number of requests of operation `op` served.
    pub fn requests_of(&self, op: Op) -> u64 {
        self.state.counts[op as usize].load(Ordering::Relaxed)
    }

    /// Requests per operation, for the operations that were asked for at least once.
    pub fn request_counts(&self) -> Vec<(Op, u64)> {
        Op::ALL
            .iter()
            .map(|op| (*op, self.requests_of(*op)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Number of multipart uploads in progress.
    pub fn uploads_in_progress(&self) -> usize {
        self.state
            .uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

impl Drop for MemS3 {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| serve(state.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// An S3 error answer.
#[derive(Debug)]
struct S3Err {
    status: StatusCode,
    code: &'static str,
    message: String,
    headers: Vec<(&'static str, String)>,
}

impl S3Err {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> S3Err {
        S3Err {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    fn bad(code: &'static str, message: impl Into<String>) -> S3Err {
        S3Err::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> S3Err {
        self.headers.push((name, value.into()));
        self
    }

    fn into_response(self, head: bool, resource: &str) -> Response<Full<Bytes>> {
        let body = if head {
            Bytes::new()
        } else {
            Bytes::from(format!(
                "{XML_DECL}<Error><Code>{}</Code><Message>{}</Message><Resource>{}</Resource>\
                 <RequestId>mem-s3</RequestId></Error>",
                self.code,
                xml_escape(&self.message),
                xml_escape(resource)
            ))
        };
        let mut out = Answer::new(self.status);
        if !head {
            out = out.header("content-type", "application/xml");
        }
        for (n, v) in self.headers {
            out = out.header(n, v);
        }
        out.body(body)
    }
}

type Res = Result<Response<Full<Bytes>>, S3Err>;

/// A response under construction.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
}

impl Answer {
    fn new(status: StatusCode) -> Answer {
        Answer {
            status,
            headers: HeaderMap::new(),
        }
    }

    fn ok() -> Answer {
        Answer::new(StatusCode::OK)
    }

    fn header(mut self, name: &str, value: impl AsRef<str>) -> Answer {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value.as_ref()),
        ) {
            self.headers.append(n, v);
        }
        self
    }

    fn body(self, body: Bytes) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = self.status;
        *r.headers_mut() = self.headers;
        r
    }

    fn empty(self) -> Res {
        Ok(self.body(Bytes::new()))
    }

    fn xml(self, xml: String) -> Res {
        Ok(self
            .header("content-type", "application/xml")
            .body(Bytes::from(xml)))
    }
}

/// A parsed request.
struct Req {
    method: Method,
    bucket: String,
    /// Decoded key; empty for a bucket-level request.
    key: String,
    query: Vec<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
    /// Trailing headers of an aws-chunked body.
    trailers: Vec<(String, String)>,
}

impl Req {
    fn parse(parts: hyper::http::request::Parts, raw: Bytes) -> Result<Req, S3Err> {
        let path = parts.uri.path().trim_start_matches('/');
        let (bucket, key) = path.split_once('/').unwrap_or((path, ""));
        let query = parts
            .uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (n, v) = p.split_once('=').unwrap_or((p, ""));
                (pct_decode(n), pct_decode(v))
            })
            .collect();
        let chunked = parts
            .headers
            .get("x-amz-content-sha256")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("STREAMING-"));
        let (body, trailers) = if chunked {
            decode_aws_chunked(&raw)?
        } else {
            (raw, Vec::new())
        };
        Ok(Req {
            method: parts.method,
            bucket: pct_decode(bucket),
            key: pct_decode(key),
            query,
            headers: parts.headers,
            body,
            trailers,
        })
    }

    fn q(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn has(&self, name: &str) -> bool {
        self.query.iter().any(|(n, _)| n == name)
    }

    fn h(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn resource(&self) -> String {
        if self.key.is_empty() {
            format!("/{}", self.bucket)
        } else {
            format!("/{}/{}", self.bucket, self.key)
        }
    }

    /// The version named by `versionId`, if any (`Some(NULL_VERSION)` for "null").
    fn version_arg(&self) -> Result<Option<u64>, S3Err> {
        self.q("versionId").map(parse_version_id).transpose()
    }

    /// A numeric query parameter, or `default` when absent.
    fn num(&self, name: &str, default: u64) -> Result<u64, S3Err> {
        match self.q(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| S3Err::bad("InvalidArgument", format!("invalid {name}: {v}"))),
        }
    }

    /// The content, storage and user metadata headers of a write, and its checksum.
    fn meta(&self) -> Meta {
        let mut m = Meta::default();
        for name in CONTENT_HEADERS {
            if let Some(v) = self.h(name) {
                let v = if name == "content-encoding" {
                    strip_aws_chunked(v)
                } else {
                    v.to_string()
                };
                if !v.is_empty() {
                    m.content.push((name, v));
                }
            }
        }
        m.storage = self.storage_headers();
        m.user = self.user_metadata();
        m.checksum = self.checksum();
        m
    }

    fn storage_headers(&self) -> Vec<(&'static str, String)> {
        STORAGE_HEADERS
            .iter()
            .filter_map(|n| self.h(n).map(|v| (*n, v.to_string())))
            .collect()
    }

    fn user_metadata(&self) -> Vec<(String, String)> {
        let mut user: Vec<(String, String)> = self
            .headers
            .iter()
            .filter_map(|(n, v)| {
                let name = n.as_str().strip_prefix("x-amz-meta-")?;
                Some((name.to_string(), v.to_str().ok()?.to_string()))
            })
            .collect();
        user.sort();
        user
    }

    /// The checksum the writer sent, in a header or an aws-chunked trailer.
    fn checksum(&self) -> Option<(&'static str, String)> {
        CHECKSUMS.iter().find_map(|alg| {
            let name = format!("x-amz-checksum-{alg}");
            let v = self.h(&name).map(str::to_string).or_else(|| {
                self.trailers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(&name))
                    .map(|(_, v)| v.clone())
            })?;
            Some((*alg, v))
        })
    }

    /// Tags of the `x-amz-tagging` header (form encoded).
    fn tagging_header(&self) -> Vec<(String, String)> {
        let mut tags: Vec<(String, String)> = self
            .h("x-amz-tagging")
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (form_decode(k), form_decode(v))
            })
            .collect();
        tags.sort();
        tags
    }
}

async fn serve(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let latency = state.latency_us.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_micros(latency)).await;
    }
    let (parts, body) = req.into_parts();
    let head = parts.method == Method::HEAD;
    let raw = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let err = S3Err::bad("IncompleteBody", format!("cannot read the body: {e}"));
            return Ok(err.into_response(head, parts.uri.path()));
        }
    };
    let path = parts.uri.path().to_string();
    let req = match Req::parse(parts, raw) {
        Ok(r) => r,
        Err(e) => return Ok(e.into_response(head, &path)),
    };
    let op = Op::of(&req);
    state.counts[op as usize].fetch_add(1, Ordering::Relaxed);
    Ok(dispatch(&state, op, &req).unwrap_or_else(|e| e.into_response(head, &req.resource())))
}

fn dispatch(s: &State, op: Op, r: &Req) -> Res {
    match op {
        Op::ListBuckets => list_buckets(s),
        Op::CreateBucket => create_bucket(s, r),
        Op::DeleteBucket => delete_bucket(s, r),
        Op::HeadBucket => s.bucket(&r.bucket).and_then(|_| {
            Answer::ok()
                .header("x-amz-bucket-region", "us-east-1")
                .empty()
        }),
        Op::GetBucketLocation => s.bucket(&r.bucket).and_then(|_| {
            Answer::ok().xml(format!("{XML_DECL}<LocationConstraint xmlns=\"{XMLNS}\"/>"))
        }),
        Op::GetBucketVersioning => get_versioning(s, r),
        Op::PutBucketVersioning => put_versioning(s, r),
        Op::ListObjectVersions => list_versions(s, r),
        Op::ListObjectsV2 => list_objects_v2(s, r),
        Op::ListObjects => list_objects_v1(s, r),
        Op::ListMultipartUploads => list_uploads(s, r),
        Op::DeleteObjects => delete_objects(s, r),
        Op::HeadObject | Op::GetObject => get_object(s, r, op == Op::HeadObject),
        Op::GetObjectTagging => get_tagging(s, r),
        Op::PutObjectTagging => put_tagging(s, r, true),
        Op::DeleteObjectTagging => put_tagging(s, r, false),
        Op::PutObject => put_object(s, r),
        Op::CopyObject => copy_object(s, r),
        Op::DeleteObject => delete_object(s, r),
        Op::CreateMultipartUpload => create_upload(s, r),
        Op::UploadPart | Op::UploadPartCopy => upload_part(s, r, op == Op::UploadPartCopy),
        Op::CompleteMultipartUpload => complete_upload(s, r),
        Op::AbortMultipartUpload => abort_upload(s, r),
        Op::Unsupported => Err(S3Err::new(
            StatusCode::NOT_IMPLEMENTED,
            "NotImplemented",
            format!("mem-s3 does not implement {} {}", r.method, r.resource()),
        )),
    }
}

// ---------- buckets ----------

fn list_buckets(s: &State) -> Res {
    let buckets = s.buckets.read().unwrap_or_else(|e| e.into_inner());
    let mut xml = format!(
        "{XML_DECL}<ListAllMyBucketsResult xmlns=\"{XMLNS}\"><Owner><ID>mem-s3</ID>\
         <DisplayName>mem-s3</DisplayName></Owner><Buckets>"
    );
    for (name, b) in buckets.iter() {
        let _ = write!(
            xml,
            "<Bucket><Name>{}</Name><CreationDate>{}</CreationDate></Bucket>",
            xml_escape(name),
            iso_time(b.created_ms)
        );
    }
    xml.push_str("</Buckets></ListAllMyBucketsResult>");
    Answer::ok().xml(xml)
}

fn create_bucket(s: &State, r: &Req) -> Res {
    if s.create_bucket(&r.bucket, Versioning::Never) {
        Answer::ok()
            .header("location", format!("/{}", r.bucket))
            .empty()
    } else {
        Err(S3Err::new(
            StatusCode::CONFLICT,
            "BucketAlreadyOwnedByYou",
            "Your previous request to create the named bucket succeeded and you already own it.",
        ))
    }
}

fn delete_bucket(s: &State, r: &Req) -> Res {
    let b = s.bucket(&r.bucket)?;
    if !b.keys.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
        return Err(S3Err::new(
            StatusCode::CONFLICT,
            "BucketNotEmpty",
            "The bucket you tried to delete is not empty",
        ));
    }
    let mut buckets = s.buckets.write().unwrap_or_else(|e| e.into_inner());
    buckets.remove(&r.bucket);
    Answer::new(StatusCode::NO_CONTENT).empty()
}

fn get_versioning(s: &State, r: &Req) -> Res {
    let status = match s.bucket(&r.bucket)?.versioning() {
        Versioning::Never => String::new(),
        Versioning::Enabled => "<Status>Enabled</Status>".into(),
        Versioning::Suspended => "<Status>Suspended</Status>".into(),
    };
    Answer::ok().xml(format!(
        "{XML_DECL}<VersioningConfiguration xmlns=\"{XMLNS}\">{status}</VersioningConfiguration>"
    ))
}

fn put_versioning(s: &State, r: &Req) -> Res {
    let b = s.bucket(&r.bucket)?;
    let conf = xml_records(&r.body, "VersioningConfiguration")?;
    let status = conf
        .first()
        .and_then(|c| c.get("Status"))
        .map(String::as_str);
    let v = match status {
        Some("Enabled") => Versioning::Enabled,
        Some("Suspended") => Versioning::Suspended,
        other => {
            return Err(S3Err::bad(
                "MalformedXML",
                format!("versioning status {other:?} is not Enabled or Suspended"),
            ))
        }
    };
    *b.versioning.lock().unwrap_or_else(|e| e.into_inner()) = v;
    Answer::ok().empty()
}

// ---------- listings ----------

/// Parameters shared by the listings.
struct ListArgs {
    prefix: String,
    delimiter: Option<String>,
    max: usize,
    url: bool,
}

impl ListArgs {
    fn of(r: &Req, max_name: &str) -> Result<ListArgs, S3Err> {
        Ok(ListArgs {
            prefix: r.q("prefix").unwrap_or_default().to_string(),
            delimiter: r
                .q("delimiter")
                .filter(|d| !d.is_empty())
                .map(str::to_string),
            max: r.num(max_name, 1000)?.min(1000) as usize,
            url: r.q("encoding-type") == Some("url"),
        })
    }

    /// A key (or marker) as the listing shows it.
    fn show(&self, s: &str) -> String {
        if self.url {
            xml_escape(&form_encode(s))
        } else {
            xml_escape(s)
        }
    }

    /// The common prefix `key` rolls up into, if any.
    fn rollup(&self, key: &str) -> Option<String> {
        let d = self.delimiter.as_deref()?;
        let rest = key.get(self.prefix.len()..)?;
        let at = rest.find(d)?;
        Some(format!("{}{}", self.prefix, &rest[..at + d.len()]))
    }

    fn head(&self, xml: &mut String, bucket: &str) {
        let _ = write!(
            xml,
            "<Name>{}</Name><Prefix>{}</Prefix><MaxKeys>{}</MaxKeys>",
            xml_escape(bucket),
            self.show(&self.prefix),
            self.max
        );
        if let Some(d) = &self.delimiter {
            let _ = write!(xml, "<Delimiter>{}</Delimiter>", self.show(d));
        }
        if self.url {
            xml.push_str("<EncodingType>url</EncodingType>");
        }
    }
}

/// Where a version listing resumes: keys after `key` (or, with a version, the versions
/// of `key` older than that one, then the keys after it).
struct Resume {
    key: Option<String>,
    version: Option<u64>,
}

/// The lower bound of the keys a listing visits.
fn start_bound<'a>(prefix: &'a str, marker: Option<&'a str>, inclusive: bool) -> Bound<&'a str> {
    match marker {
        Some(m) if m >= prefix => {
            if inclusive {
                Bound::Included(m)
            } else {
                Bound::Excluded(m)
            }
        }
        _ if !prefix.is_empty() => Bound::Included(prefix),
        _ => Bound::Unbounded,
    }
}

/// ListObjectVersions: keys ascending, each key's versions and delete markers newest
/// first, common prefixes rolled up, at most `max-keys` entries.
fn list_versions(s: &State, r: &Req) -> Res {
    let b = s.bucket(&r.bucket)?;
    let a = ListArgs::of(r, "max-keys")?;
    let resume = Resume {
        key: r
            .q("key-marker")
            .filter(|k| !k.is_empty())
            .map(str::to_string),
        version: match r.q("version-id-marker").filter(|v| !v.is_empty()) {
            Some(v) => Some(parse_version_id(v)?),
            None => None,
        },
    };
    let mut xml = format!("{XML_DECL}<ListVersionsResult xmlns=\"{XMLNS}\">");
    a.head(&mut xml, &r.bucket);
    let _ = write!(
        xml,
        "<KeyMarker>{}</KeyMarker><VersionIdMarker>{}</VersionIdMarker>",
        a.show(resume.key.as_deref().unwrap_or_default()),
        r.q("version-id-marker").map(xml_escape).unwrap_or_default()
    );
    let mut body = String::new();
    let next = {
        let keys = b.keys.lock().unwrap_or_else(|e| e.into_inner());
        walk_versions(&keys, &a, &resume, &mut body)
    };
    match next {
        Some((key, version)) => {
            let _ = write!(
                xml,
                "<IsTruncated>true</IsTruncated><NextKeyMarker>{}</NextKeyMarker>",
                a.show(&key)
            );
            if let Some(v) = version {
                let _ = write!(
                    xml,
                    "<NextVersionIdMarker>{}</NextVersionIdMarker>",
                    version_id(v)
                );
            }
        }
        None => xml.push_str("<IsTruncated>false</IsTruncated>"),
    }
    xml.push_str(&body);
    xml.push_str("</ListVersionsResult>");
    Answer::ok().xml(xml)
}

/// The keys from `lower` on that start with `prefix` (`lower` is never below `prefix`).
fn keys_under<'a>(
    keys: &'a BTreeMap<String, Vec<Version>>,
    prefix: &'a str,
    lower: Bound<&'a str>,
) -> impl Iterator<Item = (&'a String, &'a Vec<Version>)> + 'a {
    keys.range::<str, _>((lower, Bound::Unbounded))
        .take_while(move |(k, _)| k.starts_with(prefix))
}

/// Writes the entries of one version listing page into `out`; returns the next markers
/// when the listing is truncated.
fn walk_versions(
    keys: &BTreeMap<String, Vec<Version>>,
    a: &ListArgs,
    resume: &Resume,
    out: &mut String,
) -> Option<(String, Option<u64>)> {
    let marker = resume.key.as_deref();
    let lower = start_bound(&a.prefix, marker, resume.version.is_some());
    // A marker that is a common prefix skips everything under it.
    let skip_under = marker.filter(|m| {
        resume.version.is_none() && a.delimiter.as_deref().is_some_and(|d| m.ends_with(d))
    });
    let mut count = 0;
    let mut last: Option<(String, Option<u64>)> = None;
    let mut last_prefix: Option<String> = None;
    for (key, history) in keys_under(keys, &a.prefix, lower) {
        if skip_under.is_some_and(|m| key.starts_with(m)) {
            continue;
        }
        if let Some(cp) = a.rollup(key) {
            if last_prefix.as_deref() == Some(cp.as_str()) {
                continue;
            }
            if count == a.max {
                return last;
            }
            let _ = write!(
                out,
                "<CommonPrefixes><Prefix>{}</Prefix></CommonPrefixes>",
                a.show(&cp)
            );
            count += 1;
            last = Some((cp.clone(), None));
            last_prefix = Some(cp);
            continue;
        }
        let mut newest = history.iter().rev().enumerate().peekable();
        if marker == Some(key.as_str()) {
            if let Some(after) = resume.version {
                // Resume after the marker version.
                while newest.next_if(|(_, v)| v.id != after).is_some() {}
                newest.next();
            }
        }
        for (i, v) in newest {
            if count == a.max {
                return last;
            }
            write_version(out, a, key, v, i == 0);
            count += 1;
            last = Some((key.clone(), Some(v.id)));
        }
    }
    None
}

fn write_version(out: &mut String, a: &ListArgs, key: &str, v: &Version, latest: bool) {
    let common = |out: &mut String| {
        let _ = write!(
            out,
            "<Key>{}</Key><VersionId>{}</VersionId><IsLatest>{latest}</IsLatest>\
             <LastModified>{}</LastModified>",
            a.show(key),
            version_id(v.id),
            iso_time(v.modified_ms)
        );
    };
    match &v.obj {
        None => {
            out.push_str("<DeleteMarker>");
            common(out);
            out.push_str("</DeleteMarker>");
        }
        Some(o) => {
            out.push_str("<Version>");
            common(out);
            let _ = write!(
                out,
                "<ETag>{}</ETag><Size>{}</Size><StorageClass>{}</StorageClass>",
                xml_escape(&o.etag()),
                o.body.len(),
                xml_escape(o.meta.storage_class())
            );
            if let Some((alg, _)) = &o.meta.checksum {
                let _ = write!(
                    out,
                    "<ChecksumAlgorithm>{}</ChecksumAlgorithm>",
                    alg.to_uppercase()
                );
            }
            out.push_str("</Version>");
        }
    }
}

/// ListObjectsV2: each key's current version, unless it is a delete marker. Continuation
/// tokens are `K:KEY` (resume after KEY) or `P:PREFIX` (resume after everything under PREFIX).
fn list_objects_v2(s: &State, r: &Req) -> Res {
    let b = s.bucket(&r.bucket)?;
    let a = ListArgs::of(r, "max-keys")?;
    let token = r.q("continuation-token").filter(|t| !t.is_empty());
    let after = token.or_else(|| r.q("start-after").filter(|t| !t.is_empty()));
    let mut body = String::new();
    let (count, next) = {
        let keys = b.keys.lock().unwrap_or_else(|e| e.into_inner());
        walk_current(&keys, &a, after, token.is_some(), &mut body)
    };
    let mut xml = format!("{XML_DECL}<ListBucketResult xmlns=\"{XMLNS}\">");
    a.head(&mut xml, &r.bucket);
    let _ = write!(xml, "<KeyCount>{count}</KeyCount>");
    if let Some(t) = token {
        let _ = write!(
            xml,
            "<ContinuationToken>{}</ContinuationToken>",
            xml_escape(t)
        );
    }
    match next {
        Some(next) => {
            let _ = write!(
                xml,
                "<IsTruncated>true</IsTruncated><NextContinuationToken>{}</NextContinuationToken>",
                xml_escape(&next)
            );
        }
        None => xml.push_str("<IsTruncated>false</IsTruncated>"),
    }
    xml.push_str(&body);
    xml.push_str("</ListBucketResult>");
    Answer::ok().xml(xml)
}

/// ListObjects (v1): as ListObjectsV2, resumed after `marker`; `NextMarker` is given when
/// truncated (the last key or common prefix shown).
fn list_objects_v1(s: &State, r: &Req) -> Res {
    let b = s.bucket(&r.bucket)?;
    let a = ListArgs::of(r, "max-keys")?;
    let marker = r.q("marker").unwrap_or_default();
    let mut body = String::new();
    // A marker that is a common prefix resumes after everything under it.
    let resume = match a.delimiter.as_deref() {
        _ if marker.is_empty() => None,
        Some(d) if marker.ends_with(d) => Some(format!("P:{marker}")),
        _ => Some(format!("K:{marker}")),
    };
    let (_, next) = {
        let keys = b.keys.lock().unwrap_or_else(|e| e.into_inner());
        walk_current(&keys, &a, resume.as_deref(), true, &mut body)
    };
    let mut xml = format!("{XML_DECL}<ListBucketResult xmlns=\"{XMLNS}\">");
    a.head(&mut xml, &r.bucket);
    let _ = write!(xml, "<Marker>{}</Marker>", a.show(marker));
    match next {
        Some(next) => {
            let last = next.get(2..).unwrap_or_default();
            let _ = write!(
                xml,
                "<IsTruncated>true</IsTruncated><NextMarker>{}</NextMarker>",
                a.show(last)
            );
        }
        None => xml.push_str("<IsTruncated>false</IsTruncated>"),
    }
    xml.push_str(&body);
    xml.push_str("</ListBucketResult>");
    Answer::ok().xml(xml)
}

/// Writes one ListObjectsV2 page into `out`, starting after `after` (a start-after key, or a
/// continuation token when `is_token`); returns the entry count and the next token when
/// the listing is truncated.
fn walk_current(
    keys: &BTreeMap<String, Vec<Version>>,
    a: &ListArgs,
    after: Option<&str>,
    is_token: bool,
    out: &mut String,
) -> (usize, Option<String>) {
    let (after, skip_under) = match after {
        Some(t) if is_token && t.starts_with("P:") => (Some(&t[2..]), Some(&t[2..])),
        Some(t) if is_token => (Some(t.strip_prefix("K:").unwrap_or(t)), None),
        other => (other, None),
    };
    let (mut count, mut last) = (0usize, String::new());
    for (key, history) in keys_under(keys, &a.prefix, start_bound(&a.prefix, after, false)) {
        let current = history.last().and_then(|v| v.obj.as_ref().map(|o| (v, o)));
        let Some((v, o)) = current else { continue };
        if skip_under.is_some_and(|p| key.starts_with(p)) {
            continue;
        }
        let cp = a.rollup(key);
        if cp.is_some() && last.strip_prefix("P:") == cp.as_deref() {
            continue;
        }
        if count == a.max {
            return (count, Some(last));
        }
        count += 1;
        last = match cp {
            Some(cp) => {
                let _ = write!(
                    out,
                    "<CommonPrefixes><Prefix>{}</Prefix></CommonPrefixes>",
                    a.show(&cp)
                );
                format!("P:{cp}")
            }
            None => {
                write_content(out, a, key, v, o);
                format!("K:{key}")
            }
        };
    }
    (count, None)
}

fn write_content(out: &mut String, a: &ListArgs, key: &str, v: &Version, o: &Object) {
    let _ = write!(
        out,
        "<Contents><Key>{}</Key><LastModified>{}</LastModified><ETag>{}</ETag>\
         <Size>{}</Size><StorageClass>{}</StorageClass></Contents>",
        a.show(key),
        iso_time(v.modified_ms),
        xml_escape(&o.etag()),
        o.body.len(),
        xml_escape(o.meta.storage_class())
    );
}

/// One upload of a ListMultipartUploads answer.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct UploadRow {
    key: String,
    seq: u64,
    id: String,
    initiated_ms: u64,
    class: String,
}

/// The uploads of bucket `bucket` under `prefix` after the markers, sorted, at most `max`;
/// and whether more follow.
fn uploads_after(
    s: &State,
    bucket: &str,
    prefix: &str,
    key_marker: &str,
    id_marker: Option<&str>,
    max: usize,
) -> (Vec<UploadRow>, bool) {
    let mut found: Vec<UploadRow> = {
        let uploads = s.uploads.lock().unwrap_or_else(|e| e.into_inner());
        uploads
            .iter()
            .filter(|(_, u)| u.bucket == bucket && u.key.starts_with(prefix))
            .map(|(id, u)| UploadRow {
                key: u.key.clone(),
                seq: u.seq,
                id: id.clone(),
                initiated_ms: u.initiated_ms,
                class: u.meta.storage_class().to_string(),
            })
            .collect()
    };
    found.sort();
    let marker_seq = id_marker.and_then(|m| found.iter().find(|u| u.id == m).map(|u| u.seq));
    found.retain(|u| match marker_seq {
        Some(seq) => u.key.as_str() > key_marker || (u.key == key_marker && u.seq > seq),
        None => key_marker.is_empty() || u.key.as_str() > key_marker,
    });
    let truncated = found.len() > max;
    found.truncate(max);
    (found, truncated)
}

/// ListMultipartUploads: uploads in progress by key, then by age.
fn list_uploads(s: &State, r: &Req) -> Res {
    s.bucket(&r.bucket)?;
    let a = ListArgs::of(r, "max-uploads")?;
    let key_marker = r.q("key-marker").unwrap_or_default();
    let id_marker = r.q("upload-id-marker").filter(|m| !m.is_empty());
    let (found, truncated) = uploads_after(s, &r.bucket, &a.prefix, key_marker, id_marker, a.max);
    let mut xml = format!(
        "{XML_DECL}<ListMultipartUploadsResult xmlns=\"{XMLNS}\"><Bucket>{}</Bucket>\
         <KeyMarker>{}</KeyMarker><UploadIdMarker>{}</UploadIdMarker><Prefix>{}</Prefix>\
         <MaxUploads>{}</MaxUploads><IsTruncated>{truncated}</IsTruncated>",
        xml_escape(&r.bucket),
        a.show(key_marker),
        xml_escape(id_marker.unwrap_or_default()),
        a.show(&a.prefix),
        a.max
    );
    if let (true, Some(last)) = (truncated, found.last()) {
        let _ = write!(
            xml,
            "<NextKeyMarker>{}</NextKeyMarker><NextUploadIdMarker>{}</NextUploadIdMarker>",
            a.show(&last.key),
            xml_escape(&last.id)
        );
    }
    if a.url {
        xml.push_str("<EncodingType>url</EncodingType>");
    }
    for u in &found {
        let _ = write!(
            xml,
            "<Upload><Key>{}</Key><UploadId>{}</UploadId><Initiator><ID>mem-s3</ID>\
             <DisplayName>mem-s3</DisplayName></Initiator><Owner><ID>mem-s3</ID>\
             <DisplayName>mem-s3</DisplayName></Owner><StorageClass>{}</StorageClass>\
             <Initiated>{}</Initiated></Upload>",
            a.show(&u.key),
            xml_escape(&u.id),
            xml_escape(&u.class),
            iso_time(u.initiated_ms)
        );
    }
    xml.push_str("</ListMultipartUploadsResult>");
    Answer::ok().xml(xml)
}

// ---------- objects ----------

fn no_such_key() -> S3Err {
    S3Err::new(
        StatusCode::NOT_FOUND,
        "NoSuchKey",
        "The specified key does not exist.",
    )
}

fn no_such_version() -> S3Err {
    S3Err::new(
        StatusCode::NOT_FOUND,
        "NoSuchVersion",
        "The specified version does not exist.",
    )
}

/// The entry a request names (`want`, or the key's current one) and whether it is the
/// key's current entry.
fn find_version(b: &Bucket, key: &str, want: Option<u64>) -> Result<(Version, bool), S3Err> {
    let keys = b.keys.lock().unwrap_or_else(|e| e.into_inner());
    let history = keys.get(key).filter(|h| !h.is_empty());
    let Some(history) = history else {
        return Err(if want.is_some() {
            no_such_version()
        } else {
            no_such_key()
        });
    };
    match want {
        None => Ok((history[history.len() - 1].clone(), true)),
        Some(id) => {
            let at = history
                .iter()
                .rposition(|v| v.id == id)
                .ok_or_else(no_such_version)?;
            Ok((history[at].clone(), at + 1 == history.len()))
        }
    }
}

/// The object version a read names; a delete marker answers as S3 does (404 when it is
/// current, 405 when named by version id).
fn readable(b: &Bucket, key: &str, want: Option<u64>) -> Result<(Version, Arc<Object>), S3Err> {
    let (v, _) = find_version(b, key, want)?;
    match &v.obj {
        Some(o) => {
            let o = o.clone();
            Ok((v, o))
        }
        None if want.is_some() => Err(S3Err::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "The specified method is not allowed against this resource.",
        )
        .header("x-amz-delete-marker", "true")
        .header("x-amz-version-id", version_id(v.id))
        .header("last-modified", http_time(v.modified_ms))),
        None => Err(no_such_key()
            .header("x-amz-delete-marker", "true")
            .header("x-amz-version-id", version_id(v.id))),
    }
}

fn with_version(a: Answer, b: &Bucket, id: u64) -> Answer {
    if b.versioning() == Versioning::Never {
        a
    } else {
        a.header("x-amz-version-id", version_id(id))
    }
}

/// The headers HEAD and GET describe an object version with.
fn object_headers(mut a: Answer, v: &Version, o: &Object, checksum: bool) -> Answer {
    a = a
        .header("etag", o.etag())
        .header("last-modified", http_time(v.modified_ms))
        .header("accept-ranges", "bytes");
    if !o.meta.content.iter().any(|(n, _)| *n == "content-type") {
        a = a.header("content-type", "binary/octet-stream");
    }
    for (n, val) in &o.meta.content {
        a = a.header(n, val);
    }
    for (n, val) in &o.meta.storage {
        if !(*n == "x-amz-storage-class" && val == "STANDARD") {
            a = a.header(n, val);
        }
    }
    for (k, val) in &o.meta.user {
        a = a.header(&format!("x-amz-meta-{k}"), val);
    }
    if !o.tags.is_empty() {
        a = a.header("x-amz-tagging-count", o.tags.len().to_string());
    }
    if let (true, Some((alg, val))) = (checksum, &o.meta.checksum) {
        a = a
            .header(&format!("x-amz-checksum-{alg}"), val)
            .header("x-amz-checksum-type", "FULL_OBJECT");
    }
    a
}

/// HeadObject and GetObject, with `versionId`, `Range` and `partNumber`.
fn get_object(s: &State, r: &Req, head: bool) -> Res {
    let b = s.bucket(&r.bucket)?;
    let (v, o) = readable(&b, &r.key, r.version_arg()?)?;
    let etag = o.etag();
    if let Some(m) = r.h("if-match") {
        if m != "*" && m.trim_matches('"') != etag.trim_matches('"') {
            return Err(S3Err::new(
                StatusCode::PRECONDITION_FAILED,
                "PreconditionFailed",
                "At least one of the pre-conditions you specified did not hold",
            ));
        }
    }
    if r.h("if-none-match")
        .is_some_and(|m| m == "*" || m.trim_matches('"') == etag.trim_matches('"'))
    {
        return with_version(Answer::new(StatusCode::NOT_MODIFIED), &b, v.id).empty();
    }
    let total = o.body.len() as u64;
    let (range, parts) = read_range(r, &o)?;
    let status = if range.is_some() {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let checksum = r.h("x-amz-checksum-mode") == Some("ENABLED") && range.is_none();
    let mut a = with_version(
        object_headers(Answer::new(status), &v, &o, checksum),
        &b,
        v.id,
    );
    if let Some((first, last)) = range {
        a = a.header("content-range", format!("bytes {first}-{last}/{total}"));
    }
    if let Some(n) = parts {
        a = a.header("x-amz-mp-parts-count", n.to_string());
    }
    let body = match range {
        Some((first, last)) => o.body.slice(first as usize..=last as usize),
        None => o.body.clone(),
    };
    a = a.header("content-length", body.len().to_string());
    Ok(a.body(if head { Bytes::new() } else { body }))
}

/// The byte range a read asks for (inclusive), and the parts count when it names a part.
/// An inclusive byte range, and the object's part count when a part was asked for.
type ReadRange = (Option<(u64, u64)>, Option<usize>);

fn read_range(r: &Req, o: &Object) -> Result<ReadRange, S3Err> {
    let total = o.body.len() as u64;
    let part = match r.q("partNumber") {
        Some(p) => Some(
            p.parse::<usize>()
                .map_err(|_| S3Err::bad("InvalidArgument", format!("invalid partNumber: {p}")))?,
        ),
        None => None,
    };
    let not_satisfiable = || {
        S3Err::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "InvalidPartNumber",
            "The requested partnumber is not satisfiable",
        )
    };
    match (part, r.h("range")) {
        (Some(_), Some(_)) => Err(S3Err::bad(
            "InvalidRequest",
            "Cannot specify both Range header and partNumber query parameter",
        )),
        (Some(1), None) if o.parts.is_empty() => Ok((None, None)),
        (Some(n), None) if n >= 1 && n <= o.parts.len() => {
            let first: u64 = o.parts[..n - 1].iter().sum();
            let size = o.parts[n - 1];
            let range = (size > 0).then(|| (first, first + size - 1));
            Ok((range, Some(o.parts.len())))
        }
        (Some(_), None) => Err(not_satisfiable()),
        (None, Some(h)) => Ok((parse_range(h, total)?, None)),
        (None, None) => Ok((None, None)),
    }
}

/// An HTTP `Range: bytes=...` header against an object of `total` bytes (inclusive
/// bounds); a header S3 would ignore gives `None` (the whole object).
fn parse_range(h: &str, total: u64) -> Result<Option<(u64, u64)>, S3Err> {
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let invalid = || {
        S3Err::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "InvalidRange",
            "The requested range is not satisfiable",
        )
        .header("content-range", format!("bytes */{total}"))
    };
    let (first, last) = match (a.trim().parse::<u64>().ok(), b.trim().parse::<u64>().ok()) {
        (Some(first), Some(last)) if first <= last => (first, last.min(total.saturating_sub(1))),
        (Some(first), None) if b.trim().is_empty() => (first, total.saturating_sub(1)),
        (None, Some(n)) if a.trim().is_empty() => {
            if n == 0 {
                return Err(invalid());
            }
            (total.saturating_sub(n), total.saturating_sub(1))
        }
        _ => return Ok(None),
    };
    if first >= total {
        return Err(invalid());
    }
    Ok(Some((first, last)))
}

fn put_object(s: &State, r: &Req) -> Res {
    let b = s.bucket(&r.bucket)?;
    if r.h("if-none-match") == Some("*") && readable(&b, &r.key, None).is_ok() {
        return Err(S3Err::new(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailed",
            "At least one of the pre-conditions you specified did not hold",
        ));
    }
    let obj = Object {
        md5: Md5::digest(&r.body).into(),
        body: r.body.clone(),
        parts: Vec::new(),
        meta: Arc::new(r.meta()),
        tags: r.tagging_header(),
    };
    let etag = obj.etag();
    let checksum = obj.meta.checksum.clone();
    let id = s.add_version(&b, &r.key, Some(Arc::new(obj)));
    let mut a = with_version(Answer::ok().header("etag", etag), &b, id);
    if let Some((alg, v)) = checksum {
        a = a.header(&format!("x-amz-checksum-{alg}"), v);
    }
    a.empty()
}

/// The version a copy reads: `x-amz-copy-source: [/]BUCKET/KEY[?versionId=ID]`, the key
/// URL-encoded. Returns the source bucket, whether that version is its key's current
/// one, the version and its object.
fn copy_source(s: &State, r: &Req) -> Result<(Arc<Bucket>, bool, Version, Arc<Object>), S3Err> {
    let raw = r.h("x-amz-copy-source").unwrap_or_default();
    let (path, query) = raw.split_once('?').unwrap_or((raw, ""));
    let path = pct_decode(path.trim_start_matches('/'));
    let (bucket, key) = path
        .split_once('/')
        .filter(|(b, k)| !b.is_empty() && !k.is_empty())
        .ok_or_else(|| {
            S3Err::bad(
                "InvalidArgument",
                "Copy Source must mention the source bucket and key: sourcebucket/sourcekey",
            )
        })?;
    let want = query
        .split('&')
        .find_map(|p| p.strip_prefix("versionId="))
        .map(|v| parse_version_id(&pct_decode(v)))
        .transpose()?;
    let sb = s.bucket(bucket)?;
    let (v, latest) = find_version(&sb, key, want)?;
    let Some(o) = v.obj.clone() else {
        return Err(match want {
            Some(_) => S3Err::bad(
                "InvalidRequest",
                "The source of a copy request may not specifically refer to a delete marker by version id.",
            ),
            None => no_such_key(),
        });
    };
    if let Some(m) = r.h("x-amz-copy-source-if-match") {
        if m.trim_matches('"') != o.etag().trim_matches('"') {
            return Err(S3Err::new(
                StatusCode::PRECONDITION_FAILED,
                "PreconditionFailed",
                "At least one of the pre-conditions you specified did not hold",
            ));
        }
    }
    let same_key = bucket == r.bucket && key == r.key;
    Ok((sb, same_key && latest, v, o))
}

/// CopyObject, with the metadata and tagging directives.
fn copy_object(s: &State, r: &Req) -> Res {
    let b = s.bucket(&r.bucket)?;
    let (sb, onto_itself, sv, so) = copy_source(s, r)?;
    let replace = r
        .h("x-amz-metadata-directive")
        .is_some_and(|d| d.eq_ignore_ascii_case("REPLACE"));
    if onto_itself && !replace && r.storage_headers().is_empty() {
        return Err(S3Err::bad(
            "InvalidRequest",
            "This copy request is illegal because it is trying to copy an object to itself \
             without changing the object's metadata, storage class, website redirect location \
             or encryption attributes.",
        ));
    }
    let meta = copied_meta(r, &so, replace);
    let replace_tags = r
        .h("x-amz-tagging-directive")
        .is_some_and(|d| d.eq_ignore_ascii_case("REPLACE"));
    let obj = Object {
        // A copy is a single-part object, whatever the source's layout.
        md5: if so.parts.is_empty() {
            so.md5
        } else {
            Md5::digest(&so.body).into()
        },
        body: so.body.clone(),
        parts: Vec::new(),
        meta: Arc::new(meta),
        tags: if replace_tags {
            r.tagging_header()
        } else {
            so.tags.clone()
        },
    };
    let (etag, checksum) = (obj.etag(), obj.meta.checksum.clone());
    let id = s.add_version(&b, &r.key, Some(Arc::new(obj)));
    let mut xml = format!(
        "{XML_DECL}<CopyObjectResult xmlns=\"{XMLNS}\"><LastModified>{}</LastModified><ETag>{}</ETag>",
        iso_time(s.now_ms()),
        xml_escape(&etag)
    );
    if let Some((alg, v)) = &checksum {
        let name = checksum_element(alg);
        let _ = write!(xml, "<{name}>{}</{name}>", xml_escape(v));
    }
    xml.push_str("</CopyObjectResult>");
    let mut a = with_version(Answer::ok(), &b, id);
    if sb.versioning() != Versioning::Never {
        a = a.header("x-amz-copy-source-version-id", version_id(sv.id));
    }
    a.xml(xml)
}

/// The metadata of a copy: the source's content headers and user metadata (COPY) or the
/// request's (REPLACE); storage headers always from the request; the source's checksum
/// when the algorithm is kept and the source is single-part.
fn copied_meta(r: &Req, so: &Object, replace: bool) -> Meta {
    let mut meta = if replace {
        r.meta()
    } else {
        Meta {
            content: so.meta.content.clone(),
            storage: r.storage_headers(),
            user: so.meta.user.clone(),
            checksum: None,
        }
    };
    let wanted = r.h("x-amz-checksum-algorithm").map(str::to_ascii_lowercase);
    meta.checksum = so
        .meta
        .checksum
        .clone()
        .filter(|(alg, _)| so.parts.is_empty() && wanted.as_deref().is_none_or(|w| w == *alg));
    meta
}

fn checksum_element(alg: &str) -> &'static str {
    match alg {
        "crc32" => "ChecksumCRC32",
        "crc32c" => "ChecksumCRC32C",
        "crc64nvme" => "ChecksumCRC64NVME",
        "sha1" => "ChecksumSHA1",
        _ => "ChecksumSHA256",
    }
}

/// Removes one version for good; returns whether it existed and was a delete marker.
fn remove_version(b: &Bucket, key: &str, id: u64) -> Option<bool> {
    let mut keys = b.keys.lock().unwrap_or_else(|e| e.into_inner());
    let history = keys.get_mut(key)?;
    let at = history.iter().position(|v| v.id == id)?;
    let removed = history.remove(at);
    if history.is_empty() {
        keys.remove(key);
    }
    Some(removed.obj.is_none())
}

/// Deletes a version (with an id) or adds a delete marker (without); returns the version
/// id to show, whether a delete marker was added or removed, and the marker's id.
fn delete_one(s: &State, b: &Bucket, key: &str, want: Option<u64>) -> (Option<u64>, bool) {
    match want {
        Some(id) => (Some(id), remove_version(b, key, id).unwrap_or(false)),
        None if b.versioning() == Versioning::Never => {
            s.add_version(b, key, None);
            (None, false)
        }
        None => (Some(s.add_version(b, key, None)), true),
    }
}

fn delete_object(s: &State, r: &Req) -> Res {
    let b = s.bucket(&r.bucket)?;
    let (id, marker) = delete_one(s, &b, &r.key, r.version_arg()?);
    let mut a = Answer::new(StatusCode::NO_CONTENT);
    if let Some(id) = id {
        a = a.header("x-amz-version-id", version_id(id));
    }
    if marker {
        a = a.header("x-amz-delete-marker", "true");
    }
    a.empty()
}

/// DeleteObjects: each `<Object>` as DeleteObject would.
fn delete_objects(s: &State, r: &Req) -> Res {
    let b = s.bucket(&r.bucket)?;
    let quiet = xml_records(&r.body, "Delete")?
        .first()
        .and_then(|d| d.get("Quiet"))
        .is_some_and(|q| q == "true");
    let mut xml = format!("{XML_DECL}<DeleteResult xmlns=\"{XMLNS}\">");
    for o in xml_records(&r.body, "Object")? {
        let key = o.get("Key").cloned().unwrap_or_default();
        let want = o
            .get("VersionId")
            .map(|v| parse_version_id(v))
            .transpose()?;
        let (id, marker) = delete_one(s, &b, &key, want);
        if quiet {
            continue;
        }
        let _ = write!(xml, "<Deleted><Key>{}</Key>", xml_escape(&key));
        match (want, id) {
            (Some(w), _) => {
                let _ = write!(xml, "<VersionId>{}</VersionId>", version_id(w));
                if marker {
                    let _ = write!(xml, "<DeleteMarker>true</DeleteMarker><DeleteMarkerVersionId>{}</DeleteMarkerVersionId>", version_id(w));
                }
            }
            (None, Some(m)) if marker => {
                let _ = write!(xml, "<DeleteMarker>true</DeleteMarker><DeleteMarkerVersionId>{}</DeleteMarkerVersionId>", version_id(m));
            }
            _ => {}
        }
        xml.push_str("</Deleted>");
    }
    xml.push_str("</DeleteResult>");
    Answer::ok().xml(xml)
}

fn get_tagging(s: &State, r: &Req) -> Res {
    let b = s.bucket(&r.bucket)?;
    let (v, o) = readable(&b, &r.key, r.version_arg()?)?;
    let mut xml = format!("{XML_DECL}<Tagging xmlns=\"{XMLNS}\"><TagSet>");
    for (k, val) in &o.tags {
        let _ = write!(
            xml,
            "<Tag><Key>{}</Key><Value>{}</Value></Tag>",
            xml_escape(k),
            xml_escape(val)
        );
    }
    xml.push_str("</TagSet></Tagging>");
    with_version(Answer::ok(), &b, v.id).xml(xml)
}

/// PutObjectTagging (`set`) or DeleteObjectTagging on one version.
fn put_tagging(s: &State, r: &Req, set: bool) -> Res {
    let b = s.bucket(&r.bucket)?;
    let (v, o) = readable(&b, &r.key, r.version_arg()?)?;
    let mut tags = Vec::new();
    if set {
        for t in xml_records(&r.body, "Tag")? {
            let key = t.get("Key").cloned().unwrap_or_default();
            tags.push((key, t.get("Value").cloned().unwrap_or_default()));
        }
        tags.sort();
    }
    let tagged = Arc::new(o.with_tags(tags));
    {
        let mut keys = b.keys.lock().unwrap_or_else(|e| e.into_inner());
        let entry = keys
            .get_mut(&r.key)
            .and_then(|h| h.iter_mut().find(|x| x.id == v.id))
            .ok_or_else(no_such_version)?;
        entry.obj = Some(tagged);
    }
    let status = if set {
        StatusCode::OK
    } else {
        StatusCode::NO_CONTENT
    };
    with_version(Answer::new(status), &b, v.id).empty()
}

// ---------- multipart uploads ----------

fn no_such_upload() -> S3Err {
    S3Err::new(
        StatusCode::NOT_FOUND,
        "NoSuchUpload",
        "The specified upload does not exist. The upload ID may be invalid, or the upload may have been aborted or completed.",
    )
}

fn create_upload(s: &State, r: &Req) -> Res {
    s.bucket(&r.bucket)?;
    let seq = s.next_seq();
    let id = format!("{}{}", version_id(seq), "-upload");
    let upload = Upload {
        bucket: r.bucket.clone(),
        key: r.key.clone(),
        seq,
        initiated_ms: s.now_ms(),
        meta: Arc::new(Meta {
            checksum: None,
            ..r.meta()
        }),
        tags: r.tagging_header(),
        parts: BTreeMap::new(),
    };
    s.uploads
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.clone(), upload);
    let mut a = Answer::ok();
    if let Some(alg) = r.h("x-amz-checksum-algorithm") {
        a = a.header("x-amz-checksum-algorithm", alg);
    }
    a.xml(format!(
        "{XML_DECL}<InitiateMultipartUploadResult xmlns=\"{XMLNS}\"><Bucket>{}</Bucket>\
         <Key>{}</Key><UploadId>{}</UploadId></InitiateMultipartUploadResult>",
        xml_escape(&r.bucket),
        xml_escape(&r.key),
        xml_escape(&id)
    ))
}

/// The bytes an UploadPartCopy reads: `x-amz-copy-source-range: bytes=FIRST-LAST`
/// (inclusive, within the source) or the whole source.
fn copy_range(r: &Req, o: &Object) -> Result<Bytes, S3Err> {
    let Some(h) = r.h("x-amz-copy-source-range") else {
        return Ok(o.body.clone());
    };
    let total = o.body.len() as u64;
    let bad = || {
        S3Err::bad(
            "InvalidArgument",
            format!("The x-amz-copy-source-range value must be of the form bytes=first-last where first and last are the zero-based offsets of the first and last bytes to copy (got {h:?}, object size {total})"),
        )
    };
    let (a, b) = h
        .trim()
        .strip_prefix("bytes=")
        .and_then(|s| s.split_once('-'))
        .ok_or_else(bad)?;
    let first: u64 = a.trim().parse().map_err(|_| bad())?;
    let last: u64 = b.trim().parse().map_err(|_| bad())?;
    if first > last || last >= total {
        return Err(bad());
    }
    Ok(o.body.slice(first as usize..=last as usize))
}

/// UploadPart, or UploadPartCopy (`copy`).
fn upload_part(s: &State, r: &Req, copy: bool) -> Res {
    let n = r.num("partNumber", 0)?;
    if !(1..=10_000).contains(&n) {
        return Err(S3Err::bad(
            "InvalidArgument",
            "Part number must be an integer between 1 and 10000, inclusive",
        ));
    }
    let id = r.q("uploadId").unwrap_or_default();
    let (body, source_version) = if copy {
        let (sb, _, sv, so) = copy_source(s, r)?;
        let versioned = sb.versioning() != Versioning::Never;
        (copy_range(r, &so)?, versioned.then(|| version_id(sv.id)))
    } else {
        (r.body.clone(), None)
    };
    let part = Part {
        md5: Md5::digest(&body).into(),
        body,
        modified_ms: s.now_ms(),
    };
    let etag = format!("\"{}\"", hex::encode(part.md5));
    let modified = part.modified_ms;
    {
        let mut uploads = s.uploads.lock().unwrap_or_else(|e| e.into_inner());
        let u = uploads
            .get_mut(id)
            .filter(|u| u.bucket == r.bucket && u.key == r.key)
            .ok_or_else(no_such_upload)?;
        u.parts.insert(n as u32, part);
    }
    if !copy {
        let mut a = Answer::ok().header("etag", &etag);
        if let Some((alg, v)) = r.checksum() {
            a = a.header(&format!("x-amz-checksum-{alg}"), v);
        }
        return a.empty();
    }
    let mut a = Answer::ok();
    if let Some(v) = source_version {
        a = a.header("x-amz-copy-source-version-id", v);
    }
    a.xml(format!(
        "{XML_DECL}<CopyPartResult xmlns=\"{XMLNS}\"><LastModified>{}</LastModified>\
         <ETag>{}</ETag></CopyPartResult>",
        iso_time(modified),
        xml_escape(&etag)
    ))
}

/// The parts a CompleteMultipartUpload names, checked against the upload as S3 checks
/// them: ascending numbers, known parts with matching ETags, all but the last ≥ 5 MiB.
fn chosen_parts(u: &Upload, body: &[u8]) -> Result<Vec<u32>, S3Err> {
    let mut chosen = Vec::new();
    for p in xml_records(body, "Part")? {
        let n: u32 = p
            .get("PartNumber")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| S3Err::bad("MalformedXML", "a Part without a valid PartNumber"))?;
        if chosen.last().is_some_and(|l| *l >= n) {
            return Err(S3Err::bad(
                "InvalidPartOrder",
                "The list of parts was not in ascending order. Parts must be ordered by part number.",
            ));
        }
        let etag = p
            .get("ETag")
            .map(|e| e.trim_matches('"'))
            .unwrap_or_default();
        let known = u.parts.get(&n).filter(|part| hex::encode(part.md5) == etag);
        if known.is_none() {
            return Err(S3Err::bad(
                "InvalidPart",
                format!("One or more of the specified parts could not be found (part {n}, ETag {etag:?})."),
            ));
        }
        chosen.push(n);
    }
    if chosen.is_empty() {
        return Err(S3Err::bad(
            "MalformedXML",
            "You must specify at least one part",
        ));
    }
    let small = chosen[..chosen.len() - 1]
        .iter()
        .find(|n| (u.parts[n].body.len() as u64) < MIN_PART_SIZE);
    if let Some(n) = small {
        return Err(S3Err::bad(
            "EntityTooSmall",
            format!(
                "Your proposed upload is smaller than the minimum allowed object size (part {n})."
            ),
        ));
    }
    Ok(chosen)
}

fn complete_upload(s: &State, r: &Req) -> Res {
    let id = r.q("uploadId").unwrap_or_default();
    let upload = {
        let mut uploads = s.uploads.lock().unwrap_or_else(|e| e.into_inner());
        let u = uploads
            .get(id)
            .filter(|u| u.bucket == r.bucket && u.key == r.key)
            .ok_or_else(no_such_upload)?;
        let chosen = chosen_parts(u, &r.body)?;
        let mut u = uploads.remove(id).ok_or_else(no_such_upload)?;
        u.parts.retain(|n, _| chosen.contains(n));
        u
    };
    let size: usize = upload.parts.values().map(|p| p.body.len()).sum();
    let mut body = BytesMut::with_capacity(size);
    let mut md5s = Md5::new();
    for p in upload.parts.values() {
        body.extend_from_slice(&p.body);
        md5s.update(p.md5);
    }
    let obj = Object {
        body: body.freeze(),
        md5: md5s.finalize().into(),
        parts: upload.parts.values().map(|p| p.body.len() as u64).collect(),
        meta: upload.meta.clone(),
        tags: upload.tags.clone(),
    };
    let etag = obj.etag();
    let b = s.bucket(&r.bucket)?;
    let vid = s.add_version(&b, &r.key, Some(Arc::new(obj)));
    with_version(Answer::ok(), &b, vid).xml(format!(
        "{XML_DECL}<CompleteMultipartUploadResult xmlns=\"{XMLNS}\"><Location>/{}/{}</Location>\
         <Bucket>{}</Bucket><Key>{}</Key><ETag>{}</ETag></CompleteMultipartUploadResult>",
        xml_escape(&r.bucket),
        xml_escape(&form_encode(&r.key)),
        xml_escape(&r.bucket),
        xml_escape(&r.key),
        xml_escape(&etag)
    ))
}

fn abort_upload(s: &State, r: &Req) -> Res {
    let id = r.q("uploadId").unwrap_or_default();
    let mut uploads = s.uploads.lock().unwrap_or_else(|e| e.into_inner());
    let known = uploads
        .get(id)
        .is_some_and(|u| u.bucket == r.bucket && u.key == r.key);
    if !known {
        return Err(no_such_upload());
    }
    uploads.remove(id);
    Answer::new(StatusCode::NO_CONTENT).empty()
}

// ---------- encodings ----------

const ID_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._";

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A version id as S3 shows it: "null", or 32 characters of `[A-Za-z0-9._]` (21 that
/// look random, then 11 that spell the sequence number).
fn version_id(n: u64) -> String {
    if n == NULL_VERSION {
        return "null".into();
    }
    let mut out = String::with_capacity(32);
    let (mut a, mut b) = (splitmix(n), splitmix(n ^ 0x5555));
    for i in 0..21 {
        let src = if i < 10 { &mut a } else { &mut b };
        out.push(ID_ALPHABET[(*src & 63) as usize] as char);
        *src >>= 6;
    }
    for i in (0..11).rev() {
        out.push(ID_ALPHABET[((n >> (6 * i)) & 63) as usize] as char);
    }
    out
}

fn parse_version_id(s: &str) -> Result<u64, S3Err> {
    if s == "null" {
        return Ok(NULL_VERSION);
    }
    let invalid = || {
        S3Err::bad(
            "InvalidArgument",
            format!("Invalid version id specified: {s}"),
        )
    };
    if s.len() != 32 {
        return Err(invalid());
    }
    let mut n: u64 = 0;
    for c in s[21..].bytes() {
        let d = ID_ALPHABET
            .iter()
            .position(|x| *x == c)
            .ok_or_else(invalid)?;
        n = (n << 6) | d as u64;
    }
    if version_id(n) == s {
        Ok(n)
    } else {
        Err(invalid())
    }
}

/// Year, month, day of a day count since 1970-01-01 (proleptic Gregorian).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// ISO 8601 with S3's listing resolution (whole seconds, `.000Z`).
fn iso_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = civil((secs / 86_400) as i64);
    let t = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.000Z",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

/// An HTTP date (RFC 7231), as in `Last-Modified`.
fn http_time(ms: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = ms / 1000;
    let days = secs / 86_400;
    let (y, m, d) = civil(days as i64);
    let t = secs % 86_400;
    format!(
        "{}, {d:02} {} {y:04} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(m - 1) as usize],
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

fn xml_escape(s: &str) -> String {
    if !s.contains(['&', '<', '>', '"', '\'']) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Characters `encoding-type=url` leaves as they are (besides letters and digits).
const FORM_KEEP: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'*')
    .remove(b'/')
    .remove(b' ');

/// S3's `encoding-type=url`: form encoding, a space is `+`.
fn form_encode(s: &str) -> String {
    utf8_percent_encode(s, FORM_KEEP)
        .to_string()
        .replace(' ', "+")
}

fn pct_decode(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

fn form_decode(s: &str) -> String {
    pct_decode(&s.replace('+', " "))
}

fn strip_aws_chunked(v: &str) -> String {
    v.split(',')
        .map(str::trim)
        .filter(|e| !e.eq_ignore_ascii_case("aws-chunked") && !e.is_empty())
        .collect::<Vec<_>>()
        .join(",")
}

/// Decodes an aws-chunked body (`HEX[;chunk-signature=...]\r\nDATA\r\n ... 0\r\n` then
/// trailing headers) into its data and trailers.
fn decode_aws_chunked(raw: &Bytes) -> Result<(Bytes, Vec<(String, String)>), S3Err> {
    let bad = || S3Err::bad("IncompleteBody", "malformed aws-chunked request body");
    let line_end = |from: usize| {
        raw.get(from..)
            .and_then(|rest| rest.windows(2).position(|w| w == b"\r\n"))
            .map(|p| from + p)
    };
    let mut out = BytesMut::new();
    let mut at = 0;
    loop {
        let end = line_end(at).ok_or_else(bad)?;
        let line = std::str::from_utf8(&raw[at..end]).map_err(|_| bad())?;
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| bad())?;
        at = end + 2;
        if size == 0 {
            break;
        }
        let data_end = at
            .checked_add(size)
            .filter(|e| e + 2 <= raw.len())
            .ok_or_else(bad)?;
        out.extend_from_slice(&raw[at..data_end]);
        at = data_end + 2;
    }
    let mut trailers = Vec::new();
    while at < raw.len() {
        let end = line_end(at).unwrap_or(raw.len());
        let line = String::from_utf8_lossy(&raw[at..end]).into_owned();
        at = end + 2;
        if line.is_empty() {
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            trailers.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok((out.freeze(), trailers))
}

/// The character an XML entity reference (`&amp;`, `&#x41;`, ...) stands for.
fn entity(r: &quick_xml::events::BytesRef<'_>) -> Result<char, String> {
    if let Some(c) = r.resolve_char_ref().map_err(|e| e.to_string())? {
        return Ok(c);
    }
    Ok(match r.as_ref() {
        b"amp" => '&',
        b"lt" => '<',
        b"gt" => '>',
        b"quot" => '"',
        b"apos" => '\'',
        other => {
            return Err(format!(
                "unknown entity &{};",
                String::from_utf8_lossy(other)
            ))
        }
    })
}

/// The leaf texts of each `record` element of an XML request body, in order (e.g. each
/// `<Part>`'s `PartNumber` and `ETag`).
fn xml_records(body: &[u8], record: &str) -> Result<Vec<HashMap<String, String>>, S3Err> {
    let malformed = |e: String| {
        S3Err::bad(
            "MalformedXML",
            format!("The XML you provided was not well-formed: {e}"),
        )
    };
    let mut reader = Reader::from_reader(body);
    let mut buf = Vec::new();
    let (mut out, mut current) = (Vec::new(), None::<HashMap<String, String>>);
    let (mut leaf, mut text) = (None::<String>, String::new());
    loop {
        let ev = reader
            .read_event_into(&mut buf)
            .map_err(|e| malformed(e.to_string()))?;
        match ev {
            Event::Start(e) => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                if name == record {
                    current = Some(HashMap::new());
                } else {
                    leaf = Some(name);
                }
                text.clear();
            }
            Event::Empty(e) if e.local_name().as_ref() == record.as_bytes() => {
                out.push(HashMap::new());
            }
            Event::Text(t) => text.push_str(&t.decode().map_err(|e| malformed(e.to_string()))?),
            Event::CData(t) => text.push_str(&String::from_utf8_lossy(&t)),
            Event::GeneralRef(r) => text.push(entity(&r).map_err(malformed)?),
            Event::End(e) => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                if name == record {
                    out.extend(current.take());
                } else if let (Some(c), Some(l)) = (current.as_mut(), leaf.take()) {
                    if l == name {
                        c.insert(l, std::mem::take(&mut text));
                    }
                }
                text.clear();
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    Ok(out)
}
