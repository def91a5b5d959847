//! The in-place rollout's channel between `ctl` and the agents: EC2 instance tags. ctl writes
//! an instruction on chosen instances; the agent reads it from the instance metadata's tags
//! (local, free, no inbound path) and answers with tags of its own. The SSM parameter stays
//! the one source for hosts that boot later.
//!
//! A tag value cannot hold the parameter's JSON record (EC2 allows letters, digits, spaces and
//! `_ . : / = + - @`, at most 256 characters:
//! <https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/Using_Tags.html#tag-restrictions>),
//! so a release travels as its display form: `tag` or `tag@sha256:<hex>` (at most 200
//! characters).

use crate::{Digest, Release, ReleaseError};

/// Written by the agent: the tag of the release it runs healthy (the tag only, as before).
pub const RELEASE: &str = crate::INSTANCE_TAG_KEY;
/// Written by ctl: the release this instance must run now (`tag[@digest]`).
pub const TARGET: &str = "skiff:target";
/// Written by ctl: a release to pull ahead of its switch, without running it.
pub const PULL: &str = "skiff:pull";
/// Written by the agent: the release it has pulled (answer to [`PULL`]).
pub const PULLED: &str = "skiff:pulled";
/// Written by the agent: a release that failed here (its pull cannot succeed, or it did not
/// pass the health gate and the host rolled back).
pub const FAILED: &str = "skiff:failed";

/// The tag value for `release`: `tag` or `tag@digest`; metadata does not travel.
pub fn encode(release: &Release) -> String {
    release.to_string()
}

/// Read a tag value written by [`encode`].
pub fn decode(value: &str) -> Result<Release, ReleaseError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(ReleaseError::Empty);
    }
    match value.split_once('@') {
        None => Ok(Release::new(value.parse()?, None)),
        Some((tag, digest)) => Ok(Release::new(tag.parse()?, Some(digest.parse::<Digest>()?))),
    }
}

/// Whether tag value `value` names `release` (same tag and digest). An absent, empty
/// (withdrawn) or malformed value names none. ctl's verdicts read the agents' answers with it.
pub fn names(value: Option<&str>, release: &Release) -> bool {
    value
        .and_then(|v| decode(v).ok())
        .is_some_and(|r| r.tag == release.tag && r.digest == release.digest)
}

/// What a coordinated rollout asks of a host now ([`TARGET`] and [`PULL`], written by ctl).
/// Absent = nothing asked.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Instructions {
    /// The release this host must run now.
    pub target: Option<Release>,
    /// A release to pull ahead of its switch, without running it.
    pub pull: Option<Release>,
}

/// What a host answered ([`PULLED`] and [`FAILED`], written by the agent). An answer is
/// withdrawn by setting its tag empty (the instance role may not delete tags), and every
/// reader takes an empty value as none.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Answers {
    pub pulled: Option<Release>,
    pub failed: Option<Release>,
}

/// The agent's rule for forgetting that `failed` failed on its host, which ctl relies on: new
/// instructions (target or pull) name another release. Applied only when the instructions
/// change, so a release that fails again under unchanged instructions stays failed (no retry
/// loop); ctl's revert (the target back on the previous release) lets a later rollout of the
/// same release try again, and ctl clears a failed pull by pointing the pull elsewhere first.
pub fn forgets_failure(failed: &Release, now: &Instructions) -> bool {
    [now.target.as_ref(), now.pull.as_ref()]
        .into_iter()
        .flatten()
        .any(|r| !r.same_version(failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn encode_and_decode_round_trip() {
        for value in ["3f2c1ab", &format!("3f2c1ab@{D}")] {
            let r = decode(value).expect(value);
            assert_eq!(encode(&r), value);
        }
    }

    #[test]
    fn values_fit_an_ec2_tag() {
        let r = decode(&format!("{}@{D}", "a".repeat(128))).expect("longest");
        let v = encode(&r);
        assert!(v.len() <= 256, "{} characters", v.len());
        let allowed = |c: char| c.is_ascii_alphanumeric() || "_.:/=+-@ ".contains(c);
        assert!(v.chars().all(allowed), "{v}");
    }

    #[test]
    fn bad_values_are_errors() {
        for bad in [
            "",
            "  ",
            "-x",
            "v1@",
            "v1@sha256:zz",
            "@sha256:00",
            "{\"tag\":\"v1\"}",
        ] {
            assert!(decode(bad).is_err(), "{bad:?} accepted");
        }
    }
}
