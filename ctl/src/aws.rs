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

/// The error codes AWS answers a request refused by a request-rate limit: EC2
/// `RequestLimitExceeded`, ELB and SSM `ThrottlingException`, Auto Scaling `Throttling`.
/// https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html
/// https://docs.aws.amazon.com/elasticloadbalancing/latest/userguide/elb-api-throttling.html
pub fn is_throttling(code: Option<&str>) -> bool {
    matches!(
        code,
        Some(
            "RequestLimitExceeded"
                | "ThrottlingException"
                | "Throttling"
                | "TooManyRequestsException"
        )
    )
}

/// How long ctl keeps retrying one throttled call (a write, or a read of the group) (on top of the SDK's own attempts): long
/// enough for a bucket drained by a thousand agents answering at once (CreateTags refills 10
/// tokens a second) to take ctl's write, short of any wait's timeout.
pub const THROTTLED_RETRY_FOR: Duration = Duration::from_secs(180);
const THROTTLED_RETRY_FIRST: Duration = Duration::from_secs(1);
const THROTTLED_RETRY_CAP: Duration = Duration::from_secs(20);

/// The wait before retry number `attempt` (1-based): "full jitter", a random share (`random`,
/// any u64) of `first * 2^(attempt-1)` capped, so writers throttled together spread out.
/// https://aws.amazon.com/builders-library/timeouts-retries-and-backoff-with-jitter/ Pure.
pub fn retry_delay(attempt: u32, random: u64) -> Duration {
    let exp = attempt.saturating_sub(1).min(16);
    let ceiling = THROTTLED_RETRY_FIRST
        .saturating_mul(1u32 << exp)
        .min(THROTTLED_RETRY_CAP);
    let share = (random % 1_000) as u32;
    ceiling * share / 1_000 + Duration::from_millis(50)
}

fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// Run a call (a write, or a read that must not fail a release) until it is not throttled, or [`THROTTLED_RETRY_FOR`] has passed (the last error is
/// then returned). Other errors return at once (the SDK already retried transient ones).
pub async fn outlast_throttling<T, E, F, Fut>(mut op: F) -> Result<T, E>
where
    E: ProvideErrorMetadata,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + THROTTLED_RETRY_FOR;
    let mut attempt = 0;
    loop {
        match op().await {
            Err(e) if is_throttling(e.code()) => {
                attempt += 1;
                let wait = retry_delay(attempt, random());
                if tokio::time::Instant::now() + wait >= deadline {
                    return Err(e);
                }
                tracing::info!(attempt, "throttled by AWS; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
            }
            done => return done,
        }
    }
}

/// Whether an error code says the caller lacks a permission (IAM's words differ by service:
/// AccessDenied, AccessDeniedException, UnauthorizedOperation for EC2).
pub fn is_denied(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("AccessDenied" | "AccessDeniedException" | "UnauthorizedOperation")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_codes() {
        for (code, want) in [
            (Some("AccessDenied"), true),
            (Some("AccessDeniedException"), true),
            (Some("UnauthorizedOperation"), true),
            (Some("Throttling"), false),
            (None, false),
        ] {
            assert_eq!(is_denied(code), want, "{code:?}");
        }
    }

    #[test]
    fn throttling_codes() {
        for (code, want) in [
            (Some("RequestLimitExceeded"), true),
            (Some("ThrottlingException"), true),
            (Some("Throttling"), true),
            (Some("AccessDenied"), false),
            (Some("ValidationError"), false),
            (None, false),
        ] {
            assert_eq!(is_throttling(code), want, "{code:?}");
        }
    }

    #[test]
    fn retry_delays_double_to_the_cap_with_full_jitter() {
        let ms = |d: Duration| d.as_millis();
        for (attempt, random, want) in [
            (1, 0, 50),
            (1, 999, 1_049),
            (2, 500, 1_050),
            (3, 999, 4_046),
            (5, 999, 16_034),
            (6, 999, 20_030),
            (40, 999, 20_030),
            (40, 1_500, 10_050),
        ] {
            assert_eq!(
                ms(retry_delay(attempt, random)),
                want,
                "attempt {attempt} random {random}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_write_is_retried_until_it_passes_and_other_errors_are_not() {
        use aws_smithy_types::error::ErrorMetadata;
        let mut calls = 0;
        let got: Result<u32, ErrorMetadata> = outlast_throttling(|| {
            calls += 1;
            let n = calls;
            async move {
                if n < 4 {
                    Err(ErrorMetadata::builder()
                        .code("RequestLimitExceeded")
                        .build())
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(got.ok(), Some(4));

        let mut calls = 0;
        let got: Result<(), ErrorMetadata> = outlast_throttling(|| {
            calls += 1;
            async { Err(ErrorMetadata::builder().code("AccessDenied").build()) }
        })
        .await;
        assert_eq!(
            got.err()
                .and_then(|e| e.code().map(str::to_owned))
                .as_deref(),
            Some("AccessDenied")
        );
        assert_eq!(calls, 1);

        let start = tokio::time::Instant::now();
        let got: Result<(), ErrorMetadata> = outlast_throttling(|| async {
            Err(ErrorMetadata::builder().code("Throttling").build())
        })
        .await;
        assert!(got.is_err());
        assert!(
            start.elapsed() <= THROTTLED_RETRY_FOR,
            "{:?}",
            start.elapsed()
        );
    }
}
