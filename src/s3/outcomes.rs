//! s3::outcomes: what the retry loop saw of its requests' answers, for the metrics endpoint:
//! failed attempts by side, operation and error class, and retries by side. (Requests sent
//! are counted by the clients, [`super::RequestCounts`]; a request that did not fail
//! succeeded.)
//!
//! May call: the rest of `s3` (its error and side types).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::error::{ErrorClass, S3Error};
use super::types::Side;

/// The failures and retries of one retry loop (so of the handles that share it).
#[derive(Debug, Default)]
pub struct Outcomes {
    /// Failed attempts: (side, operation, class) → count. Failures are few: one lock.
    failed: Mutex<BTreeMap<(u8, &'static str, &'static str), u64>>,
    /// Retries (attempts repeated after a retryable failure), source then destination.
    retried: [AtomicU64; 2],
}

/// One row of [`Outcomes::failures`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failures {
    /// The side whose request failed.
    pub side: Side,
    /// The S3 operation.
    pub op: &'static str,
    /// The error class (`ErrorClass::as_str`).
    pub class: &'static str,
    /// Failed attempts.
    pub count: u64,
}

fn index(side: Side) -> u8 {
    match side {
        Side::Source => 0,
        Side::Dest => 1,
    }
}

impl Outcomes {
    /// Counts one failed attempt.
    pub fn failed(&self, e: &S3Error) {
        let class: ErrorClass = e.class;
        let key = (index(e.side), e.op, class.as_str());
        *self
            .failed
            .lock()
            .expect("outcomes lock")
            .entry(key)
            .or_default() += 1;
    }

    /// Counts one retry of a request of `side`.
    pub fn retried(&self, side: Side) {
        self.retried[index(side) as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The failed attempts so far, by side, operation and class.
    pub fn failures(&self) -> Vec<Failures> {
        let failed = self.failed.lock().expect("outcomes lock");
        failed
            .iter()
            .map(|(&(side, op, class), &count)| Failures {
                side: if side == 0 { Side::Source } else { Side::Dest },
                op,
                class,
                count,
            })
            .collect()
    }

    /// The retries of `side`'s requests so far.
    pub fn retries(&self, side: Side) -> u64 {
        self.retried[index(side) as usize].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_by_side_operation_and_class() {
        let o = Outcomes::default();
        let e = |side, op, class| S3Error::other(side, op, class, String::new());
        o.failed(&e(Side::Dest, "PutObject", ErrorClass::Throttled));
        o.failed(&e(Side::Dest, "PutObject", ErrorClass::Throttled));
        o.failed(&e(Side::Source, "GetObject", ErrorClass::Fatal));
        o.retried(Side::Dest);
        let rows = o.failures();
        assert_eq!(rows.len(), 2);
        assert!(rows.contains(&Failures {
            side: Side::Dest,
            op: "PutObject",
            class: "throttled",
            count: 2
        }));
        assert_eq!((o.retries(Side::Source), o.retries(Side::Dest)), (0, 1));
    }
}
