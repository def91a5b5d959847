//! Over 600 lines: the in-place decisions' tables (plans, verdicts, tags, retagging), one per
//! decision of `inplace.rs`, which they sit beside.

use super::*;

const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
const D3: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";

fn rel(v: &str) -> Release {
    instance_tags::decode(v).expect(v)
}

fn host(id: &str, tags: &[(&str, &str)]) -> Host {
    let mut h = Host {
        id: id.into(),
        ..Host::default()
    };
    for (k, v) in tags {
        h.set(k, v);
    }
    h
}

fn ids(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn healthy(v: &[(&str, &str)]) -> Health {
    Some(
        v.iter()
            .map(|(id, s)| ((*id).to_owned(), (*s).to_owned()))
            .collect(),
    )
}

#[test]
fn strategy_table() {
    type Row<'a> = (Option<Strategy>, Option<&'a str>, Result<Strategy, &'a str>);
    let table: Vec<Row<'_>> = vec![
        (None, None, Ok(Strategy::Refresh)),
        (None, Some("in-place"), Ok(Strategy::InPlace)),
        (None, Some("refresh"), Ok(Strategy::Refresh)),
        (
            Some(Strategy::Refresh),
            Some("in-place"),
            Ok(Strategy::Refresh),
        ),
        (Some(Strategy::InPlace), None, Ok(Strategy::InPlace)),
        (
            None,
            Some("rolling"),
            Err("pass --strategy refresh|in-place"),
        ),
    ];
    for (flag, output, want) in table {
        match (choose_strategy(flag, output), want) {
            (Ok(got), Ok(w)) => assert_eq!(got, w, "{flag:?} {output:?}"),
            (Err(e), Err(needle)) => assert!(e.to_string().contains(needle), "{e}"),
            (got, want) => panic!("{flag:?} {output:?}: got {got:?}, want {want:?}"),
        }
    }
    assert!("inplace".parse::<Strategy>().is_err());
    assert_eq!(Strategy::InPlace.to_string(), "in-place");
}

