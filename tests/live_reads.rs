//! Reads of a source that changes under the job (issue 17 items 2, 7a and 9), end to end on
//! the server under test (moto or Ceph RGW):
//! - a `null` version that was current at plan time is copied with its own bytes after the
//!   key got a new version or a delete marker (a versioned source), and a changed `null`
//!   version of an unversioned or suspended source is a named failure, never other bytes;
//! - `x-amz-website-redirect-location` is carried in every copy mode;
//! - through injected faults, every replica of a tagged version has its source's tags;
//! - `verify --deep` finds tags changed on a replica that a plain `verify` cannot see.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketVersioningStatus, VersioningConfiguration};
use aws_sdk_s3::Client;
use support::fault_proxy::{Fault, FaultConfig, FaultProxy};
use support::*;

async fn put(c: &Client, b: &str, k: &str, body: &[u8]) {
    c.put_object()
        .bucket(b)
        .key(k)
        .body(ByteStream::from(body.to_vec()))
        .send()
        .await
        .unwrap();
}

async fn set_versioning(c: &Client, b: &str, status: BucketVersioningStatus) {
    c.put_bucket_versioning()
        .bucket(b)
        .versioning_configuration(VersioningConfiguration::builder().status(status).build())
        .send()
        .await
        .unwrap();
}

