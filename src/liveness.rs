//! Whether a peer is live: the one place that decides "installed",
//! "pending" or "registered", for the API's create, list and status.
//!
//! Two sources can tell. This gateway's own dataplane, through the
//! [`DataplaneView`] the reconciler publishes, knows its own peers; for a
//! peer another gateway holds, that gateway's sync report in the store says
//! whether it was installed ([`SyncReport::covers`]). With neither (an API
//! that runs no dataplane, asking about a gateway never seen reporting) the
//! peer is only known to be registered. [`decide`] is that rule as a pure
//! function; [`Liveness`] reads the sources and waits on them.
//!
//! It sits in the reconcile layer, below the API, so the reconciler depends
//! on nothing above it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::model::{GatewayName, PublicKey};
use crate::store::{Peer, Store, SyncReport, SyncReports};

/// How long a peer create waits for the peer's gateway (this one or another)
/// to install it before answering `pending`.
pub const INSTALL_WAIT: Duration = Duration::from_secs(5);

/// How long a peer list or status waits, just after the daemon started, for
/// its first pass to tell which peers are live here before answering
/// `pending` for them.
pub const FIRST_PASS_WAIT: Duration = Duration::from_secs(2);

/// Whether a peer is live on its gateway's interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// Installed on the gateway's WireGuard interface.
    Installed,
    /// Registered; the gateway hasn't installed it yet.
    Pending,
    /// Registered, not in the kernel: this daemon has no dataplane to
    /// tell, or its gateway installs peers just in time (on their first
    /// handshake initiation) and this one hasn't sent one lately.
    Registered,
}

/// What this daemon's own dataplane can say of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// This daemon runs no dataplane.
    NoDataplane,
    /// It runs one, but the peer is another gateway's.
    Elsewhere,
    /// The peer is this gateway's, and is (or is not) live on it.
    Here {
        /// Live on the interface now.
        installed: bool,
        /// This gateway installs peers just in time: one not live is
        /// waiting for its handshake, not for the reconciler.
        on_demand: bool,
    },
}

/// The rule: a peer of this gateway is what its dataplane says; another
/// gateway's is installed once that gateway's report covers it, pending while
/// someone could tell but hasn't, and merely registered when nobody can.
pub fn decide(local: Local, report: Option<&SyncReport>, peer: &Peer) -> PeerState {
    match (local, report) {
        (
            Local::Here {
                installed: true, ..
            },
            _,
        ) => PeerState::Installed,
        (
            Local::Here {
                on_demand: true, ..
            },
            _,
        ) => PeerState::Registered,
        (Local::Here { .. }, _) => PeerState::Pending,
        (_, Some(r)) if r.covers(peer) => PeerState::Installed,
        (Local::Elsewhere, _) | (_, Some(_)) => PeerState::Pending,
        (Local::NoDataplane, None) => PeerState::Registered,
    }
}

/// A peer's state with, when this gateway holds it, what its kernel says.
#[derive(Debug, Clone)]
pub struct Status {
    /// Installed / pending / registered.
    pub state: PeerState,
    /// The kernel's counters, when the peer is live here.
    pub stats: Option<PeerStats>,
    /// Why there are no counters, when there aren't.
    pub note: Option<String>,
}

/// The sources of liveness for one daemon: the store's sync reports and,
/// when it runs one, its dataplane.
#[derive(Clone, Copy)]
pub struct Liveness<'a> {
    store: &'a dyn Store,
    gateway: &'a GatewayName,
    dataplane: Option<&'a dyn DataplaneView>,
}

impl<'a> Liveness<'a> {
    /// Liveness as seen by the daemon of `gateway`.
    pub fn new(
        store: &'a dyn Store,
        gateway: &'a GatewayName,
        dataplane: Option<&'a dyn DataplaneView>,
    ) -> Self {
        Self {
            store,
            gateway,
            dataplane,
        }
    }

    fn local(&self, peer: &Peer) -> Local {
        match self.dataplane {
            None => Local::NoDataplane,
            Some(_) if peer.gateway != *self.gateway => Local::Elsewhere,
            Some(dp) => Local::Here {
                installed: dp.is_installed(&peer.public_key),
                on_demand: dp.on_demand(),
            },
        }
    }

    /// Until the dataplane's first pass after a start, "not installed" means
    /// "not looked yet": a restarted gateway must not call its live peers
    /// pending. Waits for that pass, at most [`FIRST_PASS_WAIT`]; at once
    /// any time after.
    pub async fn settle(&self) {
        if let Some(dp) = self.dataplane {
            dp.wait_published(FIRST_PASS_WAIT).await;
        }
    }