#[test]
fn batch_flag_table() {
    let ok = [
        ("1", BatchSize::Count(1)),
        ("3", BatchSize::Count(3)),
        ("25%", BatchSize::Percent(25)),
        ("100%", BatchSize::Percent(100)),
        (" 1% ", BatchSize::Percent(1)),
    ];
    for (s, want) in ok {
        assert_eq!(s.parse::<BatchSize>(), Ok(want), "{s}");
    }
    for bad in ["0", "0%", "101%", "-1", "x", "", "%", "2.5", "25 %%", "1e3"] {
        let e = bad.parse::<BatchSize>().expect_err(bad);
        assert!(
            e.to_string().contains("a number of instances (e.g. 2)"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn batch_len_table() {
    let table: Vec<(Option<BatchSize>, usize, usize)> = vec![
        // default: one at a time up to 4, then 25 % rounded up
        (None, 0, 1),
        (None, 1, 1),
        (None, 3, 1),
        (None, 4, 1),
        (None, 5, 2),
        (None, 6, 2),
        (None, 8, 2),
        (None, 9, 3),
        (None, 100, 25),
        (Some(BatchSize::Count(2)), 3, 2),
        (Some(BatchSize::Count(10)), 3, 3),
        (Some(BatchSize::Percent(50)), 3, 2),
        (Some(BatchSize::Percent(1)), 3, 1),
        (Some(BatchSize::Percent(100)), 6, 6),
        (Some(BatchSize::Percent(34)), 6, 3),
    ];
    for (size, group, want) in table {
        assert_eq!(batch_len(size, group), want, "{size:?} of {group}");
    }
}

#[test]
fn plan_table() {
    let t = rel("v2");
    // name, hosts, --batch, already on it, batches
    type Row<'a> = (
        &'a str,
        Vec<Host>,
        Option<BatchSize>,
        Vec<&'a str>,
        Vec<Vec<&'a str>>,
    );
    let table: Vec<Row<'_>> = vec![
        (
            "fresh: one per batch",
            vec![
                host("a", &[("skiff:release", "v1")]),
                host("b", &[("skiff:release", "v1")]),
                host("c", &[("skiff:release", "v1")]),
            ],
            None,
            vec![],
            vec![vec!["a"], vec!["b"], vec!["c"]],
        ),
        (
            "re-run after a partial rollout: the ones on T are skipped",
            vec![
                host("a", &[("skiff:release", "v2"), ("skiff:target", "v2")]),
                host("b", &[("skiff:release", "v1"), ("skiff:target", "v2")]),
                host("c", &[("skiff:release", "v1")]),
            ],
            None,
            vec!["a"],
            vec![vec!["b"], vec!["c"]],
        ),
        (
            "booted from the parameter during the rollout: runs T without a target, skipped",
            vec![
                host("a", &[("skiff:release", "v2")]),
                host("b", &[("skiff:release", "v1")]),
            ],
            Some(BatchSize::Count(2)),
            vec!["a"],
            vec![vec!["b"]],
        ),
        (
            "runs T's tag but is told another release: switched again",
            vec![host(
                "a",
                &[("skiff:release", "v2"), ("skiff:target", "v1")],
            )],
            None,
            vec![],
            vec![vec!["a"]],
        ),
        (
            "nothing reported yet: switched",
            vec![host("a", &[]), host("b", &[])],
            Some(BatchSize::Percent(100)),
            vec![],
            vec![vec!["a", "b"]],
        ),
        ("empty group", vec![], None, vec![], vec![]),
    ];
    for (name, hosts, batch, on, batches) in table {
        let p = plan(&hosts, &t, batch, false);
        assert_eq!(p.on_target, ids(&on), "{name}");
        let want: Vec<Vec<String>> = batches.iter().map(|b| ids(b)).collect();
        assert_eq!(p.batches, want, "{name}");
    }
}

#[test]
fn names_compares_tag_and_digest() {
    let t = rel(&format!("v2@{D2}"));
    assert!(names(Some(&format!("v2@{D2}")), &t));
    assert!(names(Some(&format!(" v2@{D2} ")), &t));
    assert!(!names(Some("v2"), &t), "no digest is not the same release");
    assert!(!names(Some(&format!("v2@{D3}")), &t), "other digest");
    assert!(!names(Some("v3"), &rel("v2")));
    assert!(!names(Some("{bad"), &t));
    assert!(!names(None, &t));
}

#[test]
fn a_tag_that_names_another_digest_now_is_refused_in_place() {
    let (v2d2, v2d3, v2, v1d3) = (
        rel(&format!("v2@{D2}")),
        rel(&format!("v2@{D3}")),
        rel("v2"),
        rel(&format!("v1@{D3}")),
    );
    let targeted = |v: &str| vec![host("a", &[("skiff:target", v)])];
    // new, previous, hosts => refused
    let table: Vec<(&Release, Option<&Release>, Vec<Host>, bool)> = vec![
        (&v2d3, Some(&v2d2), vec![], true),
        (&v2d3, None, targeted(&format!("v2@{D2}")), true),
        (&v2d3, Some(&v1d3), targeted(&format!("v1@{D3}")), false),
        (&v2d2, Some(&v2d2), targeted(&format!("v2@{D2}")), false),
        // unpinned on either side: nothing to tell apart
        (&v2, Some(&v2d2), vec![], false),
        (&v2d3, Some(&v2), targeted("v2"), false),
        (&v2d3, None, targeted("not a release!"), false),
    ];
    for (new, previous, hosts, refused) in table {
        let got = check_retagged(new, previous, &hosts);
        assert_eq!(
            got.is_err(),
            refused,
            "{new} over {previous:?} {hosts:?}: {got:?}"
        );
    }
}

#[test]
fn failures_from_an_earlier_run_are_withdrawn_before_the_pull() {
    let t = rel(&format!("v2@{D2}"));
    let tv = format!("v2@{D2}");
    let hosts = vec![
        host("a", &[("skiff:failed", &tv)]),
        host("b", &[("skiff:failed", "v1")]),
        host("c", &[("skiff:failed", "")]),
        host("d", &[("skiff:failed", &format!("v2@{D3}"))]),
        host("e", &[]),
    ];
    let all = ids(&["a", "b", "c", "d", "e", "gone"]);
    assert_eq!(
        failed_before(&hosts, &all, &t),
        ["a"],
        "only a failure of this release"
    );
    assert_eq!(
        failed_before(&hosts, &ids(&["b", "e"]), &t),
        Vec::<String>::new()
    );
    assert_eq!(
        withdrawn_verdict(&hosts, &all, &t),
        Verdict::Pending(vec![("a".into(), format!("still reports {t} failed"))])
    );
    // The agent withdrew it (empty value) or the instance left: done.
    let withdrawn = vec![host("a", &[("skiff:failed", "")])];
    assert_eq!(withdrawn_verdict(&withdrawn, &all, &t), Verdict::Done);
    assert_eq!(withdrawn_verdict(&[], &all, &t), Verdict::Done);
}

#[test]
fn pull_verdict_table() {
    let t = rel(&format!("v2@{D2}"));
    let tv = format!("v2@{D2}");
    let table: Vec<(&str, Vec<Host>, Vec<&str>, Verdict)> = vec![
        (
            "all pulled",
            vec![
                host("a", &[("skiff:pulled", &tv)]),
                host("b", &[("skiff:pulled", &tv)]),
            ],
            vec!["a", "b"],
            Verdict::Done,
        ),
        (
            "one still pulling (pulled an older release)",
            vec![
                host("a", &[("skiff:pulled", &tv)]),
                host("b", &[("skiff:pulled", "v1")]),
            ],
            vec!["a", "b"],
            Verdict::Pending(vec![("b".into(), "pulled v1".into())]),
        ),
        (
            "one failed: the rollout stops before switching",
            vec![
                host("a", &[("skiff:pulled", &tv)]),
                host("b", &[("skiff:failed", &tv)]),
            ],
            vec!["a", "b"],
            Verdict::Failed("b".into(), format!("its agent could not pull {t}")),
        ),
        (
            "an old failure of another release does not count",
            vec![host("a", &[("skiff:failed", "v1"), ("skiff:pulled", &tv)])],
            vec!["a"],
            Verdict::Done,
        ),
        (
            "an instance that left the group is not waited for",
            vec![host("a", &[("skiff:pulled", &tv)])],
            vec!["a", "gone"],
            Verdict::Done,
        ),
    ];
    for (name, hosts, want_ids, want) in table {
        assert_eq!(pull_verdict(&hosts, &ids(&want_ids), &t), want, "{name}");
    }
}

#[test]
fn batch_verdict_table() {
    let t = rel("v2");
    let table: Vec<(&str, Vec<Host>, Health, Verdict)> = vec![
        (
            "runs T and healthy",
            vec![host("a", &[("skiff:release", "v2")])],
            healthy(&[("a", "healthy")]),
            Verdict::Done,
        ),
        (
            "runs T, the load balancer still checks",
            vec![host("a", &[("skiff:release", "v2")])],
            healthy(&[("a", "initial")]),
            Verdict::Pending(vec![("a".into(), "target initial".into())]),
        ),
        (
            "healthy but still on V (draining soon)",
            vec![host("a", &[("skiff:release", "v1")])],
            healthy(&[("a", "healthy")]),
            Verdict::Pending(vec![("a".into(), "runs v1".into())]),
        ),
        (
            "not registered with the target group",
            vec![host("a", &[("skiff:release", "v2")])],
            healthy(&[]),
            Verdict::Pending(vec![("a".into(), "target not registered".into())]),
        ),
        (
            "no target group: the agent's word",
            vec![host("a", &[("skiff:release", "v2")])],
            None,
            Verdict::Done,
        ),
        (
            "the agent reports T failed",
            vec![host(
                "a",
                &[("skiff:release", "v1"), ("skiff:failed", "v2")],
            )],
            healthy(&[("a", "healthy")]),
            Verdict::Failed(
                "a".into(),
                "v2 failed its health gate there and the agent rolled it back".into(),
            ),
        ),
        (
            "the batch's instance left the group (e.g. replaced): proves nothing",
            vec![host("other", &[("skiff:release", "v2")])],
            healthy(&[("other", "healthy")]),
            Verdict::Failed(
                "a".into(),
                "every instance of the batch left the group before it ran v2 healthy: nothing shows it works".into(),
            ),
        ),
    ];
    for (name, hosts, health, want) in table {
        assert_eq!(
            batch_verdict(&hosts, &health, &ids(&["a"]), &t, &DRAIN),
            want,
            "{name}"
        );
    }
    // One of two left: the other decides.
    let hosts = vec![host("b", &[("skiff:release", "v2")])];
    assert_eq!(
        batch_verdict(
            &hosts,
            &healthy(&[("b", "healthy")]),
            &ids(&["a", "b"]),
            &t,
            &DRAIN
        ),
        Verdict::Done
    );
}

const DRAIN: BatchWatch<'static> = BatchWatch {
    swap: SwapMode::Drain,
    earlier: &[],
    before: &None,
};

#[test]
fn handover_batch_verdict_table() {
    let t = rel("v2");
    let was = healthy(&[("a", "healthy"), ("e", "healthy")]);
    let a_was_not = healthy(&[("a", "unhealthy"), ("e", "healthy")]);
    let earlier = ids(&["e"]);
    let unknown: Health = Some(Default::default());
    let none: Health = None;
    let on = |id: &str| host(id, &[("skiff:release", "v2")]);
    // name, swap, LB before the switch, hosts now, LB now, verdict
    type Row<'a> = (&'a str, SwapMode, &'a Health, Vec<Host>, Health, Verdict);
    let table: Vec<Row<'_>> = vec![
        (
            "handover: reports T, still healthy: done at once",
            SwapMode::Handover,
            &was,
            vec![on("a"), on("e")],
            was.clone(),
            Verdict::Done,
        ),
        (
            "handover: still on V, still healthy: waits for the agent only",
            SwapMode::Handover,
            &was,
            vec![host("a", &[("skiff:release", "v1")]), on("e")],
            was.clone(),
            Verdict::Pending(vec![("a".into(), "runs v1".into())]),
        ),
        (
            "handover: healthy before, unhealthy after the report: failed, not waited for",
            SwapMode::Handover,
            &was,
            vec![on("a"), on("e")],
            healthy(&[("a", "unhealthy"), ("e", "healthy")]),
            Verdict::Failed(
                "a".into(),
                "the load balancer calls it unhealthy during a handover (it called it healthy before the switch), which a handover never does; if its agent swaps by drain (an instance launched before the stack's SwapMode changed), replace the instances first (--strategy refresh)".into(),
            ),
        ),
        (
            "handover: a drain-swapping agent takes it out before it reports: failed at once",
            SwapMode::Handover,
            &was,
            vec![host("a", &[("skiff:release", "v1")]), on("e")],
            healthy(&[("a", "draining"), ("e", "healthy")]),
            Verdict::Failed("a".into(), String::new()),
        ),
        (
            "handover: unhealthy before the switch: waited for as with drain",
            SwapMode::Handover,
            &a_was_not,
            vec![on("a"), on("e")],
            a_was_not.clone(),
            Verdict::Pending(vec![("a".into(), "target unhealthy".into())]),
        ),
        (
            "handover: the view before unknown (empty): waited for",
            SwapMode::Handover,
            &unknown,
            vec![on("a"), on("e")],
            healthy(&[("a", "initial"), ("e", "healthy")]),
            Verdict::Pending(vec![("a".into(), "target initial".into())]),
        ),
        (
            "handover: no target group: the agent's word",
            SwapMode::Handover,
            &none,
            vec![on("a"), on("e")],
            None,
            Verdict::Done,
        ),
        (
            "handover: the gate failed (the agent never flipped): its failure, not the LB's",
            SwapMode::Handover,
            &was,
            vec![host("a", &[("skiff:release", "v1"), ("skiff:failed", "v2")]), on("e")],
            was.clone(),
            Verdict::Failed(
                "a".into(),
                "v2 failed its health gate there and the agent rolled it back".into(),
            ),
        ),
        (
            "handover: an earlier batch flipped back within its hold and answered failed",
            SwapMode::Handover,
            &was,
            vec![on("a"), host("e", &[("skiff:release", "v1"), ("skiff:failed", "v2")])],
            was.clone(),
            Verdict::Failed(
                "e".into(),
                "its agent reports v2 failed after its batch was done (it went back to the release before)".into(),
            ),
        ),
        (
            "drain: an earlier batch answering failed fails it too",
            SwapMode::Drain,
            &none,
            vec![on("a"), host("e", &[("skiff:failed", "v2")])],
            was.clone(),
            Verdict::Failed("e".into(), String::new()),
        ),
        (
            "drain: taken out after the report: waited for (detection window)",
            SwapMode::Drain,
            &none,
            vec![on("a"), on("e")],
            healthy(&[("a", "unhealthy"), ("e", "healthy")]),
            Verdict::Pending(vec![("a".into(), "target unhealthy".into())]),
        ),
    ];
    for (name, swap, before, hosts, health, want) in table {
        let watch = BatchWatch {
            swap,
            earlier: &earlier,
            before,
        };
        let got = batch_verdict(&hosts, &health, &ids(&["a"]), &t, &watch);
        match (&got, &want) {
            // An empty reason: only who failed is checked.
            (Verdict::Failed(id, _), Verdict::Failed(w, why)) if why.is_empty() => {
                assert_eq!(id, w, "{name}")
            }
            _ => assert_eq!(got, want, "{name}"),
        }
    }
}

