//! In-process tests of the scheduler, reconciliation and retry rules: the real lister,
//! manifest (SQLite in a temporary directory) and copier, against the s3 layer's fake.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use indicatif::ProgressBar;
use tokio::sync::watch;

use super::{Copier, DestFacts, ListingState, RunOptions, RunSummary};
use crate::config::{CopyMode, CopyOptions, JobSettings, Location, Selection, SideConfig, Sse};
use crate::lister::Lister;
use crate::manifest::{Listing, Manifest, NewTask, State, Update};
use crate::s3::fake::{FakeS3, FakeServer, FaultKind};
use crate::s3::{ErrorClass, ListFrom, RetryPolicy, S3Client, Side, S3, STAMP_KEY};

pub(crate) const SRC: &str = "src";
pub(crate) const DST: &str = "dst";

pub(crate) fn settings() -> JobSettings {
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
        filters: Default::default(),
        replication: None,
        destinations: Vec::new(),
        supplied: None,
    }
}

pub(crate) fn opts() -> RunOptions {
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
    let mut m = Manifest::open(path, true).unwrap();
    let s = settings();
    m.store_settings(&s).unwrap();
    let source = S3::alone(server.client(Side::Source), 1);
    let lister = Lister::new(&s, &source, None, true);
    lister.list_into(&mut m, |_| {}).await.unwrap();
}

/// A copier over the manifest at `path` (its writer thread holds a connection).
pub(crate) fn copier(server: &FakeServer, path: &Path, o: &RunOptions) -> Arc<Copier<FakeS3>> {
    let m = Manifest::open(path, false).unwrap();
    let facts = DestFacts {
        versioned: true,
        object_lock: false,
    };
    let clients = (server.client(Side::Source), server.client(Side::Dest));
    let stored = m.settings().unwrap().expect("planned");
    Copier::new(
        stored,
        o.sides(clients),
        facts,
        m.into_writer(),
        o,
        ProgressBar::hidden(),
    )
}

