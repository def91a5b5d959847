//! Pulls from ECR against the real Docker engine and the ECR-shaped registry of .ci/setup.sh
//! (`123456789012.dkr.ecr.us-east-1.amazonaws.com`: TLS, basic auth that accepts only the token
//! moto's ECR issues for account 123456789012, serving the storage of :5000). The Docker Engine
//! API uses no credential helper: every pull must carry a token from
//! `ecr:GetAuthorizationToken`.

mod support;

use std::process::Command;
use std::time::Duration;

use aws_sdk_ecr::operation::get_authorization_token::GetAuthorizationTokenOutput;
use aws_sdk_ecr::types::AuthorizationData;
use aws_smithy_mocks::{RuleMode, create_mock_http_client, mock};
use skiff_agent::credentials::{self, PullTokens};
use skiff_agent::docker::DockerRuntime;
use skiff_agent::ecr::EcrIssuer;
use skiff_agent::runtime::{ContainerRuntime, RuntimeError};
use skiff_release::{EcrRegistry, Release};
use support::{AWS_ENV, Agent, Fixture, MOTO, Moto, docker, remove_images, wait_for};

const ECR_HOST: &str = "123456789012.dkr.ecr.us-east-1.amazonaws.com";
const LONG: Duration = Duration::from_secs(40);

/// `tag` pushed (through :5000) and only in the registry; returns the repository under the ECR
/// host, its digest, and a guard that removes what the engine pulled from there.
fn ecr_image(fx: &mut Fixture, tag: &str) -> (String, String, Pulled) {
    let repo = fx.repo.clone();
    let digest = fx.registry_only(&repo, tag);
    let path = repo.split_once('/').map(|(_, p)| p).expect("path");
    let ecr_repo = format!("{ECR_HOST}/{path}");
    // Nothing of it on the host, whatever an earlier run left.
    remove_images(&ecr_repo);
    (ecr_repo.clone(), digest, Pulled(ecr_repo))
}

struct Pulled(String);

impl Drop for Pulled {
    fn drop(&mut self) {
        remove_images(&self.0);
    }
}

/// Access keys of a new user in another account (210987654321): moto's ECR issues that
/// account's token to them, which the registry refuses.
fn other_account_keys() -> (String, String) {
    let user = support::unique("other");
    let mut body = String::new();
    for action in ["CreateUser", "CreateAccessKey"] {
        let out = Command::new("curl")
            .args(["-sf", "-m", "10", &format!("{MOTO}/")])
            .args(["-H", "x-moto-account-id: 210987654321"])
            .args([
                "-H",
                "Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=x",
            ])
            .args(["-d", &format!("Action={action}&UserName={user}&Version=2010-05-08")])
            .output()
            .expect("curl");
        assert!(out.status.success(), "moto iam {action}");
        body = String::from_utf8_lossy(&out.stdout).to_string();
    }
    let field = |name: &str| {
        body.split_once(&format!("<{name}>"))
            .and_then(|(_, rest)| rest.split_once('<'))
            .map(|(v, _)| v.to_owned())
            .unwrap_or_else(|| panic!("no {name} in {body}"))
    };
    (field("AccessKeyId"), field("SecretAccessKey"))
}

fn config(fx: &Fixture, image: &str, source: &str) -> String {
    format!(
        r#"[app]
name = "{id}"
image = "{image}"
port = {app_port}
start_timeout = "10s"
stop_timeout = "2s"
[release]
{source}
poll_interval = "300ms"
[health]
listen = "127.0.0.1:{health_port}"
interval = "200ms"
[aws]
region = "us-east-1"
lifecycle_hook = "none"
terminate_hook = "none"
"#,
        id = fx.id,
        app_port = fx.app_port,
        health_port = fx.health_port,
    )
}

