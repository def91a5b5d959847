//! The release procedure: verify the image, take the release lock (and check no refresh runs),
//! read and show old -> new, write and read back, roll the fleet, and on failure, timeout or a
//! stop request put the previous release back (only if the parameter still holds what this
//! run wrote) and roll the fleet to it. Every step reports an [`Event`]; the end is an
//! [`Outcome`] whose exit code tells CI the truth. The lock is let go on every path.

use std::time::{Duration, SystemTime};

use serde_json::Value;
use skiff_release::{Release, Tag};
use time::OffsetDateTime;
use tokio::time::{Instant, sleep};

use crate::exit::ExitCode;
use crate::history::{self, Kind, TargetError};
use crate::inplace::{InPlaceError, InPlaceFleet, NoInPlace, RolloutPlan, RolloutStep};
use crate::lock::{self, Holder, LockError, LockRecord, ReleaseLock, Released};
use crate::refresh::{self, FollowEnd, InstanceRefresher, RefreshError, RefreshInfo, RefreshPlan};
use crate::registry::{DigestResolver, RegistryError};
use crate::signal::Stop;
use crate::store::{ReleaseStore, StoreError, Stored};

/// Longest wait for a cancelled refresh to let go of the group.
pub const CANCEL_WAIT: Duration = Duration::from_secs(600);
/// Longest pause between two attempts at the lock with `--wait-lock`.
const LOCK_POLL: Duration = Duration::from_secs(5);
/// Slack on top of the longest a release can take, before its lock counts as stale.
const LOCK_SLACK: Duration = Duration::from_secs(600);

/// What to release.
#[derive(Debug, Clone)]
pub enum Target {
    /// A tag, resolved to its digest unless `verify` is off.
    Tag { tag: Tag, verify: bool },
    /// An earlier release from the history (`ctl rollback`), chosen once the lock is held.
    Rollback { to: Option<Tag> },
}

#[derive(Debug, Clone)]
pub struct Request {
    pub target: Target,
    pub released_by: String,
    /// Who takes the lock (see [`lock::owner`]).
    pub owner: String,
    pub dry_run: bool,
    pub wait: bool,
    pub rollback: bool,
    pub timeout: Duration,
    pub poll: Duration,
    /// How long to wait for the lock (and a running refresh) to be free; zero: do not wait.
    pub wait_lock: Duration,
    pub plan: RefreshPlan,
    /// `Some`: the in-place strategy (ctl switches the running instances batch by batch)
    /// instead of an instance refresh.
    pub rollout: Option<RolloutPlan>,
    /// How to call ctl for this deployment, for the commands printed as advice.
    pub ctl: String,
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
    Waiting {
        detail: String,
    },
    Locked {
        lock: String,
        owner: String,
    },
    LockHeld {
        lock: String,
        holder: Holder,
    },
    Unlocked {
        lock: String,
    },
    LockLost {
        lock: String,
        detail: String,
    },
    Plan {
        parameter: String,
        old: Option<String>,
        new: String,
    },
    Written {
        purpose: Purpose,
        parameter: String,
        version: i64,
        value: String,
    },
    RefreshStarted {
        purpose: Purpose,
        id: String,
        /// The CloudWatch alarms that fail this refresh when they go to ALARM.
        alarms: Vec<String>,
    },
    Progress {
        purpose: Purpose,
        refresh: RefreshInfo,
    },
    Stopping {
        signal: String,
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
    /// A step of an in-place rollout.
    Rollout(RolloutStep),
}

/// How a release ended, when it got as far as acting.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    DryRun,
    Started {
        refresh_id: String,
    },
    Released {
        refresh_id: String,
        release: String,
    },
    /// In place: every InService instance runs the release and is healthy.
    RolledOut {
        release: String,
        instances: Vec<String>,
        switched: usize,
        batches: usize,
        secs: f64,
    },
    RolledBack {
        reason: String,
        to: String,
    },
    NotRolledBack {
        reason: String,
        advice: String,
    },
    /// Stopped by a signal after the new release was written.
    Interrupted {
        signal: String,
        /// The previous release, written back.
        restored: Option<String>,
        /// The refresh rolling the fleet back, left running.
        refresh_id: Option<String>,
        advice: String,
    },
}

