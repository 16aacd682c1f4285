//! verify: checks the destination against the source, key by key and version by version.
//!
//! Both buckets are walked in key order (the s3 layer's [`Versions`]) and merged as they
//! stream in, so memory holds one key's history at a time. A key matches when its
//! destination history, oldest first, has the same kinds (version or delete marker), sizes
//! and ETags as the source's selected history. ETags are compared only where both sides'
//! encryption keeps them MD5s: a differing pair is HEADed, and KMS or SSE-C objects are
//! compared by size alone.
//!
//! A job planned with a replication configuration or Batch Replication filters is verified
//! per destination against the manifest's choice ([`Verifier::run_selected`]): for each
//! destination, a key the manifest gave tasks there must hold exactly the source versions
//! and delete markers of those tasks, in order (skipped tasks are counted, not expected);
//! a key without tasks for a destination is not compared there (counted: the destination
//! may have held it before the job).
//!
//! With `deep` (`verify --deep`), each pair of object versions that matches so far is also
//! compared by what a listing does not show: user metadata (the job's stamp aside),
//! content headers, the website redirect location and tags, with one HEAD and one
//! GetObjectTagging per version and side.
//!
//! May call: the s3 layer; the manifest's tasks of one key.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::Serialize;

use crate::config::{DestRef, JobSettings, Sse};
use crate::manifest::{Manifest, ManifestError, State, Task};
use crate::s3::{
    parse_tagging, Encryption, ListFrom, ObjectHead, ObjectRef, S3Client, S3Error, VersionEntry,
    Versions, S3, STAMP_KEY,
};

/// One key whose histories differ.
#[derive(Clone, Debug, Serialize)]
pub struct Mismatch {
    /// The source key.
    pub key: String,
    /// What differs.
    pub detail: String,
    /// The destination (`s3://bucket/prefix`), for jobs with several or filtered destinations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest: Option<String>,
}

/// One destination of a job verified against the manifest's selection.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DestReport {
    /// The destination id (the tasks' `dest`).
    pub id: i64,
    /// Its bucket.
    pub bucket: String,
    /// Its key prefix.
    pub prefix: String,
    /// The replication rule that writes there, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Keys with tasks for this destination, compared.
    pub keys: u64,
    /// Source versions and delete markers expected there.
    pub versions: u64,
    /// Keys that differ there.
    pub mismatched_keys: u64,
    /// Skipped tasks (not expected there), by error class.
    pub skipped: BTreeMap<String, u64>,
    /// Keys present there without a task for this destination (not compared).
    pub unselected_keys: u64,
}

/// Why a verification stopped.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Listing or reading a bucket failed.
    #[error("{0}")]
    S3(#[from] S3Error),
    /// The manifest could not be read.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
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
    /// Per destination (jobs verified against the manifest's selection; empty otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<DestReport>,
    /// Keys deleted at the source and kept at the destination by a job that does not
    /// replicate deletes (`status` names them): not differences.
    #[serde(default)]
    pub deleted_at_source_kept: u64,
    /// Earlier contents of `null` versions that the destination keeps as older versions (an
    /// unversioned or suspended source overwrote or deleted them in place).
    #[serde(default)]
    pub replaced_null_contents: u64,
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
}

impl<'a, C: S3Client> Histories<'a, C> {
    fn new(s3: &'a S3<C>, bucket: &str, prefix: String, strip: usize) -> Self {
        let from = ListFrom {
            bucket: bucket.to_string(),
            prefix,
            max_keys: 1000,
            ..Default::default()
        };
        Histories {
            walk: Versions::new(s3, from),
            strip,
            buf: VecDeque::new(),
        }
    }

