use super::*;
use crate::config::UpdateMode;
use crate::state::Running;
use skiff_release::Release;

fn text(m: &Metrics, snap: &Snapshot) -> String {
    m.encode(snap, str::to_owned)
}

/// The sample lines (no comments) whose name starts with `name`.
fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(name))
        .collect()
}

fn running(tag: &str, digest: Option<&str>) -> Running {
    Running {
        release: Release::new(
            tag.parse().expect("tag"),
            digest.map(|d| d.parse().expect("digest")),
        ),
        container_id: "c1".into(),
        container_running: true,
    }
}

#[test]
fn exposition_text() {
    let m = Metrics::new();
    let mut snap = Snapshot::new("file:/x".into(), UpdateMode::Follow);
    let empty = text(&m, &snap);
    assert!(!empty.contains("# EOF"), "Prometheus text, not OpenMetrics");
    assert_eq!(
        samples(&empty, "skiff_agent_release_info"),
        Vec::<&str>::new()
    );
    assert_eq!(
        samples(&empty, "skiff_agent_health_state{state=\"no-release\"}"),
        ["skiff_agent_health_state{state=\"no-release\"} 1"]
    );
    assert_eq!(
        samples(&empty, "skiff_agent_health_state").len(),
        6,
        "{empty}"
    );
    // Every known label set is there from the start, at 0.
    for (name, n) in [
        ("skiff_agent_swaps_total{", 10),
        ("skiff_agent_rollbacks_total{", 2),
        ("skiff_agent_app_probe_failures_total{", 2),
        ("skiff_agent_drains_total{", 2),
        ("skiff_agent_source_errors_total{", 6),
        ("skiff_agent_fleet_errors_total{", 5),
        ("skiff_agent_instructions_total{", 2),
    ] {
        let lines = samples(&empty, name);
        assert_eq!(lines.len(), n, "{name}: {lines:?}");
        assert!(lines.iter().all(|l| l.ends_with(" 0")), "{lines:?}");
    }

    let digest = format!("sha256:{}", "ab".repeat(32));
    snap.running = Some(running("v1", Some(&digest)));
    snap.app.ok = true;
    snap.restart_count = 2;
    m.swap(SwapKind::Start, SwapOutcome::Promoted);
    m.swap(SwapKind::Update, SwapOutcome::RolledBack);
    m.swap(SwapKind::Update, SwapOutcome::RolledBack);
    m.rollback(true);
    m.probe(Duration::from_millis(125), None);
    m.probe(Duration::from_millis(500), Some(ProbeFailure::Status));
    m.pulled(Duration::from_millis(700));
    m.healthy_after(Duration::from_secs(3));
    m.drain(DrainReason::Update);
    m.source_error(source_error_kind(&SourceError::Denied {
        what: "p".into(),
        detail: "d".into(),
    }));
    m.source_error(INVALID_VALUE);
    m.fleet_error(FleetErrorKind::LifecycleHook);
    m.instruction(InstructionKind::Pull);
    m.last_poll.set(1_700_000_000.25);
    let t = text(&m, &snap);
    // Every family is described, with its type (an empty family shows nothing at all).
    for (name, kind) in [
        ("skiff_agent_release_info", "gauge"),
        ("skiff_agent_health_state", "gauge"),
        ("skiff_agent_restarts_total", "counter"),
        ("skiff_agent_swaps_total", "counter"),
        ("skiff_agent_rollbacks_total", "counter"),
        ("skiff_agent_app_probe_duration_seconds", "histogram"),
        ("skiff_agent_app_probe_failures_total", "counter"),
        ("skiff_agent_pull_duration_seconds", "histogram"),
        ("skiff_agent_start_to_healthy_seconds", "histogram"),
        ("skiff_agent_drains_total", "counter"),
        ("skiff_agent_source_errors_total", "counter"),
        ("skiff_agent_fleet_errors_total", "counter"),
        ("skiff_agent_instructions_total", "counter"),
        ("skiff_agent_last_poll_success_timestamp_seconds", "gauge"),
    ] {
        assert!(
            t.contains(&format!("\n# TYPE {name} {kind}\n"))
                || t.starts_with(&format!("# TYPE {name} {kind}\n")),
            "{name} {kind} in:\n{t}"
        );
        assert!(t.contains(&format!("# HELP {name} ")), "{name}");
    }
    let table: &[(&str, &[&str])] = &[
        (
            "skiff_agent_release_info",
            &[&format!(
                "skiff_agent_release_info{{tag=\"v1\",digest=\"{digest}\"}} 1"
            )],
        ),
        (
            "skiff_agent_health_state{state=\"healthy\"}",
            &["skiff_agent_health_state{state=\"healthy\"} 1"],
        ),
        (
            "skiff_agent_health_state{state=\"no-release\"}",
            &["skiff_agent_health_state{state=\"no-release\"} 0"],
        ),
        (
            "skiff_agent_restarts_total",
            &["skiff_agent_restarts_total 2"],
        ),
        (
            "skiff_agent_swaps_total{kind=\"start\",outcome=\"promoted\"}",
            &["skiff_agent_swaps_total{kind=\"start\",outcome=\"promoted\"} 1"],
        ),
        (
            "skiff_agent_swaps_total{kind=\"start\",outcome=\"failed\"}",
            &["skiff_agent_swaps_total{kind=\"start\",outcome=\"failed\"} 0"],
        ),
        (
            "skiff_agent_swaps_total{kind=\"update\",outcome=\"rolled_back\"}",
            &["skiff_agent_swaps_total{kind=\"update\",outcome=\"rolled_back\"} 2"],
        ),
        (
            "skiff_agent_rollbacks_total",
            &[
                "skiff_agent_rollbacks_total{outcome=\"succeeded\"} 1",
                "skiff_agent_rollbacks_total{outcome=\"failed\"} 0",
            ],
        ),
        (
            "skiff_agent_app_probe_duration_seconds_bucket{le=\"0.1\"}",
            &["skiff_agent_app_probe_duration_seconds_bucket{le=\"0.1\"} 0"],
        ),
        (
            "skiff_agent_app_probe_duration_seconds_bucket{le=\"0.25\"}",
            &["skiff_agent_app_probe_duration_seconds_bucket{le=\"0.25\"} 1"],
        ),
        (
            "skiff_agent_app_probe_duration_seconds_bucket{le=\"+Inf\"}",
            &["skiff_agent_app_probe_duration_seconds_bucket{le=\"+Inf\"} 2"],
        ),
        (
            "skiff_agent_app_probe_duration_seconds_sum",
            &["skiff_agent_app_probe_duration_seconds_sum 0.625"],
        ),
        (
            "skiff_agent_app_probe_failures_total",
            &[
                "skiff_agent_app_probe_failures_total{reason=\"status\"} 1",
                "skiff_agent_app_probe_failures_total{reason=\"no_answer\"} 0",
            ],
        ),
        (
            "skiff_agent_pull_duration_seconds_count",
            &["skiff_agent_pull_duration_seconds_count 1"],
        ),
        (
            "skiff_agent_start_to_healthy_seconds_bucket{le=\"2.5\"}",
            &["skiff_agent_start_to_healthy_seconds_bucket{le=\"2.5\"} 0"],
        ),
        (
            "skiff_agent_start_to_healthy_seconds_bucket{le=\"5\"}",
            &["skiff_agent_start_to_healthy_seconds_bucket{le=\"5\"} 1"],
        ),
        (
            "skiff_agent_drains_total",
            &[
                "skiff_agent_drains_total{reason=\"update\"} 1",
                "skiff_agent_drains_total{reason=\"termination\"} 0",
            ],
        ),
        (
            "skiff_agent_source_errors_total{kind=\"denied\"}",
            &["skiff_agent_source_errors_total{kind=\"denied\"} 1"],
        ),
        (
            "skiff_agent_source_errors_total{kind=\"invalid_value\"}",
            &["skiff_agent_source_errors_total{kind=\"invalid_value\"} 1"],
        ),
        (
            "skiff_agent_fleet_errors_total{kind=\"lifecycle_hook\"}",
            &["skiff_agent_fleet_errors_total{kind=\"lifecycle_hook\"} 1"],
        ),
        (
            "skiff_agent_fleet_errors_total{kind=\"tag\"}",
            &["skiff_agent_fleet_errors_total{kind=\"tag\"} 0"],
        ),
        (
            "skiff_agent_instructions_total",
            &[
                "skiff_agent_instructions_total{kind=\"pull\"} 1",
                "skiff_agent_instructions_total{kind=\"target\"} 0",
            ],
        ),
        (
            "skiff_agent_last_poll_success_timestamp_seconds",
            &["skiff_agent_last_poll_success_timestamp_seconds 1700000000.25"],
        ),
    ];
    for (prefix, want) in table {
        // The label sets of one family come in no fixed order.
        let (mut got, mut want) = (samples(&t, prefix), want.to_vec());
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want, "{prefix} in:\n{t}");
    }

    // A new release replaces the info series (never two), and a release without a digest
    // has an empty one; draining shows as the state.
    snap.running = Some(running("v2", None));
    snap.draining = true;
    let t = text(&m, &snap);
    assert_eq!(
        samples(&t, "skiff_agent_release_info"),
        ["skiff_agent_release_info{tag=\"v2\",digest=\"\"} 1"]
    );
    assert_eq!(
        samples(&t, "skiff_agent_health_state{state=\"draining\"}"),
        ["skiff_agent_health_state{state=\"draining\"} 1"]
    );
    assert_eq!(
        samples(&t, "skiff_agent_health_state{state=\"healthy\"}"),
        ["skiff_agent_health_state{state=\"healthy\"} 0"]
    );
    snap.running = None;
    let t = text(&m, &snap);
    assert_eq!(samples(&t, "skiff_agent_release_info"), Vec::<&str>::new());
}

#[test]
fn health_states_are_spelled_as_healthz_spells_them() {
    for (status, label) in STATES {
        assert_eq!(
            serde_json::to_value(status).expect("json"),
            serde_json::json!(label)
        );
    }
}

#[test]
fn a_label_value_is_escaped() {
    // Tags are validated by the contract crate, but the encoder must never emit a broken
    // line whatever it gets.
    let m = Metrics::new();
    m.release
        .get_or_create(&ReleaseLabels {
            tag: "a\"b\\c\nd".into(),
            digest: String::new(),
        })
        .set(0);
    let t = text(&m, &Snapshot::new("x".into(), UpdateMode::Boot));
    assert!(
        t.contains(r#"skiff_agent_release_info{tag="a\"b\\c\nd",digest=""} 0"#),
        "{t}"
    );
}

#[test]
fn the_buffer_is_kept_between_scrapes() {
    let m = Metrics::new();
    let snap = Snapshot::new("x".into(), UpdateMode::Boot);
    let first = m.encode(&snap, |t| t.as_ptr());
    let second = m.encode(&snap, |t| t.as_ptr());
    assert_eq!(first, second, "the same allocation serves every scrape");
}
