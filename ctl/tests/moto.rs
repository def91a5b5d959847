//! The real `ctl` binary against moto (SSM, CloudFormation, Auto Scaling, EC2) and the local
//! registry: discovery, write/read-back/history, status, and the refusal paths.

mod common;

use common::*;
use skiff_testkit::emulator::Group;

const V1: &str = r#"{"tag":"v1","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111"}"#;

#[tokio::test]
async fn refusals_leave_the_parameter_untouched() {
    let ssm = aws_sdk_ssm::Client::new(&moto_sdk().await);
    let param = format!("/{}/release", unique("refuse"));
    put_parameter(&ssm, &param, V1).await;
    let image_ok = "127.0.0.1:5000/skiff-ctl-refuse/app";
    let cases: &[(&[&str], &str, &str)] = &[
        (
            &["--tag", "bad tag!"],
            "127.0.0.1:5000/x/app",
            "invalid tag",
        ),
        (&["--tag=-dash"], "127.0.0.1:5000/x/app", "invalid tag"),
        (
            &["--tag", "no-such-tag"],
            image_ok,
            "does not exist in the registry",
        ),
        // Nothing listens on port 1: the registry is down.
        (
            &["--tag", "v2"],
            "127.0.0.1:1/x/app",
            "cannot reach the registry",
        ),
    ];
    for (extra, image, needle) in cases {
        let mut args = vec![
            "--parameter",
            &param,
            "--asg",
            "no-asg",
            "--image",
            image,
            "release",
        ];
        args.extend_from_slice(extra);
        let out = ctl(&args);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {t}");
        assert!(t.contains(needle), "{extra:?}: {t}");
        assert_eq!(
            read_param(&ssm, &param).await.as_deref(),
            Some(V1),
            "{extra:?} changed it"
        );
    }
    delete_param(&ssm, &param).await;
}

#[tokio::test]
async fn missing_deployment_is_a_configuration_error() {
    let out = ctl(&["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--stack"), "{}", text(&out));
}

#[tokio::test]
async fn stack_outputs_name_the_deployment_and_dry_run_changes_nothing() {
    let sdk = moto_sdk().await;
    let ssm = aws_sdk_ssm::Client::new(&sdk);
    let cfn = aws_sdk_cloudformation::Client::new(&sdk);
    let stack = unique("skiff-ctl-stack");
    let param = format!("/{stack}/release");
    let template = serde_json::json!({
        "Resources": {
            "Release": {"Type": "AWS::SSM::Parameter", "Properties": {"Name": param, "Type": "String", "Value": V1}}
        },
        "Outputs": {
            "ReleaseParameter": {"Value": {"Ref": "Release"}},
            "AutoScalingGroup": {"Value": "stack-asg"},
            "ImageRepository": {"Value": "127.0.0.1:5000/skiff/app"}
        }
    });
    cfn.create_stack()
        .stack_name(&stack)
        .template_body(template.to_string())
        .send()
        .await
        .expect("create stack");
    let out = ctl(&[
        "--stack",
        &stack,
        "release",
        "--tag",
        "v2",
        "--skip-verify",
        "--dry-run",
        "--json",
    ]);
    let t = text(&out);
    let _ = cfn.delete_stack().stack_name(&stack).send().await;
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains(&format!(r#""parameter":"{param}""#)), "{t}");
    assert!(t.contains(r#""outcome":"dry_run""#), "{t}");
    assert!(t.contains(r#"\"tag\":\"v2\""#), "new shown: {t}");
    delete_param(&ssm, &param).await;
}

#[tokio::test]
async fn history_lists_releases_newest_first() {
    let ssm = aws_sdk_ssm::Client::new(&moto_sdk().await);
    let param = format!("/{}/release", unique("history"));
    put_parameter(&ssm, &param, V1).await;
    put_parameter(&ssm, &param, r#"{"tag":"v2","released_by":"jenkins"}"#).await;
    put_parameter(&ssm, &param, "v3").await;
    let out = ctl(&[
        "--parameter",
        &param,
        "--asg",
        "a",
        "--image",
        "r/app",
        "history",
        "--limit",
        "2",
        "--json",
    ]);
    delete_param(&ssm, &param).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let h: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let versions: Vec<i64> = h
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["version"].as_i64().expect("v"))
        .collect();
    assert_eq!(versions, vec![3, 2], "{t}");
    assert_eq!(h[1]["value"], r#"{"tag":"v2","released_by":"jenkins"}"#);
}

#[tokio::test]
async fn status_shows_instances_of_a_real_group_and_their_drift() {
    let sdk = moto_sdk().await;
    let ssm = aws_sdk_ssm::Client::new(&sdk);
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let name = unique("skiff-status");
    let param = format!("/{name}/release");
    put_parameter(&ssm, &param, V1).await;
    let group = Group::create(&sdk, &name, 2, None).await;
    let ids = group.instances().await;
    assert_eq!(ids.len(), 2);
    ec2.create_tags()
        .resources(&ids[0])
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("skiff:release")
                .value("v1")
                .build(),
        )
        .send()
        .await
        .expect("tag");

    let out = ctl(&[
        "--parameter",
        &param,
        "--asg",
        &name,
        "--image",
        "r/app",
        "status",
        "--json",
    ]);
    let human = ctl(&[
        "--parameter",
        &param,
        "--asg",
        &name,
        "--image",
        "r/app",
        "status",
    ]);

    group.delete().await;
    delete_param(&ssm, &param).await;

    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(s["desired_tag"], "v1", "{t}");
    let instances = s["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 2, "{t}");
    let tagged = instances
        .iter()
        .find(|i| i["id"] == ids[0].as_str())
        .expect("tagged one");
    assert_eq!(tagged["release"], "v1");
    assert_eq!(tagged["zone"], "us-east-1a");
    assert_eq!(s["drift"], serde_json::json!([ids[1]]), "{t}");
    let h = text(&human);
    assert_eq!(human.status.code(), Some(0), "{h}");
    assert!(h.contains("<- drift") && h.contains(&ids[1]), "{h}");
}
