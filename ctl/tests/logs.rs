//! `ctl logs` against the real thing: Docker's own `awslogs` driver ships two containers' output
//! (two "instances", one stream each, named `<instance>/<tag>` as the agent names them) to moto's
//! CloudWatch Logs, and the real `ctl` binary reads it back interleaved, filtered, as JSON, and
//! following new lines. The driver runs inside dockerd and takes its AWS credentials from
//! dockerd's own environment, so the test runs a dockerd of its own (own data and exec root and
//! socket, a bridge of its own) started with moto's dummy credentials; the machine's dockerd
//! is left alone.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{MOTO, ctl, ctl_command, moto_sdk, text, unique};
use skiff_testkit::engine::Engine;

const BASE_IMAGE: &str = "skiff-ci/busybox:1";

/// A dockerd of this test's own (see [`Engine`]) with the base image and a folder `sync`
/// the containers share with the test.
fn engine(name: &str) -> Engine {
    let engine = Engine::start(name);
    std::fs::create_dir_all(engine.dir.join("sync")).expect("sync dir");
    engine.load_from_host(BASE_IMAGE);
    engine
}

/// A container in `engine` logging through awslogs exactly as the agent configures it.
fn run_logging(engine: &Engine, name: &str, group: &str, stream: &str, script: &str) {
    let sync = format!("{}:/sync", engine.dir.join("sync").display());
    let opts = [
        format!("awslogs-group={group}"),
        format!("awslogs-stream={stream}"),
        "awslogs-region=us-east-1".into(),
        format!("awslogs-endpoint={MOTO}"),
        "awslogs-create-group=false".into(),
        "mode=non-blocking".into(),
        "max-buffer-size=4m".into(),
    ];
    let mut args = vec![
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        "-v",
        &sync,
    ];
    args.extend(["--log-driver", "awslogs"]);
    for o in &opts {
        args.extend(["--log-opt", o]);
    }
    args.extend([BASE_IMAGE, "sh", "-c", script]);
    let out = engine.docker(&args);
    assert!(out.status.success(), "docker run {name}: {out:?}");
}

struct LogGroup {
    client: aws_sdk_cloudwatchlogs::Client,
    name: String,
    rt: tokio::runtime::Runtime,
}

impl LogGroup {
    fn create(name: &str) -> LogGroup {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let client = rt.block_on(async { aws_sdk_cloudwatchlogs::Client::new(&moto_sdk().await) });
        rt.block_on(client.create_log_group().log_group_name(name).send())
            .expect("create the log group in moto (is it on 127.0.0.1:5055?)");
        LogGroup {
            client,
            name: name.to_owned(),
            rt,
        }
    }
}

impl Drop for LogGroup {
    fn drop(&mut self) {
        let _ = self.rt.block_on(
            self.client
                .delete_log_group()
                .log_group_name(&self.name)
                .send(),
        );
    }
}

