//! inputs::csv_manifest: the S3 Batch Operations CSV manifest — no header, one object per
//! line as `Bucket,Key[,VersionId]`, keys URL-encoded (`+` is a space), and either every row
//! has a version id or none does. Read as a stream with the `csv` crate; the stream ends at the
//! first bad row, whose error names the file and the line. The results files of an AWS-shaped
//! completion report (`Bucket,Key,VersionId,TaskStatus,...`, seven fields with the status
//! `succeeded` or `failed` fourth) are read as manifests too: their first three fields.
//!
//! May call: `inputs` (errors), `s3::types` (key decoding). Nothing else of the crate.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use super::InputError;
use crate::s3::types::decode_key;

/// One object of a CSV manifest.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ManifestRow {
    /// The bucket.
    pub bucket: String,
    /// The key, decoded.
    pub key: String,
    /// The version id, when the manifest has them.
    pub version_id: Option<String>,
}

/// A streaming reader of a CSV manifest: an iterator of rows.
pub struct CsvManifest<R: Read> {
    name: String,
    records: csv::StringRecordsIntoIter<R>,
    /// Whether rows carry version ids, and the line that decided it.
    versioned: Option<(bool, u64)>,
    /// The line of the last row returned.
    last_line: u64,
    done: bool,
}

impl CsvManifest<File> {
    /// Opens a local manifest file.
    pub fn open(path: &Path) -> Result<CsvManifest<File>, InputError> {
        let name = path.display().to_string();
        let file = File::open(path).map_err(|e| InputError::file(&name, e.to_string()))?;
        Ok(CsvManifest::from_reader(&name, file))
    }
}

impl<R: Read> CsvManifest<R> {
    /// Reads a manifest from any reader; `name` names it in errors (a path or an `s3://` URL).
    pub fn from_reader(name: &str, reader: R) -> CsvManifest<R> {
        let records = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(reader)
            .into_records();
        CsvManifest {
            name: name.to_string(),
            records,
            versioned: None,
            last_line: 0,
            done: false,
        }
    }

    /// Whether the rows read so far carry version ids (None before the first row).
    pub fn has_versions(&self) -> Option<bool> {
        self.versioned.map(|(v, _)| v)
    }

    /// The line (1-based) of the last row returned.
    pub fn last_line(&self) -> u64 {
        self.last_line
    }

    fn row(&mut self, record: &csv::StringRecord) -> Result<ManifestRow, InputError> {
        let line = record.position().map_or(0, |p| p.line());
        self.last_line = line;
        let bad = |msg: String| InputError::line(&self.name, line, msg);
        let report_row = record.len() == 7 && matches!(&record[3], "succeeded" | "failed");
        if !(2..=3).contains(&record.len()) && !report_row {
            return Err(bad(format!(
                "{} fields, expected Bucket,Key[,VersionId]",
                record.len()
            )));
        }
        let bucket = record[0].trim();
        if bucket.is_empty() {
            return Err(bad("empty bucket".into()));
        }
        let key = decode_key(&record[1]).map_err(&bad)?;
        if key.is_empty() {
            return Err(bad("empty key".into()));
        }
        let version_id = record.get(2).filter(|v| !v.is_empty()).map(String::from);
        match self.versioned {
            None => self.versioned = Some((version_id.is_some(), line)),
            Some((v, first)) if v != version_id.is_some() => {
                let (with, without) = if v { (first, line) } else { (line, first) };
                return Err(bad(format!(
                    "line {with} has a version id and line {without} has none: \
                     all rows have one or none"
                )));
            }
            Some(_) => {}
        }
        Ok(ManifestRow {
            bucket: bucket.to_string(),
            key,
            version_id,
        })
    }
}

impl<R: Read> Iterator for CsvManifest<R> {
    type Item = Result<ManifestRow, InputError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = match self.records.next()? {
            Ok(record) => self.row(&record),
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                Err(InputError::line(&self.name, line, csv_message(&e)))
            }
        };
        self.done = item.is_err();
        Some(item)
    }
}

