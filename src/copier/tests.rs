//! In-process tests of the scheduler, reconciliation and retry rules: the real lister,
//! manifest (SQLite in a temporary directory) and copier, against the s3 layer's fake.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use indicatif::ProgressBar;

use super::{Copier, DestFacts, RunOptions, RunSummary};
use crate::config::{CopyMode, CopyOptions, JobSettings, Location, Selection, SideConfig, Sse};
use crate::lister::Lister;
use crate::manifest::{Manifest, State, Update};
use crate::s3::fake::{FakeServer, FaultKind};
use crate::s3::{ErrorClass, Limiter, Retrier, RetryPolicy, Side, STAMP_KEY};

const SRC: &str = "src";
const DST: &str = "dst";

fn settings() -> JobSettings {
    JobSettings {
        source: Location {
            bucket: SRC.into(),
            prefix: String::new(),
        },
        dest: Location {
            bucket: DST.into(),
            prefix: String::new(),
        },
        source_side: SideConfig::default(),
        dest_side: SideConfig::default(),
        selection: Selection {
            delete_markers: true,
            ..Selection::default()
        },
        copy: CopyOptions {
            mode: CopyMode::ServerSide,
            ..CopyOptions::default()
        },
    }
}

fn opts() -> RunOptions {
    RunOptions {
        concurrency: 8,
        policy: RetryPolicy {
            max_attempts: 6,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
        },
        ..RunOptions::default()
    }
}

fn server() -> FakeServer {
    let s = FakeServer::new();
    s.create_bucket(SRC, true);
    s.create_bucket(DST, true);
    s
}

/// The job with one request per small object: no stamp, the destination bucket's default
/// encryption.
fn one_request_settings() -> JobSettings {
    let mut s = settings();
    s.copy.stamp = false;
    s.copy.sse = Some(Sse::BucketDefault);
    s
}

/// Plans the source into a new manifest at `path`.
async fn plan(server: &FakeServer, path: &Path) {
    plan_with(server, path, settings()).await
}

/// Plans the source into a new manifest at `path` with the job settings `s`.
async fn plan_with(server: &FakeServer, path: &Path, s: JobSettings) {
    let mut m = Manifest::open(path, true).unwrap();
    m.store_settings(&s).unwrap();
    let retrier = Retrier::new(RetryPolicy::default(), Limiter::new(1, None));
    let client = server.client(Side::Source);
    let lister = Lister {
        client: &client,
        settings: &s,
        retrier: &retrier,
        dest_versioned: true,
    };
    lister.list_into(&mut m, |_| {}).await.unwrap();
}

/// One `run` over the manifest; returns its summary and the lowest bound on requests in
/// flight it reached.
async fn run(server: &FakeServer, path: &Path, o: RunOptions) -> (RunSummary, usize) {
    let m = Manifest::open(path, false).unwrap();
    let facts = DestFacts {
        versioned: true,
        object_lock: false,
    };
    let clients = (server.client(Side::Source), server.client(Side::Dest));
    let stored = m.settings().unwrap().expect("planned");
    let copier = Copier::new(
        stored,
        clients,
        facts,
        m.into_writer(),
        &o,
        ProgressBar::hidden(),
    );
    let summary = Arc::clone(&copier).run().await;
    copier.flush().await;
    let limit = copier.lowest_limit();
    drop(copier);
    (summary, limit)
}

/// The stamps (source version ids) of a destination key's versions, oldest first; delete
/// markers show as "DM".
fn dest_stamps(server: &FakeServer, key: &str) -> Vec<String> {
    server
        .history(DST, key)
        .iter()
        .map(|v| {
            if v.delete_marker {
                "DM".to_string()
            } else {
                v.head.metadata.get(STAMP_KEY).cloned().unwrap_or_default()
            }
        })
        .collect()
}

/// Every task of key `k`, oldest first.
fn tasks(path: &Path) -> Vec<crate::manifest::Task> {
    Manifest::open(path, false)
        .unwrap()
        .tasks_of_key("k")
        .unwrap()
}

fn all_tasks_done(path: &Path) -> crate::manifest::Counts {
    Manifest::open(path, false).unwrap().counts().unwrap()
}

