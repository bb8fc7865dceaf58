//! The DNS service the gateway runs: its settings and limits, the upstream
//! list, and the loop that follows the snapshots, swaps the zone index and
//! starts or stops each org's listeners.

use super::*;

/// The DNS port.
pub const DNS_PORT: u16 = 53;

/// TCP connections one listener serves at once.
pub const TCP_CONNECTIONS_PER_LISTENER: usize = 256;

/// How long a TCP connection may sit idle (or take to send or receive one
/// message) before it is closed.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Queries served on one TCP connection before it is closed.
pub const TCP_QUERIES_PER_CONNECTION: usize = 1000;

/// How long one upstream gets to answer before the next is tried.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// Forwards in flight at once, across all listeners.
pub const MAX_FORWARDS: usize = 1024;

/// The largest DNS message (TCP's 16-bit length).
/// TCP connections one source may hold on a listener: an eighth of
/// [`TCP_CONNECTIONS_PER_LISTENER`].
pub const TCP_CONNECTIONS_PER_SOURCE: usize = TCP_CONNECTIONS_PER_LISTENER / 8;

/// Forwards in flight for one org: an eighth of [`MAX_FORWARDS`].
pub const MAX_FORWARDS_PER_ORG: usize = MAX_FORWARDS / 8;

pub(super) const MAX_MESSAGE: usize = 65535;

pub(super) const HEADER_LEN: usize = 12;

/// The bounds of the listeners and the forwarder.
#[derive(Clone, Debug)]
pub struct Limits {
    /// TCP connections per listener ([`TCP_CONNECTIONS_PER_LISTENER`]).
    pub tcp_connections: usize,
    /// TCP connections one source address may hold on a listener
    /// ([`TCP_CONNECTIONS_PER_SOURCE`]).
    pub tcp_connections_per_source: usize,
    /// TCP idle timeout ([`TCP_IDLE_TIMEOUT`]).
    pub tcp_idle: Duration,
    /// Queries per TCP connection ([`TCP_QUERIES_PER_CONNECTION`]).
    pub tcp_queries: usize,
    /// Per-upstream timeout ([`FORWARD_TIMEOUT`]).
    pub forward_timeout: Duration,
    /// Forwards in flight ([`MAX_FORWARDS`]).
    pub max_forwards: usize,
    /// Forwards in flight for one org ([`MAX_FORWARDS_PER_ORG`]): one org
    /// flooding names whose servers never answer can take no more than
    /// this, and the rest stays for the others.
    pub max_forwards_per_org: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            tcp_connections: TCP_CONNECTIONS_PER_LISTENER,
            tcp_connections_per_source: TCP_CONNECTIONS_PER_SOURCE,
            tcp_idle: TCP_IDLE_TIMEOUT,
            tcp_queries: TCP_QUERIES_PER_CONNECTION,
            forward_timeout: FORWARD_TIMEOUT,
            max_forwards: MAX_FORWARDS,
            max_forwards_per_org: MAX_FORWARDS_PER_ORG,
        }
    }
}

/// What the DNS service needs to know.
#[derive(Clone, Debug)]
pub struct DnsSettings {
    /// This gateway: orgs with peers on it get a listener.
    pub gateway: GatewayName,
    /// This gateway's region, for `top<N>.nearest.of.<app>`.
    pub region: RegionName,
    /// Region coordinates for `top<N>.nearest.of.<app>`.
    pub distances: RegionDistances,
    /// Resolvers for names outside `.internal`, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// The listeners' port ([`DNS_PORT`]; tests use others).
    pub port: u16,
    /// Bounds.
    pub limits: Limits,
}

impl DnsSettings {
    /// Settings with the defaults: port 53, the built-in region table, the
    /// default limits.
    pub fn new(gateway: GatewayName, region: RegionName, upstreams: Vec<SocketAddr>) -> Self {
        Self {
            gateway,
            region,
            distances: RegionDistances::builtin(),
            upstreams,
            port: DNS_PORT,
            limits: Limits::default(),
        }
    }
}

