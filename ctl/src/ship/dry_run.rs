//! `--dry-run`: the plan, without taking the lock or writing.

use skiff_release::Release;
use time::OffsetDateTime;

use super::{Adapters, Event, Outcome, Request, ShipError, rollout, target_release};
use crate::inplace::InPlaceFleet;
use crate::lock::{self, ReleaseLock};
use crate::refresh::InstanceRefresher;
use crate::store::ReleaseStore;

/// Show the plan without taking the lock or writing; say when the lock is held.
pub(super) async fn dry_run<S, R, D, L, H>(
    adapters: &Adapters<'_, S, R, D, L>,
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
    match adapters.lock.read().await {
        Ok(Some(v)) => emit(Event::LockHeld {
            lock: adapters.lock.name().to_owned(),
            holder: lock::assess(&v, OffsetDateTime::now_utc()),
        }),
        Ok(None) => {}
        Err(e) => emit(Event::LockUnknown {
            detail: e.to_string(),
        }),
    }
    match adapters.refresher.latest().await {
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
    let new = target_release(adapters, req, new).await?;
    let previous = adapters.store.read().await.map_err(ShipError::Read)?;
    emit(Event::Plan {
        parameter: adapters.parameter.to_owned(),
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
