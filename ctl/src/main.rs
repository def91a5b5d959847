//! `ctl`: ship a release to a skiff fleet and see what it runs.
//!
//! `ctl release --tag <TAG>` resolves the image tag to its digest in the registry, refuses while
//! an instance refresh is running (the refresh is the deploy lock), writes the release record to
//! the SSM parameter, reads it back, rolls every instance of the Auto Scaling Group by an
//! instance refresh, follows it, and on failure, cancellation or timeout puts the previous
//! record back and rolls the fleet to it. `status`, `history`, `rollback` and `completions`
//! complete the set.
//!
//! Configuration: `--stack` (read the ReleaseParameter, AutoScalingGroup and ImageRepository
//! outputs) or `--parameter`/`--asg`/`--image`, each also from `SKIFF_*` variables; the usual
//! AWS settings (`--region`, `--profile`, `AWS_*`, `AWS_ENDPOINT_URL`).
//!
//! Exit codes: 0 success; 1 the release failed and the fleet was rolled back to the previous
//! release; 2 bad input or configuration, or a check failed before anything changed (unknown
//! image, registry unreachable, AWS read failed); 3 the release failed and was not rolled back,
//! or the state is unknown; 4 another release is in progress (nothing changed).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use skiff_ctl::deployment::{self, Deployment, Locator};
use skiff_ctl::refresh::{AsgRefresher, InstanceRefresher, RefreshPlan};
use skiff_ctl::registry::{Credentials, HttpRegistry};
use skiff_ctl::ship::{self, Event, Fleet, Outcome, Purpose, Request, Target};
use skiff_ctl::status;
use skiff_ctl::store::{ReleaseStore, SsmStore};
use skiff_release::{Release, Tag};

const EXIT_INPUT: u8 = 2;
const EXIT_UNKNOWN: u8 = 3;

const EXAMPLES: &str = "Examples:
  SKIFF_STACK=app-master ctl release --tag $GIT_COMMIT
  ctl --stack app-master status
  ctl --parameter /app/release --asg app-asg --image 1234.dkr.ecr.eu-west-1.amazonaws.com/app history --limit 5
  ctl --stack app-master rollback
  ctl completions bash > /etc/bash_completion.d/ctl

Exit codes: 0 success, 1 failed and rolled back, 2 bad input or configuration (nothing changed),
3 failed and not rolled back or state unknown, 4 another release in progress (nothing changed).";

#[derive(Parser, Debug)]
#[command(name = "ctl", version, about = "skiff ctl: release an image tag to a fleet by a health-gated instance refresh, with rollback", after_help = EXAMPLES)]
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
    /// AWS region (default: AWS_REGION, the profile).
    #[arg(long, env = "AWS_REGION", global = true)]
    region: Option<String>,
    /// AWS profile (default: AWS_PROFILE).
    #[arg(long, env = "AWS_PROFILE", global = true)]
    profile: Option<String>,
    /// Machine-readable output: JSON lines for events, one JSON document for results.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Release TAG: verify, write the parameter, roll the fleet, roll back on failure.
    #[command(after_help = "Examples:
  ctl --stack app-master release --tag 3f2c1ab
  ctl --stack app-master release --tag 3f2c1ab --dry-run
  ctl --stack app-master release --tag 3f2c1ab --checkpoints 25,50 --checkpoint-delay 5m --alarm app-5xx
  ctl --stack app-master release --tag 3f2c1ab --no-wait --json

Exit codes: 0 released, 1 failed and rolled back, 2 refused (bad tag, unknown image, registry
down; nothing changed), 3 failed and not rolled back or unknown, 4 another release is running.")]
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
    /// Release the previous release again (or the newest one with tag --to), same path as release.
    #[command(
        after_help = "Examples:\n  ctl --stack app-master rollback\n  ctl --stack app-master rollback --to 3f2c1ab --dry-run"
    )]
    Rollback {
        /// Tag to return to; default: the newest earlier release with a different tag.
        #[arg(long, value_parser = parse_tag)]
        to: Option<Tag>,
        #[command(flatten)]
        opts: ReleaseOpts,
    },
    /// Print shell completions.
    #[command(
        after_help = "Examples:\n  ctl completions bash > /etc/bash_completion.d/ctl\n  ctl completions zsh > ~/.zfunc/_ctl"
    )]
    Completions { shell: clap_complete::Shell },
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
    /// Longest wait for the refresh; then it is cancelled and rolled back.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// How often the refresh is checked.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration, hide = true)]
    poll: Duration,
    /// Who releases (recorded); default BUILD_USER, then USER.
    #[arg(long)]
    released_by: Option<String>,
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
    /// CloudWatch alarm that fails the refresh when it fires (repeatable).
    #[arg(long = "alarm")]
    alarms: Vec<String>,
    /// Registry user (basic auth or token service).
    #[arg(long, env = "SKIFF_REGISTRY_USER")]
    registry_user: Option<String>,
    /// Registry password; from the environment only, so it stays out of process lists.
    #[arg(skip)]
    registry_password: Option<String>,
}

