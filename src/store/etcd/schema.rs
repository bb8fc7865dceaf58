//! The key schema and the records stored under it: encoding and decoding
//! values, parsing keys, turning a whole read into a [`Snapshot`] and a
//! watch event into a [`Delta`].
//!
//! # Keys
//!
//! Everything lives under one configurable prefix (`/sixpn/` by default;
//! written `P` below). Values are JSON unless noted; names are validated
//! labels, so they never contain `/`.
//!
//! | key | value | why |
//! | --- | --- | --- |
//! | `P orgs/<org>` | [`Org`] | the org and its network id |
//! | `P netids/<id, 10 digits>` | org name | network-id uniqueness |
//! | `P gateways/<gateway>` | [`Gateway`] | registration: region, host id, endpoint, key |
//! | `P hostids/<host id, 8 hex>` | gateway name | host-id uniqueness |
//! | `P peers/<org>/<peer>` | [`PeerRecord`] | the peer: gateway, slot, key, time, ephemeral TTL |
//! | `P slots/<org>/<gateway>/<slot>` | peer name | address uniqueness: one key per /120 |
//! | `P keys/<public key, hex>` | `<org>/<peer>` | public-key uniqueness |
//! | `P instances/<org>/<app>/<id>` | [`InstanceRecord`] | an app instance |
//! | `P addrs/<address>` | `<org>/<app>/<id>` | instance-address uniqueness |
//! | `P tokens/<sha256, hex>` | [`TokenValue`] (or, written before 0.3, the bare org name) | org-scoped API tokens |
//! | `P synced/<gateway>` | [`SyncReport`] | what the gateway has installed |
//! | `P written` | empty | put by every write: its mod revision is the newest write |
//!
//! A peer's region and /120 are not stored: they follow from its gateway and
//! org, exactly as in the SQLite schema. The revision that registered a peer
//! is its key's `create_revision`.
//!
//! `synced/` keys describe the kernels, not what they should hold: changes
//! to them update [`Store::sync_reports`] but not the change feed, so a
//! report never sets off passes (and more reports) on other gateways.
//!

use super::*;

/// A peer as stored under `peers/<org>/<name>`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerRecord {
    /// The gateway that holds it.
    pub gateway: GatewayName,
    /// Its slot among that gateway's peers of the org.
    pub slot: u32,
    /// The peer's public key.
    pub public_key: PublicKey,
    /// Unix seconds when it was registered.
    pub created_at: u64,
    /// An ephemeral peer's time to live in seconds ([`Peer::ephemeral`]).
    /// Absent for a normal peer, and in every record written before
    /// peers could be ephemeral: those read as normal peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral: Option<u64>,
}

/// An instance as stored under `instances/<org>/<app>/<id>`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// The region it runs in.
    pub region: RegionName,
    /// Its 6PN address.
    pub address: Ipv6Addr,
    /// Its process group.
    pub process_group: Option<ProcessGroup>,
    /// Started or stopped.
    pub started: bool,
}

impl InstanceRecord {
    /// The instance `org`/`app`/`id` this record describes.
    pub(super) fn into_instance(self, org: OrgName, app: AppName, id: InstanceId) -> Instance {
        Instance {
            org,
            app,
            id,
            region: self.region,
            address: self.address,
            process_group: self.process_group,
            started: self.started,
        }
    }
}

/// The org and name in a `peers/<org>/<name>` key.
pub(super) fn peer_key(org: &str, name: &str) -> Result<(OrgName, PeerName), StoreError> {
    Ok((
        org.parse().map_err(corrupt("peer key"))?,
        name.parse().map_err(corrupt("peer key"))?,
    ))
}

/// The org, app and id in an `instances/<org>/<app>/<id>` key.
pub(super) fn instance_key(
    org: &str,
    app: &str,
    id: &str,
) -> Result<(OrgName, AppName, InstanceId), StoreError> {
    Ok((
        org.parse().map_err(corrupt("instance key"))?,
        app.parse().map_err(corrupt("instance key"))?,
        id.parse().map_err(corrupt("instance key"))?,
    ))
}

