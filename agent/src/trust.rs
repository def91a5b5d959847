//! Signed releases: with `[trust]`, the agent creates a container only from a digest that a
//! trusted key signed (cosign's format, checked by `skiff_registry`'s one verifier), whatever
//! asked for it: the release source, a `skiff:target`, a `skiff:pull`, or an adoption at start
//! of a container this host never verified.
//!
//! The keys are re-read before each verification (a rotation needs no restart); a key source
//! that is empty, unreadable or malformed refuses every new release (what runs keeps running).
//! What was decided is remembered: a verified digest (with the key that verified it) in a small
//! file in the agent's state directory beside the swap journal, so a restart neither asks the
//! registry again nor trusts blindly; the last refusal (with the key ids it was checked against)
//! in memory, so a refused release is not asked about again until the release or the keys
//! change. The decisions ([`recall`], [`keys_changed`]) are pure and tested as tables.
//!
//! Seams: [`KeySource`] (a file here, SSM in `ssm`) and [`SignatureCheck`] (the registry, in
//! `trust::registry`).

#[cfg(test)]
pub(crate) mod fakes;
pub mod registry;
#[cfg(test)]
mod tests;

use std::fmt;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use skiff_release::Digest;
use skiff_signature::{TrustedKey, parse_trusted_keys};

use crate::runtime::RegistryAuth;

/// Verified digests remembered, on disk and in memory; the oldest are forgotten first.
pub const REMEMBERED: usize = 32;

/// The `result` labels of `skiff_agent_signature_checks_total`.
pub const VERIFIED: &str = "verified";
pub const REFUSED: &str = "refused";
pub const UNREACHABLE: &str = "unreachable";
pub const VERIFIED_RECALLED: &str = "verified_recalled";
pub const REFUSED_RECALLED: &str = "refused_recalled";
pub const KEYS_UNREADABLE: &str = "keys_unreadable";
pub const RESULTS: [&str; 6] = [
    VERIFIED,
    REFUSED,
    UNREACHABLE,
    VERIFIED_RECALLED,
    REFUSED_RECALLED,
    KEYS_UNREADABLE,
];

/// A boxed future, so the sources and checkers sit behind `dyn` (the supervisor holds any).
pub type KeysFuture<'a> = Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>>;
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<String, CheckFailure>> + Send + 'a>>;

/// Where the trusted keys are read from: the PEM text, or why it cannot be read.
pub trait KeySource: Send + Sync + fmt::Debug + 'static {
    /// For logs: `file:/etc/skiff/trusted.pem`, `ssm:/skiff/prod/trusted-keys`.
    fn describe(&self) -> String;
    fn read(&self) -> KeysFuture<'_>;
}

/// Who signed `repository@digest` among `keys`: the key id of the trusted key that verified it.
pub trait SignatureCheck: Send + Sync + fmt::Debug + 'static {
    fn check<'a>(
        &'a self,
        repository: &'a str,
        digest: &'a Digest,
        keys: &'a [TrustedKey],
        auth: Option<&'a RegistryAuth>,
    ) -> CheckFuture<'a>;
}

/// Why a check did not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckFailure {
    /// A verdict: unsigned, untrusted key, another digest, tampered, malformed, or a registry
    /// that cannot serve the signatures (denied, an error answer). Not asked again until the
    /// release or the keys change.
    Refused(String),
    /// The registry could not be reached: asked again after the deploy backoff.
    Unreachable(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error(
        "signature check refused {digest} (trusted keys: {keys}): {reason}; the host keeps what it runs and tries this digest again when the release or the trusted keys change"
    )]
    Refused {
        digest: String,
        keys: String,
        reason: String,
    },
    #[error("cannot check the signature of {digest} now: {reason} (will retry)")]
    Unreachable { digest: String, reason: String },
    #[error(
        "release {release} has no digest to verify (the pull resolved none): pin it (`ctl release` writes tag@digest)"
    )]
    NoDigest { release: String },
}

impl TrustError {
    /// Only an unreachable registry heals by itself; a refusal waits for a change.
    pub fn is_retryable(&self) -> bool {
        matches!(self, TrustError::Unreachable { .. })
    }
}

/// A digest verified here, and the key that verified it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Verified {
    pub digest: String,
    pub key: String,
}

/// The last refusal: the digest, the key ids it was checked against (`None`: the keys could not
/// be read), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub digest: String,
    pub keys: Option<Vec<String>>,
    pub reason: String,
}

/// What is already known about a digest under the keys trusted now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recall {
    /// Verified before by a key still trusted (its id).
    Verified(String),
    /// Refused before under exactly these keys (the reason).
    Refused(String),
    /// Ask the registry.
    Ask,
}