/// One `run` over the manifest; returns its summary and the lowest bound on requests in
/// flight it reached.
pub(crate) async fn run(server: &FakeServer, path: &Path, o: RunOptions) -> (RunSummary, usize) {
    let copier = copier(server, path, &o);
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

/// Records an attempt at task `id` as started (long ago), as a stopped run leaves it.
async fn started(w: &crate::manifest::Writer, id: i64) {
    w.send_durable(Update::Started { id, at: 0 }).await.unwrap();
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
    assert_eq!(
        recorded_ids(&path, "k"),
        dest_ids(&s, "k"),
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
    started(&w, t[0].id).await;
    started(&w, t[1].id).await;
    w.close();
    let (summary, _) = run(&s, &path, opts()).await;
    assert_eq!(
        dest_stamps(&s, "k"),
        [v1, v2],
        "v1's copy adopted for v1 only; v2 copied"
    );
    assert_eq!((summary.done, summary.reconciled), (2, 1));
}

/// A worker stopped past its lease (SIGSTOP) had written v1 v2 v3, a delete marker and v4
/// of a key within one second on a server listing like moto, and recorded v1..v3 only.
#[tokio::test]
async fn a_delete_marker_and_version_written_in_the_same_second_as_recorded_ones_are_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    let v1 = s.put(SRC, "k", b"one", &[]);
    let v2 = s.put(SRC, "k", b"two", &[]);
    let v3 = s.put(SRC, "k", b"three", &[]);
    s.delete(SRC, "k");
    let v4 = s.put(SRC, "k", b"four", &[]);
    plan(&s, &path).await;
    let t = tasks(&path);
    assert_eq!(t.len(), 5);

    s.list_like_moto(true);
    let written: Vec<String> = [(&v1, "one"), (&v2, "two"), (&v3, "three")]
        .iter()
        .map(|(v, body)| s.put(DST, "k", body.as_bytes(), &[(STAMP_KEY, v)]))
        .collect();
    s.delete(DST, "k");
    s.put(DST, "k", b"four", &[(STAMP_KEY, &v4)]);
    let w = Manifest::open(&path, false).unwrap().into_writer();
    for (task, id) in t.iter().zip(&written) {
        started(&w, task.id).await;
        w.send(Update::Finished {
            id: task.id,
            outcome: crate::manifest::Copied::single(
                Some(id.clone()),
                crate::manifest::CopyMethod::Copy,
            )
            .into_outcome(false),
        })
        .unwrap();
    }
    for task in &t[3..] {
        started(&w, task.id).await;
    }
    w.close();

    let (summary, _) = run(&s, &path, opts()).await;
    assert_eq!(
        dest_stamps(&s, "k"),
        [v1, v2, v3, "DM".into(), v4],
        "the delete marker and v4 are adopted, not written again"
    );
    assert_eq!((summary.done, summary.reconciled), (2, 2));
    assert_eq!(recorded_ids(&path, "k"), dest_ids(&s, "k"));
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
    let source = S3::alone(s.client(Side::Source), 1);
    let lister = Lister::new(&settings, &source, None, true);
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
    let settings = settings();
    let source = S3::alone(s.client(Side::Source), 1);
    let mut lister = Lister::new(&settings, &source, None, true);
    lister.page_size = 2;
    let e = lister
        .list_into(&mut m, |_| {})
        .await
        .unwrap_err()
        .to_string();
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

/// Every entry of the source in listing order (each key newest first), with its place in
/// its key's history, as the lister would write them.
async fn listed(s: &FakeServer) -> Vec<NewTask> {
    let from = ListFrom {
        bucket: SRC.into(),
        prefix: String::new(),
        key_marker: None,
        version_marker: None,
        max_keys: 1000,
    };
    let page = s.client(Side::Source).list_versions(&from).await.unwrap();
    let mut out: Vec<NewTask> = Vec::new();
    for e in page.entries {
        let pos = match out.last() {
            Some(t) if t.entry.key == e.key => t.history_pos + 1,
            _ => 0,
        };
        out.push(NewTask {
            entry: e,
            history_pos: pos,
            dest: 0,
        });
    }
    out
}

/// The checkpoint after `tasks` (the whole listing so far).
fn checkpoint(tasks: &[NewTask], pages: u64, complete: bool) -> Listing {
    let last = tasks.last().unwrap();
    Listing {
        key_marker: Some(last.entry.key.clone()),
        version_marker: Some(last.entry.version_id.clone()),
        complete,
        pages,
        entries: tasks.len() as u64,
        last_key: Some(last.entry.key.clone()),
        last_key_seen: last.history_pos + 1,
    }
}

/// The source's version ids of `key`, oldest first, delete markers as "DM" (the shape of
/// [`dest_stamps`]).
fn source_history(s: &FakeServer, key: &str) -> Vec<String> {
    s.history(SRC, key)
        .iter()
        .map(|v| match v.delete_marker {
            true => "DM".to_string(),
            false => v.id.clone(),
        })
        .collect()
}

/// Waits until `ready` holds (the copier works in other tasks).
async fn wait_until(what: &str, ready: impl Fn() -> bool) {
    for _ in 0..2000 {
        if ready() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_copied_only_once_its_whole_history_is_listed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    s.put(SRC, "a", b"a", &[]);
    for i in 0..4 {
        s.put(SRC, "k", format!("k{i}").as_bytes(), &[]);
    }
    s.put(SRC, "z", b"z", &[]);
    let entries = listed(&s).await;
    let mut lister = Manifest::open(&path, true).unwrap();
    lister.store_settings(&settings()).unwrap();
    // The first page ends inside k's history: its two oldest versions are not listed yet.
    let (first, rest) = entries.split_at(3);
    lister
        .insert_page(first, &checkpoint(first, 1, false))
        .unwrap();
    let progress = lister.listing_progress().unwrap();
    assert_eq!(
        (progress.complete, progress.open_keys),
        (false, vec!["k".into()])
    );

    let copier = copier(&s, &path, &opts());
    let (tx, rx) = watch::channel(ListingState {
        pages: 1,
        ..ListingState::default()
    });
    let scheduler = tokio::spawn(Arc::clone(&copier).run_beside_listing(rx));
    wait_until("a to be copied", || s.history(DST, "a").len() == 1).await;
    // Time for a wrong copy of k to show (nothing else holds it back).
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        s.history(DST, "k").is_empty(),
        "k was copied before its older versions were listed"
    );

    lister
        .insert_page(rest, &checkpoint(&entries, 2, true))
        .unwrap();
    tx.send_modify(|st| {
        *st = ListingState {
            pages: 2,
            finished: true,
            complete: true,
        }
    });
    let summary = scheduler.await.unwrap();
    copier.flush().await;
    assert_eq!((summary.done, summary.failed), (6, 0));
    for key in ["a", "k", "z"] {
        assert_eq!(dest_stamps(&s, key), source_history(&s, key), "{key}");
    }
    assert!(lister.listing_progress().unwrap().open_keys.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copying_starts_while_a_slow_listing_goes_on_and_keeps_every_history() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    let keys: Vec<String> = (0..16).map(|i| format!("k{i:02}")).collect();
    for (i, k) in keys.iter().enumerate() {
        for v in 0..=(i % 4) {
            s.put(SRC, k, format!("{k} v{v}").as_bytes(), &[]);
        }
        if i % 5 == 1 {
            s.delete(SRC, k);
        }
    }
    // Two entries a page, each page slow: keys span pages, copies overlap the listing.
    s.page_listing(2, 10);
    let m = Manifest::open(&path, true).unwrap();
    m.store_settings(&settings()).unwrap();
    drop(m);
    let first_copy = {
        let path = path.clone();
        // Whether the listing was complete when the first task was done.
        tokio::spawn(async move {
            let m = Manifest::open(&path, false).unwrap();
            loop {
                let c = m.counts().unwrap();
                if c.done > 0 {
                    return c.listing_complete;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let copier = copier(&s, &path, &opts());
    let job = settings();
    let sides = opts().sides((s.client(Side::Source), s.client(Side::Dest)));
    let (source, dest) = (&sides.source, &sides.dest);
    let live = crate::job::run::LiveListing {
        path: &path,
        settings: &job,
        source,
        dest,
        dest_versioned: true,
        concurrency: 1,
        page_size: crate::lister::PAGE_SIZE,
        bar: ProgressBar::hidden(),
        log_every: None,
        quiet: false,
    };
    let summary = crate::job::run::copy_while_listing(&copier, live)
        .await
        .unwrap();
    copier.flush().await;
    assert!(
        !first_copy.await.unwrap(),
        "nothing was copied before the listing ended"
    );
    let c = all_tasks_done(&path);
    assert!(c.listing_complete, "{c:?}");
    assert_eq!((summary.done, c.done, c.total), (c.total, c.total, 43));
    for k in &keys {
        assert_eq!(dest_stamps(&s, k), source_history(&s, k), "{k}");
    }
}

/// Plans the source into a new manifest at `path` with `s`.
pub(crate) async fn plan_with(server: &FakeServer, path: &Path, s: &JobSettings) {
    let mut m = Manifest::open(path, true).unwrap();
    m.store_settings(s).unwrap();
    let source = S3::alone(server.client(Side::Source), 1);
    let lister = Lister::new(s, &source, None, true);
    lister.list_into(&mut m, |_| {}).await.unwrap();
}

#[tokio::test]
async fn rules_send_each_version_to_its_destinations_with_their_options() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    s.create_bucket("dst2", true);
    let v1 = s.put(SRC, "logs/k", b"one", &[]);
    let v2 = s.put(SRC, "logs/k", b"two", &[]);
    let w = s.put(SRC, "docs/k", b"doc", &[]);
    s.set_encryption(SRC, "logs/k", &v2, crate::s3::Encryption::SseKms(None));
    let cfg = crate::rules::ReplicationConfig::from_json(
        r#"{"Rules": [
        {"ID": "logs", "Priority": 2, "Status": "Enabled", "Filter": {"Prefix": "logs/"},
         "DeleteMarkerReplication": {"Status": "Disabled"},
         "Destination": {"Bucket": "arn:aws:s3:::dst", "StorageClass": "STANDARD_IA",
           "AccessControlTranslation": {"Owner": "Destination"}, "Account": "1"}},
        {"ID": "all", "Priority": 1, "Status": "Enabled", "Filter": {},
         "DeleteMarkerReplication": {"Status": "Disabled"},
         "SourceSelectionCriteria": {"SseKmsEncryptedObjects": {"Status": "Enabled"}},
         "Destination": {"Bucket": "arn:aws:s3:::dst2",
           "EncryptionConfiguration": {"ReplicaKmsKeyID": "key-2"}}}]}"#,
    )
    .unwrap();
    let mut st = settings();
    crate::select::use_replication_config(&mut st, cfg, "test").unwrap();
    plan_with(&s, &path, &st).await;
    let m = Manifest::open(&path, false).unwrap();
    let facts = DestFacts {
        versioned: true,
        object_lock: false,
    };
    let clients = (s.client(Side::Source), s.client(Side::Dest));
    let copier = Copier::new(
        st,
        opts().sides(clients),
        facts,
        m.into_writer(),
        &opts(),
        ProgressBar::hidden(),
    );
    Arc::clone(&copier).run().await;
    copier.flush().await;
    drop(copier);

    let stamps = |bucket: &str, key: &str| -> Vec<(String, Option<String>)> {
        s.history(bucket, key)
            .iter()
            .map(|v| {
                let stamp = v.head.metadata.get(STAMP_KEY).cloned().unwrap_or_default();
                (stamp, v.head.storage_class.clone())
            })
            .collect()
    };
    // Rule "logs" leaves the SSE-KMS version out; rule "all" takes it.
    assert_eq!(
        stamps(DST, "logs/k"),
        vec![(v1.clone(), Some("STANDARD_IA".into()))]
    );
    assert!(s.history(DST, "docs/k").is_empty());
    let in_dst2: Vec<String> = stamps("dst2", "logs/k").into_iter().map(|x| x.0).collect();
    assert_eq!(in_dst2, vec![v1, v2.clone()]);
    let kms = s.history("dst2", "logs/k")[1].head.encryption.clone();
    assert_eq!(
        kms,
        Some(crate::s3::Encryption::SseKms(Some("key-2".into())))
    );
    assert_eq!(stamps("dst2", "docs/k").len(), 1);
    assert_eq!(stamps("dst2", "docs/k")[0].0, w);
    let c = all_tasks_done(&path);
    assert_eq!((c.total, c.done, c.skipped), (5, 4, 1), "{c:?}");
    // Skipped by its rule, which the reason names; no S3 error code is made up for it.
    let p = Manifest::open(&path, false).unwrap().problems(10).unwrap();
    let skipped: Vec<_> = p
        .iter()
        .map(|p| {
            (
                p.version_id.as_str(),
                p.state.as_str(),
                p.error_code.as_deref(),
                p.message.as_deref(),
            )
        })
        .collect();
    let why =
        "not replicated: SSE-KMS object, and rule logs does not enable SseKmsEncryptedObjects";
    assert_eq!(skipped, vec![(v2.as_str(), "skipped", None, Some(why))]);
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
    plan_with(&s, &path, &one_request_settings()).await;
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
    plan_with(&s, &path, &one_request_settings()).await;
    let (summary, _) = run(&s, &path, opts()).await;
    assert_eq!((summary.done, summary.reconciled), (2, 1));
    assert_eq!(
        bodies_and_metadata(&s, DST, "k"),
        bodies_and_metadata(&s, SRC, "k"),
        "one copy of {v1} and of {v2}, in order"
    );
    assert_eq!(recorded_ids(&path, "k"), dest_ids(&s, "k"));
}

#[tokio::test]
async fn without_stamp_a_killed_runs_copy_is_adopted_and_the_rest_copied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    s.put(SRC, "k", b"same", &[("n", "1")]);
    s.put(SRC, "k", b"same", &[("n", "2")]);
    plan_with(&s, &path, &one_request_settings()).await;
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
    plan_with(&s, &path, &one_request_settings()).await;
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
    let v = s.put(SRC, "k", &body, &[]);
    // An ETag that is not an MD5 (SSE-KMS, say): the bytes are held to be hashed, so the
    // budget bounds them. (A single-part MD5 source is passed through, see below.)
    s.set_etag(SRC, "k", &v, "\"kms-encrypted-etag\"");
    let mut job = settings();
    job.copy.mode = CopyMode::Stream;
    job.copy.part_size = 16 * 1024 * 1024;
    plan_with(&s, &path, &job).await;
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
async fn a_single_part_source_larger_than_the_memory_budget_is_passed_through_with_its_etag() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    let body: Vec<u8> = (0..20 * 1024 * 1024u32).map(|i| (i % 241) as u8).collect();
    s.put(SRC, "k", &body, &[]);
    let mut job = settings();
    job.copy.mode = CopyMode::Stream;
    plan_with(&s, &path, &job).await;
    // 8 MiB for bodies, less than the 20 MiB source: it is not held, so not cut in parts.
    let o = RunOptions {
        max_memory: 56 * 1024 * 1024,
        ..opts()
    };
    let (summary, _) = run(&s, &path, o).await;
    assert_eq!(summary.done, 1);
    let copied = &s.history(DST, "k")[0];
    assert_eq!(copied.body.as_ref(), &body[..]);
    assert_eq!(
        copied.etag,
        s.history(SRC, "k")[0].etag,
        "one PutObject: ETag kept"
    );
    assert_eq!(requests_of(&path, "PutObject"), 1);
    assert_eq!(requests_of(&path, "UploadPart"), 0);
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

/// Every task's recorded destination version id, by key, oldest first.
fn recorded_ids(path: &Path, key: &str) -> Vec<Option<String>> {
    Manifest::open(path, false)
        .unwrap()
        .tasks_of_key(key)
        .unwrap()
        .into_iter()
        .map(|t| t.dest_version_id)
        .collect()
}

fn dest_ids(server: &FakeServer, key: &str) -> Vec<Option<String>> {
    server
        .history(DST, key)
        .into_iter()
        .map(|v| Some(v.id))
        .collect()
}

#[tokio::test]
async fn version_ids_a_copy_answer_leaves_out_are_learned_from_listings_not_heads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    // More keys than one batch: one batch is learned during the run, the rest at its end.
    let keys: Vec<String> = (0..1100).map(|i| format!("data/{i:05}")).collect();
    for k in &keys {
        s.put(SRC, k, k.as_bytes(), &[]);
    }
    for body in [&b"one"[..], b"two!", b"three"] {
        s.put(SRC, "multi", body, &[]);
    }
    s.put(SRC, "marked", b"gone", &[]);
    s.delete(SRC, "marked");
    s.omit_copy_version_ids(true);
    plan_with(&s, &path, &one_request_settings()).await;
    let (summary, _) = run(&s, &path, opts()).await;
    assert_eq!(summary.done, 1100 + 3 + 2);
    for k in keys.iter().chain([&"multi".to_string()]) {
        assert_eq!(
            bodies_and_metadata(&s, DST, k),
            bodies_and_metadata(&s, SRC, k),
            "{k}"
        );
        assert_eq!(recorded_ids(&path, k), dest_ids(&s, k), "{k}: recorded ids");
    }
    assert_eq!(recorded_ids(&path, "marked"), dest_ids(&s, "marked"));
    // A HEAD only for versions with a later version of their key after them ("multi"'s
    // first two, "marked"'s version); the last versions are learned by a few listings.
    assert_eq!(requests_of(&path, "HeadObject"), 3);
    let listings = requests_of(&path, "ListObjectVersions");
    assert!(listings <= 6, "{listings} listings for 1,102 ids");
    let m = Manifest::open(&path, false).unwrap();
    assert!(
        m.versions_to_learn().unwrap().is_empty(),
        "nothing left to learn"
    );
}

#[tokio::test]
async fn a_version_id_left_to_learn_by_a_stopped_run_is_learned_before_the_key_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    s.put(SRC, "k", b"first", &[]);
    s.put(SRC, "k", b"second", &[]);
    s.put(SRC, "j", b"alone", &[]);
    s.omit_copy_version_ids(true);
    plan_with(&s, &path, &one_request_settings()).await;
    // A stopped run copied k's first version and j, and had not learned their ids yet.
    let (k, j) = (tasks(&path), Manifest::open(&path, false).unwrap());
    let j = j.tasks_of_key("j").unwrap();
    s.put(DST, "k", b"first", &[]);
    s.put(DST, "j", b"alone", &[]);
    let w = Manifest::open(&path, false).unwrap().into_writer();
    for id in [k[0].id, j[0].id] {
        w.send(Update::Finished {
            id,
            outcome: crate::manifest::Copied::single(None, crate::manifest::CopyMethod::Copy)
                .into_outcome(true),
        })
        .unwrap();
    }
    w.close();
    let left = Manifest::open(&path, false)
        .unwrap()
        .versions_to_learn()
        .unwrap();
    assert_eq!(left.len(), 2);

    let copier = copier(&s, &path, &opts());
    copier.learn_leftovers(left);
    let summary = Arc::clone(&copier).run().await;
    copier.flush().await;
    drop(copier);
    assert_eq!(summary.done, 1);
    assert_eq!(
        bodies_and_metadata(&s, DST, "k"),
        bodies_and_metadata(&s, SRC, "k")
    );
    assert_eq!(recorded_ids(&path, "k"), dest_ids(&s, "k"));
    assert_eq!(recorded_ids(&path, "j"), dest_ids(&s, "j"));
    let m = Manifest::open(&path, false).unwrap();
    assert!(m.versions_to_learn().unwrap().is_empty());
}

#[path = "tests_reads.rs"]
mod reads;
/// Options of a run with `--restore-archived 7 --restore-tier Bulk`.
fn restoring() -> RunOptions {
    RunOptions {
        restore: Some(super::RestoreAsk {
            days: 7,
            tier: "Bulk".into(),
        }),
        ..opts()
    }
}

#[tokio::test]
async fn restore_archived_asks_once_holds_the_key_and_copies_once_restored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    let v1 = s.put(SRC, "k", b"old", &[]);
    let v2 = s.put(SRC, "k", b"new", &[]);
    s.set_storage_class(SRC, "k", &v1, "GLACIER");
    plan(&s, &path).await;

    let (first, _) = run(&s, &path, restoring()).await;
    assert_eq!(
        (first.done, first.skipped, first.restores_pending),
        (0, 0, 1)
    );
    let asked = s.restores();
    assert_eq!(asked.len(), 1);
    assert_eq!(
        (
            asked[0].version_id.as_deref(),
            asked[0].days,
            asked[0].tier.as_str()
        ),
        (Some(v1.as_str()), 7, "Bulk")
    );
    assert!(
        s.history(DST, "k").is_empty(),
        "the newer version waits: copying it first would put the history out of order"
    );
    let c = all_tasks_done(&path);
    assert_eq!(
        (c.pending, c.restore_pending, c.skipped, c.archived),
        (2, 1, 0, 0)
    );
    assert_eq!(c.requests.get("RestoreObject"), Some(&1));

    // A later run without the flag: the restore is still under way; nothing is asked again.
    let (second, _) = run(&s, &path, opts()).await;
    assert_eq!((second.done, second.restores_pending), (0, 1));
    assert_eq!(s.restores().len(), 1);
    assert!(s.history(DST, "k").is_empty());

    // With the flag again while in progress: RestoreAlreadyInProgress, still one restore.
    let (third, _) = run(&s, &path, restoring()).await;
    assert_eq!((third.done, third.restores_pending), (0, 1));
    assert_eq!(s.restores().len(), 1);

    s.finish_restore(SRC, "k", &v1);
    let (last, _) = run(&s, &path, opts()).await;
    assert_eq!((last.done, last.restores_pending), (2, 0));
    assert_eq!(dest_stamps(&s, "k"), [v1, v2]);
    let c = all_tasks_done(&path);
    assert_eq!((c.done, c.pending, c.restore_pending), (2, 0, 0));
}

#[tokio::test]
async fn retry_skipped_copies_an_archived_newest_version_once_restored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    let v1 = s.put(SRC, "k", b"old", &[]);
    let v2 = s.put(SRC, "k", b"new", &[]);
    s.put(SRC, "g", b"gone", &[]);
    s.set_storage_class(SRC, "k", &v2, "GLACIER");
    plan(&s, &path).await;
    // A version deleted after the listing: skipped for good.
    for op in ["HeadObject", "CopyObject"] {
        let gone = FaultKind::Before(ErrorClass::SourceGone, 404);
        s.fail(op, Some("g"), 100, gone);
    }
    let (first, _) = run(&s, &path, opts()).await;
    assert_eq!((first.done, first.skipped), (1, 2));
    assert_eq!(
        dest_stamps(&s, "k").first(),
        Some(&v1),
        "only the older version: the destination's current version is not the source's"
    );
    assert_eq!(dest_stamps(&s, "k").len(), 1);
    assert_eq!(all_tasks_done(&path).archived, 1);

    s.finish_restore(SRC, "k", &v2);
    let m = Manifest::open(&path, false).unwrap();
    assert_eq!(
        m.retry_skipped().unwrap(),
        (1, 0),
        "the gone version stays skipped"
    );
    drop(m);
    let (second, _) = run(&s, &path, opts()).await;
    assert_eq!((second.done, second.skipped), (1, 0));
    assert_eq!(dest_stamps(&s, "k"), [v1, v2]);
    let c = all_tasks_done(&path);
    assert_eq!((c.done, c.skipped, c.archived, c.pending), (2, 1, 0, 0));
}

#[tokio::test]
async fn retry_skipped_leaves_an_archived_version_restored_after_newer_ones_were_copied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    let v1 = s.put(SRC, "k", b"old", &[]);
    let v2 = s.put(SRC, "k", b"new", &[]);
    s.set_storage_class(SRC, "k", &v1, "GLACIER");
    plan(&s, &path).await;
    let (first, _) = run(&s, &path, opts()).await;
    assert_eq!((first.done, first.skipped), (1, 1));
    assert_eq!(dest_stamps(&s, "k"), std::slice::from_ref(&v2));
    assert_eq!(all_tasks_done(&path).archived, 1);

    s.finish_restore(SRC, "k", &v1);
    let m = Manifest::open(&path, false).unwrap();
    assert_eq!(
        m.retry_skipped().unwrap(),
        (0, 1),
        "kept: it would go over v2"
    );
    let mut why = Vec::new();
    m.for_each_problem(|p| {
        why.push((p.version_id, p.error_code, p.message));
        Ok(())
    })
    .unwrap();
    drop(m);
    assert_eq!(why.len(), 1);
    assert_eq!(why[0].0, v1);
    assert_eq!(why[0].1.as_deref(), Some("OutOfOrder"));
    let (second, _) = run(&s, &path, opts()).await;
    assert_eq!(second.done, 0);
    assert_eq!(
        dest_stamps(&s, "k"),
        [v2],
        "the destination's current version stays v2"
    );
    let c = all_tasks_done(&path);
    assert_eq!((c.done, c.skipped, c.archived, c.pending), (1, 1, 0, 0));
}

