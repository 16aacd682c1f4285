//! Conformance (issue 20): every command behaves the same on both manifest backends, a SQLite
//! file and a job in PostgreSQL. Each scenario is written once, as a function of the
//! [`Backend`], and [`both!`] makes it two tests (`sqlite::X`, `postgres::X`) that make the same
//! assertions: the destination's version histories, bodies and metadata, `status --json`
//! counts, report contents, exit codes. Where a scenario's printed output must be the same
//! on both (a dry run's selection, `status --json`, `verify --json`, the reports), each test
//! hands its normalised output to [`agree`], and whichever of the pair finishes second
//! compares it with the other's.
//!
//! One S3 server and one PostgreSQL cluster for the binary; a fresh database per test and
//! unique bucket names, so the tests run in parallel.
//!
//! Not here: `follow` (refused on PostgreSQL in this version). Inventories on PostgreSQL
//! are in `tests/pg_supplied.rs`.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use support::fault_proxy::{FaultConfig, FaultProxy};
use support::pg::{fresh_database, psql};
use support::*;

/// Where a test's manifest lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// A SQLite file in a temporary directory.
    Sqlite,
    /// A job in a fresh PostgreSQL database.
    Postgres,
}

/// A test's manifest: its `--manifest` text, and what keeps it (a temporary directory; the
/// database's DSN).
struct Place {
    dir: tempfile::TempDir,
    manifest: String,
    db: Option<String>,
}

impl Place {
    fn path(&self) -> &Path {
        Path::new(&self.manifest)
    }

    /// Whether a manifest of this job exists (a file; the job's schema in the database).
    fn exists(&self) -> bool {
        match &self.db {
            None => self.path().exists(),
            Some(db) => {
                let schemas = psql(
                    db,
                    "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 's3b%'",
                );
                schemas != "0"
            }
        }
    }
}

impl Backend {
    /// A new manifest location for the test `tag`.
    fn place(self, tag: &str) -> Place {
        let dir = tempfile::tempdir().unwrap();
        match self {
            Backend::Sqlite => Place {
                manifest: dir.path().join("job.db").to_str().unwrap().to_string(),
                dir,
                db: None,
            },
            Backend::Postgres => {
                let db = fresh_database(tag);
                Place {
                    manifest: format!("{db}?job={tag}"),
                    dir,
                    db: Some(db),
                }
            }
        }
    }
}

/// Two tests of one scenario: `sqlite_NAME` and `postgres_NAME`.
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Postgres).await;
                }
            )*
        }
    };
}

both!(
    versions_and_delete_markers_make_an_exact_replica,
    filters_and_prefix_select_the_same_tasks,
    replication_rules_select_the_same_tasks,
    a_dry_run_writes_nothing_and_prints_the_selection,
    a_listing_in_parts_then_run,
    replicate_lists_and_copies_in_one_process,
    failed_and_skipped_tasks_are_reported_retried_and_skipped_alike,
    a_killed_run_resumes_to_an_exact_replica,
    a_missing_job_and_a_bad_manifest_are_one_line_each,
    a_csv_manifest_plans_exactly_the_versions_it_names,
    a_refresh_plans_what_is_new_and_a_run_catches_up,
    a_refresh_of_an_unversioned_source_plans_overwrites_and_deletions,
);

