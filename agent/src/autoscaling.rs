//! `AwsFleet`: what the fleet is told about this host. Learns its instance id, region and Auto
//! Scaling Group from IMDSv2; once the release is healthy tags the instance
//! `skiff:release=<tag>` (so `ctl status` sees per-instance releases without reaching the hosts)
//! and completes the launch lifecycle hook with CONTINUE; when the release cannot start,
//! completes it with ABANDON. Off EC2 (no IMDS) it logs once and does nothing, like
//! [`NoFleet`](crate::fleet::NoFleet). SDK types and errors stay in this module.
//!
//! On EC2 the host's releases are coordinated ([`Fleet::coordinated`]): the rollout's
//! instructions are the instance tags `skiff:target` and `skiff:pull`, read from the instance
//! metadata every loop turn (local, no AWS API call), and the answers `skiff:pulled` and
//! `skiff:failed` are written with CreateTags like `skiff:release` (the tag keys and value form
//! are `skiff_release::instance_tags`).
//!
//! A hook completion that fails for a transient reason is retried with exponential backoff and
//! jitter: within one call for at most [`ACTION_LIMIT`] (the supervision loop waits on it), then
//! on later loop turns through [`Fleet::retry_pending`], until it succeeds, Auto Scaling says the
//! action is no longer active, or [`HOOK_RETRY_FOR`] has passed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::SdkConfig;
use aws_config::imds;
use aws_sdk_autoscaling::error::ProvideErrorMetadata;
use skiff_release::{INSTANCE_TAG_KEY, Release, Tag, instance_tags};
use tokio::time::{Instant, sleep, timeout};

pub use self::hook::{Attempt, HOOK_RETRY_FOR, NextStep, classify, next_step};
use self::hook::{Hook, Progress};
use crate::backoff::Backoff;
use crate::fleet::{Answers, Fleet, Instructions};
use crate::metrics::{FleetErrorKind, Metrics};

mod hook;

/// The instance's Auto Scaling Group, as an instance tag in the metadata. Needs
/// `InstanceMetadataTags: enabled` in the launch template's metadata options:
/// https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/work-with-tags-in-IMDS.html
pub const GROUP_TAG_PATH: &str = "/latest/meta-data/tags/instance/aws:autoscaling:groupName";
/// Where the instance's own tags are, one path per key (same page).
pub const TAGS_PATH: &str = "/latest/meta-data/tags/instance";
/// Attempts per instance tagging; transient AWS failures are retried with backoff.
const ATTEMPTS: u32 = 3;
/// Upper bound for one fleet action, retries included: the supervision loop waits on it.
pub const ACTION_LIMIT: Duration = Duration::from_secs(30);

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

impl FleetError {
    /// The `kind` label of `skiff_agent_fleet_errors_total`.
    pub fn metric_kind(&self) -> FleetErrorKind {
        match self {
            FleetError::Metadata(_) => FleetErrorKind::Metadata,
            FleetError::Tag { .. } => FleetErrorKind::Tag,
            FleetError::Group { .. } => FleetErrorKind::Group,
            FleetError::Complete { .. } => FleetErrorKind::LifecycleHook,
            FleetError::TimedOut(_) => FleetErrorKind::TimedOut,
        }
    }
}

