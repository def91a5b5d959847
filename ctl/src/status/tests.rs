use super::*;

fn inst(id: &str, release: Option<&str>) -> InstanceView {
    InstanceView {
        id: id.into(),
        zone: None,
        lifecycle: None,
        health: None,
        release: release.map(Into::into),
        target: None,
        failed: None,
        target_health: None,
        target_reason: None,
    }
}

#[test]
fn drift_table() {
    let v1: Tag = "v1".parse().expect("tag");
    let table: Vec<(Option<&Tag>, Vec<InstanceView>, Vec<&str>)> = vec![
        (
            Some(&v1),
            vec![inst("a", Some("v1")), inst("b", Some("v1"))],
            vec![],
        ),
        (
            Some(&v1),
            vec![inst("a", Some("v0")), inst("b", Some("v1"))],
            vec!["a"],
        ),
        (Some(&v1), vec![inst("a", None)], vec!["a"]),
        (None, vec![inst("a", Some("v0"))], vec![]),
        (Some(&v1), vec![], vec![]),
    ];
    for (desired, instances, want) in table {
        assert_eq!(
            drift(desired, &instances),
            want,
            "{desired:?} {instances:?}"
        );
    }
}

#[test]
fn merge_target_health_table() {
    let th = |id: &str, state: &str, reason: Option<&str>| TargetHealth {
        id: id.into(),
        state: state.into(),
        reason: reason.map(Into::into),
    };
    let mut views = vec![inst("i-a", None), inst("i-b", None), inst("i-c", None)];
    merge_target_health(
        &mut views,
        &[
            th("i-a", "healthy", None),
            th("i-b", "unhealthy", Some("Target.FailedHealthChecks")),
            th("i-other", "healthy", None),
        ],
    );
    let got: Vec<(Option<&str>, Option<&str>)> = views
        .iter()
        .map(|v| (v.target_health.as_deref(), v.target_reason.as_deref()))
        .collect();
    assert_eq!(
        got,
        vec![
            (Some("healthy"), None),
            (Some("unhealthy"), Some("Target.FailedHealthChecks")),
            (Some("unused"), Some(NOT_REGISTERED)),
        ]
    );
}

fn report(instances: Vec<InstanceView>, err: Option<TargetHealthError>) -> Report {
    Report {
        deployment: Deployment {
            parameter: "/p".into(),
            asg: "g".into(),
            image: "r/app".into(),
            target_group: Some("arn:tg".into()),
            alarms: vec!["a-5xx".into()],
            strategy: None,
            swap: None,
            trusted_keys: None,
        },
        release: Some("v1".into()),
        desired_tag: Some("v1".into()),
        parameter_version: Some(3),
        refresh: None,
        refresh_error: None,
        lock_name: "/p-lock".into(),
        lock: None,
        lock_error: None,
        drift: drift(Some(&"v1".parse().expect("tag")), &instances),
        instances,
        target_health_note: err.as_ref().map(ToString::to_string),
        target_health_error: err,
        rollout: None,
        processes: Processes::default(),
        signature: None,
    }
}

