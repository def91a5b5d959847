//! `[logs]` through the real agent and Docker's real `awslogs` driver: the app container's output
//! reaches moto's CloudWatch Logs in the stream `<instance>/<tag>`, with the options the agent
//! sets (inspected on the created container); and a logging problem (a group that does not
//! exist, CloudWatch away) never stops the release: the app starts, turns healthy and keeps
//! `docker logs` (Docker's dual-logging cache).
//!
//! The driver runs inside dockerd and takes its AWS credentials from dockerd's environment, so
//! each test runs a dockerd of its own (own data/exec root and socket, a bridge of its own)
//! started with moto's dummy credentials; the agent is pointed at it with DOCKER_HOST.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Agent, Fixture, MOTO, wait_for};

const LONG: Duration = Duration::from_secs(60);
const AWS: &str = "/var/lib/skiff-ci/venv-awscli/bin/aws";

struct Engine {
    dir: PathBuf,
    sock: String,
    daemon: Child,
    bridge: String,
}

/// Engines this test process started, for a bridge name and subnet of each one's own.
static ENGINES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A bridge of the engine's own. `--bridge=none` would make dockerd delete the host's default
/// bridge `docker0` at start (it removes the default bridge interface when the bridge driver
/// is disabled), which breaks every bridged container and build of the machine's engine.
fn own_bridge() -> String {
    let n = ENGINES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let pid = std::process::id();
    let name = format!("sklg{}x{n}", pid % 100_000);
    let ip = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    ip(&["link", "del", &name]); // a leftover of an earlier run with this pid, if any
    // dockerd takes the bridge's own address (`--bip` and `--bridge` exclude each other).
    let addr = format!("10.{}.{}.1/24", 200 + n % 50, pid % 250);
    assert!(
        ip(&["link", "add", &name, "type", "bridge"])
            && ip(&["addr", "add", &addr, "dev", &name])
            && ip(&["link", "set", &name, "up"]),
        "cannot create the bridge {name} ({addr}) for the test's dockerd"
    );
    name
}

impl Engine {
    fn start(name: &str) -> Engine {
        let dir = std::env::temp_dir().join(name);
        std::fs::create_dir_all(dir.join("data")).expect("engine dir");
        std::fs::write(dir.join("daemon.json"), "{}\n").expect("daemon.json");
        let sock = format!("unix://{}", dir.join("docker.sock").display());
        let log = std::fs::File::create(dir.join("dockerd.log")).expect("dockerd.log");
        let bridge = own_bridge();
        let daemon = Command::new("dockerd")
            .args(["--config-file", &dir.join("daemon.json").to_string_lossy()])
            .arg(format!("--bridge={bridge}"))
            .args(["--iptables=false", "--ip6tables=false"])
            .args(["--data-root", &dir.join("data").to_string_lossy()])
            .args(["--exec-root", &dir.join("exec").to_string_lossy()])
            .args(["--pidfile", &dir.join("docker.pid").to_string_lossy()])
            .args(["-H", &sock])
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start dockerd (run .ci/setup.sh first)");
        let engine = Engine {
            dir,
            sock,
            daemon,
            bridge,
        };
        wait_for(
            LONG,
            "the test's dockerd answers",
            || engine.docker(&["version"]).status.success(),
            || format!("see {}/dockerd.log", engine.dir.display()),
        );
        engine
    }

    fn docker(&self, args: &[&str]) -> std::process::Output {
        Command::new("docker")
            .args(["-H", &self.sock])
            .args(args)
            .output()
            .expect("run docker")
    }

