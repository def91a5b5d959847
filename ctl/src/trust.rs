//! Whether a release is signed by a key the stack trusts, decided before ctl writes anything.
//!
//! The keys come from the stack output `TrustedKeysParameter` (an SSM String parameter holding
//! PEM `PUBLIC KEY` blocks, read with ssm:GetParameter) or from `--trusted-keys <file>` for a
//! run without a stack; neither: the check is off. A source that is named but unreadable,
//! empty or malformed is an error, never "off". The signature itself is checked by the one
//! verifier hosts use too (`HttpRegistry::check_signature`); this module chooses the keys,
//! turns the verifier's answer into ctl's verdict and words it (pure, tested as tables), and
//! reads the parameter (the adapter).

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};

use skiff_registry::{CheckError, HttpRegistry};
use skiff_release::{Digest, Release};
use skiff_signature::{KeyError, SignatureError, Signed, TrustedKey, parse_trusted_keys};

use crate::aws;

/// The stack output naming the SSM parameter that holds the trusted keys.
pub const OUTPUT_TRUSTED_KEYS: &str = "TrustedKeysParameter";

/// What ctl prints, once, when no keys are named.
pub const OFF: &str = "signature check off: the stack names no trusted keys";

/// Where the trusted keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Parameter(String),
    File(PathBuf),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Parameter(name) => write!(f, "parameter {name}"),
            Source::File(path) => write!(f, "file {}", path.display()),
        }
    }
}

/// The keys a run checks against.
#[derive(Debug, Clone)]
pub struct Keys {
    pub source: Source,
    pub keys: Vec<TrustedKey>,
}

impl Keys {
    /// The key ids, comma-separated, as `ctl sign` and the agent print them.
    pub fn ids(&self) -> String {
        self.keys
            .iter()
            .map(TrustedKey::id)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Whether releases are checked.
#[derive(Debug, Clone)]
pub enum Trust {
    /// No keys named: nothing is checked.
    Off,
    On(Keys),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error(
        "both --trusted-keys ({file}) and the stack's {OUTPUT_TRUSTED_KEYS} ({parameter}) name trusted keys; ctl checks against the keys the hosts trust: leave out --trusted-keys"
    )]
    Both { file: String, parameter: String },
    #[error(
        "the stack output {OUTPUT_TRUSTED_KEYS} is empty; a stack without keys has no such output: update the stack (parameter TrustedKeys)"
    )]
    EmptyOutput,
    #[error(
        "cannot read the trusted keys from {origin}: {detail}; {advice}. Releases are refused until the keys can be read"
    )]
    Read {
        origin: String,
        detail: String,
        advice: &'static str,
    },
    #[error(
        "the trusted keys in {origin} are empty: keys are named but none is there; put the PEM public keys in it (stack parameter TrustedKeys)"
    )]
    Empty { origin: String },
    #[error("the trusted keys in {origin} cannot be used: {why}")]
    Malformed { origin: String, why: KeyError },
    #[error(
        "release {release} names no digest (--skip-verify, or a record written without one), so its signature cannot be checked, and trusted keys are named ({keys}, from {origin}); release a tag resolved to its digest (leave out --skip-verify)"
    )]
    NoDigest {
        release: String,
        keys: String,
        origin: String,
    },
    #[error(
        "release of {image}@{digest} refused: {reason}. Trusted keys ({origin}): {keys}. Sign the digest with one of them (`make sign SIGNING_KEY=<key file>`, or `ctl sign --digest {digest} --key-file <key>`), then release again"
    )]
    Refused {
        image: String,
        digest: String,
        reason: Box<SignatureError>,
        keys: String,
        origin: String,
    },
    #[error(
        "release of {image}@{digest} refused: the registry cannot serve its signatures ({detail}); trusted keys are named ({keys}, from {origin}), so nothing is released unchecked: make the registry reachable and readable to ctl, then retry"
    )]
    Unavailable {
        image: String,
        digest: String,
        detail: String,
        keys: String,
        origin: String,
    },
}

/// Where the keys come from, given `--trusted-keys` and the stack output. Pure.
pub fn choose(file: Option<&Path>, output: Option<&str>) -> Result<Option<Source>, TrustError> {
    match (file, output) {
        (None, None) => Ok(None),
        (Some(f), None) => Ok(Some(Source::File(f.to_owned()))),
        (None, Some(p)) if p.trim().is_empty() => Err(TrustError::EmptyOutput),
        (None, Some(p)) => Ok(Some(Source::Parameter(p.trim().to_owned()))),
        (Some(f), Some(p)) => Err(TrustError::Both {
            file: f.display().to_string(),
            parameter: p.to_owned(),
        }),
    }
}

