//! Checks of the test servers themselves, with no moto: every fault kind of the fault proxy
//! happens as documented (seen from a raw HTTP client and from the upstream's state), the
//! proxy's operation targeting and region emulation, and the in-memory S3 server answering
//! each operation in shapes that aws-sdk-s3 parses.

#[path = "support/fault_proxy.rs"]
mod fault_proxy;
#[path = "support/mem_s3.rs"]
mod mem_s3;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    BucketVersioningStatus, ChecksumMode, CompletedMultipartUpload, CompletedPart, Delete,
    EncodingType, MetadataDirective, ObjectIdentifier, Tag, Tagging, TaggingDirective,
    VersioningConfiguration,
};
use aws_sdk_s3::Client;
use bytes::Bytes;
use fault_proxy::{Fault, FaultConfig, FaultProxy, S3Op};
use mem_s3::{MemS3, Op, Seed};

/// An SDK client for `endpoint` signing for `region`, one attempt per request, and an
/// optional per-attempt timeout.
fn client_in(endpoint: &str, region: &str, attempt_timeout: Option<Duration>) -> Client {
    let mut timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder();
    timeouts.set_operation_attempt_timeout(attempt_timeout);
    let timeouts = timeouts.build();
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.to_string()))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(Credentials::new(
            "testing",
            "testing-secret",
            None,
            None,
            "t",
        ))
        .retry_config(aws_sdk_s3::config::retry::RetryConfig::standard().with_max_attempts(1))
        .timeout_config(timeouts)
        .build();
    Client::from_conf(conf)
}

fn client(endpoint: &str) -> Client {
    client_in(endpoint, "us-east-1", None)
}

/// Longest a raw client waits for an answer that must come (a loaded machine is slow).
const ANSWER_WAIT: Duration = Duration::from_secs(30);
/// How long a raw client listens to a stalled request before concluding it gets nothing.
const STALL_WAIT: Duration = Duration::from_millis(1500);

/// What a raw HTTP client saw.
#[derive(Debug, PartialEq)]
enum Seen {
    /// A whole response.
    Answer { status: u16, body: Vec<u8> },
    /// Status and headers, then fewer body bytes than `Content-Length` announced.
    Truncated {
        status: u16,
        declared: usize,
        got: usize,
    },
    /// The connection was reset (or closed) before any byte of a response.
    Reset,
    /// Nothing at all within the read timeout, the connection still open.
    Silence,
}

/// Status and declared body length of a response head, once it is complete in `buf`.
fn parse_head(buf: &[u8]) -> Option<(u16, usize, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Some((status, end, len))
}

/// Sends one HTTP/1.1 request and reports what came back within `wait`.
fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    wait: Duration,
) -> Seen {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(wait)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        if let Some((status, start, len)) = parse_head(&buf) {
            if buf.len() - start >= len {
                return Seen::Answer {
                    status,
                    body: buf[start..start + len].to_vec(),
                };
            }
        }
        let ended = match s.read(&mut chunk) {
            Ok(0) => true,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                false
            }
            Err(e)
                if buf.is_empty()
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
            {
                return Seen::Silence
            }
            Err(_) => true,
        };
        if ended {
            return match parse_head(&buf) {
                Some((status, start, declared)) => Seen::Truncated {
                    status,
                    declared,
                    got: buf.len() - start,
                },
                None => Seen::Reset,
            };
        }
    }
}

/// A server with bucket `b` holding one version of `src`.
fn server_with_source() -> MemS3 {
    let mem = MemS3::start().expect("start mem-s3");
    mem.seed("b", "src", [Seed::Put(Bytes::from_static(b"source body"))]);
    mem
}

fn proxy_with(upstream: SocketAddr, faults: Vec<Fault>) -> FaultProxy {
    FaultProxy::start_blocking(
        upstream,
        FaultConfig {
            seed: 7,
            rate: 1.0,
            faults,
            delay: Duration::from_millis(20),
            ..Default::default()
        },
    )
    .expect("start proxy")
}

