//! ui: what a person sees: progress bars and spinners (drawn only on a terminal), the
//! one-line run summary and its exit code, the verify report, error lines with hints.
//!
//! May call: indicatif; the records of manifest, copier, verify and the s3 layer it prints.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use crate::copier::RunSummary;
use crate::manifest::{Counts, Refresh};
use crate::s3::S3Error;
use crate::verify::{DestReport, VerifyReport};

/// Writes one line to standard output. A reader that went away (`status | head`) ends the
/// process quietly with exit 0, as Unix tools do (`println!` panics there); any other write
/// error is one line on standard error and exit 1.
pub fn out_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = writeln!(o, "{line}").and_then(|()| o.flush()) {
        exit_on_stdout_error(&e);
    }
}

/// Ends the process after a failed write to standard output (see [`out_line`]).
pub fn exit_on_stdout_error(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    crate::say!("error: writing to standard output: {e}");
    std::process::exit(1);
}

/// `println!` for what a command prints: see [`out_line`].
macro_rules! outln {
    ($($t:tt)*) => {
        $crate::ui::out_line(format_args!($($t)*))
    };
}
pub(crate) use outln;

/// Whether progress is drawn: asked for, standard error is a terminal, and it carries text
/// (not `--log-format json`).
pub fn show_progress(no_progress: bool) -> bool {
    !no_progress && std::io::stderr().is_terminal() && !crate::events::json()
}

/// Whether periodic progress lines are printed (`--progress-interval`): with `--log-format
/// json`, or when standard error is not a terminal (no bar shows the progress there).
pub fn progress_lines() -> bool {
    crate::events::json() || !std::io::stderr().is_terminal()
}

fn spinner(show: bool, template: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new_spinner();
    b.set_style(ProgressStyle::with_template(template).expect("template"));
    b.enable_steady_tick(Duration::from_millis(200));
    b
}

/// The listing spinner of `plan`: entries listed, rate.
pub fn list_spinner(show: bool, already: u64) -> ProgressBar {
    let b = spinner(
        show,
        "{spinner} listing [{elapsed_precise}] {human_pos} versions and delete markers ({per_sec}) {msg}",
    );
    b.set_position(already);
    b
}

/// The copy bar of `run`: tasks, ETA, rate, bytes.
pub fn copy_bar(show: bool, total: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} copying [{elapsed_precise}] {bar:30} {pos}/{len} tasks, ETA {eta}: {msg}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// The copy bar of a run that lists as it copies: its length grows with each listed page,
/// its prefix says how far the listing is.
pub fn live_copy_bar(show: bool, total: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} copying [{elapsed_precise}] {bar:30} {pos}/{len} tasks (listing: {prefix}): {msg}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// The line that ends a listing: `what` ("planned", "listing complete:") and the tasks in
/// the manifest.
pub fn listed_line(what: &str, c: &Counts, resumed: bool, refresh: Option<i64>) -> String {
    let resumed = if resumed {
        " (listing resumed from its checkpoint)"
    } else {
        ""
    };
    match refresh {
        // A refresh lists the source again; the job's tasks are every listing's.
        Some(g) => format!(
            "refresh {g} listed {} versions and delete markers{resumed}; the job has {} tasks ({} delete markers, {}) in all",
            c.listed_entries,
            c.total,
            c.delete_markers,
            HumanBytes(c.bytes_total),
        ),
        None => format!(
            "{what} {} tasks ({} delete markers, {}) from {} listed versions and delete markers{resumed}",
            c.total,
            c.delete_markers,
            HumanBytes(c.bytes_total),
            c.listed_entries,
        ),
    }
}

/// The lag of versions `follow` wrote, in one line: count, percentiles, share within 15
/// minutes.
pub fn lag_line(l: &crate::manifest::LagStats) -> String {
    let ms = |v: Option<i64>| match v {
        Some(v) if v < 10_000 => format!("{v}ms"),
        Some(v) => crate::events::show_duration(std::time::Duration::from_millis(v as u64)),
        None => "-".into(),
    };
    match l.count {
        0 => "lag: no version written by follow yet".into(),
        n => format!(
            "lag over {n} versions: p50 {} p90 {} p99 {} p99.9 {} max {}; {:.2}% within 15 min",
            ms(l.p50_ms),
            ms(l.p90_ms),
            ms(l.p99_ms),
            ms(l.p999_ms),
            ms(l.max_ms),
            l.within_15m.unwrap_or(0.0) * 100.0
        ),
    }
}

