//! Over 600 lines: the tag protocol and the lifecycle hook against one emulator and IMDS
//! stand-in, each case a short test over the shared set-up.
//!
//! AwsFleet: the instance tag against moto's EC2 with a fake IMDSv2 on loopback (which also
//! serves the group name as an instance tag); the lifecycle hook with aws-smithy-mocks (moto does
//! not implement CompleteLifecycleAction), its retries with paused time.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_autoscaling::operation::complete_lifecycle_action::CompleteLifecycleActionOutput;
use aws_sdk_ec2::operation::create_tags::CreateTagsOutput;
use aws_smithy_mocks::{Rule, RuleMode, create_mock_http_client, mock};
use skiff_agent::autoscaling::{ACTION_LIMIT, AwsFleet, GROUP_TAG_PATH, HOOK_RETRY_FOR};
use skiff_agent::fleet::Fleet;
use skiff_release::Release;
use skiff_testkit::emulator::Group;
use skiff_testkit::imds::{Imds, Tags};
use support::interceptor;
use tokio::time::{Instant, sleep};

async fn moto_sdk() -> aws_config::SdkConfig {
    support::sdk_at(support::MOTO).await
}

/// The IMDSv2 stand-in, serving the group as the `aws:autoscaling:groupName` instance tag when
/// given (404 otherwise, as EC2 does when instance tags are not enabled in the metadata).
/// Returns its URL and the request lines it saw.
async fn fake_imds(instance_id: String, group: Option<&str>) -> (String, Arc<Mutex<Vec<String>>>) {
    let imds = Imds::serve(&instance_id, group, Tags::Held).await;
    (imds.url, imds.seen)
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

    let (url, seen) = fake_imds(id.clone(), Some("app-asg")).await;
    let imds = aws_config::imds::Client::builder()
        .endpoint(&url)
        .expect("endpoint")
        .build();
    let fleet = AwsFleet::discover(&imds, &sdk, None, None).await;
    assert_eq!(fleet.instance_id(), Some(id.as_str()));
    assert_eq!(fleet.group().await.expect("group"), "app-asg");
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
        .find(|t| t.key() == Some(skiff_release::INSTANCE_TAG_KEY))
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
    // EC2 and Auto Scaling behind a listener that counts the connections it gets: off EC2 the
    // fleet has no instance to speak for, so it must not call them at all.
    let aws = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let aws_url = format!("http://{}", aws.local_addr().expect("addr"));
    let connections = Arc::new(Mutex::new(0u32));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = aws.accept().await {
            *counted.lock().expect("lock") += 1;
            drop(sock);
        }
    });
    let sdk = support::sdk_at(&aws_url).await;
    let started = std::time::Instant::now();
    let fleet = AwsFleet::discover(&imds, &sdk, Some("hook".into()), None).await;
    assert_eq!(fleet.instance_id(), None);
    assert!(fleet.group().await.is_err());
    assert!(!fleet.termination_pending().await);
    fleet.release_healthy(&release("v1")).await;
    fleet.release_failed(&release("v1")).await;
    fleet.drained().await;
    fleet.retry_pending().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "off EC2 nothing waits: {:?}",
        started.elapsed()
    );
    assert_eq!(
        *connections.lock().expect("lock"),
        0,
        "no EC2 or Auto Scaling call without an instance"
    );
}

fn mocked_ec2() -> aws_sdk_ec2::Client {
    let create_tags =
        mock!(aws_sdk_ec2::Client::create_tags).then_output(|| CreateTagsOutput::builder().build());
    aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::Config::builder()
            .with_test_defaults()
            .http_client(create_mock_http_client())
            .interceptor(interceptor(RuleMode::MatchAny, &[&create_tags]))
            .build(),
    )
}

/// Auto Scaling answering CompleteLifecycleAction by `rule`. The SDK's own retries are off so
/// every attempt the agent makes is one call the rule counts.
fn mocked_autoscaling(rule: &Rule) -> aws_sdk_autoscaling::Client {
    aws_sdk_autoscaling::Client::from_conf(
        aws_sdk_autoscaling::Config::builder()
            .with_test_defaults()
            .region(aws_sdk_autoscaling::config::Region::new("us-east-1"))
            .retry_config(aws_sdk_autoscaling::config::retry::RetryConfig::disabled())
            .http_client(create_mock_http_client())
            .interceptor(interceptor(RuleMode::MatchAny, &[rule]))
            .build(),
    )
}

