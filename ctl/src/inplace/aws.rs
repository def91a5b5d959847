//! The AWS adapter of [`InPlaceFleet`](super::InPlaceFleet).

use aws_sdk_ec2::types::{Filter, Tag as Ec2Tag};
use skiff_release::instance_tags;

use super::*;
use crate::aws;

/// The AWS adapter: Auto Scaling DescribeAutoScalingGroups, EC2 DescribeTags and CreateTags,
/// ELBv2 DescribeTargetHealth.
#[derive(Debug, Clone)]
pub struct AwsHosts {
    pub asg: String,
    pub target_group: Option<String>,
    pub autoscaling: aws_sdk_autoscaling::Client,
    pub ec2: aws_sdk_ec2::Client,
    pub elb: aws_sdk_elasticloadbalancingv2::Client,
}

/// The tag keys the rollout reads.
pub const KEYS: [&str; 5] = [
    instance_tags::RELEASE,
    instance_tags::TARGET,
    instance_tags::PULL,
    instance_tags::PULLED,
    instance_tags::FAILED,
];

impl AwsHosts {
    /// The group, as DescribeAutoScalingGroups tells it (instances, suspended processes, tags).
    async fn group(&self) -> Result<aws_sdk_autoscaling::types::AutoScalingGroup, InPlaceError> {
        let out = self
            .autoscaling
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(&self.asg)
            .send()
            .await
            .map_err(|e| InPlaceError::DescribeGroup {
                asg: self.asg.clone(),
                detail: aws::describe(&e),
            })?;
        out.auto_scaling_groups()
            .first()
            .cloned()
            .ok_or_else(|| InPlaceError::NoGroup {
                asg: self.asg.clone(),
            })
    }
}

impl InPlaceFleet for AwsHosts {
    async fn hosts(&self) -> Result<Vec<Host>, InPlaceError> {
        let group = self.group().await?;
        let mut hosts: Vec<Host> = group
            .instances()
            .iter()
            .filter(|i| i.lifecycle_state().map(|s| s.as_str()) == Some("InService"))
            .filter_map(|i| {
                Some(Host {
                    id: i.instance_id()?.to_owned(),
                    ..Host::default()
                })
            })
            .collect();
        if hosts.is_empty() {
            return Ok(hosts);
        }
        // https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_DescribeTags.html
        let mut pages = self
            .ec2
            .describe_tags()
            .filters(
                Filter::builder()
                    .name("resource-id")
                    .set_values(Some(hosts.iter().map(|h| h.id.clone()).collect()))
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("key")
                    .set_values(Some(KEYS.iter().map(|k| (*k).to_owned()).collect()))
                    .build(),
            )
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| InPlaceError::DescribeTags(aws::describe(&e)))?;
            for t in page.tags() {
                let (Some(id), Some(key), Some(value)) = (t.resource_id(), t.key(), t.value())
                else {
                    continue;
                };
                if let Some(h) = hosts.iter_mut().find(|h| h.id == id) {
                    h.set(key, value);
                }
            }
        }
        hosts.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(hosts)
    }

    async fn tag(&self, ids: &[String], key: &str, value: &str) -> Result<(), InPlaceError> {
        // CreateTags takes many resources in one call and overwrites an existing value.
        // https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_CreateTags.html
        for chunk in ids.chunks(500) {
            self.ec2
                .create_tags()
                .set_resources(Some(chunk.to_vec()))
                .tags(Ec2Tag::builder().key(key).value(value).build())
                .send()
                .await
                .map_err(|e| InPlaceError::Tag {
                    key: key.to_owned(),
                    ids: chunk.join(" "),
                    detail: aws::describe(&e),
                })?;
        }
        Ok(())
    }

    async fn health(&self) -> Result<Health, InPlaceError> {
        let Some(tg) = &self.target_group else {
            return Ok(None);
        };
        let targets = crate::status::target_health(&self.elb, tg)
            .await
            .map_err(|e| InPlaceError::TargetHealth(e.to_string()))?;
        Ok(Some(targets.into_iter().map(|t| (t.id, t.state)).collect()))
    }

    async fn held(&self) -> Result<Held, InPlaceError> {
        let group = self.group().await?;
        Ok(Held {
            suspended: group
                .suspended_processes()
                .iter()
                .filter_map(|p| p.process_name().map(str::to_owned))
                .collect(),
            marked: group
                .tags()
                .iter()
                .filter(|t| t.key() == Some(HELD_TAG))
                .filter_map(|t| t.value())
                .flat_map(parse_mark)
                .collect(),
        })
    }

    async fn hold(&self, processes: &[String], suspend: bool) -> Result<(), InPlaceError> {
        if processes.is_empty() {
            return Ok(());
        }
        let fail = |what: &'static str, detail: String| InPlaceError::Hold {
            what,
            processes: processes.join(" "),
            asg: self.asg.clone(),
            detail,
        };
        // https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_CreateOrUpdateTags.html
        let tag = |value: Option<String>| {
            aws_sdk_autoscaling::types::Tag::builder()
                .resource_id(&self.asg)
                .resource_type("auto-scaling-group")
                .key(HELD_TAG)
                .set_value(value)
                .propagate_at_launch(false)
                .build()
        };
        if suspend {
            self.autoscaling
                .create_or_update_tags()
                .tags(tag(Some(processes.join(MARK_SEPARATOR))))
                .send()
                .await
                .map_err(|e| fail("mark as ctl's", aws::describe(&e)))?;
        }
        let done = if suspend {
            self.autoscaling
                .suspend_processes()
                .auto_scaling_group_name(&self.asg)
                .set_scaling_processes(Some(processes.to_vec()))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| aws::describe(&e))
        } else {
            self.autoscaling
                .resume_processes()
                .auto_scaling_group_name(&self.asg)
                .set_scaling_processes(Some(processes.to_vec()))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| aws::describe(&e))
        };
        done.map_err(|detail| fail(if suspend { "suspend" } else { "resume" }, detail))?;
        if !suspend {
            self.autoscaling
                .delete_tags()
                .tags(tag(None))
                .send()
                .await
                .map_err(|e| fail("unmark", aws::describe(&e)))?;
        }
        Ok(())
    }
}
