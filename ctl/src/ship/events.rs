//! What a release reports while it runs ([`Event`]) and how it ended ([`Outcome`]).

use crate::exit::ExitCode;
use crate::inplace::RolloutStep;
use crate::lock::Holder;
use crate::refresh::RefreshInfo;
use crate::trust::Verdict;

use super::Purpose;

/// One step of the procedure, for the person or the pipeline watching.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Resolved {
        image: String,
        digest: String,
    },
    Waiting {
        detail: String,
    },
    Locked {
        lock: String,
        owner: String,
    },
    LockHeld {
        lock: String,
        holder: Holder,
    },
    Unlocked {
        lock: String,
    },
    LockLost {
        lock: String,
        detail: String,
    },
    Plan {
        parameter: String,
        old: Option<String>,
        new: String,
    },
    Written {
        purpose: Purpose,
        parameter: String,
        version: i64,
        value: String,
    },
    RefreshStarted {
        purpose: Purpose,
        id: String,
        /// The CloudWatch alarms that fail this refresh when they go to ALARM.
        alarms: Vec<String>,
    },
    Progress {
        purpose: Purpose,
        refresh: RefreshInfo,
    },
    Stopping {
        signal: String,
    },
    Cancelling {
        id: String,
    },
    LockUnknown {
        detail: String,
    },
    RollingBack {
        reason: String,
        to: String,
    },
    /// A step of an in-place rollout.
    Rollout(RolloutStep),
    /// The signature check of the pinned digest, before anything is written.
    Signature(Verdict),
}

/// How a release ended, when it got as far as acting.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    DryRun,
    Started {
        refresh_id: String,
    },
    Released {
        refresh_id: String,
        release: String,
    },
    /// In place: every InService instance runs the release and is healthy.
    RolledOut {
        release: String,
        instances: Vec<String>,
        switched: usize,
        batches: usize,
        secs: f64,
    },
    RolledBack {
        reason: String,
        to: String,
    },
    NotRolledBack {
        reason: String,
        advice: String,
    },
    /// Stopped by a signal after the new release was written.
    Interrupted {
        signal: String,
        /// The previous release, written back.
        restored: Option<String>,
        /// The refresh rolling the fleet back, left running.
        refresh_id: Option<String>,
        advice: String,
    },
}

impl Outcome {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Outcome::DryRun
            | Outcome::Started { .. }
            | Outcome::Released { .. }
            | Outcome::RolledOut { .. } => ExitCode::Success,
            Outcome::RolledBack { .. } => ExitCode::RolledBack,
            Outcome::Interrupted {
                restored: Some(_),
                refresh_id: Some(_),
                ..
            } => ExitCode::RolledBack,
            Outcome::NotRolledBack { .. } | Outcome::Interrupted { .. } => ExitCode::NotRolledBack,
        }
    }
}
