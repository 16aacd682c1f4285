//! Filter tests: each filter alone, their combination, the HEAD step and the CLI parsers.

use super::*;

fn version(key: &str, size: u64, modified: &str, class: Option<&str>) -> VersionEntry {
    VersionEntry {
        key: key.into(),
        version_id: "v1".into(),
        size,
        last_modified: Some(modified.into()),
        storage_class: class.map(String::from),
        ..VersionEntry::default()
    }
}

fn marker(key: &str, modified: &str) -> VersionEntry {
    VersionEntry {
        key: key.into(),
        version_id: "dm".into(),
        is_delete_marker: true,
        last_modified: Some(modified.into()),
        ..VersionEntry::default()
    }
}

const NOON: &str = "2024-05-01T12:00:00.000Z";

#[test]
fn empty_filters_select_everything_without_a_head() {
    let f = Filters::default();
    assert!(f.is_empty());
    assert!(!f.needs_head());
    assert!(f.matches_listing(&version("a", 0, NOON, None)));
    assert!(f.matches_listing(&marker("a", NOON)));
    assert!(f.matches_head(&HeadFacts::default()));
}

#[test]
fn sizes_are_strict_as_in_s3() {
    let f = Filters {
        min_size: Some(100),
        max_size: Some(200),
        ..Filters::default()
    };
    let pass: Vec<u64> = [99, 100, 101, 199, 200, 201]
        .into_iter()
        .filter(|s| f.matches_listing(&version("k", *s, NOON, None)))
        .collect();
    assert_eq!(pass, vec![101, 199]);
    assert!(
        !f.matches_listing(&marker("k", NOON)),
        "a delete marker is size 0"
    );
    let only_max = Filters {
        max_size: Some(10),
        ..Filters::default()
    };
    assert!(only_max.matches_listing(&marker("k", NOON)));
}

#[test]
fn creation_dates_are_strict_and_accept_dates_or_date_times() {
    let f = Filters {
        created_after: Some(parse_instant("--created-after", "2024-05-01").unwrap()),
        created_before: Some(
            parse_instant("--created-before", "2024-05-02T00:00:00+02:00").unwrap(),
        ),
        ..Filters::default()
    };
    let at = |t: &str| f.matches_listing(&version("k", 1, t, None));
    assert!(!at("2024-05-01T00:00:00.000Z"), "midnight is not after");
    assert!(at("2024-05-01T00:00:00.001Z"));
    assert!(at("2024-05-01T21:59:59.999Z"));
    assert!(
        !at("2024-05-01T22:00:00.000Z"),
        "the +02:00 offset is honoured"
    );
    assert!(!at("garbage"), "an unreadable date is not in range");
    let mut no_date = version("k", 1, NOON, None);
    no_date.last_modified = None;
    assert!(!f.matches_listing(&no_date));
    assert!(
        f.matches_listing(&marker("k", NOON)),
        "delete markers have dates"
    );
}

#[test]
fn storage_classes_match_any_and_unlisted_is_standard() {
    let f = Filters {
        storage_classes: vec!["STANDARD".into(), "GLACIER".into()],
        ..Filters::default()
    };
    assert!(f.matches_listing(&version("k", 1, NOON, None)));
    assert!(f.matches_listing(&version("k", 1, NOON, Some("GLACIER"))));
    assert!(!f.matches_listing(&version("k", 1, NOON, Some("STANDARD_IA"))));
    assert!(
        !f.matches_listing(&marker("k", NOON)),
        "delete markers have no class"
    );
}

#[test]
fn key_filters_match_any_of_each_and_all_kinds() {
    let f = Filters {
        key_prefixes: vec!["logs/".into(), "data/".into()],
        key_suffixes: vec![".gz".into(), ".csv".into()],
        key_substrings: vec!["2024".into()],
        ..Filters::default()
    };
    let keys = [
        "logs/2024/a.gz",
        "data/2024-05.csv",
        "logs/2023/a.gz",
        "img/2024/a.gz",
        "logs/2024/a.txt",
    ];
    let pass: Vec<&str> = keys
        .into_iter()
        .filter(|k| f.matches_listing(&version(k, 1, NOON, None)))
        .collect();
    assert_eq!(pass, vec!["logs/2024/a.gz", "data/2024-05.csv"]);
}

