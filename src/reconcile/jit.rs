//! Just-in-time peers in the loop: the admissions the reconciler keeps,
//! the requests that add to them (a captured initiation of a registered
//! peer, see `crate::jit`), the sweep that takes idle peers off the kernel,
//! and what a start keeps. The decisions are `crate::plan::jit`'s; this
//! carries them out through the same plan → apply path as a store change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info};

use super::{Need, Reconciler};
use crate::model::PublicKey;
use crate::plan::jit::{self, Admission, Cause, Initiated};
use crate::plan::Touched;

/// How many admission requests may wait for the loop; past that a request
/// is answered [`AdmitOutcome::Busy`] at once (the initiation is dropped
/// and the client retries).
pub const ADMIT_QUEUE: usize = 1024;

/// Just-in-time settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JitSettings {
    /// A peer with no handshake for this long leaves the kernel.
    pub idle_evict: Duration,
}

/// What came of an admission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmitOutcome {
    /// The peer was installed for this request.
    Installed,
    /// It was installed already.
    AlreadyInstalled,
    /// No peer with that key is registered on this gateway.
    Unknown,
    /// The store hasn't loaded yet, or the install failed: try again later.
    NotReady,
    /// Too many requests are waiting.
    Busy,
}

/// One request to install a registered peer now.
#[derive(Debug)]
pub struct AdmitRequest {
    /// Its key.
    pub key: PublicKey,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<AdmitOutcome>,
}

/// The handle the capture side asks the reconciler through.
#[derive(Debug, Clone)]
pub struct Admitter {
    tx: mpsc::Sender<AdmitRequest>,
}

impl Admitter {
    /// Asks for the registered peer `key` to be installed, and waits for
    /// the pass that does it.
    pub async fn admit(&self, key: PublicKey) -> AdmitOutcome {
        let (reply, rx) = oneshot::channel();
        if self.tx.try_send(AdmitRequest { key, reply }).is_err() {
            return AdmitOutcome::Busy;
        }
        rx.await.unwrap_or(AdmitOutcome::NotReady)
    }
}

/// The admissions and evictions, shared with the API's view.
#[derive(Debug, Default)]
pub struct JitBook {
    /// Peers admitted to the kernel.
    pub admitted: HashMap<PublicKey, Admission>,
    /// Peers taken off the kernel for idleness, and when (until they come
    /// back or are unregistered).
    pub evicted: HashMap<PublicKey, SystemTime>,
}

/// Just-in-time counters, for `/metrics`.
#[derive(Debug, Default)]
pub struct JitCounters {
    /// Peers installed because their initiation was captured.
    pub installs_handshake: AtomicU64,
    /// Peers kept in the kernel at a start.
    pub kept_at_start: AtomicU64,
    /// Peers evicted for idleness.
    pub evictions: AtomicU64,
    /// Admission requests for keys not registered here.
    pub unknown: AtomicU64,
    /// Time spent in eviction sweeps, in microseconds.
    pub sweep_micros: AtomicU64,
}

/// The reconciler's just-in-time state.
pub(super) struct JitState {
    pub(super) settings: JitSettings,
    pub(super) book: Arc<Mutex<JitBook>>,
    pub(super) tx: mpsc::Sender<AdmitRequest>,
    pub(super) rx: Option<mpsc::Receiver<AdmitRequest>>,
    /// Whether the admissions were seeded from the kernel at start.
    pub(super) seeded: bool,
    pub(super) counters: Arc<JitCounters>,
}

impl JitState {
    pub(super) fn new(settings: JitSettings) -> Self {
        let (tx, rx) = mpsc::channel(ADMIT_QUEUE);
        Self {
            settings,
            book: Arc::default(),
            tx,
            rx: Some(rx),
            seeded: false,
            counters: Arc::default(),
        }
    }
}

impl Reconciler {
    /// The handle to ask for installs through, in jit mode.
    pub fn admitter(&self) -> Option<Admitter> {
        self.jit.as_ref().map(|j| Admitter { tx: j.tx.clone() })
    }

    /// The jit counters, in jit mode.
    pub fn jit_counters(&self) -> Option<Arc<JitCounters>> {
        self.jit.as_ref().map(|j| j.counters.clone())
    }

    /// The admissions as they stand, in jit mode.
    pub fn jit_book(&self) -> Option<Arc<Mutex<JitBook>>> {
        self.jit.as_ref().map(|j| j.book.clone())
    }

    /// Before the first plan in jit mode: the peers the kernel holds that
    /// are ours and registered here stay admitted (a restart removes and
    /// re-adds nothing). Needs the device read; until it can be, nothing is
    /// planned in jit mode, so nothing is removed by mistake.
    pub(super) async fn seed_jit(&mut self, snap: &crate::store::Snapshot) -> bool {
        let Some(j) = self.jit.as_ref() else {
            return true;
        };
        if j.seeded {
            return true;
        }
        let device = match self.wg.get().await {
            Ok(d) => d.unwrap_or_default(),
            Err(e) => {
                debug!(error = %e, "jit: device unreadable; seeding later");
                return false;
            }
        };
        let gw = &self.settings.gateway;
        let here: std::collections::HashSet<PublicKey> = snap
            .peers
            .iter()
            .filter(|p| &p.gateway == gw)
            .map(|p| p.public_key)
            .collect();
        let host = self.settings.identity.host_id;
        let kept = jit::kept_at_start(&device, host, |k| here.contains(k), SystemTime::now());
        let Some(j) = self.jit.as_mut() else {
            return true;
        };
        info!(
            kept = kept.len(),
            registered = here.len(),
            "just-in-time peers: keeping the registered peers the kernel holds"
        );
        j.counters
            .kept_at_start
            .fetch_add(kept.len() as u64, Ordering::Relaxed);
        if let Ok(mut book) = j.book.lock() {
            book.admitted = kept;
        }
        j.seeded = true;
        true
    }

