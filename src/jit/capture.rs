//! The capture loop: reads the initiations the `capture` chain sends
//! (held in an NFQUEUE, or copied over nfnetlink_log), finds out who sent
//! each, has the reconciler install a registered peer, and only then lets
//! a held initiation through.
//!
//! What one initiation costs, cheapest first, so garbage costs least:
//! - a source whose last initiation came from a peer that is still
//!   installed (a rekey, every two minutes per active peer) is let through
//!   with one hash lookup, no cryptography: WireGuard itself checks it;
//! - a source over its rate is dropped; beyond the global budget of
//!   Diffie-Hellman operations an initiation is let through unjudged
//!   (WireGuard drops what it doesn't know, and a known peer's rekey
//!   still works under a flood);
//! - mac1 (one keyed BLAKE2s) drops anything not made for this gateway's
//!   key; then the first leg of Noise IK recovers the initiator's key;
//! - a key recently found unregistered is dropped without asking again;
//!   otherwise the reconciler is asked, and answers once the peer is in.
//!
//! A held initiation is never lost for want of an answer: the queue is
//! fail-open (full: the kernel lets packets through), and anything this
//! loop can't judge is accepted, as if there were no capture at all.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, info, warn};

use super::noise::{NoiseError, Responder, INITIATION_LEN};
use crate::dataplane::linux::nfq::{parse_udp, LogGroup, Queue};
use crate::model::PublicKey;
use crate::plan::nft::CaptureMode;
use crate::reconcile::{AdmitOutcome, Admitter, Installed};

/// How many admissions may be waited on at once; past that an initiation
/// is let through unjudged.
const MAX_WAITING: usize = 512;
/// Initiations judged with Diffie-Hellman per second, at most (a burst of
/// as many is allowed).
const DH_PER_SECOND: f64 = 2_000.0;
/// Initiations per second from one source address that are judged; more
/// are dropped (a burst of twice as many is allowed).
const PER_SOURCE_PER_SECOND: f64 = 20.0;
/// How long a key found unregistered is dropped without asking again.
const UNKNOWN_FOR: Duration = Duration::from_secs(30);
/// The most sources (and unknown keys) remembered; past that the oldest
/// half is forgotten.
const MAX_REMEMBERED: usize = 65_536;
/// The NFQUEUE length: initiations waiting for a verdict in the kernel.
pub const QUEUE_LEN: u32 = 4096;

/// The upper bounds of the install-latency histogram, in seconds.
const LATENCY_BOUNDS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Where initiations come from.
pub enum Source {
    /// Held until a verdict.
    Queue(Queue),
    /// Copies; the originals went on to WireGuard.
    Log(LogGroup),
}

impl Source {
    /// Binds the queue or log group `mode` names.
    pub fn bind(mode: CaptureMode) -> Result<Self, crate::dataplane::KernelError> {
        Ok(match mode {
            CaptureMode::Queue { num } => Source::Queue(Queue::bind(num, QUEUE_LEN)?),
            CaptureMode::Log { group } => Source::Log(LogGroup::bind(group)?),
        })
    }

    fn mode(&self) -> &'static str {
        match self {
            Source::Queue(_) => "queue",
            Source::Log(_) => "log",
        }
    }

    fn overflows(&self) -> u64 {
        match self {
            Source::Queue(q) => q.overflows(),
            Source::Log(l) => l.overflows(),
        }
    }
}

/// The loop's counters, for `/metrics`.
#[derive(Debug, Default)]
pub struct CaptureCounters {
    /// Initiations that installed their peer.
    pub installed: AtomicU64,
    /// From a peer installed already (rekeys, retries).
    pub known: AtomicU64,
    /// From a key not registered here.
    pub unknown: AtomicU64,
    /// Not a valid initiation for this gateway (mac1 or the AEAD failed).
    pub invalid: AtomicU64,
    /// Dropped for their source's rate.
    pub limited: AtomicU64,
    /// Let through unjudged: over the Diffie-Hellman budget, too many
    /// waiting, or the install didn't happen in time.
    pub unjudged: AtomicU64,
    /// Install latency histogram: counts per bound, then the total.
    latency: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    latency_micros: AtomicU64,
}

impl CaptureCounters {
    fn observe_latency(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.latency[i].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.latency_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            at: now,
        }
    }

    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the loop has learnt, all bounded.
struct Memory {
    /// The key each source's last good initiation came from.
    sources: HashMap<SocketAddr, PublicKey>,
    /// Keys found unregistered, until when they are dropped unasked.
    unknown: HashMap<PublicKey, Instant>,
    /// Per source address rates.
    rates: HashMap<IpAddr, Bucket>,
    /// The global Diffie-Hellman budget.
    dh: Bucket,
    /// What the reconciler answered to admissions, as the answers come.
    learnt: mpsc::Receiver<(PublicKey, SocketAddr, AdmitOutcome)>,
}