#[test]
fn swap_mode_from_the_stack_output() {
    let table: Vec<(Option<&str>, Result<SwapMode, &str>)> = vec![
        (None, Ok(SwapMode::Drain)),
        (Some("drain"), Ok(SwapMode::Drain)),
        (Some("handover"), Ok(SwapMode::Handover)),
        (Some(" handover "), Ok(SwapMode::Handover)),
        (Some("Handover"), Err("upgrade ctl")),
        (Some("blue-green"), Err("unknown swap mode \"blue-green\"")),
    ];
    for (output, want) in table {
        match (SwapMode::from_output(output), want) {
            (Ok(got), Ok(w)) => assert_eq!(got, w, "{output:?}"),
            (Err(e), Err(needle)) => assert!(e.to_string().contains(needle), "{e}"),
            (got, want) => panic!("{output:?}: got {got:?}, want {want:?}"),
        }
    }
    assert_eq!(SwapMode::Handover.to_string(), "handover");
}

#[test]
fn batches_table() {
    let six = ids(&["a", "b", "c", "d", "e", "f"]);
    // name, todo, --batch, group, canary (handover), batches
    type Row<'a> = (
        &'a str,
        usize,
        Option<BatchSize>,
        usize,
        bool,
        Vec<Vec<&'a str>>,
    );
    let table: Vec<Row<'_>> = vec![
        (
            "drain, 6: 25 % rounded up, as before",
            6,
            None,
            6,
            false,
            vec![vec!["a", "b"], vec!["c", "d"], vec!["e", "f"]],
        ),
        (
            "handover, 6: a canary, then the rule",
            6,
            None,
            6,
            true,
            vec![vec!["a"], vec!["b", "c"], vec!["d", "e"], vec!["f"]],
        ),
        (
            "handover, 3: one at a time anyway",
            3,
            None,
            3,
            true,
            vec![vec!["a"], vec!["b"], vec!["c"]],
        ),
        (
            "handover, --batch 100%: the canary, then all the rest",
            6,
            Some(BatchSize::Percent(100)),
            6,
            true,
            vec![vec!["a"], vec!["b", "c", "d", "e", "f"]],
        ),
        (
            "handover, --batch 2 of 3",
            3,
            Some(BatchSize::Count(2)),
            3,
            true,
            vec![vec!["a"], vec!["b", "c"]],
        ),
        (
            "drain, --batch 2 of 3",
            3,
            Some(BatchSize::Count(2)),
            3,
            false,
            vec![vec!["a", "b"], vec!["c"]],
        ),
        ("handover, 1 instance", 1, None, 1, true, vec![vec!["a"]]),
        ("handover, nothing to do", 0, None, 4, true, vec![]),
        (
            "handover, 2 left of a group of 8 (re-run): canary then 2",
            3,
            None,
            8,
            true,
            vec![vec!["a"], vec!["b", "c"]],
        ),
    ];
    for (name, n, size, group, canary, want) in table {
        let want: Vec<Vec<String>> = want.iter().map(|b| ids(b)).collect();
        assert_eq!(batches(&six[..n], size, group, canary), want, "{name}");
    }
    // The plan takes the canary from the instances to switch, not from those already on T.
    let t = rel("v2");
    let hosts = vec![
        host("a", &[("skiff:release", "v2")]),
        host("b", &[("skiff:release", "v1")]),
        host("c", &[("skiff:release", "v1")]),
        host("d", &[("skiff:release", "v1")]),
    ];
    let p = plan(&hosts, &t, Some(BatchSize::Count(3)), true);
    assert_eq!(p.on_target, ids(&["a"]));
    assert_eq!(p.batches, vec![ids(&["b"]), ids(&["c", "d"])]);
}

