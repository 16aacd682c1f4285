//! In-process tests of the parallel listing and of refreshes: the real lister and manifest
//! (SQLite in a temporary directory) against the s3 layer's fake.

use std::path::Path;

use super::Lister;
use crate::config::{CopyOptions, JobSettings, Location, Selection, SideConfig};
use crate::manifest::Manifest;
use crate::s3::fake::FakeServer;
use crate::s3::{Side, S3};

const SRC: &str = "src";

fn settings(prefix: &str) -> JobSettings {
    JobSettings {
        source: Location {
            bucket: SRC.into(),
            prefix: String::new(),
        },
        dest: Location {
            bucket: "dst".into(),
            prefix: String::new(),
        },
        selection: Selection {
            prefix: prefix.into(),
            delete_markers: true,
            ..Selection::default()
        },
        source_side: SideConfig::default(),
        dest_side: SideConfig::default(),
        copy: CopyOptions::default(),
        filters: Default::default(),
        replication: None,
        destinations: Vec::new(),
        supplied: None,
    }
}

/// Keys under several prefixes and without any, odd characters, boundaries that equal a
/// prefix, several versions and delete markers.
fn seed(s: &FakeServer) -> Vec<String> {
    let mut keys = vec![
        "a".to_string(),
        "a/".into(),
        "a/b c".into(),
        "a+b".into(),
        "a%2Fb".into(),
        "b".into(),
        "b/é/ü".into(),
        "b/日本".into(),
        "c.txt".into(),
        "z".into(),
        "zz/😀".into(),
    ];
    for p in ["d/", "e/", "f-", "g/", "h", "x/y/"] {
        keys.extend((0..12).map(|i| format!("{p}{i:02}")));
    }
    for (i, k) in keys.iter().enumerate() {
        s.put(SRC, k, b"v1", &[]);
        if i % 3 == 0 {
            s.delete(SRC, k);
        }
        if i % 4 == 0 {
            s.put(SRC, k, b"v3", &[]);
        }
    }
    keys
}

/// Plans (or continues) the job in `path` with `concurrency` parts at once.
async fn plan(s: &FakeServer, path: &Path, prefix: &str, concurrency: usize) {
    plan_in_pages(s, path, prefix, concurrency, 5).await
}

/// `plan` with listing pages of `page_size` entries (a listing of one page is not split).
async fn plan_in_pages(
    s: &FakeServer,
    path: &Path,
    prefix: &str,
    concurrency: usize,
    page_size: i32,
) {
    let mut m = Manifest::open(path, true).unwrap();
    let job = settings(prefix);
    m.store_settings(&job).unwrap();
    let source = S3::alone(s.client(Side::Source), 8);
    let mut lister = Lister::new(&job, &source, None, true);
    lister.page_size = page_size;
    lister
        .list_parallel(&mut m, concurrency, |_| {})
        .await
        .unwrap();
}

/// Each key's version ids in the manifest, oldest first (as the copier takes them).
fn manifest_histories(path: &Path, keys: &[String]) -> Vec<(String, Vec<String>)> {
    let m = Manifest::open(path, false).unwrap();
    keys.iter()
        .map(|k| {
            let v = m.tasks_of_key(k).unwrap();
            (
                k.clone(),
                v.into_iter().map(|t| t.entry.version_id).collect(),
            )
        })
        .collect()
}

fn source_histories(s: &FakeServer, keys: &[String]) -> Vec<(String, Vec<String>)> {
    keys.iter()
        .map(|k| {
            let h = s.history(SRC, k).into_iter().map(|v| v.id).collect();
            (k.clone(), h)
        })
        .collect()
}

