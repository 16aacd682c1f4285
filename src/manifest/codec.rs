//! manifest::codec: how values are stored compactly and read back exactly. Task ids (a key's
//! tasks are one id range), the small integer codes (states, copy methods,
//! error classes, error sides, storage classes, checksum algorithms), MD5 ETags as 16 bytes and listing
//! times as unix seconds. Every encoding falls back to the text as given, so nothing listed
//! is ever changed by storing it.
//!
//! May call: `crate::s3::{ErrorClass, Side}` only.

use rusqlite::types::{Value, ValueRef};

use crate::s3::{ErrorClass, Side};

/// Bits of a task id that number the tasks of one key (16,777,216 tasks per key).
pub(super) const SEQ_BITS: u32 = 24;
/// The largest task number within a key.
pub(super) const SEQ_MASK: i64 = (1 << SEQ_BITS) - 1;
/// Keys per block in `open_blocks` is `1 << BLOCK_BITS`.
pub(super) const BLOCK_BITS: u32 = 10;

/// The id of task number `seq` of key `key_id`.
pub(super) fn task_id(key_id: i64, seq: i64) -> i64 {
    (key_id << SEQ_BITS) | seq
}

/// The key of a task id.
pub(super) fn key_of(task_id: i64) -> i64 {
    task_id >> SEQ_BITS
}

/// The first and last possible task id of a key.
pub(super) fn key_range(key_id: i64) -> (i64, i64) {
    (key_id << SEQ_BITS, (key_id << SEQ_BITS) | SEQ_MASK)
}

/// Task flag: a delete marker.
pub(super) const DELETE_MARKER: i64 = 1;
/// Task flag: the key's current version when listed.
pub(super) const LATEST: i64 = 2;
/// Task flag: copied by streaming (the server-side copy was denied for it).
pub(super) const STREAM_ONLY: i64 = 4;
/// Task flag: the multipart ETag was compared with the source's.
pub(super) const ETAG_CHECKED: i64 = 8;
/// Task flag: ... and it was equal.
pub(super) const ETAG_PRESERVED: i64 = 16;
/// Task flag: done, and its destination version id is still to be learned from a listing
/// (the write's answer named none). `schema::LEARN_INDEX` indexes it by this value.
pub(super) const VERSION_TO_LEARN: i64 = 32;
/// Task flag: the reconciliation mode of the last attempt is recorded (the next flag says
/// which). Manifests from before have neither: the job's current setting is used.
pub(super) const ATTEMPT_MODE: i64 = 1024;
/// Task flag: the last attempt wrote without the stamp (`--no-stamp`).
pub(super) const ATTEMPT_UNSTAMPED: i64 = 2048;

/// The mode flags of an attempt: None records nothing (the flags are kept).
pub(super) fn attempt_flags(stamped: Option<bool>) -> Option<i64> {
    stamped.map(|s| ATTEMPT_MODE | if s { 0 } else { ATTEMPT_UNSTAMPED })
}

/// The recorded mode of a task's last attempt: whether its write carried the stamp.
pub(super) fn attempt_stamped(flags: i64) -> Option<bool> {
    (flags & ATTEMPT_MODE != 0).then_some(flags & ATTEMPT_UNSTAMPED == 0)
}

/// The flags of a finished copy's ETag comparison.
pub(super) fn etag_flags(preserved: Option<bool>) -> i64 {
    match preserved {
        None => 0,
        Some(false) => ETAG_CHECKED,
        Some(true) => ETAG_CHECKED | ETAG_PRESERVED,
    }
}

