//! The agent's state as the loop publishes it: what `/healthz` and `/status` read (through a
//! `watch` channel) and what the prober updates. Derived from the loop's own state at each step;
//! never holds environment values.

use serde::Serialize;
use skiff_release::Release;

use crate::config::UpdateMode;
use crate::fleet::Instructions;
use crate::reconcile::{HealthInputs, HealthStatus, health_status};

/// What the agent knows, as published by the loop. Never holds environment values.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub source: String,
    pub update: UpdateMode,
    /// The release the source names.
    pub desired: Option<Release>,
    /// Releases are coordinated by the fleet (an Auto Scaling group): the source applies at
    /// boot only, a running host swaps for its target.
    pub coordinated: bool,
    /// What the fleet's rollout last asked of this host (instance tags `skiff:target`,
    /// `skiff:pull`).
    pub instructions: Instructions,
    /// The pull instruction last answered (`skiff:pulled`).
    pub pulled: Option<Release>,
    pub running: Option<Running>,
    /// The release that ran before the current one (kept on the host for rollback).
    pub previous: Option<Release>,
    /// The last release that failed to become healthy here.
    pub failed_release: Option<Release>,
    /// `boot` mode off a fleet: the desired release differs from the running one (a fleet host
    /// reads the parameter at boot only and is never stale).
    pub stale: bool,
    pub draining: bool,
    /// A deploy is in progress with nothing serving before it.
    pub starting: bool,
    /// A handover's hold: the old container runs behind the new one (see `HealthInputs`).
    pub holding: bool,
    /// The release could not be started and nothing else runs.
    pub failed: bool,
    pub app: AppHealth,
    /// The app's detail page as last fetched (`app.detail_path`): shown, never judged.
    pub app_detail: Option<AppDetail>,
    pub last_error: Option<String>,
    pub restart_count: u32,
    pub timings: Timings,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Running {
    pub release: Release,
    pub container_id: String,
    pub container_running: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AppHealth {
    /// The app's own health check passed at the last probe.
    pub ok: bool,
    /// Probes made since the agent started: grows once per interval, not per request.
    pub probes: u64,
    pub last_result: Option<String>,
}

/// What the app's detail page said at the last fetch.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AppDetail {
    pub path: String,
    /// HTTP status; `None` when the app did not answer.
    pub status: Option<u16>,
    /// The body: JSON when it parses as JSON, else text; at most [`DETAIL_MAX_BYTES`].
    pub body: Option<serde_json::Value>,
    /// The body was longer than [`DETAIL_MAX_BYTES`] and is cut.
    pub truncated: bool,
    /// Why there is no answer (connection refused, timeout).
    pub error: Option<String>,
}

/// Longest detail body kept in the snapshot: `/status` stays small whatever the app sends.
pub const DETAIL_MAX_BYTES: usize = 2048;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub pull_ms: Option<u64>,
    pub start_to_healthy_ms: Option<u64>,
}

impl Snapshot {
    pub fn new(source: String, update: UpdateMode) -> Self {
        Snapshot {
            source,
            update,
            desired: None,
            coordinated: false,
            instructions: Instructions::default(),
            pulled: None,
            running: None,
            previous: None,
            failed_release: None,
            stale: false,
            draining: false,
            starting: false,
            holding: false,
            failed: false,
            app: AppHealth::default(),
            app_detail: None,
            last_error: None,
            restart_count: 0,
            timings: Timings::default(),
        }
    }

    pub fn status(&self) -> HealthStatus {
        health_status(HealthInputs {
            has_container: self.running.is_some(),
            container_running: self.running.as_ref().is_some_and(|r| r.container_running),
            app_ok: self.app.ok,
            draining: self.draining,
            starting: self.starting,
            failed: self.failed,
            has_release: self.desired.is_some(),
            holding: self.holding,
        })
    }
}
