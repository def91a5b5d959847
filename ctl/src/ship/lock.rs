//! The release lock: taken before anything is read for writing (after checking that no
//! refresh runs on the group), and let go on every path.

use std::time::Duration;

use time::OffsetDateTime;
use tokio::time::{Instant, sleep};

use super::{Adapters, CANCEL_WAIT, Event, Request, ShipError};
use crate::lock::{self, Holder, LockRecord, ReleaseLock, Released};
use crate::refresh::InstanceRefresher;
use crate::signal::Stop;

/// Longest pause between two attempts at the lock with `--wait-lock`.
const LOCK_POLL: Duration = Duration::from_secs(5);
/// Slack on top of the longest a release can take, before its lock counts as stale.
const LOCK_SLACK: Duration = Duration::from_secs(600);

/// How long the lock may be held before it counts as stale: the longest a release can take
/// (refresh, cancel, rollback refresh, cancel) plus slack.
pub fn lock_hold(req: &Request) -> Duration {
    req.timeout
        .saturating_mul(2)
        .saturating_add(CANCEL_WAIT.saturating_mul(2))
        .saturating_add(LOCK_SLACK)
}

/// Take the lock, then check that no refresh runs on the group; with `wait_lock`, poll until
/// both are free or the wait is over. Returns the lock value written (ours).
pub(super) async fn acquire<S, R, D, L>(
    adapters: &Adapters<'_, S, R, D, L>,
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
        let busy = if adapters.lock.create(&ours).await? {
            match adapters.refresher.latest().await {
                Ok(Some(r)) if r.state.is_active() => {
                    lock::release(adapters.lock, &ours).await?;
                    ShipError::Busy {
                        id: r.id,
                        state: format!("{:?}", r.state),
                    }
                }
                Ok(_) => {
                    emit(Event::Locked {
                        lock: adapters.lock.name().to_owned(),
                        owner: req.owner.clone(),
                    });
                    return Ok(ours);
                }
                Err(e) => {
                    lock::release(adapters.lock, &ours).await?;
                    return Err(ShipError::Refresh(e));
                }
            }
        } else {
            match adapters.lock.read().await? {
                None if gone < 3 => {
                    gone += 1;
                    continue;
                }
                None => ShipError::Locked {
                    lock: adapters.lock.name().to_owned(),
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
                            lock: adapters.lock.name().to_owned(),
                            holder,
                            ctl: req.ctl.clone(),
                        });
                    }
                    ShipError::Locked {
                        lock: adapters.lock.name().to_owned(),
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

/// Let go of the lock taken by [`acquire`] (`ours`), and say so; a lock that is gone or held by
/// someone else now is reported, never deleted.
pub(super) async fn let_go<S, R, D, L>(
    adapters: &Adapters<'_, S, R, D, L>,
    ours: &str,
    emit: &mut dyn FnMut(Event),
) where
    L: ReleaseLock,
{
    let name = adapters.lock.name().to_owned();
    match lock::release(adapters.lock, ours).await {
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
}
