//! The change intake of `follow` (issue 21) against the server under test:
//! - moto: a queue the source bucket notifies (QueueConfigurations, set with aws-sdk-s3 and
//!   aws-sdk-sqs); puts, an overwrite and a version delete come out of `Intake::receive` as
//!   their keys (the bucket's test event does not), a delivery dropped without an ack comes
//!   again, acknowledged ones are deleted (a second receive is empty, the backlog 0).
//! - Ceph RGW: a topic with an HTTP push-endpoint at an `Intake` endpoint
//!   (`scripts/events.py rgw-topic`); puts, an overwrite and a delete marker arrive as their
//!   keys, raw (RGW does not URL-encode them), and each POST is answered once acknowledged.
//!   A persistent topic: a POST not acknowledged (503) is sent again.
//!
//! - moto: `scripts/events.py moto-queue` (what the end-to-end tests wire moto with) makes a
//!   queue the bucket's puts reach.
//!
//! RGW 16.2 has no SQS and moto pushes nothing over HTTP: each test runs on its server and
//! says so on the other.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Once;
use std::time::Duration;

use aws_sdk_s3::types::{Event, NotificationConfiguration, QueueConfiguration};
use aws_sdk_sqs::types::QueueAttributeName;
use s3_backfill::follow::{Change, Delivery, EventSource, Intake};
use s3_backfill::s3::side::SideConfig;
use s3_backfill::s3::Timeouts;
use support::*;

/// The standard credential chain of the in-process intake finds the test account here.
fn credentials() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", KEY_ID);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET);
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        std::env::set_var("AWS_CONFIG_FILE", "/dev/null");
        std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
        std::env::remove_var("AWS_PROFILE");
        std::env::remove_var("AWS_ENDPOINT_URL");
    });
}

/// A new versioned source bucket (and the credentials the intake reads).
async fn source_bucket(tag: &str) -> (aws_sdk_s3::Client, String) {
    credentials();
    let c = client(&endpoint());
    let b = bucket(tag);
    create_bucket(&c, &b, true).await;
    (c, b)
}

/// The source side as a job stores it.
fn source_side() -> SideConfig {
    SideConfig {
        endpoint: Some(endpoint()),
        region: Some("us-east-1".into()),
        path_style: true,
        ..SideConfig::default()
    }
}

fn sqs_client() -> aws_sdk_sqs::Client {
    let conf = aws_sdk_sqs::config::Builder::new()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .endpoint_url(endpoint())
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            KEY_ID, SECRET, None, None, "test",
        ))
        .build();
    aws_sdk_sqs::Client::from_conf(conf)
}

/// Receives until `n` changes came (or 30 s passed), acknowledging every delivery when
/// `ack`, else keeping them (returned).
async fn collect(intake: &mut Intake, n: usize, ack: bool) -> (Vec<Change>, Vec<Delivery>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut changes = Vec::new();
    let mut kept = Vec::new();
    while changes.len() < n && tokio::time::Instant::now() < deadline {
        let got = intake.receive(Duration::from_secs(2)).await.unwrap();
        let now_ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        for d in &got {
            assert!(!d.changes.is_empty(), "a delivery without changes");
            for ch in &d.changes {
                // A figure for the issue (event time → handed over), not a check.
                let after = ch.event_time_ms.map(|t| now_ms as i64 - t);
                println!(
                    "{} {:?}: received {after:?} ms after its event",
                    ch.event_name, ch.key
                );
            }
            changes.extend(d.changes.iter().cloned());
        }
        if ack {
            intake.ack(got).await.unwrap();
        } else {
            kept.extend(got);
        }
    }
    (changes, kept)
}

/// The set of one key's one event.
fn one(key: &str, event: &str) -> BTreeSet<(String, String)> {
    BTreeSet::from([(key.to_string(), event.to_string())])
}

fn keys_and_events(changes: &[Change]) -> BTreeSet<(String, String)> {
    changes
        .iter()
        .map(|c| (c.key.clone(), c.event_name.clone()))
        .collect()
}

