//! The real `ctl` binary against the emulator on :5055 (moto with skiff's Auto Scaling
//! extensions): `ctl status` shows each instance's target health beside its release (issue 12),
//! and a release watches the stack's alarms by default and fails, and rolls back, when one of
//! them goes to ALARM (issue 8).

mod common;

use aws_sdk_autoscaling::types::InstanceRefreshStatus;
use aws_sdk_ec2::types::Tag as Ec2Tag;
use aws_sdk_elasticloadbalancingv2::types::{ProtocolEnum, TargetDescription, TargetTypeEnum};
use common::*;
use skiff_testkit::emulator::Group;

const V1: &str = r#"{"tag":"v1"}"#;

/// An emulator group with the load balancer's client.
struct Fleet {
    group: Group,
    elb: aws_sdk_elasticloadbalancingv2::Client,
}

impl std::ops::Deref for Fleet {
    type Target = Group;
    fn deref(&self) -> &Group {
        &self.group
    }
}

/// A group of `n` instances (no hooks: InService at once) from a launch template of its own,
/// attached to `target_group` when given.
async fn fleet(prefix: &str, n: i32, target_group: Option<&str>) -> Fleet {
    let sdk = moto_sdk().await;
    Fleet {
        group: Group::create(&sdk, &unique(prefix), n, target_group).await,
        elb: aws_sdk_elasticloadbalancingv2::Client::new(&sdk),
    }
}

impl Fleet {
    /// What the agent does once its release is healthy.
    async fn report_release(&self, id: &str, tag: &str) {
        self.ec2
            .create_tags()
            .resources(id)
            .tags(Ec2Tag::builder().key("skiff:release").value(tag).build())
            .send()
            .await
            .expect("tag");
    }

    async fn delete(&self) {
        self.group.delete().await;
    }
}

/// The load balancer's view of the group's targets, as the emulator takes it (the fleet box's
/// HAProxy reports it the same way).
async fn report_target_health(group: &str, targets: serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{MOTO}/skiff-emulator/target-health"))
        .json(&serde_json::json!({"group": group, "targets": targets}))
        .send()
        .await
        .expect("emulator");
    assert!(r.status().is_success(), "{:?}", r.text().await);
}

/// A CloudWatch call in the query protocol. moto on :5055 does not check signatures; the
/// credential scope names the service.
async fn cloudwatch(params: &[(&str, &str)]) {
    let mut form = vec![("Version", "2010-08-01")];
    form.extend_from_slice(params);
    let r = reqwest::Client::new()
        .post(MOTO)
        .header(
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/monitoring/aws4_request, SignedHeaders=host, Signature=0",
        )
        .form(&form)
        .send()
        .await
        .expect("cloudwatch");
    let status = r.status();
    assert!(status.is_success(), "{params:?}: {:?}", r.text().await);
}

