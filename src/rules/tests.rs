//! Rule-engine tests from the JSON and XML fixtures in tests/fixtures/replication.

use super::*;

macro_rules! fixture {
    ($name:literal) => {
        include_str!(concat!("../../tests/fixtures/replication/", $name))
    };
}

fn json(text: &str) -> ReplicationConfig {
    let cfg = ReplicationConfig::from_json(text).expect("parses");
    cfg.validate().expect("valid");
    cfg
}

fn xml(text: &str) -> ReplicationConfig {
    let cfg = ReplicationConfig::from_xml(text.as_bytes()).expect("parses");
    cfg.validate().expect("valid");
    cfg
}

fn object(key: &str) -> VersionFacts<'_> {
    VersionFacts {
        key,
        tags: None,
        is_delete_marker: false,
        sse_kms: false,
    }
}

fn marker(key: &str) -> VersionFacts<'_> {
    VersionFacts {
        is_delete_marker: true,
        ..object(key)
    }
}

/// (destination, rule, storage class) of each decision.
fn summary(decisions: &[Decision]) -> Vec<(String, String, Option<String>)> {
    decisions
        .iter()
        .map(|d| {
            (
                d.dest_bucket.clone(),
                d.rule_id.clone(),
                d.storage_class.clone(),
            )
        })
        .collect()
}

fn row(dest: &str, rule: &str, class: Option<&str>) -> (String, String, Option<String>) {
    (dest.into(), rule.into(), class.map(String::from))
}

