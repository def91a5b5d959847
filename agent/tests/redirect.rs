//! The handover's kernel redirect against the real kernel, in network namespaces this test
//! creates (and removes): a host namespace with two slot servers and a client namespace joined
//! by a veth pair, so that traffic from outside (prerouting) and from the host itself (output)
//! are both redirected. `nft -j`, nftables' own reader, checks what our writer wrote.
//!
//! Each scenario runs inside the host namespace: the outer test re-runs this binary there with
//! `ip netns exec` and the `SKIFF_IT_REDIRECT_NS` variable set (the inner tests are `#[ignore]`d
//! otherwise). Needs root; skipped with a message when `ip netns` is not usable.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use skiff_agent::redirect::{NftRedirect, Pointing, PortRedirect};
use support::nft_dnat_ports;

const PUBLIC: u16 = 8080;
const SLOT_A: u16 = 8090;
const SLOT_B: u16 = 8091;
const HOST_IP: &str = "10.213.0.1";
const INNER: &str = "SKIFF_IT_REDIRECT_NS";

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// Two namespaces and a veth pair, removed on drop.
struct Namespaces {
    host: String,
    client: String,
}

impl Namespaces {
    fn new() -> Option<Self> {
        let id = format!(
            "{:x}",
            std::process::id() ^ (Instant::now().elapsed().subsec_nanos())
        );
        let ns = Namespaces {
            host: format!("skiff-it-rh-{id}"),
            client: format!("skiff-it-rc-{id}"),
        };
        if !ip(&["netns", "add", &ns.host]) || !ip(&["netns", "add", &ns.client]) {
            return None;
        }
        let (vh, vc) = (format!("vh{id}"), format!("vc{id}"));
        let ok = ip(&[
            "link", "add", &vh, "netns", &ns.host, "type", "veth", "peer", "name", &vc, "netns",
            &ns.client,
        ]) && ip(&[
            "-n",
            &ns.host,
            "addr",
            "add",
            &format!("{HOST_IP}/24"),
            "dev",
            &vh,
        ]) && ip(&["-n", &ns.client, "addr", "add", "10.213.0.2/24", "dev", &vc])
            && ip(&["-n", &ns.host, "link", "set", &vh, "up"])
            && ip(&["-n", &ns.client, "link", "set", &vc, "up"])
            && ip(&["-n", &ns.host, "link", "set", "lo", "up"])
            && ip(&["-n", &ns.client, "link", "set", "lo", "up"]);
        ok.then_some(ns)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        ip(&["netns", "del", &self.host]);
        ip(&["netns", "del", &self.client]);
    }
}

/// Run the `#[ignore]`d test `name` inside the host namespace (and hand it the client's).
fn run_inside(name: &str) {
    let Some(ns) = Namespaces::new() else {
        eprintln!("skipping {name}: cannot create network namespaces (needs root and iproute2)");
        return;
    };
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.host])
        .arg(exe)
        .args([
            "--exact",
            name,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(INNER, &ns.client)
        .output()
        .expect("ip netns exec");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{name} inside {}:\n{text}",
        ns.host
    );
    eprintln!("{text}");
}

/// Inside: the client namespace's name, or `None` when not run by `run_inside`.
fn client_ns() -> Option<String> {
    std::env::var(INNER).ok()
}

/// An HTTP/1.1 server on `port` answering its `name`, keeping connections alive; stops when
/// `stop` is set (the listener closes, as an app that exits).
fn serve(port: u16, name: &'static str, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind slot");
    listener.set_nonblocking(true).expect("nonblocking");
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, _)) => {
                    conn.set_nonblocking(false).ok();
                    thread::spawn(move || answer(conn, name));
                }
                Err(_) => thread::sleep(Duration::from_millis(2)),
            }
        }
    })
}

fn answer(conn: TcpStream, name: &str) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut conn = conn;
    loop {
        let mut line = String::new();
        // The request line, then headers up to the blank line.
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
        }
        let body = name.as_bytes();
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
        if conn.write_all(head.as_bytes()).is_err() || conn.write_all(body).is_err() {
            return;
        }
    }
}

