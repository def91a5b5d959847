//! The CloudWatch alarms a release watches. The stack defines them (target 5xx rate, unhealthy
//! hosts) and names them in its output `ReleaseAlarmNames`; ctl hands them to the instance
//! refresh as `Preferences.AlarmSpecification.Alarms`, and the refresh fails when one of them
//! goes to ALARM while it runs or bakes
//! (https://docs.aws.amazon.com/autoscaling/ec2/userguide/instance-refresh-rollback.html,
//! https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_AlarmSpecification.html).
//!
//! Who rolls back: ctl, never the refresh's `AutoRollback`. The release lives in the SSM
//! parameter, not in the launch template: Auto Scaling's rollback would relaunch instances
//! that read the same (failed) release, and it is only available with a desired
//! configuration, which skiff's refreshes do not carry
//! (https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_RefreshPreferences.html,
//! AutoRollback). So the refresh only fails; ctl puts the previous release back (only if the
//! parameter still holds this run's write) and starts the refresh that rolls the fleet to it.
//! That rollback refresh watches no alarm: the alarm that failed the release is still in
//! ALARM, and would fail the refresh that cures it.
//!
//! The alarms need time to fire (issue 18, finding 10): the stack's alarms want two breaching
//! one-minute datapoints, and the load balancer's datapoint of a minute reaches CloudWatch after
//! that minute. A refresh that ends 30 s after its last launch has stopped watching before
//! either could fire. So a refresh watching alarms bakes at least [`window`] after its last
//! replacement (BakeTime: "the amount of time, in seconds, to wait at the end of an instance
//! refresh before the instance refresh is considered complete", during which its alarms still
//! fail it), and an in-place release reads the alarms itself (CloudWatch DescribeAlarms) for
//! one window after its last batch before it counts as done.
//! https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_RefreshPreferences.html
//! https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/AlarmThatSendsEmail.html
//! (evaluation periods and datapoints to alarm; alarms evaluate once a period)
//! https://docs.aws.amazon.com/elasticloadbalancing/latest/application/load-balancer-cloudwatch-metrics.html
//! (ALB metrics in 60-second intervals)

use std::time::Duration;

use aws_sdk_cloudwatch::error::ProvideErrorMetadata;
use aws_sdk_cloudwatch::types::StateValue;

use crate::aws;

/// The release alarms' period (templates/app.yaml: 60 s, as the ALB publishes per minute).
pub const PERIOD: Duration = Duration::from_secs(60);
/// Breaching datapoints before a release alarm fires (templates/app.yaml: 2 of 2).
pub const DATAPOINTS: u32 = 2;
/// How late a minute's datapoint is seen by its alarm: the ALB's datapoint of a minute is
/// published after the minute ends, and the alarm evaluates once a period. An assumption (AWS
/// states no bound): one period for the publication, one for the evaluation.
pub const METRIC_DELAY: Duration = Duration::from_secs(120);

/// How long a release must stay watched after its last instance changed for the alarms to be
/// able to fire: [`DATAPOINTS`] periods plus [`METRIC_DELAY`] (4 minutes).
pub const fn window() -> Duration {
    Duration::from_secs(PERIOD.as_secs() * DATAPOINTS as u64 + METRIC_DELAY.as_secs())
}

/// The BakeTime of a refresh: the `--bake-time` asked, raised to the alarms' `window` (by
/// default [`window`]) when it watches alarms: a shorter bake ends the refresh before they
/// could fire. Pure.
pub fn refresh_bake(
    asked: Option<Duration>,
    alarms: &[String],
    window: Duration,
) -> Option<Duration> {
    if alarms.is_empty() || window.is_zero() {
        return asked;
    }
    Some(asked.map_or(window, |a| a.max(window)))
}

/// What one look at the alarms means for the watch after an in-place release. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watch {
    /// These alarms are in ALARM: the release fails.
    Fired(Vec<String>),
    /// None fired, the window is not over: look again.
    Continue,
    /// None fired within the window: the release is done.
    Passed,
}

/// The watch's decision from the alarms now in ALARM and the time watched. Pure.
pub fn watch(firing: &[String], watched: Duration, window: Duration) -> Watch {
    if !firing.is_empty() {
        Watch::Fired(firing.to_vec())
    } else if watched >= window {
        Watch::Passed
    } else {
        Watch::Continue
    }
}

/// Reads the release alarms' state.
pub trait AlarmStates {
    /// Of `names`, those CloudWatch has in ALARM (a name it does not know is not).
    fn firing(
        &self,
        names: &[String],
    ) -> impl std::future::Future<Output = Result<Vec<String>, AlarmsError>> + Send;
}

