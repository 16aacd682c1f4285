//! s3::handle: one handle per side ([`S3`]) that owns the side's client, the retry loop and
//! the bound on requests in flight. Stages hold handles, never a bare client:
//!
//! - requests that may be repeated (reads, part uploads, aborts, tagging a named version,
//!   deleting a named version) are retried by construction ([`Counted`]'s methods);
//! - the writes that create a destination version (copy, put, delete by key, complete) are
//!   reachable only through [`Counted::write`], which asks for the reconcile hook that runs
//!   before each repeat: the types say which requests are not idempotent.
//!
//! Retries are counted into a task's counter ([`S3::counting`]) or into the side's own
//! ([`S3::req`]). Which handles share a [`Limiter`] is decided where they are made
//! ([`Sides`]).
//!
//! May call: the rest of `s3`.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

use super::client::{RequestCounts, Restore, S3Client, SdkClient};
use super::error::S3Error;
use super::retry::{Limiter, Retrier, RetryPolicy, Tally, Written};
use super::types::{
    BucketFacts, ChecksumAlgorithm, ListFrom, ObjectHead, ObjectRef, PartResult, Side, VersionPage,
    WriteAttrs, WriteResult,
};

/// One side's handle: its client, the retry loop and request bound it shares, and a count
/// of the retries not counted for a task. Cheap to clone (the loop is shared).
#[derive(Clone)]
pub struct S3<C> {
    client: C,
    retry: Arc<Retrier>,
    retries: Arc<AtomicU64>,
}

impl<C: S3Client> S3<C> {
    /// A handle over `client`, its requests bounded and retried by `retry`.
    pub fn new(client: C, retry: Arc<Retrier>) -> S3<C> {
        S3 {
            client,
            retry,
            retries: Arc::default(),
        }
    }

    /// A handle with a loop of its own: `policy`, at most `in_flight` requests in flight.
    pub fn with_policy(client: C, policy: RetryPolicy, in_flight: usize) -> S3<C> {
        let limiter = Limiter::new(in_flight, None);
        S3::new(client, Arc::new(Retrier::new(policy, limiter)))
    }

    /// A handle with a loop of its own: the default schedule, at most `in_flight` requests.
    pub fn alone(client: C, in_flight: usize) -> S3<C> {
        S3::with_policy(client, RetryPolicy::default(), in_flight)
    }

    /// Which side this handle reaches.
    pub fn side(&self) -> Side {
        self.client.side()
    }

    /// The requests sent so far, by operation.
    pub fn requests(&self) -> &RequestCounts {
        self.client.requests()
    }

    /// The bound on requests in flight this handle obeys.
    pub fn limiter(&self) -> &Limiter {
        &self.retry.limiter
    }

    /// The retry loop (and bound) this handle shares: a job-wide limit sets its pace.
    pub fn retrier(&self) -> &Arc<Retrier> {
        &self.retry
    }

    /// Retries counted into the side's own counter so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// This handle, counting retries into `n` (a task's counter).
    pub fn counting<'a>(&'a self, n: &'a AtomicU64) -> Counted<'a, C> {
        Counted { s3: self, n }
    }

    /// The side's own retry counter (what [`S3::req`] counts into).
    pub(super) fn own_retries(&self) -> &AtomicU64 {
        &self.retries
    }

    /// This handle, counting retries into the side's own counter.
    pub fn req(&self) -> Counted<'_, C> {
        self.counting(&self.retries)
    }

    /// The side's idempotent requests sent once, without the retry loop: the parts of a
    /// larger idempotent step that [`Counted::retry`] repeats as a whole.
    pub fn once(&self) -> Once<'_, C> {
        Once(&self.client)
    }
}

impl S3<SdkClient> {
    /// The source's bucket replication configuration (raw XML), retried.
    pub async fn bucket_replication(&self, bucket: &str) -> Result<Vec<u8>, S3Error> {
        let c = &self.client;
        self.req().retry(|| c.get_bucket_replication(bucket)).await
    }
}

/// A handle counting its retries into one counter.
pub struct Counted<'a, C> {
    s3: &'a S3<C>,
    n: &'a AtomicU64,
}

impl<'a, C: S3Client> Counted<'a, C> {
    /// An idempotent step (made of [`S3::once`] requests), repeated on retryable errors.
    pub async fn retry<T, F, Fut>(&self, f: F) -> Result<T, S3Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, S3Error>>,
    {
        self.s3.retry.call(self.tally(), f).await
    }

