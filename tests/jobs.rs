//! End to end, a job over several commands:
//! - archived source versions (GLACIER): a run that skips one exits 1 and says how to restore
//!   it; `run --retry-skipped --restore-archived DAYS` asks for the restore and leaves the
//!   version pending (exit 1, "restores pending"); a later run copies it once restored (exit
//!   0) and the destination's history equals the source's. moto restores at once and only a
//!   key's current version (RestoreObject without a version id); RGW 16.2 has no GLACIER
//!   storage class unless one is configured, so that test runs on moto;
//! - copy settings changed on a job with work done: refused (exit 2, one line per change)
//!   unless `--change-copy-settings`.

mod support;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::StorageClass;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archived_version_exits_1_then_is_restored_and_copied() {
    if unsupported_on(Server::Rgw, "no GLACIER storage class on the test cluster") {
        return;
    }
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("src"), bucket("dst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    seed(&c, &src, vec![vec![Op::put("k", "old")]]).await;
    c.put_object()
        .bucket(&src)
        .key("k")
        .body(ByteStream::from_static(b"new"))
        .storage_class(StorageClass::Glacier)
        .send()
        .await
        .unwrap();
    let (_d, m) = manifest();
    // The replica in STANDARD: a GLACIER replica would not read back in this test.
    let job = Job::new(&src, &dst, &m)
        .endpoint(&ep)
        .extra(&["--storage-class", "STANDARD"]);

    let first = job.replicate();
    expect_code(&first, 1);
    let err = stderr_of(&first);
    assert!(
        err.contains("1 skipped as archived: restore them and run `run --retry-skipped`"),
        "{err}"
    );
    let hd = histories(&c, &dst, "").await;
    assert_eq!(hd["k"].len(), 1, "only the older version is there");

    let asked = job.run(&[
        "--retry-skipped",
        "--restore-archived",
        "1",
        "--restore-tier",
        "Bulk",
    ]);
    expect_code(&asked, 1);
    let err = stderr_of(&asked);
    assert!(err.contains("1 restores pending"), "{err}");
    assert_eq!(histories(&c, &dst, "").await["k"].len(), 1);

    expect_code(&job.run(&[]), 0);
    let checked = assert_replica(&c, &src, &c, &dst, "", "", all).await;
    assert_eq!(checked, 2);
    let body = c
        .get_object()
        .bucket(&dst)
        .key("k")
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    assert_eq!(
        &body[..],
        b"new",
        "the destination's current version is the source's"
    );
    expect_code(&job.verify(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_copy_settings_of_a_started_job_is_refused_unless_asked() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("src"), bucket("dst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    seed(
        &c,
        &src,
        vec![vec![Op::put("a", "1")], vec![Op::put("a", "2")]],
    )
    .await;
    let (_d, m) = manifest();
    let unstamped = Job::new(&src, &dst, &m)
        .endpoint(&ep)
        .extra(&["--no-stamp"]);
    expect_code(&unstamped.replicate(), 0);

    // The same job without --no-stamp (the stamp back on), and another part size.
    let changed = Job::new(&src, &dst, &m)
        .endpoint(&ep)
        .extra(&["--part-size", "8MiB"]);
    let refused = changed.replicate();
    expect_code(&refused, 2);
    let err = stderr_of(&refused);
    assert!(
        err.contains("copy setting the stamp: off (--no-stamp) → on"),
        "{err}"
    );
    assert!(
        err.contains("copy setting --part-size: 16777216 → 8388608"),
        "{err}"
    );
    assert!(err.contains("--change-copy-settings"), "{err}");
    let refused_plan = run(&strs(&changed.plan_args()));
    expect_code(&refused_plan, 2);

    seed(&c, &src, vec![vec![Op::put("a", "3")]]).await;
    let asked = Job::new(&src, &dst, &m).endpoint(&ep).extra(&[
        "--part-size",
        "8MiB",
        "--change-copy-settings",
        "--refresh",
    ]);
    let o = asked.replicate();
    expect_code(&o, 0);
    assert!(stderr_of(&o).contains("copy setting changed: the stamp: off (--no-stamp) → on"));
    assert_replica(&c, &src, &c, &dst, "", "", all).await;
    // Stored: a plain `replicate` with the new settings continues without a word.
    let again = Job::new(&src, &dst, &m)
        .endpoint(&ep)
        .extra(&["--part-size", "8MiB"]);
    let o = again.replicate();
    expect_code(&o, 0);
    assert!(!stderr_of(&o).contains("copy setting"), "{}", stderr_of(&o));
}

/// Two rules, two destination buckets; the second bucket lives in another region (the proxy
/// answers S3's 301 to a request signed for us-east-1): both receive their versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_destination_in_another_region_is_written_there() {
    use support::fault_proxy::{FaultConfig, FaultProxy};
    let ep = endpoint();
    let c = client(&ep);
    let (src, a, b) = (bucket("src"), bucket("dsta"), bucket("dstb"));
    for name in [&src, &a, &b] {
        create_bucket(&c, name, true).await;
    }
    seed(
        &c,
        &src,
        vec![
            vec![Op::put("x/1", "x one"), Op::put("y/1", "y one")],
            vec![Op::put("x/1", "x two"), Op::put("y/1", "y two")],
        ],
    )
    .await;
    let upstream = ep.trim_start_matches("http://").parse().unwrap();
    let proxy = FaultProxy::start(upstream, FaultConfig::default())
        .await
        .unwrap();
    proxy.set_bucket_region(&b, "eu-west-1");
    let cfg = format!(
        r#"{{"Role": "arn:aws:iam::123456789012:role/replication",
  "Rules": [
    {{"ID": "x", "Priority": 1, "Status": "Enabled", "Filter": {{"Prefix": "x/"}},
      "DeleteMarkerReplication": {{"Status": "Disabled"}},
      "Destination": {{"Bucket": "arn:aws:s3:::{a}"}}}},
    {{"ID": "y", "Priority": 2, "Status": "Enabled", "Filter": {{"Prefix": "y/"}},
      "DeleteMarkerReplication": {{"Status": "Disabled"}},
      "Destination": {{"Bucket": "arn:aws:s3:::{b}"}}}}
  ]}}"#
    );
    let (d, m) = manifest();
    let cfg_path = d.path().join("replication.json");
    std::fs::write(&cfg_path, cfg).unwrap();
    let o = run(&[
        "replicate",
        "--source",
        &format!("s3://{src}"),
        "--manifest",
        m.to_str().unwrap(),
        "--source-endpoint",
        &ep,
        "--dest-endpoint",
        &proxy.endpoint(),
        "--path-style",
        "--no-progress",
        "--replication-config",
        cfg_path.to_str().unwrap(),
    ]);
    expect_code(&o, 0);
    let redirects = proxy.stats().redirects();
    assert!(
        redirects >= 1,
        "the second bucket was first asked in us-east-1"
    );
    let (ha, hb) = (histories(&c, &a, "").await, histories(&c, &b, "").await);
    assert_eq!(ha.keys().collect::<Vec<_>>(), ["x/1"]);
    assert_eq!(hb.keys().collect::<Vec<_>>(), ["y/1"]);
    assert_eq!((ha["x/1"].len(), hb["y/1"].len()), (2, 2));
    assert_replica(&c, &src, &c, &b, "", "y/", all).await;
    // A later run writes nothing more and is not redirected but for its probe.
    let again = run(&["run", "--manifest", m.to_str().unwrap(), "--no-progress"]);
    expect_code(&again, 0);
    assert!(proxy.stats().redirects() <= redirects + 1);
}
