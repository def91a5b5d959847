//! The engine-facing steps of a deploy or swap, each bounded: prepare a release (pull, gather
//! the environment, create the container), start it and wait behind the health gate, remove a
//! container that failed its gate, prune old images, and keep the swap journal. The loop
//! (`supervise`) decides which step runs; the swap bookkeeping is in `swap`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use skiff_release::env as names;
use skiff_release::{Release, label};
use tokio::sync::watch;
use tokio::time::{Instant, sleep};

use crate::config::Config;
use crate::credentials::{self, CredentialsError, PullError, PullTokens};
use crate::journal::{Journal, SwapIntent};
use crate::metrics::Metrics;
use crate::probe;
use crate::redirect::PortRedirect;
use crate::runtime::{
    ContainerRuntime, ContainerSpec, ContainerState, LocalImage, RegistryAuth, RuntimeError,
    labels_for,
};
use crate::source::{ReleaseSource, SourceError};
use crate::state::Snapshot;
use crate::trust::{Trust, TrustError};

/// Probe period while waiting for a new container to become healthy.
const START_PROBE_EVERY: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub(crate) enum DeployError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("cannot read registry password file {path}: {detail}")]
    PasswordFile { path: String, detail: String },
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error(transparent)]
    Trust(#[from] TrustError),
}

impl From<PullError> for DeployError {
    fn from(e: PullError) -> Self {
        match e {
            PullError::Credentials(c) => DeployError::Credentials(c),
            PullError::Runtime(r) => DeployError::Runtime(r),
        }
    }
}

impl DeployError {
    /// Whether the same release may succeed later (network, throttling, a password file not
    /// written yet), or needs a person (digest mismatch, access denied).
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            DeployError::Runtime(r) => r.is_retryable(),
            DeployError::Source(s) => s.is_retryable(),
            // The operator may write the file any time: retried with the capped backoff.
            DeployError::PasswordFile { .. } => true,
            DeployError::Credentials(c) => c.is_retryable(),
            DeployError::Trust(t) => t.is_retryable(),
        }
    }

    /// A verdict of the signature check (not a registry that could not be reached).
    pub(crate) fn is_refusal(&self) -> bool {
        matches!(
            self,
            DeployError::Trust(TrustError::Refused { .. } | TrustError::NoDigest { .. })
        )
    }
}

/// What the steps work with: the engine, the source (env, registry password), the journal.
#[derive(Debug)]
pub(crate) struct Steps<R, S> {
    pub(crate) cfg: Arc<Config>,
    pub(crate) runtime: R,
    pub(crate) source: S,
    pub(crate) state: Arc<watch::Sender<Snapshot>>,
    pub(crate) app_addr: SocketAddr,
    /// Pull tokens for an ECR image (when no [registry] section names other credentials).
    pub(crate) pull_tokens: Option<PullTokens>,
    /// Where a swap in progress is recorded, so a restart finishes or reverts it.
    pub(crate) journal: Option<Journal>,
    /// Handover hosts: the kernel redirect of the app's port to a slot.
    pub(crate) redirect: Option<Arc<dyn PortRedirect>>,
    pub(crate) metrics: Arc<Metrics>,
    /// `[trust]`: signature checks before a container is created (`None`: off).
    pub(crate) trust: Option<Arc<Trust>>,
}

impl<R: ContainerRuntime, S: ReleaseSource> Steps<R, S> {
    /// Pull the image, gather the environment and create (not start) the container; with a
    /// `slot` (handover) it listens there, else on the app's port.
    pub(crate) async fn prepare(
        &self,
        release: &Release,
        slot: Option<u16>,
    ) -> Result<ContainerState, DeployError> {
        let image = self.pull(release).await?;
        let running = Release::new(
            release.tag.clone(),
            release.digest.clone().or(image.digest.clone()),
        );
        let env = self.container_env(&running, slot).await?;
        let name = container_name(&self.cfg.app.name, &running);
        let mut labels = labels_for(&self.cfg.app.name, &running);
        if let Some(s) = slot {
            labels.insert(label::SLOT.to_owned(), s.to_string());
        }
        let spec = ContainerSpec {
            name: name.clone(),
            image: image.reference.clone(),
            env,
            labels,
            stop_timeout: self.cfg.app.stop_timeout,
            logs: self.cfg.app.logs.clone(),
        };
        let id = self.runtime.create(&spec).await?;
        Ok(ContainerState {
            id,
            name,
            release: running,
            running: false,
            started: false,
            created: 0,
            slot,
        })
    }

