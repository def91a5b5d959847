//! The release lock: one SSM parameter next to the release parameter (`<parameter>-lock`),
//! created only when absent. `PutParameter` with `Overwrite=false` fails with
//! `ParameterAlreadyExists` when the name exists, so two releases cannot both create it
//! (https://docs.aws.amazon.com/systems-manager/latest/APIReference/API_PutParameter.html,
//! "Overwrite" and "ParameterAlreadyExists"). The value says who holds it, for what release,
//! since when and until when; a holder that never let go (killed) leaves a lock that expires
//! and is then reported as stale, to be cleared with `ctl unlock`.
//! SDK types and errors stay in this module.

use std::future::Future;
use std::time::Duration;

use aws_sdk_ssm::Client;
use aws_sdk_ssm::types::ParameterType;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::aws;

/// The lock's parameter name for a release parameter.
pub fn lock_name(parameter: &str) -> String {
    format!("{parameter}-lock")
}

/// The lock's value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LockRecord {
    /// Who holds it: Jenkins' BUILD_TAG, else user@host/pid.
    pub owner: String,
    /// What is being released.
    pub release: String,
    pub acquired_at: String,
    pub expires_at: String,
}

impl LockRecord {
    pub fn new(owner: &str, release: &str, now: OffsetDateTime, hold: Duration) -> Self {
        let at = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
        LockRecord {
            owner: owner.to_owned(),
            release: release.to_owned(),
            acquired_at: at(now),
            expires_at: at(now + hold),
        }
    }

    pub fn to_value(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Who holds the lock, as read from its value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Holder {
    pub owner: String,
    pub release: String,
    pub since: String,
    /// How long it has been held (whole seconds, humantime), when `since` is readable.
    pub age: Option<String>,
    pub expires: String,
    /// Expired, or unreadable: it will not go away by itself.
    pub stale: bool,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (releasing {}) since {}{}, {} {}",
            self.owner,
            self.release,
            self.since,
            self.age
                .as_deref()
                .map(|a| format!(" ({a} ago)"))
                .unwrap_or_default(),
            if self.stale { "expired" } else { "expires" },
            self.expires
        )
    }
}

/// Read a lock value against the clock. Pure. A value that is not a lock record, or whose
/// expiry cannot be read, counts as stale: nothing will ever remove it but `ctl unlock`.
pub fn assess(value: &str, now: OffsetDateTime) -> Holder {
    match serde_json::from_str::<LockRecord>(value) {
        Ok(r) => {
            let stale = OffsetDateTime::parse(&r.expires_at, &Rfc3339).map_or(true, |t| t <= now);
            let age = OffsetDateTime::parse(&r.acquired_at, &Rfc3339)
                .ok()
                .and_then(|t| u64::try_from((now - t).whole_seconds()).ok())
                .map(|s| humantime::format_duration(Duration::from_secs(s)).to_string());
            Holder {
                owner: r.owner,
                release: r.release,
                age,
                since: r.acquired_at,
                expires: r.expires_at,
                stale,
            }
        }
        Err(_) => Holder {
            owner: format!("unknown (value {})", skiff_release::quote(value)),
            release: "unknown".into(),
            since: "unknown".into(),
            age: None,
            expires: "unknown".into(),
            stale: true,
        },
    }
}

/// Who this process is, for the lock: Jenkins' BUILD_TAG when set, else user@host/pid.
pub fn owner() -> String {
    if let Ok(tag) = std::env::var("BUILD_TAG")
        && !tag.is_empty()
    {
        return format!("{tag}/{}", std::process::id());
    }
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{user}@{host}/{}", std::process::id())
}

/// A lock that can be created only when absent.
pub trait ReleaseLock {
    /// The lock's name, for messages.
    fn name(&self) -> &str;
    /// Create the lock with `value`; `false` when it already exists (nothing written).
    fn create(&self, value: &str) -> impl Future<Output = Result<bool, LockError>> + Send;
    /// The lock's value; `None` when nobody holds it.
    fn read(&self) -> impl Future<Output = Result<Option<String>, LockError>> + Send;
    /// Remove the lock (absent is fine).
    fn delete(&self) -> impl Future<Output = Result<(), LockError>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot take the release lock {lock} ({detail}); check ssm:PutParameter rights on it")]
    Create { lock: String, detail: String },
    #[error("cannot read the release lock {lock} ({detail}); check ssm:GetParameter rights on it")]
    Read { lock: String, detail: String },
    #[error(
        "cannot remove the release lock {lock} ({detail}); check ssm:DeleteParameter rights on it, then clear it with `ctl unlock --force`"
    )]
    Delete { lock: String, detail: String },
}

