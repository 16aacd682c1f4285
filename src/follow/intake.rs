//! follow::intake: where `follow` hears of changes. `--events` is parsed here
//! ([`parse_events`], the flag's value parser); [`Intake`] opens that source (an SQS queue,
//! [`super::sqs`], or an HTTP push endpoint this process serves, [`super::push`]) and hands
//! over [`Delivery`]s that stay unacknowledged (the SQS message kept, the HTTP POST waiting)
//! until the caller has made their changes durable and calls [`Intake::ack`].
//!
//! Messages without any change (test events, records of other sources) and bodies that
//! cannot be read (said once, in one line) are acknowledged here and never handed over: they
//! can never give a change later.
//!
//! May call: [`super::records`], [`super::sqs`], [`super::push`]; `s3::SideConfig` and
//! `s3::Timeouts` (the source side's settings the SQS client is built from).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use super::records::Change;
use super::{push, sqs};
use crate::s3::side::SideConfig;
use crate::s3::Timeouts;

/// Where changes come from (`--events`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventSource {
    /// An SQS queue the source bucket notifies: a queue URL (`http://`, `https://`) or name.
    Sqs(String),
    /// An HTTP endpoint this process serves on that address (RGW topics, MinIO webhooks).
    Http(SocketAddr),
}

impl std::fmt::Display for EventSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventSource::Sqs(q) => write!(f, "sqs:{q}"),
            EventSource::Http(a) => write!(f, "http://{a}"),
        }
    }
}

const EXPECTED: &str =
    "expected sqs:QUEUE (a queue URL or name) or http://ADDR:PORT (the endpoint to serve)";

/// Parses `--events`: `sqs:QUEUE` (QUEUE a queue URL or name; `sqs://HOST/PATH` is taken as
/// `https://HOST/PATH`) or `http://ADDR:PORT` (an IP address or `localhost`, and a port). The
/// flag's clap value parser: errors are one line.
pub fn parse_events(s: &str) -> Result<EventSource, String> {
    let s = s.trim();
    if let Some(q) = s.strip_prefix("sqs:") {
        return parse_queue(q).map(EventSource::Sqs);
    }
    if let Some(addr) = s.strip_prefix("http://") {
        let addr = addr.strip_suffix('/').unwrap_or(addr);
        return parse_addr(addr).map(EventSource::Http).map_err(|why| {
            format!("{why} in {s:?}: expected http://ADDR:PORT, e.g. http://127.0.0.1:8099")
        });
    }
    if s.starts_with("https://") {
        return Err(format!(
            "{s:?}: the push endpoint is served over plain HTTP (put a TLS proxy in front), {EXPECTED}"
        ));
    }
    Err(format!("{s:?}: {EXPECTED}"))
}

fn parse_queue(q: &str) -> Result<String, String> {
    // `sqs://HOST/PATH`: a queue URL written with the scheme the issue uses.
    let q = match q.strip_prefix("//") {
        Some(rest) if rest.contains('/') => format!("https://{rest}"),
        Some(rest) => rest.to_string(),
        None => q.to_string(),
    };
    if q.starts_with("http://") || q.starts_with("https://") {
        let (_, rest) = q.split_once("://").expect("a scheme");
        match rest.split_once('/') {
            Some((host, path)) if !host.is_empty() && !path.trim_matches('/').is_empty() => {
                Ok(q.clone())
            }
            _ => Err(format!(
                "sqs:{q}: a queue URL has a host and a path (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME)"
            )),
        }
    } else {
        let name = q.strip_suffix(".fifo").unwrap_or(&q);
        if name.is_empty()
            || q.len() > 80
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "sqs:{q}: a queue name is 1-80 letters, digits, '-' or '_' (or a queue URL)"
            ));
        }
        Ok(q)
    }
}

fn parse_addr(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(a);
    }
    match addr.rsplit_once(':') {
        Some(("localhost", port)) => port
            .parse::<u16>()
            .map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p))
            .map_err(|_| format!("port {port:?} is not a number 0-65535")),
        Some((_, port)) if port.parse::<u16>().is_err() => {
            Err(format!("port {port:?} is not a number 0-65535"))
        }
        Some((host, _)) => Err(format!("{host:?} is not an IP address (or localhost)")),
        None => Err(format!("no port in {addr:?}")),
    }
}

/// Why the intake failed. One line each, naming the source.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// The push endpoint's address could not be bound (in use, not local, no permission).
    #[error("--events http://{addr}: cannot listen: {reason}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// The system's reason.
        reason: String,
    },
    /// An SQS request failed (after the SDK's retries).
    #[error("--events sqs:{queue}: {op} failed: {reason}")]
    Sqs {
        /// The queue as given (URL or name).
        queue: String,
        /// The SQS operation, e.g. `ReceiveMessage`.
        op: &'static str,
        /// The service's code and message, or the transport's error.
        reason: String,
    },
}

