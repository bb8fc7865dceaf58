//! An in-memory kernel implementing [`WgDevice`], [`Netlink`] and
//! [`Firewall`], for tests of the reconciler: it records every mutating call
//! (in one log, so tests can check their order), can inject failures, and
//! lets a test "drift" the state behind the reconciler's back. Its firewall
//! ([`table`]) takes the real nft JSON batches and is observed through the
//! real listing parser.

mod table;

pub use table::FakeTable;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv6Addr;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};

use super::nft_codec::{parse_counters, parse_listing, to_json, update_batch};
use super::{
    AllowedIp, DeviceState, Firewall, FirewallCounters, KernelError, LinkState, NetEvent, Netlink,
    ObservedPeer, PeerUpsert, WgDevice,
};
use crate::model::{OrgPrefix, PrivateKey, PublicKey};
use crate::plan::nft::{ElementKey, ObservedTable, Ruleset};

/// The fake kernel's state; tests may read and change it directly.
#[derive(Debug, Default)]
pub struct FakeState {
    /// The interface (None: absent).
    pub link: Option<LinkState>,
    /// The WireGuard device (present with the link).
    pub device: DeviceState,
    /// IPv6 addresses on the interface.
    pub addresses: BTreeSet<(Ipv6Addr, u8)>,
    /// Our routes on the interface.
    pub routes: BTreeSet<(Ipv6Addr, u8)>,
    /// Someone else's routes at our metric in the main table: an add of
    /// ours to one of these fails with `EEXIST`, as in the kernel, and
    /// leaves it alone.
    pub foreign_routes: BTreeSet<(Ipv6Addr, u8)>,
    /// IPv6 forwarding.
    pub forwarding: bool,
    /// What the guard "dropped" (set by tests).
    pub guard_dropped: u64,
    /// Every mutating call, as a short string, in order.
    pub calls: Vec<String>,
    /// Make the next N route additions fail.
    pub fail_route_adds: usize,
    /// Make every peer update fail while set.
    pub fail_peer_updates: bool,
    /// `table inet sixpn` (None: absent).
    pub firewall: Option<FakeTable>,
    /// Make the next N firewall changes fail (the table stays as it was).
    pub fail_firewall: usize,
    /// The kernel lacks nft's `queue` expression (no `CONFIG_NFT_QUEUE`):
    /// the probe says so and a table with a queue rule is refused with
    /// `ENOENT`. Off by default: the expression is there.
    pub no_queue: bool,
}

impl FakeState {
    /// Fails `op` if a firewall failure is still to be injected.
    fn injected_firewall_failure(&mut self, op: &str) -> Result<(), KernelError> {
        if self.fail_firewall > 0 {
            self.fail_firewall -= 1;
            return Err(KernelError::new(op, "injected failure"));
        }
        Ok(())
    }
}

/// A shared fake kernel.
#[derive(Debug, Clone)]
pub struct FakeKernel {
    state: Arc<Mutex<FakeState>>,
    restarts: Arc<watch::Sender<u64>>,
    events: Arc<Mutex<Vec<mpsc::Sender<NetEvent>>>>,
    fw_events: Arc<Mutex<Vec<mpsc::Sender<()>>>>,
}

impl Default for FakeKernel {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeKernel {
    /// An empty kernel: no interface yet.
    pub fn new() -> Self {
        Self {
            state: Arc::default(),
            restarts: Arc::new(watch::channel(0).0),
            events: Arc::default(),
            fw_events: Arc::default(),
        }
    }

    /// `nft flush ruleset` by hand: the table is gone and the nftables
    /// event goes out.
    pub fn flush_ruleset(&self) {
        self.state().firewall = None;
        if let Ok(subs) = self.fw_events.lock() {
            for s in subs.iter() {
                let _ = s.try_send(());
            }
        }
    }

    /// Locks the state for inspection or drift.
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Takes the mutating calls recorded so far.
    pub fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut self.state().calls)
    }

    /// Simulates wireguard-go dying and being restarted: the interface comes
    /// back empty and down.
    pub fn restart_device(&self) {
        {
            let mut s = self.state();
            s.device = DeviceState::default();
            s.addresses.clear();
            s.routes.clear();
            if let Some(l) = s.link.as_mut() {
                l.index += 1;
                l.up = false;
            }
        }
        self.restarts.send_modify(|n| *n += 1);
    }

    /// Sends a netlink event to subscribers, as the kernel would on a change.
    pub fn emit(&self, ev: NetEvent) {
        if let Ok(subs) = self.events.lock() {
            for s in subs.iter() {
                let _ = s.try_send(ev);
            }
        }
    }
}

