//! The agent loop: reads the desired release, observes the managed container, asks
//! [`reconcile::decide`](crate::reconcile::decide) what to do, and does it. Every wait is bounded
//! and every wait selects on cancellation; failures of the outside world are recorded and retried
//! with a [`Backoff`], and never stop a container that works.
//!
//! The rooms: this file is the loop (poll, observe, termination, decide, execute, restart);
//! `adopt` takes over what runs at start and finishes an interrupted swap; `swap` is a deploy or
//! replace with its gate, promotion and rollback; `handover` is the replace of a handover host
//! (new container on the idle slot, gate, flip of the kernel redirect, hold, old one stops);
//! `steps` are the engine-facing steps they use (prepare, start and gate, remove, prune,
//! journal). The published state is in `state`.

mod adopt;
#[cfg(test)]
mod fakes;
mod handover;
#[cfg(test)]
mod handover_tests;
#[cfg(test)]
mod rollout_tests;
mod steps;
mod swap;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod trust_tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use skiff_release::Release;
use tokio::sync::watch;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use self::steps::Steps;
use crate::backoff::{Backoff, jitter};
use crate::config::Config;
use crate::credentials::PullTokens;
use crate::fleet::{Fleet, Instructions};
use crate::journal::Journal;
use crate::metrics::{self, DrainReason, InstructionKind, Metrics};
use crate::reconcile::{self, Action, Current, PullSituation, Situation};
use crate::redirect::PortRedirect;
use crate::runtime::{ContainerRuntime, ContainerState};
use crate::source::{ReleaseSource, SourceError};
use crate::state::{Running, Snapshot};

/// How often the container's state is checked.
const OBSERVE_EVERY: Duration = Duration::from_secs(1);
/// A container healthy for this long has its restart backoff reset.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// Restarts of an exited container, adoption retries and deploy retries: 1 s doubling, at most
/// 60 s.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(60);
/// How often the fleet is asked whether this host is being terminated.
const TERMINATION_CHECK_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Supervisor<R, S, F> {
    steps: Steps<R, S>,
    fleet: F,
    state: Arc<watch::Sender<Snapshot>>,
    desired: Option<Release>,
    last_bad_value: Option<String>,
    current: Option<ContainerState>,
    previous: Option<ContainerState>,
    failed: Option<Release>,
    at_start: bool,
    adopted: bool,
    /// Restarts of the current container when it exits.
    restart: Backoff,
    healthy_since: Option<Instant>,
    /// Failed reads of the release; a successful one schedules the next after `poll_interval`.
    poll: Backoff,
    next_poll: Instant,
    /// Deploys that failed to prepare or were aborted: no new release while it waits.
    deploy: Backoff,
    /// What the fleet's rollout asks of this host, as last read (every turn).
    instructions: Instructions,
    /// The pull instruction answered last.
    pulled: Option<Release>,
    /// The failed release whose signature check refused it: checked again when the trusted
    /// keys change (see [`Supervisor::recheck_refusal`]), looked at every `poll_interval`.
    refused: Option<Release>,
    next_recheck: Instant,
    /// The failed release last reported to the fleet.
    failed_reported: Option<Release>,
    /// The failure report is to be withdrawn (an instruction moved on; see
    /// [`reconcile::forgets_failure`]).
    withdraw_failed: bool,
    /// Pulls and answers to the fleet that failed: retried after this backoff.
    answers: Backoff,
    /// Drained for termination: the host serves no new release and reports draining.
    terminating: bool,
    next_termination_check: Instant,
    /// The container last reported healthy to the fleet (tag, launch hook).
    reported: Option<String>,
    /// A journaled swap found at adoption: (old, new, every managed container).
    interrupted: Option<(ContainerState, ContainerState, Vec<ContainerState>)>,
}

