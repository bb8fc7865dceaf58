//! The reconcile loop: observe → plan → apply, again and again.
//!
//! It runs a pass when the store changes (the change feed coalesces bursts:
//! a pass always works on the newest snapshot), when netlink reports a change
//! on our interface, when wireguard-go had to be restarted, periodically
//! (WireGuard peers have no change events, so they are re-read at an interval
//! that scales with how long reading them takes), and after a failure (with
//! backoff). Between passes it keeps what it last observed plus what it
//! applied, so a store change costs a plan and the changes, not a full dump.
//!
//! Failures never stop the loop: a failed item is logged, the cache is
//! dropped so the next pass re-reads the kernel, and the pass is retried
//! (with backoff, up to 5 s). What did go in is still published, so one
//! failing peer doesn't hold up the others; a peer counts as installed only
//! once both its WireGuard entry and our route to it are in. A route to a
//! peer's /120 that someone else already holds is never taken over: that
//! peer's route fails, naming it, on every retry until they remove theirs.
//! If the store can't be read the last snapshot stays in force; before the
//! first snapshot nothing is deleted (see [`crate::plan`]).
//!
//! The isolation firewall ([`crate::plan::nft`]) comes first in every pass,
//! before the interface is created or a peer installed: if it can't be put
//! in place the pass stops there (fail closed). An nftables change made by
//! anyone else (an `nft flush ruleset`) triggers a firewall-only pass at
//! once; a failed firewall change makes the next one a full replace.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::dataplane::{Firewall, KernelError, NetEvent, Netlink, WgDevice, MTU};
use crate::liveness::{DataplaneHealth, DataplaneView, PeerStats};
use crate::model::{GatewayName, InterfaceName, OrgPrefix, PeerNet, PrivateKey, PublicKey};
use crate::plan::nft::{self, FirewallPlan, ObservedTable};
use crate::plan::{self, Desired, Identity, Observed, Plan, Touched};
use crate::store::Revision;
use crate::store::{Snapshot, Store};

/// The slowest the WireGuard peers are re-read for drift.
const MAX_WG_INTERVAL: Duration = Duration::from_secs(30);
/// The quickest the WireGuard peers are re-read for drift.
const MIN_WG_INTERVAL: Duration = Duration::from_secs(1);
/// How long reading the peers may take relative to the interval (1/20 = 5%
/// of a core at most, even with 100k peers).
const WG_READ_SHARE: u32 = 20;
/// A full resync of everything, whatever the events said.
const FULL_RESYNC: Duration = Duration::from_secs(30);
/// Netlink events arrive in bursts (one per route we add): wait this long
/// for the burst to end before looking.
const EVENT_SETTLE: Duration = Duration::from_millis(20);
/// The slowest the firewall table is re-read for drift the events missed.
const MAX_FW_INTERVAL: Duration = Duration::from_secs(300);
/// How long listing the table may take relative to the interval (listing
/// 100k elements takes ~3 s: then it is re-read every minute, not every 30 s).
const FW_READ_SHARE: u32 = 20;

/// What is live on the interface right now, published after every pass.
#[derive(Debug, Clone, Default)]
pub struct Installed {
    /// Installed peers and when this daemon first saw them installed.
    pub peers: HashMap<PublicKey, SystemTime>,
    /// Peers registered on this gateway.
    pub registered: usize,
    /// When the kernel last matched the store.
    pub last_sync: Option<SystemTime>,
    /// The store revision the pass planned from (0 before the first).
    pub revision: Revision,
    /// Peers registered on this gateway but not live, by key.
    pub missing: Vec<PublicKey>,
    /// Bumped whenever the set of live peers changes, so that a reader
    /// can tell without comparing them.
    pub peer_set: u64,
}

impl Installed {
    /// Whether a pass got as far as publishing: before that, the peers map
    /// says nothing of the kernel (it may well have every peer, after a
    /// restart).
    pub fn published(&self) -> bool {
        self.revision > 0
    }
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct Counters {
    /// Passes run.
    pub passes: AtomicU64,
    /// Passes that failed somewhere.
    pub errors: AtomicU64,
    /// Changes made that the store did not ask for (drift repaired).
    pub drift_repairs: AtomicU64,
    /// Kernel changes made.
    pub changes: AtomicU64,
    /// Firewall transactions committed (replaces and element batches).
    pub firewall_changes: AtomicU64,
    /// Total time spent in passes, in microseconds.
    pub pass_micros: AtomicU64,
    /// Store-change passes that followed the store's writes instead of
    /// comparing everything.
    pub followed: AtomicU64,
}

/// Settings of one reconciler.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This gateway's name in the store.
    pub gateway: GatewayName,
    /// The interface we own.
    pub interface: InterfaceName,
    /// The gateway's private key.
    pub private_key: PrivateKey,
    /// Identity for planning.
    pub identity: Identity,
}

/// Which parts of the cached state are stale.
#[derive(Debug, Clone, Copy)]
struct Need {
    snapshot: bool,
    wg: bool,
    net: bool,
    fw: bool,
}

impl Need {
    const ALL: Need = Need {
        snapshot: true,
        wg: true,
        net: true,
        fw: true,
    };
    const NONE: Need = Need {
        snapshot: false,
        wg: false,
        net: false,
        fw: false,
    };
    fn any(self) -> bool {
        self.snapshot || self.wg || self.net || self.fw
    }
}

/// The reconciler; [`Reconciler::run`] is the loop.
pub struct Reconciler {
    wg: Arc<dyn WgDevice>,
    nl: Arc<dyn Netlink>,
    fw: Arc<dyn Firewall>,
    store: Arc<dyn Store>,
    settings: Settings,
    snapshot: Option<Arc<Snapshot>>,
    /// What the kernel should hold for `snapshot`.
    desired: Option<Desired>,
    /// The last pass left the kernel (and `cache`) matching `desired`, so
    /// the next store change can be followed write by write.
    in_sync: bool,
    /// Desired peers not live, as last published.
    missing: BTreeSet<PublicKey>,
    cache: Observed,
    /// The table as last observed and changed; `None`: must be re-read.
    fw_cache: Option<Option<ObservedTable>>,
    /// The last firewall change failed: replace the table whole next time.
    fw_force_replace: bool,
    fw_interval: Duration,
    wg_interval: Duration,
    installed: watch::Sender<Arc<Installed>>,
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
    counters: Arc<Counters>,
}

