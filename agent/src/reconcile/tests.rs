use super::*;
use Action::*;
use UpdateMode::*;

fn rel(tag: &str) -> Release {
    Release::new(tag.parse().expect("tag"), None)
}

#[test]
fn decisions() {
    let v1 = rel("v1");
    let v2 = rel("v2");
    let up = |r: &Release| Current {
        release: r.clone(),
        running: true,
    };
    let down = |r: &Release| Current {
        release: r.clone(),
        running: false,
    };
    let (v1_up, v1_down) = (up(&v1), down(&v1));
    // desired, current, mode, at_start, failed => action
    type Row<'a> = (
        Option<&'a Release>,
        Option<&'a Current>,
        UpdateMode,
        bool,
        Option<&'a Release>,
        Action,
    );
    let table: Vec<Row<'_>> = vec![
        (None, None, Boot, true, None, Keep),
        (None, Some(&v1_up), Boot, true, None, Keep),
        (None, Some(&v1_down), Boot, false, None, Restart),
        (Some(&v1), None, Boot, true, None, Deploy(v1.clone())),
        (Some(&v1), None, Follow, false, None, Deploy(v1.clone())),
        // adopt: same release running, whatever the mode
        (Some(&v1), Some(&v1_up), Boot, true, None, Keep),
        (Some(&v1), Some(&v1_up), Follow, true, None, Keep),
        (Some(&v1), Some(&v1_down), Follow, false, None, Restart),
        (Some(&v1), Some(&v1_down), Boot, true, None, Restart),
        // changed release
        (Some(&v2), Some(&v1_up), Boot, true, None, Stale),
        (Some(&v2), Some(&v1_up), Boot, false, None, Stale),
        (
            Some(&v2),
            Some(&v1_up),
            Follow,
            true,
            None,
            Replace(v2.clone()),
        ),
        (
            Some(&v2),
            Some(&v1_up),
            Follow,
            false,
            None,
            Replace(v2.clone()),
        ),
        (
            Some(&v2),
            Some(&v1_down),
            Boot,
            true,
            None,
            Deploy(v2.clone()),
        ),
        (Some(&v2), Some(&v1_down), Boot, false, None, Restart),
        (
            Some(&v2),
            Some(&v1_down),
            Follow,
            false,
            None,
            Deploy(v2.clone()),
        ),
        // a release that failed here is not retried; the current keeps running
        (Some(&v2), Some(&v1_up), Follow, false, Some(&v2), Keep),
        (Some(&v2), Some(&v1_down), Follow, false, Some(&v2), Restart),
        (Some(&v2), None, Boot, false, Some(&v2), Keep),
        // ...until the desired release changes
        (
            Some(&v2),
            Some(&v1_up),
            Follow,
            false,
            Some(&v1),
            Replace(v2.clone()),
        ),
    ];
    for (desired, current, mode, at_start, failed, want) in table {
        let s = Situation {
            fleet: false,
            target: None,
            desired,
            current,
            mode,
            at_start,
            failed,
            deploy_waiting: false,
            restart_waiting: false,
            terminating: false,
        };
        assert_eq!(decide(&s), want, "{s:?}");
    }
}

