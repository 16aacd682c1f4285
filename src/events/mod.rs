//! events: what `plan`, `run` and `replicate` write to standard error, for a person (text,
//! the default) or for a machine (`--log-format json`: one JSON object per line, field set
//! version [`VERSION`], documented in the README's "Logs and progress for machines").
//!
//! Every line of those commands goes through here: [`say`] (and the [`say!`](crate::say)
//! macro) for the lines a person reads (a `message` event in JSON), and [`emit`] for the
//! events only a machine reads (`task`, `listing`, `retry`, `limit`, `progress`, `summary`;
//! nothing in text). The JSON is written in one place ([`write_json`]), one whole line per
//! write, so lines of concurrent tasks never interleave. The SDK's and the crate's `tracing`
//! lines become `message` events too ([`JsonLayer`]).
//!
//! Parts: [`eta`], the pure rate and ETA estimator; [`ticker`], the periodic progress line of
//! a run and its snapshot in the manifest (read back by `status`).
//!
//! May call: serde_json, time, tracing; the manifest (the ticker's reads and snapshot), the
//! records of copier and s3 it describes.

pub mod eta;
pub mod ticker;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::manifest::{Outcome, Task};
use crate::s3::S3Error;

/// The version of the JSON field set (`"v"` of every line). A field added keeps it; a field
/// renamed, removed or changed in meaning bumps it.
pub const VERSION: u32 = 1;

/// Where stderr goes: text for a person (false) or JSON lines (true).
static JSON: AtomicBool = AtomicBool::new(false);

/// The log format of this process (`--log-format`), set once by `main` before anything runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for a person (and a progress bar on a terminal).
    #[default]
    Text,
    /// One JSON object per line; no progress bar.
    Json,
}

/// Sets the process's log format.
pub fn set_format(f: LogFormat) {
    JSON.store(f == LogFormat::Json, Ordering::SeqCst);
    crate::s3::observe_retries(retry);
}

/// A duration as a flag takes it: the largest whole unit (`45m`, `90s`, `2h`), else ms.
pub fn show_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    for (unit, n) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= n && ms.is_multiple_of(n) {
            return format!("{}{unit}", ms / n);
        }
    }
    format!("{ms}ms")
}

/// Whether stderr carries JSON lines.
pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// The level of a `message` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Errors (the command, or a part of it, failed).
    Error,
    /// Warnings (the command goes on, something is not as asked).
    Warn,
    /// Everything else a person is told.
    Info,
    /// Debugging detail (only with `S3_BACKFILL_LOG`).
    Debug,
}

/// One event. Field meanings are in the README's table; `None` fields are left out, except
/// where a null says something (`eta_secs`, the rates).
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A task ended in this run.
    Task(TaskEvent),
    /// The listing's progress (throttled), and once at its end.
    Listing {
        /// Versions and delete markers listed so far (selected or not).
        entries: u64,
        /// Pages listed so far.
        pages: u64,
        /// The listing reached its end.
        complete: bool,
    },
    /// A request failed and is tried again.
    Retry {
        /// `source` or `dest`.
        side: String,
        /// The S3 operation.
        operation: &'static str,
        /// The task's source key, when the request was made for a task.
        #[serde(skip_serializing_if = "Option::is_none")]
        key: Option<String>,
        /// The task's source version id.
        #[serde(skip_serializing_if = "Option::is_none")]
        version_id: Option<String>,
        /// The error class (`retryable`, `throttled`).
        class: &'static str,
        /// The attempt that failed (1 is the first).
        attempt: u32,
        /// The wait before the next attempt.
        delay_ms: u64,
        /// The error.
        error: String,
    },
    /// A hard limit was reached: the run stops taking tasks.
    Limit {
        /// Which (`max-requests`, `max-bytes`, `max-duration`, ...).
        limit: String,
        /// The line the text summary says.
        message: String,
    },
    /// The run's progress, every `--progress-interval`.
    Progress(ProgressEvent),
    /// How the run ended: the figures of the text summary.
    Summary(SummaryEvent),
    /// A line for a person.
    Message {
        /// How serious.
        level: Level,
        /// The line (without its `error: ` or `warning: ` prefix).
        message: String,
    },
}

