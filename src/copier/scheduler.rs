//! copier::scheduler: which task runs when. Keys come from the manifest in batches and run
//! in parallel (at most `concurrency` keys at once); the versions of one key run one at a
//! time, oldest first. A failed version blocks its key's later versions, in this run and in
//! every later one, until the user retries it (`run --retry-failed`) or skips it
//! (`run --skip-failed`): the destination's history is never written out of order.
//!
//! May call: the s3 layer and the manifest (through the copier's writer).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::task::JoinSet;

use super::strategy::Copied;
use super::{now_secs, Copier, RunSummary};
use crate::manifest::{CopyMethod, KeyGroup, Outcome, State, Task, Update};
use crate::s3::{show_key, ErrorClass, ObjectRef, S3Client, S3Error};

/// Keys read from the manifest at a time.
const KEY_BATCH: usize = 256;

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
}

impl TaskCtx<'_> {
    /// The source version to read. A `null` version that is its key's current version is
    /// read without a version id (some servers reject `versionId=null`); any other is named.
    pub(super) fn source(&self, bucket: &str) -> ObjectRef {
        let t = self.task;
        if t.version_id == "null" && t.is_latest {
            ObjectRef::key(bucket, &t.key)
        } else {
            ObjectRef::version(bucket, &t.key, &t.version_id)
        }
    }
}

/// What became of one task in this run.
enum Step {
    /// Finished (done, skipped or failed): the outcome to record.
    Finished(Outcome),
    /// Could not be decided (reconciliation failed): left for the next run.
    InDoubt,
    /// The run is stopping.
    Stopped,
}

