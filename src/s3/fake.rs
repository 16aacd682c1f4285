//! s3::fake: an in-memory S3 server behind the [`S3Client`] trait, for in-process tests of
//! the scheduler, reconciliation and retry rules (milliseconds, no HTTP). Versioned and
//! unversioned buckets, versions and delete markers, metadata and tags, multipart uploads.
//!
//! Faults are injected per operation (and key): an error before the server acts, a lost
//! answer after it acted (the write happened, the client sees a reset), throttling. Server
//! quirks are switches: copies whose answer omits the new version id (as RGW's CopyObject).
//! The suites against real servers (moto, Ceph RGW) stay the reference; this is the seam's
//! second implementation.
//!
//! May call: the layer's records only.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use md5::{Digest, Md5};

use super::client::{RequestCounts, S3Client};
use super::error::{ErrorClass, S3Error};
use super::types::{
    BucketFacts, ChecksumAlgorithm, ListFrom, ObjectHead, ObjectRef, PartResult, Side,
    VersionEntry, VersionPage, WriteAttrs, WriteResult,
};

/// One stored version or delete marker.
#[derive(Clone, Debug, Default)]
pub struct FakeVersion {
    /// Version id (`null` in an unversioned bucket).
    pub id: String,
    /// A delete marker.
    pub delete_marker: bool,
    /// The bytes.
    pub body: Bytes,
    /// ETag, quotes included.
    pub etag: String,
    /// Content headers, user metadata, storage class as a HEAD shows them.
    pub head: ObjectHead,
    /// Tags, URL-encoded.
    pub tags: String,
    /// Fake clock second of the write.
    pub written_at: i64,
}

#[derive(Debug, Default)]
struct Bucket {
    versioned: bool,
    /// Versioning suspended: writes make `null` versions, replacing the key's null version.
    suspended: bool,
    /// Object lock enabled (said by HeadBucket's probe).
    object_lock: bool,
    /// Each key's history, oldest first.
    keys: BTreeMap<String, Vec<FakeVersion>>,
    uploads: BTreeMap<String, Upload>,
}

#[derive(Debug, Default)]
struct Upload {
    key: String,
    attrs: WriteAttrs,
    parts: BTreeMap<i32, Bytes>,
}

/// What an injected fault does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// Fails before the server acts, with this class and HTTP status.
    Before(ErrorClass, u16),
    /// The server acts, then the answer is lost (a reset the client sees as retryable).
    LostAnswer,
}

#[derive(Clone, Debug)]
struct Fault {
    op: &'static str,
    key: Option<String>,
    skip: u32,
    remaining: u32,
    kind: FaultKind,
}

#[derive(Debug, Default)]
struct Server {
    buckets: BTreeMap<String, Bucket>,
    next_id: u64,
    clock: i64,
    /// Writes share one second: the clock does not move (see [`FakeServer::list_like_moto`]).
    frozen: bool,
    faults: Vec<Fault>,
    /// Source writes made just before a matching call (see [`FakeServer::overwrite_before`]).
    overwrites: Vec<Overwrite>,
}

/// A write another client makes while the job runs, at an exact point.
#[derive(Clone, Debug)]
struct Overwrite {
    op: &'static str,
    skip: u32,
    bucket: String,
    key: String,
    /// The new bytes; None writes a delete marker.
    body: Option<Bytes>,
}

/// The fake server: make clients for each side with [`FakeS3::client`].
#[derive(Clone, Debug, Default)]
pub struct FakeServer {
    state: Arc<Mutex<Server>>,
    omit_copy_version: Arc<AtomicBool>,
    drop_replaced_tags: Arc<AtomicBool>,
    ignore_copy_if_match: Arc<AtomicBool>,
    no_markers: Arc<AtomicBool>,
    markers_last: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    /// Listing pages: (entries at most, 0 = as asked; milliseconds each page takes).
    paging: Arc<Mutex<(usize, u64)>>,
    /// Restores asked for (see [`FakeServer::restores`]).
    restores: Arc<Mutex<Vec<FakeRestore>>>,
}

/// A `RestoreObject` the fake received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeRestore {
    /// Bucket, key and version id.
    pub bucket: String,
    /// The key.
    pub key: String,
    /// The version id asked for.
    pub version_id: Option<String>,
    /// Days asked for.
    pub days: u32,
    /// Tier asked for.
    pub tier: String,
    /// Finished ([`FakeServer::finish_restore`]): the version reads again.
    pub done: bool,
}

