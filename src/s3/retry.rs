//! s3::retry: the one retry loop (backon schedules) and the job-wide bound on requests in
//! flight (AIMD on throttling, optional requests-per-second cap).
//!
//! The SDK's own retries are disabled (see [`super::client`]): this is the only retry layer,
//! so attempts never multiply.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use backon::ExponentialBuilder;
use tokio::sync::Notify;

use super::error::{ErrorClass, S3Error};

/// Told of every retry (the error, the attempt that failed, the delay before the next): set
/// once by the layer that reports them (`events`), so that this layer calls nothing above it.
static RETRY_OBSERVER: std::sync::OnceLock<fn(&S3Error, u32, Duration)> =
    std::sync::OnceLock::new();

/// Sets the one [`RETRY_OBSERVER`] of the process (a second call is ignored).
pub fn observe_retries(f: fn(&S3Error, u32, Duration)) {
    let _ = RETRY_OBSERVER.set(f);
}

/// The retry schedule: exponential backoff with jitter, a cap and a maximum of attempts.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub max_attempts: usize,
    /// The first delay.
    pub min_delay: Duration,
    /// The longest delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(20),
        }
    }
}

impl RetryPolicy {
    /// The backon schedule for this policy.
    pub fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.max_attempts.saturating_sub(1))
            .with_jitter()
    }
}

/// Bounds the requests in flight for the whole job. The bound starts at `max`, halves on
/// throttling (at most once per window), grows back by one per bound-many successes, and
/// never leaves `1..=max`. An optional pacer caps requests per second; its rate may be set
/// while the run goes on ([`Limiter::set_max_rps`]: a job's share of a job-wide rate).
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<LimitState>,
    notify: Notify,
    /// Whether the pacer paces (read without its lock on the unpaced path).
    paced: AtomicBool,
    pacer: Mutex<Pacer>,
    throttles: AtomicU64,
    started: AtomicU64,
}

/// The pacer: the next request's start (tokio's clock), one interval after the last one's.
#[derive(Debug)]
struct Pacer {
    next: tokio::time::Instant,
    /// Between two request starts; zero when not pacing.
    interval: Duration,
}

/// The pacer's interval for `max_rps` requests per second (zero: no pacing).
fn interval_of(max_rps: Option<f64>) -> Duration {
    match max_rps {
        Some(r) if r > 0.0 && r.is_finite() => Duration::from_secs_f64(1.0 / r),
        _ => Duration::ZERO,
    }
}

#[derive(Debug)]
struct LimitState {
    in_flight: usize,
    limit: f64,
    max: usize,
    last_cut: Option<Instant>,
    lowest: f64,
}

/// A request slot; released on drop.
#[derive(Debug)]
pub struct Permit<'a> {
    limiter: &'a Limiter,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut s = self.limiter.state.lock().expect("limiter lock");
        s.in_flight -= 1;
        drop(s);
        self.limiter.notify.notify_waiters();
    }
}

impl Limiter {
    /// A limiter for at most `max` requests in flight and at most `max_rps` per second.
    pub fn new(max: usize, max_rps: Option<f64>) -> Limiter {
        let max = max.max(1);
        let interval = interval_of(max_rps);
        Limiter {
            state: Mutex::new(LimitState {
                in_flight: 0,
                limit: max as f64,
                max,
                last_cut: None,
                lowest: max as f64,
            }),
            notify: Notify::new(),
            paced: AtomicBool::new(!interval.is_zero()),
            pacer: Mutex::new(Pacer {
                next: tokio::time::Instant::now(),
                interval,
            }),
            throttles: AtomicU64::new(0),
            started: AtomicU64::new(0),
        }
    }

