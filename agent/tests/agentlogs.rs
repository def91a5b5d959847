//! The agent's own log lines through the real agent to moto's CloudWatch Logs: with `[logs]`
//! they appear, in order, in the stream `<instance>/~agent` of the group; with the endpoint
//! down or the group unknown the agent keeps serving `/healthz` 200 with the app running, and
//! says what is wrong once.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{AWS_ENV, Agent, Fixture, MOTO, free_port, wait_for};

const LONG: Duration = Duration::from_secs(60);
const AWS: &str = "/var/lib/skiff-ci/venv-awscli/bin/aws";

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

    /// The messages of one stream, oldest first, with their timestamps.
    fn events(&self, stream: &str) -> Vec<(i64, String)> {
        let out = aws(&[
            "logs",
            "get-log-events",
            "--log-group-name",
            &self.0,
            "--log-stream-name",
            stream,
            "--start-from-head",
        ]);
        if !out.status.success() {
            return Vec::new();
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        v["events"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        (
                            e["timestamp"].as_i64().unwrap_or_default(),
                            e["message"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for LogGroup {
    fn drop(&mut self) {
        let _ = aws(&["logs", "delete-log-group", "--log-group-name", &self.0]);
    }
}

fn config(f: &Fixture, group: &str, endpoint: &str, instance: &str) -> String {
    format!(
        "{}\n[logs]\ndriver = \"awslogs\"\ngroup = \"{group}\"\nregion = \"us-east-1\"\nendpoint = \"{endpoint}\"\ninstance = \"{instance}\"\n",
        f.file_config("follow", "")
    )
}

/// The JSON message (`fields.message` flattened) of a sent line.
fn msg(line: &str) -> String {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn healthy(f: &Fixture, agent: &Agent, tag: &str) {
    wait_for(
        LONG,
        &format!("healthy on {tag}"),
        || matches!(f.healthz(), Some((200, ref b)) if b["tag"] == tag),
        || agent.logs(),
    );
}

#[test]
fn the_agents_lines_reach_its_own_stream_in_order() {
    let mut f = Fixture::new("agentlogs");
    f.image("v1", true);
    f.image("v2", true);
    f.set_release("v1");
    let instance = format!("i-{}", f.id.rsplit('-').next().unwrap_or("x"));
    let group = LogGroup::create(&format!("/skiff/{}/app", f.id));
    let cfg = f.write_config(&config(&f, &group.0, MOTO, &instance));
    let mut agent = Agent::start(&cfg, &AWS_ENV);
    healthy(&f, &agent, "v1");
    f.set_release("v2");
    healthy(&f, &agent, "v2");
    let stream = format!("{instance}/~agent");
    let events = std::cell::RefCell::new(Vec::new());
    wait_for(
        Duration::from_secs(30),
        "the agent's start and the swap to v2 in its stream",
        || {
            *events.borrow_mut() = group.events(&stream);
            let events = events.borrow();
            let msgs: Vec<String> = events.iter().map(|(_, m)| msg(m)).collect();
            let start = msgs.iter().position(|m| m == "agent started");
            let swap = events.iter().rposition(|(_, l)| l.contains("\"v2\""));
            matches!((start, swap), (Some(a), Some(b)) if a < b)
        },
        || format!("{:#?}\nagent stderr:\n{}", events.borrow(), agent.logs()),
    );
    let events = events.into_inner();
    assert!(
        events.windows(2).all(|w| w[0].0 <= w[1].0),
        "not in order: {events:#?}"
    );
    // Every sent line is a line the agent wrote to stderr (journald), unchanged.
    let stderr = agent.logs();
    for (_, m) in &events {
        assert!(stderr.contains(m.as_str()), "sent but not on stderr: {m}");
    }
    agent.sigterm();
}

/// The agent with a [logs] section that cannot work: it stays healthy with the app running,
/// and names the problem exactly once though it retries.
fn keeps_running_and_reports_once(group: &str, endpoint: &str, says: &str) {
    let mut f = Fixture::new("agentlogs-bad");
    f.image("v1", true);
    f.set_release("v1");
    let cfg = f.write_config(&config(&f, group, endpoint, "i-0bad"));
    let mut agent = Agent::start(&cfg, &AWS_ENV);
    healthy(&f, &agent, "v1");
    // Several send periods (5 s) with retries on the backoff.
    let until = Instant::now() + Duration::from_secs(17);
    while Instant::now() < until {
        assert!(
            matches!(f.healthz(), Some((200, _))),
            "healthz failed: {}",
            agent.logs()
        );
        assert!(
            agent.child.try_wait().expect("wait").is_none(),
            "agent exited"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        f.containers().iter().any(|(_, running)| *running),
        "app stopped"
    );
    let logs = agent.logs();
    let reports = logs
        .lines()
        .filter(|l| l.contains("cloudlog:") && l.contains(says))
        .count();
    assert_eq!(reports, 1, "want one report saying {says:?}:\n{logs}");
    agent.sigterm();
}

#[test]
fn endpoint_down_is_reported_once_and_changes_nothing() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let group = LogGroup::create(&format!("/skiff/{}/app", support::unique("down")));
    keeps_running_and_reports_once(&group.0, &dead, "cannot reach CloudWatch Logs");
}

#[test]
fn unknown_group_is_reported_once_and_changes_nothing() {
    let group = format!("/skiff/{}/nothing", support::unique("nogroup"));
    keeps_running_and_reports_once(&group, MOTO, "does not exist");
}
