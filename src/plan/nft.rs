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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr};

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
    /// `tcp dport N`.
    TcpDport(u16),
    /// `meta l4proto ipv6-icmp`.
    Icmpv6,
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
    /// The chains, in the order they are created and listed.
    pub chains: Vec<Chain>,
}

/// A packet for the tracer: what nftables would see at the hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// The interface it came in on.
    pub iif: String,
    /// The interface it goes out on (forwarded packets only).
    pub oif: Option<String>,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Transport protocol and destination port.
    pub l4: L4,
}

/// A packet's transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// UDP to this port.
    Udp(u16),
    /// TCP to this port.
    Tcp(u16),
    /// ICMPv6 of this type.
    Icmpv6(u8),
}

/// A packet's fate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// It goes on (our chains let it through).
    Accept,
    /// It is dropped.
    Drop,
}

/// Where a traced packet ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// The verdict.
    pub decision: Decision,
    /// The chain and rule index that decided; `None`: the base chain's policy.
    pub rule: Option<(&'static str, usize)>,
    /// The named counter the deciding rule incremented.
    pub counter: Option<&'static str>,
}

fn six() -> Cond {
    Cond::DaddrIn(SIXPN_NET.0, SIXPN_NET.1)
}

impl Ruleset {
    /// The ruleset for `interface` with `orgs` in the set.
    pub fn new(interface: &str, orgs: BTreeMap<OrgPrefix, String>) -> Self {
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
                drop_in(vec![], "any other port on the gateway"),
            ],
        };
        let mut rs = Self {
            interface: iface,
            orgs: BTreeMap::new(),
            chains: vec![forward, input, org_input],
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

    /// What [`parse_listing`] would return right after this ruleset was
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

    // ----- text ------------------------------------------------------------

    /// The table in nft's listing syntax (as `nft list table inet sixpn`
    /// prints it, less counter values and handles).
    pub fn to_text(&self) -> String {
        let mut t = format!("table inet {TABLE} {{\n");
        for c in [FORWARD_DROPPED, INPUT_DROPPED] {
            let _ = write!(t, "\tcounter {c} {{\n\t}}\n\n");
        }
        let _ = writeln!(t, "\tset {SET} {{");
        t.push_str("\t\ttype ipv6_addr . ipv6_addr\n");
        if !self.orgs.is_empty() {
            t.push_str("\t\telements = { ");
            let items: Vec<String> = self
                .orgs
                .iter()
                .map(|(p, n)| format!("{a} . {a} comment \"{n}\"", a = p.addr()))
                .collect();
            t.push_str(&items.join(",\n\t\t\t     "));
            t.push_str(" }\n");
        }
        t.push_str("\t}\n");
        for c in &self.chains {
            let _ = write!(t, "\n\tchain {} {{\n", c.name);
            if let Some(b) = c.base {
                let _ = writeln!(
                    t,
                    "\t\ttype filter hook {} priority {}; policy accept;",
                    b.hook.name(),
                    text_priority(b.priority)
                );
            }
            for r in &c.rules {
                let _ = writeln!(t, "\t\t{}", r.text());
            }
            t.push_str("\t}\n");
        }
        t.push_str("}\n");
        t
    }

    // ----- tracer ----------------------------------------------------------

    /// Walks `pkt` through the base chain on `hook`, as the kernel would.
    pub fn trace(&self, hook: Hook, pkt: &Packet) -> Trace {
        let base = self
            .chains
            .iter()
            .find(|c| c.base.is_some_and(|b| b.hook == hook))
            .expect("every hook we trace has a base chain");
        self.walk(base, pkt, 0).unwrap_or(Trace {
            decision: Decision::Accept,
            rule: None,
            counter: None,
        })
    }

    fn walk(&self, chain: &Chain, pkt: &Packet, depth: usize) -> Option<Trace> {
        assert!(depth < 8, "jump loop in the ruleset");
        for (i, r) in chain.rules.iter().enumerate() {
            if !r.conds.iter().all(|c| self.holds(c, pkt)) {
                continue;
            }
            let decided = |decision| Trace {
                decision,
                rule: Some((chain.name, i)),
                counter: r.counter,
            };
            match r.verdict {
                Verdict::Accept => return Some(decided(Decision::Accept)),
                Verdict::Drop => return Some(decided(Decision::Drop)),
                Verdict::Jump(target) => {
                    let next = self.chain(target).expect("jump target exists");
                    if let Some(t) = self.walk(next, pkt, depth + 1) {
                        return Some(t);
                    }
                }
            }
        }
        None
    }

    fn holds(&self, c: &Cond, pkt: &Packet) -> bool {
        let v6 = match (pkt.src, pkt.dst) {
            (IpAddr::V6(s), IpAddr::V6(d)) => Some((s, d)),
            _ => None,
        };
        // Every `ip6 …` match carries an implicit `meta nfproto ipv6`: on an
        // IPv4 packet it is false, negated or not.
        match c {
            Cond::IifName(n) => pkt.iif == *n,
            Cond::OifName(n) => pkt.oif.as_deref() == Some(n),
            Cond::NotIpv6 => v6.is_none(),
            Cond::SameOrg(want) => v6.is_some_and(|(s, d)| {
                let key = (mask(s, ORG_MASK), mask(d, ORG_MASK));
                let found = self.orgs.keys().any(|p| element_key(*p) == key);
                found == *want
            }),
            Cond::SaddrIn(net, len) => v6.is_some_and(|(s, _)| in_prefix(s, *net, *len)),
            Cond::DaddrIn(net, len) => v6.is_some_and(|(_, d)| in_prefix(d, *net, *len)),
            Cond::DaddrHost(host, want) => {
                v6.is_some_and(|(_, d)| (mask(d, HOST_MASK) == *host) == *want)
            }
            Cond::UdpDport(p) => pkt.l4 == L4::Udp(*p),
            Cond::TcpDport(p) => pkt.l4 == L4::Tcp(*p),
            Cond::Icmpv6 => v6.is_some() && matches!(pkt.l4, L4::Icmpv6(_)),
            Cond::NeighborDiscovery => {
                v6.is_some()
                    && matches!(
                        pkt.l4,
                        L4::Icmpv6(ICMPV6_NEIGHBOR_SOLICIT | ICMPV6_NEIGHBOR_ADVERT)
                    )
            }
        }
    }
}