/// Every fault kind, injected into a CopyObject, gives the client what its documentation
/// says, and the upstream executed the copy exactly when the kind forwards it.
#[test]
fn every_fault_kind_happens_as_documented() {
    for kind in Fault::EVERY {
        let mem = server_with_source();
        let proxy = proxy_with(mem.addr(), vec![kind]);
        let stalls = matches!(kind, Fault::Stall | Fault::StallAfterForward);
        // A stall answers nothing however long one waits; an answer comes well within ANSWER_WAIT.
        let wait = if stalls { STALL_WAIT } else { ANSWER_WAIT };
        let seen = raw(
            proxy.addr(),
            "PUT",
            "/b/copy",
            &[("x-amz-copy-source", "b/src")],
            b"",
            wait,
        );
        let copied = mem.entries("b").iter().any(|e| e.key == "copy");
        let expected_copy = !matches!(
            kind,
            Fault::SlowDown | Fault::InternalError | Fault::ResetBeforeForward | Fault::Stall
        );
        assert_eq!(copied, expected_copy, "{kind:?}: did upstream copy?");
        match kind {
            Fault::SlowDown => assert!(
                matches!(seen, Seen::Answer { status: 503, ref body } if String::from_utf8_lossy(body).contains("<Code>SlowDown</Code>"))
            ),
            Fault::InternalError => assert!(
                matches!(seen, Seen::Answer { status: 500, ref body } if String::from_utf8_lossy(body).contains("<Code>InternalError</Code>"))
            ),
            Fault::ResetBeforeForward | Fault::ResetAfterForward => {
                assert_eq!(seen, Seen::Reset, "{kind:?}")
            }
            Fault::TruncateBody => match seen {
                Seen::Truncated {
                    status: 200,
                    declared,
                    got,
                } => assert!(got < declared && declared > 0),
                other => panic!("TruncateBody: {other:?}"),
            },
            Fault::Delay => assert!(
                matches!(seen, Seen::Answer { status: 200, ref body } if String::from_utf8_lossy(body).contains("<CopyObjectResult"))
            ),
            Fault::Stall | Fault::StallAfterForward => assert_eq!(seen, Seen::Silence, "{kind:?}"),
        }
        let stats = proxy.stats();
        assert_eq!(stats.injected_of(kind), 1, "{kind:?} counted");
        assert_eq!(
            stats.injected_on(S3Op::CopyObject, kind),
            1,
            "{kind:?} counted on CopyObject"
        );
        assert_eq!(stats.requests_of(S3Op::CopyObject), 1);
    }
}

/// A truncated answer to a request whose answer has no body (PutObject) is a reset, and
/// the object was written.
#[test]
fn truncating_an_empty_answer_resets_after_the_write() {
    let mem = MemS3::start().unwrap();
    mem.create_bucket("b", true);
    let proxy = proxy_with(mem.addr(), vec![Fault::TruncateBody]);
    let seen = raw(proxy.addr(), "PUT", "/b/k", &[], b"hello", ANSWER_WAIT);
    assert_eq!(seen, Seen::Reset);
    assert_eq!(mem.count("b"), 1);
}

/// A stall holds the connection open until the client leaves, and an SDK client with a
/// per-attempt timeout gives up with a timeout error.
#[tokio::test]
async fn a_stall_holds_the_connection_until_the_client_leaves() {
    let mem = server_with_source();
    let proxy = proxy_with(mem.addr(), vec![Fault::Stall]);
    let addr = proxy.addr();
    let stats = proxy.stats();
    let seen = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /b/src HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        s.set_read_timeout(Some(STALL_WAIT)).unwrap();
        let mut buf = [0u8; 16];
        let r = s.read(&mut buf);
        (r.map_err(|e| e.kind()), stats.stalls_open())
    })
    .await
    .unwrap();
    assert!(matches!(
        seen.0,
        Err(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
    ));
    assert_eq!(seen.1, 1, "one stall open while the client waits");
    // The client closed its socket: the proxy lets the request go.
    let gone = Instant::now();
    while proxy.stats().stalls_open() > 0 && gone.elapsed() < ANSWER_WAIT {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(proxy.stats().stalls_open(), 0);
    assert_eq!(
        mem.requests_of(Op::GetObject),
        0,
        "a stall never reaches upstream"
    );

    let c = client_in(
        &proxy.endpoint(),
        "us-east-1",
        Some(Duration::from_millis(300)),
    );
    let err = c
        .head_object()
        .bucket("b")
        .key("src")
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(err, aws_sdk_s3::error::SdkError::TimeoutError(_)),
        "{err:?}"
    );
}

/// With targets set, only those operations draw faults; the others pass untouched.
#[tokio::test]
async fn faults_can_target_writes_only() {
    let mem = server_with_source();
    let proxy = proxy_with(mem.addr(), vec![Fault::SlowDown]);
    proxy.target_ops(&S3Op::WRITES);
    let c = client(&proxy.endpoint());
    c.head_object()
        .bucket("b")
        .key("src")
        .send()
        .await
        .expect("reads pass");
    c.get_object()
        .bucket("b")
        .key("src")
        .send()
        .await
        .expect("reads pass");
    let err = c
        .copy_object()
        .bucket("b")
        .key("dst")
        .copy_source("b/src")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("SlowDown"));
    let err = c
        .delete_object()
        .bucket("b")
        .key("src")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("SlowDown"));
    let s = proxy.stats();
    assert_eq!(s.injected(), 2);
    assert_eq!(s.injected_on(S3Op::CopyObject, Fault::SlowDown), 1);
    assert_eq!(s.injected_on(S3Op::DeleteObject, Fault::SlowDown), 1);
    assert_eq!(s.requests_of(S3Op::HeadObject), 1);
    assert_eq!(mem.count("b"), 1, "no write reached upstream");

    proxy.target_all_ops();
    let err = c
        .head_object()
        .bucket("b")
        .key("src")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(503));
}