/// A client of a [`FakeServer`] for one side.
#[derive(Clone, Debug)]
pub struct FakeS3 {
    server: FakeServer,
    side: Side,
    counts: Arc<RequestCounts>,
}

/// Tags in a URL-encoded tag string.
fn tag_count(tags: &str) -> u32 {
    tags.split('&').filter(|t| !t.is_empty()).count() as u32
}

fn quoted_md5(b: &[u8]) -> String {
    format!("\"{}\"", hex::encode(Md5::digest(b)))
}

fn err(side: Side, op: &'static str, class: ErrorClass, status: u16, code: &str) -> S3Error {
    S3Error {
        side,
        op,
        class,
        code: Some(code.to_string()),
        status: Some(status),
        message: format!("fake {code}"),
        bucket_region: None,
    }
}

impl FakeServer {
    /// A new, empty server.
    pub fn new() -> FakeServer {
        let s = FakeServer::default();
        // The clock starts at this machine's time (reconciliation without the stamp
        // compares write times with when an attempt started).
        s.state.lock().expect("fake lock").clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        s
    }

    /// A client of this server for `side`.
    pub fn client(&self, side: Side) -> FakeS3 {
        FakeS3 {
            server: self.clone(),
            side,
            counts: Arc::new(RequestCounts::default()),
        }
    }

    /// Creates a bucket.
    pub fn create_bucket(&self, name: &str, versioned: bool) {
        let mut s = self.state.lock().expect("fake lock");
        s.buckets.insert(
            name.to_string(),
            Bucket {
                versioned,
                ..Bucket::default()
            },
        );
    }

    /// Writes a version directly (seeding); returns its version id.
    pub fn put(&self, bucket: &str, key: &str, body: &[u8], metadata: &[(&str, &str)]) -> String {
        let head = ObjectHead {
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..ObjectHead::default()
        };
        let mut s = self.state.lock().expect("fake lock");
        s.write(
            bucket,
            key,
            Bytes::copy_from_slice(body),
            head,
            String::new(),
            false,
        )
    }

    /// Sets the versioning of a bucket: `Enabled`, `Suspended` (versions written from now on
    /// are `null`, replacing the key's null version) or anything else (never enabled).
    pub fn set_versioning(&self, bucket: &str, status: &str) {
        let mut s = self.state.lock().expect("fake lock");
        let b = s.buckets.entry(bucket.to_string()).or_default();
        b.versioned = status == "Enabled";
        b.suspended = status == "Suspended";
    }

    /// Sets the tags (URL-encoded) of one stored version directly.
    pub fn set_tags(&self, bucket: &str, key: &str, version: &str, tags: &str) {
        let mut s = self.state.lock().expect("fake lock");
        if let Some(v) = s.find_mut(bucket, key, Some(version)) {
            v.tags = tags.to_string();
            v.head.tag_count = tag_count(tags);
        }
    }

    /// Another writer: just before the `skip + 1`th matching call of `op` (any client, any
    /// key) is answered, `key` in `bucket` is overwritten with `body` (None: deleted).
    pub fn overwrite_before(
        &self,
        op: &'static str,
        skip: u32,
        bucket: &str,
        key: &str,
        body: Option<&[u8]>,
    ) {
        let mut s = self.state.lock().expect("fake lock");
        s.overwrites.push(Overwrite {
            op,
            skip,
            bucket: bucket.to_string(),
            key: key.to_string(),
            body: body.map(Bytes::copy_from_slice),
        });
    }

    /// Writes a delete marker directly (seeding); returns its version id.
    pub fn delete(&self, bucket: &str, key: &str) -> String {
        let mut s = self.state.lock().expect("fake lock");
        s.write(
            bucket,
            key,
            Bytes::new(),
            ObjectHead::default(),
            String::new(),
            true,
        )
    }

    /// Sets the storage class of one stored version (e.g. GLACIER: archived).
    pub fn set_storage_class(&self, bucket: &str, key: &str, version: &str, class: &str) {
        let mut s = self.state.lock().expect("fake lock");
        if let Some(v) = s.find_mut(bucket, key, Some(version)) {
            v.head.storage_class = Some(class.to_string());
            v.head.archived = matches!(class, "GLACIER" | "DEEP_ARCHIVE");
        }
    }

