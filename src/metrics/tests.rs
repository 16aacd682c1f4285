//! metrics::tests: the encoding of a snapshot (every line a comment, a sample or `# EOF`;
//! the histogram's buckets cumulative; labels), the live counters of a run's handles, and
//! the endpoint answering over TCP.

use super::*;
use crate::manifest::State;
use crate::s3::fake::{FakeServer, FaultKind};
use crate::s3::{ErrorClass, ObjectRef, RetryPolicy};

fn snapshot() -> Snapshot {
    let row = |bucket: &str, state, tasks, bytes| BucketStateCount {
        bucket: bucket.into(),
        state,
        tasks,
        bytes,
    };
    Snapshot {
        job: "nightly".into(),
        states: vec![
            row("dst", State::Pending, 4, 400),
            row("dst", State::Done, 3, 300),
            row("dst", State::Failed, 1, 7),
        ],
        blocked: 2,
        job_requests: [("PutObject".to_string(), 9)].into(),
        listed_entries: 8,
        listed_pages: 1,
        listing_complete: true,
        refresh_generation: 2,
        lag: LagHistogram {
            // 1 at 0.1 s, 3 at 0.25 s, ... 5 within the hour, 6 in all.
            cumulative: [1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 5].to_vec(),
            sum_secs: 5000.5,
            count: 6,
        },
        ..Snapshot::default()
    }
}

/// The samples of a scrape, `name{labels}` → value; panics on a line that is neither a
/// comment, a sample nor the final `# EOF`.
fn samples(text: &str) -> BTreeMap<String, f64> {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "ends with # EOF:\n{text}");
    let mut out = BTreeMap::new();
    for line in &lines[..lines.len() - 1] {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") || line.starts_with("# UNIT ")
        {
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number in {line:?}"));
        assert!(
            name.starts_with("s3_backfill_") && !name.contains(' ') || name.contains('{'),
            "bad name in {line:?}"
        );
        assert!(out.insert(name.to_string(), v).is_none(), "twice: {line:?}");
    }
    out
}

