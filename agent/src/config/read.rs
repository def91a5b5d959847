//! Reading each section of the config file into its typed struct: every value checked, with
//! the bounds and the message that says what to write instead.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::section::Section;
use super::*;

pub(super) fn read_app(mut s: Section<'_>) -> Option<AppConfig> {
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
    let swap_mode: Option<String> = s.optional("swap");
    let slots: Option<Vec<u16>> = s.optional("slots");
    let hold = s.duration("hold", DEFAULT_HOLD, MAX_HOLD);

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
        } else if skiff_release::env::is_reserved(key) {
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
    let swap = match swap_mode.as_deref() {
        // Slots and hold are read but unused with drain: a host moves between the two by the
        // one key.
        None | Some("drain") => Some(Swap::Drain),
        Some("handover") => handover_slots(&mut s, port, slots).map(|slots| {
            Swap::Handover(Handover {
                slots,
                hold: hold.unwrap_or(DEFAULT_HOLD),
            })
        }),
        Some(other) => {
            s.problem(format!(
                "app.swap {} must be \"handover\" (a kernel redirect flips the app's port to the new container; the app takes its port from PORT) or \"drain\" (the load balancer drains the host first)",
                skiff_release::quote(other)
            ));
            None
        }
    };
    s.finish_with(|| {
        Some(AppConfig {
            swap: swap?,
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
                cloudwatch: None,
            },
        })
    })
}

pub(super) fn read_release(mut s: Section<'_>) -> Option<ReleaseConfig> {
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
        "follow" => Some(UpdateMode::Follow),
        // The old name of "follow", which read as ctl's coordinated `--strategy in-place`.
        "in-place" => {
            s.problem(
                "release.update \"in-place\" is now called \"follow\" (the agent swaps on its own \
                 polls, uncoordinated): write update = \"follow\"; on an Auto Scaling group keep \
                 \"boot\" and release with `ctl release --strategy in-place`"
                    .to_owned(),
            );
            None
        }
        other => {
            s.problem(format!(
                "release.update {} must be \"boot\" or \"follow\"",
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

pub(super) fn read_health(mut s: Section<'_>) -> Option<HealthConfig> {
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

pub(super) fn read_registry(mut s: Section<'_>) -> Option<RegistryConfig> {
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

/// `[trust]`: exactly one of `keys_parameter` (an SSM parameter name) or `keys_file`.
pub(super) fn read_trust(mut s: Section<'_>) -> Option<TrustConfig> {
    let parameter: Option<String> = s.optional("keys_parameter");
    let file: Option<PathBuf> = s.optional("keys_file");
    let trust = match (parameter, file) {
        (Some(p), None) if valid_parameter_name(&p) => Some(TrustConfig::Parameter(p)),
        (Some(p), None) => {
            s.problem(format!(
                "trust.keys_parameter {} is not an SSM parameter name: write the stack output TrustedKeysParameter, like \"/skiff/prod/trusted-keys\"",
                skiff_release::quote(&p)
            ));
            None
        }
        (None, Some(f)) if !f.as_os_str().is_empty() => Some(TrustConfig::File(f)),
        (None, Some(_)) => {
            s.problem(
                "trust.keys_file is empty: give the path of a PEM bundle of public keys".into(),
            );
            None
        }
        _ => {
            s.problem(
                "trust needs exactly one of keys_parameter (SSM) or keys_file (a PEM bundle); remove [trust] to turn signature checks off"
                    .into(),
            );
            None
        }
    };
    s.finish_with(|| trust)
}

/// An SSM parameter name: letters, digits and `_ . - /`, at most 2048 characters, and a
/// hierarchy that starts with `/` when it has one
/// (https://docs.aws.amazon.com/systems-manager/latest/userguide/sysman-parameter-name-constraints.html).
fn valid_parameter_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 2048
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'))
        && (!name.contains('/') || name.starts_with('/'))
        && !name.contains("//")
}

pub(super) fn read_aws(mut s: Section<'_>) -> Option<AwsConfig> {
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

pub(super) fn read_logs(mut s: Section<'_>, default_region: Option<String>) -> Option<AwsLogs> {
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
pub(super) fn valid_log_group(g: &str) -> bool {
    (1..=512).contains(&g.len())
        && g.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'/' | b'#' | b'-'))
}

/// One part of a stream name (`<instance>/<tag>`): no `/` so that the two parts split back.
pub(super) fn valid_stream_part(p: &str) -> bool {
    (1..=128).contains(&p.len())
        && p.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

pub(super) fn valid_region(r: &str) -> bool {
    (1..=32).contains(&r.len())
        && r.split('-').count() >= 3
        && r.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

/// A size as Docker's log options take it, above zero: `20m`, `512k`, `1g`, `4096`.
pub(super) fn valid_log_size(size: &str) -> bool {
    let digits = size.trim_end_matches(['k', 'm', 'g']);
    size.len() - digits.len() <= 1
        && !digits.is_empty()
        && digits.len() <= 12
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.bytes().any(|b| b != b'0')
}

pub(super) fn valid_container_name(n: &str) -> bool {
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

/// `app.slots` for a handover: two distinct ports other than the app's own (the health port is
/// checked across sections); by default the app's port + 10 and + 11.
fn handover_slots(
    s: &mut Section<'_>,
    port: Option<u16>,
    slots: Option<Vec<u16>>,
) -> Option<[u16; 2]> {
    let slots = match slots {
        Some(v) => v,
        None => {
            let p = port?;
            match (p.checked_add(10), p.checked_add(11)) {
                (Some(a), Some(b)) => vec![a, b],
                _ => {
                    s.problem(format!(
                        "app.port {p} leaves no room for the default slots (port + 10, + 11): set app.slots = [a, b]"
                    ));
                    return None;
                }
            }
        }
    };
    let [a, b] = slots[..] else {
        s.problem(format!(
            "app.slots must name exactly two ports (e.g. [8090, 8091]), not {}",
            slots.len()
        ));
        return None;
    };
    let mut ok = true;
    if a == 0 || b == 0 {
        s.problem("app.slots must be ports 1-65535".into());
        ok = false;
    }
    if a == b {
        s.problem(format!(
            "app.slots [{a}, {b}]: the two slots must differ (the new container starts on the idle one while the old one serves)"
        ));
        ok = false;
    }
    if let Some(p) = port
        && (a == p || b == p)
    {
        s.problem(format!(
            "app.slots [{a}, {b}] collide with app.port {p}: the public port is the redirect itself; pick two other ports"
        ));
        ok = false;
    }
    ok.then_some([a, b])
}
