//! `follow` end to end (issue 21), against the server under test: a backfill, then `follow`
//! while a steady writer puts new keys, overwrites them (new versions) and deletes them
//! (delete markers), `follow` killed with SIGKILL three times while it writes; then the writer
//! stops, `follow --until-caught-up` exits 0, and every key's history at the destination is
//! the source's (every version and delete marker, in order), every task is done and
//! `status --json` gives the lag.
//! - Events: on moto, S3 → SQS queue A → a relay that drops 5% → queue B →
//!   `follow --events sqs:B`; on RGW, a topic pushing to an HTTP relay that drops 5% →
//!   `follow --events http://127.0.0.1:PORT`. `scripts/events.py` configures the
//!   notifications, as a user would. (moto 5.2.5 sends no event for a delete marker: those
//!   reach the destination through the next event of their key or a reconcile.)
//! - Polling: the same without events (`--poll-interval 2`).
//! - The writer and the relays alone: what the writer says it did is what the source holds,
//!   the relay passes on 95% of the server's events and drops 5%.
//! - A bench (ignored; `benches/follow.sh` runs it): the scenario without kills, printing
//!   lag percentiles, copies/s and the CPU time of `follow`, with events (none dropped, or
//!   5% dropped and a reconcile every 15 s) and with polling.
//!
//! Environment: `FOLLOW_TEST_SECS` (how long the writer writes, default 25),
//! `FOLLOW_TEST_RATE` (writes per second, default 10), `FOLLOW_TEST_KILLS` (SIGKILLs of
//! `follow` while the writer writes, default 3), `FOLLOW_CATCHUP_LIMIT` (seconds
//! `follow --until-caught-up` may take before the test fails, default 300), and for the
//! bench `FOLLOW_BENCH_MODE` (`events`, `events-drop5` or `poll`) and
//! `FOLLOW_BENCH_RECONCILE`.

mod support;

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use support::relay;
use support::relay::{create_queue, sqs_client, HttpRelay, QueueRelay, DROP_EVERY};
use support::writer::{Writer, Written};
use support::*;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: expected a whole number")),
        _ => default,
    }
}

/// Runs `scripts/events.py` (the project's notification set-up) with the moto venv's
/// Python (boto3); the last line it prints (the queue URL or the topic ARN).
fn events_script(args: &[&str]) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    let o = std::process::Command::new(&python)
        .arg(root.join("scripts/events.py"))
        .args(args)
        .env("AWS_ACCESS_KEY_ID", KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        o.status.success(),
        "scripts/events.py {args:?} failed ({})\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    print!("{out}");
    out.lines().last().unwrap_or_default().trim().to_string()
}

/// On moto: a queue the source bucket notifies (wired by `scripts/events.py`), a second
/// queue, and a relay from the first to the second that drops every `drop_every`th
/// message; the second's URL.
async fn notified_queue(ep: &str, src: &str, drop_every: u64) -> (QueueRelay, String) {
    let notified = events_script(&[
        "moto-queue",
        "--endpoint",
        ep,
        "--bucket",
        src,
        "--queue",
        &bucket("notified"),
    ]);
    assert!(notified.starts_with("http"), "a queue URL: {notified:?}");
    let relayed = create_queue(&sqs_client(ep).await, &bucket("relayed")).await;
    (
        QueueRelay::start(ep, &notified, &relayed, drop_every),
        relayed,
    )
}

/// How changes reach `follow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Intake {
    /// The server's notifications, through a relay that drops every Nth (0: none).
    Events(u64),
    /// `--poll-interval 2`.
    Poll,
}

/// The wiring of one intake: the `follow` flags and the relay (kept alive while it runs).
struct Wiring {
    flags: Vec<String>,
    queue: Option<QueueRelay>,
    http: Option<HttpRelay>,
}

impl Wiring {
    /// The relay's counts, if there is one.
    fn counts(&self) -> Option<relay::Counts> {
        self.queue
            .as_ref()
            .map(|q| q.counts.now())
            .or_else(|| self.http.as_ref().map(|h| h.counts.now()))
    }
}