fn text_priority(p: i32) -> String {
    match p {
        0 => "filter".into(),
        p if p < 0 => format!("filter - {}", -p),
        p => format!("filter + {p}"),
    }
}

fn mask(a: Ipv6Addr, m: Ipv6Addr) -> Ipv6Addr {
    Ipv6Addr::from(a.to_bits() & m.to_bits())
}

fn in_prefix(a: Ipv6Addr, net: Ipv6Addr, len: u8) -> bool {
    let m = if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    };
    a.to_bits() & m == net.to_bits() & m
}

impl Cond {
    fn text(&self) -> String {
        let same = format!("ip6 saddr & {ORG_MASK} . ip6 daddr & {ORG_MASK}");
        match self {
            Cond::IifName(n) => format!("iifname \"{n}\""),
            Cond::OifName(n) => format!("oifname \"{n}\""),
            Cond::NotIpv6 => "meta nfproto != ipv6".into(),
            Cond::SameOrg(true) => format!("{same} @{SET}"),
            Cond::SameOrg(false) => format!("{same} != @{SET}"),
            Cond::SaddrIn(a, l) => format!("ip6 saddr {a}/{l}"),
            Cond::DaddrIn(a, l) => format!("ip6 daddr {a}/{l}"),
            Cond::DaddrHost(h, eq) => {
                format!(
                    "ip6 daddr & {HOST_MASK} {}{h}",
                    if *eq { "== " } else { "!= " }
                )
            }
            Cond::UdpDport(p) => format!("udp dport {p}"),
            Cond::TcpDport(p) => format!("tcp dport {p}"),
            Cond::Icmpv6 => "meta l4proto ipv6-icmp".into(),
            Cond::NeighborDiscovery => {
                "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert }".into()
            }
        }
    }
}

impl Rule {
    /// The rule in nft syntax.
    pub fn text(&self) -> String {
        let mut parts: Vec<String> = self.conds.iter().map(Cond::text).collect();
        if let Some(c) = self.counter {
            parts.push(format!("counter name \"{c}\""));
        }
        parts.push(match self.verdict {
            Verdict::Accept => "accept".into(),
            Verdict::Drop => "drop".into(),
            Verdict::Jump(t) => format!("jump {t}"),
        });
        parts.push(format!("comment \"{}\"", self.comment));
        parts.join(" ")
    }
}

// ----- observing ------------------------------------------------------------

/// Our table as `nft -j list table inet sixpn` showed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedTable {
    /// Whether the set `same_org48` exists.
    pub set: bool,
    /// The comments of each chain's rules, in order (`""` for none). The
    /// first rule's carries the skeleton's fingerprint.
    pub rules: BTreeMap<String, Vec<String>>,
    /// The set's elements with their comments, whatever they are.
    pub elements: BTreeMap<ElementKey, Option<String>>,
}

impl ObservedTable {
    /// Whether the static part is the one `want` would install.
    pub fn skeleton_matches(&self, want: &Ruleset) -> bool {
        let w = want.as_observed();
        self.set && self.rules == w.rules
    }
}

// ----- planning -------------------------------------------------------------

/// What to do to the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirewallPlan {
    /// It matches: nothing.
    Nothing,
    /// Replace the table whole, in one transaction.
    Replace {
        /// The ruleset to install.
        ruleset: Box<Ruleset>,
        /// Why, for the log.
        reason: &'static str,
    },
    /// Add and remove set elements, in one transaction.
    Update {
        /// Orgs to add.
        add: Vec<(OrgPrefix, String)>,
        /// Elements to remove.
        remove: Vec<ElementKey>,
    },
}

