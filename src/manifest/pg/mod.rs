//! manifest::pg: the manifest in PostgreSQL (`--manifest postgres://...?job=NAME`), shared
//! by any number of processes on any hosts. The same contract as the SQLite file (the
//! methods of [`PgManifest`] are `SqliteManifest`'s), plus leased units of work for runs
//! (see `run`).
//!
//! Each connection lives on a thread of its own (`Db`): the manifest's calls are
//! synchronous, as SQLite's are, and may come from async code, where blocking on a runtime
//! of the client's own is not allowed; a call sends a closure to the thread and waits for
//! its answer. A job is a schema (`s3b_<job>`) with SQLite's tables (`schema`); the jobs of
//! a database are listed in `public.s3b_jobs`.
//!
//! Scratch jobs: a job planned from a supplied manifest is built in the schema
//! `s3b_<job>~planning` (`~` is not allowed in a job name, so no job has it), not listed in
//! `public.s3b_jobs`, and renamed to `s3b_<job>` and listed there in one transaction once
//! complete (`staged`).
//!
//! Layout: `schema` (tables), `plan` (settings, parts, pages, units made as pages are
//! listed), `read` (counts, tasks, problems, reports), `run` (claims of units, the run's
//! writer, leases, heartbeats, fencing), `staged` (a job built whole under its scratch name,
//! then given its own), `unsupported` (what a PostgreSQL job does not do yet, each with one
//! clear error).
//!
//! May call: `manifest::codec`, the types of `manifest`, `crate::config::JobSettings`.

pub(crate) mod limits;
mod plan;
mod read;
pub(crate) mod run;
mod schema;
pub mod staged;
mod unsupported;

use std::sync::mpsc;

use postgres::{Client, NoTls};

use super::backend::PgLocation;
use super::{ManifestError, Result, Writer};
use crate::config::JobSettings;

/// A closure run on a connection's thread.
type Call = Box<dyn FnOnce(&mut Client) + Send>;

/// One connection, owned by a thread of its own (see the module header).
pub(crate) struct Db {
    tx: mpsc::Sender<Call>,
    shown: String,
}

impl Db {
    /// Connects to `l`'s database, with the job's schema first on the search path when
    /// `schema` is given.
    pub(crate) fn connect(l: &PgLocation, schema: Option<&str>) -> Result<Db> {
        let (tx, rx) = mpsc::channel::<Call>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let url = l.url.clone();
        let search_path = schema.map(|s| format!("SET search_path TO {s}, public"));
        std::thread::Builder::new()
            .name("manifest-pg".into())
            .spawn(move || {
                let connected = Client::connect(&url, NoTls).and_then(|mut c| {
                    if let Some(sql) = &search_path {
                        c.batch_execute(sql)?;
                    }
                    Ok(c)
                });
                let mut client = match connected {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(call) = rx.recv() {
                    call(&mut client);
                }
            })
            .map_err(|e| ManifestError::Io {
                path: l.shown.clone(),
                what: "cannot start the connection's thread",
                source: e,
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Db {
                tx,
                shown: l.shown.clone(),
            }),
            Ok(Err(source)) => Err(ManifestError::Pg {
                path: l.shown.clone(),
                source,
            }),
            Err(_) => Err(ManifestError::WriterGone(format!(
                "{}: the connection's thread stopped",
                l.shown
            ))),
        }
    }

    /// Runs `f` on the connection and returns its answer; errors name the manifest.
    pub(crate) fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> std::result::Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T> {
        self.call_with(move |c| f(c).map_err(PgError::Pg))
    }

    /// [`Db::call`] for a closure with errors of its own ([`PgError`]).
    pub(crate) fn call_with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> std::result::Result<T, PgError> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        let call: Call = Box::new(move |c| {
            let _ = tx.send(f(c));
        });
        let gone = || ManifestError::WriterGone(format!("{}: the connection closed", self.shown));
        self.tx.send(call).map_err(|_| gone())?;
        match rx.recv() {
            Ok(r) => r.map_err(|e| e.at(&self.shown)),
            Err(_) => Err(gone()),
        }
    }

    /// The manifest's name for messages.
    #[allow(dead_code)] // the run writer names the manifest with it
    pub(crate) fn shown(&self) -> &str {
        &self.shown
    }
}

