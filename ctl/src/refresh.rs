//! Over 600 lines: about half is the pure decision's tables (what a refresh state means for a
//! release) beside the adapter they check; splitting them would separate rule from cases.
//!
//! Instance refreshes of the Auto Scaling Group: start, observe, cancel, and the pure decision
//! of what a refresh's state means for a release in progress. A running refresh is also the
//! deploy lock: it ends by itself, so the lock cannot go stale.

use std::future::Future;
use std::time::{Duration, SystemTime};

use aws_sdk_autoscaling::Client;
use aws_sdk_autoscaling::types::{
    AlarmSpecification, InstanceRefresh, InstanceRefreshStatus, RefreshPreferences, RefreshStrategy,
};
use tokio::time::{Instant, sleep};

use crate::aws;

/// The state of one refresh, in our words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum RefreshState {
    Pending,
    InProgress,
    Cancelling,
    Baking,
    RollbackInProgress,
    Successful,
    Failed,
    Cancelled,
    RollbackSuccessful,
    RollbackFailed,
    Unknown,
}

impl RefreshState {
    /// Whether the refresh still holds the group (and so the deploy lock).
    pub fn is_active(self) -> bool {
        matches!(
            self,
            RefreshState::Pending
                | RefreshState::InProgress
                | RefreshState::Cancelling
                | RefreshState::Baking
                | RefreshState::RollbackInProgress
        )
    }

    fn from_sdk(s: Option<&InstanceRefreshStatus>) -> Self {
        match s {
            Some(InstanceRefreshStatus::Pending) => RefreshState::Pending,
            Some(InstanceRefreshStatus::InProgress) => RefreshState::InProgress,
            Some(InstanceRefreshStatus::Cancelling) => RefreshState::Cancelling,
            Some(InstanceRefreshStatus::Baking) => RefreshState::Baking,
            Some(InstanceRefreshStatus::RollbackInProgress) => RefreshState::RollbackInProgress,
            Some(InstanceRefreshStatus::Successful) => RefreshState::Successful,
            Some(InstanceRefreshStatus::Failed) => RefreshState::Failed,
            Some(InstanceRefreshStatus::Cancelled) => RefreshState::Cancelled,
            Some(InstanceRefreshStatus::RollbackSuccessful) => RefreshState::RollbackSuccessful,
            Some(InstanceRefreshStatus::RollbackFailed) => RefreshState::RollbackFailed,
            _ => RefreshState::Unknown,
        }
    }
}

/// One refresh as observed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RefreshInfo {
    pub id: String,
    pub state: RefreshState,
    pub percent: Option<i32>,
    pub reason: Option<String>,
    pub instances_to_update: Option<i32>,
}

impl RefreshInfo {
    fn from_sdk(r: &InstanceRefresh) -> Self {
        RefreshInfo {
            id: r.instance_refresh_id().unwrap_or_default().to_owned(),
            state: RefreshState::from_sdk(r.status()),
            percent: r.percentage_complete(),
            reason: r.status_reason().map(str::to_owned),
            instances_to_update: r.instances_to_update(),
        }
    }
}

/// How the refresh replaces the fleet. The defaults are fast and safe: a new instance comes up
/// before an old one goes (100 % / 200 %), every instance is replaced although the launch
/// template did not change, and the warmup is short because the agent's lifecycle hook gates
/// real readiness.
#[derive(Debug, Clone, PartialEq)]
pub struct RefreshPlan {
    /// How long the refresh waits after the last replacement before it counts as successful
    /// (the refresh's BakeTime; alarms keep watching meanwhile).
    pub bake_time: Option<Duration>,
    pub min_healthy: i32,
    pub max_healthy: i32,
    pub warmup: Duration,
    pub checkpoints: Vec<i32>,
    pub checkpoint_delay: Option<Duration>,
    pub alarms: Vec<String>,
    /// How long the alarms need to be able to fire ([`crate::alarms::window`] by default): a
    /// refresh watching them bakes at least this long.
    pub alarm_window: Duration,
}

impl RefreshPlan {
    /// The plan of the refresh that rolls the fleet back: the same, watching no alarm. The
    /// alarm that failed the release is still in ALARM and would fail the refresh that cures
    /// it; the release it returns to ran before (see [`crate::alarms`]).
    pub fn for_rollback(&self) -> RefreshPlan {
        RefreshPlan {
            alarms: Vec::new(),
            ..self.clone()
        }
    }
}

