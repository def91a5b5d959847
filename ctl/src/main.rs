//! Over 600 lines: the command line (clap definitions, ~270 lines with their examples) and the
//! wiring of each command to the library, kept in the binary so `--help` and the calls sit together.
//!
//! `ctl`: ship a release to a skiff fleet and see what it runs. This file only parses the
//! command line and prints; the library's modules decide and act (`ship`, `lock`, `status`,
//! `history`, `alarms`, `progress`, `exit`).
//!
//! `ctl release --tag <TAG>` resolves the image tag to its digest in the registry, takes the
//! release lock, writes the release record to the SSM parameter, reads it back, rolls every
//! instance of the Auto Scaling Group by an instance refresh that watches the stack's release
//! alarms, follows it, and on failure, an alarm, a signal or the timeout puts the previous
//! record back (only over its own write) and rolls the fleet to it. With `--strategy in-place`
//! (default: the stack output ReleaseStrategy) it swaps the container on the running instances
//! instead, batch by batch through their instance tags (`inplace`, `ship::rollout`). `status` (with each
//! instance's target health), `history`, `rollback`, `unlock`, `logs` and `completions`
//! complete the set.
//!
//! Configuration: `--stack` (read the ReleaseParameter, AutoScalingGroup, ImageRepository,
//! TargetGroup, ReleaseAlarmNames, ReleaseStrategy and SwapMode outputs) or `--parameter`/`--asg`/`--image`/
//! `--target-group`, each also from `SKIFF_*` variables; the usual AWS settings (`--region`,
//! `--profile`, `AWS_*`, `AWS_ENDPOINT_URL`).
//!
//! A release holds the lock `<parameter>-lock` (an SSM parameter created only when absent)
//! from before its first read to its end; `ctl unlock` clears a stale one. The first SIGINT or
//! SIGTERM cancels the refresh and puts the previous release back; a second exits at once,
//! printing the state and the commands that finish the job. Logs (`warn!`) go to stderr,
//! filtered by `RUST_LOG` (default `warn`).
//!
//! Signed releases: when the stack names trusted keys (output TrustedKeysParameter, read with
//! ssm:GetParameter) or `--trusted-keys FILE` does, `release` and `rollback` refuse (exit 2),
//! before writing anything, a digest no trusted key signed (`skiff_ctl::trust`); `status` and
//! `history` show who signed what.
//!
//! Exit codes: see [`skiff_ctl::exit::ExitCode`], printed by `--help`.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use skiff_ctl::deployment::{self, Deployment, Locator};
use skiff_ctl::exit::ExitCode;
use skiff_ctl::inplace::{
    self, AwsHosts, BatchSize, InPlaceError, RolloutPlan, Strategy, SwapMode,
};
use skiff_ctl::lock::{self, ReleaseLock, SsmLock};
use skiff_ctl::progress::{Printer, Standing, Stream};
use skiff_ctl::refresh::{AsgRefresher, RefreshPlan};
use skiff_ctl::registry::{Credentials, HttpRegistry};
use skiff_ctl::ship::{self, Adapters, Request, Target};
use skiff_ctl::status;
use skiff_ctl::store::{ReleaseStore, SsmStore};
use skiff_ctl::trust::{Gate, Trust};
use skiff_release::Tag;

const EXAMPLES: &str = "Examples:
  SKIFF_STACK=app-master ctl release --tag $GIT_COMMIT --wait-lock 10m
  ctl --stack app-master status
  ctl --parameter /app/release --asg app-asg --image 1234.dkr.ecr.eu-west-1.amazonaws.com/app history --limit 5
  ctl --stack app-master rollback
  ctl --stack app-master unlock
  ctl completions bash > /etc/bash_completion.d/ctl";

fn examples(first: &str) -> String {
    format!("{first}\n\n{}", ExitCode::help())
}

