//! Signed releases (`[trust]`) with the real agent, the real Docker engine and the real
//! registries: images pushed to :5000 and signed there in cosign's format (keys made by
//! OpenSSL), served anonymously by :5000 and, with moto's ECR token, by the ECR-shaped registry
//! (TLS, basic auth); keys from a PEM file or from the emulator's SSM. Counts come from the
//! agent's own `skiff_agent_signature_checks_total`, whose registry-read results (verified,
//! refused, unreachable) show that a refusal is not asked again in a loop.

mod support;

use std::path::Path;
use std::time::Duration;

use skiff_agent::trust::registry::RegistrySignatures;
use skiff_agent::trust::{CheckFailure, SignatureCheck};
use skiff_registry::HttpRegistry;
use skiff_release::{Digest, Release};
use skiff_signature::{FileKey, TrustedKey, payload};
use skiff_testkit::keys::openssl_key;
use support::{AWS_ENV, Agent, Fixture, MOTO, Moto, REGISTRY, http_get, remove_images, wait_for};

const LONG: Duration = Duration::from_secs(40);
const ECR_HOST: &str = "123456789012.dkr.ecr.us-east-1.amazonaws.com";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Sign `repo@digest` with `key` into the anonymous registry, as `ctl sign` does.
fn sign(repo: &str, digest: &str, key: &FileKey) {
    let d: Digest = digest.parse().expect("digest");
    let p = payload(repo, &d);
    let sig = key.sign(&p);
    let r = HttpRegistry::new(None).expect("client");
    rt().block_on(r.push_signature(repo, &d, p, &sig))
        .expect("push signature");
}

fn pinned(tag: &str, digest: &str) -> String {
    Release::new(
        tag.parse().expect("tag"),
        Some(digest.parse().expect("digest")),
    )
    .to_value()
}

fn write_keys(path: &Path, keys: &[&TrustedKey]) {
    let text: String = keys.iter().map(|k| k.to_pem()).collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("keys");
    std::fs::rename(&tmp, path).expect("keys");
}

/// `skiff_agent_signature_checks_total{result}` of the agent on `fx`.
fn checks(fx: &Fixture, result: &str) -> u64 {
    let (_, body) = http_get(&fx.health_addr(), "/metrics").expect("metrics");
    let series = format!("skiff_agent_signature_checks_total{{result=\"{result}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {body}"))
}

/// Registry reads so far (each verification that asked the registry).
fn registry_reads(fx: &Fixture) -> u64 {
    ["verified", "refused", "unreachable"]
        .iter()
        .map(|r| checks(fx, r))
        .sum()
}

