//! `FakeFleet`: simulated hosts behind [`InPlaceFleet`], for the rollout's tests under paused
//! time. Each host runs a simulated agent that follows the instance-tag protocol with the
//! contract's own rules (`skiff_release::instance_tags`): it reads its [`Instructions`] from
//! `skiff:target` and `skiff:pull`, forgets a failure when [`forgets_failure`] says so (and
//! withdraws the answer by setting it empty), pulls and answers `skiff:pulled`, swaps (by drain
//! or handover, as its own agent was configured) and reports `skiff:release`, or answers
//! `skiff:failed` and keeps the release before. Its answers live only in its tags and are read
//! back as [`Answers`] with the contract's decoding (empty = none). The load balancer's view
//! follows the swaps; time is tokio's clock, so a test runs it paused.
//!
//! Rules of the real services it enforces:
//! - CreateTags fails for an instance id that does not exist (`InvalidInstanceID.NotFound`), and
//!   for a key over 128 or a value over 256 characters or with a character EC2 refuses
//!   (<https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/Using_Tags.html#tag-restrictions>).
//! - Target health states are the load balancer's (`initial`, `healthy`, `draining`, ...): a
//!   target back from a drain is `initial` until its health check passed
//!   [`HEALTHY_THRESHOLD`] times at [`CHECK_INTERVAL`] (the stack's target group,
//!   `templates/app.yaml`; <https://docs.aws.amazon.com/elasticloadbalancing/latest/application/target-group-health-checks.html>).
//! - Suspended Auto Scaling processes and ctl's mark on the group, as `hold` sets them.
//! - DescribeAlarms answers only the alarms the account has: an unknown name is not in ALARM
//!   (<https://docs.aws.amazon.com/AmazonCloudWatch/latest/APIReference/API_DescribeAlarms.html>).
//!
//! Not modelled: the delay before new tags show in the instance metadata, throttling,
//! instances leaving the group, the agent's backoffs. The agents take their turns when ctl
//! calls the fleet (work finishes at its due time, the next starts at that call): ctl reads
//! at least once a second while it waits, so no answer comes later than a real agent's would
//! by more than that.

use std::collections::BTreeMap;
use std::sync::Mutex;

use skiff_release::instance_tags::{self, Answers, Instructions, forgets_failure, names};
use tokio::time::Instant;

use super::*;
use crate::signal::StopHandle;

/// How long a simulated agent takes to pull an image.
pub(crate) const PULL: Duration = Duration::from_secs(2);
/// How long a simulated agent takes from a new target to the new container past its gate.
pub(crate) const SWAP: Duration = Duration::from_secs(4);
/// The stack's target group: health checked every 5 s, healthy after 2 passes.
pub(crate) const CHECK_INTERVAL: Duration = Duration::from_secs(5);
pub(crate) const HEALTHY_THRESHOLD: u32 = 2;
/// When a handover's new container fails after the flip, within the agent's hold.
pub(crate) const FLIP_BACK_AFTER: Duration = Duration::from_secs(3);
/// When a release that passed its gate starts failing the load balancer's checks.
pub(crate) const SICKENS_AFTER: Duration = Duration::from_secs(20);

/// How one host's agent behaves.
#[derive(Debug, Clone)]
pub(crate) struct AgentSim {
    /// How this agent swaps (its own config, which may predate the stack's SwapMode).
    pub(crate) swap: SwapMode,
    /// `false`: the agent is gone (never reads an instruction nor answers); the old container
    /// keeps serving.
    pub(crate) alive: bool,
    /// Tags of releases that fail the health gate here (the agent rolls back, `skiff:failed`).
    pub(crate) fails_gate: Vec<String>,
    /// Tags of releases that pass the gate but fail within a handover's hold (flip back).
    pub(crate) flips_back: Vec<String>,
    /// Tags of releases whose pull fails here for good.
    pub(crate) fails_pull: Vec<String>,
    /// Tags of releases that pass the agent's gate and then fail the load balancer's checks
    /// ([`SICKENS_AFTER`] the swap, e.g. under real traffic): the agent notices nothing.
    pub(crate) sickens_on: Vec<String>,
    /// Pulls and answers, but never carries out a target (its swap is wedged): ctl hears
    /// nothing more from it.
    pub(crate) ignores_target: bool,
}