/// Configures the source bucket's notifications with `scripts/events.py` and starts the
/// relay: on moto, queue A (notified) → relay → queue B (`follow` reads it); on RGW, a
/// topic pushing to the HTTP relay, which forwards to `follow`'s endpoint.
async fn wire(ep: &str, src: &str, intake: Intake) -> Wiring {
    let drop_every = match intake {
        Intake::Poll => {
            return Wiring {
                flags: vec!["--poll-interval".into(), "2".into()],
                queue: None,
                http: None,
            }
        }
        Intake::Events(n) => n,
    };
    match server() {
        Server::Moto => {
            let (relay, relayed) = notified_queue(ep, src, drop_every).await;
            Wiring {
                flags: vec!["--events".into(), format!("sqs:{relayed}")],
                queue: Some(relay),
                http: None,
            }
        }
        Server::Rgw => {
            let follow_at: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let relay = HttpRelay::start(follow_at, drop_every);
            events_script(&[
                "rgw-topic",
                "--endpoint",
                ep,
                "--bucket",
                src,
                "--push",
                &relay.url(),
            ]);
            Wiring {
                flags: vec!["--events".into(), format!("http://{follow_at}")],
                queue: None,
                http: Some(relay),
            }
        }
    }
}

/// A `follow` process, waited for with `wait4` so that its CPU time is known.
struct Follow {
    child: Child,
    log: PathBuf,
}

impl Follow {
    /// Starts `follow` on the job's manifest with `flags`; its output goes to `log`
    /// (appended, so every run of one test is in one file).
    fn start(job: &Job, flags: &[String], log: &Path) -> Follow {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("follow log");
        let mut args = vec!["follow", "--manifest", job.m(), "--no-progress"];
        args.extend(flags.iter().map(String::as_str));
        let child = cmd(&args)
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("spawn follow");
        Follow {
            child,
            log: log.to_path_buf(),
        }
    }

    fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// Waits up to `limit` for it to exit; its exit code (a signal as 128 + N) and CPU
    /// seconds (user + system), or None when it still runs.
    async fn wait(&mut self, limit: Duration) -> Option<(i32, f64)> {
        let start = Instant::now();
        loop {
            let mut status = 0;
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: plain wait4 on our own child with valid out-pointers.
            let r = unsafe { libc::wait4(self.pid(), &mut status, libc::WNOHANG, &mut usage) };
            if r == self.pid() {
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                };
                let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
                return Some((code, secs(usage.ru_utime) + secs(usage.ru_stime)));
            }
            assert!(
                r == 0,
                "wait4 on follow: {}",
                std::io::Error::last_os_error()
            );
            if start.elapsed() >= limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `signal` and waits for the exit; the exit code and CPU seconds.
    async fn signal(&mut self, signal: libc::c_int) -> (i32, f64) {
        // SAFETY: a signal to our own child, not yet reaped (wait4 reaps it only below).
        unsafe { libc::kill(self.pid(), signal) };
        match self.wait(Duration::from_secs(60)).await {
            Some(r) => r,
            None => panic!(
                "follow did not end within 60 s of signal {signal}\n{}",
                tail(&self.log)
            ),
        }
    }
}

/// The last lines of a log.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The `lag` object of `status --json`.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(default)]
struct Lag {
    last_hour: Window,
    since_start: Window,
}

/// One window of the lag.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(default)]
struct Window {
    count: u64,
    p50_ms: Option<f64>,
    p90_ms: Option<f64>,
    p99_ms: Option<f64>,
    p999_ms: Option<f64>,
    max_ms: Option<f64>,
    within_15m: Option<f64>,
}

impl Window {
    /// Asserts what a user can check of the figures: some versions were measured, the
    /// percentiles are in order, the share is a share.
    fn assert_plausible(&self, what: &str) {
        assert!(self.count > 0, "{what}: no version measured: {self:?}");
        let p = [
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms,
        ]
        .map(|v| v.unwrap_or_else(|| panic!("{what}: a percentile is missing: {self:?}")));
        assert!(
            p.windows(2).all(|w| w[0] <= w[1]),
            "{what}: p50 <= p90 <= p99 <= p99.9 <= max: {self:?}"
        );
        let share = self.within_15m.expect("within_15m");
        assert!((0.0..=1.0).contains(&share), "{what}: share {share}");
    }

