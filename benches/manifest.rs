//! The manifest's size and speed at scale: N tasks (40-byte keys, 32-character version ids,
//! 1 to 3 versions per key, MD5 ETags, S3 listing times) planned through `insert_page` in
//! pages of 1,000, then every task started and finished through the writer. Prints, for
//! each N: bytes per task row after plan (pending) and after the run (done, with a 32-char
//! destination version id), the plan insert rate, the writer's update rate, the latency of
//! `counts()`, of one `next_key_groups` batch, of the estimate's scan of every task
//! (`for_each_key`) and of one `--metrics` scrape, and the peak RSS. Figures are printed,
//! never asserted.
//!
//! Run with `cargo bench --bench manifest`; N defaults to 100,000, and
//! `MANIFEST_BENCH_ROWS=100000,1000000,10000000` picks others. `MANIFEST_BENCH_DIR` sets
//! where the files go (default: the system temp dir).

use std::path::Path;
use std::time::{Duration, Instant};

use s3_backfill::manifest::{Copied, CopyMethod, Listing, Manifest, NewTask, Update};
use s3_backfill::s3::VersionEntry;

/// A small deterministic generator (xorshift64*), so every run lists the same bucket.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn text(&mut self, len: usize, alphabet: &[u8]) -> String {
        (0..len)
            .map(|_| alphabet[(self.next() % alphabet.len() as u64) as usize] as char)
            .collect()
    }
}

const VERSION_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._";
const KEY_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-_";

/// The listing of a bucket with about `n` versions: pages of 1,000 entries.
fn pages(n: usize) -> impl Iterator<Item = Vec<NewTask>> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut key_no = 0u64;
    let mut made = 0;
    let mut pending: Vec<NewTask> = Vec::new();
    std::iter::from_fn(move || {
        while pending.len() < 1000 && made < n {
            key_no += 1;
            // 40 bytes: a sorted prefix and a random tail.
            let key = format!("logs/{key_no:010}/{}", rng.text(24, KEY_CHARS));
            let versions = 1 + (rng.next() % 3) as usize;
            for pos in 0..versions.min(n - made) {
                let etag = format!("\"{:016x}{:016x}\"", rng.next(), rng.next());
                let secs = 1_600_000_000 + rng.next() % 100_000_000;
                pending.push(NewTask {
                    entry: VersionEntry {
                        key: key.clone(),
                        version_id: rng.text(32, VERSION_CHARS),
                        is_delete_marker: false,
                        is_latest: pos == 0,
                        size: rng.next() % 10_000_000,
                        etag: Some(etag),
                        last_modified: Some(s3_time(secs as i64)),
                        storage_class: Some("STANDARD".into()),
                        checksum_algorithm: None,
                    },
                    history_pos: pos as u64,
                    dest: 0,
                });
                made += 1;
            }
        }
        if pending.is_empty() {
            return None;
        }
        let take = pending.len().min(1000);
        Some(pending.drain(..take).collect())
    })
}

/// S3's listing time format, good enough for a bench (every month has 28 days).
fn s3_time(secs: i64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, d) = (1970 + days / 336, days % 336);
    format!(
        "{y:04}-{:02}-{:02}T{:02}:{:02}:{:02}.000Z",
        d / 28 + 1,
        d % 28 + 1,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn file_size(path: &Path) -> u64 {
    let size = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0)
    };
    size("") + size("-wal")
}

/// This process's peak resident memory (VmHWM; unlike getrusage's, not inherited over exec).
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Median of `f`'s run time over `runs` runs.
fn median(runs: usize, mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[runs / 2]
}

fn plan(path: &Path, n: usize) -> (usize, Duration) {
    let mut m = Manifest::open(path, true).expect("create the manifest");
    let mut cp = Listing::default();
    let mut rows = 0;
    let start = Instant::now();
    for page in pages(n) {
        rows += page.len();
        cp.pages += 1;
        cp.entries += page.len() as u64;
        cp.key_marker = page.last().map(|t| t.entry.key.clone());
        m.insert_page(&page, &cp).expect("insert a page");
    }
    (rows, start.elapsed())
}

