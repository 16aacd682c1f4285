//! job::routed: the client of one side of a run that sends each request to the client of
//! its bucket's region (destination buckets of a replication configuration may live in
//! other regions than destination 0).
//!
//! May call: `s3`.

use std::sync::Arc;

use crate::s3::{BucketFacts, S3Client, S3Error, SdkClient, Side};

/// The clients of one side of a run: the side's client, and for each destination bucket in
/// another region than destination 0's (S3's 301 at the probe) a client in that bucket's
/// region; each request goes to its bucket's client. All count their requests together.
#[derive(Clone, Debug)]
pub struct RoutedClient {
    pub(super) main: SdkClient,
    pub(super) by_bucket: Arc<std::collections::BTreeMap<String, SdkClient>>,
}

impl RoutedClient {
    pub(super) fn single(main: SdkClient) -> RoutedClient {
        RoutedClient {
            main,
            by_bucket: Arc::default(),
        }
    }

    fn of(&self, bucket: &str) -> &SdkClient {
        self.by_bucket.get(bucket).unwrap_or(&self.main)
    }
}

impl S3Client for RoutedClient {
    fn side(&self) -> Side {
        self.main.side()
    }
    fn requests(&self) -> &crate::s3::RequestCounts {
        self.main.requests()
    }
    async fn list_versions(
        &self,
        from: &crate::s3::ListFrom,
    ) -> Result<crate::s3::VersionPage, S3Error> {
        self.of(&from.bucket).list_versions(from).await
    }
    async fn head_object(
        &self,
        obj: &crate::s3::ObjectRef,
        part: Option<i32>,
    ) -> Result<crate::s3::ObjectHead, S3Error> {
        self.of(&obj.bucket).head_object(obj, part).await
    }
    async fn get_object(
        &self,
        obj: &crate::s3::ObjectRef,
        range: Option<(u64, u64)>,
    ) -> Result<bytes::Bytes, S3Error> {
        self.of(&obj.bucket).get_object(obj, range).await
    }
    async fn get_object_stream(
        &self,
        obj: &crate::s3::ObjectRef,
        range: Option<(u64, u64)>,
    ) -> Result<(aws_sdk_s3::primitives::ByteStream, u64), S3Error> {
        self.of(&obj.bucket).get_object_stream(obj, range).await
    }
    async fn upload_part_stream(
        &self,
        dest: &crate::s3::ObjectRef,
        upload_id: &str,
        n: i32,
        body: aws_sdk_s3::primitives::ByteStream,
        len: u64,
    ) -> Result<crate::s3::PartResult, S3Error> {
        self.of(&dest.bucket)
            .upload_part_stream(dest, upload_id, n, body, len)
            .await
    }
    async fn put_object_stream(
        &self,
        dest: &crate::s3::ObjectRef,
        body: aws_sdk_s3::primitives::ByteStream,
        len: u64,
        attrs: &crate::s3::WriteAttrs,
    ) -> Result<crate::s3::WriteResult, S3Error> {
        self.of(&dest.bucket)
            .put_object_stream(dest, body, len, attrs)
            .await
    }
    async fn get_tagging(&self, obj: &crate::s3::ObjectRef) -> Result<String, S3Error> {
        self.of(&obj.bucket).get_tagging(obj).await
    }
    async fn copy_object(
        &self,
        dest: &crate::s3::ObjectRef,
        src: &crate::s3::ObjectRef,
        attrs: &crate::s3::WriteAttrs,
    ) -> Result<crate::s3::WriteResult, S3Error> {
        self.of(&dest.bucket).copy_object(dest, src, attrs).await
    }
    async fn put_object(
        &self,
        dest: &crate::s3::ObjectRef,
        body: bytes::Bytes,
        attrs: &crate::s3::WriteAttrs,
    ) -> Result<crate::s3::WriteResult, S3Error> {
        self.of(&dest.bucket).put_object(dest, body, attrs).await
    }
    async fn delete_object(
        &self,
        dest: &crate::s3::ObjectRef,
    ) -> Result<crate::s3::WriteResult, S3Error> {
        self.of(&dest.bucket).delete_object(dest).await
    }
    async fn put_tagging(&self, obj: &crate::s3::ObjectRef, tagging: &str) -> Result<(), S3Error> {
        self.of(&obj.bucket).put_tagging(obj, tagging).await
    }
    async fn create_multipart(
        &self,
        dest: &crate::s3::ObjectRef,
        attrs: &crate::s3::WriteAttrs,
    ) -> Result<String, S3Error> {
        self.of(&dest.bucket).create_multipart(dest, attrs).await
    }
    async fn upload_part_copy(
        &self,
        dest: &crate::s3::ObjectRef,
        upload_id: &str,
        n: i32,
        src: &crate::s3::ObjectRef,
        range: (u64, u64),
    ) -> Result<crate::s3::PartResult, S3Error> {
        self.of(&dest.bucket)
            .upload_part_copy(dest, upload_id, n, src, range)
            .await
    }
    async fn upload_part(
        &self,
        dest: &crate::s3::ObjectRef,
        upload_id: &str,
        n: i32,
        body: bytes::Bytes,
        md5: Option<&str>,
        algorithm: Option<crate::s3::ChecksumAlgorithm>,
    ) -> Result<crate::s3::PartResult, S3Error> {
        self.of(&dest.bucket)
            .upload_part(dest, upload_id, n, body, md5, algorithm)
            .await
    }
    async fn complete_multipart(
        &self,
        dest: &crate::s3::ObjectRef,
        upload_id: &str,
        parts: &[crate::s3::PartResult],
    ) -> Result<crate::s3::WriteResult, S3Error> {
        self.of(&dest.bucket)
            .complete_multipart(dest, upload_id, parts)
            .await
    }
    async fn abort_multipart(
        &self,
        dest: &crate::s3::ObjectRef,
        upload_id: &str,
    ) -> Result<(), S3Error> {
        self.of(&dest.bucket).abort_multipart(dest, upload_id).await
    }
    async fn list_uploads(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<(String, String)>, S3Error> {
        self.of(bucket).list_uploads(bucket, prefix).await
    }
    async fn probe_bucket(&self, bucket: &str) -> Result<BucketFacts, S3Error> {
        self.of(bucket).probe_bucket(bucket).await
    }
    async fn object_lock_enabled(&self, bucket: &str) -> Result<bool, S3Error> {
        self.of(bucket).object_lock_enabled(bucket).await
    }
    async fn restore_object(
        &self,
        obj: &crate::s3::ObjectRef,
        days: u32,
        tier: &str,
    ) -> Result<crate::s3::Restore, S3Error> {
        self.of(&obj.bucket).restore_object(obj, days, tier).await
    }
}