/// While a deploy waits on its backoff, or the host is terminating, no new release is
/// started, and the current container is restarted when it exits (fail static), once its
/// restart backoff has passed.
#[test]
fn held_back_deploys_keep_the_current_container_running() {
    let v1 = rel("v1");
    let v2 = rel("v2");
    let up = Current {
        release: v1.clone(),
        running: true,
    };
    let down = Current {
        release: v1.clone(),
        running: false,
    };
    struct Row<'a> {
        current: Option<&'a Current>,
        mode: UpdateMode,
        at_start: bool,
        deploy_waiting: bool,
        restart_waiting: bool,
        terminating: bool,
        want: Action,
    }
    let row = |current, mode, at_start, (deploy_waiting, restart_waiting, terminating), want| Row {
        current,
        mode,
        at_start,
        deploy_waiting,
        restart_waiting,
        terminating,
        want,
    };
    const FREE: (bool, bool, bool) = (false, false, false);
    const DEPLOY_WAITS: (bool, bool, bool) = (true, false, false);
    const RESTART_WAITS: (bool, bool, bool) = (false, true, false);
    const BOTH_WAIT: (bool, bool, bool) = (true, true, false);
    const TERMINATING: (bool, bool, bool) = (false, false, true);
    const TERMINATING_RESTART_WAITS: (bool, bool, bool) = (false, true, true);
    // v2 desired in every row.
    let table = [
        row(Some(&up), Follow, false, FREE, Replace(v2.clone())),
        row(Some(&up), Follow, false, DEPLOY_WAITS, Keep),
        row(Some(&up), Follow, false, TERMINATING, Keep),
        row(Some(&up), Follow, false, RESTART_WAITS, Replace(v2.clone())),
        row(Some(&down), Follow, false, FREE, Deploy(v2.clone())),
        row(Some(&down), Follow, false, DEPLOY_WAITS, Restart),
        row(Some(&down), Follow, false, TERMINATING, Restart),
        // the restart backoff holds the fail-static restart back too
        row(Some(&down), Follow, false, BOTH_WAIT, Keep),
        row(Some(&down), Follow, false, TERMINATING_RESTART_WAITS, Keep),
        // a deploy of a new release is not a restart: the restart backoff does not hold it
        row(
            Some(&down),
            Follow,
            false,
            RESTART_WAITS,
            Deploy(v2.clone()),
        ),
        row(Some(&down), Boot, true, FREE, Deploy(v2.clone())),
        row(Some(&down), Boot, true, DEPLOY_WAITS, Restart),
        row(Some(&down), Boot, false, FREE, Restart),
        row(Some(&down), Boot, false, RESTART_WAITS, Keep),
        row(Some(&up), Boot, false, DEPLOY_WAITS, Stale),
        row(None, Follow, false, FREE, Deploy(v2.clone())),
        row(None, Follow, false, DEPLOY_WAITS, Keep),
        row(None, Follow, false, RESTART_WAITS, Deploy(v2.clone())),
        row(None, Boot, true, TERMINATING, Keep),
    ];
    for r in table {
        let s = Situation {
            fleet: false,
            target: None,
            desired: Some(&v2),
            current: r.current,
            mode: r.mode,
            at_start: r.at_start,
            failed: None,
            deploy_waiting: r.deploy_waiting,
            restart_waiting: r.restart_waiting,
            terminating: r.terminating,
        };
        assert_eq!(decide(&s), r.want, "{s:?}");
    }
    // Same release, exited: restarted only once the restart backoff has passed.
    for (restart_waiting, want) in [(false, Restart), (true, Keep)] {
        let s = Situation {
            fleet: false,
            target: None,
            desired: Some(&v1),
            current: Some(&down),
            mode: Follow,
            at_start: false,
            failed: None,
            deploy_waiting: false,
            restart_waiting,
            terminating: false,
        };
        assert_eq!(decide(&s), want, "{s:?}");
    }
}