#[derive(Debug)]
struct OnEc2 {
    instance_id: String,
    imds: imds::Client,
    ec2: aws_sdk_ec2::Client,
    autoscaling: aws_sdk_autoscaling::Client,
    group: Mutex<Option<String>>,
    /// The instance metadata says this instance is in no Auto Scaling group (no
    /// `aws:autoscaling:groupName` tag): releases are not coordinated here.
    outside_group: AtomicBool,
    tagged: Mutex<Option<Tag>>,
    /// The last instructions read; a failed read leaves them standing.
    seen: Mutex<Instructions>,
    /// Instruction values that are not releases, already warned about: (key, value).
    warned: Mutex<Vec<(&'static str, String)>>,
    /// Answers already delivered: (key, value).
    answered: Mutex<Vec<(&'static str, String)>>,
    launch: Hook,
    terminate: Hook,
    /// Failed calls are counted here (`skiff_agent_fleet_errors_total`).
    metrics: Arc<Metrics>,
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
                let fleet = Self::with_clients(instance_id, imds.clone(), ec2, autoscaling, hook)
                    .with_terminate_hook(terminate_hook);
                fleet.check_group().await;
                fleet
            }
            Err(e) => {
                tracing::warn!(error = %e, "not on EC2 (or metadata disabled): no instance tag, no lifecycle hook");
                Self::disabled()
            }
        }
    }

    /// A fleet for a known instance (tests, or callers that know the identity). `imds` answers
    /// the group name and the target lifecycle state.
    pub fn with_clients(
        instance_id: String,
        imds: imds::Client,
        ec2: aws_sdk_ec2::Client,
        autoscaling: aws_sdk_autoscaling::Client,
        hook: Option<String>,
    ) -> Self {
        AwsFleet {
            on_ec2: Some(OnEc2 {
                instance_id,
                imds,
                ec2,
                autoscaling,
                group: Mutex::new(None),
                outside_group: AtomicBool::new(false),
                tagged: Mutex::new(None),
                seen: Mutex::new(Instructions::default()),
                warned: Mutex::new(Vec::new()),
                answered: Mutex::new(Vec::new()),
                launch: Hook::new(hook),
                terminate: Hook::new(None),
                metrics: Arc::new(Metrics::new()),
            }),
        }
    }

    /// Count failed calls in `metrics` (the agent's, served on `/metrics`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        if let Some(on) = self.on_ec2.as_mut() {
            on.metrics = metrics;
        }
        self
    }

    /// Also complete `hook` (a terminate lifecycle hook) once drained for termination.
    pub fn with_terminate_hook(mut self, hook: Option<String>) -> Self {
        if let Some(on) = self.on_ec2.as_mut() {
            on.terminate = Hook::new(hook);
        }
        self
    }

    /// The group is already known (tests without a metadata service).
    pub fn with_group(self, group: &str) -> Self {
        if let Some(on) = &self.on_ec2
            && let Ok(mut g) = on.group.lock()
        {
            *g = Some(group.to_owned());
        }
        self
    }

    pub fn instance_id(&self) -> Option<&str> {
        self.on_ec2.as_ref().map(|o| o.instance_id.as_str())
    }

    /// The instance's Auto Scaling Group, from the instance tags in the metadata.
    pub async fn group(&self) -> Result<String, FleetError> {
        match &self.on_ec2 {
            Some(on) => on.group().await.map_err(|(e, _)| e),
            None => Err(FleetError::Metadata("not on EC2".into())),
        }
    }

    /// Read the group at start: with a hook to complete, say now (not at the first hook) when
    /// it is unknown; an instance in no group is not coordinated.
    async fn check_group(&self) {
        let Some(on) = &self.on_ec2 else { return };
        let hooks = on.launch.name.is_some() || on.terminate.name.is_some();
        match on.group().await {
            Ok(group) => tracing::info!(%group, "Auto Scaling Group from instance metadata"),
            Err((e, _)) if hooks => {
                tracing::warn!(error = %e, "lifecycle hooks cannot be completed until this is fixed")
            }
            Err((e, _)) => tracing::info!(error = %e, "no Auto Scaling Group"),
        }
        if on.outside_group.load(Ordering::Relaxed) {
            tracing::info!(
                "in no Auto Scaling group: releases are not coordinated by ctl here, the parameter applies as `update` says"
            );
        }
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
        let mut backoff = Backoff::new(Duration::from_secs(1), ACTION_LIMIT);
        let mut n = 1;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err((e, retryable)) if retryable && n < ATTEMPTS => {
                    tracing::debug!(error = %e, attempt = n, "retrying");
                    sleep(backoff.fail()).await;
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
    !(code.is_some_and(skiff_release::access::is_denied)
        || matches!(
            code,
            Some("ValidationError" | "InvalidInstanceID.NotFound" | "InvalidInstanceID.Malformed")
        ))
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
        self.put_tag(INSTANCE_TAG_KEY, tag.as_str()).await?;
        if let Ok(mut t) = self.tagged.lock() {
            *t = Some(tag.clone());
        }
        Ok(())
    }

    /// CreateTags `key=value` on this instance (it overwrites an existing value), bounded and
    /// retried like every fleet action.
    async fn put_tag(&self, key: &str, value: &str) -> Result<(), FleetError> {
        bounded(|| async {
            self.ec2
                .create_tags()
                .resources(&self.instance_id)
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key(key)
                        .value(value)
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
        .await
    }

    /// Answer `key=release` once (a value already delivered is not sent again); false when
    /// it could not be delivered.
    /// Answer `key` with `value` (an empty value withdraws an answer: the tag stays, empty,
    /// since the instance role may not delete tags; readers treat it as absent).
    async fn answer(&self, key: &'static str, value: String) -> bool {
        let done =
            |a: &Vec<(&'static str, String)>| a.iter().any(|(k, v)| *k == key && *v == value);
        if self.answered.lock().map(|a| done(&a)).unwrap_or(false) {
            return true;
        }
        match self.put_tag(key, &value).await {
            Ok(()) => {
                tracing::info!(key, value = %value, "answered on the instance tags");
                if let Ok(mut a) = self.answered.lock() {
                    a.retain(|(k, _)| *k != key);
                    a.push((key, value));
                }
                true
            }
            Err(e) => {
                self.metrics.fleet_error(e.metric_kind());
                tracing::warn!(error = %e, key, value = %value, "could not answer on the instance tags; will retry");
                false
            }
        }
    }

    /// The instance tag `key` from the metadata: `Ok(None)` when absent (404), `Err` when the
    /// metadata did not answer.
    async fn read_tag(&self, key: &str) -> Result<Option<String>, String> {
        let path = format!("{TAGS_PATH}/{key}");
        match self.imds.get(path.clone()).await {
            Ok(v) => {
                let v = v.as_ref().trim();
                Ok((!v.is_empty()).then(|| v.to_owned()))
            }
            // An absent tag answers 404:
            // https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/work-with-tags-in-IMDS.html
            Err(imds::client::error::ImdsError::ErrorResponse(r))
                if r.response().status().as_u16() == 404 =>
            {
                Ok(None)
            }
            Err(e) => Err(format!("{path}: {e}")),
        }
    }

    /// The release in tag `key`; `Err` when the metadata did not answer. A value that is not a
    /// release is ignored, with one warning per value.
    async fn read_release(&self, key: &'static str) -> Result<Option<Release>, String> {
        let Some(value) = self.read_tag(key).await? else {
            return Ok(None);
        };
        match instance_tags::decode(&value) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                let mut warned = self.warned.lock().map_err(|e| e.to_string())?;
                if !warned.iter().any(|(k, v)| *k == key && *v == value) {
                    tracing::warn!(key, value = %value, error = %e, "ignoring an instance tag that is not a release (expected `tag` or `tag@sha256:<hex>`, as `ctl release` writes it): fix or remove the tag");
                    warned.retain(|(k, _)| *k != key);
                    warned.push((key, value));
                }
                Ok(None)
            }
        }
    }

    /// The group name from the instance tags in IMDS (no Auto Scaling permission needed);
    /// the error says whether another try may help.
    async fn group(&self) -> Result<String, (FleetError, bool)> {
        if let Some(g) = self.group.lock().ok().and_then(|g| g.clone()) {
            return Ok(g);
        }
        let fail = |detail: String, transient: bool| {
            (
                FleetError::Group {
                    instance: self.instance_id.clone(),
                    detail,
                },
                transient,
            )
        };
        let name = match self.imds.get(GROUP_TAG_PATH).await {
            Ok(v) => v.as_ref().trim().to_owned(),
            // Tags absent from the metadata answer 404:
            // https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/work-with-tags-in-IMDS.html
            Err(imds::client::error::ImdsError::ErrorResponse(r))
                if r.response().status().as_u16() == 404 =>
            {
                self.outside_group.store(true, Ordering::Relaxed);
                return Err(fail(
                    "the instance metadata has no tag aws:autoscaling:groupName: enable instance \
                     tags in metadata (launch template MetadataOptions InstanceMetadataTags: \
                     enabled), or the instance is in no Auto Scaling Group"
                        .into(),
                    false,
                ));
            }
            Err(e) => return Err(fail(format!("{GROUP_TAG_PATH}: {e}"), true)),
        };
        if name.is_empty() {
            return Err(fail(
                "the aws:autoscaling:groupName tag is empty".into(),
                false,
            ));
        }
        if let Ok(mut g) = self.group.lock() {
            *g = Some(name.clone());
        }
        Ok(name)
    }
}

impl Fleet for AwsFleet {
    async fn release_healthy(&self, release: &Release) {
        let Some(on) = &self.on_ec2 else { return };
        if let Err(e) = on.tag(&release.tag).await {
            on.metrics.fleet_error(e.metric_kind());
            tracing::warn!(error = %e, tag = %release.tag, "could not tag the instance; ctl status will not show its release");
        }
        on.complete(&on.launch, "CONTINUE").await;
    }

    async fn release_failed(&self, release: &Release) {
        let Some(on) = &self.on_ec2 else { return };
        tracing::warn!(tag = %release.tag, "release cannot start here: abandoning the launch");
        on.complete(&on.launch, "ABANDON").await;
    }

    /// Auto Scaling sets the target lifecycle state to `Terminated` when it terminates the
    /// instance (a terminate hook then holds it in Terminating:Wait until the agent is drained).
    async fn termination_pending(&self) -> bool {
        let Some(on) = &self.on_ec2 else {
            return false;
        };
        match on
            .imds
            .get("/latest/meta-data/autoscaling/target-lifecycle-state")
            .await
        {
            Ok(state) => state.as_ref().trim() == "Terminated",
            Err(e) => {
                on.metrics.fleet_error(FleetErrorKind::Metadata);
                tracing::debug!(error = %e, "cannot read the target lifecycle state");
                false
            }
        }
    }

    async fn drained(&self) {
        let Some(on) = &self.on_ec2 else { return };
        on.complete(&on.terminate, "CONTINUE").await;
    }

    /// An instance of an Auto Scaling group: on EC2, unless the instance metadata says there is
    /// no group (a metadata error counts as a group, the safe side: no uncoordinated swaps).
    fn coordinated(&self) -> bool {
        self.on_ec2
            .as_ref()
            .is_some_and(|on| !on.outside_group.load(Ordering::Relaxed))
    }

    /// Two reads of the local metadata service a turn: no AWS API call, so nothing grows
    /// with the fleet's size.
    async fn instructions(&self) -> Instructions {
        let Some(on) = &self.on_ec2 else {
            return Instructions::default();
        };
        let last = on.seen.lock().map(|s| s.clone()).unwrap_or_default();
        let read = |key| async move {
            match on.read_release(key).await {
                Ok(r) => Some(r),
                Err(e) => {
                    on.metrics.fleet_error(FleetErrorKind::Metadata);
                    tracing::debug!(error = %e, key, "cannot read an instruction; the last one stands");
                    None
                }
            }
        };
        let target = read(instance_tags::TARGET).await.unwrap_or(last.target);
        let pull = read(instance_tags::PULL).await.unwrap_or(last.pull);
        let now = Instructions { target, pull };
        if let Ok(mut s) = on.seen.lock() {
            *s = now.clone();
        }
        now
    }

    async fn answers(&self) -> Answers {
        let Some(on) = &self.on_ec2 else {
            return Answers::default();
        };
        let read = |key| async move {
            on.read_release(key).await.unwrap_or_else(|e| {
                on.metrics.fleet_error(FleetErrorKind::Metadata);
                tracing::debug!(error = %e, key, "cannot read an earlier answer");
                None
            })
        };
        let answers = Answers {
            pulled: read(instance_tags::PULLED).await,
            failed: read(instance_tags::FAILED).await,
        };
        // What the tags already say is not written again.
        if let Ok(mut a) = on.answered.lock() {
            let known = [
                (instance_tags::PULLED, &answers.pulled),
                (instance_tags::FAILED, &answers.failed),
            ];
            for (key, r) in known {
                if let Some(r) = r {
                    a.push((key, instance_tags::encode(r)));
                }
            }
        }
        answers
    }

    async fn pulled(&self, release: &Release) -> bool {
        match &self.on_ec2 {
            Some(on) => {
                on.answer(instance_tags::PULLED, instance_tags::encode(release))
                    .await
            }
            None => true,
        }
    }

    async fn failed(&self, release: Option<&Release>) -> bool {
        match &self.on_ec2 {
            Some(on) => {
                let value = release.map(instance_tags::encode).unwrap_or_default();
                on.answer(instance_tags::FAILED, value).await
            }
            None => true,
        }
    }

    async fn retry_pending(&self) {
        let Some(on) = &self.on_ec2 else { return };
        for hook in [&on.launch, &on.terminate] {
            if matches!(hook.get(), Progress::Pending { next_at, .. } if next_at <= Instant::now())
            {
                on.drive(hook).await;
            }
        }
    }
}
