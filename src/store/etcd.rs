//! The fleet store: an etcd cluster (the `etcd-client` crate) shared by many
//! gateways in many regions.
//!
//! # Key schema
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
//! | `P peers/<org>/<peer>` | [`PeerRecord`] | the peer: gateway, slot, key, time |
//! | `P slots/<org>/<gateway>/<slot>` | peer name | address uniqueness: one key per /120 |
//! | `P keys/<public key, hex>` | `<org>/<peer>` | public-key uniqueness |
//! | `P instances/<org>/<app>/<id>` | [`InstanceRecord`] | an app instance |
//! | `P addrs/<address>` | `<org>/<app>/<id>` | instance-address uniqueness |
//! | `P tokens/<sha256, hex>` | org name | org-scoped API tokens |
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
//! # Invariants and how they hold
//!
//! - Every write is one etcd transaction. Uniqueness keys are created under
//!   a `create_revision == 0` compare (the key must not exist), so two
//!   writers racing for the same name, key, address or slot can't both win,
//!   whatever gateway they run on. Records being replaced or removed are
//!   guarded by `mod_revision ==` what was read.
//! - Writes are optimistic: read, decide, commit with compares; when a
//!   compare fails someone else committed in between, so we read again and
//!   retry (bounded, with jitter). A retry that now finds the name taken
//!   reports [`StoreError::Conflict`]; one that finds the slot taken moves on.
//! - Allocation takes the lowest free slot of (org, gateway). Under
//!   contention a retry picks at random among the lowest few free slots so
//!   that N concurrent creators don't all chase the same one; the holes that
//!   leaves are the lowest free slots for the next creates.
//! - Snapshots follow the watch: a whole read (the ranges a snapshot is
//!   made of, in pages of [`PAGE`] keys so that no response outgrows the
//!   client's message limit, all at the first page's revision), then a
//!   watch from the next revision whose
//!   events update it as [`Delta`]s, kept for [`Store::snapshot_since`] (the
//!   last [`LOG_MAX`]). So a store change costs each gateway the change,
//!   not a read of every key. Events a delta can't express (a gateway's
//!   record changing, which may move its peers' region; an update in
//!   place) and a compacted watch revision mean a whole read again, and a
//!   watch from there. A broken watch reconnects with backoff
//!   ([`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`]) from where it stopped.
//! - A snapshot is never older than the newest write acknowledged before it
//!   was asked for, on any gateway: every write also puts `P written`, and
//!   a snapshot first reads that key (linearizable, one small read), then
//!   waits for the followed snapshot to reach its revision — at once in the
//!   usual case, as the feed that set off the read came from the watch.
//!   If the watch doesn't bring it within [`CATCH_UP`], the snapshot is
//!   read whole (and the follower starts again from that read).
//! - The change feed is bumped after the follower has the change.
//! - Every request is bounded by [`REQUEST_TIMEOUT`]; connection failures
//!   and timeouts are [`StoreError::Unavailable`] (HTTP 503), so the API fails
//!   fast while the daemon keeps its last applied state.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv6Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, Event, EventType, GetOptions, KeyValue, Txn, TxnOp,
    WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::log::DeltaLog;
use super::placement;
use super::{
    Delta, Gateway, Instance, NewInstance, NewPeer, Org, Peer, Revision, Snapshot, Store,
    StoreError, SyncReport, SyncReports,
};
use crate::model::{
    self, AppName, GatewayName, InstanceId, NetworkId, OrgName, PeerName, PeerSlot, ProcessGroup,
    PublicKey, RegionName,
};

/// The bound on every request: past it the store counts as unavailable.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The first wait before re-establishing a broken watch.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait between watch reconnection attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The most keys in one range response of a whole read: at a few hundred
/// bytes a key, well under the client's 4 MiB message limit.
pub const PAGE: i64 = 2000;
/// HTTP/2 ping interval on etcd connections (etcd's minimum is 5 s).
const KEEPALIVE: Duration = Duration::from_secs(10);
/// How many times a write is retried after losing a compare-and-swap race.
const MAX_ATTEMPTS: u32 = 64;
/// The most followed writes kept for [`Store::snapshot_since`].
pub const LOG_MAX: usize = 4096;
/// How long a snapshot waits for the watch to bring the newest write before
/// it reads the prefix whole instead.
pub const CATCH_UP: Duration = Duration::from_millis(500);

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
    fn into_instance(self, org: OrgName, app: AppName, id: InstanceId) -> Instance {
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
fn peer_key(org: &str, name: &str) -> Result<(OrgName, PeerName), StoreError> {
    Ok((
        org.parse().map_err(corrupt("peer key"))?,
        name.parse().map_err(corrupt("peer key"))?,
    ))
}

/// The org, app and id in an `instances/<org>/<app>/<id>` key.
fn instance_key(
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

/// A store in an etcd cluster.
pub struct EtcdStore {
    kv: Client,
    keys: Keys,
    feeds: Feeds,
    watcher: tokio::task::JoinHandle<()>,
    /// Snapshots read whole (not followed), for tests.
    whole_reads: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.keys.prefix)
            .finish()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// Builds the keys of the schema above.
#[derive(Clone, Debug)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self { prefix }
    }
    fn k(&self, rest: impl std::fmt::Display) -> String {
        format!("{}{rest}", self.prefix)
    }
    fn org(&self, org: &OrgName) -> String {
        self.k(format_args!("orgs/{org}"))
    }
    fn netid(&self, id: NetworkId) -> String {
        self.k(format_args!("netids/{:010}", id.get()))
    }
    fn netids(&self) -> String {
        self.k("netids/")
    }
    fn gateway(&self, gw: &GatewayName) -> String {
        self.k(format_args!("gateways/{gw}"))
    }
    fn gateways(&self) -> String {
        self.k("gateways/")
    }
    fn hostid(&self, host: model::HostId) -> String {
        self.k(format_args!("hostids/{:08x}", host.get()))
    }
    fn peer(&self, org: &OrgName, name: &PeerName) -> String {
        self.k(format_args!("peers/{org}/{name}"))
    }
    fn slot(&self, org: &OrgName, gw: &GatewayName, slot: u32) -> String {
        self.k(format_args!("slots/{org}/{gw}/{slot}"))
    }
    fn slots(&self) -> String {
        self.k("slots/")
    }
    fn key(&self, key: &PublicKey) -> String {
        self.k(format_args!("keys/{}", hex(key.as_bytes())))
    }
    fn instance(&self, org: &OrgName, app: &AppName, id: &InstanceId) -> String {
        self.k(format_args!("instances/{org}/{app}/{id}"))
    }
    fn addr(&self, addr: Ipv6Addr) -> String {
        self.k(format_args!("addrs/{addr}"))
    }
    fn token(&self, sha: &[u8; 32]) -> String {
        self.k(format_args!("tokens/{}", hex(sha)))
    }
    fn synced(&self, gw: &GatewayName) -> String {
        self.k(format_args!("synced/{gw}"))
    }
    fn written(&self) -> String {
        self.k("written")
    }
    /// The key relative to the prefix, split on `/`.
    fn parts<'a>(&self, key: &'a [u8]) -> Option<Vec<&'a str>> {
        let key = std::str::from_utf8(key).ok()?;
        Some(key.strip_prefix(&self.prefix)?.split('/').collect())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Maps a client error: the network and the cluster's health are
/// `Unavailable` (retry later, HTTP 503); anything else is a bug or bad data.
fn etcd_err(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match &e {
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) | E::EndpointError(_) => {
            StoreError::Unavailable(format!("etcd: {e}"))
        }
        E::GRpcStatus(s) => match s.code() {
            tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::ResourceExhausted
            | tonic::Code::Aborted => StoreError::Unavailable(format!("etcd: {}", s.message())),
            _ => StoreError::Internal(format!("etcd: {e}")),
        },
        _ => StoreError::Internal(format!("etcd: {e}")),
    }
}

