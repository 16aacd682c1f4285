//! manifest::tests: the manifest's behaviour as its users see it: pages and replays, task
//! fields read back as listed, counters against a recount, blocked keys, problems, the two
//! ways to resolve failures, the writer (and its stop after a failed commit), v1 and v2
//! migration, file modes, and that `status` reads no task rows.

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use super::*;
use crate::config::{CopyOptions, Location, Selection, SideConfig};
use crate::s3::{ErrorClass, S3Error, Side, VersionEntry};

pub(super) fn task(key: &str, v: &str, pos: u64) -> NewTask {
    NewTask {
        entry: VersionEntry {
            key: key.into(),
            version_id: v.into(),
            is_delete_marker: false,
            is_latest: pos == 0,
            size: 10,
            etag: Some("\"e\"".into()),
            last_modified: None,
            storage_class: None,
            checksum_algorithm: None,
        },
        history_pos: pos,
        dest: 0,
    }
}

pub(crate) fn settings() -> JobSettings {
    JobSettings {
        source: Location::parse("s3://src/in/").unwrap(),
        dest: Location::parse("s3://dst/out/").unwrap(),
        source_side: SideConfig::default(),
        dest_side: SideConfig::default(),
        selection: Selection::default(),
        copy: CopyOptions::default(),
        filters: Default::default(),
        replication: None,
        destinations: Vec::new(),
        supplied: None,
    }
}

fn new_manifest() -> (tempfile::TempDir, PathBuf, SqliteManifest) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    let m = SqliteManifest::open(&path, true).unwrap();
    (dir, path, m)
}

fn all_keys(m: &SqliteManifest) -> Vec<KeyGroup> {
    m.next_key_groups(0, usize::MAX).unwrap()
}

fn ids_of(m: &SqliteManifest, key: &str) -> Vec<i64> {
    let g = all_keys(m);
    let g = g.iter().find(|g| g.key == key).expect("key has open tasks");
    g.tasks.iter().map(|t| t.id).collect()
}

pub(super) fn error(code: &str, status: u16) -> S3Error {
    S3Error {
        side: Side::Dest,
        op: "CopyObject",
        class: ErrorClass::Fatal,
        code: Some(code.into()),
        status: Some(status),
        message: "no".into(),
        bucket_region: None,
    }
}

pub(super) fn done(retries: u64) -> Outcome {
    Outcome::Done {
        copied: Copied::single(Some("d".into()), CopyMethod::Copy),
        retries,
        to_learn: false,
    }
}

/// Applies updates through a writer and waits for them to be committed.
fn write_all(path: &Path, updates: Vec<Update>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let w = SqliteManifest::open(path, false).unwrap().into_writer();
    for u in updates {
        w.send(u).unwrap();
    }
    rt.block_on(w.flush()).unwrap();
    w.close();
}

#[test]
fn pages_groups_and_states() {
    let (_d, _p, mut m) = new_manifest();
    let page = vec![task("a", "2", 0), task("a", "1", 1), task("b\t?", "1", 0)];
    let cp = Listing {
        key_marker: Some("b\t?".into()),
        version_marker: Some("1".into()),
        pages: 1,
        entries: 3,
        last_key: Some("b\t?".into()),
        last_key_seen: 1,
        ..Default::default()
    };
    m.insert_page(&page, &cp).unwrap();
    assert_eq!(m.listing().unwrap(), cp);
    // A replayed page is ignored.
    m.insert_page(&page, &cp).unwrap();
    let c = m.counts().unwrap();
    assert_eq!((c.total, c.pending, c.bytes_total), (3, 3, 30));
    assert!(!c.listing_complete);
    let g = all_keys(&m);
    assert_eq!(g.len(), 2);
    assert_eq!((g[0].key.as_str(), g[1].key.as_str()), ("a", "b\t?"));
    assert_eq!(g[0].tasks[0].entry.version_id, "1", "oldest first");
    assert!(g[0].tasks[1].entry.is_latest && !g[0].tasks[0].entry.is_latest);
    assert_eq!(m.next_key_groups(g[0].key_id, 10).unwrap().len(), 1);
    assert!(m.has_multi_version_key().unwrap());
    assert_eq!(m.count_key("a").unwrap(), 2);
    assert_eq!(m.count_key("zz").unwrap(), 0);
}

#[test]
fn a_key_continued_on_the_next_page_keeps_its_order_and_replays_are_ignored() {
    let (_d, _p, mut m) = new_manifest();
    let first = vec![task("k", "v5", 0), task("k", "v4", 1)];
    let second = vec![task("k", "v3", 2), task("k", "v2", 3), task("l", "x", 0)];
    m.insert_page(&first, &Listing::default()).unwrap();
    m.insert_page(&second, &Listing::default()).unwrap();
    // Both pages again (a resumed listing that re-read them), and one entry twice in a page.
    m.insert_page(&first, &Listing::default()).unwrap();
    m.insert_page(&second, &Listing::default()).unwrap();
    m.insert_page(&[task("l", "y", 1), task("l", "y", 1)], &Listing::default())
        .unwrap();
    assert_eq!(m.count_key("k").unwrap(), 4);
    assert_eq!(m.count_key("l").unwrap(), 2);
    let g = all_keys(&m);
    let versions: Vec<&str> = g[0]
        .tasks
        .iter()
        .map(|t| t.entry.version_id.as_str())
        .collect();
    assert_eq!(versions, ["v2", "v3", "v4", "v5"]);
    assert_eq!(m.counts().unwrap().total, 6);
}

#[test]
fn keys_listed_out_of_order_are_stored_once_and_found() {
    let (_d, _p, mut m) = new_manifest();
    let pages = [
        vec![task("b", "1", 0), task("d", "1", 0), task("f", "1", 0)],
        vec![task("a", "1", 0), task("c", "1", 0)],
        vec![task("e", "1", 0), task("g", "1", 0), task("c", "2", 1)],
    ];
    for p in &pages {
        m.insert_page(p, &Listing::default()).unwrap();
    }
    for p in &pages {
        m.insert_page(p, &Listing::default()).unwrap();
    }
    assert_eq!(m.counts().unwrap().total, 8);
    for (k, n) in [
        ("a", 1),
        ("b", 1),
        ("c", 2),
        ("d", 1),
        ("e", 1),
        ("f", 1),
        ("g", 1),
    ] {
        assert_eq!(m.count_key(k).unwrap(), n, "{k}");
    }
    let keys: i64 = m
        .conn
        .query_row("SELECT count(*) FROM keys", [], |r| r.get(0))
        .unwrap();
    assert_eq!(keys, 7, "each key stored once");
    assert_eq!(all_keys(&m).len(), 7);
}

