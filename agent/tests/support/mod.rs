//! Over 600 lines: the fixtures every agent integration test shares (images, registry, agent
//! process, moto, a TCP proxy), kept together so each test file stays about its behaviour.
//!
//! Test fixtures for the agent's integration tests: versioned test images built offline and
//! pushed to the real local registry, the real `agent` binary with a config of the test's own,
//! and HTTP helpers. Every name is unique per test run, and everything a test made is removed
//! when its fixture drops, so leftovers of earlier runs can neither interfere nor accumulate.

#![allow(dead_code)]

pub use skiff_testkit::emulator::sdk_at;
pub use skiff_testkit::wait::wait_for;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const REGISTRY: &str = "127.0.0.1:5000";
/// The registry with basic auth, and its password for user `skiff` (see .ci/setup.sh).
pub const PRIVATE_REGISTRY: &str = "127.0.0.1:5001";
pub const PRIVATE_PASSWORD: &str = "skiff-secret";
pub const MOTO: &str = skiff_testkit::emulator::ENDPOINT;
pub const BASE_IMAGE: &str = "skiff-ci/busybox:1";

/// A name no earlier or concurrent run uses.
pub fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!(
        "skiff-it-{prefix}-{}-{:x}",
        std::process::id(),
        nanos & 0xffff_ffff
    )
}

/// A free port below the kernel's ephemeral range (so no outgoing connection can take it while
/// an app is about to bind it), never handed out twice in one test process.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = 20_000 + (rand_u32() % 12_000) as u16;
        if given.contains(&port) || TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        given.push(port);
        return port;
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_nanos(),
    );
    h.finish() as u32
}

/// Run a command, panic with its output when it fails.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub fn docker(args: &[&str]) -> String {
    sh(Command::new("docker").args(args))
}

