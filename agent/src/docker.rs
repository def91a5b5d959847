//! `DockerRuntime`: the container runtime seam over the Docker Engine API (bollard). Bollard's
//! types and errors stay in this module.
//!
//! Longer than ~400 lines on purpose: it is the only place bollard types appear, so every
//! engine call (pull with its digest check, create with host networking and log options, list by
//! labels, stop, remove, prune) is here; splitting it would spread bollard across modules.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, HostConfig, HostConfigLogConfig,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, ListContainersOptions, ListImagesOptions,
    RemoveContainerOptions, RemoveImageOptions, StopContainerOptions,
};
use futures_util::StreamExt;
use skiff_release::{ImageRef, ImageRefError, Release, label};

use crate::hygiene::{LocalImageInfo, images_to_prune};
use crate::runtime::{
    ContainerRuntime, ContainerSpec, ContainerState, LocalImage, RegistryAuth, RuntimeError,
    is_auth_message, release_from_labels, slot_from_labels, verify_digest,
};

/// Bound on any single Engine API call except pulls.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on one image pull.
const PULL_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
}

impl DockerRuntime {
    /// Connect through `DOCKER_HOST` or the local socket. No request is made yet.
    pub fn connect() -> Result<Self, RuntimeError> {
        let docker = Docker::connect_with_defaults()
            .map_err(|e| unreachable("connect", &e))?
            .with_timeout(PULL_TIMEOUT);
        Ok(DockerRuntime { docker })
    }

    /// Agree on the API version with the daemon (the client may be newer than the engine).
    pub async fn negotiate(self) -> Result<Self, RuntimeError> {
        let docker = bounded("negotiate the API version", self.docker.negotiate_version())
            .await?
            .map_err(|e| unreachable("negotiate the API version", &e))?;
        Ok(DockerRuntime { docker })
    }

    async fn pull(&self, reference: &str, auth: Option<&RegistryAuth>) -> Result<(), RuntimeError> {
        let fail = |detail: String| {
            let image = reference.to_owned();
            if is_auth_message(&detail) {
                RuntimeError::PullDenied { image, detail }
            } else {
                RuntimeError::PullImage { image, detail }
            }
        };
        let image: ImageRef = reference
            .parse()
            .map_err(|e: ImageRefError| fail(e.to_string()))?;
        let (from_image, tag) = pull_arguments(&image);
        let options = CreateImageOptions {
            from_image: Some(from_image),
            tag,
            ..Default::default()
        };
        let credentials = auth.map(|a| DockerCredentials {
            username: Some(a.username.clone()),
            password: Some(a.password.clone()),
            serveraddress: Some(image.domain().to_owned()),
            ..Default::default()
        });
        let pull = async {
            let mut stream = self.docker.create_image(Some(options), None, credentials);
            while let Some(item) = stream.next().await {
                match item {
                    Ok(info) => {
                        if let Some(e) = info.error_detail.and_then(|d| d.message) {
                            return Err(fail(e));
                        }
                    }
                    Err(e) if is_connection_error(&e) => {
                        return Err(unreachable("pull an image", &e));
                    }
                    Err(e) => return Err(fail(e.to_string())),
                }
            }
            Ok(())
        };
        tokio::time::timeout(PULL_TIMEOUT, pull)
            .await
            .map_err(|_| fail(format!("no result within {}s", PULL_TIMEOUT.as_secs())))?
    }

    /// Repo digests of a local image, or `None` when it is not on the host.
    async fn local_digests(&self, reference: &str) -> Result<Option<Vec<String>>, RuntimeError> {
        match bounded("inspect an image", self.docker.inspect_image(reference)).await? {
            Ok(img) => Ok(Some(img.repo_digests.unwrap_or_default())),
            Err(DockerError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(op_error("inspect image", reference, &e)),
        }
    }
}

impl ContainerRuntime for DockerRuntime {
    async fn ensure_image(
        &self,
        repository: &str,
        release: &Release,
        auth: Option<&RegistryAuth>,
    ) -> Result<LocalImage, RuntimeError> {
        let reference = release.image_ref(repository);
        if let Some(digest) = &release.digest {
            // Content addressed: an image already on the host is the same image.
            let digests = match self.local_digests(&reference).await? {
                Some(d) => d,
                None => {
                    self.pull(&reference, auth).await?;
                    self.local_digests(&reference).await?.unwrap_or_default()
                }
            };
            verify_digest(repository, digest, &digests)?;
            return Ok(LocalImage {
                reference,
                digest: Some(digest.clone()),
                from_cache: false,
            });
        }
        // A tag can move: ask the registry, but fall back to the local copy when it is away. A
        // registry that answers and refuses our credentials is not away: that is reported, so
        // the caller can renew a token (and nobody runs a stale tag without noticing).
        let pulled = self.pull(&reference, auth).await;
        let digests = self.local_digests(&reference).await?;
        let (digests, from_cache) = match (pulled, digests) {
            (Ok(()), Some(d)) => (d, false),
            (Err(e), _) if e.is_auth_failure() => return Err(e),
            (Err(e), Some(d)) => {
                tracing::warn!(image = %reference, error = %e, "registry unavailable; using the image already on this host");
                (d, true)
            }
            (Err(e), None) => return Err(e),
            (Ok(()), None) => {
                return Err(RuntimeError::PullImage {
                    image: reference,
                    detail: "the pull finished but the image is not on the host".into(),
                });
            }
        };
        let digest = digests
            .iter()
            .filter_map(|rd| rd.rsplit_once('@'))
            .find_map(|(_, d)| d.parse().ok());
        Ok(LocalImage {
            reference,
            digest,
            from_cache,
        })
    }

