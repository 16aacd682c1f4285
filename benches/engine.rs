//! Engine ceiling: the real `s3-backfill` binary, `plan` then `run`, against the in-process
//! S3 server of `tests/support/mem_s3.rs`, which answers at once from memory. So the figures
//! are the engine's own cost: listing into the SQLite manifest, scheduling, the SDK's
//! per-request pipeline, manifest updates.
//!
//! For each size N (default 10,000 and 100,000 entries; `ENGINE_BENCH_TASKS=1000000` adds a
//! size, a comma list adds several: 1,000,000 is left out by default because it takes
//! several minutes on 2 cores) and each copy mode (`ENGINE_BENCH_MODES`, default
//! `stamp,one-request`: the default job, and `--no-stamp --sse bucket-default`, where a
//! small version costs one CopyObject) the source bucket is seeded without HTTP: 40-byte keys,
//! 1-3 versions per key, a delete marker on top of every tenth key, bodies of a few bytes.
//! Then `plan --delete-markers` and `run --concurrency 64` run as child processes; each is
//! measured: wall time, user+system CPU (`wait4`), peak RSS (`VmHWM`, see [`measured`]).
//! Printed: plan versions/s, run tasks/s, CPU ms per task, peak RSS, manifest bytes (per
//! row), requests per task by operation (counted by the server), and whether the
//! destination holds every entry.
//! Figures are printed, never asserted.
//!
//! Run with `cargo bench --bench engine`.

#[path = "support/corpus.rs"]
mod corpus;
#[path = "../tests/support/mem_s3.rs"]
mod mem_s3;
#[path = "support/peak_rss.rs"]
mod peak_rss;

use peak_rss::vm_hwm_kib;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use corpus::{key, own_cpu, tv, Seeded};
use mem_s3::{MemS3, Op};

const SOURCE: &str = "bench-src";
const DEST: &str = "bench-dst";

fn main() {
    if let Ok(spec) = std::env::var(FLOOR_ENV) {
        std::process::exit(sdk_floor_child(&spec));
    }
    if !std::env::args().any(|a| a == "--bench") {
        println!("engine: skipped (run it with `cargo bench --bench engine`)");
        return;
    }
    let mut sizes = vec![10_000usize, 100_000];
    if let Ok(v) = std::env::var("ENGINE_BENCH_TASKS") {
        for n in v
            .split(',')
            .filter_map(|s| s.trim().replace('_', "").parse().ok())
        {
            if !sizes.contains(&n) {
                sizes.push(n);
            }
        }
    }
    let modes: Vec<Mode> = std::env::var("ENGINE_BENCH_MODES")
        .unwrap_or_else(|_| "stamp,one-request".into())
        .split(',')
        .filter_map(|m| MODES.iter().find(|(name, _)| *name == m.trim()).copied())
        .collect();
    print_machine();
    if !sizes.contains(&1_000_000) {
        println!(
            "1,000,000 entries: left out (several minutes); ENGINE_BENCH_TASKS=1000000 adds them\n"
        );
    }
    let mut rows = Vec::new();
    for n in sizes {
        for &mode in &modes {
            match bench_size(n, mode) {
                Ok(row) => rows.push(row),
                Err(e) => println!("N = {n}, {}: bench failed: {e}", mode.0),
            }
        }
    }
    print_summary(&rows);
}

/// A copy mode: its name and the `plan` flags that select it.
type Mode = (&'static str, &'static [&'static str]);

/// The modes benched: the default job (HEAD + CopyObject per small version, stamp written)
/// and the one-request job.
const MODES: [Mode; 2] = [
    ("stamp", &[]),
    ("one-request", &["--no-stamp", "--sse", "bucket-default"]),
];

fn print_machine() {
    let cpu = corpus::cpu_model();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "engine bench: {cores} cores ({cpu}); binary {}",
        binary().display()
    );
    println!("server: in-process mem-s3 (2 worker threads), answers from memory\n");
}

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_s3-backfill"))
}

/// Seeds exactly `n` entries into the source (see [`corpus::seed`]).
fn seed(mem: &MemS3, n: usize) -> Seeded {
    corpus::seed(mem, SOURCE, n)
}

/// One child process's cost.
struct Measured {
    wall: Duration,
    cpu: Duration,
    max_rss_kib: i64,
    code: Option<i32>,
}

/// Runs the binary with `args`, output to `log`, and measures it: CPU from `wait4`, peak RSS
/// from `VmHWM` polled every 10 ms. Not `wait4`'s `ru_maxrss`: at `exec` the kernel folds the
/// spawning process's high-water mark into the child's, so with a million versions in this
/// process's memory every child would show ~300 MiB it never used.
fn measured(args: &[&str], log: &Path) -> std::io::Result<Measured> {
    measured_cmd(Command::new(binary()).args(args), log)
}

