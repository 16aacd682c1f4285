//! manifest::pg::staged: a PostgreSQL job built whole before it exists (`plan --from-csv` and
//! `--from-inventory`), as a SQLite job is built as `JOB.db.tmp` and renamed once complete.
//! The job's tables are made in its scratch schema (`s3b_<job>~planning`, see the header of
//! `pg`), which `public.s3b_jobs` does not list, so no other command sees the job while it is
//! built. Once complete, one transaction renames the schema to the job's and lists the job
//! (refused if the job appeared meanwhile). A plan that fails drops its scratch schema; a killed
//! one leaves it behind, and the next plan of the job drops it first. One plan of a job builds
//! at a time: the builder holds a session advisory lock named from the job until it ends.
//!
//! May call: `pg::schema`, the connection (`Db`) and the registry of jobs of `pg`.

use super::{list_job, schema, Db, PgManifest, JOBS_REGISTRY};
use crate::manifest::backend::PgLocation;
use crate::manifest::Result;

/// The session advisory lock a builder of job `$1` holds (a 64-bit hash of its name).
const BUILDER_LOCK: &str = "hashtextextended('s3-backfill plan ' || $1, 0)";

/// The scratch job of `l`: its name is the job's with `~planning`, which no job name can be
/// (see `Location::of`).
fn scratch_of(l: &PgLocation) -> PgLocation {
    PgLocation {
        url: l.url.clone(),
        job: format!("{}~planning", l.job),
        shown: format!("{}~planning", l.shown),
    }
}

/// A job being built under its scratch name (see the module header). Dropped before
/// [`Staged::publish`], it drops the scratch schema.
pub struct Staged {
    /// Holds the builder's lock; drops or renames the scratch schema.
    db: Db,
    target: PgLocation,
    scratch: PgLocation,
    published: bool,
}

impl Staged {
    /// Takes the job's builder lock and makes an empty scratch job (a leftover of a killed
    /// plan dropped first). The inner error is why it cannot: another plan builds the job.
    pub fn begin(l: &PgLocation) -> Result<std::result::Result<Staged, String>> {
        let db = Db::connect(l, None)?;
        let job = l.job.clone();
        let locked = db.call(move |c| {
            let sql = format!("SELECT pg_try_advisory_lock({BUILDER_LOCK})");
            Ok(c.query_one(sql.as_str(), &[&job])?.get::<_, bool>(0))
        })?;
        if !locked {
            return Ok(Err(format!(
                "manifest {}: another `plan` is building this job; wait for it to end",
                l.shown
            )));
        }
        let staged = Staged {
            db,
            target: l.clone(),
            scratch: scratch_of(l),
            published: false,
        };
        let scratch = schema::schema_of(&staged.scratch.job);
        staged.db.call(move |c| {
            let mut tx = c.transaction()?;
            tx.batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {scratch} CASCADE; CREATE SCHEMA {scratch};
                 SET LOCAL search_path TO {scratch};"
            ))?;
            tx.batch_execute(&schema::tables())?;
            tx.commit()
        })?;
        Ok(Ok(staged))
    }

    /// The scratch job, opened on a connection of its own.
    pub fn open(&self) -> Result<PgManifest> {
        let db = Db::connect(&self.scratch, Some(&schema::schema_of(&self.scratch.job)))?;
        Ok(PgManifest {
            db,
            location: self.scratch.clone(),
            parts: Default::default(),
        })
    }

    /// Gives the complete scratch job the job's name, in one transaction: the schema renamed,
    /// the job listed. The inner error: the job exists by now (nothing is changed; the scratch
    /// job is dropped). Connections opened on the scratch job must be reopened on the job.
    pub fn publish(mut self) -> Result<std::result::Result<(), String>> {
        let (from, to) = (
            schema::schema_of(&self.scratch.job),
            schema::schema_of(&self.target.job),
        );
        let job = self.target.job.clone();
        let shown = self.target.shown.clone();
        let done = self.db.call(move |c| {
            let mut tx = c.transaction()?;
            tx.batch_execute(JOBS_REGISTRY)?;
            let n: i64 = tx
                .query_one(
                    "SELECT count(*) FROM public.s3b_jobs WHERE name = $1",
                    &[&job],
                )?
                .get(0);
            if n > 0 {
                return Ok(Err(format!(
                    "manifest {shown} was created by another command while this plan built it; plan from a supplied manifest into a new --manifest"
                )));
            }
            tx.batch_execute(&format!("ALTER SCHEMA {from} RENAME TO {to}"))?;
            list_job(&mut tx, &job)?;
            tx.commit()?;
            Ok(Ok(()))
        })?;
        self.published = done.is_ok();
        Ok(done)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let scratch = schema::schema_of(&self.scratch.job);
        let published = self.published;
        let job = self.target.job.clone();
        // Best effort: a scratch job left behind is dropped by the next plan of the job.
        let _ = self.db.call(move |c| {
            if !published {
                c.batch_execute(&format!("DROP SCHEMA IF EXISTS {scratch} CASCADE"))?;
            }
            let sql = format!("SELECT pg_advisory_unlock({BUILDER_LOCK})");
            c.query_one(sql.as_str(), &[&job]).map(drop)
        });
    }
}

