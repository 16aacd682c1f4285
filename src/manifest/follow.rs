//! manifest::follow: what `follow` keeps in the manifest besides tasks. The keys that events
//! named and no listing has read since (`follow_pending`: durable before an event is
//! acknowledged, so a killed `follow` finds them again), the kind of each listing generation
//! it started (`refresh_scope`: a scoped one lists only the pending keys it took), and the
//! lag of every version it wrote (`follow_lag`: destination write committed − the source
//! version's last-modified).
//!
//! A scoped refresh is a refresh generation whose partitions are single keys (start = the
//! key, end = the key followed by U+0000): the lister lists each with the key as prefix, and
//! the page that completes it settles the keys it did not find (a source without
//! versioning: deleted), removes the pending rows it covered, and puts back one partition
//! over the whole bucket (complete), so that the next full refresh lists everything.
//!
//! May call: `codec`, `keys`, the types of `manifest`.

use rusqlite::{params, Connection, OptionalExtension};

use super::codec::time_text;
use super::keys::Keys;
use super::{DbError, Result, SqliteManifest};

/// The tables of `follow`, created when it first starts (older manifests lack them).
pub(super) const FOLLOW_TABLES: &str = "
-- Keys named by events and not yet listed again; seq grows with each batch received.
CREATE TABLE IF NOT EXISTS follow_pending (
    key TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, -- when the oldest unlisted event of the key was received
    event_ms INTEGER -- the newest event's own time, when it said one
) WITHOUT ROWID;
-- One row per version written by `follow`.
CREATE TABLE IF NOT EXISTS follow_lag (
    task INTEGER PRIMARY KEY,
    dest INTEGER NOT NULL,
    done_ms INTEGER NOT NULL,
    lag_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS follow_lag_done ON follow_lag (done_ms);
-- Counters of `follow`, all runs.
CREATE TABLE IF NOT EXISTS follow_totals (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    events INTEGER NOT NULL DEFAULT 0, -- changes received
    started_ms INTEGER -- the first follow's start
);
";

/// What started a listing generation (none for `plan` and `plan --refresh`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshKind {
    /// The keys that events named (a scoped refresh).
    Events,
    /// `--poll-interval`: a full listing.
    Poll,
    /// The reconciler: a full listing that catches what events missed.
    Reconcile,
}

impl RefreshKind {
    fn as_str(self) -> &'static str {
        match self {
            RefreshKind::Events => "events",
            RefreshKind::Poll => "poll",
            RefreshKind::Reconcile => "reconcile",
        }
    }
}

/// One change received, as stored.
#[derive(Clone, Debug)]
pub struct PendingChange {
    /// The source key.
    pub key: String,
    /// The event's own time (unix ms), when it said one.
    pub event_ms: Option<i64>,
}

/// The pending keys a round takes: the keys, and the newest batch among them.
#[derive(Clone, Debug, Default)]
pub struct PendingKeys {
    /// Sorted.
    pub keys: Vec<String>,
    /// Rows with a seq up to this one are removed when the keys' listing completes.
    pub seq: i64,
}

/// Where `follow` stands, for `status` and `--until-caught-up`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FollowFacts {
    /// Whether `follow` ever ran on this job.
    pub followed: bool,
    /// Keys waiting to be listed.
    pub pending_keys: u64,
    /// When the oldest of them was received (unix ms).
    pub oldest_pending_ms: Option<i64>,
    /// Changes received, all runs.
    pub events: u64,
    /// Tasks the reconciler found (versions that events missed), all runs.
    pub found_by_reconcile: u64,
    /// The newest reconcile: its generation, start (unix s), tasks found, finished or not.
    pub last_reconcile: Option<(i64, i64, u64, bool)>,
}

/// Lag percentiles over a window.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct LagStats {
    /// Versions written.
    pub count: u64,
    /// Percentiles, ms (None when nothing was written).
    pub p50_ms: Option<i64>,
    /// 90th.
    pub p90_ms: Option<i64>,
    /// 99th.
    pub p99_ms: Option<i64>,
    /// 99.9th.
    pub p999_ms: Option<i64>,
    /// The largest.
    pub max_ms: Option<i64>,
    /// Share written within 15 minutes of their last-modified (0..1; None: nothing).
    pub within_15m: Option<f64>,
}

/// The lag as a cumulative histogram (for the metrics endpoint).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LagHistogram {
    /// Per bound (seconds, ascending): versions with lag ≤ the bound.
    pub cumulative: Vec<u64>,
    /// Sum of all lags, seconds.
    pub sum_secs: f64,
    /// Versions in all.
    pub count: u64,
}

