//! Driving the binary under test: the one job builder every test file and bench uses
//! ([`Job`]), the process helpers, the typed `status --json`, and the manifest's rows (the
//! only place the tests read the manifest's SQL).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::server::{KEY_ID, SECRET};

/// The s3-backfill binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_s3-backfill"))
}

/// A command for the binary with test credentials and no instance-metadata lookups.
pub fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(args)
        .env("AWS_ACCESS_KEY_ID", KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_REGION", "us-east-1")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .stdin(Stdio::null());
    c
}

/// Runs the binary and returns its output.
pub fn run(args: &[&str]) -> Output {
    cmd(args).output().expect("run s3-backfill")
}

/// Runs the binary with its standard output a pipe whose reader has already gone (as
/// `s3-backfill status | head` once `head` has its line): its exit code and stderr.
pub fn run_into_closed_pipe(args: &[&str]) -> (Option<i32>, String) {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills two new descriptors, each owned exactly once below.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(reader);
    let o = cmd(args)
        .stdout(Stdio::from(writer))
        .output()
        .expect("run s3-backfill");
    (o.status.code(), stderr_of(&o))
}

/// `args` as the `&str` slice that [`run`] and [`cmd`] take.
pub fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Panics with both output streams unless the process exited with `code`.
pub fn expect_code(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "exit status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Standard error as text.
pub fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A manifest path in a fresh temporary directory (kept alive by the returned guard).
pub fn manifest() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("job.db");
    (d, p)
}

/// One job of the binary: source, destination, manifest, how each side is reached, and the
/// job's options. Builds the arguments of `plan`, `replicate` and `run`, and runs them.
///
/// ```ignore
/// let job = Job::new(&src, &format!("{dst}/prefix/"), &m).endpoint(&ep).extra(&["--delete-markers"]);
/// expect_code(&job.replicate(), 0);
/// assert_eq!(job.status().done, 10);
/// ```
#[derive(Clone, Debug)]
pub struct Job {
    source: String,
    dest: String,
    manifest: PathBuf,
    sides: Vec<String>,
    options: Vec<String>,
}

impl Job {
    /// A job from `s3://{src}` to `s3://{dst}` (either may carry `/prefix/`) with manifest
    /// `m`; no side options yet (see [`Job::endpoint`]).
    pub fn new(src: &str, dst: &str, m: &Path) -> Job {
        Job {
            source: format!("s3://{src}"),
            dest: format!("s3://{dst}"),
            manifest: m.to_path_buf(),
            sides: Vec::new(),
            options: Vec::new(),
        }
    }

    /// Both sides on one endpoint, path-style.
    pub fn endpoint(self, ep: &str) -> Job {
        self.endpoints(ep, ep)
    }

    /// Each side on its endpoint, path-style.
    pub fn endpoints(mut self, source: &str, dest: &str) -> Job {
        self.sides = [
            "--source-endpoint",
            source,
            "--dest-endpoint",
            dest,
            "--path-style",
        ]
        .map(String::from)
        .to_vec();
        self
    }

    /// Each side through an AWS profile (endpoint, region and keys from the profile),
    /// path-style.
    pub fn profiles(mut self, source: &str, dest: &str) -> Job {
        self.sides = [
            "--source-profile",
            source,
            "--dest-profile",
            dest,
            "--path-style",
        ]
        .map(String::from)
        .to_vec();
        self
    }

    /// Adds job options (selection, copy settings, run knobs) to `plan` and `replicate`.
    pub fn extra(mut self, options: &[&str]) -> Job {
        self.options.extend(options.iter().map(|s| s.to_string()));
        self
    }

    /// The manifest's path.
    pub fn manifest(&self) -> &Path {
        &self.manifest
    }

    /// The manifest's path as text (for hand-made command lines).
    pub fn m(&self) -> &str {
        self.manifest.to_str().expect("utf-8 manifest path")
    }

    fn verb_args(&self, verb: &str) -> Vec<String> {
        let mut a: Vec<String> = vec![
            verb.into(),
            "--source".into(),
            self.source.clone(),
            "--dest".into(),
            self.dest.clone(),
            "--manifest".into(),
            self.m().into(),
        ];
        a.extend(self.sides.iter().cloned());
        a.extend(self.options.iter().cloned());
        a.push("--no-progress".into());
        a
    }

    /// The arguments of `plan`.
    pub fn plan_args(&self) -> Vec<String> {
        self.verb_args("plan")
    }

    /// The arguments of `replicate`.
    pub fn replicate_args(&self) -> Vec<String> {
        self.verb_args("replicate")
    }

