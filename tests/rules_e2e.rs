//! End to end against a real S3 server (moto or Ceph RGW): a replication configuration with
//! two rules and two destinations replicates exactly the versions each rule selects, with the
//! rule's storage class; Batch Replication filters select the right tasks at plan; `plan
//! --dry-run` writes no manifest; an invalid configuration is refused with one line.

mod support;

use std::collections::BTreeMap;

use support::*;

/// One destination entry as a user checks it: delete marker, body and storage class.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    delete_marker: bool,
    body: String,
    class: String,
}

fn v(body: &str, class: &str) -> Entry {
    Entry {
        delete_marker: false,
        body: body.into(),
        class: class.into(),
    }
}

fn dm() -> Entry {
    Entry {
        delete_marker: true,
        body: String::new(),
        class: String::new(),
    }
}

/// Every key's history in `bucket`, oldest first, with bodies and storage classes.
async fn entries(c: &aws_sdk_s3::Client, bucket: &str) -> BTreeMap<String, Vec<Entry>> {
    let mut out = BTreeMap::new();
    for (key, hist) in histories(c, bucket, "").await {
        let mut list = Vec::new();
        for ver in hist.iter() {
            if ver.delete_marker {
                list.push(dm());
                continue;
            }
            let got = c
                .get_object()
                .bucket(bucket)
                .key(&key)
                .version_id(&ver.version_id)
                .send()
                .await
                .expect("get");
            let class = got
                .storage_class()
                .map_or("STANDARD".to_string(), |s| s.as_str().to_string());
            let body = got.body.collect().await.expect("body").into_bytes();
            list.push(v(&String::from_utf8_lossy(&body), &class));
        }
        out.insert(key, list);
    }
    out
}

fn put_tagged(key: &str, body: &str, tags: Option<&str>) -> Op {
    Op::Put {
        key: key.into(),
        body: body.as_bytes().to_vec(),
        content_type: None,
        cache_control: None,
        metadata: Vec::new(),
        tagging: tags.map(str::to_string),
    }
}

/// Rule "logs": prefix logs/ to bucket A in STANDARD_IA, delete markers too (priority 2).
/// Rule "team-x": objects tagged team=x to bucket B in STANDARD, no delete markers.
fn two_rule_config(a: &str, b: &str) -> String {
    format!(
        r#"{{"Role": "arn:aws:iam::123456789012:role/replication",
  "Rules": [
    {{"ID": "logs", "Priority": 2, "Status": "Enabled", "Filter": {{"Prefix": "logs/"}},
      "DeleteMarkerReplication": {{"Status": "Enabled"}},
      "Destination": {{"Bucket": "arn:aws:s3:::{a}", "StorageClass": "STANDARD_IA"}}}},
    {{"ID": "team-x", "Priority": 1, "Status": "Enabled",
      "Filter": {{"Tag": {{"Key": "team", "Value": "x"}}}},
      "DeleteMarkerReplication": {{"Status": "Disabled"}},
      "Destination": {{"Bucket": "arn:aws:s3:::{b}", "StorageClass": "STANDARD"}}}},
    {{"ID": "off", "Priority": 3, "Status": "Disabled", "Filter": {{}},
      "DeleteMarkerReplication": {{"Status": "Disabled"}},
      "Destination": {{"Bucket": "arn:aws:s3:::{b}"}}}}
  ]}}"#
    )
}

