//! Reading a bucket as a user checks it: every key's history (versions and delete markers in
//! order), one version's content (body, headers, metadata, tags, ETag), and the replica
//! assertion that compares a source with its destination. Reads with the SDK only, never
//! with the code under test.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use aws_sdk_s3::Client;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::AfterDeserializationInterceptorContextRef;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

use super::server::{server, Server};

/// The user-metadata key s3-backfill stamps on every write (the source version id); replica
/// comparisons ignore exactly this key, and check that it names the right source version.
pub const STAMP: &str = "s3-backfill-source-version";

/// One entry of a key's history as a user would check it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ver {
    /// Version id.
    pub version_id: String,
    /// A delete marker.
    pub delete_marker: bool,
    /// The current entry.
    pub latest: bool,
    /// ETag.
    pub etag: Option<String>,
    /// Size.
    pub size: i64,
    /// Last-modified, seconds.
    pub secs: i64,
}

/// Keeps, in order, the kinds of the entries of a `ListObjectVersions` answer (true for a
/// delete marker), read from the raw XML: the SDK splits versions and delete markers into two
/// lists and loses how they interleave.
#[derive(Clone, Debug, Default)]
struct EntryKinds(Arc<Mutex<Vec<bool>>>);

impl Intercept for EntryKinds {
    fn name(&self) -> &'static str {
        "EntryKinds"
    }

    fn read_after_deserialization(
        &self,
        context: &AfterDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let body = context.response().body().bytes().unwrap_or_default();
        let mut reader = quick_xml::Reader::from_reader(body);
        let mut depth = 0usize;
        let mut kinds = Vec::new();
        let mut buf = Vec::new();
        loop {
            match reader.read_event_into(&mut buf)? {
                quick_xml::events::Event::Start(e) => {
                    depth += 1;
                    if depth == 2 {
                        match e.local_name().as_ref() {
                            b"Version" => kinds.push(false),
                            b"DeleteMarker" => kinds.push(true),
                            _ => {}
                        }
                    }
                }
                quick_xml::events::Event::End(_) => depth = depth.saturating_sub(1),
                quick_xml::events::Event::Eof => break,
                _ => {}
            }
            buf.clear();
        }
        *self.0.lock().expect("entry kinds") = kinds;
        Ok(())
    }
}

fn ver_of_version(v: &aws_sdk_s3::types::ObjectVersion) -> (String, Ver) {
    let ver = Ver {
        version_id: v.version_id().expect("a version id").to_string(),
        delete_marker: false,
        latest: v.is_latest().unwrap_or(false),
        etag: v.e_tag().map(str::to_string),
        size: v.size().unwrap_or(0),
        secs: v.last_modified().expect("last modified").secs(),
    };
    (v.key().expect("a key").to_string(), ver)
}

fn ver_of_marker(m: &aws_sdk_s3::types::DeleteMarkerEntry) -> (String, Ver) {
    let ver = Ver {
        version_id: m.version_id().expect("a version id").to_string(),
        delete_marker: true,
        latest: m.is_latest().unwrap_or(false),
        etag: None,
        size: 0,
        secs: m.last_modified().expect("last modified").secs(),
    };
    (m.key().expect("a key").to_string(), ver)
}

/// Every entry of a bucket under `prefix`, as (key, entry), in the server's listing order.
async fn listing(c: &Client, bucket: &str, prefix: &str) -> Vec<(String, Ver)> {
    let mut out = Vec::new();
    let (mut km, mut vm) = (None::<String>, None::<String>);
    loop {
        let kinds = EntryKinds::default();
        let r = c
            .list_object_versions()
            .bucket(bucket)
            .prefix(prefix)
            .set_key_marker(km.clone())
            .set_version_id_marker(vm.clone())
            .customize()
            .interceptor(kinds.clone())
            .send()
            .await
            .expect("list versions");
        let kinds = kinds.0.lock().expect("entry kinds").clone();
        let (mut versions, mut markers) = (r.versions().iter(), r.delete_markers().iter());
        assert_eq!(
            kinds.len(),
            r.versions().len() + r.delete_markers().len(),
            "the raw listing and the SDK's disagree"
        );
        for marker in kinds {
            out.push(if marker {
                ver_of_marker(markers.next().expect("a delete marker"))
            } else {
                ver_of_version(versions.next().expect("a version"))
            });
        }
        if r.is_truncated() != Some(true) {
            break;
        }
        km = r.next_key_marker().map(str::to_string);
        vm = r.next_version_id_marker().map(str::to_string);
    }
    out
}

