//! lister::supplied: `plan --from-csv` and `plan --from-inventory`. Instead of listing the source,
//! the tasks come from a manifest the user supplies; they take the lister's path from there:
//! the job's selection (the lister's `Selector::destinations`: prefix, filters, replication
//! rules; a task per destination), the same refusals (key too long,
//! several versions for an unversioned destination), and `Manifest::insert_page` with each
//! key's tasks newest first at their place in the key's history.
//!
//! - CSV (`Bucket,Key[,VersionId]`): rows are staged (bucket checked, line kept), then each
//!   distinct key's history is read with one `ListObjectVersions` (prefix = the key; more
//!   pages only past 1,000 versions), [`CONCURRENCY`] keys at a time through the source's handle. A
//!   row picks its version (without a version id: the key's current entry); a version that
//!   the source does not have stops the plan naming the line. HEAD would not do: it tells
//!   neither whether a version is the latest nor its place in the history, and it cannot
//!   read a delete marker.
//! - Inventory: every row is staged (a scratch SQLite sort, bounded memory), then read back
//!   key by key in history order. No request to the source, unless the selection needs one
//!   (HEAD filters, tag rules: as when listing).
//!
//! The manifest is built as `JOB.db.tmp` and renamed to `JOB.db` only once complete: a bad
//! row, a refusal or an error leaves no manifest (and no `.tmp`). A PostgreSQL job is built
//! the same way under its scratch name and given its own once complete
//! (`manifest::pg::staged`); the scratch sort then goes in the system's temp directory.
//!
//! May call: `inputs` (readers, staging, fetch), the manifest, config, the s3 layer, `select`,
//! and the lister's refusal type, page size and key limit.

use std::fs::File;
use std::path::{Path, PathBuf};

use futures::stream::{self, StreamExt};

use super::{ListError, MAX_KEY_BYTES};
use crate::config::JobSettings;
use crate::inputs::csv_manifest::CsvManifest;
use crate::inputs::fetch::{download, small_object, Downloaded, FetchError, S3Url};
use crate::inputs::inventory::{Fetch, Inventory, InventoryManifest};
use crate::inputs::stage::{Scratch, StagedRow};
use crate::inputs::InputError;
use crate::manifest::pg::staged::Staged;
use crate::manifest::{Counts, Listing, Location, Manifest, NewTask, PgLocation};
use crate::s3::{show_key, ListFrom, S3Client, VersionEntry, Versions, S3};
use crate::select::{DryRun, Selector};

/// Keys whose history is read at once (CSV manifests).
pub const CONCURRENCY: usize = 16;
/// Tasks per manifest transaction.
const PAGE: usize = 1000;

/// A manifest the user supplies (stored in the job's settings).
pub use crate::config::Supplied;

/// The job a supplied manifest is planned into.
pub struct SuppliedJob<'a, C: S3Client> {
    /// Reads the source (histories of CSV keys, HEADs and tags the selection needs) and the
    /// supplied files in S3.
    pub source: &'a S3<C>,
    /// Reads destination 0 (the selection's `--replication-status` check); None: not read.
    pub dest: Option<&'a S3<C>>,
    /// The job.
    pub settings: &'a JobSettings,
    /// The manifest to create (it must not exist): a file, or a PostgreSQL job's URL.
    pub manifest: &'a Path,
    /// Whether the destination keeps versions (else a key with several selected versions is
    /// refused, as the lister does).
    pub dest_versioned: bool,
}

/// What was planned.
#[derive(Clone, Debug)]
pub struct Planned {
    /// The manifest's counts.
    pub counts: Counts,
    /// Rows (CSV) or entries (inventory) read.
    pub rows: u64,
}

fn refused(e: InputError) -> ListError {
    ListError::Refused(e.to_string())
}

fn scratch_err(e: impl std::fmt::Display) -> ListError {
    ListError::Refused(format!("scratch sort file: {e}"))
}

impl From<FetchError> for ListError {
    fn from(e: FetchError) -> ListError {
        match e {
            FetchError::S3(e) => ListError::S3(e),
            FetchError::Local(e) => refused(e),
        }
    }
}

/// `JOB.db.tmp`, removed (with its WAL files) on drop unless kept.
struct TempManifest {
    path: PathBuf,
    kept: bool,
}

