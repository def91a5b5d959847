//! The release contract between `ctl` (which writes it) and the agent (which reads it).
//!
//! A release is stored as the value of one parameter. The value is either a bare image tag
//! (`3f2c1ab`), or a JSON object `{"tag": "...", "digest": "sha256:..."}` that may carry further
//! metadata (`released_at`, `released_by`, ...), which is kept verbatim but not interpreted.
//!
//! The parameter picks the *version* only: the image repository comes from the reader's own
//! configuration, so whoever can write the parameter cannot make a host run an arbitrary image.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub mod access;
pub mod image;
pub mod instance_tags;
pub mod registry;
pub use image::{ImageRef, ImageRefError};
pub use registry::EcrRegistry;

/// The instance tag the agent sets to the release it runs healthy, and `ctl status` reads.
pub const INSTANCE_TAG_KEY: &str = "skiff:release";

/// CloudWatch Logs streams the agent writes and `ctl logs` reads: `<instance>/<tag>` for the
/// app's output of a release, `<instance>/~agent` for the agent's own lines.
pub mod log_stream {
    /// The agent's own stream after `<instance>/`. No release tag can contain `~` (Docker's
    /// tag grammar), and CloudWatch forbids only `:` and `*` in stream names.
    pub const AGENT: &str = "~agent";

    /// The stream `instance` writes `release`'s output (or, with [`AGENT`], its own lines) to:
    /// `<instance>/<release>`. Neither part contains `/` (config and tag grammar).
    pub fn name(instance: &str, release: &str) -> String {
        format!("{instance}/{release}")
    }

    /// [`name`] read back: the instance and the release (or [`AGENT`]); `None` for a stream a
    /// skiff agent did not name (no `/`, or an empty part).
    pub fn split(name: &str) -> Option<(&str, &str)> {
        name.split_once('/')
            .filter(|(instance, release)| !instance.is_empty() && !release.is_empty())
    }
}

/// The labels the agent puts on the app's container and reads back (adoption, the crash
/// journal, pruning).
pub mod label {
    /// The app's name (`app.name`): which containers the agent manages.
    pub const APP: &str = "skiff.app";
    pub const TAG: &str = "skiff.tag";
    /// Present when the release is pinned.
    pub const DIGEST: &str = "skiff.digest";
    /// Handover: the slot port the container listens on (its `PORT`); absent in drain mode,
    /// where it listens on the app's port itself.
    pub const SLOT: &str = "skiff.slot";
}

/// The environment the agent gives the app; names with [`env::RESERVED_PREFIX`] and
/// [`env::PORT`] are the agent's, not the operator's.
pub mod env {
    /// The port the app listens on (host networking).
    pub const PORT: &str = "PORT";
    pub const APP: &str = "SKIFF_APP";
    pub const RELEASE_TAG: &str = "SKIFF_RELEASE_TAG";
    /// Present when the release is pinned.
    pub const RELEASE_DIGEST: &str = "SKIFF_RELEASE_DIGEST";
    pub const RESERVED_PREFIX: &str = "SKIFF_";

    /// Whether the agent sets `name` itself (configured env may not).
    pub fn is_reserved(name: &str) -> bool {
        name == PORT || name.starts_with(RESERVED_PREFIX)
    }
}

/// Longest part of an offending value that is quoted back in an error message.
const QUOTE_LIMIT: usize = 80;

/// Why a tag, digest or parameter value was rejected. Each variant quotes the offending value
/// (truncated) so the person reading the log can find it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    #[error("the release value is empty: write an image tag or a JSON record {{\"tag\": ...}}")]
    Empty,
    #[error(
        "invalid tag {quoted}: {why}; a tag is 1-128 characters of [A-Za-z0-9_.-] and starts with a letter, digit or underscore",
        quoted = quote(.value)
    )]
    Tag { value: String, why: &'static str },
    #[error(
        "invalid digest {quoted}: {why}; a digest is \"sha256:\" followed by 64 lowercase hex characters",
        quoted = quote(.value)
    )]
    Digest { value: String, why: &'static str },
    #[error("invalid release record {quoted}: {why}", quoted = quote(.value))]
    Record { value: String, why: String },
}

/// Quote a value for an error message: escaped, and cut to a readable length.
pub fn quote(value: &str) -> String {
    let mut cut: String = value.chars().take(QUOTE_LIMIT).collect();
    if cut.len() < value.len() {
        cut.push_str("...");
    }
    format!("{cut:?}")
}

