//! The store: the source of truth for orgs, gateways, peers and instances.
//!
//! The daemon only ever *reads* a [`Snapshot`] and follows the change feed
//! ([`Store::subscribe`]); the control API writes through the transactional
//! methods. Every write is one transaction; peer address allocation happens
//! inside it, so two concurrent creates can never get the same address, even
//! from different processes (SQLite) or different gateways (etcd, later).
//!
//! The trait is async and object-safe so that an etcd backend, whose client is
//! async and whose transactions are compare-and-swap, fits behind it.

pub mod etcd;
#[cfg(any(test, feature = "testkit"))]
pub mod fixture;
mod log;
pub mod placement;
pub mod sqlite;

use std::collections::BTreeMap;
use std::net::Ipv6Addr;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::model::{
    AppName, Endpoint, GatewayName, HostId, InstanceId, MachineId, NetworkId, OrgName, OrgPrefix,
    PeerName, PeerNet, PeerSlot, ProcessGroup, PublicKey, RegionName, TokenId,
};

/// A store-wide revision: it grows with every committed write.
pub type Revision = u64;

/// An organization and its network id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Org {
    /// The org's name.
    pub name: OrgName,
    /// Its network id; the org's /48 is `network_id.prefix()`.
    pub network_id: NetworkId,
}

impl Org {
    /// The org's /48.
    pub fn prefix(&self) -> OrgPrefix {
        self.network_id.prefix()
    }
}

/// A gateway as it registers itself at start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gateway {
    /// Unique name (`lhr-1`).
    pub name: GatewayName,
    /// The region it serves.
    pub region: RegionName,
    /// The host id in its peers' addresses.
    pub host_id: HostId,
    /// What peers dial.
    pub endpoint: Endpoint,
    /// Its WireGuard public key.
    pub public_key: PublicKey,
}

/// A registered WireGuard peer, with its address resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The org it belongs to.
    pub org: OrgName,
    /// Its name, unique in the org.
    pub name: PeerName,
    /// The gateway that holds it.
    pub gateway: GatewayName,
    /// That gateway's region.
    pub region: RegionName,
    /// Its slot among the gateway's peers of this org.
    pub slot: PeerSlot,
    /// Its /120; the peer uses `net.peer_addr()`.
    pub net: PeerNet,
    /// The peer's public key.
    pub public_key: PublicKey,
    /// Unix seconds when it was registered.
    pub created_at: u64,
    /// For an ephemeral peer (a CI job's), its time to live in seconds: it
    /// is removed once it has gone this long after its creation, or after
    /// its last activity, without a handshake or packet
    /// ([`crate::plan::ephemeral::expired`]). `None`: a normal peer, kept
    /// until removed.
    #[serde(default)]
    pub ephemeral: Option<u64>,
    /// The store revision of the write that registered it: a gateway whose
    /// [`SyncReport`] is at or past it has seen the peer.
    pub revision: Revision,
}

/// A registered app instance (what a scheduler would report).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// The org of its app.
    pub org: OrgName,
    /// The app.
    pub app: AppName,
    /// Its id, unique in the app.
    pub id: InstanceId,
    /// The region it runs in.
    pub region: RegionName,
    /// Its 6PN address, inside the org's /48.
    pub address: Ipv6Addr,
    /// Its process group, if the app has several.
    pub process_group: Option<ProcessGroup>,
    /// Whether it is started (stopped instances are in `all.*` names and
    /// `<id>.vm.<app>.internal` only; see `dns::zone`).
    pub started: bool,
}

/// Everything in the store at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The revision this snapshot reflects.
    pub revision: Revision,
    /// Orgs, by name.
    pub orgs: Vec<Org>,
    /// Gateways, by name.
    pub gateways: Vec<Gateway>,
    /// Peers, by org then name.
    pub peers: Vec<Peer>,
    /// Instances, by org, app, id.
    pub instances: Vec<Instance>,
}

impl Snapshot {
    /// The org called `name`.
    pub fn org(&self, name: &OrgName) -> Option<&Org> {
        self.orgs.iter().find(|o| &o.name == name)
    }
    /// The gateway called `name`.
    pub fn gateway(&self, name: &GatewayName) -> Option<&Gateway> {
        self.gateways.iter().find(|g| &g.name == name)
    }
}

/// One committed write, as a change to a [`Snapshot`]: how a backend keeps
/// a snapshot current without reading everything again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delta {
    /// Nothing a snapshot holds changed (e.g. a token was added).
    Unchanged,
    /// An org was created.
    OrgAdded(Org),
    /// A peer was registered.
    PeerAdded(Peer),
    /// A peer was removed (as it was).
    PeerRemoved(Peer),
    /// An instance was registered.
    InstanceAdded(Instance),
    /// An instance was removed.
    InstanceRemoved(OrgName, AppName, InstanceId),
}

