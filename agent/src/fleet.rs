//! `AwsFleet`: what the fleet is told about this host. Learns its instance id and region from
//! IMDSv2; once the release is healthy tags the instance `skiff:release=<tag>` (so `ctl status`
//! sees per-instance releases without reaching the hosts) and completes the launch lifecycle
//! hook with CONTINUE; when the release cannot start, completes it with ABANDON. Off EC2 (no
//! IMDS) it logs once and does nothing, like [`NoFleet`](crate::supervise::NoFleet).
//! SDK types and errors stay in this module.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aws_config::SdkConfig;
use aws_config::imds;
use aws_sdk_autoscaling::error::ProvideErrorMetadata;
use skiff_release::{Release, Tag};
use tokio::time::{sleep, timeout};

use crate::supervise::Fleet;

/// The instance tag `ctl status` reads.
pub const RELEASE_TAG_KEY: &str = "skiff:release";
/// Attempts per fleet action; transient AWS failures are retried with backoff.
const ATTEMPTS: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Upper bound for one fleet action, retries included: the supervision loop waits on it.
const ACTION_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("instance metadata (IMDSv2) is not reachable: {0}")]
    Metadata(String),
    #[error("cannot tag instance {instance} ({detail})")]
    Tag { instance: String, detail: String },
    #[error("cannot find the Auto Scaling Group of instance {instance} ({detail})")]
    Group { instance: String, detail: String },
    #[error("cannot complete lifecycle hook {hook} with {result} ({detail})")]
    Complete {
        hook: String,
        result: &'static str,
        detail: String,
    },
    #[error("gave up after {0:?}")]
    TimedOut(Duration),
}

#[derive(Debug)]
struct OnEc2 {
    instance_id: String,
    hook: Option<String>,
    terminate_hook: Option<String>,
    /// For the target lifecycle state; `None` in tests that give the identity directly.
    imds: Option<imds::Client>,
    ec2: aws_sdk_ec2::Client,
    autoscaling: aws_sdk_autoscaling::Client,
    group: Mutex<Option<String>>,
    tagged: Mutex<Option<Tag>>,
    hook_done: AtomicBool,
    terminate_done: AtomicBool,
}

/// [`Fleet`] over EC2 and Auto Scaling.
#[derive(Debug)]
pub struct AwsFleet {
    on_ec2: Option<OnEc2>,
}

/// Metadata reads are quick or not at all: off EC2 the agent must not stall its start.
pub fn imds_client() -> imds::Client {
    imds::Client::builder()
        .max_attempts(2)
        .connect_timeout(Duration::from_secs(1))
        .read_timeout(Duration::from_secs(1))
        .build()
}

impl AwsFleet {
    /// A fleet that does nothing (not on EC2).
    pub fn disabled() -> Self {
        AwsFleet { on_ec2: None }
    }

    /// Ask IMDSv2 who this host is; on failure log once and return a disabled fleet.
    /// `sdk` supplies credentials and endpoints; the region from IMDS applies when it has none.
    pub async fn discover(
        imds: &imds::Client,
        sdk: &SdkConfig,
        hook: Option<String>,
        terminate_hook: Option<String>,
    ) -> Self {
        match Self::identify(imds).await {
            Ok((instance_id, region)) => {
                tracing::info!(instance = %instance_id, %region, "on EC2: fleet duties enabled");
                let region = sdk
                    .region()
                    .cloned()
                    .unwrap_or_else(|| aws_config::Region::new(region));
                let ec2 = aws_sdk_ec2::Client::from_conf(
                    aws_sdk_ec2::config::Builder::from(sdk)
                        .region(region.clone())
                        .build(),
                );
                let autoscaling = aws_sdk_autoscaling::Client::from_conf(
                    aws_sdk_autoscaling::config::Builder::from(sdk)
                        .region(region)
                        .build(),
                );
                Self::with_clients(instance_id, ec2, autoscaling, hook)
                    .with_termination(terminate_hook, imds.clone())
            }
            Err(e) => {
                tracing::warn!(error = %e, "not on EC2 (or metadata disabled): no instance tag, no lifecycle hook");
                Self::disabled()
            }
        }
    }

