//! copier::strategy: how one source version becomes one destination version.
//!
//! [`choose_plan`] is a pure choice between the plans of [`CopyPlan`]: a delete marker, a
//! server-side `CopyObject`, a server-side multipart `UploadPartCopy` (parts in parallel,
//! the source's own part layout when it is uniform, so the multipart ETag is kept), or
//! streaming (ranged GETs with the source's client, `PutObject` or `UploadPart` with the
//! destination's; the bytes held between GET and upload bounded by `--max-memory`, see
//! `Budget`). A small version is copied with one `CopyObject` and no HEAD of the source
//! where nothing a HEAD would tell changes the copy (see `Copier::one_request`).
//!
//! Every request goes through the s3 layer's retry loop; the one that creates the destination
//! version is a non-idempotent write whose reconcile hook looks for what an ambiguous attempt
//! created, so a retry never makes a second version.
//!
//! May call: the s3 layer and the manifest's records.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::Ordering;

use base64::Engine;
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use md5::{Digest, Md5};

use super::scheduler::TaskCtx;
use super::{now_secs, Copier};
use crate::config::{CopyMode, CopyOptions, Sse, MAX_COPY_OBJECT, MAX_PART, MAX_PARTS, MIN_PART};
use crate::manifest::{CopyMethod, Outcome, Update};
use crate::s3::{
    show_key, ChecksumAlgorithm, Encryption, ErrorClass, ObjectHead, ObjectLock, PartResult,
    S3Client, S3Error, WriteAttrs, WriteResult, Written, STAMP_KEY,
};

/// Of `--max-memory`, what the program itself keeps (code, runtime, SDK, manifest cache,
/// connection buffers, allocator slack: measured ~27 MiB idle and up to ~37 MiB more than
/// the bodies held while streaming, see `benches/stream_memory.rs`); the rest is for
/// streamed bodies.
pub const MEMORY_RESERVE: u64 = 48 * 1024 * 1024;

/// The bytes of streamed bodies held at once, between their GET and their upload: a
/// semaphore counted in KiB, of `--max-memory` less [`MEMORY_RESERVE`] (at least one
/// smallest part). A body larger than the whole budget (a part grown past it to stay within
/// 10,000 parts) takes the whole budget, so it never waits forever.
#[derive(Debug)]
pub(super) struct Budget {
    kib: tokio::sync::Semaphore,
    total_kib: u32,
}

impl Budget {
    pub(super) fn new(max_memory: u64) -> Budget {
        let bytes = max_memory.saturating_sub(MEMORY_RESERVE).max(MIN_PART);
        let total_kib = (bytes / 1024).clamp(1, u32::MAX as u64) as u32;
        Budget {
            kib: tokio::sync::Semaphore::new(total_kib as usize),
            total_kib,
        }
    }

    /// The budget in bytes.
    pub(super) fn bytes(&self) -> u64 {
        self.total_kib as u64 * 1024
    }

    /// Bytes free now.
    #[cfg(test)]
    pub(super) fn available(&self) -> u64 {
        self.kib.available_permits() as u64 * 1024
    }

    /// Waits until `bytes` fit; they are given back when the permit is dropped.
    pub(super) async fn hold(
        &self,
        bytes: u64,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, S3Error> {
        let kib = bytes.div_ceil(1024).clamp(1, self.total_kib as u64) as u32;
        self.kib.acquire_many(kib).await.map_err(|e| {
            S3Error::other(
                crate::s3::Side::Source,
                "GetObject",
                ErrorClass::Fatal,
                e.to_string(),
            )
        })
    }
}

/// The copy options of a streamed task: parts no larger than the memory budget (and so a
/// single-request stream no larger either).
fn capped_for_stream(c: &CopyOptions, budget: u64) -> CopyOptions {
    CopyOptions {
        part_size: c.part_size.min(budget).max(MIN_PART),
        ..c.clone()
    }
}

/// How one task is copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyPlan {
    /// `DeleteObject` of the destination key.
    DeleteMarker,
    /// One server-side `CopyObject`.
    Copy,
    /// Server-side `UploadPartCopy` parts.
    MultipartCopy,
    /// One GET, one `PutObject`.
    Stream,
    /// Ranged GETs, `UploadPart` parts.
    MultipartStream,
}

