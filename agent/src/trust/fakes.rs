//! Test doubles of the trust seams. `FakeSignatures` applies the verifier's rule (a digest
//! counts when a trusted key signed it; absent: unsigned) to signatures a test declares; the
//! real verifier against the real registries is tested in `tests/trust.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use skiff_release::Digest;
use skiff_signature::TrustedKey;

use super::{CheckFailure, CheckFuture, KeySource, KeysFuture, SignatureCheck};
use crate::runtime::RegistryAuth;

pub(crate) use skiff_testkit::keys::openssl_key;

/// Keys text a test changes at will (`Err`: unreadable).
#[derive(Debug, Clone)]
pub(crate) struct FakeKeys {
    pub(crate) text: Arc<Mutex<Result<String, String>>>,
    pub(crate) reads: Arc<AtomicU32>,
}

impl FakeKeys {
    pub(crate) fn of(keys: &[&TrustedKey]) -> Self {
        let fake = FakeKeys {
            text: Arc::new(Mutex::new(Ok(String::new()))),
            reads: Arc::new(AtomicU32::new(0)),
        };
        fake.trust(keys);
        fake
    }

    pub(crate) fn set(&self, text: Result<String, String>) {
        *self.text.lock().expect("lock") = text;
    }

    pub(crate) fn trust(&self, keys: &[&TrustedKey]) {
        self.set(Ok(keys.iter().map(|k| k.to_pem()).collect()));
    }
}

impl KeySource for FakeKeys {
    fn describe(&self) -> String {
        "fake".into()
    }
    fn read(&self) -> KeysFuture<'_> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let text = self.text.lock().expect("lock").clone();
        Box::pin(async move { text })
    }
}

/// Signatures declared by a test: digest -> the key that signed it.
#[derive(Debug, Clone, Default)]
pub(crate) struct FakeSignatures {
    pub(crate) signed: Arc<Mutex<HashMap<String, String>>>,
    pub(crate) unreachable: Arc<AtomicBool>,
    pub(crate) checks: Arc<AtomicU32>,
}

impl FakeSignatures {
    pub(crate) fn sign(&self, digest: &str, key: &TrustedKey) {
        self.signed
            .lock()
            .expect("lock")
            .insert(digest.to_owned(), key.id());
    }

    pub(crate) fn checks(&self) -> u32 {
        self.checks.load(Ordering::Relaxed)
    }
}

impl SignatureCheck for FakeSignatures {
    fn check<'a>(
        &'a self,
        _repository: &'a str,
        digest: &'a Digest,
        keys: &'a [TrustedKey],
        _auth: Option<&'a RegistryAuth>,
    ) -> CheckFuture<'a> {
        self.checks.fetch_add(1, Ordering::Relaxed);
        let signer = self
            .signed
            .lock()
            .expect("lock")
            .get(digest.as_str())
            .cloned();
        let unreachable = self.unreachable.load(Ordering::Relaxed);
        Box::pin(async move {
            if unreachable {
                return Err(CheckFailure::Unreachable("registry away".into()));
            }
            match signer {
                None => Err(CheckFailure::Refused(format!("no signature for {digest}"))),
                Some(id) if keys.iter().any(|k| k.id() == id) => Ok(id),
                Some(_) => Err(CheckFailure::Refused(format!(
                    "the signature of {digest} is not by a trusted key"
                ))),
            }
        })
    }
}
