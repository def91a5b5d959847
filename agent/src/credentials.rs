//! Pull credentials that expire: a registry token is cached until shortly before it expires,
//! and a pull the registry refuses is retried once with a fresh token. The Docker Engine API
//! uses no credential helper, so every pull from such a registry carries the token itself.
//!
//! [`TokenIssuer`] is the seam (ECR's `GetAuthorizationToken` in [`crate::ecr`]); the cache
//! decisions are the pure [`fresh`] and [`usable`].
//!
//! Longer than ~400 lines on purpose: the code is under half of it; the rest are the cache
//! and retry tests, which belong next to it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use skiff_release::Release;

use crate::runtime::{ContainerRuntime, LocalImage, RegistryAuth, RuntimeError};

/// A cached token is renewed this long before it expires, so a pull never starts with a token
/// about to lapse (ECR tokens last 12 hours).
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 60);

/// Credentials for one registry and the instant they stop working.
#[derive(Clone, PartialEq)]
pub struct PullToken {
    pub auth: RegistryAuth,
    pub expires_at: SystemTime,
}

impl fmt::Debug for PullToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PullToken")
            .field("auth", &self.auth)
            .field(
                "expires_at",
                &humantime::format_rfc3339_seconds(self.expires_at),
            )
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error(
        "{action} was denied for registry {registry}: {detail}; allow {action} (and ecr:BatchGetImage, ecr:GetDownloadUrlForLayer on the repository) to the instance role, or to the AWS credentials the agent runs with"
    )]
    Denied {
        action: &'static str,
        registry: String,
        detail: String,
    },
    #[error("cannot get a pull token for registry {registry}: {detail} (will retry)")]
    Unreachable { registry: String, detail: String },
    #[error("getting a pull token for registry {registry} failed: {detail}")]
    Issue { registry: String, detail: String },
}

impl CredentialsError {
    /// Network trouble, throttling and service errors heal; a denied call needs a person.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, CredentialsError::Denied { .. })
    }
}

/// A boxed future, so issuers can sit behind `dyn` (the supervisor holds one of any kind).
pub type IssueFuture<'a> =
    Pin<Box<dyn Future<Output = Result<PullToken, CredentialsError>> + Send + 'a>>;

/// Issues short-lived credentials for one registry.
pub trait TokenIssuer: Send + Sync + fmt::Debug + 'static {
    /// The registry the tokens are for (for logs).
    fn registry(&self) -> &str;
    /// Ask for a new token.
    fn issue(&self) -> IssueFuture<'_>;
}

/// Whether a token expiring at `expires_at` is used as is at `now`, without asking for a new
/// one. A token that expires within [`RENEW_BEFORE`] (or has expired: moto's tokens carry
/// 2015-01-01) is not. Pure.
pub fn fresh(expires_at: SystemTime, now: SystemTime) -> bool {
    now.checked_add(RENEW_BEFORE)
        .is_some_and(|limit| expires_at > limit)
}

/// Whether a token can still be presented at `now` (the fallback while the issuer is away).
pub fn usable(expires_at: SystemTime, now: SystemTime) -> bool {
    expires_at > now
}

/// Tokens of one registry: issued on demand, cached while [`fresh`].
#[derive(Debug, Clone)]
pub struct PullTokens {
    issuer: Arc<dyn TokenIssuer>,
    cached: Arc<Mutex<Option<PullToken>>>,
}

impl PullTokens {
    pub fn new(issuer: impl TokenIssuer) -> Self {
        PullTokens {
            issuer: Arc::new(issuer),
            cached: Arc::new(Mutex::new(None)),
        }
    }

    pub fn registry(&self) -> &str {
        self.issuer.registry()
    }

    fn cached(&self) -> Option<PullToken> {
        self.cached.lock().map(|c| c.clone()).unwrap_or(None)
    }

    fn store(&self, token: Option<PullToken>) {
        if let Ok(mut c) = self.cached.lock() {
            *c = token;
        }
    }

    /// Credentials for the next pull: the cached token while fresh, else a new one. A new token
    /// that expires within the margin is used once and not kept. When the issuer fails with a
    /// retryable error, a cached token that has not expired yet is used rather than nothing.
    pub async fn get(&self) -> Result<RegistryAuth, CredentialsError> {
        let cached = self.cached();
        if let Some(t) = &cached
            && fresh(t.expires_at, SystemTime::now())
        {
            return Ok(t.auth.clone());
        }
        match self.issuer.issue().await {
            Ok(token) => {
                let auth = token.auth.clone();
                if fresh(token.expires_at, SystemTime::now()) {
                    tracing::debug!(registry = %self.registry(), expires_at = %humantime::format_rfc3339_seconds(token.expires_at), "new pull token cached");
                    self.store(Some(token));
                } else {
                    tracing::debug!(registry = %self.registry(), "new pull token expires within the renewal margin: used once, not cached");
                    self.store(None);
                }
                Ok(auth)
            }
            Err(e) => match cached {
                Some(t) if e.is_retryable() && usable(t.expires_at, SystemTime::now()) => {
                    tracing::warn!(registry = %self.registry(), error = %e, "cannot renew the pull token; using the cached one until it expires");
                    Ok(t.auth)
                }
                _ => Err(e),
            },
        }
    }

