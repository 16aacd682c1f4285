//! job::status: the `status` command (counts, the running run's rate and ETA, refreshes,
//! the estimate), as text or JSON.
//!
//! May call: `manifest`, `report`, `estimate`, `ui`, `events`.

use super::JobError;
use crate::cli::StatusArgs;
use crate::manifest::Manifest;
use crate::{estimate, ui};

/// `status`: counts and progress (works while a run is in progress).
pub fn status(args: &StatusArgs) -> Result<(), JobError> {
    let m = Manifest::open(&args.manifest, false)?;
    let settings = m.require_settings()?;
    let mut c = m.counts()?;
    c.etag_changes = m.etag_changes()?;
    c.etag_changed = c.etag_changes.values().sum();
    let now = crate::events::ticker::now_secs();
    let running = crate::events::ticker::fresh(m.run_progress()?, now);
    let estimate = estimate::of_manifest(&m, &settings, &args.estimate, c.total)?;
    if args.json {
        let json = |e: serde_json::Error| JobError::Other(e.to_string());
        let mut v = serde_json::to_value(&c).map_err(json)?;
        if let Some(o) = v.as_object_mut() {
            o.extend(running_fields(running.as_ref()));
        }
        v["estimate"] = serde_json::to_value(&estimate).map_err(json)?;
        println!("{}", serde_json::to_string(&v).map_err(json)?);
    } else {
        println!("{}", crate::report::status_text(&settings, &c));
        if let Some(p) = &running {
            println!("{}", crate::events::ticker::status_line(p, now));
        }
        for r in m.refreshes()?.iter().filter(|r| r.generation > 0) {
            println!("refresh {}: {} tasks added", r.generation, r.tasks);
            for line in ui::refresh_findings(r) {
                println!("refresh {}: {line}", r.generation);
            }
        }
        if let Some(line) = ui::deleted_at_source_line(&c) {
            println!("{line}");
        }
        for line in estimate.lines(Some(&c.requests)) {
            println!("{line}");
        }
    }
    Ok(())
}

/// The fields `status --json` adds for a run in progress (null when none): `eta` (seconds),
/// `rate` (tasks and bytes per second) and `running` (pid, when the snapshot was stored).
pub(super) fn running_fields(
    p: Option<&crate::manifest::RunProgress>,
) -> [(String, serde_json::Value); 3] {
    use serde_json::{json, Value};
    let rate = p.and_then(|p| Some((p.tasks_per_sec?, p.bytes_per_sec?)));
    [
        (
            "eta".into(),
            p.and_then(|p| p.eta_secs).map_or(Value::Null, Value::from),
        ),
        (
            "rate".into(),
            rate.map_or(
                Value::Null,
                |(t, b)| json!({"tasks_per_sec": t, "bytes_per_sec": b}),
            ),
        ),
        (
            "running".into(),
            p.map_or(
                Value::Null,
                |p| json!({"pid": p.pid, "updated_at": p.updated_at}),
            ),
        ),
    ]
}
