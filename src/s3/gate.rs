//! s3::gate: the lease gate of a run on a shared manifest (PostgreSQL). While a process
//! works on units leased to it, every S3 request it starts must start before its leases
//! can have expired: the manifest's heartbeat opens the gate until a deadline after each
//! renewal, and the retry loop asks the gate before each attempt. A process that was paused
//! (SIGSTOP, a frozen VM) or cut off from the database finds the gate shut when it resumes,
//! and sends nothing more: its units' new owners reconcile what it wrote before.
//!
//! One gate per process, installed only by a run on a shared manifest; without one every
//! request may start. The deadline is read on the monotonic clock, which runs on while
//! the process is stopped.
//!
//! May call: nothing of the crate but `s3::error`.

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use super::error::{ErrorClass, S3Error};
use super::types::Side;

/// The gate (see the module header).
#[derive(Debug)]
pub struct Gate {
    state: Mutex<GateState>,
}

#[derive(Debug)]
struct GateState {
    /// Requests may start until then.
    until: Instant,
    /// Why the gate is shut for good, once it is.
    shut: Option<String>,
}

static GATE: OnceLock<Gate> = OnceLock::new();

/// Installs the process's gate, open until `until` (the first installation wins; later
/// calls reopen it until `until`).
pub fn install(until: Instant) -> &'static Gate {
    let g = GATE.get_or_init(|| Gate {
        state: Mutex::new(GateState { until, shut: None }),
    });
    g.open_until(until);
    g
}

/// The error code of a request the gate refused (see [`refused`]).
const REFUSED: &str = "NotSentLeaseExpired";

/// What the message of a refused request starts with, before the gate's reason.
const NOT_SENT: &str = "not sent: ";

/// Whether a request may start now: Err (fatal, not retried) when the process's leases may
/// have expired.
pub fn check(side: Side) -> Result<(), S3Error> {
    match GATE.get() {
        None => Ok(()),
        Some(g) => g.allows().map_err(|why| S3Error {
            code: Some(REFUSED.to_string()),
            ..S3Error::other(
                side,
                "request",
                ErrorClass::Fatal,
                format!("{NOT_SENT}{why}"),
            )
        }),
    }
}

/// Whether `e` is the gate's refusal: nothing was sent, and the task is not failed but left
/// to its unit's next owner (the process stops).
pub fn refused(e: &S3Error) -> bool {
    e.code.as_deref() == Some(REFUSED)
}

/// The gate's reason in a refused request's error (see [`refused`]).
pub fn reason(e: &S3Error) -> &str {
    e.message.strip_prefix(NOT_SENT).unwrap_or(&e.message)
}

impl Gate {
    /// Opens the gate until `until` (unless it was shut for good).
    pub fn open_until(&self, until: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.until = s.until.max(until);
    }

    /// Shuts the gate for good (the leases were lost).
    pub fn shut(&self, why: &str) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.shut.get_or_insert_with(|| why.to_string());
    }

    /// Ok while requests may start; else why not.
    pub fn allows(&self) -> Result<(), String> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &s.shut {
            return Err(why.clone());
        }
        if Instant::now() >= s.until {
            return Err(
                "this process could not renew its leases on the job's units in time (paused, or cut off from the manifest's database); their new owners take them over"
                    .to_string(),
            );
        }
        Ok(())
    }
}
