//! Shared set-up for ctl's integration tests: moto clients, unique names, mocked clients.
#![allow(dead_code, unused_imports)]

pub mod fake_autoscaling;
pub mod token_service;

use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_smithy_mocks::{MockResponseInterceptor, Rule, RuleMode, create_mock_http_client};

pub use skiff_testkit::emulator::sdk as moto_sdk;

pub const MOTO: &str = skiff_testkit::emulator::ENDPOINT;

/// `ctl release --tag TAG` on group `asg`, the release in `param`, for an image ctl never
/// resolves (`--skip-verify`), checking every `poll`, then `extra`.
pub fn release_args<'a>(
    param: &'a str,
    asg: &'a str,
    tag: &'a str,
    poll: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "--parameter",
        param,
        "--asg",
        asg,
        "--image",
        "127.0.0.1:1/none/app",
        "release",
        "--tag",
        tag,
        "--skip-verify",
        "--poll",
        poll,
    ];
    args.extend_from_slice(extra);
    args
}

/// Push an image manifest with an empty config (`{}`) and no layers to `repo` under
/// `reference` (a tag, or a signature's tag to hold a manifest without a signature layer).
pub async fn push_empty_manifest(
    r: &skiff_ctl::registry::HttpRegistry,
    repo: &str,
    reference: &str,
) {
    use skiff_signature::{MANIFEST_MEDIA_TYPE, blob_digest};
    let config = b"{}";
    r.put_blob(repo, &blob_digest(config), config)
        .await
        .expect("config blob");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2,
                   "digest": blob_digest(config)},
        "layers": [],
    }))
    .expect("json");
    r.put_manifest(repo, reference, MANIFEST_MEDIA_TYPE, &manifest)
        .await
        .expect("manifest");
}

/// A name no earlier run used.
pub fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// Run the real `ctl` binary against moto.
pub fn ctl(args: &[&str]) -> Output {
    ctl_env(args, &[])
}

/// Run the real `ctl` binary against moto with extra environment, e.g.
/// `AWS_ENDPOINT_URL_AUTO_SCALING` to send Auto Scaling to a fake.
pub fn ctl_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    ctl_command(args, env).output().expect("run ctl")
}

/// The real `ctl` binary set up against moto, to spawn; `env` is set last, so it may also
/// replace these defaults (e.g. `AWS_ACCESS_KEY_ID`: the emulator counts calls per key).
pub fn ctl_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ctl"));
    c.args(args)
        .env("AWS_ENDPOINT_URL", MOTO)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env_remove("SKIFF_STACK")
        .env_remove("SKIFF_PARAMETER")
        .env_remove("SKIFF_ASG")
        .env_remove("SKIFF_IMAGE")
        .env_remove("SKIFF_TARGET_GROUP")
        .env_remove("AWS_PROFILE")
        .env_remove("BUILD_TAG")
        .envs(env.iter().copied());
    c
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn docker(args: &[&str]) -> bool {
    Command::new("docker")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The SDK in use predates `mock_client!`'s test defaults, so mocked clients are assembled here.
pub fn interceptor(rules: &[&Rule]) -> MockResponseInterceptor {
    rules.iter().fold(
        MockResponseInterceptor::new().rule_mode(RuleMode::MatchAny),
        |i, r| i.with_rule(r),
    )
}

pub fn mocked_autoscaling(rules: &[&Rule]) -> aws_sdk_autoscaling::Client {
    aws_sdk_autoscaling::Client::from_conf(
        aws_sdk_autoscaling::Config::builder()
            .with_test_defaults()
            .region(aws_config::Region::new("us-east-1"))
            .http_client(create_mock_http_client())
            .interceptor(interceptor(rules))
            .build(),
    )
}

pub async fn read_param(ssm: &aws_sdk_ssm::Client, name: &str) -> Option<String> {
    ssm.get_parameter()
        .name(name)
        .send()
        .await
        .ok()
        .and_then(|o| o.parameter)
        .and_then(|p| p.value)
}

pub async fn delete_param(ssm: &aws_sdk_ssm::Client, name: &str) {
    let _ = ssm.delete_parameter().name(name).send().await;
}

/// Write a String parameter in moto (overwriting: each write is a new version in its history).
pub async fn put_parameter(ssm: &aws_sdk_ssm::Client, name: &str, value: &str) {
    ssm.put_parameter()
        .name(name)
        .value(value)
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .overwrite(true)
        .send()
        .await
        .expect("put parameter");
}

/// Decode one `application/x-www-form-urlencoded` component (`+` and `%XX`).
pub fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Push a one-layer image `repo:tag` whose layer holds `content` (another content, another
/// digest); returns its digest as the registry resolves it.
pub async fn push_image(
    r: &skiff_ctl::registry::HttpRegistry,
    repo: &str,
    tag: &str,
    content: &str,
) -> skiff_release::Digest {
    use skiff_ctl::registry::DigestResolver;
    use skiff_signature::{MANIFEST_MEDIA_TYPE, blob_digest};
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let layer = content.as_bytes();
    r.put_blob(repo, &blob_digest(config), config)
        .await
        .expect("config blob");
    r.put_blob(repo, &blob_digest(layer), layer)
        .await
        .expect("layer blob");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "size": config.len(), "digest": blob_digest(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "size": layer.len(), "digest": blob_digest(layer)}],
    }))
    .expect("manifest");
    r.put_manifest(repo, tag, MANIFEST_MEDIA_TYPE, &manifest)
        .await
        .expect("manifest");
    r.resolve(repo, &tag.parse().expect("tag"))
        .await
        .expect("resolve")
}

pub use skiff_testkit::keys::openssl_key;

/// Sign `repo@digest` with `key` (cosign's payload naming `signed`, normally `digest` itself)
/// and push the signature under `digest`'s signature tag, as `ctl sign` does.
pub async fn push_signature(
    r: &skiff_ctl::registry::HttpRegistry,
    repo: &str,
    digest: &skiff_release::Digest,
    signed: &skiff_release::Digest,
    key: &skiff_signature::FileKey,
) {
    let p = skiff_signature::payload(repo, signed);
    let sig = key.sign(&p);
    r.push_signature(repo, digest, p, &sig)
        .await
        .expect("push signature");
}
