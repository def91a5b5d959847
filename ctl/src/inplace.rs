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
//! read target health); [`AwsHosts`] (`inplace/aws.rs`) is the AWS adapter. The decisions
//! (batch sizes here; the plan, every wait's verdict, what to revert in `inplace/verdict.rs`) are
//! pure functions with table tests (`inplace/tests.rs`).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use skiff_release::{Release, instance_tags};
use tokio::time::{Instant, sleep};

use crate::signal::Stop;

mod aws;
mod verdict;
pub use crate::group::KEYS;
pub use aws::AwsHosts;
pub use verdict::*;

/// The stack output naming the default strategy (template parameter ReleaseStrategy).
pub const OUTPUT_STRATEGY: &str = "ReleaseStrategy";
/// The stack output naming how the agents swap the container (`handover` or `drain`); a stack
/// without it is older than handover: `drain`.
pub const OUTPUT_SWAP_MODE: &str = "SwapMode";
/// How long an agent keeps the old container after a handover's flip (its `hold`, 5 s by
/// default), ready to flip back and answer `skiff:failed`: ctl watches the last batch at
/// least this long before it calls the release done.
pub const HANDOVER_HOLD: Duration = Duration::from_secs(5);
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

/// How the agents swap the container on a host (stack output [`OUTPUT_SWAP_MODE`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SwapMode {
    /// `/healthz` reports draining, the load balancer takes the target out (its detection
    /// window), the container is swapped, the load balancer trusts it again.
    #[default]
    Drain,
    /// The new container starts on an idle port, passes its gate there, and a kernel redirect
    /// flips the public port to it: the load balancer never sees the target unhealthy.
    Handover,
}

impl SwapMode {
    /// The stack output's value; none (an older stack) is drain. Pure.
    pub fn from_output(output: Option<&str>) -> Result<SwapMode, InPlaceError> {
        match output.map(str::trim) {
            None | Some("drain") => Ok(SwapMode::Drain),
            Some("handover") => Ok(SwapMode::Handover),
            Some(other) => Err(InPlaceError::SwapMode(other.to_owned())),
        }
    }
}

