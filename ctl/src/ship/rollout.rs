//! Over 600 lines: one procedure (pull, batches, bake, late joiners, revert) whose steps share
//! [`Run`] and the batch watch; its revert rules read best in one place.
//!
//! The in-place rollout, once the parameter holds the new release (see [`crate::inplace`]):
//! pull on every instance to switch, then batch by batch switch, wait healthy, bake; late
//! joiners last. A failure or the first signal reverts every switched instance and writes the
//! previous record back under the same rules as the refresh path ([`Run::put_back`]).

use std::time::Duration;

use skiff_release::{Release, instance_tags};
use tokio::time::Instant;

use super::{Event, Outcome, Run};
use crate::alarms;
use crate::inplace::{
    self, BatchWatch, Host, InPlaceError, InPlaceFleet, RolloutPlan, RolloutStep, SwapMode,
    Verdict, Waited, describe_pending, secs, wait_for,
};
use crate::refresh::InstanceRefresher;
use crate::signal::Stop;
use crate::store::ReleaseStore;

/// The plan as an event (also what `--dry-run` shows).
pub(super) fn plan_step(hosts: &[Host], new: &Release, plan: &RolloutPlan) -> RolloutStep {
    let p = first_plan(hosts, new, plan);
    RolloutStep::Plan {
        release: new.to_string(),
        instances: hosts.len(),
        swap: plan.swap,
        on_target: p.on_target,
        batches: p.batches,
        bake_secs: secs(plan.bake),
    }
}

/// The batches of the rollout's first round (with handover a canary first).
fn first_plan(hosts: &[Host], new: &Release, plan: &RolloutPlan) -> inplace::Plan {
    inplace::plan(hosts, new, plan.batch, plan.swap == SwapMode::Handover)
}

/// Before anything is written: with drain swaps, refuse batches of which one would take every
/// healthy target out at once, unless the downtime is accepted (`--accept-downtime`).
pub(super) async fn check_downtime<H: InPlaceFleet>(
    fleet: &H,
    hosts: &[Host],
    new: &Release,
    plan: &RolloutPlan,
) -> Result<(), InPlaceError> {
    if plan.swap != SwapMode::Drain || plan.accept_downtime {
        return Ok(());
    }
    let health = fleet.health().await?;
    inplace::check_drain_all(&first_plan(hosts, new, plan).batches, hosts, &health)
}

/// Once the lock is held, before anything is written (a refresh): resume what a killed
/// in-place run left suspended ([`inplace::resume_stale`]), so that the group replaces
/// unhealthy instances again; a failure only warns (an in-place run holds and resumes the
/// same processes itself).
pub(super) async fn resume_stale<H: InPlaceFleet>(fleet: &H, emit: &mut dyn FnMut(Event)) {
    match inplace::resume_stale(fleet).await {
        Ok(processes) if processes.is_empty() => {}
        Ok(processes) => emit(Event::Rollout(RolloutStep::StaleHoldResumed {
            processes,
            error: None,
        })),
        Err(e) => emit(Event::Rollout(RolloutStep::StaleHoldResumed {
            processes: inplace::HELD.map(String::from).to_vec(),
            error: Some(e.to_string()),
        })),
    }
}

/// `judge`, reporting what it still waits for each time that changes.
fn noting<'a>(
    what: String,
    emit: &'a mut dyn FnMut(Event),
    mut judge: impl FnMut(&[Host], &inplace::Health) -> Verdict + 'a,
) -> impl FnMut(&[Host], &inplace::Health) -> Verdict + 'a {
    let mut last = String::new();
    move |hosts, health| {
        let verdict = judge(hosts, health);
        if let Verdict::Pending(p) = &verdict {
            let pending = describe_pending(p);
            if pending != last {
                emit(Event::Rollout(RolloutStep::Waiting {
                    what: what.clone(),
                    pending: pending.clone(),
                }));
                last = pending;
            }
        }
        verdict
    }
}

fn took(since: Instant) -> f64 {
    secs(since.elapsed())
}

