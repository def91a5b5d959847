//! The agent's `/metrics` scraped by a real Prometheus (the Debian package's binary, a server of
//! the test's own on a free port, scraping every second), against the real Docker engine and
//! registry with the file source: what Prometheus's query API answers after a first release, an
//! in-place release, a container killed from outside, a release that never becomes healthy and
//! bad release values. `promtool` checks the exposition itself.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::{Agent, Fixture, docker, free_port, wait_for};

const LONG: Duration = Duration::from_secs(40);
/// Scrape every second: a value the agent shows is in Prometheus within a few.
const IN_PROMETHEUS: Duration = Duration::from_secs(20);

/// A Prometheus server of the test's own; killed and its data removed on drop.
struct Prometheus {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let ok = Command::new("prometheus")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "no prometheus binary: run `bash .ci/setup.sh` (it installs the Debian package)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: skiff-agent\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .expect("config");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        let prom = Prometheus { child, addr, dir };
        wait_for(
            Duration::from_secs(30),
            "prometheus ready",
            || matches!(get(&prom.addr, "/-/ready"), Some((200, _, _))),
            || prom.log(),
        );
        prom
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query: each series as (labels, value).
    fn query(&self, promql: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let Some((200, _, body)) = get(&self.addr, &path) else {
            panic!("query {promql} failed:\n{}", self.log());
        };
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["status"], "success", "{body}");
        v["data"]["result"]
            .as_array()
            .expect("vector")
            .iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .expect("metric")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                let value = s["value"][1]
                    .as_str()
                    .and_then(|x| x.parse().ok())
                    .expect("value");
                (labels, value)
            })
            .collect()
    }

    /// The single value `promql` has, if it has exactly one series.
    fn value(&self, promql: &str) -> Option<f64> {
        match self.query(promql).as_slice() {
            [(_, v)] => Some(*v),
            _ => None,
        }
    }

    /// Wait until `promql` is one series with value `want`; panic with what it was.
    fn wait_value(&self, promql: &str, want: f64) {
        wait_for(
            IN_PROMETHEUS,
            &format!("{promql} == {want} in prometheus"),
            || self.value(promql) == Some(want),
            || format!("{promql} = {:?}", self.query(promql)),
        );
    }

    /// The tags `skiff_agent_release_info` names now.
    fn release_tags(&self) -> Vec<String> {
        self.query("skiff_agent_release_info == 1")
            .into_iter()
            .map(|(l, _)| l.get("tag").cloned().unwrap_or_default())
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A blocking HTTP/1.0 GET: (status, headers in lower case, body).
fn get(addr: &str, path: &str) -> Option<(u16, String, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, head.to_ascii_lowercase(), body.to_owned()))
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