/// Check the services the tests need, with a message that says how to get them.
pub fn require_services() {
    let ok = Command::new("docker")
        .args(["image", "inspect", BASE_IMAGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "docker engine or image {BASE_IMAGE} missing: run `bash .ci/setup.sh` (or `make test`) first"
    );
    assert!(
        http_get(REGISTRY, "/v2/").is_some(),
        "no registry on {REGISTRY}: run `bash .ci/setup.sh` first"
    );
}

/// One test's world: an app name, an image repository with versioned images, ports, a workdir.
pub struct Fixture {
    pub id: String,
    pub repo: String,
    pub app_port: u16,
    pub health_port: u16,
    pub dir: tempfile::TempDir,
    images: Vec<String>,
}

impl Fixture {
    pub fn new(prefix: &str) -> Fixture {
        require_services();
        let id = unique(prefix);
        let repo = format!("{REGISTRY}/{id}/app");
        Fixture {
            repo,
            app_port: free_port(),
            health_port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            images: Vec::new(),
            id,
        }
    }

    /// Build `repo:tag` (healthy unless `healthy` is false: no /health page then), push it,
    /// and return its registry digest.
    pub fn image(&mut self, tag: &str, healthy: bool) -> String {
        self.image_in(&self.repo.clone(), tag, healthy)
    }

    pub fn image_in(&mut self, repo: &str, tag: &str, healthy: bool) -> String {
        self.build(repo, tag, healthy, "exec httpd -f -p $PORT -h /www")
    }

    /// `repo:tag` (this test's repository), healthy, whose app is the shell line `cmd` (its
    /// port is `$PORT`; the pages are in /www); returns the registry digest.
    pub fn image_running(&mut self, tag: &str, cmd: &str) -> String {
        self.build(&self.repo.clone(), tag, true, cmd)
    }

    fn build(&mut self, repo: &str, tag: &str, healthy: bool, cmd: &str) -> String {
        let ctx = self.dir.path().join(format!("ctx-{tag}"));
        std::fs::create_dir_all(&ctx).expect("ctx");
        let health = if healthy {
            format!("echo ok-{tag} > /www/health && ")
        } else {
            String::new()
        };
        std::fs::write(
            ctx.join("Dockerfile"),
            format!(
                "FROM {BASE_IMAGE}\n\
                 RUN mkdir -p /www && {health}echo release-{tag} > /www/index.html\n\
                 CMD [\"/bin/sh\", \"-c\", \"{cmd}\"]\n"
            ),
        )
        .expect("dockerfile");
        let reference = format!("{repo}:{tag}");
        sh(Command::new("docker")
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "-t", &reference])
            .arg(&ctx));
        self.images.push(reference.clone());
        let out = docker(&["push", &reference]);
        out.split_whitespace()
            .find(|w| w.starts_with("sha256:"))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no digest in push output: {out}"))
    }

    /// Push `repo:tag` and remove the host's copy: only the registry has it, so the agent must
    /// pull it.
    pub fn registry_only(&mut self, repo: &str, tag: &str) -> String {
        let digest = self.image_in(repo, tag, true);
        docker(&["rmi", &format!("{repo}:{tag}")]);
        digest
    }

    /// `tag` in this test's repository on the basic-auth registry (:5001), only there; returns
    /// the repository. The docker client's login is undone at once.
    pub fn private_image(&mut self, tag: &str) -> String {
        let repo = format!("{PRIVATE_REGISTRY}/{}/app", self.id);
        docker(&[
            "login",
            PRIVATE_REGISTRY,
            "-u",
            "skiff",
            "-p",
            PRIVATE_PASSWORD,
        ]);
        self.image_in(&repo, tag, true);
        docker(&["logout", PRIVATE_REGISTRY]);
        docker(&["rmi", &format!("{repo}:{tag}")]);
        repo
    }

    pub fn release_file(&self) -> PathBuf {
        self.dir.path().join("release")
    }

    pub fn set_release(&self, value: &str) {
        // Write then rename, as an operator's editor would, so the agent never reads half a value.
        let tmp = self.dir.path().join("release.tmp");
        std::fs::write(&tmp, value).expect("write release");
        std::fs::rename(&tmp, self.release_file()).expect("rename release");
    }

    /// A config for the file source with fast test timings; `extra` is appended to [release].
    pub fn file_config(&self, update: &str, extra_app: &str) -> String {
        format!(
            r#"[app]
name = "{id}"
image = "{repo}"
port = {app_port}
health_path = "/health"
start_timeout = "5s"
stop_timeout = "2s"
env = {{ GREETING = "hello" }}
{extra_app}
[release]
source = "file"
file = "{file}"
poll_interval = "200ms"
update = "{update}"
drain = "1s"
[health]
listen = "127.0.0.1:{health_port}"
interval = "200ms"
"#,
            id = self.id,
            repo = self.repo,
            app_port = self.app_port,
            file = self.release_file().display(),
            health_port = self.health_port,
        )
    }

    pub fn write_config(&self, text: &str) -> PathBuf {
        let p = self.dir.path().join("agent.toml");
        std::fs::write(&p, text).expect("config");
        p
    }

    pub fn health_addr(&self) -> String {
        format!("127.0.0.1:{}", self.health_port)
    }

    pub fn healthz(&self) -> Option<(u16, serde_json::Value)> {
        http_get(&self.health_addr(), "/healthz")
            .map(|(code, body)| (code, serde_json::from_str(&body).unwrap_or_default()))
    }

    pub fn status(&self) -> serde_json::Value {
        let (_, body) = http_get(&self.health_addr(), "/status").expect("status reachable");
        serde_json::from_str(&body).expect("status json")
    }

    /// Wait until `/healthz` is 200 for `tag`.
    pub fn wait_healthy(&self, tag: &str, within: Duration) {
        wait_for(
            within,
            &format!("healthy on {tag}"),
            || matches!(self.healthz(), Some((200, ref b)) if b["tag"] == tag),
            || format!("{:#}", self.status_or_null()),
        );
    }

    pub fn status_or_null(&self) -> serde_json::Value {
        http_get(&self.health_addr(), "/status")
            .and_then(|(_, b)| serde_json::from_str(&b).ok())
            .unwrap_or_default()
    }

    /// Managed containers of this test: (id, running).
    pub fn containers(&self) -> Vec<(String, bool)> {
        let out = docker(&[
            "ps",
            "-a",
            "--no-trunc",
            "--filter",
            &format!("label=skiff.app={}", self.id),
            "--format",
            "{{.ID}} {{.State}}",
        ]);
        out.lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(id, state)| (id.to_owned(), state == "running"))
            .collect()
    }

    pub fn running_container(&self) -> String {
        let running: Vec<_> = self.containers().into_iter().filter(|(_, r)| *r).collect();
        assert_eq!(
            running.len(),
            1,
            "exactly one running container: {running:?}"
        );
        running[0].0.clone()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let ids = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=skiff.app={}", self.id),
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        for id in ids.split_whitespace() {
            let _ = Command::new("docker").args(["rm", "-f", id]).output();
        }
        for img in &self.images {
            let _ = Command::new("docker").args(["rmi", "-f", img]).output();
        }
        // Pulled-by-digest copies carry no tag: remove them by repository.
        let left = Command::new("docker")
            .args(["images", "-q", "--no-trunc", &self.repo])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        for img in left.split_whitespace() {
            let _ = Command::new("docker").args(["rmi", "-f", img]).output();
        }
    }
}