/// A bucket emulated in eu-west-1: requests signed for us-east-1 get S3's 301 with the
/// bucket's region; requests signed for eu-west-1 pass; HeadBucket and GetBucketLocation
/// name the region; other buckets can live elsewhere.
#[tokio::test]
async fn region_emulation_answers_301_to_the_wrong_region() {
    let mem = server_with_source();
    mem.create_bucket("home", true);
    let proxy = proxy_with(mem.addr(), vec![]);
    proxy.set_region(Some("eu-west-1"));
    proxy.set_bucket_region("home", "us-east-1");
    let wrong = client_in(&proxy.endpoint(), "us-east-1", None);
    let right = client_in(&proxy.endpoint(), "eu-west-1", None);

    let err = wrong.head_bucket().bucket("b").send().await.unwrap_err();
    let raw = err.raw_response().expect("an HTTP answer");
    assert_eq!(raw.status().as_u16(), 301);
    assert_eq!(raw.headers().get("x-amz-bucket-region"), Some("eu-west-1"));
    let err = wrong
        .get_object()
        .bucket("b")
        .key("src")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("PermanentRedirect"));
    assert_eq!(
        err.raw_response()
            .and_then(|r| r.headers().get("x-amz-bucket-region")),
        Some("eu-west-1")
    );
    let loc = wrong
        .get_bucket_location()
        .bucket("b")
        .send()
        .await
        .unwrap();
    assert_eq!(
        loc.location_constraint().map(|l| l.as_str()),
        Some("eu-west-1")
    );

    let head = right.head_bucket().bucket("b").send().await.unwrap();
    assert_eq!(head.bucket_region(), Some("eu-west-1"));
    let got = right
        .get_object()
        .bucket("b")
        .key("src")
        .send()
        .await
        .unwrap();
    assert_eq!(
        got.body.collect().await.unwrap().into_bytes().as_ref(),
        b"source body"
    );
    // The bucket with its own region answers the us-east-1 client.
    let home = wrong.head_bucket().bucket("home").send().await.unwrap();
    assert_eq!(home.bucket_region(), Some("us-east-1"));
    assert!(right.head_bucket().bucket("home").send().await.is_err());

    assert_eq!(proxy.stats().redirects(), 3);
    assert_eq!(proxy.stats().region_answers(), 3);
}

// ---------- the in-memory S3 server, through aws-sdk-s3 ----------

