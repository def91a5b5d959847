//! The real `ctl` binary's surface: `--no-wait`, shell completions, and the `--json` documents
//! of `status` and `history`. SSM and EC2 in moto; Auto Scaling scripted by the fake where
//! refreshes are involved (moto has none).

mod common;

use std::collections::HashMap;

use common::fake_autoscaling::{FakeAutoScaling, Script};
use common::*;
use serde_json::Value;
use skiff_release::Release;

const V1: &str = r#"{"tag":"v1","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","released_by":"ci"}"#;

#[tokio::test]
async fn no_wait_returns_0_once_the_refresh_started_with_the_parameter_written() {
    let ssm = aws_sdk_ssm::Client::new(&moto_sdk().await);
    let param = format!("/{}/release", unique("no-wait"));
    put_parameter(&ssm, &param, V1).await;
    // The refresh never ends: only --no-wait can return 0 here.
    let fake = FakeAutoScaling::start(Script {
        refreshes: vec![vec!["InProgress"]],
        ..Script::default()
    });
    let out = ctl_env(
        &[
            "--parameter",
            &param,
            "--asg",
            "app-asg",
            "--image",
            "127.0.0.1:1/none/app",
            "release",
            "--tag",
            "v2",
            "--skip-verify",
            "--no-wait",
            "--json",
            "--timeout",
            "5s",
            "--poll",
            "10ms",
        ],
        &[("AWS_ENDPOINT_URL_AUTO_SCALING", &fake.url)],
    );
    let value = read_param(&ssm, &param).await.expect("value");
    delete_param(&ssm, &param).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert_eq!(Release::parse(&value).expect("record").tag.as_str(), "v2");
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("every stdout line is JSON"))
        .collect();
    let events: Vec<&str> = lines.iter().filter_map(|l| l["event"].as_str()).collect();
    assert_eq!(
        events,
        // signature: the check's verdict (off: no keys named), before anything is written.
        [
            "signature",
            "locked",
            "plan",
            "written",
            "refresh_started",
            "unlocked"
        ],
        "{t}"
    );
    assert_eq!(
        lines.last(),
        Some(&serde_json::json!({"outcome": "started", "refresh_id": "r-1"})),
        "{t}"
    );
    let seen = fake.seen();
    assert_eq!(seen.starts.len(), 1, "{t}");
    // The lock check only: the started refresh is not followed.
    assert_eq!(
        seen.count("DescribeInstanceRefreshes"),
        1,
        "{:?}",
        seen.actions
    );
}

#[test]
fn completions_name_every_subcommand() {
    for shell in ["bash", "zsh"] {
        let out = ctl(&["completions", shell]);
        let script = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", text(&out));
        assert!(!script.trim().is_empty(), "{shell}");
        for sub in ["release", "status", "history", "rollback", "completions"] {
            assert!(script.contains(sub), "{shell} completions lack {sub}");
        }
        assert!(script.contains("--no-wait"), "{shell}: flags too");
    }
    let out = ctl(&["completions", "tcsh-unknown"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[tokio::test]
async fn status_json_has_the_release_the_refresh_the_instances_and_drift() {
    let ssm = aws_sdk_ssm::Client::new(&moto_sdk().await);
    let param = format!("/{}/release", unique("status-json"));
    put_parameter(&ssm, &param, V1).await;
    // Instance ids moto does not know: no skiff:release tag, so both drift.
    let fake = FakeAutoScaling::start(Script {
        before: Some("Successful"),
        instances: vec![
            ("i-0fake00000000002", "us-east-1b"),
            ("i-0fake00000000001", "us-east-1a"),
        ],
        ..Script::default()
    });
    let out = ctl_env(
        &[
            "--parameter",
            &param,
            "--asg",
            "app-asg",
            "--image",
            "r/app",
            "status",
            "--json",
        ],
        &[("AWS_ENDPOINT_URL_AUTO_SCALING", &fake.url)],
    );
    delete_param(&ssm, &param).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let s: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(
        s["deployment"],
        serde_json::json!({"parameter": param, "asg": "app-asg", "image": "r/app",
            "target_group": null, "alarms": []}),
        "{t}"
    );
    assert_eq!(s["release"], V1, "{t}");
    assert_eq!(s["desired_tag"], "v1", "{t}");
    assert_eq!(s["parameter_version"], 1, "{t}");
    assert_eq!(s["refresh"]["id"], "r-0", "{t}");
    assert_eq!(s["refresh"]["state"], "Successful", "{t}");
    assert_eq!(s["refresh"]["percent"], 100, "{t}");
    assert!(s["refresh_error"].is_null(), "{t}");
    assert_eq!(
        s["target_health_error"]["kind"], "no_target_group",
        "no stack, no --target-group: {t}"
    );
    let instances = s["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 2, "{t}");
    assert_eq!(
        instances[0],
        serde_json::json!({
            "id": "i-0fake00000000001",
            "zone": "us-east-1a",
            "lifecycle": "InService",
            "health": "Healthy",
            "release": null,
            "target_health": null,
            "target_reason": null
        }),
        "sorted by id: {t}"
    );
    assert_eq!(
        s["drift"],
        serde_json::json!(["i-0fake00000000001", "i-0fake00000000002"]),
        "{t}"
    );
}

#[tokio::test]
async fn history_json_entries_carry_version_value_and_who_and_when() {
    let ssm = aws_sdk_ssm::Client::new(&moto_sdk().await);
    let param = format!("/{}/release", unique("history-json"));
    put_parameter(&ssm, &param, V1).await;
    put_parameter(&ssm, &param, r#"{"tag":"v2","released_by":"jenkins"}"#).await;
    let out = ctl(&[
        "--parameter",
        &param,
        "--asg",
        "a",
        "--image",
        "r/app",
        "history",
        "--json",
    ]);
    // Who wrote each version, as the parameter history itself says (moto answers a fixed user
    // name for its dummy credentials): ctl must show exactly that, version by version.
    let writers: HashMap<i64, String> = ssm
        .get_parameter_history()
        .name(&param)
        .send()
        .await
        .expect("parameter history")
        .parameters()
        .iter()
        .map(|p| {
            (
                p.version(),
                p.last_modified_user()
                    .expect("moto names the writer")
                    .to_owned(),
            )
        })
        .collect();
    delete_param(&ssm, &param).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let h: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    let entries = h.as_array().expect("array");
    assert_eq!(entries.len(), 2, "{t}");
    for (e, (version, value)) in entries
        .iter()
        .zip([(2, r#"{"tag":"v2","released_by":"jenkins"}"#), (1, V1)])
    {
        assert_eq!(e["version"], version, "{t}");
        assert_eq!(e["value"], value, "{t}");
        assert!(e["modified_at"].is_string(), "{t}");
        assert_eq!(
            e["modified_by"].as_str(),
            writers.get(&version).map(String::as_str),
            "{t}"
        );
    }
}
