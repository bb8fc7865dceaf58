//! The ruleset model: golden text, the JSON batch, the verdict tracer over
//! the isolation matrix, listing parsing and planning.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::*;

pub(crate) fn org(id: u32) -> OrgPrefix {
    crate::model::NetworkId::new(id).unwrap().prefix()
}

/// The documented example: `acme` fdaa:0:1::/48 and `globex` fdaa:0:2::/48
/// on `sixpn0`.
pub(crate) fn example() -> Ruleset {
    Ruleset::new(
        "sixpn0",
        [(org(1), "acme".into()), (org(2), "globex".into())].into(),
        None,
    )
}

/// The capture of the documented just-in-time example.
pub(crate) const JIT_CAPTURE: Capture = Capture {
    listen_port: 51820,
    mode: CaptureMode::Log { group: 1 },
};

/// The documented example with a handshake capture: [`example`] plus
/// `capture`.
pub(crate) fn example_with(capture: Capture) -> Ruleset {
    let plain = example();
    Ruleset::new(&plain.interface, plain.orgs, Some(capture))
}

const GOLDEN: &str = include_str!("../../../nft/sixpn.nft");
pub(crate) const GOLDEN_JIT: &str = include_str!("../../../nft/sixpn-jit.nft");

/// The golden file less its leading `#` comment block.
pub(crate) fn golden_table(file: &str) -> String {
    file.lines()
        .skip_while(|l| l.starts_with('#') || l.trim().is_empty())
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Checks `text` against the golden file `name` (under `nft/`, its
/// contents `golden`); with `SIXPN_BLESS` set, rewrites the file instead,
/// keeping its comment header.
fn check_golden(name: &str, golden: &str, text: &str) {
    if std::env::var_os("SIXPN_BLESS").is_some() {
        let path = format!("{}/nft/{name}", env!("CARGO_MANIFEST_DIR"));
        let header: String = golden
            .lines()
            .take_while(|l| l.starts_with('#') || l.trim().is_empty())
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(path, format!("{header}{text}")).unwrap();
        return;
    }
    assert_eq!(
        golden_table(golden),
        text,
        "nft/{name} and the renderer disagree; if the change is intended, \
         rerun with SIXPN_BLESS=1 and review the diff"
    );
}

#[test]
fn golden_file_is_the_text_render_of_the_example() {
    check_golden("sixpn.nft", GOLDEN, &example().to_text());
}

#[test]
fn jit_golden_file_is_the_text_render_of_the_example_with_a_capture() {
    check_golden(
        "sixpn-jit.nft",
        GOLDEN_JIT,
        &example_with(JIT_CAPTURE).to_text(),
    );
}

#[test]
fn the_capture_chain_runs_before_input_and_matches_initiations_only() {
    let log = example_with(JIT_CAPTURE);
    let c = log.chain(CAPTURE_CHAIN).expect("the capture chain");
    assert_eq!(
        c.base,
        Some(Base {
            hook: Hook::Input,
            priority: PRIORITY - 1
        })
    );
    assert_eq!(
        c.rules.iter().map(Rule::text).collect::<Vec<_>>(),
        [
            "udp dport 51820 udp length 156 @th,64,32 0x1000000 log group 1 \
          comment \"WireGuard handshake initiations: a copy to the daemon\""
        ]
    );
    let queue = example_with(Capture {
        listen_port: 51820,
        mode: CaptureMode::Queue { num: 3 },
    });
    let r = &queue.chain(CAPTURE_CHAIN).unwrap().rules[0];
    assert!(
        r.text().starts_with(
            "udp dport 51820 udp length 156 @th,64,32 0x1000000 queue flags bypass to 3 comment"
        ),
        "{}",
        r.text()
    );
    // Listed last, so the table without a capture is the same.
    assert_eq!(queue.chains.last().map(|c| c.name), Some(CAPTURE_CHAIN));
    assert_eq!(example().chain(CAPTURE_CHAIN), None);
    let plain = example();
    assert_eq!(log.chains[1..3], plain.chains[1..3]);
    let (mut ours, theirs) = (log.chains[0].clone(), &plain.chains[0]);
    assert_ne!(ours, *theirs, "the fingerprint differs");
    ours.rules[0].comment.clone_from(&theirs.rules[0].comment);
    assert_eq!(ours, *theirs, "and only the fingerprint");
}

#[test]
fn the_fingerprint_tells_captures_apart() {
    let mk = |listen_port, mode| example_with(Capture { listen_port, mode });
    let prints = [
        example(),
        mk(51820, CaptureMode::Log { group: 1 }),
        mk(51820, CaptureMode::Log { group: 2 }),
        mk(51820, CaptureMode::Queue { num: 1 }),
        mk(51820, CaptureMode::Queue { num: 2 }),
        mk(51821, CaptureMode::Queue { num: 1 }),
        mk(51821, CaptureMode::Log { group: 1 }),
    ]
    .map(|rs| rs.fingerprint().to_owned());
    let distinct: BTreeSet<&String> = prints.iter().collect();
    assert_eq!(distinct.len(), prints.len(), "{prints:?}");
    // Elements still don't count.
    let bare = Ruleset::new("sixpn0", BTreeMap::new(), Some(JIT_CAPTURE));
    assert_eq!(bare.fingerprint(), prints[1]);
}

#[test]
fn a_change_of_capture_replaces_the_table() {
    let want = orgs(&[1, 2]);
    let log = Some(JIT_CAPTURE);
    let queue = Some(Capture {
        listen_port: 51820,
        mode: CaptureMode::Queue { num: 1 },
    });
    let other_port = Some(Capture {
        listen_port: 51821,
        ..JIT_CAPTURE
    });
    let modes = [None, log, queue, other_port];
    for from in modes {
        let seen = Ruleset::new(WG, want.clone(), from).as_observed();
        for to in modes {
            let touched: BTreeSet<OrgPrefix> = [org(3)].into();
            let plans = [
                plan_firewall(WG, to, Some(&want), Some(&seen), false),
                plan_firewall(WG, to, None, Some(&seen), false),
                plan_firewall_touched(WG, to, &want, Some(&seen), false, &touched),
            ];
            assert_eq!(
                seen.skeleton_matches(&Ruleset::new(WG, BTreeMap::new(), to)),
                from == to
            );
            for p in plans {
                if from == to {
                    assert_eq!(p, FirewallPlan::Nothing, "{from:?} -> {to:?}");
                    continue;
                }
                let FirewallPlan::Replace { ruleset, reason } = &p else {
                    panic!("{from:?} -> {to:?}: {p:?}")
                };
                assert_eq!(ruleset.capture, to);
                assert_eq!(ruleset.orgs, want, "the orgs are kept");
                assert_eq!(*reason, "the chains or rules differ from sixpn's");
                let mut after = Some(seen.clone());
                apply_firewall_to(&mut after, &p);
                assert_eq!(
                    plan_firewall(WG, to, Some(&want), after.as_ref(), false),
                    FirewallPlan::Nothing
                );
            }
        }
    }
}

#[test]
fn the_fingerprint_covers_the_skeleton_only() {
    let a = example();
    let b = Ruleset::new("sixpn0", BTreeMap::new(), None);
    let c = Ruleset::new("other0", BTreeMap::new(), None);
    assert_eq!(a.fingerprint().len(), 12);
    assert_eq!(a.fingerprint(), b.fingerprint(), "elements don't count");
    assert_ne!(a.fingerprint(), c.fingerprint(), "the interface does");
    assert!(a
        .to_text()
        .contains(&format!("[sixpn ruleset {}]", a.fingerprint())));
}

// ----- the tracer ------------------------------------------------------------

const WG: &str = "sixpn0";
const LAN: &str = "eth1";
const UPLINK: &str = "eth0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    Peer,
    Instance,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dst {
    Instance,
    Peer,
    Dns,
    OtherPort,
    Non6pn,
}

fn peer_addr(net: u32, slot: u16) -> Ipv6Addr {
    let p = org(net).addr().segments();
    Ipv6Addr::new(p[0], p[1], p[2], 0xa7b, 0xd6b, 0, 0xa, (slot << 8) | 2)
}

fn instance_addr(net: u32) -> Ipv6Addr {
    let p = org(net).addr().segments();
    Ipv6Addr::new(p[0], p[1], p[2], 0xa7b, 0x7d, 0xf066, 0xb83b, 2)
}

/// The packets (hook and all) of one cell of the matrix.
fn packets(src: Src, from: u32, dst: Dst, to: u32) -> Vec<(Hook, Packet)> {
    let (iif, saddr) = match src {
        Src::Peer => (WG, peer_addr(from, 0)),
        Src::Instance => (LAN, instance_addr(from)),
    };
    let pkt = |oif: Option<&str>, d: Ipv6Addr, l4| Packet {
        iif: iif.into(),
        oif: oif.map(Into::into),
        src: IpAddr::V6(saddr),
        dst: IpAddr::V6(d),
        l4,
    };
    let fwd = |oif, d| {
        [
            L4::Icmpv6(ICMPV6_ECHO_REQUEST),
            L4::Tcp(80),
            L4::Udp(53),
            L4::LaterFragment,
        ]
        .into_iter()
        .map(|l4| (Hook::Forward, pkt(Some(oif), d, l4)))
        .collect::<Vec<_>>()
    };
    match dst {
        Dst::Instance => fwd(LAN, instance_addr(to)),
        Dst::Peer => fwd(WG, peer_addr(to, 1)),
        Dst::Non6pn => {
            let mut v = fwd(UPLINK, "2001:db8::1".parse().unwrap());
            // …and the gateway's own underlay address.
            v.push((
                Hook::Input,
                pkt(None, "2001:db8:1::1".parse().unwrap(), L4::Tcp(22)),
            ));
            v
        }
        // A later fragment to ::3 passes: its datagram is delivered only
        // with its first fragment, which is one of the others here.
        Dst::Dns => [
            L4::Udp(53),
            L4::Tcp(53),
            L4::Icmpv6(ICMPV6_ECHO_REQUEST),
            L4::LaterFragment,
        ]
        .into_iter()
        .map(|l4| (Hook::Input, pkt(None, org(to).dns_addr(), l4)))
        .collect(),
        Dst::OtherPort => [L4::Tcp(22), L4::Udp(123), L4::Tcp(80)]
            .into_iter()
            .map(|l4| (Hook::Input, pkt(None, org(to).dns_addr(), l4)))
            .collect(),
    }
}

#[test]
fn only_same_org_traffic_to_allowed_destinations_passes() {
    let rs = example();
    // 1 = acme, 2 = globex, 9 = an org this gateway doesn't know.
    let orgs = [1, 2, 9];
    let mut checked = 0;
    for src in [Src::Peer, Src::Instance] {
        for from in orgs {
            for dst in [
                Dst::Instance,
                Dst::Peer,
                Dst::Dns,
                Dst::OtherPort,
                Dst::Non6pn,
            ] {
                for to in orgs {
                    let allowed = from == to
                        && from != 9
                        && matches!(dst, Dst::Instance | Dst::Peer | Dst::Dns);
                    for (hook, p) in packets(src, from, dst, to) {
                        let t = rs.trace(hook, &p);
                        let want = if allowed {
                            Decision::Accept
                        } else {
                            Decision::Drop
                        };
                        assert_eq!(
                            t.decision, want,
                            "{src:?} of org {from} -> {dst:?} of org {to}: {p:?} {hook:?} {t:?}"
                        );
                        if want == Decision::Drop {
                            let counter = match hook {
                                Hook::Forward => FORWARD_DROPPED,
                                Hook::Input => INPUT_DROPPED,
                            };
                            assert_eq!(t.counter, Some(counter), "drops are counted: {t:?}");
                        }
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked > 200, "{checked}");
}

#[test]
fn an_empty_set_forwards_no_6pn_at_all() {
    let rs = Ruleset::new(WG, BTreeMap::new(), None);
    for (hook, p) in packets(Src::Peer, 1, Dst::Instance, 1)
        .into_iter()
        .chain(packets(Src::Peer, 1, Dst::Dns, 1))
        .chain(packets(Src::Instance, 1, Dst::Peer, 1))
    {
        assert_eq!(rs.trace(hook, &p).decision, Decision::Drop, "{p:?}");
    }
}

#[test]
fn ipv4_from_a_peer_is_dropped_and_foreign_traffic_left_alone() {
    let rs = example();
    let v4 = |iif: &str, oif: Option<&str>, l4| Packet {
        iif: iif.into(),
        oif: oif.map(Into::into),
        src: "10.0.0.2".parse().unwrap(),
        dst: "10.0.0.1".parse().unwrap(),
        l4,
    };
    let t = rs.trace(Hook::Input, &v4(WG, None, L4::Udp(53)));
    assert_eq!(
        (t.decision, t.counter),
        (Decision::Drop, Some(INPUT_DROPPED))
    );
    let t = rs.trace(Hook::Forward, &v4(WG, Some(UPLINK), L4::Tcp(80)));
    assert_eq!(t.decision, Decision::Drop);
    // Not 6PN and not the WireGuard interface: not ours to judge.
    let t = rs.trace(Hook::Forward, &v4(UPLINK, Some(LAN), L4::Tcp(80)));
    assert_eq!((t.decision, t.rule), (Decision::Accept, None));
    let other = Packet {
        iif: UPLINK.into(),
        oif: Some(LAN.into()),
        src: "2001:db8::1".parse().unwrap(),
        dst: "2001:db8:2::1".parse().unwrap(),
        l4: L4::Tcp(443),
    };
    assert_eq!(rs.trace(Hook::Forward, &other).rule, None);
    let to_host = Packet {
        oif: None,
        dst: "2001:db8:1::1".parse().unwrap(),
        ..other
    };
    assert_eq!(rs.trace(Hook::Input, &to_host).rule, None);
}

#[test]
fn a_source_spoofing_another_org_never_gets_the_org_pair() {
    // What WireGuard's allowed-ips already stops, the set stops too: a peer
    // of acme claiming a globex source reaches only globex, and only what
    // globex's own peers could.
    let rs = example();
    let p = Packet {
        iif: WG.into(),
        oif: Some(LAN.into()),
        src: IpAddr::V6(peer_addr(2, 7)),
        dst: IpAddr::V6(instance_addr(1)),
        l4: L4::Icmpv6(ICMPV6_ECHO_REQUEST),
    };
    assert_eq!(rs.trace(Hook::Forward, &p).decision, Decision::Drop);
}

/// A WireGuard message of type `kind`, `len` bytes long.
fn wg_message(kind: u8, len: usize) -> Vec<u8> {
    let mut m = vec![0u8; len];
    m[0] = kind;
    m[4..8].copy_from_slice(&0x1234_5678u32.to_le_bytes());
    m
}

#[test]
fn only_handshake_initiations_to_the_listen_port_are_captured() {
    let initiation = wg_message(1, 148);
    let to = |iif: &str, src: &str, dst: &str, l4| Packet {
        iif: iif.into(),
        oif: None,
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        l4,
    };
    let underlay = |l4| to(UPLINK, "2001:db8::9", "2001:db8:1::1", l4);
    for mode in [CaptureMode::Log { group: 1 }, CaptureMode::Queue { num: 7 }] {
        let rs = example_with(Capture {
            listen_port: 51820,
            mode,
        });
        // An initiation over IPv6 or IPv4, or from the gateway itself
        // (`lo` is accepted by `input`, not by `capture`): captured, then
        // on through `input` (queued: once the daemon accepts it).
        for p in [
            underlay(L4::udp_payload(51820, &initiation)),
            to(
                UPLINK,
                "192.0.2.9",
                "192.0.2.1",
                L4::udp_payload(51820, &initiation),
            ),
            to("lo", "::1", "::1", L4::udp_payload(51820, &initiation)),
        ] {
            let t = rs.trace(Hook::Input, &p);
            assert_eq!(t.captured, Some(mode), "{p:?}: {t:?}");
            assert_eq!(t.decision, Decision::Accept, "{p:?}: {t:?}");
        }
        // The isolation rules still apply after the capture: an
        // initiation from a peer to a 6PN address here is dropped.
        let from_peer = to(
            WG,
            &peer_addr(1, 0).to_string(),
            &org(1).dns_addr().to_string(),
            L4::udp_payload(51820, &initiation),
        );
        let t = rs.trace(Hook::Input, &from_peer);
        assert_eq!(
            (t.captured, t.decision, t.counter),
            (Some(mode), Decision::Drop, Some(INPUT_DROPPED))
        );
        // Not an initiation, or not to the port: not captured.
        for l4 in [
            L4::udp_payload(51820, &wg_message(4, 148)),
            L4::udp_payload(51820, &wg_message(4, 32)),
            L4::udp_payload(51820, &wg_message(2, 92)),
            L4::udp_payload(51820, &wg_message(1, 149)),
            L4::udp_payload(51820, &wg_message(1, 147)),
            L4::udp_payload(51821, &initiation),
            L4::Udp(51820),
            L4::Tcp(51820),
        ] {
            let t = rs.trace(Hook::Input, &underlay(l4));
            assert_eq!(
                (t.captured, t.decision, t.rule),
                (None, Decision::Accept, None),
                "{l4:?}"
            );
        }
        // Forwarded traffic never meets the capture.
        let mut fwd = underlay(L4::udp_payload(51820, &initiation));
        fwd.oif = Some(LAN.into());
        assert_eq!(rs.trace(Hook::Forward, &fwd).captured, None);
    }
    // Without a capture, nothing is.
    let t = example().trace(Hook::Input, &underlay(L4::udp_payload(51820, &initiation)));
    assert_eq!((t.captured, t.decision), (None, Decision::Accept));
}

#[test]
fn a_capture_changes_no_isolation_verdict() {
    let plain = example();
    let with = example_with(Capture {
        listen_port: 53,
        mode: CaptureMode::Queue { num: 1 },
    });
    for src in [Src::Peer, Src::Instance] {
        for dst in [
            Dst::Instance,
            Dst::Peer,
            Dst::Dns,
            Dst::OtherPort,
            Dst::Non6pn,
        ] {
            for (from, to) in [(1, 1), (1, 2), (9, 9)] {
                for (hook, p) in packets(src, from, dst, to) {
                    let (a, b) = (plain.trace(hook, &p), with.trace(hook, &p));
                    assert_eq!(
                        (a.decision, a.rule, a.counter),
                        (b.decision, b.rule, b.counter),
                        "{p:?}"
                    );
                    assert_eq!(b.captured, None, "{p:?}");
                }
            }
        }
    }
}

// ----- listing and planning ----------------------------------------------------

fn orgs(ids: &[u32]) -> BTreeMap<OrgPrefix, String> {
    ids.iter().map(|i| (org(*i), format!("org{i}"))).collect()
}

#[test]
fn plan_replaces_a_missing_table_then_plans_nothing() {
    let want = orgs(&[1, 2]);
    let p = plan_firewall(WG, None, Some(&want), None, false);
    let FirewallPlan::Replace { ruleset, .. } = &p else {
        panic!("{p:?}")
    };
    assert_eq!(ruleset.orgs, want);
    let mut seen = None;
    apply_firewall_to(&mut seen, &p);
    assert_eq!(
        plan_firewall(WG, None, Some(&want), seen.as_ref(), false),
        FirewallPlan::Nothing
    );
}

#[test]
fn adding_or_removing_an_org_changes_elements_only() {
    let mut seen = Some(Ruleset::new(WG, orgs(&[1, 2]), None).as_observed());
    let p = plan_firewall(WG, None, Some(&orgs(&[1, 2, 3])), seen.as_ref(), false);
    assert_eq!(
        p,
        FirewallPlan::Update {
            add: vec![(org(3), "org3".into())],
            remove: vec![]
        }
    );
    apply_firewall_to(&mut seen, &p);
    let p = plan_firewall(WG, None, Some(&orgs(&[2, 3])), seen.as_ref(), false);
    assert_eq!(
        p,
        FirewallPlan::Update {
            add: vec![],
            remove: vec![element_key(org(1))]
        }
    );
    apply_firewall_to(&mut seen, &p);
    assert_eq!(
        plan_firewall(WG, None, Some(&orgs(&[2, 3])), seen.as_ref(), false),
        FirewallPlan::Nothing
    );
}

#[test]
fn a_plan_for_touched_orgs_looks_at_those_only_and_falls_back_when_unsure() {
    let seen = Some(Ruleset::new(WG, orgs(&[1, 2]), None).as_observed());
    let touched = |ids: &[u32]| ids.iter().map(|i| org(*i)).collect::<BTreeSet<_>>();
    let now = orgs(&[1, 2, 3]);
    assert_eq!(
        plan_firewall_touched(WG, None, &now, seen.as_ref(), false, &touched(&[3])),
        FirewallPlan::Update {
            add: vec![(org(3), "org3".into())],
            remove: vec![]
        }
    );
    // Untouched orgs are not compared: that is the point.
    assert_eq!(
        plan_firewall_touched(WG, None, &now, seen.as_ref(), false, &touched(&[])),
        FirewallPlan::Nothing
    );
    let gone = orgs(&[2]);
    assert_eq!(
        plan_firewall_touched(WG, None, &gone, seen.as_ref(), false, &touched(&[1])),
        FirewallPlan::Update {
            add: vec![],
            remove: vec![element_key(org(1))]
        }
    );
    // No table, or a failed last change: the full plan.
    for (seen, force) in [(None, false), (seen.clone(), true)] {
        let p = plan_firewall_touched(WG, None, &now, seen.as_ref(), force, &touched(&[3]));
        assert!(matches!(p, FirewallPlan::Replace { .. }), "{p:?}");
    }
}

#[test]
fn a_cross_org_element_is_removed() {
    let mut seen = Ruleset::new(WG, orgs(&[1, 2]), None).as_observed();
    let bridge = (org(1).addr(), org(2).addr());
    seen.elements.insert(bridge, Some("org1".into()));
    let p = plan_firewall(WG, None, Some(&orgs(&[1, 2])), Some(&seen), false);
    assert_eq!(
        p,
        FirewallPlan::Update {
            add: vec![],
            remove: vec![bridge]
        }
    );
    // Even before the store loads.
    let p = plan_firewall(WG, None, None, Some(&seen), false);
    assert!(
        matches!(p, FirewallPlan::Update { ref remove, .. } if remove == &[bridge]),
        "{p:?}"
    );
}

#[test]
fn flushed_rules_or_a_failed_change_force_a_replace() {
    let want = orgs(&[1]);
    let mut seen = Ruleset::new(WG, want.clone(), None).as_observed();
    assert_eq!(
        plan_firewall(WG, None, Some(&want), Some(&seen), false),
        FirewallPlan::Nothing
    );
    assert!(matches!(
        plan_firewall(WG, None, Some(&want), Some(&seen), true),
        FirewallPlan::Replace {
            reason: "the last change failed",
            ..
        }
    ));
    // `nft flush table inet sixpn` keeps chains and set, drops the rules.
    for n in seen.rules.values_mut() {
        n.clear();
    }
    assert!(matches!(
        plan_firewall(WG, None, Some(&want), Some(&seen), false),
        FirewallPlan::Replace { .. }
    ));
    // A skeleton for another interface is not ours either.
    let other = Ruleset::new("wg9", want.clone(), None).as_observed();
    assert!(matches!(
        plan_firewall(WG, None, Some(&want), Some(&other), false),
        FirewallPlan::Replace { .. }
    ));
}

#[test]
fn before_the_store_loads_nothing_is_added_or_removed() {
    // Absent: installed empty, so nothing 6PN is forwarded meanwhile.
    let p = plan_firewall(WG, None, None, None, false);
    assert!(
        matches!(&p, FirewallPlan::Replace { ruleset, .. } if ruleset.orgs.is_empty()),
        "{p:?}"
    );
    // Present and right: left as it is.
    let seen = Ruleset::new(WG, orgs(&[1, 2]), None).as_observed();
    assert_eq!(
        plan_firewall(WG, None, None, Some(&seen), false),
        FirewallPlan::Nothing
    );
    // Broken: replaced, keeping the orgs it had.
    let mut broken = seen.clone();
    broken.rules.clear();
    let p = plan_firewall(WG, None, None, Some(&broken), false);
    assert!(
        matches!(&p, FirewallPlan::Replace { ruleset, .. } if ruleset.orgs == orgs(&[1, 2])),
        "{p:?}"
    );
}

#[test]
fn link_neighbors_resolve_the_gateway_but_peers_get_no_exception() {
    let rs = example();
    let ns = |iif: &str, src: Ipv6Addr, dst: Ipv6Addr| Packet {
        iif: iif.into(),
        oif: None,
        src: IpAddr::V6(src),
        dst: IpAddr::V6(dst),
        l4: L4::Icmpv6(ICMPV6_NEIGHBOR_SOLICIT),
    };
    let solicited: Ipv6Addr = "ff02::1:ff00:1".parse().unwrap();
    let gw_link: Ipv6Addr = "fdaa:0:1:1::1".parse().unwrap();
    for dst in [solicited, gw_link] {
        let t = rs.trace(Hook::Input, &ns(LAN, instance_addr(1), dst));
        assert_eq!(t.decision, Decision::Accept, "{dst}: {t:?}");
        let t = rs.trace(Hook::Input, &ns(WG, peer_addr(1, 0), dst));
        assert_eq!(t.decision, Decision::Drop, "from a peer {dst}: {t:?}");
    }
    // Other ICMPv6 from a 6PN neighbour to a non-DNS address: dropped.
    let mut echo = ns(LAN, instance_addr(1), gw_link);
    echo.l4 = L4::Icmpv6(ICMPV6_ECHO_REQUEST);
    assert_eq!(rs.trace(Hook::Input, &echo).decision, Decision::Drop);
}
