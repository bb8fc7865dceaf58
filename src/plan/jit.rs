//! Just-in-time peers as decisions (docs/architecture.md "Just-in-time
//! peers"): which registered peers are admitted to the kernel, which have
//! been idle long enough to leave it, and which stay across a restart. The
//! reconciler keeps the admissions; [`crate::plan::Desired`] installs
//! exactly the admitted registered peers. Time is an argument, as
//! everywhere in `plan`.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::kernel::DeviceState;
use super::{is_our_peer_net, Desired};
use crate::model::{HostId, PublicKey};

/// What put a peer in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cause {
    /// It was on the interface when the daemon started and is kept.
    Start,
    /// Its handshake initiation was captured.
    Handshake,
}

impl Cause {
    /// The name metrics and the API use.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Start => "start",
            Cause::Handshake => "handshake",
        }
    }
}

/// One admitted peer: since when, why, and when it was last seen active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// When it was admitted (kept at a start: the start).
    pub since: SystemTime,
    /// What admitted it.
    pub cause: Cause,
    /// When its received-bytes counter last moved (a keepalive, traffic
    /// or a handshake), as far as the device reads have seen.
    pub active: SystemTime,
    /// The counter as last read.
    pub rx_bytes: u64,
}

impl Admission {
    /// An admission at `now` by `cause`.
    pub fn new(now: SystemTime, cause: Cause) -> Self {
        Self {
            since: now,
            cause,
            active: now,
            rx_bytes: 0,
        }
    }
}

/// What an initiation from `key` calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiated {
    /// A registered peer not in the kernel: admit it, then let the
    /// initiation through.
    Admit,
    /// Installed already (a rekey, or a retry racing its install): let it
    /// through.
    Installed,
    /// Not registered on this gateway: drop it.
    Unknown,
}

/// Decides what an initiation from `key` calls for on `desired`.
pub fn initiated(desired: &Desired, key: &PublicKey) -> Initiated {
    if desired.installed.contains_key(key) {
        Initiated::Installed
    } else if desired.pending.contains_key(key) {
        Initiated::Admit
    } else {
        Initiated::Unknown
    }
}

/// The admissions a starting daemon keeps: every peer of ours the kernel
/// already holds and the store registers here (`registered`), so a restart
/// removes nothing and re-adds nothing. Their activity before the start is
/// unknown, so each gets a whole idle period from `now`.
pub fn kept_at_start(
    device: &DeviceState,
    host: HostId,
    registered: impl Fn(&PublicKey) -> bool,
    now: SystemTime,
) -> HashMap<PublicKey, Admission> {
    device
        .peers
        .iter()
        .filter(|(k, p)| registered(k) && p.allowed_ips.iter().any(|ip| is_our_peer_net(ip, host)))
        .map(|(k, p)| {
            let mut a = Admission::new(now, Cause::Start);
            a.rx_bytes = p.rx_bytes;
            (*k, a)
        })
        .collect()
}

/// Notes, from a read of `device` at `now`, which admitted peers received
/// anything since the last read: WireGuard clients send a keepalive every
/// 15 s but handshake only every 2 minutes, so the counter is the sign of
/// life.
pub fn note_activity(
    admitted: &mut HashMap<PublicKey, Admission>,
    device: &DeviceState,
    now: SystemTime,
) {
    for (k, a) in admitted.iter_mut() {
        if let Some(p) = device.peers.get(k) {
            if p.rx_bytes != a.rx_bytes {
                a.rx_bytes = p.rx_bytes;
                a.active = a.active.max(now);
            }
        }
    }
}

