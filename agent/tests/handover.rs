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

use support::{Agent, Fixture, docker, free_port, http_get, nft_dnat_ports, sh, wait_for};

/// Deletes the test's table, whatever happened.
struct Table(String);

impl Drop for Table {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "ip", &self.0])
            .output();
    }
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
                && nft_dnat_ports(table) == vec![slots[0], slots[0]]
                && http_get(&format!("127.0.0.1:{}", f.app_port), "/")
                    .is_some_and(|(c, b)| c == 200 && b.trim() == format!("release-{tag}"))
        },
        || {
            format!(
                "slots {:?}, redirect {:?}, status {:#}",
                running_slots(f),
                nft_dnat_ports(table),
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
    let mut f = Fixture::new("ho");
    let (slot_a, slot_b) = (free_port(), free_port());
    let table = Table(format!("skiff_{}", f.id));
    let serve = "exec httpd -f -p $PORT -h /www";
    f.image_running("v1", serve);
    // Listens only after 3 s: the agent can be killed with both containers up, before the flip.
    f.image_running("v2", &format!("sleep 3; {serve}"));
    f.image_running("v3", serve);
    // Ignores SIGTERM (tini forwards it to sh only): stops after stop_timeout, a long drain.
    f.image_running("v4", "trap '' TERM; httpd -f -p $PORT -h /www; sleep 600");
    f.image_running("v5", serve);
    let extra = format!("swap = \"handover\"\nslots = [{slot_a}, {slot_b}]\nhold = \"2s\"\n");
    let config = f.write_config(&f.file_config("follow", &extra));
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
        nft_dnat_ports(&table.0),
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
            nft_dnat_ports(&table.0)
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
            nft_dnat_ports(&table.0)
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
