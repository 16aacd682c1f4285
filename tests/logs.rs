//! Logs and progress for machines (issue 22): `--log-format json` writes one JSON object per
//! line on stderr, whatever happens in the run (tasks done, failed and skipped, retries, the
//! listing, the summary); the task events' counts equal the manifest's; `status --json`
//! carries the rate and ETA of a run in progress, and none once it ended.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::fault_proxy::{Fault, FaultConfig, FaultProxy};
use support::*;

/// Every line of `stderr` as a JSON object of field set version 1 with an RFC 3339 time and
/// an event name; panics naming the first line that is not.
fn events(stderr: &[u8]) -> Vec<Value> {
    let text = String::from_utf8_lossy(stderr);
    let mut out = Vec::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}\nstderr:\n{text}"));
        assert!(v.is_object(), "{line}");
        assert_eq!(v["v"], 1, "{line}");
        let ts = v["ts"].as_str().unwrap_or_else(|| panic!("no ts: {line}"));
        time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|e| panic!("ts {ts:?} is not RFC 3339 ({e}): {line}"));
        assert!(v["event"].is_string(), "{line}");
        out.push(v);
    }
    out
}

fn of_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event"] == kind).collect()
}

/// Task events per outcome.
fn outcomes(events: &[Value]) -> BTreeMap<String, u64> {
    let mut n = BTreeMap::new();
    for e in of_kind(events, "task") {
        *n.entry(e["outcome"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    n
}

/// Each task event has the documented fields, with the right types.
fn check_task_fields(e: &Value) {
    for f in ["key", "version_id", "dest_bucket", "dest_key", "outcome"] {
        assert!(e[f].is_string(), "{f} in {e}");
    }
    for f in ["bytes", "duration_ms", "attempts", "retries"] {
        assert!(e[f].is_u64(), "{f} in {e}");
    }
    assert!(e["delete_marker"].is_boolean(), "{e}");
    match e["outcome"].as_str().unwrap() {
        "done" => assert!(e["method"].is_string(), "{e}"),
        "failed" | "skipped" => {
            assert!(e["error_class"].is_string(), "{e}");
            assert!(e["error"].is_string(), "{e}");
        }
        other => panic!("unexpected outcome {other}: {e}"),
    }
}

fn count(o: &BTreeMap<String, u64>, k: &str) -> u64 {
    o.get(k).copied().unwrap_or(0)
}

fn upstream(ep: &str) -> SocketAddr {
    ep.trim_start_matches("http://").parse().unwrap()
}

/// `plan` then `run` with `--log-format json`: versions, a delete marker, a version gone
/// before the run (skipped), a prefix the source denies (failed), throttling (retries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_log_parses_line_by_line_and_its_counts_equal_the_manifest() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("src"), bucket("dst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    let mut one = vec![Op::put("gone/soon", "bye")];
    let mut two = vec![];
    for i in 0..6 {
        one.push(Op::put(&format!("public/{i:02}"), format!("p{i} one")));
        two.push(Op::put(&format!("public/{i:02}"), format!("p{i} two")));
        one.push(Op::put(&format!("private/{i:02}"), format!("s{i}")));
    }
    let three = vec![Op::Delete {
        key: "public/00".into(),
    }];
    seed(&c, &src, vec![one, two, three]).await;
    let (_d, m) = manifest();
    let job =
        Job::new(&src, &dst, &m)
            .endpoint(&ep)
            .extra(&["--delete-markers", "--log-format", "json"]);

    let o = job.plan();
    expect_code(&o, 0);
    let planned = events(&o.stderr);
    let listing = of_kind(&planned, "listing");
    let last = listing.last().expect("a listing event");
    assert_eq!(last["complete"], true, "{last}");
    assert_eq!(
        last["entries"], 20,
        "6 x 2 + 6 + 1 versions and 1 marker: {last}"
    );
    assert!(last["pages"].as_u64().unwrap() >= 1, "{last}");
    assert!(
        of_kind(&planned, "message").iter().any(|e| e["message"]
            .as_str()
            .unwrap()
            .starts_with("planned 20 tasks")),
        "{planned:?}"
    );

    // A version deleted between plan and run is skipped (source gone).
    let v = c
        .head_object()
        .bucket(&src)
        .key("gone/soon")
        .send()
        .await
        .unwrap()
        .version_id()
        .unwrap()
        .to_string();
    c.delete_object()
        .bucket(&src)
        .key("gone/soon")
        .version_id(&v)
        .send()
        .await
        .unwrap();
    // The source denies one prefix (403: failed); a share of the other requests is throttled.
    let proxy = FaultProxy::start(
        upstream(&ep),
        FaultConfig {
            seed: 5,
            rate: 0.2,
            faults: vec![Fault::SlowDown],
            delay: Duration::ZERO,
            deny_path_prefix: Some(format!("/{src}/private/")),
            deny_key_id: None,
        },
    )
    .await
    .unwrap();
    let pe = proxy.endpoint();
    let o = job.run(&[
        "--source-endpoint",
        &pe,
        "--dest-endpoint",
        &pe,
        "--retry-min-delay-ms",
        "5",
        "--retry-max-delay-ms",
        "20",
        "--max-attempts",
        "20",
        "--log-format",
        "json",
    ]);
    expect_code(&o, 1);
    let ran = events(&o.stderr);
    let st = job.status();
    let n = outcomes(&ran);
    println!("task events: {n:?}; status: {st:?}");
    assert_eq!(
        (count(&n, "done"), count(&n, "failed"), count(&n, "skipped")),
        (st.done, st.failed, st.skipped),
        "the task events' counts are the manifest's"
    );
    assert_eq!((st.done, st.failed, st.skipped), (13, 6, 1), "{st:?}");
    for e in of_kind(&ran, "task") {
        check_task_fields(e);
        assert_eq!(e["dest_bucket"], dst.as_str(), "{e}");
    }
    let tasks = of_kind(&ran, "task");
    let failed: Vec<_> = tasks.iter().filter(|e| e["outcome"] == "failed").collect();
    assert!(
        failed
            .iter()
            .all(|e| e["key"].as_str().unwrap().starts_with("private/")
                && e["error_class"] == "fatal"
                && e["error"].as_str().unwrap().contains("403")),
        "{failed:?}"
    );
    println!("a failed task: {}", failed[0]);
    let skipped: Vec<_> = tasks.iter().filter(|e| e["outcome"] == "skipped").collect();
    assert_eq!(skipped[0]["key"], "gone/soon");
    assert_eq!(skipped[0]["error_class"], "source-gone");
    let marker: Vec<_> = tasks
        .iter()
        .filter(|e| e["delete_marker"] == true)
        .collect();
    assert_eq!(marker.len(), 1, "{tasks:?}");
    assert_eq!(marker[0]["method"], "delete-marker");
    assert_eq!(marker[0]["bytes"], 0);
    let bytes: u64 = tasks
        .iter()
        .filter(|e| e["outcome"] == "done")
        .map(|e| e["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(
        bytes, st.bytes_done,
        "the done tasks' bytes are the manifest's"
    );

    // Throttled requests were retried, each said with its side, operation and attempt.
    let retries = of_kind(&ran, "retry");
    println!(
        "retry events: {}; injected faults: {}",
        retries.len(),
        proxy.stats().injected()
    );
    assert!(!retries.is_empty(), "20% of the requests were throttled");
    for r in &retries {
        assert!(
            ["source", "dest"].contains(&r["side"].as_str().unwrap()),
            "{r}"
        );
        assert!(r["operation"].is_string() && r["error"].is_string(), "{r}");
        assert_eq!(r["class"], "throttled", "{r}");
        assert!(r["attempt"].as_u64().unwrap() >= 1, "{r}");
    }
    let in_tasks: u64 = tasks.iter().map(|e| e["retries"].as_u64().unwrap()).sum();
    let keyed = retries.iter().filter(|r| r["key"].is_string()).count() as u64;
    assert_eq!(keyed, in_tasks, "every retry of a task names its key");

    // The summary: the same figures as the text line, the job's counts, the exit code.
    let summary = of_kind(&ran, "summary");
    assert_eq!(summary.len(), 1, "{ran:?}");
    let s = summary[0];
    assert_eq!(s["status"], "finished");
    assert_eq!(s["exit_code"], 1);
    assert_eq!(
        (s["done"].as_u64(), s["failed"].as_u64()),
        (Some(13), Some(6))
    );
    assert_eq!(s["skipped"], 1);
    assert_eq!(s["job"]["failed"], st.failed);
    assert_eq!(s["job"]["done"], st.done);
    assert!(s["message"]
        .as_str()
        .unwrap()
        .starts_with("run finished: this run: 13 done"));
    // The hint after the summary is a message.
    assert!(of_kind(&ran, "message").iter().any(|e| e["message"]
        .as_str()
        .unwrap()
        .contains("s3-backfill report")));
    // No progress line at the default interval (30 s) in a short run; the run's snapshot is
    // gone once it ended.
    let raw = run(&["status", "--manifest", job.m(), "--json"]);
    let status: Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert!(
        status["eta"].is_null() && status["running"].is_null(),
        "{status}"
    );
}

/// `replicate --log-format json` (listing beside the copy), paced so that it lasts a few
/// seconds: progress events every second, `status --json` shows the running run's rate and
/// ETA, and none once it ended; every line parses and the counts are the manifest's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_logs_progress_and_status_shows_the_eta_while_it_runs() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("src"), bucket("dst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    let one = (0..20)
        .map(|i| Op::put(&format!("k{i:02}"), "one"))
        .collect();
    let two = (0..20)
        .map(|i| Op::put(&format!("k{i:02}"), "two!"))
        .collect();
    let three = vec![Op::Delete { key: "k07".into() }];
    seed(&c, &src, vec![one, two, three]).await;
    let (_d, m) = manifest();
    let job = Job::new(&src, &dst, &m).endpoint(&ep).extra(&[
        "--delete-markers",
        "--log-format",
        "json",
        "--progress-interval",
        "1",
        // 41 tasks at 8 requests a second, two at a time: several seconds, so that progress
        // shows, at a steady pace.
        "--max-rps",
        "8",
        "--concurrency",
        "2",
    ]);
    let child = cmd(&strs(&job.replicate_args()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start replicate");
    // Poll `status --json` while it runs.
    let mut seen_eta: Option<Value> = None;
    let started = Instant::now();
    let mut child = child;
    while child.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(120) {
        if let Some(v) = status_json(&m) {
            if v["running"].is_object() && v["eta"].is_u64() {
                seen_eta = Some(v);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let o = child.wait_with_output().unwrap();
    expect_code(&o, 0);
    let ev = events(&o.stderr);
    let st = job.status();
    assert_eq!((st.done, st.total), (41, 41), "{st:?}");
    let n = outcomes(&ev);
    assert_eq!(count(&n, "done"), st.done, "{n:?}");
    assert_eq!((count(&n, "failed"), count(&n, "skipped")), (0, 0), "{n:?}");
    for e in of_kind(&ev, "task") {
        check_task_fields(e);
    }
    let listing = of_kind(&ev, "listing");
    assert_eq!(listing.last().unwrap()["complete"], true, "{listing:?}");
    assert_eq!(listing.last().unwrap()["entries"], 41);

    let progress = of_kind(&ev, "progress");
    println!(
        "{} progress events; last: {:?}",
        progress.len(),
        progress.last()
    );
    assert!(
        !progress.is_empty(),
        "a run of several seconds at --progress-interval 1"
    );
    for p in &progress {
        for f in [
            "done",
            "failed",
            "skipped",
            "total",
            "remaining",
            "bytes_done",
            "elapsed_secs",
        ] {
            assert!(p[f].is_u64(), "{f} in {p}");
        }
        for f in ["tasks_per_sec", "bytes_per_sec", "eta_secs"] {
            assert!(p.get(f).is_some(), "{f} in {p}");
        }
        assert!(p["listing_complete"].is_boolean(), "{p}");
    }
    assert!(
        progress
            .iter()
            .any(|p| p["eta_secs"].is_u64() && p["tasks_per_sec"].is_f64()),
        "an ETA once the listing is complete and tasks end: {progress:?}"
    );

    let v = seen_eta.expect("status --json showed an ETA while the run went on");
    println!("status while running: eta {}, rate {}", v["eta"], v["rate"]);
    assert!(v["rate"]["tasks_per_sec"].is_number(), "{v}");
    assert!(v["rate"]["bytes_per_sec"].is_number(), "{v}");
    let after = status_json(&m).unwrap();
    assert!(
        after["eta"].is_null() && after["rate"].is_null() && after["running"].is_null(),
        "no run in progress: {after}"
    );
    let s = of_kind(&ev, "summary");
    assert_eq!(s.len(), 1);
    assert_eq!(
        (s[0]["done"].as_u64(), s[0]["exit_code"].as_i64()),
        (Some(41), Some(0))
    );
    // For information (wall time is not asserted): each ETA from 10% on against the time the
    // run really took from then (the summary's time), in this paced (steady) run.
    let at = |e: &Value| {
        time::OffsetDateTime::parse(
            e["ts"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    let end = at(s[0]);
    for p in &progress {
        let (Some(eta), Some(done)) = (p["eta_secs"].as_u64(), p["done"].as_u64()) else {
            continue;
        };
        if done * 10 < 41 || p["remaining"] == 0 {
            continue;
        }
        let truth = (end - at(p)).as_seconds_f64();
        println!(
            "at {done}/41 done: ETA {eta}s, took {truth:.1}s (error {:.0}%)",
            (eta as f64 - truth).abs() / truth * 100.0
        );
    }
}

/// A hard limit: one `limit` event naming it, the summary says so (exit 4), and the task
/// events still count what the manifest holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_reached_is_an_event() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("src"), bucket("dst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    let round = (0..12).map(|i| Op::put(&format!("k{i:02}"), "x")).collect();
    seed(&c, &src, vec![round]).await;
    let (_d, m) = manifest();
    let job = Job::new(&src, &dst, &m).endpoint(&ep);
    expect_code(&job.plan(), 0);
    let o = job.run(&[
        "--max-requests",
        "4",
        "--concurrency",
        "1",
        "--log-format",
        "json",
    ]);
    expect_code(&o, 4);
    let ev = events(&o.stderr);
    let limits = of_kind(&ev, "limit");
    assert_eq!(limits.len(), 1, "{ev:?}");
    assert_eq!(limits[0]["limit"], "max-requests");
    assert!(limits[0]["message"]
        .as_str()
        .unwrap()
        .starts_with("--max-requests 4 reached"));
    let s = of_kind(&ev, "summary");
    assert_eq!(
        (s[0]["status"].as_str(), s[0]["exit_code"].as_i64()),
        (Some("limit"), Some(4))
    );
    let st = job.status();
    assert!(st.done < 12, "{st:?}");
    assert_eq!(count(&outcomes(&ev), "done"), st.done);
}

/// The text mode is unchanged: no JSON, and the usual summary line last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_mode_prints_what_it_printed_before() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("src"), bucket("dst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    seed(&c, &src, vec![vec![Op::put("a", "1"), Op::put("b", "2")]]).await;
    let (_d, m) = manifest();
    let job = Job::new(&src, &dst, &m).endpoint(&ep);
    let o = job.replicate();
    expect_code(&o, 0);
    let err = stderr_of(&o);
    assert!(!err.contains("{\""), "{err}");
    let last = err.trim_end().lines().last().unwrap();
    assert!(
        last.starts_with("run finished: this run: 2 done (0 reconciled), 0 failed, 0 skipped"),
        "{err}"
    );
    // stderr is no terminal: a progress line every --progress-interval (the run is paced to
    // last a few seconds), and still the summary last.
    let round = (0..16).map(|i| Op::put(&format!("p{i:02}"), "x")).collect();
    seed(&c, &src, vec![round]).await;
    let (_d2, m2) = manifest();
    let paced = Job::new(&src, &dst, &m2).endpoint(&ep).extra(&[
        "--progress-interval",
        "1",
        "--max-rps",
        "6",
    ]);
    let o = paced.replicate();
    expect_code(&o, 0);
    let err = stderr_of(&o);
    let progress: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("progress: "))
        .collect();
    println!("{}", progress.join("\n"));
    assert!(!progress.is_empty(), "{err}");
    assert!(progress.iter().all(|l| l.contains(" tasks (")), "{err}");
    let last = err.trim_end().lines().last().unwrap();
    assert!(last.starts_with("run finished: this run: 18 done"), "{err}");
    // A bad log format is one usage line, exit 2.
    let o = run(&["run", "--manifest", job.m(), "--log-format", "xml"]);
    expect_code(&o, 2);
    assert_eq!(stderr_of(&o).trim_end().lines().count(), 1);
    // ... in JSON when JSON was asked for with a bad argument elsewhere.
    let o = run(&[
        "run",
        "--manifest",
        job.m(),
        "--log-format",
        "json",
        "--concurrency",
        "0",
    ]);
    expect_code(&o, 2);
    let ev = events(&o.stderr);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["level"], "error");
}

/// `status --json` as a JSON value, or None when it fails.
fn status_json(m: &std::path::Path) -> Option<Value> {
    let o = run(&["status", "--manifest", m.to_str()?, "--json"]);
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).ok())
        .flatten()
}
