//! Many machines (issue 20): `run` on a PostgreSQL job with 1, 2 and 4 worker processes,
//! beside one `run` on a SQLite manifest, all in one run against the in-process S3 server of
//! `tests/support/mem_s3.rs` (it answers at once from memory, so the figures are the engine's
//! and the database's own cost).
//!
//! The source bucket is seeded once without HTTP (`benches/support/corpus.rs`, the corpus of
//! `benches/engine.rs`: 40-byte keys, 1-3 versions per key, a delete marker on top of every
//! tenth key; `MANY_BENCH_TASKS` entries, default 20,000). Each configuration copies the same
//! source into a fresh destination bucket: `plan --delete-markers` into its own manifest (a
//! SQLite file, or a PostgreSQL job `postgres://...?job=NAME` of one throwaway cluster), timed
//! apart, then its
//! `run` processes (`--concurrency 64` each, `MANY_BENCH_CONCURRENCY` to change: every
//! process gets the full figure, as a process on its own machine would) started together and
//! timed until the last exits.
//!
//! Measured per configuration: wall time (tasks/s), the `run` processes' user+system CPU
//! (`wait4`), and the database's CPU: the cluster's postmaster and all its children, user +
//! system ticks from `/proc/PID/stat` before and after (a backend that exited meanwhile is
//! counted through the postmaster's `cutime`/`cstime`). Checked: every process exited 0 and the
//! destination holds every entry. Printed: a table with the targets beside the
//! figures (one worker on PostgreSQL ≥ 80% of SQLite's rate, database CPU ≤ 0.05 ms per task,
//! 4 workers ≥ 3× one worker where the cores allow); never asserted.
//!
//! Then, where the cores allow: the server answers every request after
//! `MANY_BENCH_LATENCY_MS` (default 20; 0 skips this step), as a server far away would, and
//! 1 and 4 PostgreSQL workers (`--concurrency 8` each, `MANY_BENCH_FAR_CONCURRENCY`) copy the
//! source again. Each worker is then bound by round trips, not by CPU, so the cores no
//! longer cap what 4 workers add (on 2 cores the instant server's rows cannot show it: one
//! worker keeps both busy). The one-worker step takes about 2 minutes.
//!
//! PostgreSQL: `scripts/pg.sh start DIR --owner PID` (DIR under the temp dir; the script's
//! watchdog stops the cluster should this process die), stopped at the end.
//! `MANY_BENCH_STATEMENTS=1` loads `pg_stat_statements` (the cluster restarted once before the
//! first configuration) and prints, after each PostgreSQL run, the statements that took the
//! most database time (its bookkeeping adds a little to the database CPU).
//!
//! Run with `cargo bench --bench many_machines`.

#[path = "support/corpus.rs"]
mod corpus;
#[path = "../tests/support/mem_s3.rs"]
mod mem_s3;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use corpus::{own_cpu, tv};
use mem_s3::MemS3;

const SOURCE: &str = "bench-src";
/// The worker counts benched on PostgreSQL.
const WORKERS: [usize; 3] = [1, 2, 4];

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("many_machines: skipped (run it with `cargo bench --bench many_machines`)");
        return;
    }
    let n: usize = env_number("MANY_BENCH_TASKS", 20_000);
    let concurrency: usize = env_number("MANY_BENCH_CONCURRENCY", 64);
    print_machine(n, concurrency);
    if let Err(e) = bench(n, concurrency) {
        println!("many_machines: bench failed: {e}");
        std::process::exit(1);
    }
}

/// [`env_number`] that takes 0 too (to turn a step off).
fn env_number_or_zero(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn env_number(name: &str, default: usize) -> usize {
    match env_number_or_zero(name, default) {
        0 => default,
        v => v,
    }
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn print_machine(n: usize, concurrency: usize) {
    let cpu = corpus::cpu_model();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "many_machines bench: {cores} cores ({cpu}); load average {} at start; binary {}",
        load(),
        binary().display()
    );
    println!(
        "{n} entries; every `run` process --concurrency {concurrency}; server: in-process mem-s3\n"
    );
}

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_s3-backfill"))
}

/// A group of child processes started together: wall time until the last exited, their CPU
/// summed (`wait4`), each one's exit code (None: killed by a signal).
struct Measured {
    wall: Duration,
    cpu: Duration,
    codes: Vec<Option<i32>>,
}

