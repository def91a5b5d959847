//! The agent's decisions, kept pure: given what the release source asks for and what the
//! container runtime shows, what happens next; and given the published state, what the health
//! endpoint answers. The loop in `supervise` executes what these return.
//!
//! Longer than ~400 lines on purpose: the decisions are ~150 lines and the rest is their
//! tables, which belong next to them.

use skiff_release::Release;

use crate::config::UpdateMode;

/// The managed container as last observed.
#[derive(Debug, Clone, PartialEq)]
pub struct Current {
    pub release: Release,
    pub running: bool,
}

/// Everything the decision looks at.
#[derive(Debug, Clone, PartialEq)]
pub struct Situation<'a> {
    /// The release the source names, if one was ever read successfully.
    pub desired: Option<&'a Release>,
    /// The container the agent manages, if any.
    pub current: Option<&'a Current>,
    pub mode: UpdateMode,
    /// True until the agent has acted once after its start: the `boot` window.
    pub at_start: bool,
    /// A release that already failed to become healthy here; not tried again until it changes.
    pub failed: Option<&'a Release>,
    /// A failed deploy waits on its backoff: no new release now.
    pub deploy_waiting: bool,
    /// The last restart of the current container waits on its backoff: no restart now.
    pub restart_waiting: bool,
    /// The fleet terminates this host: it takes no new release.
    pub terminating: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Nothing to do.
    Keep,
    /// Nothing serves: pull, create and start `release`, then wait for it to be healthy.
    Deploy(Release),
    /// A healthy container serves another release: pull and create the new one first, then drain,
    /// swap, and roll back if the new one does not become healthy.
    Replace(Release),
    /// The current container exited: start it again (after the restart backoff).
    Restart,
    /// `boot` mode and the desired release differs from the running one: report, do not act.
    Stale,
}

pub fn decide(s: &Situation<'_>) -> Action {
    let action = match wanted(s) {
        // A host that takes no new release now (deploy backoff, termination) fails static: what
        // it runs keeps running, restarted when it exits.
        Action::Deploy(_) | Action::Replace(_) if s.deploy_waiting || s.terminating => {
            match s.current {
                Some(c) => restart_if_stopped(c),
                None => Action::Keep,
            }
        }
        other => other,
    };
    match action {
        // An exited container is started again only once its restart backoff has passed.
        Action::Restart if s.restart_waiting => Action::Keep,
        other => other,
    }
}

/// What the release and the container ask for, before backoff and termination hold it back.
fn wanted(s: &Situation<'_>) -> Action {
    let desired = match s.desired {
        // A failed release found pinned (from its container's labels, after a restart) is the
        // same release as its unpinned tag.
        Some(d) if !s.failed.is_some_and(|f| f.same_version(d)) => Some(d),
        // No release, or one that failed here: keep whatever runs running.
        _ => None,
    };
    match (desired, s.current) {
        (None, None) => Action::Keep,
        (None, Some(c)) => restart_if_stopped(c),
        (Some(d), None) => Action::Deploy(d.clone()),
        (Some(d), Some(c)) if c.release.same_version(d) => restart_if_stopped(c),
        (Some(d), Some(c)) => match (s.mode, c.running, s.at_start) {
            // At start with nothing serving, the boot release is applied in either mode.
            (_, false, true) => Action::Deploy(d.clone()),
            (UpdateMode::InPlace, true, _) => Action::Replace(d.clone()),
            (UpdateMode::InPlace, false, false) => Action::Deploy(d.clone()),
            (UpdateMode::Boot, true, _) => Action::Stale,
            (UpdateMode::Boot, false, false) => Action::Restart,
        },
    }
}

fn restart_if_stopped(c: &Current) -> Action {
    if c.running {
        Action::Keep
    } else {
        Action::Restart
    }
}

/// How the host presents itself to the load balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthStatus {
    Healthy,
    Starting,
    Unhealthy,
    Draining,
    NoRelease,
    Failed,
}

impl HealthStatus {
    pub fn is_healthy(self) -> bool {
        self == HealthStatus::Healthy
    }
}

/// What the health endpoint derives its answer from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthInputs {
    pub has_container: bool,
    pub container_running: bool,
    /// The app's own health check passed at its last probe.
    pub app_ok: bool,
    pub draining: bool,
    /// A deploy is in progress and nothing served before it.
    pub starting: bool,
    /// The release failed to start and nothing else runs.
    pub failed: bool,
    pub has_release: bool,
}