/// Why a batch or the bake did not end well, in words; `None` when it did.
enum Failure {
    Reason(String),
    Stopped(&'static str),
}

fn failure(what: &str, waited: Waited, timeout: std::time::Duration) -> Option<Failure> {
    match waited {
        Waited::Done => None,
        Waited::Failed(id, why) => Some(Failure::Reason(format!("{what}: {id}: {why}"))),
        Waited::TimedOut(pending) => Some(Failure::Reason(format!(
            "{what}: not done within {}: {}",
            humantime::format_duration(timeout),
            describe_pending(&pending)
        ))),
        Waited::Stopped(signal) => Some(Failure::Stopped(signal)),
        Waited::Unreadable(e) => Some(Failure::Reason(format!(
            "{what}: the fleet cannot be read: {e}"
        ))),
    }
}

pub(super) async fn roll<S, R, D, L, H>(
    run: &Run<'_, '_, S, R, D, L>,
    fleet: &H,
    plan: &RolloutPlan,
    before: Vec<Host>,
    stop: &mut Stop,
    emit: &mut dyn FnMut(Event),
) -> Outcome
where
    S: ReleaseStore,
    R: InstanceRefresher,
    H: InPlaceFleet,
{
    let started = Instant::now();
    let new = run.new;
    let first = first_plan(&before, new, plan);
    emit(Event::Rollout(plan_step(&before, new, plan)));
    let todo: Vec<String> = first.batches.concat();

    // A failure an agent reported for this release in an earlier run stands until an
    // instruction moves to another release (the agent's rule): point the pull of those hosts
    // at the release before and wait until they withdraw it, so this run tries it afresh.
    let stale = inplace::failed_before(&before, &todo, new);
    if let (false, Some(prev)) = (stale.is_empty(), run.previous.as_ref()) {
        let phase = Pull {
            release: prev,
            ids: &stale,
            what: format!("withdrawing an earlier failure of {new}"),
        };
        let judge =
            |hosts: &[Host], _: &inplace::Health| inplace::withdrawn_verdict(hosts, &stale, new);
        if let Err(end) = pull(run, fleet, plan, phase, stop, emit, judge).await {
            return end;
        }
    }
    // Pull everywhere first: a failure here switches nothing.
    if !todo.is_empty() {
        let phase = Pull {
            release: new,
            ids: &todo,
            what: format!("pull of {new}"),
        };
        let judge = |hosts: &[Host], _: &inplace::Health| inplace::pull_verdict(hosts, &todo, new);
        if let Err(end) = pull(run, fleet, plan, phase, stop, emit, judge).await {
            return end;
        }
    }

    // Swapping instances drain: the group's health checks are held until the end (also of a
    // revert), so that it does not replace them meanwhile.
    let now = match fleet.held().await {
        Ok(a) => a,
        Err(e) => {
            return run
                .restore_only(format!("{e}; no instance was switched"), emit)
                .await;
        }
    };
    let held = inplace::to_hold(&now);
    let already: Vec<String> = now
        .suspended
        .into_iter()
        .filter(|p| inplace::HELD.contains(&p.as_str()) && !held.contains(p))
        .collect();
    if let Err(e) = fleet.hold(&held, true).await {
        return run
            .restore_only(format!("{e}; no instance was switched"), emit)
            .await;
    }
    emit(Event::Rollout(RolloutStep::Held {
        processes: held.clone(),
        already,
    }));
    let outcome = switch(run, fleet, plan, first.batches, started, stop, emit).await;
    if !held.is_empty() {
        let error = fleet.hold(&held, false).await.err().map(|e| e.to_string());
        emit(Event::Rollout(RolloutStep::Resumed {
            processes: held,
            error,
        }));
    }
    outcome
}

/// The batches, the late joiners, and on failure the revert.
async fn switch<S, R, D, L, H>(
    run: &Run<'_, '_, S, R, D, L>,
    fleet: &H,
    plan: &RolloutPlan,
    batches: Vec<Vec<String>>,
    started: Instant,
    stop: &mut Stop,
    emit: &mut dyn FnMut(Event),
) -> Outcome
where
    S: ReleaseStore,
    R: InstanceRefresher,
    H: InPlaceFleet,
{
    let new = run.new;
    let value = instance_tags::encode(new);
    let poll = run.req.poll.min(inplace::MAX_POLL);
    let mut switched: Vec<String> = Vec::new();
    // When each switched instance was told `new`: a revert waits for those caught mid-swap.
    let mut told: Vec<(String, Instant)> = Vec::new();
    let mut slowest: Option<Duration> = None;
    let mut batches = batches;
    let mut total = batches.len();
    let mut n = 0;
    let mut round = 0;
    loop {
        for batch in batches {
            n += 1;
            emit(Event::Rollout(RolloutStep::Switching {
                batch: n,
                batches: total,
                release: new.to_string(),
                instances: batch.clone(),
            }));
            let t = Instant::now();
            // Handover: the load balancer's view before the switch (a target healthy then must
            // stay so); unreadable: none counts as healthy before, each is waited for.
            let before = match plan.swap {
                SwapMode::Handover => fleet.health().await.unwrap_or_else(|e| {
                    tracing::warn!("{e}; waiting for each target of batch {n} to be healthy");
                    Some(Default::default())
                }),
                SwapMode::Drain => None,
            };
            let earlier = switched.clone();
            switched.extend(batch.iter().cloned());
            // Before the write: a write that failed may still have landed.
            told.extend(batch.iter().map(|id| (id.clone(), Instant::now())));
            let so_far = Switched {
                switched: &switched,
                told: &told,
                slowest,
            };
            if let Err(e) = fleet.tag(&batch, instance_tags::TARGET, &value).await {
                return revert(run, fleet, plan, so_far, format!("batch {n}: {e}"), emit).await;
            }
            let watch = BatchWatch {
                swap: plan.swap,
                earlier: &earlier,
                before: &before,
            };
            let judge = noting(format!("batch {n}/{total}"), emit, |hosts, h| {
                inplace::batch_verdict(hosts, h, &batch, new, &watch)
            });
            let waited = wait_for(fleet, plan.batch_timeout, poll, false, stop, judge).await;
            match failure(
                &format!("batch {n} of {total} ({new})"),
                waited,
                plan.batch_timeout,
            ) {
                None => {
                    slowest = slowest.max(Some(t.elapsed()));
                    emit(Event::Rollout(RolloutStep::Healthy {
                        batch: n,
                        batches: total,
                        instances: batch.clone(),
                        secs: took(t),
                    }))
                }
                Some(f) => return fail(run, fleet, plan, so_far, f, emit).await,
            }
            if !plan.bake.is_zero() {
                let t = Instant::now();
                let waited = wait_for(fleet, plan.bake, poll, true, stop, |hosts, h| {
                    inplace::bake_verdict(hosts, h, &switched, new)
                })
                .await;
                match failure(&format!("bake of batch {n} ({new})"), waited, plan.bake) {
                    None => emit(Event::Rollout(RolloutStep::Baked {
                        batch: n,
                        batches: total,
                        secs: took(t),
                    })),
                    Some(f) => return fail(run, fleet, plan, so_far, f, emit).await,
                }
            }
        }
        // Instances that joined meanwhile: those booted from the parameter run the release
        // already; any other is switched too.
        let now = match read_hosts(fleet).await {
            Ok(h) => h,
            Err(e) => {
                return Outcome::NotRolledBack {
                    reason: format!(
                        "every batch runs {new}, but the group cannot be read again for instances that joined meanwhile: {e}"
                    ),
                    advice: format!(
                        "run `{} release --tag {}` again: it skips the instances on {new} and switches the rest",
                        run.ctl(),
                        new.tag
                    ),
                };
            }
        };
        let late: Vec<Vec<String>> = inplace::plan(&now, new, plan.batch, false)
            .batches
            .into_iter()
            .map(|b| b.into_iter().filter(|id| !switched.contains(id)).collect())
            .filter(|b: &Vec<String>| !b.is_empty())
            .collect();
        if late.is_empty() {
            let so_far = Switched {
                switched: &switched,
                told: &told,
                slowest,
            };
            if let Some(f) = settle(run, fleet, plan, &switched, stop, emit).await {
                return fail(run, fleet, plan, so_far, f, emit).await;
            }
            if let Some(f) = watch_alarms(run, fleet, stop, emit).await {
                return fail(run, fleet, plan, so_far, f, emit).await;
            }
            let instances: Vec<String> = now.iter().map(|h| h.id.clone()).collect();
            return confirm(run, instances, switched.len(), n, took(started)).await;
        }
        round += 1;
        if round > inplace::late_rounds() {
            return Outcome::NotRolledBack {
                reason: format!(
                    "instances keep joining the group without {new}: {}",
                    late.concat().join(", ")
                ),
                advice: format!(
                    "the parameter holds {new}; once the group is stable run `{} release --tag {}` again, which switches only the rest",
                    run.ctl(),
                    new.tag
                ),
            };
        }
        emit(Event::Rollout(RolloutStep::LateJoiners {
            instances: late.concat(),
        }));
        total += late.len();
        batches = late;
    }
}

/// Handover: the agents of the last batch may still flip back within their hold
/// ([`inplace::HANDOVER_HOLD`]) and answer `skiff:failed`; unless the bake already covered it,
/// watch every switched instance that long before the release counts as done.
async fn settle<S, R, D, L, H>(
    run: &Run<'_, '_, S, R, D, L>,
    fleet: &H,
    plan: &RolloutPlan,
    switched: &[String],
    stop: &mut Stop,
    emit: &mut dyn FnMut(Event),
) -> Option<Failure>
where
    S: ReleaseStore,
    R: InstanceRefresher,
    H: InPlaceFleet,
{
    if plan.swap != SwapMode::Handover || plan.bake >= inplace::HANDOVER_HOLD || switched.is_empty()
    {
        return None;
    }
    let new = run.new;
    let t = Instant::now();
    let poll = run.req.poll.min(inplace::MAX_POLL);
    let waited = wait_for(
        fleet,
        inplace::HANDOVER_HOLD,
        poll,
        true,
        stop,
        |hosts, h| inplace::bake_verdict(hosts, h, switched, new),
    )
    .await;
    let f = failure(
        &format!("the agents' hold after the last batch ({new})"),
        waited,
        inplace::HANDOVER_HOLD,
    );
    if f.is_none() {
        emit(Event::Rollout(RolloutStep::Settled { secs: took(t) }));
    }
    f
}

/// Between two reads of the release alarms: their state changes at most once a period.
const ALARM_POLL: std::time::Duration = std::time::Duration::from_secs(10);
/// Failed reads of the alarms in a row before the watch gives up.
const ALARM_READ_FAILURES: u32 = 3;

/// With release alarms: watch them for `--alarm-window` after the last batch (their
/// datapoints arrive minutes late, see [`crate::alarms`]); one in ALARM fails the release.
async fn watch_alarms<S, R, D, L, H>(
    run: &Run<'_, '_, S, R, D, L>,
    fleet: &H,
    stop: &mut Stop,
    emit: &mut dyn FnMut(Event),
) -> Option<Failure>
where
    S: ReleaseStore,
    R: InstanceRefresher,
    H: InPlaceFleet,
{
    let names = &run.req.plan.alarms;
    let window = run.req.plan.alarm_window;
    if names.is_empty() || window.is_zero() {
        return None;
    }
    let new = run.new;
    let what = format!("release alarms after the last batch ({new})");
    emit(Event::Rollout(RolloutStep::Waiting {
        what: what.clone(),
        pending: format!("{}s without ALARM: {}", secs(window), names.join(", ")),
    }));
    let t = Instant::now();
    let mut failures = 0;
    loop {
        match fleet.firing(names).await {
            Ok(firing) => {
                failures = 0;
                match alarms::watch(&firing, t.elapsed(), window) {
                    alarms::Watch::Fired(fired) => {
                        return Some(Failure::Reason(format!(
                            "{what}: in ALARM: {}",
                            fired.join(", ")
                        )));
                    }
                    alarms::Watch::Passed => {
                        emit(Event::Rollout(RolloutStep::AlarmsQuiet {
                            alarms: names.clone(),
                            secs: took(t),
                        }));
                        return None;
                    }
                    alarms::Watch::Continue => {}
                }
            }
            // Not allowed (a stack from before the permission): the release passed its
            // health gates; say loudly that the alarms went unwatched rather than revert it.
            Err(e @ InPlaceError::Alarms(alarms::AlarmsError::Denied(_))) => {
                emit(Event::Rollout(RolloutStep::AlarmsUnwatched {
                    alarms: names.clone(),
                    why: e.to_string(),
                }));
                return None;
            }
            Err(e) => {
                failures += 1;
                if failures >= ALARM_READ_FAILURES {
                    return Some(Failure::Reason(format!("{what}: {e}")));
                }
                tracing::warn!("{e}; trying again");
            }
        }
        let left = window.saturating_sub(t.elapsed());
        tokio::select! {
            _ = tokio::time::sleep(ALARM_POLL.min(left)) => {}
            signal = stop.wait() => return Some(Failure::Stopped(signal)),
        }
    }
}

/// A pull phase: `skiff:pull=release` on `ids`, then wait (at most `--pull-timeout`) until
/// `judge` says done. Nothing is switched yet, so any failure or a stop restores the parameter
/// and ends the run (the `Err`).
struct Pull<'a> {
    release: &'a Release,
    ids: &'a [String],
    what: String,
}