impl Measured {
    fn all_ok(&self) -> bool {
        self.codes.iter().all(|c| *c == Some(0))
    }
}

fn command(args: &[String], log: &Path) -> std::io::Result<Command> {
    let out = File::create(log)?;
    let mut cmd = Command::new(binary());
    corpus::bench_env(cmd.args(args))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    Ok(cmd)
}

/// Starts one process per argument list, all at once, and waits for every one.
fn measured_group(runs: &[(Vec<String>, PathBuf)]) -> std::io::Result<Measured> {
    let mut cmds = Vec::new();
    for (args, log) in runs {
        cmds.push(command(args, log)?);
    }
    let start = Instant::now();
    let mut children = Vec::new();
    for mut cmd in cmds {
        children.push(cmd.spawn()?);
    }
    let mut codes = vec![None; children.len()];
    let mut left: Vec<usize> = (0..children.len()).collect();
    let mut cpu = Duration::ZERO;
    while !left.is_empty() {
        let mut still = Vec::new();
        for i in left {
            let pid = children[i].id() as libc::pid_t;
            let mut status: libc::c_int = 0;
            // SAFETY: plain FFI calls with pointers to live stack values; the children are
            // ours and are waited for only here (each `Child` is dropped without waiting).
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
            if r == pid {
                cpu += tv(usage.ru_utime) + tv(usage.ru_stime);
                codes[i] = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
            } else if r == 0 {
                still.push(i);
            } else {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
                still.push(i);
            }
        }
        left = still;
        if !left.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let wall = start.elapsed();
    drop(children);
    Ok(Measured { wall, cpu, codes })
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n    ")
}

/// The throwaway PostgreSQL cluster: its directory, DSN, and the clock tick rate.
struct Cluster {
    dir: PathBuf,
    dsn: String,
    ticks: f64,
}

fn pg_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/pg.sh")
}

impl Cluster {
    fn start() -> Result<Cluster, String> {
        let dir = std::env::temp_dir().join(format!("s3b-many-bench-{}", std::process::id()));
        let mut start = Command::new("bash");
        start.arg(pg_script()).arg("start").arg(&dir);
        start.arg("--owner").arg(std::process::id().to_string());
        let out = stdout_of(&mut start, "scripts/pg.sh start")?;
        let dsn = out.lines().last().unwrap_or_default().trim().to_string();
        if !dsn.starts_with("postgres") {
            return Err(format!("scripts/pg.sh start printed no DSN: {out:?}"));
        }
        // SAFETY: plain FFI call.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok(Cluster { dir, dsn, ticks })
    }

    /// Runs `sql` with `psql` as the superuser; its unaligned output.
    fn psql(&self, sql: &str) -> Result<String, String> {
        let debian = Path::new("/usr/lib/postgresql/15/bin/psql");
        let psql = if debian.exists() {
            debian
        } else {
            Path::new("psql")
        };
        let mut o = Command::new(psql);
        o.args([
            "-X",
            "-A",
            "-F",
            " | ",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &self.dsn,
            "-c",
            sql,
        ]);
        stdout_of(&mut o, "psql")
    }

    /// Loads `pg_stat_statements` (restarts the cluster once).
    fn track_statements(&self) -> Result<(), String> {
        self.psql("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")?;
        self.psql("ALTER SYSTEM SET track_functions = 'pl'")?;
        let mut restart = Command::new("bash");
        restart.arg(pg_script()).arg("restart").arg(&self.dir);
        stdout_of(&mut restart, "scripts/pg.sh restart")?;
        self.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")?;
        // Known only once the library is loaded.
        self.psql("ALTER SYSTEM SET pg_stat_statements.track_planning = on")?;
        self.psql("SELECT pg_reload_conf()")?;
        Ok(())
    }

    /// The statements that took the most execution time since the last reset.
    fn top_statements(&self) -> Result<String, String> {
        self.psql(
            "SELECT calls, round(total_exec_time::numeric, 1) AS total_ms, \
             round(total_plan_time::numeric, 1) AS plan_ms, \
             round(mean_exec_time::numeric, 3) AS mean_ms, rows, \
             left(regexp_replace(query, '\\s+', ' ', 'g'), 150) \
             FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 10",
        )
    }

