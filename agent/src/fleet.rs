//! The fleet seam: what the fleet is told about this host (instance tag, lifecycle hooks) and
//! whether it is terminating the host. `AwsFleet` (in `autoscaling`) speaks EC2 and Auto
//! Scaling; local mode uses [`NoFleet`].

use std::future::Future;

use skiff_release::Release;

/// What the fleet is told about this host.
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
}

/// No fleet: local development, or a host outside any Auto Scaling Group.
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