async fn pull<S, R, D, L, H>(
    run: &Run<'_, '_, S, R, D, L>,
    fleet: &H,
    plan: &RolloutPlan,
    phase: Pull<'_>,
    stop: &mut Stop,
    emit: &mut dyn FnMut(Event),
    judge: impl FnMut(&[Host], &inplace::Health) -> Verdict,
) -> Result<(), Outcome>
where
    S: ReleaseStore,
    R: InstanceRefresher,
    H: InPlaceFleet,
{
    let Pull { release, ids, what } = phase;
    emit(Event::Rollout(RolloutStep::Pulling {
        release: release.to_string(),
        instances: ids.to_vec(),
    }));
    let t = Instant::now();
    let poll = run.req.poll.min(inplace::MAX_POLL);
    let why = match fleet
        .tag(ids, instance_tags::PULL, &instance_tags::encode(release))
        .await
    {
        Err(e) => e.to_string(),
        Ok(()) => {
            let judge = noting(what.clone(), emit, judge);
            let waited = wait_for(fleet, plan.pull_timeout, poll, false, stop, judge).await;
            match failure(&what, waited, plan.pull_timeout) {
                None => {
                    emit(Event::Rollout(RolloutStep::Pulled {
                        instances: ids.to_vec(),
                        secs: took(t),
                    }));
                    return Ok(());
                }
                Some(Failure::Reason(why)) => why,
                Some(Failure::Stopped(signal)) => {
                    emit(Event::Stopping {
                        signal: signal.into(),
                    });
                    format!("stopped by {signal} during the {what}")
                }
            }
        }
    };
    Err(run
        .restore_only(format!("{why}; no instance was switched"), emit)
        .await)
}