impl AgentSim {
    pub(crate) fn new(swap: SwapMode) -> AgentSim {
        AgentSim {
            swap,
            alive: true,
            fails_gate: Vec::new(),
            flips_back: Vec::new(),
            fails_pull: Vec::new(),
            sickens_on: Vec::new(),
            ignores_target: false,
        }
    }
}

/// What the agent is busy with (one thing at a time, as the agent's loop).
#[derive(Debug, Clone)]
enum Work {
    Pull { release: Release, done: Instant },
    Swap { to: Release, done: Instant },
}

/// The load balancer's view of a target.
#[derive(Debug, Clone, Copy)]
enum Lb {
    Healthy,
    Draining,
    /// Registered again after a drain: `initial` until its checks passed.
    Initial {
        since: Instant,
    },
}

#[derive(Debug, Clone)]
struct SimHost {
    agent: AgentSim,
    /// The instance's tags, as EC2 holds them: ctl's instructions and the agent's answers.
    tags: BTreeMap<String, String>,
    running: Release,
    seen: Instructions,
    work: Option<Work>,
    /// A handover that will flip back: (when, to what).
    flip_back: Option<(Instant, Release)>,
    lb: Lb,
    /// From when the load balancer calls the running release unhealthy.
    sick_from: Option<Instant>,
    /// Every `skiff:release` the agent reported after boot: (when, tag).
    reported: Vec<(Instant, String)>,
}

fn release(value: &str) -> Release {
    instance_tags::decode(value).expect("a release value")
}

impl SimHost {
    fn booted(running: &str, agent: AgentSim) -> SimHost {
        let running = release(running);
        let mut tags = BTreeMap::new();
        tags.insert(instance_tags::RELEASE.to_owned(), running.tag.to_string());
        SimHost {
            agent,
            tags,
            running,
            seen: Instructions::default(),
            work: None,
            flip_back: None,
            lb: Lb::Healthy,
            sick_from: None,
            reported: Vec::new(),
        }
    }

    fn instruction(&self, key: &str) -> Option<Release> {
        self.tags
            .get(key)
            .and_then(|v| instance_tags::decode(v).ok())
    }

    /// What this host answered, read back from its tags (an empty value is none).
    fn answers(&self) -> Answers {
        Answers {
            pulled: self.instruction(instance_tags::PULLED),
            failed: self.instruction(instance_tags::FAILED),
        }
    }

    fn answer(&mut self, key: &str, value: String) {
        self.tags.insert(key.to_owned(), value);
    }

    fn failed(&mut self, r: &Release) {
        self.answer(instance_tags::FAILED, instance_tags::encode(r));
    }

    fn switched_to(&mut self, r: Release, at: Instant) {
        self.answer(instance_tags::RELEASE, r.tag.to_string());
        self.reported.push((at, r.tag.to_string()));
        self.sick_from = self
            .agent
            .sickens_on
            .contains(&r.tag.to_string())
            .then_some(at + SICKENS_AFTER);
        self.running = r;
        if self.agent.swap == SwapMode::Drain {
            self.lb = Lb::Initial { since: at };
        }
    }

