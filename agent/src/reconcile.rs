//! The agent's decisions, kept pure: given what the release source (and, on a fleet, the
//! rollout's instructions) ask for and what the container runtime shows, what happens next;
//! whether a pull instruction is to be carried out; and given the published state, what the
//! health endpoint answers. The loop in `supervise` executes what these return.
//!
//! On a fleet (an instance of an Auto Scaling group) releases are coordinated by `ctl`: the
//! parameter is followed only while nothing of the app runs (boot), and a running container
//! swaps only for the instance's `skiff:target`. `update = "follow"` is not honoured there:
//! every host swapping on its own poll would drain the whole fleet at once. Nor is a fleet
//! host ever "stale": it does not re-read the parameter once it runs something.
//!
//! The decisions' tables are in `reconcile/tests.rs`.

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
    /// Releases are coordinated by the fleet (see the module doc).
    pub fleet: bool,
    /// On a fleet: the release the rollout names for this host (`skiff:target`).
    pub target: Option<&'a Release>,
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
    /// Off a fleet, `boot` mode and the desired release differs from the running one: report,
    /// do not act.
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

/// The release the host follows and how: the source's in the configured mode; on a fleet the
/// target (swapped to in place) or else the source's at boot only. A target that failed here
/// counts as none.
fn followed<'a>(s: &Situation<'a>) -> (Option<&'a Release>, UpdateMode) {
    if !s.fleet {
        return (s.desired, s.mode);
    }
    match s.target {
        Some(t) if !s.failed.is_some_and(|f| f.same_version(t)) => (Some(t), UpdateMode::Follow),
        _ => (s.desired, UpdateMode::Boot),
    }
}

/// What the release and the container ask for, before backoff and termination hold it back.
/// On a fleet nothing is reported stale: the host reads the parameter at boot only (see
/// `Supervisor::poll_due`), so what it last read says nothing about what it should run now;
/// ctl's instructions do, and `ctl status` compares the hosts with the parameter.
fn wanted(s: &Situation<'_>) -> Action {
    let (followed, mode) = followed(s);
    match wanted_of(s, followed, mode) {
        Action::Stale if s.fleet => Action::Keep,
        action => action,
    }
}

fn wanted_of(s: &Situation<'_>, desired: Option<&Release>, mode: UpdateMode) -> Action {
    let desired = match desired {
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
        (Some(d), Some(c)) => match (mode, c.running, s.at_start) {
            // At start with nothing serving, the boot release is applied in either mode.
            (_, false, true) => Action::Deploy(d.clone()),
            (UpdateMode::Follow, true, _) => Action::Replace(d.clone()),
            (UpdateMode::Follow, false, false) => Action::Deploy(d.clone()),
            (UpdateMode::Boot, true, _) => Action::Stale,
            (UpdateMode::Boot, false, false) => Action::Restart,
        },
    }
}

/// What a pull instruction needs (all pure inputs of [`pull_wanted`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PullSituation<'a> {
    /// The rollout's pull instruction (`skiff:pull`).
    pub pull: Option<&'a Release>,
    /// The value last answered as pulled.
    pub pulled: Option<&'a Release>,
    /// A release that failed here: it is not pulled again.
    pub failed: Option<&'a Release>,
    /// A failed pull (or answer) waits on its backoff.
    pub waiting: bool,
    pub terminating: bool,
}

/// The release to pull now, if any: the instruction, until it was answered with exactly its
/// value (ctl compares the tag values), unless it failed here or the host is held back.
pub fn pull_wanted(s: &PullSituation<'_>) -> Option<Release> {
    let p = s.pull?;
    let answered = s
        .pulled
        .is_some_and(|a| a.tag == p.tag && a.digest == p.digest);
    let failed = s.failed.is_some_and(|f| f.same_version(p));
    (!answered && !failed && !s.waiting && !s.terminating).then(|| p.clone())
}

/// Whether new instructions make the host forget that `failed` failed here: the protocol's
/// rule, kept in the contract crate so ctl and the agent read it in one place.
pub use skiff_release::instance_tags::forgets_failure;

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
    /// A handover's hold: the old container still runs behind the new one and gets the port
    /// back within a few hundred milliseconds if the new one fails.
    pub holding: bool,
}

pub fn health_status(h: HealthInputs) -> HealthStatus {
    if h.draining {
        HealthStatus::Draining
    } else if h.has_container && h.container_running && h.app_ok {
        HealthStatus::Healthy
    } else if h.holding {
        // The prober may see the new container fail before the hold's own probes flip back:
        // the host still serves (the old container takes the port back), so the load balancer
        // is not told otherwise for those few hundred milliseconds.
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
mod tests;