/// The keys in the text read from `source`: at least one, each a P-256 public key. Pure.
pub fn parse(source: Source, text: &str) -> Result<Keys, TrustError> {
    let name = source.to_string();
    let keys = parse_trusted_keys(text).map_err(|why| TrustError::Malformed {
        origin: name.clone(),
        why,
    })?;
    if keys.is_empty() {
        return Err(TrustError::Empty { origin: name });
    }
    Ok(Keys { source, keys })
}

/// ctl's verdict on the verifier's answer for `image@digest`. Pure.
pub fn judge(
    keys: &Keys,
    image: &str,
    digest: &Digest,
    answer: Result<Signed, CheckError>,
) -> Result<Signed, TrustError> {
    match answer {
        Ok(signed) => Ok(signed),
        Err(CheckError::Refused(reason)) => Err(TrustError::Refused {
            image: image.to_owned(),
            digest: digest.to_string(),
            reason: Box::new(reason),
            keys: keys.ids(),
            origin: keys.source.to_string(),
        }),
        Err(CheckError::Registry { source, .. }) => Err(TrustError::Unavailable {
            image: image.to_owned(),
            digest: digest.to_string(),
            detail: source.to_string(),
            keys: keys.ids(),
            origin: keys.source.to_string(),
        }),
    }
}

/// Asks the registry for the signatures of a digest (the verifier's seam).
pub trait SignatureChecker {
    fn check(
        &self,
        repository: &str,
        digest: &Digest,
        keys: &[TrustedKey],
    ) -> impl Future<Output = Result<Signed, CheckError>> + Send;
}

impl SignatureChecker for HttpRegistry {
    async fn check(
        &self,
        repository: &str,
        digest: &Digest,
        keys: &[TrustedKey],
    ) -> Result<Signed, CheckError> {
        self.check_signature(repository, digest, keys).await
    }
}

/// No checker: the type of a [`Gate::Off`] that has none.
#[derive(Debug, Clone, Copy)]
pub enum Unchecked {}

impl SignatureChecker for Unchecked {
    async fn check(&self, _: &str, _: &Digest, _: &[TrustedKey]) -> Result<Signed, CheckError> {
        match *self {}
    }
}

/// What a release passes through before anything is written.
#[derive(Debug)]
pub enum Gate<'a, C> {
    /// No keys named.
    Off,
    On {
        keys: &'a Keys,
        checker: &'a C,
    },
}

impl<'a, C> Gate<'a, C> {
    pub fn new(trust: &'a Trust, checker: &'a C) -> Self {
        match trust {
            Trust::Off => Gate::Off,
            Trust::On(keys) => Gate::On { keys, checker },
        }
    }
}

/// Who signed `release` (of `image`), among the trusted keys.
pub async fn check<C: SignatureChecker>(
    keys: &Keys,
    checker: &C,
    image: &str,
    release: &Release,
) -> Result<Signed, TrustError> {
    let Some(digest) = &release.digest else {
        return Err(TrustError::NoDigest {
            release: release.to_string(),
            keys: keys.ids(),
            origin: keys.source.to_string(),
        });
    };
    judge(
        keys,
        image,
        digest,
        checker.check(image, digest, &keys.keys).await,
    )
}

/// The signature verdict a release reports (`--dry-run` shows it; `--json`: the event).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    Off,
    Signed {
        digest: String,
        key_id: String,
        source: String,
    },
    Refused {
        digest: Option<String>,
        reason: String,
    },
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Off => f.write_str(OFF),
            Verdict::Signed {
                digest,
                key_id,
                source,
            } => write!(
                f,
                "signature ok: {digest} is signed by trusted key {key_id} (keys from {source})"
            ),
            Verdict::Refused { digest, .. } => write!(
                f,
                "signature REFUSED: {}",
                digest.as_deref().unwrap_or("the release names no digest")
            ),
        }
    }
}

/// Who signed a release already written, as `ctl status` and `ctl history` show it (after
/// `signature `); never an error (a registry that cannot answer shows as unknown).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "signature", rename_all = "snake_case")]
pub enum Signer {
    /// No keys named.
    Off,
    Signed {
        key_id: String,
    },
    /// Read, and not signed by a trusted key (hosts refuse it).
    Refused {
        reason: String,
    },
    /// Not known: the registry could not answer, or the release names no digest.
    Unknown {
        why: String,
    },
}