#[derive(Parser, Debug)]
#[command(name = "ctl", version, about = "skiff ctl: release an image tag to a fleet by a health-gated instance refresh, with rollback", after_help = examples(EXAMPLES))]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct Global {
    /// CloudFormation stack whose outputs name the parameter, the group and the image.
    #[arg(long, env = "SKIFF_STACK", global = true)]
    stack: Option<String>,
    /// SSM parameter holding the release (overrides the stack output ReleaseParameter).
    #[arg(long, env = "SKIFF_PARAMETER", global = true)]
    parameter: Option<String>,
    /// Auto Scaling Group to roll (overrides the stack output AutoScalingGroup).
    #[arg(long, env = "SKIFF_ASG", global = true)]
    asg: Option<String>,
    /// Image repository without tag (overrides the stack output ImageRepository).
    #[arg(long, env = "SKIFF_IMAGE", global = true)]
    image: Option<String>,
    /// Target group ARN whose health `status` shows (overrides the stack output TargetGroup).
    #[arg(long, env = "SKIFF_TARGET_GROUP", global = true)]
    target_group: Option<String>,
    /// AWS region (default: AWS_REGION, the profile).
    #[arg(long, env = "AWS_REGION", global = true)]
    region: Option<String>,
    /// AWS profile (default: AWS_PROFILE).
    #[arg(long, env = "AWS_PROFILE", global = true)]
    profile: Option<String>,
    /// Machine-readable output: JSON lines for events, one JSON document for results.
    #[arg(long, global = true)]
    json: bool,
    /// PEM public keys (P-256) a release must be signed by, for a run without a stack (the
    /// stack's keys come from its output TrustedKeysParameter). Neither: no signature check.
    #[arg(long, env = "SKIFF_TRUSTED_KEYS", global = true, value_name = "PEM")]
    trusted_keys: Option<std::path::PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Release TAG: verify, write the parameter, roll the fleet, roll back on failure.
    #[command(after_help = examples("Examples:
  ctl --stack app-master release --tag 3f2c1ab
  ctl --stack app-master release --tag 3f2c1ab --dry-run
  ctl --stack app-master release --tag 3f2c1ab --wait-lock 15m
  ctl --stack app-master release --tag 3f2c1ab --checkpoints 25,50 --checkpoint-delay 5m --alarm app-5xx
  ctl --stack app-master release --tag 3f2c1ab --no-wait --json
  ctl --stack app-master release --tag 3f2c1ab --strategy in-place --batch 25% --bake 30s
  ctl --stack app-one release --tag 3f2c1ab --strategy in-place --accept-downtime
  ctl --parameter /dev/release --asg dev --image 127.0.0.1:5000/skiff/app --trusted-keys keys.pub release --tag 3f2c1ab

Signatures: when the stack names trusted keys (output TrustedKeysParameter) or --trusted-keys
does, the digest must carry a cosign signature by one of them (`ctl sign`, `make sign`);
otherwise ctl refuses before writing anything (exit 2). --dry-run shows the verdict.

Signals: the first SIGINT/SIGTERM cancels the refresh, waits for it to stop, puts the previous
release back (only if the parameter still holds this release) and starts the refresh that rolls
the replaced instances back (exit 1); in place it tells the switched instances the previous
release, waits until they run it and puts it back in the parameter (exit 1). A second one exits
at once (exit 3), printing the state and the commands that finish the job."))]
    Release {
        /// The image tag to release (Docker tag grammar, e.g. the git commit).
        #[arg(long, value_parser = parse_tag)]
        tag: Tag,
        #[command(flatten)]
        opts: ReleaseOpts,
    },
    /// Show the release, the running or last refresh, and what each instance runs.
    #[command(
        after_help = "Examples:\n  ctl --stack app-master status\n  ctl --stack app-master status --json | jq .drift"
    )]
    Status,
    /// List past releases from the parameter history, newest first.
    #[command(
        after_help = "Examples:\n  ctl --stack app-master history\n  ctl --stack app-master history --limit 3 --json"
    )]
    History {
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Release the last good release again (or the newest good one with tag --to), same path
    /// as release, under the same lock.
    #[command(after_help = examples(
        "Examples:\n  ctl --stack app-master rollback\n  ctl --stack app-master rollback --to 3f2c1ab --dry-run"
    ))]
    Rollback {
        /// Tag to return to; default: the newest earlier release with a different tag that was
        /// not itself rolled back.
        #[arg(long, value_parser = parse_tag)]
        to: Option<Tag>,
        #[command(flatten)]
        opts: ReleaseOpts,
    },
    /// Clear the release lock left by a release that was killed (asks first, unless --force).
    #[command(after_help = examples(
        "Examples:\n  ctl --stack app-master unlock\n  ctl --stack app-master unlock --force"
    ))]
    Unlock {
        /// Clear it without asking (needed when stdin is not a terminal).
        #[arg(long)]
        force: bool,
        /// Also resume the HealthCheck and ReplaceUnhealthy processes a killed in-place run
        /// left suspended (Auto Scaling may then replace an instance it left mid-swap; a release
        /// run again takes the hold over and resumes it at its end instead).
        #[arg(long)]
        resume: bool,
    },
    /// Print the app's output across the fleet from CloudWatch Logs, interleaved by time, with
    /// the instance and the release on each line.
    #[command(after_help = "Examples:
  ctl --stack app-master logs
  ctl --stack app-master logs --since 1h --release 3f2c1ab
  ctl --stack app-master logs --follow --instance i-0123456789abcdef0
  ctl --json logs --log-group /skiff/master/app --since 30m | jq -r .message

