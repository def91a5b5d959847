//! The release lock through the real binary: the lock parameter in moto's SSM (whose
//! PutParameter refuses to overwrite without Overwrite=true, as AWS does), the instance refresh
//! in the emulator's Auto Scaling, which like AWS runs one refresh at a time per group.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use skiff_release::Release;
use skiff_testkit::emulator::Group;

const V1: &str = r#"{"tag":"v1","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","released_by":"seed"}"#;

/// The launch hook the race's group holds its replacements with.
const HOOK: &str = "skiff-launch";

/// A group of one instance in the emulator, for the release's refresh.
async fn group(prefix: &str) -> Group {
    Group::create(&moto_sdk().await, &unique(prefix), 1, None).await
}

fn release_by<'a>(param: &'a str, asg: &'a str, tag: &'a str, by: &'a str) -> Vec<&'a str> {
    release_args(
        param,
        asg,
        tag,
        "200ms",
        &["--released-by", by, "--timeout", "60s"],
    )
}

async fn versions(ssm: &aws_sdk_ssm::Client, name: &str) -> Vec<String> {
    let out = ssm
        .get_parameter_history()
        .name(name)
        .send()
        .await
        .expect("history");
    out.parameters()
        .iter()
        .filter_map(|p| p.value.clone())
        .collect()
}

