//! skiff agent: runs the release named in a parameter as the host's one container.
//! The binary (`main.rs`) wires these modules together.

pub mod autoscaling;
pub mod aws;
pub mod backoff;
pub mod cloudlog;
pub mod config;
pub mod credentials;
pub mod docker;
pub mod ecr;
pub mod fleet;
pub mod health;
pub mod hygiene;
pub mod journal;
pub mod logging;
pub mod metrics;
pub mod probe;
pub mod reconcile;
pub mod redirect;
pub mod runtime;
pub mod source;
pub mod ssm;
pub mod state;
pub mod supervise;
pub mod trust;
