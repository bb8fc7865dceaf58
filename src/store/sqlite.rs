//! The embedded default store: one SQLite file (rusqlite, bundled), shared by
//! one gateway or a few on the same host.
//!
//! - Every write is one `BEGIN IMMEDIATE` transaction, so writers from other
//!   processes serialize on the file lock and allocation can't race.
//! - The schema is versioned with `PRAGMA user_version`; [`MIGRATIONS`] run in
//!   order at open, each in its own transaction.
//! - The change feed: writes in this process publish their revision at once;
//!   a watcher thread polls `PRAGMA data_version` (which changes when *another*
//!   connection commits) every [`POLL`] and publishes what it finds, the
//!   gateways' sync reports included.
//! - Snapshots are cached: each write in this process records what it
//!   changed ([`Delta`]), and the next snapshot applies those to the last
//!   one instead of reading every table again (at 10k peers, ~1 ms instead
//!   of ~15). The revision tells whether the chain is whole: any write by
//!   another process breaks it, and the next snapshot reads everything.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::watch;

use super::log::DeltaLog;
use super::{
    Delta, Gateway, Instance, NewInstance, NewPeer, Org, Peer, Revision, Snapshot, Store,
    StoreError, SyncReport, SyncReports,
};
use crate::model::{self, GatewayName, NetworkId, OrgName, PeerName, PeerSlot};

/// How often the watcher looks for commits by other processes.
const POLL: Duration = Duration::from_millis(20);
/// The most writes the cache holds back before it gives up on them (when
/// nobody takes snapshots, e.g. during a bulk import) and reloads instead.
const MAX_PENDING: usize = 4096;

/// Schema migrations; `user_version` is the number applied.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
     INSERT INTO meta (key, value) VALUES ('revision', 0);
     CREATE TABLE orgs (
         id INTEGER PRIMARY KEY,
         name TEXT NOT NULL UNIQUE,
         network_id INTEGER NOT NULL UNIQUE
     );
     CREATE TABLE gateways (
         name TEXT PRIMARY KEY,
         region TEXT NOT NULL,
         host_id INTEGER NOT NULL UNIQUE,
         endpoint TEXT NOT NULL,
         public_key TEXT NOT NULL
     );
     CREATE INDEX gateways_region ON gateways (region);
     CREATE TABLE peers (
         org_id INTEGER NOT NULL REFERENCES orgs (id),
         name TEXT NOT NULL,
         gateway TEXT NOT NULL REFERENCES gateways (name),
         slot INTEGER NOT NULL,
         public_key TEXT NOT NULL UNIQUE,
         created_at INTEGER NOT NULL,
         PRIMARY KEY (org_id, name),
         UNIQUE (org_id, gateway, slot)
     );
     CREATE INDEX peers_gateway ON peers (gateway);
     CREATE TABLE instances (
         org_id INTEGER NOT NULL REFERENCES orgs (id),
         app TEXT NOT NULL,
         id TEXT NOT NULL,
         region TEXT NOT NULL,
         address TEXT NOT NULL UNIQUE,
         process_group TEXT,
         started INTEGER NOT NULL,
         PRIMARY KEY (org_id, app, id)
     );
     CREATE TABLE org_tokens (
         sha256 BLOB PRIMARY KEY,
         org_id INTEGER NOT NULL REFERENCES orgs (id)
     );",
    // 2: the revision that registered each peer, and gateways' sync reports
    // (not part of the revision: see `Store::report_sync`).
    "ALTER TABLE peers ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
     CREATE TABLE sync_reports (
         gateway TEXT PRIMARY KEY,
         report TEXT NOT NULL
     );",
];

/// A store in one SQLite file.
pub struct SqliteStore {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
    feed: watch::Sender<Revision>,
    reports: watch::Sender<Arc<SyncReports>>,
    cache: Arc<Mutex<Cache>>,
    stop: Arc<AtomicBool>,
}

/// The last snapshot and this process's writes since; see the module doc.
/// Only touched while holding the connection, so writes and snapshots of
/// this process take their turns in revision order.
#[derive(Debug)]
struct Cache {
    base: Option<Arc<Snapshot>>,
    pending: Vec<Delta>,
    /// The revision of `base` with `pending` applied.
    revision: Revision,
    /// The writes already in `base`: what [`Store::snapshot_since`] hands
    /// to those a snapshot or more behind.
    log: DeltaLog,
}

impl Default for Cache {
    fn default() -> Self {
        Self {
            base: None,
            pending: Vec::new(),
            revision: 0,
            log: DeltaLog::new(0, MAX_PENDING),
        }
    }
}

impl Cache {
    /// Records the write that committed as `revision`, or drops everything
    /// if it doesn't follow on from what the cache holds.
    /// `None`: a change the cache can't follow (a gateway re-registered,
    /// which may move its peers' region).
    fn record(&mut self, revision: Revision, delta: Option<Delta>) {
        let follows = self.base.is_some() && self.revision + 1 == revision;
        if let Some(delta) = delta.filter(|_| follows && self.pending.len() < MAX_PENDING) {
            self.pending.push(delta);
            self.revision = revision;
        } else {
            *self = Cache::default();
        }
    }