#[test]
fn pages_from_two_connections_store_each_key_once() {
    // A connection that keeps the key runs between its pages must see keys that another
    // connection stored meanwhile (as two listers on one manifest would).
    let (_d, path, mut a) = new_manifest();
    let mut b = SqliteManifest::open(&path, false).unwrap();
    let cp = Listing::default();
    a.insert_page(&[task("b", "1", 0), task("d", "1", 0)], &cp)
        .unwrap();
    b.insert_page(&[task("f", "1", 0), task("h", "1", 0)], &cp)
        .unwrap();
    a.insert_page(&[task("f", "2", 1), task("g", "1", 0)], &cp)
        .unwrap();
    b.insert_page(&[task("d", "2", 1), task("g", "2", 1)], &cp)
        .unwrap();
    // Replays on both connections are ignored.
    a.insert_page(&[task("h", "1", 0), task("d", "2", 1)], &cp)
        .unwrap();
    b.insert_page(&[task("b", "1", 0), task("f", "2", 1)], &cp)
        .unwrap();
    let keys: i64 = a
        .conn
        .query_row("SELECT count(*) FROM keys", [], |r| r.get(0))
        .unwrap();
    assert_eq!(keys, 5, "each key stored once");
    for (k, n) in [("b", 1), ("d", 2), ("f", 2), ("g", 2), ("h", 1)] {
        assert_eq!(a.count_key(k).unwrap(), n, "{k}");
        assert_eq!(b.count_key(k).unwrap(), n, "{k}");
    }
    assert_eq!(a.counts().unwrap().total, 8);
}

#[test]
fn single_version_keys_do_not_need_versioning() {
    let (_d, _p, mut m) = new_manifest();
    m.insert_page(&[task("a", "1", 0), task("b", "1", 0)], &Listing::default())
        .unwrap();
    assert!(!m.has_multi_version_key().unwrap());
}

// One entry per encoding (compact, text fallback, none); checked field by field.
// Long on purpose: a test that reads as one scenario from set-up to the checks.
#[test]
fn listed_fields_read_back_exactly() {
    let (_d, path, mut m) = new_manifest();
    let mut entries = Vec::new();
    let etags = [
        Some("\"0123456789abcdef0123456789abcdef\""),
        Some("\"0123456789abcdef0123456789abcdef-12\""),
        None,
    ];
    let times = [
        Some("2024-05-06T07:08:09.000Z"),
        Some("2024-05-06T07:08:09.123Z"),
        None,
    ];
    let classes = [Some("STANDARD"), Some("placement-x"), None];
    let sums = [Some("CRC64NVME"), Some("XXH3"), None];
    for i in 0..3 {
        entries.push(NewTask {
            entry: VersionEntry {
                key: format!("k{i}/ünï cödé\n"),
                version_id: format!("v{i}"),
                is_delete_marker: i == 2,
                is_latest: i != 1,
                size: [0, 5 << 40, 7][i],
                etag: etags[i].map(str::to_string),
                last_modified: times[i].map(str::to_string),
                storage_class: classes[i].map(str::to_string),
                checksum_algorithm: sums[i].map(str::to_string),
            },
            history_pos: 0,
            dest: 0,
        });
    }
    m.insert_page(&entries, &Listing::default()).unwrap();
    let g = all_keys(&m);
    for (t, n) in g.iter().map(|g| &g.tasks[0]).zip(&entries) {
        let e = &n.entry;
        assert_eq!(&t.entry, e, "the task keeps its listing entry as listed");
        assert_eq!(
            (t.state, t.attempts, t.stream_only),
            (State::Pending, 0, false)
        );
    }
    // The readable view shows the same text.
    let c = Connection::open(&path).unwrap();
    let (etag, lm, class, state): (String, String, String, String) = c
        .query_row(
            "SELECT etag, last_modified, storage_class, state FROM tasks ORDER BY id LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(
        (etag.as_str(), lm.as_str(), class.as_str(), state.as_str()),
        (etags[0].unwrap(), times[0].unwrap(), "STANDARD", "pending")
    );
}

#[test]
fn refuses_newer_schema() {
    let (_d, path, m) = new_manifest();
    drop(m);
    let c = Connection::open(&path).unwrap();
    c.pragma_update(None, "user_version", 99).unwrap();
    drop(c);
    assert!(matches!(
        SqliteManifest::open(&path, false),
        Err(ManifestError::TooNew(_, 99))
    ));
}

#[test]
fn refuses_files_that_are_not_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "this is not a database, just some text ".repeat(200)).unwrap();
    assert!(matches!(
        SqliteManifest::open(&path, false),
        Err(ManifestError::NotAManifest(_))
    ));
    let other = dir.path().join("other.db");
    Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE t (x)")
        .unwrap();
    assert!(matches!(
        SqliteManifest::open(&other, true),
        Err(ManifestError::NotAManifest(_))
    ));
    assert!(matches!(
        SqliteManifest::open(&dir.path().join("none.db"), false),
        Err(ManifestError::Missing(_))
    ));
}

