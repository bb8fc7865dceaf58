//! Prometheus text exposition for `/metrics`. Each part of the daemon
//! (reconciler, DNS, firewall) contributes a [`MetricsSource`]; the API
//! concatenates them. Cheap by design: counters are atomics, and per-org
//! series only where the org count, not the peer count, sets the size.

use async_trait::async_trait;

pub use crate::metrics::{family, header, sample, MetricsSource};

/// DNS listener counters: queries by transport, responses by rcode,
/// forwarding outcomes.
#[async_trait]
impl MetricsSource for crate::dns::server::DnsMetrics {
    async fn render(&self, out: &mut String) {
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
        family(
            out,
            "sixpn_dns_dropped_total",
            "counter",
            "DNS queries dropped unanswered (malformed).",
            m.dropped,
        );
        family(
            out,
            "sixpn_dns_forwarded_total",
            "counter",
            "Queries for names outside .internal sent upstream.",
            m.forwarded,
        );
        family(
            out,
            "sixpn_dns_forward_failures_total",
            "counter",
            "Forwards no upstream answered in time.",
            m.forward_failed,
        );
        family(
            out,
            "sixpn_dns_forward_rejected_total",
            "counter",
            "Forwards refused because too many were in flight.",
            m.forward_rejected,
        );
        family(
            out,
            "sixpn_dns_tcp_rejected_total",
            "counter",
            "TCP connections refused because the listener was full.",
            m.tcp_rejected,
        );
        family(
            out,
            "sixpn_dns_zone_swaps_total",
            "counter",
            "Zone indexes swapped in.",
            m.zone_swaps,
        );
    }
}