fn corrupt<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> StoreError + '_ {
    move |e| StoreError::Internal(format!("corrupt {what} in etcd: {e}"))
}

fn decode<T: serde::de::DeserializeOwned>(kv: &KeyValue, what: &str) -> Result<T, StoreError> {
    serde_json::from_slice(kv.value()).map_err(corrupt(what))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Internal(format!("encoding: {e}")))
}

fn text(kv: &KeyValue, what: &str) -> Result<String, StoreError> {
    kv.value_str().map(str::to_owned).map_err(corrupt(what))
}

fn not_exists(key: &str) -> Compare {
    Compare::create_revision(key, CompareOp::Equal, 0)
}

fn unchanged(kv: &KeyValue) -> Compare {
    Compare::mod_revision(kv.key(), CompareOp::Equal, kv.mod_revision())
}

fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> TxnOp {
    TxnOp::put(key, value, None)
}

/// Bounds a request by [`REQUEST_TIMEOUT`].
async fn bounded<T>(
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(r) => r.map_err(etcd_err),
        Err(_) => Err(StoreError::Unavailable(format!(
            "etcd did not answer within {REQUEST_TIMEOUT:?}"
        ))),
    }
}

/// Runs a read (safe to repeat) until it succeeds, fails for a reason other
/// than availability, or [`REQUEST_TIMEOUT`] has passed. After an outage
/// the client's balanced channel answers the first request on each
/// endpoint with the stale connect error; one of those must not make a
/// healthy cluster look down.
async fn read_retrying<T, F, Fut>(mut op: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let err = match tokio::time::timeout(left, op()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => etcd_err(e),
            Err(_) => {
                StoreError::Unavailable(format!("etcd did not answer within {REQUEST_TIMEOUT:?}"))
            }
        };
        match err {
            StoreError::Unavailable(_)
                if deadline.saturating_duration_since(tokio::time::Instant::now())
                    > Duration::from_millis(100) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            e => return Err(e),
        }
    }
}

/// Sleeps a little before retrying a lost race, so racers spread out.
async fn jitter(attempt: u32) {
    let ms = rand::random::<u64>() % (u64::from(attempt.min(10)) * 2 + 1);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

fn contention(what: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "{what}: lost {MAX_ATTEMPTS} compare-and-swap races in a row; retry"
    ))
}

