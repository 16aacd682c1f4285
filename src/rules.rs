//! rules: S3 replication configurations — the JSON given to `aws s3api put-bucket-replication`
//! and the XML `GetBucketReplication` returns — parsed into one model, validated the way S3
//! validates them, and evaluated per listed version: which destination buckets a version goes
//! to, and with which storage class, owner override and KMS key.
//!
//! Semantics (as S3 defines them):
//! - only `Enabled` rules take part;
//! - a rule matches a version when the key starts with its prefix and the version carries
//!   *all* of the rule's tags (same key, same value);
//! - for each destination bucket, the matching rule with the highest `Priority` (the larger
//!   number wins) decides storage class, owner override, KMS key and whether delete markers go;
//! - delete markers have no tags, so tag rules never match (nor replicate) them; a V2 rule sends
//!   them only with `DeleteMarkerReplication` `Enabled`; the older rule-level-`Prefix` rules (V1)
//!   send them unless they say `Disabled`;
//! - SSE-KMS (and DSSE-KMS) objects go only when the deciding rule opts in through
//!   `SourceSelectionCriteria.SseKmsEncryptedObjects`.
//!
//! Costs the caller must pay: tag rules need each version's tags (one `GetObjectTagging` per
//! object version: see [`ReplicationConfig::needs_tags_for`] to skip keys no tag rule covers);
//! excluding SSE-KMS objects needs each version's encryption (a HEAD, or the copier's own read
//! of the source: [`Decision::sse_kms_allowed`] lets it decide then).
//!
//! May call: serde, quick-xml. Nothing else of the crate.

use std::collections::{BTreeMap, HashMap};

use quick_xml::events::Event;
use quick_xml::Reader;
use serde::{Deserialize, Serialize};

/// At most this many rules in one configuration (S3's limit).
pub const MAX_RULES: usize = 1000;

/// Why a configuration cannot be used. Each message is one line and names the rule.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RulesError {
    /// The JSON does not parse.
    #[error("replication configuration: bad JSON: {0}")]
    Json(String),
    /// The XML does not parse.
    #[error("replication configuration: bad XML: {0}")]
    Xml(String),
    /// S3 would refuse the configuration.
    #[error("replication configuration: {0}")]
    Invalid(String),
}

/// A whole replication configuration (`put-bucket-replication`'s JSON field names).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ReplicationConfig {
    /// The IAM role S3 would assume (kept, unused by a client-side tool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The rules, in the order given.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// One replication rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Rule {
    /// The rule's id.
    #[serde(rename = "ID", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Priority among rules sending to the same bucket (larger wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    /// `Enabled` or `Disabled`.
    #[serde(default)]
    pub status: String,
    /// The current (V2) selection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Filter>,
    /// The older (V1) rule-level prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Whether delete markers are replicated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_marker_replication: Option<StatusField>,
    /// Where replicas go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Destination>,
    /// Which encrypted objects take part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_selection_criteria: Option<SourceSelectionCriteria>,
}

/// A rule's `Filter`: at most one of `Prefix`, `Tag`, `And`; empty selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Filter {
    /// Key prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// One tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<Tag>,
    /// A prefix and tags, all required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub and: Option<AndOperator>,
}

/// `Filter.And`: a prefix and tags that must all match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AndOperator {
    /// Key prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<Tag>,
}

/// One object tag.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Tag {
    /// Tag key.
    pub key: String,
    /// Tag value.
    #[serde(default)]
    pub value: String,
}

/// A `{"Status": "Enabled" | "Disabled"}` element.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct StatusField {
    /// `Enabled` or `Disabled`.
    #[serde(default)]
    pub status: String,
}

impl StatusField {
    fn enabled(&self) -> bool {
        self.status == "Enabled"
    }
}

/// A rule's `Destination`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Destination {
    /// The bucket ARN (`arn:aws:s3:::name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// The destination bucket owner's account id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Storage class of the replicas (None: the source's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
    /// Owner override (`{"Owner": "Destination"}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_control_translation: Option<AccessControlTranslation>,
    /// KMS key for replicas of SSE-KMS objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_configuration: Option<EncryptionConfiguration>,
}

/// `Destination.AccessControlTranslation`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AccessControlTranslation {
    /// Only `Destination` is defined.
    #[serde(default)]
    pub owner: String,
}

/// `Destination.EncryptionConfiguration`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionConfiguration {
    /// KMS key id or ARN for the replicas.
    #[serde(
        rename = "ReplicaKmsKeyID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub replica_kms_key_id: Option<String>,
}

