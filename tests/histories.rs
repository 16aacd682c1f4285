//! The histories production buckets hold (issue 10's acceptance corpus), replicated with
//! every delete marker and checked entry for entry: a key with 6 identical empty versions,
//! runs of delete markers, `null` versions written before versioning was enabled (current,
//! behind a delete marker, overwritten), and 12 MiB multipart sources with 5 MiB parts.

mod support;

use std::collections::{BTreeMap, HashSet};

use aws_sdk_s3::types::{BucketVersioningStatus, VersioningConfiguration};
use aws_sdk_s3::Client;
use support::*;

const MIB: usize = 1024 * 1024;

fn tagged(key: &str, body: &str, meta: &str, tags: &str) -> Op {
    Op::Put {
        key: key.into(),
        body: body.as_bytes().to_vec(),
        content_type: Some("text/plain".into()),
        cache_control: Some("max-age=30".into()),
        metadata: vec![("origin".into(), meta.into())],
        tagging: Some(tags.into()),
    }
}

fn del(key: &str) -> Op {
    Op::Delete { key: key.into() }
}

async fn enable_versioning(c: &Client, bucket: &str) {
    c.put_bucket_versioning()
        .bucket(bucket)
        .versioning_configuration(
            VersioningConfiguration::builder()
                .status(BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .expect("enable versioning");
}

/// Null versions first (the bucket is not versioned yet), then versioning, then the rest.
/// Returns the number of entries (versions and delete markers) written.
async fn seed_histories(c: &Client, src: &str) -> usize {
    // Before versioning: three `null` versions.
    seed(
        c,
        src,
        vec![vec![
            tagged(
                "null/current",
                "null, still current",
                "null-1",
                "null=current",
            ),
            tagged(
                "null/behind-marker",
                "null, then deleted",
                "null-2",
                "null=dm",
            ),
            tagged(
                "null/overwritten",
                "null, then v2, v3",
                "null-3",
                "null=old",
            ),
        ]],
    )
    .await;
    pace().await;
    enable_versioning(c, src).await;
    pace().await;
    let empty = || Op::put("empty/six", Vec::new());
    let rounds = vec![
        vec![
            empty(),
            Op::put("markers/three", "before three markers"),
            Op::put("markers/between", "before the markers"),
            del("null/behind-marker"),
            tagged("null/overwritten", "v2 over null", "v2", "rev=2"),
        ],
        vec![
            empty(),
            del("markers/three"),
            del("markers/between"),
            Op::put("null/overwritten", "v3 over null"),
        ],
        vec![empty(), del("markers/three"), del("markers/between")],
        vec![empty(), del("markers/three"), del("markers/between")],
        vec![empty(), tagged("markers/between", "after", "v2", "rev=2")],
        vec![empty()],
    ];
    let writes: usize = rounds.iter().map(Vec::len).sum();
    seed(c, src, rounds).await;
    // Two 12 MiB multipart versions of one key, 5 MiB parts (5 + 5 + 2).
    for round in 0..2u64 {
        pace().await;
        let h = Headers {
            content_type: Some("application/x-big".into()),
            cache_control: Some("no-store".into()),
            metadata: vec![("round".into(), round.to_string())],
            tagging: Some(format!("big=yes&round={round}")),
            checksum: None,
        };
        let body = pseudo_random(12 * MIB, 1000 + round);
        let (_, etag) = put_multipart(c, src, "mp/twelve", &body, &[5 * MIB], &h).await;
        assert!(etag.ends_with("-3\""), "a 3-part multipart source: {etag}");
    }
    3 + writes + 2
}

/// Every done task names its destination version; each names a distinct version of its
/// key's destination history; on RGW (true order at both ends) the n-th source entry of a key
/// maps to the n-th destination entry.
fn assert_dest_versions(
    tasks: &[TaskRow],
    source: &BTreeMap<String, Vec<Ver>>,
    dest: &BTreeMap<String, Vec<Ver>>,
) {
    let mut seen = HashSet::new();
    for t in tasks {
        assert_eq!(t.state, "done", "{t:?}");
        let dv = t
            .dest_version_id
            .as_deref()
            .unwrap_or_else(|| panic!("a done task without a destination version id: {t:?}"));
        let dh = &dest[&t.key];
        let at = dh.iter().position(|v| v.version_id == dv);
        let at = at.unwrap_or_else(|| panic!("{t:?}: {dv} is not in the destination {dh:?}"));
        assert!(
            seen.insert((t.key.clone(), dv.to_string())),
            "{t:?}: {dv} twice"
        );
        if server() == Server::Rgw {
            let sh = &source[&t.key];
            let want = sh.iter().position(|v| v.version_id == t.version_id);
            assert_eq!(Some(at), want, "{t:?}: place in the history");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_histories_replicate_exactly() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("hist-src"), bucket("hist-dst"));
    create_bucket(&c, &src, false).await;
    create_bucket(&c, &dst, true).await;
    let written = seed_histories(&c, &src).await;
    let source = histories(&c, &src, "").await;
    let entries: usize = source.values().map(Vec::len).sum();
    let markers = source
        .values()
        .flatten()
        .filter(|v| v.delete_marker)
        .count();
    let kinds = |key: &str| -> Vec<bool> { source[key].iter().map(|v| v.delete_marker).collect() };
    match server() {
        Server::Moto => {
            assert_eq!(entries, written, "the source holds what was written");
            assert_eq!(kinds("markers/three"), [false, true, true, true]);
            assert_eq!(kinds("markers/between"), [false, true, true, true, false]);
        }
        Server::Rgw => {
            // RGW 16.2 writes no delete marker over a delete marker: a DeleteObject on a key
            // whose current entry is a marker answers 204 and changes nothing, so a run of
            // markers cannot exist in an RGW bucket (and cannot be written to one).
            println!("rgw: each run of 3 delete markers is stored as one");
            assert_eq!(entries, written - 4, "the source holds what was written");
            assert_eq!(kinds("markers/three"), [false, true]);
            assert_eq!(kinds("markers/between"), [false, true, false]);
        }
    }
    assert_eq!(kinds("empty/six"), [false; 6]);
    assert_eq!(kinds("null/behind-marker"), [false, true]);
    assert_eq!(source["null/behind-marker"][0].version_id, "null");
    assert_eq!(source["null/overwritten"][0].version_id, "null");
    assert_eq!(source["null/current"][0].version_id, "null");

    let (_d, m) = manifest();
    let job = Job::new(&src, &dst, &m).endpoint(&ep).extra(&[
        "--delete-markers",
        "--multipart-threshold",
        "5MiB",
        "--part-size",
        "5MiB",
        "--large-copy",
        "parts",
    ]);
    let o = job.replicate();
    // Shown when the test fails: what the job says about itself.
    println!("replicate: {}", stderr_of(&o));
    println!("status: {:?}", job.status());
    let report = job.report(&["--format", "csv"]);
    println!("report:\n{}", String::from_utf8_lossy(&report.stdout));
    expect_code(&o, 0);

    // Count, order, bodies, metadata (without the stamp), tags and ETags, multipart ones too.
    let checked = assert_replica(&c, &src, &c, &dst, "", "", all).await;
    assert_eq!(checked, entries - markers, "every object version compared");
    let dest = histories(&c, &dst, "").await;
    let dest_entries: usize = dest.values().map(Vec::len).sum();
    assert_eq!(dest_entries, entries, "as many entries at both ends");

    let st = job.status();
    assert_eq!(st.total, entries as u64, "{st:?}");
    assert_eq!(st.done, st.total, "{st:?}");
    let open = (
        st.pending,
        st.in_progress,
        st.failed,
        st.skipped,
        st.blocked,
    );
    assert_eq!(open, (0, 0, 0, 0, 0), "{st:?}");
    assert_eq!(st.delete_markers, markers as u64, "{st:?}");
    assert_eq!(st.etag_preserved, 2, "both multipart ETags kept: {st:?}");

    let tasks = job.tasks();
    assert_dest_versions(&tasks, &source, &dest);
    for t in tasks.iter().filter(|t| t.key == "mp/twelve") {
        assert_eq!(t.copy_method.as_deref(), Some("multipart-copy"), "{t:?}");
        assert_eq!((t.parts, t.etag_preserved), (Some(3), Some(1)), "{t:?}");
    }
    expect_code(&job.verify(), 0);
}
