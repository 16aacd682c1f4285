//! manifest::pg::limits: `--max-rps` and `--max-bandwidth` for a whole PostgreSQL job, every
//! process of it together, with one AIMD on throttling shared by all.
//!
//! Each process that limits something keeps a row in `rate_shares` ([`JobLimits`]). Once a
//! second, on a connection of its own, it renews its row (the database's clock), reads how
//! many processes are live (rows renewed in the last [`LIVE_SECS`]) and the job's factor of
//! `--max-rps` (`rate_state`), and steps the factor ([`aimd`]): halved when it saw a
//! throttling answer since its last tick, at most once per [`CUT_PERIOD`] for the whole
//! job, grown back by [`RISE_PER_SEC`] a second otherwise, kept in
//! [`MIN_FACTOR`]`..=1`. The step is written by compare-and-set on the state's revision, so
//! a cut or a growth is made once whoever makes it.
//!
//! The job's budget, `--max-rps × factor`, is split among the live processes by what each
//! wants ([`want`], written in its row): a process that used most of its pace last second
//! wants as much as it can get; one that used less (waiting for work, or bound by its
//! requests in flight) wants twice what it used, at least a tenth of an equal share. The
//! split ([`split`]) fills the smaller wants and shares the rest equally among the others
//! (max-min fairness); what nobody wants is spread equally on top, so the shares always add
//! up to the budget: with every process busy, `--max-rps × factor / live` each. A process
//! that gets work again uses its small share up and wants more at its next tick. The
//! bandwidth is split equally (`1 / live` of `--max-bandwidth`; bytes are not what a
//! throttling answer is about: the factor is for requests only).
//! A process that stops deletes its row; one that dies or is paused stops being counted
//! after [`LIVE_SECS`], and the others take its share at their next tick.
//!
//! Every process of a job is expected to be given the same limits; each splits its own.
//! Each computes its own share from the others' rows as they were at their last tick, so
//! for up to a tick after a process joins or starts wanting more, the shares may add up to
//! more than the budget by that process's share. When the database cannot be reached, a
//! process keeps the share it last set and tries again at the next tick.
//!
//! May call: `s3::retry` (the pacer), `s3::bandwidth` (the share), `pg::schema`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_postgres::Client;

use crate::manifest::backend::PgLocation;
use crate::manifest::pg_error as pg;
use crate::s3::bandwidth::Bandwidth;
use crate::s3::Retrier;

/// How often a process renews its share.
pub(crate) const TICK: Duration = Duration::from_secs(1);
/// A process whose row was not renewed for this long (seconds) is not counted.
pub(crate) const LIVE_SECS: f64 = 5.0;
/// The factor is halved at most once per this many seconds, job-wide.
pub(crate) const CUT_PERIOD: f64 = 2.0;
/// The factor grows back by this much a second without throttling (0.5 to 1 in 25 s).
pub(crate) const RISE_PER_SEC: f64 = 0.02;
/// The lowest factor.
pub(crate) const MIN_FACTOR: f64 = 0.05;
/// Rows not renewed for this long (seconds) are deleted by the next tick of anyone.
const FORGET_SECS: f64 = 300.0;
/// Attempts at the compare-and-set of one tick before it gives up until the next.
const RACES: usize = 3;
/// What a process used is measured over this many seconds at least.
const MEASURE_SECS: f64 = 0.5;
/// A process that used this much of its pace is busy: it wants as much as it can get.
pub(crate) const BUSY: f64 = 0.8;
/// A process that is not busy wants this many times what it used ...
pub(crate) const HEADROOM: f64 = 2.0;
/// ... and at least this much of an equal share.
pub(crate) const FLOOR: f64 = 0.1;

/// The job's shared AIMD state (`rate_state`), times on the database's clock in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Aimd {
    /// The factor of `--max-rps` in force.
    pub(crate) factor: f64,
    /// When it was last halved.
    pub(crate) cut_at: f64,
    /// When it was last changed (growth counts from here).
    pub(crate) grown_at: f64,
}