#[test]
fn drain_refuses_a_batch_of_every_healthy_target() {
    let group = |n: &[&str]| -> Vec<Host> { n.iter().map(|id| host(id, &[])).collect() };
    let b = |v: &[&[&str]]| -> Vec<Vec<String>> { v.iter().map(|x| ids(x)).collect() };
    // name, batches, group, LB view, refused (batch number)
    type Row<'a> = (&'a str, Vec<Vec<String>>, Vec<Host>, Health, Option<usize>);
    let table: Vec<Row<'_>> = vec![
        (
            "a 1-instance group",
            b(&[&["a"]]),
            group(&["a"]),
            healthy(&[("a", "healthy")]),
            Some(1),
        ),
        (
            "--batch 100% of 3",
            b(&[&["a", "b", "c"]]),
            group(&["a", "b", "c"]),
            healthy(&[("a", "healthy"), ("b", "healthy"), ("c", "healthy")]),
            Some(1),
        ),
        (
            "one at a time of 3",
            b(&[&["a"], &["b"], &["c"]]),
            group(&["a", "b", "c"]),
            healthy(&[("a", "healthy"), ("b", "healthy"), ("c", "healthy")]),
            None,
        ),
        (
            "the only healthy one of 2 (the other unhealthy) in a batch of its own",
            b(&[&["a"], &["b"]]),
            group(&["a", "b"]),
            healthy(&[("a", "unhealthy"), ("b", "healthy")]),
            Some(2),
        ),
        (
            "an instance already on the release keeps serving",
            b(&[&["b"]]),
            group(&["a", "b"]),
            healthy(&[("a", "healthy"), ("b", "healthy")]),
            None,
        ),
        (
            "a healthy target outside the group keeps serving",
            b(&[&["a"]]),
            group(&["a"]),
            healthy(&[("a", "healthy"), ("other", "healthy")]),
            None,
        ),
        (
            "nothing healthy: nothing to take out",
            b(&[&["a"]]),
            group(&["a"]),
            healthy(&[("a", "unhealthy")]),
            None,
        ),
        (
            "no target group: the whole group in one batch",
            b(&[&["a", "b"]]),
            group(&["a", "b"]),
            None,
            Some(1),
        ),
        (
            "no target group: one of two",
            b(&[&["a"], &["b"]]),
            group(&["a", "b"]),
            None,
            None,
        ),
    ];
    for (name, batches, hosts, health, refused) in table {
        match (check_drain_all(&batches, &hosts, &health), refused) {
            (Ok(()), None) => {}
            (Err(InPlaceError::DrainAll { batch, .. }), Some(n)) => assert_eq!(batch, n, "{name}"),
            (got, want) => panic!("{name}: got {got:?}, want refusal of batch {want:?}"),
        }
    }
    let e = check_drain_all(&b(&[&["a"]]), &group(&["a"]), &healthy(&[("a", "healthy")]))
        .expect_err("refused");
    let msg = e.to_string();
    assert!(
        msg.contains("batch 1 (a)")
            && msg.contains("--accept-downtime")
            && msg.contains("fails open"),
        "{msg}"
    );
}

