//! Supplied manifests and the AWS-shaped report, end to end on the server under test: an S3
//! Inventory built by hand from the source's histories (manifest.json + manifest.checksum,
//! CSV.gz and Parquet data files, odd keys, versions and delete markers, rows shuffled) and a
//! Batch Operations CSV manifest each plan exactly the tasks a listing plans; a bad row leaves
//! no manifest; a failed-tasks report fed back with `--from-csv` plans the same tasks; a CSV
//! manifest takes the job's filters (`--min-size`, dry run too) and replication rules (a task
//! per destination), and `verify` compares what it selected.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use flate2::write::GzEncoder;
use md5::{Digest, Md5};
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DataType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::{SerializedColumnWriter, SerializedFileWriter};
use parquet::schema::parser::parse_message_type;
use s3_backfill::s3::types::encode_key;
use support::*;

/// The planned tasks a user compares: key, version id, place in the key's history, delete
/// marker, latest, size, ETag; by key, each newest first (a listing in parts stores keys in the
/// order its parts' pages were committed, so task ids are not compared).
type Planned = Vec<(String, String, i64, i64, i64, i64, Option<String>)>;

/// The `tasks` view of a manifest, read-only.
fn planned(m: &Path) -> Planned {
    let conn = rusqlite::Connection::open_with_flags(m, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the manifest");
    let mut stmt = conn
        .prepare(
            "SELECT key, version_id, history_pos, is_delete_marker, is_latest, size, etag
             FROM tasks ORDER BY key, history_pos",
        )
        .unwrap();
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })
        .unwrap();
    rows.map(Result::unwrap).collect()
}

const KEYS: [&str; 4] = [
    "in/plain.txt",
    "in/space key.txt",
    "in/plus+sign=a",
    "in/ünïcødé/日本 語",
];

/// Three rounds: every key written; then a second version or a delete marker; then a
/// version after the marker, and a marker on top.
async fn seed_source(c: &Client, src: &str) {
    let del = |k: &str| Op::Delete { key: k.into() };
    let rounds = vec![
        KEYS.iter()
            .map(|k| Op::put(k, format!("one {k}")))
            .collect(),
        vec![
            Op::put(KEYS[1], "two"),
            del(KEYS[2]),
            Op::put(KEYS[3], "two, longer"),
        ],
        vec![Op::put(KEYS[2], "three"), del(KEYS[1]), del(KEYS[3])],
    ];
    seed(c, src, rounds).await;
}

/// One inventory row.
#[derive(Clone, Debug)]
struct Row {
    key: String,
    version_id: String,
    latest: bool,
    marker: bool,
    size: i64,
    millis: i64,
    etag: Option<String>,
}

/// Inventory rows of the source, from its histories read with the SDK. Times keep each
/// key's order to the millisecond (listings give seconds; inventories give milliseconds).
async fn inventory_rows(c: &Client, src: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    for (key, history) in histories(c, src, "").await {
        let mut last = 0i64;
        for v in history {
            last = (v.secs * 1000).max(last + 1);
            rows.push(Row {
                key: key.clone(),
                version_id: v.version_id.clone(),
                latest: v.latest,
                marker: v.delete_marker,
                size: v.size,
                millis: last,
                etag: v.etag.map(|e| e.trim_matches('"').to_string()),
            });
        }
    }
    // Shuffled: reversed, then every other row first.
    rows.reverse();
    let (a, b): (Vec<_>, Vec<_>) = rows.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
    a.into_iter().chain(b).map(|(_, r)| r).collect()
}

fn iso(millis: i64) -> String {
    let t =
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000).unwrap();
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&f).unwrap()
}

fn csv_gz(src: &str, rows: &[Row]) -> Vec<u8> {
    let gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut w = csv::WriterBuilder::new()
        .quote_style(csv::QuoteStyle::Always)
        .from_writer(gz);
    for r in rows {
        let size = if r.marker {
            String::new()
        } else {
            r.size.to_string()
        };
        let class = if r.marker { "" } else { "STANDARD" };
        // S3's inventory encoding: URL-encoded, `+` for a space.
        let key = encode_key(&r.key).replace("%20", "+");
        let (latest, marker) = (r.latest.to_string(), r.marker.to_string());
        let etag = r.etag.clone().unwrap_or_default();
        w.write_record([
            src,
            &key,
            &r.version_id,
            &latest,
            &marker,
            &size,
            &iso(r.millis),
            &etag,
            class,
        ])
        .unwrap();
    }
    w.into_inner().unwrap().finish().unwrap()
}