#[tokio::test]
async fn sqs_queue_hands_over_changes_until_acknowledged() {
    if unsupported_on(
        Server::Rgw,
        "RGW 16.2 has no SQS (its push endpoint is tested by rgw_topic_pushes_to_the_endpoint)",
    ) {
        return;
    }
    let (c, b) = source_bucket("intake-sqs").await;
    let sqs = sqs_client();
    let queue = format!("{b}-q");
    let url = sqs
        .create_queue()
        .queue_name(&queue)
        // A delivery dropped without an ack comes again after 2 s.
        .attributes(QueueAttributeName::VisibilityTimeout, "2")
        .send()
        .await
        .expect("create queue")
        .queue_url()
        .unwrap()
        .to_string();
    let arn = sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("queue attributes")
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .expect("a queue ARN");
    c.put_bucket_notification_configuration()
        .bucket(&b)
        .notification_configuration(
            NotificationConfiguration::builder()
                .queue_configurations(
                    QueueConfiguration::builder()
                        .queue_arn(arn)
                        .events(Event::from("s3:ObjectCreated:*"))
                        .events(Event::from("s3:ObjectRemoved:*"))
                        .build()
                        .unwrap(),
                )
                .build(),
        )
        .send()
        .await
        .expect("put bucket notification configuration");

    // By name (GetQueueUrl); the queue already holds the bucket's s3:TestEvent.
    let mut intake = Intake::open(
        &EventSource::Sqs(queue.clone()),
        &source_side(),
        Timeouts::default(),
    )
    .await
    .expect("open the queue");
    assert!(intake.describe().contains(&url), "{}", intake.describe());

    let odd = "a b+c%d/é?x&y=z";
    apply(&c, &b, Op::put(odd, "1")).await;
    apply(&c, &b, Op::put(odd, "2")).await;
    let gone = c
        .put_object()
        .bucket(&b)
        .key("gone")
        .body(b"3".to_vec().into())
        .send()
        .await
        .unwrap();
    // moto notifies a version's deletion (ObjectRemoved:Delete), not a delete marker's.
    c.delete_object()
        .bucket(&b)
        .key("gone")
        .version_id(gone.version_id().unwrap())
        .send()
        .await
        .unwrap();

    // Taken and not acknowledged: the messages come again after their visibility timeout.
    let (first, kept) = collect(&mut intake, 4, false).await;
    assert_eq!(first.len(), 4, "{first:?}");
    assert_eq!(
        intake.backlog().await.unwrap(),
        0,
        "held messages are not backlog"
    );
    drop(kept);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let probe = intake.backlog_probe();
    assert!(
        probe.backlog().await.unwrap() > 0,
        "dropped deliveries wait again"
    );

    let (changes, _) = collect(&mut intake, 4, true).await;
    let expected: BTreeSet<(String, String)> = [
        (odd, "ObjectCreated:Put"),
        ("gone", "ObjectCreated:Put"),
        ("gone", "ObjectRemoved:Delete"),
    ]
    .into_iter()
    .map(|(k, e)| (k.to_string(), e.to_string()))
    .collect();
    assert_eq!(keys_and_events(&changes), expected);
    assert_eq!(changes.len(), 4, "{changes:?}");
    assert_eq!(keys_and_events(&first), expected);
    for ch in &changes {
        assert_eq!(ch.bucket, b);
        assert!(ch.event_time_ms.is_some(), "{ch:?}");
    }

    // Acknowledged: deleted from the queue.
    assert!(intake
        .receive(Duration::from_secs(3))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(intake.backlog().await.unwrap(), 0);
    let left = sqs
        .receive_message()
        .queue_url(&url)
        .max_number_of_messages(10)
        .send()
        .await
        .unwrap();
    assert!(left.messages().is_empty(), "{:?}", left.messages());

    // By URL too.
    let by_url = Intake::open(
        &EventSource::Sqs(url.clone()),
        &source_side(),
        Timeouts::default(),
    )
    .await
    .expect("open the queue by URL");
    assert_eq!(by_url.backlog().await.unwrap(), 0);
    // A queue that does not exist: one line at open.
    let err = Intake::open(
        &EventSource::Sqs(format!("{b}-none")),
        &source_side(),
        Timeouts::default(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with(&format!("--events sqs:{b}-none: GetQueueUrl failed: ")),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");
}

fn python() -> std::path::PathBuf {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    if venv.exists() {
        venv
    } else {
        "python3".into()
    }
}

/// Runs `scripts/events.py SUBCOMMAND --endpoint E --bucket B ARGS...` with the test
/// account's keys and returns its last stdout line.
fn events_py(subcommand: &str, bucket: &str, args: &[&str]) -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/events.py");
    let o = Command::new(python())
        .arg(script)
        .args([subcommand, "--endpoint", &endpoint(), "--bucket", bucket])
        .args(args)
        .args(["--access-key", KEY_ID, "--secret-key", SECRET])
        .output()
        .expect("run scripts/events.py");
    assert!(
        o.status.success(),
        "events.py {subcommand}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    out.lines().last().unwrap_or_default().trim().to_string()
}

/// `scripts/events.py rgw-topic`: the bucket's writes are POSTed to `push` (with `extra`
/// flags, e.g. `--persistent`).
fn rgw_topic(bucket: &str, push: SocketAddr, extra: &[&str]) {
    let push = format!("http://{push}");
    let mut args = vec!["--push", &push];
    args.extend_from_slice(extra);
    let arn = events_py("rgw-topic", bucket, &args);
    assert!(arn.starts_with("arn:aws:sns:"), "{arn}");
}

#[tokio::test]
async fn events_script_wires_a_moto_queue() {
    if unsupported_on(Server::Rgw, "RGW 16.2 has no SQS") {
        return;
    }
    let (c, b) = source_bucket("intake-script").await;
    let url = events_py("moto-queue", &b, &["--queue", &format!("{b}-q")]);
    assert!(
        url.starts_with("http://") && url.ends_with(&format!("/{b}-q")),
        "{url}"
    );
    let mut intake = Intake::open(&EventSource::Sqs(url), &source_side(), Timeouts::default())
        .await
        .expect("open the queue by URL");
    apply(&c, &b, Op::put("k", "1")).await;
    let (changes, _) = collect(&mut intake, 1, true).await;
    assert_eq!(keys_and_events(&changes), one("k", "ObjectCreated:Put"));
    assert_eq!(intake.backlog().await.unwrap(), 0);
}

/// A new source bucket whose writes an RGW topic (`scripts/events.py rgw-topic` with
/// `extra` flags) pushes to a new intake endpoint.
async fn pushed_bucket(tag: &str, extra: &[&str]) -> (aws_sdk_s3::Client, String, Intake) {
    let (c, b) = source_bucket(tag).await;
    let intake = Intake::open(
        &EventSource::Http("127.0.0.1:0".parse().unwrap()),
        &source_side(),
        Timeouts::default(),
    )
    .await
    .expect("serve the push endpoint");
    rgw_topic(&b, intake.local_addr().unwrap(), extra);
    (c, b, intake)
}

#[tokio::test]
async fn rgw_topic_pushes_to_the_endpoint() {
    if unsupported_on(
        Server::Moto,
        "moto pushes no notifications over HTTP (its queue is tested by sqs_queue_hands_over_changes_until_acknowledged)",
    ) {
        return;
    }
    let (c, b, mut intake) = pushed_bucket("intake-push", &[]).await;

    // RGW 16.2 sends a non-persistent topic's notification before it answers the write:
    // each write waits for the POST's answer, so the writer runs beside the receiver.
    let odd = "a b+c%d/é?x&y=z";
    let writer = {
        let c = c.clone();
        let b = b.clone();
        tokio::spawn(async move {
            for op in [
                Op::put(odd, "1"),
                Op::put(odd, "2"),
                Op::Delete { key: odd.into() },
                Op::put("dir/x", "3"),
            ] {
                apply(&c, &b, op).await;
            }
        })
    };
    let (changes, _) = collect(&mut intake, 4, true).await;
    tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("the writes are answered once their events are acknowledged")
        .unwrap();
    let got: Vec<(String, String)> = changes
        .iter()
        .map(|c| (c.key.clone(), c.event_name.clone()))
        .collect();
    let want: Vec<(String, String)> = [
        (odd, "ObjectCreated:Put"),
        (odd, "ObjectCreated:Put"),
        (odd, "ObjectRemoved:DeleteMarkerCreated"),
        ("dir/x", "ObjectCreated:Put"),
    ]
    .into_iter()
    .map(|(k, e)| (k.to_string(), e.to_string()))
    .collect();
    // One writer, each write waiting for its event: they come in order.
    assert_eq!(got, want);
    assert!(changes[0].version_id.is_some() && changes[0].version_id != changes[1].version_id);
    assert_eq!(
        changes[2].version_id, None,
        "RGW 16.2 names no delete marker's version"
    );
    for ch in &changes {
        assert_eq!(ch.bucket, b);
        assert!(ch.event_time_ms.is_some(), "{ch:?}");
    }
    assert_eq!(intake.backlog().await.unwrap(), 0);
    assert!(intake
        .receive(Duration::from_millis(500))
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn rgw_persistent_topic_sends_again_what_was_not_acknowledged() {
    if unsupported_on(Server::Moto, "moto pushes no notifications over HTTP") {
        return;
    }
    let (c, b, mut intake) = pushed_bucket("intake-persist", &["--persistent"]).await;
    // A persistent topic: the write does not wait for the endpoint.
    apply(&c, &b, Op::put("p", "1")).await;
    let (first, kept) = collect(&mut intake, 1, false).await;
    assert_eq!(keys_and_events(&first), one("p", "ObjectCreated:Put"));
    let probe = intake.backlog_probe();
    assert_eq!(
        probe.backlog().await.unwrap(),
        1,
        "the POST waits for its answer"
    );
    // Not acknowledged: answered 503, and RGW sends it again.
    drop(kept);
    let (again, _) = collect(&mut intake, 1, true).await;
    assert_eq!(again, first);
    // Once the topic's queue runs, the next event comes at once (printed).
    apply(&c, &b, Op::put("q", "2")).await;
    let (next, _) = collect(&mut intake, 1, true).await;
    assert_eq!(keys_and_events(&next), one("q", "ObjectCreated:Put"));
    assert!(intake
        .receive(Duration::from_secs(2))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(intake.backlog().await.unwrap(), 0);
}