/// Builds the keys of the schema above.
#[derive(Clone, Debug)]
pub(super) struct Keys {
    pub(super) prefix: String,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Self {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self { prefix }
    }
    pub(super) fn k(&self, rest: impl std::fmt::Display) -> String {
        format!("{}{rest}", self.prefix)
    }
    pub(super) fn org(&self, org: &OrgName) -> String {
        self.k(format_args!("orgs/{org}"))
    }
    pub(super) fn netid(&self, id: NetworkId) -> String {
        self.k(format_args!("netids/{:010}", id.get()))
    }
    pub(super) fn netids(&self) -> String {
        self.k("netids/")
    }
    pub(super) fn gateway(&self, gw: &GatewayName) -> String {
        self.k(format_args!("gateways/{gw}"))
    }
    pub(super) fn gateways(&self) -> String {
        self.k("gateways/")
    }
    pub(super) fn hostid(&self, host: model::HostId) -> String {
        self.k(format_args!("hostids/{:08x}", host.get()))
    }
    pub(super) fn peer(&self, org: &OrgName, name: &PeerName) -> String {
        self.k(format_args!("peers/{org}/{name}"))
    }
    pub(super) fn slot(&self, org: &OrgName, gw: &GatewayName, slot: u32) -> String {
        self.k(format_args!("slots/{org}/{gw}/{slot}"))
    }
    pub(super) fn slots(&self) -> String {
        self.k("slots/")
    }
    pub(super) fn key(&self, key: &PublicKey) -> String {
        self.k(format_args!("keys/{}", hex(key.as_bytes())))
    }
    pub(super) fn instance(&self, org: &OrgName, app: &AppName, id: &InstanceId) -> String {
        self.k(format_args!("instances/{org}/{app}/{id}"))
    }
    pub(super) fn addr(&self, addr: Ipv6Addr) -> String {
        self.k(format_args!("addrs/{addr}"))
    }
    pub(super) fn token(&self, sha: &[u8; 32]) -> String {
        self.k(format_args!("tokens/{}", hex(sha)))
    }
    /// Every token key whose hash starts with the id's bytes.
    pub(super) fn tokens_with(&self, id: &TokenId) -> String {
        self.k(format_args!("tokens/{id}"))
    }
    pub(super) fn tokens(&self) -> String {
        self.k("tokens/")
    }
    pub(super) fn synced(&self, gw: &GatewayName) -> String {
        self.k(format_args!("synced/{gw}"))
    }
    pub(super) fn written(&self) -> String {
        self.k("written")
    }
    /// The key relative to the prefix, split on `/`.
    pub(super) fn parts<'a>(&self, key: &'a [u8]) -> Option<Vec<&'a str>> {
        let key = std::str::from_utf8(key).ok()?;
        Some(key.strip_prefix(&self.prefix)?.split('/').collect())
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn corrupt<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> StoreError + '_ {
    move |e| StoreError::Internal(format!("corrupt {what} in etcd: {e}"))
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(
    kv: &KeyValue,
    what: &str,
) -> Result<T, StoreError> {
    serde_json::from_slice(kv.value()).map_err(corrupt(what))
}

pub(super) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Internal(format!("encoding: {e}")))
}

/// An org token as stored under `tokens/<sha256>`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenValue {
    /// Its org.
    pub org: OrgName,
    /// Made at (unix seconds).
    pub created_at: u64,
    /// Stops working at (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// A `tokens/<sha256>` key and value as the record; values written before
