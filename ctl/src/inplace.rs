//! The in-place strategy (issue 13): ctl swaps the release on the instances that already run,
//! batch by batch, through EC2 instance tags the agents read from their instance metadata
//! (`skiff_release::instance_tags`). Order: the parameter first (so instances that boot meanwhile
//! get the new release), a pull on every instance to switch, then per batch: `skiff:target`,
//! wait until each reports the release (`skiff:release`) and the load balancer calls it healthy,
//! bake with target health watched, next; at the end the group is listed again and instances that
//! joined meanwhile without the release are switched too. A failing batch, or a signal, tags the
//! previous release back on every switched instance, waits until they run it, and writes the
//! previous record back under the compensation rules (`ship`).
//!
//! [`InPlaceFleet`] is the seam (list the group's instances with their skiff tags, tag some,
//! read target health); [`AwsHosts`] is the AWS adapter. The decisions (batch sizes, the plan,
//! every wait's verdict, what to revert) are pure functions with table tests.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use aws_sdk_ec2::types::{Filter, Tag as Ec2Tag};
use skiff_release::{Release, instance_tags};
use tokio::time::{Instant, sleep};

use crate::aws;
use crate::signal::Stop;

/// The stack output naming the default strategy (template parameter ReleaseStrategy).
pub const OUTPUT_STRATEGY: &str = "ReleaseStrategy";
/// Consecutive failed reads of the fleet a wait tolerates before it gives up.
const READ_FAILURES: u32 = 5;
/// Longest pause between two reads of the fleet while waiting (3 read calls each; `--poll` can
/// only shorten it).
pub const MAX_POLL: Duration = Duration::from_secs(1);
/// Rounds of late joiners switched at the end before the rollout says what is left.
const LATE_ROUNDS: usize = 3;

/// How a release reaches the instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// An instance refresh replaces every instance.
    Refresh,
    /// ctl swaps the container on the running instances, batch by batch.
    InPlace,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InPlaceError {
    #[error("unknown strategy {0:?}: use refresh or in-place")]
    Strategy(String),
    #[error(
        "--batch {0:?} is not a batch size: give a number of instances (e.g. 2) or a percentage of the group from 1% to 100% (e.g. 25%)"
    )]
    Batch(String),
    #[error("cannot describe Auto Scaling Group {asg} ({detail})")]
    DescribeGroup { asg: String, detail: String },
    #[error("Auto Scaling Group {asg} does not exist; check --asg or the stack")]
    NoGroup { asg: String },
    #[error("cannot read the instances' tags ({0})")]
    DescribeTags(String),
    #[error(
        "cannot tag {key} on {ids} ({detail}); the deployer needs ec2:CreateTags on the group's instances (the stack's DeployerPolicy allows it)"
    )]
    Tag {
        key: String,
        ids: String,
        detail: String,
    },
    #[error(
        "tag {tag} now names {new_digest}, but the fleet knows it as {old_digest}: instances report the tag they run, not its digest, so an in-place switch between the two could not be checked; release it with --strategy refresh, or push the image under a new tag"
    )]
    Retagged {
        tag: String,
        old_digest: String,
        new_digest: String,
    },
    #[error(
        "the group has no InService instance, so nothing can be switched in place (and nothing would show the release works); scale the group out first, or release with --strategy refresh"
    )]
    NoInstances,
    #[error("cannot read the target health ({0})")]
    TargetHealth(String),
    #[error(
        "cannot {what} the processes {processes} of Auto Scaling Group {asg} ({detail}); the deployer needs autoscaling:SuspendProcesses and autoscaling:ResumeProcesses on the group (the stack's DeployerPolicy allows them)"
    )]
    Hold {
        what: &'static str,
        processes: String,
        asg: String,
        detail: String,
    },
}

impl FromStr for Strategy {
    type Err = InPlaceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "refresh" => Ok(Strategy::Refresh),
            "in-place" => Ok(Strategy::InPlace),
            other => Err(InPlaceError::Strategy(other.to_owned())),
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::Refresh => "refresh",
            Strategy::InPlace => "in-place",
        })
    }
}

