//! `NftRedirect`: the handover's redirect as nftables rules, written with the `nftnl` crate
//! (libnftnl over netlink, no `nft` process) and read back with a rule dump parsed here.
//!
//! The agent owns one table, `ip skiff_<app>`, never Docker's nor anyone else's chains:
//!
//! ```text
//! table ip skiff_app {
//!   chain prerouting { type nat hook prerouting priority dstnat;  # from outside
//!     meta l4proto tcp tcp dport 8080 dnat to ip daddr . 8091 }
//!   chain output { type nat hook output priority -100;            # from the host itself
//!     meta oif lo meta l4proto tcp tcp dport 8080 dnat to ip daddr . 8091 }
//! }
//! ```
//!
//! The destination address is kept and only the port changes, which is what a redirect does
//! for traffic to the host's own addresses (and needs no `route_localnet` for 127.0.0.1).
//! A flip is one netlink batch (add the table, delete it, add it again with the new rules),
//! which the kernel commits atomically: no packet sees neither rule or both. NAT rules act on
//! the first packet of a connection only, so connections already established keep their slot.
//!
//! Not handled: IPv6 (an `ip6` table would be the same rules; ALB targets are IPv4 here), and
//! prerouting matches the public port on any destination, so a host that forwards traffic for
//! bridge-networked containers to remote port `port` would have it redirected too.

use std::ffi::CString;

use nftnl::expr::{Immediate, Nat, NatType, Register};
use nftnl::nft_expr;
use nftnl::nftnl_sys::libc;
use nftnl::{Batch, Chain, ChainType, FinalizedBatch, Hook, MsgType, ProtoFamily, Rule, Table};

use super::{Pointing, PortRedirect, RedirectError};

const PREROUTING: &str = "prerouting";
const OUTPUT: &str = "output";
/// `dstnat`: where NAT of incoming packets runs (as nft names it).
const DSTNAT: i32 = -100;
/// The loopback interface: index 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

#[derive(Debug, Clone)]
pub struct NftRedirect {
    table: CString,
    public_port: u16,
}

impl NftRedirect {
    /// The redirect of `public_port` for the app `app` (its table is `skiff_<app>`).
    pub fn new(app: &str, public_port: u16) -> Self {
        let name: String = format!("skiff_{app}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        NftRedirect {
            // Only ASCII alphanumerics, '_' and '-' remain: no NUL inside.
            table: CString::new(name).unwrap_or_else(|_| c"skiff".to_owned()),
            public_port,
        }
    }

    /// The table's name, as `nft list table ip <name>` takes it.
    pub fn table_name(&self) -> &str {
        self.table.to_str().unwrap_or("skiff")
    }

    fn table(&self) -> Table {
        Table::new(&self.table, ProtoFamily::Ipv4)
    }

    fn flip_batch(&self, slot: u16) -> FinalizedBatch {
        let table = self.table();
        let mut batch = Batch::new();
        // Add (a no-op if it exists) then delete: the batch never fails on a missing table,
        // and what was there goes in the same transaction that writes the new rules.
        batch.add(&table, MsgType::Add);
        batch.add(&table, MsgType::Del);
        batch.add(&table, MsgType::Add);
        for (name, hook, from_host) in [
            (PREROUTING, Hook::PreRouting, false),
            (OUTPUT, Hook::Out, true),
        ] {
            let name = CString::new(name).unwrap_or_default();
            let mut chain = Chain::new(&name, &table);
            chain.set_hook(hook, DSTNAT);
            chain.set_type(ChainType::Nat);
            batch.add(&chain, MsgType::Add);
            let mut rule = Rule::new(&chain);
            if from_host {
                // Only the host's own connections to itself; its connections to other hosts'
                // port keep their destination.
                rule.add_expr(&nft_expr!(meta oif));
                rule.add_expr(&nft_expr!(cmp == LOOPBACK_IFINDEX));
            }
            rule.add_expr(&nft_expr!(meta l4proto));
            rule.add_expr(&nft_expr!(cmp == libc::IPPROTO_TCP as u8));
            rule.add_expr(&nft_expr!(payload tcp dport));
            rule.add_expr(&nft_expr!(cmp == self.public_port.to_be()));
            rule.add_expr(&nft_expr!(payload ipv4 daddr));
            rule.add_expr(&Immediate::new(slot.to_be(), Register::Reg2));
            rule.add_expr(&Nat {
                nat_type: NatType::DNat,
                family: ProtoFamily::Ipv4,
                ip_register: Register::Reg1,
                port_register: Some(Register::Reg2),
            });
            batch.add(&rule, MsgType::Add);
        }
        batch.finalize()
    }

