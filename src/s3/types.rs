//! s3::types: the records the access layer hands to the stages above it, independent of the
//! SDK: which side a request is for, one listed version, and what a write carries; and the URL
//! encoding of keys in the CSV files users supply and the reports written for them.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Which side of the job a client or an error belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The bucket that is read.
    Source,
    /// The bucket that is written.
    Dest,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Dest => "dest",
        })
    }
}

/// One entry of a `ListObjectVersions` listing: an object version or a delete marker. The
/// single listing record used by the lister, the manifest, reconciliation and verify.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionEntry {
    /// The key, decoded, byte-exact.
    pub key: String,
    /// The version id (`null` for objects written before versioning).
    pub version_id: String,
    /// A delete marker rather than an object version.
    pub is_delete_marker: bool,
    /// The current entry of its key.
    pub is_latest: bool,
    /// Size in bytes (0 for delete markers).
    pub size: u64,
    /// ETag, quotes included.
    pub etag: Option<String>,
    /// Last-modified as listed (ISO 8601).
    pub last_modified: Option<String>,
    /// Storage class as listed.
    pub storage_class: Option<String>,
    /// Checksum algorithm as listed (`CRC32`, `SHA256`, ...), when the server lists one.
    pub checksum_algorithm: Option<String>,
}

/// One object (or one version of it) in a bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRef {
    /// Bucket name.
    pub bucket: String,
    /// Key, byte-exact.
    pub key: String,
    /// Version id; None for the current version.
    pub version_id: Option<String>,
    /// Read only while the object's ETag is this one (quotes included): `If-Match` on
    /// GetObject and HeadObject, `x-amz-copy-source-if-match` on CopyObject and
    /// UploadPartCopy. A read of a changed object then fails with 412.
    pub if_match: Option<String>,
}

impl ObjectRef {
    /// The current version of `key` (a destination to write, or a source read unversioned).
    pub fn key(bucket: &str, key: &str) -> ObjectRef {
        ObjectRef {
            bucket: bucket.to_string(),
            key: key.to_string(),
            version_id: None,
            if_match: None,
        }
    }

    /// One version of `key`.
    pub fn version(bucket: &str, key: &str, version_id: &str) -> ObjectRef {
        ObjectRef {
            bucket: bucket.to_string(),
            key: key.to_string(),
            version_id: Some(version_id.to_string()),
            if_match: None,
        }
    }

    /// A listed source version to read right after its listing (the selection's HEADs). A
    /// `null` version that is its key's current version is read without a version id (some
    /// servers reject `versionId=null` in a bucket that never had versioning); any other is
    /// named. A copy reads with [`ObjectRef::pinned`] instead.
    pub fn listed(bucket: &str, key: &str, version_id: &str, is_latest: bool) -> ObjectRef {
        if version_id == "null" && is_latest {
            ObjectRef::key(bucket, key)
        } else {
            ObjectRef::version(bucket, key, version_id)
        }
    }

    /// A listed source version to copy, maybe long after its listing. A version with an id
    /// is immutable and named by it. A `null` version is not: an overwrite keeps the id
    /// `null` with other bytes (an unversioned or versioning-suspended bucket), and a newer
    /// version or delete marker may hide it (a versioned bucket). So a `null` version is
    /// named `versionId=null` where the bucket has (or had) versioning (`null_by_id`), and
    /// every read of it is pinned to the listed ETag: a changed object answers 412, never
    /// other bytes.
    pub fn pinned(
        bucket: &str,
        key: &str,
        version_id: &str,
        etag: Option<&str>,
        null_by_id: bool,
    ) -> ObjectRef {
        if version_id != "null" {
            return ObjectRef::version(bucket, key, version_id);
        }
        let mut r = if null_by_id {
            ObjectRef::version(bucket, key, version_id)
        } else {
            ObjectRef::key(bucket, key)
        };
        r.if_match = etag.filter(|e| !e.is_empty()).map(str::to_string);
        r
    }
}

/// A checksum algorithm S3 supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChecksumAlgorithm {
    /// CRC-32.
    Crc32,
    /// CRC-32C.
    Crc32c,
    /// CRC-64/NVME.
    Crc64Nvme,
    /// SHA-1.
    Sha1,
    /// SHA-256.
    Sha256,
}

impl ChecksumAlgorithm {
    /// Every algorithm, in the order responses are read.
    pub const ALL: [ChecksumAlgorithm; 5] = [
        ChecksumAlgorithm::Crc32,
        ChecksumAlgorithm::Crc32c,
        ChecksumAlgorithm::Crc64Nvme,
        ChecksumAlgorithm::Sha1,
        ChecksumAlgorithm::Sha256,
    ];

