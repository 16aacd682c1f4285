//! copier::reconcile: what an earlier or ambiguous attempt left at the destination.
//!
//! A write that may have happened (the process died, or the answer was lost) is looked for
//! before the task is written again. Under the job's assumption (nothing else writes its
//! destination keys), the destination versions of a key newer than the newest one recorded
//! for its done tasks can only come from attempts at the key's first open task.
//!
//! - Object versions, stamp on (default): a candidate is adopted only when its user metadata
//!   carries the stamp naming this source version: exact on every server.
//! - Object versions, `--no-stamp`: the first candidate of the same size written after the
//!   attempt started, less the clock skew (ETags are not compared: encryption changes them).
//! - Delete markers carry no metadata: the first delete marker after the last recorded
//!   version (and, for a key with nothing recorded, written after the attempt started).
//! - "After the last recorded version" includes the unrecorded entries listed with exactly
//!   its time: moto's whole-second times and versions-before-markers order cannot say which
//!   of two writes in one second came first.
//!
//! Also learns a new version's id when the write's answer omits it (RGW's CopyObject).
//!
//! May call: the s3 layer.

use std::sync::atomic::AtomicU64;

use super::task::TaskCtx;
use super::{Copier, CLOCK_SKEW_SECS};
use crate::s3::{
    show_key, ListFrom, ObjectHead, ObjectRef, S3Client, S3Error, VersionEntry, Versions, STAMP_KEY,
};

/// Candidates HEADed at most when looking for a stamped version.
const MAX_STAMP_CANDIDATES: usize = 16;

/// Parses S3's `2026-01-02T03:04:05.000Z` into unix seconds.
fn parse_s3_time(s: &str) -> Option<i64> {
    aws_smithy_types::DateTime::from_str(s, aws_smithy_types::date_time::Format::DateTime)
        .ok()
        .map(|d| d.secs())
}

impl<C: S3Client> Copier<C> {
    /// Before a task with an earlier attempt is written again: its destination version, if
    /// an attempt created one (then it is adopted), and otherwise the multipart uploads an
    /// attempt may have left open are aborted.
    pub(super) async fn reconcile_earlier_attempt(
        &self,
        ctx: &TaskCtx<'_>,
    ) -> Result<Option<Option<String>>, S3Error> {
        let since = ctx.task.started_at.unwrap_or(0);
        // The mode the earlier attempt wrote with (the job's setting may have changed since).
        let stamped = ctx.task.attempt_stamped.unwrap_or(self.settings.copy.stamp);
        if let Some(v) = self.find_written_as(ctx, since, stamped).await? {
            return Ok(Some(v));
        }
        if !ctx.task.entry.is_delete_marker {
            self.abort_uploads_of_key(ctx).await?;
        }
        Ok(None)
    }

    /// The destination version an attempt at this task created, if any (see the module
    /// header for the rules). `since` is when the attempt started (unix seconds).
    pub(super) async fn find_written(
        &self,
        ctx: &TaskCtx<'_>,
        since: i64,
    ) -> Result<Option<Option<String>>, S3Error> {
        self.find_written_as(ctx, since, self.settings.copy.stamp)
            .await
    }

    /// [`Copier::find_written`] for an attempt that wrote with the stamp (`stamped`) or
    /// without it.
    async fn find_written_as(
        &self,
        ctx: &TaskCtx<'_>,
        since: i64,
        stamped: bool,
    ) -> Result<Option<Option<String>>, S3Error> {
        if !self.facts(&ctx.dest.bucket).versioned {
            // An unversioned destination is overwritten by the next attempt: nothing to adopt.
            return Ok(None);
        }
        let history = self.dest_history(ctx).await?;
        let newest_recorded = history
            .iter()
            .rposition(|e| ctx.recorded.contains(&e.version_id));
        let candidates =
            candidates_after(&history, newest_recorded, |id| ctx.recorded.contains(id));
        let recent = |e: &VersionEntry| {
            e.last_modified
                .as_deref()
                .and_then(parse_s3_time)
                .is_none_or(|lm| lm >= since - CLOCK_SKEW_SECS)
        };
        if ctx.task.entry.is_delete_marker {
            let found = candidates
                .iter()
                .find(|e| e.is_delete_marker && (newest_recorded.is_some() || recent(e)));
            return Ok(found.map(|e| Some(e.version_id.clone())));
        }
        let versions = candidates.iter().filter(|e| !e.is_delete_marker);
        if stamped {
            for e in versions.take(MAX_STAMP_CANDIDATES) {
                let head = self.dest_head(ctx, Some(&e.version_id)).await?;
                if stamped_for(&head, &ctx.task.entry.version_id) {
                    return Ok(Some(Some(e.version_id.clone())));
                }
            }
            return Ok(None);
        }
        // Without the stamp: size and write time. ETags are not compared: a KMS-encrypted
        // copy's ETag is not the source's, and the position after the last recorded version
        // already tells the attempts of this task apart from the key's other versions.
        let mut versions = versions;
        let found = versions.find(|e| recent(e) && e.size == ctx.task.entry.size);
        Ok(found.map(|e| Some(e.version_id.clone())))
    }

