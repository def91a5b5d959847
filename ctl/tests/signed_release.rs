//! Signed releases through the real `ctl` binary: images and cosign signatures in the real
//! registries (:5000 anonymous; :5002 token auth, ECR-shaped, over :5000's storage), the
//! parameter, its history, the lock and the instance refreshes in the AWS emulator (:5055).
//! ctl's wiring only: every kind of refusal reaches exit 2 with nothing written. The verifier's
//! own refusals (a tampered payload, a malformed or huge manifest) are tested where it lives
//! (`ctl/tests/signatures.rs` against the registries, `signature/src/tests.rs`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

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

    let t = released("signed", &w.release(&only_old, "signed", &[]));
    assert!(
        t.contains(&format!("signed by trusted key {old_id}")),
        "{t}"
    );
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
