//! Completing the instance's lifecycle hooks (launch: CONTINUE or ABANDON; terminate:
//! CONTINUE once drained), with the pure retry decision ([`next_step`], [`classify`]) and the
//! per-hook progress that lets later loop turns retry a completion that failed for a transient
//! reason.

use std::sync::Mutex;
use std::time::Duration;

use aws_sdk_autoscaling::error::ProvideErrorMetadata;
use tokio::time::{Instant, sleep_until, timeout};

use super::{ACTION_LIMIT, FleetError, OnEc2, detail, retryable};
use crate::backoff::{Backoff, jitter};

/// Upper bound for one CompleteLifecycleAction call (the SDK's own retries included).
const ATTEMPT_LIMIT: Duration = Duration::from_secs(10);
/// Waits between two attempts at completing a hook: 1 s doubling, at most 60 s.
const HOOK_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
/// After this long no lifecycle action can still be waiting: a hook's heartbeat timeout is at
/// most 7200 s (https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_PutLifecycleHook.html),
/// and Auto Scaling applies the default result when it passes.
pub const HOOK_RETRY_FOR: Duration = Duration::from_secs(7200);

/// What one attempt at completing a lifecycle action came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Completed,
    /// Auto Scaling has no pending action for this instance and hook: it timed out, someone
    /// else completed it, or the agent restarted long after the launch.
    NoActiveAction,
    /// Throttling, a 5xx, a timeout, the network: worth another try.
    Transient,
    /// Access denied, an unknown hook, no group: retrying will not help.
    Fatal,
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Done with this hook (completed, or nothing left to complete).
    Stop,
    /// Try again after this long (before jitter).
    RetryAfter(Duration),
    /// Transient failures for longer than any heartbeat: Auto Scaling has decided by now.
    GiveUp,
}

/// The pure retry decision for hook completion: `failures` counts failed attempts so far,
/// this one included; `since_first` is the time since the first attempt.
pub fn next_step(attempt: Attempt, failures: u32, since_first: Duration) -> NextStep {
    match attempt {
        Attempt::Completed | Attempt::NoActiveAction | Attempt::Fatal => NextStep::Stop,
        Attempt::Transient if since_first >= HOOK_RETRY_FOR => NextStep::GiveUp,
        Attempt::Transient => NextStep::RetryAfter(HOOK_BACKOFF.delay(failures)),
    }
}

/// Classify an Auto Scaling error by its code and message.
pub fn classify(code: Option<&str>, message: Option<&str>) -> Attempt {
    // CompleteLifecycleAction answers ValidationError "No active Lifecycle Action found with
    // instance ID ..." when the action has already ended.
    if code == Some("ValidationError")
        && message.is_some_and(|m| m.contains("No active Lifecycle Action"))
    {
        return Attempt::NoActiveAction;
    }
    if retryable(code) {
        Attempt::Transient
    } else {
        Attempt::Fatal
    }
}

/// How completion of one hook stands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Progress {
    /// Not asked for yet.
    Idle,
    Pending {
        result: &'static str,
        failures: u32,
        first: Instant,
        next_at: Instant,
    },
    /// Completed, found ended, given up, or failed for good: never tried again this boot.
    Finished,
}

#[derive(Debug)]
pub(super) struct Hook {
    pub(super) name: Option<String>,
    progress: Mutex<Progress>,
}

impl Hook {
    pub(super) fn new(name: Option<String>) -> Self {
        Hook {
            name,
            progress: Mutex::new(Progress::Idle),
        }
    }

    pub(super) fn get(&self) -> Progress {
        self.progress
            .lock()
            .map(|p| *p)
            .unwrap_or(Progress::Finished)
    }

    fn set(&self, p: Progress) {
        if let Ok(mut g) = self.progress.lock() {
            *g = p;
        }
    }
}

impl OnEc2 {
    /// Ask for `hook` to be completed with `result` (once per boot), and try within
    /// [`ACTION_LIMIT`]; what is left is retried by [`OnEc2::drive`] on later loop turns.
    pub(super) async fn complete(&self, hook: &Hook, result: &'static str) {
        if hook.name.is_none() || hook.get() != Progress::Idle {
            return;
        }
        let now = Instant::now();
        hook.set(Progress::Pending {
            result,
            failures: 0,
            first: now,
            next_at: now,
        });
        self.drive(hook).await;
    }