    /// A write that creates a destination version (copy, put, delete by key, complete),
    /// made by `f` through the [`Writes`] it is handed: `reconcile` runs before every repeat
    /// and may adopt what an ambiguous failure created. There is no other way to such a
    /// write: a handle has no `copy_object` of its own.
    ///
    /// ```compile_fail
    /// # use s3_backfill::s3::{fake::FakeS3, ObjectRef, WriteAttrs, S3};
    /// # async fn f(s: &S3<FakeS3>, o: &ObjectRef, a: &WriteAttrs) {
    /// s.req().copy_object(o, o, a).await;
    /// # }
    /// ```
    pub async fn write<T, A, F, Fut, H, HFut>(
        &self,
        f: F,
        reconcile: H,
    ) -> Result<Written<T, A>, S3Error>
    where
        F: Fn(Writes<'a, C>) -> Fut,
        Fut: Future<Output = Result<T, S3Error>>,
        H: FnMut() -> HFut,
        HFut: Future<Output = Result<Option<A>, S3Error>>,
    {
        let w = Writes(&self.s3.client);
        self.s3.retry.write(self.tally(), || f(w), reconcile).await
    }

    /// Where the retry loop counts this handle's retries, and its client's failed attempts
    /// and retries (`--metrics`).
    fn tally(&self) -> Tally<'_> {
        Tally {
            retries: self.n,
            outcomes: self.s3.requests().outcomes(),
            side: self.s3.side(),
        }
    }

    fn once(&self) -> Once<'a, C> {
        self.s3.once()
    }

    /// ListObjectVersions, one page.
    pub async fn list_versions(&self, from: &ListFrom) -> Result<VersionPage, S3Error> {
        self.retry(|| self.once().list_versions(from)).await
    }

    /// HeadObject (of one part with `part`).
    pub async fn head_object(
        &self,
        obj: &ObjectRef,
        part: Option<i32>,
    ) -> Result<ObjectHead, S3Error> {
        self.retry(|| self.once().head_object(obj, part)).await
    }

    /// GetObject into memory (of a range with `range`).
    pub async fn get_object(
        &self,
        obj: &ObjectRef,
        range: Option<(u64, u64)>,
    ) -> Result<Bytes, S3Error> {
        self.retry(|| self.once().get_object(obj, range)).await
    }

    /// GetObjectTagging, as a query string.
    pub async fn get_tagging(&self, obj: &ObjectRef) -> Result<String, S3Error> {
        self.retry(|| self.once().get_tagging(obj)).await
    }

    /// PutObjectTagging of a version (the same tag set written twice is the same).
    pub async fn put_tagging(&self, obj: &ObjectRef, tagging: &str) -> Result<(), S3Error> {
        self.retry(|| self.once().put_tagging(obj, tagging)).await
    }

    /// DeleteObject of a named version (removes that version; no marker is made).
    pub async fn delete_version(&self, obj: &ObjectRef) -> Result<WriteResult, S3Error> {
        self.retry(|| self.once().delete_version(obj)).await
    }

    /// CreateMultipartUpload (an upload left by a repeat is aborted by reconciliation).
    pub async fn create_multipart(
        &self,
        dest: &ObjectRef,
        attrs: &WriteAttrs,
    ) -> Result<String, S3Error> {
        self.retry(|| self.once().create_multipart(dest, attrs))
            .await
    }

    /// UploadPartCopy.
    pub async fn upload_part_copy(
        &self,
        dest: &ObjectRef,
        upload_id: &str,
        n: i32,
        src: &ObjectRef,
        range: (u64, u64),
    ) -> Result<PartResult, S3Error> {
        self.retry(|| self.once().upload_part_copy(dest, upload_id, n, src, range))
            .await
    }

    /// UploadPart of a body in memory.
    pub async fn upload_part(
        &self,
        dest: &ObjectRef,
        upload_id: &str,
        n: i32,
        body: &Bytes,
        md5: Option<&str>,
        algorithm: Option<ChecksumAlgorithm>,
    ) -> Result<PartResult, S3Error> {
        self.retry(|| {
            self.once()
                .upload_part(dest, upload_id, n, body.clone(), md5, algorithm)
        })
        .await
    }

    /// AbortMultipartUpload.
    pub async fn abort_multipart(&self, dest: &ObjectRef, upload_id: &str) -> Result<(), S3Error> {
        self.retry(|| self.once().abort_multipart(dest, upload_id))
            .await
    }

    /// ListMultipartUploads under a prefix: (key, upload id) pairs.
    pub async fn list_uploads(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<(String, String)>, S3Error> {
        self.retry(|| self.once().list_uploads(bucket, prefix))
            .await
    }

    /// The bucket's region, versioning and object lock.
    pub async fn probe_bucket(&self, bucket: &str) -> Result<BucketFacts, S3Error> {
        self.retry(|| self.once().probe_bucket(bucket)).await
    }

    /// Whether the bucket has object lock enabled.
    pub async fn object_lock_enabled(&self, bucket: &str) -> Result<bool, S3Error> {
        self.retry(|| self.once().object_lock_enabled(bucket)).await
    }

    /// RestoreObject (asking again for a restore under way is answered as such).
    pub async fn restore_object(
        &self,
        obj: &ObjectRef,
        days: u32,
        tier: &str,
    ) -> Result<Restore, S3Error> {
        self.retry(|| self.once().restore_object(obj, days, tier))
            .await
    }
}

