//! The Auto Scaling group as ctl reads it: its instances (zone, lifecycle state, health), its
//! suspended processes and tags, and each instance's skiff tags. The one reader of the fleet,
//! shared by `ctl status` and every in-place wait ([`read`]).
//!
//! EC2 takes at most 200 values in one filter and refuses more with `FilterLimitExceeded`
//! (https://docs.aws.amazon.com/AWSEC2/latest/APIReference/Query-Requests-EC2.html#query-filtering),
//! so the instance tags are read with at most [`FILTER_VALUES_MAX`] instance ids per
//! DescribeTags call. With the [`KEYS`] filter a call answers at most 200 x 5 = 1,000 tags, one
//! page of `MaxResults` 1,000: a read costs 1 DescribeAutoScalingGroups and
//! ceil(instances / 200) DescribeTags ([`calls`]).

use std::collections::BTreeMap;

use aws_sdk_ec2::types::Filter;
use skiff_release::instance_tags;

use crate::aws;

/// Most values EC2 takes in one filter.
pub const FILTER_VALUES_MAX: usize = 200;
/// Most items one DescribeTags page answers (its `MaxResults` ranges from 5 to 1,000).
/// https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_DescribeTags.html
pub const DESCRIBE_TAGS_PAGE: i32 = 1000;

/// The instance tags ctl reads: every key of the instance-tag protocol.
pub const KEYS: [&str; 5] = [
    instance_tags::RELEASE,
    instance_tags::TARGET,
    instance_tags::PULL,
    instance_tags::PULLED,
    instance_tags::FAILED,
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("cannot describe Auto Scaling Group {asg} ({detail})")]
    DescribeGroup { asg: String, detail: String },
    #[error("Auto Scaling Group {asg} does not exist; check --asg or the stack")]
    NoGroup { asg: String },
    #[error("cannot read the instance tags ({detail})")]
    DescribeTags { detail: String },
}

/// One instance of the group with its skiff tags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub zone: Option<String>,
    /// `InService`, `Pending:Wait`, ...
    pub lifecycle: Option<String>,
    /// Auto Scaling's health status (Healthy/Unhealthy).
    pub health: Option<String>,
    /// Its [`KEYS`] tags that are set, key -> value.
    pub tags: BTreeMap<String, String>,
}

impl Member {
    pub fn tag(&self, key: &str) -> Option<String> {
        self.tags.get(key).cloned()
    }
}

/// The group as one read saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Group {
    /// Sorted by id.
    pub members: Vec<Member>,
    pub suspended: Vec<String>,
    /// The group's own tags, key -> value.
    pub tags: BTreeMap<String, String>,
}

/// The instance ids of one DescribeTags call each: at most [`FILTER_VALUES_MAX`]. Pure.
pub fn chunks(ids: &[String]) -> std::slice::Chunks<'_, String> {
    ids.chunks(FILTER_VALUES_MAX)
}

/// DescribeTags calls a second ctl allows itself while it waits on a rollout: a quarter of the
/// account's bucket refill (20 a second for a filtered Describe*,
/// https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html), the rest is left
/// to everything else in the account and Region.
pub const DESCRIBE_TAGS_PER_SECOND: u32 = 5;

/// The shortest pause between two reads of a group of `instances` that keeps a wait within
/// [`DESCRIBE_TAGS_PER_SECOND`]: 0.4 s for 250 instances, 1 s for 1,000, 2 s for 2,000. Pure.
pub fn read_interval(instances: usize) -> std::time::Duration {
    let calls = instances.div_ceil(FILTER_VALUES_MAX) as u32;
    std::time::Duration::from_millis(1000) * calls / DESCRIBE_TAGS_PER_SECOND
}

/// The AWS calls one [`read`] of a group of `instances` makes (one DescribeTags page per chunk:
/// a chunk answers at most [`FILTER_VALUES_MAX`] x [`KEYS`] tags). Pure.
pub fn calls(instances: usize) -> usize {
    1 + instances.div_ceil(FILTER_VALUES_MAX)
}

