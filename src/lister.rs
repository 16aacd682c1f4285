//! lister: the plan stage. Walks `ListObjectVersions` of the source (through the s3 layer's
//! [`Versions`] walk) and writes every selected version and delete marker into the manifest,
//! one page per transaction together with the checkpoint, so a killed `plan` resumes.
//!
//! It refuses, before writing anything of a page: a destination key longer than S3 allows,
//! and several versions of one key for an unversioned destination.
//!
//! May call: the s3 layer and the manifest.

use std::sync::atomic::AtomicU64;

use crate::config::JobSettings;
use crate::manifest::{Listing, Manifest, ManifestError, NewTask};
use crate::s3::{show_key, ListFrom, Retrier, S3Client, S3Error, VersionEntry, Versions};
use crate::select::Selector;

/// Entries per listing page (S3's maximum).
pub const PAGE_SIZE: i32 = 1000;

/// The longest key S3 accepts, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// Entries per page that `plan` asks for: [`PAGE_SIZE`], or `S3_BACKFILL_LIST_PAGE_SIZE`
/// (1 to 1000) for tests and for servers that page less.
pub fn page_size() -> i32 {
    std::env::var("S3_BACKFILL_LIST_PAGE_SIZE")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .filter(|n| (1..=PAGE_SIZE).contains(n))
        .unwrap_or(PAGE_SIZE)
}

/// Why listing stopped.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// An S3 request failed for good.
    #[error("{0}")]
    S3(#[from] S3Error),
    /// The manifest failed.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The job cannot be planned as asked (bad input: exit 2).
    #[error("{0}")]
    Refused(String),
}

/// What a listing did.
#[derive(Clone, Debug, Default)]
pub struct ListStats {
    /// The manifest's listing was already complete: nothing was listed.
    pub already_complete: bool,
    /// The listing continued from a checkpoint.
    pub resumed: bool,
    /// Pages listed in this call.
    pub pages: u64,
    /// Entries seen in this call.
    pub entries: u64,
    /// Entries selected into the manifest in this call.
    pub selected: u64,
}

/// The lister of one job.
pub struct Lister<'a, C: S3Client> {
    /// Reads the source.
    pub client: &'a C,
    /// The job.
    pub settings: &'a JobSettings,
    /// Retries and bounds requests.
    pub retrier: &'a Retrier,
    /// Decides which destinations each listed entry goes to.
    pub selector: &'a Selector<'a, C>,
    /// Whether the destination keeps versions (when it does not, a key with several selected
    /// versions is refused).
    pub dest_versioned: bool,
}

impl<C: S3Client> Lister<'_, C> {
    /// Lists the source into the manifest from its checkpoint on. `on_page` sees the
    /// checkpoint after each committed page (for progress).
    pub async fn list_into(
        &self,
        manifest: &mut Manifest,
        mut on_page: impl FnMut(&Listing),
    ) -> Result<ListStats, ListError> {
        let mut cp = manifest.listing()?;
        let mut stats = ListStats {
            already_complete: cp.complete,
            resumed: cp.pages > 0 && !cp.complete,
            ..Default::default()
        };
        let from = ListFrom {
            bucket: self.settings.source.bucket.clone(),
            prefix: self.settings.selection.prefix.clone(),
            key_marker: cp.key_marker.clone(),
            version_marker: cp.version_marker.clone(),
            max_keys: page_size(),
        };
        let mut walk = Versions::new(self.client, self.retrier, from);
        let retries = AtomicU64::new(0);
        // The last selected key and how many of its versions were selected (versioning check).
        let mut last_selected: Option<(String, u64)> = None;
        while !cp.complete {
            let Some(page) = walk.next_page(&retries).await? else {
                break;
            };
            let mut tasks = Vec::with_capacity(page.entries.len());
            for e in page.entries.iter() {
                let pos = advance(&mut cp, e);
                let dests = self.selector.destinations(e).await?;
                if dests.is_empty() {
                    continue;
                }
                self.check_key(e)?;
                if !self.dest_versioned {
                    let n = self.selected_versions(manifest, &mut last_selected, &stats, e)?;
                    if n > 1 {
                        return Err(self.needs_versioning(manifest, e, n));
                    }
                }
                tasks.extend(dests.into_iter().map(|dest| NewTask {
                    entry: e.clone(),
                    history_pos: pos,
                    dest,
                }));
            }
            stats.entries += page.entries.len() as u64;
            stats.selected += tasks.len() as u64;
            stats.pages += 1;
            cp.pages += 1;
            let (km, vm) = walk.position();
            cp.key_marker = km.clone();
            cp.version_marker = vm.clone();
            cp.complete = !page.truncated;
            manifest.insert_page(&tasks, &cp)?;
            on_page(&cp);
        }
        Ok(stats)
    }

    /// Refuses a destination key longer than S3 allows, naming it.
    fn check_key(&self, e: &VersionEntry) -> Result<(), ListError> {
        let len = self.settings.dest.prefix.len() + e.key.len();
        if len > MAX_KEY_BYTES {
            return Err(ListError::Refused(format!(
                "destination key for {} would be {len} bytes (destination prefix {:?} + key), longer than S3's {MAX_KEY_BYTES}; use a shorter destination prefix",
                show_key(&e.key),
                self.settings.dest.prefix
            )));
        }
        Ok(())
    }

    /// How many versions of `e`'s key are selected so far, `e` included.
    fn selected_versions(
        &self,
        manifest: &Manifest,
        last: &mut Option<(String, u64)>,
        stats: &ListStats,
        e: &VersionEntry,
    ) -> Result<u64, ListError> {
        let n = match last {
            Some((k, n)) if *k == e.key => *n + 1,
            // Only the first key of a resumed listing can have tasks from before the restart.
            None if stats.resumed => manifest.count_key(&e.key)? + 1,
            _ => 1,
        };
        *last = Some((e.key.clone(), n));
        Ok(n)
    }

    fn needs_versioning(&self, manifest: &Manifest, e: &VersionEntry, n: u64) -> ListError {
        ListError::Refused(format!(
            "dest: bucket {} does not have versioning enabled, but key {} has {n} versions to copy; enable versioning on the destination bucket, or plan with --latest-only (delete {} first)",
            self.settings.dest.bucket,
            show_key(&e.key),
            manifest.path()
        ))
    }
}

/// Moves the checkpoint past one entry; returns the entry's place in its key's history
/// (0 is the newest).
fn advance(cp: &mut Listing, e: &VersionEntry) -> u64 {
    let pos = if cp.last_key.as_deref() == Some(e.key.as_str()) {
        cp.last_key_seen
    } else {
        cp.last_key = Some(e.key.clone());
        0
    };
    cp.last_key_seen = pos + 1;
    cp.entries += 1;
    pos
}
