//! verify: checks the destination against the source, key by key and version by version.
//!
//! Both buckets are walked in key order (the s3 layer's [`Versions`]) and merged as they
//! stream in, so memory holds one key's history at a time. A key matches when its
//! destination history, oldest first, has the same kinds (version or delete marker), sizes
//! and ETags as the source's selected history. ETags are compared only where both sides'
//! encryption keeps them MD5s: a differing pair is HEADed, and KMS or SSE-C objects are
//! compared by size alone.
//!
//! May call: the s3 layer.

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;

use serde::Serialize;

use crate::config::{JobSettings, Sse};
use crate::s3::{
    Encryption, ListFrom, ObjectRef, Retrier, S3Client, S3Error, VersionEntry, Versions,
};

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

/// Streams a bucket's listing as one key's history at a time (newest first, as listed),
/// with the destination prefix taken off the keys.
struct Histories<'a, C: S3Client> {
    walk: Versions<'a, C>,
    strip: usize,
    buf: VecDeque<VersionEntry>,
    retries: AtomicU64,
}

impl<'a, C: S3Client> Histories<'a, C> {
    fn new(
        client: &'a C,
        retrier: &'a Retrier,
        bucket: &str,
        prefix: String,
        strip: usize,
    ) -> Self {
        let from = ListFrom {
            bucket: bucket.to_string(),
            prefix,
            max_keys: 1000,
            ..Default::default()
        };
        Histories {
            walk: Versions::new(client, retrier, from),
            strip,
            buf: VecDeque::new(),
            retries: AtomicU64::new(0),
        }
    }

    async fn peek_key(&mut self) -> Result<Option<String>, S3Error> {
        while self.buf.is_empty() {
            let Some(page) = self.walk.next_page(&self.retries).await? else {
                break;
            };
            let strip = self.strip;
            self.buf.extend(page.entries.into_iter().map(|mut e| {
                e.key = e.key[strip.min(e.key.len())..].to_string();
                e
            }));
        }
        Ok(self.buf.front().map(|e| e.key.clone()))
    }

    /// The next key's entries, newest first as listed.
    async fn next(&mut self) -> Result<Option<(String, Vec<VersionEntry>)>, S3Error> {
        let Some(key) = self.peek_key().await? else {
            return Ok(None);
        };
        let mut out = Vec::new();
        while self.peek_key().await?.as_deref() == Some(key.as_str()) {
            out.push(self.buf.pop_front().expect("peeked"));
        }
        Ok(Some((key, out)))
    }
}

fn etags_comparable(s: &VersionEntry, d: &VersionEntry) -> bool {
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
fn order_is_ambiguous(h: &[VersionEntry]) -> bool {
    h.windows(2).any(|w| {
        w[0].is_delete_marker != w[1].is_delete_marker && w[0].last_modified == w[1].last_modified
    })
}

fn compare(source: &[VersionEntry], dest: &[VersionEntry]) -> Option<String> {
    if order_is_ambiguous(source) || order_is_ambiguous(dest) {
        // Compare what is certain: the object versions in order, the number of delete
        // markers, and the kind of the current entry.
        let sv: Vec<VersionEntry> = source
            .iter()
            .filter(|e| !e.is_delete_marker)
            .cloned()
            .collect();
        let dv: Vec<VersionEntry> = dest
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

fn compare_in_order(source: &[VersionEntry], dest: &[VersionEntry]) -> Option<String> {
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

/// Both sides of a verification.
pub struct Verifier<'a, C: S3Client> {
    /// The job.
    pub settings: &'a JobSettings,
    /// Reads the source.
    pub source: &'a C,
    /// Reads the destination.
    pub dest: &'a C,
    /// Retries and bounds requests.
    pub retrier: &'a Retrier,
}

impl<C: S3Client> Verifier<'_, C> {
    /// Compares the destination with the source. `progress` sees the report after each key.
    pub async fn run(
        &self,
        mut progress: impl FnMut(&VerifyReport),
    ) -> Result<VerifyReport, S3Error> {
        let s = self.settings;
        let mut src = Histories::new(
            self.source,
            self.retrier,
            &s.source.bucket,
            s.selection.prefix.clone(),
            0,
        );
        let dest_prefix = format!("{}{}", s.dest.prefix, s.selection.prefix);
        let mut dst = Histories::new(
            self.dest,
            self.retrier,
            &s.dest.bucket,
            dest_prefix,
            s.dest.prefix.len(),
        );
        let mut report = VerifyReport::default();
        loop {
            let (sk, dk) = (src.peek_key().await?, dst.peek_key().await?);
            let take_src = matches!((&sk, &dk), (Some(a), Some(b)) if a <= b) || dk.is_none();
            let take_dst = matches!((&sk, &dk), (Some(a), Some(b)) if b <= a) || sk.is_none();
            if sk.is_none() && dk.is_none() {
                break;
            }
            let (mut key, mut se, mut de) = (String::new(), Vec::new(), Vec::new());
            if take_src {
                (key, se) = src.next().await?.expect("peeked");
            }
            if take_dst {
                (key, de) = dst.next().await?.expect("peeked");
            }
            se.retain(|e| s.selection.selects(e));
            se.reverse();
            de.reverse();
            if se.is_empty() && de.is_empty() {
                continue;
            }
            self.blank_incomparable_etags(&key, &mut se, &mut de)
                .await?;
            report.keys += 1;
            report.versions += se.len() as u64;
            progress(&report);
            if let Some(detail) = compare(&se, &de) {
                report.mismatched_keys += 1;
                if report.mismatches.len() < 1000 {
                    report.mismatches.push(Mismatch { key, detail });
                }
            }
        }
        Ok(report)
    }

    /// Where a pair of plain ETags differs, HEADs both versions: an encryption that does not
    /// keep MD5 ETags (KMS, DSSE, SSE-C) on either side makes the pair compared by size.
    async fn blank_incomparable_etags(
        &self,
        key: &str,
        se: &mut [VersionEntry],
        de: &mut [VersionEntry],
    ) -> Result<(), S3Error> {
        if self.settings.copy.sse == Some(Sse::AwsKms) {
            de.iter_mut().for_each(|e| e.etag = None);
        }
        if se.len() != de.len() {
            return Ok(());
        }
        let retries = AtomicU64::new(0);
        for (a, b) in se.iter_mut().zip(de.iter_mut()) {
            if a.is_delete_marker
                || b.is_delete_marker
                || !etags_comparable(a, b)
                || a.etag == b.etag
            {
                continue;
            }
            let sref = ObjectRef::version(&self.settings.source.bucket, key, &a.version_id);
            let dkey = self.settings.dest_key(key);
            let dref = ObjectRef::version(&self.settings.dest.bucket, &dkey, &b.version_id);
            let sh = self
                .retrier
                .call(&retries, || self.source.head_object(&sref, None))
                .await?;
            let dh = self
                .retrier
                .call(&retries, || self.dest.head_object(&dref, None))
                .await?;
            if !Encryption::keeps_md5_etag(sh.encryption.as_ref())
                || !Encryption::keeps_md5_etag(dh.encryption.as_ref())
            {
                a.etag = None;
                b.etag = None;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(id: &str, size: u64, etag: &str) -> VersionEntry {
        VersionEntry {
            key: "k".into(),
            version_id: id.into(),
            size,
            etag: Some(etag.into()),
            ..Default::default()
        }
    }

    #[test]
    fn compares_histories() {
        let dm = VersionEntry {
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