#[test]
fn encryption_filter_needs_a_head_and_reads_header_values() {
    let f = Filters {
        encryption: vec![EncryptionFilter::SseKms, EncryptionFilter::NotSse],
        ..Filters::default()
    };
    assert!(f.needs_head());
    let enc = |e: Option<&str>| {
        f.matches_head(&HeadFacts {
            encryption: e,
            ..HeadFacts::default()
        })
    };
    assert!(enc(Some("aws:kms")));
    assert!(enc(None));
    assert!(!enc(Some("AES256")));
    assert!(!enc(Some("aws:kms:dsse")));
    assert!(
        !enc(Some("something-new")),
        "an unknown value matches nothing"
    );
    assert_eq!(
        EncryptionFilter::name_of(Some(&Encryption::DsseKms(None))),
        "DSSE-KMS"
    );
    assert!(enc(Some(EncryptionFilter::name_of(Some(
        &Encryption::SseKms(Some("k".into()))
    )))));
}

#[test]
fn replication_status_is_s3s_header_else_the_stamp_else_none() {
    let status = |list: Vec<ReplicationStatus>, header: Option<&str>, stamped: bool| {
        Filters {
            replication_status: list,
            ..Filters::default()
        }
        .matches_head(&HeadFacts {
            replication_status: header,
            stamped,
            ..HeadFacts::default()
        })
    };
    use ReplicationStatus::*;
    assert!(status(vec![None], Option::None, false));
    assert!(
        !status(vec![None], Option::None, true),
        "stamped means copied"
    );
    assert!(status(vec![Completed], Option::None, true));
    assert!(
        status(vec![Failed], Some("FAILED"), true),
        "S3's header wins"
    );
    assert!(status(vec![Replica], Some("REPLICA"), false));
    assert!(!status(
        vec![None, Failed, Completed, Replica],
        Some("PENDING"),
        false
    ));
}

#[test]
fn filters_round_trip_through_the_job_json() {
    let f = Filters {
        created_after: Some(parse_instant("--created-after", "2024-05-01").unwrap()),
        min_size: Some(5),
        storage_classes: vec!["GLACIER".into()],
        encryption: vec![EncryptionFilter::SseC],
        replication_status: vec![ReplicationStatus::Failed],
        ..Filters::default()
    };
    let text = serde_json::to_string(&f).unwrap();
    assert!(text.contains("\"2024-05-01T00:00:00Z\""), "{text}");
    assert!(
        text.contains("\"SSE-C\"") && text.contains("\"FAILED\""),
        "{text}"
    );
    assert_eq!(serde_json::from_str::<Filters>(&text).unwrap(), f);
    assert_eq!(
        serde_json::from_str::<Filters>("{}").unwrap(),
        Filters::default()
    );
}

#[test]
fn cli_values_parse_or_fail_with_one_line() {
    assert_eq!(parse_encryption("sse-kms"), Ok(EncryptionFilter::SseKms));
    assert_eq!(
        parse_replication_status("completed"),
        Ok(ReplicationStatus::Completed)
    );
    assert_eq!(parse_storage_class("standard_ia"), Ok("STANDARD_IA".into()));
    assert_eq!(
        parse_encryption("KMS").unwrap_err().to_string(),
        "--encryption \"KMS\": expected SSE-S3, SSE-KMS, DSSE-KMS, SSE-C or NOT-SSE"
    );
    assert_eq!(
        parse_replication_status("PENDING").unwrap_err().to_string(),
        "--replication-status \"PENDING\": expected NONE, FAILED, COMPLETED or REPLICA"
    );
    assert_eq!(
        parse_instant("--created-after", "05/01/2024")
            .unwrap_err()
            .to_string(),
        "--created-after \"05/01/2024\": not a date (2024-05-01) or RFC 3339 date-time \
         (2024-05-01T12:00:00Z)"
    );
    assert!(parse_storage_class("deep archive").is_err());
}

#[test]
fn contradictory_ranges_are_refused() {
    let sizes = Filters {
        min_size: Some(10),
        max_size: Some(11),
        ..Filters::default()
    };
    assert_eq!(
        sizes.validate().unwrap_err().to_string(),
        "--max-size \"11\": no size is above --min-size 10 and below it"
    );
    let ok = Filters {
        max_size: Some(12),
        ..sizes
    };
    assert!(ok.validate().is_ok());
    let dates = Filters {
        created_after: Instant::parse("2024-05-02"),
        created_before: Instant::parse("2024-05-01"),
        ..Filters::default()
    };
    assert_eq!(
        dates.validate().unwrap_err().to_string(),
        "--created-before \"2024-05-01T00:00:00Z\": not after --created-after 2024-05-02T00:00:00Z"
    );
}