fn parse_tag(s: &str) -> Result<Tag, String> {
    s.parse()
        .map_err(|e: skiff_release::ReleaseError| e.to_string())
}

/// A failure with its exit code, raised where the code is known.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct Exit {
    code: u8,
    message: String,
}

fn exit(code: u8, message: impl std::fmt::Display) -> anyhow::Error {
    Exit {
        code,
        message: message.to_string(),
    }
    .into()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = e.downcast_ref::<Exit>().map_or(EXIT_INPUT, |x| x.code);
            eprintln!("ctl: error: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "ctl", &mut std::io::stdout());
        return Ok(0);
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
    ssm: aws_sdk_ssm::Client,
    autoscaling: aws_sdk_autoscaling::Client,
    ec2: aws_sdk_ec2::Client,
}

async fn connect(g: &Global) -> anyhow::Result<Clients> {
    let sdk = skiff_ctl::aws::sdk_config(g.region.as_deref(), g.profile.as_deref()).await;
    let locator = Locator {
        stack: g.stack.clone(),
        parameter: g.parameter.clone(),
        asg: g.asg.clone(),
        image: g.image.clone(),
    };
    let deployment = deployment::locate(&aws_sdk_cloudformation::Client::new(&sdk), &locator)
        .await
        .map_err(|e| exit(EXIT_INPUT, e))?;
    Ok(Clients {
        deployment,
        ssm: aws_sdk_ssm::Client::new(&sdk),
        autoscaling: aws_sdk_autoscaling::Client::new(&sdk),
        ec2: aws_sdk_ec2::Client::new(&sdk),
    })
}

async fn run_async(cli: Cli) -> anyhow::Result<u8> {
    let g = &cli.global;
    match cli.command {
        Command::Completions { .. } => Ok(0),
        Command::Release { tag, mut opts } => {
            opts.registry_password = std::env::var("SKIFF_REGISTRY_PASSWORD").ok();
            let c = connect(g).await?;
            let verify = !opts.skip_verify;
            release(g, &c, Target::Tag { tag, verify }, &opts).await
        }
        Command::Rollback { to, opts } => {
            let c = connect(g).await?;
            let store = SsmStore::new(c.ssm.clone(), &c.deployment.parameter);
            let target = rollback_target(&store, to.as_ref()).await?;
            release(g, &c, Target::Pinned(target), &opts).await
        }
        Command::Status => status_cmd(g, &connect(g).await?).await,
        Command::History { limit } => {
            let c = connect(g).await?;
            let store = SsmStore::new(c.ssm.clone(), &c.deployment.parameter);
            let history = store
                .history(limit)
                .await
                .map_err(|e| exit(EXIT_INPUT, e))?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&history)?);
            } else {
                println!(
                    "{:>7}  {:<20}  {:<25}  {:<12}  DIGEST",
                    "VERSION", "TAG", "RELEASED AT", "BY"
                );
                for h in &history {
                    let (tag, digest, at, by) = match &h.release {
                        Some(r) => (
                            r.tag.to_string(),
                            r.digest.as_ref().map_or("-".into(), ToString::to_string),
                            r.meta_str("released_at")
                                .map(str::to_owned)
                                .or(h.modified_at.clone()),
                            r.meta_str("released_by")
                                .map(str::to_owned)
                                .or(h.modified_by.clone()),
                        ),
                        None => (
                            skiff_release::quote(&h.value),
                            "(not a release)".into(),
                            h.modified_at.clone(),
                            h.modified_by.clone(),
                        ),
                    };
                    println!(
                        "{:>7}  {:<20}  {:<25}  {:<12}  {digest}",
                        h.version,
                        tag,
                        at.unwrap_or_else(|| "-".into()),
                        by.unwrap_or_else(|| "-".into())
                    );
                }
            }
            Ok(0)
        }
    }
}