    /// Sets the pacer to `max_rps` requests per second from now on (zero, negative or not
    /// finite: no pacing). The starts already handed out ahead of now are spread again at
    /// the new rate, so the rate over the coming seconds is the new one, neither the old
    /// one's backlog nor a burst. A limiter whose rate is never set keeps its own.
    pub fn set_max_rps(&self, max_rps: f64) {
        let interval = interval_of(Some(max_rps));
        let mut p = self.pacer.lock().expect("pacer lock");
        let now = tokio::time::Instant::now();
        if p.next > now && !p.interval.is_zero() {
            let ahead = (p.next - now).as_secs_f64();
            let ratio = interval.as_secs_f64() / p.interval.as_secs_f64();
            p.next = now + Duration::from_secs_f64(ahead * ratio);
        }
        p.interval = interval;
        self.paced.store(!interval.is_zero(), Ordering::Relaxed);
    }

    /// The pacer's rate in requests per second (None: not pacing).
    pub fn max_rps(&self) -> Option<f64> {
        let p = self.pacer.lock().expect("pacer lock");
        (!p.interval.is_zero()).then(|| 1.0 / p.interval.as_secs_f64())
    }

    /// Waits for a request slot (and for the pacer, if any).
    pub async fn acquire(&self) -> Permit<'_> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.state.lock().expect("limiter lock");
                if (s.in_flight as f64) < s.limit.floor().max(1.0) {
                    s.in_flight += 1;
                    break;
                }
            }
            notified.await;
        }
        if self.paced.load(Ordering::Relaxed) {
            let at = {
                let mut p = self.pacer.lock().expect("pacer lock");
                let at = p.next.max(tokio::time::Instant::now());
                p.next = at + p.interval;
                at
            };
            tokio::time::sleep_until(at).await;
        }
        self.started.fetch_add(1, Ordering::Relaxed);
        Permit { limiter: self }
    }

    /// Records a success: additive increase.
    pub fn on_success(&self) {
        let mut s = self.state.lock().expect("limiter lock");
        let max = s.max as f64;
        if s.limit < max {
            s.limit = (s.limit + 1.0 / s.limit.max(1.0)).min(max);
            drop(s);
            self.notify.notify_waiters();
        }
    }

    /// Records a throttling answer: multiplicative decrease, once per 500 ms at most.
    pub fn on_throttle(&self) {
        self.throttles.fetch_add(1, Ordering::Relaxed);
        let mut s = self.state.lock().expect("limiter lock");
        let now = Instant::now();
        if s.last_cut
            .is_none_or(|t| now.duration_since(t) > Duration::from_millis(500))
        {
            s.limit = (s.limit / 2.0).max(1.0);
            s.last_cut = Some(now);
            s.lowest = s.lowest.min(s.limit);
        }
    }

    /// The lowest bound on requests in flight reached so far.
    pub fn lowest_limit(&self) -> usize {
        self.state.lock().expect("limiter lock").lowest.floor() as usize
    }

    /// The current bound on requests in flight.
    pub fn current_limit(&self) -> usize {
        self.state.lock().expect("limiter lock").limit.floor() as usize
    }

    /// How many throttling answers were seen.
    pub fn throttles(&self) -> u64 {
        self.throttles.load(Ordering::Relaxed)
    }

    /// How many requests were let go so far (slots handed out, after the pacer).
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }
}

/// Where one call of the retry loop counts: its retries (a task's counter or the side's
/// own), and the failed attempts and retries of the client it calls.
#[derive(Clone, Copy)]
pub(super) struct Tally<'a> {
    /// The call's retries.
    pub(super) retries: &'a AtomicU64,
    /// The client's outcomes.
    pub(super) outcomes: &'a super::outcomes::Outcomes,
    /// The side the requests go to (named by the lease gate's refusal).
    pub(super) side: super::Side,
}

/// The result of a write retried by [`Retrier::write`].
#[derive(Debug)]
pub enum Written<T, A> {
    /// This call's own attempt succeeded.
    Done(T),
    /// An earlier attempt that failed ambiguously had in fact succeeded: the reconcile hook
    /// found its result, and no second write was made.
    Adopted(A),
}

/// The one retry loop: every S3 request of a job goes through it. It takes a slot from the
/// job's [`Limiter`], retries retryable errors on the policy's schedule, and lowers the
/// requests in flight on throttling. A write that is not idempotent (it creates a destination
/// version) calls a reconcile hook before each repeat: if the failed attempt took effect
/// after all, the hook returns what it created and the loop stops.
#[derive(Debug)]
pub struct Retrier {
    /// The schedule.
    pub policy: RetryPolicy,
    /// The bound on requests in flight.
    pub limiter: Limiter,
}