/// A `task` event.
#[derive(Clone, Debug, Serialize)]
pub struct TaskEvent {
    /// `done`, `failed`, `skipped` or `restore_pending`.
    pub outcome: &'static str,
    /// The source key.
    pub key: String,
    /// The source version id.
    pub version_id: String,
    /// A delete marker.
    pub delete_marker: bool,
    /// The destination bucket.
    pub dest_bucket: String,
    /// The destination key.
    pub dest_key: String,
    /// Bytes of the version (0 for a delete marker).
    pub bytes: u64,
    /// Time spent on the task in this run.
    pub duration_ms: u64,
    /// Attempts counted in the manifest, this one included.
    pub attempts: u64,
    /// Request retries spent in this run.
    pub retries: u64,
    /// How it was copied (done only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<&'static str>,
    /// The destination's version id (done, when known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dest_version_id: Option<String>,
    /// The error class (failed, skipped, restore_pending).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_class: Option<&'static str>,
    /// The error, or why it was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl TaskEvent {
    /// The event of `task` ending with `outcome` at `dest_bucket`/`dest_key`; None for an
    /// outcome that is no end (put back in the queue).
    pub fn of(
        task: &Task,
        outcome: &Outcome,
        dest: (&str, &str),
        took: Duration,
        attempts: u64,
    ) -> Option<TaskEvent> {
        let mut e = TaskEvent {
            outcome: "done",
            key: task.entry.key.clone(),
            version_id: task.entry.version_id.clone(),
            delete_marker: task.entry.is_delete_marker,
            dest_bucket: dest.0.to_string(),
            dest_key: dest.1.to_string(),
            bytes: if task.entry.is_delete_marker {
                0
            } else {
                task.entry.size
            },
            duration_ms: took.as_millis() as u64,
            attempts,
            retries: 0,
            method: None,
            dest_version_id: None,
            error_class: None,
            error: None,
        };
        match outcome {
            Outcome::Done {
                copied, retries, ..
            } => {
                e.method = Some(copied.method.as_str());
                e.dest_version_id.clone_from(&copied.dest_version_id);
                e.retries = *retries;
            }
            Outcome::Failed { error, retries } => {
                e.outcome = "failed";
                e.error_class = Some(error.class.as_str());
                e.error = Some(error.to_string());
                e.retries = *retries;
            }
            Outcome::Skipped {
                class,
                reason,
                retries,
            } => {
                e.outcome = "skipped";
                e.error_class = Some(class.as_str());
                e.error = Some(reason.clone());
                e.retries = *retries;
            }
            Outcome::RestorePending { reason } => {
                e.outcome = "restore_pending";
                e.error_class = Some(crate::s3::ErrorClass::Archived.as_str());
                e.error = Some(reason.clone());
            }
            Outcome::Requeued => return None,
        }
        Some(e)
    }
}

/// A `progress` event (and the text progress line).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProgressEvent {
    /// Tasks done (the whole job).
    pub done: u64,
    /// Tasks failed.
    pub failed: u64,
    /// Tasks skipped.
    pub skipped: u64,
    /// Tasks of the job (grows while the listing goes on).
    pub total: u64,
    /// Open tasks this run can still copy (pending and in progress, less those blocked
    /// behind a failed version or waiting for a restore).
    pub remaining: u64,
    /// Bytes of done versions.
    pub bytes_done: u64,
    /// Tasks ended per second, recently (null until measured).
    pub tasks_per_sec: Option<f64>,
    /// Bytes copied per second, recently.
    pub bytes_per_sec: Option<f64>,
    /// Seconds left at the recent rate (null while the listing goes on or no rate yet).
    pub eta_secs: Option<u64>,
    /// The listing is complete (else `total` still grows).
    pub listing_complete: bool,
    /// Seconds since the run started.
    pub elapsed_secs: u64,
}