#[tokio::test]
async fn lost_answer_after_the_server_acted_is_adopted_not_copied_twice() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    // Two identical empty versions (same ETag), as in the RGW report, and a server whose
    // CopyObject answer names no version id.
    let v1 = s.put(SRC, "k", b"", &[]);
    let v2 = s.put(SRC, "k", b"", &[]);
    s.omit_copy_version_ids(true);
    s.fail_after("CopyObject", Some("k"), 1, 1, FaultKind::LostAnswer);
    plan(&s, &path).await;
    let (summary, _) = run(&s, &path, opts()).await;
    assert_eq!(
        dest_stamps(&s, "k"),
        [v1, v2],
        "one copy of each source version, in order"
    );
    assert_eq!((summary.done, summary.reconciled), (2, 1));
    let dest_ids: Vec<_> = s.history(DST, "k").into_iter().map(|v| v.id).collect();
    let recorded: Vec<_> = tasks(&path)
        .into_iter()
        .map(|t| t.dest_version_id.expect("dest version id"))
        .collect();
    assert_eq!(
        recorded, dest_ids,
        "every done task names its own destination version"
    );
}

#[tokio::test]
async fn reconciliation_adopts_only_the_copy_of_that_source_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    let v1 = s.put(SRC, "k", b"same", &[]);
    let v2 = s.put(SRC, "k", b"same", &[]);
    plan(&s, &path).await;
    // A killed run: v1 was copied (its answer lost, nothing recorded), v2 had started.
    let t = tasks(&path);
    s.put(DST, "k", b"same", &[(STAMP_KEY, &v1)]);
    let w = Manifest::open(&path, false).unwrap().into_writer();
    w.send_durable(Update::Started { id: t[0].id, at: 0 })
        .await
        .unwrap();
    w.send_durable(Update::Started { id: t[1].id, at: 0 })
        .await
        .unwrap();
    w.close();
    let (summary, _) = run(&s, &path, opts()).await;
    assert_eq!(
        dest_stamps(&s, "k"),
        [v1, v2],
        "v1's copy adopted for v1 only; v2 copied"
    );
    assert_eq!((summary.done, summary.reconciled), (2, 1));
}

#[tokio::test]
async fn throttling_halves_the_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    for i in 0..20 {
        s.put(SRC, &format!("k{i:02}"), b"x", &[]);
    }
    s.fail(
        "HeadObject",
        None,
        4,
        FaultKind::Before(ErrorClass::Throttled, 503),
    );
    plan(&s, &path).await;
    let (summary, limit) = run(&s, &path, opts()).await;
    assert_eq!(summary.done, 20);
    assert!(summary.throttles >= 4, "{summary:?}");
    assert!(
        limit < opts().concurrency,
        "bound {limit} should be below 8 after throttling"
    );
    assert_eq!(all_tasks_done(&path).done, 20);
}

#[tokio::test]
async fn a_failed_version_blocks_its_key_across_runs_until_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    let v1 = s.put(SRC, "k", b"1", &[]);
    let _v2 = s.put(SRC, "k", b"2", &[]);
    let v3 = s.put(SRC, "k", b"3", &[]);
    // The second HEAD of key k (version 2) is denied for good.
    s.fail_after(
        "HeadObject",
        Some("k"),
        1,
        1,
        FaultKind::Before(ErrorClass::Fatal, 403),
    );
    plan(&s, &path).await;
    let (first, _) = run(&s, &path, opts()).await;
    assert_eq!((first.done, first.failed, first.blocked), (1, 1, 1));
    assert_eq!(dest_stamps(&s, "k"), std::slice::from_ref(&v1));
    // A second run keeps the order: version 3 still waits behind version 2.
    let (second, _) = run(&s, &path, opts()).await;
    assert_eq!((second.done, second.blocked), (0, 1));
    let c = all_tasks_done(&path);
    assert_eq!((c.failed, c.blocked), (1, 1));
    assert_eq!(dest_stamps(&s, "k"), std::slice::from_ref(&v1));
    // The user gives up on version 2: version 3 follows.
    assert_eq!(
        Manifest::open(&path, false).unwrap().skip_failed().unwrap(),
        1
    );
    let (third, _) = run(&s, &path, opts()).await;
    assert_eq!(third.done, 1);
    assert_eq!(dest_stamps(&s, "k"), [v1, v3]);
    let states: Vec<State> = tasks(&path).iter().map(|t| t.state).collect();
    assert_eq!(states, [State::Done, State::Skipped, State::Done]);
}