impl TempManifest {
    fn files(&self) -> [PathBuf; 3] {
        let with = |suffix: &str| {
            let mut p = self.path.as_os_str().to_owned();
            p.push(suffix);
            PathBuf::from(p)
        };
        [self.path.clone(), with("-wal"), with("-shm")]
    }
}

impl TempManifest {
    fn remove(&self) {
        for f in self.files() {
            let _ = std::fs::remove_file(f);
        }
    }
}

impl Drop for TempManifest {
    fn drop(&mut self) {
        if !self.kept {
            self.remove();
        }
    }
}

/// Plans the job from a supplied manifest (see the module header).
pub async fn plan_supplied<C: S3Client>(
    job: &SuppliedJob<'_, C>,
    input: &Supplied,
) -> Result<Planned, ListError> {
    if let Ok(Location::Postgres(l)) = Location::of(job.manifest) {
        return plan_supplied_pg(job, input, &l).await;
    }
    let mut tmp = job.manifest.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut tmp = TempManifest {
        path: PathBuf::from(tmp),
        kept: false,
    };
    tmp.remove(); // a leftover of a killed plan
    let scratch = Scratch::new(&scratch_near(job.manifest)).map_err(scratch_err)?;
    let mut m = Manifest::open(&tmp.path, true)?;
    m.store_settings(job.settings)?;
    let (rows, _) = emit(job, input, &scratch, Some(&mut m)).await?;
    let counts = m.counts()?;
    drop(m);
    if tmp.files()[1].exists() {
        return Err(ListError::Refused(format!(
            "{}: SQLite left its write-ahead log behind; plan again",
            tmp.path.display()
        )));
    }
    std::fs::rename(&tmp.path, job.manifest).map_err(|e| {
        ListError::Refused(format!(
            "cannot rename {} to {}: {e}",
            tmp.path.display(),
            crate::manifest::shown(job.manifest)
        ))
    })?;
    tmp.kept = true;
    Ok(Planned { counts, rows })
}

/// [`plan_supplied`] into a PostgreSQL job: built as its scratch job, which becomes the job
/// only once complete (dropped otherwise).
async fn plan_supplied_pg<C: S3Client>(
    job: &SuppliedJob<'_, C>,
    input: &Supplied,
    l: &PgLocation,
) -> Result<Planned, ListError> {
    let scratch = Scratch::new(&scratch_near(job.manifest)).map_err(scratch_err)?;
    let staged = Staged::begin(l)?.map_err(ListError::Refused)?;
    let mut m = Manifest::Pg(staged.open()?);
    m.store_settings(job.settings)?;
    let (rows, _) = emit(job, input, &scratch, Some(&mut m)).await?;
    let counts = m.counts()?;
    drop(m);
    staged.publish()?.map_err(ListError::Refused)?;
    Ok(Planned { counts, rows })
}

/// `plan --dry-run` from a supplied manifest: what would be copied (the entries read count as
/// listed); no manifest is written (`job.manifest` only places the scratch directory).
pub async fn dry_run_supplied<C: S3Client>(
    job: &SuppliedJob<'_, C>,
    input: &Supplied,
) -> Result<DryRun, ListError> {
    let scratch = Scratch::new(&scratch_near(job.manifest)).map_err(scratch_err)?;
    Ok(emit(job, input, &scratch, None).await?.1)
}

/// The directory the scratch sort goes in: a file manifest's, or the system's temp directory
/// (`TMPDIR`) for a manifest named by a URL.
fn scratch_near(manifest: &Path) -> PathBuf {
    if !matches!(Location::of(manifest), Ok(Location::File(_))) {
        return std::env::temp_dir();
    }
    let dir = manifest.parent().filter(|d| !d.as_os_str().is_empty());
    dir.unwrap_or(Path::new(".")).to_path_buf()
}

/// Reads the supplied manifest and emits its selected entries into `manifest` (None: a dry
/// run, tallied instead). Returns the rows read and the tally.
async fn emit<C: S3Client>(
    job: &SuppliedJob<'_, C>,
    input: &Supplied,
    scratch: &Scratch,
    manifest: Option<&mut Manifest>,
) -> Result<(u64, DryRun), ListError> {
    let mut em = Emitter::new(manifest, job);
    let rows = match input {
        Supplied::Csv(src) => plan_csv(job, src, scratch, &mut em).await?,
        Supplied::Inventory(src) => plan_inventory(job, src, scratch, &mut em).await?,
    };
    Ok((rows, em.finish()?))
}

