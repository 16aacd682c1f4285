//! s3::client: the seam. [`S3Client`] names every S3 operation the project uses, in the
//! project's own records; [`SdkClient`] implements it with aws-sdk-s3 (one per side, built
//! from the standard AWS chain by [`build`]), and `s3::fake` implements it in memory for
//! in-process tests. Requests are counted per operation.
//!
//! Server quirks handled here, once: RGW's 411 for bodiless PUTs (UploadPartCopy), moto's
//! GetBucketVersioning root element, servers without tagging (no tags, said once), checksum
//! headers only when the side allows them (`when-required`), per-attempt timeouts.
//!
//! With a [`Bandwidth`] limiter ([`SdkClient::limited_by`]), GET bodies are read at its
//! `Down` rate chunk by chunk, each in its turn, and PUT and UploadPart bodies wait for their
//! turn in its `Up` line before they are sent; time spent waiting on it is not counted
//! against the attempt's timeout.
//!
//! May call: the AWS SDK; nothing else of the crate.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::operation::head_object::HeadObjectOutput;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumMode, ChecksumType, CompletedMultipartUpload, CompletedPart, EncodingType,
    MetadataDirective, ObjectCannedAcl, ObjectLockEnabled, ObjectLockLegalHoldStatus,
    ObjectLockMode, ServerSideEncryption, StorageClass, TaggingDirective,
};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::{
    AfterDeserializationInterceptorContextRef, BeforeTransmitInterceptorContextMut,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use aws_smithy_types::date_time::Format;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use aws_smithy_types::DateTime;
use bytes::Bytes;

use super::bandwidth::{Bandwidth, Direction, Place};
use super::error::{classify, ErrorClass, S3Error};
use super::listing_body::TakeListing;
use super::side::{ChecksumCalculation, SideConfig};
use super::types::{
    BucketFacts, Checksum, ChecksumAlgorithm, ContentHeaders, Encryption, ListFrom, ObjectHead,
    ObjectLock, ObjectRef, PartResult, Side, VersionPage, WriteAttrs, WriteResult,
};
use super::xml::parse_page;

/// The S3 operations the project uses. Each returns a classified [`S3Error`]; none retries
/// (the caller's [`super::retry::Retrier`] does).
pub trait S3Client: Send + Sync + 'static {
    /// Which side this client serves (named in its errors).
    fn side(&self) -> Side;
    /// Requests sent so far, per operation.
    fn requests(&self) -> &RequestCounts;
    /// One page of `ListObjectVersions`, each key's history newest first.
    fn list_versions(
        &self,
        from: &ListFrom,
    ) -> impl Future<Output = Result<VersionPage, S3Error>> + Send;
    /// HEAD of one version (of one part of it, with `part`).
    fn head_object(
        &self,
        obj: &ObjectRef,
        part: Option<i32>,
    ) -> impl Future<Output = Result<ObjectHead, S3Error>> + Send;
    /// The bytes of one version, or of the inclusive range `(first, last)`.
    fn get_object(
        &self,
        obj: &ObjectRef,
        range: Option<(u64, u64)>,
    ) -> impl Future<Output = Result<Bytes, S3Error>> + Send;
    /// The tags of one version, URL-encoded (`k=v&k2=v2`); empty when none.
    fn get_tagging(&self, obj: &ObjectRef) -> impl Future<Output = Result<String, S3Error>> + Send;
    /// Server-side copy of `src` to `dest` (the client's credentials read the source).
    fn copy_object(
        &self,
        dest: &ObjectRef,
        src: &ObjectRef,
        attrs: &WriteAttrs,
    ) -> impl Future<Output = Result<WriteResult, S3Error>> + Send;
    /// Uploads one object in one request.
    fn put_object(
        &self,
        dest: &ObjectRef,
        body: Bytes,
        attrs: &WriteAttrs,
    ) -> impl Future<Output = Result<WriteResult, S3Error>> + Send;
    /// The body of one version (or the inclusive byte range) as a stream, with the length the
    /// answer announces: to be handed to [`S3Client::put_object_stream`] or
    /// [`S3Client::upload_part_stream`] as it arrives (a pass-through copy: the
    /// body is neither held nor copied here).
    fn get_object_stream(
        &self,
        obj: &ObjectRef,
        range: Option<(u64, u64)>,
    ) -> impl Future<Output = Result<(ByteStream, u64), S3Error>> + Send;
    /// Uploads one object in one request from a stream of `len` bytes (a GetObject's body).
    /// The attempt's time limit grows with `len` (see [`Timeouts::for_body`]).
    fn put_object_stream(
        &self,
        dest: &ObjectRef,
        body: ByteStream,
        len: u64,
        attrs: &WriteAttrs,
    ) -> impl Future<Output = Result<WriteResult, S3Error>> + Send;
    /// Deletes the current version of `dest` (a delete marker in a versioned bucket), or,
    /// when `dest.version_id` is given, that version for good.
    fn delete_object(
        &self,
        dest: &ObjectRef,
    ) -> impl Future<Output = Result<WriteResult, S3Error>> + Send;
    /// Sets the tags (URL-encoded, `k=v&k2=v2`) of one version.
    fn put_tagging(
        &self,
        obj: &ObjectRef,
        tagging: &str,
    ) -> impl Future<Output = Result<(), S3Error>> + Send;
    /// Opens a multipart upload; returns its id.
    fn create_multipart(
        &self,
        dest: &ObjectRef,
        attrs: &WriteAttrs,
    ) -> impl Future<Output = Result<String, S3Error>> + Send;
    /// Copies the inclusive byte range of `src` as part `n`.
    fn upload_part_copy(
        &self,
        dest: &ObjectRef,
        upload_id: &str,
        n: i32,
        src: &ObjectRef,
        range: (u64, u64),
    ) -> impl Future<Output = Result<PartResult, S3Error>> + Send;
    /// Uploads part `n` with its Content-MD5 (base64), or without one where the caller checks
    /// the parts' ETags (their MD5s, computed by the server) against the source's before
    /// completing.
    fn upload_part(
        &self,
        dest: &ObjectRef,
        upload_id: &str,
        n: i32,
        body: Bytes,
        md5: Option<&str>,
        algorithm: Option<ChecksumAlgorithm>,
    ) -> impl Future<Output = Result<PartResult, S3Error>> + Send;
    /// Uploads part `n` from a stream of `len` bytes (a ranged GetObject's body), without a
    /// Content-MD5: the caller checks the parts' ETags against the source's before completing.
    fn upload_part_stream(
        &self,
        dest: &ObjectRef,
        upload_id: &str,
        n: i32,
        body: ByteStream,
        len: u64,
    ) -> impl Future<Output = Result<PartResult, S3Error>> + Send;
    /// Completes a multipart upload with its parts, in order.
    fn complete_multipart(
        &self,
        dest: &ObjectRef,
        upload_id: &str,
        parts: &[PartResult],
    ) -> impl Future<Output = Result<WriteResult, S3Error>> + Send;
    /// Aborts a multipart upload (a missing upload is not an error).
    fn abort_multipart(
        &self,
        dest: &ObjectRef,
        upload_id: &str,
    ) -> impl Future<Output = Result<(), S3Error>> + Send;
    /// Open multipart uploads under `prefix`: (key, upload id).
    fn list_uploads(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<(String, String)>, S3Error>> + Send;
    /// Checks that the bucket answers; learns its region, versioning and object lock.
    fn probe_bucket(
        &self,
        bucket: &str,
    ) -> impl Future<Output = Result<BucketFacts, S3Error>> + Send;
    /// Whether object lock is enabled on the bucket: `Ok(false)` only when the server says
    /// it is not (or has no object lock at all); an error when it cannot tell (e.g. denied).
    fn object_lock_enabled(
        &self,
        bucket: &str,
    ) -> impl Future<Output = Result<bool, S3Error>> + Send {
        let probe = self.probe_bucket(bucket);
        async move { probe.await.map(|f| f.object_lock) }
    }
    /// Asks for a temporary copy of an archived version (GLACIER, DEEP_ARCHIVE), kept `days`
    /// days, at `tier` (`Bulk`, `Standard`, `Expedited`). A restore already under way is
    /// [`Restore::InProgress`], not an error; a HEAD tells when it is done.
    fn restore_object(
        &self,
        obj: &ObjectRef,
        days: u32,
        tier: &str,
    ) -> impl Future<Output = Result<Restore, S3Error>> + Send;
}

/// The answer to a `RestoreObject`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restore {
    /// The restore was asked for (202), or the version was restored already (200: its
    /// restore period is renewed).
    Requested,
    /// A restore of the version is already under way (409 `RestoreAlreadyInProgress`).
    InProgress,
}