    /// The destination's entries of exactly this task's key, oldest first.
    async fn dest_history(&self, ctx: &TaskCtx<'_>) -> Result<Vec<VersionEntry>, S3Error> {
        self.dest_key_history(&ctx.dest.bucket, &ctx.dest.key, Some(&ctx.retries))
            .await
    }

    /// The destination's entries of exactly `key` in `bucket`, oldest first.
    pub(super) async fn dest_key_history(
        &self,
        bucket: &str,
        key: &str,
        retries: Option<&AtomicU64>,
    ) -> Result<Vec<VersionEntry>, S3Error> {
        let from = ListFrom {
            bucket: bucket.to_string(),
            prefix: key.to_string(),
            max_keys: 1000,
            ..Default::default()
        };
        let mut walk = Versions::new(&self.dest, from);
        if let Some(n) = retries {
            walk = walk.counting(n);
        }
        walk.history_of(key).await
    }

    /// The HEAD of one destination version of this task's key (None: the current one).
    pub(super) async fn dest_head(
        &self,
        ctx: &TaskCtx<'_>,
        version: Option<&str>,
    ) -> Result<ObjectHead, S3Error> {
        let obj = ObjectRef {
            version_id: version.map(str::to_string),
            ..ctx.dest.clone()
        };
        self.dest
            .counting(&ctx.retries)
            .head_object(&obj, None)
            .await
    }

    /// The id of the version a successful write just created, when its answer did not say:
    /// the key's newest entry (nothing else writes the key); an object version is HEADed
    /// and its stamp checked, a delete marker is read from the key's listing.
    /// Also returns the HEAD it made, if any.
    pub(super) async fn learn_version(
        &self,
        ctx: &TaskCtx<'_>,
        answered: Option<String>,
    ) -> Result<(Option<String>, Option<ObjectHead>), S3Error> {
        if answered.is_some() || !self.facts(&ctx.dest.bucket).versioned {
            return Ok((answered, None));
        }
        if ctx.task.entry.is_delete_marker {
            // RGW writes no delete marker over a delete marker (its answer names none): a
            // run of markers becomes one, whose id the tasks of the run share.
            let history = self.dest_history(ctx).await?;
            let id = history
                .last()
                .filter(|e| e.is_delete_marker)
                .map(|e| e.version_id.clone());
            return Ok((id, None));
        }
        let head = self.dest_head(ctx, None).await?;
        if self.settings.copy.stamp && !stamped_for(&head, &ctx.task.entry.version_id) {
            return Err(S3Error::other(
                self.dest.side(),
                "HeadObject",
                crate::s3::ErrorClass::Fatal,
                format!(
                    "the current version of {} is not the one just written (is something else writing the destination?)",
                    show_key(&ctx.dest.key)
                ),
            ));
        }
        Ok((head.version_id.clone(), Some(head)))
    }

    /// Aborts every open multipart upload of exactly this task's destination key (an
    /// attempt may have opened one whose id never reached the manifest).
    pub(super) async fn abort_uploads_of_key(&self, ctx: &TaskCtx<'_>) -> Result<(), S3Error> {
        let uploads = self
            .dest
            .counting(&ctx.retries)
            .list_uploads(&ctx.dest.bucket, &ctx.dest.key)
            .await?;
        for (key, id) in uploads.into_iter().filter(|(k, _)| *k == ctx.dest.key) {
            let obj = ObjectRef::key(&ctx.dest.bucket, &key);
            self.dest
                .counting(&ctx.retries)
                .abort_multipart(&obj, &id)
                .await?;
        }
        Ok(())
    }
}

/// The entries of a key's destination history (oldest first) an attempt at its first open
/// task may have written: those after the newest recorded one (`newest_recorded`, an index),
/// and the unrecorded ones with exactly its last-modified time. A server whose times have
/// whole seconds and that lists delete markers after versions (moto) cannot be put back in
/// order within one second: a delete marker written just after a version then reads as
/// older than it.
fn candidates_after(
    history: &[VersionEntry],
    newest_recorded: Option<usize>,
    recorded: impl Fn(&str) -> bool,
) -> Vec<&VersionEntry> {
    let Some(i) = newest_recorded else {
        return history.iter().collect();
    };
    let tie = history[i].last_modified.as_deref();
    let tied = history[..i]
        .iter()
        .filter(|e| tie.is_some() && e.last_modified.as_deref() == tie && !recorded(&e.version_id));
    tied.chain(&history[i + 1..]).collect()
}

/// Whether a destination version carries the stamp of this source version.
fn stamped_for(head: &ObjectHead, source_version: &str) -> bool {
    head.metadata.get(STAMP_KEY).map(String::as_str) == Some(source_version)
}