    /// What can be told of `peer` now.
    pub fn state(&self, peer: &Peer) -> PeerState {
        let reports = self.store.sync_reports();
        let reports = reports.borrow();
        decide(self.local(peer), reports.get(&peer.gateway), peer)
    }

    /// Waits, at most `timeout`, for `peer` to be installed on its gateway,
    /// and says what it is then. Another gateway's peer is waited on only if
    /// someone can tell: this daemon runs a dataplane (so it is a gateway
    /// whose fleet reports), or that gateway has been seen reporting.
    pub async fn wait(&self, peer: &Peer, timeout: Duration) -> PeerState {
        match (self.local(peer), self.dataplane) {
            (
                Local::Here {
                    on_demand: true,
                    installed,
                },
                Some(dp),
            ) => {
                // Installed on its first initiation: ready once this
                // gateway knows the peer, with no kernel wait.
                if installed {
                    PeerState::Installed
                } else if dp.wait_revision(peer.revision, timeout).await {
                    PeerState::Registered
                } else {
                    PeerState::Pending
                }
            }
            (Local::Here { .. }, Some(dp)) => {
                if dp.wait_installed(&peer.public_key, timeout).await {
                    PeerState::Installed
                } else {
                    PeerState::Pending
                }
            }
            (local, _) => {
                let seen = self
                    .store
                    .sync_reports()
                    .borrow()
                    .contains_key(&peer.gateway);
                if (local == Local::Elsewhere || seen) && self.reported(peer, timeout).await {
                    PeerState::Installed
                } else {
                    self.state(peer)
                }
            }
        }
    }