/// An IMDS client nobody answers: for paused-time tests, where the group is given directly.
fn unused_imds() -> aws_config::imds::Client {
    aws_config::imds::Client::builder()
        .endpoint("http://127.0.0.1:9")
        .expect("endpoint")
        .max_attempts(1)
        .build()
}

/// CompleteLifecycleAction for i-1 in app-asg, recording `hook:result` of each success.
fn recording_complete(results: Arc<Mutex<Vec<String>>>) -> Rule {
    mock!(aws_sdk_autoscaling::Client::complete_lifecycle_action)
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
        })
}

/// A fleet for i-1 whose group comes from a fake IMDS serving the instance tag.
async fn mocked_fleet(results: Arc<Mutex<Vec<String>>>) -> (AwsFleet, Rule, String) {
    let complete = recording_complete(results);
    let (url, _seen) = fake_imds("i-1".into(), Some("app-asg")).await;
    let imds = aws_config::imds::Client::builder()
        .endpoint(&url)
        .expect("endpoint")
        .build();
    let fleet = AwsFleet::with_clients(
        "i-1".into(),
        imds,
        mocked_ec2(),
        mocked_autoscaling(&complete),
        Some("skiff-launch".into()),
    );
    (fleet, complete, url)
}

#[tokio::test]
async fn healthy_completes_the_launch_hook_once_with_continue() {
    let results = Arc::new(Mutex::new(Vec::new()));
    let (fleet, complete, _) = mocked_fleet(results.clone()).await;
    fleet.release_healthy(&release("v1")).await;
    fleet.release_healthy(&release("v2")).await;
    fleet.release_failed(&release("v3")).await;
    fleet.retry_pending().await;
    assert_eq!(
        *results.lock().expect("lock"),
        vec!["skiff-launch:CONTINUE".to_owned()]
    );
    assert_eq!(complete.num_calls(), 1);
}

#[tokio::test]
async fn a_release_that_cannot_start_abandons_the_launch() {
    let results = Arc::new(Mutex::new(Vec::new()));
    let (fleet, complete, _) = mocked_fleet(results.clone()).await;
    fleet.release_failed(&release("v1")).await;
    fleet.release_failed(&release("v1")).await;
    assert_eq!(
        *results.lock().expect("lock"),
        vec!["skiff-launch:ABANDON".to_owned()]
    );
    assert_eq!(complete.num_calls(), 1);
}

#[tokio::test]
async fn without_the_group_tag_in_metadata_no_hook_call_is_made_and_the_error_says_what_to_enable()
{
    let results = Arc::new(Mutex::new(Vec::new()));
    let complete = recording_complete(results.clone());
    let (url, seen) = fake_imds("i-1".into(), None).await;
    let imds = aws_config::imds::Client::builder()
        .endpoint(&url)
        .expect("endpoint")
        .build();
    let fleet = AwsFleet::with_clients(
        "i-1".into(),
        imds,
        mocked_ec2(),
        mocked_autoscaling(&complete),
        Some("skiff-launch".into()),
    );
    assert!(
        fleet.coordinated(),
        "before the metadata said so: a group (the safe side)"
    );
    let err = fleet.group().await.expect_err("no tag").to_string();
    // An instance in no group (a standalone host) follows the parameter as configured.
    assert!(!fleet.coordinated());
    assert!(
        err.contains("InstanceMetadataTags") && err.contains("aws:autoscaling:groupName"),
        "{err}"
    );
    let started = std::time::Instant::now();
    fleet.release_healthy(&release("v1")).await;
    fleet.retry_pending().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a missing tag is not retried: {:?}",
        started.elapsed()
    );
    assert_eq!(complete.num_calls(), 0);
    assert!(
        seen.lock()
            .expect("lock")
            .iter()
            .any(|l| l.contains(GROUP_TAG_PATH)),
        "{seen:?}"
    );
}