The log group is the stack output LogGroup (or --log-group / SKIFF_LOG_GROUP). Each host writes
one stream per release, named <instance>/<tag>, and its agent's own lines in <instance>/~agent
(release ~agent). Ctrl-C ends --follow.")]
    Logs {
        /// Keep printing new lines as they arrive (polls CloudWatch every few seconds).
        #[arg(long)]
        follow: bool,
        /// How far back to start, e.g. 10m, 2h, 1day.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        since: Duration,
        /// Only this instance's lines (the EC2 instance id).
        #[arg(long, value_name = "ID", value_parser = parse_instance)]
        instance: Option<String>,
        /// Only the lines of this release (`~agent`: only the agents' own lines).
        #[arg(long, value_name = "TAG", value_parser = parse_log_release)]
        release: Option<String>,
        /// The log group (overrides the stack output LogGroup).
        #[arg(long, env = "SKIFF_LOG_GROUP")]
        log_group: Option<String>,
        /// How often --follow asks CloudWatch.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration, hide = true)]
        poll: Duration,
    },
    /// Print shell completions.
    #[command(
        after_help = "Examples:\n  ctl completions bash > /etc/bash_completion.d/ctl\n  ctl completions zsh > ~/.zfunc/_ctl"
    )]
    Completions { shell: clap_complete::Shell },
    /// Sign an image digest (cosign's format, key file) and push the signature beside it.
    #[command(after_help = "Examples:
  ctl --stack app-master sign --tag 3f2c1ab --key-file \"$SKIFF_SIGNING_KEY\"
  ctl --image 127.0.0.1:5000/skiff/app sign --digest sha256:... --key-file signing.pem
  ctl --stack app-master sign --tag 3f2c1ab --kms-key alias/skiff-signing --public-key signing.pub

The key file is a PEM PKCS#8 P-256 private key (openssl genpkey -algorithm EC -pkeyopt
ec_paramgen_curve:P-256); a KMS key is an ECC_NIST_P256 SIGN_VERIFY key, of which ctl calls
kms:Sign only (with the payload's SHA-256 as a DIGEST). The signature is read back and checked
with the public key.")]
    Sign {
        /// The tag to sign (resolved to its digest now).
        #[arg(long, value_parser = parse_tag, conflicts_with = "digest", required_unless_present = "digest")]
        tag: Option<Tag>,
        /// The digest to sign.
        #[arg(long)]
        digest: Option<String>,
        /// The private key (PEM PKCS#8, P-256).
        #[arg(long, env = "SKIFF_SIGNING_KEY", required_unless_present = "kms_key")]
        key_file: Option<std::path::PathBuf>,
        /// Sign with this asymmetric KMS key (id, ARN or alias; ECC_NIST_P256) instead.
        #[arg(long, conflicts_with = "key_file", requires = "public_key")]
        kms_key: Option<String>,
        /// The KMS key's public key (PEM), to check the signature read back (kms:Sign only).
        #[arg(long)]
        public_key: Option<std::path::PathBuf>,
        /// Registry user (basic auth or token service); password from SKIFF_REGISTRY_PASSWORD.
        #[arg(long, env = "SKIFF_REGISTRY_USER")]
        registry_user: Option<String>,
    },
}

#[derive(Args, Debug)]
struct ReleaseOpts {
    /// Show old -> new and stop.
    #[arg(long)]
    dry_run: bool,
    /// Release without resolving the digest (the agents then pull by tag).
    #[arg(long)]
    skip_verify: bool,
    /// Return once the refresh has started.
    #[arg(long)]
    no_wait: bool,
    /// On failure leave things as they are and print what to do (exit 3).
    #[arg(long)]
    no_rollback: bool,
    /// Wait up to this long for the release lock and a running refresh to be free (default:
    /// do not wait, exit 4).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    wait_lock: Duration,
    /// Longest wait for the refresh; then it is cancelled and rolled back.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// How often the refresh is checked.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration, hide = true)]
    poll: Duration,
    /// Who releases (recorded); default BUILD_USER, then USER.
    #[arg(long)]
    released_by: Option<String>,
    /// How the release reaches the instances: `refresh` (an instance refresh replaces them)
    /// or `in-place` (ctl swaps the container on the running instances, batch by batch).
    /// Default: the stack output ReleaseStrategy, else refresh.
    #[arg(long, value_parser = parse_strategy)]
    strategy: Option<Strategy>,
    /// In place: instances per batch, a number (2) or a percentage of the group (25%).
    /// Default: 1 for groups of up to 4 instances, 25 % (rounded up) for larger ones. When
    /// the agents swap by handover (stack output SwapMode) no target leaves the load
    /// balancer, so batches are sized by blast radius: the first batch is always one instance
    /// (a canary), the rest come in batches of this size. With drain swaps (the default, and
    /// any stack without SwapMode) a batch that holds every healthy target is refused (exit
    /// 2) unless --accept-downtime.
    #[arg(long, value_name = "N|P%", value_parser = parse_batch)]
    batch: Option<BatchSize>,
    /// In place, drain swaps: swap a batch that holds every target the load balancer calls
    /// healthy (a 1-instance group, --batch 100%) anyway. While it drains the load balancer
    /// fails open and routes to every target: requests fail until the batch is back.
    #[arg(long)]
    accept_downtime: bool,
    /// Refresh: wait this long after the last instance is replaced before the refresh (and the
    /// release) succeeds; the release alarms keep watching meanwhile. In place (also
    /// `--bake`): per batch, once it is healthy, with its target health watched.
    #[arg(long, alias = "bake", value_parser = humantime::parse_duration)]
    bake_time: Option<Duration>,
    /// In place: longest a batch may take to run the release healthy (also the longest wait
    /// for a revert).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    batch_timeout: Duration,
    /// In place: longest the pull on every instance may take before anything is switched.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pull_timeout: Duration,
    /// Percent of healthy capacity kept during the refresh.
    #[arg(long, default_value_t = 100)]
    min_healthy: i32,
    /// Percent of capacity allowed during the refresh (200 = launch before terminate).
    #[arg(long, default_value_t = 200)]
    max_healthy: i32,
    /// Seconds a new instance warms up; short because the lifecycle hook gates readiness.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Pause at these percentages, e.g. 25,50.
    #[arg(long, value_delimiter = ',')]
    checkpoints: Vec<i32>,
    /// Pause length at each checkpoint.
    #[arg(long, value_parser = humantime::parse_duration)]
    checkpoint_delay: Option<Duration>,
    /// CloudWatch alarm that fails the release when it goes to ALARM during the refresh
    /// (repeatable, at most 10); replaces the stack's alarms (output ReleaseAlarmNames), which
    /// are watched by default.
    #[arg(long = "alarm", value_name = "NAME", conflicts_with = "no_alarms")]
    alarms: Vec<String>,
    /// Watch no alarm, not even the stack's.
    #[arg(long)]
    no_alarms: bool,
    /// How long the release alarms need to be able to fire (two one-minute datapoints and the
    /// load balancer's delay): a refresh watching alarms bakes at least this long, and an
    /// in-place release watches them this long after its last batch. 0s: neither.
    #[arg(long, env = "SKIFF_ALARM_WINDOW", default_value = "4m", value_parser = humantime::parse_duration)]
    alarm_window: Duration,
    /// Registry user (basic auth or token service).
    #[arg(long, env = "SKIFF_REGISTRY_USER")]
    registry_user: Option<String>,
    /// Registry password; from the environment only, so it stays out of process lists.
    #[arg(skip)]
    registry_password: Option<String>,
    /// Also trust this CA (PEM) for the registry's TLS certificate. Without --registry-user, an
    /// ECR repository authenticates with ecr:GetAuthorizationToken of the AWS identity in use.
    #[arg(long, env = "SKIFF_REGISTRY_CA", value_name = "PEM")]
    registry_ca: Option<std::path::PathBuf>,
}

