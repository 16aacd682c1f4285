//! inputs::fetch: supplied files that live in S3 (`s3://BUCKET/KEY`) brought to the local disk
//! through the s3 layer: a HEAD for the size, then ranged GETs of [`CHUNK`] bytes written to a
//! file (memory stays bounded whatever the size), every request through the source's handle (retried). The
//! version the HEAD answered is the one read, so a file replaced meanwhile is not mixed.
//! Also the [`Fetch`] of an inventory whose data files were downloaded this way.
//!
//! May call: `s3` (handles, types), `inputs` (errors, the inventory's `Fetch`).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::inventory::Fetch;
use super::InputError;
use crate::s3::{ObjectRef, S3Client, S3Error, S3};

/// Bytes per ranged GET.
pub const CHUNK: u64 = 8 << 20;

/// A parsed `s3://BUCKET/KEY`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Url {
    /// Bucket.
    pub bucket: String,
    /// Key (not empty).
    pub key: String,
}

impl S3Url {
    /// `s3://BUCKET/KEY` with a key; None for anything else (a local path).
    pub fn parse(s: &str) -> Option<S3Url> {
        let (bucket, key) = s.strip_prefix("s3://")?.split_once('/')?;
        (!bucket.is_empty() && !key.is_empty()).then(|| S3Url {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// Another key of the same bucket.
    pub fn sibling(&self, key: &str) -> S3Url {
        S3Url {
            bucket: self.bucket.clone(),
            key: key.to_string(),
        }
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// Why a file could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// S3 refused or failed.
    #[error("{0}")]
    S3(#[from] S3Error),
    /// The local copy could not be written.
    #[error("{0}")]
    Local(InputError),
}

/// Downloads `url` into `to` (created); returns its size.
pub async fn download<C: S3Client>(s3: &S3<C>, url: &S3Url, to: &Path) -> Result<u64, FetchError> {
    let local = |e: io::Error| {
        FetchError::Local(InputError::file(&to.display().to_string(), e.to_string()))
    };
    let s3 = s3.req();
    let mut obj = ObjectRef::key(&url.bucket, &url.key);
    let head = s3.head_object(&obj, None).await?;
    obj.version_id = head.version_id.filter(|v| v != "null");
    let mut file = File::create(to).map_err(local)?;
    let mut at = 0;
    while at < head.size {
        let last = (at + CHUNK).min(head.size) - 1;
        let bytes = s3.get_object(&obj, Some((at, last))).await?;
        file.write_all(&bytes).map_err(local)?;
        at += bytes.len().max(1) as u64;
    }
    file.sync_all().map_err(local)?;
    Ok(head.size)
}

/// The whole body of a small object (an inventory's `manifest.json`); None when it does not
/// exist and `optional` (its `manifest.checksum`).
pub async fn small_object<C: S3Client>(
    s3: &S3<C>,
    url: &S3Url,
    optional: bool,
) -> Result<Option<Vec<u8>>, S3Error> {
    let obj = ObjectRef::key(&url.bucket, &url.key);
    match s3.req().get_object(&obj, None).await {
        Ok(b) => Ok(Some(b.to_vec())),
        Err(e) if optional && (e.status == Some(404) || e.code.as_deref() == Some("NoSuchKey")) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// An inventory's data files, downloaded: key → local file.
#[derive(Debug, Default)]
pub struct Downloaded {
    /// The inventory's `manifest.json` URL (names files in messages).
    pub manifest: Option<S3Url>,
    /// Local copies by key.
    pub files: HashMap<String, PathBuf>,
}

impl Fetch for Downloaded {
    fn describe(&self, key: &str) -> String {
        match &self.manifest {
            Some(m) => m.sibling(key).to_string(),
            None => key.to_string(),
        }
    }

    fn open(&self, key: &str) -> io::Result<File> {
        let path = self
            .files
            .get(key)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "not downloaded"))?;
        File::open(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = S3Url::parse("s3://inv/a b/manifest.json").unwrap();
        assert_eq!(
            (u.bucket.as_str(), u.key.as_str()),
            ("inv", "a b/manifest.json")
        );
        assert_eq!(
            u.sibling("data/x.csv.gz").to_string(),
            "s3://inv/data/x.csv.gz"
        );
        assert!(S3Url::parse("s3://inv").is_none());
        assert!(S3Url::parse("s3://inv/").is_none());
        assert!(S3Url::parse("/tmp/manifest.json").is_none());
    }
}