#[test]
fn settings_round_trip_and_name_destination_zero() {
    let (_d, path, m) = new_manifest();
    assert!(m.settings().unwrap().is_none());
    assert!(matches!(
        m.require_settings(),
        Err(ManifestError::NotAManifest(_))
    ));
    m.store_settings(&settings()).unwrap();
    assert_eq!(m.require_settings().unwrap(), settings());
    let c = Connection::open(&path).unwrap();
    let dest: (String, String) = c
        .query_row(
            "SELECT bucket, prefix FROM destinations WHERE id = 0",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(dest, ("dst".to_string(), "out/".to_string()));
}

// One run's updates in order, each checked where it takes effect.
// Long on purpose: a test that reads as one scenario from set-up to the checks.
#[tokio::test]
async fn writer_commits_updates() {
    let (_d, path, mut m) = new_manifest();
    m.insert_page(&[task("k", "2", 0), task("k", "1", 1)], &Listing::default())
        .unwrap();
    let ids = ids_of(&m, "k");
    let w = m.into_writer();
    w.send_durable(Update::Started { id: ids[0], at: 5 })
        .await
        .unwrap();
    w.send(Update::Upload {
        id: ids[0],
        upload_id: Some("up".into()),
        part_size: Some(5),
        parts: Some(2),
    })
    .unwrap();
    let g = w.next_key_groups(0, 5).await.unwrap();
    assert_eq!(
        g[0].tasks[0].upload_id.as_deref(),
        Some("up"),
        "read after writes"
    );
    assert_eq!(g[0].tasks[0].started_at, Some(5));
    w.send(Update::StreamOnly { id: ids[1] }).unwrap();
    w.send(Update::Finished {
        id: ids[0],
        outcome: Outcome::Done {
            copied: Copied {
                dest_version_id: None,
                method: CopyMethod::MultipartCopy,
                part_size: Some(5),
                parts: Some(2),
                etag_preserved: Some(true),
            },
            retries: 2,
            to_learn: false,
        },
    })
    .unwrap();
    w.send(Update::DestVersion {
        id: ids[0],
        dest_version_id: Some("d1".into()),
    })
    .unwrap();
    w.send(Update::Requests {
        counts: vec![("CopyObject", 3), ("HeadObject", 1)],
    })
    .unwrap();
    w.send(Update::Requests {
        counts: vec![("CopyObject", 2)],
    })
    .unwrap();
    let g = w.next_key_groups(0, 5).await.unwrap();
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].tasks[0].dest_version_id.as_deref(), Some("d1"));
    assert!(g[0].tasks[1].stream_only);
    w.close();
    let m = SqliteManifest::open(&path, false).unwrap();
    let c = m.counts().unwrap();
    assert_eq!(
        (c.done, c.retries, c.attempts, c.etag_preserved),
        (1, 2, 1, 1)
    );
    assert_eq!(c.done_without_dest_version, 0);
    assert_eq!(c.requests.get("CopyObject"), Some(&5));
    assert_eq!(c.requests.get("HeadObject"), Some(&1));
    assert!(
        m.open_uploads().unwrap().is_empty(),
        "done closes the upload"
    );
    let conn = Connection::open(&path).unwrap();
    let row: (String, String, i64, i64, i64) = conn
        .query_row(
            "SELECT state, copy_method, part_size, parts, etag_preserved FROM tasks
             WHERE version_id = '1'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .unwrap();
    assert_eq!(row, ("done".into(), "multipart-copy".into(), 5, 2, 1));
}

#[test]
fn open_uploads_are_listed_until_closed() {
    let (_d, path, mut m) = new_manifest();
    m.insert_page(&[task("k", "1", 0)], &Listing::default())
        .unwrap();
    let id = ids_of(&m, "k")[0];
    write_all(
        &path,
        vec![
            Update::Started { id, at: 1 },
            Update::Upload {
                id,
                upload_id: Some("u1".into()),
                part_size: Some(8),
                parts: Some(3),
            },
        ],
    );
    let up = m.open_uploads().unwrap();
    assert_eq!(up.len(), 1);
    assert_eq!(
        (up[0].entry.key.as_str(), up[0].upload_id.as_deref()),
        ("k", Some("u1"))
    );
    write_all(
        &path,
        vec![Update::Upload {
            id,
            upload_id: None,
            part_size: None,
            parts: None,
        }],
    );
    assert!(m.open_uploads().unwrap().is_empty());
}

/// The kept counters equal a full recount after every kind of change (a long script of
/// changes, checked after each step).
#[test]
fn counters_match_a_recount() {
    let (_d, path, mut m) = new_manifest();
    let mut page = Vec::new();
    for k in 0..40 {
        for v in 0..(k % 3 + 1) {
            let mut t = task(&format!("key{k:03}"), &format!("v{v}"), v);
            t.entry.size = k * 100 + v;
            t.entry.is_delete_marker = k % 7 == 0 && v == 0;
            page.push(t);
        }
    }
    m.insert_page(&page, &Listing::default()).unwrap();
    let groups = all_keys(&m);
    let ids: Vec<i64> = groups
        .iter()
        .flat_map(|g| g.tasks.iter().map(|t| t.id))
        .collect();
    let mut updates = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let id = *id;
        if i % 5 != 4 {
            updates.push(Update::Started { id, at: 9 });
        }
        let outcome = match i % 5 {
            0 => done(1),
            1 => Outcome::Failed {
                error: error("AccessDenied", 403),
                retries: 3,
            },
            2 => Outcome::Skipped {
                class: if i % 2 == 0 {
                    ErrorClass::Archived
                } else {
                    ErrorClass::SourceGone
                },
                reason: "gone".into(),
                retries: 0,
            },
            3 => Outcome::Requeued,
            _ => continue,
        };
        updates.push(Update::Finished { id, outcome });
    }
    write_all(&path, updates);
    check_recount(&m);
    m.retry_failed().unwrap();
    check_recount(&m);
    write_all(
        &path,
        ids.iter()
            .step_by(3)
            .map(|id| Update::Finished {
                id: *id,
                outcome: Outcome::Failed {
                    error: error("X", 500),
                    retries: 0,
                },
            })
            .collect(),
    );
    m.skip_failed().unwrap();
    check_recount(&m);
    let tx = m.conn.unchecked_transaction().unwrap();
    for table in ["errors", "uploads"] {
        tx.execute(&format!("DELETE FROM {table} WHERE task = ?1"), [ids[1]])
            .unwrap();
    }
    tx.execute("DELETE FROM task WHERE id = ?1", [ids[1]])
        .unwrap();
    tx.commit().unwrap();
    check_recount(&m);
}

