//! The `--metrics` endpoint (issue 21), as a monitoring system sees it: `run` of a planned job
//! is scraped while it copies (slowed by `--max-rps`), and the job is scraped again once the
//! run ended. Every scrape parses as OpenMetrics text; the counts by state agree with
//! `status --json` read between two identical scrapes, and exactly with `status --json` and
//! the manifest's rows after the run; the requests of the operations used are counted. A
//! port in use is refused before any work.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::*;

/// One sample: its metric name, labels and value.
#[derive(Clone, Debug, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of a scrape; panics on a line that is neither a comment (`# HELP`, `# TYPE`,
/// `# UNIT`), a sample, nor the final `# EOF`.
fn parse(text: &str) -> Vec<Sample> {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "no final # EOF:\n{text}");
    let mut out = Vec::new();
    for line in &lines[..lines.len() - 1] {
        if ["# HELP ", "# TYPE ", "# UNIT "]
            .iter()
            .any(|p| line.starts_with(p))
        {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment {line:?}");
        out.push(sample(line).unwrap_or_else(|| panic!("not a sample: {line:?}\n{text}")));
    }
    out
}

/// `name{k="v",...} value` (labels optional).
fn sample(line: &str) -> Option<Sample> {
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        v => v.parse().ok()?,
    };
    let (name, labels) = match head.split_once('{') {
        None => (head, BTreeMap::new()),
        Some((name, rest)) => (name, labels(rest.strip_suffix('}')?)?),
    };
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    ok.then(|| Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `k="v",k2="v2"` with `\"`, `\\` and `\n` escapes in values.
fn labels(s: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (k, after) = rest.split_once("=\"")?;
        let mut v = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => v.push('\n'),
                    c => v.push(c),
                },
                (i, '"') => break i,
                (_, c) => v.push(c),
            }
        };
        out.insert(k.to_string(), v);
        rest = after[end + 1..]
            .strip_prefix(',')
            .unwrap_or(&after[end + 1..]);
    }
    Some(out)
}

/// GET /metrics (HTTP/1.0); the body of a 200, else None (not listening, or an error).
async fn scrape(addr: SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n")
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200").then(|| {
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text"),
            "{head}"
        );
        body.to_string()
    })
}

/// The value of the one sample of `name` whose labels include `with`, or 0 when none.
fn value(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    let hits: Vec<&Sample> = matching(samples, name, with).collect();
    assert!(hits.len() <= 1, "{name} {with:?} matches {hits:?}");
    hits.first().map_or(0.0, |s| s.value)
}

/// Tasks (or bytes) by state, summed over buckets.
fn by_state(samples: &[Sample], name: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == name) {
        *out.entry(s.labels["state"].clone()).or_default() += s.value as u64;
    }
    out
}

