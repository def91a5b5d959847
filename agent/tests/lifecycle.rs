//! The agent against a real Docker engine and a real local registry, with the file source:
//! boot, adoption, in-place update, rollback, restarts, hostile release values, digests.

mod support;

use std::time::Duration;

use support::{Agent, Fixture, docker, http_get, wait_for};

const LONG: Duration = Duration::from_secs(40);

#[test]
fn boot_converges_and_sigterm_leaves_the_app_running() {
    let mut fx = Fixture::new("boot");
    fx.image("v1", true);
    fx.set_release("v1");
    let config = fx.write_config(&fx.file_config("boot", ""));
    let mut agent = Agent::start(&config, &[]);
    fx.wait_healthy("v1", LONG);

    let id = fx.running_container();
    let labels = docker(&[
        "inspect",
        "-f",
        "{{index .Config.Labels \"skiff.tag\"}} {{.HostConfig.NetworkMode}}",
        &id,
    ]);
    assert_eq!(labels, "v1 host");
    let page = http_get(&format!("127.0.0.1:{}", fx.app_port), "/").expect("app answers");
    assert!(page.1.contains("release-v1"), "{page:?}");
    let status = fx.status();
    assert_eq!(status["status"], "healthy");
    assert!(status["timings"]["pull_ms"].is_u64(), "{status:#}");
    assert!(
        status["timings"]["start_to_healthy_ms"].is_u64(),
        "{status:#}"
    );
    assert!(
        status["running"]["release"]["digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:"))
    );

    // boot mode: a new release is only reported stale.
    fx.image("v2", true);
    fx.set_release("v2");
    wait_for(
        LONG,
        "stale flag",
        || fx.status()["stale"] == true,
        || fx.status().to_string(),
    );
    assert_eq!(fx.healthz().expect("healthz").1["tag"], "v1");
    assert_eq!(fx.running_container(), id);

    let exit = agent.sigterm();
    assert!(exit.success(), "agent exit {exit:?}\n{}", agent.logs());
    assert_eq!(
        fx.running_container(),
        id,
        "the app keeps running after the agent stops"
    );
    let logs = agent.logs();
    assert!(
        logs.lines()
            .any(|l| l.starts_with('{') && l.contains("release is healthy")),
        "JSON logs: {logs}"
    );
}

#[test]
fn in_place_update_then_a_release_that_never_becomes_healthy_rolls_back() {
    let mut fx = Fixture::new("inplace");
    fx.image("v1", true);
    fx.image("v2", true);
    fx.image("broken", false);
    fx.set_release("v1");
    let config = fx.write_config(&fx.file_config("follow", ""));
    let _agent = Agent::start(&config, &[]);
    fx.wait_healthy("v1", LONG);
    let v1 = fx.running_container();

    fx.set_release("v2");
    fx.wait_healthy("v2", LONG);
    let v2 = fx.running_container();
    assert_ne!(v1, v2);
    let status = fx.status();
    assert_eq!(status["previous"]["tag"], "v1", "{status:#}");
    assert_eq!(status["draining"], false);
    // the previous container is kept, stopped, for a rollback on this host
    assert!(
        fx.containers().contains(&(v1.clone(), false)),
        "{:?}",
        fx.containers()
    );

    fx.set_release("broken");
    wait_for(
        LONG,
        "failed release reported",
        || fx.status()["failed_release"]["tag"] == "broken",
        || fx.status().to_string(),
    );
    fx.wait_healthy("v2", LONG);
    assert_eq!(
        fx.running_container(),
        v2,
        "rolled back to the same v2 container"
    );
    let status = fx.status();
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("broken") && e.contains("rolled back")),
        "{status:#}"
    );
    // the failed release is not retried in a loop
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(fx.running_container(), v2);
    assert_eq!(
        fx.containers().len(),
        2,
        "v2 running, v1 kept: {:?}",
        fx.containers()
    );

    // a new good release after the failure goes through
    fx.set_release("v1");
    fx.wait_healthy("v1", LONG);
}