fn plan_cmd(verb: &str, src: &str, ep: &str, m: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        verb,
        "--source",
        &format!("s3://{src}"),
        "--manifest",
        m,
        "--source-endpoint",
        ep,
        "--dest-endpoint",
        ep,
        "--path-style",
        "--no-progress",
    ]
    .map(String::from)
    .to_vec();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rules_replicate_their_versions_to_their_destinations() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, a, b) = (bucket("rsrc"), bucket("rdsta"), bucket("rdstb"));
    for name in [&src, &a, &b] {
        create_bucket(&c, name, true).await;
    }
    let x = Some("team=x");
    seed(
        &c,
        &src,
        vec![
            vec![
                put_tagged("logs/a.txt", "a1", x),
                put_tagged("docs/b.txt", "b1", x),
                put_tagged("other/c", "c1", None),
            ],
            vec![
                put_tagged("logs/a.txt", "a2", None),
                put_tagged("docs/b.txt", "b2", Some("team=y")),
            ],
            vec![Op::Delete {
                key: "logs/a.txt".into(),
            }],
        ],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("replication.json");
    std::fs::write(&cfg, two_rule_config(&a, &b)).unwrap();
    let m = dir.path().join("job.db");
    let cfg_arg = cfg.to_str().unwrap();
    // Dry run: tasks and bytes by destination, storage class and rule.
    let dry = plan_cmd(
        "plan",
        &src,
        &ep,
        m.to_str().unwrap(),
        &["--replication-config", cfg_arg, "--dry-run"],
    );
    let o = run(&strs(&dry));
    expect_code(&o, 0);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    // Each destination named as s3://bucket/prefix (rules keep keys at the bucket's root).
    let (da, db) = (format!("s3://{a}/"), format!("s3://{b}/"));
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() == 5 && (w[0] == da || w[0] == db))
        .collect();
    let want: Vec<Vec<&str>> = vec![
        vec![da.as_str(), "(marker)", "logs", "1", "0"],
        vec![da.as_str(), "STANDARD_IA", "logs", "2", "4"],
        vec![db.as_str(), "STANDARD", "team-x", "2", "4"],
    ];
    assert_eq!(rows, want, "{out}");
    assert!(!m.exists(), "a dry run writes no manifest");
    let args = plan_cmd(
        "replicate",
        &src,
        &ep,
        m.to_str().unwrap(),
        &["--replication-config", cfg_arg],
    );
    expect_code(&run(&strs(&args)), 0);

    let got_a = entries(&c, &a).await;
    let want_a = BTreeMap::from([(
        "logs/a.txt".to_string(),
        vec![v("a1", "STANDARD_IA"), v("a2", "STANDARD_IA"), dm()],
    )]);
    assert_eq!(got_a, want_a, "bucket A holds rule logs's versions");
    let got_b = entries(&c, &b).await;
    let want_b = BTreeMap::from([
        ("docs/b.txt".to_string(), vec![v("b1", "STANDARD")]),
        ("logs/a.txt".to_string(), vec![v("a1", "STANDARD")]),
    ]);
    assert_eq!(got_b, want_b, "bucket B holds the team=x versions only");
    let o = run(&["status", "--manifest", m.to_str().unwrap()]);
    expect_code(&o, 0);
    let status = String::from_utf8_lossy(&o.stdout).into_owned();
    let names = format!("s3://{a}, s3://{b} (replication rules)");
    assert!(status.contains(&names), "{status}");
    let tasks = manifest_tasks(&m);
    assert_eq!(tasks.len(), 5, "{tasks:?}");
    assert!(tasks.iter().all(|t| t.state == "done"), "{tasks:?}");
    verify_two_destinations(&c, m.to_str().unwrap(), &a, &b).await;
}

