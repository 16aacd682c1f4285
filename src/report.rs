//! report: `status` (counts and progress) and the completion report (the summary plus every
//! failed, skipped or blocked task), read from the manifest and written as it streams.
//!
//! May call: the manifest (its records) and config.

use std::io::Write;

use indicatif::HumanBytes;
use serde::Serialize;

use crate::config::JobSettings;
use crate::manifest::{Counts, Problem};

/// Human-readable status lines.
pub fn status_text(settings: &JobSettings, c: &Counts) -> String {
    let pct = if c.total == 0 {
        100.0
    } else {
        (c.done + c.skipped) as f64 * 100.0 / c.total as f64
    };
    let listing = if c.listing_complete {
        "complete".to_string()
    } else {
        format!("in progress ({} entries so far)", c.listed_entries)
    };
    let requests: Vec<String> = c
        .requests
        .iter()
        .map(|(op, n)| format!("{op} {n}"))
        .collect();
    format!(
        "job: {} -> {}\n\
         listing: {listing}\n\
         tasks: {} total ({} delete markers): {} done, {} pending, {} in progress, {} failed, {} blocked behind a failure, {} skipped ({} archived) ({pct:.1}% finished)\n\
         bytes: {} of {} copied\n\
         retries: {}\n\
         requests: {}",
        settings.source,
        settings.dest_label(),
        c.total,
        c.delete_markers,
        c.done,
        c.pending,
        c.in_progress,
        c.failed,
        c.blocked,
        c.skipped,
        c.archived,
        HumanBytes(c.bytes_done),
        HumanBytes(c.bytes_total),
        c.retries,
        if requests.is_empty() { "none yet".to_string() } else { requests.join(", ") },
    )
}

/// The completion report as JSON: settings, counts, problems.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    /// The job.
    pub job: &'a JobSettings,
    /// The counts.
    pub counts: &'a Counts,
    /// Failed, skipped and blocked tasks.
    pub problems: &'a [Problem],
}

/// Writes CSV: a header, then one line per failed, skipped or blocked task (bucket, key,
/// version id, state, error class, code, HTTP status, attempts, message). Rows come from
/// `rows`, which calls back once per problem, so the report streams.
pub fn write_csv<W: Write>(
    out: W,
    settings: &JobSettings,
    rows: impl FnOnce(&mut dyn FnMut(Problem) -> std::io::Result<()>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut w = csv::Writer::from_writer(out);
    let io = |e: csv::Error| std::io::Error::other(e.to_string());
    w.write_record([
        "bucket",
        "key",
        "version_id",
        "state",
        "error_class",
        "error_code",
        "http_status",
        "attempts",
        "message",
    ])
    .map_err(io)?;
    let bucket = settings.source.bucket.as_str();
    rows(&mut |p: Problem| {
        w.write_record([
            bucket,
            &p.key,
            &p.version_id,
            &p.state,
            p.error_class.as_deref().unwrap_or(""),
            p.error_code.as_deref().unwrap_or(""),
            &p.http_status.map(|s| s.to_string()).unwrap_or_default(),
            &p.attempts.to_string(),
            p.message.as_deref().unwrap_or(""),
        ])
        .map_err(io)
    })?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_csv() {
        let settings: JobSettings = serde_json::from_str(
            r#"{"source":{"bucket":"b","prefix":""},"dest":{"bucket":"d","prefix":""},
            "source_side":{"endpoint":null,"region":null,"profile":null,"path_style":false},
            "dest_side":{"endpoint":null,"region":null,"profile":null,"path_style":false},
            "selection":{"prefix":"","delete_markers":false,"latest_only":false},
            "copy":{"mode":"auto","multipart_threshold":1,"part_size":5242880,"storage_class":null,"sse":null,"sse_kms_key_id":null,"acl":null}}"#,
        )
        .unwrap();
        let mut out = Vec::new();
        write_csv(&mut out, &settings, |f| {
            f(Problem {
                key: "a,b \"c\"".into(),
                version_id: "v1".into(),
                state: "failed".into(),
                error_class: Some("fatal".into()),
                error_code: Some("AccessDenied".into()),
                http_status: Some(403),
                message: Some("line".into()),
                attempts: 2,
            })
        })
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("b,\"a,b \"\"c\"\"\",v1,failed,fatal,AccessDenied,403,2,line"),
            "{text}"
        );
        assert!(
            settings.copy.stamp,
            "old settings without the field keep the stamp on"
        );
    }
}