impl Reconciler {
    /// A reconciler over the given adapters and store.
    pub fn new(
        wg: Arc<dyn WgDevice>,
        nl: Arc<dyn Netlink>,
        fw: Arc<dyn Firewall>,
        store: Arc<dyn Store>,
        settings: Settings,
    ) -> Self {
        Self {
            wg,
            nl,
            fw,
            store,
            settings,
            snapshot: None,
            desired: None,
            in_sync: false,
            missing: BTreeSet::new(),
            cache: Observed::default(),
            fw_cache: None,
            fw_force_replace: false,
            fw_interval: FULL_RESYNC,
            wg_interval: MIN_WG_INTERVAL,
            installed: watch::channel(Arc::new(Installed::default())).0,
            snapshots: watch::channel(None).0,
            counters: Arc::default(),
        }
    }

    /// What is installed, updated after every pass.
    pub fn installed(&self) -> watch::Receiver<Arc<Installed>> {
        self.installed.subscribe()
    }

    /// The snapshot each pass worked from, for the DNS side: it follows the
    /// same store state the kernel does, read once.
    pub fn snapshots(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.snapshots.subscribe()
    }

    /// The loop's counters.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// The reconciler's part of `/metrics`.
    pub fn metrics(&self) -> Arc<dyn crate::metrics::MetricsSource> {
        Arc::new(Metrics {
            wg: self.wg.clone(),
            installed: self.installed.subscribe(),
            snapshots: self.snapshots.subscribe(),
            counters: self.counters.clone(),
        })
    }

    /// The view the API uses to wait for peers and read their stats.
    pub fn view(&self) -> Arc<dyn DataplaneView> {
        Arc::new(View {
            wg: self.wg.clone(),
            installed: self.installed.subscribe(),
        })
    }