    /// Sets the ETag of one stored version (e.g. `"…-3"`: as if uploaded in 3 parts).
    pub fn set_etag(&self, bucket: &str, key: &str, version: &str, etag: &str) {
        let mut s = self.state.lock().expect("fake lock");
        if let Some(v) = s.find_mut(bucket, key, Some(version)) {
            v.etag = etag.to_string();
            v.head.etag = Some(etag.to_string());
        }
    }

    /// Sets the encryption of one stored version (e.g. SSE-C: unreadable without its key).
    pub fn set_encryption(
        &self,
        bucket: &str,
        key: &str,
        version: &str,
        enc: super::types::Encryption,
    ) {
        let mut s = self.state.lock().expect("fake lock");
        if let Some(v) = s.find_mut(bucket, key, Some(version)) {
            v.head.encryption = Some(enc);
        }
    }

    /// A key's history, oldest first.
    pub fn history(&self, bucket: &str, key: &str) -> Vec<FakeVersion> {
        let s = self.state.lock().expect("fake lock");
        s.buckets
            .get(bucket)
            .and_then(|b| b.keys.get(key))
            .cloned()
            .unwrap_or_default()
    }

    /// Every key of a bucket.
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        let s = self.state.lock().expect("fake lock");
        s.buckets
            .get(bucket)
            .map(|b| b.keys.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Open multipart uploads of a bucket.
    pub fn open_uploads(&self, bucket: &str) -> usize {
        let s = self.state.lock().expect("fake lock");
        s.buckets.get(bucket).map_or(0, |b| b.uploads.len())
    }

    /// Injects a fault into the next `times` calls of `op` (on `key` only, when given).
    pub fn fail(&self, op: &'static str, key: Option<&str>, times: u32, kind: FaultKind) {
        self.fail_after(op, key, 0, times, kind);
    }

    /// Like [`FakeServer::fail`], after letting `skip` matching calls pass.
    pub fn fail_after(
        &self,
        op: &'static str,
        key: Option<&str>,
        skip: u32,
        times: u32,
        kind: FaultKind,
    ) {
        let mut s = self.state.lock().expect("fake lock");
        s.faults.push(Fault {
            op,
            key: key.map(str::to_string),
            skip,
            remaining: times,
            kind,
        });
    }

    /// Makes truncated listing pages name no next markers (a server bug).
    pub fn truncate_without_markers(&self, on: bool) {
        self.no_markers.store(on, Ordering::Relaxed);
    }

    /// Lists like moto: each key's versions before its delete markers, as the real client
    /// orders such a page ([`super::xml::order_histories`]); and writes from now on share one
    /// second (moto's `LastModified` has whole seconds), so that order cannot always be
    /// restored.
    pub fn list_like_moto(&self, on: bool) {
        self.markers_last.store(on, Ordering::Relaxed);
        self.state.lock().expect("fake lock").frozen = on;
    }

    /// Listing pages hold `entries` at most (0: as many as asked) and each takes `delay_ms`
    /// (a slow listing beside a fast copy).
    pub fn page_listing(&self, entries: usize, delay_ms: u64) {
        *self.paging.lock().expect("fake paging lock") = (entries, delay_ms);
    }

    /// Removes every injected fault.
    pub fn clear_faults(&self) {
        self.state.lock().expect("fake lock").faults.clear();
    }

    /// Makes CopyObject answers omit the new version id (as RGW does).
    pub fn omit_copy_version_ids(&self, on: bool) {
        self.omit_copy_version.store(on, Ordering::Relaxed);
    }

    /// Makes CopyObject and UploadPartCopy ignore `x-amz-copy-source-if-match` (as moto and
    /// RGW 16.2 do): they copy whatever the key holds.
    pub fn ignore_copy_source_if_match(&self, on: bool) {
        self.ignore_copy_if_match.store(on, Ordering::Relaxed);
    }

    /// Makes CopyObject with MetadataDirective REPLACE drop the tags (as RGW 16.2 does).
    pub fn drop_tags_on_replace(&self, on: bool) {
        self.drop_replaced_tags.store(on, Ordering::Relaxed);
    }

    /// Enables object lock on a bucket (its probe says so).
    pub fn enable_object_lock(&self, bucket: &str) {
        let mut s = self.state.lock().expect("fake lock");
        if let Some(b) = s.buckets.get_mut(bucket) {
            b.object_lock = true;
        }
    }

    /// Sets the object lock settings of one stored version.
    pub fn set_version_lock(
        &self,
        bucket: &str,
        key: &str,
        version: &str,
        lock: super::types::ObjectLock,
    ) {
        let mut s = self.state.lock().expect("fake lock");
        if let Some(v) = s.find_mut(bucket, key, Some(version)) {
            v.head.lock = lock;
        }
    }

    /// The restores asked for so far, in order.
    pub fn restores(&self) -> Vec<FakeRestore> {
        self.restores.lock().expect("fake lock").clone()
    }

    /// Completes the restores of one version: it reads again (its storage class stays).
    pub fn finish_restore(&self, bucket: &str, key: &str, version: &str) {
        for r in self.restores.lock().expect("fake lock").iter_mut() {
            if r.bucket == bucket && r.key == key && r.version_id.as_deref() == Some(version) {
                r.done = true;
            }
        }
        let mut s = self.state.lock().expect("fake lock");
        if let Some(v) = s.find_mut(bucket, key, Some(version)) {
            v.head.archived = false;
        }
    }

    /// Calls answered so far, all operations.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

impl Server {
    /// Makes the overwrites due before this call of `op`.
    fn overwrite_due(&mut self, op: &str) {
        let mut due = Vec::new();
        self.overwrites.retain_mut(|o| {
            if o.op != op {
                return true;
            }
            if o.skip > 0 {
                o.skip -= 1;
                return true;
            }
            due.push(o.clone());
            false
        });
        for o in due {
            let dm = o.body.is_none();
            let body = o.body.unwrap_or_default();
            self.write(
                &o.bucket,
                &o.key,
                body,
                ObjectHead::default(),
                String::new(),
                dm,
            );
        }
    }

    fn take_fault(&mut self, op: &str, key: &str) -> Option<FaultKind> {
        let f = self
            .faults
            .iter_mut()
            .find(|f| f.op == op && f.remaining > 0 && f.key.as_deref().is_none_or(|k| k == key))?;
        if f.skip > 0 {
            f.skip -= 1;
            return None;
        }
        f.remaining -= 1;
        Some(f.kind.clone())
    }

    fn write(
        &mut self,
        bucket: &str,
        key: &str,
        body: Bytes,
        mut head: ObjectHead,
        tags: String,
        dm: bool,
    ) -> String {
        self.next_id += 1;
        if !self.frozen {
            self.clock += 1;
        }
        let (id, clock) = (format!("v{:06}", self.next_id), self.clock);
        let b = self.buckets.entry(bucket.to_string()).or_default();
        let id = if b.versioned { id } else { "null".to_string() };
        if b.suspended {
            // The key's null version (or null delete marker) is replaced.
            if let Some(h) = b.keys.get_mut(key) {
                h.retain(|v| v.id != "null");
            }
        }
        let etag = if dm { String::new() } else { quoted_md5(&body) };
        head.size = body.len() as u64;
        head.etag = Some(etag.clone());
        head.version_id = Some(id.clone());
        head.delete_marker = dm;
        head.tag_count = tag_count(&tags);
        let v = FakeVersion {
            id: id.clone(),
            delete_marker: dm,
            body,
            etag,
            head,
            tags,
            written_at: clock,
        };
        let h = b.keys.entry(key.to_string()).or_default();
        if !b.versioned && !b.suspended {
            h.clear();
        }
        h.push(v);
        id
    }

    fn find_mut(
        &mut self,
        bucket: &str,
        key: &str,
        version: Option<&str>,
    ) -> Option<&mut FakeVersion> {
        let h = self.buckets.get_mut(bucket)?.keys.get_mut(key)?;
        match version {
            Some(v) => h.iter_mut().find(|x| x.id == v),
            None => h.last_mut(),
        }
    }

    fn find(&self, bucket: &str, key: &str, version: Option<&str>) -> Option<&FakeVersion> {
        let h = self.buckets.get(bucket)?.keys.get(key)?;
        match version {
            Some(v) => h.iter().find(|x| x.id == v),
            None => h.last(),
        }
    }
}

impl FakeS3 {
    /// Runs one operation: counts it, applies an injected fault, else answers with `f`.
    fn op<T>(
        &self,
        op: &'static str,
        key: &str,
        f: impl FnOnce(&mut Server) -> Result<T, S3Error>,
    ) -> Result<T, S3Error> {
        self.counts.count(op);
        self.server.calls.fetch_add(1, Ordering::Relaxed);
        let mut s = self.server.state.lock().expect("fake lock");
        s.overwrite_due(op);
        match s.take_fault(op, key) {
            Some(FaultKind::Before(class, status)) => {
                Err(err(self.side, op, class, status, "Injected"))
            }
            Some(FaultKind::LostAnswer) => {
                f(&mut s)?;
                Err(S3Error::other(
                    self.side,
                    op,
                    ErrorClass::Retryable,
                    "connection reset after the server acted".into(),
                ))
            }
            None => f(&mut s),
        }
    }

    fn source_version<'a>(
        &self,
        s: &'a Server,
        op: &'static str,
        obj: &ObjectRef,
    ) -> Result<&'a FakeVersion, S3Error> {
        let v = s
            .find(&obj.bucket, &obj.key, obj.version_id.as_deref())
            .ok_or_else(|| err(self.side, op, ErrorClass::SourceGone, 404, "NoSuchVersion"))?;
        let ignored = matches!(op, "CopyObject" | "UploadPartCopy")
            && self.server.ignore_copy_if_match.load(Ordering::Relaxed);
        if let Some(want) = obj.if_match.as_ref().filter(|_| !ignored) {
            if !v.delete_marker && v.etag.trim_matches('"') != want.trim_matches('"') {
                return Err(err(
                    self.side,
                    op,
                    ErrorClass::Fatal,
                    412,
                    "PreconditionFailed",
                ));
            }
        }
        if v.head.archived && op != "HeadObject" {
            return Err(err(
                self.side,
                op,
                ErrorClass::Archived,
                403,
                "InvalidObjectState",
            ));
        }
        Ok(v)
    }
}

