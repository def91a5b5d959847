//! The handover with the real agent binary, the real Docker engine and the real kernel: the
//! agent SIGKILLed at each step of a swap (the new container started on its slot, right after
//! the flip, while the old container drains), and the redirect removed as a reboot removes it.
//! Each ends with one running container receiving new connections and the redirect on it, and
//! no request fails while a container still served.
//!
//! The agent runs in the machine's own network namespace (Docker's host networking is there),
//! with a public port, slots and an nftables table named for this test only
//! (`ip skiff_<fixture id>`), deleted at the end.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use support::{Agent, BASE_IMAGE, Fixture, docker, free_port, http_get, sh, wait_for};

/// The table's dnat port(s), as nftables' own reader shows them.
fn redirect_ports(table: &str) -> Vec<u64> {
    let Ok(out) = Command::new("nft")
        .args(["-j", "list", "table", "ip", table])
        .output()
    else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["nftables"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|o| o.get("rule"))
        .flat_map(|r| r["expr"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e.get("dnat").and_then(|d| d["port"].as_u64()))
        .collect()
}

/// Deletes the test's table, whatever happened.
struct Table(String);

impl Drop for Table {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "ip", &self.0])
            .output();
    }
}

/// Build and push `repo:tag` whose app runs `cmd` (a shell line; `$PORT` is its slot).
fn image(f: &Fixture, tag: &str, cmd: &str) {
    let ctx = f.dir.path().join(format!("ctx-{tag}"));
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {BASE_IMAGE}\n\
             RUN mkdir -p /www && echo ok > /www/health && echo release-{tag} > /www/index.html\n\
             CMD [\"/bin/sh\", \"-c\", \"{cmd}\"]\n"
        ),
    )
    .expect("dockerfile");
    let reference = format!("{}:{tag}", f.repo);
    sh(Command::new("docker")
        .env("DOCKER_BUILDKIT", "0")
        .args(["build", "-q", "-t", &reference])
        .arg(&ctx));
    docker(&["push", &reference]);
}

/// The slots of the running managed containers (label skiff.slot).
fn running_slots(f: &Fixture) -> Vec<u64> {
    let out = docker(&[
        "ps",
        "--filter",
        &format!("label=skiff.app={}", f.id),
        "--format",
        "{{.Label \"skiff.slot\"}}",
    ]);
    out.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// One container runs, it serves `tag` on the public port, and the redirect names its slot.
fn settled_on(f: &Fixture, table: &str, tag: &str) {
    f.wait_healthy(tag, Duration::from_secs(30));
    wait_for(
        Duration::from_secs(20),
        &format!("one container, serving {tag}, the redirect on it"),
        || {
            let slots = running_slots(f);
            slots.len() == 1
                && redirect_ports(table) == vec![slots[0], slots[0]]
                && http_get(&format!("127.0.0.1:{}", f.app_port), "/")
                    .is_some_and(|(c, b)| c == 200 && b.trim() == format!("release-{tag}"))
        },
        || {
            format!(
                "slots {:?}, redirect {:?}, status {:#}",
                running_slots(f),
                redirect_ports(table),
                f.status_or_null()
            )
        },
    );
}

#[test]
fn the_agent_killed_at_each_step_of_a_handover_settles_with_no_request_lost() {
    if !Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        panic!("nft is missing: .ci/setup.sh installs nftables");
    }
    let f = Fixture::new("ho");
    let (slot_a, slot_b) = (free_port(), free_port());
    let table = Table(format!("skiff_{}", f.id));
    let serve = "exec httpd -f -p $PORT -h /www";
    image(&f, "v1", serve);
    // Listens only after 3 s: the agent can be killed with both containers up, before the flip.
    image(&f, "v2", &format!("sleep 3; {serve}"));
    image(&f, "v3", serve);
    // Ignores SIGTERM (tini forwards it to sh only): stops after stop_timeout, a long drain.
    image(
        &f,
        "v4",
        "trap '' TERM; httpd -f -p $PORT -h /www; sleep 600",
    );
    image(&f, "v5", serve);
    let extra = format!("swap = \"handover\"\nslots = [{slot_a}, {slot_b}]\nhold = \"2s\"\n");
    let config = f.write_config(&f.file_config("in-place", &extra));
    let state = f.dir.path().join("state");
    let state_env = state.to_str().expect("utf-8").to_owned();
    let start = || Agent::start(&config, &[("STATE_DIRECTORY", state_env.as_str())]);

    f.set_release("v1");
    let mut agent = start();
    settled_on(&f, &table.0, "v1");

    // Load on the public port: a new connection per request, from now to the reboot.
    let (stop, ok, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU32::new(0)),
        Arc::new(AtomicU32::new(0)),
    );
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let addr = format!("127.0.0.1:{}", f.app_port);
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match http_get(&addr, "/") {
                    Some((200, b)) if b.starts_with("release-") => {
                        ok.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                thread::sleep(Duration::from_millis(5));
            }
        })
    };

    // 1. Killed with the new container started on its slot, before the flip.
    f.set_release("v2");
    wait_for(
        Duration::from_secs(30),
        "two containers running (v2 starting beside v1)",
        || running_slots(&f).len() == 2,
        || agent.logs(),
    );
    agent.sigkill();
    assert_eq!(
        redirect_ports(&table.0),
        vec![u64::from(slot_a); 2],
        "not flipped yet"
    );
    agent = start();
    settled_on(&f, &table.0, "v2");

    // 2. Killed right after the flip, in the hold.
    f.set_release("v3");
    let v2_slot = running_slots(&f)[0];
    wait_for(
        Duration::from_secs(30),
        "the flip to v3",
        || {
            redirect_ports(&table.0)
                .first()
                .is_some_and(|p| *p != v2_slot)
        },
        || agent.logs(),
    );
    agent.sigkill();
    assert_eq!(
        running_slots(&f).len(),
        2,
        "killed with the old one still running"
    );
    agent = start();
    settled_on(&f, &table.0, "v3");

    // 3. Killed while the old container drains (v4 takes its stop_timeout to stop).
    f.set_release("v4");
    settled_on(&f, &table.0, "v4");
    f.set_release("v5");
    let v4_slot = running_slots(&f)[0];
    wait_for(
        Duration::from_secs(30),
        "the flip to v5",
        || {
            redirect_ports(&table.0)
                .first()
                .is_some_and(|p| *p != v4_slot)
        },
        || agent.logs(),
    );
    // Past the hold (2 s), into the old one's stop (2 s).
    thread::sleep(Duration::from_millis(2600));
    assert_eq!(
        running_slots(&f).len(),
        2,
        "v4 still draining: {}",
        agent.logs()
    );
    agent.sigkill();
    agent = start();
    settled_on(&f, &table.0, "v5");

    stop.store(true, Ordering::Relaxed);
    load.join().expect("load");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("through three kills: {ok} requests served, {failed} failed");
    assert!(ok > 100, "the load ran: {ok}");
    assert_eq!(failed, 0, "no request failed while a container served");

    // 4. As after a reboot: the kernel's rules are gone while the agent is down. It writes the
    //    redirect again when it adopts the running container.
    agent.sigkill();
    sh(Command::new("nft").args(["delete", "table", "ip", &table.0]));
    assert!(http_get(&format!("127.0.0.1:{}", f.app_port), "/").is_none());
    let _agent = start();
    settled_on(&f, &table.0, "v5");
}
