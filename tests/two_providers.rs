//! Two providers: two servers of the kind under test (two moto servers, or two Ceph RGW
//! clusters) stand for two S3 providers (two endpoints, two sets of credentials). Copies
//! stream (GET from one, upload to the other), explicitly or because `auto` sees two
//! endpoints or two profiles.

mod support;

use std::path::Path;

use aws_sdk_s3::Client;
use support::*;

const MIB: usize = 1024 * 1024;

/// Versions, delete markers, multipart objects (5 MiB parts, two versions of one key),
/// headers, metadata and tags. Returns the number of object versions.
async fn seed_corpus(c: &Client, bucket: &str) -> usize {
    let mut versions = 0;
    for round in 0..3 {
        let mut ops = Vec::new();
        for i in 0..12 {
            let key = format!("small/{i:02}");
            match (round, i % 4) {
                (2, 1) => ops.push(Op::Delete { key }),
                (2, 2) | (2, 3) => {}
                _ => {
                    versions += 1;
                    ops.push(if i % 3 == 0 {
                        Op::Put {
                            key,
                            body: format!("round {round} item {i}").into_bytes(),
                            content_type: Some("application/x-two".into()),
                            cache_control: Some(format!("max-age={}", i + 1)),
                            metadata: vec![("round".into(), round.to_string())],
                            tagging: Some(format!("side=src&i={i}")),
                        }
                    } else {
                        Op::put(&key, format!("plain {round} {i}"))
                    });
                }
            }
        }
        if round == 1 {
            ops.push(Op::Delete {
                key: "mp/once".into(),
            });
        }
        seed(c, bucket, vec![ops]).await;
        if round < 2 {
            let h = Headers {
                content_type: Some("video/x-test".into()),
                cache_control: Some("public, max-age=3600".into()),
                metadata: vec![("part-size".into(), "5MiB".into())],
                tagging: Some(format!("big=yes&round={round}")),
                checksum: None,
            };
            let body = pseudo_random(12 * MIB + 17, round as u64);
            put_multipart(c, bucket, "mp/twice", &body, &[5 * MIB], &h).await;
            versions += 1;
            if round == 0 {
                let body = pseudo_random(11 * MIB, 42);
                put_multipart(c, bucket, "mp/once", &body, &[5 * MIB], &h).await;
                versions += 1;
            }
            pace().await;
        }
    }
    versions
}

/// The job of this file: 5 MiB parts, delete markers, then `extra`.
fn two_sided(src: &str, dst: &str, m: &Path, extra: &[&str]) -> Job {
    Job::new(src, dst, m)
        .extra(&[
            "--multipart-threshold",
            "5MiB",
            "--part-size",
            "5MiB",
            "--delete-markers",
        ])
        .extra(extra)
}

/// Every task is done and was streamed (never a server-side copy); the multipart ones kept
/// the source's layout and ETag.
fn assert_streamed(m: &Path) {
    let tasks = manifest_tasks(m);
    assert!(!tasks.is_empty());
    for t in &tasks {
        assert_eq!(t.state, "done", "{t:?}");
        let method = t.copy_method.as_deref().unwrap_or_default();
        assert!(
            matches!(method, "stream" | "multipart-stream" | "delete-marker"),
            "{t:?}"
        );
        if t.key.starts_with("mp/") && method != "delete-marker" {
            assert_eq!(method, "multipart-stream", "{t:?}");
            assert_eq!(t.etag_preserved, Some(1), "{t:?}");
            assert_eq!(t.part_size, Some(5 * MIB as i64), "{t:?}");
            assert_eq!(t.parts, Some(3), "{t:?}");
        }
    }
    assert!(tasks
        .iter()
        .any(|t| t.copy_method.as_deref() == Some("stream")));
}