impl Default for RefreshPlan {
    fn default() -> Self {
        RefreshPlan {
            bake_time: None,
            min_healthy: 100,
            max_healthy: 200,
            warmup: Duration::from_secs(30),
            checkpoints: Vec::new(),
            checkpoint_delay: None,
            alarms: Vec::new(),
            alarm_window: crate::alarms::window(),
        }
    }
}

/// Rolls the group's instances.
pub trait InstanceRefresher {
    /// The newest refresh of the group, if any.
    fn latest(&self) -> impl Future<Output = Result<Option<RefreshInfo>, RefreshError>> + Send;
    /// Start a refresh; returns its id.
    fn start(
        &self,
        plan: &RefreshPlan,
    ) -> impl Future<Output = Result<String, RefreshError>> + Send;
    fn describe(&self, id: &str) -> impl Future<Output = Result<RefreshInfo, RefreshError>> + Send;
    fn cancel(&self) -> impl Future<Output = Result<(), RefreshError>> + Send;
    /// The group's scaling activities that started at or after `since`, newest first.
    fn activities(
        &self,
        since: SystemTime,
    ) -> impl Future<Output = Result<Vec<Activity>, RefreshError>> + Send;
}

/// One scaling activity of the group, in our words.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Activity {
    pub id: String,
    pub description: String,
    pub cause: String,
    /// The activity's StatusCode (`Successful`, `Failed`, `Cancelled`, ...).
    pub status: String,
    pub message: Option<String>,
}

/// Whether an activity shows a launch of this release failing: a launch that failed or was
/// abandoned (the agent completes the launch hook with ABANDON when the release cannot start,
/// or the hook timed out), or an instance replaced because it failed a health check. Pure.
///
/// The wording is AWS's: an abandoned launch reads "Launching a new EC2 instance: i-... Status
/// Reason: Instance failed to complete user's Lifecycle Action: Lifecycle Action with token ...
/// was abandoned: Lifecycle Action Completed with ABANDON Result"
/// (https://aws.amazon.com/premiumsupport/knowledge-center/lifecycle-actions-code-deploy/); an
/// unhealthy replacement has the cause "... an instance was taken out of service in response to
/// an ELB system health check failure" or "... an EC2 instance status checks failure"
/// (https://docs.aws.amazon.com/autoscaling/ec2/userguide/replace-unhealthy-instance.html,
/// https://repost.aws/knowledge-center/auto-scaling-instance-how-terminated). The refresh's own
/// terminations ("in response to an instance refresh") do not count.
pub fn launch_failure(a: &Activity) -> Option<String> {
    let text = format!("{} {}", a.description, a.message.as_deref().unwrap_or(""));
    let launching = a.description.starts_with("Launching");
    let abandoned = text.contains("was abandoned") || text.contains("ABANDON");
    if launching && (abandoned || matches!(a.status.as_str(), "Failed" | "Cancelled")) {
        return Some(format!("a launch failed ({}): {}", a.status, text.trim()));
    }
    let out_of_service = a.cause.contains("taken out of service in response to");
    let health = a.cause.contains("health check") || a.cause.contains("status check");
    if a.description.starts_with("Terminating") && out_of_service && health {
        return Some(format!(
            "an instance was replaced as unhealthy: {} ({})",
            a.description, a.cause
        ));
    }
    None
}

#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error(
        "an instance refresh is already running on group {asg}; wait for it (`ctl status`) and retry"
    )]
    InProgress { asg: String },
    #[error("cannot start an instance refresh on group {asg} ({detail})")]
    Start { asg: String, detail: String },
    #[error("cannot describe the instance refreshes of group {asg} ({detail})")]
    Describe { asg: String, detail: String },
    #[error("instance refresh {id} of group {asg} is not known to Auto Scaling")]
    Missing { asg: String, id: String },
    #[error("cannot cancel the instance refresh of group {asg} ({detail})")]
    Cancel { asg: String, detail: String },
    #[error(
        "cannot read the scaling activities of group {asg} ({detail}); check autoscaling:DescribeScalingActivities rights"
    )]
    Activities { asg: String, detail: String },
    #[error("cannot refresh group {asg} within the load balancer's target quota: {detail}")]
    TargetQuota { asg: String, detail: String },
}