impl Snapshot {
    /// Applies one write, keeping every list in its sort order.
    pub fn apply(&mut self, delta: Delta) {
        fn insert<T>(v: &mut Vec<T>, item: T, cmp: impl Fn(&T, &T) -> std::cmp::Ordering) {
            let at = v.partition_point(|x| cmp(x, &item).is_lt());
            v.insert(at, item);
        }
        match delta {
            Delta::Unchanged => {}
            Delta::OrgAdded(o) => insert(&mut self.orgs, o, |a, b| a.name.cmp(&b.name)),
            Delta::PeerAdded(p) => insert(&mut self.peers, p, |a, b| {
                (&a.org, &a.name).cmp(&(&b.org, &b.name))
            }),
            Delta::PeerRemoved(gone) => self
                .peers
                .retain(|p| p.org != gone.org || p.name != gone.name),
            Delta::InstanceAdded(i) => insert(&mut self.instances, i, |a, b| {
                (&a.org, &a.app, &a.id).cmp(&(&b.org, &b.app, &b.id))
            }),
            Delta::InstanceRemoved(org, app, id) => self
                .instances
                .retain(|i| i.org != org || i.app != app || i.id != id),
        }
    }
}

/// What a gateway last reported about its kernel: after planning from the
/// store at `revision`, every one of its peers registered by then is
/// installed except those in `missing`. Gateways publish one whenever their
/// installed peers change, so that an API on another gateway can tell when
/// a peer it placed there is live.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReport {
    /// The revision of the snapshot the pass planned from.
    pub revision: Revision,
    /// The gateway's peers at that revision that failed to install.
    pub missing: Vec<PublicKey>,
}

impl SyncReport {
    /// The most peers a report lists as missing; a gateway missing more
    /// than this is broken and reports nothing until it recovers.
    pub const MAX_MISSING: usize = 256;

    /// Whether this report says `peer` is installed on its gateway.
    pub fn covers(&self, peer: &Peer) -> bool {
        self.revision >= peer.revision && !self.missing.contains(&peer.public_key)
    }
}

/// Every gateway's latest [`SyncReport`].
pub type SyncReports = BTreeMap<GatewayName, SyncReport>;

/// Replaces the published reports if they differ.
fn publish_reports(tx: &watch::Sender<Arc<SyncReports>>, reports: SyncReports) {
    tx.send_if_modified(|r| {
        let changed = **r != reports;
        if changed {
            *r = Arc::new(reports);
        }
        changed
    });
}

/// How an instance's address is given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceAddress {
    /// The full address, which must lie in the org's /48.
    Address(Ipv6Addr),
    /// Host id and machine id, from which the address is derived.
    HostMachine {
        /// The instance host.
        host: HostId,
        /// The machine on it.
        machine: MachineId,
    },
}

/// A request to register a peer.
#[derive(Clone, Debug)]
pub struct NewPeer {
    /// The org.
    pub org: OrgName,
    /// The peer's name.
    pub name: PeerName,
    /// The region whose least-loaded gateway gets the peer.
    pub region: RegionName,
    /// The peer's public key.
    pub public_key: PublicKey,
    /// Its time to live in seconds, for an ephemeral peer ([`Peer::ephemeral`]);
    /// `None`: a normal peer.
    pub ephemeral: Option<u64>,
}

/// A request to register an instance.
#[derive(Clone, Debug)]
pub struct NewInstance {
    /// The org.
    pub org: OrgName,
    /// The app.
    pub app: AppName,
    /// Its id; derived from the address's machine id if absent.
    pub id: Option<InstanceId>,
    /// Its region.
    pub region: RegionName,
    /// Its address.
    pub address: InstanceAddress,
    /// Its process group.
    pub process_group: Option<ProcessGroup>,
    /// Started (default) or stopped.
    pub started: bool,
}

/// An org-scoped API token as the store keeps it: its SHA-256 (never the
/// token), its org, and when it was made and stops working.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrgTokenRecord {
    /// Derived from the hash: what lists show and revocations name.
    pub id: TokenId,
    /// The org it sees and changes.
    pub org: OrgName,
    /// When it was made (unix seconds; 0: before sixpn kept the time).
    pub created_at: u64,
    /// When it stops working (unix seconds); None: never.
    pub expires_at: Option<u64>,
}

impl OrgTokenRecord {
    /// Whether the token has expired at `now` (unix seconds).
    pub fn expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|t| now >= t)
    }
}

/// A request to store a new org token.
#[derive(Clone, Debug)]
pub struct NewOrgToken {
    /// The org.
    pub org: OrgName,
    /// SHA-256 of the token.
    pub sha256: [u8; 32],
    /// Now (unix seconds).
    pub created_at: u64,
    /// When it stops working; None: never.
    pub expires_at: Option<u64>,
}

/// What can go wrong in a store call, by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The write would duplicate a unique value.
    #[error("{0}")]
    Conflict(String),
    /// No address or id is left to allocate.
    #[error("{0}")]
    Exhausted(String),
    /// The request is inconsistent with the store (e.g. an address outside the org).
    #[error("{0}")]
    Invalid(String),
    /// The store can't be reached; retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Corrupt data or a backend bug.
    #[error("store error: {0}")]
    Internal(String),
}

