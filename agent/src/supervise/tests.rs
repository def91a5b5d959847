//! The loop with fakes and paused time: orchestration only; the adapters are tested against
//! the real engine, registry and emulator in `tests/`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use skiff_release::Release;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

use super::Supervisor;
use crate::fleet::{Fleet, NoFleet};
use crate::source::SourceError;
use crate::supervise::fakes::{FakeRuntime, FakeSource, config, running, source};

#[tokio::test(start_paused = true)]
async fn an_unreachable_source_never_stops_the_running_container() {
    let runtime = FakeRuntime::default();
    runtime.world().containers.push(running("v1"));
    let unreachable = SourceError::Unreachable {
        what: "parameter".into(),
        detail: "connection refused".into(),
    };
    let source = FakeSource {
        first: Ok("v1".into()),
        rest: Err(unreachable),
        reads: Mutex::new(0),
    };
    let sup = Supervisor::new(config("follow"), runtime.clone(), source, NoFleet);
    let state = sup.state();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(sup.run(cancel.clone()));
    sleep(Duration::from_secs(600)).await;
    cancel.cancel();
    task.await.expect("join");

    let w = runtime.world();
    assert_eq!((w.stops, w.removes, w.starts.len()), (0, 0, 0), "{w:?}");
    let snap = state.borrow();
    assert_eq!(snap.desired.as_ref().map(|d| d.tag.as_str()), Some("v1"));
    assert!(
        snap.last_error
            .as_deref()
            .is_some_and(|e| e.contains("unreachable"))
    );
    assert_eq!(
        snap.running.as_ref().map(|r| r.container_id.as_str()),
        Some("adopted")
    );
}

#[tokio::test(start_paused = true)]
async fn a_rejected_value_keeps_the_current_release_and_boot_mode_only_reports_stale() {
    let runtime = FakeRuntime::default();
    runtime.world().containers.push(running("v1"));
    let source = source("v2", "not a tag!");
    let sup = Supervisor::new(config("boot"), runtime.clone(), source, NoFleet);
    let state = sup.state();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(sup.run(cancel.clone()));
    sleep(Duration::from_secs(60)).await;
    cancel.cancel();
    task.await.expect("join");

    let w = runtime.world();
    assert_eq!((w.stops, w.starts.len()), (0, 0), "{w:?}");
    let snap = state.borrow();
    assert!(snap.stale, "v2 desired, v1 running, boot mode");
    assert_eq!(snap.desired.as_ref().map(|d| d.tag.as_str()), Some("v2"));
    assert!(
        snap.last_error
            .as_deref()
            .is_some_and(|e| e.contains("rejected") && e.contains("not a tag!"))
    );
}

#[tokio::test(start_paused = true)]
async fn a_crashing_container_is_restarted_with_capped_exponential_backoff() {
    let runtime = FakeRuntime::default();
    {
        let mut w = runtime.world();
        let mut c = running("v1");
        c.running = false;
        w.containers.push(c);
        w.crash_on_start = true;
    }
    let source = source("v1", "v1");
    let sup = Supervisor::new(config("boot"), runtime.clone(), source, NoFleet);
    let state = sup.state();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(sup.run(cancel.clone()));
    sleep(Duration::from_secs(400)).await;
    cancel.cancel();
    task.await.expect("join");

    let starts = runtime.world().starts.clone();
    let gaps: Vec<u64> = starts.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect();
    // The loop observes once a second, so each gap is the backoff, jittered by up to a fifth
    // (never shortened), rounded up to a tick.
    let want = [1, 2, 4, 8, 16, 32, 60, 60];
    assert!(gaps.len() >= want.len(), "gaps {gaps:?}");
    for (got, min) in gaps.iter().zip(want) {
        assert!(*got >= min && *got <= min + min / 5 + 2, "gaps {gaps:?}");
    }
    assert_eq!(state.borrow().restart_count as usize, starts.len());
}

/// Reports termination from `pending_after` on; records when `drained` was called.
#[derive(Debug)]
struct FakeFleet {
    pending_after: Instant,
    drained_at: Arc<Mutex<Vec<Instant>>>,
}

impl Fleet for FakeFleet {
    async fn release_healthy(&self, _release: &Release) {}
    async fn release_failed(&self, _release: &Release) {}
    async fn termination_pending(&self) -> bool {
        Instant::now() >= self.pending_after
    }
    async fn drained(&self) {
        self.drained_at.lock().expect("lock").push(Instant::now());
    }
}

#[tokio::test(start_paused = true)]
async fn termination_drains_once_keeps_the_app_and_takes_no_new_release() {
    let runtime = FakeRuntime::default();
    runtime.world().containers.push(running("v1"));
    let source = source("v1", "v2");
    let start = Instant::now();
    let drained_at = Arc::new(Mutex::new(Vec::new()));
    let fleet = FakeFleet {
        pending_after: start + Duration::from_secs(5),
        drained_at: drained_at.clone(),
    };
    let sup = Supervisor::new(config("follow"), runtime.clone(), source, fleet);
    let state = sup.state();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(sup.run(cancel.clone()));
    sleep(Duration::from_secs(120)).await;
    assert!(state.borrow().draining, "draining for termination");
    cancel.cancel();
    task.await.expect("join");

    let drained = drained_at.lock().expect("lock").clone();
    assert_eq!(drained.len(), 1, "drained once: {drained:?}");
    // checked every 5 s, then the 15 s default drain
    assert!(
        drained[0] - start >= Duration::from_secs(20),
        "{:?}",
        drained[0] - start
    );
    let w = runtime.world();
    assert_eq!(
        (w.stops, w.starts.len()),
        (0, 0),
        "v2 is not deployed, v1 not stopped: {w:?}"
    );
}

