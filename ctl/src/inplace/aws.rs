//! The AWS adapter of [`InPlaceFleet`](super::InPlaceFleet).

use aws_sdk_ec2::types::Tag as Ec2Tag;

use super::*;
use crate::{aws, group};

/// The AWS adapter: the group and its instances' tags through [`group::read`] (Auto Scaling
/// DescribeAutoScalingGroups, EC2 DescribeTags), EC2 CreateTags, ELBv2 DescribeTargetHealth
/// ([`crate::targets`]).
#[derive(Debug, Clone)]
pub struct AwsHosts {
    pub asg: String,
    pub target_group: Option<String>,
    pub autoscaling: aws_sdk_autoscaling::Client,
    pub ec2: aws_sdk_ec2::Client,
    pub elb: aws_sdk_elasticloadbalancingv2::Client,
    /// The release alarms' reader (CloudWatch DescribeAlarms).
    pub cloudwatch: aws_sdk_cloudwatch::Client,
}

impl InPlaceFleet for AwsHosts {
    /// One read of the group ([`group::read`], within EC2's filter limit), its InService
    /// instances kept.
    async fn hosts(&self) -> Result<Vec<Host>, InPlaceError> {
        let g = group::read(&self.autoscaling, &self.ec2, &self.asg).await?;
        Ok(g.members
            .into_iter()
            .filter(|m| m.lifecycle.as_deref() == Some("InService"))
            .map(|m| {
                let mut h = Host {
                    id: m.id,
                    ..Host::default()
                };
                for (k, v) in &m.tags {
                    h.set(k, v);
                }
                h
            })
            .collect())
    }

    async fn tag(&self, ids: &[String], key: &str, value: &str) -> Result<(), InPlaceError> {
        // CreateTags takes many resources in one call and overwrites an existing value.
        // https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_CreateTags.html
        // A throttled write is retried with backoff and jitter (aws::outlast_throttling): a thousand agents
        // answering at once drain the account's CreateTags bucket, and a lost revert is worse
        // than a late one.
        for chunk in ids.chunks(500) {
            aws::outlast_throttling(|| {
                self.ec2
                    .create_tags()
                    .set_resources(Some(chunk.to_vec()))
                    .tags(Ec2Tag::builder().key(key).value(value).build())
                    .send()
            })
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
        let targets = crate::targets::target_health(&self.elb, tg)
            .await
            .map_err(|e| InPlaceError::TargetHealth(e.to_string()))?;
        Ok(Some(targets.into_iter().map(|t| (t.id, t.state)).collect()))
    }

    async fn held(&self) -> Result<Held, InPlaceError> {
        let group = group::describe(&self.autoscaling, &self.asg).await?;
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
            aws::outlast_throttling(|| {
                self.autoscaling
                    .create_or_update_tags()
                    .tags(tag(Some(processes.join(MARK_SEPARATOR))))
                    .send()
            })
            .await
            .map_err(|e| fail("mark as ctl's", aws::describe(&e)))?;
        }
        let done = if suspend {
            aws::outlast_throttling(|| {
                self.autoscaling
                    .suspend_processes()
                    .auto_scaling_group_name(&self.asg)
                    .set_scaling_processes(Some(processes.to_vec()))
                    .send()
            })
            .await
            .map(|_| ())
            .map_err(|e| aws::describe(&e))
        } else {
            aws::outlast_throttling(|| {
                self.autoscaling
                    .resume_processes()
                    .auto_scaling_group_name(&self.asg)
                    .set_scaling_processes(Some(processes.to_vec()))
                    .send()
            })
            .await
            .map(|_| ())
            .map_err(|e| aws::describe(&e))
        };
        done.map_err(|detail| fail(if suspend { "suspend" } else { "resume" }, detail))?;
        if !suspend {
            aws::outlast_throttling(|| self.autoscaling.delete_tags().tags(tag(None)).send())
                .await
                .map_err(|e| fail("unmark", aws::describe(&e)))?;
        }
        Ok(())
    }

    async fn firing(&self, names: &[String]) -> Result<Vec<String>, InPlaceError> {
        use crate::alarms::{AlarmStates, CloudWatchAlarms};
        let reader = CloudWatchAlarms {
            client: self.cloudwatch.clone(),
        };
        Ok(reader.firing(names).await?)
    }
}
