//! s3::list: [`Versions`], the one paginated `ListObjectVersions` walk used by the lister,
//! reconciliation and verify (each page is read from the raw XML by [`super::xml`]).
//!
//! May call: the layer's client trait and retry loop.

use std::sync::atomic::AtomicU64;

use super::client::S3Client;
use super::error::{ErrorClass, S3Error};
use super::handle::S3;
use super::types::{ListFrom, VersionEntry, VersionPage};

/// A walk over the versions of a bucket (or of one prefix), one page at a time, with
/// retries. A page that says it is truncated but names no next marker, or a marker that does
/// not advance, is an error (a server bug that would otherwise loop forever).
pub struct Versions<'a, C: S3Client> {
    s3: &'a S3<C>,
    /// Where retries are counted: the side's own counter, or a task's.
    retries: &'a AtomicU64,
    from: ListFrom,
    done: bool,
    /// Pages read so far.
    pub pages: u64,
}

impl<'a, C: S3Client> Versions<'a, C> {
    /// A walk starting at `from` (its markers, if any, are where a checkpoint left off).
    pub fn new(s3: &'a S3<C>, from: ListFrom) -> Self {
        Versions {
            s3,
            retries: s3.own_retries(),
            from,
            done: false,
            pages: 0,
        }
    }

    /// This walk, counting its retries into `n` (a task's counter) instead of the side's.
    pub fn counting(self, n: &'a AtomicU64) -> Self {
        Versions { retries: n, ..self }
    }

    /// Where the next page starts (for checkpoints).
    pub fn position(&self) -> (&Option<String>, &Option<String>) {
        (&self.from.key_marker, &self.from.version_marker)
    }

    /// The next page, or None at the end.
    pub async fn next_page(&mut self) -> Result<Option<VersionPage>, S3Error> {
        if self.done {
            return Ok(None);
        }
        let from = self.from.clone();
        let page = self.s3.counting(self.retries).list_versions(&from).await?;
        self.pages += 1;
        if !page.truncated {
            self.done = true;
            return Ok(Some(page));
        }
        let stuck = |why: String| {
            S3Error::other(
                self.s3.side(),
                "ListObjectVersions",
                ErrorClass::Fatal,
                format!("the server's listing of bucket {} {why}", self.from.bucket),
            )
        };
        let Some(k) = page.next_key_marker.clone() else {
            return Err(stuck(
                "says it is truncated but names no next key marker".into(),
            ));
        };
        if self.from.key_marker.as_deref() == Some(k.as_str())
            && self.from.version_marker == page.next_version_marker
        {
            return Err(stuck(format!("does not advance past key {k:?}")));
        }
        self.from.key_marker = Some(k);
        self.from.version_marker = page.next_version_marker.clone();
        Ok(Some(page))
    }

    /// Every version and delete marker of exactly `key` (under a prefix walk of that key),
    /// oldest first.
    pub async fn history_of(mut self, key: &str) -> Result<Vec<VersionEntry>, S3Error> {
        let mut out = Vec::new();
        while let Some(page) = self.next_page().await? {
            let mut past = false;
            for e in page.entries {
                if e.key == key {
                    out.push(e);
                } else if e.key.as_str() > key {
                    past = true;
                }
            }
            if past {
                break;
            }
        }
        out.reverse();
        Ok(out)
    }
}
