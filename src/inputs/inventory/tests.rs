//! Inventory tests: a small inventory built by hand (manifest.json, manifest.checksum, CSV.gz
//! and Parquet data files), odd keys, versions and delete markers, rows shuffled.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use flate2::write::GzEncoder;
use flate2::Compression as GzLevel;
use parquet::basic::Compression;
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DataType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::{SerializedColumnWriter, SerializedFileWriter};
use parquet::schema::parser::parse_message_type;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::*;
use crate::s3::types::encode_key;

const BUCKET: &str = "source-bucket";
const PREFIX: &str = "inv/source-bucket/all-versions";
const CSV_SCHEMA: &str = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, \
                          LastModifiedDate, ETag, StorageClass, IsMultipartUploaded, \
                          ReplicationStatus, EncryptionStatus";
const PARQUET_SCHEMA: &str = "message s3.inventory {
    required binary bucket (UTF8);
    required binary key (UTF8);
    optional binary version_id (UTF8);
    optional boolean is_latest;
    optional boolean is_delete_marker;
    optional int64 size;
    optional int64 last_modified_date (TIMESTAMP_MILLIS);
    optional binary e_tag (UTF8);
    optional binary storage_class (UTF8);
}";

fn object(key: &str, vid: &str, latest: bool, ms: i64, size: u64) -> VersionEntry {
    VersionEntry {
        key: key.into(),
        version_id: vid.into(),
        is_delete_marker: false,
        is_latest: latest,
        size,
        etag: Some(format!("\"{:032x}\"", ms)),
        last_modified: Some(iso_millis(i128::from(ms) * 1_000_000).unwrap()),
        storage_class: Some(
            if size > 100 {
                "STANDARD_IA"
            } else {
                "STANDARD"
            }
            .into(),
        ),
        checksum_algorithm: None,
    }
}

fn marker(key: &str, vid: &str, latest: bool, ms: i64) -> VersionEntry {
    VersionEntry {
        is_delete_marker: true,
        size: 0,
        etag: None,
        storage_class: None,
        ..object(key, vid, latest, ms, 0)
    }
}

const T0: i64 = 1_714_564_800_000; // 2024-05-01T12:00:00Z

/// Each key's history, newest first (the order a listing gives).
fn histories() -> Vec<VersionEntry> {
    vec![
        object("plain.txt", "p1", true, T0, 10),
        marker("with space/file name.txt", "s3", true, T0 + 3_000),
        object("with space/file name.txt", "s2", false, T0 + 2_000, 200),
        object("with space/file name.txt", "s1", false, T0 + 1_000, 50),
        object("a+b=c.txt", "pl2", true, T0 + 5_000, 7),
        object("a+b=c.txt", "pl1", false, T0 + 4_000, 7),
        object("100% done,\"quoted\".txt", "pc1", true, T0 + 6_000, 1),
        marker("ünïcødé/日本語 キー", "u2", true, T0 + 8_000),
        marker("ünïcødé/日本語 キー", "u1b", false, T0 + 7_500),
        object("ünïcødé/日本語 キー", "u1", false, T0 + 7_000, 3),
        object("pre-versioning", "null", true, T0 - 1_000, 4),
    ]
}

fn shuffled() -> Vec<VersionEntry> {
    let mut rows = histories();
    rows.shuffle(&mut rand::rngs::StdRng::seed_from_u64(12));
    rows
}

/// S3's CSV inventory encoding: URL-encoded, `+` for a space.
fn inventory_key(key: &str) -> String {
    encode_key(key).replace("%20", "+")
}

fn csv_gz(rows: &[VersionEntry]) -> Vec<u8> {
    let mut w = csv::WriterBuilder::new()
        .quote_style(csv::QuoteStyle::Always)
        .from_writer(GzEncoder::new(Vec::new(), GzLevel::default()));
    for e in rows {
        let etag = e.etag.as_deref().unwrap_or("").trim_matches('"');
        let vid = if e.version_id == "null" {
            ""
        } else {
            &e.version_id
        };
        let size = if e.is_delete_marker {
            String::new()
        } else {
            e.size.to_string()
        };
        let (latest, dm) = (e.is_latest.to_string(), e.is_delete_marker.to_string());
        let class = e.storage_class.as_deref().unwrap_or("");
        let modified = e.last_modified.as_deref().unwrap_or("");
        let key = inventory_key(&e.key);
        w.write_record([
            BUCKET, &key, vid, &latest, &dm, &size, modified, etag, class, "false", "", "SSE-S3",
        ])
        .unwrap();
    }
    w.into_inner().unwrap().finish().unwrap()
}

