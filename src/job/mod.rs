//! job: the commands (`plan`, `run`, `replicate`, `status`, `report`, `verify`), one file
//! each, as short scripts of stages: arguments → settings → clients → lister → manifest →
//! copier → report/verify. This file owns what every command shares: [`JobError`] (one
//! line), the manifest lock and the probes of a bucket before work starts.
//!
//! - [`open`]: a plan's job opened once (settings → lock → manifest checks → clients →
//!   probes), handing out the lister, selector and manifest.
//! - [`plan`]: `plan` (and `--dry-run`, `--refresh`) and `replicate`.
//! - [`run`]: `run` (a run's job opened, its copier), the listing beside a run, shutdown.
//! - [`exit`]: the exit status, decided in one function from how a command ended.
//! - [`status`], [`report`], [`verify`]: the reading commands.
//! - [`routed`]: a side's client routing each request to its bucket's region.
//!
//! May call: every stage.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::{ConfigError, SideConfig};
use crate::lister::ListError;
use crate::manifest::{Manifest, ManifestError};
use crate::s3::{
    build, BucketFacts, RetryPolicy, S3Client, S3Error, SdkClient, Side, Timeouts, S3,
};
use crate::ui;

pub mod exit;
mod follow;
mod open;
mod plan;
mod report;
mod routed;
pub(crate) mod run;
mod status;
mod verify;

pub use follow::{follow, Followed};
pub use plan::{plan, replicate};
pub use report::report;
pub use routed::RoutedClient;
pub use run::{run, signals, Shutdown};
pub use status::status;
pub use verify::verify;

/// Why a command could not do its work. Each maps to an exit code and prints as one line.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Bad input or configuration (exit 2).
    #[error("{0}")]
    Usage(String),
    /// Bad configuration value (exit 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The manifest cannot be used (exit 2 unless SQLite itself failed).
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// An S3 error that stopped the command.
    #[error("{0}")]
    S3(S3Error),
    /// Anything else (exit 3).
    #[error("{0}")]
    Other(String),
}

impl JobError {
    /// The one line printed for this error, with a hint where one helps.
    pub fn line(&self) -> String {
        match self {
            JobError::S3(s) => match ui::checksum_hint(s) {
                Some(h) => format!("error: {self} ({h})"),
                None => format!("error: {self}"),
            },
            _ => format!("error: {self}"),
        }
    }
}

impl From<ListError> for JobError {
    fn from(e: ListError) -> Self {
        match e {
            ListError::S3(e) => JobError::S3(e),
            ListError::Manifest(m) => JobError::Manifest(m),
            ListError::Refused(m) => JobError::Usage(m),
        }
    }
}

impl From<S3Error> for JobError {
    fn from(e: S3Error) -> Self {
        JobError::S3(e)
    }
}

/// An exclusive lock on a manifest, held by a file lock beside it (`JOB.db.lock`, mode
/// 0600). The operating system releases it when the process dies, so a stale lock never
/// blocks.
/// A PostgreSQL manifest has none: any number of processes share it (runs claim leased
/// units of work).
pub struct ManifestLock {
    _file: Option<File>,
    lock_path: PathBuf,
    manifest: PathBuf,
}

impl Drop for ManifestLock {
    fn drop(&mut self) {
        // A plan that failed before creating its manifest leaves nothing behind.
        if self._file.is_some() && !self.manifest.exists() {
            let _ = std::fs::remove_file(&self.lock_path);
        }
    }
}

/// Takes the manifest's lock or explains who holds it.
pub fn lock_manifest(path: &Path) -> Result<ManifestLock, JobError> {
    if let crate::manifest::Location::Postgres(_) =
        crate::manifest::Location::of(path).map_err(JobError::Usage)?
    {
        return Ok(ManifestLock {
            _file: None,
            lock_path: PathBuf::new(),
            manifest: path.to_path_buf(),
        });
    }
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let mut opts = File::options();
    opts.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(&lock_path)
        .map_err(|e| JobError::Usage(format!("cannot open lock {}: {e}", lock_path.display())))?;
    match f.try_lock() {
        Ok(()) => {
            let _ = f.set_len(0);
            let _ = writeln!(f, "{}", std::process::id());
            Ok(ManifestLock {
                _file: Some(f),
                lock_path,
                manifest: path.to_path_buf(),
            })
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
            Err(JobError::Usage(format!(
                "manifest {} is in use by another s3-backfill process (pid {}); wait for it or stop it",
                path.display(),
                holder.trim()
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(JobError::Usage(format!(
            "cannot lock {}: {e}",
            lock_path.display()
        ))),
    }
}

/// The error of a bucket probe, said for a person.
fn bucket_error(side: Side, bucket: &str, e: S3Error) -> JobError {
    let what = match (e.status, e.code.as_deref()) {
        (_, Some("NoSuchBucket")) | (Some(404), _) => format!("bucket {bucket} does not exist"),
        (_, Some("AccessDenied")) | (Some(403), _) => format!(
            "access denied to bucket {bucket} (check the {side} credentials, profile and endpoint)"
        ),
        (_, Some("InvalidAccessKeyId")) | (_, Some("SignatureDoesNotMatch")) => format!(
            "the {side} credentials are not valid for bucket {bucket} ({})",
            e.code.as_deref().unwrap_or_default()
        ),
        _ => return JobError::S3(e),
    };
    JobError::S3(S3Error { message: what, ..e })
}

/// A handle for the probes made before a stage starts (buckets, configuration): fewer
/// attempts than a stage's requests, a loop of its own.
fn preflight<C: S3Client + Clone>(client: &C) -> S3<C> {
    let policy = RetryPolicy {
        max_attempts: 4,
        ..RetryPolicy::default()
    };
    S3::with_policy(client.clone(), policy, 4)
}

/// Builds a side's client and probes its bucket. A bucket in another region than the one
/// asked for (S3 answers 301 naming it) is probed again in its own region, which is kept in
/// `side` so that `run` reads it there too.
async fn open_side(
    which: Side,
    side: &mut SideConfig,
    bucket: &str,
    timeouts: Timeouts,
) -> Result<(SdkClient, BucketFacts), JobError> {
    let (client, _) = build(which, side, timeouts).await;
    match preflight(&client).req().probe_bucket(bucket).await {
        Ok(facts) => {
            if side.region.is_none() {
                side.region = facts.region.clone();
            }
            Ok((client, facts))
        }
        Err(e) if e.status == Some(301) && e.bucket_region.is_some() => {
            side.region = e.bucket_region.clone();
            let (client, _) = build(which, side, timeouts).await;
            let facts = preflight(&client)
                .req()
                .probe_bucket(bucket)
                .await
                .map_err(|e| bucket_error(which, bucket, e))?;
            Ok((client, facts))
        }
        Err(e) => Err(bucket_error(which, bucket, e)),
    }
}

/// The manifest's counts after a run, for its summary line.
pub fn counts_after(manifest: &Path) -> Option<crate::manifest::Counts> {
    Manifest::open(manifest, false)
        .and_then(|m| m.counts())
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_file_is_private_and_held_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("job.db");
        let lock = lock_manifest(&m).unwrap();
        let mode = std::fs::metadata(dir.path().join("job.db.lock"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "key names are private: lock {mode:o}");
        let second = lock_manifest(&m).err().expect("a second holder is refused");
        assert_eq!(exit::Exit::of(exit::Ended::Error(&second)).code(), 2);
        drop(lock);
    }
}
