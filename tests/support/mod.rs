//! Test support: one moto S3 server per test binary (or `S3_BACKFILL_TEST_ENDPOINT`), S3
//! clients, unique bucket names, corpus seeding, and readers of version histories.
#![allow(dead_code)]

pub mod fault_proxy;
pub mod mem_s3;

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketVersioningStatus, VersioningConfiguration};
use aws_sdk_s3::Client;
use futures::stream::{self, StreamExt};

/// Credentials every test process uses (moto accepts any while auth is off).
pub const KEY_ID: &str = "testing";
/// Secret of [`KEY_ID`].
pub const SECRET: &str = "testing-secret";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn moto_binary() -> PathBuf {
    if let Ok(p) = std::env::var("MOTO_SERVER") {
        return PathBuf::from(p);
    }
    let venv = repo().join(".venv/bin/moto_server");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("moto_server")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}

fn wait_until_up(endpoint: &str) {
    let addr = endpoint.trim_start_matches("http://").to_string();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if std::net::TcpStream::connect(&addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the S3 test server at {endpoint} did not start within 30 s");
}

/// Starts a moto server on a free port that stops when this test process exits, and
/// returns its endpoint.
pub fn start_moto() -> String {
    let port = free_port();
    let bin = moto_binary();
    let log = std::env::temp_dir().join(format!("s3-backfill-moto-{port}.log"));
    // A watchdog shell stops the server when this process goes away.
    let script = format!(
        "{bin} -H 127.0.0.1 -p {port} >{log} 2>&1 & m=$!; \
         while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; kill $m",
        bin = bin.display(),
        log = log.display(),
        pid = std::process::id()
    );
    // The watchdog shell stops the server when this process goes away; nobody waits for it.
    let watchdog = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e}; install it with .ci/run (or: python3 -m venv .venv && .venv/bin/pip install 'moto[s3]' flask flask-cors)",
                bin.display()
            )
        });
    std::mem::forget(watchdog);
    let endpoint = format!("http://127.0.0.1:{port}");
    wait_until_up(&endpoint);
    endpoint
}

/// The shared S3 endpoint of this test binary.
pub fn endpoint() -> String {
    static EP: OnceLock<String> = OnceLock::new();
    EP.get_or_init(|| match std::env::var("S3_BACKFILL_TEST_ENDPOINT") {
        Ok(e) if !e.is_empty() => e,
        _ => start_moto(),
    })
    .clone()
}

/// A client for `endpoint` with the test credentials.
pub fn client(endpoint: &str) -> Client {
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(Credentials::new(KEY_ID, SECRET, None, None, "test"))
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

/// Applies rounds of writes. Rounds are one second apart, so that the 1-second
/// last-modified of listings orders every key's history (moto does not interleave versions
/// and delete markers in its listing XML). Writes inside a round run concurrently, and no
/// round may write the same key twice.
pub async fn seed(c: &Client, bucket: &str, rounds: Vec<Vec<Op>>) {
    let n = rounds.len();
    for (i, round) in rounds.into_iter().enumerate() {
        let started = Instant::now();
        stream::iter(round)
            .for_each_concurrent(16, |op| async move {
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
            })
            .await;
        if i + 1 < n {
            let spent = started.elapsed();
            let second = Duration::from_millis(1100);
            if spent < second {
                tokio::time::sleep(second - spent).await;
            }
        }
    }
}

/// One entry of a key's history as a user would check it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ver {
    /// Version id.
    pub version_id: String,
    /// A delete marker.
    pub delete_marker: bool,
    /// The current entry.
    pub latest: bool,
    /// ETag.
    pub etag: Option<String>,
    /// Size.
    pub size: i64,
    /// Last-modified, seconds.
    pub secs: i64,
}

