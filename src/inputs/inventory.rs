//! inputs::inventory: S3 Inventory reports as a source of versions. Reads `manifest.json`
//! (`sourceBucket`, `fileFormat` CSV or Parquet, `fileSchema`, `files[]` with their MD5s),
//! fetches each data file through [`Fetch`] (a local directory here; an `s3://` fetcher can be
//! added behind the same trait), checks its MD5, and streams its rows as [`VersionEntry`]s:
//! gzipped CSV with the columns `fileSchema` names (keys URL-encoded, `+` for a space) or
//! Parquet (the columns its own schema names, keys as they are), read with the parquet crate's
//! row API. Memory stays bounded: one data file is open at a time and rows are not collected.
//!
//! Inventory rows come in any order. Putting each key's rows back in history order is the
//! caller's job (through its database); [`history_cmp`] is the order within one key.
//!
//! Only inventories of all versions are accepted (they have `VersionId`, `IsLatest` and
//! `IsDeleteMarker`): a current-versions-only inventory cannot say which version to copy.
//!
//! May call: `inputs` (errors), `s3::types` (key decoding, the listing record).

use std::cmp::Ordering;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use md5::{Digest, Md5};
use parquet::file::reader::FileReader;
use parquet::file::serialized_reader::SerializedFileReader;
use parquet::record::reader::RowIter;
use parquet::record::{Field, Row};
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::InputError;
use crate::s3::types::{decode_key, VersionEntry};

/// Where data files come from: a key of the inventory's destination bucket → a readable file.
pub trait Fetch {
    /// How `key` is named in messages (a path, or an `s3://` URL).
    fn describe(&self, key: &str) -> String;
    /// Opens (or downloads to a temporary file and opens) the data file at `key`.
    fn open(&self, key: &str) -> io::Result<File>;
}

/// Data files on the local disk, found next to a downloaded `manifest.json`: `key` under the
/// manifest's directory or any directory above it (a copy of the inventory bucket), else the
/// file's name in the manifest's `data/` directory or in the manifest's directory itself.
#[derive(Clone, Debug)]
pub struct LocalFetch {
    dir: PathBuf,
}

impl LocalFetch {
    /// Data files around the directory holding `manifest.json`.
    pub fn near(manifest: &Path) -> LocalFetch {
        let dir = manifest.parent().unwrap_or(Path::new(".")).to_path_buf();
        LocalFetch { dir }
    }

    fn resolve(&self, key: &str) -> PathBuf {
        let name = Path::new(key)
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_default();
        let mut candidates: Vec<PathBuf> = self.dir.ancestors().map(|d| d.join(key)).collect();
        candidates.push(self.dir.join("data").join(&name));
        candidates.push(self.dir.join(&name));
        candidates
            .iter()
            .find(|p| p.is_file())
            .cloned()
            .unwrap_or_else(|| self.dir.join(key))
    }
}

impl Fetch for LocalFetch {
    fn describe(&self, key: &str) -> String {
        self.resolve(key).display().to_string()
    }

    fn open(&self, key: &str) -> io::Result<File> {
        let escapes = Path::new(key)
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)));
        if escapes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the key leaves the inventory's directory",
            ));
        }
        File::open(self.resolve(key))
    }
}

/// The data file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    /// Gzipped CSV.
    Csv,
    /// Apache Parquet.
    Parquet,
}

/// One data file listed in `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct DataFile {
    /// Key in the inventory's destination bucket.
    pub key: String,
    /// Size in bytes.
    #[serde(default)]
    pub size: Option<u64>,
    /// MD5 of the file, hex.
    #[serde(rename = "MD5checksum")]
    pub md5: String,
}

/// An inventory's `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InventoryManifest {
    /// The inventoried bucket.
    pub source_bucket: String,
    /// The data file format.
    pub format: FileFormat,
    /// CSV column names (from `fileSchema`); empty for Parquet (each file names its columns).
    pub columns: Vec<String>,
    /// The data files.
    pub files: Vec<DataFile>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    source_bucket: String,
    file_format: String,
    #[serde(default)]
    file_schema: String,
    files: Vec<DataFile>,
}

