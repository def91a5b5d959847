//! Over 600 lines: one scenario per test, each spelling out the steps and the instructions it
//! expects in full, so that a failure reads as a diff of the rollout.
//!
//! The in-place rollout end to end with fakes and paused time: `ship_with` over the shared
//! fakes of the parameter and the lock (`ship/tests/fakes.rs`) and a fleet of simulated hosts
//! whose agents follow the instance-tag protocol by the contract's rules
//! (`inplace/fake.rs`). Each test checks the outcome, the steps reported and the instructions
//! ctl wrote, in order and when.

use std::time::Duration;

use skiff_release::instance_tags::{self, FAILED, PULL, TARGET};
use tokio::time::sleep;

use super::super::tests::fakes::{World, request};
use super::*;
use crate::exit::ExitCode;
use crate::history;
use crate::inplace::fake::{self, Call, FakeFleet};
use crate::inplace::{BatchSize, HELD, MAX_POLL};
use crate::ship::{Request, ShipError};

/// What the fake resolver resolves `v2` to, and the seeded previous release, as tag values.
const NEW: &str = "v2@sha256:2222222222222222222222222222222222222222222222222222222222222222";
const PREV: &str = "v1@sha256:1111111111111111111111111111111111111111111111111111111111111111";

fn plan(swap: SwapMode, batch: Option<usize>, bake_secs: u64) -> RolloutPlan {
    RolloutPlan {
        batch: batch.map(BatchSize::Count),
        swap,
        bake: Duration::from_secs(bake_secs),
        batch_timeout: Duration::from_secs(120),
        pull_timeout: Duration::from_secs(60),
        ..RolloutPlan::default()
    }
}

fn in_place(plan: RolloutPlan) -> Request {
    let mut req = request();
    req.poll = Duration::from_secs(1);
    req.rollout = Some(plan);
    req
}

