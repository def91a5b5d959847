//! The swap: what a deploy (nothing serves) and a replace (a healthy container serves another
//! release) do, step by step: prepare, journal, drain, stop, start, health gate, then promote or
//! roll back; a failed stop aborts the swap. The engine-facing steps are in `steps`; the loop
//! decides when a swap runs.

use std::time::Duration;

use skiff_release::Release;
use tokio::time::{Instant, sleep};

use super::steps::DeployError;
use super::{Supervisor, running_of};
use crate::fleet::Fleet;
use crate::metrics::{self, DrainReason, SwapKind, SwapOutcome};
use crate::runtime::{ContainerRuntime, ContainerState, RuntimeError};
use crate::source::ReleaseSource;

impl<R: ContainerRuntime, S: ReleaseSource, F: Fleet> Supervisor<R, S, F> {
    /// Nothing serves: bring up `release` directly.
    pub(super) async fn deploy(&mut self, release: Release) {
        self.publish(|s| {
            s.starting = true;
            s.failed = false;
        });
        // Handover: the slot the stopped container (the rollback target) does not hold.
        let slot = self.handover().map(|h| {
            let holder = self.current.as_ref().or(self.previous.as_ref());
            super::handover::idle_slot(h.slots, holder.and_then(|c| c.slot))
        });
        let new = match self.steps.prepare(&release, slot).await {
            Ok(c) => c,
            Err(e) => {
                // Nothing to run here and retrying cannot help (a refused signature, a digest
                // mismatch, denied access): give the launch up now, as a failed start does,
                // rather than hold it until its lifecycle hook times out.
                if !e.is_retryable() && self.current.is_none() && self.previous.is_none() {
                    self.fleet.release_failed(&release).await;
                }
                return self.deploy_failed_to_prepare(SwapKind::Start, &release, e);
            }
        };
        self.deploy.reset();
        let old = self.current.take();
        if let Some(o) = &old {
            // A stopped container of another release: keep it as the rollback target.
            let _ = self
                .steps
                .runtime
                .stop(&o.id, self.steps.cfg.app.stop_timeout)
                .await;
        }
        let gate = match self.steps.start_and_wait(&new).await {
            Ok(elapsed) => self
                .route_to(&new)
                .map(|()| elapsed)
                .map_err(|e| format!("the redirect could not be pointed at it: {e}")),
            Err(why) => Err(why),
        };
        let outcome = match gate {
            Ok(elapsed) => {
                self.promote(new, old, elapsed).await;
                SwapOutcome::Promoted
            }
            Err(why) => {
                let fallback = old.or_else(|| self.previous.take());
                self.roll_back(&release, new, fallback, why).await
            }
        };
        self.steps.metrics.swap(SwapKind::Start, outcome);
    }

    /// A container serves another release: prepare the new one, drain, swap, check, roll back.
    pub(super) async fn replace(&mut self, release: Release) {
        if self.current.is_none() {
            return;
        }
        if let Some(h) = self.handover() {
            return self.hand_over(release, h).await;
        }
        let new = match self.steps.prepare(&release, None).await {
            Ok(c) => c,
            Err(e) => return self.deploy_failed_to_prepare(SwapKind::Update, &release, e),
        };
        self.deploy.reset();
        let Some(old) = self.current.take() else {
            return;
        };
        self.steps.record_swap(&old, &new);
        let drain = self.steps.cfg.release.drain;
        tracing::info!(from = %old.release, to = %release, drain_ms = drain.as_millis() as u64, "draining before the update");
        self.publish(|s| s.draining = true);
        self.steps.metrics.drain(DrainReason::Update);
        sleep(drain).await;
        if let Err(e) = self
            .steps
            .runtime
            .stop(&old.id, self.steps.cfg.app.stop_timeout)
            .await
        {
            return self.abort_swap(&release, old, new, e).await;
        }
        self.healthy_since = None;
        let outcome = match self.steps.start_and_wait(&new).await {
            Ok(elapsed) => {
                self.promote(new, Some(old), elapsed).await;
                SwapOutcome::Promoted
            }
            Err(why) => {
                let outcome = self.roll_back(&release, new, Some(old), why).await;
                self.publish(|s| s.draining = false);
                outcome
            }
        };
        self.steps.metrics.swap(SwapKind::Update, outcome);
        self.steps.clear_journal();
    }