/// The strategy in use: the flag, else the stack's output, else refresh. Pure.
pub fn choose_strategy(
    flag: Option<Strategy>,
    output: Option<&str>,
) -> Result<Strategy, InPlaceError> {
    match (flag, output) {
        (Some(s), _) => Ok(s),
        (None, Some(o)) => o.parse().map_err(|_| {
            InPlaceError::Strategy(format!(
                "{o} (stack output {OUTPUT_STRATEGY}); pass --strategy refresh|in-place"
            ))
        }),
        (None, None) => Ok(Strategy::Refresh),
    }
}

/// `--batch`: a number of instances or a percentage of the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    Count(usize),
    Percent(u8),
}

impl FromStr for BatchSize {
    type Err = InPlaceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InPlaceError::Batch(s.to_owned());
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            let p: u8 = p.trim().parse().map_err(|_| bad())?;
            if (1..=100).contains(&p) {
                return Ok(BatchSize::Percent(p));
            }
            return Err(bad());
        }
        match t.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(BatchSize::Count(n)),
            _ => Err(bad()),
        }
    }
}

/// Instances per batch for a group of `group`: the flag, or one for groups of up to 4 and 25 %
/// (rounded up) for larger ones; never zero, never more than the group. Pure.
pub fn batch_len(size: Option<BatchSize>, group: usize) -> usize {
    let n = match size {
        Some(BatchSize::Count(n)) => n,
        Some(BatchSize::Percent(p)) => (group * usize::from(p)).div_ceil(100),
        None if group <= 4 => 1,
        None => group.div_ceil(4),
    };
    n.clamp(1, group.max(1))
}

/// How an in-place rollout runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutPlan {
    pub batch: Option<BatchSize>,
    /// Per batch, after it is healthy; target health is watched meanwhile.
    pub bake: Duration,
    /// Longest a batch may take to run the release healthy (and the revert to report back).
    pub batch_timeout: Duration,
    /// Longest the pull on every instance may take.
    pub pull_timeout: Duration,
}

impl Default for RolloutPlan {
    fn default() -> Self {
        RolloutPlan {
            batch: None,
            bake: Duration::ZERO,
            batch_timeout: Duration::from_secs(300),
            pull_timeout: Duration::from_secs(600),
        }
    }
}

/// An InService instance of the group with its skiff tags.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Host {
    pub id: String,
    /// `skiff:release`: the tag its agent runs healthy.
    pub release: Option<String>,
    /// `skiff:target`: what ctl told it to run.
    pub target: Option<String>,
    /// `skiff:pull`, `skiff:pulled`, `skiff:failed`.
    pub pull: Option<String>,
    pub pulled: Option<String>,
    pub failed: Option<String>,
}

impl Host {
    pub fn set(&mut self, key: &str, value: &str) {
        let v = Some(value.to_owned());
        match key {
            instance_tags::RELEASE => self.release = v,
            instance_tags::TARGET => self.target = v,
            instance_tags::PULL => self.pull = v,
            instance_tags::PULLED => self.pulled = v,
            instance_tags::FAILED => self.failed = v,
            _ => {}
        }
    }
}

/// The load balancer's view: instance id -> target state; `None` when the deployment names no
/// target group (then the agents' reports alone decide).
pub type Health = Option<BTreeMap<String, String>>;

/// The instance fleet as the in-place rollout sees it.
pub trait InPlaceFleet {
    /// The group's InService instances with their skiff tags, sorted by id.
    fn hosts(&self) -> impl Future<Output = Result<Vec<Host>, InPlaceError>> + Send;
    /// Set tag `key` = `value` on `ids`.
    fn tag(
        &self,
        ids: &[String],
        key: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), InPlaceError>> + Send;
    /// The target group's health of its targets.
    fn health(&self) -> impl Future<Output = Result<Health, InPlaceError>> + Send;
    /// The group's suspended Auto Scaling processes, and those a ctl in-place run marked as
    /// its own (the group tag [`HELD_TAG`]).
    fn held(&self) -> impl Future<Output = Result<Held, InPlaceError>> + Send;
    /// Suspend (`true`: mark them ours first) or resume (`false`: then unmark) these processes.
    fn hold(
        &self,
        processes: &[String],
        suspend: bool,
    ) -> impl Future<Output = Result<(), InPlaceError>> + Send;
}