    async fn list(&self, app: &str) -> Result<Vec<ContainerState>, RuntimeError> {
        let mut filters = HashMap::new();
        filters.insert("label".to_owned(), vec![format!("{}={app}", label::APP)]);
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let summaries = bounded(
            "list containers",
            self.docker.list_containers(Some(options)),
        )
        .await?
        .map_err(|e| op_error("list", app, &e))?;
        Ok(summaries
            .into_iter()
            .filter_map(|s| {
                let labels = s.labels.unwrap_or_default();
                // A container whose labels were tampered with is not ours to manage.
                let release = release_from_labels(&labels)?;
                let slot = slot_from_labels(&labels);
                Some(ContainerState {
                    slot,
                    id: s.id?,
                    name: s
                        .names
                        .and_then(|n| n.into_iter().next())
                        .map(|n| n.trim_start_matches('/').to_owned())
                        .unwrap_or_default(),
                    release,
                    running: s.state == Some(ContainerSummaryStateEnum::RUNNING),
                    started: s.state != Some(ContainerSummaryStateEnum::CREATED),
                    created: s.created.unwrap_or_default(),
                })
            })
            .collect())
    }

    async fn is_running(&self, id: &str) -> Result<Option<bool>, RuntimeError> {
        match bounded(
            "inspect a container",
            self.docker.inspect_container(
                id,
                None::<bollard::query_parameters::InspectContainerOptions>,
            ),
        )
        .await?
        {
            Ok(c) => Ok(Some(c.state.and_then(|s| s.running).unwrap_or(false))),
            Err(DockerError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(op_error("inspect", id, &e)),
        }
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let tag = spec
            .labels
            .get(label::TAG)
            .map_or("untagged", String::as_str);
        let log = crate::logging::log_config(&spec.logs, tag);
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(spec.labels.clone()),
            stop_timeout: Some(spec.stop_timeout.as_secs().try_into().unwrap_or(i64::MAX)),
            host_config: Some(HostConfig {
                network_mode: Some("host".into()),
                // The agent restarts the app itself, with backoff and a record of it.
                init: Some(true),
                log_config: Some(HostConfigLogConfig {
                    typ: Some(log.driver),
                    config: Some(log.options),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(spec.name.clone()),
            ..Default::default()
        };
        let created = bounded(
            "create a container",
            self.docker.create_container(Some(options), body),
        )
        .await?
        .map_err(|e| op_error("create", &spec.name, &e))?;
        Ok(created.id)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let opts: Option<bollard::query_parameters::StartContainerOptions> = None;
        match bounded("start a container", self.docker.start_container(id, opts)).await? {
            Ok(()) => Ok(()),
            // 304: already running.
            Err(DockerError::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(op_error("start", id, &e)),
        }
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let options = StopContainerOptions {
            t: Some(grace.as_secs().try_into().unwrap_or(i32::MAX)),
            ..Default::default()
        };
        let call = self.docker.stop_container(id, Some(options));
        match tokio::time::timeout(grace + CALL_TIMEOUT, call).await {
            Err(_) => Err(RuntimeError::Container {
                op: "stop",
                target: id.to_owned(),
                detail: "the engine did not answer in time".into(),
            }),
            Ok(Ok(())) => Ok(()),
            Ok(Err(DockerError::DockerResponseServerError {
                status_code: 304 | 404,
                ..
            })) => Ok(()),
            Ok(Err(e)) => Err(op_error("stop", id, &e)),
        }
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        match bounded(
            "remove a container",
            self.docker.remove_container(id, Some(options)),
        )
        .await?
        {
            Ok(())
            | Err(DockerError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(op_error("remove", id, &e)),
        }
    }

    async fn prune_images(
        &self,
        repository: &str,
        keep: &[&Release],
    ) -> Result<Vec<String>, RuntimeError> {
        let (images, in_use) = self.images_and_uses().await?;
        let mut removed = Vec::new();
        for reference in images_to_prune(repository, &images, keep, &in_use) {
            // Not forced: the engine itself refuses an image a container took meanwhile.
            let options = RemoveImageOptions {
                force: false,
                noprune: false,
            };
            match bounded(
                "remove an image",
                self.docker.remove_image(&reference, Some(options), None),
            )
            .await?
            {
                Ok(_) => removed.push(reference),
                Err(DockerError::DockerResponseServerError {
                    status_code: 404, ..
                }) => {}
                Err(e) if is_connection_error(&e) => {
                    return Err(unreachable("remove an image", &e));
                }
                Err(e) => {
                    tracing::warn!(image = %reference, error = %e, "could not remove an old image");
                }
            }
        }
        Ok(removed)
    }
}

impl DockerRuntime {
    /// What [`ContainerRuntime::prune_images`] decides on: the local images, and the images
    /// any container (running or stopped) uses.
    async fn images_and_uses(&self) -> Result<(Vec<LocalImageInfo>, Vec<String>), RuntimeError> {
        let images = bounded(
            "list images",
            self.docker.list_images(Some(ListImagesOptions {
                digests: true,
                ..Default::default()
            })),
        )
        .await?
        .map_err(|e| op_error("list images", "", &e))?;
        let containers = bounded(
            "list containers",
            self.docker.list_containers(Some(ListContainersOptions {
                all: true,
                ..Default::default()
            })),
        )
        .await?
        .map_err(|e| op_error("list", "all", &e))?;
        let images = images
            .into_iter()
            .map(|i| LocalImageInfo {
                id: i.id,
                tags: i.repo_tags,
                digests: i.repo_digests,
            })
            .collect();
        let in_use = containers.into_iter().filter_map(|c| c.image_id).collect();
        Ok((images, in_use))
    }
}

async fn bounded<T>(op: &'static str, fut: impl Future<Output = T>) -> Result<T, RuntimeError> {
    tokio::time::timeout(CALL_TIMEOUT, fut)
        .await
        .map_err(|_| RuntimeError::Unreachable {
            op,
            detail: format!("no answer within {}s", CALL_TIMEOUT.as_secs()),
        })
}

fn is_connection_error(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::HyperResponseError { .. }
            | DockerError::HyperLegacyError { .. }
            | DockerError::HttpClientError { .. }
            | DockerError::IOError { .. }
            | DockerError::RequestTimeoutError
            | DockerError::SocketNotFoundError(_)
    )
}

fn unreachable(op: &'static str, e: &DockerError) -> RuntimeError {
    RuntimeError::Unreachable {
        op,
        detail: e.to_string(),
    }
}

fn op_error(op: &'static str, target: &str, e: &DockerError) -> RuntimeError {
    if is_connection_error(e) {
        return unreachable(op, e);
    }
    RuntimeError::Container {
        op,
        target: target.to_owned(),
        detail: e.to_string(),
    }
}

/// The Engine API's `fromImage` and `tag` for a pull: the repository as Docker spells it, and
/// the digest (when pinned) or the tag.
fn pull_arguments(image: &ImageRef) -> (String, Option<String>) {
    let tag = match (image.digest(), image.tag()) {
        (Some(d), _) => Some(d.to_string()),
        (None, Some(t)) => Some(t.to_string()),
        (None, None) => None,
    };
    (image.familiar_repository(), tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_arguments_follow_the_contract_grammar() {
        const D: &str = "sha256:abababababababababababababababababababababababababababababababab";
        let table = [
            ("127.0.0.1:5000/app:v1", ("127.0.0.1:5000/app", Some("v1"))),
            (
                &format!("127.0.0.1:5000/app@{D}"),
                ("127.0.0.1:5000/app", Some(D)),
            ),
            ("127.0.0.1:5000/app", ("127.0.0.1:5000/app", None)),
            ("team/app:3f2c", ("team/app", Some("3f2c"))),
            ("docker.io/library/nginx:1.27", ("nginx", Some("1.27"))),
            ("localhost:5000/app:v1", ("localhost:5000/app", Some("v1"))),
        ];
        for (input, (repo, tag)) in table {
            let image: ImageRef = input.parse().expect("reference");
            let (got_repo, got_tag) = pull_arguments(&image);
            assert_eq!(
                (got_repo.as_str(), got_tag.as_deref()),
                (repo, tag),
                "{input}"
            );
        }
    }
}