fn tags(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn decide_tagged(cfg: &ReplicationConfig, key: &str, t: &[(String, String)]) -> Vec<Decision> {
    cfg.decide(&VersionFacts {
        tags: Some(t),
        ..object(key)
    })
}

#[test]
fn seed_configuration_replicates_every_object_but_no_delete_marker() {
    let cfg = json(fixture!("seed.json"));
    assert_eq!(cfg.destinations(), vec!["backup-bucket".to_string()]);
    assert!(!cfg.needs_tags());
    let d = cfg.decide(&object("any/key with space"));
    assert_eq!(
        summary(&d),
        vec![row("backup-bucket", "seed", Some("STANDARD"))]
    );
    assert!(!d[0].owner_override);
    assert_eq!(d[0].kms_key, None);
    assert!(cfg.decide(&marker("any/key")).is_empty());
}

#[test]
fn highest_priority_rule_decides_per_destination() {
    let cfg = json(fixture!("priority.json"));
    // logs/ matches both enabled rules: priority 5 wins, the disabled priority 9 rule is ignored.
    assert_eq!(
        summary(&cfg.decide(&object("logs/2024/app.log"))),
        vec![row("backup-bucket", "logs-to-ia", Some("STANDARD_IA"))]
    );
    assert_eq!(
        summary(&cfg.decide(&object("images/cat.png"))),
        vec![row("backup-bucket", "everything", Some("STANDARD"))]
    );
    // The deciding rule also decides about delete markers: logs-to-ia does not send them even
    // though the lower-priority "everything" would.
    assert!(cfg.decide(&marker("logs/old.log")).is_empty());
    assert_eq!(
        summary(&cfg.decide(&marker("images/cat.png"))),
        vec![row("backup-bucket", "everything", Some("STANDARD"))]
    );
}

#[test]
fn two_destinations_each_get_their_own_decision() {
    let cfg = json(fixture!("two-destinations.json"));
    assert_eq!(
        cfg.destinations(),
        vec!["replica-eu".to_string(), "replica-archive".to_string()]
    );
    let d = cfg.decide(&object("data/2025/x.csv"));
    assert_eq!(
        summary(&d),
        vec![
            row("replica-eu", "to-eu", Some("STANDARD_IA")),
            row("replica-archive", "to-archive", Some("DEEP_ARCHIVE")),
        ]
    );
    assert!(d[0].owner_override, "to-eu translates the owner");
    assert!(!d[1].owner_override);
    assert_eq!(
        summary(&cfg.decide(&object("other/x"))),
        vec![row("replica-archive", "to-archive", Some("DEEP_ARCHIVE"))]
    );
    // Delete markers go to replica-eu only (to-archive has them disabled).
    assert_eq!(
        summary(&cfg.decide(&marker("data/x"))),
        vec![row("replica-eu", "to-eu", Some("STANDARD_IA"))]
    );
    assert!(cfg.decide(&marker("other/x")).is_empty());
}

#[test]
fn xml_shape_reads_into_the_same_model_as_json() {
    assert_eq!(
        xml(fixture!("two-destinations.xml")),
        json(fixture!("two-destinations.json"))
    );
    assert_eq!(
        xml(fixture!("tags-and.xml")),
        json(fixture!("tags-and.json"))
    );
}

#[test]
fn tag_and_rule_needs_every_tag_and_the_prefix() {
    let cfg = json(fixture!("tags-and.json"));
    assert!(cfg.needs_tags());
    assert!(cfg.needs_tags_for("docs/a.txt"));
    assert!(
        cfg.needs_tags_for("misc/a.txt"),
        "the single-tag rule covers every key"
    );
    let both = tags(&[("project", "blue"), ("keep", "yes"), ("extra", "1")]);
    let one = tags(&[("project", "blue")]);
    let wrong_value = tags(&[("project", "red"), ("keep", "yes")]);
    assert_eq!(
        summary(&decide_tagged(&cfg, "docs/a.txt", &both)),
        vec![row("replica", "blue-docs", Some("GLACIER"))]
    );
    for partial in [one, wrong_value] {
        assert_eq!(
            summary(&decide_tagged(&cfg, "docs/a.txt", &partial)),
            vec![row("replica", "rest", Some("STANDARD"))]
        );
    }
    // All tags but outside the prefix: the And rule does not match.
    assert_eq!(
        summary(&decide_tagged(&cfg, "pics/a.png", &both)),
        vec![row("replica", "rest", Some("STANDARD"))]
    );
    // Tags not read count as no tags.
    assert_eq!(
        summary(&cfg.decide(&object("docs/a.txt"))),
        vec![row("replica", "rest", Some("STANDARD"))]
    );
}

#[test]
fn single_tag_rule_sends_to_its_own_destination_and_never_delete_markers() {
    let cfg = json(fixture!("tags-and.json"));
    let secret = tags(&[("class", "confidential")]);
    let d = cfg.decide(&VersionFacts {
        tags: Some(&secret),
        ..object("misc/plan.pdf")
    });
    assert_eq!(
        summary(&d),
        vec![
            row("replica", "rest", Some("STANDARD")),
            row("vault", "confidential", None),
        ]
    );
    // A delete marker has no tags: only the untagged rule "rest" (delete markers enabled) sends it.
    assert_eq!(
        summary(&cfg.decide(&VersionFacts {
            tags: Some(&secret),
            ..marker("misc/plan.pdf")
        })),
        vec![row("replica", "rest", Some("STANDARD"))]
    );
}

#[test]
fn a_delete_marker_never_matches_a_tag_rule_even_with_tags_passed() {
    let cfg = json(fixture!("tags-and.json"));
    let blue = tags(&[("project", "blue"), ("keep", "yes")]);
    let d = cfg.decide(&VersionFacts {
        tags: Some(&blue),
        ..marker("docs/a.txt")
    });
    // blue-docs (priority 3) would win for an object; for a delete marker "rest" decides.
    assert_eq!(summary(&d), vec![row("replica", "rest", Some("STANDARD"))]);
}

#[test]
fn sse_kms_objects_only_through_rules_that_opt_in() {
    let cfg = json(fixture!("kms.json"));
    assert!(cfg.needs_encryption(), "rule \"plain\" leaves SSE-KMS out");
    let kms = |key| VersionFacts {
        sse_kms: true,
        ..object(key)
    };
    let d = cfg.decide(&kms("secrets/db.key"));
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].rule_id, "kms-secrets");
    assert!(d[0].owner_override);
    assert!(d[0].sse_kms_allowed);
    assert_eq!(
        d[0].kms_key.as_deref(),
        Some("arn:aws:kms:eu-west-1:444455556666:key/1234abcd-12ab-34cd-56ef-1234567890ab")
    );
    assert!(cfg.decide(&kms("public/readme")).is_empty());
    let plain = cfg.decide(&object("public/readme"));
    assert_eq!(plain.len(), 1);
    assert!(!plain[0].sse_kms_allowed);
    assert!(json(fixture!("seed.json")).decide(&kms("x")).is_empty());
}

