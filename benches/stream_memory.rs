//! Streaming memory by budget: `s3-backfill run` streams objects from one server to another
//! (two moto servers, or two Ceph RGW clusters with `S3_BACKFILL_TEST_SERVER=rgw`; ranged
//! GETs, then UploadPart) with a `--max-memory` budget far below what its part size and
//! concurrency would otherwise hold, and prints the process's peak resident memory beside
//! the budget.
//!
//! - Case 1: 10 objects of 64 MiB, concurrency 8, part concurrency 8, 16 MiB parts asked,
//!   `--max-memory 96MiB` (48 MiB of it for bodies; without the budget up to 8 x 4 x 16 MiB =
//!   512 MiB of parts could be held at once).
//! - Case 2, only with `STREAM_BENCH_1GIB=1` (it uploads and copies 1 GiB, minutes on moto):
//!   one object of 1 GiB, 64 MiB parts asked, part concurrency 16, `--max-memory 160MiB`
//!   (112 MiB for bodies: one 64 MiB part held at a time instead of 16).
//!
//! Peak RSS is the kernel's high-water mark (`VmHWM` of `/proc/PID/status`, polled every
//! 10 ms while the child runs), not `wait4`'s `ru_maxrss` (which inherits the spawning
//! process's high-water mark at exec). Printed, not asserted.
//!
//! Run with `cargo bench --bench stream_memory`.

#[path = "support/peak_rss.rs"]
mod peak_rss;
#[path = "../tests/support/mod.rs"]
mod support;

use peak_rss::vm_hwm_kib;
use std::time::{Duration, Instant};

use support::*;

const MIB: usize = 1024 * 1024;

/// One streaming case.
struct Case {
    name: &'static str,
    objects: usize,
    size: usize,
    /// Part size of the source upload (so the source is multipart like real big objects).
    source_part: usize,
    run_flags: &'static [&'static str],
    part_size: &'static str,
    budget_mib: u64,
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("stream_memory: skipped (run it with `cargo bench --bench stream_memory`)");
        return;
    }
    let mut cases = vec![Case {
        name: "10 x 64 MiB",
        objects: 10,
        size: 64 * MIB,
        source_part: 8 * MIB,
        run_flags: &["--concurrency", "8", "--part-concurrency", "8"],
        part_size: "16MiB",
        budget_mib: 96,
    }];
    if std::env::var("STREAM_BENCH_1GIB").is_ok_and(|v| v == "1") {
        cases.push(Case {
            name: "1 x 1 GiB",
            objects: 1,
            size: 1024 * MIB,
            source_part: 64 * MIB,
            run_flags: &["--concurrency", "4", "--part-concurrency", "16"],
            part_size: "64MiB",
            budget_mib: 160,
        });
    } else {
        println!("stream_memory: the 1 GiB case is left out (slow); STREAM_BENCH_1GIB=1 adds it");
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for case in &cases {
        rt.block_on(bench(case));
    }
}

/// Waits for a child, polling its `VmHWM`; returns its exit code and peak RSS in KiB.
fn wait_with_peak(mut child: std::process::Child) -> (Option<i32>, i64) {
    let pid = child.id() as libc::pid_t;
    let mut peak = 0;
    loop {
        // Read before reaping: once reaped, /proc/PID is gone.
        peak = vm_hwm_kib(pid).unwrap_or(0).max(peak);
        match child.try_wait().expect("try_wait") {
            Some(status) => return (status.code(), peak),
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

async fn bench(case: &Case) {
    let (ep1, ep2) = (endpoint(), second_endpoint());
    let (sc, dc) = (client(&ep1), client(&ep2));
    let (src, dst) = (bucket("bench-src"), bucket("bench-dst"));
    create_bucket(&sc, &src, true).await;
    create_bucket(&dc, &dst, true).await;
    for i in 0..case.objects {
        let body = pseudo_random(case.size, i as u64);
        let key = format!("obj-{i:02}");
        put_multipart(
            &sc,
            &src,
            &key,
            &body,
            &[case.source_part],
            &Headers::default(),
        )
        .await;
    }
    let budget = format!("{}MiB", case.budget_mib);
    println!(
        "stream_memory [{}]: from {ep1} to {ep2}, {} parts asked, run {:?}, --max-memory {budget}",
        case.name, case.part_size, case.run_flags
    );
    let (_d, m) = manifest();
    #[rustfmt::skip]
    let job = Job::new(&src, &dst, &m).endpoints(&ep1, &ep2).extra(&[
        "--copy-mode", "stream", "--multipart-threshold", "8MiB", "--part-size", case.part_size,
    ]);
    expect_code(&job.plan(), 0);
    let mut flags: Vec<&str> = case.run_flags.to_vec();
    flags.extend(["--max-memory", &budget]);
    let started = Instant::now();
    let child = cmd(&strs(&job.run_args(&flags)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("spawn run");
    let (code, peak_kib) = tokio::task::spawn_blocking(move || wait_with_peak(child))
        .await
        .expect("wait");
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(code, Some(0), "run failed");
    let tasks = manifest_tasks(&m);
    assert_eq!(tasks.len(), case.objects);
    assert!(tasks
        .iter()
        .all(|t| t.state == "done" && t.copy_method.as_deref() == Some("multipart-stream")));
    let part = tasks[0].part_size.unwrap_or(0) as f64 / MIB as f64;
    let total = (case.objects * case.size) as f64 / MIB as f64;
    println!(
        "stream_memory [{}]: {:.1} MiB/s ({secs:.2} s for {total:.0} MiB), parts of {part:.0} MiB",
        case.name,
        total / secs,
    );
    let peak = peak_kib as f64 / 1024.0;
    println!(
        "stream_memory [{}]: s3-backfill peak RSS (VmHWM) {peak:.1} MiB, budget {} MiB: {}",
        case.name,
        case.budget_mib,
        if peak <= case.budget_mib as f64 {
            "under the budget"
        } else {
            "OVER the budget"
        }
    );
}