/// Compares a scenario's normalised output between the backends: the first test of the pair
/// to get here leaves its output; the second compares (a lone test compares nothing).
fn agree(what: &str, b: Backend, text: String) {
    static SEEN: Mutex<BTreeMap<String, (Backend, String)>> = Mutex::new(BTreeMap::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    match seen.get(what) {
        Some((other, theirs)) if *other != b => {
            assert_eq!(
                theirs, &text,
                "{what}: {other:?} (left) and {b:?} (right) differ"
            );
        }
        _ => {
            seen.insert(what.to_string(), (b, text));
        }
    }
}

/// `text` with the test's own names (buckets, manifest) replaced by placeholders.
fn normalise(text: &str, names: &[(&str, &str)]) -> String {
    let mut t = text.to_string();
    for (from, to) in names {
        t = t.replace(from, to);
    }
    // Columns are as wide as the names they hold.
    t.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn upstream(ep: &str) -> SocketAddr {
    ep.trim_start_matches("http://").parse().unwrap()
}

/// Two versioned buckets on the test server, named after `tag`.
async fn buckets(tag: &str) -> (aws_sdk_s3::Client, String, String) {
    let c = client(&endpoint());
    let (src, dst) = (bucket(&format!("{tag}-s")), bucket(&format!("{tag}-d")));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    (c, src, dst)
}

/// Scenario 1: versions and delete markers, planned then run: an exact replica, every task
/// done, `verify` clean.
async fn versions_and_delete_markers_make_an_exact_replica(b: Backend) {
    let (c, src, dst) = buckets("cf-exact").await;
    let keys = ["a/one", "a/two", "b/three", "c four"];
    seed(
        &c,
        &src,
        vec![
            keys.iter().map(|k| Op::put(k, format!("v1 {k}"))).collect(),
            keys.iter()
                .map(|k| Op::put(k, format!("v2 of {k}")))
                .collect(),
            vec![
                Op::Delete {
                    key: "a/one".into(),
                },
                Op::Delete {
                    key: "c four".into(),
                },
            ],
            vec![Op::put("a/one", "v3 after a marker")],
        ],
    )
    .await;
    let p = b.place("exact");
    let job = Job::new(&src, &dst, p.path())
        .endpoint(&endpoint())
        .extra(&["--delete-markers"]);
    expect_code(&job.plan(), 0);
    let s = job.status();
    assert_eq!((s.total, s.pending, s.delete_markers), (11, 11, 2), "{s:?}");
    assert!(s.listing_complete, "{s:?}");
    expect_code(&job.run(&["--concurrency", "4"]), 0);
    let s = job.status();
    assert_eq!(
        (s.done, s.pending, s.failed, s.skipped),
        (11, 0, 0, 0),
        "{s:?}"
    );
    assert_eq!(s.bytes_done, s.bytes_total, "{s:?}");
    // A reader that goes away (`| head`) ends each printing command quietly with 0.
    for args in [
        &["status", "--manifest", &p.manifest][..],
        &["status", "--manifest", &p.manifest, "--json"],
        &["report", "--manifest", &p.manifest, "--format", "json"],
    ] {
        let (code, err) = run_into_closed_pipe(args);
        assert_eq!((code, err.as_str()), (Some(0), ""), "{args:?}");
    }
    // Everything `status --json` says but times and rates reads the same on both.
    let o = run(&["status", "--manifest", &p.manifest, "--json"]);
    expect_code(&o, 0);
    let mut json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    drop_times(&mut json);
    // The fleet (PostgreSQL only: a SQLite job has one process): none left after the run.
    let workers = json.as_object_mut().unwrap().remove("workers");
    // On RGW, whose CopyObject answer names no version, run learns the destination's version
    // ids with listings batched in the order copies finish: their number varies from run to
    // run (every id learned is checked: done_without_dest_version). The estimate counts them.
    json.as_object_mut().unwrap().remove("estimate");
    if let Some(r) = json["requests"].as_object_mut() {
        r.remove("ListObjectVersions");
    }
    assert_eq!(json["done_without_dest_version"], 0, "{json}");
    match b {
        Backend::Sqlite => assert_eq!(workers, None),
        Backend::Postgres => assert_eq!(workers, Some(serde_json::json!([]))),
    }
    let text = serde_json::to_string_pretty(&json).unwrap();
    agree(
        "status",
        b,
        normalise(&text, &[(&src, "SRC"), (&dst, "DST"), (&p.manifest, "M")]),
    );
    assert_eq!(assert_replica(&c, &src, &c, &dst, "", "", all).await, 9);
    let v = run(&[
        "verify",
        "--manifest",
        &p.manifest,
        "--json",
        "--no-progress",
    ]);
    expect_code(&v, 0);
    let mut json: serde_json::Value = serde_json::from_slice(&v.stdout)
        .unwrap_or_else(|e| panic!("verify --json ({e}): {}", out(&v)));
    drop_times(&mut json);
    let text = serde_json::to_string_pretty(&json).unwrap();
    agree(
        "verify",
        b,
        normalise(&text, &[(&src, "SRC"), (&dst, "DST"), (&p.manifest, "M")]),
    );
    // A second run finds nothing to do and changes nothing.
    expect_code(&job.run(&[]), 0);
    assert_eq!(job.status().done, 11);
    assert_eq!(entry_count(&c, &dst).await, 11);
}

/// A corpus for the selection scenarios: keys under `logs/` and `data/`, bodies of various
/// sizes, two versions of some keys.
fn selection_corpus() -> Vec<Vec<Op>> {
    vec![
        vec![
            Op::put("logs/a.txt", "12345"),
            Op::put("logs/b.bin", "1234567890"),
            Op::put("logs/c.txt", "1"),
            Op::put("data/d.txt", "123456789"),
            Op::put("data/e.txt", "12"),
        ],
        vec![
            Op::put("logs/a.txt", "1234567890ab"),
            Op::put("data/d.txt", "1"),
        ],
    ]
}

/// Scenario 2a: `--prefix`, a key-suffix filter and a size filter pick the same versions.
async fn filters_and_prefix_select_the_same_tasks(b: Backend) {
    let (c, src, dst) = buckets("cf-filt").await;
    seed(&c, &src, selection_corpus()).await;
    let p = b.place("filters");
    let job = Job::new(&src, &dst, p.path())
        .endpoint(&endpoint())
        .extra(&[
            "--prefix",
            "logs/",
            "--key-suffix",
            ".txt",
            "--min-size",
            "2",
        ]);
    expect_code(&job.plan(), 0);
    // logs/a.txt's two versions (5 and 12 bytes); not logs/c.txt (1 byte), logs/b.bin, data/.
    let s = job.status();
    assert_eq!((s.total, s.bytes_total), (2, 17), "{s:?}");
    expect_code(&job.run(&[]), 0);
    assert_eq!(job.status().done, 2);
    let dh = histories(&c, &dst, "").await;
    assert_eq!(dh.keys().collect::<Vec<_>>(), ["logs/a.txt"], "{dh:?}");
    assert_eq!(
        assert_replica(&c, &src, &c, &dst, "", "logs/a", all).await,
        2
    );
    expect_code(&job.verify(), 0);
}

/// Scenario 2b: a replication configuration's rules pick the same versions for each
/// destination, with the rule's storage class.
async fn replication_rules_select_the_same_tasks(b: Backend) {
    let (c, src, a) = buckets("cf-rules").await;
    let bb = bucket("cf-rules-b");
    create_bucket(&c, &bb, true).await;
    seed(&c, &src, selection_corpus()).await;
    let p = b.place("rules");
    let cfg = p.dir.path().join("replication.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"Role": "arn:aws:iam::123456789012:role/r",
  "Rules": [
    {{"ID": "logs", "Priority": 2, "Status": "Enabled", "Filter": {{"Prefix": "logs/"}},
      "DeleteMarkerReplication": {{"Status": "Disabled"}},
      "Destination": {{"Bucket": "arn:aws:s3:::{a}"}}}},
    {{"ID": "data", "Priority": 1, "Status": "Enabled", "Filter": {{"Prefix": "data/"}},
      "DeleteMarkerReplication": {{"Status": "Disabled"}},
      "Destination": {{"Bucket": "arn:aws:s3:::{bb}", "StorageClass": "STANDARD_IA"}}}}
  ]}}"#
        ),
    )
    .unwrap();
    let ep = endpoint();
    let args = [
        "plan",
        "--source",
        &format!("s3://{src}"),
        "--replication-config",
        cfg.to_str().unwrap(),
        "--manifest",
        &p.manifest,
        "--source-endpoint",
        &ep,
        "--dest-endpoint",
        &ep,
        "--path-style",
        "--no-progress",
    ];
    expect_code(&run(&args), 0);
    let s = status(p.path());
    assert_eq!(s.total, 7, "{s:?}");
    expect_code(
        &run(&["run", "--manifest", &p.manifest, "--no-progress"]),
        0,
    );
    let s = status(p.path());
    assert_eq!((s.done, s.failed), (7, 0), "{s:?}");
    let ha = histories(&c, &a, "").await;
    let hb = histories(&c, &bb, "").await;
    let count = |h: &BTreeMap<String, Vec<Ver>>| {
        h.iter()
            .map(|(k, v)| (k.clone(), v.len()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        count(&ha),
        [
            ("logs/a.txt".to_string(), 2),
            ("logs/b.bin".to_string(), 1),
            ("logs/c.txt".to_string(), 1)
        ]
    );
    assert_eq!(
        count(&hb),
        [("data/d.txt".to_string(), 2), ("data/e.txt".to_string(), 1)]
    );
    let d = hb["data/d.txt"][0].version_id.clone();
    let class = c
        .head_object()
        .bucket(&bb)
        .key("data/d.txt")
        .version_id(&d)
        .send()
        .await
        .unwrap()
        .storage_class()
        .map(|s| s.as_str().to_string());
    assert_eq!(class.as_deref(), Some("STANDARD_IA"));
    let v = run(&["verify", "--manifest", &p.manifest, "--no-progress"]);
    expect_code(&v, 0);
}

/// Scenario 3: `plan --dry-run` writes no manifest and prints the same selection.
async fn a_dry_run_writes_nothing_and_prints_the_selection(b: Backend) {
    let (c, src, dst) = buckets("cf-dry").await;
    seed(&c, &src, selection_corpus()).await;
    let p = b.place("dry");
    let job = Job::new(&src, &dst, p.path())
        .endpoint(&endpoint())
        .extra(&["--key-suffix", ".txt", "--dry-run"]);
    let o = job.plan();
    expect_code(&o, 0);
    let printed = out(&o);
    assert!(!p.exists(), "a dry run wrote a manifest:\n{printed}");
    // logs/a.txt ×2, logs/c.txt, data/d.txt ×2, data/e.txt: 6 tasks.
    assert!(
        printed
            .lines()
            .any(|l| l.split_whitespace().any(|w| w == "6")),
        "{printed}"
    );
    // The time estimate's request latency is measured: left out.
    let selection: String = printed
        .lines()
        .filter(|l| !l.trim_start().starts_with("time:"))
        .map(|l| format!("{l}\n"))
        .collect();
    agree(
        "dry run",
        b,
        normalise(
            &selection,
            &[(&src, "SRC"), (&dst, "DST"), (&p.manifest, "M")],
        ),
    );
    // Nothing to report on: status says there is no manifest, on both.
    let o = run(&["status", "--manifest", &p.manifest, "--json"]);
    expect_code(&o, 2);
}

/// Scenario 4: a listing in parts (several parts, small pages) then `run`.
async fn a_listing_in_parts_then_run(b: Backend) {
    let (c, src, dst) = buckets("cf-parts").await;
    let keys: Vec<String> = (0..24)
        .map(|i| format!("{}{i:02}/k", (b'a' + (i % 6) as u8) as char))
        .collect();
    seed(
        &c,
        &src,
        vec![
            keys.iter()
                .map(|k| Op::put(k, format!("one {k}")))
                .collect(),
            keys.iter()
                .step_by(3)
                .map(|k| Op::put(k, format!("two {k}")))
                .collect(),
        ],
    )
    .await;
    let p = b.place("parts");
    let job = Job::new(&src, &dst, p.path())
        .endpoint(&endpoint())
        .extra(&["--list-concurrency", "4", "--list-page-size", "3"]);
    expect_code(&job.plan(), 0);
    let s = job.status();
    assert_eq!((s.total, s.listed_entries), (32, 32), "{s:?}");
    assert!(s.listing_complete, "{s:?}");
    expect_code(&job.run(&["--concurrency", "4"]), 0);
    assert_eq!(job.status().done, 32);
    assert_eq!(assert_replica(&c, &src, &c, &dst, "", "", all).await, 32);
    expect_code(&job.verify(), 0);
}

/// Scenario 5: `replicate` plans and copies in one process (the latest versions only, with
/// their metadata and tags).
async fn replicate_lists_and_copies_in_one_process(b: Backend) {
    let (c, src, dst) = buckets("cf-repl").await;
    let tagged = |k: &str, body: &str| Op::Put {
        key: k.into(),
        body: body.as_bytes().to_vec(),
        content_type: Some("text/plain".into()),
        cache_control: Some("max-age=60".into()),
        metadata: vec![("owner".into(), "conformance".into())],
        tagging: Some("team=x".into()),
    };
    seed(
        &c,
        &src,
        vec![
            vec![
                Op::put("k1", "old"),
                Op::put("k2", "old"),
                Op::put("k3", "old"),
            ],
            vec![tagged("k1", "new one"), tagged("k2", "new two")],
            vec![Op::Delete { key: "k3".into() }],
        ],
    )
    .await;
    let p = b.place("repl");
    let job = Job::new(&src, &dst, p.path())
        .endpoint(&endpoint())
        .extra(&["--latest-only"]);
    expect_code(&job.replicate(), 0);
    let s = job.status();
    assert_eq!((s.total, s.done), (2, 2), "{s:?}");
    assert_eq!(
        assert_replica(&c, &src, &c, &dst, "", "", latest_only).await,
        2
    );
    expect_code(&job.verify(), 0);
}

/// Scenario 6: a run in which a prefix of the source is denied (failed tasks) and a version
/// vanished after the plan (skipped, source gone): the same counts, the same reports in every
/// format, and `--retry-failed`, `--skip-failed` and `--retry-skipped` do the same.
async fn failed_and_skipped_tasks_are_reported_retried_and_skipped_alike(b: Backend) {
    let (c, src, dst) = buckets("cf-fail").await;
    let mut round = Vec::new();
    for i in 0..3 {
        round.push(Op::put(&format!("open/{i}"), format!("o{i}")));
        round.push(Op::put(&format!("shut/{i}"), format!("s{i}")));
    }
    round.push(Op::put("gone/soon", "bye"));
    seed(&c, &src, vec![round]).await;
    let p = b.place("fail");
    let ep = endpoint();
    // One listing part: reports list keys in the order the listing inserted them (parts
    // listed at once insert theirs in any order, on either backend).
    let job = Job::new(&src, &dst, p.path())
        .endpoint(&ep)
        .extra(&["--list-concurrency", "1"]);
    expect_code(&job.plan(), 0);
    let gone = histories(&c, &src, "gone/").await["gone/soon"][0]
        .version_id
        .clone();
    delete_version(&c, &src, "gone/soon", &gone).await;
    let proxy = FaultProxy::start(
        upstream(&ep),
        FaultConfig {
            deny_path_prefix: Some(format!("/{src}/shut/")),
            ..FaultConfig::default()
        },
    )
    .await
    .unwrap();
    let through = |extra: &[&str]| {
        let pe = proxy.endpoint();
        let mut a = vec![
            "--source-endpoint",
            pe.as_str(),
            "--dest-endpoint",
            pe.as_str(),
        ];
        a.extend_from_slice(&["--retry-min-delay-ms", "5"]);
        a.extend_from_slice(extra);
        job.run(&a)
    };
    expect_code(&through(&[]), 1);
    let s = job.status();
    assert_eq!((s.done, s.failed, s.skipped), (3, 3, 1), "{s:?}");

    // Reports, every format, normalised (names, version ids, times) and compared.
    let names = [
        (src.as_str(), "SRC"),
        (dst.as_str(), "DST"),
        (p.manifest.as_str(), "M"),
    ];
    let mut ids: Vec<(String, String)> = histories(&c, &src, "")
        .await
        .into_iter()
        .flat_map(|(k, h)| {
            h.into_iter()
                .map(move |v| (v.version_id, format!("V({k})")))
        })
        .collect();
    ids.push((gone.clone(), "V(gone/soon)".into()));
    let norm = |t: &str| {
        let mut t = normalise(t, &names);
        for (id, name) in &ids {
            t = t.replace(id.as_str(), name);
        }
        t
    };
    let csv = out(&job.report(&["--format", "csv"]));
    let failed: Vec<&str> = csv.lines().filter(|l| l.contains(",failed,")).collect();
    assert_eq!(failed.len(), 3, "{csv}");
    assert!(
        failed
            .iter()
            .all(|l| l.contains("shut/") && l.contains(",403,")),
        "{csv}"
    );
    let skipped: Vec<&str> = csv.lines().filter(|l| l.contains(",skipped,")).collect();
    assert_eq!(skipped.len(), 1, "{csv}");
    assert!(skipped[0].contains("gone/soon") && skipped[0].contains("source-gone"));
    agree("report csv", b, norm(&csv));

    let o = job.report(&["--format", "json"]);
    expect_code(&o, 0);
    let mut json: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("report json ({e}): {}", out(&o)));
    drop_times(&mut json);
    agree(
        "report json",
        b,
        norm(&serde_json::to_string_pretty(&json).unwrap()),
    );

    let aws = p.dir.path().join("aws");
    let o = job.report(&[
        "--format",
        "aws",
        "--output",
        aws.to_str().unwrap(),
        "--job-id",
        "conformance",
    ]);
    expect_code(&o, 0);
    let results = aws_results(&aws.join("job-conformance"));
    let rows: Vec<&str> = results.lines().collect();
    assert_eq!(rows.len(), 7, "{results}");
    assert_eq!(
        rows.iter().filter(|r| r.contains("succeeded")).count(),
        3,
        "{results}"
    );
    agree("report aws", b, norm(&results));
    // Without --job-id the report is named after the job: the file's stem, the job's name.
    let o = job.report(&["--format", "aws", "--output", aws.to_str().unwrap()]);
    expect_code(&o, 0);
    let named = match b {
        Backend::Sqlite => "job-job",
        Backend::Postgres => "job-fail",
    };
    assert_eq!(aws_results(&aws.join(named)), results);

    // Retrying while the cause stands fails the same tasks again.
    expect_code(&through(&["--retry-failed"]), 1);
    let s = job.status();
    assert_eq!((s.done, s.failed, s.skipped), (3, 3, 1), "{s:?}");
    // Giving up on them records them skipped.
    expect_code(&job.run(&["--skip-failed"]), 0);
    let s = job.status();
    assert_eq!((s.done, s.failed, s.skipped), (3, 0, 4), "{s:?}");
    // Once the cause is fixed, --retry-skipped copies them (not the version that is gone).
    drop(proxy);
    expect_code(&job.run(&["--retry-skipped"]), 0);
    let s = job.status();
    assert_eq!((s.done, s.failed, s.skipped), (6, 0, 1), "{s:?}");
    assert_eq!(assert_replica(&c, &src, &c, &dst, "", "", all).await, 6);
}