const PARQUET_SCHEMA: &str = "message s3.inventory {
    required binary bucket (UTF8);
    required binary key (UTF8);
    optional binary version_id (UTF8);
    optional boolean is_latest;
    optional boolean is_delete_marker;
    optional int64 size;
    optional int64 last_modified_date (TIMESTAMP_MILLIS);
    optional binary e_tag (UTF8);
}";

fn optional<T: DataType>(col: &mut SerializedColumnWriter<'_>, values: Vec<Option<T::T>>) {
    let defs: Vec<i16> = values.iter().map(|v| i16::from(v.is_some())).collect();
    let present: Vec<T::T> = values.into_iter().flatten().collect();
    col.typed::<T>()
        .write_batch(&present, Some(&defs), None)
        .unwrap();
}

fn column(col: &mut SerializedColumnWriter<'_>, index: usize, src: &str, rows: &[Row]) {
    let text = |f: &dyn Fn(&Row) -> Option<String>| -> Vec<Option<ByteArray>> {
        rows.iter()
            .map(|r| f(r).map(|s| ByteArray::from(s.as_str())))
            .collect()
    };
    match index {
        0 | 1 => {
            let values: Vec<ByteArray> = rows
                .iter()
                .map(|r| ByteArray::from(if index == 0 { src } else { r.key.as_str() }))
                .collect();
            col.typed::<ByteArrayType>()
                .write_batch(&values, None, None)
                .unwrap();
        }
        2 => optional::<ByteArrayType>(col, text(&|r| Some(r.version_id.clone()))),
        3 => optional::<BoolType>(col, rows.iter().map(|r| Some(r.latest)).collect()),
        4 => optional::<BoolType>(col, rows.iter().map(|r| Some(r.marker)).collect()),
        5 => optional::<Int64Type>(
            col,
            rows.iter().map(|r| (!r.marker).then_some(r.size)).collect(),
        ),
        6 => optional::<Int64Type>(col, rows.iter().map(|r| Some(r.millis)).collect()),
        _ => optional::<ByteArrayType>(col, text(&|r| r.etag.clone())),
    }
}

/// A Parquet data file (keys as they are), two rows per row group.
fn parquet(src: &str, rows: &[Row]) -> Vec<u8> {
    let schema = Arc::new(parse_message_type(PARQUET_SCHEMA).unwrap());
    let props = Arc::new(WriterProperties::builder().build());
    let mut out = Vec::new();
    let mut writer = SerializedFileWriter::new(&mut out, schema, props).unwrap();
    for chunk in rows.chunks(2) {
        let mut group = writer.next_row_group().unwrap();
        let mut index = 0;
        while let Some(mut col) = group.next_column().unwrap() {
            column(&mut col, index, src, chunk);
            col.close().unwrap();
            index += 1;
        }
        group.close().unwrap();
    }
    writer.close().unwrap();
    out
}

async fn put(c: &Client, bucket: &str, key: &str, body: Vec<u8>) {
    c.put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(body))
        .send()
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e:?}"));
}

/// Uploads an inventory (data files, then manifest.json and its checksum) under `prefix` of
/// bucket `inv`; returns the manifest's URL.
async fn upload_inventory(
    c: &Client,
    inv: &str,
    prefix: &str,
    src: &str,
    format: &str,
    files: Vec<Vec<u8>>,
) -> String {
    let mut listed = Vec::new();
    for (i, bytes) in files.into_iter().enumerate() {
        let key = format!(
            "{prefix}/data/part-{i}.{}",
            if format == "CSV" { "csv.gz" } else { "parquet" }
        );
        listed.push(serde_json::json!({
            "key": key, "size": bytes.len(), "MD5checksum": hex::encode(Md5::digest(&bytes)),
        }));
        put(c, inv, &key, bytes).await;
    }
    let schema = if format == "CSV" {
        "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass"
    } else {
        PARQUET_SCHEMA
    };
    let manifest = serde_json::json!({
        "sourceBucket": src, "destinationBucket": format!("arn:aws:s3:::{inv}"),
        "version": "2016-11-30", "creationTimestamp": "1714608000000",
        "fileFormat": format, "fileSchema": schema, "files": listed,
    });
    let text = serde_json::to_vec_pretty(&manifest).unwrap();
    let checksum = hex::encode(Md5::digest(&text)).into_bytes();
    put(
        c,
        inv,
        &format!("{prefix}/2024-05-02T00-00Z/manifest.checksum"),
        checksum,
    )
    .await;
    put(
        c,
        inv,
        &format!("{prefix}/2024-05-02T00-00Z/manifest.json"),
        text,
    )
    .await;
    format!("s3://{inv}/{prefix}/2024-05-02T00-00Z/manifest.json")
}

