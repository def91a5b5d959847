//! The handover swap: the new container starts on the idle slot beside the old one, is gated
//! on that slot, and only then does the kernel redirect of the app's port flip to it (one
//! atomic step, see `redirect`). The old container keeps running for `hold` while the new one
//! is watched closely; a new one that fails then is flipped back at once. After the hold the
//! old container gets SIGTERM and finishes what it serves (its own graceful shutdown, bounded
//! by `stop_timeout`); it is kept stopped as the rollback target, as in drain mode.
//!
//! Which slot is idle and what a restarted agent settles on are pure (`idle_slot`,
//! `interrupted`), table-tested below; the rest is the sequence.

use std::time::Duration;

use skiff_release::Release;
use tokio::time::{Instant, sleep};

use super::Supervisor;
use crate::config::Handover;
use crate::fleet::Fleet;
use crate::metrics::{SwapKind, SwapOutcome};
use crate::probe;
use crate::redirect::Pointing;
use crate::runtime::{ContainerRuntime, ContainerState};
use crate::source::ReleaseSource;

/// Probe period of the new container while the old one is held after the flip.
const HOLD_PROBE_EVERY: Duration = Duration::from_millis(100);
/// Failed probes in a row (at `HOLD_PROBE_EVERY`) that flip back during the hold: one
/// dropped probe is noise, three in 300 ms is an app that stopped answering.
const HOLD_FAILURES: u32 = 3;

/// The slot a new container takes: the one the serving container does not hold.
pub(crate) fn idle_slot(slots: [u16; 2], serving: Option<u16>) -> u16 {
    if serving == Some(slots[0]) {
        slots[1]
    } else {
        slots[0]
    }
}

/// What a restarted agent does with a handover the journal says was interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Interrupted {
    /// The redirect names the new container's slot: the flip happened; finish the swap.
    Flipped,
    /// It does not (the old slot, nothing after a reboot, or a half-written table): the new
    /// container was never routed; remove it and route to the old one.
    NotFlipped,
}

pub(crate) fn interrupted(pointing: Pointing, new_slot: Option<u16>) -> Interrupted {
    match (pointing, new_slot) {
        (Pointing::Slot(p), Some(s)) if p == s => Interrupted::Flipped,
        _ => Interrupted::NotFlipped,
    }
}