/// The release to return to: the newest earlier release with the named tag, or with a tag
/// different from the current one.
async fn rollback_target(store: &SsmStore, to: Option<&Tag>) -> anyhow::Result<Release> {
    let history = store
        .history(usize::MAX)
        .await
        .map_err(|e| exit(EXIT_INPUT, e))?;
    let mut releases = history.iter().filter_map(|h| h.release.as_ref());
    let current = history.first().and_then(|h| h.release.as_ref());
    let found = match (to, current) {
        (Some(tag), _) => releases.find(|r| &r.tag == tag).cloned(),
        (None, Some(cur)) => releases.find(|r| r.tag != cur.tag).cloned(),
        (None, None) => None,
    };
    found.ok_or_else(|| {
        exit(
            EXIT_INPUT,
            match to {
                Some(t) => format!("tag {t} is not in the release history (`ctl history`); release it with `ctl release --tag {t}`"),
                None => "no earlier release in the parameter history to roll back to; name one with `ctl release --tag`".into(),
            },
        )
    })
}

fn released_by(opts: &ReleaseOpts) -> String {
    opts.released_by
        .clone()
        .or_else(|| std::env::var("BUILD_USER").ok())
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into())
}

async fn release(
    g: &Global,
    c: &Clients,
    target: Target,
    opts: &ReleaseOpts,
) -> anyhow::Result<u8> {
    let store = SsmStore::new(c.ssm.clone(), &c.deployment.parameter);
    let refresher = AsgRefresher::new(c.autoscaling.clone(), &c.deployment.asg);
    let creds = opts.registry_user.clone().map(|user| Credentials {
        user,
        password: opts.registry_password.clone().unwrap_or_default(),
    });
    let resolver = HttpRegistry::new(creds).context("cannot set up the HTTP client")?;
    let fleet = Fleet {
        parameter: &c.deployment.parameter,
        image: &c.deployment.image,
        store: &store,
        refresher: &refresher,
        resolver: &resolver,
    };
    let req = Request {
        target,
        released_by: released_by(opts),
        dry_run: opts.dry_run,
        wait: !opts.no_wait,
        rollback: !opts.no_rollback,
        timeout: opts.timeout,
        poll: opts.poll,
        plan: RefreshPlan {
            min_healthy: opts.min_healthy,
            max_healthy: opts.max_healthy,
            warmup: opts.warmup,
            checkpoints: opts.checkpoints.clone(),
            checkpoint_delay: opts.checkpoint_delay,
            alarms: opts.alarms.clone(),
        },
    };
    let mut printer = Printer::new(g.json);
    let result = ship::ship(&fleet, &req, &mut |e| printer.event(&e)).await;
    printer.finish_bar();
    let outcome = result.map_err(|e| {
        let code = e.exit_code();
        exit(code, e)
    })?;
    if g.json {
        println!("{}", serde_json::to_string(&outcome)?);
    } else {
        match &outcome {
            Outcome::DryRun => println!("dry run: nothing changed"),
            Outcome::Started { refresh_id } => {
                println!("instance refresh {refresh_id} started; follow it with `ctl status`")
            }
            Outcome::Released {
                refresh_id,
                release,
            } => println!("released {release} (instance refresh {refresh_id} successful)"),
            Outcome::RolledBack { reason, to } => eprintln!(
                "ctl: release failed: {reason}\nctl: rolled back: the fleet is on {to} again"
            ),
            Outcome::NotRolledBack { reason, advice } => {
                eprintln!("ctl: release failed: {reason}\nctl: NOT rolled back: {advice}")
            }
        }
    }
    Ok(outcome.exit_code())
}

/// Prints events: JSON lines, a progress bar on a terminal, or plain lines.
struct Printer {
    json: bool,
    tty: bool,
    last: Option<String>,
    bar_open: bool,
}

impl Printer {
    fn new(json: bool) -> Self {
        Printer {
            json,
            tty: std::io::stderr().is_terminal(),
            last: None,
            bar_open: false,
        }
    }

