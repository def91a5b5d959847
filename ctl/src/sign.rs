//! `ctl sign`: sign an image digest in cosign's format with a key file (Jenkins' credential) or
//! an asymmetric AWS KMS key, push the signature beside the image, then read it back and check
//! it as a host would.

use aws_sdk_kms::types::{MessageType, SigningAlgorithmSpec};
use skiff_registry::{CheckError, DigestResolver, HttpRegistry, RegistryError};
use skiff_release::{Digest, Tag};
use skiff_signature::{FileKey, TrustedKey};

/// Who signs: a private key file, or a KMS key (ECC_NIST_P256, SIGN_VERIFY) of which the caller
/// may only call `kms:Sign`; its public key is given (the one the stack trusts) to check the
/// signature read back.
#[derive(Debug)]
pub enum Signer {
    File(FileKey),
    Kms {
        client: aws_sdk_kms::Client,
        key_id: String,
        public: TrustedKey,
    },
}

impl Signer {
    fn public(&self) -> TrustedKey {
        match self {
            Signer::File(k) => k.public(),
            Signer::Kms { public, .. } => public.clone(),
        }
    }

    /// The base64 DER signature of `payload`. KMS is sent the payload's SHA-256 as a DIGEST
    /// (https://docs.aws.amazon.com/kms/latest/APIReference/API_Sign.html): the payload itself
    /// never leaves, and the signature is ECDSA over SHA-256 of the payload, cosign's.
    async fn sign(&self, payload: &[u8]) -> Result<String, SignError> {
        match self {
            Signer::File(k) => Ok(k.sign(payload)),
            Signer::Kms { client, key_id, .. } => {
                let digest = skiff_signature::payload_sha256(payload);
                let out = client
                    .sign()
                    .key_id(key_id)
                    .message(aws_smithy_types::Blob::new(digest.to_vec()))
                    .message_type(MessageType::Digest)
                    .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
                    .send()
                    .await
                    .map_err(|e| SignError::Kms {
                        key_id: key_id.clone(),
                        detail: crate::aws::describe(&e),
                    })?;
                let der = out.signature().ok_or_else(|| SignError::Kms {
                    key_id: key_id.clone(),
                    detail: "the answer carried no signature".into(),
                })?;
                Ok(skiff_signature::encode_signature(der.as_ref()))
            }
        }
    }
}

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
    #[error(
        "the signature pushed does not read back as valid: {0} (with KMS: is --public-key the KMS key's public key?)"
    )]
    ReadBack(#[source] CheckError),
    #[error(
        "kms:Sign with {key_id} failed: {detail}; allow kms:Sign on the key to the identity signing, and create it with KeySpec ECC_NIST_P256 and KeyUsage SIGN_VERIFY"
    )]
    Kms { key_id: String, detail: String },
}

/// Sign `repository`'s `subject` with `key`, push, read back.
pub async fn sign(
    registry: &HttpRegistry,
    repository: &str,
    subject: Subject,
    signer: &Signer,
) -> Result<Signed, SignError> {
    let digest = match subject {
        Subject::Digest(d) => d,
        Subject::Tag(t) => registry
            .resolve(repository, &t)
            .await
            .map_err(SignError::Resolve)?,
    };
    let payload = skiff_signature::payload(repository, &digest);
    let signature = signer.sign(&payload).await?;
    registry
        .push_signature(repository, &digest, payload, &signature)
        .await
        .map_err(SignError::Push)?;
    let public = signer.public();
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
