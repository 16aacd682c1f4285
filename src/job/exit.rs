//! job::exit: the process's exit status, decided in one function ([`Exit::of`]) from how a
//! command ended. `main` is the only caller and the only place the process exits.
//!
//! May call: `copier` (a run's summary), `manifest` (the job's counts), `verify`, `job`'s
//! errors.

use crate::copier::RunSummary;
use crate::manifest::{Counts, ManifestError};
use crate::s3::ErrorClass;
use crate::verify::VerifyReport;

use super::JobError;

/// The exit statuses, as the README lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Everything asked was done (every task done or skipped for good; a verify matched).
    Done = 0,
    /// Not all done: tasks failed, blocked, open or archived; the run stopped early; a
    /// verify found differences.
    Incomplete = 1,
    /// Bad input or configuration.
    Usage = 2,
    /// Any other error.
    Failed = 3,
    /// A run stopped at a hard limit (`--max-requests`, `--max-bytes`, `--max-duration`,
    /// `--max-cost`).
    Limit = 4,
    /// Interrupted (SIGINT/SIGTERM).
    Interrupted = 130,
}

/// How a command ended.
#[derive(Clone, Copy)]
pub enum Ended<'a> {
    /// It did its work (plan, status, report; help and version).
    Done,
    /// A run, with the job's counts after it (None: they could not be read).
    Run(&'a RunSummary, Option<&'a Counts>),
    /// A verification.
    Verified(&'a VerifyReport),
    /// An error stopped it.
    Error(&'a JobError),
    /// The arguments did not parse.
    Usage,
    /// It could not start (no runtime).
    NotStarted,
}

impl Exit {
    /// The exit status of a command that ended so.
    pub fn of(ended: Ended<'_>) -> Exit {
        match ended {
            Ended::Done => Exit::Done,
            Ended::Usage => Exit::Usage,
            Ended::NotStarted => Exit::Failed,
            Ended::Verified(r) if r.ok() => Exit::Done,
            Ended::Verified(_) => Exit::Incomplete,
            Ended::Error(e) => match e {
                JobError::Usage(_) | JobError::Config(_) => Exit::Usage,
                JobError::Manifest(ManifestError::Sql { .. } | ManifestError::WriterGone(_)) => {
                    Exit::Failed
                }
                JobError::Manifest(_) => Exit::Usage,
                JobError::S3(e) if e.class == ErrorClass::Fatal => Exit::Usage,
                _ => Exit::Failed,
            },
            Ended::Run(s, _) if s.aborted.is_some() => Exit::Incomplete,
            Ended::Run(s, _) if s.limit.is_some() => Exit::Limit,
            Ended::Run(s, _) if s.interrupted => Exit::Interrupted,
            Ended::Run(_, None) => Exit::Failed,
            Ended::Run(_, Some(c)) => {
                if c.failed > 0 || c.pending + c.in_progress > 0 || c.archived > 0 {
                    Exit::Incomplete
                } else {
                    Exit::Done
                }
            }
        }
    }

    /// The number the process exits with.
    pub fn code(self) -> i32 {
        self as i32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(c: Counts) -> Exit {
        Exit::of(Ended::Run(&RunSummary::default(), Some(&c)))
    }

    #[test]
    fn a_run_with_archived_versions_skipped_or_restores_pending_exits_1() {
        let all_done = Counts {
            total: 3,
            done: 2,
            skipped: 1,
            ..Counts::default()
        };
        assert_eq!(
            finished(all_done.clone()),
            Exit::Done,
            "skipped as gone: nothing to do"
        );
        let archived = Counts {
            archived: 1,
            ..all_done.clone()
        };
        assert_eq!(
            finished(archived),
            Exit::Incomplete,
            "an archived version is not copied"
        );
        let restoring = Counts {
            done: 1,
            skipped: 0,
            pending: 2,
            restore_pending: 1,
            ..all_done
        };
        assert_eq!(finished(restoring), Exit::Incomplete);
    }

    #[test]
    fn a_stopped_run_exits_by_why_it_stopped() {
        let c = Counts::default();
        let run = |s: RunSummary| Exit::of(Ended::Run(&s, Some(&c))).code();
        let limit = RunSummary {
            limit: Some("--max-requests 10".into()),
            ..RunSummary::default()
        };
        let interrupted = RunSummary {
            interrupted: true,
            ..RunSummary::default()
        };
        let aborted = RunSummary {
            aborted: Some("more than half failed".into()),
            ..RunSummary::default()
        };
        assert_eq!((run(limit), run(interrupted), run(aborted)), (4, 130, 1));
    }
}
