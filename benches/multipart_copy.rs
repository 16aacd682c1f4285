//! Server-side multipart copy throughput: one 256 MiB object (uploaded with 8 MiB parts, so
//! 32 `UploadPartCopy` requests) copied by `s3-backfill run` at part concurrency 1, 4 and 16,
//! against the S3 server this bench starts (moto, or Ceph RGW with
//! `S3_BACKFILL_TEST_SERVER=rgw`). Prints MiB/s; asserts nothing about speed.
//!
//! Run with `cargo bench --bench multipart_copy`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use support::*;

const MIB: usize = 1024 * 1024;
const SIZE: usize = 256 * MIB;
const SOURCE_PART: usize = 8 * MIB;

fn main() {
    // `cargo bench` passes --bench; anything else (e.g. `cargo test --benches`) only checks
    // that the bench builds.
    if !std::env::args().any(|a| a == "--bench") {
        println!("multipart_copy: skipped (run it with `cargo bench --bench multipart_copy`)");
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(bench());
}

async fn bench() {
    let ep = endpoint();
    let c = client(&ep);
    let src = bucket("bench-src");
    create_bucket(&c, &src, true).await;
    let body = pseudo_random(SIZE, 256);
    let (_, etag) = put_multipart(
        &c,
        &src,
        "big.bin",
        &body,
        &[SOURCE_PART],
        &Headers::default(),
    )
    .await;
    drop(body);
    println!(
        "multipart_copy: server-side copy of a {} MiB object ({} parts of {} MiB, ETag {etag}), {} at {ep}",
        SIZE / MIB,
        SIZE / SOURCE_PART,
        SOURCE_PART / MIB,
        server().name()
    );
    for pc in [1u32, 4, 16] {
        let dst = bucket(&format!("bench-dst-{pc}"));
        create_bucket(&c, &dst, true).await;
        let (_d, m) = manifest();
        let job = Job::new(&src, &dst, &m).endpoint(&ep).extra(&[
            "--copy-mode",
            "server-side",
            "--multipart-threshold",
            "5MiB",
        ]);
        expect_code(&job.plan(), 0);
        let pcs = pc.to_string();
        let started = Instant::now();
        let o = job.run(&["--part-concurrency", &pcs]);
        let secs = started.elapsed().as_secs_f64();
        expect_code(&o, 0);
        let tasks = manifest_tasks(&m);
        assert_eq!(tasks.len(), 1);
        assert_eq!(tasks[0].copy_method.as_deref(), Some("multipart-copy"));
        let head = c
            .head_object()
            .bucket(&dst)
            .key("big.bin")
            .send()
            .await
            .expect("head the copy");
        assert_eq!(head.e_tag(), Some(etag.as_str()), "the copy keeps the ETag");
        println!(
            "multipart_copy: part concurrency {pc:>2}: {:>7.1} MiB/s ({:.2} s for {} MiB, {} parts)",
            SIZE as f64 / MIB as f64 / secs,
            secs,
            SIZE / MIB,
            tasks[0].parts.unwrap_or_default()
        );
        // Free the server's memory before the next round.
        c.delete_object()
            .bucket(&dst)
            .key("big.bin")
            .version_id(head.version_id().unwrap_or("null"))
            .send()
            .await
            .expect("delete the copy");
    }
}