/// A rule's `SourceSelectionCriteria`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SourceSelectionCriteria {
    /// Whether SSE-KMS objects are replicated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sse_kms_encrypted_objects: Option<StatusField>,
}

/// What [`ReplicationConfig::decide`] needs to know about one listed version.
#[derive(Clone, Copy, Debug)]
pub struct VersionFacts<'a> {
    /// The key.
    pub key: &'a str,
    /// The version's tags; None when not read (treated as no tags: callers read them when
    /// [`ReplicationConfig::needs_tags_for`] says so).
    pub tags: Option<&'a [(String, String)]>,
    /// A delete marker.
    pub is_delete_marker: bool,
    /// Encrypted with SSE-KMS or DSSE-KMS (false when not known yet).
    pub sse_kms: bool,
}

/// Where one version goes, and how: one per destination bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Destination bucket name.
    pub dest_bucket: String,
    /// The deciding rule (its ID, or `#n` by position).
    pub rule_id: String,
    /// Storage class of the replica (None: keep the source's).
    pub storage_class: Option<String>,
    /// Replicas owned by the destination bucket owner (`bucket-owner-full-control`).
    pub owner_override: bool,
    /// KMS key for replicas of SSE-KMS objects.
    pub kms_key: Option<String>,
    /// The deciding rule replicates SSE-KMS objects (for a caller that learns the encryption
    /// only when it reads the source).
    pub sse_kms_allowed: bool,
}

impl ReplicationConfig {
    /// Parses `put-bucket-replication`'s JSON; also accepts the output of
    /// `aws s3api get-bucket-replication` (`{"ReplicationConfiguration": {...}}`).
    pub fn from_json(text: &str) -> Result<ReplicationConfig, RulesError> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Shape {
            Wrapped {
                #[serde(rename = "ReplicationConfiguration")]
                inner: ReplicationConfig,
            },
            Plain(ReplicationConfig),
        }
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| RulesError::Json(e.to_string()))?;
        if !value.is_object() {
            return Err(RulesError::Json("expected an object with Rules".into()));
        }
        match serde_json::from_value::<Shape>(value.clone()) {
            Ok(Shape::Wrapped { inner }) | Ok(Shape::Plain(inner)) => Ok(inner),
            // The untagged error says nothing useful: parse the plain shape for its message.
            Err(_) => serde_json::from_value::<ReplicationConfig>(value)
                .map_err(|e| RulesError::Json(e.to_string())),
        }
    }

    /// Parses the XML `GetBucketReplication` returns (root `ReplicationConfiguration`).
    pub fn from_xml(xml: &[u8]) -> Result<ReplicationConfig, RulesError> {
        let root = xml::parse(xml)?;
        if root.name != "ReplicationConfiguration" {
            return Err(RulesError::Xml(format!(
                "root element is {}, expected ReplicationConfiguration",
                root.name
            )));
        }
        Ok(ReplicationConfig {
            role: root.text_of("Role"),
            rules: root
                .children_named("Rule")
                .map(xml::rule)
                .collect::<Result<_, _>>()?,
        })
    }

    /// Refuses what S3 refuses, with one line naming the rule.
    pub fn validate(&self) -> Result<(), RulesError> {
        validate::config(self).map_err(RulesError::Invalid)
    }

    /// The destination bucket names of the enabled rules, in order of first appearance.
    pub fn destinations(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for rule in self.enabled() {
            if let Some(b) = rule.dest_bucket() {
                if !out.iter().any(|o| o == b) {
                    out.push(b.to_string());
                }
            }
        }
        out
    }

    /// Whether some enabled rule selects by tags (each version's tags must then be read).
    pub fn needs_tags(&self) -> bool {
        self.enabled().any(|r| !r.tags().is_empty())
    }

    /// Whether the tags of `key`'s versions can change the decision: some enabled tag rule's
    /// prefix covers the key.
    pub fn needs_tags_for(&self, key: &str) -> bool {
        self.enabled()
            .any(|r| !r.tags().is_empty() && key.starts_with(r.key_prefix()))
    }

    /// Whether some enabled rule leaves SSE-KMS objects out (each version's encryption must
    /// then be known, at plan time or when the copier reads the source).
    pub fn needs_encryption(&self) -> bool {
        self.enabled().any(|r| !r.replicates_sse_kms())
    }

    /// Where one version goes: one decision per destination bucket that receives it, in the
    /// order of [`ReplicationConfig::destinations`].
    pub fn decide(&self, facts: &VersionFacts<'_>) -> Vec<Decision> {
        // Per destination: (priority, position, rule) of the best matching rule.
        let mut best: HashMap<&str, (i64, usize, &Rule)> = HashMap::new();
        for (pos, rule) in self.rules.iter().enumerate() {
            if !rule.is_enabled() || !rule.matches(facts) {
                continue;
            }
            let Some(dest) = rule.dest_bucket() else {
                continue;
            };
            let prio = rule.priority.unwrap_or(0);
            // Equal priorities are refused by validate(); the earlier rule wins otherwise.
            let better = best.get(dest).is_none_or(|(p, _, _)| prio > *p);
            if better {
                best.insert(dest, (prio, pos, rule));
            }
        }
        self.destinations()
            .into_iter()
            .filter_map(|dest| {
                let (_, pos, rule) = *best.get(dest.as_str())?;
                rule.decision(dest, pos, facts)
            })
            .collect()
    }

    /// What each enabled rule with a destination decides for the objects it matches, in rule
    /// order, with whether it replicates delete markers (one job destination per rule).
    pub fn rule_decisions(&self) -> Vec<(Decision, bool)> {
        let facts = VersionFacts {
            key: "",
            tags: None,
            is_delete_marker: false,
            sse_kms: false,
        };
        self.rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_enabled())
            .filter_map(|(pos, r)| {
                let dest = r.dest_bucket()?.to_string();
                Some((
                    r.decision(dest, pos, &facts)?,
                    r.replicates_delete_markers(),
                ))
            })
            .collect()
    }

    fn enabled(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().filter(|r| r.is_enabled())
    }
}