fn verify_out(m: &str, code: i32) -> String {
    let o = run(&["verify", "--manifest", m, "--no-progress"]);
    expect_code(&o, code);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `verify` compares each destination with the versions selected for it: clean after the
/// replication (a key with no task for a destination is not compared there), then a stray
/// version under a selected key in bucket B is named with its bucket and key.
async fn verify_two_destinations(c: &aws_sdk_s3::Client, m: &str, a: &str, b: &str) {
    seed(c, b, vec![vec![Op::put("notes/z", "already there")]]).await;
    let out = verify_out(m, 0);
    assert!(
        out.contains(&format!(
            "destination s3://{a}/ (rule logs): 1 keys, 3 versions, match"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("destination s3://{b}/ (rule team-x): 2 keys, 2 versions, match; 1 keys there have no task")),
        "{out}"
    );
    assert!(out.contains("every destination matches"), "{out}");
    seed(c, b, vec![vec![Op::put("logs/a.txt", "stray")]]).await;
    let out = verify_out(m, 1);
    let line = format!(
        "mismatch: s3://{b}/ \"logs/a.txt\": source has 1 versions to copy, destination has 2"
    );
    assert!(out.contains(&line), "{out}");
    assert!(!out.contains(&format!("mismatch: s3://{a}/")), "{out}");
    assert!(out.contains("1 keys differ"), "{out}");
    // A version removed from bucket A is missed there too.
    let h = histories(c, a, "").await;
    let first = &h["logs/a.txt"][0];
    c.delete_object()
        .bucket(a)
        .key("logs/a.txt")
        .version_id(&first.version_id)
        .send()
        .await
        .expect("delete a version");
    let out = verify_out(m, 1);
    // (moto may list the marker in the same second as a2: then versions alone are counted.)
    let line = format!("mismatch: s3://{a}/ \"logs/a.txt\": source has ");
    assert!(out.contains(&line), "{out}");
    assert!(out.contains("2 keys differ"), "{out}");
}

fn count_by_key(m: &std::path::Path) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for t in manifest_tasks(m) {
        *out.entry(t.key).or_default() += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_select_tasks_at_plan_and_dry_run_writes_nothing() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("fsrc"), bucket("fdst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    let body = |n: usize| "z".repeat(n);
    seed(
        &c,
        &src,
        vec![
            vec![
                Op::put("f/small.txt", body(1)),
                Op::put("f/mid.txt", body(100)),
                Op::put("f/edge.txt", body(10)),
                Op::put("f/big.txt", body(1000)),
                Op::put("f/mid.log", body(100)),
            ],
            vec![Op::put("f/mid.txt", body(200))],
        ],
    )
    .await;
    let filters = [
        "--min-size",
        "10",
        "--max-size",
        "500",
        "--key-suffix",
        ".txt",
        "--created-after",
        "2000-01-01",
        "--created-before",
        "2999-01-01",
    ];
    // Dry run: tallies on stdout, no manifest.
    let (_d, m) = manifest();
    let job = Job::new(&src, &dst, &m).endpoint(&ep).extra(&filters);
    let mut dry = job.plan_args();
    dry.push("--dry-run".into());
    let o = run(&strs(&dry));
    expect_code(&o, 0);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("dry run: 2 tasks (300 bytes)"), "{out}");
    assert!(!m.exists(), "a dry run writes no manifest");
    // Plan: the two versions of f/mid.txt only (10 is not above --min-size 10).
    expect_code(&job.plan(), 0);
    let want = BTreeMap::from([("f/mid.txt".to_string(), 2)]);
    assert_eq!(count_by_key(&m), want);
    // The older selected version vanishes before the copy: its task is skipped, and the
    // filtered job verifies clean (f/mid.txt's newer version expected, the skip explained).
    let older = histories(&c, &src, "f/mid.txt").await["f/mid.txt"][0].clone();
    c.delete_object()
        .bucket(&src)
        .key("f/mid.txt")
        .version_id(&older.version_id)
        .send()
        .await
        .expect("delete a source version");
    expect_code(&job.run(&[]), 0);
    let out = verify_out(m.to_str().unwrap(), 0);
    let line = format!("destination s3://{dst}/: 1 keys, 1 versions, match; 1 skipped tasks not expected there (1 source-gone; see `report`)");
    assert!(out.contains(&line), "{out}");
    let copied = histories(&c, &dst, "").await;
    assert_eq!(copied.keys().collect::<Vec<_>>(), vec!["f/mid.txt"]);
    assert_eq!(copied["f/mid.txt"].len(), 1);
    // Created after a future date: nothing.
    let (_d2, m2) = manifest();
    let late = Job::new(&src, &dst, &m2)
        .endpoint(&ep)
        .extra(&["--created-after", "2999-01-01"]);
    expect_code(&late.plan(), 0);
    assert!(count_by_key(&m2).is_empty());
    // HEAD filters: nothing here is encrypted; the one .log version is selected as NOT-SSE.
    let (_d3, m3) = manifest();
    let enc = Job::new(&src, &dst, &m3).endpoint(&ep).extra(&[
        "--encryption",
        "SSE-KMS,NOT-SSE",
        "--key-suffix",
        ".log",
    ]);
    expect_code(&enc.plan(), 0);
    let want = BTreeMap::from([("f/mid.log".to_string(), 1)]);
    assert_eq!(count_by_key(&m3), want);
    let (_d4, m4) = manifest();
    let kms = Job::new(&src, &dst, &m4)
        .endpoint(&ep)
        .extra(&["--encryption", "SSE-KMS"]);
    expect_code(&kms.plan(), 0);
    assert!(count_by_key(&m4).is_empty());
}

#[test]
fn an_invalid_configuration_is_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.json");
    let text = r#"{"Role": "r", "Rules": [
      {"ID": "one", "Priority": 1, "Status": "Enabled", "Filter": {},
       "DeleteMarkerReplication": {"Status": "Disabled"},
       "Destination": {"Bucket": "arn:aws:s3:::a"}},
      {"ID": "two", "Priority": 1, "Status": "Enabled", "Filter": {"Prefix": "x/"},
       "DeleteMarkerReplication": {"Status": "Disabled"},
       "Destination": {"Bucket": "arn:aws:s3:::b"}}]}"#;
    std::fs::write(&cfg, text).unwrap();
    let m = dir.path().join("job.db");
    let o = run(&[
        "plan",
        "--source",
        "s3://src",
        "--manifest",
        m.to_str().unwrap(),
        "--replication-config",
        cfg.to_str().unwrap(),
    ]);
    expect_code(&o, 2);
    let err = stderr_of(&o);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("rule \"two\"") || err.contains("rule \"one\""),
        "{err}"
    );
    assert!(err.contains("riorit"), "names the problem: {err}");
    assert!(!m.exists(), "no manifest for a refused plan");
    // The XML shape too: a tag rule that enables delete-marker replication.
    let xml = dir.path().join("bad.xml");
    std::fs::write(
        &xml,
        "<ReplicationConfiguration><Role>r</Role><Rule><ID>tagged</ID><Priority>1</Priority>\
         <Status>Enabled</Status><Filter><Tag><Key>k</Key><Value>v</Value></Tag></Filter>\
         <DeleteMarkerReplication><Status>Enabled</Status></DeleteMarkerReplication>\
         <Destination><Bucket>arn:aws:s3:::a</Bucket></Destination></Rule>\
         </ReplicationConfiguration>",
    )
    .unwrap();
    let o = run(&[
        "plan",
        "--source",
        "s3://src",
        "--manifest",
        m.to_str().unwrap(),
        "--replication-config",
        xml.to_str().unwrap(),
    ]);
    expect_code(&o, 2);
    let err = stderr_of(&o);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("rule \"tagged\""), "{err}");
    assert!(!m.exists(), "no manifest for a refused plan");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_buckets_own_configuration_is_read_with_source() {
    use aws_sdk_s3::types::{
        DeleteMarkerReplication, DeleteMarkerReplicationStatus, Destination,
        ReplicationConfiguration, ReplicationRule, ReplicationRuleFilter, ReplicationRuleStatus,
    };
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("ssrc"), bucket("sdst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    seed(
        &c,
        &src,
        vec![vec![Op::put("keep/x", "x"), Op::put("drop/y", "y")]],
    )
    .await;
    let rule = ReplicationRule::builder()
        .id("keep")
        .priority(1)
        .status(ReplicationRuleStatus::Enabled)
        // moto keeps ID, Priority, Status and Destination (it answers every rule with an
        // empty prefix and delete markers disabled): the rule uses only those.
        .filter(ReplicationRuleFilter::builder().prefix("").build())
        .delete_marker_replication(
            DeleteMarkerReplication::builder()
                .status(DeleteMarkerReplicationStatus::Disabled)
                .build(),
        )
        .destination(
            Destination::builder()
                .bucket(format!("arn:aws:s3:::{dst}"))
                .storage_class(aws_sdk_s3::types::StorageClass::StandardIa)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let cfg = ReplicationConfiguration::builder()
        .role("arn:aws:iam::123456789012:role/replication")
        .rules(rule)
        .build()
        .unwrap();
    let put = c
        .put_bucket_replication()
        .bucket(&src)
        .replication_configuration(cfg)
        .send()
        .await;
    if let Err(e) = put {
        assert_eq!(
            server(),
            Server::Rgw,
            "moto keeps replication configurations: {e:?}"
        );
        use aws_sdk_s3::error::ProvideErrorMetadata;
        let why = format!("PutBucketReplication refused ({:?})", e.code());
        unsupported_on(Server::Rgw, &why);
        return;
    }
    let (_d, m) = manifest();
    let m = m.to_str().unwrap();
    let args = plan_cmd(
        "replicate",
        &src,
        &ep,
        m,
        &["--replication-config", "source"],
    );
    expect_code(&run(&strs(&args)), 0);
    let got = entries(&c, &dst).await;
    let want = BTreeMap::from([
        ("drop/y".to_string(), vec![v("y", "STANDARD_IA")]),
        ("keep/x".to_string(), vec![v("x", "STANDARD_IA")]),
    ]);
    assert_eq!(got, want);
}

/// The "tasks (bytes)" total of a `plan --dry-run` with `extra`.
fn dry_total(job: &Job, extra: &[&str]) -> String {
    let mut args = job.plan_args();
    args.push("--dry-run".into());
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = run(&strs(&args));
    expect_code(&o, 0);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let total = out
        .lines()
        .find(|l| l.starts_with("dry run: "))
        .unwrap_or("");
    total
        .trim_start_matches("dry run: ")
        .split(" from ")
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_status_reads_the_stamp_of_the_destination() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("psrc"), bucket("pdst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    seed(
        &c,
        &src,
        vec![
            vec![Op::put("a", "a1"), Op::put("b", "b1")],
            vec![Op::put("a", "a2!")],
        ],
    )
    .await;
    let (_d, m) = manifest();
    let job = Job::new(&src, &dst, &m).endpoint(&ep);
    assert_eq!(
        dry_total(&job, &["--replication-status", "NONE"]),
        "3 tasks (7 bytes)"
    );
    expect_code(&job.replicate(), 0);
    // The current versions are now stamped copies at the destination; a's first is not.
    let (_d2, m2) = manifest();
    let again = Job::new(&src, &dst, &m2).endpoint(&ep);
    let completed = dry_total(&again, &["--replication-status", "COMPLETED"]);
    assert_eq!(completed, "2 tasks (5 bytes)");
    let none = dry_total(&again, &["--replication-status", "NONE"]);
    assert_eq!(none, "1 tasks (2 bytes)");
}