async fn two_provider_job(extra: &[&str]) {
    let (ep1, ep2) = (endpoint(), second_endpoint());
    assert_ne!(ep1, ep2);
    let (sc, dc) = (client(&ep1), client(&ep2));
    let (src, dst) = (bucket("src"), bucket("dst"));
    create_bucket(&sc, &src, true).await;
    create_bucket(&dc, &dst, true).await;
    let versions = seed_corpus(&sc, &src).await;
    // The buckets live on one provider each.
    assert!(sc.head_bucket().bucket(&dst).send().await.is_err());
    assert!(dc.head_bucket().bucket(&src).send().await.is_err());

    let (_d, m) = manifest();
    let job = two_sided(&src, &dst, &m, extra).endpoints(&ep1, &ep2);
    expect_code(&job.replicate(), 0);

    let n = assert_replica(&sc, &src, &dc, &dst, "", "", all).await;
    assert_eq!(n, versions);
    assert!(open_uploads(&dc, &dst).await.is_empty());
    assert_streamed(&m);
    let st = job.status();
    assert_eq!(st.done, st.total, "{st:?}");
    assert!(st.delete_markers >= 4, "{st:?}");

    expect_code(&job.verify(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_mode_between_two_providers() {
    two_provider_job(&["--copy-mode", "stream"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_streams_when_endpoints_differ() {
    two_provider_job(&[]).await;
}

/// Writes an AWS config file and a credentials file with profiles `src` (the first account)
/// and `dst` (the second account) (and `nokeys`, which has an endpoint but no credentials).
fn write_profiles(dir: &Path, ep1: &str, ep2: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let config = dir.join("config");
    let credentials = dir.join("credentials");
    std::fs::write(
        &config,
        format!(
            "[profile src]\nregion = us-east-1\nendpoint_url = {ep1}\n\n\
             [profile dst]\nregion = eu-west-1\nendpoint_url = {ep2}\n\n\
             [profile nokeys]\nregion = us-east-1\nendpoint_url = {ep1}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        &credentials,
        format!(
            "[src]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n\n\
             [dst]\naws_access_key_id = {SECOND_KEY_ID}\naws_secret_access_key = {SECOND_SECRET}\n"
        ),
    )
    .unwrap();
    (config, credentials)
}

/// A command for the binary that finds everything about each side in the profiles: no
/// credentials, region or endpoint in the environment.
fn profile_cmd(args: &[String], config: &Path, credentials: &Path) -> std::process::Output {
    cmd(&strs(args))
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .env("AWS_CONFIG_FILE", config)
        .env("AWS_SHARED_CREDENTIALS_FILE", credentials)
        .output()
        .expect("run s3-backfill")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_give_each_side_its_credentials_and_endpoint() {
    let (ep1, ep2) = (endpoint(), second_endpoint());
    // The destination belongs to the second account (on RGW a user of another tenant).
    let (sc, dc) = (client(&ep1), second_account(&ep2));
    let (src, dst) = (bucket("src"), bucket("dst"));
    create_bucket(&sc, &src, true).await;
    create_bucket(&dc, &dst, true).await;
    let versions = seed_corpus(&sc, &src).await;
    let dir = tempfile::tempdir().unwrap();
    let (config, credentials) = write_profiles(dir.path(), &ep1, &ep2);

    // A profile without credentials cannot reach the source: the keys come from the
    // profiles, not from anywhere else.
    let (_d0, m0) = manifest();
    let args = two_sided(&src, &dst, &m0, &[])
        .profiles("nokeys", "dst")
        .replicate_args();
    let o = profile_cmd(&args, &config, &credentials);
    assert!(
        !o.status.success(),
        "a profile without keys must fail: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Endpoints, regions and keys all come from the profiles; `auto` streams because the
    // sides use different profiles.
    let (_d, m) = manifest();
    let args = two_sided(&src, &dst, &m, &[])
        .profiles("src", "dst")
        .replicate_args();
    let o = profile_cmd(&args, &config, &credentials);
    expect_code(&o, 0);
    let n = assert_replica(&sc, &src, &dc, &dst, "", "", all).await;
    assert_eq!(n, versions);
    assert!(open_uploads(&dc, &dst).await.is_empty());
    assert_streamed(&m);

    // The manifest stores the profile names, never the keys.
    let raw = std::fs::read(&m).unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.contains("\"profile\":\"src\""), "profile names stored");
    for secret in [KEY_ID, SECRET, SECOND_KEY_ID, SECOND_SECRET] {
        assert!(!text.contains(secret), "the manifest holds {secret:?}");
    }

    // `verify` reaches each side through its profile too.
    let o = profile_cmd(
        &["verify", "--manifest", m.to_str().unwrap()].map(String::from),
        &config,
        &credentials,
    );
    expect_code(&o, 0);
}

/// A streamed job under a bandwidth limit (a different one each way, and a timetable) is
/// still an exact replica: the limiter delays bodies, it never changes or cuts them. Nothing
/// about time is asserted (benches/bandwidth.sh measures the rate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandwidth_limit_keeps_the_replica_exact() {
    two_provider_job(&["--copy-mode", "stream", "--max-bandwidth", "16M:8M"]).await;
    two_provider_job(&[
        "--copy-mode",
        "stream",
        "--bandwidth-schedule",
        "00:00,12M 06:00,10M:off 12:00,off:10M 18:00,16M",
    ])
    .await;
}
