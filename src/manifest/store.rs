//! manifest::store: the manifest's public surface as the interface a backend implements,
//! grouped by the stage that uses it. SQLite ([`Manifest`], and its single [`Writer`] during a
//! run) implements it today; a backend shared by several processes (PostgreSQL, issue 20)
//! implements the same traits.
//!
//! | trait | used by | what it holds |
//! |---|---|---|
//! | [`PlanStore`] | `lister` (pages, parts), `lister::supplied` (supplied jobs), `job`'s plan and replicate, `estimate` (its facts) | the job's settings, listing checkpoints per part, listed pages (tasks added once, replays ignored), refresh records |
//! | [`RunStore`] | `copier` (scheduler, strategy, learn) | claims of key batches, every state transition and outcome ([`Update`]), request counters; committed in order, durably when asked |
//! | [`ResumeStore`] | `job` before a run | the work a run resumes (open uploads, versions to learn) and the user's resolution of failures (`--retry-failed`, `--retry-skipped`, `--skip-failed`); hands the store to the run ([`ResumeStore::into_run`]) |
//! | [`ReportStore`] | `status`, `report`, `verify`, `estimate`, `events::ticker` | counters (never a scan), where the listing stands, the running run's rate, refreshes, problems and done tasks streamed |
//!
//! The stages call these methods on `Manifest` and `Writer` directly (the inherent methods,
//! which the impls here forward to): nothing is generic over a backend yet. What stays
//! SQLite's own and is not here: opening and migrating a file (`Manifest::open`), the busy
//! handler of a file shared by a lister and a run (`Manifest::wait_for_locks_briefly`).
//!
//! May call: the types of `manifest`, `crate::config::JobSettings`.

use std::collections::BTreeMap;
use std::future::Future;

use super::{
    Counts, KeyGroup, ListedPage, Listing, ListingProgress, Manifest, NewTask, Partition, Problem,
    Refresh, Result, RunProgress, State, Task, Update, Writer,
};
use crate::config::JobSettings;

/// What the plan stage writes and resumes from: settings, listing checkpoints, pages of
/// tasks, refreshes. A page and the checkpoint after it are one atomic write.
pub trait PlanStore {
    /// The manifest's name as given (for messages).
    fn path(&self) -> &str;
    /// The stored job settings, if `plan` stored them.
    fn settings(&self) -> Result<Option<JobSettings>>;
    /// The stored settings; an error when there are none.
    fn require_settings(&self) -> Result<JobSettings>;
    /// Stores (or replaces) the job settings and its destinations.
    fn store_settings(&self, s: &JobSettings) -> Result<()>;
    /// The listing's parts, each with its checkpoint.
    fn partitions(&self) -> Result<Vec<Partition>>;
    /// Splits the key space into parts before anything is listed (false: kept as it was).
    fn split_partitions(&mut self, starts: &[String]) -> Result<bool>;
    /// The checkpoints of every part, summed.
    fn listing(&self) -> Result<Listing>;
    /// One listed page of a part and the part's checkpoint after it, atomically; entries
    /// that already have a task are ignored.
    fn insert_listed_page(
        &mut self,
        partition: i64,
        page: &ListedPage<'_>,
        checkpoint: &Listing,
    ) -> Result<()>;
    /// [`PlanStore::insert_listed_page`] of the only part, with tasks only.
    fn insert_page(&mut self, tasks: &[NewTask], checkpoint: &Listing) -> Result<()>;
    /// Tasks of one key so far (a resumed part's first key counts its selected versions).
    fn count_key(&self, key: &str) -> Result<u64>;
    /// Starts a refresh (a new listing generation); None while the listing is incomplete.
    fn start_refresh_of(&mut self, source_versioned: bool) -> Result<Option<i64>>;
    /// Stores one fact for the cost estimate.
    fn store_estimate_fact(&self, name: &str, value: &str) -> Result<()>;
}

