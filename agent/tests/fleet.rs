//! AwsFleet: the instance tag against moto's EC2 with a fake IMDSv2 on loopback; the lifecycle
//! hook with aws-smithy-mocks (moto does not implement lifecycle actions).

use std::sync::{Arc, Mutex};

use aws_sdk_autoscaling::operation::complete_lifecycle_action::CompleteLifecycleActionOutput;
use aws_sdk_autoscaling::operation::describe_auto_scaling_instances::DescribeAutoScalingInstancesOutput;
use aws_sdk_autoscaling::types::AutoScalingInstanceDetails;
use aws_sdk_ec2::operation::create_tags::CreateTagsOutput;
use aws_smithy_mocks::{MockResponseInterceptor, Rule, RuleMode, create_mock_http_client, mock};
use skiff_agent::fleet::{AwsFleet, RELEASE_TAG_KEY};
use skiff_agent::supervise::Fleet;
use skiff_release::Release;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MOTO: &str = "http://127.0.0.1:5055";

async fn moto_sdk() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(MOTO)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .load()
        .await
}

/// A tiny IMDSv2: answers the token PUT, and GETs only with that token. Returns its URL and
/// the request lines it saw.
async fn fake_imds(instance_id: String) -> (String, Arc<Mutex<Vec<String>>>) {
    fake_imds_in(instance_id, Arc::new(Mutex::new("InService".into()))).await
}

/// As [`fake_imds`], also serving the target lifecycle state held in `lifecycle`.
async fn fake_imds_in(
    instance_id: String,
    lifecycle: Arc<Mutex<String>>,
) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let id = instance_id.clone();
            let log = log.clone();
            let state = lifecycle.lock().expect("lock").clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut n = 0;
                while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k,
                    }
                }
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let line = req.lines().next().unwrap_or_default().to_owned();
                log.lock().expect("lock").push(line.clone());
                let has_token = req
                    .lines()
                    .any(|l| l.eq_ignore_ascii_case("x-aws-ec2-metadata-token: tok-123"));
                let (status, body) = match line.split_whitespace().take(2).collect::<Vec<_>>()[..] {
                    ["PUT", "/latest/api/token"] => ("200 OK", "tok-123".to_owned()),
                    ["GET", _] if !has_token => ("401 Unauthorized", String::new()),
                    ["GET", "/latest/meta-data/instance-id"] => ("200 OK", id),
                    ["GET", "/latest/meta-data/placement/region"] => {
                        ("200 OK", "us-east-1".to_owned())
                    }
                    [
                        "GET",
                        "/latest/meta-data/autoscaling/target-lifecycle-state",
                    ] => ("200 OK", state),
                    _ => ("404 Not Found", String::new()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nx-aws-ec2-metadata-token-ttl-seconds: 21600\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (url, seen)
}

fn release(tag: &str) -> Release {
    Release::new(tag.parse().expect("tag"), None)
}

#[tokio::test]
async fn tags_its_own_instance_in_moto_ec2() {
    let sdk = moto_sdk().await;
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let images = ec2.describe_images().send().await.expect("describe images");
    let ami = images
        .images()
        .iter()
        .find_map(|i| i.image_id().map(str::to_owned))
        .expect("moto has an AMI");
    let run = ec2
        .run_instances()
        .image_id(ami)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .expect("run instance");
    let id = run.instances()[0]
        .instance_id()
        .expect("instance id")
        .to_owned();

    let (url, seen) = fake_imds(id.clone()).await;
    let imds = aws_config::imds::Client::builder()
        .endpoint(&url)
        .expect("endpoint")
        .build();
    let fleet = AwsFleet::discover(&imds, &sdk, None, None).await;
    assert_eq!(fleet.instance_id(), Some(id.as_str()));
    assert!(
        seen.lock().expect("lock")[0].starts_with("PUT /latest/api/token"),
        "token first (IMDSv2): {seen:?}"
    );
    fleet.release_healthy(&release("v7")).await;

    let tags = ec2
        .describe_tags()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("resource-id")
                .values(&id)
                .build(),
        )
        .send()
        .await
        .expect("describe tags");
    let value = tags
        .tags()
        .iter()
        .find(|t| t.key() == Some(RELEASE_TAG_KEY))
        .and_then(|t| t.value());
    ec2.terminate_instances()
        .instance_ids(&id)
        .send()
        .await
        .expect("clean up");
    assert_eq!(value, Some("v7"));
}

