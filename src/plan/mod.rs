//! Planning: pure functions from (desired, observed) to a [`Plan`] — data
//! that says what to change, never doing it. No I/O, no clock, no async, so
//! every rule is a unit test below.
//!
//! Invariants:
//! - A plan applied to what was observed yields a state whose next plan is
//!   empty.
//! - Nothing is deleted before the store has loaded (`desired` is `None`).
//! - Only what carries our markers is ever removed: routes with our protocol
//!   (the adapter lists no others), `<org>::3/128` addresses, and peers whose
//!   allowed-ips are peer /120s under this gateway's host id. Anything else on
//!   the interface was put there by someone else and is left alone.
//!
//! Registered peers (the store) and installed peers (the kernel) are kept
//! apart: [`Desired::installed`] is what should be on the interface. With
//! every peer installed ("all") that is every peer registered on this
//! gateway; with just-in-time peers ([`jit`]) only the admitted ones, the
//! others waiting in [`Desired::pending`] for their first initiation.

pub mod ephemeral;
pub mod guard;
pub mod jit;
pub mod kernel;
pub mod nft;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};

use crate::model::{GatewayName, HostId, OrgName, OrgPrefix, PeerName, PeerNet, PublicKey};
use crate::store::{Delta, Peer, Snapshot};
use kernel::{AllowedIp, DeviceState, LinkState, PeerUpsert, MTU};

/// A peer that should be on this gateway's interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPeer {
    /// Its org (for logs).
    pub org: OrgName,
    /// Its name (for logs).
    pub name: PeerName,
    /// Its /120: the allowed-ips and the route.
    pub net: PeerNet,
}

/// What this gateway's kernel should hold, computed from a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Peers registered on this gateway.
    pub registered: usize,
    /// Peers to install, by key.
    pub installed: BTreeMap<PublicKey, DesiredPeer>,
    /// Just-in-time: peers registered here that are not admitted, by key
    /// (always empty when every registered peer is installed).
    pub pending: BTreeMap<PublicKey, DesiredPeer>,
    /// Just-in-time: a new registration waits in `pending` for its first
    /// initiation instead of being installed.
    pub jit: bool,
    /// `<org>::3` for each org with registered peers here (so the first
    /// query of a peer just admitted finds its DNS server up).
    pub dns_addresses: BTreeSet<Ipv6Addr>,
    /// Every org in the store, by prefix, for the isolation set: an org
    /// with no peers here still has instances that peers of other orgs must
    /// not reach, and its own peers may arrive at any moment.
    pub orgs: BTreeMap<OrgPrefix, String>,
    /// How many registered peers each org has here (what keeps its `::3`).
    pub org_peers: BTreeMap<OrgPrefix, usize>,
}

/// What store writes changed in a [`Desired`]: the only things a plan for
/// them needs to look at ([`plan_touched`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    /// Peers added or removed here, by key.
    pub peers: BTreeSet<PublicKey>,
    /// Their routes.
    pub routes: BTreeSet<(Ipv6Addr, u8)>,
    /// `::3` addresses of their orgs.
    pub dns_addresses: BTreeSet<Ipv6Addr>,
    /// Orgs added to the store (the isolation set).
    pub orgs: BTreeSet<OrgPrefix>,
}

impl Touched {
    /// Whether nothing the kernel holds is touched.
    pub fn is_empty(&self) -> bool {
        *self == Touched::default()
    }
}

impl Desired {
    /// The desired state of gateway `me` in `snap`, every registered peer
    /// installed.
    pub fn from_snapshot(snap: &Snapshot, me: &GatewayName) -> Self {
        Self::build(snap, me, None)
    }

    /// The desired state of gateway `me` in `snap` with just-in-time peers:
    /// only the registered peers in `admitted` are installed.
    pub fn from_snapshot_jit<V>(
        snap: &Snapshot,
        me: &GatewayName,
        admitted: &std::collections::HashMap<PublicKey, V>,
    ) -> Self {
        Self::build(snap, me, Some(&|k: &PublicKey| admitted.contains_key(k)))
    }

    fn build(
        snap: &Snapshot,
        me: &GatewayName,
        admitted: Option<&dyn Fn(&PublicKey) -> bool>,
    ) -> Self {
        let mut d = Desired {
            jit: admitted.is_some(),
            ..Desired::default()
        };
        for o in &snap.orgs {
            d.orgs
                .insert(o.network_id.prefix(), o.name.as_str().to_owned());
        }
        for p in snap.peers.iter().filter(|p| &p.gateway == me) {
            let install = admitted.is_none_or(|a| a(&p.public_key));
            d.add_peer(p, install);
        }
        d
    }

