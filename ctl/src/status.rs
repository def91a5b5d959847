//! What the fleet runs: the desired release, the refresh, the lock, and each instance with
//! its lifecycle state, the release its agent reported through the instance tag, and its
//! target health (the load balancer's view). [`gather`] reads; [`render`] is the text
//! `ctl status` prints (pure).

use std::fmt::Write;

use skiff_release::{Release, Tag, instance_tags};
use time::OffsetDateTime;

use crate::deployment::Deployment;
use crate::group::{self, GroupError};
use crate::lock::{self, Holder, ReleaseLock};
use crate::refresh::{InstanceRefresher, RefreshInfo};
use crate::store::{ReleaseStore, Stored};
pub use crate::targets::{NOT_REGISTERED, TargetHealth, TargetHealthError, target_health};

/// The instance tag the agent writes once its release is healthy.
pub const RELEASE_TAG_KEY: &str = "skiff:release";

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InstanceView {
    pub id: String,
    pub zone: Option<String>,
    pub lifecycle: Option<String>,
    /// Auto Scaling's health status (Healthy/Unhealthy).
    pub health: Option<String>,
    pub release: Option<String>,
    /// `skiff:target`: the release ctl told it to run (in place), `tag[@digest]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// `skiff:failed`: a release that failed there (its agent rolled back or could not pull).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    /// The target group's state of this instance's target (`healthy`, `unhealthy`, `initial`,
    /// `draining`, `unused`, `unavailable`); `None` when target health is unknown.
    pub target_health: Option<String>,
    /// The reason code the load balancer gives (`Target.FailedHealthChecks`, ...).
    pub target_reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Group(#[from] GroupError),
    #[error("cannot read the release parameter: {0}")]
    Read(String),
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

/// An in-place rollout as the instances' tags show it: how many run the parameter's release,
/// which were told to run it and do not yet, which report it failed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RolloutView {
    /// The parameter's release (`tag[@digest]`), which an in-place rollout writes first.
    pub release: String,
    pub on: usize,
    pub of: usize,
    /// Told to run it (skiff:target), not reporting it yet.
    pub pending: Vec<String>,
    /// Report it failed (skiff:failed).
    pub failed: Vec<String>,
    /// Told to run another release (skiff:target names something else).
    pub elsewhere: Vec<String>,
}

/// The rollout line, when any instance carries a `skiff:target` (the in-place strategy is or
/// was in use). Pure.
pub fn rollout(desired: Option<&Release>, instances: &[InstanceView]) -> Option<RolloutView> {
    let want = desired?;
    if instances.iter().all(|i| i.target.is_none()) {
        return None;
    }
    let named = |v: &Option<String>| crate::inplace::names(v.as_deref(), want);
    let runs = |i: &InstanceView| i.release.as_deref() == Some(want.tag.as_str());
    let ids = |f: &dyn Fn(&InstanceView) -> bool| {
        instances
            .iter()
            .filter(|i| f(i))
            .map(|i| i.id.clone())
            .collect::<Vec<_>>()
    };
    Some(RolloutView {
        release: want.to_string(),
        on: instances.iter().filter(|i| runs(i)).count(),
        of: instances.len(),
        failed: ids(&|i| named(&i.failed)),
        pending: ids(&|i| named(&i.target) && !runs(i) && !named(&i.failed)),
        elsewhere: ids(&|i| i.target.is_some() && !named(&i.target)),
    })
}

/// Put each target's health beside its instance; an instance that is no target of the group
/// is `unused` (not registered), as the load balancer says of such a target. Pure.
pub fn merge_target_health(views: &mut [InstanceView], targets: &[TargetHealth]) {
    for v in views.iter_mut() {
        match targets.iter().find(|t| t.id == v.id) {
            Some(t) => {
                v.target_health = Some(t.state.clone());
                v.target_reason = t.reason.clone();
            }
            None => {
                v.target_health = Some("unused".into());
                v.target_reason = Some(NOT_REGISTERED.into());
            }
        }
    }
}

/// The group's suspended Auto Scaling processes, and which of them a ctl in-place run holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Processes {
    pub suspended: Vec<String>,
    pub held_by_ctl: Vec<String>,
}