    /// S3's name (`CRC32`, `CRC32C`, `CRC64NVME`, `SHA1`, `SHA256`).
    pub fn as_str(self) -> &'static str {
        match self {
            ChecksumAlgorithm::Crc32 => "CRC32",
            ChecksumAlgorithm::Crc32c => "CRC32C",
            ChecksumAlgorithm::Crc64Nvme => "CRC64NVME",
            ChecksumAlgorithm::Sha1 => "SHA1",
            ChecksumAlgorithm::Sha256 => "SHA256",
        }
    }

    /// Parses S3's name, case-insensitively.
    pub fn parse(s: &str) -> Option<ChecksumAlgorithm> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(s))
    }
}

/// A checksum as S3 reports it: the algorithm, the base64 value (`…-N` when composite over N
/// parts) and whether it covers the whole object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checksum {
    /// The algorithm.
    pub algorithm: ChecksumAlgorithm,
    /// The value as S3 sends it.
    pub value: String,
    /// `FULL_OBJECT` (true) or `COMPOSITE`/unknown (false).
    pub full_object: bool,
}

impl Checksum {
    /// Whether the value is composite (a checksum of part checksums).
    pub fn is_composite(&self) -> bool {
        self.value.contains('-')
    }

    /// The first checksum present among `values` (given in [`ChecksumAlgorithm::ALL`] order).
    pub fn first_of(values: [Option<&str>; 5], full_object: bool) -> Option<Checksum> {
        ChecksumAlgorithm::ALL
            .into_iter()
            .zip(values)
            .find_map(|(algorithm, v)| {
                v.map(|v| Checksum {
                    algorithm,
                    value: v.to_string(),
                    full_object,
                })
            })
    }
}

/// Server-side encryption of an object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encryption {
    /// SSE-S3 (`AES256`).
    SseS3,
    /// SSE-KMS with an optional key id.
    SseKms(Option<String>),
    /// DSSE-KMS with an optional key id.
    DsseKms(Option<String>),
    /// SSE-C: the object cannot be read without the customer's key.
    SseC,
}

impl Encryption {
    /// Whether an object with this encryption has an MD5 ETag (SSE-S3 or none: yes; KMS, SSE-C: no).
    pub fn keeps_md5_etag(enc: Option<&Encryption>) -> bool {
        matches!(enc, None | Some(Encryption::SseS3))
    }
}

/// Object lock settings of a version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectLock {
    /// `GOVERNANCE` or `COMPLIANCE`.
    pub mode: Option<String>,
    /// Retain-until date (unix seconds).
    pub retain_until: Option<i64>,
    /// Legal hold on.
    pub legal_hold: bool,
}

impl ObjectLock {
    /// Whether there is anything to set.
    pub fn is_empty(&self) -> bool {
        self.mode.is_none() && self.retain_until.is_none() && !self.legal_hold
    }
}

/// What a HEAD of one version says, and what a copy carries over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectHead {
    /// The version id the server answered with.
    pub version_id: Option<String>,
    /// The version is a delete marker.
    pub delete_marker: bool,
    /// Size in bytes (of the part, for a HEAD with a part number).
    pub size: u64,
    /// ETag, quotes included.
    pub etag: Option<String>,
    /// Content headers: Content-Type, Cache-Control, Content-Disposition, Content-Encoding,
    /// Content-Language, Expires (as sent).
    pub content: ContentHeaders,
    /// User metadata.
    pub metadata: std::collections::BTreeMap<String, String>,
    /// Storage class (None is STANDARD).
    pub storage_class: Option<String>,
    /// Encryption.
    pub encryption: Option<Encryption>,
    /// Object lock settings.
    pub lock: ObjectLock,
    /// Checksum, when the server keeps one.
    pub checksum: Option<Checksum>,
    /// Number of tags.
    pub tag_count: u32,
    /// Parts count (for a HEAD with a part number of a multipart object).
    pub parts_count: Option<u64>,
    /// An archived object (GLACIER, DEEP_ARCHIVE) not restored.
    pub archived: bool,
    /// Replication status header (`x-amz-replication-status`), when present.
    pub replication_status: Option<String>,
    /// `x-amz-website-redirect-location`, when set.
    pub website_redirect: Option<String>,
}

/// The standard content headers of an object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContentHeaders {
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
    /// Expires, as an HTTP date.
    pub expires: Option<String>,
}

/// What a write (CopyObject, PutObject, CreateMultipartUpload) sets on the new version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteAttrs {
    /// Replace content headers and metadata with these (CopyObject: MetadataDirective
    /// REPLACE). When false, a CopyObject copies them from the source (COPY).
    pub replace_metadata: bool,
    /// Content headers.
    pub content: ContentHeaders,
    /// User metadata (the stamp included, when on).
    pub metadata: std::collections::BTreeMap<String, String>,
    /// Tags, URL-encoded (`k=v&k2=v2`); CopyObject copies the source's when None.
    pub tagging: Option<String>,
    /// Storage class.
    pub storage_class: Option<String>,
    /// Encryption.
    pub encryption: Option<Encryption>,
    /// Canned ACL.
    pub acl: Option<String>,
    /// Checksum algorithm the destination computes.
    pub checksum_algorithm: Option<ChecksumAlgorithm>,
    /// Whole-object checksum for a multipart upload.
    pub full_object_checksum: bool,
    /// Object lock settings.
    pub lock: ObjectLock,
    /// Content-MD5 of the body (PutObject).
    pub content_md5: Option<String>,
    /// `x-amz-website-redirect-location` (sent in every copy mode: S3 does not carry it
    /// over by itself).
    pub website_redirect: Option<String>,
}