/// The group as DescribeAutoScalingGroups tells it (instances, suspended processes, tags):
/// the one call of every read of the group.
pub async fn describe(
    autoscaling: &aws_sdk_autoscaling::Client,
    asg: &str,
) -> Result<aws_sdk_autoscaling::types::AutoScalingGroup, GroupError> {
    // Retried while throttled (aws::outlast_throttling): many ctl runs and agents share
    // the account's Auto Scaling bucket, and one throttled read must not fail a release.
    let out = aws::outlast_throttling(|| {
        autoscaling
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(asg)
            .send()
    })
    .await
    .map_err(|e| GroupError::DescribeGroup {
        asg: asg.to_owned(),
        detail: aws::describe(&e),
    })?;
    out.auto_scaling_groups()
        .first()
        .cloned()
        .ok_or_else(|| GroupError::NoGroup {
            asg: asg.to_owned(),
        })
}

/// Read the group and its instances' skiff tags.
pub async fn read(
    autoscaling: &aws_sdk_autoscaling::Client,
    ec2: &aws_sdk_ec2::Client,
    asg: &str,
) -> Result<Group, GroupError> {
    let group = &describe(autoscaling, asg).await?;
    let mut members: Vec<Member> = group
        .instances()
        .iter()
        .map(|i| Member {
            id: i.instance_id().unwrap_or_default().to_owned(),
            zone: i.availability_zone().map(str::to_owned),
            lifecycle: i.lifecycle_state().map(|s| s.as_str().to_owned()),
            health: i.health_status().map(str::to_owned),
            tags: BTreeMap::new(),
        })
        .collect();
    members.sort_by(|a, b| a.id.cmp(&b.id));
    let ids: Vec<String> = members.iter().map(|m| m.id.clone()).collect();
    let mut tags = instance_tags_of(ec2, &ids).await?;
    for m in &mut members {
        if let Some(t) = tags.remove(&m.id) {
            m.tags = t;
        }
    }
    let mut suspended: Vec<String> = group
        .suspended_processes()
        .iter()
        .filter_map(|p| p.process_name().map(str::to_owned))
        .collect();
    suspended.sort();
    Ok(Group {
        members,
        suspended,
        tags: group
            .tags()
            .iter()
            .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
            .collect(),
    })
}

/// The [`KEYS`] tags of these instances, id -> key -> value, in chunks of
/// [`FILTER_VALUES_MAX`] ids (each paginated, should a page ever fall short).
pub async fn instance_tags_of(
    ec2: &aws_sdk_ec2::Client,
    ids: &[String],
) -> Result<BTreeMap<String, BTreeMap<String, String>>, GroupError> {
    let mut found: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for chunk in chunks(ids) {
        // https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_DescribeTags.html
        let mut pages = ec2
            .describe_tags()
            .filters(
                Filter::builder()
                    .name("resource-id")
                    .set_values(Some(chunk.to_vec()))
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("key")
                    .set_values(Some(KEYS.iter().map(|k| (*k).to_owned()).collect()))
                    .build(),
            )
            .max_results(DESCRIBE_TAGS_PAGE)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| GroupError::DescribeTags {
                detail: aws::describe(&e),
            })?;
            for t in page.tags() {
                if let (Some(id), Some(key), Some(value)) = (t.resource_id(), t.key(), t.value()) {
                    found
                        .entry(id.to_owned())
                        .or_default()
                        .insert(key.to_owned(), value.to_owned());
                }
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_intervals_keep_describe_tags_within_the_budget() {
        for (instances, ms) in [(0, 0), (6, 200), (250, 400), (1000, 1000), (2000, 2000)] {
            assert_eq!(
                read_interval(instances).as_millis(),
                ms,
                "{instances} instances"
            );
        }
    }

    #[test]
    fn chunks_and_calls_table() {
        // (instances, chunk sizes, calls per read)
        let table: [(usize, &[usize], usize); 6] = [
            (0, &[], 1),
            (1, &[1], 2),
            (200, &[200], 2),
            (201, &[200, 1], 3),
            (250, &[200, 50], 3),
            (1000, &[200, 200, 200, 200, 200], 6),
        ];
        for (n, want, want_calls) in table {
            let ids: Vec<String> = (0..n).map(|i| format!("i-{i}")).collect();
            let got: Vec<usize> = chunks(&ids).map(<[String]>::len).collect();
            assert_eq!(got, want, "{n} instances");
            assert_eq!(calls(n), want_calls, "{n} instances");
        }
        // A chunk's tags fit one page.
        assert!(FILTER_VALUES_MAX * KEYS.len() <= DESCRIBE_TAGS_PAGE as usize);
    }
}
