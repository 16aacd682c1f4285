//! AWS-shaped report tests: golden files, file rolling, scope, the failure-reason mapping
//! (from the side and operation a manifest records, and from an older row's message), and
//! the round trip failed-tasks report → CSV manifest reader.

use std::collections::BTreeSet;

use super::*;
use crate::inputs::csv_manifest::{CsvManifest, ManifestRow};

macro_rules! golden {
    ($name:literal) => {
        include_str!(concat!("../../tests/fixtures/aws_report/", $name))
    };
}

fn spec(scope: ReportScope) -> ReportSpec {
    ReportSpec {
        job_id: "golden".into(),
        scope,
        created: time::macros::datetime!(2024-05-01 12:34:56.789 UTC),
        bucket: "report-bucket".into(),
        prefix: "reports/".into(),
        rows_per_file: DEFAULT_ROWS_PER_FILE,
    }
}

fn ok(key: &str, version: Option<&str>) -> ReportRow {
    ReportRow {
        bucket: "src-bucket".into(),
        key: key.into(),
        version_id: version.map(String::from),
        task_status: TaskStatus::Succeeded,
        error_code: None,
        http_status: None,
        message: String::new(),
    }
}

fn failed(key: &str, version: &str, facts: FailureFacts<'_>) -> ReportRow {
    ReportRow {
        bucket: "src-bucket".into(),
        key: key.into(),
        version_id: Some(version.into()),
        task_status: TaskStatus::Failed,
        error_code: Some(error_code(&facts)),
        http_status: facts.status,
        message: facts.message.into(),
    }
}

fn rows() -> Vec<ReportRow> {
    vec![
        ok("photos/a b+c.jpg", Some("v1")),
        failed(
            "100% done,\"q\".txt",
            "v2",
            FailureFacts::from_stored(
                Some("fatal"),
                Some("AccessDenied"),
                Some(403),
                "dest: PutObject failed (AccessDenied, HTTP 403): Access \"denied\", sorry",
            ),
        ),
        ok("pre-versioning", None),
        failed(
            "ünï/日本",
            "v3",
            FailureFacts::from_stored(
                Some("source-gone"),
                Some("NoSuchVersion"),
                Some(404),
                "source: GetObject failed (NoSuchVersion, HTTP 404)",
            ),
        ),
        failed(
            "retry/me",
            "v4",
            FailureFacts::from_stored(
                Some("retryable"),
                None,
                None,
                "dest: CopyObject failed: reset",
            ),
        ),
    ]
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn report_matches_the_golden_files() {
    let dir = tempfile::tempdir().unwrap();
    let written = write_aws_report(dir.path(), &spec(ReportScope::All), rows()).unwrap();
    let job = dir.path().join("job-golden");
    assert_eq!(written.dir, job);
    assert_eq!((written.succeeded, written.failed), (2, 3));
    assert_eq!(
        read(&job.join("manifest.json")),
        golden!("job-golden/manifest.json")
    );
    assert_eq!(
        read(&job.join("results/1.csv")),
        golden!("job-golden/results/1.csv")
    );
    assert_eq!(
        read(&job.join("results/2.csv")),
        golden!("job-golden/results/2.csv")
    );
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec!["job-golden".to_string()],
        "no partial directory left"
    );
}

#[test]
fn manifest_checksums_are_the_md5_of_each_results_file() {
    let dir = tempfile::tempdir().unwrap();
    let written = write_aws_report(dir.path(), &spec(ReportScope::All), rows()).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_str(&read(&written.dir.join("manifest.json"))).unwrap();
    let results = manifest["Results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for r in results {
        let key = r["Key"].as_str().unwrap();
        let local = key.strip_prefix("reports/").unwrap();
        let bytes = std::fs::read(dir.path().join(local)).unwrap();
        assert_eq!(
            r["MD5Checksum"].as_str().unwrap(),
            hex::encode(Md5::digest(&bytes))
        );
        assert_eq!(r["Bucket"], "report-bucket");
    }
}