    fn remove_batch(&self) -> FinalizedBatch {
        let table = self.table();
        let mut batch = Batch::new();
        batch.add(&table, MsgType::Add);
        batch.add(&table, MsgType::Del);
        batch.finalize()
    }
}

impl PortRedirect for NftRedirect {
    fn point(&self, slot: u16) -> Result<(), RedirectError> {
        send_batch("point the redirect", &self.flip_batch(slot))
    }

    fn pointing(&self) -> Result<Pointing, RedirectError> {
        let rules = dump_rules(&self.table)?;
        Ok(pointing_of(&rules))
    }

    fn remove(&self) -> Result<(), RedirectError> {
        send_batch("remove the redirect", &self.remove_batch())
    }
}

/// Send a batch and read the kernel's answer to each of its messages.
fn send_batch(op: &'static str, batch: &FinalizedBatch) -> Result<(), RedirectError> {
    let err = |e| RedirectError::from_io(op, e);
    let socket = mnl::Socket::new(mnl::Bus::Netfilter).map_err(err)?;
    let portid = socket.portid();
    socket.send_all(batch).map_err(err)?;
    let mut buffer = vec![0u8; nftnl::nft_nlmsg_maxsize() as usize];
    let mut expected = batch.sequence_numbers();
    while !expected.is_empty() {
        for message in socket.recv(&mut buffer[..]).map_err(err)? {
            let message = message.map_err(err)?;
            let Some(seq) = expected.next() else {
                return Err(RedirectError::Garbled {
                    op,
                    detail: "more answers than requests".into(),
                });
            };
            mnl::cb_run(message, seq, portid).map_err(err)?;
        }
    }
    Ok(())
}

/// A rule of our table as the kernel reports it: its chain and the slot its NAT names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DumpedRule {
    chain: String,
    slot: Option<u16>,
}

/// Every rule of `table` (family ip), by a netlink dump; a missing table is no rules.
fn dump_rules(table: &CString) -> Result<Option<Vec<DumpedRule>>, RedirectError> {
    const OP: &str = "read the redirect";
    let err = |e| RedirectError::from_io(OP, e);
    let socket = mnl::Socket::new(mnl::Bus::Netfilter).map_err(err)?;
    let seq = 1;
    socket.send(&get_rules_request(table, seq)).map_err(err)?;
    let mut buffer = vec![0u8; nftnl::nft_nlmsg_maxsize() as usize];
    let mut rules = Vec::new();
    loop {
        let n = socket.recv_raw(&mut buffer).map_err(err)?;
        if n == 0 {
            return Err(RedirectError::Garbled {
                op: OP,
                detail: "the dump ended without NLMSG_DONE".into(),
            });
        }
        for msg in netlink::messages(&buffer[..n]) {
            let msg = msg.map_err(|detail| RedirectError::Garbled { op: OP, detail })?;
            match msg.kind {
                netlink::NLMSG_DONE => return Ok(Some(rules)),
                netlink::NLMSG_ERROR => {
                    let errno = msg.error_code().unwrap_or(0);
                    if errno == 0 {
                        continue;
                    }
                    // No such table: nothing of ours is in the kernel.
                    if errno == libc::ENOENT {
                        return Ok(None);
                    }
                    return Err(err(std::io::Error::from_raw_os_error(errno)));
                }
                _ => rules.push(netlink::rule_of(msg.payload)),
            }
        }
    }
}

/// What our table's rules say, as one answer: both chains agree on a slot, or not.
fn pointing_of(rules: &Option<Vec<DumpedRule>>) -> Pointing {
    let Some(rules) = rules else {
        return Pointing::Nothing;
    };
    let slot_of = |chain: &str| -> Option<u16> {
        let mut of_chain = rules.iter().filter(|r| r.chain == chain);
        match (of_chain.next(), of_chain.next()) {
            (Some(r), None) => r.slot,
            _ => None,
        }
    };
    match (slot_of(PREROUTING), slot_of(OUTPUT)) {
        (Some(a), Some(b)) if a == b && rules.len() == 2 => Pointing::Slot(a),
        _ if rules.is_empty() => Pointing::Nothing,
        _ => Pointing::Inconsistent,
    }
}