/// tokens had times are the bare org name.
pub(super) fn token_record(keys: &Keys, kv: &KeyValue) -> Result<OrgTokenRecord, StoreError> {
    let bad = || {
        StoreError::Internal(format!(
            "corrupt token key {:?}",
            String::from_utf8_lossy(kv.key())
        ))
    };
    let Some(parts) = keys.parts(kv.key()) else {
        return Err(bad());
    };
    let ["tokens", h] = parts.as_slice() else {
        return Err(bad());
    };
    let mut sha = [0u8; 32];
    if h.len() != 64 {
        return Err(bad());
    }
    for (i, b) in sha.iter_mut().enumerate() {
        *b = u8::from_str_radix(h.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    let v = match serde_json::from_slice::<TokenValue>(kv.value()) {
        Ok(v) => v,
        Err(_) => TokenValue {
            org: text(kv, "token org")?
                .parse()
                .map_err(corrupt("org name"))?,
            created_at: 0,
            expires_at: None,
        },
    };
    Ok(OrgTokenRecord {
        id: TokenId::of(&sha),
        org: v.org,
        created_at: v.created_at,
        expires_at: v.expires_at,
    })
}

pub(super) fn text(kv: &KeyValue, what: &str) -> Result<String, StoreError> {
    kv.value_str().map(str::to_owned).map_err(corrupt(what))
}

/// What one event does to a snapshot: `None` for keys a snapshot doesn't
/// hold (uniqueness keys, tokens, reports, the write marker).
pub(super) fn delta_of(
    keys: &Keys,
    snap: &Snapshot,
    kind: EventType,
    kv: &KeyValue,
) -> Result<Option<Delta>, Unfollowable> {
    let Some(parts) = keys.parts(kv.key()) else {
        return Ok(None);
    };
    let put = kind == EventType::Put;
    let created = put && kv.create_revision() == kv.mod_revision();
    let what = |k: &str| Unfollowable(format!("{} of {k}", if put { "update" } else { "delete" }));
    match parts.as_slice() {
        ["orgs", _] if created => Ok(Some(Delta::OrgAdded(decode(kv, "org")?))),
        ["orgs", name] => Err(what(&format!("org {name}"))),
        ["gateways", name] => {
            // A restarting gateway registers again; the same record is no
            // change. Anything else may move peers' regions: read whole.
            let same = put
                && decode::<Gateway>(kv, "gateway")
                    .is_ok_and(|g| snap.gateway(&g.name) == Some(&g));
            if same {
                Ok(None)
            } else {
                Err(what(&format!("gateway {name}")))
            }
        }
        ["peers", org, name] => {
            let (org, name) = peer_key(org, name)?;
            if !put {
                let gone = snap.peers.iter().find(|p| p.org == org && p.name == name);
                return match gone {
                    Some(p) => Ok(Some(Delta::PeerRemoved(p.clone()))),
                    None => Err(what(&format!("unknown peer {org}/{name}"))),
                };
            }
            if !created {
                return Err(what(&format!("peer {org}/{name}")));
            }
            let rec: PeerRecord = decode(kv, "peer")?;
            let o = snap.org(&org);
            let g = snap.gateway(&rec.gateway);
            let (Some(o), Some(g)) = (o, g) else {
                return Err(Unfollowable(format!(
                    "peer {org}/{name} of an unknown org or gateway"
                )));
            };
            let peer = EtcdStore::peer_of(o, name, rec, g, kv.create_revision())?;
            Ok(Some(Delta::PeerAdded(peer)))
        }
        ["instances", org, app, id] => {
            let (org, app, id) = instance_key(org, app, id)?;
            if !put {
                return Ok(Some(Delta::InstanceRemoved(org, app, id)));
            }
            if !created {
                return Err(what(&format!("instance {org}/{app}/{id}")));
            }
            let rec: InstanceRecord = decode(kv, "instance")?;
            Ok(Some(Delta::InstanceAdded(rec.into_instance(org, app, id))))
        }
        _ => Ok(None),
    }
}

/// Parses one `synced/<gateway>` value; a bad one is logged and skipped
/// (another gateway's bug must not stop this one following the store).
pub(super) fn parse_report(gateway: &str, kv: &KeyValue) -> Option<(GatewayName, SyncReport)> {
    let parsed = gateway
        .parse::<GatewayName>()
        .map_err(|e| e.to_string())
        .and_then(|g| Ok((g, decode(kv, "sync report").map_err(|e| e.to_string())?)));
    match parsed {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(gateway, error = %e, "etcd: ignoring a bad sync report");
            None
        }
    }
}

/// The end of the range of keys starting with `prefix`: the prefix with
/// its last byte that can be raised raised, and what follows it dropped.
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the keyspace.
    vec![0]
}

/// Parses a whole-prefix range into a snapshot.
pub(super) fn parse_snapshot(
    keys: &Keys,
    revision: i64,
    kvs: &[KeyValue],
) -> Result<Snapshot, StoreError> {
    let mut orgs = Vec::new();
    let mut gateways = Vec::new();
    let mut peers_raw = Vec::new();
    let mut instances = Vec::new();
    for kv in kvs {
        let Some(parts) = keys.parts(kv.key()) else {
            continue;
        };
        match parts.as_slice() {
            ["orgs", _] => orgs.push(decode::<Org>(kv, "org")?),
            ["gateways", _] => gateways.push(decode::<Gateway>(kv, "gateway")?),
            ["peers", org, name] => {
                let (org, name) = peer_key(org, name)?;
                peers_raw.push((
                    org,
                    name,
                    decode::<PeerRecord>(kv, "peer")?,
                    kv.create_revision(),
                ));
            }
            ["instances", org, app, id] => {
                let (org, app, id) = instance_key(org, app, id)?;
                let rec: InstanceRecord = decode(kv, "instance")?;
                instances.push(rec.into_instance(org, app, id));
            }
            _ => {}
        }
    }
    let org_by: HashMap<&OrgName, &Org> = orgs.iter().map(|o| (&o.name, o)).collect();
    let gw_by: HashMap<&GatewayName, &Gateway> = gateways.iter().map(|g| (&g.name, g)).collect();
    let mut peers = Vec::with_capacity(peers_raw.len());
    for (org, name, rec, revision) in peers_raw {
        let o = org_by
            .get(&org)
            .ok_or_else(|| StoreError::Internal(format!("peer {name} has no org")))?;
        let g = gw_by
            .get(&rec.gateway)
            .ok_or_else(|| StoreError::Internal(format!("peer {name} has no gateway")))?;
        peers.push(EtcdStore::peer_of(o, name, rec, g, revision)?);
    }
    orgs.sort_by(|a, b| a.name.cmp(&b.name));
    gateways.sort_by(|a, b| a.name.cmp(&b.name));
    peers.sort_by(|a, b| (&a.org, &a.name).cmp(&(&b.org, &b.name)));
    instances.sort_by(|a, b| (&a.org, &a.app, &a.id).cmp(&(&b.org, &b.app, &b.id)));
    Ok(Snapshot {
        revision: u64::try_from(revision).unwrap_or(0),
        orgs,
        gateways,
        peers,
        instances,
    })
}
