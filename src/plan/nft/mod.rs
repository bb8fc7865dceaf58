//! Organization isolation in nftables, as pure data (docs/architecture.md "nftables").
//!
//! sixpn owns one table, `table inet sixpn`, and nothing else in nftables.
//! Its chains are static; the only per-org data is one element `{P . P}` per
//! org /48 `P` in the exact-match hash set `same_org48`, looked up with both
//! addresses masked to their /48. So the cost per packet is one hash lookup
//! whatever the number of orgs, and adding or removing an org changes one set
//! element, never a rule.
//!
//! One model ([`Ruleset`]: a small rule AST) has three renderings that must
//! agree, and the tests hold them to it:
//! - [`Ruleset::to_text`]: nft's own listing syntax. `nft/sixpn.nft` is this
//!   text for a documented example (golden test), and the root test checks
//!   that `nft list table inet sixpn` prints it back;
//! - [`Ruleset::replace_batch`]: the `nftables` crate's JSON for
//!   `nft -j -f -`, replacing the whole table in one transaction (the wire
//!   codec, in `crate::dataplane::nft_codec`: plan holds no wire format);
//! - [`Ruleset::trace`]: a verdict tracer that walks a [`Packet`] through the
//!   same rules, so the isolation matrix is a unit test with no kernel.
//!
//! [`plan_firewall`] compares the desired ruleset with what was observed and
//! returns a [`FirewallPlan`]: replace the table, patch set elements, or
//! nothing. Like [`crate::plan`], nothing here does I/O.
//!
//! Invariants:
//! - Fail closed: the set starts empty, and an empty set forwards no 6PN
//!   traffic at all. Before the store has loaded, a missing table is
//!   installed empty and a present one keeps its elements.
//! - An element that is not `{P . P}` for a 6PN /48 `P` would open a path
//!   between two orgs: it is removed whatever its comment says.
//! - The interface is matched by name (`iifname`), not index: the ruleset
//!   goes in before the interface exists and survives its re-creation.
//!
//! Just-in-time peers: with a [`Capture`], the table gains a base chain
//! `capture` on the input hook, ahead of `input`, whose one rule hands
//! WireGuard handshake initiations to the listen port to the daemon (an
//! NFQUEUE, or a copy over nfnetlink_log). Without one, the table is exactly
//! the isolation ruleset above.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;

use sha2::{Digest, Sha256};

use crate::model::OrgPrefix;

/// The table sixpn owns (family `inet`).
pub const TABLE: &str = "sixpn";
/// The set of `{P . P}` elements, one per org /48.
pub const SET: &str = "same_org48";
/// The named counter of forwarded packets dropped.
pub const FORWARD_DROPPED: &str = "forward_dropped";
/// The named counter of packets to this gateway dropped.
pub const INPUT_DROPPED: &str = "input_dropped";
/// All of 6PN: `fdaa::/16`.
pub const SIXPN_NET: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfdaa, 0, 0, 0, 0, 0, 0, 0), 16);
/// The mask that keeps an address's /48.
pub const ORG_MASK: Ipv6Addr = Ipv6Addr::new(0xffff, 0xffff, 0xffff, 0, 0, 0, 0, 0);
/// The mask that keeps an address's low 80 bits (what follows the /48).
pub const HOST_MASK: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff);
/// The org DNS server's host part: `<org>::3`.
pub const DNS_HOST: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 3);
/// The DNS port.
pub const DNS_PORT: u16 = 53;
/// Base chain priority: `filter - 10`, ahead of the usual filter chains,
/// so our drops happen before anyone else's accept could matter.
pub const PRIORITY: i32 = -10;

/// The capture chain's priority: `filter - 11`, just ahead of `input`. A
/// base chain of its own, so `input`'s `iifname "lo" accept` can't pass a
/// packet by it, and a packet it accepts goes on through `input` as usual.
pub const CAPTURE_PRIORITY: i32 = PRIORITY - 1;
/// The base chain of the handshake capture.
pub const CAPTURE_CHAIN: &str = "capture";
/// The UDP header's length.
pub const UDP_HEADER_LEN: u16 = 8;
/// A WireGuard handshake initiation's length (type, reserved, sender index,
/// ephemeral, static, timestamp, mac1, mac2).
pub const WG_INITIATION_LEN: u16 = 148;
/// The first 32 bits of a handshake initiation as nft reads them
/// (big-endian): message type 1, little-endian, then three reserved zeros.
pub const WG_INITIATION_HEAD: u32 = 0x0100_0000;

