//! s3::xml: `ListObjectVersions` pages read from the raw XML (the SDK's parsed output splits
//! versions and delete markers into two lists and so loses their order within a key): the
//! `encoding-type=url` decoding, the entities, and each key's history put in order.
//!
//! May call: the layer's types. Nothing else of the crate.

use quick_xml::events::Event;
use quick_xml::Reader;

use super::types::{VersionEntry, VersionPage};

/// A key as S3 URL-encodes it (listings with `encoding-type=url`, event records) decoded
/// once: form encoding, '+' is a space and '%2B' a plus.
pub fn url_decode(s: &str) -> String {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8_lossy()
        .into_owned()
}

fn named_entity(name: &[u8]) -> Option<char> {
    Some(match name {
        b"amp" => '&',
        b"lt" => '<',
        b"gt" => '>',
        b"quot" => '"',
        b"apos" => '\'',
        _ => return None,
    })
}

// Long on purpose: a single pass over the XML events, whose state (path, entry, text) the arms share.
/// Parses a `ListVersionsResult` body, keeping the order of versions and delete markers.
pub fn parse_page(xml: &[u8]) -> Result<VersionPage, String> {
    let mut reader = Reader::from_reader(xml);
    reader.config_mut().trim_text(false);
    let mut buf = Vec::new();
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut text = String::new();
    let mut page = VersionPage::default();
    let mut entry: Option<VersionEntry> = None;
    let mut url_encoded = false;
    let mut saw_root = false;
    loop {
        let ev = reader
            .read_event_into(&mut buf)
            .map_err(|e| format!("at byte {}: {e}", reader.buffer_position()))?;
        match ev {
            Event::Start(e) => {
                let name = e.local_name().as_ref().to_vec();
                if path.is_empty() {
                    if name != b"ListVersionsResult" {
                        return Err(format!(
                            "unexpected root element {}",
                            String::from_utf8_lossy(&name)
                        ));
                    }
                    saw_root = true;
                }
                if path.len() == 1 && (name == b"Version" || name == b"DeleteMarker") {
                    entry = Some(VersionEntry {
                        is_delete_marker: name == b"DeleteMarker",
                        ..Default::default()
                    });
                }
                path.push(name);
                text.clear();
            }
            Event::Empty(_) => {}
            Event::Text(t) => {
                let s = t.decode().map_err(|e| e.to_string())?;
                text.push_str(&s);
            }
            Event::CData(t) => {
                text.push_str(&String::from_utf8_lossy(&t));
            }
            Event::GeneralRef(r) => {
                if let Some(c) = r.resolve_char_ref().map_err(|e| e.to_string())? {
                    text.push(c);
                } else if let Some(c) = named_entity(&r) {
                    text.push(c);
                } else {
                    return Err(format!("unknown entity &{};", String::from_utf8_lossy(&r)));
                }
            }
            Event::End(_) => {
                let name = path.pop().unwrap_or_default();
                let value = std::mem::take(&mut text);
                match (path.len(), entry.as_mut()) {
                    (1, _) => match name.as_slice() {
                        b"Version" | b"DeleteMarker" => {
                            if let Some(e) = entry.take() {
                                page.entries.push(e);
                            }
                        }
                        b"IsTruncated" => page.truncated = value == "true",
                        b"NextKeyMarker" => page.next_key_marker = Some(value),
                        b"NextVersionIdMarker" => page.next_version_marker = Some(value),
                        b"EncodingType" => url_encoded = value.eq_ignore_ascii_case("url"),
                        _ => {}
                    },
                    (2, Some(e)) => match name.as_slice() {
                        b"Key" => e.key = value,
                        b"VersionId" => e.version_id = value,
                        b"IsLatest" => e.is_latest = value == "true",
                        b"Size" => {
                            e.size = value
                                .trim()
                                .parse()
                                .map_err(|_| format!("bad Size {value:?}"))?
                        }
                        b"ETag" => e.etag = Some(value),
                        b"LastModified" => e.last_modified = Some(value),
                        b"StorageClass" => e.storage_class = Some(value),
                        b"ChecksumAlgorithm" => e.checksum_algorithm = Some(value),
                        _ => {}
                    },
                    _ => {}
                }
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    if !saw_root {
        return Err("empty response".into());
    }
    if url_encoded {
        let raw_marker = page.next_key_marker.clone();
        let mut marker_is_raw_key = false;
        for e in &mut page.entries {
            marker_is_raw_key |= raw_marker.as_deref() == Some(e.key.as_str());
            e.key = url_decode(&e.key);
        }
        // AWS encodes NextKeyMarker like the keys; RGW sends it as it is. A marker that is
        // one of the page's keys as decoded (and not as sent) was not encoded: taking it
        // for encoded would start the next page elsewhere and lose or repeat entries.
        let marker_is_decoded_key = raw_marker
            .as_deref()
            .is_some_and(|m| page.entries.iter().any(|e| e.key == m));
        if let Some(k) = &mut page.next_key_marker {
            if marker_is_raw_key || !marker_is_decoded_key {
                *k = url_decode(k);
            }
        }
    }
    order_histories(&mut page.entries);
    for e in &page.entries {
        if e.version_id.is_empty() {
            return Err(format!("entry for key {:?} has no VersionId", e.key));
        }
    }
    Ok(page)
}

/// Puts each key's entries in history order, newest first: the current entry, then by
/// last-modified descending, and in the server's order where those tie.
///
/// AWS interleaves versions and delete markers in that order already, so this changes
/// nothing there. Some S3-compatible servers (moto) send all versions before all delete
/// markers; this restores the interleaving wherever last-modified (1-second resolution) and
/// the current-version flag tell it. Keys keep the server's (binary UTF-8) order.
pub(crate) fn order_histories(entries: &mut [VersionEntry]) {
    entries.sort_by(|a, b| {
        a.key
            .as_bytes()
            .cmp(b.key.as_bytes())
            .then(b.is_latest.cmp(&a.is_latest))
            .then(b.last_modified.cmp(&a.last_modified))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_interleaving_and_decodes() {
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?>
<ListVersionsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><Prefix></Prefix><KeyMarker></KeyMarker><VersionIdMarker></VersionIdMarker><NextKeyMarker>a%2Bb+c</NextKeyMarker><NextVersionIdMarker>v3</NextVersionIdMarker><MaxKeys>3</MaxKeys><EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>
<Version><Key>a%2Bb+c</Key><VersionId>v3</VersionId><IsLatest>true</IsLatest><LastModified>2026-01-01T00:00:01.000Z</LastModified><ETag>&quot;abc&quot;</ETag><Size>5</Size><Owner><ID>x</ID></Owner><StorageClass>STANDARD</StorageClass></Version>
<DeleteMarker><Key>a%2Bb+c</Key><VersionId>v2</VersionId><IsLatest>false</IsLatest><LastModified>2026-01-01T00:00:01.000Z</LastModified></DeleteMarker>
<Version><Key>a%2Bb+c</Key><VersionId>v1</VersionId><IsLatest>false</IsLatest><ETag>"d"</ETag><Size>0</Size></Version>
</ListVersionsResult>"#;
        let p = parse_page(xml).unwrap();
        assert!(p.truncated);
        assert_eq!(p.next_key_marker.as_deref(), Some("a+b c"));
        let kinds: Vec<_> = p
            .entries
            .iter()
            .map(|e| (e.version_id.as_str(), e.is_delete_marker))
            .collect();
        assert_eq!(kinds, [("v3", false), ("v2", true), ("v1", false)]);
        assert_eq!(p.entries[0].key, "a+b c");
        assert_eq!(p.entries[0].etag.as_deref(), Some("\"abc\""));
        assert_eq!(p.entries[0].size, 5);
    }

    #[test]
    fn restores_interleaving_from_times() {
        // moto's shape: all versions first, then all delete markers.
        let xml = b"<ListVersionsResult><IsTruncated>false</IsTruncated>\
<Version><Key>a</Key><VersionId>v2</VersionId><IsLatest>true</IsLatest><LastModified>2026-01-01T00:00:03.000Z</LastModified><Size>1</Size></Version>\
<Version><Key>a</Key><VersionId>v1</VersionId><IsLatest>false</IsLatest><LastModified>2026-01-01T00:00:01.000Z</LastModified><Size>1</Size></Version>\
<Version><Key>b</Key><VersionId>w1</VersionId><IsLatest>false</IsLatest><LastModified>2026-01-01T00:00:01.000Z</LastModified><Size>1</Size></Version>\
<DeleteMarker><Key>a</Key><VersionId>m1</VersionId><IsLatest>false</IsLatest><LastModified>2026-01-01T00:00:02.000Z</LastModified></DeleteMarker>\
<DeleteMarker><Key>b</Key><VersionId>m2</VersionId><IsLatest>true</IsLatest><LastModified>2026-01-01T00:00:01.000Z</LastModified></DeleteMarker>\
</ListVersionsResult>";
        let p = parse_page(xml).unwrap();
        let ids: Vec<_> = p.entries.iter().map(|e| e.version_id.as_str()).collect();
        assert_eq!(ids, ["v2", "m1", "v1", "m2", "w1"]);
    }

    #[test]
    fn raw_keys_without_encoding_type() {
        let xml = b"<ListVersionsResult><IsTruncated>false</IsTruncated><Version><Key>a b+c%d&amp;&#9;</Key><VersionId>null</VersionId><IsLatest>true</IsLatest><Size>1</Size></Version></ListVersionsResult>";
        let p = parse_page(xml).unwrap();
        assert_eq!(p.entries[0].key, "a b+c%d&\t");
        assert!(!p.truncated);
    }

    #[test]
    fn a_marker_sent_unencoded_is_kept() {
        // RGW: keys encoded, NextKeyMarker not. The key `a%41` must not become `aA`.
        let xml = b"<ListVersionsResult><EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>\
<NextKeyMarker>a%41</NextKeyMarker><NextVersionIdMarker>v1</NextVersionIdMarker>\
<Version><Key>a%2541</Key><VersionId>v1</VersionId><IsLatest>false</IsLatest><Size>1</Size></Version>\
</ListVersionsResult>";
        let p = parse_page(xml).unwrap();
        assert_eq!(p.entries[0].key, "a%41");
        assert_eq!(p.next_key_marker.as_deref(), Some("a%41"));
        // AWS: the marker is encoded like the keys.
        let xml = b"<ListVersionsResult><EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>\
<NextKeyMarker>a%2541</NextKeyMarker><NextVersionIdMarker>v1</NextVersionIdMarker>\
<Version><Key>a%2541</Key><VersionId>v1</VersionId><IsLatest>false</IsLatest><Size>1</Size></Version>\
</ListVersionsResult>";
        assert_eq!(
            parse_page(xml).unwrap().next_key_marker.as_deref(),
            Some("a%41")
        );
    }

    #[test]
    fn rejects_other_roots() {
        assert!(parse_page(b"<Error><Code>X</Code></Error>").is_err());
        assert!(parse_page(b"").is_err());
    }
}
