//! `SsmSource`: the release, the app's environment and the registry password from AWS Systems
//! Manager Parameter Store. SDK types and errors stay in this module.

use aws_sdk_ssm::Client;
use aws_sdk_ssm::error::{ProvideErrorMetadata, SdkError};
use skiff_release::Release;

use crate::config::valid_env_name;
use crate::source::{ReleaseSource, SourceError, parse_release};

#[derive(Debug, Clone)]
pub struct SsmSource {
    client: Client,
    parameter: String,
}

impl SsmSource {
    pub fn new(client: Client, parameter: String) -> Self {
        SsmSource { client, parameter }
    }

    async fn get(&self, name: &str, what: String) -> Result<String, SourceError> {
        let out = self
            .client
            .get_parameter()
            .name(name)
            .with_decryption(true)
            .send()
            .await
            .map_err(|e| classify(e, what.clone(), name))?;
        out.parameter
            .and_then(|p| p.value)
            .ok_or_else(|| SourceError::Read {
                what,
                detail: "the answer carried no value".into(),
            })
    }
}

impl ReleaseSource for SsmSource {
    fn describe(&self) -> String {
        format!("ssm:{}", self.parameter)
    }

    async fn read_release(&self) -> Result<Release, SourceError> {
        let what = format!("parameter {}", self.parameter);
        let value = self.get(&self.parameter, what.clone()).await?;
        parse_release(what, value)
    }

    async fn read_env(&self, path: &str) -> Result<Vec<(String, String)>, SourceError> {
        let what = format!("env path {path}");
        let mut pages = self
            .client
            .get_parameters_by_path()
            .path(path)
            .recursive(true)
            .with_decryption(true)
            .into_paginator()
            .send();
        let mut env = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify(e, what.clone(), path))?;
            for p in page.parameters.unwrap_or_default() {
                let (Some(name), Some(value)) = (p.name, p.value) else {
                    continue;
                };
                let var = name.strip_prefix(path).unwrap_or(&name).replace('/', "_");
                if !valid_env_name(&var) {
                    // Name only: values are secrets and never logged.
                    tracing::warn!(parameter = %name, "skipping a parameter whose name is not a valid variable name");
                    continue;
                }
                env.push((var, value));
            }
        }
        Ok(env)
    }

    async fn read_secret(&self, name: &str) -> Result<String, SourceError> {
        self.get(name, format!("secret parameter {name}")).await
    }
}

/// `[trust] keys_parameter`: the trusted keys from an SSM String parameter (the stack's
/// `TrustedKeysParameter`, which the instance role may read and the deployer may not write).
#[derive(Debug, Clone)]
pub struct SsmKeys {
    client: Client,
    parameter: String,
}

impl SsmKeys {
    pub fn new(client: Client, parameter: String) -> Self {
        SsmKeys { client, parameter }
    }
}

impl crate::trust::KeySource for SsmKeys {
    fn describe(&self) -> String {
        format!("ssm:{}", self.parameter)
    }

    fn read(&self) -> crate::trust::KeysFuture<'_> {
        Box::pin(async move {
            let what = format!("trusted keys parameter {}", self.parameter);
            let out = self
                .client
                .get_parameter()
                .name(&self.parameter)
                .send()
                .await
                .map_err(|e| classify(e, what, &self.parameter).to_string())?;
            Ok(out.parameter.and_then(|p| p.value).unwrap_or_default())
        })
    }
}

fn classify<E, R>(err: SdkError<E, R>, what: String, name: &str) -> SourceError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match &err {
        SdkError::ServiceError(se) => {
            let code = se.err().code().unwrap_or("Unknown");
            let message = se.err().message().unwrap_or_default();
            let detail = format!("{code}: {message}");
            match code {
                "ParameterNotFound" | "ParameterVersionNotFound" => SourceError::Missing {
                    what,
                    hint: format!(
                        "write it with `ctl release --tag <tag>` or `aws ssm put-parameter --name {name} ...`"
                    ),
                },
                c if skiff_release::access::is_denied(c) => SourceError::Denied { what, detail },
                c if c.contains("Throttl")
                    || c == "InternalServerError"
                    || c == "ServiceUnavailable" =>
                {
                    SourceError::Unreachable { what, detail }
                }
                _ => SourceError::Read { what, detail },
            }
        }
        SdkError::ConstructionFailure(_) => SourceError::Read {
            what,
            detail: format!(
                "{}",
                aws_smithy_types::error::display::DisplayErrorContext(&err)
            ),
        },
        _ => SourceError::Unreachable {
            what,
            detail: format!(
                "{}",
                aws_smithy_types::error::display::DisplayErrorContext(&err)
            ),
        },
    }
}
