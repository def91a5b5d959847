//! skiff ctl: releases an image tag to a fleet. The binary (`main.rs`) parses the command line
//! and prints; these modules decide and act.
//!
//! - [`deployment`]: where the release parameter, the group and the image repository are.
//! - [`registry`]: resolve `image:tag` to its digest through the registry v2 API.
//! - [`store`]: the release record in the SSM parameter, with its history.
//! - [`refresh`]: instance refreshes of the Auto Scaling Group, and the pure follow decision.
//! - [`ship`]: the release procedure (verify, lock, write, refresh, roll back).
//! - [`status`]: what the fleet runs.

pub mod aws;
pub mod deployment;
pub mod refresh;
pub mod registry;
pub mod ship;
pub mod status;
pub mod store;
