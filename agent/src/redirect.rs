//! The redirect seam of the handover swap: the app's public port (the one the load balancer
//! checks and routes to) is a kernel rule owned by the agent that points at one of two slot
//! ports, where the containers listen in turn. Flipping it is one atomic step; connections
//! already established stay where they are (the kernel's connection tracking keeps their
//! translation), new ones go to the slot the rule names.
//!
//! `NftRedirect` (in `nft`) implements it with nftables, in a table of the agent's own; the
//! decisions that use it (which slot is idle, what to settle on after a restart) are pure and
//! live in `handover`.

pub mod nft;

use std::fmt::Debug;

pub use self::nft::NftRedirect;

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error(
        "the kernel refused the agent's nftables request ({op}): {source}; the agent needs CAP_NET_ADMIN (AmbientCapabilities=CAP_NET_ADMIN in its unit) to swap by handover, or set [app] swap = \"drain\""
    )]
    Denied {
        op: &'static str,
        source: std::io::Error,
    },
    #[error(
        "this kernel has no nftables NAT ({op}: {source}): a handover needs nf_tables with nat (CONFIG_NF_TABLES, CONFIG_NFT_NAT); set [app] swap = \"drain\" on this host"
    )]
    Unsupported {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("nftables request failed ({op}): {source}")]
    Netlink {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("the kernel's answer to {op} could not be read: {detail}")]
    Garbled { op: &'static str, detail: String },
}

impl RedirectError {
    /// Classify an error of a netlink call by what a person has to do about it.
    pub fn from_io(op: &'static str, source: std::io::Error) -> Self {
        match source.raw_os_error() {
            Some(1 | 13) => RedirectError::Denied { op, source },
            // No nf_tables (EPROTONOSUPPORT on the socket) or no nat chain type (EOPNOTSUPP,
            // ENOENT for a missing expression module).
            Some(93 | 95 | 97) => RedirectError::Unsupported { op, source },
            _ => RedirectError::Netlink { op, source },
        }
    }
}

/// Where the public port points, as the kernel holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pointing {
    /// No rule of ours: nothing redirects the public port (a fresh boot, or never set).
    Nothing,
    /// Every rule of ours sends the public port to this slot.
    Slot(u16),
    /// Our table exists but its rules do not agree (half written by someone else): rewrite.
    Inconsistent,
}

/// What the handover needs from the kernel. Calls are synchronous: each is one netlink
/// round trip of well under a millisecond, so the loop calls them in place.
pub trait PortRedirect: Send + Sync + Debug + 'static {
    /// Point the public port at `slot`, for traffic from outside and from the host itself, in
    /// one atomic transaction (the old rule and the new one are never both or neither active).
    fn point(&self, slot: u16) -> Result<(), RedirectError>;
    /// Read the rule back from the kernel.
    fn pointing(&self) -> Result<Pointing, RedirectError>;
    /// Remove the agent's table (`agent remove-redirect`); nothing to remove is fine.
    fn remove(&self) -> Result<(), RedirectError>;
}
