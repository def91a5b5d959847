//! Whether an image's registry host (see [`ImageRef`]) is an Amazon ECR private registry, whose
//! pulls need a token from `ecr:GetAuthorizationToken`.
//!
//! One grammar for the agent and ctl, so both agree on which images are in ECR.

use crate::ImageRef;

/// An Amazon ECR private registry, recognised from its host name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EcrRegistry {
    /// The registry host as written, lowercased (`123456789012.dkr.ecr.eu-west-1.amazonaws.com`):
    /// the server address the pull credentials are for.
    pub host: String,
    /// The 12-digit account id that owns the registry.
    pub account: String,
    /// The region the registry (and the `GetAuthorizationToken` call) is in.
    pub region: String,
}

/// The DNS suffixes of the AWS partitions, for `<account>.dkr.ecr[-fips].<region>.<suffix>`:
/// aws and aws-us-gov, aws-cn, the European Sovereign Cloud (aws-eusc), and the isolated
/// partitions aws-iso, aws-iso-b, aws-iso-e, aws-iso-f. The host forms are documented at
/// https://docs.aws.amazon.com/AmazonECR/latest/userguide/Registries.html and the endpoint list
/// (with the FIPS `dkr.ecr-fips` form) at https://docs.aws.amazon.com/general/latest/gr/ecr.html;
/// the suffixes are the partitions' `dnsSuffix` in the SDKs' partitions.json.
const PARTITION_SUFFIXES: &[&str] = &[
    "amazonaws.com",
    "amazonaws.com.cn",
    "amazonaws.eu",
    "c2s.ic.gov",
    "sc2s.sgov.gov",
    "cloud.adc-e.uk",
    "csp.hci.ic.gov",
];

/// The dual-stack (IPv6) registry form `<account>.dkr-ecr[-fips].<region>.on.aws`, documented at
/// https://docs.aws.amazon.com/AmazonECR/latest/userguide/ecr-requests.html (commercial
/// partition only).
const DUAL_STACK_SUFFIX: &str = "on.aws";

impl EcrRegistry {
    /// Recognise an ECR registry host name (no scheme, no path, no port). `None` for any other
    /// host, including look-alikes (`123456789012.dkr.ecr.us-east-1.amazonaws.com.evil.com`).
    pub fn from_host(host: &str) -> Option<EcrRegistry> {
        let lower = host.to_ascii_lowercase();
        let (account, rest) = lower.split_once('.')?;
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let region = if let Some(rest) = rest
            .strip_prefix("dkr.ecr.")
            .or_else(|| rest.strip_prefix("dkr.ecr-fips."))
        {
            let (region, suffix) = rest.split_once('.')?;
            PARTITION_SUFFIXES.contains(&suffix).then_some(region)?
        } else if let Some(rest) = rest
            .strip_prefix("dkr-ecr.")
            .or_else(|| rest.strip_prefix("dkr-ecr-fips."))
        {
            let (region, suffix) = rest.split_once('.')?;
            (suffix == DUAL_STACK_SUFFIX).then_some(region)?
        } else {
            return None;
        };
        if !valid_region(region) {
            return None;
        }
        Some(EcrRegistry {
            account: account.to_owned(),
            region: region.to_owned(),
            host: lower.clone(),
        })
    }

    /// The ECR registry an image name or reference is in, if it is in one.
    pub fn of_image(name: &str) -> Option<EcrRegistry> {
        let image: ImageRef = name.parse().ok()?;
        EcrRegistry::from_host(image.domain())
    }
}

