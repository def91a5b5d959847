//! Manifests and blobs by reference, read and written, for artifacts stored beside an image
//! (cosign signatures). The same authentication as [`DigestResolver`](crate::DigestResolver):
//! anonymous, basic, bearer token (scope `pull`, or `pull,push` to write), ECR tokens.
//!
//! Distribution spec: https://github.com/opencontainers/distribution-spec/blob/main/spec.md
//! (pull a manifest or blob by GET; push a blob by POST `/blobs/uploads/` then PUT
//! `<location>?digest=`; push a manifest by PUT `/manifests/<tag>`). Every body read is bounded.

use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use reqwest::{Method, RequestBuilder, StatusCode};

use crate::{Auth, Challenge, HttpRegistry, Location, RegistryError, error_chain, parse_challenge};

const ACCEPT_OCI: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

impl HttpRegistry {
    /// Send a request built by `build`; on a 401 answer the challenge (with scope `pull` or
    /// `pull,push`) and send it once more.
    async fn authorized(
        &self,
        repository: &str,
        image: &str,
        push: bool,
        build: impl Fn(Option<&Auth>) -> RequestBuilder,
    ) -> Result<reqwest::Response, RegistryError> {
        let unreachable = |e: reqwest::Error| RegistryError::Unreachable {
            image: image.to_owned(),
            detail: error_chain(&e),
        };
        let resp = build(None).send().await.map_err(unreachable)?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let loc = location(repository)?;
        let challenge = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|h| h.to_str().ok())
            .and_then(parse_challenge);
        let credentials = self.challenge_credentials(&loc, image).await?;
        let auth = match (challenge, &credentials) {
            (Some(Challenge::Bearer { realm, service, .. }), _) => {
                let actions = if push { "pull,push" } else { "pull" };
                let scope = format!("repository:{}:{actions}", loc.path);
                let token = self
                    .token(
                        image,
                        credentials.as_ref(),
                        &realm,
                        service.as_deref(),
                        Some(&scope),
                    )
                    .await?;
                Auth::Bearer(token)
            }
            (Some(Challenge::Basic), Some(c)) => Auth::Basic(c.clone()),
            _ => {
                return Err(RegistryError::Denied {
                    image: image.to_owned(),
                    status: 401,
                });
            }
        };
        build(Some(&auth)).send().await.map_err(unreachable)
    }

    fn request(&self, method: Method, url: &str, auth: Option<&Auth>) -> RequestBuilder {
        let req = self.http.request(method, url);
        match auth {
            Some(Auth::Basic(c)) => req.basic_auth(&c.user, Some(&c.password)),
            Some(Auth::Bearer(t)) => req.bearer_auth(t),
            None => req,
        }
    }

    /// The manifest `repository:reference`, or None when the registry has none (404). A body
    /// larger than `max` bytes is refused unread ([`RegistryError::TooLarge`]).
    pub async fn get_manifest(
        &self,
        repository: &str,
        reference: &str,
        max: usize,
    ) -> Result<Option<Vec<u8>>, RegistryError> {
        let loc = location(repository)?;
        let image = format!("{repository}:{reference}");
        let url = format!("{}/v2/{}/manifests/{reference}", loc.base_url(), loc.path);
        let resp = self
            .authorized(repository, &image, false, |auth| {
                self.request(Method::GET, &url, auth)
                    .header(reqwest::header::ACCEPT, ACCEPT_OCI)
            })
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        read_bounded(checked(resp, &image).await?, &image, max)
            .await
            .map(Some)
    }

    /// The blob `digest` of `repository`, at most `max` bytes.
    pub async fn get_blob(
        &self,
        repository: &str,
        digest: &str,
        max: usize,
    ) -> Result<Vec<u8>, RegistryError> {
        let loc = location(repository)?;
        let image = format!("{repository}@{digest}");
        let url = format!("{}/v2/{}/blobs/{digest}", loc.base_url(), loc.path);
        let resp = self
            .authorized(repository, &image, false, |auth| {
                self.request(Method::GET, &url, auth)
            })
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(RegistryError::UnknownTag { image });
        }
        read_bounded(checked(resp, &image).await?, &image, max).await
    }

    /// Upload `bytes` as a blob named by its digest `digest` (a monolithic upload).
    pub async fn put_blob(
        &self,
        repository: &str,
        digest: &str,
        bytes: &[u8],
    ) -> Result<(), RegistryError> {
        let loc = location(repository)?;
        let image = format!("{repository}@{digest}");
        let start = format!("{}/v2/{}/blobs/uploads/", loc.base_url(), loc.path);
        let resp = self
            .authorized(repository, &image, true, |auth| {
                self.request(Method::POST, &start, auth)
                    .header(CONTENT_LENGTH, "0")
            })
            .await?;
        let resp = checked(resp, &image).await?;
        let upload = resp
            .headers()
            .get(LOCATION)
            .and_then(|h| h.to_str().ok())
            .ok_or_else(|| RegistryError::Status {
                image: image.clone(),
                status: resp.status().as_u16(),
                detail: "the upload answer has no Location header".into(),
            })?;
        let upload = if upload.starts_with('/') {
            format!("{}{upload}", loc.base_url())
        } else {
            upload.to_owned()
        };
        let sep = if upload.contains('?') { '&' } else { '?' };
        let put = format!("{upload}{sep}digest={digest}");
        let resp = self
            .authorized(repository, &image, true, |auth| {
                self.request(Method::PUT, &put, auth)
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .body(bytes.to_vec())
            })
            .await?;
        checked(resp, &image).await.map(drop)
    }

    /// Store `manifest` (of `media_type`) under `repository:tag`.
    pub async fn put_manifest(
        &self,
        repository: &str,
        tag: &str,
        media_type: &str,
        manifest: &[u8],
    ) -> Result<(), RegistryError> {
        let loc = location(repository)?;
        let image = format!("{repository}:{tag}");
        let url = format!("{}/v2/{}/manifests/{tag}", loc.base_url(), loc.path);
        let resp = self
            .authorized(repository, &image, true, |auth| {
                self.request(Method::PUT, &url, auth)
                    .header(CONTENT_TYPE, media_type)
                    .body(manifest.to_vec())
            })
            .await?;
        checked(resp, &image).await.map(drop)
    }
}

fn location(repository: &str) -> Result<Location, RegistryError> {
    Location::parse(repository).map_err(|detail| RegistryError::Reference { detail })
}

/// The response when it is a success; the registry's refusal as an error otherwise.
async fn checked(resp: reqwest::Response, image: &str) -> Result<reqwest::Response, RegistryError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Err(RegistryError::Denied {
            image: image.to_owned(),
            status: status.as_u16(),
        });
    }
    let detail = resp.text().await.unwrap_or_default();
    Err(RegistryError::Status {
        image: image.to_owned(),
        status: status.as_u16(),
        detail: skiff_release::quote(&detail),
    })
}

/// The body, refused past `max` bytes: by Content-Length before reading, else while reading.
async fn read_bounded(
    mut resp: reqwest::Response,
    image: &str,
    max: usize,
) -> Result<Vec<u8>, RegistryError> {
    let too_large = |size: u64| RegistryError::TooLarge {
        image: image.to_owned(),
        size,
        max: max as u64,
    };
    if let Some(len) = resp.content_length()
        && len > max as u64
    {
        return Err(too_large(len));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| RegistryError::Unreachable {
        image: image.to_owned(),
        detail: error_chain(&e),
    })? {
        body.extend_from_slice(&chunk);
        if body.len() > max {
            return Err(too_large(body.len() as u64));
        }
    }
    Ok(body)
}