fn check_recount(m: &SqliteManifest) {
    let c = m.counts().unwrap();
    let mut stmt = m
        .conn
        .prepare(
            "SELECT state, count(*), sum(size), sum(is_delete_marker), sum(attempts),
             sum(coalesce(etag_preserved, 0)), sum(error_class IS 'archived'),
             sum(dest_version_id IS NULL) FROM tasks GROUP BY state",
        )
        .unwrap();
    let mut want = Counts {
        listing_complete: c.listing_complete,
        listed_entries: c.listed_entries,
        retries: c.retries,
        blocked: c.blocked,
        requests: c.requests.clone(),
        ..Default::default()
    };
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                [1, 2, 3, 4, 5, 6, 7].map(|i| r.get::<_, i64>(i).unwrap() as u64),
            ))
        })
        .unwrap();
    for row in rows {
        let (state, [n, bytes, dm, attempts, preserved, archived, no_dest]) = row.unwrap();
        want.total += n;
        want.bytes_total += bytes;
        want.delete_markers += dm;
        want.attempts += attempts;
        want.etag_preserved += preserved;
        match State::parse(&state).unwrap() {
            State::Pending => want.pending = n,
            State::InProgress => want.in_progress = n,
            State::Done => {
                want.done = n;
                want.bytes_done = bytes;
                want.done_without_dest_version = no_dest;
            }
            State::Failed => want.failed = n,
            State::Skipped => {
                want.skipped = n;
                want.archived = archived;
            }
        }
    }
    assert_eq!(c, want);
    // The open-key summary agrees with the tasks: every key with an open task is found.
    let open_keys: i64 = m
        .conn
        .query_row(
            "SELECT count(DISTINCT key) FROM tasks WHERE state IN ('pending', 'in_progress')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(all_keys(m).len() as i64, open_keys);
}

/// Key `k` with v1 done, v2 failed (AccessDenied), v3 and v4 pending; key `other` pending.
fn key_with_a_failed_version() -> (tempfile::TempDir, PathBuf, SqliteManifest, Vec<i64>) {
    let (d, path, mut m) = new_manifest();
    let page = vec![
        task("k", "v4", 0),
        task("k", "v3", 1),
        task("k", "v2", 2),
        task("k", "v1", 3),
        task("other", "x", 0),
    ];
    m.insert_page(&page, &Listing::default()).unwrap();
    let ids = ids_of(&m, "k"); // v1, v2, v3, v4
    let failed = Outcome::Failed {
        error: error("AccessDenied", 403),
        retries: 1,
    };
    write_all(
        &path,
        vec![
            Update::Started { id: ids[0], at: 1 },
            Update::Finished {
                id: ids[0],
                outcome: done(0),
            },
            Update::Started { id: ids[1], at: 1 },
            Update::Finished {
                id: ids[1],
                outcome: failed,
            },
        ],
    );
    (d, path, m, ids)
}

#[test]
fn a_failed_version_blocks_the_later_ones() {
    let (_d, _p, m, _ids) = key_with_a_failed_version();
    let c = m.counts().unwrap();
    assert_eq!((c.failed, c.blocked, c.pending), (1, 2, 3));
    let mut seen = Vec::new();
    m.for_each_problem(|p| {
        seen.push((p.version_id, p.state, p.error_code));
        Ok(())
    })
    .unwrap();
    assert_eq!(
        seen,
        [
            ("v2".into(), "failed".into(), Some("AccessDenied".into())),
            ("v3".into(), "blocked".into(), None),
            ("v4".into(), "blocked".into(), None),
        ]
    );
    let p = m.problems(10).unwrap();
    assert!(p[1].message.as_deref().unwrap().contains("v2"), "{p:?}");
    assert_eq!(m.problems(1).unwrap().len(), 1);
    // The next run still sees the failed task with the key's open ones.
    let g = all_keys(&m);
    let k = g.iter().find(|g| g.key == "k").unwrap();
    assert_eq!(k.tasks[1].state, State::Failed);
    assert_eq!(k.tasks[1].error_class.as_deref(), Some("fatal"));
}

#[test]
fn retry_failed_queues_the_failed_version_again() {
    let (_d, _p, m, _ids) = key_with_a_failed_version();
    assert_eq!(m.retry_failed().unwrap(), 1);
    let c = m.counts().unwrap();
    assert_eq!((c.failed, c.blocked, c.pending), (0, 0, 4));
    let g = all_keys(&m);
    let v2 = &g.iter().find(|g| g.key == "k").unwrap().tasks[1];
    assert_eq!(
        (v2.state, v2.attempts),
        (State::Pending, 1),
        "attempts kept"
    );
    assert_eq!(m.retry_failed().unwrap(), 0);
}

#[test]
fn skip_failed_records_why_and_unblocks_the_key() {
    let (_d, _p, m, _ids) = key_with_a_failed_version();
    assert_eq!(m.skip_failed().unwrap(), 1);
    let c = m.counts().unwrap();
    assert_eq!((c.failed, c.skipped, c.blocked, c.pending), (0, 1, 0, 3));
    let p = m.problems(10).unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(
        (p[0].version_id.as_str(), p[0].state.as_str()),
        ("v2", "skipped")
    );
    let msg = p[0].message.as_deref().unwrap();
    assert!(
        msg.starts_with("skipped by --skip-failed after: dest: CopyObject failed (AccessDenied"),
        "{msg}"
    );
}

#[test]
fn unknown_states_fail_loudly() {
    assert_eq!(State::parse("done"), Ok(State::Done));
    assert!(State::parse("finished").is_err());
    assert!(State::parse("").is_err());
    let (_d, _p, mut m) = new_manifest();
    m.insert_page(&[task("k", "1", 0), task("k", "0", 1)], &Listing::default())
        .unwrap();
    let ids = ids_of(&m, "k");
    // One task in a state this build does not know, with an open upload: every reader that
    // meets it says so instead of reading it as something else.
    m.conn
        .execute(
            "INSERT INTO uploads (task, upload_id) VALUES (?1, 'u')",
            [ids[0]],
        )
        .unwrap();
    m.conn
        .execute("UPDATE task SET state = 9 WHERE id = ?1", [ids[0]])
        .unwrap();
    let bad = |r: Result<()>, want: &str| match r {
        Err(ManifestError::BadState(_, v)) => assert_eq!(v, want),
        other => panic!("{other:?}"),
    };
    bad(m.next_key_groups(0, 10).map(drop), "state 9");
    bad(m.open_uploads().map(drop), "state 9");
    bad(m.problems(10).map(drop), "state 9");
    m.conn
        .execute(
            "UPDATE task SET state = 3, error_class = 42 WHERE id = ?1",
            [ids[0]],
        )
        .unwrap();
    bad(m.next_key_groups(0, 10).map(drop), "error class 42");
    bad(m.problems(10).map(drop), "error class 42");
}