#[tokio::test]
async fn retry_failed_reconciles_before_writing_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    let v1 = s.put(SRC, "k", b"1", &[]);
    // Every attempt's answer is lost, but the first write happened.
    s.fail("CopyObject", Some("k"), 100, FaultKind::LostAnswer);
    s.fail(
        "ListObjectVersions",
        Some("k"),
        100,
        FaultKind::Before(ErrorClass::Retryable, 500),
    );
    plan(&s, &path).await;
    let (first, _) = run(&s, &path, opts()).await;
    assert_eq!(first.failed, 1);
    let written = s.history(DST, "k").len();
    assert!(written >= 1);
    // The server recovers; the retried task finds its copy instead of writing another.
    s.clear_faults();
    Manifest::open(&path, false)
        .unwrap()
        .retry_failed()
        .unwrap();
    let (second, _) = run(&s, &path, opts()).await;
    assert_eq!(second.done, 1);
    assert_eq!(second.reconciled, 1);
    assert_eq!(s.history(DST, "k").len(), written, "no further copy");
    assert_eq!(dest_stamps(&s, "k")[0], v1);
}

#[tokio::test]
async fn archived_versions_are_skipped_with_their_reason_and_do_not_block() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    let v1 = s.put(SRC, "k", b"old", &[]);
    let v2 = s.put(SRC, "k", b"new", &[]);
    s.set_storage_class(SRC, "k", &v1, "GLACIER");
    plan(&s, &path).await;
    let (summary, _) = run(&s, &path, opts()).await;
    assert_eq!((summary.done, summary.skipped), (1, 1));
    assert_eq!(dest_stamps(&s, "k"), [v2]);
    let c = all_tasks_done(&path);
    assert_eq!(c.archived, 1);
    let m = Manifest::open(&path, false).unwrap();
    let p = m.problems(10).unwrap();
    assert_eq!(p[0].error_class.as_deref(), Some("archived"));
    assert!(p[0]
        .message
        .as_deref()
        .unwrap_or("")
        .contains("restore first"));
}

#[tokio::test]
async fn delete_markers_and_versions_keep_their_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    let a = s.put(SRC, "k", b"a", &[]);
    s.delete(SRC, "k");
    s.delete(SRC, "k");
    let b = s.put(SRC, "k", b"b", &[]);
    s.delete(SRC, "k");
    s.fail("DeleteObject", None, 1, FaultKind::LostAnswer);
    plan(&s, &path).await;
    let (summary, _) = run(&s, &path, opts()).await;
    assert_eq!(summary.done, 5);
    assert_eq!(
        dest_stamps(&s, "k"),
        [a, "DM".into(), "DM".into(), b, "DM".into()]
    );
    let open = Manifest::open(&path, false)
        .unwrap()
        .next_key_groups(0, 10)
        .unwrap();
    assert!(open.is_empty(), "nothing left open");
    let methods: Vec<_> = tasks(&path).iter().map(|t| t.state).collect();
    assert_eq!(methods, [State::Done; 5]);
}

#[tokio::test]
async fn plan_refuses_destination_keys_longer_than_s3_allows() {
    let dir = tempfile::tempdir().unwrap();
    let s = server();
    s.put(SRC, &"k".repeat(1000), b"x", &[]);
    let mut m = Manifest::open(&dir.path().join("job.db"), true).unwrap();
    let mut settings = settings();
    settings.dest.prefix = "a-rather-long-archive-prefix/".into();
    let retrier = Retrier::new(RetryPolicy::default(), Limiter::new(1, None));
    let client = s.client(Side::Source);
    let lister = Lister {
        client: &client,
        settings: &settings,
        retrier: &retrier,
        dest_versioned: true,
    };
    let e = lister
        .list_into(&mut m, |_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("1029 bytes") && e.contains("longer than S3's 1024"),
        "{e}"
    );
    assert_eq!(
        m.counts().unwrap().total,
        0,
        "nothing of the page was written"
    );
}

