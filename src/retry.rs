//! retry: the one place that classifies S3 errors, retries them with backoff (backon), and
//! bounds the requests in flight (AIMD on throttling, optional requests-per-second cap).
//!
//! The SDK's own retries are disabled (see [`crate::config::build_client`]): this module is
//! the only retry layer, so attempts never multiply.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use backon::{ExponentialBuilder, Retryable};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::config::Side;

/// What kind of failure an error is, which decides what happens next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorClass {
    /// Transient (5xx, timeouts, resets, truncated bodies): retry.
    Retryable,
    /// The server asks to slow down: retry, and lower the requests in flight.
    Throttled,
    /// The source version no longer exists: the task is skipped, not failed.
    SourceGone,
    /// Will not go away by retrying (access denied, invalid request, missing bucket).
    Fatal,
}

impl ErrorClass {
    /// Whether another attempt may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorClass::Retryable | ErrorClass::Throttled)
    }

    /// The name stored in the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Retryable => "retryable",
            ErrorClass::Throttled => "throttled",
            ErrorClass::SourceGone => "source-gone",
            ErrorClass::Fatal => "fatal",
        }
    }
}

/// One classified S3 error: which side and operation, the code, the HTTP status, the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Error {
    /// Which side's request failed.
    pub side: Side,
    /// The S3 operation (e.g. `CopyObject`).
    pub op: &'static str,
    /// The classification.
    pub class: ErrorClass,
    /// The S3 error code, when the server sent one.
    pub code: Option<String>,
    /// The HTTP status, when there was a response.
    pub status: Option<u16>,
    /// A human-readable message (never contains credentials).
    pub message: String,
}

impl fmt::Display for S3Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} failed", self.side, self.op)?;
        match (&self.code, self.status) {
            (Some(c), Some(s)) => write!(f, " ({c}, HTTP {s})")?,
            (Some(c), None) => write!(f, " ({c})")?,
            (None, Some(s)) => write!(f, " (HTTP {s})")?,
            (None, None) => {}
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for S3Error {}

impl S3Error {
    /// An error that did not come from the SDK (e.g. a failed integrity check).
    pub fn other(side: Side, op: &'static str, class: ErrorClass, message: String) -> S3Error {
        S3Error {
            side,
            op,
            class,
            code: None,
            status: None,
            message,
        }
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        self.class.is_retryable()
    }
}

const THROTTLE_CODES: &[&str] = &[
    "SlowDown",
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "TooManyRequests",
    "TooManyRequestsException",
    "RequestThrottled",
    "RequestThrottledException",
    "ProvisionedThroughputExceededException",
];

const RETRYABLE_CODES: &[&str] = &[
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "IDPCommunicationError",
    "OperationAborted",
];

/// Classifies a code and status. `reads_source` says whether the operation reads the source
/// version (then NoSuchKey/NoSuchVersion mean the version is gone).
pub fn classify_code(code: Option<&str>, status: Option<u16>, reads_source: bool) -> ErrorClass {
    if let Some(c) = code {
        if THROTTLE_CODES.contains(&c) {
            return ErrorClass::Throttled;
        }
        if RETRYABLE_CODES.contains(&c) {
            return ErrorClass::Retryable;
        }
        // HEAD answers carry no body: the SDK names a 404 `NotFound`.
        if reads_source && (c == "NoSuchKey" || c == "NoSuchVersion" || c == "NotFound") {
            return ErrorClass::SourceGone;
        }
    }
    match status {
        Some(429) | Some(503) => ErrorClass::Throttled,
        Some(s) if s >= 500 => ErrorClass::Retryable,
        Some(408) => ErrorClass::Retryable,
        Some(404) if reads_source && code.is_none() => ErrorClass::SourceGone,
        _ => ErrorClass::Fatal,
    }
}

/// Classifies an SDK error into an [`S3Error`].
pub fn classify<E>(
    side: Side,
    op: &'static str,
    reads_source: bool,
    err: SdkError<E, aws_smithy_runtime_api::http::Response>,
) -> S3Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ConstructionFailure(_) => S3Error::other(
            side,
            op,
            ErrorClass::Fatal,
            DisplayErrorContext(&err).to_string(),
        ),
        SdkError::TimeoutError(_) => {
            S3Error::other(side, op, ErrorClass::Retryable, "timed out".into())
        }
        SdkError::DispatchFailure(d) => {
            let message = dispatch_message(&err);
            if message.to_ascii_lowercase().contains("credential") || is_identity_error(&err) {
                // No credentials could be resolved: a configuration error, not a network one.
                return S3Error::other(
                    side,
                    op,
                    ErrorClass::Fatal,
                    format!("no usable credentials for the {side} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or --{side}-profile): {message}"),
                );
            }
            // Connection refused, reset, DNS, TLS: the request may or may not have arrived.
            let class = if d.is_user() {
                ErrorClass::Fatal
            } else {
                ErrorClass::Retryable
            };
            S3Error::other(side, op, class, message)
        }
        SdkError::ResponseError(r) => {
            // A response that could not be read or parsed (truncated body, reset mid-body).
            let status = Some(r.raw().status().as_u16());
            S3Error {
                side,
                op,
                class: ErrorClass::Retryable,
                code: None,
                status,
                message: "response could not be read (connection cut or body truncated)".into(),
            }
        }
        _ => {
            let status = err.raw_response().map(|r| r.status().as_u16());
            let code = err.code().map(str::to_string);
            let message =
                err.message()
                    .map(str::to_string)
                    .unwrap_or_else(|| match (&code, status) {
                        (Some(_), _) => String::new(),
                        // HEAD answers have no body: say what the status means.
                        (None, Some(403)) => "access denied".into(),
                        (None, Some(404)) => "not found".into(),
                        (None, Some(400)) => "bad request".into(),
                        (None, Some(s)) if s >= 500 => "server error".into(),
                        (None, _) => "no error details in the response".into(),
                    });
            let class = classify_code(code.as_deref(), status, reads_source);
            S3Error {
                side,
                op,
                class,
                code,
                status,
                message,
            }
        }
    }
}

