//! The health endpoint the load balancer checks: `/healthz` and `/status`, answered from the
//! [`Snapshot`] the loop publishes on a `watch` channel (see `state`); the handlers never call
//! Docker or AWS. The prober behind `app.ok` lives in `probe`. With `app.detail_path` the prober
//! also fetches the app's detail (readiness) page and `/status` shows it; it never decides
//! `/healthz`, so a database blip the app reports there does not take the host out of the load
//! balancer. The same server answers `/metrics` (see `metrics`).

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::reconcile::HealthStatus;
use crate::state::Snapshot;

#[derive(Serialize)]
struct HealthBody<'a> {
    status: HealthStatus,
    tag: Option<&'a str>,
    digest: Option<&'a str>,
}

#[derive(Serialize)]
struct StatusBody<'a> {
    status: HealthStatus,
    #[serde(flatten)]
    snapshot: &'a Snapshot,
}

async fn healthz(State(state): State<watch::Receiver<Snapshot>>) -> Response {
    let snap = state.borrow();
    let status = snap.status();
    let release = snap
        .running
        .as_ref()
        .map(|r| &r.release)
        .or(snap.desired.as_ref());
    let body = HealthBody {
        status,
        tag: release.map(|r| r.tag.as_str()),
        digest: release.and_then(|r| r.digest.as_ref().map(|d| d.as_str())),
    };
    let code = if status.is_healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // Serialised once, straight from the snapshot, while the borrow is held.
    (code, Json(body)).into_response()
}

async fn status(State(state): State<watch::Receiver<Snapshot>>) -> Response {
    let snap = state.borrow();
    Json(StatusBody {
        status: snap.status(),
        snapshot: &snap,
    })
    .into_response()
}

pub fn router(state: watch::Receiver<Snapshot>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .with_state(state)
}

/// Serve until cancelled: `/healthz`, `/status` and the Prometheus `/metrics`.
pub async fn serve(
    listener: TcpListener,
    state: watch::Receiver<Snapshot>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let app = router(state.clone()).merge(crate::metrics::router(state, metrics));
    axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use skiff_release::Release;

    use super::*;
    use crate::config::UpdateMode;
    use crate::probe::{detail_of, fetch, probe};
    use crate::state::Running;

    #[tokio::test]
    async fn handlers_read_the_snapshot() {
        let (tx, rx) = watch::channel(Snapshot::new("file:/x".into(), UpdateMode::Boot));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cancel = CancellationToken::new();
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
        let server = tokio::spawn(serve(listener, rx, metrics, cancel.clone()));

        let code = probe(addr, "/healthz", Duration::from_secs(2))
            .await
            .expect("probe");
        assert_eq!(code, 503, "no release yet");

        tx.send_modify(|s| {
            s.desired = Some(Release::new("v1".parse().expect("tag"), None));
            s.running = Some(Running {
                release: Release::new("v1".parse().expect("tag"), None),
                container_id: "abc".into(),
                container_running: true,
            });
            s.app.ok = true;
        });
        assert_eq!(
            probe(addr, "/healthz", Duration::from_secs(2)).await,
            Ok(200)
        );
        // The app's detail page saying 503 (its database is down) is shown, not judged.
        tx.send_modify(|s| {
            s.app_detail = Some(detail_of(
                "/ready",
                Ok((503, br#"{"database":"down"}"#.to_vec(), false)),
            ))
        });
        assert_eq!(
            probe(addr, "/healthz", Duration::from_secs(2)).await,
            Ok(200)
        );
        let (code, body, _) = fetch(addr, "/status", Duration::from_secs(2), 8192)
            .await
            .expect("status");
        let status: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            (code, &status["status"]),
            (200, &serde_json::json!("healthy"))
        );
        assert_eq!(status["app_detail"]["status"], 503);
        assert_eq!(status["app_detail"]["body"]["database"], "down");
        tx.send_modify(|s| s.draining = true);
        assert_eq!(
            probe(addr, "/healthz", Duration::from_secs(2)).await,
            Ok(503)
        );
        assert_eq!(
            probe(addr, "/status", Duration::from_secs(2)).await,
            Ok(200)
        );
        assert_eq!(probe(addr, "/nope", Duration::from_secs(2)).await, Ok(404));
        cancel.cancel();
        server.await.expect("join").expect("serve");
    }
}
