//! What the person or pipeline watching sees: the events of a release printed as JSON lines,
//! a progress bar on a terminal, or plain lines; and the [`Standing`], the state folded from the
//! same events, which says where a release stands and how to finish it when a second signal
//! ends ctl at once.

use std::io::{IsTerminal, Write};

use skiff_release::Release;

use crate::inplace::RolloutStep;
use crate::ship::{Event, Outcome, Purpose};

/// Prints events.
#[derive(Debug)]
pub struct Printer {
    json: bool,
    tty: bool,
    last: Option<String>,
    bar_open: bool,
}

impl Printer {
    pub fn new(json: bool) -> Self {
        Printer {
            json,
            tty: std::io::stderr().is_terminal(),
            last: None,
            bar_open: false,
        }
    }

    pub fn event(&mut self, e: &Event) {
        if self.json {
            if let Ok(line) = serde_json::to_string(e) {
                println!("{line}");
            }
            return;
        }
        if let Event::Progress { purpose, refresh } = e {
            let pct = refresh.percent.unwrap_or(0).clamp(0, 100);
            let line = format!(
                "{} refresh {}: {:?} {pct}%",
                what(*purpose),
                refresh.id,
                refresh.state
            );
            if self.tty {
                let filled = usize::try_from(pct / 5).unwrap_or(0);
                eprint!(
                    "\r[{}{}] {line}   ",
                    "#".repeat(filled),
                    ".".repeat(20 - filled)
                );
                let _ = std::io::stderr().flush();
                self.bar_open = true;
            } else if self.last.as_deref() != Some(line.as_str()) {
                eprintln!("{line}");
                self.last = Some(line);
            }
            return;
        }
        self.finish_bar();
        match e {
            Event::Resolved { image, digest } => eprintln!("resolved {image} -> {digest}"),
            Event::Waiting { detail } => eprintln!("waiting: {detail}"),
            Event::Locked { lock, owner } => eprintln!("locked {lock} as {owner}"),
            Event::LockHeld { lock, holder } => {
                eprintln!("warning: the lock {lock} is held by {holder}")
            }
            Event::Unlocked { lock } => eprintln!("unlocked {lock}"),
            Event::LockLost { lock, detail } => {
                eprintln!("warning: the lock {lock} was not removed: {detail}")
            }
            Event::Plan {
                parameter,
                old,
                new,
            } => eprintln!(
                "{parameter}:\n  old: {}\n  new: {new}",
                old.as_deref().unwrap_or("(none)")
            ),
            Event::Written {
                purpose,
                parameter,
                version,
                ..
            } => eprintln!(
                "wrote {parameter} (version {version}{}), read back ok",
                match purpose {
                    Purpose::Release => "",
                    Purpose::Rollback => ", the previous release",
                }
            ),
            Event::RefreshStarted {
                purpose,
                id,
                alarms,
            } => eprintln!(
                "started instance refresh {id} ({}), {}",
                what(*purpose),
                if alarms.is_empty() {
                    "watching no alarm".to_owned()
                } else {
                    format!(
                        "failing if any of these alarms goes to ALARM: {}",
                        alarms.join(", ")
                    )
                }
            ),
            Event::Stopping { signal } => eprintln!(
                "{signal}: stopping; cancelling the refresh (in place: telling the switched instances) and putting the previous release back (a second signal exits at once)"
            ),
            Event::Cancelling { id } => eprintln!("cancelling instance refresh {id}"),
            Event::LockUnknown { detail } => {
                eprintln!("warning: cannot tell whether a release is running: {detail}")
            }
            Event::RollingBack { reason, to } => {
                eprintln!("failed: {reason}\nrolling back to {to}")
            }
            Event::Rollout(step) => eprintln!("{}", rollout_line(step)),
            Event::Signature(verdict) => eprintln!("{verdict}"),
            Event::Progress { .. } => {}
        }
    }

    pub fn finish_bar(&mut self) {
        if self.bar_open {
            eprintln!();
            self.bar_open = false;
        }
    }
}