/// [`measured`] for any command.
fn measured_cmd(cmd: &mut Command, log: &Path) -> std::io::Result<Measured> {
    let out = File::create(log)?;
    let start = Instant::now();
    let child = corpus::bench_env(cmd)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()?;
    // `spawn` returns after the child's exec: /proc shows its own memory from here on.
    let pid = child.id() as libc::pid_t;
    let (mut status, mut peak): (libc::c_int, i64) = (0, 0);
    // SAFETY: plain FFI calls with pointers to live stack values; the child is ours and is
    // waited for only here (the `Child` is dropped without waiting).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        peak = peak.max(vm_hwm_kib(pid).unwrap_or(0));
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        if r == 0 {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    let wall = start.elapsed();
    drop(child);
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    Ok(Measured {
        wall,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_kib: peak,
        code,
    })
}

/// One line of the summary.
struct Row {
    n: usize,
    mode: &'static str,
    plan: Measured,
    run: Measured,
    manifest_bytes: u64,
    requests_per_task: f64,
    copied: usize,
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n    ")
}

/// Runs one step of the binary, prints its line (and its output's tail when it failed).
fn step(name: &str, args: &[&str], dir: &Path, n: usize, unit: &str) -> Result<Measured, String> {
    let log = dir.join(format!("{name}.log"));
    let m = measured(args, &log).map_err(|e| format!("{name}: {e}"))?;
    print_step(name, &m, n, unit);
    if m.code != Some(0) {
        println!("    {name} output:\n    {}", tail(&log));
    }
    Ok(m)
}

/// Requests per operation between two counts of the server.
fn deltas(before: &[(Op, u64)], after: &[(Op, u64)]) -> Vec<(Op, u64)> {
    after
        .iter()
        .map(|(op, c)| {
            let earlier = before.iter().find(|(o, _)| o == op).map_or(0, |(_, c)| *c);
            (*op, c - earlier)
        })
        .filter(|(_, c)| *c > 0)
        .collect()
}

/// Seeds, plans and runs one size; prints its block.
fn bench_size(n: usize, mode: Mode) -> Result<Row, String> {
    let mem = MemS3::start().map_err(|e| format!("cannot start mem-s3: {e}"))?;
    let t = Instant::now();
    let seeded = seed(&mem, n);
    mem.create_bucket(DEST, true);
    println!(
        "N = {n} entries ({} keys, {} delete markers), mode {} {:?}, seeded in {:.2} s",
        seeded.keys,
        seeded.markers,
        mode.0,
        mode.1,
        t.elapsed().as_secs_f64()
    );
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let manifest = dir.path().join("bench.db");
    let manifest_size = || file_size(&manifest) + file_size(&dir.path().join("bench.db-wal"));
    let m = manifest.to_string_lossy().to_string();
    let ep = mem.endpoint();
    let (src, dst) = (format!("s3://{SOURCE}"), format!("s3://{DEST}"));
    #[rustfmt::skip]
    let plan_args = [
        "plan", "--source", &src, "--dest", &dst, "--manifest", &m, "--source-endpoint", &ep,
        "--dest-endpoint", &ep, "--path-style", "--delete-markers",
    ];
    let plan_args: Vec<&str> = plan_args.iter().chain(mode.1).copied().collect();
    let plan = step("plan", &plan_args, dir.path(), n, "versions/s")?;
    let manifest_bytes = manifest_size();
    let before = mem.request_counts();
    let server_cpu = own_cpu();
    #[rustfmt::skip]
    let run_args = ["run", "--manifest", &m, "--concurrency", "64", "--no-progress"];
    let run = step("run", &run_args, dir.path(), n, "tasks/s")?;
    let during = deltas(&before, &mem.request_counts());
    let requests_per_task = during.iter().map(|(_, c)| *c).sum::<u64>() as f64 / n as f64;
    let server_cpu = own_cpu().saturating_sub(server_cpu);
    println!(
        "  server     CPU {:.2} s during run ({:.3} ms per entry; in-process mem-s3, not in the figures above)",
        server_cpu.as_secs_f64(),
        server_cpu.as_secs_f64() * 1000.0 / n as f64
    );
    print_requests(&before, &during, n);
    let copied = mem.count(DEST);
    println!(
        "  manifest   {:.1} MiB after plan ({:.0} bytes per entry), {:.1} MiB after run",
        manifest_bytes as f64 / 1048576.0,
        manifest_bytes as f64 / n as f64,
        manifest_size() as f64 / 1048576.0
    );
    println!("  destination {copied} of {n} entries");
    if mode.0 == "one-request" {
        sdk_floor(&ep, seeded.keys, n, dir.path())?;
    }
    println!();
    #[rustfmt::skip]
    let row = Row { n, mode: mode.0, plan, run, manifest_bytes, requests_per_task, copied };
    Ok(row)
}

fn print_step(name: &str, m: &Measured, n: usize, unit: &str) {
    let secs = m.wall.as_secs_f64().max(1e-9);
    println!(
        "  {name:<5} {:>7.2} s {:>10.0} {unit:<11} CPU {:>6.2} s ({:.3} ms per entry)  peak RSS {:>6.1} MiB  exit {}",
        secs,
        n as f64 / secs,
        m.cpu.as_secs_f64(),
        m.cpu.as_secs_f64() * 1000.0 / n as f64,
        m.max_rss_kib as f64 / 1024.0,
        m.code.map_or("signal".to_string(), |c| c.to_string())
    );
}

/// Requests by operation: `plan`'s, then `run`'s per entry.
fn print_requests(plan: &[(Op, u64)], run: &[(Op, u64)], n: usize) {
    let plan: Vec<String> = plan.iter().map(|(op, c)| format!("{op:?} {c}")).collect();
    let run: Vec<String> = run
        .iter()
        .map(|(op, c)| format!("{op:?} {:.2} ({c})", *c as f64 / n as f64))
        .collect();
    println!("  requests   plan: {}", plan.join(", "));
    println!("  requests   run, per entry: {}", run.join(", "));
}

fn print_summary(rows: &[Row]) {
    println!("summary (entries = tasks; CPU and RSS of the s3-backfill process)");
    println!(
        "{:>9} {:>11} | {:>12} {:>11} {:>9} | {:>9} {:>11} {:>9} | {:>10} {:>9} | {:>8}",
        "entries",
        "mode",
        "plan ver/s",
        "plan ms/ver",
        "plan RSS",
        "run tsk/s",
        "run ms/task",
        "run RSS",
        "manifest",
        "B/entry",
        "req/task"
    );
    for r in rows {
        let rate = |m: &Measured| r.n as f64 / m.wall.as_secs_f64().max(1e-9);
        let ms = |m: &Measured| m.cpu.as_secs_f64() * 1000.0 / r.n as f64;
        let mib = |m: &Measured| format!("{:.1} MiB", m.max_rss_kib as f64 / 1024.0);
        println!(
            "{:>9} {:>11} | {:>12.0} {:>11.3} {:>9} | {:>9.0} {:>11.3} {:>9} | {:>6.1} MiB {:>9.0} | {:>8.2}{}",
            r.n,
            r.mode,
            rate(&r.plan),
            ms(&r.plan),
            mib(&r.plan),
            rate(&r.run),
            ms(&r.run),
            mib(&r.run),
            r.manifest_bytes as f64 / 1048576.0,
            r.manifest_bytes as f64 / r.n as f64,
            r.requests_per_task,
            if r.copied == r.n { "" } else { "  (destination incomplete!)" }
        );
    }
}

/// Set in the child that measures the SDK's floor: "<endpoint> <keys> <calls>".
const FLOOR_ENV: &str = "ENGINE_BENCH_SDK_FLOOR";

/// The floor under `run`'s figures: as many `CopyObject` calls as the run had entries,
/// through the project's own client (`s3::build`, the request path `run` uses), 64 in
/// flight, with no manifest, scheduler or retry loop. Measured in a child process (this
/// bench binary again), so that its CPU is apart from the in-process server's.
fn sdk_floor(ep: &str, keys: usize, n: usize, dir: &Path) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let log = dir.join("sdk-floor.log");
    let mut cmd = Command::new(exe);
    cmd.env(FLOOR_ENV, format!("{ep} {keys} {n}"));
    let m = measured_cmd(&mut cmd, &log).map_err(|e| format!("sdk floor: {e}"))?;
    print_step("sdk  ", &m, n, "copies/s");
    println!("  (sdk: CopyObject alone through the same client, no engine around it)");
    if m.code != Some(0) {
        println!("    sdk floor output:\n    {}", tail(&log));
    }
    Ok(())
}

