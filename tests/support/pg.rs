//! pg: the PostgreSQL server the tests talk to: one throwaway cluster per test binary
//! (`scripts/pg.sh start`, stopped and dropped by the script's watchdog when the test process
//! exits, however it exits), a fresh database per test so that tests run in parallel without
//! sharing tables, a restart in place, and `psql` for reading what a test needs to check.
//!
//! Environment:
//! - `S3_BACKFILL_TEST_PG`: the DSN of a server that is already running (a superuser, since
//!   tests create databases) instead of a cluster of this binary's own; `pg_restart` then
//!   refuses (it cannot restart someone else's server).
//!
//! May call: `scripts/pg.sh`, `psql` (Debian's PostgreSQL 15 client, else the one on PATH), and
//! the kit's `bucket` for unique names.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

const DEBIAN_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The cluster this binary started: its directory (None when `S3_BACKFILL_TEST_PG` names one)
/// and its DSN.
struct Cluster {
    dir: Option<PathBuf>,
    dsn: String,
}

/// `scripts/pg.sh`.
pub fn script_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/pg.sh")
}

fn given_dsn() -> Option<String> {
    std::env::var("S3_BACKFILL_TEST_PG")
        .ok()
        .filter(|d| !d.is_empty())
}

/// `psql`: Debian's PostgreSQL 15 one, else the one on PATH.
pub fn psql_binary() -> PathBuf {
    let debian = Path::new(DEBIAN_BIN).join("psql");
    if debian.exists() {
        debian
    } else {
        PathBuf::from("psql")
    }
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

/// Whether the PostgreSQL tests can run here: a server is given (`S3_BACKFILL_TEST_PG`), or
/// initdb, pg_ctl and psql are installed (`bash scripts/pg.sh install`). Tests that need
/// PostgreSQL and may be skipped say so and return when this is false.
pub fn pg_available() -> bool {
    if given_dsn().is_some() {
        return true;
    }
    ["initdb", "pg_ctl", "psql"]
        .iter()
        .all(|b| Path::new(DEBIAN_BIN).join(b).exists() || on_path(b))
}

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| match given_dsn() {
        Some(dsn) => Cluster { dir: None, dsn },
        None => start_cluster(),
    })
}

/// Runs `scripts/pg.sh ARGS`; panics with its output when it fails. Returns its stdout.
fn pg_sh(args: &[&std::ffi::OsStr]) -> String {
    let o = Command::new("bash")
        .arg(script_path())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script_path().display()));
    assert!(
        o.status.success(),
        "scripts/pg.sh {:?} failed ({}); install PostgreSQL with `bash scripts/pg.sh install`\nstdout:\n{}\nstderr:\n{}",
        args,
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Starts a cluster in a new directory under the temp dir, owned by this process (the
/// script's watchdog stops it and drops its data when this process goes away).
pub fn start_owned_cluster(tag: &str) -> (PathBuf, String) {
    static N: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!(
        "s3-backfill-pg-{tag}-{pid}-{}",
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let pid_s = pid.to_string();
    let out = pg_sh(&[
        "start".as_ref(),
        dir.as_os_str(),
        "--owner".as_ref(),
        pid_s.as_ref(),
    ]);
    let dsn = out.lines().last().unwrap_or_default().trim().to_string();
    assert!(
        dsn.starts_with("postgres://"),
        "pg.sh start printed no DSN: {out:?}"
    );
    eprintln!("pg: {dsn}, log in {}", dir.join("log").display());
    (dir, dsn)
}

/// Stops a cluster of [`start_owned_cluster`] (fast shutdown).
pub fn stop_cluster(dir: &Path) {
    pg_sh(&["stop".as_ref(), dir.as_os_str()]);
}

/// Starts a cluster stopped by [`stop_cluster`] again: its data and port kept.
pub fn restart_stopped_cluster(dir: &Path) {
    pg_sh(&["start".as_ref(), dir.as_os_str()]);
}

fn start_cluster() -> Cluster {
    let (dir, dsn) = start_owned_cluster("test");
    Cluster {
        dir: Some(dir),
        dsn,
    }
}

/// The DSN of this binary's PostgreSQL server (started on first use): its `postgres`
/// database, as the superuser.
pub fn pg_dsn() -> String {
    cluster().dsn.clone()
}

/// `dsn` with its database replaced by `db` (the user, host, port and query kept).
pub fn with_database(dsn: &str, db: &str) -> String {
    let (base, query) = match dsn.find('?') {
        Some(i) => dsn.split_at(i),
        None => (dsn, ""),
    };
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let authority_end = base[authority_start..]
        .find('/')
        .map(|i| authority_start + i)
        .unwrap_or(base.len());
    format!("{}/{db}{query}", &base[..authority_end])
}

/// Creates a database that no other test uses (named as [`super::bucket`] names buckets,
/// from `tag`) and returns its DSN.
pub fn fresh_database(tag: &str) -> String {
    let clean: String = tag
        .chars()
        .take(30)
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let name = format!("t_{}", super::bucket(&clean).replace('-', "_"));
    psql(&pg_dsn(), &format!("CREATE DATABASE \"{name}\""));
    with_database(&pg_dsn(), &name)
}

fn own_dir(what: &str) -> &'static Path {
    cluster().dir.as_deref().unwrap_or_else(|| {
        panic!("{what}: the server is S3_BACKFILL_TEST_PG's, not this test's to restart")
    })
}

/// Restarts this binary's cluster in place (fast shutdown: sessions are cut, committed data
/// stays; same port). Panics when the server was given by `S3_BACKFILL_TEST_PG`.
pub fn pg_restart() {
    let dir = own_dir("pg_restart");
    pg_sh(&["restart".as_ref(), dir.as_os_str()]);
}

/// Restarts this binary's cluster as after a crash (immediate shutdown: no checkpoint, the
/// server replays its WAL on start; same port). Panics when the server was given by
/// `S3_BACKFILL_TEST_PG`.
pub fn pg_crash_restart() {
    let dir = own_dir("pg_crash_restart");
    pg_sh(&["restart".as_ref(), dir.as_os_str(), "immediate".as_ref()]);
}

/// The server log of this binary's cluster so far (None when the server was given).
pub fn pg_log() -> Option<String> {
    let dir = cluster().dir.as_ref()?;
    Some(std::fs::read_to_string(dir.join("log")).unwrap_or_default())
}

/// Runs SQL with `psql` against `dsn` (stopping at the first error) and returns its rows,
/// one line each, columns separated by `|`; panics with psql's message when it fails.
pub fn psql(dsn: &str, sql: &str) -> String {
    let o = psql_output(dsn, sql);
    assert!(
        o.status.success(),
        "psql {sql:?} on {dsn} failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr).trim()
    );
    String::from_utf8_lossy(&o.stdout).trim_end().to_string()
}

/// `psql` as [`psql`] runs it, whatever its outcome (for tests that expect an error).
pub fn psql_output(dsn: &str, sql: &str) -> std::process::Output {
    Command::new(psql_binary())
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            dsn,
            "-c",
            sql,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run psql: {e}; install it with `bash scripts/pg.sh install`")
        })
}

/// Runs `scripts/pg.sh` with these arguments (for tests of the script itself); panics when
/// it fails and returns its stdout.
pub fn pg_script(args: &[&str]) -> String {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    pg_sh(&args)
}