fn head_from_attrs(a: &WriteAttrs, from: Option<&ObjectHead>) -> ObjectHead {
    let mut h = match (a.replace_metadata, from) {
        (false, Some(src)) => ObjectHead {
            content: src.content.clone(),
            metadata: src.metadata.clone(),
            ..ObjectHead::default()
        },
        _ => ObjectHead {
            content: a.content.clone(),
            metadata: a.metadata.clone(),
            ..ObjectHead::default()
        },
    };
    h.storage_class = a.storage_class.clone();
    h.encryption = a.encryption.clone();
    h.website_redirect = a.website_redirect.clone();
    h.lock = a.lock.clone();
    h
}

fn entry(key: &str, v: &FakeVersion, latest: bool) -> VersionEntry {
    VersionEntry {
        key: key.to_string(),
        version_id: v.id.clone(),
        is_delete_marker: v.delete_marker,
        is_latest: latest,
        size: v.body.len() as u64,
        etag: (!v.delete_marker).then(|| v.etag.clone()),
        last_modified: aws_smithy_types::DateTime::from_secs(v.written_at)
            .fmt(aws_smithy_types::date_time::Format::DateTime)
            .ok(),
        storage_class: v.head.storage_class.clone(),
        checksum_algorithm: None,
    }
}

impl S3Client for FakeS3 {
    fn side(&self) -> Side {
        self.side
    }