const FIFTEEN_MINUTES_MS: i64 = 15 * 60 * 1000;

/// Unix ms now.
pub(super) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Unix ms of a listed last-modified text (RFC 3339).
fn time_ms(text: &str) -> Option<i64> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// Records the lag of a task just done (by the writer, in the transaction of its `Done`).
pub(super) fn record_lag(conn: &Connection, task: i64) -> rusqlite::Result<()> {
    let row: Option<(i64, Option<String>)> = conn
        .prepare_cached("SELECT dest, last_modified FROM task WHERE id = ?1")?
        .query_row([task], |r| {
            let text = time_text(r.get_ref(1)?).unwrap_or(None);
            Ok((r.get(0)?, text))
        })
        .optional()?;
    let Some((dest, Some(modified))) = row else {
        return Ok(());
    };
    let Some(modified_ms) = time_ms(&modified) else {
        return Ok(());
    };
    let done = now_ms();
    conn.prepare_cached(
        "INSERT OR REPLACE INTO follow_lag (task, dest, done_ms, lag_ms) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![task, dest, done, (done - modified_ms).max(0)])?;
    Ok(())
}

/// Whether the schema has a table or index of this name.
pub(super) fn has_table(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE name = ?1",
        [name],
        |r| r.get(0),
    )
}

/// The kind of generation `generation`, when `follow` started it.
pub(super) fn refresh_kind(conn: &Connection, generation: i64) -> rusqlite::Result<Option<String>> {
    if !has_table(conn, "refresh_scope")? {
        return Ok(None);
    }
    conn.prepare_cached("SELECT kind FROM refresh_scope WHERE generation = ?1")?
        .query_row([generation], |r| r.get(0))
        .optional()
}