    /// Whether `key` is admitted (jit mode).
    pub(super) fn admitted(&self) -> HashMap<PublicKey, Admission> {
        self.jit
            .as_ref()
            .and_then(|j| j.book.lock().ok().map(|b| b.admitted.clone()))
            .unwrap_or_default()
    }

    /// After a followed store change: a peer no longer registered is no
    /// longer admitted or evicted.
    pub(super) fn forget_unregistered(&mut self, touched: &Touched) {
        let (Some(j), Some(d)) = (self.jit.as_ref(), self.desired.as_ref()) else {
            return;
        };
        let Ok(mut book) = j.book.lock() else { return };
        for k in &touched.peers {
            if d.registered_peer(k).is_none() {
                book.admitted.remove(k);
                book.evicted.remove(k);
            }
        }
    }

    /// Answers a batch of admission requests with one pass for all of them.
    pub(super) async fn admit_batch(&mut self, reqs: Vec<AdmitRequest>) {
        let Some(mut desired) = self.desired.take() else {
            for r in reqs {
                let _ = r.reply.send(AdmitOutcome::NotReady);
            }
            return;
        };
        let now = SystemTime::now();
        let mut touched = Touched::default();
        let mut outcomes = Vec::with_capacity(reqs.len());
        if let Some(j) = self.jit.as_ref() {
            if let Ok(mut book) = j.book.lock() {
                for r in &reqs {
                    let o = match jit::initiated(&desired, &r.key) {
                        Initiated::Admit => {
                            desired.admit(&r.key, &mut touched);
                            book.admitted
                                .insert(r.key, Admission::new(now, Cause::Handshake));
                            book.evicted.remove(&r.key);
                            AdmitOutcome::Installed
                        }
                        Initiated::Installed => AdmitOutcome::AlreadyInstalled,
                        Initiated::Unknown => {
                            j.counters.unknown.fetch_add(1, Ordering::Relaxed);
                            AdmitOutcome::Unknown
                        }
                    };
                    outcomes.push(o);
                }
            }
        }
        let ok = touched.is_empty() || self.apply_touched(&desired, &touched).await;
        self.desired = Some(desired);
        let installed = self.installed.borrow().clone();
        let mut n = 0u64;
        for (r, o) in reqs.into_iter().zip(outcomes) {
            let o = match o {
                AdmitOutcome::Installed if installed.peers.contains_key(&r.key) => {
                    n += 1;
                    if let Some(p) = self.desired.as_ref().and_then(|d| d.installed.get(&r.key)) {
                        debug!(org = %p.org, peer = %p.name, "peer installed on its handshake");
                    }
                    AdmitOutcome::Installed
                }
                AdmitOutcome::Installed => AdmitOutcome::NotReady,
                o => o,
            };
            let _ = r.reply.send(o);
        }
        if let Some(j) = self.jit.as_ref() {
            j.counters
                .installs_handshake
                .fetch_add(n, Ordering::Relaxed);
        }
        if !ok {
            debug!("jit: an install failed; the next initiation retries it");
        }
    }

    /// Carries out what admitting or evicting `touched` changed in
    /// `desired`: only those peers when the kernel was in sync, everything
    /// otherwise. Returns whether it all went in.
    async fn apply_touched(&mut self, desired: &crate::plan::Desired, touched: &Touched) -> bool {
        let r = if self.in_sync {
            self.follow_plan_apply(Some(desired), touched).await
        } else {
            self.observe_plan_apply(Need::ALL, true, Some(desired))
                .await
        };
        self.in_sync = r.is_ok();
        r.is_ok()
    }

    /// Takes the peers idle for `idle_evict` off the kernel (they stay
    /// registered), judged on the device as last read.
    pub(super) async fn sweep_idle(&mut self) {
        let Some(j) = self.jit.as_ref() else { return };
        let t0 = std::time::Instant::now();
        let (Some(device), Some(_)) = (self.cache.device.as_ref(), self.desired.as_ref()) else {
            return;
        };
        let now = SystemTime::now();
        let idle = match j.book.lock() {
            Ok(mut book) => {
                jit::note_activity(&mut book.admitted, device, now);
                jit::idle_peers(&book.admitted, device, now, j.settings.idle_evict)
            }
            Err(_) => return,
        };
        let counters = j.counters.clone();
        if idle.is_empty() {
            let micros = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
            counters.sweep_micros.fetch_add(micros, Ordering::Relaxed);
            return;
        }
        let Some(mut desired) = self.desired.take() else {
            return;
        };
        let mut touched = Touched::default();
        if let Ok(mut book) = j.book.lock() {
            for k in &idle {
                book.admitted.remove(k);
                if desired.evict(k, &mut touched) {
                    book.evicted.insert(*k, now);
                    if let Some(p) = desired.pending.get(k) {
                        debug!(org = %p.org, peer = %p.name, "peer idle: evicting");
                    }
                }
            }
        }
        self.apply_touched(&desired, &touched).await;
        self.desired = Some(desired);
        let micros = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        counters.sweep_micros.fetch_add(micros, Ordering::Relaxed);
        counters
            .evictions
            .fetch_add(touched.peers.len() as u64, Ordering::Relaxed);
        info!(
            evicted = touched.peers.len(),
            "idle peers taken off the kernel (still registered)"
        );
    }
}
