//! The config table tests: every key, its default, its bounds and its message.

use super::read::*;
use super::*;

/// `[logs]` sends to CloudWatch through awslogs; the region falls back to `[aws]`; every bad
/// value is named with what to write instead.
#[test]
fn logs_section() {
    let base = "[app]\nname='a'\nimage='r/a'\nport=80\n[release]\nsource='file'\n";
    let c = Config::parse(&format!(
        "{base}[aws]\nregion='eu-west-1'\n[logs]\ndriver='awslogs'\ngroup='/skiff/prod/app'\ninstance='i-0abc'\n"
    ))
    .expect("valid");
    assert_eq!(
        c.app.logs.cloudwatch,
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
    let aws = c.app.logs.cloudwatch.expect("sent");
    assert_eq!(aws.region.as_deref(), Some("us-east-1"));
    assert_eq!(aws.endpoint.as_deref(), Some("http://127.0.0.1:5055"));
    assert_eq!(aws.buffer, "1m");
    assert_eq!(
        Config::parse(base).expect("valid").app.logs.cloudwatch,
        None
    );

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
fn handover_takes_default_slots_and_hold() {
    let c = Config::parse(
        "[app]\nname='a'\nimage='r/a'\nport=8080\nswap='handover'\n[release]\nsource='file'\n",
    )
    .expect("valid");
    assert_eq!(
        c.app.swap,
        Swap::Handover(Handover {
            slots: [8090, 8091],
            hold: Duration::from_secs(5)
        })
    );
    // Drain is the default, and slots are accepted (unused) with it.
    let c = Config::parse(
        "[app]\nname='a'\nimage='r/a'\nport=8080\nslots=[1, 2]\n[release]\nsource='file'\n",
    )
    .expect("valid");
    assert_eq!(c.app.swap, Swap::Drain);
}

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
            cloudwatch: None
        }
    );
    assert!(c.is_local());
}

/// The README's config block lists every key next to its default: it must stay valid.
#[test]
fn the_readme_config_block_is_valid() {
    let readme = include_str!("../../../README.md");
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
    let c =
        with("detail_path='/ready'\nlog_driver='json-file'\nlog_max_size='10M'\nlog_max_files=3")
            .expect("valid");
    assert_eq!(c.app.detail_path.as_deref(), Some("/ready"));
    assert_eq!(
        c.app.logs,
        LogRotation {
            driver: LogDriver::JsonFile,
            max_size: "10m".into(),
            max_files: 3,
            cloudwatch: None
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
update = "follow"
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
    assert_eq!(c.release.update, UpdateMode::Follow);
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
        // Handover: slots that collide with each other, the app's port, the health port.
        (
            "[app]\nname='a'\nimage='r/a'\nport=80\nswap='handover'\nslots=[90, 90]\n[release]\nsource='file'\n",
            &["the two slots must differ"],
        ),
        (
            "[app]\nname='a'\nimage='r/a'\nport=80\nswap='handover'\nslots=[80, 90]\n[release]\nsource='file'\n",
            &["collide with app.port 80"],
        ),
        (
            "[app]\nname='a'\nimage='r/a'\nport=80\nswap='handover'\nslots=[90, 8081]\n[release]\nsource='file'\n",
            &["collide with the health port 8081"],
        ),
        (
            "[app]\nname='a'\nimage='r/a'\nport=80\nswap='handover'\nslots=[90]\nhold='1h'\n[release]\nsource='file'\n",
            &["exactly two ports", "app.hold"],
        ),
        (
            "[app]\nname='a'\nimage='r/a'\nport=65530\nswap='handover'\n[release]\nsource='file'\n",
            &["leaves no room for the default slots"],
        ),
        (
            "[app]\nname='a'\nimage='r/a'\nport=80\nswap='blue-green'\n[release]\nsource='file'\n",
            &["app.swap \"blue-green\" must be \"handover\""],
        ),
        // The uncoordinated mode's old name: refused, naming the new one.
        (
            "[app]\nname='a'\nimage='r/a'\nport=80\n[release]\nsource='file'\nupdate='in-place'\n",
            &["release.update \"in-place\" is now called \"follow\""],
        ),
        (
            "[app]\nname='a'\nimage='r/a'\nport=80\n[release]\nsource='file'\nupdate='rolling'\n",
            &["release.update \"rolling\" must be \"boot\" or \"follow\""],
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

/// `[trust]`: off without it; exactly one key source; a bad value names what to write.
#[test]
fn trust_section() {
    let file = "[app]\nname='a'\nimage='r/a'\nport=80\n[release]\nsource='file'\n";
    let ssm = "[app]\nname='a'\nimage='r/a'\nport=80\n[release]\nsource='ssm'\nparameter='/skiff/p/release'\n";
    assert_eq!(Config::parse(file).expect("valid").trust, None);
    let table: &[(&str, &str, Result<TrustConfig, &str>)] = &[
        (
            ssm,
            "keys_parameter = '/skiff/prod/trusted-keys'",
            Ok(TrustConfig::Parameter("/skiff/prod/trusted-keys".into())),
        ),
        (
            ssm,
            "keys_parameter = 'trusted-keys'",
            Ok(TrustConfig::Parameter("trusted-keys".into())),
        ),
        (
            file,
            "keys_file = '/etc/skiff/trusted.pem'",
            Ok(TrustConfig::File("/etc/skiff/trusted.pem".into())),
        ),
        (
            ssm,
            "keys_file = 'dev/trusted.pem'",
            Ok(TrustConfig::File("dev/trusted.pem".into())),
        ),
        (ssm, "", Err("exactly one of keys_parameter")),
        (
            ssm,
            "keys_parameter = '/a'\nkeys_file = '/b'",
            Err("exactly one of keys_parameter"),
        ),
        (
            ssm,
            "keys_parameter = 'skiff/prod'",
            Err("not an SSM parameter name"),
        ),
        (
            ssm,
            "keys_parameter = '/a b'",
            Err("not an SSM parameter name"),
        ),
        (ssm, "keys_parameter = ''", Err("not an SSM parameter name")),
        (ssm, "keys_file = ''", Err("trust.keys_file is empty")),
        (ssm, "keys_file = 3", Err("trust.keys_file")),
        (ssm, "keys = '/a'", Err("unknown key trust.keys")),
        (
            file,
            "keys_parameter = '/skiff/prod/trusted-keys'",
            Err("use trust.keys_file"),
        ),
    ];
    for (base, trust, want) in table {
        let text = format!("{base}[trust]\n{trust}\n");
        match (Config::parse(&text), want) {
            (Ok(c), Ok(want)) => assert_eq!(c.trust.as_ref(), Some(want), "{trust}"),
            (Err(problems), Err(want)) => {
                let all = problems.join("\n");
                assert!(all.contains(want), "{trust}: {all}");
            }
            (got, want) => panic!("{trust}: got {got:?}, want {want:?}"),
        }
    }
}
