//! Retries, throttling and faults (issue 6): a fault-injecting proxy between s3-backfill and
//! the S3 server under test (moto or Ceph RGW) answers a seeded share of requests with 503 SlowDown, 500, connection resets before
//! and after forwarding, truncated bodies and delays.
//!
//! Knobs for runs by hand: `S3_BACKFILL_FAULT_KEYS` (keys in the corpus, default 120; the
//! issue's acceptance figure is 1000), `S3_BACKFILL_FAULT_RATE` (default 0.2),
//! `S3_BACKFILL_FAULT_SEED` (default 7).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::fault_proxy::{Fault, FaultConfig, FaultProxy};
use support::*;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn upstream(ep: &str) -> SocketAddr {
    ep.trim_start_matches("http://").parse().unwrap()
}

/// The job of this file: every version and delete marker, one endpoint for both sides.
fn job_of(src: &str, dst: &str, m: &std::path::Path, ep: &str) -> Job {
    Job::new(src, dst, m)
        .endpoint(ep)
        .extra(&["--delete-markers"])
}

/// `run` of the job with both sides through the proxy, then `extra`.
fn run_through(job: &Job, proxy: &str, extra: &[&str]) -> std::process::Output {
    let mut a = vec!["--source-endpoint", proxy, "--dest-endpoint", proxy];
    a.extend_from_slice(extra);
    job.run(&a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicates_identically_through_injected_faults() {
    through_faults(&[], 120).await;
}

/// Streamed copies: each single-part version's GET body is passed to its PutObject as it
/// arrives, so a fault on either request fails both, and the pair is retried (and reconciled)
/// together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_copies_replicate_identically_through_injected_faults() {
    through_faults(&["--copy-mode", "stream"], 60).await;
}

async fn through_faults(plan_extra: &[&str], default_keys: usize) {
    let keys: usize = env_or("S3_BACKFILL_FAULT_KEYS", default_keys);
    let rate: f64 = env_or("S3_BACKFILL_FAULT_RATE", 0.2);
    let seed: u64 = env_or("S3_BACKFILL_FAULT_SEED", 7);
    eprintln!("fault test: {keys} keys, rate {rate}, seed {seed}");
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("src"), bucket("dst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    let names: Vec<String> = (0..keys).map(|i| format!("f/{i:05} k+%?")).collect();
    // Every fifth key has two identical empty versions (one ETag for both), as real buckets
    // hold: a lost answer must not make one of them stand for the other.
    let body = |i: usize, round: &str, k: &str| -> Vec<u8> {
        if i.is_multiple_of(5) {
            Vec::new()
        } else {
            format!("{round} {k} {}", "z".repeat(k.len())).into_bytes()
        }
    };
    let r1 = names
        .iter()
        .enumerate()
        .map(|(i, k)| Op::put(k, body(i, "one", k)))
        .collect();
    let r2 = names
        .iter()
        .enumerate()
        .map(|(i, k)| Op::put(k, body(i, "two", k)))
        .collect();
    let r3 = names
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 == 0)
        .map(|(_, k)| Op::Delete { key: k.clone() })
        .collect();
    seed_rounds(&c, &src, vec![r1, r2, r3]).await;

    let (_d, m) = manifest();
    let job = job_of(&src, &dst, &m, &ep).extra(plan_extra);
    expect_code(&job.plan(), 0);

    let proxy = FaultProxy::start(
        upstream(&ep),
        FaultConfig {
            seed,
            rate,
            faults: Fault::ALL.to_vec(),
            delay: Duration::from_millis(150),
            deny_path_prefix: None,
            deny_key_id: None,
        },
    )
    .await
    .unwrap();
    let o = run_through(
        &job,
        &proxy.endpoint(),
        &[
            "--concurrency",
            "16",
            "--max-attempts",
            "15",
            "--retry-min-delay-ms",
            "5",
            "--retry-max-delay-ms",
            "200",
        ],
    );
    let stats = proxy.stats();
    eprintln!(
        "proxy: {} requests, {} faults injected",
        stats.requests(),
        stats.injected()
    );
    expect_code(&o, 0);
    assert!(stats.injected_of(Fault::ResetAfterForward) > 0);
    assert!(stats.injected_of(Fault::TruncateBody) > 0);
    assert!(stats.injected_of(Fault::SlowDown) > 0);
    drop(proxy);

    // Identical, with no duplicate versions.
    assert_replica(&c, &src, &c, &dst, "", "", all).await;
    let sh = histories(&c, &src, "").await;
    let dh = histories(&c, &dst, "").await;
    let count = |h: &std::collections::BTreeMap<String, Vec<Ver>>| -> usize {
        h.values().map(Vec::len).sum()
    };
    assert_eq!(count(&sh), count(&dh), "no duplicates at the destination");

    let st = job.status();
    assert_eq!(st.done, st.total, "{st:?}");
    assert!(st.retries > 0, "status reports the retries: {st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_errors_fail_or_skip_while_the_rest_completes() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("src"), bucket("dst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    let mut round = vec![];
    for i in 0..12 {
        round.push(Op::put(&format!("public/{i:02}"), format!("p{i}")));
        round.push(Op::put(&format!("private/{i:02}"), format!("s{i}")));
    }
    round.push(Op::put("gone/soon", "bye"));
    seed_rounds(&c, &src, vec![round]).await;
    let (_d, m) = manifest();
    let job = job_of(&src, &dst, &m, &ep);
    expect_code(&job.plan(), 0);

    // A version deleted between plan and run is skipped (source gone), not failed.
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

    // Access to one prefix of the source is denied, as a bucket policy would.
    let proxy = FaultProxy::start(
        upstream(&ep),
        FaultConfig {
            seed: 1,
            rate: 0.0,
            faults: vec![],
            delay: Duration::ZERO,
            deny_path_prefix: Some(format!("/{src}/private/")),
            deny_key_id: None,
        },
    )
    .await
    .unwrap();
    let o = run_through(&job, &proxy.endpoint(), &["--retry-min-delay-ms", "5"]);
    expect_code(&o, 1);

    let st = job.status();
    assert_eq!((st.failed, st.skipped, st.done), (12, 1, 12), "{st:?}");

    // The report names each failed task with its code and status.
    let o = job.report(&["--format", "csv"]);
    expect_code(&o, 0);
    let csv = String::from_utf8_lossy(&o.stdout);
    let failed: Vec<&str> = csv.lines().filter(|l| l.contains(",failed,")).collect();
    assert_eq!(failed.len(), 12, "{csv}");
    assert!(
        failed.iter().all(|l| l.contains("private/")
            && l.to_lowercase().contains("access denied")
            && l.contains(",403,")),
        "{csv}"
    );
    let skipped: Vec<&str> = csv.lines().filter(|l| l.contains(",skipped,")).collect();
    assert_eq!(skipped.len(), 1);
    assert!(skipped[0].contains("gone/soon") && skipped[0].contains("source-gone"));

    // The public half arrived.
    let dh = histories(&c, &dst, "").await;
    assert_eq!(dh.len(), 12);
    assert!(dh.keys().all(|k| k.starts_with("public/")));

    // Once the cause is fixed, --retry-failed finishes the job.
    drop(proxy);
    expect_code(&job.run(&["--retry-failed"]), 0);
    let st = job.status();
    assert_eq!((st.done, st.failed), (24, 0), "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_threshold_stops_a_job_whose_destination_is_missing() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("src"), bucket("dst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    let round = (0..80).map(|i| Op::put(&format!("k{i:03}"), "x")).collect();
    seed_rounds(&c, &src, vec![round]).await;
    let (_d, m) = manifest();
    let job = job_of(&src, &dst, &m, &ep);
    expect_code(&job.plan(), 0);
    c.delete_bucket().bucket(&dst).send().await.unwrap();

    let o = job.run(&["--concurrency", "2", "--failure-threshold-min-tasks", "10"]);
    expect_code(&o, 1);
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(last.contains("stopped early"), "{err}");
    assert!(last.contains("NoSuchBucket"), "{err}");
    let st = job.status();
    assert!((10..40).contains(&st.failed), "stopped early: {st:?}");
    assert!(st.pending > 30, "{st:?}");
}

/// Seeds in one-second rounds (see support::seed).
async fn seed_rounds(c: &aws_sdk_s3::Client, b: &str, rounds: Vec<Vec<Op>>) {
    seed(c, b, rounds).await;
}

/// Two accounts: the destination's key may not read the source bucket, so server-side copies
/// are denied (403) and `auto` streams each version through this machine instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_falls_back_to_streaming_when_server_side_copy_is_denied() {
    let ep = endpoint();
    // The destination belongs to the second account (on RGW a user of another tenant, whose
    // copy source would name a bucket of its own tenant: the proxy answers 403 first, as a
    // bucket policy of the source would).
    let (c, dc) = (client(&ep), second_account(&ep));
    let (src, dst) = (bucket("src"), bucket("dst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&dc, &dst, true).await;
    let r1 = (0..10)
        .map(|i| Op::put(&format!("k{i}"), format!("a{i}")))
        .collect();
    let r2 = (0..10)
        .map(|i| Op::put(&format!("k{i}"), format!("b{i}")))
        .collect();
    seed_rounds(&c, &src, vec![r1, r2]).await;

    let proxy = FaultProxy::start(
        upstream(&ep),
        FaultConfig {
            seed: 1,
            rate: 0.0,
            faults: vec![],
            delay: Duration::ZERO,
            deny_path_prefix: Some(format!("/{src}/")),
            deny_key_id: Some(SECOND_KEY_ID.into()),
        },
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    let creds = dir.path().join("credentials");
    std::fs::write(
        &config,
        "[profile src]\nregion = us-east-1\n[profile dst]\nregion = us-east-1\n",
    )
    .unwrap();
    std::fs::write(
        &creds,
        format!(
            "[src]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n\
             [dst]\naws_access_key_id = {SECOND_KEY_ID}\naws_secret_access_key = {SECOND_SECRET}\n"
        ),
    )
    .unwrap();
    let m = dir.path().join("job.db");
    let pe = proxy.endpoint();
    let job = Job::new(&src, &dst, &m).profiles("src", "dst").extra(&[
        "--source-endpoint",
        &pe,
        "--dest-endpoint",
        &pe,
    ]);
    let o = cmd(&strs(&job.replicate_args()))
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_CONFIG_FILE", &config)
        .env("AWS_SHARED_CREDENTIALS_FILE", &creds)
        .output()
        .unwrap();
    expect_code(&o, 0);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        err.matches("streaming through this machine").count(),
        1,
        "said once: {err}"
    );
    assert_replica(&c, &src, &dc, &dst, "", "", all).await;
    let streamed = job
        .tasks()
        .iter()
        .filter(|t| t.copy_method.as_deref() == Some("stream"))
        .count();
    assert_eq!(streamed, 20);
}

/// A small versioned corpus in `src`: `n` keys with two versions each.
async fn small_corpus(c: &aws_sdk_s3::Client, src: &str, n: usize) {
    let names: Vec<String> = (0..n).map(|i| format!("r/{i:03} a+b")).collect();
    let round = |tag: &str| -> Vec<Op> {
        names
            .iter()
            .map(|k| Op::put(k, format!("{tag} {k}").into_bytes()))
            .collect()
    };
    seed_rounds(c, src, vec![round("one"), round("two")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_in_another_region_is_found_at_plan_and_read_there() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("src"), bucket("dst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    small_corpus(&c, &src, 12).await;
    // The proxy plays AWS for the source: its bucket lives in eu-west-1, and a request
    // signed for another region gets S3's 301 naming it.
    let proxy = FaultProxy::start(upstream(&ep), FaultConfig::default())
        .await
        .unwrap();
    proxy.set_bucket_region(&src, "eu-west-1");
    let (_d, m) = manifest();
    let job = Job::new(&src, &dst, &m)
        .endpoints(&proxy.endpoint(), &ep)
        .extra(&["--delete-markers"]);
    expect_code(&job.plan(), 0);
    let after_plan = proxy.stats().redirects();
    assert!(after_plan >= 1, "the source was first asked in us-east-1");
    expect_code(&job.run(&[]), 0);
    assert_eq!(
        proxy.stats().redirects(),
        after_plan,
        "run reads the source in its own region: no request is redirected"
    );
    assert_replica(&c, &src, &c, &dst, "", "", all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_accepts_and_stalls_is_timed_out_and_retried() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("src"), bucket("dst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    small_corpus(&c, &src, 10).await;
    let (_d, m) = manifest();
    let job = job_of(&src, &dst, &m, &ep);
    expect_code(&job.plan(), 0);
    // A quarter of the requests hang, before or after the server acted.
    let proxy = FaultProxy::start(
        upstream(&ep),
        FaultConfig {
            seed: 3,
            rate: 0.25,
            faults: vec![Fault::Stall, Fault::StallAfterForward],
            ..FaultConfig::default()
        },
    )
    .await
    .unwrap();
    let o = run_through(
        &job,
        &proxy.endpoint(),
        &[
            "--request-timeout",
            "2",
            "--max-attempts",
            "12",
            "--retry-min-delay-ms",
            "5",
            "--retry-max-delay-ms",
            "50",
        ],
    );
    let stats = proxy.stats();
    expect_code(&o, 0);
    assert!(stats.injected_of(Fault::Stall) > 0);
    assert!(stats.injected_of(Fault::StallAfterForward) > 0);
    drop(proxy);
    assert_replica(&c, &src, &c, &dst, "", "", all).await;
    let count = |h: std::collections::BTreeMap<String, Vec<Ver>>| -> usize {
        h.values().map(Vec::len).sum()
    };
    assert_eq!(
        count(histories(&c, &src, "").await),
        count(histories(&c, &dst, "").await),
        "a write that stalled after the server acted was adopted, not copied twice"
    );
}
