//! skiff ctl: releases an image tag to a fleet. The binary (`main.rs`) parses the command line
//! and prints; these modules decide and act.
//!
//! - [`alarms`]: the CloudWatch alarms a release watches, and why ctl (not the refresh) rolls back.
//! - [`deployment`]: where the release parameter, the group and the image repository are.
//! - [`group`]: the one reader of the group's instances and their skiff tags (status, every
//!   in-place wait), within EC2's filter limit.
//! - [`registry`]: resolve `image:tag` to its digest through the registry v2 API.
//! - [`store`]: the release record in the SSM parameter, with its history.
//! - [`refresh`]: instance refreshes of the Auto Scaling Group, and the pure follow decision.
//! - [`lock`]: the release lock, an SSM parameter created only when absent.
//! - [`history`]: what the parameter's history says, and the rollback target (pure).
//! - [`inplace`]: the in-place strategy: batches, verdicts, the instance-tag channel (pure),
//!   and the AWS adapter of the instances it switches.
//! - [`ship`]: the release procedure (verify, lock, write, refresh, roll back).
//! - [`trust`]: the keys a release's signature is checked against, and the verdict.
//! - [`signal`]: SIGINT/SIGTERM as a stop request; a second one exits at once.
//! - [`progress`]: the events printed, and the journal a second signal reports from.
//! - [`exit`]: the exit codes.
//! - [`status`]: what the fleet runs.
//! - [`logs`]: the app's output across the fleet from CloudWatch Logs (`ctl logs`).

pub mod alarms;
pub mod aws;
pub mod deployment;
pub mod exit;
pub mod group;
pub mod history;
pub mod inplace;
pub mod lock;
pub mod logs;
pub mod progress;
pub mod refresh;
pub use skiff_registry as registry;
pub mod ship;
pub mod sign;
pub mod signal;
pub mod status;
pub mod store;
pub mod targets;
pub mod trust;
