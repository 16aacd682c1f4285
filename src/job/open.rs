//! job::open: what `plan` and `replicate` do before listing: the job's settings (with
//! `--replication-config source`, the source's own rules), the existing manifest checked
//! against them, every bucket probed, the handles made, the manifest created.
//!
//! [`PlanJob::open`] runs settings → lock → manifest checks; [`PlanJob::reach`] the clients
//! and probes; the [`Job`] it gives hands out the stages (lister, selector, a supplied
//! manifest's planner) and the manifest.
//!
//! May call: every stage.

use super::{bucket_error, lock_manifest, open_side, preflight, JobError, ManifestLock};
use crate::lister::supplied::SuppliedJob;
use crate::lister::Lister;
use crate::select::Selector;
use std::path::Path;

use crate::cli::PlanArgs;
use crate::config::{JobSettings, SideConfig};
use crate::estimate;
use crate::manifest::Manifest;
use crate::s3::{build, BucketFacts, RetryPolicy, S3Error, SdkClient, Side, Sides, Timeouts, S3};

/// An existing manifest of this job, checked: None when there is none yet.
fn existing_manifest(
    args: &PlanArgs,
    settings: &JobSettings,
) -> Result<Option<Manifest>, JobError> {
    let location = crate::manifest::Location::of(&args.manifest).map_err(JobError::Usage)?;
    if !location.exists()? {
        return Ok(None);
    }
    // `create`: a plan killed while creating the file left it empty; this plan creates it.
    let m = Manifest::open(&args.manifest, true)?;
    if let Some(stored) = m.settings()? {
        if let Some(diff) = settings.identity_differs(&stored) {
            return Err(JobError::Usage(format!(
                "manifest {} belongs to another job: this plan has {diff}; use a new --manifest, or the same arguments to continue it",
                crate::manifest::shown(&args.manifest)
            )));
        }
        change_copy_settings(args, &m, stored, settings)?;
    }
    Ok(Some(m))
}

/// Copy settings other than the job's: each change said in one line; refused on a job
/// whose tasks started or finished (their copies were made with the stored settings, and
/// an attempt in doubt must be found as it was written) unless `--change-copy-settings`;
/// otherwise stored, so that every later run (a `replicate` on a complete listing too)
/// copies with them.
fn change_copy_settings(
    args: &PlanArgs,
    m: &Manifest,
    mut stored: JobSettings,
    settings: &JobSettings,
) -> Result<(), JobError> {
    let changes = settings.copy.changes_from(&stored.copy);
    if changes.is_empty() {
        return Ok(());
    }
    let c = m.counts()?;
    let worked = c.done + c.in_progress + c.failed + c.skipped;
    if (worked > 0 || c.attempts > 0) && !args.change_copy_settings {
        for line in &changes {
            crate::say!("copy setting {line}");
        }
        return Err(JobError::Usage(format!(
            "manifest {} has {worked} tasks started or finished with its own copy settings, and this command changes them (above); pass --change-copy-settings to change them, or give the job's settings to continue it",
            crate::manifest::shown(&args.manifest)
        )));
    }
    for line in &changes {
        crate::say!("copy setting changed: {line}");
    }
    stored.copy = settings.copy.clone();
    m.store_settings(&stored)?;
    Ok(())
}

/// Whether the manifest's listing is already complete (said in one line).
pub(super) fn listing_done(m: Option<&Manifest>, path: &Path) -> Result<bool, JobError> {
    let Some(m) = m else { return Ok(false) };
    if !m.listing()?.complete {
        return Ok(false);
    }
    let c = m.counts()?;
    crate::say!(
        "listing already complete: {} tasks in {}; nothing to do (use `run`)",
        c.total,
        path.display()
    );
    Ok(true)
}

/// `--replication-config source`: the source bucket's own configuration.
async fn replication_from_source(
    source: &SdkClient,
    settings: &mut JobSettings,
) -> Result<(), JobError> {
    let bucket = settings.source.bucket.clone();
    let xml = preflight(source).bucket_replication(&bucket).await?;
    let from = format!("replication configuration of bucket {bucket}");
    let cfg = crate::rules::ReplicationConfig::from_xml(&xml)
        .map_err(|e| JobError::Usage(format!("{from}: {e}")))?;
    crate::select::use_replication_config(settings, cfg, &from)?;
    Ok(())
}

