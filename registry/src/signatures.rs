//! cosign signatures in the registry: push one (the payload and config blobs, then the signature
//! manifest under `sha256-HEX.sig`, keeping the signatures already there) and check the ones
//! stored for a digest against trusted keys. The format and the decisions are skiff-signature's;
//! this module only moves bytes, each read bounded by that crate's limits.

use skiff_release::Digest;
use skiff_signature::{
    Artifacts, MANIFEST_MAX, PAYLOAD_MAX, SignatureError, Signed, TrustedKey, artifacts,
    blob_digest, parse_manifest, signature_tag, verify,
};

use crate::{HttpRegistry, RegistryError};

/// Why the signatures of a digest could not be checked or were refused.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The registry could not be asked (unreachable, denied, ...): not a verdict on the image.
    #[error("cannot read the signatures of {digest}: {source}")]
    Registry {
        digest: String,
        #[source]
        source: RegistryError,
    },
    /// The signatures were read and refused.
    #[error(transparent)]
    Refused(#[from] SignatureError),
}

impl HttpRegistry {
    /// Who signed `repository@digest` among `keys`: the signature manifest is read (absent:
    /// [`SignatureError::Unsigned`]), then each signature layer's payload, and the first one a
    /// trusted key verifies for exactly this digest wins.
    pub async fn check_signature(
        &self,
        repository: &str,
        digest: &Digest,
        keys: &[TrustedKey],
    ) -> Result<Signed, CheckError> {
        let registry = |source| CheckError::Registry {
            digest: digest.to_string(),
            source,
        };
        let tag = signature_tag(digest);
        let manifest = match self.get_manifest(repository, &tag, MANIFEST_MAX).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(SignatureError::Unsigned {
                    digest: digest.to_string(),
                    tag,
                }
                .into());
            }
            Err(RegistryError::TooLarge { size, .. }) => {
                return Err(SignatureError::TooLarge {
                    digest: digest.to_string(),
                    what: "manifest",
                    size,
                    max: MANIFEST_MAX as u64,
                }
                .into());
            }
            Err(e) => return Err(registry(e)),
        };
        let layers = parse_manifest(digest, &manifest)?;
        let mut fetched = Vec::with_capacity(layers.len());
        for layer in layers {
            let payload = match self
                .get_blob(repository, &layer.payload_digest, PAYLOAD_MAX as usize)
                .await
            {
                Ok(p) => p,
                Err(RegistryError::TooLarge { size, .. }) => {
                    return Err(SignatureError::TooLarge {
                        digest: digest.to_string(),
                        what: "payload",
                        size,
                        max: PAYLOAD_MAX,
                    }
                    .into());
                }
                Err(e) => return Err(registry(e)),
            };
            fetched.push((layer, payload));
        }
        Ok(verify(keys, digest, &fetched)?)
    }

    /// Push the signature `signature` (base64) of `payload` for `digest` into `repository`,
    /// beside the signatures already stored there. Returns what was pushed.
    pub async fn push_signature(
        &self,
        repository: &str,
        digest: &Digest,
        payload: Vec<u8>,
        signature: &str,
    ) -> Result<Artifacts, RegistryError> {
        let tag = signature_tag(digest);
        let existing = self.get_manifest(repository, &tag, MANIFEST_MAX).await?;
        let a = artifacts(payload, signature, existing.as_deref()).map_err(|e| {
            RegistryError::Reference {
                detail: format!("cannot write the signature manifest: {e}"),
            }
        })?;
        self.put_blob(repository, &blob_digest(&a.payload), &a.payload)
            .await?;
        self.put_blob(repository, &blob_digest(&a.config), &a.config)
            .await?;
        self.put_manifest(
            repository,
            &tag,
            skiff_signature::MANIFEST_MEDIA_TYPE,
            &a.manifest,
        )
        .await?;
        Ok(a)
    }
}