#[test]
fn failed_scope_lists_failed_tasks_only_and_files_roll_over() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(ReportScope::Failed);
    s.rows_per_file = 2;
    let written = write_aws_report(dir.path(), &s, rows()).unwrap();
    assert_eq!((written.succeeded, written.failed), (0, 3));
    let keys: Vec<(&str, &str)> = written
        .files
        .iter()
        .map(|f| (f.status, f.key.as_str()))
        .collect();
    assert_eq!(
        keys,
        vec![
            ("failed", "reports/job-golden/results/1.csv"),
            ("failed", "reports/job-golden/results/2.csv"),
        ]
    );
    assert_eq!(read(&written.dir.join("results/2.csv")).lines().count(), 1);
}

#[test]
fn a_failed_tasks_report_reads_back_as_a_csv_manifest_with_the_same_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let mut all = rows();
    for key in [
        "line\nbreak",
        "tab\there",
        "+plus+",
        "%41",
        "a/b/../c",
        " lead space ",
    ] {
        all.push(failed(
            key,
            "vX",
            FailureFacts::from_stored(Some("fatal"), Some("SlowDown"), Some(503), "x"),
        ));
    }
    let expected: BTreeSet<ManifestRow> = all
        .iter()
        .filter(|r| r.task_status == TaskStatus::Failed)
        .map(|r| ManifestRow {
            bucket: r.bucket.clone(),
            key: r.key.clone(),
            version_id: r.version_id.clone(),
        })
        .collect();
    let mut s = spec(ReportScope::Failed);
    s.rows_per_file = 4;
    let written = write_aws_report(dir.path(), &s, all).unwrap();
    let mut read_back = BTreeSet::new();
    for f in &written.files {
        let path = dir.path().join(f.key.strip_prefix("reports/").unwrap());
        // The reader takes the first three columns of each row; the report has seven.
        for row in CsvManifest::open(&first_three_columns(&path)).unwrap() {
            read_back.insert(row.unwrap());
        }
    }
    assert_eq!(read_back, expected);
}

/// Batch Operations reads `Bucket,Key,VersionId` from a report's rows: keep those columns.
fn first_three_columns(path: &Path) -> PathBuf {
    let out = path.with_extension("manifest.csv");
    let mut r = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_path(path)
        .unwrap();
    let mut w = csv::WriterBuilder::new().from_path(&out).unwrap();
    for rec in r.records() {
        let rec = rec.unwrap();
        w.write_record(rec.iter().take(3)).unwrap();
    }
    w.flush().unwrap();
    out
}

#[test]
fn an_earlier_report_is_replaced_but_a_foreign_directory_is_not() {
    let dir = tempfile::tempdir().unwrap();
    write_aws_report(dir.path(), &spec(ReportScope::All), rows()).unwrap();
    let again = write_aws_report(dir.path(), &spec(ReportScope::Failed), rows()).unwrap();
    assert_eq!(again.files.len(), 1);
    assert!(
        !again.dir.join("results/2.csv").exists(),
        "old files are gone"
    );

    let other = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(other.path().join("job-golden")).unwrap();
    std::fs::write(other.path().join("job-golden/keep.txt"), "mine").unwrap();
    let err = write_aws_report(other.path(), &spec(ReportScope::All), rows()).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("job-golden: exists and is not an AWS-shaped report; not replacing it"),
        "{err}"
    );
    assert_eq!(read(&other.path().join("job-golden/keep.txt")), "mine");
}

fn reason(
    op: &str,
    side: Option<Side>,
    class: &str,
    code: Option<&str>,
    status: Option<u16>,
) -> String {
    error_code(&FailureFacts {
        side,
        op: Some(op),
        class: Some(class),
        code,
        status,
        message: "",
    })
}

/// op, side, class, code, status, expected error code.
type Case<'a> = (
    &'a str,
    Option<Side>,
    &'a str,
    Option<&'a str>,
    Option<u16>,
    &'a str,
);

use Side::{Dest, Source};

