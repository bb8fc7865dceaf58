//! Thin adapters to the kernel, and their fakes.
//!
//! The reconciler ([`crate::reconcile`]) only ever talks to these traits:
//! [`WgDevice`] for the WireGuard interface (wireguard-control: the kernel
//! module, or wireguard-go over its UAPI socket), [`Netlink`] for links,
//! addresses, routes and change events (rtnetlink), and [`Firewall`] for
//! sixpn's nftables table (`nft -j`, nfnetlink). Adapters decide nothing:
//! they read state and carry out the instructions the pure planner produced.
//!
//! Ownership markers: the interface is ours; routes are ours when they carry
//! [`ROUTE_PROTOCOL`]; in nftables only `table inet sixpn` is ours; the planner decides which peers and addresses are ours
//! (see [`crate::plan`]).

#[cfg(any(test, feature = "testkit"))]
pub mod fake;
pub mod linux;
pub mod nft_codec;

use std::net::Ipv6Addr;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};

use crate::model::{OrgPrefix, PrivateKey, PublicKey};

// The vocabulary the planner reasons in; re-exported so adapters and their
// callers name it from here as well.
pub use crate::plan::kernel::{AllowedIp, DeviceState, LinkState, ObservedPeer, PeerUpsert, MTU};
use crate::plan::nft::{ElementKey, ObservedTable, Ruleset};

/// sixpn's route protocol number (`ip route … proto 110`); the reconciler
/// only ever touches routes that carry it. 110 is unassigned in
/// `/etc/iproute2/rt_protos`.
pub const ROUTE_PROTOCOL: u8 = 110;

/// An error from a kernel adapter, with the OS error number when there is one.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{op}: {message}")]
pub struct KernelError {
    /// What we were doing ("add route fdaa:…/120").
    pub op: String,
    /// What the kernel or tool said.
    pub message: String,
    /// The errno, if the failure was a system call.
    pub errno: Option<i32>,
}

impl KernelError {
    /// An error without an errno.
    pub fn new(op: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Self {
            op: op.into(),
            message: message.to_string(),
            errno: None,
        }
    }
    /// An error from an `io::Error`, keeping its errno.
    pub fn io(op: impl Into<String>, e: &std::io::Error) -> Self {
        Self {
            op: op.into(),
            message: e.to_string(),
            errno: e.raw_os_error(),
        }
    }
}

/// The WireGuard interface: blocking wireguard-control underneath, so
/// implementations run it off the async threads.
#[async_trait]
pub trait WgDevice: Send + Sync {
    /// Makes sure the interface exists: creates the kernel link, or starts
    /// (and from then on supervises) wireguard-go. Idempotent.
    async fn ensure(&self) -> Result<(), KernelError>;

    /// The device's state; `None` when the interface does not exist.
    async fn get(&self) -> Result<Option<DeviceState>, KernelError>;

    /// Sets the private key and listen port (only these; peers untouched).
    async fn configure(&self, key: &PrivateKey, listen_port: u16) -> Result<(), KernelError>;

    /// Adds/updates and removes peers in one update. Never replaces the whole
    /// peer set: peers not named are untouched.
    async fn update_peers(
        &self,
        upserts: &[PeerUpsert],
        removes: &[PublicKey],
    ) -> Result<(), KernelError>;

    /// A counter that grows whenever the device was lost and recreated behind
    /// the reconciler's back (wireguard-go crashed and was restarted): the
    /// reconciler must then do a full resync.
    fn restarts(&self) -> watch::Receiver<u64>;

    /// Which implementation runs ("kernel" or "userspace (wireguard-go)").
    fn backend_name(&self) -> &'static str;
    /// The most peers the backend can hold, if it has a limit (wireguard-go
    /// refuses any past [`WIREGUARD_GO_MAX_PEERS`]).
    fn max_peers(&self) -> Option<usize> {
        None
    }
}

/// wireguard-go's own cap on peers per device (`MaxPeers` in its source);
/// past it every peer added is refused with "too many peers".
pub const WIREGUARD_GO_MAX_PEERS: usize = 1 << 16;

/// Something changed on a link, address or route the reconciler may own;
/// or events were lost (overrun) and a full look is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetEvent {
    /// A link, address or route event for this ifindex.
    Changed(u32),
    /// The event socket overran: anything may have changed.
    Overrun,
}

/// rtnetlink: links, IPv6 addresses and routes, and their change events.
#[async_trait]
pub trait Netlink: Send + Sync {
    /// The link called `name`, if it exists.
    async fn link(&self, name: &str) -> Result<Option<LinkState>, KernelError>;

