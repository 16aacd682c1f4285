//! verify: checks the destination against the source, key by key and version by version.
//!
//! Both buckets are listed in key order and merged as they stream in, so memory holds one
//! key's history at a time. A key matches when its destination history, oldest first, has
//! the same kinds (version or delete marker), sizes and ETags as the source's selected history.

use std::sync::atomic::AtomicU64;

use aws_sdk_s3::Client;
use serde::Serialize;

use crate::config::{JobSettings, Side};
use crate::lister::{list_page, Entry, ListError};
use crate::s3::{Limiter, RetryPolicy};

/// One key whose histories differ.
#[derive(Clone, Debug, Serialize)]
pub struct Mismatch {
    /// The source key.
    pub key: String,
    /// What differs.
    pub detail: String,
}

/// The outcome of a verification.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    /// Keys compared.
    pub keys: u64,
    /// Source versions and delete markers compared.
    pub versions: u64,
    /// Keys that differ (the first 1,000).
    pub mismatches: Vec<Mismatch>,
    /// How many keys differ.
    pub mismatched_keys: u64,
}

impl VerifyReport {
    /// Every key matched.
    pub fn ok(&self) -> bool {
        self.mismatched_keys == 0
    }
}

/// Streams a bucket's listing as one key's history (oldest first) at a time.
struct Histories<'a> {
    client: &'a Client,
    side: Side,
    bucket: &'a str,
    prefix: String,
    strip: usize,
    buf: std::collections::VecDeque<Entry>,
    key_marker: Option<String>,
    version_marker: Option<String>,
    done: bool,
    policy: &'a RetryPolicy,
    limiter: &'a Limiter,
    retries: AtomicU64,
}

impl<'a> Histories<'a> {
    async fn fill(&mut self) -> Result<(), ListError> {
        while self.buf.is_empty() && !self.done {
            let page = list_page(
                self.client,
                self.side,
                self.bucket,
                &self.prefix,
                self.key_marker.as_deref(),
                self.version_marker.as_deref(),
                1000,
                self.policy,
                self.limiter,
                &self.retries,
            )
            .await?;
            self.done = !page.truncated;
            self.key_marker = page.next_key_marker;
            self.version_marker = page.next_version_marker;
            self.buf.extend(page.entries.into_iter().map(|mut e| {
                e.key = e.key[self.strip.min(e.key.len())..].to_string();
                e
            }));
        }
        Ok(())
    }

    async fn peek_key(&mut self) -> Result<Option<String>, ListError> {
        self.fill().await?;
        Ok(self.buf.front().map(|e| e.key.clone()))
    }

    /// The next key's entries, newest first as listed.
    async fn next(&mut self) -> Result<Option<(String, Vec<Entry>)>, ListError> {
        let Some(key) = self.peek_key().await? else {
            return Ok(None);
        };
        let mut out = Vec::new();
        loop {
            self.fill().await?;
            match self.buf.front() {
                Some(e) if e.key == key => out.push(self.buf.pop_front().expect("front")),
                _ => break,
            }
        }
        Ok(Some((key, out)))
    }
}

fn etags_comparable(s: &Entry, d: &Entry) -> bool {
    match (&s.etag, &d.etag) {
        // Multipart ETags depend on the part layout, which a copy may change (a source of
        // uneven parts): only plain MD5 ETags are compared, elsewhere sizes decide.
        (Some(se), Some(de)) => !se.contains('-') && !de.contains('-'),
        _ => false,
    }
}

/// Whether a history's order between versions and delete markers rests on a tie: two
/// neighbours of different kinds with the same last-modified second (servers that do not
/// interleave them in listings leave that order unknown).
fn order_is_ambiguous(h: &[Entry]) -> bool {
    h.windows(2).any(|w| {
        w[0].is_delete_marker != w[1].is_delete_marker && w[0].last_modified == w[1].last_modified
    })
}

fn compare(source: &[Entry], dest: &[Entry]) -> Option<String> {
    if order_is_ambiguous(source) || order_is_ambiguous(dest) {
        // Compare what is certain: the object versions in order, the number of delete
        // markers, and the kind of the current entry.
        let sv: Vec<Entry> = source
            .iter()
            .filter(|e| !e.is_delete_marker)
            .cloned()
            .collect();
        let dv: Vec<Entry> = dest
            .iter()
            .filter(|e| !e.is_delete_marker)
            .cloned()
            .collect();
        if let Some(d) = compare_in_order(&sv, &dv) {
            return Some(d);
        }
        let (sm, dm) = (source.len() - sv.len(), dest.len() - dv.len());
        if sm != dm {
            return Some(format!(
                "{sm} delete markers at source, {dm} at destination"
            ));
        }
        if source.last().map(|e| e.is_delete_marker) != dest.last().map(|e| e.is_delete_marker) {
            return Some("the current entry differs in kind".into());
        }
        return None;
    }
    compare_in_order(source, dest)
}

