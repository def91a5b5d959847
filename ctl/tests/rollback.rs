//! `ctl rollback` through the real binary and the same path as `ctl release`: the parameter
//! and its history in moto's SSM, the instance refreshes in the emulator's Auto Scaling (a group
//! of its own per case; a refresh fails as in AWS when a replacement's launch is abandoned by
//! its lifecycle hook). Each case checks the exit code and the parameter afterwards.

mod common;

use std::time::Duration;

use common::*;
use skiff_release::Release;
use skiff_testkit::emulator::Group;

/// The launch hook the groups hold their replacements with.
const HOOK: &str = "skiff-launch";

/// A group of one instance whose replacements wait for the launch hook.
async fn group(prefix: &str) -> Group {
    let g = Group::create(&moto_sdk().await, &unique(prefix), 1, None).await;
    g.hold_launches(HOOK, 300).await;
    g
}

/// The `SkipMatching` preference of each refresh of the group, newest first.
async fn skip_matching(g: &Group) -> Vec<Option<bool>> {
    g.asg
        .describe_instance_refreshes()
        .auto_scaling_group_name(&g.name)
        .send()
        .await
        .expect("describe instance refreshes")
        .instance_refreshes()
        .iter()
        .map(|r| r.preferences().and_then(|p| p.skip_matching()))
        .collect()
}

/// A release record whose digest is `c` repeated.
fn record(tag: &str, c: char) -> String {
    format!(
        r#"{{"tag":"{tag}","digest":"sha256:{}","released_by":"ci"}}"#,
        c.to_string().repeat(64)
    )
}

/// A fresh parameter whose history is `values`, oldest first.
async fn seed(values: &[String]) -> (aws_sdk_ssm::Client, String) {
    let ssm = aws_sdk_ssm::Client::new(&moto_sdk().await);
    let param = format!("/{}/release", unique("rollback"));
    for v in values {
        put_parameter(&ssm, &param, v).await;
    }
    (ssm, param)
}

