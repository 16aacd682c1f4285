//! events::eta: the rate and ETA of a run, from its recent progress: a pure estimator fed
//! with (time, tasks ended, bytes copied) samples. The time is the caller's (the clock is
//! injected): the run passes the time since it started, a test a simulated one.
//!
//! The rate is measured over a sliding window ([`WINDOW`]): long enough to smooth the
//! bursts of a job whose objects differ in size, short enough to follow a job that speeds
//! up or slows down (throttling, another job on the link). ETA = remaining tasks / rate.
//!
//! May call: nothing.

use std::collections::VecDeque;
use std::time::Duration;

/// How far back the rate looks.
pub const WINDOW: Duration = Duration::from_secs(300);

/// A measured rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Tasks ended per second.
    pub tasks_per_sec: f64,
    /// Bytes copied per second.
    pub bytes_per_sec: f64,
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: f64,
    tasks: u64,
    bytes: u64,
}

/// The recent rate of a run and its ETA.
#[derive(Clone, Debug)]
pub struct Estimator {
    window: f64,
    samples: VecDeque<Sample>,
}

impl Default for Estimator {
    fn default() -> Self {
        Estimator::new(WINDOW)
    }
}

impl Estimator {
    /// An estimator whose rate looks `window` back.
    pub fn new(window: Duration) -> Estimator {
        Estimator {
            window: window.as_secs_f64().max(1.0),
            samples: VecDeque::new(),
        }
    }

    /// Records that at time `at` (since any fixed start; never going back) `tasks` tasks had
    /// ended and `bytes` bytes were copied, both counted from any fixed start.
    pub fn observe(&mut self, at: Duration, tasks: u64, bytes: u64) {
        let at = at.as_secs_f64();
        if self.samples.back().is_some_and(|s| at <= s.at) {
            return;
        }
        // Until the first task ends, only the newest sample is kept: the time a run spends
        // before its first copy (probes, the first listing page) is not its rate.
        if self.samples.len() == 1 && self.samples[0].tasks == tasks {
            self.samples.clear();
        }
        self.samples.push_back(Sample { at, tasks, bytes });
        // Keep the newest sample at or before the window's start: the rate spans the whole
        // window once the run is that old.
        while self.samples.len() > 2 && self.samples[1].at <= at - self.window {
            self.samples.pop_front();
        }
    }

    /// The rate over the window (None before two samples).
    pub fn rate(&self) -> Option<Rate> {
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        let span = last.at - first.at;
        if span <= 0.0 {
            return None;
        }
        Some(Rate {
            tasks_per_sec: last.tasks.saturating_sub(first.tasks) as f64 / span,
            bytes_per_sec: last.bytes.saturating_sub(first.bytes) as f64 / span,
        })
    }

    /// The time left for `remaining` tasks at the recent rate: zero when none remain, None
    /// while no task ended in the window (or no rate yet).
    pub fn eta(&self, remaining: u64) -> Option<Duration> {
        if remaining == 0 {
            return Some(Duration::ZERO);
        }
        let r = self.rate()?;
        if r.tasks_per_sec <= 0.0 {
            return None;
        }
        Some(Duration::from_secs_f64(remaining as f64 / r.tasks_per_sec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulated job of `total` tasks whose rate in second `t` is `rate(t)`, sampled every
    /// `every` seconds as the run samples it. From 10% progress on, each ETA is compared with
    /// the time the job really took to finish from then; returns the worst relative error.
    fn worst_eta_error(total: u64, every: u64, rate: impl Fn(u64) -> f64) -> f64 {
        // The job's progress second by second (the truth).
        let mut done_at = vec![0.0f64];
        while *done_at.last().unwrap() < total as f64 {
            let t = done_at.len() as u64 - 1;
            let next = done_at.last().unwrap() + rate(t);
            done_at.push(next.min(total as f64));
        }
        let end = (done_at.len() - 1) as f64;
        let mut est = Estimator::default();
        let mut worst: f64 = 0.0;
        let mut checked = 0;
        for t in (0..done_at.len()).step_by(every as usize) {
            let done = done_at[t].floor() as u64;
            est.observe(Duration::from_secs(t as u64), done, done * 1000);
            let remaining = total - done;
            if done * 10 < total || remaining == 0 {
                continue;
            }
            let truth = end - t as f64;
            // Below one sample period, the truth is within the sampling itself.
            if truth < every as f64 {
                continue;
            }
            let eta = est
                .eta(remaining)
                .expect("an ETA once tasks end")
                .as_secs_f64();
            worst = worst.max((eta - truth).abs() / truth);
            checked += 1;
        }
        assert!(
            checked > 10,
            "the simulation checks the ETA often: {checked}"
        );
        worst
    }

    #[test]
    fn eta_of_a_steady_job_is_within_20_percent_from_10_percent_on() {
        // 20,000 tasks at 23.7 tasks/s (about 14 minutes), sampled every 5 s.
        let worst = worst_eta_error(20_000, 5, |_| 23.7);
        println!(
            "steady job: worst ETA error from 10% on: {:.2}%",
            worst * 100.0
        );
        assert!(worst <= 0.20, "worst ETA error {:.1}%", worst * 100.0);
    }

    #[test]
    fn eta_of_a_noisy_job_is_within_20_percent_from_10_percent_on() {
        // 60,000 tasks at 25 tasks/s on average (about 40 minutes), each second's rate
        // drawn between 5 and 45 tasks/s (objects of different sizes, throttling bursts),
        // from a fixed seed.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let draws: Vec<f64> = (0..20_000)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed % 10_000) as f64 / 10_000.0
            })
            .collect();
        let worst = worst_eta_error(60_000, 5, |t| 5.0 + 40.0 * draws[t as usize]);
        println!(
            "noisy job: worst ETA error from 10% on: {:.2}%",
            worst * 100.0
        );
        assert!(worst <= 0.20, "worst ETA error {:.1}%", worst * 100.0);
    }

    #[test]
    fn eta_follows_a_job_that_slows_down() {
        // 100 tasks/s for 10 minutes, then 20 tasks/s: once a window has passed at the new
        // rate, the ETA is that of the new rate.
        let mut est = Estimator::default();
        let mut done = 0u64;
        for t in 0..=1200u64 {
            if t % 5 == 0 {
                est.observe(Duration::from_secs(t), done, 0);
            }
            done += if t < 600 { 100 } else { 20 };
        }
        let r = est.rate().unwrap();
        assert!((r.tasks_per_sec - 20.0).abs() < 0.5, "{r:?}");
        assert_eq!(est.eta(2000).unwrap().as_secs(), 100);
    }

    #[test]
    fn no_eta_before_a_rate_and_zero_when_nothing_remains() {
        let mut est = Estimator::default();
        assert_eq!(est.eta(10), None);
        est.observe(Duration::from_secs(0), 0, 0);
        assert_eq!(est.eta(10), None, "one sample is no rate");
        est.observe(Duration::from_secs(5), 0, 0);
        assert_eq!(est.eta(10), None, "no task ended: no rate yet");
        assert_eq!(est.eta(0), Some(Duration::ZERO));
        // The start before the first task ended (5 s here) is not part of the rate.
        est.observe(Duration::from_secs(10), 10, 100);
        assert_eq!(est.eta(10), Some(Duration::from_secs(5)));
        assert_eq!(est.rate().unwrap().bytes_per_sec, 20.0);
        // A stall later on is: the rate falls.
        est.observe(Duration::from_secs(20), 10, 100);
        assert_eq!(est.eta(10), Some(Duration::from_secs(15)));
    }
}