#[tokio::test]
async fn termination_is_read_from_imds_and_the_terminate_hook_completed_once_drained() {
    let results = Arc::new(Mutex::new(Vec::new()));
    let complete = recording_complete(results.clone());
    let stand_in = Imds::serve("i-1", Some("app-asg"), Tags::Held).await;
    let lifecycle = stand_in.lifecycle.clone();
    let fleet = AwsFleet::with_clients(
        "i-1".into(),
        stand_in.client(),
        mocked_ec2(),
        mocked_autoscaling(&complete),
        None,
    )
    .with_terminate_hook(Some("skiff-terminate".into()));

    assert!(!fleet.termination_pending().await, "in service");
    *lifecycle.lock().expect("lock") = "Terminated".into();
    assert!(fleet.termination_pending().await, "being terminated");
    fleet.drained().await;
    fleet.drained().await;
    assert_eq!(
        *results.lock().expect("lock"),
        vec!["skiff-terminate:CONTINUE".to_owned()]
    );
    assert_eq!(complete.num_calls(), 1);
}

/// An Auto Scaling (awsQuery) error answer, as the service sends it: the SDK parses it like a
/// real one.
fn query_error(code: &str, message: &str) -> Option<String> {
    Some(format!(
        "<ErrorResponse xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\"><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>r-1</RequestId></ErrorResponse>"
    ))
}

fn throttled() -> Option<String> {
    query_error("Throttling", "Rate exceeded")
}

fn no_active_action() -> Option<String> {
    query_error(
        "ValidationError",
        "No active Lifecycle Action found with instance ID i-1",
    )
}

fn ok() -> CompleteLifecycleActionOutput {
    CompleteLifecycleActionOutput::builder().build()
}

/// A fleet for i-1 in app-asg (group known, no metadata service) over `rule`.
fn paused_fleet(rule: &Rule, launch: Option<&str>, terminate: Option<&str>) -> AwsFleet {
    AwsFleet::with_clients(
        "i-1".into(),
        unused_imds(),
        mocked_ec2(),
        mocked_autoscaling(rule),
        launch.map(str::to_owned),
    )
    .with_terminate_hook(terminate.map(str::to_owned))
    .with_group("app-asg")
}

