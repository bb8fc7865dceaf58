//! What the API may know of this gateway's dataplane: whether a peer is
//! installed here, waiting for it, its kernel counters, and the dataplane's
//! health. The reconciler provides a [`DataplaneView`] from the state it
//! publishes; the API handlers ask it and decide nothing about liveness on
//! their own. It sits in the reconcile layer, below the API, so the
//! reconciler depends on nothing above it.

use std::time::Duration;

use async_trait::async_trait;

use crate::model::PublicKey;

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
}