#[tokio::test]
async fn a_truncated_page_without_markers_is_an_error_not_a_loop() {
    let dir = tempfile::tempdir().unwrap();
    let s = server();
    for i in 0..5 {
        s.put(SRC, &format!("k{i}"), b"x", &[]);
    }
    s.truncate_without_markers(true);
    let mut m = Manifest::open(&dir.path().join("job.db"), true).unwrap();
    std::env::set_var("S3_BACKFILL_LIST_PAGE_SIZE", "2");
    let retrier = Retrier::new(RetryPolicy::default(), Limiter::new(1, None));
    let client = s.client(Side::Source);
    let settings = settings();
    let lister = Lister {
        client: &client,
        settings: &settings,
        retrier: &retrier,
        dest_versioned: true,
    };
    let e = lister
        .list_into(&mut m, |_| {})
        .await
        .unwrap_err()
        .to_string();
    std::env::remove_var("S3_BACKFILL_LIST_PAGE_SIZE");
    assert!(e.contains("names no next key marker"), "{e}");
}

#[tokio::test]
async fn an_sse_c_version_fails_with_its_reason_and_blocks_only_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    let v1 = s.put(SRC, "k", b"secret", &[]);
    s.put(SRC, "k", b"later", &[]);
    let other = s.put(SRC, "other", b"fine", &[]);
    s.set_encryption(SRC, "k", &v1, crate::s3::Encryption::SseC);
    plan(&s, &path).await;
    let (summary, _) = run(&s, &path, opts()).await;
    assert_eq!((summary.done, summary.failed, summary.blocked), (1, 1, 1));
    assert_eq!(dest_stamps(&s, "other"), [other]);
    assert!(
        s.history(DST, "k").is_empty(),
        "nothing of k is written out of order"
    );
    let p = Manifest::open(&path, false).unwrap().problems(10).unwrap();
    let failed = p
        .iter()
        .find(|p| p.state == "failed")
        .expect("a failed row");
    assert!(
        failed.message.as_deref().unwrap_or("").contains("SSE-C"),
        "{failed:?}"
    );
    assert!(
        p.iter().any(|p| p.state == "blocked"),
        "the later version is listed as blocked"
    );
}

/// Requests of `op` the manifest recorded.
fn requests_of(path: &Path, op: &str) -> u64 {
    let c = all_tasks_done(path);
    c.requests.get(op).copied().unwrap_or(0)
}

/// Bodies and user metadata of a key's versions, oldest first.
fn bodies_and_metadata(
    server: &FakeServer,
    bucket: &str,
    key: &str,
) -> Vec<(Vec<u8>, std::collections::BTreeMap<String, String>)> {
    server
        .history(bucket, key)
        .into_iter()
        .map(|v| (v.body.to_vec(), v.head.metadata))
        .collect()
}

#[tokio::test]
async fn without_stamp_a_small_version_costs_one_copy_and_no_head() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    s.put(SRC, "k", b"one", &[("color", "blue")]);
    s.put(SRC, "k", b"two!", &[("color", "red")]);
    s.put(SRC, "other", b"x", &[]);
    plan_with(&s, &path, one_request_settings()).await;
    let (summary, _) = run(&s, &path, opts()).await;
    assert_eq!(summary.done, 3);
    for key in ["k", "other"] {
        assert_eq!(
            bodies_and_metadata(&s, DST, key),
            bodies_and_metadata(&s, SRC, key),
            "{key}: same bodies and metadata, in order"
        );
    }
    assert_eq!(requests_of(&path, "HeadObject"), 0);
    assert_eq!(requests_of(&path, "CopyObject"), 3);
}