    /// The agent's turns up to `now`: finish what is due, read the instructions, start the next.
    fn turn(&mut self, now: Instant) {
        if !self.agent.alive {
            return;
        }
        if let Some((at, back)) = self.flip_back.take_if(|(at, _)| *at <= now) {
            let bad = self.running.clone();
            self.switched_to(back, at);
            self.failed(&bad);
        }
        match self.work.take() {
            Some(Work::Pull { release, done }) if done <= now => {
                if self.agent.fails_pull.contains(&release.tag.to_string()) {
                    self.failed(&release);
                } else {
                    self.answer(instance_tags::PULLED, instance_tags::encode(&release));
                }
            }
            Some(Work::Swap { to, done }) if done <= now => {
                let tag = to.tag.to_string();
                if self.agent.fails_gate.contains(&tag) {
                    let back = self.running.clone();
                    self.switched_to(back, done);
                    self.failed(&to);
                } else {
                    let from = self.running.clone();
                    self.switched_to(to, done);
                    if self.agent.swap == SwapMode::Handover && self.agent.flips_back.contains(&tag)
                    {
                        self.flip_back = Some((done + FLIP_BACK_AFTER, from));
                    }
                }
            }
            other => self.work = other,
        }
        let now_asked = Instructions {
            target: self.instruction(instance_tags::TARGET),
            pull: self.instruction(instance_tags::PULL),
        };
        if now_asked != self.seen {
            if self
                .answers()
                .failed
                .is_some_and(|f| forgets_failure(&f, &now_asked))
            {
                self.answer(instance_tags::FAILED, String::new());
            }
            self.seen = now_asked;
        }
        if self.work.is_some() || self.flip_back.is_some() {
            return;
        }
        let failed = self.answers().failed;
        let failed_here = |r: &Release| failed.as_ref().is_some_and(|f| f.same_version(r));
        if let Some(t) = self.seen.target.clone()
            && !self.agent.ignores_target
            && !failed_here(&t)
            && !self.running.same_version(&t)
        {
            if self.agent.swap == SwapMode::Drain {
                self.lb = Lb::Draining;
            }
            self.work = Some(Work::Swap {
                to: t,
                done: now + SWAP,
            });
        } else if let Some(p) = self.seen.pull.clone()
            && !names(self.tags.get(instance_tags::PULLED).map(String::as_str), &p)
            && !failed_here(&p)
        {
            self.work = Some(Work::Pull {
                release: p,
                done: now + PULL,
            });
        }
    }

    fn lb_state(&self, now: Instant) -> &'static str {
        if self.sick_from.is_some_and(|at| now >= at) {
            return "unhealthy";
        }
        match self.lb {
            Lb::Healthy => "healthy",
            Lb::Draining => "draining",
            Lb::Initial { since } if now >= since + CHECK_INTERVAL * HEALTHY_THRESHOLD => "healthy",
            Lb::Initial { .. } => "initial",
        }
    }

    fn host(&self, id: &str) -> Host {
        let mut h = Host {
            id: id.to_owned(),
            ..Host::default()
        };
        for (k, v) in &self.tags {
            h.set(k, v);
        }
        h
    }
}

/// A call ctl made, and when (since the fleet was made).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    Tag {
        ids: Vec<String>,
        key: String,
        value: String,
    },
    Hold {
        processes: Vec<String>,
        suspend: bool,
    },
}

#[derive(Debug)]
struct State {
    hosts: BTreeMap<String, SimHost>,
    /// Instances that join the group at a time, running what they booted with.
    joining: Vec<(Instant, String, SimHost)>,
    target_group: bool,
    suspended: Vec<String>,
    marked: Vec<String>,
    /// The account's CloudWatch alarms: when each goes to ALARM (`None`: stays OK).
    alarms: BTreeMap<String, Option<Instant>>,
    /// What every DescribeAlarms answers instead, when set (denied, or failing).
    alarms_error: Option<crate::alarms::AlarmsError>,
    /// DescribeAlarms calls answered.
    alarm_reads: usize,
    calls: Vec<(Duration, Call)>,
    /// A stop requested once `key` was written this many times.
    stop_on: Option<(String, usize, StopHandle)>,
}

impl State {
    fn advance(&mut self, now: Instant) {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.joining)
            .into_iter()
            .partition(|(at, _, _)| *at <= now);
        self.joining = later;
        self.hosts
            .extend(due.into_iter().map(|(_, id, host)| (id, host)));
        for h in self.hosts.values_mut() {
            h.turn(now);
        }
    }
}

/// Simulated hosts with their agents and the load balancer in front (see the module doc).
#[derive(Debug)]
pub(crate) struct FakeFleet {
    started: Instant,
    state: Mutex<State>,
}