/// Targets one target group takes (and one Application Load Balancer over all its target
/// groups): https://docs.aws.amazon.com/elasticloadbalancing/latest/application/load-balancer-limits.html
pub const TARGETS_PER_TARGET_GROUP: i32 = 1000;

/// The MaxHealthyPercentage a refresh of a group of `desired` instances in a target group may
/// use so that the instances it keeps and those it launches fit [`TARGETS_PER_TARGET_GROUP`] in
/// the target group, and, beside the `others` targets the load balancer's other target groups
/// hold (other branches on a shared load balancer), the same quota of the load balancer:
/// `max` when it fits, lower when not, an error saying what to pass when nothing is left above
/// `min` (a 1,000-instance group at 100 % / 200 % would register 2,000 targets and every launch
/// past the quota fails). Pure.
pub fn max_healthy_within_targets(
    desired: i32,
    min: i32,
    max: i32,
    others: i32,
) -> Result<i32, String> {
    if desired <= 0 {
        return Ok(max);
    }
    let room = (TARGETS_PER_TARGET_GROUP - others.max(0)).max(0);
    let shared = if others > 0 {
        format!(
            " (the load balancer's other target groups hold {others} of its {TARGETS_PER_TARGET_GROUP})"
        )
    } else {
        String::new()
    };
    if desired > room {
        return Err(format!(
            "its {desired} instances are more than the {room} targets left{shared}; split the group{}",
            if others > 0 {
                ", or move it or the other target groups to another load balancer"
            } else {
                ""
            }
        ));
    }
    let fit = (room * 100 / desired).min(200);
    let allowed = max.min(fit);
    if allowed <= min {
        return Err(format!(
            "{desired} instances may be at most {allowed} % of the group at once ({room} targets{shared}), which leaves no room above --min-healthy {min}: pass --min-healthy {} or lower (terminate-first batches), or release with --strategy in-place",
            allowed.saturating_sub(10).max(0)
        ));
    }
    Ok(allowed)
}

/// [`InstanceRefresher`] over the Auto Scaling API.
#[derive(Debug, Clone)]
pub struct AsgRefresher {
    client: Client,
    asg: String,
    /// Reads the load balancers' other target groups for the target quota; without it only
    /// the group's own targets count.
    elb: Option<aws_sdk_elasticloadbalancingv2::Client>,
}

impl AsgRefresher {
    pub fn new(client: Client, asg: impl Into<String>) -> Self {
        AsgRefresher {
            client,
            asg: asg.into(),
            elb: None,
        }
    }

    /// Count the targets of the other target groups on the group's load balancers too.
    pub fn with_elb(mut self, elb: aws_sdk_elasticloadbalancingv2::Client) -> Self {
        self.elb = Some(elb);
        self
    }

    /// The most targets that other target groups hold on any load balancer the group's target
    /// groups belong to (ELBv2 DescribeTargetGroups, DescribeTargetHealth): a shared load
    /// balancer counts every branch's targets against its quota.
    async fn others_on_balancers(&self, own: &[String]) -> Result<i32, String> {
        let Some(elb) = &self.elb else {
            return Ok(0);
        };
        let mine = aws::outlast_throttling(|| {
            elb.describe_target_groups()
                .set_target_group_arns(Some(own.to_vec()))
                .send()
        })
        .await
        .map_err(|e| aws::describe(&e))?;
        let mut balancers: Vec<String> = mine
            .target_groups()
            .iter()
            .flat_map(|t| t.load_balancer_arns().iter().cloned())
            .collect();
        balancers.sort();
        balancers.dedup();
        let mut most = 0;
        for lb in balancers {
            let mut others = 0;
            let mut marker: Option<String> = None;
            loop {
                let page = aws::outlast_throttling(|| {
                    elb.describe_target_groups()
                        .load_balancer_arn(&lb)
                        .set_marker(marker.clone())
                        .send()
                })
                .await
                .map_err(|e| aws::describe(&e))?;
                for tg in page.target_groups() {
                    let Some(arn) = tg.target_group_arn() else {
                        continue;
                    };
                    if own.iter().any(|o| o == arn) {
                        continue;
                    }
                    let health = aws::outlast_throttling(|| {
                        elb.describe_target_health().target_group_arn(arn).send()
                    })
                    .await
                    .map_err(|e| aws::describe(&e))?;
                    others += i32::try_from(health.target_health_descriptions().len())
                        .unwrap_or(i32::MAX);
                }
                marker = page.next_marker().map(str::to_owned);
                if marker.is_none() {
                    break;
                }
            }
            most = most.max(others);
        }
        Ok(most)
    }
}