#[test]
fn a_container_killed_from_outside_is_restarted() {
    let mut fx = Fixture::new("kill");
    fx.image("v1", true);
    fx.set_release("v1");
    let config = fx.write_config(&fx.file_config("boot", ""));
    let _agent = Agent::start(&config, &[]);
    fx.wait_healthy("v1", LONG);
    let id = fx.running_container();

    docker(&["kill", &id]);
    wait_for(
        LONG,
        "503 while down",
        || matches!(fx.healthz(), Some((503, _))),
        || fx.status().to_string(),
    );
    fx.wait_healthy("v1", LONG);
    assert_eq!(
        fx.running_container(),
        id,
        "the same container is started again"
    );
    assert!(fx.status()["restart_count"].as_u64() >= Some(1));
}

#[test]
fn sigkilled_agent_adopts_its_container_without_restarting_it() {
    let mut fx = Fixture::new("adopt");
    fx.image("v1", true);
    fx.set_release("v1");
    let config = fx.write_config(&fx.file_config("follow", ""));
    let mut agent = Agent::start(&config, &[]);
    fx.wait_healthy("v1", LONG);
    let id = fx.running_container();
    let started = docker(&["inspect", "-f", "{{.State.StartedAt}}", &id]);

    agent.sigkill();
    let agent2 = Agent::start(&config, &[]);
    fx.wait_healthy("v1", LONG);
    assert_eq!(fx.running_container(), id);
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.StartedAt}}", &id]),
        started,
        "not restarted"
    );
    assert_eq!(fx.status()["restart_count"], 0);
    assert!(
        agent2.logs().contains("adopted managed container"),
        "{}",
        agent2.logs()
    );
}

#[test]
fn malformed_and_hostile_release_values_are_rejected_and_the_current_keeps_running() {
    let mut fx = Fixture::new("hostile");
    fx.image("v1", true);
    fx.set_release("v1");
    let config = fx.write_config(&fx.file_config("follow", ""));
    let agent = Agent::start(&config, &[]);
    fx.wait_healthy("v1", LONG);
    let id = fx.running_container();

    let huge = "A".repeat(100_000);
    let hostile = [
        "",
        "two words",
        "v1; docker run evil",
        "../../../etc/passwd",
        "evil.example.com/miner:latest",
        r#"{"tag":"v1","digest":"sha256:not-hex"}"#,
        r#"{"tag":["v1"]}"#,
        r#"{"image":"evil/miner","tag":"$(reboot)"}"#,
        "{\"tag\":\"v1\u{0}\"}",
        huge.as_str(),
    ];
    for value in hostile {
        let before = fx.status()["last_error"].clone();
        fx.set_release(value);
        wait_for(
            LONG,
            "rejection",
            || {
                let e = fx.status()["last_error"].clone();
                e != before && e.as_str().is_some_and(|e| e.contains("rejected"))
            },
            || fx.status().to_string(),
        );
        let (code, body) = fx.healthz().expect("healthz");
        assert_eq!(
            (code, body["tag"].as_str()),
            (200, Some("v1")),
            "after {:.40}",
            value
        );
        assert_eq!(fx.running_container(), id);
    }
    let logs = agent.logs();
    assert!(
        logs.len() < 200_000,
        "a hostile value is quoted truncated, not echoed in full"
    );
    assert!(logs.contains("rejected the release value"));
}

