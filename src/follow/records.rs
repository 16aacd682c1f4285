//! follow::records: the bodies of S3 event notifications read into [`Change`]s. One shape
//! under several envelopes: `{"Records":[...]}` as AWS puts it in an SQS message (moto too),
//! as Ceph RGW POSTs it to a topic's push endpoint and as a MinIO webhook sends it; the same
//! inside an SNS notification (`{"Type":"Notification","Message":"<json>"}`); AWS's
//! `s3:TestEvent` (sent when a bucket's notifications are set) and records of other event
//! sources give no change.
//!
//! Keys: AWS, moto and MinIO URL-encode them ('+' for a space); Ceph RGW 16.2 sends them as
//! they are (measured: `a b+c%d` arrives as `a b+c%d`), so a record's `eventSource` says
//! which (`ceph:s3` is not decoded).
//!
//! May call: serde_json, time, `s3::xml::url_decode`.

use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// One change an event says happened: "key K of bucket B changed".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The bucket the event came from.
    pub bucket: String,
    /// The key, decoded (S3 event keys are URL-encoded, '+' for a space; RGW's are not).
    pub key: String,
    /// The event's name without the `s3:` prefix, e.g. `ObjectCreated:Put`,
    /// `ObjectRemoved:DeleteMarkerCreated`.
    pub event_name: String,
    /// Unix milliseconds of the record's `eventTime` (None: absent or unreadable).
    pub event_time_ms: Option<i64>,
    /// The version the event is about (None: absent, or empty as RGW 16.2 sends it for a
    /// delete marker).
    pub version_id: Option<String>,
}

/// Why a body gave no changes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    /// Not JSON at all (an HTTP POST of it is answered 400).
    #[error("not JSON ({0})")]
    NotJson(String),
    /// JSON, but not an event body this tool reads.
    #[error("not an S3 event body ({0})")]
    NotEvents(String),
}

/// The outer object: S3 records, an SNS envelope or a test event.
#[derive(Deserialize)]
struct Body {
    #[serde(rename = "Records")]
    records: Option<Vec<Record>>,
    /// SNS: `Notification`, `SubscriptionConfirmation`, ...
    #[serde(rename = "Type")]
    kind: Option<String>,
    /// SNS: the notified message (the S3 body, as a string).
    #[serde(rename = "Message")]
    message: Option<String>,
    /// AWS's test event: `s3:TestEvent`.
    #[serde(rename = "Event")]
    event: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    event_source: Option<String>,
    #[serde(default)]
    event_name: String,
    event_time: Option<String>,
    s3: Option<S3Entity>,
}

#[derive(Deserialize)]
struct S3Entity {
    bucket: Option<Named>,
    object: Option<Object>,
}

#[derive(Deserialize)]
struct Named {
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Object {
    key: Option<String>,
    version_id: Option<String>,
}

/// The changes a notification body holds, in the body's order. Test events and records of
/// other sources give none (`Ok` of an empty list).
pub fn parse_body(body: &[u8]) -> Result<Vec<Change>, BodyError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| BodyError::NotJson(e.to_string()))?;
    from_value(value, true)
}

fn from_value(value: serde_json::Value, outer: bool) -> Result<Vec<Change>, BodyError> {
    if !value.is_object() {
        return Err(BodyError::NotEvents("not a JSON object".into()));
    }
    let body: Body =
        serde_json::from_value(value).map_err(|e| BodyError::NotEvents(e.to_string()))?;
    if let Some(records) = body.records {
        return records.into_iter().filter_map(change).collect();
    }
    if body.event.as_deref() == Some("s3:TestEvent") {
        return Ok(Vec::new());
    }
    match (body.kind.as_deref(), body.message) {
        (Some("Notification"), Some(message)) if outer => {
            let inner: serde_json::Value = serde_json::from_str(&message).map_err(|e| {
                BodyError::NotEvents(format!("an SNS message that is not JSON: {e}"))
            })?;
            from_value(inner, false)
        }
        (Some(kind), _) => Err(BodyError::NotEvents(format!(
            "an SNS {kind}, not a Notification with S3 records"
        ))),
        (None, _) => Err(BodyError::NotEvents("no Records".into())),
    }
}

