//! report: `status` (counts and progress) and the completion report (summary plus every
//! failed or skipped task), read from the manifest.

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
    format!(
        "job: {} -> {}\n\
         listing: {listing}\n\
         tasks: {} total ({} delete markers): {} done, {} pending, {} in progress, {} failed, {} skipped ({pct:.1}% finished)\n\
         bytes: {} of {} copied\n\
         retries: {}",
        settings.source,
        settings.dest,
        c.total,
        c.delete_markers,
        c.done,
        c.pending,
        c.in_progress,
        c.failed,
        c.skipped,
        HumanBytes(c.bytes_done),
        HumanBytes(c.bytes_total),
        c.retries,
    )
}

/// The completion report as JSON: settings, counts, problems.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    /// The job.
    pub job: &'a JobSettings,
    /// The counts.
    pub counts: &'a Counts,
    /// Failed and skipped tasks.
    pub problems: &'a [Problem],
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) || s.starts_with(' ') || s.ends_with(' ') {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Writes the report as CSV: a header, then one line per failed or skipped task
/// (bucket, key, version id, state, error class, code, HTTP status, message), like
/// S3 Batch Operations' completion report.
pub fn write_csv(
    out: &mut dyn Write,
    settings: &JobSettings,
    problems: &[Problem],
) -> std::io::Result<()> {
    writeln!(
        out,
        "bucket,key,version_id,state,error_class,error_code,http_status,attempts,message"
    )?;
    for p in problems {
        writeln!(
            out,
            "{},{},{},{},{},{},{},{},{}",
            csv_field(&settings.source.bucket),
            csv_field(&p.key),
            csv_field(&p.version_id),
            p.state,
            csv_field(p.error_class.as_deref().unwrap_or("")),
            csv_field(p.error_code.as_deref().unwrap_or("")),
            p.http_status.map(|s| s.to_string()).unwrap_or_default(),
            p.attempts,
            csv_field(p.message.as_deref().unwrap_or("")),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_csv() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