/// Read the group, with a few tries.
async fn read_hosts<H: InPlaceFleet>(fleet: &H) -> Result<Vec<Host>, inplace::InPlaceError> {
    let mut tries = 0;
    loop {
        match fleet.hosts().await {
            Ok(h) => return Ok(h),
            Err(e) if tries >= 2 => return Err(e),
            Err(e) => {
                tries += 1;
                tracing::warn!("{e}; trying again");
                tokio::time::sleep(inplace::MAX_POLL).await;
            }
        }
    }
}

/// What a run did before it fails: the instances it switched, and when each was told the new
/// release.
#[derive(Clone, Copy)]
struct Switched<'a> {
    switched: &'a [String],
    told: &'a [(String, Instant)],
    /// The longest a finished batch took from its target to healthy (see
    /// [`inplace::swap_window`]).
    slowest: Option<Duration>,
}

async fn fail<S, R, D, L, H>(
    run: &Run<'_, '_, S, R, D, L>,
    fleet: &H,
    plan: &RolloutPlan,
    so_far: Switched<'_>,
    f: Failure,
    emit: &mut dyn FnMut(Event),
) -> Outcome
where
    S: ReleaseStore,
    R: InstanceRefresher,
    H: InPlaceFleet,
{
    let reason = match f {
        Failure::Reason(r) => r,
        Failure::Stopped(signal) => {
            emit(Event::Stopping {
                signal: signal.into(),
            });
            format!("stopped by {signal}")
        }
    };
    revert(run, fleet, plan, so_far, reason, emit).await
}