    fn event(&mut self, e: &Event) {
        if self.json {
            if let Ok(line) = serde_json::to_string(e) {
                println!("{line}");
            }
            return;
        }
        if let Event::Progress { purpose, refresh } = e {
            let pct = refresh.percent.unwrap_or(0).clamp(0, 100);
            let what = match purpose {
                Purpose::Release => "release",
                Purpose::Rollback => "rollback",
            };
            let line = format!("{what} refresh {}: {:?} {pct}%", refresh.id, refresh.state);
            if self.tty {
                let filled = usize::try_from(pct / 5).unwrap_or(0);
                eprint!(
                    "\r[{}{}] {line}   ",
                    "#".repeat(filled),
                    ".".repeat(20 - filled)
                );
                let _ = std::io::stderr().flush();
                self.bar_open = true;
            } else if self.last.as_deref() != Some(line.as_str()) {
                eprintln!("{line}");
                self.last = Some(line);
            }
            return;
        }
        self.finish_bar();
        match e {
            Event::Resolved { image, digest } => eprintln!("resolved {image} -> {digest}"),
            Event::Plan {
                parameter,
                old,
                new,
            } => eprintln!(
                "{parameter}:\n  old: {}\n  new: {new}",
                old.as_deref().unwrap_or("(none)")
            ),
            Event::Written {
                parameter, version, ..
            } => eprintln!("wrote {parameter} (version {version}), read back ok"),
            Event::RefreshStarted { purpose, id } => {
                eprintln!("started instance refresh {id} ({purpose:?})")
            }
            Event::Cancelling { id } => eprintln!("cancelling instance refresh {id}"),
            Event::LockUnknown { detail } => {
                eprintln!("warning: cannot tell whether a refresh is running: {detail}")
            }
            Event::RollingBack { reason, to } => {
                eprintln!("failed: {reason}\nrolling back to {to}")
            }
            Event::Progress { .. } => {}
        }
    }

    fn finish_bar(&mut self) {
        if self.bar_open {
            eprintln!();
            self.bar_open = false;
        }
    }
}

async fn status_cmd(g: &Global, c: &Clients) -> anyhow::Result<u8> {
    let store = SsmStore::new(c.ssm.clone(), &c.deployment.parameter);
    let refresher = AsgRefresher::new(c.autoscaling.clone(), &c.deployment.asg);
    let current = store.read().await.map_err(|e| exit(EXIT_INPUT, e))?;
    let (refresh, refresh_error) = match refresher.latest().await {
        Ok(r) => (r, None),
        Err(e) => (None, Some(e.to_string())),
    };
    let instances = status::instances(&c.autoscaling, &c.ec2, &c.deployment.asg)
        .await
        .map_err(|e| exit(EXIT_UNKNOWN, e))?;
    let desired = current.as_ref().and_then(|s| s.release.as_ref());
    let drift = status::drift(desired.map(|r| &r.tag), &instances);
    if g.json {
        let doc = serde_json::json!({
            "deployment": c.deployment,
            "release": current.as_ref().map(|s| &s.value),
            "desired_tag": desired.map(|r| r.tag.to_string()),
            "parameter_version": current.as_ref().map(|s| s.version),
            "refresh": refresh,
            "refresh_error": refresh_error,
            "instances": instances,
            "drift": drift,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(0);
    }
    println!("parameter  {}", c.deployment.parameter);
    println!("group      {}", c.deployment.asg);
    println!("image      {}", c.deployment.image);
    match &current {
        Some(s) => println!("release    {} (version {})", s.value, s.version),
        None => println!("release    (parameter not written yet)"),
    }
    match (&refresh, &refresh_error) {
        (Some(r), _) => println!(
            "refresh    {} {:?} {}%{}",
            r.id,
            r.state,
            r.percent.unwrap_or(0),
            r.reason
                .as_deref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default()
        ),
        (None, Some(e)) => println!("refresh    unknown: {e}"),
        (None, None) => println!("refresh    none"),
    }
    println!(
        "\n{:<20}  {:<12}  {:<12}  {:<10}  RELEASE",
        "INSTANCE", "ZONE", "LIFECYCLE", "HEALTH"
    );
    for i in &instances {
        let dash = || "-".to_string();
        println!(
            "{:<20}  {:<12}  {:<12}  {:<10}  {}{}",
            i.id,
            i.zone.clone().unwrap_or_else(dash),
            i.lifecycle.clone().unwrap_or_else(dash),
            i.health.clone().unwrap_or_else(dash),
            i.release.clone().unwrap_or_else(|| "(not reported)".into()),
            if drift.contains(&i.id) {
                "  <- drift"
            } else {
                ""
            }
        );
    }
    if !drift.is_empty() {
        println!(
            "\n{} of {} instances do not run the desired release yet",
            drift.len(),
            instances.len()
        );
    }
    Ok(0)
}
