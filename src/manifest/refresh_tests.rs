//! manifest::refresh_tests: what a refresh plans, as the copier and `status` see it: `null`
//! versions matched by content (an overwrite in place is a new task), keys gone from a
//! source without versioning (a delete task, or named as kept), entries selected below
//! planned ones (stored skipped, out of order), and a refresh killed between any two pages
//! and resumed (replaying its last page) planning exactly what an uninterrupted one does.
//! Its listed entries and pages are shared with `pg::plan`'s tests of the same cases.

use std::path::Path;

use super::*;
use crate::s3::VersionEntry;

/// A listed `null` entry of an unversioned source.
pub(super) fn null(key: &str, etag: &str, secs: u32) -> NewTask {
    NewTask {
        entry: VersionEntry {
            key: key.into(),
            version_id: "null".into(),
            is_latest: true,
            size: etag.len() as u64,
            etag: Some(format!("\"{etag}\"")),
            last_modified: Some(format!("2026-01-01T00:00:{secs:02}.000Z")),
            ..VersionEntry::default()
        },
        history_pos: 0,
        dest: 0,
    }
}

pub(super) fn version(key: &str, v: &str, pos: u64) -> NewTask {
    NewTask {
        entry: VersionEntry {
            key: key.into(),
            version_id: v.into(),
            is_latest: pos == 0,
            size: 1,
            etag: Some(format!("\"{v}\"")),
            ..VersionEntry::default()
        },
        history_pos: pos,
        dest: 0,
    }
}

pub(super) fn done_listing() -> Listing {
    Listing {
        complete: true,
        ..Listing::default()
    }
}

pub(super) fn page_listing() -> Listing {
    Listing {
        pages: 1,
        ..Listing::default()
    }
}

/// Keys of the tasks, in listing order, once each.
fn keys_of(tasks: &[NewTask]) -> Vec<String> {
    let mut keys: Vec<String> = tasks.iter().map(|t| t.entry.key.clone()).collect();
    keys.dedup();
    keys
}

/// Every task of `key`, oldest first: (version id, delete marker, refresh, state).
fn rows(m: &SqliteManifest, key: &str) -> Vec<(String, bool, i64, State)> {
    m.tasks_of_key(key)
        .unwrap()
        .into_iter()
        .map(|t| {
            let refresh = m
                .conn
                .query_row("SELECT refresh FROM task WHERE id = ?1", [t.id], |r| {
                    r.get(0)
                })
                .unwrap();
            (
                t.entry.version_id,
                t.entry.is_delete_marker,
                refresh,
                t.state,
            )
        })
        .collect()
}

pub(super) fn row(v: &str, dm: bool, refresh: i64, state: State) -> (String, bool, i64, State) {
    (v.to_string(), dm, refresh, state)
}

pub(super) fn replicated(_: &str) -> Vec<i64> {
    vec![0]
}

pub(super) fn not_replicated(_: &str) -> Vec<i64> {
    Vec::new()
}

fn listed(
    m: &mut SqliteManifest,
    partition: i64,
    tasks: &[NewTask],
    also: &[&str],
    cp: &Listing,
    deletes: &dyn Fn(&str) -> Vec<i64>,
) {
    let mut keys = keys_of(tasks);
    keys.extend(also.iter().map(|k| k.to_string()));
    keys.sort();
    let page = ListedPage {
        tasks,
        keys: &keys,
        others: &[],
        deletes,
    };
    m.insert_listed_page(partition, &page, cp).unwrap();
}

#[test]
fn an_overwritten_null_version_is_planned_again_and_an_unchanged_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = SqliteManifest::open(&dir.path().join("m.db"), true).unwrap();
    let plan = [
        null("a", "aaa", 1),
        null("b", "bbb", 1),
        null("c", "ccc", 1),
    ];
    m.insert_page(&plan, &done_listing()).unwrap();
    assert_eq!(m.start_refresh_of(false).unwrap(), Some(1));
    // `a` overwritten in place (same id `null`, other bytes), `b` as it was, `c` rewritten
    // with the same bytes a second later.
    let refresh = [
        null("a", "AAAA", 5),
        null("b", "bbb", 1),
        null("c", "ccc", 6),
    ];
    listed(&mut m, 0, &refresh, &[], &done_listing(), &replicated);
    assert_eq!(
        rows(&m, "a"),
        [
            row("null", false, 0, State::Pending),
            row("null", false, 1, State::Pending)
        ]
    );
    assert_eq!(rows(&m, "b"), [row("null", false, 0, State::Pending)]);
    assert_eq!(rows(&m, "c").len(), 2, "a new write is a new task");
    // The new task carries the new content, and is the key's last (copied last).
    let a = m.tasks_of_key("a").unwrap();
    assert_eq!(a[1].entry.etag.as_deref(), Some("\"AAAA\""));
    assert_eq!(a[1].entry.size, 4);
    let r = m.refreshes().unwrap();
    assert_eq!((r[1].tasks, r[1].matched, r[1].deleted), (2, 1, 0));
    // One new version per key per refresh replaces the last: no versioned destination needed.
    assert!(!m.has_multi_version_key().unwrap());
    // The same page again (a replay) adds nothing.
    listed(&mut m, 0, &refresh, &[], &done_listing(), &replicated);
    assert_eq!(m.counts().unwrap().total, 5);
}