/// Plans the change from `observed` (`None`: the table is absent) to the
/// ruleset for `interface` with `orgs` (`None`: the store has not loaded, so
/// no element is added or removed). `force_replace`: the last transaction
/// failed, so the cache can't be trusted.
pub fn plan_firewall(
    interface: &str,
    orgs: Option<&BTreeMap<OrgPrefix, String>>,
    observed: Option<&ObservedTable>,
    force_replace: bool,
) -> FirewallPlan {
    let replace = |orgs: BTreeMap<OrgPrefix, String>, reason| FirewallPlan::Replace {
        ruleset: Box::new(Ruleset::new(interface, orgs)),
        reason,
    };
    let Some(seen) = observed else {
        return replace(orgs.cloned().unwrap_or_default(), "the table is missing");
    };
    // Before the store loads, keep the orgs that are there (the valid ones).
    let kept;
    let orgs = match orgs {
        Some(o) => o,
        None => {
            kept = kept_orgs(seen);
            &kept
        }
    };
    let want = Ruleset::new(interface, BTreeMap::new());
    if force_replace {
        return replace(orgs.clone(), "the last change failed");
    }
    if !seen.skeleton_matches(&want) {
        return replace(orgs.clone(), "the chains or rules differ from sixpn's");
    }
    let (add, remove) = diff(orgs, &seen.elements);
    if add.is_empty() && remove.is_empty() {
        FirewallPlan::Nothing
    } else {
        FirewallPlan::Update { add, remove }
    }
}

/// [`plan_firewall`] for a table that held `orgs` as they were before the
/// writes that `touched` these orgs: looks at those elements only, so a
/// store change costs what it changed. Anything else (no table, a failed
/// change, a skeleton that differs) gets the full plan.
pub fn plan_firewall_touched(
    interface: &str,
    orgs: &BTreeMap<OrgPrefix, String>,
    observed: Option<&ObservedTable>,
    force_replace: bool,
    touched: &BTreeSet<OrgPrefix>,
) -> FirewallPlan {
    let seen = match observed {
        Some(seen)
            if !force_replace
                && seen.skeleton_matches(&Ruleset::new(interface, BTreeMap::new())) =>
        {
            seen
        }
        _ => return plan_firewall(interface, Some(orgs), observed, force_replace),
    };
    let (mut add, mut remove) = (Vec::new(), Vec::new());
    for p in touched {
        let key = element_key(*p);
        match (orgs.get(p), seen.elements.contains_key(&key)) {
            (Some(name), false) => add.push((*p, name.clone())),
            (None, true) => remove.push(key),
            _ => {}
        }
    }
    if add.is_empty() && remove.is_empty() {
        FirewallPlan::Nothing
    } else {
        FirewallPlan::Update { add, remove }
    }
}

/// The orgs to add and the elements to remove, by one merge walk over both
/// sorted maps: this runs on every store change, at 100k orgs too.
/// [`element_key`] grows with the prefix, so both walk in the same order.
fn diff(
    want: &BTreeMap<OrgPrefix, String>,
    seen: &BTreeMap<ElementKey, Option<String>>,
) -> (Vec<(OrgPrefix, String)>, Vec<ElementKey>) {
    use std::cmp::Ordering;
    let (mut add, mut remove) = (Vec::new(), Vec::new());
    let mut w = want.iter().peekable();
    let mut s = seen.keys().peekable();
    loop {
        let order = match (w.peek(), s.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((p, _)), Some(k)) => element_key(**p).cmp(k),
        };
        match order {
            Ordering::Less => {
                let (p, n) = w.next().expect("peeked");
                add.push((*p, n.clone()));
            }
            Ordering::Greater => remove.push(*s.next().expect("peeked")),
            Ordering::Equal => {
                w.next();
                s.next();
            }
        }
    }
    (add, remove)
}

/// The orgs of a table's valid elements (`{P . P}` for a 6PN /48 `P`),
/// named by their comment when it is a plain name.
fn kept_orgs(seen: &ObservedTable) -> BTreeMap<OrgPrefix, String> {
    seen.elements
        .iter()
        .filter_map(|((a, b), c)| {
            let p = OrgPrefix::of(*a)?;
            (element_key(p) == (*a, *b)).then(|| {
                let name = c
                    .as_deref()
                    .filter(|n| {
                        !n.is_empty()
                            && n.len() <= 63
                            && n.bytes()
                                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    })
                    .unwrap_or("unnamed");
                (p, name.to_owned())
            })
        })
        .collect()
}

/// What the table looks like once `plan` applied, given what it was.
pub fn apply_firewall_to(observed: &mut Option<ObservedTable>, plan: &FirewallPlan) {
    match plan {
        FirewallPlan::Nothing => {}
        FirewallPlan::Replace { ruleset, .. } => *observed = Some(ruleset.as_observed()),
        FirewallPlan::Update { add, remove } => {
            if let Some(o) = observed.as_mut() {
                for k in remove {
                    o.elements.remove(k);
                }
                for (p, n) in add {
                    o.elements.insert(element_key(*p), Some(n.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