#[test]
fn older_generation_rules_replicate_delete_markers() {
    let cfg = json(fixture!("v1.json"));
    assert_eq!(cfg.destinations(), vec!["replica".to_string()]);
    assert_eq!(
        summary(&cfg.decide(&marker("images/a.png"))),
        vec![row("replica", "images", Some("STANDARD_IA"))]
    );
    assert_eq!(
        summary(&cfg.decide(&object("videos/a.mp4"))),
        vec![row("replica", "videos", None)]
    );
    assert!(cfg.decide(&object("docs/a")).is_empty());
}

#[test]
fn moto_shaped_xml_keeps_its_fields() {
    let cfg = xml(fixture!("moto.xml"));
    assert_eq!(
        cfg.role.as_deref(),
        Some("arn:aws:iam::123456789012:role/replication")
    );
    assert_eq!(cfg.rules.len(), 1);
    assert_eq!(cfg.rules[0].id.as_deref(), Some("r&d"), "entities decoded");
    assert_eq!(cfg.destinations(), vec!["dest-one".to_string()]);
    assert_eq!(
        summary(&cfg.decide(&object("a/b"))),
        vec![row("dest-one", "r&d", None)]
    );
}

#[test]
fn get_bucket_replication_json_output_is_accepted() {
    let wrapped = format!(
        "{{\"ReplicationConfiguration\": {}}}",
        fixture!("seed.json")
    );
    assert_eq!(json(&wrapped), json(fixture!("seed.json")));
}

fn refusal(cfg: ReplicationConfig) -> String {
    let err = cfg.validate().expect_err("must be refused");
    let line = err.to_string();
    assert!(!line.contains('\n'), "one line: {line}");
    line
}

#[test]
fn invalid_configurations_are_refused_with_one_line_naming_the_rule() {
    let cases: [(&str, &str); 6] = [
        (
            fixture!("invalid/duplicate-priority.json"),
            "replication configuration: rule \"b\": priority 1 already used by rule \"a\"",
        ),
        (
            fixture!("invalid/mixed-generations.json"),
            "replication configuration: rule \"new\" uses Filter but rule \"old\" uses the older \
             rule-level Prefix: all rules must be of one generation",
        ),
        (
            fixture!("invalid/tag-delete-markers.json"),
            "replication configuration: rule \"tagged\": filters on tags and enables \
             DeleteMarkerReplication; S3 refuses that (delete markers have no tags)",
        ),
        (
            fixture!("invalid/missing-destination.json"),
            "replication configuration: rule #2: has no Destination",
        ),
        (
            fixture!("invalid/bad-arn.json"),
            "replication configuration: rule \"plain-name\": Destination.Bucket \"backup-bucket\" \
             is not a bucket ARN (arn:aws:s3:::NAME)",
        ),
        (
            fixture!("invalid/kms-without-key.json"),
            "replication configuration: rule \"kms\": replicates SSE-KMS objects but has no \
             Destination.EncryptionConfiguration.ReplicaKmsKeyID",
        ),
    ];
    for (text, expected) in cases {
        let cfg = ReplicationConfig::from_json(text).expect("parses");
        assert_eq!(refusal(cfg), expected);
    }
}

#[test]
fn duplicate_priority_in_xml_is_refused_even_on_a_disabled_rule() {
    let cfg = ReplicationConfig::from_xml(fixture!("invalid/duplicate-priority.xml").as_bytes())
        .expect("parses");
    assert_eq!(
        refusal(cfg),
        "replication configuration: rule \"b\": priority 7 already used by rule \"a\""
    );
}