/// How handshake initiations reach the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CaptureMode {
    /// `queue flags bypass to NUM`: the packet is held in NFQUEUE `num`
    /// until the daemon's verdict; with no consumer on the queue it goes on.
    Queue {
        /// The queue number.
        num: u16,
    },
    /// `log group GROUP`: a copy goes to nfnetlink_log group `group`, the
    /// packet goes on (for a kernel without nft's `queue` expression).
    Log {
        /// The nfnetlink_log group.
        group: u16,
    },
}

/// The handshake capture of just-in-time peers: which initiations the table
/// hands to the daemon, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Capture {
    /// The WireGuard listen port the initiations are sent to.
    pub listen_port: u16,
    /// How they reach the daemon.
    pub mode: CaptureMode,
}

/// An element key as the kernel holds it: `saddr/48 . daddr/48`.
pub type ElementKey = (Ipv6Addr, Ipv6Addr);

/// The key of org `p`'s element.
pub fn element_key(p: OrgPrefix) -> ElementKey {
    (p.addr(), p.addr())
}

/// The hook a base chain is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Packets routed through the gateway.
    Forward,
    /// Packets for the gateway itself.
    Input,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::Forward => "forward",
            Hook::Input => "input",
        }
    }
}

/// One match of a rule. Every match of a rule must hold for its verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// `iifname "IFACE"`.
    IifName(String),
    /// `oifname "IFACE"`.
    OifName(String),
    /// `meta nfproto != ipv6`.
    NotIpv6,
    /// `ip6 saddr & ORG_MASK . ip6 daddr & ORG_MASK @same_org48` (or `!=`):
    /// both addresses in the same known org /48 (or not).
    SameOrg(bool),
    /// `ip6 saddr fdaa::/16`.
    SaddrIn(Ipv6Addr, u8),
    /// `ip6 daddr fdaa::/16`.
    DaddrIn(Ipv6Addr, u8),
    /// `ip6 daddr & HOST_MASK == HOST` (or `!=`).
    DaddrHost(Ipv6Addr, bool),
    /// `udp dport N`.
    UdpDport(u16),
    /// `udp length N`: the UDP header's length field (header included).
    UdpLength(u16),
    /// `@th,64,32 V`: the first 32 bits of the UDP payload (right after the
    /// 8-byte header), read big-endian.
    UdpHead(u32),
    /// `tcp dport N`.
    TcpDport(u16),
    /// `meta l4proto ipv6-icmp`.
    Icmpv6,
    /// `frag frag-off != 0`: a fragment after the first, which
    /// carries no transport header to match ports on.
    LaterFragment,
    /// `icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert }`: address
    /// resolution, which a link neighbour may send from its 6PN address.
    NeighborDiscovery,
}

/// ICMPv6 echo request.
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
/// ICMPv6 neighbor solicitation.
pub const ICMPV6_NEIGHBOR_SOLICIT: u8 = 135;
/// ICMPv6 neighbor advertisement.
pub const ICMPV6_NEIGHBOR_ADVERT: u8 = 136;

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// `accept`.
    Accept,
    /// `drop`.
    Drop,
    /// `jump CHAIN`; evaluation continues after the rule if the chain
    /// issues no verdict.
    Jump(&'static str),
    /// `queue flags bypass to N`: the packet is held in NFQUEUE `N` until
    /// a process gives its verdict; with none bound to the queue, it is
    /// accepted (and goes on to the hook's next base chain).
    Queue(u16),
    /// `log group N`: a copy to nfnetlink_log group `N`. Not a verdict: the
    /// packet goes on to the next rule.
    Log(u16),
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Its matches, all of which must hold.
    pub conds: Vec<Cond>,
    /// `counter name "…"` before the verdict.
    pub counter: Option<&'static str>,
    /// Its verdict.
    pub verdict: Verdict,
    /// Why it is there, shown by `nft list`.
    pub comment: String,
}