#[test]
fn versioned_entries_still_match_by_version_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = SqliteManifest::open(&dir.path().join("m.db"), true).unwrap();
    m.insert_page(&[version("k", "v1", 0)], &done_listing())
        .unwrap();
    assert_eq!(m.start_refresh_of(true).unwrap(), Some(1));
    // The same version listed with another ETag text (a server's other spelling) is the
    // same version: ids are identities on a versioned source.
    let mut again = version("k", "v1", 0);
    again.entry.etag = Some("\"other\"".into());
    listed(&mut m, 0, &[again], &[], &done_listing(), &replicated);
    assert_eq!(m.counts().unwrap().total, 1);
}

#[test]
fn keys_gone_from_an_unversioned_source_get_one_delete_each() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = SqliteManifest::open(&dir.path().join("m.db"), true).unwrap();
    let plan = [null("a", "a", 1), null("b", "b", 1), null("c", "c", 1)];
    m.insert_page(&plan, &done_listing()).unwrap();
    assert_eq!(m.start_refresh_of(false).unwrap(), Some(1));
    // `b` is gone; `c` is listed but no longer selected (kept); `d` is new.
    let page = [null("a", "a", 1), null("d", "d", 2)];
    listed(&mut m, 0, &page, &["c"], &done_listing(), &replicated);
    assert_eq!(
        rows(&m, "b"),
        [
            row("null", false, 0, State::Pending),
            row("null", true, 1, State::Pending)
        ]
    );
    assert_eq!(rows(&m, "c").len(), 1, "listed, not selected: not deleted");
    let r = m.refreshes().unwrap();
    assert_eq!((r[1].tasks, r[1].deleted, r[1].not_deleted), (2, 1, 0));
    let c = m.counts().unwrap();
    assert_eq!((c.delete_markers, c.deleted_at_source), (1, 0));
    // Still gone at the next refresh: its newest task is the delete, nothing more.
    assert_eq!(m.start_refresh_of(false).unwrap(), Some(2));
    listed(&mut m, 0, &page, &["c"], &done_listing(), &replicated);
    assert_eq!(rows(&m, "b").len(), 2);
    assert_eq!(m.refreshes().unwrap()[2].deleted, 0);
    // Back at the source: copied again, after the delete.
    assert_eq!(m.start_refresh_of(false).unwrap(), Some(3));
    let back = [null("a", "a", 1), null("b", "b2", 9), null("d", "d", 2)];
    listed(&mut m, 0, &back, &["c"], &done_listing(), &replicated);
    assert_eq!(
        rows(&m, "b").last(),
        Some(&row("null", false, 3, State::Pending))
    );
}

#[test]
fn without_replicated_deletes_gone_keys_are_counted_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = SqliteManifest::open(&dir.path().join("m.db"), true).unwrap();
    let plan = [null("a", "a", 1), null("b b", "b", 1), null("c", "c", 1)];
    m.insert_page(&plan, &done_listing()).unwrap();
    assert_eq!(m.start_refresh_of(false).unwrap(), Some(1));
    listed(
        &mut m,
        0,
        &[null("a", "a", 1)],
        &[],
        &done_listing(),
        &not_replicated,
    );
    let c = m.counts().unwrap();
    assert_eq!(
        c.total, 3,
        "no task for a delete the job does not replicate"
    );
    assert_eq!(c.deleted_at_source, 2);
    assert_eq!(c.deleted_at_source_keys, ["b b", "c"]);
    assert_eq!(m.refreshes().unwrap()[1].not_deleted, 2);
    let json = serde_json::to_value(&c).unwrap();
    assert_eq!(json["deleted_at_source"], 2);
    // A versioned source: keys that vanish were deleted for good; nothing is planned.
    assert_eq!(m.start_refresh_of(true).unwrap(), Some(2));
    listed(&mut m, 0, &[], &[], &done_listing(), &replicated);
    let c = m.counts().unwrap();
    assert_eq!((c.total, c.deleted_at_source), (3, 0));
}

