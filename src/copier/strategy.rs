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

use super::task::{CopyError, TaskCtx};
use super::{now_secs, Copier};
use crate::config::{
    CopyMode, CopyOptions, LargeCopy, Sse, MAX_COPY_OBJECT, MAX_PART, MAX_PARTS, MIN_PART,
};
use crate::manifest::{Copied, CopyMethod, Update};
use crate::s3::{
    show_key, ChecksumAlgorithm, Encryption, ErrorClass, ObjectHead, ObjectLock, PartResult,
    S3Client, S3Error, WriteAttrs, WriteResult, Writes, Written, STAMP_KEY,
};

/// Of `--max-memory`, what the program itself keeps (code, runtime, SDK, manifest cache,
/// connection buffers, allocator slack: measured ~27 MiB idle and up to ~37 MiB more than
/// the bodies held while streaming, see `benches/stream_memory.rs`); the rest is for
/// streamed bodies.
pub const MEMORY_RESERVE: u64 = 48 * 1024 * 1024;

/// What a pass-through copy (see [`Copier::pass_through`]) holds of the memory budget: the
/// two connections' buffers, not its body.
const PASS_THROUGH_HELD: u64 = 1024 * 1024;

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

/// What a source version's ETag says about how it was uploaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceUpload {
    /// One PutObject (or a copy of one): its ETag is the MD5 of its bytes, kept by one
    /// CopyObject or one PutObject of the same bytes.
    Single,
    /// A multipart upload of this many parts (`"…-N"`): its ETag is kept by the same part
    /// boundaries (or by a CopyObject on a server that keeps it).
    Multipart(u64),
    /// Neither (an ETag that is not an MD5, e.g. of an SSE-KMS object, or none): a copy
    /// gets a new ETag whatever its plan.
    Unknown,
}

impl SourceUpload {
    /// Reads an ETag; `md5_kept`: a single-part ETag of this version is an MD5 of its bytes
    /// (not SSE-KMS or SSE-C encrypted; a listing cannot tell, so it passes true).
    ///
    /// ```
    /// use s3_backfill::copier::SourceUpload;
    /// let md5 = "\"9e107d9d372bb6826bd81d3542a419d6\"";
    /// assert_eq!(SourceUpload::of(Some(md5), true), SourceUpload::Single);
    /// assert_eq!(SourceUpload::of(Some(md5), false), SourceUpload::Unknown);
    /// assert_eq!(SourceUpload::of(Some("\"9e107d9d372bb6826bd81d3542a419d6-3\""), true), SourceUpload::Multipart(3));
    /// ```
    pub fn of(etag: Option<&str>, md5_kept: bool) -> SourceUpload {
        if let Some(n) = etag_parts(etag).filter(|n| *n >= 1) {
            return SourceUpload::Multipart(n);
        }
        match etag.map(|e| e.trim_matches('"')) {
            Some(e) if md5_kept && e.len() == 32 && e.bytes().all(|b| b.is_ascii_hexdigit()) => {
                SourceUpload::Single
            }
            _ => SourceUpload::Unknown,
        }
    }
}

/// Where a copy's bytes go, and what decides its plan there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Server-side (CopyObject, UploadPartCopy); `whole_multipart`: a multipart source up
    /// to 5 GiB is copied with one CopyObject (see [`crate::config::LargeCopy`]).
    ServerSide {
        /// One CopyObject for a multipart source.
        whole_multipart: bool,
    },
    /// Through this machine; `budget`: the most bytes one body may hold (`--max-memory`).
    Stream {
        /// Bytes one body may hold.
        budget: u64,
    },
}

/// Where a multipart copy's parts come from, as [`choose_plan`] decided (carried to each part
/// instead of asked again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PartSource {
    /// `UploadPartCopy`: the destination's server reads each part from the source.
    Server,
    /// Ranged GETs with the source's client, `UploadPart` with the destination's; a part
    /// held here is at most `budget` bytes (`--max-memory`, see [`Budget`]).
    Stream {
        /// Bytes one part may hold.
        budget: u64,
    },
}

impl PartSource {
    /// Whether parts of `part_size` bytes may be used (a streamed part is held whole).
    fn fits(self, part_size: u64) -> bool {
        match self {
            PartSource::Server => true,
            PartSource::Stream { budget } => part_size <= budget,
        }
    }

    /// The part size asked for (`--part-size`; streamed, no larger than the budget).
    fn preferred_part_size(self, c: &CopyOptions) -> u64 {
        match self {
            PartSource::Server => c.part_size,
            PartSource::Stream { budget } => capped_for_stream(c, budget).part_size,
        }
    }

    /// How the manifest names a copy made this way.
    fn method(self) -> CopyMethod {
        match self {
            PartSource::Server => CopyMethod::MultipartCopy,
            PartSource::Stream { .. } => CopyMethod::MultipartStream,
        }
    }
}