#[tokio::test]
async fn without_stamp_a_lost_copy_answer_is_adopted_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    let v1 = s.put(SRC, "k", b"", &[("n", "1")]);
    let v2 = s.put(SRC, "k", b"", &[("n", "2")]);
    s.omit_copy_version_ids(true);
    s.fail_after("CopyObject", Some("k"), 1, 1, FaultKind::LostAnswer);
    plan_with(&s, &path, one_request_settings()).await;
    let (summary, _) = run(&s, &path, opts()).await;
    assert_eq!((summary.done, summary.reconciled), (2, 1));
    assert_eq!(
        bodies_and_metadata(&s, DST, "k"),
        bodies_and_metadata(&s, SRC, "k"),
        "one copy of {v1} and of {v2}, in order"
    );
    let dest_ids: Vec<_> = s.history(DST, "k").into_iter().map(|v| v.id).collect();
    let recorded: Vec<_> = tasks(&path)
        .into_iter()
        .map(|t| t.dest_version_id.expect("dest version id"))
        .collect();
    assert_eq!(recorded, dest_ids);
}

#[tokio::test]
async fn without_stamp_a_killed_runs_copy_is_adopted_and_the_rest_copied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    s.put(SRC, "k", b"same", &[("n", "1")]);
    s.put(SRC, "k", b"same", &[("n", "2")]);
    plan_with(&s, &path, one_request_settings()).await;
    // A killed run: v1 was copied (nothing recorded), v2 had started.
    let t = tasks(&path);
    s.put(DST, "k", b"same", &[("n", "1")]);
    let w = Manifest::open(&path, false).unwrap().into_writer();
    for task in &t {
        let started = Update::Started {
            id: task.id,
            at: super::now_secs(),
        };
        w.send_durable(started).await.unwrap();
    }
    w.close();
    let (summary, _) = run(&s, &path, opts()).await;
    assert_eq!((summary.done, summary.reconciled), (2, 1));
    assert_eq!(
        bodies_and_metadata(&s, DST, "k"),
        bodies_and_metadata(&s, SRC, "k")
    );
}

#[tokio::test]
async fn without_stamp_listed_archive_classes_are_headed_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    let v1 = s.put(SRC, "k", b"old", &[]);
    s.put(SRC, "k", b"new", &[]);
    s.set_storage_class(SRC, "k", &v1, "GLACIER");
    plan_with(&s, &path, one_request_settings()).await;
    let (summary, _) = run(&s, &path, opts()).await;
    assert_eq!((summary.done, summary.skipped), (1, 1));
    assert_eq!(all_tasks_done(&path).archived, 1);
    assert_eq!(s.history(DST, "k").len(), 1);
    assert_eq!(
        requests_of(&path, "HeadObject"),
        1,
        "only the GLACIER version"
    );
}

#[tokio::test]
async fn streamed_parts_are_cut_to_the_memory_budget() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    let body: Vec<u8> = (0..20 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    s.put(SRC, "k", &body, &[]);
    let mut job = settings();
    job.copy.mode = CopyMode::Stream;
    job.copy.part_size = 16 * 1024 * 1024;
    plan_with(&s, &path, job).await;
    // 56 MiB: 48 for the program, 8 for bodies.
    let o = RunOptions {
        max_memory: 56 * 1024 * 1024,
        ..opts()
    };
    let (summary, _) = run(&s, &path, o).await;
    assert_eq!(summary.done, 1);
    assert_eq!(s.history(DST, "k")[0].body.as_ref(), &body[..]);
    let t = &tasks(&path)[0];
    let (part, parts) = part_layout(&path, t.id);
    assert_eq!((part, parts), (8 * 1024 * 1024, 3), "16 MiB parts cut to 8");
}

#[tokio::test]
async fn the_memory_budget_never_waits_for_more_than_it_has() {
    let b = super::strategy::Budget::new(56 * 1024 * 1024);
    assert_eq!(b.bytes(), 8 * 1024 * 1024);
    let held = b.hold(8 * 1024 * 1024).await.unwrap();
    assert_eq!(b.available(), 0, "the whole budget is held");
    drop(held);
    // A part larger than the budget takes all of it instead of waiting forever.
    let big = b.hold(100 * 1024 * 1024).await.unwrap();
    assert_eq!(b.available(), 0);
    drop(big);
    assert_eq!(b.available(), 8 * 1024 * 1024);
}

/// The part size and count recorded for a multipart task.
fn part_layout(path: &Path, task: i64) -> (i64, i64) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row(
        "SELECT part_size, parts FROM uploads WHERE task = ?1",
        [task],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}
