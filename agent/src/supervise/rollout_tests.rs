//! The loop on a fleet, with fakes: a coordinated rollout's instructions (target, pull) and the
//! answers the host gives; the parameter applies at boot only. The health gate needs an app
//! that answers, so the swap tests run in real time against [`serve_app`] on loopback, with a
//! short drain and gate.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

use super::Supervisor;
use crate::fleet::Answers;
use crate::metrics::Metrics;
use crate::supervise::fakes::{
    FakeRuntime, RecordingFleet, config, config_at, rel, running, serve_app, source, until,
};

/// A fleet host's loop, running.
struct Host {
    fleet: RecordingFleet,
    runtime: FakeRuntime,
    state: Arc<tokio::sync::watch::Sender<crate::state::Snapshot>>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// v1 runs healthy on a fleet host, adopted and reported.
async fn serving_v1(unhealthy: &[&str]) -> Host {
    serving_v1_then(unhealthy, "v1").await
}

/// As [`serving_v1`], the parameter naming `later` from its second read on.
async fn serving_v1_then(unhealthy: &[&str], later: &str) -> Host {
    let runtime = FakeRuntime::default();
    {
        let mut w = runtime.world();
        w.containers.push(running("v1"));
        w.unhealthy = unhealthy.iter().map(|t| t.to_string()).collect();
    }
    let port = serve_app(runtime.clone()).await;
    let fleet = RecordingFleet::coordinated();
    let metrics = Arc::new(Metrics::new());
    let sup = Supervisor::new(
        config_at("boot", port),
        runtime.clone(),
        source("v1", later),
        fleet.clone(),
    )
    .with_metrics(metrics.clone());
    let state = sup.state();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(sup.run(cancel.clone()));
    until(Duration::from_secs(5), "v1 reported healthy", || {
        fleet.healthy_tags() == ["v1"]
    })
    .await;
    Host {
        fleet,
        runtime,
        state,
        metrics,
        cancel,
        task,
    }
}

fn running_tag(state: &tokio::sync::watch::Sender<crate::state::Snapshot>) -> Option<String> {
    let s = state.borrow();
    s.running
        .as_ref()
        .filter(|r| r.container_running && s.app.ok && !s.draining)
        .map(|r| r.release.tag.to_string())
}

#[tokio::test]
async fn a_target_is_swapped_to_promoted_and_reported_healthy() {
    let Host {
        fleet,
        runtime,
        state,
        metrics,
        cancel,
        task,
    } = serving_v1(&[]).await;
    fleet.target(Some("v2"));
    until(Duration::from_secs(10), "v2 healthy", || {
        running_tag(&state).as_deref() == Some("v2") && fleet.healthy_tags() == ["v1", "v2"]
    })
    .await;
    cancel.cancel();
    task.await.expect("join");

    let snap = state.borrow();
    assert_eq!(
        snap.instructions.target.as_ref().map(|t| t.tag.as_str()),
        Some("v2"),
        "/status shows the target seen"
    );
    assert!(snap.coordinated);
    assert_eq!(snap.previous.as_ref().map(|p| p.tag.as_str()), Some("v1"));
    assert!(
        !snap.stale,
        "the parameter is not what runs, but no swap is pending"
    );
    assert!(fleet.failed_values().is_empty());
    let metrics = metrics.encode(&snap, str::to_owned);
    assert!(
        metrics.contains("skiff_agent_instructions_total{kind=\"target\"} 1\n"),
        "{metrics}"
    );
    let w = runtime.world();
    let old = w.containers.iter().find(|c| c.id == "adopted");
    assert!(
        old.is_some_and(|c| !c.running),
        "v1 kept stopped for a revert: {w:?}"
    );
    assert_eq!(
        w.port_conflicts, 0,
        "v1 stopped before v2 started on the app's port: {w:?}"
    );
}

#[tokio::test]
async fn a_target_that_fails_the_gate_is_reported_failed_once_and_the_host_is_back_on_the_old_release()
 {
    let Host {
        fleet,
        runtime,
        state,
        cancel,
        task,
        ..
    } = serving_v1(&["v2"]).await;
    fleet.target(Some("v2"));
    until(Duration::from_secs(10), "v2 reported failed", || {
        fleet.failed_values() == ["v2"]
    })
    .await;
    assert_eq!(running_tag(&state).as_deref(), Some("v1"), "back on v1");
    // The target stays (ctl has not reverted yet): not retried.
    sleep(Duration::from_secs(4)).await;
    cancel.cancel();
    task.await.expect("join");

    assert_eq!(fleet.failed_values(), ["v2"], "reported once");
    assert_eq!(fleet.healthy_tags(), ["v1"], "v2 never reported healthy");
    let w = runtime.world();
    assert_eq!(
        w.started_ids.len(),
        2,
        "v2 started once, v1 started again once: {w:?}"
    );
    assert_eq!(w.started_ids[1], "adopted");
    assert_eq!(running_tag(&state).as_deref(), Some("v1"));
    assert_eq!(
        state
            .borrow()
            .failed_release
            .as_ref()
            .map(|r| r.tag.as_str()),
        Some("v2")
    );
}

#[tokio::test]
async fn a_target_naming_the_previous_release_swaps_back() {
    let Host {
        fleet,
        runtime,
        state,
        cancel,
        task,
        ..
    } = serving_v1(&[]).await;
    fleet.target(Some("v2"));
    until(Duration::from_secs(10), "v2 healthy", || {
        running_tag(&state).as_deref() == Some("v2")
    })
    .await;
    // ctl's revert.
    fleet.target(Some("v1"));
    until(Duration::from_secs(10), "back on v1", || {
        running_tag(&state).as_deref() == Some("v1") && fleet.healthy_tags() == ["v1", "v2", "v1"]
    })
    .await;
    cancel.cancel();
    task.await.expect("join");
    assert!(fleet.failed_values().is_empty());
    let w = runtime.world();
    let running: Vec<_> = w.containers.iter().filter(|c| c.running).collect();
    assert_eq!(running.len(), 1, "{w:?}");
    assert!(
        w.containers
            .iter()
            .any(|c| !c.running && c.release.tag.as_str() == "v2"),
        "v2 kept stopped: {w:?}"
    );
    assert_eq!(
        state.borrow().previous.as_ref().map(|p| p.tag.as_str()),
        Some("v2")
    );
}

#[tokio::test(start_paused = true)]
async fn a_pull_instruction_pulls_without_a_container_and_is_answered_once() {
    let runtime = FakeRuntime::default();
    runtime.world().containers.push(running("v1"));
    let fleet = RecordingFleet::coordinated();
    fleet.pull(Some("v2"));
    let sup = Supervisor::new(
        config("boot"),
        runtime.clone(),
        source("v1", "v1"),
        fleet.clone(),
    );
    let state = sup.state();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(sup.run(cancel.clone()));
    sleep(Duration::from_secs(20)).await;
    cancel.cancel();
    task.await.expect("join");

    assert_eq!(fleet.pulled_values(), ["v2"]);
    let w = runtime.world();
    assert_eq!(w.pulls, ["r/app:v2"], "pulled once: {w:?}");
    assert!(w.started_ids.is_empty(), "{w:?}");
    let ids: Vec<&str> = w.containers.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["adopted"], "no container created: {w:?}");
    let snap = state.borrow();
    assert_eq!(snap.pulled.as_ref().map(|p| p.tag.as_str()), Some("v2"));
    assert_eq!(
        snap.instructions.pull.as_ref().map(|p| p.tag.as_str()),
        Some("v2")
    );
}