/// On a fleet the parameter applies at boot only and a running host swaps for its target
/// alone, whatever `update` says; off a fleet the target is never followed and today's
/// rules apply (`make dev` with `update = "follow"` swaps on the file).
#[test]
fn fleet_decisions() {
    let (v1, v2, v3) = (rel("v1"), rel("v2"), rel("v3"));
    let up = |r: &Release| Current {
        release: r.clone(),
        running: true,
    };
    let down = |r: &Release| Current {
        release: r.clone(),
        running: false,
    };
    let (v1_up, v1_down, v2_up) = (up(&v1), down(&v1), up(&v2));
    const FLEET: bool = true;
    const LOCAL: bool = false;
    // fleet, mode, parameter, target, current, at_start, failed => action
    type Row<'a> = (
        bool,
        UpdateMode,
        Option<&'a Release>,
        Option<&'a Release>,
        Option<&'a Current>,
        bool,
        Option<&'a Release>,
        Action,
    );
    #[rustfmt::skip]
        let table: Vec<Row<'_>> = vec![
            // boot: nothing runs, the parameter applies in either mode
            (FLEET, Boot, Some(&v2), None, None, true, None, Deploy(v2.clone())),
            (FLEET, Follow, Some(&v2), None, None, true, None, Deploy(v2.clone())),
            (FLEET, Boot, Some(&v2), None, Some(&v1_down), true, None, Deploy(v2.clone())),
            // nothing runs and a target is set (e.g. the container was removed): the target
            (FLEET, Boot, Some(&v2), Some(&v3), None, true, None, Deploy(v3.clone())),
            (FLEET, Boot, Some(&v2), Some(&v3), None, false, None, Deploy(v3.clone())),
            // a running container: a parameter change alone never swaps, in either mode, and is
            // not reported (the host would not have read it)
            (FLEET, Boot, Some(&v2), None, Some(&v1_up), false, None, Keep),
            (FLEET, Follow, Some(&v2), None, Some(&v1_up), false, None, Keep),
            (FLEET, Follow, Some(&v2), None, Some(&v1_up), true, None, Keep),
            // ... an exited one is restarted, not replaced by the parameter's release
            (FLEET, Follow, Some(&v2), None, Some(&v1_down), false, None, Restart),
            // off a fleet: `follow` follows the parameter, targets mean nothing
            (LOCAL, Follow, Some(&v2), None, Some(&v1_up), false, None, Replace(v2.clone())),
            (LOCAL, Follow, Some(&v2), Some(&v3), Some(&v1_up), false, None, Replace(v2.clone())),
            (LOCAL, Boot, Some(&v2), Some(&v3), Some(&v1_up), false, None, Stale),
            (LOCAL, Boot, Some(&v1), Some(&v3), Some(&v1_up), false, None, Keep),
            // a target that differs from what runs is swapped to, in either mode
            (FLEET, Boot, Some(&v2), Some(&v2), Some(&v1_up), false, None, Replace(v2.clone())),
            (FLEET, Follow, Some(&v2), Some(&v2), Some(&v1_up), false, None, Replace(v2.clone())),
            (FLEET, Boot, Some(&v1), Some(&v2), Some(&v1_up), false, None, Replace(v2.clone())),
            (FLEET, Boot, None, Some(&v2), Some(&v1_up), false, None, Replace(v2.clone())),
            (FLEET, Boot, Some(&v2), Some(&v2), Some(&v1_down), false, None, Deploy(v2.clone())),
            // target reached: kept, whatever the parameter read at boot named
            (FLEET, Boot, Some(&v1), Some(&v1), Some(&v1_up), false, None, Keep),
            (FLEET, Follow, Some(&v2), Some(&v1), Some(&v1_up), false, None, Keep),
            (FLEET, Boot, Some(&v1), Some(&v1), Some(&v1_down), false, None, Restart),
            // a target that failed here is not retried (nor is the parameter naming it)
            (FLEET, Boot, Some(&v2), Some(&v2), Some(&v1_up), false, Some(&v2), Keep),
            (FLEET, Follow, Some(&v2), Some(&v2), Some(&v1_up), false, Some(&v2), Keep),
            (FLEET, Boot, Some(&v2), Some(&v2), Some(&v1_down), false, Some(&v2), Restart),
            (FLEET, Boot, Some(&v1), Some(&v2), Some(&v1_up), false, Some(&v2), Keep),
            // ctl's revert: the target names the release that ran before
            (FLEET, Boot, Some(&v2), Some(&v1), Some(&v2_up), false, None, Replace(v1.clone())),
            (FLEET, Boot, Some(&v1), Some(&v1), Some(&v2_up), false, None, Replace(v1.clone())),
            (FLEET, Boot, Some(&v2), Some(&v1), Some(&v1_up), false, Some(&v2), Keep),
            // after a failed target, the next one is followed
            (FLEET, Boot, Some(&v3), Some(&v3), Some(&v1_up), false, Some(&v2), Replace(v3.clone())),
        ];
    for (fleet, mode, desired, target, current, at_start, failed, want) in table {
        let s = Situation {
            desired,
            fleet,
            target,
            current,
            mode,
            at_start,
            failed,
            deploy_waiting: false,
            restart_waiting: false,
            terminating: false,
        };
        assert_eq!(decide(&s), want, "{s:?}");
    }
    // A target is held back like any release while a deploy waits or the host terminates.
    for (deploy_waiting, terminating) in [(true, false), (false, true)] {
        let s = Situation {
            desired: Some(&v1),
            fleet: FLEET,
            target: Some(&v2),
            current: Some(&v1_up),
            mode: Boot,
            at_start: false,
            failed: None,
            deploy_waiting,
            restart_waiting: false,
            terminating,
        };
        assert_eq!(decide(&s), Keep, "{s:?}");
    }
}

#[test]
fn a_failure_is_forgotten_when_an_instruction_moves_to_another_release() {
    use crate::fleet::Instructions;
    let (v1, v2) = (rel("v1"), rel("v2"));
    let at = |target: Option<&Release>, pull: Option<&Release>| Instructions {
        target: target.cloned(),
        pull: pull.cloned(),
    };
    // failed v2; instructions now => forgotten
    let table = [
        (at(None, None), false),
        (at(Some(&v2), None), false),
        (at(None, Some(&v2)), false),
        (at(Some(&v2), Some(&v2)), false),
        // ctl's revert: the target back on v1, the pull still names v2
        (at(Some(&v1), Some(&v2)), true),
        // ctl clearing a failed pull before trying the release again
        (at(None, Some(&v1)), true),
        (at(Some(&v1), None), true),
    ];
    for (now, want) in table {
        assert_eq!(forgets_failure(&v2, &now), want, "{now:?}");
    }
}