/// An instance as the agent names its streams (`[logs] instance`, the EC2 instance id).
fn parse_instance(s: &str) -> Result<String, String> {
    let ok = (1..=128).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err("an instance id like i-0123456789abcdef0 (letters, digits, '_', '.', '-')".into())
    }
}

/// A release tag, or `~agent` for the agents' own stream.
fn parse_log_release(s: &str) -> Result<String, String> {
    if s == skiff_ctl::logs::AGENT_RELEASE {
        return Ok(s.to_owned());
    }
    parse_tag(s).map(|t| t.to_string())
}

fn parse_strategy(s: &str) -> Result<Strategy, String> {
    s.parse().map_err(|e: InPlaceError| e.to_string())
}

fn parse_batch(s: &str) -> Result<BatchSize, String> {
    s.parse().map_err(|e: InPlaceError| e.to_string())
}

fn parse_tag(s: &str) -> Result<Tag, String> {
    s.parse()
        .map_err(|e: skiff_release::ReleaseError| e.to_string())
}

/// A failure with its exit code, raised where the code is known.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct Exit {
    code: ExitCode,
    message: String,
}

fn exit(code: ExitCode, message: impl std::fmt::Display) -> anyhow::Error {
    Exit {
        code,
        message: message.to_string(),
    }
    .into()
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli) {
        Ok(code) => code.into(),
        Err(e) => {
            let code = e
                .downcast_ref::<Exit>()
                .map_or(ExitCode::Refused, |x| x.code);
            eprintln!("ctl: error: {e:#}");
            code.into()
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "ctl", &mut std::io::stdout());
        return Ok(ExitCode::Success);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(run_async(cli))
}

struct Clients {
    deployment: Deployment,
    sdk: aws_config::SdkConfig,
    ssm: aws_sdk_ssm::Client,
    autoscaling: aws_sdk_autoscaling::Client,
    ec2: aws_sdk_ec2::Client,
    elb: aws_sdk_elasticloadbalancingv2::Client,
}

async fn connect(g: &Global) -> anyhow::Result<Clients> {
    let sdk = skiff_ctl::aws::sdk_config(g.region.as_deref(), g.profile.as_deref()).await;
    let locator = Locator {
        stack: g.stack.clone(),
        parameter: g.parameter.clone(),
        asg: g.asg.clone(),
        image: g.image.clone(),
        target_group: g.target_group.clone(),
    };
    let deployment = deployment::locate(&aws_sdk_cloudformation::Client::new(&sdk), &locator)
        .await
        .map_err(|e| exit(ExitCode::Refused, e))?;
    Ok(Clients {
        deployment,
        ssm: aws_sdk_ssm::Client::new(&sdk),
        autoscaling: aws_sdk_autoscaling::Client::new(&sdk),
        ec2: aws_sdk_ec2::Client::new(&sdk),
        elb: aws_sdk_elasticloadbalancingv2::Client::new(&sdk),
        sdk,
    })
}