/// Chooses the plan, fidelity first: the source's ETag is kept wherever a plan can keep it.
///
/// - Server-side: a single-part source up to 5 GiB is one `CopyObject` (its MD5 ETag is
///   kept, and servers such as RGW copy it without moving data); a multipart source is
///   copied in parts (its own layout, see [`Copier::multipart`]) or, with
///   `whole_multipart`, by one `CopyObject`; above 5 GiB (CopyObject's limit) parts. A
///   source whose ETag tells nothing ([`SourceUpload::Unknown`]) is copied in parts at or
///   above `--multipart-threshold`.
/// - Streamed: a single-part source up to 5 GiB is one `PutObject` fed by its GET as the
///   bytes arrive (its MD5 ETag is kept, and nothing is held, so the memory budget does not
///   bound it); a multipart source is uploaded in parts; others by size (parts at or above
///   the threshold or above one part, so memory stays within a part per request).
///
/// ```
/// use s3_backfill::config::CopyOptions;
/// use s3_backfill::copier::{choose_plan, CopyPlan, Route, SourceUpload};
/// let opts = CopyOptions::default(); // 64 MiB threshold, 16 MiB parts
/// let server = Route::ServerSide { whole_multipart: false };
/// let single = SourceUpload::Single;
/// assert_eq!(choose_plan(false, 1 << 20, single, server, &opts), CopyPlan::Copy);
/// assert_eq!(choose_plan(false, 100 << 20, single, server, &opts), CopyPlan::Copy);
/// let three = SourceUpload::Multipart(3);
/// assert_eq!(choose_plan(false, 100 << 20, three, server, &opts), CopyPlan::MultipartCopy);
/// let whole = Route::ServerSide { whole_multipart: true };
/// assert_eq!(choose_plan(false, 100 << 20, three, whole, &opts), CopyPlan::Copy);
/// let stream = Route::Stream { budget: 64 << 20 };
/// assert_eq!(choose_plan(false, 20 << 20, single, stream, &opts), CopyPlan::Stream);
/// assert_eq!(choose_plan(false, 80 << 20, single, stream, &opts), CopyPlan::Stream);
/// let unknown = SourceUpload::Unknown;
/// assert_eq!(choose_plan(false, 80 << 20, unknown, stream, &opts), CopyPlan::MultipartStream);
/// assert_eq!(choose_plan(true, 0, single, server, &opts), CopyPlan::DeleteMarker);
/// ```
pub fn choose_plan(
    is_delete_marker: bool,
    size: u64,
    source: SourceUpload,
    route: Route,
    c: &CopyOptions,
) -> CopyPlan {
    if is_delete_marker {
        return CopyPlan::DeleteMarker;
    }
    match route {
        Route::ServerSide { whole_multipart } => {
            let parts = size > MAX_COPY_OBJECT
                || match source {
                    SourceUpload::Single => false,
                    SourceUpload::Multipart(_) => !whole_multipart,
                    SourceUpload::Unknown => size >= c.multipart_threshold,
                };
            if parts {
                CopyPlan::MultipartCopy
            } else {
                CopyPlan::Copy
            }
        }
        Route::Stream { budget } => {
            let parts = match source {
                // Passed through (nothing held): the memory budget does not bound it.
                SourceUpload::Single => size > MAX_COPY_OBJECT,
                SourceUpload::Multipart(_) => true,
                SourceUpload::Unknown => {
                    size >= c.multipart_threshold
                        || size > MAX_COPY_OBJECT
                        || size > c.part_size.min(budget)
                }
            };
            if parts {
                CopyPlan::MultipartStream
            } else {
                CopyPlan::Stream
            }
        }
    }
}

/// Part sizes most tools upload with, most common first (AWS CLI and SDKs 8 MiB, rclone and
/// s3cmd 5/15/16 MiB, MinIO and Hadoop's 10/64/100/128 MiB, ...).
const COMMON_PART_SIZES_MIB: [u64; 13] = [5, 8, 16, 10, 15, 32, 64, 100, 128, 25, 50, 256, 512];

/// At most this many candidate layouts are tried per source (each try copies the object).
pub const MAX_LAYOUT_TRIES: usize = 3;

/// The uniform part sizes that cut `size` bytes into exactly `parts` parts (every part but
/// the last of that size, the last not empty), for a source whose part layout the server does
/// not show: the common sizes first, then whole MiB from the smallest that fits, then the
/// equal split (`ceil(size / parts)`), then whole decimal MB. At most 12; empty when none
/// fits S3's limits.
///
/// ```
/// use s3_backfill::copier::infer_part_sizes;
/// const MIB: u64 = 1024 * 1024;
/// // 19 MiB in 4 parts: 5 MiB (5+5+5+4), 6 MiB (6+6+6+1), or 6 MB.
/// assert_eq!(infer_part_sizes(19 * MIB, 4), vec![5 * MIB, 6 * MIB, 6_000_000]);
/// ```
pub fn infer_part_sizes(size: u64, parts: u64) -> Vec<u64> {
    const MIB: u64 = 1024 * 1024;
    const MOST: usize = 12;
    if parts == 0 || size == 0 || parts > MAX_PARTS {
        return Vec::new();
    }
    if parts == 1 {
        return if size <= MAX_PART {
            vec![size]
        } else {
            Vec::new()
        };
    }
    // (parts - 1) * p < size <= parts * p
    let lo = size.div_ceil(parts).max(MIN_PART);
    let hi = ((size - 1) / (parts - 1)).min(MAX_PART);
    if lo > hi {
        return Vec::new();
    }
    let mut out: Vec<u64> = Vec::new();
    let add = |p: u64, out: &mut Vec<u64>| {
        if (lo..=hi).contains(&p) && !out.contains(&p) && out.len() < MOST {
            out.push(p);
        }
    };
    for m in COMMON_PART_SIZES_MIB {
        add(m * MIB, &mut out);
    }
    let mut m = lo.div_ceil(MIB);
    while m * MIB <= hi && out.len() < MOST - 2 {
        add(m * MIB, &mut out);
        m += 1;
    }
    add(lo, &mut out);
    // Decimal megabytes (some tools count parts in MB).
    const MB: u64 = 1_000_000;
    let mut m = lo.div_ceil(MB);
    while m * MB <= hi && out.len() < MOST {
        add(m * MB, &mut out);
        m += 1;
    }
    out
}

/// The ETag S3 gives a multipart upload of these parts: the MD5 of the parts' binary MD5s,
/// then `-N` (quoted). None if a part's ETag is not an MD5.
///
/// ```
/// use s3_backfill::copier::composite_etag;
/// let md5 = "\"9e107d9d372bb6826bd81d3542a419d6\"";
/// let e = composite_etag([Some(md5), Some(md5)]).unwrap();
/// assert!(e.ends_with("-2\""));
/// assert_eq!(composite_etag([Some("\"x\"")]), None);
/// ```
pub fn composite_etag<'a>(parts: impl IntoIterator<Item = Option<&'a str>>) -> Option<String> {
    let mut h = Md5::new();
    let mut n = 0u64;
    for e in parts {
        let e = e?.trim_matches('"');
        let b = hex::decode(e).ok().filter(|b| b.len() == 16)?;
        h.update(&b);
        n += 1;
    }
    (n > 0).then(|| format!("\"{}-{n}\"", hex::encode(h.finalize())))
}

/// What this run learned of the destination server: whether it keeps a multipart source's
/// ETag on CopyObject (`--large-copy auto` on a server other than AWS). Unknown until the first
/// such copy is checked.
#[derive(Debug, Default)]
pub(super) struct WholeCopy(std::sync::atomic::AtomicU8);