/// The upstreams to use: `configured` if it is not empty, else the
/// `nameserver` lines of `/etc/resolv.conf` (port 53).
pub fn upstreams_or_resolv_conf(configured: &[SocketAddr]) -> Vec<SocketAddr> {
    if !configured.is_empty() {
        return configured.to_vec();
    }
    match std::fs::read_to_string("/etc/resolv.conf") {
        Ok(text) => parse_resolv_conf(&text),
        Err(e) => {
            warn!(error = %e, "cannot read /etc/resolv.conf; names outside .internal get SERVFAIL");
            Vec::new()
        }
    }
}

/// The `nameserver` addresses of a resolv.conf, port 53. A link-local IPv6
/// address keeps its `%scope` (an interface name or index).
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else { continue };
        let (ip, scope) = match addr.split_once('%') {
            Some((ip, scope)) => (ip, Some(scope)),
            None => (addr, None),
        };
        let Ok(ip) = ip.parse::<IpAddr>() else {
            continue;
        };
        let sa = match (ip, scope) {
            (IpAddr::V6(v6), Some(scope)) => {
                let id = scope.parse::<u32>().ok().or_else(|| if_index(scope));
                match id {
                    Some(id) => SocketAddr::V6(std::net::SocketAddrV6::new(v6, DNS_PORT, 0, id)),
                    None => continue,
                }
            }
            (ip, _) => SocketAddr::new(ip, DNS_PORT),
        };
        out.push(sa);
    }
    out
}

/// The DNS side of the daemon; see the module docs.
pub struct DnsService {
    pub(super) settings: DnsSettings,
    pub(super) ctx: Arc<Ctx>,
    /// Orgs that should have a listener (from the last snapshot).
    pub(super) desired: BTreeSet<OrgPrefix>,
    pub(super) listeners: BTreeMap<OrgPrefix, Listener>,
    /// Desired listeners that could not be bound; retried.
    pub(super) failed: BTreeSet<OrgPrefix>,
    /// The snapshot the zone index in force was built from.
    pub(super) built_from: Option<Arc<Snapshot>>,
}

/// A zone build taking longer than this was big enough to trim the heap
/// after.
pub(super) const TRIM_AFTER: Duration = Duration::from_millis(20);

/// How often listeners that failed to bind are retried.
pub(super) const BIND_RETRY: Duration = Duration::from_secs(1);

impl DnsService {
    /// Binds the forwarding sockets; listeners start with the first
    /// snapshot. Must run inside a tokio runtime.
    pub fn start(settings: DnsSettings) -> Self {
        let metrics = Arc::new(DnsMetrics::default());
        let forwarder = Forwarder::start(
            settings.upstreams.clone(),
            &settings.limits,
            metrics.clone(),
        );
        let ctx = Arc::new(Ctx {
            zones: Arc::new(SharedZones::default()),
            metrics,
            forwarder,
            limits: settings.limits.clone(),
            #[cfg(test)]
            pretend_src: None,
        });
        Self {
            settings,
            ctx,
            desired: BTreeSet::new(),
            listeners: BTreeMap::new(),
            failed: BTreeSet::new(),
            built_from: None,
        }
    }

    /// The zone index the listeners answer from.
    pub fn zones(&self) -> Arc<SharedZones> {
        self.ctx.zones.clone()
    }

    /// The counters.
    pub fn metrics(&self) -> Arc<DnsMetrics> {
        self.ctx.metrics.clone()
    }

    /// The addresses listened on now.
    pub fn listening(&self) -> Vec<SocketAddr> {
        self.listeners.values().map(|l| l.local).collect()
    }

    /// Follows `snapshots` until `shutdown` turns true (or its sender is
    /// gone), then stops every listener.
    pub async fn run(
        mut self,
        mut snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut feed_open = true;
        let mut fresh = true;
        loop {
            if fresh {
                let snap = snapshots.borrow_and_update().clone();
                if let Some(snap) = snap {
                    self.apply(snap).await;
                }
                fresh = false;
            }
            let retry = !self.failed.is_empty();
            tokio::select! {
                r = snapshots.changed(), if feed_open => match r {
                    Ok(()) => fresh = true,
                    // The reconciler is gone (shutting down): keep serving
                    // the last zone until told to stop.
                    Err(_) => feed_open = false,
                },
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                _ = tokio::time::sleep(BIND_RETRY), if retry => {
                    self.reconcile_listeners().await;
                }
            }
        }
        self.stop().await;
    }