/// [`AlarmStates`] over CloudWatch DescribeAlarms (metric and composite alarms, at most 100
/// names a call, paginated).
/// https://docs.aws.amazon.com/AmazonCloudWatch/latest/APIReference/API_DescribeAlarms.html
#[derive(Debug, Clone)]
pub struct CloudWatchAlarms {
    pub client: aws_sdk_cloudwatch::Client,
}

impl AlarmStates for CloudWatchAlarms {
    async fn firing(&self, names: &[String]) -> Result<Vec<String>, AlarmsError> {
        let mut out = Vec::new();
        for chunk in names.chunks(100) {
            let mut token: Option<String> = None;
            loop {
                let page = aws::outlast_throttling(|| {
                    self.client
                        .describe_alarms()
                        .set_alarm_names(Some(chunk.to_vec()))
                        .alarm_types(aws_sdk_cloudwatch::types::AlarmType::MetricAlarm)
                        .alarm_types(aws_sdk_cloudwatch::types::AlarmType::CompositeAlarm)
                        .set_next_token(token.clone())
                        .send()
                })
                .await
                .map_err(|e| {
                    let detail = aws::describe(&e);
                    if aws::is_denied(e.code()) {
                        AlarmsError::Denied(detail)
                    } else {
                        AlarmsError::Describe(detail)
                    }
                })?;
                let metric = page
                    .metric_alarms()
                    .iter()
                    .map(|a| (a.alarm_name(), a.state_value()));
                let composite = page
                    .composite_alarms()
                    .iter()
                    .map(|a| (a.alarm_name(), a.state_value()));
                for (name, state) in metric.chain(composite) {
                    if let (Some(n), Some(StateValue::Alarm)) = (name, state) {
                        out.push(n.to_owned());
                    }
                }
                token = page.next_token().map(str::to_owned);
                if token.is_none() {
                    break;
                }
            }
        }
        Ok(out)
    }
}

/// At most this many alarms per refresh (AlarmSpecification.Alarms).
pub const MAX_ALARMS: usize = 10;
/// Longest alarm name (AlarmSpecification.Alarms, length constraints).
pub const MAX_NAME: usize = 255;

/// Where the alarms of a release come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `--alarm NAME` (repeatable): exactly these.
    Flags,
    /// The stack's output ReleaseAlarmNames.
    Stack,
    /// `--no-alarms`.
    Disabled,
    /// Neither flags nor a stack output: nothing to watch.
    None,
}

/// The alarms a release watches, and why these.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Selection {
    pub alarms: Vec<String>,
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AlarmsError {
    #[error(
        "{count} alarms given; an instance refresh watches at most {MAX_ALARMS}: pass fewer --alarm (or combine them in a composite alarm)"
    )]
    TooMany { count: usize },
    #[error("invalid alarm name {name:?}: {why}; pass the CloudWatch alarm's name")]
    Name { name: String, why: &'static str },
    #[error(
        "cannot read the release alarms ({0}); the deployer needs cloudwatch:DescribeAlarms on them (the stack's DeployerPolicy), or release with --no-alarms"
    )]
    Describe(String),
    #[error(
        "not allowed to read the release alarms ({0}): grant the deployer cloudwatch:DescribeAlarms on them (update the stack: its DeployerPolicy has it), or release with --no-alarms"
    )]
    Denied(String),
}

/// The names of a comma-separated list (the stack output), blanks dropped. Pure.
pub fn parse_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn check_name(name: &str) -> Result<(), AlarmsError> {
    let bad = |why| {
        Err(AlarmsError::Name {
            name: name.to_owned(),
            why,
        })
    };
    if name.trim().is_empty() {
        return bad("empty");
    }
    if name.chars().count() > MAX_NAME {
        return bad("longer than 255 characters");
    }
    if name
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        return bad("contains a control character");
    }
    Ok(())
}

