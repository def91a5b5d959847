//! Test doubles for the loop's orchestration tests: an engine that keeps containers in memory
//! (and can be told to fail a stop, a pull, or crash on start), an app on loopback whose health
//! follows that engine's running containers, a source that answers one value then another, and
//! a fleet that records what it was told and hands out the instructions a test sets.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use skiff_release::Release;
use tokio::time::{Instant, sleep};

use crate::config::Config;
use crate::fleet::{Answers, Fleet, Instructions};
use crate::runtime::{
    ContainerRuntime, ContainerSpec, ContainerState, LocalImage, RegistryAuth, RuntimeError,
};
use crate::source::{ReleaseSource, SourceError};

#[derive(Debug, Default)]
pub(super) struct World {
    pub(super) containers: Vec<ContainerState>,
    /// Instants at which `start` was called.
    pub(super) starts: Vec<Instant>,
    pub(super) stops: u32,
    pub(super) removes: u32,
    /// Started containers exit at once.
    pub(super) crash_on_start: bool,
    /// `stop` fails (the engine refuses or times out) and the container keeps running.
    pub(super) fail_stop: bool,
    /// `ensure_image` fails with a retryable error (registry away).
    pub(super) fail_pull: bool,
    /// `ensure_image` of these tags fails for good (a digest mismatch).
    pub(super) bad_images: Vec<String>,
    /// Running containers of these tags fail the app's health check (see [`serve_app`]).
    pub(super) unhealthy: Vec<String>,
    /// Image references passed to `ensure_image`, in order.
    pub(super) pulls: Vec<String>,
    /// Ids passed to `start`, in order.
    pub(super) started_ids: Vec<String>,
    /// Starts of a container on a port another running one held.
    pub(super) port_conflicts: u32,
    /// The slot listeners of running containers, by id (dropped when stopped or removed).
    pub(super) listeners: std::collections::HashMap<String, tokio::task::AbortHandle>,
}

#[derive(Debug, Clone, Default)]
pub(super) struct FakeRuntime(Arc<Mutex<World>>);

impl FakeRuntime {
    pub(super) fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.0.lock().expect("lock")
    }

    /// Container `id` listens on loopback `port` (false when the port is taken): answers its
    /// health path 200 while it runs and its tag is not in `unhealthy`.
    pub(super) fn listen(&self, id: &str, port: u16) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(std_listener) = std::net::TcpListener::bind(("127.0.0.1", port)) else {
            return false;
        };
        let _ = std_listener.set_nonblocking(true);
        let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
            return false;
        };
        let (runtime, id) = (self.clone(), id.to_owned());
        let task = tokio::spawn({
            let id = id.clone();
            async move {
                while let Ok((mut sock, _)) = listener.accept().await {
                    let mut buf = [0u8; 1024];
                    let _ = sock.read(&mut buf).await;
                    let ok = {
                        let w = runtime.world();
                        w.containers.iter().any(|c| {
                            c.id == id
                                && c.running
                                && !w.unhealthy.iter().any(|t| t == c.release.tag.as_str())
                        })
                    };
                    let status = if ok { "200 OK" } else { "503 Unavailable" };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                    let _ = sock.shutdown().await;
                }
            }
        });
        self.world().listeners.insert(id, task.abort_handle());
        true
    }
}