/// A side's idempotent requests, each sent once (see [`S3::once`]). The writes that create
/// a version are not here.
pub struct Once<'a, C>(&'a C);

impl<C> Clone for Once<'_, C> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<C> Copy for Once<'_, C> {}

impl<C: S3Client> Once<'_, C> {
    /// ListObjectVersions, one page.
    pub async fn list_versions(self, from: &ListFrom) -> Result<VersionPage, S3Error> {
        self.0.list_versions(from).await
    }

    /// HeadObject.
    pub async fn head_object(
        self,
        obj: &ObjectRef,
        part: Option<i32>,
    ) -> Result<ObjectHead, S3Error> {
        self.0.head_object(obj, part).await
    }

    /// GetObject into memory.
    pub async fn get_object(
        self,
        obj: &ObjectRef,
        range: Option<(u64, u64)>,
    ) -> Result<Bytes, S3Error> {
        self.0.get_object(obj, range).await
    }

    /// GetObject as a stream, with its length.
    pub async fn get_object_stream(
        self,
        obj: &ObjectRef,
        range: Option<(u64, u64)>,
    ) -> Result<(ByteStream, u64), S3Error> {
        self.0.get_object_stream(obj, range).await
    }

    /// GetObjectTagging.
    pub async fn get_tagging(self, obj: &ObjectRef) -> Result<String, S3Error> {
        self.0.get_tagging(obj).await
    }

    /// PutObjectTagging of a version.
    pub async fn put_tagging(self, obj: &ObjectRef, tagging: &str) -> Result<(), S3Error> {
        self.0.put_tagging(obj, tagging).await
    }

    /// DeleteObject of a named version. A reference without a version would make a delete
    /// marker (a write that creates a version): that goes through [`Counted::write`].
    pub async fn delete_version(self, obj: &ObjectRef) -> Result<WriteResult, S3Error> {
        assert!(obj.version_id.is_some(), "delete_version names a version");
        self.0.delete_object(obj).await
    }

    /// CreateMultipartUpload.
    pub async fn create_multipart(
        self,
        dest: &ObjectRef,
        attrs: &WriteAttrs,
    ) -> Result<String, S3Error> {
        self.0.create_multipart(dest, attrs).await
    }

    /// UploadPartCopy.
    pub async fn upload_part_copy(
        self,
        dest: &ObjectRef,
        upload_id: &str,
        n: i32,
        src: &ObjectRef,
        range: (u64, u64),
    ) -> Result<PartResult, S3Error> {
        self.0
            .upload_part_copy(dest, upload_id, n, src, range)
            .await
    }

    /// UploadPart of a body in memory.
    pub async fn upload_part(
        self,
        dest: &ObjectRef,
        upload_id: &str,
        n: i32,
        body: Bytes,
        md5: Option<&str>,
        algorithm: Option<ChecksumAlgorithm>,
    ) -> Result<PartResult, S3Error> {
        self.0
            .upload_part(dest, upload_id, n, body, md5, algorithm)
            .await
    }

    /// UploadPart of a stream.
    pub async fn upload_part_stream(
        self,
        dest: &ObjectRef,
        upload_id: &str,
        n: i32,
        body: ByteStream,
        len: u64,
    ) -> Result<PartResult, S3Error> {
        self.0
            .upload_part_stream(dest, upload_id, n, body, len)
            .await
    }

    /// AbortMultipartUpload.
    pub async fn abort_multipart(self, dest: &ObjectRef, upload_id: &str) -> Result<(), S3Error> {
        self.0.abort_multipart(dest, upload_id).await
    }

    /// ListMultipartUploads.
    pub async fn list_uploads(
        self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<(String, String)>, S3Error> {
        self.0.list_uploads(bucket, prefix).await
    }

    /// The bucket's facts.
    pub async fn probe_bucket(self, bucket: &str) -> Result<BucketFacts, S3Error> {
        self.0.probe_bucket(bucket).await
    }

    /// Whether the bucket has object lock enabled.
    pub async fn object_lock_enabled(self, bucket: &str) -> Result<bool, S3Error> {
        self.0.object_lock_enabled(bucket).await
    }

    /// RestoreObject.
    pub async fn restore_object(
        self,
        obj: &ObjectRef,
        days: u32,
        tier: &str,
    ) -> Result<Restore, S3Error> {
        self.0.restore_object(obj, days, tier).await
    }
}

