//! Signed releases through the real `ctl` binary: images and cosign signatures in the real
//! registries (:5000 anonymous; :5002 token auth, ECR-shaped, over :5000's storage), the
//! parameter, its history, the lock and the instance refreshes in the AWS emulator (:5055).
//! ctl's wiring only: every kind of refusal reaches exit 2 with nothing written. The verifier's
//! own refusals (a tampered payload, a malformed or huge manifest) are tested where it lives
//! (`ctl/tests/signatures.rs` against the registries, `signature/src/tests.rs`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::token_service::TokenService;
use common::*;
use skiff_ctl::registry::HttpRegistry;
use skiff_release::Digest;
use skiff_signature::FileKey;
use skiff_testkit::emulator::Group;

/// One test's world: a repository of its own, a group of one instance, the release parameter
/// (seeded with a release of another image) and a directory for key files.
struct World {
    registry: HttpRegistry,
    repo: String,
    ssm: aws_sdk_ssm::Client,
    param: String,
    group: Group,
    dir: PathBuf,
}

const SEED: &str = r#"{"tag":"v0","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000"}"#;

impl World {
    async fn new(prefix: &str) -> World {
        let sdk = moto_sdk().await;
        let name = unique(prefix);
        let ssm = aws_sdk_ssm::Client::new(&sdk);
        let param = format!("/{name}/release");
        put_parameter(&ssm, &param, SEED).await;
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).expect("key dir");
        World {
            registry: HttpRegistry::new(None).expect("client"),
            repo: format!("127.0.0.1:5000/{name}/app"),
            ssm,
            param,
            group: Group::create(&sdk, &name, 1, None).await,
            dir,
        }
    }

    /// A world, a signing key and a keys file trusting it.
    async fn keyed(prefix: &str) -> (World, FileKey, PathBuf) {
        let w = World::new(prefix).await;
        let key = openssl_key();
        let keys = w.trusted("keys.pem", &[&key]);
        (w, key, keys)
    }

    /// Push image `tag` (its content: the tag and `salt`), signed by `keys`.
    async fn image(&self, tag: &str, salt: &str, keys: &[&FileKey]) -> Digest {
        let d = push_image(&self.registry, &self.repo, tag, &format!("{tag} {salt}")).await;
        for k in keys {
            push_signature(&self.registry, &self.repo, &d, &d, k).await;
        }
        d
    }

    /// A PEM bundle of the public keys of `keys`, as `--trusted-keys` takes it.
    fn trusted(&self, name: &str, keys: &[&FileKey]) -> PathBuf {
        let path = self.dir.join(name);
        let pem: String = keys.iter().map(|k| k.public().to_pem()).collect();
        std::fs::write(&path, pem).expect("keys file");
        path
    }

    /// `ctl --trusted-keys KEYS release|rollback ...` on this world.
    fn ctl(&self, keys: &Path, image: &str, command: &[&str]) -> Output {
        let mut args = vec![
            "--parameter",
            &self.param,
            "--asg",
            &self.group.name,
            "--image",
            image,
            "--trusted-keys",
            keys.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(command);
        ctl(&args)
    }

    fn release(&self, keys: &Path, tag: &str, extra: &[&str]) -> Output {
        let mut command = vec![
            "release",
            "--tag",
            tag,
            "--poll",
            "200ms",
            "--timeout",
            "120s",
            "--warmup",
            "0s",
        ];
        command.extend_from_slice(extra);
        self.ctl(keys, &self.repo, &command)
    }

    /// The parameter's value and number of versions, the lock, and the refreshes started.
    async fn state(&self) -> (Option<String>, usize, Option<String>, usize) {
        let versions = self
            .ssm
            .get_parameter_history()
            .name(&self.param)
            .max_results(50)
            .send()
            .await
            .expect("history")
            .parameters()
            .len();
        (
            read_param(&self.ssm, &self.param).await,
            versions,
            read_param(&self.ssm, &format!("{}-lock", self.param)).await,
            self.group.refreshes().await.len(),
        )
    }

    /// `out` is a refusal (exit 2) holding `needles`, and nothing changed since `before`.
    async fn refused(&self, what: &str, out: &Output, before: &State, needles: &[&str]) {
        let t = text(out);
        assert_eq!(out.status.code(), Some(2), "{what}: {t}");
        for n in needles {
            assert!(t.contains(n), "{what}: {n:?} not in {t}");
        }
        assert!(!t.contains("locked /"), "{what}: the lock was taken: {t}");
        let after = self.state().await;
        assert_eq!(&after, before, "{what} wrote something: {t}");
        assert_eq!(after.2, None, "{what}: a lock is left: {t}");
    }

    async fn delete(self) {
        self.group.delete().await;
        delete_param(&self.ssm, &self.param).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

type State = (Option<String>, usize, Option<String>, usize);

fn released(what: &str, out: &Output) -> String {
    let t = text(out);
    assert_eq!(out.status.code(), Some(0), "{what}: {t}");
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_release_goes_out_only_when_a_trusted_key_signed_its_digest() {
    let w = World::new("skiff-signed-refresh").await;
    let (old, new, stranger) = (openssl_key(), openssl_key(), openssl_key());
    let only_old = w.trusted("old.pem", &[&old]);
    let both = w.trusted("both.pem", &[&old, &new]);
    let only_new = w.trusted("new.pem", &[&new]);
    let old_id = old.public().id();

    let signed = w.image("signed", "1", &[&old]).await;
    let unsigned = w.image("unsigned", "2", &[]).await;
    let by_stranger = w.image("stranger", "3", &[&stranger]).await;
    let elsewhere = w.image("elsewhere", "4", &[]).await;
    // The signature of `signed`, put under `elsewhere`'s signature tag.
    push_signature(&w.registry, &w.repo, &elsewhere, &signed, &old).await;

    let before = w.state().await;
    // A dry run shows the verdict; an unsigned one still fails (after showing the plan).
    let t = released("dry run", &w.release(&only_old, "signed", &["--dry-run"]));
    assert!(
        t.contains(&format!(
            "signature ok: {signed} is signed by trusted key {old_id}"
        )),
        "{t}"
    );
    let out = w.release(&only_old, "unsigned", &["--dry-run"]);
    w.refused(
        "dry run of an unsigned digest",
        &out,
        &before,
        &[&format!("signature REFUSED: {unsigned}"), "new: "],
    )
    .await;
    let cases: [(&str, &str, Digest, &str); 3] = [
        ("unsigned", "unsigned", unsigned, "no signature for"),
        (
            "untrusted key",
            "stranger",
            by_stranger,
            "not by a trusted key",
        ),
        (
            "a signature of another digest",
            "elsewhere",
            elsewhere,
            "a signature of another image",
        ),
    ];
    for (what, tag, digest, why) in &cases {
        let out = w.release(&only_old, tag, &[]);
        let (image, sign) = (
            format!("release of {}@{digest} refused", w.repo),
            format!("ctl sign --digest {digest}"),
        );
        let needles = [&image, *why, &old_id, "make sign SIGNING_KEY=", &sign];
        w.refused(what, &out, &before, &needles).await;
    }

    // By tag only, nothing pins the digest a signature could be checked for.
    let out = w.release(&only_old, "signed", &["--skip-verify"]);
    w.refused(
        "--skip-verify",
        &out,
        &before,
        &["names no digest", "leave out --skip-verify"],
    )
    .await;

    let t = released("signed", &w.release(&only_old, "signed", &[]));
    assert!(
        t.contains(&format!("signed by trusted key {old_id}")),
        "{t}"
    );
    assert!(t.contains("locked /"), "the lock line refusals lack: {t}");
    let (value, versions, lock, refreshes) = w.state().await;
    assert!(
        value
            .as_deref()
            .is_some_and(|v| v.contains(signed.as_str())),
        "{value:?}"
    );
    assert_eq!((versions, lock, refreshes), (before.1 + 1, None, 1));

    // The tag pushed again: it names a new digest nobody signed.
    let repushed = w.image("signed", "again", &[]).await;
    let before = w.state().await;
    let out = w.release(&only_old, "signed", &[]);
    w.refused(
        "a re-pushed tag",
        &out,
        &before,
        &[
            &format!("{}@{repushed} refused", w.repo),
            "no signature for",
        ],
    )
    .await;

    // Rotation: both keys trusted, a release signed by either passes; then the old key is
    // removed and a release only it signed is refused.
    let by_new = w.image("by-new", "5", &[&new]).await;
    let by_old = w.image("by-old", "6", &[&old]).await;
    let t = released("new key, both trusted", &w.release(&both, "by-new", &[]));
    assert!(t.contains(&new.public().id()), "{t}");
    released("old key, both trusted", &w.release(&both, "by-old", &[]));
    let before = w.state().await;
    let out = w.release(&only_new, "by-old", &[]);
    w.refused(
        "old key removed",
        &out,
        &before,
        &[&format!("{by_old} refused"), "not by a trusted key"],
    )
    .await;
    released("new key alone", &w.release(&only_new, "by-new", &[]));
    assert!(
        read_param(&w.ssm, &w.param)
            .await
            .is_some_and(|v| v.contains(by_new.as_str()))
    );
    w.delete().await;
}

/// A release record of `tag` pinning `digest`, as ctl writes one.
fn record(tag: &str, digest: &Digest) -> String {
    format!(r#"{{"tag":"{tag}","digest":"{digest}","released_by":"ci","kind":"release"}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_checks_the_recorded_digest_before_writing() {
    let (w, key, keys) = World::keyed("skiff-signed-rollback").await;
    let good = w.image("good", "1", &[&key]).await;
    let bad = w.image("bad", "2", &[]).await;
    let rollback = |image: &str| {
        w.ctl(
            &keys,
            image,
            &[
                "rollback",
                "--poll",
                "200ms",
                "--timeout",
                "120s",
                "--warmup",
                "0s",
            ],
        )
    };

    // The previous release was never signed: refused, nothing written.
    put_parameter(&w.ssm, &w.param, &record("bad", &bad)).await;
    put_parameter(&w.ssm, &w.param, &record("good", &good)).await;
    let before = w.state().await;
    w.refused(
        "rollback to an unsigned release",
        &rollback(&w.repo),
        &before,
        &[&format!("{}@{bad} refused", w.repo), "no signature for"],
    )
    .await;
    // The registry cannot be asked while keys are named: refused too, never a silent pass.
    w.refused(
        "registry unreachable",
        &rollback("127.0.0.1:1/none/app"),
        &before,
        &["cannot serve its signatures", &key.public().id()],
    )
    .await;

    // The previous release is signed: it goes out.
    put_parameter(&w.ssm, &w.param, &record("bad", &bad)).await;
    let t = released("rollback to a signed release", &rollback(&w.repo));
    assert!(
        t.contains(&format!("{good} is signed by trusted key")),
        "{t}"
    );
    assert!(
        read_param(&w.ssm, &w.param)
            .await
            .is_some_and(|v| v.contains(good.as_str()) && v.contains("rollback")),
        "{t}"
    );
    w.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_refuses_an_unsigned_digest_before_touching_the_instances() {
    let (w, _key, keys) = World::keyed("skiff-signed-inplace").await;
    w.image("unsigned", "1", &[]).await;
    let before = w.state().await;
    let out = w.release(
        &keys,
        "unsigned",
        &["--strategy", "in-place", "--accept-downtime"],
    );
    w.refused("in place, unsigned", &out, &before, &["no signature for"])
        .await;
    let ids = w.group.instances().await;
    let tags = w
        .group
        .ec2
        .describe_tags()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("resource-id")
                .set_values(Some(ids.clone()))
                .build(),
        )
        .send()
        .await
        .expect("describe tags");
    let skiff: Vec<&str> = tags
        .tags()
        .iter()
        .filter_map(|t| t.key())
        .filter(|k| k.starts_with("skiff:"))
        .collect();
    assert!(skiff.is_empty(), "instance tags written: {skiff:?}");
    let suspended = w
        .group
        .asg
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(&w.group.name)
        .send()
        .await
        .expect("group")
        .auto_scaling_groups()[0]
        .suspended_processes()
        .len();
    assert_eq!(suspended, 0, "processes suspended");
    w.delete().await;
}

/// A stack naming this world's parameter, group and repository, and `keys` as its trusted
/// keys: `Some(text)`: a parameter of the stack holding it; `None`: no keys.
async fn stack(w: &World, keys: Option<&str>) -> String {
    let cfn = aws_sdk_cloudformation::Client::new(&moto_sdk().await);
    let name = unique("skiff-signed-stack");
    let mut template = serde_json::json!({
        "Resources": {
            "Unused": {"Type": "AWS::SSM::Parameter",
                       "Properties": {"Name": format!("/{name}/unused"), "Type": "String", "Value": "x"}}
        },
        "Outputs": {
            "ReleaseParameter": {"Value": w.param},
            "AutoScalingGroup": {"Value": w.group.name},
            "ImageRepository": {"Value": w.repo},
        }
    });
    if let Some(text) = keys {
        template["Resources"]["Keys"] = serde_json::json!({
            "Type": "AWS::SSM::Parameter",
            "Properties": {"Name": format!("/{name}/trusted-keys"), "Type": "String", "Value": text}
        });
        template["Outputs"]["TrustedKeysParameter"] = serde_json::json!({"Value": {"Ref": "Keys"}});
    }
    cfn.create_stack()
        .stack_name(&name)
        .template_body(template.to_string())
        .send()
        .await
        .expect("create stack");
    name
}

async fn delete_stack(name: &str) {
    let cfn = aws_sdk_cloudformation::Client::new(&moto_sdk().await);
    let _ = cfn.delete_stack().stack_name(name).send().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_names_the_keys_and_a_bad_keys_parameter_refuses() {
    let w = World::new("skiff-signed-stack").await;
    let key = openssl_key();
    let signed = w.image("signed", "1", &[&key]).await;
    w.image("unsigned", "2", &[]).await;
    let pem = key.public().to_pem();
    let with_keys = stack(&w, Some(&pem)).await;
    let dry = |stack: &str, tag: &str, extra: &[&str]| {
        let mut args = vec!["--stack", stack];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["release", "--tag", tag, "--dry-run"]);
        ctl(&args)
    };
    let before = w.state().await;

    let t = released("stack keys, signed", &dry(&with_keys, "signed", &[]));
    assert!(
        t.contains(&format!(
            "{signed} is signed by trusted key {}",
            key.public().id()
        )) && t.contains(&format!("keys from parameter /{with_keys}/trusted-keys")),
        "{t}"
    );
    w.refused(
        "stack keys, unsigned",
        &dry(&with_keys, "unsigned", &[]),
        &before,
        &["no signature for", &key.public().id()],
    )
    .await;
    let file = w.trusted("mine.pem", &[&openssl_key()]);
    w.refused(
        "--trusted-keys beside the stack's",
        &dry(
            &with_keys,
            "signed",
            &["--trusted-keys", file.to_str().expect("path")],
        ),
        &before,
        &["leave out --trusted-keys"],
    )
    .await;

    let malformed = stack(&w, Some("not a key")).await;
    w.refused(
        "malformed keys",
        &dry(&malformed, "signed", &[]),
        &before,
        &[
            &format!("/{malformed}/trusted-keys cannot be used"),
            "BEGIN PUBLIC KEY",
        ],
    )
    .await;
    // status and history still answer, saying why the signer is unknown.
    for view in [&["status"][..], &["history", "--limit", "1"]] {
        let mut args = vec!["--stack", malformed.as_str()];
        args.extend_from_slice(view);
        let t = released("a view, keys malformed", &ctl(&args));
        assert!(
            t.contains(&format!(
                "unknown: the trusted keys in parameter /{malformed}/trusted-keys cannot be used"
            )),
            "{t}"
        );
    }
    // The stack names a parameter that is gone.
    let missing = stack(&w, Some(&pem)).await;
    delete_param(&w.ssm, &format!("/{missing}/trusted-keys")).await;
    w.refused(
        "keys parameter missing",
        &dry(&missing, "signed", &[]),
        &before,
        &["cannot read the trusted keys", "does not exist"],
    )
    .await;

    let without = stack(&w, None).await;
    let t = released("no keys", &dry(&without, "unsigned", &[]));
    assert_eq!(
        t.matches("signature check off: the stack names no trusted keys")
            .count(),
        1,
        "{t}"
    );
    for s in [&with_keys, &malformed, &missing, &without] {
        delete_stack(s).await;
    }
    w.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_history_show_who_signed_each_release() {
    let (w, key, keys) = World::keyed("skiff-signed-views").await;
    let id = key.public().id();
    let signed = w.image("signed", "1", &[&key]).await;
    let unsigned = w.image("unsigned", "2", &[]).await;
    put_parameter(&w.ssm, &w.param, &record("unsigned", &unsigned)).await;
    put_parameter(&w.ssm, &w.param, &record("signed", &signed)).await;

    let status = w.ctl(&keys, &w.repo, &["status"]);
    let t = released("status", &status);
    assert!(t.contains(&format!("signature  signed by {id}")), "{t}");

    let history = w.ctl(&keys, &w.repo, &["history", "--limit", "2"]);
    let t = released("history", &history);
    let lines: Vec<&str> = t.lines().collect();
    let row = |tag: &str| {
        lines
            .iter()
            .find(|l| l.contains(&format!(" {tag} ")))
            .copied()
            .unwrap_or_default()
    };
    assert!(t.contains("SIGNED BY"), "{t}");
    assert!(row("signed").contains(&id), "{t}");
    assert!(row("unsigned").contains("UNTRUSTED"), "{t}");
    assert!(!t.contains(" v0 "), "only the entries asked for: {t}");

    let json = w.ctl(&keys, &w.repo, &["history", "--limit", "1", "--json"]);
    released("history --json", &json);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(v[0]["signature"]["signature"], "signed", "{v}");
    assert_eq!(v[0]["signature"]["key_id"], id.as_str(), "{v}");

    // The registry cannot be reached: history still answers, saying why it cannot tell.
    let down = w.ctl(&keys, "127.0.0.1:1/none/app", &["history", "--limit", "3"]);
    let t = released("history, registry down", &down);
    assert!(
        t.contains("note: signature unknown: cannot reach the registry"),
        "{t}"
    );
    w.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_registry_serves_signatures_to_a_release() {
    // :5002 serves :5000's storage behind bearer tokens that grant pull only (ECR-shaped).
    let tokens = TokenService::start();
    let (w, key, keys) = World::keyed("skiff-signed-token").await;
    let signed = w.image("signed", "1", &[&key]).await;
    w.image("unsigned", "2", &[]).await;
    let via_tokens = w.repo.replacen(":5000/", ":5002/", 1);
    let run = |tag: &str| {
        ctl_env(
            &[
                "--parameter",
                &w.param,
                "--asg",
                &w.group.name,
                "--image",
                &via_tokens,
                "--trusted-keys",
                keys.to_str().expect("path"),
                "release",
                "--tag",
                tag,
                "--dry-run",
                "--registry-user",
                "skiff",
            ],
            &[("SKIFF_REGISTRY_PASSWORD", "skiff-secret")],
        )
    };
    let t = released("signed, via tokens", &run("signed"));
    assert!(
        t.contains(&format!("{signed} is signed by trusted key")),
        "{t}"
    );
    let before = w.state().await;
    w.refused(
        "unsigned, via tokens",
        &run("unsigned"),
        &before,
        &["no signature for"],
    )
    .await;
    assert!(
        tokens.seen().iter().all(|t| t.granted),
        "{:?}",
        tokens.seen()
    );
    w.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_target_that_changes_while_waiting_for_the_lock_is_checked_again() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let (w, key, keys) = World::keyed("skiff-signed-recheck").await;
    let a = w.image("a", "1", &[&key]).await;
    let c = w.image("c", "2", &[]).await;
    put_parameter(&w.ssm, &w.param, &record("a", &a)).await;
    put_parameter(&w.ssm, &w.param, &record("c", &c)).await;
    // Someone else holds the lock: the rollback checks its target (a, signed), then waits.
    let lock = format!("{}-lock", w.param);
    let held = skiff_ctl::lock::LockRecord::new(
        "other@host/1",
        "x",
        time::OffsetDateTime::now_utc(),
        std::time::Duration::from_secs(600),
    );
    put_parameter(&w.ssm, &lock, &held.to_value()).await;
    let args = [
        "--parameter",
        w.param.as_str(),
        "--asg",
        &w.group.name,
        "--image",
        &w.repo,
        "--trusted-keys",
        keys.to_str().expect("path"),
        "rollback",
        "--wait-lock",
        "60s",
        "--poll",
        "200ms",
    ];
    let mut child = ctl_command(&args, &[])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ctl");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let checked = format!("signature ok: {a}");
    while !seen.iter().any(|l: &String| l.contains(&checked)) {
        let line = tokio::time::timeout(std::time::Duration::from_secs(30), rx.recv())
            .await
            .expect("ctl checks the first target within 30 s")
            .unwrap_or_else(|| panic!("ctl ended early: {seen:?}"));
        seen.push(line);
    }
    // Meanwhile a release of b: the newest other tag is now c, which nobody signed.
    let b = record("b", &a);
    put_parameter(&w.ssm, &w.param, &b).await;
    let before = w.state().await;
    delete_param(&w.ssm, &lock).await;
    let status = tokio::task::spawn_blocking(move || child.wait().expect("wait"))
        .await
        .expect("join");
    while let Ok(Some(line)) =
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await
    {
        seen.push(line);
    }
    let t = seen.join("\n");
    assert_eq!(status.code(), Some(2), "{t}");
    assert!(t.contains(&format!("{}@{c} refused", w.repo)), "{t}");
    assert!(t.contains("locked /"), "refused under the lock: {t}");
    let after = w.state().await;
    assert_eq!(after.0.as_deref(), Some(b.as_str()), "{t}");
    assert_eq!((after.1, after.2, after.3), (before.1, None, 0), "{t}");
    w.delete().await;
}