/// One step of the job's AIMD at `now`, for a process that saw a throttling answer since its
/// last tick (`throttled`) or not; None when nothing changes. A throttle halves the factor
/// unless it was cut less than [`CUT_PERIOD`] ago (that cut answered it); otherwise the
/// factor grows by [`RISE_PER_SEC`] for each second since it last changed, up to 1. Growth
/// counts time, not ticks, so the job grows as fast with 1 process as with 100.
pub(crate) fn aimd(s: Aimd, now: f64, throttled: bool) -> Option<Aimd> {
    if throttled {
        if now - s.cut_at < CUT_PERIOD {
            return None;
        }
        return Some(Aimd {
            factor: (s.factor / 2.0).clamp(MIN_FACTOR, 1.0),
            cut_at: now,
            grown_at: now,
        });
    }
    if s.factor >= 1.0 {
        return None;
    }
    let grown = s.factor + RISE_PER_SEC * (now - s.grown_at).max(0.0);
    Some(Aimd {
        factor: grown.clamp(MIN_FACTOR, 1.0),
        grown_at: now,
        ..s
    })
}

/// One process's pace: `max_rps × factor` shared equally by `live` processes.
pub(crate) fn share(max_rps: f64, factor: f64, live: i64) -> f64 {
    max_rps * factor.clamp(MIN_FACTOR, 1.0) / live.max(1) as f64
}

/// What a process wants, in requests per second, having `used` that many over its last
/// tick under the pace `pace` (None: not known yet), an equal share being `equal`: as much
/// as it can get ([`f64::INFINITY`]) when it used [`BUSY`] of its pace or more (or on its
/// first tick), else [`HEADROOM`] times what it used, at least [`FLOOR`] of `equal`.
pub(crate) fn want(used: f64, pace: Option<f64>, equal: f64) -> f64 {
    match pace {
        Some(p) if used < BUSY * p => (used * HEADROOM).max(FLOOR * equal),
        _ => f64::INFINITY,
    }
}

/// This process's part of `budget` when it wants `mine` and the other live processes want
/// `others` (max-min fairness: the smaller wants are met, the others share the rest
/// equally; what no one wants is spread equally on top, so the parts add up to `budget`).
pub(crate) fn split(budget: f64, mine: f64, others: &[f64]) -> f64 {
    let clean = |w: f64| {
        if w.is_nan() {
            f64::INFINITY
        } else {
            w.max(0.0)
        }
    };
    let mine = clean(mine);
    let mut wants: Vec<f64> = others.iter().map(|w| clean(*w)).collect();
    wants.push(mine);
    wants.sort_by(f64::total_cmp);
    let n = wants.len() as f64;
    let (mut left, mut unmet) = (budget, wants.len());
    let mut level = f64::INFINITY;
    for w in &wants {
        let fair = left / unmet as f64;
        if *w > fair {
            level = fair;
            break;
        }
        left -= w;
        unmet -= 1;
    }
    let spare = if level.is_infinite() { left / n } else { 0.0 };
    mine.min(level) + spare
}

/// What a process's last tick saw and set.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Seen {
    /// Processes taking a share, this one included.
    pub(crate) live: i64,
    /// The job's factor of `--max-rps`.
    pub(crate) factor: f64,
    /// The pace this process set (None without `--max-rps`).
    pub(crate) rps: Option<f64>,
    /// The fraction of `--max-bandwidth` it took.
    pub(crate) bandwidth_share: f64,
}

/// One process's share of the job's limits: its row, its connection, what it paces.
struct Share {
    location: PgLocation,
    client: Option<Client>,
    id: i64,
    max_rps: Option<f64>,
    bandwidth: Option<Arc<Bandwidth>>,
    retriers: Vec<Arc<Retrier>>,
    /// Throttling answers seen up to the last tick that counted them.
    reported: u64,
    /// Requests started as of the last measure, and when (to measure what was used).
    started: (u64, std::time::Instant),
    /// What it wants (see [`want`]), as last measured.
    want: f64,
    seen: Seen,
}