impl WholeCopy {
    const KEEPS: u8 = 1;
    const CHANGES: u8 = 2;
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

/// What a version-creating write ended with.
enum Wrote {
    /// This run's write: the answer, the new version's id, and its HEAD when one was needed
    /// to learn the id.
    New(WriteResult, Option<String>, Option<Box<ObjectHead>>),
    /// An ambiguous earlier attempt had written it: its version id.
    Adopted(Option<String>),
}

/// An ETag without its quotes, if it is a plain one (not a multipart composite).
/// A GET's body must be the length the task expects (a body cut short is read again).
fn body_length(side: crate::s3::Side, expect: u64, got: u64) -> Result<(), S3Error> {
    if got == expect {
        return Ok(());
    }
    Err(S3Error::other(
        side,
        "GetObject",
        ErrorClass::Retryable,
        format!("expected {expect} bytes, got {got}"),
    ))
}

fn plain_etag(e: Option<&str>) -> Option<&str> {
    e.map(|e| e.trim_matches('"')).filter(|e| !e.contains('-'))
}

fn md5_b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(b))
}

/// The error code of a source version that changed since it was listed (a `null` version
/// overwritten or deleted, read pinned to its listed ETag): the task fails with that reason.
pub(super) const SOURCE_CHANGED: &str = "SourceChanged";

fn changed_message(ctx: &TaskCtx<'_>, now: &str) -> String {
    let t = ctx.task;
    format!(
        "{} version {} changed since it was listed (listed ETag {}, now {now}); not copied: run plan --refresh, then run",
        show_key(&t.entry.key),
        t.entry.version_id,
        t.entry.etag.as_deref().unwrap_or("?"),
    )
}

/// A read of the source that failed its ETag precondition (412) is the named failure of a
/// source version changed since its listing; other errors are returned as they are.
fn changed_since_listed(ctx: &TaskCtx<'_>, e: S3Error) -> S3Error {
    let reads_source = matches!(
        e.op,
        "HeadObject" | "GetObject" | "CopyObject" | "UploadPartCopy"
    );
    let failed_precondition =
        e.status == Some(412) || e.code.as_deref() == Some("PreconditionFailed");
    if !reads_source || !failed_precondition || e.code.as_deref() == Some(SOURCE_CHANGED) {
        return e;
    }
    S3Error {
        class: ErrorClass::Fatal,
        code: Some(SOURCE_CHANGED.into()),
        message: changed_message(ctx, "another object (HTTP 412 on its ETag)"),
        ..e
    }
}

fn fatal(side: crate::s3::Side, op: &'static str, message: String) -> S3Error {
    S3Error::other(side, op, ErrorClass::Fatal, message)
}

