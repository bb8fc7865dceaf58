//! The control API: HTTP/JSON over a root-only unix socket (no token) and,
//! optionally, TCP with bearer tokens (an admin token, or per-org tokens that
//! see and change only their org).
//!
//! This module holds the wire types shared by the server and the client, so
//! the two can't drift apart.
//!
//! | method | path | who |
//! |---|---|---|
//! | GET | `/v1/health` | anyone with access |
//! | GET | `/v1/regions` | any caller |
//! | GET, POST | `/v1/orgs` | list: scoped; create: admin |
//! | GET, POST | `/v1/orgs/{org}/tokens` | admin |
//! | DELETE | `/v1/orgs/{org}/tokens/{id}` | admin |
//! | GET, POST | `/v1/orgs/{org}/peers` | the org |
//! | DELETE | `/v1/orgs/{org}/peers/{name}` | the org |
//! | GET | `/v1/orgs/{org}/peers/{name}/status` | the org |
//! | GET, POST | `/v1/orgs/{org}/instances` | the org |
//! | DELETE | `/v1/orgs/{org}/instances/{app}/{id}` | the org |

pub mod client;
pub mod metrics;
pub mod server;
pub mod tls;

use std::net::Ipv6Addr;

use serde::{Deserialize, Serialize};

use crate::model::{
    AppName, Endpoint, GatewayName, HostId, InstanceId, MachineId, NetworkId, OrgName, OrgPrefix,
    PeerName, PeerNet, ProcessGroup, PublicKey, RegionName, TokenId,
};
use crate::store::{Instance, Org, Peer, Snapshot};

/// The largest request body the server reads.
pub const MAX_BODY: usize = 64 * 1024;

/// Every error body: one line saying what went wrong.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The message.
    pub error: String,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// This gateway's name.
    pub gateway: GatewayName,
    /// Its region.
    pub region: RegionName,
    /// The store revision last seen.
    pub revision: u64,
    /// The kernel dataplane's state, if this daemon runs one.
    pub dataplane: Option<server::DataplaneHealth>,
}

/// One region with gateways.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegionInfo {
    /// The region code.
    pub region: RegionName,
    /// Its gateways.
    pub gateways: Vec<GatewayName>,
}

/// `POST /v1/orgs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOrg {
    /// The new org's name.
    pub name: OrgName,
}

/// An org as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrgInfo {
    /// Name.
    pub name: OrgName,
    /// Network id.
    pub network_id: NetworkId,
    /// Its /48.
    pub prefix: OrgPrefix,
    /// Its DNS server.
    pub dns: Ipv6Addr,
}

impl From<&Org> for OrgInfo {
    fn from(o: &Org) -> Self {
        Self {
            name: o.name.clone(),
            network_id: o.network_id,
            prefix: o.prefix(),
            dns: o.prefix().dns_addr(),
        }
    }
}

/// `POST /v1/orgs/{org}/tokens` body (optional: no body makes a token
/// that never expires).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOrgToken {
    /// The token stops working this many seconds from now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
}

/// The longest lifetime a token may be given (100 years): past it, "never"
/// is what is meant.
pub const MAX_TOKEN_LIFETIME_SECS: u64 = 100 * 365 * 24 * 3600;

/// `POST /v1/orgs/{org}/tokens`: a new org-scoped token, shown once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrgToken {
    /// The org.
    pub org: OrgName,
    /// The bearer token.
    pub token: String,
    /// Its id, for `--list` and `--revoke`.
    pub id: TokenId,
    /// When it stops working (unix seconds); absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// `GET /v1/orgs/{org}/tokens`: one token, never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Its id.
    pub id: TokenId,
    /// Its org.
    pub org: OrgName,
    /// Made at (unix seconds; 0: before sixpn kept the time).
    pub created_at: u64,
    /// Stops working at (unix seconds); absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Whether it has expired (by the server's clock).
    pub expired: bool,
}

/// `POST /v1/orgs/{org}/peers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreatePeer {
    /// The region to place the peer in.
    pub region: RegionName,
    /// The peer's name.
    pub name: PeerName,
    /// The peer's public key (the private key stays with the client).
    pub public_key: PublicKey,
    /// Make it ephemeral (a CI job's peer): removed once it has gone this
    /// many seconds, after its creation or its last activity, without a
    /// handshake or packet. 1 to [`MAX_EPHEMERAL_TTL_SECS`]; absent: a
    /// normal peer. Left out of the body when absent, so servers that
    /// predate ephemeral peers still take normal creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral: Option<u64>,
}

/// The longest time to live an ephemeral peer may be given (30 days):
/// longer, and it is not a CI job's peer.
pub const MAX_EPHEMERAL_TTL_SECS: u64 = 30 * 24 * 3600;

