//! Test support, shared by every test binary and bench: the S3 server under test (moto or
//! Ceph RGW, `server`), S3 clients and accounts, unique bucket names, corpus seeding, the
//! readers of version histories and the replica assertion (`history`), and the one job
//! builder with the typed status (`job`); for `follow`, a steady writer (`writer`) and event
//! relays that drop 5% (`relay`). Each test binary starts its own server; tests give
//! every bucket a unique name, so they run in parallel on one server. For the PostgreSQL
//! manifest, a throwaway cluster per test binary and a fresh database per test (`pg`).
#![allow(dead_code)]

pub mod fault_proxy;
mod history;
mod job;
pub mod pg;
pub mod relay;
mod server;
pub mod writer;

// Each test binary and bench uses a different part of the kit.
#[allow(unused_imports)]
pub use history::*;
#[allow(unused_imports)]
pub use job::*;
#[allow(unused_imports)]
pub use server::*;
pub mod mem_s3;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketVersioningStatus, VersioningConfiguration};
use aws_sdk_s3::Client;
use futures::stream::{self, StreamExt};

/// A client for `endpoint` with the test credentials (the first account).
pub fn client(endpoint: &str) -> Client {
    client_as(endpoint, KEY_ID, SECRET)
}

/// A client for `endpoint` as the second account ([`SECOND_KEY_ID`]).
pub fn second_account(endpoint: &str) -> Client {
    client_as(endpoint, SECOND_KEY_ID, SECOND_SECRET)
}

/// A client for `endpoint` with the given keys: region us-east-1, path-style.
pub fn client_as(endpoint: &str, key_id: &str, secret: &str) -> Client {
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(Credentials::new(key_id, secret, None, None, "test"))
        .build();
    Client::from_conf(conf)
}

/// A bucket name no other test uses.
pub fn bucket(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{tag}-{}-{n}-{nanos:x}", std::process::id()).to_lowercase()
}

/// Creates a bucket, versioned or not.
pub async fn create_bucket(c: &Client, name: &str, versioned: bool) {
    c.create_bucket()
        .bucket(name)
        .send()
        .await
        .expect("create bucket");
    if versioned {
        c.put_bucket_versioning()
            .bucket(name)
            .versioning_configuration(
                VersioningConfiguration::builder()
                    .status(BucketVersioningStatus::Enabled)
                    .build(),
            )
            .send()
            .await
            .expect("enable versioning");
    }
}

/// One write of a corpus.
#[derive(Clone, Debug)]
pub enum Op {
    /// PutObject with a body and optional headers.
    Put {
        /// Key.
        key: String,
        /// Body.
        body: Vec<u8>,
        /// Content-Type.
        content_type: Option<String>,
        /// Cache-Control.
        cache_control: Option<String>,
        /// User metadata.
        metadata: Vec<(String, String)>,
        /// Tags, as `k=v&k2=v2`.
        tagging: Option<String>,
    },
    /// DeleteObject without a version (a delete marker on a versioned bucket).
    Delete {
        /// Key.
        key: String,
    },
}

impl Op {
    /// A plain put.
    pub fn put(key: &str, body: impl Into<Vec<u8>>) -> Op {
        Op::Put {
            key: key.to_string(),
            body: body.into(),
            content_type: None,
            cache_control: None,
            metadata: Vec::new(),
            tagging: None,
        }
    }
}

/// Applies rounds of writes. On moto, each round starts in a later second than the one the
/// previous round ended in, so that the 1-second last-modified of listings orders every key's
/// history (moto does not interleave versions and delete markers in its listing XML); on RGW
/// they follow each other at once (it lists true order). Writes inside a round run
/// concurrently, and no round may write the same key twice.
pub async fn seed(c: &Client, bucket: &str, rounds: Vec<Vec<Op>>) {
    let n = rounds.len();
    for (i, round) in rounds.into_iter().enumerate() {
        stream::iter(round)
            .for_each_concurrent(16, |op| apply(c, bucket, op))
            .await;
        if i + 1 < n && server() == Server::Moto {
            // Timed from the round's end, not its start: a round that took long (a loaded
            // machine, many writes) would otherwise be followed within the second of its
            // last writes.
            tokio::time::sleep(to_next_second()).await;
        }
    }
}

/// From now to just past the next whole second of the system clock. moto runs on this
/// machine and stamps a write with this clock before answering it, so a write sent after
/// this wait has a later second than every write answered before it.
fn to_next_second() -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(1) - Duration::from_nanos(u64::from(now.subsec_nanos()))
        + Duration::from_millis(10)
}

/// Removes one version of a key for good (not a delete marker): a version gone from the
/// source between `plan` and `run`.
pub async fn delete_version(c: &Client, bucket: &str, key: &str, version: &str) {
    c.delete_object()
        .bucket(bucket)
        .key(key)
        .version_id(version)
        .send()
        .await
        .unwrap_or_else(|e| panic!("delete {key:?} {version}: {e:?}"));
}