    /// Attempt a pending completion whenever its time has come, within [`ACTION_LIMIT`].
    pub(super) async fn drive(&self, hook: &Hook) {
        let Some(name) = &hook.name else { return };
        let budget_end = Instant::now() + ACTION_LIMIT;
        loop {
            let Progress::Pending {
                result,
                failures,
                first,
                next_at,
            } = hook.get()
            else {
                return;
            };
            // Only start an attempt that can finish inside the budget.
            if next_at.max(Instant::now()) + ATTEMPT_LIMIT > budget_end {
                return;
            }
            sleep_until(next_at).await;
            let (attempt, why) = self.attempt(name, result).await;
            let failures = failures + u32::from(attempt == Attempt::Transient);
            match next_step(attempt, failures, first.elapsed()) {
                NextStep::Stop => {
                    hook.set(Progress::Finished);
                    match attempt {
                        Attempt::Completed => {
                            tracing::info!(hook = %name, result, attempts = failures + 1, "lifecycle action completed")
                        }
                        Attempt::NoActiveAction => {
                            tracing::info!(hook = %name, result, "no pending lifecycle action for this instance (already ended)")
                        }
                        _ => {
                            tracing::error!(hook = %name, result, error = %why, "cannot complete the lifecycle hook; Auto Scaling decides at the hook timeout")
                        }
                    }
                    return;
                }
                NextStep::GiveUp => {
                    hook.set(Progress::Finished);
                    tracing::error!(hook = %name, result, failures, error = %why, "gave up completing the lifecycle hook; Auto Scaling has applied the hook's default result by now");
                    return;
                }
                NextStep::RetryAfter(wait) => {
                    if failures == 1 {
                        tracing::warn!(hook = %name, result, error = %why, "cannot complete the lifecycle hook yet; retrying with backoff");
                    } else {
                        tracing::debug!(hook = %name, result, failures, error = %why, "retrying");
                    }
                    hook.set(Progress::Pending {
                        result,
                        failures,
                        first,
                        next_at: Instant::now() + jitter(wait),
                    });
                }
            }
        }
    }

    /// One CompleteLifecycleAction call, bounded by [`ATTEMPT_LIMIT`].
    async fn attempt(&self, hook: &str, result: &'static str) -> (Attempt, String) {
        let group = match self.group().await {
            Ok(g) => g,
            Err((e, transient)) => {
                self.metrics.fleet_error(e.metric_kind());
                let a = if transient {
                    Attempt::Transient
                } else {
                    Attempt::Fatal
                };
                return (a, e.to_string());
            }
        };
        let call = self
            .autoscaling
            .complete_lifecycle_action()
            .auto_scaling_group_name(&group)
            .lifecycle_hook_name(hook)
            .instance_id(&self.instance_id)
            .lifecycle_action_result(result)
            .send();
        match timeout(ATTEMPT_LIMIT, call).await {
            Ok(Ok(_)) => (Attempt::Completed, String::new()),
            Ok(Err(e)) => {
                let why = FleetError::Complete {
                    hook: hook.to_owned(),
                    result,
                    detail: detail(&e),
                };
                let attempt = classify(e.code(), e.message());
                // An action already ended is how a hook finishes late, not a failure.
                if attempt != Attempt::NoActiveAction {
                    self.metrics.fleet_error(why.metric_kind());
                }
                (attempt, why.to_string())
            }
            Err(_) => {
                let why = FleetError::TimedOut(ATTEMPT_LIMIT);
                self.metrics.fleet_error(why.metric_kind());
                (Attempt::Transient, why.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_decisions() {
        let s = Duration::from_secs;
        let table = [
            (Attempt::Completed, 0, s(0), NextStep::Stop),
            (Attempt::Completed, 5, s(100), NextStep::Stop),
            (Attempt::NoActiveAction, 0, s(0), NextStep::Stop),
            (Attempt::Fatal, 1, s(0), NextStep::Stop),
            (Attempt::Transient, 1, s(0), NextStep::RetryAfter(s(1))),
            (Attempt::Transient, 2, s(1), NextStep::RetryAfter(s(2))),
            (Attempt::Transient, 5, s(15), NextStep::RetryAfter(s(16))),
            (Attempt::Transient, 7, s(63), NextStep::RetryAfter(s(60))),
            (
                Attempt::Transient,
                1000,
                s(7000),
                NextStep::RetryAfter(s(60)),
            ),
            (Attempt::Transient, 1000, s(7200), NextStep::GiveUp),
        ];
        for (attempt, failures, since, want) in table {
            assert_eq!(
                next_step(attempt, failures, since),
                want,
                "{attempt:?} {failures} {since:?}"
            );
        }
    }

    #[test]
    fn error_classes() {
        let table = [
            (
                Some("Throttling"),
                Some("Rate exceeded"),
                Attempt::Transient,
            ),
            (Some("ServiceUnavailable"), None, Attempt::Transient),
            (Some("InternalFailure"), None, Attempt::Transient),
            (None, None, Attempt::Transient),
            (
                Some("ValidationError"),
                Some("No active Lifecycle Action found with instance ID i-1"),
                Attempt::NoActiveAction,
            ),
            (
                Some("ValidationError"),
                Some("No Lifecycle Hook found"),
                Attempt::Fatal,
            ),
            (Some("AccessDenied"), Some("not authorized"), Attempt::Fatal),
        ];
        for (code, message, want) in table {
            assert_eq!(classify(code, message), want, "{code:?} {message:?}");
        }
    }
}