#[test]
fn next_key_groups_skip_finished_blocks_of_keys() {
    let (_d, path, mut m) = new_manifest();
    let n = 2600;
    let page: Vec<NewTask> = (0..n).map(|k| task(&format!("k{k:05}"), "v", 0)).collect();
    for chunk in page.chunks(1000) {
        m.insert_page(chunk, &Listing::default()).unwrap();
    }
    let groups = all_keys(&m);
    assert_eq!(groups.len(), n);
    let finished: Vec<Update> = groups[..2500]
        .iter()
        .map(|g| Update::Finished {
            id: g.tasks[0].id,
            outcome: done(0),
        })
        .collect();
    write_all(&path, finished);
    let next = m.next_key_groups(0, 3).unwrap();
    let keys: Vec<&str> = next.iter().map(|g| g.key.as_str()).collect();
    assert_eq!(keys, ["k02500", "k02501", "k02502"]);
    let rest = m.next_key_groups(next[2].key_id, 1000).unwrap();
    assert_eq!(rest.len(), 97);
    assert!(rest.windows(2).all(|w| w[0].key_id < w[1].key_id));
    // A failed task put back in the queue is found again.
    write_all(
        &path,
        vec![Update::Finished {
            id: groups[10].tasks[0].id,
            outcome: Outcome::Failed {
                error: error("X", 500),
                retries: 0,
            },
        }],
    );
    assert_eq!(m.next_key_groups(0, 1).unwrap()[0].key, "k02500");
    m.retry_failed().unwrap();
    assert_eq!(m.next_key_groups(0, 1).unwrap()[0].key, "k00010");
}

/// `status` reads kept counters: none of its statements scans the tasks; finding the next
/// keys seeks by range.
#[test]
fn counts_and_key_search_read_no_task_scan() {
    let (_d, _p, mut m) = new_manifest();
    m.insert_page(&[task("k", "1", 0)], &Listing::default())
        .unwrap();
    for sql in [
        read::COUNTERS_SQL,
        read::TOTALS_SQL,
        read::PARTITIONS_SQL,
        read::REQUESTS_SQL,
        read::OUT_OF_ORDER_SQL,
        read::FAILED_SQL,
        read::WAITING_SQL,
        read::OPEN_BLOCKS_SQL,
        read::NEXT_OPEN_SQL,
    ] {
        let mut stmt = m
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap();
        let args = vec![0i64; stmt.parameter_count()];
        let plan: Vec<String> = stmt
            .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        let plan = plan.join("; ");
        assert!(!plan.contains("SCAN task"), "{sql}: {plan}");
        if sql.contains("FROM task") {
            assert!(plan.contains("SEARCH"), "{sql}: {plan}");
        }
    }
}

#[cfg(unix)]
fn mode(p: &Path, suffix: &str) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    std::fs::metadata(&s).unwrap().permissions().mode() & 0o777
}

#[cfg(unix)]
#[test]
fn files_are_private_to_their_owner() {
    let (_d, path, mut m) = new_manifest();
    m.insert_page(&[task("k", "1", 0)], &Listing::default())
        .unwrap();
    for suffix in ["", "-wal", "-shm"] {
        assert_eq!(mode(&path, suffix), 0o600, "{suffix}");
    }
}