fn ids(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

async fn roll(w: &World, fleet: &FakeFleet, req: &Request) -> (Outcome, Vec<Event>) {
    let (_handle, mut stop) = Stop::new();
    let (r, events) = w.ship_with(fleet, req, &mut stop).await;
    (r.expect("an outcome"), events)
}

/// The tag of a release in its tag-value form.
fn tag_of(value: &str) -> String {
    instance_tags::decode(value)
        .expect("a release")
        .tag
        .to_string()
}

/// The steps of a run in short, without the waits' progress lines.
fn outline(events: &[Event]) -> Vec<String> {
    let join = |v: &[String]| v.join(" ");
    events
        .iter()
        .filter_map(|e| match e {
            Event::Written { purpose, value, .. } => Some(format!(
                "write {purpose:?} {}",
                skiff_release::Release::parse(value).expect("a release").tag
            )),
            Event::Stopping { signal } => Some(format!("stopping {signal}")),
            Event::RollingBack { to, .. } => Some(format!("rolling back to {}", tag_of(to))),
            Event::Rollout(step) => match step {
                RolloutStep::Waiting { .. } => None,
                RolloutStep::Plan { batches, .. } => Some(format!(
                    "plan {}",
                    batches
                        .iter()
                        .map(|b| format!("[{}]", join(b)))
                        .collect::<String>()
                )),
                RolloutStep::Pulling { release, instances } => {
                    Some(format!("pull {} {}", tag_of(release), join(instances)))
                }
                RolloutStep::Pulled { .. } => Some("pulled".into()),
                RolloutStep::Held { processes, .. } => Some(format!("hold {}", join(processes))),
                RolloutStep::Switching {
                    batch,
                    batches,
                    instances,
                    ..
                } => Some(format!("switch {batch}/{batches} {}", join(instances))),
                RolloutStep::Healthy { batch, batches, .. } => {
                    Some(format!("healthy {batch}/{batches}"))
                }
                RolloutStep::Baked { batch, .. } => Some(format!("baked {batch}")),
                RolloutStep::Settled { .. } => Some("settled".into()),
                RolloutStep::LateJoiners { instances } => {
                    Some(format!("late joiners {}", join(instances)))
                }
                RolloutStep::Reverting { instances, to, .. } => {
                    Some(format!("revert {} to {}", join(instances), tag_of(to)))
                }
                RolloutStep::Reverted { .. } => Some("reverted".into()),
                RolloutStep::AlarmsQuiet { alarms, .. } => {
                    Some(format!("alarms quiet {}", join(alarms)))
                }
                RolloutStep::AlarmsUnwatched { alarms, .. } => {
                    Some(format!("alarms unwatched {}", join(alarms)))
                }
                RolloutStep::Resumed { processes, error } => Some(format!(
                    "resume {}{}",
                    join(processes),
                    error
                        .as_deref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                )),
                other => Some(format!("{other:?}")),
            },
            _ => None,
        })
        .collect()
}

/// The writes of `key` in short: `i-1 i-2 v2` (the instances, then the value's tag).
fn instructions(fleet: &FakeFleet, key: &str) -> Vec<String> {
    fleet
        .writes(key)
        .into_iter()
        .map(|(_, ids, v)| format!("{} {}", ids.join(" "), tag_of(&v)))
        .collect()
}

/// The reason of a run that reverted and wrote the previous release back.
fn rolled_back(outcome: &Outcome) -> &str {
    match outcome {
        Outcome::RolledBack { reason, to } if to == PREV => reason,
        other => panic!("not rolled back to {PREV}: {other:?}"),
    }
}

/// Every host's agent reports `tag` running.
fn all_run(fleet: &FakeFleet, tag: &str) {
    let running = fleet.running();
    assert!(
        running.values().all(|t| t == tag),
        "not all on {tag}: {running:?}"
    );
}

/// The group's health checks were held for the swaps and resumed at the end.
fn held_and_resumed(fleet: &FakeFleet) {
    let holds: Vec<(Vec<String>, bool)> = fleet
        .calls()
        .into_iter()
        .filter_map(|(_, c)| match c {
            Call::Hold { processes, suspend } => Some((processes, suspend)),
            Call::Tag { .. } => None,
        })
        .collect();
    let held: Vec<String> = HELD.iter().map(|p| (*p).to_owned()).collect();
    assert_eq!(holds, vec![(held.clone(), true), (held, false)]);
    assert!(
        fleet.suspended().suspended.is_empty(),
        "{:?}",
        fleet.suspended()
    );
}

/// The previous record is the parameter's last value, marked as compensating this run's write.
fn written_back(w: &World) {
    let values = w.store.all();
    assert_eq!(values.len(), 3, "seed, release, previous: {values:?}");
    let last = w.store.last();
    assert_eq!(last.to_string(), PREV);
    assert_eq!(
        history::compensates(&last),
        Some(2),
        "names the failed version"
    );
}

#[tokio::test(start_paused = true)]
async fn a_clean_handover_rollout_pulls_everywhere_then_switches_a_canary_and_bakes_each_batch() {
    let w = World::new(vec![]);
    let fleet = FakeFleet::new(5, "v1", SwapMode::Handover);
    let req = in_place(plan(SwapMode::Handover, Some(2), 30));
    let (outcome, events) = roll(&w, &fleet, &req).await;

    let Outcome::RolledOut {
        release,
        instances,
        switched,
        batches,
        ..
    } = &outcome
    else {
        panic!("{outcome:?}");
    };
    assert_eq!(release, NEW);
    assert_eq!(instances, &ids(&["i-1", "i-2", "i-3", "i-4", "i-5"]));
    assert_eq!((*switched, *batches), (5, 3));
    assert_eq!(
        outline(&events),
        vec![
            "write Release v2",
            "plan [i-1][i-2 i-3][i-4 i-5]",
            "pull v2 i-1 i-2 i-3 i-4 i-5",
            "pulled",
            "hold HealthCheck ReplaceUnhealthy",
            "switch 1/3 i-1",
            "healthy 1/3",
            "baked 1",
            "switch 2/3 i-2 i-3",
            "healthy 2/3",
            "baked 2",
            "switch 3/3 i-4 i-5",
            "healthy 3/3",
            "baked 3",
            "resume HealthCheck ReplaceUnhealthy",
        ],
        "a bake of 30 s covers the agents' hold: no separate settle"
    );
    // The instructions: one pull everywhere, then each batch's target only after the batch
    // before ran healthy (a swap) and baked (30 s).
    let pulls = fleet.writes(PULL);
    assert_eq!(pulls.len(), 1);
    assert_eq!((pulls[0].1.len(), pulls[0].2.as_str()), (5, NEW));
    let targets = fleet.writes(TARGET);
    assert_eq!(
        targets
            .iter()
            .map(|(_, ids, v)| (ids.clone(), v.clone()))
            .collect::<Vec<_>>(),
        vec![
            (ids(&["i-1"]), NEW.to_owned()),
            (ids(&["i-2", "i-3"]), NEW.to_owned()),
            (ids(&["i-4", "i-5"]), NEW.to_owned()),
        ]
    );
    assert!(targets[0].0 >= fake::PULL, "targets after the pull");
    for pair in targets.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            gap >= fake::SWAP + Duration::from_secs(30),
            "the next batch {:?} only {gap:?} after the one before",
            pair[1].1
        );
    }
    for step in &events {
        if let Event::Rollout(RolloutStep::Baked { secs, .. }) = step {
            assert!(*secs >= 30.0, "baked {secs} s");
        }
    }
    held_and_resumed(&fleet);
    all_run(&fleet, "v2");
    assert_eq!(w.store.all().len(), 2, "nothing written back");
    assert_eq!(w.refresher.starts(), 0, "no instance refresh in place");
    assert!(w.unlocked());
}

