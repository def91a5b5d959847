//! `EcrIssuer`: pull tokens for an Amazon ECR private registry from `ecr:GetAuthorizationToken`.
//! SDK types and errors stay in this module.
//!
//! The token is base64 of `AWS:<password>` and is valid for 12 hours; it grants what the
//! caller's IAM identity may pull, in any registry it has access to:
//! https://docs.aws.amazon.com/AmazonECR/latest/APIReference/API_GetAuthorizationToken.html and
//! https://docs.aws.amazon.com/AmazonECR/latest/userguide/registry_auth.html

use std::time::SystemTime;

use aws_config::{Region, SdkConfig};
use aws_sdk_ecr::Client;
use aws_sdk_ecr::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_types::error::display::DisplayErrorContext;
use skiff_release::EcrRegistry;

use crate::credentials::{CredentialsError, IssueFuture, PullToken, TokenIssuer};
use crate::runtime::RegistryAuth;

const ACTION: &str = "ecr:GetAuthorizationToken";

#[derive(Debug, Clone)]
pub struct EcrIssuer {
    client: Client,
    registry: EcrRegistry,
}

impl EcrIssuer {
    /// A client from the agent's one SDK configuration, in the registry's own region (taken
    /// from its host name). Building it makes no request.
    pub fn new(sdk: &SdkConfig, registry: EcrRegistry) -> Self {
        let conf = aws_sdk_ecr::config::Builder::from(sdk)
            .region(Region::new(registry.region.clone()))
            .build();
        EcrIssuer::with_client(Client::from_conf(conf), registry)
    }

    pub fn with_client(client: Client, registry: EcrRegistry) -> Self {
        EcrIssuer { client, registry }
    }

    async fn token(&self) -> Result<PullToken, CredentialsError> {
        let registry = self.registry.host.clone();
        // No registryIds: the parameter is deprecated, and the token works for every registry
        // the identity may pull from (see the API reference above).
        let out = self
            .client
            .get_authorization_token()
            .send()
            .await
            .map_err(|e| classify(e, &registry))?;
        let data = out
            .authorization_data()
            .first()
            .ok_or_else(|| CredentialsError::Issue {
                registry: registry.clone(),
                detail: "the answer carried no authorizationData".into(),
            })?;
        let auth =
            decode_token(data.authorization_token().unwrap_or_default()).map_err(|detail| {
                CredentialsError::Issue {
                    registry: registry.clone(),
                    detail,
                }
            })?;
        // No expiry given: treat it as expired, so the token is used once and never cached.
        let expires_at = data
            .expires_at()
            .and_then(|t| SystemTime::try_from(*t).ok())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        Ok(PullToken { auth, expires_at })
    }
}

impl TokenIssuer for EcrIssuer {
    fn registry(&self) -> &str {
        &self.registry.host
    }

    fn issue(&self) -> IssueFuture<'_> {
        Box::pin(self.token())
    }
}

/// `base64("AWS:<password>")` -> user `AWS` and the password (skiff-registry decodes it, as it
/// does for ctl). Pure.
pub fn decode_token(token: &str) -> Result<RegistryAuth, String> {
    skiff_registry::decode_ecr_token(token).map(|c| RegistryAuth {
        username: c.user,
        password: c.password,
    })
}

fn classify<E, R>(err: SdkError<E, R>, registry: &str) -> CredentialsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let registry = registry.to_owned();
    match &err {
        SdkError::ServiceError(se) => {
            let code = se.err().code().unwrap_or("Unknown");
            let detail = format!("{code}: {}", se.err().message().unwrap_or_default());
            match code {
                "AccessDeniedException"
                | "AccessDenied"
                | "UnrecognizedClientException"
                | "InvalidClientTokenId"
                | "InvalidSignatureException"
                | "ExpiredTokenException" => CredentialsError::Denied {
                    action: ACTION,
                    registry,
                    detail,
                },
                _ => CredentialsError::Issue { registry, detail },
            }
        }
        // Missing credentials or region: the message says which.
        SdkError::ConstructionFailure(_) => CredentialsError::Issue {
            registry,
            detail: DisplayErrorContext(&err).to_string(),
        },
        _ => CredentialsError::Unreachable {
            registry,
            detail: DisplayErrorContext(&err).to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use aws_smithy_mocks::{MockResponseInterceptor, RuleMode, create_mock_http_client, mock};
    use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;

    use super::*;
    use crate::credentials::TokenIssuer;

    /// ECR answering HTTP `status` with the error `code` (awsJson1_1's error body), through the
    /// real SDK client and our adapter.
    async fn issue_failing_with(status: u16, code: &'static str) -> CredentialsError {
        let rule =
            mock!(aws_sdk_ecr::Client::get_authorization_token).then_http_response(move || {
                HttpResponse::new(
                    StatusCode::try_from(status).expect("status"),
                    SdkBody::from(format!(
                        r#"{{"__type":"{code}","message":"not allowed here"}}"#
                    )),
                )
            });
        let client = Client::from_conf(
            aws_sdk_ecr::Config::builder()
                .with_test_defaults()
                .region(Region::new("eu-west-1"))
                .http_client(create_mock_http_client())
                .interceptor(
                    MockResponseInterceptor::new()
                        .rule_mode(RuleMode::MatchAny)
                        .with_rule(&rule),
                )
                .build(),
        );
        let registry =
            EcrRegistry::from_host("123456789012.dkr.ecr.eu-west-1.amazonaws.com").expect("ecr");
        EcrIssuer::with_client(client, registry)
            .issue()
            .await
            .expect_err("error")
    }

    #[tokio::test]
    async fn errors_are_classified() {
        for code in [
            "AccessDeniedException",
            "UnrecognizedClientException",
            "ExpiredTokenException",
        ] {
            let e = issue_failing_with(400, code).await;
            assert!(matches!(e, CredentialsError::Denied { .. }), "{code}: {e}");
            assert!(!e.is_retryable(), "{code}");
            let msg = e.to_string();
            assert!(
                msg.contains("ecr:GetAuthorizationToken") && msg.contains("instance role"),
                "{msg}"
            );
        }
        for (status, code) in [(400, "ThrottlingException"), (500, "ServerException")] {
            let e = issue_failing_with(status, code).await;
            assert!(e.is_retryable(), "{code}: {e}");
        }
    }
}
