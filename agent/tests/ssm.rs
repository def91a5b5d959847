//! The agent with its SSM source against the moto emulator, the real Docker engine and the real
//! local registry: secrets from a SecureString path, and fail-static when SSM and the registry
//! become unreachable.

mod support;

use std::time::Duration;

use support::{AWS_ENV, Agent, Fixture, MOTO, Moto, Proxy, REGISTRY, docker, wait_for};

const LONG: Duration = Duration::from_secs(40);

fn ssm_config(fx: &Fixture, repo: &str, parameter: &str, env_path: &str, update: &str) -> String {
    format!(
        r#"[app]
name = "{id}"
image = "{repo}"
port = {app_port}
start_timeout = "5s"
stop_timeout = "2s"
env = {{ GREETING = "hello" }}
env_path = "{env_path}"
[release]
source = "ssm"
parameter = "{parameter}"
poll_interval = "300ms"
update = "{update}"
drain = "500ms"
[health]
listen = "127.0.0.1:{health_port}"
interval = "200ms"
[aws]
region = "us-east-1"
"#,
        id = fx.id,
        app_port = fx.app_port,
        health_port = fx.health_port,
    )
}

#[test]
fn env_from_a_secure_string_path_reaches_the_container_and_never_the_logs_or_status() {
    let moto = Moto::connect();
    let mut fx = Fixture::new("secrets");
    fx.image("v1", true);
    let base = format!("/{}", fx.id);
    let secret = format!("pw-{}-do-not-leak", fx.id);
    moto.put(&format!("{base}/release"), "v1", false);
    moto.put(&format!("{base}/env/DB_PASSWORD"), &secret, true);
    moto.put(&format!("{base}/env/FEATURE"), "on", false);

    let repo = fx.repo.clone();
    let config = fx.write_config(&ssm_config(
        &fx,
        &repo,
        &format!("{base}/release"),
        &format!("{base}/env/"),
        "boot",
    ));
    let mut env = AWS_ENV.to_vec();
    env.push(("AWS_ENDPOINT_URL", MOTO));
    let mut agent = Agent::start(&config, &env);
    fx.wait_healthy("v1", LONG);

    let id = fx.running_container();
    let container_env = docker(&["exec", &id, "env"]);
    assert!(
        container_env.contains(&format!("DB_PASSWORD={secret}")),
        "{container_env}"
    );
    assert!(container_env.contains("FEATURE=on"));
    assert!(container_env.contains("GREETING=hello"));
    assert!(container_env.contains("SKIFF_RELEASE_TAG=v1"));

    let status = fx.status().to_string();
    agent.sigterm();
    let logs = agent.logs();
    assert!(!status.contains(&secret), "secret in /status: {status}");
    assert!(!logs.contains(&secret), "secret in logs");
    assert!(logs.contains("release is healthy"), "{logs}");
    moto.delete_path(&base);
}

#[test]
fn ssm_and_registry_unreachable_keep_the_current_release_serving() {
    let moto = Moto::connect();
    let mut fx = Fixture::new("static");
    // The agent reaches SSM and the registry through proxies the test can cut.
    let ssm_proxy = Proxy::start("127.0.0.1:5055");
    let reg_proxy = Proxy::start(REGISTRY);
    let repo = format!("127.0.0.1:{}/{}/app", reg_proxy.port, fx.id);
    fx.image_in(&repo, "v1", true);
    fx.registry_only(&repo, "v2");
    let base = format!("/{}", fx.id);
    let parameter = format!("{base}/release");
    moto.put(&parameter, "v1", false);
    moto.put(&format!("{base}/env/X"), "1", false);

    let config = fx.write_config(&ssm_config(
        &fx,
        &repo,
        &parameter,
        &format!("{base}/env/"),
        "follow",
    ));
    let endpoint = format!("http://127.0.0.1:{}", ssm_proxy.port);
    let mut env = AWS_ENV.to_vec();
    env.push(("AWS_ENDPOINT_URL", endpoint.as_str()));
    let agent = Agent::start(&config, &env);
    fx.wait_healthy("v1", LONG);
    let id = fx.running_container();

    // SSM away: the host stays healthy on v1 and reports the error.
    ssm_proxy.set_up(false);
    wait_for(
        LONG,
        "ssm error reported",
        || {
            fx.status()["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("unreachable"))
        },
        || fx.status().to_string(),
    );
    for _ in 0..20 {
        assert_eq!(fx.healthz().expect("healthz").0, 200, "{}", fx.status());
        std::thread::sleep(Duration::from_millis(100));
    }

    // SSM back, registry away: v2 cannot be pulled; v1 keeps serving.
    reg_proxy.set_up(false);
    moto.put(&parameter, "v2", false);
    ssm_proxy.set_up(true);
    wait_for(
        LONG,
        "pull error reported",
        || {
            fx.status()["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("v2"))
        },
        || format!("{}\n{}", fx.status(), agent.logs()),
    );
    for _ in 0..20 {
        let (code, body) = fx.healthz().expect("healthz");
        assert_eq!((code, body["tag"].as_str()), (200, Some("v1")));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(fx.running_container(), id);

    // Registry back: the update goes through.
    reg_proxy.set_up(true);
    fx.wait_healthy("v2", Duration::from_secs(90));
    assert_eq!(fx.status()["previous"]["tag"], "v1");
    moto.delete_path(&base);
}

#[test]
fn registry_password_from_a_secure_string_parameter() {
    let moto = Moto::connect();
    let mut fx = Fixture::new("regpw");
    let repo = fx.private_image("v1");
    let base = format!("/{}", fx.id);
    moto.put(&format!("{base}/release"), "v1", false);
    moto.put(&format!("{base}/env/X"), "1", false);
    moto.put(
        &format!("{base}/registry-password"),
        support::PRIVATE_PASSWORD,
        true,
    );

    let config = ssm_config(
        &fx,
        &repo,
        &format!("{base}/release"),
        &format!("{base}/env/"),
        "boot",
    ) + &format!(
        "[registry]\nusername = \"skiff\"\npassword_parameter = \"{base}/registry-password\"\n"
    );
    let config = fx.write_config(&config);
    let mut env = AWS_ENV.to_vec();
    env.push(("AWS_ENDPOINT_URL", MOTO));
    let mut agent = Agent::start(&config, &env);
    fx.wait_healthy("v1", LONG);
    agent.sigterm();
    assert!(
        !agent.logs().contains(support::PRIVATE_PASSWORD),
        "the password is never logged"
    );
    moto.delete_path(&base);
}