/// Which alarms a release watches: none with `--no-alarms`, exactly the `--alarm`s when given,
/// else the stack's. Pure.
pub fn choose(
    no_alarms: bool,
    flags: &[String],
    from_stack: &[String],
) -> Result<Selection, AlarmsError> {
    let (alarms, source) = if no_alarms {
        (Vec::new(), Source::Disabled)
    } else if !flags.is_empty() {
        (flags.to_vec(), Source::Flags)
    } else if !from_stack.is_empty() {
        (from_stack.to_vec(), Source::Stack)
    } else {
        (Vec::new(), Source::None)
    };
    let mut unique: Vec<String> = Vec::with_capacity(alarms.len());
    for a in alarms {
        check_name(&a)?;
        if !unique.contains(&a) {
            unique.push(a);
        }
    }
    if unique.len() > MAX_ALARMS {
        return Err(AlarmsError::TooMany {
            count: unique.len(),
        });
    }
    Ok(Selection {
        alarms: unique,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn refresh_bake_table() {
        let s = Duration::from_secs;
        let alarms = v(&["a-5xx"]);
        assert_eq!(window(), s(240), "two one-minute datapoints plus the delay");
        let w = window();
        for (asked, watched, win, want) in [
            (None, v(&[]), w, None),
            (Some(s(30)), v(&[]), w, Some(s(30))),
            (None, alarms.clone(), w, Some(w)),
            (Some(s(30)), alarms.clone(), w, Some(w)),
            (Some(s(600)), alarms.clone(), w, Some(s(600))),
            (Some(s(30)), alarms.clone(), s(5), Some(s(30))),
            (None, alarms.clone(), s(5), Some(s(5))),
            (None, alarms.clone(), s(0), None),
        ] {
            assert_eq!(
                refresh_bake(asked, &watched, win),
                want,
                "{asked:?} watching {watched:?} for {win:?}"
            );
        }
    }

    #[test]
    fn watch_table() {
        let s = Duration::from_secs;
        let w = window();
        for (firing, watched, want) in [
            (v(&[]), s(0), Watch::Continue),
            (v(&[]), s(239), Watch::Continue),
            (v(&[]), s(240), Watch::Passed),
            (v(&["a"]), s(0), Watch::Fired(v(&["a"]))),
            (v(&["a", "b"]), s(500), Watch::Fired(v(&["a", "b"]))),
        ] {
            assert_eq!(
                watch(&firing, watched, w),
                want,
                "{firing:?} after {watched:?}"
            );
        }
    }

    #[test]
    fn parse_list_table() {
        let table: [(&str, Vec<String>); 5] = [
            ("a,b", v(&["a", "b"])),
            (" a , b ,", v(&["a", "b"])),
            ("", v(&[])),
            (",,", v(&[])),
            ("skiff-m-target-5xx-rate", v(&["skiff-m-target-5xx-rate"])),
        ];
        for (input, want) in table {
            assert_eq!(parse_list(input), want, "{input:?}");
        }
    }

    /// Name, --no-alarms, --alarm flags, stack output, and the wanted alarms and source or
    /// error text.
    type Row = (
        &'static str,
        bool,
        Vec<String>,
        Vec<String>,
        Result<(Vec<String>, Source), &'static str>,
    );

    #[test]
    fn choose_table() {
        let stack = v(&["s-5xx", "s-hosts"]);
        let eleven: Vec<String> = (0..11).map(|i| format!("a{i}")).collect();
        let long = "x".repeat(256);
        let table: Vec<Row> = vec![
            (
                "stack by default",
                false,
                v(&[]),
                stack.clone(),
                Ok((stack.clone(), Source::Stack)),
            ),
            (
                "flags replace the stack's",
                false,
                v(&["mine"]),
                stack.clone(),
                Ok((v(&["mine"]), Source::Flags)),
            ),
            (
                "--no-alarms",
                true,
                v(&[]),
                stack.clone(),
                Ok((v(&[]), Source::Disabled)),
            ),
            (
                "no stack output, no flags",
                false,
                v(&[]),
                v(&[]),
                Ok((v(&[]), Source::None)),
            ),
            (
                "duplicates once",
                false,
                v(&["a", "a", "b"]),
                v(&[]),
                Ok((v(&["a", "b"]), Source::Flags)),
            ),
            ("more than 10", false, eleven, v(&[]), Err("at most 10")),
            ("empty name", false, v(&[" "]), v(&[]), Err("empty")),
            ("too long", false, vec![long], v(&[]), Err("255")),
            (
                "control character",
                false,
                v(&["a\u{7}"]),
                v(&[]),
                Err("control"),
            ),
        ];
        for (name, no, flags, from_stack, want) in table {
            let got = choose(no, &flags, &from_stack);
            match (got, want) {
                (Ok(sel), Ok((alarms, source))) => {
                    assert_eq!((sel.alarms, sel.source), (alarms, source), "{name}")
                }
                (Err(e), Err(needle)) => assert!(e.to_string().contains(needle), "{name}: {e}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }
}
