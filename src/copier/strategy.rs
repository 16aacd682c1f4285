//! copy strategies: how one source version becomes one destination version.
//!
//! - server-side `CopyObject` (small objects, destination credentials read the source);
//! - server-side multipart `UploadPartCopy`, parts in parallel, with the source's own part
//!   layout when it is uniform, so the multipart ETag is preserved;
//! - streaming: ranged GETs with the source client, `PutObject` or `UploadPart` with the
//!   destination client; at most one part per request slot is held in memory.
//!
//! Every request goes through [`crate::s3::with_retry`], except the one that creates the
//! destination version (`CopyObject`, `PutObject`, `CompleteMultipartUpload`): that one is
//! retried by [`super::Copier::commit_write`], which first checks whether an attempt that
//! failed ambiguously took effect, so a retry never makes a second version.

use std::collections::HashMap;

use aws_sdk_s3::operation::head_object::HeadObjectOutput;
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{
    ChecksumAlgorithm, ChecksumMode, ChecksumType, CompletedMultipartUpload, CompletedPart,
    MetadataDirective, ObjectCannedAcl, ObjectLockLegalHoldStatus, ObjectLockMode,
    ServerSideEncryption, StorageClass, TaggingDirective,
};
use base64::Engine;
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use md5::{Digest, Md5};

use super::{Copied, Copier, TaskCtx};
use crate::config::{Side, MAX_COPY_OBJECT, MAX_PART, MAX_PARTS, MIN_PART};
use crate::manifest::CopyMethod;
use crate::s3::{classify, ErrorClass, S3Error};

/// What the destination must carry over from the source version.
#[derive(Clone, Debug, Default)]
pub struct SourceAttrs {
    /// Size in bytes.
    pub size: u64,
    /// ETag, quotes included.
    pub etag: Option<String>,
    /// Content-Type.
    pub content_type: Option<String>,
    /// Cache-Control.
    pub cache_control: Option<String>,
    /// Content-Disposition.
    pub content_disposition: Option<String>,
    /// Content-Encoding.
    pub content_encoding: Option<String>,
    /// Content-Language.
    pub content_language: Option<String>,
    /// Expires.
    pub expires: Option<DateTime>,
    /// User metadata.
    pub metadata: HashMap<String, String>,
    /// Storage class (None is STANDARD).
    pub storage_class: Option<StorageClass>,
    /// Server-side encryption.
    pub sse: Option<ServerSideEncryption>,
    /// KMS key.
    pub kms_key: Option<String>,
    /// Object lock mode.
    pub lock_mode: Option<ObjectLockMode>,
    /// Object lock retain-until.
    pub lock_until: Option<DateTime>,
    /// Legal hold.
    pub legal_hold: Option<ObjectLockLegalHoldStatus>,
    /// Checksum algorithm and value, when the source has one.
    pub checksum: Option<(ChecksumAlgorithm, String)>,
    /// Whether that checksum covers the whole object (`FULL_OBJECT`) or its parts
    /// (`COMPOSITE`), when the server says.
    pub checksum_type: Option<ChecksumType>,
    /// Tag count.
    pub tag_count: i32,
}

/// The checksums the code reads, in this order, wherever a response carries them.
const ALGORITHMS: [ChecksumAlgorithm; 5] = [
    ChecksumAlgorithm::Crc32,
    ChecksumAlgorithm::Crc32C,
    ChecksumAlgorithm::Crc64Nvme,
    ChecksumAlgorithm::Sha1,
    ChecksumAlgorithm::Sha256,
];

/// The destination's checksum of the source's algorithm, from a response's checksum fields
/// given in [`ALGORITHMS`] order.
fn pick_checksum(
    a: &SourceAttrs,
    values: [Option<&str>; 5],
) -> Option<(ChecksumAlgorithm, String)> {
    let (alg, _) = a.checksum.as_ref()?;
    let i = ALGORITHMS.iter().position(|x| x == alg)?;
    values[i].map(|v| (alg.clone(), v.to_string()))
}