/// Tag the previous release back on every switched instance (and any other that runs the new
/// one), wait until they run it, and write the previous record back (only over this run's own
/// write). An agent reads the revert only once a swap it is in is over, so an instance told the
/// new release that never reported it is waited for until that swap could be over (three times
/// this run's slowest batch, at least 30 s, at most `--batch-timeout` after it was told:
/// [`inplace::swap_window`], [`inplace::revert_after_swaps_verdict`]); the wait gets that much
/// longer. A signal during the revert does not stop it; a second one exits at once.
async fn revert<S, R, D, L, H>(
    run: &Run<'_, '_, S, R, D, L>,
    fleet: &H,
    plan: &RolloutPlan,
    so_far: Switched<'_>,
    reason: String,
    emit: &mut dyn FnMut(Event),
) -> Outcome
where
    S: ReleaseStore,
    R: InstanceRefresher,
    H: InPlaceFleet,
{
    let new = run.new;
    let switched = so_far.switched;
    let Some(prev) = run.previous.as_ref().filter(|_| run.req.rollback) else {
        return Outcome::NotRolledBack {
            reason: format!(
                "{reason}; switched to {new} and left so: {}",
                switched.join(", ")
            ),
            advice: run.advice_new(),
        };
    };
    emit(Event::RollingBack {
        reason: reason.clone(),
        to: prev.to_string(),
    });
    let hosts = match read_hosts(fleet).await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("{e}; reverting the switched instances only");
            switched
                .iter()
                .map(|id| Host {
                    id: id.clone(),
                    ..Host::default()
                })
                .collect()
        }
    };
    let ids = inplace::to_revert(&hosts, switched, new);
    emit(Event::Rollout(RolloutStep::Reverting {
        reason: reason.clone(),
        to: prev.to_string(),
        instances: ids.clone(),
    }));
    // The swap window: how long a host told `new` may still be swapping to it.
    let window = inplace::swap_window(so_far.slowest, plan.batch_timeout);
    let mut caught: Vec<(inplace::Told, Instant)> = so_far
        .told
        .iter()
        .filter(|(id, _)| ids.contains(id))
        .map(|(id, at)| {
            let told = inplace::Told {
                id: id.clone(),
                ago: at.elapsed(),
                over: hosts
                    .iter()
                    .any(|h| &h.id == id && inplace::swap_over(h, new)),
            };
            (told, *at)
        })
        .collect();
    let timeout = plan.batch_timeout
        + caught
            .iter()
            .map(|(t, _)| window.saturating_sub(t.ago))
            .max()
            .unwrap_or_default();
    let t = Instant::now();
    let tagged = fleet
        .tag(&ids, instance_tags::TARGET, &instance_tags::encode(prev))
        .await;
    // The first signal already came or cannot stop this: wait on a stop nobody triggers.
    let (_never, mut unstoppable) = Stop::new();
    let waited = match tagged {
        Ok(()) => {
            wait_for(
                fleet,
                timeout,
                run.req.poll.min(inplace::MAX_POLL),
                false,
                &mut unstoppable,
                noting("revert".into(), emit, |hosts, h| {
                    for (told, at) in &mut caught {
                        told.ago = at.elapsed();
                        told.over |= hosts
                            .iter()
                            .any(|x| x.id == told.id && inplace::swap_over(x, new));
                    }
                    let told: Vec<inplace::Told> =
                        caught.iter().map(|(told, _)| told.clone()).collect();
                    inplace::revert_after_swaps_verdict(hosts, h, &ids, (prev, new), &told, window)
                }),
            )
            .await
        }
        Err(e) => Waited::Unreadable(e.to_string()),
    };
    let reverted = match &waited {
        Waited::Done => {
            emit(Event::Rollout(RolloutStep::Reverted {
                instances: ids.clone(),
                secs: took(t),
            }));
            None
        }
        other => Some(match failure("revert", other.clone(), timeout) {
            Some(Failure::Reason(r)) => r,
            _ => "revert: interrupted".into(),
        }),
    };
    if let Err(g) = run.put_back(prev, emit).await {
        let reason = match &reverted {
            None => reason,
            Some(why) => format!("{reason}; {why}"),
        };
        return run.not_put_back(reason, prev, g);
    }
    match reverted {
        None => Outcome::RolledBack {
            reason,
            to: prev.to_string(),
        },
        Some(why) => Outcome::NotRolledBack {
            reason: format!("{reason}; {why}"),
            advice: format!(
                "the parameter holds {prev} again and skiff:target names it on {}; see which instance does not run it with `{} status`, then `{} rollback --to {}` to try again",
                ids.join(", "),
                run.ctl(),
                run.ctl(),
                prev.tag
            ),
        },
    }
}

