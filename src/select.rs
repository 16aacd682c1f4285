//! select: what the job does with one listed version — the destinations (ids of the job's
//! destinations) it is copied to, empty when it is not selected. It applies, in order: the
//! job's selection (`--prefix`, `--latest-only`, and `--delete-markers` without a replication
//! configuration), the Batch Replication filters (a source HEAD per version only when an
//! encryption or replication-status filter is set, plus a destination HEAD for the
//! replication status of versions without S3's header), then the replication rules (one
//! `GetObjectTagging` per object version whose key a tag rule covers). It also turns rule
//! decisions into the job's destinations at plan ([`use_replication_config`]), and tallies a
//! dry run.
//!
//! May call: config, filters, rules, the s3 layer.

use std::collections::BTreeMap;

use crate::config::{ConfigError, DestOptions, Destination, JobSettings, Location};
use crate::filters::{EncryptionFilter, HeadFacts};
use crate::rules::{ReplicationConfig, VersionFacts};
use crate::s3::{
    parse_tagging, Encryption, ObjectHead, ObjectRef, S3Client, S3Error, VersionEntry, S3,
    STAMP_KEY,
};

/// The job's destinations for a replication configuration: one per enabled rule with a
/// destination, in rule order (id = position). The caller has validated the configuration.
pub fn destinations_of(cfg: &ReplicationConfig) -> Vec<Destination> {
    cfg.rule_decisions()
        .into_iter()
        .map(|(d, delete_markers)| Destination {
            bucket: d.dest_bucket,
            prefix: String::new(),
            options: DestOptions {
                rule: d.rule_id,
                storage_class: d.storage_class,
                owner_override: d.owner_override,
                kms_key: d.kms_key,
                delete_markers,
                sse_kms_allowed: d.sse_kms_allowed,
            },
        })
        .collect()
}

/// Makes a validated replication configuration the job's: its rules' destinations become the
/// job's (destination 0 is also `dest`).
pub fn use_replication_config(
    settings: &mut JobSettings,
    cfg: ReplicationConfig,
    from: &str,
) -> Result<(), ConfigError> {
    cfg.validate()
        .map_err(|e| ConfigError::Invalid(format!("{from}: {e}")))?;
    let dests = destinations_of(&cfg);
    let Some(first) = dests.first() else {
        return Err(ConfigError::Invalid(format!(
            "{from}: replication configuration: no enabled rule with a destination bucket"
        )));
    };
    settings.dest = Location {
        bucket: first.bucket.clone(),
        prefix: String::new(),
    };
    settings.destinations = dests;
    settings.replication = Some(cfg);
    Ok(())
}

/// Decides, per listed version, which destinations it goes to.
pub struct Selector<'a, C: S3Client> {
    /// The job.
    pub settings: &'a JobSettings,
    /// Reads the source (tags, HEADs).
    pub source: &'a S3<C>,
    /// Reads destination 0 (the stamp, for `--replication-status` without S3's header).
    pub dest: Option<&'a S3<C>>,
}

/// The source version of a listed entry (see [`ObjectRef::listed`]).
fn source_ref(bucket: &str, e: &VersionEntry) -> ObjectRef {
    ObjectRef::listed(bucket, &e.key, &e.version_id, e.is_latest)
}