    fn line(&self) -> String {
        let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
        format!(
            "count={} p50_ms={} p90_ms={} p99_ms={} p999_ms={} max_ms={} within_15m={}",
            self.count,
            f(self.p50_ms),
            f(self.p90_ms),
            f(self.p99_ms),
            f(self.p999_ms),
            f(self.max_ms),
            self.within_15m.map_or("-".into(), |v| format!("{v:.4}"))
        )
    }
}

/// The `follow` object of `status --json`.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(default)]
struct FollowFacts {
    /// Changes received from events.
    events: u64,
    /// Keys changed and not listed yet.
    pending_keys: u64,
    /// Tasks that reconciles found (what events missed).
    found_by_reconcile: u64,
}

/// `status --json`'s `lag` and `follow` objects; panics when one is missing.
fn follow_status(m: &Path) -> (Lag, FollowFacts) {
    let o = run(&["status", "--manifest", m.to_str().unwrap(), "--json"]);
    expect_code(&o, 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status --json");
    let field = |name: &str| {
        v.get(name)
            .unwrap_or_else(|| panic!("no {name} object in status --json: {v}"))
            .clone()
    };
    let lag = serde_json::from_value(field("lag"))
        .unwrap_or_else(|e| panic!("lag object does not parse ({e}): {v}"));
    let facts = serde_json::from_value(field("follow"))
        .unwrap_or_else(|e| panic!("follow object does not parse ({e}): {v}"));
    (lag, facts)
}

/// What one scenario measured.
struct Outcome {
    written: Written,
    lag: Lag,
    facts: FollowFacts,
    /// Tasks done by `follow` (after the backfill).
    copies: u64,
    /// From the first `follow` start to the end of `--until-caught-up`.
    follow_secs: f64,
    /// CPU seconds of every `follow` process, user + system.
    cpu_secs: f64,
    /// Seconds `follow --until-caught-up` took after the writer stopped.
    catchup_secs: f64,
    relay: Option<relay::Counts>,
}

/// How one scenario runs.
#[derive(Clone, Debug)]
struct Scenario {
    /// How changes reach `follow`.
    intake: Intake,
    /// More flags of `follow` (e.g. `--reconcile-interval`).
    flags: Vec<String>,
    /// Seconds the writer writes.
    secs: u64,
    /// Writes per second.
    rate: f64,
    /// SIGKILLs of `follow` while the writer writes.
    kills: u64,
}

/// The scenario of this file: backfill, `follow` under a steady writer killed `kills`
/// times, the writer stops, `follow --until-caught-up` exits 0, equal histories.
async fn steady_write(tag: &str, sc: Scenario) -> Outcome {
    let Scenario {
        intake,
        flags,
        secs,
        rate,
        kills,
    } = sc;
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket(&format!("{tag}-src")), bucket(&format!("{tag}-dst")));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    // The backfill: 30 keys, some with a second version, some deleted.
    let keys: Vec<String> = (0..30).map(|i| format!("seed/k{i:02}")).collect();
    let first = keys.iter().map(|k| Op::put(k, format!("v1 {k}"))).collect();
    let second = keys
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 2)
        .map(|(i, k)| match i % 3 {
            0 => Op::put(k, format!("v2 {k}")),
            _ => Op::Delete { key: k.clone() },
        })
        .collect();
    seed(&c, &src, vec![first, second]).await;
    let (dir, m) = manifest();
    let job = Job::new(&src, &dst, &m)
        .endpoint(&ep)
        .extra(&["--delete-markers"]);
    expect_code(&job.plan(), 0);
    expect_code(&job.run(&[]), 0);
    let backfilled = job.status().done;
    assert_eq!(backfilled, 30 + 20, "the backfill copies every entry");