/// The store interface every backend implements.
#[async_trait]
pub trait Store: Send + Sync {
    /// Everything, consistent at one revision.
    async fn snapshot(&self) -> Result<Arc<Snapshot>, StoreError>;

    /// The change feed: the latest revision, updated within 100 ms of any
    /// committed write by anyone sharing the store.
    fn subscribe(&self) -> watch::Receiver<Revision>;

    /// Creates an org with the next free network id.
    async fn create_org(&self, name: &OrgName) -> Result<Org, StoreError>;

    /// Registers or updates a gateway (by name). Its host id may not change
    /// while it holds peers, and no two gateways share a host id.
    async fn register_gateway(&self, gateway: &Gateway) -> Result<(), StoreError>;

    /// Registers a peer on the least-loaded gateway of its region and
    /// allocates its /120 in the same transaction. Returns the peer and the
    /// gateway it was placed on.
    async fn create_peer(&self, peer: &NewPeer) -> Result<(Peer, Gateway), StoreError>;

    /// Removes a peer; its slot becomes free.
    async fn remove_peer(&self, org: &OrgName, name: &PeerName) -> Result<Peer, StoreError>;

    /// Registers an instance.
    async fn add_instance(&self, instance: &NewInstance) -> Result<Instance, StoreError>;

    /// Removes an instance.
    async fn remove_instance(
        &self,
        org: &OrgName,
        app: &AppName,
        id: &InstanceId,
    ) -> Result<Instance, StoreError>;

    /// Stores a new org-scoped API token (its SHA-256).
    async fn add_org_token(&self, token: &NewOrgToken) -> Result<OrgTokenRecord, StoreError>;

    /// The org token with this SHA-256, if any (expired ones too: the
    /// caller decides, with its clock).
    async fn token_org(&self, token_sha256: [u8; 32])
        -> Result<Option<OrgTokenRecord>, StoreError>;

    /// The org's tokens, by id. `NotFound` if there is no such org.
    async fn org_tokens(&self, org: &OrgName) -> Result<Vec<OrgTokenRecord>, StoreError>;

    /// Deletes one of the org's tokens: it stops working at once.
    /// `NotFound` if the org has no token with this id.
    async fn revoke_org_token(
        &self,
        org: &OrgName,
        id: &TokenId,
    ) -> Result<OrgTokenRecord, StoreError>;

    /// Publishes `gateway`'s report of what it has installed. It changes
    /// nothing a gateway installs, so it doesn't move the change feed (or
    /// every report would set off a pass everywhere, and the next report).
    async fn report_sync(
        &self,
        gateway: &GatewayName,
        report: &SyncReport,
    ) -> Result<(), StoreError>;

    /// Every gateway's latest report, kept current from the store.
    fn sync_reports(&self) -> watch::Receiver<Arc<SyncReports>>;

    /// A clean stop: leaves the store's files whole on their own (SQLite
    /// checkpoints its write-ahead log into the database file, so copying
    /// that file alone after a stop is a complete backup). Nothing to do by
    /// default.
    async fn close(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// The current snapshot and, if the backend still has them, the writes
    /// that led to it from revision `from`, in order: a consumer holding
    /// the snapshot at `from` can then follow on at the cost of the change
    /// instead of comparing everything. `None`: compare everything.
    async fn snapshot_since(
        &self,
        from: Revision,
    ) -> Result<(Arc<Snapshot>, Option<Vec<Delta>>), StoreError> {
        let _ = from;
        Ok((self.snapshot().await?, None))
    }
}

impl NewInstance {
    /// The instance's address and id inside the org's /48 `prefix`: the
    /// address given or derived, which must lie in the org and not be its
    /// DNS address; the id given or derived from the address.
    pub fn resolve(&self, prefix: OrgPrefix) -> Result<(Ipv6Addr, InstanceId), StoreError> {
        let address = match self.address {
            InstanceAddress::Address(a) => a,
            InstanceAddress::HostMachine { host, machine } => {
                crate::model::instance_addr(prefix, host, machine)
            }
        };
        if !prefix.contains(address) {
            return Err(StoreError::Invalid(format!(
                "address {address} is outside org '{}' ({prefix})",
                self.org
            )));
        }
        if address == prefix.dns_addr() {
            return Err(StoreError::Invalid(format!(
                "address {address} is the org's DNS address"
            )));
        }
        let id = self
            .id
            .clone()
            .unwrap_or_else(|| default_instance_id(address));
        Ok((address, id))
    }
}

/// The id an instance gets when none is given: its machine id as 8 hex digits
/// (`fdaa:0:18:a7b:7d:f066:b83b:2` → `f066b83b`), as Fly's hostnames are.
pub fn default_instance_id(address: Ipv6Addr) -> InstanceId {
    let s = address.segments();
    let id = format!("{:04x}{:04x}", s[5], s[6]);
    match id.parse() {
        Ok(id) => id,
        // 8 hex digits always form a valid label.
        Err(_) => unreachable!("hex digits are a valid instance id"),
    }
}

#[cfg(test)]
pub(crate) mod conformance;