#[test]
fn an_older_entry_selected_later_is_stored_skipped_not_written_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    let mut m = SqliteManifest::open(&path, true).unwrap();
    // Plan selected v3 and v1 of `k` (v2 was not selected then, e.g. by its tags).
    m.insert_page(
        &[version("k", "v3", 0), version("k", "v1", 2)],
        &done_listing(),
    )
    .unwrap();
    assert_eq!(m.start_refresh_of(true).unwrap(), Some(1));
    // The refresh lists v4 (new, newest), v3 (planned), then on its next page, after a
    // restart, v2 (now selected: below v3) and v1.
    let first = [version("k", "v4", 0), version("k", "v3", 1)];
    listed(&mut m, 0, &first, &[], &page_listing(), &replicated);
    drop(m);
    let mut m = SqliteManifest::open(&path, false).unwrap();
    let second = [version("k", "v2", 2), version("k", "v1", 3)];
    listed(&mut m, 0, &second, &[], &done_listing(), &replicated);
    assert_eq!(
        rows(&m, "k"),
        [
            row("v1", false, 0, State::Pending),
            row("v3", false, 0, State::Pending),
            row("v2", false, 1, State::Skipped),
            row("v4", false, 1, State::Pending),
        ]
    );
    let c = m.counts().unwrap();
    assert_eq!((c.skipped, c.out_of_order), (1, 1));
    assert_eq!(m.refreshes().unwrap()[1].out_of_order, 1);
    let p = m.problems(10).unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].version_id, "v2");
    assert_eq!(p[0].error_code.as_deref(), Some(OUT_OF_ORDER));
    assert!(
        p[0].message.as_deref().unwrap().contains("out of order"),
        "{p:?}"
    );
    // The skipped entry is not planned again by a later refresh.
    assert_eq!(m.start_refresh_of(true).unwrap(), Some(2));
    let all = [
        version("k", "v4", 0),
        version("k", "v3", 1),
        version("k", "v2", 2),
        version("k", "v1", 3),
    ];
    listed(&mut m, 0, &all, &[], &done_listing(), &replicated);
    assert_eq!(m.counts().unwrap().total, 4);
}

/// The pages of a refresh of two partitions (keys before "m", and from "m"): overwrites,
/// deletions, new keys, unselected keys.
pub(super) fn refresh_pages() -> Vec<(i64, Vec<NewTask>, Vec<&'static str>, bool)> {
    vec![
        (
            0,
            vec![null("a", "a2", 7), null("b", "b", 1)],
            vec![],
            false,
        ),
        (0, vec![null("ca", "ca", 8)], vec!["d"], true),
        (1, vec![null("m", "m", 1)], vec![], false),
        (1, vec![null("p", "p2", 9), null("z", "z", 8)], vec![], true),
    ]
}

/// Plans a, b, c, d, m, n, o, p in two partitions, then refreshes with `refresh_pages`,
/// killed (the manifest closed) after `kill_after` pages: the lister then resumes from the
/// last checkpoint, so the page committed last is listed again.
fn refresh_killed_after(
    dir: &Path,
    kill_after: Option<usize>,
) -> Vec<Vec<(String, bool, i64, State)>> {
    let path = dir.join("m.db");
    let mut m = SqliteManifest::open(&path, true).unwrap();
    assert!(m.split_partitions(&["m".to_string()]).unwrap());
    let first = ["a", "b", "c", "d"].map(|k| null(k, k, 1));
    let second = ["m", "n", "o", "p"].map(|k| null(k, k, 1));
    listed(&mut m, 0, &first, &[], &done_listing(), &replicated);
    listed(&mut m, 1, &second, &[], &done_listing(), &replicated);
    assert_eq!(m.start_refresh_of(false).unwrap(), Some(1));
    let pages = refresh_pages();
    let mut i = 0;
    let mut killed = false;
    while i < pages.len() {
        let (part, tasks, also, last) = &pages[i];
        let cp = Listing {
            complete: *last,
            pages: i as u64 + 1,
            ..Listing::default()
        };
        listed(&mut m, *part, tasks, also, &cp, &replicated);
        if Some(i) == kill_after && !killed {
            killed = true;
            drop(m);
            m = SqliteManifest::open(&path, false).unwrap();
            continue; // the same page again
        }
        i += 1;
    }
    ["a", "b", "c", "ca", "d", "m", "n", "o", "p", "z"]
        .iter()
        .map(|k| rows(&m, k))
        .collect()
}

#[test]
fn a_refresh_with_deletions_killed_anywhere_plans_the_same() {
    let whole = refresh_killed_after(tempfile::tempdir().unwrap().path(), None);
    // `c`, `n` and `o` deleted (one delete each), `a` and `p` overwritten, `d` listed
    // without being selected.
    let deleted: Vec<usize> = whole
        .iter()
        .enumerate()
        .filter(|(_, r)| r.last().is_some_and(|x| x.1))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(deleted, [2, 6, 7], "{whole:?}");
    assert_eq!(whole[0].len(), 2);
    assert_eq!(whole[8].len(), 2);
    assert_eq!(whole[4].len(), 1);
    for kill in 0..refresh_pages().len() {
        let dir = tempfile::tempdir().unwrap();
        let resumed = refresh_killed_after(dir.path(), Some(kill));
        assert_eq!(resumed, whole, "killed after page {kill}");
        let m = SqliteManifest::open(&dir.path().join("m.db"), false).unwrap();
        let r = m.refreshes().unwrap();
        assert_eq!(
            (r[1].deleted, r[1].tasks),
            (3, 7),
            "killed after page {kill}"
        );
    }
}