/// The source's client, and destination 0's client and facts; every other destination bucket
/// of a replication configuration is probed too (the job's destinations are versioned only
/// when all are).
async fn plan_clients(
    settings: &mut JobSettings,
    source: Option<SdkClient>,
) -> Result<(SdkClient, SdkClient, BucketFacts), JobError> {
    let timeouts = Timeouts::default();
    let source = match source {
        Some(c) => c,
        None => {
            let bucket = settings.source.bucket.clone();
            open_side(Side::Source, &mut settings.source_side, &bucket, timeouts)
                .await?
                .0
        }
    };
    let bucket = settings.dest.bucket.clone();
    let (dest, mut facts) =
        open_side(Side::Dest, &mut settings.dest_side, &bucket, timeouts).await?;
    let mut others: Vec<String> = settings
        .destinations
        .iter()
        .map(|d| d.bucket.clone())
        .collect();
    others.retain(|b| *b != bucket);
    others.sort();
    others.dedup();
    for b in others {
        let (f, _) = probe_other_dest(&dest, &settings.dest_side, &b, timeouts)
            .await
            .map_err(|e| bucket_error(Side::Dest, &b, e))?;
        facts.versioned &= f.versioned;
    }
    Ok((source, dest, facts))
}

/// Probes a destination bucket other than destination 0 with destination 0's client; a
/// bucket in another region (S3's 301 naming it) is probed again there, and the client of
/// that region is returned too (counting its requests with `dest`'s).
pub(super) async fn probe_other_dest(
    dest: &SdkClient,
    side: &SideConfig,
    bucket: &str,
    timeouts: Timeouts,
) -> Result<(BucketFacts, Option<SdkClient>), S3Error> {
    match preflight(dest).req().probe_bucket(bucket).await {
        Err(e) if e.status == Some(301) && e.bucket_region.is_some() => {
            let mut there = side.clone();
            there.region = e.bucket_region.clone();
            let (client, _) = build(Side::Dest, &there, timeouts).await;
            let client = client
                .counting_in(dest.counts())
                .limited_by(dest.bandwidth());
            let facts = preflight(&client).req().probe_bucket(bucket).await?;
            Ok((facts, Some(client)))
        }
        r => r.map(|f| (f, None)),
    }
}

/// What the estimate needs to know of the buckets (see [`estimate::PlanProbe`]): the source's
/// object lock is read (one request) only where a small version may be copied in one
/// request (it then keeps the HEAD of every version).
async fn plan_probe(
    settings: &JobSettings,
    source: &S3<SdkClient>,
    dest: &BucketFacts,
) -> estimate::PlanProbe {
    let one_request = !settings.copy.stamp && settings.copy.sse.is_some();
    let source_lock = match one_request {
        true => source
            .req()
            .object_lock_enabled(&settings.source.bucket)
            .await
            .ok()
            .or(Some(true)),
        false => None,
    };
    estimate::PlanProbe {
        rgw: dest.rgw,
        dest_versioned: dest.versioned,
        source_lock,
        listing: source.requests().mean_listing(),
    }
}

/// The job's settings; with `--replication-config source` also the source's client (the
/// source bucket's configuration is needed before the job is known).
async fn plan_settings(args: &PlanArgs) -> Result<(JobSettings, Option<SdkClient>), JobError> {
    let mut settings = args.settings()?;
    if args.replication_config.as_deref() != Some("source") {
        return Ok((settings, None));
    }
    let bucket = settings.source.bucket.clone();
    let (c, _) = open_side(
        Side::Source,
        &mut settings.source_side,
        &bucket,
        Timeouts::default(),
    )
    .await?;
    replication_from_source(&c, &mut settings).await?;
    Ok((settings, Some(c)))
}

/// Refuses a `--refresh` that cannot be done: no job yet, or a job planned from a supplied
/// manifest (there is no listing to repeat).
fn check_refresh(
    args: &PlanArgs,
    existing: Option<&Manifest>,
    settings: &JobSettings,
) -> Result<(), JobError> {
    if !args.refresh {
        return Ok(());
    }
    if existing.is_none() {
        return Err(JobError::Usage(format!(
            "--refresh catches up an existing job, but {} does not exist; plan it first",
            crate::manifest::shown(&args.manifest)
        )));
    }
    if settings.planned_from_supplied() {
        return Err(JobError::Usage(
            "a job planned from a supplied manifest cannot be refreshed by listing; plan a new job from the new manifest".into(),
        ));
    }
    Ok(())
}

/// A plan's job, opened: its settings and, for a plan that writes, the manifest's lock held
/// and the existing manifest checked against the settings.
pub(super) struct PlanJob<'a> {
    args: &'a PlanArgs,
    settings: JobSettings,
    /// The source's client when `--replication-config source` needed it already.
    source: Option<SdkClient>,
    existing: Option<Manifest>,
    lock: Option<ManifestLock>,
}