/// `promtool check metrics` on the text: the exposition parses and follows the naming rules.
fn promtool_check(text: &str, dir: &Path) {
    let file = dir.join("scrape.txt");
    std::fs::write(&file, text).expect("write scrape");
    let out = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).expect("open"))
        .output()
        .expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn prometheus_sees_releases_restarts_rollbacks_and_source_errors() {
    let mut fx = Fixture::new("metrics");
    fx.image("v1", true);
    fx.image("v2", true);
    fx.image("broken", false);
    fx.set_release("v1");
    let config = fx.write_config(&fx.file_config("follow", ""));
    let agent = Agent::start(&config, &[]);
    let prom = Prometheus::start(&fx.health_addr());
    let started = now_secs();

    // The first release: started on an empty host.
    fx.wait_healthy("v1", LONG);
    let (code, head, text) = get(&fx.health_addr(), "/metrics").expect("/metrics answers");
    assert_eq!(code, 200, "{text}");
    assert!(
        head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    promtool_check(&text, fx.dir.path());
    prom.wait_value("up{job=\"skiff-agent\"}", 1.0);
    prom.wait_value(
        "skiff_agent_swaps_total{kind=\"start\",outcome=\"promoted\"}",
        1.0,
    );
    wait_for(
        IN_PROMETHEUS,
        "release_info names v1",
        || prom.release_tags() == ["v1"],
        || format!("{:?}", prom.query("skiff_agent_release_info")),
    );
    let info = prom.query("skiff_agent_release_info");
    assert!(
        info[0].0["digest"].starts_with("sha256:"),
        "the digest the image was pulled by: {info:?}"
    );
    prom.wait_value("skiff_agent_health_state{state=\"healthy\"}", 1.0);
    prom.wait_value("skiff_agent_health_state{state=\"starting\"}", 0.0);
    prom.wait_value("skiff_agent_pull_duration_seconds_count", 1.0);
    prom.wait_value("skiff_agent_start_to_healthy_seconds_count", 1.0);
    wait_for(
        IN_PROMETHEUS,
        "app probes counted",
        || prom.value("skiff_agent_app_probe_duration_seconds_count") >= Some(3.0),
        || {
            format!(
                "{:?}",
                prom.query("skiff_agent_app_probe_duration_seconds_count")
            )
        },
    );
    let polled = prom
        .value("skiff_agent_last_poll_success_timestamp_seconds")
        .expect("last poll");
    assert!(
        polled >= started - 1.0 && polled <= now_secs() + 1.0,
        "last poll {polled}, test started {started}"
    );
    assert_eq!(prom.value("skiff_agent_restarts_total"), Some(0.0));

    // An in-place release: drained, swapped, promoted; the info metric moves to v2 alone.
    fx.set_release("v2");
    fx.wait_healthy("v2", LONG);
    prom.wait_value(
        "skiff_agent_swaps_total{kind=\"update\",outcome=\"promoted\"}",
        1.0,
    );
    wait_for(
        IN_PROMETHEUS,
        "release_info names v2 only",
        || prom.release_tags() == ["v2"],
        || format!("{:?}", prom.query("skiff_agent_release_info")),
    );
    prom.wait_value("skiff_agent_drains_total{reason=\"update\"}", 1.0);
    prom.wait_value("skiff_agent_start_to_healthy_seconds_count", 2.0);

    // The container killed from outside: restarted once.
    let id = fx.running_container();
    docker(&["kill", &id]);
    wait_for(
        LONG,
        "the restart",
        || fx.status()["restart_count"] == 1,
        || fx.status().to_string(),
    );
    fx.wait_healthy("v2", LONG);
    prom.wait_value("skiff_agent_restarts_total", 1.0);

    // A release that never becomes healthy: rolled back to v2, which serves again.
    fx.set_release("broken");
    wait_for(
        LONG,
        "failed release reported",
        || fx.status()["failed_release"]["tag"] == "broken",
        || fx.status().to_string(),
    );
    fx.wait_healthy("v2", LONG);
    prom.wait_value(
        "skiff_agent_swaps_total{kind=\"update\",outcome=\"rolled_back\"}",
        1.0,
    );
    prom.wait_value("skiff_agent_rollbacks_total{outcome=\"succeeded\"}", 1.0);
    prom.wait_value("skiff_agent_drains_total{reason=\"update\"}", 2.0);
    wait_for(
        IN_PROMETHEUS,
        "release_info back on v2",
        || prom.release_tags() == ["v2"],
        || format!("{:?}", prom.query("skiff_agent_release_info")),
    );
    assert_eq!(
        prom.value("skiff_agent_swaps_total{kind=\"update\",outcome=\"promoted\"}"),
        Some(1.0),
        "the broken release was never promoted"
    );
    assert!(
        prom.query("skiff_agent_rollbacks_total{outcome=\"failed\"}")
            .iter()
            .all(|(_, v)| *v == 0.0)
    );

    // Bad release values: counted by kind; the app keeps serving v2.
    fx.set_release("not a tag!");
    wait_for(
        IN_PROMETHEUS,
        "invalid values counted",
        || prom.value("skiff_agent_source_errors_total{kind=\"invalid_value\"}") >= Some(1.0),
        || format!("{:?}", prom.query("skiff_agent_source_errors_total")),
    );
    std::fs::remove_file(fx.release_file()).expect("remove the release file");
    wait_for(
        IN_PROMETHEUS,
        "missing release file counted",
        || prom.value("skiff_agent_source_errors_total{kind=\"missing\"}") >= Some(1.0),
        || format!("{:?}", prom.query("skiff_agent_source_errors_total")),
    );
    let before = prom
        .value("skiff_agent_last_poll_success_timestamp_seconds")
        .expect("last poll");
    thread::sleep(Duration::from_secs(3));
    assert_eq!(
        prom.value("skiff_agent_last_poll_success_timestamp_seconds"),
        Some(before),
        "no successful poll while the file is missing"
    );
    assert_eq!(fx.healthz().expect("healthz").1["tag"], "v2");
    prom.wait_value("skiff_agent_health_state{state=\"healthy\"}", 1.0);

    let (_, _, text) = get(&fx.health_addr(), "/metrics").expect("/metrics answers");
    promtool_check(&text, fx.dir.path());
    dashboard_queries_run(&prom, &text);
    assert!(
        !agent.logs().contains("cannot encode the metrics"),
        "{}",
        agent.logs()
    );
}

/// Every query of the Grafana dashboard (`agent/dashboards/skiff.json`) parses and runs in
/// Prometheus, names only metrics the agent exposes, and its release table shows v2.
fn dashboard_queries_run(prom: &Prometheus, exposition: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/skiff.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("json");
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    for expr in &exprs {
        for name in expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("skiff_agent_"))
        {
            let family = name.strip_suffix("_bucket").unwrap_or(name);
            assert!(
                exposition.contains(&format!("# TYPE {family} ")),
                "the dashboard names {name}, which the agent does not expose"
            );
        }
        // Grafana's variables, as Grafana substitutes them.
        let promql = expr
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*");
        let path = format!("/api/v1/query?query={}", percent_encode(&promql));
        let (code, _, body) = get(&prom.addr, &path).expect("query");
        assert_eq!(code, 200, "{promql}: {body}");
    }
    let table = exprs[0]
        .replace("$__rate_interval", "1m")
        .replace("$instance", ".*");
    let rows = prom.query(&table);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].0["tag"], "v2", "{rows:?}");
}