/// Raises the feed to `revision` if it is newer.
fn publish(feed: &watch::Sender<Revision>, revision: i64) {
    let revision = u64::try_from(revision).unwrap_or(0);
    feed.send_if_modified(|r| {
        let newer = revision > *r;
        if newer {
            *r = revision;
        }
        newer
    });
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` and starts following changes
    /// under `prefix`. The connection is lazy: an unreachable cluster doesn't
    /// fail here but in the first request, as `Unavailable`.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Invalid(
                "an etcd store needs at least one endpoint".into(),
            ));
        }
        let opts = || {
            ConnectOptions::new()
                .with_connect_timeout(REQUEST_TIMEOUT)
                // etcd answers pings more often than every 5 s
                // (--grpc-keepalive-min-time) with GOAWAY too_many_pings,
                // which kills the watch stream: stay above it.
                .with_keep_alive(KEEPALIVE, REQUEST_TIMEOUT)
        };
        let kv = Client::connect(endpoints, Some(opts().with_timeout(REQUEST_TIMEOUT)))
            .await
            .map_err(etcd_err)?;
        // The watch is a long-lived stream: its client has no request timeout;
        // keep-alive pings detect a dead connection instead.
        let watch_client = Client::connect(endpoints, Some(opts()))
            .await
            .map_err(etcd_err)?;
        let keys = Keys::new(prefix);
        let feeds = Feeds::new();
        let watcher = tokio::spawn(watch_loop(watch_client, keys.clone(), feeds.clone(), 0));
        Ok(Self {
            kv,
            keys,
            feeds,
            watcher,
            whole_reads: Default::default(),
        })
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut resp = read_retrying(|| {
            let mut kv = self.kv.clone();
            async move { kv.get(key, None).await }
        })
        .await?;
        Ok(resp.take_kvs().into_iter().next())
    }

    async fn range(&self, prefix: &str, keys_only: bool) -> Result<Vec<KeyValue>, StoreError> {
        let mut opts = GetOptions::new().with_prefix();
        if keys_only {
            opts = opts.with_keys_only();
        }
        let mut resp = read_retrying(|| {
            let mut kv = self.kv.clone();
            let opts = opts.clone();
            async move { kv.get(prefix, Some(opts)).await }
        })
        .await?;
        Ok(resp.take_kvs())
    }

    /// Commits `ops` if `cmps` hold (with the put of [`Keys::written`]
    /// every write makes); the revision it committed as, if they held.
    async fn commit(
        &self,
        cmps: impl Into<Vec<Compare>>,
        mut ops: Vec<TxnOp>,
    ) -> Result<Option<Revision>, StoreError> {
        ops.push(put(self.keys.written(), ""));
        let txn = Txn::new().when(cmps).and_then(ops);
        let mut kv = self.kv.clone();
        let resp = bounded(kv.txn(txn)).await?;
        if !resp.succeeded() {
            return Ok(None);
        }
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        publish(&self.feeds.revision, revision);
        Ok(Some(u64::try_from(revision).unwrap_or(0)))
    }

    async fn org(&self, org: &OrgName) -> Result<(Org, KeyValue), StoreError> {
        let kv = self
            .get(&self.keys.org(org))
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("org '{org}' not found")))?;
        Ok((decode(&kv, "org")?, kv))
    }

    /// `(gateway, slot)` of every peer, from the slot keys.
    async fn slots(&self) -> Result<Vec<(OrgName, GatewayName, u32)>, StoreError> {
        let kvs = self.range(&self.keys.slots(), true).await?;
        let mut out = Vec::with_capacity(kvs.len());
        for kv in &kvs {
            match self.keys.parts(kv.key()).as_deref() {
                Some(["slots", org, gw, slot]) => out.push((
                    org.parse().map_err(corrupt("slot key"))?,
                    gw.parse().map_err(corrupt("slot key"))?,
                    slot.parse().map_err(corrupt("slot key"))?,
                )),
                _ => return Err(StoreError::Internal("corrupt slot key in etcd".into())),
            }
        }
        Ok(out)
    }

    /// The revision of the newest write (not report) under the prefix, from
    /// [`Keys::written`]: what a snapshot taken now must show. A
    /// linearizable read, so a write acknowledged anywhere is counted.
    async fn last_write(&self) -> Result<i64, StoreError> {
        Ok(self
            .get(&self.keys.written())
            .await?
            .map_or(0, |kv| kv.mod_revision()))
    }

    /// The snapshot (and the writes since `from`): the followed one once it
    /// holds the newest write; read whole if the watch doesn't bring it
    /// within [`CATCH_UP`] (it is down, or the follower lost step).
    async fn snapshot_from(
        &self,
        from: Option<Revision>,
    ) -> Result<(Arc<Snapshot>, Option<Vec<Delta>>), StoreError> {
        let target = self.last_write().await?;
        let mut followed = self.feeds.followed.subscribe();
        if *followed.borrow_and_update() < target {
            let caught_up = followed.wait_for(|r| *r >= target);
            let _ = tokio::time::timeout(CATCH_UP, caught_up).await;
        }
        let cached = {
            let mut f = self.feeds.lock();
            (f.revision >= target)
                .then(|| f.snapshot())
                .flatten()
                .map(|s| (s, from.and_then(|from| f.since(from))))
        };
        let (snap, deltas) = match cached {
            Some(c) => c,
            None => {
                self.whole_reads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let (revision, whole) = read_whole(&self.kv, &self.keys).await?;
                let (snap, _) = whole?;
                self.feeds.lock().install(snap.clone(), revision);
                self.feeds.announce(revision);
                (Arc::new(snap), None)
            }
        };
        publish(
            &self.feeds.revision,
            i64::try_from(snap.revision).unwrap_or(i64::MAX),
        );
        Ok((snap, deltas))
    }

    /// The full peer, from its record and the current org and gateway.
    fn peer_of(
        org: &Org,
        name: PeerName,
        rec: PeerRecord,
        gw: &Gateway,
        revision: i64,
    ) -> Result<Peer, StoreError> {
        let slot = PeerSlot::new(rec.slot).map_err(corrupt("slot"))?;
        Ok(Peer {
            org: org.name.clone(),
            name,
            gateway: gw.name.clone(),
            region: gw.region.clone(),
            slot,
            net: slot.net(org.prefix(), gw.host_id),
            public_key: rec.public_key,
            created_at: rec.created_at,
            revision: u64::try_from(revision).unwrap_or(0),
        })
    }
}

/// What the watch keeps current.
#[derive(Clone)]
struct Feeds {
    /// The change feed (everything but sync reports).
    revision: watch::Sender<Revision>,
    /// The gateways' sync reports.
    reports: watch::Sender<Arc<SyncReports>>,
    /// The snapshot the watch follows.
    follower: Arc<Mutex<Follower>>,
    /// [`Follower::revision`], for readers waiting for it to catch up.
    followed: watch::Sender<i64>,
}

impl Feeds {
    fn new() -> Self {
        Self {
            revision: watch::channel(0).0,
            reports: watch::channel(Arc::default()).0,
            follower: Arc::default(),
            followed: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Follower> {
        // A panic while holding it can only leave a half-applied batch:
        // drop the snapshot, so the next read takes a whole one.
        self.follower.lock().unwrap_or_else(|poisoned| {
            let mut f = poisoned.into_inner();
            f.working = None;
            f.shared = None;
            f
        })
    }

    /// Lets waiting readers know how far the follower got.
    fn announce(&self, revision: i64) {
        self.followed.send_if_modified(|r| {
            let newer = revision > *r;
            if newer {
                *r = revision;
            }
            newer
        });
    }
}

/// The snapshot the watch keeps current, so that a store change costs the
/// change, not a read of the whole prefix (see the module doc). The watch
/// task applies events; readers take [`Follower::snapshot`].
#[derive(Debug)]
struct Follower {
    /// Everything under the prefix as of `revision`; `None` before the
    /// first whole read and after an event it can't follow.
    working: Option<Snapshot>,
    /// `working` as last handed out, while it hasn't changed.
    shared: Option<Arc<Snapshot>>,
    /// Every event under the prefix up to here is in `working`.
    revision: i64,
    /// The revision `working` was read whole at: events up to it are in.
    whole_at: i64,
    /// The writes followed since the whole read: what
    /// [`Store::snapshot_since`] hands out.
    log: DeltaLog,
}

impl Default for Follower {
    fn default() -> Self {
        Self {
            working: None,
            shared: None,
            revision: 0,
            whole_at: 0,
            log: DeltaLog::new(0, LOG_MAX),
        }
    }
}

/// An etcd revision as the store's (they start at 1; never negative).
fn rev(r: i64) -> Revision {
    u64::try_from(r).unwrap_or(0)
}

/// An event the follower can't express as a [`Delta`]: only a whole read
/// brings it back in step.
#[derive(Debug)]
struct Unfollowable(String);

impl From<StoreError> for Unfollowable {
    fn from(e: StoreError) -> Self {
        Self(e.to_string())
    }
}

impl Follower {
    /// Starts over from `snap`, read whole at `revision`, unless what the
    /// follower holds is as new.
    fn install(&mut self, snap: Snapshot, revision: i64) {
        if self.working.is_some() && self.revision >= revision {
            return;
        }
        *self = Follower {
            working: Some(snap),
            shared: None,
            revision,
            whole_at: revision,
            log: DeltaLog::new(rev(revision), LOG_MAX),
        };
    }

    /// The followed snapshot, shared until it next changes.
    fn snapshot(&mut self) -> Option<Arc<Snapshot>> {
        if self.shared.is_none() {
            let mut s = self.working.clone()?;
            s.revision = u64::try_from(self.revision).unwrap_or(0);
            self.shared = Some(Arc::new(s));
        }
        self.shared.clone()
    }

    /// The writes from revision `from` up to [`Follower::revision`], if
    /// the log reaches back that far.
    fn since(&self, from: Revision) -> Option<Vec<Delta>> {
        self.log.since(from, rev(self.revision))
    }

    /// Applies one batch of watch events (sync reports aside). Events the
    /// whole read already held (a reader's, newer than the watch) are
    /// skipped. Returns whether a snapshot's content changed.
    fn follow(&mut self, keys: &Keys, events: &[Event]) -> Result<bool, Unfollowable> {
        // Events passing by with no snapshot to apply them to would leave
        // a gap behind whatever snapshot comes next: read whole instead.
        let Some(working) = self.working.as_mut() else {
            return Err(Unfollowable("no whole read to follow on from".into()));
        };
        let mut changed = false;
        for e in events {
            let Some(kv) = e.kv() else { continue };
            let at = kv.mod_revision();
            if at <= self.whole_at {
                continue;
            }
            if let Some(delta) = delta_of(keys, working, e.event_type(), kv)? {
                working.apply(delta.clone());
                self.log.push(rev(at), delta);
                changed = true;
            }
        }
        if changed {
            self.shared = None;
        }
        Ok(changed)
    }

    /// Moves to `revision`: every event up to it has been applied. A
    /// shared snapshot keeps the revision it was built at: what it holds
    /// hasn't changed since (renumbering it would copy it while readers
    /// hold it, on every sync report).
    fn reach(&mut self, revision: i64) {
        self.revision = self.revision.max(revision);
    }

    fn forget(&mut self) {
        *self = Follower::default();
    }
}

/// What one event does to a snapshot: `None` for keys a snapshot doesn't
/// hold (uniqueness keys, tokens, reports, the write marker).
fn delta_of(
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
fn parse_report(gateway: &str, kv: &KeyValue) -> Option<(GatewayName, SyncReport)> {
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

/// Follows the prefix and bumps the feed on every change, forever.
///
/// `from` is the first revision to watch; 0 means "the current one", which
/// is what a fresh store does (tests start older to meet a compaction).
async fn watch_loop(client: Client, keys: Keys, feeds: Feeds, from: i64) {
    let mut backoff = BACKOFF_MIN;
    // The next revision to watch from; 0 until we've read the current one.
    let mut next: i64 = from;
    loop {
        if next == 0 {
            // A whole read: the snapshot to follow from, and the reports.
            match read_whole(&client, &keys).await {
                Ok((rev, whole)) => {
                    match whole {
                        Ok((snap, reports)) => {
                            super::publish_reports(&feeds.reports, reports);
                            feeds.lock().install(snap, rev);
                        }
                        Err(e) => {
                            // Readers will meet the same error reading
                            // whole; follow on once the data is mended.
                            tracing::warn!(error = %e, "etcd: cannot parse the store");
                            feeds.lock().forget();
                        }
                    }
                    feeds.announce(rev);
                    publish(&feeds.revision, rev);
                    next = rev + 1;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "etcd: cannot read the store whole");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
        }
        let mut wc = client.watch_client();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(next)
            .with_progress_notify();
        let watched =
            tokio::time::timeout(REQUEST_TIMEOUT, wc.watch(keys.prefix.as_str(), Some(opts)))
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|r| r.map_err(|e| e.to_string()));
        let (_watcher, mut stream) = match watched {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "etcd: cannot watch");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    backoff = BACKOFF_MIN;
                    if resp.compact_revision() > 0 {
                        tracing::info!(
                            compacted = resp.compact_revision(),
                            wanted = next,
                            "etcd: watched revision was compacted; reloading"
                        );
                        next = 0;
                        break;
                    }
                    if resp.canceled() {
                        tracing::warn!(reason = resp.cancel_reason(), "etcd: watch canceled");
                        break;
                    }
                    if !follow(&keys, &feeds, resp.events(), &mut next) {
                        next = 0;
                        break;
                    }
                }
                Ok(None) => {
                    tracing::warn!("etcd: watch stream ended; reconnecting");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "etcd: watch failed; reconnecting");
                    break;
                }
            }
        }
        if next != 0 {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// Everything under the prefix in one read, at the revision returned
/// with it: the snapshot and the reports, or why they don't parse.
async fn read_whole(
    client: &Client,
    keys: &Keys,
) -> Result<(i64, Result<(Snapshot, SyncReports), StoreError>), StoreError> {
    read_whole_paged(client, keys, PAGE).await
}

/// [`read_whole`] in pages of `page` keys.
async fn read_whole_paged(
    client: &Client,
    keys: &Keys,
    page: i64,
) -> Result<(i64, Result<(Snapshot, SyncReports), StoreError>), StoreError> {
    // Only what a snapshot and the reports are made of: the uniqueness
    // keys are as many again.
    let ranges = ["orgs/", "gateways/", "peers/", "instances/", "synced/"].map(|r| keys.k(r));
    let mut attempt = 0;
    let (revision, kvs) = loop {
        match read_ranges(client, &ranges, page).await {
            // Compacted past the revision between two pages: start over.
            Err(StoreError::Internal(e)) if e.contains("compacted") && attempt < 3 => {
                attempt += 1;
            }
            r => break r?,
        }
    };
    let whole = parse_snapshot(keys, revision, &kvs).map(|snap| {
        let reports = kvs
            .iter()
            .filter_map(|kv| match keys.parts(kv.key()).as_deref() {
                Some(["synced", gw]) => parse_report(gw, kv),
                _ => None,
            })
            .collect();
        (snap, reports)
    });
    Ok((revision, whole))
}

/// Every key under each of `prefixes`, in pages of `page` keys, all at the
/// revision of the first page (returned with them): a whole read stays
/// consistent and each response small, whatever the store's size.
async fn read_ranges(
    client: &Client,
    prefixes: &[String],
    page: i64,
) -> Result<(i64, Vec<KeyValue>), StoreError> {
    let mut revision = 0;
    let mut kvs = Vec::new();
    for prefix in prefixes {
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(page);
            if revision != 0 {
                opts = opts.with_revision(revision);
            }
            let mut resp = read_retrying(|| {
                let mut kv = client.clone();
                let (from, opts) = (from.clone(), opts.clone());
                async move { kv.get(from, Some(opts)).await }
            })
            .await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            let more = resp.more();
            let batch = resp.take_kvs();
            // The next page starts at the key right after this one's last.
            let next = batch.last().filter(|_| more).map(|last| {
                let mut k = last.key().to_vec();
                k.push(0);
                k
            });
            kvs.extend(batch);
            match next {
                Some(k) => from = k,
                None => break,
            }
        }
    }
    Ok((revision, kvs))
}

/// The end of the range of keys starting with `prefix`: the prefix with
/// its last byte that can be raised raised, and what follows it dropped.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
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

/// Applies one batch of watch events: sync reports go to their feed, the
/// rest to the follower, and any change but a report bumps the change
/// feed; `next` moves past all of them. False: the follower can't follow
/// them and the prefix must be read whole again.
fn follow(keys: &Keys, feeds: &Feeds, events: &[Event], next: &mut i64) -> bool {
    let mut last_change = None;
    let mut reports: Option<SyncReports> = None;
    for e in events {
        let Some(kv) = e.kv() else { continue };
        *next = (*next).max(kv.mod_revision() + 1);
        let parts = keys.parts(kv.key());
        let Some(["synced", gw]) = parts.as_deref() else {
            last_change = last_change.max(Some(kv.mod_revision()));
            continue;
        };
        let reports = reports.get_or_insert_with(|| SyncReports::clone(&feeds.reports.borrow()));
        match e.event_type() {
            EventType::Put => reports.extend(parse_report(gw, kv)),
            EventType::Delete => {
                if let Ok(gw) = gw.parse::<GatewayName>() {
                    reports.remove(&gw);
                }
            }
        }
    }
    if let Some(reports) = reports {
        super::publish_reports(&feeds.reports, reports);
    }
    let mut follower = feeds.lock();
    if let Err(Unfollowable(why)) = follower.follow(keys, events) {
        tracing::info!(
            why,
            "etcd: a change the followed snapshot can't express; reading whole"
        );
        follower.forget();
        return false;
    }
    follower.reach(*next - 1);
    drop(follower);
    // The follower first: a pass the feed sets off finds the change there.
    feeds.announce(*next - 1);
    if let Some(rev) = last_change {
        publish(&feeds.revision, rev);
    }
    true
}

/// Parses a whole-prefix range into a snapshot.
fn parse_snapshot(keys: &Keys, revision: i64, kvs: &[KeyValue]) -> Result<Snapshot, StoreError> {
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

#[async_trait]
impl Store for EtcdStore {
    async fn snapshot(&self) -> Result<Arc<Snapshot>, StoreError> {
        Ok(self.snapshot_from(None).await?.0)
    }

    async fn snapshot_since(
        &self,
        from: Revision,
    ) -> Result<(Arc<Snapshot>, Option<Vec<Delta>>), StoreError> {
        self.snapshot_from(Some(from)).await
    }

    fn subscribe(&self) -> watch::Receiver<Revision> {
        self.feeds.revision.subscribe()
    }

    async fn create_org(&self, name: &OrgName) -> Result<Org, StoreError> {
        let key = self.keys.org(name);
        for attempt in 0..MAX_ATTEMPTS {
            if self.get(&key).await?.is_some() {
                return Err(StoreError::Conflict(format!("org '{name}' already exists")));
            }
            let mut max = 0u32;
            for kv in self.range(&self.keys.netids(), true).await? {
                if let Some(["netids", id]) = self.keys.parts(kv.key()).as_deref() {
                    max = max.max(id.parse().map_err(corrupt("network id key"))?);
                }
            }
            let id = max
                .checked_add(1)
                .and_then(|n| NetworkId::new(n).ok())
                .ok_or_else(|| StoreError::Exhausted("no network id left".into()))?;
            let org = Org {
                name: name.clone(),
                network_id: id,
            };
            let idkey = self.keys.netid(id);
            let cmps = [not_exists(&key), not_exists(&idkey)];
            let ops = vec![put(key.as_str(), encode(&org)?), put(idkey, name.as_str())];
            if self.commit(cmps, ops).await?.is_some() {
                return Ok(org);
            }
            jitter(attempt).await;
        }
        Err(contention("create org"))
    }

    async fn register_gateway(&self, gw: &Gateway) -> Result<(), StoreError> {
        let key = self.keys.gateway(&gw.name);
        let hkey = self.keys.hostid(gw.host_id);
        for attempt in 0..MAX_ATTEMPTS {
            let (old, holder) = futures::try_join!(self.get(&key), self.get(&hkey))?;
            if let Some(h) = &holder {
                let other = text(h, "host id owner")?;
                if other != gw.name.as_str() {
                    return Err(StoreError::Conflict(format!(
                        "host id {} is already used by gateway '{other}'",
                        gw.host_id
                    )));
                }
            }
            let mut cmps = vec![match &old {
                Some(kv) => unchanged(kv),
                None => not_exists(&key),
            }];
            cmps.push(match &holder {
                Some(kv) => unchanged(kv),
                None => not_exists(&hkey),
            });
            let mut ops = vec![put(key.as_str(), encode(gw)?)];
            if let Some(old) = &old {
                let old: Gateway = decode(old, "gateway")?;
                if old.host_id != gw.host_id {
                    let peers = self
                        .slots()
                        .await?
                        .iter()
                        .filter(|(_, g, _)| g == &gw.name)
                        .count();
                    if peers > 0 {
                        return Err(StoreError::Conflict(format!(
                            "gateway '{}' holds {peers} peers addressed with its old host id; \
                             it can't change to {}",
                            gw.name, gw.host_id
                        )));
                    }
                    ops.push(TxnOp::delete(self.keys.hostid(old.host_id), None));
                }
            }
            if holder.is_none() {
                ops.push(put(hkey.as_str(), gw.name.as_str()));
            }
            if self.commit(cmps, ops).await?.is_some() {
                return Ok(());
            }
            jitter(attempt).await;
        }
        Err(contention("register gateway"))
    }

    async fn create_peer(&self, req: &NewPeer) -> Result<(Peer, Gateway), StoreError> {
        let pkey = self.keys.peer(&req.org, &req.name);
        let kkey = self.keys.key(&req.public_key);
        let gwkey = self.keys.gateways();
        for attempt in 0..MAX_ATTEMPTS {
            let (org, existing, key_used, gws, slots) = futures::try_join!(
                self.org(&req.org),
                self.get(&pkey),
                self.get(&kkey),
                self.range(&gwkey, false),
                self.slots(),
            )?;
            let (org, _) = org;
            if existing.is_some() {
                return Err(StoreError::Conflict(format!(
                    "peer '{}' already exists in org '{}'",
                    req.name, req.org
                )));
            }
            if key_used.is_some() {
                return Err(StoreError::Conflict(
                    "that public key is already registered for another peer".into(),
                ));
            }
            // The least-loaded gateway of the region, by peer count, then name.
            let mut load: HashMap<&GatewayName, usize> = HashMap::new();
            for (_, g, _) in &slots {
                *load.entry(g).or_default() += 1;
            }
            let mut region = Vec::new();
            for kv in &gws {
                let g: Gateway = decode(kv, "gateway")?;
                if g.region == req.region {
                    region.push((g, kv));
                }
            }
            let (gateway, gw_kv) = placement::least_loaded(region.iter().map(|(g, kv)| {
                (
                    &g.name,
                    load.get(&g.name).copied().unwrap_or(0),
                    (g.clone(), *kv),
                )
            }))
            .ok_or_else(|| {
                StoreError::NotFound(format!("no gateway in region '{}'", req.region))
            })?;
            let used: BTreeSet<u32> = slots
                .iter()
                .filter(|(o, g, _)| o == &req.org && g == &gateway.name)
                .map(|(_, _, s)| *s)
                .collect();
            let slot = placement::pick_slot(&used, attempt, rand::random()).ok_or_else(|| {
                StoreError::Exhausted(format!(
                    "gateway '{}' has no free peer address left in this org ({} in use)",
                    gateway.name,
                    PeerSlot::COUNT
                ))
            })?;
            let rec = PeerRecord {
                gateway: gateway.name.clone(),
                slot,
                public_key: req.public_key,
                created_at: now_secs(),
            };
            let skey = self.keys.slot(&req.org, &gateway.name, slot);
            let cmps = [
                not_exists(&pkey),
                not_exists(&kkey),
                not_exists(&skey),
                // The host id in the address is the one we read.
                unchanged(gw_kv),
            ];
            let ops = vec![
                put(pkey.as_str(), encode(&rec)?),
                put(skey, req.name.as_str()),
                put(kkey.as_str(), format!("{}/{}", req.org, req.name)),
            ];
            if let Some(revision) = self.commit(cmps, ops).await? {
                let revision = i64::try_from(revision).unwrap_or(i64::MAX);
                let peer = Self::peer_of(&org, req.name.clone(), rec, &gateway, revision)?;
                return Ok((peer, gateway));
            }
            jitter(attempt).await;
        }
        Err(contention("create peer"))
    }

    async fn remove_peer(&self, org: &OrgName, name: &PeerName) -> Result<Peer, StoreError> {
        let pkey = self.keys.peer(org, name);
        for attempt in 0..MAX_ATTEMPTS {
            let (o, _) = self.org(org).await?;
            let kv = self.get(&pkey).await?.ok_or_else(|| {
                StoreError::NotFound(format!("peer '{name}' not found in org '{org}'"))
            })?;
            let rec: PeerRecord = decode(&kv, "peer")?;
            let gw_kv = self
                .get(&self.keys.gateway(&rec.gateway))
                .await?
                .ok_or_else(|| StoreError::Internal(format!("peer {name} has no gateway")))?;
            let gw: Gateway = decode(&gw_kv, "gateway")?;
            let ops = vec![
                TxnOp::delete(pkey.as_str(), None),
                TxnOp::delete(self.keys.slot(org, &rec.gateway, rec.slot), None),
                TxnOp::delete(self.keys.key(&rec.public_key), None),
            ];
            if self.commit([unchanged(&kv)], ops).await?.is_some() {
                return Self::peer_of(&o, name.clone(), rec, &gw, kv.create_revision());
            }
            jitter(attempt).await;
        }
        Err(contention("remove peer"))
    }

    async fn add_instance(&self, req: &NewInstance) -> Result<Instance, StoreError> {
        let (org, org_kv) = self.org(&req.org).await?;
        let prefix = org.prefix();
        let (address, id) = req.resolve(prefix)?;
        let ikey = self.keys.instance(&req.org, &req.app, &id);
        let akey = self.keys.addr(address);
        for attempt in 0..MAX_ATTEMPTS {
            let (taken, exists) = futures::try_join!(self.get(&akey), self.get(&ikey))?;
            if let Some(t) = taken {
                return Err(StoreError::Conflict(format!(
                    "address {address} is already used by instance {}",
                    text(&t, "address owner")?
                )));
            }
            if exists.is_some() {
                return Err(StoreError::Conflict(format!(
                    "instance '{id}' of app '{}' already exists",
                    req.app
                )));
            }
            let rec = InstanceRecord {
                region: req.region.clone(),
                address,
                process_group: req.process_group.clone(),
                started: req.started,
            };
            let cmps = [not_exists(&ikey), not_exists(&akey), unchanged(&org_kv)];
            let ops = vec![
                put(ikey.as_str(), encode(&rec)?),
                put(akey.as_str(), format!("{}/{}/{id}", req.org, req.app)),
            ];
            if self.commit(cmps, ops).await?.is_some() {
                return Ok(rec.into_instance(req.org.clone(), req.app.clone(), id));
            }
            jitter(attempt).await;
        }
        Err(contention("add instance"))
    }

    async fn remove_instance(
        &self,
        org: &OrgName,
        app: &AppName,
        id: &InstanceId,
    ) -> Result<Instance, StoreError> {
        self.org(org).await?;
        let ikey = self.keys.instance(org, app, id);
        for attempt in 0..MAX_ATTEMPTS {
            let kv = self.get(&ikey).await?.ok_or_else(|| {
                StoreError::NotFound(format!("instance '{id}' of app '{app}' not found"))
            })?;
            let rec: InstanceRecord = decode(&kv, "instance")?;
            let ops = vec![
                TxnOp::delete(ikey.as_str(), None),
                TxnOp::delete(self.keys.addr(rec.address), None),
            ];
            if self.commit([unchanged(&kv)], ops).await?.is_some() {
                return Ok(rec.into_instance(org.clone(), app.clone(), id.clone()));
            }
            jitter(attempt).await;
        }
        Err(contention("remove instance"))
    }

    async fn add_org_token(&self, org: &OrgName, sha: [u8; 32]) -> Result<(), StoreError> {
        let (_, org_kv) = self.org(org).await?;
        let tkey = self.keys.token(&sha);
        let cmps = [not_exists(&tkey), unchanged(&org_kv)];
        let ops = vec![put(tkey.as_str(), org.as_str())];
        if self.commit(cmps, ops).await?.is_some() {
            Ok(())
        } else {
            Err(StoreError::Conflict(
                "that token is already registered".into(),
            ))
        }
    }

    async fn token_org(&self, sha: [u8; 32]) -> Result<Option<OrgName>, StoreError> {
        self.get(&self.keys.token(&sha))
            .await?
            .map(|kv| text(&kv, "token org")?.parse().map_err(corrupt("org name")))
            .transpose()
    }

    async fn report_sync(
        &self,
        gateway: &GatewayName,
        report: &SyncReport,
    ) -> Result<(), StoreError> {
        let mut kv = self.kv.clone();
        // A plain put, not `commit`: reports don't move the change feed.
        bounded(kv.put(self.keys.synced(gateway), encode(report)?, None)).await?;
        let mut reports = SyncReports::clone(&self.feeds.reports.borrow());
        reports.insert(gateway.clone(), report.clone());
        super::publish_reports(&self.feeds.reports, reports);
        Ok(())
    }

    fn sync_reports(&self) -> watch::Receiver<Arc<SyncReports>> {
        self.feeds.reports.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{self as suite, gateway, new_peer};
    use crate::store::InstanceAddress;
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::Ordering;
    use std::time::Instant;

    /// A single-member etcd on loopback with a temp data dir and free ports;
    /// killed on drop.
    struct TestEtcd {
        child: Option<Child>,
        dir: tempfile::TempDir,
        client: u16,
        peer: u16,
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    use crate::testkit::in_ci;

    fn etcd_binary() -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
    }

    impl TestEtcd {
        /// Starts one, or returns `None` after a loud SKIPPED line when the
        /// `etcd` binary is missing (a failure under CI).
        async fn start(test: &str) -> Option<Self> {
            if etcd_binary().is_none() {
                assert!(
                    !in_ci(),
                    "{test}: `etcd` is not installed (apt etcd-server) and CI is set"
                );
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "\n****\nSKIPPED {test}: `etcd` not found (apt-get install etcd-server)\n****"
                );
                return None;
            }
            let mut e = Self {
                child: None,
                dir: tempfile::tempdir().unwrap(),
                client: free_port(),
                peer: free_port(),
            };
            e.spawn().await;
            Some(e)
        }

        fn url(&self) -> String {
            format!("http://127.0.0.1:{}", self.client)
        }

        async fn spawn(&mut self) {
            let (c, p) = (self.client, self.peer);
            let log = std::fs::File::create(self.dir.path().join("etcd.log")).unwrap();
            let child = Command::new("etcd")
                .args(["--name", "t", "--data-dir"])
                .arg(self.dir.path().join("data"))
                .args([
                    &format!("--listen-client-urls=http://127.0.0.1:{c}"),
                    &format!("--advertise-client-urls=http://127.0.0.1:{c}"),
                    &format!("--listen-peer-urls=http://127.0.0.1:{p}"),
                    &format!("--initial-advertise-peer-urls=http://127.0.0.1:{p}"),
                    &format!("--initial-cluster=t=http://127.0.0.1:{p}"),
                ])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start etcd");
            self.child = Some(child);
            let client = Client::connect([self.url()], None).await.unwrap();
            let t0 = Instant::now();
            loop {
                let mut kv = client.kv_client();
                if tokio::time::timeout(Duration::from_secs(1), kv.get("x", None))
                    .await
                    .is_ok_and(|r| r.is_ok())
                {
                    return;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "etcd did not come up: {}",
                    std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }

        fn stop(&mut self) {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }

        async fn store(&self) -> EtcdStore {
            EtcdStore::connect(&[self.url()], "/sixpn/").await.unwrap()
        }
    }

    impl Drop for TestEtcd {
        fn drop(&mut self) {
            self.stop();
        }
    }

    macro_rules! etcd_or_skip {
        ($test:expr) => {
            match TestEtcd::start($test).await {
                Some(e) => e,
                None => return,
            }
        };
    }

    async fn with_gateway(etcd: &TestEtcd) -> EtcdStore {
        let store = etcd.store().await;
        store
            .register_gateway(&suite::first_gateway())
            .await
            .unwrap();
        store
    }

    /// Runs a check of the shared suite on a fresh loopback etcd.
    macro_rules! suite_test {
        ($name:ident) => {
            #[tokio::test]
            async fn $name() {
                let etcd = etcd_or_skip!(concat!("etcd::", stringify!($name)));
                let store = with_gateway(&etcd).await;
                suite::$name(&store).await;
            }
        };
    }

    suite_test!(peers_get_distinct_addresses_and_reuse_freed_slots);
    suite_test!(bad_writes_change_nothing);
    suite_test!(instances_and_tokens);
    suite_test!(gateway_host_ids_are_unique_and_stable);

    #[tokio::test]
    async fn concurrent_creates_from_two_clients_never_collide() {
        let etcd = etcd_or_skip!("etcd::concurrent_creates_from_two_clients_never_collide");
        let a = Arc::new(with_gateway(&etcd).await);
        let b = Arc::new(etcd.store().await);
        suite::concurrent_creates_never_collide(a, b).await;
    }

    #[tokio::test]
    async fn change_feed_sees_writes_from_another_client() {
        let etcd = etcd_or_skip!("etcd::change_feed_sees_writes_from_another_client");
        let a = with_gateway(&etcd).await;
        let b = etcd.store().await;
        suite::change_feed_sees_writes_through_another_handle(&a, &b).await;
    }

    #[tokio::test]
    async fn sync_reports_reach_another_client_and_move_no_revision() {
        let etcd = etcd_or_skip!("etcd::sync_reports_reach_another_client_and_move_no_revision");
        let a = with_gateway(&etcd).await;
        let b = etcd.store().await;
        let gw: GatewayName = "lhr-1".parse().unwrap();
        suite::sync_reports(&a, &b, &gw).await;
        // A new client starts from the reports in the cluster.
        let c = etcd.store().await;
        let mut reports = c.sync_reports();
        tokio::time::timeout(
            Duration::from_secs(5),
            reports.wait_for(|r| r.contains_key(&gw)),
        )
        .await
        .expect("a new client loads the reports")
        .unwrap();
    }

    #[tokio::test]
    async fn a_compacted_watch_reloads_and_follows_on() {
        let etcd = etcd_or_skip!("etcd::a_compacted_watch_reloads_and_follows_on");
        let store = with_gateway(&etcd).await;
        for i in 0..5 {
            store
                .create_org(&format!("c{i}").parse().unwrap())
                .await
                .unwrap();
        }
        let rev = store.snapshot().await.unwrap().revision as i64;
        let mut kv = store.kv.clone();
        kv.compact(rev, None).await.unwrap();
        // A watcher that last saw revision 1: its next revision is compacted.
        let feeds = Feeds::new();
        let mut rx = feeds.revision.subscribe();
        let client = Client::connect([etcd.url()], None).await.unwrap();
        let task = tokio::spawn(watch_loop(client, store.keys.clone(), feeds.clone(), 2));
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|r| *r as i64 >= rev))
            .await
            .expect("reloaded to the compacted revision")
            .unwrap();
        store.create_org(&"after".parse().unwrap()).await.unwrap();
        tokio::time::timeout(Duration::from_millis(500), rx.wait_for(|r| *r as i64 > rev))
            .await
            .expect("follows on after the reload")
            .unwrap();
        // The snapshot it follows has everything, the write after included.
        let followed = feeds.lock().snapshot().expect("a followed snapshot");
        let names: Vec<&str> = followed.orgs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["after", "c0", "c1", "c2", "c3", "c4"]);
        task.abort();
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/sixpn/peers/"), b"/sixpn/peers0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), [0]);
    }

    /// A snapshot's content, without the revision it was taken at.
    fn content(s: &Snapshot) -> Snapshot {
        Snapshot {
            revision: 0,
            ..s.clone()
        }
    }

    /// Random writes through two clients; after each, both clients'
    /// snapshots match a whole read (so one client sees the other's
    /// acknowledged write at once), and the writes handed out since the
    /// previous snapshot lead from it to the new one.
    #[tokio::test]
    async fn followed_snapshots_match_whole_reads() {
        use rand::Rng;
        let etcd = etcd_or_skip!("etcd::followed_snapshots_match_whole_reads");
        let a = with_gateway(&etcd).await;
        let b = etcd.store().await;
        b.register_gateway(&gateway("iad-1", "iad", "a7b:1"))
            .await
            .unwrap();
        let stores = [&a, &b];
        let mut prev = [a.snapshot().await.unwrap(), b.snapshot().await.unwrap()];
        let whole_before = [&a, &b].map(|s| s.whole_reads.load(Ordering::Relaxed));
        let mut rng = rand::thread_rng();
        let (mut followed, mut writes, mut gateways) = (0, 0, 0);
        for i in 0..200 {
            let writer = rng.gen_range(0..2);
            let w = stores[writer];
            let snap = w.snapshot().await.unwrap();
            let org = |rng: &mut rand::rngs::ThreadRng| -> Option<OrgName> {
                let n = snap.orgs.len();
                (n > 0).then(|| snap.orgs[rng.gen_range(0..n)].name.clone())
            };
            match rng.gen_range(0..100) {
                0..10 => {
                    w.create_org(&format!("o{i}").parse().unwrap())
                        .await
                        .unwrap();
                }
                10..45 => {
                    let Some(o) = org(&mut rng) else { continue };
                    let mut req = new_peer(o.as_str(), &format!("p{i}"));
                    if rng.gen_bool(0.5) {
                        req.region = "iad".parse().unwrap();
                    }
                    w.create_peer(&req).await.unwrap();
                }
                45..60 => {
                    let n = snap.peers.len();
                    if n == 0 {
                        continue;
                    }
                    let p = &snap.peers[rng.gen_range(0..n)];
                    w.remove_peer(&p.org, &p.name).await.unwrap();
                }
                60..80 => {
                    let Some(o) = org(&mut rng) else { continue };
                    let prefix = snap.org(&o).unwrap().prefix();
                    let address = crate::model::instance_addr(
                        prefix,
                        "a7b:d6b".parse().unwrap(),
                        crate::model::MachineId::from_u32(rng.gen_range(1..u32::MAX)),
                    );
                    let req = NewInstance {
                        org: o,
                        app: ["api", "web"][rng.gen_range(0..2)].parse().unwrap(),
                        id: None,
                        region: "lhr".parse().unwrap(),
                        address: InstanceAddress::Address(address),
                        process_group: None,
                        started: true,
                    };
                    w.add_instance(&req).await.unwrap();
                }
                80..90 => {
                    let n = snap.instances.len();
                    if n == 0 {
                        continue;
                    }
                    let x = &snap.instances[rng.gen_range(0..n)];
                    w.remove_instance(&x.org, &x.app, &x.id).await.unwrap();
                }
                90..95 => {
                    let Some(o) = org(&mut rng) else { continue };
                    w.add_org_token(&o, rand::random()).await.unwrap();
                }
                95..98 => {
                    // A restart registers again: no change.
                    w.register_gateway(snap.gateways.first().unwrap())
                        .await
                        .unwrap();
                }
                _ => {
                    // A new gateway: read whole.
                    gateways += 1;
                    let g = gateway(&format!("fra-{i}"), "fra", &format!("a7b:{:x}", 100 + i));
                    w.register_gateway(&g).await.unwrap();
                }
            }
            writes += 1;
            // The other client first: right after the write was answered.
            for j in [1 - writer, writer] {
                let (r, prev) = (stores[j], &mut prev[j]);
                let (now, deltas) = r.snapshot_since(prev.revision).await.unwrap();
                // In pages of 3 keys: pages end anywhere in a range.
                let (_, whole) = read_whole_paged(&r.kv, &r.keys, 3).await.unwrap();
                let (whole, _) = whole.unwrap();
                assert_eq!(content(&now), content(&whole), "after write {i}");
                assert!(now.revision >= prev.revision);
                if let Some(deltas) = deltas {
                    let mut led = Snapshot::clone(prev);
                    for d in deltas {
                        led.apply(d);
                    }
                    assert_eq!(content(&led), content(&now), "deltas after write {i}");
                    followed += 1;
                }
                *prev = now;
            }
        }
        let whole = [&a, &b].map(|s| s.whole_reads.load(Ordering::Relaxed));
        eprintln!(
            "{writes} writes: {followed} of {} snapshots followed; whole reads {:?} → {whole:?} \
             ({gateways} new gateways)",
            2 * writes,
            whole_before
        );
        assert!(followed >= 2 * (writes - 2 * gateways) - 4, "{followed}");
        for (w, before) in whole.iter().zip(whole_before) {
            assert!(*w - before <= 2 * gateways + 1, "{w} whole reads");
        }
    }

    /// Fills the store through `a` with `orgs` orgs of `per_org` peers (on
    /// lhr-1) and as many instances each: plain puts of the records and
    /// keys the writes would make, 100 to a transaction.
    async fn fill(a: &EtcdStore, orgs: u32, per_org: u32) {
        let mut kv = a.kv.clone();
        let gw: GatewayName = "lhr-1".parse().unwrap();
        let mut ops = Vec::new();
        for o in 0..orgs {
            let org: OrgName = format!("o{o}").parse().unwrap();
            let rec = Org {
                name: org.clone(),
                network_id: NetworkId::new(o + 1).unwrap(),
            };
            ops.push(put(a.keys.org(&org), encode(&rec).unwrap()));
            for i in 0..per_org {
                let name: PeerName = format!("p{i}").parse().unwrap();
                let rec = PeerRecord {
                    gateway: gw.clone(),
                    slot: i,
                    public_key: crate::model::PrivateKey::generate().public_key(),
                    created_at: 0,
                };
                ops.push(put(a.keys.peer(&org, &name), encode(&rec).unwrap()));
                ops.push(put(a.keys.slot(&org, &gw, i), name.as_str()));
                ops.push(put(a.keys.key(&rec.public_key), format!("{org}/{name}")));
                let address = crate::model::instance_addr(
                    rec_prefix(NetworkId::new(o + 1).unwrap()),
                    "a7b:d6b".parse().unwrap(),
                    crate::model::MachineId::from_u32(i + 1),
                );
                let inst = InstanceRecord {
                    region: "lhr".parse().unwrap(),
                    address,
                    process_group: None,
                    started: true,
                };
                let id = format!("{:x}", i + 1);
                ops.push(put(
                    a.keys
                        .instance(&org, &"api".parse().unwrap(), &id.parse().unwrap()),
                    encode(&inst).unwrap(),
                ));
                // The other keys real writes make, for a whole read's size.
                ops.push(put(a.keys.addr(address), format!("{org}/api/{id}")));
                if ops.len() >= 100 {
                    kv.txn(Txn::new().and_then(std::mem::take(&mut ops)))
                        .await
                        .unwrap();
                }
            }
        }
        if !ops.is_empty() {
            kv.txn(Txn::new().and_then(ops)).await.unwrap();
        }
    }

    /// A store bigger than one response the client takes (4 MiB) still
    /// loads: a whole read takes only the ranges a snapshot is made of, in
    /// pages (which `followed_snapshots_match_whole_reads` pages finely).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_store_bigger_than_one_response_loads() {
        let etcd = etcd_or_skip!("etcd::a_store_bigger_than_one_response_loads");
        let a = with_gateway(&etcd).await;
        fill(&a, 100, 100).await;
        let mut kv = a.kv.clone();
        let one = kv
            .get(
                a.keys.prefix.as_str(),
                Some(GetOptions::new().with_prefix()),
            )
            .await;
        assert!(one.is_err(), "the store should outgrow one response");
        let b = etcd.store().await;
        let snap = b.snapshot().await.unwrap();
        assert_eq!((snap.peers.len(), snap.instances.len()), (10_000, 10_000));
        a.create_org(&"after".parse().unwrap()).await.unwrap();
        let (snap, deltas) = b.snapshot_since(snap.revision).await.unwrap();
        assert_eq!(deltas.map(|d| d.len()), Some(1));
        assert_eq!(snap.orgs.len(), 101);
    }

    /// The cost of one peer create in an empty store and at 10,000 peers
    /// (allocation reads every slot key): `cargo test --release --lib
    /// bench_create_at_10k -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "benchmark"]
    async fn bench_create_at_10k() {
        let etcd = etcd_or_skip!("etcd::bench_create_at_10k");
        let a = with_gateway(&etcd).await;
        let mut at = Vec::new();
        for (label, fill_orgs) in [("empty", 0), ("10k peers", 100)] {
            fill(&a, fill_orgs, 100).await;
            let org = format!("b{fill_orgs}");
            a.create_org(&org.parse().unwrap()).await.unwrap();
            let mut t = Vec::new();
            for i in 0..100 {
                let t0 = Instant::now();
                a.create_peer(&new_peer(&org, &format!("p{i}")))
                    .await
                    .unwrap();
                t.push(t0.elapsed());
            }
            t.sort();
            at.push(format!("{label}: p50 {:?} p99 {:?}", t[50], t[99]));
        }
        eprintln!("etcd create_peer, 100 creates: {}", at.join("; "));
    }

    /// The cost of a snapshot after one write by another client, followed
    /// against read whole, in a store of 10,000 peers and 10,000
    /// instances in 100 orgs: `cargo test --release --lib
    /// bench_snapshot_after_one_write -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "benchmark"]
    async fn bench_snapshot_after_one_write() {
        let etcd = etcd_or_skip!("etcd::bench_snapshot_after_one_write");
        let a = with_gateway(&etcd).await;
        let b = etcd.store().await;
        fill(&a, 100, 100).await;
        let mut prev = b.snapshot().await.unwrap();
        assert_eq!((prev.peers.len(), prev.instances.len()), (10_000, 10_000));
        let n = 200;
        let (mut followed, mut whole) = (Vec::new(), Vec::new());
        for i in 0..n {
            a.create_org(&format!("n{i}").parse().unwrap())
                .await
                .unwrap();
            let t0 = Instant::now();
            let (snap, deltas) = b.snapshot_since(prev.revision).await.unwrap();
            followed.push(t0.elapsed());
            assert!(deltas.is_some());
            let t0 = Instant::now();
            let (_, w) = read_whole(&b.kv, &b.keys).await.unwrap();
            whole.push(t0.elapsed());
            assert_eq!(w.unwrap().0.orgs.len(), snap.orgs.len());
            prev = snap;
        }
        followed.sort();
        whole.sort();
        let p = |v: &[Duration], q: usize| v[(v.len() - 1) * q / 100];
        eprintln!(
            "etcd snapshot after one write, 10k peers + 10k instances, {n} writes: \
             followed p50 {:?} p99 {:?}; read whole p50 {:?} p99 {:?}; ratio p50 {:.3}",
            p(&followed, 50),
            p(&followed, 99),
            p(&whole, 50),
            p(&whole, 99),
            p(&followed, 50).as_secs_f64() / p(&whole, 50).as_secs_f64()
        );
    }

    fn rec_prefix(id: NetworkId) -> crate::model::OrgPrefix {
        Org {
            name: "x".parse().unwrap(),
            network_id: id,
        }
        .prefix()
    }

    /// With the watch stalled, a snapshot still shows a write another
    /// client had answered: it waits for the watch, then reads whole, and
    /// follows on from that read.
    #[tokio::test]
    async fn a_stalled_watch_never_serves_an_older_snapshot() {
        let etcd = etcd_or_skip!("etcd::a_stalled_watch_never_serves_an_older_snapshot");
        let a = with_gateway(&etcd).await;
        let b = etcd.store().await;
        assert!(b.snapshot().await.unwrap().orgs.is_empty());
        b.watcher.abort();
        a.create_org(&"late".parse().unwrap()).await.unwrap();
        let whole = b.whole_reads.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let snap = b.snapshot().await.unwrap();
        assert!(
            snap.org(&"late".parse().unwrap()).is_some(),
            "a stale snapshot"
        );
        assert!(t0.elapsed() >= CATCH_UP, "{:?}", t0.elapsed());
        assert_eq!(b.whole_reads.load(Ordering::Relaxed), whole + 1);
        // No write since: served from that read, without waiting.
        let t1 = Instant::now();
        assert_eq!(b.snapshot().await.unwrap().orgs.len(), 1);
        assert!(t1.elapsed() < CATCH_UP / 2, "{:?}", t1.elapsed());
        assert_eq!(b.whole_reads.load(Ordering::Relaxed), whole + 1);
    }

    /// Writes of others under another prefix in the same cluster move the
    /// revision but not our keys: snapshots stay followed and don't wait.
    #[tokio::test]
    async fn writes_outside_the_prefix_cost_no_whole_read() {
        let etcd = etcd_or_skip!("etcd::writes_outside_the_prefix_cost_no_whole_read");
        let store = with_gateway(&etcd).await;
        store.create_org(&"mine".parse().unwrap()).await.unwrap();
        store.snapshot().await.unwrap();
        let whole = store.whole_reads.load(Ordering::Relaxed);
        let mut kv = store.kv.clone();
        for i in 0..20 {
            kv.put(format!("/other/{i}"), "x", None).await.unwrap();
            let t0 = Instant::now();
            let snap = store.snapshot().await.unwrap();
            assert!(t0.elapsed() < CATCH_UP / 2, "waited {:?}", t0.elapsed());
            assert_eq!(snap.orgs.len(), 1);
        }
        assert_eq!(store.whole_reads.load(Ordering::Relaxed), whole);
    }

    #[tokio::test]
    async fn outage_is_unavailable_fast_and_the_feed_reconnects() {
        let mut etcd = etcd_or_skip!("etcd::outage_is_unavailable_fast_and_the_feed_reconnects");
        let a = with_gateway(&etcd).await;
        let b = etcd.store().await;
        let mut feed = b.subscribe();
        tokio::time::timeout(Duration::from_secs(5), feed.wait_for(|r| *r > 0))
            .await
            .unwrap()
            .unwrap();
        etcd.stop();
        let t0 = Instant::now();
        let e = a.create_org(&"down".parse().unwrap()).await.unwrap_err();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
        let e = a.snapshot().await.unwrap_err();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        etcd.spawn().await;
        let before = *feed.borrow_and_update();
        // The writer's client reconnects on its own; the first request may
        // still find the old connection broken.
        let t0 = Instant::now();
        loop {
            match a.create_org(&"back".parse().unwrap()).await {
                Ok(_) => break,
                Err(StoreError::Unavailable(_)) if t0.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
        tokio::time::timeout(Duration::from_secs(10), feed.wait_for(|r| *r > before))
            .await
            .expect("the feed follows again after the outage")
            .unwrap();
    }
}
