//! The SQLite schema and its rows: the migrations, the connection setup,
//! the revision counter, the queries a write allocates with, and reading
//! the whole store into a [`Snapshot`].

use super::*;

/// Schema migrations; `user_version` is the number applied.
pub(super) const MIGRATIONS: &[&str] = &[
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
    // 3: when each org token was made and stops working (tokens made
    // before keep created_at 0 and never expire).
    "ALTER TABLE org_tokens ADD COLUMN created_at INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE org_tokens ADD COLUMN expires_at INTEGER;
     CREATE INDEX org_tokens_org ON org_tokens (org_id);",
    // 4: ephemeral peers' time to live in seconds (NULL: a normal peer, as
    // every peer made before is).
    "ALTER TABLE peers ADD COLUMN ephemeral INTEGER;",
];

/// An `ephemeral` column as the peer's time to live.
pub(super) fn ephemeral_ttl(v: Option<i64>) -> Result<Option<u64>, StoreError> {
    v.map(|t| u64::try_from(t).map_err(corrupt("ephemeral ttl")))
        .transpose()
}

pub(super) fn open_conn(path: &Path) -> Result<Connection, StoreError> {
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

pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
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

pub(super) fn bump_revision(tx: &rusqlite::Transaction<'_>) -> Result<Revision, StoreError> {
    tx.query_row(
        "UPDATE meta SET value = value + 1 WHERE key = 'revision' RETURNING value",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|v| v as Revision)
    .map_err(internal)
}

pub(super) fn read_revision(conn: &Connection) -> Result<Revision, StoreError> {
    conn.query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| {
        r.get::<_, i64>(0)
    })
    .map(|v| v as Revision)
    .map_err(internal)
}

pub(super) fn org_row(tx: &Connection, org: &OrgName) -> Result<(i64, NetworkId), StoreError> {
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
pub(super) fn free_slot(
    tx: &Connection,
    org_id: i64,
    gateway: &str,
) -> Result<PeerSlot, StoreError> {
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

pub(super) fn read_reports(conn: &Connection) -> Result<SyncReports, StoreError> {
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

pub(super) fn load_snapshot(conn: &mut Connection) -> Result<Snapshot, StoreError> {
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
                "SELECT org_id, name, gateway, slot, public_key, created_at, revision, ephemeral
                 FROM peers ORDER BY org_id, name",
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
            let ephemeral: Option<i64> = r.get(7).map_err(internal)?;
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
                ephemeral: ephemeral_ttl(ephemeral)?,
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