/// Sets what the destination version carries over from the source (content headers, user
/// metadata, tags, storage class, encryption, ACL, checksum algorithm, object lock) on a
/// PutObject or CreateMultipartUpload request.
macro_rules! with_attrs {
    ($req:expr, $copier:expr, $a:expr, $tags:expr, $sse:expr, $kms:expr) => {
        $req.set_content_type($a.content_type.clone())
            .set_cache_control($a.cache_control.clone())
            .set_content_disposition($a.content_disposition.clone())
            .set_content_encoding($a.content_encoding.clone())
            .set_content_language($a.content_language.clone())
            .set_expires($a.expires)
            .set_metadata(Some($a.metadata.clone()).filter(|m| !m.is_empty()))
            .set_tagging(Some($tags.clone()).filter(|s| !s.is_empty()))
            .set_storage_class($copier.dest_storage_class($a))
            .set_server_side_encryption($sse.clone())
            .set_ssekms_key_id($kms.clone())
            .set_acl($copier.dest_acl())
            .set_checksum_algorithm($a.checksum.as_ref().map(|c| c.0.clone()))
            .set_object_lock_mode($a.lock_mode.clone())
            .set_object_lock_retain_until_date($a.lock_until)
            .set_object_lock_legal_hold_status($a.legal_hold.clone())
    };
}

fn checksum_of(h: &HeadObjectOutput) -> Option<(ChecksumAlgorithm, String)> {
    let values = [
        h.checksum_crc32(),
        h.checksum_crc32_c(),
        h.checksum_crc64_nvme(),
        h.checksum_sha1(),
        h.checksum_sha256(),
    ];
    ALGORITHMS
        .into_iter()
        .zip(values)
        .find_map(|(a, v)| v.map(|v| (a, v.to_string())))
}

impl SourceAttrs {
    fn from_head(h: &HeadObjectOutput) -> SourceAttrs {
        SourceAttrs {
            size: h.content_length().unwrap_or(0).max(0) as u64,
            etag: h.e_tag().map(str::to_string),
            content_type: h.content_type().map(str::to_string),
            cache_control: h.cache_control().map(str::to_string),
            content_disposition: h.content_disposition().map(str::to_string),
            content_encoding: h.content_encoding().map(str::to_string),
            content_language: h.content_language().map(str::to_string),
            #[allow(deprecated)]
            expires: h.expires().cloned(),
            metadata: h.metadata().cloned().unwrap_or_default(),
            storage_class: h.storage_class().cloned(),
            sse: h.server_side_encryption().cloned(),
            kms_key: h.ssekms_key_id().map(str::to_string),
            lock_mode: h.object_lock_mode().cloned(),
            lock_until: h.object_lock_retain_until_date().cloned(),
            legal_hold: h.object_lock_legal_hold_status().cloned(),
            checksum: checksum_of(h),
            checksum_type: h.checksum_type().cloned(),
            tag_count: h.tag_count().unwrap_or(0),
        }
    }

    /// Parts count encoded in a multipart ETag (`"…-N"`).
    pub fn etag_parts(&self) -> Option<u64> {
        let e = self.etag.as_deref()?.trim_matches('"');
        let (_, n) = e.rsplit_once('-')?;
        n.parse().ok()
    }
}