/// The operations counted, in the order `status` shows them.
pub const OPERATIONS: [&str; 18] = [
    "ListObjectVersions",
    "HeadObject",
    "GetObject",
    "GetObjectTagging",
    "PutObjectTagging",
    "CopyObject",
    "PutObject",
    "DeleteObject",
    "CreateMultipartUpload",
    "UploadPartCopy",
    "UploadPart",
    "CompleteMultipartUpload",
    "AbortMultipartUpload",
    "ListMultipartUploads",
    "HeadBucket",
    "GetBucketVersioning",
    "GetObjectLockConfiguration",
    "RestoreObject",
];

/// Requests sent, per operation (every attempt counts), and the time the successful
/// listings took (microseconds, count) for the cost estimate's latency.
#[derive(Debug, Default)]
pub struct RequestCounts(
    [AtomicU64; OPERATIONS.len()],
    [AtomicU64; 2],
    super::outcomes::Outcomes,
);

impl RequestCounts {
    /// Counts one request of `op` (an entry of [`OPERATIONS`]; others are not counted).
    pub fn count(&self, op: &str) {
        if let Some(i) = OPERATIONS.iter().position(|o| *o == op) {
            self.0[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counts so far, by operation, leaving out zeros.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        OPERATIONS
            .iter()
            .zip(&self.0)
            .map(|(o, n)| (*o, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// The total of all operations.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }

    /// The failed attempts and the retries among these requests (see
    /// [`super::outcomes`]).
    pub fn outcomes(&self) -> &super::outcomes::Outcomes {
        &self.2
    }

    /// Counts the time one successful listing request took.
    pub fn time_listing(&self, took: Duration) {
        self.1[0].fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.1[1].fetch_add(1, Ordering::Relaxed);
    }

    /// The mean time of the successful listings, and how many there were (None: none).
    pub fn mean_listing(&self) -> Option<(Duration, u64)> {
        let n = self.1[1].load(Ordering::Relaxed);
        let micros = self.1[0].load(Ordering::Relaxed);
        (n > 0).then(|| (Duration::from_micros(micros / n), n))
    }
}

/// Time limits of one request attempt.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Connecting.
    pub connect: Duration,
    /// One attempt, from sending to the whole answer (bodies of GETs included).
    pub attempt: Duration,
}

/// `body` (of `len` bytes) paced by its place in one direction's line: each chunk goes on
/// once the rate has paid the bytes so far. A body the SDK sends as it is read (a
/// pass-through upload), so the limit holds per chunk, not per request.
fn paced(body: ByteStream, len: u64, place: Place) -> ByteStream {
    // The SDK may poll a body again after its end: fused, it says "no more" again.
    let chunks = futures::StreamExt::fuse(futures::stream::unfold(
        (body, place, 0u64),
        |(mut body, mut place, read)| async move {
            match body.next().await? {
                Ok(chunk) => {
                    let read = read + chunk.len() as u64;
                    place.wait(read).await;
                    Some((Ok(chunk), (body, place, read)))
                }
                Err(e) => Some((Err(BoxError::from(e)), (body, place, read))),
            }
        },
    ));
    ByteStream::from_body_1_x(PacedBody {
        chunks: Mutex::new(Box::pin(chunks)),
        len,
    })
}

/// The chunks of a [`PacedBody`].
type Chunks = std::pin::Pin<Box<dyn futures::Stream<Item = Result<Bytes, BoxError>> + Send>>;

/// The body [`paced`] hands to the SDK (which wants it `Sync`: the stream sits in a mutex
/// that polling, through `&mut`, never locks).
struct PacedBody {
    chunks: Mutex<Chunks>,
    len: u64,
}

impl http_body::Body for PacedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let chunks = self
            .get_mut()
            .chunks
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        chunks
            .as_mut()
            .poll_next(cx)
            .map(|c| c.map(|r| r.map(http_body::Frame::data)))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.len)
    }
}

/// A passed-through upload's body goes at the pace of its GET (and of `--max-bandwidth`): the
/// SDK's stalled-stream check (an upload at 0 B/s for 5 s fails) would fail it whenever the
/// source pauses or the limit makes it wait its turn. Its attempt's time limit
/// ([`Timeouts::for_body`]) bounds it instead.
fn no_stall_check() -> aws_sdk_s3::config::StalledStreamProtectionConfig {
    aws_sdk_s3::config::StalledStreamProtectionConfig::disabled()
}

/// The slowest rate a streamed body may go at before its attempt counts as stalled.
const SLOWEST_BODY_RATE: u64 = 256 * 1024;

impl Timeouts {
    /// The time limit of an attempt that sends `len` bytes of a streamed body: the attempt's
    /// limit plus the body at [`SLOWEST_BODY_RATE`] (a 5 GiB body gets about 6 h; a fixed
    /// limit would fail every large body on a slow or limited link).
    pub fn for_body(&self, len: u64) -> Duration {
        self.attempt + Duration::from_secs(len / SLOWEST_BODY_RATE)
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            attempt: Duration::from_secs(120),
        }
    }
}

/// [`S3Client`] over aws-sdk-s3.
#[derive(Clone, Debug)]
pub struct SdkClient {
    inner: aws_sdk_s3::Client,
    side: Side,
    checksums: ChecksumCalculation,
    timeouts: Timeouts,
    counts: Arc<RequestCounts>,
    no_tagging: Arc<AtomicBool>,
    /// The run's bandwidth limit of bodies, shared by every client of the run.
    bandwidth: Option<Arc<Bandwidth>>,
}

