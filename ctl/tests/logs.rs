//! `ctl logs` against the real thing: Docker's own `awslogs` driver ships two containers' output
//! (two "instances", one stream each, named `<instance>/<tag>` as the agent names them) to moto's
//! CloudWatch Logs, and the real `ctl` binary reads it back interleaved, filtered, as JSON, and
//! following new lines. The driver runs inside dockerd and takes its AWS credentials from
//! dockerd's own environment, so the test runs a dockerd of its own (own data and exec root and
//! socket, a bridge of its own) started with moto's dummy credentials; the machine's dockerd
//! is left alone.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{MOTO, ctl, ctl_command, moto_sdk, text, unique};

const BASE_IMAGE: &str = "skiff-ci/busybox:1";

/// A dockerd of this test's own, with AWS credentials in its environment for the driver.
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
        std::fs::create_dir_all(dir.join("sync")).expect("sync dir");
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
        let deadline = Instant::now() + Duration::from_secs(60);
        while !engine.docker_ok(&["version"]) {
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer in 60 s; see {}/dockerd.log",
                engine.dir.display()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        // The base image from the machine's engine, without a registry.
        let mut save = Command::new("docker")
            .args(["save", BASE_IMAGE])
            .stdout(Stdio::piped())
            .spawn()
            .expect("docker save");
        let load = Command::new("docker")
            .args(["-H", &engine.sock, "load", "-q"])
            .stdin(save.stdout.take().expect("pipe"))
            .output()
            .expect("docker load");
        let saved = save.wait().expect("docker save");
        assert!(
            saved.success() && load.status.success(),
            "docker save {BASE_IMAGE} | docker load: {saved:?} {load:?}"
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

    fn docker_ok(&self, args: &[&str]) -> bool {
        self.docker(args).status.success()
    }

    /// A container logging through awslogs exactly as the agent configures it.
    fn run_logging(&self, name: &str, group: &str, stream: &str, script: &str) {
        let sync = format!("{}:/sync", self.dir.join("sync").display());
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
        let out = self.docker(&args);
        assert!(out.status.success(), "docker run {name}: {out:?}");
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let ids = self.docker(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.docker(&["rm", "-f", id]);
        }
        // SIGTERM: dockerd stops its containerd and unmounts; SIGKILL only if it hangs.
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
    let engine = Engine::start(&name);

    // Two instances, printing in turns 0.4 s apart, b 0.2 s after a, both from the moment the
    // file /sync/go appears (so that docker run's own latency cannot reorder them).
    let wait_go = "while [ ! -e /sync/go ]; do sleep 0.05; done";
    engine.run_logging(
        &format!("{name}-a"),
        &group_name,
        "i-aaa/v1",
        &format!("{wait_go}; for n in 1 2 3; do echo \"a$n\"; sleep 0.4; done"),
    );
    engine.run_logging(
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
    engine.run_logging(
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

/// An agent's own stream, `<instance>/~agent` (written by the agent's shiplog; here by the
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