async fn run_async(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = &cli.global;
    match cli.command {
        Command::Completions { .. } => Ok(ExitCode::Success),
        Command::Release { tag, mut opts } => {
            opts.registry_password = std::env::var("SKIFF_REGISTRY_PASSWORD").ok();
            let c = connect(g).await?;
            let verify = !opts.skip_verify;
            release(g, &c, Target::Tag { tag, verify }, &opts).await
        }
        Command::Rollback { to, opts } => {
            let c = connect(g).await?;
            release(g, &c, Target::Rollback { to }, &opts).await
        }
        Command::Unlock { force, resume } => unlock(g, &connect(g).await?, force, resume).await,
        Command::Logs {
            follow,
            since,
            instance,
            release,
            log_group,
            poll,
        } => {
            let filter = skiff_ctl::logs::Filter { instance, release };
            logs_cmd(g, log_group, filter, since, follow, poll).await
        }
        Command::Status => status_cmd(g, &connect(g).await?).await,
        Command::Sign {
            tag,
            digest,
            key_file,
            kms_key,
            public_key,
            registry_user,
        } => {
            sign_cmd(
                g,
                tag,
                digest,
                (key_file, kms_key, public_key),
                registry_user,
            )
            .await
        }
        Command::History { limit } => history_cmd(g, &connect(g).await?, limit).await,
    }
}

/// The trusted keys of this deployment (`--trusted-keys`, else the stack's), unless they are
/// named and cannot be used.
async fn trust(g: &Global, c: &Clients) -> Result<Trust, skiff_ctl::trust::TrustError> {
    skiff_ctl::trust::resolve(
        g.trusted_keys.as_deref(),
        c.deployment.trusted_keys.as_deref(),
        &c.ssm,
    )
    .await
}

/// The registry client of `status` and `history` (the same credentials a release uses, from
/// the environment: SKIFF_REGISTRY_USER, SKIFF_REGISTRY_PASSWORD, SKIFF_REGISTRY_CA).
fn reading_registry(c: &Clients) -> anyhow::Result<HttpRegistry> {
    let creds = std::env::var("SKIFF_REGISTRY_USER")
        .ok()
        .map(|user| Credentials {
            user,
            password: std::env::var("SKIFF_REGISTRY_PASSWORD").unwrap_or_default(),
        });
    let registry = match std::env::var_os("SKIFF_REGISTRY_CA") {
        Some(ca) => HttpRegistry::with_ca(creds, std::path::Path::new(&ca))
            .map_err(|e| exit(ExitCode::Refused, e))?,
        None => HttpRegistry::new(creds).context("cannot set up the HTTP client")?,
    };
    Ok(registry.with_ecr_tokens(c.sdk.clone()))
}

/// `ctl history`: the records, and who signed each one shown (one registry read per digest).
async fn history_cmd(g: &Global, c: &Clients, limit: usize) -> anyhow::Result<ExitCode> {
    use skiff_ctl::trust::Signer;
    let trust = trust(g, c).await;
    let store = SsmStore::new(c.ssm.clone(), &c.deployment.parameter);
    let history = store
        .history(limit)
        .await
        .map_err(|e| exit(ExitCode::Refused, e))?;
    let releases: Vec<_> = history.iter().map(|h| h.release.as_ref()).collect();
    let signers = skiff_ctl::trust::signers(
        &trust,
        &reading_registry(c)?,
        &c.deployment.image,
        &releases,
    )
    .await;
    if g.json {
        #[derive(serde::Serialize)]
        struct Entry<'a> {
            #[serde(flatten)]
            stored: &'a skiff_ctl::store::Stored,
            #[serde(skip_serializing_if = "Option::is_none")]
            signature: Option<&'a Signer>,
        }
        let entries: Vec<Entry<'_>> = history
            .iter()
            .zip(&signers)
            .map(|(stored, s)| Entry {
                stored,
                signature: s.as_ref(),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&entries)?);
    } else {
        if matches!(trust, Ok(Trust::Off)) {
            eprintln!("{}", skiff_ctl::trust::OFF);
        }
        print!("{}", skiff_ctl::history::render(&history, &signers));
    }
    Ok(ExitCode::Success)
}