    fn requests(&self) -> &RequestCounts {
        &self.counts
    }

    async fn list_versions(&self, from: &ListFrom) -> Result<VersionPage, S3Error> {
        let no_markers = self.server.no_markers.load(Ordering::Relaxed);
        let markers_last = self.server.markers_last.load(Ordering::Relaxed);
        let (most, delay) = *self.server.paging.lock().expect("fake paging lock");
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        let page = match most {
            0 => from.max_keys.max(1) as usize,
            n => n.min(from.max_keys.max(1) as usize),
        };
        self.op("ListObjectVersions", &from.prefix, |s| {
            let b = s.buckets.get(&from.bucket).ok_or_else(|| {
                err(
                    self.side,
                    "ListObjectVersions",
                    ErrorClass::Fatal,
                    404,
                    "NoSuchBucket",
                )
            })?;
            let mut all = Vec::new();
            for (k, h) in b.keys.range(from.prefix.clone()..) {
                if !k.starts_with(&from.prefix) {
                    break;
                }
                let from = all.len();
                for (i, v) in h.iter().enumerate().rev() {
                    all.push(entry(k, v, i + 1 == h.len()));
                }
                if markers_last {
                    all[from..].sort_by_key(|e| e.is_delete_marker);
                    super::xml::order_histories(&mut all[from..]);
                }
            }
            let start = match (&from.key_marker, &from.version_marker) {
                (Some(k), Some(v)) if !v.is_empty() => all
                    .iter()
                    .position(|e| e.key == *k && e.version_id == *v)
                    .map_or(0, |i| i + 1),
                (Some(k), _) => all
                    .iter()
                    .position(|e| e.key.as_str() > k.as_str())
                    .unwrap_or(all.len()),
                _ => 0,
            };
            let end = (start + page).min(all.len());
            let truncated = end < all.len();
            let last = all
                .get(end.wrapping_sub(1))
                .filter(|_| truncated && !no_markers)
                .cloned();
            Ok(VersionPage {
                entries: all[start..end].to_vec(),
                truncated,
                next_key_marker: last.as_ref().map(|e| e.key.clone()),
                next_version_marker: last.map(|e| e.version_id),
            })
        })
    }