    /// Builds the zone index from `snap`, swaps it in, and starts or stops
    /// listeners to match the orgs with peers on this gateway.
    pub async fn apply(&mut self, snap: Arc<Snapshot>) {
        let t0 = std::time::Instant::now();
        let (region, distances) = (
            self.settings.region.clone(),
            self.settings.distances.clone(),
        );
        let s = snap.clone();
        let prev = self
            .built_from
            .clone()
            .map(|old| (self.ctx.zones.load(), old));
        let built = tokio::task::spawn_blocking(move || {
            let prev = prev.as_ref().map(|(index, old)| (&**index, &**old));
            ZoneIndex::update(prev, &s, &region, &distances)
        })
        .await;
        let (index, zones_built) = match built {
            Ok(i) => i,
            Err(e) => {
                warn!(error = %e, "building the DNS zone failed; keeping the last one");
                return;
            }
        };
        self.built_from = Some(snap.clone());
        let revision = index.revision();
        for zone in snap.orgs.iter().filter_map(|o| index.org(o.prefix())) {
            for name in zone.oversized() {
                warn!(org = %zone.prefix(), %name,
                    "DNS answer too large for any message; it gets SERVFAIL over TCP");
            }
            for name in zone.truncated() {
                warn!(org = %zone.prefix(), %name,
                    "DNS list too long for one message; answered cut short, ending in a truncated: marker");
            }
        }
        self.ctx.zones.store(index);
        inc(&self.ctx.metrics.zone_swaps);
        // After a big build the builder's scratch memory (about twice the
        // zones' own size) is free; hand it back to the OS rather than keep
        // the peak resident (100,000 instances: 80 MB instead of 190 MB).
        // Rebuilding one org's zone leaves too little to be worth the walk.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if t0.elapsed() > TRIM_AFTER {
            let _ = tokio::task::spawn_blocking(|| {
                // SAFETY: malloc_trim only releases free memory; no preconditions.
                unsafe { libc::malloc_trim(0) }
            })
            .await;
        }
        debug!(
            revision,
            zones_built,
            took_us = t0.elapsed().as_micros() as u64,
            "DNS zone swapped in"
        );

        self.desired = Desired::from_snapshot(&snap, &self.settings.gateway)
            .dns_addresses
            .into_iter()
            .filter_map(OrgPrefix::of)
            .collect();
        self.reconcile_listeners().await;
    }

    /// Stops the listeners of orgs no longer desired and starts (or retries)
    /// the missing ones.
    pub(super) async fn reconcile_listeners(&mut self) {
        let gone: Vec<OrgPrefix> = self
            .listeners
            .keys()
            .filter(|p| !self.desired.contains(p))
            .copied()
            .collect();
        for p in gone {
            if let Some(l) = self.listeners.remove(&p) {
                info!(org = %p, address = %l.local, "DNS listener stopped");
                l.stop().await;
            }
        }
        self.failed.retain(|p| self.desired.contains(p));
        let missing: Vec<OrgPrefix> = self
            .desired
            .iter()
            .filter(|p| !self.listeners.contains_key(p))
            .copied()
            .collect();
        for p in missing {
            let addr = SocketAddr::from((p.dns_addr(), self.settings.port));
            match Listener::start(p, addr, &self.ctx) {
                Ok(l) => {
                    info!(org = %p, address = %l.local, "DNS listener started (UDP and TCP)");
                    self.failed.remove(&p);
                    self.listeners.insert(p, l);
                }
                Err(e) => {
                    if self.failed.insert(p) {
                        warn!(org = %p, %addr, error = %e, "cannot bind DNS listener; retrying");
                    }
                }
            }
        }
    }

    /// Stops every listener and the forwarder.
    pub async fn stop(mut self) {
        let m = self.ctx.metrics.snapshot();
        info!(
            udp = m.udp_queries,
            tcp = m.tcp_queries,
            noerror = m.rcode(Rcode::NoError),
            nxdomain = m.rcode(Rcode::NxDomain),
            refused = m.rcode(Rcode::Refused),
            servfail = m.rcode(Rcode::ServFail),
            forwarded = m.forwarded,
            forward_failed = m.forward_failed,
            forward_rejected = m.forward_rejected,
            tcp_rejected = m.tcp_rejected,
            tcp_evicted = m.tcp_evicted,
            "DNS stopping"
        );
        for (_, l) in std::mem::take(&mut self.listeners) {
            l.stop().await;
        }
    }
}