/// The supervision loop's part: `retry_pending` once a second, for `how_long`.
async fn loop_turns(fleet: &AwsFleet, how_long: Duration) {
    let end = Instant::now() + how_long;
    while Instant::now() < end {
        fleet.retry_pending().await;
        sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_throttled_completion_is_retried_with_backoff_and_succeeds_once() {
    let rule = mock!(aws_sdk_autoscaling::Client::complete_lifecycle_action)
        .sequence()
        .http_status(400, throttled())
        .http_status(503, None)
        .output(ok)
        .build();
    let fleet = paused_fleet(&rule, Some("skiff-launch"), None);
    let started = Instant::now();
    fleet.release_healthy(&release("v1")).await;
    let took = started.elapsed();
    assert_eq!(rule.num_calls(), 3, "throttled, 503, then completed");
    assert!(rule.is_exhausted());
    // backoff 1 s then 2 s, each jittered by up to a fifth, never shortened
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_millis(3600),
        "{took:?}"
    );
    // Completed: neither later loop turns nor another healthy release call again.
    loop_turns(&fleet, Duration::from_secs(300)).await;
    fleet.release_healthy(&release("v2")).await;
    assert_eq!(rule.num_calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_completion_failing_longer_than_one_action_is_finished_on_later_loop_turns() {
    // Six transient failures take 1+2+4+8+16+32 s of backoff: more than one bounded action.
    let rule = mock!(aws_sdk_autoscaling::Client::complete_lifecycle_action)
        .sequence()
        .http_status(500, None)
        .times(6)
        .output(ok)
        .build();
    let fleet = paused_fleet(&rule, Some("skiff-launch"), None);
    let started = Instant::now();
    fleet.release_healthy(&release("v1")).await;
    assert!(
        started.elapsed() <= ACTION_LIMIT,
        "the loop is not held longer than one action: {:?}",
        started.elapsed()
    );
    let first_burst = rule.num_calls();
    assert!(
        (2..=6).contains(&first_burst),
        "retried within the action: {first_burst}"
    );
    loop_turns(&fleet, Duration::from_secs(300)).await;
    assert_eq!(rule.num_calls(), 7, "six failures, one success, no more");
    assert!(rule.is_exhausted());
}

#[tokio::test(start_paused = true)]
async fn no_active_lifecycle_action_ends_the_retries_at_once() {
    let rule = mock!(aws_sdk_autoscaling::Client::complete_lifecycle_action)
        .sequence()
        .http_status(400, throttled())
        .http_status(400, no_active_action())
        .repeatedly()
        .build();
    let fleet = paused_fleet(&rule, Some("skiff-launch"), Some("skiff-terminate"));
    fleet.release_healthy(&release("v1")).await;
    loop_turns(&fleet, Duration::from_secs(600)).await;
    assert_eq!(rule.num_calls(), 2, "one throttled, one 'no active action'");
    // The terminate hook is its own: tried once when drained, and not again.
    fleet.drained().await;
    loop_turns(&fleet, Duration::from_secs(600)).await;
    assert_eq!(rule.num_calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn access_denied_is_not_retried() {
    let rule = mock!(aws_sdk_autoscaling::Client::complete_lifecycle_action)
        .sequence()
        .http_status(
            403,
            query_error(
                "AccessDenied",
                "not authorized to perform: autoscaling:CompleteLifecycleAction",
            ),
        )
        .repeatedly()
        .build();
    let fleet = paused_fleet(&rule, Some("skiff-launch"), None);
    fleet.release_healthy(&release("v1")).await;
    loop_turns(&fleet, Duration::from_secs(600)).await;
    assert_eq!(rule.num_calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_until_no_heartbeat_can_be_left_then_never_again() {
    let rule = mock!(aws_sdk_autoscaling::Client::complete_lifecycle_action)
        .sequence()
        .http_status(400, throttled())
        .repeatedly()
        .build();
    let fleet = paused_fleet(&rule, Some("skiff-launch"), None);
    let started = Instant::now();
    fleet.release_healthy(&release("v1")).await;
    loop_turns(&fleet, HOOK_RETRY_FOR + Duration::from_secs(120)).await;
    let calls = rule.num_calls();
    // Backoff caps at 60 s, jittered to 60-72 s: 7200 s of retries are 100-125 calls.
    assert!((95..=130).contains(&calls), "{calls} calls");
    loop_turns(&fleet, Duration::from_secs(3600)).await;
    assert_eq!(
        rule.num_calls(),
        calls,
        "given up after {:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn the_terminate_hook_is_retried_like_the_launch_hook() {
    let rule = mock!(aws_sdk_autoscaling::Client::complete_lifecycle_action)
        .match_requests(|r| r.lifecycle_hook_name() == Some("skiff-terminate"))
        .sequence()
        .http_status(503, None)
        .times(7)
        .output(ok)
        .build();
    let fleet = paused_fleet(&rule, None, Some("skiff-terminate"));
    let started = Instant::now();
    fleet.drained().await;
    assert!(started.elapsed() <= ACTION_LIMIT, "{:?}", started.elapsed());
    assert!(rule.num_calls() < 8, "not done within one action");
    loop_turns(&fleet, Duration::from_secs(600)).await;
    assert_eq!(rule.num_calls(), 8, "seven 503s, one success, no more");
    fleet.drained().await;
    assert_eq!(rule.num_calls(), 8);
}

/// Against the emulator's Auto Scaling, which enforces the lifecycle rules (an instance held in
/// Pending:Wait by the launch hook; a completion for a hook it does not wait on is refused): a
/// healthy release completes the launch hook and the instance goes InService.
#[tokio::test]
async fn the_launch_hook_is_completed_in_the_emulator_and_the_instance_goes_in_service() {
    let sdk = moto_sdk().await;
    let name = support::unique("skiff-it-hook");
    let group = Group::create(&sdk, &name, 0, None).await;
    let (ec2, asg) = (group.ec2.clone(), group.asg.clone());
    asg.put_lifecycle_hook()
        .auto_scaling_group_name(&name)
        .lifecycle_hook_name("skiff-launch")
        .lifecycle_transition("autoscaling:EC2_INSTANCE_LAUNCHING")
        .heartbeat_timeout(300)
        .default_result("ABANDON")
        .send()
        .await
        .expect("hook");
    asg.set_desired_capacity()
        .auto_scaling_group_name(&name)
        .desired_capacity(1)
        .send()
        .await
        .expect("scale out");
    let before = group.states().await;
    let (id, state) = before.first().cloned().expect("one instance");

    let fleet = AwsFleet::with_clients(
        id.clone(),
        unused_imds(),
        ec2.clone(),
        asg.clone(),
        Some("skiff-launch".into()),
    )
    .with_group(&name);
    fleet.release_healthy(&release("v1")).await;
    let after = group.states().await;

    group.delete().await;
    assert_eq!(state, "Pending:Wait", "{before:?}");
    assert_eq!(after, [(id, "InService".to_owned())]);
}

/// The rollout's instructions are the instance tags `skiff:target` and `skiff:pull` in the
/// metadata: absent = none; a value that is not a release is ignored; a metadata service in
/// trouble is no news (the last instructions stand) and is counted.
#[tokio::test]
async fn instructions_are_read_from_the_instance_tags_in_the_metadata() {
    use skiff_agent::fleet::Instructions;
    use skiff_release::instance_tags::{PULL, TARGET};
    let imds = Imds::serve("i-1", Some("app-asg"), Tags::Held).await;
    let metrics = Arc::new(skiff_agent::metrics::Metrics::new());
    let fleet = AwsFleet::with_clients(
        "i-1".into(),
        imds.client(),
        mocked_ec2(),
        mocked_autoscaling(&recording_complete(Arc::default())),
        None,
    )
    .with_metrics(metrics.clone());
    assert!(fleet.coordinated());
    assert_eq!(fleet.instructions().await, Instructions::default());

    let pinned = "v3@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    imds.set_tag(TARGET, "v2");
    imds.set_tag(PULL, pinned);
    let want = Instructions {
        target: Some(release("v2")),
        pull: Some(skiff_release::instance_tags::decode(pinned).expect("pinned")),
    };
    assert_eq!(fleet.instructions().await, want);
    assert_eq!(
        imds.requests_for(&format!("/latest/meta-data/tags/instance/{TARGET}")),
        2,
        "one metadata read per key and turn"
    );

    // The metadata service in trouble: the last instructions stand.
    imds.tags_broken
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(fleet.instructions().await, want);
    imds.tags_broken
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let errors = metrics.encode(
        &skiff_agent::state::Snapshot::new("t".into(), skiff_agent::config::UpdateMode::Boot),
        str::to_owned,
    );
    assert!(
        errors.lines().any(
            |l| l.starts_with("skiff_agent_fleet_errors_total{kind=\"metadata\"} ")
                && !l.ends_with(" 0")
        ),
        "{errors}"
    );

    // Not a release: ignored, the other key still read.
    imds.set_tag(TARGET, "not a tag!");
    imds.remove_tag(PULL);
    assert_eq!(fleet.instructions().await, Instructions::default());
    // Removed (or empty): none.
    imds.set_tag(TARGET, "");
    assert_eq!(fleet.instructions().await, Instructions::default());
}

/// Off EC2 there is no rollout to follow.
#[tokio::test]
async fn a_disabled_fleet_is_not_coordinated_and_has_no_instructions() {
    let fleet = AwsFleet::disabled();
    assert!(!fleet.coordinated());
    assert_eq!(
        fleet.instructions().await,
        skiff_agent::fleet::Instructions::default()
    );
    assert!(fleet.pulled(&release("v1")).await);
    assert!(!skiff_agent::fleet::NoFleet.coordinated());
}

/// The answers are instance tags in moto's EC2 (`skiff:pulled`, `skiff:failed`), read back
/// through the metadata at the agent's start.
#[tokio::test]
async fn answers_are_instance_tags_in_moto_and_read_back_at_start() {
    use skiff_release::instance_tags::{FAILED, PULLED};
    let sdk = moto_sdk().await;
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let id = skiff_testkit::emulator::run_instance(&ec2).await;
    let imds = Imds::serve(&id, Some("app-asg"), Tags::Ec2(support::MOTO.into())).await;
    let fleet = AwsFleet::discover(&imds.client(), &sdk, None, None).await;
    let pinned = skiff_release::instance_tags::decode(
        "v2@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    )
    .expect("pinned");
    let fresh = fleet.answers().await;
    let pulled = fleet.pulled(&pinned).await;
    let failed = fleet.failed(Some(&release("v3"))).await;
    let describe = || {
        ec2.describe_tags().filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("resource-id")
                .values(&id)
                .build(),
        )
    };
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
    let value = |key: &str| {
        tags.tags()
            .iter()
            .find(|t| t.key() == Some(key))
            .and_then(|t| t.value())
            .map(str::to_owned)
    };
    // A restarted agent reads them back.
    let again = AwsFleet::discover(&imds.client(), &sdk, None, None)
        .await
        .answers()
        .await;
    // A withdrawn failure leaves the tag empty (the role may not delete tags), read as none.
    let withdrawn = fleet.failed(None).await;
    let after = describe().send().await.expect("describe tags");
    let failed_after = after
        .tags()
        .iter()
        .find(|t| t.key() == Some(FAILED))
        .and_then(|t| t.value())
        .map(str::to_owned);
    let forgotten = AwsFleet::discover(&imds.client(), &sdk, None, None)
        .await
        .answers()
        .await;
    ec2.terminate_instances()
        .instance_ids(&id)
        .send()
        .await
        .expect("clean up");
    assert_eq!(fresh, skiff_agent::fleet::Answers::default());
    assert!(pulled && failed);
    assert_eq!(value(PULLED).as_deref(), Some(pinned.to_string().as_str()));
    assert_eq!(value(FAILED).as_deref(), Some("v3"));
    assert_eq!(again.pulled, Some(pinned));
    assert_eq!(again.failed, Some(release("v3")));
    assert!(withdrawn);
    assert_eq!(failed_after.as_deref(), Some(""));
    assert_eq!(forgotten.failed, None);
    assert_eq!(forgotten.pulled, again.pulled);
}

/// The real agent on a fleet host: the Docker engine, the local registry, SSM and EC2 in moto,
/// and the metadata stand-in serving the instance's live moto tags. With `update = "follow"`
/// configured, a parameter written without ctl swaps nothing; the tags ctl writes do: a pull
/// answered `skiff:pulled` with no container, a target switched to and answered
/// `skiff:release`, a target that fails its gate answered `skiff:failed` with the host back on
/// the release before, and a revert.
#[test]
fn the_agent_follows_its_instance_tags_and_not_the_parameter_while_it_runs() {
    use skiff_release::instance_tags::{FAILED, PULL, PULLED, RELEASE, TARGET};
    use support::{AWS_ENV, Agent, Fixture, Moto, wait_for};
    let moto = Moto::connect();
    let mut fx = Fixture::new("rollout");
    fx.image("v1", true);
    fx.image("v2", true);
    fx.image("v3", false);
    let instance = moto.run_instance();
    let parameter = format!("/{}/release", fx.id);
    moto.put(&parameter, "v1", false);
    let imds = Imds::on_thread(
        &instance,
        Some("skiff-it-group"),
        Tags::Ec2(support::MOTO.into()),
    );
    let config = fx.write_config(&format!(
        r#"[app]
name = "{id}"
image = "{repo}"
port = {app_port}
health_path = "/health"
start_timeout = "4s"
stop_timeout = "2s"
[release]
source = "ssm"
parameter = "{parameter}"
poll_interval = "300ms"
update = "follow"
drain = "300ms"
[health]
listen = "127.0.0.1:{health_port}"
interval = "200ms"
[aws]
region = "us-east-1"
"#,
        id = fx.id,
        repo = fx.repo,
        app_port = fx.app_port,
        health_port = fx.health_port,
    ));
    // An access key of its own: the emulator counts the calls signed with it.
    let key = format!("AKIA{}", fx.id.replace('-', "").to_uppercase());
    let mut env: Vec<(&str, &str)> = AWS_ENV
        .iter()
        .map(|&(k, v)| {
            (
                k,
                if k == "AWS_ACCESS_KEY_ID" {
                    key.as_str()
                } else {
                    v
                },
            )
        })
        .collect();
    env.push(("AWS_ENDPOINT_URL", support::MOTO));
    env.push(("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url.as_str()));
    let parameter_reads = |key: &str| -> u64 {
        let (code, body) = support::http_get(
            "127.0.0.1:5055",
            &format!("/skiff-emulator/calls?key={key}"),
        )
        .expect("the emulator answers");
        assert_eq!(code, 200, "{body}");
        let calls: serde_json::Value = serde_json::from_str(&body).expect("json");
        calls["ssm:GetParameter"].as_u64().unwrap_or(0)
    };
    // Behind a lock: the agent is restarted mid-rollout.
    let agent = Mutex::new(Agent::start(&config, &env));
    let long = Duration::from_secs(60);
    let tag_is =
        |key: &str, value: &str| moto.tags(&instance).get(key).map(String::as_str) == Some(value);
    let context = || {
        format!(
            "{:#}\ntags {:?}\n{}",
            fx.status_or_null(),
            moto.tags(&instance),
            agent.lock().expect("lock").logs()
        )
    };

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        fx.wait_healthy("v1", long);
        wait_for(long, "skiff:release=v1", || tag_is(RELEASE, "v1"), context);
        let v1_container = fx.running_container();
        assert!(
            agent
                .lock()
                .expect("lock")
                .logs()
                .contains("ctl release --strategy in-place"),
            "update = follow is not honoured on a fleet, and the log says what to do"
        );

        // A parameter written without ctl: no running host swaps, nor reads it (the parameter
        // is read at boot only: issue 18, finding 3), over ten poll intervals.
        let reads = parameter_reads(&key);
        assert!(reads >= 1, "read at start: {reads}");
        moto.put(&parameter, "v2", false);
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(parameter_reads(&key), reads, "read again: {}", context());
        assert_eq!(fx.status()["stale"], false, "{}", context());
        assert_eq!(fx.status()["desired"]["tag"], "v1", "{}", context());
        assert_eq!(fx.running_container(), v1_container, "{}", context());
        assert_eq!(fx.containers().len(), 1, "{}", context());

        // Pull ahead: answered, no container.
        moto.tag(&instance, PULL, "v2");
        wait_for(long, "skiff:pulled=v2", || tag_is(PULLED, "v2"), context);
        assert_eq!(fx.containers().len(), 1, "{}", context());
        assert_eq!(fx.status()["instructions"]["pull"]["tag"], "v2");

        // Switch.
        moto.tag(&instance, TARGET, "v2");
        fx.wait_healthy("v2", long);
        wait_for(long, "skiff:release=v2", || tag_is(RELEASE, "v2"), context);
        assert_eq!(fx.status()["instructions"]["target"]["tag"], "v2");

        // A target that never becomes healthy: back on v2, reported failed, not retried.
        moto.tag(&instance, PULL, "v3");
        wait_for(long, "skiff:pulled=v3", || tag_is(PULLED, "v3"), context);
        moto.tag(&instance, TARGET, "v3");
        wait_for(long, "skiff:failed=v3", || tag_is(FAILED, "v3"), context);
        fx.wait_healthy("v2", long);
        assert!(tag_is(RELEASE, "v2"), "{}", context());
        let after_failure = fx.containers().len();
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(
            fx.containers().len(),
            after_failure,
            "v3 not retried: {}",
            context()
        );
        assert_eq!(
            fx.healthz().map(|(c, b)| (c, b["tag"].clone())),
            Some((200, "v2".into()))
        );

        // The agent restarts while the failed target still stands: it adopts v2 and neither
        // tries v3 again nor loses its answer.
        {
            let mut a = agent.lock().expect("lock");
            a.sigterm();
            *a = Agent::start(&config, &env);
        }
        fx.wait_healthy("v2", long);
        std::thread::sleep(Duration::from_secs(3));
        let reads = parameter_reads(&key);
        assert_eq!(
            fx.containers().len(),
            after_failure,
            "v3 not retried after a restart: {}",
            context()
        );
        assert!(
            agent
                .lock()
                .expect("lock")
                .logs()
                .contains("it is not tried again"),
            "{}",
            context()
        );
        assert!(
            !agent
                .lock()
                .expect("lock")
                .logs()
                .contains("draining before the update"),
            "no swap after the restart: {}",
            context()
        );
        assert_eq!(fx.status()["failed_release"]["tag"], "v3");

        // ctl's revert to the release before.
        moto.tag(&instance, TARGET, "v1");
        fx.wait_healthy("v1", long);
        wait_for(long, "skiff:release=v1", || tag_is(RELEASE, "v1"), context);
        // The parameter still names v2: neither applied nor read.
        assert_eq!(parameter_reads(&key), reads, "read again: {}", context());
        assert_eq!(
            fx.healthz().map(|(c, b)| (c, b["tag"].clone())),
            Some((200, "v1".into()))
        );
    }));
    moto.terminate(&instance);
    moto.delete_path(&format!("/{}", fx.id));
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
