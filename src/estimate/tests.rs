//! Tests of the estimate: prices (the built-in table, files, what a file may not say), and
//! the model against the real copier over the s3 layer's fake (its requests counted in the
//! manifest), with a server that names new versions (S3) and one whose CopyObject answers
//! do not (as RGW's), where ids are learned from listings.

use std::path::Path;

use super::*;
use crate::config::{CopyMode, Sse};
use crate::copier::tests::{opts, plan_with, settings, DST, SRC};
use crate::s3::fake::FakeServer;

#[test]
fn the_builtin_table_prices_by_class() {
    let p = Prices::builtin();
    assert_eq!(p.per_request("CopyObject"), 0.005 / 1000.0);
    assert_eq!(p.per_request("ListObjectVersions"), 0.005 / 1000.0);
    assert_eq!(p.per_request("HeadObject"), 0.0004 / 1000.0);
    assert_eq!(p.per_request("DeleteObject"), 0.0);
    let d = cost_of(&p, [("CopyObject", 1000), ("HeadObject", 1000)], 1 << 30);
    assert!((d - (0.005 + 0.0004 + 0.09)).abs() < 1e-12, "{d}");
    assert_eq!(p.label(), "aws-s3-standard-us-east-1 (2025-01)");
}

#[test]
fn price_files_are_checked() {
    let ok = r#"{"name": "n", "date": "d", "write_per_1000": 1, "read_per_1000": 0.5,
        "transfer_across_per_gb": 0.02, "operations_per_1000": {"HeadObject": 0}}"#;
    let p = Prices::from_json(ok).unwrap();
    assert_eq!(p.per_request("PutObject"), 0.001);
    assert_eq!(p.per_request("HeadObject"), 0.0);
    assert_eq!(p.per_request("GetObject"), 0.0005);
    assert_eq!(p.delete_per_1000, 0.0, "DELETE defaults to free");
    let unknown_op = ok.replace("HeadObject", "HeadObjekt");
    assert!(Prices::from_json(&unknown_op)
        .unwrap_err()
        .contains("\"HeadObjekt\" is not an operation"));
    let negative = ok.replace("\"write_per_1000\": 1", "\"write_per_1000\": -1");
    assert!(Prices::from_json(&negative)
        .unwrap_err()
        .contains("write_per_1000: -1"));
    let unknown_field = ok.replace("\"date\"", "\"when\"");
    assert!(Prices::from_json(&unknown_field).is_err());
}

fn task(version: &str, size: u64, etag: &str) -> EstTask {
    EstTask {
        version_id: version.into(),
        size,
        etag: Some(etag.into()),
        ..EstTask::default()
    }
}

const MD5: &str = "\"9e107d9d372bb6826bd81d3542a419d6\"";

#[test]
fn a_small_version_is_a_head_and_a_copy_and_one_request_without_the_stamp() {
    let timing = Timing {
        latency_ms: 10.0,
        from: "given".into(),
        concurrency: 10,
    };
    let s = settings();
    let mut b = Builder::new(&s, Facts::default());
    b.key("a", &[task("v1", 10, MD5), task("v2", 10, MD5)]);
    let e = b.finish(&Prices::builtin(), timing.clone());
    let n = |e: &Estimate, op: &str| e.operations.get(op).map_or(0, |o| o.requests);
    assert_eq!((n(&e, "HeadObject"), n(&e, "CopyObject")), (2, 2));
    assert_eq!((n(&e, "HeadBucket"), n(&e, "GetBucketVersioning")), (2, 2));
    assert_eq!(e.requests, 8);
    assert!((e.seconds - 8.0 * 0.010 / 10.0).abs() < 1e-9);
    let mut one = settings();
    one.copy.stamp = false;
    one.copy.sse = Some(Sse::BucketDefault);
    let mut b = Builder::new(&one, Facts::default());
    b.key("a", &[task("v1", 10, MD5), task("null", 10, MD5)]);
    let e = b.finish(&Prices::builtin(), timing);
    // The `null` version keeps its HEAD.
    assert_eq!((n(&e, "HeadObject"), n(&e, "CopyObject")), (1, 2));
    assert_eq!(n(&e, "GetObjectLockConfiguration"), 1);
}