fn serving(fx: &Fixture) -> String {
    fx.healthz()
        .filter(|(code, _)| *code == 200)
        .map(|(_, b)| b["tag"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

#[test]
fn file_keys_signed_runs_unsigned_and_untrusted_refused_once_rotation_and_adoption() {
    let mut fx = Fixture::new("trust");
    let (k1, k2) = (openssl_key(), openssl_key());
    let repo = fx.repo.clone();
    let d1 = fx.image("v1", true);
    let d2 = fx.image("v2", true);
    let d3 = fx.image("v3", true);
    let d4 = fx.image("v4", true);
    sign(&repo, &d1, &k1);
    sign(&repo, &d3, &k2);
    sign(&repo, &d4, &k2);
    let keys = fx.dir.path().join("trusted.pem");
    write_keys(&keys, &[&k1.public()]);
    let state = fx.dir.path().join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let config = fx.write_config(&format!(
        "{}[trust]\nkeys_file = \"{}\"\n",
        fx.file_config("follow", ""),
        keys.display()
    ));
    let env = [("STATE_DIRECTORY", state.to_str().expect("utf-8"))];
    fx.set_release(&pinned("v1", &d1));
    let mut agent = Agent::start(&config, &env);
    fx.wait_healthy("v1", LONG);
    assert_eq!(checks(&fx, "verified"), 1);

    // The release written directly to an unsigned digest: refused, v1 serves, asked once.
    fx.set_release(&pinned("v2", &d2));
    wait_for(
        LONG,
        "v2 refused",
        || checks(&fx, "refused") == 1,
        || agent.logs(),
    );
    std::thread::sleep(Duration::from_secs(3)); // 15 polls and turns
    assert_eq!(registry_reads(&fx), 2, "no retry loop");
    assert_eq!(serving(&fx), "v1");
    let status = fx.status();
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(&d2) && e.contains("no signature")),
        "{status:#}"
    );
    let logs = agent.logs();
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains(&d2)).collect();
    assert!(
        lines.iter().any(|l| l.contains(&k1.public().id())),
        "a log line names the digest and the key ids: {lines:#?}"
    );

    // Signed by a key not trusted: refused.
    fx.set_release(&pinned("v3", &d3));
    wait_for(
        LONG,
        "v3 refused",
        || checks(&fx, "refused") == 2,
        || agent.logs(),
    );
    assert_eq!(serving(&fx), "v1");
    assert!(agent.logs().contains("is not by a trusted key"));

    // Rotation: both keys trusted (no restart): v3 is checked again and goes out.
    write_keys(&keys, &[&k1.public(), &k2.public()]);
    fx.wait_healthy("v3", LONG);
    // The old key removed: a release signed by the new key goes out, nothing fails.
    write_keys(&keys, &[&k2.public()]);
    fx.set_release(&pinned("v4", &d4));
    fx.wait_healthy("v4", LONG);
    assert_eq!(checks(&fx, "refused"), 2, "nothing failed in the rotation");
    agent.sigterm();

    // A restart adopts v4 from the record: no registry read.
    let mut agent = Agent::start(&config, &env);
    fx.wait_healthy("v4", LONG);
    assert_eq!(registry_reads(&fx), 0);
    assert!(checks(&fx, "verified_recalled") >= 1);
    agent.sigterm();

    // Without the record (an agent that never verified what runs): verified at adoption.
    std::fs::remove_file(state.join(format!("verified-{}.json", fx.id))).expect("record");
    let mut agent = Agent::start(&config, &env);
    fx.wait_healthy("v4", LONG);
    wait_for(
        LONG,
        "the adopted v4 verified",
        || checks(&fx, "verified") >= 1,
        || agent.logs(),
    );
    assert_eq!(checks(&fx, "refused"), 0);
    agent.sigterm();
}