/// An image tag in Docker's grammar: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Tag(String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = ReleaseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| ReleaseError::Tag {
            value: s.to_owned(),
            why,
        };
        let bytes = s.as_bytes();
        let Some(first) = bytes.first() else {
            return Err(err("it is empty"));
        };
        if bytes.len() > 128 {
            return Err(err("it is longer than 128 characters"));
        }
        if !(first.is_ascii_alphanumeric() || *first == b'_') {
            return Err(err("it must start with a letter, digit or underscore"));
        }
        if !bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            return Err(err("it contains a character outside [A-Za-z0-9_.-]"));
        }
        Ok(Tag(s.to_owned()))
    }
}

impl TryFrom<String> for Tag {
    type Error = ReleaseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Tag> for String {
    fn from(t: Tag) -> String {
        t.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A content digest: `sha256:` plus 64 lowercase hex characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Digest {
    type Err = ReleaseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| ReleaseError::Digest {
            value: s.to_owned(),
            why,
        };
        let Some(hex) = s.strip_prefix("sha256:") else {
            return Err(err("it does not start with \"sha256:\""));
        };
        if hex.len() != 64 {
            return Err(err("the hex part is not 64 characters long"));
        }
        if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(err("the hex part has a character outside [0-9a-f]"));
        }
        Ok(Digest(s.to_owned()))
    }
}

impl TryFrom<String> for Digest {
    type Error = ReleaseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One release: the version to run, optionally pinned to a digest, plus metadata that readers
/// keep but do not need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub tag: Tag,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// Further fields of the record (`released_at`, `released_by`, ...), kept verbatim.
    #[serde(flatten)]
    pub metadata: Map<String, Value>,
}

impl Release {
    pub fn new(tag: Tag, digest: Option<Digest>) -> Self {
        Release {
            tag,
            digest,
            metadata: Map::new(),
        }
    }

    /// Parse a parameter value: a bare tag or a JSON record. Surrounding whitespace is ignored.
    pub fn parse(value: &str) -> Result<Self, ReleaseError> {
        let trimmed = value.trim();
        if trimmed.is_empty() {
            return Err(ReleaseError::Empty);
        }
        if !trimmed.starts_with('{') {
            return Ok(Release::new(trimmed.parse()?, None));
        }
        let record = |why: String| ReleaseError::Record {
            value: trimmed.to_owned(),
            why,
        };
        let mut object: Map<String, Value> = serde_json::from_str(trimmed)
            .map_err(|e| record(format!("not a JSON object ({e})")))?;
        let tag = match object.remove("tag") {
            Some(Value::String(t)) => t.parse::<Tag>()?,
            Some(_) => return Err(record("\"tag\" is not a string".into())),
            None => return Err(record("it has no \"tag\" field".into())),
        };
        let digest = match object.remove("digest") {
            Some(Value::String(d)) => Some(d.parse::<Digest>()?),
            Some(Value::Null) | None => None,
            Some(_) => return Err(record("\"digest\" is not a string".into())),
        };
        Ok(Release {
            tag,
            digest,
            metadata: object,
        })
    }

    /// The value to store in the parameter: always the JSON record form.
    pub fn to_value(&self) -> String {
        // A map of strings and JSON values always serialises.
        serde_json::to_string(self).unwrap_or_else(|_| self.tag.to_string())
    }

    /// The digest as text, for log fields and reports: absent when not pinned.
    pub fn digest_str(&self) -> Option<&str> {
        self.digest.as_ref().map(Digest::as_str)
    }

    /// The image reference to pull from `repository`: `repo@digest` when pinned, else `repo:tag`.
    pub fn image_ref(&self, repository: &str) -> String {
        match &self.digest {
            Some(d) => format!("{repository}@{d}"),
            None => format!("{repository}:{}", self.tag),
        }
    }

    /// Whether two releases name the same software: same tag, and the same digest where both
    /// are pinned. Metadata does not count.
    pub fn same_version(&self, other: &Release) -> bool {
        self.tag == other.tag
            && match (&self.digest, &other.digest) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    /// A metadata string field, if present (e.g. `released_by`).
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(Value::as_str)
    }
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.digest {
            Some(d) => write!(f, "{}@{}", self.tag, d),
            None => write!(f, "{}", self.tag),
        }
    }
}