/// A base chain's hook (type filter, policy accept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Base {
    /// The hook.
    pub hook: Hook,
    /// Its priority.
    pub priority: i32,
}

/// A chain: a base chain with a hook, or a regular one reached by `jump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Its name.
    pub name: &'static str,
    /// Its hook, for a base chain.
    pub base: Option<Base>,
    /// Its rules, in order.
    pub rules: Vec<Rule>,
}

/// The whole `table inet sixpn`: static chains plus one set element per org.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// The WireGuard interface the rules name.
    pub interface: String,
    /// The orgs in `same_org48`, with the name its element comment shows.
    pub orgs: BTreeMap<OrgPrefix, String>,
    /// The handshake capture, if any (its chain is among `chains`).
    pub capture: Option<Capture>,
    /// The chains, in the order they are created and listed.
    pub chains: Vec<Chain>,
}

fn six() -> Cond {
    Cond::DaddrIn(SIXPN_NET.0, SIXPN_NET.1)
}

impl Ruleset {
    /// The ruleset for `interface` with `orgs` in the set and, with a
    /// `capture`, the base chain that hands handshake initiations to the
    /// daemon.
    pub fn new(
        interface: &str,
        orgs: BTreeMap<OrgPrefix, String>,
        capture: Option<Capture>,
    ) -> Self {
        let iface = interface.to_owned();
        let rule = |conds, counter, verdict, comment: &str| Rule {
            conds,
            counter,
            verdict,
            comment: comment.to_owned(),
        };
        let drop_fwd = |conds, comment| rule(conds, Some(FORWARD_DROPPED), Verdict::Drop, comment);
        let drop_in = |conds, comment| rule(conds, Some(INPUT_DROPPED), Verdict::Drop, comment);
        let accept = |conds, comment| rule(conds, None, Verdict::Accept, comment);
        let jump = |conds, comment| rule(conds, None, Verdict::Jump("org_input"), comment);
        let forward = Chain {
            name: "forward",
            base: Some(Base {
                hook: Hook::Forward,
                priority: PRIORITY,
            }),
            rules: vec![
                accept(
                    vec![Cond::SameOrg(true)],
                    "same org: the only 6PN traffic forwarded",
                ),
                drop_fwd(
                    vec![Cond::IifName(iface.clone())],
                    "from a peer: another org, an unknown org or not 6PN",
                ),
                drop_fwd(
                    vec![Cond::OifName(iface.clone())],
                    "to a peer: from another org, an unknown org or not 6PN",
                ),
                drop_fwd(
                    vec![Cond::SaddrIn(SIXPN_NET.0, SIXPN_NET.1)],
                    "from 6PN: to another org, an unknown org or not 6PN",
                ),
                drop_fwd(
                    vec![six()],
                    "to 6PN: from another org, an unknown org or not 6PN",
                ),
            ],
        };
        let input = Chain {
            name: "input",
            base: Some(Base {
                hook: Hook::Input,
                priority: PRIORITY,
            }),
            rules: vec![
                // Local processes talking to the gateway's own addresses
                // (a tool querying an org's ::3 from a 6PN address here):
                // nothing from another host arrives on lo.
                accept(
                    vec![Cond::IifName("lo".into())],
                    "the gateway's own traffic to itself",
                ),
                jump(vec![Cond::IifName(iface.clone())], "from a peer"),
                // Linux solicits a neighbour from the address of the packet
                // that needs it: an instance host on a 6PN-addressed link
                // must still resolve the gateway (peers never get here).
                accept(
                    vec![Cond::NeighborDiscovery],
                    "neighbor discovery on the other links",
                ),
                jump(vec![Cond::SaddrIn(SIXPN_NET.0, SIXPN_NET.1)], "from 6PN"),
                jump(vec![six()], "to a 6PN address here: the org DNS servers"),
            ],
        };
        let org_input = Chain {
            name: "org_input",
            base: None,
            rules: vec![
                drop_in(vec![Cond::NotIpv6], "6PN is IPv6 only"),
                drop_in(
                    vec![Cond::SameOrg(false)],
                    "to another org's address, or from an unknown org",
                ),
                drop_in(
                    vec![Cond::DaddrHost(DNS_HOST, false)],
                    "not the org's DNS server ::3",
                ),
                accept(vec![Cond::UdpDport(DNS_PORT)], "DNS"),
                accept(vec![Cond::TcpDport(DNS_PORT)], "DNS over TCP"),
                accept(vec![Cond::Icmpv6], "ICMPv6: ping and errors"),
                // Reassembly needs the first fragment, which carries the
                // transport header and met the port rules above (Linux
                // drops a first fragment without it, RFC 7112).
                accept(
                    vec![Cond::LaterFragment],
                    "later fragments to ::3: their first fragment met the port rules",
                ),
                drop_in(vec![], "any other port on the gateway"),
            ],
        };
        let mut chains = vec![forward, input, org_input];
        if let Some(c) = capture {
            chains.push(capture_chain(c));
        }
        let mut rs = Self {
            interface: iface,
            orgs: BTreeMap::new(),
            capture,
            chains,
        };
        // The first rule's comment carries a fingerprint of the static part
        // (chains, rules, counters, set type): an observer can tell from the
        // listing whether the table was built from this skeleton, even when
        // an upgrade changed a match but kept the comments. (nft 1.0.6 reads
        // no set or table comment from JSON, so it can't go there.)
        let hash = Sha256::digest(rs.to_text().as_bytes());
        let hex: String = hash[..6].iter().map(|b| format!("{b:02x}")).collect();
        let first = &mut rs.chains[0].rules[0].comment;
        *first = format!("{first} [sixpn ruleset {hex}]");
        rs.orgs = orgs;
        rs
    }