impl Outcome {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Outcome::DryRun
            | Outcome::Started { .. }
            | Outcome::Released { .. }
            | Outcome::RolledOut { .. } => ExitCode::Success,
            Outcome::RolledBack { .. } => ExitCode::RolledBack,
            Outcome::Interrupted {
                restored: Some(_),
                refresh_id: Some(_),
                ..
            } => ExitCode::RolledBack,
            Outcome::NotRolledBack { .. } | Outcome::Interrupted { .. } => ExitCode::NotRolledBack,
        }
    }
}

/// Failures that stop the release; all but `Write` happen before anything changed.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("{0}")]
    Resolve(#[from] RegistryError),
    #[error(
        "another release is in progress: instance refresh {id} is {state}; wait for it (`ctl status`, or --wait-lock) and retry"
    )]
    Busy { id: String, state: String },
    #[error("another release holds the lock {lock}: {holder}; wait for it (--wait-lock) and retry")]
    Locked { lock: String, holder: Holder },
    #[error(
        "the lock {lock} is stale: {holder}; if that release is over (`{ctl} status`), clear it with `{ctl} unlock`"
    )]
    StaleLock {
        lock: String,
        holder: Holder,
        ctl: String,
    },
    #[error("{0}")]
    Lock(#[from] LockError),
    #[error("{0}")]
    Refresh(RefreshError),
    #[error("{0}")]
    InPlace(#[from] InPlaceError),
    #[error("{0}")]
    Read(StoreError),
    #[error("{0}")]
    Target(#[from] TargetError),
    #[error("stopped by {signal} before anything was written")]
    Interrupted { signal: String },
    #[error("{0}; the parameter may or may not hold the new release, check `ctl status`")]
    Write(StoreError),
}

impl ShipError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            ShipError::Busy { .. } | ShipError::Locked { .. } | ShipError::StaleLock { .. } => {
                ExitCode::Busy
            }
            ShipError::Write(_) => ExitCode::NotRolledBack,
            ShipError::Resolve(_)
            | ShipError::Lock(_)
            | ShipError::Refresh(_)
            | ShipError::InPlace(_)
            | ShipError::Read(_)
            | ShipError::Target(_)
            | ShipError::Interrupted { .. } => ExitCode::Refused,
        }
    }
}

/// The things a release acts on.
#[derive(Debug)]
pub struct Fleet<'a, S, R, D, L> {
    pub parameter: &'a str,
    pub image: &'a str,
    pub store: &'a S,
    pub refresher: &'a R,
    pub resolver: &'a D,
    pub lock: &'a L,
}

pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// How long the lock may be held before it counts as stale: the longest a release can take
/// (refresh, cancel, rollback refresh, cancel) plus slack.
pub fn lock_hold(req: &Request) -> Duration {
    req.timeout
        .saturating_mul(2)
        .saturating_add(CANCEL_WAIT.saturating_mul(2))
        .saturating_add(LOCK_SLACK)
}

/// A fresh record of `release`'s version, stamped with when, who and why.
fn stamp(release: &Release, req: &Request, kind: Kind) -> Release {
    let mut r = Release::new(release.tag.clone(), release.digest.clone());
    r.metadata
        .insert("released_at".into(), Value::String(now_rfc3339()));
    r.metadata
        .insert("released_by".into(), Value::String(req.released_by.clone()));
    kind.mark(&mut r);
    r
}

