//! What the reconciler publishes after a pass: which desired peers are live
//! (each with when it first was), and the [`DataplaneView`] the API reads
//! it through.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::watch;

use super::Reconciler;
use crate::dataplane::WgDevice;
use crate::liveness::{DataplaneHealth, DataplaneView, PeerStats};
use crate::model::{PeerNet, PublicKey};
use crate::plan::{self, Desired, Touched};
use crate::store::Revision;

/// What is live on the interface right now, published after every pass.
#[derive(Debug, Clone, Default)]
pub struct Installed {
    /// Installed peers and when this daemon first saw them installed.
    pub peers: HashMap<PublicKey, SystemTime>,
    /// Peers registered on this gateway.
    pub registered: usize,
    /// When the kernel last matched the store.
    pub last_sync: Option<SystemTime>,
    /// The store revision the pass planned from (0 before the first).
    pub revision: Revision,
    /// Peers registered on this gateway but not live, by key.
    pub missing: Vec<PublicKey>,
    /// Bumped whenever the set of live peers changes, so that a reader
    /// can tell without comparing them.
    pub peer_set: u64,
}

impl Installed {
    /// Whether a pass got as far as publishing: before that, the peers map
    /// says nothing of the kernel (it may well have every peer, after a
    /// restart).
    pub fn published(&self) -> bool {
        self.revision > 0
    }
}

impl Reconciler {
    /// Publishes which desired peers are live ([`is_live`]), each with when
    /// it first was. `ok`: the pass had no failure, so a complete set means
    /// the kernel matches the store.
    pub(super) fn publish(&mut self, desired: Option<&Desired>, ok: bool) {
        let Some(desired) = desired else { return };
        let Some(device) = self.cache.device.as_ref() else {
            return;
        };
        let now = SystemTime::now();
        let prev = self.installed.borrow().clone();
        let mut peers = HashMap::with_capacity(desired.installed.len());
        for (k, want) in &desired.installed {
            if is_live(device, &self.cache.routes, k, want) {
                peers.insert(*k, prev.peers.get(k).copied().unwrap_or(now));
            }
        }
        self.missing = desired
            .installed
            .keys()
            .filter(|k| !peers.contains_key(*k))
            .copied()
            .collect();
        let changed =
            peers.len() != prev.peers.len() || peers.keys().any(|k| !prev.peers.contains_key(k));
        let complete = ok && self.missing.is_empty();
        self.installed.send_replace(Arc::new(Installed {
            peers,
            registered: desired.registered,
            last_sync: if complete { Some(now) } else { prev.last_sync },
            revision: self.snapshot.as_ref().map_or(0, |s| s.revision),
            missing: self.missing.iter().copied().collect(),
            peer_set: prev.peer_set + u64::from(changed),
        }));
    }

    /// [`Reconciler::publish`] for the peers a followed store change
    /// touched; the others are as last published.
    pub(super) fn publish_touched(&mut self, desired: &Desired, touched: &Touched, ok: bool) {
        let Some(device) = self.cache.device.as_ref() else {
            return;
        };
        let (missing, routes) = (&mut self.missing, &self.cache.routes);
        let now = SystemTime::now();
        let revision = self.snapshot.as_ref().map_or(0, |s| s.revision);
        self.installed.send_modify(|installed| {
            // Copies only if a reader holds the previous one.
            let i = Arc::make_mut(installed);
            let mut changed = false;
            for k in &touched.peers {
                let want = desired.installed.get(k);
                if want.is_some_and(|w| is_live(device, routes, k, w)) {
                    if let std::collections::hash_map::Entry::Vacant(e) = i.peers.entry(*k) {
                        e.insert(now);
                        changed = true;
                    }
                    missing.remove(k);
                } else {
                    changed |= i.peers.remove(k).is_some();
                    if want.is_some() {
                        missing.insert(*k);
                    } else {
                        missing.remove(k);
                    }
                }
            }
            i.registered = desired.registered;
            i.revision = revision;
            i.missing = missing.iter().copied().collect();
            i.peer_set += u64::from(changed);
            if ok && missing.is_empty() {
                i.last_sync = Some(now);
            }
        });
    }
}

/// Whether the desired peer `want` (key `key`) is live: on the device with
/// its /120 and with our route to it (without the route, traffic to the
/// peer goes wherever the route in the way sends it).
pub(super) fn is_live(
    device: &crate::dataplane::DeviceState,
    routes: &BTreeSet<(std::net::Ipv6Addr, u8)>,
    key: &PublicKey,
    want: &plan::DesiredPeer,
) -> bool {
    let ip = crate::dataplane::AllowedIp::from(want.net);
    device.peers.get(key).is_some_and(|p| p.allowed_ips == [ip])
        && routes.contains(&(want.net.network(), PeerNet::LEN))
}

/// The API's window onto the dataplane.
pub(super) struct View {
    pub(super) wg: Arc<dyn WgDevice>,
    pub(super) installed: watch::Receiver<Arc<Installed>>,
    /// Just in time: the admissions and evictions.
    pub(super) jit: Option<Arc<std::sync::Mutex<super::JitBook>>>,
}

fn unix(t: SystemTime) -> Option<u64> {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

#[async_trait]
impl DataplaneView for View {
    async fn wait_installed(&self, key: &PublicKey, timeout: Duration) -> bool {
        let mut rx = self.installed.clone();
        tokio::time::timeout(timeout, rx.wait_for(|i| i.peers.contains_key(key)))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    async fn wait_published(&self, timeout: Duration) -> bool {
        let mut rx = self.installed.clone();
        tokio::time::timeout(timeout, rx.wait_for(|i| i.published()))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn is_installed(&self, key: &PublicKey) -> bool {
        self.installed.borrow().peers.contains_key(key)
    }

    async fn peer_stats(&self, key: &PublicKey) -> Option<PeerStats> {
        let since = *self.installed.borrow().peers.get(key)?;
        let device = self.wg.get().await.ok()??;
        let p = device.peers.get(key)?;
        let installed_by = self.jit.as_ref().and_then(|b| {
            let book = b.lock().ok()?;
            Some(book.admitted.get(key)?.cause.as_str())
        });
        Some(PeerStats {
            installed_by,
            evicted_at: None,
            endpoint: p.endpoint.map(|e| e.to_string()),
            latest_handshake: p.last_handshake.and_then(unix),
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
            installed_since: unix(since),
        })
    }

    fn health(&self) -> DataplaneHealth {
        let i = self.installed.borrow();
        DataplaneHealth {
            backend: self.wg.backend_name().to_owned(),
            installed_peers: i.peers.len(),
            registered_peers: i.registered,
            last_sync: i.last_sync.and_then(unix),
            peers_mode: if self.jit.is_some() { "jit" } else { "all" }.to_owned(),
        }
    }

    fn on_demand(&self) -> bool {
        self.jit.is_some()
    }

    fn peer_cap(&self) -> Option<usize> {
        self.wg.max_peers().filter(|_| self.jit.is_none())
    }

    fn evicted(&self, key: &PublicKey) -> Option<u64> {
        let book = self.jit.as_ref()?.lock().ok()?;
        unix(*book.evicted.get(key)?)
    }

    async fn wait_revision(&self, revision: Revision, timeout: Duration) -> bool {
        let mut rx = self.installed.clone();
        tokio::time::timeout(timeout, rx.wait_for(|i| i.revision >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}
