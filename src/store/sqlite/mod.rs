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
    Delta, Gateway, Instance, NewInstance, NewOrgToken, NewPeer, Org, OrgTokenRecord, Peer,
    Revision, Snapshot, Store, StoreError, SyncReport, SyncReports,
};
use crate::model::{self, GatewayName, NetworkId, OrgName, PeerName, PeerSlot, TokenId};

/// A store in one SQLite file.
pub struct SqliteStore {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
    feed: watch::Sender<Revision>,
    reports: watch::Sender<Arc<SyncReports>>,
    cache: Arc<Mutex<Cache>>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

/// A failed SQLite call as a store error. What the disk or the file's
/// state causes (full, read-only, an I/O error, another writer holding the
/// lock) is [`StoreError::Unavailable`]: retryable once the operator has
/// made room or remounted, and answered 503, not 500.
fn internal(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode as C;
    match e {
        rusqlite::Error::SqliteFailure(ref f, _) => match f.code {
            C::DatabaseBusy | C::DatabaseLocked => StoreError::Unavailable(e.to_string()),
            C::DiskFull => StoreError::Unavailable(format!("the store's disk is full: {e}")),
            C::ReadOnly => StoreError::Unavailable(format!("the store is read-only: {e}")),
            C::SystemIoFailure | C::CannotOpen => {
                StoreError::Unavailable(format!("the store's file can't be written: {e}"))
            }
            _ => StoreError::Internal(e.to_string()),
        },
        _ => StoreError::Internal(e.to_string()),
    }
}

/// A value read back from the database that doesn't parse means the file was
/// written by something else: report it, don't panic.
fn corrupt<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> StoreError + '_ {
    move |e| StoreError::Internal(format!("corrupt {what} in the database: {e}"))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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

/// One org_tokens row as read: hash, org name, created, expires.
type TokenRow = (Vec<u8>, String, i64, Option<i64>);

fn token_columns(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
}

/// Every token row of one org.
fn token_rows(conn: &Connection, org_id: i64) -> Result<Vec<TokenRow>, StoreError> {
    let mut stmt = conn
        .prepare(
            "SELECT t.sha256, o.name, t.created_at, t.expires_at
             FROM org_tokens t JOIN orgs o ON o.id = t.org_id WHERE t.org_id = ?1",
        )
        .map_err(internal)?;
    let rows = stmt
        .query_map([org_id], token_columns)
        .map_err(internal)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(internal)?;
    Ok(rows)
}

fn sha_of(b: &[u8]) -> Option<[u8; 32]> {
    b.try_into().ok()
}

fn token_record((sha, org, created, expires): TokenRow) -> Result<OrgTokenRecord, StoreError> {
    let sha =
        sha_of(&sha).ok_or_else(|| StoreError::Internal("a token hash is not 32 bytes".into()))?;
    let time = |t: i64| u64::try_from(t).map_err(corrupt("token time"));
    Ok(OrgTokenRecord {
        id: TokenId::of(&sha),
        org: org.parse().map_err(corrupt("org name"))?,
        created_at: time(created)?,
        expires_at: expires.map(time).transpose()?,
    })
}

fn sql_time(t: u64) -> Result<i64, StoreError> {
    i64::try_from(t).map_err(|_| StoreError::Invalid(format!("time {t} is out of range")))
}

#[async_trait]
impl Store for SqliteStore {
    async fn close(&self) -> Result<(), StoreError> {
        let conn = self.conn.clone();
        let (busy, wal_pages, done): (i64, i64, i64) = tokio::task::spawn_blocking(move || {
            let c = conn.lock().map_err(|_| {
                StoreError::Internal("the store's connection lock is poisoned".into())
            })?;
            c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(internal)
        })
        .await
        .map_err(|e| StoreError::Internal(format!("checkpoint task failed: {e}")))??;
        if busy != 0 {
            return Err(StoreError::Unavailable(format!(
                "another process holds the store: {done} of {wal_pages} log pages checkpointed"
            )));
        }
        Ok(())
    }

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
                "INSERT INTO peers (org_id, name, gateway, slot, public_key, created_at, revision,
                    ephemeral)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    org_id,
                    req.name.as_str(),
                    gw_name,
                    slot.index(),
                    req.public_key.to_base64(),
                    created_at as i64,
                    i64::try_from(revision).map_err(corrupt("revision"))?,
                    req.ephemeral.map(sql_time).transpose()?
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
                    ephemeral: req.ephemeral,
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
                type Row = (String, i64, String, i64, String, i64, i64, Option<i64>);
                let row: Option<Row> = tx
                    .query_row(
                        "SELECT p.gateway, p.slot, p.public_key, p.created_at, g.region, g.host_id,
                            p.revision, p.ephemeral
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
                                r.get(7)?,
                            ))
                        },
                    )
                    .optional()
                    .map_err(internal)?;
                let (gateway, slot, key, created, region, host, revision, ephemeral) = row
                    .ok_or_else(|| {
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
                    ephemeral: ephemeral_ttl(ephemeral)?,
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

    async fn add_org_token(&self, token: &NewOrgToken) -> Result<OrgTokenRecord, StoreError> {
        let t = token.clone();
        self.write(
            move |tx| {
                let (org_id, _) = org_row(tx, &t.org)?;
                let taken: Option<i64> = tx
                    .query_row(
                        "SELECT 1 FROM org_tokens WHERE sha256 = ?1",
                        [t.sha256.to_vec()],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(internal)?;
                if taken.is_some() {
                    return Err(StoreError::Conflict(
                        "that token is already registered".into(),
                    ));
                }
                tx.execute(
                    "INSERT INTO org_tokens (sha256, org_id, created_at, expires_at)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![
                        t.sha256.to_vec(),
                        org_id,
                        sql_time(t.created_at)?,
                        t.expires_at.map(sql_time).transpose()?
                    ],
                )
                .map_err(internal)?;
                Ok(OrgTokenRecord {
                    id: TokenId::of(&t.sha256),
                    org: t.org,
                    created_at: t.created_at,
                    expires_at: t.expires_at,
                })
            },
            |_| Some(Delta::Unchanged),
        )
        .await
    }

    async fn token_org(&self, sha: [u8; 32]) -> Result<Option<OrgTokenRecord>, StoreError> {
        self.with_conn(move |conn| {
            conn.query_row(
                "SELECT t.sha256, o.name, t.created_at, t.expires_at
                 FROM org_tokens t JOIN orgs o ON o.id = t.org_id WHERE t.sha256 = ?1",
                [sha.to_vec()],
                token_columns,
            )
            .optional()
            .map_err(internal)?
            .map(token_record)
            .transpose()
        })
        .await
    }

    async fn org_tokens(&self, org: &OrgName) -> Result<Vec<OrgTokenRecord>, StoreError> {
        let org = org.clone();
        self.with_conn(move |conn| {
            let (org_id, _) = org_row(conn, &org)?;
            let mut out = token_rows(conn, org_id)?
                .into_iter()
                .map(token_record)
                .collect::<Result<Vec<_>, _>>()?;
            out.sort_by_key(|t| t.id);
            Ok(out)
        })
        .await
    }

    async fn revoke_org_token(
        &self,
        org: &OrgName,
        id: &TokenId,
    ) -> Result<OrgTokenRecord, StoreError> {
        let (org, id) = (org.clone(), *id);
        self.write(
            move |tx| {
                let (org_id, _) = org_row(tx, &org)?;
                let Some(row) = token_rows(tx, org_id)?
                    .into_iter()
                    .find(|r| sha_of(&r.0).is_some_and(|s| id.names(&s)))
                else {
                    return Err(StoreError::NotFound(format!(
                        "org '{org}' has no token {id} (see `sixpn orgs token {org} --list`)"
                    )));
                };
                tx.execute("DELETE FROM org_tokens WHERE sha256 = ?1", [row.0.clone()])
                    .map_err(internal)?;
                token_record(row)
            },
            |_| Some(Delta::Unchanged),
        )
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
        crate::store::publish_reports(&self.reports, reports);
        Ok(())
    }

    fn sync_reports(&self) -> watch::Receiver<Arc<SyncReports>> {
        self.reports.subscribe()
    }
}

mod cache;
mod schema;

use cache::*;
use schema::*;

#[cfg(test)]
mod tests;