/// Counts the turns the loop gives it to retry failed calls.
#[derive(Debug, Default)]
struct RetryingFleet(Arc<Mutex<u32>>);

impl Fleet for RetryingFleet {
    async fn release_healthy(&self, _release: &Release) {}
    async fn release_failed(&self, _release: &Release) {}
    async fn termination_pending(&self) -> bool {
        false
    }
    async fn drained(&self) {}
    async fn retry_pending(&self) {
        *self.0.lock().expect("lock") += 1;
    }
}

#[tokio::test(start_paused = true)]
async fn the_fleet_gets_a_turn_to_retry_every_loop_turn() {
    let runtime = FakeRuntime::default();
    runtime.world().containers.push(running("v1"));
    let source = source("v1", "v1");
    let turns = Arc::new(Mutex::new(0));
    let fleet = RetryingFleet(turns.clone());
    let sup = Supervisor::new(config("boot"), runtime, source, fleet);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(sup.run(cancel.clone()));
    sleep(Duration::from_secs(30)).await;
    cancel.cancel();
    task.await.expect("join");
    let n = *turns.lock().expect("lock");
    assert!((28..=32).contains(&n), "one turn a second: {n}");
}

#[tokio::test(start_paused = true)]
async fn sigterm_while_terminating_drains_before_stopping() {
    let runtime = FakeRuntime::default();
    runtime.world().containers.push(running("v1"));
    let source = source("v1", "v1");
    let drained_at = Arc::new(Mutex::new(Vec::new()));
    // Pending only from 2 s on: the periodic check at start saw nothing.
    let fleet = FakeFleet {
        pending_after: Instant::now() + Duration::from_secs(2),
        drained_at: drained_at.clone(),
    };
    let sup = Supervisor::new(config("boot"), runtime.clone(), source, fleet);
    let state = sup.state();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(sup.run(cancel.clone()));
    sleep(Duration::from_secs(3)).await;
    let signalled = Instant::now();
    cancel.cancel();
    task.await.expect("join");
    let drained = drained_at.lock().expect("lock").clone();
    assert_eq!(drained.len(), 1);
    assert!(
        drained[0] - signalled >= Duration::from_secs(15),
        "drained for the full drain time"
    );
    assert!(state.borrow().draining);
    assert_eq!(runtime.world().stops, 0, "the app keeps running");
}

#[tokio::test(start_paused = true)]
async fn a_dead_current_container_is_restarted_while_the_desired_release_cannot_be_pulled() {
    let runtime = FakeRuntime::default();
    {
        let mut w = runtime.world();
        let mut c = running("v1");
        c.running = false;
        w.containers.push(c);
        w.fail_pull = true;
    }
    let sup = Supervisor::new(
        config("follow"),
        runtime.clone(),
        source("v2", "v2"),
        NoFleet,
    );
    let state = sup.state();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(sup.run(cancel.clone()));
    // The pull failed at once; the restart backoff starts at 1 s.
    sleep(Duration::from_secs(5)).await;
    {
        let w = runtime.world();
        assert_eq!(
            w.started_ids,
            ["adopted"],
            "restarted within its backoff: {w:?}"
        );
        assert!(w.containers[0].running);
    }
    assert!(
        !state.borrow().starting,
        "no deploy in progress after the failed pull"
    );
    cancel.cancel();
    task.await.expect("join");
}

/// The fake engine keeps the host's rule that one port has one listener: a swap that starts
/// the new container before the old one stopped sees the new one exit at once (counted in
/// `port_conflicts`), so the loop tests above cannot pass with that order.
#[tokio::test]
async fn the_fake_engine_lets_one_container_at_a_time_listen_on_a_port() {
    use crate::runtime::ContainerRuntime;
    use crate::supervise::fakes::{free_slots, on_slot, stopped};

    // On the app's port (the drain swap): the old one runs, the new one is started first.
    let runtime = FakeRuntime::default();
    runtime.world().containers.push(running("v1"));
    runtime.world().containers.push(stopped("new", "v2", 2));
    runtime.start("new").await.expect("start");
    {
        let w = runtime.world();
        assert_eq!(w.port_conflicts, 1, "{w:?}");
        assert!(
            w.containers.iter().any(|c| c.id == "new" && !c.running),
            "the second listener exits: {w:?}"
        );
    }
    // Stop first, then start: the port is free and the new one runs.
    runtime
        .stop("adopted", Duration::from_secs(1))
        .await
        .expect("stop");
    runtime.start("new").await.expect("start");
    {
        let w = runtime.world();
        assert_eq!(w.port_conflicts, 1, "no new conflict: {w:?}");
        assert!(
            w.containers.iter().any(|c| c.id == "new" && c.running),
            "{w:?}"
        );
    }

    // On a slot (the handover): the slot really listens, so a second container there exits.
    let [slot, _] = free_slots();
    let runtime = FakeRuntime::default();
    runtime
        .world()
        .containers
        .push(on_slot("a", "v1", slot, false));
    runtime
        .world()
        .containers
        .push(on_slot("b", "v2", slot, false));
    runtime.start("a").await.expect("start");
    runtime.start("b").await.expect("start");
    let w = runtime.world();
    assert_eq!(w.port_conflicts, 1, "{w:?}");
    let running_ids: Vec<_> = w
        .containers
        .iter()
        .filter(|c| c.running)
        .map(|c| c.id.as_str())
        .collect();
    assert_eq!(running_ids, ["a"], "{w:?}");
}