/// [`ReleaseLock`] as an SSM parameter.
#[derive(Debug, Clone)]
pub struct SsmLock {
    client: Client,
    name: String,
}

impl SsmLock {
    /// The lock of release parameter `parameter`.
    pub fn for_parameter(client: Client, parameter: &str) -> Self {
        SsmLock {
            client,
            name: lock_name(parameter),
        }
    }
}

impl ReleaseLock for SsmLock {
    fn name(&self) -> &str {
        &self.name
    }

    async fn create(&self, value: &str) -> Result<bool, LockError> {
        match self
            .client
            .put_parameter()
            .name(&self.name)
            .value(value)
            .r#type(ParameterType::String)
            .overwrite(false)
            .description(
                "skiff release lock: held by ctl while it releases; `ctl unlock` clears it",
            )
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_parameter_already_exists()) =>
            {
                Ok(false)
            }
            Err(e) => Err(LockError::Create {
                lock: self.name.clone(),
                detail: aws::describe(&e),
            }),
        }
    }

    async fn read(&self) -> Result<Option<String>, LockError> {
        match self.client.get_parameter().name(&self.name).send().await {
            Ok(out) => Ok(out.parameter.and_then(|p| p.value)),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_parameter_not_found()) =>
            {
                Ok(None)
            }
            Err(e) => Err(LockError::Read {
                lock: self.name.clone(),
                detail: aws::describe(&e),
            }),
        }
    }

    async fn delete(&self) -> Result<(), LockError> {
        match self.client.delete_parameter().name(&self.name).send().await {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_parameter_not_found()) =>
            {
                Ok(())
            }
            Err(e) => Err(LockError::Delete {
                lock: self.name.clone(),
                detail: aws::describe(&e),
            }),
        }
    }
}

/// How letting go of the lock went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// It was ours and is gone.
    Deleted,
    /// Someone removed it meanwhile (`ctl unlock`).
    AlreadyGone,
    /// Someone else holds it now; left alone.
    NotOurs(String),
}

/// Delete the lock only if it still holds `ours`. SSM has no conditional delete, so this
/// reads then deletes; while we hold the lock, only `ctl unlock` can change it in between.
pub async fn release<L: ReleaseLock>(lock: &L, ours: &str) -> Result<Released, LockError> {
    match lock.read().await? {
        None => Ok(Released::AlreadyGone),
        Some(v) if v == ours => lock.delete().await.map(|()| Released::Deleted),
        Some(v) => Ok(Released::NotOurs(v)),
    }
}

/// How `ctl unlock` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unlock {
    /// Nobody held the lock.
    Free,
    /// Cleared; this was its holder.
    Cleared(Holder),
    /// Not confirmed (the reason says why); nothing changed.
    Declined { holder: Holder, why: String },
    /// It changed between being shown and being cleared: left alone, held by this one now.
    Changed(Holder),
}

