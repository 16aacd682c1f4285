//! job::verify: the `verify` command: the destination compared with the source.
//!
//! May call: `verify`, `manifest`, `s3`, `ui`.

use super::JobError;
use crate::cli::VerifyArgs;
use crate::manifest::Manifest;
use crate::s3::{build, RetryPolicy, Side, Sides, Timeouts};
use crate::ui;
use crate::verify::{Verifier, VerifyError, VerifyReport};

/// `verify`: compares the destination with the source (each destination with the versions
/// the manifest selected for it, for jobs with a replication configuration, filters or a
/// supplied manifest).
pub async fn verify(args: &VerifyArgs) -> Result<VerifyReport, JobError> {
    let manifest = Manifest::open(&args.manifest, false)?;
    let mut settings = manifest.require_settings()?;
    // A supplied manifest (`--from-csv`/`--from-inventory`) selects too: the keys it names.
    let selected = settings.replication.is_some()
        || !settings.filters.is_empty()
        || settings.planned_from_supplied();
    args.overrides.apply(&mut settings);
    let timeouts = Timeouts::default();
    let (source, _) = build(Side::Source, &settings.source_side, timeouts).await;
    let (dest, _) = build(Side::Dest, &settings.dest_side, timeouts).await;
    let bar = ui::verify_spinner(ui::show_progress(args.no_progress));
    let sides = Sides::shared((source, dest), RetryPolicy::default(), 2, None);
    let verifier = Verifier {
        settings: &settings,
        source: &sides.source,
        dest: &sides.dest,
        deep: args.deep,
    };
    let show = |r: &VerifyReport| {
        bar.set_position(r.keys);
        bar.set_message(format!(
            "{} versions, {} differ",
            r.versions, r.mismatched_keys
        ));
    };
    let r = if selected {
        verifier
            .run_selected(&manifest, show)
            .await
            .map_err(|e| match e {
                VerifyError::S3(e) => JobError::from(e),
                VerifyError::Manifest(e) => JobError::Manifest(e),
            })
    } else {
        verifier
            .run(Some(&manifest), show)
            .await
            .map_err(|e| match e {
                VerifyError::S3(e) => JobError::from(e),
                VerifyError::Manifest(e) => JobError::Manifest(e),
            })
    };
    bar.finish_and_clear();
    r
}