/// For a scoped refresh whose listing just completed: the ids and keys of its keys that it
/// did not list (and that have tasks); removes the pending rows it covered and puts back
/// one complete partition over the whole bucket. None for any other generation.
pub(super) fn finish_scoped(
    conn: &Connection,
    keys: &mut Keys,
    generation: i64,
) -> std::result::Result<Option<Vec<(i64, String)>>, DbError> {
    if refresh_kind(conn, generation)?.as_deref() != Some(RefreshKind::Events.as_str()) {
        return Ok(None);
    }
    let scope: Vec<String> = conn
        .prepare("SELECT start_key FROM partitions WHERE start_key IS NOT NULL ORDER BY id")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut unlisted = Vec::new();
    for key in &scope {
        let Some(id) = keys.find(conn, key)? else {
            continue;
        };
        let seen: bool = conn
            .prepare_cached("SELECT count(*) > 0 FROM refresh_seen WHERE key_id = ?1")?
            .query_row([id], |r| r.get(0))?;
        if !seen {
            unlisted.push((id, key.clone()));
        }
    }
    let (seq, entries, pages): (i64, i64, i64) = conn.query_row(
        "SELECT pending_seq, entries, pages FROM refresh_scope WHERE generation = ?1",
        [generation],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    if has_table(conn, "follow_pending")? {
        let mut del =
            conn.prepare_cached("DELETE FROM follow_pending WHERE key = ?1 AND seq <= ?2")?;
        for key in &scope {
            del.execute(params![key, seq])?;
        }
    }
    conn.execute("DELETE FROM partitions", [])?;
    conn.execute(
        "INSERT INTO partitions (id, start_key, end_key, complete, pages, entries)
         VALUES (0, NULL, NULL, 1, ?1, ?2)",
        [pages, entries],
    )?;
    Ok(Some(unlisted))
}

/// The table of the kinds of generations `follow` started (part of the refresh tables).
pub(super) const SCOPE_TABLE: &str = "
-- Generations started by `follow`: their kind, and for a scoped one (kind 'events') the
-- pending rows it covers and the whole listing's totals to put back when it completes.
CREATE TABLE IF NOT EXISTS refresh_scope (
    generation INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    pending_seq INTEGER NOT NULL DEFAULT 0,
    entries INTEGER NOT NULL DEFAULT 0,
    pages INTEGER NOT NULL DEFAULT 0
);
";

/// The partition's end that holds exactly one key.
pub fn one_key_end(key: &str) -> String {
    format!("{key}\u{0}")
}

impl SqliteManifest {
    /// Creates `follow`'s tables (once) and records its first start.
    pub fn start_following(&self) -> Result<()> {
        self.write_tx(|tx| {
            tx.execute_batch(FOLLOW_TABLES)?;
            tx.execute(
                "INSERT OR IGNORE INTO follow_totals (id, events, started_ms) VALUES (1, 0, ?1)",
                [now_ms()],
            )?;
            Ok(())
        })
    }

    /// Stores changes received (one transaction: durable when this returns). A key already
    /// pending keeps its first time and gets the newest batch number.
    pub fn add_pending(&self, changes: &[PendingChange]) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        self.write_tx(|tx| {
            let seq: i64 = tx.query_row(
                "SELECT coalesce(max(seq), 0) + 1 FROM follow_pending",
                [],
                |r| r.get(0),
            )?;
            let now = now_ms();
            let mut stmt = tx.prepare_cached(
                "INSERT INTO follow_pending (key, seq, first_ms, event_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (key) DO UPDATE SET seq = excluded.seq,
                     event_ms = coalesce(excluded.event_ms, event_ms)",
            )?;
            for c in changes {
                stmt.execute(params![c.key, seq, now, c.event_ms])?;
            }
            tx.execute(
                "UPDATE follow_totals SET events = events + ?1 WHERE id = 1",
                [changes.len() as i64],
            )?;
            Ok(())
        })
    }

    /// Up to `limit` pending keys (oldest received first), and the newest batch among all.
    pub fn pending_keys(&self, limit: usize) -> Result<PendingKeys> {
        self.read_with(|conn| {
            if !has_table(conn, "follow_pending")? {
                return Ok(PendingKeys::default());
            }
            let seq: i64 = conn.query_row(
                "SELECT coalesce(max(seq), 0) FROM follow_pending",
                [],
                |r| r.get(0),
            )?;
            let mut keys: Vec<String> = conn
                .prepare_cached(
                    "SELECT key FROM follow_pending WHERE seq <= ?1 ORDER BY first_ms, key
                     LIMIT ?2",
                )?
                .query_map(params![seq, limit as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            keys.sort();
            Ok(PendingKeys { keys, seq })
        })
    }

    /// Starts a refresh of `kind`: a scoped one over `pending` (Events), a full one
    /// otherwise (see [`Manifest::start_refresh_of`]). None when the current listing is not
    /// complete (finish it first), or when a scoped refresh has no keys.
    pub fn start_follow_refresh(
        &mut self,
        kind: RefreshKind,
        pending: &PendingKeys,
        source_versioned: bool,
    ) -> Result<Option<i64>> {
        if kind == RefreshKind::Events && pending.keys.is_empty() {
            return Ok(None);
        }
        let totals = self.listing()?;
        let Some(generation) = self.start_refresh_of(source_versioned)? else {
            return Ok(None);
        };
        self.write_tx(|tx| {
            tx.execute_batch(SCOPE_TABLE)?;
            tx.execute(
                "INSERT OR REPLACE INTO refresh_scope (generation, kind, pending_seq, entries, pages)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    generation,
                    kind.as_str(),
                    pending.seq,
                    totals.entries as i64,
                    totals.pages as i64
                ],
            )?;
            if kind == RefreshKind::Events {
                tx.execute("DELETE FROM partitions", [])?;
                let mut ins = tx.prepare_cached(
                    "INSERT INTO partitions (start_key, end_key) VALUES (?1, ?2)",
                )?;
                for k in &pending.keys {
                    ins.execute(params![k, one_key_end(k)])?;
                }
            }
            Ok(())
        })?;
        Ok(Some(generation))
    }

    /// Where `follow` stands (all zero on a job it never ran on).
    pub fn follow_facts(&self) -> Result<FollowFacts> {
        self.read_with(|conn| {
            let mut f = FollowFacts::default();
            if has_table(conn, "follow_totals")? {
                let events: Option<i64> = conn
                    .query_row("SELECT events FROM follow_totals WHERE id = 1", [], |r| {
                        r.get(0)
                    })
                    .optional()?;
                f.followed = events.is_some();
                f.events = events.unwrap_or(0) as u64;
            }
            if has_table(conn, "follow_pending")? {
                let (n, oldest): (i64, Option<i64>) = conn.query_row(
                    "SELECT count(*), min(first_ms) FROM follow_pending",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                f.pending_keys = n as u64;
                f.oldest_pending_ms = oldest;
            }
            if has_table(conn, "refresh_scope")? {
                f.found_by_reconcile = conn.query_row(
                    "SELECT coalesce(sum(r.tasks), 0) FROM refreshes r
                     JOIN refresh_scope s ON s.generation = r.generation WHERE s.kind = ?1",
                    [RefreshKind::Reconcile.as_str()],
                    |r| r.get::<_, i64>(0),
                )? as u64;
                f.last_reconcile = conn
                    .query_row(
                        "SELECT r.generation, coalesce(r.started_at, 0), r.tasks,
                             coalesce(o.finished, 0)
                         FROM refreshes r JOIN refresh_scope s ON s.generation = r.generation
                         LEFT JOIN refresh_outcome o ON o.generation = r.generation
                         WHERE s.kind = ?1 ORDER BY r.generation DESC LIMIT 1",
                        [RefreshKind::Reconcile.as_str()],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64, r.get(3)?)),
                    )
                    .optional()?;
            }
            Ok(f)
        })
    }

    /// The generations `follow` started, by kind: (generation, kind, tasks added).
    pub fn follow_generations(&self) -> Result<Vec<(i64, String, u64)>> {
        self.read_with(|conn| {
            if !has_table(conn, "refresh_scope")? {
                return Ok(Vec::new());
            }
            let v = conn
                .prepare(
                    "SELECT r.generation, s.kind, r.tasks FROM refreshes r
                     JOIN refresh_scope s ON s.generation = r.generation ORDER BY r.generation",
                )?
                .query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(v)
        })
    }

    /// The lags of versions written since `since_ms` (all when None), ascending.
    fn lags(&self, since_ms: Option<i64>) -> Result<Vec<i64>> {
        self.read_with(|conn| {
            if !has_table(conn, "follow_lag")? {
                return Ok(Vec::new());
            }
            let v = conn
                .prepare_cached(
                    "SELECT lag_ms FROM follow_lag WHERE done_ms >= ?1 ORDER BY lag_ms",
                )?
                .query_map([since_ms.unwrap_or(i64::MIN)], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<i64>>>()?;
            Ok(v)
        })
    }

    /// Lag percentiles of the versions `follow` wrote since `since_ms` (all when None).
    pub fn lag_stats(&self, since_ms: Option<i64>) -> Result<LagStats> {
        Ok(lag_stats_of(&self.lags(since_ms)?))
    }

    /// The lag of every version `follow` wrote, as a cumulative histogram over
    /// `bounds_secs` (ascending).
    pub fn lag_histogram(&self, bounds_secs: &[f64]) -> Result<LagHistogram> {
        let lags = self.lags(None)?;
        let cumulative = bounds_secs
            .iter()
            .map(|b| {
                let bound_ms = (b * 1000.0).floor() as i64;
                lags.partition_point(|l| *l <= bound_ms) as u64
            })
            .collect();
        Ok(LagHistogram {
            cumulative,
            sum_secs: lags.iter().map(|l| *l as f64 / 1000.0).sum(),
            count: lags.len() as u64,
        })
    }
}

/// Percentiles of ascending lags (nearest rank).
pub fn lag_stats_of(sorted: &[i64]) -> LagStats {
    let n = sorted.len();
    if n == 0 {
        return LagStats::default();
    }
    let at = |p: f64| {
        let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
        Some(sorted[rank - 1])
    };
    let within = sorted.partition_point(|l| *l <= FIFTEEN_MINUTES_MS);
    LagStats {
        count: n as u64,
        p50_ms: at(0.50),
        p90_ms: at(0.90),
        p99_ms: at(0.99),
        p999_ms: at(0.999),
        max_ms: sorted.last().copied(),
        within_15m: Some(within as f64 / n as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_and_the_share_counts_fifteen_minutes() {
        let lags: Vec<i64> = (1..=1000).collect();
        let s = lag_stats_of(&lags);
        assert_eq!(s.count, 1000);
        assert_eq!(s.p50_ms, Some(500));
        assert_eq!(s.p99_ms, Some(990));
        assert_eq!(s.p999_ms, Some(999));
        assert_eq!(s.max_ms, Some(1000));
        assert_eq!(s.within_15m, Some(1.0));
        let s = lag_stats_of(&[10, FIFTEEN_MINUTES_MS + 1]);
        assert_eq!(s.within_15m, Some(0.5));
        assert_eq!(lag_stats_of(&[]), LagStats::default());
    }

    #[test]
    fn listed_times_with_and_without_milliseconds_are_read() {
        assert_eq!(time_ms("1970-01-01T00:00:01.000Z"), Some(1000));
        assert_eq!(time_ms("1970-01-01T00:00:01.250Z"), Some(1250));
        assert_eq!(time_ms("1970-01-01T00:00:02Z"), Some(2000));
        assert_eq!(time_ms("yesterday"), None);
    }
}
