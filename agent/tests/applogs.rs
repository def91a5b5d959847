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

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use skiff_testkit::engine::Engine;
use support::{Agent, Fixture, MOTO, wait_for};

const LONG: Duration = Duration::from_secs(60);
const AWS: &str = "/var/lib/skiff-ci/venv-awscli/bin/aws";

/// The one container of app `app` (created by the agent) in `engine`: its id.
fn app_container(engine: &Engine, app: &str) -> String {
    let out = engine.docker(&["ps", "-q", "--filter", &format!("label=skiff.app={app}")]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
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
    let id = app_container(&engine, &f.id);
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
        let id = app_container(&engine, &f.id);
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
