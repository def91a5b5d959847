//! Host hygiene against the real Docker engine: the app container's logs are rotated, and old
//! images of the app's repository are pruned once a release is healthy, never the current or
//! previous release's, never an image a container uses, never another repository's.

mod support;

use std::process::Command;
use std::time::Duration;

use support::{Agent, Fixture, docker, wait_for};

const LONG: Duration = Duration::from_secs(60);

fn log_config(container: &str) -> String {
    docker(&[
        "inspect",
        "-f",
        "{{.HostConfig.LogConfig.Type}} {{index .HostConfig.LogConfig.Config \"max-size\"}} {{index .HostConfig.LogConfig.Config \"max-file\"}}",
        container,
    ])
}

/// Tags whose images no other test builds: images of equal content share one id across
/// repositories, and another test's container on "v1" would make that image in use.
fn tags(fx: &Fixture, n: usize) -> Vec<String> {
    let nonce = fx.id.rsplit('-').next().unwrap_or_default().to_owned();
    (0..n).map(|i| format!("r{i}-{nonce}")).collect()
}

fn present(reference: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", reference])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A container this test makes outside the agent, removed on drop.
struct Foreign(String);

impl Drop for Foreign {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

#[test]
fn the_app_container_gets_the_configured_log_rotation() {
    let mut fx = Fixture::new("logs");
    fx.image("v1", true);
    fx.set_release("v1");
    let config = fx.write_config(&fx.file_config(
        "boot",
        "log_driver = \"json-file\"\nlog_max_size = \"1m\"\nlog_max_files = 3",
    ));
    let _agent = Agent::start(&config, &[]);
    fx.wait_healthy("v1", LONG);
    assert_eq!(log_config(&fx.running_container()), "json-file 1m 3");
}

#[test]
fn old_images_of_the_app_are_pruned_after_a_healthy_release_and_nothing_else() {
    let mut fx = Fixture::new("prune");
    let t = tags(&fx, 5);
    for tag in &t {
        fx.image(tag, true);
    }
    let other_repo = format!("{}/{}/other", support::REGISTRY, fx.id);
    let other_tag = format!("other-{}", t[0]);
    fx.image_in(&other_repo, &other_tag, true);
    let other = format!("{other_repo}:{other_tag}");
    let at = |i: usize| format!("{}:{}", fx.repo, t[i]);
    // r0 is used by a (stopped) container the agent does not manage.
    let foreign = Foreign(support::unique("prune-user"));
    docker(&["create", "--name", &foreign.0, &at(0)]);

    fx.set_release(&t[1]);
    let config = fx.write_config(&fx.file_config("follow", ""));
    let agent = Agent::start(&config, &[]);
    fx.wait_healthy(&t[1], LONG);
    // Default rotation: Docker's `local` driver, 5 files of 20 MB.
    assert_eq!(log_config(&fx.running_container()), "local 20m 5");
    let context = || {
        format!(
            "{}\ncontainers: {}\nimages: {}",
            agent.logs(),
            docker(&[
                "ps",
                "-a",
                "--no-trunc",
                "--format",
                "{{.Names}} {{.Image}} {{.State}}"
            ]),
            docker(&["images", "--digests", "--no-trunc", &fx.repo])
        )
    };
    // Healthy on r1, nothing before it: r2, r3, r4 go; r1 stays; r0 is in use.
    wait_for(
        LONG,
        "r2..r4 pruned",
        || !present(&at(2)) && !present(&at(3)) && !present(&at(4)),
        context,
    );
    assert!(
        present(&at(1)) && present(&at(0)) && present(&other),
        "{}",
        context()
    );

    // r2 and r3 come back from the registry when released.
    fx.set_release(&t[2]);
    fx.wait_healthy(&t[2], LONG);
    assert!(present(&at(1)), "the previous release stays\n{}", context());
    fx.set_release(&t[3]);
    fx.wait_healthy(&t[3], LONG);
    wait_for(
        LONG,
        "r1 pruned once two releases followed it",
        || !present(&at(1)),
        context,
    );
    for kept in [at(3), at(2), at(0), other.clone()] {
        assert!(present(&kept), "{kept} must stay\n{}", context());
    }
    assert_eq!(fx.healthz().expect("healthz").0, 200);
    assert!(
        agent.logs().contains("removed old images of the app"),
        "{}",
        agent.logs()
    );
    // The previous release's container is still there for a rollback, on its image.
    let status = fx.status();
    assert_eq!(status["previous"]["tag"], t[2].as_str(), "{status:#}");
    drop(foreign);
}

#[tokio::test]
async fn the_engine_adapter_prunes_what_the_decision_names() {
    use skiff_agent::runtime::ContainerRuntime;
    let mut fx = Fixture::new("prune-adapter");
    let t = tags(&fx, 3);
    for tag in &t {
        fx.image(tag, true);
    }
    let at = |i: usize| format!("{}:{}", fx.repo, t[i]);
    let runtime = skiff_agent::docker::DockerRuntime::connect().expect("docker");
    let release = |i: usize| skiff_release::Release::new(t[i].parse().expect("tag"), None);
    let (r1, r2) = (release(1), release(2));
    let removed = runtime
        .prune_images(&fx.repo, &[&r2, &r1])
        .await
        .expect("prune");
    assert!(removed.contains(&at(0)), "{removed:?}");
    assert!(!present(&at(0)));
    assert!(present(&at(1)) && present(&at(2)));
}