/// The csv crate's message without its own position (ours names file and line).
fn csv_message(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::Utf8 { .. } => "not UTF-8".to_string(),
        csv::ErrorKind::Io(io) => io.to_string(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Vec<Result<ManifestRow, InputError>> {
        CsvManifest::from_reader("m.csv", text.as_bytes()).collect()
    }

    fn row(bucket: &str, key: &str, version: Option<&str>) -> ManifestRow {
        ManifestRow {
            bucket: bucket.into(),
            key: key.into(),
            version_id: version.map(String::from),
        }
    }

    #[test]
    fn rows_with_versions_decode_keys() {
        let rows = read(
            "src,photos/a+b.jpg,v1\n\
             src,100%25+done%2Bmore,v2\r\n\
             src,\"caf%C3%A9,%22q%22\",v3\n\
             \n\
             src,plain,null\n",
        );
        let rows: Vec<ManifestRow> = rows.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            rows,
            vec![
                row("src", "photos/a b.jpg", Some("v1")),
                row("src", "100% done+more", Some("v2")),
                row("src", "café,\"q\"", Some("v3")),
                row("src", "plain", Some("null")),
            ]
        );
    }

    #[test]
    fn rows_without_versions_and_a_utf8_bom() {
        let rows: Vec<ManifestRow> = read("\u{feff}b,k1\nb,k2,\n")
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(rows, vec![row("b", "k1", None), row("b", "k2", None)]);
    }

    #[test]
    fn mixing_rows_with_and_without_versions_is_an_error_naming_the_line() {
        let rows = read("b,k1\nb,k2\nb,k3,v3\nb,k4\n");
        assert_eq!(rows.len(), 3, "the stream stops at the first bad row");
        assert_eq!(
            rows[2].as_ref().unwrap_err().to_string(),
            "m.csv:3: line 3 has a version id and line 1 has none: all rows have one or none"
        );
        let rows = read("b,k1,v1\nb,k2\n");
        assert_eq!(
            rows[1].as_ref().unwrap_err().to_string(),
            "m.csv:2: line 1 has a version id and line 2 has none: all rows have one or none"
        );
    }

    #[test]
    fn bad_rows_name_file_and_line() {
        let cases = [
            (
                "b,k\nonlyone\n",
                "m.csv:2: 1 fields, expected Bucket,Key[,VersionId]",
            ),
            (
                "b,k,v,extra\n",
                "m.csv:1: 4 fields, expected Bucket,Key[,VersionId]",
            ),
            (",k\n", "m.csv:1: empty bucket"),
            ("b,\n", "m.csv:1: empty key"),
            (
                "b,ok\nb,bad%zz\n",
                "m.csv:2: bad URL encoding at byte 4 of \"bad%zz\"",
            ),
        ];
        for (text, expected) in cases {
            let err = read(text)
                .into_iter()
                .find_map(Result::err)
                .expect("an error");
            assert_eq!(err.to_string(), expected, "{text:?}");
        }
        let not_utf8 = CsvManifest::from_reader("m.csv", &b"b,k\nb,\xff\xfe\n"[..])
            .find_map(Result::err)
            .expect("an error");
        assert_eq!(not_utf8.to_string(), "m.csv:2: not UTF-8");
    }

    #[test]
    fn report_rows_read_as_their_first_three_fields() {
        let mut m = CsvManifest::from_reader(
            "r.csv",
            &b"src,a%20b,v1,failed,403,DstPutObjectNotPermitted,\"x, y\"\nsrc,c,v2,succeeded,200,,Successful\n"[..],
        );
        assert_eq!(m.next().unwrap().unwrap(), row("src", "a b", Some("v1")));
        assert_eq!(m.last_line(), 1);
        assert_eq!(m.next().unwrap().unwrap(), row("src", "c", Some("v2")));
        assert_eq!(m.last_line(), 2);
        let err = read("b,k,v,other,1,2,3\n").remove(0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "m.csv:1: 7 fields, expected Bucket,Key[,VersionId]"
        );
    }

    #[test]
    fn open_names_a_missing_file() {
        let err = CsvManifest::open(Path::new("/nonexistent/manifest.csv"))
            .err()
            .expect("missing");
        assert!(
            err.to_string().starts_with("/nonexistent/manifest.csv: "),
            "{err}"
        );
    }
}