impl<'a> PlanJob<'a> {
    /// For `--dry-run`: the settings only (nothing is locked, nothing written).
    pub(super) async fn open_dry(args: &'a PlanArgs) -> Result<PlanJob<'a>, JobError> {
        let (settings, source) = plan_settings(args).await?;
        Ok(PlanJob {
            args,
            settings,
            source,
            existing: None,
            lock: None,
        })
    }

    /// Settings → lock → the existing manifest checked (another job's is refused; changed
    /// copy settings said and stored) → `--refresh` checked.
    pub(super) async fn open(args: &'a PlanArgs) -> Result<PlanJob<'a>, JobError> {
        let mut job = PlanJob::open_dry(args).await?;
        job.lock = Some(lock_manifest(&args.manifest)?);
        job.existing = existing_manifest(args, &job.settings)?;
        check_refresh(args, job.existing(), &job.settings)?;
        Ok(job)
    }

    /// The existing manifest, if any.
    pub(super) fn existing(&self) -> Option<&Manifest> {
        self.existing.as_ref()
    }

    /// The manifest's lock, kept by a command that goes on without this job.
    pub(super) fn into_lock(self) -> Option<ManifestLock> {
        self.lock
    }

    /// Every bucket reached and probed (a new manifest is only created once they answered,
    /// so a mistyped bucket leaves no manifest behind), and the handles made: both sides
    /// under one loop with at most `in_flight` requests in flight.
    pub(super) async fn reach(self, in_flight: usize) -> Result<Job<'a>, JobError> {
        let mut settings = self.settings;
        let (source, dest, facts) = plan_clients(&mut settings, self.source).await?;
        let sides = Sides::shared((source, dest), RetryPolicy::default(), in_flight, None);
        Ok(Job {
            args: self.args,
            settings,
            sides,
            dest: facts,
            existing: self.existing,
            _lock: self.lock,
        })
    }
}

/// A plan's job with its buckets reached (see [`PlanJob::reach`]): it hands out the stages.
pub(super) struct Job<'a> {
    /// The command's arguments.
    pub(super) args: &'a PlanArgs,
    /// The job's settings, with the regions found.
    pub(super) settings: JobSettings,
    /// The source's and destination 0's handles.
    pub(super) sides: Sides<SdkClient>,
    /// What the destinations are (versioned only when all are).
    pub(super) dest: BucketFacts,
    existing: Option<Manifest>,
    _lock: Option<ManifestLock>,
}

impl Job<'_> {
    /// Whether the destination keeps versions (else a key with several is refused).
    pub(super) fn dest_versioned(&self) -> bool {
        self.dest.versioned || self.settings.selection.latest_only
    }

    /// The lister of the source, with its selector.
    pub(super) fn lister(&self) -> Lister<'_, SdkClient> {
        let sides = &self.sides;
        let mut lister = Lister::new(
            &self.settings,
            &sides.source,
            Some(&sides.dest),
            self.dest_versioned(),
        );
        lister.page_size = self.args.list_page_size;
        lister
    }

    /// The selector alone (a dry run selects without a manifest).
    pub(super) fn selector(&self) -> Selector<'_, SdkClient> {
        Selector {
            settings: &self.settings,
            source: &self.sides.source,
            dest: Some(&self.sides.dest),
        }
    }

    /// The planner of a supplied manifest (`--from-csv`, `--from-inventory`).
    pub(super) fn supplied(&self, dest_versioned: bool) -> SuppliedJob<'_, SdkClient> {
        SuppliedJob {
            source: &self.sides.source,
            dest: Some(&self.sides.dest),
            settings: &self.settings,
            manifest: &self.args.manifest,
            dest_versioned,
        }
    }

    /// The manifest's lock, kept by a command that goes on without this job.
    pub(super) fn into_lock(self) -> Option<ManifestLock> {
        self._lock
    }

    /// Whether a manifest of this job exists already.
    pub(super) fn has_manifest(&self) -> bool {
        self.existing.is_some()
    }

    /// The manifest: the existing one, or a new one; the job's settings stored in it when
    /// they are new or changed (e.g. a moved endpoint).
    pub(super) fn manifest(&mut self) -> Result<Manifest, JobError> {
        let m = match self.existing.take() {
            Some(m) => m,
            None => Manifest::open(&self.args.manifest, true)?,
        };
        if m.settings()?.as_ref() != Some(&self.settings) {
            m.store_settings(&self.settings)?;
        }
        Ok(m)
    }

    /// What the estimate needs to know of the buckets.
    pub(super) async fn estimate_probe(&self) -> estimate::PlanProbe {
        plan_probe(&self.settings, &self.sides.source, &self.dest).await
    }
}
