//! In-process tests of how a copy reads its source version while the source changes (issue
//! 17 item 2: `null` versions), keeps tags (item 9) and the website redirect (item 7).

use super::*;
use crate::manifest::Problem;
use crate::s3::BucketFacts;

const MIB: usize = 1024 * 1024;

/// One run that knows the source bucket's versioning as the job's probe would.
async fn run_probed(server: &FakeServer, path: &Path) -> RunSummary {
    let copier = copier(server, path, &opts());
    let facts: BucketFacts = server.client(Side::Source).probe_bucket(SRC).await.unwrap();
    copier.set_source_facts(&facts);
    let summary = Arc::clone(&copier).run().await;
    copier.flush().await;
    summary
}

fn bodies(server: &FakeServer, key: &str) -> Vec<Vec<u8>> {
    server
        .history(DST, key)
        .iter()
        .filter(|v| !v.delete_marker)
        .map(|v| v.body.to_vec())
        .collect()
}

fn problems(path: &Path) -> Vec<Problem> {
    Manifest::open(path, false).unwrap().problems(100).unwrap()
}

/// A source bucket whose key `k` has a `null` version written before versioning was
/// enabled.
fn null_before_versioning(body: &[u8]) -> FakeServer {
    let s = FakeServer::new();
    s.create_bucket(SRC, false);
    s.create_bucket(DST, true);
    s.put(SRC, "k", body, &[]);
    s.set_versioning(SRC, "Enabled");
    s
}

#[tokio::test]
async fn a_null_version_overwritten_after_the_plan_is_copied_with_its_own_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = null_before_versioning(b"the null version");
    plan(&s, &path).await;
    // After the plan: a new version of the key (not in this job).
    s.put(SRC, "k", b"written after the plan", &[]);
    let summary = run_probed(&s, &path).await;
    assert_eq!((summary.done, summary.failed), (1, 0));
    assert_eq!(bodies(&s, "k"), [b"the null version".to_vec()]);
}

#[tokio::test]
async fn a_null_version_behind_a_delete_marker_is_still_copied_not_skipped_as_gone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = null_before_versioning(b"the null version");
    plan(&s, &path).await;
    s.delete(SRC, "k");
    let summary = run_probed(&s, &path).await;
    assert_eq!((summary.done, summary.skipped), (1, 0));
    assert_eq!(bodies(&s, "k"), [b"the null version".to_vec()]);
}

/// Plans an unversioned source, overwrites its object, runs: a named failure, nothing
/// written at the destination.
async fn unversioned_overwrite_fails(job: JobSettings) {
    overwrite_fails(job, Overwritten::AfterPlan).await;
}

/// When the source object is replaced.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Overwritten {
    /// Between the plan and the run.
    AfterPlan,
    /// Just before the CopyObject (after any HEAD), on a server that ignores the copy's
    /// ETag precondition.
    BeforeCopyIgnored,
    /// The same, and the copy's answer does not name the version it wrote (RGW).
    BeforeCopyIgnoredUnnamed,
}

async fn overwrite_fails(job: JobSettings, when: Overwritten) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = FakeServer::new();
    s.create_bucket(SRC, false);
    s.create_bucket(DST, true);
    s.put(SRC, "k", b"listed bytes", &[]);
    plan_with(&s, &path, &job).await;
    let new: &[u8] = b"bytes written after the plan";
    match when {
        Overwritten::AfterPlan => {
            s.put(SRC, "k", new, &[]);
        }
        Overwritten::BeforeCopyIgnored | Overwritten::BeforeCopyIgnoredUnnamed => {
            s.ignore_copy_source_if_match(true);
            s.omit_copy_version_ids(when == Overwritten::BeforeCopyIgnoredUnnamed);
            s.overwrite_before("CopyObject", 0, SRC, "k", Some(new));
        }
    }
    let summary = run_probed(&s, &path).await;
    assert_eq!((summary.done, summary.failed), (0, 1));
    assert!(bodies(&s, "k").is_empty(), "nothing copied in its place");
    let p = problems(&path);
    assert_eq!(p[0].error_code.as_deref(), Some("SourceChanged"));
    let msg = p[0].message.clone().unwrap_or_default();
    assert!(
        msg.contains("changed since it was listed") && msg.contains("plan --refresh"),
        "{msg}"
    );
}

/// moto and RGW copy whatever the key holds: the copy's ETag gives it away, and the
/// version written is taken back.
#[tokio::test]
async fn an_overwrite_just_before_the_copy_is_caught_where_the_server_ignores_the_precondition() {
    overwrite_fails(settings(), Overwritten::BeforeCopyIgnored).await;
    overwrite_fails(one_request_settings(), Overwritten::BeforeCopyIgnored).await;
}

/// The same where the copy's answer does not name the version it wrote (RGW): the version
/// is learned then, and taken back all the same.
#[tokio::test]
async fn an_overwrite_before_a_copy_whose_answer_names_no_version_is_taken_back() {
    overwrite_fails(settings(), Overwritten::BeforeCopyIgnoredUnnamed).await;
    overwrite_fails(
        one_request_settings(),
        Overwritten::BeforeCopyIgnoredUnnamed,
    )
    .await;
}

#[tokio::test]
async fn an_unversioned_object_overwritten_after_the_plan_fails_named_with_a_head() {
    unversioned_overwrite_fails(settings()).await;
}