/// Chooses the plan: parts at or above the multipart threshold, above 5 GiB (CopyObject's
/// limit), and when streaming above one part (memory stays within about one part per request
/// in flight whatever the object sizes).
///
/// ```
/// use s3_backfill::config::CopyOptions;
/// use s3_backfill::copier::{choose_plan, CopyPlan};
/// let opts = CopyOptions::default(); // 64 MiB threshold, 16 MiB parts
/// assert_eq!(choose_plan(false, 1 << 20, true, &opts), CopyPlan::Copy);
/// assert_eq!(choose_plan(false, 100 << 20, true, &opts), CopyPlan::MultipartCopy);
/// assert_eq!(choose_plan(false, 20 << 20, false, &opts), CopyPlan::MultipartStream);
/// assert_eq!(choose_plan(true, 0, true, &opts), CopyPlan::DeleteMarker);
/// ```
pub fn choose_plan(
    is_delete_marker: bool,
    size: u64,
    server_side: bool,
    c: &CopyOptions,
) -> CopyPlan {
    if is_delete_marker {
        return CopyPlan::DeleteMarker;
    }
    let parts = size >= c.multipart_threshold
        || size > MAX_COPY_OBJECT
        || (!server_side && size > c.part_size);
    match (server_side, parts) {
        (true, false) => CopyPlan::Copy,
        (true, true) => CopyPlan::MultipartCopy,
        (false, false) => CopyPlan::Stream,
        (false, true) => CopyPlan::MultipartStream,
    }
}

/// A multipart layout: part size and count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Every part but the last has this size.
    pub part_size: u64,
    /// Number of parts.
    pub parts: u64,
    /// This is the source's own layout (the ETag will match).
    pub preserves_etag: bool,
}

/// Chooses the part layout: the source's own when it is uniform and known, else `preferred`
/// grown as needed to stay within 10,000 parts.
///
/// ```
/// use s3_backfill::copier::choose_layout;
/// const MIB: u64 = 1024 * 1024;
/// // A 12 MiB source uploaded in 3 parts of 5 MiB keeps its layout (and so its ETag).
/// let l = choose_layout(12 * MIB, 16 * MIB, Some((5 * MIB, 3)));
/// assert_eq!((l.part_size, l.parts, l.preserves_etag), (5 * MIB, 3, true));
/// ```
pub fn choose_layout(size: u64, preferred: u64, source_layout: Option<(u64, u64)>) -> Layout {
    if let Some((first, n)) = source_layout {
        let uniform = n >= 1
            && (MIN_PART..=MAX_PART).contains(&first)
            && n <= MAX_PARTS
            && (n - 1) * first < size.max(1)
            && size <= n * first;
        if uniform {
            return Layout {
                part_size: first,
                parts: n,
                preserves_etag: true,
            };
        }
    }
    let mut part = preferred.clamp(MIN_PART, MAX_PART);
    while size.div_ceil(part) > MAX_PARTS {
        part *= 2;
    }
    let part = part.min(MAX_PART);
    Layout {
        part_size: part,
        parts: size.div_ceil(part).max(1),
        preserves_etag: false,
    }
}

/// The result of one task's copy.
#[derive(Clone, Debug)]
pub(super) struct Copied {
    pub(super) dest_version_id: Option<String>,
    pub(super) method: CopyMethod,
    pub(super) part_size: Option<u64>,
    pub(super) parts: Option<u64>,
    pub(super) etag_preserved: Option<bool>,
}

impl Copied {
    fn single(dest_version_id: Option<String>, method: CopyMethod) -> Copied {
        Copied {
            dest_version_id,
            method,
            part_size: None,
            parts: None,
            etag_preserved: None,
        }
    }

    /// Done; `to_learn`: its destination version id is learned later (see `learn`).
    pub(super) fn into_outcome(self, to_learn: bool) -> Outcome {
        Outcome::Done {
            to_learn,
            dest_version_id: self.dest_version_id,
            method: self.method,
            part_size: self.part_size,
            parts: self.parts,
            etag_preserved: self.etag_preserved,
            retries: 0,
        }
    }
}

/// What a version-creating write ended with.
enum Wrote {
    /// This run's write: the answer, the new version's id, and its HEAD when one was needed
    /// to learn the id.
    New(WriteResult, Option<String>, Option<Box<ObjectHead>>),
    /// An ambiguous earlier attempt had written it: its version id.
    Adopted(Option<String>),
}

fn md5_b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(b))
}

/// The error code of a version its replication rule leaves out (an SSE-KMS object without
/// `SseKmsEncryptedObjects` enabled): the task is skipped with that reason.
pub(super) const NOT_REPLICATED: &str = "NotReplicatedByRule";

fn fatal(side: crate::s3::Side, op: &'static str, message: String) -> S3Error {
    S3Error::other(side, op, ErrorClass::Fatal, message)
}

impl<C: S3Client> Copier<C> {
    /// Copies one task by its plan; in `auto` mode a server-side copy that the destination's
    /// credentials may not do is streamed instead, for this task only (remembered in the
    /// manifest, so later runs stream it at once).
    pub(super) async fn copy_task(&self, ctx: &TaskCtx<'_>) -> Result<Copied, S3Error> {
        if ctx.task.is_delete_marker {
            return self.delete_marker(ctx).await;
        }
        let server_side = self.settings.server_side() && !ctx.task.stream_only;
        match self.copy_version(ctx, server_side).await {
            Err(e) if server_side && self.falls_back_to_stream(ctx, &e) => {
                self.copy_version(ctx, false).await
            }
            r => r,
        }
    }