/// Renews this process's row, reads what the other live processes want and the job's
/// state, on the database's clock. $1 id, $2 host, $3 pid, $4 throttles so far, $5 the pace
/// set, $6 what it wants, $7 [`LIVE_SECS`], $8 [`FORGET_SECS`].
const TICK_SQL: &str = "
WITH now AS (SELECT extract(epoch FROM clock_timestamp())::float8 AS t),
me AS (
    INSERT INTO rate_shares (id, host, pid, seen_at, throttled, rps, want)
    SELECT $1, $2, $3, now.t, $4, $5, $6 FROM now
    ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at,
        throttled = excluded.throttled, rps = excluded.rps, want = excluded.want
    RETURNING id),
gone AS (DELETE FROM rate_shares USING now WHERE seen_at < now.t - $8 AND id <> $1)
SELECT now.t, s.factor, s.cut_at, s.grown_at, s.rev,
    (SELECT coalesce(array_agg(r.want), '{}') FROM rate_shares r
     WHERE r.id <> $1 AND r.seen_at > now.t - $7)
FROM now, rate_state s WHERE s.id = 1";

/// Writes a step of the AIMD unless someone else wrote one since it was read.
const STEP_SQL: &str = "UPDATE rate_state SET factor = $1, cut_at = $2, grown_at = $3,
    rev = rev + 1 WHERE id = 1 AND rev = $4";

impl Share {
    /// A new row for this process (not counted until its first tick).
    async fn join(
        location: &PgLocation,
        max_rps: Option<f64>,
        bandwidth: Option<Arc<Bandwidth>>,
        retriers: Vec<Arc<Retrier>>,
    ) -> Result<Share, String> {
        let client = super::run::connect(location).await?;
        let id: i64 = client
            .query_one("SELECT nextval('rate_shares_id_seq')", &[])
            .await
            .map_err(|e| pg(&location.shown, e))?
            .get(0);
        let reported = retriers.iter().map(|r| r.limiter.throttles()).sum();
        let started = (
            retriers.iter().map(|r| r.limiter.started()).sum(),
            std::time::Instant::now(),
        );
        Ok(Share {
            location: location.clone(),
            client: Some(client),
            id,
            max_rps: max_rps.filter(|r| *r > 0.0 && r.is_finite()),
            bandwidth,
            retriers,
            reported,
            started,
            want: f64::INFINITY,
            seen: Seen::default(),
        })
    }