#[test]
fn pull_instructions() {
    let v2 = rel("v2");
    let v2_pinned = Release::new(
        "v2".parse().expect("tag"),
        Some(
            "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
                .parse()
                .expect("digest"),
        ),
    );
    // pull, pulled, failed, waiting, terminating => pull
    type Row<'a> = (
        Option<&'a Release>,
        Option<&'a Release>,
        Option<&'a Release>,
        bool,
        bool,
        Option<&'a Release>,
    );
    #[rustfmt::skip]
        let table: Vec<Row<'_>> = vec![
            (None, None, None, false, false, None),
            (None, Some(&v2), None, false, false, None),
            (Some(&v2), None, None, false, false, Some(&v2)),
            // answered with exactly this value: done
            (Some(&v2), Some(&v2), None, false, false, None),
            // ctl compares values: a pinned instruction is answered again
            (Some(&v2_pinned), Some(&v2), None, false, false, Some(&v2_pinned)),
            (Some(&v2), Some(&v2_pinned), None, false, false, Some(&v2)),
            // failed here (either form): not pulled again
            (Some(&v2), None, Some(&v2), false, false, None),
            (Some(&v2_pinned), None, Some(&v2), false, false, None),
            // held back by its backoff, or by termination
            (Some(&v2), None, None, true, false, None),
            (Some(&v2), None, None, false, true, None),
        ];
    for (pull, pulled, failed, waiting, terminating, want) in table {
        let s = PullSituation {
            pull,
            pulled,
            failed,
            waiting,
            terminating,
        };
        assert_eq!(pull_wanted(&s).as_ref(), want, "{s:?}");
    }
}

#[test]
fn same_tag_pinned_later_is_not_a_change() {
    let loose = rel("v1");
    let pinned = Release::new(
        "v1".parse().expect("tag"),
        Some(
            "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
                .parse()
                .expect("digest"),
        ),
    );
    let cur = Current {
        release: loose,
        running: true,
    };
    let s = Situation {
        fleet: false,
        target: None,
        desired: Some(&pinned),
        current: Some(&cur),
        mode: Follow,
        at_start: false,
        failed: None,
        deploy_waiting: false,
        restart_waiting: false,
        terminating: false,
    };
    assert_eq!(decide(&s), Keep);
}

#[test]
fn a_release_that_failed_pinned_is_not_retried_unpinned() {
    let pinned = Release::new(
        "v2".parse().expect("tag"),
        Some(
            "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
                .parse()
                .expect("digest"),
        ),
    );
    let cur = Current {
        release: rel("v1"),
        running: true,
    };
    let s = Situation {
        fleet: false,
        target: None,
        desired: Some(&rel("v2")),
        current: Some(&cur),
        mode: Follow,
        at_start: false,
        failed: Some(&pinned),
        deploy_waiting: false,
        restart_waiting: false,
        terminating: false,
    };
    assert_eq!(decide(&s), Keep);
}

#[test]
fn health_table() {
    let base = HealthInputs {
        has_container: true,
        container_running: true,
        app_ok: true,
        draining: false,
        starting: false,
        failed: false,
        has_release: true,
        holding: false,
    };
    let table = [
        (base, HealthStatus::Healthy),
        // The new release fails during a handover's hold: the old one takes the port back.
        (
            HealthInputs {
                app_ok: false,
                holding: true,
                ..base
            },
            HealthStatus::Healthy,
        ),
        (
            HealthInputs {
                app_ok: false,
                holding: true,
                draining: true,
                ..base
            },
            HealthStatus::Draining,
        ),
        (
            HealthInputs {
                draining: true,
                ..base
            },
            HealthStatus::Draining,
        ),
        (
            HealthInputs {
                app_ok: false,
                ..base
            },
            HealthStatus::Unhealthy,
        ),
        (
            HealthInputs {
                container_running: false,
                ..base
            },
            HealthStatus::Unhealthy,
        ),
        (
            HealthInputs {
                has_container: false,
                app_ok: false,
                starting: true,
                ..base
            },
            HealthStatus::Starting,
        ),
        (
            HealthInputs {
                has_container: false,
                has_release: false,
                app_ok: false,
                ..base
            },
            HealthStatus::NoRelease,
        ),
        (
            HealthInputs {
                has_container: false,
                failed: true,
                app_ok: false,
                ..base
            },
            HealthStatus::Failed,
        ),
        // a stale probe result never makes a host healthy without a running container
        (
            HealthInputs {
                has_container: false,
                ..base
            },
            HealthStatus::Unhealthy,
        ),
    ];
    for (inputs, want) in table {
        assert_eq!(health_status(inputs), want, "{inputs:?}");
    }
}