/// Builds the client of one side from the standard AWS chain plus the side's options, and
/// returns the endpoint URL it really uses (the side's option, else one from the
/// environment or the profile's `endpoint_url`, else None: the provider's default).
///
/// The SDK's own retries are off: [`super::retry::Retrier`] is the only retry layer.
pub async fn build(
    side: Side,
    cfg: &SideConfig,
    timeouts: Timeouts,
) -> (SdkClient, Option<String>) {
    let sdk = sdk_config(cfg).await;
    let endpoint = effective_endpoint(&sdk);
    let mut b = aws_sdk_s3::config::Builder::from(&sdk)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(timeouts.connect)
                .operation_attempt_timeout(timeouts.attempt)
                .build(),
        )
        .force_path_style(cfg.path_style)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .request_checksum_calculation(match cfg.checksum_calculation {
            ChecksumCalculation::WhenSupported => RequestChecksumCalculation::WhenSupported,
            ChecksumCalculation::WhenRequired => RequestChecksumCalculation::WhenRequired,
        })
        .interceptor(ZeroLengthBody)
        .interceptor(LeaseGate);
    if sdk.region().is_none() {
        b = b.region(Region::new("us-east-1"));
    }
    let client = SdkClient {
        inner: aws_sdk_s3::Client::from_conf(b.build()),
        side,
        checksums: cfg.checksum_calculation,
        timeouts,
        counts: Arc::new(RequestCounts::default()),
        no_tagging: Arc::new(AtomicBool::new(false)),
        bandwidth: None,
    };
    (client, endpoint)
}

/// The AWS configuration of one side: the standard chain (credentials, region, endpoint
/// from the environment and the profile) with the side's profile, region and endpoint
/// over it. Other services' clients of the side (`follow`'s SQS queue) start from it too.
pub async fn sdk_config(cfg: &SideConfig) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(profile) = &cfg.profile {
        loader = loader.profile_name(profile);
    }
    if let Some(region) = &cfg.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(endpoint) = &cfg.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}

/// The endpoint URL the SDK will use: the same precedence as
/// `aws_sdk_s3::config::Builder::from(&SdkConfig)`.
fn effective_endpoint(sdk: &aws_config::SdkConfig) -> Option<String> {
    if sdk.get_origin("endpoint_url").is_client_config() {
        return sdk.endpoint_url().map(str::to_string);
    }
    sdk.service_config()
        .and_then(|c| {
            c.load_config(
                aws_types::service_config::ServiceConfigKey::builder()
                    .service_id("S3")
                    .env("AWS_ENDPOINT_URL")
                    .profile("endpoint_url")
                    .build()
                    .expect("every field is set"),
            )
        })
        .or_else(|| sdk.endpoint_url().map(str::to_string))
}

/// Adds `Content-Length: 0` to bodiless PUT and POST requests that lack it: RGW answers
/// them (e.g. UploadPartCopy) with 411 MissingContentLength.
#[derive(Debug)]
struct ZeroLengthBody;

impl Intercept for ZeroLengthBody {
    fn name(&self) -> &'static str {
        "ZeroLengthBody"
    }

    fn modify_before_transmit(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let req = context.request_mut();
        let bodiless = req.body().bytes().is_some_and(|b| b.is_empty());
        if (req.method() == "PUT" || req.method() == "POST")
            && bodiless
            && req.headers().get("content-length").is_none()
            && req.headers().get("transfer-encoding").is_none()
        {
            req.headers_mut().insert("content-length", "0");
        }
        Ok(())
    }
}

/// Asks the lease gate (`s3::gate`) once more right before the request goes out, after
/// signing: a process paused between the retry loop's check and the send (SIGSTOP, a
/// frozen VM) sends nothing once its leases may be gone.
#[derive(Debug)]
struct LeaseGate;

impl Intercept for LeaseGate {
    fn name(&self) -> &'static str {
        "LeaseGate"
    }

    fn read_before_transmit(
        &self,
        _context: &aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        super::gate::check(super::Side::Dest).map_err(|e| e.message.into())
    }
}

/// Keeps the raw body of the last response: the interleaving of versions and delete markers
/// in `ListObjectVersions`, and `GetBucketVersioning` bodies with another root element (moto).
#[derive(Clone, Debug, Default)]
struct RawBody(Arc<Mutex<Option<Bytes>>>);

impl RawBody {
    fn take(&self) -> Option<Bytes> {
        self.0.lock().expect("raw body lock").take()
    }
}

impl Intercept for RawBody {
    fn name(&self) -> &'static str {
        "RawBody"
    }

    fn read_after_deserialization(
        &self,
        context: &AfterDeserializationInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let body = context
            .response()
            .body()
            .bytes()
            .map(Bytes::copy_from_slice);
        *self.0.lock().expect("raw body lock") = body;
        Ok(())
    }
}

/// Whether an answer came from Ceph RGW: it has `X-RGW-Object-Count` (RGW's HeadBucket).
#[derive(Clone, Debug, Default)]
struct RgwHeaders(Arc<AtomicBool>);

impl Intercept for RgwHeaders {
    fn name(&self) -> &'static str {
        "RgwHeaders"
    }

    fn read_after_deserialization(
        &self,
        context: &AfterDeserializationInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let rgw = context
            .response()
            .headers()
            .get("x-rgw-object-count")
            .is_some();
        self.0.store(rgw, Ordering::Relaxed);
        Ok(())
    }
}

fn http_date(s: &Option<String>) -> Option<DateTime> {
    s.as_deref()
        .and_then(|s| DateTime::from_str(s, Format::HttpDate).ok())
}

fn sse_headers(e: &Option<Encryption>) -> (Option<ServerSideEncryption>, Option<String>) {
    match e {
        Some(Encryption::SseS3) => (Some(ServerSideEncryption::Aes256), None),
        Some(Encryption::SseKms(k)) => (Some(ServerSideEncryption::AwsKms), k.clone()),
        Some(Encryption::DsseKms(k)) => (Some(ServerSideEncryption::AwsKmsDsse), k.clone()),
        // SSE-C objects are refused before any write.
        Some(Encryption::SseC) | None => (None, None),
    }
}

fn sdk_algorithm(a: ChecksumAlgorithm) -> aws_sdk_s3::types::ChecksumAlgorithm {
    use aws_sdk_s3::types::ChecksumAlgorithm as A;
    match a {
        ChecksumAlgorithm::Crc32 => A::Crc32,
        ChecksumAlgorithm::Crc32c => A::Crc32C,
        ChecksumAlgorithm::Crc64Nvme => A::Crc64Nvme,
        ChecksumAlgorithm::Sha1 => A::Sha1,
        ChecksumAlgorithm::Sha256 => A::Sha256,
    }
}

fn lock_date(secs: Option<i64>) -> Option<DateTime> {
    secs.map(DateTime::from_secs)
}

