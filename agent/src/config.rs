//! The agent's configuration: a TOML file read once at start, validated as a whole so that every
//! problem is reported at once (unknown keys are errors; durations are written like `30s`).
//! This file holds the typed config and the whole-file checks; `read` reads and validates each
//! section, `section` is the key-by-key reader that records every problem.

mod read;
mod section;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Upper bounds of the duration keys: far above any sane value, far below what overflows.
pub const MAX_START_TIMEOUT: Duration = Duration::from_secs(3600);
pub const MAX_STOP_TIMEOUT: Duration = Duration::from_secs(600);
pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(86_400);
pub const MAX_DRAIN: Duration = Duration::from_secs(3600);
pub const MAX_HEALTH_INTERVAL: Duration = Duration::from_secs(600);
/// Handover: how long the old container keeps running after the flip, by default and at most.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(5);
pub const MAX_HOLD: Duration = Duration::from_secs(600);

/// Round up to whole seconds (at least 1 s).
fn whole_seconds_up(d: Duration) -> Duration {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    Duration::from_secs(secs.max(1))
}

use toml::Table;

pub use self::read::valid_env_name;
use self::read::{
    read_app, read_aws, read_health, read_logs, read_registry, read_release, read_trust,
};
use self::section::Section;

/// Where the config lives when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/skiff/agent.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read config file {path}: {source} (pass --config PATH, or write it: every key is in the README)"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} has {} problem(s):\n  - {}", .problems.len(), .problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub app: AppConfig,
    pub release: ReleaseConfig,
    pub health: HealthConfig,
    pub registry: Option<RegistryConfig>,
    pub aws: AwsConfig,
    /// `[trust]`: where the keys trusted to sign releases come from; `None` = signature checks
    /// off (logged once at start).
    pub trust: Option<TrustConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AppConfig {
    /// How a running release is replaced by another: `swap` in `[app]`.
    pub swap: Swap,
    /// Name of the managed app: prefix of container names and value of the `skiff.app` label.
    pub name: String,
    /// Image repository; the release picks the tag or digest.
    pub image: String,
    /// The app's port on the host (host networking).
    pub port: u16,
    pub health_path: String,
    pub start_timeout: Duration,
    pub stop_timeout: Duration,
    pub env: BTreeMap<String, String>,
    /// SSM path whose parameters become environment variables.
    pub env_path: Option<String>,
    /// The app's detail/readiness page, fetched once per probe interval and shown in `/status`
    /// only: it never decides `/healthz`.
    pub detail_path: Option<String>,
    /// Rotation of the app container's logs.
    pub logs: LogRotation,
}

/// How the agent replaces a running container by a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swap {
    /// `/healthz` reports draining, the load balancer takes the host out, the old container
    /// stops, the new one starts on the app's port and the load balancer trusts it again.
    Drain,
    /// The new container starts on the idle slot beside the old one, and a kernel redirect of
    /// the app's port flips to it once it is healthy: the load balancer never sees a change.
    Handover(Handover),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handover {
    /// The two ports containers listen on in turn (`PORT` in their environment).
    pub slots: [u16; 2],
    /// After the flip, the old container keeps running this long; a new one failing within
    /// it is flipped back.
    pub hold: Duration,
}

impl Swap {
    pub fn handover(&self) -> Option<&Handover> {
        match self {
            Swap::Handover(h) => Some(h),
            Swap::Drain => None,
        }
    }
}

/// Docker logging drivers that rotate files on the host (and keep `docker logs` working).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogDriver {
    /// Docker's `local` driver: compact, compressed files.
    /// https://docs.docker.com/engine/logging/drivers/local/
    Local,
    /// `json-file`, Docker's default, which rotates only when told to.
    /// https://docs.docker.com/engine/logging/drivers/json-file/
    JsonFile,
}

