//! copier::task: the vocabulary of one task being copied, shared by the scheduler, the
//! strategies, reconciliation and learning: what a task carries while it runs ([`TaskCtx`])
//! and why its copy made no destination version ([`CopyError`]). What a copy made is the
//! manifest's [`Copied`] (kept by `Outcome::Done`). It imports nothing from the other copier modules,
//! so they all import it and none of them has to import another for its words.
//!
//! May call: the manifest's types, the s3 layer's types.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64};

use crate::manifest::{Copied, CopyMethod, Outcome, Task};
use crate::s3::{ErrorClass, ObjectRef, S3Error};

/// One task being copied, with what reconciliation needs.
pub(super) struct TaskCtx<'a> {
    pub(super) task: &'a Task,
    /// The destination key (current version: no version id).
    pub(super) dest: ObjectRef,
    /// Destination version ids recorded for this key's done tasks.
    pub(super) recorded: &'a HashSet<String>,
    /// Retries spent on this task in this run.
    pub(super) retries: AtomicU64,
    /// Unix seconds when this run's first attempt at the task started.
    pub(super) started_at: i64,
    /// No open task of the key to the same destination comes after this one in this run.
    pub(super) last_open: bool,
    /// The new version's id is left to be learned later from a listing (see `learn`).
    pub(super) id_to_learn: AtomicBool,
    /// Marked in progress when its key was read (`KeyGroup::claimed`): no `Started` needed.
    pub(super) claimed: bool,
    /// The source bucket has or had versioning: a `null` version is named by id (see
    /// [`ObjectRef::pinned`]).
    pub(super) null_by_id: bool,
    /// An attempt was counted for it in this run (claimed, or `Started` sent).
    pub(super) attempted: AtomicBool,
}

impl TaskCtx<'_> {
    /// The source version to read, pinned to what was listed (see [`ObjectRef::pinned`]).
    pub(super) fn source(&self, bucket: &str) -> ObjectRef {
        let t = self.task;
        ObjectRef::pinned(
            bucket,
            &t.entry.key,
            &t.entry.version_id,
            t.entry.etag.as_deref(),
            self.null_by_id,
        )
    }
}

/// The outcome of a task whose copy an earlier attempt made (found by reconciliation).
pub(super) fn adopted(dest_version_id: Option<String>) -> Outcome {
    Copied::single(dest_version_id, CopyMethod::Reconciled).into_outcome(false)
}

/// Why a task's copy made no destination version.
#[derive(Debug)]
pub(super) enum CopyError {
    /// A request failed (after its retries), or what it answered stops the copy.
    S3(S3Error),
    /// The task's replication rule leaves the version out: an SSE-KMS object, and the rule
    /// does not enable `SseKmsEncryptedObjects` (known only from the source's HEAD).
    NotReplicated {
        /// The rule (its ID, or `#n` by position).
        rule: String,
    },
}

impl From<S3Error> for CopyError {
    fn from(e: S3Error) -> Self {
        CopyError::S3(e)
    }
}

impl CopyError {
    /// Skipped for what is not to be copied (left out by its rule) or cannot be (gone,
    /// archived), failed for the rest.
    pub(super) fn into_outcome(self) -> Outcome {
        let error = match self {
            CopyError::NotReplicated { rule } => {
                return Outcome::Skipped {
                    class: ErrorClass::Fatal,
                    reason: format!(
                        "not replicated: SSE-KMS object, and rule {rule} does not enable SseKmsEncryptedObjects"
                    ),
                    retries: 0,
                }
            }
            CopyError::S3(e) => e,
        };
        match error.class {
            ErrorClass::SourceGone => Outcome::Skipped {
                class: ErrorClass::SourceGone,
                reason: format!("source version is gone: {error}"),
                retries: 0,
            },
            ErrorClass::Archived => Outcome::Skipped {
                class: ErrorClass::Archived,
                reason: format!("archived: restore first ({error})"),
                retries: 0,
            },
            _ => Outcome::Failed { error, retries: 0 },
        }
    }
}
