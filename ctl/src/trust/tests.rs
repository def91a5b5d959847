use std::sync::Mutex;

use super::*;
use skiff_registry::RegistryError;

/// Two P-256 public keys (`openssl genpkey -algorithm EC ... | openssl pkey -pubout`).
const OLD: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEPL5gIvf8ssq+zwFPz39x8g79acBb
p55FBMRurAc67yU97ImJ6r563ZQl0ZwEgBI5s4IWuEJcXJfkHs8jopNa+A==
-----END PUBLIC KEY-----
";
const NEW: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE18OnOGlKHjdugN8CwHsu3AOraDuk
+0+1ycBvsiXa+D/v7Ajpn8+624OX1xaHRpwxqQH+pWe+DUj7eL66AQ2Vzw==
-----END PUBLIC KEY-----
";
const PARAM: &str = "/skiff/master/trusted-keys";
const IMAGE: &str = "reg.example/app";

fn digest(n: u8) -> Digest {
    format!("sha256:{}", format!("{n:02x}").repeat(32))
        .parse()
        .expect("digest")
}

fn keys(text: &str) -> Keys {
    parse(Source::Parameter(PARAM.into()), text).expect("keys")
}

#[test]
fn choose_table() {
    let file = Path::new("/etc/skiff/keys.pem");
    type Row = (
        Option<&'static Path>,
        Option<&'static str>,
        Result<Option<Source>, &'static str>,
    );
    let table: Vec<Row> = vec![
        (None, None, Ok(None)),
        (
            Some(Path::new("/etc/skiff/keys.pem")),
            None,
            Ok(Some(Source::File(file.into()))),
        ),
        (None, Some(PARAM), Ok(Some(Source::Parameter(PARAM.into())))),
        (
            None,
            Some(" /p \n"),
            Ok(Some(Source::Parameter("/p".into()))),
        ),
        (
            None,
            Some(""),
            Err("is empty; a stack without keys has no such output"),
        ),
        (
            Some(Path::new("/etc/skiff/keys.pem")),
            Some(PARAM),
            Err("leave out --trusted-keys"),
        ),
    ];
    for (f, output, want) in table {
        match (choose(f, output), want) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "{f:?} {output:?}"),
            (Err(e), Err(needle)) => assert!(e.to_string().contains(needle), "{e}"),
            (got, want) => panic!("{f:?} {output:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn parse_table() {
    let both = format!("{OLD}\n{NEW}");
    // (text, Ok(number of keys) or a part of the error)
    let table: Vec<(&str, Result<usize, &str>)> = vec![
        (OLD, Ok(1)),
        (&both, Ok(2)),
        ("", Err("are empty: keys are named but none is there")),
        ("  \n\t", Err("are empty")),
        ("not a key", Err("no -----BEGIN PUBLIC KEY----- block")),
        (
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----",
            Err("cannot be used"),
        ),
        (
            "-----BEGIN PUBLIC KEY-----\nMFkw",
            Err("a BEGIN line without its END"),
        ),
    ];
    for (text, want) in table {
        match (parse(Source::Parameter(PARAM.into()), text), want) {
            (Ok(k), Ok(n)) => {
                assert_eq!(k.keys.len(), n, "{text}");
                assert_eq!(k.ids().matches("SHA256:").count(), n);
            }
            (Err(e), Err(needle)) => {
                let e = e.to_string();
                assert!(e.contains(needle) && e.contains(PARAM), "{text:?}: {e}");
            }
            (got, want) => panic!("{text:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn judge_table() {
    let k = keys(&format!("{OLD}{NEW}"));
    let d = digest(7);
    let ids = k.ids();
    let signed = Signed {
        key_id: k.keys[1].id(),
        reference: format!("{IMAGE}@{d}"),
    };
    let refused = |e: SignatureError| Err(CheckError::Refused(e));
    // (answer, Ok(key id) or the parts the message must hold)
    type Row = (Result<Signed, CheckError>, Result<String, Vec<String>>);
    let advice = |extra: &str| {
        vec![
            format!("{IMAGE}@{d} refused"),
            ids.clone(),
            format!("parameter {PARAM}"),
            "make sign SIGNING_KEY=".into(),
            format!("ctl sign --digest {d}"),
            extra.to_owned(),
        ]
    };
    let table: Vec<Row> = vec![
        (Ok(signed.clone()), Ok(k.keys[1].id())),
        (
            refused(SignatureError::Unsigned {
                digest: d.to_string(),
                tag: "sha256-07.sig".into(),
            }),
            Err(advice("no signature for")),
        ),
        (
            refused(SignatureError::UntrustedKey {
                digest: d.to_string(),
                trusted: 2,
            }),
            Err(advice("not by a trusted key")),
        ),
        (
            refused(SignatureError::OtherDigest {
                digest: d.to_string(),
                signed: digest(8).to_string(),
            }),
            Err(advice(&format!("names {}", digest(8)))),
        ),
        (
            refused(SignatureError::Tampered {
                digest: d.to_string(),
                why: "x".into(),
            }),
            Err(advice("was changed after signing")),
        ),
        (
            refused(SignatureError::TooLarge {
                digest: d.to_string(),
                what: "manifest",
                size: 1 << 30,
                max: 1 << 18,
            }),
            Err(advice("too large")),
        ),
        (
            Err(CheckError::Registry {
                digest: d.to_string(),
                source: RegistryError::Unreachable {
                    image: IMAGE.into(),
                    detail: "connection refused".into(),
                },
            }),
            Err(vec![
                "cannot serve its signatures".into(),
                "connection refused".into(),
                ids.clone(),
                "nothing is released unchecked".into(),
            ]),
        ),
        (
            Err(CheckError::Registry {
                digest: d.to_string(),
                source: RegistryError::Denied {
                    image: IMAGE.into(),
                    status: 403,
                },
            }),
            Err(vec![
                "cannot serve its signatures".into(),
                "HTTP 403".into(),
            ]),
        ),
    ];
    for (answer, want) in table {
        let label = format!("{answer:?}");
        match (judge(&k, IMAGE, &d, answer), want) {
            (Ok(s), Ok(id)) => assert_eq!(s.key_id, id),
            (Err(e), Err(parts)) => {
                let e = e.to_string();
                for p in parts {
                    assert!(e.contains(&p), "{label}: {p:?} not in {e}");
                }
            }
            (got, want) => panic!("{label}: got {got:?}, want {want:?}"),
        }
    }
}

/// Answers as scripted and records the digests it was asked about.
struct FakeChecker {
    answer: fn(&Digest) -> Result<Signed, CheckError>,
    asked: Mutex<Vec<String>>,
}

impl SignatureChecker for FakeChecker {
    async fn check(
        &self,
        repository: &str,
        digest: &Digest,
        keys: &[TrustedKey],
    ) -> Result<Signed, CheckError> {
        assert_eq!((repository, keys.len()), (IMAGE, 1));
        self.asked.lock().expect("lock").push(digest.to_string());
        (self.answer)(digest)
    }
}

#[tokio::test]
async fn check_asks_for_the_pinned_digest_and_refuses_a_release_without_one() {
    let k = keys(OLD);
    let fake = FakeChecker {
        answer: |d| {
            Ok(Signed {
                key_id: "SHA256:0000".into(),
                reference: d.to_string(),
            })
        },
        asked: Mutex::default(),
    };
    let pinned = Release::new("v2".parse().expect("tag"), Some(digest(2)));
    let s = check(&k, &fake, IMAGE, &pinned).await.expect("signed");
    assert_eq!(s.reference, digest(2).to_string());
    let by_tag = Release::new("v2".parse().expect("tag"), None);
    let e = check(&k, &fake, IMAGE, &by_tag)
        .await
        .expect_err("no digest");
    assert!(
        matches!(&e, TrustError::NoDigest { release, .. } if release == "v2"),
        "{e}"
    );
    assert!(e.to_string().contains("leave out --skip-verify"), "{e}");
    assert_eq!(
        *fake.asked.lock().expect("lock"),
        vec![digest(2).to_string()],
        "only the pinned digest is asked about"
    );
}

#[test]
fn verdict_lines() {
    assert_eq!(Verdict::Off.to_string(), OFF);
    let signed = Verdict::Signed {
        digest: digest(1).to_string(),
        key_id: "SHA256:abcd".into(),
        source: format!("parameter {PARAM}"),
    };
    assert!(
        signed
            .to_string()
            .contains("signed by trusted key SHA256:abcd")
    );
    let json = serde_json::to_value(crate::ship::Event::Signature(signed)).expect("json");
    assert_eq!(json["event"], "signature", "{json}");
    assert_eq!(json["verdict"], "signed", "{json}");
    assert_eq!(json["key_id"], "SHA256:abcd", "{json}");
    let off = serde_json::to_value(crate::ship::Event::Signature(Verdict::Off)).expect("json");
    assert_eq!(
        off,
        serde_json::json!({"event": "signature", "verdict": "off"})
    );
}

#[tokio::test]
async fn signers_ask_once_per_digest_and_stop_asking_once_the_registry_is_down() {
    let k = keys(OLD);
    let trust = Ok(Trust::On(k));
    // Digest 1 signed, 2 unsigned, 3: the registry is down; 4 is not asked.
    let fake = FakeChecker {
        answer: |d| match d.as_str().get(d.as_str().len() - 2..) {
            Some("01") => Ok(Signed {
                key_id: "SHA256:1111".into(),
                reference: d.to_string(),
            }),
            Some("02") => Err(CheckError::Refused(SignatureError::Unsigned {
                digest: d.to_string(),
                tag: "t".into(),
            })),
            _ => Err(CheckError::Registry {
                digest: d.to_string(),
                source: RegistryError::Unreachable {
                    image: IMAGE.into(),
                    detail: "connection refused".into(),
                },
            }),
        },
        asked: Mutex::default(),
    };
    let r = |n: Option<u8>| Release::new("v1".parse().expect("tag"), n.map(digest));
    let releases = [
        r(Some(1)),
        r(Some(2)),
        r(Some(1)),
        r(None),
        r(Some(3)),
        r(Some(4)),
    ];
    let refs: Vec<Option<&Release>> = releases
        .iter()
        .map(Some)
        .chain(std::iter::once(None))
        .collect();
    let got = signers(&trust, &fake, IMAGE, &refs).await;
    let cells: Vec<Option<&str>> = got.iter().map(|s| s.as_ref().map(Signer::cell)).collect();
    assert_eq!(
        cells,
        vec![
            Some("SHA256:1111"),
            Some("UNTRUSTED"),
            Some("SHA256:1111"),
            Some("unknown"),
            Some("unknown"),
            Some("unknown"),
            None
        ]
    );
    assert!(
        got[5]
            .as_ref()
            .is_some_and(|s| s.to_string().contains("unknown: cannot reach the registry")),
        "{got:?}"
    );
    assert_eq!(
        *fake.asked.lock().expect("lock"),
        vec![
            digest(1).to_string(),
            digest(2).to_string(),
            digest(3).to_string()
        ],
        "one read per distinct digest, none after the registry failed"
    );
    let asked = fake.asked.lock().expect("lock").len();
    let off = signers(&Ok(Trust::Off), &fake, IMAGE, &refs).await;
    assert!(off.iter().all(Option::is_none));
    // Keys named but unusable: every release unknown for that reason, the registry not asked.
    let broken = Err(TrustError::Empty {
        origin: format!("parameter {PARAM}"),
    });
    let got = signers(&broken, &fake, IMAGE, &refs).await;
    assert_eq!(got.len(), refs.len());
    assert!(
        got[..6]
            .iter()
            .all(|s| matches!(s, Some(Signer::Unknown { why }) if why.contains("are empty"))),
        "{got:?}"
    );
    assert_eq!(got[6], None, "not a release record");
    assert_eq!(
        fake.asked.lock().expect("lock").len(),
        asked,
        "no registry read"
    );
}