#[tokio::test]
async fn status_shows_target_health_beside_the_release() {
    let sdk = moto_sdk().await;
    let ssm = aws_sdk_ssm::Client::new(&sdk);
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&sdk);
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let vpc = ec2.describe_vpcs().send().await.expect("vpcs").vpcs()[0]
        .vpc_id()
        .expect("vpc")
        .to_owned();
    // Target group names: at most 32 letters, digits and hyphens; the newest digits of the
    // unique name keep it unique.
    let digits: String = unique("th").chars().filter(char::is_ascii_digit).collect();
    let tg_name = format!("th{}", &digits[digits.len().saturating_sub(30)..]);
    let tg = elb
        .create_target_group()
        .name(&tg_name)
        .protocol(ProtocolEnum::Http)
        .port(8080)
        .vpc_id(vpc)
        .target_type(TargetTypeEnum::Instance)
        .send()
        .await
        .expect("target group")
        .target_groups()[0]
        .target_group_arn()
        .expect("arn")
        .to_owned();
    let f = fleet("skiff-ctl-th", 3, Some(&tg)).await;
    let ids = f.instances().await;
    assert_eq!(ids.len(), 3, "{ids:?}");
    let (a, b, c) = (&ids[0], &ids[1], &ids[2]);
    f.report_release(a, "v1").await;
    f.report_release(b, "v1").await;
    // c: taken out of the target group; b: failing the load balancer's checks.
    f.elb
        .deregister_targets()
        .target_group_arn(&tg)
        .targets(TargetDescription::builder().id(c).build())
        .send()
        .await
        .expect("deregister");
    report_target_health(&f.name, serde_json::json!({ b: "unhealthy" })).await;
    let param = format!("/{}/release", f.name);
    put_parameter(&ssm, &param, V1).await;
    let base = [
        "--parameter",
        param.as_str(),
        "--asg",
        f.name.as_str(),
        "--image",
        "127.0.0.1:5000/skiff/app",
    ];

    let mut args = base.to_vec();
    args.extend(["--target-group", tg.as_str(), "status"]);
    let out = ctl(&args);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let line = |id: &str| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(line(a).contains("healthy") && line(a).contains("v1"), "{t}");
    assert!(
        line(b).contains("unhealthy (Target.FailedHealthChecks)") && line(b).contains("v1"),
        "{t}"
    );
    assert!(
        line(c).contains("unused (Target.NotRegistered)") && line(c).contains("(not reported)"),
        "{t}"
    );
    assert!(!t.contains("note:"), "{t}");

    args.insert(0, "--json");
    let out = ctl(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let health: Vec<(String, String, String)> = doc["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap_or_default().to_owned(),
                i["target_health"].as_str().unwrap_or_default().to_owned(),
                i["release"].as_str().unwrap_or("-").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        health,
        vec![
            (a.clone(), "healthy".into(), "v1".into()),
            (b.clone(), "unhealthy".into(), "v1".into()),
            (c.clone(), "unused".into(), "-".into()),
        ],
        "{doc}"
    );
    assert_eq!(doc["deployment"]["target_group"], tg.as_str());
    assert!(doc["target_health_error"].is_null(), "{doc}");

    // No target group known: the releases still, and a note that says what to pass.
    let mut args = base.to_vec();
    args.push("status");
    let out = ctl(&args);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(line(a).contains("v1"), "{t}");
    assert!(
        t.contains("note: target health unknown") && t.contains("--target-group"),
        "{t}"
    );

    // A target group that does not exist: a note, not a failure.
    let mut args = base.to_vec();
    let missing = tg.replace(&tg_name, "nope");
    args.extend(["--target-group", missing.as_str(), "status"]);
    let out = ctl(&args);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("note: target health unknown: cannot describe"),
        "{t}"
    );

    report_target_health(&f.name, serde_json::json!({})).await;
    f.delete().await;
    let _ = elb.delete_target_group().target_group_arn(&tg).send().await;
    delete_param(&ssm, &param).await;
}

