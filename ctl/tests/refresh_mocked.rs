//! The release procedure with Auto Scaling mocked (moto implements no instance refreshes) and
//! the parameter in moto's SSM: success, failure with a compensating rollback, rollback
//! failure, a refresh already running, and a timeout.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_autoscaling::operation::cancel_instance_refresh::CancelInstanceRefreshOutput;
use aws_sdk_autoscaling::operation::describe_instance_refreshes::DescribeInstanceRefreshesOutput;
use aws_sdk_autoscaling::operation::describe_scaling_activities::DescribeScalingActivitiesOutput;
use aws_sdk_autoscaling::operation::start_instance_refresh::StartInstanceRefreshOutput;
use aws_sdk_autoscaling::types::{InstanceRefresh, InstanceRefreshStatus, RefreshPreferences};
use aws_smithy_mocks::{MockResponse, mock};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::http::StatusCode;
use aws_smithy_types::body::SdkBody;
use common::*;
use skiff_ctl::exit::ExitCode;
use skiff_ctl::lock::SsmLock;
use skiff_ctl::refresh::{AsgRefresher, RefreshPlan};
use skiff_ctl::registry::{DigestResolver, RegistryError};
use skiff_ctl::ship::{self, Adapters, Outcome, Request, ShipError, Target};
use skiff_ctl::signal::Stop;
use skiff_ctl::store::SsmStore;
use skiff_release::{Digest, Release, Tag};

const V1: &str = r#"{"tag":"v1","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","released_by":"ci"}"#;
const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

struct FakeResolver;

impl DigestResolver for FakeResolver {
    async fn resolve(&self, _repository: &str, _tag: &Tag) -> Result<Digest, RegistryError> {
        Ok(D2.parse().expect("digest"))
    }
}

/// What the mocked Auto Scaling does.
#[derive(Default)]
struct Script {
    /// The group's newest refresh before the release.
    latest: Option<&'static str>,
    /// Per refresh id, the states answered in turn (the last repeats).
    states: HashMap<&'static str, Vec<&'static str>>,
    /// State answered for any id once a cancel was requested.
    after_cancel: Option<&'static str>,
    /// Answers to start calls in turn: Some(id) or None for InstanceRefreshInProgress.
    starts: Vec<Option<&'static str>>,
}

#[derive(Default)]
struct Seen {
    starts: u32,
    cancels: u32,
    preferences: Vec<RefreshPreferences>,
}

fn refresh(id: &str, status: &str) -> InstanceRefresh {
    InstanceRefresh::builder()
        .instance_refresh_id(id)
        .status(InstanceRefreshStatus::from(status))
        .percentage_complete(if status == "Successful" { 100 } else { 40 })
        .status_reason(format!("{status} (mock)"))
        .build()
}

fn autoscaling(script: Script) -> (aws_sdk_autoscaling::Client, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let script = Arc::new(Mutex::new(script));
    let (s1, s2, s3) = (script.clone(), script.clone(), script.clone());
    let (seen1, seen2) = (seen.clone(), seen.clone());
    let describe = mock!(aws_sdk_autoscaling::Client::describe_instance_refreshes)
        .then_compute_output(move |req| {
            let mut s = s1.lock().expect("lock");
            let found = match req.instance_refresh_ids().first() {
                None => s.latest.map(|st| refresh("r-0", st)),
                Some(id) => {
                    let state = match (s.after_cancel, s.states.get_mut(id.as_str())) {
                        (Some(st), _) => st,
                        (None, Some(list)) if list.len() > 1 => list.remove(0),
                        (None, Some(list)) => list[0],
                        (None, None) => "Pending",
                    };
                    Some(refresh(id, state))
                }
            };
            DescribeInstanceRefreshesOutput::builder()
                .set_instance_refreshes(found.map(|r| vec![r]))
                .build()
        });
    let start = mock!(aws_sdk_autoscaling::Client::start_instance_refresh).then_compute_response(
        move |req| {
            let mut seen = seen1.lock().expect("lock");
            seen.starts += 1;
            seen.preferences.extend(req.preferences().cloned());
            let mut s = s2.lock().expect("lock");
            // A new refresh is not cancelled.
            s.after_cancel = None;
            match s.starts.remove(0) {
                Some(id) => MockResponse::Output(
                    StartInstanceRefreshOutput::builder()
                        .instance_refresh_id(id)
                        .build(),
                ),
                // A modeled error from the mock trips this SDK version's orchestrator, so
                // the fault comes as the wire answer Auto Scaling gives.
                None => MockResponse::Http(HttpResponse::new(
                    StatusCode::try_from(400u16).expect("status"),
                    SdkBody::from(
                        "<ErrorResponse><Error><Type>Sender</Type><Code>InstanceRefreshInProgress</Code>\
                         <Message>An Instance Refresh is already in progress</Message></Error>\
                         <RequestId>r</RequestId></ErrorResponse>",
                    ),
                )),
            }
        },
    );
    let cancel = mock!(aws_sdk_autoscaling::Client::cancel_instance_refresh).then_compute_output(
        move |_| {
            seen2.lock().expect("lock").cancels += 1;
            s3.lock().expect("lock").after_cancel = Some("Cancelled");
            CancelInstanceRefreshOutput::builder()
                .instance_refresh_id("r-1")
                .build()
        },
    );
    let activities = mock!(aws_sdk_autoscaling::Client::describe_scaling_activities)
        .then_output(|| DescribeScalingActivitiesOutput::builder().build());
    // The refresh reads the group to size MaxHealthy to the target quota: none here.
    let group = mock!(aws_sdk_autoscaling::Client::describe_auto_scaling_groups).then_output(|| {
        aws_sdk_autoscaling::operation::describe_auto_scaling_groups::DescribeAutoScalingGroupsOutput::builder()
            .build()
    });
    (
        mocked_autoscaling(&[&describe, &start, &cancel, &activities, &group]),
        seen,
    )
}