/// A `summary` event.
#[derive(Clone, Debug, Serialize)]
pub struct SummaryEvent {
    /// `finished`, `stopped` (the failure threshold or an error), `limit` or `interrupted`.
    pub status: &'static str,
    /// The process's exit code.
    pub exit_code: i32,
    /// This run: tasks done.
    pub done: u64,
    /// This run: of them, found already copied.
    pub reconciled: u64,
    /// This run: tasks failed.
    pub failed: u64,
    /// This run: tasks skipped.
    pub skipped: u64,
    /// This run: bytes copied.
    pub bytes: u64,
    /// This run: requests sent.
    pub requests: u64,
    /// This run: retries.
    pub retries: u64,
    /// Why it stopped early, or which limit stopped it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The job's counts after the run (null when the manifest could not be read).
    pub job: Option<JobCounts>,
    /// The text summary line.
    pub message: String,
}

/// The job's counts in a `summary` event.
#[derive(Clone, Debug, Serialize)]
pub struct JobCounts {
    /// Every task.
    pub total: u64,
    /// Copied.
    pub done: u64,
    /// Failed.
    pub failed: u64,
    /// Waiting behind a failed version.
    pub blocked: u64,
    /// Skipped.
    pub skipped: u64,
    /// Pending or in progress.
    pub open: u64,
}

/// One JSON line: the version, the time, the event.
#[derive(Serialize)]
struct Line<'a> {
    v: u32,
    ts: String,
    #[serde(flatten)]
    event: &'a Event,
}

/// Now, RFC 3339 in UTC with milliseconds.
fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now
        .replace_nanosecond(now.millisecond() as u32 * 1_000_000)
        .unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The JSON line of `event` (without the newline).
pub fn json_line(event: &Event) -> String {
    let line = Line {
        v: VERSION,
        ts: now_rfc3339(),
        event,
    };
    serde_json::to_string(&line).unwrap_or_else(|e| {
        format!(r#"{{"v":{VERSION},"event":"message","level":"error","message":"event not serialized: {e}"}}"#)
    })
}

/// Writes one JSON line to stderr in a single write (lines never interleave).
fn write_json(event: &Event) {
    let mut line = json_line(event);
    line.push('\n');
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(line.as_bytes());
    let _ = err.flush();
}

/// Writes `event` in JSON mode; nothing in text mode (a person reads the bar and the lines).
pub fn emit(event: Event) {
    if json() {
        write_json(&event);
    }
}

/// A line for a person: printed as is in text mode; in JSON a `message` event whose level is
/// read from the line's prefix (`error: `, `warning: `; else info).
#[allow(clippy::print_stderr)]
pub fn say(line: String) {
    if !json() {
        eprintln!("{line}");
        return;
    }
    let (level, text) = if let Some(t) = line.strip_prefix("error: ") {
        (Level::Error, t.to_string())
    } else if let Some(t) = line.strip_prefix("warning: ") {
        (Level::Warn, t.to_string())
    } else {
        (Level::Info, line)
    };
    message(level, text);
}

/// A `message` event at `level` (JSON mode), or the line as is (text mode).
#[allow(clippy::print_stderr)]
pub fn message(level: Level, text: String) {
    if json() {
        write_json(&Event::Message {
            level,
            message: text,
        });
    } else {
        eprintln!("{text}");
    }
}

/// `say!("...", args)`: [`say`] with `format!` arguments, where `eprintln!` would be.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::events::say(::std::format!($($arg)*))
    };
}

/// A `limit` event for the line `why` that names the limit first (`--max-bytes 1GiB
/// reached (...)`).
pub fn limit(why: &str) {
    if !json() {
        return;
    }
    let which = why
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .trim_start_matches("--");
    emit(Event::Limit {
        limit: which.to_string(),
        message: why.to_string(),
    });
}

tokio::task_local! {
    /// The task (source key, version id) a key worker is copying: named in `retry` events.
    static CURRENT_TASK: (String, String);
}

/// Runs `work` (one task's copy) with its key and version id known to the `retry` events
/// of its requests (JSON mode only; nothing is kept in text mode).
pub async fn in_task<F: std::future::Future>(key: &str, version_id: &str, work: F) -> F::Output {
    if json() {
        CURRENT_TASK
            .scope((key.to_string(), version_id.to_string()), work)
            .await
    } else {
        work.await
    }
}