    fn falls_back_to_stream(&self, ctx: &TaskCtx<'_>, e: &S3Error) -> bool {
        let denied = e.class == ErrorClass::Fatal
            && (e.status == Some(403) || e.code.as_deref() == Some("AccessDenied"));
        if self.settings.copy.mode != CopyMode::Auto || !denied {
            return false;
        }
        if !self.stream_said.swap(true, Ordering::Relaxed) {
            self.progress.say(format!(
                "server-side copy was denied ({e}); streaming through this machine each task it is denied for (first: {} version {}; decided per task and kept in the manifest)",
                show_key(&ctx.task.key),
                ctx.task.version_id
            ));
        }
        self.send(Update::StreamOnly { id: ctx.task.id });
        true
    }

    async fn copy_version(&self, ctx: &TaskCtx<'_>, server_side: bool) -> Result<Copied, S3Error> {
        if server_side && self.one_request(ctx).await {
            return self.copy_listed(ctx).await;
        }
        let head = self.head_source(ctx, None).await?;
        self.rule_takes(ctx, &head)?;
        let attrs = self.write_attrs(ctx, &head);
        let capped;
        let c = if server_side {
            &self.settings.copy
        } else {
            capped = capped_for_stream(&self.settings.copy, self.memory.bytes());
            &capped
        };
        match choose_plan(false, head.size, server_side, c) {
            CopyPlan::Copy => self.copy_object(ctx, &head, &attrs).await,
            CopyPlan::Stream => self.stream_put(ctx, &head, attrs).await,
            CopyPlan::MultipartCopy => self.multipart(ctx, &head, attrs, true).await,
            CopyPlan::MultipartStream => self.multipart(ctx, &head, attrs, false).await,
            CopyPlan::DeleteMarker => self.delete_marker(ctx).await,
        }
    }

    /// Whether this task is copied by one `CopyObject` and no HEAD of the source: nothing a
    /// HEAD would tell changes the copy. That holds when
    /// - no stamp is written: the stamp needs MetadataDirective REPLACE, and so the source's
    ///   metadata and content headers, which only a HEAD gives (COPY carries them as they are);
    /// - the destination's encryption does not come from the source version (`--sse` given);
    /// - the listed size takes one `CopyObject`;
    /// - the listed storage class cannot be archived (GLACIER and DEEP_ARCHIVE: only a HEAD
    ///   tells whether a version is restored; INTELLIGENT_TIERING: its archive tiers);
    /// - the source bucket has no object lock (retention and legal hold are per version;
    ///   read once per run, and an answer that does not tell keeps the HEAD).
    ///
    /// Tags (TaggingDirective COPY), metadata and content headers (MetadataDirective COPY)
    /// are copied by the server; the storage class and checksum algorithm come from the
    /// listing; a version gone since the listing answers 404 (skipped as gone).
    async fn one_request(&self, ctx: &TaskCtx<'_>) -> bool {
        let c = &self.settings.copy;
        let listed = ctx.task.storage_class.as_deref();
        // A replication rule decides by the source's encryption (SSE-KMS only when it opts
        // in, its own KMS key): that needs the HEAD.
        let ruled = self.settings.destination(ctx.task.dest).2.is_some();
        if c.stamp
            || ruled
            || c.sse.is_none()
            || choose_plan(false, ctx.task.size, true, c) != CopyPlan::Copy
            || matches!(
                listed,
                Some("GLACIER" | "DEEP_ARCHIVE" | "INTELLIGENT_TIERING")
            )
        {
            return false;
        }
        !self.source_has_lock().await
    }

    /// Whether the source bucket has object lock (or cannot tell), read once per run.
    async fn source_has_lock(&self) -> bool {
        let probe = || async {
            let retries = std::sync::atomic::AtomicU64::new(0);
            let bucket = &self.settings.source.bucket;
            match self
                .retrier
                .call(&retries, || self.source.object_lock_enabled(bucket))
                .await
            {
                Ok(on) => on,
                Err(e) => {
                    tracing::warn!("object lock of source bucket {bucket} unknown ({e}): every version is HEADed for its lock settings");
                    true
                }
            }
        };
        *self.source_lock.get_or_init(probe).await
    }

