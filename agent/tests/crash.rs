//! The crash matrix against the real Docker engine: the agent is SIGKILLed at each step of an
//! in-place swap to a release that never becomes healthy, then restarted. Every run must end
//! with exactly one running container, healthy, on the old release (the only one the rules
//! allow: the new one failed its gate), and at no moment may two containers of the app run
//! (sampled throughout from another thread). Each case uses a fresh bad tag: the agent
//! remembers a failed tag, so a reused one would pass by never being tried.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use support::{Agent, Fixture, docker};

const LONG: Duration = Duration::from_secs(60);

/// (id, state) of every container of the app, `state` as `docker ps` reports it.
fn states(fx: &Fixture) -> Vec<(String, String)> {
    docker(&[
        "ps",
        "-a",
        "--no-trunc",
        "--filter",
        &format!("label=skiff.app={}", fx.id),
        "--format",
        "{{.ID}} {{.State}}",
    ])
    .lines()
    .filter_map(|l| l.split_once(' '))
    .map(|(id, s)| (id.to_owned(), s.to_owned()))
    .collect()
}

#[derive(Debug, Clone, Copy)]
enum Step {
    AfterCreate,
    DuringDrain,
    AfterStop,
    AfterStart,
    BeforePromote,
}

/// The engine's `die` event of container `id`, as it happens: the moment between the old
/// container's stop and the new one's start is a few milliseconds, too short for polling
/// `docker ps` on a loaded machine to see.
struct DieWatch {
    child: std::process::Child,
    died: std::sync::mpsc::Receiver<()>,
}

