//! Every predicate holds on a model deployment and fails when its one input is made worse; the
//! function drops below the predicate's stage and the pillar follows its weakest function.

use super::predicates::*;
use super::*;

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;

/// A deployment that meets every predicate.
fn model() -> Evidence {
    Evidence {
        policy_version: Some(3),
        policy_versions: 3,
        rules: 10,
        rules_port_scoped: 10,
        rules_posture_gated: 10,
        rules_time_bound: 6,
        rules_tested: 10,
        tests: 4,
        tests_failing: 0,
        auto_quarantine_on_failure: true,
        scan_detection: true,
        risky_lease_ttl: true,
        live_devices: 5,
        device_pairs: 10,
        pairs_reachable: 4,
        grants_active: 0,
        grants_unused: 0,
        allowed_flows: 100,
        allowed_flows_expiring: 60,
        oldest_unused_rule_ms: None,
        accepted_suggestions: 1,
        lease_ttl_max_ms: Some(10 * MIN),
        key_age_max_ms: Some(6 * MIN),
        key_age_p95_ms: Some(5 * MIN),
        rotation_on_trust_change: true,
        overlay_encrypted: true,
        devices_reporting_flows: 5,
        flows_checkable: 100,
        flows_confirmed: 99,
        posture_requirements: 1,
        devices_compliant: 5,
        posture_report_age_max_ms: Some(2 * MIN),
        posture_reports_missing: 0,
        trust_changes: 7,
        enforce_ms_p50: Some(20.0),
        enforce_ms_p99: Some(300.0),
        quarantines_automatic: 2,
        quarantines_manual: 1,
        tokens: 3,
        token_lifetime_max_ms: Some(30 * MIN),
        tokens_reusable: 0,
        disabled_user_live_devices: 0,
        identity_changes: 1,
        identity_revoke_ms_p99: Some(150.0),
        audit_verified: true,
        behaviour_risk_enforced: true,
        anomalies_raised: 4,
        anomalies_labelled: 3,
        anomaly_precision: Some(2.0 / 3.0),
        anomaly_recall: Some(1.0),
    }
}

type Worse = fn(&mut Evidence);