/// The group's instances with their reported releases, and its suspended processes: one read
/// of the group ([`group::read`], within EC2's filter limit).
pub async fn instances(
    autoscaling: &aws_sdk_autoscaling::Client,
    ec2: &aws_sdk_ec2::Client,
    asg: &str,
) -> Result<(Vec<InstanceView>, Processes), StatusError> {
    let g = group::read(autoscaling, ec2, asg).await?;
    let views = g
        .members
        .iter()
        .map(|m| InstanceView {
            id: m.id.clone(),
            zone: m.zone.clone(),
            lifecycle: m.lifecycle.clone(),
            health: m.health.clone(),
            release: m.tag(RELEASE_TAG_KEY),
            target: m.tag(instance_tags::TARGET),
            failed: m.tag(instance_tags::FAILED),
            target_health: None,
            target_reason: None,
        })
        .collect();
    let mut held_by_ctl: Vec<String> = g
        .tags
        .get(crate::inplace::HELD_TAG)
        .map(|v| crate::inplace::parse_mark(v))
        .unwrap_or_default();
    held_by_ctl.sort();
    Ok((
        views,
        Processes {
            suspended: g.suspended,
            held_by_ctl,
        },
    ))
}

/// Everything `ctl status` shows. The JSON of `ctl status --json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub deployment: Deployment,
    /// The parameter's value as stored.
    pub release: Option<String>,
    pub desired_tag: Option<String>,
    pub parameter_version: Option<i64>,
    pub refresh: Option<RefreshInfo>,
    pub refresh_error: Option<String>,
    pub lock_name: String,
    pub lock: Option<Holder>,
    pub lock_error: Option<String>,
    pub instances: Vec<InstanceView>,
    /// Why the instances carry no target health, when they do not.
    pub target_health_error: Option<TargetHealthError>,
    /// The same, in words.
    pub target_health_note: Option<String>,
    pub drift: Vec<String>,
    /// The in-place rollout, when the instances carry skiff:target tags.
    pub rollout: Option<RolloutView>,
    /// The group's suspended processes (an in-place rollout holds HealthCheck and
    /// ReplaceUnhealthy while it runs).
    pub processes: Processes,
    /// Who signed the release in the parameter (see [`crate::trust::signers`]); `None`: not
    /// asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<crate::trust::Signer>,
}