/// The writes that create a version, handed out only by [`Counted::write`].
pub struct Writes<'a, C>(&'a C);

impl<C> Clone for Writes<'_, C> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<C> Copy for Writes<'_, C> {}

impl<C: S3Client> Writes<'_, C> {
    /// CopyObject.
    pub async fn copy_object(
        self,
        dest: &ObjectRef,
        src: &ObjectRef,
        attrs: &WriteAttrs,
    ) -> Result<WriteResult, S3Error> {
        self.0.copy_object(dest, src, attrs).await
    }

    /// PutObject of a body in memory.
    pub async fn put_object(
        self,
        dest: &ObjectRef,
        body: Bytes,
        attrs: &WriteAttrs,
    ) -> Result<WriteResult, S3Error> {
        self.0.put_object(dest, body, attrs).await
    }

    /// PutObject of a stream.
    pub async fn put_object_stream(
        self,
        dest: &ObjectRef,
        body: ByteStream,
        len: u64,
        attrs: &WriteAttrs,
    ) -> Result<WriteResult, S3Error> {
        self.0.put_object_stream(dest, body, len, attrs).await
    }

    /// DeleteObject (by key: a delete marker on a versioned bucket).
    pub async fn delete_object(self, dest: &ObjectRef) -> Result<WriteResult, S3Error> {
        self.0.delete_object(dest).await
    }

    /// CompleteMultipartUpload.
    pub async fn complete_multipart(
        self,
        dest: &ObjectRef,
        upload_id: &str,
        parts: &[PartResult],
    ) -> Result<WriteResult, S3Error> {
        self.0.complete_multipart(dest, upload_id, parts).await
    }
}

/// The job's two handles. Where they are made is the one decision about what shares a
/// bound: both sides of a run share one [`Limiter`] (its bound is the run's `--concurrency`,
/// its pacer `--max-rps`), so the listing that runs beside a copy is under the same bound and
/// the same requests per second as the copy.
#[derive(Clone)]
pub struct Sides<C> {
    /// Reads the source.
    pub source: S3<C>,
    /// Writes the destination (and reads the source in server-side copies).
    pub dest: S3<C>,
}

impl<C: S3Client> Sides<C> {
    /// Both sides under one retry loop: `policy`, at most `in_flight` requests in flight
    /// together, at most `max_rps` requests a second together.
    pub fn shared(
        (source, dest): (C, C),
        policy: RetryPolicy,
        in_flight: usize,
        max_rps: Option<f64>,
    ) -> Sides<C> {
        let retry = Arc::new(Retrier::new(policy, Limiter::new(in_flight, max_rps)));
        Sides {
            source: S3::new(source, Arc::clone(&retry)),
            dest: S3::new(dest, retry),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::fake::{FakeServer, FaultKind};
    use crate::s3::ErrorClass;

    #[tokio::test]
    async fn both_sides_share_one_bound_and_count_their_own_retries() {
        let s = FakeServer::new();
        s.create_bucket("b", true);
        s.put("b", "k", b"1", &[]);
        let policy = RetryPolicy {
            min_delay: std::time::Duration::from_millis(1),
            max_delay: std::time::Duration::from_millis(2),
            ..RetryPolicy::default()
        };
        let sides = Sides::shared(
            (s.client(Side::Source), s.client(Side::Dest)),
            policy,
            3,
            None,
        );
        assert!(std::ptr::eq(sides.source.limiter(), sides.dest.limiter()));
        assert_eq!(sides.source.limiter().current_limit(), 3);
        // An idempotent read is retried by the handle itself, into the side's own count.
        s.fail(
            "HeadObject",
            Some("k"),
            2,
            FaultKind::Before(ErrorClass::Retryable, 503),
        );
        let head = sides
            .source
            .req()
            .head_object(&ObjectRef::key("b", "k"), None)
            .await;
        assert_eq!(head.unwrap().size, 1);
        assert_eq!((sides.source.retries(), sides.dest.retries()), (2, 0));
        // A task's counter takes them instead.
        s.fail(
            "HeadObject",
            Some("k"),
            1,
            FaultKind::Before(ErrorClass::Retryable, 503),
        );
        let n = AtomicU64::new(0);
        let dest = sides.dest.counting(&n);
        dest.head_object(&ObjectRef::key("b", "k"), None)
            .await
            .unwrap();
        assert_eq!((n.load(Ordering::Relaxed), sides.dest.retries()), (1, 0));
    }
}