fn metadata_map(m: &BTreeMap<String, String>) -> Option<HashMap<String, String>> {
    (!m.is_empty()).then(|| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// The five checksum fields of an SDK answer (or of an optional part of one, with `in`),
/// in [`ChecksumAlgorithm::ALL`] order.
macro_rules! checksum_fields {
    (in $o:expr) => {
        [
            $o.and_then(|r| r.checksum_crc32()),
            $o.and_then(|r| r.checksum_crc32_c()),
            $o.and_then(|r| r.checksum_crc64_nvme()),
            $o.and_then(|r| r.checksum_sha1()),
            $o.and_then(|r| r.checksum_sha256()),
        ]
    };
    ($o:expr) => {
        [
            $o.checksum_crc32(),
            $o.checksum_crc32_c(),
            $o.checksum_crc64_nvme(),
            $o.checksum_sha1(),
            $o.checksum_sha256(),
        ]
    };
}

/// Sets what a new destination version carries (content headers, metadata, tags, storage
/// class, encryption, ACL, checksum algorithm, object lock) on a write request builder.
macro_rules! with_attrs {
    ($req:expr, $client:expr, $a:expr) => {{
        let (sse, kms) = sse_headers(&$a.encryption);
        $req.set_content_type($a.content.content_type.clone())
            .set_cache_control($a.content.cache_control.clone())
            .set_content_disposition($a.content.content_disposition.clone())
            .set_content_encoding($a.content.content_encoding.clone())
            .set_content_language($a.content.content_language.clone())
            .set_expires(http_date(&$a.content.expires))
            .set_website_redirect_location($a.website_redirect.clone())
            .set_metadata(metadata_map(&$a.metadata))
            .set_tagging($a.tagging.clone().filter(|t| !t.is_empty()))
            .set_storage_class($a.storage_class.as_deref().map(StorageClass::from))
            .set_server_side_encryption(sse)
            .set_ssekms_key_id(kms)
            .set_acl($a.acl.as_deref().map(ObjectCannedAcl::from))
            .set_checksum_algorithm($client.algorithm($a.checksum_algorithm))
            .set_object_lock_mode($a.lock.mode.as_deref().map(ObjectLockMode::from))
            .set_object_lock_retain_until_date(lock_date($a.lock.retain_until))
            .set_object_lock_legal_hold_status(
                $a.lock.legal_hold.then_some(ObjectLockLegalHoldStatus::On),
            )
    }};
}

// Long on purpose: one field per response header of HeadObject.
fn head_record(h: &HeadObjectOutput) -> ObjectHead {
    let full = h.checksum_type() == Some(&ChecksumType::FullObject);
    let checksum = Checksum::first_of(checksum_fields!(h), full);
    let storage_class = h.storage_class().map(|c| c.as_str().to_string());
    let restored = h
        .restore()
        .is_some_and(|r| r.contains("ongoing-request=\"false\""));
    let archived = (matches!(storage_class.as_deref(), Some("GLACIER" | "DEEP_ARCHIVE"))
        && !restored)
        || h.archive_status().is_some();
    let encryption = if h.sse_customer_algorithm().is_some() {
        Some(Encryption::SseC)
    } else {
        match h.server_side_encryption() {
            Some(ServerSideEncryption::Aes256) => Some(Encryption::SseS3),
            Some(ServerSideEncryption::AwsKms) => {
                Some(Encryption::SseKms(h.ssekms_key_id().map(str::to_string)))
            }
            Some(ServerSideEncryption::AwsKmsDsse) => {
                Some(Encryption::DsseKms(h.ssekms_key_id().map(str::to_string)))
            }
            _ => None,
        }
    };
    ObjectHead {
        version_id: h.version_id().map(str::to_string),
        delete_marker: h.delete_marker() == Some(true),
        size: h.content_length().unwrap_or(0).max(0) as u64,
        etag: h.e_tag().map(str::to_string),
        content: ContentHeaders {
            content_type: h.content_type().map(str::to_string),
            cache_control: h.cache_control().map(str::to_string),
            content_disposition: h.content_disposition().map(str::to_string),
            content_encoding: h.content_encoding().map(str::to_string),
            content_language: h.content_language().map(str::to_string),
            expires: h.expires_string().map(str::to_string),
        },
        metadata: h
            .metadata()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default(),
        storage_class,
        encryption,
        lock: ObjectLock {
            mode: h.object_lock_mode().map(|m| m.as_str().to_string()),
            retain_until: h.object_lock_retain_until_date().map(|d| d.secs()),
            legal_hold: h.object_lock_legal_hold_status() == Some(&ObjectLockLegalHoldStatus::On),
        },
        checksum,
        tag_count: h.tag_count().unwrap_or(0).max(0) as u32,
        parts_count: h.parts_count().map(|n| n.max(0) as u64),
        archived,
        replication_status: h.replication_status().map(|s| s.as_str().to_string()),
        website_redirect: h.website_redirect_location().map(str::to_string),
    }
}

/// URL-encodes `bucket/key?versionId=v` for `x-amz-copy-source` (everything but unreserved
/// characters and '/').
///
/// ```
/// use s3_backfill::s3::{copy_source, ObjectRef};
/// let src = ObjectRef::version("b", "a b/c+d%?#é", "null");
/// assert_eq!(copy_source(&src), "b/a%20b/c%2Bd%25%3F%23%C3%A9?versionId=null");
/// ```
pub fn copy_source(src: &ObjectRef) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~')
        .remove(b'/');
    let key = percent_encoding::utf8_percent_encode(&src.key, SET);
    match &src.version_id {
        Some(v) => format!(
            "{}/{key}?versionId={}",
            src.bucket,
            percent_encoding::utf8_percent_encode(v, SET)
        ),
        None => format!("{}/{key}", src.bucket),
    }
}

/// The tags of a URL-encoded query string (`k=v&k2=v2`).
///
/// ```
/// use s3_backfill::s3::{parse_tagging, tagging_string};
/// let tags = vec![("a b".to_string(), "1&2".to_string())];
/// assert_eq!(parse_tagging(&tagging_string(&tags)), tags);
/// ```
pub fn parse_tagging(s: &str) -> Vec<(String, String)> {
    let decode = |x: &str| {
        percent_encoding::percent_decode_str(&x.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

/// Tags as a URL-encoded query string (`k=v&k2=v2`).
pub fn tagging_string(tags: &[(String, String)]) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    tags.iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                percent_encoding::utf8_percent_encode(k, SET),
                percent_encoding::utf8_percent_encode(v, SET)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

impl SdkClient {
    fn err<E>(
        &self,
        op: &'static str,
        reads_source: bool,
        e: aws_sdk_s3::error::SdkError<E, aws_smithy_runtime_api::http::Response>,
    ) -> S3Error
    where
        E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        classify(self.side, op, reads_source, e)
    }

    /// One PutObject of `body`; `streamed`: its length when the body is another request's
    /// answer passed through (see [`SdkClient::streamed`], [`SdkClient::streamed_err`]).
    async fn put(
        &self,
        dest: &ObjectRef,
        body: ByteStream,
        streamed: Option<u64>,
        attrs: &WriteAttrs,
    ) -> Result<WriteResult, S3Error> {
        const OP: &str = "PutObject";
        self.counts.count(OP);
        let req = self
            .inner
            .put_object()
            .bucket(&dest.bucket)
            .key(&dest.key)
            .body(body)
            .set_content_length(streamed.map(|l| l as i64))
            .set_content_md5(attrs.content_md5.clone());
        let req = with_attrs!(req, self, attrs).customize();
        let checked = attrs.content_md5.is_some();
        let config = match (checked, streamed) {
            (true, _) => Some(self.md5_checked(attrs.checksum_algorithm)),
            (false, Some(_)) => Some(aws_sdk_s3::config::Builder::default()),
            (false, None) => None,
        };
        let config = match streamed {
            Some(len) => config.map(|c| self.streamed(c, len)),
            None => config,
        };
        let req = match config {
            Some(c) => req.config_override(c),
            None => req,
        };
        let req = if checked {
            req.disable_payload_signing()
        } else {
            req
        };
        let o = req.send().await.map_err(|e| match streamed {
            Some(_) => self.streamed_err(OP, e),
            None => self.err(OP, false, e),
        })?;
        Ok(WriteResult {
            version_id: o.version_id().map(str::to_string),
            etag: o.e_tag().map(str::to_string),
            checksum: Checksum::first_of(checksum_fields!(o), false),
        })
    }

    /// `config` for an upload whose body of `len` bytes is another request's answer passed
    /// through: its attempt's time limit grows with the body ([`Timeouts::for_body`]), and
    /// the SDK's stalled-stream check is off (see [`no_stall_check`]).
    fn streamed(
        &self,
        config: aws_sdk_s3::config::Builder,
        len: u64,
    ) -> aws_sdk_s3::config::Builder {
        config
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(self.timeouts.connect)
                    .operation_attempt_timeout(self.timeouts.for_body(len))
                    .build(),
            )
            .stalled_stream_protection(no_stall_check())
    }

    /// The error of an upload whose body is another request's answer: when that body breaks
    /// off (a reset, a cut-short GET), the SDK calls the upload's failure the caller's (a
    /// "user" error, fatal for a body held here). It is a failed read of the source: retried.
    fn streamed_err<E>(
        &self,
        op: &'static str,
        e: aws_sdk_s3::error::SdkError<E, aws_smithy_runtime_api::http::Response>,
    ) -> S3Error
    where
        E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let body_broke =
            matches!(&e, aws_sdk_s3::error::SdkError::DispatchFailure(d) if d.is_user());
        let mut err = self.err(op, false, e);
        if body_broke && err.class == ErrorClass::Fatal {
            err.class = ErrorClass::Retryable;
            err.message = format!("the source's body broke off: {}", err.message);
        }
        err
    }

    /// A checksum algorithm header, unless this side computes checksums only when required.
    fn algorithm(
        &self,
        a: Option<ChecksumAlgorithm>,
    ) -> Option<aws_sdk_s3::types::ChecksumAlgorithm> {
        match self.checksums {
            ChecksumCalculation::WhenSupported => a.map(sdk_algorithm),
            ChecksumCalculation::WhenRequired => None,
        }
    }

    /// The per-request settings of an upload whose body the caller checks with a Content-MD5
    /// (which SigV4 signs, and the server compares with the bytes it gets): no payload
    /// signing (a SHA-256 pass over the body), and no checksum of the SDK's own (its CRC32
    /// default, another pass) unless `kept` asks for one to keep at the destination. One
    /// hashing pass per byte, the caller's MD5.
    fn md5_checked(&self, kept: Option<ChecksumAlgorithm>) -> aws_sdk_s3::config::Builder {
        let b = aws_sdk_s3::config::Builder::default();
        if self.algorithm(kept).is_some() {
            return b;
        }
        b.request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
    }

    /// The bucket's versioning status as the server says it (`Enabled`, `Suspended`; None:
    /// never enabled).
    async fn bucket_versioning(&self, bucket: &str) -> Result<Option<String>, S3Error> {
        self.counts.count("GetBucketVersioning");
        let raw = RawBody::default();
        let status = match self
            .inner
            .get_bucket_versioning()
            .bucket(bucket)
            .customize()
            .interceptor(raw.clone())
            .send()
            .await
        {
            Ok(o) => o.status().map(|s| s.as_str().to_string()),
            Err(e) if e.raw_response().is_some_and(|r| r.status().is_success()) => {
                // moto answers with another root element: read <Status> from the raw body.
                raw.take().and_then(|b| {
                    let s = String::from_utf8_lossy(&b);
                    let start = s.find("<Status>")? + "<Status>".len();
                    let end = s[start..].find("</Status>")? + start;
                    Some(s[start..end].to_string())
                })
            }
            Err(e) => return Err(self.err("GetBucketVersioning", false, e)),
        };
        Ok(status)
    }

    async fn bucket_object_lock(&self, bucket: &str) -> bool {
        // Not counted as a job request: a probe that many servers do not implement.
        self.read_object_lock(bucket).await.unwrap_or(false)
    }

    /// `GetObjectLockConfiguration`, uncounted: no configuration (404) or an operation the
    /// server does not implement mean no object lock; any other error is returned.
    async fn read_object_lock(&self, bucket: &str) -> Result<bool, S3Error> {
        const OP: &str = "GetObjectLockConfiguration";
        match self
            .inner
            .get_object_lock_configuration()
            .bucket(bucket)
            .send()
            .await
        {
            Ok(o) => Ok(o
                .object_lock_configuration()
                .and_then(|c| c.object_lock_enabled())
                == Some(&ObjectLockEnabled::Enabled)),
            Err(e) => {
                let e = self.err(OP, false, e);
                let absent = matches!(e.status, Some(404) | Some(405) | Some(501))
                    || e.code.as_deref().is_some_and(|c| {
                        c == "ObjectLockConfigurationNotFoundError" || c == "NotImplemented"
                    });
                if absent {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }
}

fn part_record(n: i32, etag: Option<&str>, values: [Option<&str>; 5]) -> PartResult {
    PartResult {
        number: n,
        etag: etag.map(str::to_string),
        checksum: Checksum::first_of(values, false),
    }
}

impl S3Client for SdkClient {
    fn side(&self) -> Side {
        self.side
    }

    fn requests(&self) -> &RequestCounts {
        &self.counts
    }

    async fn list_versions(&self, from: &ListFrom) -> Result<VersionPage, S3Error> {
        const OP: &str = "ListObjectVersions";
        self.counts.count(OP);
        let raw = TakeListing::default();
        let started = std::time::Instant::now();
        self.inner
            .list_object_versions()
            .bucket(&from.bucket)
            .max_keys(from.max_keys)
            .encoding_type(EncodingType::Url)
            .set_prefix(Some(from.prefix.clone()).filter(|p| !p.is_empty()))
            .set_key_marker(from.key_marker.clone())
            .set_version_id_marker(from.version_marker.clone())
            .customize()
            .interceptor(raw.clone())
            .send()
            .await
            .map_err(|e| self.err(OP, false, e))?;
        self.counts.time_listing(started.elapsed());
        let body = raw.take().ok_or_else(|| {
            S3Error::other(
                self.side,
                OP,
                ErrorClass::Retryable,
                "no response body".into(),
            )
        })?;
        parse_page(&body).map_err(|m| S3Error::other(self.side, OP, ErrorClass::Retryable, m))
    }

    async fn head_object(&self, obj: &ObjectRef, part: Option<i32>) -> Result<ObjectHead, S3Error> {
        let head = |obj: &ObjectRef| {
            self.counts.count("HeadObject");
            self.inner
                .head_object()
                .bucket(&obj.bucket)
                .key(&obj.key)
                .set_version_id(obj.version_id.clone())
                .set_if_match(obj.if_match.clone())
                .checksum_mode(ChecksumMode::Enabled)
                .set_part_number(part)
                .send()
        };
        match head(obj).await {
            Ok(h) => Ok(head_record(&h)),
            Err(e) => {
                let e = self.err("HeadObject", true, e);
                // moto answers HEAD `versionId=null` with 400 in a bucket that is not
                // versioned now (GET, copies and tagging accept it): a null version pinned
                // to its ETag is HEADed by key instead (a changed object answers 412).
                let null_refused = e.status == Some(400)
                    && obj.version_id.as_deref() == Some("null")
                    && obj.if_match.is_some();
                if !null_refused {
                    return Err(e);
                }
                let by_key = ObjectRef {
                    version_id: None,
                    ..obj.clone()
                };
                let h = head(&by_key)
                    .await
                    .map_err(|e| self.err("HeadObject", true, e))?;
                let mut h = head_record(&h);
                h.version_id = h.version_id.or_else(|| Some("null".into()));
                Ok(h)
            }
        }
    }

    async fn get_object(
        &self,
        obj: &ObjectRef,
        range: Option<(u64, u64)>,
    ) -> Result<Bytes, S3Error> {
        const OP: &str = "GetObject";
        self.counts.count(OP);
        let timed_out = |what: &str| {
            S3Error::other(
                self.side,
                OP,
                ErrorClass::Retryable,
                format!("timed out {what}"),
            )
        };
        // One attempt's time limit, less the time spent waiting on the bandwidth limit.
        let started = tokio::time::Instant::now();
        let mut waited = Duration::ZERO;
        // Under a bandwidth limit a range takes its place in line first and is asked for
        // when its turn comes (no connection waits open meanwhile); a whole object takes
        // its place once its length is known.
        let mut place = None;
        if let (Some(bw), Some((a, b))) = (&self.bandwidth, range) {
            let mut p = bw.place(Direction::Down, (b + 1).saturating_sub(a));
            waited += p.wait(0).await;
            place = Some(p);
        }
        let left = |waited: Duration| {
            self.timeouts
                .attempt
                .checked_sub(started.elapsed().saturating_sub(waited))
        };
        let out = tokio::time::timeout(
            self.timeouts.attempt,
            self.inner
                .get_object()
                .bucket(&obj.bucket)
                .key(&obj.key)
                .set_version_id(obj.version_id.clone())
                .set_if_match(obj.if_match.clone())
                .set_range(range.map(|(a, b)| format!("bytes={a}-{b}")))
                .send(),
        )
        .await
        .map_err(|_| timed_out("waiting for the answer"))?
        .map_err(|e| self.err(OP, true, e))?;
        // Read into one buffer of the announced length: the body is held once (collecting
        // segments and joining them would hold it twice at the end).
        let announced = out.content_length().unwrap_or(0).clamp(0, 1 << 33) as usize;
        let mut buf = bytes::BytesMut::with_capacity(announced);
        let mut body = out.body;
        if let (Some(bw), None) = (&self.bandwidth, &place) {
            place = Some(bw.place(Direction::Down, announced as u64));
        }
        loop {
            // The SDK's attempt timeout ends with the headers: the body gets its own.
            let Some(left) = left(waited) else {
                return Err(timed_out("reading the body"));
            };
            let Some(chunk) = tokio::time::timeout(left, body.next())
                .await
                .map_err(|_| timed_out("reading the body"))?
            else {
                break;
            };
            let chunk = chunk.map_err(|e| {
                S3Error::other(
                    self.side,
                    OP,
                    ErrorClass::Retryable,
                    format!("body read failed: {e}"),
                )
            })?;
            buf.extend_from_slice(&chunk);
            if let (Some(bw), Some(p)) = (&self.bandwidth, &mut place) {
                // Paced against its place; bytes beyond what was announced queue anew.
                let read = buf.len() as u64;
                let beyond = read.saturating_sub(p.bytes().max(read - chunk.len() as u64));
                waited += p.wait(read).await;
                waited += bw.take(Direction::Down, beyond).await;
            }
        }
        Ok(buf.freeze())
    }

    async fn get_tagging(&self, obj: &ObjectRef) -> Result<String, S3Error> {
        const OP: &str = "GetObjectTagging";
        if self.no_tagging.load(Ordering::Relaxed) {
            return Ok(String::new());
        }
        self.counts.count(OP);
        match self
            .inner
            .get_object_tagging()
            .bucket(&obj.bucket)
            .key(&obj.key)
            .set_version_id(obj.version_id.clone())
            .send()
            .await
        {
            Ok(out) => {
                let tags: Vec<(String, String)> = out
                    .tag_set()
                    .iter()
                    .map(|t| (t.key().to_string(), t.value().to_string()))
                    .collect();
                Ok(tagging_string(&tags))
            }
            Err(e) => {
                // RGW 16.2 answers 200 with an empty body for an object whose tags were
                // given at CreateMultipartUpload: it has no readable tags. Only a whole,
                // empty answer says that: a 200 whose body was cut short (a lost
                // connection) is retried, never read as "no tags".
                let empty_200 = e.raw_response().is_some_and(|r| {
                    r.status().is_success()
                        && r.body().bytes().is_some_and(<[u8]>::is_empty)
                        && r.headers()
                            .get("content-length")
                            .is_none_or(|n| n.trim() == "0")
                });
                if empty_200 {
                    return Ok(String::new());
                }
                let e = self.err(OP, true, e);
                if e.status == Some(501) || e.code.as_deref() == Some("NotImplemented") {
                    if !self.no_tagging.swap(true, Ordering::Relaxed) {
                        tracing::warn!("the {} server does not implement object tagging: versions are copied without tags", self.side);
                    }
                    return Ok(String::new());
                }
                Err(e)
            }
        }
    }

    async fn copy_object(
        &self,
        dest: &ObjectRef,
        src: &ObjectRef,
        attrs: &WriteAttrs,
    ) -> Result<WriteResult, S3Error> {
        const OP: &str = "CopyObject";
        self.counts.count(OP);
        let req = self
            .inner
            .copy_object()
            .bucket(&dest.bucket)
            .key(&dest.key)
            .copy_source(copy_source(src))
            .set_copy_source_if_match(src.if_match.clone())
            .set_website_redirect_location(attrs.website_redirect.clone());
        let req = if attrs.replace_metadata {
            with_attrs!(
                req.metadata_directive(MetadataDirective::Replace),
                self,
                attrs
            )
        } else {
            let (sse, kms) = sse_headers(&attrs.encryption);
            req.metadata_directive(MetadataDirective::Copy)
                .set_storage_class(attrs.storage_class.as_deref().map(StorageClass::from))
                .set_server_side_encryption(sse)
                .set_ssekms_key_id(kms)
                .set_acl(attrs.acl.as_deref().map(ObjectCannedAcl::from))
                .set_checksum_algorithm(self.algorithm(attrs.checksum_algorithm))
                .set_object_lock_mode(attrs.lock.mode.as_deref().map(ObjectLockMode::from))
                .set_object_lock_retain_until_date(lock_date(attrs.lock.retain_until))
                .set_object_lock_legal_hold_status(
                    attrs
                        .lock
                        .legal_hold
                        .then_some(ObjectLockLegalHoldStatus::On),
                )
        };
        let req = match &attrs.tagging {
            Some(t) => req.tagging_directive(TaggingDirective::Replace).tagging(t),
            None => req.tagging_directive(TaggingDirective::Copy),
        };
        let o = req.send().await.map_err(|e| self.err(OP, true, e))?;
        let r = o.copy_object_result();
        Ok(WriteResult {
            version_id: o.version_id().map(str::to_string),
            etag: r.and_then(|r| r.e_tag()).map(str::to_string),
            checksum: Checksum::first_of(checksum_fields!(in r), false),
        })
    }

    async fn put_object(
        &self,
        dest: &ObjectRef,
        body: Bytes,
        attrs: &WriteAttrs,
    ) -> Result<WriteResult, S3Error> {
        self.wait_to_send(&body).await;
        self.put(dest, ByteStream::from(body), None, attrs).await
    }

    async fn get_object_stream(
        &self,
        obj: &ObjectRef,
        range: Option<(u64, u64)>,
    ) -> Result<(ByteStream, u64), S3Error> {
        const OP: &str = "GetObject";
        self.counts.count(OP);
        let out = self
            .inner
            .get_object()
            .bucket(&obj.bucket)
            .key(&obj.key)
            .set_version_id(obj.version_id.clone())
            .set_if_match(obj.if_match.clone())
            .set_range(range.map(|(a, b)| format!("bytes={a}-{b}")))
            .send()
            .await
            .map_err(|e| self.err(OP, true, e))?;
        let len = out.content_length().unwrap_or(0).max(0) as u64;
        Ok(match &self.bandwidth {
            // Read at the rate, chunk by chunk, as the upload takes them.
            Some(bw) => (paced(out.body, len, bw.place(Direction::Down, len)), len),
            None => (out.body, len),
        })
    }

    async fn put_object_stream(
        &self,
        dest: &ObjectRef,
        body: ByteStream,
        len: u64,
        attrs: &WriteAttrs,
    ) -> Result<WriteResult, S3Error> {
        let body = match &self.bandwidth {
            // Sent at the rate, chunk by chunk (both directions count the same bytes).
            Some(bw) => paced(body, len, bw.place(Direction::Up, len)),
            None => body,
        };
        self.put(dest, body, Some(len), attrs).await
    }

    async fn delete_object(&self, dest: &ObjectRef) -> Result<WriteResult, S3Error> {
        const OP: &str = "DeleteObject";
        self.counts.count(OP);
        let o = self
            .inner
            .delete_object()
            .bucket(&dest.bucket)
            .key(&dest.key)
            .set_version_id(dest.version_id.clone())
            .send()
            .await
            .map_err(|e| self.err(OP, false, e))?;
        Ok(WriteResult {
            version_id: o.version_id().map(str::to_string),
            ..WriteResult::default()
        })
    }

    async fn create_multipart(
        &self,
        dest: &ObjectRef,
        attrs: &WriteAttrs,
    ) -> Result<String, S3Error> {
        const OP: &str = "CreateMultipartUpload";
        self.counts.count(OP);
        let req = self
            .inner
            .create_multipart_upload()
            .bucket(&dest.bucket)
            .key(&dest.key)
            .set_checksum_type(
                (attrs.full_object_checksum && self.algorithm(attrs.checksum_algorithm).is_some())
                    .then_some(ChecksumType::FullObject),
            );
        let o = with_attrs!(req, self, attrs)
            .send()
            .await
            .map_err(|e| self.err(OP, false, e))?;
        o.upload_id().map(str::to_string).ok_or_else(|| {
            S3Error::other(
                self.side,
                OP,
                ErrorClass::Retryable,
                "the answer has no upload id".into(),
            )
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
        const OP: &str = "UploadPartCopy";
        self.counts.count(OP);
        let o = self
            .inner
            .upload_part_copy()
            .bucket(&dest.bucket)
            .key(&dest.key)
            .upload_id(upload_id)
            .part_number(n)
            .copy_source(copy_source(src))
            .set_copy_source_if_match(src.if_match.clone())
            .copy_source_range(format!("bytes={}-{}", range.0, range.1))
            .send()
            .await
            .map_err(|e| self.err(OP, true, e))?;
        let r = o.copy_part_result();
        Ok(part_record(
            n,
            r.and_then(|r| r.e_tag()),
            checksum_fields!(in r),
        ))
    }

    async fn upload_part(
        &self,
        dest: &ObjectRef,
        upload_id: &str,
        n: i32,
        body: Bytes,
        md5: Option<&str>,
        algorithm: Option<ChecksumAlgorithm>,
    ) -> Result<PartResult, S3Error> {
        const OP: &str = "UploadPart";
        self.counts.count(OP);
        self.wait_to_send(&body).await;
        let o = self
            .inner
            .upload_part()
            .bucket(&dest.bucket)
            .key(&dest.key)
            .upload_id(upload_id)
            .part_number(n)
            .set_content_md5(md5.map(str::to_string))
            .set_checksum_algorithm(self.algorithm(algorithm))
            .body(ByteStream::from(body))
            .customize()
            .config_override(self.md5_checked(algorithm))
            .disable_payload_signing()
            .send()
            .await
            .map_err(|e| self.err(OP, false, e))?;
        Ok(part_record(n, o.e_tag(), checksum_fields!(o)))
    }

    async fn upload_part_stream(
        &self,
        dest: &ObjectRef,
        upload_id: &str,
        n: i32,
        body: ByteStream,
        len: u64,
    ) -> Result<PartResult, S3Error> {
        const OP: &str = "UploadPart";
        self.counts.count(OP);
        let body = match &self.bandwidth {
            Some(bw) => paced(body, len, bw.place(Direction::Up, len)),
            None => body,
        };
        let o = self
            .inner
            .upload_part()
            .bucket(&dest.bucket)
            .key(&dest.key)
            .upload_id(upload_id)
            .part_number(n)
            .body(body)
            .content_length(len as i64)
            .customize()
            .config_override(self.streamed(self.md5_checked(None), len))
            .disable_payload_signing()
            .send()
            .await
            .map_err(|e| self.streamed_err(OP, e))?;
        Ok(part_record(n, o.e_tag(), checksum_fields!(o)))
    }

    async fn complete_multipart(
        &self,
        dest: &ObjectRef,
        upload_id: &str,
        parts: &[PartResult],
    ) -> Result<WriteResult, S3Error> {
        const OP: &str = "CompleteMultipartUpload";
        self.counts.count(OP);
        let parts: Vec<CompletedPart> = parts.iter().map(completed_part).collect();
        let o = self
            .inner
            .complete_multipart_upload()
            .bucket(&dest.bucket)
            .key(&dest.key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.err(OP, false, e))?;
        Ok(WriteResult {
            version_id: o.version_id().map(str::to_string),
            // RGW answers with an empty ETag: the caller then reads it with a HEAD.
            etag: o.e_tag().filter(|e| !e.is_empty()).map(str::to_string),
            checksum: None,
        })
    }

    async fn put_tagging(&self, obj: &ObjectRef, tagging: &str) -> Result<(), S3Error> {
        const OP: &str = "PutObjectTagging";
        self.counts.count(OP);
        let tags = parse_tagging(tagging)
            .into_iter()
            .map(|(k, v)| aws_sdk_s3::types::Tag::builder().key(k).value(v).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| S3Error::other(self.side, OP, ErrorClass::Fatal, e.to_string()))?;
        let tagging = aws_sdk_s3::types::Tagging::builder()
            .set_tag_set(Some(tags))
            .build()
            .map_err(|e| S3Error::other(self.side, OP, ErrorClass::Fatal, e.to_string()))?;
        self.inner
            .put_object_tagging()
            .bucket(&obj.bucket)
            .key(&obj.key)
            .set_version_id(obj.version_id.clone())
            .tagging(tagging)
            .send()
            .await
            .map_err(|e| self.err(OP, false, e))?;
        Ok(())
    }

    async fn abort_multipart(&self, dest: &ObjectRef, upload_id: &str) -> Result<(), S3Error> {
        const OP: &str = "AbortMultipartUpload";
        self.counts.count(OP);
        match self
            .inner
            .abort_multipart_upload()
            .bucket(&dest.bucket)
            .key(&dest.key)
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = self.err(OP, false, e);
                if e.code.as_deref() == Some("NoSuchUpload") || e.status == Some(404) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    async fn list_uploads(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<(String, String)>, S3Error> {
        const OP: &str = "ListMultipartUploads";
        self.counts.count(OP);
        let o = self
            .inner
            .list_multipart_uploads()
            .bucket(bucket)
            .prefix(prefix)
            .send()
            .await
            .map_err(|e| self.err(OP, false, e))?;
        Ok(o.uploads()
            .iter()
            .filter_map(|u| Some((u.key()?.to_string(), u.upload_id()?.to_string())))
            .collect())
    }

    async fn restore_object(
        &self,
        obj: &ObjectRef,
        days: u32,
        tier: &str,
    ) -> Result<Restore, S3Error> {
        use aws_sdk_s3::types::{GlacierJobParameters, RestoreRequest, Tier};
        const OP: &str = "RestoreObject";
        self.counts.count(OP);
        let job = GlacierJobParameters::builder()
            .tier(Tier::from(tier))
            .build()
            .map_err(|e| S3Error::other(self.side, OP, ErrorClass::Fatal, e.to_string()))?;
        let request = RestoreRequest::builder()
            .days(i32::try_from(days).unwrap_or(i32::MAX))
            .glacier_job_parameters(job)
            .build();
        let r = self
            .inner
            .restore_object()
            .bucket(&obj.bucket)
            .key(&obj.key)
            .set_version_id(obj.version_id.clone())
            .restore_request(request)
            .send()
            .await;
        match r {
            Ok(_) => Ok(Restore::Requested),
            Err(e) => {
                let e = self.err(OP, false, e);
                if e.code.as_deref() == Some("RestoreAlreadyInProgress") {
                    Ok(Restore::InProgress)
                } else {
                    Err(e)
                }
            }
        }
    }

    async fn object_lock_enabled(&self, bucket: &str) -> Result<bool, S3Error> {
        self.counts.count("GetObjectLockConfiguration");
        self.read_object_lock(bucket).await
    }

    async fn probe_bucket(&self, bucket: &str) -> Result<BucketFacts, S3Error> {
        self.counts.count("HeadBucket");
        let rgw = RgwHeaders::default();
        let head = self
            .inner
            .head_bucket()
            .bucket(bucket)
            .customize()
            .interceptor(rgw.clone())
            .send()
            .await
            .map_err(|e| self.err("HeadBucket", false, e))?;
        let status = self.bucket_versioning(bucket).await?;
        Ok(BucketFacts {
            region: head.bucket_region().map(str::to_string),
            versioned: status.as_deref() == Some("Enabled"),
            suspended: status.as_deref() == Some("Suspended"),
            object_lock: self.bucket_object_lock(bucket).await,
            rgw: rgw.0.load(Ordering::Relaxed),
        })
    }
}

impl SdkClient {
    /// This client counting its requests in `counts` (shared with another client: several
    /// clients of one side, e.g. one per region, count as one).
    pub fn counting_in(mut self, counts: Arc<RequestCounts>) -> SdkClient {
        self.counts = counts;
        self
    }

    /// This client's bodies limited by `bandwidth` (shared with the run's other clients;
    /// None: not limited).
    pub fn limited_by(mut self, bandwidth: Option<Arc<Bandwidth>>) -> SdkClient {
        self.bandwidth = bandwidth;
        self
    }

    /// The bandwidth limit of this client's bodies (see [`SdkClient::limited_by`]).
    pub fn bandwidth(&self) -> Option<Arc<Bandwidth>> {
        self.bandwidth.clone()
    }

    /// Waits for `body`'s turn under the bandwidth limit (the bytes ahead of it in line
    /// paid; the next body's turn comes once the rate has paid this one): before the
    /// request, so the wait is outside the attempt's timeout, and the body (already held) is
    /// all it holds.
    async fn wait_to_send(&self, body: &Bytes) {
        if let Some(bw) = &self.bandwidth {
            // Counted as sent once its turn comes (the place is dropped here).
            bw.place(Direction::Up, body.len() as u64).wait(0).await;
        }
    }

    /// The counts this client adds to (see [`SdkClient::counting_in`]).
    pub fn counts(&self) -> Arc<RequestCounts> {
        self.counts.clone()
    }

    /// The bucket's replication configuration as the server sent it (XML), for
    /// `plan --replication-config source`.
    pub async fn get_bucket_replication(&self, bucket: &str) -> Result<Vec<u8>, S3Error> {
        const OP: &str = "GetBucketReplication";
        self.counts.count(OP);
        let raw = RawBody::default();
        let r = self
            .inner
            .get_bucket_replication()
            .bucket(bucket)
            .customize()
            .interceptor(raw.clone())
            .send()
            .await;
        match r {
            Ok(_) => {}
            // A body the SDK does not parse is read by the caller's own parser.
            Err(e) if e.raw_response().is_some_and(|r| r.status().is_success()) => {}
            Err(e) => return Err(self.err(OP, false, e)),
        }
        raw.take()
            .map(|b| b.to_vec())
            .ok_or_else(|| S3Error::other(self.side, OP, ErrorClass::Fatal, "empty answer".into()))
    }
}

fn completed_part(p: &PartResult) -> CompletedPart {
    let mut b = CompletedPart::builder()
        .part_number(p.number)
        .set_e_tag(p.etag.clone());
    if let Some(c) = &p.checksum {
        let v = Some(c.value.clone());
        b = match c.algorithm {
            ChecksumAlgorithm::Crc32 => b.set_checksum_crc32(v),
            ChecksumAlgorithm::Crc32c => b.set_checksum_crc32_c(v),
            ChecksumAlgorithm::Crc64Nvme => b.set_checksum_crc64_nvme(v),
            ChecksumAlgorithm::Sha1 => b.set_checksum_sha1(v),
            ChecksumAlgorithm::Sha256 => b.set_checksum_sha256(v),
        };
    }
    b.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn checksum_headers_respect_when_required() {
        let side = |checksum_calculation| SideConfig {
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            checksum_calculation,
            ..SideConfig::default()
        };
        let (c, _) = build(
            Side::Dest,
            &side(ChecksumCalculation::WhenRequired),
            Timeouts::default(),
        )
        .await;
        assert_eq!(c.algorithm(Some(ChecksumAlgorithm::Crc32)), None);
        let (c, _) = build(
            Side::Dest,
            &side(ChecksumCalculation::WhenSupported),
            Timeouts::default(),
        )
        .await;
        assert_eq!(
            c.algorithm(Some(ChecksumAlgorithm::Crc32)),
            Some(aws_sdk_s3::types::ChecksumAlgorithm::Crc32)
        );
    }

    #[test]
    fn tags_round_trip() {
        let tags = vec![
            ("team".to_string(), "a b+c".to_string()),
            ("n".to_string(), "1".to_string()),
        ];
        assert_eq!(parse_tagging(&tagging_string(&tags)), tags);
        assert!(parse_tagging("").is_empty());
    }
}
