//! The signature gate in the release procedure, with fakes: a refusal comes before the lock
//! and every write, a pass lets the release go on, a rollback's target is what is checked,
//! and "off" is said once. The same against the real registries and the emulator:
//! `ctl/tests/signed_release.rs`.

use std::sync::Mutex;

use super::super::*;
use super::fakes::{Step, World, request};
use crate::refresh::RefreshState::Successful;
use crate::trust::{Gate, Keys, SignatureChecker, Source, TrustError};
use skiff_registry::CheckError;
use skiff_release::Digest;
use skiff_signature::{SignatureError, Signed, TrustedKey};

/// A P-256 public key (`openssl genpkey ... | openssl pkey -pubout`).
const PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEPL5gIvf8ssq+zwFPz39x8g79acBb
p55FBMRurAc67yU97ImJ6r563ZQl0ZwEgBI5s4IWuEJcXJfkHs8jopNa+A==
-----END PUBLIC KEY-----
";
/// The digest `FakeResolver` pins, and the one `V1` records.
const RESOLVED: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
const RECORDED: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

/// Signed: the digests in `signed`; every other one is unsigned. Records what it was asked.
struct FakeChecker {
    signed: Vec<&'static str>,
    asked: Mutex<Vec<String>>,
}

impl SignatureChecker for FakeChecker {
    async fn check(
        &self,
        repository: &str,
        digest: &Digest,
        keys: &[TrustedKey],
    ) -> Result<Signed, CheckError> {
        assert_eq!((repository, keys.len()), ("reg.example/app", 1));
        self.asked.lock().expect("lock").push(digest.to_string());
        if self.signed.contains(&digest.as_str()) {
            Ok(Signed {
                key_id: "SHA256:feedfeedfeedfeed".into(),
                reference: format!("{repository}@{digest}"),
            })
        } else {
            Err(SignatureError::Unsigned {
                digest: digest.to_string(),
                tag: "t.sig".into(),
            }
            .into())
        }
    }
}

#[derive(Debug, PartialEq)]
enum Want {
    Released,
    DryRun,
    Refused(&'static str),
}

#[tokio::test(start_paused = true)]
async fn the_gate_refuses_before_the_lock_and_every_write() {
    let keys = crate::trust::parse(Source::File("keys.pem".into()), PEM).expect("keys");
    let tag = Target::Tag {
        tag: "v2".parse().expect("tag"),
        verify: true,
    };
    let by_tag = Target::Tag {
        tag: "v2".parse().expect("tag"),
        verify: false,
    };
    let back = Target::Rollback { to: None };
    // (name, target, dry run, keys named, signed digests, wanted end, digests asked about)
    type Row<'a> = (
        &'a str,
        Target,
        bool,
        Option<&'a Keys>,
        Vec<&'static str>,
        Want,
        Vec<&'static str>,
    );
    let table: Vec<Row<'_>> = vec![
        (
            "signed",
            tag.clone(),
            false,
            Some(&keys),
            vec![RESOLVED],
            Want::Released,
            vec![RESOLVED],
        ),
        (
            "unsigned",
            tag.clone(),
            false,
            Some(&keys),
            vec![RECORDED],
            Want::Refused("no signature for"),
            vec![RESOLVED],
        ),
        (
            "by tag, no digest",
            by_tag.clone(),
            false,
            Some(&keys),
            vec![],
            Want::Refused("names no digest"),
            vec![],
        ),
        ("off", by_tag, false, None, vec![], Want::Released, vec![]),
        (
            "dry run, signed",
            tag.clone(),
            true,
            Some(&keys),
            vec![RESOLVED],
            Want::DryRun,
            vec![RESOLVED],
        ),
        (
            "dry run, unsigned",
            tag,
            true,
            Some(&keys),
            vec![],
            Want::Refused("no signature for"),
            vec![RESOLVED],
        ),
        (
            "rollback, target signed",
            back.clone(),
            false,
            Some(&keys),
            vec![RECORDED],
            Want::Released,
            vec![RECORDED],
        ),
        (
            "rollback, target unsigned",
            back,
            false,
            Some(&keys),
            vec![RESOLVED],
            Want::Refused("no signature for"),
            vec![RECORDED],
        ),
    ];
    for (name, target, dry_run, keys, signed, want, asked) in table {
        let w = World::new(vec![vec![Step::State(Successful)]]);
        if matches!(target, Target::Rollback { .. }) {
            // v1 (RECORDED) released, then v2 (RESOLVED): a rollback returns to v1.
            w.store
                .put(&format!(r#"{{"tag":"v2","digest":"{RESOLVED}"}}"#));
        }
        let before = w.store.all();
        let checker = FakeChecker {
            signed,
            asked: Mutex::default(),
        };
        let gate = match keys {
            Some(keys) => Gate::On {
                keys,
                checker: &checker,
            },
            None => Gate::Off,
        };
        let req = Request {
            target,
            dry_run,
            ..request()
        };
        let (_handle, mut stop) = Stop::new();
        let mut events = Vec::new();
        let r = ship_checked(&w.fleet(), &NoInPlace, &gate, &req, &mut stop, &mut |e| {
            events.push(e)
        })
        .await;
        let at = |f: &dyn Fn(&Event) -> bool| events.iter().position(f);
        let verdict = at(&|e| matches!(e, Event::Signature(_)));
        let locked = at(&|e| matches!(e, Event::Locked { .. }));
        match (&r, &want) {
            (Ok(Outcome::Released { .. }), Want::Released) => {
                assert!(
                    verdict < locked,
                    "{name}: checked before the lock: {events:?}"
                );
                assert_eq!(w.store.all().len(), before.len() + 1, "{name}");
            }
            (Ok(Outcome::DryRun), Want::DryRun) => {}
            (Err(e @ ShipError::Trust(_)), Want::Refused(needle)) => {
                assert!(e.to_string().contains(needle), "{name}: {e}");
                assert_eq!(e.exit_code(), ExitCode::Refused, "{name}");
                assert_eq!(locked, None, "{name}: the lock was taken: {events:?}");
                assert_eq!(w.store.all(), before, "{name}: written");
                assert_eq!(w.refresher.starts(), 0, "{name}: a refresh started");
                assert!(w.unlocked(), "{name}");
            }
            (got, want) => panic!("{name}: got {got:?}, want {want:?}; {events:?}"),
        }
        let shown: Vec<&Event> = events
            .iter()
            .filter(|e| matches!(e, Event::Signature(_)))
            .collect();
        match keys {
            None => assert_eq!(
                shown,
                vec![&Event::Signature(crate::trust::Verdict::Off)],
                "{name}"
            ),
            // A refusal is the error's to say, except in a dry run, which shows it beside the plan.
            Some(_) if matches!(r, Err(ShipError::Trust(TrustError::NoDigest { .. }))) => {
                assert!(shown.is_empty(), "{name}")
            }
            Some(_) if dry_run || r.is_ok() => assert_eq!(shown.len(), 1, "{name}: {events:?}"),
            Some(_) => assert!(shown.is_empty(), "{name}: {events:?}"),
        }
        if dry_run && r.is_err() {
            assert!(
                events.iter().any(|e| matches!(e, Event::Plan { .. })),
                "{name}: the plan is shown"
            );
        }
        assert_eq!(*checker.asked.lock().expect("lock"), asked, "{name}");
    }
}