    /// The peer registered here with `key`, installed or not.
    pub fn registered_peer(&self, key: &PublicKey) -> Option<&DesiredPeer> {
        self.installed.get(key).or_else(|| self.pending.get(key))
    }

    /// Just-in-time: installs the registered peer `key`, noting it in
    /// `touched`. False if it isn't registered here or is installed already.
    pub fn admit(&mut self, key: &PublicKey, touched: &mut Touched) -> bool {
        let Some(p) = self.pending.remove(key) else {
            return false;
        };
        touched.peers.insert(*key);
        touched.routes.insert((p.net.network(), PeerNet::LEN));
        self.installed.insert(*key, p);
        true
    }

    /// Just-in-time: takes the installed peer `key` off the kernel (it stays
    /// registered), noting it in `touched`. False if it isn't installed.
    pub fn evict(&mut self, key: &PublicKey, touched: &mut Touched) -> bool {
        let Some(p) = self.installed.remove(key) else {
            return false;
        };
        touched.peers.insert(*key);
        touched.routes.insert((p.net.network(), PeerNet::LEN));
        self.pending.insert(*key, p);
        true
    }

    fn add_peer(&mut self, p: &Peer, install: bool) -> Option<OrgPrefix> {
        self.registered += 1;
        let want = DesiredPeer {
            org: p.org.clone(),
            name: p.name.clone(),
            net: p.net,
        };
        if install {
            self.installed.insert(p.public_key, want);
        } else {
            self.pending.insert(p.public_key, want);
        }
        let prefix = OrgPrefix::of(p.net.network())?;
        *self.org_peers.entry(prefix).or_default() += 1;
        self.dns_addresses.insert(prefix.dns_addr());
        Some(prefix)
    }

    /// Follows one store write (`delta`) on gateway `me`, noting in
    /// `touched` what it changed. Starting from `from_snapshot(s)` and
    /// following the writes from `s` to `t` gives `from_snapshot(t)`.
    pub fn follow(&mut self, delta: &Delta, me: &GatewayName, touched: &mut Touched) {
        let route = |p: &Peer| (p.net.network(), PeerNet::LEN);
        match delta {
            Delta::OrgAdded(o) => {
                let prefix = o.network_id.prefix();
                self.orgs.insert(prefix, o.name.as_str().to_owned());
                touched.orgs.insert(prefix);
            }
            Delta::PeerAdded(p) if &p.gateway == me => {
                if let Some(prefix) = self.add_peer(p, !self.jit) {
                    touched.dns_addresses.insert(prefix.dns_addr());
                }
                touched.peers.insert(p.public_key);
                touched.routes.insert(route(p));
            }
            Delta::PeerRemoved(p) if &p.gateway == me => {
                let gone = self.installed.remove(&p.public_key);
                if gone
                    .or_else(|| self.pending.remove(&p.public_key))
                    .is_none()
                {
                    return;
                }
                self.registered = self.registered.saturating_sub(1);
                if let Some(prefix) = OrgPrefix::of(p.net.network()) {
                    let left = self.org_peers.get_mut(&prefix).map(|n| {
                        *n = n.saturating_sub(1);
                        *n
                    });
                    if left == Some(0) {
                        self.org_peers.remove(&prefix);
                        self.dns_addresses.remove(&prefix.dns_addr());
                    }
                    touched.dns_addresses.insert(prefix.dns_addr());
                }
                touched.peers.insert(p.public_key);
                touched.routes.insert(route(p));
            }
            Delta::PeerAdded(_)
            | Delta::PeerRemoved(_)
            | Delta::Unchanged
            | Delta::InstanceAdded(_)
            | Delta::InstanceRemoved(..) => {}
        }
    }

    /// The routes the installed peers need.
    pub fn routes(&self) -> BTreeSet<(Ipv6Addr, u8)> {
        self.installed
            .values()
            .map(|p| (p.net.network(), PeerNet::LEN))
            .collect()
    }
}

/// What the kernel holds, as the adapters reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Our interface, if it exists.
    pub link: Option<LinkState>,
    /// The WireGuard device on it.
    pub device: Option<DeviceState>,
    /// IPv6 addresses on the interface.
    pub addresses: BTreeSet<(Ipv6Addr, u8)>,
    /// Routes with our protocol on the interface.
    pub routes: BTreeSet<(Ipv6Addr, u8)>,
}

