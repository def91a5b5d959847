//! Over 600 lines: one client for three authentication flows and ECR, read and write, with
//! the tables that pin each flow's rules; its parts share the challenge and the scopes.
//!
//! Resolve `repository:tag` to the manifest digest through the registry's v2 API, so a
//! release pins exactly the image that exists now, and never names one that does not.
//!
//! Anonymous access, basic credentials, the bearer-token challenge flow (Docker Hub, GHCR), and
//! Amazon ECR, whose basic credentials come from `ecr:GetAuthorizationToken` with the AWS
//! identity ctl runs as (never from `docker login` state). Plain http only for loopback
//! registries; https otherwise, with an extra trusted CA when given.

use std::future::Future;
use std::time::Duration;

use aws_config::{Region, SdkConfig};
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, WWW_AUTHENTICATE};
use skiff_release::{Digest, EcrRegistry, ImageRef, Tag};

mod oci;
mod signatures;
pub use signatures::CheckError;

/// Every manifest type a tag may point at; the digest of whichever the registry holds is pinned.
const ACCEPT_MANIFESTS: &str = "application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json";

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
    #[error("{detail}; give the image repository as [host[:port]/]path")]
    Reference { detail: String },
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
    #[error(
        "ecr:GetAuthorizationToken failed for {image}: {detail}; allow ecr:GetAuthorizationToken (and ecr:BatchGetImage on the repository) to the AWS identity running ctl, check its region and credentials, or release with --skip-verify"
    )]
    EcrToken { image: String, detail: String },
    #[error(
        "ECR refused the token of the AWS identity running ctl for {image} (HTTP {status}); allow it ecr:BatchGetImage on the repository (and check the account in the image name)"
    )]
    EcrDenied { image: String, status: u16 },
    #[error("cannot use the registry CA {path}: {detail}; give a PEM certificate file")]
    Ca { path: String, detail: String },
    #[error(
        "the registry's answer for {image} is too large ({size} bytes, at most {max} are read); it is not what skiff stored there"
    )]
    TooLarge { image: String, size: u64, max: u64 },
}

/// Where a repository lives: registry host and the path within it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub host: String,
    pub path: String,
}

impl Location {
    /// Where `repository` (`reg.example:5000/team/app`, or Docker Hub shorthand like `nginx`)
    /// lives, by the contract's image-reference grammar: Docker Hub is reached at its API host,
    /// official images under `library/`. Pure.
    pub fn parse(repository: &str) -> Result<Location, String> {
        let image: ImageRef = repository.parse().map_err(|e| format!("{e}"))?;
        Ok(Location {
            host: image.api_host().to_owned(),
            path: image.path().to_owned(),
        })
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
    /// Where ECR tokens come from, for an ECR repository without explicit credentials.
    ecr: Option<SdkConfig>,
}

impl HttpRegistry {
    pub fn new(credentials: Option<Credentials>) -> Result<Self, reqwest::Error> {
        Self::build(credentials, None)
    }

    /// Also trust the CA certificate(s) in the PEM file `ca` (a registry with a private CA).
    pub fn with_ca(
        credentials: Option<Credentials>,
        ca: &std::path::Path,
    ) -> Result<Self, RegistryError> {
        let fail = |detail: String| RegistryError::Ca {
            path: ca.display().to_string(),
            detail,
        };
        let pem = std::fs::read(ca).map_err(|e| fail(e.to_string()))?;
        let certs =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| fail(error_chain(&e)))?;
        if certs.is_empty() {
            return Err(fail("no certificate in it".into()));
        }
        Self::build(credentials, Some(certs)).map_err(|e| fail(error_chain(&e)))
    }

