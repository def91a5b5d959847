//! The load balancer's view of the targets (ELBv2 DescribeTargetHealth): the adapter below
//! `ctl status` and the in-place waits, which both read it.

use crate::aws;

/// One target as the load balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TargetHealth {
    pub id: String,
    pub state: String,
    pub reason: Option<String>,
}

/// Reason code for an instance of the group that is not a target of the group's target group,
/// the code DescribeTargetHealth gives such a target.
/// https://docs.aws.amazon.com/elasticloadbalancing/latest/APIReference/API_TargetHealth.html
pub const NOT_REGISTERED: &str = "Target.NotRegistered";

/// Why the target health is unknown (`ctl status` shows it and goes on; an in-place wait
/// fails on it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum TargetHealthError {
    #[error(
        "target health unknown: no target group (the stack has no TargetGroup output); pass --target-group ARN"
    )]
    NoTargetGroup,
    #[error(
        "target health unknown: elasticloadbalancing:DescribeTargetHealth was denied ({0}); attach the stack's DeployerPolicy (it allows it) to see the load balancer's view"
    )]
    Denied(String),
    #[error("target health unknown: cannot describe the target group's targets ({0})")]
    Describe(String),
}

/// Every target of the target group with its health (DescribeTargetHealth without targets
/// answers for all registered targets).
/// https://docs.aws.amazon.com/elasticloadbalancing/latest/APIReference/API_DescribeTargetHealth.html
pub async fn target_health(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    target_group: &str,
) -> Result<Vec<TargetHealth>, TargetHealthError> {
    let out = elb
        .describe_target_health()
        .target_group_arn(target_group)
        .send()
        .await
        .map_err(|e| {
            let detail = aws::describe(&e);
            match aws::code(&e).as_deref() {
                Some(c) if skiff_release::access::is_denied(c) => TargetHealthError::Denied(detail),
                _ => TargetHealthError::Describe(detail),
            }
        })?;
    Ok(out
        .target_health_descriptions()
        .iter()
        .filter_map(|d| {
            let id = d.target()?.id()?.to_owned();
            let h = d.target_health();
            Some(TargetHealth {
                id,
                state: h
                    .and_then(|h| h.state())
                    .map_or_else(|| "unknown".into(), |s| s.as_str().to_owned()),
                reason: h.and_then(|h| h.reason()).map(|r| r.as_str().to_owned()),
            })
        })
        .collect())
}