/// What one receive handed over: the changes of one message (SQS) or one POST (HTTP),
/// acknowledged only by [`Intake::ack`]. Dropped without an ack, the message is received
/// again after its visibility timeout (SQS) or the POST is answered 503 (HTTP).
#[derive(Debug)]
pub struct Delivery {
    /// The changes, in the body's order (never empty).
    pub changes: Vec<Change>,
    pub(super) handle: Handle,
}

/// How a delivery is acknowledged.
#[derive(Debug)]
pub(super) enum Handle {
    Sqs(sqs::Receipt),
    Http(push::Reply),
}

/// One message or POST counted in a shared number while this lives (handed over and not
/// yet acknowledged, or waiting for its answer).
#[derive(Debug)]
pub(super) struct Held(Arc<AtomicU64>);

impl Held {
    pub(super) fn new(n: &Arc<AtomicU64>) -> Held {
        n.fetch_add(1, Ordering::SeqCst);
        Held(n.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An open change intake (`--events`).
#[derive(Debug)]
pub struct Intake {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Sqs(sqs::Queue),
    Http(push::Endpoint),
}

impl Intake {
    /// Opens `src`: for SQS a client built like the source side's S3 client (`s3::build`:
    /// profile, region, endpoint from `source_side`, credentials from the standard chain)
    /// and the queue's URL (GetQueueUrl for a name); for HTTP the endpoint, bound here (so
    /// an address in use fails at start).
    pub async fn open(
        src: &EventSource,
        source_side: &SideConfig,
        timeouts: Timeouts,
    ) -> Result<Intake, IntakeError> {
        let inner = match src {
            EventSource::Sqs(q) => Inner::Sqs(sqs::Queue::open(q, source_side, timeouts).await?),
            EventSource::Http(addr) => Inner::Http(push::Endpoint::bind(*addr).await?),
        };
        Ok(Intake { inner })
    }

    /// What is listened to, for a person: the queue's URL or the endpoint's bound address.
    pub fn describe(&self) -> String {
        match &self.inner {
            Inner::Sqs(q) => format!("SQS queue {}", q.url()),
            Inner::Http(e) => format!("HTTP endpoint http://{}", e.local_addr()),
        }
    }

    /// The push endpoint's bound address (the port the system picked for port 0); None for
    /// SQS.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.inner {
            Inner::Sqs(_) => None,
            Inner::Http(e) => Some(e.local_addr()),
        }
    }

    /// Waits up to `wait` (SQS: long polls of at most 20 s) and returns what came, maybe
    /// nothing. Cancel-safe for HTTP; a cancelled SQS receive leaves its messages to come
    /// again after their visibility timeout.
    pub async fn receive(&mut self, wait: Duration) -> Result<Vec<Delivery>, IntakeError> {
        match &mut self.inner {
            Inner::Sqs(q) => q.receive(wait).await,
            Inner::Http(e) => Ok(e.receive(wait).await),
        }
    }

    /// Acknowledges deliveries once their changes are durable (SQS DeleteMessageBatch;
    /// HTTP: each waiting POST is answered 200).
    pub async fn ack(&mut self, d: Vec<Delivery>) -> Result<(), IntakeError> {
        let mut receipts = Vec::new();
        for delivery in d {
            match delivery.handle {
                Handle::Sqs(r) => receipts.push(r),
                Handle::Http(reply) => reply.ok(),
            }
        }
        match &mut self.inner {
            Inner::Sqs(q) => q.delete(receipts).await,
            Inner::Http(_) => Ok(()),
        }
    }

    /// Messages that may still be waiting, for `--until-caught-up`: SQS
    /// ApproximateNumberOfMessages + ApproximateNumberOfMessagesNotVisible, less the
    /// messages this process holds unacknowledged; HTTP: POSTs received and not yet answered.
    pub async fn backlog(&self) -> Result<u64, IntakeError> {
        match &self.inner {
            Inner::Sqs(q) => q.backlog().await,
            Inner::Http(e) => Ok(e.backlog()),
        }
    }

    /// A handle that reads [`Intake::backlog`] from another task while this intake
    /// receives in its own (an RGW topic without `persistent` holds every write to the
    /// bucket until its POST is answered, so receiving and acknowledging never pause).
    pub fn backlog_probe(&self) -> BacklogProbe {
        BacklogProbe(match &self.inner {
            Inner::Sqs(q) => Probe::Sqs(q.clone()),
            Inner::Http(e) => Probe::Http(e.waiting()),
        })
    }
}

/// Reads an [`Intake`]'s backlog from anywhere (cloned freely; it lives on after the intake
/// and then says what the queue still holds, or 0 for HTTP).
#[derive(Clone, Debug)]
pub struct BacklogProbe(Probe);

#[derive(Clone, Debug)]
enum Probe {
    Sqs(sqs::Queue),
    Http(Arc<AtomicU64>),
}

impl BacklogProbe {
    /// The same count as [`Intake::backlog`].
    pub async fn backlog(&self) -> Result<u64, IntakeError> {
        match &self.0 {
            Probe::Sqs(q) => q.backlog().await,
            Probe::Http(waiting) => Ok(waiting.load(Ordering::SeqCst)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_flag_parses_queues_and_addresses() {
        assert_eq!(
            parse_events("sqs:my-queue_1"),
            Ok(EventSource::Sqs("my-queue_1".into()))
        );
        assert_eq!(
            parse_events("sqs:orders.fifo"),
            Ok(EventSource::Sqs("orders.fifo".into()))
        );
        let url = "https://sqs.eu-west-1.amazonaws.com/123456789012/q";
        assert_eq!(
            parse_events(&format!("sqs:{url}")),
            Ok(EventSource::Sqs(url.into()))
        );
        assert_eq!(
            parse_events("sqs://sqs.eu-west-1.amazonaws.com/123456789012/q"),
            Ok(EventSource::Sqs(url.into()))
        );
        assert_eq!(
            parse_events("sqs:http://127.0.0.1:5000/123456789012/q"),
            Ok(EventSource::Sqs(
                "http://127.0.0.1:5000/123456789012/q".into()
            ))
        );
        assert_eq!(
            parse_events("http://127.0.0.1:8099"),
            Ok(EventSource::Http("127.0.0.1:8099".parse().unwrap()))
        );
        assert_eq!(
            parse_events("http://0.0.0.0:8099/"),
            Ok(EventSource::Http("0.0.0.0:8099".parse().unwrap()))
        );
        assert_eq!(
            parse_events("http://[::1]:80"),
            Ok(EventSource::Http("[::1]:80".parse().unwrap()))
        );
        assert_eq!(
            parse_events("http://localhost:8099"),
            Ok(EventSource::Http("127.0.0.1:8099".parse().unwrap()))
        );
        for s in ["sqs:my-queue", "http://127.0.0.1:8099"] {
            assert_eq!(parse_events(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn bad_events_flags_say_what_is_expected_in_one_line() {
        for (s, says) in [
            ("bogus", "expected sqs:QUEUE"),
            ("", "expected sqs:QUEUE"),
            ("sqs:", "a queue name is"),
            ("sqs:no spaces", "a queue name is"),
            ("sqs:https://sqs.amazonaws.com", "a host and a path"),
            ("http://127.0.0.1", "no port"),
            ("http://127.0.0.1:http", "not a number"),
            ("http://127.0.0.1:70000", "not a number"),
            ("http://example.com:80", "not an IP address"),
            ("https://127.0.0.1:443", "plain HTTP"),
        ] {
            let e = parse_events(s).unwrap_err();
            assert!(e.contains(says), "{s:?}: {e}");
            assert!(!e.contains('\n'), "{s:?}: {e}");
        }
    }

    /// Compiles only if an intake, its deliveries and its futures may move to a task of
    /// their own.
    #[allow(dead_code)]
    fn intake_runs_in_a_task_of_its_own(mut intake: Intake) -> tokio::task::JoinHandle<()> {
        let probe = intake.backlog_probe();
        tokio::spawn(async move {
            probe.backlog().await.unwrap();
        });
        tokio::spawn(async move {
            let got = intake.receive(Duration::ZERO).await.unwrap();
            intake.ack(got).await.unwrap();
            intake.backlog().await.unwrap();
        })
    }

    #[test]
    fn parse_events_is_a_clap_value_parser() {
        #[derive(clap::Parser)]
        struct Args {
            #[arg(long, value_parser = parse_events)]
            events: EventSource,
        }
        use clap::Parser;
        let a = Args::try_parse_from(["follow", "--events", "sqs:q"]).unwrap();
        assert_eq!(a.events, EventSource::Sqs("q".into()));
        let e = Args::try_parse_from(["follow", "--events", "bogus"])
            .err()
            .unwrap();
        assert_eq!(e.exit_code(), 2);
        let first = e.to_string().lines().next().unwrap().to_string();
        assert!(
            first.contains("--events") && first.contains("expected sqs:QUEUE"),
            "{first}"
        );
    }
}
