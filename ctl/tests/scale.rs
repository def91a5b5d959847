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
