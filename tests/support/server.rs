//! The S3 servers the tests talk to: which kind runs (`S3_BACKFILL_TEST_SERVER=moto|rgw`,
//! default moto), one server per test binary, a second one for two-provider tests, and the
//! accounts on them. Starting a server is all this file does; it calls `scripts/rgw.sh` for
//! Ceph RGW and the moto binary for moto.
//!
//! Environment:
//! - `S3_BACKFILL_TEST_SERVER`: `moto` (default) or `rgw`; each test binary starts one server of
//!   that kind (and a second one for two-provider tests), stopped by a watchdog when the test
//!   process exits, however it exits.
//! - `S3_BACKFILL_TEST_ENDPOINT` (and `S3_BACKFILL_TEST_ENDPOINT2` for the second provider): use
//!   a server that is already running instead; say its kind with `S3_BACKFILL_TEST_SERVER`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Access key of the first account (moto accepts any key while auth is off; `scripts/rgw.sh`
/// creates this user).
pub const KEY_ID: &str = "testing";
/// Secret of [`KEY_ID`].
pub const SECRET: &str = "testing-secret";
/// Access key of a second account: on RGW a user of another tenant (its own bucket
/// namespace); on moto any key is the same default account.
pub const SECOND_KEY_ID: &str = "testing2";
/// Secret of [`SECOND_KEY_ID`].
pub const SECOND_SECRET: &str = "testing2-secret";

/// The kind of S3 server under the tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    /// The moto emulator (Python).
    Moto,
    /// Ceph RADOS Gateway 16.2, a production S3 server (single-node cluster of `scripts/rgw.sh`).
    Rgw,
}

impl Server {
    /// The name used in `S3_BACKFILL_TEST_SERVER`.
    pub fn name(self) -> &'static str {
        match self {
            Server::Moto => "moto",
            Server::Rgw => "rgw",
        }
    }
}

/// The server kind chosen for this test process.
pub fn server() -> Server {
    match std::env::var("S3_BACKFILL_TEST_SERVER").as_deref() {
        Err(_) | Ok("") | Ok("moto") => Server::Moto,
        Ok("rgw") => Server::Rgw,
        Ok(other) => panic!("S3_BACKFILL_TEST_SERVER={other:?}: expected moto or rgw"),
    }
}

/// Says why a test cannot run on `on`, when that is the server under test: prints the reason
/// and returns true (the test then returns early).
pub fn unsupported_on(on: Server, why: &str) -> bool {
    if server() != on {
        return false;
    }
    println!("not run on {}: {why}", on.name());
    eprintln!("not run on {}: {why}", on.name());
    true
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn moto_binary() -> PathBuf {
    if let Ok(p) = std::env::var("MOTO_SERVER") {
        return PathBuf::from(p);
    }
    let venv = repo().join(".venv/bin/moto_server");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("moto_server")
}

/// A port of 127.0.0.1 that nothing listens on (now).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}

fn wait_until_up(endpoint: &str) {
    let addr = endpoint.trim_start_matches("http://").to_string();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if std::net::TcpStream::connect(&addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the S3 test server at {endpoint} did not start within 30 s");
}

/// Starts a moto server on a free port that stops when this test process exits, and
/// returns its endpoint.
pub fn start_moto() -> String {
    let port = free_port();
    let bin = moto_binary();
    let log = std::env::temp_dir().join(format!("s3-backfill-moto-{port}.log"));
    // A watchdog shell stops the server when this process goes away.
    let script = format!(
        "{bin} -H 127.0.0.1 -p {port} >{log} 2>&1 & m=$!; \
         while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; kill $m",
        bin = bin.display(),
        log = log.display(),
        pid = std::process::id()
    );
    // The watchdog shell stops the server when this process goes away; nobody waits for it.
    let watchdog = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e}; install it with scripts/setup-moto.sh",
                bin.display()
            )
        });
    std::mem::forget(watchdog);
    let endpoint = format!("http://127.0.0.1:{port}");
    wait_until_up(&endpoint);
    endpoint
}

/// Starts a single-node Ceph RGW with `scripts/rgw.sh` (about 3 s), stopped by the script's
/// watchdog when this test process exits; returns its endpoint. The daemons' logs stay in
/// the cluster's directory (printed on stderr).
pub fn start_rgw() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!(
        "s3-backfill-rgw-{pid}-{}",
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let script = repo().join("scripts/rgw.sh");
    let o = Command::new("bash")
        .arg(&script)
        .arg("start")
        .arg(&dir)
        .arg("--owner")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        o.status.success(),
        "{} start failed ({}); install Ceph with `bash scripts/rgw.sh install`\nstdout:\n{}\nstderr:\n{}",
        script.display(),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    let endpoint = stdout.lines().last().unwrap_or_default().trim().to_string();
    assert!(
        endpoint.starts_with("http://"),
        "rgw.sh printed no endpoint: {stdout}"
    );
    eprintln!("rgw: {endpoint}, logs in {}", dir.display());
    endpoint
}

/// Starts a new server of the kind under test and returns its endpoint.
pub fn start_server() -> String {
    match server() {
        Server::Moto => start_moto(),
        Server::Rgw => start_rgw(),
    }
}

fn given_or_started(var: &str) -> String {
    match std::env::var(var) {
        Ok(e) if !e.is_empty() => e,
        _ => start_server(),
    }
}

/// The shared S3 endpoint of this test binary.
pub fn endpoint() -> String {
    static EP: OnceLock<String> = OnceLock::new();
    EP.get_or_init(|| given_or_started("S3_BACKFILL_TEST_ENDPOINT"))
        .clone()
}

/// A second provider: another server of the same kind (its own buckets), shared by the tests
/// of this binary.
pub fn second_endpoint() -> String {
    static EP: OnceLock<String> = OnceLock::new();
    EP.get_or_init(|| given_or_started("S3_BACKFILL_TEST_ENDPOINT2"))
        .clone()
}

/// Whether the server keeps flexible checksums (`x-amz-checksum-*`). They came with Ceph 18
/// (Reef): RGW 16.2 accepts an upload with a checksum and stores none, so tests assert "none
/// at either end" there (and say so).
pub fn keeps_checksums() -> bool {
    if server() == Server::Rgw {
        println!("rgw: Ceph 16.2 keeps no flexible checksums; checking that none appears");
        return false;
    }
    true
}

/// Sleeps 1.1 s on moto, whose listings order a key's versions and delete markers only by
/// their 1-second last-modified (it lists all versions before all delete markers); RGW lists
/// every key's history in true order, so nothing waits there and same-second histories are
/// tested as they come.
pub async fn pace() {
    if server() == Server::Moto {
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
}