    let mut wiring = wire(&ep, &src, intake).await;
    wiring.flags.extend(flags);
    let log = dir.path().join("follow.log");
    let started = Instant::now();
    let mut cpu = 0.0;
    let mut follow = Follow::start(&job, &wiring.flags, &log);
    let duration = Duration::from_secs(secs);
    // The seed keys whose current entry is an object (a delete of the deleted ones would
    // leave no second marker on RGW).
    let live: Vec<String> = keys
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 1)
        .map(|(_, k)| k.clone())
        .collect();
    let writer = tokio::spawn(
        Writer::new(duration, rate)
            .existing(&live)
            .run(c.clone(), src.clone()),
    );
    // SIGKILL spread over the writing time, restarted after a short pause (events keep
    // coming while it is down).
    for k in 1..=kills {
        let at = duration.mul_f64(k as f64 / (kills + 1) as f64);
        tokio::time::sleep(at.saturating_sub(started.elapsed())).await;
        if let Some((code, _)) = follow.wait(Duration::ZERO).await {
            panic!("follow ended by itself with {code}\n{}", tail(&log));
        }
        let (code, t) = follow.signal(libc::SIGKILL).await;
        assert_eq!(code, 128 + libc::SIGKILL, "killed");
        cpu += t;
        println!(
            "kill {k} at {:.1}s: {:?}",
            started.elapsed().as_secs_f64(),
            try_status(&m)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        follow = Follow::start(&job, &wiring.flags, &log);
    }
    let written = writer.await.expect("the writer");
    println!(
        "writer: {} writes in {:.1}s ({:.1}/s): {} new keys, {} overwrites, {} deletes, {} refused",
        written.writes(),
        written.elapsed.as_secs_f64(),
        written.rate(),
        written.new_keys,
        written.overwrites,
        written.deletes,
        written.errors
    );
    assert_eq!(written.errors, 0, "the writer's writes all succeed");
    // Stopped like a user stops it (SIGTERM: exit 130), then run until caught up.
    if let Some((code, _)) = follow.wait(Duration::ZERO).await {
        panic!("follow ended by itself with {code}\n{}", tail(&log));
    }
    let (code, t) = follow.signal(libc::SIGTERM).await;
    cpu += t;
    assert_eq!(code, 130, "follow stopped by SIGTERM\n{}", tail(&log));
    let catchup = Instant::now();
    let mut flags = wiring.flags.clone();
    flags.push("--until-caught-up".into());
    let mut last = Follow::start(&job, &flags, &log);
    let limit = Duration::from_secs(env_u64("FOLLOW_CATCHUP_LIMIT", 300));
    let Some((code, t)) = last.wait(limit).await else {
        let (_, _) = last.signal(libc::SIGKILL).await;
        panic!(
            "follow --until-caught-up did not exit within {limit:?}: {:?}\n{}",
            try_status(&m),
            tail(&log)
        );
    };
    cpu += t;
    let catchup_secs = catchup.elapsed().as_secs_f64();
    let follow_secs = started.elapsed().as_secs_f64();
    assert_eq!(code, 0, "follow --until-caught-up\n{}", tail(&log));
    println!("follow --until-caught-up took {catchup_secs:.1}s after the writer stopped");
    let relay = wiring.counts();
    if let (Some(r), Intake::Events(every)) = (relay, intake) {
        println!("relay: {r:?}");
        if let Some(expected) = r.received.checked_div(every) {
            assert_eq!(
                r.dropped, expected,
                "the relay dropped every {every}th event"
            );
            assert!(r.dropped > 0, "no event was dropped: nothing was tested");
        }
    }

    let st = job.status();
    println!("status: {st:?}");
    for t in job.tasks().iter().filter(|t| t.state != "done") {
        println!("task not done: {:?} {} {}", t.key, t.version_id, t.state);
    }
    // Every key's history, versions and delete markers in order, with the same content.
    let compared = assert_replica(&c, &src, &c, &dst, "", "", all).await;
    println!("{compared} versions compared");
    assert_eq!(
        (
            st.pending,
            st.in_progress,
            st.failed,
            st.blocked,
            st.skipped
        ),
        (0, 0, 0, 0, 0),
        "every task done: {st:?}"
    );
    assert_eq!(st.done, st.total, "every task done: {st:?}");
    // Every write of the writer is one task more than the backfill had.
    assert_eq!(
        st.total,
        backfilled + written.writes(),
        "one task per write: {st:?}"
    );
    let text = run(&["status", "--manifest", job.m()]);
    println!("status:\n{}", String::from_utf8_lossy(&text.stdout));
    let (lag, facts) = follow_status(&m);
    println!("lag since start: {}", lag.since_start.line());
    println!("lag last hour:   {}", lag.last_hour.line());
    println!("follow: {facts:?}");
    assert_eq!(facts.pending_keys, 0, "no key left pending: {facts:?}");
    if let Intake::Events(_) = intake {
        assert!(facts.events > 0, "follow received events: {facts:?}");
    }
    Outcome {
        written,
        lag,
        facts,
        copies: st.done - backfilled,
        follow_secs,
        cpu_secs: cpu,
        catchup_secs,
        relay,
    }
}