/// `ctl rollback EXTRA...` on group `g`. The image is unreachable on purpose: a rollback pins
/// a recorded digest and must not need the registry.
fn rollback(g: &Group, param: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "--parameter",
        param,
        "--asg",
        &g.name,
        "--image",
        "127.0.0.1:1/none/app",
        "rollback",
        "--released-by",
        "rollback-test",
        "--poll",
        "200ms",
        "--timeout",
        "60s",
    ];
    args.extend_from_slice(extra);
    ctl_env(&args, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_releases_the_chosen_record_from_the_history() {
    let cases: &[(&str, Vec<String>, &[&str], String)] = &[
        (
            "previous release",
            vec![record("v1", 'a'), record("v2", 'b'), record("v3", 'c')],
            &[],
            record("v2", 'b'),
        ),
        (
            "re-releases of the current tag are skipped",
            vec![record("v1", 'a'), record("v2", 'b'), record("v2", 'c')],
            &[],
            record("v1", 'a'),
        ),
        (
            "--to picks the newest record with that tag",
            vec![
                record("v1", 'a'),
                record("v2", 'b'),
                record("v1", 'd'),
                "not a release {".into(),
                record("v3", 'c'),
            ],
            &["--to", "v1"],
            record("v1", 'd'),
        ),
    ];
    for (name, history, extra, want) in cases {
        let (ssm, param) = seed(history).await;
        // The group's newest refresh before the rollback succeeded.
        let g = group("rollback").await;
        let answering = g.stand_in_agents(HOOK, 0);
        g.asg
            .start_instance_refresh()
            .auto_scaling_group_name(&g.name)
            .send()
            .await
            .expect("earlier refresh");
        while g.refreshes().await[0].1 != "Successful" {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let out = tokio::task::block_in_place(|| rollback(&g, &param, extra));
        let value = read_param(&ssm, &param).await.expect("value");
        delete_param(&ssm, &param).await;
        let (refreshes, skip) = (g.refreshes().await, skip_matching(&g).await);
        answering.abort();
        g.delete().await;
        let t = text(&out);
        assert_eq!(out.status.code(), Some(0), "{name}: {t}");
        let now = Release::parse(&value).expect("record");
        let want = Release::parse(want).expect("want");
        assert_eq!(now.tag, want.tag, "{name}: {t}");
        assert_eq!(
            now.digest, want.digest,
            "{name}: the recorded digest is pinned again"
        );
        assert_eq!(now.meta_str("released_by"), Some("rollback-test"), "{name}");
        assert!(now.meta_str("released_at").is_some(), "{name}");
        assert_eq!(
            refreshes.len(),
            2,
            "{name}: the earlier one and one: {refreshes:?}"
        );
        assert_eq!(skip[0], Some(false), "{name}: every instance is replaced");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rollback_refresh_puts_the_current_record_back_and_exits_1() {
    let before = record("v2", 'b');
    let (ssm, param) = seed(&[record("v1", 'a'), before.clone()]).await;
    let g = group("rollfail").await;
    let answering = g.stand_in_agents(HOOK, 1);
    let out = tokio::task::block_in_place(|| rollback(&g, &param, &[]));
    let value = read_param(&ssm, &param).await.expect("value");
    delete_param(&ssm, &param).await;
    let refreshes = g.refreshes().await;
    answering.abort();
    g.delete().await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("rolled back"), "{t}");
    let (now, before) = (
        Release::parse(&value).expect("record"),
        Release::parse(&before).expect("before"),
    );
    assert_eq!(
        (&now.tag, &now.digest),
        (&before.tag, &before.digest),
        "the record from before the rollback is back: {t}"
    );
    assert_eq!(now.meta_str("kind"), Some("compensation"), "{t}");
    assert_eq!(refreshes.len(), 2, "{refreshes:?}\n{t}");
}

struct Refusal {
    name: &'static str,
    history: Vec<String>,
    args: &'static [&'static str],
    /// State of the group's newest refresh.
    before: Option<&'static str>,
    /// A release lock held by someone else.
    lock: Option<&'static str>,
    code: i32,
    needle: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_refusals_exit_2_or_4_and_change_nothing() {
    let cases = [
        Refusal {
            name: "unknown --to tag",
            history: vec![record("v1", 'a'), record("v2", 'b')],
            args: &["--to", "v9"],
            before: None,
            lock: None,
            code: 2,
            needle: "not in the release history",
        },
        Refusal {
            name: "no earlier release",
            history: vec![record("v1", 'a'), record("v1", 'b')],
            args: &[],
            before: None,
            lock: None,
            code: 2,
            needle: "no earlier release",
        },
        Refusal {
            name: "a refresh is running",
            history: vec![record("v1", 'a'), record("v2", 'b')],
            args: &[],
            before: Some("InProgress"),
            lock: None,
            code: 4,
            needle: "another release is in progress",
        },
        Refusal {
            name: "a release holds the lock",
            history: vec![record("v1", 'a'), record("v2", 'b')],
            args: &[],
            before: None,
            lock: Some(
                r#"{"owner":"jenkins-app-master-7/42","release":"v3","acquired_at":"2026-01-01T00:00:00Z","expires_at":"2999-01-01T00:00:00Z"}"#,
            ),
            code: 4,
            needle: "jenkins-app-master-7/42",
        },
    ];
    for c in &cases {
        let (ssm, param) = seed(&c.history).await;
        let lock = format!("{param}-lock");
        if let Some(l) = c.lock {
            put_parameter(&ssm, &lock, l).await;
        }
        // A refresh of the group's own, held by the launch hook no one answers.
        let g = group("refusal").await;
        if c.before.is_some() {
            g.asg
                .start_instance_refresh()
                .auto_scaling_group_name(&g.name)
                .send()
                .await
                .expect("running refresh");
        }
        let out = tokio::task::block_in_place(|| rollback(&g, &param, c.args));
        let value = read_param(&ssm, &param).await;
        let held = read_param(&ssm, &lock).await;
        delete_param(&ssm, &param).await;
        delete_param(&ssm, &lock).await;
        let refreshes = g.refreshes().await;
        g.delete().await;
        assert_eq!(held.as_deref(), c.lock, "{}: the lock is theirs", c.name);
        let (name, t) = (c.name, text(&out));
        assert_eq!(out.status.code(), Some(c.code), "{name}: {t}");
        assert!(t.contains(c.needle), "{name}: {t}");
        assert_eq!(
            value.as_ref(),
            c.history.last(),
            "{name}: parameter changed"
        );
        assert_eq!(
            refreshes.len(),
            usize::from(c.before.is_some()),
            "{name}: none started: {refreshes:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_after_a_compensated_release_goes_to_the_last_good_release() {
    // v0 and v1 were good; v2's refresh fails and ctl puts v1 back: the history is
    // v0, v1, v2, v1. `ctl rollback` must go to v0, not to v2, which was rolled back.
    let (ssm, param) = seed(&[record("v0", 'a'), record("v1", 'b')]).await;
    let g = group("compensated").await;
    let answering = g.stand_in_agents(HOOK, 1);
    let failed = tokio::task::block_in_place(|| {
        ctl_env(&release_args(&param, &g.name, "v2", "200ms", &[]), &[])
    });
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed));
    let out = tokio::task::block_in_place(|| rollback(&g, &param, &[]));
    let value = read_param(&ssm, &param).await.expect("value");
    delete_param(&ssm, &param).await;
    answering.abort();
    g.delete().await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let now = Release::parse(&value).expect("record");
    let want = Release::parse(&record("v0", 'a')).expect("v0");
    assert_eq!((&now.tag, &now.digest), (&want.tag, &want.digest), "{t}");
    assert_eq!(now.meta_str("kind"), Some("rollback"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_by_someone_else_during_a_failing_release_is_not_overwritten() {
    let (ssm, param) = seed(&[record("v1", 'a')]).await;
    let g = group("hotfix").await;
    let child = ctl_command(&release_args(&param, &g.name, "v2", "200ms", &[]), &[])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // While the refresh runs (its replacement waits for the launch hook), someone releases a
    // hotfix by hand; then the replacement's launch is abandoned and the refresh fails.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !g.states().await.iter().any(|(_, s)| s == "Pending:Wait") {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            g.refreshes().await
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let hotfix = record("hotfix", 'f');
    put_parameter(&ssm, &param, &hotfix).await;
    let during = g.refreshes().await;
    let answering = g.stand_in_agents(HOOK, 1);
    let out = tokio::task::block_in_place(|| child.wait_with_output().expect("wait"));
    let value = read_param(&ssm, &param).await.expect("value");
    delete_param(&ssm, &param).await;
    let refreshes = g.refreshes().await;
    answering.abort();
    g.delete().await;
    let t = text(&out);
    assert_eq!(
        during.iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>(),
        ["InProgress"],
        "the hotfix was written while the refresh ran: {t}"
    );
    assert_eq!(out.status.code(), Some(3), "{t}");
    assert!(t.contains("someone else changed the parameter"), "{t}");
    assert!(t.contains("hotfix"), "{t}");
    assert_eq!(value, hotfix, "not overwritten: {t}");
    assert_eq!(
        refreshes.len(),
        1,
        "no rollback refresh: {refreshes:?}\n{t}"
    );
}
