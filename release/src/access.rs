//! AWS error codes that say the caller may not do what it asked: its identity lacks the
//! permission, or its credentials are not accepted. Retrying does not help; the message names
//! the permission or the role to fix. One list for the agent and ctl, whichever service answered.
//!
//! - `AccessDenied` (Query APIs: Auto Scaling, IAM, STS, ELB) and `AccessDeniedException` (JSON
//!   APIs: SSM, CloudWatch Logs, ECR):
//!   <https://docs.aws.amazon.com/IAM/latest/UserGuide/troubleshoot_access-denied.html>
//! - `UnauthorizedOperation` (EC2):
//!   <https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html>
//! - `KMSAccessDeniedException` (SSM SecureString whose key the role may not use):
//!   <https://docs.aws.amazon.com/systems-manager/latest/APIReference/API_GetParameter.html>
//! - credentials not accepted: `UnrecognizedClientException`, `InvalidClientTokenId`,
//!   `InvalidSignatureException`, `ExpiredTokenException` (each API's Common Errors, e.g.
//!   <https://docs.aws.amazon.com/systems-manager/latest/APIReference/CommonErrors.html>).

/// The codes, as AWS spells them.
pub const DENIED: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "UnauthorizedOperation",
    "KMSAccessDeniedException",
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "InvalidSignatureException",
    "ExpiredTokenException",
];

/// Whether an AWS error `code` says access is denied (see the module doc).
pub fn is_denied(code: &str) -> bool {
    DENIED.contains(&code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_codes() {
        let table = [
            ("AccessDenied", true),
            ("AccessDeniedException", true),
            ("UnauthorizedOperation", true),
            ("KMSAccessDeniedException", true),
            ("ExpiredTokenException", true),
            ("UnrecognizedClientException", true),
            ("ThrottlingException", false),
            ("ValidationError", false),
            ("ParameterNotFound", false),
            ("accessdenied", false),
            ("", false),
        ];
        for (code, want) in table {
            assert_eq!(is_denied(code), want, "{code}");
        }
    }
}
