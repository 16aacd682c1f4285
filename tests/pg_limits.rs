//! Job-wide limits on a PostgreSQL job (issue 20): `run` processes given `--max-rps` and
//! `--max-bandwidth` on one job each take a share of them while they run (said on their
//! output) and give it back when they end; the job is copied whole.

mod support;

use std::path::Path;
use std::process::Stdio;

use support::pg::{fresh_database, psql};
use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_share_the_jobs_limits_and_give_them_back() {
    let ep = endpoint();
    let c = client(&ep);
    let (src, dst) = (bucket("lim-src"), bucket("lim-dst"));
    create_bucket(&c, &src, true).await;
    create_bucket(&c, &dst, true).await;
    let rounds: Vec<Vec<Op>> = (0..2)
        .map(|v| {
            (0..40)
                .map(|i| Op::put(&format!("k-{i:03}"), format!("v{v} of {i}")))
                .collect()
        })
        .collect();
    seed(&c, &src, rounds).await;
    let db = fresh_database("limits");
    let m = format!("{db}?job=lim");
    let job = Job::new(&src, &dst, Path::new(&m)).endpoint(&ep);
    expect_code(&job.plan(), 0);
    let schema = "\"s3b_lim\"";
    let tasks = |state: &str| psql(&db, &format!("SELECT count(*) FROM {schema}.task{state}"));
    assert_eq!(tasks(""), "80");

    let limits = [
        "--max-rps",
        "400",
        "--max-bandwidth",
        "8M",
        "--concurrency",
        "4",
    ];
    let workers: Vec<_> = (0..2)
        .map(|_| {
            cmd(&strs(&job.run_args(&limits)))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start a worker")
        })
        .collect();
    for w in workers {
        let o = w.wait_with_output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(o.status.code(), Some(0), "{said}");
        assert!(said.contains("job-wide limits:"), "{said}");
        assert!(!said.contains("job-wide limits are off"), "{said}");
    }
    assert_eq!(tasks(" WHERE state = 2"), "80");
    assert_replica(&c, &src, &c, &dst, "", "", all).await;
    // Both took a share, and both gave it back.
    let taken = psql(
        &db,
        &format!("SELECT last_value FROM {schema}.rate_shares_id_seq"),
    );
    assert_eq!(taken, "2");
    let left = psql(&db, &format!("SELECT count(*) FROM {schema}.rate_shares"));
    assert_eq!(left, "0");
}