#[tokio::test]
async fn two_releases_started_together_one_releases_the_other_exits_4_without_writing() {
    let ssm = aws_sdk_ssm::Client::new(&moto_sdk().await);
    for round in 0..3 {
        let param = format!("/{}/release", unique("race"));
        put_parameter(&ssm, &param, V1).await;
        // The winner's refresh cannot end before the loser has exited: its replacement waits
        // in Pending:Wait for the launch hook, which the test completes (as the instance's
        // agent would) only then. So the second run certainly tries while the first releases.
        let g = group("race").await;
        g.hold_launches(HOOK, 300).await;
        let env = [];
        let a = ctl_command(&release_by(&param, &g.name, "va", "a"), &env)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn a");
        let mut b = ctl_command(&release_by(&param, &g.name, "vb", "b"), &env)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn b");
        let mut a = a;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut next_completion = Instant::now();
        loop {
            let exited = [
                a.try_wait().expect("a").is_some(),
                b.try_wait().expect("b").is_some(),
            ];
            if exited == [true, true] {
                break;
            }
            // Every 500 ms at most: the emulator enforces Auto Scaling's request rate.
            if exited.contains(&true) && Instant::now() >= next_completion {
                g.complete_launches(HOOK, "CONTINUE").await;
                next_completion = Instant::now() + Duration::from_millis(500);
            }
            if Instant::now() > deadline {
                let _ = (a.kill(), b.kill());
                panic!(
                    "round {round}: not both exited within 60 s (exited: {exited:?}); {:?}",
                    g.states().await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let outs: Vec<(&str, Output)> = vec![
            ("a", a.wait_with_output().expect("a")),
            ("b", b.wait_with_output().expect("b")),
        ];
        let refreshes = g.refreshes().await;
        g.delete().await;
        let value = read_param(&ssm, &param).await.expect("value");
        let history = versions(&ssm, &param).await;
        let lock = read_param(&ssm, &format!("{param}-lock")).await;
        delete_param(&ssm, &param).await;
        let t = format!(
            "round {round}\n--- a\n{}\n--- b\n{}",
            text(&outs[0].1),
            text(&outs[1].1)
        );
        let mut codes: Vec<Option<i32>> = outs.iter().map(|(_, o)| o.status.code()).collect();
        codes.sort();
        assert_eq!(codes, [Some(0), Some(4)], "{t}");
        let (winner, _) = outs
            .iter()
            .find(|(_, o)| o.status.code() == Some(0))
            .expect("a winner");
        let (_, loser) = outs
            .iter()
            .find(|(_, o)| o.status.code() == Some(4))
            .expect("a loser");
        assert!(
            text(loser).contains("holds the lock") || text(loser).contains("in progress"),
            "{t}"
        );
        let now = Release::parse(&value).expect("record");
        assert_eq!(now.meta_str("released_by"), Some(*winner), "{t}");
        assert_eq!(now.tag.as_str(), format!("v{winner}"), "{t}");
        assert_eq!(
            history.len(),
            2,
            "the seed and the winner's write only: {history:?}\n{t}"
        );
        assert_eq!(lock, None, "the winner let the lock go: {t}");
        assert_eq!(
            refreshes.len(),
            1,
            "one refresh started: {refreshes:?}\n{t}"
        );
    }
}

#[tokio::test]
async fn a_stale_lock_is_reported_and_cleared_by_unlock() {
    let ssm = aws_sdk_ssm::Client::new(&moto_sdk().await);
    let param = format!("/{}/release", unique("stale"));
    let lock = format!("{param}-lock");
    put_parameter(&ssm, &param, V1).await;
    let stale = r#"{"owner":"jenkins-app-master-41/123","release":"v0","acquired_at":"2020-01-01T00:00:00Z","expires_at":"2020-01-01T01:30:00Z"}"#;
    put_parameter(&ssm, &lock, stale).await;
    let g = group("stale").await;
    let env = [];
    let refused = ctl_env(&release_by(&param, &g.name, "v2", "ci"), &env);
    let t = text(&refused);
    assert_eq!(refused.status.code(), Some(4), "{t}");
    for needle in [
        "stale",
        "jenkins-app-master-41/123",
        "since 2020-01-01T00:00:00Z",
        // How long ago, and when it expired: the holder's age tells a stuck release from a
        // slow one.
        "ago), expired 2020-01-01T01:30:00Z",
        "unlock",
    ] {
        assert!(t.contains(needle), "{needle}: {t}");
    }
    assert_eq!(read_param(&ssm, &param).await.as_deref(), Some(V1), "{t}");
    assert_eq!(read_param(&ssm, &lock).await.as_deref(), Some(stale), "{t}");

    let base = [
        "--parameter",
        &param,
        "--asg",
        &g.name,
        "--image",
        "127.0.0.1:1/none/app",
    ];
    // Not a terminal and no --force: refused, the lock stays.
    let mut args = base.to_vec();
    args.push("unlock");
    let asked = ctl_command(&args, &env)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("unlock");
    assert_eq!(asked.status.code(), Some(2), "{}", text(&asked));
    assert!(text(&asked).contains("--force"), "{}", text(&asked));
    assert_eq!(read_param(&ssm, &lock).await.as_deref(), Some(stale));
    args.push("--force");
    let forced = ctl_env(&args, &env);
    assert_eq!(forced.status.code(), Some(0), "{}", text(&forced));
    assert_eq!(read_param(&ssm, &lock).await, None);

    let released = ctl_env(&release_by(&param, &g.name, "v2", "ci"), &env);
    let value = read_param(&ssm, &param).await.expect("value");
    delete_param(&ssm, &param).await;
    g.delete().await;
    assert_eq!(released.status.code(), Some(0), "{}", text(&released));
    assert_eq!(Release::parse(&value).expect("record").tag.as_str(), "v2");
}

#[tokio::test]
async fn wait_lock_waits_for_a_held_lock_to_go() {
    let ssm = aws_sdk_ssm::Client::new(&moto_sdk().await);
    let param = format!("/{}/release", unique("waitlock"));
    let lock = format!("{param}-lock");
    put_parameter(&ssm, &param, V1).await;
    let held = r#"{"owner":"other@host/1","release":"v9","acquired_at":"2026-01-01T00:00:00Z","expires_at":"2999-01-01T00:00:00Z"}"#;
    put_parameter(&ssm, &lock, held).await;
    let g = group("waitlock").await;
    let env = [];
    let mut args = release_by(&param, &g.name, "v2", "ci");
    args.extend(["--wait-lock", "20s"]);
    let child = ctl_command(&args, &env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(
        read_param(&ssm, &param).await.as_deref(),
        Some(V1),
        "nothing written while the lock is held"
    );
    delete_param(&ssm, &lock).await;
    let out = child.wait_with_output().expect("wait");
    let value = read_param(&ssm, &param).await.expect("value");
    delete_param(&ssm, &param).await;
    g.delete().await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("waiting"), "{t}");
    assert_eq!(Release::parse(&value).expect("record").tag.as_str(), "v2");
}