/// Who this gateway is, as far as the plan cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The public key of the gateway's private key.
    pub public_key: PublicKey,
    /// The WireGuard listen port.
    pub listen_port: u16,
    /// The host id in our peers' addresses.
    pub host_id: HostId,
}

/// The changes that make the kernel match the desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The interface is missing: create it (then observe and plan again).
    pub create_interface: bool,
    /// Attach the isolation guard ([`guard`]) to the interface.
    pub guard: bool,
    /// Set the link up with [`MTU`].
    pub link_up: bool,
    /// Set the private key and listen port.
    pub configure_device: bool,
    /// Peers to add or whose allowed-ips to set.
    pub upsert_peers: Vec<PeerUpsert>,
    /// Our peers that are no longer wanted.
    pub remove_peers: Vec<PublicKey>,
    /// `::3` addresses to add.
    pub add_addresses: Vec<Ipv6Addr>,
    /// Our addresses to remove.
    pub remove_addresses: Vec<(Ipv6Addr, u8)>,
    /// Routes to add.
    pub add_routes: Vec<(Ipv6Addr, u8)>,
    /// Our routes to remove.
    pub remove_routes: Vec<(Ipv6Addr, u8)>,
}

impl Plan {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        *self == Plan::default()
    }

    /// How many changes the plan makes.
    pub fn len(&self) -> usize {
        usize::from(self.create_interface)
            + usize::from(self.guard)
            + usize::from(self.link_up)
            + usize::from(self.configure_device)
            + self.upsert_peers.len()
            + self.remove_peers.len()
            + self.add_addresses.len()
            + self.remove_addresses.len()
            + self.add_routes.len()
            + self.remove_routes.len()
    }
}

/// Whether `ip` is a peer /120 that sixpn would give out on gateway `host`:
/// `fdaa:NET:NET:HOST:HOST:0:G:SS00/120` with G ≥ `a`.
pub fn is_our_peer_net(ip: &AllowedIp, host: HostId) -> bool {
    let IpAddr::V6(a) = ip.addr else {
        return false;
    };
    let s = a.segments();
    ip.len == PeerNet::LEN
        && OrgPrefix::of(a).is_some()
        && (u32::from(s[3]) << 16 | u32::from(s[4])) == host.get()
        && s[5] == 0
        && s[6] >= 0xa
        && s[7] & 0xff == 0
}

/// Whether `addr/len` is an org DNS address, which sixpn owns on its
/// interface.
pub fn is_our_address(addr: Ipv6Addr, len: u8) -> bool {
    len == 128 && OrgPrefix::of(addr).is_some_and(|p| p.dns_addr() == addr)
}

/// The interface's part of a plan, and the device to plan peers against;
/// no device: the interface is missing, and creating it is the whole plan.
fn plan_interface<'a>(observed: &'a Observed, me: &Identity) -> (Plan, Option<&'a DeviceState>) {
    let (Some(link), Some(device)) = (observed.link, observed.device.as_ref()) else {
        let create = Plan {
            create_interface: true,
            ..Plan::default()
        };
        return (create, None);
    };
    let p = Plan {
        guard: !link.guarded,
        link_up: !link.up || link.mtu != MTU,
        configure_device: device.public_key != Some(me.public_key)
            || device.listen_port != me.listen_port,
        ..Plan::default()
    };
    (p, Some(device))
}

/// Plans the changes from `observed` to `desired`. With `desired` absent
/// (the store has not loaded yet) only the interface itself is ensured:
/// nothing is added or removed on it.
pub fn plan(desired: Option<&Desired>, observed: &Observed, me: &Identity) -> Plan {
    let (mut p, device) = plan_interface(observed, me);
    let Some(device) = device else { return p };
    let Some(desired) = desired else {
        return p;
    };

    for (key, want) in &desired.installed {
        let ok = device
            .peers
            .get(key)
            .is_some_and(|have| have.allowed_ips == [AllowedIp::from(want.net)]);
        if !ok {
            p.upsert_peers.push(PeerUpsert {
                public_key: *key,
                net: want.net,
            });
        }
    }
    for (key, have) in &device.peers {
        let ours = have
            .allowed_ips
            .iter()
            .any(|ip| is_our_peer_net(ip, me.host_id));
        if ours && !desired.installed.contains_key(key) {
            p.remove_peers.push(*key);
        }
    }

    for a in &desired.dns_addresses {
        if !observed.addresses.contains(&(*a, 128)) {
            p.add_addresses.push(*a);
        }
    }
    for &(a, len) in &observed.addresses {
        if is_our_address(a, len) && !desired.dns_addresses.contains(&a) {
            p.remove_addresses.push((a, len));
        }
    }

    let routes = desired.routes();
    p.add_routes = routes.difference(&observed.routes).copied().collect();
    p.remove_routes = observed.routes.difference(&routes).copied().collect();
    p
}