/// URL-encodes a key for `x-amz-copy-source` (everything but unreserved characters and '/').
pub fn encode_copy_source(bucket: &str, key: &str, version_id: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~')
        .remove(b'/');
    format!(
        "{}/{}?versionId={}",
        bucket,
        percent_encoding::utf8_percent_encode(key, SET),
        percent_encoding::utf8_percent_encode(version_id, SET)
    )
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

fn tagging_string(tags: &[aws_sdk_s3::types::Tag]) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    tags.iter()
        .map(|t| {
            format!(
                "{}={}",
                percent_encoding::utf8_percent_encode(t.key(), SET),
                percent_encoding::utf8_percent_encode(t.value(), SET)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn md5_b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(b))
}

fn md5_hex(b: &[u8]) -> String {
    hex::encode(Md5::digest(b))
}

impl Copier {
    /// The client that reads the source: server-side copies read it with the destination's
    /// credentials (errors still concern the source).
    fn reader(&self) -> &aws_sdk_s3::Client {
        if self.server_side() {
            &self.dest
        } else {
            &self.source
        }
    }

    async fn head_source(
        &self,
        t: &TaskCtx<'_>,
        part_number: Option<i32>,
    ) -> Result<HeadObjectOutput, S3Error> {
        let client = self.reader();
        let head = || async {
            self.call(t, || async {
                client
                    .head_object()
                    .bucket(&self.settings.source.bucket)
                    .key(&t.task.key)
                    .set_version_id(t.version_arg())
                    .checksum_mode(ChecksumMode::Enabled)
                    .set_part_number(part_number)
                    .send()
                    .await
                    .map_err(|e| classify(Side::Source, "HeadObject", true, e))
            })
            .await
        };
        let h = head().await?;
        if t.version_arg().is_none() && h.version_id().is_some_and(|v| v != "null") {
            // The null version is not the current one: name it explicitly from now on.
            t.null_is_current
                .store(false, std::sync::atomic::Ordering::Relaxed);
            return head().await;
        }
        Ok(h)
    }

    async fn source_tags(&self, t: &TaskCtx<'_>) -> Result<String, S3Error> {
        let client = self.reader();
        let out = self
            .call(t, || async {
                client
                    .get_object_tagging()
                    .bucket(&self.settings.source.bucket)
                    .key(&t.task.key)
                    .set_version_id(t.version_arg())
                    .send()
                    .await
                    .map_err(|e| classify(Side::Source, "GetObjectTagging", true, e))
            })
            .await?;
        Ok(tagging_string(out.tag_set()))
    }

    fn dest_storage_class(&self, a: &SourceAttrs) -> Option<StorageClass> {
        match &self.settings.copy.storage_class {
            Some(s) => Some(StorageClass::from(s.as_str())),
            None => a
                .storage_class
                .clone()
                .filter(|c| *c != StorageClass::Standard),
        }
    }

    fn dest_sse(&self, a: &SourceAttrs) -> (Option<ServerSideEncryption>, Option<String>) {
        match &self.settings.copy.sse {
            Some(s) => (
                Some(ServerSideEncryption::from(s.as_str())),
                self.settings.copy.sse_kms_key_id.clone(),
            ),
            None => (a.sse.clone(), a.kms_key.clone()),
        }
    }

    fn dest_acl(&self) -> Option<ObjectCannedAcl> {
        self.settings.copy.acl.as_deref().map(ObjectCannedAcl::from)
    }

    /// Copies one object version (not a delete marker) by the job's strategy.
    pub(super) async fn copy_version(&self, t: &TaskCtx<'_>) -> Result<Copied, S3Error> {
        let head = self.head_source(t, None).await?;
        if head.delete_marker() == Some(true) {
            return Err(S3Error::other(
                Side::Source,
                "HeadObject",
                ErrorClass::SourceGone,
                "the version is a delete marker now".into(),
            ));
        }
        let attrs = SourceAttrs::from_head(&head);
        let server_side = self.server_side();
        let multipart = self.goes_multipart(attrs.size, server_side);
        let copied = match (server_side, multipart) {
            (true, false) => self.copy_object(t, &attrs).await?,
            (false, false) => self.stream_put(t, &attrs).await?,
            (server_side, true) => self.multipart(t, &attrs, server_side).await?,
        };
        Ok(copied)
    }

    /// Whether a version of `size` bytes is copied in parts: at or above the threshold, above
    /// 5 GiB (CopyObject's limit), and when streaming above one part, so that memory stays
    /// within about one part per request in flight whatever the object sizes.
    pub(super) fn goes_multipart(&self, size: u64, server_side: bool) -> bool {
        let c = &self.settings.copy;
        size >= c.multipart_threshold
            || size > MAX_COPY_OBJECT
            || (!server_side && size > c.part_size)
    }

    fn verify_checksum(
        &self,
        t: &TaskCtx<'_>,
        op: &'static str,
        attrs: &SourceAttrs,
        dest_value: Option<(ChecksumAlgorithm, String)>,
    ) -> Result<(), S3Error> {
        if let (Some((sa, sv)), Some((da, dv))) = (&attrs.checksum, dest_value) {
            if *sa == da && *sv != dv {
                return Err(S3Error::other(
                    Side::Dest,
                    op,
                    ErrorClass::Fatal,
                    format!(
                        "checksum mismatch for {:?} version {}: source {} {sv}, destination {dv}",
                        t.task.key,
                        t.task.version_id,
                        sa.as_str()
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn copy_object(&self, t: &TaskCtx<'_>, a: &SourceAttrs) -> Result<Copied, S3Error> {
        let source = encode_copy_source(
            &self.settings.source.bucket,
            &t.task.key,
            &t.task.version_id,
        );
        let (sse, kms) = self.dest_sse(a);
        let out = self
            .commit_write(t, "CopyObject", || async {
                self.dest
                    .copy_object()
                    .bucket(&self.settings.dest.bucket)
                    .key(t.dest_key)
                    .copy_source(&source)
                    .metadata_directive(MetadataDirective::Copy)
                    .tagging_directive(TaggingDirective::Copy)
                    .set_storage_class(self.dest_storage_class(a))
                    .set_server_side_encryption(sse.clone())
                    .set_ssekms_key_id(kms.clone())
                    .set_acl(self.dest_acl())
                    .set_checksum_algorithm(a.checksum.as_ref().map(|c| c.0.clone()))
                    .set_object_lock_mode(a.lock_mode.clone())
                    .set_object_lock_retain_until_date(a.lock_until)
                    .set_object_lock_legal_hold_status(a.legal_hold.clone())
                    .send()
                    .await
                    .map(|o| {
                        let r = o.copy_object_result();
                        let ck = pick_checksum(
                            a,
                            [
                                r.and_then(|r| r.checksum_crc32()),
                                r.and_then(|r| r.checksum_crc32_c()),
                                r.and_then(|r| r.checksum_crc64_nvme()),
                                r.and_then(|r| r.checksum_sha1()),
                                r.and_then(|r| r.checksum_sha256()),
                            ],
                        );
                        (o.version_id().map(str::to_string), ck)
                    })
                    .map_err(|e| classify(Side::Dest, "CopyObject", true, e))
            })
            .await?;
        match out {
            super::Write::Adopted(v) => Ok(Copied::adopted(v)),
            super::Write::Done((version, ck)) => {
                self.verify_checksum(t, "CopyObject", a, ck)?;
                Ok(Copied {
                    dest_version_id: version,
                    method: CopyMethod::Copy,
                    part_size: None,
                    parts: None,
                    etag_preserved: None,
                })
            }
        }
    }

    async fn get_range(
        &self,
        t: &TaskCtx<'_>,
        range: Option<(u64, u64)>,
        expect: u64,
    ) -> Result<Bytes, S3Error> {
        self.call(t, || async {
            let out = self
                .source
                .get_object()
                .bucket(&self.settings.source.bucket)
                .key(&t.task.key)
                .set_version_id(t.version_arg())
                .set_range(range.map(|(a, b)| format!("bytes={a}-{b}")))
                .send()
                .await
                .map_err(|e| classify(Side::Source, "GetObject", true, e))?;
            let body = out.body.collect().await.map_err(|e| {
                S3Error::other(
                    Side::Source,
                    "GetObject",
                    ErrorClass::Retryable,
                    format!("body read failed: {e}"),
                )
            })?;
            let bytes = body.into_bytes();
            if bytes.len() as u64 != expect {
                return Err(S3Error::other(
                    Side::Source,
                    "GetObject",
                    ErrorClass::Retryable,
                    format!("expected {expect} bytes, got {}", bytes.len()),
                ));
            }
            Ok(bytes)
        })
        .await
    }

    async fn stream_put(&self, t: &TaskCtx<'_>, a: &SourceAttrs) -> Result<Copied, S3Error> {
        let body = self.get_range(t, None, a.size).await?;
        // End-to-end integrity: an MD5 ETag must match the bytes read.
        if let Some(e) = a.etag.as_deref() {
            let e = e.trim_matches('"');
            if e.len() == 32
                && !e.contains('-')
                && a.sse.as_ref() != Some(&ServerSideEncryption::AwsKms)
                && md5_hex(&body) != e
            {
                return Err(S3Error::other(
                    Side::Source,
                    "GetObject",
                    ErrorClass::Retryable,
                    "the bytes read do not match the source ETag".into(),
                ));
            }
        }
        let tags = if a.tag_count > 0 || !self.server_side() {
            self.source_tags(t).await?
        } else {
            String::new()
        };
        let md5 = md5_b64(&body);
        let (sse, kms) = self.dest_sse(a);
        let out = self
            .commit_write(t, "PutObject", || async {
                let req = self
                    .dest
                    .put_object()
                    .bucket(&self.settings.dest.bucket)
                    .key(t.dest_key)
                    .body(ByteStream::from(body.clone()))
                    .content_md5(&md5);
                with_attrs!(req, self, a, tags, sse, kms)
                    .send()
                    .await
                    .map(|o| {
                        let ck = pick_checksum(
                            a,
                            [
                                o.checksum_crc32(),
                                o.checksum_crc32_c(),
                                o.checksum_crc64_nvme(),
                                o.checksum_sha1(),
                                o.checksum_sha256(),
                            ],
                        );
                        (o.version_id().map(str::to_string), ck)
                    })
                    .map_err(|e| classify(Side::Dest, "PutObject", false, e))
            })
            .await?;
        match out {
            super::Write::Adopted(v) => Ok(Copied::adopted(v)),
            super::Write::Done((version, ck)) => {
                self.verify_checksum(t, "PutObject", a, ck)?;
                Ok(Copied {
                    dest_version_id: version,
                    method: CopyMethod::Stream,
                    part_size: None,
                    parts: None,
                    etag_preserved: None,
                })
            }
        }
    }

    async fn source_layout(&self, t: &TaskCtx<'_>, a: &SourceAttrs) -> Option<(u64, u64)> {
        let n = a.etag_parts()?;
        // HEAD with partNumber=1 gives the first part's length and the parts count.
        let h = self.head_source(t, Some(1)).await.ok()?;
        let first = h.content_length()?.max(0) as u64;
        let count = h.parts_count().map(|c| c as u64).unwrap_or(n);
        if count != n || first == 0 {
            return None;
        }
        if n > 1 {
            // The last part must be what uniform parts leave over (catches 6/5/7 MiB).
            let last = self.head_source(t, Some(n as i32)).await.ok()?;
            let expected = a.size.checked_sub((n - 1) * first)?;
            if last.content_length()?.max(0) as u64 != expected {
                return None;
            }
        }
        Some((first, n))
    }

    async fn multipart(
        &self,
        t: &TaskCtx<'_>,
        a: &SourceAttrs,
        server_side: bool,
    ) -> Result<Copied, S3Error> {
        let layout = choose_layout(
            a.size,
            self.settings.copy.part_size,
            self.source_layout(t, a).await,
        );
        let tags = if a.tag_count > 0 || !server_side {
            self.source_tags(t).await?
        } else {
            String::new()
        };
        let (sse, kms) = self.dest_sse(a);
        // Uploads left behind for this key by an ambiguous earlier attempt are aborted first.
        let created = self
            .call(t, || async {
                let req = self
                    .dest
                    .create_multipart_upload()
                    .bucket(&self.settings.dest.bucket)
                    .key(t.dest_key)
                    // A whole-object checksum at the source stays one at the destination.
                    .set_checksum_type(
                        a.checksum_type
                            .clone()
                            .filter(|c| *c == ChecksumType::FullObject),
                    );
                with_attrs!(req, self, a, tags, sse, kms)
                    .send()
                    .await
                    .map_err(|e| classify(Side::Dest, "CreateMultipartUpload", false, e))
            })
            .await?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        self.record_upload(t, Some(upload_id.clone()), Some(layout))
            .await?;
        let result = self
            .upload_parts_and_complete(t, a, layout, &upload_id, server_side)
            .await;
        match result {
            Ok(c) => Ok(c),
            Err(e) => {
                self.abort_upload(t.dest_key, &upload_id).await;
                self.record_upload(t, None, None).await?;
                Err(e)
            }
        }
    }

    async fn upload_parts_and_complete(
        &self,
        t: &TaskCtx<'_>,
        a: &SourceAttrs,
        layout: Layout,
        upload_id: &str,
        server_side: bool,
    ) -> Result<Copied, S3Error> {
        let source = encode_copy_source(
            &self.settings.source.bucket,
            &t.task.key,
            &t.task.version_id,
        );
        let alg = a.checksum.as_ref().map(|c| c.0.clone());
        let parts: Vec<CompletedPart> = stream::iter(1..=layout.parts)
            .map(|n| {
                let start = (n - 1) * layout.part_size;
                let end = (n * layout.part_size).min(a.size).saturating_sub(1);
                let source = &source;
                let alg = alg.clone();
                async move {
                    if server_side {
                        self.upload_part_copy(t, source, upload_id, n as i32, start, end)
                            .await
                    } else {
                        self.upload_part_stream(t, upload_id, n as i32, start, end, alg)
                            .await
                    }
                }
            })
            .buffered(self.part_concurrency)
            .try_collect()
            .await?;
        let out = self
            .commit_write(t, "CompleteMultipartUpload", || async {
                self.dest
                    .complete_multipart_upload()
                    .bucket(&self.settings.dest.bucket)
                    .key(t.dest_key)
                    .upload_id(upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts.clone()))
                            .build(),
                    )
                    .send()
                    .await
                    .map(|o| {
                        (
                            o.version_id().map(str::to_string),
                            o.e_tag().map(str::to_string),
                        )
                    })
                    .map_err(|e| classify(Side::Dest, "CompleteMultipartUpload", false, e))
            })
            .await?;
        // A stopped writer is seen (and stops the run) at the task's next durable update.
        let _ = self.writer.send(crate::manifest::Update::Upload {
            id: t.task.id,
            upload_id: None,
            part_size: None,
            parts: None,
        });
        let (version, etag) = match out {
            super::Write::Adopted(v) => (v, None),
            super::Write::Done(x) => x,
        };
        let etag_preserved = match (&etag, &a.etag) {
            (Some(d), Some(s)) => Some(d == s),
            _ => None,
        };
        self.verify_multipart_checksum(t, a, version.as_deref(), layout)
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
            etag_preserved: etag_preserved.or(Some(layout.preserves_etag)),
        })
    }

    /// After a multipart copy, compares the destination's checksum with the source's where
    /// they are comparable: both over the whole object, or both composite over the same
    /// part layout. Elsewhere (composite over another layout) the values differ by design.
    async fn verify_multipart_checksum(
        &self,
        t: &TaskCtx<'_>,
        a: &SourceAttrs,
        version: Option<&str>,
        layout: Layout,
    ) -> Result<(), S3Error> {
        let Some((alg, source_value)) = &a.checksum else {
            return Ok(());
        };
        let h = self
            .call(t, || async {
                self.dest
                    .head_object()
                    .bucket(&self.settings.dest.bucket)
                    .key(t.dest_key)
                    .set_version_id(version.map(str::to_string))
                    .checksum_mode(ChecksumMode::Enabled)
                    .send()
                    .await
                    .map_err(|e| classify(Side::Dest, "HeadObject", false, e))
            })
            .await?;
        let Some((dest_alg, dest_value)) = checksum_of(&h) else {
            return Ok(());
        };
        let composite = |v: &str| v.contains('-');
        let comparable = *alg == dest_alg
            && composite(source_value) == composite(&dest_value)
            && (!composite(source_value) || layout.preserves_etag);
        if comparable {
            self.verify_checksum(
                t,
                "CompleteMultipartUpload",
                a,
                Some((dest_alg, dest_value)),
            )?;
        }
        Ok(())
    }

    async fn upload_part_copy(
        &self,
        t: &TaskCtx<'_>,
        source: &str,
        upload_id: &str,
        n: i32,
        start: u64,
        end: u64,
    ) -> Result<CompletedPart, S3Error> {
        let out = self
            .call(t, || async {
                self.dest
                    .upload_part_copy()
                    .bucket(&self.settings.dest.bucket)
                    .key(t.dest_key)
                    .upload_id(upload_id)
                    .part_number(n)
                    .copy_source(source)
                    .copy_source_range(format!("bytes={start}-{end}"))
                    .send()
                    .await
                    .map_err(|e| classify(Side::Dest, "UploadPartCopy", true, e))
            })
            .await?;
        let r = out.copy_part_result();
        Ok(CompletedPart::builder()
            .part_number(n)
            .set_e_tag(r.and_then(|r| r.e_tag()).map(str::to_string))
            .set_checksum_crc32(r.and_then(|r| r.checksum_crc32()).map(str::to_string))
            .set_checksum_crc32_c(r.and_then(|r| r.checksum_crc32_c()).map(str::to_string))
            .set_checksum_crc64_nvme(r.and_then(|r| r.checksum_crc64_nvme()).map(str::to_string))
            .set_checksum_sha1(r.and_then(|r| r.checksum_sha1()).map(str::to_string))
            .set_checksum_sha256(r.and_then(|r| r.checksum_sha256()).map(str::to_string))
            .build())
    }

    async fn upload_part_stream(
        &self,
        t: &TaskCtx<'_>,
        upload_id: &str,
        n: i32,
        start: u64,
        end: u64,
        alg: Option<ChecksumAlgorithm>,
    ) -> Result<CompletedPart, S3Error> {
        let body = self
            .get_range(t, Some((start, end)), end - start + 1)
            .await?;
        let md5 = md5_b64(&body);
        let out = self
            .call(t, || async {
                self.dest
                    .upload_part()
                    .bucket(&self.settings.dest.bucket)
                    .key(t.dest_key)
                    .upload_id(upload_id)
                    .part_number(n)
                    .content_md5(&md5)
                    .set_checksum_algorithm(alg.clone())
                    .body(ByteStream::from(body.clone()))
                    .send()
                    .await
                    .map_err(|e| classify(Side::Dest, "UploadPart", false, e))
            })
            .await?;
        Ok(CompletedPart::builder()
            .part_number(n)
            .set_e_tag(out.e_tag().map(str::to_string))
            .set_checksum_crc32(out.checksum_crc32().map(str::to_string))
            .set_checksum_crc32_c(out.checksum_crc32_c().map(str::to_string))
            .set_checksum_crc64_nvme(out.checksum_crc64_nvme().map(str::to_string))
            .set_checksum_sha1(out.checksum_sha1().map(str::to_string))
            .set_checksum_sha256(out.checksum_sha256().map(str::to_string))
            .build())
    }

    /// Aborts every open multipart upload of exactly `dest_key` (an in-doubt task may have
    /// created one whose id never reached the manifest). Relies on the job's assumption that
    /// nothing else writes to its destination keys.
    pub(super) async fn abort_uploads_of_key(&self, t: &TaskCtx<'_>) -> Result<(), S3Error> {
        let out = self
            .call(t, || async {
                self.dest
                    .list_multipart_uploads()
                    .bucket(&self.settings.dest.bucket)
                    .prefix(t.dest_key)
                    .send()
                    .await
                    .map_err(|e| classify(Side::Dest, "ListMultipartUploads", false, e))
            })
            .await?;
        for u in out.uploads() {
            if let (Some(k), Some(id)) = (u.key(), u.upload_id()) {
                if k == t.dest_key {
                    self.abort_upload(k, id).await;
                }
            }
        }
        Ok(())
    }

    /// Aborts a destination multipart upload (best effort; a missing upload is fine).
    pub(super) async fn abort_upload(&self, dest_key: &str, upload_id: &str) {
        let r = self
            .dest
            .abort_multipart_upload()
            .bucket(&self.settings.dest.bucket)
            .key(dest_key)
            .upload_id(upload_id)
            .send()
            .await;
        if let Err(e) = r {
            let e = classify(Side::Dest, "AbortMultipartUpload", false, e);
            if e.code.as_deref() != Some("NoSuchUpload") {
                tracing::warn!("could not abort upload {upload_id} of {dest_key:?}: {e}");
            }
        }
    }

    async fn record_upload(
        &self,
        t: &TaskCtx<'_>,
        upload_id: Option<String>,
        layout: Option<Layout>,
    ) -> Result<(), S3Error> {
        self.writer
            .send_durable(crate::manifest::Update::Upload {
                id: t.task.id,
                upload_id,
                part_size: layout.map(|l| l.part_size),
                parts: layout.map(|l| l.parts),
            })
            .await
            .map_err(|e| S3Error::other(Side::Dest, "manifest", ErrorClass::Fatal, e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn encodes_copy_source() {
        assert_eq!(
            encode_copy_source("b", "a b/c+d%?#é", "null"),
            "b/a%20b/c%2Bd%25%3F%23%C3%A9?versionId=null"
        );
    }

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
    fn etag_parts() {
        let a = SourceAttrs {
            etag: Some("\"abc-12\"".into()),
            ..Default::default()
        };
        assert_eq!(a.etag_parts(), Some(12));
    }
}