impl AsgRefresher {
    /// `plan.max_healthy`, lowered to what the group's target group takes
    /// ([`max_healthy_within_targets`]); the plan's own when the group cannot be read (the
    /// refresh then fails on its launches, as it would without this check) or has no target
    /// group.
    async fn max_healthy_for_targets(&self, plan: &RefreshPlan) -> Result<i32, RefreshError> {
        let group = match self
            .client
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(&self.asg)
            .send()
            .await
        {
            Ok(out) => out.auto_scaling_groups().first().cloned(),
            Err(e) => {
                tracing::warn!(
                    "cannot read group {} to size the refresh to the target quota ({}); starting with --max-healthy {}",
                    self.asg,
                    aws::describe(&e),
                    plan.max_healthy
                );
                None
            }
        };
        let Some(g) = group.filter(|g| !g.target_group_arns().is_empty()) else {
            return Ok(plan.max_healthy);
        };
        let desired = g.desired_capacity().unwrap_or(0);
        let others = match self.others_on_balancers(g.target_group_arns()).await {
            Ok(n) => n,
            Err(detail) => {
                tracing::warn!(
                    "cannot count the other target groups' targets on group {}'s load balancer ({detail}); sizing the refresh to its own target group only (grant elasticloadbalancing:DescribeTargetGroups)",
                    self.asg
                );
                0
            }
        };
        let allowed =
            max_healthy_within_targets(desired, plan.min_healthy, plan.max_healthy, others)
                .map_err(|detail| RefreshError::TargetQuota {
                    asg: self.asg.clone(),
                    detail,
                })?;
        if allowed < plan.max_healthy {
            tracing::warn!(
                "group {}: {desired} instances at --max-healthy {} would pass the {TARGETS_PER_TARGET_GROUP}-target quota; refreshing with {allowed} %",
                self.asg,
                plan.max_healthy
            );
        }
        Ok(allowed)
    }
}

impl InstanceRefresher for AsgRefresher {
    async fn latest(&self) -> Result<Option<RefreshInfo>, RefreshError> {
        let out = self
            .client
            .describe_instance_refreshes()
            .auto_scaling_group_name(&self.asg)
            .max_records(1)
            .send()
            .await
            .map_err(|e| RefreshError::Describe {
                asg: self.asg.clone(),
                detail: aws::describe(&e),
            })?;
        Ok(out.instance_refreshes().first().map(RefreshInfo::from_sdk))
    }

    async fn start(&self, plan: &RefreshPlan) -> Result<String, RefreshError> {
        let max_healthy = self.max_healthy_for_targets(plan).await?;
        let mut prefs = RefreshPreferences::builder()
            .skip_matching(false)
            .min_healthy_percentage(plan.min_healthy)
            .max_healthy_percentage(max_healthy)
            .instance_warmup(secs(plan.warmup));
        if !plan.checkpoints.is_empty() {
            prefs = prefs.set_checkpoint_percentages(Some(plan.checkpoints.clone()));
        }
        if let Some(d) = plan.checkpoint_delay {
            prefs = prefs.checkpoint_delay(secs(d));
        }
        // Watching alarms, the refresh bakes long enough for them to fire (crate::alarms).
        let bake = crate::alarms::refresh_bake(plan.bake_time, &plan.alarms, plan.alarm_window);
        if bake != plan.bake_time {
            tracing::info!(
                "the refresh bakes {}s after its last replacement so that its alarms can fire",
                bake.map_or(0, |b| b.as_secs())
            );
        }
        if let Some(b) = bake {
            prefs = prefs.bake_time(secs(b));
        }
        // AutoRollback stays off (the default): ctl owns the rollback, see crate::alarms.
        if !plan.alarms.is_empty() {
            prefs = prefs.alarm_specification(
                AlarmSpecification::builder()
                    .set_alarms(Some(plan.alarms.clone()))
                    .build(),
            );
        }
        let out = self
            .client
            .start_instance_refresh()
            .auto_scaling_group_name(&self.asg)
            .strategy(RefreshStrategy::Rolling)
            .preferences(prefs.build())
            .send()
            .await
            .map_err(|e| {
                if e.as_service_error()
                    .is_some_and(|s| s.is_instance_refresh_in_progress_fault())
                {
                    RefreshError::InProgress {
                        asg: self.asg.clone(),
                    }
                } else {
                    RefreshError::Start {
                        asg: self.asg.clone(),
                        detail: aws::describe(&e),
                    }
                }
            })?;
        out.instance_refresh_id.ok_or_else(|| RefreshError::Start {
            asg: self.asg.clone(),
            detail: "the answer carried no refresh id".into(),
        })
    }