/// A Parquet inventory on the local disk (manifest.json, its checksum and the data file in
/// one directory); returns the manifest's path.
fn local_inventory(dir: &Path, src: &str, data: Vec<u8>) -> String {
    let inv = dir.join("local-inventory");
    std::fs::create_dir_all(&inv).unwrap();
    let manifest = serde_json::json!({
        "sourceBucket": src, "fileFormat": "Parquet", "fileSchema": PARQUET_SCHEMA,
        "files": [{"key": "inv/data/part-0.parquet", "size": data.len(),
                   "MD5checksum": hex::encode(Md5::digest(&data))}],
    });
    std::fs::write(inv.join("part-0.parquet"), data).unwrap();
    let text = serde_json::to_vec(&manifest).unwrap();
    std::fs::write(
        inv.join("manifest.checksum"),
        hex::encode(Md5::digest(&text)),
    )
    .unwrap();
    std::fs::write(inv.join("manifest.json"), text).unwrap();
    inv.join("manifest.json").display().to_string()
}

/// A job of the same source and destination with its own manifest in `dir`.
fn job_in(dir: &Path, name: &str, src: &str, dst: &str, ep: &str) -> Job {
    Job::new(src, dst, &dir.join(name))
        .endpoint(ep)
        .extra(&["--delete-markers"])
}

fn plan_with(job: &Job, extra: &[&str]) -> std::process::Output {
    let mut a = job.plan_args();
    a.extend(extra.iter().map(|s| s.to_string()));
    run(&strs(&a))
}