fn stdout(o: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The message part of `time instance release message` lines, with instance and release.
fn fields(lines: &[String]) -> Vec<(String, String, String)> {
    lines
        .iter()
        .map(|l| {
            let mut p = l.splitn(4, ' ');
            let _time = p.next();
            let i = p.next().unwrap_or_default().to_owned();
            let r = p.next().unwrap_or_default().to_owned();
            (i, r, p.next().unwrap_or_default().to_owned())
        })
        .collect()
}

#[test]
fn awslogs_driver_ships_to_cloudwatch_and_ctl_logs_reads_it_back() {
    let name = unique("skiff-it-logs");
    let group_name = format!("/skiff-it/{name}/app");
    let group = LogGroup::create(&group_name);
    let engine = engine(&name);

    // Two instances, printing in turns 0.4 s apart, b 0.2 s after a, both from the moment the
    // file /sync/go appears (so that docker run's own latency cannot reorder them).
    let wait_go = "while [ ! -e /sync/go ]; do sleep 0.05; done";
    run_logging(
        &engine,
        &format!("{name}-a"),
        &group_name,
        "i-aaa/v1",
        &format!("{wait_go}; for n in 1 2 3; do echo \"a$n\"; sleep 0.4; done"),
    );
    run_logging(
        &engine,
        &format!("{name}-b"),
        &group_name,
        "i-bbb/v2",
        &format!("{wait_go}; sleep 0.2; for n in 1 2 3; do echo \"b$n\"; sleep 0.4; done"),
    );
    std::fs::write(engine.dir.join("sync/go"), "").expect("go");

    // The driver sends a batch every 5 s, and at the container's end.
    let args = ["logs", "--log-group", &group_name, "--since", "5m"];
    let deadline = Instant::now() + Duration::from_secs(30);
    let lines = loop {
        let out = ctl(&args);
        assert!(out.status.success(), "{}", text(&out));
        let lines = stdout(&out);
        if lines.len() >= 6 || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let got = fields(&lines);
    let want: Vec<(String, String, String)> = [
        ("i-aaa", "v1", "a1"),
        ("i-bbb", "v2", "b1"),
        ("i-aaa", "v1", "a2"),
        ("i-bbb", "v2", "b2"),
        ("i-aaa", "v1", "a3"),
        ("i-bbb", "v2", "b3"),
    ]
    .iter()
    .map(|(i, r, m)| ((*i).into(), (*r).into(), (*m).into()))
    .collect();
    assert_eq!(got, want, "interleaved by time:\n{}", lines.join("\n"));

    let only = |extra: &[&str]| {
        let mut a = args.to_vec();
        a.extend_from_slice(extra);
        let out = ctl(&a);
        assert!(out.status.success(), "{}", text(&out));
        fields(&stdout(&out))
            .into_iter()
            .map(|(_, _, m)| m)
            .collect::<Vec<_>>()
    };
    assert_eq!(only(&["--instance", "i-bbb"]), ["b1", "b2", "b3"]);
    assert_eq!(only(&["--release", "v1"]), ["a1", "a2", "a3"]);
    assert_eq!(only(&["--instance", "i-aaa", "--release", "v2"]), [""; 0]);

    let out = ctl(&[
        "--json",
        "logs",
        "--log-group",
        &group_name,
        "--release",
        "v2",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let first: serde_json::Value =
        serde_json::from_str(&stdout(&out)[0]).expect("a JSON object per line");
    assert_eq!(first["instance"], "i-bbb");
    assert_eq!(first["release"], "v2");
    assert_eq!(first["message"], "b1");
    assert_eq!(first["stream"], "i-bbb/v2");

    // --follow prints what arrives later, once.
    let mut follow = ctl_command(
        &[
            "logs",
            "--log-group",
            &group_name,
            "--follow",
            "--since",
            "5m",
            "--poll",
            "500ms",
        ],
        &[],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn ctl logs --follow");
    let (tx, rx) = mpsc::channel();
    let out = follow.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let wait_for = |seen: &mut Vec<String>, needle: &str, within: Duration| -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                seen.push(line);
                if seen.last().is_some_and(|l| l.ends_with(needle)) {
                    return Some(start.elapsed());
                }
            }
        }
        None
    };
    assert!(
        wait_for(&mut seen, " b3", Duration::from_secs(15)).is_some(),
        "the earlier lines first: {seen:?}"
    );
    let printed = Instant::now();
    run_logging(
        &engine,
        &format!("{name}-c"),
        &group_name,
        "i-aaa/v3",
        // Still running: the line travels in the driver's periodic batch, not the final flush.
        "echo late-line; sleep 120",
    );
    let took = wait_for(&mut seen, "late-line", Duration::from_secs(20));
    let _ = follow.kill();
    let _ = follow.wait();
    let took = took.unwrap_or_else(|| panic!("--follow never printed the new line: {seen:?}"));
    eprintln!(
        "ctl logs --follow: new line printed {:.1} s after the container started ({:.1} s ago)",
        took.as_secs_f64(),
        printed.elapsed().as_secs_f64()
    );
    assert!(
        seen.last()
            .is_some_and(|l| l.contains(" i-aaa v3 late-line")),
        "{seen:?}"
    );
    assert_eq!(
        seen.iter().filter(|l| l.ends_with(" a1")).count(),
        1,
        "each line once: {seen:?}"
    );
    drop(engine);
    drop(group);
}

/// An unknown group, no group at all, and CloudWatch away: exit 2 with what to do.
#[test]
fn bad_input_is_explained() {
    let missing = format!("/skiff-it/{}/none", unique("skiff-it-logs"));
    let out = ctl(&["logs", "--log-group", &missing]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("log group {missing} does not exist")) && err.contains("--log-group"),
        "{err}"
    );

    let out = ctl(&["logs", "--log-group", "/g", "--instance", "i-1/v1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("an instance id like i-0123456789abcdef0"),
        "{}",
        text(&out)
    );

    let out = ctl(&["logs"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no log group known: pass --stack"),
        "{}",
        text(&out)
    );

    // Nothing listens there: the SDK's retries end within its bounded timeouts.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let started = Instant::now();
    let out = ctl_command(&["logs", "--log-group", "/skiff-it/x"], &[])
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .output()
        .expect("run ctl");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read log group /skiff-it/x") && err.contains("AWS_ENDPOINT_URL"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}

/// An agent's own stream, `<instance>/~agent` (written by the agent's cloudlog; here by the
/// test, as the agent writes it: agent/tests/agentlogs.rs checks the agent's side), is shown
/// by default, interleaved with the app's lines, with release `~agent`; `--release` picks it
/// alone or leaves it out.
#[test]
fn the_agents_stream_is_shown_as_release_agent_and_interleaved() {
    use aws_sdk_cloudwatchlogs::types::InputLogEvent;
    let name = unique("skiff-it-agentstream");
    let group_name = format!("/skiff-it/{name}/app");
    let group = LogGroup::create(&group_name);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let put = |stream: &str, lines: &[(i64, &str)]| {
        group
            .rt
            .block_on(
                group
                    .client
                    .create_log_stream()
                    .log_group_name(&group_name)
                    .log_stream_name(stream)
                    .send(),
            )
            .expect("create stream");
        let events = lines
            .iter()
            .map(|(t, m)| {
                InputLogEvent::builder()
                    .timestamp(now - 60_000 + t)
                    .message(*m)
                    .build()
                    .expect("event")
            })
            .collect();
        group
            .rt
            .block_on(
                group
                    .client
                    .put_log_events()
                    .log_group_name(&group_name)
                    .log_stream_name(stream)
                    .set_log_events(Some(events))
                    .send(),
            )
            .expect("put events");
    };
    put(
        "i-aaa/~agent",
        &[(0, "agent started"), (200, "promoted v1")],
    );
    put("i-aaa/v1", &[(100, "app-started"), (300, "serving")]);

    let args = ["logs", "--log-group", &group_name, "--since", "5m"];
    let read = |extra: &[&str]| {
        let mut a = args.to_vec();
        a.extend_from_slice(extra);
        let out = ctl(&a);
        assert!(out.status.success(), "{}", text(&out));
        fields(&stdout(&out))
    };
    let got = read(&[]);
    let want: Vec<(String, String, String)> = [
        ("i-aaa", "~agent", "agent started"),
        ("i-aaa", "v1", "app-started"),
        ("i-aaa", "~agent", "promoted v1"),
        ("i-aaa", "v1", "serving"),
    ]
    .iter()
    .map(|(i, r, m)| ((*i).into(), (*r).into(), (*m).into()))
    .collect();
    assert_eq!(got, want);
    let messages = |extra: &[&str]| {
        read(extra)
            .into_iter()
            .map(|(_, _, m)| m)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        messages(&["--release", "~agent"]),
        ["agent started", "promoted v1"]
    );
    assert_eq!(messages(&["--release", "v1"]), ["app-started", "serving"]);
}