/// An error inside one PostgreSQL operation, before the manifest is named.
#[derive(Debug)]
#[allow(dead_code)] // Io: streamed reports; LeaseLost: the run writer
pub(crate) enum PgError {
    /// PostgreSQL failed.
    Pg(postgres::Error),
    /// A row holds a value this build does not know.
    Bad(String),
    /// A caller's stream failed.
    Io(&'static str, std::io::Error),
    /// The lease the write was made under is gone.
    LeaseLost(String),
}

impl From<postgres::Error> for PgError {
    fn from(e: postgres::Error) -> PgError {
        PgError::Pg(e)
    }
}

impl PgError {
    fn at(self, shown: &str) -> ManifestError {
        let path = shown.to_string();
        match self {
            PgError::Pg(source) => ManifestError::Pg { path, source },
            PgError::Bad(v) => ManifestError::BadState(path, v),
            PgError::Io(what, source) => ManifestError::Io { path, what, source },
            PgError::LeaseLost(why) => ManifestError::LeaseLost(path, why),
        }
    }
}

/// A job's manifest in PostgreSQL (see the module header).
pub struct PgManifest {
    db: Db,
    location: PgLocation,
    /// The listing parts this handle claimed and has not given back (id, lease epoch):
    /// given back when it is dropped, so a graceful stop or an error leaves no part leased
    /// for a lease's length (a killed process's parts wait for their leases to run out).
    parts: std::sync::Mutex<Vec<(i64, i64)>>,
}

impl Drop for PgManifest {
    fn drop(&mut self) {
        let held = std::mem::take(self.parts.get_mut().unwrap_or_else(|e| e.into_inner()));
        for (id, epoch) in held {
            // Nothing more to do should this fail: the lease runs out by itself.
            let _ = self.release_partition(id, epoch);
        }
    }
}

fn now_secs() -> i64 {
    super::now_secs()
}

impl PgManifest {
    /// Whether the job exists in its database.
    pub fn job_exists(l: &PgLocation) -> Result<bool> {
        let db = Db::connect(l, None)?;
        let job = l.job.clone();
        db.call(move |c| {
            let registry = c
                .query_one("SELECT to_regclass('public.s3b_jobs') IS NOT NULL", &[])?
                .get::<_, bool>(0);
            if !registry {
                return Ok(false);
            }
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM public.s3b_jobs WHERE name = $1",
                    &[&job],
                )?
                .get(0);
            Ok(n > 0)
        })
    }

    /// Opens the job, or creates its schema and tables when `create` is true (several
    /// processes creating it at once are serialized by an advisory lock).
    pub fn open(l: &PgLocation, create: bool) -> Result<PgManifest> {
        let schema = schema::schema_of(&l.job);
        let path = format!("SET search_path TO {schema}, public");
        let db = Db::connect(l, None)?;
        let job = l.job.clone();
        let shown = l.shown.clone();
        let made = db.call_with(move |c| {
            let mut tx = c.transaction()?;
            // One creator at a time, database-wide (released at commit).
            tx.batch_execute(JOBS_REGISTRY)?;
            let exists = tx
                .query_opt("SELECT schema_version FROM public.s3b_jobs WHERE name = $1", &[&job])?
                .map(|r| r.get::<_, i64>(0));
            match exists {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(PgError::Bad(format!(
                        "job schema version {v}, newer than this s3-backfill understands ({SCHEMA_VERSION}); use a newer s3-backfill"
                    )))
                }
                Some(_) => {}
                None if !create => return Ok(false),
                None => {
                    tx.batch_execute(&format!(
                        "CREATE SCHEMA {schema}; SET LOCAL search_path TO {schema};"
                    ))?;
                    tx.batch_execute(&schema::tables())?;
                    list_job(&mut tx, &job)?;
                }
            }
            tx.commit()?;
            Ok(true)
        })?;
        if !made {
            return Err(ManifestError::Missing(shown));
        }
        // The same connection goes on in the job's schema (a new one costs the database a
        // backend's start and first statements: about 10 ms of its CPU in the bench).
        db.call(move |c| c.batch_execute(&path))?;
        Ok(PgManifest {
            db,
            location: l.clone(),
            parts: Default::default(),
        })
    }

    /// The manifest's name as given (the URL without its password, and the job).
    pub fn path(&self) -> &str {
        &self.location.shown
    }

    /// Where the job is.
    #[allow(dead_code)] // the heartbeat connects with it
    pub(crate) fn location(&self) -> &PgLocation {
        &self.location
    }

    /// The stored job settings, if `plan` stored them.
    pub fn settings(&self) -> Result<Option<JobSettings>> {
        let s: Option<String> = self.db.call(|c| {
            Ok(c.query_opt("SELECT settings FROM job WHERE id = 1", &[])?
                .map(|r| r.get(0)))
        })?;
        match s {
            None => Ok(None),
            Some(s) => serde_json::from_str(&s)
                .map(Some)
                .map_err(|e| ManifestError::BadSettings(self.path().to_string(), e.to_string())),
        }
    }

    /// The stored settings; an error when there are none.
    pub fn require_settings(&self) -> Result<JobSettings> {
        self.settings()?
            .ok_or_else(|| ManifestError::NotAManifest(self.path().to_string()))
    }

    /// Stores (or replaces) the job settings, and the job's destination as destination 0.
    pub fn store_settings(&self, s: &JobSettings) -> Result<()> {
        let bad = |e: serde_json::Error| {
            ManifestError::BadSettings(self.path().to_string(), e.to_string())
        };
        let json = serde_json::to_string(s).map_err(bad)?;
        let mut dests = vec![(0i64, s.dest.bucket.clone(), s.dest.prefix.clone(), None)];
        for (id, d) in s.destinations.iter().enumerate() {
            let options = serde_json::to_string(&d.options).map_err(bad)?;
            dests.push((id as i64, d.bucket.clone(), d.prefix.clone(), Some(options)));
        }
        self.db.call(move |c| {
            let mut tx = c.transaction()?;
            tx.execute(
                "INSERT INTO job (id, settings, created_at) VALUES (1, $1, $2)
                 ON CONFLICT (id) DO UPDATE SET settings = excluded.settings",
                &[&json, &now_secs()],
            )?;
            for (id, bucket, prefix, options) in &dests {
                tx.execute(
                    "INSERT INTO destinations (id, bucket, prefix, options)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (id) DO UPDATE SET bucket = excluded.bucket,
                     prefix = excluded.prefix, options = excluded.options",
                    &[id, bucket, prefix, options],
                )?;
            }
            tx.commit()
        })
    }

    /// Nothing to do: PostgreSQL waits for row locks by itself.
    pub fn wait_for_locks_briefly(&self) -> Result<()> {
        Ok(())
    }

    /// Starts this process's run writer: it claims leased units, heartbeats, and writes
    /// results under its leases (see `run`).
    pub fn into_writer(self) -> Writer {
        run::start(self)
    }
}