    /// A fleet for a known instance (tests, or callers that know the identity).
    pub fn with_clients(
        instance_id: String,
        ec2: aws_sdk_ec2::Client,
        autoscaling: aws_sdk_autoscaling::Client,
        hook: Option<String>,
    ) -> Self {
        AwsFleet {
            on_ec2: Some(OnEc2 {
                instance_id,
                hook,
                terminate_hook: None,
                imds: None,
                ec2,
                autoscaling,
                group: Mutex::new(None),
                tagged: Mutex::new(None),
                hook_done: AtomicBool::new(false),
                terminate_done: AtomicBool::new(false),
            }),
        }
    }

    /// Also complete `hook` (a terminate lifecycle hook) once drained for termination, and
    /// read the target lifecycle state from `imds`.
    pub fn with_termination(mut self, hook: Option<String>, imds: imds::Client) -> Self {
        if let Some(on) = self.on_ec2.as_mut() {
            on.terminate_hook = hook;
            on.imds = Some(imds);
        }
        self
    }

    pub fn instance_id(&self) -> Option<&str> {
        self.on_ec2.as_ref().map(|o| o.instance_id.as_str())
    }

    async fn identify(imds: &imds::Client) -> Result<(String, String), FleetError> {
        let get = |path: &'static str| async move {
            imds.get(path)
                .await
                .map(|v| v.as_ref().trim().to_owned())
                .map_err(|e| FleetError::Metadata(format!("{path}: {e}")))
        };
        let id = get("/latest/meta-data/instance-id").await?;
        let region = get("/latest/meta-data/placement/region").await?;
        Ok((id, region))
    }
}

/// Run `op` up to [`ATTEMPTS`] times with doubling backoff, all within [`ACTION_LIMIT`].
async fn bounded<T, F, Fut>(mut op: F) -> Result<T, FleetError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, (FleetError, bool)>>,
{
    let attempts = async {
        let mut backoff = FIRST_BACKOFF;
        let mut n = 1;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err((e, retryable)) if retryable && n < ATTEMPTS => {
                    tracing::debug!(error = %e, attempt = n, "retrying");
                    sleep(backoff).await;
                    backoff *= 2;
                    n += 1;
                }
                Err((e, _)) => return Err(e),
            }
        }
    };
    timeout(ACTION_LIMIT, attempts)
        .await
        .unwrap_or(Err(FleetError::TimedOut(ACTION_LIMIT)))
}

/// Access and validation errors do not get better by retrying.
fn retryable(code: Option<&str>) -> bool {
    !matches!(
        code,
        Some(
            "AccessDenied"
                | "AccessDeniedException"
                | "UnauthorizedOperation"
                | "ValidationError"
                | "InvalidInstanceID.NotFound"
                | "InvalidInstanceID.Malformed"
        )
    )
}

fn detail<E: ProvideErrorMetadata + std::error::Error>(e: &E) -> String {
    match (e.code(), e.message()) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.to_owned(),
        _ => aws_smithy_types::error::display::DisplayErrorContext(e).to_string(),
    }
}

