//! Adoption: at start, the agent takes over the containers it manages for this app without
//! restarting them, judges them like any other (one probe; a healthy one is reported to the
//! fleet by the loop), and finishes or reverts a swap the journal says was interrupted, behind
//! the same health gate and rollback as an uninterrupted one.

use std::time::Duration;

use tokio::time::Instant;

use super::{Supervisor, running_of};
use crate::fleet::Fleet;
use crate::journal::Journal;
use crate::metrics::{SwapKind, SwapOutcome};
use crate::probe;
use crate::redirect::Pointing;
use crate::runtime::{ContainerRuntime, ContainerState};
use crate::source::ReleaseSource;

impl<R: ContainerRuntime, S: ReleaseSource, F: Fleet> Supervisor<R, S, F> {
    /// Find the containers managed for this app and take them over without restarting them.
    /// Returns whether the engine answered.
    pub async fn adopt(&mut self) -> bool {
        let mut found = match self.steps.runtime.list(&self.steps.cfg.app.name).await {
            Ok(list) => list,
            Err(e) => {
                self.record_error(e.to_string());
                return false;
            }
        };
        self.adopted = true;
        let intent = match self.steps.journal.as_ref().map(Journal::read) {
            Some(Ok(intent)) => intent,
            Some(Err(e)) => {
                // Unreadable: judged like any adoption; the file is replaced by the next swap.
                tracing::warn!(error = %e, "ignoring the swap journal");
                None
            }
            None => None,
        };
        // A container that never ran and that no journal names was left by an agent killed
        // between creating and journaling or starting it: it never passed a health gate, so it is
        // neither current (the loop would start it ungated) nor a rollback target. It goes; the
        // loop deploys what the source names, behind the gate.
        let journaled = intent.as_ref().map(|i| i.to.clone());
        let (keep, leftovers): (Vec<_>, Vec<_>) = found
            .into_iter()
            .partition(|c| c.started || journaled.as_deref() == Some(c.id.as_str()));
        found = keep;
        for c in leftovers {
            tracing::info!(container = %c.id, tag = %c.release.tag, "removing a container that was created and never started (an interrupted swap)");
            if let Err(e) = self.steps.runtime.remove(&c.id).await {
                tracing::warn!(container = %c.id, error = %e, "could not remove a never-started container");
            }
        }
        if self.steps.trust.is_some() {
            found = self.vet_adopted(found).await;
        }
        if let Some(intent) = intent {
            let from = found.iter().find(|c| c.id == intent.from).cloned();
            let to = found.iter().find(|c| c.id == intent.to).cloned();
            if let (Some(old), Some(new)) = (from, to) {
                // Finished by `run`, once the health server answers (as `starting`).
                self.publish(|s| s.starting = true);
                self.interrupted = Some((old, new, found));
                return true;
            }
            tracing::info!(from = %intent.from, to = %intent.to, "a swap was interrupted but its containers are gone; adopting what runs");
            self.steps.clear_journal();
        }
        // Newest first; a running container wins over any stopped one; on a handover host the
        // running one the redirect names wins over another running one.
        let named = match self.steps.redirect.as_ref().map(|r| r.pointing()) {
            Some(Ok(Pointing::Slot(s))) => Some(s),
            _ => None,
        };
        found.sort_by_key(|c| {
            (
                std::cmp::Reverse(c.running),
                std::cmp::Reverse(c.running && c.slot.is_some() && c.slot == named),
                std::cmp::Reverse(c.created),
            )
        });
        let mut found = found.into_iter();
        self.current = found.next();
        self.previous = found.next();
        if let Some(c) = self.current.clone() {
            self.ensure_route(&c);
        }
        // Handover: another running container (killed mid-handover without a journal) gets no
        // new connections; stopped now (gracefully), it stays as the rollback target.
        let handover = self.steps.redirect.is_some();
        if let Some(p) = self.previous.as_mut().filter(|p| handover && p.running) {
            tracing::info!(container = %p.id, "a second running container of the app: stopping it (it receives no new connections)");
            if self
                .steps
                .runtime
                .stop(&p.id, self.steps.cfg.app.stop_timeout)
                .await
                .is_ok()
            {
                p.running = false;
            }
        }
        if let Some(c) = &self.current {
            // One probe now, so a running app is reported healthy from the first request.
            let ok = c.running
                && probe::probe(
                    self.steps.app_addr,
                    &self.steps.cfg.app.health_path,
                    Duration::from_secs(2),
                )
                .await
                .is_ok_and(probe::is_success);
            tracing::info!(tag = %c.release.tag, digest = c.release.digest_str(), container = %c.id, running = c.running, healthy = ok, "adopted managed container");
            if ok {
                self.healthy_since = Some(Instant::now());
            }
            let running = running_of(c);
            self.publish(|s| {
                s.running = Some(running);
                s.app.ok = ok;
            });
        }
        if let Some(p) = &self.previous {
            let release = p.release.clone();
            self.publish(|s| s.previous = Some(release));
        }
        true
    }