/// One line per in-place step, `in-place:` first, for people and the fleet box's bench. Pure.
pub fn rollout_line(step: &RolloutStep) -> String {
    let list = |ids: &[String]| {
        if ids.is_empty() {
            "none".to_owned()
        } else {
            ids.join(" ")
        }
    };
    match step {
        RolloutStep::Plan {
            release,
            instances,
            swap,
            on_target,
            batches,
            bake_secs,
        } => format!(
            "in-place: {release} on {instances} instance(s), {swap} swaps: {} batch(es) [{}], bake {bake_secs}s; already on it: {}",
            batches.len(),
            batches
                .iter()
                .map(|b| b.join(" "))
                .collect::<Vec<_>>()
                .join("] ["),
            list(on_target)
        ),
        RolloutStep::Pulling { release, instances } => {
            format!("in-place: pull {release} on {}", list(instances))
        }
        RolloutStep::Pulled { instances, secs } => {
            format!("in-place: pulled on {} in {secs}s", list(instances))
        }
        RolloutStep::Switching {
            batch,
            batches,
            release,
            instances,
        } => format!(
            "in-place: batch {batch}/{batches}: switch {} to {release}",
            list(instances)
        ),
        RolloutStep::Healthy {
            batch,
            batches,
            instances,
            secs,
        } => format!(
            "in-place: batch {batch}/{batches}: {} healthy on the new release in {secs}s",
            list(instances)
        ),
        RolloutStep::Waiting { what, pending } => {
            format!("in-place: {what}: waiting for {pending}")
        }
        RolloutStep::Baked {
            batch,
            batches,
            secs,
        } => format!("in-place: batch {batch}/{batches}: baked {secs}s"),
        RolloutStep::Settled { secs } => format!(
            "in-place: no agent flipped back within its handover hold: watched {secs}s after the last batch"
        ),
        RolloutStep::AlarmsUnwatched { alarms, why } => format!(
            "warning: in-place: the release alarms were not watched after the last batch ({}): {why}",
            alarms.join(", ")
        ),
        RolloutStep::AlarmsQuiet { alarms, secs } => format!(
            "in-place: no release alarm fired within {secs}s after the last batch: {}",
            alarms.join(", ")
        ),
        RolloutStep::Held { processes, already } => format!(
            "in-place: the group's {} held while instances swap{}",
            if processes.is_empty() {
                "health checks (already suspended) are".to_owned()
            } else {
                format!("processes {} are", processes.join(" "))
            },
            if already.is_empty() {
                String::new()
            } else {
                format!(" (suspended before, left so: {})", already.join(" "))
            }
        ),
        RolloutStep::Resumed {
            processes,
            error: None,
        } => format!("in-place: resumed {}", processes.join(" ")),
        RolloutStep::Resumed {
            processes,
            error: Some(e),
        } => format!(
            "warning: in-place: {e}; resume them: aws autoscaling resume-processes --auto-scaling-group-name <group> --scaling-processes {}",
            processes.join(" ")
        ),
        RolloutStep::StaleHoldResumed {
            processes,
            error: None,
        } => format!(
            "resumed {}, left suspended by an in-place run that was killed",
            processes.join(" ")
        ),
        RolloutStep::StaleHoldResumed {
            processes,
            error: Some(e),
        } => format!(
            "warning: cannot check or resume what an in-place run that was killed may have left suspended ({e}); see `ctl status`, and if the group shows them held: aws autoscaling resume-processes --auto-scaling-group-name <group> --scaling-processes {}",
            processes.join(" ")
        ),
        RolloutStep::LateJoiners { instances } => format!(
            "in-place: joined during the rollout, switched last: {}",
            list(instances)
        ),
        RolloutStep::Reverting { to, instances, .. } => {
            format!("in-place: revert {} to {to}", list(instances))
        }
        RolloutStep::Reverted { instances, secs } => {
            format!("in-place: {} back in {secs}s", list(instances))
        }
    }
}

fn what(p: Purpose) -> &'static str {
    match p {
        Purpose::Release => "release",
        Purpose::Rollback => "rollback",
    }
}

/// Where a result goes: a success to stdout (for the pipeline), a failure to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// The last word of a release, in text. Pure.
pub fn outcome_text(outcome: &Outcome) -> (Stream, String) {
    match outcome {
        Outcome::DryRun => (Stream::Stdout, "dry run: nothing changed".into()),
        Outcome::Started { refresh_id } => (
            Stream::Stdout,
            format!("instance refresh {refresh_id} started; follow it with `ctl status`"),
        ),
        Outcome::Released {
            refresh_id,
            release,
        } => (
            Stream::Stdout,
            format!("released {release} (instance refresh {refresh_id} successful)"),
        ),
        Outcome::RolledOut {
            release,
            instances,
            switched,
            batches,
            secs,
        } => (
            Stream::Stdout,
            format!(
                "released {release} in place: {} instance(s) run it, {switched} switched in {batches} batch(es) in {secs}s",
                instances.len()
            ),
        ),
        Outcome::RolledBack { reason, to } => (
            Stream::Stderr,
            format!("ctl: release failed: {reason}\nctl: rolled back: the fleet is on {to} again"),
        ),
        Outcome::NotRolledBack { reason, advice } => (
            Stream::Stderr,
            format!("ctl: release failed: {reason}\nctl: NOT rolled back: {advice}"),
        ),
        Outcome::Interrupted {
            signal,
            restored,
            advice,
            ..
        } => (
            Stream::Stderr,
            format!(
                "ctl: interrupted by {signal}: {}\nctl: {advice}",
                match restored {
                    Some(r) => format!("the previous release {r} is back in the parameter"),
                    None => "the previous release was NOT put back".into(),
                }
            ),
        ),
    }
}