impl<R: ContainerRuntime, S: ReleaseSource, F: Fleet> Supervisor<R, S, F> {
    pub fn new(cfg: Arc<Config>, runtime: R, source: S, fleet: F) -> Self {
        let snapshot = Snapshot::new(source.describe(), cfg.release.update);
        let state = Arc::new(watch::channel(snapshot).0);
        let now = Instant::now();
        let poll = Backoff::new(RETRY_FIRST, cfg.release.poll_interval.max(RETRY_FIRST));
        Supervisor {
            steps: Steps {
                app_addr: SocketAddr::from(([127, 0, 0, 1], cfg.app.port)),
                cfg,
                runtime,
                source,
                state: state.clone(),
                pull_tokens: None,
                journal: None,
                redirect: None,
                metrics: Arc::new(Metrics::new()),
                trust: None,
            },
            fleet,
            state,
            desired: None,
            last_bad_value: None,
            current: None,
            previous: None,
            failed: None,
            refused: None,
            next_recheck: now,
            at_start: true,
            adopted: false,
            restart: Backoff::new(RETRY_FIRST, RETRY_CAP),
            healthy_since: None,
            poll,
            next_poll: now,
            deploy: Backoff::new(RETRY_FIRST, RETRY_CAP),
            instructions: Instructions::default(),
            pulled: None,
            failed_reported: None,
            withdraw_failed: false,
            answers: Backoff::new(RETRY_FIRST, RETRY_CAP),
            terminating: false,
            next_termination_check: now,
            reported: None,
            interrupted: None,
        }
    }

    /// Record swaps in progress in `journal`, and finish or revert one found there on start.
    pub fn with_journal(mut self, journal: Journal) -> Self {
        self.steps.journal = Some(journal);
        self
    }

    /// Swap by handover through this redirect (hosts with `[app] swap = "handover"`).
    pub fn with_redirect(mut self, redirect: Arc<dyn PortRedirect>) -> Self {
        self.steps.redirect = Some(redirect);
        self
    }

    /// Pull with these tokens instead of the [registry] section's credentials.
    pub fn with_pull_tokens(mut self, tokens: PullTokens) -> Self {
        self.steps.pull_tokens = Some(tokens);
        self
    }

    /// Verify the signature of every digest before a container is created from it (`[trust]`).
    pub fn with_trust(mut self, trust: Arc<crate::trust::Trust>) -> Self {
        self.steps.trust = Some(trust);
        self
    }