/// The part of [`plan`] that concerns `touched`, for an `observed` that
/// matched `desired` except there: what a store change costs when the
/// kernel was in sync before it. Gives what [`plan`] would, without looking
/// at the peers, addresses and routes nobody touched.
pub fn plan_touched(
    desired: &Desired,
    observed: &Observed,
    me: &Identity,
    touched: &Touched,
) -> Plan {
    let (mut p, device) = plan_interface(observed, me);
    let Some(device) = device else { return p };
    let mut routes = BTreeSet::new();
    for key in &touched.peers {
        let have = device.peers.get(key);
        match desired.installed.get(key) {
            Some(want) => {
                routes.insert((want.net.network(), PeerNet::LEN));
                if have.is_none_or(|h| h.allowed_ips != [AllowedIp::from(want.net)]) {
                    p.upsert_peers.push(PeerUpsert {
                        public_key: *key,
                        net: want.net,
                    });
                }
            }
            None => {
                let ours = have.is_some_and(|h| {
                    h.allowed_ips
                        .iter()
                        .any(|ip| is_our_peer_net(ip, me.host_id))
                });
                if ours {
                    p.remove_peers.push(*key);
                }
            }
        }
    }
    for a in &touched.dns_addresses {
        let want = desired.dns_addresses.contains(a);
        let have = observed.addresses.contains(&(*a, 128));
        if want && !have {
            p.add_addresses.push(*a);
        } else if have && !want {
            p.remove_addresses.push((*a, 128));
        }
    }
    // A touched route is wanted only by a touched peer: /120s are unique,
    // so a peer nobody touched can't hold one that changed hands.
    for r in &touched.routes {
        let want = routes.contains(r);
        let have = observed.routes.contains(r);
        if want && !have {
            p.add_routes.push(*r);
        } else if have && !want {
            p.remove_routes.push(*r);
        }
    }
    p
}

/// Keeps `plan` within a backend's cap of `cap` peers on `device`: drops
/// the additions of new peers that wouldn't fit (changes to peers already
/// there stay). Returns how many were dropped.
pub fn cap_new_peers(plan: &mut Plan, device: &DeviceState, cap: usize) -> usize {
    let leaving = plan
        .remove_peers
        .iter()
        .filter(|k| device.peers.contains_key(*k))
        .count();
    let mut room = cap.saturating_sub(device.peers.len().saturating_sub(leaving));
    let before = plan.upsert_peers.len();
    plan.upsert_peers.retain(|u| {
        if device.peers.contains_key(&u.public_key) {
            true
        } else if room > 0 {
            room -= 1;
            true
        } else {
            false
        }
    });
    before - plan.upsert_peers.len()
}