pub async fn ship<S, R, D, L>(
    fleet: &Fleet<'_, S, R, D, L>,
    req: &Request,
    stop: &mut Stop,
    emit: &mut dyn FnMut(Event),
) -> Result<Outcome, ShipError>
where
    S: ReleaseStore,
    R: InstanceRefresher,
    D: DigestResolver,
    L: ReleaseLock,
{
    ship_with(fleet, &NoInPlace, req, stop, emit).await
}

/// [`ship`], with the instances an in-place rollout (`req.rollout`) switches.
pub async fn ship_with<S, R, D, L, H>(
    fleet: &Fleet<'_, S, R, D, L>,
    hosts: &H,
    req: &Request,
    stop: &mut Stop,
    emit: &mut dyn FnMut(Event),
) -> Result<Outcome, ShipError>
where
    S: ReleaseStore,
    R: InstanceRefresher,
    D: DigestResolver,
    L: ReleaseLock,
    H: InPlaceFleet,
{
    let new = match &req.target {
        Target::Tag { tag, verify: true } => {
            let digest = fleet.resolver.resolve(fleet.image, tag).await?;
            emit(Event::Resolved {
                image: format!("{}:{tag}", fleet.image),
                digest: digest.to_string(),
            });
            Some(stamp(
                &Release::new(tag.clone(), Some(digest)),
                req,
                Kind::Release,
            ))
        }
        Target::Tag { tag, verify: false } => {
            Some(stamp(&Release::new(tag.clone(), None), req, Kind::Release))
        }
        Target::Rollback { .. } => None,
    };
    if req.dry_run {
        return dry_run(fleet, hosts, req, new, emit).await;
    }
    let what = match (&new, &req.target) {
        (Some(r), _) => r.to_string(),
        (None, Target::Rollback { to: Some(t) }) => format!("rollback to {t}"),
        (None, _) => "rollback".into(),
    };
    let ours = acquire(fleet, req, &what, stop, emit).await?;
    let result = locked(fleet, hosts, req, new, stop, emit).await;
    let name = fleet.lock.name().to_owned();
    match lock::release(fleet.lock, &ours).await {
        Ok(Released::Deleted) => emit(Event::Unlocked { lock: name }),
        Ok(Released::AlreadyGone) => emit(Event::LockLost {
            lock: name,
            detail: "someone removed it meanwhile (`ctl unlock`?)".into(),
        }),
        Ok(Released::NotOurs(v)) => emit(Event::LockLost {
            lock: name,
            detail: format!(
                "it is held by someone else now, left alone: {}",
                lock::assess(&v, OffsetDateTime::now_utc())
            ),
        }),
        Err(e) => emit(Event::LockLost {
            lock: name,
            detail: e.to_string(),
        }),
    }
    result
}

/// Show the plan without taking the lock or writing; say when the lock is held.
async fn dry_run<S, R, D, L, H>(
    fleet: &Fleet<'_, S, R, D, L>,
    hosts: &H,
    req: &Request,
    new: Option<Release>,
    emit: &mut dyn FnMut(Event),
) -> Result<Outcome, ShipError>
where
    S: ReleaseStore,
    R: InstanceRefresher,
    L: ReleaseLock,
    H: InPlaceFleet,
{
    match fleet.lock.read().await {
        Ok(Some(v)) => emit(Event::LockHeld {
            lock: fleet.lock.name().to_owned(),
            holder: lock::assess(&v, OffsetDateTime::now_utc()),
        }),
        Ok(None) => {}
        Err(e) => emit(Event::LockUnknown {
            detail: e.to_string(),
        }),
    }
    match fleet.refresher.latest().await {
        Ok(Some(r)) if r.state.is_active() => {
            return Err(ShipError::Busy {
                id: r.id,
                state: format!("{:?}", r.state),
            });
        }
        Ok(_) => {}
        Err(e) => emit(Event::LockUnknown {
            detail: e.to_string(),
        }),
    }
    let new = target_release(fleet, req, new).await?;
    let previous = fleet.store.read().await.map_err(ShipError::Read)?;
    emit(Event::Plan {
        parameter: fleet.parameter.to_owned(),
        old: previous.map(|p| p.value),
        new: new.to_value(),
    });
    if let Some(plan) = &req.rollout {
        let h = hosts.hosts().await?;
        emit(Event::Rollout(rollout::plan_step(&h, &new, plan)));
        rollout::check_downtime(hosts, &h, &new, plan).await?;
    }
    Ok(Outcome::DryRun)
}