impl Rule {
    /// The name used in messages: `"ID"`, or `#n` (1-based position) without an ID.
    pub fn label(&self, pos: usize) -> String {
        match self.id.as_deref() {
            Some(id) if !id.is_empty() => format!("rule \"{id}\""),
            _ => format!("rule #{}", pos + 1),
        }
    }

    fn is_enabled(&self) -> bool {
        self.status == "Enabled"
    }

    /// The older generation: a rule-level `Prefix` and no `Filter`.
    fn is_v1(&self) -> bool {
        self.filter.is_none() && self.prefix.is_some()
    }

    fn key_prefix(&self) -> &str {
        if let Some(f) = &self.filter {
            if let Some(and) = &f.and {
                return and.prefix.as_deref().unwrap_or("");
            }
            return f.prefix.as_deref().unwrap_or("");
        }
        self.prefix.as_deref().unwrap_or("")
    }

    fn tags(&self) -> Vec<&Tag> {
        match &self.filter {
            Some(Filter { tag: Some(t), .. }) => vec![t],
            Some(Filter { and: Some(a), .. }) => a.tags.iter().collect(),
            _ => Vec::new(),
        }
    }

    fn dest_bucket(&self) -> Option<&str> {
        bucket_from_arn(self.destination.as_ref()?.bucket.as_deref()?)
    }

    fn replicates_sse_kms(&self) -> bool {
        self.source_selection_criteria
            .as_ref()
            .and_then(|c| c.sse_kms_encrypted_objects.as_ref())
            .is_some_and(StatusField::enabled)
    }

    fn replicates_delete_markers(&self) -> bool {
        if !self.tags().is_empty() {
            return false;
        }
        match &self.delete_marker_replication {
            Some(d) => d.enabled(),
            None => self.is_v1(),
        }
    }

    fn matches(&self, facts: &VersionFacts<'_>) -> bool {
        if !facts.key.starts_with(self.key_prefix()) {
            return false;
        }
        // Delete markers carry no tags, whatever the caller passes.
        let have = match facts.tags {
            Some(t) if !facts.is_delete_marker => t,
            _ => &[],
        };
        self.tags()
            .iter()
            .all(|t| have.iter().any(|(k, v)| *k == t.key && *v == t.value))
    }

    fn decision(&self, dest: String, pos: usize, facts: &VersionFacts<'_>) -> Option<Decision> {
        if facts.is_delete_marker && !self.replicates_delete_markers() {
            return None;
        }
        if facts.sse_kms && !self.replicates_sse_kms() {
            return None;
        }
        let d = self.destination.as_ref()?;
        Some(Decision {
            dest_bucket: dest,
            rule_id: self.id.clone().unwrap_or_else(|| format!("#{}", pos + 1)),
            storage_class: d.storage_class.clone().filter(|s| !s.is_empty()),
            owner_override: d
                .access_control_translation
                .as_ref()
                .is_some_and(|a| a.owner == "Destination"),
            kms_key: d
                .encryption_configuration
                .as_ref()
                .and_then(|e| e.replica_kms_key_id.clone()),
            sse_kms_allowed: self.replicates_sse_kms(),
        })
    }
}