    /// One tick (see the module header); on an error the connection is made again at the
    /// next one, and the pace set last stays.
    async fn tick(&mut self) -> Result<Seen, String> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(super::run::connect(&self.location).await?);
        }
        let r = self.tick_on().await;
        if r.is_err() {
            self.client = None;
        }
        r
    }

    async fn tick_on(&mut self) -> Result<Seen, String> {
        let c = self.client.as_ref().expect("connected");
        let l = &self.location;
        let throttles: u64 = self.retriers.iter().map(|r| r.limiter.throttles()).sum();
        let throttled = throttles > self.reported;
        // What was used is measured over half a second at least (a tick made sooner
        // keeps the last measure).
        let started: u64 = self.retriers.iter().map(|r| r.limiter.started()).sum();
        let since = self.started.1.elapsed().as_secs_f64();
        if since >= MEASURE_SECS {
            let used = started.saturating_sub(self.started.0) as f64 / since;
            self.started = (started, std::time::Instant::now());
            let equal = self
                .max_rps
                .map_or(0.0, |m| share(m, self.seen.factor, self.seen.live));
            self.want = want(used, self.seen.rps, equal);
        }
        let mine = self.want;
        let host = super::run::hostname();
        let pid = i64::from(std::process::id());
        let mut state = None;
        for _ in 0..RACES {
            let row = c
                .query_one(
                    TICK_SQL,
                    &[
                        &self.id,
                        &host,
                        &pid,
                        &(throttles as i64),
                        &self.seen.rps,
                        &mine,
                        &LIVE_SECS,
                        &FORGET_SECS,
                    ],
                )
                .await
                .map_err(|e| pg(&l.shown, e))?;
            let now: f64 = row.get(0);
            let read = Aimd {
                factor: row.get(1),
                cut_at: row.get(2),
                grown_at: row.get(3),
            };
            let (rev, others): (i64, Vec<f64>) = (row.get(4), row.get(5));
            let Some(next) = aimd(read, now, throttled) else {
                state = Some((read.factor, others, true));
                break;
            };
            let written = c
                .execute(
                    STEP_SQL,
                    &[&next.factor, &next.cut_at, &next.grown_at, &rev],
                )
                .await
                .map_err(|e| pg(&l.shown, e))?;
            // Lost a race: read again (a cut made meanwhile answers this throttle too).
            if written == 1 {
                state = Some((next.factor, others, true));
                break;
            }
            state = Some((read.factor, others, false));
        }
        let (factor, others, counted) = state.expect("at least one attempt");
        if counted {
            self.reported = throttles;
        }
        Ok(self.apply(factor, mine, &others))
    }

    /// Sets the pacers and the bandwidth to this process's share (the pace divided among
    /// its retry loops, when it has several).
    fn apply(&mut self, factor: f64, mine: f64, others: &[f64]) -> Seen {
        let live = others.len() as i64 + 1;
        let budget = |max: f64| max * factor.clamp(MIN_FACTOR, 1.0);
        let rps = self.max_rps.map(|max| split(budget(max), mine, others));
        if let Some(rps) = rps {
            let loops = self.retriers.len().max(1) as f64;
            for r in &self.retriers {
                r.limiter.set_max_rps(rps / loops);
            }
        }
        let bandwidth_share = 1.0 / live.max(1) as f64;
        if let Some(bw) = &self.bandwidth {
            bw.set_share(bandwidth_share);
        }
        self.seen = Seen {
            live,
            factor,
            rps,
            bandwidth_share,
        };
        self.seen
    }

    /// Deletes this process's row (the others take its share at their next tick).
    async fn leave(&mut self) {
        if let Some(c) = &self.client {
            let _ = c
                .execute("DELETE FROM rate_shares WHERE id = $1", &[&self.id])
                .await;
        }
    }
}

/// This process's share of a PostgreSQL job's limits, renewed every [`TICK`] by a task of
/// its own until dropped (see the module header).
pub(crate) struct JobLimits {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    seen: Arc<Mutex<Seen>>,
}

impl JobLimits {
    /// Takes this process's share of the job at `location`: `max_rps` (requests per second
    /// for the whole job, paced by the `retriers`' limiters) and `bandwidth` (this
    /// process's limiter of `--max-bandwidth`, taking its part of the rates). The first
    /// tick is made before this returns, so the share is in force before any request.
    pub(crate) async fn start(
        location: &PgLocation,
        max_rps: Option<f64>,
        bandwidth: Option<Arc<Bandwidth>>,
        retriers: Vec<Arc<Retrier>>,
    ) -> Result<JobLimits, String> {
        let mut share = Share::join(location, max_rps, bandwidth, retriers).await?;
        let first = share.tick().await?;
        let seen = Arc::new(Mutex::new(first));
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                let mut every = tokio::time::interval(TICK);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                every.tick().await;
                // An outage is said once when it starts (not at every tick) and when it ends.
                let mut failing = false;
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        _ = every.tick() => {}
                    }
                    match share.tick().await {
                        Ok(s) => {
                            *seen.lock().expect("limits lock") = s;
                            if std::mem::take(&mut failing) {
                                tracing::warn!("job-wide limits: shared again");
                            }
                        }
                        Err(e) if failing => tracing::debug!("job-wide limits: {e}"),
                        Err(e) => {
                            failing = true;
                            tracing::warn!(
                                "job-wide limits: {e} (this process keeps its last pace meanwhile)"
                            );
                        }
                    }
                }
                share.leave().await;
            }
        });
        Ok(JobLimits {
            stop: Some(stop),
            task: Some(task),
            seen,
        })
    }

    /// For a run: on a PostgreSQL job (`manifest` a `postgres://` URL) with `--max-rps` or
    /// `--max-bandwidth`, this process's share of them; None otherwise. A share that cannot
    /// be taken is said, and the process keeps its own limits.
    pub(crate) async fn for_run(
        manifest: &std::path::Path,
        max_rps: Option<f64>,
        bandwidth: Option<Arc<Bandwidth>>,
        retriers: Vec<Arc<Retrier>>,
    ) -> Option<JobLimits> {
        let Ok(crate::manifest::Location::Postgres(l)) = crate::manifest::Location::of(manifest)
        else {
            return None;
        };
        if max_rps.is_none() && bandwidth.is_none() {
            return None;
        }
        match JobLimits::start(&l, max_rps, bandwidth, retriers).await {
            Ok(limits) => {
                let s = limits.seen();
                let pace = s.rps.map_or(String::new(), |r| {
                    format!(", {r:.1} requests/s for this one now")
                });
                crate::say!("job-wide limits: {} process(es) share them{pace}", s.live);
                Some(limits)
            }
            Err(e) => {
                crate::say!(
                    "warning: job-wide limits are off ({e}): --max-rps and --max-bandwidth hold for this process alone"
                );
                None
            }
        }
    }

    /// What the last tick saw and set.
    pub(crate) fn seen(&self) -> Seen {
        *self.seen.lock().expect("limits lock")
    }

    /// Stops renewing and deletes this process's row, waiting for it (a few seconds at
    /// most: a row left behind stops being counted after [`LIVE_SECS`] anyway).
    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
        }
    }
}

