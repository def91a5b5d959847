//! Over 600 lines: each scenario needs the whole release end to end with the fake agent beside
//! it; the scenarios share that agent and the group fixture.
//!
//! The in-place strategy (issue 13) with the real `ctl` binary against the emulator on :5055
//! (moto: EC2 instance tags, the Auto Scaling group, the target group's health). A small fake
//! agent runs beside it: it reads only the tags ctl writes (`skiff:pull`, `skiff:target`) and
//! answers as the agent does (`skiff:pulled`, `skiff:release`, `skiff:failed`) through moto's
//! CreateTags, remembering the order in which it saw each instruction.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_ec2::types::{Filter, Tag as Ec2Tag};
use aws_sdk_elasticloadbalancingv2::types::{ProtocolEnum, TargetTypeEnum};
use common::*;
use skiff_release::instance_tags;
use skiff_testkit::emulator::Group as Emulated;

const V1: &str = r#"{"tag":"v1"}"#;

/// An emulator group (see [`Emulated`]) with its target group and release parameter.
struct Group {
    group: Emulated,
    elb: aws_sdk_elasticloadbalancingv2::Client,
    ssm: aws_sdk_ssm::Client,
    tg: String,
    param: String,
}

impl std::ops::Deref for Group {
    type Target = Emulated;
    fn deref(&self) -> &Emulated {
        &self.group
    }
}

/// A group of `n` InService instances registered with a target group of their own, each
/// reporting v1, and the release parameter holding v1.
async fn group(prefix: &str, n: i32) -> Group {
    let sdk = moto_sdk().await;
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&sdk);
    let ssm = aws_sdk_ssm::Client::new(&sdk);
    let name = unique(prefix);
    let vpc = ec2.describe_vpcs().send().await.expect("vpcs").vpcs()[0]
        .vpc_id()
        .expect("vpc")
        .to_owned();
    let digits: String = name.chars().filter(char::is_ascii_digit).collect();
    let tg_name = format!("ip{}", &digits[digits.len().saturating_sub(30)..]);
    let tg = elb
        .create_target_group()
        .name(&tg_name)
        .protocol(ProtocolEnum::Http)
        .port(8080)
        .vpc_id(vpc)
        .target_type(TargetTypeEnum::Instance)
        .send()
        .await
        .expect("target group")
        .target_groups()[0]
        .target_group_arn()
        .expect("arn")
        .to_owned();
    let group = Emulated::create(&sdk, &name, n, Some(&tg)).await;
    let param = format!("/{name}/release");
    put_parameter(&ssm, &param, V1).await;
    let g = Group {
        group,
        elb,
        ssm,
        tg,
        param,
    };
    for id in g.instances().await {
        g.tag(&id, instance_tags::RELEASE, "v1").await;
    }
    g
}

impl Group {
    async fn tag(&self, id: &str, key: &str, value: &str) {
        self.ec2
            .create_tags()
            .resources(id)
            .tags(Ec2Tag::builder().key(key).value(value).build())
            .send()
            .await
            .expect("tag");
    }

    /// instance -> key -> value, for the skiff tags.
    async fn tags(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        let ids = self.instances().await;
        let out = self
            .ec2
            .describe_tags()
            .filters(
                Filter::builder()
                    .name("resource-id")
                    .set_values(Some(ids))
                    .build(),
            )
            .send()
            .await
            .expect("describe tags");
        let mut m: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for t in out.tags() {
            let (Some(id), Some(k), Some(v)) = (t.resource_id(), t.key(), t.value()) else {
                continue;
            };
            if k.starts_with("skiff:") {
                m.entry(id.into()).or_default().insert(k.into(), v.into());
            }
        }
        m
    }