async fn versioned(c: &Client, bucket: &str) {
    c.create_bucket().bucket(bucket).send().await.unwrap();
    c.put_bucket_versioning()
        .bucket(bucket)
        .versioning_configuration(
            VersioningConfiguration::builder()
                .status(BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .unwrap();
}

/// PutObject of `body`; returns the version id ("" without versioning).
async fn put(c: &Client, bucket: &str, key: &str, body: &[u8]) -> String {
    let out = c
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(body.to_vec()))
        .send()
        .await
        .unwrap();
    out.version_id().unwrap_or_default().to_string()
}

async fn body_of(c: &Client, bucket: &str, key: &str, version: Option<&str>) -> Vec<u8> {
    let o = c
        .get_object()
        .bucket(bucket)
        .key(key)
        .set_version_id(version.map(str::to_string))
        .send()
        .await
        .unwrap();
    o.body.collect().await.unwrap().into_bytes().to_vec()
}

fn status_of<E>(e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> u16 {
    e.raw_response().map_or(0, |r| r.status().as_u16())
}

/// A server with a versioned bucket `b`, and a client for it.
async fn versioned_server() -> (MemS3, Client) {
    let mem = MemS3::start().unwrap();
    let c = client(&mem.endpoint());
    versioned(&c, "b").await;
    (mem, c)
}

#[tokio::test]
async fn mem_s3_bucket_operations() {
    let mem = MemS3::start().unwrap();
    let c = client(&mem.endpoint());
    c.create_bucket().bucket("plain").send().await.unwrap();
    let again = c.create_bucket().bucket("plain").send().await.unwrap_err();
    assert_eq!(again.code(), Some("BucketAlreadyOwnedByYou"));
    let v = c
        .get_bucket_versioning()
        .bucket("plain")
        .send()
        .await
        .unwrap();
    assert_eq!(v.status(), None);
    versioned(&c, "vers").await;
    let v = c
        .get_bucket_versioning()
        .bucket("vers")
        .send()
        .await
        .unwrap();
    assert_eq!(v.status(), Some(&BucketVersioningStatus::Enabled));
    let h = c.head_bucket().bucket("vers").send().await.unwrap();
    assert_eq!(h.bucket_region(), Some("us-east-1"));
    let missing = c.head_bucket().bucket("nope").send().await.unwrap_err();
    assert_eq!(status_of(&missing), 404);
    let loc = c.get_bucket_location().bucket("vers").send().await.unwrap();
    // us-east-1 is an empty constraint, as on AWS.
    assert_eq!(loc.location_constraint().map_or("", |l| l.as_str()), "");
    let all = c.list_buckets().send().await.unwrap();
    let names: Vec<_> = all.buckets().iter().filter_map(|b| b.name()).collect();
    assert_eq!(names, ["plain", "vers"]);
    c.delete_bucket().bucket("plain").send().await.unwrap();
    assert!(c.head_bucket().bucket("plain").send().await.is_err());
    let unknown = c
        .get_bucket_policy()
        .bucket("vers")
        .send()
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Some("NotImplemented"));
}

const ODD: &str = "dir/a key+ü&?.txt";

#[tokio::test]
async fn mem_s3_put_head_get_and_ranges() {
    let (_mem, c) = versioned_server().await;
    let put = c
        .put_object()
        .bucket("b")
        .key(ODD)
        .body(ByteStream::from_static(b"0123456789"))
        .content_type("text/plain")
        .metadata("colour", "blue")
        .send()
        .await
        .unwrap();
    assert_eq!(put.e_tag(), Some("\"781e5e245d69b566979b86e28d23f2c7\""));
    let head = c
        .head_object()
        .bucket("b")
        .key(ODD)
        .checksum_mode(ChecksumMode::Enabled)
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_length(), Some(10));
    assert_eq!(head.content_type(), Some("text/plain"));
    assert_eq!(head.version_id(), put.version_id());
    let colour = head.metadata().and_then(|m| m.get("colour"));
    assert_eq!(colour.map(String::as_str), Some("blue"));
    assert!(
        head.checksum_crc32().is_some(),
        "the SDK's trailing checksum is kept"
    );
    let ranged = c
        .get_object()
        .bucket("b")
        .key(ODD)
        .range("bytes=2-4")
        .send()
        .await
        .unwrap();
    assert_eq!(ranged.content_range(), Some("bytes 2-4/10"));
    let bytes = ranged.body.collect().await.unwrap().into_bytes();
    assert_eq!(bytes.as_ref(), b"234");
    let beyond = c
        .get_object()
        .bucket("b")
        .key(ODD)
        .range("bytes=10-")
        .send()
        .await
        .unwrap_err();
    assert_eq!(beyond.code(), Some("InvalidRange"));
}

// One scenario (tags per version) end to end; the SDK builder chains make it long.
#[tokio::test]
async fn mem_s3_tags_and_bodies_per_version() {
    let (_mem, c) = versioned_server().await;
    let v1 = c
        .put_object()
        .bucket("b")
        .key(ODD)
        .body(ByteStream::from_static(b"first"))
        .tagging("t1=v1&t2=v%202")
        .send()
        .await
        .unwrap();
    let v1 = v1.version_id().unwrap().to_string();
    let v2 = put(&c, "b", ODD, b"second").await;
    assert_ne!(v1, v2);
    let tags = c
        .get_object_tagging()
        .bucket("b")
        .key(ODD)
        .version_id(&v1)
        .send()
        .await
        .unwrap();
    let tags: Vec<_> = tags
        .tag_set()
        .iter()
        .map(|t| (t.key(), t.value()))
        .collect();
    assert_eq!(tags, [("t1", "v1"), ("t2", "v 2")]);
    let head = c
        .head_object()
        .bucket("b")
        .key(ODD)
        .version_id(&v1)
        .send()
        .await
        .unwrap();
    assert_eq!(head.tag_count(), Some(2));
    let one = Tag::builder().key("only").value("new").build().unwrap();
    c.put_object_tagging()
        .bucket("b")
        .key(ODD)
        .tagging(Tagging::builder().tag_set(one).build().unwrap())
        .send()
        .await
        .unwrap();
    let current = c
        .get_object_tagging()
        .bucket("b")
        .key(ODD)
        .send()
        .await
        .unwrap();
    assert_eq!(current.version_id(), Some(v2.as_str()));
    assert_eq!(current.tag_set().len(), 1);
    let old = c
        .get_object_tagging()
        .bucket("b")
        .key(ODD)
        .version_id(&v1)
        .send()
        .await
        .unwrap();
    assert_eq!(old.tag_set().len(), 2, "tags belong to a version");
    assert_eq!(body_of(&c, "b", ODD, Some(&v1)).await, b"first");
    assert_eq!(body_of(&c, "b", ODD, None).await, b"second");
}