/// Every batch is healthy: the parameter must still hold this release.
async fn confirm<S, R, D, L>(
    run: &Run<'_, '_, S, R, D, L>,
    instances: Vec<String>,
    switched: usize,
    batches: usize,
    secs: f64,
) -> Outcome
where
    S: ReleaseStore,
    R: InstanceRefresher,
{
    match run.adapters.store.read().await {
        Ok(Some(s)) if s.version == run.mine.version && s.value == run.mine.value => {
            Outcome::RolledOut {
                release: run.new.to_string(),
                instances,
                switched,
                batches,
                secs,
            }
        }
        Ok(other) => Outcome::NotRolledBack {
            reason: format!(
                "every instance runs {}, but {}",
                run.new,
                run.changed(other).await
            ),
            advice: format!(
                "instances started after that change run what it holds; see `{} status` and `{} history`",
                run.ctl(),
                run.ctl()
            ),
        },
        Err(e) => Outcome::NotRolledBack {
            reason: format!(
                "every instance runs {}, but the parameter cannot be read back: {e}",
                run.new
            ),
            advice: format!(
                "check that it holds {} with `{} status`",
                run.new,
                run.ctl()
            ),
        },
    }
}

#[cfg(test)]
mod verdicts {
    use super::*;

    #[test]
    fn waits_say_what_they_wait_for_when_it_changes() {
        let mut seen = Vec::new();
        let mut emit = |e: Event| seen.push(e);
        let mut script = vec![
            Verdict::Pending(vec![("i-a".into(), "runs v1".into())]),
            Verdict::Pending(vec![("i-a".into(), "runs v1".into())]),
            Verdict::Pending(vec![("i-a".into(), "target initial".into())]),
            Verdict::Done,
        ]
        .into_iter();
        {
            let mut judge = noting("batch 1/2".into(), &mut emit, |_, _| {
                script.next().unwrap_or(Verdict::Done)
            });
            for _ in 0..4 {
                judge(&[], &None);
            }
        }
        let lines: Vec<String> = seen
            .iter()
            .filter_map(|e| match e {
                Event::Rollout(step) => Some(crate::progress::rollout_line(step)),
                _ => None,
            })
            .collect();
        assert_eq!(
            lines,
            vec![
                "in-place: batch 1/2: waiting for i-a (runs v1)",
                "in-place: batch 1/2: waiting for i-a (target initial)",
            ]
        );
    }

    #[test]
    fn failure_words() {
        let t = std::time::Duration::from_secs(5);
        assert!(failure("x", Waited::Done, t).is_none());
        let Some(Failure::Reason(r)) = failure(
            "batch 1 of 3 (v2)",
            Waited::TimedOut(vec![("i-a".into(), "runs v1".into())]),
            t,
        ) else {
            panic!("a timeout is a failure");
        };
        assert_eq!(r, "batch 1 of 3 (v2): not done within 5s: i-a (runs v1)");
        assert!(matches!(
            failure("x", Waited::Stopped("SIGTERM"), t),
            Some(Failure::Stopped("SIGTERM"))
        ));
    }
}

#[cfg(test)]
mod tests;