/// `ctl sign`: the repository from --image, else the stack; see skiff_ctl::sign.
async fn sign_cmd(
    g: &Global,
    tag: Option<Tag>,
    digest: Option<String>,
    (key_file, kms_key, public_key): (
        Option<std::path::PathBuf>,
        Option<String>,
        Option<std::path::PathBuf>,
    ),
    registry_user: Option<String>,
) -> anyhow::Result<ExitCode> {
    use skiff_ctl::sign::{self, Signer, Subject};
    let subject = match (tag, digest) {
        (Some(t), _) => Subject::Tag(t),
        (None, Some(d)) => Subject::Digest(d.parse().map_err(|e| exit(ExitCode::Refused, e))?),
        (None, None) => return Err(exit(ExitCode::Refused, "give --tag or --digest")),
    };
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path).map_err(|e| {
            exit(
                ExitCode::Refused,
                format!("cannot read {}: {e}", path.display()),
            )
        })
    };
    let sdk = skiff_ctl::aws::sdk_config(g.region.as_deref(), g.profile.as_deref()).await;
    let signer = match (key_file, kms_key, public_key) {
        (_, Some(key_id), Some(public)) => Signer::Kms {
            client: aws_sdk_kms::Client::new(&sdk),
            key_id,
            public: skiff_signature::TrustedKey::from_pem(&read(&public)?)
                .map_err(|e| exit(ExitCode::Refused, e))?,
        },
        (Some(file), None, _) => Signer::File(
            skiff_signature::FileKey::from_pem(&read(&file)?)
                .map_err(|e| exit(ExitCode::Refused, e))?,
        ),
        _ => {
            return Err(exit(
                ExitCode::Refused,
                "give --key-file, or --kms-key with --public-key",
            ));
        }
    };
    let repository = match &g.image {
        Some(image) => image.clone(),
        None => connect(g).await?.deployment.image.clone(),
    };
    let creds = registry_user.map(|user| Credentials {
        user,
        password: std::env::var("SKIFF_REGISTRY_PASSWORD").unwrap_or_default(),
    });
    let registry = HttpRegistry::new(creds)
        .context("cannot set up the HTTP client")?
        .with_ecr_tokens(sdk);
    let signed = sign::sign(&registry, &repository, subject, &signer)
        .await
        .map_err(|e| exit(ExitCode::Refused, e))?;
    if g.json {
        println!("{}", serde_json::to_string_pretty(&signed)?);
    } else {
        println!(
            "signed {} with key {} ({})",
            signed.image, signed.key_id, signed.signature_tag
        );
    }
    Ok(ExitCode::Success)
}

/// `ctl logs`: only the log group is needed, not the release parameter nor the group.
async fn logs_cmd(
    g: &Global,
    log_group: Option<String>,
    filter: skiff_ctl::logs::Filter,
    since: Duration,
    follow: bool,
    poll: Duration,
) -> anyhow::Result<ExitCode> {
    use skiff_ctl::logs::{self, CloudWatchLogs, Cursor, LogsError};
    let sdk = skiff_ctl::aws::sdk_config(g.region.as_deref(), g.profile.as_deref()).await;
    let group = match (log_group, &g.stack) {
        (Some(group), _) => group,
        (None, Some(stack)) => {
            let cfn = aws_sdk_cloudformation::Client::new(&sdk);
            let outputs = deployment::stack_outputs(&cfn, stack)
                .await
                .map_err(|e| exit(ExitCode::Refused, e))?;
            outputs
                .into_iter()
                .find(|(k, _)| k == logs::OUTPUT_LOG_GROUP)
                .map(|(_, v)| v)
                .ok_or_else(|| exit(ExitCode::Refused, LogsError::NoLogGroup))?
        }
        (None, None) => return Err(exit(ExitCode::Refused, LogsError::NoLogGroup)),
    };
    let source = CloudWatchLogs::new(aws_sdk_cloudwatchlogs::Client::new(&sdk), &group);
    let mut cursor = Cursor::new(logs::window_start(logs::now_ms(), since));
    let mut out = std::io::stdout().lock();
    let mut first = true;
    loop {
        let events = match logs::read(&source, &filter, cursor.start).await {
            Ok(events) => events,
            // Once following, a network blip is waited out; a missing group or a denial is not.
            Err(e @ LogsError::Read { .. }) if !first => {
                tracing::warn!("{e}; trying again in {}", humantime::format_duration(poll));
                tokio::time::sleep(poll).await;
                continue;
            }
            Err(e) => return Err(exit(ExitCode::Refused, e)),
        };
        first = false;
        for e in cursor.advance(events) {
            writeln!(out, "{}", logs::format_line(&e, g.json))?;
        }
        out.flush()?;
        if !follow {
            return Ok(ExitCode::Success);
        }
        tokio::time::sleep(poll).await;
    }
}

