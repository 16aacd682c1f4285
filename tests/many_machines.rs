//! Many machines, one job (issue 20): `run` processes sharing a job whose manifest is in
//! PostgreSQL. Four workers copy a few thousand keys of several versions each while one
//! is SIGKILLed mid-unit, one is SIGSTOPped past its lease and then resumed, and
//! PostgreSQL itself is restarted once: every key's destination history equals the
//! source's, every task is done once, and each process's exit code says what became of it.
//!
//! Then `replicate` on three machines at once: a job that does not exist yet, made, listed
//! in parts and copied by the three together, each task copied once. And a worker whose
//! database stays away past its lease: it stops (exit 1) without failing a task, and the
//! next run finishes the job exactly.
//!
//! Knobs: `S3_BACKFILL_MANY_KEYS` (keys in the corpus; default 1,500 on RGW, 300 on moto);
//! `S3_BACKFILL_MANY_SKIP` (a list of `kill`, `stop`, `restart`: leaves those events out,
//! to tell which one a failure comes with).

mod support;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::pg::{
    fresh_database, pg_restart, psql, restart_stopped_cluster, start_owned_cluster, stop_cluster,
};
use support::*;

/// The lease of the test's workers, in seconds (short, so a stopped worker loses it soon).
const LEASE: u64 = 10;

fn keys() -> usize {
    match std::env::var("S3_BACKFILL_MANY_KEYS") {
        Ok(v) => v.parse().expect("S3_BACKFILL_MANY_KEYS is a number"),
        Err(_) if server() == Server::Rgw => 1500,
        Err(_) => 300,
    }
}