impl<C: S3Client> Copier<C> {
    /// Copies one task by its plan; in `auto` mode a server-side copy that the destination's
    /// credentials may not do is streamed instead, for this task only (remembered in the
    /// manifest, so later runs stream it at once).
    pub(super) async fn copy_task(&self, ctx: &TaskCtx<'_>) -> Result<Copied, CopyError> {
        if ctx.task.entry.is_delete_marker {
            return Ok(self.delete_marker(ctx).await?);
        }
        let server_side = self.settings.server_side() && !ctx.task.stream_only;
        match self.copy_version(ctx, server_side).await {
            Err(CopyError::S3(e)) if server_side && self.falls_back_to_stream(ctx, &e) => {
                self.copy_version(ctx, false).await
            }
            r => r,
        }
        .map_err(|e| match e {
            CopyError::S3(e) => CopyError::S3(changed_since_listed(ctx, e)),
            e => e,
        })
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
                show_key(&ctx.task.entry.key),
                ctx.task.entry.version_id
            ));
        }
        self.send(Update::StreamOnly { id: ctx.task.id });
        true
    }

    async fn copy_version(
        &self,
        ctx: &TaskCtx<'_>,
        server_side: bool,
    ) -> Result<Copied, CopyError> {
        if server_side && self.one_request(ctx).await {
            return Ok(self.copy_listed(ctx).await?);
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
        let source = SourceUpload::of(head.etag.as_deref(), md5_etag(&head));
        let route = if server_side {
            // A multipart source's checksum is composite (of its parts) unless it says it is
            // of the full object: only a copy in the same parts keeps it.
            let composite = head.checksum.as_ref().is_some_and(|k| !k.full_object);
            Route::ServerSide {
                whole_multipart: !composite && self.whole_multipart(),
            }
        } else {
            Route::Stream {
                budget: self.memory.bytes(),
            }
        };
        let copied = match choose_plan(false, head.size, source, route, c) {
            CopyPlan::Copy => {
                let (copied, answer_etag) = self.copy_object(ctx, &head, &attrs).await?;
                match source {
                    SourceUpload::Multipart(_) => {
                        self.check_whole_copy(ctx, &head, copied, answer_etag.as_deref())
                            .await
                    }
                    _ => Ok(copied),
                }
            }
            CopyPlan::Stream => self.stream_put(ctx, &head, attrs).await,
            CopyPlan::MultipartCopy => self.multipart(ctx, &head, attrs, PartSource::Server).await,
            CopyPlan::MultipartStream => {
                let budget = self.memory.bytes();
                self.multipart(ctx, &head, attrs, PartSource::Stream { budget })
                    .await
            }
            CopyPlan::DeleteMarker => self.delete_marker(ctx).await,
        };
        Ok(copied?)
    }

    /// Whether a multipart source up to 5 GiB is copied with one CopyObject (see
    /// [`LargeCopy`]): `auto` says no on AWS, and elsewhere yes until a copy showed that the
    /// server gives such copies new ETags.
    fn whole_multipart(&self) -> bool {
        self.settings.copy.large_copy.whole_multipart(
            self.settings.dest_side.endpoint.as_deref(),
            self.whole_copy.0.load(Ordering::Relaxed) == WholeCopy::CHANGES,
        )
    }

    /// After one CopyObject of a multipart source: whether its ETag was kept, recorded with
    /// the task. The copy's answer (`answer_etag`) says so when it names the source's ETag
    /// (RGW); otherwise a HEAD of the new version reads it. In `auto` mode the first answer
    /// decides the run: kept, CopyObject goes on; changed, this one is copied again in parts
    /// in place of that copy (its version removed from a versioned destination), and so are
    /// later multipart sources.
    async fn check_whole_copy(
        &self,
        ctx: &TaskCtx<'_>,
        head: &ObjectHead,
        mut copied: Copied,
        answer_etag: Option<&str>,
    ) -> Result<Copied, S3Error> {
        if copied.method != CopyMethod::Copy {
            return Ok(copied);
        }
        let unquoted = |e: &str| e.trim_matches('"').to_string();
        let source_etag = head.etag.as_deref().map(unquoted);
        if source_etag.is_some() && answer_etag.map(unquoted) == source_etag {
            copied.etag_preserved = Some(true);
            if self.settings.copy.large_copy == LargeCopy::Auto {
                self.whole_copy.0.store(WholeCopy::KEEPS, Ordering::Relaxed);
            }
            return Ok(copied);
        }
        let dest = self
            .dest_head(ctx, copied.dest_version_id.as_deref())
            .await?;
        let kept = dest.etag.is_some() && dest.etag == head.etag;
        copied.etag_preserved = Some(kept);
        let comparable = Encryption::keeps_md5_etag(head.encryption.as_ref())
            && Encryption::keeps_md5_etag(dest.encryption.as_ref());
        if self.settings.copy.large_copy != LargeCopy::Auto || !comparable {
            return Ok(copied);
        }
        let learned = if kept {
            WholeCopy::KEEPS
        } else {
            WholeCopy::CHANGES
        };
        let before = self.whole_copy.0.swap(learned, Ordering::Relaxed);
        if kept {
            return Ok(copied);
        }
        if before != WholeCopy::CHANGES {
            self.progress.say(format!(
                "the destination server gave a multipart source copied with CopyObject a new ETag ({} version {}: {} became {}): multipart sources are copied in parts in their own layout for the rest of this run (--large-copy parts says so at once)",
                show_key(&ctx.task.entry.key),
                ctx.task.entry.version_id,
                head.etag.as_deref().unwrap_or("-"),
                dest.etag.as_deref().unwrap_or("-"),
            ));
        }
        // Copied again in parts, in place of the copy whose ETag changed: on a versioned
        // destination that version is removed first (where it cannot be, e.g. under object
        // lock, it is kept and counted as changed); an unversioned one is overwritten.
        if self.facts(&ctx.dest.bucket).versioned {
            let Some(v) = copied.dest_version_id.clone() else {
                return Ok(copied);
            };
            let obj = crate::s3::ObjectRef {
                version_id: Some(v),
                ..ctx.dest.clone()
            };
            let removed = self.dest.counting(&ctx.retries).delete_version(&obj).await;
            if let Err(e) = removed {
                tracing::warn!(
                    "{}: the copy whose ETag changed could not be removed ({e}); it is kept",
                    show_key(&ctx.dest.key)
                );
                return Ok(copied);
            }
        }
        let attrs = self.write_attrs(ctx, head);
        self.multipart(ctx, head, attrs, PartSource::Server).await
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
    ///   read once per run, and an answer that does not tell keeps the HEAD);
    /// - the version is not `null` (its HEAD is compared with what was listed).
    ///
    /// Tags (TaggingDirective COPY), metadata and content headers (MetadataDirective COPY)
    /// are copied by the server; the storage class and checksum algorithm come from the
    /// listing; a version gone since the listing answers 404 (skipped as gone).
    async fn one_request(&self, ctx: &TaskCtx<'_>) -> bool {
        let c = &self.settings.copy;
        let listed = ctx.task.entry.storage_class.as_deref();
        // A replication rule decides by the source's encryption (SSE-KMS only when it opts
        // in, its own KMS key): that needs the HEAD.
        let ruled = self.settings.destination(ctx.task.dest).rule.is_some();
        // A `null` version can change under its id: the copy's x-amz-copy-source-if-match
        // alone would guard it, and moto and RGW 16.2 ignore that header; the HEAD compares.
        let null = ctx.task.entry.version_id == "null";
        if c.stamp
            || ruled
            || null
            || c.sse.is_none()
            || choose_plan(
                false,
                ctx.task.entry.size,
                SourceUpload::of(ctx.task.entry.etag.as_deref(), true),
                Route::ServerSide {
                    whole_multipart: false,
                },
                c,
            ) != CopyPlan::Copy
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
            let bucket = &self.settings.source.bucket;
            match self.source.req().object_lock_enabled(bucket).await {
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
        let listed = ctx.task.entry.storage_class.clone();
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
                .entry
                .checksum_algorithm
                .as_deref()
                .and_then(ChecksumAlgorithm::parse),
            ..WriteAttrs::default()
        };
        let src = ctx.source(&self.settings.source.bucket);
        let wrote = self
            .write_version(ctx, true, |w| w.copy_object(&ctx.dest, &src, &attrs))
            .await?;
        Ok(match wrote {
            Wrote::Adopted(v) => Copied::single(v, CopyMethod::Reconciled),
            Wrote::New(r, v, _) => {
                let listed = ctx.task.entry.etag.as_deref();
                self.copied_what_was_listed(ctx, &r, listed, v.as_deref())
                    .await?;
                Copied::single(v, CopyMethod::Copy)
            }
        })
    }

    /// A `null` version is copied by key, and where the server ignores the copy's ETag
    /// precondition (moto, RGW 16.2) an object written after the listing is copied in its
    /// place. A copy whose plain ETag is not the listed one has the source HEADed again: if
    /// the source changed, the version just written is deleted (it is not the listed
    /// version) and the task fails as `SourceChanged`. (An ETag that is not an MD5, as with
    /// SSE-KMS, differs without a change: the HEAD then finds the source as listed.)
    async fn copied_what_was_listed(
        &self,
        ctx: &TaskCtx<'_>,
        r: &WriteResult,
        listed: Option<&str>,
        version: Option<&str>,
    ) -> Result<(), S3Error> {
        let (Some(l), Some(c)) = (plain_etag(listed), plain_etag(r.etag.as_deref())) else {
            return Ok(());
        };
        if ctx.task.entry.version_id != "null" || l == c {
            return Ok(());
        }
        let Err(changed) = self.head_source(ctx, None).await else {
            return Ok(());
        };
        // The answer may not have named the version written (RGW), its learning put off:
        // it is learned now, to be taken back.
        let version = match version {
            Some(v) => Some(v.to_string()),
            None => {
                ctx.id_to_learn.store(false, Ordering::Relaxed);
                match self.learn_version(ctx, None).await {
                    Ok((v, _)) => v,
                    Err(e) => {
                        tracing::warn!(
                            "could not find the version of {} copied from a changed source: {e}",
                            show_key(&ctx.dest.key)
                        );
                        None
                    }
                }
            }
        };
        if let Some(v) = version.as_deref() {
            let wrong = crate::s3::ObjectRef::version(&ctx.dest.bucket, &ctx.dest.key, v);
            let undone = self
                .dest
                .counting(&ctx.retries)
                .delete_version(&wrong)
                .await;
            if let Err(e) = undone {
                tracing::warn!(
                    "could not delete {} version {v}, copied from a changed source: {e}",
                    show_key(&ctx.dest.key)
                );
            }
        }
        Err(changed)
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
            .source
            .counting(&ctx.retries)
            .head_object(&src, part)
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
        // What the HEAD answers must be what was listed (the If-Match sent already asks
        // that of the ETag; not every server honours it).
        let t = ctx.task;
        let other_version = head
            .version_id
            .as_deref()
            .filter(|v| *v != t.entry.version_id);
        let other_etag = match (&t.entry.etag, &head.etag) {
            (Some(l), Some(h)) if t.entry.version_id == "null" && part.is_none() => {
                l.trim_matches('"') != h.trim_matches('"')
            }
            _ => false,
        };
        if other_version.is_some() || other_etag {
            let now = match other_version {
                Some(v) => format!("version {v}"),
                None => format!("ETag {}", head.etag.as_deref().unwrap_or("?")),
            };
            return Err(S3Error {
                code: Some(SOURCE_CHANGED.into()),
                ..fatal(side, "HeadObject", changed_message(ctx, &now))
            });
        }
        Ok(head)
    }

    /// Refuses an SSE-KMS version that the task's replication rule leaves out (known only
    /// now, from the source HEAD).
    fn rule_takes(&self, ctx: &TaskCtx<'_>, head: &ObjectHead) -> Result<(), CopyError> {
        let Some(rule) = self.settings.destination(ctx.task.dest).rule else {
            return Ok(());
        };
        let kms = matches!(
            head.encryption,
            Some(Encryption::SseKms(_) | Encryption::DsseKms(_))
        );
        if kms && !rule.sse_kms_allowed {
            return Err(CopyError::NotReplicated {
                rule: rule.rule.clone(),
            });
        }
        Ok(())
    }

    /// What the destination version carries over from the source version; a replication
    /// rule's storage class, owner override and KMS key come before the job's options.
    fn write_attrs(&self, ctx: &TaskCtx<'_>, head: &ObjectHead) -> WriteAttrs {
        let c = &self.settings.copy;
        let rule = self.settings.destination(ctx.task.dest).rule;
        let mut metadata: BTreeMap<String, String> = head.metadata.clone();
        if c.stamp {
            metadata.insert(STAMP_KEY.to_string(), ctx.task.entry.version_id.clone());
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
            website_redirect: head.website_redirect.clone(),
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
    async fn write_version<'s, F, Fut>(
        &'s self,
        ctx: &'s TaskCtx<'_>,
        later: bool,
        f: F,
    ) -> Result<Wrote, S3Error>
    where
        F: Fn(Writes<'s, C>) -> Fut,
        Fut: Future<Output = Result<WriteResult, S3Error>>,
    {
        let hook = || self.find_written(ctx, ctx.started_at);
        match self.dest.counting(&ctx.retries).write(f, hook).await? {
            Written::Done(r) if r.version_id.is_none() && later && self.may_learn_later(ctx) => {
                ctx.id_to_learn.store(true, Ordering::Relaxed);
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
    /// tags the server dropped (see [`Copier::keep_tags`]): its tags are compared with the
    /// source version's now, and put back where they differ. Only a source version gone
    /// since leaves nothing to compare with (the copy is adopted, said in the log); any other
    /// error is returned (the task is not done).
    pub(super) async fn repair_adopted(
        &self,
        ctx: &TaskCtx<'_>,
        version: Option<&str>,
    ) -> Result<(), S3Error> {
        if ctx.task.entry.is_delete_marker || version.is_none() {
            return Ok(());
        }
        match self.same_tags(ctx, version).await {
            Err(e) if e.class == ErrorClass::SourceGone && e.side == self.source.side() => {
                tracing::warn!(
                    "{} version {}: adopted its copy, but the source version is gone: its tags were not compared ({e})",
                    show_key(&ctx.task.entry.key),
                    ctx.task.entry.version_id
                );
                Ok(())
            }
            r => r,
        }
    }

    async fn delete_marker(&self, ctx: &TaskCtx<'_>) -> Result<Copied, S3Error> {
        Ok(
            match self
                .write_version(ctx, false, |w| w.delete_object(&ctx.dest))
                .await?
            {
                Wrote::Adopted(v) => Copied::single(v, CopyMethod::Reconciled),
                Wrote::New(_, v, _) => Copied::single(v, CopyMethod::DeleteMarker),
            },
        )
    }

    /// One CopyObject of the whole version; with the ETag its answer gave (None: adopted).
    async fn copy_object(
        &self,
        ctx: &TaskCtx<'_>,
        head: &ObjectHead,
        attrs: &WriteAttrs,
    ) -> Result<(Copied, Option<String>), S3Error> {
        let src = ctx.source(&self.settings.source.bucket);
        let wrote = self
            .write_version(ctx, head.tag_count == 0, |w| {
                w.copy_object(&ctx.dest, &src, attrs)
            })
            .await?;
        Ok(match wrote {
            Wrote::Adopted(v) => (Copied::single(v, CopyMethod::Reconciled), None),
            Wrote::New(r, v, dest_head) => {
                self.copied_what_was_listed(ctx, &r, head.etag.as_deref(), v.as_deref())
                    .await?;
                self.check_checksum(ctx, "CopyObject", head, &r)?;
                // Also when the answer named the new version and no HEAD of it was made.
                self.keep_tags(ctx, head, v.as_deref(), dest_head.map(|h| *h))
                    .await?;
                (Copied::single(v, CopyMethod::Copy), r.etag)
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
        let source = self.source.once();
        self.source
            .counting(&ctx.retries)
            .retry(|| async {
                let b = source.get_object(&src, range).await?;
                body_length(side, expect, b.len() as u64)?;
                Ok(b)
            })
            .await
    }

    /// The source's tags (None: it has none).
    async fn tags_for(&self, ctx: &TaskCtx<'_>) -> Result<Option<String>, S3Error> {
        let src = ctx.source(&self.settings.source.bucket);
        let tags = self.source.counting(&ctx.retries).get_tagging(&src).await?;
        Ok(Some(tags).filter(|t| !t.is_empty()))
    }

    async fn stream_put(
        &self,
        ctx: &TaskCtx<'_>,
        head: &ObjectHead,
        mut attrs: WriteAttrs,
    ) -> Result<Copied, S3Error> {
        if let Some(md5) = md5_etag(head).then(|| etag_md5(head)).flatten() {
            return self.pass_through(ctx, head, attrs, md5).await;
        }
        let _held = self.memory.hold(head.size).await?;
        let body = self.get_range(ctx, None, head.size).await?;
        // End-to-end integrity: the destination checks the bytes against a Content-MD5. A
        // source whose ETag is the MD5 of its bytes gives it (no hashing here: the server
        // refuses bytes that differ from the source's, BadDigest); other bodies are hashed
        // once.
        let md5 = match md5_etag(head).then(|| etag_md5(head)).flatten() {
            Some(md5) => md5,
            None => Md5::digest(&body).to_vec(),
        };
        attrs.tagging = self.tags_for(ctx).await?;
        attrs.content_md5 = Some(base64::engine::general_purpose::STANDARD.encode(md5));
        let wrote = self
            .write_version(ctx, false, |w| {
                w.put_object(&ctx.dest, body.clone(), &attrs)
            })
            .await?;
        self.streamed_copy(ctx, head, wrote)
    }

    /// A single-part source whose ETag is the MD5 of its bytes, streamed: each attempt's GET
    /// body is handed to the PutObject as it arrives (nothing held beyond the connections'
    /// buffers, no copy, nothing hashed here), with the ETag as Content-MD5, so the
    /// destination refuses bytes that differ from the source's (BadDigest) and a body cut
    /// short fails the upload. GET and PUT are one attempt, retried together, reconciled
    /// before each repeat like every write.
    async fn pass_through(
        &self,
        ctx: &TaskCtx<'_>,
        head: &ObjectHead,
        mut attrs: WriteAttrs,
        md5: Vec<u8>,
    ) -> Result<Copied, S3Error> {
        let _held = self.memory.hold(PASS_THROUGH_HELD.min(head.size)).await?;
        attrs.tagging = self.tags_for(ctx).await?;
        attrs.content_md5 = Some(base64::engine::general_purpose::STANDARD.encode(md5));
        let src = ctx.source(&self.settings.source.bucket);
        let side = self.source.side();
        let wrote = self
            .write_version(ctx, false, |w| {
                let (source, src, attrs) = (self.source.once(), &src, &attrs);
                async move {
                    let (body, len) = source.get_object_stream(src, None).await?;
                    body_length(side, head.size, len)?;
                    w.put_object_stream(&ctx.dest, body, len, attrs).await
                }
            })
            .await?;
        self.streamed_copy(ctx, head, wrote)
    }

    /// What a streamed PutObject of the whole version made: an adopted earlier attempt, or a
    /// new version whose checksum is compared with the source's.
    fn streamed_copy(
        &self,
        ctx: &TaskCtx<'_>,
        head: &ObjectHead,
        wrote: Wrote,
    ) -> Result<Copied, S3Error> {
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

    /// A multipart copy (server-side or streamed) in the source's own part layout where it
    /// is known: read from the server (HEAD with partNumber), or, where the server hides it
    /// (Ceph RGW 16.2 ignores partNumber), inferred from the ETag's part count and the size
    /// ([`infer_part_sizes`]) and checked before completing: the parts' ETags must compose
    /// the source's ETag, else the upload is aborted and the next candidate tried (at most
    /// [`MAX_LAYOUT_TRIES`]). Otherwise, or when none fits, `--part-size` parts (the ETag
    /// changes; the manifest records it).
    async fn multipart(
        &self,
        ctx: &TaskCtx<'_>,
        head: &ObjectHead,
        mut attrs: WriteAttrs,
        source: PartSource,
    ) -> Result<Copied, S3Error> {
        // Streamed parts are held in memory: none larger than the budget.
        let preferred = source.preferred_part_size(&self.settings.copy);
        let fallback = choose_layout(head.size, preferred, None);
        let mut tries: Vec<(Layout, bool)> = Vec::new();
        match self.source_layout(ctx, head).await {
            Some(own) if source.fits(own.0) => {
                tries.push((choose_layout(head.size, preferred, Some(own)), false))
            }
            Some(_) => {}
            None => {
                let n = etag_parts(head.etag.as_deref());
                if let Some(n) = n.filter(|_| Encryption::keeps_md5_etag(head.encryption.as_ref()))
                {
                    let sizes = infer_part_sizes(head.size, n);
                    for part_size in sizes.into_iter().filter(|p| source.fits(*p)) {
                        if tries.len() == MAX_LAYOUT_TRIES {
                            break;
                        }
                        let layout = Layout {
                            part_size,
                            parts: n,
                            preserves_etag: true,
                        };
                        tries.push((layout, true));
                    }
                }
            }
        }
        if tries.iter().all(|(_, checked)| *checked) {
            tries.push((fallback, false));
        }
        // Server-side, a source whose HEAD counts no tag has none to read.
        attrs.tagging = match source {
            PartSource::Server if head.tag_count == 0 => None,
            _ => self.tags_for(ctx).await?,
        };
        for (layout, checked) in tries {
            let done = self
                .upload(ctx, head, &attrs, layout, source, checked)
                .await?;
            if let Some(copied) = done {
                return Ok(copied);
            }
            tracing::info!(
                "{} version {}: {} parts of {} bytes do not compose its ETag; the next layout is tried",
                show_key(&ctx.task.entry.key),
                ctx.task.entry.version_id,
                layout.parts,
                layout.part_size
            );
        }
        Err(fatal(
            self.dest.side(),
            "CompleteMultipartUpload",
            "no part layout was left to try".into(),
        ))
    }

    /// One multipart upload in `layout`; `checked`: the parts' ETags must compose the
    /// source's ETag before it is completed, else it is aborted and None returned.
    async fn upload(
        &self,
        ctx: &TaskCtx<'_>,
        head: &ObjectHead,
        attrs: &WriteAttrs,
        layout: Layout,
        source: PartSource,
        checked: bool,
    ) -> Result<Option<Copied>, S3Error> {
        let upload_id = self
            .dest
            .counting(&ctx.retries)
            .create_multipart(&ctx.dest, attrs)
            .await?;
        self.record_upload(ctx, Some(upload_id.clone()), Some(layout))
            .await?;
        let result = self
            .parts_and_complete(ctx, head, layout, &upload_id, source, checked)
            .await;
        if !matches!(result, Ok(Some(_))) {
            let aborted = self
                .dest
                .counting(&ctx.retries)
                .abort_multipart(&ctx.dest, &upload_id)
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
        source: PartSource,
        checked: bool,
    ) -> Result<Option<Copied>, S3Error> {
        let parts: Vec<PartResult> = stream::iter(1..=layout.parts)
            .map(|n| {
                let first = (n - 1) * layout.part_size;
                let last = (n * layout.part_size).min(head.size).saturating_sub(1);
                let part = (n as i32, (first, last));
                // Parts of a checked layout are not hashed here: the server's MD5s of what
                // it received must compose the source's ETag before the upload completes.
                self.part(ctx, head, upload_id, part, source, !checked)
            })
            .buffered(self.part_concurrency)
            .try_collect()
            .await?;
        if checked {
            let composite = composite_etag(parts.iter().map(|p| p.etag.as_deref()));
            let source = head.etag.as_deref().map(|e| e.trim_matches('"'));
            if composite.as_deref().map(|e| e.trim_matches('"')) != source {
                return Ok(None);
            }
        }
        if ctx.task.entry.version_id == "null" {
            // A `null` version is replaced in place, and not every server honours the ETag
            // precondition on UploadPartCopy (moto, RGW): the parts are all read, so a HEAD
            // that still answers the listed ETag means none of them came from another object.
            self.head_source(ctx, None).await?;
        }
        let wrote = self
            .write_version(ctx, false, |w| {
                w.complete_multipart(&ctx.dest, upload_id, &parts)
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
        Ok(Some(Copied {
            dest_version_id: version,
            method: source.method(),
            part_size: Some(layout.part_size),
            parts: Some(layout.parts),
            etag_preserved,
        }))
    }

    async fn part(
        &self,
        ctx: &TaskCtx<'_>,
        head: &ObjectHead,
        upload_id: &str,
        (n, range): (i32, (u64, u64)),
        source: PartSource,
        content_md5: bool,
    ) -> Result<PartResult, S3Error> {
        if source == PartSource::Server {
            let src = ctx.source(&self.settings.source.bucket);
            return self
                .dest
                .counting(&ctx.retries)
                .upload_part_copy(&ctx.dest, upload_id, n, &src, range)
                .await;
        }
        let size = range.1 - range.0 + 1;
        if !content_md5 && head.checksum.is_none() {
            // Checked by the parts' ETags before completing, no checksum to keep: the ranged
            // GET's body is passed to the UploadPart as it arrives (not held, not copied), the
            // two retried together (an UploadPart is idempotent).
            let _held = self.memory.hold(PASS_THROUGH_HELD.min(size)).await?;
            let src = ctx.source(&self.settings.source.bucket);
            let side = self.source.side();
            let (source, dest) = (self.source.once(), self.dest.once());
            return self
                .dest
                .counting(&ctx.retries)
                .retry(|| async {
                    let (body, len) = source.get_object_stream(&src, Some(range)).await?;
                    body_length(side, size, len)?;
                    dest.upload_part_stream(&ctx.dest, upload_id, n, body, len)
                        .await
                })
                .await;
        }
        let _held = self.memory.hold(size).await?;
        let body = self.get_range(ctx, Some(range), size).await?;
        let md5 = content_md5.then(|| md5_b64(&body));
        let alg = head.checksum.as_ref().map(|c| c.algorithm);
        self.dest
            .counting(&ctx.retries)
            .upload_part(&ctx.dest, upload_id, n, &body, md5.as_deref(), alg)
            .await
    }

    /// Makes the new version's tags the source version's: some servers drop tags on some
    /// writes (RGW 16.2: CopyObject with MetadataDirective REPLACE, and tags given at
    /// CreateMultipartUpload). Nothing to do when neither the source's HEAD nor the new
    /// version's (when one was made) counts a tag; else the two tag sets are compared.
    async fn keep_tags(
        &self,
        ctx: &TaskCtx<'_>,
        src: &ObjectHead,
        version: Option<&str>,
        dest: Option<ObjectHead>,
    ) -> Result<(), S3Error> {
        if src.tag_count == 0 && dest.is_none_or(|d| d.tag_count == 0) {
            return Ok(());
        }
        self.same_tags(ctx, version).await
    }

    /// Reads the tags of the source version and of destination `version`, and puts the
    /// source's on the destination when the two sets differ (order aside).
    async fn same_tags(&self, ctx: &TaskCtx<'_>, version: Option<&str>) -> Result<(), S3Error> {
        let source = ctx.source(&self.settings.source.bucket);
        let want = self
            .source
            .counting(&ctx.retries)
            .get_tagging(&source)
            .await?;
        let obj = crate::s3::ObjectRef {
            version_id: version.map(str::to_string),
            ..ctx.dest.clone()
        };
        let have = self.dest.counting(&ctx.retries).get_tagging(&obj).await?;
        if same_tag_set(&want, &have) {
            return Ok(());
        }
        self.dest
            .counting(&ctx.retries)
            .put_tagging(&obj, &want)
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
                        show_key(&ctx.task.entry.key),
                        ctx.task.entry.version_id,
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
            .dest
            .counting(&ctx.retries)
            .head_object(&dest, None)
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

/// Whether two URL-encoded tag sets hold the same tags, in any order.
fn same_tag_set(a: &str, b: &str) -> bool {
    let mut a = crate::s3::parse_tagging(a);
    let mut b = crate::s3::parse_tagging(b);
    a.sort();
    b.sort();
    a == b
}

/// Whether an object's ETag is an MD5 of its bytes (not for KMS or SSE-C encryption).
pub(super) fn md5_etag(head: &ObjectHead) -> bool {
    Encryption::keeps_md5_etag(head.encryption.as_ref())
        && head.etag.as_deref().is_some_and(|e| {
            let e = e.trim_matches('"');
            e.len() == 32 && !e.contains('-')
        })
}

/// The 16 bytes of a single-part ETag (the MD5 of the bytes where [`md5_etag`] says so).
fn etag_md5(head: &ObjectHead) -> Option<Vec<u8>> {
    let e = head.etag.as_deref()?.trim_matches('"');
    hex::decode(e).ok().filter(|b| b.len() == 16)
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
        let server = Route::ServerSide {
            whole_multipart: false,
        };
        let whole = Route::ServerSide {
            whole_multipart: true,
        };
        let (single, three) = (SourceUpload::Single, SourceUpload::Multipart(3));
        // Above 5 GiB: parts, whatever the source.
        assert_eq!(
            choose_plan(false, 6 << 30, single, whole, &c),
            CopyPlan::MultipartCopy
        );
        // A single-part source up to 5 GiB: one CopyObject, above the threshold too.
        assert_eq!(
            choose_plan(false, 5 << 30, single, server, &c),
            CopyPlan::Copy
        );
        // A small multipart source keeps its layout (under the threshold too).
        assert_eq!(
            choose_plan(false, 12 << 20, three, server, &c),
            CopyPlan::MultipartCopy
        );
        assert_eq!(
            choose_plan(false, 12 << 20, three, whole, &c),
            CopyPlan::Copy
        );
        // An ETag that tells nothing: by the threshold.
        let unknown = SourceUpload::Unknown;
        assert_eq!(
            choose_plan(false, 1 << 20, unknown, server, &c),
            CopyPlan::Copy
        );
        assert_eq!(
            choose_plan(false, 64 << 20, unknown, server, &c),
            CopyPlan::MultipartCopy
        );
        // Streamed: a single-part source up to 5 GiB is one PutObject (passed through, so
        // larger than the budget too); above 5 GiB parts.
        let stream = Route::Stream { budget: 208 << 20 };
        assert_eq!(
            choose_plan(false, 10 << 20, single, stream, &c),
            CopyPlan::Stream
        );
        assert_eq!(
            choose_plan(false, 200 << 20, single, stream, &c),
            CopyPlan::Stream
        );
        assert_eq!(
            choose_plan(false, 300 << 20, single, stream, &c),
            CopyPlan::Stream
        );
        assert_eq!(
            choose_plan(false, MAX_COPY_OBJECT + 1, single, stream, &c),
            CopyPlan::MultipartStream
        );
        assert_eq!(
            choose_plan(false, 12 << 20, three, stream, &c),
            CopyPlan::MultipartStream
        );
        assert_eq!(
            choose_plan(false, 10 << 20, unknown, stream, &c),
            CopyPlan::Stream
        );
        assert_eq!(
            choose_plan(false, 20 << 20, unknown, stream, &c),
            CopyPlan::MultipartStream
        );
    }

    #[test]
    fn reads_source_uploads_from_etags() {
        let md5 = "\"d41d8cd98f00b204e9800998ecf8427e\"";
        assert_eq!(SourceUpload::of(Some(md5), true), SourceUpload::Single);
        assert_eq!(SourceUpload::of(Some(md5), false), SourceUpload::Unknown);
        assert_eq!(
            SourceUpload::of(Some("\"d41d8cd98f00b204e9800998ecf8427e-12\""), false),
            SourceUpload::Multipart(12)
        );
        assert_eq!(
            SourceUpload::of(Some("\"abc\""), true),
            SourceUpload::Unknown
        );
        assert_eq!(SourceUpload::of(None, true), SourceUpload::Unknown);
    }

    /// Every candidate cuts the size into exactly the part count, within S3's limits.
    fn fits(size: u64, n: u64, p: u64) -> bool {
        (n == 1 || p >= MIN_PART) && p <= MAX_PART && (n - 1) * p < size && size <= n * p
    }

    #[test]
    fn infers_common_part_sizes_first() {
        // 3 x 5 MiB + 2 MiB: 5 MiB first (then splits a little above it).
        let c = infer_part_sizes(17 * MIB, 4);
        assert_eq!(c[0], 5 * MIB, "{c:?}");
        assert!(c.iter().all(|p| fits(17 * MIB, 4, *p)), "{c:?}");
        // 6 MiB parts (3 x 6 MiB + 1 MiB): 5 MiB also gives 4 parts and comes first.
        assert_eq!(
            infer_part_sizes(19 * MIB, 4),
            vec![5 * MIB, 6 * MIB, 6_000_000]
        );
        // 128 MiB in 16 parts: 8 MiB (the AWS CLI's) first.
        let c = infer_part_sizes(128 * MIB, 16);
        assert_eq!(c[0], 8 * MIB, "{c:?}");
        assert!(c.iter().all(|p| fits(128 * MIB, 16, *p)), "{c:?}");
        // 1 GiB in 64 parts of 16 MiB: 16 MiB first, before the whole-MiB sweep.
        let c = infer_part_sizes(1024 * MIB, 64);
        assert_eq!(c[0], 16 * MIB, "{c:?}");
        // An odd total in 2 parts: common sizes in range first, then whole MiB.
        let c = infer_part_sizes(150 * MIB + 7, 2);
        assert_eq!(&c[..2], &[100 * MIB, 128 * MIB], "{c:?}");
        assert!(c.len() <= 12);
        assert!(c.iter().all(|p| fits(150 * MIB + 7, 2, *p)), "{c:?}");
    }

    #[test]
    fn infers_equal_splits_and_refuses_impossible_counts() {
        // 4 equal parts of 5,500,001 bytes: after the whole MiB that fit, the equal split,
        // then whole decimal MB.
        let size = 4 * 5_500_001;
        let c = infer_part_sizes(size, 4);
        assert_eq!(c, vec![6 * MIB, 5_500_001, 6_000_000, 7_000_000], "{c:?}");
        assert!(c.iter().all(|p| fits(size, 4, *p)));
        // Parts under 5 MiB are not possible (but for the last one).
        assert!(infer_part_sizes(12 * MIB, 4).is_empty());
        // One part: the whole object.
        assert_eq!(infer_part_sizes(3 * MIB, 1), vec![3 * MIB]);
        assert!(infer_part_sizes(0, 1).is_empty());
        assert!(infer_part_sizes(MIB, 0).is_empty());
        assert!(infer_part_sizes(100 * MIB, MAX_PARTS + 1).is_empty());
    }

    #[test]
    fn composes_multipart_etags() {
        let parts = [&b"hello "[..], &b"world"[..]];
        let etags: Vec<String> = parts
            .iter()
            .map(|p| format!("\"{}\"", hex::encode(Md5::digest(p))))
            .collect();
        let mut all = Vec::new();
        for p in parts {
            all.extend_from_slice(&Md5::digest(p));
        }
        let want = format!("\"{}-2\"", hex::encode(Md5::digest(&all)));
        assert_eq!(
            composite_etag(etags.iter().map(|e| Some(e.as_str()))),
            Some(want)
        );
        assert_eq!(composite_etag([Some("\"abc\"")]), None);
        assert_eq!(composite_etag([None]), None);
        assert_eq!(composite_etag(std::iter::empty()), None);
    }
}