#[tokio::test]
async fn inventories_and_csv_manifests_plan_what_a_listing_plans() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst, inv) = (bucket("in-src"), bucket("in-dst"), bucket("in-inv"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    create_bucket(&c, &inv, false).await;
    seed_source(&c, &src).await;
    let dir = tempfile::tempdir().unwrap();

    let listed = job_in(dir.path(), "listed.db", &src, &dst, &ep);
    expect_code(&listed.plan(), 0);
    let expected = planned(listed.manifest());
    assert_eq!(expected.len(), 10, "{expected:#?}");
    assert_eq!(
        expected.iter().filter(|t| t.3 == 1).count(),
        3,
        "three delete markers"
    );

    let rows = inventory_rows(&c, &src).await;
    let half = rows.len() / 2;
    let csv_files = vec![csv_gz(&src, &rows[..half]), csv_gz(&src, &rows[half..])];
    let csv_inv = upload_inventory(&c, &inv, "inv/csv", &src, "CSV", csv_files).await;
    let pq_inv = upload_inventory(
        &c,
        &inv,
        "inv/pq",
        &src,
        "Parquet",
        vec![parquet(&src, &rows)],
    )
    .await;
    let local = local_inventory(dir.path(), &src, parquet(&src, &rows));
    let inventories = [
        ("csv-inv.db", &csv_inv),
        ("pq-inv.db", &pq_inv),
        ("local-inv.db", &local),
    ];
    for (name, url) in inventories {
        let job = job_in(dir.path(), name, &src, &dst, &ep);
        let o = plan_with(&job, &["--from-inventory", url]);
        expect_code(&o, 0);
        assert!(
            stderr_of(&o).contains("planned 10 tasks (3 delete markers"),
            "{}",
            stderr_of(&o)
        );
        assert_eq!(planned(job.manifest()), expected, "{name}");
        assert!(job.status().listing_complete, "{name}");
    }

    // A CSV manifest of every version, shuffled, keys URL-encoded (`+` for a space).
    let mut text = String::new();
    for r in &rows {
        let key = encode_key(&r.key).replace("%20", "+");
        text.push_str(&format!("{src},{key},{}\n", r.version_id));
    }
    let csv = dir.path().join("manifest.csv");
    std::fs::write(&csv, &text).unwrap();
    let job = job_in(dir.path(), "csv.db", &src, &dst, &ep);
    expect_code(&plan_with(&job, &["--from-csv", csv.to_str().unwrap()]), 0);
    assert_eq!(planned(job.manifest()), expected, "--from-csv");

    // Without version ids: each key's current entry (the markers too: --delete-markers).
    let current: String = KEYS
        .iter()
        .map(|k| format!("{src},{}\n", encode_key(k)))
        .collect();
    std::fs::write(&csv, current).unwrap();
    let job = job_in(dir.path(), "current.db", &src, &dst, &ep);
    expect_code(&plan_with(&job, &["--from-csv", csv.to_str().unwrap()]), 0);
    let latest: Planned = expected.iter().filter(|t| t.4 == 1).cloned().collect();
    assert_eq!(planned(job.manifest()), latest, "rows without version ids");

    // A row of another bucket: one line naming file and line, and no manifest at all.
    std::fs::write(&csv, format!("{text}other-bucket,in/plain.txt,v1\n")).unwrap();
    let job = job_in(dir.path(), "bad.db", &src, &dst, &ep);
    let o = plan_with(&job, &["--from-csv", csv.to_str().unwrap()]);
    expect_code(&o, 2);
    let err = stderr_of(&o);
    assert!(
        err.contains(&format!(
            "{}:11: bucket \"other-bucket\" is not the job's source bucket",
            csv.display()
        )),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!job.manifest().exists() && !dir.path().join("bad.db.tmp").exists());
    // A version the source does not have: refused after the listing, still no manifest.
    std::fs::write(&csv, format!("{src},in/plain.txt,no-such-version\n")).unwrap();
    let o = plan_with(&job, &["--from-csv", csv.to_str().unwrap()]);
    expect_code(&o, 2);
    assert!(stderr_of(&o).contains(":1: bucket "), "{}", stderr_of(&o));
    assert!(!job.manifest().exists() && !dir.path().join("bad.db.tmp").exists());
    // A data file whose MD5 differs from its manifest's: refused, no manifest.
    let bad = upload_inventory(&c, &inv, "inv/bad", &src, "CSV", vec![b"not it".to_vec()]).await;
    put(&c, &inv, "inv/bad/data/part-0.csv.gz", csv_gz(&src, &rows)).await;
    let o = plan_with(&job, &["--from-inventory", &bad]);
    expect_code(&o, 2);
    assert!(
        stderr_of(&o).contains("does not match the manifest's"),
        "{}",
        stderr_of(&o)
    );
    assert!(!job.manifest().exists() && !dir.path().join("bad.db.tmp").exists());

    // The listed job copied, then reported whole: every task `succeeded`.
    expect_code(&listed.run(&[]), 0);
    let out = dir.path().join("all");
    let o = listed.report(&["--format", "aws", "--output", out.to_str().unwrap()]);
    expect_code(&o, 0);
    let text = std::fs::read_to_string(out.join("job-listed/results/1.csv")).unwrap();
    assert_eq!(
        text.lines()
            .filter(|l| l.contains(",succeeded,200,,Successful"))
            .count(),
        10,
        "{text}"
    );
}

/// The results files of an AWS-shaped report under `dir/job-<id>/`, from its manifest.json.
fn report_results(dir: &Path, id: &str) -> Vec<std::path::PathBuf> {
    let root = dir.join(format!("job-{id}"));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["Format"], "Report_CSV_20180820");
    m["Results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let key = r["Key"].as_str().unwrap();
            let path = dir.join(key);
            let md5 = hex::encode(Md5::digest(std::fs::read(&path).unwrap()));
            assert_eq!(r["MD5Checksum"].as_str(), Some(md5.as_str()), "{key}");
            assert_eq!(r["TaskExecutionStatus"], "failed");
            path
        })
        .collect()
}