impl Drop for JobLimits {
    /// Stops the renewals; the row is deleted by the task (or, if the runtime is gone,
    /// stops being counted after [`LIVE_SECS`]).
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::store::tests::pg_job;
    use crate::manifest::Manifest;
    use crate::s3::bandwidth::{parse_rate, Schedule};
    use crate::s3::{Limiter, RetryPolicy};

    fn at(factor: f64, cut_at: f64, grown_at: f64) -> Aimd {
        Aimd {
            factor,
            cut_at,
            grown_at,
        }
    }

    #[test]
    fn a_throttle_halves_the_factor_once_per_cut_period() {
        let s = at(1.0, 0.0, 0.0);
        let cut = aimd(s, 100.0, true).unwrap();
        assert_eq!(cut, at(0.5, 100.0, 100.0));
        // Other throttles within the period were answered by that cut.
        assert_eq!(aimd(cut, 100.5, true), None);
        assert_eq!(aimd(cut, 100.0 + CUT_PERIOD - 0.01, true), None);
        // After it, another halving.
        let again = aimd(cut, 100.0 + CUT_PERIOD, true).unwrap();
        assert_eq!(again.factor, 0.25);
        // Never below the floor.
        let low = at(0.06, 0.0, 0.0);
        assert_eq!(aimd(low, 10.0, true).unwrap().factor, MIN_FACTOR);
        assert_eq!(
            aimd(at(MIN_FACTOR, 0.0, 0.0), 10.0, true).unwrap().factor,
            MIN_FACTOR
        );
    }

    #[test]
    fn without_throttles_the_factor_grows_back_by_time_up_to_one() {
        // At 1, nothing to write.
        assert_eq!(aimd(at(1.0, 0.0, 0.0), 50.0, false), None);
        // 10 s after the cut: + 10 × RISE_PER_SEC.
        let s = at(0.5, 100.0, 100.0);
        let g = aimd(s, 110.0, false).unwrap();
        assert!((g.factor - (0.5 + 10.0 * RISE_PER_SEC)).abs() < 1e-9);
        assert_eq!((g.cut_at, g.grown_at), (100.0, 110.0));
        // By time, not by ticks: ten one-second steps (any number of processes) make the
        // same as one ten-second step.
        let mut t = s;
        for i in 1..=10 {
            t = aimd(t, 100.0 + i as f64, false).unwrap();
        }
        assert!((t.factor - g.factor).abs() < 1e-9);
        // A clock read before the last change (another process's tick) does not shrink it.
        assert_eq!(aimd(g, 105.0, false).unwrap().factor, g.factor);
        // Capped at 1.
        assert_eq!(aimd(s, 1000.0, false).unwrap().factor, 1.0);
    }

