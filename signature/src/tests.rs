use super::*;
use sigstore::crypto::{CosignVerificationKey, SigningScheme};

const REPO: &str = "127.0.0.1:5000/skiff/app";

fn digest(n: u8) -> Digest {
    format!("sha256:{}", format!("{n:02x}").repeat(32))
        .parse()
        .expect("digest")
}

/// A signer that is not ours: sigstore-rs's cosign ECDSA P-256 key pair.
fn sigstore_signer() -> (sigstore::crypto::SigStoreSigner, TrustedKey) {
    let signer = SigningScheme::ECDSA_P256_SHA256_ASN1
        .create_signer()
        .expect("sigstore signer");
    let pem = signer
        .to_sigstore_keypair()
        .expect("keypair")
        .public_key_to_pem()
        .expect("pem");
    (
        signer,
        TrustedKey::from_pem(&pem).expect("sigstore's PEM public key"),
    )
}

fn our_key() -> FileKey {
    // A fresh PKCS#8 key written by sigstore (as `openssl genpkey` would), read as Jenkins' file.
    let keys = SigningScheme::ECDSA_P256_SHA256_ASN1
        .create_signer()
        .expect("signer")
        .to_sigstore_keypair()
        .expect("keypair");
    FileKey::from_pem(&keys.private_key_to_pem().expect("pem")).expect("PKCS#8 PEM")
}

/// The layers of a manifest with their payload blobs, as a registry would serve them.
fn served(d: &Digest, a: &Artifacts) -> Vec<(SignatureLayer, Vec<u8>)> {
    parse_manifest(d, &a.manifest)
        .expect("manifest")
        .into_iter()
        .map(|l| (l, a.payload.clone()))
        .collect()
}

#[test]
fn tag_derivation() {
    assert_eq!(
        signature_tag(&digest(0xab)),
        format!("sha256-{}.sig", "ab".repeat(32))
    );
}

#[test]
fn payload_is_cosigns_simple_signing_document() {
    let d = digest(1);
    let v: serde_json::Value = serde_json::from_slice(&payload(REPO, &d)).expect("json");
    assert_eq!(
        v,
        serde_json::json!({
            "critical": {
                "identity": {"docker-reference": REPO},
                "image": {"docker-manifest-digest": d.as_str()},
                "type": "cosign container image signature",
            },
            "optional": null,
        })
    );
}

#[test]
fn what_we_sign_sigstore_verifies() {
    let key = our_key();
    let d = digest(2);
    let p = payload(REPO, &d);
    let sig = key.sign(&p);
    let theirs = CosignVerificationKey::from_pem(
        key.public().to_pem().as_bytes(),
        &SigningScheme::ECDSA_P256_SHA256_ASN1,
    )
    .expect("sigstore reads our PEM public key");
    theirs
        .verify_signature(
            sigstore::crypto::Signature::Base64Encoded(sig.as_bytes()),
            &p,
        )
        .expect("sigstore verifies our signature");
    let mut other = p.clone();
    other[10] ^= 1;
    assert!(
        theirs
            .verify_signature(
                sigstore::crypto::Signature::Base64Encoded(sig.as_bytes()),
                &other
            )
            .is_err(),
        "sigstore must refuse our signature over other bytes"
    );
}

#[test]
fn what_sigstore_signs_we_verify() {
    let (signer, trusted) = sigstore_signer();
    let d = digest(3);
    let p = payload(REPO, &d);
    let der = signer.sign(&p).expect("sigstore signs");
    let a = artifacts(p, &encode_signature(&der), None).expect("artifacts");
    let signed = verify(std::slice::from_ref(&trusted), &d, &served(&d, &a)).expect("verified");
    assert_eq!(signed.key_id, trusted.id());
    assert_eq!(signed.reference, REPO);
}