/// Today's v1 schema, as s3-backfill 0.1 created it.
const V1_SCHEMA: &str = "
CREATE TABLE job (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    settings TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE listing (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    key_marker TEXT,
    version_marker TEXT,
    complete INTEGER NOT NULL DEFAULT 0,
    pages INTEGER NOT NULL DEFAULT 0,
    entries INTEGER NOT NULL DEFAULT 0,
    last_key TEXT,
    last_key_seen INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE tasks (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    version_id TEXT NOT NULL,
    is_delete_marker INTEGER NOT NULL,
    is_latest INTEGER NOT NULL,
    size INTEGER NOT NULL,
    etag TEXT,
    last_modified TEXT,
    storage_class TEXT,
    history_pos INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    error_class TEXT,
    error_code TEXT,
    http_status INTEGER,
    last_error TEXT,
    dest_version_id TEXT,
    copy_method TEXT,
    upload_id TEXT,
    part_size INTEGER,
    parts INTEGER,
    etag_preserved INTEGER,
    started_at INTEGER,
    finished_at INTEGER,
    UNIQUE (key, version_id)
);
CREATE INDEX tasks_key ON tasks (key, id);
CREATE INDEX tasks_open ON tasks (key) WHERE state IN ('pending', 'in_progress');
INSERT INTO listing (id) VALUES (1);
";

/// v1 rows in listing order: key, version, pos, state, attempts, retries, error class,
/// code, status, message, dest version, method, upload, part size, parts, preserved.
const V1_ROWS: &str = "
INSERT INTO tasks (key, version_id, is_delete_marker, is_latest, size, etag, last_modified,
    storage_class, history_pos, state, attempts, retries, error_class, error_code, http_status,
    last_error, dest_version_id, copy_method, upload_id, part_size, parts, etag_preserved,
    started_at) VALUES
('a', 'a2', 0, 1, 100, '\"0123456789abcdef0123456789abcdef\"', '2024-01-02T03:04:05.000Z',
    'STANDARD', 0, 'done', 1, 2, NULL, NULL, NULL, NULL, 'd2', 'copy', NULL, NULL, NULL, NULL, 50),
('a', 'a1', 0, 0, 200, '\"abc-3\"', '2023-01-02T03:04:05.000Z', 'GLACIER_IR', 1, 'done', 1, 0,
    NULL, NULL, NULL, NULL, 'd1', 'multipart-copy', NULL, 5242880, 3, 1, 40),
('b', 'b3', 0, 1, 30, NULL, NULL, NULL, 0, 'pending', 0, 0, NULL, NULL, NULL, NULL, NULL, NULL,
    NULL, NULL, NULL, NULL, NULL),
('b', 'b2', 0, 0, 20, NULL, NULL, NULL, 1, 'failed', 2, 4, 'fatal', 'AccessDenied', 403,
    'dest: CopyObject failed (AccessDenied, HTTP 403)', NULL, NULL, NULL, NULL, NULL, NULL, 60),
('b', 'b1', 0, 0, 10, NULL, NULL, NULL, 2, 'in_progress', 1, 0, NULL, NULL, NULL, NULL, NULL,
    NULL, 'up-1', 5242880, 2, NULL, 100),
('c', 'c1', 0, 1, 7, NULL, NULL, NULL, 0, 'skipped', 1, 0, 'source-gone', NULL, NULL,
    'source version is gone', NULL, NULL, NULL, NULL, NULL, NULL, 70),
('d\tx', 'dm', 1, 1, 0, NULL, '2024-01-02T03:04:05.123Z', NULL, 0, 'pending', 0, 0, NULL, NULL,
    NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
UPDATE listing SET key_marker = 'd\tx', version_marker = 'dm', complete = 1, pages = 3,
    entries = 9, last_key = 'd\tx', last_key_seen = 1;
";

fn v1_file(dir: &Path, rows: &str) -> PathBuf {
    let path = dir.join("v1.db");
    let c = Connection::open(&path).unwrap();
    c.pragma_update(None, "journal_mode", "WAL").unwrap();
    c.execute_batch(&format!(
        "BEGIN; {V1_SCHEMA} PRAGMA user_version = 1; COMMIT;"
    ))
    .unwrap();
    c.execute(
        "INSERT INTO job (id, settings, created_at) VALUES (1, ?1, 5)",
        [serde_json::to_string(&settings()).unwrap()],
    )
    .unwrap();
    c.execute_batch(&rows.replace("\\t", "\t")).unwrap();
    drop(c);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    path
}

/// Opens an older file, which is migrated to the current schema version.
fn open_migrated(path: &Path) -> SqliteManifest {
    let m = SqliteManifest::open(path, false).unwrap();
    let version: i64 = m
        .conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    m
}

#[test]
fn v1_manifests_are_migrated_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = v1_file(dir.path(), V1_ROWS);
    let m = open_migrated(&path);
    assert_eq!(m.require_settings().unwrap(), settings());
    assert_eq!(
        m.listing().unwrap(),
        Listing {
            key_marker: Some("d\tx".into()),
            version_marker: Some("dm".into()),
            complete: true,
            pages: 3,
            entries: 9,
            last_key: Some("d\tx".into()),
            last_key_seen: 1,
        }
    );
    let c = m.counts().unwrap();
    let want = Counts {
        total: 7,
        pending: 2,
        in_progress: 1,
        done: 2,
        failed: 1,
        skipped: 1,
        blocked: 1,
        bytes_total: 367,
        bytes_done: 300,
        delete_markers: 1,
        retries: 6,
        attempts: 6,
        etag_preserved: 1,
        listing_complete: true,
        listed_entries: 9,
        ..Default::default()
    };
    assert_eq!(c, want);
    assert!(m.has_multi_version_key().unwrap());
    check_migrated_tasks(&m);
    check_migrated_problems(&m);
    #[cfg(unix)]
    for suffix in ["", "-wal", "-shm"] {
        assert_eq!(mode(&path, suffix), 0o600, "{suffix}");
    }
    // Opening again does nothing more.
    drop(m);
    assert_eq!(
        SqliteManifest::open(&path, false)
            .unwrap()
            .counts()
            .unwrap(),
        want
    );
}

// Every kind of v1 value, checked one by one.
// Long on purpose: a test that reads as one scenario from set-up to the checks.
fn check_migrated_tasks(m: &SqliteManifest) {
    let g = all_keys(m);
    let keys: Vec<&str> = g.iter().map(|g| g.key.as_str()).collect();
    assert_eq!(keys, ["b", "d\tx"]);
    let b: Vec<(&str, State)> = g[0]
        .tasks
        .iter()
        .map(|t| (t.entry.version_id.as_str(), t.state))
        .collect();
    assert_eq!(
        b,
        [
            ("b1", State::InProgress),
            ("b2", State::Failed),
            ("b3", State::Pending)
        ]
    );
    let b1 = &g[0].tasks[0];
    assert_eq!(
        (b1.upload_id.as_deref(), b1.started_at, b1.attempts),
        (Some("up-1"), Some(100), 1)
    );
    assert_eq!(g[0].tasks[1].error_class.as_deref(), Some("fatal"));
    let dm = &g[1].tasks[0];
    assert!(dm.entry.is_delete_marker && dm.entry.is_latest);
    assert_eq!(
        dm.entry.last_modified.as_deref(),
        Some("2024-01-02T03:04:05.123Z")
    );
    let up = m.open_uploads().unwrap();
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].entry.version_id, "b1");
    let row: (String, String, String, String, i64, i64, i64) = m
        .conn
        .query_row(
            "SELECT etag, last_modified, storage_class, copy_method, part_size, parts,
             etag_preserved FROM tasks WHERE version_id = 'a1'",
            [],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            },
        )
        .unwrap();
    let want = (
        "\"abc-3\"",
        "2023-01-02T03:04:05.000Z",
        "GLACIER_IR",
        "multipart-copy",
    );
    assert_eq!(
        (
            row.0.as_str(),
            row.1.as_str(),
            row.2.as_str(),
            row.3.as_str()
        ),
        want
    );
    assert_eq!((row.4, row.5, row.6), (5242880, 3, 1));
    let a2: (String, String) = m
        .conn
        .query_row(
            "SELECT etag, dest_version_id FROM tasks WHERE version_id = 'a2'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(a2.0, "\"0123456789abcdef0123456789abcdef\"");
    assert_eq!(a2.1, "d2");
}

