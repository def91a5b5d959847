//! Where a deployment lives: the release parameter, the Auto Scaling Group and the image
//! repository, either given directly or read from a CloudFormation stack's outputs; with a
//! stack, also its target group (for `ctl status`) and the alarms a release watches.

use aws_sdk_cloudformation::Client;

use crate::aws;

/// Output keys of the skiff stack template.
pub const OUTPUT_PARAMETER: &str = "ReleaseParameter";
pub const OUTPUT_ASG: &str = "AutoScalingGroup";
pub const OUTPUT_IMAGE: &str = "ImageRepository";
/// The target group's ARN (optional: `ctl status` shows target health when known).
pub const OUTPUT_TARGET_GROUP: &str = "TargetGroup";
/// The alarms a release watches, comma-separated (optional).
pub const OUTPUT_ALARMS: &str = "ReleaseAlarmNames";

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Deployment {
    pub parameter: String,
    pub asg: String,
    pub image: String,
    /// The target group's ARN, when the stack or `--target-group` names one.
    pub target_group: Option<String>,
    /// The alarms the stack defines for a release (output ReleaseAlarmNames); empty without.
    pub alarms: Vec<String>,
    /// The stack's release strategy (output ReleaseStrategy: refresh or in-place), when it
    /// names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// How the stack's agents swap the container in place (output SwapMode: handover or
    /// drain), when it names one; an older stack without it: drain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap: Option<String>,
    /// The SSM parameter holding the keys releases must be signed by (output
    /// TrustedKeysParameter, see [`crate::trust`]); `None`: the stack names no keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trusted_keys: Option<String>,
}

/// What the command line gave: a stack, direct values, or both (direct values win).
#[derive(Debug, Clone, Default)]
pub struct Locator {
    pub stack: Option<String>,
    pub parameter: Option<String>,
    pub asg: Option<String>,
    pub image: Option<String>,
    pub target_group: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeploymentError {
    #[error(
        "cannot read the outputs of stack {stack} ({detail}); check the name, the region and your credentials"
    )]
    DescribeStack { stack: String, detail: String },
    #[error(
        "the deployment is incomplete: {missing} not known; pass --stack (or SKIFF_STACK) or {flags}"
    )]
    Missing { missing: String, flags: String },
    #[error("invalid image repository: {0}")]
    Image(String),
}

/// Combine the direct values with the stack outputs (`None` when no stack was named). Pure.
pub fn combine(
    locator: &Locator,
    outputs: Option<&[(String, String)]>,
) -> Result<Deployment, DeploymentError> {
    let from_stack =
        |key: &str| outputs.and_then(|o| o.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()));
    let parameter = locator
        .parameter
        .clone()
        .or_else(|| from_stack(OUTPUT_PARAMETER));
    let asg = locator.asg.clone().or_else(|| from_stack(OUTPUT_ASG));
    let image = locator.image.clone().or_else(|| from_stack(OUTPUT_IMAGE));
    let target_group = locator
        .target_group
        .clone()
        .or_else(|| from_stack(OUTPUT_TARGET_GROUP));
    let strategy = from_stack(crate::inplace::OUTPUT_STRATEGY);
    let swap = from_stack(crate::inplace::OUTPUT_SWAP_MODE);
    let trusted_keys = from_stack(crate::trust::OUTPUT_TRUSTED_KEYS);
    let alarms = from_stack(OUTPUT_ALARMS)
        .map(|v| crate::alarms::parse_list(&v))
        .unwrap_or_default();
    let mut missing = Vec::new();
    let mut flags = Vec::new();
    if parameter.is_none() {
        missing.push("the release parameter");
        flags.push("--parameter");
    }
    if asg.is_none() {
        missing.push("the Auto Scaling Group");
        flags.push("--asg");
    }
    if image.is_none() {
        missing.push("the image repository");
        flags.push("--image");
    }
    match (parameter, asg, image) {
        (Some(parameter), Some(asg), Some(image)) => {
            skiff_release::validate_repository(&image).map_err(DeploymentError::Image)?;
            Ok(Deployment {
                parameter,
                asg,
                image,
                target_group,
                alarms,
                strategy,
                swap,
                trusted_keys,
            })
        }
        _ => Err(DeploymentError::Missing {
            missing: missing.join(", "),
            flags: flags.join(" "),
        }),
    }
}

/// The outputs of `stack` as key/value pairs.
pub async fn stack_outputs(
    client: &Client,
    stack: &str,
) -> Result<Vec<(String, String)>, DeploymentError> {
    let out = client
        .describe_stacks()
        .stack_name(stack)
        .send()
        .await
        .map_err(|e| DeploymentError::DescribeStack {
            stack: stack.to_owned(),
            detail: aws::describe(&e),
        })?;
    let stack_desc = out
        .stacks
        .unwrap_or_default()
        .into_iter()
        .next()
        .ok_or_else(|| DeploymentError::DescribeStack {
            stack: stack.to_owned(),
            detail: "no such stack".into(),
        })?;
    Ok(stack_desc
        .outputs
        .unwrap_or_default()
        .into_iter()
        .filter_map(|o| Some((o.output_key?, o.output_value?)))
        .collect())
}