#[test]
fn refusals() {
    let (signer, trusted) = sigstore_signer();
    let (_, stranger) = sigstore_signer();
    let d = digest(4);
    let p = payload(REPO, &d);
    let good = encode_signature(&signer.sign(&p).expect("sign"));
    let a = artifacts(p.clone(), &good, None).expect("artifacts");
    let layer = parse_manifest(&d, &a.manifest).expect("manifest").remove(0);

    let other_digest = payload(REPO, &digest(5));
    let other_sig = encode_signature(&signer.sign(&other_digest).expect("sign"));
    let other = artifacts(other_digest.clone(), &other_sig, None).expect("artifacts");
    let other_layer = parse_manifest(&d, &other.manifest)
        .expect("manifest")
        .remove(0);

    // Still a valid payload of the same digest, naming another repository.
    let tampered = String::from_utf8(p.clone())
        .expect("utf-8")
        .replace("skiff/app", "skiff/apq")
        .into_bytes();
    let mut retagged = layer.clone();
    retagged.payload_digest = blob_digest(&tampered);

    let keys = std::slice::from_ref(&trusted);
    type Case<'a> = (
        &'a str,
        &'a [TrustedKey],
        SignatureLayer,
        Vec<u8>,
        fn(&SignatureError) -> bool,
    );
    let cases: Vec<Case> = vec![
        (
            "untrusted key",
            std::slice::from_ref(&stranger),
            layer.clone(),
            p.clone(),
            |e| matches!(e, SignatureError::UntrustedKey { trusted: 1, .. }),
        ),
        (
            "no trusted keys at all",
            &[],
            layer.clone(),
            p.clone(),
            |e| matches!(e, SignatureError::UntrustedKey { trusted: 0, .. }),
        ),
        (
            "signature of another digest",
            keys,
            other_layer,
            other_digest,
            |e| matches!(e, SignatureError::OtherDigest { .. }),
        ),
        (
            "payload changed, layer digest not",
            keys,
            layer.clone(),
            tampered.clone(),
            |e| matches!(e, SignatureError::Tampered { .. }),
        ),
        (
            "payload and layer digest changed",
            keys,
            retagged,
            tampered,
            |e| matches!(e, SignatureError::UntrustedKey { .. }),
        ),
        (
            "signature not base64",
            keys,
            SignatureLayer {
                signature: "@@".into(),
                ..layer.clone()
            },
            p.clone(),
            |e| matches!(e, SignatureError::Malformed { .. }),
        ),
        (
            "signature not DER",
            keys,
            SignatureLayer {
                signature: encode_signature(b"0123"),
                ..layer.clone()
            },
            p.clone(),
            |e| matches!(e, SignatureError::Malformed { .. }),
        ),
        (
            "payload not JSON",
            keys,
            layer.clone(),
            b"x".to_vec(),
            |e| matches!(e, SignatureError::Tampered { .. }),
        ),
        (
            "payload too large",
            keys,
            layer.clone(),
            vec![b' '; PAYLOAD_MAX as usize + 1],
            |e| {
                matches!(
                    e,
                    SignatureError::TooLarge {
                        what: "payload",
                        ..
                    }
                )
            },
        ),
    ];
    for (name, keys, layer, payload, want) in cases {
        let got = verify_layer(keys, &d, &layer, &payload);
        assert!(matches!(&got, Err(e) if want(e)), "{name}: {got:?}");
    }
    assert!(verify_layer(keys, &d, &layer, &p).is_ok());
}

