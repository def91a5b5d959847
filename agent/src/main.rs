//! `agent`: the skiff host agent.
//!
//! Reads the release (an image tag, optionally pinned to a digest) from an SSM parameter or, in
//! local development, a file; runs that image from the configured repository as this host's one
//! container with host networking; serves `/healthz` (for the load balancer), `/status` and the
//! Prometheus `/metrics` on `health.listen`; keeps the app running (restarts with backoff, in-place updates with drain and
//! rollback) and fails static when AWS, the registry or Docker are away. On an Auto Scaling
//! group the parameter applies at boot, and running hosts swap when `ctl release --strategy
//! in-place` targets them through their instance tags (read from the instance metadata).
//!
//! With `[trust]` (keys from an SSM parameter or a PEM file), a container is created only from
//! a digest a trusted key signed; a refused release is reported and the host keeps what it runs.
//!
//! Configuration: one TOML file, `--config` (default `/etc/skiff/agent.toml`); see README.md.
//! Logs: JSON lines when stderr is not a terminal, text when it is; `RUST_LOG` filters.
//!
//! Exit codes: 0 stopped by SIGTERM/SIGINT (the app keeps running); 64 invalid configuration
//! (every problem is printed, and for swap = "handover" what the host cannot do: no nftables
//! NAT, no CAP_NET_ADMIN, a slot port taken); 69 a required service could not be set up (health port taken,
//! Docker socket unusable); 1 any other error.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use skiff_agent::config::{self, Config, ConfigError, SourceConfig, TrustConfig};
use skiff_agent::credentials::PullTokens;
use skiff_agent::docker::DockerRuntime;
use skiff_agent::ecr::EcrIssuer;
use skiff_agent::fleet::NoFleet;
use skiff_agent::metrics::Metrics;
use skiff_agent::redirect::{NftRedirect, PortRedirect};
use skiff_agent::source::FileSource;
use skiff_agent::ssm::{SsmKeys, SsmSource};
use skiff_agent::supervise::Supervisor;
use skiff_agent::trust::registry::RegistrySignatures;
use skiff_agent::trust::{FileKeys, KeySource, Trust};
use skiff_agent::{cloudlog, health, probe};
use tokio_util::sync::CancellationToken;

const EX_CONFIG: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;

