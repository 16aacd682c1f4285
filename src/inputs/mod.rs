//! inputs: manifests a user supplies instead of a listing — the Batch Operations CSV manifest
//! ([`csv_manifest`]) and S3 Inventory reports ([`inventory`]) — read as streams of rows, with
//! errors that name the file and the line (or row). The URL encoding of keys that both
//! formats use is `s3::types`' ([`crate::s3::types::decode_key`]).
//!
//! Readers only: staging in a scratch sort file ([`stage`]) and files in S3 downloaded by
//! [`fetch`] serve `plan --from-csv` and `--from-inventory`, which the lister wires into the
//! manifest (`lister::supplied`).
//!
//! May call: `s3::types` (the listing record, key decoding); `fetch` and `stage` say what else.

pub mod csv_manifest;
pub mod fetch;
pub mod inventory;
pub mod stage;

use std::fmt;

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

#[cfg(test)]
mod tests {
    use super::*;

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
