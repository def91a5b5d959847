//! The one image-reference grammar of skiff: `[domain/]path[:tag][@digest]`, normalised the way
//! Docker does, so the agent (pull, digest check, image pruning) and ctl (the registry API) agree
//! on which registry and repository a name points at.
//!
//! Docker's rules (https://docs.docker.com/reference/cli/docker/image/tag/ and the distribution
//! reference grammar, `splitDockerDomain` in github.com/distribution/reference):
//! - the first `/`-separated component is a registry host when it contains `.` or `:`, is
//!   `localhost`, or has an uppercase letter; otherwise the name is on Docker Hub (`docker.io`);
//! - `index.docker.io` is Docker Hub's legacy name and means `docker.io`;
//! - a Docker Hub name of one component is an official image under `library/`
//!   (`nginx` = `docker.io/library/nginx`);
//! - path components are lowercase letters and digits, joined by `.`, `_`, `__` or dashes;
//! - a tag is 1-128 characters of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.

use std::fmt;
use std::str::FromStr;

use crate::{Digest, Tag, quote};

/// Docker Hub as image names spell it.
pub const DOCKER_HUB: &str = "docker.io";
/// Docker Hub's legacy name, normalised to [`DOCKER_HUB`].
const LEGACY_DOCKER_HUB: &str = "index.docker.io";
/// Where Docker Hub's registry API answers (`/v2/...`).
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// Docker Hub's namespace of official images.
const OFFICIAL: &str = "library";

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    domain: String,
    path: String,
    tag: Option<Tag>,
    digest: Option<Digest>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {quoted}: {why}", quoted = quote(.value))]
pub struct ImageRefError {
    pub value: String,
    pub why: String,
}

impl ImageRef {
    /// The registry host (with its port), `docker.io` for Docker Hub.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The repository path within the registry (`library/nginx`, `team/app`).
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn tag(&self) -> Option<&Tag> {
        self.tag.as_ref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The repository in full: `docker.io/library/nginx`, `127.0.0.1:5000/team/app`.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// The repository as Docker prints it (`nginx`, `team/app`, `127.0.0.1:5000/team/app`).
    pub fn familiar_repository(&self) -> String {
        if self.domain != DOCKER_HUB {
            return self.repository();
        }
        match self.path.strip_prefix("library/") {
            Some(name) if !name.contains('/') => name.to_owned(),
            _ => self.path.clone(),
        }
    }

    /// Whether both name the same repository, whatever their spelling, tag or digest.
    pub fn same_repository(&self, other: &ImageRef) -> bool {
        self.domain == other.domain && self.path == other.path
    }

    /// The host to call for the registry API: Docker Hub answers at `registry-1.docker.io`.
    pub fn api_host(&self) -> &str {
        if self.domain == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.domain
        }
    }
}

impl FromStr for ImageRef {
    type Err = ImageRefError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let fail = |why: String| ImageRefError {
            value: value.to_owned(),
            why,
        };
        if value.is_empty() {
            return Err(fail("it is empty".into()));
        }
        let (rest, digest) = match value.split_once('@') {
            Some((rest, d)) => (
                rest,
                Some(d.parse::<Digest>().map_err(|e| fail(e.to_string()))?),
            ),
            None => (value, None),
        };
        // A tag is the part after the last `:` that is not followed by a `/` (a port is).
        let (name, tag) = match rest.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => (
                name,
                Some(tag.parse::<Tag>().map_err(|e| fail(e.to_string()))?),
            ),
            _ => (rest, None),
        };
        let (domain, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.bytes().any(|b| b.is_ascii_uppercase()) =>
            {
                (first, rest)
            }
            _ => (DOCKER_HUB, name),
        };
        if !valid_domain(domain) {
            return Err(fail(format!(
                "{} is not a registry host (DNS name or IP, optionally :port)",
                quote(domain)
            )));
        }
        let domain = if domain == LEGACY_DOCKER_HUB {
            DOCKER_HUB
        } else {
            domain
        };
        if let Some(bad) = path.split('/').find(|c| !valid_component(c)) {
            return Err(fail(format!(
                "path component {} is not lowercase letters and digits joined by '.', '_', '__' or '-'",
                quote(bad)
            )));
        }
        let path = if domain == DOCKER_HUB && !path.contains('/') {
            format!("{OFFICIAL}/{path}")
        } else {
            path.to_owned()
        };
        Ok(ImageRef {
            domain: domain.to_owned(),
            path,
            tag,
            digest,
        })
    }
}

/// The full reference: `docker.io/library/nginx:1.27`, `reg:5000/app@sha256:...`.
impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.path)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// `host`, `host:port`, `[v6]:port`: DNS labels of letters, digits and inner dashes.
fn valid_domain(domain: &str) -> bool {
    let (host, port) = match domain.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && !p.contains(']') => (h, Some(p)),
        _ => (domain, None),
    };
    if port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return !v6.is_empty() && v6.bytes().all(|b| b.is_ascii_hexdigit() || b == b':');
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        })
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|s| s == b'-')) {
            return false;
        }
    }
    true
}