#[derive(Parser, Debug)]
#[command(
    name = "agent",
    version,
    about = "skiff agent: run the released image as this host's one container, health-gated",
    after_help = "Examples:\n  agent run --config /etc/skiff/agent.toml\n  agent check-config --config ./agent.toml\n  RUST_LOG=debug agent run --config dev/agent.toml\n\nExit codes: 0 stopped by a signal (the app keeps running), 64 invalid config, 69 a service could not be set up, 1 other errors."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent until SIGTERM/SIGINT.
    Run {
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Validate the config and print every problem at once (exit 0 or 64).
    CheckConfig {
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Remove the agent's kernel redirect of the app's port (swap = "handover"); the app's
    /// containers are left alone. For `make dev-down`, or a host moved back to swap = "drain".
    RemoveRedirect {
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Unavailable(String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckConfig { config } => check_config(&config),
        Command::Run { config } => run(&config),
        Command::RemoveRedirect { config } => remove_redirect(&config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(ConfigError::Invalid { .. } | ConfigError::Read { .. }) =
                e.downcast_ref::<ConfigError>()
            {
                eprintln!("agent: {e}");
                return ExitCode::from(EX_CONFIG);
            }
            eprintln!("agent: error: {e:#}");
            if e.downcast_ref::<Unavailable>().is_some() {
                ExitCode::from(EX_UNAVAILABLE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn check_config(path: &std::path::Path) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    // What the config asks of this host: a handover needs the kernel's nftables NAT, the
    // capability to change it, and slot ports nobody else holds.
    let mut problems = Vec::new();
    if let Err(e) = handover_redirect(&cfg) {
        problems.push(e.0);
    }
    if let Some(h) = cfg.app.swap.handover() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let held = rt.block_on(slots_of_managed_containers(&cfg));
        for slot in rt.block_on(slots_taken(h.slots, &held)) {
            problems.push(format!(
                "app.slots: port {slot} is taken by another process on this host: free it or pick other slots"
            ));
        }
    }
    if !problems.is_empty() {
        return Err(ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        }
        .into());
    }
    println!("{}: ok", path.display());
    Ok(())
}

fn remove_redirect(path: &std::path::Path) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    let redirect = NftRedirect::new(&cfg.app.name, cfg.app.port);
    redirect.remove().map_err(|e| Unavailable(e.to_string()))?;
    println!(
        "removed the redirect of port {} (nftables table ip {})",
        cfg.app.port,
        redirect.table_name()
    );
    Ok(())
}

/// The kernel redirect of a handover host, checked: the agent can read (and so, with the same
/// capability, write) its table. `None` in drain mode.
fn handover_redirect(cfg: &Config) -> Result<Option<Arc<dyn PortRedirect>>, Unavailable> {
    if cfg.app.swap.handover().is_none() {
        return Ok(None);
    }
    let redirect = NftRedirect::new(&cfg.app.name, cfg.app.port);
    redirect
        .pointing()
        .map_err(|e| Unavailable(format!("app.swap = \"handover\": {e}")))?;
    Ok(Some(Arc::new(redirect)))
}

/// Slots the app's own containers listen on (running ones), as the engine reports them; empty
/// when the engine does not answer.
async fn slots_of_managed_containers(cfg: &Config) -> Vec<u16> {
    use skiff_agent::runtime::ContainerRuntime;
    let Ok(runtime) = DockerRuntime::connect() else {
        return Vec::new();
    };
    runtime
        .list(&cfg.app.name)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.running)
        .filter_map(|c| c.slot)
        .collect()
}

/// Slots not `held` by the app's containers on which something accepts connections.
async fn slots_taken(slots: [u16; 2], held: &[u16]) -> Vec<u16> {
    let mut taken = Vec::new();
    for slot in slots.into_iter().filter(|s| !held.contains(s)) {
        if probe::accepts(slot).await {
            taken.push(slot);
        }
    }
    taken
}

/// Logs go to stderr (journald under systemd) and, with a queue, also to CloudWatch Logs
/// through `cloudlog`.
fn init_logging(queue: Option<skiff_agent::cloudlog::SharedQueue>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // `target=level` directives (`info`, `skiff_agent=debug,aws=warn`): a Targets filter, not
    // an EnvFilter, whose regex engine would cost idle memory on every host.
    let filter: tracing_subscriber::filter::Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
        });
    let builder =
        tracing_subscriber::fmt().with_writer(skiff_agent::cloudlog::Tee::new(queue.clone()));
    if std::io::stderr().is_terminal() {
        builder.finish().with(filter).init();
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .finish()
            .with(filter)
            .init();
    }
}

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    // All configuration is read and checked before anything is bound or started.
    let cfg = Arc::new(Config::load(path)?);
    // With [logs], the agent's own lines are queued from the first one on, for `cloudlog`.
    let queue = cfg
        .app
        .logs
        .cloudwatch
        .as_ref()
        .map(|_| cloudlog::shared_queue());
    init_logging(queue.clone());
    // One thread is plenty for one container and a health endpoint, and keeps memory small.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(cfg, queue))
}