fn request(timeout: Duration) -> Request {
    Request {
        target: Target::Tag {
            tag: "v2".parse().expect("tag"),
            verify: true,
        },
        released_by: "tester".into(),
        owner: "tester@test/1".into(),
        dry_run: false,
        wait: true,
        rollback: true,
        timeout,
        poll: Duration::from_millis(10),
        wait_lock: Duration::ZERO,
        plan: RefreshPlan::default(),
        rollout: None,
        ctl: "ctl".into(),
    }
}

/// Run one release against a fresh parameter holding V1; returns the result, the parameter's
/// value afterwards, and what Auto Scaling saw.
async fn release(
    script: Script,
    req: Request,
) -> (Result<Outcome, ShipError>, Release, Arc<Mutex<Seen>>) {
    let ssm = aws_sdk_ssm::Client::new(&moto_sdk().await);
    let param = format!("/{}/release", unique("mocked"));
    ssm.put_parameter()
        .name(&param)
        .value(V1)
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .send()
        .await
        .expect("seed");
    let (client, seen) = autoscaling(script);
    let store = SsmStore::new(ssm.clone(), &param);
    let refresher = AsgRefresher::new(client, "app-asg");
    let lock = SsmLock::for_parameter(ssm.clone(), &param);
    let fleet = Adapters {
        parameter: &param,
        image: "127.0.0.1:5000/skiff/app",
        store: &store,
        refresher: &refresher,
        resolver: &FakeResolver,
        lock: &lock,
    };
    let (_handle, mut stop) = Stop::new();
    let result = ship::ship(&fleet, &req, &mut stop, &mut |_| {}).await;
    let value = read_param(&ssm, &param).await.expect("value");
    assert_eq!(
        read_param(&ssm, &format!("{param}-lock")).await,
        None,
        "the lock is let go on every path"
    );
    delete_param(&ssm, &param).await;
    (result, Release::parse(&value).expect("record"), seen)
}

/// The previous release (V1's tag and digest) is back, marked as a compensation.
fn assert_restored(now: &Release) {
    let v1 = Release::parse(V1).expect("v1");
    assert_eq!((&now.tag, &now.digest), (&v1.tag, &v1.digest), "{now:?}");
    assert_eq!(now.meta_str("kind"), Some("compensation"), "{now:?}");
    assert!(skiff_ctl::history::compensates(now).is_some(), "{now:?}");
}

#[tokio::test]
async fn refresh_success_releases_the_pinned_digest() {
    let script = Script {
        states: HashMap::from([("r-1", vec!["Pending", "InProgress", "Successful"])]),
        starts: vec![Some("r-1")],
        ..Script::default()
    };
    let (result, now, seen) = release(script, request(Duration::from_secs(60))).await;
    let outcome = result.expect("released");
    assert!(matches!(outcome, Outcome::Released { .. }), "{outcome:?}");
    assert_eq!(outcome.exit_code(), ExitCode::Success);
    assert_eq!(now.tag.as_str(), "v2");
    assert_eq!(now.digest.as_ref().map(Digest::as_str), Some(D2));
    assert_eq!(now.meta_str("released_by"), Some("tester"));
    assert!(now.meta_str("released_at").is_some());
    let seen = seen.lock().expect("lock");
    assert_eq!(seen.starts, 1);
    let p = &seen.preferences[0];
    assert_eq!(p.skip_matching(), Some(false), "every instance is replaced");
    assert_eq!(p.min_healthy_percentage(), Some(100));
    assert_eq!(p.max_healthy_percentage(), Some(200));
    assert_eq!(p.instance_warmup(), Some(30));
}

