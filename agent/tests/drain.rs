//! The drain protocol end to end: two agents (different app ports) behind HAProxy standing in
//! for the ALB, which health-checks the agents' ports; both are updated in place, one after the
//! other, under a steady request load. Not one request may fail.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use support::{Agent, Fixture, free_port, http_get};

const LONG: Duration = Duration::from_secs(40);

struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Default, Debug)]
struct Load {
    total: u64,
    failed: u64,
    v2: u64,
    failures: Vec<String>,
}

#[test]
fn two_agents_behind_haproxy_update_in_place_with_zero_failed_requests() {
    let mut a = Fixture::new("drain-a");
    let b = Fixture::new("drain-b");
    a.image("v1", true);
    a.image("v2", true);
    a.set_release("v1");
    b.set_release("v1");
    let config_a = a.write_config(&a.file_config("follow", ""));
    let config_b = b.write_config(&b.file_config("follow", "").replace(&b.repo, &a.repo));
    let _agent_a = Agent::start(&config_a, &[]);
    let _agent_b = Agent::start(&config_b, &[]);
    a.wait_healthy("v1", LONG);
    b.wait_healthy("v1", LONG);

    let front = free_port();
    let cfg = a.dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 512\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 5s\n  timeout server 5s\n\
             frontend fe\n  bind 127.0.0.1:{front}\n  default_backend be\n\
             backend be\n  balance roundrobin\n  option httpchk GET /healthz\n  default-server inter 200ms fall 2 rise 2\n\
               server a 127.0.0.1:{} check port {}\n  server b 127.0.0.1:{} check port {}\n",
            a.app_port, a.health_port, b.app_port, b.health_port
        ),
    )
    .expect("haproxy config");
    let _haproxy = Haproxy(
        Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .spawn()
            .expect("haproxy (apt-get install haproxy, or run .ci/setup.sh)"),
    );
    let front_addr = format!("127.0.0.1:{front}");
    support::wait_for(
        LONG,
        "haproxy serving",
        || http_get(&front_addr, "/").is_some_and(|(c, _)| c == 200),
        String::new,
    );
    thread::sleep(Duration::from_secs(1));

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let addr = front_addr.clone();
        thread::spawn(move || {
            let mut load = Load::default();
            // Bounded: at most 60 000 requests, and it stops when told.
            while !stop.load(Ordering::SeqCst) && load.total < 60_000 {
                load.total += 1;
                match http_get(&addr, "/") {
                    Some((200, body)) => load.v2 += u64::from(body.contains("release-v2")),
                    other => {
                        load.failed += 1;
                        load.failures.push(format!("{other:?}"));
                    }
                }
                thread::sleep(Duration::from_millis(5));
            }
            load
        })
    };

    thread::sleep(Duration::from_secs(1));
    a.set_release("v2");
    a.wait_healthy("v2", LONG);
    // the load balancer needs `rise` checks to take the host back before the next one drains
    thread::sleep(Duration::from_secs(1));
    b.set_release("v2");
    b.wait_healthy("v2", LONG);
    thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let load = load.join().expect("load thread");

    println!(
        "drain test: {} requests, {} failed, {} served by v2",
        load.total, load.failed, load.v2
    );
    assert!(
        load.total > 200,
        "load too thin to prove anything: {load:?}"
    );
    assert_eq!(load.failed, 0, "failed requests: {:?}", load.failures);
    assert!(load.v2 > 0, "v2 never served");
}