/// The real agent binary, its stderr kept in a file for inspection.
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(config: &Path, env: &[(&str, &str)]) -> Agent {
        let log = config.with_file_name(format!(
            "agent-{}.log",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock")
                .as_nanos()
        ));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_agent"))
            .args(["run", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn agent");
        Agent { child, log }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        sh(Command::new("kill").args(["-TERM", &self.child.id().to_string()]));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(Instant::now() < deadline, "agent did not stop on SIGTERM");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The ports the dnat rules of nftables table `ip <table>` send to, as nftables' own reader
/// (`nft -j`) shows them; empty without the table.
pub fn nft_dnat_ports(table: &str) -> Vec<u64> {
    let Ok(out) = Command::new("nft")
        .args(["-j", "list", "table", "ip", table])
        .output()
    else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["nftables"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|o| o.get("rule"))
        .flat_map(|r| r["expr"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e.get("dnat").and_then(|d| d["port"].as_u64()))
        .collect()
}

/// A blocking HTTP/1.0 GET: (status, body), or None when nothing answers.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_nodelay(true).ok()?;
    // One write: split writes meet delayed ACKs and cost 40 ms a request.
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// A TCP forwarder that can be cut: while down, open connections are shut and new ones are
/// accepted and dropped at once, which is how an unreachable service looks from the client's
/// side. The target is `host:port`, or `unix:/path` for a Unix socket (the Docker engine).
pub struct Proxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    open: Closers,
}

/// What shuts each open connection of a proxy.
type Closers = Arc<Mutex<Vec<Box<dyn Fn() + Send>>>>;

/// A byte stream the proxy can splice: TCP or Unix.
trait Duplex: Read + Write + Send + Sized + 'static {
    fn dup(&self) -> Self;
    fn close(&self, how: std::net::Shutdown);
}

impl Duplex for TcpStream {
    fn dup(&self) -> Self {
        self.try_clone().expect("clone")
    }
    fn close(&self, how: std::net::Shutdown) {
        let _ = self.shutdown(how);
    }
}

impl Duplex for std::os::unix::net::UnixStream {
    fn dup(&self) -> Self {
        self.try_clone().expect("clone")
    }
    fn close(&self, how: std::net::Shutdown) {
        let _ = self.shutdown(how);
    }
}

fn splice<B: Duplex>(client: TcpStream, server: B, open: &Closers) {
    let (c_kill, s_kill) = (client.dup(), server.dup());
    open.lock().expect("lock").push(Box::new(move || {
        c_kill.close(std::net::Shutdown::Both);
        s_kill.close(std::net::Shutdown::Both);
    }));
    let (mut c2, mut s2) = (client.dup(), server.dup());
    let (mut c1, mut s1) = (client, server);
    thread::spawn(move || {
        let _ = std::io::copy(&mut c1, &mut s1);
        s1.close(std::net::Shutdown::Write);
    });
    thread::spawn(move || {
        let _ = std::io::copy(&mut s2, &mut c2);
        c2.close(std::net::Shutdown::Write);
    });
}

impl Proxy {
    pub fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let up = Arc::new(AtomicBool::new(true));
        let open: Closers = Arc::new(Mutex::new(Vec::new()));
        let (flag, conns) = (up.clone(), open.clone());
        let target = target.to_owned();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                if !flag.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                if let Some(path) = target.strip_prefix("unix:") {
                    if let Ok(server) = std::os::unix::net::UnixStream::connect(path) {
                        splice(client, server, &conns);
                    }
                } else if let Ok(server) = TcpStream::connect(&target) {
                    splice(client, server, &conns);
                }
            }
        });
        Proxy { port, up, open }
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            for close in self.open.lock().expect("lock").drain(..) {
                close();
            }
        }
    }
}