/// A `retry` event: `e` ended attempt `attempt`; the next comes after `delay`.
pub fn retry(e: &S3Error, attempt: u32, delay: Duration) {
    if !json() {
        return;
    }
    let task = CURRENT_TASK.try_with(|t| t.clone()).ok();
    let (key, version_id) = task.map_or((None, None), |(k, v)| (Some(k), Some(v)));
    emit(Event::Retry {
        side: e.side.to_string(),
        operation: e.op,
        key,
        version_id,
        class: e.class.as_str(),
        attempt,
        delay_ms: delay.as_millis() as u64,
        error: e.to_string(),
    });
}

/// Listing events: one at most every `every` (None: only the last), and always the last.
#[derive(Debug)]
pub struct ListingLog {
    every: Option<Duration>,
    started: std::time::Instant,
    /// Milliseconds since `started` of the last event.
    last: AtomicU64,
    /// Print text lines too (stderr is not a terminal, no spinner): `plan` only.
    text: bool,
}

impl ListingLog {
    /// Events every `every` (`--progress-interval`; None: off); `text`: also a text line
    /// each time in text mode (when no spinner shows it).
    pub fn new(every: Option<Duration>, text: bool) -> ListingLog {
        ListingLog {
            every,
            started: std::time::Instant::now(),
            last: AtomicU64::new(0),
            text,
        }
    }

    fn say(&self, entries: u64, pages: u64, complete: bool) {
        if json() {
            emit(Event::Listing {
                entries,
                pages,
                complete,
            });
        } else if self.text && !complete {
            say(format!(
                "listing: {entries} versions and delete markers listed ({pages} pages)"
            ));
        }
    }

    /// After a committed page: the listing's totals so far.
    pub fn page(&self, entries: u64, pages: u64) {
        let Some(every) = self.every else { return };
        if !json() && !self.text {
            return;
        }
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last.load(Ordering::Relaxed);
        if now.saturating_sub(last) < every.as_millis() as u64 {
            return;
        }
        self.last.store(now, Ordering::Relaxed);
        self.say(entries, pages, false);
    }

    /// Once the listing is complete (JSON mode: a `listing` event with `complete: true`).
    pub fn complete(&self, entries: u64, pages: u64) {
        self.say(entries, pages, true);
    }
}

/// The `tracing` lines of the SDK and the crate as `message` events (JSON mode).
pub struct JsonLayer;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for JsonLayer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut text = FieldText(String::new());
        event.record(&mut text);
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => Level::Error,
            tracing::Level::WARN => Level::Warn,
            tracing::Level::INFO => Level::Info,
            _ => Level::Debug,
        };
        write_json(&Event::Message {
            level,
            message: text.0,
        });
    }
}

/// A tracing event's fields as one line: the message, then `name=value` for the others.
struct FieldText(String);

impl tracing::field::Visit for FieldText {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, "{}={value:?}", field.name());
        }
    }
}

/// A duration for a person: `1h 02m`, `3m 05s`, `42s`.
pub fn show_secs(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m {:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_has_the_version_time_and_event_first() {
        let line = json_line(&Event::Message {
            level: Level::Warn,
            message: "x".into(),
        });
        assert!(line.starts_with(r#"{"v":1,"ts":""#), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "message");
        assert_eq!(v["level"], "warn");
        let ts = v["ts"].as_str().unwrap();
        time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
            .expect("RFC 3339");
    }

    #[test]
    fn a_progress_event_keeps_its_nulls() {
        let line = json_line(&Event::Progress(ProgressEvent::default()));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "progress");
        assert!(
            v["eta_secs"].is_null() && v.get("eta_secs").is_some(),
            "{line}"
        );
    }

    #[test]
    fn durations_read_as_a_person_reads_them() {
        assert_eq!(show_secs(42), "42s");
        assert_eq!(show_secs(185), "3m 05s");
        assert_eq!(show_secs(3720), "1h 02m");
    }
}