/// `b/ODD?versionId=V`, URL-encoded as a copy source.
fn source_of(version: &str) -> String {
    let enc = percent_encoding::utf8_percent_encode(ODD, percent_encoding::NON_ALPHANUMERIC);
    format!("b/{enc}?versionId={version}")
}

// One scenario (both directives) end to end; the SDK builder chains make it long.
#[tokio::test]
async fn mem_s3_copy_object_directives() {
    let (_mem, c) = versioned_server().await;
    let v1 = c
        .put_object()
        .bucket("b")
        .key(ODD)
        .body(ByteStream::from_static(b"first"))
        .metadata("m", "1")
        .tagging("a=1")
        .send()
        .await
        .unwrap();
    let v1 = v1.version_id().unwrap().to_string();
    put(&c, "b", ODD, b"second").await;
    let kept = c
        .copy_object()
        .bucket("b")
        .key("kept")
        .copy_source(source_of(&v1))
        .send()
        .await;
    let kept = kept.unwrap();
    assert_eq!(kept.copy_source_version_id(), Some(v1.as_str()));
    assert!(kept.version_id().is_some());
    assert!(kept.copy_object_result().and_then(|r| r.e_tag()).is_some());
    let h = c
        .head_object()
        .bucket("b")
        .key("kept")
        .send()
        .await
        .unwrap();
    assert_eq!(
        h.metadata().and_then(|m| m.get("m")).map(String::as_str),
        Some("1")
    );
    assert_eq!(h.tag_count(), Some(1));
    assert_eq!(body_of(&c, "b", "kept", None).await, b"first");

    c.copy_object()
        .bucket("b")
        .key("replaced")
        .copy_source(source_of(&v1))
        .metadata_directive(MetadataDirective::Replace)
        .metadata("m", "2")
        .tagging_directive(TaggingDirective::Replace)
        .tagging("x=y&z=w")
        .send()
        .await
        .unwrap();
    let h = c
        .head_object()
        .bucket("b")
        .key("replaced")
        .send()
        .await
        .unwrap();
    assert_eq!(
        h.metadata().and_then(|m| m.get("m")).map(String::as_str),
        Some("2")
    );
    assert_eq!(h.tag_count(), Some(2));
}

#[tokio::test]
async fn mem_s3_copy_object_refusals() {
    let (_mem, c) = versioned_server().await;
    put(&c, "b", ODD, b"body").await;
    let no_null = c
        .copy_object()
        .bucket("b")
        .key("x")
        .copy_source(source_of("null"));
    assert_eq!(
        no_null.send().await.unwrap_err().code(),
        Some("NoSuchVersion")
    );
    let current = percent_encoding::utf8_percent_encode(ODD, percent_encoding::NON_ALPHANUMERIC);
    let itself = c
        .copy_object()
        .bucket("b")
        .key(ODD)
        .copy_source(format!("b/{current}"));
    assert_eq!(
        itself.send().await.unwrap_err().code(),
        Some("InvalidRequest")
    );
    let marker = c.delete_object().bucket("b").key(ODD).send().await.unwrap();
    assert_eq!(marker.delete_marker(), Some(true));
    let dm = marker.version_id().unwrap();
    let from_marker = c
        .copy_object()
        .bucket("b")
        .key("x")
        .copy_source(source_of(dm));
    assert_eq!(
        from_marker.send().await.unwrap_err().code(),
        Some("InvalidRequest")
    );
    let gone = c
        .copy_object()
        .bucket("b")
        .key("x")
        .copy_source(format!("b/{current}"));
    assert_eq!(gone.send().await.unwrap_err().code(), Some("NoSuchKey"));
}

