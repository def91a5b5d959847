//! The release procedure: verify the image and its signature, take the release lock (and check no refresh runs),
//! read and show old -> new, write and read back, roll the fleet, and on failure, timeout or a
//! stop request put the previous release back (only if the parameter still holds what this
//! run wrote) and roll the fleet to it. Every step reports an [`Event`]; the end is an
//! [`Outcome`] whose exit code tells CI the truth. The lock is let go on every path.

use std::time::Duration;

use serde_json::Value;
use skiff_release::{Release, Tag};
use time::OffsetDateTime;

use crate::exit::ExitCode;
use crate::history::{self, Kind, TargetError};
use crate::inplace::{InPlaceError, InPlaceFleet, NoInPlace, RolloutPlan};
use crate::lock::{Holder, LockError, ReleaseLock};
use crate::refresh::{InstanceRefresher, RefreshError, RefreshPlan};
use crate::registry::{DigestResolver, RegistryError};
use crate::signal::Stop;
use crate::store::{ReleaseStore, StoreError};
use crate::trust::{self, Gate, SignatureChecker, TrustError, Unchecked, Verdict};

use compensation::Run;
pub use events::{Event, Outcome};
pub use lock::lock_hold;

mod compensation;
mod dry_run;
mod events;
mod lock;
mod refresh;
mod rollout;
#[cfg(test)]
mod tests;

/// Longest wait for a cancelled refresh to let go of the group.
pub const CANCEL_WAIT: Duration = Duration::from_secs(600);

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
    #[error("{0}")]
    Trust(#[from] TrustError),
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
            | ShipError::Trust(_)
            | ShipError::Interrupted { .. } => ExitCode::Refused,
        }
    }
}

/// The things a release acts on.
#[derive(Debug)]
pub struct Adapters<'a, S, R, D, L> {
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

/// [`ship_checked`] for the refresh strategy, without a signature check (a deployment that
/// names no trusted keys).
pub async fn ship<S, R, D, L>(
    adapters: &Adapters<'_, S, R, D, L>,
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
    ship_with(adapters, &NoInPlace, req, stop, emit).await
}

/// [`ship_checked`] without a signature check (a deployment that names no trusted keys).
pub async fn ship_with<S, R, D, L, H>(
    adapters: &Adapters<'_, S, R, D, L>,
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
    ship_checked(adapters, hosts, &Gate::<Unchecked>::Off, req, stop, emit).await
}