/// The release to write: the one built from the tag, or the rollback target, read from the
/// history (under the lock, except for a dry run).
async fn target_release<S, R, D, L>(
    fleet: &Fleet<'_, S, R, D, L>,
    req: &Request,
    new: Option<Release>,
) -> Result<Release, ShipError>
where
    S: ReleaseStore,
{
    if let Some(n) = new {
        return Ok(n);
    }
    let to = match &req.target {
        Target::Rollback { to } => to.as_ref(),
        Target::Tag { .. } => None,
    };
    let history = fleet
        .store
        .history(usize::MAX)
        .await
        .map_err(ShipError::Read)?;
    let target = history::rollback_target(&history, to)?;
    Ok(stamp(&target, req, Kind::Rollback))
}

/// Take the lock, then check that no refresh runs on the group; with `wait_lock`, poll until
/// both are free or the wait is over. Returns the lock value written (ours).
async fn acquire<S, R, D, L>(
    fleet: &Fleet<'_, S, R, D, L>,
    req: &Request,
    what: &str,
    stop: &mut Stop,
    emit: &mut dyn FnMut(Event),
) -> Result<String, ShipError>
where
    R: InstanceRefresher,
    L: ReleaseLock,
{
    let deadline = Instant::now() + req.wait_lock;
    let poll = req.poll.min(LOCK_POLL);
    let mut told = false;
    // Times the lock was let go between our create and our read: then try again at once.
    let mut gone = 0;
    loop {
        let ours =
            LockRecord::new(&req.owner, what, OffsetDateTime::now_utc(), lock_hold(req)).to_value();
        let busy = if fleet.lock.create(&ours).await? {
            match fleet.refresher.latest().await {
                Ok(Some(r)) if r.state.is_active() => {
                    lock::release(fleet.lock, &ours).await?;
                    ShipError::Busy {
                        id: r.id,
                        state: format!("{:?}", r.state),
                    }
                }
                Ok(_) => {
                    emit(Event::Locked {
                        lock: fleet.lock.name().to_owned(),
                        owner: req.owner.clone(),
                    });
                    return Ok(ours);
                }
                Err(e) => {
                    lock::release(fleet.lock, &ours).await?;
                    return Err(ShipError::Refresh(e));
                }
            }
        } else {
            match fleet.lock.read().await? {
                None if gone < 3 => {
                    gone += 1;
                    continue;
                }
                None => ShipError::Locked {
                    lock: fleet.lock.name().to_owned(),
                    holder: Holder {
                        owner: "another release that keeps taking and letting go of it".into(),
                        release: "unknown".into(),
                        since: "unknown".into(),
                        age: None,
                        expires: "unknown".into(),
                        stale: false,
                    },
                },
                Some(v) => {
                    let holder = lock::assess(&v, OffsetDateTime::now_utc());
                    if holder.stale {
                        return Err(ShipError::StaleLock {
                            lock: fleet.lock.name().to_owned(),
                            holder,
                            ctl: req.ctl.clone(),
                        });
                    }
                    ShipError::Locked {
                        lock: fleet.lock.name().to_owned(),
                        holder,
                    }
                }
            }
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(busy);
        }
        if !told {
            emit(Event::Waiting {
                detail: busy.to_string(),
            });
            told = true;
        }
        tokio::select! {
            _ = sleep(poll.min(deadline - now)) => {}
            signal = stop.wait() => {
                return Err(ShipError::Interrupted { signal: signal.into() });
            }
        }
    }
}

