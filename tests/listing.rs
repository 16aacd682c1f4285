//! Parallel listing and refresh (issues 11 and 12), against the server under test:
//! - `plan --list-concurrency 4` over many prefixes and odd keys (unicode, spaces, `+`, `%`,
//!   keys equal to a prefix boundary, keys without "/", histories of versions and delete
//!   markers spanning pages of 3 entries), killed with SIGKILL several times while it lists,
//!   then finished: every version and delete marker is in the manifest exactly once, each
//!   key's history in order, the same as a sequential listing and as the source.
//! - `plan --refresh` after new writes (new versions, delete markers, new keys), killed once,
//!   finished, then `run`: exactly the new entries were added, and the destination is an
//!   exact replica again.
//! - `seed` on moto: a round that takes over a second is still followed in a later second.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// One task of a key as the manifest orders it: (version id, delete marker, refresh,
/// place in its listing's history).
type Row = (String, bool, i64, i64);

/// Keys under many prefixes, keys equal to a prefix or to a split boundary, keys without
/// "/", and the odd keys of the kit.
fn key_names() -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for p in 0..10 {
        keys.extend((0..10).map(|i| format!("p{p:02}/{i:02}.txt")));
    }
    for k in [
        "p", "p03", "p03/", "p05/", "q", "a+b", "a%2Bb", "a b", "loose",
    ] {
        keys.push(k.into());
    }
    keys.extend((0..8).map(|i| format!("loose-{i}")));
    keys.extend(["ünï/ß", "日本/語", "😀", "z%", "z+"].map(String::from));
    keys.extend(odd_keys());
    keys
}

/// Round 1: every key; round 2: a second version of every other key; round 3: a delete
/// marker on every third; round 4: a version again on every fifth.
fn corpus(keys: &[String]) -> Vec<Vec<Op>> {
    let mut rounds = vec![Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for (i, k) in keys.iter().enumerate() {
        rounds[0].push(Op::put(k, format!("v1 {k}")));
        if i % 2 == 0 {
            rounds[1].push(Op::put(k, format!("v2 {k}")));
        }
        if i % 3 == 0 {
            rounds[2].push(Op::Delete { key: k.clone() });
        }
        if i % 5 == 0 {
            rounds[3].push(Op::put(k, format!("v3 {k}")));
        }
    }
    rounds
}

/// Starts the binary with listing pages of `page` entries.
fn spawn(args: &[String], page: u32) -> Child {
    cmd(&strs(args))
        .args(["--list-page-size", &page.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn s3-backfill")
}

/// Runs the child to its end and asserts it succeeded.
fn finish(args: &[String], page: u32) -> Output {
    let o = spawn(args, page).wait_with_output().expect("wait");
    expect_code(&o, 0);
    o
}

/// Kills `args` (with pages of `page`) at growing moments, `tries` times at most, then lets
/// it finish. Returns the kills that landed while the listing was under way (started, not
/// complete), and the output of the process that finished.
async fn kill_while_listing(args: &[String], m: &Path, page: u32, tries: u32) -> (u32, Output) {
    let mut during = 0;
    for i in 0..tries {
        let at = Duration::from_millis(150 + 150 * u64::from(i));
        let (killed, o) = kill_after(spawn(args, page), at).await;
        if !killed {
            expect_code(&o, 0);
            return (during, o);
        }
        let st = try_status(m);
        println!("kill #{i} at {at:?}: {st:?}");
        if st.is_some_and(|s| s.listed_entries > 0 && !s.listing_complete) {
            during += 1;
        }
    }
    (during, finish(args, page))
}

/// Each key's tasks in the manifest, in the copier's order (oldest first).
fn manifest_histories(m: &Path) -> BTreeMap<String, Vec<Row>> {
    let conn = rusqlite::Connection::open_with_flags(m, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the manifest read-only");
    let mut stmt = conn
        .prepare(
            "SELECT key, version_id, is_delete_marker, refresh, history_pos FROM tasks
             ORDER BY id",
        )
        .expect("prepare");
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                (r.get(1)?, r.get::<_, i64>(2)? == 1, r.get(3)?, r.get(4)?),
            ))
        })
        .expect("query");
    let mut out: BTreeMap<String, Vec<Row>> = BTreeMap::new();
    for r in rows {
        let (key, row) = r.expect("row");
        out.entry(key).or_default().push(row);
    }
    for rows in out.values_mut() {
        rows.sort_by_key(|r: &Row| (r.2, -r.3));
    }
    out
}