/// (pillar, function, predicate, stage it is needed for, a change that makes it fail).
fn cases() -> Vec<(Pillar, &'static str, &'static str, Stage, Worse)> {
    use Pillar::*;
    use Stage::*;
    vec![
        (
            Identity,
            "authentication",
            "token_lifetime_max",
            Initial,
            |e| e.token_lifetime_max_ms = Some(31 * DAY),
        ),
        (
            Identity,
            "authentication",
            "tokens_reusable",
            Advanced,
            |e| e.tokens_reusable = 1,
        ),
        (
            Identity,
            "authentication",
            "token_lifetime_max",
            Advanced,
            |e| e.token_lifetime_max_ms = Some(2 * DAY),
        ),
        (
            Identity,
            "authentication",
            "token_lifetime_max",
            Optimal,
            |e| e.token_lifetime_max_ms = Some(2 * HOUR),
        ),
        (
            Identity,
            "access_management",
            "lease_ttl_max",
            Initial,
            |e| e.lease_ttl_max_ms = Some(2 * DAY),
        ),
        (
            Identity,
            "access_management",
            "rules_and_grants_time_bound",
            Advanced,
            |e| e.rules_time_bound = 1,
        ),
        (
            Identity,
            "access_management",
            "rules_and_grants_time_bound",
            Optimal,
            |e| e.rules_time_bound = 4,
        ),
        (
            Identity,
            "access_management",
            "allowed_flows_time_bound",
            Optimal,
            |e| e.allowed_flows_expiring = 10,
        ),
        (
            Identity,
            "identity_lifecycle",
            "disabled_user_live_devices",
            Initial,
            |e| e.disabled_user_live_devices = 1,
        ),
        (
            Identity,
            "identity_lifecycle",
            "lease_ttl_max",
            Advanced,
            |e| e.lease_ttl_max_ms = Some(2 * HOUR),
        ),
        (
            Identity,
            "identity_lifecycle",
            "identity_change_to_revocation",
            Optimal,
            |e| e.identity_revoke_ms_p99 = Some(5000.0),
        ),
        (
            Devices,
            "policy_enforcement_compliance",
            "posture_requirements",
            Initial,
            |e| e.posture_requirements = 0,
        ),
        (
            Devices,
            "policy_enforcement_compliance",
            "rules_posture_gated",
            Advanced,
            |e| e.rules_posture_gated = 4,
        ),
        (
            Devices,
            "policy_enforcement_compliance",
            "devices_compliant",
            Advanced,
            |e| e.devices_compliant = 4,
        ),
        (
            Devices,
            "policy_enforcement_compliance",
            "rules_posture_gated",
            Optimal,
            |e| e.rules_posture_gated = 9,
        ),
        (
            Devices,
            "policy_enforcement_compliance",
            "posture_report_age_max",
            Optimal,
            |e| e.posture_report_age_max_ms = Some(HOUR),
        ),
        (
            Devices,
            "policy_enforcement_compliance",
            "posture_reports_missing",
            Optimal,
            |e| e.posture_reports_missing = 1,
        ),
        (
            Devices,
            "resource_access",
            "rules_posture_gated",
            Initial,
            |e| e.rules_posture_gated = 0,
        ),
        (
            Devices,
            "resource_access",
            "auto_quarantine_on_failure",
            Advanced,
            |e| e.auto_quarantine_on_failure = false,
        ),
        (
            Devices,
            "resource_access",
            "non_compliance_to_enforcement",
            Optimal,
            |e| e.enforce_ms_p99 = Some(1500.0),
        ),
        (
            Devices,
            "resource_access",
            "quarantines_automatic",
            Optimal,
            |e| e.quarantines_manual = 3,
        ),
        (Networks, "segmentation", "policy_in_force", Initial, |e| {
            e.policy_version = None
        }),
        (
            Networks,
            "segmentation",
            "rules_port_scoped",
            Advanced,
            |e| e.rules_port_scoped = 7,
        ),
        (
            Networks,
            "segmentation",
            "rules_port_scoped",
            Optimal,
            |e| e.rules_port_scoped = 9,
        ),
        (
            Networks,
            "segmentation",
            "pairs_with_standing_reachability",
            Optimal,
            |e| e.pairs_reachable = 6,
        ),
        (
            Networks,
            "traffic_management",
            "devices_reporting_flows",
            Initial,
            |e| e.devices_reporting_flows = 0,
        ),
        (
            Networks,
            "traffic_management",
            "oldest_unused_rule_age",
            Advanced,
            |e| e.oldest_unused_rule_ms = Some(31 * DAY),
        ),
        (
            Networks,
            "traffic_management",
            "grants_unused",
            Advanced,
            |e| {
                e.grants_active = 1;
                e.grants_unused = 1;
            },
        ),
        (
            Networks,
            "traffic_management",
            "policy_changes_from_flow_evidence",
            Optimal,
            |e| e.accepted_suggestions = 0,
        ),
        (
            Networks,
            "traffic_encryption",
            "overlay_traffic_encrypted",
            Initial,
            |e| e.overlay_encrypted = false,
        ),
        (
            Networks,
            "traffic_encryption",
            "lease_ttl_max",
            Advanced,
            |e| e.lease_ttl_max_ms = Some(2 * DAY),
        ),
        (
            Networks,
            "traffic_encryption",
            "key_age_max",
            Advanced,
            |e| e.key_age_max_ms = Some(2 * DAY),
        ),
        (
            Networks,
            "traffic_encryption",
            "lease_ttl_max",
            Optimal,
            |e| e.lease_ttl_max_ms = Some(HOUR),
        ),
        (
            Networks,
            "traffic_encryption",
            "key_age_p95",
            Optimal,
            |e| e.key_age_p95_ms = Some(HOUR),
        ),
        (
            Networks,
            "traffic_encryption",
            "rotation_on_trust_change",
            Optimal,
            |e| e.rotation_on_trust_change = false,
        ),
        (
            Networks,
            "network_visibility",
            "devices_reporting_flows",
            Initial,
            |e| e.devices_reporting_flows = 0,
        ),
        (
            Networks,
            "network_visibility",
            "devices_reporting_flows",
            Advanced,
            |e| e.devices_reporting_flows = 4,
        ),
        (
            Networks,
            "network_visibility",
            "flows_confirmed_by_both_ends",
            Optimal,
            |e| e.flows_confirmed = 80,
        ),
        (
            VisibilityAnalytics,
            "flow_and_audit_analytics",
            "audit_chain_verified",
            Initial,
            |e| e.audit_verified = false,
        ),
        (
            VisibilityAnalytics,
            "flow_and_audit_analytics",
            "devices_reporting_flows",
            Advanced,
            |e| e.devices_reporting_flows = 4,
        ),
        (
            VisibilityAnalytics,
            "flow_and_audit_analytics",
            "scan_detection",
            Advanced,
            |e| e.scan_detection = false,
        ),
        (
            VisibilityAnalytics,
            "flow_and_audit_analytics",
            "flows_confirmed_by_both_ends",
            Optimal,
            |e| e.flows_checkable = 0,
        ),
        (
            AutomationOrchestration,
            "automated_response",
            "access_expires_automatically",
            Initial,
            |e| e.lease_ttl_max_ms = None,
        ),
        (
            AutomationOrchestration,
            "automated_response",
            "auto_quarantine_on_failure",
            Advanced,
            |e| e.auto_quarantine_on_failure = false,
        ),
        (
            AutomationOrchestration,
            "automated_response",
            "trust_change_to_enforcement",
            Optimal,
            |e| e.enforce_ms_p99 = None,
        ),
        (
            AutomationOrchestration,
            "automated_response",
            "risky_lease_ttl",
            Optimal,
            |e| e.risky_lease_ttl = false,
        ),
        (
            Governance,
            "policy_governance",
            "policy_versions",
            Initial,
            |e| e.policy_versions = 0,
        ),
        (
            Governance,
            "policy_governance",
            "policy_tests_passing",
            Advanced,
            |e| e.tests_failing = 1,
        ),
        (
            Governance,
            "policy_governance",
            "rules_covered_by_a_test",
            Optimal,
            |e| e.rules_tested = 8,
        ),
    ]
}