#[test]
fn bake_verdict_table() {
    let t = rel("v2");
    let on = |id: &str| host(id, &[("skiff:release", "v2")]);
    let table: Vec<(&str, Vec<Host>, Health, Option<&str>)> = vec![
        (
            "all healthy",
            vec![on("a"), on("b")],
            healthy(&[("a", "healthy"), ("b", "healthy")]),
            None,
        ),
        (
            "an earlier batch goes unhealthy",
            vec![on("a"), on("b")],
            healthy(&[("a", "unhealthy"), ("b", "healthy")]),
            Some("a"),
        ),
        (
            "draining during the bake is a failure",
            vec![on("a"), on("b")],
            healthy(&[("a", "healthy"), ("b", "draining")]),
            Some("b"),
        ),
        (
            "no longer reports T",
            vec![on("a"), host("b", &[("skiff:release", "v1")])],
            healthy(&[("a", "healthy"), ("b", "healthy")]),
            Some("b"),
        ),
        (
            "an instance that left the group is not a failure",
            vec![on("a")],
            healthy(&[("a", "healthy")]),
            None,
        ),
    ];
    for (name, hosts, health, failed) in table {
        let got = bake_verdict(&hosts, &health, &ids(&["a", "b"]), &t);
        match (got, failed) {
            (Verdict::Done, None) => {}
            (Verdict::Failed(id, _), Some(want)) => assert_eq!(id, want, "{name}"),
            (got, want) => panic!("{name}: got {got:?}, want failure of {want:?}"),
        }
    }
}

