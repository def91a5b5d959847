//! The release source seam: where the agent reads which release to run (and, for SSM, the
//! app's environment and registry password). `FileSource` serves local development; `SsmSource`
//! (in `ssm`) serves fleets.

use std::future::Future;
use std::path::PathBuf;

use skiff_release::{Release, ReleaseError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("{what} does not exist yet: {hint}")]
    Missing { what: String, hint: String },
    #[error("{what} is unreachable: {detail} (will retry)")]
    Unreachable { what: String, detail: String },
    #[error("access to {what} was denied: {detail} (check the instance role or AWS credentials)")]
    Denied { what: String, detail: String },
    #[error("reading {what} failed: {detail}")]
    Read { what: String, detail: String },
    /// The value is there but is not a release: the current release keeps running.
    #[error("rejected the release value of {what}, keeping the current release: {error}")]
    Rejected {
        what: String,
        /// The raw value, to log a bad value once rather than at every poll.
        value: String,
        error: ReleaseError,
    },
    #[error("{what} is not available from {source_kind}: {hint}")]
    Unsupported {
        what: String,
        source_kind: &'static str,
        hint: &'static str,
    },
}

impl SourceError {
    /// Network trouble, throttling and a parameter not yet written are worth retrying soon;
    /// access denied and bad configuration need a person.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SourceError::Missing { .. } | SourceError::Unreachable { .. }
        )
    }
}

/// Where the agent reads its release and the app's parameters.
pub trait ReleaseSource: Send + Sync + 'static {
    /// A short description for logs and `/status` (`ssm:/app/prod/release`).
    fn describe(&self) -> String;

    /// The release the source names; a value that is not a release is
    /// [`SourceError::Rejected`].
    fn read_release(&self) -> impl Future<Output = Result<Release, SourceError>> + Send;

    /// Every parameter under `path` as (variable name, value), secure strings decrypted.
    fn read_env(
        &self,
        path: &str,
    ) -> impl Future<Output = Result<Vec<(String, String)>, SourceError>> + Send;

    /// One secret value (a SecureString parameter).
    fn read_secret(&self, name: &str) -> impl Future<Output = Result<String, SourceError>> + Send;
}

/// Parse a release value read from `what` (the contract's grammar).
pub fn parse_release(what: String, value: String) -> Result<Release, SourceError> {
    Release::parse(&value).map_err(|error| SourceError::Rejected { what, value, error })
}

/// Local development: the release value lives in a file.
#[derive(Debug, Clone)]
pub struct FileSource {
    path: PathBuf,
}

impl FileSource {
    pub fn new(path: PathBuf) -> Self {
        FileSource { path }
    }
}

impl ReleaseSource for FileSource {
    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }

    async fn read_release(&self) -> Result<Release, SourceError> {
        let what = format!("release file {}", self.path.display());
        match tokio::fs::read_to_string(&self.path).await {
            Ok(v) => parse_release(what, v),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(SourceError::Missing {
                hint: format!(
                    "write a tag into it, e.g. `echo v1 > {}`",
                    self.path.display()
                ),
                what,
            }),
            Err(e) => Err(SourceError::Read {
                what,
                detail: e.to_string(),
            }),
        }
    }

    async fn read_env(&self, path: &str) -> Result<Vec<(String, String)>, SourceError> {
        Err(SourceError::Unsupported {
            what: format!("env path {path}"),
            source_kind: "the file source",
            hint: "use app.env in local mode",
        })
    }

    async fn read_secret(&self, name: &str) -> Result<String, SourceError> {
        Err(SourceError::Unsupported {
            what: format!("secret {name}"),
            source_kind: "the file source",
            hint: "use registry.password_file in local mode",
        })
    }
}