    /// The snapshot at `revision`, if the cache can build it.
    fn snapshot(&mut self, revision: Revision) -> Option<Arc<Snapshot>> {
        let base = self.base.as_ref().filter(|_| self.revision == revision)?;
        if !self.pending.is_empty() {
            let mut next = Snapshot::clone(base);
            // One write per revision: the pending ones end at `revision`.
            let first = revision + 1 - self.pending.len() as Revision;
            for (rev, d) in (first..).zip(self.pending.drain(..)) {
                next.apply(d.clone());
                self.log.push(rev, d);
            }
            next.revision = revision;
            self.base = Some(Arc::new(next));
        }
        self.base.clone()
    }

    /// The writes from revision `from` to the cached snapshot (called right
    /// after [`Cache::snapshot`]), if the log reaches back that far.
    fn since(&self, from: Revision) -> Option<Vec<Delta>> {
        self.log.since(from, self.revision)
    }

    fn reset(&mut self, snapshot: Arc<Snapshot>) {
        let revision = snapshot.revision;
        *self = Cache {
            revision,
            base: Some(snapshot),
            pending: Vec::new(),
            log: DeltaLog::new(revision, MAX_PENDING),
        };
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn internal(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(ref f, _)
            if matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Internal(e.to_string()),
    }
}

/// A value read back from the database that doesn't parse means the file was
/// written by something else: report it, don't panic.
fn corrupt<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> StoreError + '_ {
    move |e| StoreError::Internal(format!("corrupt {what} in the database: {e}"))
}

fn lock(cache: &Mutex<Cache>) -> Result<std::sync::MutexGuard<'_, Cache>, StoreError> {
    cache
        .lock()
        .map_err(|_| StoreError::Internal("snapshot cache lock poisoned".into()))
}

