//! `RegistrySignatures`: [`SignatureCheck`] over the one verifier ctl uses too,
//! `skiff_registry::HttpRegistry::check_signature`, with the pull's own credentials (the
//! `[registry]` password, or the ECR pull token the agent caches). The HTTP client is built for
//! each check and dropped after it: a swap is rare, and an idle agent then holds no client.
//!
//! A registry with a private CA is trusted as the Docker engine trusts it: the CA file
//! `<certs.d>/<host[:port]>/ca.crt` (https://docs.docker.com/engine/security/certificates/).

use std::path::PathBuf;

use skiff_registry::{CheckError, Credentials, HttpRegistry, Location, RegistryError};
use skiff_release::Digest;
use skiff_signature::TrustedKey;

use super::{CheckFailure, CheckFuture, SignatureCheck};
use crate::runtime::RegistryAuth;

/// Where the Docker engine reads registry CAs.
pub const DOCKER_CERTS_DIR: &str = "/etc/docker/certs.d";

#[derive(Debug, Clone)]
pub struct RegistrySignatures {
    certs_dir: PathBuf,
}

impl Default for RegistrySignatures {
    fn default() -> Self {
        RegistrySignatures {
            certs_dir: PathBuf::from(DOCKER_CERTS_DIR),
        }
    }
}

impl RegistrySignatures {
    /// Registry CAs from `certs_dir` instead of Docker's.
    pub fn with_certs_dir(certs_dir: PathBuf) -> Self {
        RegistrySignatures { certs_dir }
    }

    fn client(
        &self,
        repository: &str,
        credentials: Option<Credentials>,
    ) -> Result<HttpRegistry, String> {
        let host = Location::parse(repository)?.host;
        let ca = self.certs_dir.join(&host).join("ca.crt");
        if ca.is_file() {
            HttpRegistry::with_ca(credentials, &ca).map_err(|e| e.to_string())
        } else {
            HttpRegistry::new(credentials)
                .map_err(|e| format!("cannot build the registry client: {e}"))
        }
    }
}

impl SignatureCheck for RegistrySignatures {
    fn check<'a>(
        &'a self,
        repository: &'a str,
        digest: &'a Digest,
        keys: &'a [TrustedKey],
        auth: Option<&'a RegistryAuth>,
    ) -> CheckFuture<'a> {
        Box::pin(async move {
            let credentials = auth.map(|a| Credentials {
                user: a.username.clone(),
                password: a.password.clone(),
            });
            let client = self
                .client(repository, credentials)
                .map_err(CheckFailure::Refused)?;
            match client.check_signature(repository, digest, keys).await {
                Ok(signed) => Ok(signed.key_id),
                Err(CheckError::Refused(e)) => Err(CheckFailure::Refused(e.to_string())),
                Err(CheckError::Registry {
                    source: e @ RegistryError::Unreachable { .. },
                    ..
                }) => Err(CheckFailure::Unreachable(e.to_string())),
                // Keys are named and the registry answers, but not with signatures: a refusal
                // with its reason, never a pass.
                Err(e @ CheckError::Registry { .. }) => Err(CheckFailure::Refused(format!(
                    "the registry cannot serve the signatures: {e}"
                ))),
            }
        })
    }
}
