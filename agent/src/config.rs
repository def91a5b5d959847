//! The agent's configuration: a TOML file read once at start, validated as a whole so that every
//! problem is reported at once (unknown keys are errors; durations are written like `30s`).

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

/// Round up to whole seconds (at least 1 s).
fn whole_seconds_up(d: Duration) -> Duration {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    Duration::from_secs(secs.max(1))
}

use serde::de::DeserializeOwned;
use toml::{Table, Value};

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
}

#[derive(Debug, Clone, PartialEq)]
pub struct AppConfig {
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
    /// `[logs]`: the app's output shipped to CloudWatch Logs by Docker's `awslogs` driver; the
    /// rotation above then bounds the local copy `docker logs` reads.
    pub ship: Option<AwsLogs>,
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
            ship: None,
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
    /// Apply changed releases while running, draining first.
    InPlace,
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

        let (Some(Some(mut app)), Some(Some(release)), Some(health), Some(aws)) =
            (app, release, health, aws)
        else {
            return Err(problems);
        };
        match logs {
            Some(None) => return Err(problems),
            Some(ship) => app.logs.ship = ship,
            None => {}
        }
        let registry = match registry {
            Some(None) => return Err(problems),
            Some(Some(r)) => Some(r),
            None => None,
        };
        let config = Config {
            app,
            release,
            health,
            registry,
            aws,
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
    }

    /// Local mode: no AWS at all (file source, no SSM reads).
    pub fn is_local(&self) -> bool {
        matches!(self.release.source, SourceConfig::File { .. })
    }
}

fn read_app(mut s: Section<'_>) -> Option<AppConfig> {
    let name: Option<String> = s.required("name");
    let image: Option<String> = s.required("image");
    let port: Option<u16> = s.required("port");
    let health_path: String = s
        .optional("health_path")
        .unwrap_or_else(|| "/health".into());
    let start_timeout = s.duration("start_timeout", Duration::from_secs(60), MAX_START_TIMEOUT);
    // Docker takes whole seconds: a sub-second grace would become 0 s, an immediate SIGKILL.
    let stop_timeout = s
        .duration("stop_timeout", Duration::from_secs(30), MAX_STOP_TIMEOUT)
        .map(whole_seconds_up);
    let env: BTreeMap<String, String> = s.optional("env").unwrap_or_default();
    let env_path: Option<String> = s.optional("env_path");
    let detail_path: Option<String> = s.optional("detail_path");
    let defaults = LogRotation::default();
    let log_driver: Option<String> = s.optional("log_driver");
    let log_max_size: String = s.optional("log_max_size").unwrap_or(defaults.max_size);
    let log_max_files: Option<u32> = s.optional("log_max_files");

    if let Some(n) = &name
        && !valid_container_name(n)
    {
        s.problem(format!(
            "app.name {} must be 1-64 characters of [A-Za-z0-9_.-] starting with a letter or digit",
            skiff_release::quote(n)
        ));
    }
    if let Some(i) = &image
        && let Err(e) = skiff_release::validate_repository(i)
    {
        s.problem(format!("app.image: {e}"));
    }
    if port == Some(0) {
        s.problem("app.port must be 1-65535".into());
    }
    if !health_path.starts_with('/') || health_path.contains(char::is_whitespace) {
        s.problem(format!(
            "app.health_path {} must start with '/' and contain no whitespace",
            skiff_release::quote(&health_path)
        ));
    }
    if let Some(p) = &detail_path
        && (!p.starts_with('/') || p.contains(char::is_whitespace))
    {
        s.problem(format!(
            "app.detail_path {} must start with '/' and contain no whitespace (e.g. \"/ready\")",
            skiff_release::quote(p)
        ));
    }
    let driver = match log_driver.as_deref() {
        None | Some("local") => Some(LogDriver::Local),
        Some("json-file") => Some(LogDriver::JsonFile),
        Some(other) => {
            s.problem(format!(
                "app.log_driver {} must be \"local\" or \"json-file\" (drivers that rotate files on the host)",
                skiff_release::quote(other)
            ));
            None
        }
    };
    let log_max_size = log_max_size.to_ascii_lowercase();
    if !valid_log_size(&log_max_size) {
        s.problem(format!(
            "app.log_max_size {} must be a size like \"20m\": digits, then k, m or g",
            skiff_release::quote(&log_max_size)
        ));
    }
    let log_max_files = log_max_files.unwrap_or(defaults.max_files);
    if !(1..=100).contains(&log_max_files) {
        s.problem(format!("app.log_max_files {log_max_files} must be 1-100"));
    }
    for key in env.keys() {
        if !valid_env_name(key) {
            s.problem(format!(
                "app.env key {} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)",
                skiff_release::quote(key)
            ));
        } else if key.starts_with("SKIFF_") || key == "PORT" {
            s.problem(format!(
                "app.env key {key} is set by the agent itself; choose another name"
            ));
        }
    }
    if let Some(p) = &env_path
        && !(p.starts_with('/') && p.ends_with('/'))
    {
        s.problem(format!(
            "app.env_path {} must start and end with '/' (an SSM path such as /app/prod/env/)",
            skiff_release::quote(p)
        ));
    }
    s.finish_with(|| {
        Some(AppConfig {
            name: name?,
            image: image?,
            port: port?,
            health_path,
            start_timeout: start_timeout?,
            stop_timeout: stop_timeout?,
            env,
            env_path,
            detail_path,
            logs: LogRotation {
                driver: driver?,
                max_size: log_max_size,
                max_files: log_max_files,
                ship: None,
            },
        })
    })
}