/// The Auto Scaling processes held while instances swap in place: a swapping instance drains
/// (the load balancer calls it unhealthy for a few seconds), and with `HealthCheckType: ELB` the
/// group would mark it Unhealthy and replace it. Suspending HealthCheck stops the marking,
/// ReplaceUnhealthy the replacing.
/// https://docs.aws.amazon.com/autoscaling/ec2/userguide/as-suspend-resume-processes.html
pub const HELD: [&str; 2] = ["HealthCheck", "ReplaceUnhealthy"];

/// The group tag naming the processes a ctl in-place run suspended (`:`-separated): a run
/// that was killed left them suspended, and the next run knows they are ctl's to resume.
pub const HELD_TAG: &str = "skiff:held-processes";

/// Between the processes in [`HELD_TAG`]'s value (a character every tag value allows; a space
/// would do on AWS, but trips the emulator's request signing).
pub const MARK_SEPARATOR: &str = ":";

/// The processes named in [`HELD_TAG`]'s value. Pure.
pub fn parse_mark(value: &str) -> Vec<String> {
    value
        .split(|c: char| c == ':' || c.is_whitespace())
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The group's suspended processes and ctl's mark.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    pub suspended: Vec<String>,
    pub marked: Vec<String>,
}

/// The processes this rollout holds (suspends, and resumes at the end): [`HELD`] minus those
/// someone else suspended (left as they are), where a process suspended under ctl's mark (a
/// killed run) counts as ctl's. Pure.
pub fn to_hold(now: &Held) -> Vec<String> {
    HELD.iter()
        .filter(|p| {
            let suspended = now.suspended.iter().any(|a| a == *p);
            let marked = now.marked.iter().any(|a| a == *p);
            !suspended || marked
        })
        .map(|p| (*p).to_owned())
        .collect()
}

/// A fleet for the refresh strategy, which never rolls in place.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoInPlace;

impl InPlaceFleet for NoInPlace {
    async fn hosts(&self) -> Result<Vec<Host>, InPlaceError> {
        Ok(Vec::new())
    }
    async fn tag(&self, _ids: &[String], _key: &str, _value: &str) -> Result<(), InPlaceError> {
        Ok(())
    }
    async fn health(&self) -> Result<Health, InPlaceError> {
        Ok(None)
    }
    async fn held(&self) -> Result<Held, InPlaceError> {
        Ok(Held::default())
    }
    async fn hold(&self, _processes: &[String], _suspend: bool) -> Result<(), InPlaceError> {
        Ok(())
    }
}

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

impl InPlaceFleet for AwsHosts {
    async fn hosts(&self) -> Result<Vec<Host>, InPlaceError> {
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
        let group = out
            .auto_scaling_groups()
            .first()
            .ok_or_else(|| InPlaceError::NoGroup {
                asg: self.asg.clone(),
            })?;
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
        let group = out
            .auto_scaling_groups()
            .first()
            .ok_or_else(|| InPlaceError::NoGroup {
                asg: self.asg.clone(),
            })?;
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

// --- pure decisions ------------------------------------------------------------------------

/// Whether tag value `value` names `release` (same tag and digest). Pure.
pub fn names(value: Option<&str>, release: &Release) -> bool {
    value
        .and_then(|v| instance_tags::decode(v).ok())
        .is_some_and(|r| r.tag == release.tag && r.digest == release.digest)
}

/// Whether `host`'s agent reports `release` running healthy. Pure.
pub fn runs(host: &Host, release: &Release) -> bool {
    host.release.as_deref() == Some(release.tag.as_str())
}

/// The load balancer's word on `id`: healthy, or what it says instead. Pure.
fn lb_state<'h>(health: &'h Health, id: &str) -> Result<(), &'h str> {
    match health {
        None => Ok(()),
        Some(map) => match map.get(id).map(String::as_str) {
            Some("healthy") => Ok(()),
            Some(other) => Err(other),
            None => Err("not registered"),
        },
    }
}

