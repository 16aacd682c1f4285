//! s3: the S3 access layer. Everything that talks to S3 lives here: building one client per
//! side, the operations the project uses behind one trait ([`S3Client`], the seam that tests
//! replace with an in-process fake), the versions stream, bucket probes, server quirks, error
//! classification and the one retry loop. Its operations return [`S3Error`]; the stages above
//! never convert errors back and forth.
//!
//! May call: the AWS SDK, `config` (for a side's settings). Nothing else of the crate.

pub mod error;
pub mod retry;
pub mod types;

pub use error::{classify, classify_code, ErrorClass, S3Error};
pub use retry::{with_retry, Limiter, Permit, RetryPolicy};
pub use types::{Side, VersionEntry};