    /// `[trust]`: a container taken over must carry a digest verified here (recorded by an
    /// earlier verification, or verified now). A refused one that runs keeps serving (the host
    /// keeps what it runs) but is never started again; a refused stopped one is not adopted,
    /// neither current nor rollback target. An unreachable registry changes nothing now.
    async fn vet_adopted(&mut self, found: Vec<ContainerState>) -> Vec<ContainerState> {
        let mut kept = Vec::with_capacity(found.len());
        for c in found {
            let outcome = match &c.release.digest {
                Some(d) => self.steps.verify(d).await,
                None => Err(crate::trust::TrustError::NoDigest {
                    release: c.release.to_string(),
                }
                .into()),
            };
            match outcome {
                Ok(()) => kept.push(c),
                Err(e) if e.is_retryable() => {
                    tracing::warn!(container = %c.id, tag = %c.release.tag, error = %e, "cannot verify the adopted container's signature now; adopted as it is");
                    kept.push(c);
                }
                Err(e) => {
                    let fate = if c.running {
                        "it keeps serving and is never started again"
                    } else {
                        "not adopted"
                    };
                    tracing::error!(container = %c.id, tag = %c.release.tag, digest = c.release.digest_str(), error = %e, "adopted container refused by the signature check: {fate}");
                    let msg = format!("adopted container {} ({}): {e}", c.id, c.release);
                    self.publish(|s| s.last_error = Some(msg));
                    if c.running {
                        kept.push(c);
                    }
                }
            }
        }
        kept
    }

