//! The fleet seam: what the fleet is told about this host (instance tags, lifecycle hooks),
//! whether it is terminating the host, and what a coordinated rollout (`ctl release --strategy
//! in-place`) asks of it. `AwsFleet` (in `autoscaling`) speaks EC2 and Auto Scaling; local mode
//! uses [`NoFleet`].

use std::future::Future;

use skiff_release::Release;

/// The protocol's instructions and answers live in the contract crate; the agent reads its
/// earlier answers once at start so a restarted agent neither repeats a pull nor retries a
/// release that failed here.
pub use skiff_release::instance_tags::{Answers, Instructions};

/// What the fleet is told about this host, and what it asks of it.
pub trait Fleet: Send + Sync + 'static {
    /// The release is running and healthy on this host.
    fn release_healthy(&self, release: &Release) -> impl Future<Output = ()> + Send;
    /// The release could not be started on this host and nothing else serves.
    fn release_failed(&self, release: &Release) -> impl Future<Output = ()> + Send;
    /// The fleet is terminating this host (e.g. a scale-in or an instance refresh).
    fn termination_pending(&self) -> impl Future<Output = bool> + Send;
    /// The host has drained for termination: let the termination proceed.
    fn drained(&self) -> impl Future<Output = ()> + Send;
    /// Retry fleet calls that failed for a transient reason (each call bounded); called once
    /// per loop turn.
    fn retry_pending(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// Whether releases on this host are coordinated by the fleet (an instance of an Auto
    /// Scaling group): the parameter then applies at boot only, and a running host swaps
    /// only when [`Fleet::instructions`] names a target.
    fn coordinated(&self) -> bool {
        false
    }
    /// The rollout's current instructions; read every loop turn, so it must be local and
    /// cheap. A read that fails is "no news": the last instructions seen stand.
    fn instructions(&self) -> impl Future<Output = Instructions> + Send {
        async { Instructions::default() }
    }
    /// This host's earlier answers (read once at start).
    fn answers(&self) -> impl Future<Output = Answers> + Send {
        async { Answers::default() }
    }
    /// Answer a pull instruction: `release` is on the host. False when the answer could not
    /// be delivered (the loop tries again later).
    fn pulled(&self, _release: &Release) -> impl Future<Output = bool> + Send {
        async { true }
    }
    /// Report that `release` failed here (its pull cannot succeed, or it failed the health
    /// gate and the host rolled back); `None` withdraws the report (the host forgot the
    /// failure: an instruction moved to another release). False when the report could not be
    /// delivered.
    fn failed(&self, _release: Option<&Release>) -> impl Future<Output = bool> + Send {
        async { true }
    }
}

/// No fleet: local development, or a host outside any Auto Scaling Group. No instructions;
/// the release source alone decides.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFleet;

impl Fleet for NoFleet {
    async fn release_healthy(&self, _release: &Release) {}
    async fn release_failed(&self, _release: &Release) {}
    async fn termination_pending(&self) -> bool {
        false
    }
    async fn drained(&self) {}
}