/// A region name: lowercase words joined by `-`, ending in a number (`us-east-1`,
/// `us-gov-west-1`, `cn-north-1`, `eusc-de-east-1`, `us-isob-east-1`).
fn valid_region(region: &str) -> bool {
    let parts: Vec<&str> = region.split('-').collect();
    let Some((last, words)) = parts.split_last() else {
        return false;
    };
    words.len() >= 2
        && !last.is_empty()
        && last.bytes().all(|b| b.is_ascii_digit())
        && words
            .iter()
            .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecr_registries() {
        let yes = |account: &str, region: &str| Some((account.to_owned(), region.to_owned()));
        let table: &[(&str, Option<(String, String)>)] = &[
            (
                "123456789012.dkr.ecr.us-east-1.amazonaws.com/app",
                yes("123456789012", "us-east-1"),
            ),
            (
                "123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/app:v1",
                yes("123456789012", "eu-west-1"),
            ),
            (
                "123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com/app",
                yes("123456789012", "us-gov-west-1"),
            ),
            (
                "123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn/app",
                yes("123456789012", "cn-north-1"),
            ),
            (
                "123456789012.dkr.ecr.eusc-de-east-1.amazonaws.eu/app",
                yes("123456789012", "eusc-de-east-1"),
            ),
            (
                "123456789012.dkr.ecr.us-iso-east-1.c2s.ic.gov/app",
                yes("123456789012", "us-iso-east-1"),
            ),
            (
                "123456789012.dkr.ecr.us-isob-east-1.sc2s.sgov.gov/app",
                yes("123456789012", "us-isob-east-1"),
            ),
            (
                "123456789012.dkr.ecr.eu-isoe-west-1.cloud.adc-e.uk/app",
                yes("123456789012", "eu-isoe-west-1"),
            ),
            (
                "123456789012.dkr.ecr.us-isof-south-1.csp.hci.ic.gov/app",
                yes("123456789012", "us-isof-south-1"),
            ),
            (
                "123456789012.dkr-ecr.us-east-2.on.aws/app",
                yes("123456789012", "us-east-2"),
            ),
            (
                "123456789012.dkr-ecr-fips.us-east-2.on.aws/app",
                yes("123456789012", "us-east-2"),
            ),
            (
                "123456789012.DKR.ECR.US-EAST-1.AMAZONAWS.COM/app",
                yes("123456789012", "us-east-1"),
            ),
            // Look-alikes and near misses.
            (
                "evil.com/123456789012.dkr.ecr.us-east-1.amazonaws.com/app",
                None,
            ),
            (
                "123456789012.dkr.ecr.us-east-1.amazonaws.com.evil.com/app",
                None,
            ),
            ("12345678901.dkr.ecr.us-east-1.amazonaws.com/app", None),
            ("1234567890123.dkr.ecr.us-east-1.amazonaws.com/app", None),
            ("12345678901a.dkr.ecr.us-east-1.amazonaws.com/app", None),
            ("x123456789012.dkr.ecr.us-east-1.amazonaws.com/app", None),
            (
                "123456789012.dkr.ecr.us-east-1.amazonaws.com:5000/app",
                None,
            ),
            (
                "123456789012.dkr.ecr.us-east-1.amazonaws.com/app:v1",
                yes("123456789012", "us-east-1"),
            ),
            ("123456789012.dkr.ecr.amazonaws.com/app", None),
            ("123456789012.dkr.ecr..amazonaws.com/app", None),
            ("123456789012.dkr.ecr.us-east.amazonaws.com/app", None),
            ("123456789012.dkr.ecr.us_east_1.amazonaws.com/app", None),
            ("123456789012.ecr.us-east-1.amazonaws.com/app", None),
            ("123456789012.dkr.ecr.us-east-1.on.aws/app", None),
            ("123456789012.dkr-ecr.us-east-1.amazonaws.com/app", None),
            ("123456789012.dkr.ecr.us-east-1.example.com/app", None),
            ("public.ecr.aws/team/app", None),
            ("123456789012.dkr.ecr.us-east-1.amazonaws.com", None),
            ("team/123456789012.dkr.ecr.us-east-1.amazonaws.com", None),
            ("127.0.0.1:5000/app", None),
            ("nginx", None),
            ("", None),
        ];
        for (input, want) in table {
            let got = EcrRegistry::of_image(input).map(|r| (r.account, r.region));
            assert_eq!(&got, want, "{input}");
        }
        let r =
            EcrRegistry::of_image("123456789012.DKR.ECR.US-EAST-1.AMAZONAWS.COM/app").expect("ecr");
        assert_eq!(r.host, "123456789012.dkr.ecr.us-east-1.amazonaws.com");
    }
}