/// Where a release stands, folded from its events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Standing {
    parameter: Option<String>,
    lock: Option<String>,
    previous: Option<Release>,
    /// The last write: why, version, value.
    written: Option<(Purpose, i64, String)>,
    /// The last refresh started: why, id.
    refresh: Option<(Purpose, String)>,
    /// In place: the instances switched to the new release, and those told to go back.
    switched: Vec<String>,
    reverting: Vec<String>,
    /// In place: the group's processes suspended for the swaps and not resumed yet.
    held: Vec<String>,
}

impl Standing {
    pub fn record(&mut self, e: &Event) {
        match e {
            Event::Locked { lock, .. } => self.lock = Some(lock.clone()),
            Event::Unlocked { .. } | Event::LockLost { .. } => self.lock = None,
            Event::Plan { parameter, old, .. } => {
                self.parameter = Some(parameter.clone());
                self.previous = old.as_deref().and_then(|v| Release::parse(v).ok());
            }
            Event::Written {
                purpose,
                version,
                value,
                ..
            } => self.written = Some((*purpose, *version, value.clone())),
            Event::RefreshStarted { purpose, id, .. } => {
                self.refresh = Some((*purpose, id.clone()))
            }
            Event::Rollout(RolloutStep::Switching { instances, .. }) => {
                self.switched.extend(instances.iter().cloned())
            }
            Event::Rollout(RolloutStep::Reverting { instances, .. }) => {
                self.reverting = instances.clone()
            }
            Event::Rollout(RolloutStep::Held { processes, .. }) => self.held = processes.clone(),
            Event::Rollout(RolloutStep::Resumed { error: None, .. }) => self.held.clear(),
            _ => {}
        }
    }