#[tokio::test]
async fn failure_is_rolled_back_to_the_previous_record() {
    let script = Script {
        states: HashMap::from([
            ("r-1", vec!["InProgress", "Failed"]),
            ("r-2", vec!["InProgress", "Successful"]),
        ]),
        starts: vec![Some("r-1"), Some("r-2")],
        ..Script::default()
    };
    let (result, now, seen) = release(script, request(Duration::from_secs(60))).await;
    let outcome = result.expect("outcome");
    assert_eq!(outcome.exit_code(), ExitCode::RolledBack, "{outcome:?}");
    assert_restored(&now);
    assert_eq!(seen.lock().expect("lock").starts, 2);
}

#[tokio::test]
async fn a_failed_rollback_exits_3_with_advice() {
    let script = Script {
        states: HashMap::from([("r-1", vec!["Failed"]), ("r-2", vec!["RollbackFailed"])]),
        starts: vec![Some("r-1"), Some("r-2")],
        ..Script::default()
    };
    let (result, _now, _seen) = release(script, request(Duration::from_secs(60))).await;
    let outcome = result.expect("outcome");
    assert_eq!(outcome.exit_code(), ExitCode::NotRolledBack, "{outcome:?}");
    let Outcome::NotRolledBack { advice, .. } = outcome else {
        panic!("not rolled back expected");
    };
    assert!(advice.contains("ctl rollback --to v1"), "{advice}");
}

#[tokio::test]
async fn no_rollback_leaves_the_new_release_and_says_what_to_do() {
    let script = Script {
        states: HashMap::from([("r-1", vec!["Failed"])]),
        starts: vec![Some("r-1")],
        ..Script::default()
    };
    let mut req = request(Duration::from_secs(60));
    req.rollback = false;
    let (result, now, seen) = release(script, req).await;
    let outcome = result.expect("outcome");
    assert_eq!(outcome.exit_code(), ExitCode::NotRolledBack, "{outcome:?}");
    assert_eq!(now.tag.as_str(), "v2");
    assert_eq!(seen.lock().expect("lock").starts, 1);
}

#[tokio::test]
async fn a_running_refresh_refuses_with_exit_4_and_changes_nothing() {
    let script = Script {
        latest: Some("InProgress"),
        ..Script::default()
    };
    let (result, now, seen) = release(script, request(Duration::from_secs(60))).await;
    let err = result.expect_err("busy");
    assert_eq!(err.exit_code(), ExitCode::Busy, "{err}");
    assert_eq!(now, Release::parse(V1).expect("v1"));
    assert_eq!(seen.lock().expect("lock").starts, 0);
}

#[tokio::test]
async fn a_refresh_started_meanwhile_restores_the_record_and_exits_4() {
    let script = Script {
        starts: vec![None],
        ..Script::default()
    };
    let (result, now, _seen) = release(script, request(Duration::from_secs(60))).await;
    let err = result.expect_err("busy");
    assert_eq!(err.exit_code(), ExitCode::Busy, "{err}");
    assert_restored(&now);
}

#[tokio::test]
async fn timeout_cancels_and_rolls_back() {
    let script = Script {
        states: HashMap::from([("r-1", vec!["InProgress"]), ("r-2", vec!["Successful"])]),
        starts: vec![Some("r-1"), Some("r-2")],
        ..Script::default()
    };
    let (result, now, seen) = release(script, request(Duration::from_millis(60))).await;
    let outcome = result.expect("outcome");
    assert_eq!(outcome.exit_code(), ExitCode::RolledBack, "{outcome:?}");
    let Outcome::RolledBack { reason, .. } = &outcome else {
        panic!("{outcome:?}");
    };
    assert!(reason.contains("did not finish within"), "{reason}");
    assert_restored(&now);
    let seen = seen.lock().expect("lock");
    assert_eq!((seen.cancels, seen.starts), (1, 2));
}
