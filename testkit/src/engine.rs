//! A Docker engine of the test's own: its own data and exec root, socket and bridge, started
//! with moto's dummy AWS credentials in its environment (a log driver such as `awslogs` runs
//! inside dockerd and takes its credentials from there). The machine's dockerd is left alone.
//! Everything the engine made goes when it drops.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::wait::wait_for;

/// A running dockerd of the test's own.
#[derive(Debug)]
pub struct Engine {
    /// Its folder (data root, exec root, `dockerd.log`); the test may keep files there.
    pub dir: PathBuf,
    /// `unix://...`: for `docker -H` and for an agent's `DOCKER_HOST`.
    pub sock: String,
    daemon: Child,
    bridge: String,
}

/// Engines this test process started, for a bridge name and subnet of each one's own.
static ENGINES: AtomicU32 = AtomicU32::new(0);

/// A bridge of the engine's own. `--bridge=none` would make dockerd delete the host's default
/// bridge `docker0` at start (it removes the default bridge interface when the bridge driver
/// is disabled), which breaks every bridged container and build of the machine's engine.
fn own_bridge() -> String {
    let n = ENGINES.fetch_add(1, Ordering::SeqCst);
    let pid = std::process::id();
    let name = format!("sklg{}x{n}", pid % 100_000);
    let ip = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    ip(&["link", "del", &name]); // a leftover of an earlier run with this pid, if any
    // dockerd takes the bridge's own address (`--bip` and `--bridge` exclude each other).
    let addr = format!("10.{}.{}.1/24", 200 + n % 50, pid % 250);
    assert!(
        ip(&["link", "add", &name, "type", "bridge"])
            && ip(&["addr", "add", &addr, "dev", &name])
            && ip(&["link", "set", &name, "up"]),
        "cannot create the bridge {name} ({addr}) for the test's dockerd"
    );
    name
}

impl Engine {
    /// Start an engine in the temporary folder `name` (unique per test) and wait (at most
    /// 60 s) until it answers.
    pub fn start(name: &str) -> Engine {
        let dir = std::env::temp_dir().join(name);
        std::fs::create_dir_all(dir.join("data")).expect("engine dir");
        std::fs::write(dir.join("daemon.json"), "{}\n").expect("daemon.json");
        let sock = format!("unix://{}", dir.join("docker.sock").display());
        let log = std::fs::File::create(dir.join("dockerd.log")).expect("dockerd.log");
        let bridge = own_bridge();
        let daemon = Command::new("dockerd")
            .args(["--config-file", &dir.join("daemon.json").to_string_lossy()])
            .arg(format!("--bridge={bridge}"))
            .args(["--iptables=false", "--ip6tables=false"])
            .args(["--data-root", &dir.join("data").to_string_lossy()])
            .args(["--exec-root", &dir.join("exec").to_string_lossy()])
            .args(["--pidfile", &dir.join("docker.pid").to_string_lossy()])
            .args(["-H", &sock])
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start dockerd (run .ci/setup.sh first)");
        let engine = Engine {
            dir,
            sock,
            daemon,
            bridge,
        };
        wait_for(
            Duration::from_secs(60),
            "the test's dockerd answers",
            || engine.docker_ok(&["version"]),
            || format!("see {}/dockerd.log", engine.dir.display()),
        );
        engine
    }

    /// `docker -H <this engine> <args>`.
    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .args(["-H", &self.sock])
            .args(args)
            .output()
            .expect("run docker")
    }

    pub fn docker_ok(&self, args: &[&str]) -> bool {
        self.docker(args).status.success()
    }

    /// Copy `image` from the machine's engine into this one, without a registry.
    pub fn load_from_host(&self, image: &str) {
        let mut save = Command::new("docker")
            .args(["save", image])
            .stdout(Stdio::piped())
            .spawn()
            .expect("docker save");
        let load = Command::new("docker")
            .args(["-H", &self.sock, "load", "-q"])
            .stdin(save.stdout.take().expect("pipe"))
            .output()
            .expect("docker load");
        let saved = save.wait().expect("docker save");
        assert!(
            saved.success() && load.status.success(),
            "docker save {image} | docker load: {saved:?} {load:?}"
        );
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let ids = self.docker(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.docker(&["rm", "-f", id]);
        }
        // SIGTERM: dockerd stops its containerd and unmounts; SIGKILL only if it hangs.
        let _ = Command::new("kill")
            .arg(self.daemon.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.daemon.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        // dockerd leaves its network namespace mounted under the exec root.
        let _ = Command::new("umount")
            .arg(self.dir.join("exec/netns/default"))
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}