impl<R: ContainerRuntime, S: ReleaseSource, F: Fleet> Supervisor<R, S, F> {
    /// Point the app's port at `c` (handover hosts; nothing to do in drain mode). A container
    /// without a slot listens on the app's port itself: the redirect goes.
    pub(super) fn route_to(&self, c: &ContainerState) -> Result<(), String> {
        let Some(redirect) = &self.steps.redirect else {
            return Ok(());
        };
        let started = Instant::now();
        let result = match c.slot {
            Some(slot) => redirect.point(slot),
            None => redirect.remove(),
        };
        match result {
            Ok(()) => {
                tracing::info!(slot = c.slot, container = %c.id, flip_us = started.elapsed().as_micros() as u64, "the app's port points at the container");
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Make sure the kernel's redirect names `c`'s slot (after a reboot the rules are gone;
    /// after a kill mid-flip they may be anything); written before `c` is reported healthy.
    pub(super) fn ensure_route(&self, c: &ContainerState) {
        let Some(redirect) = &self.steps.redirect else {
            return;
        };
        let now = redirect.pointing();
        let want = c.slot.map_or(Pointing::Nothing, Pointing::Slot);
        if matches!(&now, Ok(p) if *p == want) {
            return;
        }
        tracing::info!(now = ?now.as_ref().ok(), want = ?want, "the redirect does not name the serving container: rewriting it");
        if let Err(e) = self.route_to(c) {
            tracing::error!(error = %e, "cannot point the app's port at the serving container");
            self.record_error(format!("cannot point the app's port at {}: {e}", c.id));
        }
    }

    /// A container serves another release: start the new one on the idle slot, gate it
    /// there, flip, hold, then let the old one finish.
    pub(super) async fn hand_over(&mut self, release: Release, h: Handover) {
        let Some(serving) = self.current.as_ref() else {
            return;
        };
        let slot = idle_slot(h.slots, serving.slot);
        // Something already answering there (another program, or a container this agent could
        // not stop) would take the new one's gate.
        if probe::accepts(slot).await {
            let wait = self.deploy.fail();
            let msg = format!(
                "release {release}: slot port {slot} is taken by another process, so the new container could not listen there; free it or change [app] slots (retrying in {}s)",
                wait.as_secs()
            );
            tracing::error!("{msg}");
            self.steps
                .metrics
                .swap(SwapKind::Update, SwapOutcome::Aborted);
            self.publish(|s| s.last_error = Some(msg));
            return;
        }
        let new = match self.steps.prepare(&release, Some(slot)).await {
            Ok(c) => c,
            Err(e) => return self.deploy_failed_to_prepare(SwapKind::Update, &release, e),
        };
        self.deploy.reset();
        let Some(old) = self.current.take() else {
            return;
        };
        self.steps.record_swap(&old, &new);
        tracing::info!(from = %old.release, to = %release, slot, "handover: starting the new release beside the old one");
        self.publish(|s| s.starting = true);
        let gate = self.steps.start_and_wait(&new).await;
        let outcome = match gate {
            Err(why) => self.never_routed(&release, new, old, why).await,
            Ok(elapsed) => match self.route_to(&new) {
                Err(e) => {
                    // The batch is atomic, but its answer may be lost after the kernel took
                    // it: make sure the port names the old container before the new one goes.
                    self.ensure_route(&old);
                    let why = format!("the redirect could not be flipped to it: {e}");
                    self.never_routed(&release, new, old, why).await
                }
                Ok(()) => self.after_flip(&release, new, old, elapsed, h.hold).await,
            },
        };
        self.steps.metrics.swap(SwapKind::Update, outcome);
        self.steps.clear_journal();
    }

    /// The new container failed its gate (or the flip failed): it never got a request. It
    /// goes; the old one, untouched, keeps serving.
    async fn never_routed(
        &mut self,
        release: &Release,
        new: ContainerState,
        old: ContainerState,
        why: String,
    ) -> SwapOutcome {
        tracing::error!(tag = %release.tag, digest = release.digest_str(), container = %new.id, reason = %why, "release failed before the flip: it never received a request; the old release keeps serving");
        if !self.steps.remove_failed(&new.id).await {
            tracing::error!(container = %new.id, "the failed container could not be stopped; it holds its slot until removed");
        }
        self.failed = Some(release.clone());
        let (failed, msg) = (
            release.clone(),
            format!("release {release} failed: {why}; the previous release kept serving"),
        );
        self.publish(|s| {
            s.failed_release = Some(failed);
            s.starting = false;
            s.last_error = Some(msg);
        });
        self.current = Some(old);
        self.steps.metrics.rollback(true);
        SwapOutcome::RolledBack
    }

    /// Flipped: the new release serves new connections and is reported; the old one runs on
    /// for `hold` so that a failing new one is flipped back, then finishes and stops.
    async fn after_flip(
        &mut self,
        release: &Release,
        new: ContainerState,
        old: ContainerState,
        elapsed: Duration,
        hold: Duration,
    ) -> SwapOutcome {
        let mut old_running = old.clone();
        old_running.running = true;
        self.promote(new.clone(), Some(old_running), elapsed).await;
        self.publish(|s| s.holding = true);
        let held = self.hold(&new, hold).await;
        self.publish(|s| s.holding = false);
        if let Err(why) = held {
            return self.flip_back(release, new, old, why).await;
        }
        self.stop_old(&old).await;
        SwapOutcome::Promoted
    }

    /// Probe the new container on its slot for `hold`; an error when it stops answering.
    async fn hold(&self, new: &ContainerState, hold: Duration) -> Result<(), String> {
        let deadline = Instant::now() + hold;
        let addr = self.steps.addr_of(new);
        let mut failures = 0;
        while Instant::now() < deadline {
            match probe::probe(
                addr,
                &self.steps.cfg.app.health_path,
                Duration::from_millis(500),
            )
            .await
            {
                Ok(code) if probe::is_success(code) => failures = 0,
                Ok(_) | Err(_) => failures += 1,
            }
            if failures >= HOLD_FAILURES {
                return Err(format!(
                    "it stopped answering {} on its slot within {} of the flip",
                    self.steps.cfg.app.health_path,
                    humantime::format_duration(hold)
                ));
            }
            sleep(HOLD_PROBE_EVERY).await;
        }
        Ok(())
    }

    /// The new release failed while the old one still ran: point the port back at the old
    /// one (milliseconds), remove the new one, report the release failed.
    async fn flip_back(
        &mut self,
        release: &Release,
        new: ContainerState,
        mut old: ContainerState,
        why: String,
    ) -> SwapOutcome {
        let started = Instant::now();
        let back = self.route_to(&old);
        tracing::error!(tag = %release.tag, container = %new.id, reason = %why, flipped_back = back.is_ok(), flip_back_ms = started.elapsed().as_millis() as u64, "release failed after the flip: the old release serves again");
        if let Err(e) = &back {
            // The old one cannot be reached through the port either: keep what we have,
            // reported unhealthy by the prober, and say why.
            tracing::error!(error = %e, "cannot flip the app's port back");
        }
        self.steps.remove_failed(&new.id).await;
        self.failed = Some(release.clone());
        old.running = true;
        let running = super::running_of(&old);
        let (failed, msg) = (
            release.clone(),
            format!(
                "release {release} failed after the flip: {why}; flipped back to {}",
                old.release
            ),
        );
        self.publish(|s| {
            s.failed_release = Some(failed);
            s.running = Some(running);
            s.last_error = Some(msg);
        });
        self.previous = None;
        self.reported = None;
        self.healthy_since = Some(Instant::now());
        self.current = Some(old);
        self.steps.metrics.rollback(back.is_ok());
        SwapOutcome::RolledBack
    }

    /// SIGTERM the old container and let it finish (bounded by `stop_timeout`); it stays,
    /// stopped, as the rollback target.
    async fn stop_old(&mut self, old: &ContainerState) {
        let started = Instant::now();
        match self
            .steps
            .runtime
            .stop(&old.id, self.steps.cfg.app.stop_timeout)
            .await
        {
            Ok(()) => {
                tracing::info!(container = %old.id, stop_ms = started.elapsed().as_millis() as u64, "the old release finished and stopped");
                if let Some(p) = self.previous.as_mut().filter(|p| p.id == old.id) {
                    p.running = false;
                }
            }
            Err(e) => {
                // It gets no new connections; the next promotion removes it.
                tracing::warn!(container = %old.id, error = %e, "could not stop the old container");
            }
        }
    }

    /// After a restart: finish a handover the journal names, or undo it if the flip never
    /// happened.
    pub(super) async fn resume_handover(&mut self, old: ContainerState, new: ContainerState) {
        let pointing = match self.steps.redirect.as_ref().map(|r| r.pointing()) {
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the redirect back: taking the flip as not done");
                Pointing::Nothing
            }
            None => Pointing::Nothing,
        };
        let release = new.release.clone();
        match interrupted(pointing, new.slot) {
            Interrupted::NotFlipped => {
                tracing::info!(from = %old.release, to = %release, ?pointing, "an interrupted handover had not flipped: removing the new container, the old one serves");
                self.steps.remove_failed(&new.id).await;
                self.ensure_route(&old);
                let running = super::running_of(&old);
                self.publish(|s| {
                    s.running = Some(running);
                    s.starting = false;
                });
                self.current = Some(old);
            }
            Interrupted::Flipped => {
                tracing::info!(from = %old.release, to = %release, "an interrupted handover had flipped: gating the new container, then finishing");
                let gate = if new.running {
                    self.steps.wait_healthy(&new, Instant::now()).await
                } else {
                    self.steps.start_and_wait(&new).await
                };
                let outcome = match gate {
                    Ok(elapsed) => {
                        self.promote(new, Some(old.clone()), elapsed).await;
                        self.stop_old(&old).await;
                        SwapOutcome::Promoted
                    }
                    Err(why) if old.running => self.flip_back(&release, new, old, why).await,
                    Err(why) => {
                        let outcome = self.roll_back(&release, new, Some(old), why).await;
                        if let Some(c) = self.current.clone() {
                            self.ensure_route(&c);
                        }
                        outcome
                    }
                };
                self.steps.metrics.swap(SwapKind::Update, outcome);
            }
        }
        self.steps.clear_journal();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_slot_is_the_one_not_serving() {
        for (serving, want) in [
            (None, 8090),
            (Some(8090), 8091),
            (Some(8091), 8090),
            // A container of another slot pair (the config changed): the first slot.
            (Some(9000), 8090),
        ] {
            assert_eq!(idle_slot([8090, 8091], serving), want, "{serving:?}");
        }
    }

    #[test]
    fn an_interrupted_handover_is_finished_only_when_the_kernel_names_the_new_slot() {
        use Interrupted::*;
        for (pointing, new_slot, want) in [
            (Pointing::Slot(8091), Some(8091), Flipped),
            (Pointing::Slot(8090), Some(8091), NotFlipped),
            // After a reboot the rules are gone.
            (Pointing::Nothing, Some(8091), NotFlipped),
            (Pointing::Inconsistent, Some(8091), NotFlipped),
            // A drain-mode container was being replaced: never flipped by a slot.
            (Pointing::Slot(8091), None, NotFlipped),
        ] {
            assert_eq!(
                interrupted(pointing, new_slot),
                want,
                "{pointing:?} {new_slot:?}"
            );
        }
    }
}