/// Every key's history under `prefix`, oldest first, read with the SDK (not with the code
/// under test). Entries keep the server's listing order (newest first within a key: true
/// order on RGW and AWS), except that the current entry comes first and later seconds before
/// earlier ones: moto lists all versions before all delete markers, and the 1-second pacing
/// of `seed` on moto makes that sort exact there.
pub async fn histories(c: &Client, bucket: &str, prefix: &str) -> BTreeMap<String, Vec<Ver>> {
    let mut out: BTreeMap<String, Vec<Ver>> = BTreeMap::new();
    for (key, v) in listing(c, bucket, prefix).await {
        out.entry(key).or_default().push(v);
    }
    for v in out.values_mut() {
        // A stable sort: the server's order stands within one second.
        v.sort_by(|a, b| b.latest.cmp(&a.latest).then(b.secs.cmp(&a.secs)));
        v.reverse();
    }
    out
}

/// The object versions of a history (no delete markers), oldest first.
pub fn versions_only(h: &[Ver]) -> Vec<&Ver> {
    h.iter().filter(|v| !v.delete_marker).collect()
}

/// What a user compares between a source version and its replica. `PartialEq` compares
/// everything but the stamp.
#[derive(Clone, Debug)]
pub struct Content {
    /// Bytes.
    pub body: Vec<u8>,
    /// Content-Type.
    pub content_type: Option<String>,
    /// Cache-Control.
    pub cache_control: Option<String>,
    /// User metadata, without the [`STAMP`].
    pub metadata: HashMap<String, String>,
    /// Tags, sorted.
    pub tags: Vec<(String, String)>,
    /// ETag.
    pub etag: Option<String>,
    /// The [`STAMP`] metadata value, if any.
    pub stamp: Option<String>,
}

impl PartialEq for Content {
    fn eq(&self, o: &Self) -> bool {
        (
            &self.body,
            &self.content_type,
            &self.cache_control,
            &self.metadata,
            &self.tags,
            &self.etag,
        ) == (
            &o.body,
            &o.content_type,
            &o.cache_control,
            &o.metadata,
            &o.tags,
            &o.etag,
        )
    }
}

/// Reads one version's body, headers, metadata and tags.
pub async fn content(c: &Client, bucket: &str, key: &str, version: &str) -> Content {
    let o = c
        .get_object()
        .bucket(bucket)
        .key(key)
        .version_id(version)
        .send()
        .await
        .unwrap_or_else(|e| panic!("get {key:?} {version}: {e:?}"));
    let content_type = o.content_type().map(str::to_string);
    let cache_control = o.cache_control().map(str::to_string);
    let mut metadata = o.metadata().cloned().unwrap_or_default();
    let stamp = metadata.remove(STAMP);
    let etag = o.e_tag().map(str::to_string);
    let body = o.body.collect().await.unwrap().into_bytes().to_vec();
    let mut tags = tags_of(c, bucket, key, version).await;
    tags.sort();
    Content {
        body,
        content_type,
        cache_control,
        metadata,
        tags,
        etag,
        stamp,
    }
}

/// One version's tags. RGW 16.2 answers GetObjectTagging with 200 and an empty body (which
/// the SDK cannot parse) for an object whose tags came with CreateMultipartUpload, and its
/// HEAD says `x-amz-tagging-count: 0`: such a version has no tags a user can read.
async fn tags_of(c: &Client, bucket: &str, key: &str, version: &str) -> Vec<(String, String)> {
    match c
        .get_object_tagging()
        .bucket(bucket)
        .key(key)
        .version_id(version)
        .send()
        .await
    {
        Ok(t) => t
            .tag_set()
            .iter()
            .map(|t| (t.key().to_string(), t.value().to_string()))
            .collect(),
        Err(e)
            if e.raw_response().is_some_and(|r| {
                r.status().as_u16() == 200 && r.body().bytes().is_some_and(|b| b.is_empty())
            }) =>
        {
            Vec::new()
        }
        Err(e) => panic!("get tags of {key:?} {version}: {e:?}"),
    }
}