#[test]
fn rgw_learns_last_versions_from_listings_and_heads_the_others() {
    let s = settings();
    let facts = Facts {
        server: Server::CephRgw,
        ..Facts::default()
    };
    let mut b = Builder::new(&s, facts);
    // 2,500 keys of two versions: the first version of each gets a HEAD of the destination,
    // the second is learned; batches of 1,000 keys, each walk 2,000 entries.
    for i in 0..2500 {
        b.key(
            &format!("k{i:05}"),
            &[task("v1", 1, MD5), task("v2", 1, MD5)],
        );
    }
    let e = b.finish(
        &Prices::builtin(),
        Timing {
            latency_ms: 1.0,
            from: "given".into(),
            concurrency: 1,
        },
    );
    let n = |op: &str| e.operations.get(op).map_or(0, |o| o.requests);
    assert_eq!(n("HeadObject"), 5000 + 2500);
    // 1,000 keys (2,000 entries) then the page that shows the next key: 3, 3, and the last
    // 500 keys' 1,000 entries end the listing: 1.
    assert_eq!(n("ListObjectVersions"), 3 + 3 + 1);
}

/// Runs the copier over the manifest; returns the counted requests (the run's bucket probes
/// are made by `job`, not here).
async fn run(server: &FakeServer, path: &Path) -> BTreeMap<String, u64> {
    let (summary, _) = crate::copier::tests::run(server, path, opts()).await;
    assert_eq!(summary.failed, 0);
    Manifest::open(path, false)
        .unwrap()
        .counts()
        .unwrap()
        .requests
}

/// The estimate of the planned manifest, less the run's probes (made by `job`).
fn estimate_of(path: &Path, server: Server) -> BTreeMap<String, u64> {
    let m = Manifest::open(path, false).unwrap();
    let s = m.settings().unwrap().unwrap();
    let args = EstimateArgs {
        server: Some(server),
        estimate_concurrency: 32,
        ..EstimateArgs::default()
    };
    let e = of_manifest(&m, &s, &args, u64::MAX).unwrap();
    e.operations
        .into_iter()
        .filter(|(op, _)| !matches!(op.as_str(), "HeadBucket" | "GetBucketVersioning"))
        .map(|(op, o)| (op, o.requests))
        .collect()
}

/// A source of 300 keys: two versions each, a delete marker on every 7th, a third version
/// on every 10th.
fn seed(s: &FakeServer) {
    s.create_bucket(SRC, true);
    s.create_bucket(DST, true);
    for i in 0..300 {
        let k = format!("k/{i:04}");
        s.put(SRC, &k, format!("v1 {i}").as_bytes(), &[]);
        s.put(SRC, &k, format!("v2 {i}").as_bytes(), &[]);
        if i % 7 == 0 {
            s.delete(SRC, &k);
        }
        if i % 10 == 0 {
            s.put(SRC, &k, format!("v3 {i}").as_bytes(), &[]);
        }
    }
}

#[tokio::test]
async fn the_model_counts_what_the_copier_sends() {
    for (stamp, rgw) in [(true, false), (false, false), (true, true), (false, true)] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.db");
        let server = FakeServer::new();
        seed(&server);
        server.omit_copy_version_ids(rgw);
        let mut s = settings();
        if !stamp {
            s.copy.stamp = false;
            s.copy.sse = Some(Sse::BucketDefault);
        }
        plan_with(&server, &path, &s).await;
        let profile = if rgw { Server::CephRgw } else { Server::S3 };
        let est = estimate_of(&path, profile);
        let mut got = run(&server, &path).await;
        // The fake reads object lock through its bucket probe (the SDK's client counts a
        // GetObjectLockConfiguration).
        if let Some(n) = got.remove("HeadBucket") {
            got.insert("GetObjectLockConfiguration".into(), n);
        }
        assert_eq!(est, got, "stamp {stamp}, RGW-like answers {rgw}");
    }
}

