//! The agent's Prometheus metrics, served as `/metrics` on the health port.
//!
//! Two kinds of figures: what the loop *is* (the running release, the health state, the
//! restart count) is read from the published [`Snapshot`] at each scrape, so it is kept once;
//! what the loop *did* (swaps, rollbacks, drains, errors, durations) is counted by the loop and
//! the prober through a shared [`Metrics`] handle as it happens. Encoding goes into one buffer
//! kept between scrapes; a scrape allocates only what `prometheus-client`'s encoder does and
//! the response body.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::sync::Arc;
use tokio::sync::watch;

use crate::reconcile::HealthStatus;
use crate::source::SourceError;
use crate::state::Snapshot;

/// The Prometheus text exposition format, version 0.0.4
/// (https://prometheus.io/docs/instrumenting/exposition_formats/).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Every metric name starts with this (`skiff_agent_...`).
pub const PREFIX: &str = "skiff_agent";

/// Every state `/healthz` can report, as the `state` label of `skiff_agent_health_state`.
const STATES: [(HealthStatus, &str); 6] = [
    (HealthStatus::Healthy, "healthy"),
    (HealthStatus::Starting, "starting"),
    (HealthStatus::Unhealthy, "unhealthy"),
    (HealthStatus::Draining, "draining"),
    (HealthStatus::NoRelease, "no-release"),
    (HealthStatus::Failed, "failed"),
];

/// Whether a release was brought up on a host where nothing served (`start`: the first
/// release at boot, or after a failure) or replaced one that did (`update`: in place).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapKind {
    Start,
    Update,
}

/// How an attempt to bring up a release ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapOutcome {
    /// Healthy within `start_timeout`: it serves now.
    Promoted,
    /// It failed its health gate and the previous release serves again.
    RolledBack,
    /// It failed and nothing healthy serves (no previous release, or it did not come back).
    Failed,
    /// The old container could not be stopped: the new one was never started.
    Aborted,
    /// The image could not be pulled or the container created (retried with backoff).
    NotPrepared,
}

/// Why the host drained (reported `draining` to the load balancer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainReason {
    Update,
    Termination,
}

/// Why a periodic app probe failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeFailure {
    /// The app answered with a status other than 2xx.
    Status,
    /// No answer: connection refused, reset or timed out.
    NoAnswer,
}

/// An instruction of a coordinated rollout the host carried out (see `fleet::Instructions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstructionKind {
    /// A swap to `skiff:target` started.
    Target,
    /// A `skiff:pull` pulled and answered.
    Pull,
}

impl InstructionKind {
    const ALL: [InstructionKind; 2] = [InstructionKind::Target, InstructionKind::Pull];

    fn as_str(self) -> &'static str {
        match self {
            InstructionKind::Target => "target",
            InstructionKind::Pull => "pull",
        }
    }
}

/// What went wrong talking to the fleet (EC2 / Auto Scaling / instance metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetErrorKind {
    Metadata,
    Tag,
    Group,
    LifecycleHook,
    TimedOut,
}

impl SwapKind {
    const ALL: [SwapKind; 2] = [SwapKind::Start, SwapKind::Update];

    fn as_str(self) -> &'static str {
        match self {
            SwapKind::Start => "start",
            SwapKind::Update => "update",
        }
    }
}

impl SwapOutcome {
    const ALL: [SwapOutcome; 5] = [
        SwapOutcome::Promoted,
        SwapOutcome::RolledBack,
        SwapOutcome::Failed,
        SwapOutcome::Aborted,
        SwapOutcome::NotPrepared,
    ];

    fn as_str(self) -> &'static str {
        match self {
            SwapOutcome::Promoted => "promoted",
            SwapOutcome::RolledBack => "rolled_back",
            SwapOutcome::Failed => "failed",
            SwapOutcome::Aborted => "aborted",
            SwapOutcome::NotPrepared => "not_prepared",
        }
    }
}

impl DrainReason {
    const ALL: [DrainReason; 2] = [DrainReason::Update, DrainReason::Termination];

    fn as_str(self) -> &'static str {
        match self {
            DrainReason::Update => "update",
            DrainReason::Termination => "termination",
        }
    }
}