impl FakeFleet {
    /// Instances `i-1` .. `i-n`, each running `running`, with agents swapping by `swap`, behind
    /// a target group.
    pub(crate) fn new(n: usize, running: &str, swap: SwapMode) -> FakeFleet {
        let hosts = (1..=n)
            .map(|i| {
                (
                    format!("i-{i}"),
                    SimHost::booted(running, AgentSim::new(swap)),
                )
            })
            .collect();
        FakeFleet {
            started: Instant::now(),
            state: Mutex::new(State {
                hosts,
                joining: Vec::new(),
                target_group: true,
                suspended: Vec::new(),
                marked: Vec::new(),
                alarms: BTreeMap::new(),
                alarms_error: None,
                alarm_reads: 0,
                calls: Vec::new(),
                stop_on: None,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake fleet lock")
    }

    /// No target group: the agents' reports alone decide (`health` is `None`).
    pub(crate) fn without_target_group(&self) {
        self.state().target_group = false;
    }

    /// Change how `id`'s agent behaves.
    pub(crate) fn agent(&self, id: &str, change: impl FnOnce(&mut AgentSim)) {
        change(&mut self.state().hosts.get_mut(id).expect("a host").agent);
    }

    /// A CloudWatch alarm `name` that goes to ALARM `after` from now (`None`: stays OK).
    pub(crate) fn alarm(&self, name: &str, after: Option<Duration>) {
        let at = after.map(|d| Instant::now() + d);
        self.state().alarms.insert(name.to_owned(), at);
    }

    /// Every DescribeAlarms from now answers `error` (a denial, or a failure).
    pub(crate) fn alarms_fail(&self, error: crate::alarms::AlarmsError) {
        self.state().alarms_error = Some(error);
    }

    /// DescribeAlarms calls so far.
    pub(crate) fn alarm_reads(&self) -> usize {
        self.state().alarm_reads
    }

    /// Instance `id` joins the group `after` from now, running `running`.
    pub(crate) fn joins(&self, after: Duration, id: &str, running: &str, swap: SwapMode) {
        let host = SimHost::booted(running, AgentSim::new(swap));
        self.state()
            .joining
            .push((Instant::now() + after, id.to_owned(), host));
    }

    /// The first signal comes once `key` was written `nth` times (mid-batch).
    pub(crate) fn stop_on(&self, key: &str, nth: usize, handle: StopHandle) {
        self.state().stop_on = Some((key.to_owned(), nth, handle));
    }

    /// The calls ctl made, with when.
    pub(crate) fn calls(&self) -> Vec<(Duration, Call)> {
        self.state().calls.clone()
    }

    /// The writes of tag `key`: (when, instances, value).
    pub(crate) fn writes(&self, key: &str) -> Vec<(Duration, Vec<String>, String)> {
        self.calls()
            .into_iter()
            .filter_map(|(at, c)| match c {
                Call::Tag { ids, key: k, value } if k == key => Some((at, ids, value)),
                _ => None,
            })
            .collect()
    }

    /// The tag each host's agent reports running now (`skiff:release`).
    pub(crate) fn running(&self) -> BTreeMap<String, String> {
        let now = Instant::now();
        let mut s = self.state();
        s.advance(now);
        s.hosts
            .iter()
            .map(|(id, h)| (id.clone(), h.running.tag.to_string()))
            .collect()
    }

    /// What `id`'s agent reported running (`skiff:release`) since boot: (when, tag), the time
    /// as in [`FakeFleet::calls`].
    pub(crate) fn reports(&self, id: &str) -> Vec<(Duration, String)> {
        let now = Instant::now();
        let mut s = self.state();
        s.advance(now);
        s.hosts.get(id).map_or_else(Vec::new, |h| {
            h.reported
                .iter()
                .map(|(at, tag)| (*at - self.started, tag.clone()))
                .collect()
        })
    }

    /// A tag of `id` as it stands.
    pub(crate) fn tag_of(&self, id: &str, key: &str) -> Option<String> {
        self.state().hosts.get(id)?.tags.get(key).cloned()
    }

    /// The group's suspended processes and ctl's mark.
    pub(crate) fn suspended(&self) -> Held {
        let s = self.state();
        Held {
            suspended: s.suspended.clone(),
            marked: s.marked.clone(),
        }
    }
}

/// EC2's tag restrictions (see the module doc).
fn check_tag(key: &str, value: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_alphanumeric() || " _.:/=+-@".contains(c);
    if key.is_empty() || key.chars().count() > 128 || !key.chars().all(allowed) {
        return Err(format!("InvalidParameterValue: tag key {key:?}"));
    }
    if value.chars().count() > 256 || !value.chars().all(allowed) {
        return Err(format!("InvalidParameterValue: tag value {value:?}"));
    }
    Ok(())
}

impl InPlaceFleet for FakeFleet {
    async fn hosts(&self) -> Result<Vec<Host>, InPlaceError> {
        let mut s = self.state();
        s.advance(Instant::now());
        Ok(s.hosts.iter().map(|(id, h)| h.host(id)).collect())
    }

    async fn tag(&self, ids: &[String], key: &str, value: &str) -> Result<(), InPlaceError> {
        let now = Instant::now();
        let mut s = self.state();
        s.advance(now);
        s.calls.push((
            now - self.started,
            Call::Tag {
                ids: ids.to_vec(),
                key: key.to_owned(),
                value: value.to_owned(),
            },
        ));
        let error = |detail: String| InPlaceError::Tag {
            key: key.to_owned(),
            ids: ids.join(" "),
            detail,
        };
        check_tag(key, value).map_err(error)?;
        if let Some(gone) = ids.iter().find(|id| !s.hosts.contains_key(*id)) {
            return Err(error(format!(
                "InvalidInstanceID.NotFound: the instance ID '{gone}' does not exist"
            )));
        }
        for id in ids {
            let h = s.hosts.get_mut(id).expect("checked");
            h.tags.insert(key.to_owned(), value.to_owned());
        }
        // The agents read their instructions on their next turn (well within ctl's poll).
        s.advance(now);
        let writes = s
            .calls
            .iter()
            .filter(|(_, c)| matches!(c, Call::Tag { key: k, .. } if k == key))
            .count();
        if let Some((_, _, handle)) = s
            .stop_on
            .as_ref()
            .filter(|(k, nth, _)| k == key && *nth == writes)
        {
            handle.stop("SIGTERM");
        }
        Ok(())
    }

    async fn health(&self) -> Result<Health, InPlaceError> {
        let now = Instant::now();
        let mut s = self.state();
        s.advance(now);
        if !s.target_group {
            return Ok(None);
        }
        Ok(Some(
            s.hosts
                .iter()
                .map(|(id, h)| (id.clone(), h.lb_state(now).to_owned()))
                .collect(),
        ))
    }

    async fn held(&self) -> Result<Held, InPlaceError> {
        Ok(self.suspended())
    }

    /// DescribeAlarms: of `names`, those in ALARM now; a name the account does not have is
    /// not (DescribeAlarms leaves it out of its answer).
    async fn firing(&self, names: &[String]) -> Result<Vec<String>, InPlaceError> {
        let now = Instant::now();
        let mut s = self.state();
        s.alarm_reads += 1;
        if let Some(e) = &s.alarms_error {
            return Err(e.clone().into());
        }
        Ok(names
            .iter()
            .filter(|n| {
                s.alarms
                    .get(*n)
                    .is_some_and(|at| at.is_some_and(|at| at <= now))
            })
            .cloned()
            .collect())
    }

    async fn hold(&self, processes: &[String], suspend: bool) -> Result<(), InPlaceError> {
        let now = Instant::now();
        let mut s = self.state();
        s.calls.push((
            now - self.started,
            Call::Hold {
                processes: processes.to_vec(),
                suspend,
            },
        ));
        if suspend {
            s.marked = processes.to_vec();
            for p in processes {
                if !s.suspended.contains(p) {
                    s.suspended.push(p.clone());
                }
            }
        } else {
            s.suspended.retain(|p| !processes.contains(p));
            s.marked.clear();
        }
        Ok(())
    }
}