const CASES: &[Case<'static>] = &[
    (
        "GetObject",
        Some(Source),
        "source-gone",
        Some("NoSuchVersion"),
        Some(404),
        "SrcVersionNotFound",
    ),
    (
        "HeadObject",
        Some(Source),
        "source-gone",
        None,
        Some(404),
        "SrcVersionNotFound",
    ),
    (
        "CopyObject",
        Some(Dest),
        "source-gone",
        Some("NoSuchKey"),
        Some(404),
        "SrcKeyNotFound",
    ),
    (
        "GetObject",
        Some(Source),
        "fatal",
        Some("AccessDenied"),
        Some(403),
        "SrcGetObjectNotPermitted",
    ),
    (
        "HeadObject",
        Some(Source),
        "fatal",
        None,
        Some(403),
        "SrcHeadObjectNotPermitted",
    ),
    (
        "GetObjectTagging",
        None,
        "fatal",
        Some("AccessDenied"),
        Some(403),
        "SrcGetTaggingNotPermitted",
    ),
    (
        "PutObject",
        Some(Dest),
        "fatal",
        Some("AccessDenied"),
        Some(403),
        "DstPutObjectNotPermitted",
    ),
    (
        "CreateMultipartUpload",
        None,
        "fatal",
        Some("AccessDenied"),
        Some(403),
        "DstMultipartInitNotPermitted",
    ),
    (
        "UploadPart",
        None,
        "fatal",
        Some("AccessDenied"),
        Some(403),
        "DstMultipartPartUploadNotPermitted",
    ),
    (
        "CompleteMultipartUpload",
        None,
        "fatal",
        Some("AccessDenied"),
        Some(403),
        "DstMultipartCompleteNotPermitted",
    ),
    (
        "DeleteObject",
        Some(Dest),
        "fatal",
        Some("AccessDenied"),
        Some(403),
        "DstDelObjNotPermitted",
    ),
    (
        "PutObject",
        Some(Dest),
        "fatal",
        Some("NoSuchBucket"),
        Some(404),
        "DstBucketNotFound",
    ),
    (
        "PutObject",
        Some(Dest),
        "fatal",
        Some("KMS.NotFoundException"),
        Some(400),
        "DstKmsKeyNotFound",
    ),
    (
        "GetObject",
        Some(Source),
        "fatal",
        Some("KMS.DisabledException"),
        Some(400),
        "SrcKmsKeyInvalidState",
    ),
    // No reason fits: the S3 code, else the class.
    (
        "CopyObject",
        Some(Dest),
        "fatal",
        Some("AccessDenied"),
        Some(403),
        "AccessDenied",
    ),
    (
        "CopyObject",
        Some(Dest),
        "fatal",
        Some("NoSuchBucket"),
        Some(404),
        "NoSuchBucket",
    ),
    (
        "GetObject",
        Some(Source),
        "fatal",
        Some("NoSuchBucket"),
        Some(404),
        "NoSuchBucket",
    ),
    ("HeadObject", Some(Dest), "fatal", None, Some(403), "fatal"),
    (
        "PutObject",
        Some(Dest),
        "throttled",
        Some("SlowDown"),
        Some(503),
        "SlowDown",
    ),
    (
        "UploadPartCopy",
        Some(Dest),
        "retryable",
        None,
        None,
        "retryable",
    ),
];

#[test]
fn failures_map_to_s3_replication_failure_reasons_where_one_fits() {
    for (op, side, class, code, status, expected) in CASES {
        assert_eq!(
            reason(op, *side, class, *code, *status),
            *expected,
            "{op} {side:?} {class} {code:?}"
        );
    }
    let lock = FailureFacts {
        message: "Bucket is missing Object Lock Configuration",
        ..FailureFacts::from_stored(Some("fatal"), Some("InvalidRequest"), Some(400), "")
    };
    let lock = FailureFacts {
        side: Some(Dest),
        op: Some("PutObject"),
        ..lock
    };
    assert_eq!(error_code(&lock), "DstBucketObjectLockConfigMissing");
    assert_eq!(error_code(&FailureFacts::default()), "InternalError");
}

