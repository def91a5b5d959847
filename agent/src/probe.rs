//! Probing the app: one bounded HTTP/1.0 request to its health path (and its detail page),
//! and the prober task that publishes the result into the [`Snapshot`] once per interval,
//! whatever the request rate on `/healthz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, ProbeFailure};
use crate::state::{AppDetail, DETAIL_MAX_BYTES, Snapshot};

/// One fetched page: status, body (bounded) and whether the body was cut; or why it failed.
pub type Fetched = Result<(u16, Vec<u8>, bool), String>;

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

/// Whether something accepts TCP connections on loopback `port` within a second (a slot
/// another process holds, before a container is started there).
pub async fn accepts(port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(("127.0.0.1", port))
        )
        .await,
        Ok(Ok(_))
    )
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
    metrics: Arc<Metrics>,
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
        let timed = async {
            let started = tokio::time::Instant::now();
            let result = probe(addr, &path, limit).await;
            (result, started.elapsed())
        };
        let ((result, took), detail) = tokio::join!(timed, detail);
        metrics.probe(
            took,
            match &result {
                Ok(code) if is_success(*code) => None,
                Ok(_) => Some(ProbeFailure::Status),
                Err(_) => Some(ProbeFailure::NoAnswer),
            },
        );
        state.send_modify(|s| {
            if let Some(d) = detail {
                if s.app_detail.as_ref().and_then(|o| o.status) != d.status {
                    tracing::info!(path = %d.path, status = d.status, "app detail status changed");
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
    use tokio::net::TcpListener;

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
}