fn released_by(opts: &ReleaseOpts) -> String {
    opts.released_by
        .clone()
        .or_else(|| std::env::var("BUILD_USER").ok())
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// How to call ctl for this deployment, for the commands printed as advice.
fn ctl_prefix(g: &Global, d: &Deployment) -> String {
    let mut s = String::from("ctl");
    match &g.stack {
        Some(stack) => s.push_str(&format!(" --stack {stack}")),
        None => s.push_str(&format!(
            " --parameter {} --asg {} --image {}",
            d.parameter, d.asg, d.image
        )),
    }
    if let Some(r) = &g.region {
        s.push_str(&format!(" --region {r}"));
    }
    s
}

async fn release(
    g: &Global,
    c: &Clients,
    target: Target,
    opts: &ReleaseOpts,
) -> anyhow::Result<ExitCode> {
    let store = SsmStore::new(c.ssm.clone(), &c.deployment.parameter);
    let refresher =
        AsgRefresher::new(c.autoscaling.clone(), &c.deployment.asg).with_elb(c.elb.clone());
    let lock = SsmLock::for_parameter(c.ssm.clone(), &c.deployment.parameter);
    let creds = opts.registry_user.clone().map(|user| Credentials {
        user,
        password: opts.registry_password.clone().unwrap_or_default(),
    });
    let resolver = match &opts.registry_ca {
        Some(ca) => HttpRegistry::with_ca(creds, ca).map_err(|e| exit(ExitCode::Refused, e))?,
        None => HttpRegistry::new(creds).context("cannot set up the HTTP client")?,
    }
    .with_ecr_tokens(c.sdk.clone());
    let trust = trust(g, c).await.map_err(|e| exit(ExitCode::Refused, e))?;
    let gate = Gate::new(&trust, &resolver);
    let fleet = Adapters {
        parameter: &c.deployment.parameter,
        image: &c.deployment.image,
        store: &store,
        refresher: &refresher,
        resolver: &resolver,
        lock: &lock,
    };
    let ctl = ctl_prefix(g, &c.deployment);
    let alarms = skiff_ctl::alarms::choose(opts.no_alarms, &opts.alarms, &c.deployment.alarms)
        .map_err(|e| exit(ExitCode::Refused, e))?;
    let strategy = inplace::choose_strategy(opts.strategy, c.deployment.strategy.as_deref())
        .map_err(|e| exit(ExitCode::Refused, e))?;
    let swap = match strategy {
        Strategy::Refresh => SwapMode::default(),
        Strategy::InPlace => SwapMode::from_output(c.deployment.swap.as_deref())
            .map_err(|e| exit(ExitCode::Refused, e))?,
    };
    let rollout = match strategy {
        Strategy::Refresh => None,
        Strategy::InPlace if opts.no_wait => {
            return Err(exit(
                ExitCode::Refused,
                "--no-wait cannot be used with the in-place strategy: ctl drives every batch; leave out --no-wait (or use --strategy refresh)",
            ));
        }
        Strategy::InPlace => Some(RolloutPlan {
            batch: opts.batch,
            swap,
            accept_downtime: opts.accept_downtime,
            bake: opts.bake_time.unwrap_or_default(),
            batch_timeout: opts.batch_timeout,
            pull_timeout: opts.pull_timeout,
        }),
    };
    let hosts = AwsHosts {
        asg: c.deployment.asg.clone(),
        target_group: c.deployment.target_group.clone(),
        autoscaling: c.autoscaling.clone(),
        ec2: c.ec2.clone(),
        elb: c.elb.clone(),
        cloudwatch: aws_sdk_cloudwatch::Client::new(&c.sdk),
    };
    let req = Request {
        target,
        released_by: released_by(opts),
        owner: lock::owner(),
        dry_run: opts.dry_run,
        wait: !opts.no_wait,
        rollback: !opts.no_rollback,
        timeout: opts.timeout,
        poll: opts.poll,
        wait_lock: opts.wait_lock,
        plan: RefreshPlan {
            bake_time: opts.bake_time,
            min_healthy: opts.min_healthy,
            max_healthy: opts.max_healthy,
            warmup: opts.warmup,
            checkpoints: opts.checkpoints.clone(),
            checkpoint_delay: opts.checkpoint_delay,
            alarms: alarms.alarms,
            alarm_window: opts.alarm_window,
        },
        rollout,
        ctl: ctl.clone(),
    };
    // The standing is what a second signal reports from; it sees every event the printer does.
    let standing = Arc::new(Mutex::new(Standing::default()));
    let on_second = {
        let standing = standing.clone();
        move |signal: &'static str| {
            let report = standing
                .lock()
                .map(|j| j.report(&ctl))
                .unwrap_or_else(|_| format!("state unknown; run `{ctl} status`"));
            eprintln!(
                "\nctl: second {signal}: exiting now, the release is NOT finished\nctl: {report}"
            );
            std::process::exit(i32::from(ExitCode::NotRolledBack.code()));
        }
    };
    let mut stop =
        skiff_ctl::signal::listen(on_second).context("cannot listen for SIGINT/SIGTERM")?;
    let mut printer = Printer::new(g.json);
    let result = ship::ship_checked(&fleet, &hosts, &gate, &req, &mut stop, &mut |e| {
        if let Ok(mut j) = standing.lock() {
            j.record(&e);
        }
        printer.event(&e);
    })
    .await;
    printer.finish_bar();
    let outcome = result.map_err(|e| {
        let code = e.exit_code();
        exit(code, e)
    })?;
    if g.json {
        println!("{}", serde_json::to_string(&outcome)?);
    } else {
        match skiff_ctl::progress::outcome_text(&outcome) {
            (Stream::Stdout, text) => println!("{text}"),
            (Stream::Stderr, text) => eprintln!("{text}"),
        }
    }
    Ok(outcome.exit_code())
}