impl ContainerRuntime for FakeRuntime {
    async fn ensure_image(
        &self,
        repository: &str,
        release: &Release,
        _auth: Option<&RegistryAuth>,
    ) -> Result<LocalImage, RuntimeError> {
        let mut w = self.world();
        w.pulls.push(release.image_ref(repository));
        if w.fail_pull {
            return Err(RuntimeError::PullImage {
                image: repository.to_owned(),
                detail: "registry unreachable".into(),
            });
        }
        if w.bad_images.iter().any(|t| t == release.tag.as_str()) {
            return Err(RuntimeError::DigestMismatch {
                image: release.image_ref(repository),
                expected: "sha256:1111".into(),
                found: "sha256:2222".into(),
            });
        }
        Ok(LocalImage {
            reference: release.image_ref(repository),
            digest: None,
            from_cache: false,
        })
    }
    async fn list(&self, _app: &str) -> Result<Vec<ContainerState>, RuntimeError> {
        Ok(self.world().containers.clone())
    }
    async fn is_running(&self, id: &str) -> Result<Option<bool>, RuntimeError> {
        Ok(self
            .world()
            .containers
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.running))
    }
    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let mut w = self.world();
        let id = format!("c{}", w.containers.len());
        let release = crate::runtime::release_from_labels(&spec.labels).expect("labels");
        w.containers.push(ContainerState {
            id: id.clone(),
            name: spec.name.clone(),
            release,
            running: false,
            started: false,
            created: 0,
            slot: crate::runtime::slot_from_labels(&spec.labels),
        });
        Ok(id)
    }
    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let mut w = self.world();
        w.starts.push(Instant::now());
        w.started_ids.push(id.to_owned());
        // One listener per host port (host networking): a container whose port another
        // running one holds exits at once, as an app failing to bind does. A container on a
        // slot really listens there (see `listen`); the others share the app's port.
        let slot = w.containers.iter().find(|c| c.id == id).map(|c| c.slot);
        let taken = match slot {
            Some(Some(port)) => {
                drop(w);
                let bound = self.listen(id, port);
                w = self.world();
                !bound
            }
            _ => w
                .containers
                .iter()
                .any(|c| c.id != id && c.running && Some(c.slot) == slot),
        };
        if taken {
            w.port_conflicts += 1;
        }
        let crash = w.crash_on_start || taken;
        if let Some(c) = w.containers.iter_mut().find(|c| c.id == id) {
            c.running = !crash;
            c.started = true;
        }
        Ok(())
    }
    async fn stop(&self, id: &str, _grace: Duration) -> Result<(), RuntimeError> {
        let mut w = self.world();
        w.stops += 1;
        if w.fail_stop {
            return Err(RuntimeError::Container {
                op: "stop",
                target: id.to_owned(),
                detail: "timed out".into(),
            });
        }
        if let Some(c) = w.containers.iter_mut().find(|c| c.id == id) {
            c.running = false;
        }
        if let Some(l) = w.listeners.remove(id) {
            l.abort();
        }
        Ok(())
    }
    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let mut w = self.world();
        w.removes += 1;
        w.containers.retain(|c| c.id != id);
        if let Some(l) = w.listeners.remove(id) {
            l.abort();
        }
        Ok(())
    }
}

/// Answers the first read with `first`, then with `rest` forever.
#[derive(Debug)]
pub(super) struct FakeSource {
    pub(super) first: Result<String, SourceError>,
    pub(super) rest: Result<String, SourceError>,
    pub(super) reads: Mutex<u32>,
}

impl ReleaseSource for FakeSource {
    fn describe(&self) -> String {
        "fake".into()
    }
    async fn read_release(&self) -> Result<Release, SourceError> {
        let raw = {
            let mut n = self.reads.lock().expect("lock");
            *n += 1;
            if *n == 1 {
                self.first.clone()
            } else {
                self.rest.clone()
            }
        };
        crate::source::parse_release("fake".into(), raw?)
    }
    async fn read_env(&self, _path: &str) -> Result<Vec<(String, String)>, SourceError> {
        Ok(Vec::new())
    }
    async fn read_secret(&self, _name: &str) -> Result<String, SourceError> {
        Ok(String::new())
    }
}

pub(super) fn config(update: &str) -> Arc<Config> {
    Arc::new(
        Config::parse(&format!(
            "[app]\nname='t'\nimage='r/app'\nport=1\nstart_timeout='2s'\n[release]\nsource='file'\npoll_interval='10s'\nupdate='{update}'\n[health]\nlisten='127.0.0.1:2'\n"
        ))
        .expect("config"),
    )
}