/// Columns an inventory of all versions has (names compared without case and `_`).
const REQUIRED: [&str; 5] = ["bucket", "key", "versionid", "islatest", "isdeletemarker"];

fn normalize(column: &str) -> String {
    column
        .trim()
        .chars()
        .filter(|c| *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

fn missing_columns<'a>(have: impl Iterator<Item = &'a str>) -> Vec<&'static str> {
    let have: Vec<String> = have.map(normalize).collect();
    REQUIRED
        .iter()
        .filter(|r| !have.iter().any(|h| h == *r))
        .copied()
        .collect()
}

impl InventoryManifest {
    /// Parses `manifest.json`; `checksum` is the content of `manifest.checksum` (the MD5 of
    /// the manifest, hex), checked when given.
    pub fn parse(
        name: &str,
        bytes: &[u8],
        checksum: Option<&str>,
    ) -> Result<InventoryManifest, InputError> {
        if let Some(expected) = checksum.map(str::trim).filter(|c| !c.is_empty()) {
            let actual = hex::encode(Md5::digest(bytes));
            if !actual.eq_ignore_ascii_case(expected) {
                return Err(InputError::file(
                    name,
                    format!("MD5 {actual} does not match manifest.checksum {expected}"),
                ));
            }
        }
        let raw: RawManifest = serde_json::from_slice(bytes)
            .map_err(|e| InputError::file(name, format!("not an inventory manifest: {e}")))?;
        let format = match raw.file_format.to_ascii_lowercase().as_str() {
            "csv" => FileFormat::Csv,
            "parquet" => FileFormat::Parquet,
            other => {
                return Err(InputError::file(
                    name,
                    format!("fileFormat {other:?} is not supported (use CSV or Parquet)"),
                ))
            }
        };
        let columns: Vec<String> = match format {
            FileFormat::Csv => raw
                .file_schema
                .split(',')
                .map(|c| c.trim().to_string())
                .collect(),
            FileFormat::Parquet => Vec::new(),
        };
        let missing = missing_columns(columns.iter().map(String::as_str));
        if format == FileFormat::Csv && !missing.is_empty() {
            return Err(InputError::file(name, missing_message(&missing)));
        }
        Ok(InventoryManifest {
            source_bucket: raw.source_bucket,
            format,
            columns,
            files: raw.files,
        })
    }
}

fn missing_message(missing: &[&str]) -> String {
    format!(
        "the inventory has no {} column: an inventory of all versions is needed \
         (VersionId, IsLatest, IsDeleteMarker)",
        missing.join(", ")
    )
}

/// An inventory ready to be read: its manifest and where its data files come from.
pub struct Inventory<F: Fetch> {
    /// The manifest.
    pub manifest: InventoryManifest,
    fetch: F,
}

impl Inventory<LocalFetch> {
    /// Opens a downloaded inventory: `manifest.json` (and `manifest.checksum` beside it, when
    /// present), data files found by [`LocalFetch`].
    pub fn open_local(manifest_path: &Path) -> Result<Inventory<LocalFetch>, InputError> {
        let name = manifest_path.display().to_string();
        let bytes =
            std::fs::read(manifest_path).map_err(|e| InputError::file(&name, e.to_string()))?;
        let checksum =
            std::fs::read_to_string(manifest_path.with_file_name("manifest.checksum")).ok();
        let manifest = InventoryManifest::parse(&name, &bytes, checksum.as_deref())?;
        Ok(Inventory::new(manifest, LocalFetch::near(manifest_path)))
    }
}

impl<F: Fetch> Inventory<F> {
    /// An inventory whose data files come from `fetch`.
    pub fn new(manifest: InventoryManifest, fetch: F) -> Inventory<F> {
        Inventory { manifest, fetch }
    }