/// Which instances need switching, in batches; and which already run the release (skipped, so
/// a re-run after an interrupted rollout converges). Pure.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    pub on_target: Vec<String>,
    pub batches: Vec<Vec<String>>,
}

pub fn plan(hosts: &[Host], new: &Release, batch: Option<BatchSize>) -> Plan {
    let (done, todo): (Vec<&Host>, Vec<&Host>) = hosts
        .iter()
        .partition(|h| runs(h, new) && (h.target.is_none() || names(h.target.as_deref(), new)));
    let len = batch_len(batch, hosts.len());
    Plan {
        on_target: done.iter().map(|h| h.id.clone()).collect(),
        batches: todo
            .chunks(len)
            .map(|c| c.iter().map(|h| h.id.clone()).collect())
            .collect(),
    }
}

/// Where a wait stands. Pure result of the verdict functions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Done,
    /// Still waiting on these (id and what it shows).
    Pending(Vec<(String, String)>),
    /// This instance failed: why.
    Failed(String, String),
}

/// The pull on `ids`: done when each has pulled `new` (or runs it); failed when one reports it
/// failed. An instance no longer in the group is not waited for. Pure.
pub fn pull_verdict(hosts: &[Host], ids: &[String], new: &Release) -> Verdict {
    let mut pending = Vec::new();
    for id in ids {
        let Some(h) = hosts.iter().find(|h| &h.id == id) else {
            continue;
        };
        if names(h.failed.as_deref(), new) {
            return Verdict::Failed(id.clone(), format!("its agent could not pull {new}"));
        }
        if !(names(h.pulled.as_deref(), new) || runs(h, new)) {
            pending.push((
                id.clone(),
                format!("pulled {}", h.pulled.as_deref().unwrap_or("nothing yet")),
            ));
        }
    }
    if pending.is_empty() {
        Verdict::Done
    } else {
        Verdict::Pending(pending)
    }
}

/// Refuse an in-place switch to a tag that the parameter (`previous`) or an instance's target
/// already names with another digest: the agents answer with the tag only, so the switch
/// would look done before it happened. Pure.
pub fn check_retagged(
    new: &Release,
    previous: Option<&Release>,
    hosts: &[Host],
) -> Result<(), InPlaceError> {
    let known = hosts
        .iter()
        .filter_map(|h| h.target.as_deref())
        .filter_map(|v| instance_tags::decode(v).ok())
        .chain(previous.cloned());
    for old in known {
        if let (true, Some(a), Some(b)) = (old.tag == new.tag, &old.digest, &new.digest)
            && a != b
        {
            return Err(InPlaceError::Retagged {
                tag: new.tag.to_string(),
                old_digest: a.to_string(),
                new_digest: b.to_string(),
            });
        }
    }
    Ok(())
}

/// The instances of `ids` whose agent reports `new` failed from an earlier run: the agent
/// forgets a failure only when an instruction moves to another release, so this run first
/// points their pull elsewhere ([`withdrawn_verdict`]) to try the release afresh. Pure.
pub fn failed_before(hosts: &[Host], ids: &[String], new: &Release) -> Vec<String> {
    hosts
        .iter()
        .filter(|h| ids.contains(&h.id) && names(h.failed.as_deref(), new))
        .map(|h| h.id.clone())
        .collect()
}

/// Done when none of `ids` reports `new` failed any more (its agent withdrew the answer). An
/// instance no longer in the group is not waited for. Pure.
pub fn withdrawn_verdict(hosts: &[Host], ids: &[String], new: &Release) -> Verdict {
    let pending: Vec<(String, String)> = failed_before(hosts, ids, new)
        .into_iter()
        .map(|id| (id, format!("still reports {new} failed")))
        .collect();
    if pending.is_empty() {
        Verdict::Done
    } else {
        Verdict::Pending(pending)
    }
}