#[test]
fn manifest_refusals() {
    let d = digest(6);
    let layer = |annotations: &str| {
        format!(
            r#"{{"mediaType":"{SIMPLE_SIGNING_MEDIA_TYPE}","size":10,"digest":"{}","annotations":{annotations}}}"#,
            digest(7)
        )
    };
    let manifest = |layers: Vec<String>| {
        format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","size":1,"digest":"{}"}},"layers":[{}]}}"#,
            digest(8),
            layers.join(",")
        )
        .into_bytes()
    };
    let ok = layer(&format!(r#"{{"{SIGNATURE_ANNOTATION}":"MEUC"}}"#));
    type Parsed = Result<Vec<SignatureLayer>, SignatureError>;
    type Case = (&'static str, Vec<u8>, fn(&Parsed) -> bool);
    let cases: Vec<Case> = vec![
        (
            "one signature layer",
            manifest(vec![ok.clone()]),
            |r| matches!(r, Ok(v) if v.len() == 1 && v[0].signature == "MEUC"),
        ),
        ("not JSON", b"<html>".to_vec(), |r| {
            matches!(r, Err(SignatureError::Malformed { .. }))
        }),
        ("no signature layer", manifest(vec![]), |r| {
            matches!(r, Err(SignatureError::Malformed { .. }))
        }),
        (
            "layer without annotation",
            manifest(vec![layer("{}")]),
            |r| matches!(r, Err(SignatureError::Malformed { .. })),
        ),
        (
            "huge annotation",
            manifest(vec![layer(&format!(
                r#"{{"{SIGNATURE_ANNOTATION}":"{}"}}"#,
                "A".repeat(300)
            ))]),
            |r| {
                matches!(
                    r,
                    Err(SignatureError::TooLarge {
                        what: "annotation",
                        ..
                    })
                )
            },
        ),
        (
            "too many layers",
            manifest(vec![ok.clone(); LAYERS_MAX + 1]),
            |r| {
                matches!(
                    r,
                    Err(SignatureError::TooLarge {
                        what: "layer count",
                        ..
                    })
                )
            },
        ),
        ("huge manifest", vec![b' '; MANIFEST_MAX + 1], |r| {
            matches!(
                r,
                Err(SignatureError::TooLarge {
                    what: "manifest",
                    ..
                })
            )
        }),
        (
            "huge payload announced",
            manifest(vec![ok.replace("\"size\":10", "\"size\":99999999")]),
            |r| {
                matches!(
                    r,
                    Err(SignatureError::TooLarge {
                        what: "payload",
                        ..
                    })
                )
            },
        ),
    ];
    for (name, bytes, want) in cases {
        let got = parse_manifest(&d, &bytes);
        assert!(want(&got), "{name}: {got:?}");
    }
}

#[test]
fn rotation_keeps_the_old_signature_and_either_key_verifies() {
    let old = our_key();
    let new = our_key();
    let d = digest(9);
    let p = payload(REPO, &d);
    let first = artifacts(p.clone(), &old.sign(&p), None).expect("first");
    let both = artifacts(p.clone(), &new.sign(&p), Some(&first.manifest)).expect("second");
    let layers = served(&d, &both);
    assert_eq!(layers.len(), 2);
    for (keys, id) in [
        (vec![old.public()], old.public().id()),
        (vec![new.public()], new.public().id()),
        (vec![new.public(), old.public()], old.public().id()),
    ] {
        assert_eq!(verify(&keys, &d, &layers).expect("verified").key_id, id);
    }
    // Signing again with the same signature adds nothing.
    let again = artifacts(p.clone(), &new.sign(&p), Some(&both.manifest)).expect("again");
    assert_eq!(served(&d, &again).len(), 2);
}

#[test]
fn trusted_key_lists() {
    let a = our_key().public();
    let b = our_key().public();
    let text = format!("{}\n{}", a.to_pem(), b.to_pem());
    let keys = parse_trusted_keys(&text).expect("two keys");
    assert_eq!(
        keys.iter().map(TrustedKey::id).collect::<Vec<_>>(),
        vec![a.id(), b.id()]
    );
    assert_eq!(parse_trusted_keys("").expect("empty").len(), 0);
    assert!(parse_trusted_keys("not a key").is_err());
    assert!(
        parse_trusted_keys("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----").is_err()
    );
    assert!(
        FileKey::from_pem(&a.to_pem()).is_err(),
        "a public key is not a signing key"
    );
}