#[test]
fn render_table() {
    let mut healthy = inst("i-a", Some("v1"));
    healthy.target_health = Some("healthy".into());
    let mut sick = inst("i-b", Some("v0"));
    sick.target_health = Some("unhealthy".into());
    sick.target_reason = Some("Target.Timeout".into());
    let table: Vec<(&str, Report, Vec<&str>, Vec<&str>)> = vec![
        (
            "target health beside the release",
            report(vec![healthy.clone(), sick.clone()], None),
            vec![
                "TARGET",
                "healthy",
                "unhealthy (Target.Timeout)",
                "v0                -  <- drift",
                "alarms     a-5xx",
                "targets    arn:tg",
            ],
            vec!["note:"],
        ),
        (
            "denied: releases shown, a note, no failure",
            report(
                vec![inst("i-a", Some("v1"))],
                Some(TargetHealthError::Denied("AccessDenied: no".into())),
            ),
            vec![
                "i-a",
                "?",
                "v1",
                "note: target health unknown: elasticloadbalancing:DescribeTargetHealth was denied",
            ],
            vec!["drift"],
        ),
        (
            "the signer of the running release",
            Report {
                signature: Some(crate::trust::Signer::Signed {
                    key_id: "SHA256:0123456789abcdef".into(),
                }),
                ..report(vec![healthy.clone()], None)
            },
            vec!["signature  signed by SHA256:0123456789abcdef"],
            vec!["unknown"],
        ),
        (
            "the registry cannot say: status still shows the rest",
            Report {
                signature: Some(crate::trust::Signer::Unknown {
                    why: "cannot reach the registry".into(),
                }),
                ..report(vec![healthy.clone()], None)
            },
            vec!["signature  unknown: cannot reach the registry", "i-a"],
            vec!["signed by"],
        ),
        (
            "no keys named: no signature line",
            report(vec![healthy.clone()], None),
            vec!["release    v1"],
            vec!["signature "],
        ),
    ];
    for (name, r, has, lacks) in table {
        let text = render(&r);
        for needle in has {
            assert!(text.contains(needle), "{name}: no {needle:?} in\n{text}");
        }
        for needle in lacks {
            assert!(!text.contains(needle), "{name}: {needle:?} in\n{text}");
        }
    }
}

#[test]
fn rollout_table() {
    let v2: Release = "v2".parse().map(|t| Release::new(t, None)).expect("tag");
    let told = |id: &str, release: &str, target: Option<&str>, failed: Option<&str>| {
        let mut i = inst(id, Some(release));
        i.target = target.map(Into::into);
        i.failed = failed.map(Into::into);
        i
    };
    // (name, instances, (on, of, pending, failed, elsewhere) or no rollout line)
    type Want<'a> = Option<(usize, usize, Vec<&'a str>, Vec<&'a str>, Vec<&'a str>)>;
    let table: Vec<(&str, Vec<InstanceView>, Want<'_>)> = vec![
        (
            "no skiff:target anywhere: refresh, no rollout line",
            vec![told("a", "v1", None, None)],
            None,
        ),
        (
            "half way",
            vec![
                told("a", "v2", Some("v2"), None),
                told("b", "v1", Some("v2"), None),
                told("c", "v1", None, None),
            ],
            Some((1, 3, vec!["b"], vec![], vec![])),
        ),
        (
            "failed on one, reverted (told v1) on another",
            vec![
                told("a", "v1", Some("v2"), Some("v2")),
                told("b", "v1", Some("v1"), None),
            ],
            Some((0, 2, vec![], vec!["a"], vec!["b"])),
        ),
    ];
    for (name, instances, want) in table {
        let got = rollout(Some(&v2), &instances);
        let got = got.map(|r| (r.on, r.of, r.pending, r.failed, r.elsewhere));
        let want = want.map(|(on, of, p, f, e)| {
            let v = |x: Vec<&str>| x.into_iter().map(String::from).collect::<Vec<_>>();
            (on, of, v(p), v(f), v(e))
        });
        assert_eq!(got, want, "{name}");
    }
    assert_eq!(rollout(None, &[told("a", "v1", Some("v1"), None)]), None);

    let instances = vec![
        told("i-a", "v2", Some("v2"), None),
        told("i-b", "v1", Some("v2"), Some("v2")),
    ];
    let mut r = report(instances.clone(), None);
    r.rollout = rollout(Some(&v2), &instances);
    r.processes = Processes {
        suspended: vec!["HealthCheck".into(), "AZRebalance".into()],
        held_by_ctl: vec!["HealthCheck".into()],
    };
    let text = render(&r);
    for needle in [
        "suspended  HealthCheck AZRebalance (held by an in-place rollout: HealthCheck;",
        "rollout    1 of 2 instances run v2 (in place); FAILED: i-b",
        "SKIFF:TARGET",
        "v2 (FAILED)",
    ] {
        assert!(text.contains(needle), "no {needle:?} in\n{text}");
    }
}