/// What this run wrote: the parameter must still hold it before anything is written back.
#[derive(Debug, Clone)]
struct Mine {
    version: i64,
    value: String,
}

/// The lock is held: read, write, roll.
async fn locked<S, R, D, L, H>(
    fleet: &Fleet<'_, S, R, D, L>,
    hosts: &H,
    req: &Request,
    new: Option<Release>,
    stop: &mut Stop,
    emit: &mut dyn FnMut(Event),
) -> Result<Outcome, ShipError>
where
    S: ReleaseStore,
    R: InstanceRefresher,
    H: InPlaceFleet,
{
    let new = target_release(fleet, req, new).await?;
    let previous = fleet.store.read().await.map_err(ShipError::Read)?;
    emit(Event::Plan {
        parameter: fleet.parameter.to_owned(),
        old: previous.as_ref().map(|p| p.value.clone()),
        new: new.to_value(),
    });
    // In place: the group can be read and tagged before anything is written.
    let before = match &req.rollout {
        Some(plan) => {
            let h = hosts.hosts().await?;
            if h.is_empty() {
                return Err(crate::inplace::InPlaceError::NoInstances.into());
            }
            let known = previous.as_ref().and_then(|p| p.release.as_ref());
            crate::inplace::check_retagged(&new, known, &h)?;
            rollout::check_downtime(hosts, &h, &new, plan).await?;
            Some(h)
        }
        None => None,
    };
    if let Some(signal) = stop.requested() {
        return Err(ShipError::Interrupted {
            signal: signal.into(),
        });
    }
    let version = fleet.store.write(&new).await.map_err(ShipError::Write)?;
    let mine = Mine {
        version,
        value: new.to_value(),
    };
    emit(Event::Written {
        purpose: Purpose::Release,
        parameter: fleet.parameter.to_owned(),
        version,
        value: mine.value.clone(),
    });
    let run = Run {
        fleet,
        req,
        new: &new,
        mine,
        previous: previous.and_then(|p| p.release),
    };
    if let (Some(plan), Some(before)) = (&req.rollout, before) {
        return Ok(rollout::roll(&run, hosts, plan, before, stop, emit).await);
    }
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
    let id = match fleet.refresher.start(&req.plan).await {
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
            fleet,
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
                match cancel_and_wait(fleet, req, &id, emit).await {
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
                match cancel_and_wait(fleet, req, &id, emit).await {
                    Ok(FollowEnd::Succeeded(_)) => run.confirm(&id).await,
                    Ok(_) => run.after_stop(signal, emit).await,
                    Err(why) => run.unknown(&id, format!("stopped by {signal}, and {why}")),
                }
            }
        },
    )
}

enum Watched {
    Ended(FollowEnd),
    /// Describe failed too often: the refresh may still run.
    Unknown(String),
    Stopped(&'static str),
}

/// Follow refresh `id` until it ends, the state becomes unknown, or a stop is requested; with
/// `launches`, a failed launch since then ends it too.
async fn watch<S, R, D, L>(
    fleet: &Fleet<'_, S, R, D, L>,
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
        end = refresh::follow(fleet.refresher, id, req.timeout, req.poll, launches, &mut progress) => match end {
            Ok(end) => Watched::Ended(end),
            Err(e) => Watched::Unknown(format!("the state of instance refresh {id} is unknown: {e}")),
        },
        signal = stop.wait() => Watched::Stopped(signal),
    }
}