#[test]
fn side_and_op_come_from_the_stored_message() {
    assert_eq!(
        side_and_op("dest: PutObject failed (AccessDenied, HTTP 403): x"),
        (Some(Side::Dest), Some("PutObject"))
    );
    assert_eq!(
        side_and_op("source: GetObject failed: reset"),
        (Some(Side::Source), Some("GetObject"))
    );
    assert_eq!(side_and_op("integrity: etag mismatch"), (None, None));
}

/// A manifest with two failed tasks: `put` (a destination PutObject denied) and `old` (a
/// source GetObject denied), recorded by the writer as a run records them.
fn manifest_with_two_failures(dir: &Path) -> (PathBuf, crate::config::JobSettings, Vec<i64>) {
    use crate::manifest::{Manifest, NewTask, Outcome, Update};
    use crate::s3::{S3Error, VersionEntry};

    let settings = crate::manifest::tests::settings();
    let path = dir.join("job.db");
    let mut m = Manifest::open(&path, true).unwrap();
    m.store_settings(&settings).unwrap();
    let task = |key: &str| NewTask {
        entry: VersionEntry {
            key: key.into(),
            version_id: format!("{key}-v1"),
            is_latest: true,
            size: 1,
            ..VersionEntry::default()
        },
        history_pos: 0,
        dest: 0,
    };
    let listed = crate::manifest::Listing::default();
    m.insert_page(&[task("old"), task("put")], &listed).unwrap();
    let groups = m.next_key_groups(0, 10).unwrap();
    let ids: Vec<i64> = groups.iter().map(|g| g.tasks[0].id).collect();
    let denied = |side, op| S3Error {
        side,
        op,
        class: ErrorClass::Fatal,
        code: Some("AccessDenied".into()),
        status: Some(403),
        message: "denied".into(),
        bucket_region: None,
    };
    let w = m.into_writer();
    for (id, error) in ids.iter().zip([
        denied(Side::Source, "GetObject"),
        denied(Side::Dest, "PutObject"),
    ]) {
        let outcome = Outcome::Failed { error, retries: 0 };
        w.send(Update::Finished { id: *id, outcome }).unwrap();
    }
    w.close();
    (path, settings, ids)
}

/// The AWS-shaped report of a manifest maps a failure from the side and operation recorded
/// with it, not from its message: the row of `put` keeps S3 replication's reason after its
/// message is reworded. A row recorded before the manifest kept them (both NULL, as a
/// migrated v2 row) is still mapped from its message.
#[test]
fn report_rows_come_from_the_recorded_side_and_operation() {
    let dir = tempfile::tempdir().unwrap();
    let (path, settings, ids) = manifest_with_two_failures(dir.path());
    let db = rusqlite::Connection::open(&path).unwrap();
    db.execute(
        "UPDATE errors SET message = 'the destination refused the write' WHERE task = ?1",
        [ids[1]],
    )
    .unwrap();
    db.execute(
        "UPDATE errors SET side = NULL, op = NULL WHERE task = ?1",
        [ids[0]],
    )
    .unwrap();
    drop(db);

    let m = crate::manifest::Manifest::open(&path, false).unwrap();
    let out = dir.path().join("reports");
    std::fs::create_dir(&out).unwrap();
    let written =
        crate::report::write_aws(&m, &settings, &out, &spec(ReportScope::Failed)).unwrap();
    assert_eq!((written.succeeded, written.failed), (0, 2));
    let csv = read(&written.dir.join("results/1.csv"));
    assert_eq!(
        csv.lines().collect::<Vec<_>>(),
        [
            "src,old,old-v1,failed,403,SrcGetObjectNotPermitted,\
             \"source: GetObject failed (AccessDenied, HTTP 403): denied\"",
            "src,put,put-v1,failed,403,DstPutObjectNotPermitted,\
             the destination refused the write",
        ]
    );
}