fn read_release(mut s: Section<'_>) -> Option<ReleaseConfig> {
    let kind: Option<String> = s.required("source");
    let parameter: Option<String> = s.optional("parameter");
    let file: Option<PathBuf> = s.optional("file");
    let poll_interval = s.duration("poll_interval", Duration::from_secs(60), MAX_POLL_INTERVAL);
    let update: String = s.optional("update").unwrap_or_else(|| "boot".into());
    let drain = s.duration("drain", Duration::from_secs(15), MAX_DRAIN);

    let source = match kind.as_deref() {
        Some("ssm") => match parameter {
            Some(p) if !p.is_empty() => Some(SourceConfig::Ssm { parameter: p }),
            _ => {
                s.problem("release.parameter is required when release.source = \"ssm\"".into());
                None
            }
        },
        Some("file") => Some(SourceConfig::File {
            path: file.unwrap_or_else(|| PathBuf::from("/var/lib/skiff/release")),
        }),
        Some(other) => {
            s.problem(format!(
                "release.source {} must be \"ssm\" or \"file\"",
                skiff_release::quote(other)
            ));
            None
        }
        None => None,
    };
    let update = match update.as_str() {
        "boot" => Some(UpdateMode::Boot),
        "in-place" => Some(UpdateMode::InPlace),
        other => {
            s.problem(format!(
                "release.update {} must be \"boot\" or \"in-place\"",
                skiff_release::quote(other)
            ));
            None
        }
    };
    s.finish_with(|| {
        Some(ReleaseConfig {
            source: source?,
            poll_interval: poll_interval?,
            update: update?,
            drain: drain?,
        })
    })
}

fn read_health(mut s: Section<'_>) -> Option<HealthConfig> {
    let listen: String = s
        .optional("listen")
        .unwrap_or_else(|| "0.0.0.0:8081".into());
    let interval = s.duration("interval", Duration::from_secs(2), MAX_HEALTH_INTERVAL);
    let listen = match listen.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            s.problem(format!(
                "health.listen {} is not an address like 0.0.0.0:8081",
                skiff_release::quote(&listen)
            ));
            None
        }
    };
    s.finish_with(|| {
        Some(HealthConfig {
            listen: listen?,
            interval: interval?,
        })
    })
}

