//! SIGTERM during a release, through the real binary: the parameter in moto's SSM. The first
//! signal cancels the refresh, waits for it to stop, puts the previous release back and starts
//! the rollback refresh (exit 1); a second one exits at once (exit 3) with the state and the
//! commands that finish the job.
//!
//! The first case runs on the emulator's instance refreshes. The others need timing the
//! emulator does not give (a cancel that never completes, an Auto Scaling outage after two
//! answers, an abandoned launch seen in the scaling activities while the refresh still says
//! InProgress) and run the binary against the scripted fake in `common::fake_autoscaling`
//! (aws-smithy-mocks reaches only clients built inside the test process).

mod common;

use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use common::fake_autoscaling::{FakeAutoScaling, Script};
use common::*;
use skiff_release::Release;
use skiff_testkit::emulator::Group;

const V1: &str = r#"{"tag":"v1","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","released_by":"seed"}"#;

fn start(fake: &FakeAutoScaling, param: &str) -> Child {
    ctl_command(
        &release_args(param, "app-asg", "v2", "20ms", &["--timeout", "120s"]),
        &[("AWS_ENDPOINT_URL_AUTO_SCALING", &fake.url)],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn ctl")
}

fn sigterm(child: &Child) {
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -TERM {}", child.id());
}

/// Wait (at most 20 s) until the fake has seen `n` calls of `action`.
fn wait_for(fake: &FakeAutoScaling, action: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.seen().count(action) < n {
        assert!(
            Instant::now() < deadline,
            "no {action} within 20 s: {:?}",
            fake.seen().actions
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Wait for the child to exit, at most `limit`; kill it and fail otherwise.
fn finish(mut child: Child, limit: Duration) -> (Output, Duration) {
    let t0 = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("ctl did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (child.wait_with_output().expect("output"), t0.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_the_refresh_cancels_it_and_restores_the_previous_release() {
    const HOOK: &str = "skiff-launch";
    let ssm = aws_sdk_ssm::Client::new(&moto_sdk().await);
    let param = format!("/{}/release", unique("sigterm"));
    put_parameter(&ssm, &param, V1).await;
    // The release refresh never ends by itself: its replacement waits for the launch hook.
    let g = Group::create(&moto_sdk().await, &unique("sigterm"), 1, None).await;
    g.hold_launches(HOOK, 300).await;
    let child = ctl_command(
        &release_args(&param, &g.name, "v2", "200ms", &["--timeout", "120s"]),
        &[],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn ctl");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !g.states().await.iter().any(|(_, s)| s == "Pending:Wait") {
        assert!(Instant::now() < deadline, "{:?}", g.refreshes().await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (release_refresh, _) = g.refreshes().await.remove(0);
    sigterm(&child);
    // Once the release's refresh is cancelled, the agents answer: the rollback refresh's
    // replacement is let in.
    while g
        .refreshes()
        .await
        .iter()
        .any(|(id, s)| *id == release_refresh && (s == "Pending" || s == "InProgress"))
    {
        assert!(
            Instant::now() < deadline + Duration::from_secs(20),
            "not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let answering = g.stand_in_agents(HOOK, 0);
    let (out, _) = tokio::task::block_in_place(|| finish(child, Duration::from_secs(60)));
    let value = read_param(&ssm, &param).await.expect("value");
    let lock = read_param(&ssm, &format!("{param}-lock")).await;
    delete_param(&ssm, &param).await;
    let refreshes = g.refreshes().await;
    answering.abort();
    g.delete().await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("interrupted by SIGTERM"), "{t}");
    assert!(
        t.contains(&format!("cancelling instance refresh {release_refresh}")),
        "{t}"
    );
    // Cancelled once; the rollback refresh starts only once the cancelled one let go of the
    // group (Auto Scaling, and the emulator, refuse a second refresh while one is active).
    let statuses: Vec<&str> = refreshes.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(statuses.len(), 2, "{refreshes:?}\n{t}");
    assert_eq!(
        refreshes[1],
        (release_refresh, "Cancelled".to_owned()),
        "{t}"
    );
    let now = Release::parse(&value).expect("record");
    let v1 = Release::parse(V1).expect("v1");
    assert_eq!((&now.tag, &now.digest), (&v1.tag, &v1.digest), "{t}");
    assert_eq!(now.meta_str("kind"), Some("compensation"), "{t}");
    assert_eq!(lock, None, "the lock is let go: {t}");
}

#[tokio::test]
async fn a_second_sigterm_exits_at_once_with_the_state_and_how_to_finish() {
    let ssm = aws_sdk_ssm::Client::new(&moto_sdk().await);
    let param = format!("/{}/release", unique("sigterm2"));
    let lock = format!("{param}-lock");
    put_parameter(&ssm, &param, V1).await;
    let fake = FakeAutoScaling::start(Script {
        refreshes: vec![vec!["Pending", "InProgress"]],
        // The cancel never completes: only a second signal ends ctl before its bound.
        after_cancel: vec!["Cancelling"],
        ..Script::default()
    });
    let child = start(&fake, &param);
    wait_for(&fake, "StartInstanceRefresh", 1);
    wait_for(&fake, "DescribeInstanceRefreshes", 3);
    sigterm(&child);
    wait_for(&fake, "CancelInstanceRefresh", 1);
    std::thread::sleep(Duration::from_millis(200));
    sigterm(&child);
    let (out, took) = finish(child, Duration::from_secs(10));
    let value = read_param(&ssm, &param).await.expect("value");
    let held = read_param(&ssm, &lock).await;
    delete_param(&ssm, &param).await;
    delete_param(&ssm, &lock).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(3), "{t}");
    assert!(took < Duration::from_secs(2), "exited after {took:?}: {t}");
    for needle in [
        "second SIGTERM",
        "holds the new release",
        "r-1",
        &format!("--parameter {param}"),
        "unlock --force",
        "rollback --to v1",
    ] {
        assert!(t.contains(needle), "{needle:?} missing: {t}");
    }
    assert_eq!(
        Release::parse(&value).expect("record").tag.as_str(),
        "v2",
        "nothing written back while the refresh may run: {t}"
    );
    assert!(held.is_some(), "the lock is still held, as reported: {t}");
    assert_eq!(fake.seen().starts.len(), 1, "{t}");
}

#[tokio::test]
async fn describe_errors_beyond_the_tolerance_write_nothing_back_and_are_logged() {
    let ssm = aws_sdk_ssm::Client::new(&moto_sdk().await);
    let param = format!("/{}/release", unique("unknown"));
    put_parameter(&ssm, &param, V1).await;
    let fake = FakeAutoScaling::start(Script {
        // The refresh fails, but the API goes away before ctl can see it.
        refreshes: vec![vec!["Pending", "InProgress", "Failed"], vec!["Successful"]],
        describe_fails_after: Some(2),
        ..Script::default()
    });
    let child = start(&fake, &param);
    let (out, _) = finish(child, Duration::from_secs(30));
    let value = read_param(&ssm, &param).await.expect("value");
    let history = ssm
        .get_parameter_history()
        .name(&param)
        .send()
        .await
        .expect("history")
        .parameters
        .unwrap_or_default()
        .len();
    let lock = read_param(&ssm, &format!("{param}-lock")).await;
    delete_param(&ssm, &param).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(3), "{t}");
    assert!(t.contains("unknown") && t.contains("ScriptedOutage"), "{t}");
    assert!(t.contains("nothing was written back"), "{t}");
    assert!(t.contains("rollback --to v1"), "the command to finish: {t}");
    // The retries before giving up are logged through tracing (stderr).
    assert!(t.matches("retrying").count() >= 4, "warnings visible: {t}");
    assert_eq!(
        Release::parse(&value).expect("record").tag.as_str(),
        "v2",
        "{t}"
    );
    assert_eq!(history, 2, "the seed and the release only: {t}");
    assert_eq!(fake.seen().starts.len(), 1, "no rollback refresh: {t}");
    assert_eq!(lock, None, "{t}");
}

#[tokio::test]
async fn an_abandoned_launch_fails_the_release_at_once_not_at_the_timeout() {
    let ssm = aws_sdk_ssm::Client::new(&moto_sdk().await);
    let param = format!("/{}/release", unique("abandon"));
    put_parameter(&ssm, &param, V1).await;
    let fake = FakeAutoScaling::start(Script {
        // The refresh itself would run until the 120 s timeout.
        refreshes: vec![vec!["Pending", "InProgress"], vec!["Successful"]],
        activities: vec![(
            "Cancelled",
            "Launching a new EC2 instance: i-0abc. Status Reason: Instance failed to complete user's Lifecycle Action: Lifecycle Action with token 0fc6 was abandoned: Lifecycle Action Completed with ABANDON Result",
            "At 2026-01-01T00:00:00Z an instance was launched in response to an instance refresh.",
        )],
        ..Script::default()
    });
    let child = ctl_command(
        &release_args(
            &param,
            "app-asg",
            "v2",
            "20ms",
            &["--timeout", "120s", "--bake-time", "5m"],
        ),
        &[("AWS_ENDPOINT_URL_AUTO_SCALING", &fake.url)],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn");
    let (out, took) = finish(child, Duration::from_secs(20));
    let value = read_param(&ssm, &param).await.expect("value");
    delete_param(&ssm, &param).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(took < Duration::from_secs(10), "took {took:?}: {t}");
    assert!(t.contains("was abandoned") && t.contains("i-0abc"), "{t}");
    let seen = fake.seen();
    assert_eq!(seen.count("CancelInstanceRefresh"), 1, "{t}");
    assert_eq!(seen.starts.len(), 2, "rolled back: {t}");
    assert_eq!(
        seen.starts[0]
            .get("Preferences.BakeTime")
            .map(String::as_str),
        Some("300"),
        "--bake-time is the refresh's BakeTime"
    );
    assert_eq!(
        Release::parse(&value).expect("record").tag.as_str(),
        "v1",
        "{t}"
    );
}