/// What `observed` becomes once `plan` has been applied in full: the
/// reconciler uses it to keep its cache without re-reading the kernel.
pub fn apply_to(observed: &mut Observed, plan: &Plan, me: &Identity) {
    if let Some(l) = observed.link.as_mut() {
        l.guarded |= plan.guard;
        if plan.link_up {
            l.up = true;
            l.mtu = MTU;
        }
    }
    if let Some(d) = observed.device.as_mut() {
        if plan.configure_device {
            d.public_key = Some(me.public_key);
            d.listen_port = me.listen_port;
        }
        for k in &plan.remove_peers {
            d.peers.remove(k);
        }
        // An upserted /120 leaves whichever other peer had it (as the kernel
        // moves it): one walk over the peers for the whole plan, not one
        // per upsert (10,000 upserts on 10,000 peers took 0.1 s).
        let moved: std::collections::HashMap<AllowedIp, PublicKey> = plan
            .upsert_peers
            .iter()
            .map(|u| (AllowedIp::from(u.net), u.public_key))
            .collect();
        if !moved.is_empty() {
            for (k, p) in d.peers.iter_mut() {
                p.allowed_ips
                    .retain(|a| moved.get(a).is_none_or(|owner| owner == k));
            }
        }
        for u in &plan.upsert_peers {
            let ip = AllowedIp::from(u.net);
            d.peers
                .entry(u.public_key)
                .or_insert_with(|| kernel::ObservedPeer {
                    allowed_ips: Vec::new(),
                    endpoint: None,
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                })
                .allowed_ips = vec![ip];
        }
    }
    for a in &plan.add_addresses {
        observed.addresses.insert((*a, 128));
    }
    for a in &plan.remove_addresses {
        observed.addresses.remove(a);
    }
    for r in &plan.add_routes {
        observed.routes.insert(*r);
    }
    for r in &plan.remove_routes {
        observed.routes.remove(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NetworkId, PeerSlot, PrivateKey};
    use crate::plan::kernel::ObservedPeer;
    use crate::store::{Gateway, Org, Peer};

    fn key() -> PublicKey {
        PrivateKey::generate().public_key()
    }

    fn me() -> Identity {
        Identity {
            public_key: key(),
            listen_port: 51820,
            host_id: "a7b:d6b".parse().unwrap(),
        }
    }

    fn snapshot(peers: &[(u32, &str, u32, PublicKey, &str)]) -> Snapshot {
        let mut s = Snapshot::default();
        for (net, gw, host) in [(1, "lhr-1", 0x0a7b_0d6b), (2, "lhr-2", 0x0a7b_0001)] {
            s.orgs.push(Org {
                name: format!("org{net}").parse().unwrap(),
                network_id: NetworkId::new(net).unwrap(),
            });
            s.gateways.push(Gateway {
                name: gw.parse().unwrap(),
                region: "lhr".parse().unwrap(),
                host_id: HostId::from_u32(host),
                endpoint: "gw:1".parse().unwrap(),
                public_key: key(),
            });
        }
        for &(net, name, slot, k, gw) in peers {
            let p = peer(&s, (net, name, slot, k, gw));
            s.peers.push(p);
        }
        s
    }

    /// Peer `name` of org`net` in `slot` on gateway `gw` of `s`.
    fn peer(s: &Snapshot, (net, name, slot, k, gw): (u32, &str, u32, PublicKey, &str)) -> Peer {
        let g = s.gateways.iter().find(|g| g.name.as_str() == gw).unwrap();
        let slot = PeerSlot::new(slot).unwrap();
        Peer {
            org: format!("org{net}").parse().unwrap(),
            name: name.parse().unwrap(),
            gateway: g.name.clone(),
            region: g.region.clone(),
            slot,
            net: slot.net(NetworkId::new(net).unwrap().prefix(), g.host_id),
            public_key: k,
            created_at: 0,
            ephemeral: None,
            revision: 0,
        }
    }

    fn live(me: &Identity) -> Observed {
        Observed {
            link: Some(LinkState {
                index: 5,
                up: true,
                mtu: MTU,
                guarded: true,
            }),
            device: Some(DeviceState {
                public_key: Some(me.public_key),
                listen_port: me.listen_port,
                peers: BTreeMap::new(),
            }),
            ..Observed::default()
        }
    }

    fn converge(desired: &Desired, observed: &mut Observed, me: &Identity) -> Plan {
        let p = plan(Some(desired), observed, me);
        apply_to(observed, &p, me);
        p
    }

    const GW: &str = "lhr-1";

    #[test]
    fn installs_peers_addresses_and_routes_then_plans_nothing() {
        let me = me();
        let (a, b, c) = (key(), key(), key());
        let snap = snapshot(&[
            (1, "a", 0, a, GW),
            (2, "b", 0, b, GW),
            (1, "c", 0, c, "lhr-2"),
        ]);
        let d = Desired::from_snapshot(&snap, &GW.parse().unwrap());
        assert_eq!(d.registered, 2, "only this gateway's peers");
        let mut o = live(&me);
        let p = converge(&d, &mut o, &me);
        assert_eq!(p.upsert_peers.len(), 2);
        assert_eq!(
            p.add_addresses,
            vec![
                "fdaa:0:1::3".parse::<Ipv6Addr>().unwrap(),
                "fdaa:0:2::3".parse().unwrap()
            ]
        );
        assert_eq!(
            p.add_routes,
            vec![
                ("fdaa:0:1:a7b:d6b:0:a:0".parse().unwrap(), 120),
                ("fdaa:0:2:a7b:d6b:0:a:0".parse().unwrap(), 120)
            ]
        );
        assert!(p.remove_peers.is_empty() && p.remove_routes.is_empty());
        let again = plan(Some(&d), &o, &me);
        assert!(again.is_empty(), "second plan: {again:?}");
    }

    #[test]
    fn missing_interface_is_created_first() {
        let me = me();
        let p = plan(None, &Observed::default(), &me);
        assert!(p.create_interface);
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn link_and_device_settings_are_ensured() {
        let me = me();
        let mut o = live(&me);
        if let Some(l) = o.link.as_mut() {
            l.up = false;
            l.guarded = false;
        }
        if let Some(d) = o.device.as_mut() {
            d.listen_port = 0;
        }
        let p = plan(Some(&Desired::default()), &o, &me);
        assert!(p.link_up && p.configure_device && p.guard);
        // Before the store has loaded too: the guard holds from the start.
        assert!(plan(None, &o, &me).guard);
        apply_to(&mut o, &p, &me);
        assert!(plan(Some(&Desired::default()), &o, &me).is_empty());
    }

    #[test]
    fn nothing_is_deleted_before_the_store_loaded() {
        let me = me();
        let k = key();
        let snap = snapshot(&[(1, "a", 0, k, GW)]);
        let mut o = live(&me);
        converge(
            &Desired::from_snapshot(&snap, &GW.parse().unwrap()),
            &mut o,
            &me,
        );
        let p = plan(None, &o, &me);
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn removal_takes_peer_route_and_unused_address() {
        let me = me();
        let (a, b) = (key(), key());
        let mut o = live(&me);
        let both = snapshot(&[(1, "a", 0, a, GW), (2, "b", 0, b, GW)]);
        converge(
            &Desired::from_snapshot(&both, &GW.parse().unwrap()),
            &mut o,
            &me,
        );
        let one = snapshot(&[(1, "a", 0, a, GW)]);
        let d = Desired::from_snapshot(&one, &GW.parse().unwrap());
        let p = converge(&d, &mut o, &me);
        assert_eq!(p.remove_peers, vec![b]);
        assert_eq!(
            p.remove_routes,
            vec![("fdaa:0:2:a7b:d6b:0:a:0".parse().unwrap(), 120)]
        );
        assert_eq!(
            p.remove_addresses,
            vec![("fdaa:0:2::3".parse().unwrap(), 128)]
        );
        assert!(p.upsert_peers.is_empty() && p.add_routes.is_empty());
        assert!(plan(Some(&d), &o, &me).is_empty());
    }

    #[test]
    fn key_change_replaces_the_peer() {
        let me = me();
        let (old, new) = (key(), key());
        let mut o = live(&me);
        converge(
            &Desired::from_snapshot(&snapshot(&[(1, "a", 0, old, GW)]), &GW.parse().unwrap()),
            &mut o,
            &me,
        );
        let d = Desired::from_snapshot(&snapshot(&[(1, "a", 0, new, GW)]), &GW.parse().unwrap());
        let p = converge(&d, &mut o, &me);
        assert_eq!(p.remove_peers, vec![old]);
        assert_eq!(p.upsert_peers.len(), 1);
        assert_eq!(p.upsert_peers[0].public_key, new);
        assert!(p.add_routes.is_empty() && p.remove_routes.is_empty());
        assert!(plan(Some(&d), &o, &me).is_empty());
    }

    #[test]
    fn allowed_ip_moving_between_peers() {
        let me = me();
        let (a, b) = (key(), key());
        let mut o = live(&me);
        converge(
            &Desired::from_snapshot(
                &snapshot(&[(1, "a", 0, a, GW), (1, "b", 1, b, GW)]),
                &GW.parse().unwrap(),
            ),
            &mut o,
            &me,
        );
        // a is removed and b takes slot 0 (a slot freed and reused).
        let d = Desired::from_snapshot(&snapshot(&[(1, "b", 0, b, GW)]), &GW.parse().unwrap());
        let p = converge(&d, &mut o, &me);
        assert_eq!(p.remove_peers, vec![a]);
        assert_eq!(p.upsert_peers.len(), 1);
        assert_eq!(
            p.upsert_peers[0].net.to_string(),
            "fdaa:0:1:a7b:d6b:0:a:0/120"
        );
        assert_eq!(
            p.remove_routes,
            vec![("fdaa:0:1:a7b:d6b:0:a:100".parse().unwrap(), 120)]
        );
        assert!(plan(Some(&d), &o, &me).is_empty());
    }

    #[test]
    fn drifted_allowed_ips_are_repaired() {
        let me = me();
        let a = key();
        let d = Desired::from_snapshot(&snapshot(&[(1, "a", 0, a, GW)]), &GW.parse().unwrap());
        let mut o = live(&me);
        converge(&d, &mut o, &me);
        if let Some(dev) = o.device.as_mut() {
            dev.peers.get_mut(&a).unwrap().allowed_ips.push(AllowedIp {
                addr: "10.0.0.0".parse().unwrap(),
                len: 8,
            });
        }
        let p = plan(Some(&d), &o, &me);
        assert_eq!(p.upsert_peers.len(), 1);
    }

    #[test]
    fn foreign_peers_routes_and_addresses_are_left_alone() {
        let me = me();
        let foreign = key();
        let mut o = live(&me);
        let dev = o.device.as_mut().unwrap();
        for (k, ip, len) in [
            (foreign, "10.9.0.0", 24),
            // A 6PN /120 of *another* gateway's host id is not ours either.
            (key(), "fdaa:0:1:a7b:1:0:a:0", 120),
            (key(), "fdaa:0:1:a7b:d6b:0:a:5", 128),
        ] {
            dev.peers.insert(
                k,
                ObservedPeer {
                    allowed_ips: vec![AllowedIp {
                        addr: ip.parse().unwrap(),
                        len,
                    }],
                    endpoint: None,
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                },
            );
        }
        o.addresses.insert(("fe80::1".parse().unwrap(), 64));
        o.addresses.insert(("2001:db8::1".parse().unwrap(), 128));
        o.addresses.insert(("fdaa:0:1::4".parse().unwrap(), 128));
        let p = plan(Some(&Desired::default()), &o, &me);
        assert!(p.is_empty(), "{p:?}");
        // But a stale peer of ours is removed even with nothing desired.
        let ours = key();
        o.device.as_mut().unwrap().peers.insert(
            ours,
            ObservedPeer {
                allowed_ips: vec![AllowedIp {
                    addr: "fdaa:0:1:a7b:d6b:0:b:300".parse().unwrap(),
                    len: 120,
                }],
                endpoint: None,
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
            },
        );
        o.addresses.insert(("fdaa:0:7::3".parse().unwrap(), 128));
        let p = plan(Some(&Desired::default()), &o, &me);
        assert_eq!(p.remove_peers, vec![ours]);
        assert_eq!(
            p.remove_addresses,
            vec![("fdaa:0:7::3".parse().unwrap(), 128)]
        );
    }

    /// The plan's parts in a canonical order, to compare plans made by
    /// walking different collections.
    fn sorted(mut p: Plan) -> Plan {
        p.upsert_peers.sort_by_key(|u| u.public_key);
        p.remove_peers.sort();
        p.add_addresses.sort();
        p.remove_addresses.sort();
        p.add_routes.sort();
        p.remove_routes.sort();
        p
    }

    #[derive(Debug, Clone)]
    enum Write {
        /// A peer in org 1 or 2, in a slot, on lhr-1 (us) or lhr-2.
        Add(u32, u32, bool),
        /// The n-th peer (mod the count) goes.
        Remove(usize),
        Org(u32),
        Noise,
    }

    mod follow {
        use super::*;
        use proptest::prelude::*;

        fn write() -> impl Strategy<Value = Write> {
            prop_oneof![
                4 => (1u32..3, 0u32..24, any::<bool>()).prop_map(|(n, s, me)| Write::Add(n, s, me)),
                3 => (0usize..64).prop_map(Write::Remove),
                1 => (3u32..6).prop_map(Write::Org),
                1 => Just(Write::Noise),
            ]
        }

        /// Applies `w` to `s` as the store would (a taken slot or a missing
        /// peer is no write at all).
        fn delta(s: &Snapshot, w: &Write, n: usize) -> Option<Delta> {
            match *w {
                Write::Add(net, slot, mine) => {
                    let gw = if mine { GW } else { "lhr-2" };
                    let p = peer(s, (net, &format!("w{n}"), slot, key(), gw));
                    let taken = s.peers.iter().any(|q| q.net == p.net);
                    (!taken).then_some(Delta::PeerAdded(p))
                }
                Write::Remove(i) if !s.peers.is_empty() => {
                    Some(Delta::PeerRemoved(s.peers[i % s.peers.len()].clone()))
                }
                Write::Remove(_) => None,
                Write::Org(net) => {
                    let org = Org {
                        name: format!("org{net}").parse().unwrap(),
                        network_id: NetworkId::new(net).unwrap(),
                    };
                    (s.org(&org.name).is_none()).then_some(Delta::OrgAdded(org))
                }
                Write::Noise => Some(Delta::Unchanged),
            }
        }

        proptest! {
            /// From a kernel in sync with one snapshot, following the writes
            /// to the next gives the desired state and the plan that a full
            /// comparison gives.
            #[test]
            fn following_writes_plans_what_a_full_compare_plans(
                before in proptest::collection::vec(write(), 0..30),
                after in proptest::collection::vec(write(), 1..12),
            ) {
                let me = me();
                let gw: GatewayName = GW.parse().unwrap();
                let mut s = snapshot(&[]);
                for (n, w) in before.iter().enumerate() {
                    if let Some(d) = delta(&s, w, n) { s.apply(d); }
                }
                let mut desired = Desired::from_snapshot(&s, &gw);
                let mut observed = live(&me);
                converge(&desired, &mut observed, &me);

                let mut touched = Touched::default();
                for (n, w) in after.iter().enumerate() {
                    if let Some(d) = delta(&s, w, 100 + n) {
                        desired.follow(&d, &gw, &mut touched);
                        s.apply(d);
                    }
                }
                let full = Desired::from_snapshot(&s, &gw);
                prop_assert_eq!(&desired, &full);
                let want = sorted(plan(Some(&full), &observed, &me));
                let got = sorted(plan_touched(&desired, &observed, &me, &touched));
                prop_assert_eq!(&got, &want);
                // And once applied, nothing is left for either.
                apply_to(&mut observed, &got, &me);
                prop_assert!(plan(Some(&full), &observed, &me).is_empty());
            }
        }
    }

    #[test]
    fn a_capped_backend_gets_no_more_new_peers_than_it_holds() {
        let me = me();
        let keys: Vec<PublicKey> = (0..5).map(|_| key()).collect();
        let mut device = DeviceState::default();
        device.peers.insert(
            keys[0],
            ObservedPeer {
                allowed_ips: vec![],
                endpoint: None,
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
            },
        );
        let net: PeerNet = "fdaa:0:1:a7b:d6b:0:a:100/120".parse().unwrap();
        let mut p = Plan {
            upsert_peers: keys
                .iter()
                .map(|k| PeerUpsert {
                    public_key: *k,
                    net,
                })
                .collect(),
            ..Plan::default()
        };
        assert_eq!(cap_new_peers(&mut p, &device, 3), 2);
        assert_eq!(p.upsert_peers.len(), 3, "the one there and two new");
        assert_eq!(p.upsert_peers[0].public_key, keys[0]);
        let mut p2 = Plan {
            upsert_peers: vec![PeerUpsert {
                public_key: keys[1],
                net,
            }],
            remove_peers: vec![keys[0]],
            ..Plan::default()
        };
        assert_eq!(
            cap_new_peers(&mut p2, &device, 1),
            0,
            "a removal makes room"
        );
        let _ = me;
    }

    #[test]
    fn our_peer_net_recognizer() {
        let h: HostId = "a7b:d6b".parse().unwrap();
        let ip = |s: &str, len| AllowedIp {
            addr: s.parse().unwrap(),
            len,
        };
        assert!(is_our_peer_net(&ip("fdaa:0:18:a7b:d6b:0:a:0", 120), h));
        assert!(is_our_peer_net(
            &ip("fdaa:0:18:a7b:d6b:0:ffff:ff00", 120),
            h
        ));
        assert!(!is_our_peer_net(&ip("fdaa:0:18:a7b:d6b:0:9:0", 120), h));
        assert!(!is_our_peer_net(&ip("fdaa:0:18:a7b:d6b:0:a:0", 64), h));
        assert!(!is_our_peer_net(&ip("fdaa::a7b:d6b:0:a:0", 120), h));
        assert!(!is_our_peer_net(&ip("10.0.0.0", 120), h));
        assert!(is_our_address("fdaa:0:18::3".parse().unwrap(), 128));
        assert!(!is_our_address("fdaa:0:18::3".parse().unwrap(), 64));
        assert!(!is_our_address("fdaa:0:18::4".parse().unwrap(), 128));
    }
}