#[async_trait]
impl WgDevice for FakeKernel {
    async fn ensure(&self) -> Result<(), KernelError> {
        let mut s = self.state();
        if s.link.is_none() {
            s.link = Some(LinkState {
                index: 7,
                up: false,
                mtu: 1420,
                guarded: false,
            });
            s.calls.push("create interface".into());
        }
        Ok(())
    }

    async fn get(&self) -> Result<Option<DeviceState>, KernelError> {
        let s = self.state();
        Ok(s.link.map(|_| s.device.clone()))
    }

    async fn configure(&self, key: &PrivateKey, listen_port: u16) -> Result<(), KernelError> {
        let mut s = self.state();
        s.device.public_key = Some(key.public_key());
        s.device.listen_port = listen_port;
        s.calls.push(format!("configure port {listen_port}"));
        Ok(())
    }

    async fn update_peers(
        &self,
        upserts: &[PeerUpsert],
        removes: &[PublicKey],
    ) -> Result<(), KernelError> {
        let mut s = self.state();
        if s.fail_peer_updates {
            return Err(KernelError::new("update peers", "injected failure"));
        }
        for k in removes {
            s.device.peers.remove(k);
            s.calls.push(format!("remove peer {}", &k.to_base64()[..8]));
        }
        for u in upserts {
            let ip = AllowedIp::from(u.net);
            // As in the kernel: an allowed-ip moves to the peer that claims it.
            for p in s.device.peers.values_mut() {
                p.allowed_ips.retain(|a| *a != ip);
            }
            let peer = s
                .device
                .peers
                .entry(u.public_key)
                .or_insert_with(|| ObservedPeer {
                    allowed_ips: Vec::new(),
                    endpoint: None,
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                });
            peer.allowed_ips = vec![ip];
            s.calls.push(format!(
                "upsert peer {} {}",
                &u.public_key.to_base64()[..8],
                u.net
            ));
        }
        Ok(())
    }

    fn restarts(&self) -> watch::Receiver<u64> {
        self.restarts.subscribe()
    }

    fn backend_name(&self) -> &'static str {
        "fake"
    }
}

#[async_trait]
impl Netlink for FakeKernel {
    async fn link(&self, _name: &str) -> Result<Option<LinkState>, KernelError> {
        Ok(self.state().link)
    }

    async fn set_link_up(&self, index: u32, mtu: u32) -> Result<(), KernelError> {
        let mut s = self.state();
        match s.link.as_mut() {
            Some(l) if l.index == index => {
                l.up = true;
                l.mtu = mtu;
            }
            _ => return Err(KernelError::new("set link up", "no such device")),
        }
        s.calls.push(format!("link up mtu {mtu}"));
        Ok(())
    }

    async fn attach_guard(&self, index: u32) -> Result<(), KernelError> {
        let mut s = self.state();
        match s.link.as_mut() {
            Some(l) if l.index == index => l.guarded = true,
            _ => {
                return Err(KernelError::new(
                    "attach the isolation guard",
                    "no such device",
                ))
            }
        }
        s.calls.push("attach guard".into());
        Ok(())
    }

    async fn guard_dropped(&self, index: u32) -> Result<Option<u64>, KernelError> {
        let s = self.state();
        Ok(match s.link {
            Some(l) if l.index == index && l.guarded => Some(s.guard_dropped),
            _ => None,
        })
    }

    async fn addresses(&self, _index: u32) -> Result<Vec<(Ipv6Addr, u8)>, KernelError> {
        Ok(self.state().addresses.iter().copied().collect())
    }

    async fn add_address(&self, _index: u32, addr: Ipv6Addr) -> Result<(), KernelError> {
        let mut s = self.state();
        s.addresses.insert((addr, 128));
        s.calls.push(format!("add address {addr}/128"));
        Ok(())
    }

    async fn del_address(&self, _index: u32, addr: Ipv6Addr, len: u8) -> Result<(), KernelError> {
        let mut s = self.state();
        s.addresses.remove(&(addr, len));
        s.calls.push(format!("del address {addr}/{len}"));
        Ok(())
    }

    async fn routes(&self, _index: u32) -> Result<Vec<(Ipv6Addr, u8)>, KernelError> {
        Ok(self.state().routes.iter().copied().collect())
    }

