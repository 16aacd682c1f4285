//! lister: the plan stage. Walks `ListObjectVersions` of the source (through the s3 layer's
//! [`Versions`] walk) and writes every selected version and delete marker into the manifest,
//! one page per transaction together with the checkpoint, so a killed `plan` resumes.
//! With a concurrency above 1, the keys are first split into disjoint partitions (`parts`),
//! stored in the manifest, and walked at once, each with its own checkpoint; a partition
//! stops at its end key. A key's versions are all in one partition, so each key's history
//! positions come from one walk.
//!
//! Each page hands the manifest its selected entries, and also every key it listed and the
//! entries it did not select (a refresh needs them: keys gone from a source without
//! versioning, entries that would be written out of order; see `manifest::pages`).
//!
//! It refuses, before writing anything of a page: a destination key longer than S3 allows,
//! and several versions of one key for an unversioned destination.
//!
//! [`supplied`] plans from a manifest the user supplies (`plan --from-csv`,
//! `--from-inventory`) instead of a listing, with the same selection and refusals.
//!
//! May call: the s3 layer, the manifest, config and `select`; [`supplied`] also the `inputs`
//! readers.

mod parts;
pub mod supplied;
#[cfg(test)]
mod tests;

use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;

use crate::config::JobSettings;
use crate::manifest::{
    one_key_end, ListedPage, Listing, Manifest, ManifestError, NewTask, Partition,
};
use crate::s3::{show_key, ListFrom, S3Client, S3Error, VersionEntry, VersionPage, Versions, S3};
use crate::select::Selector;
pub use parts::{marker_before, markers_exact, split_points};

/// The note `plan`, `replicate` and `plan --dry-run` print when the source server cannot start a
/// listing exactly after a key marker, so a bucket is listed in one part.
pub fn one_part_note(bucket: &str) -> String {
    format!(
        "the source server does not start a listing exactly after a key marker (moto drops the first entry): bucket {bucket} is listed in one part"
    )
}

/// Entries per listing page (S3's maximum).
pub const PAGE_SIZE: i32 = 1000;

/// The longest key S3 accepts, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

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
    /// Why the listing was not split as asked, if it was not.
    pub not_split: Option<String>,
}

/// The lister of one job.
pub struct Lister<'a, C: S3Client> {
    /// Reads the source.
    pub source: &'a S3<C>,
    /// The job.
    pub settings: &'a JobSettings,
    /// Decides which destinations each listed entry goes to.
    pub selector: Selector<'a, C>,
    /// Whether the destination keeps versions (when it does not, a key with several selected
    /// versions is refused).
    pub dest_versioned: bool,
    /// Entries per listing page: [`PAGE_SIZE`], or fewer (`--list-page-size`, for tests and
    /// servers that page less).
    pub page_size: i32,
}

impl<'a, C: S3Client> Lister<'a, C> {
    /// The lister of `settings`' source through `source`, selecting with `dest` (destination
    /// 0, read for `--replication-status`; None: not read).
    pub fn new(
        settings: &'a JobSettings,
        source: &'a S3<C>,
        dest: Option<&'a S3<C>>,
        dest_versioned: bool,
    ) -> Lister<'a, C> {
        Lister {
            source,
            settings,
            selector: Selector {
                settings,
                source,
                dest,
            },
            dest_versioned,
            page_size: PAGE_SIZE,
        }
    }
}

/// The next part to list: the next unfinished one (a manifest of one process), or one
/// claimed from a shared manifest (its lease epoch kept in `epochs`).
fn next_part(
    manifest: &Manifest,
    unshared: &mut std::collections::VecDeque<Partition>,
    epochs: &mut std::collections::HashMap<i64, i64>,
) -> Result<Option<Partition>, ListError> {
    if !manifest.is_shared() {
        return Ok(unshared.pop_front());
    }
    let Some((id, epoch)) = manifest.claim_partition()? else {
        return Ok(None);
    };
    epochs.insert(id, epoch);
    Ok(manifest.partitions()?.into_iter().find(|p| p.id == id))
}

/// The walk of one partition.
struct PartWalk<'a, C: S3Client> {
    id: i64,
    start: Option<String>,
    end: Option<String>,
    cp: Listing,
    walk: Versions<'a, C>,
    /// The last selected key and how many of its versions were selected (versioning check).
    last_selected: Option<(String, u64)>,
    /// The partition continues from a checkpoint.
    resumed: bool,
}

