//! ctl's exit codes: the one list the code returns and the help text prints. CI (Jenkins)
//! decides the build's result from them, so each says what state the fleet is in.

use std::fmt::Write;

/// How a ctl command ended, as a process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitCode {
    /// Done: released (every instance replaced and healthy), or the command succeeded.
    Success,
    /// The release failed or was interrupted, and the previous release is back in the
    /// parameter; the fleet was rolled back to it (after an interruption: is being rolled
    /// back by the refresh the output names).
    RolledBack,
    /// Refused, nothing changed: bad input or flags, unknown image, an image no trusted key
    /// signed (or whose signature cannot be checked), registry or AWS unreachable,
    /// interrupted before anything was written.
    Refused,
    /// Failed and not rolled back, the rollback failed, someone else changed the parameter
    /// meanwhile, or the state is unknown: look now.
    NotRolledBack,
    /// Another release holds the lock or a refresh runs on the group; nothing changed.
    Busy,
}

impl ExitCode {
    pub const ALL: [ExitCode; 5] = [
        ExitCode::Success,
        ExitCode::RolledBack,
        ExitCode::Refused,
        ExitCode::NotRolledBack,
        ExitCode::Busy,
    ];

    pub fn code(self) -> u8 {
        match self {
            ExitCode::Success => 0,
            ExitCode::RolledBack => 1,
            ExitCode::Refused => 2,
            ExitCode::NotRolledBack => 3,
            ExitCode::Busy => 4,
        }
    }

    /// One line for `--help` and the README.
    pub fn meaning(self) -> &'static str {
        match self {
            ExitCode::Success => "success (released: every instance replaced and healthy)",
            ExitCode::RolledBack => {
                "the release failed or was interrupted; the previous release is back in the parameter and the fleet rolled (or, after a signal, rolling) back to it"
            }
            ExitCode::Refused => {
                "refused, nothing changed: bad input or flags, unknown image, not signed by a trusted key, registry or AWS unreachable"
            }
            ExitCode::NotRolledBack => {
                "failed and NOT rolled back (rollback failed, parameter changed by someone else, state unknown, second signal): run `ctl status` now"
            }
            ExitCode::Busy => {
                "another release holds the lock or a refresh is running; nothing changed (retry, or --wait-lock)"
            }
        }
    }

    /// The exit-code block of the help texts.
    pub fn help() -> String {
        let mut s = String::from("Exit codes:\n");
        for c in ExitCode::ALL {
            let _ = writeln!(s, "  {}  {}", c.code(), c.meaning());
        }
        s
    }
}

impl From<ExitCode> for std::process::ExitCode {
    fn from(c: ExitCode) -> Self {
        std::process::ExitCode::from(c.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_documented() {
        let codes: Vec<u8> = ExitCode::ALL.iter().map(|c| c.code()).collect();
        assert_eq!(codes, vec![0, 1, 2, 3, 4]);
        let help = ExitCode::help();
        for c in ExitCode::ALL {
            assert!(
                help.contains(&format!("  {}  {}", c.code(), c.meaning())),
                "{help}"
            );
        }
    }
}
