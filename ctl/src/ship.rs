//! The release procedure: verify the image, take the deploy lock (no refresh running), show
//! old -> new, write and read back, roll the fleet, and on failure put the previous release
//! back and roll the fleet to it. Every step reports an [`Event`]; the end is an [`Outcome`]
//! whose exit code tells CI the truth.

use std::time::Duration;

use serde_json::Value;
use skiff_release::{Release, Tag};

use crate::refresh::{self, FollowEnd, InstanceRefresher, RefreshError, RefreshInfo, RefreshPlan};
use crate::registry::{DigestResolver, RegistryError};
use crate::store::{ReleaseStore, StoreError};

/// Longest wait for a cancelled refresh to let go of the group.
const CANCEL_WAIT: Duration = Duration::from_secs(600);

/// What to release.
#[derive(Debug, Clone)]
pub enum Target {
    /// A tag, resolved to its digest unless `verify` is off.
    Tag { tag: Tag, verify: bool },
    /// A release already pinned (from the history, for `ctl rollback`).
    Pinned(Release),
}

#[derive(Debug, Clone)]
pub struct Request {
    pub target: Target,
    pub released_by: String,
    pub dry_run: bool,
    pub wait: bool,
    pub rollback: bool,
    pub timeout: Duration,
    pub poll: Duration,
    pub plan: RefreshPlan,
}

/// Why a refresh runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    Release,
    Rollback,
}

/// One step of the procedure, for the person or the pipeline watching.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Resolved {
        image: String,
        digest: String,
    },
    Plan {
        parameter: String,
        old: Option<String>,
        new: String,
    },
    Written {
        parameter: String,
        version: i64,
        value: String,
    },
    RefreshStarted {
        purpose: Purpose,
        id: String,
    },
    Progress {
        purpose: Purpose,
        refresh: RefreshInfo,
    },
    Cancelling {
        id: String,
    },
    LockUnknown {
        detail: String,
    },
    RollingBack {
        reason: String,
        to: String,
    },
}

/// How a release ended, when it got as far as acting.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    DryRun,
    Started { refresh_id: String },
    Released { refresh_id: String, release: String },
    RolledBack { reason: String, to: String },
    NotRolledBack { reason: String, advice: String },
}

impl Outcome {
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::DryRun | Outcome::Started { .. } | Outcome::Released { .. } => 0,
            Outcome::RolledBack { .. } => 1,
            Outcome::NotRolledBack { .. } => 3,
        }
    }
}

/// Failures that stop the release; all but `Write` happen before anything changed.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("{0}")]
    Resolve(#[from] RegistryError),
    #[error(
        "another release is in progress: instance refresh {id} is {state}; wait for it (`ctl status`) and retry"
    )]
    Busy { id: String, state: String },
    #[error("{0}")]
    Lock(RefreshError),
    #[error("{0}")]
    Read(StoreError),
    #[error("{0}; the parameter may or may not hold the new release, check `ctl status`")]
    Write(StoreError),
}

impl ShipError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ShipError::Busy { .. } => 4,
            ShipError::Write(_) => 3,
            ShipError::Resolve(_) | ShipError::Lock(_) | ShipError::Read(_) => 2,
        }
    }
}

