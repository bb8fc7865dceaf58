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

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::dataplane::{Firewall, NetEvent, Netlink, WgDevice};
use crate::liveness::DataplaneView;
use crate::model::{GatewayName, InterfaceName, PrivateKey, PublicKey};
use crate::plan::nft::ObservedTable;
use crate::plan::{Desired, Identity, Observed, Touched};
use crate::store::{Snapshot, Store};

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
    /// Just-in-time peers ([`jit`]); `None`: every registered peer is
    /// installed.
    pub jit: Option<JitSettings>,
    /// The handshake capture of just-in-time peers in the table, if any.
    pub capture: Option<crate::plan::nft::Capture>,
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
    /// When the next pass runs and what it re-reads.
    schedule: Schedule,
    installed: watch::Sender<Arc<Installed>>,
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
    counters: Arc<Counters>,
    /// Just-in-time peers: the admissions and the requests for more.
    jit: Option<JitState>,
    /// Registered peers left out for the backend's cap, as last said.
    over_cap: usize,
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
        let jit = settings.jit.map(JitState::new);
        Self {
            wg,
            nl,
            fw,
            store,
            settings,
            jit,
            over_cap: 0,
            snapshot: None,
            desired: None,
            in_sync: false,
            missing: BTreeSet::new(),
            cache: Observed::default(),
            fw_cache: None,
            fw_force_replace: false,
            schedule: Schedule::new(std::time::Instant::now()),
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
            fw: self.fw.clone(),
            nl: self.nl.clone(),
            interface: self.settings.interface.as_str().to_owned(),
            installed: self.installed.subscribe(),
            snapshots: self.snapshots.subscribe(),
            counters: self.counters.clone(),
            jit: self.jit_counters(),
        })
    }

    /// The view the API uses to wait for peers and read their stats.
    pub fn view(&self) -> Arc<dyn DataplaneView> {
        Arc::new(View {
            wg: self.wg.clone(),
            installed: self.installed.subscribe(),
            jit: self.jit_book(),
        })
    }

    /// Runs until `shutdown` turns true. The interface and everything on it
    /// stay when it returns: a restarted daemon picks them up unchanged.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let span = info_span!("reconcile", interface = %self.settings.interface);
        async move {
            let mut feed = self.store.subscribe();
            let mut restarts = self.wg.restarts();
            let mut admits = self.jit.as_mut().and_then(|j| j.rx.take());
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
            loop {
                if let Some(need) = self.schedule.take() {
                    let ok = self.pass(need).await;
                    self.schedule.passed(ok, std::time::Instant::now());
                }
                let wake = Instant::from_std(self.schedule.wake());
                let event = tokio::select! {
                    _ = shutdown.changed() => {
                        if *shutdown.borrow() { return; }
                        continue;
                    }
                    r = feed.changed() => {
                        if r.is_err() {
                            warn!("store change feed closed; relying on periodic resync");
                            feed = self.store.subscribe();
                        }
                        Event::Store
                    }
                    _ = restarts.changed() => {
                        warn!(backend = self.wg.backend_name(),
                            "WireGuard device was restarted; full resync");
                        Event::DeviceRestarted
                    }
                    Some(ev) = next_event(&mut events) => {
                        debug!(?ev, "netlink event");
                        if let Some(rx) = events.as_mut() {
                            while rx.try_recv().is_ok() {}
                        }
                        Event::Netlink
                    }
                    Some(()) = next_fw_event(&mut fw_events) => {
                        if let Some(rx) = fw_events.as_mut() {
                            while rx.try_recv().is_ok() {}
                        }
                        info!("nftables changed by someone else; checking our table");
                        Event::Firewall
                    }
                    Some(first) = next_admit(&mut admits) => {
                        let mut batch = vec![first];
                        if let Some(rx) = admits.as_mut() {
                            while batch.len() < jit::ADMIT_QUEUE {
                                match rx.try_recv() {
                                    Ok(r) => batch.push(r),
                                    Err(_) => break,
                                }
                            }
                        }
                        self.admit_batch(batch).await;
                        continue;
                    }
                    _ = tokio::time::sleep_until(wake) => {
                        self.schedule.tick(std::time::Instant::now());
                        continue;
                    }
                };
                self.schedule.event(event, std::time::Instant::now());
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
                    let gw = self.settings.gateway.clone();
                    match (deltas, self.desired.as_mut()) {
                        (Some(deltas), Some(desired)) if from.is_some() => {
                            let mut t = Touched::default();
                            for d in &deltas {
                                desired.follow(d, &gw, &mut t);
                            }
                            touched = Some(t);
                        }
                        _ if self.jit.is_some() => {
                            // Seeded from the kernel first, or nothing is
                            // planned: an unseeded plan would remove every
                            // live peer.
                            if self.seed_jit(&s).await {
                                let admitted = self.admitted();
                                self.desired = Some(Desired::from_snapshot_jit(&s, &gw, &admitted));
                            } else {
                                store_ok = false;
                            }
                        }
                        _ => self.desired = Some(Desired::from_snapshot(&s, &gw)),
                    }
                    if let Some(t) = &touched {
                        self.forget_unregistered(t);
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
        if result.is_ok() && need.wg {
            // The device was just read: judge idleness on it.
            self.sweep_idle().await;
        }
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
}

async fn next_fw_event(events: &mut Option<tokio::sync::mpsc::Receiver<()>>) -> Option<()> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_admit(
    admits: &mut Option<tokio::sync::mpsc::Receiver<AdmitRequest>>,
) -> Option<AdmitRequest> {
    match admits {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
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

mod apply;
pub mod jit;
mod schedule;

use jit::JitState;
pub use jit::{AdmitOutcome, AdmitRequest, Admitter, JitBook, JitCounters, JitSettings};

use schedule::{Event, Need, Schedule};
mod metrics;
use metrics::Metrics;
mod published;

#[cfg(any(test, feature = "testkit"))]
pub mod rig;

pub use published::Installed;
use published::View;

#[cfg(test)]
mod tests;
