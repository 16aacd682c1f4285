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
    let follow = follow_status(&m)?;
    let fleet = fleet(&m)?;
    if args.json {
        let json = |e: serde_json::Error| JobError::Other(e.to_string());
        let mut v = serde_json::to_value(&c).map_err(json)?;
        if let Some(o) = v.as_object_mut() {
            o.extend(running_fields(running.as_ref()));
        }
        if let Some((workers, _)) = fleet {
            v["workers"] = workers;
        }
        v["estimate"] = serde_json::to_value(&estimate).map_err(json)?;
        if let Some(f) = &follow {
            v["follow"] = f.json.clone();
            v["lag"] = f.lag_json.clone();
        }
        crate::ui::outln!("{}", serde_json::to_string(&v).map_err(json)?);
    } else {
        crate::ui::outln!("{}", crate::report::status_text(&settings, &c));
        if let Some(p) = &running {
            crate::ui::outln!("{}", crate::events::ticker::status_line(p, now));
        }
        for line in fleet.iter().flat_map(|(_, lines)| lines) {
            crate::ui::outln!("{line}");
        }
        // A shared job is never followed (not supported on PostgreSQL in this version).
        let followed: std::collections::BTreeSet<i64> = match m.is_shared() {
            true => Default::default(),
            false => m
                .follow_generations()?
                .into_iter()
                .map(|(g, _, _)| g)
                .collect(),
        };
        for r in m
            .refreshes()?
            .iter()
            .filter(|r| r.generation > 0 && !followed.contains(&r.generation))
        {
            crate::ui::outln!("refresh {}: {} tasks added", r.generation, r.tasks);
            for line in ui::refresh_findings(r) {
                crate::ui::outln!("refresh {}: {line}", r.generation);
            }
        }
        for line in follow.iter().flat_map(|f| &f.lines) {
            crate::ui::outln!("{line}");
        }
        if let Some(line) = ui::deleted_at_source_line(&c) {
            crate::ui::outln!("{line}");
        }
        for line in estimate.lines(Some(&c.requests)) {
            crate::ui::outln!("{line}");
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

/// The processes working on a shared (PostgreSQL) job as `status` shows them: the rows for
/// `--json` (`workers`), and the text: how many run (and how many went silent), then one
/// line each. None for a SQLite file (one process at a time: its run's line says it all).
fn fleet(m: &Manifest) -> Result<Option<(serde_json::Value, Vec<String>)>, JobError> {
    let Manifest::Pg(p) = m else {
        return Ok(None);
    };
    let workers = p.workers()?;
    let running = workers.iter().filter(|w| w.running).count();
    let mut lines = vec![format!(
        "workers: {running} running, {} silent (no heartbeat for over 30s)",
        workers.len() - running
    )];
    for w in &workers {
        lines.push(format!(
            "worker {}:{} ({}): {}, {} units held, {} tasks done, {:.1} tasks/s, {}/s, last heartbeat {}s ago",
            w.host,
            w.pid,
            w.command,
            if w.running { "running" } else { "silent" },
            w.units,
            w.tasks_done,
            w.tasks_per_sec,
            indicatif::HumanBytes(w.bytes_per_sec.max(0.0).round() as u64),
            w.heartbeat_age_secs
        ));
    }
    let json = serde_json::to_value(&workers).map_err(|e| JobError::Other(e.to_string()))?;
    Ok(Some((json, lines)))
}

/// What `status` says of `follow` (None when it never ran on the job).
struct FollowStatus {
    lines: Vec<String>,
    json: serde_json::Value,
    lag_json: serde_json::Value,
}

fn follow_status(m: &Manifest) -> Result<Option<FollowStatus>, JobError> {
    use serde_json::json;
    if m.is_shared() {
        // `follow` does not run on a shared (PostgreSQL) job in this version.
        return Ok(None);
    }
    let f = m.follow_facts()?;
    if !f.followed {
        return Ok(None);
    }
    let now_ms = crate::events::ticker::now_secs() * 1000;
    let hour = m.lag_stats(Some(now_ms - 3_600_000))?;
    let all = m.lag_stats(None)?;
    let mut rounds: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for (_, kind, tasks) in m.follow_generations()? {
        let r = rounds.entry(kind).or_default();
        r.0 += 1;
        r.1 += tasks;
    }
    let oldest_age = f.oldest_pending_ms.map(|t| ((now_ms - t).max(0)) / 1000);
    let round_text: Vec<String> = rounds
        .iter()
        .map(|(k, (n, t))| format!("{n} {k} rounds ({t} tasks)"))
        .collect();
    let mut lines = vec![format!(
        "follow: {} changes received, {} keys pending{}; {}; {} tasks found by reconcile",
        f.events,
        f.pending_keys,
        oldest_age.map_or(String::new(), |a| format!(" (oldest {a}s)")),
        match round_text.is_empty() {
            true => "no rounds yet".to_string(),
            false => round_text.join(", "),
        },
        f.found_by_reconcile
    )];
    if let Some((g, started, tasks, finished)) = f.last_reconcile {
        let state = if finished { "finished" } else { "under way" };
        lines.push(format!(
            "follow: last reconcile (refresh {g}, started {}s ago) {state}, {tasks} tasks found",
            (now_ms / 1000 - started).max(0)
        ));
    }
    lines.push(format!("follow: last hour: {}", ui::lag_line(&hour)));
    lines.push(format!("follow: since start: {}", ui::lag_line(&all)));
    let rounds_json: serde_json::Map<String, serde_json::Value> = rounds
        .iter()
        .map(|(k, (n, t))| (k.clone(), json!({"rounds": n, "tasks": t})))
        .collect();
    let json = json!({
        "events": f.events,
        "pending_keys": f.pending_keys,
        "oldest_pending_age_secs": oldest_age,
        "found_by_reconcile": f.found_by_reconcile,
        "rounds": rounds_json,
        "last_reconcile": f.last_reconcile.map(|(g, started, tasks, finished)| json!({
            "generation": g, "started_at": started, "tasks": tasks, "finished": finished
        })),
    });
    let lag_json = json!({"last_hour": hour, "since_start": all});
    Ok(Some(FollowStatus {
        lines,
        json,
        lag_json,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::ticker::now_secs;

    /// A shared job's fleet: every process not stopped, running or silent, in JSON and text;
    /// a SQLite file has none.
    #[test]
    fn status_shows_a_shared_jobs_fleet() {
        let dir = tempfile::tempdir().unwrap();
        let file = Manifest::open(&dir.path().join("m.db"), true).unwrap();
        assert!(fleet(&file).unwrap().is_none());
        // A job of its own on the server `S3_BACKFILL_TEST_PG` names (none: nothing more).
        let Ok(base) = std::env::var("S3_BACKFILL_TEST_PG") else {
            return;
        };
        let name = format!("status-fleet-{}-{}", std::process::id(), now_secs());
        let job = std::path::PathBuf::from(format!("{base}?job={name}"));
        let m = Manifest::open(&job, true).unwrap();
        let (json, lines) = fleet(&m).unwrap().unwrap();
        assert_eq!((json, lines.len()), (serde_json::json!([]), 1));
        // The rows a run's heartbeat keeps, written here by hand.
        let mut c = postgres::Client::connect(&base, postgres::NoTls).unwrap();
        c.batch_execute(&format!(
            "SET search_path TO \"s3b_{name}\";
             INSERT INTO workers (host, pid, command, started_at, heartbeat_at, stopped_at,
                units, tasks_done, tasks_per_sec, bytes_per_sec) VALUES
             ('a', 11, 'run', 1, extract(epoch FROM now())::bigint - 2, NULL, 3, 40, 12.5, 2048),
             ('b', 22, 'replicate', 2, extract(epoch FROM now())::bigint - 600, NULL, 1, 5, 0, 0),
             ('c', 33, 'run', 3, extract(epoch FROM now())::bigint, 5, 0, 9, 0, 0)"
        ))
        .unwrap();
        let (json, lines) = fleet(&m).unwrap().unwrap();
        let rows = json.as_array().unwrap();
        assert_eq!(rows.len(), 2, "the stopped process is not listed: {json}");
        assert_eq!(
            (
                &rows[0]["host"],
                &rows[0]["pid"],
                &rows[0]["units"],
                &rows[0]["running"]
            ),
            (&"a".into(), &11.into(), &3.into(), &true.into())
        );
        assert_eq!(rows[0]["tasks_per_sec"], 12.5);
        assert_eq!(
            (&rows[1]["command"], &rows[1]["running"]),
            (&"replicate".into(), &false.into())
        );
        assert!(rows[1]["heartbeat_age_secs"].as_i64().unwrap() >= 600);
        assert_eq!(
            lines[0],
            "workers: 1 running, 1 silent (no heartbeat for over 30s)"
        );
        assert!(
            lines[1].starts_with("worker a:11 (run): running, 3 units held, 40 tasks done, 12.5 tasks/s, 2.00 KiB/s, last heartbeat "),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].starts_with("worker b:22 (replicate): silent, 1 units held"),
            "{}",
            lines[2]
        );
    }
}
