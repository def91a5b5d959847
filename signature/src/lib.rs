//! cosign's image signature format, the part both ctl (signs, refuses) and the agent (verifies)
//! need, without I/O: what is fetched from the registry comes in as bytes.
//!
//! The format (sigstore/cosign `specs/SIGNATURE_SPEC.md`, key-based signing, cosign's default):
//! - the signatures of image `REPO@sha256:HEX` are an OCI image manifest in `REPO` under the tag
//!   `sha256-HEX.sig`;
//! - each layer of media type `application/vnd.dev.cosign.simplesigning.v1+json` is a signature:
//!   its blob is the simple-signing payload (`critical.image.docker-manifest-digest` names the
//!   signed digest, `critical.type` is `cosign container image signature`), its annotation
//!   `dev.cosignproject.cosign/signature` the base64 of an ASN.1 DER ECDSA signature;
//! - the signature is ECDSA P-256 over SHA-256 of the payload's bytes, checked against public
//!   keys given as PEM `PUBLIC KEY` (SubjectPublicKeyInfo) blocks, as `cosign verify --key` does.
//!
//! A signature counts when the payload's bytes match the layer's digest, the payload names the
//! exact digest asked about, and one trusted key verifies it. Everything read is bounded (sizes
//! below) before it is parsed.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{DerSignature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use skiff_release::Digest;

/// Media type of a signature layer (cosign's simple signing).
pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Layer annotation carrying the base64 signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// `critical.type` of a cosign payload.
pub const SIGNATURE_TYPE: &str = "cosign container image signature";
/// Media type of the signature manifest and of its config (cosign writes OCI ones).
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// Largest signature manifest read (a cosign manifest of one signature is about 1 KiB).
pub const MANIFEST_MAX: usize = 256 * 1024;
/// Largest payload read (cosign's is about 250 bytes plus optional annotations).
pub const PAYLOAD_MAX: u64 = 16 * 1024;
/// Most signature layers considered in one manifest.
pub const LAYERS_MAX: usize = 64;
/// Longest base64 signature accepted (a P-256 DER signature is at most 72 bytes, 96 in base64).
pub const SIGNATURE_B64_MAX: usize = 256;

/// Why a signature is not accepted. One variant per failure; each says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error(
        "no signature for {digest}: the registry has no {tag} in the image's repository; sign it (`ctl sign --digest {digest}`) before releasing"
    )]
    Unsigned { digest: String, tag: String },
    #[error(
        "the signature of {digest} is not by a trusted key (no key of {trusted} trusted verifies it): sign with a key the stack trusts, or add its public key to TrustedKeys"
    )]
    UntrustedKey { digest: String, trusted: usize },
    #[error(
        "the signature payload names {signed}, not {digest}: a signature of another image was put under this digest's tag; sign {digest} itself"
    )]
    OtherDigest { digest: String, signed: String },
    #[error(
        "the signature payload of {digest} does not match its layer digest ({why}): the payload was changed after signing; sign again"
    )]
    Tampered { digest: String, why: String },
    #[error("the signature manifest of {digest} is malformed: {why}; sign again (`ctl sign`)")]
    Malformed { digest: String, why: String },
    #[error(
        "the signature {what} of {digest} is too large ({size} bytes, at most {max}): not read; sign again (`ctl sign`)"
    )]
    TooLarge {
        digest: String,
        what: &'static str,
        size: u64,
        max: u64,
    },
}

/// Why a key is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "a trusted key is not a PEM P-256 public key ({why}); give `-----BEGIN PUBLIC KEY-----` blocks as `openssl ec -pubout` or `cosign generate-key-pair` write them"
    )]
    Public { why: String },
    #[error(
        "the signing key is not a PEM PKCS#8 P-256 private key ({why}); create one with `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`"
    )]
    Private { why: String },
    #[error(
        "a KMS key's public key is not a DER P-256 public key ({why}); create the key with KeySpec ECC_NIST_P256 and KeyUsage SIGN_VERIFY"
    )]
    Der { why: String },
}

/// The tag under which the signatures of `digest` live: `sha256-HEX.sig`.
pub fn signature_tag(digest: &Digest) -> String {
    format!("{}.sig", digest.as_str().replacen(':', "-", 1))
}

/// `sha256:HEX` of some bytes, as registries name blobs.
pub fn blob_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

/// SHA-256 of the payload: what the signature is made over (KMS signs it as a DIGEST).
pub fn payload_sha256(payload: &[u8]) -> [u8; 32] {
    Sha256::digest(payload).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Serialize, Deserialize)]