    #[test]
    fn each_process_paces_its_equal_share_of_the_factor() {
        assert_eq!(share(1000.0, 1.0, 1), 1000.0);
        assert_eq!(share(1000.0, 1.0, 4), 250.0);
        assert_eq!(share(1000.0, 0.5, 4), 125.0);
        // No process counted yet (the first tick counts itself): never a division by zero.
        assert_eq!(share(1000.0, 1.0, 0), 1000.0);
        // The factor is kept in its bounds.
        assert_eq!(share(1000.0, 0.0, 1), 1000.0 * MIN_FACTOR);
        assert_eq!(share(1000.0, 3.0, 2), 500.0);
        // N processes at their shares make the job's rate.
        let total: f64 = (0..7).map(|_| share(700.0, 0.5, 7)).sum();
        assert!((total - 350.0).abs() < 1e-9);
    }

    #[test]
    fn a_busy_process_wants_all_it_can_get_an_idle_one_a_little_more_than_it_used() {
        // First tick (no pace yet), or 80% of the pace used: as much as it can get.
        assert_eq!(want(0.0, None, 50.0), f64::INFINITY);
        assert_eq!(want(40.0, Some(50.0), 50.0), f64::INFINITY);
        assert_eq!(want(50.0, Some(50.0), 50.0), f64::INFINITY);
        // Less: twice what it used ...
        assert_eq!(want(10.0, Some(50.0), 50.0), 20.0);
        // ... at least a tenth of an equal share (an idle process can start again).
        assert_eq!(want(0.0, Some(50.0), 50.0), 5.0);
        assert_eq!(want(1.0, Some(50.0), 50.0), 5.0);
    }

    #[test]
    fn the_budget_is_split_by_what_each_wants() {
        let sum = |budget: f64, wants: &[f64]| -> f64 {
            (0..wants.len())
                .map(|i| {
                    let others: Vec<f64> = (0..wants.len())
                        .filter(|j| *j != i)
                        .map(|j| wants[j])
                        .collect();
                    split(budget, wants[i], &others)
                })
                .sum()
        };
        let inf = f64::INFINITY;
        // All busy: equal shares.
        assert_eq!(split(100.0, inf, &[inf, inf, inf]), 25.0);
        // One wants little: it gets that, the others share the rest.
        assert_eq!(split(100.0, 10.0, &[inf, inf]), 10.0);
        assert_eq!(split(100.0, inf, &[10.0, inf]), 45.0);
        // Max-min: a want above the level is capped at it.
        assert_eq!(split(90.0, 40.0, &[10.0, inf]), 40.0);
        assert_eq!(split(90.0, inf, &[10.0, 40.0]), 40.0);
        assert_eq!(split(100.0, 60.0, &[10.0, inf]), 45.0);
        // Nobody wants it all: the rest is spread equally on top.
        assert_eq!(split(100.0, 10.0, &[20.0]), 10.0 + 35.0);
        assert_eq!(split(100.0, 5.0, &[5.0]), 50.0);
        // Alone: everything.
        assert_eq!(split(100.0, 3.0, &[]), 100.0);
        assert_eq!(split(100.0, inf, &[]), 100.0);
        // Whatever the wants, the parts add up to the budget.
        for wants in [
            vec![inf, inf, inf],
            vec![1.0, 2.0, inf, 500.0],
            vec![10.0, 20.0],
            vec![0.0, 0.0, 0.0],
            vec![f64::NAN, 30.0, inf],
            vec![33.0, 33.0, 34.0, inf, 1.0],
        ] {
            let total = sum(100.0, &wants);
            assert!((total - 100.0).abs() < 1e-9, "{wants:?}: {total}");
        }
    }

    fn retrier(rps: f64) -> Arc<Retrier> {
        Arc::new(Retrier::new(
            RetryPolicy::default(),
            Limiter::new(8, Some(rps)),
        ))
    }

    /// A new job with its tables (None without a test server), and where it is.
    fn job(tag: &str) -> Option<(std::path::PathBuf, PgLocation)> {
        let url = pg_job(tag)?;
        drop(Manifest::open(&url, true).unwrap());
        match crate::manifest::Location::of(&url).unwrap() {
            crate::manifest::Location::Postgres(l) => Some((url, l)),
            other => panic!("not a PostgreSQL job: {other:?}"),
        }
    }