impl fmt::Display for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Signer::Off => f.write_str("check off: the stack names no trusted keys"),
            Signer::Signed { key_id } => write!(f, "signed by {key_id}"),
            Signer::Refused { reason } => write!(f, "NOT signed by a trusted key: {reason}"),
            Signer::Unknown { why } => write!(f, "unknown: {why}"),
        }
    }
}

impl Signer {
    /// The short form of a table cell: the key id, `UNSIGNED`, `unknown` or `-`.
    pub fn cell(&self) -> &str {
        match self {
            Signer::Off => "-",
            Signer::Signed { key_id } => key_id,
            Signer::Refused { .. } => "UNTRUSTED",
            Signer::Unknown { .. } => "unknown",
        }
    }
}

/// Who signed each of `releases` (`None`: not a release record, or no keys named), asking the
/// registry once per distinct digest and not at all once it could not answer (the rest are
/// unknown for the same reason): at most one signature read per release shown. Keys that
/// cannot be read make every release unknown, for that reason: status and history still show
/// the rest.
pub async fn signers<C: SignatureChecker>(
    trust: &Result<Trust, TrustError>,
    checker: &C,
    image: &str,
    releases: &[Option<&Release>],
) -> Vec<Option<Signer>> {
    let keys = match trust {
        Ok(Trust::On(keys)) => keys,
        Ok(Trust::Off) => return releases.iter().map(|_| None).collect(),
        Err(e) => {
            return releases
                .iter()
                .map(|r| r.map(|_| Signer::Unknown { why: e.to_string() }))
                .collect();
        }
    };
    let mut known: Vec<(Digest, Signer)> = Vec::new();
    let mut down: Option<String> = None;
    let mut out = Vec::with_capacity(releases.len());
    for release in releases {
        let Some(release) = release else {
            out.push(None);
            continue;
        };
        let Some(digest) = &release.digest else {
            out.push(Some(Signer::Unknown {
                why: "the release names no digest".into(),
            }));
            continue;
        };
        if let Some((_, s)) = known.iter().find(|(d, _)| d == digest) {
            out.push(Some(s.clone()));
            continue;
        }
        if let Some(why) = &down {
            out.push(Some(Signer::Unknown { why: why.clone() }));
            continue;
        }
        let s = match checker.check(image, digest, &keys.keys).await {
            Ok(signed) => Signer::Signed {
                key_id: signed.key_id,
            },
            Err(CheckError::Refused(reason)) => Signer::Refused {
                reason: reason.to_string(),
            },
            Err(CheckError::Registry { source, .. }) => {
                let why = source.to_string();
                down = Some(why.clone());
                Signer::Unknown { why }
            }
        };
        known.push((digest.clone(), s.clone()));
        out.push(Some(s));
    }
    out
}

/// The trusted keys of a deployment: `--trusted-keys` (`file`) or the stack's output, read.
pub async fn resolve(
    file: Option<&Path>,
    output: Option<&str>,
    ssm: &aws_sdk_ssm::Client,
) -> Result<Trust, TrustError> {
    load(choose(file, output)?, ssm).await
}

/// Read the trusted keys named by `source`; `None`: off.
pub async fn load(source: Option<Source>, ssm: &aws_sdk_ssm::Client) -> Result<Trust, TrustError> {
    let Some(source) = source else {
        return Ok(Trust::Off);
    };
    let text = match &source {
        Source::Parameter(name) => read_parameter(ssm, name).await?,
        Source::File(path) => std::fs::read_to_string(path).map_err(|e| TrustError::Read {
            origin: source.to_string(),
            detail: e.to_string(),
            advice: "give a readable file of PEM public keys",
        })?,
    };
    parse(source, &text).map(Trust::On)
}

/// The value of the String parameter `name` (the stack's trusted keys).
async fn read_parameter(ssm: &aws_sdk_ssm::Client, name: &str) -> Result<String, TrustError> {
    let fail = |detail: String, advice| TrustError::Read {
        origin: Source::Parameter(name.to_owned()).to_string(),
        detail,
        advice,
    };
    let out = ssm.get_parameter().name(name).send().await.map_err(|e| {
        let code = aws::code(&e);
        let advice = match code.as_deref() {
            Some("ParameterNotFound") => {
                "the stack names it but it does not exist: update the stack (parameter TrustedKeys)"
            }
            Some("AccessDeniedException") => {
                "ctl's identity needs ssm:GetParameter on it (the stack's DeployerPolicy grants it)"
            }
            _ => "check the region, your credentials and ssm:GetParameter on it",
        };
        fail(aws::describe(&e), advice)
    })?;
    out.parameter
        .and_then(|p| p.value)
        .ok_or_else(|| fail("the answer carried no value".into(), "retry"))
}

#[cfg(test)]
mod tests;