    /// One `CopyObject` from what the listing said (see `Copier::one_request`).
    async fn copy_listed(&self, ctx: &TaskCtx<'_>) -> Result<Copied, S3Error> {
        let c = &self.settings.copy;
        let listed = ctx.task.storage_class.clone();
        let attrs = WriteAttrs {
            replace_metadata: false,
            storage_class: c
                .storage_class
                .clone()
                .or_else(|| listed.filter(|s| s != "STANDARD")),
            encryption: chosen_encryption(c).flatten(),
            acl: c.acl.clone(),
            checksum_algorithm: ctx
                .task
                .checksum_algorithm
                .as_deref()
                .and_then(ChecksumAlgorithm::parse),
            ..WriteAttrs::default()
        };
        let src = ctx.source(&self.settings.source.bucket);
        let wrote = self
            .write_version(ctx, true, || self.dest.copy_object(&ctx.dest, &src, &attrs))
            .await?;
        Ok(match wrote {
            Wrote::Adopted(v) => Copied::single(v, CopyMethod::Reconciled),
            Wrote::New(_, v, _) => Copied::single(v, CopyMethod::Copy),
        })
    }

    /// HEAD of the source version with the source's client; a version that cannot be copied
    /// is said here: gone (now a delete marker), archived, or SSE-C encrypted.
    async fn head_source(
        &self,
        ctx: &TaskCtx<'_>,
        part: Option<i32>,
    ) -> Result<ObjectHead, S3Error> {
        let src = ctx.source(&self.settings.source.bucket);
        let head = self
            .retrier
            .call(&ctx.retries, || self.source.head_object(&src, part))
            .await?;
        let side = self.source.side();
        if head.delete_marker {
            return Err(S3Error::other(
                side,
                "HeadObject",
                ErrorClass::SourceGone,
                "the version is a delete marker now".into(),
            ));
        }
        if head.archived {
            return Err(S3Error::other(
                side,
                "HeadObject",
                ErrorClass::Archived,
                format!(
                    "storage class {}",
                    head.storage_class.as_deref().unwrap_or("archive")
                ),
            ));
        }
        if head.encryption == Some(Encryption::SseC) {
            return Err(fatal(side, "HeadObject", "the version is SSE-C encrypted: it cannot be read without the customer's key, which s3-backfill does not take".into()));
        }
        Ok(head)
    }

    /// Refuses an SSE-KMS version that the task's replication rule leaves out (known only
    /// now, from the source HEAD).
    fn rule_takes(&self, ctx: &TaskCtx<'_>, head: &ObjectHead) -> Result<(), S3Error> {
        let Some(rule) = self.settings.destination(ctx.task.dest).2 else {
            return Ok(());
        };
        let kms = matches!(
            head.encryption,
            Some(Encryption::SseKms(_) | Encryption::DsseKms(_))
        );
        if kms && !rule.sse_kms_allowed {
            let why = format!(
                "not replicated: SSE-KMS object, and rule {} does not enable SseKmsEncryptedObjects",
                rule.rule
            );
            let e = fatal(self.source.side(), "HeadObject", why);
            return Err(S3Error {
                code: Some(NOT_REPLICATED.into()),
                ..e
            });
        }
        Ok(())
    }

    /// What the destination version carries over from the source version; a replication
    /// rule's storage class, owner override and KMS key come before the job's options.
    fn write_attrs(&self, ctx: &TaskCtx<'_>, head: &ObjectHead) -> WriteAttrs {
        let c = &self.settings.copy;
        let rule = self.settings.destination(ctx.task.dest).2;
        let mut metadata: BTreeMap<String, String> = head.metadata.clone();
        if c.stamp {
            metadata.insert(STAMP_KEY.to_string(), ctx.task.version_id.clone());
        }
        let rule_kms = rule.and_then(|r| r.kms_key.clone());
        let encryption = match chosen_encryption(c) {
            Some(e) => e,
            None => match (&head.encryption, rule_kms) {
                (Some(Encryption::SseKms(_) | Encryption::DsseKms(_)), Some(k)) => {
                    Some(Encryption::SseKms(Some(k)))
                }
                (e, _) => e.clone(),
            },
        };
        WriteAttrs {
            replace_metadata: c.stamp,
            content: head.content.clone(),
            metadata,
            tagging: None,
            storage_class: rule
                .and_then(|r| r.storage_class.clone())
                .or_else(|| c.storage_class.clone())
                .or_else(|| head.storage_class.clone().filter(|s| s != "STANDARD")),
            encryption,
            acl: match rule {
                Some(r) if r.owner_override => Some("bucket-owner-full-control".into()),
                _ => c.acl.clone(),
            },
            checksum_algorithm: head.checksum.as_ref().map(|k| k.algorithm),
            full_object_checksum: head.checksum.as_ref().is_some_and(|k| k.full_object),
            lock: self.lock_settings(&ctx.dest.bucket, &head.lock),
            content_md5: None,
        }
    }

