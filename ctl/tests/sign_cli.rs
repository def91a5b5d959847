//! `ctl sign` as Jenkins runs it, against the real anonymous registry (:5000): a key file from
//! `openssl genpkey`, the tag resolved to its digest, the signature pushed and then verified by
//! the registry client as a host would; a key file that is not a private key is refused (exit 2)
//! and pushes nothing. With a KMS key of the emulator (:5055, whose Sign follows AWS's DIGEST
//! rule, testbed/emulator/kms.py): the signature verifies with the key's public key.

mod common;

use std::process::Command;

use common::{push_empty_manifest, unique};
use skiff_ctl::registry::{CheckError, DigestResolver, HttpRegistry};
use skiff_signature::{FileKey, SignatureError, TrustedKey};

const EMULATOR: &str = "http://127.0.0.1:5055";

fn ctl(image: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ctl"))
        .arg("--image")
        .arg(image)
        .args(args)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", EMULATOR)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env_remove("SKIFF_STACK")
        .output()
        .expect("run ctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn sign_by_tag_with_a_key_file() {
    let dir = std::env::temp_dir().join(unique("skiff-sign-cli-keys"));
    std::fs::create_dir_all(&dir).expect("key dir");
    let key_path = dir.join("signing.pem");
    let status = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
        ])
        .arg(&key_path)
        .status()
        .expect("openssl");
    assert!(status.success());
    let key = FileKey::from_pem(&std::fs::read_to_string(&key_path).expect("key")).expect("key");

    let r = HttpRegistry::new(None).expect("client");
    let repo = format!("127.0.0.1:5000/{}/app", unique("skiff-sign-cli"));
    push_empty_manifest(&r, &repo, "v1").await;
    let digest = r
        .resolve(&repo, &"v1".parse().expect("tag"))
        .await
        .expect("digest");

    // Not a private key: refused before anything is pushed.
    let public = dir.join("public.pem");
    std::fs::write(&public, key.public().to_pem()).expect("write");
    let (code, text) = ctl(
        &repo,
        &[
            "sign",
            "--tag",
            "v1",
            "--key-file",
            public.to_str().expect("path"),
        ],
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("PKCS#8"), "{text}");
    match r.check_signature(&repo, &digest, &[key.public()]).await {
        Err(CheckError::Refused(SignatureError::Unsigned { .. })) => {}
        other => panic!("nothing may be pushed: {other:?}"),
    }

    let (code, text) = ctl(
        &repo,
        &[
            "sign",
            "--tag",
            "v1",
            "--key-file",
            key_path.to_str().expect("path"),
        ],
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&key.public().id()) && text.contains(digest.as_str()),
        "{text}"
    );
    let signed = r
        .check_signature(&repo, &digest, &[key.public()])
        .await
        .expect("signed");
    assert_eq!(signed.key_id, key.public().id());

    // A KMS key: ctl calls kms:Sign only, the public key comes from a file.
    let conf = aws_sdk_kms::Config::builder()
        .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
        .region(aws_sdk_kms::config::Region::new("us-east-1"))
        .endpoint_url(EMULATOR)
        .credentials_provider(aws_sdk_kms::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .build();
    let kms = aws_sdk_kms::Client::from_conf(conf);
    let created = kms
        .create_key()
        .key_spec(aws_sdk_kms::types::KeySpec::EccNistP256)
        .key_usage(aws_sdk_kms::types::KeyUsageType::SignVerify)
        .description("skiff sign_cli")
        .send()
        .await
        .expect("create key");
    let key_id = created
        .key_metadata()
        .expect("metadata")
        .key_id()
        .to_owned();
    let der = kms
        .get_public_key()
        .key_id(&key_id)
        .send()
        .await
        .expect("public key");
    let kms_public =
        TrustedKey::from_der(der.public_key().expect("der").as_ref()).expect("P-256 key");
    let kms_pem = dir.join("kms.pub");
    std::fs::write(&kms_pem, kms_public.to_pem()).expect("write");
    let (code, text) = ctl(
        &repo,
        &[
            "sign",
            "--digest",
            digest.as_str(),
            "--kms-key",
            &key_id,
            "--public-key",
            kms_pem.to_str().expect("path"),
        ],
    );
    assert_eq!(code, 0, "{text}");
    let both = [kms_public.clone(), key.public()];
    assert!(
        r.check_signature(&repo, &digest, std::slice::from_ref(&kms_public))
            .await
            .is_ok()
    );
    assert!(r.check_signature(&repo, &digest, &both).await.is_ok());
    let _ = kms
        .schedule_key_deletion()
        .key_id(&key_id)
        .pending_window_in_days(7)
        .send()
        .await;
    std::fs::remove_dir_all(&dir).expect("clean up");
}
