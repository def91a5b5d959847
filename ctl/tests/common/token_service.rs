//! A token service for the registry on :5002 (`auth: token`, set up by `.ci/setup.sh`): it
//! answers the realm `http://127.0.0.1:5003/token` with a JWT signed (RS256, by `openssl`) with
//! the key whose certificate is the registry's `rootcertbundle`, carried in the `x5c` header.
//! Only `skiff`/`skiff-secret` gets a token, and only `pull` on the repository asked for.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const REALM_ADDR: &str = "127.0.0.1:5003";
pub const SERVICE: &str = "skiff-registry";
const ISSUER: &str = "skiff-test-token";

/// One request to the realm.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub query: HashMap<String, String>,
    /// Whether it carried the right credentials (and so got a token).
    pub granted: bool,
}

pub struct TokenService {
    seen: Arc<Mutex<Vec<TokenRequest>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Where setup.sh keeps the registry's token key and certificate.
fn key_dir() -> PathBuf {
    let home = std::env::var("SKIFF_CI_HOME").unwrap_or_else(|_| "/var/lib/skiff-ci".into());
    PathBuf::from(home).join("registry-5002")
}

impl TokenService {
    /// Serve the realm; waits (bounded) for another test run to free the fixed port.
    pub fn start() -> TokenService {
        let dir = key_dir();
        let key = dir.join("token.key");
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(dir.join("token.crt"))
            .output()
            .expect("run openssl");
        assert!(
            der.status.success() && key.exists(),
            "no token key in {}; run `bash .ci/setup.sh`",
            dir.display()
        );
        let signer = Signer {
            key,
            x5c: b64(&der.stdout, STD, true),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let listener = loop {
            match TcpListener::bind(REALM_ADDR) {
                Ok(l) => break l,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("cannot serve the token realm on {REALM_ADDR}: {e}"),
            }
        };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (sn, st) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    serve(conn, &signer, &sn);
                }
            }
        });
        TokenService {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    pub fn seen(&self) -> Vec<TokenRequest> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Drop for TokenService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(REALM_ADDR);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Signer {
    key: PathBuf,
    x5c: String,
}

impl Signer {
    fn token(&self, repository: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]});
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": "skiff",
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": format!("{}-{now}", std::process::id()),
            "access": [{"type": "repository", "name": repository, "actions": ["pull"]}],
        });
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes(), URL, false),
            b64(claims.to_string().as_bytes(), URL, false)
        );
        let mut child = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&self.key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run openssl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("openssl");
        assert!(out.status.success(), "openssl dgst -sign failed");
        format!("{input}.{}", b64(&out.stdout, URL, false))
    }
}

fn serve(conn: TcpStream, signer: &Signer, seen: &Mutex<Vec<TokenRequest>>) {
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return;
    }
    let mut authorization = None;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':')
            && k.eq_ignore_ascii_case("authorization")
        {
            authorization = Some(v.trim().to_owned());
        }
    }
    let target = request_line.split(' ').nth(1).unwrap_or_default();
    let query: HashMap<String, String> = target
        .split_once('?')
        .map(|(_, q)| q)
        .unwrap_or_default()
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (super::form_decode(k), super::form_decode(v)))
        .collect();
    let expected = format!("Basic {}", b64(b"skiff:skiff-secret", STD, true));
    let granted = authorization.as_deref() == Some(expected.as_str());
    let repository = query
        .get("scope")
        .and_then(|s| s.strip_prefix("repository:"))
        .and_then(|s| s.rsplit_once(':'))
        .map(|(name, _)| name.to_owned());
    seen.lock().expect("lock").push(TokenRequest {
        query: query.clone(),
        granted,
    });
    let (status, body) = match (granted, repository) {
        (true, Some(repo)) => {
            let token = signer.token(&repo);
            (
                "200 OK",
                serde_json::json!({"token": token, "access_token": token, "expires_in": 300})
                    .to_string(),
            )
        }
        (true, None) => ("400 Bad Request", r#"{"details":"no scope"}"#.to_owned()),
        (false, _) => (
            "401 Unauthorized",
            r#"{"details":"incorrect username or password"}"#.to_owned(),
        ),
    };
    let mut conn = conn;
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.flush();
}

const STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn b64(data: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(alphabet[((n >> (18 - 6 * i)) & 63) as usize]));
        }
        if pad {
            out.push_str(&"=".repeat(3 - chunk.len()));
        }
    }
    out
}