fn compare_in_order(source: &[Entry], dest: &[Entry]) -> Option<String> {
    if source.len() != dest.len() {
        return Some(format!(
            "source has {} versions to copy, destination has {}",
            source.len(),
            dest.len()
        ));
    }
    for (i, (s, d)) in source.iter().zip(dest).enumerate() {
        if s.is_delete_marker != d.is_delete_marker {
            return Some(format!(
                "version #{i} (oldest is #0): source {} is a {}, destination has a {}",
                s.version_id,
                if s.is_delete_marker {
                    "delete marker"
                } else {
                    "version"
                },
                if d.is_delete_marker {
                    "delete marker"
                } else {
                    "version"
                }
            ));
        }
        if s.is_delete_marker {
            continue;
        }
        if s.size != d.size {
            return Some(format!(
                "version #{i} ({}): size {} at source, {} at destination",
                s.version_id, s.size, d.size
            ));
        }
        if etags_comparable(s, d) && s.etag != d.etag {
            return Some(format!(
                "version #{i} ({}): ETag {} at source, {} at destination",
                s.version_id,
                s.etag.as_deref().unwrap_or("-"),
                d.etag.as_deref().unwrap_or("-")
            ));
        }
    }
    None
}

/// Selects and orders a source key's entries (listed newest first) as the job replicates them.
fn selected(settings: &JobSettings, mut entries: Vec<Entry>) -> Vec<Entry> {
    let sel = &settings.selection;
    entries.retain(|e| {
        if sel.latest_only {
            e.is_latest && !e.is_delete_marker
        } else {
            sel.delete_markers || !e.is_delete_marker
        }
    });
    entries.reverse();
    entries
}

/// Compares the destination with the source under the job's settings. `progress` sees the
/// report after each key (for a progress display).
pub async fn verify(
    settings: &JobSettings,
    source: &Client,
    dest: &Client,
    policy: &RetryPolicy,
    limiter: &Limiter,
    mut progress: impl FnMut(&VerifyReport),
) -> Result<VerifyReport, ListError> {
    let mut src = Histories {
        client: source,
        side: Side::Source,
        bucket: &settings.source.bucket,
        prefix: settings.selection.prefix.clone(),
        strip: 0,
        buf: Default::default(),
        key_marker: None,
        version_marker: None,
        done: false,
        policy,
        limiter,
        retries: AtomicU64::new(0),
    };
    let mut dst = Histories {
        client: dest,
        side: Side::Dest,
        bucket: &settings.dest.bucket,
        prefix: format!("{}{}", settings.dest.prefix, settings.selection.prefix),
        strip: settings.dest.prefix.len(),
        buf: Default::default(),
        key_marker: None,
        version_marker: None,
        done: false,
        policy,
        limiter,
        retries: AtomicU64::new(0),
    };
    let mut report = VerifyReport::default();
    loop {
        let sk = src.peek_key().await?;
        let dk = dst.peek_key().await?;
        let (key, s, d) = match (sk, dk) {
            (None, None) => break,
            (Some(s), Some(d)) if s == d => {
                let (k, se) = src.next().await?.expect("peeked");
                let (_, de) = dst.next().await?.expect("peeked");
                (k, se, de)
            }
            (Some(s), Some(d)) if s < d => {
                let (k, se) = src.next().await?.expect("peeked");
                (k, se, Vec::new())
            }
            (Some(_), None) => {
                let (k, se) = src.next().await?.expect("peeked");
                (k, se, Vec::new())
            }
            _ => {
                let (k, de) = dst.next().await?.expect("peeked");
                (k, Vec::new(), de)
            }
        };
        let s = selected(settings, s);
        let mut d = d;
        d.reverse();
        if settings.copy.sse.as_deref() == Some("aws:kms") {
            for e in d.iter_mut() {
                e.etag = None;
            }
        }
        if s.is_empty() && d.is_empty() {
            continue;
        }
        report.keys += 1;
        report.versions += s.len() as u64;
        progress(&report);
        if let Some(detail) = compare(&s, &d) {
            report.mismatched_keys += 1;
            if report.mismatches.len() < 1000 {
                report.mismatches.push(Mismatch { key, detail });
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(id: &str, size: u64, etag: &str) -> Entry {
        Entry {
            key: "k".into(),
            version_id: id.into(),
            size,
            etag: Some(etag.into()),
            ..Default::default()
        }
    }

    #[test]
    fn compares_histories() {
        let dm = Entry {
            is_delete_marker: true,
            ..v("m", 0, "")
        };
        assert!(compare(&[v("1", 1, "a"), dm.clone()], &[v("x", 1, "a"), dm.clone()]).is_none());
        assert!(compare(&[v("1", 1, "a")], &[v("x", 1, "b")]).is_some());
        assert!(compare(&[v("1", 1, "a"), dm.clone()], &[dm, v("x", 1, "a")]).is_some());
        assert!(compare(&[v("1", 1, "a")], &[]).is_some());
        // A multipart source copied with another layout: sizes decide.
        assert!(compare(&[v("1", 9, "a-2")], &[v("x", 9, "b")]).is_none());
        assert!(compare(&[v("1", 9, "a")], &[v("x", 9, "b-2")]).is_none());
        assert!(compare(&[v("1", 9, "a-2")], &[v("x", 9, "b-3")]).is_none());
    }
}
