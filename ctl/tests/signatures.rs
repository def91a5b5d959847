//! cosign signatures against the real local registries: pushed through :5000 (anonymous) and
//! :5001 (basic auth), read back through them and through :5002 (bearer tokens, pull only, over
//! :5000's storage). Each test stores its own uniquely named image (a small OCI manifest pushed
//! with the same client) and signs with keys OpenSSL generates (`openssl genpkey`).

mod common;

use common::token_service::TokenService;
use common::{openssl_key, push_empty_manifest, push_image as store_image, unique};
use skiff_ctl::registry::{CheckError, Credentials, HttpRegistry};
use skiff_release::Digest;
use skiff_signature::{
    FileKey, MANIFEST_MEDIA_TYPE, SignatureError, blob_digest, payload, signature_tag,
};

async fn sign(r: &HttpRegistry, repo: &str, digest: &Digest, key: &FileKey) {
    let p = payload(repo, digest);
    let sig = key.sign(&p);
    r.push_signature(repo, digest, p, &sig)
        .await
        .expect("push signature");
}

fn refused(result: Result<skiff_signature::Signed, CheckError>) -> SignatureError {
    match result {
        Err(CheckError::Refused(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn signed_unsigned_and_every_refusal_on_the_anonymous_registry() {
    let r = HttpRegistry::new(None).expect("client");
    let repo = format!("127.0.0.1:5000/{}/app", unique("skiff-sig"));
    let key = openssl_key();
    let trusted = [key.public()];

    // Signed: verified, by that key.
    let v1 = store_image(&r, &repo, "v1", "one").await;
    sign(&r, &repo, &v1, &key).await;
    let signed = r
        .check_signature(&repo, &v1, &trusted)
        .await
        .expect("signed");
    assert_eq!(signed.key_id, key.public().id());
    assert_eq!(signed.reference, repo);

    // Unsigned digest.
    let v2 = store_image(&r, &repo, "v2", "two").await;
    let e = refused(r.check_signature(&repo, &v2, &trusted).await);
    assert!(matches!(e, SignatureError::Unsigned { .. }), "{e}");

    // Signed by a key the stack does not trust.
    let stranger = openssl_key();
    sign(&r, &repo, &v2, &stranger).await;
    let e = refused(r.check_signature(&repo, &v2, &trusted).await);
    assert!(matches!(e, SignatureError::UntrustedKey { .. }), "{e}");

    // The tag re-pushed to another image: its digest has no signature.
    let v1_again = store_image(&r, &repo, "v1", "one, re-pushed").await;
    assert_ne!(v1_again, v1);
    let e = refused(r.check_signature(&repo, &v1_again, &trusted).await);
    assert!(matches!(e, SignatureError::Unsigned { .. }), "{e}");

    // v1's signature manifest copied under v1_again's signature tag: it names another digest.
    let v1_sig = r
        .get_manifest(&repo, &signature_tag(&v1), 1 << 20)
        .await
        .expect("read")
        .expect("v1 signed");
    r.put_manifest(
        &repo,
        &signature_tag(&v1_again),
        MANIFEST_MEDIA_TYPE,
        &v1_sig,
    )
    .await
    .expect("copy");
    let e = refused(r.check_signature(&repo, &v1_again, &trusted).await);
    assert!(matches!(e, SignatureError::OtherDigest { .. }), "{e}");

    // Tampered payload: the layer names a payload blob that is not the one signed.
    let v3 = store_image(&r, &repo, "v3", "three").await;
    let p = payload(&repo, &v3);
    let sig = key.sign(&p);
    let forged = String::from_utf8(p)
        .expect("utf-8")
        .replace("/app", "/evil")
        .into_bytes();
    r.push_signature(&repo, &v3, forged, &sig)
        .await
        .expect("push");
    let e = refused(r.check_signature(&repo, &v3, &trusted).await);
    assert!(matches!(e, SignatureError::UntrustedKey { .. }), "{e}");

    // Malformed and huge signature manifests.
    let v4 = store_image(&r, &repo, "v4", "four").await;
    push_empty_manifest(&r, &repo, &signature_tag(&v4)).await;
    let e = refused(r.check_signature(&repo, &v4, &trusted).await);
    assert!(matches!(e, SignatureError::Malformed { .. }), "{e}");

    let v5 = store_image(&r, &repo, "v5", "five").await;
    let huge = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2,
                   "digest": blob_digest(b"{}")},
        "layers": [],
        "annotations": {"padding": "x".repeat(skiff_signature::MANIFEST_MAX)},
    }))
    .expect("json");
    r.put_manifest(&repo, &signature_tag(&v5), MANIFEST_MEDIA_TYPE, &huge)
        .await
        .expect("push");
    let e = refused(r.check_signature(&repo, &v5, &trusted).await);
    assert!(
        matches!(
            e,
            SignatureError::TooLarge {
                what: "manifest",
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn key_rotation_keeps_both_signatures() {
    let r = HttpRegistry::new(None).expect("client");
    let repo = format!("127.0.0.1:5000/{}/app", unique("skiff-sig-rot"));
    let (old, new) = (openssl_key(), openssl_key());
    let d = store_image(&r, &repo, "v1", "rotation").await;
    sign(&r, &repo, &d, &old).await;
    // Both trusted while the new key signs too; then the old one is removed.
    sign(&r, &repo, &d, &new).await;
    let both = [old.public(), new.public()];
    assert!(r.check_signature(&repo, &d, &both).await.is_ok());
    let only_new = [new.public()];
    let signed = r
        .check_signature(&repo, &d, &only_new)
        .await
        .expect("new key");
    assert_eq!(signed.key_id, new.public().id());
    let only_old = [old.public()];
    let signed = r
        .check_signature(&repo, &d, &only_old)
        .await
        .expect("old key");
    assert_eq!(signed.key_id, old.public().id());
}

#[tokio::test]
async fn basic_auth_registry_writes_and_token_registry_reads() {
    let basic = HttpRegistry::new(Some(Credentials {
        user: "skiff".into(),
        password: "skiff-secret".into(),
    }))
    .expect("client");
    let key = openssl_key();
    let repo = format!("127.0.0.1:5001/{}/app", unique("skiff-sig-basic"));
    let d = store_image(&basic, &repo, "v1", "basic").await;
    sign(&basic, &repo, &d, &key).await;
    assert!(
        basic
            .check_signature(&repo, &d, &[key.public()])
            .await
            .is_ok()
    );
    let anonymous = HttpRegistry::new(None).expect("client");
    assert!(matches!(
        anonymous.check_signature(&repo, &d, &[key.public()]).await,
        Err(CheckError::Registry { .. })
    ));

    // :5002 serves :5000's storage behind bearer tokens that grant pull only.
    let tokens = TokenService::start();
    let anon = HttpRegistry::new(None).expect("client");
    let path = format!("{}/app", unique("skiff-sig-token"));
    let pushed = format!("127.0.0.1:5000/{path}");
    let d = store_image(&anon, &pushed, "v1", "token").await;
    sign(&anon, &pushed, &d, &key).await;
    let reader = HttpRegistry::new(Some(Credentials {
        user: "skiff".into(),
        password: "skiff-secret".into(),
    }))
    .expect("client");
    let via_tokens = format!("127.0.0.1:5002/{path}");
    let signed = reader
        .check_signature(&via_tokens, &d, &[key.public()])
        .await
        .expect("verified through the token flow");
    assert_eq!(signed.key_id, key.public().id());
    assert!(
        tokens.seen().iter().all(|t| t.granted),
        "{:?}",
        tokens.seen()
    );
}
