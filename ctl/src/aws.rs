//! The one place the AWS SDK configuration is built, and the one way AWS errors are described.

use std::error::Error;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

/// Standard credential chain and `AWS_*` variables (including `AWS_ENDPOINT_URL`), bounded
/// timeouts, standard retries with backoff.
pub async fn sdk_config(region: Option<&str>, profile: Option<&str>) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(RetryConfig::standard().with_max_attempts(4))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(20))
                .operation_timeout(Duration::from_secs(60))
                .build(),
        );
    if let Some(r) = region {
        loader = loader.region(Region::new(r.to_owned()));
    }
    if let Some(p) = profile {
        loader = loader.profile_name(p);
    }
    loader.load().await
}

/// An AWS failure in one line: `Code: message` when the service answered, else the whole
/// error chain (timeouts, connection refused).
pub fn describe<E>(err: &E) -> String
where
    E: ProvideErrorMetadata + Error,
{
    match (err.code(), err.message()) {
        (Some(code), Some(msg)) => format!("{code}: {msg}"),
        (Some(code), None) => code.to_owned(),
        _ => DisplayErrorContext(err).to_string(),
    }
}

/// The AWS error code, when the service answered with one.
pub fn code<E: ProvideErrorMetadata>(err: &E) -> Option<String> {
    err.code().map(str::to_owned)
}