impl ProbeFailure {
    const ALL: [ProbeFailure; 2] = [ProbeFailure::Status, ProbeFailure::NoAnswer];

    fn as_str(self) -> &'static str {
        match self {
            ProbeFailure::Status => "status",
            ProbeFailure::NoAnswer => "no_answer",
        }
    }
}

impl FleetErrorKind {
    const ALL: [FleetErrorKind; 5] = [
        FleetErrorKind::Metadata,
        FleetErrorKind::Tag,
        FleetErrorKind::Group,
        FleetErrorKind::LifecycleHook,
        FleetErrorKind::TimedOut,
    ];

    fn as_str(self) -> &'static str {
        match self {
            FleetErrorKind::Metadata => "metadata",
            FleetErrorKind::Tag => "tag",
            FleetErrorKind::Group => "group",
            FleetErrorKind::LifecycleHook => "lifecycle_hook",
            FleetErrorKind::TimedOut => "timed_out",
        }
    }
}

/// The `kind` label of a release-source error.
pub fn source_error_kind(e: &SourceError) -> &'static str {
    match e {
        SourceError::Missing { .. } => "missing",
        SourceError::Unreachable { .. } => "unreachable",
        SourceError::Denied { .. } => "denied",
        SourceError::Read { .. } => "read",
        SourceError::Unsupported { .. } => "unsupported",
        SourceError::Rejected { .. } => INVALID_VALUE,
    }
}

/// The `kind` label of a release value the source returned but the contract rejected.
pub const INVALID_VALUE: &str = "invalid_value";