/// Writes chosen entries into the manifest, a page at a time, as the lister would: the
/// lister's selector decides each entry's destinations (a task per destination).
struct Emitter<'a, 'j, C: S3Client> {
    /// None: a dry run (tallied in `tally`).
    manifest: Option<&'a mut Manifest>,
    tally: DryRun,
    job: &'a SuppliedJob<'j, C>,
    selector: Selector<'a, C>,
    cp: Listing,
    page: Vec<NewTask>,
}

impl<'a, 'j, C: S3Client> Emitter<'a, 'j, C> {
    fn new(manifest: Option<&'a mut Manifest>, job: &'a SuppliedJob<'j, C>) -> Self {
        Emitter {
            manifest,
            tally: DryRun::default(),
            job,
            selector: Selector {
                settings: job.settings,
                source: job.source,
                dest: job.dest,
            },
            cp: Listing::default(),
            page: Vec::new(),
        }
    }

    /// One key's chosen entries, newest first, each with its place in the key's history.
    async fn add_key(&mut self, chosen: Vec<(VersionEntry, u64)>) -> Result<(), ListError> {
        let mut selected = 0u64;
        for (e, pos) in chosen {
            self.cp.entries += 1;
            let dests = self.selector.destinations(&e).await?;
            if dests.is_empty() {
                continue;
            }
            if self.manifest.is_none() {
                self.tally.add(self.job.settings, &e, &dests);
                continue;
            }
            self.check_key(&e)?;
            selected += 1;
            if !self.job.dest_versioned && selected > 1 {
                return Err(ListError::Refused(format!(
                    "dest: bucket {} does not have versioning enabled, but key {} has {selected} versions to copy; enable versioning on the destination bucket, or plan with --latest-only",
                    self.job.settings.dest.bucket,
                    show_key(&e.key)
                )));
            }
            self.page.extend(dests.into_iter().map(|dest| NewTask {
                entry: e.clone(),
                history_pos: pos,
                dest,
            }));
        }
        if self.page.len() >= PAGE {
            self.flush(false)?;
        }
        Ok(())
    }

    fn check_key(&self, e: &VersionEntry) -> Result<(), ListError> {
        let len = self.job.settings.dest.prefix.len() + e.key.len();
        if len > MAX_KEY_BYTES {
            return Err(ListError::Refused(format!(
                "destination key for {} would be {len} bytes (destination prefix {:?} + key), longer than S3's {MAX_KEY_BYTES}; use a shorter destination prefix",
                show_key(&e.key),
                self.job.settings.dest.prefix
            )));
        }
        Ok(())
    }

    fn flush(&mut self, complete: bool) -> Result<(), ListError> {
        self.cp.pages += 1;
        self.cp.complete = complete;
        if let Some(last) = self.page.last() {
            self.cp.last_key = Some(last.entry.key.clone());
            self.cp.key_marker = Some(last.entry.key.clone());
        }
        if let Some(m) = self.manifest.as_deref_mut() {
            m.insert_page(&self.page, &self.cp)?;
        }
        self.page.clear();
        Ok(())
    }

    /// The last page, with the listing marked complete; the dry run's tally.
    fn finish(mut self) -> Result<DryRun, ListError> {
        self.flush(true)?;
        self.tally.listed = self.cp.entries;
        Ok(self.tally)
    }
}

/// Opens a supplied file: a local path, or an `s3://` object downloaded into `scratch`.
async fn open_input<C: S3Client>(
    job: &SuppliedJob<'_, C>,
    src: &str,
    scratch: &Scratch,
) -> Result<File, ListError> {
    let local = match S3Url::parse(src) {
        Some(url) => {
            let to = scratch.dir().join("input");
            download(job.source, &url, &to).await?;
            to
        }
        None => PathBuf::from(src),
    };
    File::open(&local).map_err(|e| refused(InputError::file(src, e.to_string())))
}