struct Payload {
    critical: Critical,
    #[serde(default)]
    optional: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize)]
struct Critical {
    identity: Identity,
    image: ImageClaim,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Serialize, Deserialize)]
struct Identity {
    #[serde(rename = "docker-reference")]
    docker_reference: String,
}

#[derive(Serialize, Deserialize)]
struct ImageClaim {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

/// The simple-signing payload for `repository@digest` (repository without tag, as cosign writes
/// `critical.identity.docker-reference`).
pub fn payload(repository: &str, digest: &Digest) -> Vec<u8> {
    let p = Payload {
        critical: Critical {
            identity: Identity {
                docker_reference: repository.to_owned(),
            },
            image: ImageClaim {
                docker_manifest_digest: digest.as_str().to_owned(),
            },
            kind: SIGNATURE_TYPE.to_owned(),
        },
        optional: None,
    };
    serde_json::to_vec(&p).unwrap_or_default()
}

/// What a payload claims: the digest and the reference it was signed for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub digest: String,
    pub reference: String,
}

/// Parse a payload (bounded by [`PAYLOAD_MAX`]); `digest` is the image asked about, for errors.
pub fn parse_payload(digest: &Digest, bytes: &[u8]) -> Result<Claim, SignatureError> {
    if bytes.len() as u64 > PAYLOAD_MAX {
        return Err(SignatureError::TooLarge {
            digest: digest.to_string(),
            what: "payload",
            size: bytes.len() as u64,
            max: PAYLOAD_MAX,
        });
    }
    let p: Payload = serde_json::from_slice(bytes).map_err(|e| SignatureError::Malformed {
        digest: digest.to_string(),
        why: format!("the payload is not a simple-signing document ({e})"),
    })?;
    if p.critical.kind != SIGNATURE_TYPE {
        return Err(SignatureError::Malformed {
            digest: digest.to_string(),
            why: format!(
                "the payload's critical.type is {:?}, not {SIGNATURE_TYPE:?}",
                p.critical.kind
            ),
        });
    }
    Ok(Claim {
        digest: p.critical.image.docker_manifest_digest,
        reference: p.critical.identity.docker_reference,
    })
}

/// One signature layer of a signature manifest: the payload blob it names and the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureLayer {
    pub payload_digest: String,
    pub payload_size: u64,
    pub signature: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    size: u64,
    digest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    annotations: Option<std::collections::BTreeMap<String, String>>,
}

/// The signature layers of a signature manifest (other layers are skipped). Refused: larger
/// than [`MANIFEST_MAX`], not a manifest, more than [`LAYERS_MAX`] signature layers, a layer
/// without its annotation, a payload larger than [`PAYLOAD_MAX`], no signature layer at all.
pub fn parse_manifest(
    digest: &Digest,
    bytes: &[u8],
) -> Result<Vec<SignatureLayer>, SignatureError> {
    let malformed = |why: String| SignatureError::Malformed {
        digest: digest.to_string(),
        why,
    };
    let too_large = |what, size: u64, max: u64| SignatureError::TooLarge {
        digest: digest.to_string(),
        what,
        size,
        max,
    };
    if bytes.len() > MANIFEST_MAX {
        return Err(too_large(
            "manifest",
            bytes.len() as u64,
            MANIFEST_MAX as u64,
        ));
    }
    let m: Manifest = serde_json::from_slice(bytes)
        .map_err(|e| malformed(format!("not an OCI image manifest ({e})")))?;
    if m.schema_version != 2 {
        return Err(malformed(format!(
            "schemaVersion {} (2 expected)",
            m.schema_version
        )));
    }
    let signed: Vec<&Descriptor> = m
        .layers
        .iter()
        .filter(|l| l.media_type == SIMPLE_SIGNING_MEDIA_TYPE)
        .collect();
    if signed.is_empty() {
        return Err(malformed(format!(
            "no layer of media type {SIMPLE_SIGNING_MEDIA_TYPE}"
        )));
    }
    if signed.len() > LAYERS_MAX {
        return Err(too_large(
            "layer count",
            signed.len() as u64,
            LAYERS_MAX as u64,
        ));
    }
    signed
        .into_iter()
        .map(|l| {
            let signature = l
                .annotations
                .as_ref()
                .and_then(|a| a.get(SIGNATURE_ANNOTATION))
                .ok_or_else(|| {
                    malformed(format!("a layer has no {SIGNATURE_ANNOTATION} annotation"))
                })?;
            if signature.len() > SIGNATURE_B64_MAX {
                return Err(too_large(
                    "annotation",
                    signature.len() as u64,
                    SIGNATURE_B64_MAX as u64,
                ));
            }
            if l.size > PAYLOAD_MAX {
                return Err(too_large("payload", l.size, PAYLOAD_MAX));
            }
            if l.digest.parse::<Digest>().is_err() {
                return Err(malformed(format!(
                    "a layer's digest {:?} is not sha256:HEX",
                    l.digest
                )));
            }
            Ok(SignatureLayer {
                payload_digest: l.digest.clone(),
                payload_size: l.size,
                signature: signature.clone(),
            })
        })
        .collect()
}