/// A batch switched to `new`: done when each reports it running AND the load balancer calls it
/// healthy; failed when one's agent reports `new` failed (it rolled itself back). Pure.
pub fn batch_verdict(hosts: &[Host], health: &Health, ids: &[String], new: &Release) -> Verdict {
    // An instance that left the group is not waited for, but proves nothing: a batch whose
    // every instance left shows `new` healthy nowhere (e.g. the group replaced them).
    if let Some(first) = ids.first()
        && !ids.iter().any(|id| hosts.iter().any(|h| &h.id == id))
    {
        return Verdict::Failed(
            first.clone(),
            format!(
                "every instance of the batch left the group before it ran {new} healthy: nothing shows it works"
            ),
        );
    }
    runs_healthy_verdict(hosts, health, ids, new)
}

/// Each of `ids` still in the group runs `release` and is healthy to the load balancer; one
/// whose agent reports `release` failed fails. Instances that left are not waited for. Pure.
fn runs_healthy_verdict(hosts: &[Host], health: &Health, ids: &[String], new: &Release) -> Verdict {
    let mut pending = Vec::new();
    for id in ids {
        let Some(h) = hosts.iter().find(|h| &h.id == id) else {
            continue;
        };
        if names(h.failed.as_deref(), new) {
            return Verdict::Failed(
                id.clone(),
                format!("{new} failed its health gate there and the agent rolled it back"),
            );
        }
        let lb = lb_state(health, id);
        match (runs(h, new), lb) {
            (true, Ok(())) => {}
            (true, Err(state)) => pending.push((id.clone(), format!("target {state}"))),
            (false, _) => pending.push((
                id.clone(),
                format!(
                    "runs {}",
                    h.release.as_deref().unwrap_or("(nothing reported)")
                ),
            )),
        }
    }
    if pending.is_empty() {
        Verdict::Done
    } else {
        Verdict::Pending(pending)
    }
}

/// While baking: every switched instance still in the group must run `new` and be healthy to
/// the load balancer; the first that is not fails the batch. Pure.
pub fn bake_verdict(hosts: &[Host], health: &Health, ids: &[String], new: &Release) -> Verdict {
    for id in ids {
        let Some(h) = hosts.iter().find(|h| &h.id == id) else {
            continue;
        };
        if names(h.failed.as_deref(), new) {
            return Verdict::Failed(id.clone(), format!("its agent reports {new} failed"));
        }
        if !runs(h, new) {
            return Verdict::Failed(
                id.clone(),
                format!(
                    "it no longer reports {new} (reports {})",
                    h.release.as_deref().unwrap_or("nothing")
                ),
            );
        }
        if let Err(state) = lb_state(health, id) {
            return Verdict::Failed(
                id.clone(),
                format!("the load balancer marks it {state} during the bake"),
            );
        }
    }
    Verdict::Done
}

