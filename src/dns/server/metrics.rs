//! The DNS counters, shared by every listener and the forwarder, and
//! their part of `/metrics`.

use async_trait::async_trait;

use super::*;
use crate::metrics::{header, histogram, sample, MetricsSource};

/// Counters of the DNS side (relaxed atomics; a later issue exports them).
#[derive(Debug, Default)]
pub struct DnsMetrics {
    pub(super) udp_queries: AtomicU64,
    pub(super) tcp_queries: AtomicU64,
    /// Responses sent, by RCODE (16 = BADVERS; forwarded responses by the
    /// upstream's 4-bit code).
    pub(super) responses: [AtomicU64; 17],
    pub(super) dropped: AtomicU64,
    pub(super) forwarded: AtomicU64,
    pub(super) forward_failed: AtomicU64,
    pub(super) forward_rejected: AtomicU64,
    pub(super) tcp_rejected: AtomicU64,
    pub(super) tcp_evicted: AtomicU64,
    pub(super) zone_swaps: AtomicU64,
    /// Query latency per org.
    latency: Mutex<BTreeMap<OrgPrefix, Arc<Latency>>>,
}

/// The upper bounds of the query-latency histogram, in seconds.
const LATENCY_BOUNDS: [f64; 11] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 2.5,
];

/// What came of a query, for the latency histogram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Answer {
    /// Answered from the zone (NOERROR, NXDOMAIN, FORMERR, NOTIMP…).
    Answered = 0,
    /// Forwarded upstream (or SERVFAIL when that failed).
    Forwarded = 1,
    /// REFUSED (not the org's, CHAOS, QCLASS ANY).
    Refused = 2,
}

const ANSWERS: [(Answer, &str); 3] = [
    (Answer::Answered, "answered"),
    (Answer::Forwarded, "forwarded"),
    (Answer::Refused, "refused"),
];

/// One org's query-latency histogram: from the query read to its answer
/// handed to the kernel (a UDP batch counts from its receive).
#[derive(Debug, Default)]
pub(super) struct Latency {
    buckets: [[AtomicU64; LATENCY_BOUNDS.len() + 1]; 3],
    micros: [AtomicU64; 3],
}

impl Latency {
    /// Counts `n` queries of kind `a` that took `d`.
    pub(super) fn observe(&self, a: Answer, d: Duration, n: u64) {
        if n == 0 {
            return;
        }
        let s = d.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        let k = a as usize;
        self.buckets[k][i].fetch_add(n, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.micros[k].fetch_add(micros.saturating_mul(n), Ordering::Relaxed);
    }
}

impl DnsMetrics {
    /// `org`'s latency histogram (a listener takes it once).
    pub(super) fn latency(&self, org: OrgPrefix) -> Arc<Latency> {
        match self.latency.lock() {
            Ok(mut m) => m.entry(org).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }
}

/// A copy of [`DnsMetrics`] at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Queries received over UDP.
    pub udp_queries: u64,
    /// Queries received over TCP.
    pub tcp_queries: u64,
    /// Responses sent, indexed by RCODE (16: BADVERS).
    pub responses: [u64; 17],
    /// Queries not answered (no header, or a response).
    pub dropped: u64,
    /// Queries sent upstream.
    pub forwarded: u64,
    /// Forwards no upstream answered in time (the client got SERVFAIL).
    pub forward_failed: u64,
    /// Forwards refused because [`Limits::max_forwards`] were in flight.
    pub forward_rejected: u64,
    /// TCP connections closed at accept: the listener was full and none
    /// was idle, or the source held its share.
    pub tcp_rejected: u64,
    /// Idle TCP connections closed to make room for a new one: the
    /// listener was full.
    pub tcp_evicted: u64,
    /// Zone indexes swapped in.
    pub zone_swaps: u64,
}

impl MetricsSnapshot {
    /// Responses sent with `rcode`.
    pub fn rcode(&self, rcode: Rcode) -> u64 {
        self.responses[usize::from(rcode.code()).min(16)]
    }
}

pub(super) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl DnsMetrics {
    pub(super) fn response(&self, code: u16) {
        inc(&self.responses[usize::from(code).min(16)]);
    }

    /// The counters now.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            udp_queries: get(&self.udp_queries),
            tcp_queries: get(&self.tcp_queries),
            responses: std::array::from_fn(|i| get(&self.responses[i])),
            dropped: get(&self.dropped),
            forwarded: get(&self.forwarded),
            forward_failed: get(&self.forward_failed),
            forward_rejected: get(&self.forward_rejected),
            tcp_rejected: get(&self.tcp_rejected),
            tcp_evicted: get(&self.tcp_evicted),
            zone_swaps: get(&self.zone_swaps),
        }
    }
}