    /// Every row of every data file, in file order; the stream ends at the first error.
    pub fn entries(&self) -> Entries<'_, F> {
        Entries {
            inv: self,
            next_file: 0,
            current: None,
            done: false,
        }
    }

    /// Opens one data file after checking its size and MD5.
    fn open_file(&self, file: &DataFile) -> Result<Source, InputError> {
        let name = self.fetch.describe(&file.key);
        let mut f = self
            .fetch
            .open(&file.key)
            .map_err(|e| InputError::file(&name, e.to_string()))?;
        let (md5, size) = digest(&mut f).map_err(|e| InputError::file(&name, e.to_string()))?;
        if !md5.eq_ignore_ascii_case(file.md5.trim()) {
            let msg = format!("MD5 {md5} does not match the manifest's {}", file.md5);
            return Err(InputError::file(&name, msg));
        }
        if file.size.is_some_and(|s| s != size) {
            let msg = format!("{size} bytes, the manifest says {}", file.size.unwrap_or(0));
            return Err(InputError::file(&name, msg));
        }
        f.rewind()
            .map_err(|e| InputError::file(&name, e.to_string()))?;
        match self.manifest.format {
            FileFormat::Csv => Ok(Source::Csv(Box::new(CsvRows::new(
                name,
                f,
                &self.manifest.columns,
            )))),
            FileFormat::Parquet => Ok(Source::Parquet(ParquetRows::open(name, f)?)),
        }
    }

    fn check_bucket(&self, name: &str, at: Place, bucket: &str) -> Result<(), InputError> {
        if bucket == self.manifest.source_bucket {
            return Ok(());
        }
        Err(at.error(
            name,
            format!(
                "bucket {bucket:?} is not the inventory's source bucket {:?}",
                self.manifest.source_bucket
            ),
        ))
    }
}

fn digest(f: &mut File) -> io::Result<(String, u64)> {
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), total))
}

/// The stream of an inventory's entries (see [`Inventory::entries`]).
pub struct Entries<'a, F: Fetch> {
    inv: &'a Inventory<F>,
    next_file: usize,
    current: Option<Source>,
    done: bool,
}

