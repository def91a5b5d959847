//! Resolve `repository:tag` to the manifest digest through the registry's v2 API, so a
//! release pins exactly the image that exists now, and never names one that does not.
//!
//! Anonymous access, basic credentials, and the bearer-token challenge flow (Docker Hub, GHCR,
//! ECR-style registries). Plain http only for loopback registries; https otherwise.

use std::future::Future;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, WWW_AUTHENTICATE};
use skiff_release::{Digest, Tag};

/// Every manifest type a tag may point at; the digest of whichever the registry holds is pinned.
const ACCEPT_MANIFESTS: &str = "application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json";

const DOCKER_HUB: &str = "registry-1.docker.io";

/// Resolves an image tag to the digest it points at now.
pub trait DigestResolver {
    fn resolve(
        &self,
        repository: &str,
        tag: &Tag,
    ) -> impl Future<Output = Result<Digest, RegistryError>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "image {image} does not exist in the registry (HTTP 404); push it first, or check the tag"
    )]
    UnknownTag { image: String },
    #[error(
        "the registry refused access to {image} (HTTP {status}); pass --registry-user and SKIFF_REGISTRY_PASSWORD with pull rights"
    )]
    Denied { image: String, status: u16 },
    #[error(
        "cannot reach the registry for {image}: {detail}; check the registry is up, or release with --skip-verify"
    )]
    Unreachable { image: String, detail: String },
    #[error("the registry answered HTTP {status} for {image}: {detail}")]
    Status {
        image: String,
        status: u16,
        detail: String,
    },
    #[error("the token service {realm} failed for {image}: {detail}")]
    Token {
        image: String,
        realm: String,
        detail: String,
    },
    #[error("the registry gave no usable digest for {image}: {detail}")]
    NoDigest { image: String, detail: String },
}

/// Where a repository lives: registry host and the path within it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub host: String,
    pub path: String,
}

impl Location {
    /// Split `reg.example:5000/team/app` (or Docker Hub shorthand like `nginx`). Pure.
    pub fn parse(repository: &str) -> Location {
        match repository.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                let host = if first == "docker.io" {
                    DOCKER_HUB
                } else {
                    first
                };
                let path = if host == DOCKER_HUB && !rest.contains('/') {
                    format!("library/{rest}")
                } else {
                    rest.to_owned()
                };
                Location {
                    host: host.to_owned(),
                    path,
                }
            }
            Some(_) => Location {
                host: DOCKER_HUB.into(),
                path: repository.to_owned(),
            },
            None => Location {
                host: DOCKER_HUB.into(),
                path: format!("library/{repository}"),
            },
        }
    }

    /// Loopback registries (local development, CI) speak plain http; all others https.
    pub fn base_url(&self) -> String {
        let hostname = self
            .host
            .rsplit_once(':')
            .map_or(self.host.as_str(), |(h, _)| h);
        let plain = matches!(hostname, "localhost" | "127.0.0.1" | "[::1]");
        format!("{}://{}", if plain { "http" } else { "https" }, self.host)
    }
}