/// Attribute numbers of `include/uapi/linux/netfilter/nf_tables.h` (stable kernel ABI; the
/// `libc` crate does not carry them).
mod attr {
    /// enum nft_rule_attributes
    pub const NFTA_RULE_TABLE: u16 = 1;
    pub const NFTA_RULE_CHAIN: u16 = 2;
    pub const NFTA_RULE_EXPRESSIONS: u16 = 4;
    /// enum nft_list_attributes
    pub const NFTA_LIST_ELEM: u16 = 1;
    /// enum nft_expr_attributes
    pub const NFTA_EXPR_NAME: u16 = 1;
    pub const NFTA_EXPR_DATA: u16 = 2;
    /// enum nft_immediate_attributes
    #[cfg(test)]
    pub const NFTA_IMMEDIATE_DREG: u16 = 1;
    pub const NFTA_IMMEDIATE_DATA: u16 = 2;
    /// enum nft_data_attributes
    pub const NFTA_DATA_VALUE: u16 = 1;
}

/// `NFT_MSG_GETRULE` dump request for one table of family ip.
fn get_rules_request(table: &CString, seq: u32) -> Vec<u8> {
    let kind = ((libc::NFNL_SUBSYS_NFTABLES as u16) << 8) | libc::NFT_MSG_GETRULE as u16;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP | libc::NLM_F_ACK) as u16;
    let mut body = vec![libc::NFPROTO_IPV4 as u8, 0, 0, 0];
    netlink::put_attr(&mut body, attr::NFTA_RULE_TABLE, table.as_bytes_with_nul());
    let mut msg = Vec::with_capacity(16 + body.len());
    msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&body);
    msg
}

/// Netlink messages and attributes, read from bytes in safe code (`nftnl` writes rules but
/// cannot read them back).
mod netlink {
    use super::{DumpedRule, attr};
    use nftnl::nftnl_sys::libc;

    pub const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
    pub const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;
    const NLA_TYPE_MASK: u16 = 0x3fff;
    /// nlmsghdr, then nfgenmsg for nf_tables messages.
    const HEADER: usize = 16;
    const NFGENMSG: usize = 4;

