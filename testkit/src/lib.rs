//! skiff's Rust test kit: what the agent's and ctl's integration tests both need, once.
//!
//! - [`engine`]: a Docker engine of the test's own (own data root, socket and bridge), for
//!   what must run inside dockerd, such as the `awslogs` driver with moto's credentials;
//! - [`emulator`]: SDK configs for the AWS emulator (testbed/emulator, moto with skiff's
//!   extensions) and its fixtures: a launch template, an Auto Scaling group;
//! - [`imds`]: an IMDSv2 stand-in on loopback;
//! - [`keys`]: signing keys made by OpenSSL;
//! - [`wait`]: polling with a bound.
//!
//! A dev-dependency only (`publish = false`); the services it talks to are started by
//! `bash .ci/setup.sh`.

pub mod emulator;
pub mod engine;
pub mod imds;
pub mod keys;
pub mod wait;