    /// The arguments of `run` on this manifest, followed by `extra` (run knobs only: the job
    /// options are stored in the manifest).
    pub fn run_args(&self, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = ["run", "--manifest", self.m(), "--no-progress"]
            .map(String::from)
            .to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// Runs `plan`.
    pub fn plan(&self) -> Output {
        run(&strs(&self.plan_args()))
    }

    /// Runs `replicate`.
    pub fn replicate(&self) -> Output {
        run(&strs(&self.replicate_args()))
    }

    /// Runs `run` with `extra`.
    pub fn run(&self, extra: &[&str]) -> Output {
        run(&strs(&self.run_args(extra)))
    }

    /// Runs `verify`.
    pub fn verify(&self) -> Output {
        run(&["verify", "--manifest", self.m()])
    }

    /// Runs `report` with `extra` (e.g. `--format csv`).
    pub fn report(&self, extra: &[&str]) -> Output {
        let mut a = vec!["report", "--manifest", self.m()];
        a.extend_from_slice(extra);
        run(&a)
    }

    /// `status --json`, typed.
    pub fn status(&self) -> Status {
        status(&self.manifest)
    }

    /// Every task of the manifest.
    pub fn tasks(&self) -> Vec<TaskRow> {
        manifest_tasks(&self.manifest)
    }
}

/// `status --json`, as a user reads it. Fields the binary does not print (yet) read as 0;
/// fields the tests do not know are ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct Status {
    /// Every task.
    pub total: u64,
    /// Not started.
    pub pending: u64,
    /// Started, not finished.
    pub in_progress: u64,
    /// Copied.
    pub done: u64,
    /// Failed.
    pub failed: u64,
    /// Skipped (source gone, archived, or skipped by the user).
    pub skipped: u64,
    /// Open tasks waiting behind a failed older version of their key.
    pub blocked: u64,
    /// Bytes of all object versions.
    pub bytes_total: u64,
    /// Bytes of done object versions.
    pub bytes_done: u64,
    /// Delete markers among the tasks.
    pub delete_markers: u64,
    /// Retries spent.
    pub retries: u64,
    /// Attempts started.
    pub attempts: u64,
    /// Done multipart copies that kept the source's ETag.
    pub etag_preserved: u64,
    /// Done copies whose ETag changed (multipart sources, copies in parts).
    #[serde(default)]
    pub etag_changed: u64,
    /// Why they changed: reason, count.
    #[serde(default)]
    pub etag_changes: std::collections::BTreeMap<String, u64>,
    /// The listing is complete.
    pub listing_complete: bool,
    /// Entries seen by the listing.
    pub listed_entries: u64,
}

/// `status --json` of a manifest, or None when `status` fails or prints no JSON (e.g. a
/// manifest that a killed `plan` left without a job).
pub fn try_status(m: &Path) -> Option<Status> {
    let o = run(&["status", "--manifest", m.to_str()?, "--json"]);
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

/// `status --json` of a manifest; panics with the error when it fails.
pub fn status(m: &Path) -> Status {
    let o = run(&["status", "--manifest", m.to_str().unwrap(), "--json"]);
    assert!(
        o.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json does not parse ({e}): {}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

/// One row of the manifest's tasks, as the tests read it.
#[derive(Clone, Debug)]
pub struct TaskRow {
    /// Source key.
    pub key: String,
    /// Source version id.
    pub version_id: String,
    /// pending, in_progress, done, failed or skipped.
    pub state: String,
    /// How it was copied.
    pub copy_method: Option<String>,
    /// Part size of a multipart copy.
    pub part_size: Option<i64>,
    /// Parts of a multipart copy.
    pub parts: Option<i64>,
    /// Whether the multipart ETag was preserved (0/1).
    pub etag_preserved: Option<i64>,
    /// Upload in progress.
    pub upload_id: Option<String>,
    /// The destination version written for this task.
    pub dest_version_id: Option<String>,
    /// Attempts started.
    pub attempts: i64,
    /// The destination (`destinations.id`; 0 is the job's --dest).
    pub dest: i64,
}

/// Every task of a manifest, read-only, in id order. The one place the tests read the
/// manifest's tables: a schema change is followed here. SQLite files only: a job whose
/// `--manifest` is a `postgres://` URL (which [`Job::new`] takes as its path) is read with
/// `status --json`, `report`, or `pg::psql`.
pub fn manifest_tasks(path: &Path) -> Vec<TaskRow> {
    assert!(
        !path.to_string_lossy().starts_with("postgres"),
        "manifest_tasks reads SQLite files; read {} with status --json, report or psql",
        path.display()
    );
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open the manifest read-only");
    let mut stmt = conn
        .prepare(
            "SELECT key, version_id, state, copy_method, part_size, parts, etag_preserved,
             upload_id, dest_version_id, attempts, dest FROM tasks ORDER BY id",
        )
        .expect("prepare");
    stmt.query_map([], |r| {
        Ok(TaskRow {
            key: r.get(0)?,
            version_id: r.get(1)?,
            state: r.get(2)?,
            copy_method: r.get(3)?,
            part_size: r.get(4)?,
            parts: r.get(5)?,
            etag_preserved: r.get(6)?,
            upload_id: r.get(7)?,
            dest_version_id: r.get(8)?,
            attempts: r.get(9)?,
            dest: r.get(10)?,
        })
    })
    .expect("query tasks")
    .collect::<Result<Vec<_>, _>>()
    .expect("read tasks")
}

/// Waits for the child to exit, at most `limit`; None when it is still running.
pub async fn wait_until(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        if start.elapsed() >= limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Lets the child run for `after`, then kills it with SIGKILL (unless it finished first).
/// Returns whether the kill happened, and the child's output.
pub async fn kill_after(mut child: Child, after: Duration) -> (bool, Output) {
    let exited = wait_until(&mut child, after).await.is_some();
    if !exited {
        child.kill().expect("SIGKILL");
    }
    (!exited, child.wait_with_output().expect("wait"))
}