#[test]
fn a_snapshot_is_openmetrics_text_with_its_labels() {
    let text = encode(&snapshot());
    let s = samples(&text);
    let get = |k: &str| *s.get(k).unwrap_or_else(|| panic!("no {k} in:\n{text}"));
    assert_eq!(
        get(r#"s3_backfill_tasks{job="nightly",bucket="dst",state="done"}"#),
        3.0
    );
    assert_eq!(
        get(r#"s3_backfill_object_bytes{job="nightly",bucket="dst",state="pending"}"#),
        400.0
    );
    assert_eq!(get(r#"s3_backfill_tasks_blocked{job="nightly"}"#), 2.0);
    assert_eq!(
        get(r#"s3_backfill_job_requests_total{job="nightly",operation="PutObject"}"#),
        9.0
    );
    assert_eq!(get(r#"s3_backfill_listing_complete{job="nightly"}"#), 1.0);
    assert_eq!(get(r#"s3_backfill_refresh_generation{job="nightly"}"#), 2.0);
    assert!(text.contains("# TYPE s3_backfill_tasks gauge"), "{text}");
    assert!(
        text.contains("# TYPE s3_backfill_task_retries counter"),
        "{text}"
    );
    // Before the run's handles are attached there is no live family.
    assert!(!text.contains("s3_backfill_requests_total"), "{text}");
}

#[test]
fn the_latency_histogram_keeps_its_cumulative_counts() {
    let text = encode(&snapshot());
    let s = samples(&text);
    let bucket = |le: &str| {
        let k =
            format!(r#"s3_backfill_replication_latency_seconds_bucket{{le="{le}",job="nightly"}}"#);
        *s.get(&k).unwrap_or_else(|| panic!("no {k} in:\n{text}"))
    };
    assert_eq!(bucket("0.1"), 1.0);
    assert_eq!(bucket("0.25"), 3.0);
    assert_eq!(bucket("900.0"), 4.0);
    assert_eq!(bucket("3600.0"), 5.0);
    assert_eq!(bucket("+Inf"), 6.0);
    assert_eq!(
        s[r#"s3_backfill_replication_latency_seconds_count{job="nightly"}"#],
        6.0
    );
    assert_eq!(
        s[r#"s3_backfill_replication_latency_seconds_sum{job="nightly"}"#],
        5000.5
    );
    assert!(text.contains("# TYPE s3_backfill_replication_latency_seconds histogram"));
    // An empty histogram still has every bucket (dashboards divide by its count).
    let empty = encode(&Snapshot {
        job: "j".into(),
        ..Snapshot::default()
    });
    let s = samples(&empty);
    assert_eq!(
        s[r#"s3_backfill_replication_latency_seconds_bucket{le="+Inf",job="j"}"#],
        0.0
    );
}

#[test]
fn a_label_value_is_escaped() {
    let text = encode(&Snapshot {
        job: "a \"quoted\" job\\".into(),
        ..Snapshot::default()
    });
    assert!(
        text.contains(r#"s3_backfill_tasks_blocked{job="a \"quoted\" job\\"} 0"#),
        "{text}"
    );
}

#[tokio::test]
async fn live_counts_split_requests_into_ok_and_the_failed_attempts_classes() {
    // Three attempts a request, a millisecond apart.
    let ms = std::time::Duration::from_millis(1);
    let (min_delay, max_delay, max_attempts) = (ms, 2 * ms, 3);
    let s = FakeServer::new();
    let clients = (s.client(Side::Source), s.client(Side::Dest));
    let policy = RetryPolicy {
        min_delay,
        max_delay,
        max_attempts,
    };
    let sides = Sides::shared(clients, policy, 4, None);
    s.create_bucket("b", true);
    s.put("b", "k", b"1", &[]);
    s.fail(
        "HeadObject",
        Some("k"),
        2,
        FaultKind::Before(ErrorClass::Throttled, 503),
    );
    let obj = ObjectRef::key("b", "k");
    sides.source.req().head_object(&obj, None).await.unwrap();
    sides.dest.req().head_object(&obj, None).await.unwrap();
    s.fail(
        "HeadObject",
        Some("k"),
        1,
        FaultKind::Before(ErrorClass::Fatal, 403),
    );
    assert!(sides.dest.req().head_object(&obj, None).await.is_err());
    let live = Live::of(&sides);
    let c = (live.0)();
    let n = |side, outcome| {
        c.requests
            .iter()
            .find(|r| r.side == side && r.op == "HeadObject" && r.outcome == outcome)
            .map_or(0, |r| r.count)
    };
    assert_eq!(n(Side::Source, "throttled"), 2, "{c:?}");
    assert_eq!(n(Side::Source, "ok"), 1, "{c:?}");
    assert_eq!(n(Side::Dest, "ok"), 1, "{c:?}");
    assert_eq!(n(Side::Dest, "fatal"), 1, "{c:?}");
    assert_eq!(c.retries, [2, 0]);
    assert_eq!(c.throttles, [2, 0]);
    assert!(c.in_flight_limit >= 1);
    // Attached, the scrape carries them.
    let text = encode(&Snapshot {
        job: "j".into(),
        live: Some(c),
        ..Snapshot::default()
    });
    let s = samples(&text);
    assert_eq!(
        s[r#"s3_backfill_requests_total{job="j",side="source",operation="HeadObject",outcome="throttled"}"#],
        2.0
    );
    assert_eq!(
        s[r#"s3_backfill_throttles_total{job="j",side="source"}"#],
        2.0
    );
    assert_eq!(s[r#"s3_backfill_retries_total{job="j",side="dest"}"#], 0.0);
}

/// One HTTP/1.0 request to `addr`; the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

/// A manifest named `name` planned (on the fake server) from a source holding `objects`.
async fn planned(name: &str, objects: &[(&str, &[u8])]) -> (tempfile::TempDir, PathBuf) {
    use crate::copier::tests::{plan_with, settings, DST, SRC};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    let s = FakeServer::new();
    s.create_bucket(SRC, true);
    s.create_bucket(DST, true);
    for (key, body) in objects {
        s.put(SRC, key, body, &[]);
    }
    plan_with(&s, &path, &settings()).await;
    (dir, path)
}

#[tokio::test]
async fn the_endpoint_serves_the_manifest_and_stops_when_dropped() {
    let (_dir, path) = planned("nightly.db", &[("k", b"12345")]).await;
    let server = serve(
        "127.0.0.1:0".parse().unwrap(),
        &path,
        &crate::manifest::job_name(&path),
    )
    .unwrap();
    let addr = server.addr();
    assert_ne!(addr.port(), 0);
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    let m = samples(&body);
    let bucket = crate::copier::tests::DST;
    assert_eq!(
        m[&format!(r#"s3_backfill_tasks{{job="nightly",bucket="{bucket}",state="pending"}}"#)],
        1.0,
        "{body}"
    );
    assert_eq!(
        m[&format!(
            r#"s3_backfill_object_bytes{{job="nightly",bucket="{bucket}",state="pending"}}"#
        )],
        5.0
    );
    assert_eq!(get(addr, "/").await.0, 404);
    // The port is taken: a second endpoint on it is one line, naming the flag.
    let e = serve(addr, &path, "x").err().expect("the port is in use");
    assert!(
        e.to_string()
            .starts_with(&format!("--metrics {addr}: cannot listen: ")),
        "{e}"
    );
    drop(server);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "stopped"
    );
}

#[tokio::test]
async fn the_latency_histogram_is_read_from_the_lag_table_and_agrees_with_status() {
    let (_dir, path) = planned("job.db", &[]).await;
    let m = Manifest::open(&path, false).unwrap();
    // Without follow, no lag table: an empty histogram.
    let before = Snapshot::read(&m, "j").unwrap();
    assert_eq!((before.lag.count, before.lag.sum_secs), (0, 0.0));
    m.start_following().unwrap();
    let lags_ms = [50, 80, 400, 1_500, 70_000, 901_000, 7_200_000];
    let conn = rusqlite::Connection::open(&path).unwrap();
    for (task, lag) in lags_ms.iter().enumerate() {
        conn.execute(
            "INSERT INTO follow_lag (task, dest, done_ms, lag_ms) VALUES (?1, 0, ?2, ?3)",
            rusqlite::params![task as i64, 1_000 + task as i64, lag],
        )
        .unwrap();
    }
    let snap = Snapshot::read(&m, "j").unwrap();
    assert_eq!(snap.lag.count, 7);
    assert!(
        (snap.lag.sum_secs - 8_173.03).abs() < 1e-6,
        "{:?}",
        snap.lag
    );
    let text = encode(&snap);
    let got = samples(&text);
    let bucket = |le: &str| {
        got[&format!(r#"s3_backfill_replication_latency_seconds_bucket{{le="{le}",job="j"}}"#)]
    };
    assert_eq!(bucket("0.1"), 2.0);
    assert_eq!(bucket("0.5"), 3.0);
    assert_eq!(bucket("2.5"), 4.0);
    assert_eq!(bucket("120.0"), 5.0);
    assert_eq!(bucket("900.0"), 5.0);
    assert_eq!(bucket("1800.0"), 6.0);
    assert_eq!(bucket("3600.0"), 6.0);
    assert_eq!(bucket("+Inf"), 7.0);
    // The dashboard's share within 15 minutes is status's `within_15m`.
    let stats = m.lag_stats(None).unwrap();
    assert_eq!(Some(bucket("900.0") / bucket("+Inf")), stats.within_15m);
}

/// Every string of the dashboard that holds a query (targets' `expr`, variables' `query`
/// and `definition`).
fn queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(o) => {
            for (k, v) in o {
                match (k.as_str(), v) {
                    ("expr" | "definition" | "query", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => queries(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_queries_only_metrics_a_scrape_has() {
    let text = include_str!("../../deploy/grafana/s3-backfill.json");
    let dash: serde_json::Value = serde_json::from_str(text).expect("the dashboard is JSON");
    let mut found = Vec::new();
    queries(&dash, &mut found);
    let names: std::collections::BTreeSet<String> = found
        .iter()
        .flat_map(|q| {
            q.match_indices("s3_backfill_").map(move |(i, _)| {
                q[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
        })
        .collect();
    assert!(names.len() >= 12, "{names:?}");
    let scrape = encode(&Snapshot {
        live: Some(LiveCounts {
            requests: vec![RequestCount {
                side: Side::Dest,
                op: "CopyObject",
                outcome: "ok",
                count: 1,
            }],
            ..LiveCounts::default()
        }),
        ..snapshot()
    });
    let scraped: std::collections::BTreeSet<String> = samples(&scrape)
        .keys()
        .map(|k| k.split('{').next().unwrap().to_string())
        .collect();
    for n in &names {
        assert!(
            scraped.contains(n),
            "the dashboard queries {n}, which no scrape has: {scraped:?}"
        );
    }
    // Its share within 15 minutes picks the 900 s bucket as the encoder writes it.
    assert!(scrape.contains(r#"le="900.0""#));
    assert!(text.contains(r#"le=~\"900(\\\\.0)?\""#));
    // Every panel that is not a row has a query.
    for p in dash["panels"].as_array().unwrap() {
        if p["type"] != "row" {
            assert!(p["targets"][0]["expr"].is_string(), "{p}");
        }
    }
}