#[test]
fn the_agent_pulls_an_ecr_image_with_a_token_and_runs_it() {
    let moto = Moto::connect();
    let mut fx = Fixture::new("ecr");
    let (repo, digest, _pulled) = ecr_image(&mut fx, "v1");
    let parameter = format!("/{}/release", fx.id);
    moto.put(
        &parameter,
        &format!(r#"{{"tag":"v1","digest":"{digest}"}}"#),
        false,
    );
    let source = format!("source = \"ssm\"\nparameter = \"{parameter}\"");
    let cfg = fx.write_config(&config(&fx, &repo, &source));
    let mut env = AWS_ENV.to_vec();
    env.push(("AWS_ENDPOINT_URL", MOTO));
    let mut agent = Agent::start(&cfg, &env);
    fx.wait_healthy("v1", LONG);
    let id = fx.running_container();
    let image = docker(&["inspect", "--format", "{{.Config.Image}}", &id]);
    assert_eq!(image, format!("{repo}@{digest}"));
    agent.sigterm();
    let logs = agent.logs();
    assert!(
        logs.contains("pull tokens from ecr:GetAuthorizationToken"),
        "{logs}"
    );
    assert!(
        !logs.contains("123456789012-auth-token"),
        "token in the logs"
    );
    moto.delete_path(&format!("/{}", fx.id));
}

#[test]
fn the_file_source_pulls_from_ecr_through_the_standard_aws_chain() {
    let mut fx = Fixture::new("ecr-file");
    let (repo, _, _pulled) = ecr_image(&mut fx, "v1");
    fx.set_release("v1");
    let source = format!(
        "source = \"file\"\nfile = \"{}\"",
        fx.release_file().display()
    );
    let cfg = fx.write_config(&config(&fx, &repo, &source));
    let mut env = AWS_ENV.to_vec();
    env.push(("AWS_ENDPOINT_URL", MOTO));
    let _agent = Agent::start(&cfg, &env);
    fx.wait_healthy("v1", LONG);
}

#[test]
fn without_a_valid_token_the_pull_is_refused_with_a_clear_error_and_renewed_once() {
    let _moto = Moto::connect();
    let mut fx = Fixture::new("ecr-denied");
    let (repo, _, _pulled) = ecr_image(&mut fx, "v1");
    fx.set_release("v1");
    let source = format!(
        "source = \"file\"\nfile = \"{}\"",
        fx.release_file().display()
    );
    let cfg = fx.write_config(&config(&fx, &repo, &source));

    // ECR unreachable: no token, no pull, and the error says so.
    let mut env = AWS_ENV.to_vec();
    env.push(("AWS_ENDPOINT_URL", "http://127.0.0.1:1"));
    let mut agent = Agent::start(&cfg, &env);
    wait_for(
        LONG,
        "a token error in /status",
        || {
            fx.status_or_null()["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("cannot get a pull token for registry"))
        },
        || format!("{:#}\n{}", fx.status_or_null(), agent.logs()),
    );
    assert!(fx.containers().is_empty(), "nothing created");
    assert_ne!(fx.healthz().map(|(c, _)| c), Some(200));
    agent.sigterm();

    // The token of an identity in another account: the registry refuses it; the agent renews
    // it once per attempt (not in a loop) and reports the refusal.
    let (key, secret) = other_account_keys();
    let env = [
        ("AWS_ACCESS_KEY_ID", key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", secret.as_str()),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_ENDPOINT_URL", MOTO),
    ];
    let mut agent = Agent::start(&cfg, &env);
    wait_for(
        LONG,
        "the refusal in /status",
        || {
            fx.status_or_null()["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("the registry refused to let us pull"))
        },
        || format!("{:#}\n{}", fx.status_or_null(), agent.logs()),
    );
    // Let a few attempts pass (backoff 1 s, 2 s, ...).
    std::thread::sleep(Duration::from_secs(4));
    agent.sigterm();
    let logs = agent.logs();
    let renewals = logs
        .matches("getting a new one and trying once more")
        .count();
    let failures = logs.matches("cannot prepare the release").count();
    assert!(failures >= 2, "{logs}");
    assert_eq!(renewals, failures, "one renewal per attempt: {logs}");
    assert!(fx.containers().is_empty());
}

/// A cached token (valid for 12 h, as ECR's are) that the registry refuses: dropped, renewed
/// once, and the pull succeeds, through the real engine and registry. moto's tokens carry an
/// expiry in 2015 and are never cached, so the ECR answers here come from `aws-smithy-mocks`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_token_the_registry_refuses_is_renewed_once() {
    let mut fx = Fixture::new("ecr-renew");
    let (repo, digest, _pulled) = ecr_image(&mut fx, "v1");
    let token = |password: &str| {
        let encoded = aws_smithy_types::base64::encode(format!("AWS:{password}"));
        let expires = aws_smithy_types::DateTime::from_secs(
            (std::time::SystemTime::now() + Duration::from_secs(12 * 3600))
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_secs() as i64,
        );
        GetAuthorizationTokenOutput::builder()
            .authorization_data(
                AuthorizationData::builder()
                    .authorization_token(encoded)
                    .expires_at(expires)
                    .proxy_endpoint(format!("https://{ECR_HOST}"))
                    .build(),
            )
            .build()
    };
    let stale = mock!(aws_sdk_ecr::Client::get_authorization_token)
        .then_output(move || token("revoked-token"));
    let good = mock!(aws_sdk_ecr::Client::get_authorization_token)
        .then_output(move || token("123456789012-auth-token"));
    let interceptor = support::interceptor(RuleMode::Sequential, &[&stale, &good]);
    let client = aws_sdk_ecr::Client::from_conf(
        aws_sdk_ecr::Config::builder()
            .with_test_defaults()
            .http_client(create_mock_http_client())
            .interceptor(interceptor)
            .build(),
    );
    let registry = EcrRegistry::of_image(&repo).expect("ecr");
    let tokens = PullTokens::new(EcrIssuer::with_client(client, registry));
    let runtime = DockerRuntime::connect().expect("docker");
    let release = Release::new(
        "v1".parse().expect("tag"),
        Some(digest.parse().expect("digest")),
    );

    // The refused token alone: the engine reports the registry's refusal as such.
    let refused = runtime
        .ensure_image(
            &repo,
            &release,
            Some(&skiff_agent::runtime::RegistryAuth {
                username: "AWS".into(),
                password: "revoked-token".into(),
            }),
        )
        .await
        .expect_err("refused");
    assert!(
        matches!(refused, RuntimeError::PullDenied { .. }),
        "{refused}"
    );

    let image = credentials::ensure_image(&runtime, &tokens, &repo, &release)
        .await
        .expect("pulled after one renewal");
    assert_eq!(
        image.digest.as_ref().map(|d| d.as_str()),
        Some(digest.as_str())
    );
    assert_eq!((stale.num_calls(), good.num_calls()), (1, 1));
}