/// `ctl unlock`: read the lock, show its holder to `confirm` (the person's yes, or `--force`),
/// then delete it only if it still holds what was shown, so a release that took the lock
/// meanwhile keeps it.
pub async fn unlock<L: ReleaseLock>(
    lock: &L,
    now: OffsetDateTime,
    confirm: impl FnOnce(&Holder) -> Result<(), String>,
) -> Result<Unlock, LockError> {
    let Some(value) = lock.read().await? else {
        return Ok(Unlock::Free);
    };
    let holder = assess(&value, now);
    if let Err(why) = confirm(&holder) {
        return Ok(Unlock::Declined { holder, why });
    }
    Ok(match release(lock, &value).await? {
        Released::Deleted | Released::AlreadyGone => Unlock::Cleared(holder),
        Released::NotOurs(v) => Unlock::Changed(assess(&v, now)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn assess_table() {
        let now = datetime!(2026-01-01 12:00 UTC);
        let live = LockRecord::new("ci@h/1", "v2", now, Duration::from_secs(60)).to_value();
        let old = LockRecord::new(
            "ci@h/1",
            "v2",
            datetime!(2026-01-01 10:00 UTC),
            Duration::from_secs(60),
        )
        .to_value();
        let bad_expiry =
            r#"{"owner":"o","release":"v","acquired_at":"x","expires_at":"tomorrow"}"#.to_owned();
        let table: [(&str, String, bool, &str); 4] = [
            ("held", live, false, "ci@h/1"),
            ("expired", old, true, "ci@h/1"),
            ("unreadable expiry", bad_expiry, true, "o"),
            (
                "not a lock record",
                "hello".into(),
                true,
                "unknown (value \"hello\")",
            ),
        ];
        for (name, value, stale, owner) in table {
            let h = assess(&value, now);
            assert_eq!(h.stale, stale, "{name}: {h:?}");
            assert_eq!(h.owner, owner, "{name}");
        }
        let h = assess(
            &LockRecord::new("o", "v2", now, Duration::from_secs(60)).to_value(),
            now,
        );
        assert_eq!(h.since, "2026-01-01T12:00:00Z");
        assert_eq!(h.expires, "2026-01-01T12:01:00Z");
        let old = assess(
            &LockRecord::new(
                "ci@h/1",
                "v2",
                datetime!(2026-01-01 10:00 UTC),
                Duration::from_secs(60),
            )
            .to_value(),
            now,
        );
        assert_eq!(old.age.as_deref(), Some("2h"));
        assert_eq!(
            old.to_string(),
            "ci@h/1 (releasing v2) since 2026-01-01T10:00:00Z (2h ago), expired 2026-01-01T10:01:00Z"
        );
        assert_eq!(assess("hello", now).age, None);
        assert_eq!(
            lock_name("/skiff/master/release"),
            "/skiff/master/release-lock"
        );
    }

    /// A lock in memory; `reads` answers the reads in turn (then repeats the last), so a test
    /// can change the value between show and clear.
    struct FakeLock {
        reads: std::sync::Mutex<Vec<Option<String>>>,
        deleted: std::sync::Mutex<bool>,
    }

    impl FakeLock {
        fn new(reads: Vec<Option<String>>) -> Self {
            FakeLock {
                reads: std::sync::Mutex::new(reads),
                deleted: std::sync::Mutex::new(false),
            }
        }
    }

    impl ReleaseLock for FakeLock {
        fn name(&self) -> &str {
            "/p-lock"
        }
        async fn create(&self, _value: &str) -> Result<bool, LockError> {
            Ok(false)
        }
        async fn read(&self) -> Result<Option<String>, LockError> {
            let mut r = self.reads.lock().expect("lock");
            Ok(if r.len() > 1 {
                r.remove(0)
            } else {
                r[0].clone()
            })
        }
        async fn delete(&self) -> Result<(), LockError> {
            *self.deleted.lock().expect("lock") = true;
            Ok(())
        }
    }

    /// Name, the lock's reads in turn, confirmed, the outcome in words, deleted.
    type UnlockRow = (&'static str, Vec<Option<String>>, bool, &'static str, bool);

    #[tokio::test]
    async fn unlock_table() {
        let now = datetime!(2026-01-01 12:00 UTC);
        let a = LockRecord::new("a@h/1", "v2", now, Duration::from_secs(60)).to_value();
        let b = LockRecord::new("b@h/2", "v3", now, Duration::from_secs(60)).to_value();
        let yes = |_: &Holder| Ok(());
        let table: Vec<UnlockRow> = vec![
            ("free", vec![None], true, "Free", false),
            (
                "cleared",
                vec![Some(a.clone())],
                true,
                "Cleared a@h/1",
                true,
            ),
            (
                "declined",
                vec![Some(a.clone())],
                false,
                "Declined a@h/1",
                false,
            ),
            (
                "taken by another meanwhile",
                vec![Some(a.clone()), Some(b.clone())],
                true,
                "Changed b@h/2",
                false,
            ),
        ];
        for (name, reads, confirm, want, deleted) in table {
            let lock = FakeLock::new(reads);
            let got = if confirm {
                unlock(&lock, now, yes).await
            } else {
                unlock(&lock, now, |_| Err("not yes".into())).await
            }
            .expect("unlock");
            let said = match got {
                Unlock::Free => "Free".to_owned(),
                Unlock::Cleared(h) => format!("Cleared {}", h.owner),
                Unlock::Declined { holder, why } => {
                    assert_eq!(why, "not yes");
                    format!("Declined {}", holder.owner)
                }
                Unlock::Changed(h) => format!("Changed {}", h.owner),
            };
            assert_eq!(said, want, "{name}");
            assert_eq!(*lock.deleted.lock().expect("lock"), deleted, "{name}");
        }
    }
}