    async fn head_object(&self, obj: &ObjectRef, part: Option<i32>) -> Result<ObjectHead, S3Error> {
        self.op("HeadObject", &obj.key, |s| {
            let v = self.source_version(s, "HeadObject", obj)?;
            if v.delete_marker {
                return Err(err(
                    self.side,
                    "HeadObject",
                    ErrorClass::SourceGone,
                    404,
                    "NotFound",
                ));
            }
            let mut h = v.head.clone();
            if part.is_some() {
                h.parts_count = Some(1);
            }
            Ok(h)
        })
    }

    async fn get_object(
        &self,
        obj: &ObjectRef,
        range: Option<(u64, u64)>,
    ) -> Result<Bytes, S3Error> {
        self.op("GetObject", &obj.key, |s| {
            let v = self.source_version(s, "GetObject", obj)?;
            Ok(match range {
                Some((a, b)) => v.body.slice(a as usize..(b as usize + 1).min(v.body.len())),
                None => v.body.clone(),
            })
        })
    }

    async fn get_tagging(&self, obj: &ObjectRef) -> Result<String, S3Error> {
        self.op("GetObjectTagging", &obj.key, |s| {
            Ok(self
                .source_version(s, "GetObjectTagging", obj)?
                .tags
                .clone())
        })
    }

    async fn copy_object(
        &self,
        dest: &ObjectRef,
        src: &ObjectRef,
        attrs: &WriteAttrs,
    ) -> Result<WriteResult, S3Error> {
        let omit = self.server.omit_copy_version.load(Ordering::Relaxed);
        let drop_tags =
            attrs.replace_metadata && self.server.drop_replaced_tags.load(Ordering::Relaxed);
        self.op("CopyObject", &dest.key, |s| {
            let v = self.source_version(s, "CopyObject", src)?.clone();
            let head = head_from_attrs(attrs, Some(&v.head));
            let tags = match drop_tags {
                true => String::new(),
                false => attrs.tagging.clone().unwrap_or(v.tags),
            };
            let id = s.write(&dest.bucket, &dest.key, v.body, head, tags, false);
            Ok(WriteResult {
                version_id: (!omit).then_some(id),
                etag: Some(v.etag),
                checksum: None,
            })
        })
    }

    async fn put_object(
        &self,
        dest: &ObjectRef,
        body: Bytes,
        attrs: &WriteAttrs,
    ) -> Result<WriteResult, S3Error> {
        self.op("PutObject", &dest.key, |s| {
            let etag = quoted_md5(&body);
            let id = s.write(
                &dest.bucket,
                &dest.key,
                body,
                head_from_attrs(attrs, None),
                attrs.tagging.clone().unwrap_or_default(),
                false,
            );
            Ok(WriteResult {
                version_id: Some(id),
                etag: Some(etag),
                checksum: None,
            })
        })
    }

    async fn get_object_stream(
        &self,
        obj: &ObjectRef,
        range: Option<(u64, u64)>,
    ) -> Result<(aws_sdk_s3::primitives::ByteStream, u64), S3Error> {
        let body = self.get_object(obj, range).await?;
        let len = body.len() as u64;
        Ok((body.into(), len))
    }

    async fn put_object_stream(
        &self,
        dest: &ObjectRef,
        body: aws_sdk_s3::primitives::ByteStream,
        len: u64,
        attrs: &WriteAttrs,
    ) -> Result<WriteResult, S3Error> {
        let body = collect(body, len, "PutObject").await?;
        self.put_object(dest, body, attrs).await
    }