    /// After: finish it with the same health gate and rollback as an uninterrupted swap.
    pub(super) async fn resume_swap(
        &mut self,
        old: ContainerState,
        new: ContainerState,
        all: &[ContainerState],
    ) {
        let release = new.release.clone();
        // The newest other stopped container stays as a further rollback target.
        self.previous = all
            .iter()
            .filter(|c| c.id != old.id && c.id != new.id)
            .max_by_key(|c| c.created)
            .cloned();
        if old.running {
            tracing::info!(from = %old.release, to = %release, "an interrupted swap had not stopped the old container: reverting");
            if new.running
                && let Err(e) = self
                    .steps
                    .runtime
                    .stop(&new.id, self.steps.cfg.app.stop_timeout)
                    .await
            {
                tracing::warn!(container = %new.id, error = %e, "could not stop the unused new container");
            }
            if let Err(e) = self.steps.runtime.remove(&new.id).await {
                tracing::warn!(container = %new.id, error = %e, "could not remove the unused new container");
            }
            let running = running_of(&old);
            self.publish(|s| s.running = Some(running));
            self.current = Some(old);
            self.steps.clear_journal();
            return;
        }
        tracing::info!(from = %old.release, to = %release, new_running = new.running, "finishing an interrupted swap: health gate, then promote or roll back");
        self.publish(|s| s.starting = true);
        let result = if new.running {
            self.steps.wait_healthy(&new, Instant::now()).await
        } else {
            self.steps.start_and_wait(&new).await
        };
        let outcome = match result {
            Ok(elapsed) => {
                self.promote(new, Some(old), elapsed).await;
                SwapOutcome::Promoted
            }
            Err(why) => self.roll_back(&release, new, Some(old), why).await,
        };
        self.steps.metrics.swap(SwapKind::Update, outcome);
        self.steps.clear_journal();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::sleep;
    use tokio_util::sync::CancellationToken;

    use crate::fleet::NoFleet;
    use crate::journal::{Journal, SwapIntent};
    use crate::supervise::Supervisor;
    use crate::supervise::fakes::{
        FakeRuntime, RecordingFleet, config, never_started, running, source, stopped,
    };

    /// Killed between creating the new container and journaling it: the never-started one is
    /// neither adopted as current nor kept as a rollback target; the one that ran is.
    #[tokio::test(start_paused = true)]
    async fn a_never_started_container_without_a_journal_is_removed_at_adoption() {
        for (containers, current, previous) in [
            // The old one still runs, the new one was only created.
            (
                vec![running("v1"), never_started("new", "v2", 5)],
                Some("adopted"),
                None,
            ),
            // Both stopped (a failed start before this agent), the newer never ran.
            (
                vec![stopped("old", "v1", 1), never_started("new", "v2", 5)],
                Some("old"),
                None,
            ),
            // A first deploy killed before its start: nothing to adopt.
            (vec![never_started("new", "v2", 5)], None, None),
            // The rollback target is the newest container that ran.
            (
                vec![
                    running("v3"),
                    stopped("old", "v1", 1),
                    never_started("new", "v2", 5),
                ],
                Some("adopted"),
                Some("old"),
            ),
        ] {
            let runtime = FakeRuntime::default();
            runtime.world().containers = containers.clone();
            let mut sup = Supervisor::new(
                config("follow"),
                runtime.clone(),
                source("v1", "v1"),
                NoFleet,
            );
            assert!(sup.adopt().await);
            let ids = |c: &Option<crate::runtime::ContainerState>| c.as_ref().map(|c| c.id.clone());
            assert_eq!(ids(&sup.current).as_deref(), current, "{containers:?}");
            assert_eq!(ids(&sup.previous).as_deref(), previous, "{containers:?}");
            let w = runtime.world();
            assert!(w.containers.iter().all(|c| c.id != "new"), "removed: {w:?}");
            assert!(w.started_ids.is_empty(), "nothing started: {w:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_adopted_container_that_becomes_healthy_is_reported_once() {
        let runtime = FakeRuntime::default();
        runtime.world().containers.push(running("v1"));
        let fleet = RecordingFleet::default();
        let sup = Supervisor::new(config("boot"), runtime, source("v1", "v1"), fleet.clone());
        let state = sup.state();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(sup.run(cancel.clone()));
        sleep(Duration::from_secs(5)).await;
        assert!(fleet.healthy_tags().is_empty(), "not healthy yet");
        // The prober's verdict (the app answers its health path).
        state.send_modify(|s| s.app.ok = true);
        sleep(Duration::from_secs(5)).await;
        cancel.cancel();
        task.await.expect("join");
        assert_eq!(fleet.healthy_tags(), ["v1"]);
    }

    /// Killed after stopping the old container: the never-started new one is started only
    /// behind the health gate, and rolled back to the old one when it fails it.
    #[tokio::test(start_paused = true)]
    async fn an_interrupted_swap_is_finished_behind_the_health_gate_and_rolled_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Journal::new(dir.path(), "t");
        journal
            .record(&SwapIntent {
                from: "old".into(),
                to: "new".into(),
            })
            .expect("record");
        let runtime = FakeRuntime::default();
        {
            let mut w = runtime.world();
            w.containers.push(stopped("old", "v1", 1));
            w.containers.push(stopped("new", "v2", 2));
        }
        let fleet = RecordingFleet::default();
        let sup = Supervisor::new(
            config("follow"),
            runtime.clone(),
            source("v2", "v2"),
            fleet.clone(),
        )
        .with_journal(journal.clone());
        let state = sup.state();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(sup.run(cancel.clone()));
        sleep(Duration::from_secs(30)).await;
        cancel.cancel();
        task.await.expect("join");

        let w = runtime.world();
        // Nothing answers on port 1: v2 fails its gate (2 s) and the old container returns.
        assert_eq!(
            w.started_ids.first().map(String::as_str),
            Some("new"),
            "{w:?}"
        );
        assert_eq!(
            w.started_ids.get(1).map(String::as_str),
            Some("old"),
            "{w:?}"
        );
        let ids: Vec<&str> = w.containers.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["old"], "the failed container is removed: {w:?}");
        assert!(
            !w.started_ids.iter().skip(2).any(|id| id != "old"),
            "v2 is not tried again: {w:?}"
        );
        assert_eq!(journal.read().expect("read"), None, "journal cleared");
        assert!(
            !fleet.healthy_tags().iter().any(|t| t == "v2"),
            "v2 is never reported healthy"
        );
        let snap = state.borrow();
        assert_eq!(
            snap.failed_release.as_ref().map(|r| r.tag.as_str()),
            Some("v2")
        );
        assert!(!snap.starting);
    }

    /// Killed before the old container was stopped: the swap is reverted; the new container,
    /// never started, goes.
    #[tokio::test(start_paused = true)]
    async fn an_interrupted_swap_before_the_stop_is_reverted_without_starting_anything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Journal::new(dir.path(), "t");
        journal
            .record(&SwapIntent {
                from: "adopted".into(),
                to: "new".into(),
            })
            .expect("record");
        let runtime = FakeRuntime::default();
        {
            let mut w = runtime.world();
            w.containers.push(running("v1"));
            w.containers.push(stopped("new", "v2", 2));
        }
        // The desired release is v1 again: nothing else to do after the revert.
        let sup = Supervisor::new(
            config("follow"),
            runtime.clone(),
            source("v1", "v1"),
            NoFleet,
        )
        .with_journal(journal.clone());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(sup.run(cancel.clone()));
        sleep(Duration::from_secs(5)).await;
        cancel.cancel();
        task.await.expect("join");
        let w = runtime.world();
        assert!(w.started_ids.is_empty(), "{w:?}");
        let ids: Vec<&str> = w.containers.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["adopted"], "{w:?}");
        assert_eq!(journal.read().expect("read"), None);
    }
}