/// One request on `conn`; the body.
fn request(conn: &mut TcpStream) -> Option<String> {
    conn.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").ok()?;
    let mut buf = [0u8; 256];
    let mut got = Vec::new();
    while !got.ends_with(b"A") && !got.ends_with(b"B") {
        let n = conn.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    text.rsplit("\r\n\r\n").next().map(str::to_owned)
}

/// A request on a new connection to `addr`.
fn fresh(addr: &str) -> Option<String> {
    let mut c = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    request(&mut c)
}

/// From the client namespace (traffic from outside): the body, by curl.
fn from_outside(client: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", client, "curl", "-fsS", "-m", "2"])
        .arg(format!("http://{HOST_IP}:{PUBLIC}/"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Load: fresh connections from the host and from outside, in a loop until `stop`.
fn load(
    client: String,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU32>,
    failed: Arc<AtomicU32>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut n = 0u32;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            // Mostly from the host (fast), every tenth from outside (a curl process).
            let got = if n.is_multiple_of(10) {
                from_outside(&client)
            } else {
                fresh(&format!("127.0.0.1:{PUBLIC}"))
            };
            match got.as_deref() {
                Some("A" | "B") => ok.fetch_add(1, Ordering::Relaxed),
                _ => failed.fetch_add(1, Ordering::Relaxed),
            };
        }
    })
}

#[test]
fn the_redirect_flips_under_load_in_a_namespace() {
    run_inside("inner_flip_under_load");
}

#[test]
#[ignore = "run inside a namespace by the_redirect_flips_under_load_in_a_namespace"]
fn inner_flip_under_load() {
    let Some(client) = client_ns() else { return };
    let redirect = NftRedirect::new("it", PUBLIC);
    let table = redirect.table_name().to_owned();
    assert_eq!(
        redirect.pointing().expect("read"),
        Pointing::Nothing,
        "a fresh namespace"
    );
    let stop_a = Arc::new(AtomicBool::new(false));
    let stop_b = Arc::new(AtomicBool::new(false));
    let a = serve(SLOT_A, "A", stop_a.clone());
    let b = serve(SLOT_B, "B", stop_b.clone());

    redirect.point(SLOT_A).expect("point at A");
    assert_eq!(redirect.pointing().expect("read"), Pointing::Slot(SLOT_A));
    assert_eq!(
        nft_dnat_ports(&table),
        vec![u64::from(SLOT_A); 2],
        "nft sees both rules"
    );
    assert_eq!(
        fresh(&format!("127.0.0.1:{PUBLIC}")).as_deref(),
        Some("A"),
        "from the host"
    );
    assert_eq!(
        fresh(&format!("{HOST_IP}:{PUBLIC}")).as_deref(),
        Some("A"),
        "to the host's own address"
    );
    assert_eq!(from_outside(&client).as_deref(), Some("A"), "from outside");

    // A kept-alive connection established on A.
    let mut kept = TcpStream::connect(("127.0.0.1", PUBLIC)).expect("connect");
    kept.set_read_timeout(Some(Duration::from_secs(2))).ok();
    assert_eq!(request(&mut kept).as_deref(), Some("A"));

    let (stop_load, ok, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU32::new(0)),
        Arc::new(AtomicU32::new(0)),
    );
    let loader = load(
        client.clone(),
        stop_load.clone(),
        ok.clone(),
        failed.clone(),
    );
    thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    redirect.point(SLOT_B).expect("flip to B");
    let flip = started.elapsed();
    assert_eq!(redirect.pointing().expect("read"), Pointing::Slot(SLOT_B));
    assert_eq!(
        fresh(&format!("127.0.0.1:{PUBLIC}")).as_deref(),
        Some("B"),
        "new connections go to B at once"
    );
    assert_eq!(from_outside(&client).as_deref(), Some("B"));
    assert_eq!(
        request(&mut kept).as_deref(),
        Some("A"),
        "the established connection stays on A"
    );
    thread::sleep(Duration::from_millis(500));
    // Flip back while both run.
    redirect.point(SLOT_A).expect("flip back to A");
    assert_eq!(fresh(&format!("127.0.0.1:{PUBLIC}")).as_deref(), Some("A"));
    thread::sleep(Duration::from_millis(500));
    stop_load.store(true, Ordering::Relaxed);
    loader.join().expect("load");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("flip took {flip:?}; {ok} requests ok, {failed} failed through two flips");
    assert!(ok > 100, "the load ran: {ok}");
    assert_eq!(failed, 0, "no request failed while both slots served");
    assert!(
        flip < Duration::from_millis(200),
        "one netlink batch: {flip:?}"
    );

    // Someone else's half-written table: read as inconsistent, and a point rewrites it whole.
    assert!(
        Command::new("nft")
            .args([
                "add", "rule", "ip", &table, "output", "tcp", "dport", "9999", "accept"
            ])
            .status()
            .is_ok_and(|s| s.success())
    );
    assert_eq!(redirect.pointing().expect("read"), Pointing::Inconsistent);
    redirect.point(SLOT_B).expect("rewrite");
    assert_eq!(redirect.pointing().expect("read"), Pointing::Slot(SLOT_B));
    assert_eq!(nft_dnat_ports(&table), vec![u64::from(SLOT_B); 2]);

    // As after a reboot: the kernel's tables are gone; read as nothing, written again.
    assert!(
        Command::new("nft")
            .args(["flush", "ruleset"])
            .status()
            .is_ok_and(|s| s.success())
    );
    assert_eq!(redirect.pointing().expect("read"), Pointing::Nothing);
    assert!(
        fresh(&format!("127.0.0.1:{PUBLIC}")).is_none(),
        "nothing listens on the public port itself"
    );
    redirect.point(SLOT_A).expect("point again");
    assert_eq!(fresh(&format!("127.0.0.1:{PUBLIC}")).as_deref(), Some("A"));

    // Removed: nothing of ours is left; removing again is fine.
    redirect.remove().expect("remove");
    redirect.remove().expect("remove twice");
    assert_eq!(redirect.pointing().expect("read"), Pointing::Nothing);
    assert!(nft_dnat_ports(&table).is_empty(), "the table is gone");

    // The host's own connections to another host's port are not redirected (output matches
    // loopback only): from the host to the client's address, nothing listens on 8080 there.
    redirect.point(SLOT_A).expect("point");
    assert!(fresh(&format!("10.213.0.2:{PUBLIC}")).is_none());
    redirect.remove().expect("remove");

    stop_a.store(true, Ordering::Relaxed);
    stop_b.store(true, Ordering::Relaxed);
    a.join().ok();
    b.join().ok();
}