    /// Object lock settings to send to destination bucket `bucket` (see [`lock_to_send`]);
    /// the first version whose settings are dropped for a bucket without object lock is
    /// said, naming the bucket, once per run.
    fn lock_settings(&self, bucket: &str, lock: &ObjectLock) -> ObjectLock {
        let locked = self.facts(bucket).object_lock;
        if !lock.is_empty() && !locked && !self.lock_warned.swap(true, Ordering::Relaxed) {
            self.progress.say(format!(
                "warning: bucket {bucket} has no object lock: versions are copied there without their lock settings"
            ));
        }
        lock_to_send(lock, locked, now_secs())
    }

    /// A write that creates the destination version, retried with reconciliation before
    /// each repeat; learns the new version's id when the answer omits it, now, or later from
    /// a listing when `later` (the caller needs no HEAD of it) and the task allows it.
    async fn write_version<F, Fut>(
        &self,
        ctx: &TaskCtx<'_>,
        later: bool,
        f: F,
    ) -> Result<Wrote, S3Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<WriteResult, S3Error>>,
    {
        let hook = || self.find_written(ctx, ctx.started_at);
        match self.retrier.write(&ctx.retries, f, hook).await? {
            Written::Done(r) if r.version_id.is_none() && later && self.may_learn_later(ctx) => {
                ctx.learn_later.store(true, Ordering::Relaxed);
                Ok(Wrote::New(r, None, None))
            }
            Written::Done(r) => {
                let (v, head) = self.learn_version(ctx, r.version_id.clone()).await?;
                Ok(Wrote::New(r, v, head.map(Box::new)))
            }
            Written::Adopted(v) => {
                self.repair_adopted(ctx, v.as_deref()).await?;
                Ok(Wrote::Adopted(v))
            }
        }
    }

    /// An adopted version was written by an attempt that may have died before putting back
    /// tags the server dropped (see [`Copier::keep_tags`]): they are checked now.
    pub(super) async fn repair_adopted(
        &self,
        ctx: &TaskCtx<'_>,
        version: Option<&str>,
    ) -> Result<(), S3Error> {
        if ctx.task.is_delete_marker || version.is_none() {
            return Ok(());
        }
        let src = match self.head_source(ctx, None).await {
            Ok(h) => h,
            // Gone or unreadable now: nothing to compare with; the copy itself is adopted.
            Err(_) => return Ok(()),
        };
        let dest = self.dest_head(ctx, version).await?;
        self.keep_tags(ctx, &src, version, Some(dest)).await
    }

    async fn delete_marker(&self, ctx: &TaskCtx<'_>) -> Result<Copied, S3Error> {
        Ok(
            match self
                .write_version(ctx, false, || self.dest.delete_object(&ctx.dest))
                .await?
            {
                Wrote::Adopted(v) => Copied::single(v, CopyMethod::Reconciled),
                Wrote::New(_, v, _) => Copied::single(v, CopyMethod::DeleteMarker),
            },
        )
    }

    async fn copy_object(
        &self,
        ctx: &TaskCtx<'_>,
        head: &ObjectHead,
        attrs: &WriteAttrs,
    ) -> Result<Copied, S3Error> {
        let src = ctx.source(&self.settings.source.bucket);
        let wrote = self
            .write_version(ctx, head.tag_count == 0, || {
                self.dest.copy_object(&ctx.dest, &src, attrs)
            })
            .await?;
        Ok(match wrote {
            Wrote::Adopted(v) => Copied::single(v, CopyMethod::Reconciled),
            Wrote::New(r, v, dest_head) => {
                self.check_checksum(ctx, "CopyObject", head, &r)?;
                self.keep_tags(ctx, head, v.as_deref(), dest_head.map(|h| *h))
                    .await?;
                Copied::single(v, CopyMethod::Copy)
            }
        })
    }

    /// Reads `expect` bytes of the source version (the whole of it, or one range).
    async fn get_range(
        &self,
        ctx: &TaskCtx<'_>,
        range: Option<(u64, u64)>,
        expect: u64,
    ) -> Result<Bytes, S3Error> {
        let src = ctx.source(&self.settings.source.bucket);
        let side = self.source.side();
        self.retrier
            .call(&ctx.retries, || async {
                let b = self.source.get_object(&src, range).await?;
                if b.len() as u64 != expect {
                    return Err(S3Error::other(
                        side,
                        "GetObject",
                        ErrorClass::Retryable,
                        format!("expected {expect} bytes, got {}", b.len()),
                    ));
                }
                Ok(b)
            })
            .await
    }

    /// The source's tags, when it has some or the server does not say how many.
    async fn tags_for(
        &self,
        ctx: &TaskCtx<'_>,
        head: &ObjectHead,
        server_side: bool,
    ) -> Result<Option<String>, S3Error> {
        if server_side && head.tag_count == 0 {
            return Ok(None);
        }
        let src = ctx.source(&self.settings.source.bucket);
        let tags = self
            .retrier
            .call(&ctx.retries, || self.source.get_tagging(&src))
            .await?;
        Ok(Some(tags).filter(|t| !t.is_empty()))
    }