#[tokio::test]
async fn four_parts_list_every_version_once_in_order() {
    let s = FakeServer::new();
    s.create_bucket(SRC, true);
    let keys = seed(&s);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    plan(&s, &path, "", 4).await;
    let m = Manifest::open(&path, false).unwrap();
    let parts = m.partitions().unwrap();
    assert_eq!(parts.len(), 4, "{parts:?}");
    assert!(m.listing().unwrap().complete);
    let entries: usize = keys.iter().map(|k| s.history(SRC, k).len()).sum();
    assert_eq!(m.counts().unwrap().total, entries as u64);
    assert_eq!(m.listing().unwrap().entries, entries as u64);
    assert_eq!(
        manifest_histories(&path, &keys),
        source_histories(&s, &keys)
    );
}

#[tokio::test]
async fn a_listing_of_one_page_is_not_split() {
    let s = FakeServer::new();
    s.create_bucket(SRC, true);
    let keys = seed(&s);
    let entries: usize = keys.iter().map(|k| s.history(SRC, k).len()).sum();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    plan_in_pages(&s, &path, "", 4, entries as i32 + 1).await;
    let m = Manifest::open(&path, false).unwrap();
    assert_eq!(m.partitions().unwrap().len(), 1);
    assert_eq!(m.counts().unwrap().total, entries as u64);
    assert_eq!(
        manifest_histories(&path, &keys),
        source_histories(&s, &keys)
    );
    // One entry more than a page: split as asked.
    let path = dir.path().join("job2.db");
    plan_in_pages(&s, &path, "", 4, entries as i32 - 1).await;
    let m = Manifest::open(&path, false).unwrap();
    assert_eq!(m.partitions().unwrap().len(), 4);
    assert_eq!(m.counts().unwrap().total, entries as u64);
}

#[tokio::test]
async fn parts_stay_under_the_prefix() {
    let s = FakeServer::new();
    s.create_bucket(SRC, true);
    let keys = seed(&s);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    plan(&s, &path, "x/", 3).await;
    let m = Manifest::open(&path, false).unwrap();
    let under: Vec<String> = keys.into_iter().filter(|k| k.starts_with("x/")).collect();
    let entries: usize = under.iter().map(|k| s.history(SRC, k).len()).sum();
    assert_eq!(m.counts().unwrap().total, entries as u64);
    assert!(m.partitions().unwrap().len() > 1, "x/y/00..11 split");
    assert_eq!(
        manifest_histories(&path, &under),
        source_histories(&s, &under)
    );
}

#[tokio::test]
async fn a_refresh_adds_new_entries_after_the_old_ones() {
    let s = FakeServer::new();
    s.create_bucket(SRC, true);
    let mut keys = seed(&s);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    plan(&s, &path, "", 4).await;
    let before = Manifest::open(&path, false)
        .unwrap()
        .counts()
        .unwrap()
        .total;
    // New versions and markers of old keys, new keys (one between old ones).
    s.put(SRC, "a/b c", b"new", &[]);
    s.delete(SRC, "d/03");
    s.put(SRC, "d/03", b"new", &[]);
    s.put(SRC, "d/035", b"new", &[]);
    s.put(SRC, "new/key", b"new", &[]);
    keys.extend(["d/035".to_string(), "new/key".to_string()]);
    let mut m = Manifest::open(&path, false).unwrap();
    assert_eq!(m.start_refresh().unwrap(), Some(1));
    drop(m);
    plan(&s, &path, "", 4).await;
    let m = Manifest::open(&path, false).unwrap();
    assert_eq!(m.counts().unwrap().total, before + 5);
    let r = m.refreshes().unwrap();
    assert_eq!((r[1].generation, r[1].tasks, r[1].matched), (1, 5, before));
    assert_eq!(
        manifest_histories(&path, &keys),
        source_histories(&s, &keys)
    );
}