fn find<'a>(a: &'a Assessment, p: Pillar, f: &str) -> &'a FunctionAssessment {
    a.pillars
        .iter()
        .find(|x| x.pillar == p)
        .and_then(|x| x.functions.iter().find(|y| y.function == f))
        .unwrap_or_else(|| panic!("no function {p}/{f}"))
}

fn below(s: Stage) -> Stage {
    match s {
        Stage::Traditional | Stage::Initial => Stage::Traditional,
        Stage::Advanced => Stage::Initial,
        Stage::Optimal => Stage::Advanced,
    }
}

#[test]
fn the_model_deployment_is_optimal_everywhere() {
    let a = assess(&model());
    for p in &a.pillars {
        assert_eq!(p.stage, Stage::Optimal, "{p:#?}");
        for f in &p.functions {
            assert!(f.next_step.is_none(), "{f:#?}");
            assert!(f.predicates.iter().all(|x| x.pass), "{f:#?}");
        }
    }
    assert_eq!(a.pillars.len(), 6);
}

#[test]
fn every_predicate_passes_and_fails() {
    let a = assess(&model());
    let cases = cases();
    // Every predicate of every function has a case.
    for p in &a.pillars {
        for f in &p.functions {
            for x in &f.predicates {
                assert!(
                    cases.iter().any(|(cp, cf, cn, cs, _)| *cp == p.pillar
                        && *cf == f.function
                        && *cn == x.name
                        && *cs == x.stage),
                    "no failing case for {}/{}/{} ({})",
                    p.pillar,
                    f.function,
                    x.name,
                    x.stage
                );
            }
        }
    }
    for (p, f, name, stage, worse) in cases {
        let mut e = model();
        worse(&mut e);
        let a = assess(&e);
        let func = find(&a, p, f);
        let x = func
            .predicates
            .iter()
            .find(|x| x.name == name && x.stage == stage)
            .unwrap_or_else(|| panic!("no predicate {p}/{f}/{name} at {stage}"));
        assert!(!x.pass, "{p}/{f}/{name} at {stage} still holds: {x:?}");
        assert!(
            func.stage <= below(stage),
            "{p}/{f} is {} with {name} failing at {stage}",
            func.stage
        );
        assert!(
            func.next_step.as_deref().is_some_and(|s| !s.is_empty()),
            "{func:#?}"
        );
        // The pillar takes the weakest function.
        let pillar = a.pillars.iter().find(|x| x.pillar == p).unwrap();
        assert_eq!(pillar.stage, func.stage, "{p}: {pillar:#?}");
        assert_eq!(find(&a, p, &pillar.weakest).stage, func.stage);
    }
}