#[test]
fn an_entry_below_a_planned_one_no_longer_selected_is_out_of_order_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    let mut m = SqliteManifest::open(&path, true).unwrap();
    // Plan selected v3 (then in the filtered storage class, say) and not v2.
    m.insert_page(&[version("k", "v3", 0)], &done_listing())
        .unwrap();
    assert_eq!(m.start_refresh_of(true).unwrap(), Some(1));
    // Now v3 is not selected (a lifecycle transition), v2 is: on the next page, after a
    // restart.
    let v3 = version("k", "v3", 0).entry;
    let first = ListedPage {
        tasks: &[],
        keys: &["k".to_string()],
        others: &[(v3, 0)],
        deletes: &replicated,
    };
    m.insert_listed_page(0, &first, &page_listing()).unwrap();
    drop(m);
    let mut m = SqliteManifest::open(&path, false).unwrap();
    listed(
        &mut m,
        0,
        &[version("k", "v2", 1)],
        &[],
        &done_listing(),
        &replicated,
    );
    assert_eq!(
        rows(&m, "k"),
        [
            row("v3", false, 0, State::Pending),
            row("v2", false, 1, State::Skipped)
        ]
    );
    // An entry not selected that was never planned does not hold anything back.
    assert_eq!(m.start_refresh_of(true).unwrap(), Some(2));
    let other = ListedPage {
        tasks: &[version("j", "w1", 1)],
        keys: &["j".to_string()],
        others: &[(version("j", "w2", 0).entry, 0)],
        deletes: &replicated,
    };
    m.insert_listed_page(0, &other, &done_listing()).unwrap();
    assert_eq!(rows(&m, "j"), [row("w1", false, 2, State::Pending)]);
}

/// Marks a key's first task failed the way the copier does when a read finds the source
/// changed since its listing.
fn fail_as_changed(m: &SqliteManifest, key: &str) {
    let id = m.tasks_of_key(key).unwrap()[0].id;
    m.conn
        .execute(
            "UPDATE task SET state = 3, error_class = ?2 WHERE id = ?1",
            params![id, super::codec::class_code(crate::s3::ErrorClass::Fatal)],
        )
        .unwrap();
    m.conn
        .execute(
            "INSERT INTO errors (task, code, message) VALUES (?1, 'SourceChanged', 'changed')",
            [id],
        )
        .unwrap();
}

#[test]
fn a_refresh_settles_a_null_version_that_failed_as_changed_once_it_plans_its_replacement() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = SqliteManifest::open(&dir.path().join("m.db"), true).unwrap();
    let plan = [null("a", "a1", 1), null("b", "b1", 1), null("c", "c1", 1)];
    m.insert_page(&plan, &done_listing()).unwrap();
    // `a` and `b` were overwritten while the run copied them; `c` failed the same way
    // but is listed unchanged by the refresh (a read that will be retried).
    for k in ["a", "b", "c"] {
        fail_as_changed(&m, k);
    }
    let c = m.counts().unwrap();
    assert_eq!((c.failed, c.blocked), (3, 0));
    assert_eq!(m.start_refresh_of(false).unwrap(), Some(1));
    // `a` has new contents, `b` is deleted at the source (a delete is planned), `c` as it was.
    listed(
        &mut m,
        0,
        &[null("a", "a2", 5), null("c", "c1", 1)],
        &[],
        &done_listing(),
        &replicated,
    );
    assert_eq!(
        rows(&m, "a"),
        [
            row("null", false, 0, State::Skipped),
            row("null", false, 1, State::Pending)
        ]
    );
    assert_eq!(
        rows(&m, "b"),
        [
            row("null", false, 0, State::Skipped),
            row("null", true, 1, State::Pending)
        ]
    );
    assert_eq!(rows(&m, "c"), [row("null", false, 0, State::Failed)]);
    let c = m.counts().unwrap();
    assert_eq!((c.failed, c.blocked, c.skipped, c.pending), (1, 0, 2, 2));
    let mut reasons = Vec::new();
    m.for_each_problem(|p| {
        reasons.push((p.key, p.state, p.message.unwrap_or_default()));
        Ok(())
    })
    .unwrap();
    assert!(
        reasons.iter().any(|(k, s, why)| k == "a"
            && s == "skipped"
            && why.starts_with("replaced at the source before it was copied")),
        "{reasons:?}"
    );
}