/// `--from-csv`: stages the rows, then reads each key's history and picks the rows' versions.
async fn plan_csv<C: S3Client>(
    job: &SuppliedJob<'_, C>,
    src: &str,
    scratch: &Scratch,
    em: &mut Emitter<'_, '_, C>,
) -> Result<u64, ListError> {
    let file = open_input(job, src, scratch).await?;
    let rows = stage_csv(job, src, file, scratch)?;
    let mut after: Option<String> = None;
    loop {
        let keys = scratch
            .keys_after(after.as_deref(), 4 * CONCURRENCY)
            .map_err(scratch_err)?;
        let Some(last) = keys.last().cloned() else {
            break;
        };
        let histories: Vec<_> = stream::iter(keys.iter())
            .map(|k| history(job, k))
            .buffered(CONCURRENCY)
            .collect()
            .await;
        for (key, h) in keys.iter().zip(histories) {
            let staged = scratch.rows_of(key).map_err(scratch_err)?;
            em.add_key(choose(src, &job.settings.source.bucket, key, &h?, &staged)?)
                .await?;
        }
        after = Some(last);
    }
    Ok(rows)
}

fn stage_csv<C: S3Client>(
    job: &SuppliedJob<'_, C>,
    src: &str,
    file: File,
    scratch: &Scratch,
) -> Result<u64, ListError> {
    let bucket = &job.settings.source.bucket;
    let mut reader = CsvManifest::from_reader(src, file);
    scratch.begin().map_err(scratch_err)?;
    let mut n = 0;
    while let Some(row) = reader.next() {
        let row = row.map_err(refused)?;
        let line = reader.last_line();
        if row.bucket != *bucket {
            let msg = format!(
                "bucket {:?} is not the job's source bucket {bucket:?}",
                row.bucket
            );
            return Err(refused(InputError::line(src, line, msg)));
        }
        scratch
            .add_row(&row.key, row.version_id.as_deref(), line)
            .map_err(scratch_err)?;
        n += 1;
    }
    scratch.commit().map_err(scratch_err)?;
    Ok(n)
}

/// Every entry of exactly `key`, newest first.
async fn history<C: S3Client>(
    job: &SuppliedJob<'_, C>,
    key: &str,
) -> Result<Vec<VersionEntry>, ListError> {
    let from = ListFrom {
        bucket: job.settings.source.bucket.clone(),
        prefix: key.to_string(),
        key_marker: None,
        version_marker: None,
        max_keys: super::PAGE_SIZE,
    };
    let mut h = Versions::new(job.source, from).history_of(key).await?;
    h.reverse();
    Ok(h)
}

/// The entries a key's rows ask for, newest first, with their places in `history`.
fn choose(
    src: &str,
    bucket: &str,
    key: &str,
    history: &[VersionEntry],
    rows: &[StagedRow],
) -> Result<Vec<(VersionEntry, u64)>, ListError> {
    let mut picked = std::collections::BTreeSet::new();
    for row in rows {
        let found = match &row.version_id {
            Some(v) => history.iter().position(|e| e.version_id == *v),
            None => history
                .iter()
                .position(|e| e.is_latest)
                .or((!history.is_empty()).then_some(0)),
        };
        let Some(i) = found else {
            let what = match &row.version_id {
                Some(v) => format!(
                    "bucket {bucket} has no version {v} of key {}",
                    show_key(key)
                ),
                None => format!("bucket {bucket} has no key {}", show_key(key)),
            };
            return Err(refused(InputError::line(src, row.line, what)));
        };
        picked.insert(i);
    }
    Ok(picked
        .into_iter()
        .map(|i| (history[i].clone(), i as u64))
        .collect())
}

/// `--from-inventory`: stages every entry, then reads each key's history back in order.
async fn plan_inventory<C: S3Client>(
    job: &SuppliedJob<'_, C>,
    src: &str,
    scratch: &Scratch,
    em: &mut Emitter<'_, '_, C>,
) -> Result<u64, ListError> {
    match S3Url::parse(src) {
        Some(url) => {
            let inv = download_inventory(job, &url, scratch).await?;
            stage_inventory(job, &inv, scratch)?;
        }
        None => {
            let inv = Inventory::open_local(Path::new(src)).map_err(refused)?;
            stage_inventory(job, &inv, scratch)?;
        }
    }
    let mut after: Option<String> = None;
    loop {
        let batch = scratch
            .histories_after(after.as_deref(), 4 * CONCURRENCY)
            .map_err(scratch_err)?;
        let Some(last) = batch.last().and_then(|h| h.first()).map(|e| e.key.clone()) else {
            break;
        };
        for h in batch {
            em.add_key(h.into_iter().zip(0..).collect()).await?;
        }
        after = Some(last);
    }
    scratch.entries().map_err(scratch_err)
}