/// The child of [`sdk_floor`]; returns its exit code.
fn sdk_floor_child(spec: &str) -> i32 {
    use futures::{StreamExt, TryStreamExt};
    use s3_backfill::config::SideConfig;
    use s3_backfill::s3::{build, ObjectRef, S3Client, Side, Timeouts, WriteAttrs};
    let parts: Vec<&str> = spec.split(' ').collect();
    let [ep, keys, n] = parts[..] else {
        eprintln!("{FLOOR_ENV}: expected \"<endpoint> <keys> <calls>\"");
        return 2;
    };
    let (Ok(keys), Ok(n)) = (keys.parse::<usize>(), n.parse::<usize>()) else {
        eprintln!("{FLOOR_ENV}: bad numbers in {spec:?}");
        return 2;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let done = rt.block_on(async {
        let cfg = SideConfig {
            endpoint: Some(ep.to_string()),
            path_style: true,
            ..SideConfig::default()
        };
        let (client, _) = build(Side::Dest, &cfg, Timeouts::default()).await;
        let attrs = WriteAttrs::default();
        futures::stream::iter(0..n)
            .map(|j| {
                let (client, attrs) = (&client, &attrs);
                async move {
                    // Every tenth key's current entry is a delete marker.
                    let i = j % keys;
                    let i = if i % 10 == 9 { i - 1 } else { i };
                    let src = ObjectRef::key(SOURCE, &key(i));
                    let dst = ObjectRef::key(DEST, &format!("floor/{j}"));
                    client.copy_object(&dst, &src, attrs).await
                }
            })
            .buffer_unordered(64)
            .try_for_each(|_| async { Ok(()) })
            .await
    });
    match done {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("sdk floor: {e}");
            1
        }
    }
}
