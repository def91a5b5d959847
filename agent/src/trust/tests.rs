//! The trust decisions as tables, and `Trust` over the fakes: what is asked of the registry,
//! what is remembered (in memory and across a restart), and when a refusal is asked again.

use super::fakes::{FakeKeys, FakeSignatures, openssl_key};
use super::*;

const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

fn v(digest: &str, key: &str) -> Verified {
    Verified {
        digest: digest.into(),
        key: key.into(),
    }
}

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn recall_table() {
    let refusal = |digest: &str, keys: Option<&[&str]>| Refusal {
        digest: digest.into(),
        keys: keys.map(ids),
        reason: "unsigned".into(),
    };
    let verified = [v(D1, "K1")];
    type Row<'a> = (&'a str, Option<Vec<String>>, Option<Refusal>, Recall);
    let table: Vec<Row<'_>> = vec![
        // Verified by a key still trusted: no registry read.
        (D1, Some(ids(&["K1"])), None, Recall::Verified("K1".into())),
        (
            D1,
            Some(ids(&["K0", "K1"])),
            None,
            Recall::Verified("K1".into()),
        ),
        // Its key was rotated out: asked again (a newer signature may count).
        (D1, Some(ids(&["K2"])), None, Recall::Ask),
        // Keys unreadable: nothing verified stands.
        (D1, None, None, Recall::Ask),
        (D2, Some(ids(&["K1"])), None, Recall::Ask),
        // Refused under the same keys: not asked again.
        (
            D2,
            Some(ids(&["K1"])),
            Some(refusal(D2, Some(&["K1"]))),
            Recall::Refused("unsigned".into()),
        ),
        (
            D2,
            None,
            Some(refusal(D2, None)),
            Recall::Refused("unsigned".into()),
        ),
        // The keys changed, or another digest: asked.
        (
            D2,
            Some(ids(&["K1", "K2"])),
            Some(refusal(D2, Some(&["K1"]))),
            Recall::Ask,
        ),
        (D2, Some(ids(&["K1"])), Some(refusal(D2, None)), Recall::Ask),
        (D2, None, Some(refusal(D2, Some(&["K1"]))), Recall::Ask),
        (
            D2,
            Some(ids(&["K1"])),
            Some(refusal(D1, Some(&["K1"]))),
            Recall::Ask,
        ),
    ];
    for (digest, keys, refused, want) in table {
        assert_eq!(
            recall(digest, keys.as_deref(), &verified, refused.as_ref()),
            want,
            "{digest} {keys:?} {refused:?}"
        );
    }
}

#[test]
fn keys_changed_table() {
    let r = |keys: Option<&[&str]>| Refusal {
        digest: D1.into(),
        keys: keys.map(ids),
        reason: String::new(),
    };
    let table: [(Refusal, Option<Vec<String>>, bool); 6] = [
        (r(Some(&["K1"])), Some(ids(&["K1"])), false),
        (r(Some(&["K1"])), Some(ids(&["K1", "K2"])), true),
        (r(Some(&["K1", "K2"])), Some(ids(&["K2"])), true),
        (r(Some(&["K1"])), None, true),
        (r(None), None, false),
        (r(None), Some(ids(&["K1"])), true),
    ];
    for (refusal, now, want) in table {
        assert_eq!(
            keys_changed(&refusal, now.as_deref()),
            want,
            "{refusal:?} {now:?}"
        );
    }
}

#[test]
fn remember_keeps_the_newest_once_and_is_bounded() {
    let mut list = Vec::new();
    for i in 0..REMEMBERED + 5 {
        list = remember(list, v(&format!("d{i}"), "K"));
    }
    assert_eq!(list.len(), REMEMBERED);
    assert_eq!(list[0].digest, "d5");
    let list = remember(list, v("d10", "K2"));
    assert_eq!(list.len(), REMEMBERED);
    assert_eq!(list.last(), Some(&v("d10", "K2")));
    assert_eq!(list.iter().filter(|x| x.digest == "d10").count(), 1);
}

#[test]
fn key_bundles() {
    let a = openssl_key().public();
    let b = openssl_key().public();
    let both = format!("{}\n{}", a.to_pem(), b.to_pem());
    let table: [(&str, Result<usize, &str>); 5] = [
        (&both, Ok(2)),
        ("", Err("holds no -----BEGIN PUBLIC KEY----- block")),
        ("  \n", Err("holds no -----BEGIN PUBLIC KEY----- block")),
        ("not a key", Err("no -----BEGIN PUBLIC KEY----- block")),
        (
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            Err("not a PEM P-256 public key"),
        ),
    ];
    for (text, want) in table {
        match (parse_keys(text), want) {
            (Ok(k), Ok(n)) => assert_eq!(k.len(), n),
            (Err(e), Err(w)) => assert!(e.contains(w), "{text:?}: {e}"),
            (got, want) => panic!("{text:?}: got {got:?}, want {want:?}"),
        }
    }
}