fn seed_rule(n: usize) -> Rule {
    let mut cfg = json(fixture!("seed.json"));
    let mut rule = cfg.rules.remove(0);
    rule.id = Some(format!("r{n}"));
    rule.priority = Some(n as i64);
    rule
}

#[test]
fn more_than_a_thousand_rules_are_refused() {
    let mut cfg = ReplicationConfig {
        role: None,
        rules: (0..MAX_RULES).map(seed_rule).collect(),
    };
    cfg.validate().expect("1000 rules are allowed");
    cfg.rules.push(seed_rule(MAX_RULES));
    assert_eq!(
        refusal(cfg),
        "replication configuration: 1001 rules, at most 1000 are allowed"
    );
}

#[test]
fn other_refusals_name_the_rule() {
    let mut cfg = json(fixture!("seed.json"));
    cfg.rules[0].status = "enabled".into();
    assert_eq!(
        refusal(cfg),
        "replication configuration: rule \"seed\": Status is \"enabled\", expected Enabled or \
         Disabled"
    );

    let mut cfg = json(fixture!("seed.json"));
    cfg.rules[0].delete_marker_replication = None;
    assert_eq!(
        refusal(cfg),
        "replication configuration: rule \"seed\": uses Filter but has no DeleteMarkerReplication"
    );

    let mut cfg = json(fixture!("seed.json"));
    cfg.rules.push(seed_rule(2));
    cfg.rules[1].id = Some("seed".into());
    assert_eq!(
        refusal(cfg),
        "replication configuration: rule \"seed\": ID used twice (also rule #1)"
    );

    let mut cfg = json(fixture!("v1.json"));
    cfg.rules[1].prefix = Some("images/thumbs/".into());
    assert_eq!(
        refusal(cfg),
        "replication configuration: rule \"videos\": prefix \"images/thumbs/\" overlaps \
         \"images/\" of rule \"images\""
    );

    let mut cfg = json(fixture!("two-destinations.json"));
    cfg.rules[0].destination.as_mut().unwrap().account = None;
    assert_eq!(
        refusal(cfg),
        "replication configuration: rule \"to-eu\": AccessControlTranslation needs \
         Destination.Account"
    );

    let cfg = ReplicationConfig::from_json(r#"{"Rules": []}"#).unwrap();
    assert_eq!(refusal(cfg), "replication configuration: no rules");
}

#[test]
fn malformed_documents_are_errors_not_panics() {
    for text in [
        "",
        "[]",
        "{\"Rules\": 3}",
        "{\"Rules\": [{\"Priority\": \"x\"}]}",
    ] {
        assert!(
            matches!(ReplicationConfig::from_json(text), Err(RulesError::Json(_))),
            "{text:?}"
        );
    }
    for text in [
        "",
        "<ReplicationConfiguration>",
        "<Other/>",
        "<ReplicationConfiguration><Rule><Priority>x</Priority></Rule></ReplicationConfiguration>",
        "<ReplicationConfiguration><Rule><ID>&bogus;</ID></Rule></ReplicationConfiguration>",
    ] {
        assert!(
            matches!(
                ReplicationConfig::from_xml(text.as_bytes()),
                Err(RulesError::Xml(_))
            ),
            "{text:?}"
        );
    }
}

#[test]
fn bucket_arns() {
    assert_eq!(bucket_from_arn("arn:aws:s3:::my-bucket"), Some("my-bucket"));
    assert_eq!(bucket_from_arn("arn:aws-cn:s3:::b.cn"), Some("b.cn"));
    for bad in [
        "my-bucket",
        "arn:aws:s3:::",
        "arn:aws:s3:::a/b",
        "arn:aws:iam::123:role/x",
        "arn::s3:::b",
    ] {
        assert_eq!(bucket_from_arn(bad), None, "{bad}");
    }
}