#[test]
fn a_digest_that_does_not_match_is_refused_and_a_matching_one_runs() {
    let mut fx = Fixture::new("digest");
    fx.image("v1", true);
    let v2_digest = fx.image("v2", true);
    fx.set_release("v1");
    let config = fx.write_config(&fx.file_config("follow", ""));
    let agent = Agent::start(&config, &[]);
    fx.wait_healthy("v1", LONG);
    let id = fx.running_container();

    let wrong = "sha256:00000000000000000000000000000000000000000000000000000000000000aa";
    fx.set_release(&format!(r#"{{"tag":"v2","digest":"{wrong}"}}"#));
    wait_for(
        LONG,
        "digest refusal",
        || {
            fx.status()["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(wrong))
        },
        || fx.status().to_string(),
    );
    assert_eq!(fx.healthz().expect("healthz").0, 200);
    assert_eq!(fx.running_container(), id);

    fx.set_release(&format!(
        r#"{{"tag":"v2","digest":"{v2_digest}","released_by":"it"}}"#
    ));
    fx.wait_healthy("v2", LONG);
    assert_eq!(
        fx.healthz().expect("healthz").1["digest"],
        v2_digest.as_str()
    );

    // Log fields are plain values: a digest as written, no digest field when unpinned (never
    // `"None"` or `Some(Digest(..))`).
    let logs = agent.logs();
    let desired: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "desired release")
        .collect();
    let v1 = desired
        .iter()
        .find(|v| v["tag"] == "v1")
        .unwrap_or_else(|| panic!("no v1 line in {logs}"));
    assert!(v1.get("digest").is_none(), "{v1}");
    assert!(
        desired
            .iter()
            .any(|v| v["tag"] == "v2" && v["digest"] == v2_digest.as_str()),
        "{desired:?}"
    );
    assert!(
        !logs.contains("Some(") && !logs.contains("\"None\""),
        "{logs}"
    );
}

#[test]
fn check_config_reports_every_problem_with_exit_64() {
    let fx = Fixture::new("cfg");
    let bad =
        fx.write_config("[app]\nname = '-bad'\nport = 0\n[release]\nsource = 'nope'\n[extra]\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "app.name",
        "app.image is required",
        "app.port",
        "release.source",
        "unknown key extra",
    ] {
        assert!(err.contains(needle), "{needle} missing from: {err}");
    }
    let good = fx.write_config(&fx.file_config("boot", ""));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["check-config", "--config"])
        .arg(&good)
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn an_unreachable_docker_engine_never_turns_a_healthy_host_unhealthy() {
    let mut fx = Fixture::new("engine");
    fx.image("v1", true);
    fx.image("v2", true);
    fx.set_release("v1");
    let engine = support::Proxy::start("unix:/var/run/docker.sock");
    let docker_host = format!("tcp://127.0.0.1:{}", engine.port);
    let config = fx.write_config(&fx.file_config("follow", ""));
    let agent = Agent::start(&config, &[("DOCKER_HOST", docker_host.as_str())]);
    fx.wait_healthy("v1", LONG);
    let id = fx.running_container();

    engine.set_up(false);
    wait_for(
        LONG,
        "engine error reported",
        || {
            fx.status()["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("engine"))
        },
        || format!("{}\n{}", fx.status(), agent.logs()),
    );
    // A new release cannot be applied without the engine; the host stays healthy on v1.
    fx.set_release("v2");
    for _ in 0..30 {
        let (code, body) = fx.healthz().expect("healthz");
        assert_eq!(
            (code, body["tag"].as_str()),
            (200, Some("v1")),
            "{}",
            fx.status()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(fx.running_container(), id);

    engine.set_up(true);
    fx.wait_healthy("v2", LONG);
}

#[test]
fn a_private_registry_is_pulled_from_with_the_configured_credentials() {
    let mut fx = Fixture::new("private");
    let repo = fx.private_image("v1");
    let password = fx.dir.path().join("registry-password");
    std::fs::write(&password, "wrong\n").expect("password");
    fx.set_release("v1");
    let config = fx.file_config("boot", "").replace(&fx.repo, &repo)
        + &format!(
            "[registry]\nusername = \"skiff\"\npassword_file = \"{}\"\n",
            password.display()
        );
    let config = fx.write_config(&config);
    let agent = Agent::start(&config, &[]);
    wait_for(
        LONG,
        "a refused login reported",
        || {
            fx.status_or_null()["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("refused to let us pull"))
        },
        || format!("{}\n{}", fx.status_or_null(), agent.logs()),
    );
    assert_eq!(fx.healthz().expect("healthz").0, 503);

    std::fs::write(&password, format!("{}\n", support::PRIVATE_PASSWORD)).expect("password");
    fx.wait_healthy("v1", Duration::from_secs(90));
}