/// Removes what changes from run to run (times, durations, rates, measured latencies) from a
/// JSON report or status.
fn drop_times(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.retain(|k, _| {
                let k = k.to_lowercase();
                !(k.contains("time")
                    || k.ends_with("_at")
                    || k.ends_with("_ms")
                    || k.ends_with("_secs")
                    || k == "seconds"
                    || k.contains("latency")
                    || k.contains("date")
                    || k.contains("elapsed")
                    || k.contains("rate"))
            });
            m.values_mut().for_each(drop_times);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(drop_times),
        _ => {}
    }
}

/// The rows of an S3 Batch Operations report's results files, sorted.
fn aws_results(job_dir: &Path) -> String {
    let mut rows = Vec::new();
    let results = job_dir.join("results");
    let entries =
        std::fs::read_dir(&results).unwrap_or_else(|e| panic!("{}: {e}", results.display()));
    for e in entries {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        rows.extend(text.lines().map(str::to_string));
    }
    rows.sort();
    rows.join("\n")
}

/// The lease of scenario 7's runs, in seconds (PostgreSQL; SQLite has none): short, so that
/// the killed run's unit is taken again soon.
const LEASE: &str = "5";

/// Scenario 7: a run killed with SIGKILL mid-way, then run again: an exact replica, every
/// task done once.
async fn a_killed_run_resumes_to_an_exact_replica(b: Backend) {
    let (c, src, dst) = buckets("cf-kill").await;
    let keys: Vec<String> = (0..30).map(|i| format!("k/{i:02}")).collect();
    seed(
        &c,
        &src,
        vec![keys
            .iter()
            .map(|k| Op::put(k, format!("body {k}")))
            .collect()],
    )
    .await;
    let p = b.place("kill");
    let job = Job::new(&src, &dst, p.path()).endpoint(&endpoint());
    expect_code(&job.plan(), 0);
    // One copy at a time, a few requests a second: slow enough to be killed mid-way.
    let args = job.run_args(&["--concurrency", "1", "--max-rps", "8"]);
    let mut child = cmd(&strs(&args))
        .env("S3_BACKFILL_LEASE_SECS", LEASE)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start run");
    let until = Instant::now() + Duration::from_secs(120);
    let mut done = 0;
    while done < 3 && Instant::now() < until && child.try_wait().unwrap().is_none() {
        done = try_status(job.manifest()).map_or(0, |s| s.done);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (killed, _) = kill_after(child, Duration::ZERO).await;
    assert!(killed, "the run ended before it was killed");
    let s = job.status();
    assert!(s.done >= 3 && s.done < 30, "{s:?}");
    // On PostgreSQL the killed run's unit comes back when its lease expires.
    let o = cmd(&strs(&job.run_args(&["--concurrency", "4"])))
        .env("S3_BACKFILL_LEASE_SECS", LEASE)
        .output()
        .unwrap();
    expect_code(&o, 0);
    let s = job.status();
    assert_eq!(
        (s.total, s.done, s.pending, s.in_progress, s.failed),
        (30, 30, 0, 0, 0),
        "{s:?}"
    );
    // Exactly one destination version per source version (nothing doubled by the kill).
    assert_eq!(entry_count(&c, &dst).await, 30);
    assert_eq!(assert_replica(&c, &src, &c, &dst, "", "", all).await, 30);
    expect_code(&job.verify(), 0);
}

/// Scenario 8: `status` of a job that does not exist, and of a manifest that is not one
/// (SQLite: a file of something else; PostgreSQL: a URL with an unknown parameter and a
/// password), each say one line and exit 2.
async fn a_missing_job_and_a_bad_manifest_are_one_line_each(b: Backend) {
    let p = b.place("missing");
    let one_line_2 = |manifest: &str, what: &str| -> String {
        let o = run(&["status", "--manifest", manifest, "--json"]);
        expect_code(&o, 2);
        let err = stderr_of(&o);
        assert_eq!(err.trim().lines().count(), 1, "{what}: {err}");
        assert!(o.stdout.is_empty(), "{what}: {}", out(&o));
        err
    };
    let err = one_line_2(&p.manifest, "a missing job");
    assert!(err.contains("does not exist"), "{err}");
    let bad = match b {
        Backend::Sqlite => {
            let f = p.dir.path().join("notes.txt");
            std::fs::write(&f, "not a manifest").unwrap();
            f.to_str().unwrap().to_string()
        }
        Backend::Postgres => bad_url(p.db.as_deref().unwrap()),
    };
    one_line_2(&bad, "a bad manifest");
}

/// The database `db` as user `nobody` with password `s3cret`, and a parameter that no
/// PostgreSQL client knows: a URL that does not parse.
fn bad_url(db: &str) -> String {
    let (scheme, rest) = db.split_once("://").unwrap();
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let sep = if rest.contains('?') { '&' } else { '?' };
    format!("{scheme}://nobody:s3cret@{rest}{sep}bogus=1")
}

/// A `--manifest` URL that does not parse is named without its password, and said to be a
/// bad URL (not "stored job settings are unreadable").
#[test]
fn postgres_a_bad_url_is_named_without_its_password() {
    let p = Backend::Postgres.place("badurl");
    let url = bad_url(p.db.as_deref().unwrap());
    let o = run(&["status", "--manifest", &url, "--json"]);
    expect_code(&o, 2);
    let err = stderr_of(&o);
    assert!(!err.contains("s3cret"), "the password is shown: {err}");
    assert!(!err.contains("stored job settings"), "{err}");
}

/// A database or a role the server does not have is named in the server's words, in one
/// line (not the driver's bare "db error").
#[test]
fn postgres_a_missing_database_or_role_is_said_by_the_server() {
    let p = Backend::Postgres.place("nodb");
    let db = p.db.as_deref().unwrap();
    let (base, _) = db.rsplit_once('/').unwrap();
    let (scheme, rest) = db.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    for (url, said) in [
        (
            format!("{base}/no_such_db?job=x"),
            "database \"no_such_db\" does not exist",
        ),
        (
            format!("{scheme}://nobody_here@{host}?job=x"),
            "role \"nobody_here\" does not exist",
        ),
    ] {
        let o = run(&["status", "--manifest", &url]);
        expect_code(&o, 2);
        let err = stderr_of(&o);
        assert!(err.contains(said), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

/// Scenario 9: a supplied CSV manifest (`plan --from-csv`) names some versions and a delete
/// marker; `run` copies exactly those, in their order; the plan's line and `status` agree.
async fn a_csv_manifest_plans_exactly_the_versions_it_names(b: Backend) {
    let (c, src, dst) = buckets("cf-csv").await;
    let (a, k) = ("s/a", "s/b b");
    seed(
        &c,
        &src,
        vec![
            vec![Op::put(a, "a one"), Op::put(k, "b one")],
            vec![Op::put(a, "a two, longer"), Op::put(k, "b two")],
            vec![Op::put(a, "a three"), Op::Delete { key: k.into() }],
        ],
    )
    .await;
    let h = histories(&c, &src, "").await;
    assert!(h[k][2].delete_marker);
    let chosen: Vec<(&str, String)> = [(a, 2), (k, 0), (a, 0), (k, 2)]
        .into_iter()
        .map(|(key, i)| (key, h[key][i].version_id.clone()))
        .collect();
    let p = b.place("csv");
    let csv = p.dir.path().join("keys.csv");
    let rows: String = chosen
        .iter()
        .map(|(key, v)| format!("{src},{},{v}\n", s3_backfill::s3::types::encode_key(key)))
        .collect();
    std::fs::write(&csv, rows).unwrap();
    let csv = csv.display().to_string();
    let job = Job::new(&src, &dst, p.path())
        .endpoint(&endpoint())
        .extra(&["--delete-markers"]);
    let mut args = job.plan_args();
    args.extend(["--from-csv".to_string(), csv.clone()]);
    let o = run(&strs(&args));
    expect_code(&o, 0);
    let err = stderr_of(&o);
    let planned = err.lines().find(|l| l.starts_with("planned "));
    let planned = planned.unwrap_or_else(|| panic!("no planned line: {err}"));
    assert!(
        planned.starts_with("planned 4 tasks (1 delete markers"),
        "{planned}"
    );
    agree("csv planned", b, normalise(planned, &[(&csv, "CSV")]));
    let s = job.status();
    assert!(s.listing_complete, "{s:?}");
    assert_eq!((s.total, s.pending, s.delete_markers), (4, 4, 1), "{s:?}");

    expect_code(&job.run(&[]), 0);
    let s = job.status();
    assert_eq!(
        (s.total, s.done, s.pending, s.failed),
        (4, 4, 0, 0),
        "{s:?}"
    );
    let named: std::collections::BTreeSet<String> = chosen.iter().map(|(_, v)| v.clone()).collect();
    let select = |h: &[Ver]| -> Vec<Ver> {
        h.iter()
            .filter(|v| named.contains(&v.version_id))
            .cloned()
            .collect()
    };
    assert_eq!(assert_replica(&c, &src, &c, &dst, "", "", select).await, 3);
    expect_code(&job.verify(), 0);
}

/// The lines a `plan --refresh` printed about the refresh, with the test's names replaced.
fn refresh_said(o: &Output, names: &[(&str, &str)]) -> String {
    let said = stderr_of(o);
    let lines: Vec<&str> = said.lines().filter(|l| l.starts_with("refresh ")).collect();
    assert!(!lines.is_empty(), "no refresh line: {said}");
    normalise(&lines.join("\n"), names)
}

/// `status` (text): its lines about refreshes and keys deleted at the source.
fn status_refresh_lines(manifest: &str, names: &[(&str, &str)]) -> String {
    let o = run(&["status", "--manifest", manifest]);
    expect_code(&o, 0);
    let text = out(&o);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("refresh ") || l.contains("deleted at the source"))
        .collect();
    normalise(&lines.join("\n"), names)
}

/// A job of `src` to `dst` (delete markers, listing pages of 2 entries), planned and run.
fn planned_and_run(b: Backend, tag: &str, src: &str, dst: &str) -> (Place, Job) {
    let p = b.place(tag);
    let job = Job::new(src, dst, p.path()).endpoint(&endpoint()).extra(&[
        "--delete-markers",
        "--list-page-size",
        "2",
    ]);
    expect_code(&job.plan(), 0);
    expect_code(&job.run(&["--concurrency", "4"]), 0);
    (p, job)
}

/// `plan --refresh` of the job, which succeeds.
fn plan_refresh(job: &Job) -> Output {
    let mut args = job.plan_args();
    args.push("--refresh".into());
    let o = run(&strs(&args));
    expect_code(&o, 0);
    o
}

/// Scenario 11: `plan --refresh` of a versioned source after a run: new versions, an
/// overwrite, a deletion and a new key are planned (nothing else), and a run makes the
/// replica exact again; the refresh's lines and `status` read the same on both backends.
async fn a_refresh_plans_what_is_new_and_a_run_catches_up(b: Backend) {
    let (c, src, dst) = buckets("cf-refr").await;
    let keys: Vec<String> = (0..6).map(|i| format!("k{i}")).collect();
    seed(
        &c,
        &src,
        vec![
            keys.iter().map(|k| Op::put(k, format!("v1 {k}"))).collect(),
            vec![Op::put("k0", "v2 k0"), Op::put("k1", "v2 k1")],
        ],
    )
    .await;
    let (p, job) = planned_and_run(b, "refresh", &src, &dst);
    assert_eq!(job.status().done, 8);
    // The source moves on: a new version, an overwrite, a deletion, a new key.
    seed(
        &c,
        &src,
        vec![vec![
            Op::put("k0", "v3 k0"),
            Op::put("k2", "v2 k2, longer"),
            Op::Delete { key: "k3".into() },
            Op::put("n/new", "new"),
        ]],
    )
    .await;
    let o = plan_refresh(&job);
    let names = [(&*src, "SRC"), (&*dst, "DST"), (&*p.manifest, "M")];
    let said = refresh_said(&o, &names);
    assert!(
        said.contains("refresh 1: 4 new tasks; 0 tasks of earlier listings"),
        "{said}"
    );
    agree("refresh said", b, said);
    let s = job.status();
    assert_eq!(
        (s.total, s.pending, s.done, s.delete_markers),
        (12, 4, 8, 1),
        "{s:?}"
    );
    assert!(s.listing_complete, "{s:?}");
    agree(
        "refresh status",
        b,
        status_refresh_lines(&p.manifest, &names),
    );
    expect_code(&job.run(&["--concurrency", "4"]), 0);
    let s = job.status();
    assert_eq!(
        (s.done, s.pending, s.failed, s.skipped),
        (12, 0, 0, 0),
        "{s:?}"
    );
    assert_eq!(assert_replica(&c, &src, &c, &dst, "", "", all).await, 11);
    expect_code(&job.verify(), 0);
    // Nothing new: a second refresh adds nothing.
    let o = plan_refresh(&job);
    assert!(refresh_said(&o, &names).contains("refresh 2: 0 new tasks"));
    assert_eq!(job.status().total, 12);
}

/// Scenario 12: `plan --refresh` of a source without versioning: a key overwritten in place
/// is copied again, a key no longer listed gets a delete, a new key is copied; the
/// destination's current entries are the source's again.
async fn a_refresh_of_an_unversioned_source_plans_overwrites_and_deletions(b: Backend) {
    let c = client(&endpoint());
    let (src, dst) = (bucket("cf-unv-s"), bucket("cf-unv-d"));
    create_bucket(&c, &src, false).await;
    create_bucket(&c, &dst, true).await;
    let keys: Vec<String> = (0..5).map(|i| format!("u{i}")).collect();
    seed(
        &c,
        &src,
        vec![keys
            .iter()
            .map(|k| Op::put(k, format!("one {k}")))
            .collect()],
    )
    .await;
    let (p, job) = planned_and_run(b, "unversioned", &src, &dst);
    assert_eq!(job.status().done, 5);
    seed(
        &c,
        &src,
        vec![vec![
            Op::put("u1", "two u1, longer"),
            Op::Delete { key: "u2".into() },
            Op::put("u5", "new"),
        ]],
    )
    .await;
    let o = plan_refresh(&job);
    let names = [(&*src, "SRC"), (&*dst, "DST"), (&*p.manifest, "M")];
    let said = refresh_said(&o, &names);
    assert!(said.contains("refresh 1: 3 new tasks"), "{said}");
    assert!(said.contains("(1 delete tasks)"), "{said}");
    agree("unversioned refresh said", b, said);
    let s = job.status();
    assert_eq!((s.total, s.pending, s.delete_markers), (8, 3, 1), "{s:?}");
    expect_code(&job.run(&[]), 0);
    assert_eq!(job.status().done, 8);
    // Each source key's current contents are the destination's; u2 is deleted there.
    let sh = histories(&c, &src, "").await;
    let dh = histories(&c, &dst, "").await;
    let current = |h: &[Ver]| h.last().map(|v| (v.delete_marker, v.etag.clone(), v.size));
    for (k, h) in &sh {
        assert_eq!(current(dh[k].as_slice()), current(h.as_slice()), "{k}");
    }
    assert_eq!(dh.len(), 6);
    assert!(dh["u2"].last().unwrap().delete_marker, "{:?}", dh["u2"]);
    agree(
        "unversioned refresh status",
        b,
        status_refresh_lines(&p.manifest, &names),
    );
}
