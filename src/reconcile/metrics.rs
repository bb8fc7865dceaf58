//! The reconciler's part of `/metrics`: its counters, per-org peer figures
//! read from one dump of the device, and the isolation table's drop
//! counters and the guard's, read through the firewall and netlink
//! adapters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use tokio::sync::watch;

use super::{Counters, Installed};
use crate::dataplane::{Firewall, Netlink, WgDevice};
use crate::store::Snapshot;

/// Reconcile counters and per-org peer figures for Prometheus.
pub(super) struct Metrics {
    pub(super) wg: Arc<dyn WgDevice>,
    pub(super) fw: Arc<dyn Firewall>,
    pub(super) nl: Arc<dyn Netlink>,
    pub(super) interface: String,
    pub(super) installed: watch::Receiver<Arc<Installed>>,
    pub(super) snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    pub(super) counters: Arc<Counters>,
    /// Just in time: installs, evictions, sweeps.
    pub(super) jit: Option<Arc<super::JitCounters>>,
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
        if let Ok(Some(drops)) = self.fw.counters().await {
            let name = "sixpn_firewall_dropped_packets_total";
            header(
                out,
                name,
                "counter",
                "Packets dropped by the isolation table, by named counter (forward_dropped: \
                 cross-org or non-6PN traffic through the gateway; input_dropped: to the gateway).",
            );
            for (counter, packets) in drops.named() {
                sample(out, name, &[("counter", counter)], packets);
            }
        }
        if let Ok(Some(link)) = self.nl.link(&self.interface).await {
            if let Ok(Some(packets)) = self.nl.guard_dropped(link.index).await {
                family(
                    out,
                    "sixpn_guard_dropped_packets_total",
                    "counter",
                    "Packets the isolation guard (tc on the WireGuard interface) dropped: from or to a \
                     peer and not within one org's /48. It runs before the table, so these never \
                     reach its counters.",
                    packets,
                );
            }
        }
        if let Some(j) = &self.jit {
            let name = "sixpn_jit_installs_total";
            header(
                out,
                name,
                "counter",
                "Peers put in the kernel just in time, by cause (start: kept when the daemon \
                 started; handshake: a captured initiation).",
            );
            sample(out, name, &[("cause", "start")], load(&j.kept_at_start));
            sample(
                out,
                name,
                &[("cause", "handshake")],
                load(&j.installs_handshake),
            );
            family(
                out,
                "sixpn_jit_evictions_total",
                "counter",
                "Peers taken off the kernel for idleness (they stay registered).",
                load(&j.evictions),
            );
            family(
                out,
                "sixpn_jit_unknown_keys_total",
                "counter",
                "Initiations whose key is not registered on this gateway (asked of the store's view).",
                load(&j.unknown),
            );
            family(
                out,
                "sixpn_jit_sweep_seconds_total",
                "counter",
                "Time spent deciding and carrying out evictions.",
                load(&j.sweep_micros) as f64 / 1e6,
            );
        }
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
        let bounds: Vec<f64> = buckets.iter().map(|b| *b as f64).collect();
        crate::metrics::histogram(
            out,
            "sixpn_peer_handshake_age_seconds",
            &[],
            &bounds,
            &hist,
            None,
        );
        family(
            out,
            "sixpn_peers_never_handshaked",
            "gauge",
            "Installed peers that never completed a handshake.",
            never,
        );
    }
}