/// `ctl unlock`: show who holds the lock and clear it, after a yes on a terminal or --force.
async fn unlock(g: &Global, c: &Clients, force: bool, resume: bool) -> anyhow::Result<ExitCode> {
    let lock = SsmLock::for_parameter(c.ssm.clone(), &c.deployment.parameter);
    let name = lock.name().to_owned();
    let ctl = ctl_prefix(g, &c.deployment);
    let confirm = |holder: &lock::Holder| -> Result<(), String> {
        eprintln!("the lock {name} is held by {holder}");
        if force {
            return Ok(());
        }
        if !std::io::stdin().is_terminal() {
            return Err(
                "not clearing the lock without a confirmation: stdin is not a terminal; check with `ctl status` that no release runs, then pass --force"
                    .into(),
            );
        }
        eprint!("clear it? Only if that release is no longer running (`{ctl} status`). Type yes: ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        match std::io::stdin().lock().read_line(&mut answer) {
            Ok(_) if answer.trim() == "yes" => Ok(()),
            Ok(_) => Err("not cleared: the answer was not yes".into()),
            Err(e) => Err(format!("not cleared: cannot read the answer ({e})")),
        }
    };
    let done = match lock::unlock(&lock, time::OffsetDateTime::now_utc(), confirm)
        .await
        .map_err(|e| exit(ExitCode::Refused, e))?
    {
        lock::Unlock::Free => format!("nobody holds the lock {}", lock.name()),
        lock::Unlock::Cleared(_) => format!("cleared the lock {}", lock.name()),
        lock::Unlock::Declined { why, .. } => return Err(exit(ExitCode::Refused, why)),
        lock::Unlock::Changed(now) => {
            return Err(exit(
                ExitCode::Busy,
                format!("not cleared: the lock changed meanwhile and is now held by {now}"),
            ));
        }
    };
    println!("{done}");
    // No run holds the group now. What a killed in-place run left suspended is resumed only
    // when asked: resuming while an instance it left mid-swap is out of the load balancer lets
    // Auto Scaling replace that instance; the release run again takes the hold over instead.
    let hosts = AwsHosts {
        asg: c.deployment.asg.clone(),
        target_group: c.deployment.target_group.clone(),
        autoscaling: c.autoscaling.clone(),
        ec2: c.ec2.clone(),
        elb: c.elb.clone(),
        cloudwatch: aws_sdk_cloudwatch::Client::new(&c.sdk),
    };
    if !resume {
        let stale = match inplace::InPlaceFleet::held(&hosts).await {
            Ok(now) => inplace::stale_hold(&now),
            Err(e) => {
                println!("note: cannot read the group's suspended processes: {e}");
                Vec::new()
            }
        };
        if !stale.is_empty() {
            println!(
                "{} stay suspended on group {}, held by an in-place run that was killed: run that release again (an in-place run takes the hold over and resumes it at its end; a refresh resumes it first), or `ctl unlock --resume` to resume them now",
                stale.join(" "),
                c.deployment.asg
            );
        }
        return Ok(ExitCode::Success);
    }
    match inplace::resume_stale(&hosts).await {
        Ok(resumed) if resumed.is_empty() => Ok(ExitCode::Success),
        Ok(resumed) => {
            println!(
                "resumed {} on group {}, left suspended by an in-place run that was killed",
                resumed.join(" "),
                c.deployment.asg
            );
            Ok(ExitCode::Success)
        }
        Err(e) => Err(exit(
            ExitCode::NotRolledBack,
            format!(
                "the lock is clear, but what a killed in-place run left suspended could not be resumed: {e}"
            ),
        )),
    }
}

async fn status_cmd(g: &Global, c: &Clients) -> anyhow::Result<ExitCode> {
    let trust = trust(g, c).await;
    let store = SsmStore::new(c.ssm.clone(), &c.deployment.parameter);
    let refresher = AsgRefresher::new(c.autoscaling.clone(), &c.deployment.asg);
    let lock = SsmLock::for_parameter(c.ssm.clone(), &c.deployment.parameter);
    let report = status::gather(
        &c.deployment,
        &store,
        &refresher,
        &lock,
        &c.autoscaling,
        &c.ec2,
        &c.elb,
    )
    .await
    .map_err(|e| exit(ExitCode::Refused, e))?;
    let mut report = report;
    let desired = report
        .release
        .as_deref()
        .and_then(|v| skiff_release::Release::parse(v).ok());
    report.signature = match (&trust, &desired) {
        (Ok(Trust::Off), _) => Some(skiff_ctl::trust::Signer::Off),
        (_, None) => None,
        (_, Some(r)) => skiff_ctl::trust::signers(
            &trust,
            &reading_registry(c)?,
            &c.deployment.image,
            &[Some(r)],
        )
        .await
        .pop()
        .flatten(),
    };
    if g.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", status::render(&report));
    }
    Ok(ExitCode::Success)
}