fn read_registry(mut s: Section<'_>) -> Option<RegistryConfig> {
    let username: Option<String> = s.required("username");
    let password_parameter: Option<String> = s.optional("password_parameter");
    let password_file: Option<PathBuf> = s.optional("password_file");
    if password_parameter.is_some() == password_file.is_some() {
        s.problem(
            "registry needs exactly one of password_parameter (SSM SecureString) or password_file"
                .into(),
        );
    }
    s.finish_with(|| {
        Some(RegistryConfig {
            username: username?,
            password_parameter,
            password_file,
        })
    })
}

fn read_aws(mut s: Section<'_>) -> Option<AwsConfig> {
    let region = s.optional("region");
    let lifecycle_hook = s.optional("lifecycle_hook");
    let terminate_hook = s.optional("terminate_hook");
    s.finish_with(|| {
        Some(AwsConfig {
            region,
            lifecycle_hook,
            terminate_hook,
        })
    })
}

fn read_logs(mut s: Section<'_>, default_region: Option<String>) -> Option<AwsLogs> {
    let driver: Option<String> = s.required("driver");
    let group: Option<String> = s.required("group");
    let region: Option<String> = s.optional("region");
    let endpoint: Option<String> = s.optional("endpoint");
    let instance: Option<String> = s.required("instance");
    let buffer: String = s.optional("buffer").unwrap_or_else(|| "4m".into());

    if let Some(d) = &driver
        && d != "awslogs"
    {
        s.problem(format!(
            "logs.driver {} must be \"awslogs\" (for logs kept on the host only, remove [logs] and use app.log_driver)",
            skiff_release::quote(d)
        ));
    }
    if let Some(g) = &group
        && !valid_log_group(g)
    {
        s.problem(format!(
            "logs.group {} must be 1-512 characters of [A-Za-z0-9_./#-], e.g. \"/skiff/prod/app\"",
            skiff_release::quote(g)
        ));
    }
    if let Some(r) = &region
        && !valid_region(r)
    {
        s.problem(format!(
            "logs.region {} is not a region name like \"eu-west-1\"",
            skiff_release::quote(r)
        ));
    }
    if let Some(e) = &endpoint
        && !((e.starts_with("http://") || e.starts_with("https://"))
            && e.len() > "https://".len()
            && !e.contains(char::is_whitespace))
    {
        s.problem(format!(
            "logs.endpoint {} must be a URL like \"http://127.0.0.1:5055\" (leave it out on AWS)",
            skiff_release::quote(e)
        ));
    }
    if let Some(i) = &instance
        && !valid_stream_part(i)
    {
        s.problem(format!(
            "logs.instance {} must be 1-128 characters of [A-Za-z0-9_.-] (the EC2 instance id)",
            skiff_release::quote(i)
        ));
    }
    let buffer = buffer.to_ascii_lowercase();
    if !valid_log_size(&buffer) {
        s.problem(format!(
            "logs.buffer {} must be a size like \"4m\": digits, then k, m or g",
            skiff_release::quote(&buffer)
        ));
    }
    s.finish_with(|| {
        driver?;
        Some(AwsLogs {
            group: group?,
            region: region.or(default_region),
            endpoint,
            instance: instance?,
            buffer,
        })
    })
}

/// A log group name as CloudWatch Logs takes it.
/// https://docs.aws.amazon.com/AmazonCloudWatchLogs/latest/APIReference/API_CreateLogGroup.html
fn valid_log_group(g: &str) -> bool {
    (1..=512).contains(&g.len())
        && g.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'/' | b'#' | b'-'))
}

