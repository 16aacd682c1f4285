//! manifest::backend: where a job's manifest lives ([`Location`]: a SQLite file, or a job in
//! a PostgreSQL database named by a `postgres://` URL) and the [`Manifest`] every stage
//! holds, which is either backend. Its methods are the backends' own, forwarded: the two
//! keep the same contract (`store`'s traits, and the conformance tests run on both).
//!
//! May call: `SqliteManifest`, `pg::PgManifest`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::pg::PgManifest;
use super::{
    BucketStateCount, Counts, FollowFacts, KeyGroup, LagHistogram, LagStats, ListedPage, Listing,
    ListingProgress, ManifestError, NewTask, Partition, PendingChange, PendingKeys, Problem,
    Refresh, RefreshKind, Result, RunProgress, SqliteManifest, State, Task, Writer,
};
use crate::config::JobSettings;

/// Where a manifest lives, from `--manifest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file (the default).
    File(PathBuf),
    /// A job in a PostgreSQL database.
    Postgres(PgLocation),
}

/// A job in a PostgreSQL database: `postgres://USER@HOST:PORT/DB?job=NAME&...` (any
/// libpq-style URL; a Unix socket directory as `host=/path`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgLocation {
    /// The URL as the client library takes it (without `job`).
    pub url: String,
    /// The job's name (`default` when the URL names none).
    pub job: String,
    /// The URL without its password, with the job: for messages.
    pub shown: String,
}

/// The job name used when a URL names none.
pub const DEFAULT_JOB: &str = "default";

impl Location {
    /// Where `--manifest` says: a `postgres://` or `postgresql://` URL, else a file.
    pub fn of(path: &Path) -> std::result::Result<Location, String> {
        let text = path.to_string_lossy();
        if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
            return Ok(Location::File(path.to_path_buf()));
        }
        let (base, query) = match text.split_once('?') {
            Some((b, q)) => (b.to_string(), q.to_string()),
            None => (text.to_string(), String::new()),
        };
        let mut job = None;
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.strip_prefix("job=") {
                Some(name) => job = Some(name.to_string()),
                None => rest.push(pair),
            }
        }
        let job = job.unwrap_or_else(|| DEFAULT_JOB.to_string());
        let valid = !job.is_empty()
            && job.len() <= 48
            && job
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(format!(
                "--manifest: job name {job:?} in the URL: use 1 to 48 letters, digits, - or _"
            ));
        }
        let url = match rest.is_empty() {
            true => base.clone(),
            false => format!("{base}?{}", rest.join("&")),
        };
        url.parse::<postgres::Config>()
            .map_err(|e| format!("--manifest: not a PostgreSQL URL: {e}"))?;
        let shown = format!("{}?job={job}", without_password(&base));
        Ok(Location::Postgres(PgLocation { url, job, shown }))
    }

    /// Whether a manifest is there already (a file exists; a job exists in its database).
    pub fn exists(&self) -> Result<bool> {
        match self {
            Location::File(p) => Ok(p.exists()),
            Location::Postgres(l) => PgManifest::job_exists(l),
        }
    }

    /// The manifest's name for messages (a URL without its password).
    pub fn shown(&self) -> String {
        match self {
            Location::File(p) => p.display().to_string(),
            Location::Postgres(l) => l.shown.clone(),
        }
    }
}

/// The job's short name (a metrics label, the AWS-shaped report's default job id): a file's
/// name without its extension, or a PostgreSQL job's name.
pub fn job_name(path: &Path) -> String {
    match Location::of(path) {
        Ok(Location::Postgres(l)) => l.job,
        _ => path
            .file_stem()
            .map_or_else(|| "job".into(), |s| s.to_string_lossy().into_owned()),
    }
}

/// `--manifest` as messages show it: a file's path, or a URL without its password.
pub fn shown(path: &Path) -> String {
    Location::of(path).map_or_else(
        |_| without_password(&path.display().to_string()),
        |l| l.shown(),
    )
}

/// `postgres://user:secret@host/db` without `:secret`.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((a, h)) => (a, h),
        None => return url.to_string(),
    };
    let user = auth.split(':').next().unwrap_or("");
    format!("{scheme}://{user}@{host}")
}

/// A job's manifest, on either backend (see the module header).
pub enum Manifest {
    /// A SQLite file.
    Sqlite(SqliteManifest),
    /// A job in PostgreSQL.
    Pg(PgManifest),
}

