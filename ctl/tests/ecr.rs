//! Digest resolution for an ECR repository: the ECR-shaped registry of .ci/setup.sh
//! (`123456789012.dkr.ecr.us-east-1.amazonaws.com`, TLS with a test CA, basic auth that accepts
//! only the token moto's ECR issues for account 123456789012) serving the storage of :5000.
//! ctl must authenticate with `ecr:GetAuthorizationToken` (moto), never with `docker login`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{MOTO, ctl_env, docker, moto_sdk, text, unique};
use skiff_ctl::registry::{DigestResolver, HttpRegistry, RegistryError};
use skiff_release::Tag;

const ECR_HOST: &str = "123456789012.dkr.ecr.us-east-1.amazonaws.com";

fn ca() -> PathBuf {
    let home = std::env::var("SKIFF_CI_HOME").unwrap_or_else(|_| "/var/lib/skiff-ci".into());
    let ca = PathBuf::from(home).join("registry-ecr/ca.crt");
    assert!(
        ca.exists(),
        "{} missing: run `bash .ci/setup.sh` (it starts the ECR-shaped registry)",
        ca.display()
    );
    ca
}

/// Push the offline busybox to :5000 as `<unique>/app:v1`; returns the same repository under
/// the ECR host, and the digest.
fn push_ecr_image() -> (String, String) {
    let path = format!("{}/app", unique("skiff-ctl-ecr"));
    let local = format!("127.0.0.1:5000/{path}:v1");
    assert!(docker(&["tag", "skiff-ci/busybox:1", &local]), "docker tag");
    let pushed = Command::new("docker")
        .args(["push", &local])
        .output()
        .expect("docker push");
    docker(&["rmi", &local]);
    let out = String::from_utf8_lossy(&pushed.stdout).to_string();
    assert!(pushed.status.success(), "docker push {local}: {out}");
    let digest = out
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no digest in push output: {out}"))
        .to_owned();
    (format!("{ECR_HOST}/{path}"), digest)
}

fn tag(s: &str) -> Tag {
    s.parse().expect("tag")
}

/// Access keys of a user in another account (210987654321): moto's ECR issues that account's
/// token to them, which the registry refuses.
async fn other_account_keys() -> (String, String) {
    let http = reqwest::Client::new();
    let user = unique("skiff-ctl-other");
    let mut keys = None;
    for action in ["CreateUser", "CreateAccessKey"] {
        let body = http
            .post(format!("{MOTO}/"))
            .header("x-moto-account-id", "210987654321")
            .header(
                "Authorization",
                "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=x",
            )
            .form(&[("Action", action), ("UserName", &user), ("Version", "2010-05-08")])
            .send()
            .await
            .expect("moto iam")
            .text()
            .await
            .expect("moto iam body");
        let field = |name: &str| {
            body.split_once(&format!("<{name}>"))
                .and_then(|(_, rest)| rest.split_once('<'))
                .map(|(v, _)| v.to_owned())
        };
        keys = field("AccessKeyId").zip(field("SecretAccessKey"));
    }
    keys.expect("access key of the other account")
}

#[tokio::test]
async fn an_ecr_repository_resolves_with_a_token_from_get_authorization_token() {
    let (repo, digest) = push_ecr_image();
    let resolver = HttpRegistry::with_ca(None, &ca())
        .expect("client")
        .with_ecr_tokens(moto_sdk().await);
    let got = resolver.resolve(&repo, &tag("v1")).await.expect("resolved");
    assert_eq!(got.as_str(), digest);
    let err = resolver
        .resolve(&repo, &tag("nope"))
        .await
        .expect_err("unknown tag");
    assert!(matches!(err, RegistryError::UnknownTag { .. }), "{err}");
}

#[tokio::test]
async fn without_the_token_or_with_another_accounts_token_ecr_refuses() {
    let (repo, _) = push_ecr_image();
    // No AWS: anonymous, refused.
    let anonymous = HttpRegistry::with_ca(None, &ca()).expect("client");
    let err = anonymous
        .resolve(&repo, &tag("v1"))
        .await
        .expect_err("denied");
    assert!(matches!(err, RegistryError::Denied { .. }), "{err}");

    // The token of an identity in another account: refused, and said so.
    let (key, secret) = other_account_keys().await;
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(MOTO)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_ssm::config::Credentials::new(
            key, secret, None, None, "test",
        ))
        .load()
        .await;
    let other = HttpRegistry::with_ca(None, &ca())
        .expect("client")
        .with_ecr_tokens(sdk);
    let err = other.resolve(&repo, &tag("v1")).await.expect_err("denied");
    assert!(matches!(err, RegistryError::EcrDenied { .. }), "{err}");
    assert!(err.to_string().contains("ecr:BatchGetImage"), "{err}");

    // ECR itself unreachable: a token error that names the action.
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url("http://127.0.0.1:1")
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_ssm::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .load()
        .await;
    let away = HttpRegistry::with_ca(None, &ca())
        .expect("client")
        .with_ecr_tokens(sdk);
    let err = away.resolve(&repo, &tag("v1")).await.expect_err("no token");
    assert!(matches!(err, RegistryError::EcrToken { .. }), "{err}");
    assert!(
        err.to_string().contains("ecr:GetAuthorizationToken"),
        "{err}"
    );
}

#[tokio::test]
async fn ctl_release_pins_the_digest_of_an_ecr_image_without_docker_login() {
    let (repo, digest) = push_ecr_image();
    let param = format!("/{}/release", unique("skiff-ctl-ecr"));
    let ca = ca();
    let args = [
        "--parameter",
        &param,
        "--asg",
        "no-asg",
        "--image",
        &repo,
        "--json",
        "release",
        "--tag",
        "v1",
        "--dry-run",
    ];
    // An empty docker config: no `docker login` state to lean on.
    let dir = std::env::temp_dir().join(unique("skiff-ctl-ecr-home"));
    std::fs::create_dir_all(&dir).expect("empty home");
    let home = dir.to_str().expect("path");
    let out = ctl_env(
        &args,
        &[
            ("SKIFF_REGISTRY_CA", ca.to_str().expect("path")),
            ("DOCKER_CONFIG", home),
            ("HOME", home),
        ],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains(&digest), "digest pinned: {t}");

    // The registry's CA is not trusted without --registry-ca: refused, nothing written.
    let out = ctl_env(&args, &[("DOCKER_CONFIG", home), ("HOME", home)]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("cannot reach the registry"), "{t}");

    let out = ctl_env(
        &args,
        &[("SKIFF_REGISTRY_CA", "/nonexistent/ca.pem"), ("HOME", home)],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains("cannot use the registry CA /nonexistent/ca.pem"),
        "{t}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