/// The bucket name of an S3 bucket ARN (`arn:<partition>:s3:::<name>`), when it is one.
pub fn bucket_from_arn(arn: &str) -> Option<&str> {
    let rest = arn.strip_prefix("arn:")?;
    let (partition, rest) = rest.split_once(':')?;
    let name = rest.strip_prefix("s3:::")?;
    let name_ok =
        !name.is_empty() && name.len() <= 255 && !name.contains(['/', ':', ' ', '\t', '\n', '\r']);
    (!partition.is_empty() && name_ok).then_some(name)
}

/// The checks S3 makes when a configuration is put.
mod validate {
    use super::*;

    pub(super) fn config(cfg: &ReplicationConfig) -> Result<(), String> {
        if cfg.rules.is_empty() {
            return Err("no rules".into());
        }
        if cfg.rules.len() > MAX_RULES {
            return Err(format!(
                "{} rules, at most {MAX_RULES} are allowed",
                cfg.rules.len()
            ));
        }
        for (pos, rule) in cfg.rules.iter().enumerate() {
            one_rule(rule).map_err(|e| format!("{}: {e}", rule.label(pos)))?;
        }
        unique_ids(cfg)?;
        one_generation(cfg)?;
        unique_priorities(cfg)?;
        v1_rules(cfg)
    }

    fn one_rule(rule: &Rule) -> Result<(), String> {
        if let Some(id) = &rule.id {
            if id.len() > 255 {
                return Err("ID longer than 255 characters".into());
            }
        }
        status("Status", &rule.status)?;
        if rule.filter.is_some() && rule.prefix.is_some() {
            return Err("has both a rule-level Prefix and a Filter".into());
        }
        if rule.filter.is_none() && rule.prefix.is_none() {
            return Err("has neither Filter nor Prefix (use \"Filter\": {} for all keys)".into());
        }
        if let Some(f) = &rule.filter {
            filter(f)?;
            if rule.delete_marker_replication.is_none() {
                return Err("uses Filter but has no DeleteMarkerReplication".into());
            }
        }
        if let Some(d) = &rule.delete_marker_replication {
            status("DeleteMarkerReplication.Status", &d.status)?;
            if d.enabled() && !rule.tags().is_empty() {
                return Err(
                    "filters on tags and enables DeleteMarkerReplication; S3 refuses \
                            that (delete markers have no tags)"
                        .into(),
                );
            }
        }
        destination(rule)
    }

    fn status(what: &str, value: &str) -> Result<(), String> {
        match value {
            "Enabled" | "Disabled" => Ok(()),
            other => Err(format!(
                "{what} is \"{other}\", expected Enabled or Disabled"
            )),
        }
    }