#[tokio::test]
async fn mem_s3_delete_markers_and_null_versions() {
    let mem = MemS3::start().unwrap();
    let c = client(&mem.endpoint());
    c.create_bucket().bucket("b").send().await.unwrap();
    assert_eq!(
        put(&c, "b", "k", b"null").await,
        "",
        "no version id before versioning"
    );
    let enabled = VersioningConfiguration::builder()
        .status(BucketVersioningStatus::Enabled)
        .build();
    let versioning = c
        .put_bucket_versioning()
        .bucket("b")
        .versioning_configuration(enabled);
    versioning.send().await.unwrap();
    let del = c.delete_object().bucket("b").key("k").send().await.unwrap();
    assert_eq!(del.delete_marker(), Some(true));
    let dm = del.version_id().unwrap().to_string();
    let gone = c
        .head_object()
        .bucket("b")
        .key("k")
        .send()
        .await
        .unwrap_err();
    assert_eq!(status_of(&gone), 404);
    let on_marker = c
        .head_object()
        .bucket("b")
        .key("k")
        .version_id(&dm)
        .send()
        .await;
    assert_eq!(status_of(&on_marker.unwrap_err()), 405);
    assert_eq!(body_of(&c, "b", "k", Some("null")).await, b"null");
    let e = mem.entries("b");
    assert_eq!(e.len(), 2);
    assert!(e[0].is_delete_marker && e[0].is_latest && e[0].version_id == dm);
    assert_eq!(e[1].version_id, "null");
    // Removing the marker by id makes the null version current again.
    c.delete_object()
        .bucket("b")
        .key("k")
        .version_id(&dm)
        .send()
        .await
        .unwrap();
    assert_eq!(body_of(&c, "b", "k", None).await, b"null");
}

#[tokio::test]
async fn mem_s3_delete_objects() {
    let (mem, c) = versioned_server().await;
    let v = put(&c, "b", "k", b"x").await;
    let one = |key: &str, version: Option<&str>| {
        let id = ObjectIdentifier::builder().key(key);
        id.set_version_id(version.map(str::to_string))
            .build()
            .unwrap()
    };
    let delete = Delete::builder()
        .objects(one("k", Some(&v)))
        .objects(one("other", None))
        .build()
        .unwrap();
    let deleted = c
        .delete_objects()
        .bucket("b")
        .delete(delete)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.deleted().len(), 2);
    let e = mem.entries("b");
    assert_eq!(e.len(), 1, "k is gone, other has a delete marker: {e:?}");
    assert!(e[0].key == "other" && e[0].is_delete_marker);
}

/// Decodes a key of an `encoding-type=url` listing.
fn form_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

/// A bucket whose version listing holds interleaved delete markers, odd keys and a prefix.
fn listing_server() -> MemS3 {
    let mem = MemS3::start().unwrap();
    let put = |b: &'static [u8]| Seed::Put(Bytes::from_static(b));
    mem.seed(
        "b",
        "a b",
        [put(b"1"), Seed::DeleteMarker, put(b"2"), Seed::DeleteMarker],
    );
    mem.seed("b", "c/d", [put(b"3")]);
    mem.seed("b", "c/e", [put(b"4"), put(b"5")]);
    mem.seed("b", "z&<", [Seed::DeleteMarker]);
    mem
}

/// The raw XML keeps the true order, delete markers interleaved, and form-encodes keys.
#[test]
fn mem_s3_lists_versions_newest_first_in_the_xml() {
    let mem = listing_server();
    let all = mem.entries("b");
    assert_eq!(all.len(), 8);
    let path = "/b?versions&encoding-type=url";
    let xml = match raw(mem.addr(), "GET", path, &[], b"", ANSWER_WAIT) {
        Seen::Answer { status: 200, body } => String::from_utf8(body).unwrap(),
        other => panic!("{other:?}"),
    };
    let ids: Vec<&str> = xml
        .split("<VersionId>")
        .skip(1)
        .map(|s| s.split('<').next().unwrap())
        .collect();
    let want: Vec<&str> = all.iter().map(|e| e.version_id.as_str()).collect();
    assert_eq!(ids, want);
    assert!(xml.contains("<Key>a+b</Key>"), "{xml}");
    assert!(xml.contains("<Key>z%26%3C</Key>"), "{xml}");
}