/// Every key's history under `prefix`, oldest first, read with the SDK (not with the code
/// under test). Object versions keep the server's order; delete markers are placed by
/// last-modified (seconds), which the one-second rounds of [`seed`] make exact at the source.
pub async fn histories(c: &Client, bucket: &str, prefix: &str) -> BTreeMap<String, Vec<Ver>> {
    let mut out: BTreeMap<String, Vec<(usize, Ver)>> = BTreeMap::new();
    let (mut km, mut vm) = (None::<String>, None::<String>);
    let mut pos = 0usize;
    loop {
        let r = c
            .list_object_versions()
            .bucket(bucket)
            .prefix(prefix)
            .set_key_marker(km.clone())
            .set_version_id_marker(vm.clone())
            .send()
            .await
            .expect("list versions");
        for v in r.versions() {
            pos += 1;
            out.entry(v.key().unwrap().to_string()).or_default().push((
                pos,
                Ver {
                    version_id: v.version_id().unwrap().to_string(),
                    delete_marker: false,
                    latest: v.is_latest().unwrap_or(false),
                    etag: v.e_tag().map(str::to_string),
                    size: v.size().unwrap_or(0),
                    secs: v.last_modified().unwrap().secs(),
                },
            ));
        }
        for m in r.delete_markers() {
            pos += 1;
            out.entry(m.key().unwrap().to_string()).or_default().push((
                pos,
                Ver {
                    version_id: m.version_id().unwrap().to_string(),
                    delete_marker: true,
                    latest: m.is_latest().unwrap_or(false),
                    etag: None,
                    size: 0,
                    secs: m.last_modified().unwrap().secs(),
                },
            ));
        }
        if r.is_truncated() != Some(true) {
            break;
        }
        km = r.next_key_marker().map(str::to_string);
        vm = r.next_version_id_marker().map(str::to_string);
    }
    out.into_iter()
        .map(|(k, mut v)| {
            // Newest first: the current one, then by time, then in the server's order.
            v.sort_by(|(pa, a), (pb, b)| {
                b.latest
                    .cmp(&a.latest)
                    .then(b.secs.cmp(&a.secs))
                    .then(pa.cmp(pb))
            });
            let mut v: Vec<Ver> = v.into_iter().map(|(_, v)| v).collect();
            v.reverse();
            (k, v)
        })
        .collect()
}

/// The object versions of a history (no delete markers), oldest first.
pub fn versions_only(h: &[Ver]) -> Vec<&Ver> {
    h.iter().filter(|v| !v.delete_marker).collect()
}

/// What a user compares between a source version and its replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Content {
    /// Bytes.
    pub body: Vec<u8>,
    /// Content-Type.
    pub content_type: Option<String>,
    /// Cache-Control.
    pub cache_control: Option<String>,
    /// User metadata.
    pub metadata: HashMap<String, String>,
    /// Tags, sorted.
    pub tags: Vec<(String, String)>,
    /// ETag.
    pub etag: Option<String>,
}

/// Reads one version's body, headers, metadata and tags.
pub async fn content(c: &Client, bucket: &str, key: &str, version: &str) -> Content {
    let o = c
        .get_object()
        .bucket(bucket)
        .key(key)
        .version_id(version)
        .send()
        .await
        .unwrap_or_else(|e| panic!("get {key:?} {version}: {e:?}"));
    let content_type = o.content_type().map(str::to_string);
    let cache_control = o.cache_control().map(str::to_string);
    let metadata = o.metadata().cloned().unwrap_or_default();
    let etag = o.e_tag().map(str::to_string);
    let body = o.body.collect().await.unwrap().into_bytes().to_vec();
    let t = c
        .get_object_tagging()
        .bucket(bucket)
        .key(key)
        .version_id(version)
        .send()
        .await
        .unwrap();
    let mut tags: Vec<(String, String)> = t
        .tag_set()
        .iter()
        .map(|t| (t.key().to_string(), t.value().to_string()))
        .collect();
    tags.sort();
    Content {
        body,
        content_type,
        cache_control,
        metadata,
        tags,
        etag,
    }
}

/// The s3-backfill binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_s3-backfill"))
}

/// A command for the binary with test credentials and no instance-metadata lookups.
pub fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(args)
        .env("AWS_ACCESS_KEY_ID", KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_REGION", "us-east-1")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .stdin(Stdio::null());
    c
}

/// Runs the binary and returns its output.
pub fn run(args: &[&str]) -> Output {
    cmd(args).output().expect("run s3-backfill")
}

/// Side options for one endpoint on both sides.
pub fn sides(source: &str, dest: &str) -> Vec<String> {
    vec![
        "--source-endpoint".into(),
        source.into(),
        "--dest-endpoint".into(),
        dest.into(),
        "--path-style".into(),
    ]
}