    /// Sets the link up with `mtu`.
    async fn set_link_up(&self, index: u32, mtu: u32) -> Result<(), KernelError>;

    /// Attaches the isolation guard ([`crate::plan::guard`]) at ingress and
    /// egress of the link, replacing whatever filter holds its place.
    async fn attach_guard(&self, index: u32) -> Result<(), KernelError>;

    /// Packets the isolation guard dropped on the link since it was
    /// attached (None: not attached).
    async fn guard_dropped(&self, index: u32) -> Result<Option<u64>, KernelError>;

    /// Every IPv6 address on the link, with its prefix length.
    async fn addresses(&self, index: u32) -> Result<Vec<(Ipv6Addr, u8)>, KernelError>;

    /// Ensures `addr/128` is on the link with IFA_F_NODAD (usable at once).
    async fn add_address(&self, index: u32, addr: Ipv6Addr) -> Result<(), KernelError>;

    /// Removes `addr/len` from the link (absent is fine).
    async fn del_address(&self, index: u32, addr: Ipv6Addr, len: u8) -> Result<(), KernelError>;

    /// The IPv6 routes on the link that carry [`ROUTE_PROTOCOL`].
    async fn routes(&self, index: u32) -> Result<Vec<(Ipv6Addr, u8)>, KernelError>;

    /// Ensures a route to each `net` via the link with [`ROUTE_PROTOCOL`]
    /// in the main table: already there is success (idempotent); any other
    /// route to the net at the same metric is never replaced, the net's
    /// result is then an error (errno `EEXIST`) describing it. Returns one
    /// result per net, in order.
    async fn add_routes(&self, index: u32, nets: &[(Ipv6Addr, u8)])
        -> Vec<Result<(), KernelError>>;

    /// Removes our routes (absent is fine). One result per net, in order.
    async fn del_routes(&self, index: u32, nets: &[(Ipv6Addr, u8)])
        -> Vec<Result<(), KernelError>>;

    /// Whether IPv6 forwarding is on; turns it on if not. Returns whether it
    /// had to change it.
    async fn ensure_forwarding(&self) -> Result<bool, KernelError>;

    /// Link, IPv6 address, IPv6 route and traffic-control events from now on.
    fn subscribe(&self) -> Result<mpsc::Receiver<NetEvent>, KernelError>;
}

/// Packets the isolation table dropped, by its named counters. A replace
/// starts them again from zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FirewallCounters {
    /// Forwarded traffic dropped: cross-org, an unknown org, or not 6PN.
    pub forward_dropped: u64,
    /// Traffic to the gateway itself dropped.
    pub input_dropped: u64,
}

impl FirewallCounters {
    /// The counters by their names in the table.
    pub fn named(&self) -> [(&'static str, u64); 2] {
        [
            (crate::plan::nft::FORWARD_DROPPED, self.forward_dropped),
            (crate::plan::nft::INPUT_DROPPED, self.input_dropped),
        ]
    }
}

/// sixpn's nftables table, `table inet sixpn`, and nothing else: every
/// method names that table only (see [`crate::plan::nft`]).
#[async_trait]
pub trait Firewall: Send + Sync {
    /// Our table as it is in the kernel; `None` when it does not exist.
    async fn observe(&self) -> Result<Option<ObservedTable>, KernelError>;

    /// Replaces the table whole in one transaction. On error the previous
    /// table is still in force, unchanged.
    async fn replace(&self, ruleset: &Ruleset) -> Result<(), KernelError>;

    /// Adds and removes `same_org48` elements in one transaction.
    async fn update_elements(
        &self,
        add: &[(OrgPrefix, String)],
        remove: &[ElementKey],
    ) -> Result<(), KernelError>;

    /// The table's drop counters; `None` when the table does not exist.
    async fn counters(&self) -> Result<Option<FirewallCounters>, KernelError>;

    /// Whether the kernel has nft's `queue` expression, which
    /// [`crate::plan::nft::CaptureMode::Queue`] needs (a kernel without
    /// `CONFIG_NFT_QUEUE` refuses the whole table). Changes nothing.
    async fn queue_supported(&self) -> Result<bool, KernelError>;

    /// One message per committed nftables transaction made by someone else
    /// (or per lost batch of events): the table may have changed.
    fn subscribe(&self) -> Result<mpsc::Receiver<()>, KernelError>;
}