#[tokio::test]
async fn an_unstamped_attempt_is_reconciled_unstamped_after_the_stamp_is_turned_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    s.put(SRC, "k", b"same", &[("n", "1")]);
    plan_with(&s, &path, &one_request_settings()).await;
    // A run with --no-stamp was killed after its copy of k (nothing recorded).
    let t = tasks(&path);
    let w = Manifest::open(&path, false).unwrap().into_writer();
    w.record_attempt_mode(false);
    let started = Update::Started {
        id: t[0].id,
        at: super::now_secs(),
    };
    w.send_durable(started).await.unwrap();
    w.close();
    s.put(DST, "k", b"same", &[("n", "1")]);
    assert_eq!(tasks(&path)[0].attempt_stamped, Some(false));
    // The stamp is turned back on (`--change-copy-settings`).
    let m = Manifest::open(&path, false).unwrap();
    let mut stamped = m.settings().unwrap().unwrap();
    stamped.copy.stamp = true;
    m.store_settings(&stamped).unwrap();
    drop(m);
    let (summary, _) = run(&s, &path, opts()).await;
    assert_eq!((summary.done, summary.reconciled), (1, 1));
    assert_eq!(
        s.history(DST, "k").len(),
        1,
        "the unstamped copy is adopted, not written twice"
    );
}

