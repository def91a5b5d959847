//! The container runtime seam: what the agent needs from a container engine, in its own words.
//! `DockerRuntime` (in `docker`) implements it against the Docker Engine API.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use skiff_release::{Digest, ImageRef, Release, label};

use crate::config::LogRotation;

/// A managed container as the engine reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerState {
    pub id: String,
    pub name: String,
    pub release: Release,
    pub running: bool,
    /// It has run at some time (Docker's state is not `created`). A container that never ran
    /// never passed a health gate: adoption does not take it as current or rollback target.
    pub started: bool,
    /// Creation time, seconds since the epoch: newer containers are newer releases.
    pub created: i64,
    /// Handover: the slot port it listens on (label `skiff.slot`); `None` when it listens on
    /// the app's port itself (drain mode).
    pub slot: Option<u16>,
}

/// The image a release resolved to on this host.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalImage {
    /// The reference the container is created from (`repo@digest` or `repo:tag`).
    pub reference: String,
    pub digest: Option<Digest>,
    /// The registry could not be reached and an image already on the host was used.
    pub from_cache: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub env: Vec<(String, String)>,
    pub labels: HashMap<String, String>,
    pub stop_timeout: Duration,
    /// Log rotation: a long-lived host must not fill its disk with the app's logs.
    pub logs: LogRotation,
}

#[derive(Clone, PartialEq, Default)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "the container engine is unreachable while trying to {op}: {detail} (is dockerd running and is its socket readable?)"
    )]
    Unreachable { op: &'static str, detail: String },
    #[error("pulling image {image} failed: {detail}")]
    PullImage { image: String, detail: String },
    #[error(
        "the registry refused to let us pull {image}: {detail} (check the pull credentials: the ECR permissions of the instance role, or the [registry] section)"
    )]
    PullDenied { image: String, detail: String },
    #[error("image {image} does not carry digest {expected} (it has: {found}); refusing to run it")]
    DigestMismatch {
        image: String,
        expected: String,
        found: String,
    },
    #[error("could not {op} container {target}: {detail}")]
    Container {
        op: &'static str,
        target: String,
        detail: String,
    },
}

impl RuntimeError {
    /// Network trouble and registry hiccups are worth retrying; a digest mismatch is not. A
    /// denied pull is retried with backoff: credentials and permissions can be fixed in place.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, RuntimeError::DigestMismatch { .. })
    }

    /// The registry rejected our credentials (or their absence): a fresh token may help.
    pub fn is_auth_failure(&self) -> bool {
        matches!(self, RuntimeError::PullDenied { .. })
    }
}

/// Whether a registry's answer relayed by the engine means the credentials were refused or
/// missing, as the engine words it: `unauthorized: authentication required`, `no basic auth
/// credentials`, `denied: ...`, `pull access denied ...`, or a bare 401. Pure.
pub fn is_auth_message(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "unauthorized",
        "denied",
        "no basic auth credentials",
        "authentication required",
    ]
    .iter()
    .any(|needle| m.contains(needle))
        || m.split(|c: char| !c.is_ascii_alphanumeric())
            .any(|w| w == "401")
}