    /// The state, and the commands that finish the job, for a ctl leaving in the middle.
    /// `ctl` is how to call ctl for this deployment.
    pub fn report(&self, ctl: &str) -> String {
        let parameter = self.parameter.as_deref().unwrap_or("the release parameter");
        let mut state = Vec::new();
        let mut finish = Vec::new();
        if let Some(lock) = &self.lock {
            state.push(format!("this run still holds the lock {lock}"));
            finish.push(format!("`{ctl} unlock --force`"));
        }
        let back = |finish: &mut Vec<String>| {
            match &self.previous {
            Some(p) => finish.push(format!("`{ctl} rollback --to {}`", p.tag)),
            None => finish.push(format!(
                "no earlier release to go back to: release a good tag with `{ctl} release --tag <tag>`"
            )),
        }
        };
        match (&self.written, &self.refresh) {
            (None, _) => state.push(format!("nothing was written to {parameter}")),
            (Some((Purpose::Release, v, value)), refresh) => {
                state.push(format!(
                    "{parameter} holds the new release {value} (version {v})"
                ));
                match refresh {
                    Some((_, id)) => {
                        state.push(format!(
                            "instance refresh {id} (release) may still be running or cancelling"
                        ));
                        finish.push(format!(
                            "wait until `{ctl} status` shows refresh {id} ended (or `{ctl} status` to see it)"
                        ));
                    }
                    None if !self.switched.is_empty() => {
                        state.push(format!(
                            "in place: switched to it (skiff:target): {}",
                            self.switched.join(" ")
                        ));
                        if let Some(r) = self
                            .written
                            .as_ref()
                            .and_then(|(_, _, value)| Release::parse(value).ok())
                        {
                            finish.push(format!(
                                "`{ctl} release --tag {}` to finish the rollout (it skips the instances already on it)",
                                r.tag
                            ));
                        }
                    }
                    None => state.push("no instance refresh was started".into()),
                }
                back(&mut finish);
            }
            (Some((Purpose::Rollback, v, value)), Some((Purpose::Rollback, id))) => {
                state.push(format!(
                    "{parameter} holds the previous release again: {value} (version {v})"
                ));
                state.push(format!(
                    "rollback refresh {id} is running and brings the fleet back"
                ));
                finish.push(format!(
                    "follow refresh {id} with `{ctl} status`; if it fails, run it again"
                ));
                back(&mut finish);
            }
            (Some((Purpose::Rollback, v, value)), _) => {
                state.push(format!(
                    "{parameter} holds the previous release again: {value} (version {v})"
                ));
                state.push(
                    "the instances replaced so far still run the new release: no rollback refresh was started"
                        .into(),
                );
                back(&mut finish);
            }
        }
        if !self.held.is_empty() {
            state.push(format!(
                "the group's {} stay suspended (marked skiff:held-processes)",
                self.held.join(" ")
            ));
            finish.push(format!(
                "the next in-place `{ctl} release` resumes them at its end (or `aws autoscaling resume-processes --scaling-processes {}`)",
                self.held.join(" ")
            ));
        }
        let mut out = format!("state: {}.", state.join("; "));
        if !finish.is_empty() {
            out.push_str(&format!("\nto finish: {}", finish.join(", then ")));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = r#"{"tag":"v1"}"#;
    const V2: &str = r#"{"tag":"v2"}"#;

    fn plan() -> Event {
        Event::Plan {
            parameter: "/p".into(),
            old: Some(V1.into()),
            new: V2.into(),
        }
    }

    fn locked() -> Event {
        Event::Locked {
            lock: "/p-lock".into(),
            owner: "me".into(),
        }
    }

    fn written(purpose: Purpose, version: i64, value: &str) -> Event {
        Event::Written {
            purpose,
            parameter: "/p".into(),
            version,
            value: value.into(),
        }
    }

    fn started(purpose: Purpose, id: &str) -> Event {
        Event::RefreshStarted {
            purpose,
            id: id.into(),
            alarms: Vec::new(),
        }
    }

    #[test]
    fn report_table() {
        let table: Vec<(&str, Vec<Event>, &[&str])> = vec![
            (
                "locked, nothing written",
                vec![locked(), plan()],
                &["nothing was written to /p", "`ctl unlock --force`"],
            ),
            (
                "new release written, refresh running",
                vec![
                    locked(),
                    plan(),
                    written(Purpose::Release, 7, V2),
                    started(Purpose::Release, "r-1"),
                ],
                &[
                    "/p holds the new release {\"tag\":\"v2\"} (version 7)",
                    "r-1 (release) may still be running",
                    "`ctl unlock --force`, then wait until `ctl status` shows refresh r-1 ended",
                    "then `ctl rollback --to v1`",
                ],
            ),
            (
                "previous put back, rollback refresh running",
                vec![
                    locked(),
                    plan(),
                    written(Purpose::Release, 7, V2),
                    started(Purpose::Release, "r-1"),
                    written(Purpose::Rollback, 8, V1),
                    started(Purpose::Rollback, "r-2"),
                ],
                &[
                    "previous release again",
                    "rollback refresh r-2 is running",
                    "`ctl rollback --to v1`",
                ],
            ),
            (
                "previous put back, no rollback refresh yet",
                vec![
                    locked(),
                    plan(),
                    written(Purpose::Release, 7, V2),
                    started(Purpose::Release, "r-1"),
                    written(Purpose::Rollback, 8, V1),
                ],
                &["no rollback refresh was started", "`ctl rollback --to v1`"],
            ),
            (
                "in place, killed while holding the group's health checks",
                vec![
                    locked(),
                    plan(),
                    written(Purpose::Release, 7, V2),
                    Event::Rollout(RolloutStep::Held {
                        processes: vec!["HealthCheck".into(), "ReplaceUnhealthy".into()],
                        already: vec![],
                    }),
                    Event::Rollout(RolloutStep::Switching {
                        batch: 1,
                        batches: 2,
                        release: "v2".into(),
                        instances: vec!["i-a".into()],
                    }),
                ],
                &[
                    "in place: switched to it (skiff:target): i-a",
                    "`ctl release --tag v2` to finish the rollout",
                    "HealthCheck ReplaceUnhealthy stay suspended",
                    "`ctl rollback --to v1`",
                ],
            ),
            (
                "first release ever, lock already let go",
                vec![
                    locked(),
                    Event::Plan {
                        parameter: "/p".into(),
                        old: None,
                        new: V2.into(),
                    },
                    written(Purpose::Release, 1, V2),
                    Event::Unlocked {
                        lock: "/p-lock".into(),
                    },
                ],
                &[
                    "no instance refresh was started",
                    "no earlier release to go back to",
                ],
            ),
        ];
        for (name, events, needles) in table {
            let mut j = Standing::default();
            for e in &events {
                j.record(e);
            }
            let r = j.report("ctl");
            for n in needles {
                assert!(r.contains(n), "{name}: {n:?} not in:\n{r}");
            }
            let holds_lock = events.iter().all(|e| !matches!(e, Event::Unlocked { .. }));
            assert_eq!(r.contains("unlock --force"), holds_lock, "{name}:\n{r}");
        }
    }
}