impl PgManifest {
    /// Claims the next listing part that no live process lists (unfinished, and not leased,
    /// or its lease expired: its lister died); its id and lease epoch. Its listing goes on
    /// from its checkpoint.
    pub fn claim_partition(&self) -> Result<Option<(i64, i64)>> {
        let lease = run::lease_secs();
        self.db
            .call(move |c| {
                let row = c.query_opt(
                    "UPDATE partitions p SET lease = nextval('lease_epochs'),
                    lease_expires = extract(epoch FROM clock_timestamp())::bigint + $1
                 WHERE p.id = (SELECT id FROM partitions WHERE NOT complete
                        AND (lease_expires IS NULL
                             OR lease_expires < extract(epoch FROM clock_timestamp()))
                        ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
                 RETURNING p.id, p.lease",
                    &[&lease],
                )?;
                Ok(row.map(|r| (r.get(0), r.get(1))))
            })
            .inspect(|claimed| {
                if let Some(part) = claimed {
                    self.held_parts().push(*part);
                }
            })
    }

    /// The listing parts this handle holds (see `parts`).
    fn held_parts(&self) -> std::sync::MutexGuard<'_, Vec<(i64, i64)>> {
        self.parts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Renews the lease of a part this process lists (before each page it commits): false
    /// when another process took it over (this one was paused past its lease).
    pub fn renew_partition(&self, id: i64, epoch: i64) -> Result<bool> {
        let lease = run::lease_secs();
        self.db.call(move |c| {
            let n = c.execute(
                "UPDATE partitions SET
                    lease_expires = extract(epoch FROM clock_timestamp())::bigint + $3
                 WHERE id = $1 AND lease = $2",
                &[&id, &epoch, &lease],
            )?;
            Ok(n == 1)
        })
    }

    /// Gives a part back (its listing stopped before the end: another process, or a later
    /// run, continues it from its checkpoint).
    pub fn release_partition(&self, id: i64, epoch: i64) -> Result<()> {
        self.held_parts().retain(|p| *p != (id, epoch));
        self.db.call(move |c| {
            c.execute(
                "UPDATE partitions SET lease = NULL, lease_expires = NULL
                 WHERE id = $1 AND lease = $2",
                &[&id, &epoch],
            )
            .map(drop)
        })
    }
}

/// The version of a job's tables this build writes and reads.
pub const SCHEMA_VERSION: i64 = 1;

/// The first statements of a transaction that creates a job: one creator at a time,
/// database-wide (the lock is released at commit), and the list of jobs made if missing.
const JOBS_REGISTRY: &str = "SELECT pg_advisory_xact_lock(7310471301);
    CREATE TABLE IF NOT EXISTS public.s3b_jobs (
        name TEXT PRIMARY KEY, created_at BIGINT NOT NULL,
        schema_version BIGINT NOT NULL)";

/// Lists job `job` in `public.s3b_jobs` (in a transaction that began with
/// [`JOBS_REGISTRY`]).
fn list_job(
    tx: &mut postgres::Transaction<'_>,
    job: &str,
) -> std::result::Result<(), postgres::Error> {
    tx.execute(
        "INSERT INTO public.s3b_jobs (name, created_at, schema_version) VALUES ($1, $2, $3)",
        &[&job, &now_secs(), &SCHEMA_VERSION],
    )
    .map(drop)
}