/// Cancel refresh `id` and wait (bounded) until it lets go of the group; returns how it
/// ended, or why that is unknown.
async fn cancel_and_wait<S, R, D, L>(
    fleet: &Fleet<'_, S, R, D, L>,
    req: &Request,
    id: &str,
    emit: &mut dyn FnMut(Event),
) -> Result<FollowEnd, String>
where
    R: InstanceRefresher,
{
    emit(Event::Cancelling { id: id.to_owned() });
    fleet
        .refresher
        .cancel()
        .await
        .map_err(|e| format!("it may still be running: {e}"))?;
    match refresh::follow(fleet.refresher, id, CANCEL_WAIT, req.poll, None, |_| {}).await {
        Ok(FollowEnd::TimedOut(_)) => Err(format!(
            "refresh {id} was still cancelling after {}",
            humantime::format_duration(CANCEL_WAIT)
        )),
        Ok(end) => Ok(end),
        Err(e) => Err(format!("the cancelled refresh {id} is unknown: {e}")),
    }
}

/// A compensating write that did not happen.
enum Guard {
    /// The parameter no longer holds what this run wrote.
    Changed(String),
    Failed(String),
}

/// One release in flight, after its write.
struct Run<'r, 'f, S, R, D, L> {
    fleet: &'r Fleet<'f, S, R, D, L>,
    req: &'r Request,
    new: &'r Release,
    mine: Mine,
    previous: Option<Release>,
}