/// What a refresh found besides new entries, one line each (none when nothing).
pub fn refresh_findings(r: &Refresh) -> Vec<String> {
    let mut out = Vec::new();
    if r.deleted > 0 {
        out.push(format!(
            "{} keys deleted at the source (no longer listed; the source keeps no versions) are deleted at the destination ({} delete tasks)",
            r.deleted, r.deleted
        ));
    }
    if r.not_deleted > 0 {
        out.push(format!(
            "{} keys deleted at the source (no longer listed; the source keeps no versions) stay at the destination: the job does not replicate deletes (--delete-markers)",
            r.not_deleted
        ));
    }
    if r.out_of_order > 0 {
        out.push(format!(
            "{} versions selected after newer versions of their keys were planned are skipped: they would be written out of order (see `report`)",
            r.out_of_order
        ));
    }
    out
}

/// The `status` line naming the keys deleted at the source that stay at the destination.
pub fn deleted_at_source_line(c: &Counts) -> Option<String> {
    if c.deleted_at_source == 0 {
        return None;
    }
    let more = c.deleted_at_source_keys.len() as u64;
    let rest = if c.deleted_at_source > more {
        format!(" and {} more", c.deleted_at_source - more)
    } else {
        String::new()
    };
    Some(format!(
        "deleted at the source, kept at the destination (no --delete-markers): {} keys: {}{rest}",
        c.deleted_at_source,
        c.deleted_at_source_keys
            .iter()
            .map(|k| crate::s3::show_key(k).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// The verify spinner: keys, rate, differences.
pub fn verify_spinner(show: bool) -> ProgressBar {
    spinner(
        show,
        "{spinner} verifying [{elapsed_precise}] {pos} keys ({per_sec}) {msg}",
    )
}

/// Prints a run's one-line summary to standard error (and what to do next); `code` is the
/// exit status decided for it (`job::exit`), given in the JSON summary.
pub fn finish_run(s: &RunSummary, counts: Option<&Counts>, code: i32) {
    let (status, lines) = run_end(s, counts);
    let mut lines = lines.into_iter();
    let first = lines.next().unwrap_or_default();
    if crate::events::json() {
        let e = summary_event(s, counts, status, code, first);
        crate::events::emit(crate::events::Event::Summary(e));
    } else {
        crate::events::say(first);
    }
    for line in lines {
        crate::events::say(line);
    }
}

/// How a run ended (`status` of the JSON summary) and its text lines (the summary first).
fn run_end(s: &RunSummary, counts: Option<&Counts>) -> (&'static str, Vec<String>) {
    let job = counts
        .map(|c| {
            format!(
                "; the job: {} of {} tasks done, {} failed, {} blocked, {} skipped, {} open",
                c.done,
                c.total,
                c.failed,
                c.blocked,
                c.skipped,
                c.pending + c.in_progress
            )
        })
        .unwrap_or_default();
    let line = format!(
        "this run: {} done ({} reconciled), {} failed, {} skipped, {} copied, {} requests, {} retries{job}",
        s.done,
        s.reconciled,
        s.failed,
        s.skipped,
        HumanBytes(s.bytes),
        s.requests,
        s.retries
    );
    if let Some(why) = &s.aborted {
        return ("stopped", vec![format!("run stopped: {why} ({line})")]);
    }
    if let Some(why) = &s.limit {
        return (
            "limit",
            vec![format!(
                "run stopped at a limit: {why}; run again to continue ({line})"
            )],
        );
    }
    if s.interrupted {
        return (
            "interrupted",
            vec![format!("run interrupted: {line}; run again to continue")],
        );
    }
    let Some(c) = counts else {
        return ("finished", vec![format!("run finished: {line}")]);
    };
    let mut actions = Vec::new();
    if c.archived > 0 {
        actions.push(format!(
            "{} skipped as archived: restore them and run `run --retry-skipped` (or `run --retry-skipped --restore-archived DAYS` to have them restored)",
            c.archived
        ));
    }
    if c.restore_pending > 0 {
        actions.push(format!(
            "{} restores pending: run again once they complete (their keys' later versions wait)",
            c.restore_pending
        ));
    }
    let mut lines = vec![match actions.is_empty() {
        true => format!("run finished: {line}"),
        false => format!("run finished: {line}; {}", actions.join("; ")),
    }];
    if c.failed > 0 {
        lines.push("see `s3-backfill report` for the failed tasks; then `run --retry-failed` (or `--skip-failed`)".into());
    }
    ("finished", lines)
}

/// Prints a verification.
pub fn print_verify(r: &VerifyReport, json: bool) {
    if json {
        outln!("{}", serde_json::to_string(r).unwrap_or_default());
    } else {
        for m in &r.mismatches {
            match &m.dest {
                Some(d) => outln!("mismatch: {d} {:?}: {}", m.key, m.detail),
                None => outln!("mismatch: {:?}: {}", m.key, m.detail),
            }
        }
        for d in &r.destinations {
            outln!("{}", dest_verify_line(d));
        }
        if r.replaced_null_contents > 0 {
            outln!(
                "{} earlier contents of overwritten or deleted null versions kept as older destination versions",
                r.replaced_null_contents
            );
        }
        if r.deleted_at_source_kept > 0 {
            outln!(
                "{} keys deleted at the source kept at the destination (the job does not replicate deletes)",
                r.deleted_at_source_kept
            );
        }
        let verdict = if r.ok() && !r.destinations.is_empty() {
            "every destination matches the source versions selected for it".to_string()
        } else if r.ok() {
            "destination matches source".to_string()
        } else {
            format!("{} keys differ", r.mismatched_keys)
        };
        outln!(
            "verified {} keys, {} versions: {verdict}",
            r.keys,
            r.versions
        );
    }
}

/// One destination's line of a verification against the manifest's selection.
fn dest_verify_line(d: &DestReport) -> String {
    let rule = d
        .rule
        .as_ref()
        .map_or(String::new(), |r| format!(" (rule {r})"));
    let mut line = format!(
        "destination s3://{}/{}{rule}: {} keys, {} versions, {}",
        d.bucket,
        d.prefix,
        d.keys,
        d.versions,
        if d.mismatched_keys == 0 {
            "match".to_string()
        } else {
            format!("{} keys differ", d.mismatched_keys)
        }
    );
    let skipped: u64 = d.skipped.values().sum();
    if skipped > 0 {
        let why: Vec<String> = d.skipped.iter().map(|(c, n)| format!("{n} {c}")).collect();
        line.push_str(&format!(
            "; {skipped} skipped tasks not expected there ({}; see `report`)",
            why.join(", ")
        ));
    }
    if d.unselected_keys > 0 {
        line.push_str(&format!(
            "; {} keys there have no task for it (not compared: they may predate the job)",
            d.unselected_keys
        ));
    }
    line
}

/// A hint for checksum-related rejections from S3-compatible servers.
pub fn checksum_hint(e: &S3Error) -> Option<&'static str> {
    let m = e.message.to_ascii_lowercase();
    if m.contains("chunked")
        || m.contains("trailer")
        || m.contains("x-amz-checksum")
        || m.contains("x-amz-content-sha256")
    {
        Some("the server may not accept the SDK's streaming checksums: try --source-checksum-calculation when-required / --dest-checksum-calculation when-required")
    } else {
        None
    }
}

/// The `summary` event of run `s` that ended with `exit_code` (`status` as
/// [`SummaryEvent`] says), the job's `counts` after it, and the text line.
fn summary_event(
    s: &RunSummary,
    counts: Option<&Counts>,
    status: &'static str,
    exit_code: i32,
    message: String,
) -> crate::events::SummaryEvent {
    crate::events::SummaryEvent {
        status,
        exit_code,
        done: s.done,
        reconciled: s.reconciled,
        failed: s.failed,
        skipped: s.skipped,
        bytes: s.bytes,
        requests: s.requests,
        retries: s.retries,
        reason: s.aborted.clone().or_else(|| s.limit.clone()),
        job: counts.map(|c| crate::events::JobCounts {
            total: c.total,
            done: c.done,
            failed: c.failed,
            blocked: c.blocked,
            skipped: c.skipped,
            open: c.pending + c.in_progress,
        }),
        message,
    }
}