/// What the agent needs from a container engine.
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Make the release's image present locally (pulling it if needed) and check its digest.
    fn ensure_image(
        &self,
        repository: &str,
        release: &Release,
        auth: Option<&RegistryAuth>,
    ) -> impl Future<Output = Result<LocalImage, RuntimeError>> + Send;

    /// Every container managed for `app`, running or not.
    fn list(
        &self,
        app: &str,
    ) -> impl Future<Output = Result<Vec<ContainerState>, RuntimeError>> + Send;

    /// Whether the container runs; `None` when it no longer exists.
    fn is_running(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<bool>, RuntimeError>> + Send;

    /// Create (not start) a container with host networking; returns its id.
    fn create(
        &self,
        spec: &ContainerSpec,
    ) -> impl Future<Output = Result<String, RuntimeError>> + Send;

    fn start(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// SIGTERM, then SIGKILL after `grace`.
    fn stop(
        &self,
        id: &str,
        grace: Duration,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    fn remove(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Remove local images of `repository` that no release in `keep` names and no container
    /// uses (see [`crate::hygiene::images_to_prune`]); returns the references removed. A
    /// runtime that cannot list images keeps them all.
    fn prune_images(
        &self,
        _repository: &str,
        _keep: &[&Release],
    ) -> impl Future<Output = Result<Vec<String>, RuntimeError>> + Send {
        async { Ok(Vec::new()) }
    }
}

/// Labels for a container running `release` of `app`.
pub fn labels_for(app: &str, release: &Release) -> HashMap<String, String> {
    let mut labels = HashMap::new();
    labels.insert(label::APP.to_owned(), app.to_owned());
    labels.insert(label::TAG.to_owned(), release.tag.to_string());
    if let Some(d) = &release.digest {
        labels.insert(label::DIGEST.to_owned(), d.to_string());
    }
    labels
}

/// The slot a container listens on, from its labels.
pub fn slot_from_labels(labels: &HashMap<String, String>) -> Option<u16> {
    labels.get(label::SLOT)?.parse().ok().filter(|p| *p != 0)
}

/// Read the release back from a container's labels; `None` when they are missing or invalid.
pub fn release_from_labels(labels: &HashMap<String, String>) -> Option<Release> {
    let tag = labels.get(label::TAG)?.parse().ok()?;
    let digest = match labels.get(label::DIGEST) {
        Some(d) => Some(d.parse().ok()?),
        None => None,
    };
    Some(Release::new(tag, digest))
}

/// Check that an image's repo digests include `expected` for `repository`. Docker shortens
/// Docker Hub names (`docker.io/library/x` -> `x`), so both sides are compared as parsed
/// [`ImageRef`]s.
pub fn verify_digest(
    repository: &str,
    expected: &Digest,
    repo_digests: &[String],
) -> Result<(), RuntimeError> {
    let want: Option<ImageRef> = repository.parse().ok();
    let ok = repo_digests.iter().any(|rd| {
        let found: Option<ImageRef> = rd.parse().ok();
        match (&want, found) {
            (Some(want), Some(found)) => {
                found.digest() == Some(expected) && found.same_repository(want)
            }
            _ => false,
        }
    });
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::DigestMismatch {
            image: repository.to_owned(),
            expected: expected.to_string(),
            found: if repo_digests.is_empty() {
                "no digests".into()
            } else {
                repo_digests.join(", ")
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn digest_verification() {
        let d1: Digest = D1.parse().expect("digest");
        let table: &[(&str, &[String], bool)] = &[
            (
                "127.0.0.1:5000/app",
                &[format!("127.0.0.1:5000/app@{D1}")],
                true,
            ),
            (
                "127.0.0.1:5000/app",
                &[
                    format!("127.0.0.1:5000/other@{D1}"),
                    format!("127.0.0.1:5000/app@{D2}"),
                ],
                false,
            ),
            ("docker.io/library/python", &[format!("python@{D1}")], true),
            ("docker.io/team/app", &[format!("team/app@{D1}")], true),
            (
                "team/app",
                &[format!("index.docker.io/team/app@{D1}")],
                true,
            ),
            (
                "team/app",
                &[format!("127.0.0.1:5000/team/app@{D1}")],
                false,
            ),
            ("127.0.0.1:5000/app", &[], false),
        ];
        for (repo, digests, ok) in table {
            assert_eq!(
                verify_digest(repo, &d1, digests).is_ok(),
                *ok,
                "{repo} {digests:?}"
            );
        }
        let err = verify_digest("r/app", &d1, &[format!("r/app@{D2}")]).expect_err("mismatch");
        assert!(!err.is_retryable());
        assert!(err.to_string().contains(D2));
    }

    #[test]
    fn auth_messages() {
        let table = [
            ("unauthorized: authentication required", true),
            (
                "Head \"https://r/v2/app/manifests/v1\": no basic auth credentials",
                true,
            ),
            (
                "denied: Your authorization token has expired. Reauthenticate and try again.",
                true,
            ),
            (
                "pull access denied for app, repository does not exist or may require 'docker login'",
                true,
            ),
            ("received unexpected HTTP status: 401 Unauthorized", true),
            ("HTTP 401", true),
            ("manifest unknown: manifest unknown", false),
            ("dial tcp 127.0.0.1:443: connect: connection refused", false),
            ("toomanyrequests: Rate exceeded", false),
            ("layer sha256:4012abc not found", false),
        ];
        for (message, auth) in table {
            assert_eq!(is_auth_message(message), auth, "{message}");
        }
    }

    #[test]
    fn labels_round_trip() {
        let r = Release::new(
            "v1".parse().expect("tag"),
            Some(D1.parse().expect("digest")),
        );
        let labels = labels_for("app", &r);
        assert_eq!(labels.get(label::APP).map(String::as_str), Some("app"));
        assert_eq!(release_from_labels(&labels), Some(r));
        let mut broken = labels_for("app", &Release::new("v1".parse().expect("tag"), None));
        broken.insert(label::TAG.into(), "bad tag".into());
        assert_eq!(release_from_labels(&broken), None);
    }
}
