//! The handover at the depth of fakes and paused time: an engine that lets one container
//! listen per port, slot ports on loopback answering for the containers on them, and the
//! kernel redirect as a value. What is checked: a new release is routed only after its gate,
//! the old one serves until then, a failure after the flip flips back, and a restarted agent
//! settles on one container with the redirect on it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

use super::Supervisor;
use super::fakes::{FakeRedirect, FakeRuntime, free_slots, handover_config, on_slot, source};
use crate::fleet::NoFleet;
use crate::journal::{Journal, SwapIntent};

/// Runs the loop for `secs` (paused time) with v1 running on the first slot and routed.
async fn run_for(
    runtime: &FakeRuntime,
    redirect: &FakeRedirect,
    slots: [u16; 2],
    tags: (&str, &str),
    journal: Option<Journal>,
    secs: u64,
) -> Arc<tokio::sync::watch::Sender<crate::state::Snapshot>> {
    let mut sup = Supervisor::new(
        handover_config(slots),
        runtime.clone(),
        source(tags.0, tags.1),
        NoFleet,
    )
    .with_redirect(Arc::new(redirect.clone()));
    if let Some(j) = journal {
        sup = sup.with_journal(j);
    }
    let state = sup.state();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(sup.run(cancel.clone()));
    sleep(Duration::from_secs(secs)).await;
    cancel.cancel();
    task.await.expect("join");
    state
}

/// v1 runs on the first slot, listening there, and the redirect names it.
fn v1_serving() -> (FakeRuntime, FakeRedirect, [u16; 2]) {
    let runtime = FakeRuntime::default();
    let slots = free_slots();
    runtime
        .world()
        .containers
        .push(on_slot("old", "v1", slots[0], true));
    assert!(runtime.listen("old", slots[0]));
    let redirect = FakeRedirect::default();
    redirect.world().pointing = Some(slots[0]);
    (runtime, redirect, slots)
}

fn running_tags(runtime: &FakeRuntime) -> Vec<(String, Option<u16>)> {
    runtime
        .world()
        .containers
        .iter()
        .filter(|c| c.running)
        .map(|c| (c.release.tag.to_string(), c.slot))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_release_starts_beside_the_old_one_and_the_port_flips_after_its_gate() {
    let (runtime, redirect, slots) = v1_serving();
    let state = run_for(&runtime, &redirect, slots, ("v1", "v2"), None, 30).await;

    assert_eq!(
        redirect.world().points,
        [slots[1]],
        "one flip, to the idle slot"
    );
    assert_eq!(running_tags(&runtime), [("v2".to_owned(), Some(slots[1]))]);
    let w = runtime.world();
    assert_eq!(
        w.port_conflicts, 0,
        "never two containers on one port: {w:?}"
    );
    assert!(
        w.containers.iter().any(|c| c.id == "old" && !c.running),
        "the old one stopped after the hold and is kept for rollback: {w:?}"
    );
    let snap = state.borrow();
    assert_eq!(
        snap.running.as_ref().map(|r| r.release.tag.as_str()),
        Some("v2")
    );
    assert!(
        !snap.draining,
        "a handover never drains through the load balancer"
    );
}

#[tokio::test(start_paused = true)]
async fn a_release_that_fails_its_gate_is_never_routed_and_the_old_one_serves_untouched() {
    let (runtime, redirect, slots) = v1_serving();
    runtime.world().unhealthy.push("v2".into());
    let state = run_for(&runtime, &redirect, slots, ("v1", "v2"), None, 30).await;

    assert!(redirect.world().points.is_empty(), "never flipped");
    assert_eq!(redirect.world().pointing, Some(slots[0]));
    assert_eq!(running_tags(&runtime), [("v1".to_owned(), Some(slots[0]))]);
    assert_eq!(
        runtime.world().stops,
        1,
        "only the failed new one was stopped"
    );
    assert_eq!(
        state
            .borrow()
            .failed_release
            .as_ref()
            .map(|r| r.tag.as_str()),
        Some("v2")
    );
}

#[tokio::test(start_paused = true)]
async fn a_release_failing_after_the_flip_is_flipped_back_while_the_old_one_runs() {
    let (runtime, redirect, slots) = v1_serving();
    // The new release turns unhealthy as soon as the port flips to it.
    let (r, rt) = (redirect.clone(), runtime.clone());
    tokio::spawn(async move {
        loop {
            if !r.world().points.is_empty() {
                rt.world().unhealthy.push("v2".into());
                return;
            }
            sleep(Duration::from_millis(10)).await;
        }
    });
    let state = run_for(&runtime, &redirect, slots, ("v1", "v2"), None, 30).await;

    assert_eq!(
        redirect.world().points,
        [slots[1], slots[0]],
        "flipped, then back"
    );
    assert_eq!(running_tags(&runtime), [("v1".to_owned(), Some(slots[0]))]);
    let snap = state.borrow();
    assert_eq!(
        snap.failed_release.as_ref().map(|r| r.tag.as_str()),
        Some("v2")
    );
    assert_eq!(
        snap.running.as_ref().map(|r| r.release.tag.as_str()),
        Some("v1")
    );
}

/// Killed mid-handover: the journal names the swap; the kernel says whether the flip happened.
#[tokio::test(start_paused = true)]
async fn an_interrupted_handover_settles_on_what_the_kernel_names() {
    for (pointing_new, want_tag) in [(true, "v2"), (false, "v1")] {
        let runtime = FakeRuntime::default();
        let slots = free_slots();
        {
            let mut w = runtime.world();
            w.containers.push(on_slot("old", "v1", slots[0], true));
            w.containers.push(on_slot("new", "v2", slots[1], true));
        }
        assert!(runtime.listen("old", slots[0]) && runtime.listen("new", slots[1]));
        let redirect = FakeRedirect::default();
        redirect.world().pointing = Some(if pointing_new { slots[1] } else { slots[0] });
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Journal::new(dir.path(), "t");
        journal
            .record(&SwapIntent {
                from: "old".into(),
                to: "new".into(),
            })
            .expect("record");
        // The source names what the kernel names, so nothing else swaps afterwards.
        let _ = run_for(
            &runtime,
            &redirect,
            slots,
            (want_tag, want_tag),
            Some(journal.clone()),
            10,
        )
        .await;
        let want_slot = if pointing_new { slots[1] } else { slots[0] };
        assert_eq!(
            running_tags(&runtime),
            [(want_tag.to_owned(), Some(want_slot))],
            "flipped = {pointing_new}"
        );
        assert_eq!(redirect.world().pointing, Some(want_slot));
        assert_eq!(journal.read().expect("read"), None, "journal cleared");
    }
}

/// After a reboot: the rules are gone and the containers stopped. The redirect is written
/// again before the restarted container can be reported healthy.
#[tokio::test(start_paused = true)]
async fn after_a_reboot_the_redirect_is_written_again() {
    let runtime = FakeRuntime::default();
    let slots = free_slots();
    runtime
        .world()
        .containers
        .push(on_slot("cur", "v1", slots[1], false));
    let redirect = FakeRedirect::default();
    let state = run_for(&runtime, &redirect, slots, ("v1", "v1"), None, 10).await;
    assert_eq!(redirect.world().pointing, Some(slots[1]));
    assert_eq!(running_tags(&runtime), [("v1".to_owned(), Some(slots[1]))]);
    assert_eq!(
        state
            .borrow()
            .running
            .as_ref()
            .map(|r| r.container_id.as_str()),
        Some("cur")
    );
}