#[tokio::test]
async fn an_unversioned_object_overwritten_after_the_plan_fails_named_with_one_request_settings() {
    unversioned_overwrite_fails(one_request_settings()).await;
}

#[tokio::test]
async fn an_unversioned_object_overwritten_between_streamed_reads_fails_named() {
    let mut job = settings();
    job.copy.mode = CopyMode::Stream;
    unversioned_overwrite_fails(job).await;
}

#[tokio::test]
async fn an_unversioned_object_overwritten_mid_multipart_copy_is_not_spliced() {
    mid_multipart_overwrite(false).await;
}

/// moto and RGW copy parts of whatever the key holds: the HEAD before completing catches it.
#[tokio::test]
async fn a_mid_copy_overwrite_is_caught_where_the_server_ignores_the_copy_precondition() {
    mid_multipart_overwrite(true).await;
}

async fn mid_multipart_overwrite(ignore_if_match: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = FakeServer::new();
    s.create_bucket(SRC, false);
    s.create_bucket(DST, true);
    s.ignore_copy_source_if_match(ignore_if_match);
    let old = vec![b'o'; 11 * MIB];
    let v = s.put(SRC, "k", &old, &[]);
    // A multipart source (single-part ones are one CopyObject), copied in parts.
    s.set_etag(SRC, "k", &v, "\"0123456789abcdef0123456789abcdef-3\"");
    let mut job = settings();
    job.copy.multipart_threshold = 5 * MIB as u64;
    job.copy.part_size = 5 * MIB as u64;
    job.copy.large_copy = crate::config::LargeCopy::Parts;
    plan_with(&s, &path, &job).await;
    // Another writer replaces the object after the first part was copied.
    let new = vec![b'n'; 11 * MIB];
    s.overwrite_before("UploadPartCopy", 1, SRC, "k", Some(&new));
    let mut o = opts();
    o.part_concurrency = 1;
    let copier = copier(&s, &path, &o);
    copier.set_source_facts(&BucketFacts::default());
    let summary = Arc::clone(&copier).run().await;
    copier.flush().await;
    drop(copier);
    assert_eq!((summary.done, summary.failed), (0, 1));
    assert!(bodies(&s, "k").is_empty(), "no spliced object");
    assert_eq!(s.open_uploads(DST), 0, "the upload was aborted");
    assert_eq!(
        problems(&path)[0].error_code.as_deref(),
        Some("SourceChanged")
    );
}

#[tokio::test]
async fn a_suspended_source_s_null_version_overwritten_after_the_plan_fails_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = FakeServer::new();
    s.create_bucket(SRC, true);
    s.create_bucket(DST, true);
    s.set_versioning(SRC, "Suspended");
    s.put(SRC, "k", b"listed bytes", &[]);
    plan(&s, &path).await;
    s.put(SRC, "k", b"replaces the null version", &[]);
    let summary = run_probed(&s, &path).await;
    assert_eq!((summary.done, summary.failed), (0, 1));
    assert!(bodies(&s, "k").is_empty());
    assert_eq!(
        problems(&path)[0].error_code.as_deref(),
        Some("SourceChanged")
    );
}

#[tokio::test]
async fn tags_dropped_by_a_copy_whose_answer_names_the_version_are_put_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    let v = s.put(SRC, "k", b"tagged", &[]);
    s.set_tags(SRC, "k", &v, "team=a&tier=gold");
    // The copy (MetadataDirective REPLACE: the stamp) drops the tags, and its answer names
    // the new version: no HEAD of it is needed to learn its id.
    s.drop_tags_on_replace(true);
    plan(&s, &path).await;
    let summary = run_probed(&s, &path).await;
    assert_eq!(summary.done, 1);
    let h = s.history(DST, "k");
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].tags, "team=a&tier=gold");
}

#[tokio::test]
async fn an_adopted_copy_gets_the_source_tags_when_reading_the_source_head_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    let v = s.put(SRC, "k", b"tagged", &[]);
    s.set_tags(SRC, "k", &v, "team=a");
    s.drop_tags_on_replace(true);
    plan(&s, &path).await;
    // The copy's answer is lost after the server acted (adopted by reconciliation), and
    // every HEAD after that fails: the source can only be compared by its tags.
    s.fail("CopyObject", Some("k"), 1, FaultKind::LostAnswer);
    s.fail_after(
        "HeadObject",
        Some("k"),
        2,
        100,
        FaultKind::Before(ErrorClass::Fatal, 403),
    );
    let summary = run_probed(&s, &path).await;
    assert_eq!(summary.done, 1);
    assert_eq!(s.history(DST, "k")[0].tags, "team=a");
}

#[tokio::test]
async fn the_website_redirect_location_is_copied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    let s = server();
    s.put(SRC, "k", b"page", &[]);
    {
        // Seeded through the fake's own write path: a PutObject with the header.
        let c = s.client(Side::Source);
        let attrs = crate::s3::WriteAttrs {
            website_redirect: Some("/elsewhere.html".into()),
            ..Default::default()
        };
        c.put_object(
            &crate::s3::ObjectRef::key(SRC, "k"),
            bytes::Bytes::from_static(b"page 2"),
            &attrs,
        )
        .await
        .unwrap();
    }
    plan(&s, &path).await;
    run_probed(&s, &path).await;
    let h = s.history(DST, "k");
    assert_eq!(h.len(), 2);
    assert_eq!(h[0].head.website_redirect, None);
    assert_eq!(
        h[1].head.website_redirect.as_deref(),
        Some("/elsewhere.html")
    );
}