/// Known verdicts for `digest` under `keys` (ids; `None`: unreadable). A digest verified by a
/// key no longer trusted is asked about again (its signature by a newer key counts); a refusal
/// stands only while the keys are the same ones. Pure.
pub fn recall(
    digest: &str,
    keys: Option<&[String]>,
    verified: &[Verified],
    refused: Option<&Refusal>,
) -> Recall {
    if let Some(ids) = keys
        && let Some(v) = verified
            .iter()
            .find(|v| v.digest == digest && ids.contains(&v.key))
    {
        return Recall::Verified(v.key.clone());
    }
    match refused {
        Some(r) if r.digest == digest && r.keys.as_deref() == keys => {
            Recall::Refused(r.reason.clone())
        }
        _ => Recall::Ask,
    }
}

/// Whether the keys read now (`None`: unreadable) differ from those a refusal was checked
/// against, so the refused release is worth another check. Pure.
pub fn keys_changed(refusal: &Refusal, now: Option<&[String]>) -> bool {
    refusal.keys.as_deref() != now
}

/// `verified` with `v` added last (once), at most [`REMEMBERED`] entries. Pure.
pub fn remember(mut verified: Vec<Verified>, v: Verified) -> Vec<Verified> {
    verified.retain(|old| old.digest != v.digest);
    verified.push(v);
    let excess = verified.len().saturating_sub(REMEMBERED);
    verified.drain(..excess);
    verified
}

/// The key ids of a PEM bundle, sorted, or why the bundle is not usable (empty, malformed).
pub fn parse_keys(text: &str) -> Result<Vec<TrustedKey>, String> {
    let keys = parse_trusted_keys(text).map_err(|e| e.to_string())?;
    if keys.is_empty() {
        return Err("it holds no -----BEGIN PUBLIC KEY----- block; write the stack's TrustedKeys (or remove [trust] to turn checks off)".into());
    }
    Ok(keys)
}

fn ids_of(keys: &[TrustedKey]) -> Vec<String> {
    let mut ids: Vec<String> = keys.iter().map(TrustedKey::id).collect();
    ids.sort();
    ids.dedup();
    ids
}

/// The outcome of one verification and how it was reached (a `result` label).
#[derive(Debug)]
pub struct Verification {
    pub outcome: Result<String, TrustError>,
    pub result: &'static str,
}

#[derive(Debug, Default)]
struct Memory {
    verified: Vec<Verified>,
    refused: Option<Refusal>,
}

/// Signature checks on: the key source, the registry check, and what was decided.
#[derive(Debug)]
pub struct Trust {
    keys: Box<dyn KeySource>,
    signatures: Box<dyn SignatureCheck>,
    /// Where verified digests are kept across restarts (`None`: memory only).
    record: Option<PathBuf>,
    memory: Mutex<Memory>,
    registry_checks: AtomicU64,
}

impl Trust {
    /// Checks with these seams; verified digests recorded in `record` (read now: a missing
    /// file is an empty record, an unreadable one is logged and replaced by the next write).
    pub fn new(
        keys: impl KeySource,
        signatures: impl SignatureCheck,
        record: Option<PathBuf>,
    ) -> Self {
        let verified = record.as_deref().map(read_record).unwrap_or_default();
        Trust {
            keys: Box::new(keys),
            signatures: Box::new(signatures),
            record,
            memory: Mutex::new(Memory {
                verified,
                refused: None,
            }),
            registry_checks: AtomicU64::new(0),
        }
    }

    /// The record of app `app` in the agent's state directory (beside the swap journal).
    pub fn record_path(dir: &Path, app: &str) -> PathBuf {
        dir.join(format!("verified-{app}.json"))
    }

    pub fn describe(&self) -> String {
        self.keys.describe()
    }

    /// How many times the registry was asked (for tests and the bench).
    pub fn registry_checks(&self) -> u64 {
        self.registry_checks.load(Ordering::Relaxed)
    }

    /// The keys trusted now, read from the source.
    async fn read_keys(&self) -> Result<Vec<TrustedKey>, String> {
        let text =
            self.keys.read().await.map_err(|e| {
                format!("cannot read the trusted keys from {}: {e}", self.describe())
            })?;
        parse_keys(&text).map_err(|e| format!("the trusted keys in {}: {e}", self.describe()))
    }

