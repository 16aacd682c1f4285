//! Checks of the PostgreSQL test kit and `scripts/pg.sh`, with no S3: fresh databases are
//! separate, the cluster is durable and local (fsync on, 127.0.0.1 only), a restart in place
//! keeps what was committed and drops what was not, so does a crash-like restart (WAL
//! replay), a port can be given, and the watchdog
//! stops a cluster whose owner is gone. These tests need PostgreSQL (`bash scripts/pg.sh
//! install`) and fail without it.

mod support;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::pg::{self, fresh_database, pg_dsn, pg_restart, psql, psql_output, with_database};

fn need_pg() {
    assert!(
        pg::pg_available(),
        "PostgreSQL 15 is not installed: run `bash scripts/pg.sh install` (or set S3_BACKFILL_TEST_PG)"
    );
}

/// The port of a `postgres://USER@HOST:PORT/DB` DSN.
fn port_of(dsn: &str) -> String {
    let after_host = dsn.rsplit(':').next().unwrap();
    after_host.split('/').next().unwrap().to_string()
}

/// Polls `check` every 100 ms for up to 30 s.
fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}: not within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn fresh_databases_are_separate_and_a_restart_keeps_what_was_committed() {
    need_pg();
    let a = fresh_database("restart one");
    let b = fresh_database("restart two");
    assert_ne!(a, b);
    let port = port_of(&pg_dsn());
    assert!(port.parse::<u16>().is_ok(), "{}", pg_dsn());
    assert_eq!((port_of(&a), port_of(&b)), (port.clone(), port.clone()));

    // The cluster is what the e2e test relies on: durable commits, local only.
    assert_eq!(psql(&a, "SHOW fsync"), "on");
    assert_eq!(psql(&a, "SHOW synchronous_commit"), "on");
    assert_eq!(psql(&a, "SHOW listen_addresses"), "127.0.0.1");
    assert_eq!(psql(&a, "SHOW max_connections"), "200");

    psql(
        &a,
        "CREATE TABLE kept (k text PRIMARY KEY, n int); INSERT INTO kept VALUES ('before', 1)",
    );
    // b is another database: no table of a's, and the same name is free there.
    assert_eq!(
        psql(
            &b,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'kept'"
        ),
        "0"
    );
    psql(
        &b,
        "CREATE TABLE kept (k text); INSERT INTO kept VALUES ('b')",
    );

    // A transaction left open across the restart: its row must not survive.
    let mut open = Command::new(pg::psql_binary())
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &a, "-c"])
        .arg("BEGIN; INSERT INTO kept VALUES ('uncommitted', 2); SELECT pg_sleep(120)")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn psql");
    wait_until("the open transaction's insert", || {
        psql(
            &a,
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(120)%' \
             AND state = 'active' AND pid <> pg_backend_pid()",
        ) == "1"
    });

    pg_restart();

    let status = open.wait().expect("wait for psql");
    assert!(
        !status.success(),
        "the session open across the restart should have been cut"
    );
    assert_eq!(port_of(&pg_dsn()), port, "same port");
    assert_eq!(
        psql(&a, "SELECT k || '=' || n FROM kept ORDER BY k"),
        "before=1"
    );
    assert_eq!(psql(&b, "SELECT k FROM kept"), "b");
    // And the server takes writes again.
    psql(&a, "INSERT INTO kept VALUES ('after', 3)");
    assert_eq!(psql(&a, "SELECT count(*) FROM kept"), "2");

    // As after a crash: what was committed since the last checkpoint comes back from the WAL.
    let recoveries = |log: &str| log.matches("database system was interrupted").count();
    let before = recoveries(&pg::pg_log().unwrap());
    pg::pg_crash_restart();
    assert_eq!(
        recoveries(&pg::pg_log().unwrap()),
        before + 1,
        "the immediate restart should end in a crash recovery"
    );
    assert_eq!(
        psql(
            &a,
            "SELECT string_agg(k || '=' || n, ',' ORDER BY k) FROM kept"
        ),
        "after=3,before=1"
    );
    assert_eq!(port_of(&pg_dsn()), port, "same port");
}

#[test]
fn the_watchdog_stops_a_cluster_on_a_given_port_when_its_owner_is_gone() {
    need_pg();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut owner = Command::new("sleep").arg("600").spawn().expect("sleep");
    let dir = std::env::temp_dir().join(format!("s3-backfill-pg-watchdog-{}", std::process::id()));
    let out = pg::pg_script(&[
        "start",
        dir.to_str().unwrap(),
        &port.to_string(),
        "--owner",
        &owner.id().to_string(),
    ]);
    let dsn = out.trim();
    assert_eq!(
        dsn,
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    );
    assert_eq!(psql(dsn, "SELECT inet_server_port()"), port.to_string());
    let status = |dir: &std::path::Path| {
        Command::new("bash")
            .arg(pg::script_path())
            .arg("status")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(status(&dir), Some(0));

    owner.kill().unwrap();
    owner.wait().unwrap();
    wait_until("the watchdog stopping the cluster", || {
        status(&dir) == Some(3) && !dir.join("data").exists()
    });
    assert!(
        !psql_output(dsn, "SELECT 1").status.success(),
        "nothing answers on {dsn} any more"
    );
    assert!(dir.join("log").exists(), "the log is kept");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn with_database_replaces_only_the_database() {
    assert_eq!(
        with_database("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
        "postgres://postgres@127.0.0.1:5432/t1"
    );
    assert_eq!(
        with_database(
            "postgres://u:p@db.example:5432/x?sslmode=require&job=a",
            "t2"
        ),
        "postgres://u:p@db.example:5432/t2?sslmode=require&job=a"
    );
    assert_eq!(
        with_database("postgres://u@127.0.0.1:5432", "t3"),
        "postgres://u@127.0.0.1:5432/t3"
    );
    assert_eq!(
        with_database("postgresql:///x?host=/run/pg", "t4"),
        "postgresql:///t4?host=/run/pg"
    );
}