/// DNS listener counters: queries by transport, responses by rcode,
/// forwarding outcomes.
#[async_trait]
impl MetricsSource for DnsMetrics {
    async fn render(&self, out: &mut String) {
        self.render_latency(out);
        let m = self.snapshot();
        header(
            out,
            "sixpn_dns_queries_total",
            "counter",
            "DNS queries received.",
        );
        sample(
            out,
            "sixpn_dns_queries_total",
            &[("transport", "udp")],
            m.udp_queries,
        );
        sample(
            out,
            "sixpn_dns_queries_total",
            &[("transport", "tcp")],
            m.tcp_queries,
        );
        header(
            out,
            "sixpn_dns_responses_total",
            "counter",
            "DNS responses sent, by rcode.",
        );
        const NAMES: [&str; 17] = [
            "noerror", "formerr", "servfail", "nxdomain", "notimp", "refused", "yxdomain",
            "yxrrset", "nxrrset", "notauth", "notzone", "rcode11", "rcode12", "rcode13", "rcode14",
            "rcode15", "badvers",
        ];
        for (i, n) in m.responses.iter().enumerate() {
            if *n > 0 || i == 0 || i == 3 || i == 5 {
                sample(out, "sixpn_dns_responses_total", &[("rcode", NAMES[i])], n);
            }
        }
        crate::metrics::family(
            out,
            "sixpn_dns_dropped_total",
            "counter",
            "DNS queries dropped unanswered (malformed).",
            m.dropped,
        );
        crate::metrics::family(
            out,
            "sixpn_dns_forwarded_total",
            "counter",
            "Queries for names outside .internal sent upstream.",
            m.forwarded,
        );
        crate::metrics::family(
            out,
            "sixpn_dns_forward_failures_total",
            "counter",
            "Forwards no upstream answered in time.",
            m.forward_failed,
        );
        crate::metrics::family(
            out,
            "sixpn_dns_forward_rejected_total",
            "counter",
            "Forwards refused because too many were in flight.",
            m.forward_rejected,
        );
        crate::metrics::family(
            out,
            "sixpn_dns_tcp_rejected_total",
            "counter",
            "TCP connections refused because the listener was full and none was idle.",
            m.tcp_rejected,
        );
        crate::metrics::family(
            out,
            "sixpn_dns_tcp_evicted_total",
            "counter",
            "Idle TCP connections closed to make room for a new one.",
            m.tcp_evicted,
        );
        crate::metrics::family(
            out,
            "sixpn_dns_zone_swaps_total",
            "counter",
            "Zone indexes swapped in.",
            m.zone_swaps,
        );
    }
}

impl DnsMetrics {
    fn render_latency(&self, out: &mut String) {
        let all: Vec<(OrgPrefix, Arc<Latency>)> = match self.latency.lock() {
            Ok(m) => m.iter().map(|(p, l)| (*p, l.clone())).collect(),
            Err(_) => return,
        };
        let name = "sixpn_dns_query_duration_seconds";
        header(
            out,
            name,
            "histogram",
            "DNS query latency at the gateway, by org (its /48) and outcome: answered from the \
             zone, forwarded upstream, or refused.",
        );
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (org, l) in all {
            let org = org.to_string();
            for (a, outcome) in ANSWERS {
                let k = a as usize;
                let counts: Vec<u64> = l.buckets[k].iter().map(load).collect();
                let sum = load(&l.micros[k]) as f64 / 1e6;
                let labels = [("org", org.as_str()), ("outcome", outcome)];
                histogram(out, name, &labels, &LATENCY_BOUNDS, &counts, Some(sum));
            }
        }
    }
}
