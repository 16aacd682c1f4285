//! The command line as a new user meets it, without a server: every usage error is one line
//! on stderr with exit 2 (clap's own errors included), help and version exit 0.

mod support;

use support::*;

/// Runs the binary with `args` and returns (exit code, stderr).
fn fails(args: &[&str]) -> (Option<i32>, String) {
    let o = run(args);
    (o.status.code(), stderr_of(&o))
}

fn assert_one_line(args: &[&str], says: &str) {
    let (code, err) = fails(args);
    assert_eq!(code, Some(2), "{args:?}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: not one line:\n{err}"
    );
    assert!(err.starts_with("error: "), "{args:?}: {err}");
    assert!(err.contains(says), "{args:?}: expected {says:?} in {err}");
    assert!(
        !err.contains("--help'"),
        "{args:?}: clap's tip is left out: {err}"
    );
}

#[test]
fn usage_errors_are_one_line_and_exit_2() {
    // A value clap's parser refuses.
    assert_one_line(
        &["run", "--manifest", "job.db", "--concurrency", "0"],
        "--concurrency",
    );
    // A value our own parser refuses (below the program's reserve).
    assert_one_line(
        &["run", "--manifest", "job.db", "--max-memory", "10MiB"],
        "below 56MiB",
    );
    // A missing required argument: the flag is named on the same line.
    assert_one_line(&["run"], "--manifest");
    // An unknown flag.
    assert_one_line(
        &["run", "--manifest", "job.db", "--concurency", "4"],
        "--concurency",
    );
    // An unknown command.
    assert_one_line(&["copy"], "copy");
    // follow's intake, polling and reconcile flags.
    assert_one_line(
        &["follow", "--manifest", "job.db", "--events", "kafka:topic"],
        "--events",
    );
    assert_one_line(
        &[
            "follow",
            "--manifest",
            "job.db",
            "--events",
            "http://127.0.0.1",
        ],
        "ADDR:PORT",
    );
    assert_one_line(
        &["follow", "--manifest", "job.db", "--poll-interval", "0"],
        "--poll-interval",
    );
    // A job that does not exist: nothing is created, one line.
    assert_one_line(
        &[
            "follow",
            "--manifest",
            "no-such-job.db",
            "--poll-interval",
            "5",
        ],
        "no-such-job.db",
    );
    // No command at all: one line naming the commands, not the whole help.
    assert_one_line(&[], "plan, run, replicate");
}

#[test]
fn help_and_version_exit_0() {
    let o = run(&["--help"]);
    expect_code(&o, 0);
    assert!(String::from_utf8_lossy(&o.stdout).contains("replicate"));
    let o = run(&["--version"]);
    expect_code(&o, 0);
    assert!(String::from_utf8_lossy(&o.stdout).contains("s3-backfill"));
}
