//! The ruleset in nft's own listing syntax: what `nft list table inet
//! sixpn` prints (less counter values and handles), and what
//! `nft/sixpn.nft` holds for the documented example.

use std::fmt::Write as _;

use super::{
    Cond, Rule, Ruleset, Verdict, FORWARD_DROPPED, HOST_MASK, INPUT_DROPPED, ORG_MASK, SET, TABLE,
};

impl Ruleset {
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
}

/// nft names a priority after `filter` (0) only within 10 of it: `filter -
/// 10`, but `-11`.
fn text_priority(p: i32) -> String {
    match p {
        0 => "filter".into(),
        -10..=-1 => format!("filter - {}", -p),
        1..=10 => format!("filter + {p}"),
        p => p.to_string(),
    }
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
            Cond::UdpLength(n) => format!("udp length {n}"),
            Cond::UdpHead(v) => format!("@th,64,32 {v:#x}"),
            Cond::TcpDport(p) => format!("tcp dport {p}"),
            Cond::Icmpv6 => "meta l4proto ipv6-icmp".into(),
            Cond::LaterFragment => "frag frag-off != 0".into(),
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
            Verdict::Queue(n) => format!("queue flags bypass to {n}"),
            Verdict::Log(g) => format!("log group {g}"),
        });
        parts.push(format!("comment \"{}\"", self.comment));
        parts.join(" ")
    }
}