impl<C: S3Client> Copier<C> {
    /// Runs every open task until done, stopped, or aborted. At most `concurrency` keys are
    /// in progress at once (each has at least one request in flight when it runs).
    pub async fn run(self: Arc<Self>) -> RunSummary {
        let mut set = JoinSet::new();
        let mut after = 0i64;
        'outer: while !self.control.stopping() {
            let groups = match self.writer.next_key_groups(after, KEY_BATCH).await {
                Ok(g) => g,
                Err(e) => {
                    self.control.abort(format!("manifest: {e}"));
                    break;
                }
            };
            let Some(last) = groups.last() else { break };
            after = last.key_id;
            self.record_requests();
            for g in groups {
                while set.len() >= self.key_concurrency {
                    set.join_next().await;
                }
                if self.control.stopping() {
                    break 'outer;
                }
                set.spawn(self.clone().key_worker(g));
            }
        }
        while set.join_next().await.is_some() {}
        self.record_requests();
        let mut s = self.progress.summary();
        s.throttles = self.retrier.limiter.throttles();
        s.requests = self.source.requests().total() + self.dest.requests().total();
        s.aborted = self.control.aborted();
        s.interrupted = self.control.stopping() && s.aborted.is_none();
        s
    }

    /// Copies the open tasks of one key, oldest first; a failed one stops the key's later
    /// tasks to the same destination bucket (other destinations go on).
    async fn key_worker(self: Arc<Self>, group: KeyGroup) {
        let mut recorded: HashSet<String> = group
            .tasks
            .iter()
            .filter(|t| t.state == State::Done)
            .filter_map(|t| t.dest_version_id.clone())
            .collect();
        // Destination buckets whose history of this key waits behind a failed version.
        let mut blocked: HashSet<&str> = HashSet::new();
        for (i, task) in group.tasks.iter().enumerate() {
            let (bucket, prefix, _) = self.settings.destination(task.dest);
            if blocked.contains(bucket) {
                continue;
            }
            match task.state {
                State::Done | State::Skipped => continue,
                State::Failed => {
                    // Later versions wait: copying them would put the history out of order.
                    self.progress.add_blocked(self.open_after(&group.tasks, i));
                    blocked.insert(bucket);
                    continue;
                }
                State::Pending | State::InProgress => {}
            }
            let ctx = TaskCtx {
                task,
                dest: ObjectRef::key(bucket, &format!("{prefix}{}", group.key)),
                recorded: &recorded,
                retries: AtomicU64::new(0),
                started_at: now_secs(),
            };
            let step = self.step(&ctx).await;
            let retries = ctx.retries.load(Ordering::Relaxed);
            self.progress.add_retries(retries);
            let outcome = match step {
                Step::Finished(o) => with_retries(o, retries),
                Step::InDoubt | Step::Stopped => return,
            };
            let failed = matches!(outcome, Outcome::Failed { .. });
            if let Outcome::Done {
                dest_version_id: Some(v),
                ..
            } = &outcome
            {
                recorded.insert(v.clone());
            }
            self.finish(task, outcome);
            if failed {
                self.progress.add_blocked(self.open_after(&group.tasks, i));
                blocked.insert(bucket);
            }
        }
    }

    /// One task: reconcile an earlier attempt, mark the start durably, copy.
    async fn step(&self, ctx: &TaskCtx<'_>) -> Step {
        if self.control.stopping() {
            return Step::Stopped;
        }
        if ctx.task.attempts > 0 {
            let found = match self.reconcile_earlier_attempt(ctx).await {
                Ok(Some(v)) => self
                    .repair_adopted(ctx, v.as_deref())
                    .await
                    .map(|_| Some(v)),
                other => other,
            };
            match found {
                Ok(Some(v)) => return Step::Finished(adopted(v)),
                Ok(None) => {}
                Err(e) => {
                    // Cannot tell whether it was copied; writing now could make a duplicate.
                    self.progress.say(format!(
                        "in doubt, left for the next run: {} version {}: {e}",
                        show_key(&ctx.task.key),
                        ctx.task.version_id
                    ));
                    return Step::InDoubt;
                }
            }
        }
        let started = Update::Started {
            id: ctx.task.id,
            at: ctx.started_at,
        };
        if let Err(e) = self.writer.send_durable(started).await {
            self.control.abort(format!("manifest: {e}"));
            return Step::Stopped;
        }
        Step::Finished(match self.copy_task(ctx).await {
            Ok(c) => c.into_outcome(),
            Err(e) => outcome_of_error(e),
        })
    }

    /// Records a finished task and applies the failure threshold.
    fn finish(&self, task: &Task, outcome: Outcome) {
        if let Some(why) = self.progress.finished(task, &outcome) {
            self.control.abort(why);
        }
        self.send(Update::Finished {
            id: task.id,
            outcome,
        });
    }

    /// Aborts multipart uploads that a killed run left open (their ids are in the manifest).
    pub async fn abort_leftover_uploads(&self, tasks: Vec<Task>) {
        for t in tasks {
            let Some(u) = &t.upload_id else { continue };
            let (bucket, prefix, _) = self.settings.destination(t.dest);
            let dest = ObjectRef::key(bucket, &format!("{prefix}{}", t.key));
            let retries = AtomicU64::new(0);
            let r = self
                .retrier
                .call(&retries, || self.dest.abort_multipart(&dest, u))
                .await;
            if let Err(e) = r {
                tracing::warn!("could not abort upload {u} of {}: {e}", show_key(&dest.key));
                continue;
            }
            self.send(Update::Upload {
                id: t.id,
                upload_id: None,
                part_size: None,
                parts: None,
            });
        }
    }
}

impl<C: S3Client> Copier<C> {
    /// Open tasks after position `i` of a key's tasks to the same destination bucket (they
    /// wait behind a failed one).
    fn open_after(&self, tasks: &[Task], i: usize) -> u64 {
        let bucket = self.settings.destination(tasks[i].dest).0;
        tasks[i + 1..]
            .iter()
            .filter(|t| matches!(t.state, State::Pending | State::InProgress))
            .filter(|t| self.settings.destination(t.dest).0 == bucket)
            .count() as u64
    }
}

fn adopted(dest_version_id: Option<String>) -> Outcome {
    Copied {
        dest_version_id,
        method: CopyMethod::Reconciled,
        part_size: None,
        parts: None,
        etag_preserved: None,
    }
    .into_outcome()
}

/// Skipped for what cannot be copied (gone, archived), failed for the rest.
fn outcome_of_error(error: S3Error) -> Outcome {
    if error.code.as_deref() == Some(super::strategy::NOT_REPLICATED) {
        return Outcome::Skipped {
            class: error.class,
            reason: error.message,
            retries: 0,
        };
    }
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

/// The outcome with the retries this run spent on its task.
fn with_retries(mut o: Outcome, n: u64) -> Outcome {
    match &mut o {
        Outcome::Done { retries, .. }
        | Outcome::Failed { retries, .. }
        | Outcome::Skipped { retries, .. } => *retries = n,
        Outcome::Requeued => {}
    }
    o
}
