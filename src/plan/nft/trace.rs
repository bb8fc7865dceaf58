//! A verdict tracer: walks a [`Packet`] through the same rules the kernel
//! gets, so the isolation matrix is a unit test with no kernel.

use std::net::{IpAddr, Ipv6Addr};

use super::{
    element_key, CaptureMode, Chain, Cond, Hook, Ruleset, Verdict, HOST_MASK,
    ICMPV6_NEIGHBOR_ADVERT, ICMPV6_NEIGHBOR_SOLICIT, ORG_MASK, UDP_HEADER_LEN,
};

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
    /// UDP to this port (length and payload unknown: no `udp length` or
    /// payload match holds for it).
    Udp(u16),
    /// A UDP datagram with what the capture rule looks at.
    UdpDatagram {
        /// The destination port.
        dport: u16,
        /// The UDP header's length field (header included).
        length: u16,
        /// The first 32 bits of the payload, big-endian (zero-padded when
        /// shorter).
        head: u32,
    },
    /// TCP to this port.
    Tcp(u16),
    /// ICMPv6 of this type.
    Icmpv6(u8),
    /// A fragment after the first (no transport header in it).
    LaterFragment,
}

impl L4 {
    /// A UDP datagram to `dport` carrying `payload`.
    pub fn udp_payload(dport: u16, payload: &[u8]) -> Self {
        let mut head = [0u8; 4];
        let n = payload.len().min(4);
        head[..n].copy_from_slice(&payload[..n]);
        let length = u16::try_from(payload.len())
            .unwrap_or(u16::MAX)
            .saturating_add(UDP_HEADER_LEN);
        L4::UdpDatagram {
            dport,
            length,
            head: u32::from_be_bytes(head),
        }
    }

    fn udp_dport(self) -> Option<u16> {
        match self {
            L4::Udp(p) | L4::UdpDatagram { dport: p, .. } => Some(p),
            _ => None,
        }
    }
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
    /// The capture the packet met on the way: queued (the daemon accepted
    /// it, or no daemon was there, and it went on) or logged.
    pub captured: Option<CaptureMode>,
}

impl Ruleset {
    /// Walks `pkt` through the base chains on `hook` in priority order, as
    /// the kernel would: a drop ends it, an accept (by a rule or the policy)
    /// goes on to the next base chain. `rule` and `counter` are those of the
    /// last chain's verdict. A queued packet is taken as accepted by the
    /// daemon.
    pub fn trace(&self, hook: Hook, pkt: &Packet) -> Trace {
        let mut bases: Vec<(&Chain, i32)> = self
            .chains
            .iter()
            .filter_map(|c| c.base.filter(|b| b.hook == hook).map(|b| (c, b.priority)))
            .collect();
        assert!(!bases.is_empty(), "every hook we trace has a base chain");
        bases.sort_by_key(|(_, prio)| *prio);
        let mut captured = None;
        let mut last = None;
        for (chain, _) in bases {
            let t = self.walk(chain, pkt, 0, &mut captured);
            let dropped = t.as_ref().is_some_and(|t| t.decision == Decision::Drop);
            last = t;
            if dropped {
                break;
            }
        }
        let (decision, rule, counter) = last.map_or((Decision::Accept, None, None), |t| {
            (t.decision, t.rule, t.counter)
        });
        Trace {
            decision,
            rule,
            counter,
            captured,
        }
    }

    fn walk(
        &self,
        chain: &Chain,
        pkt: &Packet,
        depth: usize,
        captured: &mut Option<CaptureMode>,
    ) -> Option<Trace> {
        assert!(depth < 8, "jump loop in the ruleset");
        for (i, r) in chain.rules.iter().enumerate() {
            if !r.conds.iter().all(|c| self.holds(c, pkt)) {
                continue;
            }
            let decided = |decision| Trace {
                decision,
                rule: Some((chain.name, i)),
                counter: r.counter,
                captured: None,
            };
            match r.verdict {
                Verdict::Accept => return Some(decided(Decision::Accept)),
                Verdict::Drop => return Some(decided(Decision::Drop)),
                Verdict::Jump(target) => {
                    let next = self.chain(target).expect("jump target exists");
                    if let Some(t) = self.walk(next, pkt, depth + 1, captured) {
                        return Some(t);
                    }
                }
                Verdict::Queue(num) => {
                    *captured = Some(CaptureMode::Queue { num });
                    return Some(decided(Decision::Accept));
                }
                Verdict::Log(group) => *captured = Some(CaptureMode::Log { group }),
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
            Cond::UdpDport(p) => pkt.l4.udp_dport() == Some(*p),
            Cond::UdpLength(n) => matches!(pkt.l4, L4::UdpDatagram { length, .. } if length == *n),
            Cond::UdpHead(v) => matches!(pkt.l4, L4::UdpDatagram { head, .. } if head == *v),
            Cond::TcpDport(p) => pkt.l4 == L4::Tcp(*p),
            Cond::Icmpv6 => v6.is_some() && matches!(pkt.l4, L4::Icmpv6(_)),
            Cond::LaterFragment => v6.is_some() && pkt.l4 == L4::LaterFragment,
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