/// The things a release acts on.
#[derive(Debug)]
pub struct Fleet<'a, S, R, D> {
    pub parameter: &'a str,
    pub image: &'a str,
    pub store: &'a S,
    pub refresher: &'a R,
    pub resolver: &'a D,
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub async fn ship<S, R, D>(
    fleet: &Fleet<'_, S, R, D>,
    req: &Request,
    emit: &mut dyn FnMut(Event),
) -> Result<Outcome, ShipError>
where
    S: ReleaseStore,
    R: InstanceRefresher,
    D: DigestResolver,
{
    let mut new = match &req.target {
        Target::Tag { tag, verify: true } => {
            let digest = fleet.resolver.resolve(fleet.image, tag).await?;
            emit(Event::Resolved {
                image: format!("{}:{tag}", fleet.image),
                digest: digest.to_string(),
            });
            Release::new(tag.clone(), Some(digest))
        }
        Target::Tag { tag, verify: false } => Release::new(tag.clone(), None),
        Target::Pinned(r) => Release::new(r.tag.clone(), r.digest.clone()),
    };
    new.metadata
        .insert("released_at".into(), Value::String(now_rfc3339()));
    new.metadata
        .insert("released_by".into(), Value::String(req.released_by.clone()));

    // The running refresh is the lock.
    let latest = match fleet.refresher.latest().await {
        Ok(latest) => latest,
        // A dry run still shows the plan; it says the lock could not be checked.
        Err(e) if req.dry_run => {
            emit(Event::LockUnknown {
                detail: e.to_string(),
            });
            None
        }
        Err(e) => return Err(ShipError::Lock(e)),
    };
    if let Some(r) = latest
        && r.state.is_active()
    {
        return Err(ShipError::Busy {
            id: r.id,
            state: format!("{:?}", r.state),
        });
    }
    let previous = fleet.store.read().await.map_err(ShipError::Read)?;
    emit(Event::Plan {
        parameter: fleet.parameter.to_owned(),
        old: previous.as_ref().map(|p| p.value.clone()),
        new: new.to_value(),
    });
    if req.dry_run {
        return Ok(Outcome::DryRun);
    }
    let previous = previous.and_then(|p| p.release);
    let version = fleet.store.write(&new).await.map_err(ShipError::Write)?;
    emit(Event::Written {
        parameter: fleet.parameter.to_owned(),
        version,
        value: new.to_value(),
    });

    let id = match fleet.refresher.start(&req.plan).await {
        Ok(id) => id,
        Err(e) => {
            // Nothing was replaced: putting the previous record back restores the fleet.
            let busy = matches!(e, RefreshError::InProgress { .. });
            let outcome = restore_only(fleet, previous.as_ref(), e.to_string(), emit).await;
            if busy && outcome.exit_code() == 1 {
                return Err(ShipError::Busy {
                    id: "(started meanwhile)".into(),
                    state: "running".into(),
                });
            }
            return Ok(outcome);
        }
    };
    emit(Event::RefreshStarted {
        purpose: Purpose::Release,
        id: id.clone(),
    });
    if !req.wait {
        return Ok(Outcome::Started { refresh_id: id });
    }
    let reason = match run_to_end(fleet, req, &id, Purpose::Release, emit).await {
        Ok(()) => {
            return Ok(Outcome::Released {
                refresh_id: id,
                release: new.to_string(),
            });
        }
        Err(reason) => reason,
    };
    Ok(roll_back(fleet, req, &new, previous.as_ref(), reason, emit).await)
}

/// Follow refresh `id` to its end; on timeout cancel it and wait until it lets go of the group.
async fn run_to_end<S, R, D>(
    fleet: &Fleet<'_, S, R, D>,
    req: &Request,
    id: &str,
    purpose: Purpose,
    emit: &mut dyn FnMut(Event),
) -> Result<(), String>
where
    R: InstanceRefresher,
{
    let mut progress = |info: &RefreshInfo| {
        emit(Event::Progress {
            purpose,
            refresh: info.clone(),
        })
    };
    let end = refresh::follow(fleet.refresher, id, req.timeout, req.poll, &mut progress)
        .await
        .map_err(|e| format!("the refresh state is unknown: {e}"))?;
    match end {
        FollowEnd::Succeeded(_) => Ok(()),
        FollowEnd::Failed(info) => Err(format!(
            "instance refresh {id} ended {:?}{}",
            info.state,
            info.reason.map(|r| format!(": {r}")).unwrap_or_default()
        )),
        FollowEnd::TimedOut(_) => {
            let reason = format!(
                "instance refresh {id} did not finish within {}",
                humantime::format_duration(req.timeout)
            );
            progress_cancel(fleet, id, req.poll, emit).await?;
            Err(reason)
        }
    }
}