    /// Verify `repository@digest`: from memory when this host decided it under the same keys,
    /// else by asking the registry (with `auth`, the pull's credentials).
    pub async fn verify(
        &self,
        repository: &str,
        digest: &Digest,
        auth: Option<&RegistryAuth>,
    ) -> Verification {
        let keys = self.read_keys().await;
        let ids = keys.as_deref().ok().map(ids_of);
        let d = digest.to_string();
        let shown = ids
            .as_ref()
            .map_or_else(|| "none readable".to_owned(), |i| i.join(" "));
        let refused = |reason: String| TrustError::Refused {
            digest: d.clone(),
            keys: shown.clone(),
            reason,
        };
        // No usable keys: every new release is refused, with today's reason; nothing is asked.
        let keys = match keys {
            Ok(k) => k,
            Err(reason) => {
                self.refuse(&d, None, reason.clone());
                return Verification {
                    outcome: Err(refused(reason)),
                    result: KEYS_UNREADABLE,
                };
            }
        };
        let known = {
            let m = self.lock();
            recall(&d, ids.as_deref(), &m.verified, m.refused.as_ref())
        };
        match known {
            Recall::Verified(key) => {
                return Verification {
                    outcome: Ok(key),
                    result: VERIFIED_RECALLED,
                };
            }
            Recall::Refused(reason) => {
                return Verification {
                    outcome: Err(refused(reason)),
                    result: REFUSED_RECALLED,
                };
            }
            Recall::Ask => {}
        }
        self.registry_checks.fetch_add(1, Ordering::Relaxed);
        match self.signatures.check(repository, digest, &keys, auth).await {
            Ok(key) => {
                self.accept(Verified {
                    digest: d.clone(),
                    key: key.clone(),
                });
                Verification {
                    outcome: Ok(key),
                    result: VERIFIED,
                }
            }
            Err(CheckFailure::Refused(reason)) => {
                self.refuse(&d, ids, reason.clone());
                Verification {
                    outcome: Err(refused(reason)),
                    result: REFUSED,
                }
            }
            Err(CheckFailure::Unreachable(reason)) => Verification {
                outcome: Err(TrustError::Unreachable { digest: d, reason }),
                result: UNREACHABLE,
            },
        }
    }

    /// The digest last refused, if any.
    pub fn refused_digest(&self) -> Option<String> {
        self.lock().refused.as_ref().map(|r| r.digest.clone())
    }

    /// Whether the keys changed since the last refusal (re-read now); false without one.
    pub async fn refusal_outdated(&self) -> bool {
        let Some(refusal) = self.lock().refused.clone() else {
            return false;
        };
        let now = self.read_keys().await.ok().map(|k| ids_of(&k));
        keys_changed(&refusal, now.as_deref())
    }

    /// Whether `digest` was verified here by one of the keys trusted at the last check.
    pub fn is_recorded(&self, digest: &str) -> bool {
        self.lock().verified.iter().any(|v| v.digest == digest)
    }

    fn refuse(&self, digest: &str, keys: Option<Vec<String>>, reason: String) {
        self.lock().refused = Some(Refusal {
            digest: digest.to_owned(),
            keys,
            reason,
        });
    }

    fn accept(&self, v: Verified) {
        let verified = {
            let mut m = self.lock();
            if m.refused.as_ref().is_some_and(|r| r.digest == v.digest) {
                m.refused = None;
            }
            m.verified = remember(std::mem::take(&mut m.verified), v);
            m.verified.clone()
        };
        if let Some(path) = &self.record
            && let Err(e) = write_record(path, &verified)
        {
            // Still verified now; only a restart would ask the registry again.
            tracing::warn!(path = %path.display(), error = %e, "could not record the verified digest");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn read_record(path: &Path) -> Vec<Verified> {
    match std::fs::read(path) {
        Ok(body) => serde_json::from_slice(&body).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "ignoring the record of verified digests (replaced by the next verification)");
            Vec::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the record of verified digests");
            Vec::new()
        }
    }
}

/// Written to a temporary file, synced and renamed, like the swap journal.
fn write_record(path: &Path, verified: &[Verified]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec(verified).map_err(std::io::Error::other)?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// `keys_file`: a PEM bundle on the host, read whole (at most 64 KiB) before each check.
#[derive(Debug, Clone)]
pub struct FileKeys(pub PathBuf);

/// Largest key bundle read: dozens of keys fit in a few KiB.
const KEYS_MAX: u64 = 64 * 1024;

impl KeySource for FileKeys {
    fn describe(&self) -> String {
        format!("file:{}", self.0.display())
    }

    fn read(&self) -> KeysFuture<'_> {
        Box::pin(async move {
            let meta = tokio::fs::metadata(&self.0)
                .await
                .map_err(|e| e.to_string())?;
            if meta.len() > KEYS_MAX {
                return Err(format!(
                    "{} bytes, at most {KEYS_MAX} are read: give only PUBLIC KEY blocks",
                    meta.len()
                ));
            }
            tokio::fs::read_to_string(&self.0)
                .await
                .map_err(|e| e.to_string())
        })
    }
}