/// What a run's copier writes and reads while it copies: one writer, whose updates are
/// applied in the order sent, and whose reads see every update sent before them.
pub trait RunStore {
    /// The next `limit` key groups after `after_key_id` with open tasks, each group's first
    /// attemptable task marked in progress with start time `at` (see
    /// [`Writer::claim_key_groups`]).
    fn claim_key_groups(
        &self,
        after_key_id: i64,
        limit: usize,
        at: i64,
    ) -> impl Future<Output = Result<Vec<KeyGroup>>> + Send;
    /// Queues a state transition, an outcome or a request count; kept with the next commit.
    fn send(&self, u: Update) -> Result<()>;
    /// [`RunStore::send`], returning once it is durable.
    fn send_durable(&self, u: Update) -> impl Future<Output = Result<()>> + Send;
    /// Returns once everything sent before is durable.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;
    /// Records with every attempt started from now on whether its writes carry the stamp.
    fn record_attempt_mode(&self, stamped: bool);
}

/// What `job` reads and resolves before a run, and the hand-over to the run's writer.
pub trait ResumeStore {
    /// The run's writer.
    type Run: RunStore;
    /// Tasks with a multipart upload still open at the destination.
    fn open_uploads(&self) -> Result<Vec<Task>>;
    /// Done tasks whose destination version id is still to be learned from a listing.
    fn versions_to_learn(&self) -> Result<Vec<Task>>;
    /// Whether some key has more than one task (a destination must keep versions).
    fn has_multi_version_key(&self) -> Result<bool>;
    /// Failed tasks back to pending; how many.
    fn retry_failed(&self) -> Result<usize>;
    /// Skipped tasks (but those gone at the source) back to pending: how many, and how many
    /// were kept as out of order.
    fn retry_skipped(&self) -> Result<(usize, usize)>;
    /// Failed tasks marked skipped, with the reason; how many.
    fn skip_failed(&self) -> Result<usize>;
    /// Hands the store to the run: from now on it writes through [`ResumeStore::Run`].
    fn into_run(self) -> Self::Run;
}

/// What `status`, the reports, `verify` and the estimate read. Counters are kept, never
/// counted by a scan; problems and done tasks are streamed.
pub trait ReportStore {
    /// Task counts as `status` shows them.
    fn counts(&self) -> Result<Counts>;
    /// Why the ETags of done tasks changed: reason, count (a scan, for reports).
    fn etag_changes(&self) -> Result<BTreeMap<String, u64>>;
    /// Where the listing stands over all its parts.
    fn listing_progress(&self) -> Result<ListingProgress>;
    /// The running run's rate and ETA, if one is running.
    fn run_progress(&self) -> Result<Option<RunProgress>>;
    /// The listings that added tasks: `plan`, then each refresh.
    fn refreshes(&self) -> Result<Vec<Refresh>>;
    /// Failed, skipped and blocked tasks, at most `limit`.
    fn problems(&self, limit: usize) -> Result<Vec<Problem>>;
    /// Every failed, skipped and blocked task, streamed to `f`.
    fn for_each_problem(&self, f: impl FnMut(Problem) -> std::io::Result<()>) -> Result<()>;
    /// Key, version id and destination of every task in `state`, streamed to `f`.
    fn for_each_in_state(
        &self,
        state: State,
        f: impl FnMut(&str, &str, i64) -> std::io::Result<()>,
    ) -> Result<()>;
    /// Every task of one key.
    fn tasks_of_key(&self, key: &str) -> Result<Vec<Task>>;
    /// Every key's tasks, key by key (the estimate).
    fn for_each_key(&self, f: impl FnMut(&str, &[Task])) -> Result<()>;
    /// The facts stored for the estimate.
    fn estimate_facts(&self) -> Result<BTreeMap<String, String>>;
}

impl PlanStore for Manifest {
    fn path(&self) -> &str {
        Manifest::path(self)
    }
    fn settings(&self) -> Result<Option<JobSettings>> {
        Manifest::settings(self)
    }
    fn require_settings(&self) -> Result<JobSettings> {
        Manifest::require_settings(self)
    }
    fn store_settings(&self, s: &JobSettings) -> Result<()> {
        Manifest::store_settings(self, s)
    }
    fn partitions(&self) -> Result<Vec<Partition>> {
        Manifest::partitions(self)
    }
    fn split_partitions(&mut self, starts: &[String]) -> Result<bool> {
        Manifest::split_partitions(self, starts)
    }
    fn listing(&self) -> Result<Listing> {
        Manifest::listing(self)
    }
    fn insert_listed_page(
        &mut self,
        partition: i64,
        page: &ListedPage<'_>,
        checkpoint: &Listing,
    ) -> Result<()> {
        Manifest::insert_listed_page(self, partition, page, checkpoint)
    }
    fn insert_page(&mut self, tasks: &[NewTask], checkpoint: &Listing) -> Result<()> {
        Manifest::insert_page(self, tasks, checkpoint)
    }
    fn count_key(&self, key: &str) -> Result<u64> {
        Manifest::count_key(self, key)
    }
    fn start_refresh_of(&mut self, source_versioned: bool) -> Result<Option<i64>> {
        Manifest::start_refresh_of(self, source_versioned)
    }
    fn store_estimate_fact(&self, name: &str, value: &str) -> Result<()> {
        Manifest::store_estimate_fact(self, name, value)
    }
}