    async fn describe(&self, id: &str) -> Result<RefreshInfo, RefreshError> {
        let out = self
            .client
            .describe_instance_refreshes()
            .auto_scaling_group_name(&self.asg)
            .instance_refresh_ids(id)
            .send()
            .await
            .map_err(|e| RefreshError::Describe {
                asg: self.asg.clone(),
                detail: aws::describe(&e),
            })?;
        out.instance_refreshes()
            .iter()
            .find(|r| r.instance_refresh_id() == Some(id))
            .map(RefreshInfo::from_sdk)
            .ok_or_else(|| RefreshError::Missing {
                asg: self.asg.clone(),
                id: id.to_owned(),
            })
    }

    async fn cancel(&self) -> Result<(), RefreshError> {
        match self
            .client
            .cancel_instance_refresh()
            .auto_scaling_group_name(&self.asg)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // Already over: nothing to cancel.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_active_instance_refresh_not_found_fault()) =>
            {
                Ok(())
            }
            Err(e) => Err(RefreshError::Cancel {
                asg: self.asg.clone(),
                detail: aws::describe(&e),
            }),
        }
    }

    async fn activities(&self, since: SystemTime) -> Result<Vec<Activity>, RefreshError> {
        // Newest first; a release replaces a group's instances a few at a time, so the newest
        // page covers what happened since the last look.
        let out = self
            .client
            .describe_scaling_activities()
            .auto_scaling_group_name(&self.asg)
            .max_records(50)
            .send()
            .await
            .map_err(|e| RefreshError::Activities {
                asg: self.asg.clone(),
                detail: aws::describe(&e),
            })?;
        let since = aws_smithy_types::DateTime::from(since);
        Ok(out
            .activities()
            .iter()
            .filter(|a| a.start_time().is_some_and(|t| t.secs() >= since.secs()))
            .map(|a| Activity {
                id: a.activity_id().unwrap_or_default().to_owned(),
                description: a.description().unwrap_or_default().to_owned(),
                cause: a.cause().unwrap_or_default().to_owned(),
                status: a
                    .status_code()
                    .map(|c| c.as_str().to_owned())
                    .unwrap_or_default(),
                message: a.status_message().map(str::to_owned),
            })
            .collect())
    }
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

/// What following a refresh should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    Succeeded,
    Failed,
    TimedOut,
}

/// The follow decision: a refresh's state and how long it has run against the timeout. Pure.
pub fn judge(state: RefreshState, elapsed: Duration, timeout: Duration) -> Verdict {
    match state {
        RefreshState::Successful => Verdict::Succeeded,
        RefreshState::Failed
        | RefreshState::Cancelled
        | RefreshState::RollbackSuccessful
        | RefreshState::RollbackFailed => Verdict::Failed,
        RefreshState::Pending
        | RefreshState::InProgress
        | RefreshState::Cancelling
        | RefreshState::Baking
        | RefreshState::RollbackInProgress
        | RefreshState::Unknown => {
            if elapsed >= timeout {
                Verdict::TimedOut
            } else {
                Verdict::Continue
            }
        }
    }
}

/// How a followed refresh ended.
#[derive(Debug, Clone, PartialEq)]
pub enum FollowEnd {
    Succeeded(RefreshInfo),
    Failed(RefreshInfo),
    TimedOut(RefreshInfo),
    /// A launch of the new instances failed (see [`launch_failure`]); the refresh still runs.
    LaunchFailed(RefreshInfo, String),
}