    /// Count what the loop does in `metrics` (shared with the prober, the fleet and `/metrics`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.steps.metrics = metrics;
        self
    }

    /// The published state, for the health server and the prober.
    pub fn state(&self) -> Arc<watch::Sender<Snapshot>> {
        self.state.clone()
    }

    /// Run until cancelled. The managed container is left running.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut adopt_backoff = Backoff::new(RETRY_FIRST, RETRY_CAP);
        while !self.adopted {
            if self.adopt().await {
                break;
            }
            let wait = adopt_backoff.fail();
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = sleep(wait) => {}
            }
        }
        if let Some((old, new, all)) = self.interrupted.take() {
            let span =
                tracing::info_span!("swap", from = %old.release, to = %new.release, resumed = true);
            if self.steps.redirect.is_some() {
                self.resume_handover(old, new).instrument(span).await;
            } else {
                self.resume_swap(old, new, &all).instrument(span).await;
            }
        }
        if self.fleet.coordinated() {
            self.join_fleet().await;
        }
        loop {
            self.observe().await;
            if self.poll_due() {
                self.poll().instrument(tracing::info_span!("poll")).await;
            }
            if self.refused.is_some() && Instant::now() >= self.next_recheck {
                self.next_recheck = Instant::now() + jitter(self.steps.cfg.release.poll_interval);
                self.recheck_refusal().await;
            }
            if !self.terminating && Instant::now() >= self.next_termination_check {
                self.next_termination_check = Instant::now() + TERMINATION_CHECK_EVERY;
                if self.fleet.termination_pending().await {
                    self.drain_for_termination().await;
                }
            }
            self.fleet.retry_pending().await;
            self.report_healthy().await;
            if self.fleet.coordinated() {
                self.read_instructions().await;
            }
            let action = self.decide();
            // Not raced with cancellation: a swap interrupted between stopping the old container
            // and starting the new one would leave the host with no app. Each step is bounded.
            self.execute(action).await;
            if self.fleet.coordinated() {
                self.report_failed().await;
                self.pull_ahead().await;
            }
            if cancel.is_cancelled() {
                break;
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = sleep(OBSERVE_EVERY) => {}
            }
        }
        // SIGTERM while the fleet terminates the host: drain first, so the load balancer stops
        // sending before the app goes away with the instance.
        if !self.terminating && self.fleet.termination_pending().await {
            self.drain_for_termination().await;
        }
        tracing::info!("agent stopping; the app container keeps running");
    }

    async fn drain_for_termination(&mut self) {
        let drain = self.steps.cfg.release.drain;
        tracing::info!(
            drain_ms = drain.as_millis() as u64,
            "this host is being terminated: draining"
        );
        self.publish(|s| s.draining = true);
        self.steps.metrics.drain(DrainReason::Termination);
        sleep(drain).await;
        self.terminating = true;
        self.fleet.drained().await;
        tracing::info!("drained for termination");
    }

    fn decide(&mut self) -> Action {
        let current = self.current.as_ref().map(|c| Current {
            release: c.release.clone(),
            running: c.running,
        });
        let action = reconcile::decide(&Situation {
            desired: self.desired.as_ref(),
            fleet: self.fleet.coordinated(),
            target: self.instructions.target.as_ref(),
            current: current.as_ref(),
            mode: self.steps.cfg.release.update,
            at_start: self.at_start,
            failed: self.failed.as_ref(),
            deploy_waiting: self.deploy.is_waiting(),
            restart_waiting: self.restart.is_waiting(),
            terminating: self.terminating,
        });
        if self.desired.is_some() {
            self.at_start = false;
        }
        action
    }

    /// On a fleet: say once that `update = "follow"` is not honoured, and recover what this
    /// host answered before a restart (so a failed release is not tried again, nor a pull
    /// repeated).
    async fn join_fleet(&mut self) {
        self.publish(|s| s.coordinated = true);
        if self.steps.cfg.release.update == crate::config::UpdateMode::Follow {
            tracing::warn!(
                "update = \"follow\" is not honoured here: uncoordinated in-place swaps are disabled on an Auto Scaling group; use `ctl release --strategy in-place` (the parameter applies at boot, a running host swaps when ctl targets it)"
            );
        }
        let answers = self.fleet.answers().await;
        if self.failed.is_none()
            && let Some(failed) = answers.failed
        {
            tracing::info!(release = %failed, "this host reported the release failed before: it is not tried again");
            let r = failed.clone();
            self.publish(|s| s.failed_release = Some(r));
            self.failed_reported = Some(failed.clone());
            self.failed = Some(failed);
        }
        if let Some(pulled) = answers.pulled {
            let r = pulled.clone();
            self.publish(|s| s.pulled = Some(r));
            self.pulled = Some(pulled);
        }
    }

    /// The rollout's instructions, from the fleet (the instance metadata: local, no AWS call).
    async fn read_instructions(&mut self) {
        let now = self.fleet.instructions().await;
        if now != self.instructions {
            if let Some(f) = self.failed.take_if(|f| reconcile::forgets_failure(f, &now)) {
                tracing::info!(release = %f, "an instruction names another release: forgetting that this one failed here (a later rollout of it is tried again)");
                self.failed_reported = None;
                self.withdraw_failed = true;
                self.publish(|s| s.failed_release = None);
            }
            tracing::info!(
                target = now.target.as_ref().map(tracing::field::display),
                pull = now.pull.as_ref().map(tracing::field::display),
                "instructions from the fleet"
            );
            let seen = now.clone();
            self.publish(|s| s.instructions = seen);
            self.instructions = now;
        }
    }

    /// Tell the fleet about a release that failed here, once (retried with backoff when the
    /// report does not get through).
    async fn report_failed(&mut self) {
        if self.answers.is_waiting() {
            return;
        }
        let Some(failed) = self.failed.clone() else {
            if self.withdraw_failed {
                if self.fleet.failed(None).await {
                    self.withdraw_failed = false;
                    self.answers.reset();
                } else {
                    self.answers.fail();
                }
            }
            return;
        };
        if self.failed_reported.as_ref() == Some(&failed) {
            return;
        }
        if self.fleet.failed(Some(&failed)).await {
            self.failed_reported = Some(failed);
            self.withdraw_failed = false;
            self.answers.reset();
        } else {
            self.answers.fail();
        }
    }

    /// Carry out a pull instruction: the image only, no container; then answer it.
    async fn pull_ahead(&mut self) {
        let Some(release) = reconcile::pull_wanted(&PullSituation {
            pull: self.instructions.pull.as_ref(),
            pulled: self.pulled.as_ref(),
            failed: self.failed.as_ref(),
            waiting: self.answers.is_waiting(),
            terminating: self.terminating,
        }) else {
            return;
        };
        let span = tracing::info_span!("pull", release = %release);
        async {
            let started = Instant::now();
            match self.steps.pull(&release).await {
                Ok(_) => {
                    tracing::info!(
                        pull_ms = started.elapsed().as_millis() as u64,
                        "pulled ahead of the switch"
                    );
                    if self.fleet.pulled(&release).await {
                        self.steps.metrics.instruction(InstructionKind::Pull);
                        let r = release.clone();
                        self.publish(|s| s.pulled = Some(r));
                        self.pulled = Some(release);
                        self.answers.reset();
                    } else {
                        self.answers.fail();
                    }
                }
                Err(e) if !e.is_retryable() => {
                    tracing::error!(error = %e, "the release cannot be pulled here; reporting it failed");
                    self.note_refusal(&release, &e);
                    let (r, msg) = (release.clone(), format!("release {release}: {e}"));
                    self.publish(|s| {
                        s.failed_release = Some(r);
                        s.last_error = Some(msg);
                    });
                    self.failed = Some(release);
                    self.report_failed().await;
                }
                Err(e) => {
                    let wait = self.answers.fail();
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot pull ahead; retrying");
                    self.record_error(format!("release {release}: {e}"));
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Whether the release source is read this turn. Off a fleet: every `poll_interval`
    /// (jittered; failed reads sooner, with backoff). On a fleet, ctl's instructions say what a
    /// running host runs, so the parameter is read at start until a read succeeds, and after
    /// that only while the host has nothing to run and no instruction (its container removed,
    /// say), at most every `poll_interval`: 1,000 hosts reading it every 60 s took 42 % of
    /// Parameter Store's default 40 transactions per second, shared with the whole account
    /// (issue 18, finding 3; README, "At scale").
    fn poll_due(&self) -> bool {
        if Instant::now() < self.next_poll {
            return false;
        }
        !self.fleet.coordinated()
            || self.desired.is_none()
            || (self.current.is_none() && self.instructions.target.is_none())
    }

    async fn poll(&mut self) {
        let interval = self.steps.cfg.release.poll_interval;
        match self.steps.source.read_release().await {
            Ok(release) => {
                self.steps.metrics.polled();
                self.poll.reset();
                self.next_poll = Instant::now() + jitter(interval);
                if self.desired.as_ref() != Some(&release) {
                    tracing::info!(tag = %release.tag, digest = release.digest_str(), "desired release");
                    let r = release.clone();
                    self.publish(|s| s.desired = Some(r));
                    self.desired = Some(release);
                }
                self.last_bad_value = None;
            }
            // A value that is not a release is read fine: polled at the interval, logged once.
            Err(e @ SourceError::Rejected { .. }) => {
                self.steps.metrics.polled();
                self.steps.metrics.source_error(metrics::INVALID_VALUE);
                self.poll.reset();
                self.next_poll = Instant::now() + jitter(interval);
                let msg = e.to_string();
                if let SourceError::Rejected { value, .. } = e
                    && self.last_bad_value.as_deref() != Some(value.as_str())
                {
                    tracing::error!("{msg}");
                    self.last_bad_value = Some(value);
                }
                self.publish(|s| s.last_error = Some(msg));
            }
            Err(e) => {
                self.steps
                    .metrics
                    .source_error(metrics::source_error_kind(&e));
                self.next_poll = Instant::now() + self.poll.fail();
                if self.poll.failures() == 1 {
                    tracing::warn!(error = %e, retryable = e.is_retryable(), "cannot read the release; retrying with backoff");
                }
                let msg = e.to_string();
                self.publish(|s| s.last_error = Some(msg));
            }
        }
    }

    /// A release refused for its signature is not asked about again while the release and the
    /// keys stay the same (no retry loop); every `poll_interval` while the refusal stands the
    /// keys are re-read (one read of the keys' source, on a fleet host too, which otherwise
    /// reads no parameter once it runs something), and when they changed (a key added for a
    /// rotation, an unreadable source fixed) the failure is forgotten so the release is
    /// checked again.
    async fn recheck_refusal(&mut self) {
        let Some(trust) = self.steps.trust.clone() else {
            return;
        };
        let Some(refused) = self.refused.clone() else {
            return;
        };
        if self.failed.as_ref() != Some(&refused) {
            self.refused = None;
            return;
        }
        if trust.refusal_outdated().await {
            tracing::info!(release = %refused, keys = %trust.describe(), "the trusted keys changed: checking the refused release again");
            self.refused = None;
            self.failed = None;
            self.failed_reported = None;
            self.withdraw_failed = true;
            self.deploy.reset();
            self.answers.reset();
            self.publish(|s| s.failed_release = None);
        }
    }

    /// Whether the agent may start `c` again: always without `[trust]`; with it, only a
    /// container whose digest was verified here (an adopted one refused, or never verified,
    /// is not restarted nor rolled back to).
    fn may_start(&self, c: &ContainerState) -> bool {
        self.steps.trust.as_ref().is_none_or(|t| {
            c.release
                .digest
                .as_ref()
                .is_some_and(|d| t.is_recorded(d.as_str()))
        })
    }

    /// Remember that `release` failed for its signature, when `e` is that refusal.
    fn note_refusal(&mut self, release: &Release, e: &steps::DeployError) {
        if e.is_refusal() {
            self.refused = Some(release.clone());
        }
    }

    async fn observe(&mut self) {
        let Some(cur) = &self.current else { return };
        let id = cur.id.clone();
        match self.steps.runtime.is_running(&id).await {
            Ok(Some(running)) => {
                if running != cur.running {
                    if running {
                        tracing::info!(container = %id, "container is running");
                    } else {
                        tracing::warn!(tag = %cur.release.tag, container = %id, "container exited");
                        self.healthy_since = None;
                    }
                }
                if let Some(c) = self.current.as_mut() {
                    c.running = running;
                }
                self.publish(|s| {
                    if let Some(r) = s.running.as_mut() {
                        r.container_running = running;
                    }
                    if !running {
                        s.app.ok = false;
                    }
                });
            }
            Ok(None) => {
                tracing::warn!(container = %id, "managed container was removed from outside");
                self.current = None;
                // What to run instead is read now (a fleet host last read it at boot).
                self.next_poll = Instant::now();
                self.healthy_since = None;
                self.publish(|s| {
                    s.running = None;
                    s.app.ok = false;
                });
            }
            // Fail static: the engine being away says nothing about the app.
            Err(e) => self.record_error(e.to_string()),
        }
        let stable = self
            .healthy_since
            .is_some_and(|t| t.elapsed() >= STABLE_AFTER);
        if stable && self.state.borrow().app.ok {
            self.restart.reset();
        }
        if self.current.as_ref().is_some_and(|c| c.running)
            && self.healthy_since.is_none()
            && self.state.borrow().app.ok
        {
            self.healthy_since = Some(Instant::now());
        }
    }

    async fn execute(&mut self, action: Action) {
        let stale = action == Action::Stale;
        if stale != self.state.borrow().stale {
            if stale && self.fleet.coordinated() {
                tracing::info!(
                    desired = self.desired.as_ref().map(tracing::field::display),
                    "desired release differs from the running one; on an Auto Scaling group it applies on the next instance, or when `ctl release --strategy in-place` targets this one"
                );
            } else if stale {
                tracing::info!(
                    desired = self.desired.as_ref().map(tracing::field::display),
                    "desired release differs from the running one; update = \"boot\" applies it on the next instance"
                );
            }
            self.publish(|s| s.stale = stale);
        }
        if let Action::Deploy(r) | Action::Replace(r) = &action
            && self.fleet.coordinated()
            && self.instructions.target.as_ref() == Some(r)
        {
            self.steps.metrics.instruction(InstructionKind::Target);
        }
        match action {
            Action::Keep | Action::Stale => {}
            Action::Restart => self.restart().await,
            Action::Deploy(release) => {
                let span = tracing::info_span!("deploy", to = %release);
                self.deploy(release).instrument(span).await
            }
            Action::Replace(release) => {
                let from = self.current.as_ref().map(|c| c.release.to_string());
                let span =
                    tracing::info_span!("swap", from = from.unwrap_or_default(), to = %release);
                self.replace(release).instrument(span).await
            }
        }
    }

    /// Start the exited current container again; `decide` holds this back while the restart
    /// backoff waits.
    async fn restart(&mut self) {
        let Some(cur) = self.current.clone() else {
            return;
        };
        if !self.may_start(&cur) {
            // Adopted without a verified signature: kept serving while it ran, never started
            // again; the loop deploys the desired release instead, verified.
            tracing::warn!(tag = %cur.release.tag, container = %cur.id, "the exited container's digest was never verified here: not restarted");
            self.current = None;
            self.next_poll = Instant::now();
            self.publish(|s| s.running = None);
            return;
        }
        self.restart.fail();
        match self.steps.runtime.start(&cur.id).await {
            Ok(()) => {
                tracing::warn!(tag = %cur.release.tag, container = %cur.id, attempt = self.restart.failures(), "restarted exited container");
                // After a reboot the kernel's redirect is gone: written before the container
                // can be reported healthy.
                self.ensure_route(&cur);
                if let Some(c) = self.current.as_mut() {
                    c.running = true;
                }
                self.publish(|s| {
                    s.restart_count += 1;
                    if let Some(r) = s.running.as_mut() {
                        r.container_running = true;
                    }
                });
            }
            Err(e) => self.record_error(e.to_string()),
        }
    }

    /// Tell the fleet once per container when the current one is running and healthy: after an
    /// adoption (e.g. a restart while the launch hook waits) as after a promotion.
    async fn report_healthy(&mut self) {
        let Some(cur) = &self.current else { return };
        if !cur.running || !self.state.borrow().app.ok || self.reported.as_deref() == Some(&cur.id)
        {
            return;
        }
        let (id, release) = (cur.id.clone(), cur.release.clone());
        tracing::info!(tag = %release.tag, container = %id, "reporting the running release healthy to the fleet");
        self.reported = Some(id);
        self.fleet.release_healthy(&release).await;
    }

    fn record_error(&self, msg: String) {
        if self.state.borrow().last_error.as_deref() != Some(msg.as_str()) {
            tracing::warn!(error = %msg, "will retry");
        }
        self.publish(|s| s.last_error = Some(msg));
    }

    fn publish(&self, f: impl FnOnce(&mut Snapshot)) {
        self.state.send_modify(f);
    }
}

fn running_of(c: &ContainerState) -> Running {
    Running {
        release: c.release.clone(),
        container_id: c.id.clone(),
        container_running: c.running,
    }
}
