//! s3::error: every S3 failure as one typed, classified value ([`S3Error`]), and the one place
//! that turns an SDK error into it. Classes decide what happens next: retry, slow down, fail,
//! skip (the source version is gone), or skip as archived (restore first).
//!
//! May call: the SDK's error types only.

use std::fmt;

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use serde::{Deserialize, Serialize};

use super::types::Side;

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
    /// The source version is in an archive storage class (GLACIER, DEEP_ARCHIVE): it must be
    /// restored before it can be read; the task is skipped with that reason.
    Archived,
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
            ErrorClass::Archived => "archived",
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
    /// The bucket's region, when the answer named it (`x-amz-bucket-region`, e.g. with a 301
    /// for a request signed for another region).
    pub bucket_region: Option<String>,
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
            bucket_region: None,
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
        // An archived (GLACIER, DEEP_ARCHIVE) version that is not restored.
        if reads_source && c == "InvalidObjectState" {
            return ErrorClass::Archived;
        }
    }
    match status {
        Some(429) | Some(503) => ErrorClass::Throttled,
        // The server does not implement the operation: retrying cannot help.
        Some(501) => ErrorClass::Fatal,
        Some(s) if s >= 500 => ErrorClass::Retryable,
        Some(408) => ErrorClass::Retryable,
        Some(404) if reads_source && code.is_none() => ErrorClass::SourceGone,
        _ => ErrorClass::Fatal,
    }
}

// Long on purpose: one arm per kind of SDK failure, each building its error in place.
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
                bucket_region: None,
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
                        (None, Some(301)) => "the bucket is in another region".into(),
                        (None, Some(501)) => "not implemented by this server".into(),
                        (None, Some(s)) if s >= 500 => "server error".into(),
                        (None, _) => "no error details in the response".into(),
                    });
            let class = classify_code(code.as_deref(), status, reads_source);
            let bucket_region = err
                .raw_response()
                .and_then(|r| r.headers().get("x-amz-bucket-region"))
                .map(str::to_string);
            S3Error {
                side,
                op,
                class,
                code,
                status,
                message,
                bucket_region,
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
        // A server that does not implement an operation: fatal at once, not retried.
        assert_eq!(
            classify_code(Some("NotImplemented"), Some(501), false),
            ErrorClass::Fatal
        );
        assert_eq!(
            classify_code(Some("InvalidObjectState"), Some(403), true),
            ErrorClass::Archived
        );
    }
}