/// Asserts the lag figures of a scenario: present and in order in both windows, and
/// measured for the versions `follow` wrote (not more than it wrote).
fn check_lag(o: &Outcome) {
    o.lag.since_start.assert_plausible("lag since start");
    o.lag.last_hour.assert_plausible("lag over the last hour");
    assert!(
        o.lag.since_start.count <= o.copies,
        "lag counts only versions follow wrote ({}): {:?}",
        o.copies,
        o.lag.since_start
    );
}

/// The suite's scenario: `FOLLOW_TEST_SECS` (25) at `FOLLOW_TEST_RATE` (10/s) with
/// `FOLLOW_TEST_KILLS` (3) kills.
fn suite(intake: Intake) -> Scenario {
    Scenario {
        intake,
        flags: Vec::new(),
        secs: env_u64("FOLLOW_TEST_SECS", 25),
        rate: env_u64("FOLLOW_TEST_RATE", 10) as f64,
        kills: env_u64("FOLLOW_TEST_KILLS", 3),
    }
}

/// Events (SQS on moto, an RGW topic's push on RGW), 5% dropped, `follow` killed three
/// times: caught up, equal histories, every task done, lag shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_with_five_percent_dropped_and_three_kills_end_in_equal_histories() {
    let o = steady_write("fol-ev", suite(Intake::Events(DROP_EVERY))).await;
    check_lag(&o);
    let r = o.relay.expect("a relay");
    assert!(r.forwarded > 0, "no event reached follow: {r:?}");
}

/// Polling every 2 s, no events, `follow` killed three times: the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_with_three_kills_ends_in_equal_histories() {
    let o = steady_write("fol-poll", suite(Intake::Poll)).await;
    check_lag(&o);
}

/// The test kit alone: the writer's account of its writes is what the source holds (one
/// entry per write, a delete marker per delete), and the relay in front of `follow` passes
/// on 95% of the events the server sends (to a queue on moto, to an HTTP sink on RGW) and
/// drops every 20th.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_and_the_relay_do_what_they_say() {
    let ep = endpoint();
    let c = client(&ep);
    let src = bucket("fol-kit");
    create_bucket(&c, &src, true).await;
    let existing: Vec<String> = (0..5).map(|i| format!("old/{i}")).collect();
    seed(
        &c,
        &src,
        vec![existing.iter().map(|k| Op::put(k, "old")).collect()],
    )
    .await;

    // What receives the relay's output: queue B on moto, an HTTP sink on RGW.
    let sink = relay::Sink::start();
    let (wiring, queue_b) = match server() {
        Server::Moto => {
            let (relay, relayed) = notified_queue(&ep, &src, DROP_EVERY).await;
            (
                Wiring {
                    flags: Vec::new(),
                    queue: Some(relay),
                    http: None,
                },
                Some(relayed),
            )
        }
        Server::Rgw => {
            let relay = HttpRelay::start(sink.addr, DROP_EVERY);
            events_script(&[
                "rgw-topic",
                "--endpoint",
                &ep,
                "--bucket",
                &src,
                "--push",
                &relay.url(),
            ]);
            (
                Wiring {
                    flags: Vec::new(),
                    queue: None,
                    http: Some(relay),
                },
                None,
            )
        }
    };

    let written = Writer::new(Duration::from_secs(4), 15.0)
        .existing(&existing)
        .run(c.clone(), src.clone())
        .await;
    println!("writer: {written:?}");
    assert_eq!(written.errors, 0);
    assert!(written.new_keys > 0 && written.overwrites > 0 && written.deletes > 0);
    let h = histories(&c, &src, "").await;
    let entries: usize = h.values().map(Vec::len).sum();
    let markers = h.values().flatten().filter(|v| v.delete_marker).count();
    assert_eq!(entries as u64, existing.len() as u64 + written.writes());
    assert_eq!(markers as u64, written.deletes);
    assert!(written.keys.iter().all(|k| h.contains_key(k)));

    // Events of puts arrive on both servers (moto sends none for a delete marker; RGW
    // one per write): wait for them to settle.
    let puts = written.new_keys + written.overwrites;
    let expected_at_least = match server() {
        Server::Moto => puts,
        Server::Rgw => written.writes(),
    };
    let start = Instant::now();
    let mut counts = wiring.counts().unwrap();
    while counts.received < expected_at_least && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        counts = wiring.counts().unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts = wiring.counts().unwrap();
    println!("relay: {counts:?}");
    assert!(
        counts.received >= expected_at_least,
        "every write notified: {counts:?}, {expected_at_least} expected"
    );
    assert_eq!(counts.dropped, counts.received / DROP_EVERY, "{counts:?}");
    assert_eq!(counts.lost, 0, "{counts:?}");
    assert_eq!(
        counts.forwarded + counts.dropped,
        counts.received,
        "{counts:?}"
    );
    // What came out at the other end: exactly what the relay passed on.
    let passed = match &queue_b {
        Some(url) => {
            let sqs = sqs_client(&ep).await;
            let mut n = 0u64;
            loop {
                let r = sqs
                    .receive_message()
                    .queue_url(url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1)
                    .send()
                    .await
                    .expect("receive");
                if r.messages().is_empty() {
                    break;
                }
                n += r.messages().len() as u64;
            }
            n
        }
        None => sink.bodies().len() as u64,
    };
    assert_eq!(passed, counts.forwarded, "{counts:?}");
    if server() == Server::Rgw {
        // The records name the writer's keys.
        let bodies = sink.bodies();
        let named = bodies
            .iter()
            .filter(|b| written.keys.iter().any(|k| b.contains(&format!("\"{k}\""))))
            .count();
        assert!(named > 0, "no record names a written key: {bodies:?}");
    }
}

