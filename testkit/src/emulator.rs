//! The AWS emulator (testbed/emulator: moto with skiff's extensions, started by
//! `bash .ci/setup.sh`): SDK configs for it, and the fixtures tests build there.

use aws_config::SdkConfig;

/// The permissive server: any credentials, IAM never enforced.
pub const ENDPOINT: &str = "http://127.0.0.1:5055";
/// `ENDPOINT` without the scheme, for a raw TCP check.
pub const ADDR: &str = "127.0.0.1:5055";

/// An SDK config for `endpoint` (the emulator, or a listener of the test's own): us-east-1,
/// signed with access key `key` (the emulator on :5055 takes any; it counts calls per key).
/// The emulator enforces AWS's request rates per account and Region, which every test on the
/// machine shares: a throttled call is retried up to ten times with the SDK's backoff.
pub async fn sdk_signed(endpoint: &str, key: &str) -> SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(10))
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            key, "testing", None, None, "test",
        ))
        .load()
        .await
}

/// An SDK config for `endpoint` with moto's dummy credentials.
pub async fn sdk_at(endpoint: &str) -> SdkConfig {
    sdk_signed(endpoint, "testing").await
}

/// An SDK config for the permissive emulator.
pub async fn sdk() -> SdkConfig {
    sdk_at(ENDPOINT).await
}

/// The emulator's first Amazon machine image.
pub async fn image(ec2: &aws_sdk_ec2::Client) -> String {
    ec2.describe_images()
        .owners("amazon")
        .send()
        .await
        .expect("describe images")
        .images()
        .iter()
        .find_map(|i| i.image_id().map(str::to_owned))
        .expect("the emulator has an Amazon image")
}

/// A new EC2 instance of [`image`], outside any group; returns its id (terminate it when done).
pub async fn run_instance(ec2: &aws_sdk_ec2::Client) -> String {
    ec2.run_instances()
        .image_id(image(ec2).await)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .expect("run instance")
        .instances()[0]
        .instance_id()
        .expect("instance id")
        .to_owned()
}

/// A launch template `name` of [`image`], for an Auto Scaling group of test instances;
/// returns its id.
pub async fn launch_template(ec2: &aws_sdk_ec2::Client, name: &str) -> String {
    let ami = image(ec2).await;
    ec2.create_launch_template()
        .launch_template_name(name)
        .launch_template_data(
            aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                .image_id(ami)
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                .build(),
        )
        .send()
        .await
        .expect("launch template")
        .launch_template()
        .and_then(|l| l.launch_template_id())
        .expect("launch template id")
        .to_owned()
}

/// An Auto Scaling group `name` in us-east-1a from a launch template of its own (same name).
/// Without hooks its instances are InService at once. [`Group::delete`] removes both.
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub template_id: String,
    pub asg: aws_sdk_autoscaling::Client,
    pub ec2: aws_sdk_ec2::Client,
}

impl Group {
    /// `desired` instances (room for a refresh to launch as many again), attached to
    /// `target_group` when given.
    pub async fn create(
        sdk: &SdkConfig,
        name: &str,
        desired: i32,
        target_group: Option<&str>,
    ) -> Group {
        let asg = aws_sdk_autoscaling::Client::new(sdk);
        let ec2 = aws_sdk_ec2::Client::new(sdk);
        let template_id = launch_template(&ec2, name).await;
        asg.create_auto_scaling_group()
            .auto_scaling_group_name(name)
            .min_size(0)
            .max_size(desired * 2 + 1)
            .desired_capacity(desired)
            .availability_zones("us-east-1a")
            .launch_template(
                aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                    .launch_template_id(&template_id)
                    .build(),
            )
            .set_target_group_arns(target_group.map(|t| vec![t.to_owned()]))
            .send()
            .await
            .expect("auto scaling group");
        Group {
            name: name.to_owned(),
            template_id,
            asg,
            ec2,
        }
    }