    #[derive(Debug)]
    pub struct Message<'a> {
        pub kind: u16,
        /// After the nlmsghdr.
        pub payload: &'a [u8],
    }

    impl Message<'_> {
        /// The errno of an `NLMSG_ERROR` (0 is an acknowledgement).
        pub fn error_code(&self) -> Option<i32> {
            let raw = i32::from_ne_bytes(self.payload.get(..4)?.try_into().ok()?);
            Some(-raw)
        }
    }

    fn u16_at(b: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
    }

    fn u32_at(b: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
    }

    const fn align4(n: usize) -> usize {
        (n + 3) & !3
    }

    pub fn messages(mut buf: &[u8]) -> impl Iterator<Item = Result<Message<'_>, String>> {
        std::iter::from_fn(move || {
            if buf.len() < HEADER {
                return None;
            }
            let (Some(len), Some(kind)) = (u32_at(buf, 0), u16_at(buf, 4)) else {
                return None;
            };
            let len = len as usize;
            if len < HEADER || len > buf.len() {
                buf = &[];
                return Some(Err(format!("a netlink message of length {len}")));
            }
            let msg = Message {
                kind,
                payload: &buf[HEADER..len],
            };
            buf = buf.get(align4(len)..).unwrap_or(&[]);
            Some(Ok(msg))
        })
    }

    /// (type, value) of each attribute in `buf`.
    pub fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
        std::iter::from_fn(move || {
            let len = u16_at(buf, 0)? as usize;
            let kind = u16_at(buf, 2)? & NLA_TYPE_MASK;
            if len < 4 || len > buf.len() {
                return None;
            }
            let value = &buf[4..len];
            buf = buf.get(align4(len)..).unwrap_or(&[]);
            Some((kind, value))
        })
    }

    pub fn put_attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
        let len = 4 + value.len();
        out.extend_from_slice(&(len as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(align4(out.len()), 0);
    }

    fn find(buf: &[u8], kind: u16) -> Option<&[u8]> {
        attrs(buf).find(|(k, _)| *k == kind).map(|(_, v)| v)
    }

    /// The chain of a `NFT_MSG_NEWRULE` message and the port its `immediate` loads (our rules
    /// have exactly one: the slot, in network byte order).
    pub fn rule_of(payload: &[u8]) -> DumpedRule {
        let attrs_of_rule = payload.get(NFGENMSG..).unwrap_or(&[]);
        let chain = find(attrs_of_rule, attr::NFTA_RULE_CHAIN)
            .map(|v| String::from_utf8_lossy(v).trim_end_matches('\0').to_owned())
            .unwrap_or_default();
        let slot = find(attrs_of_rule, attr::NFTA_RULE_EXPRESSIONS).and_then(|exprs| {
            attrs(exprs)
                .filter(|(k, _)| *k == attr::NFTA_LIST_ELEM)
                .find_map(|(_, expr)| {
                    let name = find(expr, attr::NFTA_EXPR_NAME)?;
                    if name != b"immediate\0" {
                        return None;
                    }
                    let data = find(expr, attr::NFTA_EXPR_DATA)?;
                    let value = find(data, attr::NFTA_IMMEDIATE_DATA)?;
                    let port = find(value, attr::NFTA_DATA_VALUE)?;
                    let bytes: [u8; 2] = port.try_into().ok()?;
                    Some(u16::from_be_bytes(bytes))
                })
        });
        DumpedRule { chain, slot }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(chain: &str, slot: Option<u16>) -> DumpedRule {
        DumpedRule {
            chain: chain.into(),
            slot,
        }
    }

    #[test]
    fn what_the_rules_say() {
        for (rules, want) in [
            (None, Pointing::Nothing),
            (Some(vec![]), Pointing::Nothing),
            (
                Some(vec![rule(PREROUTING, Some(8091)), rule(OUTPUT, Some(8091))]),
                Pointing::Slot(8091),
            ),
            // Chains that disagree, a missing chain, a doubled rule, a rule without a slot.
            (
                Some(vec![rule(PREROUTING, Some(8091)), rule(OUTPUT, Some(8090))]),
                Pointing::Inconsistent,
            ),
            (
                Some(vec![rule(PREROUTING, Some(8091))]),
                Pointing::Inconsistent,
            ),
            (
                Some(vec![
                    rule(PREROUTING, Some(8091)),
                    rule(PREROUTING, Some(8091)),
                    rule(OUTPUT, Some(8091)),
                ]),
                Pointing::Inconsistent,
            ),
            (
                Some(vec![rule(PREROUTING, None), rule(OUTPUT, None)]),
                Pointing::Inconsistent,
            ),
        ] {
            assert_eq!(pointing_of(&rules), want, "{rules:?}");
        }
    }

    #[test]
    fn table_names_keep_to_nft_names() {
        assert_eq!(NftRedirect::new("app", 8080).table_name(), "skiff_app");
        assert_eq!(
            NftRedirect::new("my.app x", 8080).table_name(),
            "skiff_my_app_x"
        );
    }

    #[test]
    fn a_rule_message_is_read_back() {
        // nfgenmsg, then NFTA_RULE_CHAIN "output" and the expressions list with one immediate.
        let mut data = Vec::new();
        netlink::put_attr(&mut data, attr::NFTA_DATA_VALUE, &8091u16.to_be_bytes());
        let mut imm = Vec::new();
        netlink::put_attr(&mut imm, attr::NFTA_IMMEDIATE_DREG, &2u32.to_be_bytes());
        netlink::put_attr(&mut imm, attr::NFTA_IMMEDIATE_DATA, &data);
        let mut expr = Vec::new();
        netlink::put_attr(&mut expr, attr::NFTA_EXPR_NAME, b"immediate\0");
        netlink::put_attr(&mut expr, attr::NFTA_EXPR_DATA, &imm);
        let mut cmp = Vec::new();
        netlink::put_attr(&mut cmp, attr::NFTA_EXPR_NAME, b"cmp\0");
        let mut list = Vec::new();
        netlink::put_attr(&mut list, attr::NFTA_LIST_ELEM, &cmp);
        netlink::put_attr(&mut list, attr::NFTA_LIST_ELEM, &expr);
        let mut payload = vec![2, 0, 0, 0];
        netlink::put_attr(&mut payload, attr::NFTA_RULE_CHAIN, b"output\0");
        netlink::put_attr(&mut payload, attr::NFTA_RULE_EXPRESSIONS, &list);
        assert_eq!(netlink::rule_of(&payload), rule(OUTPUT, Some(8091)));
        // Truncated: no slot, no panic.
        assert_eq!(netlink::rule_of(&payload[..payload.len() - 3]).slot, None);
    }
}
