//! s3::outcomes: what became of one client's requests, for the metrics endpoint: its failed
//! attempts by operation and error class, and its retries (attempts repeated by the retry
//! loop). Kept beside the client's request counts ([`super::RequestCounts::outcomes`]) and
//! counted by the retry loop, which every handle of the client (a run's, a probe's) hands
//! it; a request that did not fail succeeded.
//!
//! May call: the rest of `s3` (its error type).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::error::S3Error;

/// The failures and retries of one client's requests.
#[derive(Debug, Default)]
pub struct Outcomes {
    /// Failed attempts: (operation, class) → count. Failures are few: one lock.
    failed: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Attempts repeated after a failure.
    retried: AtomicU64,
}

impl Outcomes {
    /// Counts one failed attempt.
    pub fn failed(&self, e: &S3Error) {
        let key = (e.op, e.class.as_str());
        *self
            .failed
            .lock()
            .expect("outcomes lock")
            .entry(key)
            .or_default() += 1;
    }

    /// Counts one retry (an attempt repeated after a failure).
    pub fn retried(&self) {
        self.retried.fetch_add(1, Ordering::Relaxed);
    }

    /// The failed attempts so far: (operation, error class as `ErrorClass::as_str`, count).
    pub fn failures(&self) -> Vec<(&'static str, &'static str, u64)> {
        let failed = self.failed.lock().expect("outcomes lock");
        failed
            .iter()
            .map(|(&(op, class), &n)| (op, class, n))
            .collect()
    }

    /// The retries so far.
    pub fn retries(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::{ErrorClass, Side};

    #[test]
    fn failures_are_counted_by_operation_and_class() {
        let o = Outcomes::default();
        let e = |op, class| S3Error::other(Side::Dest, op, class, String::new());
        o.failed(&e("PutObject", ErrorClass::Throttled));
        o.failed(&e("PutObject", ErrorClass::Throttled));
        o.failed(&e("PutObject", ErrorClass::Fatal));
        o.retried();
        assert_eq!(
            o.failures(),
            vec![("PutObject", "fatal", 1), ("PutObject", "throttled", 2)]
        );
        assert_eq!(o.retries(), 1);
    }
}