/// The change one record says happened; None for a record of another event source.
fn change(r: Record) -> Option<Result<Change, BodyError>> {
    let source = r.event_source.unwrap_or_default();
    if !source.is_empty() && !source.ends_with(":s3") {
        return None;
    }
    let Some(s3) = r.s3 else {
        return Some(Err(BodyError::NotEvents(format!(
            "a record of {source:?} without \"s3\""
        ))));
    };
    let bucket = s3.bucket.and_then(|b| b.name);
    let object = s3.object.unwrap_or(Object {
        key: None,
        version_id: None,
    });
    let (Some(bucket), Some(key)) = (bucket, object.key) else {
        return Some(Err(BodyError::NotEvents(
            "a record without s3.bucket.name or s3.object.key".into(),
        )));
    };
    let key = if source == "ceph:s3" {
        key
    } else {
        crate::s3::xml::url_decode(&key)
    };
    let event_name = r
        .event_name
        .strip_prefix("s3:")
        .unwrap_or(&r.event_name)
        .to_string();
    Some(Ok(Change {
        bucket,
        key,
        event_name,
        event_time_ms: r.event_time.as_deref().and_then(unix_ms),
        version_id: object.version_id.filter(|v| !v.is_empty()),
    }))
}

/// Unix milliseconds of an RFC 3339 time (fractions of any length: RGW gives microseconds,
/// AWS and moto milliseconds).
fn unix_ms(t: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(t, &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as Ceph RGW 16.2 POSTs it (captured from this project's test cluster): raw
    /// key, microseconds, an empty version id for a delete marker.
    const RGW: &str = r#"{"Records":[{"eventVersion":"2.2","eventSource":"ceph:s3","awsRegion":"","eventTime":"2026-12-03T14:35:27.056900Z","eventName":"ObjectCreated:Put","userIdentity":{"principalId":"testing"},"requestParameters":{"sourceIPAddress":""},"responseElements":{"x-amz-request-id":"b3b7.4124.85","x-amz-id-2":"101c-default-default"},"s3":{"s3SchemaVersion":"1.0","configurationId":"evt1-follow","bucket":{"name":"evt1","ownerIdentity":{"principalId":"testing"},"arn":"arn:aws:s3:::evt1","id":"b3b7.4126.2"},"object":{"key":"a b+c%d/é?x&y=z","size":1,"eTag":"c4ca4238a0b923820dcc509a6f75849b","versionId":"uMyzbVUNY6RIuIergCYt3a5wULqWMcV","sequencer":"2F7E116B735EAE03","metadata":[{"key":"x-amz-date","val":"20261203T143527Z"}],"tags":[]}},"eventId":"1796308527.061759.c4ca","opaqueData":""},{"eventVersion":"2.2","eventSource":"ceph:s3","awsRegion":"","eventTime":"2026-12-03T14:35:27.085470Z","eventName":"ObjectRemoved:DeleteMarkerCreated","userIdentity":{"principalId":"testing"},"requestParameters":{"sourceIPAddress":""},"responseElements":{},"s3":{"s3SchemaVersion":"1.0","configurationId":"evt1-follow","bucket":{"name":"evt1","ownerIdentity":{"principalId":"testing"},"arn":"arn:aws:s3:::evt1","id":"b3b7.4126.2"},"object":{"key":"plain","size":1,"eTag":"c4ca","versionId":"","sequencer":"2F7E116BEF411805","metadata":[],"tags":[]}},"eventId":"1796308527.085475.c4ca","opaqueData":""}]}"#;

    /// moto 5.2's SQS message body (captured): URL-encoded key, milliseconds, no version id.
    const MOTO: &str = r#"{"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1", "eventTime": "2026-12-03T14:35:36.630Z", "eventName": "ObjectCreated:Put", "s3": {"s3SchemaVersion": "1.0", "configurationId": "q1", "bucket": {"name": "evt2", "arn": "arn:aws:s3:::evt2"}, "object": {"key": "a+b%2Bc%25d%2F%C3%A9%3Fx%26y%3Dz", "size": 1, "eTag": "c4ca4238a0b923820dcc509a6f75849b"}}}]}"#;

    /// AWS's documented record (event structure 2.1), a delete marker.
    const AWS: &str = r#"{"Records":[{"eventVersion":"2.1","eventSource":"aws:s3","awsRegion":"us-west-2","eventTime":"1970-01-01T00:00:00.000Z","eventName":"ObjectRemoved:DeleteMarkerCreated","userIdentity":{"principalId":"AIDAJDPLRKLG7UEXAMPLE"},"requestParameters":{"sourceIPAddress":"127.0.0.1"},"responseElements":{"x-amz-request-id":"C3D13FE58DE4C810","x-amz-id-2":"FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD"},"s3":{"s3SchemaVersion":"1.0","configurationId":"testConfigRule","bucket":{"name":"mybucket","ownerIdentity":{"principalId":"A3NL1KOZZKExample"},"arn":"arn:aws:s3:::mybucket"},"object":{"key":"HappyFace%281%29+copy.jpg","size":1024,"eTag":"d41d8cd98f00b204e9800998ecf8427e","versionId":"096fKKXTRTtl3on89fVO.nfljtsv6qko","sequencer":"0055AED6DCD90281E5"}}}]}"#;

    #[test]
    fn rgw_keys_are_raw_and_times_have_microseconds() {
        let c = parse_body(RGW.as_bytes()).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].bucket, "evt1");
        assert_eq!(c[0].key, "a b+c%d/é?x&y=z");
        assert_eq!(c[0].event_name, "ObjectCreated:Put");
        assert_eq!(c[0].event_time_ms, Some(1_796_308_527_056));
        assert_eq!(
            c[0].version_id.as_deref(),
            Some("uMyzbVUNY6RIuIergCYt3a5wULqWMcV")
        );
        assert_eq!(c[1].key, "plain");
        assert_eq!(c[1].event_name, "ObjectRemoved:DeleteMarkerCreated");
        assert_eq!(c[1].version_id, None, "RGW's empty version id is none");
    }

    #[test]
    fn moto_and_aws_keys_are_url_decoded() {
        let c = parse_body(MOTO.as_bytes()).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].key, "a b+c%d/é?x&y=z");
        assert_eq!(c[0].bucket, "evt2");
        assert_eq!(c[0].event_time_ms, Some(1_796_308_536_630));
        assert_eq!(c[0].version_id, None);
        let c = parse_body(AWS.as_bytes()).unwrap();
        assert_eq!(c[0].key, "HappyFace(1) copy.jpg");
        assert_eq!(c[0].event_name, "ObjectRemoved:DeleteMarkerCreated");
        assert_eq!(c[0].event_time_ms, Some(0));
        assert_eq!(
            c[0].version_id.as_deref(),
            Some("096fKKXTRTtl3on89fVO.nfljtsv6qko")
        );
    }

    #[test]
    fn minio_webhook_names_keep_no_prefix() {
        // MinIO's webhook: its own fields around the same Records, `s3:` in the name.
        let body = r#"{"EventName":"s3:ObjectCreated:Put","Key":"b/x+y","Records":[{"eventVersion":"2.0","eventSource":"minio:s3","awsRegion":"","eventTime":"2026-12-03T10:00:00.5Z","eventName":"s3:ObjectCreated:Put","s3":{"s3SchemaVersion":"1.0","configurationId":"Config","bucket":{"name":"b","arn":"arn:aws:s3:::b"},"object":{"key":"x+y","size":3,"versionId":"1a2b"}}}]}"#;
        let c = parse_body(body.as_bytes()).unwrap();
        assert_eq!(c[0].key, "x y");
        assert_eq!(c[0].event_name, "ObjectCreated:Put");
        assert_eq!(c[0].event_time_ms, Some(1_796_292_000_500));
    }

    #[test]
    fn sns_envelope_is_opened() {
        let body = serde_json::json!({
            "Type": "Notification",
            "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:t",
            "Subject": "Amazon S3 Notification",
            "Message": MOTO,
            "Timestamp": "2026-12-03T14:35:36.700Z",
        })
        .to_string();
        let c = parse_body(body.as_bytes()).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].key, "a b+c%d/é?x&y=z");
        let confirm = r#"{"Type":"SubscriptionConfirmation","Message":"You have chosen to subscribe","SubscribeURL":"https://sns.example/confirm"}"#;
        assert!(matches!(
            parse_body(confirm.as_bytes()),
            Err(BodyError::NotEvents(m)) if m.contains("SubscriptionConfirmation")
        ));
    }

    #[test]
    fn test_events_and_other_sources_give_nothing() {
        let test = r#"{"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2026-12-03T14:35:36.166Z", "Bucket": "evt2"}"#;
        assert_eq!(parse_body(test.as_bytes()), Ok(vec![]));
        let other = r#"{"Records":[{"eventSource":"aws:sqs","body":"x"}]}"#;
        assert_eq!(parse_body(other.as_bytes()), Ok(vec![]));
        assert_eq!(parse_body(br#"{"Records":[]}"#), Ok(vec![]));
    }

    #[test]
    fn bodies_that_do_not_parse_say_why_in_one_line() {
        for (body, not_json) in [
            (&b"key=a"[..], true),
            (b"", true),
            (b"[1,2]", false),
            (br#"{"hello":1}"#, false),
            (
                br#"{"Records":[{"eventSource":"aws:s3","s3":{"bucket":{"name":"b"}}}]}"#,
                false,
            ),
            (br#"{"Records":"x"}"#, false),
        ] {
            let e = parse_body(body).unwrap_err();
            assert_eq!(matches!(e, BodyError::NotJson(_)), not_json, "{e}");
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }

    #[test]
    fn unreadable_times_are_none() {
        assert_eq!(unix_ms("yesterday"), None);
        assert_eq!(unix_ms("2026-12-03T14:35:27Z"), Some(1_796_308_527_000));
    }
}
