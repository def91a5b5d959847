//! ctl against a group of 250 instances in the emulator on :5055, which refuses an EC2 filter
//! with more than 200 values (`FilterLimitExceeded`, as AWS does): `ctl status` and the
//! in-place rollout's read of the fleet (every wait's tick) must read the instance tags in
//! chunks (issue 18, finding 1). Each read runs under an access key of its own, so the
//! emulator's call counter (`/skiff-emulator/calls`) says what one read asks of AWS.

mod common;

use aws_sdk_ec2::types::Tag as Ec2Tag;
use common::*;
use skiff_ctl::inplace::{AwsHosts, InPlaceFleet};
use skiff_release::instance_tags;
use skiff_testkit::emulator::{Group, sdk_signed};

const N: usize = 250;

/// The calls signed with access key `key`, by `service:Action`.
async fn calls(key: &str) -> serde_json::Value {
    reqwest::get(format!("{MOTO}/skiff-emulator/calls?key={key}"))
        .await
        .expect("emulator")
        .json()
        .await
        .expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_the_in_place_read_of_250_instances_stay_within_the_filter_limit() {
    let sdk = moto_sdk().await;
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let ssm = aws_sdk_ssm::Client::new(&sdk);
    let name = unique("skiff-ctl-scale");
    let group = Group::create(&sdk, &name, N as i32, None).await;
    let ids = group.instances().await;
    assert_eq!(ids.len(), N);
    // Every agent reports v1, the last one v2: tags of both chunks must come back.
    for (chunk, value) in [(&ids[..N - 1], "v1"), (&ids[N - 1..], "v2")] {
        ec2.create_tags()
            .set_resources(Some(chunk.to_vec()))
            .tags(
                Ec2Tag::builder()
                    .key(instance_tags::RELEASE)
                    .value(value)
                    .build(),
            )
            .send()
            .await
            .expect("tag");
    }
    let param = format!("/{name}/release");
    put_parameter(&ssm, &param, r#"{"tag":"v1"}"#).await;

    // ctl status, as a person runs it.
    let key = unique("status").replace('-', "");
    let out = ctl_env(
        &[
            "--parameter",
            &param,
            "--asg",
            &name,
            "--image",
            "127.0.0.1:5000/skiff/app",
            "--json",
            "status",
        ],
        &[("AWS_ACCESS_KEY_ID", &key)],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let releases: Vec<&str> = doc["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| i["release"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(releases.len(), N, "{t}");
    assert_eq!(releases.iter().filter(|r| **r == "v1").count(), N - 1);
    assert_eq!(doc["drift"], serde_json::json!([ids[N - 1]]));
    let status_calls = calls(&key).await;
    println!("ctl status, {N} instances: {status_calls}");
    assert_eq!(status_calls["ec2:DescribeTags"], 2, "{status_calls}");
    assert_eq!(
        status_calls["autoscaling:DescribeAutoScalingGroups"], 1,
        "{status_calls}"
    );

    // One tick of an in-place wait: the group's InService instances with their skiff tags.
    let key = unique("tick").replace('-', "");
    let sdk = sdk_signed(MOTO, &key).await;
    let hosts = AwsHosts {
        asg: name.clone(),
        target_group: None,
        autoscaling: aws_sdk_autoscaling::Client::new(&sdk),
        ec2: aws_sdk_ec2::Client::new(&sdk),
        elb: aws_sdk_elasticloadbalancingv2::Client::new(&sdk),
        cloudwatch: aws_sdk_cloudwatch::Client::new(&sdk),
    };
    let read = hosts.hosts().await.expect("hosts");
    assert_eq!(read.len(), N);
    assert_eq!(read[N - 1].release.as_deref(), Some("v2"));
    assert!(
        read[..N - 1]
            .iter()
            .all(|h| h.release.as_deref() == Some("v1"))
    );
    let tick_calls = calls(&key).await;
    println!("one in-place read of {N} instances: {tick_calls}");
    assert_eq!(
        tick_calls,
        serde_json::json!({
            "autoscaling:DescribeAutoScalingGroups": 1,
            "ec2:DescribeTags": 2,
        })
    );

    group.delete().await;
    delete_param(&ssm, &param).await;
}

/// Issue 18, finding 4: a shared load balancer counts every branch's targets against its
/// quota of 1,000 (the emulator refuses RegisterTargets past it, limits.py). A refresh of a
/// group whose load balancer already holds 999 targets of another target group is sized to the
/// one target left: refused at 100 % / 200 % before it starts, started at 100 % with
/// --min-healthy 0 (terminate first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_counts_the_other_target_groups_on_a_shared_load_balancer() {
    use aws_sdk_elasticloadbalancingv2::types::{
        Action, ActionTypeEnum, ProtocolEnum, TargetDescription, TargetTypeEnum,
    };
    let sdk = moto_sdk().await;
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&sdk);
    let ssm = aws_sdk_ssm::Client::new(&sdk);
    let name = unique("skiff-ctl-sharedlb");
    let digits: String = name.chars().filter(char::is_ascii_digit).collect();
    let short = &digits[digits.len().saturating_sub(20)..];
    let vpc = ec2.describe_vpcs().send().await.expect("vpcs").vpcs()[0]
        .vpc_id()
        .expect("vpc")
        .to_owned();
    let subnets: Vec<String> = ec2
        .describe_subnets()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("vpc-id")
                .values(&vpc)
                .build(),
        )
        .send()
        .await
        .expect("subnets")
        .subnets()
        .iter()
        .filter_map(|s| s.subnet_id().map(str::to_owned))
        .take(2)
        .collect();
    let lb = elb
        .create_load_balancer()
        .name(format!("lb{short}"))
        .set_subnets(Some(subnets))
        .send()
        .await
        .expect("load balancer")
        .load_balancers()[0]
        .load_balancer_arn()
        .expect("arn")
        .to_owned();
    let tg = |n: &str, kind: TargetTypeEnum| {
        elb.create_target_group()
            .name(format!("{n}{short}"))
            .protocol(ProtocolEnum::Http)
            .port(8080)
            .vpc_id(&vpc)
            .target_type(kind)
            .send()
    };
    let own = tg("own", TargetTypeEnum::Instance)
        .await
        .expect("own tg")
        .target_groups()[0]
        .target_group_arn()
        .expect("arn")
        .to_owned();
    let other = tg("oth", TargetTypeEnum::Ip)
        .await
        .expect("other tg")
        .target_groups()[0]
        .target_group_arn()
        .expect("arn")
        .to_owned();
    for (port, arn) in [(80, &own), (81, &other)] {
        elb.create_listener()
            .load_balancer_arn(&lb)
            .protocol(ProtocolEnum::Http)
            .port(port)
            .default_actions(
                Action::builder()
                    .r#type(ActionTypeEnum::Forward)
                    .target_group_arn(arn)
                    .build(),
            )
            .send()
            .await
            .expect("listener");
    }
    // Another branch's 999 targets on the same load balancer.
    let targets: Vec<TargetDescription> = (0..999)
        .map(|i| {
            TargetDescription::builder()
                .id(format!("172.31.{}.{}", i / 250, i % 250 + 1))
                .build()
        })
        .collect();
    elb.register_targets()
        .target_group_arn(&other)
        .set_targets(Some(targets))
        .send()
        .await
        .expect("999 targets");
    let group = Group::create(&sdk, &name, 1, Some(&own)).await;
    let param = format!("/{name}/release");
    put_parameter(&ssm, &param, r#"{"tag":"v1"}"#).await;
    let release = |extra: &[&str]| {
        let mut a = release_args(&param, &name, "v2", "200ms", &["--strategy", "refresh"]);
        a.extend_from_slice(&["--no-wait", "--no-alarms"]);
        a.extend_from_slice(extra);
        a.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>()
    };
    let refreshes = || async {
        group
            .asg
            .describe_instance_refreshes()
            .auto_scaling_group_name(&name)
            .send()
            .await
            .expect("refreshes")
            .instance_refreshes()
            .to_vec()
    };

    let a = release(&[]);
    let out =
        tokio::task::spawn_blocking(move || ctl(&a.iter().map(String::as_str).collect::<Vec<_>>()))
            .await
            .expect("ctl");
    let t = text(&out);
    assert_ne!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("the load balancer's other target groups hold 999 of its 1000")
            && t.contains("--min-healthy"),
        "{t}"
    );
    assert!(refreshes().await.is_empty(), "no refresh started: {t}");

    let a = release(&["--min-healthy", "0"]);
    let out =
        tokio::task::spawn_blocking(move || ctl(&a.iter().map(String::as_str).collect::<Vec<_>>()))
            .await
            .expect("ctl");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let started = refreshes().await;
    assert_eq!(
        started
            .first()
            .and_then(|r| r.preferences())
            .and_then(|p| p.max_healthy_percentage()),
        Some(100),
        "one target left: no launch before terminate: {started:?}"
    );
    let _ = group
        .asg
        .cancel_instance_refresh()
        .auto_scaling_group_name(&name)
        .send()
        .await;
    group.delete().await;
    delete_param(&ssm, &param).await;
    delete_param(&ssm, &format!("{param}-lock")).await;
    elb.delete_load_balancer()
        .load_balancer_arn(&lb)
        .send()
        .await
        .expect("delete lb");
    for arn in [&own, &other] {
        let _ = elb.delete_target_group().target_group_arn(arn).send().await;
    }
}