impl<C: S3Client> Lister<'_, C> {
    /// Lists the source into the manifest from its checkpoints on, one partition at a time.
    /// `on_page` sees the whole listing's checkpoint after each committed page.
    pub async fn list_into(
        &self,
        manifest: &mut Manifest,
        on_page: impl FnMut(&Listing),
    ) -> Result<ListStats, ListError> {
        self.list_parallel(manifest, 1, on_page).await
    }

    /// Lists the source into the manifest from its checkpoints on, `concurrency` partitions
    /// at once. A listing that has not started is first split into (at most) `concurrency`
    /// partitions, stored before any page; a resumed one keeps its partitions. Pages of
    /// different partitions are committed one at a time, each with its partition's
    /// checkpoint. `on_page` sees the whole listing's checkpoint after each committed page.
    pub async fn list_parallel<'s>(
        &'s self,
        manifest: &mut Manifest,
        concurrency: usize,
        mut on_page: impl FnMut(&Listing),
    ) -> Result<ListStats, ListError> {
        let before = manifest.listing()?;
        let mut stats = ListStats {
            already_complete: before.complete,
            resumed: before.pages > 0 && !before.complete,
            ..Default::default()
        };
        if before.complete {
            return Ok(stats);
        }
        if concurrency > 1 && before.pages == 0 && manifest.partitions()?.len() == 1 {
            stats.not_split = self.split(manifest, concurrency).await?;
        }
        // A shared manifest (PostgreSQL) hands its parts out one claim at a time: other
        // processes list the others (see `Manifest::claim_partition`).
        let shared = manifest.is_shared();
        let mut unshared: std::collections::VecDeque<Partition> = match shared {
            true => Default::default(),
            false => manifest
                .partitions()?
                .into_iter()
                .filter(|p| !p.listing.complete)
                .collect(),
        };
        let mut epochs = std::collections::HashMap::new();
        let mut total = before;
        let fetch = |mut w: PartWalk<'s, C>| async move {
            let page = w.walk.next_page().await;
            (w, page)
        };
        let mut running = FuturesUnordered::new();
        for _ in 0..concurrency.max(1) {
            match next_part(manifest, &mut unshared, &mut epochs)? {
                Some(p) => running.push(fetch(self.part_walk(p))),
                None => break,
            }
        }
        while let Some((mut w, page)) = running.next().await {
            let held = match epochs.get(&w.id) {
                Some(epoch) => manifest.renew_partition(w.id, *epoch)?,
                None => true,
            };
            let more = match page? {
                // Taken over by another process (this one was paused past its lease): its
                // new lister goes on from the checkpoint.
                Some(_) if !held => false,
                Some(page) => {
                    let seen = w.cp.entries;
                    self.take_page(manifest, &mut w, page, &mut stats).await?;
                    total.pages += 1;
                    total.entries += w.cp.entries - seen;
                    on_page(&total);
                    !w.cp.complete
                }
                None => false,
            };
            if more {
                running.push(fetch(w));
            } else if let Some(p) = next_part(manifest, &mut unshared, &mut epochs)? {
                running.push(fetch(self.part_walk(p)));
            }
        }
        Ok(stats)
    }

    /// Splits an unstarted listing into partitions (stored before any page is listed);
    /// says why not when the server cannot start a listing exactly at a key.
    ///
    /// The probes that find the split are sequential requests (about 20 for a bucket of a
    /// few keys). Beside them goes the listing's first page: when it says the listing is
    /// one page, the probes are dropped and the listing is not split (a whole listing in
    /// two requests, not twenty). A longer listing loses nothing: the page ran alongside.
    async fn split(
        &self,
        manifest: &mut Manifest,
        parts: usize,
    ) -> Result<Option<String>, ListError> {
        let probes = split_points(
            self.source,
            &self.settings.source.bucket,
            &self.settings.selection.prefix,
            parts,
        );
        let first_page = async {
            let from = ListFrom {
                bucket: self.settings.source.bucket.clone(),
                prefix: self.settings.selection.prefix.clone(),
                key_marker: None,
                version_marker: None,
                max_keys: self.page_size,
            };
            self.source.req().list_versions(&from).await
        };
        futures::pin_mut!(probes, first_page);
        // The page is polled first: when both are ready, a listing of one page is not split.
        let starts = match futures::future::select(first_page, probes).await {
            futures::future::Either::Right((starts, _)) => starts?,
            // One page holds the whole listing: nothing to split.
            futures::future::Either::Left((Ok(page), _)) if !page.truncated => {
                return Ok(None);
            }
            // Longer (or the page failed: the probes and the walk say what is wrong).
            futures::future::Either::Left((_, probes)) => probes.await?,
        };
        let Some(starts) = starts else {
            return Ok(Some(one_part_note(&self.settings.source.bucket)));
        };
        if !starts.is_empty() {
            manifest.split_partitions(&starts)?;
        }
        Ok(None)
    }

    /// The walk of a partition, from its checkpoint (or from just before its start).
    fn part_walk<'a>(&'a self, p: Partition) -> PartWalk<'a, C> {
        let resumed = p.listing.pages > 0;
        // A partition of one key (`follow`'s scoped refresh) lists with the key as prefix.
        let job_prefix = &self.settings.selection.prefix;
        let one_key = p.start_key.as_ref().filter(|k| {
            p.end_key.as_deref() == Some(one_key_end(k).as_str()) && k.starts_with(job_prefix)
        });
        let (key_marker, version_marker) = match (&p.listing.key_marker, one_key) {
            (Some(_), _) => (
                p.listing.key_marker.clone(),
                p.listing.version_marker.clone(),
            ),
            (None, Some(_)) => (None, None),
            (None, None) => (p.start_key.as_deref().and_then(marker_before), None),
        };
        let from = ListFrom {
            bucket: self.settings.source.bucket.clone(),
            prefix: one_key.cloned().unwrap_or_else(|| job_prefix.clone()),
            key_marker,
            version_marker,
            max_keys: self.page_size,
        };
        PartWalk {
            id: p.id,
            start: p.start_key,
            end: p.end_key,
            cp: p.listing,
            walk: Versions::new(self.source, from),
            last_selected: None,
            resumed,
        }
    }

    /// Selects a page's entries of the partition and commits them with its checkpoint.
    async fn take_page(
        &self,
        manifest: &mut Manifest,
        w: &mut PartWalk<'_, C>,
        page: VersionPage,
        stats: &mut ListStats,
    ) -> Result<(), ListError> {
        let mut tasks = Vec::with_capacity(page.entries.len());
        let mut keys: Vec<String> = Vec::new();
        let mut others = Vec::new();
        let mut past_end = false;
        for e in page.entries.iter() {
            if w.start.as_deref().is_some_and(|s| e.key.as_str() < s) {
                continue;
            }
            if w.end.as_deref().is_some_and(|end| e.key.as_str() >= end) {
                past_end = true;
                break;
            }
            stats.entries += 1;
            if keys.last() != Some(&e.key) {
                keys.push(e.key.clone());
            }
            let pos = advance(&mut w.cp, e);
            let dests = self.selector.destinations(e).await?;
            if dests.is_empty() {
                others.push((e.clone(), pos));
                continue;
            }
            self.check_key(e)?;
            if !self.dest_versioned {
                let n = self.selected_versions(manifest, w, e)?;
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
        stats.selected += tasks.len() as u64;
        stats.pages += 1;
        w.cp.pages += 1;
        let (km, vm) = w.walk.position();
        w.cp.key_marker = km.clone();
        w.cp.version_marker = vm.clone();
        w.cp.complete = past_end || !page.truncated;
        let deletes = |key: &str| self.delete_destinations(key);
        let listed = ListedPage {
            tasks: &tasks,
            keys: &keys,
            others: &others,
            deletes: &deletes,
        };
        manifest.insert_listed_page(w.id, &listed, &w.cp)?;
        Ok(())
    }

    /// The destinations to which the job replicates a delete of `key` (what it would do
    /// with a delete marker of it): a refresh plans these for keys deleted at a source
    /// without versioning. Deciding about a delete marker reads nothing (no tags, no HEAD),
    /// so the selector answers at once; should it ever need a request, the delete is
    /// recorded as not replicated rather than guessed.
    fn delete_destinations(&self, key: &str) -> Vec<i64> {
        let marker = VersionEntry {
            key: key.to_string(),
            version_id: "null".into(),
            is_delete_marker: true,
            is_latest: true,
            ..Default::default()
        };
        match self.selector.destinations(&marker).now_or_never() {
            Some(Ok(dests)) => dests,
            _ => Vec::new(),
        }
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
        w: &mut PartWalk<'_, C>,
        e: &VersionEntry,
    ) -> Result<u64, ListError> {
        let n = match &w.last_selected {
            Some((k, n)) if *k == e.key => *n + 1,
            // Only the first key of a resumed partition can have tasks from before the restart.
            None if w.resumed => manifest.count_key(&e.key)? + 1,
            _ => 1,
        };
        w.last_selected = Some((e.key.clone(), n));
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