/// The instances to tag back to the previous release: the ones this run switched, and any
/// instance in the group that runs or was told to run `new` (e.g. booted from the parameter
/// during the rollout). Sorted, no duplicates. Pure.
pub fn to_revert(hosts: &[Host], switched: &[String], new: &Release) -> Vec<String> {
    let mut ids: Vec<String> = hosts
        .iter()
        .filter(|h| switched.contains(&h.id) || names(h.target.as_deref(), new) || runs(h, new))
        .map(|h| h.id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// The revert: done when each of `ids` still in the group reports `prev` running and the load
/// balancer calls it healthy again (only then are the group's health checks resumed). Pure.
pub fn revert_verdict(hosts: &[Host], health: &Health, ids: &[String], prev: &Release) -> Verdict {
    let failed = hosts
        .iter()
        .find(|h| ids.contains(&h.id) && names(h.failed.as_deref(), prev));
    if let Some(h) = failed {
        return Verdict::Failed(h.id.clone(), format!("its agent reports {prev} failed"));
    }
    // An instance that left the group has nothing left to revert.
    runs_healthy_verdict(hosts, health, ids, prev)
}

// --- waiting ---------------------------------------------------------------------------------

/// How a bounded wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waited {
    Done,
    Failed(String, String),
    TimedOut(Vec<(String, String)>),
    Stopped(&'static str),
    /// The fleet could not be read several times in a row.
    Unreadable(String),
}

/// Poll the fleet until `judge` says done or failed, `timeout` passes, or a stop comes.
/// With `hold`, the whole `timeout` must pass with `judge` never failing (a bake).
pub async fn wait_for<F: InPlaceFleet>(
    fleet: &F,
    timeout: Duration,
    poll: Duration,
    hold: bool,
    stop: &mut Stop,
    mut judge: impl FnMut(&[Host], &Health) -> Verdict,
) -> Waited {
    let deadline = Instant::now() + timeout;
    let mut failures = 0;
    let mut last = Vec::new();
    loop {
        let read = async {
            let hosts = fleet.hosts().await?;
            let health = fleet.health().await?;
            Ok::<_, InPlaceError>((hosts, health))
        };
        match read.await {
            Ok((hosts, health)) => {
                failures = 0;
                match judge(&hosts, &health) {
                    Verdict::Failed(id, why) => return Waited::Failed(id, why),
                    Verdict::Done if !hold => return Waited::Done,
                    Verdict::Done => last.clear(),
                    Verdict::Pending(p) => last = p,
                }
            }
            Err(e) => {
                failures += 1;
                if failures >= READ_FAILURES {
                    return Waited::Unreadable(e.to_string());
                }
                tracing::warn!("{e}; trying again");
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return if hold {
                Waited::Done
            } else {
                Waited::TimedOut(last)
            };
        }
        tokio::select! {
            _ = sleep(poll.min(deadline - now)) => {}
            signal = stop.wait() => return Waited::Stopped(signal),
        }
    }
}

/// Seconds, rounded to tenths, for the progress lines.
pub fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

/// Pending instances in words: `i-a (runs v1), i-b (target initial)`.
pub fn describe_pending(p: &[(String, String)]) -> String {
    if p.is_empty() {
        return "none".into();
    }
    p.iter()
        .map(|(id, what)| format!("{id} ({what})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The late-joiner rounds at the end of a rollout.
pub const fn late_rounds() -> usize {
    LATE_ROUNDS
}

#[cfg(test)]
mod tests;

/// One step of an in-place rollout, for the person, the pipeline or the fleet box's bench
/// (`--json`: `{"event":"rollout","step":...}`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum RolloutStep {
    /// What will be switched, in which batches; which instances already run the release.
    Plan {
        release: String,
        instances: usize,
        on_target: Vec<String>,
        batches: Vec<Vec<String>>,
        bake_secs: f64,
    },
    /// `skiff:pull` written on these.
    Pulling {
        release: String,
        instances: Vec<String>,
    },
    Pulled {
        instances: Vec<String>,
        secs: f64,
    },
    /// `skiff:target` written on this batch.
    Switching {
        batch: usize,
        batches: usize,
        release: String,
        instances: Vec<String>,
    },
    /// A wait (`pull`, `batch N/M`, `revert`) still waits for these, each time that changes.
    Waiting {
        what: String,
        pending: String,
    },
    /// The batch runs the release and the load balancer calls it healthy.
    Healthy {
        batch: usize,
        batches: usize,
        instances: Vec<String>,
        secs: f64,
    },
    Baked {
        batch: usize,
        batches: usize,
        secs: f64,
    },
    /// Auto Scaling processes suspended for the swaps (`already`: suspended before, by someone
    /// else, left so).
    Held {
        processes: Vec<String>,
        already: Vec<String>,
    },
    /// The processes suspended for the swaps, resumed (`error`: they could not be).
    Resumed {
        processes: Vec<String>,
        error: Option<String>,
    },
    /// Instances that joined the group during the rollout without the release.
    LateJoiners {
        instances: Vec<String>,
    },
    /// `skiff:target` = the previous release on these.
    Reverting {
        reason: String,
        to: String,
        instances: Vec<String>,
    },
    Reverted {
        instances: Vec<String>,
        secs: f64,
    },
}