fn write_optional<T: DataType>(col: &mut SerializedColumnWriter<'_>, values: Vec<Option<T::T>>) {
    let defs: Vec<i16> = values.iter().map(|v| i16::from(v.is_some())).collect();
    let present: Vec<T::T> = values.into_iter().flatten().collect();
    col.typed::<T>()
        .write_batch(&present, Some(&defs), None)
        .unwrap();
}

fn write_column(col: &mut SerializedColumnWriter<'_>, index: usize, rows: &[VersionEntry]) {
    let text = |f: &dyn Fn(&VersionEntry) -> Option<String>| -> Vec<Option<ByteArray>> {
        rows.iter()
            .map(|e| f(e).map(|s| ByteArray::from(s.as_str())))
            .collect()
    };
    match index {
        0 | 1 => {
            let values: Vec<ByteArray> = rows
                .iter()
                .map(|e| ByteArray::from(if index == 0 { BUCKET } else { e.key.as_str() }))
                .collect();
            col.typed::<ByteArrayType>()
                .write_batch(&values, None, None)
                .unwrap();
        }
        2 => write_optional::<ByteArrayType>(
            col,
            text(&|e| (e.version_id != "null").then(|| e.version_id.clone())),
        ),
        3 => write_optional::<BoolType>(col, rows.iter().map(|e| Some(e.is_latest)).collect()),
        4 => {
            write_optional::<BoolType>(col, rows.iter().map(|e| Some(e.is_delete_marker)).collect())
        }
        5 => write_optional::<Int64Type>(
            col,
            rows.iter()
                .map(|e| (!e.is_delete_marker).then_some(e.size as i64))
                .collect(),
        ),
        6 => write_optional::<Int64Type>(col, rows.iter().map(last_modified_millis).collect()),
        7 => write_optional::<ByteArrayType>(
            col,
            text(&|e| e.etag.as_ref().map(|t| t.trim_matches('"').to_string())),
        ),
        _ => write_optional::<ByteArrayType>(col, text(&|e| e.storage_class.clone())),
    }
}

/// A Parquet data file, Snappy-compressed, one row group per chunk of rows.
fn parquet_file(rows: &[VersionEntry], path: &Path) {
    let schema = Arc::new(parse_message_type(PARQUET_SCHEMA).unwrap());
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let mut writer = SerializedFileWriter::new(File::create(path).unwrap(), schema, props).unwrap();
    for chunk in rows.chunks(4) {
        let mut group = writer.next_row_group().unwrap();
        let mut index = 0;
        while let Some(mut col) = group.next_column().unwrap() {
            write_column(&mut col, index, chunk);
            col.close().unwrap();
            index += 1;
        }
        group.close().unwrap();
    }
    writer.close().unwrap();
}

/// Writes data files under `root/PREFIX/data/` and the manifest (with its checksum) under
/// `root/PREFIX/2024-05-02T00-00Z/`; returns the manifest's path.
fn build(root: &Path, format: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
    let data = root.join(PREFIX).join("data");
    let dated = root.join(PREFIX).join("2024-05-02T00-00Z");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&dated).unwrap();
    let mut listed = Vec::new();
    for (name, bytes) in files {
        std::fs::write(data.join(name), bytes).unwrap();
        listed.push(serde_json::json!({
            "key": format!("{PREFIX}/data/{name}"),
            "size": bytes.len(),
            "MD5checksum": hex::encode(Md5::digest(bytes)),
        }));
    }
    let schema = if format == "CSV" {
        CSV_SCHEMA
    } else {
        PARQUET_SCHEMA
    };
    let manifest = serde_json::json!({
        "sourceBucket": BUCKET,
        "destinationBucket": "arn:aws:s3:::inventory-bucket",
        "version": "2016-11-30",
        "creationTimestamp": "1714608000000",
        "fileFormat": format,
        "fileSchema": schema,
        "files": listed,
    });
    let text = serde_json::to_vec_pretty(&manifest).unwrap();
    let path = dated.join("manifest.json");
    std::fs::write(&path, &text).unwrap();
    std::fs::write(
        dated.join("manifest.checksum"),
        hex::encode(Md5::digest(&text)),
    )
    .unwrap();
    path
}