/// The agent on an ECR image (pulled and verified with moto's token through the ECR-shaped
/// registry), its keys in the emulator's SSM: the parameter written directly to an unsigned
/// digest leaves the host on its release, asked once; an unreadable key parameter refuses.
#[test]
fn ssm_keys_and_an_ecr_registry() {
    let moto = Moto::connect();
    let mut fx = Fixture::new("trust-ecr");
    let key = openssl_key();
    let path = fx
        .repo
        .split_once('/')
        .map(|(_, p)| p.to_owned())
        .expect("path");
    let ecr_repo = format!("{ECR_HOST}/{path}");
    let d1 = fx.registry_only(&fx.repo.clone(), "v1");
    let d2 = fx.registry_only(&fx.repo.clone(), "v2");
    let d3 = fx.registry_only(&fx.repo.clone(), "v3");
    sign(&fx.repo, &d1, &key);
    sign(&fx.repo, &d3, &key);
    let base = format!("/{}", fx.id);
    let (release, keys) = (format!("{base}/release"), format!("{base}/trusted-keys"));
    moto.put(&release, &pinned("v1", &d1), false);
    moto.put(&keys, &key.public().to_pem(), false);
    let state = fx.dir.path().join("state");
    let config = fx.write_config(&format!(
        r#"[app]
name = "{id}"
image = "{ecr_repo}"
port = {app_port}
start_timeout = "10s"
stop_timeout = "2s"
[release]
source = "ssm"
parameter = "{release}"
poll_interval = "300ms"
update = "follow"
drain = "200ms"
[health]
listen = "127.0.0.1:{health_port}"
interval = "200ms"
[aws]
region = "us-east-1"
lifecycle_hook = "none"
terminate_hook = "none"
[trust]
keys_parameter = "{keys}"
"#,
        id = fx.id,
        app_port = fx.app_port,
        health_port = fx.health_port,
    ));
    let mut env = AWS_ENV.to_vec();
    env.push(("AWS_ENDPOINT_URL", MOTO));
    let state_env = state.display().to_string();
    env.push(("STATE_DIRECTORY", &state_env));
    let mut agent = Agent::start(&config, &env);
    fx.wait_healthy("v1", LONG);
    assert_eq!(checks(&fx, "verified"), 1);

    moto.put(&release, &pinned("v2", &d2), false);
    wait_for(
        LONG,
        "v2 refused",
        || checks(&fx, "refused") == 1,
        || agent.logs(),
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(registry_reads(&fx), 2, "no retry loop");
    assert_eq!(serving(&fx), "v1");

    // The key parameter no longer holds a key: every new release is refused, v1 serves.
    moto.put(&keys, "none", false);
    moto.put(&release, &pinned("v3", &d3), false);
    wait_for(
        LONG,
        "v3 refused for want of keys",
        || checks(&fx, "keys_unreadable") >= 1,
        || agent.logs(),
    );
    assert_eq!(serving(&fx), "v1");
    // Fixed: the keys changed, v3 is checked and goes out.
    moto.put(&keys, &key.public().to_pem(), false);
    fx.wait_healthy("v3", LONG);
    agent.sigterm();
    let logs = agent.logs();
    assert!(logs.contains("signature checks on"), "{logs}");
    moto.delete_path(&base);
    remove_images(&ecr_repo);
}

/// The adapter alone against the ECR-shaped registry: with the token it verifies and refuses
/// as on :5000; without credentials the registry cannot serve the signatures, which is a
/// refusal naming why, never a pass.
#[test]
fn the_registry_check_on_the_ecr_shaped_registry() {
    let _emulator = Moto::connect();
    let mut fx = Fixture::new("trust-adapter");
    let key = openssl_key();
    let path = fx
        .repo
        .split_once('/')
        .map(|(_, p)| p.to_owned())
        .expect("path");
    let ecr_repo = format!("{ECR_HOST}/{path}");
    let signed = fx.registry_only(&fx.repo.clone(), "v1");
    let unsigned = fx.registry_only(&fx.repo.clone(), "v2");
    sign(&fx.repo, &signed, &key);
    let rt = rt();
    let ecr = aws_sdk_ecr::Client::new(&rt.block_on(support::sdk_at(MOTO)));
    let token = rt
        .block_on(ecr.get_authorization_token().send())
        .expect("token");
    let token = token.authorization_data()[0]
        .authorization_token()
        .expect("token")
        .to_owned();
    let creds = skiff_registry::decode_ecr_token(&token).expect("decode");
    let auth = skiff_agent::runtime::RegistryAuth {
        username: creds.user,
        password: creds.password,
    };
    let check = RegistrySignatures::default();
    let keys = [key.public()];
    let d = |s: &str| -> Digest { s.parse().expect("digest") };
    let (ds, du) = (d(&signed), d(&unsigned));
    let got = rt.block_on(check.check(&ecr_repo, &ds, &keys, Some(&auth)));
    assert_eq!(got, Ok(key.public().id()));
    match rt.block_on(check.check(&ecr_repo, &du, &keys, Some(&auth))) {
        Err(CheckFailure::Refused(why)) => assert!(why.contains("no signature"), "{why}"),
        other => panic!("{other:?}"),
    }
    let other = [openssl_key().public()];
    match rt.block_on(check.check(&ecr_repo, &ds, &other, Some(&auth))) {
        Err(CheckFailure::Refused(why)) => assert!(why.contains("not by a trusted key"), "{why}"),
        other => panic!("{other:?}"),
    }
    match rt.block_on(check.check(&ecr_repo, &ds, &keys, None)) {
        Err(CheckFailure::Refused(why)) => {
            assert!(why.contains("cannot serve the signatures"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    // The anonymous registry, and one nobody listens on (retryable).
    let anon = rt.block_on(check.check(&fx.repo, &ds, &keys, None));
    assert_eq!(anon, Ok(key.public().id()));
    let away = rt.block_on(check.check("127.0.0.1:9/nobody/app", &ds, &keys, None));
    assert!(
        matches!(away, Err(CheckFailure::Unreachable(_))),
        "{away:?}"
    );
    assert!(REGISTRY.starts_with("127.0.0.1"));
}

/// The real agent on a fleet host (SSM and EC2 in moto, the metadata stand-in serving the live
/// tags): a `skiff:pull` and a `skiff:target` of an unsigned digest are answered `skiff:failed`
/// with nothing pulled or created, and the host stays on its release; a signed target goes out.
#[test]
fn in_place_instructions_of_an_unsigned_digest_are_answered_failed() {
    use skiff_release::instance_tags::{FAILED, PULL, RELEASE, TARGET};
    use skiff_testkit::imds::{Imds, Tags};
    let moto = Moto::connect();
    let mut fx = Fixture::new("trust-fleet");
    let key = openssl_key();
    let repo = fx.repo.clone();
    let d1 = fx.image("v1", true);
    let d2 = fx.image("v2", true);
    let d3 = fx.image("v3", true);
    sign(&repo, &d1, &key);
    sign(&repo, &d3, &key);
    let keys = fx.dir.path().join("trusted.pem");
    write_keys(&keys, &[&key.public()]);
    let instance = moto.run_instance();
    let parameter = format!("/{}/release", fx.id);
    moto.put(&parameter, &pinned("v1", &d1), false);
    let imds = Imds::on_thread(&instance, Some("skiff-it-group"), Tags::Ec2(MOTO.into()));
    let config = fx.write_config(&format!(
        r#"[app]
name = "{id}"
image = "{repo}"
port = {app_port}
health_path = "/health"
start_timeout = "4s"
stop_timeout = "2s"
[release]
source = "ssm"
parameter = "{parameter}"
poll_interval = "300ms"
drain = "300ms"
[health]
listen = "127.0.0.1:{health_port}"
interval = "200ms"
[aws]
region = "us-east-1"
[trust]
keys_file = "{keys}"
"#,
        id = fx.id,
        app_port = fx.app_port,
        health_port = fx.health_port,
        keys = keys.display(),
    ));
    let state = fx.dir.path().join("state");
    let state_env = state.display().to_string();
    let mut env = AWS_ENV.to_vec();
    env.push(("AWS_ENDPOINT_URL", MOTO));
    env.push(("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url.as_str()));
    env.push(("STATE_DIRECTORY", &state_env));
    let agent = Agent::start(&config, &env);
    let tag_is =
        |key: &str, value: &str| moto.tags(&instance).get(key).map(String::as_str) == Some(value);
    let context = || {
        format!(
            "{:#}\ntags {:?}\n{}",
            fx.status_or_null(),
            moto.tags(&instance),
            agent.logs()
        )
    };
    let unsigned = format!("v2@{d2}");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        fx.wait_healthy("v1", LONG);
        wait_for(LONG, "skiff:release=v1", || tag_is(RELEASE, "v1"), context);
        moto.tag(&instance, PULL, &unsigned);
        wait_for(
            LONG,
            "skiff:failed for the pull",
            || tag_is(FAILED, &unsigned),
            context,
        );
        moto.tag(&instance, TARGET, &unsigned);
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(fx.containers().len(), 1, "{}", context());
        assert_eq!(serving(&fx), "v1");
        assert_eq!(registry_reads(&fx), 2, "v1 and v2 once each: {}", context());
        // A signed target: pulled, switched, answered.
        moto.tag(&instance, TARGET, &format!("v3@{d3}"));
        fx.wait_healthy("v3", LONG);
        wait_for(LONG, "skiff:release=v3", || tag_is(RELEASE, "v3"), context);
    }));
    drop(agent);
    moto.terminate(&instance);
    moto.delete_path(&format!("/{}", fx.id));
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