/// The stored form of an ETag: 16 bytes for `"<32 lowercase hex digits>"`, else the text.
pub(super) fn etag_value(etag: Option<&str>) -> Value {
    let Some(e) = etag else {
        return Value::Null;
    };
    let inner = e
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .filter(|s| s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    match inner.and_then(|s| hex::decode(s).ok()) {
        Some(bytes) => Value::Blob(bytes),
        None => Value::Text(e.to_string()),
    }
}

/// An ETag as listed, from its stored form.
pub(super) fn etag_text(v: ValueRef<'_>) -> Result<Option<String>, String> {
    match v {
        ValueRef::Null => Ok(None),
        ValueRef::Blob(b) if b.len() == 16 => Ok(Some(format!("\"{}\"", hex::encode(b)))),
        ValueRef::Text(t) => Ok(Some(String::from_utf8_lossy(t).into_owned())),
        other => Err(format!("etag {other:?}")),
    }
}

/// The stored form of a listing time: unix seconds for `YYYY-MM-DDTHH:MM:SS.000Z` (what S3
/// lists), else the text.
pub(super) fn time_value(t: Option<&str>) -> Value {
    match t {
        None => Value::Null,
        Some(s) => match parse_s3_time(s) {
            Some(secs) => Value::Integer(secs),
            None => Value::Text(s.to_string()),
        },
    }
}

/// A listing time as listed, from its stored form.
pub(super) fn time_text(v: ValueRef<'_>) -> Result<Option<String>, String> {
    match v {
        ValueRef::Null => Ok(None),
        ValueRef::Integer(secs) => Ok(Some(format_s3_time(secs))),
        ValueRef::Text(t) => Ok(Some(String::from_utf8_lossy(t).into_owned())),
        other => Err(format!("last_modified {other:?}")),
    }
}

/// Unix seconds of `YYYY-MM-DDTHH:MM:SS.000Z`, only when formatting them gives the same text.
fn parse_s3_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 24 || !s.ends_with(".000Z") {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        let part = s.get(from..to)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let seps = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if seps.iter().any(|&(i, c)| b[i] != c) {
        return None;
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, sec) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec;
    (format_s3_time(secs) == s).then_some(secs)
}

/// `YYYY-MM-DDTHH:MM:SS.000Z` of unix seconds.
fn format_s3_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.000Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (eras of 400 years).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (inverse of [`days_from_civil`]).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Storage classes stored as codes (code = position + 1). Append only: codes are on disk.
pub(super) const STORAGE_CLASSES: &[&str] = &[
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER",
    "DEEP_ARCHIVE",
    "OUTPOSTS",
    "GLACIER_IR",
    "SNOW",
    "EXPRESS_ONEZONE",
    "FSX_OPENZFS",
];

/// Checksum algorithms stored as codes (code = position + 1). Append only.
pub(super) const CHECKSUMS: &[&str] = &["CRC32", "CRC32C", "CRC64NVME", "SHA1", "SHA256"];

/// The stored form of a name from `table`: its code, else the text.
pub(super) fn name_value(table: &[&str], name: Option<&str>) -> Value {
    match name {
        None => Value::Null,
        Some(n) => match table.iter().position(|t| *t == n) {
            Some(i) => Value::Integer(i as i64 + 1),
            None => Value::Text(n.to_string()),
        },
    }
}

/// A name from its stored form.
pub(super) fn name_text(
    table: &[&str],
    what: &str,
    v: ValueRef<'_>,
) -> Result<Option<String>, String> {
    match v {
        ValueRef::Null => Ok(None),
        ValueRef::Integer(c) => usize::try_from(c - 1)
            .ok()
            .and_then(|i| table.get(i))
            .map(|n| Some(n.to_string()))
            .ok_or_else(|| format!("{what} code {c}")),
        ValueRef::Text(t) => Ok(Some(String::from_utf8_lossy(t).into_owned())),
        other => Err(format!("{what} {other:?}")),
    }
}

/// Error classes with their codes. Append only.
pub(super) const ERROR_CLASSES: [(i64, ErrorClass); 5] = [
    (1, ErrorClass::Retryable),
    (2, ErrorClass::Throttled),
    (3, ErrorClass::Fatal),
    (4, ErrorClass::SourceGone),
    (5, ErrorClass::Archived),
];

/// The code of an error class.
pub(super) fn class_code(c: ErrorClass) -> i64 {
    ERROR_CLASSES
        .iter()
        .find(|(_, k)| *k == c)
        .map(|(n, _)| *n)
        .unwrap_or(0)
}

/// The error class of a code.
pub(super) fn class_of(code: i64) -> Option<ErrorClass> {
    ERROR_CLASSES
        .iter()
        .find(|(n, _)| *n == code)
        .map(|(_, c)| *c)
}

/// The codes of the sides an error is recorded with (`errors.side`).
pub(super) const SIDES: [(i64, Side); 2] = [(1, Side::Source), (2, Side::Dest)];

/// The code of a side.
pub(super) fn side_code(side: Side) -> i64 {
    SIDES
        .iter()
        .find(|(_, s)| *s == side)
        .map_or(0, |(n, _)| *n)
}

/// The side of a code, if it is one.
pub(super) fn side_of(code: i64) -> Option<Side> {
    SIDES.iter().find(|(n, _)| *n == code).map(|(_, s)| *s)
}

/// The code of an error class named as in v1 manifests (`ErrorClass::as_str`).
pub(super) fn class_code_of_name(name: &str) -> Option<i64> {
    ERROR_CLASSES
        .iter()
        .find(|(_, c)| c.as_str() == name)
        .map(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_times_round_trip_and_others_stay_text() {
        for s in [
            "1970-01-01T00:00:00.000Z",
            "2024-02-29T23:59:59.000Z",
            "1969-12-31T23:59:59.000Z",
            "2100-03-01T12:00:00.000Z",
        ] {
            let v = time_value(Some(s));
            assert!(matches!(v, Value::Integer(_)), "{s} -> {v:?}");
            let back = time_text(ValueRef::from(&v)).unwrap();
            assert_eq!(back.as_deref(), Some(s));
        }
        assert_eq!(
            time_value(Some("1970-01-01T00:01:00.000Z")),
            Value::Integer(60)
        );
        for s in [
            "2024-02-30T00:00:00.000Z",
            "2024-01-01T00:00:00.123Z",
            "2024-01-01T00:00:00Z",
            "Mon, 01 Jan 2024 00:00:00 GMT",
            "+024-01-01T00:00:00.000Z",
        ] {
            assert_eq!(time_value(Some(s)), Value::Text(s.into()), "{s}");
        }
    }

    #[test]
    fn md5_etags_are_16_bytes_and_others_stay_text() {
        let md5 = "\"d41d8cd98f00b204e9800998ecf8427e\"";
        let v = etag_value(Some(md5));
        assert!(matches!(&v, Value::Blob(b) if b.len() == 16));
        assert_eq!(etag_text(ValueRef::from(&v)).unwrap().as_deref(), Some(md5));
        for e in [
            "\"d41d8cd98f00b204e9800998ecf8427e-3\"",
            "\"D41D8CD98F00B204E9800998ECF8427E\"",
            "d41d8cd98f00b204e9800998ecf8427e",
        ] {
            assert_eq!(etag_value(Some(e)), Value::Text(e.into()));
        }
        assert_eq!(etag_value(None), Value::Null);
    }

    #[test]
    fn names_are_codes_unless_unknown() {
        let v = name_value(STORAGE_CLASSES, Some("STANDARD"));
        assert_eq!(v, Value::Integer(1));
        let back = name_text(STORAGE_CLASSES, "storage class", ValueRef::from(&v));
        assert_eq!(back.unwrap().as_deref(), Some("STANDARD"));
        let v = name_value(STORAGE_CLASSES, Some("placement-x"));
        assert_eq!(v, Value::Text("placement-x".into()));
        assert!(name_text(CHECKSUMS, "checksum", ValueRef::Integer(99)).is_err());
        for (code, class) in ERROR_CLASSES {
            assert_eq!(class_of(class_code(class)), Some(class));
            assert_eq!(class_code_of_name(class.as_str()), Some(code));
        }
        for (code, side) in SIDES {
            assert_eq!((side_code(side), side_of(code)), (code, Some(side)));
        }
        assert_eq!(side_of(0), None);
    }

    #[test]
    fn task_ids_keep_a_key_in_one_range() {
        let (lo, hi) = key_range(7);
        assert_eq!(key_of(lo), 7);
        assert_eq!(key_of(hi), 7);
        assert_eq!(task_id(7, 3), lo + 3);
        assert_eq!(key_of(hi + 1), 8);
    }
}