    /// Make the release's image present on the host (pulled, or checked against the registry);
    /// nothing is created. Also what a rollout's pull instruction runs ahead of its switch.
    /// With `[trust]`, the digest is verified first: a pinned one before anything is pulled,
    /// a tag's after the pull resolved it (and before any container exists).
    pub(crate) async fn pull(&self, release: &Release) -> Result<LocalImage, DeployError> {
        if let Some(d) = &release.digest {
            self.verify(d).await?;
        }
        let image = self.pull_unverified(release).await?;
        if release.digest.is_none() && self.trust.is_some() {
            match &image.digest {
                Some(d) => self.verify(d).await?,
                None => {
                    return Err(TrustError::NoDigest {
                        release: release.to_string(),
                    }
                    .into());
                }
            }
        }
        Ok(image)
    }

    /// Check the signature of `digest` in the app's repository (nothing when trust is off);
    /// counted by result, logged when the registry was asked.
    pub(crate) async fn verify(&self, digest: &skiff_release::Digest) -> Result<(), DeployError> {
        let Some(trust) = &self.trust else {
            return Ok(());
        };
        let started = Instant::now();
        let auth = match &self.pull_tokens {
            Some(tokens) => Some(tokens.get().await?),
            None => self.registry_auth().await?,
        };
        let v = trust
            .verify(&self.cfg.app.image, digest, auth.as_ref())
            .await;
        self.metrics.signature_check(v.result);
        let verify_ms = started.elapsed().as_millis() as u64;
        match v.outcome {
            Ok(key) => {
                if v.result == crate::trust::VERIFIED {
                    tracing::info!(%digest, key = %key, verify_ms, "signature verified");
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn pull_unverified(&self, release: &Release) -> Result<LocalImage, DeployError> {
        let started = Instant::now();
        let image = match &self.pull_tokens {
            // An ECR image without a [registry] section: a token, renewed once when refused.
            Some(tokens) => {
                credentials::ensure_image(&self.runtime, tokens, &self.cfg.app.image, release)
                    .await?
            }
            None => {
                let auth = self.registry_auth().await?;
                self.runtime
                    .ensure_image(&self.cfg.app.image, release, auth.as_ref())
                    .await?
            }
        };
        self.metrics.pulled(started.elapsed());
        let pull_ms = started.elapsed().as_millis() as u64;
        self.state
            .send_modify(|s| s.timings.pull_ms = Some(pull_ms));
        Ok(image)
    }

    async fn registry_auth(&self) -> Result<Option<RegistryAuth>, DeployError> {
        let Some(reg) = &self.cfg.registry else {
            return Ok(None);
        };
        let password = if let Some(path) = &reg.password_file {
            tokio::fs::read_to_string(path)
                .await
                .map_err(|e| DeployError::PasswordFile {
                    path: path.display().to_string(),
                    detail: e.to_string(),
                })?
                .trim_end()
                .to_owned()
        } else if let Some(param) = &reg.password_parameter {
            self.source.read_secret(param).await?
        } else {
            return Ok(None);
        };
        Ok(Some(RegistryAuth {
            username: reg.username.clone(),
            password,
        }))
    }

    /// Static env, then the SSM path (which may override it), then what the agent sets itself.
    async fn container_env(
        &self,
        release: &Release,
        slot: Option<u16>,
    ) -> Result<Vec<(String, String)>, DeployError> {
        let mut env: Vec<(String, String)> = self
            .cfg
            .app
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(path) = &self.cfg.app.env_path {
            for (k, v) in self.source.read_env(path).await? {
                env.retain(|(existing, _)| *existing != k);
                env.push((k, v));
            }
        }
        let port = slot.unwrap_or(self.cfg.app.port);
        env.push((names::PORT.into(), port.to_string()));
        env.push((names::APP.into(), self.cfg.app.name.clone()));
        env.push((names::RELEASE_TAG.into(), release.tag.to_string()));
        if let Some(d) = &release.digest {
            env.push((names::RELEASE_DIGEST.into(), d.to_string()));
        }
        Ok(env)
    }

    /// Where a container answers directly: its slot (handover), else the app's port.
    pub(crate) fn addr_of(&self, c: &ContainerState) -> SocketAddr {
        c.slot
            .map_or(self.app_addr, |s| SocketAddr::from(([127, 0, 0, 1], s)))
    }

    /// Start `new` and wait (probing fast, on its own port) until the app is healthy or
    /// `start_timeout` passes.
    pub(crate) async fn start_and_wait(&self, new: &ContainerState) -> Result<Duration, String> {
        let started = Instant::now();
        self.runtime
            .start(&new.id)
            .await
            .map_err(|e| e.to_string())?;
        self.wait_healthy(new, started).await
    }

    pub(crate) async fn wait_healthy(
        &self,
        c: &ContainerState,
        started: Instant,
    ) -> Result<Duration, String> {
        let (id, addr) = (c.id.as_str(), self.addr_of(c));
        let timeout = self.cfg.app.start_timeout;
        let deadline = started + timeout;
        let mut last;
        let mut probes: u32 = 0;
        loop {
            match probe::probe(addr, &self.cfg.app.health_path, Duration::from_secs(1)).await {
                // Accepted only from the container being promoted: a 200 while it is not
                // running comes from someone else on the port.
                Ok(code) if probe::is_success(code) => match self.runtime.is_running(id).await {
                    Ok(Some(true)) => return Ok(started.elapsed()),
                    Ok(_) => {
                        return Err(format!(
                            "the container is not running, yet {} answers HTTP {code}: another process holds the port",
                            self.cfg.app.health_path
                        ));
                    }
                    Err(e) => {
                        last = format!(
                            "HTTP {code}, but the engine did not confirm the container runs: {e}"
                        )
                    }
                },
                Ok(code) => last = format!("HTTP {code}"),
                Err(e) => last = e,
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not healthy within {} (last probe of {}: {last})",
                    humantime::format_duration(timeout),
                    self.cfg.app.health_path
                ));
            }
            probes += 1;
            if probes.is_multiple_of(50)
                && matches!(self.runtime.is_running(id).await, Ok(Some(false) | None))
            {
                return Err(format!(
                    "the container exited while starting (last probe: {last})"
                ));
            }
            sleep(START_PROBE_EVERY).await;
        }
    }

    /// Remove the app's images other than `keep`'s; a failure here is logged and changes
    /// nothing else.
    pub(crate) async fn prune_images(&self, keep: &[&Release]) {
        match self.runtime.prune_images(&self.cfg.app.image, keep).await {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(images = %removed.join(" "), "removed old images of the app");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not prune old images; will try after the next release")
            }
        }
    }

    /// Stop and remove a container that failed its gate; true once the engine confirms it no
    /// longer runs (tried three times: the engine may time out under load).
    pub(crate) async fn remove_failed(&self, id: &str) -> bool {
        for attempt in 1..=3u32 {
            if let Err(e) = self.runtime.stop(id, self.cfg.app.stop_timeout).await {
                tracing::warn!(container = %id, attempt, error = %e, "could not stop the failed container");
            }
            if let Err(e) = self.runtime.remove(id).await {
                tracing::warn!(container = %id, attempt, error = %e, "could not remove the failed container");
            }
            if matches!(self.runtime.is_running(id).await, Ok(None | Some(false))) {
                return true;
            }
        }
        false
    }

    pub(crate) fn record_swap(&self, old: &ContainerState, new: &ContainerState) {
        if let Some(j) = &self.journal {
            let intent = SwapIntent {
                from: old.id.clone(),
                to: new.id.clone(),
            };
            if let Err(e) = j.record(&intent) {
                // The swap itself is still safe; only a kill during it would not be resumed.
                tracing::warn!(error = %e, "swap not journaled");
            }
        }
    }

    pub(crate) fn clear_journal(&self) {
        if let Some(Err(e)) = self.journal.as_ref().map(Journal::clear) {
            tracing::warn!(error = %e, "could not clear the swap journal");
        }
    }
}

/// `app-<tag>-<nonce>`: unique per deploy, readable in `docker ps`.
fn container_name(app: &str, release: &Release) -> String {
    let tag: String = release.tag.as_str().chars().take(40).collect();
    format!("{app}-{tag}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}