#[test]
fn a_pillar_takes_its_weakest_function_not_the_average() {
    let mut e = model();
    // Segmentation drops to Initial; the three other network functions stay Optimal.
    e.rules_port_scoped = 1;
    let a = assess(&e);
    let n = a
        .pillars
        .iter()
        .find(|p| p.pillar == Pillar::Networks)
        .unwrap();
    assert_eq!(n.stage, Stage::Initial);
    assert_eq!(n.weakest, "segmentation");
    assert_eq!(
        n.functions
            .iter()
            .filter(|f| f.stage == Stage::Optimal)
            .count(),
        3
    );
    // Unit form of the rule.
    let f = |name: &str, s: Stage| FunctionAssessment {
        function: name.into(),
        stage: s,
        predicates: vec![],
        next_step: None,
    };
    let p = pillar(
        Pillar::Devices,
        vec![
            f("a", Stage::Optimal),
            f("b", Stage::Traditional),
            f("c", Stage::Optimal),
        ],
    );
    assert_eq!((p.stage, p.weakest.as_str()), (Stage::Traditional, "b"));
}

#[test]
fn stages_are_cumulative() {
    // An Optimal predicate holding does not lift a function whose Initial one fails.
    let mut e = model();
    e.posture_requirements = 0;
    let f = find(
        &assess(&e),
        Pillar::Devices,
        "policy_enforcement_compliance",
    )
    .clone();
    assert_eq!(f.stage, Stage::Traditional);
    assert!(f.next_step.unwrap().contains("[posture."));
}

#[test]
fn an_empty_deployment_is_traditional_where_it_counts() {
    let a = assess(&Evidence {
        audit_verified: true,
        rotation_on_trust_change: true,
        overlay_encrypted: true,
        ..Evidence::default()
    });
    for p in [
        Pillar::Devices,
        Pillar::Networks,
        Pillar::Governance,
        Pillar::AutomationOrchestration,
    ] {
        assert_eq!(a.stage(p), Some(Stage::Traditional), "{p}");
    }
    assert!(a.out_of_scope.iter().any(|o| o.pillar == "data"));
    assert!(a
        .out_of_scope
        .iter()
        .any(|o| o.pillar == "applications_workloads"));
}

#[test]
fn the_next_step_names_the_counts() {
    let mut e = model();
    e.rules = 40;
    e.rules_port_scoped = 28;
    e.rules_posture_gated = 40;
    e.rules_tested = 40;
    e.rules_time_bound = 30;
    let f = find(&assess(&e), Pillar::Networks, "segmentation").clone();
    assert_eq!(f.stage, Stage::Initial);
    assert_eq!(
        f.next_step.unwrap(),
        "12 of 40 rules allow whole hosts or wide port ranges: scope them to ports; see `policy suggest`"
    );
}

#[test]
fn changes_list_moved_pillars_and_functions() {
    let before = assess(&model());
    let mut e = model();
    e.scan_detection = false;
    let after = assess(&e);
    assert_eq!(
        changes(&before, &after),
        vec![
            "visibility_analytics: optimal -> initial".to_string(),
            "visibility_analytics / flow_and_audit_analytics: optimal -> initial".to_string(),
        ]
    );
    assert!(changes(&after, &after).is_empty());
}

#[test]
fn percent_and_quantile() {
    assert_eq!(percent(1, 3), Some(33));
    assert_eq!(percent(5, 3), Some(100));
    assert_eq!(percent(0, 0), None);
    assert_eq!(quantile(&mut [], 0.95), None);
    assert_eq!(quantile(&mut [5, 1, 3], 0.5), Some(3));
    assert_eq!(quantile(&mut (1..=100).collect::<Vec<_>>(), 0.95), Some(95));
}

#[test]
fn assessments_round_trip_as_json() {
    let a = assess(&model());
    let s = serde_json::to_string(&a).unwrap();
    assert!(s.contains("\"pillar\":\"visibility_analytics\""));
    assert_eq!(serde_json::from_str::<Assessment>(&s).unwrap(), a);
}