    fn filter(f: &Filter) -> Result<(), String> {
        let given = [f.prefix.is_some(), f.tag.is_some(), f.and.is_some()];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err("Filter has more than one of Prefix, Tag, And (use And)".into());
        }
        if let Some(t) = &f.tag {
            tag(t)?;
        }
        if let Some(and) = &f.and {
            let mut seen = BTreeMap::new();
            for t in &and.tags {
                tag(t)?;
                if seen.insert(t.key.as_str(), ()).is_some() {
                    return Err(format!("Filter.And has tag key \"{}\" twice", t.key));
                }
            }
        }
        Ok(())
    }

    fn tag(t: &Tag) -> Result<(), String> {
        if t.key.is_empty() || t.key.chars().count() > 128 || t.value.chars().count() > 256 {
            return Err(format!(
                "tag \"{}\": keys are 1-128 characters, values at most 256",
                t.key
            ));
        }
        Ok(())
    }

    fn destination(rule: &Rule) -> Result<(), String> {
        let Some(d) = &rule.destination else {
            return Err("has no Destination".into());
        };
        let Some(arn) = d.bucket.as_deref() else {
            return Err("has no Destination.Bucket".into());
        };
        if bucket_from_arn(arn).is_none() {
            return Err(format!(
                "Destination.Bucket \"{arn}\" is not a bucket ARN (arn:aws:s3:::NAME)"
            ));
        }
        if let Some(act) = &d.access_control_translation {
            if act.owner != "Destination" {
                return Err(format!(
                    "AccessControlTranslation.Owner is \"{}\", expected Destination",
                    act.owner
                ));
            }
            if d.account.as_deref().is_none_or(str::is_empty) {
                return Err("AccessControlTranslation needs Destination.Account".into());
            }
        }
        if let Some(c) = &rule.source_selection_criteria {
            if let Some(s) = &c.sse_kms_encrypted_objects {
                status("SseKmsEncryptedObjects.Status", &s.status)?;
            }
        }
        let kms_key = d
            .encryption_configuration
            .as_ref()
            .and_then(|e| e.replica_kms_key_id.as_deref());
        if rule.replicates_sse_kms() && kms_key.is_none_or(str::is_empty) {
            return Err("replicates SSE-KMS objects but has no \
                        Destination.EncryptionConfiguration.ReplicaKmsKeyID"
                .into());
        }
        Ok(())
    }

    fn unique_ids(cfg: &ReplicationConfig) -> Result<(), String> {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (pos, rule) in cfg.rules.iter().enumerate() {
            let Some(id) = rule.id.as_deref().filter(|i| !i.is_empty()) else {
                continue;
            };
            if let Some(first) = seen.insert(id, pos) {
                return Err(format!(
                    "{}: ID used twice (also rule #{})",
                    rule.label(pos),
                    first + 1
                ));
            }
        }
        Ok(())
    }

    fn one_generation(cfg: &ReplicationConfig) -> Result<(), String> {
        let v1 = cfg.rules.iter().position(Rule::is_v1);
        let v2 = cfg.rules.iter().position(|r| r.filter.is_some());
        if let (Some(a), Some(b)) = (v1, v2) {
            let (later, earlier) = (a.max(b), a.min(b));
            let kind = |p: usize| {
                if cfg.rules[p].is_v1() {
                    "the older rule-level Prefix"
                } else {
                    "Filter"
                }
            };
            return Err(format!(
                "{} uses {} but {} uses {}: all rules must be of one generation",
                cfg.rules[later].label(later),
                kind(later),
                cfg.rules[earlier].label(earlier),
                kind(earlier)
            ));
        }
        Ok(())
    }

    fn unique_priorities(cfg: &ReplicationConfig) -> Result<(), String> {
        let mut seen: HashMap<i64, usize> = HashMap::new();
        for (pos, rule) in cfg.rules.iter().enumerate() {
            if rule.filter.is_none() {
                continue;
            }
            let prio = rule.priority.unwrap_or(0);
            if let Some(first) = seen.insert(prio, pos) {
                return Err(format!(
                    "{}: priority {prio} already used by {}",
                    rule.label(pos),
                    cfg.rules[first].label(first)
                ));
            }
        }
        Ok(())
    }

    /// V1 rules: one destination for all, and no prefix may contain another.
    fn v1_rules(cfg: &ReplicationConfig) -> Result<(), String> {
        let v1: Vec<(usize, &Rule)> = cfg
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_v1())
            .collect();
        for (i, &(pa, a)) in v1.iter().enumerate() {
            for &(pb, b) in &v1[i + 1..] {
                if a.dest_bucket() != b.dest_bucket() {
                    return Err(format!(
                        "{}: rules with a rule-level Prefix must share one destination (see {})",
                        b.label(pb),
                        a.label(pa)
                    ));
                }
                let (x, y) = (a.key_prefix(), b.key_prefix());
                if x.starts_with(y) || y.starts_with(x) {
                    return Err(format!(
                        "{}: prefix \"{y}\" overlaps \"{x}\" of {}",
                        b.label(pb),
                        a.label(pa)
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A small element tree for the XML shape, and its mapping onto the model.
mod xml {
    use super::*;

    #[derive(Debug, Default)]
    pub(super) struct Element {
        pub(super) name: String,
        text: String,
        children: Vec<Element>,
    }

    impl Element {
        pub(super) fn children_named<'a>(
            &'a self,
            name: &'a str,
        ) -> impl Iterator<Item = &'a Element> + 'a {
            self.children.iter().filter(move |c| c.name == name)
        }

        fn child(&self, name: &str) -> Option<&Element> {
            self.children.iter().find(|c| c.name == name)
        }

        pub(super) fn text_of(&self, name: &str) -> Option<String> {
            self.child(name).map(|c| c.text.trim().to_string())
        }

        fn status_of(&self, name: &str) -> Option<StatusField> {
            self.child(name).map(|c| StatusField {
                status: c.text_of("Status").unwrap_or_default(),
            })
        }
    }

    /// Parses a document into its root element (local names, namespaces dropped).
    pub(super) fn parse(bytes: &[u8]) -> Result<Element, RulesError> {
        let mut reader = Reader::from_reader(bytes);
        let mut buf = Vec::new();
        let mut stack: Vec<Element> = vec![Element::default()];
        let err = |r: &Reader<&[u8]>, e: &dyn std::fmt::Display| {
            RulesError::Xml(format!("at byte {}: {e}", r.buffer_position()))
        };
        loop {
            let ev = reader
                .read_event_into(&mut buf)
                .map_err(|e| err(&reader, &e))?;
            let top = stack.len() - 1;
            match ev {
                Event::Start(e) => stack.push(named(e.local_name().as_ref())),
                Event::Empty(e) => stack[top].children.push(named(e.local_name().as_ref())),
                Event::Text(t) => stack[top]
                    .text
                    .push_str(&t.decode().map_err(|e| err(&reader, &e))?),
                Event::CData(t) => stack[top].text.push_str(&String::from_utf8_lossy(&t)),
                Event::GeneralRef(r) => {
                    let c = match r.resolve_char_ref().map_err(|e| err(&reader, &e))? {
                        Some(c) => c.to_string(),
                        None => {
                            let name = String::from_utf8_lossy(&r).into_owned();
                            quick_xml::escape::resolve_xml_entity(&name)
                                .ok_or_else(|| err(&reader, &format!("unknown entity &{name};")))?
                                .to_string()
                        }
                    };
                    stack[top].text.push_str(&c);
                }
                Event::End(_) => {
                    let done = stack.pop().unwrap_or_default();
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(done),
                        None => return Err(err(&reader, &"unbalanced end tag")),
                    }
                }
                Event::Eof => break,
                _ => {}
            }
            buf.clear();
        }
        let mut doc = stack.pop().unwrap_or_default();
        if !stack.is_empty() || doc.children.len() != 1 {
            return Err(RulesError::Xml("expected one root element".into()));
        }
        Ok(doc.children.remove(0))
    }

    fn named(name: &[u8]) -> Element {
        Element {
            name: String::from_utf8_lossy(name).into_owned(),
            ..Element::default()
        }
    }

    fn tag(e: &Element) -> Tag {
        Tag {
            key: e.text_of("Key").unwrap_or_default(),
            value: e.text_of("Value").unwrap_or_default(),
        }
    }

    fn filter(e: &Element) -> Filter {
        Filter {
            prefix: e.text_of("Prefix"),
            tag: e.child("Tag").map(tag),
            and: e.child("And").map(|a| AndOperator {
                prefix: a.text_of("Prefix"),
                tags: a.children_named("Tag").map(tag).collect(),
            }),
        }
    }

    fn destination(e: &Element) -> Destination {
        Destination {
            bucket: e.text_of("Bucket"),
            account: e.text_of("Account"),
            storage_class: e.text_of("StorageClass"),
            access_control_translation: e.child("AccessControlTranslation").map(|a| {
                AccessControlTranslation {
                    owner: a.text_of("Owner").unwrap_or_default(),
                }
            }),
            encryption_configuration: e.child("EncryptionConfiguration").map(|c| {
                EncryptionConfiguration {
                    replica_kms_key_id: c.text_of("ReplicaKmsKeyID"),
                }
            }),
        }
    }

    pub(super) fn rule(e: &Element) -> Result<Rule, RulesError> {
        let priority = match e.text_of("Priority") {
            Some(p) => Some(p.parse::<i64>().map_err(|_| {
                RulesError::Xml(format!("rule Priority \"{p}\" is not an integer"))
            })?),
            None => None,
        };
        Ok(Rule {
            id: e.text_of("ID"),
            priority,
            status: e.text_of("Status").unwrap_or_default(),
            filter: e.child("Filter").map(filter),
            prefix: e.text_of("Prefix"),
            delete_marker_replication: e.status_of("DeleteMarkerReplication"),
            destination: e.child("Destination").map(destination),
            source_selection_criteria: e.child("SourceSelectionCriteria").map(|c| {
                SourceSelectionCriteria {
                    sse_kms_encrypted_objects: c.status_of("SseKmsEncryptedObjects"),
                }
            }),
        })
    }
}

#[cfg(test)]
mod tests;
