//! Supplied manifests (`plan --from-csv`, `--from-inventory`) on a PostgreSQL job (issue 20),
//! end to end on the server under test, as `inputs_e2e` checks them on a SQLite file: a CSV
//! manifest plans the tasks it plans into a file, then `run` copies exactly the selected
//! versions, `status`, `report` and `verify` agree; an S3 Inventory of over a thousand keys
//! (several pages, so several units of work) is planned and copied whole; a bad row (and a
//! version the source lacks) leaves no job at all, a scratch job left by a killed plan is
//! dropped by the next one, and the job remembers its manifest; a dry run writes nothing, and
//! `replicate` plans and copies.

mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;

use aws_sdk_s3::Client;
use md5::{Digest, Md5};
use s3_backfill::s3::types::encode_key;
use support::pg::{fresh_database, psql};
use support::*;

/// A planned task as a user compares it, as text: key, version id, place in the key's
/// history, delete marker (0/1), latest (0/1), size.
type Task = Vec<String>;

/// A job's source and destination (both versioned) on the server under test: the endpoint,
/// a client, and the two buckets' names.
async fn two_buckets(tag: &str) -> (String, Client, String, String) {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket(&format!("{tag}-src")), bucket(&format!("{tag}-dst")));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    (ep, c, src, dst)
}

/// A job from `src` to `dst` (with `--delete-markers`) whose manifest is job `name` in a new
/// database; the job and the database's DSN.
fn pg_job(name: &str, src: &str, dst: &str, ep: &str) -> (Job, String) {
    let db = fresh_database(name);
    let m = PathBuf::from(format!("{db}?job={name}"));
    let job = Job::new(src, dst, &m)
        .endpoint(ep)
        .extra(&["--delete-markers"]);
    (job, db)
}

fn plan_with(job: &Job, extra: &[&str]) -> Output {
    let mut a = job.plan_args();
    a.extend(extra.iter().map(|s| s.to_string()));
    run(&strs(&a))
}

/// The tasks of job `name` in database `db`, read with psql (by key in byte order, each
/// newest first).
fn pg_tasks(db: &str, name: &str) -> Vec<Task> {
    let s = format!("\"s3b_{name}\"");
    let rows = psql(
        db,
        &format!(
            "SELECT k.key, t.version_id, t.history_pos, t.flags & 1, (t.flags & 2) / 2, t.size
             FROM {s}.task t JOIN {s}.keys k ON k.id = t.id >> 24
             ORDER BY k.key COLLATE \"C\", t.history_pos"
        ),
    );
    // No key here holds a `|`.
    rows.lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.split('|').map(String::from).collect())
        .collect()
}