    /// Forget the cached token (the registry refused it).
    pub fn invalidate(&self) {
        self.store(None);
    }
}

/// Why an image could not be made present with token credentials.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// [`ContainerRuntime::ensure_image`] with a token: when the registry refuses it, the token is
/// dropped and the pull is tried once more with a new one.
pub async fn ensure_image<R: ContainerRuntime>(
    runtime: &R,
    tokens: &PullTokens,
    repository: &str,
    release: &Release,
) -> Result<LocalImage, PullError> {
    let auth = tokens.get().await?;
    match runtime.ensure_image(repository, release, Some(&auth)).await {
        Err(e) if e.is_auth_failure() => {
            tracing::warn!(registry = %tokens.registry(), error = %e, "the registry refused the pull token; getting a new one and trying once more");
            tokens.invalidate();
            let auth = tokens.get().await?;
            Ok(runtime
                .ensure_image(repository, release, Some(&auth))
                .await?)
        }
        other => Ok(other?),
    }
}

#[cfg(test)]
mod tests {
    //! The cache and the retry with a fake issuer and a fake runtime that, like a registry,
    //! accepts only the password currently valid.

    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::runtime::{ContainerSpec, ContainerState};

    #[test]
    fn freshness() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let min = Duration::from_secs(60);
        let table = [
            (now + Duration::from_secs(12 * 3600), true, true),
            (now + RENEW_BEFORE + min, true, true),
            (now + RENEW_BEFORE, false, true),
            (now + RENEW_BEFORE - min, false, true),
            (now + min, false, true),
            (now, false, false),
            (now - min, false, false),
            // moto's expiresAt
            (
                UNIX_EPOCH + Duration::from_secs(1_420_070_400),
                false,
                false,
            ),
        ];
        for (expires_at, want_fresh, want_usable) in table {
            let at = humantime::format_rfc3339_seconds(expires_at);
            assert_eq!(fresh(expires_at, now), want_fresh, "fresh {at}");
            assert_eq!(usable(expires_at, now), want_usable, "usable {at}");
        }
    }

    /// Hands out `pw-1`, `pw-2`, ... valid for `valid_for` (negative: already expired), or
    /// fails with `fail` when set.
    #[derive(Debug)]
    struct FakeIssuer {
        issued: Arc<Mutex<u32>>,
        valid_for: i64,
        fail: Arc<Mutex<Option<CredentialsError>>>,
    }

    impl TokenIssuer for FakeIssuer {
        fn registry(&self) -> &str {
            "fake"
        }
        fn issue(&self) -> IssueFuture<'_> {
            Box::pin(async move {
                if let Some(e) = self.fail.lock().expect("lock").clone() {
                    return Err(e);
                }
                let mut n = self.issued.lock().expect("lock");
                *n += 1;
                let now = SystemTime::now();
                let d = Duration::from_secs(self.valid_for.unsigned_abs());
                Ok(PullToken {
                    auth: RegistryAuth {
                        username: "AWS".into(),
                        password: format!("pw-{n}"),
                    },
                    expires_at: if self.valid_for >= 0 {
                        now + d
                    } else {
                        now - d
                    },
                })
            })
        }
    }

    /// What a test holds on to: the tokens, the issue count, and a failure to inject.
    type Handles = (
        PullTokens,
        Arc<Mutex<u32>>,
        Arc<Mutex<Option<CredentialsError>>>,
    );

    fn issuer(valid_for: i64) -> Handles {
        let issued = Arc::new(Mutex::new(0));
        let fail = Arc::new(Mutex::new(None));
        let tokens = PullTokens::new(FakeIssuer {
            issued: issued.clone(),
            valid_for,
            fail: fail.clone(),
        });
        (tokens, issued, fail)
    }

    #[tokio::test]
    async fn a_fresh_token_is_cached_and_an_expired_one_used_once() {
        let (tokens, issued, _) = issuer(12 * 3600);
        for _ in 0..3 {
            assert_eq!(tokens.get().await.expect("token").password, "pw-1");
        }
        assert_eq!(*issued.lock().expect("lock"), 1);
        tokens.invalidate();
        assert_eq!(tokens.get().await.expect("token").password, "pw-2");

        let (tokens, issued, _) = issuer(-1);
        for n in 1..=3 {
            assert_eq!(
                tokens.get().await.expect("token").password,
                format!("pw-{n}")
            );
        }
        assert_eq!(
            *issued.lock().expect("lock"),
            3,
            "expired tokens are never cached"
        );

        // Expiring within the margin: used once, then renewed.
        let (tokens, issued, _) = issuer(60);
        tokens.get().await.expect("token");
        tokens.get().await.expect("token");
        assert_eq!(*issued.lock().expect("lock"), 2);
    }

    #[tokio::test]
    async fn a_failing_issuer_falls_back_to_an_unexpired_token_only_when_retryable() {
        // 10 min left: not fresh (renewal attempted), still usable.
        let (tokens, _, fail) = issuer(600);
        tokens.get().await.expect("first");
        // not cached (inside the margin), so nothing to fall back to
        *fail.lock().expect("lock") = Some(CredentialsError::Unreachable {
            registry: "fake".into(),
            detail: "timeout".into(),
        });
        assert!(tokens.get().await.is_err());

        let (tokens, _, fail) = issuer(12 * 3600);
        tokens.get().await.expect("first");
        // Make the cached token stale but unexpired.
        if let Some(t) = tokens.cached.lock().expect("lock").as_mut() {
            t.expires_at = SystemTime::now() + Duration::from_secs(600);
        }
        *fail.lock().expect("lock") = Some(CredentialsError::Unreachable {
            registry: "fake".into(),
            detail: "timeout".into(),
        });
        assert_eq!(tokens.get().await.expect("fallback").password, "pw-1");
        *fail.lock().expect("lock") = Some(CredentialsError::Denied {
            action: "ecr:GetAuthorizationToken",
            registry: "fake".into(),
            detail: "AccessDeniedException".into(),
        });
        let err = tokens.get().await.expect_err("denied is not papered over");
        assert!(!err.is_retryable());
        assert!(
            err.to_string().contains("ecr:GetAuthorizationToken"),
            "{err}"
        );
    }

    /// Accepts pulls only with the password in `valid`; counts pulls.
    #[derive(Debug, Default, Clone)]
    struct Registry {
        valid: Arc<Mutex<String>>,
        pulls: Arc<Mutex<Vec<String>>>,
    }

    impl ContainerRuntime for Registry {
        async fn ensure_image(
            &self,
            repository: &str,
            release: &Release,
            auth: Option<&RegistryAuth>,
        ) -> Result<LocalImage, RuntimeError> {
            let password = auth.map(|a| a.password.clone()).unwrap_or_default();
            self.pulls.lock().expect("lock").push(password.clone());
            if password != *self.valid.lock().expect("lock") {
                return Err(RuntimeError::PullDenied {
                    image: repository.into(),
                    detail: "unauthorized: authentication required".into(),
                });
            }
            Ok(LocalImage {
                reference: release.image_ref(repository),
                digest: None,
                from_cache: false,
            })
        }
        async fn list(&self, _app: &str) -> Result<Vec<ContainerState>, RuntimeError> {
            Ok(Vec::new())
        }
        async fn is_running(&self, _id: &str) -> Result<Option<bool>, RuntimeError> {
            Ok(None)
        }
        async fn create(&self, _spec: &ContainerSpec) -> Result<String, RuntimeError> {
            Ok(String::new())
        }
        async fn start(&self, _id: &str) -> Result<(), RuntimeError> {
            Ok(())
        }
        async fn stop(&self, _id: &str, _grace: Duration) -> Result<(), RuntimeError> {
            Ok(())
        }
        async fn remove(&self, _id: &str) -> Result<(), RuntimeError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_refused_token_is_renewed_once() {
        let release = Release::new("v1".parse().expect("tag"), None);
        let (tokens, issued, _) = issuer(12 * 3600);
        let registry = Registry::default();
        *registry.valid.lock().expect("lock") = "pw-1".into();
        ensure_image(&registry, &tokens, "r/app", &release)
            .await
            .expect("pull with pw-1");
        // The registry now wants the next token (e.g. the cached one was revoked).
        *registry.valid.lock().expect("lock") = "pw-2".into();
        ensure_image(&registry, &tokens, "r/app", &release)
            .await
            .expect("renewed and pulled");
        assert_eq!(
            *registry.pulls.lock().expect("lock"),
            ["pw-1", "pw-1", "pw-2"]
        );
        assert_eq!(*issued.lock().expect("lock"), 2);
        // The renewed token is cached.
        ensure_image(&registry, &tokens, "r/app", &release)
            .await
            .expect("cached pw-2");
        assert_eq!(*issued.lock().expect("lock"), 2);

        // Refused twice: one renewal only, and the refusal is reported.
        *registry.valid.lock().expect("lock") = "never".into();
        registry.pulls.lock().expect("lock").clear();
        let err = ensure_image(&registry, &tokens, "r/app", &release)
            .await
            .expect_err("refused");
        assert!(
            matches!(err, PullError::Runtime(RuntimeError::PullDenied { .. })),
            "{err}"
        );
        assert_eq!(*registry.pulls.lock().expect("lock"), ["pw-2", "pw-3"]);
        assert_eq!(*issued.lock().expect("lock"), 3);
    }
}