impl<S, R, D, L> Run<'_, '_, S, R, D, L>
where
    S: ReleaseStore,
    R: InstanceRefresher,
{
    fn ctl(&self) -> &str {
        &self.req.ctl
    }

    /// What to run when the parameter still holds the new release and the fleet may be mixed.
    fn advice_new(&self) -> String {
        match &self.previous {
            Some(p) => format!(
                "the parameter holds {} and the fleet may be mixed; to go back run `{} rollback --to {}`, or to retry run `{} release --tag {}`",
                self.new,
                self.ctl(),
                p.tag,
                self.ctl(),
                self.new.tag
            ),
            None => format!(
                "the parameter holds {} and there is no earlier release to go back to; fix the app and release again",
                self.new
            ),
        }
    }

    /// The refresh may still be running: write nothing, say how to finish.
    fn unknown(&self, id: &str, reason: String) -> Outcome {
        let then = match &self.previous {
            Some(p) => format!(
                "if it failed or was cancelled, run `{} rollback --to {}`",
                self.ctl(),
                p.tag
            ),
            None => "if it failed, fix the app and release again".into(),
        };
        Outcome::NotRolledBack {
            reason,
            advice: format!(
                "nothing was written back while instance refresh {id} may still run; the parameter holds {} (version {}). Wait until `{} status` shows refresh {id} ended: if it succeeded, {} is released; {then}",
                self.new,
                self.mine.version,
                self.ctl(),
                self.new
            ),
        }
    }

    /// After the refresh succeeded: the parameter must still hold this release.
    async fn confirm(&self, id: &str) -> Outcome {
        match self.fleet.store.read().await {
            Ok(Some(s)) if s.version == self.mine.version && s.value == self.mine.value => {
                Outcome::Released {
                    refresh_id: id.to_owned(),
                    release: self.new.to_string(),
                }
            }
            Ok(other) => Outcome::NotRolledBack {
                reason: format!(
                    "instance refresh {id} succeeded, but {}",
                    self.changed(other).await
                ),
                advice: format!(
                    "instances started after that change run what it holds; see `{} status` and `{} history`",
                    self.ctl(),
                    self.ctl()
                ),
            },
            Err(e) => Outcome::NotRolledBack {
                reason: format!(
                    "instance refresh {id} succeeded, but the parameter cannot be read back: {e}"
                ),
                advice: format!(
                    "check that it holds {} with `{} status`",
                    self.new,
                    self.ctl()
                ),
            },
        }
    }

    /// How the parameter changed under us, with who and when where the history says.
    async fn changed(&self, now: Option<Stored>) -> String {
        let Some(now) = now else {
            return format!(
                "someone deleted the parameter {} meanwhile",
                self.fleet.parameter
            );
        };
        let last = self.fleet.store.history(1).await.ok();
        let last = last.as_ref().and_then(|h| h.first());
        let by = last
            .and_then(|s| s.modified_by.clone())
            .or_else(|| {
                now.release
                    .as_ref()
                    .and_then(|r| r.meta_str("released_by").map(str::to_owned))
            })
            .unwrap_or_else(|| "unknown".into());
        let at = last
            .and_then(|s| s.modified_at.clone())
            .or(now.modified_at.clone())
            .unwrap_or_else(|| "unknown".into());
        format!(
            "someone else changed the parameter {} meanwhile: it holds {} (version {}, written by {by} at {at}, after this run's version {})",
            self.fleet.parameter,
            skiff_release::quote(&now.value),
            now.version,
            self.mine.version
        )
    }

    /// Write the previous release back, only if the parameter still holds what this run wrote.
    async fn put_back(&self, prev: &Release, emit: &mut dyn FnMut(Event)) -> Result<(), Guard> {
        let now = self
            .fleet
            .store
            .read()
            .await
            .map_err(|e| Guard::Failed(e.to_string()))?;
        match now {
            Some(s) if s.version == self.mine.version && s.value == self.mine.value => {}
            other => return Err(Guard::Changed(self.changed(other).await)),
        }
        let record = stamp(
            prev,
            self.req,
            Kind::Compensation {
                compensates: self.mine.version,
            },
        );
        let version = self
            .fleet
            .store
            .write(&record)
            .await
            .map_err(|e| Guard::Failed(e.to_string()))?;
        emit(Event::Written {
            purpose: Purpose::Rollback,
            parameter: self.fleet.parameter.to_owned(),
            version,
            value: record.to_value(),
        });
        Ok(())
    }

    fn not_put_back(&self, reason: String, prev: &Release, guard: Guard) -> Outcome {
        match guard {
            Guard::Changed(what) => Outcome::NotRolledBack {
                reason: format!("{reason}; {what}, so {prev} was NOT written back over it"),
                advice: format!(
                    "decide which release the fleet should run, then `{} release --tag <tag>` (`{} history` shows the values)",
                    self.ctl(),
                    self.ctl()
                ),
            },
            Guard::Failed(e) => Outcome::NotRolledBack {
                reason: format!("{reason}; putting {prev} back failed too: {e}"),
                advice: format!(
                    "write the previous release back: `{} rollback --to {}`",
                    self.ctl(),
                    prev.tag
                ),
            },
        }
    }

    /// No refresh ran: put the previous record back.
    async fn restore_only(&self, reason: String, emit: &mut dyn FnMut(Event)) -> Outcome {
        let Some(prev) = &self.previous else {
            return Outcome::NotRolledBack {
                advice: "no earlier release to put back; fix the cause and release again".into(),
                reason,
            };
        };
        emit(Event::RollingBack {
            reason: reason.clone(),
            to: prev.to_string(),
        });
        match self.put_back(prev, emit).await {
            Ok(()) => Outcome::RolledBack {
                reason,
                to: prev.to_string(),
            },
            Err(g) => self.not_put_back(reason, prev, g),
        }
    }

    /// The release refresh failed or timed out and is over: put the previous record back and
    /// roll the fleet to it.
    async fn roll_back(
        &self,
        reason: String,
        stop: &mut Stop,
        emit: &mut dyn FnMut(Event),
    ) -> Outcome {
        let Some(prev) = self.previous.as_ref().filter(|_| self.req.rollback) else {
            return Outcome::NotRolledBack {
                reason,
                advice: self.advice_new(),
            };
        };
        emit(Event::RollingBack {
            reason: reason.clone(),
            to: prev.to_string(),
        });
        if let Err(g) = self.put_back(prev, emit).await {
            return self.not_put_back(reason, prev, g);
        }
        let again = format!(
            "the parameter holds {prev} again but the fleet may be mixed: run `{} rollback --to {}` to roll it again",
            self.ctl(),
            prev.tag
        );
        let failed = |why: String| Outcome::NotRolledBack {
            reason: format!("{reason}; the rollback to {prev} failed too: {why}"),
            advice: again.clone(),
        };
        let plan = self.req.plan.for_rollback();
        let id = match self.fleet.refresher.start(&plan).await {
            Ok(id) => id,
            Err(e) => return failed(e.to_string()),
        };
        emit(Event::RefreshStarted {
            purpose: Purpose::Rollback,
            id: id.clone(),
            alarms: plan.alarms.clone(),
        });
        // Launches are watched for the release only: a rollback returns to a release that ran.
        match watch(
            self.fleet,
            self.req,
            &id,
            Purpose::Rollback,
            None,
            stop,
            emit,
        )
        .await
        {
            Watched::Ended(FollowEnd::Succeeded(_)) => Outcome::RolledBack {
                reason,
                to: prev.to_string(),
            },
            Watched::Ended(FollowEnd::Failed(info)) => failed(format!(
                "instance refresh {id} ended {:?}{}",
                info.state,
                info.reason.map(|r| format!(": {r}")).unwrap_or_default()
            )),
            Watched::Ended(FollowEnd::LaunchFailed(_, why)) => failed(why),
            Watched::Ended(FollowEnd::TimedOut(_)) => failed(format!(
                "instance refresh {id} did not finish within {}; it is still running, follow it with `{} status`",
                humantime::format_duration(self.req.timeout),
                self.ctl()
            )),
            Watched::Unknown(why) => Outcome::NotRolledBack {
                reason: format!("{reason}; {why}"),
                advice: format!(
                    "the parameter holds {prev} again; follow rollback refresh {id} with `{} status`, and if it failed run `{} rollback --to {}`",
                    self.ctl(),
                    self.ctl(),
                    prev.tag
                ),
            },
            // Rolling back already: leave the refresh running, it brings the fleet back.
            Watched::Stopped(signal) => Outcome::Interrupted {
                signal: signal.into(),
                restored: Some(prev.to_string()),
                refresh_id: Some(id.clone()),
                advice: format!(
                    "rollback refresh {id} keeps running and brings the fleet back to {prev}; follow it with `{} status`",
                    self.ctl()
                ),
            },
        }
    }

    /// Stopped by a signal and the release refresh cancelled: put the previous record back
    /// and start the refresh that rolls the replaced instances back, without waiting for it.
    async fn after_stop(&self, signal: &'static str, emit: &mut dyn FnMut(Event)) -> Outcome {
        let reason = format!("stopped by {signal}");
        let Some(prev) = self.previous.as_ref().filter(|_| self.req.rollback) else {
            return Outcome::Interrupted {
                signal: signal.into(),
                restored: None,
                refresh_id: None,
                advice: self.advice_new(),
            };
        };
        emit(Event::RollingBack {
            reason: reason.clone(),
            to: prev.to_string(),
        });
        if let Err(g) = self.put_back(prev, emit).await {
            return self.not_put_back(reason, prev, g);
        }
        let plan = self.req.plan.for_rollback();
        match self.fleet.refresher.start(&plan).await {
            Ok(id) => {
                emit(Event::RefreshStarted {
                    purpose: Purpose::Rollback,
                    id: id.clone(),
                    alarms: plan.alarms.clone(),
                });
                Outcome::Interrupted {
                    signal: signal.into(),
                    restored: Some(prev.to_string()),
                    refresh_id: Some(id.clone()),
                    advice: format!(
                        "rollback refresh {id} brings the instances already replaced back to {prev}; follow it with `{} status`",
                        self.ctl()
                    ),
                }
            }
            Err(e) => Outcome::Interrupted {
                signal: signal.into(),
                restored: Some(prev.to_string()),
                refresh_id: None,
                advice: format!(
                    "the parameter holds {prev} again, but the refresh to roll the replaced instances back did not start ({e}): run `{} rollback --to {}`",
                    self.ctl(),
                    prev.tag
                ),
            },
        }
    }
}

mod rollout;
#[cfg(test)]
mod tests;
