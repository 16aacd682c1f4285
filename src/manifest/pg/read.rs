//! manifest::pg::read: what `status`, the reports, `verify`, the estimate and a run's
//! resume read from a PostgreSQL job, and the user's resolutions (`--retry-failed`,
//! `--retry-skipped`, `--skip-failed`).
//!
//! May call: `pg::schema`, `manifest::codec`, the types of `manifest`.

use std::collections::BTreeMap;

use super::unsupported::unsupported;
use super::PgManifest;
use crate::manifest::{
    Counts, KeyGroup, ListingProgress, ManifestError, Problem, Result, RunProgress, State, Task,
};

unsupported! { "reading (not built yet)":
    fn tasks_of_key(&self, key: &str) -> Vec<Task>;
    fn open_uploads(&self) -> Vec<Task>;
    fn versions_to_learn(&self) -> Vec<Task>;
    fn next_key_groups(&self, after_key_id: i64, limit: usize) -> Vec<KeyGroup>;
    fn listing_progress(&self) -> ListingProgress;
    fn etag_changes(&self) -> BTreeMap<String, u64>;
    fn counts(&self) -> Counts;
    fn problems(&self, limit: usize) -> Vec<Problem>;
    fn retry_failed(&self) -> usize;
    fn retry_skipped(&self) -> (usize, usize);
    fn skip_failed(&self) -> usize;
    fn estimate_facts(&self) -> BTreeMap<String, String>;
    fn run_progress(&self) -> Option<RunProgress>;
}

impl PgManifest {
    /// Every failed, skipped and blocked task, streamed to `f`.
    pub fn for_each_problem(&self, f: impl FnMut(Problem) -> std::io::Result<()>) -> Result<()> {
        let _ = f;
        Err(ManifestError::Unsupported(
            self.path().to_string(),
            "reports (not built yet)",
        ))
    }

    /// Key, version id and destination of every task in `state`, streamed to `f`.
    pub fn for_each_in_state(
        &self,
        state: State,
        f: impl FnMut(&str, &str, i64) -> std::io::Result<()>,
    ) -> Result<()> {
        let _ = (state, f);
        Err(ManifestError::Unsupported(
            self.path().to_string(),
            "reports (not built yet)",
        ))
    }

    /// Every key's tasks, key by key (the estimate).
    pub fn for_each_key(&self, f: impl FnMut(&str, &[Task])) -> Result<()> {
        let _ = f;
        Err(ManifestError::Unsupported(
            self.path().to_string(),
            "the estimate (not built yet)",
        ))
    }
}

// TEMPORARY (lead): stand-ins until the read slice lands; replaced by its decoder.
/// The select list of a task row.
pub(super) const TASK_COLUMNS: &str = "t.id FROM task t";
/// A task row decoded.
pub(super) fn task_of_row(row: &postgres::Row) -> std::result::Result<Task, super::PgError> {
    let _ = row;
    Err(super::PgError::Bad("not built".into()))
}
