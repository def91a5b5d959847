//! Digest resolution against the real local registries: anonymous (:5000) and basic auth
//! (:5001). Each test pushes its own uniquely named image and removes the local tags.

mod common;

use std::process::Command;

use common::token_service::{SERVICE, TokenService};
use common::{docker, unique};
use skiff_ctl::registry::{Credentials, DigestResolver, HttpRegistry, RegistryError};
use skiff_release::Tag;

/// Push the offline busybox as `<registry>/<unique>/app:v1`; returns the repository and the
/// digest docker reports.
fn push(registry: &str) -> (String, String) {
    let repo = format!("{registry}/{}/app", unique("skiff-ctl-reg"));
    let image = format!("{repo}:v1");
    assert!(docker(&["tag", "skiff-ci/busybox:1", &image]), "docker tag");
    let pushed = docker(&["push", &image]);
    let digest = Command::new("docker")
        .args([
            "image",
            "inspect",
            "--format",
            "{{range .RepoDigests}}{{.}}\n{{end}}",
            &image,
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    docker(&["rmi", &image]);
    assert!(pushed, "docker push {image}");
    let digest = digest
        .lines()
        .find(|l| l.starts_with(&repo))
        .and_then(|l| l.split_once('@'))
        .map(|(_, d)| d.to_owned())
        .expect("repo digest");
    (repo, digest)
}

fn tag(s: &str) -> Tag {
    s.parse().expect("tag")
}

#[tokio::test]
async fn anonymous_registry_resolves_and_reports_unknown_tags() {
    let (repo, digest) = push("127.0.0.1:5000");
    let r = HttpRegistry::new(None).expect("client");
    let got = r.resolve(&repo, &tag("v1")).await.expect("resolve");
    assert_eq!(got.as_str(), digest);
    let err = r.resolve(&repo, &tag("v2")).await.expect_err("unknown");
    assert!(matches!(err, RegistryError::UnknownTag { .. }), "{err}");
}

#[tokio::test]
async fn basic_auth_registry_needs_the_credentials() {
    assert!(
        docker(&[
            "login",
            "127.0.0.1:5001",
            "-u",
            "skiff",
            "-p",
            "skiff-secret"
        ]),
        "docker login"
    );
    let (repo, digest) = push("127.0.0.1:5001");
    let with = HttpRegistry::new(Some(Credentials {
        user: "skiff".into(),
        password: "skiff-secret".into(),
    }))
    .expect("client");
    let got = with.resolve(&repo, &tag("v1")).await.expect("resolve");
    assert_eq!(got.as_str(), digest);

    assert_denied_without_the_right_credentials(&repo).await;
}

#[tokio::test]
async fn a_registry_that_is_down_is_unreachable() {
    let r = HttpRegistry::new(None).expect("client");
    let err = r
        .resolve("127.0.0.1:1/x/app", &tag("v1"))
        .await
        .expect_err("down");
    assert!(matches!(err, RegistryError::Unreachable { .. }), "{err}");
}

#[tokio::test]
async fn bearer_token_registry_resolves_through_the_challenge_flow() {
    let tokens = TokenService::start();
    // :5002 serves :5000's storage behind token auth (see .ci/setup.sh).
    let (pushed, digest) = push("127.0.0.1:5000");
    let repo = pushed.replacen("127.0.0.1:5000", "127.0.0.1:5002", 1);
    let path = repo.split_once('/').map(|(_, p)| p).expect("path");

    let with = HttpRegistry::new(Some(Credentials {
        user: "skiff".into(),
        password: "skiff-secret".into(),
    }))
    .expect("client");
    let got = with.resolve(&repo, &tag("v1")).await.expect("resolve");
    assert_eq!(got.as_str(), digest);
    let err = with.resolve(&repo, &tag("v2")).await.expect_err("unknown");
    assert!(matches!(err, RegistryError::UnknownTag { .. }), "{err}");

    assert_denied_without_the_right_credentials(&repo).await;

    let seen = tokens.seen();
    assert_eq!(
        seen.iter().map(|r| r.granted).collect::<Vec<_>>(),
        [true, true, false, false],
        "{seen:?}"
    );
    for r in &seen {
        assert_eq!(r.query.get("service").map(String::as_str), Some(SERVICE));
        assert_eq!(
            r.query.get("scope"),
            Some(&format!("repository:{path}:pull")),
            "{seen:?}"
        );
    }
}

/// No credentials, and a wrong password, are both refused as `Denied` for `repo:v1`.
async fn assert_denied_without_the_right_credentials(repo: &str) {
    let wrong = Credentials {
        user: "skiff".into(),
        password: "wrong".into(),
    };
    for creds in [None, Some(wrong)] {
        let client = HttpRegistry::new(creds).expect("client");
        let err = client.resolve(repo, &tag("v1")).await.expect_err("denied");
        assert!(matches!(err, RegistryError::Denied { .. }), "{err}");
    }
}