    /// The handover settings when this host swaps by handover (config and a redirect).
    pub(super) fn handover(&self) -> Option<crate::config::Handover> {
        self.steps.redirect.as_ref()?;
        self.steps.cfg.app.swap.handover().copied()
    }

    /// The old container could not be stopped: it may still hold the port, so the new one is
    /// never started (its probe would be answered by the old app). The swap is undone, the
    /// host un-drained, and the release retried after the deploy backoff.
    async fn abort_swap(
        &mut self,
        release: &Release,
        old: ContainerState,
        new: ContainerState,
        e: RuntimeError,
    ) {
        tracing::error!(tag = %release.tag, container = %old.id, error = %e, "cannot stop the old container: swap aborted, the old release keeps serving");
        if let Err(e) = self.steps.runtime.remove(&new.id).await {
            tracing::warn!(container = %new.id, error = %e, "could not remove the unused new container");
        }
        self.deploy.fail();
        self.steps
            .metrics
            .swap(SwapKind::Update, SwapOutcome::Aborted);
        let msg = format!("release {release}: swap aborted, cannot stop the old container: {e}");
        self.publish(|s| {
            s.draining = false;
            s.starting = false;
            s.last_error = Some(msg);
        });
        self.current = Some(old);
        self.steps.clear_journal();
    }

    /// The release could not be prepared (pull, env, create): the current container keeps
    /// running, and the release is retried after the deploy backoff, or never when retrying
    /// cannot help.
    pub(super) fn deploy_failed_to_prepare(
        &mut self,
        kind: SwapKind,
        release: &Release,
        e: DeployError,
    ) {
        self.steps.metrics.swap(kind, SwapOutcome::NotPrepared);
        if let DeployError::Source(s) = &e {
            self.steps
                .metrics
                .source_error(metrics::source_error_kind(s));
        }
        let retryable = e.is_retryable();
        let wait = self.deploy.fail();
        tracing::error!(tag = %release.tag, digest = release.digest_str(), error = %e, retryable, retry_in_ms = wait.as_millis() as u64, "cannot prepare the release; the current container keeps running");
        if !retryable {
            // A digest mismatch or denied access will not heal by itself: do not hammer.
            self.note_refusal(release, &e);
            self.failed = Some(release.clone());
            let r = release.clone();
            self.publish(|s| s.failed_release = Some(r));
        }
        let msg = format!("release {release}: {e}");
        self.publish(|s| {
            s.starting = false;
            s.last_error = Some(msg);
        });
    }