#[tokio::test]
async fn each_attempt_records_the_mode_it_writes_with() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    s.put(SRC, "k", b"1", &[]);
    plan(&s, &path).await;
    run(&s, &path, opts()).await;
    assert_eq!(tasks(&path)[0].attempt_stamped, Some(true));
    let dir2 = tempfile::tempdir().unwrap();
    let path2 = dir2.path().join("job.db");
    plan_with(&s, &path2, &one_request_settings()).await;
    run(&s, &path2, opts()).await;
    assert_eq!(tasks(&path2)[0].attempt_stamped, Some(false));
}

/// A job with two destination buckets (`destinations` 0: DST, 1: `second`), every source
/// version planned for both, the listing complete.
async fn plan_two_destinations(server: &FakeServer, path: &Path, second: &str) {
    use crate::config::{DestOptions, Destination};
    let mut s = settings();
    s.destinations = [DST, second]
        .iter()
        .map(|b| Destination {
            bucket: b.to_string(),
            prefix: String::new(),
            options: DestOptions {
                rule: format!("to-{b}"),
                delete_markers: true,
                ..DestOptions::default()
            },
        })
        .collect();
    let mut m = Manifest::open(path, true).unwrap();
    m.store_settings(&s).unwrap();
    let from = ListFrom {
        bucket: SRC.into(),
        max_keys: 1000,
        ..ListFrom::default()
    };
    let page = server
        .client(Side::Source)
        .list_versions(&from)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    let mut pos = 0;
    let mut last: Option<String> = None;
    for e in page.entries {
        if last.as_deref() != Some(e.key.as_str()) {
            pos = 0;
            last = Some(e.key.clone());
        }
        for dest in [0, 1] {
            tasks.push(NewTask {
                entry: e.clone(),
                history_pos: pos,
                dest,
            });
        }
        pos += 1;
    }
    let done = Listing {
        complete: true,
        ..Listing::default()
    };
    m.insert_page(&tasks, &done).unwrap();
}