/// A public key the stack trusts, with its fingerprint (SHA-256 of its DER SubjectPublicKeyInfo,
/// as `openssl pkey -pubin -outform DER | sha256sum` prints it).
#[derive(Clone)]
pub struct TrustedKey {
    key: VerifyingKey,
    fingerprint: String,
}

impl fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustedKey({})", self.id())
    }
}

impl TrustedKey {
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let key = VerifyingKey::from_public_key_pem(pem.trim())
            .map_err(|e| KeyError::Public { why: e.to_string() })?;
        Ok(Self::new(key))
    }

    pub fn from_der(der: &[u8]) -> Result<Self, KeyError> {
        let key = VerifyingKey::from_public_key_der(der)
            .map_err(|e| KeyError::Der { why: e.to_string() })?;
        Ok(Self::new(key))
    }

    fn new(key: VerifyingKey) -> Self {
        let der = key
            .to_public_key_der()
            .map(|d| d.as_bytes().to_vec())
            .unwrap_or_default();
        TrustedKey {
            key,
            fingerprint: hex(&Sha256::digest(&der)),
        }
    }

    /// The full fingerprint (64 hex characters).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The short id shown in status and logs: `SHA256:` and the fingerprint's first 16 hex.
    pub fn id(&self) -> String {
        format!("SHA256:{}", &self.fingerprint[..16])
    }

    /// The key as a PEM `PUBLIC KEY` block.
    pub fn to_pem(&self) -> String {
        self.key
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .unwrap_or_default()
    }
}

/// Every PEM `PUBLIC KEY` block of a text (a config value or a file holding several keys).
pub fn parse_trusted_keys(text: &str) -> Result<Vec<TrustedKey>, KeyError> {
    const END: &str = "-----END PUBLIC KEY-----";
    let mut keys = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN") {
        let Some(end) = rest[start..].find(END) else {
            return Err(KeyError::Public {
                why: "a BEGIN line without its END PUBLIC KEY line".to_owned(),
            });
        };
        let block = &rest[start..start + end + END.len()];
        keys.push(TrustedKey::from_pem(block)?);
        rest = &rest[start + end + END.len()..];
    }
    if !rest.trim().is_empty() && keys.is_empty() {
        return Err(KeyError::Public {
            why: "no -----BEGIN PUBLIC KEY----- block".to_owned(),
        });
    }
    Ok(keys)
}

/// Who signed: the trusted key that verified a signature, and the reference the payload names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub key_id: String,
    pub reference: String,
}

/// Verify one signature layer whose payload blob was fetched: the blob matches the layer's
/// digest, the payload names `digest`, and one of `keys` verifies the signature.
pub fn verify_layer(
    keys: &[TrustedKey],
    digest: &Digest,
    layer: &SignatureLayer,
    payload: &[u8],
) -> Result<Signed, SignatureError> {
    let d = || digest.to_string();
    if payload.len() as u64 > PAYLOAD_MAX {
        return Err(SignatureError::TooLarge {
            digest: d(),
            what: "payload",
            size: payload.len() as u64,
            max: PAYLOAD_MAX,
        });
    }
    let actual = blob_digest(payload);
    if actual != layer.payload_digest {
        return Err(SignatureError::Tampered {
            digest: d(),
            why: format!(
                "the blob hashes to {actual}, the layer names {}",
                layer.payload_digest
            ),
        });
    }
    let claim = parse_payload(digest, payload)?;
    if claim.digest != digest.as_str() {
        return Err(SignatureError::OtherDigest {
            digest: d(),
            signed: claim.digest,
        });
    }
    let der = BASE64
        .decode(layer.signature.trim())
        .map_err(|e| SignatureError::Malformed {
            digest: d(),
            why: format!("the signature annotation is not base64 ({e})"),
        })?;
    let signature =
        p256::ecdsa::Signature::from_der(&der).map_err(|_| SignatureError::Malformed {
            digest: d(),
            why: "the signature is not an ASN.1 DER ECDSA P-256 signature".to_owned(),
        })?;
    keys.iter()
        .find(|k| k.key.verify(payload, &signature).is_ok())
        .map(|k| Signed {
            key_id: k.id(),
            reference: claim.reference,
        })
        .ok_or(SignatureError::UntrustedKey {
            digest: d(),
            trusted: keys.len(),
        })
}

