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