fn bound<K, V>(map: &mut HashMap<K, V>) {
    if map.len() >= MAX_REMEMBERED {
        // Forgetting costs at most a re-judgement; a flood of fresh
        // sources can't grow memory without bound.
        map.clear();
    }
}

/// What to do with one initiation, decided without waiting.
enum Judged {
    Accept,
    Drop,
    /// Ask the reconciler to install `key` (from `from`).
    Admit(PublicKey, SocketAddr),
}

/// The capture loop.
pub struct Capture {
    source: Arc<Source>,
    responder: Responder,
    admitter: Admitter,
    installed: watch::Receiver<Arc<Installed>>,
    listen_port: u16,
    counters: Arc<CaptureCounters>,
}

impl Capture {
    /// A loop over `source` judging with `responder` (the gateway's key)
    /// and installing through `admitter`.
    pub fn new(
        source: Source,
        responder: Responder,
        admitter: Admitter,
        installed: watch::Receiver<Arc<Installed>>,
        listen_port: u16,
    ) -> Self {
        Self {
            source: Arc::new(source),
            responder,
            admitter,
            installed,
            listen_port,
            counters: Arc::default(),
        }
    }

    /// Its part of `/metrics`.
    pub fn metrics(&self) -> Arc<dyn crate::metrics::MetricsSource> {
        Arc::new(Metrics {
            source: self.source.clone(),
            counters: self.counters.clone(),
        })
    }