#[tokio::test]
async fn no_imds_means_no_fleet_duties() {
    // A closed port: nothing answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    let imds = aws_config::imds::Client::builder()
        .endpoint(&url)
        .expect("endpoint")
        .max_attempts(1)
        .build();
    let fleet = AwsFleet::discover(&imds, &moto_sdk().await, Some("hook".into()), None).await;
    assert_eq!(fleet.instance_id(), None);
    fleet.release_healthy(&release("v1")).await;
    fleet.release_failed(&release("v1")).await;
}

/// The SDK in use predates `mock_client!`'s test defaults, so the client is assembled here.
fn interceptor(rules: &[&Rule]) -> MockResponseInterceptor {
    rules.iter().fold(
        MockResponseInterceptor::new().rule_mode(RuleMode::MatchAny),
        |i, r| i.with_rule(r),
    )
}

fn mocked_fleet(results: Arc<Mutex<Vec<String>>>) -> (AwsFleet, Rule) {
    let create_tags =
        mock!(aws_sdk_ec2::Client::create_tags).then_output(|| CreateTagsOutput::builder().build());
    let ec2 = aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::Config::builder()
            .with_test_defaults()
            .http_client(create_mock_http_client())
            .interceptor(interceptor(&[&create_tags]))
            .build(),
    );
    let describe = mock!(aws_sdk_autoscaling::Client::describe_auto_scaling_instances)
        .match_requests(|r| r.instance_ids() == ["i-1"])
        .then_output(|| {
            DescribeAutoScalingInstancesOutput::builder()
                .auto_scaling_instances(
                    AutoScalingInstanceDetails::builder()
                        .instance_id("i-1")
                        .auto_scaling_group_name("app-asg")
                        .availability_zone("us-east-1a")
                        .lifecycle_state("Pending:Wait")
                        .health_status("HEALTHY")
                        .protected_from_scale_in(false)
                        .build(),
                )
                .build()
        });
    let complete = mock!(aws_sdk_autoscaling::Client::complete_lifecycle_action)
        .match_requests(|r| {
            r.auto_scaling_group_name() == Some("app-asg") && r.instance_id() == Some("i-1")
        })
        .then_compute_output(move |r| {
            results.lock().expect("lock").push(format!(
                "{}:{}",
                r.lifecycle_hook_name().unwrap_or_default(),
                r.lifecycle_action_result().unwrap_or_default()
            ));
            CompleteLifecycleActionOutput::builder().build()
        });
    let autoscaling = aws_sdk_autoscaling::Client::from_conf(
        aws_sdk_autoscaling::Config::builder()
            .with_test_defaults()
            .http_client(create_mock_http_client())
            .interceptor(interceptor(&[&describe, &complete]))
            .build(),
    );
    let fleet = AwsFleet::with_clients("i-1".into(), ec2, autoscaling, Some("skiff-launch".into()));
    (fleet, complete)
}

#[tokio::test]
async fn healthy_completes_the_launch_hook_once_with_continue() {
    let results = Arc::new(Mutex::new(Vec::new()));
    let (fleet, complete) = mocked_fleet(results.clone());
    fleet.release_healthy(&release("v1")).await;
    fleet.release_healthy(&release("v2")).await;
    fleet.release_failed(&release("v3")).await;
    assert_eq!(
        *results.lock().expect("lock"),
        vec!["skiff-launch:CONTINUE".to_owned()]
    );
    assert_eq!(complete.num_calls(), 1);
}

#[tokio::test]
async fn a_release_that_cannot_start_abandons_the_launch() {
    let results = Arc::new(Mutex::new(Vec::new()));
    let (fleet, _complete) = mocked_fleet(results.clone());
    fleet.release_failed(&release("v1")).await;
    fleet.release_failed(&release("v1")).await;
    assert_eq!(
        *results.lock().expect("lock"),
        vec!["skiff-launch:ABANDON".to_owned()]
    );
}

#[tokio::test]
async fn termination_is_read_from_imds_and_the_terminate_hook_completed_once_drained() {
    let results = Arc::new(Mutex::new(Vec::new()));
    let (fleet, _complete) = mocked_fleet(results.clone());
    let lifecycle = Arc::new(Mutex::new("InService".to_owned()));
    let (url, _seen) = fake_imds_in("i-1".into(), lifecycle.clone()).await;
    let imds = aws_config::imds::Client::builder()
        .endpoint(&url)
        .expect("endpoint")
        .build();
    let fleet = fleet.with_termination(Some("skiff-terminate".into()), imds);

    assert!(!fleet.termination_pending().await, "in service");
    *lifecycle.lock().expect("lock") = "Terminated".into();
    assert!(fleet.termination_pending().await, "being terminated");
    fleet.drained().await;
    fleet.drained().await;
    assert_eq!(
        *results.lock().expect("lock"),
        vec!["skiff-terminate:CONTINUE".to_owned()]
    );
}