fn read_all(manifest: &Path) -> Result<Vec<VersionEntry>, InputError> {
    Inventory::open_local(manifest)?.entries().collect()
}

/// Groups by key and sorts each key's rows with `history_cmp`: what the caller's database does.
fn in_history_order(rows: Vec<VersionEntry>) -> Vec<VersionEntry> {
    let mut by_key: BTreeMap<String, Vec<VersionEntry>> = BTreeMap::new();
    for r in rows {
        by_key.entry(r.key.clone()).or_default().push(r);
    }
    let mut out = Vec::new();
    for (_, mut rows) in by_key {
        rows.sort_by(history_cmp);
        out.extend(rows);
    }
    out
}

fn expected() -> Vec<VersionEntry> {
    in_history_order(histories())
}

fn pretty(rows: &[VersionEntry]) -> Vec<(String, String, bool, bool)> {
    rows.iter()
        .map(|e| {
            (
                e.key.clone(),
                e.version_id.clone(),
                e.is_latest,
                e.is_delete_marker,
            )
        })
        .collect()
}

#[test]
fn csv_inventory_with_shuffled_rows_gives_every_entry_back() {
    let dir = tempfile::tempdir().unwrap();
    let rows = shuffled();
    let manifest = build(
        dir.path(),
        "CSV",
        &[
            ("part-0.csv.gz", csv_gz(&rows[..5])),
            ("part-1.csv.gz", csv_gz(&rows[5..])),
        ],
    );
    let read = read_all(&manifest).unwrap();
    assert_eq!(read.len(), histories().len());
    assert_eq!(read, rows, "rows are streamed in file order, unchanged");
    let ordered = in_history_order(read);
    assert_eq!(pretty(&ordered), pretty(&expected()));
    assert_eq!(ordered, expected());
}

#[test]
fn parquet_inventory_gives_the_same_entries_as_csv() {
    let dir = tempfile::tempdir().unwrap();
    let rows = shuffled();
    let data = dir.path().join("tmp.parquet");
    parquet_file(&rows, &data);
    let bytes = std::fs::read(&data).unwrap();
    let manifest = build(dir.path(), "Parquet", &[("part-0.parquet", bytes)]);
    let read = read_all(&manifest).unwrap();
    assert_eq!(read, rows);
    assert_eq!(in_history_order(read), expected());
}

#[test]
fn history_order_is_latest_first_then_newest_first() {
    let mut rows = [
        object("k", "old", false, T0, 1),
        object("k", "new", false, T0 + 2, 1),
        marker("k", "dm", true, T0 + 1),
        object("k", "mid", false, T0 + 1, 1),
    ];
    rows.sort_by(history_cmp);
    let ids: Vec<&str> = rows.iter().map(|e| e.version_id.as_str()).collect();
    assert_eq!(ids, vec!["dm", "new", "mid", "old"]);
}

#[test]
fn a_data_file_whose_md5_differs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = build(
        dir.path(),
        "CSV",
        &[("part-0.csv.gz", csv_gz(&histories()))],
    );
    let data = dir.path().join(PREFIX).join("data/part-0.csv.gz");
    let mut bytes = std::fs::read(&data).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&data, &bytes).unwrap();
    let err = read_all(&manifest).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}: MD5 ", data.display())) && err.contains("does not match"),
        "{err}"
    );
}

#[test]
fn a_manifest_whose_checksum_differs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = build(
        dir.path(),
        "CSV",
        &[("part-0.csv.gz", csv_gz(&histories()))],
    );
    std::fs::write(manifest.with_file_name("manifest.checksum"), "0".repeat(32)).unwrap();
    let err = read_all(&manifest).unwrap_err().to_string();
    assert!(err.contains("does not match manifest.checksum"), "{err}");
}

/// A CSV inventory whose second row is `bad` (columns as CSV_SCHEMA).
fn with_bad_row(bad: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let good = csv_gz(&histories()[..1]);
    let mut text = Vec::new();
    std::io::Read::read_to_end(&mut MultiGzDecoder::new(&good[..]), &mut text).unwrap();
    text.extend_from_slice(bad.as_bytes());
    let mut gz = GzEncoder::new(Vec::new(), GzLevel::default());
    gz.write_all(&text).unwrap();
    let manifest = build(dir.path(), "CSV", &[("bad.csv.gz", gz.finish().unwrap())]);
    let err = read_all(&manifest).unwrap_err();
    let file = dir.path().join(PREFIX).join("data/bad.csv.gz");
    err.to_string()
        .replace(&file.display().to_string(), "bad.csv.gz")
}