fn open_conn(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(internal)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
    )
    .map_err(internal)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(internal)?;
    let version: usize = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(internal)?;
    if version > MIGRATIONS.len() {
        return Err(StoreError::Internal(format!(
            "database schema version {version} is newer than this sixpn ({}); upgrade sixpn",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.execute_batch(sql).map_err(internal)?;
        tx.pragma_update(None, "user_version", i + 1)
            .map_err(internal)?;
    }
    tx.commit().map_err(internal)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn bump_revision(tx: &rusqlite::Transaction<'_>) -> Result<Revision, StoreError> {
    tx.query_row(
        "UPDATE meta SET value = value + 1 WHERE key = 'revision' RETURNING value",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|v| v as Revision)
    .map_err(internal)
}

fn read_revision(conn: &Connection) -> Result<Revision, StoreError> {
    conn.query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| {
        r.get::<_, i64>(0)
    })
    .map(|v| v as Revision)
    .map_err(internal)
}

fn org_row(tx: &Connection, org: &OrgName) -> Result<(i64, NetworkId), StoreError> {
    let row: Option<(i64, i64)> = tx
        .query_row(
            "SELECT id, network_id FROM orgs WHERE name = ?1",
            [org.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(internal)?;
    let (id, net) = row.ok_or_else(|| StoreError::NotFound(format!("org '{org}' not found")))?;
    let net = u32::try_from(net)
        .map_err(corrupt("network id"))
        .and_then(|n| NetworkId::new(n).map_err(corrupt("network id")))?;
    Ok((id, net))
}

/// The lowest free slot for (org, gateway). Dense allocations (the common
/// case) take one indexed query; only when there is a gap do we search for it.
fn free_slot(tx: &Connection, org_id: i64, gateway: &str) -> Result<PeerSlot, StoreError> {
    let (count, max): (i64, Option<i64>) = tx
        .query_row(
            "SELECT COUNT(*), MAX(slot) FROM peers WHERE org_id = ?1 AND gateway = ?2",
            params![org_id, gateway],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(internal)?;
    let next = match max {
        None => 0,
        Some(max) if max + 1 == count => count,
        Some(_) => tx
            .query_row(
                "SELECT CASE WHEN NOT EXISTS (
                         SELECT 1 FROM peers WHERE org_id = ?1 AND gateway = ?2 AND slot = 0)
                     THEN 0 ELSE (
                         SELECT p.slot + 1 FROM peers p
                         WHERE p.org_id = ?1 AND p.gateway = ?2 AND NOT EXISTS (
                             SELECT 1 FROM peers q
                             WHERE q.org_id = ?1 AND q.gateway = ?2 AND q.slot = p.slot + 1)
                         ORDER BY p.slot LIMIT 1) END",
                params![org_id, gateway],
                |r| r.get(0),
            )
            .map_err(internal)?,
    };
    u32::try_from(next)
        .ok()
        .and_then(|n| PeerSlot::new(n).ok())
        .ok_or_else(|| {
            StoreError::Exhausted(format!(
                "gateway '{gateway}' has no free peer address left in this org ({} in use)",
                PeerSlot::COUNT
            ))
        })
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let mut conn = open_conn(&path)?;
        migrate(&mut conn)?;
        let revision = read_revision(&conn)?;
        let (feed, _) = watch::channel(revision);
        let (reports, _) = watch::channel(Arc::new(read_reports(&conn)?));
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = open_conn(&path)?;
        {
            let feed = feed.clone();
            let reports = reports.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("sixpn-sqlite-watch".into())
                .spawn(move || watch_loop(watcher, feed, reports, stop))
                .map_err(|e| StoreError::Internal(format!("cannot start watcher: {e}")))?;
        }
        Ok(Self {
            path,
            conn: Arc::new(Mutex::new(conn)),
            feed,
            reports,
            cache: Arc::default(),
            stop,
        })
    }

    /// Runs `f` on the connection on the blocking pool.
    async fn with_conn<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| StoreError::Internal("store connection lock poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Internal(format!("store task failed: {e}")))?
    }

    /// Runs `f` in one write transaction that bumps the revision, records
    /// what it changed (`delta` of its result) for the snapshot cache, then
    /// publishes the new revision to the change feed.
    async fn write<T, F>(&self, f: F, delta: fn(&T) -> Option<Delta>) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let cache = self.cache.clone();
        let (value, revision) = self
            .with_conn(move |conn| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(internal)?;
                let value = f(&tx)?;
                let revision = bump_revision(&tx)?;
                tx.commit().map_err(internal)?;
                lock(&cache)?.record(revision, delta(&value));
                Ok((value, revision))
            })
            .await?;
        self.feed.send_if_modified(|r| {
            let newer = revision > *r;
            if newer {
                *r = revision;
            }
            newer
        });
        Ok(value)
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn watch_loop(
    conn: Connection,
    feed: watch::Sender<Revision>,
    reports: watch::Sender<Arc<SyncReports>>,
    stop: Arc<AtomicBool>,
) {
    let mut last_version: Option<i64> = None;
    while !stop.load(Ordering::Relaxed) {
        let version = conn
            .query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))
            .ok();
        if version.is_some() && version != last_version {
            last_version = version;
            if let Ok(revision) = read_revision(&conn) {
                feed.send_if_modified(|r| {
                    let newer = revision > *r;
                    if newer {
                        *r = revision;
                    }
                    newer
                });
            }
            if let Ok(r) = read_reports(&conn) {
                super::publish_reports(&reports, r);
            }
        }
        std::thread::sleep(POLL);
    }
}

fn read_reports(conn: &Connection) -> Result<SyncReports, StoreError> {
    let mut st = conn
        .prepare("SELECT gateway, report FROM sync_reports")
        .map_err(internal)?;
    let mut rows = st.query([]).map_err(internal)?;
    let mut out = SyncReports::new();
    while let Some(r) = rows.next().map_err(internal)? {
        let gateway: String = r.get(0).map_err(internal)?;
        let report: String = r.get(1).map_err(internal)?;
        out.insert(
            gateway.parse().map_err(corrupt("gateway name"))?,
            serde_json::from_str(&report).map_err(corrupt("sync report"))?,
        );
    }
    Ok(out)
}

fn load_snapshot(conn: &mut Connection) -> Result<Snapshot, StoreError> {
    let tx = conn.transaction().map_err(internal)?;
    let revision = read_revision(&tx)?;

    let mut orgs = Vec::new();
    let mut org_by_id = std::collections::HashMap::new();
    {
        let mut st = tx
            .prepare("SELECT id, name, network_id FROM orgs ORDER BY name")
            .map_err(internal)?;
        let mut rows = st.query([]).map_err(internal)?;
        while let Some(r) = rows.next().map_err(internal)? {
            let id: i64 = r.get(0).map_err(internal)?;
            let name: String = r.get(1).map_err(internal)?;
            let net: i64 = r.get(2).map_err(internal)?;
            let org = Org {
                name: name.parse().map_err(corrupt("org name"))?,
                network_id: u32::try_from(net)
                    .map_err(corrupt("network id"))
                    .and_then(|n| NetworkId::new(n).map_err(corrupt("network id")))?,
            };
            org_by_id.insert(id, org.clone());
            orgs.push(org);
        }
    }

    let mut gateways = Vec::new();
    {
        let mut st = tx
            .prepare(
                "SELECT name, region, host_id, endpoint, public_key FROM gateways ORDER BY name",
            )
            .map_err(internal)?;
        let mut rows = st.query([]).map_err(internal)?;
        while let Some(r) = rows.next().map_err(internal)? {
            let name: String = r.get(0).map_err(internal)?;
            let region: String = r.get(1).map_err(internal)?;
            let host: i64 = r.get(2).map_err(internal)?;
            let endpoint: String = r.get(3).map_err(internal)?;
            let key: String = r.get(4).map_err(internal)?;
            gateways.push(Gateway {
                name: name.parse().map_err(corrupt("gateway name"))?,
                region: region.parse().map_err(corrupt("region"))?,
                host_id: model::HostId::from_u32(u32::try_from(host).map_err(corrupt("host id"))?),
                endpoint: endpoint.parse().map_err(corrupt("endpoint"))?,
                public_key: key.parse().map_err(corrupt("gateway key"))?,
            });
        }
    }
    let gw_by_name: std::collections::HashMap<&GatewayName, &Gateway> =
        gateways.iter().map(|g| (&g.name, g)).collect();

    let mut peers = Vec::new();
    {
        let mut st = tx
            .prepare(
                "SELECT org_id, name, gateway, slot, public_key, created_at, revision FROM peers
                 ORDER BY org_id, name",
            )
            .map_err(internal)?;
        let mut rows = st.query([]).map_err(internal)?;
        while let Some(r) = rows.next().map_err(internal)? {
            let org_id: i64 = r.get(0).map_err(internal)?;
            let name: String = r.get(1).map_err(internal)?;
            let gateway: String = r.get(2).map_err(internal)?;
            let slot: i64 = r.get(3).map_err(internal)?;
            let key: String = r.get(4).map_err(internal)?;
            let created: i64 = r.get(5).map_err(internal)?;
            let peer_revision: i64 = r.get(6).map_err(internal)?;
            let org = org_by_id
                .get(&org_id)
                .ok_or_else(|| StoreError::Internal(format!("peer {name} has no org")))?;
            let gateway: GatewayName = gateway.parse().map_err(corrupt("gateway name"))?;
            let gw = gw_by_name
                .get(&gateway)
                .ok_or_else(|| StoreError::Internal(format!("peer {name} has no gateway")))?;
            let slot = u32::try_from(slot)
                .map_err(corrupt("slot"))
                .and_then(|s| PeerSlot::new(s).map_err(corrupt("slot")))?;
            peers.push(Peer {
                org: org.name.clone(),
                name: name.parse().map_err(corrupt("peer name"))?,
                region: gw.region.clone(),
                net: slot.net(org.prefix(), gw.host_id),
                gateway,
                slot,
                public_key: key.parse().map_err(corrupt("peer key"))?,
                created_at: u64::try_from(created).unwrap_or(0),
                revision: u64::try_from(peer_revision).unwrap_or(0),
            });
        }
    }
    peers.sort_by(|a, b| (&a.org, &a.name).cmp(&(&b.org, &b.name)));

    let mut instances = Vec::new();
    {
        let mut st = tx
            .prepare(
                "SELECT org_id, app, id, region, address, process_group, started FROM instances",
            )
            .map_err(internal)?;
        let mut rows = st.query([]).map_err(internal)?;
        while let Some(r) = rows.next().map_err(internal)? {
            let org_id: i64 = r.get(0).map_err(internal)?;
            let app: String = r.get(1).map_err(internal)?;
            let id: String = r.get(2).map_err(internal)?;
            let region: String = r.get(3).map_err(internal)?;
            let address: String = r.get(4).map_err(internal)?;
            let group: Option<String> = r.get(5).map_err(internal)?;
            let started: bool = r.get(6).map_err(internal)?;
            let org = org_by_id
                .get(&org_id)
                .ok_or_else(|| StoreError::Internal(format!("instance {id} has no org")))?;
            instances.push(Instance {
                org: org.name.clone(),
                app: app.parse().map_err(corrupt("app name"))?,
                id: id.parse().map_err(corrupt("instance id"))?,
                region: region.parse().map_err(corrupt("region"))?,
                address: address.parse().map_err(corrupt("instance address"))?,
                process_group: group
                    .map(|g| g.parse().map_err(corrupt("process group")))
                    .transpose()?,
                started,
            });
        }
    }
    instances.sort_by(|a, b| (&a.org, &a.app, &a.id).cmp(&(&b.org, &b.app, &b.id)));
    tx.finish().map_err(internal)?;
    Ok(Snapshot {
        revision,
        orgs,
        gateways,
        peers,
        instances,
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn snapshot(&self) -> Result<Arc<Snapshot>, StoreError> {
        Ok(self.snapshot_since(Revision::MAX).await?.0)
    }

    async fn snapshot_since(
        &self,
        from: Revision,
    ) -> Result<(Arc<Snapshot>, Option<Vec<Delta>>), StoreError> {
        let cache = self.cache.clone();
        self.with_conn(move |conn| {
            let revision = read_revision(conn)?;
            let mut cache = lock(&cache)?;
            if let Some(s) = cache.snapshot(revision) {
                return Ok((s, cache.since(from)));
            }
            let s = Arc::new(load_snapshot(conn)?);
            cache.reset(s.clone());
            Ok((s, (from == revision).then(Vec::new)))
        })
        .await
    }

    fn subscribe(&self) -> watch::Receiver<Revision> {
        self.feed.subscribe()
    }

    async fn create_org(&self, name: &OrgName) -> Result<Org, StoreError> {
        let name = name.clone();
        self.write(
            move |tx| {
                let exists: bool = tx
                    .query_row(
                        "SELECT EXISTS (SELECT 1 FROM orgs WHERE name = ?1)",
                        [name.as_str()],
                        |r| r.get(0),
                    )
                    .map_err(internal)?;
                if exists {
                    return Err(StoreError::Conflict(format!("org '{name}' already exists")));
                }
                let next: i64 = tx
                    .query_row(
                        "SELECT COALESCE(MAX(network_id), 0) + 1 FROM orgs",
                        [],
                        |r| r.get(0),
                    )
                    .map_err(internal)?;
                let id = u32::try_from(next)
                    .ok()
                    .and_then(|n| NetworkId::new(n).ok())
                    .ok_or_else(|| StoreError::Exhausted("no network id left".into()))?;
                tx.execute(
                    "INSERT INTO orgs (name, network_id) VALUES (?1, ?2)",
                    params![name.as_str(), id.get()],
                )
                .map_err(internal)?;
                Ok(Org {
                    name,
                    network_id: id,
                })
            },
            |o| Some(Delta::OrgAdded(o.clone())),
        )
        .await
    }

    async fn register_gateway(&self, gw: &Gateway) -> Result<(), StoreError> {
        let gw = gw.clone();
        self.write(
            move |tx| {
                let other: Option<String> = tx
                    .query_row(
                        "SELECT name FROM gateways WHERE host_id = ?1 AND name != ?2",
                        params![gw.host_id.get(), gw.name.as_str()],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(internal)?;
                if let Some(other) = other {
                    return Err(StoreError::Conflict(format!(
                        "host id {} is already used by gateway '{other}'",
                        gw.host_id
                    )));
                }
                let old: Option<i64> = tx
                    .query_row(
                        "SELECT host_id FROM gateways WHERE name = ?1",
                        [gw.name.as_str()],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(internal)?;
                if old.is_some_and(|h| h != i64::from(gw.host_id.get())) {
                    let peers: i64 = tx
                        .query_row(
                            "SELECT COUNT(*) FROM peers WHERE gateway = ?1",
                            [gw.name.as_str()],
                            |r| r.get(0),
                        )
                        .map_err(internal)?;
                    if peers > 0 {
                        return Err(StoreError::Conflict(format!(
                            "gateway '{}' holds {peers} peers addressed with its old host id; \
                         it can't change to {}",
                            gw.name, gw.host_id
                        )));
                    }
                }
                tx.execute(
                    "INSERT INTO gateways (name, region, host_id, endpoint, public_key)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (name) DO UPDATE SET region = ?2, host_id = ?3,
                     endpoint = ?4, public_key = ?5",
                    params![
                        gw.name.as_str(),
                        gw.region.as_str(),
                        gw.host_id.get(),
                        gw.endpoint.as_str(),
                        gw.public_key.to_base64()
                    ],
                )
                .map_err(internal)?;
                Ok(())
            },
            |_| None,
        )
        .await
    }

    async fn create_peer(&self, req: &NewPeer) -> Result<(Peer, Gateway), StoreError> {
        let req = req.clone();
        self.write(
            move |tx| {
                let (org_id, net) = org_row(tx, &req.org)?;
                let exists: bool = tx
                    .query_row(
                        "SELECT EXISTS (SELECT 1 FROM peers WHERE org_id = ?1 AND name = ?2)",
                        params![org_id, req.name.as_str()],
                        |r| r.get(0),
                    )
                    .map_err(internal)?;
                if exists {
                    return Err(StoreError::Conflict(format!(
                        "peer '{}' already exists in org '{}'",
                        req.name, req.org
                    )));
                }
                let key_used: bool = tx
                    .query_row(
                        "SELECT EXISTS (SELECT 1 FROM peers WHERE public_key = ?1)",
                        [req.public_key.to_base64()],
                        |r| r.get(0),
                    )
                    .map_err(internal)?;
                if key_used {
                    return Err(StoreError::Conflict(
                        "that public key is already registered for another peer".into(),
                    ));
                }
                // The region's gateways with their peer counts; the least
                // loaded is chosen as every backend chooses.
                let mut stmt = tx
                    .prepare_cached(
                        "SELECT g.name, g.host_id, g.endpoint, g.public_key,
                            (SELECT COUNT(*) FROM peers p WHERE p.gateway = g.name)
                         FROM gateways g WHERE g.region = ?1",
                    )
                    .map_err(internal)?;
                let rows: Vec<(String, i64, String, String, i64)> = stmt
                    .query_map([req.region.as_str()], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                    })
                    .map_err(internal)?
                    .collect::<Result<_, _>>()
                    .map_err(internal)?;
                let mut candidates = Vec::with_capacity(rows.len());
                for (name, host, endpoint, key, load) in rows {
                    let parsed: GatewayName = name.parse().map_err(corrupt("gateway name"))?;
                    candidates.push((
                        parsed,
                        usize::try_from(load).unwrap_or(usize::MAX),
                        (name, host, endpoint, key),
                    ));
                }
                let gw = super::placement::least_loaded(
                    candidates
                        .iter()
                        .map(|(n, load, row)| (n, *load, row.clone())),
                );
                let (gw_name, host, endpoint, gw_key) = gw.ok_or_else(|| {
                    StoreError::NotFound(format!("no gateway in region '{}'", req.region))
                })?;
                let slot = free_slot(tx, org_id, &gw_name)?;
                let created_at = now_secs();
                // The revision this transaction commits as (`write` bumps it by
                // one; the immediate transaction holds off other writers).
                let revision = read_revision(tx)? + 1;
                tx.execute(
                "INSERT INTO peers (org_id, name, gateway, slot, public_key, created_at, revision)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    org_id,
                    req.name.as_str(),
                    gw_name,
                    slot.index(),
                    req.public_key.to_base64(),
                    created_at as i64,
                    i64::try_from(revision).map_err(corrupt("revision"))?
                ],
            )
            .map_err(internal)?;
                let host =
                    model::HostId::from_u32(u32::try_from(host).map_err(corrupt("host id"))?);
                let gateway = Gateway {
                    name: gw_name.parse().map_err(corrupt("gateway name"))?,
                    region: req.region.clone(),
                    host_id: host,
                    endpoint: endpoint.parse().map_err(corrupt("endpoint"))?,
                    public_key: gw_key.parse().map_err(corrupt("gateway key"))?,
                };
                let peer = Peer {
                    org: req.org,
                    name: req.name,
                    gateway: gateway.name.clone(),
                    region: req.region,
                    slot,
                    net: slot.net(net.prefix(), host),
                    public_key: req.public_key,
                    created_at,
                    revision,
                };
                Ok((peer, gateway))
            },
            |(p, _)| Some(Delta::PeerAdded(p.clone())),
        )
        .await
    }

    async fn remove_peer(&self, org: &OrgName, name: &PeerName) -> Result<Peer, StoreError> {
        let (org, name) = (org.clone(), name.clone());
        self.write(
            move |tx| {
                let (org_id, net) = org_row(tx, &org)?;
                type Row = (String, i64, String, i64, String, i64, i64);
                let row: Option<Row> = tx
                    .query_row(
                        "SELECT p.gateway, p.slot, p.public_key, p.created_at, g.region, g.host_id,
                            p.revision
                     FROM peers p JOIN gateways g ON g.name = p.gateway
                     WHERE p.org_id = ?1 AND p.name = ?2",
                        params![org_id, name.as_str()],
                        |r| {
                            Ok((
                                r.get(0)?,
                                r.get(1)?,
                                r.get(2)?,
                                r.get(3)?,
                                r.get(4)?,
                                r.get(5)?,
                                r.get(6)?,
                            ))
                        },
                    )
                    .optional()
                    .map_err(internal)?;
                let (gateway, slot, key, created, region, host, revision) =
                    row.ok_or_else(|| {
                        StoreError::NotFound(format!("peer '{name}' not found in org '{org}'"))
                    })?;
                tx.execute(
                    "DELETE FROM peers WHERE org_id = ?1 AND name = ?2",
                    params![org_id, name.as_str()],
                )
                .map_err(internal)?;
                let slot = u32::try_from(slot)
                    .map_err(corrupt("slot"))
                    .and_then(|s| PeerSlot::new(s).map_err(corrupt("slot")))?;
                let host =
                    model::HostId::from_u32(u32::try_from(host).map_err(corrupt("host id"))?);
                Ok(Peer {
                    org,
                    name,
                    gateway: gateway.parse().map_err(corrupt("gateway name"))?,
                    region: region.parse().map_err(corrupt("region"))?,
                    slot,
                    net: slot.net(net.prefix(), host),
                    public_key: key.parse().map_err(corrupt("peer key"))?,
                    created_at: u64::try_from(created).unwrap_or(0),
                    revision: u64::try_from(revision).unwrap_or(0),
                })
            },
            |p| Some(Delta::PeerRemoved(p.clone())),
        )
        .await
    }

    async fn add_instance(&self, req: &NewInstance) -> Result<Instance, StoreError> {
        let req = req.clone();
        self.write(
            move |tx| {
                let (org_id, net) = org_row(tx, &req.org)?;
                let prefix = net.prefix();
                let (address, id) = req.resolve(prefix)?;
                let taken: Option<String> = tx
                    .query_row(
                        "SELECT app || '/' || id FROM instances WHERE address = ?1",
                        [address.to_string()],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(internal)?;
                if let Some(taken) = taken {
                    return Err(StoreError::Conflict(format!(
                        "address {address} is already used by instance {taken}"
                    )));
                }
                let exists: bool = tx
                    .query_row(
                        "SELECT EXISTS (SELECT 1 FROM instances
                     WHERE org_id = ?1 AND app = ?2 AND id = ?3)",
                        params![org_id, req.app.as_str(), id.as_str()],
                        |r| r.get(0),
                    )
                    .map_err(internal)?;
                if exists {
                    return Err(StoreError::Conflict(format!(
                        "instance '{id}' of app '{}' already exists",
                        req.app
                    )));
                }
                tx.execute(
                "INSERT INTO instances (org_id, app, id, region, address, process_group, started)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    org_id,
                    req.app.as_str(),
                    id.as_str(),
                    req.region.as_str(),
                    address.to_string(),
                    req.process_group.as_ref().map(|g| g.as_str().to_owned()),
                    req.started
                ],
            )
            .map_err(internal)?;
                Ok(Instance {
                    org: req.org,
                    app: req.app,
                    id,
                    region: req.region,
                    address,
                    process_group: req.process_group,
                    started: req.started,
                })
            },
            |i| Some(Delta::InstanceAdded(i.clone())),
        )
        .await
    }

    async fn remove_instance(
        &self,
        org: &OrgName,
        app: &model::AppName,
        id: &model::InstanceId,
    ) -> Result<Instance, StoreError> {
        let (org, app, id) = (org.clone(), app.clone(), id.clone());
        self.write(
            move |tx| {
                let (org_id, _) = org_row(tx, &org)?;
                let row: Option<(String, String, Option<String>, bool)> = tx
                    .query_row(
                        "DELETE FROM instances WHERE org_id = ?1 AND app = ?2 AND id = ?3
                     RETURNING region, address, process_group, started",
                        params![org_id, app.as_str(), id.as_str()],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                    )
                    .optional()
                    .map_err(internal)?;
                let (region, address, group, started) = row.ok_or_else(|| {
                    StoreError::NotFound(format!("instance '{id}' of app '{app}' not found"))
                })?;
                Ok(Instance {
                    org,
                    app,
                    id,
                    region: region.parse().map_err(corrupt("region"))?,
                    address: address.parse().map_err(corrupt("instance address"))?,
                    process_group: group
                        .map(|g| g.parse().map_err(corrupt("process group")))
                        .transpose()?,
                    started,
                })
            },
            |i| {
                Some(Delta::InstanceRemoved(
                    i.org.clone(),
                    i.app.clone(),
                    i.id.clone(),
                ))
            },
        )
        .await
    }

    async fn add_org_token(&self, org: &OrgName, sha: [u8; 32]) -> Result<(), StoreError> {
        let org = org.clone();
        self.write(
            move |tx| {
                let (org_id, _) = org_row(tx, &org)?;
                tx.execute(
                    "INSERT INTO org_tokens (sha256, org_id) VALUES (?1, ?2)",
                    params![sha.to_vec(), org_id],
                )
                .map_err(internal)?;
                Ok(())
            },
            |_| Some(Delta::Unchanged),
        )
        .await
    }

    async fn token_org(&self, sha: [u8; 32]) -> Result<Option<OrgName>, StoreError> {
        self.with_conn(move |conn| {
            let name: Option<String> = conn
                .query_row(
                    "SELECT o.name FROM org_tokens t JOIN orgs o ON o.id = t.org_id
                     WHERE t.sha256 = ?1",
                    [sha.to_vec()],
                    |r| r.get(0),
                )
                .optional()
                .map_err(internal)?;
            name.map(|n| n.parse().map_err(corrupt("org name")))
                .transpose()
        })
        .await
    }

    async fn report_sync(
        &self,
        gateway: &GatewayName,
        report: &SyncReport,
    ) -> Result<(), StoreError> {
        let (gateway, text) = (gateway.clone(), serde_json::to_string(report));
        let text = text.map_err(|e| StoreError::Internal(format!("encode sync report: {e}")))?;
        // Not `write`: a report moves neither the revision nor the feed.
        let reports = self
            .with_conn(move |conn| {
                conn.execute(
                    "INSERT INTO sync_reports (gateway, report) VALUES (?1, ?2)
                     ON CONFLICT (gateway) DO UPDATE SET report = excluded.report",
                    params![gateway.as_str(), text],
                )
                .map_err(internal)?;
                read_reports(conn)
            })
            .await?;
        super::publish_reports(&self.reports, reports);
        Ok(())
    }

    fn sync_reports(&self) -> watch::Receiver<Arc<SyncReports>> {
        self.reports.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    use crate::model::HostId;
    use crate::store::conformance::{self as suite, new_peer};
    use crate::store::InstanceAddress;

    async fn store_with_gateway(dir: &Path) -> SqliteStore {
        let store = SqliteStore::open(dir.join("state.db")).unwrap();
        store
            .register_gateway(&suite::first_gateway())
            .await
            .unwrap();
        store
    }

    /// Runs a check of the shared suite on a fresh store in a scratch file.
    macro_rules! suite_test {
        ($name:ident) => {
            #[tokio::test]
            async fn $name() {
                let dir = tempfile::tempdir().unwrap();
                let store = store_with_gateway(dir.path()).await;
                suite::$name(&store).await;
            }
        };
    }

    suite_test!(peers_get_distinct_addresses_and_reuse_freed_slots);
    suite_test!(bad_writes_change_nothing);
    suite_test!(instances_and_tokens);
    suite_test!(gateway_host_ids_are_unique_and_stable);

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_creates_from_two_processes_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let a = Arc::new(store_with_gateway(dir.path()).await);
        let b = Arc::new(SqliteStore::open(dir.path().join("state.db")).unwrap());
        suite::concurrent_creates_never_collide(a, b).await;
    }

    #[tokio::test]
    async fn change_feed_sees_writes_from_another_process() {
        let dir = tempfile::tempdir().unwrap();
        let a = store_with_gateway(dir.path()).await;
        // A second handle on the same file stands in for another process:
        // it has its own connections and learns only through data_version.
        let b = SqliteStore::open(dir.path().join("state.db")).unwrap();
        suite::change_feed_sees_writes_through_another_handle(&a, &b).await;
    }

    #[tokio::test]
    async fn sync_reports_reach_another_process_and_move_no_revision() {
        let dir = tempfile::tempdir().unwrap();
        let a = store_with_gateway(dir.path()).await;
        let b = SqliteStore::open(dir.path().join("state.db")).unwrap();
        let gw = a.snapshot().await.unwrap().gateways[0].name.clone();
        suite::sync_reports(&a, &b, &gw).await;
        // A reopened store starts from the reports on disk.
        drop(a);
        let c = SqliteStore::open(dir.path().join("state.db")).unwrap();
        assert!(c.sync_reports().borrow().contains_key(&gw));
    }

    #[tokio::test]
    async fn schema_from_the_future_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        drop(SqliteStore::open(&path).unwrap());
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let e = SqliteStore::open(&path).unwrap_err();
        assert!(e.to_string().contains("newer than this sixpn"), "{e}");
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Create(u8, u8),
            Remove(u8, u8),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                3 => (0u8..2, 0u8..40).prop_map(|(o, n)| Op::Create(o, n)),
                1 => (0u8..2, 0u8..40).prop_map(|(o, n)| Op::Remove(o, n)),
            ]
        }

        #[derive(Debug, Clone)]
        enum Write {
            Peer(u8, u8),
            Unpeer(u8, u8),
            Instance(u8, u8),
            Uninstance(u8, u8),
            Org(u8),
            Token(u8),
            /// A write by another process: the cache must notice.
            Foreign(u8),
        }

        fn write() -> impl Strategy<Value = Write> {
            prop_oneof![
                4 => (0u8..3, 0u8..20).prop_map(|(o, n)| Write::Peer(o, n)),
                2 => (0u8..3, 0u8..20).prop_map(|(o, n)| Write::Unpeer(o, n)),
                3 => (0u8..3, 0u8..20).prop_map(|(o, n)| Write::Instance(o, n)),
                1 => (0u8..3, 0u8..20).prop_map(|(o, n)| Write::Uninstance(o, n)),
                1 => (0u8..3).prop_map(Write::Org),
                1 => (0u8..3).prop_map(Write::Token),
                1 => (0u8..20).prop_map(Write::Foreign),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(24))]
            /// Whatever the writes, by this process or another, and however
            /// they interleave with snapshots: a snapshot equals what a full
            /// read of the file gives.
            #[test]
            fn cached_snapshots_equal_a_full_read(
                writes in proptest::collection::vec((write(), any::<bool>()), 1..60)
            ) {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    let dir = tempfile::tempdir().unwrap();
                    let path = dir.path().join("state.db");
                    let store = store_with_gateway(dir.path()).await;
                    let other = SqliteStore::open(&path).unwrap();
                    let orgs = ["o0", "o1", "o2"];
                    store.create_org(&"o0".parse().unwrap()).await.unwrap();
                    let mut last = None;
                    for (w, look) in writes {
                        let org = |o: u8| orgs[o as usize].parse::<OrgName>().unwrap();
                        let app: model::AppName = "web".parse().unwrap();
                        let id = |n: u8| format!("i{n}").parse::<model::InstanceId>().unwrap();
                        let instance = |o: u8, n: u8| {
                            NewInstance {
                                org: org(o),
                                app: app.clone(),
                                id: Some(id(n)),
                                region: "lhr".parse().unwrap(),
                                address: InstanceAddress::HostMachine {
                                    host: HostId::from_u32(0x7d),
                                    machine: model::MachineId::from_u32(u32::from(n) + 1),
                                },
                                process_group: None,
                                started: n % 2 == 0,
                            }
                        };
                        // Failures (a name taken, an org missing) are part
                        // of the sequence: they must change nothing.
                        let _ = match w {
                            Write::Peer(o, n) => store
                                .create_peer(&new_peer(orgs[o as usize], &format!("n{n}")))
                                .await
                                .map(|_| ()),
                            Write::Unpeer(o, n) => store
                                .remove_peer(&org(o), &format!("n{n}").parse().unwrap())
                                .await
                                .map(|_| ()),
                            Write::Instance(o, n) => {
                                store.add_instance(&instance(o, n)).await.map(|_| ())
                            }
                            Write::Uninstance(o, n) => {
                                store.remove_instance(&org(o), &app, &id(n)).await.map(|_| ())
                            }
                            Write::Org(o) => store.create_org(&org(o)).await.map(|_| ()),
                            Write::Token(o) => {
                                store.add_org_token(&org(o), [o; 32]).await
                            }
                            Write::Foreign(n) => {
                                other.add_instance(&instance(0, n + 100)).await.map(|_| ())
                            }
                        };
                        if look {
                            let from = last.as_ref().map_or(0, |s: &Arc<Snapshot>| s.revision);
                            let (cached, deltas) = store.snapshot_since(from).await.unwrap();
                            let full = {
                                let mut conn = open_conn(&path).unwrap();
                                load_snapshot(&mut conn).unwrap()
                            };
                            prop_assert_eq!(&*cached, &full);
                            // The writes handed out lead from the last
                            // snapshot to this one.
                            if let (Some(deltas), Some(last)) = (deltas, &last) {
                                let mut followed = Snapshot::clone(last);
                                for d in deltas {
                                    followed.apply(d);
                                }
                                followed.revision = cached.revision;
                                prop_assert_eq!(&followed, &full);
                            }
                            last = Some(cached);
                        }
                    }
                    Ok(())
                })?;
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(24))]
            /// Whatever the sequence of creates and removes: addresses never
            /// collide, stay inside the org's /48 under the gateway's host
            /// id, and each create takes the lowest free slot.
            #[test]
            fn allocation_invariants(ops in proptest::collection::vec(op(), 1..80)) {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    let dir = tempfile::tempdir().unwrap();
                    let store = store_with_gateway(dir.path()).await;
                    let orgs = ["o0", "o1"];
                    for o in orgs { store.create_org(&o.parse().unwrap()).await.unwrap(); }
                    for op in ops {
                        match op {
                            Op::Create(o, n) => {
                                let org = orgs[o as usize];
                                let snap = store.snapshot().await.unwrap();
                                let used: HashSet<u32> = snap.peers.iter()
                                    .filter(|p| p.org.as_str() == org)
                                    .map(|p| p.slot.index()).collect();
                                let lowest = (0..).find(|s| !used.contains(s)).unwrap();
                                match store.create_peer(&new_peer(org, &format!("n{n}"))).await {
                                    Ok((p, _)) => {
                                        prop_assert_eq!(p.slot.index(), lowest);
                                        let prefix = snap.org(&p.org).unwrap().prefix();
                                        prop_assert!(prefix.contains(p.net.peer_addr()));
                                        let seg = p.net.peer_addr().segments();
                                        prop_assert_eq!((seg[3], seg[4]), (0xa7b, 0xd6b));
                                    }
                                    Err(StoreError::Conflict(_)) => {}
                                    Err(e) => prop_assert!(false, "{e}"),
                                }
                            }
                            Op::Remove(o, n) => {
                                let _ = store.remove_peer(&orgs[o as usize].parse().unwrap(),
                                    &format!("n{n}").parse().unwrap()).await;
                            }
                        }
                        let snap = store.snapshot().await.unwrap();
                        let nets: HashSet<_> = snap.peers.iter().map(|p| p.net).collect();
                        prop_assert_eq!(nets.len(), snap.peers.len());
                    }
                    Ok(())
                })?;
            }
        }
    }
}