    async fn add_routes(
        &self,
        _index: u32,
        nets: &[(Ipv6Addr, u8)],
    ) -> Vec<Result<(), KernelError>> {
        let mut s = self.state();
        nets.iter()
            .map(|&(a, l)| {
                if s.fail_route_adds > 0 {
                    s.fail_route_adds -= 1;
                    return Err(KernelError::new(
                        format!("add route {a}/{l}"),
                        "injected failure",
                    ));
                }
                if s.foreign_routes.contains(&(a, l)) {
                    return Err(KernelError {
                        op: format!("add route {a}/{l}"),
                        message: format!("a route to {a}/{l} not owned by sixpn exists"),
                        errno: Some(libc::EEXIST),
                    });
                }
                s.routes.insert((a, l));
                s.calls.push(format!("add route {a}/{l}"));
                Ok(())
            })
            .collect()
    }

    async fn del_routes(
        &self,
        _index: u32,
        nets: &[(Ipv6Addr, u8)],
    ) -> Vec<Result<(), KernelError>> {
        let mut s = self.state();
        nets.iter()
            .map(|&(a, l)| {
                s.routes.remove(&(a, l));
                s.calls.push(format!("del route {a}/{l}"));
                Ok(())
            })
            .collect()
    }

    async fn ensure_forwarding(&self) -> Result<bool, KernelError> {
        let mut s = self.state();
        let changed = !s.forwarding;
        if changed {
            s.forwarding = true;
            s.calls.push("enable forwarding".into());
        }
        Ok(changed)
    }

    fn subscribe(&self) -> Result<mpsc::Receiver<NetEvent>, KernelError> {
        let (tx, rx) = mpsc::channel(64);
        if let Ok(mut subs) = self.events.lock() {
            subs.push(tx);
        }
        Ok(rx)
    }
}

/// A convenience: the BTreeMap of peers as (key → allowed ips).
pub fn peer_ips(k: &FakeKernel) -> BTreeMap<PublicKey, Vec<AllowedIp>> {
    k.state()
        .device
        .peers
        .iter()
        .map(|(k, p)| (*k, p.allowed_ips.clone()))
        .collect()
}

/// A refused fake transaction as the adapter reports a refused `nft` one.
fn refused(op: &str, r: table::Refused) -> KernelError {
    KernelError {
        op: op.into(),
        message: r.message,
        errno: Some(r.errno),
    }
}

#[async_trait]
impl Firewall for FakeKernel {
    async fn observe(&self) -> Result<Option<ObservedTable>, KernelError> {
        let listing = self.state().firewall.as_ref().map(FakeTable::listing);
        listing
            .map(|l| parse_listing(&l).map_err(|e| KernelError::new("list table", e)))
            .transpose()
    }

    async fn replace(&self, ruleset: &Ruleset) -> Result<(), KernelError> {
        let mut s = self.state();
        s.injected_firewall_failure("replace table")?;
        let queue = !s.no_queue;
        table::apply_on(&mut s.firewall, &to_json(&ruleset.replace_batch()), queue)
            .map_err(|e| refused("replace table", e))?;
        s.calls
            .push(format!("firewall replace ({} orgs)", ruleset.orgs.len()));
        Ok(())
    }

    async fn update_elements(
        &self,
        add: &[(OrgPrefix, String)],
        remove: &[ElementKey],
    ) -> Result<(), KernelError> {
        let mut s = self.state();
        s.injected_firewall_failure("update elements")?;
        table::apply(&mut s.firewall, &to_json(&update_batch(add, remove)))
            .map_err(|e| refused("update elements", e))?;
        s.calls
            .push(format!("firewall update +{} -{}", add.len(), remove.len()));
        Ok(())
    }

    async fn counters(&self) -> Result<Option<FirewallCounters>, KernelError> {
        let listing = self.state().firewall.as_ref().map(FakeTable::listing);
        Ok(listing.map(|l| parse_counters(&l)))
    }

    async fn queue_supported(&self) -> Result<bool, KernelError> {
        Ok(!self.state().no_queue)
    }

    fn subscribe(&self) -> Result<mpsc::Receiver<()>, KernelError> {
        let (tx, rx) = mpsc::channel(8);
        if let Ok(mut subs) = self.fw_events.lock() {
            subs.push(tx);
        }
        Ok(rx)
    }
}
