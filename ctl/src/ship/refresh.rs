//! The refresh path, once the parameter holds the new release: start an instance refresh,
//! follow it, cancel it when it fails or times out or a stop comes, and hand the end to
//! [`Run`]'s compensation.

use std::time::{Duration, SystemTime};

use super::{Adapters, CANCEL_WAIT, Event, Outcome, Purpose, Request, Run, ShipError};
use crate::exit::ExitCode;
use crate::refresh::{self, FollowEnd, InstanceRefresher, RefreshError, RefreshInfo};
use crate::signal::Stop;
use crate::store::ReleaseStore;

/// Start the release refresh and see it through (with `req.wait`).
pub(super) async fn roll<S, R, D, L>(
    run: &Run<'_, '_, S, R, D, L>,
    stop: &mut Stop,
    emit: &mut dyn FnMut(Event),
) -> Result<Outcome, ShipError>
where
    S: ReleaseStore,
    R: InstanceRefresher,
{
    let (adapters, req) = (run.adapters, run.req);
    if let Some(signal) = stop.requested() {
        return Ok(run
            .restore_only(
                format!("stopped by {signal} before the refresh started"),
                emit,
            )
            .await);
    }
    // A little before the start, so that no launch of this refresh is missed.
    let started_at = SystemTime::now() - Duration::from_secs(1);
    let id = match adapters.refresher.start(&req.plan).await {
        Ok(id) => id,
        Err(e) => {
            // Nothing was replaced: putting the previous record back restores the fleet.
            let busy = matches!(e, RefreshError::InProgress { .. });
            let outcome = run.restore_only(e.to_string(), emit).await;
            if busy && outcome.exit_code() == ExitCode::RolledBack {
                return Err(ShipError::Busy {
                    id: "(started meanwhile, outside ctl)".into(),
                    state: "running".into(),
                });
            }
            return Ok(outcome);
        }
    };
    emit(Event::RefreshStarted {
        purpose: Purpose::Release,
        id: id.clone(),
        alarms: req.plan.alarms.clone(),
    });
    if !req.wait {
        return Ok(Outcome::Started { refresh_id: id });
    }
    Ok(
        match watch(
            adapters,
            req,
            &id,
            Purpose::Release,
            Some(started_at),
            stop,
            emit,
        )
        .await
        {
            Watched::Ended(FollowEnd::Succeeded(_)) => run.confirm(&id).await,
            Watched::Ended(FollowEnd::Failed(info)) => {
                let reason = format!(
                    "instance refresh {id} ended {:?}{}",
                    info.state,
                    info.reason.map(|r| format!(": {r}")).unwrap_or_default()
                );
                run.roll_back(reason, stop, emit).await
            }
            Watched::Ended(end @ (FollowEnd::TimedOut(_) | FollowEnd::LaunchFailed(..))) => {
                let reason = match end {
                    FollowEnd::LaunchFailed(_, why) => {
                        format!("instance refresh {id} is failing: {why}")
                    }
                    _ => format!(
                        "instance refresh {id} did not finish within {}",
                        humantime::format_duration(req.timeout)
                    ),
                };
                match cancel_and_wait(adapters, req, &id, emit).await {
                    Ok(FollowEnd::Succeeded(_)) => run.confirm(&id).await,
                    Ok(_) => run.roll_back(reason, stop, emit).await,
                    Err(why) => run.unknown(&id, format!("{reason}, and {why}")),
                }
            }
            Watched::Unknown(why) => run.unknown(&id, why),
            Watched::Stopped(signal) => {
                emit(Event::Stopping {
                    signal: signal.into(),
                });
                match cancel_and_wait(adapters, req, &id, emit).await {
                    Ok(FollowEnd::Succeeded(_)) => run.confirm(&id).await,
                    Ok(_) => run.after_stop(signal, emit).await,
                    Err(why) => run.unknown(&id, format!("stopped by {signal}, and {why}")),
                }
            }
        },
    )
}

pub(super) enum Watched {
    Ended(FollowEnd),
    /// Describe failed too often: the refresh may still run.
    Unknown(String),
    Stopped(&'static str),
}

/// Follow refresh `id` until it ends, the state becomes unknown, or a stop is requested; with
/// `launches`, a failed launch since then ends it too.
pub(super) async fn watch<S, R, D, L>(
    adapters: &Adapters<'_, S, R, D, L>,
    req: &Request,
    id: &str,
    purpose: Purpose,
    launches: Option<SystemTime>,
    stop: &mut Stop,
    emit: &mut dyn FnMut(Event),
) -> Watched
where
    R: InstanceRefresher,
{
    let mut progress = |info: &RefreshInfo| {
        emit(Event::Progress {
            purpose,
            refresh: info.clone(),
        })
    };
    tokio::select! {
        end = refresh::follow(adapters.refresher, id, req.timeout, req.poll, launches, &mut progress) => match end {
            Ok(end) => Watched::Ended(end),
            Err(e) => Watched::Unknown(format!("the state of instance refresh {id} is unknown: {e}")),
        },
        signal = stop.wait() => Watched::Stopped(signal),
    }
}

/// Cancel refresh `id` and wait (bounded) until it lets go of the group; returns how it
/// ended, or why that is unknown.
pub(super) async fn cancel_and_wait<S, R, D, L>(
    adapters: &Adapters<'_, S, R, D, L>,
    req: &Request,
    id: &str,
    emit: &mut dyn FnMut(Event),
) -> Result<FollowEnd, String>
where
    R: InstanceRefresher,
{
    emit(Event::Cancelling { id: id.to_owned() });
    adapters
        .refresher
        .cancel()
        .await
        .map_err(|e| format!("it may still be running: {e}"))?;
    match refresh::follow(adapters.refresher, id, CANCEL_WAIT, req.poll, None, |_| {}).await {
        Ok(FollowEnd::TimedOut(_)) => Err(format!(
            "refresh {id} was still cancelling after {}",
            humantime::format_duration(CANCEL_WAIT)
        )),
        Ok(end) => Ok(end),
        Err(e) => Err(format!("the cancelled refresh {id} is unknown: {e}")),
    }
}