    /// `new` is healthy: it becomes current, `old` is kept stopped for rollback, older ones go.
    pub(super) async fn promote(
        &mut self,
        mut new: ContainerState,
        old: Option<ContainerState>,
        elapsed: Duration,
    ) {
        new.running = true;
        let ms = elapsed.as_millis() as u64;
        self.steps.metrics.healthy_after(elapsed);
        tracing::info!(tag = %new.release.tag, digest = new.release.digest_str(), container = %new.id, start_to_healthy_ms = ms, "release is healthy");
        // Healthy is reported first: cleanup and fleet calls must not delay the host's answer.
        let running = running_of(&new);
        let previous = old.as_ref().map(|o| o.release.clone());
        self.publish(|s| {
            s.running = Some(running);
            s.previous = previous.or(s.previous.take());
            s.app.ok = true;
            s.starting = false;
            s.failed = false;
            s.draining = false;
            s.timings.start_to_healthy_ms = Some(ms);
        });
        // Without a new rollback target, the previous one is kept (and so is its container).
        let keep: Vec<String> = [Some(&new), old.as_ref().or(self.previous.as_ref())]
            .into_iter()
            .flatten()
            .map(|c| c.id.clone())
            .collect();
        if let Ok(all) = self.steps.runtime.list(&self.steps.cfg.app.name).await {
            for stale in all.iter().filter(|c| !keep.contains(&c.id)) {
                if let Err(e) = self.steps.runtime.remove(&stale.id).await {
                    tracing::warn!(container = %stale.id, error = %e, "could not remove an old container");
                }
            }
        }
        self.healthy_since = Some(Instant::now());
        self.restart.reset();
        self.reported = Some(new.id.clone());
        self.fleet.release_healthy(&new.release).await;
        if old.is_some() {
            self.previous = old;
        }
        self.current = Some(new);
        // Images of the app's repository other than the current and the previous release's go.
        let keep: Vec<&Release> = [self.current.as_ref(), self.previous.as_ref()]
            .into_iter()
            .flatten()
            .map(|c| &c.release)
            .collect();
        self.steps.prune_images(&keep).await;
    }

