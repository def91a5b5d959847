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
//! ctl reads no alarm (no cloudwatch permission): the names go into StartInstanceRefresh as
//! they are, and the refresh's status reason says which one fired.

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