pub(super) fn running(tag: &str) -> ContainerState {
    ContainerState {
        id: "adopted".into(),
        name: format!("t-{tag}"),
        release: Release::new(tag.parse().expect("tag"), None),
        running: true,
        started: true,
        created: 1,
        slot: None,
    }
}

/// A config whose app is on `port` (see [`serve_app`]), with a short drain and gate.
pub(super) fn config_at(update: &str, port: u16) -> Arc<Config> {
    Arc::new(
        Config::parse(&format!(
            "[app]\nname='t'\nimage='r/app'\nport={port}\nhealth_path='/health'\nstart_timeout='1s'\n[release]\nsource='file'\npoll_interval='10s'\nupdate='{update}'\ndrain='200ms'\n[health]\nlisten='127.0.0.1:2'\n"
        ))
        .expect("config"),
    )
}

/// The app on loopback: answers its health path 200 while `runtime` has a running container
/// whose tag is not in `unhealthy`, 503 otherwise. Returns the port.
pub(super) async fn serve_app(runtime: FakeRuntime) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = sock.read(&mut buf).await;
            let ok = {
                let w = runtime.world();
                w.containers
                    .iter()
                    .any(|c| c.running && !w.unhealthy.iter().any(|t| t == c.release.tag.as_str()))
            };
            let status = if ok { "200 OK" } else { "503 Unavailable" };
            let resp =
                format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        }
    });
    port
}

/// Records what the fleet was told; hands out the instructions a test sets. Coordinated (an
/// Auto Scaling group's instance) only when made with [`RecordingFleet::coordinated`].
#[derive(Debug, Default, Clone)]
pub(super) struct RecordingFleet {
    pub(super) healthy: Arc<Mutex<Vec<String>>>,
    pub(super) failed: Arc<Mutex<Vec<String>>>,
    pub(super) coordinated: bool,
    pub(super) instructions: Arc<Mutex<Instructions>>,
    /// What `answers` returns (the tags found at start).
    pub(super) answers: Arc<Mutex<Answers>>,
    /// Values answered `skiff:pulled` / `skiff:failed`, in order.
    pub(super) pulled: Arc<Mutex<Vec<String>>>,
    pub(super) failed_here: Arc<Mutex<Vec<String>>>,
    /// Reads of the instructions.
    pub(super) reads: Arc<Mutex<u32>>,
}

impl RecordingFleet {
    pub(super) fn coordinated() -> Self {
        RecordingFleet {
            coordinated: true,
            ..Default::default()
        }
    }

    /// The tags reported healthy, in order.
    pub(super) fn healthy_tags(&self) -> Vec<String> {
        self.healthy.lock().expect("lock").clone()
    }

    /// Set `skiff:target` (`None`: remove it).
    pub(super) fn target(&self, tag: Option<&str>) {
        self.instructions.lock().expect("lock").target = tag.map(rel);
    }

    /// Set `skiff:pull`.
    pub(super) fn pull(&self, tag: Option<&str>) {
        self.instructions.lock().expect("lock").pull = tag.map(rel);
    }

    pub(super) fn pulled_values(&self) -> Vec<String> {
        self.pulled.lock().expect("lock").clone()
    }

    pub(super) fn failed_values(&self) -> Vec<String> {
        self.failed_here.lock().expect("lock").clone()
    }
}

pub(super) fn rel(tag: &str) -> Release {
    Release::new(tag.parse().expect("tag"), None)
}