impl Retrier {
    /// A retrier with this schedule and bound.
    pub fn new(policy: RetryPolicy, limiter: Limiter) -> Retrier {
        Retrier { policy, limiter }
    }

    /// An idempotent request (reads, part uploads, aborts): simply repeated.
    pub(super) async fn call<T, F, Fut>(&self, tally: Tally<'_>, f: F) -> Result<T, S3Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, S3Error>>,
    {
        let no_hook = || async { Ok::<Option<()>, S3Error>(None) };
        match self.run(tally, true, f, no_hook).await? {
            Written::Done(v) => Ok(v),
            Written::Adopted(()) => unreachable!("idempotent calls have no reconcile hook"),
        }
    }

    /// A write that is not idempotent: `before_retry` runs before every repeat and may adopt
    /// what an ambiguous failure created.
    pub(super) async fn write<T, A, F, Fut, H, HFut>(
        &self,
        tally: Tally<'_>,
        f: F,
        before_retry: H,
    ) -> Result<Written<T, A>, S3Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, S3Error>>,
        H: FnMut() -> HFut,
        HFut: Future<Output = Result<Option<A>, S3Error>>,
    {
        self.run(tally, false, f, before_retry).await
    }

    async fn run<T, A, F, Fut, H, HFut>(
        &self,
        tally: Tally<'_>,
        idempotent: bool,
        f: F,
        mut before_retry: H,
    ) -> Result<Written<T, A>, S3Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, S3Error>>,
        H: FnMut() -> HFut,
        HFut: Future<Output = Result<Option<A>, S3Error>>,
    {
        let mut delays = backon::BackoffBuilder::build(self.policy.backoff());
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let r = {
                let _permit = self.limiter.acquire().await;
                // A run on a shared manifest sends nothing once its leases may be gone.
                match super::gate::check(tally.side) {
                    Ok(()) => f().await,
                    Err(e) => Err(e),
                }
            };
            let e = match r {
                Ok(v) => {
                    self.limiter.on_success();
                    return Ok(Written::Done(v));
                }
                Err(e) => e,
            };
            tally.outcomes.failed(&e);
            if e.class == ErrorClass::Throttled {
                self.limiter.on_throttle();
            }
            if !e.is_retryable() {
                return Err(e);
            }
            let Some(delay) = delays.next() else {
                return Err(e);
            };
            tally.retries.fetch_add(1, Ordering::Relaxed);
            tally.outcomes.retried();
            tracing::debug!("retrying in {delay:?} after: {e}");
            if let Some(observe) = RETRY_OBSERVER.get() {
                observe(&e, attempt, delay);
            }
            tokio::time::sleep(delay).await;
            if !idempotent {
                if let Some(a) = before_retry().await? {
                    return Ok(Written::Adopted(a));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::outcomes::Outcomes;
    use crate::s3::Side;

    #[tokio::test]
    async fn retries_until_success_and_counts() {
        let policy = RetryPolicy {
            max_attempts: 5,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        };
        let r4 = Retrier::new(policy, Limiter::new(4, None));
        let (retries, outcomes) = (AtomicU64::new(0), Outcomes::default());
        let tally = Tally {
            side: Side::Dest,
            retries: &retries,
            outcomes: &outcomes,
        };
        let calls = AtomicU64::new(0);
        let r = r4
            .call(tally, || async {
                let n = calls.fetch_add(1, Ordering::Relaxed);
                if n < 2 {
                    Err(S3Error::other(
                        Side::Source,
                        "GetObject",
                        ErrorClass::Throttled,
                        "slow".into(),
                    ))
                } else {
                    Ok(n)
                }
            })
            .await;
        assert_eq!(r.unwrap(), 2);
        assert_eq!(retries.load(Ordering::Relaxed), 2);
        assert_eq!(r4.limiter.throttles(), 2);
        assert!(r4.limiter.current_limit() < 4);
        // The client's tally: each failed attempt by class, each repeat.
        assert_eq!(outcomes.failures(), vec![("GetObject", "throttled", 2)]);
        assert_eq!(outcomes.retries(), 2);
    }

    #[tokio::test]
    async fn fatal_is_not_retried() {
        let policy = RetryPolicy::default();
        let r2 = Retrier::new(policy, Limiter::new(2, None));
        let (retries, outcomes) = (AtomicU64::new(0), Outcomes::default());
        let tally = Tally {
            side: Side::Dest,
            retries: &retries,
            outcomes: &outcomes,
        };
        let calls = AtomicU64::new(0);
        let r: Result<(), _> = r2
            .call(tally, || async {
                calls.fetch_add(1, Ordering::Relaxed);
                Err(S3Error::other(
                    Side::Dest,
                    "CopyObject",
                    ErrorClass::Fatal,
                    "denied".into(),
                ))
            })
            .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        assert_eq!(retries.load(Ordering::Relaxed), 0);
        assert_eq!(outcomes.failures(), vec![("CopyObject", "fatal", 1)]);
        assert_eq!(outcomes.retries(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_set_while_running_paces_at_the_new_rate() {
        let l = Limiter::new(4, Some(10.0));
        assert_eq!(l.max_rps(), Some(10.0));
        let start = tokio::time::Instant::now();
        for _ in 0..10 {
            drop(l.acquire().await);
        }
        // Ten starts at 10 a second (simulated clock): the tenth at 0.9 s.
        let first = start.elapsed().as_secs_f64();
        assert!((first - 0.9).abs() < 0.01, "{first}");
        l.set_max_rps(100.0);
        assert_eq!(l.max_rps(), Some(100.0));
        for _ in 0..100 {
            drop(l.acquire().await);
        }
        // A hundred more at 100 a second: about one second more.
        let second = start.elapsed().as_secs_f64() - first;
        assert!((second - 1.0).abs() < 0.02, "{second}");
        assert_eq!(l.started(), 110);
        // Off: no wait at all.
        l.set_max_rps(0.0);
        assert_eq!(l.max_rps(), None);
        let at = tokio::time::Instant::now();
        for _ in 0..1000 {
            drop(l.acquire().await);
        }
        assert_eq!(at.elapsed(), Duration::ZERO);
        // And a limiter made without a rate can be given one.
        let l = Limiter::new(4, None);
        l.set_max_rps(20.0);
        let at = tokio::time::Instant::now();
        for _ in 0..21 {
            drop(l.acquire().await);
        }
        let took = at.elapsed().as_secs_f64();
        assert!((took - 1.0).abs() < 0.01, "{took}");
    }

    #[tokio::test(start_paused = true)]
    async fn starts_handed_out_ahead_are_spread_again_at_the_new_rate() {
        let l = std::sync::Arc::new(Limiter::new(1000, Some(10.0)));
        let done = std::sync::Arc::new(AtomicU64::new(0));
        let go = |n: usize| {
            for _ in 0..n {
                let (l, done) = (l.clone(), done.clone());
                tokio::spawn(async move {
                    drop(l.acquire().await);
                    done.fetch_add(1, Ordering::SeqCst);
                });
            }
        };
        let start = tokio::time::Instant::now();
        // Twenty requests take their starts at 10 a second (until 1.9 s) ...
        go(20);
        tokio::task::yield_now().await;
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        // ... then the rate goes to 100 a second, and two hundred more come.
        l.set_max_rps(100.0);
        go(200);
        tokio::time::sleep_until(start + Duration::from_millis(1950)).await;
        // Over the two seconds, the new rate: about 200 (not 20: the old backlog first;
        // not 216: the new rate on top of the old starts).
        let n = done.load(Ordering::SeqCst);
        assert!((186..=206).contains(&n), "{n}");
    }

    #[test]
    fn limiter_stays_in_bounds() {
        let l = Limiter::new(8, None);
        for _ in 0..100 {
            l.on_success();
        }
        assert_eq!(l.current_limit(), 8);
        l.on_throttle();
        assert_eq!(l.current_limit(), 4);
    }
}