#[tokio::test]
async fn lock_settings_go_to_the_locked_destination_bucket_only() {
    use super::{DestFacts, DestinationFacts};
    use crate::s3::ObjectLock;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    s.create_bucket("locked", true);
    let v1 = s.put(SRC, "k", b"held", &[]);
    let lock = ObjectLock {
        mode: Some("GOVERNANCE".into()),
        retain_until: Some(super::now_secs() + 86_400),
        legal_hold: true,
    };
    s.set_version_lock(SRC, "k", &v1, lock.clone());
    plan_two_destinations(&s, &path, "locked").await;
    // Destination 0 (DST) has no object lock; the second bucket has.
    let unlocked = DestFacts {
        versioned: true,
        object_lock: false,
    };
    let mut facts = DestinationFacts::from(unlocked);
    facts.buckets.insert(
        "locked".into(),
        DestFacts {
            versioned: true,
            object_lock: true,
        },
    );
    let m = Manifest::open(&path, false).unwrap();
    let stored = m.settings().unwrap().unwrap();
    let clients = (s.client(Side::Source), s.client(Side::Dest));
    let c = Copier::new(
        stored,
        opts().sides(clients),
        facts,
        m.into_writer(),
        &opts(),
        ProgressBar::hidden(),
    );
    let summary = Arc::clone(&c).run().await;
    c.flush().await;
    drop(c);
    assert_eq!((summary.done, summary.failed), (2, 0), "{summary:?}");
    let at = |b: &str| s.history(b, "k")[0].head.lock.clone();
    assert_eq!(
        at("locked"),
        lock,
        "retention and legal hold kept where the bucket has object lock"
    );
    assert_eq!(
        at(DST),
        ObjectLock::default(),
        "none sent to a bucket without object lock"
    );
}