/// aws-smithy-mocks rules for an SDK client (the SDK in use predates `mock_client!`'s test
/// defaults, so clients are assembled by the tests).
pub fn interceptor(
    mode: aws_smithy_mocks::RuleMode,
    rules: &[&aws_smithy_mocks::Rule],
) -> aws_smithy_mocks::MockResponseInterceptor {
    rules.iter().fold(
        aws_smithy_mocks::MockResponseInterceptor::new().rule_mode(mode),
        |i, r| i.with_rule(r),
    )
}

/// SSM and EC2 in the moto emulator, through the real AWS SDK.
pub struct Moto {
    rt: tokio::runtime::Runtime,
    pub ssm: aws_sdk_ssm::Client,
    pub ec2: aws_sdk_ec2::Client,
}

pub const AWS_ENV: [(&str, &str); 4] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

impl Moto {
    pub fn connect() -> Moto {
        assert!(
            http_get("127.0.0.1:5055", "/moto-api/").is_some(),
            "no moto server on {MOTO}: run `bash .ci/setup.sh` first"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let conf = rt.block_on(sdk_at(MOTO));
        Moto {
            ssm: aws_sdk_ssm::Client::new(&conf),
            ec2: aws_sdk_ec2::Client::new(&conf),
            rt,
        }
    }

    /// A new EC2 instance (terminate it with [`Moto::terminate`]).
    pub fn run_instance(&self) -> String {
        self.rt
            .block_on(skiff_testkit::emulator::run_instance(&self.ec2))
    }

    pub fn terminate(&self, instance: &str) {
        let _ = self
            .rt
            .block_on(self.ec2.terminate_instances().instance_ids(instance).send());
    }

    /// CreateTags `key=value` on `instance`, as ctl does.
    pub fn tag(&self, instance: &str, key: &str, value: &str) {
        self.rt
            .block_on(
                self.ec2
                    .create_tags()
                    .resources(instance)
                    .tags(
                        aws_sdk_ec2::types::Tag::builder()
                            .key(key)
                            .value(value)
                            .build(),
                    )
                    .send(),
            )
            .expect("create tags");
    }

    /// The instance's tags.
    pub fn tags(&self, instance: &str) -> std::collections::BTreeMap<String, String> {
        let out = self
            .rt
            .block_on(
                self.ec2
                    .describe_tags()
                    .filters(
                        aws_sdk_ec2::types::Filter::builder()
                            .name("resource-id")
                            .values(instance)
                            .build(),
                    )
                    .send(),
            )
            .expect("describe tags");
        out.tags()
            .iter()
            .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
            .collect()
    }

    pub fn put(&self, name: &str, value: &str, secure: bool) {
        let kind = if secure {
            aws_sdk_ssm::types::ParameterType::SecureString
        } else {
            aws_sdk_ssm::types::ParameterType::String
        };
        self.rt
            .block_on(
                self.ssm
                    .put_parameter()
                    .name(name)
                    .value(value)
                    .r#type(kind)
                    .overwrite(true)
                    .send(),
            )
            .expect("put parameter");
    }

    pub fn delete_path(&self, path: &str) {
        let out = self.rt.block_on(
            self.ssm
                .get_parameters_by_path()
                .path(path)
                .recursive(true)
                .send(),
        );
        if let Ok(out) = out {
            for p in out.parameters.unwrap_or_default() {
                if let Some(n) = p.name {
                    let _ = self.rt.block_on(self.ssm.delete_parameter().name(n).send());
                }
            }
        }
    }
}

/// Remove every image of `repo` from the host (what a test pulled from there).
pub fn remove_images(repo: &str) {
    let ids = Command::new("docker")
        .args(["images", "-q", "--no-trunc", repo])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    for id in ids.split_whitespace() {
        let _ = Command::new("docker").args(["rmi", "-f", id]).output();
    }
}