#[tokio::test]
async fn a_failed_tasks_report_plans_the_same_tasks_again() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst, reports) = (bucket("rt-src"), bucket("rt-dst"), bucket("rt-rep"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    create_bucket(&c, &reports, false).await;
    seed_source(&c, &src).await;
    let dir = tempfile::tempdir().unwrap();
    let job = job_in(dir.path(), "job.db", &src, &dst, &ep);
    expect_code(&job.plan(), 0);
    let expected = planned(job.manifest());
    // The destination goes away: every key's oldest task fails, the others block behind it.
    c.delete_bucket()
        .bucket(&dst)
        .send()
        .await
        .expect("delete the destination");
    expect_code(&job.run(&["--max-attempts", "1"]), 1);
    let out = dir.path().join("reports");
    let o = job.report(&[
        "--format",
        "aws",
        "--report-scope",
        "failed",
        "--output",
        out.to_str().unwrap(),
    ]);
    expect_code(&o, 0);
    let files = report_results(&out, "job");
    assert_eq!(files.len(), 1);
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert_eq!(text.lines().count(), expected.len(), "{text}");
    let codes: BTreeMap<&str, usize> = text.lines().fold(BTreeMap::new(), |mut m, l| {
        let code = l.split(',').nth(5).unwrap_or("");
        *m.entry(code).or_default() += 1;
        m
    });
    assert_eq!(
        codes.get("BlockedByFailedOlderVersion"),
        Some(&(expected.len() - KEYS.len())),
        "{text}"
    );

    create_bucket(&c, &dst, true).await;
    let again = job_in(dir.path(), "again.db", &src, &dst, &ep);
    expect_code(
        &plan_with(&again, &["--from-csv", files[0].to_str().unwrap()]),
        0,
    );
    assert_eq!(planned(again.manifest()), expected);

    // The same report uploaded to a bucket, and read back from there.
    let url = format!("s3://{reports}/batch/reports/");
    let o = job.report(&[
        "--format",
        "aws",
        "--report-scope",
        "failed",
        "--output",
        &url,
        "--job-id",
        "j1",
    ]);
    expect_code(&o, 0);
    let m = c
        .get_object()
        .bucket(&reports)
        .key("batch/reports/job-j1/manifest.json")
        .send()
        .await;
    let m: serde_json::Value = serde_json::from_slice(
        &m.expect("manifest.json uploaded")
            .body
            .collect()
            .await
            .unwrap()
            .into_bytes(),
    )
    .unwrap();
    let key = m["Results"][0]["Key"].as_str().unwrap().to_string();
    assert!(key.starts_with("batch/reports/job-j1/results/"), "{key}");
    assert_eq!(m["Results"][0]["Bucket"].as_str(), Some(reports.as_str()));
    let from_s3 = job_in(dir.path(), "from-s3.db", &src, &dst, &ep);
    expect_code(
        &plan_with(&from_s3, &["--from-csv", &format!("s3://{reports}/{key}")]),
        0,
    );
    assert_eq!(planned(from_s3.manifest()), expected);
}

#[tokio::test]
async fn a_csv_manifest_planned_with_a_size_filter_keeps_the_larger_versions() {
    // --min-size is strict (as S3): 4- and 5-byte versions go, 40-byte ones stay.
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("sz-src"), bucket("sz-dst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    let big = "a body of forty bytes, larger than ten..";
    let rounds = vec![
        vec![Op::put("sz/a", "tiny"), Op::put("sz/b", big)],
        vec![Op::put("sz/a", big), Op::put("sz/b", "small")],
    ];
    seed(&c, &src, rounds).await;
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    let mut larger = Vec::new();
    for (key, history) in histories(&c, &src, "").await {
        for v in history {
            text.push_str(&format!("{src},{},{}\n", encode_key(&key), v.version_id));
            if v.size > 10 {
                larger.push((key.clone(), v.version_id.clone()));
            }
        }
    }
    assert_eq!(larger.len(), 2, "one larger version of each key");
    let csv = dir.path().join("sizes.csv");
    std::fs::write(&csv, text).unwrap();
    let args = ["--from-csv", csv.to_str().unwrap(), "--min-size", "10"];
    // Dry run: the same selection tallied on stdout, no manifest.
    let dry = job_in(dir.path(), "dry.db", &src, &dst, &ep);
    let o = plan_with(&dry, &[&args[..], &["--dry-run"]].concat());
    expect_code(&o, 0);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("dry run: 2 tasks (80 bytes) from 4 listed"),
        "{out}"
    );
    assert!(!dry.manifest().exists(), "a dry run writes no manifest");
    let job = job_in(dir.path(), "sizes.db", &src, &dst, &ep);
    expect_code(&plan_with(&job, &args), 0);
    let got: Vec<(String, String)> = planned(job.manifest())
        .into_iter()
        .map(|t| (t.0, t.1))
        .collect();
    assert_eq!(got, larger, "only the versions larger than 10 bytes");

    // The job remembers its manifest: the same plan again does nothing; another is refused.
    let o = plan_with(&job, &args);
    expect_code(&o, 0);
    assert!(stderr_of(&o).contains("nothing to do"), "{}", stderr_of(&o));
    let o = plan_with(&job, &["--min-size", "10"]);
    expect_code(&o, 2);
    assert!(
        stderr_of(&o).contains("a listing of the source (manifest has --from-csv"),
        "{}",
        stderr_of(&o)
    );
    expect_code(&job.run(&[]), 0);
    let copied: Vec<i64> = histories(&c, &dst, "")
        .await
        .into_values()
        .map(|h| h.iter().map(|v| v.size).sum())
        .collect();
    assert_eq!(copied, [40, 40], "each key's larger version only");
    expect_code(&job.verify(), 0);

    // One key's current version, no filter: `verify` compares what the manifest selected
    // (sz/a's current version), not the whole source.
    let dst2 = bucket("sz-dst2");
    create_bucket(&c, &dst2, true).await;
    std::fs::write(&csv, format!("{src},sz/a\n")).unwrap();
    let one = job_in(dir.path(), "one.db", &src, &dst2, &ep);
    expect_code(&plan_with(&one, &["--from-csv", csv.to_str().unwrap()]), 0);
    expect_code(&one.run(&[]), 0);
    let o = one.verify();
    expect_code(&o, 0);
}

/// (key, destination id) of every planned task, in task-id order.
fn task_dests(m: &Path) -> Vec<(String, i64)> {
    let conn = rusqlite::Connection::open_with_flags(m, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the manifest");
    let mut stmt = conn
        .prepare("SELECT key, dest FROM tasks ORDER BY id")
        .unwrap();
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    rows.map(Result::unwrap).collect()
}

#[tokio::test]
async fn a_csv_manifest_with_a_replication_configuration_goes_to_each_rules_destination() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, a, b) = (bucket("rc-src"), bucket("rc-a"), bucket("rc-b"));
    for (name, versioned) in [(&src, true), (&a, true), (&b, true)] {
        create_bucket(&c, name, versioned).await;
    }
    let rounds = vec![
        vec![Op::put("x/1", "x one"), Op::put("y/1", "y one")],
        vec![Op::put("x/1", "x two")],
    ];
    seed(&c, &src, rounds).await;
    let dir = tempfile::tempdir().unwrap();
    // Rule "all" sends everything to A; rule "x" sends x/ to B too.
    let config = format!(
        r#"{{"Rules": [
    {{"ID": "all", "Priority": 1, "Status": "Enabled", "Filter": {{}},
      "DeleteMarkerReplication": {{"Status": "Disabled"}},
      "Destination": {{"Bucket": "arn:aws:s3:::{a}"}}}},
    {{"ID": "x", "Priority": 2, "Status": "Enabled", "Filter": {{"Prefix": "x/"}},
      "DeleteMarkerReplication": {{"Status": "Disabled"}},
      "Destination": {{"Bucket": "arn:aws:s3:::{b}"}}}}]}}"#
    );
    let config_path = dir.path().join("replication.json");
    std::fs::write(&config_path, config).unwrap();
    let mut text = String::new();
    for (key, history) in histories(&c, &src, "").await {
        for v in history {
            text.push_str(&format!("{src},{key},{}\n", v.version_id));
        }
    }
    let csv = dir.path().join("all.csv");
    std::fs::write(&csv, text).unwrap();
    let m = dir.path().join("rules.db");
    let o = run(&[
        "replicate",
        "--source",
        &format!("s3://{src}"),
        "--manifest",
        m.to_str().unwrap(),
        "--source-endpoint",
        &ep,
        "--dest-endpoint",
        &ep,
        "--path-style",
        "--no-progress",
        "--replication-config",
        config_path.to_str().unwrap(),
        "--from-csv",
        csv.to_str().unwrap(),
    ]);
    expect_code(&o, 0);
    let dests = task_dests(&m);
    let to = |d: i64| dests.iter().filter(|t| t.1 == d).count();
    assert_eq!(
        (to(0), to(1)),
        (3, 2),
        "A: every version; B: x/1's two {dests:?}"
    );
    let versions = |h: BTreeMap<String, Vec<Ver>>| -> Vec<(String, usize)> {
        h.into_iter().map(|(k, v)| (k, v.len())).collect()
    };
    let at_a = versions(histories(&c, &a, "").await);
    let at_b = versions(histories(&c, &b, "").await);
    assert_eq!(at_a, [("x/1".to_string(), 2), ("y/1".to_string(), 1)]);
    assert_eq!(at_b, [("x/1".to_string(), 2)]);
    let o = run(&["verify", "--manifest", m.to_str().unwrap(), "--no-progress"]);
    expect_code(&o, 0);
}