/// The answer to a write that created a destination version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteResult {
    /// The new version's id, when the server says (RGW's CopyObject does not).
    pub version_id: Option<String>,
    /// The new version's ETag.
    pub etag: Option<String>,
    /// The new version's checksum, when the answer carries one.
    pub checksum: Option<Checksum>,
}

/// One uploaded part.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartResult {
    /// Part number (1-based).
    pub number: i32,
    /// The part's ETag.
    pub etag: Option<String>,
    /// The part's checksum.
    pub checksum: Option<Checksum>,
}

/// What a bucket probe learns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BucketFacts {
    /// The bucket's region (HeadBucket's `x-amz-bucket-region`), when the server says.
    pub region: Option<String>,
    /// Versioning is enabled.
    pub versioned: bool,
    /// Versioning is suspended (it was enabled once: `null` versions are named by id).
    pub suspended: bool,
    /// Object lock is enabled on the bucket.
    pub object_lock: bool,
    /// The server is Ceph RGW: its HeadBucket answer has `X-RGW-*` headers (for the cost
    /// estimate's server profile).
    pub rgw: bool,
}

/// One page of a versions listing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VersionPage {
    /// Versions and delete markers, each key's history newest first.
    pub entries: Vec<VersionEntry>,
    /// More pages follow.
    pub truncated: bool,
    /// Key marker of the next page.
    pub next_key_marker: Option<String>,
    /// Version id marker of the next page.
    pub next_version_marker: Option<String>,
}

/// Where a listing page starts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListFrom {
    /// Bucket.
    pub bucket: String,
    /// Only keys under this prefix.
    pub prefix: String,
    /// Start after this key (and version) marker.
    pub key_marker: Option<String>,
    /// Version id marker.
    pub version_marker: Option<String>,
    /// Entries per page (1..=1000).
    pub max_keys: i32,
}

/// Keeps a key's text readable in one line of output.
pub fn show_key(key: &str) -> Cow<'_, str> {
    if key.chars().any(|c| c.is_control()) || key.len() > 200 {
        let mut s: String = key.chars().take(200).collect::<String>();
        if key.len() > 200 {
            s.push('…');
        }
        Cow::Owned(format!("{s:?}"))
    } else {
        Cow::Borrowed(key)
    }
}

/// Bytes kept as they are when a key is encoded: unreserved characters and `/`.
const KEY_KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

/// URL-encodes a key for a CSV manifest or report: every byte but `A-Z a-z 0-9 - _ . ~ /` as
/// `%XX` (a space is `%20`, a `+` is `%2B`), so decoders that read `+` as a space and those
/// that do not both get the key back.
///
/// ```
/// use s3_backfill::s3::types::{decode_key, encode_key};
/// assert_eq!(encode_key("a b+c/é"), "a%20b%2Bc/%C3%A9");
/// assert_eq!(decode_key(&encode_key("a b+c/é")).unwrap(), "a b+c/é");
/// ```
pub fn encode_key(key: &str) -> String {
    percent_encoding::utf8_percent_encode(key, KEY_KEEP).to_string()
}

/// Decodes a URL-encoded key as S3 writes them in inventories and Batch Operations manifests:
/// `+` is a space, `%XX` a byte; the result must be UTF-8. A `%` not followed by two hex
/// digits is an error (S3 would not find such a key either).
pub fn decode_key(encoded: &str) -> Result<String, String> {
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad URL encoding at byte {} of {encoded:?}", i + 1))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("{encoded:?} does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_the_encoding() {
        for key in [
            "plain/key.txt",
            "with space",
            "a+b",
            "100%",
            "quote\"comma,semi;",
            "ünïcødé/日本語",
            "line\nbreak",
            "~tilde_dash-dot.",
        ] {
            let enc = encode_key(key);
            assert!(
                !enc.contains([' ', '+', ',', '"', '\n']),
                "{key:?} -> {enc}"
            );
            assert_eq!(decode_key(&enc).as_deref(), Ok(key));
        }
    }

    #[test]
    fn decoding_reads_plus_as_space_and_refuses_bad_escapes() {
        assert_eq!(
            decode_key("my+key%2Bplus%20x").as_deref(),
            Ok("my key+plus x")
        );
        assert_eq!(decode_key("caf%C3%A9").as_deref(), Ok("café"));
        assert!(decode_key("bad%2").is_err());
        assert!(decode_key("bad%zz").is_err());
        assert!(decode_key("%FF").is_err(), "not UTF-8");
    }
}