    /// Waits, at most `timeout`, until `peer`'s gateway reports it
    /// installed; returns whether it did.
    async fn reported(&self, peer: &Peer, timeout: Duration) -> bool {
        let mut reports = self.store.sync_reports();
        let covered = |r: &Arc<SyncReports>| r.get(&peer.gateway).is_some_and(|s| s.covers(peer));
        tokio::time::timeout(timeout, reports.wait_for(covered))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// `peer`'s state with its kernel counters if it is live here; a note
    /// says why there are none otherwise.
    pub async fn status(&self, peer: &Peer) -> Status {
        self.settle().await;
        match (self.local(peer), self.dataplane) {
            (Local::NoDataplane, _) | (_, None) => Status {
                state: PeerState::Registered,
                stats: None,
                note: Some("this daemon runs no dataplane; kernel state unknown".to_owned()),
            },
            (Local::Elsewhere, _) => Status {
                state: self.state(peer),
                stats: None,
                note: Some(format!(
                    "peer is held by gateway '{}'; ask its API for kernel state",
                    peer.gateway
                )),
            },
            (Local::Here { .. }, Some(dp)) => match dp.peer_stats(&peer.public_key).await {
                Some(s) => Status {
                    state: PeerState::Installed,
                    stats: Some(s),
                    note: None,
                },
                None if dp.on_demand() => Status {
                    state: PeerState::Registered,
                    stats: Some(PeerStats {
                        evicted_at: dp.evicted(&peer.public_key),
                        ..PeerStats::default()
                    }),
                    note: Some(match dp.evicted(&peer.public_key) {
                        Some(_) => "evicted from the kernel for idleness; its next handshake \
                                    installs it again"
                            .to_owned(),
                        None => "not in the kernel: installed on its first handshake".to_owned(),
                    }),
                },
                None => Status {
                    state: PeerState::Pending,
                    stats: None,
                    note: Some("not installed on this gateway yet".to_owned()),
                },
            },
        }
    }
}

/// What the kernel says about one peer.
#[derive(Debug, Clone, Default)]
pub struct PeerStats {
    /// Its current endpoint.
    pub endpoint: Option<String>,
    /// Unix seconds of the latest handshake.
    pub latest_handshake: Option<u64>,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Unix seconds when sixpn installed it.
    pub installed_since: Option<u64>,
    /// What installed it, on a just-in-time gateway: `start` (kept at a
    /// daemon start) or `handshake`.
    pub installed_by: Option<&'static str>,
    /// Unix seconds when it was evicted for idleness, if it was and hasn't
    /// come back.
    pub evicted_at: Option<u64>,
}

/// The seam between the API and the daemon's dataplane: what the API may ask
/// of the kernel side. The daemon provides it once a dataplane runs.
#[async_trait]
pub trait DataplaneView: Send + Sync {
    /// Waits until the peer with `key` is installed on this gateway, at most
    /// `timeout`; returns whether it is.
    async fn wait_installed(&self, key: &PublicKey, timeout: Duration) -> bool;
    /// Waits until the dataplane has published what is installed at least
    /// once (the first pass after a start), at most `timeout`; returns
    /// whether it has.
    async fn wait_published(&self, timeout: Duration) -> bool;
    /// Whether the peer with `key` is installed on this gateway now.
    fn is_installed(&self, key: &PublicKey) -> bool;
    /// The peer's kernel state, if it is installed here.
    async fn peer_stats(&self, key: &PublicKey) -> Option<PeerStats>;
    /// Installed and registered peer counts and the last full sync.
    fn health(&self) -> DataplaneHealth;
    /// Whether this gateway installs peers just in time.
    fn on_demand(&self) -> bool {
        false
    }
    /// The most peers this gateway can install, when every registered peer
    /// is installed and the backend has a cap (wireguard-go's).
    fn peer_cap(&self) -> Option<usize> {
        None
    }
    /// Just in time: when the peer with `key` was evicted for idleness.
    fn evicted(&self, _key: &PublicKey) -> Option<u64> {
        None
    }
    /// Waits until the dataplane has planned from store revision
    /// `revision` or later, at most `timeout`; returns whether it has.
    async fn wait_revision(&self, _revision: u64, timeout: Duration) -> bool {
        self.wait_published(timeout).await
    }
}

/// The dataplane's part of `/v1/health`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DataplaneHealth {
    /// The WireGuard backend in use.
    pub backend: String,
    /// Peers live on the interface.
    pub installed_peers: usize,
    /// Peers registered on this gateway.
    pub registered_peers: usize,
    /// Unix seconds of the last pass after which the kernel matched the store.
    pub last_sync: Option<u64>,
    /// "all" (every registered peer installed) or "jit".
    #[serde(default)]
    pub peers_mode: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HostId, NetworkId, PeerSlot, PrivateKey};

    fn peer(revision: u64) -> Peer {
        let slot = PeerSlot::new(1).unwrap();
        Peer {
            org: "acme".parse().unwrap(),
            name: "laptop".parse().unwrap(),
            gateway: "lhr-1".parse().unwrap(),
            region: "lhr".parse().unwrap(),
            slot,
            net: slot.net(NetworkId::new(1).unwrap().prefix(), HostId::from_u32(1)),
            public_key: PrivateKey::generate().public_key(),
            created_at: 0,
            ephemeral: None,
            revision,
        }
    }

    fn report(revision: u64, missing: Vec<PublicKey>) -> SyncReport {
        SyncReport { revision, missing }
    }

    #[test]
    fn a_peer_of_this_gateway_is_what_its_dataplane_says_whatever_the_report() {
        let p = peer(5);
        let stale = report(1, vec![]);
        let covering = report(9, vec![]);
        for r in [None, Some(&stale), Some(&covering)] {
            for on_demand in [false, true] {
                assert_eq!(
                    decide(
                        Local::Here {
                            installed: true,
                            on_demand
                        },
                        r,
                        &p
                    ),
                    PeerState::Installed
                );
            }
            assert_eq!(
                decide(
                    Local::Here {
                        installed: false,
                        on_demand: false
                    },
                    r,
                    &p
                ),
                PeerState::Pending
            );
            assert_eq!(
                decide(
                    Local::Here {
                        installed: false,
                        on_demand: true
                    },
                    r,
                    &p
                ),
                PeerState::Registered,
                "just in time, a peer not installed waits for its handshake"
            );
        }
    }

    #[test]
    fn another_gateways_peer_is_installed_once_its_report_covers_it() {
        let p = peer(5);
        for local in [Local::Elsewhere, Local::NoDataplane] {
            assert_eq!(
                decide(local, Some(&report(5, vec![])), &p),
                PeerState::Installed
            );
            assert_eq!(
                decide(local, Some(&report(4, vec![])), &p),
                PeerState::Pending,
                "a report from before the peer was registered"
            );
            assert_eq!(
                decide(local, Some(&report(9, vec![p.public_key])), &p),
                PeerState::Pending,
                "a report that lists it missing"
            );
        }
    }

    #[test]
    fn with_nobody_to_tell_a_peer_is_only_registered() {
        let p = peer(5);
        assert_eq!(decide(Local::NoDataplane, None, &p), PeerState::Registered);
        assert_eq!(
            decide(Local::Elsewhere, None, &p),
            PeerState::Pending,
            "a gateway's fleet reports: its silence is pending"
        );
    }
}