impl RunStore for Writer {
    fn claim_key_groups(
        &self,
        after_key_id: i64,
        limit: usize,
        at: i64,
    ) -> impl Future<Output = Result<Vec<KeyGroup>>> + Send {
        Writer::claim_key_groups(self, after_key_id, limit, at)
    }
    fn send(&self, u: Update) -> Result<()> {
        Writer::send(self, u)
    }
    fn send_durable(&self, u: Update) -> impl Future<Output = Result<()>> + Send {
        Writer::send_durable(self, u)
    }
    fn flush(&self) -> impl Future<Output = Result<()>> + Send {
        Writer::flush(self)
    }
    fn record_attempt_mode(&self, stamped: bool) {
        Writer::record_attempt_mode(self, stamped)
    }
}

impl ResumeStore for Manifest {
    type Run = Writer;
    fn open_uploads(&self) -> Result<Vec<Task>> {
        Manifest::open_uploads(self)
    }
    fn versions_to_learn(&self) -> Result<Vec<Task>> {
        Manifest::versions_to_learn(self)
    }
    fn has_multi_version_key(&self) -> Result<bool> {
        Manifest::has_multi_version_key(self)
    }
    fn retry_failed(&self) -> Result<usize> {
        Manifest::retry_failed(self)
    }
    fn retry_skipped(&self) -> Result<(usize, usize)> {
        Manifest::retry_skipped(self)
    }
    fn skip_failed(&self) -> Result<usize> {
        Manifest::skip_failed(self)
    }
    fn into_run(self) -> Writer {
        self.into_writer()
    }
}