/// Resolve the deployment: read the stack when one is named, then combine.
pub async fn locate(client: &Client, locator: &Locator) -> Result<Deployment, DeploymentError> {
    let outputs = match &locator.stack {
        Some(stack) => Some(stack_outputs(client, stack).await?),
        None => None,
    };
    combine(locator, outputs.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outs() -> Vec<(String, String)> {
        vec![
            (OUTPUT_PARAMETER.into(), "/app/release".into()),
            (OUTPUT_ASG.into(), "app-asg".into()),
            (OUTPUT_IMAGE.into(), "reg.example/app".into()),
            (OUTPUT_TARGET_GROUP.into(), "arn:tg".into()),
            (OUTPUT_ALARMS.into(), "a-5xx, a-hosts,".into()),
            (crate::inplace::OUTPUT_STRATEGY.into(), "in-place".into()),
            (crate::inplace::OUTPUT_SWAP_MODE.into(), "handover".into()),
            (
                crate::trust::OUTPUT_TRUSTED_KEYS.into(),
                "/skiff/master/trusted-keys".into(),
            ),
            ("Other".into(), "x".into()),
        ]
    }

    /// Locator, stack outputs, and the wanted (parameter, asg, image) or error text.
    type Row<'a> = (
        &'a Locator,
        Option<&'a [(String, String)]>,
        Result<(&'a str, &'a str, &'a str), &'a str>,
    );

    #[test]
    fn combine_table() {
        let direct = Locator {
            stack: None,
            parameter: Some("/p".into()),
            asg: Some("g".into()),
            image: Some("r/app".into()),
            target_group: None,
        };
        let only_stack = Locator {
            stack: Some("s".into()),
            ..Locator::default()
        };
        let override_asg = Locator {
            asg: Some("other".into()),
            ..only_stack.clone()
        };
        let bad_image = Locator {
            image: Some("r/app:latest".into()),
            ..direct.clone()
        };
        let empty = Locator::default();
        let o = outs();
        let table: Vec<Row<'_>> = vec![
            (&direct, None, Ok(("/p", "g", "r/app"))),
            (
                &only_stack,
                Some(&o),
                Ok(("/app/release", "app-asg", "reg.example/app")),
            ),
            (
                &override_asg,
                Some(&o),
                Ok(("/app/release", "other", "reg.example/app")),
            ),
            (&only_stack, Some(&[]), Err("--parameter --asg --image")),
            (&empty, None, Err("--parameter --asg --image")),
            (&bad_image, None, Err("must not carry a tag")),
        ];
        for (loc, outputs, want) in table {
            let got = combine(loc, outputs);
            match (got, want) {
                (Ok(d), Ok((p, a, i))) => {
                    assert_eq!(
                        (d.parameter.as_str(), d.asg.as_str(), d.image.as_str()),
                        (p, a, i)
                    )
                }
                (Err(e), Err(needle)) => assert!(e.to_string().contains(needle), "{e}"),
                (got, want) => panic!("{loc:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn optional_outputs() {
        let only_stack = Locator {
            stack: Some("s".into()),
            ..Locator::default()
        };
        let d = combine(&only_stack, Some(&outs())).expect("deployment");
        assert_eq!(d.target_group.as_deref(), Some("arn:tg"));
        assert_eq!(d.alarms, vec!["a-5xx".to_owned(), "a-hosts".to_owned()]);
        assert_eq!(d.strategy.as_deref(), Some("in-place"));
        assert_eq!(d.swap.as_deref(), Some("handover"));
        assert_eq!(
            d.trusted_keys.as_deref(),
            Some("/skiff/master/trusted-keys")
        );
        let given = Locator {
            target_group: Some("arn:mine".into()),
            ..only_stack
        };
        assert_eq!(
            combine(&given, Some(&outs()))
                .expect("deployment")
                .target_group
                .as_deref(),
            Some("arn:mine")
        );
        let older: Vec<(String, String)> = outs()
            .into_iter()
            .filter(|(k, _)| {
                k != OUTPUT_TARGET_GROUP
                    && k != OUTPUT_ALARMS
                    && k != crate::inplace::OUTPUT_STRATEGY
                    && k != crate::inplace::OUTPUT_SWAP_MODE
                    && k != crate::trust::OUTPUT_TRUSTED_KEYS
            })
            .collect();
        let d = combine(&given, Some(&older)).expect("a stack without them still works");
        assert_eq!(
            d.strategy, None,
            "an older stack: refresh (choose_strategy)"
        );
        assert_eq!(
            d.swap, None,
            "an older stack: drain (SwapMode::from_output)"
        );
        assert_eq!(d.trusted_keys, None, "no keys: the signature check is off");
        assert_eq!(
            (d.target_group.as_deref(), d.alarms.len()),
            (Some("arn:mine"), 0)
        );
    }
}