/// The two sides of a replica check: a client and a bucket each.
pub struct Sides<'a> {
    /// Source client.
    pub sc: &'a Client,
    /// Source bucket.
    pub src: &'a str,
    /// Destination client.
    pub dc: &'a Client,
    /// Destination bucket.
    pub dst: &'a str,
}

/// Asserts that `dest` holds, for every source key (under `dest_prefix`), the same object
/// versions in the same order with the same content, the same number of delete markers,
/// and the same kind of current entry (on RGW: the same sequence of versions and markers);
/// a replica carrying the stamp names its own source
/// version. `select` picks which source entries a job copies. Returns the versions compared.
pub async fn assert_replica(
    sc: &Client,
    src: &str,
    dc: &Client,
    dst: &str,
    dest_prefix: &str,
    source_prefix: &str,
    select: impl Fn(&[Ver]) -> Vec<Ver>,
) -> usize {
    let sides = Sides { sc, src, dc, dst };
    let sh = histories(sc, src, source_prefix).await;
    let dh = histories(dc, dst, &format!("{dest_prefix}{source_prefix}")).await;
    let mut expected_keys = 0;
    let mut checked = 0;
    for (key, hist) in &sh {
        let want = select(hist);
        let dkey = format!("{dest_prefix}{key}");
        let got = dh.get(&dkey).cloned().unwrap_or_default();
        if want.is_empty() {
            assert!(
                got.is_empty(),
                "{dkey:?} should not exist at the destination: {got:?}"
            );
            continue;
        }
        expected_keys += 1;
        checked += assert_history(&sides, key, &dkey, &want, &got).await;
    }
    assert_eq!(
        dh.len(),
        expected_keys,
        "the destination has other keys: {:?}",
        dh.keys().collect::<Vec<_>>()
    );
    checked
}

/// One key: same versions in order with the same content, same delete markers, same kind of
/// current entry. Returns the versions compared.
async fn assert_history(s: &Sides<'_>, key: &str, dkey: &str, want: &[Ver], got: &[Ver]) -> usize {
    let wv = versions_only(want);
    let gv = versions_only(got);
    assert_eq!(wv.len(), gv.len(), "{key:?}: versions {want:?} vs {got:?}");
    assert_eq!(
        want.iter().filter(|v| v.delete_marker).count(),
        got.iter().filter(|v| v.delete_marker).count(),
        "{key:?}: delete markers {want:?} vs {got:?}"
    );
    assert_eq!(
        want.last().map(|v| v.delete_marker),
        got.last().map(|v| v.delete_marker),
        "{key:?}: kind of the current entry"
    );
    if server() == Server::Rgw {
        // RGW lists true order at both ends (moto cannot place a delete marker written in the
        // same second as a version, and s3-backfill writes a key's history within a second).
        let kinds = |h: &[Ver]| h.iter().map(|v| v.delete_marker).collect::<Vec<_>>();
        assert_eq!(
            kinds(want),
            kinds(got),
            "{key:?}: versions and delete markers in order (true = marker): {want:?} vs {got:?}"
        );
    }
    for (sv, dv) in wv.iter().zip(&gv) {
        let a = content(s.sc, s.src, key, &sv.version_id).await;
        let b = content(s.dc, s.dst, dkey, &dv.version_id).await;
        assert_eq!(
            a, b,
            "{key:?}: version {} vs replica {}",
            sv.version_id, dv.version_id
        );
        if let Some(stamp) = &b.stamp {
            assert_eq!(
                stamp, &sv.version_id,
                "{key:?}: replica {} is stamped with another source version",
                dv.version_id
            );
        }
    }
    wv.len()
}

/// Every entry of a history (what `--delete-markers` copies).
pub fn all(h: &[Ver]) -> Vec<Ver> {
    h.to_vec()
}

/// Object versions only (the default selection).
pub fn no_markers(h: &[Ver]) -> Vec<Ver> {
    h.iter().filter(|v| !v.delete_marker).cloned().collect()
}

/// The current version only, unless it is a delete marker (`--latest-only`).
pub fn latest_only(h: &[Ver]) -> Vec<Ver> {
    h.last()
        .filter(|v| !v.delete_marker)
        .cloned()
        .into_iter()
        .collect()
}

/// Versions and delete markers in a bucket, all keys together.
pub async fn entry_count(c: &Client, bucket: &str) -> usize {
    histories(c, bucket, "").await.values().map(Vec::len).sum()
}