fn alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// Docker's normalisation, as `docker image tag` / `docker pull` apply it.
    #[test]
    fn normalisation() {
        // input => (domain, path, tag, familiar repository)
        type Row<'a> = (&'a str, (&'a str, &'a str, Option<&'a str>, &'a str));
        let table: &[Row<'_>] = &[
            ("nginx", ("docker.io", "library/nginx", None, "nginx")),
            (
                "nginx:1.27",
                ("docker.io", "library/nginx", Some("1.27"), "nginx"),
            ),
            (
                "library/nginx",
                ("docker.io", "library/nginx", None, "nginx"),
            ),
            (
                "docker.io/library/nginx",
                ("docker.io", "library/nginx", None, "nginx"),
            ),
            (
                "docker.io/nginx",
                ("docker.io", "library/nginx", None, "nginx"),
            ),
            (
                "index.docker.io/library/nginx",
                ("docker.io", "library/nginx", None, "nginx"),
            ),
            ("user/app", ("docker.io", "user/app", None, "user/app")),
            (
                "docker.io/user/app:v1",
                ("docker.io", "user/app", Some("v1"), "user/app"),
            ),
            ("localhost/app", ("localhost", "app", None, "localhost/app")),
            (
                "localhost:5000/team/app:v1",
                (
                    "localhost:5000",
                    "team/app",
                    Some("v1"),
                    "localhost:5000/team/app",
                ),
            ),
            (
                "127.0.0.1:5000/app",
                ("127.0.0.1:5000", "app", None, "127.0.0.1:5000/app"),
            ),
            (
                "ghcr.io/o/team/app",
                ("ghcr.io", "o/team/app", None, "ghcr.io/o/team/app"),
            ),
            ("Registry/app", ("Registry", "app", None, "Registry/app")),
            (
                "[::1]:5000/app",
                ("[::1]:5000", "app", None, "[::1]:5000/app"),
            ),
            (
                "123456789012.dkr.ecr.us-east-1.amazonaws.com/app:3f2c",
                (
                    "123456789012.dkr.ecr.us-east-1.amazonaws.com",
                    "app",
                    Some("3f2c"),
                    "123456789012.dkr.ecr.us-east-1.amazonaws.com/app",
                ),
            ),
            (
                "a__b/c--d/e.f_g",
                ("docker.io", "a__b/c--d/e.f_g", None, "a__b/c--d/e.f_g"),
            ),
        ];
        for (input, (domain, path, tag, familiar)) in table {
            let r: ImageRef = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(
                (r.domain(), r.path(), r.tag().map(Tag::as_str)),
                (*domain, *path, *tag),
                "{input}"
            );
            assert_eq!(r.familiar_repository(), *familiar, "{input}");
        }
    }

    #[test]
    fn digests_and_display() {
        let r: ImageRef = format!("reg:5000/app:v1@{D}").parse().expect("ref");
        assert_eq!(r.tag().map(Tag::as_str), Some("v1"));
        assert_eq!(r.digest().map(Digest::as_str), Some(D));
        assert_eq!(r.to_string(), format!("reg:5000/app:v1@{D}"));
        let hub: ImageRef = format!("python@{D}").parse().expect("ref");
        assert_eq!(hub.to_string(), format!("docker.io/library/python@{D}"));
        assert_eq!(hub.repository(), "docker.io/library/python");
        assert_eq!(hub.api_host(), DOCKER_HUB_API);
        assert_eq!(r.api_host(), "reg:5000");
    }

    #[test]
    fn same_repository_whatever_the_spelling() {
        let pinned = format!("python@{D}");
        let same = [
            ("python", "docker.io/library/python:3.12"),
            ("library/python", pinned.as_str()),
            ("index.docker.io/team/app", "team/app:v1"),
            ("127.0.0.1:5000/app", "127.0.0.1:5000/app:v2"),
        ];
        for (a, b) in same {
            let (a, b): (ImageRef, ImageRef) = (a.parse().expect("a"), b.parse().expect("b"));
            assert!(a.same_repository(&b), "{a} {b}");
        }
        let different = [
            ("team/app", "127.0.0.1:5000/team/app"),
            ("localhost/app", "app"),
            ("127.0.0.1:5000/app", "127.0.0.1:5001/app"),
            ("127.0.0.1:5000/library/app", "app"),
        ];
        for (a, b) in different {
            let (a, b): (ImageRef, ImageRef) = (a.parse().expect("a"), b.parse().expect("b"));
            assert!(!a.same_repository(&b), "{a} {b}");
        }
    }

    #[test]
    fn rejected() {
        let table = [
            "",
            "Team/App/x",
            "team/App",
            "app:",
            "app:-x",
            "app@sha256:12",
            "-app",
            "app-",
            "a/./b",
            "e..f",
            "a___b",
            "a//b",
            "host:port/app",
            "reg.example.com:/app",
            "bad_host.com/app",
            "a b",
            "app:v1:v2",
        ];
        for input in table {
            assert!(input.parse::<ImageRef>().is_err(), "{input:?}");
        }
    }
}