/// A repository reference, as configured (`registry.example.com/team/app`): checked against the
/// image-reference grammar ([`ImageRef`]), and without tag or digest, so that a release can only
/// choose the version, never smuggle in a tag or digest of its own.
pub fn validate_repository(repo: &str) -> Result<ImageRef, String> {
    if repo.is_empty() {
        return Err("the image repository is empty".into());
    }
    let image: ImageRef = repo.parse().map_err(|e: ImageRefError| {
        format!("{e}; write the repository as [host[:port]/]path, e.g. 123456789012.dkr.ecr.us-east-1.amazonaws.com/app")
    })?;
    if image.digest().is_some() {
        return Err(format!(
            "image {} must not carry a digest: the release chooses it",
            quote(repo)
        ));
    }
    if image.tag().is_some() {
        return Err(format!(
            "image {} must not carry a tag: the release chooses it",
            quote(repo)
        ));
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn tags() {
        let long_ok = "a".repeat(128);
        let too_long = "a".repeat(129);
        let table: &[(&str, bool)] = &[
            ("3f2c1ab", true),
            ("v1.2.3", true),
            ("_x", true),
            ("A-b_c.d", true),
            (&long_ok, true),
            ("", false),
            (&too_long, false),
            (".hidden", false),
            ("-dash", false),
            ("a/b", false),
            ("a:b", false),
            ("a b", false),
            ("tag\n", false),
            ("tåg", false),
            ("$(reboot)", false),
            ("../../etc", false),
        ];
        for (input, ok) in table {
            assert_eq!(input.parse::<Tag>().is_ok(), *ok, "tag {input:?}");
        }
    }

    #[test]
    fn digests() {
        let table: &[(&str, bool)] = &[
            (D, true),
            ("sha256:0123", false),
            (&D.to_uppercase(), false),
            (&D.replace("sha256", "sha512"), false),
            (&format!("{D}0"), false),
            (&D.replace('a', "g"), false),
            ("", false),
        ];
        for (input, ok) in table {
            assert_eq!(input.parse::<Digest>().is_ok(), *ok, "digest {input:?}");
        }
    }

    #[test]
    fn parse_values() {
        let bare = Release::parse(" 3f2c1ab\n").expect("bare tag");
        assert_eq!(bare.tag.as_str(), "3f2c1ab");
        assert_eq!(bare.digest, None);

        let rec = Release::parse(&format!(
            r#"{{"tag":"v2","digest":"{D}","released_by":"jenkins","released_at":"2026-11-28T06:00:00Z"}}"#
        ))
        .expect("record");
        assert_eq!(rec.tag.as_str(), "v2");
        assert_eq!(rec.digest.as_ref().map(Digest::as_str), Some(D));
        assert_eq!(rec.meta_str("released_by"), Some("jenkins"));

        let null_digest = Release::parse(r#"{"tag":"v3","digest":null}"#).expect("null digest");
        assert_eq!(null_digest.digest, None);

        let bad: &[&str] = &[
            "",
            "   ",
            "{",
            "[]",
            r#"{"digest":"sha256:00"}"#,
            r#"{"tag":5}"#,
            r#"{"tag":"ok","digest":5}"#,
            r#"{"tag":"ok","digest":"md5:abc"}"#,
            r#"{"tag":"bad tag"}"#,
            "two words",
            "evil/image:latest",
        ];
        for v in bad {
            assert!(Release::parse(v).is_err(), "accepted {v:?}");
        }
    }

    #[test]
    fn errors_quote_and_truncate() {
        let hostile = format!("x y{}", "z".repeat(10_000));
        let msg = Release::parse(&hostile).expect_err("hostile").to_string();
        assert!(msg.contains("\"x yzzz"), "{msg}");
        assert!(
            msg.len() < 400,
            "message not truncated: {} chars",
            msg.len()
        );
        let msg = "bad\u{1b}[31m"
            .parse::<Tag>()
            .expect_err("escape")
            .to_string();
        assert!(
            msg.contains("\\u{1b}"),
            "control characters are escaped: {msg}"
        );
    }

    #[test]
    fn round_trip_keeps_metadata() {
        let rec = Release::parse(&format!(
            r#"{{"tag":"v2","digest":"{D}","released_by":"ci"}}"#
        ))
        .expect("record");
        let again = Release::parse(&rec.to_value()).expect("round trip");
        assert_eq!(rec, again);
    }

    #[test]
    fn image_refs_and_versions() {
        let pinned = Release::new("v1".parse().expect("tag"), Some(D.parse().expect("digest")));
        let loose = Release::new("v1".parse().expect("tag"), None);
        assert_eq!(
            pinned.image_ref("reg:5000/app"),
            format!("reg:5000/app@{D}")
        );
        assert_eq!(loose.image_ref("reg:5000/app"), "reg:5000/app:v1");
        assert!(pinned.same_version(&loose));
        let other = Release::new("v2".parse().expect("tag"), None);
        assert!(!pinned.same_version(&other));
    }

    #[test]
    fn repositories() {
        let table: &[(&str, bool)] = &[
            ("docker.io/myrepo/app", true),
            ("127.0.0.1:5000/skiff/app", true),
            ("app", true),
            ("app:latest", false),
            ("repo/app@sha256:00", false),
            (
                "repo/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                false,
            ),
            ("localhost:5000/app", true),
            ("index.docker.io/library/app", true),
            ("reg.example.com:/app", false),
            ("Repo/App", false),
            ("", false),
        ];
        for (input, ok) in table {
            assert_eq!(validate_repository(input).is_ok(), *ok, "repo {input:?}");
        }
    }
}
