//! The fleet store: an etcd cluster (the `etcd-client` crate) shared by many
//! gateways in many regions.
//!
//! The key schema is documented with its records in `schema.rs`.
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
    Certificate, Client, Compare, CompareOp, ConnectOptions, Event, EventType, GetOptions,
    Identity, KeyValue, TlsOptions, Txn, TxnOp, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::log::DeltaLog;
use super::placement;
use super::{
    Delta, Gateway, Instance, NewInstance, NewOrgToken, NewPeer, Org, OrgTokenRecord, Peer,
    Revision, Snapshot, Store, StoreError, SyncReport, SyncReports,
};
use crate::model::{
    self, AppName, GatewayName, InstanceId, NetworkId, OrgName, PeerName, PeerSlot, ProcessGroup,
    PublicKey, RegionName, TokenId,
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

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Maps a client error: the network and the cluster's health are
/// `Unavailable` (retry later, HTTP 503); anything else is a bug or bad data.
fn etcd_err(e: etcd_client::Error) -> StoreError {
    etcd_err_ref(&e)
}

fn etcd_err_ref(e: &etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match e {
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) | E::EndpointError(_) => {
            StoreError::Unavailable(format!("etcd: {}", chain(e)))
        }
        E::GRpcStatus(s) => match s.code() {
            tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::ResourceExhausted
            // The status's sources say why (a TLS alert, a refused
            // connection); its message alone often doesn't.
            | tonic::Code::Aborted => StoreError::Unavailable(format!(
                "etcd: {}",
                chain_from(s.message().to_owned(), std::error::Error::source(s))
            )),
            _ => StoreError::Internal(format!("etcd: {e}")),
        },
        _ => StoreError::Internal(format!("etcd: {e}")),
    }
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

/// How to reach a cluster beyond its endpoints: TLS and etcd's own auth.
/// The secrets are the files' contents; `Debug` never shows them.
#[derive(Clone, Default)]
pub struct EtcdAccess {
    /// PEM of the CA that signed the members' certificates (`https://`).
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate and key, for `--client-cert-auth` clusters.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// etcd user name and password (RBAC).
    pub user: Option<(String, String)>,
    /// The name the members' certificates are checked against, when it
    /// isn't the endpoints' host (see [`tls_domain`]).
    pub server_name: Option<String>,
}

/// The name to verify the members' certificates against. The gRPC stack
/// takes one name for all endpoints and can't use a bracketed IPv6 literal
/// (`[fd53::1]`) as one: so the configured name, else the endpoints' one
/// shared host (brackets off), else none when every host is a DNS name
/// (each is checked against its own); IPv6 literals that differ need the
/// name configured.
pub fn tls_domain(
    endpoints: &[String],
    configured: Option<&str>,
) -> Result<Option<String>, StoreError> {
    if let Some(name) = configured {
        return Ok(Some(name.to_owned()));
    }
    let hosts: Vec<&str> = endpoints
        .iter()
        .map(|e| {
            let rest = e.split_once("://").map_or(e.as_str(), |(_, r)| r);
            let authority = rest.split('/').next().unwrap_or(rest);
            match authority.strip_prefix('[') {
                Some(v6) => v6.split(']').next().unwrap_or(v6),
                None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
            }
        })
        .collect();
    match hosts.as_slice() {
        [first, rest @ ..] if rest.iter().all(|h| h == first) => Ok(Some((*first).to_owned())),
        _ if hosts.iter().any(|h| h.contains(':')) => Err(StoreError::Invalid(
            "etcd over TLS at IPv6 addresses that differ: set store.tls_server_name to a name \
             every member's certificate carries"
                .into(),
        )),
        _ => Ok(None),
    }
}

impl std::fmt::Debug for EtcdAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAccess")
            .field("tls", &self.ca_pem.is_some())
            .field("client_cert", &self.identity.is_some())
            .field("user", &self.user.as_ref().map(|u| &u.0))
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl EtcdAccess {
    fn secured(&self) -> bool {
        self.ca_pem.is_some() || self.identity.is_some() || self.user.is_some()
    }
}

/// An error and its sources in one line: TLS failures say why only in
/// the innermost source ("invalid peer certificate: UnknownIssuer").
fn chain(e: &dyn std::error::Error) -> String {
    chain_from(e.to_string(), e.source())
}

/// `first`, then each source's text that doesn't repeat what is there.
fn chain_from(first: String, mut cur: Option<&dyn std::error::Error>) -> String {
    let mut out = first;
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` and starts following changes
    /// under `prefix`. One read is made here: a cluster that can't be
    /// reached or used fails now, as `Unavailable` naming the endpoints.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        Self::connect_with(endpoints, prefix, &EtcdAccess::default()).await
    }

    /// As [`EtcdStore::connect`], with TLS and/or etcd auth: a certificate
    /// the cluster refuses, or one of the cluster's that isn't trusted,
    /// fails here in one error naming the endpoints and the reason.
    pub async fn connect_with(
        endpoints: &[String],
        prefix: &str,
        access: &EtcdAccess,
    ) -> Result<Self, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Invalid(
                "an etcd store needs at least one endpoint".into(),
            ));
        }
        let domain = if access.ca_pem.is_some() || access.identity.is_some() {
            tls_domain(endpoints, access.server_name.as_deref())?
        } else {
            None
        };
        let opts = || {
            let mut o = ConnectOptions::new()
                .with_connect_timeout(REQUEST_TIMEOUT)
                // etcd answers pings more often than every 5 s
                // (--grpc-keepalive-min-time) with GOAWAY too_many_pings,
                // which kills the watch stream: stay above it.
                .with_keep_alive(KEEPALIVE, REQUEST_TIMEOUT);
            if access.ca_pem.is_some() || access.identity.is_some() {
                let mut tls = TlsOptions::new();
                if let Some(ca) = &access.ca_pem {
                    tls = tls.ca_certificate(Certificate::from_pem(ca));
                }
                if let Some((cert, key)) = &access.identity {
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                if let Some(d) = &domain {
                    tls = tls.domain_name(d.clone());
                }
                o = o.with_tls(tls);
            }
            if let Some((name, password)) = &access.user {
                o = o.with_user(name.clone(), password.clone());
            }
            o
        };
        let at = endpoints.join(", ");
        let failed = |e: etcd_client::Error| match etcd_err_ref(&e) {
            StoreError::Unavailable(_) => {
                StoreError::Unavailable(format!("etcd at {at}: {}", chain(&e)))
            }
            other => other,
        };
        let kv = Client::connect(endpoints, Some(opts().with_timeout(REQUEST_TIMEOUT)))
            .await
            .map_err(failed)?;
        // One read now, so a cluster that can't be used (a certificate
        // refused either way, plaintext to a TLS port, a wrong password)
        // fails here in one error that names where and why.
        let probe = read_retrying(|| {
            let mut c = kv.kv_client();
            let key = format!("{prefix}written");
            async move { c.get(key, None).await }
        })
        .await;
        match probe {
            Ok(_) => {}
            Err(StoreError::Unavailable(m)) => {
                let hint = if m.contains("UnknownIssuer") {
                    " (store.ca_file is not the CA that signed the cluster's certificates)"
                } else if access.identity.is_some() {
                    " (if the cluster checks client certificates: is store.cert_file signed by \
                     its --trusted-ca-file?)"
                } else if !access.secured()
                    && m.contains("closed")
                    && endpoints.iter().any(|e| e.starts_with("http://"))
                {
                    " (a cluster that serves TLS needs https:// endpoints and store.ca_file)"
                } else {
                    ""
                };
                return Err(StoreError::Unavailable(format!("etcd at {at}: {m}{hint}")));
            }
            Err(e) => return Err(e),
        }
        // The watch is a long-lived stream: its client has no request timeout;
        // keep-alive pings detect a dead connection instead.
        let watch_client = Client::connect(endpoints, Some(opts()))
            .await
            .map_err(failed)?;
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
            ephemeral: rec.ephemeral,
            revision: u64::try_from(revision).unwrap_or(0),
        })
    }
}

mod follower;
mod schema;
mod write;

use follower::*;
use schema::*;
pub use schema::{InstanceRecord, PeerRecord};
use write::*;

#[cfg(test)]
mod tests;