/// The tasks of a SQLite manifest, as [`pg_tasks`] reads them.
fn file_tasks(m: &Path) -> Vec<Task> {
    let conn = rusqlite::Connection::open_with_flags(m, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the manifest");
    let mut stmt = conn
        .prepare(
            "SELECT key, version_id, history_pos, is_delete_marker, is_latest, size
             FROM tasks ORDER BY key, history_pos",
        )
        .unwrap();
    let text = |v: rusqlite::types::Value| match v {
        rusqlite::types::Value::Integer(n) => n.to_string(),
        rusqlite::types::Value::Text(t) => t,
        other => panic!("unexpected column {other:?}"),
    };
    let rows = stmt
        .query_map([], |r| (0..6).map(|i| r.get(i).map(text)).collect())
        .unwrap();
    rows.map(Result::unwrap).collect()
}

/// The job schemas of a database (scratch ones included), and whether it lists any job.
fn schemas(db: &str) -> (Vec<String>, bool) {
    let names = psql(
        db,
        "SELECT nspname FROM pg_namespace WHERE nspname LIKE 's3b%' ORDER BY 1",
    );
    let registry = psql(db, "SELECT to_regclass('public.s3b_jobs') IS NOT NULL");
    let listed = registry == "t"
        && psql(db, "SELECT count(*) FROM public.s3b_jobs")
            .parse::<u64>()
            .unwrap()
            > 0;
    (names.lines().map(String::from).collect(), listed)
}

/// Asserts that `job` has no manifest: `status` fails as on a file that does not exist, and
/// the database holds no job schema at all.
fn assert_no_job(job: &Job, db: &str) {
    let o = run(&["status", "--manifest", job.m(), "--json"]);
    let missing = run(&[
        "status",
        "--manifest",
        "/nonexistent-dir/no-such-job.db",
        "--json",
    ]);
    assert_eq!(o.status.code(), missing.status.code(), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("does not exist"),
        "{}",
        stderr_of(&o)
    );
    assert_eq!(schemas(db), (Vec::new(), false), "no job, no scratch job");
}

/// Asserts that `plan` succeeded and printed what it planned starting with `start`; that
/// line.
fn expect_planned(o: &Output, start: &str) -> String {
    expect_code(o, 0);
    let err = stderr_of(o);
    let line = err.lines().find(|l| l.starts_with("planned "));
    let line = line.unwrap_or_else(|| panic!("no `planned` line: {err}"));
    assert!(line.starts_with(start), "{line}");
    line.to_string()
}

/// A CSV manifest (Bucket,Key[,VersionId]) of `rows` in `dir`; its path.
fn write_csv(dir: &Path, name: &str, src: &str, rows: &[(&str, Option<&str>)]) -> String {
    let mut text = String::new();
    for (key, version) in rows {
        let key = encode_key(key);
        match version {
            Some(v) => text.push_str(&format!("{src},{key},{v}\n")),
            None => text.push_str(&format!("{src},{key}\n")),
        }
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn a_csv_manifest_plans_a_postgres_job_that_runs_reports_and_verifies() {
    let (ep, c, src, dst) = two_buckets("pgcsv").await;
    let (a, b, u, left) = ("cs/a", "cs/b b", "cs/ünï/日本", "cs/left-out");
    let del = |k: &str| Op::Delete { key: k.into() };
    let rounds = vec![
        vec![
            Op::put(a, "a one"),
            Op::put(b, "b one"),
            Op::put(u, "u one"),
            Op::put(left, "left one"),
        ],
        vec![Op::put(a, "a two, longer"), Op::put(b, "b two")],
        vec![Op::put(a, "a three"), del(b), Op::put(left, "left two")],
    ];
    seed(&c, &src, rounds).await;
    let h = histories(&c, &src, "").await;
    let v = |k: &str, i: usize| h[k][i].version_id.clone();
    // Every version of a; b's oldest version and the marker on top; u's only version;
    // nothing of `left`.
    let (a0, a1, a2, b0, b2, u0) = (v(a, 0), v(a, 1), v(a, 2), v(b, 0), v(b, 2), v(u, 0));
    assert!(h[b][2].delete_marker && !h[b][0].delete_marker);
    let dir = tempfile::tempdir().unwrap();
    let csv = write_csv(
        dir.path(),
        "keys.csv",
        &src,
        &[
            (a, Some(&a1)),
            (b, Some(&b2)),
            (u, Some(&u0)),
            (a, Some(&a0)),
            (b, Some(&b0)),
            (a, Some(&a2)),
        ],
    );
    let chosen: BTreeSet<String> = [&a0, &a1, &a2, &b0, &b2, &u0]
        .into_iter()
        .cloned()
        .collect();

    // The same plan into a file, for comparison.
    let file = Job::new(&src, &dst, &dir.path().join("file.db"))
        .endpoint(&ep)
        .extra(&["--delete-markers"]);
    let of_file = plan_with(&file, &["--from-csv", &csv]);
    expect_code(&of_file, 0);
    let expected = file_tasks(file.manifest());
    assert_eq!(expected.len(), 6, "{expected:#?}");

    let (job, db) = pg_job("csvjob", &src, &dst, &ep);
    let line = expect_planned(
        &plan_with(&job, &["--from-csv", &csv]),
        "planned 6 tasks (1 delete markers",
    );
    assert_eq!(
        line,
        expect_planned(&of_file, "planned 6 tasks"),
        "as a file"
    );
    assert_eq!(pg_tasks(&db, "csvjob"), expected, "the tasks a file gets");
    assert_eq!(schemas(&db), (vec!["s3b_csvjob".to_string()], true));
    let s = job.status();
    assert!(s.listing_complete, "{s:?}");
    assert_eq!((s.total, s.pending, s.delete_markers), (6, 6, 1), "{s:?}");

    // `run` claims the units the plan made: every task done, exactly the chosen versions
    // at the destination, in order.
    let o = job.run(&[]);
    expect_code(&o, 0);
    let s = job.status();
    assert_eq!(
        (s.total, s.done, s.pending, s.in_progress, s.failed),
        (6, 6, 0, 0, 0),
        "{s:?}"
    );
    let select = |h: &[Ver]| -> Vec<Ver> {
        h.iter()
            .filter(|v| chosen.contains(&v.version_id))
            .cloned()
            .collect()
    };
    let compared = assert_replica(&c, &src, &c, &dst, "", "", select).await;
    assert_eq!(compared, 5, "five object versions copied (and one marker)");
    expect_code(&job.verify(), 0);

    // The AWS-shaped report: every task succeeded.
    let out = dir.path().join("report");
    let o = job.report(&[
        "--format",
        "aws",
        "--output",
        out.to_str().unwrap(),
        "--job-id",
        "pg",
    ]);
    expect_code(&o, 0);
    let mut succeeded = 0;
    for f in std::fs::read_dir(out.join("job-pg/results")).unwrap() {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
        succeeded += text
            .lines()
            .filter(|l| l.contains(",succeeded,200,,Successful"))
            .count();
    }
    assert_eq!(succeeded, 6);
}

/// One inventory row of a version (CSV.gz columns as `FILE_SCHEMA` names them).
fn inventory_line(src: &str, key: &str, v: &Ver, millis: i64) -> String {
    let ts = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let size = match v.delete_marker {
        true => String::new(),
        false => v.size.to_string(),
    };
    let etag = v.etag.as_deref().unwrap_or("").trim_matches('"');
    format!(
        "\"{src}\",\"{}\",\"{}\",\"{}\",\"{}\",\"{size}\",\"{ts}\",\"{etag}\"\n",
        encode_key(key).replace("%20", "+"),
        v.version_id,
        v.latest,
        v.delete_marker
    )
}

const FILE_SCHEMA: &str =
    "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag";

/// An inventory of every version of `src` (one gzipped CSV data file, rows newest key first)
/// uploaded to bucket `inv` with its manifest.json and manifest.checksum; the manifest's URL.
async fn upload_inventory(c: &Client, src: &str, inv: &str) -> String {
    let mut text = String::new();
    for (key, history) in histories(c, src, "").await.iter().rev() {
        // Milliseconds keep each key's order even within one second.
        for (i, v) in history.iter().enumerate() {
            text.push_str(&inventory_line(src, key, v, v.secs * 1000 + i as i64));
        }
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(text.as_bytes()).unwrap();
    let data = gz.finish().unwrap();
    let data_key = "inv/data/rows.csv.gz";
    let manifest = serde_json::json!({
        "sourceBucket": src, "fileFormat": "CSV", "fileSchema": FILE_SCHEMA,
        "files": [{"key": data_key, "size": data.len(),
                   "MD5checksum": hex::encode(Md5::digest(&data))}],
    });
    apply(c, inv, Op::put(data_key, data)).await;
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let sum = hex::encode(Md5::digest(&manifest)).into_bytes();
    apply(c, inv, Op::put("inv/day/manifest.checksum", sum)).await;
    apply(c, inv, Op::put("inv/day/manifest.json", manifest)).await;
    format!("s3://{inv}/inv/day/manifest.json")
}

#[tokio::test]
async fn an_inventory_of_over_a_thousand_keys_plans_units_that_run_claims() {
    let (ep, c, src, dst) = two_buckets("pginv").await;
    let inv = bucket("pginv-inv");
    create_bucket(&c, &inv, false).await;
    // Over a thousand tasks: the plan writes more than one page, so more than one unit.
    let keys: Vec<String> = (0..1040).map(|i| format!("inv/k-{i:04}")).collect();
    let rounds = vec![
        keys.iter()
            .map(|k| Op::put(k, format!("body {k}")))
            .collect(),
        vec![
            Op::put(&keys[7], "seven, second"),
            Op::put(&keys[900], "two"),
        ],
        vec![Op::Delete {
            key: keys[7].clone(),
        }],
    ];
    seed(&c, &src, rounds).await;
    let url = upload_inventory(&c, &src, &inv).await;

    let (job, db) = pg_job("invjob", &src, &dst, &ep);
    expect_planned(
        &plan_with(&job, &["--from-inventory", &url]),
        "planned 1043 tasks (1 delete markers",
    );
    let units: u64 = psql(&db, "SELECT count(*) FROM \"s3b_invjob\".units")
        .parse()
        .unwrap();
    assert!(units >= 2, "{units} units");
    let s = job.status();
    assert!(s.listing_complete && s.total == 1043, "{s:?}");
    let tasks = pg_tasks(&db, "invjob");
    let seven: Vec<String> = tasks
        .iter()
        .filter(|t| t[0] == keys[7])
        .map(|t| t[2..5].join(" "))
        .collect();
    assert_eq!(
        seven,
        ["0 1 1", "1 0 0", "2 0 0"],
        "the marker on top (latest), then the two versions, newest first"
    );

    let o = job.run(&["--concurrency", "16"]);
    expect_code(&o, 0);
    let s = job.status();
    assert_eq!((s.done, s.pending, s.failed), (1043, 0, 0), "{s:?}");
    let compared = assert_replica(&c, &src, &c, &dst, "", "", all).await;
    assert_eq!(compared, 1042);
    expect_code(&job.verify(), 0);
}

#[tokio::test]
async fn a_bad_row_leaves_no_postgres_job_and_a_later_plan_makes_it() {
    let (ep, c, src, dst) = two_buckets("pgbad").await;
    let rounds = vec![
        vec![Op::put("b/one", "one"), Op::put("b/two", "two")],
        vec![Op::put("b/one", "one again")],
    ];
    seed(&c, &src, rounds).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, db) = pg_job("badjob", &src, &dst, &ep);

    // A row of another bucket: one line naming file and line, and no job at all.
    let good = [("b/one", None), ("b/two", None)];
    let csv = write_csv(dir.path(), "bad.csv", &src, &good);
    let mut text = std::fs::read_to_string(&csv).unwrap();
    text.push_str("other-bucket,b/one\n");
    std::fs::write(&csv, &text).unwrap();
    let o = plan_with(&job, &["--from-csv", &csv]);
    expect_code(&o, 2);
    let err = stderr_of(&o);
    assert!(
        err.contains(&format!(
            "{csv}:3: bucket \"other-bucket\" is not the job's source bucket"
        )),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_no_job(&job, &db);

    // A version the source does not have: refused while the tasks are written, no job.
    let two = histories(&c, &src, "b/two").await["b/two"][0]
        .version_id
        .clone();
    let csv = write_csv(
        dir.path(),
        "missing.csv",
        &src,
        &[("b/two", Some(&two)), ("b/one", Some("no-such-version"))],
    );
    let o = plan_with(&job, &["--from-csv", &csv]);
    expect_code(&o, 2);
    assert!(stderr_of(&o).contains(":2: bucket "), "{}", stderr_of(&o));
    assert_no_job(&job, &db);

    // A killed plan's scratch job is dropped by the next plan, which makes the job.
    psql(
        &db,
        "CREATE SCHEMA \"s3b_badjob~planning\"; CREATE TABLE \"s3b_badjob~planning\".task (x INT)",
    );
    let csv = write_csv(dir.path(), "good.csv", &src, &good);
    expect_planned(
        &plan_with(&job, &["--from-csv", &csv]),
        "planned 2 tasks (0 delete markers",
    );
    assert_eq!(schemas(&db), (vec!["s3b_badjob".to_string()], true));
    let s = job.status();
    assert_eq!((s.total, s.pending, s.listing_complete), (2, 2, true));

    // The job remembers its manifest: the same plan again does nothing; a listing is refused.
    let o = plan_with(&job, &["--from-csv", &csv]);
    expect_code(&o, 0);
    assert!(stderr_of(&o).contains("nothing to do"), "{}", stderr_of(&o));
    let o = job.plan();
    expect_code(&o, 2);
    assert!(
        stderr_of(&o).contains("a listing of the source (manifest has --from-csv"),
        "{}",
        stderr_of(&o)
    );
    expect_code(&job.run(&[]), 0);
    assert_eq!(job.status().done, 2);
    expect_code(&job.verify(), 0);
}

#[tokio::test]
async fn a_dry_run_of_a_csv_manifest_writes_nothing_to_postgres() {
    // --min-size is strict (as S3): 4- and 5-byte versions go, 40-byte ones stay.
    let (ep, c, src, dst) = two_buckets("pgdry").await;
    let big = "a body of forty bytes, larger than ten..";
    let rounds = vec![
        vec![Op::put("sz/a", "tiny"), Op::put("sz/b", big)],
        vec![Op::put("sz/a", big), Op::put("sz/b", "small")],
    ];
    seed(&c, &src, rounds).await;
    let mut rows = Vec::new();
    for (key, history) in histories(&c, &src, "").await {
        for v in history {
            rows.push((key.clone(), v.version_id));
        }
    }
    let rows: Vec<(&str, Option<&str>)> = rows
        .iter()
        .map(|(k, v)| (k.as_str(), Some(v.as_str())))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let csv = write_csv(dir.path(), "sizes.csv", &src, &rows);
    let (job, db) = pg_job("dryjob", &src, &dst, &ep);
    let args = ["--from-csv", &csv, "--min-size", "10"];
    let o = plan_with(&job, &[&args[..], &["--dry-run"]].concat());
    expect_code(&o, 0);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("dry run: 2 tasks (80 bytes) from 4 listed"),
        "{out}"
    );
    assert_no_job(&job, &db);

    // `replicate`: the plan itself, then the copy of each key's larger version only.
    let mut a = job.replicate_args();
    a.extend(args.iter().map(|s| s.to_string()));
    expect_code(&run(&strs(&a)), 0);
    assert_eq!(job.status().done, 2);
    let larger = |h: &[Ver]| -> Vec<Ver> { h.iter().filter(|v| v.size > 10).cloned().collect() };
    let compared = assert_replica(&c, &src, &c, &dst, "", "", larger).await;
    assert_eq!(compared, 2, "each key's larger version only");
    expect_code(&job.verify(), 0);
}