#[cfg(test)]
mod tests {
    //! Each test has a job of its own on the test server (see `store::tests::pg_job`).
    use super::*;
    use crate::manifest::store::tests::pg_job;
    use crate::manifest::tests::task;
    use crate::manifest::{Listing, Location};

    fn location(tag: &str) -> PgLocation {
        let url = pg_job(tag).expect("a test server");
        let Location::Postgres(l) = Location::of(&url).unwrap() else {
            panic!("not a postgres location: {url:?}");
        };
        l
    }

    /// The schemas of `l`'s job and of its scratch job that exist.
    fn schemas(l: &PgLocation) -> Vec<String> {
        let db = Db::connect(l, None).unwrap();
        let job = l.job.clone();
        db.call(move |c| {
            let rows = c.query(
                "SELECT nspname::text FROM pg_namespace WHERE nspname IN ($1, $2) ORDER BY 1",
                &[&format!("s3b_{job}"), &format!("s3b_{job}~planning")],
            )?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
        .unwrap()
    }

    #[test]
    fn a_complete_scratch_job_becomes_the_job_and_only_then_exists() {
        let l = location("staged-ok");
        let staged = Staged::begin(&l).unwrap().unwrap();
        let mut m = staged.open().unwrap();
        let done = Listing {
            complete: true,
            ..Listing::default()
        };
        m.insert_page(&[task("k", "2", 0), task("k", "1", 1)], &done)
            .unwrap();
        assert!(
            !PgManifest::job_exists(&l).unwrap(),
            "not while it is built"
        );
        assert_eq!(schemas(&l), [format!("s3b_{}~planning", l.job)]);
        drop(m);
        staged.publish().unwrap().unwrap();
        assert!(PgManifest::job_exists(&l).unwrap());
        assert_eq!(schemas(&l), [format!("s3b_{}", l.job)]);
        let m = PgManifest::open(&l, false).unwrap();
        assert_eq!(m.count_key("k").unwrap(), 2);
        assert!(m.listing().unwrap().complete);
    }

    #[test]
    fn one_builder_at_a_time_and_a_job_made_meanwhile_is_not_replaced() {
        let l = location("staged-race");
        let first = Staged::begin(&l).unwrap().unwrap();
        let busy = Staged::begin(&l).unwrap().err().expect("refused");
        assert!(
            busy.contains("another `plan` is building this job"),
            "{busy}"
        );
        // The job appears (another command created it) while the first builds it.
        PgManifest::open(&l, true).unwrap();
        let why = first.publish().unwrap().unwrap_err();
        assert!(why.contains("was created by another command"), "{why}");
        assert_eq!(schemas(&l), [format!("s3b_{}", l.job)], "scratch dropped");
        // Its lock was given back: a new builder starts (and finds the job there).
        let again = Staged::begin(&l).unwrap().unwrap();
        assert!(again.publish().unwrap().is_err());
    }
}