    async fn delete_object(&self, dest: &ObjectRef) -> Result<WriteResult, S3Error> {
        self.op("DeleteObject", &dest.key, |s| {
            if let Some(v) = &dest.version_id {
                let b = s.buckets.entry(dest.bucket.clone()).or_default();
                if let Some(h) = b.keys.get_mut(&dest.key) {
                    h.retain(|x| &x.id != v);
                }
                return Ok(WriteResult {
                    version_id: Some(v.clone()),
                    ..WriteResult::default()
                });
            }
            let id = s.write(
                &dest.bucket,
                &dest.key,
                Bytes::new(),
                ObjectHead::default(),
                String::new(),
                true,
            );
            Ok(WriteResult {
                version_id: Some(id),
                ..WriteResult::default()
            })
        })
    }

    async fn put_tagging(&self, obj: &ObjectRef, tagging: &str) -> Result<(), S3Error> {
        self.op("PutObjectTagging", &obj.key, |s| {
            let v = s
                .find_mut(&obj.bucket, &obj.key, obj.version_id.as_deref())
                .ok_or_else(|| {
                    err(
                        self.side,
                        "PutObjectTagging",
                        ErrorClass::Fatal,
                        404,
                        "NoSuchVersion",
                    )
                })?;
            v.tags = tagging.to_string();
            v.head.tag_count = tag_count(tagging);
            Ok(())
        })
    }

    async fn create_multipart(
        &self,
        dest: &ObjectRef,
        attrs: &WriteAttrs,
    ) -> Result<String, S3Error> {
        self.op("CreateMultipartUpload", &dest.key, |s| {
            s.next_id += 1;
            let id = format!("upload-{}", s.next_id);
            let b = s.buckets.entry(dest.bucket.clone()).or_default();
            b.uploads.insert(
                id.clone(),
                Upload {
                    key: dest.key.clone(),
                    attrs: attrs.clone(),
                    parts: BTreeMap::new(),
                },
            );
            Ok(id)
        })
    }

    async fn upload_part_copy(
        &self,
        dest: &ObjectRef,
        upload_id: &str,
        n: i32,
        src: &ObjectRef,
        range: (u64, u64),
    ) -> Result<PartResult, S3Error> {
        self.op("UploadPartCopy", &dest.key, |s| {
            let body = self
                .source_version(s, "UploadPartCopy", src)?
                .body
                .slice(range.0 as usize..range.1 as usize + 1);
            add_part(s, self.side, dest, upload_id, n, body)
        })
    }

    async fn upload_part(
        &self,
        dest: &ObjectRef,
        upload_id: &str,
        n: i32,
        body: Bytes,
        _md5: Option<&str>,
        _alg: Option<ChecksumAlgorithm>,
    ) -> Result<PartResult, S3Error> {
        self.op("UploadPart", &dest.key, |s| {
            add_part(s, self.side, dest, upload_id, n, body)
        })
    }

    async fn upload_part_stream(
        &self,
        dest: &ObjectRef,
        upload_id: &str,
        n: i32,
        body: aws_sdk_s3::primitives::ByteStream,
        len: u64,
    ) -> Result<PartResult, S3Error> {
        let body = collect(body, len, "UploadPart").await?;
        self.upload_part(dest, upload_id, n, body, None, None).await
    }

    async fn complete_multipart(
        &self,
        dest: &ObjectRef,
        upload_id: &str,
        parts: &[PartResult],
    ) -> Result<WriteResult, S3Error> {
        self.op("CompleteMultipartUpload", &dest.key, |s| {
            let b = s.buckets.entry(dest.bucket.clone()).or_default();
            let up = b.uploads.remove(upload_id).ok_or_else(|| {
                err(
                    self.side,
                    "CompleteMultipartUpload",
                    ErrorClass::Fatal,
                    404,
                    "NoSuchUpload",
                )
            })?;
            let mut body = Vec::new();
            let mut digests = Vec::new();
            for p in parts {
                let part = up.parts.get(&p.number).ok_or_else(|| {
                    err(
                        self.side,
                        "CompleteMultipartUpload",
                        ErrorClass::Fatal,
                        400,
                        "InvalidPart",
                    )
                })?;
                body.extend_from_slice(part);
                digests.extend_from_slice(&Md5::digest(part));
            }
            let etag = format!("\"{}-{}\"", hex::encode(Md5::digest(&digests)), parts.len());
            let tags = up.attrs.tagging.clone().unwrap_or_default();
            let id = s.write(
                &dest.bucket,
                &up.key,
                Bytes::from(body),
                head_from_attrs(&up.attrs, None),
                tags,
                false,
            );
            if let Some(v) = s.find_mut(&dest.bucket, &up.key, Some(&id)) {
                v.etag = etag.clone();
                v.head.etag = Some(etag.clone());
            }
            Ok(WriteResult {
                version_id: Some(id),
                etag: Some(etag),
                checksum: None,
            })
        })
    }

