//! The swap journal: a small JSON file recording that a swap from one container to another is
//! in progress, written (atomically, by rename) before the old container is drained and removed
//! once the swap is promoted or rolled back. An agent killed mid-swap finds it on start and
//! finishes the swap with the same health gate, or reverts it.
//!
//! The file lives in the unit's `StateDirectory` (`$STATE_DIRECTORY`, else `/var/lib/skiff`),
//! one per app: `swap-<app>.json`.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A swap in progress: `from` serves (or served) and `to` is the container being promoted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SwapIntent {
    pub from: String,
    pub to: String,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(
        "cannot write the swap journal {path}: {source} (the agent's state directory must be writable: StateDirectory= in the unit, or $STATE_DIRECTORY)"
    )]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read the swap journal {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("cannot remove the swap journal {path}: {source}")]
    Remove {
        path: String,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct Journal {
    path: PathBuf,
}

impl Journal {
    pub fn new(dir: &Path, app: &str) -> Self {
        Journal {
            path: dir.join(format!("swap-{app}.json")),
        }
    }

    /// The directory systemd gives the unit (the first of `$STATE_DIRECTORY`), else
    /// `/var/lib/skiff`. Read once at start.
    pub fn default_dir() -> PathBuf {
        std::env::var_os("STATE_DIRECTORY")
            .and_then(|v| {
                v.to_str()
                    .and_then(|s| s.split(':').next())
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from("/var/lib/skiff"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Record `intent`: written to a temporary file, synced, then renamed over the journal, so
    /// a kill leaves either the old journal or the new one, never half of one.
    pub fn record(&self, intent: &SwapIntent) -> Result<(), JournalError> {
        let fail = |source| JournalError::Write {
            path: self.path.display().to_string(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let body = serde_json::to_vec(intent).map_err(|e| fail(std::io::Error::other(e)))?;
        let mut f = std::fs::File::create(&tmp).map_err(fail)?;
        f.write_all(&body).map_err(fail)?;
        f.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, &self.path).map_err(fail)?;
        Ok(())
    }

    /// The swap in progress, if any.
    pub fn read(&self) -> Result<Option<SwapIntent>, JournalError> {
        let fail = |detail: String| JournalError::Read {
            path: self.path.display().to_string(),
            detail,
        };
        match std::fs::read(&self.path) {
            Ok(body) => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| fail(e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(fail(e.to_string())),
        }
    }

    /// The swap is over (promoted or reverted).
    pub fn clear(&self) -> Result<(), JournalError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(JournalError::Remove {
                path: self.path.display().to_string(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_read_clear() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::new(&dir.path().join("nested"), "app");
        assert_eq!(j.read().expect("read"), None);
        let intent = SwapIntent {
            from: "old".into(),
            to: "new".into(),
        };
        j.record(&intent).expect("record");
        assert_eq!(j.read().expect("read"), Some(intent));
        assert!(!j.path().with_extension("json.tmp").exists());
        j.clear().expect("clear");
        j.clear().expect("clearing twice is fine");
        assert_eq!(j.read().expect("read"), None);
    }

    #[test]
    fn a_garbled_journal_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::new(dir.path(), "app");
        std::fs::write(j.path(), b"{\"from\":").expect("write");
        let err = j.read().expect_err("garbled").to_string();
        assert!(err.contains("swap-app.json"), "{err}");
    }
}