async fn serve(cfg: Arc<Config>, queue: Option<cloudlog::SharedQueue>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.health.listen)
        .await
        .map_err(|e| {
            Unavailable(format!(
                "cannot listen on health.listen {}: {e}",
                cfg.health.listen
            ))
        })?;
    let redirect = handover_redirect(&cfg)?;
    let connected = DockerRuntime::connect().map_err(|e| Unavailable(e.to_string()))?;
    let runtime = match connected.clone().negotiate().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "could not negotiate the Docker API version now; using the client default");
            connected
        }
    };
    let cancel = CancellationToken::new();
    spawn_signal_handler(cancel.clone());
    // The agent's own lines to its stream in the app's group; sends on its own task and never
    // holds up the agent (see cloudlog.rs). Stopped after the loop, with one last send.
    // An ECR image without a [registry] section pulls with tokens from
    // ecr:GetAuthorizationToken, through the standard AWS chain, with either source.
    let ecr = match &cfg.registry {
        Some(_) => None,
        None => skiff_release::EcrRegistry::of_image(&cfg.app.image),
    };
    // One SDK configuration (one HTTP client and credentials cache) for every AWS use.
    let sdk = match (&cfg.release.source, &ecr, &cfg.app.logs.cloudwatch) {
        (SourceConfig::File { .. }, None, None) => None,
        _ => {
            // Without aws.region, the logs' region spares a lookup in the instance metadata.
            let region = cfg.aws.region.as_deref().or_else(|| {
                cfg.app
                    .logs
                    .cloudwatch
                    .as_ref()
                    .and_then(|s| s.region.as_deref())
            });
            Some(skiff_agent::aws::sdk_config(region).await)
        }
    };
    let send_cancel = CancellationToken::new();
    let sender = match (&cfg.app.logs.cloudwatch, queue, &sdk) {
        (Some(aws), Some(queue), Some(sdk)) => {
            let client = cloudlog::Sender::client(sdk, aws);
            let sender = cloudlog::Sender::new(client, aws, queue);
            Some(tokio::spawn(sender.run(send_cancel.clone())))
        }
        _ => None,
    };
    let result = serve_app(cfg, runtime, listener, redirect, ecr, sdk, cancel).await;
    send_cancel.cancel();
    if let Some(s) = sender {
        let _ = s.await;
    }
    result
}