    async fn abort_multipart(&self, dest: &ObjectRef, upload_id: &str) -> Result<(), S3Error> {
        self.op("AbortMultipartUpload", &dest.key, |s| {
            if let Some(b) = s.buckets.get_mut(&dest.bucket) {
                b.uploads.remove(upload_id);
            }
            Ok(())
        })
    }

    async fn list_uploads(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<(String, String)>, S3Error> {
        self.op("ListMultipartUploads", prefix, |s| {
            Ok(s.buckets
                .get(bucket)
                .map(|b| {
                    b.uploads
                        .iter()
                        .filter(|(_, u)| u.key.starts_with(prefix))
                        .map(|(id, u)| (u.key.clone(), id.clone()))
                        .collect()
                })
                .unwrap_or_default())
        })
    }

    async fn restore_object(
        &self,
        obj: &ObjectRef,
        days: u32,
        tier: &str,
    ) -> Result<super::client::Restore, S3Error> {
        const OP: &str = "RestoreObject";
        let class = self.op(OP, &obj.key, |s| {
            let v = s
                .find(&obj.bucket, &obj.key, obj.version_id.as_deref())
                .ok_or_else(|| err(self.side, OP, ErrorClass::SourceGone, 404, "NoSuchVersion"))?;
            Ok(v.head.storage_class.clone())
        })?;
        if !matches!(class.as_deref(), Some("GLACIER" | "DEEP_ARCHIVE")) {
            return Err(err(
                self.side,
                OP,
                ErrorClass::Fatal,
                403,
                "InvalidObjectState",
            ));
        }
        let mut restores = self.server.restores.lock().expect("fake lock");
        let same = |r: &&FakeRestore| {
            r.bucket == obj.bucket && r.key == obj.key && r.version_id == obj.version_id
        };
        if restores.iter().filter(same).any(|r| !r.done) {
            return Ok(super::client::Restore::InProgress);
        }
        restores.push(FakeRestore {
            bucket: obj.bucket.clone(),
            key: obj.key.clone(),
            version_id: obj.version_id.clone(),
            days,
            tier: tier.to_string(),
            done: false,
        });
        Ok(super::client::Restore::Requested)
    }

    async fn probe_bucket(&self, bucket: &str) -> Result<BucketFacts, S3Error> {
        self.op("HeadBucket", bucket, |s| {
            let b = s.buckets.get(bucket).ok_or_else(|| {
                err(
                    self.side,
                    "HeadBucket",
                    ErrorClass::Fatal,
                    404,
                    "NoSuchBucket",
                )
            })?;
            Ok(BucketFacts {
                region: None,
                versioned: b.versioned,
                suspended: b.suspended,
                object_lock: b.object_lock,
                rgw: false,
            })
        })
    }
}

fn add_part(
    s: &mut Server,
    side: Side,
    dest: &ObjectRef,
    upload_id: &str,
    n: i32,
    body: Bytes,
) -> Result<PartResult, S3Error> {
    let up = s
        .buckets
        .get_mut(&dest.bucket)
        .and_then(|b| b.uploads.get_mut(upload_id))
        .ok_or_else(|| err(side, "UploadPart", ErrorClass::Fatal, 404, "NoSuchUpload"))?;
    let etag = quoted_md5(&body);
    up.parts.insert(n, body);
    Ok(PartResult {
        number: n,
        etag: Some(etag),
        checksum: None,
    })
}

/// The bytes of a passed-through body, which must be the `len` announced (an upload `op` of
/// a body cut short fails, as on a server).
async fn collect(
    body: aws_sdk_s3::primitives::ByteStream,
    len: u64,
    op: &'static str,
) -> Result<Bytes, S3Error> {
    let body = body
        .collect()
        .await
        .map_err(|e| {
            S3Error::other(
                Side::Source,
                "GetObject",
                ErrorClass::Retryable,
                e.to_string(),
            )
        })?
        .into_bytes();
    if body.len() as u64 != len {
        return Err(S3Error::other(
            Side::Dest,
            op,
            ErrorClass::Retryable,
            format!("body of {} bytes, {len} announced", body.len()),
        ));
    }
    Ok(body)
}