impl<C: S3Client> Selector<'_, C> {
    /// The destination ids `e` goes to (empty: not selected).
    pub async fn destinations(&self, e: &VersionEntry) -> Result<Vec<i64>, S3Error> {
        let s = self.settings;
        if !self.base_selects(e) || !s.filters.matches_listing(e) {
            return Ok(Vec::new());
        }
        let head = if s.filters.needs_head() && !e.is_delete_marker {
            let src = source_ref(&s.source.bucket, e);
            let h = self.source.req().head_object(&src, None).await?;
            if !self.matches_head(e, &h).await? {
                return Ok(Vec::new());
            }
            Some(h)
        } else {
            if e.is_delete_marker && !s.filters.matches_head(&HeadFacts::default()) {
                return Ok(Vec::new());
            }
            None
        };
        let Some(cfg) = &s.replication else {
            return Ok(vec![0]);
        };
        self.rule_destinations(cfg, e, head.as_ref()).await
    }

    /// `--prefix`, `--latest-only`, and without rules `--delete-markers`.
    fn base_selects(&self, e: &VersionEntry) -> bool {
        let sel = &self.settings.selection;
        if self.settings.replication.is_none() {
            return sel.selects(e);
        }
        // Rules decide about delete markers.
        e.key.starts_with(&sel.prefix) && (!sel.latest_only || (e.is_latest && !e.is_delete_marker))
    }

    /// The HEAD filters (encryption, replication status) on one version's HEAD.
    async fn matches_head(&self, e: &VersionEntry, h: &ObjectHead) -> Result<bool, S3Error> {
        let f = &self.settings.filters;
        let stamped = if !f.replication_status.is_empty() && h.replication_status.is_none() {
            self.stamped_at_dest(e).await?
        } else {
            false
        };
        Ok(f.matches_head(&HeadFacts {
            encryption: Some(EncryptionFilter::name_of(h.encryption.as_ref())),
            replication_status: h.replication_status.as_deref(),
            stamped,
        }))
    }

    /// Whether destination 0's current version of the key is this tool's copy of `e` (its
    /// stamp names `e`'s version id). Only the current version is looked at.
    async fn stamped_at_dest(&self, e: &VersionEntry) -> Result<bool, S3Error> {
        let Some(dest) = self.dest else {
            return Ok(false);
        };
        let obj = self.settings.dest_ref().object(&e.key);
        match dest.req().head_object(&obj, None).await {
            Ok(h) => Ok(h.metadata.get(STAMP_KEY) == Some(&e.version_id)),
            Err(err) if err.status == Some(404) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// The destinations the rules send `e` to: tags read when a tag rule covers the key;
    /// SSE-KMS known only when a HEAD was made (else the copier decides after its own HEAD).
    async fn rule_destinations(
        &self,
        cfg: &ReplicationConfig,
        e: &VersionEntry,
        head: Option<&ObjectHead>,
    ) -> Result<Vec<i64>, S3Error> {
        let tags = if !e.is_delete_marker && cfg.needs_tags_for(&e.key) {
            let src = source_ref(&self.settings.source.bucket, e);
            let t = self.source.req().get_tagging(&src).await?;
            Some(parse_tagging(&t))
        } else {
            None
        };
        let sse_kms = head.is_some_and(|h| {
            matches!(
                h.encryption,
                Some(Encryption::SseKms(_) | Encryption::DsseKms(_))
            )
        });
        let facts = VersionFacts {
            key: &e.key,
            tags: tags.as_deref(),
            is_delete_marker: e.is_delete_marker,
            sse_kms,
        };
        let ids = cfg
            .decide(&facts)
            .into_iter()
            .filter_map(|d| {
                self.settings
                    .destinations
                    .iter()
                    .position(|x| x.options.rule == d.rule_id && x.bucket == d.dest_bucket)
                    .map(|i| i as i64)
            })
            .collect();
        Ok(ids)
    }
}

/// What a dry run would copy: per (destination bucket, storage class, rule), tasks and bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DryRun {
    /// Listed versions and delete markers.
    pub listed: u64,
    /// Listing pages read.
    pub pages: u64,
    /// Tasks and bytes per (destination `s3://bucket/prefix`, storage class of the copy, rule).
    pub rows: BTreeMap<(String, String, String), (u64, u64)>,
}

impl DryRun {
    /// Counts one selected version for each of its destinations.
    pub fn add(&mut self, settings: &JobSettings, e: &VersionEntry, dests: &[i64]) {
        for d in dests {
            let crate::config::DestRef {
                bucket,
                prefix,
                rule: opts,
            } = settings.destination(*d);
            let class = if e.is_delete_marker {
                "(marker)".to_string()
            } else {
                opts.and_then(|o| o.storage_class.clone())
                    .or_else(|| settings.copy.storage_class.clone())
                    .or_else(|| e.storage_class.clone())
                    .unwrap_or_else(|| "STANDARD".into())
            };
            let rule = opts.map_or_else(|| "-".to_string(), |o| o.rule.clone());
            let size = if e.is_delete_marker { 0 } else { e.size };
            let row = self
                .rows
                .entry((format!("s3://{bucket}/{prefix}"), class, rule))
                .or_default();
            row.0 += 1;
            row.1 += size;
        }
    }

    /// The lines `plan --dry-run` prints: one per row, then the total.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "{:<32} {:<20} {:<16} {:>10} {:>14}",
            "destination", "storage class", "rule", "tasks", "bytes"
        )];
        let (mut tasks, mut bytes) = (0, 0);
        for ((dest, class, rule), (n, b)) in &self.rows {
            out.push(format!("{dest:<32} {class:<20} {rule:<16} {n:>10} {b:>14}"));
            tasks += n;
            bytes += b;
        }
        out.push(format!(
            "dry run: {tasks} tasks ({bytes} bytes) from {} listed versions and delete markers; no manifest written",
            self.listed
        ));
        out
    }
}