/// The admitted peers idle for at least `idle`: nothing received, no
/// handshake (as `device` reports it) and no admission in that long.
pub fn idle_peers(
    admitted: &HashMap<PublicKey, Admission>,
    device: &DeviceState,
    now: SystemTime,
    idle: Duration,
) -> Vec<PublicKey> {
    let mut out: Vec<PublicKey> = admitted
        .iter()
        .filter(|(k, a)| {
            let handshake = device.peers.get(k).and_then(|p| p.last_handshake);
            let seen = a.since.max(a.active);
            let last = handshake.map_or(seen, |h| h.max(seen));
            now.duration_since(last).is_ok_and(|d| d >= idle)
        })
        .map(|(k, _)| *k)
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PeerNet, PrivateKey};
    use crate::plan::kernel::{AllowedIp, ObservedPeer};
    use crate::plan::{DesiredPeer, Touched};
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv6Addr};

    fn key() -> PublicKey {
        PrivateKey::generate().public_key()
    }

    const HOST: u32 = 0x0a7b_0d6b;

    fn ours(slot: u16) -> AllowedIp {
        AllowedIp {
            addr: IpAddr::V6(Ipv6Addr::new(
                0xfdaa,
                0,
                1,
                0x0a7b,
                0x0d6b,
                0,
                0xa,
                slot << 8,
            )),
            len: PeerNet::LEN,
        }
    }

    fn on_device(ip: AllowedIp, handshake: Option<SystemTime>) -> ObservedPeer {
        ObservedPeer {
            allowed_ips: vec![ip],
            endpoint: None,
            last_handshake: handshake,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    fn desired_peer(slot: u16) -> DesiredPeer {
        let ip = ours(slot);
        DesiredPeer {
            org: "acme".parse().unwrap(),
            name: format!("p{slot}").parse().unwrap(),
            net: format!("{}/{}", ip.addr, ip.len).parse().unwrap(),
        }
    }

    #[test]
    fn an_initiation_admits_a_registered_peer_installs_nothing_else_and_drops_strangers() {
        let (a, b, stranger) = (key(), key(), key());
        let mut d = Desired {
            jit: true,
            ..Desired::default()
        };
        d.pending.insert(a, desired_peer(1));
        d.installed.insert(b, desired_peer(2));
        assert_eq!(initiated(&d, &a), Initiated::Admit);
        assert_eq!(initiated(&d, &b), Initiated::Installed);
        assert_eq!(initiated(&d, &stranger), Initiated::Unknown);

        let mut touched = Touched::default();
        assert!(d.admit(&a, &mut touched));
        assert!(!d.admit(&a, &mut touched), "admitted once");
        assert!(!d.admit(&stranger, &mut touched));
        assert_eq!(initiated(&d, &a), Initiated::Installed);
        assert_eq!(touched.peers.len(), 1);
        assert_eq!(touched.routes.len(), 1);

        let mut touched = Touched::default();
        assert!(d.evict(&b, &mut touched));
        assert_eq!(
            initiated(&d, &b),
            Initiated::Admit,
            "an evicted peer comes back the same way"
        );
        assert_eq!(touched.peers.len(), 1);
    }

    #[test]
    fn a_start_keeps_our_registered_kernel_peers_and_nothing_else() {
        let (kept, never_shook, unregistered, foreign) = (key(), key(), key(), key());
        let mut device = DeviceState::default();
        device.peers.insert(kept, on_device(ours(1), Some(t(10))));
        device.peers.insert(never_shook, on_device(ours(2), None));
        device
            .peers
            .insert(unregistered, on_device(ours(3), Some(t(10))));
        let foreign_ip = AllowedIp {
            addr: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0)),
            len: 64,
        };
        device
            .peers
            .insert(foreign, on_device(foreign_ip, Some(t(10))));
        let registered = |k: &PublicKey| *k != unregistered;
        let got = kept_at_start(&device, HostId::from_u32(HOST), registered, t(100));
        let want: BTreeMap<_, _> = [
            (kept, Admission::new(t(100), Cause::Start)),
            (never_shook, Admission::new(t(100), Cause::Start)),
        ]
        .into_iter()
        .collect();
        assert_eq!(got.into_iter().collect::<BTreeMap<_, _>>(), want);
    }

    #[test]
    fn a_peer_is_idle_once_neither_its_handshake_nor_its_admission_is_recent() {
        let idle = Duration::from_secs(900);
        let (active, stale, admitted_late, gone) = (key(), key(), key(), key());
        let mut device = DeviceState::default();
        device
            .peers
            .insert(active, on_device(ours(1), Some(t(1000))));
        device.peers.insert(stale, on_device(ours(2), Some(t(0))));
        // Handshook long ago but admitted just now (kept at a start,
        // re-admitted): the admission counts.
        device
            .peers
            .insert(admitted_late, on_device(ours(3), Some(t(0))));
        let mut admitted: HashMap<_, _> = [
            (active, Admission::new(t(0), Cause::Handshake)),
            (stale, Admission::new(t(0), Cause::Handshake)),
            (admitted_late, Admission::new(t(950), Cause::Handshake)),
            (gone, Admission::new(t(0), Cause::Handshake)),
        ]
        .into_iter()
        .collect();
        let mut want = vec![stale, gone];
        want.sort();
        assert_eq!(idle_peers(&admitted, &device, t(1100), idle), want);
        assert!(
            idle_peers(&admitted, &device, t(899), idle).is_empty(),
            "nobody before idle has passed"
        );
        // A clock that went backwards evicts nobody.
        assert!(idle_peers(&admitted, &device, t(0) - Duration::from_secs(5), idle).is_empty());

        // Keepalives between handshakes keep a peer: its counter moved.
        device.peers.get_mut(&stale).unwrap().rx_bytes = 32;
        note_activity(&mut admitted, &device, t(1050));
        assert_eq!(idle_peers(&admitted, &device, t(1100), idle), vec![gone]);
        note_activity(&mut admitted, &device, t(1960));
        assert!(
            idle_peers(&admitted, &device, t(1960), idle).contains(&stale),
            "a counter that stopped moving doesn't keep it"
        );
    }
}
