//! Signing keys made by OpenSSL (not by us), as Jenkins keeps one: a PKCS#8 P-256 key.

use std::process::Command;

use skiff_signature::FileKey;

/// A fresh P-256 key pair from `openssl genpkey`.
pub fn openssl_key() -> FileKey {
    let out = Command::new("openssl")
        .args(["genpkey", "-algorithm", "EC"])
        .args(["-pkeyopt", "ec_paramgen_curve:P-256"])
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl genpkey");
    FileKey::from_pem(&String::from_utf8_lossy(&out.stdout)).expect("PKCS#8 P-256 key")
}