#[test]
fn to_revert_table() {
    let t = rel("v2");
    let hosts = vec![
        host("a", &[("skiff:release", "v2"), ("skiff:target", "v2")]),
        host("b", &[("skiff:release", "v1"), ("skiff:target", "v2")]),
        host("c", &[("skiff:release", "v1")]),
        host("d", &[("skiff:release", "v2")]),
        host("e", &[("skiff:release", "v1"), ("skiff:target", "v1")]),
    ];
    let table: Vec<(&str, Vec<&str>, Vec<&str>)> = vec![
        (
            "the switched ones, and any on T",
            vec!["a"],
            vec!["a", "b", "d"],
        ),
        (
            "a switched one still on V is reverted too",
            vec!["c"],
            vec!["a", "b", "c", "d"],
        ),
        (
            "a switched one that left the group is not",
            vec!["gone"],
            vec!["a", "b", "d"],
        ),
    ];
    for (name, switched, want) in table {
        assert_eq!(to_revert(&hosts, &ids(&switched), &t), ids(&want), "{name}");
    }
}

#[test]
fn revert_verdict_table() {
    let v = rel("v1");
    let table: Vec<(&str, Vec<Host>, Health, Verdict)> = vec![
        (
            "back on V and healthy",
            vec![host(
                "a",
                &[("skiff:release", "v1"), ("skiff:failed", "v2")],
            )],
            healthy(&[("a", "healthy")]),
            Verdict::Done,
        ),
        (
            "back on V, the load balancer not yet",
            vec![host("a", &[("skiff:release", "v1")])],
            healthy(&[("a", "unhealthy")]),
            Verdict::Pending(vec![("a".into(), "target unhealthy".into())]),
        ),
        (
            "still on T",
            vec![host("a", &[("skiff:release", "v2")])],
            healthy(&[("a", "healthy")]),
            Verdict::Pending(vec![("a".into(), "runs v2".into())]),
        ),
        (
            "V failed there too",
            vec![host(
                "a",
                &[("skiff:release", "v2"), ("skiff:failed", "v1")],
            )],
            None,
            Verdict::Failed("a".into(), "its agent reports v1 failed".into()),
        ),
        ("left the group", vec![], None, Verdict::Done),
    ];
    for (name, hosts, health, want) in table {
        assert_eq!(
            revert_verdict(&hosts, &health, &ids(&["a"]), &v),
            want,
            "{name}"
        );
    }
}

