//! The loop with signature checks on (`[trust]`), over the fake engine and the trust fakes:
//! nothing is created or pulled from a refused digest, whatever asked for it (a target, a
//! pull, the parameter); the refusal is reported once and not asked again until the keys
//! change; a rotation goes through without a failure; adoption verifies what it takes over.
//! The swap tests run in real time against [`serve_app`], as the rollout tests do.

use std::sync::Arc;
use std::time::Duration;

use skiff_release::Release;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

use super::Supervisor;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::runtime::ContainerState;
use crate::supervise::fakes::{FakeRuntime, RecordingFleet, running, serve_app, source, until};
use crate::trust::Trust;
use crate::trust::fakes::{FakeKeys, FakeSignatures, openssl_key};

fn pinned(tag: &str, n: char) -> Release {
    skiff_release::instance_tags::decode(&format!("{tag}@sha256:{}", n.to_string().repeat(64)))
        .expect("release")
}

fn adopted(release: &Release, running_now: bool) -> ContainerState {
    let mut c = running(release.tag.as_str());
    c.release = release.clone();
    c.running = running_now;
    c
}

/// The app on `port`, polled every second, a short drain and gate.
fn config(port: u16) -> Arc<Config> {
    Arc::new(
        Config::parse(&format!(
            "[app]\nname='t'\nimage='r/app'\nport={port}\nhealth_path='/health'\nstart_timeout='1s'\n[release]\nsource='file'\npoll_interval='1s'\nupdate='boot'\ndrain='200ms'\n[health]\nlisten='127.0.0.1:2'\n"
        ))
        .expect("config"),
    )
}

fn serving(state: &tokio::sync::watch::Sender<crate::state::Snapshot>) -> Option<String> {
    let s = state.borrow();
    s.running
        .as_ref()
        .filter(|r| r.container_running && s.app.ok && !s.draining)
        .map(|r| r.release.to_string())
}

#[tokio::test]
async fn a_refused_target_creates_nothing_is_reported_once_and_a_rotation_lets_it_through() {
    let (k1, k2) = (openssl_key().public(), openssl_key().public());
    let (v1, v2, v3) = (pinned("v1", '1'), pinned("v2", '2'), pinned("v3", '3'));
    let keys = FakeKeys::of(&[&k1]);
    let sigs = FakeSignatures::default();
    sigs.sign(v1.digest_str().expect("pinned"), &k1);
    let runtime = FakeRuntime::default();
    runtime.world().containers.push(adopted(&v1, true));
    let port = serve_app(runtime.clone()).await;
    let fleet = RecordingFleet::coordinated();
    let metrics = Arc::new(Metrics::new());
    let trust = Arc::new(Trust::new(keys.clone(), sigs.clone(), None));
    let sup = Supervisor::new(
        config(port),
        runtime.clone(),
        source(&v1.to_value(), &v1.to_value()),
        fleet.clone(),
    )
    .with_metrics(metrics.clone())
    .with_trust(trust);
    let state = sup.state();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(sup.run(cancel.clone()));
    until(Duration::from_secs(5), "v1 adopted and healthy", || {
        fleet.healthy_tags() == ["v1"]
    })
    .await;
    assert_eq!(sigs.checks(), 1, "the adopted digest verified once");

    // The target names an unsigned digest: refused before anything is pulled or created.
    fleet.instructions.lock().expect("lock").target = Some(v2.clone());
    until(Duration::from_secs(5), "v2 reported failed", || {
        fleet.failed_values() == [v2.to_string()]
    })
    .await;
    sleep(Duration::from_secs(4)).await;
    assert_eq!(sigs.checks(), 2, "asked once over four turns and polls");
    assert_eq!(fleet.failed_values(), [v2.to_string()], "reported once");
    {
        let w = runtime.world();
        assert!(w.pulls.is_empty(), "nothing pulled: {w:?}");
        assert_eq!(w.containers.len(), 1, "nothing created: {w:?}");
    }
    assert_eq!(serving(&state), Some(v1.to_string()), "v1 keeps serving");
    let error = state.borrow().last_error.clone().unwrap_or_default();
    assert!(
        error.contains(v2.digest_str().expect("pinned")) && error.contains(&k1.id()),
        "{error}"
    );
    let text = metrics.encode(&state.borrow(), str::to_owned);
    assert!(
        text.contains("skiff_agent_signature_checks_total{result=\"refused\"} 1\n"),
        "{text}"
    );

    // Rotation: v2 is signed by a new key, then both keys are trusted: checked again, swapped,
    // and the failure withdrawn.
    sigs.sign(v2.digest_str().expect("pinned"), &k2);
    keys.trust(&[&k1, &k2]);
    until(Duration::from_secs(10), "v2 serving", || {
        serving(&state) == Some(v2.to_string()) && fleet.healthy_tags() == ["v1", "v2"]
    })
    .await;
    assert_eq!(fleet.failed_values(), [v2.to_string(), String::new()]);

    // The old key removed: a release signed by the new one goes out, nothing fails.
    keys.trust(&[&k2]);
    sigs.sign(v3.digest_str().expect("pinned"), &k2);
    fleet.instructions.lock().expect("lock").target = Some(v3.clone());
    until(Duration::from_secs(10), "v3 serving", || {
        serving(&state) == Some(v3.to_string())
    })
    .await;
    cancel.cancel();
    task.await.expect("join");
    assert_eq!(fleet.failed_values(), [v2.to_string(), String::new()]);
    assert_eq!(fleet.healthy_tags(), ["v1", "v2", "v3"]);
    assert_eq!(sigs.checks(), 4, "adoption, refusal, v2 again, v3");
}