/// Release: with the instances an in-place rollout (`req.rollout`) switches, and the signature
/// check `gate` the pinned digest passes before anything is written.
pub async fn ship_checked<S, R, D, L, H, C>(
    adapters: &Adapters<'_, S, R, D, L>,
    hosts: &H,
    gate: &Gate<'_, C>,
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
    C: SignatureChecker,
{
    let new = match &req.target {
        Target::Tag { tag, verify: true } => {
            let digest = adapters.resolver.resolve(adapters.image, tag).await?;
            emit(Event::Resolved {
                image: format!("{}:{tag}", adapters.image),
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
    let signed = signature(adapters, gate, req, new.as_ref(), emit).await;
    if req.dry_run {
        // The plan is shown either way; a refused signature still fails the dry run.
        let outcome = dry_run::dry_run(adapters, hosts, req, new, emit).await?;
        signed?;
        return Ok(outcome);
    }
    let signed = signed?;
    let what = match (&new, &req.target) {
        (Some(r), _) => r.to_string(),
        (None, Target::Rollback { to: Some(t) }) => format!("rollback to {t}"),
        (None, _) => "rollback".into(),
    };
    let ours = lock::acquire(adapters, req, &what, stop, emit).await?;
    let result = locked(adapters, hosts, (gate, signed), req, new, stop, emit).await;
    lock::let_go(adapters, &ours, emit).await;
    result
}

/// The signature check of the release this run would write, before the lock is taken: the
/// digest just resolved, or the rollback target as the history names it now. Returns the
/// digest that passed (`None`: the check is off).
async fn signature<S, R, D, L, C>(
    adapters: &Adapters<'_, S, R, D, L>,
    gate: &Gate<'_, C>,
    req: &Request,
    new: Option<&Release>,
    emit: &mut dyn FnMut(Event),
) -> Result<Option<skiff_release::Digest>, ShipError>
where
    S: ReleaseStore,
    C: SignatureChecker,
{
    let Gate::On { keys, checker } = gate else {
        emit(Event::Signature(Verdict::Off));
        return Ok(None);
    };
    let release = match new {
        Some(r) => r.clone(),
        None => target_release(adapters, req, None).await?,
    };
    verify_signature(adapters.image, keys, *checker, &release, req.dry_run, emit).await
}

/// Check `release` against `keys` and report the verdict (a refusal only in a dry run: the
/// error says it otherwise).
async fn verify_signature<C: SignatureChecker>(
    image: &str,
    keys: &trust::Keys,
    checker: &C,
    release: &Release,
    dry_run: bool,
    emit: &mut dyn FnMut(Event),
) -> Result<Option<skiff_release::Digest>, ShipError> {
    let digest = release.digest.as_ref().map(ToString::to_string);
    match trust::check(keys, checker, image, release).await {
        Ok(signed) => {
            emit(Event::Signature(Verdict::Signed {
                digest: digest.unwrap_or_default(),
                key_id: signed.key_id,
                source: keys.source.to_string(),
            }));
            Ok(release.digest.clone())
        }
        Err(e) => {
            if dry_run {
                emit(Event::Signature(Verdict::Refused {
                    digest,
                    reason: e.to_string(),
                }));
            }
            Err(e.into())
        }
    }
}
/// The release to write: the one built from the tag, or the rollback target, read from the
/// history (under the lock, except for a dry run).
async fn target_release<S, R, D, L>(
    adapters: &Adapters<'_, S, R, D, L>,
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
    let history = adapters
        .store
        .history(usize::MAX)
        .await
        .map_err(ShipError::Read)?;
    let target = history::rollback_target(&history, to)?;
    Ok(stamp(&target, req, Kind::Rollback))
}

/// What this run wrote: the parameter must still hold it before anything is written back.
#[derive(Debug, Clone)]
struct Mine {
    version: i64,
    value: String,
}

/// The lock is held: read, write, roll. `checked`: the signature gate and the digest that
/// passed it before the lock was taken.
async fn locked<S, R, D, L, H, C>(
    adapters: &Adapters<'_, S, R, D, L>,
    hosts: &H,
    (gate, checked): (&Gate<'_, C>, Option<skiff_release::Digest>),
    req: &Request,
    new: Option<Release>,
    stop: &mut Stop,
    emit: &mut dyn FnMut(Event),
) -> Result<Outcome, ShipError>
where
    S: ReleaseStore,
    R: InstanceRefresher,
    H: InPlaceFleet,
    C: SignatureChecker,
{
    let new = target_release(adapters, req, new).await?;
    // A rollback target is chosen again under the lock; if the history changed meanwhile and
    // it names another digest, that one is checked too, still before anything is written.
    if let Gate::On { keys, checker } = gate
        && new.digest != checked
    {
        verify_signature(adapters.image, keys, *checker, &new, false, emit).await?;
    }
    let previous = adapters.store.read().await.map_err(ShipError::Read)?;
    emit(Event::Plan {
        parameter: adapters.parameter.to_owned(),
        old: previous.as_ref().map(|p| p.value.clone()),
        new: new.to_value(),
    });
    // A refresh needs the group to replace unhealthy instances again: resume what a killed
    // in-place run held. An in-place run takes that hold over instead (inplace::to_hold) and
    // resumes it at its end: resuming it first would let Auto Scaling replace an instance the
    // killed run left mid-swap (fleet scenario 12).
    if req.rollout.is_none() {
        rollout::resume_stale(hosts, emit).await;
    }
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
    let version = adapters.store.write(&new).await.map_err(ShipError::Write)?;
    let mine = Mine {
        version,
        value: new.to_value(),
    };
    emit(Event::Written {
        purpose: Purpose::Release,
        parameter: adapters.parameter.to_owned(),
        version,
        value: mine.value.clone(),
    });
    let run = Run {
        adapters,
        req,
        new: &new,
        mine,
        previous: previous.and_then(|p| p.release),
    };
    if let (Some(plan), Some(before)) = (&req.rollout, before) {
        return Ok(rollout::roll(&run, hosts, plan, before, stop, emit).await);
    }
    refresh::roll(&run, stop, emit).await
}