#[test]
fn revert_after_swaps_verdict_table() {
    let (v1, v2) = (rel("v1"), rel("v2"));
    let window = Duration::from_secs(300);
    let told = |ago: u64, over: bool| Told {
        id: "a".into(),
        ago: Duration::from_secs(ago),
        over,
    };
    let on_v1 = vec![host("a", &[("skiff:release", "v1")])];
    let lb = healthy(&[("a", "healthy")]);
    let maybe = Verdict::Pending(vec![(
        "a".into(),
        "never reported v2, may still be in the swap to it: waited for until 300s after it was told"
            .into(),
    )]);
    type Row = (&'static str, Vec<Host>, Health, Vec<Told>, Verdict);
    let table: Vec<Row> = vec![
        (
            "not told v2 by this run: as revert_verdict",
            on_v1.clone(),
            lb.clone(),
            vec![],
            Verdict::Done,
        ),
        (
            "told, never reported v2, within the window: its v1 may predate the swap",
            on_v1.clone(),
            lb.clone(),
            vec![told(2, false)],
            maybe,
        ),
        (
            "the window passed: any swap it was in is over",
            on_v1.clone(),
            lb.clone(),
            vec![told(300, false)],
            Verdict::Done,
        ),
        (
            "seen on v2 earlier, back on v1 and healthy",
            on_v1.clone(),
            lb.clone(),
            vec![told(9, true)],
            Verdict::Done,
        ),
        (
            "reports v2 now: waits for v1 as any revert",
            vec![host("a", &[("skiff:release", "v2")])],
            lb.clone(),
            vec![told(6, false)],
            Verdict::Pending(vec![("a".into(), "runs v2".into())]),
        ),
        (
            "reports v2 failed: it went back by itself, its swap is over",
            vec![host(
                "a",
                &[("skiff:release", "v1"), ("skiff:failed", "v2")],
            )],
            lb.clone(),
            vec![told(6, false)],
            Verdict::Done,
        ),
        (
            "within the window and the load balancer not yet: one line for it",
            on_v1.clone(),
            healthy(&[("a", "initial")]),
            vec![told(2, false)],
            Verdict::Pending(vec![("a".into(), "target initial".into())]),
        ),
        (
            "v1 failed there: fails whatever the window",
            vec![host(
                "a",
                &[("skiff:release", "v1"), ("skiff:failed", "v1")],
            )],
            lb.clone(),
            vec![told(2, false)],
            Verdict::Failed("a".into(), "its agent reports v1 failed".into()),
        ),
        (
            "left the group: nothing to wait for",
            vec![],
            None,
            vec![told(2, false)],
            Verdict::Done,
        ),
    ];
    for (name, hosts, health, told, want) in table {
        assert_eq!(
            revert_after_swaps_verdict(&hosts, &health, &ids(&["a"]), (&v1, &v2), &told, window),
            want,
            "{name}"
        );
    }
    assert!(swap_over(&host("a", &[("skiff:release", "v2")]), &v2));
    assert!(!swap_over(&on_v1[0], &v2));
}

#[test]
fn pending_in_words() {
    assert_eq!(describe_pending(&[]), "none");
    assert_eq!(
        describe_pending(&[
            ("i-a".into(), "runs v1".into()),
            ("i-b".into(), "target initial".into())
        ]),
        "i-a (runs v1), i-b (target initial)"
    );
    assert_eq!(secs(Duration::from_millis(4249)), 4.2);
}

/// A scripted fleet: each read returns the next state (the last one repeats).
struct Script {
    reads: std::sync::Mutex<Vec<Result<Vec<Host>, InPlaceError>>>,
}

impl InPlaceFleet for Script {
    async fn hosts(&self) -> Result<Vec<Host>, InPlaceError> {
        let mut r = self.reads.lock().expect("lock");
        if r.len() > 1 {
            r.remove(0)
        } else {
            r[0].clone()
        }
    }
    async fn tag(&self, _: &[String], _: &str, _: &str) -> Result<(), InPlaceError> {
        Ok(())
    }
    async fn health(&self) -> Result<Health, InPlaceError> {
        Ok(None)
    }
    async fn held(&self) -> Result<Held, InPlaceError> {
        Ok(Held::default())
    }
    async fn hold(&self, _: &[String], _: bool) -> Result<(), InPlaceError> {
        Ok(())
    }
}

#[test]
fn mark_values() {
    assert_eq!(
        parse_mark("HealthCheck:ReplaceUnhealthy"),
        ids(&["HealthCheck", "ReplaceUnhealthy"])
    );
    assert_eq!(
        parse_mark(" HealthCheck ReplaceUnhealthy"),
        ids(&["HealthCheck", "ReplaceUnhealthy"])
    );
    assert_eq!(parse_mark(""), Vec::<String>::new());
    assert_eq!(HELD.join(MARK_SEPARATOR), "HealthCheck:ReplaceUnhealthy");
}

#[test]
fn to_hold_table() {
    // suspended, marked as ctl's, the processes this run holds (and resumes)
    let table: Vec<(Vec<&str>, Vec<&str>, Vec<&str>)> = vec![
        (vec![], vec![], vec!["HealthCheck", "ReplaceUnhealthy"]),
        (
            vec!["AZRebalance"],
            vec![],
            vec!["HealthCheck", "ReplaceUnhealthy"],
        ),
        (vec!["ReplaceUnhealthy"], vec![], vec!["HealthCheck"]),
        (
            vec!["HealthCheck", "ReplaceUnhealthy", "Launch"],
            vec![],
            vec![],
        ),
        // a killed run left them suspended under ctl's mark: ctl's again
        (
            vec!["HealthCheck", "ReplaceUnhealthy"],
            vec!["HealthCheck", "ReplaceUnhealthy"],
            vec!["HealthCheck", "ReplaceUnhealthy"],
        ),
        // someone else's suspension is not ctl's even if a mark names another process
        (
            vec!["HealthCheck", "ReplaceUnhealthy"],
            vec!["ReplaceUnhealthy"],
            vec!["ReplaceUnhealthy"],
        ),
        // a mark without the suspension (killed between mark and suspend)
        (
            vec![],
            vec!["HealthCheck"],
            vec!["HealthCheck", "ReplaceUnhealthy"],
        ),
    ];
    for (suspended, marked, want) in table {
        let now = Held {
            suspended: ids(&suspended),
            marked: ids(&marked),
        };
        assert_eq!(to_hold(&now), ids(&want), "{now:?}");
    }
}

#[test]
fn stale_hold_table() {
    // suspended, marked as ctl's, what a killed run left (resumed by unlock or the next release)
    let table: Vec<(Vec<&str>, Vec<&str>, Vec<&str>)> = vec![
        (vec![], vec![], vec![]),
        (
            vec!["HealthCheck", "ReplaceUnhealthy"],
            vec!["HealthCheck", "ReplaceUnhealthy"],
            vec!["HealthCheck", "ReplaceUnhealthy"],
        ),
        // someone else's suspension, no mark: theirs
        (vec!["HealthCheck", "ReplaceUnhealthy"], vec![], vec![]),
        // resumed by someone meanwhile: only what is still suspended
        (
            vec!["ReplaceUnhealthy", "AZRebalance"],
            vec!["HealthCheck", "ReplaceUnhealthy"],
            vec!["ReplaceUnhealthy"],
        ),
        // killed between mark and suspend: nothing to resume
        (vec![], vec!["HealthCheck"], vec![]),
        // a mark naming a process ctl never holds is not trusted for it
        (vec!["Launch"], vec!["Launch"], vec![]),
    ];
    for (suspended, marked, want) in table {
        let now = Held {
            suspended: ids(&suspended),
            marked: ids(&marked),
        };
        assert_eq!(stale_hold(&now), ids(&want), "{now:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn waits_are_bounded_and_stoppable() {
    let t = rel("v2");
    let on = vec![host("a", &[("skiff:release", "v2")])];
    let off = vec![host("a", &[("skiff:release", "v1")])];
    let a = ids(&["a"]);
    let judge = |h: &[Host], hh: &Health| batch_verdict(h, hh, &a, &t, &DRAIN);
    let (_h, mut stop) = Stop::new();
    let poll = Duration::from_secs(1);
    let timeout = Duration::from_secs(10);

    let f = Script {
        reads: std::sync::Mutex::new(vec![Ok(off.clone()), Ok(off.clone()), Ok(on.clone())]),
    };
    assert_eq!(
        wait_for(&f, timeout, poll, false, &mut stop, judge).await,
        Waited::Done
    );

    let f = Script {
        reads: std::sync::Mutex::new(vec![Ok(off.clone())]),
    };
    let start = Instant::now();
    assert_eq!(
        wait_for(&f, timeout, poll, false, &mut stop, judge).await,
        Waited::TimedOut(vec![("a".into(), "runs v1".into())])
    );
    assert!(start.elapsed() >= timeout && start.elapsed() < timeout + poll);

    // A bake holds for the whole time, and fails at once when the verdict fails.
    let f = Script {
        reads: std::sync::Mutex::new(vec![Ok(on.clone())]),
    };
    let bake = |h: &[Host], hh: &Health| bake_verdict(h, hh, &a, &t);
    let start = Instant::now();
    assert_eq!(
        wait_for(&f, timeout, poll, true, &mut stop, bake).await,
        Waited::Done
    );
    assert!(start.elapsed() >= timeout);
    let f = Script {
        reads: std::sync::Mutex::new(vec![Ok(on.clone()), Ok(off.clone())]),
    };
    assert!(matches!(
        wait_for(&f, timeout, poll, true, &mut stop, bake).await,
        Waited::Failed(id, _) if id == "a"
    ));

    // Reads failing again and again end the wait; a few are waited out.
    let err = || Err(InPlaceError::DescribeTags("throttled".into()));
    let f = Script {
        reads: std::sync::Mutex::new(vec![err(), err(), Ok(on.clone())]),
    };
    assert_eq!(
        wait_for(&f, timeout, poll, false, &mut stop, judge).await,
        Waited::Done
    );
    let f = Script {
        reads: std::sync::Mutex::new(vec![err()]),
    };
    assert!(matches!(
        wait_for(&f, timeout, poll, false, &mut stop, judge).await,
        Waited::Unreadable(e) if e.contains("throttled")
    ));

    // A stop request ends it.
    let (handle, mut stop) = Stop::new();
    let f = Script {
        reads: std::sync::Mutex::new(vec![Ok(off.clone())]),
    };
    handle.stop("SIGTERM");
    assert_eq!(
        wait_for(&f, timeout, poll, false, &mut stop, judge).await,
        Waited::Stopped("SIGTERM")
    );
}

#[test]
fn swap_window_table() {
    let s = Duration::from_secs;
    let batch_timeout = s(300);
    // slowest finished batch => window
    let table = [
        (None, s(300)),
        (Some(Duration::from_millis(1100)), SWAP_WINDOW_FLOOR),
        (Some(s(10)), s(30)),
        (Some(s(20)), s(60)),
        (Some(s(99)), s(297)),
        (Some(s(150)), s(300)),
    ];
    for (slowest, want) in table {
        assert_eq!(swap_window(slowest, batch_timeout), want, "{slowest:?}");
    }
    assert_eq!(
        swap_window(Some(s(20)), s(45)),
        s(45),
        "never past --batch-timeout"
    );
}
