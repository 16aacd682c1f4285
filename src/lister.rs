//! lister: walks `ListObjectVersions` of the source and writes every selected version and
//! delete marker into the manifest, one page per transaction together with the checkpoint.
//!
//! The SDK's parsed output splits versions and delete markers into two lists and so loses
//! their order within a key; the page is therefore read from the raw XML (captured by
//! [`RawBody`]), which keeps each key's history in the server's order, newest first.

use std::borrow::Cow;
use std::sync::atomic::AtomicU64;

use aws_sdk_s3::types::EncodingType;
use aws_sdk_s3::Client;
use quick_xml::events::Event;
use quick_xml::Reader;

use crate::config::{JobSettings, RawBody, Side};
use crate::manifest::{Listing, Manifest, ManifestError, NewTask};
use crate::s3::{classify, with_retry, ErrorClass, Limiter, RetryPolicy, S3Error};

/// Entries per listing page (S3's maximum).
pub const PAGE_SIZE: i32 = 1000;

/// Entries per page that `plan` asks for: [`PAGE_SIZE`], or `S3_BACKFILL_LIST_PAGE_SIZE`
/// (1 to 1000) for tests and for servers that page less.
pub fn page_size() -> i32 {
    std::env::var("S3_BACKFILL_LIST_PAGE_SIZE")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .filter(|n| (1..=PAGE_SIZE).contains(n))
        .unwrap_or(PAGE_SIZE)
}

/// Why listing stopped.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// An S3 request failed for good.
    #[error("{0}")]
    S3(#[from] S3Error),
    /// The manifest failed.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The response was not a listing.
    #[error("source: ListObjectVersions answer could not be read: {0}")]
    Parse(String),
    /// The job needs a versioned destination.
    #[error("{0}")]
    NeedsVersioning(String),
}

/// One entry of a listing page, in the server's order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// The key, decoded.
    pub key: String,
    /// The version id.
    pub version_id: String,
    /// A delete marker.
    pub is_delete_marker: bool,
    /// The current version of its key.
    pub is_latest: bool,
    /// Size in bytes.
    pub size: u64,
    /// ETag, quotes included.
    pub etag: Option<String>,
    /// Last-modified, as sent.
    pub last_modified: Option<String>,
    /// Storage class.
    pub storage_class: Option<String>,
}

/// One parsed page of `ListObjectVersions`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// Versions and delete markers, interleaved as the server sent them.
    pub entries: Vec<Entry>,
    /// More pages follow.
    pub truncated: bool,
    /// Key marker of the next page.
    pub next_key_marker: Option<String>,
    /// Version id marker of the next page.
    pub next_version_marker: Option<String>,
}