impl LogDriver {
    /// The driver's name in the Engine API.
    pub fn as_str(self) -> &'static str {
        match self {
            LogDriver::Local => "local",
            LogDriver::JsonFile => "json-file",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRotation {
    pub driver: LogDriver,
    /// Size at which a log file is rotated, as Docker writes it: `20m`, `512k`, `1g`.
    pub max_size: String,
    /// Files kept, the current one included.
    pub max_files: u32,
    /// `[logs]`: the app's output sent to CloudWatch Logs by Docker's `awslogs` driver; the
    /// rotation above then bounds the local copy `docker logs` reads.
    pub cloudwatch: Option<AwsLogs>,
}

/// `[logs]`: where Docker's `awslogs` driver sends the app's output.
/// https://docs.docker.com/engine/logging/drivers/awslogs/
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsLogs {
    /// The log group, created by the stack (the driver is told not to create it).
    pub group: String,
    /// The group's region; `None` leaves it to dockerd (its environment or the instance metadata).
    pub region: Option<String>,
    /// CloudWatch Logs endpoint for local runs (an emulator); `None` is AWS's own.
    pub endpoint: Option<String>,
    /// This host's name in the stream names (`<instance>/<release tag>`): the EC2 instance id.
    pub instance: String,
    /// Memory the driver may buffer while CloudWatch is slow or away (non-blocking mode: lines
    /// beyond it are dropped, the app never waits), as Docker writes sizes: `4m`.
    pub buffer: String,
}

impl Default for LogRotation {
    /// Docker's own defaults for the `local` driver: 5 files of 20 MB, at most 100 MB per
    /// container.
    fn default() -> Self {
        LogRotation {
            driver: LogDriver::Local,
            max_size: "20m".into(),
            max_files: 5,
            cloudwatch: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    Ssm { parameter: String },
    File { path: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateMode {
    /// Apply the release at start only; fleets roll by instance replacement.
    Boot,
    /// Follow the source: apply changed releases while running, draining first, on the agent's
    /// own polls (uncoordinated). Not honoured on an Auto Scaling group, where
    /// `ctl release --strategy in-place` coordinates the swaps (see `reconcile`). Was spelled
    /// `in-place`, which is refused now with a message naming `follow`.
    Follow,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseConfig {
    pub source: SourceConfig,
    pub poll_interval: Duration,
    pub update: UpdateMode,
    pub drain: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    pub listen: SocketAddr,
    pub interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RegistryConfig {
    pub username: String,
    /// SSM SecureString holding the password.
    pub password_parameter: Option<String>,
    /// Local file holding the password (local development).
    pub password_file: Option<PathBuf>,
}

/// `[trust]`: exactly one place holding PEM `PUBLIC KEY` blocks (ECDSA P-256), re-read before
/// each verification so a rotation needs no restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustConfig {
    /// `keys_parameter`: an SSM String parameter (the stack's `TrustedKeysParameter`).
    Parameter(String),
    /// `keys_file`: a PEM bundle on the host (local development, the fleet box).
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct AwsConfig {
    /// Region; default from the environment, the profile, or the instance metadata.
    pub region: Option<String>,
    /// Auto Scaling launch lifecycle hook the agent completes; none means skip.
    pub lifecycle_hook: Option<String>,
    /// Auto Scaling terminate lifecycle hook the agent completes after draining; none means skip.
    pub terminate_hook: Option<String>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|problems| ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }

    /// Parse and validate; on failure return every problem found.
    pub fn parse(text: &str) -> Result<Config, Vec<String>> {
        let root: Table = toml::from_str(text).map_err(|e| vec![format!("not valid TOML: {e}")])?;
        let mut problems = Vec::new();
        let mut root = Section::root(root, &mut problems);
        let app = root.table("app", true);
        let release = root.table("release", true);
        let health = root.table("health", false);
        let registry = root.table("registry", false);
        let aws = root.table("aws", false);
        let logs = root.table("logs", false);
        let trust = root.table("trust", false);
        root.finish();

        let app = app.map(|t| read_app(Section::new("app", t, &mut problems)));
        let release = release.map(|t| read_release(Section::new("release", t, &mut problems)));
        let health = read_health(Section::new(
            "health",
            health.unwrap_or_default(),
            &mut problems,
        ));
        let registry = registry.map(|t| read_registry(Section::new("registry", t, &mut problems)));
        let aws = read_aws(Section::new("aws", aws.unwrap_or_default(), &mut problems));
        let default_region = aws.as_ref().and_then(|a| a.region.clone());
        let logs = logs.map(|t| read_logs(Section::new("logs", t, &mut problems), default_region));
        let trust = trust.map(|t| read_trust(Section::new("trust", t, &mut problems)));

        let (Some(Some(mut app)), Some(Some(release)), Some(health), Some(aws)) =
            (app, release, health, aws)
        else {
            return Err(problems);
        };
        match logs {
            Some(None) => return Err(problems),
            Some(cloudwatch) => app.logs.cloudwatch = cloudwatch,
            None => {}
        }
        let registry = match registry {
            Some(None) => return Err(problems),
            Some(Some(r)) => Some(r),
            None => None,
        };
        let trust = match trust {
            Some(None) => return Err(problems),
            Some(Some(t)) => Some(t),
            None => None,
        };
        let config = Config {
            app,
            release,
            health,
            registry,
            aws,
            trust,
        };
        config.cross_check(&mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    fn cross_check(&self, problems: &mut Vec<String>) {
        if self.health.listen.port() == self.app.port {
            problems.push(format!(
                "health.listen port {} is the app's port: with host networking they must differ",
                self.app.port
            ));
        }
        if let Some(h) = self.app.swap.handover()
            && h.slots.contains(&self.health.listen.port())
        {
            problems.push(format!(
                "app.slots {:?} collide with the health port {}: pick two other ports",
                h.slots,
                self.health.listen.port()
            ));
        }
        let file_source = self.is_local();
        if file_source && self.app.env_path.is_some() {
            problems.push(
                "app.env_path reads SSM, but release.source is \"file\": remove env_path or use source = \"ssm\""
                    .into(),
            );
        }
        if let Some(reg) = &self.registry
            && file_source
            && reg.password_parameter.is_some()
        {
            problems.push(
                "registry.password_parameter reads SSM, but release.source is \"file\": use registry.password_file"
                    .into(),
            );
        }
        if file_source && matches!(self.trust, Some(TrustConfig::Parameter(_))) {
            problems.push(
                "trust.keys_parameter reads SSM, but release.source is \"file\": use trust.keys_file (a PEM bundle on the host)"
                    .into(),
            );
        }
    }

    /// Local mode: no AWS at all (file source, no SSM reads).
    pub fn is_local(&self) -> bool {
        matches!(self.release.source, SourceConfig::File { .. })
    }
}
