//! s3: the S3 access layer. Everything that talks to S3 lives here: building one client per
//! side, the operations the project uses behind one trait ([`S3Client`], the seam that tests
//! replace with the in-process [`fake::FakeS3`]), the versions walk and its XML, bucket
//! probes, server quirks, error classification, the one retry loop and the bandwidth limit of
//! streamed bodies. Its operations return [`S3Error`]; the stages above never convert errors
//! back and forth.
//!
//! May call: the AWS SDK. Nothing of the crate: how a side is reached is the layer's own
//! configuration ([`side`]); retries are told to an observer the reporting layer sets
//! ([`observe_retries`]).

pub mod bandwidth;
pub mod client;
pub mod error;
pub mod fake;
pub mod gate;
pub mod handle;
pub mod list;
mod listing_body;
pub mod outcomes;
pub mod retry;
pub mod side;
pub mod types;
pub mod xml;

pub use client::{
    build, copy_source, parse_tagging, tagging_string, RequestCounts, Restore, S3Client, SdkClient,
    Timeouts,
};
pub use error::{classify, classify_code, ErrorClass, S3Error};
pub use handle::{Counted, Once, Sides, Writes, S3};
pub use list::Versions;
pub use retry::{observe_retries, Limiter, Permit, Retrier, RetryPolicy, Written};
pub use types::{
    show_key, BucketFacts, Checksum, ChecksumAlgorithm, ContentHeaders, Encryption, ListFrom,
    ObjectHead, ObjectLock, ObjectRef, PartResult, Side, VersionEntry, VersionPage, WriteAttrs,
    WriteResult,
};
pub use xml::parse_page;

/// The user-metadata key of the destination stamp: the source version id a destination
/// version was copied from (header `x-amz-meta-s3-backfill-source-version`).
pub const STAMP_KEY: &str = "s3-backfill-source-version";