fn check_migrated_problems(m: &SqliteManifest) {
    let p = m.problems(100).unwrap();
    let rows: Vec<(&str, &str, Option<&str>)> = p
        .iter()
        .map(|p| {
            (
                p.version_id.as_str(),
                p.state.as_str(),
                p.error_code.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("b2", "failed", Some("AccessDenied")),
            ("b3", "blocked", None),
            ("c1", "skipped", None)
        ]
    );
    assert_eq!(p[0].http_status, Some(403));
    assert_eq!(p[2].error_class.as_deref(), Some("source-gone"));
    assert_eq!(p[2].message.as_deref(), Some("source version is gone"));
}

/// Opening `path` fails with a migration error whose reason contains `why`; the file's
/// schema version after, and a connection to it.
fn migration_refused(path: &Path, why: &str) -> (i64, Connection) {
    match SqliteManifest::open(path, false) {
        Err(ManifestError::Migration(_, reason)) => assert!(reason.contains(why), "{reason}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    let c = Connection::open(path).unwrap();
    let version = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    (version, c)
}

#[test]
fn a_v1_file_that_cannot_be_migrated_is_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let rows = V1_ROWS.replace(
        "'pending', 0, 0, NULL, NULL, NULL, NULL, NULL, NULL,\n    NULL",
        "'paused', 0, 0, NULL, NULL, NULL, NULL, NULL, NULL,\n    NULL",
    );
    assert_ne!(rows, V1_ROWS);
    let path = v1_file(dir.path(), &rows);
    let (version, c) = migration_refused(&path, "\"paused\"");
    let n: i64 = c
        .query_row("SELECT count(*) FROM tasks", [], |r| r.get(0))
        .unwrap();
    assert_eq!((version, n), (1, 7));
}

/// Turns a current manifest into the file a v2 build wrote: `errors` without `side` and
/// `op`, the v2 `tasks` view, no side names, `user_version` 2 (v3 added only those).
fn as_v2(path: &Path) {
    let v3_columns = "\n    (SELECT name FROM names WHERE kind = 'side' AND code = e.side) AS error_side,\n    e.op AS error_op,";
    let view = schema::view_sql();
    assert!(view.contains(v3_columns));
    let v2_view = view.replace(v3_columns, "");
    let c = Connection::open(path).unwrap();
    c.execute_batch(&format!(
        "BEGIN; DROP VIEW tasks; ALTER TABLE errors DROP COLUMN side;
         ALTER TABLE errors DROP COLUMN op; DELETE FROM names WHERE kind = 'side';
         {v2_view} PRAGMA user_version = 2; COMMIT;"
    ))
    .unwrap();
}

/// A v2 file with the tasks of [`key_with_a_failed_version`] (its v2 task failed).
fn v2_file() -> (tempfile::TempDir, PathBuf, Vec<i64>) {
    let (d, path, m, ids) = key_with_a_failed_version();
    drop(m);
    as_v2(&path);
    (d, path, ids)
}

/// How many of the columns named in `names` (an SQL list) the `errors` table has.
fn error_columns(c: &Connection, names: &str) -> i64 {
    c.query_row(
        &format!("SELECT count(*) FROM pragma_table_info('errors') WHERE name IN ({names})"),
        [],
        |r| r.get(0),
    )
    .unwrap()
}

fn side_and_op_in_view(m: &SqliteManifest, version: &str) -> (Option<String>, Option<String>) {
    m.conn
        .query_row(
            "SELECT error_side, error_op FROM tasks WHERE version_id = ?1",
            [version],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
}

/// A v2 manifest is migrated on open: its error rows keep what v2 recorded (no side or
/// operation: reports read those from the message), and failures recorded from then on keep
/// the S3 error's side and operation, in `problems` and in the `tasks` view.
#[test]
fn v2_manifests_are_migrated_and_then_record_error_sides() {
    let (_d, path, ids) = v2_file();
    let v2 = Connection::open(&path).unwrap();
    assert_eq!(
        error_columns(&v2, "'side', 'op'"),
        0,
        "v2 has no side or op"
    );
    drop(v2);

    let m = open_migrated(&path);
    let p = m.problems(10).unwrap();
    assert_eq!(
        (p[0].version_id.as_str(), p[0].state.as_str()),
        ("v2", "failed")
    );
    assert_eq!(
        (p[0].error_code.as_deref(), p[0].http_status),
        (Some("AccessDenied"), Some(403))
    );
    assert_eq!((p[0].error_side, p[0].error_op.as_deref()), (None, None));
    assert_eq!(
        p[0].message.as_deref(),
        Some("dest: CopyObject failed (AccessDenied, HTTP 403): no")
    );
    assert_eq!(side_and_op_in_view(&m, "v2"), (None, None));
    check_recount(&m);
    drop(m);

    let source_denied = S3Error {
        side: Side::Source,
        op: "GetObject",
        ..error("AccessDenied", 403)
    };
    write_all(
        &path,
        vec![
            Update::Started { id: ids[2], at: 2 },
            Update::Finished {
                id: ids[2],
                outcome: Outcome::Failed {
                    error: source_denied,
                    retries: 0,
                },
            },
        ],
    );
    let m = SqliteManifest::open(&path, false).unwrap();
    let p = m.problems(10).unwrap();
    let v3 = p.iter().find(|p| p.version_id == "v3").unwrap();
    assert_eq!(v3.state, "failed");
    assert_eq!(
        (v3.error_side, v3.error_op.as_deref()),
        (Some(Side::Source), Some("GetObject"))
    );
    assert_eq!(
        side_and_op_in_view(&m, "v3"),
        (Some("source".into()), Some("GetObject".into()))
    );
    let blocked = p.iter().find(|p| p.version_id == "v4").unwrap();
    assert_eq!(
        (
            blocked.state.as_str(),
            blocked.error_side,
            blocked.error_op.as_deref()
        ),
        ("blocked", None, None)
    );
}

/// A v2 file that cannot be migrated is left as it was (one transaction).
#[test]
fn a_v2_file_that_cannot_be_migrated_is_left_as_it_was() {
    let (_d, path, _ids) = v2_file();
    // A column in the way of the migration's.
    let c = Connection::open(&path).unwrap();
    c.execute_batch("ALTER TABLE errors ADD COLUMN op TEXT")
        .unwrap();
    drop(c);
    let (version, c) = migration_refused(&path, "not a v2 manifest");
    assert_eq!((version, error_columns(&c, "'side'")), (2, 0));
}

/// After a failed commit the writer stops: every later call says so, and the file keeps
/// only what was committed before.
#[tokio::test]
async fn writer_stops_after_a_failed_commit() {
    let (_d, path, mut m) = new_manifest();
    m.insert_page(&[task("k", "1", 0)], &Listing::default())
        .unwrap();
    let id = ids_of(&m, "k")[0];
    let w = m.into_writer();
    w.send_durable(Update::Started { id, at: 1 }).await.unwrap();
    // An upload for a task that does not exist breaks a deferred foreign key: the COMMIT
    // of its group fails.
    let bad = Update::Upload {
        id: id + 1,
        upload_id: Some("u".into()),
        part_size: None,
        parts: None,
    };
    let e = w.send_durable(bad).await.unwrap_err();
    assert!(
        matches!(&e, ManifestError::WriterGone(why) if why.contains("FOREIGN KEY")),
        "{e}"
    );
    assert!(e.to_string().contains(path.to_str().unwrap()), "{e}");
    let later = Update::Finished {
        id,
        outcome: done(0),
    };
    assert!(matches!(
        w.send(later.clone()),
        Err(ManifestError::WriterGone(_))
    ));
    assert!(matches!(
        w.send_durable(later).await,
        Err(ManifestError::WriterGone(_))
    ));
    assert!(matches!(w.flush().await, Err(ManifestError::WriterGone(_))));
    assert!(matches!(
        w.next_key_groups(0, 1).await,
        Err(ManifestError::WriterGone(_))
    ));
    w.close();
    let m = SqliteManifest::open(&path, false).unwrap();
    let c = m.counts().unwrap();
    assert_eq!(
        (c.in_progress, c.done),
        (1, 0),
        "the started task was kept, nothing after"
    );
    assert!(m.open_uploads().unwrap().is_empty());
}

#[tokio::test]
async fn claims_mark_each_keys_first_open_task_and_released_claims_restore_it() {
    let (_d, path, mut m) = new_manifest();
    m.insert_page(
        &[
            task("a", "2", 0),
            task("a", "1", 1),
            task("b", "1", 0),
            task("c", "1", 0),
        ],
        &Listing::default(),
    )
    .unwrap();
    let (a, b) = (ids_of(&m, "a"), ids_of(&m, "b"));
    let w = m.into_writer();
    // b's task was attempted by an earlier run (in doubt); a's first is done.
    w.send_durable(Update::Started { id: b[0], at: 7 })
        .await
        .unwrap();
    w.send(Update::Finished {
        id: a[0],
        outcome: done(0),
    })
    .unwrap();
    let g = w.claim_key_groups(0, 10, 50).await.unwrap();
    let claimed: Vec<Option<i64>> = g.iter().map(|g| g.claimed).collect();
    assert_eq!(claimed[..2], [Some(a[1]), Some(b[0])], "first open task");
    // The tasks read keep their state from before the claim.
    assert_eq!(g[1].tasks[0].attempts, 1);
    assert_eq!(g[1].tasks[0].started_at, Some(7));
    let again = w.next_key_groups(0, 10).await.unwrap();
    assert_eq!(again[1].tasks[0].attempts, 2, "one attempt more");
    assert_eq!(again[1].tasks[0].started_at, Some(50));
    assert_eq!(again[0].tasks[1].state, State::InProgress);
    // The run stops before attempting them: the claims are given back.
    for g in &g {
        let t = g.tasks.iter().find(|t| Some(t.id) == g.claimed).unwrap();
        w.send(Update::Released {
            id: t.id,
            state: t.state,
            started_at: t.started_at,
            attempt_stamped: t.attempt_stamped,
        })
        .unwrap();
    }
    let after = w.next_key_groups(0, 10).await.unwrap();
    let before: Vec<_> = g
        .iter()
        .flat_map(|g| &g.tasks)
        .map(|t| (t.id, t.state, t.attempts, t.started_at))
        .collect();
    let now: Vec<_> = after
        .iter()
        .flat_map(|g| &g.tasks)
        .map(|t| (t.id, t.state, t.attempts, t.started_at))
        .collect();
    assert_eq!(now, before, "every task as it was before the claim");
    w.close();
    let c = SqliteManifest::open(&path, false)
        .unwrap()
        .counts()
        .unwrap();
    assert_eq!((c.pending, c.in_progress, c.done), (2, 1, 1), "{c:?}");
}

#[test]
fn two_rules_to_one_bucket_block_and_claim_per_bucket() {
    use crate::config::{DestOptions, Destination};
    let (_d, path, mut m) = new_manifest();
    // Two rules send key k to bucket "same" (destination ids 0 and 1), a third to "other".
    let mut s = settings();
    s.destinations = [("r1", "same"), ("r2", "same"), ("r3", "other")]
        .iter()
        .map(|(rule, bucket)| Destination {
            bucket: bucket.to_string(),
            prefix: String::new(),
            options: DestOptions {
                rule: rule.to_string(),
                ..DestOptions::default()
            },
        })
        .collect();
    m.store_settings(&s).unwrap();
    let to = |v: &str, pos: u64, dest: i64| NewTask {
        dest,
        ..task("k", v, pos)
    };
    // v1 goes by rule r1, v2 by rule r2 (a tag rule, say), both to "same"; v2 also to "other".
    let page = vec![to("v2", 0, 1), to("v2", 0, 2), to("v1", 1, 0)];
    m.insert_page(&page, &Listing::default()).unwrap();
    let g = all_keys(&m);
    let v1 = g[0]
        .tasks
        .iter()
        .find(|t| t.entry.version_id == "v1")
        .unwrap()
        .id;
    write_all(
        &path,
        vec![
            Update::Started { id: v1, at: 1 },
            Update::Finished {
                id: v1,
                outcome: Outcome::Failed {
                    error: error("AccessDenied", 403),
                    retries: 0,
                },
            },
        ],
    );
    let c = m.counts().unwrap();
    assert_eq!(
        (c.failed, c.blocked),
        (1, 1),
        "v2 to 'same' waits behind v1"
    );
    let blocked: Vec<(String, i64)> = m
        .problems(10)
        .unwrap()
        .into_iter()
        .filter(|p| p.state == "blocked")
        .map(|p| (p.version_id, p.dest))
        .collect();
    assert_eq!(blocked, [("v2".to_string(), 1)]);
    drop(m);
    // A run claims v2 to "other" (not blocked), never v2 to "same".
    let w = SqliteManifest::open(&path, false).unwrap().into_writer();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let g = rt.block_on(w.claim_key_groups(0, 10, 50)).unwrap();
    let claimed = g[0].claimed.expect("a task is claimed");
    let t = g[0].tasks.iter().find(|t| t.id == claimed).unwrap();
    assert_eq!((t.entry.version_id.as_str(), t.dest), ("v2", 2));
    w.close();
}