/// `status --json` as a JSON value.
pub fn status(manifest: &Path) -> serde_json::Value {
    let o = run(&["status", "--manifest", manifest.to_str().unwrap(), "--json"]);
    assert!(
        o.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("status json")
}

/// Panics with both output streams unless the process exited with `code`.
pub fn expect_code(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "exit status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Asserts that `dest` holds, for every source key (under `dest_prefix`), the same object
/// versions in the same order with the same content, the same number of delete markers,
/// and the same kind of current entry. `select` picks which source entries a job copies.
pub async fn assert_replica(
    sc: &Client,
    src: &str,
    dc: &Client,
    dst: &str,
    dest_prefix: &str,
    source_prefix: &str,
    select: impl Fn(&[Ver]) -> Vec<Ver>,
) -> usize {
    let sh = histories(sc, src, source_prefix).await;
    let dh = histories(dc, dst, &format!("{dest_prefix}{source_prefix}")).await;
    let mut expected_keys = 0;
    let mut checked = 0;
    for (key, hist) in &sh {
        let want = select(hist);
        let dkey = format!("{dest_prefix}{key}");
        let got = dh.get(&dkey).cloned().unwrap_or_default();
        if want.is_empty() {
            assert!(
                got.is_empty(),
                "{dkey:?} should not exist at the destination: {got:?}"
            );
            continue;
        }
        expected_keys += 1;
        let wv = versions_only(&want);
        let gv = versions_only(&got);
        assert_eq!(wv.len(), gv.len(), "{key:?}: versions {want:?} vs {got:?}");
        assert_eq!(
            want.iter().filter(|v| v.delete_marker).count(),
            got.iter().filter(|v| v.delete_marker).count(),
            "{key:?}: delete markers {want:?} vs {got:?}"
        );
        assert_eq!(
            want.last().map(|v| v.delete_marker),
            got.last().map(|v| v.delete_marker),
            "{key:?}: kind of the current entry"
        );
        for (s, d) in wv.iter().zip(&gv) {
            let a = content(sc, src, key, &s.version_id).await;
            let b = content(dc, dst, &dkey, &d.version_id).await;
            assert_eq!(
                a, b,
                "{key:?}: version {} vs replica {}",
                s.version_id, d.version_id
            );
            checked += 1;
        }
    }
    assert_eq!(
        dh.len(),
        expected_keys,
        "the destination has other keys: {:?}",
        dh.keys().collect::<Vec<_>>()
    );
    checked
}

/// Every entry of a history (what `--delete-markers` copies).
pub fn all(h: &[Ver]) -> Vec<Ver> {
    h.to_vec()
}

/// Object versions only (the default selection).
pub fn no_markers(h: &[Ver]) -> Vec<Ver> {
    h.iter().filter(|v| !v.delete_marker).cloned().collect()
}

/// The current version only, unless it is a delete marker (`--latest-only`).
pub fn latest_only(h: &[Ver]) -> Vec<Ver> {
    h.last()
        .filter(|v| !v.delete_marker)
        .cloned()
        .into_iter()
        .collect()
}

/// A manifest path in a fresh temporary directory (kept alive by the returned guard).
pub fn manifest() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("job.db");
    (d, p)
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
    (
        done.version_id().unwrap_or("null").to_string(),
        done.e_tag().unwrap_or_default().to_string(),
    )
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

/// One row of the manifest's `tasks` table, as the tests read it.
#[derive(Clone, Debug)]
pub struct TaskRow {
    /// Source key.
    pub key: String,
    /// Source version id.
    pub version_id: String,
    /// pending, in_progress, done, failed or skipped.
    pub state: String,
    /// How it was copied.
    pub copy_method: Option<String>,
    /// Part size of a multipart copy.
    pub part_size: Option<i64>,
    /// Parts of a multipart copy.
    pub parts: Option<i64>,
    /// Whether the multipart ETag was preserved (0/1).
    pub etag_preserved: Option<i64>,
    /// Upload in progress.
    pub upload_id: Option<String>,
}

/// Every task of a manifest, read-only, in id order.
pub fn manifest_tasks(path: &Path) -> Vec<TaskRow> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open the manifest read-only");
    let mut stmt = conn
        .prepare(
            "SELECT key, version_id, state, copy_method, part_size, parts, etag_preserved,
             upload_id FROM tasks ORDER BY id",
        )
        .expect("prepare");
    stmt.query_map([], |r| {
        Ok(TaskRow {
            key: r.get(0)?,
            version_id: r.get(1)?,
            state: r.get(2)?,
            copy_method: r.get(3)?,
            part_size: r.get(4)?,
            parts: r.get(5)?,
            etag_preserved: r.get(6)?,
            upload_id: r.get(7)?,
        })
    })
    .expect("query tasks")
    .collect::<Result<Vec<_>, _>>()
    .expect("read tasks")
}

/// `args` as the `&str` slice that [`run`] and [`cmd`] take.
pub fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The arguments of a `plan` or `replicate` from `s3://src` to `s3://dest` (`dest` may carry
/// a prefix) with manifest `m`, each side on its endpoint, followed by `extra`.
pub fn job(
    command: &str,
    src: &str,
    dest: &str,
    m: &Path,
    source_ep: &str,
    dest_ep: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut a: Vec<String> = vec![
        command.into(),
        "--source".into(),
        format!("s3://{src}"),
        "--dest".into(),
        format!("s3://{dest}"),
        "--manifest".into(),
        m.to_str().expect("utf-8 path").into(),
    ];
    a.extend(sides(source_ep, dest_ep));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `plan` of every version and delete marker, one endpoint for both sides, no progress bar.
pub fn plan_all(src: &str, dst: &str, m: &Path, ep: &str) -> Vec<String> {
    job(
        "plan",
        src,
        dst,
        m,
        ep,
        ep,
        &["--delete-markers", "--no-progress"],
    )
}