/// The bodies of a destination key's object versions, oldest first.
async fn bodies(c: &Client, b: &str, k: &str) -> Vec<Vec<u8>> {
    let h = histories(c, b, k).await;
    let mut out = Vec::new();
    for v in h.get(k).map(Vec::as_slice).unwrap_or_default() {
        if !v.delete_marker {
            out.push(content(c, b, k, &v.version_id).await.body);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_versions_of_a_versioned_source_are_copied_with_their_own_bytes_after_changes() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("nullv-src"), bucket("nullv-dst"));
    create_bucket(&c, &src, false).await;
    create_bucket(&c, &dst, true).await;
    put(&c, &src, "over", b"null version of over").await;
    put(&c, &src, "gone", b"null version of gone").await;
    set_versioning(&c, &src, BucketVersioningStatus::Enabled).await;
    let (_d, m) = manifest();
    let job = Job::new(&src, &dst, &m).endpoint(&ep);
    expect_code(&job.plan(), 0);
    // Between plan and run: a new version on one key, a delete marker on the other.
    put(&c, &src, "over", b"written after the plan").await;
    c.delete_object()
        .bucket(&src)
        .key("gone")
        .send()
        .await
        .unwrap();
    let o = job.run(&[]);
    expect_code(&o, 0);
    assert_eq!(
        bodies(&c, &dst, "over").await,
        [b"null version of over".to_vec()]
    );
    assert_eq!(
        bodies(&c, &dst, "gone").await,
        [b"null version of gone".to_vec()]
    );
    let st = job.status();
    assert_eq!((st.done, st.skipped, st.failed), (2, 0, 0), "{st:?}");
}

/// Plans the source, overwrites `k`, runs: a named failure with a non-zero exit, and no
/// other bytes at the destination.
async fn changed_null_version_fails(c: &Client, ep: &str, src: &str, extra: &[&str]) {
    let dst = bucket("nullc-dst");
    create_bucket(c, &dst, true).await;
    put(c, src, "k", b"listed bytes").await;
    let (_d, m) = manifest();
    let job = Job::new(src, &dst, &m).endpoint(ep).extra(extra);
    expect_code(&job.plan(), 0);
    put(c, src, "k", b"bytes written after the plan").await;
    let o = job.run(&[]);
    assert_ne!(o.status.code(), Some(0), "{}", stderr_of(&o));
    assert!(
        bodies(c, &dst, "k").await.is_empty(),
        "nothing copied in its place"
    );
    let st = job.status();
    assert_eq!((st.done, st.failed), (0, 1), "{st:?}");
    let r = job.report(&["--format", "csv"]);
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        text.contains("SourceChanged") && text.contains("changed since it was listed"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_object_of_an_unversioned_source_is_a_named_failure() {
    let ep = endpoint();
    let c = client(&ep);
    let src = bucket("unv-src");
    create_bucket(&c, &src, false).await;
    changed_null_version_fails(&c, &ep, &src, &[]).await;
    // Streamed: the GETs are pinned to the listed ETag too.
    let src = bucket("unv-src");
    create_bucket(&c, &src, false).await;
    changed_null_version_fails(&c, &ep, &src, &["--copy-mode", "stream"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_null_version_of_a_suspended_source_is_a_named_failure() {
    let ep = endpoint();
    let c = client(&ep);
    let src = bucket("susp-src");
    create_bucket(&c, &src, true).await;
    set_versioning(&c, &src, BucketVersioningStatus::Suspended).await;
    changed_null_version_fails(&c, &ep, &src, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_website_redirect_location_is_kept_in_every_copy_mode() {
    let ep = endpoint();
    let c = client(&ep);
    // Seeded without a whole-object CRC32: a multipart copy's composite checksum is another
    // matter (issue 18), not this test's.
    let plain = Client::from_conf(
        c.config()
            .to_builder()
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .build(),
    );
    let src = bucket("redir-src");
    create_bucket(&c, &src, true).await;
    let big = pseudo_random(6 * 1024 * 1024, 3);
    for (k, body) in [("small", b"page".to_vec()), ("big", big)] {
        plain
            .put_object()
            .bucket(&src)
            .key(k)
            .website_redirect_location(format!("/moved/{k}.html"))
            .body(ByteStream::from(body))
            .send()
            .await
            .unwrap();
    }
    let modes: [&[&str]; 3] = [
        &[],
        &["--copy-mode", "stream"],
        &["--multipart-threshold", "5MiB", "--part-size", "5MiB"],
    ];
    for extra in modes {
        let dst = bucket("redir-dst");
        create_bucket(&c, &dst, true).await;
        let (_d, m) = manifest();
        let job = Job::new(&src, &dst, &m).endpoint(&ep).extra(extra);
        expect_code(&job.replicate(), 0);
        for k in ["small", "big"] {
            let h = c.head_object().bucket(&dst).key(k).send().await.unwrap();
            assert_eq!(
                h.website_redirect_location(),
                Some(format!("/moved/{k}.html").as_str()),
                "{k} copied with {extra:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_keeps_its_source_tags_through_injected_faults() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("tagf-src"), bucket("tagf-dst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    let keys: Vec<String> = (0..60).map(|i| format!("t/{i:03}")).collect();
    let round = |r: usize| -> Vec<Op> {
        keys.iter()
            .enumerate()
            .map(|(i, k)| Op::Put {
                key: k.clone(),
                body: format!("{r} {k}").into_bytes(),
                content_type: Some("text/plain".into()),
                cache_control: None,
                metadata: vec![("round".into(), r.to_string())],
                tagging: Some(format!("round={r}&key={i}&team=x")),
            })
            .collect()
    };
    seed(&c, &src, vec![round(1), round(2)]).await;
    let (_d, m) = manifest();
    let job = Job::new(&src, &dst, &m).endpoint(&ep);
    expect_code(&job.plan(), 0);
    let proxy = FaultProxy::start(
        ep.trim_start_matches("http://")
            .parse::<SocketAddr>()
            .unwrap(),
        FaultConfig {
            seed: 11,
            rate: 0.2,
            faults: Fault::ALL.to_vec(),
            delay: Duration::from_millis(100),
            deny_path_prefix: None,
            deny_key_id: None,
        },
    )
    .await
    .unwrap();
    let p = proxy.endpoint();
    let o = job.run(&[
        "--source-endpoint",
        &p,
        "--dest-endpoint",
        &p,
        "--concurrency",
        "8",
        "--max-attempts",
        "15",
        "--retry-min-delay-ms",
        "5",
        "--retry-max-delay-ms",
        "200",
    ]);
    let stats = proxy.stats();
    drop(proxy);
    expect_code(&o, 0);
    assert!(stats.injected_of(Fault::ResetAfterForward) > 0);
    assert!(stats.injected_of(Fault::TruncateBody) > 0);
    // Every version, tags included (assert_replica compares each version's tags).
    let n = assert_replica(&c, &src, &c, &dst, "", "", all).await;
    assert_eq!(n, 2 * keys.len());
    let v = job_verify_deep(&job);
    expect_code(&v, 0);
}

fn job_verify_deep(job: &Job) -> std::process::Output {
    run(&["verify", "--manifest", job.m(), "--deep", "--no-progress"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_deep_finds_tags_changed_on_a_replica() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("deep-src"), bucket("deep-dst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    seed(
        &c,
        &src,
        vec![vec![
            Op::Put {
                key: "tagged".into(),
                body: b"x".to_vec(),
                content_type: None,
                cache_control: None,
                metadata: vec![],
                tagging: Some("a=1&b=2".into()),
            },
            Op::put("plain", b"y".to_vec()),
        ]],
    )
    .await;
    let (_d, m) = manifest();
    let job = Job::new(&src, &dst, &m).endpoint(&ep);
    expect_code(&job.replicate(), 0);
    expect_code(&job_verify_deep(&job), 0);
    // Someone changes a value of the replica's tags (as many tags as before: only the sets
    // differ; RGW 16.2 answers DeleteObjectTagging with success and keeps the tags).
    let tags = aws_sdk_s3::types::Tagging::builder()
        .set_tag_set(Some(
            [("a", "1"), ("b", "3")]
                .map(|(k, v)| {
                    aws_sdk_s3::types::Tag::builder()
                        .key(k)
                        .value(v)
                        .build()
                        .unwrap()
                })
                .to_vec(),
        ))
        .build()
        .unwrap();
    c.put_object_tagging()
        .bucket(&dst)
        .key("tagged")
        .tagging(tags)
        .send()
        .await
        .unwrap();
    expect_code(&job.verify(), 0);
    let o = job_verify_deep(&job);
    assert_ne!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("\"tagged\"") && out.contains("tags"), "{out}");
    assert!(!out.contains("\"plain\""), "{out}");
}