/// Forwards `&self` methods to the backend.
macro_rules! forward {
    ($( $(#[$m:meta])* fn $name:ident(&self $(, $a:ident : $t:ty)*) -> $r:ty; )*) => {
        $( $(#[$m])* pub fn $name(&self $(, $a: $t)*) -> $r {
            match self {
                Manifest::Sqlite(m) => m.$name($($a),*),
                Manifest::Pg(m) => m.$name($($a),*),
            }
        } )*
    };
}

/// Forwards `&mut self` methods to the backend.
macro_rules! forward_mut {
    ($( $(#[$m:meta])* fn $name:ident(&mut self $(, $a:ident : $t:ty)*) -> $r:ty; )*) => {
        $( $(#[$m])* pub fn $name(&mut self $(, $a: $t)*) -> $r {
            match self {
                Manifest::Sqlite(m) => m.$name($($a),*),
                Manifest::Pg(m) => m.$name($($a),*),
            }
        } )*
    };
}

impl Manifest {
    /// Opens the manifest `--manifest` names (a file or a `postgres://` URL), creating it
    /// when `create` is true.
    pub fn open(path: &Path, create: bool) -> Result<Manifest> {
        let location =
            Location::of(path).map_err(|why| ManifestError::BadLocation(shown(path), why))?;
        Manifest::open_at(&location, create)
    }

    /// [`Manifest::open`] of a parsed location.
    pub fn open_at(location: &Location, create: bool) -> Result<Manifest> {
        match location {
            Location::File(p) => SqliteManifest::open(p, create).map(Manifest::Sqlite),
            Location::Postgres(l) => PgManifest::open(l, create).map(Manifest::Pg),
        }
    }

    /// Whether this manifest is shared by several processes (PostgreSQL): no file lock, and
    /// runs claim leased units.
    pub fn is_shared(&self) -> bool {
        matches!(self, Manifest::Pg(_))
    }

    /// The next listing part to list, claimed (shared manifests): its id and lease epoch;
    /// None when every part is complete or listed by a live process. A SQLite manifest has
    /// one lister: None (it lists every unfinished part itself).
    pub fn claim_partition(&self) -> Result<Option<(i64, i64)>> {
        match self {
            Manifest::Sqlite(_) => Ok(None),
            Manifest::Pg(m) => m.claim_partition(),
        }
    }

    /// Renews a claimed part's lease: false when it was taken over.
    pub fn renew_partition(&self, id: i64, epoch: i64) -> Result<bool> {
        match self {
            Manifest::Sqlite(_) => Ok(true),
            Manifest::Pg(m) => m.renew_partition(id, epoch),
        }
    }

    /// The manifest's name as given (a URL without its password).
    pub fn path(&self) -> &str {
        match self {
            Manifest::Sqlite(m) => m.path(),
            Manifest::Pg(m) => m.path(),
        }
    }

    /// Starts the writer that owns this connection for the rest of a run.
    pub fn into_writer(self) -> Writer {
        match self {
            Manifest::Sqlite(m) => m.into_writer(),
            Manifest::Pg(m) => m.into_writer(),
        }
    }

    /// Every failed, skipped and blocked task, streamed to `f`.
    pub fn for_each_problem(&self, f: impl FnMut(Problem) -> std::io::Result<()>) -> Result<()> {
        match self {
            Manifest::Sqlite(m) => m.for_each_problem(f),
            Manifest::Pg(m) => m.for_each_problem(f),
        }
    }

    /// Key, version id and destination of every task in `state`, streamed to `f`.
    pub fn for_each_in_state(
        &self,
        state: State,
        f: impl FnMut(&str, &str, i64) -> std::io::Result<()>,
    ) -> Result<()> {
        match self {
            Manifest::Sqlite(m) => m.for_each_in_state(state, f),
            Manifest::Pg(m) => m.for_each_in_state(state, f),
        }
    }

    /// Every key's tasks, key by key (the estimate).
    pub fn for_each_key(&self, f: impl FnMut(&str, &[Task])) -> Result<()> {
        match self {
            Manifest::Sqlite(m) => m.for_each_key(f),
            Manifest::Pg(m) => m.for_each_key(f),
        }
    }

    forward! {
        /// The stored job settings, if `plan` stored them.
        fn settings(&self) -> Result<Option<JobSettings>>;
        /// The stored settings; an error when there are none.
        fn require_settings(&self) -> Result<JobSettings>;
        /// Stores (or replaces) the job settings and its destinations.
        fn store_settings(&self, s: &JobSettings) -> Result<()>;
        /// Short waits for a lock held by a lister beside a run (SQLite; nothing to do on
        /// PostgreSQL).
        fn wait_for_locks_briefly(&self) -> Result<()>;
        /// The checkpoints of every part, summed.
        fn listing(&self) -> Result<Listing>;
        /// The listing's parts, each with its checkpoint.
        fn partitions(&self) -> Result<Vec<Partition>>;
        /// The listings that added tasks: `plan`, then each refresh.
        fn refreshes(&self) -> Result<Vec<Refresh>>;
        /// Tasks the last refresh found deleted at the source: how many, and the first keys.
        fn deleted_at_source(&self, limit: usize) -> Result<(u64, Vec<String>)>;
        /// Tasks of one key so far.
        fn count_key(&self, key: &str) -> Result<u64>;
        /// Whether some key has more than one task.
        fn has_multi_version_key(&self) -> Result<bool>;
        /// Every task of one key.
        fn tasks_of_key(&self, key: &str) -> Result<Vec<Task>>;
        /// Tasks with a multipart upload still open at the destination.
        fn open_uploads(&self) -> Result<Vec<Task>>;
        /// Done tasks whose destination version id is still to be learned.
        fn versions_to_learn(&self) -> Result<Vec<Task>>;
        /// The next key groups with open tasks after a key id.
        fn next_key_groups(&self, after_key_id: i64, limit: usize) -> Result<Vec<KeyGroup>>;
        /// Where the listing stands over all its parts.
        fn listing_progress(&self) -> Result<ListingProgress>;
        /// Why the ETags of done tasks changed: reason, count.
        fn etag_changes(&self) -> Result<BTreeMap<String, u64>>;
        /// Task counts as `status` shows them.
        fn counts(&self) -> Result<Counts>;
        /// Failed, skipped and blocked tasks, at most `limit`.
        fn problems(&self, limit: usize) -> Result<Vec<Problem>>;
        /// Failed tasks back to pending; how many.
        fn retry_failed(&self) -> Result<usize>;
        /// Skipped tasks back to pending: how many, and how many kept as out of order.
        fn retry_skipped(&self) -> Result<(usize, usize)>;
        /// Failed tasks marked skipped; how many.
        fn skip_failed(&self) -> Result<usize>;
        /// Stores one fact for the cost estimate.
        fn store_estimate_fact(&self, name: &str, value: &str) -> Result<()>;
        /// The facts stored for the estimate.
        fn estimate_facts(&self) -> Result<BTreeMap<String, String>>;
        /// Marks the job as followed.
        fn start_following(&self) -> Result<()>;
        /// Records changes events named, to be listed by a scoped refresh.
        fn add_pending(&self, changes: &[PendingChange]) -> Result<()>;
        /// The keys events named that wait for a scoped refresh.
        fn pending_keys(&self, limit: usize) -> Result<PendingKeys>;
        /// What `follow` keeps about itself.
        fn follow_facts(&self) -> Result<FollowFacts>;
        /// The refresh generations `follow` made.
        fn follow_generations(&self) -> Result<Vec<(i64, String, u64)>>;
        /// Lag percentiles.
        fn lag_stats(&self, since_ms: Option<i64>) -> Result<LagStats>;
        /// The lag histogram.
        fn lag_histogram(&self, bounds_secs: &[f64]) -> Result<LagHistogram>;
        /// Tasks and bytes by destination bucket and state.
        fn counts_by_bucket(&self) -> Result<Vec<BucketStateCount>>;
        /// The running run's rate and ETA, if one is running.
        fn run_progress(&self) -> Result<Option<RunProgress>>;
    }

    forward_mut! {
        /// Splits the key space into parts before anything is listed.
        fn split_partitions(&mut self, starts: &[String]) -> Result<bool>;
        /// One page of tasks of the only part, with its checkpoint.
        fn insert_page(&mut self, tasks: &[NewTask], checkpoint: &Listing) -> Result<()>;
        /// One page of tasks of one part, with its checkpoint.
        fn insert_partition_page(&mut self, partition: i64, tasks: &[NewTask], checkpoint: &Listing) -> Result<()>;
        /// One listed page of a part and the part's checkpoint after it, atomically.
        fn insert_listed_page(&mut self, partition: i64, page: &ListedPage<'_>, checkpoint: &Listing) -> Result<()>;
        /// Starts a refresh of a versioned source.
        fn start_refresh(&mut self) -> Result<Option<i64>>;
        /// Starts a refresh (a new listing generation).
        fn start_refresh_of(&mut self, source_versioned: bool) -> Result<Option<i64>>;
        /// Starts a scoped or full refresh for `follow`.
        fn start_follow_refresh(&mut self, kind: RefreshKind, pending: &PendingKeys, source_versioned: bool) -> Result<Option<i64>>;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_names_a_postgres_job_and_a_path_a_file() {
        let l = Location::of(Path::new("job.db")).unwrap();
        assert_eq!(l, Location::File(PathBuf::from("job.db")));
        let Location::Postgres(l) = Location::of(Path::new(
            "postgres://me:s3cret@db.example:5433/lake?job=day-1&sslmode=disable",
        ))
        .unwrap() else {
            panic!("not a postgres location");
        };
        assert_eq!(l.job, "day-1");
        assert_eq!(
            l.url,
            "postgres://me:s3cret@db.example:5433/lake?sslmode=disable"
        );
        assert_eq!(l.shown, "postgres://me@db.example:5433/lake?job=day-1");
        assert!(!l.shown.contains("s3cret"));
        let Location::Postgres(l) =
            Location::of(Path::new("postgresql://me@/lake?host=/run/postgresql")).unwrap()
        else {
            panic!("not a postgres location");
        };
        assert_eq!(l.job, DEFAULT_JOB);
        let bad = Location::of(Path::new("postgres://me@h/db?job=a%20b")).unwrap_err();
        assert!(bad.contains("job name"), "{bad}");
    }
}