    /// Row writes per table since the last reset: updates that were HOT need no index entry.
    fn table_writes(&self) -> Result<String, String> {
        self.psql(
            "SELECT schemaname || '.' || relname, n_tup_upd, n_tup_hot_upd, n_tup_ins, \
             coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE n_tup_upd + n_tup_ins > 0 \
             ORDER BY n_tup_upd DESC LIMIT 8",
        )
    }

    /// The WAL written and the sessions (connections) opened since the last reset.
    fn wal(&self) -> Result<String, String> {
        self.psql(
            "SELECT wal_records, wal_fpi, wal_bytes, d.sessions, round(d.session_time) \
             FROM pg_stat_wal, pg_stat_database d WHERE d.datname = current_database()",
        )
    }

    /// The plpgsql functions' time since the last reset (the counters trigger).
    fn function_times(&self) -> Result<String, String> {
        self.psql(
            "SELECT schemaname || '.' || funcname, calls, round(total_time::numeric, 1), \
             round(self_time::numeric, 1) FROM pg_stat_user_functions ORDER BY total_time DESC",
        )
    }

    /// The job URL of job `name`.
    fn job(&self, name: &str) -> String {
        let sep = if self.dsn.contains('?') { '&' } else { '?' };
        format!("{}{sep}job={name}", self.dsn)
    }