    /// Runs until `shutdown` turns true. Dropping the queue at the end lets
    /// whatever it still holds through.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        info!(
            mode = self.source.mode(),
            "just-in-time peers: capturing handshake initiations"
        );
        let now = Instant::now();
        let (learn, learnt) = mpsc::channel(MAX_WAITING);
        let mut memory = Memory {
            sources: HashMap::new(),
            unknown: HashMap::new(),
            rates: HashMap::new(),
            dh: Bucket::full(DH_PER_SECOND, now),
            learnt,
        };
        let waiting = Arc::new(Semaphore::new(MAX_WAITING));
        let mut failures = 0u32;
        loop {
            let batch = tokio::select! {
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { return; }
                    continue;
                }
                b = recv(&self.source) => b,
            };
            let packets = match batch {
                Ok(p) => {
                    failures = 0;
                    p
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 {
                        warn!(error = %e, "capture: reading initiations failed; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            for (id, packet) in packets {
                let t0 = Instant::now();
                let judged = self.judge(&packet, &mut memory, t0);
                match judged {
                    Judged::Accept => self.verdict(id, true),
                    Judged::Drop => self.verdict(id, false),
                    Judged::Admit(key, from) => {
                        let Ok(permit) = waiting.clone().try_acquire_owned() else {
                            self.counters.unjudged.fetch_add(1, Ordering::Relaxed);
                            self.verdict(id, true);
                            continue;
                        };
                        let (admitter, source) = (self.admitter.clone(), self.source.clone());
                        let (counters, learn) = (self.counters.clone(), learn.clone());
                        // What the reconciler says is remembered when it
                        // comes, without holding up the next packets.
                        tokio::spawn(async move {
                            let outcome = admitter.admit(key).await;
                            let accept = !matches!(outcome, AdmitOutcome::Unknown);
                            verdict(&source, id, accept);
                            match outcome {
                                AdmitOutcome::Installed => {
                                    counters.installed.fetch_add(1, Ordering::Relaxed);
                                    counters.observe_latency(t0.elapsed());
                                }
                                AdmitOutcome::AlreadyInstalled => {
                                    counters.known.fetch_add(1, Ordering::Relaxed);
                                }
                                AdmitOutcome::Unknown => {
                                    counters.unknown.fetch_add(1, Ordering::Relaxed);
                                }
                                AdmitOutcome::NotReady | AdmitOutcome::Busy => {
                                    counters.unjudged.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            drop(permit);
                            let _ = learn.try_send((key, from, outcome));
                        });
                    }
                }
            }
        }
    }

    fn verdict(&self, id: Option<u32>, accept: bool) {
        verdict(&self.source, id, accept);
    }

    /// Judges one captured IP packet without waiting.
    fn judge(&self, packet: &[u8], memory: &mut Memory, now: Instant) -> Judged {
        memory.drain_learnt();
        let Some(udp) = parse_udp(packet) else {
            self.counters.invalid.fetch_add(1, Ordering::Relaxed);
            return Judged::Accept;
        };
        if udp.dst.port() != self.listen_port || udp.payload.len() != INITIATION_LEN {
            // Not what the capture rule matches: WireGuard's business.
            return Judged::Accept;
        }
        if let Some(key) = memory.sources.get(&udp.src) {
            if self.installed.borrow().peers.contains_key(key) {
                self.counters.known.fetch_add(1, Ordering::Relaxed);
                return Judged::Accept;
            }
        }
        let rate = memory
            .rates
            .entry(udp.src.ip())
            .or_insert_with(|| Bucket::full(2.0 * PER_SOURCE_PER_SECOND, now));
        if !rate.take(PER_SOURCE_PER_SECOND, 2.0 * PER_SOURCE_PER_SECOND, now) {
            self.counters.limited.fetch_add(1, Ordering::Relaxed);
            return Judged::Drop;
        }
        bound(&mut memory.rates);
        if !self.responder.mac1_ok(udp.payload) {
            self.counters.invalid.fetch_add(1, Ordering::Relaxed);
            return Judged::Drop;
        }
        if !memory.dh.take(DH_PER_SECOND, DH_PER_SECOND, now) {
            self.counters.unjudged.fetch_add(1, Ordering::Relaxed);
            return Judged::Accept;
        }
        let key = match self.responder.open(udp.payload) {
            Ok(i) => i.initiator,
            Err(e) => {
                if !matches!(e, NoiseError::Mac1) {
                    debug!(error = %e, from = %udp.src, "capture: not a valid initiation");
                }
                self.counters.invalid.fetch_add(1, Ordering::Relaxed);
                return Judged::Drop;
            }
        };
        if memory.unknown.get(&key).is_some_and(|until| *until > now) {
            self.counters.unknown.fetch_add(1, Ordering::Relaxed);
            return Judged::Drop;
        }
        if self.installed.borrow().peers.contains_key(&key) {
            memory.sources.insert(udp.src, key);
            bound(&mut memory.sources);
            self.counters.known.fetch_add(1, Ordering::Relaxed);
            return Judged::Accept;
        }
        Judged::Admit(key, udp.src)
    }
}

impl Memory {
    /// Takes in the admission outcomes that have arrived.
    fn drain_learnt(&mut self) {
        let now = Instant::now();
        while let Ok((key, from, outcome)) = self.learnt.try_recv() {
            match outcome {
                AdmitOutcome::Installed | AdmitOutcome::AlreadyInstalled => {
                    self.sources.insert(from, key);
                    bound(&mut self.sources);
                }
                AdmitOutcome::Unknown => {
                    self.unknown.insert(key, now + UNKNOWN_FOR);
                    bound(&mut self.unknown);
                }
                AdmitOutcome::NotReady | AdmitOutcome::Busy => {}
            }
        }
    }
}

/// Reads the next batch as `(queue id, IP packet)`; copies have no id.
async fn recv(
    source: &Source,
) -> Result<Vec<(Option<u32>, Vec<u8>)>, crate::dataplane::KernelError> {
    Ok(match source {
        Source::Queue(q) => q
            .recv()
            .await?
            .into_iter()
            .map(|h| (Some(h.id), h.packet))
            .collect(),
        Source::Log(l) => l.recv().await?.into_iter().map(|p| (None, p)).collect(),
    })
}

fn verdict(source: &Source, id: Option<u32>, accept: bool) {
    if let (Source::Queue(q), Some(id)) = (source, id) {
        if let Err(e) = q.verdict(id, accept) {
            debug!(error = %e, id, "capture: verdict refused");
        }
    }
}

struct Metrics {
    source: Arc<Source>,
    counters: Arc<CaptureCounters>,
}

#[async_trait]
impl crate::metrics::MetricsSource for Metrics {
    async fn render(&self, out: &mut String) {
        use crate::metrics::{family, header, sample};
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let name = "sixpn_jit_capture_mode";
        header(
            out,
            name,
            "gauge",
            "How handshake initiations of peers not installed reach the daemon: queue (held until \
             the peer is in) or log (copied; the client's retry completes).",
        );
        sample(out, name, &[("mode", self.source.mode())], 1);
        let name = "sixpn_jit_initiations_total";
        header(
            out,
            name,
            "counter",
            "Captured handshake initiations, by what came of them.",
        );
        for (outcome, n) in [
            ("installed", &c.installed),
            ("known", &c.known),
            ("unknown", &c.unknown),
            ("invalid", &c.invalid),
            ("limited", &c.limited),
            ("unjudged", &c.unjudged),
        ] {
            sample(out, name, &[("outcome", outcome)], load(n));
        }
        family(
            out,
            "sixpn_jit_capture_overflows_total",
            "counter",
            "Times the capture socket overflowed (fail-open: those initiations went on unjudged).",
            self.source.overflows(),
        );
        let name = "sixpn_jit_install_seconds";
        header(
            out,
            name,
            "histogram",
            "From a captured initiation to its peer installed (and the held packet let through).",
        );
        let counts: Vec<u64> = c.latency.iter().map(load).collect();
        let sum = load(&c.latency_micros) as f64 / 1e6;
        crate::metrics::histogram(out, name, &[], &LATENCY_BOUNDS, &counts, Some(sum));
    }
}