/// A `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parse `Bearer realm="...",service="...",scope="repository:a/b:pull"` or `Basic realm=...`.
/// Quoted values may contain commas. Pure.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params: Vec<(String, String)> = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = chars.by_ref().take_while(|c| *c != ',').collect();
        }
        params.push((key.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    Some(Challenge::Bearer {
        realm: get("realm")?,
        service: get("service"),
        scope: get("scope"),
    })
}

/// Registry credentials for basic auth, or to obtain a bearer token.
#[derive(Clone, Default)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// [`DigestResolver`] over HTTP with reqwest.
#[derive(Debug, Clone)]
pub struct HttpRegistry {
    http: reqwest::Client,
    credentials: Option<Credentials>,
}

impl HttpRegistry {
    pub fn new(credentials: Option<Credentials>) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .user_agent(concat!("skiff-ctl/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(HttpRegistry { http, credentials })
    }

    async fn manifest(
        &self,
        url: &str,
        image: &str,
        method: reqwest::Method,
        auth: Option<&Auth>,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut req = self
            .http
            .request(method, url)
            .header(ACCEPT, ACCEPT_MANIFESTS);
        match auth {
            Some(Auth::Basic(c)) => req = req.basic_auth(&c.user, Some(&c.password)),
            Some(Auth::Bearer(t)) => req = req.bearer_auth(t),
            None => {}
        }
        req.send().await.map_err(|e| RegistryError::Unreachable {
            image: image.to_owned(),
            detail: error_chain(&e),
        })
    }

    async fn token(
        &self,
        image: &str,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
    ) -> Result<String, RegistryError> {
        let fail = |detail: String| RegistryError::Token {
            image: image.to_owned(),
            realm: realm.to_owned(),
            detail,
        };
        let mut query = Vec::new();
        if let Some(s) = service {
            query.push(("service", s));
        }
        if let Some(s) = scope {
            query.push(("scope", s));
        }
        let mut req = self.http.get(realm).query(&query);
        if let Some(c) = &self.credentials {
            req = req.basic_auth(&c.user, Some(&c.password));
        }
        let resp = req.send().await.map_err(|e| fail(error_chain(&e)))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(RegistryError::Denied {
                image: image.to_owned(),
                status: status.as_u16(),
            });
        }
        if !status.is_success() {
            return Err(fail(format!("HTTP {status}")));
        }
        let body: serde_json::Value = resp.json().await.map_err(|e| fail(error_chain(&e)))?;
        body.get("token")
            .or_else(|| body.get("access_token"))
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| fail("the answer has no token".into()))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

impl DigestResolver for HttpRegistry {
    async fn resolve(&self, repository: &str, tag: &Tag) -> Result<Digest, RegistryError> {
        let image = format!("{repository}:{tag}");
        let loc = Location::parse(repository);
        let url = format!("{}/v2/{}/manifests/{tag}", loc.base_url(), loc.path);
        let mut auth: Option<Auth> = None;
        let mut resp = self
            .manifest(&url, &image, reqwest::Method::HEAD, None)
            .await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|h| h.to_str().ok())
                .and_then(parse_challenge);
            auth = match (challenge, &self.credentials) {
                (
                    Some(Challenge::Bearer {
                        realm,
                        service,
                        scope,
                    }),
                    _,
                ) => {
                    let scope = scope.unwrap_or_else(|| format!("repository:{}:pull", loc.path));
                    let token = self
                        .token(&image, &realm, service.as_deref(), Some(&scope))
                        .await?;
                    Some(Auth::Bearer(token))
                }
                (Some(Challenge::Basic), Some(c)) => Some(Auth::Basic(c.clone())),
                _ => {
                    return Err(RegistryError::Denied { image, status: 401 });
                }
            };
            resp = self
                .manifest(&url, &image, reqwest::Method::HEAD, auth.as_ref())
                .await?;
        }
        // Some registries omit the digest header on HEAD; GET always carries it.
        if resp.status().is_success() && !resp.headers().contains_key("docker-content-digest") {
            resp = self
                .manifest(&url, &image, reqwest::Method::GET, auth.as_ref())
                .await?;
        }
        let status = resp.status();
        match status {
            s if s.is_success() => {}
            StatusCode::NOT_FOUND => return Err(RegistryError::UnknownTag { image }),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(RegistryError::Denied {
                    image,
                    status: status.as_u16(),
                });
            }
            _ => {
                let detail = resp.text().await.unwrap_or_default();
                return Err(RegistryError::Status {
                    image,
                    status: status.as_u16(),
                    detail: skiff_release::quote(&detail),
                });
            }
        }
        let header = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|h| h.to_str().ok())
            .ok_or_else(|| RegistryError::NoDigest {
                image: image.clone(),
                detail: "no Docker-Content-Digest header".into(),
            })?;
        header
            .parse()
            .map_err(|e: skiff_release::ReleaseError| RegistryError::NoDigest {
                image,
                detail: e.to_string(),
            })
    }
}

/// How a manifest request authenticates after a challenge.
#[derive(Debug)]
enum Auth {
    Basic(Credentials),
    Bearer(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let bearer = |realm: &str, service: Option<&str>, scope: Option<&str>| {
            Some(Challenge::Bearer {
                realm: realm.into(),
                service: service.map(Into::into),
                scope: scope.map(Into::into),
            })
        };
        let table: Vec<(&str, Option<Challenge>)> = vec![
            (
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
                bearer(
                    "https://auth.docker.io/token",
                    Some("registry.docker.io"),
                    Some("repository:library/nginx:pull"),
                ),
            ),
            (
                r#"bearer realm="https://ghcr.io/token", scope="repository:o/a:pull,push",service="ghcr.io""#,
                bearer(
                    "https://ghcr.io/token",
                    Some("ghcr.io"),
                    Some("repository:o/a:pull,push"),
                ),
            ),
            (
                r#"Bearer realm=https://x/token"#,
                bearer("https://x/token", None, None),
            ),
            (r#"Basic realm="Registry Realm""#, Some(Challenge::Basic)),
            (r#"Bearer service="x""#, None),
            ("Negotiate abc", None),
            ("", None),
        ];
        for (header, want) in table {
            assert_eq!(parse_challenge(header), want, "{header}");
        }
    }

    #[test]
    fn locations() {
        let table = [
            (
                "127.0.0.1:5000/skiff/app",
                "127.0.0.1:5000",
                "skiff/app",
                "http://127.0.0.1:5000",
            ),
            ("localhost/app", "localhost", "app", "http://localhost"),
            ("ghcr.io/o/app", "ghcr.io", "o/app", "https://ghcr.io"),
            (
                "nginx",
                DOCKER_HUB,
                "library/nginx",
                "https://registry-1.docker.io",
            ),
            (
                "team/app",
                DOCKER_HUB,
                "team/app",
                "https://registry-1.docker.io",
            ),
            (
                "docker.io/nginx",
                DOCKER_HUB,
                "library/nginx",
                "https://registry-1.docker.io",
            ),
            (
                "1.dkr.ecr.eu-west-1.amazonaws.com/app",
                "1.dkr.ecr.eu-west-1.amazonaws.com",
                "app",
                "https://1.dkr.ecr.eu-west-1.amazonaws.com",
            ),
        ];
        for (repo, host, path, base) in table {
            let loc = Location::parse(repo);
            assert_eq!(
                (loc.host.as_str(), loc.path.as_str()),
                (host, path),
                "{repo}"
            );
            assert_eq!(loc.base_url(), base, "{repo}");
        }
    }
}