/// One part of a stream name (`<instance>/<tag>`): no `/` so that the two parts split back.
fn valid_stream_part(p: &str) -> bool {
    (1..=128).contains(&p.len())
        && p.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn valid_region(r: &str) -> bool {
    (1..=32).contains(&r.len())
        && r.split('-').count() >= 3
        && r.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

/// A size as Docker's log options take it, above zero: `20m`, `512k`, `1g`, `4096`.
fn valid_log_size(size: &str) -> bool {
    let digits = size.trim_end_matches(['k', 'm', 'g']);
    size.len() - digits.len() <= 1
        && !digits.is_empty()
        && digits.len() <= 12
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.bytes().any(|b| b != b'0')
}

fn valid_container_name(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

pub fn valid_env_name(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// One table of the file being read: takes its keys one by one, records a problem for each bad
/// value, and at the end one for each key nobody asked for.
struct Section<'a> {
    name: &'static str,
    table: Table,
    problems: &'a mut Vec<String>,
    failed: bool,
}

impl<'a> Section<'a> {
    fn new(name: &'static str, table: Table, problems: &'a mut Vec<String>) -> Self {
        Section {
            name,
            table,
            problems,
            failed: false,
        }
    }

    fn root(table: Table, problems: &'a mut Vec<String>) -> Self {
        Section::new("", table, problems)
    }

    fn key(&self, key: &str) -> String {
        if self.name.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.name)
        }
    }

    fn problem(&mut self, p: String) {
        self.failed = true;
        self.problems.push(p);
    }

    fn take<T: DeserializeOwned>(&mut self, key: &str, required: bool) -> Option<T> {
        match self.table.remove(key) {
            None => {
                if required {
                    let k = self.key(key);
                    self.problem(format!("{k} is required"));
                }
                None
            }
            Some(v) => match v.try_into::<T>() {
                Ok(t) => Some(t),
                Err(e) => {
                    let k = self.key(key);
                    self.problem(format!("{k}: {}", e.to_string().trim()));
                    None
                }
            },
        }
    }

    fn required<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        self.take(key, true)
    }

    fn optional<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        self.take(key, false)
    }

    fn table(&mut self, key: &str, required: bool) -> Option<Table> {
        self.take::<Table>(key, required)
    }

    /// A duration such as `30s`, `1m30s`, `500ms`; must be above zero and at most `max` (so that
    /// no `Instant + Duration` in the loop can overflow, and a typo like `60d` is caught).
    fn duration(&mut self, key: &str, default: Duration, max: Duration) -> Option<Duration> {
        let raw: Option<Value> = self.optional(key);
        let Some(raw) = raw else {
            return Some(default);
        };
        let k = self.key(key);
        let parsed = match &raw {
            Value::String(s) => humantime::parse_duration(s).map_err(|e| e.to_string()),
            other => Err(format!("expected a string like \"30s\", found {other}")),
        };
        match parsed {
            Ok(d) if d > max => {
                self.problem(format!(
                    "{k} {raw} is too long: at most {} (write a shorter duration)",
                    humantime::format_duration(max)
                ));
                None
            }
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                self.problem(format!("{k} must be above zero"));
                None
            }
            Err(e) => {
                self.problem(format!(
                    "{k} {raw}: {e} (write durations like \"30s\" or \"2m\")"
                ));
                None
            }
        }
    }

    /// Report unknown keys, then build the value if nothing in this section failed.
    fn finish_with<T>(mut self, build: impl FnOnce() -> Option<T>) -> Option<T> {
        self.finish();
        if self.failed { None } else { build() }
    }

    fn finish(&mut self) {
        let unknown: Vec<String> = self.table.keys().map(|k| self.key(k)).collect();
        for k in unknown {
            self.problem(format!("unknown key {k}"));
        }
        self.table.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[logs]` ships to CloudWatch through awslogs; the region falls back to `[aws]`; every bad
    /// value is named with what to write instead.
    #[test]
    fn logs_section() {
        let base = "[app]\nname='a'\nimage='r/a'\nport=80\n[release]\nsource='file'\n";
        let c = Config::parse(&format!(
            "{base}[aws]\nregion='eu-west-1'\n[logs]\ndriver='awslogs'\ngroup='/skiff/prod/app'\ninstance='i-0abc'\n"
        ))
        .expect("valid");
        assert_eq!(
            c.app.logs.ship,
            Some(AwsLogs {
                group: "/skiff/prod/app".into(),
                region: Some("eu-west-1".into()),
                endpoint: None,
                instance: "i-0abc".into(),
                buffer: "4m".into(),
            })
        );
        let c = Config::parse(&format!(
            "{base}[aws]\nregion='eu-west-1'\n[logs]\ndriver='awslogs'\ngroup='g'\ninstance='h'\nregion='us-east-1'\nendpoint='http://127.0.0.1:5055'\nbuffer='1M'\n"
        ))
        .expect("valid");
        let ship = c.app.logs.ship.expect("shipped");
        assert_eq!(ship.region.as_deref(), Some("us-east-1"));
        assert_eq!(ship.endpoint.as_deref(), Some("http://127.0.0.1:5055"));
        assert_eq!(ship.buffer, "1m");
        assert_eq!(Config::parse(base).expect("valid").app.logs.ship, None);

        let ok = "driver='awslogs'\ngroup='g'\ninstance='h'\n";
        let refused: &[(&str, &str)] = &[
            ("group='g'\ninstance='h'", "logs.driver"),
            (
                "driver='syslog'\ngroup='g'\ninstance='h'",
                "must be \"awslogs\"",
            ),
            ("driver='awslogs'\ninstance='h'", "logs.group"),
            (
                "driver='awslogs'\ngroup='g g'\ninstance='h'",
                "logs.group \"g g\"",
            ),
            ("driver='awslogs'\ngroup='g'", "logs.instance"),
            (
                "driver='awslogs'\ngroup='g'\ninstance='i/0'",
                "logs.instance \"i/0\"",
            ),
            (
                "driver='awslogs'\ngroup='g'\ninstance='h'\nregion='Europe'",
                "logs.region",
            ),
            (
                "driver='awslogs'\ngroup='g'\ninstance='h'\nendpoint='127.0.0.1:5055'",
                "logs.endpoint",
            ),
            (
                "driver='awslogs'\ngroup='g'\ninstance='h'\nbuffer='0'",
                "logs.buffer",
            ),
            (
                "driver='awslogs'\ngroup='g'\ninstance='h'\nstream='x'",
                "stream",
            ),
        ];
        assert!(Config::parse(&format!("{base}[logs]\n{ok}")).is_ok());
        for (logs, want) in refused {
            let err = Config::parse(&format!("{base}[logs]\n{logs}\n"))
                .expect_err(logs)
                .join("\n");
            assert!(err.contains(want), "{logs}: {err}");
        }
    }

    const MINIMAL: &str = r#"
[app]
name = "app"
image = "127.0.0.1:5000/team/app"
port = 8080
[release]
source = "file"
file = "/tmp/release"
"#;

    #[test]
    fn minimal_config_takes_defaults() {
        let c = Config::parse(MINIMAL).expect("valid");
        assert_eq!(c.app.health_path, "/health");
        assert_eq!(c.app.start_timeout, Duration::from_secs(60));
        assert_eq!(c.app.stop_timeout, Duration::from_secs(30));
        assert_eq!(c.release.poll_interval, Duration::from_secs(60));
        assert_eq!(c.release.update, UpdateMode::Boot);
        assert_eq!(c.release.drain, Duration::from_secs(15));
        assert_eq!(c.health.listen, "0.0.0.0:8081".parse().expect("addr"));
        assert_eq!(c.health.interval, Duration::from_secs(2));
        assert_eq!(c.app.detail_path, None);
        assert_eq!(
            c.app.logs,
            LogRotation {
                driver: LogDriver::Local,
                max_size: "20m".into(),
                max_files: 5,
                ship: None
            }
        );
        assert!(c.is_local());
    }

    /// The README's config block lists every key next to its default: it must stay valid.
    #[test]
    fn the_readme_config_block_is_valid() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("```toml\n[app]")
            .expect("README has the config block")
            + 8;
        let block = &readme[start..];
        let block = &block[..block.find("```").expect("block end")];
        let c = Config::parse(block).unwrap_or_else(|p| panic!("README config block: {p:#?}"));
        assert_eq!(c.app.detail_path.as_deref(), Some("/ready"));
        assert_eq!(c.app.logs, LogRotation::default());
    }

    #[test]
    fn detail_path_and_log_rotation() {
        let with = |app: &str| {
            Config::parse(&format!(
                "[app]\nname='a'\nimage='r/a'\nport=80\n{app}\n[release]\nsource='file'\n"
            ))
        };
        let c = with(
            "detail_path='/ready'\nlog_driver='json-file'\nlog_max_size='10M'\nlog_max_files=3",
        )
        .expect("valid");
        assert_eq!(c.app.detail_path.as_deref(), Some("/ready"));
        assert_eq!(
            c.app.logs,
            LogRotation {
                driver: LogDriver::JsonFile,
                max_size: "10m".into(),
                max_files: 3,
                ship: None
            }
        );
        let sizes = [
            ("20m", true),
            ("512k", true),
            ("1g", true),
            ("4096", true),
            ("0m", false),
            ("m", false),
            ("10mb", false),
            ("1.5m", false),
            ("-1", false),
            ("10 m", false),
            ("", false),
        ];
        for (size, ok) in sizes {
            assert_eq!(valid_log_size(size), ok, "{size:?}");
            assert_eq!(
                with(&format!("log_max_size='{size}'")).is_ok(),
                ok,
                "{size:?}"
            );
        }
        let bad: &[(&str, &str)] = &[
            (
                "detail_path='ready'",
                "app.detail_path \"ready\" must start with '/'",
            ),
            ("detail_path='/re ady'", "app.detail_path"),
            (
                "log_driver='syslog'",
                "app.log_driver \"syslog\" must be \"local\" or \"json-file\"",
            ),
            (
                "log_max_size='lots'",
                "app.log_max_size \"lots\" must be a size like \"20m\"",
            ),
            ("log_max_files=0", "app.log_max_files 0 must be 1-100"),
            ("log_max_files=101", "app.log_max_files 101"),
            ("log_max_files='5'", "app.log_max_files"),
        ];
        for (app, want) in bad {
            let problems = with(app).expect_err(app);
            assert_eq!(problems.len(), 1, "{app}: {problems:?}");
            assert!(problems[0].contains(want), "{app}: {problems:?}");
        }
    }

    #[test]
    fn full_config() {
        let c = Config::parse(
            r#"
[app]
name = "app"
image = "docker.io/myrepo/app"
port = 8080
health_path = "/health"
start_timeout = "90s"
stop_timeout = "10s"
env = { LOG_LEVEL = "info" }
env_path = "/app/prod/env/"
detail_path = "/ready"
log_driver = "local"
log_max_size = "20m"
log_max_files = 5
[release]
source = "ssm"
parameter = "/app/prod/release"
poll_interval = "30s"
update = "in-place"
drain = "5s"
[health]
listen = "127.0.0.1:9000"
interval = "500ms"
[registry]
username = "ci"
password_parameter = "/app/prod/registry-password"
[aws]
region = "eu-west-1"
lifecycle_hook = "skiff-launch"
terminate_hook = "skiff-terminate"
"#,
        )
        .expect("valid");
        assert_eq!(
            c.release.source,
            SourceConfig::Ssm {
                parameter: "/app/prod/release".into()
            }
        );
        assert_eq!(c.release.update, UpdateMode::InPlace);
        assert_eq!(c.health.interval, Duration::from_millis(500));
        assert_eq!(c.app.env.get("LOG_LEVEL").map(String::as_str), Some("info"));
        assert_eq!(c.aws.lifecycle_hook.as_deref(), Some("skiff-launch"));
        assert_eq!(c.aws.terminate_hook.as_deref(), Some("skiff-terminate"));
        assert_eq!(c.app.detail_path.as_deref(), Some("/ready"));
        assert_eq!(c.app.logs, LogRotation::default());
        assert!(!c.is_local());
    }

    /// Each broken input must be reported with a message naming the key.
    #[test]
    fn every_problem_is_reported() {
        let table: &[(&str, &[&str])] = &[
            ("not toml = = =", &["not valid TOML"]),
            ("", &["app is required", "release is required"]),
            (
                "[app]\nname='-x'\nimage='Repo:tag'\nport=0\nhealth_path='health'\nstart_timeout='soon'\nstop_timeout=5\nextra=1\n[release]\nsource='s3'\nupdate='rolling'\n[health]\nlisten='nowhere'\ninterval='0s'\n[bogus]\n",
                &[
                    "app.name",
                    "app.image",
                    "app.port",
                    "app.health_path",
                    "app.start_timeout",
                    "app.stop_timeout",
                    "unknown key app.extra",
                    "release.source",
                    "release.update",
                    "health.listen",
                    "health.interval must be above zero",
                    "unknown key bogus",
                ],
            ),
            (
                "[app]\nname='a'\nimage='r/a'\nport=8081\nenv={ 'BAD-NAME'='x', SKIFF_TAG='y' }\nenv_path='/x/env'\n[release]\nsource='ssm'\n",
                &[
                    "app.env key \"BAD-NAME\"",
                    "app.env key SKIFF_TAG",
                    "app.env_path",
                    "release.parameter is required",
                ],
            ),
            (
                "[app]\nname='a'\nimage='r/a'\nport=8081\nenv_path='/x/env/'\n[release]\nsource='file'\n[registry]\nusername='u'\npassword_parameter='/p'\n",
                &[
                    "health.listen port 8081",
                    "app.env_path reads SSM",
                    "registry.password_parameter reads SSM",
                ],
            ),
            (
                "[app]\nname='a'\nimage='r/a'\nport=80\n[release]\nsource='file'\n[registry]\nusername='u'\n",
                &["registry needs exactly one"],
            ),
        ];
        for (input, expected) in table {
            let problems = Config::parse(input).expect_err("must be rejected");
            for e in *expected {
                assert!(
                    problems.iter().any(|p| p.contains(e)),
                    "input {input:?}: no problem mentions {e:?}; got {problems:#?}"
                );
            }
            assert_eq!(
                problems.len(),
                expected.len(),
                "input {input:?}: {problems:#?}"
            );
        }
    }

    /// Durations beyond the bounds are refused with the bound in the message; a sub-second (or
    /// fractional) stop grace is rounded up, as Docker takes whole seconds.
    #[test]
    fn durations_are_bounded_and_stop_timeout_rounded_up() {
        let base = |app: &str, release: &str, health: &str| {
            format!(
                "[app]\nname='a'\nimage='r/a'\nport=80\n{app}\n[release]\nsource='file'\n{release}\n[health]\n{health}\n"
            )
        };
        let refused: &[(String, &str)] = &[
            (
                base("", "poll_interval='100000000000000s'", ""),
                "release.poll_interval",
            ),
            (base("", "poll_interval='2d'", ""), "at most 1day"),
            (base("start_timeout='2h'", "", ""), "app.start_timeout"),
            (base("stop_timeout='11m'", "", ""), "app.stop_timeout"),
            (base("", "drain='2h'", ""), "release.drain"),
            (base("", "", "interval='1h'"), "health.interval"),
        ];
        for (text, want) in refused {
            let err = Config::parse(text).expect_err(text).join("\n");
            assert!(
                err.contains(want) && err.contains("too long"),
                "{text}: {err}"
            );
        }
        let rounded: &[(&str, u64)] = &[("1ms", 1), ("500ms", 1), ("1500ms", 2), ("10s", 10)];
        for (raw, secs) in rounded {
            let c = Config::parse(&base(&format!("stop_timeout='{raw}'"), "", "")).expect("valid");
            assert_eq!(c.app.stop_timeout, Duration::from_secs(*secs), "{raw}");
        }
        let c = Config::parse(&base("start_timeout='1h'", "poll_interval='1day'", ""))
            .expect("the bounds themselves are allowed");
        assert_eq!(c.release.poll_interval, Duration::from_secs(86_400));
    }
}