/// Three versions of every key, a delete marker on every fifth, a fourth version on every
/// other key.
fn corpus(n: usize) -> Vec<Vec<Op>> {
    let mut rounds = vec![Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for i in 0..n {
        let k = format!("part-{}/key-{i:05}", i % 7);
        rounds[0].push(Op::put(&k, format!("v1 {k}")));
        rounds[1].push(Op::put(&k, format!("v2 {k} {}", "x".repeat(i % 50))));
        rounds[2].push(Op::put(&k, format!("v3 {k}")));
        if i % 5 == 0 {
            rounds[3].push(Op::Delete { key: k.clone() });
        }
        if i % 2 == 0 {
            rounds[4].push(Op::put(&k, format!("v4 {k}")));
        }
    }
    rounds
}

/// The command line `args` with its output in `dir`, as `NAME.out` and `NAME.err`.
fn logged(args: &[String], dir: &Path, name: &str) -> std::process::Command {
    let out = std::fs::File::create(dir.join(format!("{name}.out"))).unwrap();
    let err = std::fs::File::create(dir.join(format!("{name}.err"))).unwrap();
    let mut c = cmd(&strs(args));
    c.stdout(Stdio::from(out)).stderr(Stdio::from(err));
    c
}

/// What the process logged as `NAME` in `dir` wrote to its standard error so far.
fn errors_of(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.err"))).unwrap_or_default()
}

fn worker(job: &Job, n: usize, dir: &Path) -> Child {
    let args = job.run_args(&["--concurrency", "6"]);
    logged(&args, dir, &format!("worker-{n}"))
        .env("S3_BACKFILL_LEASE_SECS", LEASE.to_string())
        .spawn()
        .expect("start a worker")
}

fn signal(child: &Child, sig: i32, n: usize, dir: &Path) {
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    let err = errors_of(dir, &format!("worker-{n}"));
    assert_eq!(rc, 0, "signal {sig} to worker {n}, which ended: {err}");
}

/// Waits until `status` shows at least `done` tasks done (or every worker exited).
fn wait_done(job: &Job, done: u64, workers: &mut [Child], limit: Duration) -> u64 {
    let until = Instant::now() + limit;
    loop {
        let now = try_status(job.manifest()).map_or(0, |s| s.done);
        let all_exited = workers.iter_mut().all(|c| c.try_wait().unwrap().is_some());
        if now >= done || all_exited || Instant::now() > until {
            return now;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every one of the job's `total` tasks is done (nothing pending, in progress or failed),
/// every key's destination history equals the source's, and `verify` agrees.
async fn assert_done_exactly(job: &Job, total: u64, c: &aws_sdk_s3::Client, src: &str, dst: &str) {
    let s = job.status();
    assert_eq!(
        (s.done, s.pending, s.in_progress, s.failed),
        (total, 0, 0, 0),
        "{s:?}"
    );
    assert_replica(c, src, c, dst, "", "", all).await;
    expect_code(&job.verify(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn four_workers_share_a_postgres_job_through_a_kill_a_pause_and_a_database_restart() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("many-src"), bucket("many-dst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    seed(&c, &src, corpus(keys())).await;
    let db = fresh_database("many");
    let m = format!("{db}?job=e2e");
    let job = Job::new(&src, &dst, Path::new(&m))
        .endpoint(&ep)
        .extra(&["--delete-markers"]);
    expect_code(&job.plan(), 0);
    let total = job.status().total;
    assert!(total as usize >= keys() * 3, "planned {total} tasks");

    let logs = tempfile::tempdir().unwrap();
    let mut workers: Vec<Child> = (0..4).map(|n| worker(&job, n, logs.path())).collect();

    // One worker killed mid-unit: its units come back when their leases expire.
    let skip = std::env::var("S3_BACKFILL_MANY_SKIP").unwrap_or_default();
    wait_done(&job, total / 10, &mut workers, Duration::from_secs(300));
    if !skip.contains("kill") {
        signal(&workers[0], libc::SIGKILL, 0, logs.path());
    }
    // One paused past its lease, then resumed: its units were taken over meanwhile.
    if !skip.contains("stop") {
        signal(&workers[1], libc::SIGSTOP, 1, logs.path());
        std::thread::sleep(Duration::from_secs(LEASE * 2 + 2));
        signal(&workers[1], libc::SIGCONT, 1, logs.path());
    }
    // The database restarted once, mid-run.
    wait_done(&job, total / 2, &mut workers, Duration::from_secs(300));
    if !skip.contains("restart") {
        pg_restart();
    }

    let mut codes = Vec::new();
    for (n, w) in workers.iter_mut().enumerate() {
        let status = wait_until(w, Duration::from_secs(600))
            .await
            .unwrap_or_else(|| panic!("worker {n} did not finish"));
        let err = errors_of(logs.path(), &format!("worker-{n}"));
        codes.push((n, status.code(), err));
    }
    for (n, code, err) in &codes {
        match n {
            0 if !skip.contains("kill") => assert_eq!(*code, None, "worker 0 was killed: {err}"),
            // Resumed after its lease was taken: it stops (1, saying so) or, if it held
            // nothing when paused, goes on and ends well (0).
            1 if !skip.contains("stop") => {
                assert!(
                    *code == Some(0) || (*code == Some(1) && err.contains("lease")),
                    "worker 1 exited {code:?}: {err}"
                );
                // The requests its gate refused fail no task: their units' new owners
                // reconcile them.
                assert!(err.contains(" 0 failed,"), "worker 1: {err}");
            }
            _ => assert_eq!(*code, Some(0), "worker {n}: {err}"),
        }
    }

    assert_done_exactly(&job, total, &c, &src, &dst).await;
}

/// `replicate` started on three machines at the same moment, on a PostgreSQL job that does
/// not exist yet: they make the job once, split its listing once, and share its listing parts
/// and units. Every process ends well, the destination's histories equal the source's, and
/// every task was attempted once (no unit held by two of them).
#[tokio::test(flavor = "multi_thread")]
async fn three_replicate_processes_plan_and_copy_one_postgres_job_together() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("many-rsrc"), bucket("many-rdst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    let rounds = corpus(keys() / 3);
    let entries: u64 = rounds.iter().map(|r| r.len() as u64).sum();
    seed(&c, &src, rounds).await;
    let db = fresh_database("many-replicate");
    let m = format!("{db}?job=together");
    #[rustfmt::skip]
    let job = Job::new(&src, &dst, Path::new(&m)).endpoint(&ep).extra(&[
        "--delete-markers", "--list-page-size", "20", "--list-concurrency", "3",
        "--concurrency", "6",
    ]);

    let logs = tempfile::tempdir().unwrap();
    let mut procs: Vec<Child> = (0..3)
        .map(|n| {
            logged(
                &job.replicate_args(),
                logs.path(),
                &format!("replicate-{n}"),
            )
            .spawn()
            .expect("start replicate")
        })
        .collect();
    for (n, p) in procs.iter_mut().enumerate() {
        let status = wait_until(p, Duration::from_secs(600))
            .await
            .unwrap_or_else(|| panic!("replicate {n} did not finish"));
        let err = errors_of(logs.path(), &format!("replicate-{n}"));
        assert_eq!(status.code(), Some(0), "replicate {n}: {err}");
    }

    let s = job.status();
    assert_eq!(
        s.total, entries,
        "every version and delete marker planned once: {s:?}"
    );
    assert_eq!(
        (s.done, s.pending, s.in_progress, s.failed, s.skipped),
        (entries, 0, 0, 0, 0),
        "{s:?}"
    );
    let twice = psql(
        &db,
        "SELECT count(*) FROM s3b_together.task WHERE attempts <> 1",
    );
    assert_eq!(twice, "0", "tasks attempted other than once");
    assert_replica(&c, &src, &c, &dst, "", "", all).await;
    expect_code(&job.verify(), 0);
}

/// One worker whose database goes away for longer than half its lease (on a cluster of
/// this test's own: the other tests' server stays up). Its gate shuts, so it sends nothing
/// more: it stops with 1, saying why, and the tasks whose requests were refused are not
/// failed. Once the database is back, the next run reconciles what it wrote and finishes:
/// the replica is exact.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_cut_off_from_its_database_stops_without_failing_tasks() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("many-osrc"), bucket("many-odst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    seed(&c, &src, corpus(60)).await;
    let (dir, dsn) = start_owned_cluster("outage");
    let m = format!("{dsn}?job=outage");
    let job = Job::new(&src, &dst, Path::new(&m))
        .endpoint(&ep)
        .extra(&["--delete-markers"]);
    expect_code(&job.plan(), 0);
    let total = job.status().total;

    let logs = tempfile::tempdir().unwrap();
    // Slow enough that tasks are in flight when the database goes.
    let args = job.run_args(&["--concurrency", "16", "--max-rps", "4"]);
    let mut w = logged(&args, logs.path(), "worker")
        .env("S3_BACKFILL_LEASE_SECS", LEASE.to_string())
        .spawn()
        .expect("start a worker");
    wait_done(
        &job,
        5,
        std::slice::from_mut(&mut w),
        Duration::from_secs(120),
    );
    stop_cluster(&dir);
    std::thread::sleep(Duration::from_secs(LEASE + 2));
    restart_stopped_cluster(&dir);
    let status = wait_until(&mut w, Duration::from_secs(120))
        .await
        .expect("the worker did not stop");
    let err = errors_of(logs.path(), "worker");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("could not renew its leases"), "{err}");
    assert!(err.contains(" 0 failed,"), "no task failed: {err}");

    expect_code(&job.run(&[]), 0);
    assert_done_exactly(&job, total, &c, &src, &dst).await;
}