/// One write of a corpus.
pub async fn apply(c: &Client, bucket: &str, op: Op) {
    match op {
        Op::Put {
            key,
            body,
            content_type,
            cache_control,
            metadata,
            tagging,
        } => {
            let mut r = c
                .put_object()
                .bucket(bucket)
                .key(&key)
                .body(ByteStream::from(body))
                .set_content_type(content_type)
                .set_cache_control(cache_control)
                .set_tagging(tagging);
            for (k, v) in metadata {
                r = r.metadata(k, v);
            }
            r.send()
                .await
                .unwrap_or_else(|e| panic!("put {key:?}: {e:?}"));
        }
        Op::Delete { key } => {
            c.delete_object()
                .bucket(bucket)
                .key(&key)
                .send()
                .await
                .unwrap_or_else(|e| panic!("delete {key:?}: {e:?}"));
        }
    }
}

/// Keys that are hard to carry: unicode, spaces, `+`, `%`, `?`, `#`, quotes, backslashes,
/// tabs, and a 900-byte key.
pub fn odd_keys() -> Vec<String> {
    vec![
        "odd/space key.txt".into(),
        "odd/plus+sign".into(),
        "odd/percent%20not-a-space".into(),
        "odd/question?mark".into(),
        "odd/hash#tag".into(),
        "odd/quote\"double'single".into(),
        "odd/back\\slash".into(),
        "odd/tab\there".into(),
        "odd/ünïcødé/日本語/😀".into(),
        "odd/amp&lt;less".into(),
        format!("odd/long-{}", "x".repeat(890)),
    ]
}

/// Deterministic pseudo-random bytes (incompressible test bodies).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Headers, metadata and tags given to an upload.
#[derive(Clone, Debug, Default)]
pub struct Headers {
    /// Content-Type.
    pub content_type: Option<String>,
    /// Cache-Control.
    pub cache_control: Option<String>,
    /// User metadata.
    pub metadata: Vec<(String, String)>,
    /// Tags, as `k=v&k2=v2`.
    pub tagging: Option<String>,
    /// A checksum algorithm for the upload and each of its parts.
    pub checksum: Option<aws_sdk_s3::types::ChecksumAlgorithm>,
}

/// The multipart ETag S3 computes for these parts: `"md5(md5(p1)‖…‖md5(pN))-N"`.
pub fn multipart_etag(parts: &[&[u8]]) -> String {
    use md5::{Digest, Md5};
    let mut all = Vec::new();
    for p in parts {
        all.extend_from_slice(&Md5::digest(p));
    }
    format!("\"{}-{}\"", hex::encode(Md5::digest(&all)), parts.len())
}

/// Uploads `body` with CreateMultipartUpload / UploadPart / CompleteMultipartUpload, cut in
/// parts of the given sizes (the last size repeats until the body is used up), and returns
/// the new version id and ETag.
pub async fn put_multipart(
    c: &Client,
    bucket: &str,
    key: &str,
    body: &[u8],
    part_sizes: &[usize],
    h: &Headers,
) -> (String, String) {
    use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
    let mut req = c
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .set_content_type(h.content_type.clone())
        .set_cache_control(h.cache_control.clone())
        .set_tagging(h.tagging.clone())
        .set_checksum_algorithm(h.checksum.clone());
    for (k, v) in &h.metadata {
        req = req.metadata(k, v);
    }
    let created = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("create upload {key:?}: {e:?}"));
    let upload_id = created.upload_id().unwrap().to_string();
    let mut bounds = Vec::new();
    let mut start = 0usize;
    let mut sizes = part_sizes.iter();
    let mut size = *part_sizes.first().expect("a part size");
    while start < body.len() || bounds.is_empty() {
        size = sizes.next().copied().unwrap_or(size);
        let end = (start + size).min(body.len());
        bounds.push((start, end));
        start = end;
    }
    let parts: Vec<CompletedPart> = stream::iter(bounds.into_iter().enumerate())
        .map(|(i, (a, b))| {
            let upload_id = &upload_id;
            async move {
                let n = i as i32 + 1;
                let out = c
                    .upload_part()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .part_number(n)
                    .set_checksum_algorithm(h.checksum.clone())
                    .body(ByteStream::from(body[a..b].to_vec()))
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("upload part {n} of {key:?}: {e:?}"));
                CompletedPart::builder()
                    .part_number(n)
                    .set_e_tag(out.e_tag().map(str::to_string))
                    .set_checksum_crc32(out.checksum_crc32().map(str::to_string))
                    .build()
            }
        })
        .buffered(4)
        .collect()
        .await;
    let done = c
        .complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(&upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("complete upload {key:?}: {e:?}"));
    let version = done.version_id().unwrap_or("null").to_string();
    let etag = match done.e_tag() {
        Some(e) if !e.is_empty() => e.to_string(),
        // RGW 16.2 answers CompleteMultipartUpload with an empty <ETag/>: ask HEAD.
        _ => c
            .head_object()
            .bucket(bucket)
            .key(key)
            .version_id(&version)
            .send()
            .await
            .unwrap_or_else(|e| panic!("head {key:?} {version}: {e:?}"))
            .e_tag()
            .unwrap_or_default()
            .to_string(),
    };
    (version, etag)
}

/// The multipart uploads in progress in a bucket, as (key, upload id).
pub async fn open_uploads(c: &Client, bucket: &str) -> Vec<(String, String)> {
    let r = c
        .list_multipart_uploads()
        .bucket(bucket)
        .send()
        .await
        .expect("list multipart uploads");
    r.uploads()
        .iter()
        .map(|u| {
            (
                u.key().unwrap_or_default().to_string(),
                u.upload_id().unwrap_or_default().to_string(),
            )
        })
        .collect()
}