    async fn peek_key(&mut self) -> Result<Option<String>, S3Error> {
        while self.buf.is_empty() {
            let Some(page) = self.walk.next_page().await? else {
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

    /// The entries of `key` if it is the next key here, else none.
    async fn take(&mut self, key: &str) -> Result<Vec<VersionEntry>, S3Error> {
        if self.peek_key().await?.as_deref() != Some(key) {
            return Ok(Vec::new());
        }
        Ok(self.next().await?.map(|(_, e)| e).unwrap_or_default())
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
    pub source: &'a S3<C>,
    /// Reads the destination.
    pub dest: &'a S3<C>,
    /// Also compare metadata, content headers and tags of each pair of versions.
    pub deep: bool,
}

impl<C: S3Client> Verifier<'_, C> {
    /// Compares the destination with the source. `progress` sees the report after each key.
    ///
    /// With the job's manifest, a key whose source history holds a `null` version, or that
    /// is gone from the source, is compared with what the job planned for it instead: an
    /// unversioned or suspended source replaces its `null` version in place, so the
    /// destination rightly keeps the earlier contents (each a task of the manifest) as older
    /// versions. The source's current entry must still be the last one planned.
    pub async fn run(
        &self,
        manifest: Option<&Manifest>,
        mut progress: impl FnMut(&VerifyReport),
    ) -> Result<VerifyReport, VerifyError> {
        let s = self.settings;
        let mut src = Histories::new(self.source, &s.source.bucket, s.selection.prefix.clone(), 0);
        // Where the selected keys land.
        let dest_prefix = s.dest_ref().key(&s.selection.prefix);
        let mut dst = Histories::new(self.dest, &s.dest.bucket, dest_prefix, s.dest.prefix.len());
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
            let d = s.dest_ref();
            report.keys += 1;
            report.versions += se.len() as u64;
            let replaced = se.iter().any(|e| e.version_id == "null") || se.is_empty();
            let planned = match manifest {
                Some(m) if replaced => Some(m.tasks_of_key(&key)?),
                _ => None,
            };
            let detail = match planned.filter(|t| !t.is_empty()) {
                Some(tasks) => {
                    self.compare_planned(&key, d, &se, &de, &tasks, &mut report)
                        .await?
                }
                None => {
                    self.blank_incomparable_etags(&key, d, &mut se, &mut de)
                        .await?;
                    match compare(&se, &de) {
                        None => self.deep_compare(&key, d, &se, &de).await?,
                        found => found,
                    }
                }
            };
            progress(&report);
            if let Some(detail) = detail {
                report.mismatched_keys += 1;
                if report.mismatches.len() < 1000 {
                    report.mismatches.push(Mismatch {
                        key,
                        detail,
                        dest: None,
                    });
                }
            }
        }
        Ok(report)
    }

    /// Compares a key's destination history with what the job planned for it (its tasks,
    /// skipped ones aside), and the source's current entry with the last one planned.
    async fn compare_planned(
        &self,
        key: &str,
        d: DestRef<'_>,
        se: &[VersionEntry],
        de: &[VersionEntry],
        tasks: &[Task],
        report: &mut VerifyReport,
    ) -> Result<Option<String>, S3Error> {
        let mut expected: Vec<VersionEntry> = tasks
            .iter()
            .filter(|t| t.state != State::Skipped)
            .map(planned_entry)
            .collect();
        if let Some(what) = source_moved_on(se, &expected, self.settings.selection.delete_markers) {
            return Ok(Some(what));
        }
        if se.is_empty() && expected.last().is_some_and(|e| !e.is_delete_marker) {
            report.deleted_at_source_kept += 1;
        }
        // An unversioned destination holds only the current object.
        if de.iter().all(|e| e.version_id == "null") {
            expected = expected.split_off(expected.len().saturating_sub(1));
            expected.retain(|e| !e.is_delete_marker);
        }
        let current_null = se.iter().any(|e| e.version_id == "null");
        let null_object = |e: &VersionEntry| e.version_id == "null" && !e.is_delete_marker;
        let nulls = expected.iter().filter(|e| null_object(e)).count();
        let still = usize::from(se.iter().any(null_object));
        report.replaced_null_contents += nulls.saturating_sub(still) as u64;
        if let Some(found) = compare(&expected, de) {
            return Ok(Some(found));
        }
        if de.len() != expected.len() {
            return Ok(None);
        }
        // Deep comparison of the pairs whose source version is still there to read: every
        // versioned one, and the last planned `null` if the source still has it.
        let last_null = expected.iter().rposition(|e| e.version_id == "null");
        let live: Vec<usize> = (0..expected.len())
            .filter(|&i| expected[i].version_id != "null" || (current_null && Some(i) == last_null))
            .collect();
        let pick = |h: &[VersionEntry]| live.iter().map(|&i| h[i].clone()).collect::<Vec<_>>();
        let (sl, dl) = (pick(&expected), pick(de));
        self.deep_compare(key, d, &sl, &dl).await
    }

    /// The destinations a job writes to: its configuration's, or `dest` (id 0).
    fn targets(&self) -> Vec<DestReport> {
        let s = self.settings;
        if s.destinations.is_empty() {
            return vec![DestReport {
                bucket: s.dest.bucket.clone(),
                prefix: s.dest.prefix.clone(),
                ..Default::default()
            }];
        }
        s.destinations
            .iter()
            .enumerate()
            .map(|(i, d)| DestReport {
                id: i as i64,
                bucket: d.bucket.clone(),
                prefix: d.prefix.clone(),
                rule: Some(d.options.rule.clone()),
                ..Default::default()
            })
            .collect()
    }

    /// Compares every destination with the source versions the manifest selected for it
    /// (jobs with a replication configuration or filters). The source and each destination
    /// are walked in key order together, and the manifest is read one key at a time, so
    /// memory holds one key's histories and tasks.
    pub async fn run_selected(
        &self,
        manifest: &Manifest,
        mut progress: impl FnMut(&VerifyReport),
    ) -> Result<VerifyReport, VerifyError> {
        let s = self.settings;
        let mut report = VerifyReport {
            destinations: self.targets(),
            ..Default::default()
        };
        let mut src = Histories::new(self.source, &s.source.bucket, s.selection.prefix.clone(), 0);
        let mut dsts: Vec<Histories<'_, C>> = report
            .destinations
            .iter()
            .map(|t| {
                let at = DestRef {
                    bucket: &t.bucket,
                    prefix: &t.prefix,
                    rule: None,
                };
                let prefix = at.key(&s.selection.prefix);
                Histories::new(self.dest, &t.bucket, prefix, t.prefix.len())
            })
            .collect();
        while let Some(key) = next_key(&mut src, &mut dsts).await? {
            let mut se = src.take(&key).await?;
            se.reverse();
            let tasks = manifest.tasks_of_key(&key)?;
            let mut compared = false;
            for (i, d) in dsts.iter_mut().enumerate() {
                let mut de = d.take(&key).await?;
                de.reverse();
                compared |= self
                    .check_dest(&key, &se, de, &tasks, i, &mut report)
                    .await?;
            }
            if compared {
                report.keys += 1;
                progress(&report);
            }
        }
        Ok(report)
    }

    /// Compares destination `i`'s history of `key` with the source entries of its tasks.
    /// Returns whether the key was compared there (it has tasks for that destination).
    async fn check_dest(
        &self,
        key: &str,
        se: &[VersionEntry],
        mut de: Vec<VersionEntry>,
        tasks: &[Task],
        i: usize,
        report: &mut VerifyReport,
    ) -> Result<bool, S3Error> {
        let t = &mut report.destinations[i];
        let mine: Vec<&Task> = tasks.iter().filter(|x| x.dest == t.id).collect();
        if mine.is_empty() {
            t.unselected_keys += u64::from(!de.is_empty());
            return Ok(false);
        }
        let (mut expected, gone) = expected_at(se, &mine, t);
        t.keys += 1;
        t.versions += expected.len() as u64;
        report.versions += expected.len() as u64;
        let (bucket, prefix) = (t.bucket.clone(), t.prefix.clone());
        let detail = match gone {
            Some(g) => Some(g),
            None => {
                let d = DestRef {
                    bucket: &bucket,
                    prefix: &prefix,
                    rule: None,
                };
                self.blank_incomparable_etags(key, d, &mut expected, &mut de)
                    .await?;
                match compare(&expected, &de) {
                    None => self.deep_compare(key, d, &expected, &de).await?,
                    found => found,
                }
            }
        };
        if let Some(detail) = detail {
            report.destinations[i].mismatched_keys += 1;
            report.mismatched_keys += 1;
            if report.mismatches.len() < 1000 {
                report.mismatches.push(Mismatch {
                    key: key.to_string(),
                    detail,
                    dest: Some(format!("s3://{bucket}/{prefix}")),
                });
            }
        }
        Ok(true)
    }

    /// With `deep`: the first difference in metadata, content headers, website redirect or
    /// tags between the object versions of two histories that otherwise match (paired in
    /// order).
    async fn deep_compare(
        &self,
        key: &str,
        d: DestRef<'_>,
        se: &[VersionEntry],
        de: &[VersionEntry],
    ) -> Result<Option<String>, S3Error> {
        if !self.deep {
            return Ok(None);
        }
        let objects = |h: &[VersionEntry]| -> Vec<VersionEntry> {
            h.iter().filter(|e| !e.is_delete_marker).cloned().collect()
        };
        let dkey = d.key(key);
        for (a, b) in objects(se).iter().zip(objects(de).iter()) {
            let sref = ObjectRef::version(&self.settings.source.bucket, key, &a.version_id);
            let dref = ObjectRef::version(d.bucket, &dkey, &b.version_id);
            let (source, dest) = (self.source.req(), self.dest.req());
            let sh = source.head_object(&sref, None).await?;
            let dh = dest.head_object(&dref, None).await?;
            let st = source.get_tagging(&sref).await?;
            let dt = dest.get_tagging(&dref).await?;
            if let Some(what) = head_difference(&sh, &dh).or_else(|| tag_difference(&st, &dt)) {
                return Ok(Some(format!(
                    "version {} (destination {}): {what}",
                    a.version_id, b.version_id
                )));
            }
        }
        Ok(None)
    }

    /// Where a pair of plain ETags differs, HEADs both versions: an encryption that does not
    /// keep MD5 ETags (KMS, DSSE, SSE-C) on either side makes the pair compared by size.
    async fn blank_incomparable_etags(
        &self,
        key: &str,
        d: DestRef<'_>,
        se: &mut [VersionEntry],
        de: &mut [VersionEntry],
    ) -> Result<(), S3Error> {
        if self.settings.copy.sse == Some(Sse::AwsKms) {
            de.iter_mut().for_each(|e| e.etag = None);
        }
        if se.len() != de.len() {
            return Ok(());
        }
        for (a, b) in se.iter_mut().zip(de.iter_mut()) {
            if a.is_delete_marker
                || b.is_delete_marker
                || !etags_comparable(a, b)
                || a.etag == b.etag
            {
                continue;
            }
            let sref = ObjectRef::version(&self.settings.source.bucket, key, &a.version_id);
            let dkey = d.key(key);
            let dref = ObjectRef::version(d.bucket, &dkey, &b.version_id);
            let sh = self.source.req().head_object(&sref, None).await?;
            let dh = self.dest.req().head_object(&dref, None).await?;
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

/// A planned task as the listing entry it was planned from.
fn planned_entry(t: &Task) -> VersionEntry {
    VersionEntry {
        is_latest: false,
        ..t.entry.clone()
    }
}

/// Where the source has moved on since the job last planned a key (a refresh would plan
/// more): its current entry is not the last planned one, or a version it still holds was
/// never planned.
fn source_moved_on(se: &[VersionEntry], planned: &[VersionEntry], deletes: bool) -> Option<String> {
    let refresh = "changed at the source since the last plan (plan --refresh, then run)";
    match (se.last(), planned.last()) {
        (Some(s), Some(p)) if !same_entry(s, p) => {
            return Some(format!("the current entry {refresh}"));
        }
        (None, Some(p)) if deletes && !p.is_delete_marker => {
            return Some(format!("deleted at the source, {refresh}"));
        }
        _ => {}
    }
    se.iter()
        .find(|e| !planned.iter().any(|p| same_entry(p, e)))
        .map(|e| format!("version {} {refresh}", e.version_id))
}

/// Whether a planned entry is this listed one: the same id, kind and content.
fn same_entry(p: &VersionEntry, e: &VersionEntry) -> bool {
    p.version_id == e.version_id
        && p.is_delete_marker == e.is_delete_marker
        && p.size == e.size
        && (p.etag == e.etag || p.etag.is_none() || e.etag.is_none())
}

/// What differs between a source version's HEAD and its copy's: user metadata (the stamp
/// aside), content headers, website redirect location.
fn head_difference(s: &ObjectHead, d: &ObjectHead) -> Option<String> {
    let mut dm = d.metadata.clone();
    dm.remove(STAMP_KEY);
    let mut sm = s.metadata.clone();
    sm.remove(STAMP_KEY);
    if sm != dm {
        return Some(format!("metadata {sm:?} at source, {dm:?} at destination"));
    }
    if s.content != d.content {
        return Some(format!(
            "content headers {:?} at source, {:?} at destination",
            s.content, d.content
        ));
    }
    if s.website_redirect != d.website_redirect {
        return Some(format!(
            "website redirect {:?} at source, {:?} at destination",
            s.website_redirect, d.website_redirect
        ));
    }
    None
}

/// What differs between two tag sets (URL-encoded), order aside.
fn tag_difference(s: &str, d: &str) -> Option<String> {
    let mut a = parse_tagging(s);
    let mut b = parse_tagging(d);
    a.sort();
    b.sort();
    (a != b).then(|| format!("tags {a:?} at source, {b:?} at destination"))
}

/// The source entries (oldest first) of a destination's tasks `mine` that are not skipped
/// (skips are counted in `t`), and a difference if one of them is gone from the source.
fn expected_at(
    se: &[VersionEntry],
    mine: &[&Task],
    t: &mut DestReport,
) -> (Vec<VersionEntry>, Option<String>) {
    let mut wanted = BTreeSet::new();
    for x in mine {
        if x.state == State::Skipped {
            let class = x.error_class.clone().unwrap_or_else(|| "skipped".into());
            *t.skipped.entry(class).or_default() += 1;
        } else {
            wanted.insert(x.entry.version_id.as_str());
        }
    }
    let expected = se
        .iter()
        .filter(|e| wanted.contains(e.version_id.as_str()))
        .cloned()
        .collect();
    let gone = wanted
        .iter()
        .find(|v| !se.iter().any(|e| e.version_id == **v))
        .map(|v| format!("version {v} selected for this destination is no longer at the source"));
    (expected, gone)
}

/// The smallest next key of the source and the destinations (None when all are done).
async fn next_key<C: S3Client>(
    src: &mut Histories<'_, C>,
    dsts: &mut [Histories<'_, C>],
) -> Result<Option<String>, S3Error> {
    let mut best = src.peek_key().await?;
    for d in dsts.iter_mut() {
        if let Some(k) = d.peek_key().await? {
            if best.as_ref().is_none_or(|b| k < *b) {
                best = Some(k);
            }
        }
    }
    Ok(best)
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
    fn a_null_version_overwritten_after_the_last_plan_is_named() {
        let planned = [v("null", 3, "\"a\""), v("null", 4, "\"b\"")];
        // The destination keeps both contents; the source holds the last planned one.
        assert_eq!(
            source_moved_on(&[v("null", 4, "\"b\"")], &planned, true),
            None
        );
        let moved = source_moved_on(&[v("null", 5, "\"c\"")], &planned, true).unwrap();
        assert!(moved.starts_with("the current entry changed"), "{moved}");
        // Deleted at the source: a difference only where the job replicates deletes.
        let gone = source_moved_on(&[], &planned, true).unwrap();
        assert!(gone.starts_with("deleted at the source"), "{gone}");
        assert_eq!(source_moved_on(&[], &planned, false), None);
        // A version the job never planned.
        let more = [v("v1", 1, "\"x\""), v("null", 4, "\"b\"")];
        let unplanned = source_moved_on(&more, &planned, true).unwrap();
        assert!(unplanned.starts_with("version v1"), "{unplanned}");
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

    fn task(version: &str, state: State, class: Option<&str>) -> Task {
        Task {
            id: 0,
            entry: VersionEntry {
                key: "k".into(),
                version_id: version.into(),
                size: 1,
                ..VersionEntry::default()
            },
            state,
            attempts: 0,
            dest_version_id: None,
            started_at: None,
            upload_id: None,
            stream_only: false,
            version_to_learn: false,
            error_class: class.map(str::to_string),
            dest: 0,
            attempt_stamped: None,
        }
    }

    #[test]
    fn a_destination_expects_its_tasks_source_entries_only() {
        let se = [v("1", 1, "a"), v("2", 1, "b"), v("3", 1, "c")];
        let (t1, t3) = (task("1", State::Done, None), task("3", State::Done, None));
        let t2 = task("2", State::Skipped, Some("archived"));
        let mut r = DestReport::default();
        let (exp, gone) = expected_at(&se, &[&t1, &t2, &t3], &mut r);
        let ids: Vec<&str> = exp.iter().map(|e| e.version_id.as_str()).collect();
        assert_eq!(ids, ["1", "3"], "the skipped version 2 is not expected");
        assert!(gone.is_none());
        assert_eq!(r.skipped.get("archived"), Some(&1));
        let t9 = task("9", State::Done, None);
        let (_, gone) = expected_at(&se, &[&t1, &t9], &mut r);
        assert!(
            gone.is_some_and(|g| g.contains("version 9")),
            "a vanished source version is named"
        );
    }
}