    fn postmaster(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// CPU the cluster used so far: the postmaster's own and its reaped children's (fields
    /// utime, stime, cutime, cstime), plus every live child's own (utime, stime). In ticks.
    fn cpu_ticks(&self) -> u64 {
        let Some(pm) = self.postmaster() else {
            return 0;
        };
        let mut total = 0;
        if let Some(f) = stat_fields(pm) {
            total += f.utime + f.stime + f.cutime + f.cstime;
        }
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return total;
        };
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Some(f) = stat_fields(pid) {
                if f.ppid == pm {
                    total += f.utime + f.stime;
                }
            }
        }
        total
    }

    fn stop(&self) {
        let _ = Command::new("bash")
            .arg(pg_script())
            .arg("stop")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `cmd` (no input) and returns its stdout; an error with its stderr when it fails.
fn stdout_of(cmd: &mut Command, what: &str) -> Result<String, String> {
    let o = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{what} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The fields of `/proc/PID/stat` this bench reads.
struct Stat {
    ppid: i32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

fn stat_fields(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field k is f[k - 3].
    let num = |k: usize| f.get(k - 3).and_then(|s| s.parse::<u64>().ok());
    Some(Stat {
        ppid: f.get(1)?.parse().ok()?,
        utime: num(14)?,
        stime: num(15)?,
        cutime: num(16)?,
        cstime: num(17)?,
    })
}

/// One configuration's figures.
struct Row {
    name: String,
    workers: usize,
    plan: Measured,
    plan_db_s: Option<f64>,
    run: Measured,
    db_s: Option<f64>,
    /// CPU of this process (the in-process S3 server) during the run, in seconds.
    server_s: f64,
    copied: usize,
    /// The server's answer delay in this configuration, in ms (None: none).
    latency_ms: Option<u64>,
}

impl Row {
    /// How many cores the run kept busy: the workers', the database's and the server's CPU
    /// over the wall time.
    fn cores_busy(&self) -> f64 {
        (self.run.cpu.as_secs_f64() + self.db_s.unwrap_or(0.0) + self.server_s)
            / self.run.wall.as_secs_f64().max(1e-9)
    }
}

/// The manifest of one configuration.
enum Backend<'a> {
    Sqlite(&'a Path),
    Pg(&'a Cluster),
}

fn bench(n: usize, concurrency: usize) -> Result<(), String> {
    let mem = MemS3::start().map_err(|e| format!("cannot start mem-s3: {e}"))?;
    let t = Instant::now();
    let seeded = corpus::seed(&mem, SOURCE, n);
    println!(
        "seeded {n} entries ({} keys, {} delete markers) in {:.2} s",
        seeded.keys,
        seeded.markers,
        t.elapsed().as_secs_f64()
    );
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let cluster = Cluster::start()?;
    let statements = std::env::var_os("MANY_BENCH_STATEMENTS").is_some();
    if statements {
        if let Err(e) = cluster.track_statements() {
            cluster.stop();
            return Err(e);
        }
    }
    println!(
        "PostgreSQL: {} (log {})\n",
        cluster.dsn,
        cluster.dir.join("log").display()
    );
    let mut rows = Vec::new();
    let mut failed = None;
    let mut record = |outcome: Result<Row, String>| match outcome {
        Ok(row) => rows.push(row),
        Err(e) => {
            println!("  failed: {e}\n");
            failed = Some(e);
        }
    };
    let configs = std::iter::once(None).chain(WORKERS.iter().map(|&w| Some(w)));
    for workers in configs {
        let backend = match workers {
            None => Backend::Sqlite(dir.path()),
            Some(_) => Backend::Pg(&cluster),
        };
        let pg = matches!(backend, Backend::Pg(_));
        let w = workers.unwrap_or(1);
        record(config(
            &mem,
            n,
            concurrency,
            backend,
            w,
            None,
            statements,
            dir.path(),
        ));
        if statements && pg {
            print_rows(
                "statements by database time during run (calls | exec ms | plan ms | mean exec ms | rows | query)",
                cluster.top_statements(),
            );
            print_rows(
                "functions during run (name | calls | total ms | self ms)",
                cluster.function_times(),
            );
            print_rows(
                "tables during run (table | updates | HOT updates | inserts | index scans)",
                cluster.table_writes(),
            );
            print_rows(
                "WAL and sessions during run (WAL records | full-page images | bytes | sessions opened | session ms)",
                cluster.wal(),
            );
        }
    }
    // Far away: every answer waits, each worker is bound by round trips, not by the cores.
    let far_ms = env_number_or_zero("MANY_BENCH_LATENCY_MS", 20) as u64;
    if far_ms > 0 {
        let far_concurrency = env_number("MANY_BENCH_FAR_CONCURRENCY", 8);
        mem.set_latency(Duration::from_millis(far_ms));
        println!("every answer now waits {far_ms} ms; --concurrency {far_concurrency} a worker\n");
        for w in [1, 4] {
            let backend = Backend::Pg(&cluster);
            let far = Some(far_ms);
            record(config(
                &mem,
                n,
                far_concurrency,
                backend,
                w,
                far,
                false,
                dir.path(),
            ));
        }
        mem.set_latency(Duration::ZERO);
    }
    cluster.stop();
    print_summary(&rows, n);
    println!("load average at end: {}", load());
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Prints `psql`'s rows under `title` (or why there are none).
fn print_rows(title: &str, rows: Result<String, String>) {
    match rows {
        Ok(t) => {
            println!("  {title}:");
            for l in t.lines().filter(|l| !l.trim().is_empty()) {
                println!("    {l}");
            }
        }
        Err(e) => println!("  {title}: {e}"),
    }
    println!();
}

/// Plans and runs one configuration into a fresh destination bucket; prints its block.
#[allow(clippy::too_many_arguments)]
fn config(
    mem: &MemS3,
    n: usize,
    concurrency: usize,
    backend: Backend,
    workers: usize,
    latency_ms: Option<u64>,
    statements: bool,
    dir: &Path,
) -> Result<Row, String> {
    let (name, manifest, cluster) = match backend {
        Backend::Sqlite(d) => (
            "SQLite, 1 run".to_string(),
            d.join("bench.db").to_string_lossy().into_owned(),
            None,
        ),
        Backend::Pg(c) => (
            match latency_ms {
                None => format!("PostgreSQL, {workers} run"),
                Some(ms) => format!("PostgreSQL, {workers} run, {ms} ms"),
            },
            c.job(&match latency_ms {
                None => format!("bench{workers}"),
                Some(_) => format!("bench{workers}far"),
            }),
            Some(c),
        ),
    };
    let tag = match (cluster.is_some(), latency_ms) {
        (true, None) => format!("pg{workers}"),
        (true, Some(_)) => format!("pg{workers}-far"),
        (false, _) => "sqlite".into(),
    };
    let dest = format!("bench-dst-{tag}");
    mem.create_bucket(&dest, true);
    println!("{name}: manifest {manifest}, destination s3://{dest}");
    let ep = mem.endpoint();
    let (src, dst) = (format!("s3://{SOURCE}"), format!("s3://{dest}"));
    #[rustfmt::skip]
    let plan_args: Vec<String> = [
        "plan", "--source", &src, "--dest", &dst, "--manifest", &manifest, "--source-endpoint",
        &ep, "--dest-endpoint", &ep, "--path-style", "--delete-markers",
    ].iter().map(|s| s.to_string()).collect();
    let db_cpu = || cluster.map(|c| c.cpu_ticks());
    let db_secs = |before: Option<u64>, after: Option<u64>| {
        cluster.map(|c| after.unwrap_or(0).saturating_sub(before.unwrap_or(0)) as f64 / c.ticks)
    };
    let plan_log = dir.join(format!("plan-{tag}.log"));
    let before = db_cpu();
    let plan = measured_group(&[(plan_args, plan_log.clone())]).map_err(|e| e.to_string())?;
    let plan_db_s = db_secs(before, db_cpu());
    print_line("plan", &plan, n, "versions/s", plan_db_s);
    if !plan.all_ok() {
        return Err(format!("plan failed:\n    {}", tail(&plan_log)));
    }
    if let (true, Some(c)) = (statements, cluster) {
        c.psql("SELECT pg_stat_statements_reset(), pg_stat_reset(), pg_stat_reset_shared('wal')")?;
    }
    let c = concurrency.to_string();
    let runs: Vec<(Vec<String>, PathBuf)> = (0..workers)
        .map(|w| {
            #[rustfmt::skip]
            let args = ["run", "--manifest", &manifest, "--concurrency", &c, "--no-progress"];
            let args = args.iter().map(|s| s.to_string()).collect();
            (args, dir.join(format!("run-{tag}-{w}.log")))
        })
        .collect();
    let before = db_cpu();
    let server_before = own_cpu();
    let run = measured_group(&runs).map_err(|e| e.to_string())?;
    let server_s = own_cpu().saturating_sub(server_before).as_secs_f64();
    let db_s = db_secs(before, db_cpu());
    print_line("run", &run, n, "tasks/s", db_s);
    let busy = run.cpu.as_secs_f64() + db_s.unwrap_or(0.0) + server_s;
    println!(
        "  server CPU {server_s:.2} s during run ({:.3} ms per entry, in-process mem-s3); all CPU together {:.2} cores busy",
        server_s * 1000.0 / n as f64,
        busy / run.wall.as_secs_f64().max(1e-9)
    );
    for (code, (_, log)) in run.codes.iter().zip(&runs) {
        if *code != Some(0) {
            println!("    a run exited {code:?}; its output:\n    {}", tail(log));
        }
    }
    let copied = mem.count(&dest);
    println!(
        "  destination {copied} of {n} entries{}\n",
        if copied == n { "" } else { " (incomplete!)" }
    );
    Ok(Row {
        name,
        workers,
        plan,
        plan_db_s,
        run,
        db_s,
        server_s,
        copied,
        latency_ms,
    })
}

fn print_line(step: &str, m: &Measured, n: usize, unit: &str, db_s: Option<f64>) {
    let secs = m.wall.as_secs_f64().max(1e-9);
    let db = db_s.map_or(String::new(), |s| {
        format!(
            "  database CPU {s:.2} s ({:.4} ms per entry)",
            s * 1000.0 / n as f64
        )
    });
    let codes: Vec<String> = m
        .codes
        .iter()
        .map(|c| c.map_or("signal".into(), |c| c.to_string()))
        .collect();
    println!(
        "  {step:<4} {secs:>7.2} s {:>8.0} {unit:<10}  client CPU {:>6.2} s ({:.3} ms per entry){db}  exit {}",
        n as f64 / secs,
        m.cpu.as_secs_f64(),
        m.cpu.as_secs_f64() * 1000.0 / n as f64,
        codes.join(",")
    );
}

fn print_summary(rows: &[Row], n: usize) {
    let rate = |m: &Measured| n as f64 / m.wall.as_secs_f64().max(1e-9);
    let ms = |s: f64| s * 1000.0 / n as f64;
    let sqlite = rows.iter().find(|r| r.name.starts_with("SQLite"));
    let one_pg = rows
        .iter()
        .find(|r| r.workers == 1 && r.latency_ms.is_none() && !r.name.starts_with("SQLite"));
    // Each configuration's one-run row on PostgreSQL (the same server delay).
    let one_like = |r: &Row| {
        rows.iter().find(|o| {
            o.workers == 1 && o.latency_ms == r.latency_ms && !o.name.starts_with("SQLite")
        })
    };
    println!("summary ({n} tasks each; client CPU = the run processes' user+system, database CPU = the cluster's)");
    println!(
        "{:<26} | {:>10} {:>10} | {:>9} {:>14} {:>10} {:>14} {:>10} | {:>9} {:>8} | {:>4}",
        "config",
        "plan ver/s",
        "plan DB ms",
        "run tsk/s",
        "client ms/task",
        "DB ms/task",
        "server ms/task",
        "cores busy",
        "vs SQLite",
        "vs 1 run",
        "ok"
    );
    for r in rows {
        let vs = |base: Option<&Row>| {
            base.map_or("-".to_string(), |b| {
                format!("{:.2}x", rate(&r.run) / rate(&b.run))
            })
        };
        let ok = r.plan.all_ok() && r.run.all_ok() && r.copied == n;
        println!(
            "{:<26} | {:>10.0} {:>10} | {:>9.0} {:>14.3} {:>10} {:>14.3} {:>10.2} | {:>9} {:>8} | {:>4}",
            r.name,
            rate(&r.plan),
            r.plan_db_s.map_or("-".into(), |s| format!("{:.4}", ms(s))),
            rate(&r.run),
            ms(r.run.cpu.as_secs_f64()),
            r.db_s.map_or("-".into(), |s| format!("{:.4}", ms(s))),
            ms(r.server_s),
            r.cores_busy(),
            vs(sqlite),
            if r.name.starts_with("SQLite") {
                "-".into()
            } else {
                vs(one_like(r))
            },
            if ok { "yes" } else { "NO" }
        );
    }
    println!("targets (issue 20; printed, not asserted):");
    let (Some(s), Some(p1)) = (sqlite, one_pg) else {
        println!("  (a configuration failed: no comparison)");
        return;
    };
    let ratio = rate(&p1.run) / rate(&s.run);
    println!(
        "  1 run on PostgreSQL >= 80% of SQLite's rate: {:.0}% {}",
        ratio * 100.0,
        verdict(ratio >= 0.8)
    );
    for r in rows
        .iter()
        .filter(|r| r.db_s.is_some() && r.latency_ms.is_none())
    {
        let d = ms(r.db_s.unwrap_or(0.0));
        println!(
            "  database CPU <= 0.05 ms per task, {}: {d:.4} ms {}",
            r.name,
            verdict(d <= 0.05)
        );
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    if let Some(p4) = rows
        .iter()
        .find(|r| r.workers == 4 && r.latency_ms.is_none())
    {
        let x = rate(&p4.run) / rate(&p1.run);
        println!(
            "  4 runs >= 3x one run where the cores allow: {x:.2}x {} ({cores} cores; one run's client CPU is {:.0}% of its wall time, {:.2} cores busy in all)",
            verdict(x >= 3.0),
            p1.run.cpu.as_secs_f64() * 100.0 / p1.run.wall.as_secs_f64().max(1e-9),
            p1.cores_busy()
        );
    }
    let far = |w: usize| {
        rows.iter()
            .find(|r| r.workers == w && r.latency_ms.is_some())
    };
    for r in [far(1), far(4)].into_iter().flatten() {
        let s = r.db_s.unwrap_or(0.0);
        println!(
            "  (database CPU, {}: {:.4} ms per task, {:.1} ms per second of wall time: at a few hundred tasks/s a worker's work per second and per group, heartbeats, progress rows, commits of small groups, weighs more than the tasks'; an idle cluster uses none)",
            r.name,
            ms(s),
            s * 1000.0 / r.run.wall.as_secs_f64().max(1e-9)
        );
    }
    if let (Some(f1), Some(f4)) = (far(1), far(4)) {
        let x = rate(&f4.run) / rate(&f1.run);
        println!(
            "  4 runs >= 3x one run, each answer {} ms away (round trips, not cores, bound a run): {x:.2}x {} ({:.2} cores busy with 1 run, {:.2} with 4)",
            f1.latency_ms.unwrap_or(0),
            verdict(x >= 3.0),
            f1.cores_busy(),
            f4.cores_busy()
        );
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "(met)"
    } else {
        "(not met)"
    }
}