impl ReportStore for Manifest {
    fn counts(&self) -> Result<Counts> {
        Manifest::counts(self)
    }
    fn etag_changes(&self) -> Result<BTreeMap<String, u64>> {
        Manifest::etag_changes(self)
    }
    fn listing_progress(&self) -> Result<ListingProgress> {
        Manifest::listing_progress(self)
    }
    fn run_progress(&self) -> Result<Option<RunProgress>> {
        Manifest::run_progress(self)
    }
    fn refreshes(&self) -> Result<Vec<Refresh>> {
        Manifest::refreshes(self)
    }
    fn problems(&self, limit: usize) -> Result<Vec<Problem>> {
        Manifest::problems(self, limit)
    }
    fn for_each_problem(&self, f: impl FnMut(Problem) -> std::io::Result<()>) -> Result<()> {
        Manifest::for_each_problem(self, f)
    }
    fn for_each_in_state(
        &self,
        state: State,
        f: impl FnMut(&str, &str, i64) -> std::io::Result<()>,
    ) -> Result<()> {
        Manifest::for_each_in_state(self, state, f)
    }
    fn tasks_of_key(&self, key: &str) -> Result<Vec<Task>> {
        Manifest::tasks_of_key(self, key)
    }
    fn for_each_key(&self, f: impl FnMut(&str, &[Task])) -> Result<()> {
        Manifest::for_each_key(self, f)
    }
    fn estimate_facts(&self) -> Result<BTreeMap<String, String>> {
        Manifest::estimate_facts(self)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::manifest::tests::{done, error, settings, task};
    use crate::manifest::Outcome;
    use crate::s3::{S3Error, Side};

    /// A job's life through the traits only, as the stages live it: plan a page, hand the
    /// store to a run, claim, finish one task done and one failed (a destination PutObject
    /// denied), count requests; then report and resolve. A second backend runs this too.
    async fn a_job_through_the_traits<S>(mut store: S, reopen: impl Fn() -> S)
    where
        S: PlanStore + ResumeStore + ReportStore,
    {
        store.store_settings(&settings()).unwrap();
        assert_eq!(store.require_settings().unwrap(), settings());
        let listed = Listing {
            complete: true,
            pages: 1,
            entries: 2,
            ..Listing::default()
        };
        store
            .insert_page(&[task("k", "v2", 0), task("k", "v1", 1)], &listed)
            .unwrap();
        assert!(store.listing_progress().unwrap().complete);
        assert_eq!(store.count_key("k").unwrap(), 2);
        assert!(store.has_multi_version_key().unwrap());
        assert!(store.open_uploads().unwrap().is_empty());

        let run = store.into_run();
        run.record_attempt_mode(true);
        let groups = run.claim_key_groups(0, 10, 7).await.unwrap();
        assert_eq!(groups.len(), 1);
        let (v1, v2) = (groups[0].tasks[0].id, groups[0].tasks[1].id);
        assert_eq!(groups[0].claimed, Some(v1), "the oldest version first");
        let finished = |id, outcome| Update::Finished { id, outcome };
        run.send_durable(finished(v1, done(0))).await.unwrap();
        run.send(Update::Started { id: v2, at: 8 }).unwrap();
        let denied = S3Error {
            op: "PutObject",
            ..error("AccessDenied", 403)
        };
        run.send(finished(
            v2,
            Outcome::Failed {
                error: denied,
                retries: 1,
            },
        ))
        .unwrap();
        run.send(Update::Requests {
            counts: vec![("PutObject", 2)],
        })
        .unwrap();
        run.flush().await.unwrap();
        drop(run);

        let store = reopen();
        let c = store.counts().unwrap();
        assert_eq!((c.total, c.done, c.failed, c.retries), (2, 1, 1, 1));
        assert_eq!(c.requests.get("PutObject"), Some(&2));
        let p = store.problems(10).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(
            (
                p[0].version_id.as_str(),
                p[0].error_side,
                p[0].error_op.as_deref()
            ),
            ("v2", Some(Side::Dest), Some("PutObject"))
        );
        let mut done_rows = Vec::new();
        store
            .for_each_in_state(State::Done, |key, version, dest| {
                done_rows.push((key.to_string(), version.to_string(), dest));
                Ok(())
            })
            .unwrap();
        assert_eq!(done_rows, [("k".to_string(), "v1".to_string(), 0)]);
        assert_eq!(store.retry_failed().unwrap(), 1);
        assert_eq!(store.counts().unwrap().pending, 1);
    }

    #[tokio::test]
    async fn the_sqlite_manifest_keeps_the_stores_contract() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let m = Manifest::open(&path, true).unwrap();
        a_job_through_the_traits(m, || Manifest::open(&path, false).unwrap()).await;
    }

    /// A PostgreSQL job of its own for one test (Some always: the Option lets a test say
    /// where it needs the server). The server is `S3_BACKFILL_TEST_PG`'s (a URL) when it is
    /// set, else a throwaway cluster this test process starts once with `scripts/pg.sh`
    /// (stopped and dropped when the process ends, however it ends). Without PostgreSQL 15
    /// (`bash scripts/pg.sh install`) the test fails and says so.
    pub(crate) fn pg_job(tag: &str) -> Option<std::path::PathBuf> {
        let url = pg_server();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let sep = if url.contains('?') { '&' } else { '?' };
        Some(format!("{url}{sep}job={tag}-{}-{nanos}", std::process::id()).into())
    }

    /// The test server's URL (see [`pg_job`]).
    fn pg_server() -> String {
        static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        URL.get_or_init(|| {
            if let Ok(url) = std::env::var("S3_BACKFILL_TEST_PG") {
                return url;
            }
            let dir = tempfile::Builder::new()
                .prefix("s3-backfill-lib-pg-")
                .tempdir_in("/tmp")
                .expect("a directory for the test cluster")
                .keep();
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg.sh");
            let out = std::process::Command::new("bash")
                .arg(script)
                .arg("start")
                .arg(&dir)
                .arg("--owner")
                .arg(std::process::id().to_string())
                .output()
                .expect("run scripts/pg.sh");
            assert!(
                out.status.success(),
                "the PostgreSQL tests need PostgreSQL 15 (bash scripts/pg.sh install): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
        .clone()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_postgres_manifest_keeps_the_stores_contract() {
        let Some(job) = pg_job("contract") else {
            return;
        };
        let m = Manifest::open(&job, true).unwrap();
        a_job_through_the_traits(m, || Manifest::open(&job, false).unwrap()).await;
    }
}