impl<F: Fetch> Iterator for Entries<'_, F> {
    type Item = Result<VersionEntry, InputError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let Some(source) = self.current.as_mut() else {
                let file = self.inv.manifest.files.get(self.next_file)?;
                self.next_file += 1;
                match self.inv.open_file(file) {
                    Ok(s) => self.current = Some(s),
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
                continue;
            };
            match source.next_row() {
                None => self.current = None,
                Some(Ok((bucket, at, entry))) => {
                    let checked = self.inv.check_bucket(source.name(), at, &bucket);
                    self.done = checked.is_err();
                    return Some(checked.map(|()| entry));
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        None
    }
}

/// Where a row is: a CSV line or a Parquet row.
#[derive(Clone, Copy, Debug)]
enum Place {
    Line(u64),
    Row(u64),
}

impl Place {
    fn error(self, file: &str, message: impl Into<String>) -> InputError {
        match self {
            Place::Line(n) => InputError::line(file, n, message),
            Place::Row(n) => InputError::row(file, n, message),
        }
    }
}

/// A row read: the bucket column, where it was, the entry.
type RowRead = Result<(String, Place, VersionEntry), InputError>;

enum Source {
    Csv(Box<CsvRows>),
    Parquet(ParquetRows),
}

impl Source {
    fn name(&self) -> &str {
        match self {
            Source::Csv(c) => &c.name,
            Source::Parquet(p) => &p.name,
        }
    }

    fn next_row(&mut self) -> Option<RowRead> {
        match self {
            Source::Csv(c) => c.next_row(),
            Source::Parquet(p) => p.next_row(),
        }
    }
}

/// The fields of one row, by column, before conversion.
#[derive(Default)]
struct RawRow {
    bucket: String,
    key: String,
    version_id: String,
    is_latest: String,
    is_delete_marker: String,
    size: String,
    last_modified: String,
    etag: String,
    storage_class: String,
    checksum_algorithm: String,
}

impl RawRow {
    fn slot(&mut self, normalized_column: &str) -> Option<&mut String> {
        Some(match normalized_column {
            "bucket" => &mut self.bucket,
            "key" => &mut self.key,
            "versionid" => &mut self.version_id,
            "islatest" => &mut self.is_latest,
            "isdeletemarker" => &mut self.is_delete_marker,
            "size" => &mut self.size,
            "lastmodifieddate" => &mut self.last_modified,
            "etag" => &mut self.etag,
            "storageclass" => &mut self.storage_class,
            "checksumalgorithm" => &mut self.checksum_algorithm,
            _ => return None,
        })
    }

    /// The entry; `key` is already decoded.
    fn into_entry(self, key: String) -> Result<(String, VersionEntry), String> {
        let flag = |what: &str, v: &str| match v.to_ascii_lowercase().as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(format!("{what} is {v:?}, expected true or false")),
        };
        let is_delete_marker = flag("IsDeleteMarker", &self.is_delete_marker)?;
        let size = match self.size.as_str() {
            "" => 0,
            s => s
                .parse()
                .map_err(|_| format!("Size is {s:?}, not a number"))?,
        };
        let some = |s: String| Some(s).filter(|s| !s.is_empty());
        let entry = VersionEntry {
            key,
            version_id: some(self.version_id).unwrap_or_else(|| "null".into()),
            is_delete_marker,
            is_latest: flag("IsLatest", &self.is_latest)?,
            size: if is_delete_marker { 0 } else { size },
            etag: some(self.etag).map(|e| quoted(&e)),
            last_modified: some(self.last_modified),
            storage_class: some(self.storage_class),
            checksum_algorithm: some(self.checksum_algorithm),
        };
        Ok((self.bucket, entry))
    }
}

fn quoted(etag: &str) -> String {
    if etag.starts_with('"') {
        etag.to_string()
    } else {
        format!("\"{etag}\"")
    }
}

struct CsvRows {
    name: String,
    columns: Vec<String>,
    records: csv::StringRecordsIntoIter<MultiGzDecoder<File>>,
}

impl CsvRows {
    fn new(name: String, file: File, columns: &[String]) -> CsvRows {
        let records = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(MultiGzDecoder::new(file))
            .into_records();
        CsvRows {
            name,
            columns: columns.iter().map(|c| normalize(c)).collect(),
            records,
        }
    }

    fn next_row(&mut self) -> Option<RowRead> {
        let record = match self.records.next()? {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                let msg = match e.kind() {
                    csv::ErrorKind::Utf8 { .. } => "not UTF-8".to_string(),
                    csv::ErrorKind::Io(io) => format!("cannot read (gzip?): {io}"),
                    _ => e.to_string(),
                };
                return Some(Err(InputError::line(&self.name, line, msg)));
            }
        };
        let at = Place::Line(record.position().map_or(0, |p| p.line()));
        Some(self.convert(&record, at))
    }

    fn convert(&self, record: &csv::StringRecord, at: Place) -> RowRead {
        if record.len() != self.columns.len() {
            let msg = format!(
                "{} fields, the fileSchema has {}",
                record.len(),
                self.columns.len()
            );
            return Err(at.error(&self.name, msg));
        }
        let mut raw = RawRow::default();
        for (column, value) in self.columns.iter().zip(record.iter()) {
            if let Some(slot) = raw.slot(column) {
                *slot = value.to_string();
            }
        }
        let key = decode_key(&raw.key).map_err(|e| at.error(&self.name, e))?;
        let (bucket, entry) = raw.into_entry(key).map_err(|e| at.error(&self.name, e))?;
        Ok((bucket, at, entry))
    }
}

