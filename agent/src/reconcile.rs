//! The agent's decisions, kept pure: given what the release source asks for and what the
//! container runtime shows, what happens next; and given the published state, what the health
//! endpoint answers. The loop in `supervise` executes what these return.

use std::time::Duration;

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
    match wanted(s) {
        // A host that takes no new release now (deploy backoff, termination) fails static: what
        // it runs keeps running, restarted when it exits.
        Action::Deploy(_) | Action::Replace(_) if s.deploy_waiting || s.terminating => {
            match s.current {
                Some(c) => restart_if_stopped(c),
                None => Action::Keep,
            }
        }
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

/// Delay before restart attempt `attempt` (1-based): 1s, 2s, 4s, ... capped at 60s.
pub fn restart_delay(attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(6);
    Duration::from_secs(1u64 << exp).min(Duration::from_secs(60))
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
                terminating: false,
            };
            assert_eq!(decide(&s), want, "{s:?}");
        }
    }

    /// While a deploy waits on its backoff, or the host is terminating, no new release is
    /// started, and the current container is restarted when it exits (fail static).
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
        // current, mode, at_start, deploy_waiting, terminating => action (v2 desired)
        type Row<'a> = (Option<&'a Current>, UpdateMode, bool, bool, bool, Action);
        let table: Vec<Row<'_>> = vec![
            (Some(&up), InPlace, false, false, false, Replace(v2.clone())),
            (Some(&up), InPlace, false, true, false, Keep),
            (Some(&up), InPlace, false, false, true, Keep),
            (
                Some(&down),
                InPlace,
                false,
                false,
                false,
                Deploy(v2.clone()),
            ),
            (Some(&down), InPlace, false, true, false, Restart),
            (Some(&down), InPlace, false, false, true, Restart),
            (Some(&down), Boot, true, false, false, Deploy(v2.clone())),
            (Some(&down), Boot, true, true, false, Restart),
            (Some(&up), Boot, false, true, false, Stale),
            (None, InPlace, false, false, false, Deploy(v2.clone())),
            (None, InPlace, false, true, false, Keep),
            (None, Boot, true, false, true, Keep),
        ];
        for (current, mode, at_start, deploy_waiting, terminating, want) in table {
            let s = Situation {
                desired: Some(&v2),
                current,
                mode,
                at_start,
                failed: None,
                deploy_waiting,
                terminating,
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
            terminating: false,
        };
        assert_eq!(decide(&s), Keep);
    }

    #[test]
    fn restart_backoff_is_capped() {
        let got: Vec<u64> = (1..=9).map(|a| restart_delay(a).as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(restart_delay(0).as_secs(), 1);
        assert_eq!(restart_delay(u32::MAX).as_secs(), 60);
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