/// Consecutive failed observations tolerated before the state counts as unknown.
const DESCRIBE_ATTEMPTS: u32 = 5;

/// Observe refresh `id` every `poll` until it ends or `timeout` passes, reporting each
/// observation. Transient describe failures are retried; after several in a row the error is
/// returned (the state is then unknown). With `launches_since`, the group's scaling activities
/// since then are checked at each observation too, and a failed launch ends the follow at
/// once instead of at the refresh's failure or the timeout; failing to read them only warns.
pub async fn follow<R: InstanceRefresher>(
    refresher: &R,
    id: &str,
    timeout: Duration,
    poll: Duration,
    launches_since: Option<SystemTime>,
    mut observe: impl FnMut(&RefreshInfo),
) -> Result<FollowEnd, RefreshError> {
    let started = Instant::now();
    let mut failures = 0;
    loop {
        let info = match refresher.describe(id).await {
            Ok(info) => {
                failures = 0;
                info
            }
            Err(e) => {
                failures += 1;
                if failures >= DESCRIBE_ATTEMPTS || started.elapsed() >= timeout {
                    return Err(e);
                }
                tracing::warn!(error = %e, "retrying");
                sleep(poll).await;
                continue;
            }
        };
        observe(&info);
        if let Some(since) = launches_since
            && info.state.is_active()
        {
            match refresher.activities(since).await {
                Ok(list) => {
                    if let Some(why) = list.iter().find_map(launch_failure) {
                        return Ok(FollowEnd::LaunchFailed(info, why));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check the launches; following the refresh only")
                }
            }
        }
        match judge(info.state, started.elapsed(), timeout) {
            Verdict::Continue => {}
            Verdict::Succeeded => return Ok(FollowEnd::Succeeded(info)),
            Verdict::Failed => return Ok(FollowEnd::Failed(info)),
            Verdict::TimedOut => return Ok(FollowEnd::TimedOut(info)),
        }
        let left = timeout.saturating_sub(started.elapsed());
        sleep(poll.min(left)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn max_healthy_fits_the_target_quota() {
        let tooth = |r: Result<i32, String>| r.map_err(|e| e.split(':').next().map(str::to_owned));
        for (desired, min, max, others, want) in [
            (0, 100, 200, 0, Ok(200)),
            (6, 100, 200, 0, Ok(200)),
            (500, 100, 200, 0, Ok(200)),
            (600, 100, 200, 0, Ok(166)),
            (600, 100, 150, 0, Ok(150)),
            (1000, 90, 200, 0, Ok(100)),
            (1000, 100, 200, 0, Err(Some("1000 instances may be at most 100 % of the group at once (1000 targets), which leaves no room above --min-healthy 100".to_owned()))),
            (1001, 90, 200, 0, Err(Some("its 1001 instances are more than the 1000 targets left; split the group".to_owned()))),
            // a shared load balancer: other branches' targets count against its quota
            (6, 100, 200, 600, Ok(200)),
            (300, 100, 200, 600, Ok(133)),
            (400, 100, 200, 600, Err(Some("400 instances may be at most 100 % of the group at once (400 targets (the load balancer's other target groups hold 600 of its 1000)), which leaves no room above --min-healthy 100".to_owned()))),
            (400, 90, 200, 600, Ok(100)),
            (500, 90, 200, 600, Err(Some("its 500 instances are more than the 400 targets left (the load balancer's other target groups hold 600 of its 1000); split the group, or move it or the other target groups to another load balancer".to_owned()))),
            (1, 100, 200, 1200, Err(Some("its 1 instances are more than the 0 targets left (the load balancer's other target groups hold 1200 of its 1000); split the group, or move it or the other target groups to another load balancer".to_owned()))),
        ] {
            assert_eq!(
                tooth(max_healthy_within_targets(desired, min, max, others)),
                want,
                "{desired} instances, {min}/{max}, {others} others"
            );
        }
        let advice = max_healthy_within_targets(1000, 100, 200, 0).expect_err("no room");
        assert!(advice.contains("--min-healthy 90 or lower"), "{advice}");
    }

    #[test]
    fn judge_table() {
        use RefreshState::*;
        let t = Duration::from_secs(1800);
        let early = Duration::from_secs(10);
        let late = Duration::from_secs(1800);
        let table = [
            (Pending, early, Verdict::Continue),
            (InProgress, early, Verdict::Continue),
            (Baking, early, Verdict::Continue),
            (Cancelling, early, Verdict::Continue),
            (RollbackInProgress, early, Verdict::Continue),
            (Unknown, early, Verdict::Continue),
            (InProgress, late, Verdict::TimedOut),
            (Pending, late, Verdict::TimedOut),
            (Successful, early, Verdict::Succeeded),
            (Successful, late, Verdict::Succeeded),
            (Failed, early, Verdict::Failed),
            (Cancelled, early, Verdict::Failed),
            (RollbackSuccessful, early, Verdict::Failed),
            (RollbackFailed, late, Verdict::Failed),
        ];
        for (state, elapsed, want) in table {
            assert_eq!(
                judge(state, elapsed, t),
                want,
                "{state:?} after {elapsed:?}"
            );
        }
    }

    #[test]
    fn active_states_hold_the_lock() {
        use RefreshState::*;
        for s in [Pending, InProgress, Cancelling, Baking, RollbackInProgress] {
            assert!(s.is_active(), "{s:?}");
        }
        for s in [
            Successful,
            Failed,
            Cancelled,
            RollbackSuccessful,
            RollbackFailed,
            Unknown,
        ] {
            assert!(!s.is_active(), "{s:?}");
        }
    }

    /// Answers describe calls from a script, repeating the last answer.
    struct FakeRefresher {
        script: Mutex<Vec<Result<RefreshState, ()>>>,
        activities: Vec<Activity>,
    }

    impl FakeRefresher {
        fn new(mut script: Vec<Result<RefreshState, ()>>) -> Self {
            script.reverse();
            FakeRefresher {
                script: Mutex::new(script),
                activities: Vec::new(),
            }
        }
    }

    impl InstanceRefresher for FakeRefresher {
        async fn latest(&self) -> Result<Option<RefreshInfo>, RefreshError> {
            Ok(None)
        }
        async fn start(&self, _plan: &RefreshPlan) -> Result<String, RefreshError> {
            Ok("r-1".into())
        }
        async fn describe(&self, id: &str) -> Result<RefreshInfo, RefreshError> {
            let mut s = self.script.lock().expect("lock");
            let next = if s.len() > 1 {
                s.pop()
            } else {
                s.last().cloned()
            };
            match next.expect("script") {
                Ok(state) => Ok(RefreshInfo {
                    id: id.into(),
                    state,
                    percent: None,
                    reason: None,
                    instances_to_update: None,
                }),
                Err(()) => Err(RefreshError::Describe {
                    asg: "g".into(),
                    detail: "Throttling".into(),
                }),
            }
        }
        async fn cancel(&self) -> Result<(), RefreshError> {
            Ok(())
        }
        async fn activities(&self, _since: SystemTime) -> Result<Vec<Activity>, RefreshError> {
            Ok(self.activities.clone())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn follow_ends_on_success_after_transient_errors() {
        let f = FakeRefresher::new(vec![
            Ok(RefreshState::Pending),
            Err(()),
            Ok(RefreshState::InProgress),
            Ok(RefreshState::Successful),
        ]);
        let mut seen = 0;
        let end = follow(
            &f,
            "r-1",
            Duration::from_secs(1800),
            Duration::from_secs(15),
            None,
            |_| seen += 1,
        )
        .await
        .expect("follow");
        assert!(matches!(end, FollowEnd::Succeeded(_)), "{end:?}");
        assert_eq!(seen, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn follow_times_out_at_the_timeout() {
        let f = FakeRefresher::new(vec![Ok(RefreshState::InProgress)]);
        let start = Instant::now();
        let end = follow(
            &f,
            "r-1",
            Duration::from_secs(1800),
            Duration::from_secs(15),
            None,
            |_| {},
        )
        .await
        .expect("follow");
        assert!(matches!(end, FollowEnd::TimedOut(_)), "{end:?}");
        assert_eq!(start.elapsed(), Duration::from_secs(1800));
    }

    #[tokio::test(start_paused = true)]
    async fn follow_gives_up_after_repeated_errors() {
        let f = FakeRefresher::new(vec![Err(())]);
        let err = follow(
            &f,
            "r-1",
            Duration::from_secs(1800),
            Duration::from_secs(15),
            None,
            |_| {},
        )
        .await
        .expect_err("unknown");
        assert!(err.to_string().contains("Throttling"), "{err}");
    }

    fn activity(description: &str, cause: &str, status: &str, message: Option<&str>) -> Activity {
        Activity {
            id: "a-1".into(),
            description: description.into(),
            cause: cause.into(),
            status: status.into(),
            message: message.map(str::to_owned),
        }
    }

    #[test]
    fn launch_failure_table() {
        let refresh_cause = "At 2026-01-01T00:00:00Z an instance was taken out of service in response to an instance refresh.";
        let table = [
            (
                "launch abandoned by the hook",
                activity(
                    "Launching a new EC2 instance: i-1. Status Reason: Instance failed to complete user's Lifecycle Action: Lifecycle Action with token t was abandoned: Lifecycle Action Completed with ABANDON Result",
                    "At 2026-01-01T00:00:00Z an instance was launched in response to an instance refresh.",
                    "Cancelled",
                    None,
                ),
                Some("a launch failed"),
            ),
            (
                "launch hook timed out",
                activity(
                    "Launching a new EC2 instance: i-2",
                    "",
                    "Cancelled",
                    Some(
                        "Instance failed to complete user's Lifecycle Action: Lifecycle Action with token t was abandoned: Heartbeat Timeout",
                    ),
                ),
                Some("Heartbeat Timeout"),
            ),
            (
                "launch failed",
                activity(
                    "Launching a new EC2 instance.  Status Reason: capacity",
                    "",
                    "Failed",
                    None,
                ),
                Some("a launch failed (Failed)"),
            ),
            (
                "launch succeeded",
                activity("Launching a new EC2 instance: i-3", "", "Successful", None),
                None,
            ),
            (
                "launch in progress",
                activity(
                    "Launching a new EC2 instance: i-3",
                    "",
                    "MidLifecycleAction",
                    None,
                ),
                None,
            ),
            (
                "replaced after an ELB health check",
                activity(
                    "Terminating EC2 instance: i-4",
                    "At 2026-01-01T00:00:00Z an instance was taken out of service in response to an ELB system health check failure.",
                    "InProgress",
                    None,
                ),
                Some("replaced as unhealthy"),
            ),
            (
                "replaced after EC2 status checks",
                activity(
                    "Terminating EC2 instance: i-5",
                    "At 2026-01-01T00:00:00Z an instance was taken out of service in response to an EC2 instance status checks failure.",
                    "Successful",
                    None,
                ),
                Some("replaced as unhealthy"),
            ),
            (
                "the refresh's own termination",
                activity(
                    "Terminating EC2 instance: i-6",
                    refresh_cause,
                    "Successful",
                    None,
                ),
                None,
            ),
        ];
        for (name, a, want) in table {
            let got = launch_failure(&a);
            match (got, want) {
                (None, None) => {}
                (Some(g), Some(needle)) => assert!(g.contains(needle), "{name}: {g}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn follow_ends_at_a_failed_launch_when_watching_launches() {
        let mut f = FakeRefresher::new(vec![Ok(RefreshState::InProgress)]);
        f.activities = vec![activity(
            "Launching a new EC2 instance: i-1",
            "",
            "Failed",
            None,
        )];
        let start = Instant::now();
        let end = follow(
            &f,
            "r-1",
            Duration::from_secs(1800),
            Duration::from_secs(15),
            Some(SystemTime::now()),
            |_| {},
        )
        .await
        .expect("follow");
        assert!(matches!(end, FollowEnd::LaunchFailed(_, _)), "{end:?}");
        assert_eq!(start.elapsed(), Duration::ZERO, "at the first look");
        let end = follow(
            &f,
            "r-1",
            Duration::from_secs(60),
            Duration::from_secs(15),
            None,
            |_| {},
        )
        .await
        .expect("follow");
        assert!(
            matches!(end, FollowEnd::TimedOut(_)),
            "not watched: {end:?}"
        );
    }
}