/// Pages of 3 with the SDK resume exactly on the markers; delimiters and prefixes roll up.
// One scenario (a full paged walk, then roll-ups) end to end; long for the SDK calls.
#[tokio::test]
async fn mem_s3_lists_versions_in_pages() {
    let mem = listing_server();
    let c = client(&mem.endpoint());
    let (mut seen, mut key_marker, mut version_marker, mut pages) = (Vec::new(), None, None, 0);
    loop {
        let page = c
            .list_object_versions()
            .bucket("b")
            .max_keys(3)
            .encoding_type(EncodingType::Url)
            .set_key_marker(key_marker.clone())
            .set_version_id_marker(version_marker.clone())
            .send()
            .await
            .unwrap();
        pages += 1;
        let versions = page.versions().iter().map(|v| (v.key(), v.version_id()));
        let markers = page
            .delete_markers()
            .iter()
            .map(|d| (d.key(), d.version_id()));
        for (k, v) in versions.chain(markers) {
            seen.push((form_decode(k.unwrap()), v.unwrap().to_string()));
        }
        if page.is_truncated() != Some(true) {
            break;
        }
        key_marker = page.next_key_marker().map(form_decode);
        version_marker = page.next_version_id_marker().map(str::to_string);
    }
    assert_eq!(pages, 3);
    seen.sort();
    let mut want: Vec<_> = mem
        .entries("b")
        .into_iter()
        .map(|e| (e.key, e.version_id))
        .collect();
    want.sort();
    assert_eq!(seen, want);

    let rolled = c
        .list_object_versions()
        .bucket("b")
        .delimiter("/")
        .send()
        .await
        .unwrap();
    let prefixes: Vec<_> = rolled
        .common_prefixes()
        .iter()
        .filter_map(|p| p.prefix())
        .collect();
    assert_eq!(prefixes, ["c/"]);
    assert_eq!(rolled.versions().len() + rolled.delete_markers().len(), 5);
    let under = c
        .list_object_versions()
        .bucket("b")
        .prefix("c/e")
        .send()
        .await
        .unwrap();
    assert_eq!(under.versions().len(), 2);
    assert_eq!(under.versions()[0].is_latest(), Some(true));
    assert_eq!(under.versions()[0].size(), Some(1));
}

#[tokio::test]
async fn mem_s3_lists_current_objects() {
    let mem = MemS3::start().unwrap();
    for i in 0..7 {
        mem.seed("b", &format!("k{i}"), [Seed::Put(Bytes::from_static(b"x"))]);
    }
    mem.seed("b", "p/q", [Seed::Put(Bytes::from_static(b"x"))]);
    mem.seed("b", "k3", [Seed::DeleteMarker]);
    let c = client(&mem.endpoint());
    let list = c.list_objects_v2().bucket("b").max_keys(2).delimiter("/");
    let mut pages = list.into_paginator().send();
    let (mut keys, mut prefixes) = (Vec::new(), Vec::new());
    while let Some(p) = pages.next().await {
        let p = p.unwrap();
        keys.extend(
            p.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_string)),
        );
        let cps = p.common_prefixes().iter();
        prefixes.extend(cps.filter_map(|o| o.prefix().map(str::to_string)));
    }
    assert_eq!(keys, ["k0", "k1", "k2", "k4", "k5", "k6"]);
    assert_eq!(prefixes, ["p/"]);

    // ListObjects v1, resumed by NextMarker.
    let (mut v1_keys, mut marker) = (Vec::new(), None::<String>);
    loop {
        let list = c.list_objects().bucket("b").max_keys(3).delimiter("/");
        let page = list.set_marker(marker.clone()).send().await.unwrap();
        v1_keys.extend(
            page.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_string)),
        );
        let cps = page.common_prefixes().iter();
        v1_keys.extend(cps.filter_map(|o| o.prefix().map(str::to_string)));
        if page.is_truncated() != Some(true) {
            break;
        }
        marker = page.next_marker().map(str::to_string);
    }
    assert_eq!(v1_keys, ["k0", "k1", "k2", "k4", "k5", "k6", "p/"]);
}

const MIB: usize = 1024 * 1024;

/// A completed part of an upload.
fn part(n: i32, etag: Option<&str>) -> CompletedPart {
    CompletedPart::builder()
        .part_number(n)
        .set_e_tag(etag.map(str::to_string))
        .build()
}

/// A 6 MiB source copied by UploadPartCopy (first 5 MiB) plus a 4-byte UploadPart.
#[tokio::test]
async fn mem_s3_multipart_upload_with_a_copied_part() {
    let (mem, c) = versioned_server().await;
    let source: Vec<u8> = (0..6 * MIB).map(|i| (i % 251) as u8).collect();
    let src_version = put(&c, "b", "src", &source).await;
    let up = c
        .create_multipart_upload()
        .bucket("b")
        .key("big")
        .metadata("m", "v");
    let id = up.send().await.unwrap().upload_id().unwrap().to_string();
    let listed = c.list_multipart_uploads().bucket("b").send().await.unwrap();
    assert_eq!(listed.uploads().len(), 1);
    assert_eq!(listed.uploads()[0].upload_id(), Some(id.as_str()));
    let p1 = c
        .upload_part_copy()
        .bucket("b")
        .key("big")
        .upload_id(&id)
        .part_number(1)
        .copy_source(format!("b/src?versionId={src_version}"))
        .copy_source_range(format!("bytes=0-{}", 5 * MIB - 1))
        .send()
        .await
        .unwrap();
    assert_eq!(p1.copy_source_version_id(), Some(src_version.as_str()));
    let p2 = c
        .upload_part()
        .bucket("b")
        .key("big")
        .upload_id(&id)
        .part_number(2);
    let p2 = p2
        .body(ByteStream::from_static(b"tail"))
        .send()
        .await
        .unwrap();
    let parts = CompletedMultipartUpload::builder()
        .parts(part(1, p1.copy_part_result().and_then(|r| r.e_tag())))
        .parts(part(2, p2.e_tag()))
        .build();
    let done = c
        .complete_multipart_upload()
        .bucket("b")
        .key("big")
        .upload_id(&id);
    let done = done.multipart_upload(parts).send().await.unwrap();
    assert!(
        done.e_tag().unwrap().ends_with("-2\""),
        "{:?}",
        done.e_tag()
    );
    assert!(done.version_id().is_some());
    assert_eq!(mem.uploads_in_progress(), 0);

    read_back_parts(&c, &source).await;
}

