//! Compensation, after the write: confirm the release, or put the previous record back (only
//! if the parameter still holds what this run wrote) and roll the fleet to it, or say what to
//! run when neither is safe.

use skiff_release::Release;

use super::refresh::{Watched, watch};
use super::{Adapters, Event, Mine, Outcome, Purpose, Request, stamp};
use crate::history::Kind;
use crate::refresh::{FollowEnd, InstanceRefresher};
use crate::signal::Stop;
use crate::store::{ReleaseStore, Stored};

/// A compensating write that did not happen.
pub(super) enum Guard {
    /// The parameter no longer holds what this run wrote.
    Changed(String),
    Failed(String),
}

/// One release in flight, after its write.
pub(super) struct Run<'r, 'f, S, R, D, L> {
    pub(super) adapters: &'r Adapters<'f, S, R, D, L>,
    pub(super) req: &'r Request,
    pub(super) new: &'r Release,
    pub(super) mine: Mine,
    pub(super) previous: Option<Release>,
}

impl<S, R, D, L> Run<'_, '_, S, R, D, L>
where
    S: ReleaseStore,
    R: InstanceRefresher,
{
    pub(super) fn ctl(&self) -> &str {
        &self.req.ctl
    }

    /// What to run when the parameter still holds the new release and the fleet may be mixed.
    pub(super) fn advice_new(&self) -> String {
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
    pub(super) fn unknown(&self, id: &str, reason: String) -> Outcome {
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
    pub(super) async fn confirm(&self, id: &str) -> Outcome {
        match self.adapters.store.read().await {
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
    pub(super) async fn changed(&self, now: Option<Stored>) -> String {
        let Some(now) = now else {
            return format!(
                "someone deleted the parameter {} meanwhile",
                self.adapters.parameter
            );
        };
        let last = self.adapters.store.history(1).await.ok();
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
            self.adapters.parameter,
            skiff_release::quote(&now.value),
            now.version,
            self.mine.version
        )
    }

    /// Write the previous release back, only if the parameter still holds what this run wrote.
    pub(super) async fn put_back(
        &self,
        prev: &Release,
        emit: &mut dyn FnMut(Event),
    ) -> Result<(), Guard> {
        let now = self
            .adapters
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
            .adapters
            .store
            .write(&record)
            .await
            .map_err(|e| Guard::Failed(e.to_string()))?;
        emit(Event::Written {
            purpose: Purpose::Rollback,
            parameter: self.adapters.parameter.to_owned(),
            version,
            value: record.to_value(),
        });
        Ok(())
    }

    pub(super) fn not_put_back(&self, reason: String, prev: &Release, guard: Guard) -> Outcome {
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
    pub(super) async fn restore_only(
        &self,
        reason: String,
        emit: &mut dyn FnMut(Event),
    ) -> Outcome {
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
    pub(super) async fn roll_back(
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
        let id = match self.adapters.refresher.start(&plan).await {
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
            self.adapters,
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
    pub(super) async fn after_stop(
        &self,
        signal: &'static str,
        emit: &mut dyn FnMut(Event),
    ) -> Outcome {
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
        match self.adapters.refresher.start(&plan).await {
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