struct ParquetRows {
    name: String,
    rows: RowIter<'static>,
    count: u64,
}

impl ParquetRows {
    fn open(name: String, file: File) -> Result<ParquetRows, InputError> {
        let reader = SerializedFileReader::new(file)
            .map_err(|e| InputError::file(&name, format!("not a Parquet file: {e}")))?;
        let schema = reader.metadata().file_metadata().schema_descr_ptr();
        let names: Vec<String> = schema
            .root_schema()
            .get_fields()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        let missing = missing_columns(names.iter().map(String::as_str));
        if !missing.is_empty() {
            return Err(InputError::file(&name, missing_message(&missing)));
        }
        Ok(ParquetRows {
            name,
            rows: reader.into_iter(),
            count: 0,
        })
    }

    fn next_row(&mut self) -> Option<RowRead> {
        let row = self.rows.next()?;
        self.count += 1;
        let at = Place::Row(self.count);
        Some(
            row.map_err(|e| at.error(&self.name, e.to_string()))
                .and_then(|row| self.convert(&row, at)),
        )
    }

    fn convert(&self, row: &Row, at: Place) -> RowRead {
        let mut raw = RawRow::default();
        for (column, field) in row.get_column_iter() {
            let normalized = normalize(column);
            if let Some(slot) = raw.slot(&normalized) {
                *slot = field_text(column, field).map_err(|e| at.error(&self.name, e))?;
            }
        }
        let key = std::mem::take(&mut raw.key);
        let (bucket, entry) = raw.into_entry(key).map_err(|e| at.error(&self.name, e))?;
        if entry.key.is_empty() {
            return Err(at.error(&self.name, "empty key"));
        }
        Ok((bucket, at, entry))
    }
}

/// A Parquet value as the CSV text of the same column.
fn field_text(column: &str, field: &Field) -> Result<String, String> {
    Ok(match field {
        Field::Null => String::new(),
        Field::Str(s) => s.clone(),
        Field::Bytes(b) => std::str::from_utf8(b.data())
            .map_err(|_| format!("column {column} is not UTF-8"))?
            .to_string(),
        Field::Bool(b) => b.to_string(),
        Field::Int(n) => n.to_string(),
        Field::Long(n) => n.to_string(),
        Field::UInt(n) => n.to_string(),
        Field::ULong(n) => n.to_string(),
        Field::TimestampMillis(ms) => iso_millis(i128::from(*ms) * 1_000_000)?,
        Field::TimestampMicros(us) => iso_millis(i128::from(*us) * 1_000)?,
        other => return Err(format!("column {column} has an unexpected value {other}")),
    })
}

/// An instant as S3 lists it: `2024-05-01T12:00:00.000Z`.
fn iso_millis(nanos: i128) -> Result<String, String> {
    let dt = OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .map_err(|_| format!("timestamp {nanos}ns is out of range"))?;
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    dt.format(&fmt).map_err(|e| e.to_string())
}

/// Milliseconds since the epoch of an entry's `last_modified`, when it reads as RFC 3339.
pub fn last_modified_millis(entry: &VersionEntry) -> Option<i64> {
    let dt = OffsetDateTime::parse(entry.last_modified.as_deref()?, &Rfc3339).ok()?;
    Some((dt.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// History order of ONE key's entries, as a listing gives them: the latest first, then by
/// last-modified, newest first. Ties are left equal: a stable sort keeps them in the order
/// the inventory gave them (newest first, as a listing), which a version id cannot tell.
pub fn history_cmp(a: &VersionEntry, b: &VersionEntry) -> Ordering {
    b.is_latest.cmp(&a.is_latest).then_with(|| {
        match (last_modified_millis(a), last_modified_millis(b)) {
            (Some(x), Some(y)) => y.cmp(&x),
            _ => b.last_modified.cmp(&a.last_modified),
        }
    })
}

#[cfg(test)]
mod tests;