async fn serve_app(
    cfg: Arc<Config>,
    runtime: DockerRuntime,
    listener: tokio::net::TcpListener,
    redirect: Option<Arc<dyn PortRedirect>>,
    ecr: Option<skiff_release::EcrRegistry>,
    sdk: Option<aws_config::SdkConfig>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    // One set of metrics, counted by the loop, the prober and the fleet, served on /metrics.
    let metrics = Arc::new(Metrics::new());
    let pull_tokens = ecr.zip(sdk.as_ref()).map(|(registry, sdk)| {
        tracing::info!(registry = %registry.host, region = %registry.region, "ECR image: pull tokens from ecr:GetAuthorizationToken");
        PullTokens::new(EcrIssuer::new(sdk, registry))
    });
    match &cfg.release.source {
        SourceConfig::File { path } => {
            tracing::info!(source = %path.display(), "local mode: file source, no AWS except ECR pull tokens");
            let source = FileSource::new(path.clone());
            // keys_parameter with the file source is refused by the config's checks.
            let trust = match &cfg.trust {
                Some(TrustConfig::File(keys)) => Some(trust(&cfg, FileKeys(keys.clone()))),
                _ => None,
            };
            supervise(
                cfg.clone(),
                runtime,
                source,
                NoFleet,
                pull_tokens,
                trust,
                redirect,
                metrics,
                listener,
                cancel,
            )
            .await
        }
        SourceConfig::Ssm { parameter } => {
            let sdk = match sdk {
                Some(sdk) => sdk,
                None => skiff_agent::aws::sdk_config(cfg.aws.region.as_deref()).await,
            };
            let ssm = aws_sdk_ssm::Client::new(&sdk);
            let trust = match &cfg.trust {
                Some(TrustConfig::File(keys)) => Some(trust(&cfg, FileKeys(keys.clone()))),
                Some(TrustConfig::Parameter(name)) => {
                    Some(trust(&cfg, SsmKeys::new(ssm.clone(), name.clone())))
                }
                None => None,
            };
            let source = SsmSource::new(ssm, parameter.clone());
            let fleet = skiff_agent::autoscaling::AwsFleet::discover(
                &skiff_agent::autoscaling::imds_client(),
                &sdk,
                cfg.aws.lifecycle_hook.clone(),
                cfg.aws.terminate_hook.clone(),
            )
            .await
            .with_metrics(metrics.clone());
            supervise(
                cfg.clone(),
                runtime,
                source,
                fleet,
                pull_tokens,
                trust,
                redirect,
                metrics,
                listener,
                cancel,
            )
            .await
        }
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "the wiring of one agent: each part is built once in serve()"
)]
async fn supervise<S, F>(
    cfg: Arc<Config>,
    runtime: DockerRuntime,
    source: S,
    fleet: F,
    pull_tokens: Option<PullTokens>,
    trust: Option<Arc<Trust>>,
    redirect: Option<Arc<dyn PortRedirect>>,
    metrics: Arc<Metrics>,
    listener: tokio::net::TcpListener,
    cancel: CancellationToken,
) -> anyhow::Result<()>
where
    S: skiff_agent::source::ReleaseSource,
    F: skiff_agent::fleet::Fleet,
{
    let journal = skiff_agent::journal::Journal::new(
        &skiff_agent::journal::Journal::default_dir(),
        &cfg.app.name,
    );
    let mut supervisor = Supervisor::new(cfg.clone(), runtime, source, fleet)
        .with_journal(journal)
        .with_metrics(metrics.clone());
    if let Some(tokens) = pull_tokens {
        supervisor = supervisor.with_pull_tokens(tokens);
    }
    if let Some(r) = redirect {
        supervisor = supervisor.with_redirect(r);
    }
    match trust {
        Some(t) => {
            tracing::info!(keys = %t.describe(), "signature checks on: a container is created only from a digest a trusted key signed");
            supervisor = supervisor.with_trust(t);
        }
        None => tracing::info!("signature checks off (no [trust] in the config)"),
    }
    // Adopt before answering health checks, so a running app is healthy from the first answer.
    supervisor.adopt().await;
    if let Some(h) = cfg.app.swap.handover() {
        let held = slots_of_managed_containers(&cfg).await;
        let taken = slots_taken(h.slots, &held).await;
        if !taken.is_empty() {
            return Err(Unavailable(format!(
                "app.slots: port(s) {taken:?} taken by another process on this host, so no new release could start there: free them or pick other slots (app.slots)"
            ))
            .into());
        }
    }
    let state = supervisor.state();
    tracing::info!(listen = %cfg.health.listen, app = %cfg.app.name, image = %cfg.app.image, "agent started");
    let server = tokio::spawn(health::serve(
        listener,
        state.subscribe(),
        metrics.clone(),
        cancel.clone(),
    ));
    let prober = tokio::spawn(probe::run_prober(
        state,
        std::net::SocketAddr::from(([127, 0, 0, 1], cfg.app.port)),
        cfg.app.health_path.clone(),
        cfg.app.detail_path.clone(),
        cfg.health.interval,
        metrics,
        cancel.clone(),
    ));
    supervisor.run(cancel.clone()).await;
    cancel.cancel();
    let _ = prober.await;
    server
        .await
        .context("health server task")?
        .context("health server")?;
    Ok(())
}

/// Signature checks with keys from `keys`, against the app's registry; verified digests are
/// recorded in the agent's state directory, beside the swap journal.
fn trust(cfg: &Config, keys: impl KeySource) -> Arc<Trust> {
    let record = Trust::record_path(&skiff_agent::journal::Journal::default_dir(), &cfg.app.name);
    Arc::new(Trust::new(
        keys,
        RegistrySignatures::default(),
        Some(record),
    ))
}

fn spawn_signal_handler(cancel: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        }
        cancel.cancel();
    });
}