    /// The skeleton's fingerprint, as the first rule's comment shows it.
    pub fn fingerprint(&self) -> &str {
        let c = &self.chains[0].rules[0].comment;
        c.rsplit_once("[sixpn ruleset ")
            .map_or("", |(_, h)| h.trim_end_matches(']'))
    }

    /// The chain called `name`.
    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| c.name == name)
    }

    /// What the adapter's listing parser would return right after this ruleset was
    /// loaded: used by fakes and to update the reconciler's cache.
    pub fn as_observed(&self) -> ObservedTable {
        ObservedTable {
            set: true,
            rules: self
                .chains
                .iter()
                .map(|c| {
                    let comments = c.rules.iter().map(|r| r.comment.clone()).collect();
                    (c.name.to_owned(), comments)
                })
                .collect(),
            elements: self
                .orgs
                .iter()
                .map(|(p, n)| (element_key(*p), Some(n.clone())))
                .collect(),
        }
    }
}

/// The capture chain: one rule that matches exactly a WireGuard handshake
/// initiation to the listen port (a 148-byte message of type 1) and hands
/// it to the daemon. Listed after the isolation chains (so a table without
/// a capture is unchanged), it runs before `input` by its priority.
fn capture_chain(c: Capture) -> Chain {
    let (verdict, comment) = match c.mode {
        CaptureMode::Queue { num } => (
            Verdict::Queue(num),
            "WireGuard handshake initiations: held for the daemon (passed on without it)",
        ),
        CaptureMode::Log { group } => (
            Verdict::Log(group),
            "WireGuard handshake initiations: a copy to the daemon",
        ),
    };
    Chain {
        name: CAPTURE_CHAIN,
        base: Some(Base {
            hook: Hook::Input,
            priority: CAPTURE_PRIORITY,
        }),
        rules: vec![Rule {
            conds: vec![
                Cond::UdpDport(c.listen_port),
                Cond::UdpLength(UDP_HEADER_LEN + WG_INITIATION_LEN),
                Cond::UdpHead(WG_INITIATION_HEAD),
            ],
            counter: None,
            verdict,
            comment: comment.to_owned(),
        }],
    }
}

mod firewall;
mod render;
mod trace;

pub use firewall::{
    apply_firewall_to, plan_firewall, plan_firewall_touched, FirewallPlan, ObservedTable,
};
pub use trace::{Decision, Packet, Trace, L4};

#[cfg(test)]
pub(crate) mod tests;