pub fn health_status(h: HealthInputs) -> HealthStatus {
    if h.draining {
        HealthStatus::Draining
    } else if h.has_container && h.container_running && h.app_ok {
        HealthStatus::Healthy
    } else if h.starting {
        HealthStatus::Starting
    } else if h.failed {
        HealthStatus::Failed
    } else if !h.has_container && !h.has_release {
        HealthStatus::NoRelease
    } else {
        HealthStatus::Unhealthy
    }
}

#[cfg(test)]
mod tests {
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
            (Some(&v1), None, InPlace, false, None, Deploy(v1.clone())),
            // adopt: same release running, whatever the mode
            (Some(&v1), Some(&v1_up), Boot, true, None, Keep),
            (Some(&v1), Some(&v1_up), InPlace, true, None, Keep),
            (Some(&v1), Some(&v1_down), InPlace, false, None, Restart),
            (Some(&v1), Some(&v1_down), Boot, true, None, Restart),
            // changed release
            (Some(&v2), Some(&v1_up), Boot, true, None, Stale),
            (Some(&v2), Some(&v1_up), Boot, false, None, Stale),
            (
                Some(&v2),
                Some(&v1_up),
                InPlace,
                true,
                None,
                Replace(v2.clone()),
            ),
            (
                Some(&v2),
                Some(&v1_up),
                InPlace,
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
                InPlace,
                false,
                None,
                Deploy(v2.clone()),
            ),
            // a release that failed here is not retried; the current keeps running
            (Some(&v2), Some(&v1_up), InPlace, false, Some(&v2), Keep),
            (
                Some(&v2),
                Some(&v1_down),
                InPlace,
                false,
                Some(&v2),
                Restart,
            ),
            (Some(&v2), None, Boot, false, Some(&v2), Keep),
            // ...until the desired release changes
            (
                Some(&v2),
                Some(&v1_up),
                InPlace,
                false,
                Some(&v1),
                Replace(v2.clone()),
            ),
        ];
        for (desired, current, mode, at_start, failed, want) in table {
            let s = Situation {
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
        let row =
            |current, mode, at_start, (deploy_waiting, restart_waiting, terminating), want| Row {
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
            row(Some(&up), InPlace, false, FREE, Replace(v2.clone())),
            row(Some(&up), InPlace, false, DEPLOY_WAITS, Keep),
            row(Some(&up), InPlace, false, TERMINATING, Keep),
            row(
                Some(&up),
                InPlace,
                false,
                RESTART_WAITS,
                Replace(v2.clone()),
            ),
            row(Some(&down), InPlace, false, FREE, Deploy(v2.clone())),
            row(Some(&down), InPlace, false, DEPLOY_WAITS, Restart),
            row(Some(&down), InPlace, false, TERMINATING, Restart),
            // the restart backoff holds the fail-static restart back too
            row(Some(&down), InPlace, false, BOTH_WAIT, Keep),
            row(Some(&down), InPlace, false, TERMINATING_RESTART_WAITS, Keep),
            // a deploy of a new release is not a restart: the restart backoff does not hold it
            row(
                Some(&down),
                InPlace,
                false,
                RESTART_WAITS,
                Deploy(v2.clone()),
            ),
            row(Some(&down), Boot, true, FREE, Deploy(v2.clone())),
            row(Some(&down), Boot, true, DEPLOY_WAITS, Restart),
            row(Some(&down), Boot, false, FREE, Restart),
            row(Some(&down), Boot, false, RESTART_WAITS, Keep),
            row(Some(&up), Boot, false, DEPLOY_WAITS, Stale),
            row(None, InPlace, false, FREE, Deploy(v2.clone())),
            row(None, InPlace, false, DEPLOY_WAITS, Keep),
            row(None, InPlace, false, RESTART_WAITS, Deploy(v2.clone())),
            row(None, Boot, true, TERMINATING, Keep),
        ];
        for r in table {
            let s = Situation {
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
                desired: Some(&v1),
                current: Some(&down),
                mode: InPlace,
                at_start: false,
                failed: None,
                deploy_waiting: false,
                restart_waiting,
                terminating: false,
            };
            assert_eq!(decide(&s), want, "{s:?}");
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
            desired: Some(&pinned),
            current: Some(&cur),
            mode: InPlace,
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
            desired: Some(&rel("v2")),
            current: Some(&cur),
            mode: InPlace,
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
        };
        let table = [
            (base, HealthStatus::Healthy),
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
}
