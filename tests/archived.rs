//! End to end: archived source versions (GLACIER). A run that skips one exits 1 and says how
//! to restore it; `run --retry-skipped --restore-archived DAYS` asks for the restore and
//! leaves the version pending (exit 1, "restores pending"); a later run copies it once
//! restored (exit 0) and the destination's history equals the source's.
//!
//! moto restores at once and only a key's current version (RestoreObject without a version
//! id); RGW 16.2 has no GLACIER storage class unless one is configured, so this runs on moto.

mod support;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::StorageClass;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archived_version_exits_1_then_is_restored_and_copied() {
    if unsupported_on(Server::Rgw, "no GLACIER storage class on the test cluster") {
        return;
    }
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("src"), bucket("dst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    seed(&c, &src, vec![vec![Op::put("k", "old")]]).await;
    c.put_object()
        .bucket(&src)
        .key("k")
        .body(ByteStream::from_static(b"new"))
        .storage_class(StorageClass::Glacier)
        .send()
        .await
        .unwrap();
    let (_d, m) = manifest();
    // The replica in STANDARD: a GLACIER replica would not read back in this test.
    let job = Job::new(&src, &dst, &m)
        .endpoint(&ep)
        .extra(&["--storage-class", "STANDARD"]);

    let first = job.replicate();
    expect_code(&first, 1);
    let err = stderr_of(&first);
    assert!(
        err.contains("1 skipped as archived: restore them and run `run --retry-skipped`"),
        "{err}"
    );
    let hd = histories(&c, &dst, "").await;
    assert_eq!(hd["k"].len(), 1, "only the older version is there");

    let asked = job.run(&[
        "--retry-skipped",
        "--restore-archived",
        "1",
        "--restore-tier",
        "Bulk",
    ]);
    expect_code(&asked, 1);
    let err = stderr_of(&asked);
    assert!(err.contains("1 restores pending"), "{err}");
    assert_eq!(histories(&c, &dst, "").await["k"].len(), 1);

    expect_code(&job.run(&[]), 0);
    let checked = assert_replica(&c, &src, &c, &dst, "", "", all).await;
    assert_eq!(checked, 2);
    let body = c
        .get_object()
        .bucket(&dst)
        .key("k")
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    assert_eq!(
        &body[..],
        b"new",
        "the destination's current version is the source's"
    );
    expect_code(&job.verify(), 0);
}