pub use crate::liveness::PeerState;

/// A peer with everything a client needs for its wg-quick file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The org.
    pub org: OrgName,
    /// The peer's name.
    pub name: PeerName,
    /// Its region.
    pub region: RegionName,
    /// The gateway holding it.
    pub gateway: GatewayName,
    /// The peer's address (`…:SS02`).
    pub address: Ipv6Addr,
    /// The peer's /120.
    pub network: PeerNet,
    /// The org's /48 (the client's AllowedIPs).
    pub org_prefix: OrgPrefix,
    /// The org's DNS server.
    pub dns: Ipv6Addr,
    /// The peer's public key.
    pub public_key: PublicKey,
    /// The gateway's public key.
    pub gateway_public_key: PublicKey,
    /// What the client dials.
    pub endpoint: Endpoint,
    /// Installed / pending / registered.
    pub state: PeerState,
    /// An ephemeral peer's time to live in seconds; absent (null): a
    /// normal peer.
    #[serde(default)]
    pub ephemeral: Option<u64>,
    /// An ephemeral peer's deadline if it never connects (unix seconds:
    /// `created_at` + TTL). Activity extends it: once the gateway sees a
    /// handshake or packet, the peer lives until TTL after the last one.
    /// Absent (null): a normal peer, never removed by itself.
    #[serde(default)]
    pub expires_at: Option<u64>,
}

impl PeerInfo {
    /// Joins a peer with its org and gateway from a snapshot.
    pub fn from_snapshot(p: &Peer, snap: &Snapshot, state: PeerState) -> Option<Self> {
        let org = snap.org(&p.org)?;
        let gw = snap.gateway(&p.gateway)?;
        Some(Self::new(
            p,
            org.prefix(),
            &gw.public_key,
            &gw.endpoint,
            state,
        ))
    }

    /// Builds the view of `p` given its org prefix and gateway.
    pub fn new(
        p: &Peer,
        prefix: OrgPrefix,
        gateway_key: &PublicKey,
        endpoint: &Endpoint,
        state: PeerState,
    ) -> Self {
        Self {
            org: p.org.clone(),
            name: p.name.clone(),
            region: p.region.clone(),
            gateway: p.gateway.clone(),
            address: p.net.peer_addr(),
            network: p.net,
            org_prefix: prefix,
            dns: prefix.dns_addr(),
            public_key: p.public_key,
            gateway_public_key: *gateway_key,
            endpoint: endpoint.clone(),
            state,
            ephemeral: p.ephemeral,
            expires_at: p.ephemeral.map(|ttl| p.created_at.saturating_add(ttl)),
        }
    }
}

/// `GET /v1/orgs/{org}/peers/{name}/status`: the peer as its gateway's
/// WireGuard interface sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The registered peer.
    pub peer: PeerInfo,
    /// The peer's current endpoint, once it has sent a packet.
    pub endpoint: Option<String>,
    /// Unix seconds of the latest handshake, if any.
    pub latest_handshake: Option<u64>,
    /// Bytes received from the peer.
    pub rx_bytes: Option<u64>,
    /// Bytes sent to the peer.
    pub tx_bytes: Option<u64>,
    /// Unix seconds when this gateway installed the peer.
    pub installed_since: Option<u64>,
    /// On a just-in-time gateway, what installed it: `start` (kept when
    /// the daemon started) or `handshake`.
    #[serde(default)]
    pub installed_by: Option<String>,
    /// On a just-in-time gateway, when it was evicted for idleness (it is
    /// installed again on its next handshake).
    #[serde(default)]
    pub evicted_at: Option<u64>,
    /// Why the kernel fields are empty, if they are.
    pub note: Option<String>,
}

/// `POST /v1/orgs/{org}/instances`: either `address`, or `host` + `machine`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddInstance {
    /// The app.
    pub app: AppName,
    /// The region.
    pub region: RegionName,
    /// The full address.
    #[serde(default)]
    pub address: Option<Ipv6Addr>,
    /// Host id (with `machine`).
    #[serde(default)]
    pub host: Option<HostId>,
    /// Machine id (with `host`).
    #[serde(default)]
    pub machine: Option<MachineId>,
    /// Instance id; derived from the machine id if absent.
    #[serde(default)]
    pub id: Option<InstanceId>,
    /// Process group.
    #[serde(default)]
    pub process_group: Option<ProcessGroup>,
    /// `false` registers a stopped instance.
    #[serde(default = "yes")]
    pub started: bool,
}

fn yes() -> bool {
    true
}

/// An instance as the API shows it.
pub type InstanceInfo = Instance;