    async fn stream_put(
        &self,
        ctx: &TaskCtx<'_>,
        head: &ObjectHead,
        mut attrs: WriteAttrs,
    ) -> Result<Copied, S3Error> {
        let _held = self.memory.hold(head.size).await?;
        let body = self.get_range(ctx, None, head.size).await?;
        // End-to-end integrity: an MD5 ETag must match the bytes read.
        if md5_etag(head)
            && head.etag.as_deref().map(|e| e.trim_matches('"'))
                != Some(&hex::encode(Md5::digest(&body)))
        {
            return Err(S3Error::other(
                self.source.side(),
                "GetObject",
                ErrorClass::Retryable,
                "the bytes read do not match the source ETag".into(),
            ));
        }
        attrs.tagging = self.tags_for(ctx, head, false).await?;
        attrs.content_md5 = Some(md5_b64(&body));
        let wrote = self
            .write_version(ctx, false, || {
                self.dest.put_object(&ctx.dest, body.clone(), &attrs)
            })
            .await?;
        Ok(match wrote {
            Wrote::Adopted(v) => Copied::single(v, CopyMethod::Reconciled),
            Wrote::New(r, v, _) => {
                self.check_checksum(ctx, "PutObject", head, &r)?;
                Copied::single(v, CopyMethod::Stream)
            }
        })
    }

    /// The source's part layout when it was uploaded in uniform parts: HEAD with partNumber=1
    /// gives the first part's length and the parts count; the last part must be what
    /// uniform parts leave over (catches 6/5/7 MiB sources).
    async fn source_layout(&self, ctx: &TaskCtx<'_>, head: &ObjectHead) -> Option<(u64, u64)> {
        let n = etag_parts(head.etag.as_deref())?;
        let first_part = self.head_source(ctx, Some(1)).await.ok()?;
        let first = first_part.size;
        if first_part.parts_count.unwrap_or(n) != n || first == 0 {
            return None;
        }
        if n > 1 {
            let last = self.head_source(ctx, Some(n as i32)).await.ok()?;
            if last.size != head.size.checked_sub((n - 1) * first)? {
                return None;
            }
        }
        Some((first, n))
    }

    async fn multipart(
        &self,
        ctx: &TaskCtx<'_>,
        head: &ObjectHead,
        mut attrs: WriteAttrs,
        server_side: bool,
    ) -> Result<Copied, S3Error> {
        let (preferred, source_layout) = if server_side {
            (
                self.settings.copy.part_size,
                self.source_layout(ctx, head).await,
            )
        } else {
            // Streamed parts are held in memory: none larger than the budget.
            let budget = self.memory.bytes();
            let capped = capped_for_stream(&self.settings.copy, budget).part_size;
            let own = self.source_layout(ctx, head).await;
            (capped, own.filter(|(first, _)| *first <= budget))
        };
        let layout = choose_layout(head.size, preferred, source_layout);
        attrs.tagging = self.tags_for(ctx, head, server_side).await?;
        let upload_id = self
            .retrier
            .call(&ctx.retries, || {
                self.dest.create_multipart(&ctx.dest, &attrs)
            })
            .await?;
        self.record_upload(ctx, Some(upload_id.clone()), Some(layout))
            .await?;
        let result = self
            .parts_and_complete(ctx, head, layout, &upload_id, server_side)
            .await;
        if result.is_err() {
            let aborted = self
                .retrier
                .call(&ctx.retries, || {
                    self.dest.abort_multipart(&ctx.dest, &upload_id)
                })
                .await;
            if let Err(e) = aborted {
                tracing::warn!(
                    "could not abort upload {upload_id} of {}: {e}",
                    show_key(&ctx.dest.key)
                );
            }
        }
        // Closed either way (completed, or aborted: a leftover is aborted by reconciliation).
        self.record_upload(ctx, None, None).await?;
        result
    }