#[test]
fn multipart_sources_on_a_server_that_changes_their_etag_are_copied_again_once() {
    let mut s = settings();
    s.dest_side.endpoint = Some("http://127.0.0.1:9000".into());
    let mp = |v: &str| task(v, 12 << 20, "\"9e107d9d372bb6826bd81d3542a419d6-3\"");
    let timing = Timing {
        latency_ms: 1.0,
        from: "given".into(),
        concurrency: 1,
    };
    let mut b = Builder::new(&s, Facts::default());
    b.key("a", &[mp("v1")]);
    b.key("b", &[mp("v1")]);
    let e = b.finish(&Prices::builtin(), timing.clone());
    let n = |e: &Estimate, op: &str| e.operations.get(op).map_or(0, |o| o.requests);
    // The first: CopyObject, its HEAD, its removal, then parts; the second: parts at once.
    assert_eq!(n(&e, "CopyObject"), 1);
    assert_eq!(n(&e, "DeleteObject"), 1);
    // Each: the source's HEAD and two of its parts'; the first also the copy's HEAD.
    assert_eq!(n(&e, "HeadObject"), 2 * 3 + 1);
    assert_eq!(n(&e, "UploadPartCopy"), 2 * 3);
    assert_eq!(n(&e, "CreateMultipartUpload"), 2);
    assert_eq!(n(&e, "CompleteMultipartUpload"), 2);
    // RGW keeps the ETag, and its answer says so: one CopyObject each, no HEAD of the copy.
    let rgw = Facts {
        server: Server::CephRgw,
        ..Facts::default()
    };
    let mut b = Builder::new(&s, rgw);
    b.key("a", &[mp("v1")]);
    b.key("b", &[mp("v1")]);
    let e = b.finish(&Prices::builtin(), timing);
    assert_eq!((n(&e, "CopyObject"), n(&e, "UploadPartCopy")), (2, 0));
    assert_eq!(n(&e, "HeadObject"), 2);
}

#[test]
fn streams_between_two_endpoints_move_bytes_across_providers() {
    let mut s = settings();
    s.copy.mode = CopyMode::Stream;
    s.source_side.endpoint = Some("http://a:9000".into());
    s.dest_side.endpoint = Some("http://b:9000".into());
    let mut b = Builder::new(&s, Facts::default());
    b.key("a", &[task("v1", 1 << 30, MD5)]);
    let e = b.finish(
        &Prices::builtin(),
        Timing {
            latency_ms: 1.0,
            from: "given".into(),
            concurrency: 1,
        },
    );
    let n = |op: &str| e.operations.get(op).map_or(0, |o| o.requests);
    assert_eq!((e.bytes_across, e.bytes_within), (1 << 30, 0));
    assert!((e.transfer_dollars - 0.09).abs() < 1e-12);
    // A 1 GiB single-part source is passed through (not held, so not bounded by the memory
    // budget): one GET and one PutObject, no parts.
    assert_eq!((n("GetObject"), n("PutObject"), n("UploadPart")), (1, 1, 0));
    assert_eq!(n("GetObjectTagging"), 1);
}

#[tokio::test]
async fn the_estimate_stored_after_plan_is_the_scan_repriced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let server = FakeServer::new();
    seed(&server);
    let s = settings();
    plan_with(&server, &path, &s).await;
    let m = Manifest::open(&path, false).unwrap();
    let total = m.counts().unwrap().total;
    let args = EstimateArgs {
        estimate_concurrency: 32,
        ..EstimateArgs::default()
    };
    let scanned = of_manifest(&m, &s, &args, u64::MAX).unwrap();
    store_estimate(&m, &s, &args, total).unwrap();
    // The stored counts are used while the job has the same tasks, settings and server.
    assert_eq!(of_manifest(&m, &s, &args, total).unwrap(), scanned);
    let mut cheap = Prices::builtin();
    cheap.name = "cheap".into();
    cheap.write_per_1000 = 0.0;
    let priced = EstimateArgs {
        prices: Some(cheap.clone()),
        ..args.clone()
    };
    let e = of_manifest(&m, &s, &priced, total).unwrap();
    assert_eq!(
        e.operations.keys().collect::<Vec<_>>(),
        scanned.operations.keys().collect::<Vec<_>>()
    );
    assert_eq!(e.operations["CopyObject"].dollars, 0.0);
    assert_eq!(e.prices, "cheap (2025-01)");
    // Another server profile, or other settings: counted again.
    let rgw = EstimateArgs {
        server: Some(Server::CephRgw),
        ..args.clone()
    };
    assert_eq!(of_manifest(&m, &s, &rgw, total).unwrap().server, "ceph-rgw");
    let mut other = s.clone();
    other.copy.stamp = false;
    other.copy.sse = Some(Sse::BucketDefault);
    let e = of_manifest(&m, &other, &args, total).unwrap();
    assert!(
        e.operations.get("HeadObject").map_or(0, |o| o.requests)
            < scanned.operations["HeadObject"].requests
    );
}