    fn base(&self) -> Vec<String> {
        [
            "--parameter",
            &self.param,
            "--asg",
            &self.name,
            "--image",
            "127.0.0.1:5000/skiff/app",
            "--target-group",
            &self.tg,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    async fn delete(&self) {
        self.group.delete().await;
        let _ = self
            .elb
            .delete_target_group()
            .target_group_arn(&self.tg)
            .send()
            .await;
        delete_param(&self.ssm, &self.param).await;
        delete_param(&self.ssm, &format!("{}-lock", self.param)).await;
    }
}

/// What the fake agent saw and did, in order: (instance, what).
#[derive(Debug, Default, Clone)]
struct Seen {
    log: Vec<(String, String)>,
    /// The group's suspended processes at each switch.
    held: Vec<Vec<String>>,
}

/// The group's suspended processes (sorted) and ctl's mark on the group.
async fn processes(g: &Group) -> (Vec<String>, Option<String>) {
    let out = g
        .asg
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(&g.name)
        .send()
        .await
        .expect("describe group");
    let group = &out.auto_scaling_groups()[0];
    let mut p: Vec<String> = group
        .suspended_processes()
        .iter()
        .filter_map(|p| p.process_name().map(str::to_owned))
        .collect();
    p.sort();
    let mark = group
        .tags()
        .iter()
        .find(|t| t.key() == Some("skiff:held-processes"))
        .and_then(|t| t.value().map(str::to_owned));
    (p, mark)
}

const HELD: [&str; 2] = ["HealthCheck", "ReplaceUnhealthy"];

/// A fake agent for every instance of the group: it reads only skiff:pull and skiff:target
/// (as the agent reads them from the instance metadata) and answers with skiff:pulled,
/// skiff:release (the tag) or, for a release in `fails` on that instance, skiff:failed (it
/// keeps running what it ran, and never retries that release). `delay` is the time a switch
/// takes. A release in `flip_back` on that instance is answered `skiff:release` first, then,
/// a second later, `skiff:failed` with the release before reported again: a handover whose new
/// container failed within the agent's hold after the flip.
struct FakeAgent {
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeAgent {
    fn start(
        g: &Group,
        ids: Vec<String>,
        fails: Vec<(String, String)>,
        flip_back: Vec<(String, String)>,
        delay: Duration,
    ) -> FakeAgent {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let log = seen.clone();
        let ec2 = g.ec2.clone();
        let observer = Group {
            group: g.group.clone(),
            elb: g.elb.clone(),
            ssm: g.ssm.clone(),
            tg: g.tg.clone(),
            param: g.param.clone(),
        };
        let task = tokio::spawn(async move {
            // What each instance runs and what it failed, as the agent would remember.
            let mut failed: BTreeSet<(String, String)> = BTreeSet::new();
            loop {
                let Ok(out) = ec2
                    .describe_tags()
                    .filters(
                        Filter::builder()
                            .name("resource-id")
                            .set_values(Some(ids.clone()))
                            .build(),
                    )
                    .filters(
                        Filter::builder()
                            .name("key")
                            .values(instance_tags::PULL)
                            .values(instance_tags::TARGET)
                            .values(instance_tags::PULLED)
                            .values(instance_tags::RELEASE)
                            .build(),
                    )
                    .send()
                    .await
                else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let mut tags: BTreeMap<(String, String), String> = BTreeMap::new();
                for t in out.tags() {
                    if let (Some(id), Some(k), Some(v)) = (t.resource_id(), t.key(), t.value()) {
                        tags.insert((id.into(), k.into()), v.into());
                    }
                }
                let get = |id: &str, k: &str| tags.get(&(id.to_owned(), k.to_owned())).cloned();
                for id in &ids {
                    let answer = |k: &'static str, v: String| {
                        let ec2 = ec2.clone();
                        let id = id.clone();
                        async move {
                            ec2.create_tags()
                                .resources(id)
                                .tags(Ec2Tag::builder().key(k).value(v).build())
                                .send()
                                .await
                                .expect("answer");
                        }
                    };
                    if let Some(pull) = get(id, instance_tags::PULL)
                        .filter(|p| get(id, instance_tags::PULLED).as_ref() != Some(p))
                    {
                        log.lock()
                            .expect("log")
                            .log
                            .push((id.clone(), format!("pull {pull}")));
                        answer(instance_tags::PULLED, pull).await;
                    }
                    let Some(target) = get(id, instance_tags::TARGET) else {
                        continue;
                    };
                    let Ok(want) = instance_tags::decode(&target) else {
                        continue;
                    };
                    let runs = get(id, instance_tags::RELEASE);
                    if runs.as_deref() == Some(want.tag.as_str())
                        || failed.contains(&(id.clone(), target.clone()))
                    {
                        continue;
                    }
                    // Not the agent's business: the test's view of the group while it swaps.
                    let (held, _) = processes(&observer).await;
                    {
                        let mut l = log.lock().expect("log");
                        l.log.push((id.clone(), format!("switch {target}")));
                        l.held.push(held);
                    }
                    tokio::time::sleep(delay).await;
                    if fails.contains(&(id.clone(), want.tag.to_string())) {
                        failed.insert((id.clone(), target.clone()));
                        answer(instance_tags::FAILED, target).await;
                    } else if flip_back.contains(&(id.clone(), want.tag.to_string())) {
                        failed.insert((id.clone(), target.clone()));
                        answer(instance_tags::RELEASE, want.tag.to_string()).await;
                        let before = runs.unwrap_or_default();
                        let later = (
                            answer(instance_tags::FAILED, target),
                            answer(instance_tags::RELEASE, before),
                        );
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            later.0.await;
                            later.1.await;
                        });
                    } else {
                        answer(instance_tags::RELEASE, want.tag.to_string()).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        FakeAgent { seen, task }
    }

    fn log(&self) -> Vec<(String, String)> {
        self.seen.lock().expect("log").log.clone()
    }

    fn held(&self) -> Vec<Vec<String>> {
        self.seen.lock().expect("log").held.clone()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run_ctl(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ctl(&args)
    })
    .await
    .expect("ctl")
}

fn args(g: &Group, tail: &[&str]) -> Vec<String> {
    let mut a = g.base();
    a.extend(tail.iter().map(|s| (*s).to_owned()));
    a
}

const FAST: [&str; 4] = ["--poll", "200ms", "--batch-timeout", "20s"];

/// `ctl release --tag <tag> --skip-verify --strategy in-place <extra> <FAST>` on `g`.
fn release_in_place(g: &Group, tag: &str, extra: &[&str]) -> Vec<String> {
    let mut a = args(
        g,
        &[
            "release",
            "--tag",
            tag,
            "--skip-verify",
            "--strategy",
            "in-place",
        ],
    );
    a.extend(extra.iter().chain(FAST.iter()).map(|s| (*s).to_owned()));
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_place_release_rollback_and_a_failing_release() {
    let g = group("skiff-ctl-ip", 3).await;
    let ids = g.instances().await;
    assert_eq!(ids.len(), 3, "{ids:?}");
    let agent = FakeAgent::start(
        &g,
        ids.clone(),
        vec![(ids[0].clone(), "v3".into())],
        vec![],
        Duration::from_millis(300),
    );

    // Dry run: the plan, nothing tagged.
    let out = run_ctl(args(
        &g,
        &[
            "release",
            "--tag",
            "v2",
            "--skip-verify",
            "--strategy",
            "in-place",
            "--dry-run",
        ],
    ))
    .await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains(&format!(
            "3 batch(es) [{}] [{}] [{}]",
            ids[0], ids[1], ids[2]
        )),
        "{t}"
    );
    assert!(
        agent.log().is_empty(),
        "a dry run tags nothing: {:?}",
        agent.log()
    );

    // The release: pulled everywhere first, then one instance at a time.
    let a = release_in_place(&g, "v2", &[]);
    let out = run_ctl(a).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("released v2 in place: 3 instance(s) run it, 3 switched in 3 batch(es)"),
        "{t}"
    );
    for (n, id) in ids.iter().enumerate() {
        assert!(
            t.contains(&format!("in-place: batch {}/3: switch {id} to v2", n + 1))
                && t.contains(&format!(
                    "in-place: batch {}/3: {id} healthy on the new release in",
                    n + 1
                )),
            "{t}"
        );
    }
    let log = agent.log();
    let want: Vec<(String, String)> = ids
        .iter()
        .map(|id| (id.clone(), "pull v2".to_owned()))
        .chain(ids.iter().map(|id| (id.clone(), "switch v2".to_owned())))
        .collect();
    assert_eq!(log, want, "pull on all, then switch in batch order");
    let tags = g.tags().await;
    for id in &ids {
        assert_eq!(tags[id]["skiff:release"], "v2", "{tags:?}");
        assert_eq!(tags[id]["skiff:target"], "v2", "{tags:?}");
    }
    let value = read_param(&g.ssm, &g.param).await.expect("parameter");
    assert!(value.contains(r#""tag":"v2""#), "{value}");
    let held = agent.held();
    assert!(
        held.len() == 3 && held.iter().all(|h| h == &HELD),
        "the group's health checks held during every swap: {held:?}"
    );
    assert_eq!(processes(&g).await, (vec![], None), "resumed, unmarked");

    // status: the rollout line and each instance's skiff:target.
    let mut a = g.base();
    a.push("status".into());
    let out = run_ctl(a).await;
    let t = text(&out);
    assert!(
        t.contains("rollout    3 of 3 instances run v2 (in place)"),
        "{t}"
    );
    assert!(t.contains("SKIFF:TARGET"), "{t}");

    // A release that fails its health gate on the first instance: only the first batch is
    // touched, it is told v2 again, the parameter holds v2 again, exit 1. Someone suspended
    // ReplaceUnhealthy meanwhile: left so.
    g.asg
        .suspend_processes()
        .auto_scaling_group_name(&g.name)
        .scaling_processes("ReplaceUnhealthy")
        .send()
        .await
        .expect("suspend");
    let before = agent.log().len();
    let a = release_in_place(&g, "v3", &["--json"]);
    let out = run_ctl(a).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "rolled back: {t}");
    let switches: Vec<(String, String)> = agent.log()[before..]
        .iter()
        .filter(|(_, what)| what.starts_with("switch"))
        .cloned()
        .collect();
    assert_eq!(
        switches,
        vec![(ids[0].clone(), "switch v3".to_owned())],
        "only the first batch was switched: {t}"
    );
    let tags = g.tags().await;
    assert_eq!(
        tags[&ids[0]]["skiff:target"], "v2",
        "told to go back: {tags:?}"
    );
    assert_eq!(tags[&ids[0]]["skiff:failed"], "v3", "{tags:?}");
    for id in &ids[1..] {
        assert_eq!(tags[id]["skiff:target"], "v2", "never told v3: {tags:?}");
        assert_eq!(tags[id]["skiff:pulled"], "v3", "but pulled it: {tags:?}");
    }
    let value = read_param(&g.ssm, &g.param).await.expect("parameter");
    assert!(value.contains(r#""tag":"v2""#), "{value}");
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let steps: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "rollout")
        .filter_map(|e| e["step"].as_str())
        .filter(|step| *step != "waiting")
        .collect();
    assert_eq!(
        steps,
        vec![
            "plan",
            "pulling",
            "pulled",
            "held",
            "switching",
            "reverting",
            "reverted",
            "resumed"
        ],
        "{t}"
    );
    let last = events.last().expect("outcome");
    assert_eq!(last["outcome"], "rolled_back", "{t}");
    assert_eq!(
        processes(&g).await,
        (vec!["ReplaceUnhealthy".to_owned()], None),
        "only ctl's own hold resumed: {t}"
    );
    g.asg
        .resume_processes()
        .auto_scaling_group_name(&g.name)
        .scaling_processes("ReplaceUnhealthy")
        .send()
        .await
        .expect("resume");
    assert!(
        last["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&ids[0]) && r.contains("health gate")),
        "{t}"
    );

    // ctl rollback in place: back to v1 on every instance.
    let mut a = args(&g, &["rollback", "--strategy", "in-place"]);
    a.extend(FAST.iter().map(|s| (*s).to_owned()));
    let out = run_ctl(a).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("released v1 in place"), "{t}");
    let tags = g.tags().await;
    for id in &ids {
        assert_eq!(tags[id]["skiff:release"], "v1", "{tags:?}");
    }
    drop(agent);
    g.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rerun_after_ctl_was_killed_skips_the_instances_already_on_the_release() {
    let g = group("skiff-ctl-ipk", 3).await;
    let ids = g.instances().await;
    // Slow switches, so that ctl is killed while the second batch switches.
    let agent = FakeAgent::start(&g, ids.clone(), vec![], vec![], Duration::from_secs(2));
    let a = release_in_place(&g, "v2", &[]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let mut child = ctl_command(&a, &[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn ctl");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let tags = g.tags().await;
        if tags
            .get(&ids[0])
            .and_then(|t| t.get("skiff:release"))
            .is_some_and(|r| r == "v2")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "first batch never done: {tags:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().expect("SIGKILL ctl");
    let _ = child.wait();
    let held = HELD.map(String::from).to_vec();
    assert_eq!(
        processes(&g).await,
        (
            held.clone(),
            Some("HealthCheck:ReplaceUnhealthy".to_owned())
        ),
        "the killed run's hold stays, marked as ctl's"
    );

    // status says so: the rollout is half way.
    let mut s = g.base();
    s.push("status".into());
    let out = run_ctl(s).await;
    let t = text(&out);
    assert!(
        t.contains(" of 3 instances run v2 (in place)") && !t.contains("3 of 3"),
        "{t}"
    );
    assert!(
        t.contains("held by an in-place rollout: HealthCheck ReplaceUnhealthy"),
        "{t}"
    );

    // Clearing the killed run's lock says what it left suspended and keeps it (issue 18,
    // finding 11): resuming now would let Auto Scaling replace an instance the killed run left
    // mid-swap. The release run again takes the hold over and resumes it at its end.
    let mut u = g.base();
    u.extend(["unlock".to_owned(), "--force".to_owned()]);
    let out = run_ctl(u).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("HealthCheck ReplaceUnhealthy stay suspended on group")
            && t.contains("`ctl unlock --resume`"),
        "{t}"
    );
    assert_eq!(
        processes(&g).await,
        (
            held.clone(),
            Some("HealthCheck:ReplaceUnhealthy".to_owned())
        ),
        "kept for the re-run to take over"
    );
    let before = agent.log().len();
    let a = release_in_place(&g, "v2", &[]);
    let out = run_ctl(a).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains(&format!("already on it: {}", ids[0])), "{t}");
    let again: Vec<String> = agent.log()[before..]
        .iter()
        .filter(|(_, what)| what.starts_with("switch"))
        .map(|(id, _)| id.clone())
        .collect();
    assert!(!again.contains(&ids[0]), "not switched twice: {again:?}");
    assert_eq!(
        processes(&g).await,
        (vec![], None),
        "the re-run held and resumed again: {t}"
    );
    let tags = g.tags().await;
    for id in &ids {
        assert_eq!(tags[id]["skiff:release"], "v2", "{tags:?}");
    }
    drop(agent);
    g.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_rollout_reverts_the_switched_instances() {
    let g = group("skiff-ctl-ips", 3).await;
    let ids = g.instances().await;
    let agent = FakeAgent::start(&g, ids.clone(), vec![], vec![], Duration::from_secs(1));
    let a = release_in_place(&g, "v2", &[]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let child = ctl_command(&a, &[])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ctl");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let tags = g.tags().await;
        if tags
            .get(&ids[0])
            .and_then(|t| t.get("skiff:release"))
            .is_some_and(|r| r == "v2")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "first batch never done: {tags:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("ctl");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "reverted: {t}");
    assert!(t.contains("stopped by SIGTERM"), "{t}");
    let tags = g.tags().await;
    for id in &ids {
        assert_eq!(tags[id]["skiff:release"], "v1", "back on v1: {tags:?}");
        assert_ne!(
            tags[id].get("skiff:target").map(String::as_str),
            Some("v2"),
            "no instance is still told v2: {tags:?}"
        );
    }
    let value = read_param(&g.ssm, &g.param).await.expect("parameter");
    assert!(value.contains(r#""tag":"v1""#), "{value}");
    assert!(
        read_param(&g.ssm, &format!("{}-lock", g.param))
            .await
            .is_none(),
        "lock let go"
    );
    assert_eq!(processes(&g).await, (vec![], None), "resumed: {t}");
    drop(agent);
    g.delete().await;
}

/// A stack whose only business is its outputs (the deployment itself is given by flags, which
/// win over them): `SwapMode` = `swap`, as templates/app.yaml names it.
async fn swap_stack(g: &Group, swap: &str) -> (aws_sdk_cloudformation::Client, String) {
    let cfn = aws_sdk_cloudformation::Client::new(&moto_sdk().await);
    let stack = format!("{}-stack", g.name);
    let template = serde_json::json!({
        "Resources": {
            "Anchor": {"Type": "AWS::SSM::Parameter", "Properties": {
                "Name": format!("/{}/anchor", g.name), "Type": "String", "Value": "x"}}
        },
        "Outputs": {
            "ReleaseStrategy": {"Value": "in-place"},
            "SwapMode": {"Value": swap}
        }
    });
    cfn.create_stack()
        .stack_name(&stack)
        .template_body(template.to_string())
        .send()
        .await
        .expect("create stack");
    (cfn, stack)
}

/// The rollout steps of a `--json` run, without the waits.
fn steps(out: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "rollout" && e["step"] != "waiting")
        .filter_map(|e| e["step"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handover_canary_first_no_target_ever_unhealthy_and_a_flip_back_reverts() {
    let g = group("skiff-ctl-iph", 3).await;
    let ids = g.instances().await;
    let (cfn, stack) = swap_stack(&g, "handover").await;
    // The last instance's agent flips v3 back within its hold, after answering it.
    let agent = FakeAgent::start(
        &g,
        ids.clone(),
        vec![],
        vec![(ids[2].clone(), "v3".into())],
        Duration::from_millis(300),
    );
    let with_stack = |tag: &str| {
        let mut a = vec!["--stack".to_owned(), stack.clone()];
        a.extend(release_in_place(&g, tag, &["--batch", "2", "--json"]));
        a
    };

    // The stack says handover: a canary of one, then batches of 2. No target is ever anything
    // but healthy (the emulator calls every registered target healthy, as a handover keeps
    // it): each batch is done once its agents answer, and the last is watched for the hold.
    let out = run_ctl(with_stack("v2")).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let plan = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "rollout" && e["step"] == "plan")
        .expect("plan");
    assert_eq!(plan["swap"], "handover", "{t}");
    assert_eq!(
        plan["batches"],
        serde_json::json!([[ids[0]], [ids[1], ids[2]]]),
        "{t}"
    );
    assert_eq!(
        steps(&out),
        [
            "plan",
            "pulling",
            "pulled",
            "held",
            "switching",
            "healthy",
            "switching",
            "healthy",
            "settled",
            "resumed"
        ],
        "{t}"
    );
    let tags = g.tags().await;
    for id in &ids {
        assert_eq!(tags[id]["skiff:release"], "v2", "{tags:?}");
    }

    // v3 flips back on the last instance a second after it answered: the batch was done, the
    // watch over the agents' hold sees skiff:failed and ctl reverts every switched instance.
    let out = run_ctl(with_stack("v3")).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "reverted: {t}");
    assert!(
        t.contains(&ids[2]) && t.contains("reports v3 failed"),
        "the flip back is the reason: {t}"
    );
    let steps = steps(&out);
    assert!(
        steps.ends_with(&[
            "switching".to_owned(),
            "healthy".to_owned(),
            "reverting".to_owned(),
            "reverted".to_owned(),
            "resumed".to_owned()
        ]),
        "{steps:?} {t}"
    );
    let tags = g.tags().await;
    for id in &ids {
        assert_eq!(tags[id]["skiff:target"], "v2", "told v2 again: {tags:?}");
        assert_eq!(tags[id]["skiff:release"], "v2", "{tags:?}");
    }
    let value = read_param(&g.ssm, &g.param).await.expect("parameter");
    assert!(value.contains(r#""tag":"v2""#), "{value}");
    drop(agent);
    let _ = cfn.delete_stack().stack_name(&stack).send().await;
    delete_param(&g.ssm, &format!("/{}/anchor", g.name)).await;
    g.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_refuses_to_take_every_healthy_target_out_unless_the_downtime_is_accepted() {
    // No stack, so no SwapMode: drain. One instance: its batch is every healthy target.
    let g = group("skiff-ctl-ipd", 1).await;
    let ids = g.instances().await;
    let out = run_ctl(release_in_place(&g, "v2", &[])).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "refused: {t}");
    assert!(
        t.contains("holds every target the load balancer calls healthy")
            && t.contains("--accept-downtime"),
        "{t}"
    );
    let value = read_param(&g.ssm, &g.param).await.expect("parameter");
    assert_eq!(value, V1, "nothing written");
    let tags = g.tags().await;
    assert_eq!(
        tags[&ids[0]].keys().collect::<Vec<_>>(),
        ["skiff:release"],
        "nothing tagged: {tags:?}"
    );
    assert!(
        read_param(&g.ssm, &format!("{}-lock", g.param))
            .await
            .is_none(),
        "lock let go"
    );

    // Accepted: it swaps.
    let agent = FakeAgent::start(&g, ids.clone(), vec![], vec![], Duration::from_millis(100));
    let out = run_ctl(release_in_place(&g, "v2", &["--accept-downtime"])).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert_eq!(g.tags().await[&ids[0]]["skiff:release"], "v2");
    drop(agent);
    g.delete().await;
}

/// A CloudWatch alarm in the emulator named `name`, in OK.
async fn alarm(name: &str) -> aws_sdk_cloudwatch::Client {
    let cw = aws_sdk_cloudwatch::Client::new(&moto_sdk().await);
    cw.put_metric_alarm()
        .alarm_name(name)
        .namespace("AWS/ApplicationELB")
        .metric_name("HTTPCode_Target_5XX_Count")
        .statistic(aws_sdk_cloudwatch::types::Statistic::Sum)
        .period(60)
        .evaluation_periods(2)
        .threshold(5.0)
        .comparison_operator(aws_sdk_cloudwatch::types::ComparisonOperator::GreaterThanThreshold)
        .send()
        .await
        .expect("alarm");
    cw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn release_alarms_are_watched_for_a_window_after_the_last_batch() {
    // Issue 18, finding 10: the alarms' datapoints arrive minutes after the last swap; a
    // release that counts as done at once would never be failed by them.
    let g = group("skiff-ctl-ipal", 2).await;
    let ids = g.instances().await;
    let agent = FakeAgent::start(&g, ids.clone(), vec![], vec![], Duration::from_millis(200));
    let name = unique("skiff-ctl-alarm");
    let cw = alarm(&name).await;

    // No alarm fires within the window: done, after the whole window.
    let t = std::time::Instant::now();
    let out = run_ctl(release_in_place(
        &g,
        "v2",
        &["--alarm", &name, "--alarm-window", "3s"],
    ))
    .await;
    let text_ok = text(&out);
    assert_eq!(out.status.code(), Some(0), "{text_ok}");
    assert!(
        text_ok.contains("in-place: no release alarm fired within")
            && text_ok.contains(&format!("after the last batch: {name}")),
        "{text_ok}"
    );
    assert!(t.elapsed() >= Duration::from_secs(3), "{:?}", t.elapsed());

    // The alarm goes to ALARM once every instance runs v3, within the window: the release
    // fails, every instance is told v2 again and the parameter holds v2.
    let watcher = {
        let g2 = Group {
            group: g.group.clone(),
            elb: g.elb.clone(),
            ssm: g.ssm.clone(),
            tg: g.tg.clone(),
            param: g.param.clone(),
        };
        let ids = ids.clone();
        let cw = cw.clone();
        let name = name.clone();
        tokio::spawn(async move {
            for _ in 0..600 {
                let tags = g2.tags().await;
                if ids
                    .iter()
                    .all(|id| tags[id].get("skiff:release").map(String::as_str) == Some("v3"))
                {
                    cw.set_alarm_state()
                        .alarm_name(&name)
                        .state_value(aws_sdk_cloudwatch::types::StateValue::Alarm)
                        .state_reason("test: the release broke the app")
                        .send()
                        .await
                        .expect("set alarm state");
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        })
    };
    let out = run_ctl(release_in_place(
        &g,
        "v3",
        &["--alarm", &name, "--alarm-window", "60s"],
    ))
    .await;
    let t = text(&out);
    assert!(
        watcher.await.expect("watcher"),
        "every instance ran v3: {t}"
    );
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains(&format!("in ALARM: {name}")), "{t}");
    let tags = g.tags().await;
    for id in &ids {
        assert_eq!(tags[id]["skiff:target"], "v2", "reverted: {tags:?}");
    }
    let value = read_param(&g.ssm, &g.param).await.expect("parameter");
    assert!(value.contains(r#""tag":"v2""#), "{value}");
    assert_eq!(processes(&g).await, (vec![], None), "resumed, unmarked");
    cw.delete_alarms()
        .alarm_names(&name)
        .send()
        .await
        .expect("delete alarm");
    drop(agent);
    g.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refresh_watching_alarms_bakes_for_the_alarm_window() {
    let g = group("skiff-ctl-bake", 1).await;
    let name = unique("skiff-ctl-bake-alarm");
    let cw = alarm(&name).await;
    for (extra, want) in [
        (vec![], None),
        (vec!["--alarm", name.as_str()], Some(240)),
        (
            vec!["--alarm", name.as_str(), "--bake-time", "10m"],
            Some(600),
        ),
        (
            vec!["--alarm", name.as_str(), "--alarm-window", "5s"],
            Some(5),
        ),
        (vec!["--alarm", name.as_str(), "--alarm-window", "0s"], None),
    ] {
        let mut a = args(
            &g,
            &[
                "release",
                "--tag",
                "v2",
                "--skip-verify",
                "--strategy",
                "refresh",
                "--no-wait",
            ],
        );
        a.extend(extra.iter().map(|s| (*s).to_owned()));
        let out = run_ctl(a).await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let r = g
            .asg
            .describe_instance_refreshes()
            .auto_scaling_group_name(&g.name)
            .max_records(1)
            .send()
            .await
            .expect("refreshes");
        let latest = &r.instance_refreshes()[0];
        assert_eq!(
            latest.preferences().and_then(|p| p.bake_time()),
            want,
            "{extra:?}: {latest:?}"
        );
        g.asg
            .cancel_instance_refresh()
            .auto_scaling_group_name(&g.name)
            .send()
            .await
            .expect("cancel");
        // The next release waits for the group: let the cancel land.
        for _ in 0..100 {
            let r = g
                .asg
                .describe_instance_refreshes()
                .auto_scaling_group_name(&g.name)
                .max_records(1)
                .send()
                .await
                .expect("refreshes");
            if r.instance_refreshes()[0].status()
                != Some(&aws_sdk_autoscaling::types::InstanceRefreshStatus::Cancelling)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    cw.delete_alarms()
        .alarm_names(&name)
        .send()
        .await
        .expect("delete alarm");
    g.delete().await;
}

/// Leave the group as a SIGKILLed in-place run does: HealthCheck and ReplaceUnhealthy
/// suspended under ctl's mark.
async fn killed_run_hold(g: &Group) {
    g.asg
        .suspend_processes()
        .auto_scaling_group_name(&g.name)
        .set_scaling_processes(Some(HELD.map(String::from).to_vec()))
        .send()
        .await
        .expect("suspend");
    g.asg
        .create_or_update_tags()
        .tags(
            aws_sdk_autoscaling::types::Tag::builder()
                .resource_id(&g.name)
                .resource_type("auto-scaling-group")
                .key("skiff:held-processes")
                .value("HealthCheck:ReplaceUnhealthy")
                .propagate_at_launch(false)
                .build(),
        )
        .send()
        .await
        .expect("mark");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refresh_release_resumes_a_killed_runs_hold_first() {
    let g = group("skiff-ctl-iph", 1).await;
    let held = HELD.map(String::from).to_vec();
    // Someone else's suspension (no mark) is theirs: neither unlock nor a release resumes it.
    g.asg
        .suspend_processes()
        .auto_scaling_group_name(&g.name)
        .set_scaling_processes(Some(held.clone()))
        .send()
        .await
        .expect("suspend");
    let mut u = g.base();
    u.extend(["unlock".to_owned(), "--force".to_owned()]);
    let out = run_ctl(u.clone()).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!text(&out).contains("resumed"), "{}", text(&out));
    assert_eq!(processes(&g).await, (held.clone(), None), "not ctl's: kept");
    g.asg
        .resume_processes()
        .auto_scaling_group_name(&g.name)
        .send()
        .await
        .expect("resume");

    // `ctl unlock --resume`: the killed run's hold is resumed and unmarked at once.
    killed_run_hold(&g).await;
    let mut u = g.base();
    u.extend([
        "unlock".to_owned(),
        "--force".to_owned(),
        "--resume".to_owned(),
    ]);
    let out = run_ctl(u).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("resumed HealthCheck ReplaceUnhealthy on group")
            && t.contains("left suspended by an in-place run that was killed"),
        "{t}"
    );
    assert_eq!(
        processes(&g).await,
        (vec![], None),
        "resumed, unmarked: {t}"
    );

    // A refresh release: the killed run's hold is resumed once the lock is held, before the
    // refresh starts.
    killed_run_hold(&g).await;
    let mut a = args(
        &g,
        &[
            "release",
            "--tag",
            "v2",
            "--skip-verify",
            "--strategy",
            "refresh",
            "--no-wait",
        ],
    );
    a.extend(["--no-alarms".to_owned()]);
    let out = run_ctl(a).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("resumed HealthCheck ReplaceUnhealthy, left suspended by an in-place run that was killed"),
        "{t}"
    );
    assert_eq!(
        processes(&g).await,
        (vec![], None),
        "resumed, unmarked: {t}"
    );
    g.asg
        .cancel_instance_refresh()
        .auto_scaling_group_name(&g.name)
        .send()
        .await
        .expect("cancel");
    g.delete().await;
}
