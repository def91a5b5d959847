//! The release record in the SSM parameter: read, write with read-back, and its history.
//! SDK types and errors stay in this module.

use std::future::Future;

use aws_sdk_ssm::Client;
use aws_sdk_ssm::types::ParameterType;
use skiff_release::Release;

use crate::aws;

/// One stored value of the parameter.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Stored {
    pub version: i64,
    pub value: String,
    /// The parsed record; `None` when the value does not follow the contract.
    #[serde(skip)]
    pub release: Option<Release>,
    pub modified_at: Option<String>,
    pub modified_by: Option<String>,
}

impl Stored {
    fn new(
        version: i64,
        value: String,
        modified_at: Option<String>,
        modified_by: Option<String>,
    ) -> Self {
        Stored {
            release: Release::parse(&value).ok(),
            version,
            value,
            modified_at,
            modified_by,
        }
    }
}

/// Holds the desired release.
pub trait ReleaseStore {
    /// The current value; `None` when the parameter does not exist yet.
    fn read(&self) -> impl Future<Output = Result<Option<Stored>, StoreError>> + Send;
    /// Write `release`, read it back and check it; returns the new version.
    fn write(&self, release: &Release) -> impl Future<Output = Result<i64, StoreError>> + Send;
    /// Past values, newest first, at most `limit`.
    fn history(&self, limit: usize)
    -> impl Future<Output = Result<Vec<Stored>, StoreError>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot read parameter {parameter} ({detail}); check the name, region and ssm:GetParameter rights"
    )]
    Read { parameter: String, detail: String },
    #[error("cannot write parameter {parameter} ({detail}); check ssm:PutParameter rights")]
    Write { parameter: String, detail: String },
    #[error(
        "parameter {parameter} reads back {found} instead of the value just written; someone else may be releasing, check `ctl history`"
    )]
    ReadBack { parameter: String, found: String },
    #[error("cannot read the history of parameter {parameter} ({detail})")]
    History { parameter: String, detail: String },
}

#[derive(Debug, Clone)]
pub struct SsmStore {
    client: Client,
    parameter: String,
}

impl SsmStore {
    pub fn new(client: Client, parameter: impl Into<String>) -> Self {
        SsmStore {
            client,
            parameter: parameter.into(),
        }
    }
}

fn timestamp(t: Option<&aws_smithy_types::DateTime>) -> Option<String> {
    t.and_then(|d| d.fmt(aws_smithy_types::date_time::Format::DateTime).ok())
}

impl ReleaseStore for SsmStore {
    async fn read(&self) -> Result<Option<Stored>, StoreError> {
        let out = match self
            .client
            .get_parameter()
            .name(&self.parameter)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_parameter_not_found()) =>
            {
                return Ok(None);
            }
            Err(e) => {
                return Err(StoreError::Read {
                    parameter: self.parameter.clone(),
                    detail: aws::describe(&e),
                });
            }
        };
        Ok(out.parameter.map(|p| {
            Stored::new(
                p.version,
                p.value.unwrap_or_default(),
                timestamp(p.last_modified_date.as_ref()),
                None,
            )
        }))
    }

    async fn write(&self, release: &Release) -> Result<i64, StoreError> {
        let value = release.to_value();
        let out = self
            .client
            .put_parameter()
            .name(&self.parameter)
            .value(&value)
            .r#type(ParameterType::String)
            .overwrite(true)
            .send()
            .await
            .map_err(|e| StoreError::Write {
                parameter: self.parameter.clone(),
                detail: aws::describe(&e),
            })?;
        let back = self.read().await?;
        match back {
            Some(s) if s.value == value => Ok(s.version.max(out.version)),
            other => Err(StoreError::ReadBack {
                parameter: self.parameter.clone(),
                found: other.map_or_else(|| "nothing".into(), |s| skiff_release::quote(&s.value)),
            }),
        }
    }

    async fn history(&self, limit: usize) -> Result<Vec<Stored>, StoreError> {
        let mut pages = self
            .client
            .get_parameter_history()
            .name(&self.parameter)
            .into_paginator()
            .send();
        let mut all = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| StoreError::History {
                parameter: self.parameter.clone(),
                detail: aws::describe(&e),
            })?;
            for p in page.parameters.unwrap_or_default() {
                all.push(Stored::new(
                    p.version,
                    p.value.unwrap_or_default(),
                    timestamp(p.last_modified_date.as_ref()),
                    p.last_modified_user,
                ));
            }
        }
        all.sort_by_key(|s| std::cmp::Reverse(s.version));
        all.truncate(limit);
        Ok(all)
    }
}
