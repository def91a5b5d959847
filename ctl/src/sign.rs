//! `ctl sign`: sign an image digest in cosign's format with a key file (Jenkins' credential) and
//! push the signature beside the image, then read it back and check it as a host would.

use skiff_registry::{CheckError, DigestResolver, HttpRegistry, RegistryError};
use skiff_release::{Digest, Tag};
use skiff_signature::FileKey;

/// What to sign: a tag (resolved to its digest now) or a digest.
#[derive(Debug, Clone)]
pub enum Subject {
    Tag(Tag),
    Digest(Digest),
}

/// What was signed and by which key.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Signed {
    pub image: String,
    pub digest: String,
    pub signature_tag: String,
    pub key_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("cannot resolve the tag to sign: {0}")]
    Resolve(#[source] RegistryError),
    #[error("cannot push the signature: {0}; the signer needs push rights on the repository")]
    Push(#[source] RegistryError),
    #[error("the signature pushed does not read back as valid: {0}")]
    ReadBack(#[source] CheckError),
}

/// Sign `repository`'s `subject` with `key`, push, read back.
pub async fn sign(
    registry: &HttpRegistry,
    repository: &str,
    subject: Subject,
    key: &FileKey,
) -> Result<Signed, SignError> {
    let digest = match subject {
        Subject::Digest(d) => d,
        Subject::Tag(t) => registry
            .resolve(repository, &t)
            .await
            .map_err(SignError::Resolve)?,
    };
    let payload = skiff_signature::payload(repository, &digest);
    let signature = key.sign(&payload);
    registry
        .push_signature(repository, &digest, payload, &signature)
        .await
        .map_err(SignError::Push)?;
    let public = key.public();
    let checked = registry
        .check_signature(repository, &digest, std::slice::from_ref(&public))
        .await
        .map_err(SignError::ReadBack)?;
    Ok(Signed {
        image: format!("{repository}@{digest}"),
        signature_tag: skiff_signature::signature_tag(&digest),
        digest: digest.to_string(),
        key_id: checked.key_id,
    })
}
