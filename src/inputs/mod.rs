//! inputs: manifests a user supplies instead of a listing — the Batch Operations CSV manifest
//! ([`csv_manifest`]) and S3 Inventory reports ([`inventory`]) — read as streams of rows, with
//! errors that name the file and the line (or row). Also the URL encoding of keys that both
//! formats (and the AWS-shaped report) use.
//!
//! Wiring them into `plan` ([`plan`]: staging in a scratch sort file ([`stage`]), files in S3
//! downloaded by [`fetch`]) is the only part that reaches the manifest and the s3 client.
//!
//! May call: `s3::types` (the listing record); `plan`, `fetch` and `stage` say what else.

pub mod csv_manifest;
pub mod fetch;
pub mod inventory;
pub mod plan;
pub mod stage;

use std::fmt;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Where in a file a bad input was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// A text line (1-based).
    Line(u64),
    /// A record of a binary file (1-based).
    Row(u64),
}

/// A supplied manifest that cannot be read: the file, where, and why, on one line.
#[derive(Debug, PartialEq, Eq)]
pub struct InputError {
    /// The file (path or `s3://` URL) as the user named it.
    pub file: String,
    /// The line or row, when the error is about one.
    pub at: Option<At>,
    /// What is wrong.
    pub message: String,
}

impl InputError {
    /// An error about the whole file.
    pub fn file(file: &str, message: impl Into<String>) -> InputError {
        InputError {
            file: file.to_string(),
            at: None,
            message: one_line(message.into()),
        }
    }

    /// An error about one line of a text file.
    pub fn line(file: &str, line: u64, message: impl Into<String>) -> InputError {
        InputError {
            at: Some(At::Line(line)),
            ..InputError::file(file, message)
        }
    }

    /// An error about one record of a binary file.
    pub fn row(file: &str, row: u64, message: impl Into<String>) -> InputError {
        InputError {
            at: Some(At::Row(row)),
            ..InputError::file(file, message)
        }
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some(At::Line(n)) => write!(f, "{}:{n}: {}", self.file, self.message),
            Some(At::Row(n)) => write!(f, "{}: row {n}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for InputError {}

fn one_line(s: String) -> String {
    if s.contains(['\n', '\r']) {
        s.replace(['\n', '\r'], " ")
    } else {
        s
    }
}

/// Bytes kept as they are when a key is encoded: unreserved characters and `/`.
const KEY_KEEP: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

/// URL-encodes a key for a CSV manifest or report: every byte but `A-Z a-z 0-9 - _ . ~ /` as
/// `%XX` (a space is `%20`, a `+` is `%2B`), so decoders that read `+` as a space and those
/// that do not both get the key back.
///
/// ```
/// use s3_backfill::inputs::{decode_key, encode_key};
/// assert_eq!(encode_key("a b+c/é"), "a%20b%2Bc/%C3%A9");
/// assert_eq!(decode_key(&encode_key("a b+c/é")).unwrap(), "a b+c/é");
/// ```
pub fn encode_key(key: &str) -> String {
    utf8_percent_encode(key, KEY_KEEP).to_string()
}

/// Decodes a URL-encoded key as S3 writes them in inventories and Batch Operations manifests:
/// `+` is a space, `%XX` a byte; the result must be UTF-8. A `%` not followed by two hex
/// digits is an error (S3 would not find such a key either).
pub fn decode_key(encoded: &str) -> Result<String, String> {
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad URL encoding at byte {} of {encoded:?}", i + 1))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("{encoded:?} does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_the_encoding() {
        for key in [
            "plain/key.txt",
            "with space",
            "a+b",
            "100%",
            "quote\"comma,semi;",
            "ünïcødé/日本語",
            "line\nbreak",
            "~tilde_dash-dot.",
        ] {
            let enc = encode_key(key);
            assert!(
                !enc.contains([' ', '+', ',', '"', '\n']),
                "{key:?} -> {enc}"
            );
            assert_eq!(decode_key(&enc).as_deref(), Ok(key));
        }
    }

    #[test]
    fn decoding_reads_plus_as_space_and_refuses_bad_escapes() {
        assert_eq!(
            decode_key("my+key%2Bplus%20x").as_deref(),
            Ok("my key+plus x")
        );
        assert_eq!(decode_key("caf%C3%A9").as_deref(), Ok("café"));
        assert!(decode_key("bad%2").is_err());
        assert!(decode_key("bad%zz").is_err());
        assert!(decode_key("%FF").is_err(), "not UTF-8");
    }

    #[test]
    fn errors_are_one_line_and_name_file_and_place() {
        assert_eq!(
            InputError::line("m.csv", 3, "bad\nthing").to_string(),
            "m.csv:3: bad thing"
        );
        assert_eq!(
            InputError::row("d.parquet", 7, "x").to_string(),
            "d.parquet: row 7: x"
        );
        assert_eq!(InputError::file("f", "gone").to_string(), "f: gone");
    }
}