#[tokio::test(start_paused = true)]
async fn a_clean_drain_rollout_waits_for_the_load_balancer_and_a_handover_for_the_hold() {
    // Drain: batches of one, no canary; each batch is healthy only once the load balancer
    // passed its checks again after the swap.
    let w = World::new(vec![]);
    let fleet = FakeFleet::new(3, "v1", SwapMode::Drain);
    let (outcome, events) = roll(&w, &fleet, &in_place(plan(SwapMode::Drain, None, 0))).await;
    assert_eq!(outcome.exit_code(), ExitCode::Success, "{outcome:?}");
    assert_eq!(
        outline(&events)[1..],
        [
            "plan [i-1][i-2][i-3]",
            "pull v2 i-1 i-2 i-3",
            "pulled",
            "hold HealthCheck ReplaceUnhealthy",
            "switch 1/3 i-1",
            "healthy 1/3",
            "switch 2/3 i-2",
            "healthy 2/3",
            "switch 3/3 i-3",
            "healthy 3/3",
            "resume HealthCheck ReplaceUnhealthy",
        ]
    );
    let detect = fake::CHECK_INTERVAL * fake::HEALTHY_THRESHOLD;
    let targets = fleet.writes(TARGET);
    for pair in targets.windows(2) {
        assert!(pair[1].0 - pair[0].0 >= fake::SWAP + detect, "{targets:?}");
    }

    // Handover without a bake: after the last batch every switched instance is watched for the
    // agents' hold, in which a flip back would still answer skiff:failed.
    let w = World::new(vec![]);
    let fleet = FakeFleet::new(2, "v1", SwapMode::Handover);
    let (outcome, events) = roll(&w, &fleet, &in_place(plan(SwapMode::Handover, None, 0))).await;
    assert_eq!(outcome.exit_code(), ExitCode::Success, "{outcome:?}");
    let steps = outline(&events);
    assert_eq!(
        steps[steps.len() - 3..],
        [
            "healthy 2/2",
            "settled",
            "resume HealthCheck ReplaceUnhealthy"
        ]
    );
    let settled = events.iter().find_map(|e| match e {
        Event::Rollout(RolloutStep::Settled { secs }) => Some(*secs),
        _ => None,
    });
    assert!(
        settled >= Some(crate::inplace::HANDOVER_HOLD.as_secs_f64()),
        "{settled:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_host_that_fails_its_swap_reverts_every_switched_host_and_writes_the_previous_record_back()
 {
    let w = World::new(vec![]);
    let fleet = FakeFleet::new(4, "v1", SwapMode::Drain);
    fleet.agent("i-3", |a| a.fails_gate = vec!["v2".into()]);
    let (outcome, events) = roll(&w, &fleet, &in_place(plan(SwapMode::Drain, None, 0))).await;

    let reason = rolled_back(&outcome);
    assert!(
        reason.starts_with("batch 3 of 4 (v2@") && reason.contains("i-3: v2@"),
        "{reason}"
    );
    assert!(reason.contains("failed its health gate"), "{reason}");
    assert_eq!(
        outline(&events)[5..],
        [
            "switch 1/4 i-1",
            "healthy 1/4",
            "switch 2/4 i-2",
            "healthy 2/4",
            "switch 3/4 i-3",
            "rolling back to v1",
            "revert i-1 i-2 i-3 to v1",
            "reverted",
            "write Rollback v1",
            "resume HealthCheck ReplaceUnhealthy",
        ]
    );
    assert_eq!(
        instructions(&fleet, TARGET),
        vec!["i-1 v2", "i-2 v2", "i-3 v2", "i-1 i-2 i-3 v1"],
        "i-4 is never switched; the revert names every switched host"
    );
    assert_eq!(
        fleet.writes(TARGET)[3].2,
        PREV,
        "the previous release, pinned"
    );
    all_run(&fleet, "v1");
    // The revert moved i-3's target to another release: its agent forgot the failure (the
    // contract's rule) and withdrew the answer, so a later rollout of v2 is tried afresh.
    assert_eq!(fleet.tag_of("i-3", FAILED).as_deref(), Some(""));
    written_back(&w);
    held_and_resumed(&fleet);
    assert!(w.unlocked());
}

#[tokio::test(start_paused = true)]
async fn a_host_that_never_answers_times_out_and_reverts() {
    // It answers the pull but never carries out its target: the batch times out.
    let w = World::new(vec![]);
    let fleet = FakeFleet::new(3, "v1", SwapMode::Handover);
    fleet.agent("i-2", |a| a.ignores_target = true);
    let req = in_place(plan(SwapMode::Handover, None, 0));
    let (outcome, events) = roll(&w, &fleet, &req).await;
    let reason = rolled_back(&outcome);
    assert!(
        reason.starts_with("batch 2 of 3 (v2@")
            && reason.ends_with("not done within 2m: i-2 (runs v1)"),
        "{reason}"
    );
    assert_eq!(
        instructions(&fleet, TARGET),
        vec!["i-1 v2", "i-2 v2", "i-1 i-2 v1"]
    );
    let targets = fleet.writes(TARGET);
    assert!(
        targets[2].0 - targets[1].0 >= Duration::from_secs(120),
        "the batch was given its whole timeout: {targets:?}"
    );
    assert!(outline(&events).contains(&"reverted".to_owned()));
    all_run(&fleet, "v1");
    written_back(&w);
    held_and_resumed(&fleet);

    // Silent from the start: the pull times out, nothing is switched, the record is put back.
    let w = World::new(vec![]);
    let fleet = FakeFleet::new(3, "v1", SwapMode::Handover);
    fleet.agent("i-3", |a| a.alive = false);
    let (outcome, events) = roll(&w, &fleet, &req).await;
    let reason = rolled_back(&outcome);
    assert!(
        reason.contains("not done within 1m: i-3 (pulled nothing yet); no instance was switched"),
        "{reason}"
    );
    assert!(fleet.writes(TARGET).is_empty(), "{:?}", fleet.calls());
    assert!(
        !fleet
            .calls()
            .iter()
            .any(|(_, c)| matches!(c, Call::Hold { .. })),
        "nothing held"
    );
    assert_eq!(
        outline(&events).last().map(String::as_str),
        Some("write Rollback v1")
    );
    written_back(&w);
}

#[tokio::test(start_paused = true)]
async fn a_late_joiner_gets_the_new_release_last() {
    let w = World::new(vec![]);
    let fleet = FakeFleet::new(3, "v1", SwapMode::Drain);
    // During batch 1: i-4 joins running v1 (it read the parameter before the write), i-5
    // booted from the parameter and runs v2 already.
    fleet.joins(Duration::from_secs(5), "i-4", "v1", SwapMode::Drain);
    fleet.joins(Duration::from_secs(5), "i-5", NEW, SwapMode::Drain);
    let (outcome, events) = roll(&w, &fleet, &in_place(plan(SwapMode::Drain, None, 0))).await;

    let Outcome::RolledOut {
        instances,
        switched,
        batches,
        ..
    } = &outcome
    else {
        panic!("{outcome:?}");
    };
    assert_eq!(instances, &ids(&["i-1", "i-2", "i-3", "i-4", "i-5"]));
    assert_eq!((*switched, *batches), (4, 4));
    assert_eq!(
        outline(&events)[5..],
        [
            "switch 1/3 i-1",
            "healthy 1/3",
            "switch 2/3 i-2",
            "healthy 2/3",
            "switch 3/3 i-3",
            "healthy 3/3",
            "late joiners i-4",
            "switch 4/4 i-4",
            "healthy 4/4",
            "resume HealthCheck ReplaceUnhealthy",
        ]
    );
    assert_eq!(
        instructions(&fleet, TARGET),
        vec!["i-1 v2", "i-2 v2", "i-3 v2", "i-4 v2"],
        "the joiner last; the one booted on v2 never"
    );
    assert_eq!(
        instructions(&fleet, PULL),
        vec!["i-1 i-2 i-3 v2"],
        "the pull went to the group as it was at the start"
    );
    all_run(&fleet, "v2");
    assert_eq!(w.store.all().len(), 2);
}

/// A rollout in batches of 2 by `swap` that a signal stops right after the `nth` write of
/// `skiff:target`.
async fn stopped_after_target(
    w: &World,
    fleet: &FakeFleet,
    swap: SwapMode,
    nth: usize,
) -> (Outcome, Vec<Event>) {
    stopped_after(w, fleet, &in_place(plan(swap, Some(2), 0)), nth).await
}

/// `req` on `fleet`, stopped (SIGTERM) right after the `nth` write of `skiff:target`.
async fn stopped_after(
    w: &World,
    fleet: &FakeFleet,
    req: &Request,
    nth: usize,
) -> (Outcome, Vec<Event>) {
    let (handle, mut stop) = Stop::new();
    fleet.stop_on(TARGET, nth, handle);
    let (r, events) = w.ship_with(fleet, req, &mut stop).await;
    (r.expect("an outcome"), events)
}

/// After a revert: every host runs v1 and keeps it, the previous record is back, the health
/// checks were resumed and the lock released.
async fn back_for_good(w: &World, fleet: &FakeFleet) {
    all_run(fleet, "v1");
    sleep(fake::SWAP * 4).await;
    all_run(fleet, "v1");
    written_back(w);
    held_and_resumed(fleet);
    assert!(w.unlocked());
}

#[tokio::test(start_paused = true)]
async fn a_stop_mid_batch_reverts() {
    let w = World::new(vec![]);
    let fleet = FakeFleet::new(4, "v1", SwapMode::Drain);
    // The signal comes right after batch 2's target is written.
    let (outcome, events) = stopped_after_target(&w, &fleet, SwapMode::Drain, 2).await;

    assert_eq!(rolled_back(&outcome), "stopped by SIGTERM");
    assert_eq!(
        outline(&events)[5..],
        [
            "switch 1/2 i-1 i-2",
            "healthy 1/2",
            "switch 2/2 i-3 i-4",
            "stopping SIGTERM",
            "rolling back to v1",
            "revert i-1 i-2 i-3 i-4 to v1",
            "reverted",
            "write Rollback v1",
            "resume HealthCheck ReplaceUnhealthy",
        ]
    );
    assert_eq!(
        instructions(&fleet, TARGET),
        vec!["i-1 i-2 v2", "i-3 i-4 v2", "i-1 i-2 i-3 i-4 v1"]
    );
    let targets = fleet.writes(TARGET);
    assert_eq!(targets[2].0, targets[1].0, "the revert starts at once");
    // Every host runs the previous release when ctl returns (the batch caught mid-swap drains,
    // so the revert waits for it to come back) and keeps running it.
    back_for_good(&w, &fleet).await;
}

#[tokio::test(start_paused = true)]
async fn a_revert_waits_for_a_host_caught_mid_handover_until_it_is_back() {
    let w = World::new(vec![]);
    let fleet = FakeFleet::new(4, "v1", SwapMode::Handover);
    let t0 = tokio::time::Instant::now();
    // The signal comes right after the canary's target is written: its agent is in the swap to
    // v2 and reads the revert only after it; meanwhile it reports v1 and the load balancer
    // calls it healthy (a handover), which alone must not count as reverted.
    let (outcome, events) = stopped_after_target(&w, &fleet, SwapMode::Handover, 1).await;
    let returned = t0.elapsed();

    assert_eq!(rolled_back(&outcome), "stopped by SIGTERM");
    assert_eq!(
        outline(&events)[5..],
        [
            "switch 1/3 i-1",
            "stopping SIGTERM",
            "rolling back to v1",
            "revert i-1 to v1",
            "reverted",
            "write Rollback v1",
            "resume HealthCheck ReplaceUnhealthy",
        ]
    );
    assert_eq!(instructions(&fleet, TARGET), vec!["i-1 v2", "i-1 v1"]);
    // i-1 finished its swap to v2, then swapped back; ctl returned, and resumed the group's
    // health checks, only after it reported v1 again.
    let reports = fleet.reports("i-1");
    assert_eq!(
        reports.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>(),
        vec!["v2", "v1"],
        "{reports:?}"
    );
    let back = reports[1].0;
    let resumed = fleet
        .calls()
        .into_iter()
        .find_map(|(at, c)| matches!(c, Call::Hold { suspend: false, .. }).then_some(at))
        .expect("the health checks resumed");
    assert!(
        resumed >= back,
        "resumed at {resumed:?}, i-1 back on v1 at {back:?}"
    );
    assert!(
        returned >= back,
        "returned at {returned:?}, i-1 back on v1 at {back:?}"
    );
    for id in ["i-2", "i-3", "i-4"] {
        assert!(fleet.reports(id).is_empty(), "{id} was never switched");
    }
    back_for_good(&w, &fleet).await;
}

#[tokio::test(start_paused = true)]
async fn a_target_that_leaves_healthy_during_a_handover_fails_the_batch_at_once() {
    // i-2's agent swaps by drain (launched before the stack's SwapMode changed): the load
    // balancer takes it out, which a handover never does.
    let w = World::new(vec![]);
    let fleet = FakeFleet::new(3, "v1", SwapMode::Handover);
    fleet.agent("i-2", |a| a.swap = SwapMode::Drain);
    let (outcome, events) = roll(&w, &fleet, &in_place(plan(SwapMode::Handover, None, 0))).await;

    let reason = rolled_back(&outcome);
    assert!(
        reason.contains("i-2: the load balancer calls it draining during a handover"),
        "{reason}"
    );
    let targets = fleet.writes(TARGET);
    assert_eq!(
        instructions(&fleet, TARGET),
        vec!["i-1 v2", "i-2 v2", "i-1 i-2 v1"]
    );
    assert!(
        targets[2].0 - targets[1].0 < fake::SWAP,
        "failed at once, before its swap could even end: {targets:?}"
    );
    assert!(outline(&events).contains(&"reverted".to_owned()));
    all_run(&fleet, "v1");
    written_back(&w);
}

#[tokio::test(start_paused = true)]
async fn drain_refuses_a_batch_of_every_healthy_target_unless_the_downtime_is_accepted() {
    for (n, batch) in [(2, Some(2)), (1, None)] {
        let w = World::new(vec![]);
        let fleet = FakeFleet::new(n, "v1", SwapMode::Drain);
        let (_h, mut stop) = Stop::new();
        let req = in_place(plan(SwapMode::Drain, batch, 0));
        let (r, _) = w.ship_with(&fleet, &req, &mut stop).await;
        let err = r.expect_err("refused");
        assert!(
            matches!(
                err,
                ShipError::InPlace(InPlaceError::DrainAll { batch: 1, .. })
            ),
            "{err}"
        );
        assert_eq!(err.exit_code(), ExitCode::Refused);
        assert!(err.to_string().contains("--accept-downtime"), "{err}");
        assert_eq!(w.store.all().len(), 1, "nothing written");
        assert!(
            fleet.calls().is_empty(),
            "nothing tagged or held: {:?}",
            fleet.calls()
        );
        assert!(w.unlocked());

        // Accepted: the same batch is swapped.
        let mut accepted = plan(SwapMode::Drain, batch, 0);
        accepted.accept_downtime = true;
        let (outcome, _) = roll(&w, &fleet, &in_place(accepted)).await;
        assert_eq!(outcome.exit_code(), ExitCode::Success, "{outcome:?}");
        let every: Vec<String> = (1..=n).map(|i| format!("i-{i}")).collect();
        assert_eq!(
            instructions(&fleet, TARGET),
            vec![format!("{} v2", every.join(" "))]
        );

        // A handover takes nothing out: not refused.
        let w = World::new(vec![]);
        let fleet = FakeFleet::new(n, "v1", SwapMode::Handover);
        let (outcome, _) = roll(&w, &fleet, &in_place(plan(SwapMode::Handover, batch, 0))).await;
        assert_eq!(outcome.exit_code(), ExitCode::Success, "{outcome:?}");
    }
    // Without a target group every instance counts as healthy.
    let w = World::new(vec![]);
    let fleet = FakeFleet::new(2, "v1", SwapMode::Drain);
    fleet.without_target_group();
    let (_h, mut stop) = Stop::new();
    let (r, _) = w
        .ship_with(
            &fleet,
            &in_place(plan(SwapMode::Drain, Some(2), 0)),
            &mut stop,
        )
        .await;
    assert!(matches!(
        r,
        Err(ShipError::InPlace(InPlaceError::DrainAll { .. }))
    ));
}

#[tokio::test(start_paused = true)]
async fn a_failed_pull_switches_nothing_and_the_next_run_withdraws_it_first() {
    // i-2 cannot pull v2 (e.g. its registry route is broken): nothing is switched, the
    // previous record is put back.
    let w = World::new(vec![]);
    let fleet = FakeFleet::new(2, "v1", SwapMode::Handover);
    fleet.agent("i-2", |a| a.fails_pull = vec!["v2".into()]);
    let req = in_place(plan(SwapMode::Handover, None, 0));
    let (outcome, _) = roll(&w, &fleet, &req).await;
    let reason = rolled_back(&outcome);
    assert!(
        reason.contains("i-2: its agent could not pull v2@")
            && reason.ends_with("; no instance was switched"),
        "{reason}"
    );
    assert!(fleet.writes(TARGET).is_empty(), "{:?}", fleet.calls());
    written_back(&w);
    assert_eq!(fleet.tag_of("i-2", FAILED).as_deref(), Some(NEW));

    // Fixed, the next run: the failure stands under unchanged instructions (the agent would not
    // try v2 again), so ctl points i-2's pull elsewhere first, the agent forgets the failure
    // by the contract's rule and withdraws it, and v2 goes out.
    fleet.agent("i-2", |a| a.fails_pull.clear());
    let (outcome, events) = roll(&w, &fleet, &req).await;
    assert_eq!(outcome.exit_code(), ExitCode::Success, "{outcome:?}");
    assert_eq!(
        outline(&events)[1..6],
        [
            "plan [i-1][i-2]",
            "pull v1 i-2",
            "pulled",
            "pull v2 i-1 i-2",
            "pulled"
        ],
        "the pull pointed elsewhere first"
    );
    assert_eq!(
        instructions(&fleet, PULL),
        vec!["i-1 i-2 v2", "i-2 v1", "i-1 i-2 v2"]
    );
    assert_eq!(
        fleet.tag_of("i-2", FAILED).as_deref(),
        Some(""),
        "withdrawn"
    );
    all_run(&fleet, "v2");
}

#[tokio::test(start_paused = true)]
async fn a_handover_that_flips_back_within_the_agents_hold_reverts() {
    // The last batch's agent flips back after the batch was healthy: the watch of the agents'
    // hold after the last batch catches it.
    let w = World::new(vec![]);
    let fleet = FakeFleet::new(2, "v1", SwapMode::Handover);
    fleet.agent("i-2", |a| a.flips_back = vec!["v2".into()]);
    let (outcome, events) = roll(&w, &fleet, &in_place(plan(SwapMode::Handover, None, 0))).await;
    let reason = rolled_back(&outcome);
    assert!(
        reason.starts_with("the agents' hold after the last batch (v2@")
            && reason.contains("i-2: its agent reports v2@"),
        "{reason}"
    );
    assert_eq!(
        outline(&events)[5..],
        [
            "switch 1/2 i-1",
            "healthy 1/2",
            "switch 2/2 i-2",
            "healthy 2/2",
            "rolling back to v1",
            "revert i-1 i-2 to v1",
            "reverted",
            "write Rollback v1",
            "resume HealthCheck ReplaceUnhealthy",
        ]
    );
    all_run(&fleet, "v1");
    written_back(&w);

    // An earlier batch's agent flips back while the next batch swaps: that batch fails.
    let w = World::new(vec![]);
    let fleet = FakeFleet::new(3, "v1", SwapMode::Handover);
    fleet.agent("i-1", |a| a.flips_back = vec!["v2".into()]);
    let (outcome, _) = roll(&w, &fleet, &in_place(plan(SwapMode::Handover, None, 0))).await;
    let reason = rolled_back(&outcome);
    assert!(
        reason.starts_with("batch 2 of 3 (v2@") && reason.contains("i-1: its agent reports"),
        "{reason}"
    );
    assert!(reason.contains("after its batch was done"), "{reason}");
    assert_eq!(
        instructions(&fleet, TARGET),
        vec!["i-1 v2", "i-2 v2", "i-1 i-2 v1"]
    );
    written_back(&w);
}

/// An in-place release by handover in batches of one, no bake, watching `names` for `window`
/// after the last batch.
fn with_alarms(names: &[&str], window: Duration) -> Request {
    let mut req = in_place(plan(SwapMode::Handover, None, 0));
    req.plan.alarms = ids(names);
    req.plan.alarm_window = window;
    req
}

#[tokio::test(start_paused = true)]
async fn a_release_alarm_in_the_window_after_the_last_batch_reverts() {
    // Two hosts, handover, no bake: every batch is healthy well within the first minute.
    let window = Duration::from_secs(240);
    // Quiet for the whole window: released, after the window.
    let w = World::new(vec![]);
    let fleet = FakeFleet::new(2, "v1", SwapMode::Handover);
    fleet.alarm("app-5xx", None);
    let (outcome, events) = roll(&w, &fleet, &with_alarms(&["app-5xx"], window)).await;
    assert_eq!(outcome.exit_code(), ExitCode::Success, "{outcome:?}");
    let steps = outline(&events);
    assert_eq!(
        steps[steps.len() - 3..],
        [
            "settled",
            "alarms quiet app-5xx",
            "resume HealthCheck ReplaceUnhealthy"
        ]
    );
    let quiet = events.iter().find_map(|e| match e {
        Event::Rollout(RolloutStep::AlarmsQuiet { secs, .. }) => Some(*secs),
        _ => None,
    });
    assert!(quiet >= Some(window.as_secs_f64()), "{quiet:?}");

    // In ALARM two minutes in (its datapoints arrive late): every host is reverted.
    let w = World::new(vec![]);
    let fleet = FakeFleet::new(2, "v1", SwapMode::Handover);
    fleet.alarm("app-5xx", Some(Duration::from_secs(120)));
    fleet.alarm("app-hosts", None);
    let (outcome, events) = roll(&w, &fleet, &with_alarms(&["app-hosts", "app-5xx"], window)).await;
    let reason = rolled_back(&outcome);
    assert!(
        reason.starts_with("release alarms after the last batch (v2@")
            && reason.ends_with("in ALARM: app-5xx"),
        "{reason}"
    );
    let steps = outline(&events);
    assert_eq!(
        steps[steps.len() - 6..],
        [
            "settled",
            "rolling back to v1",
            "revert i-1 i-2 to v1",
            "reverted",
            "write Rollback v1",
            "resume HealthCheck ReplaceUnhealthy"
        ]
    );
    assert_eq!(
        instructions(&fleet, TARGET),
        vec!["i-1 v2", "i-2 v2", "i-1 i-2 v1"]
    );
    let revert = fleet.writes(TARGET)[2].0;
    assert!(
        revert >= Duration::from_secs(120) && revert <= Duration::from_secs(120) + ALARM_POLL,
        "reverted at the first read of the alarm after it fired: {revert:?}"
    );
    written_back(&w);
}

#[tokio::test(start_paused = true)]
async fn a_target_the_load_balancer_fails_during_the_bake_reverts_at_once() {
    // i-1 passes its agent's gate, then fails the load balancer's checks 20 s later, well
    // inside a bake of 5 minutes.
    let w = World::new(vec![]);
    let fleet = FakeFleet::new(3, "v1", SwapMode::Drain);
    fleet.agent("i-1", |a| a.sickens_on = vec!["v2".into()]);
    let (outcome, events) = roll(&w, &fleet, &in_place(plan(SwapMode::Drain, None, 300))).await;
    let reason = rolled_back(&outcome);
    assert!(
        reason.starts_with("bake of batch 1 (v2@")
            && reason.ends_with("i-1: the load balancer marks it unhealthy during the bake"),
        "{reason}"
    );
    assert_eq!(
        outline(&events)[5..],
        [
            "switch 1/3 i-1",
            "healthy 1/3",
            "rolling back to v1",
            "revert i-1 to v1",
            "reverted",
            "write Rollback v1",
            "resume HealthCheck ReplaceUnhealthy",
        ]
    );
    let targets = fleet.writes(TARGET);
    assert_eq!(instructions(&fleet, TARGET), vec!["i-1 v2", "i-1 v1"]);
    assert!(
        targets[1].0 - targets[0].0 <= fake::SWAP + fake::SICKENS_AFTER + MAX_POLL,
        "at the first read after it went unhealthy, not at the end of the bake: {targets:?}"
    );
    all_run(&fleet, "v1");
    written_back(&w);
}

/// A killed run left the health checks suspended under ctl's mark: an in-place release takes
/// that hold over and resumes it only at its end. Resuming first would let Auto Scaling
/// replace an instance the killed run left mid-swap (fleet scenario 12 saw it).
#[tokio::test(start_paused = true)]
async fn an_in_place_release_takes_a_killed_runs_hold_over_and_resumes_it_at_its_end() {
    let w = World::new(vec![]);
    let fleet = FakeFleet::new(3, "v1", SwapMode::Drain);
    let held: Vec<String> = HELD.iter().map(|p| (*p).to_owned()).collect();
    fleet
        .hold(&held, true)
        .await
        .expect("the killed run's hold");
    let before = fleet.calls().len();
    let req = in_place(plan(SwapMode::Drain, Some(1), 0));
    let (outcome, _) = roll(&w, &fleet, &req).await;
    assert!(matches!(outcome, Outcome::RolledOut { .. }), "{outcome:?}");
    let calls: Vec<Call> = fleet
        .calls()
        .into_iter()
        .skip(before)
        .map(|(_, c)| c)
        .collect();
    let first_tag = calls
        .iter()
        .position(|c| matches!(c, Call::Tag { .. }))
        .expect("tags written");
    assert!(
        !calls[..first_tag]
            .iter()
            .any(|c| matches!(c, Call::Hold { suspend: false, .. })),
        "resumed before the first instance was told anything: {calls:?}"
    );
    assert!(
        matches!(calls.last(), Some(Call::Hold { suspend: false, .. })),
        "resumed at the end: {calls:?}"
    );
    assert!(
        fleet.suspended().suspended.is_empty(),
        "{:?}",
        fleet.suspended()
    );
}

/// DescribeAlarms denied (a stack from before the permission): the release passed its health
/// gates and stands, said loudly, after one read; failing reads instead (CloudWatch away) fail
/// the release after ALARM_READ_FAILURES reads, and every host is reverted.
#[tokio::test(start_paused = true)]
async fn alarms_that_cannot_be_read_leave_a_denied_release_standing_and_fail_an_unreadable_one() {
    let req = with_alarms(&["app-5xx"], Duration::from_secs(240));
    let w = World::new(vec![]);
    let fleet = FakeFleet::new(2, "v1", SwapMode::Handover);
    fleet.alarms_fail(crate::alarms::AlarmsError::Denied(
        "AccessDenied: not authorized to perform cloudwatch:DescribeAlarms".into(),
    ));
    let (outcome, events) = roll(&w, &fleet, &req).await;
    assert_eq!(outcome.exit_code(), ExitCode::Success, "{outcome:?}");
    let steps = outline(&events);
    assert_eq!(
        steps[steps.len() - 3..],
        [
            "settled",
            "alarms unwatched app-5xx",
            "resume HealthCheck ReplaceUnhealthy"
        ]
    );
    assert_eq!(fleet.alarm_reads(), 1, "no retry of a denial");
    assert_eq!(instructions(&fleet, TARGET), vec!["i-1 v2", "i-2 v2"]);

    let w = World::new(vec![]);
    let fleet = FakeFleet::new(2, "v1", SwapMode::Handover);
    fleet.alarms_fail(crate::alarms::AlarmsError::Describe(
        "dispatch failure: connection refused".into(),
    ));
    let (outcome, events) = roll(&w, &fleet, &req).await;
    let reason = rolled_back(&outcome);
    assert!(
        reason.starts_with("release alarms after the last batch (v2@")
            && reason.contains("connection refused"),
        "{reason}"
    );
    assert_eq!(fleet.alarm_reads(), ALARM_READ_FAILURES as usize);
    assert!(
        outline(&events).contains(&"revert i-1 i-2 to v1".to_string()),
        "{events:?}"
    );
    assert_eq!(
        instructions(&fleet, TARGET),
        vec!["i-1 v2", "i-2 v2", "i-1 i-2 v1"]
    );
    written_back(&w);
}

/// A stop right after batch 2's target, which batch 2's agent has not read when the revert's
/// target replaces it: it never reports v2. The revert waits for it only as long as a swap
/// took in this run (three times the canary's, at least 30 s), not the whole --batch-timeout
/// (fleet scenario 20 waited 300 s).
#[tokio::test(start_paused = true)]
async fn a_revert_waits_for_a_host_that_never_saw_the_new_release_only_a_swap_window() {
    let w = World::new(vec![]);
    let fleet = FakeFleet::new(3, "v1", SwapMode::Handover);
    fleet.agent("i-2", |a| a.ignores_target = true);
    let t0 = tokio::time::Instant::now();
    let req = in_place(plan(SwapMode::Handover, None, 0));
    let (outcome, events) = stopped_after(&w, &fleet, &req, 2).await;
    let returned = t0.elapsed();

    assert_eq!(rolled_back(&outcome), "stopped by SIGTERM");
    let canary = events
        .iter()
        .find_map(|e| match e {
            Event::Rollout(RolloutStep::Healthy { batch: 1, secs, .. }) => Some(*secs),
            _ => None,
        })
        .expect("the canary was healthy");
    let window = crate::inplace::swap_window(
        Some(Duration::from_secs_f64(canary)),
        Duration::from_secs(120),
    );
    assert!(window < Duration::from_secs(120), "{window:?}");
    assert!(
        returned >= window && returned <= window + Duration::from_secs(30),
        "returned at {returned:?}, window {window:?} after the canary's {canary} s"
    );
    assert_eq!(
        instructions(&fleet, TARGET),
        vec!["i-1 v2", "i-2 v2", "i-1 i-2 v1"]
    );
    assert!(
        fleet.reports("i-2").is_empty(),
        "{:?}",
        fleet.reports("i-2")
    );
    written_back(&w);
}
