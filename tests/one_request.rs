//! One request per small version (issue 11): a job planned with `--no-stamp --sse
//! bucket-default` copies each small version with one `CopyObject` and no HEAD of the
//! source, keeps metadata, content headers, tags and history exactly, and, killed anywhere
//! during `run`, ends with an exact replica and no duplicate (reconciliation without the
//! stamp: the first version of the task's size written after the key's last recorded one).

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::*;

/// The flags of the one-request mode.
const ONE_REQUEST: [&str; 4] = ["--no-stamp", "--sse", "bucket-default", "--delete-markers"];

/// Two versions of every key (the second with headers, metadata, and tags on every third
/// key), a delete marker on every fourth, a third version on every fifth.
fn corpus(n: usize) -> Vec<Vec<Op>> {
    let mut rounds = vec![Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for i in 0..n {
        let k = format!("one/{i:04} key+{}", i % 3);
        rounds[0].push(Op::put(&k, format!("v1 {k}")));
        rounds[1].push(Op::Put {
            key: k.clone(),
            body: format!("v2 {k} {}", "z".repeat(i % 30)).into_bytes(),
            content_type: Some("text/plain".into()),
            cache_control: Some("max-age=60".into()),
            metadata: vec![("rev".into(), "2".into())],
            tagging: (i % 3 == 0).then(|| format!("rev=2&i={i}")),
        });
        if i % 4 == 1 {
            rounds[2].push(Op::Delete { key: k.clone() });
        }
        if i % 5 == 0 {
            rounds[3].push(Op::put(&k, format!("v3 {k}")));
        }
    }
    rounds
}

async fn buckets(c: &aws_sdk_s3::Client, tag: &str, n: usize) -> (String, String) {
    let (src, dst) = (bucket(&format!("{tag}-src")), bucket(&format!("{tag}-dst")));
    create_bucket(c, &src, true).await;
    create_bucket(c, &dst, true).await;
    seed(c, &src, corpus(n)).await;
    (src, dst)
}

/// Requests by operation, from `status --json`.
fn requests(m: &std::path::Path) -> serde_json::Map<String, serde_json::Value> {
    let o = run(&["status", "--manifest", m.to_str().unwrap(), "--json"]);
    expect_code(&o, 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status json");
    v["requests"].as_object().cloned().unwrap_or_default()
}

fn count(r: &serde_json::Map<String, serde_json::Value>, op: &str) -> u64 {
    r.get(op).and_then(|v| v.as_u64()).unwrap_or(0)
}

/// Exact replica: every version and marker, in order, same content, nothing twice.
async fn assert_exact(c: &aws_sdk_s3::Client, src: &str, dst: &str) -> usize {
    let checked = assert_replica(c, src, c, dst, "", "", all).await;
    let (s, d) = (entry_count(c, src).await, entry_count(c, dst).await);
    assert_eq!(d, s, "destination entries {d}, source {s}");
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_versions_cost_one_copy_and_keep_everything() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = buckets(&c, "one", 24).await;
    let (_d, m) = manifest();
    let job = Job::new(&src, &dst, &m).endpoint(&ep).extra(&ONE_REQUEST);
    let o = job.replicate();
    expect_code(&o, 0);
    let checked = assert_exact(&c, &src, &dst).await;
    assert!(checked >= 48, "only {checked} versions compared");
    let st = status(&m);
    let copies = st.done - st.delete_markers;
    let r = requests(&m);
    println!("{copies} versions copied; requests: {r:?}");
    assert_eq!(
        count(&r, "CopyObject"),
        copies,
        "one CopyObject per version"
    );
    // The source is never HEADed. A server whose CopyObject answer names no version id
    // (RGW) is asked the new version's id with one HEAD of the destination only where a
    // later version of the key follows; a key's last version's id comes from a listing.
    let heads = count(&r, "HeadObject");
    let keys = 24;
    let last_is_a_marker = (0..keys).filter(|i| i % 4 == 1 && i % 5 != 0).count() as u64;
    match server() {
        Server::Moto => assert_eq!(heads, 0, "{r:?}"),
        Server::Rgw => assert_eq!(heads, copies - (keys as u64 - last_is_a_marker), "{r:?}"),
    }
    assert_eq!(count(&r, "GetObjectTagging"), 0, "{r:?}");
    assert_each_task_names_its_own_version(&job);
}

/// Every task is done and names a destination version of its own (learned from the write's
/// answer, a HEAD, or a listing).
fn assert_each_task_names_its_own_version(job: &Job) {
    let mut claimed = std::collections::HashSet::new();
    for t in job.tasks() {
        assert_eq!(t.state, "done", "{t:?}");
        let v = t.dest_version_id.clone();
        let v = v.unwrap_or_else(|| panic!("no destination version id: {t:?}"));
        assert!(claimed.insert((t.key.clone(), v)), "{t:?}: claimed twice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_runs_without_stamp_end_with_an_exact_replica() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = buckets(&c, "onekill", 150).await;
    let (_d, m) = manifest();
    let job = Job::new(&src, &dst, &m).endpoint(&ep).extra(&ONE_REQUEST);
    expect_code(&job.plan(), 0);
    let args = job.run_args(&["--concurrency", "8"]);
    let mut kills = 0;
    // Kill moments spread over a run's first second (8 in flight copy ~150-250 tasks/s).
    for i in 0..8u64 {
        let child = cmd(&strs(&args))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let (killed, o) = kill_after(child, Duration::from_millis(60 + 130 * i)).await;
        kills += killed as u32;
        if !killed {
            expect_code(&o, 0);
        }
        let st = status(&m);
        println!("run #{i}: killed: {killed}; {st:?}");
        assert_eq!(st.failed, 0, "{st:?}");
    }
    assert!(kills > 0, "no run was killed: nothing was tested");
    expect_code(&job.run(&["--concurrency", "8"]), 0);
    let checked = assert_exact(&c, &src, &dst).await;
    assert!(checked >= 300, "only {checked} versions compared");
    let st = status(&m);
    assert_eq!((st.done, st.pending, st.failed), (st.total, 0, 0), "{st:?}");
    assert_each_task_names_its_own_version(&job);
}