    /// Runs until `shutdown` turns true. The interface and everything on it
    /// stay when it returns: a restarted daemon picks them up unchanged.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let span = info_span!("reconcile", interface = %self.settings.interface);
        async move {
            let mut feed = self.store.subscribe();
            let mut restarts = self.wg.restarts();
            let mut events = match self.nl.subscribe() {
                Ok(rx) => Some(rx),
                Err(e) => {
                    warn!(error = %e, "no netlink events; drift is found by periodic resync only");
                    None
                }
            };
            let mut fw_events = match self.fw.subscribe() {
                Ok(rx) => Some(rx),
                Err(e) => {
                    warn!(error = %e, "no nftables events; a flushed table is found by periodic resync only");
                    None
                }
            };
            let mut need = Need::ALL;
            let mut backoff = Duration::from_millis(100);
            let mut retry_at: Option<Instant> = None;
            let mut next_wg = Instant::now() + self.wg_interval;
            let mut next_full = Instant::now() + FULL_RESYNC;
            let mut next_fw = Instant::now() + self.fw_interval;
            // Netlink events are debounced without blocking the loop: a store
            // change arriving meanwhile is served at once.
            let mut net_due: Option<Instant> = None;
            let mut fw_due: Option<Instant> = None;
            loop {
                if need.any() {
                    let ok = self.pass(need).await;
                    need = Need::NONE;
                    if ok {
                        backoff = Duration::from_millis(100);
                        retry_at = None;
                    } else {
                        retry_at = Some(Instant::now() + backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    next_wg = next_wg.min(Instant::now() + self.wg_interval);
                    next_fw = next_fw.min(Instant::now() + self.fw_interval);
                }
                let wake = [retry_at, net_due, fw_due]
                    .into_iter()
                    .flatten()
                    .fold(next_wg.min(next_full).min(next_fw), Instant::min);
                tokio::select! {
                    _ = shutdown.changed() => {
                        if *shutdown.borrow() { return; }
                    }
                    r = feed.changed() => {
                        if r.is_err() {
                            warn!("store change feed closed; relying on periodic resync");
                            feed = self.store.subscribe();
                        }
                        need.snapshot = true;
                    }
                    _ = restarts.changed() => {
                        warn!(backend = self.wg.backend_name(),
                            "WireGuard device was restarted; full resync");
                        need = Need { fw: need.fw, ..Need::ALL };
                    }
                    Some(ev) = next_event(&mut events) => {
                        debug!(?ev, "netlink event");
                        if let Some(rx) = events.as_mut() {
                            while rx.try_recv().is_ok() {}
                        }
                        net_due.get_or_insert_with(|| Instant::now() + EVENT_SETTLE);
                    }
                    Some(()) = next_fw_event(&mut fw_events) => {
                        if let Some(rx) = fw_events.as_mut() {
                            while rx.try_recv().is_ok() {}
                        }
                        info!("nftables changed by someone else; checking our table");
                        fw_due.get_or_insert_with(|| Instant::now() + EVENT_SETTLE);
                    }
                    _ = tokio::time::sleep_until(wake) => {
                        let now = Instant::now();
                        if now >= next_wg {
                            need.wg = true;
                            next_wg = now + self.wg_interval;
                        }
                        if now >= next_full {
                            // The firewall has its own, slower, period.
                            need = Need { fw: need.fw, ..Need::ALL };
                            next_full = now + FULL_RESYNC;
                        }
                        if now >= next_fw {
                            need.fw = true;
                            next_fw = now + self.fw_interval;
                        }
                        if retry_at.is_some_and(|r| now >= r) {
                            // A failed firewall step dropped its cache, so
                            // it is re-read anyway; other failures need not
                            // list a table of 100k elements again.
                            need = Need { fw: need.fw, ..Need::ALL };
                        }
                        if net_due.is_some_and(|d| now >= d) {
                            need.net = true;
                            net_due = None;
                        }
                        if fw_due.is_some_and(|d| now >= d) {
                            need.fw = true;
                            fw_due = None;
                        }
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    /// One observe → plan → apply pass. Returns false if anything failed.
    pub async fn pass_all(&mut self) -> bool {
        self.pass(Need::ALL).await
    }

    /// The pass the loop runs on a store change: a new snapshot, planned
    /// against what it already knows of the kernel (no re-read).
    pub async fn pass_store_change(&mut self) -> bool {
        self.pass(Need {
            snapshot: true,
            ..Need::NONE
        })
        .await
    }

    async fn pass(&mut self, need: Need) -> bool {
        let t0 = std::time::Instant::now();
        let ok = self.pass_inner(need).await;
        let micros = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.counters
            .pass_micros
            .fetch_add(micros, Ordering::Relaxed);
        self.counters.passes.fetch_add(1, Ordering::Relaxed);
        ok
    }

    async fn pass_inner(&mut self, need: Need) -> bool {
        let store_changed = need.snapshot;
        // An unreadable store is retried with the loop's backoff (the feed
        // may not move again once the store is back), while the kernel
        // keeps the last applied state.
        let mut store_ok = true;
        // A store change on a kernel that matched the last snapshot: follow
        // the writes (if the store still has them) and look at what they
        // touched only, instead of comparing everything.
        let only_store = need.snapshot && !(need.wg || need.net || need.fw);
        let from = self
            .snapshot
            .as_ref()
            .filter(|_| only_store && self.in_sync && self.desired.is_some())
            .map(|s| s.revision);
        let mut touched = None;
        if need.snapshot {
            let read = match from {
                Some(from) => self.store.snapshot_since(from).await,
                None => self.store.snapshot().await.map(|s| (s, None)),
            };
            match read {
                Ok((s, deltas)) => {
                    let newer = self
                        .snapshot
                        .as_ref()
                        .is_none_or(|old| old.revision != s.revision);
                    if newer {
                        self.snapshots.send_replace(Some(s.clone()));
                    }
                    let gw = &self.settings.gateway;
                    match (deltas, self.desired.as_mut()) {
                        (Some(deltas), Some(desired)) if from.is_some() => {
                            let mut t = Touched::default();
                            for d in &deltas {
                                desired.follow(d, gw, &mut t);
                            }
                            touched = Some(t);
                        }
                        _ => self.desired = Some(Desired::from_snapshot(&s, gw)),
                    }
                    self.snapshot = Some(s);
                }
                Err(e) => {
                    store_ok = false;
                    warn!(error = %e, "store unreadable; keeping the last applied state");
                }
            }
        }
        let desired = self.desired.take();
        let result = match &touched {
            Some(t) => self.follow_plan_apply(desired.as_ref(), t).await,
            None => {
                self.observe_plan_apply(need, store_changed, desired.as_ref())
                    .await
            }
        };
        self.desired = desired;
        self.in_sync = result.is_ok();
        match result {
            Ok(()) => store_ok,
            Err(errors) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                for e in &errors {
                    warn!(error = %e, errno = e.errno, "kernel change failed; will retry");
                }
                // Don't trust the cache after a failure: re-read next time.
                self.cache = Observed::default();
                false
            }
        }
    }

    async fn observe(&mut self, need: Need) -> Result<(), Vec<KernelError>> {
        if need.wg || self.cache.device.is_none() {
            let t0 = std::time::Instant::now();
            self.cache.device = self.wg.get().await.map_err(|e| vec![e])?;
            let took = t0.elapsed();
            self.wg_interval = (took * WG_READ_SHARE).clamp(MIN_WG_INTERVAL, MAX_WG_INTERVAL);
        }
        if need.net || self.cache.link.is_none() {
            let name = self.settings.interface.as_str();
            self.cache.link = self.nl.link(name).await.map_err(|e| vec![e])?;
            if let Some(link) = self.cache.link {
                self.cache.addresses = self
                    .nl
                    .addresses(link.index)
                    .await
                    .map_err(|e| vec![e])?
                    .into_iter()
                    .collect();
                self.cache.routes = self
                    .nl
                    .routes(link.index)
                    .await
                    .map_err(|e| vec![e])?
                    .into_iter()
                    .collect();
            }
            if self.nl.ensure_forwarding().await.map_err(|e| vec![e])? {
                warn!("IPv6 forwarding was off; turned it on (net.ipv6.conf.all.forwarding=1)");
            }
        }
        Ok(())
    }

    /// The firewall step: observe (if stale) → plan → apply. On failure the
    /// previous table is still in force (each change is one transaction),
    /// and the next step replaces the table whole.
    /// `touched`: only these orgs changed since the table last matched.
    async fn firewall(
        &mut self,
        desired: Option<&Desired>,
        fresh: bool,
        store_changed: bool,
        touched: Option<&BTreeSet<OrgPrefix>>,
    ) -> Result<(), Vec<KernelError>> {
        if fresh || self.fw_cache.is_none() {
            let t0 = std::time::Instant::now();
            self.fw_cache = Some(self.fw.observe().await.map_err(|e| vec![e])?);
            self.fw_interval = (t0.elapsed() * FW_READ_SHARE).clamp(FULL_RESYNC, MAX_FW_INTERVAL);
        }
        let seen = self.fw_cache.as_ref().and_then(Option::as_ref);
        let interface = self.settings.interface.as_str();
        let plan = match (desired, touched) {
            (Some(d), Some(t)) if !fresh => {
                nft::plan_firewall_touched(interface, &d.orgs, seen, self.fw_force_replace, t)
            }
            _ => nft::plan_firewall(
                interface,
                desired.map(|d| &d.orgs),
                seen,
                self.fw_force_replace,
            ),
        };
        let result = match &plan {
            FirewallPlan::Nothing => return Ok(()),
            FirewallPlan::Replace { ruleset, reason } => {
                let r = self.fw.replace(ruleset).await;
                if r.is_ok() {
                    info!(
                        reason,
                        orgs = ruleset.orgs.len(),
                        "isolation ruleset installed (table inet sixpn)"
                    );
                }
                r
            }
            FirewallPlan::Update { add, remove } => {
                let r = self.fw.update_elements(add, remove).await;
                if r.is_ok() {
                    if add.len() + remove.len() <= 8 {
                        for (p, org) in add {
                            info!(%org, prefix = %p, "org added to the isolation set");
                        }
                        for (a, _) in remove {
                            info!(prefix = %a, "element removed from the isolation set");
                        }
                    } else {
                        info!(
                            added = add.len(),
                            removed = remove.len(),
                            "isolation set updated"
                        );
                    }
                }
                r
            }
        };
        match result {
            Ok(()) => {
                self.counters
                    .firewall_changes
                    .fetch_add(1, Ordering::Relaxed);
                self.counters.changes.fetch_add(1, Ordering::Relaxed);
                if !store_changed {
                    info!("repaired the isolation firewall");
                    self.counters.drift_repairs.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(cached) = self.fw_cache.as_mut() {
                    nft::apply_firewall_to(cached, &plan);
                }
                self.fw_force_replace = false;
                Ok(())
            }
            Err(e) => {
                self.fw_cache = None;
                self.fw_force_replace = true;
                Err(vec![e])
            }
        }
    }

    /// A store change followed write by write: the firewall elements, peers,
    /// addresses and routes it touched, against the cache (which matched
    /// the kernel after the last pass).
    async fn follow_plan_apply(
        &mut self,
        desired: Option<&Desired>,
        touched: &Touched,
    ) -> Result<(), Vec<KernelError>> {
        let Some(want) = desired else {
            return self.observe_plan_apply(Need::ALL, true, desired).await;
        };
        self.counters.followed.fetch_add(1, Ordering::Relaxed);
        self.firewall(desired, false, true, Some(&touched.orgs))
            .await?;
        let me = self.settings.identity;
        let plan = plan::plan_touched(want, &self.cache, &me, touched);
        if plan.create_interface {
            // The cache has lost the interface: not a case to follow.
            return self.observe_plan_apply(Need::ALL, true, desired).await;
        }
        let errors = self.apply_and_count(&plan, desired, true).await;
        self.publish_touched(want, touched, errors.is_empty());
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Carries out `plan` and counts what took effect into the counters and
    /// the cache; returns what failed.
    async fn apply_and_count(
        &mut self,
        plan: &Plan,
        desired: Option<&Desired>,
        store_changed: bool,
    ) -> Vec<KernelError> {
        if plan.is_empty() {
            return Vec::new();
        }
        if !store_changed {
            info!(changes = plan.len(), "repairing drift");
        }
        let (done, errors) = self.apply(plan, desired).await;
        // Count what happened: a change that keeps failing (a foreign route
        // in the way) must not count again on every retry.
        let n = done.len() as u64;
        self.counters.changes.fetch_add(n, Ordering::Relaxed);
        if !store_changed {
            self.counters.drift_repairs.fetch_add(n, Ordering::Relaxed);
        }
        plan::apply_to(&mut self.cache, &done, &self.settings.identity);
        errors
    }

    async fn observe_plan_apply(
        &mut self,
        need: Need,
        store_changed: bool,
        desired: Option<&Desired>,
    ) -> Result<(), Vec<KernelError>> {
        // First, and nothing else until it is in: fail closed.
        self.firewall(desired, need.fw, store_changed, None).await?;
        self.observe(need).await?;
        let me = self.settings.identity;
        let mut plan = plan::plan(desired, &self.cache, &me);
        if plan.create_interface {
            info!(
                backend = self.wg.backend_name(),
                "creating the WireGuard interface"
            );
            self.wg.ensure().await.map_err(|e| vec![e])?;
            self.observe(Need::ALL).await?;
            plan = plan::plan(desired, &self.cache, &me);
            if plan.create_interface {
                return Err(vec![KernelError::new(
                    format!("create interface {}", self.settings.interface),
                    "the interface is still missing after creating it",
                )]);
            }
        }
        let errors = self.apply_and_count(&plan, desired, store_changed).await;
        // Also after a partial failure: the peers that did go in are live,
        // and the API is waiting for them.
        self.publish(desired, errors.is_empty());
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Carries out `plan`. One failed item doesn't stop the others. Returns
    /// the part of the plan that took effect, and what failed.
    /// The WireGuard part and the netlink part go to different kernel
    /// interfaces and don't depend on each other (a route to a /120 whose
    /// peer isn't in yet just drops, as it would without the route), so
    /// they run side by side: a bulk install takes the longer of the two,
    /// not their sum.
    async fn apply(&self, plan: &Plan, desired: Option<&Desired>) -> (Plan, Vec<KernelError>) {
        let Some(link) = self.cache.link else {
            return (
                Plan::default(),
                vec![KernelError::new("apply", "interface vanished")],
            );
        };
        let ((wg, mut errors), (mut done, net_errors)) = tokio::join!(
            self.apply_wg(plan, desired),
            self.apply_net(plan, desired, link.index)
        );
        errors.extend(net_errors);
        done.configure_device = wg.configure_device;
        done.upsert_peers = wg.upsert_peers;
        done.remove_peers = wg.remove_peers;
        (done, errors)
    }

    /// The device and its peers; returns what took effect and what failed.
    async fn apply_wg(&self, plan: &Plan, desired: Option<&Desired>) -> (Plan, Vec<KernelError>) {
        let mut errors = Vec::new();
        let mut done = Plan::default();
        if plan.configure_device {
            match self
                .wg
                .configure(
                    &self.settings.private_key,
                    self.settings.identity.listen_port,
                )
                .await
            {
                Ok(()) => {
                    done.configure_device = true;
                    info!(
                        listen_port = self.settings.identity.listen_port,
                        public_key = %self.settings.identity.public_key,
                        "WireGuard device configured"
                    );
                }
                Err(e) => errors.push(e),
            }
        }
        if !plan.upsert_peers.is_empty() || !plan.remove_peers.is_empty() {
            match self
                .wg
                .update_peers(&plan.upsert_peers, &plan.remove_peers)
                .await
            {
                Ok(()) => {
                    done.upsert_peers.clone_from(&plan.upsert_peers);
                    done.remove_peers.clone_from(&plan.remove_peers);
                    for u in &plan.upsert_peers {
                        match desired.and_then(|d| d.installed.get(&u.public_key)) {
                            Some(p) => info!(org = %p.org, peer = %p.name, net = %u.net,
                                "peer installed"),
                            None => info!(key = %u.public_key, net = %u.net, "peer installed"),
                        }
                    }
                    for k in &plan.remove_peers {
                        info!(key = %k, "peer removed");
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        (done, errors)
    }

    /// The link, addresses and routes; returns what took effect and what
    /// failed.
    async fn apply_net(
        &self,
        plan: &Plan,
        desired: Option<&Desired>,
        index: u32,
    ) -> (Plan, Vec<KernelError>) {
        let mut errors = Vec::new();
        let mut done = Plan::default();
        if plan.link_up {
            match self.nl.set_link_up(index, MTU).await {
                Ok(()) => {
                    done.link_up = true;
                    info!(mtu = MTU, "interface up");
                }
                Err(e) => errors.push(e),
            }
        }
        for a in &plan.add_addresses {
            match self.nl.add_address(index, *a).await {
                Ok(()) => {
                    done.add_addresses.push(*a);
                    info!(address = %a, "org DNS address added");
                }
                Err(e) => errors.push(e),
            }
        }
        for (a, len) in &plan.remove_addresses {
            match self.nl.del_address(index, *a, *len).await {
                Ok(()) => {
                    done.remove_addresses.push((*a, *len));
                    info!(address = %a, "org DNS address removed");
                }
                Err(e) => errors.push(e),
            }
        }
        if !plan.add_routes.is_empty() {
            let results = self.nl.add_routes(index, &plan.add_routes).await;
            // Failures name the peer: the operator has to find whose traffic
            // a route in the way (someone else's) is taking.
            let peers: HashMap<_, _> = match desired {
                Some(d) if results.iter().any(Result::is_err) => d
                    .installed
                    .values()
                    .map(|p| ((p.net.network(), PeerNet::LEN), p))
                    .collect(),
                _ => HashMap::new(),
            };
            for (r, net) in results.into_iter().zip(&plan.add_routes) {
                match r {
                    Ok(()) => done.add_routes.push(*net),
                    Err(mut e) => {
                        if let Some(p) = peers.get(net) {
                            e.op = format!("{} for peer {} of org {}", e.op, p.name, p.org);
                        }
                        errors.push(e);
                    }
                }
            }
            info!(routes = done.add_routes.len(), "peer routes added");
        }
        if !plan.remove_routes.is_empty() {
            let results = self.nl.del_routes(index, &plan.remove_routes).await;
            for (r, net) in results.into_iter().zip(&plan.remove_routes) {
                match r {
                    Ok(()) => done.remove_routes.push(*net),
                    Err(e) => errors.push(e),
                }
            }
            info!(routes = done.remove_routes.len(), "peer routes removed");
        }
        (done, errors)
    }

    /// Publishes which desired peers are live ([`is_live`]), each with when
    /// it first was. `ok`: the pass had no failure, so a complete set means
    /// the kernel matches the store.
    fn publish(&mut self, desired: Option<&Desired>, ok: bool) {
        let Some(desired) = desired else { return };
        let Some(device) = self.cache.device.as_ref() else {
            return;
        };
        let now = SystemTime::now();
        let prev = self.installed.borrow().clone();
        let mut peers = HashMap::with_capacity(desired.installed.len());
        for (k, want) in &desired.installed {
            if is_live(device, &self.cache.routes, k, want) {
                peers.insert(*k, prev.peers.get(k).copied().unwrap_or(now));
            }
        }
        self.missing = desired
            .installed
            .keys()
            .filter(|k| !peers.contains_key(*k))
            .copied()
            .collect();
        let changed =
            peers.len() != prev.peers.len() || peers.keys().any(|k| !prev.peers.contains_key(k));
        let complete = ok && self.missing.is_empty();
        self.installed.send_replace(Arc::new(Installed {
            peers,
            registered: desired.registered,
            last_sync: if complete { Some(now) } else { prev.last_sync },
            revision: self.snapshot.as_ref().map_or(0, |s| s.revision),
            missing: self.missing.iter().copied().collect(),
            peer_set: prev.peer_set + u64::from(changed),
        }));
    }

    /// [`Reconciler::publish`] for the peers a followed store change
    /// touched; the others are as last published.
    fn publish_touched(&mut self, desired: &Desired, touched: &Touched, ok: bool) {
        let Some(device) = self.cache.device.as_ref() else {
            return;
        };
        let (missing, routes) = (&mut self.missing, &self.cache.routes);
        let now = SystemTime::now();
        let revision = self.snapshot.as_ref().map_or(0, |s| s.revision);
        self.installed.send_modify(|installed| {
            // Copies only if a reader holds the previous one.
            let i = Arc::make_mut(installed);
            let mut changed = false;
            for k in &touched.peers {
                let want = desired.installed.get(k);
                if want.is_some_and(|w| is_live(device, routes, k, w)) {
                    if let std::collections::hash_map::Entry::Vacant(e) = i.peers.entry(*k) {
                        e.insert(now);
                        changed = true;
                    }
                    missing.remove(k);
                } else {
                    changed |= i.peers.remove(k).is_some();
                    if want.is_some() {
                        missing.insert(*k);
                    } else {
                        missing.remove(k);
                    }
                }
            }
            i.registered = desired.registered;
            i.revision = revision;
            i.missing = missing.iter().copied().collect();
            i.peer_set += u64::from(changed);
            if ok && missing.is_empty() {
                i.last_sync = Some(now);
            }
        });
    }
}

/// Whether the desired peer `want` (key `key`) is live: on the device with
/// its /120 and with our route to it (without the route, traffic to the
/// peer goes wherever the route in the way sends it).
fn is_live(
    device: &crate::dataplane::DeviceState,
    routes: &BTreeSet<(std::net::Ipv6Addr, u8)>,
    key: &PublicKey,
    want: &plan::DesiredPeer,
) -> bool {
    let ip = crate::dataplane::AllowedIp::from(want.net);
    device.peers.get(key).is_some_and(|p| p.allowed_ips == [ip])
        && routes.contains(&(want.net.network(), PeerNet::LEN))
}

async fn next_fw_event(events: &mut Option<tokio::sync::mpsc::Receiver<()>>) -> Option<()> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Reconcile counters and per-org peer figures for Prometheus.
struct Metrics {
    wg: Arc<dyn WgDevice>,
    installed: watch::Receiver<Arc<Installed>>,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    counters: Arc<Counters>,
}

#[async_trait]
impl crate::metrics::MetricsSource for Metrics {
    async fn render(&self, out: &mut String) {
        use crate::metrics::{family, header, sample};
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        family(
            out,
            "sixpn_reconcile_passes_total",
            "counter",
            "Reconcile passes run.",
            load(&c.passes),
        );
        family(
            out,
            "sixpn_reconcile_errors_total",
            "counter",
            "Reconcile passes in which a kernel change failed.",
            load(&c.errors),
        );
        family(
            out,
            "sixpn_reconcile_duration_seconds_total",
            "counter",
            "Time spent in reconcile passes.",
            load(&c.pass_micros) as f64 / 1e6,
        );
        family(
            out,
            "sixpn_kernel_changes_total",
            "counter",
            "Kernel changes made (peers, addresses, routes, link, firewall).",
            load(&c.changes),
        );
        family(
            out,
            "sixpn_reconcile_followed_passes_total",
            "counter",
            "Store-change passes that followed the store's writes (cost: the change) instead of comparing everything.",
            load(&c.followed),
        );
        family(
            out,
            "sixpn_drift_repairs_total",
            "counter",
            "Kernel changes made that the store did not ask for.",
            load(&c.drift_repairs),
        );
        family(
            out,
            "sixpn_firewall_transactions_total",
            "counter",
            "nftables transactions committed on table inet sixpn (replaces and set-element batches).",
            load(&c.firewall_changes),
        );
        let installed = self.installed.borrow().clone();
        family(
            out,
            "sixpn_peers_registered",
            "gauge",
            "Peers registered on this gateway.",
            installed.registered,
        );
        family(
            out,
            "sixpn_peers_installed",
            "gauge",
            "Peers live on this gateway's interface.",
            installed.peers.len(),
        );
        if let Some(t) = installed.last_sync {
            let secs = t
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            family(
                out,
                "sixpn_last_sync_timestamp_seconds",
                "gauge",
                "When the kernel last matched the store.",
                secs,
            );
        }
        // Per org: handshakes and traffic, from one read of the device.
        let snapshot = self.snapshots.borrow().clone();
        let (Some(snap), Ok(Some(device))) = (snapshot, self.wg.get().await) else {
            return;
        };
        let now = SystemTime::now();
        let mut by_org: std::collections::BTreeMap<&str, (u64, u64, u64, u64)> = Default::default();
        let buckets = [60u64, 180, 600, 3600];
        let mut hist = [0u64; 5];
        let mut never = 0u64;
        for p in &snap.peers {
            let Some(k) = device.peers.get(&p.public_key) else {
                continue;
            };
            let e = by_org.entry(p.org.as_str()).or_default();
            e.0 += 1;
            e.1 += k.rx_bytes;
            e.2 += k.tx_bytes;
            match k.last_handshake.and_then(|t| now.duration_since(t).ok()) {
                Some(age) => {
                    e.3 += 1;
                    let i = buckets
                        .iter()
                        .position(|b| age.as_secs() <= *b)
                        .unwrap_or(4);
                    hist[i] += 1;
                }
                None => never += 1,
            }
        }
        header(
            out,
            "sixpn_org_peers_installed",
            "gauge",
            "Installed peers per org.",
        );
        for (org, v) in &by_org {
            sample(out, "sixpn_org_peers_installed", &[("org", org)], v.0);
        }
        header(
            out,
            "sixpn_org_rx_bytes_total",
            "counter",
            "Bytes received from an org's peers.",
        );
        for (org, v) in &by_org {
            sample(out, "sixpn_org_rx_bytes_total", &[("org", org)], v.1);
        }
        header(
            out,
            "sixpn_org_tx_bytes_total",
            "counter",
            "Bytes sent to an org's peers.",
        );
        for (org, v) in &by_org {
            sample(out, "sixpn_org_tx_bytes_total", &[("org", org)], v.2);
        }
        header(
            out,
            "sixpn_peer_handshake_age_seconds",
            "histogram",
            "Age of installed peers' latest handshake.",
        );
        let mut cum = 0;
        for (i, b) in buckets.iter().enumerate() {
            cum += hist[i];
            sample(
                out,
                "sixpn_peer_handshake_age_seconds_bucket",
                &[("le", &b.to_string())],
                cum,
            );
        }
        cum += hist[4];
        sample(
            out,
            "sixpn_peer_handshake_age_seconds_bucket",
            &[("le", "+Inf")],
            cum,
        );
        sample(out, "sixpn_peer_handshake_age_seconds_count", &[], cum);
        family(
            out,
            "sixpn_peers_never_handshaked",
            "gauge",
            "Installed peers that never completed a handshake.",
            never,
        );
    }
}

async fn next_event(
    events: &mut Option<tokio::sync::mpsc::Receiver<NetEvent>>,
) -> Option<NetEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The API's window onto the dataplane.
struct View {
    wg: Arc<dyn WgDevice>,
    installed: watch::Receiver<Arc<Installed>>,
}

#[async_trait]
impl DataplaneView for View {
    async fn wait_installed(&self, key: &PublicKey, timeout: Duration) -> bool {
        let mut rx = self.installed.clone();
        tokio::time::timeout(timeout, rx.wait_for(|i| i.peers.contains_key(key)))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    async fn wait_published(&self, timeout: Duration) -> bool {
        let mut rx = self.installed.clone();
        tokio::time::timeout(timeout, rx.wait_for(|i| i.published()))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn is_installed(&self, key: &PublicKey) -> bool {
        self.installed.borrow().peers.contains_key(key)
    }

    async fn peer_stats(&self, key: &PublicKey) -> Option<PeerStats> {
        let since = *self.installed.borrow().peers.get(key)?;
        let device = self.wg.get().await.ok()??;
        let p = device.peers.get(key)?;
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs())
        };
        Some(PeerStats {
            endpoint: p.endpoint.map(|e| e.to_string()),
            latest_handshake: p.last_handshake.and_then(unix),
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
            installed_since: unix(since),
        })
    }

    fn health(&self) -> DataplaneHealth {
        let i = self.installed.borrow();
        DataplaneHealth {
            backend: self.wg.backend_name().to_owned(),
            installed_peers: i.peers.len(),
            registered_peers: i.registered,
            last_sync: i.last_sync.and_then(|t| {
                t.duration_since(SystemTime::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs())
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;
    use crate::dataplane::fake::{peer_ips, FakeKernel};
    use crate::model::PeerName;
    use crate::store::sqlite::SqliteStore;
    use crate::store::{Gateway, NewPeer};

    struct Rig {
        _dir: tempfile::TempDir,
        kernel: FakeKernel,
        store: Arc<SqliteStore>,
        rec: Reconciler,
    }

    async fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path().join("s.db")).unwrap());
        let key = PrivateKey::generate();
        let host = "a7b:d6b".parse().unwrap();
        store
            .register_gateway(&Gateway {
                name: "lhr-1".parse().unwrap(),
                region: "lhr".parse().unwrap(),
                host_id: host,
                endpoint: "gw:51820".parse().unwrap(),
                public_key: key.public_key(),
            })
            .await
            .unwrap();
        store.create_org(&"acme".parse().unwrap()).await.unwrap();
        let kernel = FakeKernel::new();
        let rec = Reconciler::new(
            Arc::new(kernel.clone()),
            Arc::new(kernel.clone()),
            Arc::new(kernel.clone()),
            store.clone(),
            Settings {
                gateway: "lhr-1".parse().unwrap(),
                interface: "sixpn0".parse().unwrap(),
                identity: Identity {
                    public_key: key.public_key(),
                    listen_port: 51820,
                    host_id: host,
                },
                private_key: key,
            },
        );
        Rig {
            _dir: dir,
            kernel,
            store,
            rec,
        }
    }

    async fn add_peer(store: &SqliteStore, name: &str) -> PublicKey {
        let k = PrivateKey::generate().public_key();
        store
            .create_peer(&NewPeer {
                org: "acme".parse().unwrap(),
                name: name.parse().unwrap(),
                region: "lhr".parse().unwrap(),
                public_key: k,
            })
            .await
            .unwrap();
        k
    }

    #[tokio::test]
    async fn first_pass_builds_everything_and_second_changes_nothing() {
        let mut r = rig().await;
        let a = add_peer(&r.store, "a").await;
        assert!(r.rec.pass_all().await);
        let calls = r.kernel.take_calls();
        assert!(calls.contains(&"create interface".to_string()));
        assert!(calls.contains(&"link up mtu 1420".to_string()));
        assert!(calls.contains(&"configure port 51820".to_string()));
        assert!(calls.contains(&"add address fdaa:0:1::3/128".to_string()));
        assert!(calls.contains(&"add route fdaa:0:1:a7b:d6b:0:a:0/120".to_string()));
        assert!(r.kernel.state().forwarding);
        assert_eq!(peer_ips(&r.kernel).len(), 1);
        assert!(r.rec.installed().borrow().peers.contains_key(&a));

        assert!(r.rec.pass_all().await);
        assert_eq!(r.kernel.take_calls(), Vec::<String>::new());
    }

    /// Store changes on a kernel in sync are followed write by write, and
    /// end where comparing everything would: a full pass afterwards finds
    /// nothing to do, and what is published matches.
    #[tokio::test]
    async fn store_changes_are_followed_and_end_where_a_full_pass_would() {
        let mut r = rig().await;
        for i in 0..5 {
            add_peer(&r.store, &format!("p{i}")).await;
        }
        assert!(r.rec.pass_all().await);
        r.kernel.take_calls();
        let followed = || r.rec.counters.followed.load(Ordering::Relaxed);
        assert_eq!(followed(), 0);

        // One add: one peer, one route, nothing else looked at or changed.
        let k = add_peer(&r.store, "new").await;
        assert!(r.rec.pass_store_change().await);
        assert_eq!(r.rec.counters.followed.load(Ordering::Relaxed), 1);
        let calls = r.kernel.take_calls();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert!(r.rec.installed().borrow().peers.contains_key(&k));

        // Several writes between passes, a removal of the org's last peers
        // on the way, and a new org: still followed, still exact.
        for name in ["p0", "p1", "p2", "p3", "p4", "new"] {
            r.store
                .remove_peer(&"acme".parse().unwrap(), &name.parse().unwrap())
                .await
                .unwrap();
        }
        r.store
            .create_org(&"globex".parse().unwrap())
            .await
            .unwrap();
        let g = PrivateKey::generate().public_key();
        r.store
            .create_peer(&NewPeer {
                org: "globex".parse().unwrap(),
                name: "g".parse().unwrap(),
                region: "lhr".parse().unwrap(),
                public_key: g,
            })
            .await
            .unwrap();
        assert!(r.rec.pass_store_change().await);
        assert_eq!(r.rec.counters.followed.load(Ordering::Relaxed), 2);
        let published = r.rec.installed().borrow().clone();
        assert_eq!(published.peers.keys().collect::<Vec<_>>(), vec![&g]);
        assert!(published.missing.is_empty() && published.last_sync.is_some());
        {
            let state = r.kernel.state();
            assert_eq!(state.device.peers.len(), 1);
            assert_eq!(state.routes.len(), 1);
            // acme's ::3 went with its last peer; globex's came.
            assert_eq!(
                state
                    .addresses
                    .iter()
                    .map(|a| a.0.to_string())
                    .collect::<Vec<_>>(),
                vec!["fdaa:0:2::3"]
            );
            let elements = state.firewall.as_ref().map_or(0, |t| t.elements.len());
            assert_eq!(elements, 2, "both orgs in the isolation set");
        }

        r.kernel.take_calls();
        assert!(r.rec.pass_all().await);
        assert_eq!(r.kernel.take_calls(), Vec::<String>::new());
    }

    #[tokio::test]
    async fn drift_is_repaired_and_counted() {
        let mut r = rig().await;
        let a = add_peer(&r.store, "a").await;
        r.rec.pass_all().await;
        r.kernel.take_calls();
        {
            let mut s = r.kernel.state();
            s.device.peers.remove(&a);
            s.routes.clear();
            s.addresses.clear();
        }
        assert!(
            r.rec
                .pass(Need {
                    wg: true,
                    net: true,
                    ..Need::NONE
                })
                .await
        );
        let calls = r.kernel.take_calls();
        assert_eq!(calls.len(), 3, "{calls:?}");
        assert_eq!(r.rec.counters.drift_repairs.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_failed_item_does_not_stop_the_others_and_is_retried() {
        let mut r = rig().await;
        add_peer(&r.store, "a").await;
        add_peer(&r.store, "b").await;
        r.kernel.state().fail_route_adds = 1;
        assert!(!r.rec.pass_all().await);
        assert_eq!(r.kernel.state().routes.len(), 1, "the other route went in");
        assert_eq!(peer_ips(&r.kernel).len(), 2, "peers went in");
        assert!(r.rec.pass_all().await);
        assert_eq!(r.kernel.state().routes.len(), 2);
    }

    #[tokio::test]
    async fn a_foreign_route_in_the_way_is_reported_not_taken_and_others_go_in() {
        let mut r = rig().await;
        let a = add_peer(&r.store, "a").await;
        // The next peer's /120 (slots are handed out from the lowest free).
        let net_b: Ipv6Addr = "fdaa:0:1:a7b:d6b:0:a:100".parse().unwrap();
        r.kernel.state().foreign_routes.insert((net_b, 120));
        let b = add_peer(&r.store, "b").await;
        let snap = r.store.snapshot().await.unwrap();
        let got = snap.peers.iter().find(|p| p.public_key == b).unwrap().net;
        assert_eq!(got.network(), net_b, "the layout this test assumes");

        let installed = r.rec.installed();
        assert!(!r.rec.pass_all().await);
        assert_eq!(r.rec.counters.errors.load(Ordering::Relaxed), 1);
        {
            let s = r.kernel.state();
            assert!(s.foreign_routes.contains(&(net_b, 120)), "left alone");
            assert!(!s.routes.contains(&(net_b, 120)));
            assert_eq!(s.routes.len(), 1, "a's route went in");
        }
        assert_eq!(peer_ips(&r.kernel).len(), 2);
        // a is live and published despite the failed pass; b, whose traffic
        // the foreign route takes, is not; the kernel does not match the
        // store, so no sync time.
        let now = installed.borrow().clone();
        assert!(now.peers.contains_key(&a));
        assert!(!now.peers.contains_key(&b));
        assert_eq!(now.last_sync, None);

        // Retries keep failing the same way, without counting phantom
        // changes; then the operator removes the route and b goes in.
        let changes = r.rec.counters.changes.load(Ordering::Relaxed);
        assert!(!r.rec.pass_all().await);
        assert!(!r.rec.pass_all().await);
        assert_eq!(r.rec.counters.errors.load(Ordering::Relaxed), 3);
        assert_eq!(r.rec.counters.changes.load(Ordering::Relaxed), changes);
        assert_eq!(r.rec.counters.drift_repairs.load(Ordering::Relaxed), 0);
        r.kernel.state().foreign_routes.clear();
        assert!(r.rec.pass_all().await);
        assert!(r.kernel.state().routes.contains(&(net_b, 120)));
        let now = installed.borrow().clone();
        assert!(now.peers.contains_key(&b));
        assert!(now.last_sync.is_some());
    }

    #[tokio::test]
    async fn the_loop_backs_off_while_a_foreign_route_stays_in_the_way() {
        let r = rig().await;
        let net_a: Ipv6Addr = "fdaa:0:1:a7b:d6b:0:a:0".parse().unwrap();
        r.kernel.state().foreign_routes.insert((net_a, 120));
        add_peer(&r.store, "a").await;
        let view = r.rec.view();
        let counters = r.rec.counters();
        let (stop_tx, stop_rx) = watch::channel(false);
        let store = r.store.clone();
        let task = tokio::spawn(r.rec.run(stop_rx));
        // Another peer arriving meanwhile is installed at once.
        let b = add_peer(&store, "b").await;
        assert!(view.wait_installed(&b, Duration::from_secs(2)).await);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // Backoff from 100 ms doubling: a handful of passes, not hundreds.
        let passes = counters.passes.load(Ordering::Relaxed);
        assert!((3..=10).contains(&passes), "{passes} passes in 1.5 s");
        assert_eq!(counters.errors.load(Ordering::Relaxed), passes);
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn restart_of_the_device_is_rebuilt() {
        let mut r = rig().await;
        add_peer(&r.store, "a").await;
        r.rec.pass_all().await;
        r.kernel.restart_device();
        assert!(r.rec.pass_all().await);
        let s = r.kernel.state();
        assert!(s.link.unwrap().up);
        assert_eq!(s.device.peers.len(), 1);
        assert_eq!(s.routes.len(), 1);
        assert_eq!(s.addresses.len(), 1);
    }

    fn position(calls: &[String], prefix: &str) -> usize {
        calls
            .iter()
            .position(|c| c.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {calls:?}"))
    }

    #[tokio::test]
    async fn the_firewall_goes_in_before_the_interface() {
        let mut r = rig().await;
        add_peer(&r.store, "a").await;
        assert!(r.rec.pass_all().await);
        let calls = r.kernel.take_calls();
        assert_eq!(calls[0], "firewall replace (1 orgs)", "{calls:?}");
        assert!(position(&calls, "firewall") < position(&calls, "create interface"));
        let table = r.kernel.state().firewall.clone().unwrap();
        assert_eq!(table.elements.len(), 1, "acme's element");
        assert!(r.rec.pass_all().await);
        assert_eq!(r.kernel.take_calls(), Vec::<String>::new());
    }

    #[tokio::test]
    async fn no_firewall_no_interface() {
        let mut r = rig().await;
        add_peer(&r.store, "a").await;
        r.kernel.state().fail_firewall = 1;
        assert!(!r.rec.pass_all().await);
        let calls = r.kernel.take_calls();
        assert!(
            calls.is_empty(),
            "nothing may happen without the firewall: {calls:?}"
        );
        assert!(r.kernel.state().link.is_none());
        assert!(r.rec.pass_all().await);
        let calls = r.kernel.take_calls();
        assert_eq!(calls[0], "firewall replace (1 orgs)");
        assert!(calls.contains(&"create interface".to_string()));
    }

    #[tokio::test]
    async fn a_new_org_is_one_element_update_and_a_failure_forces_a_replace() {
        let mut r = rig().await;
        assert!(r.rec.pass_all().await);
        r.kernel.take_calls();
        r.store
            .create_org(&"globex".parse().unwrap())
            .await
            .unwrap();
        let store_only = Need {
            snapshot: true,
            ..Need::NONE
        };
        assert!(r.rec.pass(store_only).await);
        assert_eq!(r.kernel.take_calls(), vec!["firewall update +1 -0"]);
        assert_eq!(
            r.kernel.state().firewall.as_ref().unwrap().elements.len(),
            2
        );

        // A rejected transaction: the table stays, the next change is a
        // full replace.
        r.store
            .create_org(&"initech".parse().unwrap())
            .await
            .unwrap();
        r.kernel.state().fail_firewall = 1;
        assert!(!r.rec.pass(store_only).await);
        assert_eq!(
            r.kernel.state().firewall.as_ref().unwrap().elements.len(),
            2
        );
        assert!(r.rec.pass(store_only).await);
        assert_eq!(r.kernel.take_calls(), vec!["firewall replace (3 orgs)"]);
    }

    #[tokio::test]
    async fn a_flushed_ruleset_is_replaced_and_counted_as_drift() {
        let mut r = rig().await;
        add_peer(&r.store, "a").await;
        assert!(r.rec.pass_all().await);
        r.kernel.take_calls();
        r.kernel.flush_ruleset();
        let fw_only = Need {
            fw: true,
            ..Need::NONE
        };
        assert!(r.rec.pass(fw_only).await);
        assert_eq!(r.kernel.take_calls(), vec!["firewall replace (1 orgs)"]);
        assert_eq!(r.rec.counters.drift_repairs.load(Ordering::Relaxed), 1);
        // Someone flushed the rules only: same.
        r.kernel.state().firewall.as_mut().unwrap().rules.clear();
        assert!(r.rec.pass(fw_only).await);
        assert_eq!(r.kernel.take_calls(), vec!["firewall replace (1 orgs)"]);
    }

    #[tokio::test]
    async fn the_loop_restores_a_flushed_ruleset_on_the_event() {
        let r = rig().await;
        let (stop_tx, stop_rx) = watch::channel(false);
        let kernel = r.kernel.clone();
        let task = tokio::spawn(r.rec.run(stop_rx));
        let present = || kernel.state().firewall.is_some();
        for _ in 0..100 {
            if present() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(present());
        kernel.flush_ruleset();
        let t0 = std::time::Instant::now();
        while !present() && t0.elapsed() < Duration::from_secs(2) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(present(), "not restored");
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn the_loop_follows_the_store_and_the_api_can_wait() {
        let r = rig().await;
        let view = r.rec.view();
        let (stop_tx, stop_rx) = watch::channel(false);
        let store = r.store.clone();
        let kernel = r.kernel.clone();
        let task = tokio::spawn(r.rec.run(stop_rx));
        let k = add_peer(&store, "live").await;
        assert!(view.wait_installed(&k, Duration::from_secs(2)).await);
        assert!(view.peer_stats(&k).await.is_some());
        store
            .remove_peer(
                &"acme".parse().unwrap(),
                &"live".parse::<PeerName>().unwrap(),
            )
            .await
            .unwrap();
        for _ in 0..100 {
            if kernel.state().device.peers.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(kernel.state().device.peers.is_empty());
        assert!(kernel.state().routes.is_empty());
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }
}