    /// The group's instances: (id, lifecycle state), in the group's order.
    pub async fn states(&self) -> Vec<(String, String)> {
        self.asg
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(&self.name)
            .send()
            .await
            .expect("describe group")
            .auto_scaling_groups()
            .first()
            .map(|g| {
                g.instances()
                    .iter()
                    .map(|i| {
                        (
                            i.instance_id().unwrap_or_default().to_owned(),
                            i.lifecycle_state()
                                .map(|s| s.as_str().to_owned())
                                .unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The group's instance ids, sorted.
    pub async fn instances(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.states().await.into_iter().map(|(id, _)| id).collect();
        ids.sort();
        ids
    }

    /// A launch lifecycle hook `hook`: each instance the group launches waits in Pending:Wait
    /// until the hook is completed (as an agent does once its release is healthy, see
    /// [`Group::complete_launches`]) or `heartbeat_seconds` pass (AWS takes 30 to 7200:
    /// https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_PutLifecycleHook.html),
    /// then `ABANDON`.
    pub async fn hold_launches(&self, hook: &str, heartbeat_seconds: i32) {
        self.asg
            .put_lifecycle_hook()
            .auto_scaling_group_name(&self.name)
            .lifecycle_hook_name(hook)
            .lifecycle_transition("autoscaling:EC2_INSTANCE_LAUNCHING")
            .heartbeat_timeout(heartbeat_seconds)
            .default_result("ABANDON")
            .send()
            .await
            .expect("launch hook");
    }

    /// Complete the launch hook `hook` with `result` (`CONTINUE` or `ABANDON`) for every
    /// instance waiting in Pending:Wait, as each one's agent would; returns their ids.
    pub async fn complete_launches(&self, hook: &str, result: &str) -> Vec<String> {
        let mut done = Vec::new();
        for (id, state) in self.states().await {
            if state != "Pending:Wait" {
                continue;
            }
            self.asg
                .complete_lifecycle_action()
                .auto_scaling_group_name(&self.name)
                .lifecycle_hook_name(hook)
                .instance_id(&id)
                .lifecycle_action_result(result)
                .send()
                .await
                .expect("complete lifecycle action");
            done.push(id);
        }
        done
    }

    /// Stand-in agents for the group's instances: every 300 ms (the emulator enforces Auto
    /// Scaling's request rate) the instances waiting for launch hook `hook` are answered, the
    /// first `abandon` of them with ABANDON (their release could not start: a refresh fails),
    /// the rest with CONTINUE. Abort the task to stop them.
    pub fn stand_in_agents(&self, hook: &str, abandon: usize) -> tokio::task::JoinHandle<()> {
        let (g, hook) = (self.clone(), hook.to_owned());
        tokio::spawn(async move {
            let mut abandoned = 0;
            loop {
                let result = if abandoned < abandon {
                    "ABANDON"
                } else {
                    "CONTINUE"
                };
                abandoned += g.complete_launches(&hook, result).await.len();
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
        })
    }

    /// The group's instance refreshes, newest first: (id, status).
    pub async fn refreshes(&self) -> Vec<(String, String)> {
        self.asg
            .describe_instance_refreshes()
            .auto_scaling_group_name(&self.name)
            .send()
            .await
            .expect("describe instance refreshes")
            .instance_refreshes()
            .iter()
            .map(|r| {
                (
                    r.instance_refresh_id().unwrap_or_default().to_owned(),
                    r.status()
                        .map(|s| s.as_str().to_owned())
                        .unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Delete the group (and its instances) and its launch template; errors are ignored (a
    /// test may have deleted them already).
    pub async fn delete(&self) {
        let _ = self
            .asg
            .delete_auto_scaling_group()
            .auto_scaling_group_name(&self.name)
            .force_delete(true)
            .send()
            .await;
        let _ = self
            .ec2
            .delete_launch_template()
            .launch_template_id(&self.template_id)
            .send()
            .await;
    }
}