    /// `new` did not become healthy: remove it, bring back `fallback` if there is one. Returns
    /// how the swap ended: rolled back, or failed (nothing healthy serves).
    pub(super) async fn roll_back(
        &mut self,
        release: &Release,
        new: ContainerState,
        fallback: Option<ContainerState>,
        why: String,
    ) -> SwapOutcome {
        tracing::error!(tag = %release.tag, digest = release.digest_str(), container = %new.id, reason = %why, "release failed to become healthy");
        let gone = self.steps.remove_failed(&new.id).await;
        let fallback = match fallback {
            Some(f) if !self.may_start(&f) => {
                tracing::warn!(container = %f.id, tag = %f.release.tag, "the previous container's digest was never verified here: not rolled back to");
                None
            }
            other => other,
        };
        self.failed = Some(release.clone());
        let failed_release = release.clone();
        if !gone {
            // Starting the old one now could put two apps on the port: keep the failed one as
            // the current container (reported unhealthy) rather than break that promise.
            let msg = format!(
                "release {release} failed: {why}; its container could not be stopped, so the previous release is not started"
            );
            tracing::error!(container = %new.id, "{msg}");
            let mut new = new;
            new.running = true;
            let running = running_of(&new);
            self.publish(|s| {
                s.failed_release = Some(failed_release);
                s.running = Some(running);
                s.app.ok = false;
                s.starting = false;
                s.last_error = Some(msg);
            });
            if fallback.is_some() {
                self.previous = fallback;
            }
            self.current = Some(new);
            return SwapOutcome::Failed;
        }
        let Some(old) = fallback else {
            self.fleet.release_failed(release).await;
            let msg = format!("release {release} failed: {why}; nothing else to run on this host");
            self.publish(|s| {
                s.failed_release = Some(failed_release);
                s.failed = true;
                s.starting = false;
                s.running = None;
                s.app.ok = false;
                s.last_error = Some(msg);
            });
            return SwapOutcome::Failed;
        };
        let started = Instant::now();
        let back = match self.steps.runtime.start(&old.id).await {
            Ok(()) => self.steps.wait_healthy(&old, started).await,
            Err(e) => Err(e.to_string()),
        };
        if back.is_ok() {
            self.ensure_route(&old);
        }
        let msg = match &back {
            Ok(_) => {
                tracing::warn!(tag = %old.release.tag, container = %old.id, "rolled back to the previous release");
                format!(
                    "release {release} failed: {why}; rolled back to {}",
                    old.release
                )
            }
            Err(e) => {
                tracing::error!(tag = %old.release.tag, error = %e, "the previous release did not come back either");
                format!(
                    "release {release} failed: {why}; rollback to {} failed too: {e}",
                    old.release
                )
            }
        };
        let ok = back.is_ok();
        let mut old = old;
        old.running = ok;
        let running = running_of(&old);
        self.publish(|s| {
            s.failed_release = Some(failed_release);
            s.running = Some(running);
            s.app.ok = ok;
            s.starting = false;
            s.last_error = Some(msg);
        });
        if ok {
            self.healthy_since = Some(Instant::now());
        }
        self.current = Some(old);
        self.steps.metrics.rollback(ok);
        if ok {
            SwapOutcome::RolledBack
        } else {
            SwapOutcome::Failed
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use skiff_release::Release;
    use tokio::time::sleep;
    use tokio_util::sync::CancellationToken;

    use crate::fleet::NoFleet;
    use crate::runtime::ContainerState;
    use crate::supervise::Supervisor;
    use crate::supervise::fakes::{FakeRuntime, RecordingFleet, config, running, source, stopped};

    #[tokio::test(start_paused = true)]
    async fn a_failed_stop_aborts_the_swap_and_the_old_container_keeps_serving() {
        let runtime = FakeRuntime::default();
        {
            let mut w = runtime.world();
            w.containers.push(running("v1"));
            w.fail_stop = true;
        }
        let fleet = RecordingFleet::default();
        let sup = Supervisor::new(
            config("follow"),
            runtime.clone(),
            source("v1", "v2"),
            fleet.clone(),
        );
        let state = sup.state();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(sup.run(cancel.clone()));
        // First poll reads v1, the second (10 s later) v2; one swap attempt with its drain.
        sleep(Duration::from_secs(40)).await;
        cancel.cancel();
        task.await.expect("join");

        let w = runtime.world();
        assert!(w.stops >= 1, "a swap was tried: {w:?}");
        assert!(
            w.started_ids.is_empty(),
            "the new container is never started: {w:?}"
        );
        let ids: Vec<&str> = w.containers.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["adopted"], "the unused new container is removed");
        assert!(w.containers[0].running);
        assert!(
            !fleet.healthy_tags().iter().any(|t| t == "v2"),
            "v2 is never reported healthy"
        );
        let snap = state.borrow();
        assert!(!snap.draining, "un-drained after the abort");
        assert!(!snap.starting);
        assert_eq!(
            snap.running.as_ref().map(|r| r.container_id.as_str()),
            Some("adopted")
        );
        assert!(
            snap.last_error
                .as_deref()
                .is_some_and(|e| e.contains("swap aborted")),
            "{:?}",
            snap.last_error
        );
    }

    /// A deploy without a new rollback target keeps the previous one, container included.
    #[tokio::test(start_paused = true)]
    async fn promote_keeps_the_previous_container_it_still_refers_to() {
        let runtime = FakeRuntime::default();
        runtime.world().containers.push(stopped("prev", "v0", 1));
        let sup = Supervisor::new(
            config("follow"),
            runtime.clone(),
            source("v1", "v1"),
            NoFleet,
        );
        let state = sup.state();
        // The prober would say healthy; here every probe of port 1 fails, so emulate the
        // promotion path directly.
        let mut sup = sup;
        assert!(sup.adopt().await);
        // The adopted, stopped v0 becomes the rollback target, as after a deploy (no current).
        sup.previous = sup.current.take();
        let new = ContainerState {
            id: "fresh".into(),
            name: "t-v1".into(),
            release: Release::new("v1".parse().expect("tag"), None),
            running: true,
            started: true,
            created: 3,
            slot: None,
        };
        runtime.world().containers.push(new.clone());
        sup.promote(new, None, Duration::from_secs(1)).await;
        let ids: Vec<String> = runtime
            .world()
            .containers
            .iter()
            .map(|c| c.id.clone())
            .collect();
        assert!(ids.contains(&"prev".to_owned()), "{ids:?}");
        assert_eq!(sup.previous.as_ref().map(|p| p.id.as_str()), Some("prev"));
        assert!(state.borrow().app.ok);
    }
}