    /// The one container of app `app` (created by the agent): its id.
    fn app_container(&self, app: &str) -> String {
        let out = self.docker(&["ps", "-q", "--filter", &format!("label=skiff.app={app}")]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let ids = self.docker(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.docker(&["rm", "-f", id]);
        }
        let _ = Command::new("kill")
            .arg(self.daemon.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.daemon.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        // dockerd leaves its network namespace mounted under the exec root.
        let _ = Command::new("umount")
            .arg(self.dir.join("exec/netns/default"))
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

fn aws(args: &[&str]) -> std::process::Output {
    Command::new(AWS)
        .args([
            "--endpoint-url",
            MOTO,
            "--region",
            "us-east-1",
            "--output",
            "json",
        ])
        .args(args)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .stdin(Stdio::null())
        .output()
        .expect("run the aws CLI (venv-awscli from .ci/setup.sh)")
}

struct LogGroup(String);

impl LogGroup {
    fn create(name: &str) -> LogGroup {
        let out = aws(&["logs", "create-log-group", "--log-group-name", name]);
        assert!(out.status.success(), "create-log-group: {out:?}");
        LogGroup(name.to_owned())
    }
}

impl Drop for LogGroup {
    fn drop(&mut self) {
        let _ = aws(&["logs", "delete-log-group", "--log-group-name", &self.0]);
    }
}

/// An app that prints a line at start, healthy at /health.
fn printing_image(f: &mut Fixture, tag: &str) {
    f.image_running(
        tag,
        "echo app-started release=$SKIFF_RELEASE_TAG; exec httpd -f -p $PORT -h /www",
    );
}

fn logs_section(group: &str, endpoint: &str) -> String {
    format!(
        "[logs]\ndriver = \"awslogs\"\ngroup = \"{group}\"\nregion = \"us-east-1\"\nendpoint = \"{endpoint}\"\ninstance = \"i-0test\"\nbuffer = \"2m\"\n"
    )
}

#[test]
fn the_apps_output_reaches_cloudwatch_in_its_instance_and_release_stream() {
    let mut f = Fixture::new("skiff-it-applogs");
    printing_image(&mut f, "v1");
    let group = LogGroup::create(&format!("/skiff-it/{}/app", f.id));
    let engine = Engine::start(&f.id);
    let config = format!(
        "{}\n{}",
        f.file_config("boot", ""),
        logs_section(&group.0, MOTO)
    );
    f.set_release("v1");
    let _agent = Agent::start(&f.write_config(&config), &[("DOCKER_HOST", &engine.sock)]);
    f.wait_healthy("v1", LONG);

    // What the agent told Docker.
    let id = engine.app_container(&f.id);
    let inspect = engine.docker(&["inspect", "--format", "{{json .HostConfig.LogConfig}}", &id]);
    let log_config: serde_json::Value =
        serde_json::from_slice(&inspect.stdout).expect("LogConfig JSON");
    assert_eq!(log_config["Type"], "awslogs", "{log_config}");
    let opts = &log_config["Config"];
    for (k, v) in [
        ("awslogs-group", group.0.as_str()),
        ("awslogs-stream", "i-0test/v1"),
        ("awslogs-region", "us-east-1"),
        ("awslogs-endpoint", MOTO),
        ("awslogs-create-group", "false"),
        ("mode", "non-blocking"),
        ("max-buffer-size", "2m"),
        ("cache-max-size", "20m"),
        ("cache-max-file", "5"),
    ] {
        assert_eq!(opts[k], v, "{k} in {log_config}");
    }

    // What CloudWatch got: the app's first line, in its instance/release stream.
    let events = || {
        let out = aws(&[
            "logs",
            "get-log-events",
            "--log-group-name",
            &group.0,
            "--log-stream-name",
            "i-0test/v1",
        ]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    wait_for(
        Duration::from_secs(30),
        "the app's line in CloudWatch Logs",
        || events().contains("app-started release=v1"),
        events,
    );
}

/// A group that does not exist, then CloudWatch away: the release still starts and stays
/// healthy, and `docker logs` still shows the app's output.
#[test]
fn a_logging_problem_never_stops_the_release() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://127.0.0.1:{}", l.local_addr().expect("addr").port())
    };
    for (case, endpoint) in [("no such group", MOTO), ("CloudWatch away", dead.as_str())] {
        let mut f = Fixture::new("skiff-it-applogs-bad");
        printing_image(&mut f, "v1");
        let engine = Engine::start(&f.id);
        let missing = format!("/skiff-it/{}/none", f.id);
        let config = format!(
            "{}\n{}",
            f.file_config("boot", ""),
            logs_section(&missing, endpoint)
        );
        f.set_release("v1");
        let agent = Agent::start(&f.write_config(&config), &[("DOCKER_HOST", &engine.sock)]);
        let started = Instant::now();
        f.wait_healthy("v1", LONG);
        eprintln!(
            "{case}: healthy {:.1} s after the agent started",
            started.elapsed().as_secs_f64()
        );
        let id = engine.app_container(&f.id);
        wait_for(
            Duration::from_secs(10),
            &format!("{case}: docker logs shows the app's line"),
            || {
                let out = engine.docker(&["logs", &id]);
                String::from_utf8_lossy(&out.stdout).contains("app-started release=v1")
            },
            || agent.logs(),
        );
        // Still healthy a driver retry later (it retries stream creation with backoff).
        std::thread::sleep(Duration::from_secs(3));
        assert!(
            matches!(f.healthz(), Some((200, _))),
            "{case}: {:#}",
            f.status_or_null()
        );
    }
}