fn url_decode(s: &str) -> String {
    // S3's `encoding-type=url` is form encoding: '+' is a space, '%2B' a plus.
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

/// Parses a `ListVersionsResult` body, keeping the order of versions and delete markers.
pub fn parse_page(xml: &[u8]) -> Result<Page, String> {
    let mut reader = Reader::from_reader(xml);
    reader.config_mut().trim_text(false);
    let mut buf = Vec::new();
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut text = String::new();
    let mut page = Page::default();
    let mut entry: Option<Entry> = None;
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
                    entry = Some(Entry {
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
        for e in &mut page.entries {
            e.key = url_decode(&e.key);
        }
        if let Some(k) = &mut page.next_key_marker {
            *k = url_decode(k);
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
fn order_histories(entries: &mut [Entry]) {
    entries.sort_by(|a, b| {
        a.key
            .as_bytes()
            .cmp(b.key.as_bytes())
            .then(b.is_latest.cmp(&a.is_latest))
            .then(b.last_modified.cmp(&a.last_modified))
    });
}

/// Lists one page of the source's versions (with retries).
#[allow(clippy::too_many_arguments)]
pub async fn list_page(
    client: &Client,
    side: Side,
    bucket: &str,
    prefix: &str,
    key_marker: Option<&str>,
    version_marker: Option<&str>,
    max_keys: i32,
    policy: &RetryPolicy,
    limiter: &Limiter,
    retries: &AtomicU64,
) -> Result<Page, ListError> {
    let page = with_retry(policy, limiter, retries, || async {
        let raw = RawBody::default();
        let mut req = client
            .list_object_versions()
            .bucket(bucket)
            .max_keys(max_keys)
            .encoding_type(EncodingType::Url);
        if !prefix.is_empty() {
            req = req.prefix(prefix);
        }
        if let Some(k) = key_marker {
            req = req.key_marker(k);
        }
        if let Some(v) = version_marker {
            req = req.version_id_marker(v);
        }
        req.customize()
            .interceptor(raw.clone())
            .send()
            .await
            .map_err(|e| classify(side, "ListObjectVersions", false, e))?;
        let body = raw.take().ok_or_else(|| {
            S3Error::other(
                side,
                "ListObjectVersions",
                ErrorClass::Retryable,
                "response body was not captured".into(),
            )
        })?;
        parse_page(&body)
            .map_err(|m| S3Error::other(side, "ListObjectVersions", ErrorClass::Retryable, m))
    })
    .await?;
    Ok(page)
}

/// What a listing did.
#[derive(Clone, Debug, Default)]
pub struct ListStats {
    /// The manifest's listing was already complete: nothing was listed.
    pub already_complete: bool,
    /// The listing continued from a checkpoint.
    pub resumed: bool,
    /// Pages listed in this call.
    pub pages: u64,
    /// Entries seen in this call.
    pub entries: u64,
    /// Entries selected into the manifest in this call.
    pub selected: u64,
}

/// Lists the source into the manifest from its checkpoint on. `dest_versioned` says whether
/// the destination keeps versions; when it does not, a key with more than one selected
/// version stops the listing with [`ListError::NeedsVersioning`]. `on_page` sees the number of
/// entries after each page (for progress).
#[allow(clippy::too_many_arguments)]
pub async fn list_into(
    client: &Client,
    settings: &JobSettings,
    manifest: &mut Manifest,
    dest_versioned: bool,
    policy: &RetryPolicy,
    limiter: &Limiter,
    retries: &AtomicU64,
    mut on_page: impl FnMut(&Listing),
) -> Result<ListStats, ListError> {
    let mut cp = manifest.listing()?;
    let mut stats = ListStats {
        already_complete: cp.complete,
        resumed: cp.pages > 0 && !cp.complete,
        ..Default::default()
    };
    let sel = &settings.selection;
    let prefix = sel.prefix.clone();
    // The last selected key of the previous page, for the versioning check.
    let mut last_selected: Option<(String, u64)> = None;
    let page_size = page_size();
    while !cp.complete {
        let page = list_page(
            client,
            Side::Source,
            &settings.source.bucket,
            &prefix,
            cp.key_marker.as_deref(),
            cp.version_marker.as_deref(),
            page_size,
            policy,
            limiter,
            retries,
        )
        .await?;
        let mut tasks = Vec::with_capacity(page.entries.len());
        for e in &page.entries {
            let pos = if cp.last_key.as_deref() == Some(e.key.as_str()) {
                cp.last_key_seen
            } else {
                cp.last_key = Some(e.key.clone());
                0
            };
            cp.last_key_seen = pos + 1;
            cp.entries += 1;
            let selected = if sel.latest_only {
                e.is_latest && !e.is_delete_marker
            } else {
                sel.delete_markers || !e.is_delete_marker
            };
            if !selected {
                continue;
            }
            if !dest_versioned {
                let n = match &last_selected {
                    Some((k, n)) if *k == e.key => n + 1,
                    _ => {
                        // Only the first key of a resumed listing can have tasks from
                        // before the restart.
                        if last_selected.is_none() && stats.resumed {
                            manifest.count_key(&e.key)? + 1
                        } else {
                            1
                        }
                    }
                };
                if n > 1 {
                    return Err(ListError::NeedsVersioning(format!(
                        "dest: bucket {} does not have versioning enabled, but key {:?} has {} versions to copy; enable versioning on the destination bucket, or plan with --latest-only (delete {} first)",
                        settings.dest.bucket, e.key, n, manifest.path()
                    )));
                }
                last_selected = Some((e.key.clone(), n));
            }
            tasks.push(NewTask {
                entry: crate::s3::VersionEntry {
                    key: e.key.clone(),
                    version_id: e.version_id.clone(),
                    is_delete_marker: e.is_delete_marker,
                    is_latest: e.is_latest,
                    size: e.size,
                    etag: e.etag.clone(),
                    last_modified: e.last_modified.clone(),
                    storage_class: e.storage_class.clone(),
                    checksum_algorithm: None,
                },
                history_pos: pos,
            });
        }
        stats.entries += page.entries.len() as u64;
        stats.selected += tasks.len() as u64;
        stats.pages += 1;
        cp.pages += 1;
        if page.truncated {
            let (Some(k), v) = (
                page.next_key_marker.clone(),
                page.next_version_marker.clone(),
            ) else {
                return Err(ListError::Parse(
                    "a truncated page without NextKeyMarker".into(),
                ));
            };
            if cp.key_marker.as_deref() == Some(k.as_str()) && cp.version_marker == v {
                return Err(ListError::Parse(format!(
                    "the listing does not advance past key {k:?}"
                )));
            }
            cp.key_marker = Some(k);
            cp.version_marker = v;
        } else {
            cp.complete = true;
        }
        manifest.insert_page(&tasks, &cp)?;
        on_page(&cp);
    }
    Ok(stats)
}

/// Keeps a key's text readable in one line of output.
pub fn show_key(key: &str) -> Cow<'_, str> {
    if key.chars().any(|c| c.is_control()) || key.len() > 200 {
        let mut s: String = key.chars().take(200).collect::<String>();
        if key.len() > 200 {
            s.push('…');
        }
        Cow::Owned(format!("{s:?}"))
    } else {
        Cow::Borrowed(key)
    }
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
    fn rejects_other_roots() {
        assert!(parse_page(b"<Error><Code>X</Code></Error>").is_err());
        assert!(parse_page(b"").is_err());
    }
}