#[test]
fn a_refresh_across_pages_adds_only_new_entries() {
    use crate::manifest::{Listing, NewTask};
    use crate::s3::VersionEntry;
    let task = |v: &str, pos: u64| NewTask {
        entry: VersionEntry {
            key: "k".into(),
            version_id: v.into(),
            ..VersionEntry::default()
        },
        history_pos: pos,
        dest: 0,
    };
    let dir = tempfile::tempdir().unwrap();
    let mut m = Manifest::open(&dir.path().join("job.db"), true).unwrap();
    let done = Listing {
        complete: true,
        ..Listing::default()
    };
    m.insert_page(&[task("3", 0), task("2", 1), task("1", 2)], &done)
        .unwrap();
    assert_eq!(m.start_refresh().unwrap(), Some(1));
    // The key's history now spans two pages: a new version, then the old ones.
    m.insert_page(&[task("4", 0), task("3", 1)], &Listing::default())
        .unwrap();
    m.insert_page(&[task("2", 2), task("1", 3)], &done).unwrap();
    let ids: Vec<String> = m
        .tasks_of_key("k")
        .unwrap()
        .into_iter()
        .map(|t| t.entry.version_id)
        .collect();
    assert_eq!(ids, ["1", "2", "3", "4"], "oldest first, each once");
    let r = m.refreshes().unwrap();
    assert_eq!((r[1].tasks, r[1].matched), (1, 3));
}

#[tokio::test]
async fn split_points_go_deeper_than_one_character() {
    let s = FakeServer::new();
    s.create_bucket(SRC, true);
    for p in 0..10 {
        for i in 0..10 {
            s.put(SRC, &format!("p{p:02}/{i:02}.txt"), b"1", &[]);
        }
    }
    for k in ["p", "p03", "a b", "odd/back\\slash", "zz"] {
        s.put(SRC, k, b"1", &[]);
    }
    let source = S3::alone(s.client(Side::Source), 1);
    let four = super::split_points(&source, SRC, "", 4)
        .await
        .unwrap()
        .expect("the fake starts listings exactly");
    // The first characters (a, o, p, z) give four parts: no deeper probes.
    assert_eq!(four, ["o", "p", "z"]);
    let starts = super::split_points(&source, SRC, "", 8)
        .await
        .unwrap()
        .expect("the fake starts listings exactly");
    // Eight parts: deeper, to the ten prefixes under "p0", which most ranges split.
    assert_eq!(starts.len(), 7, "{starts:?}");
    let in_p0 = starts.iter().filter(|s| s.starts_with("p0")).count();
    assert!(in_p0 >= 5, "{starts:?}");
}

#[tokio::test]
async fn a_refresh_of_an_unversioned_source_plans_null_versions_changed_in_place() {
    let s = FakeServer::new();
    s.create_bucket(SRC, false);
    for k in ["a", "b", "c"] {
        s.put(SRC, k, format!("one {k}").as_bytes(), &[]);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.db");
    plan(&s, &path, "", 1).await;
    // `a` overwritten (the same id `null`, other bytes), `b` replaced by a `null` delete
    // marker (a suspended bucket's delete), `c` untouched.
    s.put(SRC, "a", b"two a", &[]);
    s.delete(SRC, "b");
    let mut m = Manifest::open(&path, false).unwrap();
    assert_eq!(m.start_refresh_of(false).unwrap(), Some(1));
    drop(m);
    plan(&s, &path, "", 1).await;
    let m = Manifest::open(&path, false).unwrap();
    let kinds = |k: &str| -> Vec<(String, bool, Option<String>)> {
        m.tasks_of_key(k)
            .unwrap()
            .into_iter()
            .map(|t| (t.entry.version_id, t.entry.is_delete_marker, t.entry.etag))
            .collect()
    };
    let etag = |k: &str| s.history(SRC, k).last().map(|v| v.etag.clone());
    let a = kinds("a");
    assert_eq!(a.len(), 2, "{a:?}");
    assert_eq!(a[1], ("null".into(), false, etag("a")));
    assert!(kinds("b")[1].1, "the delete is planned after the object");
    assert_eq!(kinds("c").len(), 1);
    let r = m.refreshes().unwrap();
    assert_eq!((r[1].tasks, r[1].matched, r[1].deleted), (2, 1, 0));
}