async fn progress_cancel<S, R, D>(
    fleet: &Fleet<'_, S, R, D>,
    id: &str,
    poll: Duration,
    emit: &mut dyn FnMut(Event),
) -> Result<(), String>
where
    R: InstanceRefresher,
{
    emit(Event::Cancelling { id: id.to_owned() });
    fleet
        .refresher
        .cancel()
        .await
        .map_err(|e| format!("timed out and {e}"))?;
    match refresh::follow(fleet.refresher, id, CANCEL_WAIT, poll, |_| {}).await {
        Ok(FollowEnd::Failed(_) | FollowEnd::Succeeded(_)) => Ok(()),
        Ok(FollowEnd::TimedOut(_)) => Err(format!(
            "timed out, and refresh {id} was still cancelling after {}",
            humantime::format_duration(CANCEL_WAIT)
        )),
        Err(e) => Err(format!(
            "timed out, and the cancelled refresh is unknown: {e}"
        )),
    }
}

fn advice_for(new: &Release, previous: Option<&Release>) -> String {
    match previous {
        Some(p) => format!(
            "the parameter holds {new} and the fleet may be mixed; to go back run `ctl rollback --to {}`, or to retry run `ctl release --tag {}`",
            p.tag, new.tag
        ),
        None => format!(
            "the parameter holds {new} and there is no earlier release to go back to; fix the app and release again"
        ),
    }
}

async fn restore_only<S, R, D>(
    fleet: &Fleet<'_, S, R, D>,
    previous: Option<&Release>,
    reason: String,
    emit: &mut dyn FnMut(Event),
) -> Outcome
where
    S: ReleaseStore,
{
    let Some(prev) = previous else {
        return Outcome::NotRolledBack {
            advice: "no earlier release to put back; fix the cause and release again".into(),
            reason,
        };
    };
    emit(Event::RollingBack {
        reason: reason.clone(),
        to: prev.to_string(),
    });
    match fleet.store.write(prev).await {
        Ok(_) => Outcome::RolledBack {
            reason,
            to: prev.to_string(),
        },
        Err(e) => Outcome::NotRolledBack {
            reason: format!("{reason}; putting {prev} back failed too: {e}"),
            advice: format!(
                "write the previous release back: `ctl rollback --to {}`",
                prev.tag
            ),
        },
    }
}

async fn roll_back<S, R, D>(
    fleet: &Fleet<'_, S, R, D>,
    req: &Request,
    new: &Release,
    previous: Option<&Release>,
    reason: String,
    emit: &mut dyn FnMut(Event),
) -> Outcome
where
    S: ReleaseStore,
    R: InstanceRefresher,
{
    let advice = advice_for(new, previous);
    let Some(prev) = previous.filter(|_| req.rollback) else {
        return Outcome::NotRolledBack { reason, advice };
    };
    emit(Event::RollingBack {
        reason: reason.clone(),
        to: prev.to_string(),
    });
    let failed = |why: String| Outcome::NotRolledBack {
        reason: format!("{reason}; the rollback to {prev} failed too: {why}"),
        advice: advice.clone(),
    };
    if let Err(e) = fleet.store.write(prev).await {
        return failed(e.to_string());
    }
    let id = match fleet.refresher.start(&req.plan).await {
        Ok(id) => id,
        Err(e) => return failed(e.to_string()),
    };
    emit(Event::RefreshStarted {
        purpose: Purpose::Rollback,
        id: id.clone(),
    });
    match run_to_end(fleet, req, &id, Purpose::Rollback, emit).await {
        Ok(()) => Outcome::RolledBack {
            reason,
            to: prev.to_string(),
        },
        Err(why) => failed(why),
    }
}