/// Read the release, the refresh, the lock, the instances and their target health. Only the
/// release parameter and the group are required; the rest is shown as unknown when it cannot
/// be read.
pub async fn gather<S, R, L>(
    d: &Deployment,
    store: &S,
    refresher: &R,
    lock: &L,
    autoscaling: &aws_sdk_autoscaling::Client,
    ec2: &aws_sdk_ec2::Client,
    elb: &aws_sdk_elasticloadbalancingv2::Client,
) -> Result<Report, StatusError>
where
    S: ReleaseStore,
    R: InstanceRefresher,
    L: ReleaseLock,
{
    let current: Option<Stored> = store
        .read()
        .await
        .map_err(|e| StatusError::Read(e.to_string()))?;
    let (refresh, refresh_error) = match refresher.latest().await {
        Ok(r) => (r, None),
        Err(e) => (None, Some(e.to_string())),
    };
    let (mut instances, processes) = instances(autoscaling, ec2, &d.asg).await?;
    let target_health_error = match &d.target_group {
        None => Some(TargetHealthError::NoTargetGroup),
        Some(tg) => match target_health(elb, tg).await {
            Ok(targets) => {
                merge_target_health(&mut instances, &targets);
                None
            }
            Err(e) => Some(e),
        },
    };
    let (holder, lock_error) = match lock.read().await {
        Ok(v) => (v.map(|v| lock::assess(&v, OffsetDateTime::now_utc())), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let desired = current.as_ref().and_then(|s| s.release.as_ref());
    let drift = drift(desired.map(|r| &r.tag), &instances);
    let rollout = rollout(desired, &instances);
    Ok(Report {
        deployment: d.clone(),
        release: current.as_ref().map(|s| s.value.clone()),
        desired_tag: desired.map(|r| r.tag.to_string()),
        parameter_version: current.as_ref().map(|s| s.version),
        refresh,
        refresh_error,
        lock_name: lock.name().to_owned(),
        lock: holder,
        lock_error,
        instances,
        target_health_note: target_health_error.as_ref().map(ToString::to_string),
        target_health_error,
        drift,
        rollout,
        processes,
        signature: None,
    })
}

/// The text of `ctl status`. Pure.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let d = &r.deployment;
    let _ = writeln!(s, "parameter  {}", d.parameter);
    let _ = writeln!(s, "group      {}", d.asg);
    let _ = writeln!(s, "image      {}", d.image);
    if let Some(tg) = &d.target_group {
        let _ = writeln!(s, "targets    {tg}");
    }
    if !d.alarms.is_empty() {
        let _ = writeln!(s, "alarms     {}", d.alarms.join(", "));
    }
    match (&r.release, r.parameter_version) {
        (Some(v), Some(n)) => {
            let _ = writeln!(s, "release    {v} (version {n})");
        }
        _ => {
            let _ = writeln!(s, "release    (parameter not written yet)");
        }
    }
    if let Some(signer) = &r.signature {
        let _ = writeln!(s, "signature  {signer}");
    }
    let _ = match (&r.refresh, &r.refresh_error) {
        (Some(f), _) => writeln!(
            s,
            "refresh    {} {:?} {}%{}",
            f.id,
            f.state,
            f.percent.unwrap_or(0),
            f.reason
                .as_deref()
                .map(|x| format!(" ({x})"))
                .unwrap_or_default()
        ),
        (None, Some(e)) => writeln!(s, "refresh    unknown: {e}"),
        (None, None) => writeln!(s, "refresh    none"),
    };
    let _ = match (&r.lock, &r.lock_error) {
        (Some(h), _) if h.stale => writeln!(
            s,
            "lock       {} STALE, held by {h}; if that release is over, clear it with `ctl unlock`",
            r.lock_name
        ),
        (Some(h), _) => writeln!(s, "lock       {} held by {h}", r.lock_name),
        (None, Some(e)) => writeln!(s, "lock       unknown: {e}"),
        (None, None) => writeln!(s, "lock       free"),
    };
    if !r.processes.suspended.is_empty() {
        let ours: Vec<&String> = r
            .processes
            .suspended
            .iter()
            .filter(|p| r.processes.held_by_ctl.contains(p))
            .collect();
        let _ = writeln!(
            s,
            "suspended  {}{}",
            r.processes.suspended.join(" "),
            if ours.is_empty() {
                String::new()
            } else {
                format!(
                    " (held by an in-place rollout: {}; the next in-place release resumes them at its end if that one was killed)",
                    ours.iter()
                        .map(|p| p.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            }
        );
    }
    if let Some(ro) = &r.rollout {
        let _ = write!(
            s,
            "rollout    {} of {} instances run {} (in place)",
            ro.on, ro.of, ro.release
        );
        let mut notes = Vec::new();
        if !ro.pending.is_empty() {
            notes.push(format!("pending: {}", ro.pending.join(" ")));
        }
        if !ro.failed.is_empty() {
            notes.push(format!("FAILED: {}", ro.failed.join(" ")));
        }
        if !ro.elsewhere.is_empty() {
            notes.push(format!(
                "told to run another release: {}",
                ro.elsewhere.join(" ")
            ));
        }
        let _ = writeln!(
            s,
            "{}",
            if notes.is_empty() {
                String::new()
            } else {
                format!("; {}", notes.join("; "))
            }
        );
    }
    let _ = writeln!(
        s,
        "\n{:<20}  {:<12}  {:<12}  {:<10}  {:<38}  {:<16}  SKIFF:TARGET",
        "INSTANCE", "ZONE", "LIFECYCLE", "HEALTH", "TARGET HEALTH", "RELEASE"
    );
    for i in &r.instances {
        let dash = || "-".to_string();
        let target = match (&i.target_health, &i.target_reason) {
            (Some(h), Some(why)) if h != "healthy" => format!("{h} ({why})"),
            (Some(h), _) => h.clone(),
            (None, _) => "?".into(),
        };
        let told = match (&i.target, &i.failed) {
            (Some(t), Some(f)) if t == f => format!("{t} (FAILED)"),
            (Some(t), _) => t.clone(),
            (None, _) => dash(),
        };
        let _ = writeln!(
            s,
            "{:<20}  {:<12}  {:<12}  {:<10}  {:<38}  {:<16}  {told}{}",
            i.id,
            i.zone.clone().unwrap_or_else(dash),
            i.lifecycle.clone().unwrap_or_else(dash),
            i.health.clone().unwrap_or_else(dash),
            target,
            i.release.clone().unwrap_or_else(|| "(not reported)".into()),
            if r.drift.contains(&i.id) {
                "  <- drift"
            } else {
                ""
            }
        );
    }
    if let Some(e) = &r.target_health_error {
        let _ = writeln!(s, "\nnote: {e}");
    }
    if !r.drift.is_empty() {
        let _ = writeln!(
            s,
            "\n{} of {} instances do not run the desired release yet",
            r.drift.len(),
            r.instances.len()
        );
    }
    s
}

#[cfg(test)]
mod tests;