#[test]
fn bad_rows_are_reported_with_file_and_line() {
    let row = |latest: &str, key: &str, size: &str, bucket: &str| {
        format!(
            "\"{bucket}\",\"{key}\",\"v\",\"{latest}\",\"false\",\"{size}\",\
             \"2024-05-01T12:00:00.000Z\",\"e\",\"STANDARD\",\"false\",\"\",\"SSE-S3\"\n"
        )
    };
    assert_eq!(
        with_bad_row(&row("maybe", "k", "1", BUCKET)),
        "bad.csv.gz:2: IsLatest is \"maybe\", expected true or false"
    );
    assert_eq!(
        with_bad_row(&row("true", "k%zz", "1", BUCKET)),
        "bad.csv.gz:2: bad URL encoding at byte 2 of \"k%zz\""
    );
    assert_eq!(
        with_bad_row(&row("true", "k", "-3", BUCKET)),
        "bad.csv.gz:2: Size is \"-3\", not a number"
    );
    assert_eq!(
        with_bad_row(&row("true", "k", "1", "other")),
        "bad.csv.gz:2: bucket \"other\" is not the inventory's source bucket \"source-bucket\""
    );
    assert_eq!(
        with_bad_row("\"source-bucket\",\"k\"\n"),
        "bad.csv.gz:2: 2 fields, the fileSchema has 12"
    );
}

#[test]
fn unsupported_inventories_are_refused_with_the_reason() {
    let current_only = serde_json::json!({
        "sourceBucket": BUCKET, "fileFormat": "CSV",
        "fileSchema": "Bucket, Key, Size, LastModifiedDate", "files": []
    });
    let err =
        InventoryManifest::parse("m.json", current_only.to_string().as_bytes(), None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "m.json: the inventory has no versionid, islatest, isdeletemarker column: an inventory \
         of all versions is needed (VersionId, IsLatest, IsDeleteMarker)"
    );
    let orc = serde_json::json!({
        "sourceBucket": BUCKET, "fileFormat": "ORC", "fileSchema": "struct<>", "files": []
    });
    let err = InventoryManifest::parse("m.json", orc.to_string().as_bytes(), None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "m.json: fileFormat \"orc\" is not supported (use CSV or Parquet)"
    );
    let err = InventoryManifest::parse("m.json", b"{}", None).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("m.json: not an inventory manifest: "),
        "{err}"
    );
}

#[test]
fn a_file_that_is_not_parquet_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = build(
        dir.path(),
        "Parquet",
        &[("x.parquet", b"PAR1 not really".to_vec())],
    );
    let err = read_all(&manifest).unwrap_err().to_string();
    assert!(err.contains("x.parquet: not a Parquet file: "), "{err}");
}

#[test]
fn a_missing_data_file_names_where_it_was_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = build(dir.path(), "CSV", &[("gone.csv.gz", csv_gz(&histories()))]);
    std::fs::remove_file(dir.path().join(PREFIX).join("data/gone.csv.gz")).unwrap();
    let err = read_all(&manifest).unwrap_err().to_string();
    assert!(err.contains("gone.csv.gz: "), "{err}");
}

#[test]
fn data_files_are_found_beside_a_manifest_copied_alone() {
    // A flat download: manifest.json and data/<file> in one directory.
    let dir = tempfile::tempdir().unwrap();
    let built = build(
        dir.path(),
        "CSV",
        &[("part-0.csv.gz", csv_gz(&histories()))],
    );
    let flat = dir.path().join("flat");
    std::fs::create_dir_all(flat.join("data")).unwrap();
    std::fs::copy(&built, flat.join("manifest.json")).unwrap();
    std::fs::copy(
        dir.path().join(PREFIX).join("data/part-0.csv.gz"),
        flat.join("data/part-0.csv.gz"),
    )
    .unwrap();
    assert_eq!(read_all(&flat.join("manifest.json")).unwrap(), histories());
}

#[test]
fn local_fetch_refuses_keys_that_leave_the_inventory() {
    let dir = tempfile::tempdir().unwrap();
    let fetch = LocalFetch::near(&dir.path().join("manifest.json"));
    for key in ["../outside.csv.gz", "/etc/hostname", "a/../../b"] {
        let err = fetch.open(key).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{key}");
    }
}