impl OnEc2 {
    async fn tag(&self, tag: &Tag) -> Result<(), FleetError> {
        if self
            .tagged
            .lock()
            .map(|t| t.as_ref() == Some(tag))
            .unwrap_or(false)
        {
            return Ok(());
        }
        bounded(|| async {
            self.ec2
                .create_tags()
                .resources(&self.instance_id)
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key(RELEASE_TAG_KEY)
                        .value(tag.as_str())
                        .build(),
                )
                .send()
                .await
                .map(|_| ())
                .map_err(|e| {
                    let r = retryable(e.code());
                    (
                        FleetError::Tag {
                            instance: self.instance_id.clone(),
                            detail: detail(&e),
                        },
                        r,
                    )
                })
        })
        .await?;
        if let Ok(mut t) = self.tagged.lock() {
            *t = Some(tag.clone());
        }
        Ok(())
    }

    async fn group(&self) -> Result<String, FleetError> {
        if let Some(g) = self.group.lock().ok().and_then(|g| g.clone()) {
            return Ok(g);
        }
        let name = bounded(|| async {
            let fail = |detail: String, r: bool| {
                (
                    FleetError::Group {
                        instance: self.instance_id.clone(),
                        detail,
                    },
                    r,
                )
            };
            let out = self
                .autoscaling
                .describe_auto_scaling_instances()
                .instance_ids(&self.instance_id)
                .send()
                .await
                .map_err(|e| fail(detail(&e), retryable(e.code())))?;
            out.auto_scaling_instances()
                .iter()
                .find_map(|i| i.auto_scaling_group_name().map(str::to_owned))
                .ok_or_else(|| fail("the instance is in no Auto Scaling Group".into(), false))
        })
        .await?;
        if let Ok(mut g) = self.group.lock() {
            *g = Some(name.clone());
        }
        Ok(name)
    }

    /// Complete `hook` once per boot (`done` remembers).
    async fn complete(
        &self,
        hook: Option<&String>,
        done: &AtomicBool,
        result: &'static str,
    ) -> Result<(), FleetError> {
        let Some(hook) = hook else {
            return Ok(());
        };
        if done.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let group = self.group().await?;
        let outcome = bounded(|| async {
            self.autoscaling
                .complete_lifecycle_action()
                .auto_scaling_group_name(&group)
                .lifecycle_hook_name(hook)
                .instance_id(&self.instance_id)
                .lifecycle_action_result(result)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| {
                    let r = retryable(e.code());
                    (
                        FleetError::Complete {
                            hook: hook.clone(),
                            result,
                            detail: detail(&e),
                        },
                        r,
                    )
                })
        })
        .await;
        match &outcome {
            Ok(()) => tracing::info!(%hook, %group, result, "lifecycle action completed"),
            // A launch long past (agent restart) has no pending action: nothing to do.
            Err(FleetError::Complete { detail, .. })
                if detail.contains("No active Lifecycle Action") =>
            {
                tracing::info!(%hook, "no pending lifecycle action for this instance");
                return Ok(());
            }
            Err(_) => {}
        }
        outcome
    }
}

impl Fleet for AwsFleet {
    async fn release_healthy(&self, release: &Release) {
        let Some(on) = &self.on_ec2 else { return };
        if let Err(e) = on.tag(&release.tag).await {
            tracing::warn!(error = %e, tag = %release.tag, "could not tag the instance; ctl status will not show its release");
        }
        if let Err(e) = on
            .complete(on.hook.as_ref(), &on.hook_done, "CONTINUE")
            .await
        {
            tracing::error!(error = %e, "could not complete the launch lifecycle hook; Auto Scaling decides at the hook timeout");
        }
    }

    async fn release_failed(&self, release: &Release) {
        let Some(on) = &self.on_ec2 else { return };
        tracing::warn!(tag = %release.tag, "release cannot start here: abandoning the launch");
        if let Err(e) = on
            .complete(on.hook.as_ref(), &on.hook_done, "ABANDON")
            .await
        {
            tracing::error!(error = %e, "could not complete the launch lifecycle hook with ABANDON");
        }
    }

    /// Auto Scaling sets the target lifecycle state to `Terminated` when it terminates the
    /// instance (a terminate hook then holds it in Terminating:Wait until the agent is drained).
    async fn termination_pending(&self) -> bool {
        let Some(imds) = self.on_ec2.as_ref().and_then(|o| o.imds.as_ref()) else {
            return false;
        };
        match imds
            .get("/latest/meta-data/autoscaling/target-lifecycle-state")
            .await
        {
            Ok(state) => state.as_ref().trim() == "Terminated",
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the target lifecycle state");
                false
            }
        }
    }

    async fn drained(&self) {
        let Some(on) = &self.on_ec2 else { return };
        if let Err(e) = on
            .complete(on.terminate_hook.as_ref(), &on.terminate_done, "CONTINUE")
            .await
        {
            tracing::error!(error = %e, "could not complete the terminate lifecycle hook; Auto Scaling goes on at the hook timeout");
        }
    }
}