/// The steady-write scenario without kills, for `benches/follow.sh`: prints one line of
/// figures (lag percentiles, copies/s, CPU of `follow`). Mode from `FOLLOW_BENCH_MODE`:
/// `events` (no event dropped: the lag of the event path itself), `events-drop5` (5%
/// dropped, `--reconcile-interval` `FOLLOW_BENCH_RECONCILE`, default 15 s, catches them) or
/// `poll`; time and rate from `FOLLOW_TEST_SECS` (60) / `FOLLOW_TEST_RATE` (20/s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a bench: benches/follow.sh runs it"]
async fn bench_steady_write() {
    let mode = std::env::var("FOLLOW_BENCH_MODE").unwrap_or_else(|_| "events".into());
    let reconcile = env_u64("FOLLOW_BENCH_RECONCILE", 15).to_string();
    let (intake, flags) = match mode.as_str() {
        "events" => (Intake::Events(0), Vec::new()),
        "events-drop5" => (
            Intake::Events(DROP_EVERY),
            vec!["--reconcile-interval".to_string(), reconcile],
        ),
        "poll" => (Intake::Poll, Vec::new()),
        other => panic!("FOLLOW_BENCH_MODE={other:?}: expected events, events-drop5 or poll"),
    };
    let sc = Scenario {
        intake,
        flags,
        secs: env_u64("FOLLOW_TEST_SECS", 60),
        rate: env_u64("FOLLOW_TEST_RATE", 20) as f64,
        kills: env_u64("FOLLOW_TEST_KILLS", 0),
    };
    let secs = sc.secs;
    let o = steady_write("fol-bench", sc).await;
    check_lag(&o);
    let l = &o.lag.since_start;
    let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
    println!(
        "BENCH server={} mode={mode} secs={secs} writes={} write_rate={:.1}/s copies={} copies_per_s={:.1} \
         lag_p50_ms={} lag_p99_ms={} lag_p999_ms={} lag_max_ms={} within_15m={} catchup_s={:.1} \
         follow_cpu_s={:.2} follow_cpu_pct={:.1} dropped={} found_by_reconcile={}",
        server().name(),
        o.written.writes(),
        o.written.rate(),
        o.copies,
        o.copies as f64 / o.follow_secs,
        f(l.p50_ms),
        f(l.p99_ms),
        f(l.p999_ms),
        f(l.max_ms),
        l.within_15m.map_or("-".into(), |v| format!("{v:.4}")),
        o.catchup_secs,
        o.cpu_secs,
        100.0 * o.cpu_secs / o.follow_secs,
        o.relay.map_or(0, |r| r.dropped),
        o.facts.found_by_reconcile,
    );
}