/// Every `kind` of `skiff_agent_source_errors_total`.
const SOURCE_ERROR_KINDS: [&str; 6] = [
    "missing",
    "unreachable",
    "denied",
    "read",
    "unsupported",
    INVALID_VALUE,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReleaseLabels {
    tag: String,
    digest: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SwapLabels {
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// The agent's metrics: cheap to clone behind an `Arc` and to update from any task.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    release: Family<ReleaseLabels, Gauge>,
    health_state: Family<StateLabels, Gauge>,
    restarts: Counter,
    swaps: Family<SwapLabels, Counter>,
    rollbacks: Family<OutcomeLabels, Counter>,
    probe_duration: Histogram,
    probe_failures: Family<ReasonLabels, Counter>,
    pull_duration: Histogram,
    start_to_healthy: Histogram,
    drains: Family<ReasonLabels, Counter>,
    source_errors: Family<KindLabels, Counter>,
    fleet_errors: Family<KindLabels, Counter>,
    instructions: Family<KindLabels, Counter>,
    signature_checks: Family<ResultLabels, Counter>,
    last_poll: Gauge<f64, AtomicU64>,
    /// The scrape buffer (kept between scrapes) and the release the info metric names now;
    /// one lock, so two scrapes never interleave their updates.
    scrape: Mutex<Scrape>,
}

#[derive(Debug, Default)]
struct Scrape {
    buffer: String,
    release: Option<ReleaseLabels>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let release = Family::<ReleaseLabels, Gauge>::default();
        registry.register(
            "release_info",
            "The release the app container runs (1), by image tag and digest",
            release.clone(),
        );
        let health_state = Family::<StateLabels, Gauge>::default();
        for (_, state) in STATES {
            health_state.get_or_create(&StateLabels { state }).set(0);
        }
        registry.register(
            "health_state",
            "What /healthz reports: 1 for the current state, 0 for the others",
            health_state.clone(),
        );
        let restarts = Counter::default();
        registry.register(
            "restarts",
            "Restarts of the app container after it exited",
            restarts.clone(),
        );
        let swaps = Family::<SwapLabels, Counter>::default();
        registry.register(
            "swaps",
            "Releases brought up in a new container, by kind (start: nothing served before; update: in place) and outcome",
            swaps.clone(),
        );
        let rollbacks = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "rollbacks",
            "Rollbacks to the previous release after a failed one, by outcome (succeeded: it serves again)",
            rollbacks.clone(),
        );
        // 1 ms .. ~4 s: a local HTTP answer, up to the probe's own timeout.
        let probe_duration = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ]);
        registry.register_with_unit(
            "app_probe_duration",
            "Duration of the periodic probes of the app's health path",
            Unit::Seconds,
            probe_duration.clone(),
        );
        let probe_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "app_probe_failures",
            "Periodic app probes that failed, by reason (status: not 2xx; no_answer: refused or timed out)",
            probe_failures.clone(),
        );
        // 10 ms (image present) .. 10 min (a large image on a slow link).
        let pull_duration = Histogram::new([
            0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
        ]);
        registry.register_with_unit(
            "pull_duration",
            "Duration of preparing a release's image (pull, or finding it present)",
            Unit::Seconds,
            pull_duration.clone(),
        );
        let start_to_healthy = Histogram::new([
            0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
        ]);
        registry.register_with_unit(
            "start_to_healthy",
            "Time from starting a release's container to its first healthy probe",
            Unit::Seconds,
            start_to_healthy.clone(),
        );
        let drains = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "drains",
            "Times the host reported draining, by reason (update, termination)",
            drains.clone(),
        );
        let source_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "source_errors",
            "Failed reads of the release source (parameter or file), by kind",
            source_errors.clone(),
        );
        let fleet_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "fleet_errors",
            "Failed calls to instance metadata, EC2 and Auto Scaling, by kind",
            fleet_errors.clone(),
        );
        let instructions = Family::<KindLabels, Counter>::default();
        registry.register(
            "instructions",
            "Instructions of a coordinated rollout carried out, by kind (target: a swap started; pull: pulled and answered)",
            instructions.clone(),
        );
        let signature_checks = Family::<ResultLabels, Counter>::default();
        registry.register(
            "signature_checks",
            "Signature verifications of a digest before a container is created or adopted, by result (verified, refused, unreachable: asked the registry; verified_recalled, refused_recalled: answered from what this host remembers, no registry read; keys_unreadable: the key source is empty, unreadable or malformed, every new release is refused)",
            signature_checks.clone(),
        );
        let last_poll = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "last_poll_success_timestamp_seconds",
            "Unix time of the last successful read of the release source",
            last_poll.clone(),
        );
        // Every known label set starts at 0: a series that appears only with its first event
        // hides that event from rate() and increase(), and alerts on it never fire.
        for kind in SwapKind::ALL {
            for outcome in SwapOutcome::ALL {
                swaps.get_or_create_owned(&SwapLabels {
                    kind: kind.as_str(),
                    outcome: outcome.as_str(),
                });
            }
        }
        for outcome in ["succeeded", "failed"] {
            rollbacks.get_or_create_owned(&OutcomeLabels { outcome });
        }
        for f in ProbeFailure::ALL {
            probe_failures.get_or_create_owned(&ReasonLabels { reason: f.as_str() });
        }
        for r in DrainReason::ALL {
            drains.get_or_create_owned(&ReasonLabels { reason: r.as_str() });
        }
        for kind in SOURCE_ERROR_KINDS {
            source_errors.get_or_create_owned(&KindLabels { kind });
        }
        for k in FleetErrorKind::ALL {
            fleet_errors.get_or_create_owned(&KindLabels { kind: k.as_str() });
        }
        for k in InstructionKind::ALL {
            instructions.get_or_create_owned(&KindLabels { kind: k.as_str() });
        }
        for result in crate::trust::RESULTS {
            signature_checks.get_or_create_owned(&ResultLabels { result });
        }
        Metrics {
            registry,
            release,
            health_state,
            restarts,
            swaps,
            rollbacks,
            probe_duration,
            probe_failures,
            pull_duration,
            start_to_healthy,
            drains,
            source_errors,
            fleet_errors,
            instructions,
            signature_checks,
            last_poll,
            scrape: Mutex::new(Scrape {
                buffer: String::with_capacity(8 * 1024),
                release: None,
            }),
        }
    }

    pub fn swap(&self, kind: SwapKind, outcome: SwapOutcome) {
        self.swaps
            .get_or_create(&SwapLabels {
                kind: kind.as_str(),
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// A rollback to the previous release: `succeeded` when it is healthy again.
    pub fn rollback(&self, succeeded: bool) {
        let outcome = if succeeded { "succeeded" } else { "failed" };
        self.rollbacks
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// One periodic probe of the app: how long it took and, when it failed, why.
    pub fn probe(&self, took: Duration, failure: Option<ProbeFailure>) {
        self.probe_duration.observe(took.as_secs_f64());
        if let Some(f) = failure {
            self.probe_failures
                .get_or_create(&ReasonLabels { reason: f.as_str() })
                .inc();
        }
    }

    pub fn pulled(&self, took: Duration) {
        self.pull_duration.observe(took.as_secs_f64());
    }

    pub fn healthy_after(&self, took: Duration) {
        self.start_to_healthy.observe(took.as_secs_f64());
    }

    pub fn drain(&self, reason: DrainReason) {
        self.drains
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// A failed read of the release source; `kind` from [`source_error_kind`] or
    /// [`INVALID_VALUE`].
    pub fn source_error(&self, kind: &'static str) {
        self.source_errors.get_or_create(&KindLabels { kind }).inc();
    }

    pub fn fleet_error(&self, kind: FleetErrorKind) {
        self.fleet_errors
            .get_or_create(&KindLabels {
                kind: kind.as_str(),
            })
            .inc();
    }

    pub fn instruction(&self, kind: InstructionKind) {
        self.instructions
            .get_or_create(&KindLabels {
                kind: kind.as_str(),
            })
            .inc();
    }

    /// A signature verification ended with `result` (one of [`crate::trust::RESULTS`]).
    pub fn signature_check(&self, result: &'static str) {
        self.signature_checks
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// The release source answered (now).
    pub fn polled(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        // Whole milliseconds: the float prints short and exact enough.
        self.last_poll.set(now.as_millis() as f64 / 1000.0);
    }

    /// Bring the snapshot-derived metrics up to date and encode everything into the kept
    /// buffer; `write` gets the text.
    pub fn encode<T>(&self, snap: &Snapshot, write: impl FnOnce(&str) -> T) -> T {
        let mut scrape = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        let status = snap.status();
        for (s, state) in STATES {
            self.health_state
                .get_or_create(&StateLabels { state })
                .set(i64::from(s == status));
        }
        // Compared in place: labels are built only when the release changed, not per scrape.
        let unchanged = match (&scrape.release, snap.running.as_ref()) {
            (Some(l), Some(r)) => l.tag == r.release.tag.as_str() && l.digest == digest_of(r),
            (None, None) => true,
            _ => false,
        };
        if !unchanged {
            let running = snap.running.as_ref().map(|r| ReleaseLabels {
                tag: r.release.tag.as_str().to_owned(),
                digest: digest_of(r).to_owned(),
            });
            // The new series first, then the old one goes: a scrape never sees neither.
            if let Some(r) = &running {
                self.release.get_or_create(r).set(1);
            }
            if let Some(old) = scrape.release.take() {
                self.release.remove(&old);
            }
            scrape.release = running;
        }
        self.restarts
            .inner()
            .store(u64::from(snap.restart_count), Ordering::Relaxed);
        let Scrape { buffer, .. } = &mut *scrape;
        buffer.clear();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut *buffer, &self.registry)
        {
            // Writing into a String cannot fail; say so rather than serve half a page.
            buffer.clear();
            tracing::error!(error = %e, "cannot encode the metrics");
        }
        write(buffer)
    }
}

/// The `digest` label of a running release: empty when it is not pinned.
fn digest_of(r: &crate::state::Running) -> &str {
    r.release.digest.as_ref().map_or("", |d| d.as_str())
}

#[derive(Clone)]
struct MetricsState {
    snapshot: watch::Receiver<Snapshot>,
    metrics: Arc<Metrics>,
}

async fn metrics(State(state): State<MetricsState>) -> Response {
    // Held only while encoding (no await), as `/healthz` holds it while serialising.
    let snap = state.snapshot.borrow();
    let body = state.metrics.encode(&snap, str::to_owned);
    drop(snap);
    if body.is_empty() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

/// `/metrics`, to be merged into the health server's router.
pub fn router(snapshot: watch::Receiver<Snapshot>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(self::metrics))
        .with_state(MetricsState { snapshot, metrics })
}

#[cfg(test)]
mod tests;