#[tokio::test(start_paused = true)]
async fn a_pull_of_an_unsigned_digest_pulls_nothing_and_is_reported_failed() {
    let k1 = openssl_key().public();
    let (v1, v2) = (pinned("v1", '1'), pinned("v2", '2'));
    let sigs = FakeSignatures::default();
    sigs.sign(v1.digest_str().expect("pinned"), &k1);
    let runtime = FakeRuntime::default();
    runtime.world().containers.push(adopted(&v1, true));
    let fleet = RecordingFleet::coordinated();
    fleet.instructions.lock().expect("lock").pull = Some(v2.clone());
    let trust = Arc::new(Trust::new(FakeKeys::of(&[&k1]), sigs.clone(), None));
    let sup = Supervisor::new(
        config(1),
        runtime.clone(),
        source(&v1.to_value(), &v1.to_value()),
        fleet.clone(),
    )
    .with_trust(trust);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(sup.run(cancel.clone()));
    sleep(Duration::from_secs(20)).await;
    cancel.cancel();
    task.await.expect("join");
    assert_eq!(fleet.failed_values(), [v2.to_string()]);
    assert!(fleet.pulled_values().is_empty());
    assert!(runtime.world().pulls.is_empty());
    assert_eq!(sigs.checks(), 2, "adoption and the pull, once each");
}

/// Adoption of containers this host never verified: a refused one that runs keeps serving
/// but is never started again; a refused stopped one is not the rollback target.
#[tokio::test(start_paused = true)]
async fn adoption_verifies_what_it_takes_over() {
    let k1 = openssl_key().public();
    let (v1, v0, v9) = (pinned("v1", '1'), pinned("v0", '0'), pinned("v9", '9'));
    let sigs = FakeSignatures::default();
    sigs.sign(v1.digest_str().expect("pinned"), &k1);
    let runtime = FakeRuntime::default();
    {
        let mut w = runtime.world();
        w.containers.push(adopted(&v9, true));
        let mut old = adopted(&v0, false);
        old.id = "old".into();
        old.created = 0;
        w.containers.push(old);
    }
    let trust = Arc::new(Trust::new(FakeKeys::of(&[&k1]), sigs.clone(), None));
    let mut sup = Supervisor::new(
        config(1),
        runtime.clone(),
        source(&v1.to_value(), &v1.to_value()),
        RecordingFleet::default(),
    )
    .with_trust(trust);
    assert!(sup.adopt().await);
    assert_eq!(sup.current.as_ref().map(|c| c.id.as_str()), Some("adopted"));
    assert!(
        sup.previous.is_none(),
        "the refused stopped container is no rollback target"
    );
    let error = sup.state().borrow().last_error.clone().unwrap_or_default();
    assert!(error.contains("adopted container"), "{error}");
    assert_eq!(sigs.checks(), 2);

    // It exits: not started again; the desired (signed) release is deployed instead.
    runtime.world().containers[0].running = false;
    let cancel = CancellationToken::new();
    let task = tokio::spawn(sup.run(cancel.clone()));
    sleep(Duration::from_secs(5)).await;
    cancel.cancel();
    task.await.expect("join");
    let w = runtime.world();
    assert!(
        !w.started_ids
            .iter()
            .any(|id| id == "adopted" || id == "old"),
        "{w:?}"
    );
    assert_eq!(
        w.pulls.first().map(String::as_str),
        Some(v1.image_ref("r/app").as_str())
    );
}

/// A new instance whose release is refused has nothing to run: it gives up its launch at
/// once (as a failed start does) instead of holding it until the lifecycle hook times out,
/// and does so once.
#[tokio::test(start_paused = true)]
async fn a_boot_release_refused_for_its_signature_gives_up_the_launch_once() {
    let k1 = openssl_key().public();
    let v2 = pinned("v2", '2');
    let sigs = FakeSignatures::default();
    let runtime = FakeRuntime::default();
    let fleet = RecordingFleet::coordinated();
    let trust = Arc::new(Trust::new(FakeKeys::of(&[&k1]), sigs.clone(), None));
    let sup = Supervisor::new(
        config(1),
        runtime.clone(),
        source(&v2.to_value(), &v2.to_value()),
        fleet.clone(),
    )
    .with_trust(trust);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(sup.run(cancel.clone()));
    sleep(Duration::from_secs(20)).await;
    cancel.cancel();
    task.await.expect("join");
    assert_eq!(
        *fleet.failed.lock().expect("lock"),
        ["v2"],
        "launch given up once"
    );
    assert!(fleet.healthy_tags().is_empty());
    let w = runtime.world();
    assert!(w.pulls.is_empty() && w.containers.is_empty(), "{w:?}");
    assert_eq!(sigs.checks(), 1, "checked once, not in a loop");
}
