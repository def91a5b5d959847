//! The in-place rollout's decisions, all pure: which instances need switching and in which
//! batches, every wait's verdict from the instances' tags and the load balancer's view, and
//! what to revert. Their tables are in `inplace/tests.rs`.

use super::*;

/// Whether tag value `value` names `release`: the protocol's reading, in the contract crate.
pub use skiff_release::instance_tags::names;

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

/// `canary`: the first batch holds one instance ([`batches`]; handover swaps, not for the late
/// joiners, whose rollout already had its canary).
pub fn plan(hosts: &[Host], new: &Release, batch: Option<BatchSize>, canary: bool) -> Plan {
    let (done, todo): (Vec<&Host>, Vec<&Host>) = hosts
        .iter()
        .partition(|h| runs(h, new) && (h.target.is_none() || names(h.target.as_deref(), new)));
    let todo: Vec<String> = todo.iter().map(|h| h.id.clone()).collect();
    Plan {
        on_target: done.iter().map(|h| h.id.clone()).collect(),
        batches: batches(&todo, batch, hosts.len(), canary),
    }
}

/// Drain swaps: refuse batches of which one holds every target the load balancer calls
/// healthy (without a target group: every instance of the group). While they drain nothing
/// healthy is left, and an ALB then fails open, routing to every target, draining ones
/// included. Nothing healthy at all: nothing to take out, not refused. Pure.
/// https://docs.aws.amazon.com/elasticloadbalancing/latest/application/target-group-health-checks.html
pub fn check_drain_all(
    batches: &[Vec<String>],
    hosts: &[Host],
    health: &Health,
) -> Result<(), InPlaceError> {
    let healthy: Vec<&str> = match health {
        Some(map) => map
            .iter()
            .filter(|(_, state)| state.as_str() == "healthy")
            .map(|(id, _)| id.as_str())
            .collect(),
        None => hosts.iter().map(|h| h.id.as_str()).collect(),
    };
    if healthy.is_empty() {
        return Ok(());
    }
    for (n, batch) in batches.iter().enumerate() {
        if healthy.iter().all(|id| batch.iter().any(|b| b == id)) {
            return Err(InPlaceError::DrainAll {
                batch: n + 1,
                ids: batch.join(" "),
                healthy: healthy.join(" "),
            });
        }
    }
    Ok(())
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

/// What a batch's wait watches beside the batch itself.
#[derive(Debug, Clone, Copy)]
pub struct BatchWatch<'a> {
    pub swap: SwapMode,
    /// The instances switched by the batches before: an agent that answers `new` failed after
    /// its batch was done (a handover flipped back within the agent's hold) fails this one.
    pub earlier: &'a [String],
    /// The load balancer's view just before the batch was switched (handover: a target healthy
    /// then must stay healthy).
    pub before: &'a Health,
}

/// A batch switched to `new`: done when each reports it running AND the load balancer calls it
/// healthy; failed when one's agent reports `new` failed (it rolled itself back), also one of
/// the batches before. Drain: a target the load balancer took out is waited for until it
/// calls it healthy again (its detection window). Handover: nothing is waited for that the
/// load balancer would have to notice; a target healthy before the switch that the load
/// balancer calls anything else meanwhile fails the batch at once. Pure.
pub fn batch_verdict(
    hosts: &[Host],
    health: &Health,
    ids: &[String],
    new: &Release,
    watch: &BatchWatch<'_>,
) -> Verdict {
    let flipped_back = hosts
        .iter()
        .find(|h| watch.earlier.contains(&h.id) && names(h.failed.as_deref(), new));
    if let Some(h) = flipped_back {
        return Verdict::Failed(
            h.id.clone(),
            format!(
                "its agent reports {new} failed after its batch was done (it went back to the release before)"
            ),
        );
    }
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
    let verdict = runs_healthy_verdict(hosts, health, ids, new);
    if watch.swap == SwapMode::Drain || matches!(verdict, Verdict::Failed(..)) {
        return verdict;
    }
    for id in ids {
        if hosts.iter().any(|h| &h.id == id)
            && lb_state(watch.before, id).is_ok()
            && let Err(state) = lb_state(health, id)
        {
            return Verdict::Failed(
                id.clone(),
                format!(
                    "the load balancer calls it {state} during a handover (it called it healthy before the switch), which a handover never does; if its agent swaps by drain (an instance launched before the stack's SwapMode changed), replace the instances first (--strategy refresh)"
                ),
            );
        }
    }
    verdict
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

/// A host this run told `new` (`skiff:target`) before the revert: its agent finishes a swap
/// before it reads the next instruction, so until that swap is over it may still report the
/// release before while it is about to run `new`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Told {
    pub id: String,
    /// Since its `skiff:target` named `new`.
    pub ago: Duration,
    /// Seen since then reporting `new` running or failed: its swap to `new` is over.
    pub over: bool,
}

/// Whether `host`'s own answers show its swap to `new` over: it runs `new`, or reports it
/// failed (it went back). Pure.
pub fn swap_over(host: &Host, new: &Release) -> bool {
    runs(host, new) || names(host.failed.as_deref(), new)
}

/// The least [`swap_window`] allows a host caught mid-swap: its agent's hold after a handover's
/// flip (5 s by default), a loop turn to read the revert, and the tag's way to ctl.
pub const SWAP_WINDOW_FLOOR: Duration = Duration::from_secs(30);

/// How long a host told `new` that never reported it may still be in its swap to `new`: three
/// times the slowest swap of this run's batches (told -> healthy on `new`), at least
/// [`SWAP_WINDOW_FLOOR`], at most `batch_timeout`; before any batch finished, `batch_timeout`.
/// A host that saw the revert's target before it read `new` never reports `new` at all, so
/// without a measure the revert waited the whole `--batch-timeout` (fleet scenario 20: 300 s
/// for a SIGTERM right after batch 2's target). A host slower than this is declared back while
/// it may still swap to `new`; it then reads the revert and swaps back by itself. Pure.
pub fn swap_window(slowest: Option<Duration>, batch_timeout: Duration) -> Duration {
    match slowest {
        Some(s) => (s * 3).max(SWAP_WINDOW_FLOOR).min(batch_timeout),
        None => batch_timeout,
    }
}

/// The revert of hosts that may be caught in a swap to `new`: [`revert_verdict`], and each of
/// `told` still in the group whose swap to `new` is not seen over (earlier or in this read) is
/// waited for until `window` (the longest a swap may take, [`swap_window`]) has passed since
/// its target was written; until then its report of `prev` may be from before that swap.
/// Pure.
pub fn revert_after_swaps_verdict(
    hosts: &[Host],
    health: &Health,
    ids: &[String],
    (prev, new): (&Release, &Release),
    told: &[Told],
    window: Duration,
) -> Verdict {
    let mut pending = match revert_verdict(hosts, health, ids, prev) {
        Verdict::Done => Vec::new(),
        Verdict::Pending(p) => p,
        failed @ Verdict::Failed(..) => return failed,
    };
    for t in told {
        let Some(h) = hosts.iter().find(|h| h.id == t.id) else {
            continue;
        };
        if !ids.contains(&t.id) || t.over || swap_over(h, new) || t.ago >= window {
            continue;
        }
        if !pending.iter().any(|(id, _)| id == &t.id) {
            pending.push((
                t.id.clone(),
                format!(
                    "never reported {new}, may still be in the swap to it: waited for until {}s after it was told",
                    secs(window)
                ),
            ));
        }
    }
    if pending.is_empty() {
        Verdict::Done
    } else {
        Verdict::Pending(pending)
    }
}