impl std::fmt::Display for SwapMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SwapMode::Drain => "drain",
            SwapMode::Handover => "handover",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InPlaceError {
    #[error("unknown strategy {0:?}: use refresh or in-place")]
    Strategy(String),
    #[error(
        "unknown swap mode {0:?} (stack output SwapMode): this ctl knows handover and drain; upgrade ctl, or release with --strategy refresh"
    )]
    SwapMode(String),
    #[error(
        "refused: the agents swap by drain, and batch {batch} ({ids}) holds every target the load balancer calls healthy ({healthy}); while they drain the load balancer fails open and sends requests to every target, the draining and unhealthy ones too. Pass a smaller --batch, scale the group out to at least 2 healthy instances, release with --strategy refresh, or pass --accept-downtime to swap them anyway"
    )]
    DrainAll {
        batch: usize,
        ids: String,
        healthy: String,
    },
    #[error(
        "--batch {0:?} is not a batch size: give a number of instances (e.g. 2) or a percentage of the group from 1% to 100% (e.g. 25%)"
    )]
    Batch(String),
    #[error(transparent)]
    Alarms(#[from] crate::alarms::AlarmsError),
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

impl From<crate::group::GroupError> for InPlaceError {
    fn from(e: crate::group::GroupError) -> Self {
        use crate::group::GroupError as G;
        match e {
            G::DescribeGroup { asg, detail } => InPlaceError::DescribeGroup { asg, detail },
            G::NoGroup { asg } => InPlaceError::NoGroup { asg },
            G::DescribeTags { detail } => InPlaceError::DescribeTags(detail),
        }
    }
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
/// (rounded up) for larger ones; never zero, never more than the group. With handover swaps
/// the first batch is a canary of one before batches of this size ([`batches`]). Pure.
pub fn batch_len(size: Option<BatchSize>, group: usize) -> usize {
    let n = match size {
        Some(BatchSize::Count(n)) => n,
        Some(BatchSize::Percent(p)) => (group * usize::from(p)).div_ceil(100),
        None if group <= 4 => 1,
        None => group.div_ceil(4),
    };
    n.clamp(1, group.max(1))
}

/// `todo` (the instances to switch, in order) in batches for a group of `group`: of
/// [`batch_len`] each; with `canary` (handover swaps) the first batch holds one instance. A
/// drain swap takes its batch out of the load balancer, so its size is a capacity question;
/// a handover takes nothing out, so only the blast radius of a bad release counts: one first,
/// then the rest. Pure.
pub fn batches(
    todo: &[String],
    size: Option<BatchSize>,
    group: usize,
    canary: bool,
) -> Vec<Vec<String>> {
    let len = batch_len(size, group);
    let split = if canary && len > 1 { 1 } else { 0 };
    let (first, rest) = todo.split_at(split.min(todo.len()));
    std::iter::once(first.to_vec())
        .filter(|b| !b.is_empty())
        .chain(rest.chunks(len).map(<[String]>::to_vec))
        .collect()
}

/// How an in-place rollout runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutPlan {
    pub batch: Option<BatchSize>,
    /// How the agents swap (stack output SwapMode).
    pub swap: SwapMode,
    /// Drain: swap a batch that holds every healthy target anyway (`--accept-downtime`).
    pub accept_downtime: bool,
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
            swap: SwapMode::Drain,
            accept_downtime: false,
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
    /// Of the release alarms `names`, those in ALARM. A fleet that cannot read alarms says
    /// so (an error): the watch after the last batch then fails rather than pass unwatched.
    fn firing(
        &self,
        names: &[String],
    ) -> impl Future<Output = Result<Vec<String>, InPlaceError>> + Send {
        let n = names.len();
        async move {
            Err(InPlaceError::Alarms(crate::alarms::AlarmsError::Describe(
                format!("this fleet reads no CloudWatch alarm ({n} named)"),
            )))
        }
    }
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

/// The processes a killed in-place run left suspended: those of [`HELD`] both suspended and
/// under ctl's mark. Only for when no ctl run holds the group (the lock is free or ours): a
/// live run's hold is its own. Pure.
pub fn stale_hold(now: &Held) -> Vec<String> {
    HELD.iter()
        .filter(|p| now.suspended.iter().any(|a| a == *p) && now.marked.iter().any(|a| a == *p))
        .map(|p| (*p).to_owned())
        .collect()
}

/// Resume what a killed in-place run held ([`stale_hold`]) and remove its mark; the
/// processes resumed (none: nothing was left, and nothing is changed). Call it only while no
/// other ctl run can hold the group: by `ctl unlock` once the lock is cleared, by a release
/// once it holds the lock.
pub async fn resume_stale<F: InPlaceFleet>(fleet: &F) -> Result<Vec<String>, InPlaceError> {
    let stale = stale_hold(&fleet.held().await?);
    if !stale.is_empty() {
        // Never with an empty list: ResumeProcesses without processes resumes every one.
        fleet.hold(&stale, false).await?;
    }
    Ok(stale)
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
    // Reads are spaced so a big group's DescribeTags calls stay within ctl's share of the
    // account's bucket (group::read_interval), whatever `poll` asks.
    let mut spacing = Duration::ZERO;
    loop {
        let read = async {
            let hosts = fleet.hosts().await?;
            let health = fleet.health().await?;
            Ok::<_, InPlaceError>((hosts, health))
        };
        match read.await {
            Ok((hosts, health)) => {
                failures = 0;
                spacing = crate::group::read_interval(hosts.len());
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
            _ = sleep(poll.max(spacing).min(deadline - now)) => {}
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
pub(crate) mod fake;
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
        swap: SwapMode,
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
    /// Handover: every switched instance watched after the last batch for the agents' hold
    /// (a flip back answers `skiff:failed`).
    Settled {
        secs: f64,
    },
    /// The release alarms could not be watched after the last batch: the deployer may not
    /// read them (a stack from before the permission).
    AlarmsUnwatched {
        alarms: Vec<String>,
        why: String,
    },
    /// The release alarms watched for one window after the last batch; none fired.
    AlarmsQuiet {
        alarms: Vec<String>,
        secs: f64,
    },
    /// Auto Scaling processes suspended for the swaps (`already`: suspended before, by someone
    /// else, left so).
    Held {
        processes: Vec<String>,
        already: Vec<String>,
    },
    /// Before anything else: the processes a killed in-place run left suspended, resumed
    /// (`error`: they could not be).
    StaleHoldResumed {
        processes: Vec<String>,
        error: Option<String>,
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
