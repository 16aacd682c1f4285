//! follow: what `follow` (issue 21, live replication after the backfill) needs besides the
//! job's stages: the change intake. [`intake`] parses `--events` and opens the source of
//! changes, an SQS queue the bucket notifies ([`sqs`]) or an HTTP endpoint that servers push
//! their notifications to ([`push`]); [`records`] reads the S3 event bodies both carry into
//! [`Change`]s ("key K of bucket B changed"). The command itself, which makes each change
//! durable in the manifest before acknowledging it, is `job::follow`.
//!
//! May call: `s3` (the source side's AWS configuration, the URL decoding of keys), `events`
//! (`say!`); aws-sdk-sqs, hyper.

pub mod intake;
pub mod push;
pub mod records;
pub mod sqs;

pub use intake::{parse_events, BacklogProbe, Delivery, EventSource, Intake, IntakeError};
pub use records::Change;
