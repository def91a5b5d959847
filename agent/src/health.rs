//! The health endpoint the load balancer checks, and the app prober behind it.
//!
//! The loop publishes a [`Snapshot`] on a `watch` channel; the HTTP handlers only read it, and the
//! prober updates the app's health in it once per interval, whatever the request rate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde::Serialize;
use skiff_release::Release;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::UpdateMode;
use crate::reconcile::{HealthInputs, HealthStatus, health_status};

/// What the agent knows, as published by the loop. Never holds environment values.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub source: String,
    pub update: UpdateMode,
    /// The release the source names.
    pub desired: Option<Release>,
    pub running: Option<Running>,
    /// The release that ran before the current one (kept on the host for rollback).
    pub previous: Option<Release>,
    /// The last release that failed to become healthy here.
    pub failed_release: Option<Release>,
    /// `boot` mode: the desired release differs from the running one.
    pub stale: bool,
    pub draining: bool,
    /// A deploy is in progress with nothing serving before it.
    pub starting: bool,
    /// The release could not be started and nothing else runs.
    pub failed: bool,
    pub app: AppHealth,
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
            running: None,
            previous: None,
            failed_release: None,
            stale: false,
            draining: false,
            starting: false,
            failed: false,
            app: AppHealth::default(),
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
        })
    }
}

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

/// Serve until cancelled.
pub async fn serve(
    listener: TcpListener,
    state: watch::Receiver<Snapshot>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}

/// Probe the app once: `GET path` on `addr`, healthy on a 2xx status. Hand-written HTTP/1.0 so
/// the probe costs one connection and a few bytes.
pub async fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> Result<u16, String> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: skiff-agent\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut head = [0u8; 32];
        let mut got = 0;
        while got < 12 {
            let n = stream
                .read(&mut head[got..])
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            got += n;
        }
        parse_status(&head[..got])
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| format!("no answer within {}ms", timeout.as_millis()))?
}

fn parse_status(head: &[u8]) -> Result<u16, String> {
    let text = std::str::from_utf8(head).map_err(|_| "not an HTTP answer".to_owned())?;
    let mut parts = text.split(' ');
    match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => code
            .get(..3)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("bad status line {text:?}")),
        _ => Err(format!("not an HTTP answer: {text:?}")),
    }
}

pub fn is_success(code: u16) -> bool {
    (200..300).contains(&code)
}

/// Probe the app once per `interval` while a container runs, and publish the result.
pub async fn run_prober(
    state: Arc<watch::Sender<Snapshot>>,
    addr: SocketAddr,
    path: String,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let has_container = state.borrow().running.is_some();
        if !has_container {
            continue;
        }
        let result = probe(addr, &path, interval.min(Duration::from_secs(5))).await;
        state.send_modify(|s| {
            let ok = matches!(result, Ok(c) if is_success(c));
            if ok != s.app.ok {
                match &result {
                    Ok(code) => tracing::info!(healthy = ok, code, "app health changed"),
                    Err(e) => tracing::info!(healthy = ok, error = %e, "app health changed"),
                }
            }
            s.app.ok = ok;
            s.app.probes += 1;
            s.app.last_result = Some(match &result {
                Ok(code) => format!("HTTP {code}"),
                Err(e) => e.clone(),
            });
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        let table: &[(&[u8], Option<u16>)] = &[
            (b"HTTP/1.0 200 OK\r\n", Some(200)),
            (b"HTTP/1.1 503 Service Unavailable", Some(503)),
            (b"HTTP/1.1 404", Some(404)),
            (b"SSH-2.0-OpenSSH", None),
            (b"", None),
            (b"HTTP/1.1 2x0 OK", None),
        ];
        for (head, want) in table {
            assert_eq!(
                parse_status(head).ok(),
                *want,
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[tokio::test]
    async fn handlers_read_the_snapshot() {
        let (tx, rx) = watch::channel(Snapshot::new("file:/x".into(), UpdateMode::Boot));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(listener, rx, cancel.clone()));

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