#[tokio::test(start_paused = true)]
async fn a_pull_that_cannot_succeed_is_reported_failed_and_its_target_never_swapped_to() {
    let runtime = FakeRuntime::default();
    {
        let mut w = runtime.world();
        w.containers.push(running("v1"));
        w.bad_images.push("v2".into());
    }
    let fleet = RecordingFleet::coordinated();
    fleet.pull(Some("v2"));
    let sup = Supervisor::new(
        config("boot"),
        runtime.clone(),
        source("v1", "v1"),
        fleet.clone(),
    );
    let cancel = CancellationToken::new();
    let task = tokio::spawn(sup.run(cancel.clone()));
    sleep(Duration::from_secs(10)).await;
    fleet.target(Some("v2"));
    sleep(Duration::from_secs(30)).await;
    cancel.cancel();
    task.await.expect("join");

    assert!(fleet.pulled_values().is_empty());
    assert_eq!(fleet.failed_values(), ["v2"], "reported once");
    let w = runtime.world();
    assert_eq!(w.pulls.len(), 1, "not pulled again: {w:?}");
    assert_eq!((w.stops, w.started_ids.len()), (0, 0), "{w:?}");
}

/// The old uncoordinated behaviour cannot happen on a fleet: a parameter change alone never
/// swaps a running container, with `update = "follow"` too. Nor is the parameter read again
/// once the host runs something (issue 18, finding 3): over 60 s of 10 s polls the source
/// named v2 after its first read, and the host never saw it.
#[tokio::test(start_paused = true)]
async fn a_parameter_change_on_a_fleet_never_swaps_a_running_container() {
    for update in ["boot", "follow"] {
        let runtime = FakeRuntime::default();
        runtime.world().containers.push(running("v1"));
        let fleet = RecordingFleet::coordinated();
        let sup = Supervisor::new(
            config(update),
            runtime.clone(),
            source("v1", "v2"),
            fleet.clone(),
        );
        let state = sup.state();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(sup.run(cancel.clone()));
        sleep(Duration::from_secs(60)).await;
        cancel.cancel();
        task.await.expect("join");

        let w = runtime.world();
        assert_eq!(
            (w.stops, w.started_ids.len(), w.pulls.len()),
            (0, 0, 0),
            "{update}: {w:?}"
        );
        let snap = state.borrow();
        assert_eq!(
            snap.desired.as_ref().map(|d| d.tag.as_str()),
            Some("v1"),
            "{update}: read at start only"
        );
        assert!(!snap.stale, "{update}: not reported stale");
        assert!(
            *fleet.reads.lock().expect("lock") >= 50,
            "instructions read every turn"
        );
    }
}