fn digest(s: &str) -> Digest {
    s.parse().expect("digest")
}

#[tokio::test]
async fn a_refusal_is_asked_once_until_the_keys_change_and_a_verification_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = Trust::record_path(dir.path(), "app");
    let (k1, k2) = (openssl_key().public(), openssl_key().public());
    let keys = FakeKeys::of(&[&k1]);
    let sigs = FakeSignatures::default();
    sigs.sign(D1, &k1);
    sigs.sign(D2, &k2);
    let trust = Trust::new(keys.clone(), sigs.clone(), Some(record.clone()));

    let ok = trust.verify("r/app", &digest(D1), None).await;
    assert_eq!((ok.outcome, ok.result), (Ok(k1.id()), VERIFIED));
    let again = trust.verify("r/app", &digest(D1), None).await;
    assert_eq!(again.result, VERIFIED_RECALLED);
    assert_eq!(sigs.checks(), 1);

    // D2 is signed by a key not trusted: refused once, then from memory.
    for want in [REFUSED, REFUSED_RECALLED, REFUSED_RECALLED] {
        let r = trust.verify("r/app", &digest(D2), None).await;
        assert_eq!(r.result, want);
        let e = r.outcome.expect_err("refused").to_string();
        assert!(
            e.contains(D2) && e.contains(&k1.id()),
            "digest and key ids: {e}"
        );
    }
    assert_eq!(sigs.checks(), 2, "one registry read per refusal");
    assert!(!trust.refusal_outdated().await);
    // Rotation begins: both keys trusted.
    keys.trust(&[&k1, &k2]);
    assert!(trust.refusal_outdated().await);
    let r = trust.verify("r/app", &digest(D2), None).await;
    assert_eq!((r.outcome, r.result), (Ok(k2.id()), VERIFIED));
    assert_eq!(trust.refused_digest(), None);

    // A restarted agent: both verified digests come from the record, no registry read.
    let sigs2 = FakeSignatures::default();
    let restarted = Trust::new(keys.clone(), sigs2.clone(), Some(record.clone()));
    for d in [D1, D2] {
        assert!(restarted.is_recorded(d));
        let r = restarted.verify("r/app", &digest(d), None).await;
        assert_eq!(r.result, VERIFIED_RECALLED, "{d}");
    }
    assert_eq!(sigs2.checks(), 0);
    // The old key removed: D1's verification by it no longer stands and is asked again.
    keys.trust(&[&k2]);
    let r = restarted.verify("r/app", &digest(D1), None).await;
    assert_eq!(r.result, REFUSED);
    assert_eq!(sigs2.checks(), 1);
    let r = restarted.verify("r/app", &digest(D2), None).await;
    assert_eq!(r.result, VERIFIED_RECALLED);
}

#[tokio::test]
async fn unreadable_or_empty_keys_refuse_and_an_unreachable_registry_is_retryable() {
    let k1 = openssl_key().public();
    let keys = FakeKeys::of(&[&k1]);
    let sigs = FakeSignatures::default();
    sigs.sign(D1, &k1);
    let trust = Trust::new(keys.clone(), sigs.clone(), None);
    for (text, want) in [
        (
            Err("AccessDenied".to_owned()),
            "cannot read the trusted keys from fake: AccessDenied",
        ),
        (
            Ok(String::new()),
            "holds no -----BEGIN PUBLIC KEY----- block",
        ),
        (
            Ok("garbage".to_owned()),
            "no -----BEGIN PUBLIC KEY----- block",
        ),
    ] {
        keys.set(text);
        let r = trust.verify("r/app", &digest(D1), None).await;
        let e = r.outcome.expect_err("refused");
        assert!(!e.is_retryable());
        assert!(e.to_string().contains(want), "{e}");
    }
    assert_eq!(sigs.checks(), 0, "no registry read without keys");
    keys.trust(&[&k1]);
    assert!(trust.refusal_outdated().await, "readable keys again");
    sigs.unreachable
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let r = trust.verify("r/app", &digest(D1), None).await;
    assert_eq!(r.result, UNREACHABLE);
    assert!(r.outcome.expect_err("unreachable").is_retryable());
    sigs.unreachable
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let r = trust.verify("r/app", &digest(D1), None).await;
    assert_eq!(r.result, VERIFIED, "an unreachable registry is asked again");
}

#[tokio::test]
async fn file_keys_are_read_before_each_check_and_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("trusted.pem");
    let source = FileKeys(path.clone());
    let missing = source.read().await.expect_err("missing");
    assert!(missing.contains("No such file"), "{missing}");
    let k = openssl_key().public();
    std::fs::write(&path, k.to_pem()).expect("write");
    assert_eq!(source.read().await.expect("read"), k.to_pem());
    std::fs::write(&path, vec![b'x'; 70 * 1024]).expect("write");
    let big = source.read().await.expect_err("too big");
    assert!(big.contains("at most 65536"), "{big}");
    assert_eq!(source.describe(), format!("file:{}", path.display()));
}