    async fn parts_and_complete(
        &self,
        ctx: &TaskCtx<'_>,
        head: &ObjectHead,
        layout: Layout,
        upload_id: &str,
        server_side: bool,
    ) -> Result<Copied, S3Error> {
        let parts: Vec<PartResult> = stream::iter(1..=layout.parts)
            .map(|n| {
                let first = (n - 1) * layout.part_size;
                let last = (n * layout.part_size).min(head.size).saturating_sub(1);
                self.part(ctx, head, upload_id, n as i32, (first, last), server_side)
            })
            .buffered(self.part_concurrency)
            .try_collect()
            .await?;
        let wrote = self
            .write_version(ctx, false, || {
                self.dest.complete_multipart(&ctx.dest, upload_id, &parts)
            })
            .await?;
        let (version, mut etag) = match wrote {
            Wrote::Adopted(v) => (v, None),
            Wrote::New(r, v, _) => (v, r.etag),
        };
        if etag.is_none() {
            // The answer had no ETag (RGW): read it, and check that tags given at
            // CreateMultipartUpload were kept.
            let dest_head = self.dest_head(ctx, version.as_deref()).await?;
            etag = dest_head.etag.clone();
            self.keep_tags(ctx, head, version.as_deref(), Some(dest_head))
                .await?;
        }
        let etag_preserved = match (&etag, &head.etag) {
            (Some(d), Some(s)) => Some(d == s),
            _ => Some(layout.preserves_etag),
        };
        self.check_multipart_checksum(ctx, head, version.as_deref(), layout)
            .await?;
        Ok(Copied {
            dest_version_id: version,
            method: if server_side {
                CopyMethod::MultipartCopy
            } else {
                CopyMethod::MultipartStream
            },
            part_size: Some(layout.part_size),
            parts: Some(layout.parts),
            etag_preserved,
        })
    }

    async fn part(
        &self,
        ctx: &TaskCtx<'_>,
        head: &ObjectHead,
        upload_id: &str,
        n: i32,
        range: (u64, u64),
        server_side: bool,
    ) -> Result<PartResult, S3Error> {
        if server_side {
            let src = ctx.source(&self.settings.source.bucket);
            return self
                .retrier
                .call(&ctx.retries, || {
                    self.dest
                        .upload_part_copy(&ctx.dest, upload_id, n, &src, range)
                })
                .await;
        }
        let _held = self.memory.hold(range.1 - range.0 + 1).await?;
        let body = self
            .get_range(ctx, Some(range), range.1 - range.0 + 1)
            .await?;
        let md5 = md5_b64(&body);
        let alg = head.checksum.as_ref().map(|c| c.algorithm);
        self.retrier
            .call(&ctx.retries, || {
                self.dest
                    .upload_part(&ctx.dest, upload_id, n, body.clone(), &md5, alg)
            })
            .await
    }

    /// Puts the source's tags on a new version whose HEAD shows fewer of them: some servers
    /// drop tags on some writes (RGW 16.2: CopyObject with MetadataDirective REPLACE, and tags
    /// given at CreateMultipartUpload). Only checked where a HEAD was made anyway.
    async fn keep_tags(
        &self,
        ctx: &TaskCtx<'_>,
        src: &ObjectHead,
        version: Option<&str>,
        dest: Option<ObjectHead>,
    ) -> Result<(), S3Error> {
        let Some(dest) = dest else { return Ok(()) };
        if src.tag_count == 0 || dest.tag_count >= src.tag_count {
            return Ok(());
        }
        let source = ctx.source(&self.settings.source.bucket);
        let tags = self
            .retrier
            .call(&ctx.retries, || self.source.get_tagging(&source))
            .await?;
        let obj = crate::s3::ObjectRef {
            version_id: version.map(str::to_string),
            ..ctx.dest.clone()
        };
        self.retrier
            .call(&ctx.retries, || self.dest.put_tagging(&obj, &tags))
            .await
    }

    /// Compares the destination's checksum in a write's answer with the source's, where both
    /// are of the same algorithm.
    fn check_checksum(
        &self,
        ctx: &TaskCtx<'_>,
        op: &'static str,
        head: &ObjectHead,
        r: &WriteResult,
    ) -> Result<(), S3Error> {
        if let (Some(s), Some(d)) = (&head.checksum, &r.checksum) {
            if s.algorithm == d.algorithm && s.value != d.value {
                return Err(fatal(
                    self.dest.side(),
                    op,
                    format!(
                        "checksum mismatch for {} version {}: source {} {}, destination {}",
                        show_key(&ctx.task.key),
                        ctx.task.version_id,
                        s.algorithm.as_str(),
                        s.value,
                        d.value
                    ),
                ));
            }
        }
        Ok(())
    }

    /// After a multipart copy, compares the destination's checksum with the source's where
    /// they are comparable: both over the whole object, or both composite over the same part
    /// layout. Elsewhere (composite over another layout) the values differ by design.
    async fn check_multipart_checksum(
        &self,
        ctx: &TaskCtx<'_>,
        head: &ObjectHead,
        version: Option<&str>,
        layout: Layout,
    ) -> Result<(), S3Error> {
        let Some(source) = &head.checksum else {
            return Ok(());
        };
        let dest = crate::s3::ObjectRef {
            version_id: version.map(str::to_string),
            ..ctx.dest.clone()
        };
        let h = self
            .retrier
            .call(&ctx.retries, || self.dest.head_object(&dest, None))
            .await?;
        let Some(d) = &h.checksum else {
            return Ok(());
        };
        let comparable = source.algorithm == d.algorithm
            && source.is_composite() == d.is_composite()
            && (!source.is_composite() || layout.preserves_etag);
        if comparable {
            let r = WriteResult {
                checksum: Some(d.clone()),
                ..WriteResult::default()
            };
            self.check_checksum(ctx, "CompleteMultipartUpload", head, &r)?;
        }
        Ok(())
    }