/// The answer for a whole signature manifest: the first layer a trusted key verifies, else the
/// error of the first layer (the one a single `ctl sign` writes).
pub fn verify(
    keys: &[TrustedKey],
    digest: &Digest,
    layers: &[(SignatureLayer, Vec<u8>)],
) -> Result<Signed, SignatureError> {
    let mut first = None;
    for (layer, payload) in layers {
        match verify_layer(keys, digest, layer, payload) {
            Ok(signed) => return Ok(signed),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    Err(first.unwrap_or_else(|| SignatureError::Malformed {
        digest: digest.to_string(),
        why: format!("no layer of media type {SIMPLE_SIGNING_MEDIA_TYPE}"),
    }))
}

/// A private signing key read from a PEM PKCS#8 file (`-----BEGIN PRIVATE KEY-----`).
pub struct FileKey(SigningKey);

impl fmt::Debug for FileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileKey({})", self.public().id())
    }
}

impl FileKey {
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        SigningKey::from_pkcs8_pem(pem.trim())
            .map(FileKey)
            .map_err(|e| KeyError::Private { why: e.to_string() })
    }

    pub fn public(&self) -> TrustedKey {
        TrustedKey::new(*self.0.verifying_key())
    }

    /// The base64 DER signature of `payload` (ECDSA P-256, SHA-256, RFC 6979 nonces).
    pub fn sign(&self, payload: &[u8]) -> String {
        let sig: DerSignature = self.0.sign(payload);
        BASE64.encode(sig.as_bytes())
    }
}

/// Base64 of a DER signature returned by a signer that does not speak base64 (KMS).
pub fn encode_signature(der: &[u8]) -> String {
    BASE64.encode(der)
}

/// The blobs and the manifest of a signature to push: the config blob, the payload blob and the
/// manifest naming them.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub config: Vec<u8>,
    pub payload: Vec<u8>,
    pub manifest: Vec<u8>,
}

/// The signature manifest for `payload` signed as `signature` (base64), keeping the signature
/// layers of `existing` (an earlier signature manifest of the same digest, e.g. by a key being
/// rotated out) so that one signature does not replace another.
pub fn artifacts(
    payload: Vec<u8>,
    signature: &str,
    existing: Option<&[u8]>,
) -> Result<Artifacts, serde_json::Error> {
    let mut layers: Vec<Descriptor> = existing
        .and_then(|b| serde_json::from_slice::<Manifest>(b).ok())
        .map(|m| {
            m.layers
                .into_iter()
                .filter(|l| l.media_type == SIMPLE_SIGNING_MEDIA_TYPE)
                .collect()
        })
        .unwrap_or_default();
    let ours = Descriptor {
        media_type: SIMPLE_SIGNING_MEDIA_TYPE.to_owned(),
        size: payload.len() as u64,
        digest: blob_digest(&payload),
        annotations: Some([(SIGNATURE_ANNOTATION.to_owned(), signature.to_owned())].into()),
    };
    let same = |l: &Descriptor| {
        l.digest == ours.digest
            && l.annotations
                .as_ref()
                .and_then(|a| a.get(SIGNATURE_ANNOTATION))
                == Some(&signature.to_owned())
    };
    if !layers.iter().any(same) {
        layers.push(ours);
    }
    // The config cosign writes: an image config whose rootfs lists the layers.
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "",
        "config": {},
        "created": "0001-01-01T00:00:00Z",
        "history": [{"created": "0001-01-01T00:00:00Z"}],
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>()},
    }))?;
    let manifest = serde_json::to_vec(&Manifest {
        schema_version: 2,
        media_type: Some(MANIFEST_MEDIA_TYPE.to_owned()),
        config: Descriptor {
            media_type: CONFIG_MEDIA_TYPE.to_owned(),
            size: config.len() as u64,
            digest: blob_digest(&config),
            annotations: None,
        },
        layers,
    })?;
    Ok(Artifacts {
        config,
        payload,
        manifest,
    })
}

#[cfg(test)]
mod tests;