#[tokio::test]
async fn a_release_fails_and_rolls_back_when_a_stack_alarm_goes_to_alarm() {
    let sdk = moto_sdk().await;
    let ssm = aws_sdk_ssm::Client::new(&sdk);
    let cfn = aws_sdk_cloudformation::Client::new(&sdk);
    let f = fleet("skiff-ctl-alarm", 1, None).await;
    let before = f.instances().await;
    let (alarm, other) = (format!("{}-5xx", f.name), format!("{}-hosts", f.name));
    for name in [&alarm, &other] {
        cloudwatch(&[
            ("Action", "PutMetricAlarm"),
            ("AlarmName", name),
            ("Namespace", "AWS/ApplicationELB"),
            ("MetricName", "HTTPCode_Target_5XX_Count"),
            ("Statistic", "Sum"),
            ("Period", "60"),
            ("EvaluationPeriods", "1"),
            ("Threshold", "1"),
            ("ComparisonOperator", "GreaterThanThreshold"),
        ])
        .await;
    }
    let param = format!("/{}/release", f.name);
    put_parameter(&ssm, &param, V1).await;
    // The stack names the alarms (output ReleaseAlarmNames) as templates/app.yaml does.
    let stack = f.name.clone();
    let template = serde_json::json!({
        "Resources": {"Nothing": {"Type": "AWS::SSM::Parameter", "Properties": {
            "Name": format!("{param}-unused"), "Type": "String", "Value": "x"}}},
        "Outputs": {
            "ReleaseParameter": {"Value": param},
            "AutoScalingGroup": {"Value": f.name},
            "ImageRepository": {"Value": "127.0.0.1:5000/skiff/app"},
            "ReleaseAlarmNames": {"Value": format!("{alarm},{other}")}
        }
    });
    cfn.create_stack()
        .stack_name(&stack)
        .template_body(template.to_string())
        .send()
        .await
        .expect("stack");
    // The release broke the app: its 5xx alarm is in ALARM while the refresh runs.
    cloudwatch(&[
        ("Action", "SetAlarmState"),
        ("AlarmName", &alarm),
        ("StateValue", "ALARM"),
        ("StateReason", "5xx rate above 5 %"),
    ])
    .await;
    let out = ctl(&[
        "--stack",
        &stack,
        "release",
        "--tag",
        "v2",
        "--skip-verify",
        "--warmup",
        "0s",
        "--poll",
        "200ms",
        "--timeout",
        "60s",
    ]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "rolled back: {t}");
    assert!(
        t.contains(&format!(
            "failing if any of these alarms goes to ALARM: {alarm}, {other}"
        )),
        "the release watches the stack's alarms: {t}"
    );
    assert!(
        t.contains("ended Failed") && t.contains(&alarm),
        "the reason names the alarm: {t}"
    );
    assert!(
        t.contains("(rollback), watching no alarm"),
        "the rollback refresh watches none: {t}"
    );
    let value = read_param(&ssm, &param).await.expect("parameter");
    assert!(value.contains(r#""tag":"v1""#), "{value}");
    let refreshes = f
        .asg
        .describe_instance_refreshes()
        .auto_scaling_group_name(&f.name)
        .send()
        .await
        .expect("refreshes");
    let seen: Vec<(Option<InstanceRefreshStatus>, usize)> = refreshes
        .instance_refreshes()
        .iter()
        .map(|r| {
            (
                r.status().cloned(),
                r.preferences()
                    .and_then(|p| p.alarm_specification())
                    .map_or(0, |a| a.alarms().len()),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (Some(InstanceRefreshStatus::Successful), 0),
            (Some(InstanceRefreshStatus::Failed), 2)
        ],
        "newest first: the rollback (no alarms) succeeded, the release (2 alarms) failed"
    );

    // --no-alarms: the same release is not stopped by the alarm.
    let out = ctl(&[
        "--stack",
        &stack,
        "release",
        "--tag",
        "v2",
        "--skip-verify",
        "--no-alarms",
        "--warmup",
        "0s",
        "--poll",
        "200ms",
        "--timeout",
        "60s",
    ]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("(release), watching no alarm"), "{t}");
    assert!(
        f.instances().await.iter().all(|i| !before.contains(i)),
        "replaced"
    );
    // --alarm and --no-alarms together: refused before anything is done.
    let out = ctl(&[
        "--stack",
        &stack,
        "release",
        "--tag",
        "v3",
        "--skip-verify",
        "--no-alarms",
        "--alarm",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    let _ = cfn.delete_stack().stack_name(&stack).send().await;
    f.delete().await;
    for name in [&alarm, &other] {
        cloudwatch(&[("Action", "DeleteAlarms"), ("AlarmNames.member.1", name)]).await;
    }
    delete_param(&ssm, &param).await;
    delete_param(&ssm, &format!("{param}-lock")).await;
}