/// Lists the whole source (under `--prefix`) and tallies what would be copied.
pub async fn dry_run<C: S3Client>(
    selector: &Selector<'_, C>,
    page_size: i32,
) -> Result<DryRun, S3Error> {
    dry_run_each(selector, page_size, |_, _| {}).await
}

/// [`dry_run`], calling `each` with every listed entry and its destinations (none: not
/// selected), in listing order.
pub async fn dry_run_each<C: S3Client>(
    selector: &Selector<'_, C>,
    page_size: i32,
    mut each: impl FnMut(&VersionEntry, &[i64]),
) -> Result<DryRun, S3Error> {
    let s = selector.settings;
    let from = crate::s3::ListFrom {
        bucket: s.source.bucket.clone(),
        prefix: s.selection.prefix.clone(),
        key_marker: None,
        version_marker: None,
        max_keys: page_size,
    };
    let mut walk = crate::s3::Versions::new(selector.source, from);
    let mut out = DryRun::default();
    while let Some(page) = walk.next_page().await? {
        out.pages += 1;
        for e in &page.entries {
            out.listed += 1;
            let dests = selector.destinations(e).await?;
            out.add(s, e, &dests);
            each(e, &dests);
        }
        if !page.truncated {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Location;
    use crate::s3::fake::FakeServer;
    use crate::s3::{Side, S3};

    /// A job from s3://src to `dest`, every other setting the default.
    fn job(dest: &str) -> JobSettings {
        JobSettings {
            source: Location::parse("s3://src").unwrap(),
            dest: Location::parse(dest).unwrap(),
            source_side: Default::default(),
            dest_side: Default::default(),
            selection: Default::default(),
            copy: Default::default(),
            filters: Default::default(),
            replication: None,
            destinations: Vec::new(),
            supplied: None,
        }
    }

    fn entry(key: &str, version_id: &str, is_delete_marker: bool) -> VersionEntry {
        VersionEntry {
            key: key.into(),
            version_id: version_id.into(),
            is_delete_marker,
            is_latest: true,
            size: 3,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn tags_are_read_only_for_keys_a_tag_rule_covers() {
        let server = FakeServer::new();
        server.create_bucket("src", true);
        let tagged = server.put("src", "t/a", b"abc", &[]);
        let plain = server.put("src", "u/b", b"abc", &[]);
        let client = server.client(Side::Source);
        let obj = ObjectRef::version("src", "t/a", &tagged);
        client.put_tagging(&obj, "team=x").await.unwrap();
        let cfg = ReplicationConfig::from_json(
            r#"{"Rules": [
            {"ID": "tagged", "Priority": 2, "Status": "Enabled",
             "Filter": {"And": {"Prefix": "t/", "Tags": [{"Key": "team", "Value": "x"}]}},
             "DeleteMarkerReplication": {"Status": "Disabled"},
             "Destination": {"Bucket": "arn:aws:s3:::b"}},
            {"ID": "all", "Priority": 1, "Status": "Enabled", "Filter": {},
             "DeleteMarkerReplication": {"Status": "Disabled"},
             "Destination": {"Bucket": "arn:aws:s3:::a"}}]}"#,
        )
        .unwrap();
        let mut settings = job("s3://unused");
        use_replication_config(&mut settings, cfg, "test").unwrap();
        let source = S3::alone(client.clone(), 1);
        let sel = Selector {
            settings: &settings,
            source: &source,
            dest: None,
        };
        let sel = &sel;
        let get = |e: VersionEntry| async move { sel.destinations(&e).await.unwrap() };
        assert_eq!(get(entry("t/a", &tagged, false)).await, vec![0, 1]);
        assert_eq!(get(entry("u/b", &plain, false)).await, vec![1]);
        assert_eq!(get(entry("u/b", "dm", true)).await, Vec::<i64>::new());
        let tag_reads = client
            .requests()
            .snapshot()
            .into_iter()
            .find(|(op, _)| *op == "GetObjectTagging")
            .map_or(0, |(_, n)| n);
        assert_eq!(tag_reads, 1, "only t/a is covered by a tag rule");
    }

    #[test]
    fn dry_run_rows_name_the_destination_with_its_prefix() {
        let settings = job("s3://dst/archive/2024/");
        let mut dry = DryRun {
            listed: 2,
            ..Default::default()
        };
        dry.add(&settings, &entry("k", "v1", false), &[0]);
        dry.add(&settings, &entry("k", "dm", true), &[0]);
        let lines = dry.lines();
        let rows: Vec<Vec<&str>> = lines[1..3]
            .iter()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            vec![
                vec!["s3://dst/archive/2024/", "(marker)", "-", "1", "0"],
                vec!["s3://dst/archive/2024/", "STANDARD", "-", "1", "3"],
            ],
            "{lines:?}"
        );
    }
}