/// Reads `manifest.json` (and `manifest.checksum` beside it, when there) and downloads every
/// data file it lists into the scratch directory.
async fn download_inventory<C: S3Client>(
    job: &SuppliedJob<'_, C>,
    url: &S3Url,
    scratch: &Scratch,
) -> Result<Inventory<Downloaded>, ListError> {
    let name = url.to_string();
    let bytes = small_object(job.source, url, false)
        .await?
        .unwrap_or_default();
    let checksum_key = match url.key.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/manifest.checksum"),
        None => "manifest.checksum".into(),
    };
    let checksum = small_object(job.source, &url.sibling(&checksum_key), true).await?;
    let checksum = checksum.map(|c| String::from_utf8_lossy(&c).into_owned());
    let manifest = InventoryManifest::parse(&name, &bytes, checksum.as_deref()).map_err(refused)?;
    let mut fetch = Downloaded {
        manifest: Some(url.clone()),
        ..Default::default()
    };
    for (i, f) in manifest.files.iter().enumerate() {
        let to = scratch.dir().join(format!("data-{i}"));
        download(job.source, &url.sibling(&f.key), &to).await?;
        fetch.files.insert(f.key.clone(), to);
    }
    Ok(Inventory::new(manifest, fetch))
}

fn stage_inventory<C: S3Client, F: Fetch>(
    job: &SuppliedJob<'_, C>,
    inv: &Inventory<F>,
    scratch: &Scratch,
) -> Result<(), ListError> {
    let bucket = &job.settings.source.bucket;
    if inv.manifest.source_bucket != *bucket {
        return Err(ListError::Refused(format!(
            "the inventory is of bucket {:?}, not of the job's source bucket {bucket:?}",
            inv.manifest.source_bucket
        )));
    }
    scratch.begin().map_err(scratch_err)?;
    for e in inv.entries() {
        scratch
            .add_entry(&e.map_err(refused)?)
            .map_err(scratch_err)?;
    }
    scratch.commit().map_err(scratch_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(v: &str, latest: bool, marker: bool) -> VersionEntry {
        VersionEntry {
            key: "k".into(),
            version_id: v.into(),
            is_latest: latest,
            is_delete_marker: marker,
            ..Default::default()
        }
    }

    fn row(v: Option<&str>, line: u64) -> StagedRow {
        StagedRow {
            version_id: v.map(String::from),
            line,
        }
    }

    #[test]
    fn rows_pick_versions_at_their_place_in_the_history() {
        let h = [
            entry("m3", true, true),
            entry("v2", false, false),
            entry("v1", false, false),
        ];
        let rows = [row(Some("v1"), 4), row(Some("m3"), 9), row(Some("v1"), 12)];
        let picked = choose("m.csv", "b", "k", &h, &rows).unwrap();
        let got: Vec<(&str, u64)> = picked
            .iter()
            .map(|(e, p)| (e.version_id.as_str(), *p))
            .collect();
        assert_eq!(got, [("m3", 0), ("v1", 2)], "newest first, each once");
        let current = choose("m.csv", "b", "k", &h, &[row(None, 1)]).unwrap();
        assert_eq!(
            current[0].0.version_id, "m3",
            "no version id: the current entry"
        );
    }

    #[test]
    fn a_version_the_source_lacks_names_the_line() {
        let h = [entry("v1", true, false)];
        let err = choose("m.csv", "b", "k", &h, &[row(Some("v9"), 7)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "m.csv:7: bucket b has no version v9 of key k"
        );
        let err = choose("m.csv", "b", "k", &[], &[row(None, 2)]).unwrap_err();
        assert_eq!(err.to_string(), "m.csv:2: bucket b has no key k");
    }
}