impl DieWatch {
    fn start(id: &str) -> DieWatch {
        let mut child = std::process::Command::new("docker")
            .args([
                "events",
                "--filter",
                &format!("container={id}"),
                "--filter",
                "event=die",
                "--format",
                "{{.ID}}",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("docker events");
        let out = child.stdout.take().expect("stdout");
        let (tx, died) = std::sync::mpsc::channel();
        thread::spawn(move || {
            use std::io::BufRead;
            if std::io::BufReader::new(out).lines().next().is_some() {
                let _ = tx.send(());
            }
        });
        DieWatch { child, died }
    }
}

impl Drop for DieWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait until the swap reaches `step` (the engine polled; the old container's death watched as
/// it happens for `AfterStop`); false when it never did.
fn reach(
    fx: &Fixture,
    step: Step,
    old: &str,
    before: &HashSet<String>,
    died: Option<&DieWatch>,
) -> bool {
    let deadline = Instant::now() + LONG;
    while Instant::now() < deadline {
        if let (Step::AfterStop, Some(w)) = (step, died)
            && w.died.recv_timeout(Duration::from_millis(20)).is_ok()
        {
            return true;
        }
        let now = states(fx);
        let new = now.iter().find(|(id, _)| !before.contains(id));
        let old_state = now
            .iter()
            .find(|(id, _)| id == old)
            .map(|(_, s)| s.as_str());
        let hit = match (step, new) {
            (Step::AfterCreate | Step::DuringDrain, Some((_, s))) => s == "created",
            (Step::AfterStop, Some((_, s))) => s == "created" && old_state == Some("exited"),
            (Step::AfterStart | Step::BeforePromote, Some((_, s))) => s == "running",
            _ => false,
        };
        if hit {
            match step {
                // the drain is 2 s; the gate 5 s
                Step::DuringDrain => thread::sleep(Duration::from_millis(1000)),
                Step::BeforePromote => thread::sleep(Duration::from_millis(3000)),
                _ => {}
            }
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn sigkill_at_every_step_of_a_swap_ends_with_one_healthy_container() {
    let mut fx = Fixture::new("crash");
    fx.image("v1", true);
    let steps = [
        Step::AfterCreate,
        Step::DuringDrain,
        Step::AfterStop,
        Step::AfterStart,
        Step::BeforePromote,
    ];
    for (i, _) in steps.iter().enumerate() {
        fx.image(&format!("bad{i}"), false);
    }
    fx.set_release("v1");
    let config = fx
        .file_config("follow", "")
        .replace("drain = \"1s\"", "drain = \"2s\"");
    let config = fx.write_config(&config);
    let state_dir = fx.dir.path().join("state");
    let state_env = state_dir.to_str().expect("utf-8 path").to_owned();
    let env = [("STATE_DIRECTORY", state_env.as_str())];
    let mut agent = Agent::start(&config, &env);
    fx.wait_healthy("v1", LONG);

    // At most one running container of the app at any moment.
    let stop = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, most, id) = (stop.clone(), most.clone(), fx.id.clone());
        thread::spawn(move || {
            let mut samples = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let out = docker(&[
                    "ps",
                    "-q",
                    "--filter",
                    &format!("label=skiff.app={id}"),
                    "--filter",
                    "status=running",
                ]);
                most.fetch_max(out.lines().count(), Ordering::Relaxed);
                samples += 1;
            }
            samples
        })
    };

    let mut results = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let old = fx.running_container();
        let before: HashSet<String> = states(&fx).into_iter().map(|(id, _)| id).collect();
        let tag = format!("bad{i}");
        // Watching starts before the release changes, so the event cannot be missed.
        let died = matches!(step, Step::AfterStop).then(|| DieWatch::start(&old));
        fx.set_release(&tag);
        let reached = reach(&fx, *step, &old, &before, died.as_ref());
        agent.sigkill();
        // What the kill interrupted: the old and the new container's states at that moment.
        let at_kill: Vec<String> = states(&fx)
            .into_iter()
            .map(|(id, s)| {
                let who = if id == old {
                    "old"
                } else if before.contains(&id) {
                    "other"
                } else {
                    "new"
                };
                format!("{who} {s}")
            })
            .collect();
        agent = Agent::start(&config, &env);
        let started = Instant::now();
        let mut outcome = Err(format!("step {step:?} never reached"));
        if reached {
            outcome = Err("did not settle within 60 s".into());
            while started.elapsed() < LONG {
                let running: Vec<_> = states(&fx)
                    .into_iter()
                    .filter(|(_, s)| s == "running")
                    .collect();
                let healthy_v1 = matches!(fx.healthz(), Some((200, ref b)) if b["tag"] == "v1");
                let journal_gone = !state_dir.join(format!("swap-{}.json", fx.id)).exists();
                // Killed before the swap reached its gate (after create), the restarted agent
                // rightly tries the release again: settled means the bad tag was tried and
                // rejected, not merely that v1 serves between adoption and the retry.
                let rejected = fx.status_or_null()["failed_release"]["tag"] == tag.as_str();
                if running.len() == 1 && healthy_v1 && journal_gone && rejected {
                    // Settled: the bad release must not come back later either.
                    thread::sleep(Duration::from_secs(2));
                    let still = matches!(fx.healthz(), Some((200, ref b)) if b["tag"] == "v1");
                    outcome = if still {
                        Ok(started.elapsed())
                    } else {
                        Err(format!("left v1 after settling: {:?}", fx.healthz()))
                    };
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
        if outcome.is_err() {
            eprintln!("--- agent log ({step:?}) ---\n{}", agent.logs());
            eprintln!("--- containers ---\n{:?}", states(&fx));
        }
        results.push((*step, tag, outcome, at_kill.join(", ")));
    }
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().expect("sampler");
    let most = most.load(Ordering::Relaxed);

    println!(
        "crash matrix (SIGKILL during an in-place swap to a release that never becomes healthy):"
    );
    for (step, tag, outcome, at_kill) in &results {
        match outcome {
            Ok(t) => println!(
                "  {step:<14?} {tag:<5} pass (one healthy container on v1, {:.1} s after restart; killed at: {at_kill})",
                t.as_secs_f64()
            ),
            Err(e) => println!("  {step:<14?} {tag:<5} FAIL: {e} (killed at: {at_kill})"),
        }
    }
    println!("  running containers of the app at once, most seen: {most} ({samples} samples)");
    assert!(
        results.iter().all(|(_, _, o, _)| o.is_ok()),
        "crash matrix failed: {results:?}"
    );
    assert_eq!(most, 1, "two containers of the app ran at once");
}