impl Fleet for RecordingFleet {
    async fn release_healthy(&self, release: &Release) {
        self.healthy
            .lock()
            .expect("lock")
            .push(release.tag.to_string());
    }
    async fn release_failed(&self, release: &Release) {
        self.failed
            .lock()
            .expect("lock")
            .push(release.tag.to_string());
    }
    async fn termination_pending(&self) -> bool {
        false
    }
    async fn drained(&self) {}
    fn coordinated(&self) -> bool {
        self.coordinated
    }
    async fn instructions(&self) -> Instructions {
        if !self.coordinated {
            return Instructions::default();
        }
        *self.reads.lock().expect("lock") += 1;
        self.instructions.lock().expect("lock").clone()
    }
    async fn answers(&self) -> Answers {
        self.answers.lock().expect("lock").clone()
    }
    async fn pulled(&self, release: &Release) -> bool {
        self.pulled
            .lock()
            .expect("lock")
            .push(skiff_release::instance_tags::encode(release));
        true
    }
    async fn failed(&self, release: Option<&Release>) -> bool {
        self.failed_here.lock().expect("lock").push(
            release
                .map(skiff_release::instance_tags::encode)
                .unwrap_or_default(),
        );
        true
    }
}

pub(super) fn source(first: &str, rest: &str) -> FakeSource {
    FakeSource {
        first: Ok(first.into()),
        rest: Ok(rest.into()),
        reads: Mutex::new(0),
    }
}

/// A container that ran once and was stopped.
pub(super) fn stopped(id: &str, tag: &str, created: i64) -> ContainerState {
    ContainerState {
        id: id.into(),
        name: format!("t-{tag}-{id}"),
        release: Release::new(tag.parse().expect("tag"), None),
        running: false,
        started: true,
        created,
        slot: None,
    }
}

/// A container created and never started (an agent killed between create and start).
pub(super) fn never_started(id: &str, tag: &str, created: i64) -> ContainerState {
    ContainerState {
        started: false,
        ..stopped(id, tag, created)
    }
}

/// The kernel redirect as a value: where it points, every point in order.
#[derive(Debug, Default)]
pub(super) struct RedirectWorld {
    pub(super) pointing: Option<u16>,
    pub(super) points: Vec<u16>,
}

#[derive(Debug, Clone, Default)]
pub(super) struct FakeRedirect(Arc<Mutex<RedirectWorld>>);

impl FakeRedirect {
    pub(super) fn world(&self) -> std::sync::MutexGuard<'_, RedirectWorld> {
        self.0.lock().expect("lock")
    }
}

impl crate::redirect::PortRedirect for FakeRedirect {
    fn point(&self, slot: u16) -> Result<(), crate::redirect::RedirectError> {
        let mut w = self.world();
        w.pointing = Some(slot);
        w.points.push(slot);
        Ok(())
    }
    fn pointing(&self) -> Result<crate::redirect::Pointing, crate::redirect::RedirectError> {
        Ok(self.world().pointing.map_or(
            crate::redirect::Pointing::Nothing,
            crate::redirect::Pointing::Slot,
        ))
    }
    fn remove(&self) -> Result<(), crate::redirect::RedirectError> {
        self.world().pointing = None;
        Ok(())
    }
}

/// Two free loopback ports for the slots: containers listen there once started (see
/// [`FakeRuntime::listen`]).
pub(super) fn free_slots() -> [u16; 2] {
    let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let b = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let ports = [
        a.local_addr().expect("addr").port(),
        b.local_addr().expect("addr").port(),
    ];
    drop((a, b));
    ports
}

/// A handover config on slots `slots` (see [`free_slots`]), with a short gate and hold.
pub(super) fn handover_config(slots: [u16; 2]) -> Arc<Config> {
    Arc::new(
        Config::parse(&format!(
            "[app]\nname='t'\nimage='r/app'\nport=1\nhealth_path='/health'\nstart_timeout='1s'\nswap='handover'\nslots=[{}, {}]\nhold='2s'\n[release]\nsource='file'\npoll_interval='10s'\nupdate='follow'\n[health]\nlisten='127.0.0.1:2'\n",
            slots[0], slots[1]
        ))
        .expect("config"),
    )
}

/// A container running `tag` on `slot`.
pub(super) fn on_slot(id: &str, tag: &str, slot: u16, running: bool) -> ContainerState {
    ContainerState {
        running,
        slot: Some(slot),
        ..stopped(id, tag, 1)
    }
}

/// Wait (real time) until `check` holds; panic with `what` after `within`.
pub(super) async fn until(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(50)).await;
    }
}
