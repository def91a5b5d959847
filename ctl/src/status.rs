//! What the fleet runs: the desired release, the refresh, and each instance with the release
//! its agent reported through the instance tag.

use aws_sdk_ec2::types::Filter;
use skiff_release::Tag;

use crate::aws;

/// The instance tag the agent writes once its release is healthy.
pub const RELEASE_TAG_KEY: &str = "skiff:release";

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InstanceView {
    pub id: String,
    pub zone: Option<String>,
    pub lifecycle: Option<String>,
    pub health: Option<String>,
    pub release: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot describe Auto Scaling Group {asg} ({detail})")]
    DescribeGroup { asg: String, detail: String },
    #[error("Auto Scaling Group {asg} does not exist; check --asg or the stack")]
    NoGroup { asg: String },
    #[error("cannot read the instance tags ({detail})")]
    DescribeTags { detail: String },
}

/// Instances that do not (yet) report the desired release. Pure.
pub fn drift(desired: Option<&Tag>, instances: &[InstanceView]) -> Vec<String> {
    let Some(want) = desired else {
        return Vec::new();
    };
    instances
        .iter()
        .filter(|i| i.release.as_deref() != Some(want.as_str()))
        .map(|i| i.id.clone())
        .collect()
}

/// The group's instances with their reported releases.
pub async fn instances(
    autoscaling: &aws_sdk_autoscaling::Client,
    ec2: &aws_sdk_ec2::Client,
    asg: &str,
) -> Result<Vec<InstanceView>, StatusError> {
    let out = autoscaling
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(asg)
        .send()
        .await
        .map_err(|e| StatusError::DescribeGroup {
            asg: asg.to_owned(),
            detail: aws::describe(&e),
        })?;
    let group = out
        .auto_scaling_groups()
        .first()
        .ok_or_else(|| StatusError::NoGroup {
            asg: asg.to_owned(),
        })?;
    let mut views: Vec<InstanceView> = group
        .instances()
        .iter()
        .map(|i| InstanceView {
            id: i.instance_id().unwrap_or_default().to_owned(),
            zone: i.availability_zone().map(str::to_owned),
            lifecycle: i.lifecycle_state().map(|s| s.as_str().to_owned()),
            health: i.health_status().map(str::to_owned),
            release: None,
        })
        .collect();
    if views.is_empty() {
        return Ok(views);
    }
    let mut pages = ec2
        .describe_tags()
        .filters(
            Filter::builder()
                .name("resource-id")
                .set_values(Some(views.iter().map(|v| v.id.clone()).collect()))
                .build(),
        )
        .filters(
            Filter::builder()
                .name("key")
                .values(RELEASE_TAG_KEY)
                .build(),
        )
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| StatusError::DescribeTags {
            detail: aws::describe(&e),
        })?;
        for t in page.tags() {
            if let Some(v) = views
                .iter_mut()
                .find(|v| Some(v.id.as_str()) == t.resource_id())
            {
                v.release = t.value().map(str::to_owned);
            }
        }
    }
    views.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(views)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, release: Option<&str>) -> InstanceView {
        InstanceView {
            id: id.into(),
            zone: None,
            lifecycle: None,
            health: None,
            release: release.map(Into::into),
        }
    }

    #[test]
    fn drift_table() {
        let v1: Tag = "v1".parse().expect("tag");
        let table: Vec<(Option<&Tag>, Vec<InstanceView>, Vec<&str>)> = vec![
            (
                Some(&v1),
                vec![inst("a", Some("v1")), inst("b", Some("v1"))],
                vec![],
            ),
            (
                Some(&v1),
                vec![inst("a", Some("v0")), inst("b", Some("v1"))],
                vec!["a"],
            ),
            (Some(&v1), vec![inst("a", None)], vec!["a"]),
            (None, vec![inst("a", Some("v0"))], vec![]),
            (Some(&v1), vec![], vec![]),
        ];
        for (desired, instances, want) in table {
            assert_eq!(
                drift(desired, &instances),
                want,
                "{desired:?} {instances:?}"
            );
        }
    }
}