fn partitions(m: &Path) -> i64 {
    let conn = rusqlite::Connection::open_with_flags(m, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the manifest read-only");
    conn.query_row("SELECT count(*) FROM partitions", [], |r| r.get(0))
        .expect("partitions")
}

/// Asserts each key's tasks are its source history exactly (version ids and kinds, oldest
/// first), each version once.
async fn assert_matches_source(c: &aws_sdk_s3::Client, src: &str, m: &Path) {
    let source = histories(c, src, "").await;
    let planned = manifest_histories(m);
    let keys: Vec<&String> = source.keys().collect();
    assert_eq!(planned.keys().collect::<Vec<_>>(), keys, "the same keys");
    for (key, h) in &source {
        let want: Vec<(&str, bool)> = h
            .iter()
            .map(|v| (v.version_id.as_str(), v.delete_marker))
            .collect();
        let got: Vec<(&str, bool)> = planned[key].iter().map(|r| (r.0.as_str(), r.1)).collect();
        assert_eq!(got, want, "history of {key:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_plan_killed_lists_every_version_once_in_order() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("plist-src"), bucket("plist-dst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    let keys = key_names();
    seed(&c, &src, corpus(&keys)).await;
    let entries = entry_count(&c, &src).await;

    let (_dir, m) = manifest();
    let job = Job::new(&src, &dst, &m).endpoint(&ep).extra(&[
        "--delete-markers",
        "--list-concurrency",
        "4",
    ]);
    let (during, _) = kill_while_listing(&job.plan_args(), &m, 3, 12).await;
    println!("{during} kills landed while listing; {entries} entries");
    assert!(
        during > 0,
        "no kill landed during the listing: nothing was tested"
    );

    let st = status(&m);
    assert!(st.listing_complete, "{st:?}");
    assert_eq!(st.total, entries as u64, "each version once: {st:?}");
    assert_eq!(st.listed_entries, entries as u64, "{st:?}");
    if server() == Server::Moto {
        // moto drops the first entry after a bare key marker: the lister keeps one part.
        assert_eq!(partitions(&m), 1);
    } else {
        assert!(partitions(&m) > 1, "the keys were split");
    }
    assert_matches_source(&c, &src, &m).await;

    // A sequential listing plans the same tasks in the same places.
    let (_dir2, m2) = manifest();
    let seq = Job::new(&src, &dst, &m2).endpoint(&ep).extra(&[
        "--delete-markers",
        "--list-concurrency",
        "1",
    ]);
    finish(&seq.plan_args(), 3);
    assert_eq!(partitions(&m2), 1);
    assert_eq!(manifest_histories(&m2), manifest_histories(&m));
}

/// New writes after a first replica: a new version of every third key, a delete marker on
/// every fourth (a later round), new keys.
fn new_writes(keys: &[String]) -> (Vec<Vec<Op>>, usize) {
    let mut rounds = vec![Vec::new(), Vec::new()];
    for (i, k) in keys.iter().enumerate() {
        if i % 3 == 0 {
            rounds[0].push(Op::put(k, format!("later {k}")));
        }
        if i % 4 == 0 {
            rounds[1].push(Op::Delete { key: k.clone() });
        }
    }
    for i in 0..5 {
        rounds[0].push(Op::put(&format!("p04/new-{i}"), "new"));
        rounds[0].push(Op::put(&format!("new/{i}"), "new"));
    }
    let n = rounds.iter().map(Vec::len).sum();
    (rounds, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_killed_then_run_catches_up() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("refresh-src"), bucket("refresh-dst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    let keys: Vec<String> = key_names().into_iter().step_by(2).collect();
    let mut first = corpus(&keys);
    first.truncate(3);
    seed(&c, &src, first).await;
    let (_dir, m) = manifest();
    let job = Job::new(&src, &dst, &m).endpoint(&ep).extra(&[
        "--delete-markers",
        "--list-concurrency",
        "3",
    ]);
    expect_code(&job.replicate(), 0);
    let before = status(&m).total;

    if server() == Server::Moto {
        // Later writes in a later second than the replica's (moto's listings give seconds).
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let (writes, added) = new_writes(&keys);
    seed(&c, &src, writes).await;
    let mut refresh = job.plan_args();
    refresh.push("--refresh".into());
    let (during, o) = kill_while_listing(&refresh, &m, 2, 6).await;
    println!("{during} kills landed during the refresh");
    let said = stderr_of(&o);
    // A kill after a refresh's listing completed leaves it complete: the next `plan
    // --refresh` is then a second refresh, which finds nothing new.
    assert!(
        said.contains(" new tasks; 0 tasks of earlier listings"),
        "{said}"
    );

    let st = status(&m);
    assert_eq!(st.total, before + added as u64, "{st:?}");
    assert_eq!(
        st.pending, added as u64,
        "only the new entries wait: {st:?}"
    );
    assert_matches_source(&c, &src, &m).await;
    let text = run(&["status", "--manifest", job.m()]);
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    let per_refresh: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("refresh ")?.split(": ").nth(1))
        .filter_map(|l| l.strip_suffix(" tasks added")?.parse().ok())
        .collect();
    assert!(!per_refresh.is_empty(), "{text}");
    assert_eq!(per_refresh[0], added as u64, "{text}");
    assert_eq!(per_refresh.iter().sum::<u64>(), added as u64, "{text}");

    expect_code(&job.run(&["--concurrency", "8"]), 0);
    assert_replica(&c, &src, &c, &dst, "", "", all).await;
    assert_eq!(entry_count(&c, &dst).await, entry_count(&c, &src).await);
    expect_code(&job.verify(), 0);
}

/// `seed` on moto: a round long enough to take over a second (many writes) is still followed
/// by the next round in a later second, so a key written last in that round and again in the
/// next two keeps its exact history (a version and a delete marker in one second would be
/// listed versions first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_keeps_history_after_a_long_round() {
    let ep = endpoint();
    let c = client(&ep);
    let src = bucket("long-round");
    create_bucket(&c, &src, true).await;
    let mut long: Vec<Op> = (0..400)
        .map(|i| Op::put(&format!("filler/{i:03}"), "x"))
        .collect();
    long.push(Op::put("last", "v1"));
    let del = vec![Op::Delete { key: "last".into() }];
    seed(&c, &src, vec![long, del, vec![Op::put("last", "v2")]]).await;
    let h = histories(&c, &src, "last").await;
    let kinds: Vec<bool> = h["last"].iter().map(|v| v.delete_marker).collect();
    assert_eq!(
        kinds,
        [false, true, false],
        "version, marker, version: {h:?}"
    );
}

/// A measurement, not a check (run by hand, it asserts nothing about time): `plan` versions
/// per second with `--list-concurrency` 1, 2, 4 and 8, straight to the server and through
/// a proxy that adds `S3_BACKFILL_LIST_DELAY_MS` (default 20) to every request, as a
/// server across a network would. `S3_BACKFILL_LIST_BUCKET` names a seeded bucket to list
/// (else 2,000 keys are seeded):
/// `S3_BACKFILL_TEST_SERVER=rgw cargo test --test listing speed -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn speed_by_list_concurrency() {
    use support::fault_proxy::{Fault, FaultConfig, FaultProxy};
    let ep = endpoint();
    let c = client(&ep);
    let src = match std::env::var("S3_BACKFILL_LIST_BUCKET") {
        Ok(b) if !b.is_empty() => b,
        _ => {
            let b = bucket("speed-src");
            create_bucket(&c, &b, true).await;
            let keys: Vec<String> = (0..2000).map(|i| format!("{:02}/{i:05}", i % 40)).collect();
            seed(&c, &b, vec![keys.iter().map(|k| Op::put(k, "x")).collect()]).await;
            b
        }
    };
    let dst = bucket("speed-dst");
    create_bucket(&c, &dst, true).await;
    let entries = entry_count(&c, &src).await;
    let delay: u64 = std::env::var("S3_BACKFILL_LIST_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let proxy = FaultProxy::start(
        ep.trim_start_matches("http://").parse().unwrap(),
        FaultConfig {
            seed: 1,
            rate: 1.0,
            faults: vec![Fault::Delay],
            delay: Duration::from_millis(delay),
            ..FaultConfig::default()
        },
    )
    .await
    .unwrap();
    for (what, via) in [("direct", ep.clone()), ("+delay", proxy.endpoint())] {
        for n in ["1", "2", "4", "8"] {
            let (_dir, m) = manifest();
            let job = Job::new(&src, &dst, &m)
                .endpoint(&via)
                .extra(&["--list-concurrency", n]);
            let start = Instant::now();
            expect_code(&job.plan(), 0);
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{} {what:>6} {delay} ms: --list-concurrency {n}: {entries} versions in {secs:.2} s, {:.0} versions/s",
                server().name(),
                entries as f64 / secs
            );
        }
    }
}