    async fn record_upload(
        &self,
        ctx: &TaskCtx<'_>,
        upload_id: Option<String>,
        layout: Option<Layout>,
    ) -> Result<(), S3Error> {
        let u = Update::Upload {
            id: ctx.task.id,
            upload_id,
            part_size: layout.map(|l| l.part_size),
            parts: layout.map(|l| l.parts),
        };
        self.writer.send_durable(u).await.map_err(|e| {
            self.control.abort(format!("manifest: {e}"));
            fatal(self.dest.side(), "manifest", e.to_string())
        })
    }
}

/// The object lock settings a copy sends: none for a destination without object lock, and
/// no retention that has already expired at `now` (S3 refuses a retain-until date in the
/// past); a legal hold is kept.
pub fn lock_to_send(lock: &ObjectLock, dest_has_lock: bool, now: i64) -> ObjectLock {
    if !dest_has_lock || lock.is_empty() {
        return ObjectLock::default();
    }
    let expired = lock.retain_until.is_some_and(|t| t <= now);
    ObjectLock {
        mode: lock.mode.clone().filter(|_| !expired),
        retain_until: lock.retain_until.filter(|_| !expired),
        legal_hold: lock.legal_hold,
    }
}

/// The destination encryption `--sse` chose: None when not given (the source version's is
/// kept), `Some(None)` for the destination bucket's default.
fn chosen_encryption(c: &CopyOptions) -> Option<Option<Encryption>> {
    match c.sse? {
        Sse::Aes256 => Some(Some(Encryption::SseS3)),
        Sse::AwsKms => Some(Some(Encryption::SseKms(c.sse_kms_key_id.clone()))),
        Sse::BucketDefault => Some(None),
    }
}

/// Whether an object's ETag is an MD5 of its bytes (not for KMS or SSE-C encryption).
pub(super) fn md5_etag(head: &ObjectHead) -> bool {
    Encryption::keeps_md5_etag(head.encryption.as_ref())
        && head.etag.as_deref().is_some_and(|e| {
            let e = e.trim_matches('"');
            e.len() == 32 && !e.contains('-')
        })
}

/// Parts count encoded in a multipart ETag (`"…-N"`).
fn etag_parts(etag: Option<&str>) -> Option<u64> {
    let e = etag?.trim_matches('"');
    let (_, n) = e.rsplit_once('-')?;
    n.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn keeps_uniform_source_layout() {
        let l = choose_layout(12 * MIB, 16 * MIB, Some((5 * MIB, 3)));
        assert_eq!((l.part_size, l.parts, l.preserves_etag), (5 * MIB, 3, true));
        // Not uniform: 3 parts of 5 MiB cannot hold 16 MiB.
        let l = choose_layout(16 * MIB, 8 * MIB, Some((5 * MIB, 3)));
        assert_eq!(
            (l.part_size, l.parts, l.preserves_etag),
            (8 * MIB, 2, false)
        );
    }

    #[test]
    fn stays_within_part_limits() {
        let size = 5 * 1024 * 1024 * MIB; // 5 TiB
        let l = choose_layout(size, 5 * MIB, None);
        assert!(l.parts <= MAX_PARTS);
        assert!(l.part_size * l.parts >= size);
    }

    #[test]
    fn reads_parts_from_etags() {
        assert_eq!(etag_parts(Some("\"abc-12\"")), Some(12));
        assert_eq!(etag_parts(Some("\"abc\"")), None);
    }

    #[test]
    fn lock_settings_drop_expired_retention_and_locks_the_destination_cannot_take() {
        let lock = ObjectLock {
            mode: Some("GOVERNANCE".into()),
            retain_until: Some(100),
            legal_hold: true,
        };
        assert_eq!(lock_to_send(&lock, true, 50), lock, "kept while it runs");
        let expired = lock_to_send(&lock, true, 100);
        assert_eq!(
            (expired.mode, expired.retain_until, expired.legal_hold),
            (None, None, true)
        );
        assert!(
            lock_to_send(&lock, false, 50).is_empty(),
            "destination without object lock"
        );
    }

    #[test]
    fn plans() {
        let c = CopyOptions::default();
        assert_eq!(
            choose_plan(false, 6 << 30, true, &c),
            CopyPlan::MultipartCopy
        );
        assert_eq!(choose_plan(false, 10 << 20, false, &c), CopyPlan::Stream);
    }
}
