//! The kernel state the planner reasons about, as plain data: what the
//! WireGuard device and the interface link hold (observed) and the peer
//! updates a plan asks for (desired). The adapters in `crate::dataplane`
//! read into and carry out these types; they live here so that planning
//! depends on no adapter.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::SystemTime;

use crate::model::{PeerNet, PublicKey};

/// The MTU of the WireGuard interface (what wg-quick uses by default).
pub const MTU: u32 = 1420;

/// One allowed-ip entry on a WireGuard peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllowedIp {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl From<PeerNet> for AllowedIp {
    fn from(n: PeerNet) -> Self {
        Self {
            addr: IpAddr::V6(n.network()),
            len: PeerNet::LEN,
        }
    }
}

/// A peer as the WireGuard interface reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedPeer {
    /// Its allowed ips, sorted.
    pub allowed_ips: Vec<AllowedIp>,
    /// Where its packets last came from.
    pub endpoint: Option<std::net::SocketAddr>,
    /// Its latest handshake.
    pub last_handshake: Option<SystemTime>,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
}

/// The WireGuard device's state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceState {
    /// The public key of the device's private key (None: no key set).
    pub public_key: Option<PublicKey>,
    /// The UDP port it listens on (0: none).
    pub listen_port: u16,
    /// Every peer on the interface, ours or not.
    pub peers: BTreeMap<PublicKey, ObservedPeer>,
}

/// One peer to add or update: its allowed-ips become exactly its /120.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerUpsert {
    /// The peer's key.
    pub public_key: PublicKey,
    /// Its /120.
    pub net: PeerNet,
}

/// A network link's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkState {
    /// ifindex.
    pub index: u32,
    /// Administratively up.
    pub up: bool,
    /// Its MTU.
    pub mtu: u32,
    /// Whether the isolation guard ([`crate::plan::guard`]) is attached at
    /// both ingress and egress, exactly as sixpn renders it.
    pub guarded: bool,
}
