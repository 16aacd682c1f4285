//! lister::parts: how the job's keys are split into disjoint partitions for a parallel
//! listing, before anything is listed.
//!
//! The split is found with *probes*: listings of one entry. The first entry under a prefix
//! `Q` names its first child `Q + c` (the prefix one character longer); a probe after
//! `Q + c + U+10FFFF` names the next child, and so on: one request per child. Prefixes are
//! expanded a whole level at a time until there are enough children (or the probe budget
//! is spent),
//! so a bucket split by "/" and one without any "/" are both split, by their first
//! characters, as deep as their keys share a beginning. Children count alike whatever they
//! hold: the parts are even in prefixes, not necessarily in keys. Probes are sequential
//! requests (one per child), so expansion stops at the first level that gives enough
//! parts: measured through 150 ms of latency, expanding to 16 children per part cost more
//! time than the parallel walk saved.
//!
//! May call: the s3 layer.

use std::collections::BTreeSet;

use crate::s3::{ListFrom, S3Client, S3Error, S3};

/// Probes (one-entry listings) spent at most on finding the split.
const MAX_PROBES: usize = 128;

/// The highest character: no key has a character after it, so a marker `Q + MAX_CHAR` is
/// after every key that starts with `Q` (and its own extensions by MAX_CHAR, which no
/// real key has; the lister filters entries outside a part anyway).
const MAX_CHAR: char = '\u{10FFFF}';

/// Where a probe walk is.
struct Prober<'a, C: S3Client> {
    s3: &'a S3<C>,
    bucket: &'a str,
    probes: usize,
}

impl<C: S3Client> Prober<'_, C> {
    /// The first key under `prefix` after `marker`.
    async fn first_after(
        &mut self,
        prefix: &str,
        marker: Option<String>,
    ) -> Result<Option<String>, S3Error> {
        let first = self.first_entry(prefix, marker).await?;
        Ok(first.map(|(key, _)| key))
    }

    /// The first entry (key, version id) under `prefix` after `marker`.
    async fn first_entry(
        &mut self,
        prefix: &str,
        marker: Option<String>,
    ) -> Result<Option<(String, String)>, S3Error> {
        self.probes += 1;
        let from = ListFrom {
            bucket: self.bucket.to_string(),
            prefix: prefix.to_string(),
            key_marker: marker,
            version_marker: None,
            max_keys: 1,
        };
        let page = self.s3.req().list_versions(&from).await?;
        Ok(page
            .entries
            .into_iter()
            .next()
            .map(|e| (e.key, e.version_id)))
    }

    /// Whether a listing from a key marker starts exactly after it, as S3 defines: the first
    /// entry, listed again from just before its key, comes first again. (moto 5 drops the
    /// first entry after a key marker given without a version marker.)
    async fn markers_exact(&mut self, prefix: &str) -> Result<bool, S3Error> {
        let Some(first) = self.first_entry(prefix, None).await? else {
            return Ok(true);
        };
        let again = self.first_entry(prefix, marker_before(&first.0)).await?;
        Ok(again.as_ref() == Some(&first))
    }

    /// The children of `q` (`q` one character longer, for each key under `q`), in order.
    async fn children(&mut self, q: &str) -> Result<Vec<String>, S3Error> {
        let mut out = Vec::new();
        let mut marker = None;
        while self.probes < MAX_PROBES {
            let Some(key) = self.first_after(q, marker.take()).await? else {
                break;
            };
            let Some(c) = key.get(q.len()..).and_then(|rest| rest.chars().next()) else {
                // The key equal to the prefix itself: go on after it.
                marker = Some(key);
                continue;
            };
            let child = format!("{q}{c}");
            marker = Some(format!("{child}{MAX_CHAR}"));
            out.push(child);
        }
        Ok(out)
    }
}

/// Whether the server starts a listing exactly after a key marker (two one-entry listings):
/// a listing is split into parts only where it does. `plan --dry-run` asks it to print the
/// note `plan` would print.
pub async fn markers_exact<C: S3Client>(
    s3: &S3<C>,
    bucket: &str,
    prefix: &str,
) -> Result<bool, S3Error> {
    let mut prober = Prober {
        s3,
        bucket,
        probes: 0,
    };
    prober.markers_exact(prefix).await
}

/// The first keys of the partitions after the first (sorted, at most `parts - 1`), for the
/// keys under `prefix`; empty when the keys cannot be split (or `parts` is 1). None when the
/// server cannot start a listing exactly at a key (see `markers_exact`): one part then.
pub async fn split_points<C: S3Client>(
    s3: &S3<C>,
    bucket: &str,
    prefix: &str,
    parts: usize,
) -> Result<Option<Vec<String>>, S3Error> {
    if parts < 2 {
        return Ok(Some(Vec::new()));
    }
    let mut prober = Prober {
        s3,
        bucket,
        probes: 0,
    };
    if !prober.markers_exact(prefix).await? {
        return Ok(None);
    }
    // Every child but the first of an expanded prefix starts a range of its own. Whole
    // levels are expanded, so that the ranges are prefixes of one length (alike in size
    // more often than prefixes of several lengths).
    let mut starts = BTreeSet::new();
    let mut level = vec![prefix.to_string()];
    while starts.len() + 1 < parts && prober.probes < MAX_PROBES && !level.is_empty() {
        let mut next = Vec::new();
        for q in &level {
            let children = prober.children(q).await?;
            starts.extend(children.iter().skip(1).cloned());
            next.extend(children);
        }
        level = next;
    }
    Ok(Some(evenly(&starts.into_iter().collect::<Vec<_>>(), parts)))
}

/// `parts - 1` of the sorted `starts`, spread evenly (all of them when there are fewer).
fn evenly(starts: &[String], parts: usize) -> Vec<String> {
    let ranges = starts.len() + 1;
    if ranges <= parts {
        return starts.to_vec();
    }
    (1..parts)
        .map(|i| starts[i * ranges / parts - 1].clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// A key marker from which a listing reaches `start` without losing it: ListObjectVersions
/// lists the keys after its marker, and no key lies between the marker and `start` (unless
/// it has the character U+10FFFF; entries before `start` are skipped by the lister anyway).
pub fn marker_before(start: &str) -> Option<String> {
    let mut chars = start.chars();
    let last = chars.next_back()?;
    let head = chars.as_str();
    let before = match last as u32 {
        0 => return Some(head.to_string()).filter(|h| !h.is_empty()),
        0xE000 => '\u{D7FF}',
        n => char::from_u32(n - 1)?,
    };
    Some(format!("{head}{before}{MAX_CHAR}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_split_points() {
        let s: Vec<String> = (0..15).map(|i| format!("{i:02}")).collect();
        // 16 ranges in 4 parts: 4 ranges each.
        assert_eq!(evenly(&s, 4), ["03", "07", "11"]);
        assert_eq!(evenly(&s[..2], 4), ["00", "01"]);
        assert!(evenly(&[], 4).is_empty());
    }

    #[test]
    fn markers_sort_just_before_their_start() {
        for start in ["b", "a/", "photos/", "é", "x\u{E000}", "a\u{0}"] {
            let m = marker_before(start).unwrap();
            assert!(m.as_str() < start, "{m:?} < {start:?}");
            // Keys before the start are before the marker too (or start with it).
            for k in ["a", "a/zzz", "b", "photos", "photos.jpg", "é"] {
                if k < start {
                    assert!(k <= m.as_str(), "{k:?} <= {m:?} (start {start:?})");
                }
            }
        }
        assert_eq!(marker_before(""), None);
    }
}