    fn build(
        credentials: Option<Credentials>,
        extra_roots: Option<Vec<reqwest::Certificate>>,
    ) -> Result<Self, reqwest::Error> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .user_agent(concat!("skiff/", env!("CARGO_PKG_VERSION")));
        for cert in extra_roots.into_iter().flatten() {
            builder = builder.add_root_certificate(cert);
        }
        Ok(HttpRegistry {
            http: builder.build()?,
            credentials,
            ecr: None,
        })
    }

    /// For an ECR repository and no explicit credentials, authenticate with a token from
    /// `ecr:GetAuthorizationToken` (asked for only when the registry challenges).
    pub fn with_ecr_tokens(mut self, sdk: SdkConfig) -> Self {
        self.ecr = Some(sdk);
        self
    }

    /// The credentials to answer a challenge with: the explicit ones, else an ECR token.
    async fn challenge_credentials(
        &self,
        loc: &Location,
        image: &str,
    ) -> Result<Option<Credentials>, RegistryError> {
        if let Some(c) = &self.credentials {
            return Ok(Some(c.clone()));
        }
        match (EcrRegistry::from_host(&loc.host), &self.ecr) {
            (Some(registry), Some(sdk)) => ecr_credentials(sdk, &registry, image).await.map(Some),
            _ => Ok(None),
        }
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
        credentials: Option<&Credentials>,
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
        if let Some(c) = credentials {
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

/// A token from `ecr:GetAuthorizationToken` in the registry's region (from its host name), as
/// basic credentials. The token is base64 of `AWS:<password>`; see
/// https://docs.aws.amazon.com/AmazonECR/latest/APIReference/API_GetAuthorizationToken.html
async fn ecr_credentials(
    sdk: &SdkConfig,
    registry: &EcrRegistry,
    image: &str,
) -> Result<Credentials, RegistryError> {
    let fail = |detail: String| RegistryError::EcrToken {
        image: image.to_owned(),
        detail,
    };
    let conf = aws_sdk_ecr::config::Builder::from(sdk)
        .region(Region::new(registry.region.clone()))
        .build();
    let out = aws_sdk_ecr::Client::from_conf(conf)
        .get_authorization_token()
        .send()
        .await
        .map_err(|e| fail(describe(&e)))?;
    let token = out
        .authorization_data()
        .first()
        .and_then(|d| d.authorization_token())
        .ok_or_else(|| fail("the answer carried no authorization token".into()))?;
    decode_ecr_token(token).map_err(fail)
}

/// `base64("AWS:<password>")` -> basic credentials. Pure.
pub fn decode_ecr_token(token: &str) -> Result<Credentials, String> {
    let bytes = aws_smithy_types::base64::decode(token.trim())
        .map_err(|_| "the authorization token is not base64".to_owned())?;
    let text = String::from_utf8(bytes)
        .map_err(|_| "the authorization token is not UTF-8 text".to_owned())?;
    match text.split_once(':') {
        Some((user, password)) if !user.is_empty() && !password.is_empty() => Ok(Credentials {
            user: user.to_owned(),
            password: password.to_owned(),
        }),
        _ => Err("the authorization token is not of the form user:password".into()),
    }
}

/// An AWS error as `Code: message` when the service answered with one, else its whole chain.
fn describe<E>(err: &E) -> String
where
    E: aws_sdk_ecr::error::ProvideErrorMetadata + std::error::Error,
{
    match (err.code(), err.message()) {
        (Some(code), Some(msg)) => format!("{code}: {msg}"),
        (Some(code), None) => code.to_owned(),
        _ => aws_smithy_types::error::display::DisplayErrorContext(err).to_string(),
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
        let loc =
            Location::parse(repository).map_err(|detail| RegistryError::Reference { detail })?;
        let url = format!("{}/v2/{}/manifests/{tag}", loc.base_url(), loc.path);
        let mut auth: Option<Auth> = None;
        let mut ecr_token = false;
        let mut resp = self
            .manifest(&url, &image, reqwest::Method::HEAD, None)
            .await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|h| h.to_str().ok())
                .and_then(parse_challenge);
            let credentials = self.challenge_credentials(&loc, &image).await?;
            ecr_token = self.credentials.is_none() && credentials.is_some();
            auth = match (challenge, &credentials) {
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
                        .token(
                            &image,
                            credentials.as_ref(),
                            &realm,
                            service.as_deref(),
                            Some(&scope),
                        )
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
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN if ecr_token => {
                return Err(RegistryError::EcrDenied {
                    image,
                    status: status.as_u16(),
                });
            }
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
    fn ecr_tokens() {
        let enc = |s: &str| aws_smithy_types::base64::encode(s);
        let table = [
            (
                enc("AWS:123456789012-auth-token"),
                Some(("AWS", "123456789012-auth-token")),
            ),
            // Passwords may contain colons.
            (enc("AWS:a:b=="), Some(("AWS", "a:b=="))),
            (format!(" {}\n", enc("AWS:x")), Some(("AWS", "x"))),
            (enc("AWS"), None),
            (enc("AWS:"), None),
            (enc(":pw"), None),
            ("%%%".to_owned(), None),
            (
                aws_smithy_types::base64::encode([0xff, 0xfe, b':', b'x']),
                None,
            ),
            (String::new(), None),
        ];
        for (token, want) in table {
            let got = decode_ecr_token(&token).ok();
            assert_eq!(
                got.as_ref().map(|c| (c.user.as_str(), c.password.as_str())),
                want,
                "{token}"
            );
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
                skiff_release::image::DOCKER_HUB_API,
                "library/nginx",
                "https://registry-1.docker.io",
            ),
            (
                "team/app",
                skiff_release::image::DOCKER_HUB_API,
                "team/app",
                "https://registry-1.docker.io",
            ),
            (
                "docker.io/nginx",
                skiff_release::image::DOCKER_HUB_API,
                "library/nginx",
                "https://registry-1.docker.io",
            ),
            (
                "index.docker.io/library/nginx",
                skiff_release::image::DOCKER_HUB_API,
                "library/nginx",
                "https://registry-1.docker.io",
            ),
            (
                "localhost:5000/app",
                "localhost:5000",
                "app",
                "http://localhost:5000",
            ),
            (
                "1.dkr.ecr.eu-west-1.amazonaws.com/app",
                "1.dkr.ecr.eu-west-1.amazonaws.com",
                "app",
                "https://1.dkr.ecr.eu-west-1.amazonaws.com",
            ),
        ];
        for (repo, host, path, base) in table {
            let loc = Location::parse(repo).expect("location");
            assert_eq!(
                (loc.host.as_str(), loc.path.as_str()),
                (host, path),
                "{repo}"
            );
            assert_eq!(loc.base_url(), base, "{repo}");
        }
        assert!(Location::parse("Team/App").is_err());
    }
}