    /// Two processes' shares of a new job's `rps`, not ticked yet, and their loops.
    async fn two(tag: &str, rps: f64) -> Option<(PgLocation, [Arc<Retrier>; 2], Share, Share)> {
        let (_, l) = job(tag)?;
        let (ra, rb) = (retrier(rps), retrier(rps));
        let a = Share::join(&l, Some(rps), None, vec![ra.clone()]);
        let a = a.await.unwrap();
        let b = Share::join(&l, Some(rps), None, vec![rb.clone()]);
        let b = b.await.unwrap();
        Some((l, [ra, rb], a, b))
    }

    fn near(a: f64, b: f64) -> bool {
        (a - b).abs() <= b * 0.02
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn two_processes_share_the_rate_and_back_off_together() {
        let Some((_, l)) = job("limits") else {
            return;
        };
        let bw = |_| {
            Some(Arc::new(Bandwidth::new(Schedule::constant(
                parse_rate("8M").unwrap(),
            ))))
        };
        let (ra, rb) = (retrier(100.0), retrier(100.0));
        let (bwa, bwb) = (bw(0), bw(1));
        // Both busy: requests waiting on their pacers all along.
        let hammers: Vec<_> = [&ra, &rb].iter().flat_map(|r| hammer(r)).collect();
        let a = JobLimits::start(&l, Some(100.0), bwa.clone(), vec![ra.clone()])
            .await
            .unwrap();
        // Alone: the whole rate.
        assert_eq!(a.seen().live, 1);
        assert_eq!(ra.limiter.max_rps(), Some(100.0));
        let mut b = Share::join(&l, Some(100.0), bwb.clone(), vec![rb.clone()])
            .await
            .unwrap();
        let seen_b = b.tick().await.unwrap();
        // Two: half each, the bandwidth too (b at once; a at its next tick).
        assert_eq!(seen_b.live, 2);
        assert!(near(rb.limiter.max_rps().unwrap(), 50.0), "{seen_b:?}");
        assert_eq!(bwb.as_ref().unwrap().share(), 0.5);
        let seen_a = wait_for(&a, |s| s.live == 2).await;
        assert!(near(ra.limiter.max_rps().unwrap(), 50.0), "{seen_a:?}");
        assert_eq!(bwa.as_ref().unwrap().share(), 0.5);
        // A throttling answer seen by b cuts the job's factor: both halve their pace.
        rb.limiter.on_throttle();
        let seen_b = b.tick().await.unwrap();
        assert_eq!(seen_b.factor, 0.5, "{seen_b:?}");
        assert!(near(rb.limiter.max_rps().unwrap(), 25.0), "{seen_b:?}");
        // The same throttle is not counted twice; a second one within the cut period
        // does not cut again.
        assert!(b.tick().await.unwrap().factor >= 0.5);
        rb.limiter.on_throttle();
        assert!(b.tick().await.unwrap().factor >= 0.5);
        let seen_a = wait_for(&a, |s| s.factor < 0.6).await;
        assert!(seen_a.factor >= 0.5, "{seen_a:?}");
        assert!(
            near(seen_a.rps.unwrap(), 50.0 * seen_a.factor),
            "{seen_a:?}"
        );
        assert!(ra.limiter.max_rps().unwrap() < 30.0, "{seen_a:?}");
        // The bandwidth is not cut by throttling: still half each.
        assert_eq!(bwa.as_ref().unwrap().share(), 0.5);
        // b leaves: a takes the whole (cut, growing back) rate again.
        b.leave().await;
        let seen_a = wait_for(&a, |s| s.live == 1).await;
        assert!(seen_a.factor >= 0.5 && seen_a.factor < 1.0, "{seen_a:?}");
        assert!(
            near(seen_a.rps.unwrap(), 100.0 * seen_a.factor),
            "{seen_a:?}"
        );
        assert_eq!(bwa.as_ref().unwrap().share(), 1.0);
        a.stop().await;
        hammers.iter().for_each(|h| h.abort());
        // Both rows gone.
        let c = super::super::run::connect(&l).await.unwrap();
        let n: i64 = c
            .query_one("SELECT count(*) FROM rate_shares", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_process_not_renewed_stops_being_counted() {
        let Some((l, [ra, _], mut a, mut b)) = two("limits-gone", 60.0).await else {
            return;
        };
        b.tick().await.unwrap();
        assert_eq!(a.tick().await.unwrap().live, 2);
        // b stops renewing (killed, or paused): its row ages on the database's clock.
        let c = super::super::run::connect(&l).await.unwrap();
        c.execute(
            "UPDATE rate_shares SET seen_at = seen_at - $1 WHERE id = $2",
            &[&(LIVE_SECS + 1.0), &b.id],
        )
        .await
        .unwrap();
        let seen = a.tick().await.unwrap();
        assert_eq!(seen.live, 1);
        assert!(near(ra.limiter.max_rps().unwrap(), 60.0), "{seen:?}");
    }

    /// Four tasks taking `r`'s slots as fast as its pacer lets them.
    fn hammer(r: &Arc<Retrier>) -> Vec<tokio::task::JoinHandle<()>> {
        (0..4)
            .map(|_| {
                let r = r.clone();
                tokio::spawn(async move {
                    loop {
                        drop(r.limiter.acquire().await);
                    }
                })
            })
            .collect()
    }

    /// Makes `share`'s next tick see it busy: requests started at once (no pacing) under a
    /// pace it says was tiny.
    async fn busy(share: &mut Share, r: &Retrier) {
        r.limiter.set_max_rps(0.0);
        for _ in 0..10 {
            drop(r.limiter.acquire().await);
        }
        share.seen.rps = Some(1.0);
        share.started.1 -= Duration::from_secs(1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_idle_process_leaves_its_share_to_the_busy_ones() {
        let Some((_, [ra, rb], mut a, mut b)) = two("limits-idle", 100.0).await else {
            return;
        };
        a.tick().await.unwrap();
        b.tick().await.unwrap();
        assert!(near(rb.limiter.max_rps().unwrap(), 50.0));
        // b used nothing of its pace: it wants a tenth of an equal share; a is busy and
        // takes the rest.
        b.started.1 -= Duration::from_secs(1);
        let seen_b = b.tick().await.unwrap();
        assert!(near(seen_b.rps.unwrap(), 5.0), "{seen_b:?}");
        busy(&mut a, &ra).await;
        let seen_a = a.tick().await.unwrap();
        assert!(near(seen_a.rps.unwrap(), 95.0), "{seen_a:?}");
        assert!(near(ra.limiter.max_rps().unwrap(), 95.0));
        // b gets work: it uses its small share up and takes an equal one at its next tick;
        // a, busy too, comes down to it at its own.
        busy(&mut b, &rb).await;
        assert!(near(b.tick().await.unwrap().rps.unwrap(), 50.0));
        busy(&mut a, &ra).await;
        assert!(near(a.tick().await.unwrap().rps.unwrap(), 50.0));
        assert!(near(ra.limiter.max_rps().unwrap(), 50.0));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn only_a_postgres_job_with_a_limit_takes_a_share() {
        let none = JobLimits::for_run(
            std::path::Path::new("/tmp/job.db"),
            Some(10.0),
            None,
            vec![],
        )
        .await;
        assert!(none.is_none());
        let Some((url, _)) = job("limits-none") else {
            return;
        };
        assert!(JobLimits::for_run(&url, None, None, vec![]).await.is_none());
        let r = retrier(1.0);
        let some = JobLimits::for_run(&url, Some(40.0), None, vec![r.clone()]).await;
        assert_eq!(some.unwrap().seen().live, 1);
        assert_eq!(r.limiter.max_rps(), Some(40.0));
    }

    /// Waits (a few ticks at most) until `a`'s last tick saw what `ok` asks.
    async fn wait_for(a: &JobLimits, ok: impl Fn(&Seen) -> bool) -> Seen {
        for _ in 0..50 {
            let s = a.seen();
            if ok(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("not seen in 5 s: {:?}", a.seen());
    }
}