/// Restarted after reporting a target failed (ctl has not reverted it yet): the tag says so,
/// and the target is not tried again.
#[tokio::test(start_paused = true)]
async fn a_restarted_agent_does_not_retry_a_target_that_failed_here() {
    let runtime = FakeRuntime::default();
    runtime.world().containers.push(running("v1"));
    let fleet = RecordingFleet::coordinated();
    fleet.target(Some("v2"));
    *fleet.answers.lock().expect("lock") = Answers {
        pulled: Some(rel("v2")),
        failed: Some(rel("v2")),
    };
    fleet.pull(Some("v2"));
    let sup = Supervisor::new(
        config("boot"),
        runtime.clone(),
        source("v2", "v2"),
        fleet.clone(),
    );
    let cancel = CancellationToken::new();
    let task = tokio::spawn(sup.run(cancel.clone()));
    sleep(Duration::from_secs(30)).await;
    cancel.cancel();
    task.await.expect("join");

    let w = runtime.world();
    assert_eq!(
        (w.stops, w.started_ids.len(), w.pulls.len()),
        (0, 0, 0),
        "{w:?}"
    );
    assert!(fleet.failed_values().is_empty(), "not reported again");
    assert!(fleet.pulled_values().is_empty(), "not answered again");
}

/// ctl's revert (the target back on v1) withdraws the failure report, so a later rollout of
/// the same release (its cause fixed outside the image, e.g. a setting) is tried again.
#[tokio::test]
async fn after_the_revert_the_failure_is_withdrawn_and_a_later_rollout_of_it_is_tried_again() {
    let Host {
        fleet,
        runtime,
        state,
        cancel,
        task,
        ..
    } = serving_v1(&["v2"]).await;
    fleet.target(Some("v2"));
    until(Duration::from_secs(10), "v2 reported failed", || {
        fleet.failed_values() == ["v2"]
    })
    .await;
    fleet.target(Some("v1"));
    until(Duration::from_secs(5), "the failure withdrawn", || {
        fleet.failed_values() == ["v2", ""]
    })
    .await;
    assert!(state.borrow().failed_release.is_none());
    assert_eq!(running_tag(&state).as_deref(), Some("v1"));
    runtime.world().unhealthy.clear();
    fleet.target(Some("v2"));
    until(Duration::from_secs(15), "v2 healthy", || {
        running_tag(&state).as_deref() == Some("v2")
    })
    .await;
    cancel.cancel();
    task.await.expect("join");
    assert_eq!(fleet.healthy_tags(), ["v1", "v2"]);
    assert_eq!(fleet.failed_values(), ["v2", ""], "not reported again");
}

/// A fleet host whose container is gone (removed from outside) with no instruction reads the
/// parameter again, and deploys what it names now rather than what it read at start.
#[tokio::test]
async fn a_fleet_host_left_with_nothing_reads_the_parameter_again() {
    let Host {
        runtime,
        state,
        cancel,
        task,
        ..
    } = serving_v1_then(&[], "v2").await;
    runtime.world().containers.clear();
    until(Duration::from_secs(5), "v2 serving", || {
        running_tag(&state).as_deref() == Some("v2")
    })
    .await;
    cancel.cancel();
    task.await.expect("join");
    assert_eq!(
        state.borrow().desired.as_ref().map(|d| d.tag.to_string()),
        Some("v2".into())
    );
}