/// Reads the upload of `mem_s3_multipart_upload_with_a_copied_part` back by part and whole.
async fn read_back_parts(c: &Client, source: &[u8]) {
    let first = c
        .head_object()
        .bucket("b")
        .key("big")
        .part_number(1)
        .send()
        .await
        .unwrap();
    assert_eq!(first.parts_count(), Some(2));
    assert_eq!(first.content_length(), Some(5 * MIB as i64));
    assert_eq!(
        first
            .metadata()
            .and_then(|m| m.get("m"))
            .map(String::as_str),
        Some("v")
    );
    let second = c
        .get_object()
        .bucket("b")
        .key("big")
        .part_number(2)
        .send()
        .await
        .unwrap();
    let second = second.body.collect().await.unwrap().into_bytes();
    assert_eq!(second.as_ref(), b"tail");
    let whole = body_of(c, "b", "big", None).await;
    assert_eq!(whole.len(), 5 * MIB + 4);
    assert_eq!(&whole[..5 * MIB], &source[..5 * MIB]);
}

/// S3's checks: parts below 5 MiB but the last are refused; abort; unknown uploads.
#[tokio::test]
async fn mem_s3_multipart_checks() {
    let (_mem, c) = versioned_server().await;
    let up = c
        .create_multipart_upload()
        .bucket("b")
        .key("small")
        .send()
        .await
        .unwrap();
    let id = up.upload_id().unwrap();
    let mut parts = Vec::new();
    for n in 1..=2 {
        let p = c
            .upload_part()
            .bucket("b")
            .key("small")
            .upload_id(id)
            .part_number(n);
        let p = p.body(ByteStream::from_static(b"x")).send().await.unwrap();
        parts.push(part(n, p.e_tag()));
    }
    let wrong = vec![part(1, Some("\"00000000000000000000000000000000\""))];
    let complete = |parts: Vec<CompletedPart>| {
        let upload = CompletedMultipartUpload::builder()
            .set_parts(Some(parts))
            .build();
        c.complete_multipart_upload()
            .bucket("b")
            .key("small")
            .upload_id(id)
            .multipart_upload(upload)
            .send()
    };
    assert_eq!(
        complete(wrong).await.unwrap_err().code(),
        Some("InvalidPart")
    );
    let reversed = parts.iter().rev().cloned().collect();
    assert_eq!(
        complete(reversed).await.unwrap_err().code(),
        Some("InvalidPartOrder")
    );
    assert_eq!(
        complete(parts).await.unwrap_err().code(),
        Some("EntityTooSmall")
    );
    let abort = c
        .abort_multipart_upload()
        .bucket("b")
        .key("small")
        .upload_id(id);
    abort.clone().send().await.unwrap();
    assert_eq!(abort.send().await.unwrap_err().code(), Some("NoSuchUpload"));
}

/// Seeding fills a bucket without HTTP; the histories list in order with fresh ids.
#[test]
fn mem_s3_seeds_large_buckets() {
    let mem = MemS3::start().unwrap();
    for i in 0..100_000u32 {
        let key = format!("{i:040}");
        mem.seed(
            "big",
            &key,
            [Seed::Put(Bytes::from(i.to_string())), Seed::DeleteMarker],
        );
    }
    assert_eq!(mem.count("big"), 200_000);
    let e = mem.entries("big");
    assert!(e[0].is_delete_marker && e[0].is_latest);
    assert!(!e[1].is_delete_marker && !e[1].is_latest && e[1].size == 1);
    let ids: std::collections::HashSet<_> = e.iter().map(|x| x.version_id.as_str()).collect();
    assert_eq!(ids.len(), 200_000, "version ids are unique");
}