/// `status --json`'s counts by state, as the metrics name them.
fn status_states(s: &Status) -> BTreeMap<String, u64> {
    [
        ("pending", s.pending),
        ("in_progress", s.in_progress),
        ("done", s.done),
        ("failed", s.failed),
        ("skipped", s.skipped),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// `status --json`'s requests by operation (all runs).
fn status_requests(m: &Path) -> BTreeMap<String, u64> {
    let o = run(&["status", "--manifest", m.to_str().unwrap(), "--json"]);
    expect_code(&o, 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    serde_json::from_value(v["requests"].clone()).unwrap()
}

/// Scrapes `addr` every 150 ms until the child exits. Each scrape must parse; `status
/// --json` read between two scrapes that show the same counts by state must show them too.
/// Returns the scrapes, how many were taken mid-copy (some tasks done, some pending) and how
/// many were checked against `status`.
async fn scrape_while_running(
    child: &mut std::process::Child,
    addr: SocketAddr,
    m: &Path,
) -> (Vec<Vec<Sample>>, usize, usize) {
    let start = Instant::now();
    let (mut scrapes, mut mid_run, mut agreed) = (Vec::new(), 0, 0);
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(600), "run hangs");
        if let Some(text) = scrape(addr).await {
            let before = parse(&text);
            let states = by_state(&before, "s3_backfill_tasks");
            if states.get("done") > Some(&0) && states.get("pending") > Some(&0) {
                mid_run += 1;
            }
            if let Some(status) = try_status(m) {
                if let Some(after) = scrape(addr).await.map(|t| parse(&t)) {
                    if by_state(&after, "s3_backfill_tasks") == states {
                        assert_eq!(states, status_states(&status), "mid-run:\n{text}");
                        agreed += 1;
                    }
                }
            }
            scrapes.push(before);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    (scrapes, mid_run, agreed)
}

/// A versioned source seeded with `rounds`, an empty versioned destination, and the job
/// between them (not planned yet).
struct Seeded {
    src: String,
    dst: String,
    m: std::path::PathBuf,
    job: Job,
    _dir: tempfile::TempDir,
}

impl Seeded {
    async fn new(tag: &str, rounds: Vec<Vec<Op>>) -> Seeded {
        let ep = endpoint();
        let c = client(&ep);
        let (src, dst) = (bucket(&format!("{tag}-src")), bucket(&format!("{tag}-dst")));
        create_bucket(&c, &src, true).await;
        create_bucket(&c, &dst, true).await;
        seed(&c, &src, rounds).await;
        let (_dir, m) = manifest();
        let job = Job::new(&src, &dst, &m).endpoint(&ep);
        Seeded {
            src,
            dst,
            m,
            job,
            _dir,
        }
    }
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_scraped_while_it_copies_and_after_agrees_with_status_and_the_manifest() {
    // 300 keys; every tenth has a second version.
    let first: Vec<Op> = (0..300)
        .map(|i| Op::put(&format!("k/{i:04}"), format!("v1 {i}")))
        .collect();
    let second: Vec<Op> = (0..300)
        .step_by(10)
        .map(|i| Op::put(&format!("k/{i:04}"), format!("second {i}")))
        .collect();
    let t = Seeded::new("metrics", vec![first, second]).await;
    let (m, dst, job) = (&t.m, &t.dst, &t.job);
    expect_code(&job.plan(), 0);
    let planned = job.status();
    assert_eq!(planned.total, 330);

    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let a = addr.to_string();
    let args = job.run_args(&["--metrics", &a, "--max-rps", "30", "--concurrency", "4"]);
    let mut child = cmd(&strs(&args))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start run");
    let (scrapes, mid_run, agreed) = scrape_while_running(&mut child, addr, m).await;
    let last = scrapes.last().cloned();
    let out = child.wait_with_output().unwrap();
    expect_code(&out, 0);
    assert!(
        stderr_of(&out).contains(&format!("metrics at http://{addr}/metrics")),
        "{}",
        stderr_of(&out)
    );
    println!(
        "{} scrapes during the run, {mid_run} mid-copy, {agreed} checked against status",
        scrapes.len()
    );
    assert!(mid_run >= 1, "no scrape while the copy was under way");
    assert!(agreed >= 1, "no scrape pair was checked against status");
    // The run's own requests, by side, operation and outcome: its writes went to the
    // destination (a server-side copy on one endpoint), and none of it failed.
    let live = last.expect("scraped");
    let writes = value(
        &live,
        "s3_backfill_requests_total",
        &[
            ("side", "dest"),
            ("operation", "CopyObject"),
            ("outcome", "ok"),
        ],
    ) + value(
        &live,
        "s3_backfill_requests_total",
        &[
            ("side", "dest"),
            ("operation", "PutObject"),
            ("outcome", "ok"),
        ],
    );
    assert!(writes > 0.0, "no write counted: {live:?}");
    assert!(live
        .iter()
        .filter(|s| s.name == "s3_backfill_requests_total")
        .all(|s| s.labels["outcome"] == "ok" || s.value == 0.0));
    // What the manifest recorded of all runs covers what this process counted.
    let recorded = status_requests(m);
    for s in live
        .iter()
        .filter(|s| s.name == "s3_backfill_requests_total")
    {
        let op = &s.labels["operation"];
        assert!(
            s.value <= recorded.get(op).copied().unwrap_or(0) as f64,
            "{op}: {} counted, {recorded:?} recorded",
            s.value
        );
    }

    // After the run: the manifest's numbers, exactly as `status --json` and the rows say.
    let server =
        s3_backfill::metrics::serve("127.0.0.1:0".parse().unwrap(), m, "after").expect("serve");
    let text = scrape(server.addr()).await.expect("scrape after the run");
    let after = parse(&text);
    let status = job.status();
    assert_eq!(status.done, 330);
    assert_eq!(
        by_state(&after, "s3_backfill_tasks"),
        status_states(&status)
    );
    let bytes = by_state(&after, "s3_backfill_object_bytes");
    assert_eq!(bytes["done"], status.bytes_done);
    assert_eq!(bytes.values().sum::<u64>(), status.bytes_total);
    let mut rows: BTreeMap<String, u64> = BTreeMap::new();
    for t in job.tasks() {
        *rows.entry(t.state).or_default() += 1;
    }
    let nonzero: BTreeMap<String, u64> = by_state(&after, "s3_backfill_tasks")
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(nonzero, rows, "the manifest's rows");
    for s in after.iter().filter(|s| s.name == "s3_backfill_tasks") {
        assert_eq!(&s.labels["bucket"], dst);
        assert_eq!(s.labels["job"], "after");
    }
    assert_eq!(value(&after, "s3_backfill_listing_complete", &[]), 1.0);
    assert_eq!(
        value(&after, "s3_backfill_listed_entries", &[]),
        status.listed_entries as f64
    );
    assert_eq!(
        value(&after, "s3_backfill_task_retries_total", &[]),
        status.retries as f64
    );
    for (op, n) in status_requests(m) {
        let got = value(
            &after,
            "s3_backfill_job_requests_total",
            &[("operation", &op)],
        );
        assert_eq!(got, n as f64, "{op}");
    }
}

/// The sum of `name`'s samples whose labels include `with`.
fn total(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    matching(samples, name, with).map(|s| s.value).sum()
}

/// The samples of `name` whose labels include `with`.
fn matching<'a>(
    samples: &'a [Sample],
    name: &'a str,
    with: &'a [(&str, &str)],
) -> impl Iterator<Item = &'a Sample> {
    samples.iter().filter(move |s| {
        s.name == name
            && with
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_server_errors_show_as_outcomes_retries_and_throttles() {
    let keys: Vec<Op> = (0..60)
        .map(|i| Op::put(&format!("f/{i:03}"), format!("body {i}")))
        .collect();
    let t = Seeded::new("metrics-faults", vec![keys]).await;
    let (ep, m, job) = (endpoint(), &t.m, &t.job);
    expect_code(&job.plan(), 0);
    // The run reaches both sides through a proxy that answers 30% of requests with 503
    // SlowDown or 500 InternalError.
    let proxy = fault_proxy::FaultProxy::start(
        ep.trim_start_matches("http://").parse().unwrap(),
        fault_proxy::FaultConfig {
            seed: 21,
            rate: 0.3,
            faults: vec![
                fault_proxy::Fault::SlowDown,
                fault_proxy::Fault::InternalError,
            ],
            ..fault_proxy::FaultConfig::default()
        },
    )
    .await
    .unwrap();
    let (p, addr) = (proxy.endpoint(), format!("127.0.0.1:{}", free_port()));
    let args = job.run_args(&[
        "--source-endpoint",
        &p,
        "--dest-endpoint",
        &p,
        "--metrics",
        &addr,
        "--max-rps",
        "15",
        "--concurrency",
        "4",
        "--retry-min-delay-ms",
        "10",
        "--retry-max-delay-ms",
        "50",
        "--max-attempts",
        "20",
    ]);
    let mut child = cmd(&strs(&args))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start run");
    let (scrapes, _, _) = scrape_while_running(&mut child, addr.parse().unwrap(), m).await;
    let out = child.wait_with_output().unwrap();
    expect_code(&out, 0);
    assert_eq!(job.status().done, 60);
    let last = scrapes.last().expect("scraped during the run");
    let stats = proxy.stats();
    let throttled = total(
        last,
        "s3_backfill_requests_total",
        &[("outcome", "throttled")],
    );
    let retryable = total(
        last,
        "s3_backfill_requests_total",
        &[("outcome", "retryable")],
    );
    let throttles = total(last, "s3_backfill_throttles_total", &[]);
    let retries = total(last, "s3_backfill_retries_total", &[]);
    let requests = total(last, "s3_backfill_requests_total", &[]);
    println!(
        "last scrape: {requests} requests, {throttled} throttled, {retryable} retryable, \
         {retries} retries; proxy: {} requests, {} SlowDown, {} InternalError",
        stats.requests(),
        stats.injected_of(fault_proxy::Fault::SlowDown),
        stats.injected_of(fault_proxy::Fault::InternalError)
    );
    assert!(throttled > 0.0 && retryable > 0.0, "{last:?}");
    assert_eq!(throttles, throttled, "throttles are the throttled answers");
    // Every failure here was retried: retries cover them (a retry may still be waiting at
    // the scrape), and none is more than the proxy injected.
    assert!(
        retries > 0.0 && retries <= throttled + retryable,
        "{retries}"
    );
    assert!(throttled <= stats.injected_of(fault_proxy::Fault::SlowDown) as f64);
    assert!(retryable <= stats.injected_of(fault_proxy::Fault::InternalError) as f64);
    assert!(
        requests <= stats.requests() as f64,
        "{requests} > {}",
        stats.requests()
    );
    assert_eq!(
        total(last, "s3_backfill_requests_total", &[("outcome", "fatal")]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_serves_the_latency_of_the_versions_it_writes() {
    let before: Vec<Op> = (0..5).map(|i| Op::put(&format!("b/{i}"), "old")).collect();
    let t = Seeded::new("metrics-follow", vec![before]).await;
    let job = &t.job;
    expect_code(&job.replicate(), 0);
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let a = addr.to_string();
    let args = [
        "follow",
        "--manifest",
        job.m(),
        "--poll-interval",
        "1",
        "--reconcile-interval",
        "0",
        "--no-progress",
        "--metrics",
        &a,
    ];
    let mut child = cmd(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start follow");
    // Written while `follow` runs: each is copied with its lag recorded.
    let after: Vec<Op> = (0..6).map(|i| Op::put(&format!("a/{i}"), "new")).collect();
    seed(&client(&endpoint()), &t.src, vec![after]).await;
    let start = Instant::now();
    let (text, count) = loop {
        assert!(child.try_wait().unwrap().is_none(), "follow ended");
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no lag after 2 minutes"
        );
        if let Some(text) = scrape(addr).await {
            let s = parse(&text);
            let n = value(&s, "s3_backfill_replication_latency_seconds_count", &[]);
            if n >= 6.0 {
                break (text, n);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let s = parse(&text);
    let lag_status = {
        let o = run(&["status", "--manifest", job.m(), "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["lag"]["since_start"].clone()
    };
    // Nothing is written any more: the scrape and `status` count the same versions.
    let again = parse(&scrape(addr).await.expect("scrape"));
    child.kill().unwrap();
    let _ = child.wait();
    assert_eq!(count, 6.0, "{text}");
    assert_eq!(
        value(&again, "s3_backfill_replication_latency_seconds_count", &[]),
        count
    );
    assert_eq!(lag_status["count"], 6, "{lag_status}");
    // Buckets are cumulative, end with every version at +Inf, and all were written within
    // 15 minutes, as `status` says.
    let mut buckets: Vec<(f64, f64)> = s
        .iter()
        .filter(|x| x.name == "s3_backfill_replication_latency_seconds_bucket")
        .map(|x| {
            let le = &x.labels["le"];
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            (le, x.value)
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(buckets.first().map(|b| b.0), Some(0.1));
    assert_eq!(buckets.last(), Some(&(f64::INFINITY, 6.0)));
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
    let within = value(
        &s,
        "s3_backfill_replication_latency_seconds_bucket",
        &[("le", "900.0")],
    ) / count;
    assert_eq!(Some(within), lag_status["within_15m"].as_f64());
    assert!(
        value(&s, "s3_backfill_refresh_generation", &[]) >= 1.0,
        "polling refreshes"
    );
    assert_eq!(
        by_state(&s, "s3_backfill_tasks").get("done"),
        Some(&11),
        "{text}"
    );
    assert!(
        total(
            &s,
            "s3_backfill_requests_total",
            &[("operation", "ListObjectVersions")]
        ) > 0.0
    );
}

#[test]
fn a_port_in_use_is_refused_before_any_work() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (_d, m) = manifest();
    for verb in ["run", "replicate"] {
        let mut args = vec![verb, "--manifest", m.to_str().unwrap(), "--metrics", &addr];
        if verb == "replicate" {
            args.extend(["--source", "s3://a", "--dest", "s3://b"]);
        }
        let o = run(&args);
        expect_code(&o, 2);
        let err = stderr_of(&o);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    }
    assert!(!m.exists(), "nothing was done");
    let o = run(&["run", "--manifest", "x.db", "--metrics", "nowhere"]);
    expect_code(&o, 2);
    assert!(
        stderr_of(&o).contains("is not an ADDR:PORT"),
        "{}",
        stderr_of(&o)
    );
}