/// Whether any cause in the chain is a failed credentials lookup.
fn is_identity_error<E: std::error::Error + 'static>(err: &E) -> bool {
    let mut src = err.source();
    while let Some(s) = src {
        let text = format!("{s:?}");
        if text.contains("CredentialsNotLoaded") || text.contains("ProviderError") {
            return true;
        }
        src = s.source();
    }
    false
}

fn dispatch_message<E: std::error::Error + 'static>(err: &E) -> String {
    // The innermost cause is the useful part ("Connection refused", "connection reset").
    let mut msg = String::from("could not send the request");
    let mut src = err.source();
    let mut last = None;
    while let Some(s) = src {
        last = Some(s.to_string());
        src = s.source();
    }
    if let Some(l) = last {
        // Some causes span lines (e.g. every credential provider tried): keep one line.
        let l: Vec<&str> = l.lines().map(str::trim).filter(|x| !x.is_empty()).collect();
        msg.push_str(": ");
        msg.push_str(&l.join("; "));
    }
    msg
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
/// never leaves `1..=max`. An optional pacer caps requests per second.
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<LimitState>,
    notify: Notify,
    pacer: Option<Mutex<Instant>>,
    interval: Duration,
    throttles: AtomicU64,
}

#[derive(Debug)]
struct LimitState {
    in_flight: usize,
    limit: f64,
    max: usize,
    last_cut: Option<Instant>,
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
        let (pacer, interval) = match max_rps {
            Some(r) if r > 0.0 => (
                Some(Mutex::new(Instant::now())),
                Duration::from_secs_f64(1.0 / r),
            ),
            _ => (None, Duration::ZERO),
        };
        Limiter {
            state: Mutex::new(LimitState {
                in_flight: 0,
                limit: max as f64,
                max,
                last_cut: None,
            }),
            notify: Notify::new(),
            pacer,
            interval,
            throttles: AtomicU64::new(0),
        }
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
        if let Some(p) = &self.pacer {
            let at = {
                let mut next = p.lock().expect("pacer lock");
                let now = Instant::now();
                let at = (*next).max(now);
                *next = at + self.interval;
                at
            };
            tokio::time::sleep_until(at.into()).await;
        }
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
        }
    }

    /// The current bound on requests in flight.
    pub fn current_limit(&self) -> usize {
        self.state.lock().expect("limiter lock").limit.floor() as usize
    }

    /// How many throttling answers were seen.
    pub fn throttles(&self) -> u64 {
        self.throttles.load(Ordering::Relaxed)
    }
}

/// Runs one S3 request with a slot from `limiter`, retrying retryable errors per `policy`.
/// `retries` is incremented once per retry. The request closure is called once per attempt.
pub async fn with_retry<T, F, Fut>(
    policy: &RetryPolicy,
    limiter: &Limiter,
    retries: &AtomicU64,
    f: F,
) -> Result<T, S3Error>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, S3Error>>,
{
    let attempt = || async {
        let _permit = limiter.acquire().await;
        let r = f().await;
        match &r {
            Ok(_) => limiter.on_success(),
            Err(e) if e.class == ErrorClass::Throttled => limiter.on_throttle(),
            Err(_) => {}
        }
        r
    };
    attempt
        .retry(policy.backoff())
        .sleep(tokio::time::sleep)
        .when(|e: &S3Error| e.is_retryable())
        .notify(|e: &S3Error, d: Duration| {
            retries.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("retrying in {d:?} after: {e}");
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_codes() {
        assert_eq!(
            classify_code(Some("SlowDown"), Some(503), false),
            ErrorClass::Throttled
        );
        assert_eq!(classify_code(None, Some(429), false), ErrorClass::Throttled);
        assert_eq!(
            classify_code(Some("InternalError"), Some(500), false),
            ErrorClass::Retryable
        );
        assert_eq!(classify_code(None, Some(502), false), ErrorClass::Retryable);
        assert_eq!(
            classify_code(Some("NoSuchVersion"), Some(404), true),
            ErrorClass::SourceGone
        );
        assert_eq!(
            classify_code(Some("NoSuchKey"), Some(404), false),
            ErrorClass::Fatal
        );
        assert_eq!(
            classify_code(Some("AccessDenied"), Some(403), true),
            ErrorClass::Fatal
        );
        assert_eq!(
            classify_code(Some("NoSuchBucket"), Some(404), true),
            ErrorClass::Fatal
        );
    }

    #[tokio::test]
    async fn retries_until_success_and_counts() {
        let policy = RetryPolicy {
            max_attempts: 5,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        };
        let limiter = Limiter::new(4, None);
        let retries = AtomicU64::new(0);
        let calls = AtomicU64::new(0);
        let r = with_retry(&policy, &limiter, &retries, || async {
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
        assert_eq!(limiter.throttles(), 2);
        assert!(limiter.current_limit() < 4);
    }

    #[tokio::test]
    async fn fatal_is_not_retried() {
        let policy = RetryPolicy::default();
        let limiter = Limiter::new(2, None);
        let retries = AtomicU64::new(0);
        let calls = AtomicU64::new(0);
        let r: Result<(), _> = with_retry(&policy, &limiter, &retries, || async {
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
