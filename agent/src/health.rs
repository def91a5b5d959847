//! The health endpoint the load balancer checks, and the app prober behind it.
//!
//! The loop publishes a [`Snapshot`] on a `watch` channel; the HTTP handlers only read it, and the
//! prober updates the app's health in it once per interval, whatever the request rate. With
//! `app.detail_path` the prober also fetches the app's detail (readiness) page and shows it in
//! `/status`; it never decides `/healthz`, so a database blip the app reports there does not take
//! the host out of the load balancer.

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

/// One fetched page: status, body (bounded) and whether the body was cut; or why it failed.
pub type Fetched = Result<(u16, Vec<u8>, bool), String>;

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
            running: None,
            previous: None,
            failed_release: None,
            stale: false,
            draining: false,
            starting: false,
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

/// Fetch `GET path` on `addr`: the status and at most `max_body` bytes of the body (and whether
/// there was more). HTTP/1.0, one connection, bounded by `timeout`.
pub async fn fetch(addr: SocketAddr, path: &str, timeout: Duration, max_body: usize) -> Fetched {
    /// Room for the status line and headers before the body.
    const MAX_HEAD: usize = 8192;
    let attempt = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: skiff-agent\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let limit = MAX_HEAD + max_body + 1;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        while buf.len() < limit {
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let head_end = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| "no complete HTTP header in the answer".to_owned())?;
        let code = parse_status(&buf[..head_end.min(32)])?;
        let mut body = buf.split_off(head_end + 4);
        let truncated = body.len() > max_body;
        body.truncate(max_body);
        Ok((code, body, truncated))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| format!("no answer within {}ms", timeout.as_millis()))?
}

/// The detail shown in `/status` for one fetch: JSON bodies as JSON, others as text.
pub fn detail_of(path: &str, fetched: Fetched) -> AppDetail {
    match fetched {
        Ok((code, body, truncated)) => {
            let body = if body.is_empty() {
                None
            } else if let Some(v) = (!truncated)
                .then(|| serde_json::from_slice::<serde_json::Value>(&body).ok())
                .flatten()
            {
                Some(v)
            } else {
                Some(serde_json::Value::String(
                    String::from_utf8_lossy(&body).into_owned(),
                ))
            };
            AppDetail {
                path: path.to_owned(),
                status: Some(code),
                body,
                truncated,
                error: None,
            }
        }
        Err(e) => AppDetail {
            path: path.to_owned(),
            status: None,
            body: None,
            truncated: false,
            error: Some(e),
        },
    }
}

pub fn is_success(code: u16) -> bool {
    (200..300).contains(&code)
}

/// Probe the app once per `interval` while a container runs, and publish the result; with a
/// `detail_path`, fetch that page alongside and publish it as [`Snapshot::app_detail`].
pub async fn run_prober(
    state: Arc<watch::Sender<Snapshot>>,
    addr: SocketAddr,
    path: String,
    detail_path: Option<String>,
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
        let limit = interval.min(Duration::from_secs(5));
        let detail = async {
            match &detail_path {
                Some(p) => Some(detail_of(p, fetch(addr, p, limit, DETAIL_MAX_BYTES).await)),
                None => None,
            }
        };
        let (result, detail) = tokio::join!(probe(addr, &path, limit), detail);
        state.send_modify(|s| {
            if let Some(d) = detail {
                if s.app_detail.as_ref().and_then(|o| o.status) != d.status {
                    tracing::info!(path = %d.path, status = ?d.status, "app detail status changed");
                }
                s.app_detail = Some(d);
            }
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

    #[test]
    fn details() {
        let ok = |code: u16, body: &str, truncated: bool| {
            Ok((code, body.as_bytes().to_vec(), truncated))
        };
        let table: Vec<(Fetched, serde_json::Value)> = vec![
            (
                ok(
                    503,
                    r#"{"status":"unready","reason":"database: connection refused"}"#,
                    false,
                ),
                serde_json::json!({"path": "/ready", "status": 503, "truncated": false, "error": null,
                    "body": {"status": "unready", "reason": "database: connection refused"}}),
            ),
            (
                ok(200, "ready\n", false),
                serde_json::json!({"path": "/ready", "status": 200, "truncated": false, "error": null, "body": "ready\n"}),
            ),
            (
                ok(200, r#"{"cut": "here"#, true),
                serde_json::json!({"path": "/ready", "status": 200, "truncated": true, "error": null, "body": "{\"cut\": \"here"}),
            ),
            (
                ok(204, "", false),
                serde_json::json!({"path": "/ready", "status": 204, "truncated": false, "error": null, "body": null}),
            ),
            (
                Err("connect 127.0.0.1:1: refused".into()),
                serde_json::json!({"path": "/ready", "status": null, "truncated": false, "body": null,
                    "error": "connect 127.0.0.1:1: refused"}),
            ),
        ];
        for (fetched, want) in table {
            let got = serde_json::to_value(detail_of("/ready", fetched.clone())).expect("json");
            assert_eq!(got, want, "{fetched:?}");
        }
    }

    /// A one-shot HTTP server answering `answer` to the first request.
    async fn answer_once(answer: Vec<u8>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = sock.read(&mut buf).await;
                let _ = sock.write_all(&answer).await;
                let _ = sock.shutdown().await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn fetch_keeps_a_bounded_body() {
        let big = "x".repeat(100_000);
        let addr = answer_once(
            format!("HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\n{big}")
                .into_bytes(),
        )
        .await;
        let (code, body, truncated) = fetch(addr, "/ready", Duration::from_secs(2), 100)
            .await
            .expect("fetch");
        assert_eq!((code, body.len(), truncated), (503, 100, true));

        let addr = answer_once(b"HTTP/1.0 200 OK\r\n\r\n{\"ok\":true}".to_vec()).await;
        assert_eq!(
            fetch(addr, "/ready", Duration::from_secs(2), 100).await,
            Ok((200, b"{\"ok\":true}".to_vec(), false))
        );
        let addr = answer_once(b"garbage".to_vec()).await;
        assert!(
            fetch(addr, "/ready", Duration::from_secs(2), 100)
                .await
                .is_err()
        );
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
