//! The [`Store`] trait over etcd: reads from the follower, and every write
//! as one optimistic transaction with compares, retried on contention.

use super::*;

pub(super) fn not_exists(key: &str) -> Compare {
    Compare::create_revision(key, CompareOp::Equal, 0)
}

pub(super) fn unchanged(kv: &KeyValue) -> Compare {
    Compare::mod_revision(kv.key(), CompareOp::Equal, kv.mod_revision())
}

pub(super) fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> TxnOp {
    TxnOp::put(key, value, None)
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
                ephemeral: req.ephemeral,
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

    async fn add_org_token(&self, t: &NewOrgToken) -> Result<OrgTokenRecord, StoreError> {
        let (_, org_kv) = self.org(&t.org).await?;
        let tkey = self.keys.token(&t.sha256);
        let value = TokenValue {
            org: t.org.clone(),
            created_at: t.created_at,
            expires_at: t.expires_at,
        };
        let cmps = [not_exists(&tkey), unchanged(&org_kv)];
        let ops = vec![put(tkey.as_str(), encode(&value)?)];
        if self.commit(cmps, ops).await?.is_some() {
            Ok(OrgTokenRecord {
                id: TokenId::of(&t.sha256),
                org: t.org.clone(),
                created_at: t.created_at,
                expires_at: t.expires_at,
            })
        } else {
            Err(StoreError::Conflict(
                "that token is already registered".into(),
            ))
        }
    }

    async fn token_org(&self, sha: [u8; 32]) -> Result<Option<OrgTokenRecord>, StoreError> {
        self.get(&self.keys.token(&sha))
            .await?
            .map(|kv| token_record(&self.keys, &kv))
            .transpose()
    }

    async fn org_tokens(&self, org: &OrgName) -> Result<Vec<OrgTokenRecord>, StoreError> {
        self.org(org).await?;
        // Tokens are few (minted by hand); one range read of them all.
        let mut out = Vec::new();
        for kv in self.range(&self.keys.tokens(), false).await? {
            let t = token_record(&self.keys, &kv)?;
            if &t.org == org {
                out.push(t);
            }
        }
        out.sort_by_key(|t| t.id);
        Ok(out)
    }

    async fn revoke_org_token(
        &self,
        org: &OrgName,
        id: &TokenId,
    ) -> Result<OrgTokenRecord, StoreError> {
        let missing = || {
            StoreError::NotFound(format!(
                "org '{org}' has no token {id} (see `sixpn orgs token {org} --list`)"
            ))
        };
        for attempt in 0..MAX_ATTEMPTS {
            let mut found = None;
            for kv in self.range(&self.keys.tokens_with(id), false).await? {
                let t = token_record(&self.keys, &kv)?;
                if &t.org == org {
                    found = Some((t, kv));
                    break;
                }
            }
            let Some((t, kv)) = found else {
                return Err(missing());
            };
            let ops = vec![TxnOp::delete(kv.key(), None)];
            if self.commit([unchanged(&kv)], ops).await?.is_some() {
                return Ok(t);
            }
            jitter(attempt).await;
        }
        Err(contention("revoke token"))
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
        crate::store::publish_reports(&self.feeds.reports, reports);
        Ok(())
    }

    fn sync_reports(&self) -> watch::Receiver<Arc<SyncReports>> {
        self.feeds.reports.subscribe()
    }
}