/// Starts and finishes every task through the writer, as a run would.
fn run(path: &Path, rt: &tokio::runtime::Runtime) -> (usize, Duration) {
    let w = Manifest::open(path, false).expect("open").into_writer();
    let start = Instant::now();
    let mut updates = 0;
    rt.block_on(async {
        let mut rng = Rng(7);
        let mut after = 0;
        loop {
            let groups = w.next_key_groups(after, 256).await.expect("next keys");
            let Some(last) = groups.last() else { break };
            after = last.key_id;
            for t in groups.iter().flat_map(|g| &g.tasks) {
                w.send(Update::Started { id: t.id, at: 1 }).expect("send");
                let version = Some(rng.text(32, VERSION_CHARS));
                let outcome = Copied::single(version, CopyMethod::Copy).into_outcome(false);
                w.send(Update::Finished { id: t.id, outcome })
                    .expect("send");
                updates += 2;
            }
        }
        w.flush().await.expect("flush");
    });
    let took = start.elapsed();
    w.close();
    (updates, took)
}

/// Plans `n` tasks, then reads and measures the manifest as `status` and `run` would.
fn bench_plan(path: &Path, n: usize) -> usize {
    let (rows, took) = plan(path, n);
    let planned = file_size(path);
    let start = Instant::now();
    let generated: usize = pages(n).map(|p| p.len()).sum();
    let generation = start.elapsed();
    let m = Manifest::open(path, false).expect("open");
    let mut total = 0;
    let counts = median(11, || total = m.counts().expect("counts").total);
    let next = median(11, || {
        m.next_key_groups(0, 256).expect("next keys");
    });
    println!("manifest bench: {rows} tasks ({total} counted)");
    println!(
        "  plan: {:.0} rows/s through insert_page (1000-row pages, one commit each), {:.1} s",
        rows as f64 / took.as_secs_f64(),
        took.as_secs_f64()
    );
    println!(
        "        (of which making the rows: {:.1} s, {:.0} rows/s alone)",
        generation.as_secs_f64(),
        generated as f64 / generation.as_secs_f64()
    );
    println!(
        "  size after plan: {:.1} bytes per task row ({planned} bytes)",
        planned as f64 / rows as f64
    );
    println!("  counts(): {:.3} ms (median of 11)", ms(counts));
    println!(
        "  next_key_groups(0, 256): {:.3} ms (median of 11)",
        ms(next)
    );
    // The scan `status` makes for its cost estimate: every task, key by key.
    let start = Instant::now();
    let mut scanned = 0;
    m.for_each_key(|_, tasks| scanned += tasks.len())
        .expect("every key");
    println!(
        "  for_each_key (the estimate's scan of {scanned} tasks): {:.0} ms",
        ms(start.elapsed())
    );
    rows
}

/// Runs every task through the writer and measures the finished manifest.
fn bench_run(path: &Path, rows: usize, rt: &tokio::runtime::Runtime) {
    let (updates, took) = run(path, rt);
    let done = file_size(path);
    let m = Manifest::open(path, false).expect("open");
    let c = m.counts().expect("counts");
    let counts = median(11, || {
        m.counts().expect("counts");
    });
    println!(
        "  run: {:.0} updates/s through the writer ({updates} started + finished, {:.1} s), {} done",
        updates as f64 / took.as_secs_f64(),
        took.as_secs_f64(),
        c.done
    );
    println!(
        "  size after run: {:.1} bytes per task row (done, with destination version ids)",
        done as f64 / rows as f64
    );
    println!("  counts() when done: {:.3} ms", ms(counts));
    // What one `--metrics` scrape reads and writes (a connection of its own, as the endpoint).
    let mut size = 0;
    let scrape = median(11, || {
        let snap = s3_backfill::metrics::Snapshot::read(&m, "bench").expect("scrape");
        size = s3_backfill::metrics::encode(&snap).len();
    });
    println!(
        "  one --metrics scrape (read + encode, {size} bytes): {:.3} ms",
        ms(scrape)
    );
    println!("  peak RSS so far: {:.1} MiB", peak_rss_mib());
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("manifest: skipped (run it with `cargo bench --bench manifest`)");
        return;
    }
    let sizes: Vec<usize> = std::env::var("MANIFEST_BENCH_ROWS")
        .unwrap_or_else(|_| "100000".into())
        .split(',')
        .map(|s| {
            s.trim()
                .replace('_', "")
                .parse()
                .expect("MANIFEST_BENCH_ROWS: numbers")
        })
        .collect();
    let dir = match std::env::var_os("MANIFEST_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("a temporary directory");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for n in sizes {
        let path = dir.path().join(format!("bench-{n}.db"));
        let rows = bench_plan(&path, n);
        bench_run(&path, rows, &rt);
        let _ = std::fs::remove_file(&path);
    }
}
