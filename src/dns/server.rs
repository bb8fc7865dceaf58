//! The DNS listeners: one UDP and one TCP socket on `[<org>::3]:53` for each
//! org with peers on this gateway, answering from the zone index with
//! [`answer`] and forwarding everything outside `.internal` upstream.
//!
//! [`DnsService::run`] follows the reconciler's snapshot watch
//! ([`crate::reconcile::Reconciler::snapshots`]): on every new snapshot it
//! rebuilds the [`ZoneIndex`] off the async threads, swaps it in through
//! [`SharedZones`] (queries already running finish on the old one), and
//! starts or stops listeners so that exactly the orgs in
//! [`Desired::dns_addresses`] have one — the same set the reconciler puts
//! `::3` addresses on the interface for. Sockets are bound with
//! `IPV6_FREEBIND`, so a listener can start before the reconciler has added
//! its address (the two follow the same snapshot independently) and needs
//! no ordering between them.
//!
//! # Why our own sockets, not hickory-server
//!
//! The first design planned hickory-server for the listeners. Its generic request
//! path (decode into a `Message`, authority lookup, encode) costs ~35 µs of
//! CPU per query here; the pre-encoded handler in [`super::handler`] answers
//! in ~0.2 µs, so the socket layer around it decides the cost. The listeners
//! are therefore plain tokio sockets around [`answer`]; hickory-proto stays,
//! in tests only, to build and parse messages independently of our code.
//!
//! # Hot path (UDP)
//!
//! One `recvmmsg` takes every queued query (up to 32) into buffers owned by
//! the listener task, [`answer`] writes each response into another reused
//! buffer, and one `sendmmsg` sends them ([`super::batch`]). Nothing is
//! allocated per `.internal` query; the only shared writes are the relaxed
//! metric counters. Against `recv_from`/`send_to` per query this halved the
//! CPU per query under dnsperf (3.6 → 1.8 µs), nearly all of it kernel time.
//!
//! # TCP (RFC 7766)
//!
//! Messages are framed by a 2-byte length. Each connection is served by one
//! task that reads a query, answers it, writes the response, and reads the
//! next: a client may pipeline many queries and gets the responses in the
//! order it sent them (the socket buffer is the queue; at most one query per
//! connection is in flight). Bounds: [`Limits::tcp_connections`] per
//! listener (more are closed at accept), [`Limits::tcp_idle`] for every read
//! and write (a silent or slow client is dropped), and
//! [`Limits::tcp_queries`] per connection, after which it is closed.
//!
//! # Forwarding
//!
//! A name outside `.internal` ([`Outcome::Forward`]) goes to the upstream
//! resolvers (`[dns] upstream`, or the `nameserver`s of `/etc/resolv.conf`
//! when that list is empty), tried in order, each for
//! [`Limits::forward_timeout`]; when all fail the client gets SERVFAIL.
//! Over UDP the query leaves from one shared socket per address family with
//! a fresh random ID; a reply is accepted only from the upstream it was sent
//! to, with that ID and the same question (case-insensitively), and is
//! relayed with the client's ID. Anything else arriving there — malformed,
//! late, spoofed — is dropped. A query that came over TCP is forwarded over
//! TCP (a fresh connection per query), so large answers arrive whole. At
//! most [`Limits::max_forwards`] forwards are in flight across all
//! listeners; beyond that clients get SERVFAIL at once.
//!
//! Nothing here panics on any input: every read of a message is
//! bounds-checked, and malformed queries are the handler's job (FORMERR or
//! drop).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use super::batch::{self, RecvBatch, SendBatch};
use super::handler::{answer, Outcome, Rcode, Transport};
use super::zone::{RegionDistances, ZoneIndex};
use super::SharedZones;
use crate::model::{GatewayName, OrgPrefix, RegionName};
use crate::plan::Desired;
use crate::store::Snapshot;

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
const MAX_MESSAGE: usize = 65535;
const HEADER_LEN: usize = 12;

/// The bounds of the listeners and the forwarder.
#[derive(Clone, Debug)]
pub struct Limits {
    /// TCP connections per listener ([`TCP_CONNECTIONS_PER_LISTENER`]).
    pub tcp_connections: usize,
    /// TCP idle timeout ([`TCP_IDLE_TIMEOUT`]).
    pub tcp_idle: Duration,
    /// Queries per TCP connection ([`TCP_QUERIES_PER_CONNECTION`]).
    pub tcp_queries: usize,
    /// Per-upstream timeout ([`FORWARD_TIMEOUT`]).
    pub forward_timeout: Duration,
    /// Forwards in flight ([`MAX_FORWARDS`]).
    pub max_forwards: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            tcp_connections: TCP_CONNECTIONS_PER_LISTENER,
            tcp_idle: TCP_IDLE_TIMEOUT,
            tcp_queries: TCP_QUERIES_PER_CONNECTION,
            forward_timeout: FORWARD_TIMEOUT,
            max_forwards: MAX_FORWARDS,
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

fn if_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

// ---------------------------------------------------------------------------
// Metrics

/// Counters of the DNS side (relaxed atomics; a later issue exports them).
#[derive(Debug, Default)]
pub struct DnsMetrics {
    udp_queries: AtomicU64,
    tcp_queries: AtomicU64,
    /// Responses sent, by RCODE (16 = BADVERS; forwarded responses by the
    /// upstream's 4-bit code).
    responses: [AtomicU64; 17],
    dropped: AtomicU64,
    forwarded: AtomicU64,
    forward_failed: AtomicU64,
    forward_rejected: AtomicU64,
    tcp_rejected: AtomicU64,
    zone_swaps: AtomicU64,
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
    /// TCP connections closed at accept: the listener was full.
    pub tcp_rejected: u64,
    /// Zone indexes swapped in.
    pub zone_swaps: u64,
}

impl MetricsSnapshot {
    /// Responses sent with `rcode`.
    pub fn rcode(&self, rcode: Rcode) -> u64 {
        self.responses[usize::from(rcode.code()).min(16)]
    }
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl DnsMetrics {
    fn response(&self, code: u16) {
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
            zone_swaps: get(&self.zone_swaps),
        }
    }
}

// ---------------------------------------------------------------------------
// Message helpers

fn be16(b: &[u8], at: usize) -> Option<u16> {
    match b.get(at..at + 2) {
        Some(&[hi, lo]) => Some(u16::from_be_bytes([hi, lo])),
        _ => None,
    }
}

/// The end of the question section of a message with one uncompressed
/// question, or `None`.
fn question_end(msg: &[u8]) -> Option<usize> {
    if be16(msg, 4)? != 1 {
        return None;
    }
    let mut pos = HEADER_LEN;
    loop {
        let len = usize::from(*msg.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        if len > 63 || pos + len > HEADER_LEN + 255 {
            return None;
        }
        pos += len;
    }
    let end = pos + 4;
    (end <= msg.len()).then_some(end)
}

/// The question bytes (name, type, class) of a message.
fn question(msg: &[u8]) -> Option<&[u8]> {
    msg.get(HEADER_LEN..question_end(msg)?)
}

/// Writes a SERVFAIL response to `query` into `out` (header and, if it
/// parses, the question). False if `query` has no header.
fn servfail(query: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    let Some(h) = query.get(..HEADER_LEN) else {
        return false;
    };
    let q = question(query);
    out.extend_from_slice(&h[..2]);
    out.push(0x80 | (h[2] & 0x79)); // QR, OPCODE and RD copied
    out.push(0x80 | (h[3] & 0x10) | 2); // RA, CD copied, SERVFAIL
    out.extend_from_slice(&u16::from(q.is_some()).to_be_bytes());
    out.extend_from_slice(&[0; 6]);
    if let Some(q) = q {
        out.extend_from_slice(q);
    }
    true
}

/// The RCODE in a response header.
fn rcode_of(msg: &[u8]) -> u16 {
    msg.get(3).map_or(0, |b| u16::from(b & 0x0F))
}

// ---------------------------------------------------------------------------
// Forwarding

/// A forward waiting for its reply.
struct Pending {
    upstream: SocketAddr,
    question: Box<[u8]>,
    reply: oneshot::Sender<Vec<u8>>,
}

type PendingMap = Arc<Mutex<HashMap<u16, Pending>>>;

/// Sends non-`.internal` queries upstream; see the module docs.
struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    /// `[IPv6, IPv4]` sockets, for the families the upstreams use.
    sockets: [Option<Arc<UdpSocket>>; 2],
    pending: PendingMap,
    permits: Arc<Semaphore>,
    metrics: Arc<DnsMetrics>,
}

/// Removes a pending entry when the forward finishes or is cancelled.
struct PendingGuard<'a> {
    map: &'a PendingMap,
    id: u16,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(&self.id);
        }
    }
}

fn family(addr: &SocketAddr) -> usize {
    match addr {
        SocketAddr::V6(_) => 0,
        SocketAddr::V4(_) => 1,
    }
}

impl Forwarder {
    /// Binds the forwarding sockets and starts their receive tasks (returned
    /// so the service can end them).
    fn start(
        upstreams: Vec<SocketAddr>,
        limits: &Limits,
        metrics: Arc<DnsMetrics>,
    ) -> (Arc<Self>, Vec<JoinHandle<()>>) {
        let pending: PendingMap = Arc::default();
        let mut sockets: [Option<Arc<UdpSocket>>; 2] = [None, None];
        let mut tasks = Vec::new();
        for (fam, any) in [
            (0, SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))),
            (1, SocketAddr::from(([0, 0, 0, 0], 0))),
        ] {
            if !upstreams.iter().any(|u| family(u) == fam) {
                continue;
            }
            match bind_udp(any, false) {
                Ok(sock) => {
                    let sock = Arc::new(sock);
                    tasks.push(tokio::spawn(receive_replies(sock.clone(), pending.clone())));
                    sockets[fam] = Some(sock);
                }
                Err(e) => warn!(error = %e, address = %any,
                    "cannot bind a socket for forwarding; upstreams of this family get no queries"),
            }
        }
        let f = Arc::new(Self {
            upstreams,
            timeout: limits.forward_timeout,
            sockets,
            pending,
            permits: Arc::new(Semaphore::new(limits.max_forwards)),
            metrics,
        });
        (f, tasks)
    }

    /// A permit for one forward, or `None` when the limit is reached.
    fn permit(&self) -> Option<OwnedSemaphorePermit> {
        let p = self.permits.clone().try_acquire_owned().ok();
        if p.is_none() {
            inc(&self.metrics.forward_rejected);
        }
        p
    }

    /// Forwards `query` over UDP; the reply carries the query's ID.
    async fn udp(&self, query: &[u8]) -> Option<Vec<u8>> {
        inc(&self.metrics.forwarded);
        let q = question(query)?;
        let client_id = query.get(..2)?;
        let mut msg = query.to_vec();
        for &up in &self.upstreams {
            let Some(sock) = &self.sockets[family(&up)] else {
                continue;
            };
            let (tx, rx) = oneshot::channel();
            let Some(id) = self.register(up, q, tx) else {
                continue;
            };
            let _guard = PendingGuard {
                map: &self.pending,
                id,
            };
            msg[..2].copy_from_slice(&id.to_be_bytes());
            if let Err(e) = sock.send_to(&msg, up).await {
                debug!(upstream = %up, error = %e, "forward: send failed");
                continue;
            }
            match tokio::time::timeout(self.timeout, rx).await {
                Ok(Ok(mut reply)) => {
                    reply[..2].copy_from_slice(client_id);
                    return Some(reply);
                }
                _ => debug!(upstream = %up, "forward: no reply in time"),
            }
        }
        inc(&self.metrics.forward_failed);
        None
    }

    /// Registers a pending forward under a fresh random ID.
    fn register(
        &self,
        upstream: SocketAddr,
        question: &[u8],
        reply: oneshot::Sender<Vec<u8>>,
    ) -> Option<u16> {
        let mut map = self.pending.lock().ok()?;
        // At most `max_forwards` of 65536 IDs are taken: a few tries find one.
        let id = (0..64)
            .map(|_| rand::random::<u16>())
            .find(|id| !map.contains_key(id))?;
        map.insert(
            id,
            Pending {
                upstream,
                question: question.into(),
                reply,
            },
        );
        Some(id)
    }

    /// Forwards `query` over TCP (a connection per query).
    async fn tcp(&self, query: &[u8]) -> Option<Vec<u8>> {
        inc(&self.metrics.forwarded);
        let q = question(query)?;
        let len = u16::try_from(query.len()).ok()?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(query);
        for &up in &self.upstreams {
            let id: u16 = rand::random();
            framed[2..4].copy_from_slice(&id.to_be_bytes());
            let exchange = async {
                let mut s = TcpStream::connect(up).await?;
                s.write_all(&framed).await?;
                let mut len = [0u8; 2];
                s.read_exact(&mut len).await?;
                let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
                s.read_exact(&mut reply).await?;
                io::Result::Ok(reply)
            };
            match tokio::time::timeout(self.timeout, exchange).await {
                Ok(Ok(mut reply)) if is_reply_to(&reply, id, q) => {
                    reply[..2].copy_from_slice(&query[..2]);
                    return Some(reply);
                }
                Ok(Ok(_)) => debug!(upstream = %up, "forward over TCP: reply does not match"),
                Ok(Err(e)) => debug!(upstream = %up, error = %e, "forward over TCP failed"),
                Err(_) => debug!(upstream = %up, "forward over TCP: no reply in time"),
            }
        }
        inc(&self.metrics.forward_failed);
        None
    }
}

/// Whether `reply` is a response with `id` to the question `q`.
fn is_reply_to(reply: &[u8], id: u16, q: &[u8]) -> bool {
    reply.len() >= HEADER_LEN
        && be16(reply, 0) == Some(id)
        && reply[2] & 0x80 != 0
        && question(reply).is_some_and(|rq| rq.eq_ignore_ascii_case(q))
}

/// An IPv4-mapped address as the IPv4 address it is.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Reads upstream replies from one forwarding socket and hands each to the
/// forward waiting for it; anything else is dropped.
async fn receive_replies(sock: Arc<UdpSocket>, pending: PendingMap) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "forwarding socket: receive failed");
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        let reply = &buf[..n];
        let Some(id) = be16(reply, 0) else { continue };
        let Ok(mut map) = pending.lock() else { return };
        let matches = map.get(&id).is_some_and(|p| {
            canonical(p.upstream) == canonical(from) && is_reply_to(reply, id, &p.question)
        });
        if matches {
            if let Some(p) = map.remove(&id) {
                let _ = p.reply.send(reply.to_vec());
            }
        } else {
            debug!(%from, len = n, "forwarding socket: dropped an unmatched reply");
        }
    }
}

// ---------------------------------------------------------------------------
// Listeners

/// What every listener task shares.
struct Ctx {
    zones: Arc<SharedZones>,
    metrics: Arc<DnsMetrics>,
    forwarder: Arc<Forwarder>,
    limits: Limits,
    /// Tests on loopback: the source address the handler sees.
    #[cfg(test)]
    pretend_src: Option<IpAddr>,
}

impl Ctx {
    #[inline]
    fn source(&self, from: SocketAddr) -> IpAddr {
        #[cfg(test)]
        if let Some(a) = self.pretend_src {
            return a;
        }
        from.ip()
    }
}

fn bind_udp(addr: SocketAddr, freebind: bool) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
        if freebind {
            s.set_freebind_v6(true)?;
        }
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

fn bind_tcp(addr: SocketAddr, freebind: bool) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
        if freebind {
            s.set_freebind_v6(true)?;
        }
    }
    // Rebinding after a restart must not wait for TIME_WAIT connections.
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// One org's UDP and TCP listener; dropping it stops both (and every TCP
/// connection it serves).
struct Listener {
    udp: JoinHandle<()>,
    tcp: JoinHandle<()>,
    local: SocketAddr,
}

impl Listener {
    /// Binds `addr` (UDP and TCP, with IPV6_FREEBIND) and serves the org
    /// whose /48 is `prefix` on it.
    fn start(prefix: OrgPrefix, addr: SocketAddr, ctx: &Arc<Ctx>) -> io::Result<Self> {
        let udp = bind_udp(addr, true)?;
        let local = udp.local_addr()?;
        // Port 0 (tests): TCP on the port UDP got.
        let tcp = bind_tcp(local, true)?;
        Ok(Self {
            udp: tokio::spawn(serve_udp(Arc::new(udp), prefix, ctx.clone())),
            tcp: tokio::spawn(serve_tcp(tcp, prefix, ctx.clone())),
            local,
        })
    }

    /// Stops both tasks and waits until their sockets are closed, so the
    /// address can be bound again at once.
    async fn stop(mut self) {
        self.udp.abort();
        self.tcp.abort();
        let _ = (&mut self.udp).await;
        let _ = (&mut self.tcp).await;
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.udp.abort();
        self.tcp.abort();
    }
}

/// The UDP hot path: every queued query in one `recvmmsg`, answered into
/// reused buffers, the answers in one `sendmmsg` (see [`super::batch`]).
async fn serve_udp(sock: Arc<UdpSocket>, prefix: OrgPrefix, ctx: Arc<Ctx>) {
    let fd = sock.as_raw_fd();
    let mut rx = RecvBatch::new();
    let mut tx = SendBatch::new(usize::from(super::MAX_UDP_PAYLOAD));
    loop {
        let n = match sock.try_io(Interest::READABLE, || rx.recv(fd)) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Err(e) = sock.readable().await {
                    debug!(error = %e, "DNS UDP socket failed");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                continue;
            }
            Err(e) => {
                // Nothing on an unconnected UDP socket is fatal; don't spin.
                debug!(error = %e, "DNS UDP receive failed");
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        tx.clear();
        let zones = ctx.zones.load();
        for i in 0..n {
            inc(&ctx.metrics.udp_queries);
            let Some((query, raw_from)) = rx.get(i) else {
                inc(&ctx.metrics.dropped);
                continue;
            };
            let from = batch::to_socket_addr(raw_from);
            let out = tx.next_buf();
            match answer(&zones, prefix, ctx.source(from), query, Transport::Udp, out) {
                Outcome::Answered(rcode) => {
                    ctx.metrics.response(rcode.code());
                    tx.push(raw_from);
                }
                Outcome::Drop => inc(&ctx.metrics.dropped),
                Outcome::Forward => {
                    if !forward_udp(&ctx, &sock, query, from) && servfail(query, out) {
                        ctx.metrics.response(Rcode::ServFail.code());
                        tx.push(raw_from);
                    }
                }
            }
        }
        drop(zones);
        while !tx.is_done() {
            match sock.try_io(Interest::WRITABLE, || tx.send(fd)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if sock.writable().await.is_err() {
                        break;
                    }
                }
                Err(e) => debug!(error = %e, "DNS UDP send failed"),
            }
        }
    }
}

/// Starts forwarding one UDP query in its own task, which sends the reply
/// (or SERVFAIL) itself. False when the in-flight limit is reached: the
/// caller answers SERVFAIL at once.
fn forward_udp(ctx: &Arc<Ctx>, sock: &Arc<UdpSocket>, query: &[u8], from: SocketAddr) -> bool {
    let Some(permit) = ctx.forwarder.permit() else {
        return false;
    };
    let (ctx, sock, query) = (ctx.clone(), sock.clone(), query.to_vec());
    tokio::spawn(async move {
        let _permit = permit;
        let reply = match ctx.forwarder.udp(&query).await {
            Some(r) => r,
            None => {
                let mut r = Vec::new();
                if !servfail(&query, &mut r) {
                    return;
                }
                r
            }
        };
        ctx.metrics.response(rcode_of(&reply));
        let _ = sock.send_to(&reply, from).await;
    });
    true
}

async fn serve_tcp(listener: TcpListener, prefix: OrgPrefix, ctx: Arc<Ctx>) {
    let slots = Arc::new(Semaphore::new(ctx.limits.tcp_connections));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, from)) => match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        conns.spawn(serve_conn(stream, from, prefix, ctx.clone(), slot));
                    }
                    Err(_) => {
                        inc(&ctx.metrics.tcp_rejected);
                        // Reset rather than linger: the client learns at once.
                        let _ = stream.set_zero_linger();
                        drop(stream);
                    }
                },
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    debug!(error = %e, "DNS TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// One TCP connection: queries answered one by one, in order.
async fn serve_conn(
    stream: TcpStream,
    from: SocketAddr,
    prefix: OrgPrefix,
    ctx: Arc<Ctx>,
    _slot: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let idle = ctx.limits.tcp_idle;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(4096, rd);
    let mut query = Vec::new();
    let mut out = Vec::with_capacity(512);
    let mut frame = Vec::with_capacity(514);
    let src = ctx.source(from);
    for _ in 0..ctx.limits.tcp_queries {
        let mut len = [0u8; 2];
        match tokio::time::timeout(idle, rd.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        query.resize(usize::from(u16::from_be_bytes(len)), 0);
        match tokio::time::timeout(idle, rd.read_exact(&mut query)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        inc(&ctx.metrics.tcp_queries);
        let outcome = {
            let zones = ctx.zones.load();
            answer(&zones, prefix, src, &query, Transport::Tcp, &mut out)
        };
        let response: &[u8] = match outcome {
            Outcome::Answered(rcode) => {
                ctx.metrics.response(rcode.code());
                &out
            }
            Outcome::Drop => {
                inc(&ctx.metrics.dropped);
                continue;
            }
            Outcome::Forward => {
                let reply = match ctx.forwarder.permit() {
                    Some(_permit) => ctx.forwarder.tcp(&query).await,
                    None => None,
                };
                match reply {
                    Some(r) => out = r,
                    None => {
                        servfail(&query, &mut out);
                    }
                }
                ctx.metrics.response(rcode_of(&out));
                &out
            }
        };
        let Ok(n) = u16::try_from(response.len()) else {
            return;
        };
        frame.clear();
        frame.extend_from_slice(&n.to_be_bytes());
        frame.extend_from_slice(response);
        match tokio::time::timeout(idle, wr.write_all(&frame)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

// ---------------------------------------------------------------------------
// The service

/// The DNS side of the daemon; see the module docs.
pub struct DnsService {
    settings: DnsSettings,
    ctx: Arc<Ctx>,
    /// Orgs that should have a listener (from the last snapshot).
    desired: BTreeSet<OrgPrefix>,
    listeners: BTreeMap<OrgPrefix, Listener>,
    /// Desired listeners that could not be bound; retried.
    failed: BTreeSet<OrgPrefix>,
    forwarder_tasks: Vec<JoinHandle<()>>,
    /// The snapshot the zone index in force was built from.
    built_from: Option<Arc<Snapshot>>,
}

/// A zone build taking longer than this was big enough to trim the heap
/// after.
const TRIM_AFTER: Duration = Duration::from_millis(20);

/// How often listeners that failed to bind are retried.
const BIND_RETRY: Duration = Duration::from_secs(1);

impl DnsService {
    /// Binds the forwarding sockets; listeners start with the first
    /// snapshot. Must run inside a tokio runtime.
    pub fn start(settings: DnsSettings) -> Self {
        let metrics = Arc::new(DnsMetrics::default());
        let (forwarder, forwarder_tasks) = Forwarder::start(
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
            forwarder_tasks,
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
    async fn reconcile_listeners(&mut self) {
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
            "DNS stopping"
        );
        for (_, l) in std::mem::take(&mut self.listeners) {
            l.stop().await;
        }
        for t in self.forwarder_tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for DnsService {
    fn drop(&mut self) {
        for t in &self.forwarder_tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    //! The socket layer on loopback, no namespaces and no root: listeners
    //! bind `[::1]:0` and the handler is told the source is inside the org
    //! (`Ctx::pretend_src`); upstreams are fake resolvers on `[::1]`.

    use std::net::SocketAddrV6;
    use std::time::Instant;

    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};

    use super::*;
    use crate::model::{HostId, NetworkId, PeerSlot, PrivateKey};
    use crate::store::{Gateway, Instance, Org, Peer};

    const ACME: u32 = 0x18;
    const OTHER: u32 = 0x19;

    fn prefix(net: u32) -> OrgPrefix {
        NetworkId::new(net).unwrap().prefix()
    }

    fn web_addr() -> Ipv6Addr {
        "fdaa:0:18:a7b:7d:0:a1:2".parse().unwrap()
    }

    fn member() -> IpAddr {
        "fdaa:0:18:a7b:d6b:0:a:2".parse().unwrap()
    }

    /// acme (peer `laptop` on lhr-1, app `web`), other (peer `spy` on iad-1).
    fn snapshot(revision: u64, laptop: bool) -> Snapshot {
        let mut s = Snapshot {
            revision,
            ..Snapshot::default()
        };
        for (name, net) in [("acme", ACME), ("other", OTHER)] {
            s.orgs.push(Org {
                name: name.parse().unwrap(),
                network_id: NetworkId::new(net).unwrap(),
            });
        }
        for (name, region, host) in [("lhr-1", "lhr", 0x0a7b_0d6b), ("iad-1", "iad", 0x0a7b_0001)] {
            s.gateways.push(Gateway {
                name: name.parse().unwrap(),
                region: region.parse().unwrap(),
                host_id: HostId::from_u32(host),
                endpoint: "gw.example.net:51820".parse().unwrap(),
                public_key: PrivateKey::generate().public_key(),
            });
        }
        s.instances.push(Instance {
            org: "acme".parse().unwrap(),
            app: "web".parse().unwrap(),
            id: "a1".parse().unwrap(),
            region: "lhr".parse().unwrap(),
            address: web_addr(),
            process_group: None,
            started: true,
        });
        let mut peer = |org: &str, net: u32, name: &str, gw: usize| {
            let g = &s.gateways[gw];
            let slot = PeerSlot::new(0).unwrap();
            let p = Peer {
                org: org.parse().unwrap(),
                name: name.parse().unwrap(),
                gateway: g.name.clone(),
                region: g.region.clone(),
                slot,
                net: slot.net(prefix(net), g.host_id),
                public_key: PrivateKey::generate().public_key(),
                created_at: 0,
                revision: 0,
            };
            s.peers.push(p);
        };
        if laptop {
            peer("acme", ACME, "laptop", 0);
        }
        peer("other", OTHER, "spy", 1);
        s
    }

    fn limits() -> Limits {
        Limits {
            forward_timeout: Duration::from_millis(300),
            ..Limits::default()
        }
    }

    /// A listener for acme on `[::1]:0` that believes every source is
    /// `laptop`.
    fn serve(limits: Limits, upstreams: Vec<SocketAddr>) -> (Listener, Arc<Ctx>) {
        let metrics = Arc::new(DnsMetrics::default());
        let (forwarder, tasks) = Forwarder::start(upstreams, &limits, metrics.clone());
        // The receive tasks live as long as the test's runtime.
        drop(tasks);
        let zones = SharedZones::new(ZoneIndex::build(
            &snapshot(1, true),
            &"lhr".parse().unwrap(),
            &RegionDistances::builtin(),
        ));
        let ctx = Arc::new(Ctx {
            zones: Arc::new(zones),
            metrics,
            forwarder,
            limits,
            pretend_src: Some(member()),
        });
        let l = Listener::start(prefix(ACME), "[::1]:0".parse().unwrap(), &ctx).unwrap();
        (l, ctx)
    }

    fn query(id: u16, name: &str, rtype: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        m.to_vec().unwrap()
    }

    async fn udp_ask(to: SocketAddr, q: &[u8], wait: Duration) -> Option<Message> {
        let s = UdpSocket::bind("[::1]:0").await.unwrap();
        s.send_to(q, to).await.unwrap();
        let mut buf = vec![0u8; 65535];
        let n = tokio::time::timeout(wait, s.recv(&mut buf))
            .await
            .ok()?
            .unwrap();
        Some(Message::from_vec(&buf[..n]).unwrap())
    }

    fn frame(q: &[u8]) -> Vec<u8> {
        let mut f = (q.len() as u16).to_be_bytes().to_vec();
        f.extend_from_slice(q);
        f
    }

    async fn read_frame(s: &mut TcpStream) -> io::Result<Vec<u8>> {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await?;
        let mut m = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut m).await?;
        Ok(m)
    }

    fn aaaa(m: &Message) -> Vec<Ipv6Addr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::AAAA(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn udp_answers_from_the_zone_and_counts_rcodes() {
        let (l, ctx) = serve(limits(), vec![]);
        let m = udp_ask(
            l.local,
            &query(7, "WEB.internal", RecordType::AAAA),
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        assert_eq!(m.metadata.id, 7);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(aaaa(&m), [web_addr()]);
        let m = udp_ask(
            l.local,
            &query(8, "nope.internal", RecordType::AAAA),
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        // Garbage is dropped or FORMERR'd, and the listener lives on.
        for junk in [&b""[..], b"\x00", &[0xFF; 40], &[0; 12]] {
            let s = UdpSocket::bind("[::1]:0").await.unwrap();
            s.send_to(junk, l.local).await.unwrap();
        }
        let m = udp_ask(
            l.local,
            &query(9, "laptop._peer.internal", RecordType::AAAA),
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        assert_eq!(m.answers.len(), 1);
        let got = ctx.metrics.snapshot();
        assert_eq!(got.udp_queries, 7);
        assert_eq!(got.rcode(Rcode::NoError), 2);
        assert_eq!(got.rcode(Rcode::NxDomain), 1);
        assert_eq!(got.rcode(Rcode::FormErr), 1, "{got:?}");
        assert_eq!(got.dropped, 3, "{got:?}");
    }

    #[tokio::test]
    async fn a_source_outside_the_org_is_refused() {
        let (l, _) = serve(limits(), vec![]);
        // Without the test override the handler sees ::1: not in acme.
        let metrics = Arc::new(DnsMetrics::default());
        let (forwarder, _) = Forwarder::start(vec![], &limits(), metrics.clone());
        let ctx = Arc::new(Ctx {
            zones: Arc::new(SharedZones::default()),
            metrics,
            forwarder,
            limits: limits(),
            pretend_src: None,
        });
        let real = Listener::start(prefix(ACME), "[::1]:0".parse().unwrap(), &ctx).unwrap();
        for name in ["web.internal", "example.com"] {
            let m = udp_ask(
                real.local,
                &query(1, name, RecordType::AAAA),
                Duration::from_secs(2),
            )
            .await
            .unwrap();
            assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{name}");
        }
        drop(l);
    }

    #[tokio::test]
    async fn tcp_pipelined_queries_are_answered_in_order() {
        let (l, ctx) = serve(limits(), vec![]);
        let mut s = TcpStream::connect(l.local).await.unwrap();
        let names = [
            ("web.internal", RecordType::AAAA),
            ("nope.internal", RecordType::AAAA),
            ("_peer.internal", RecordType::TXT),
            ("lhr.web.internal", RecordType::AAAA),
        ];
        let mut all = Vec::new();
        for (i, (n, t)) in names.iter().enumerate() {
            all.extend(frame(&query(100 + i as u16, n, *t)));
        }
        // One write, split at an awkward place to exercise partial reads.
        s.write_all(&all[..5]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.write_all(&all[5..]).await.unwrap();
        for (i, (n, _)) in names.iter().enumerate() {
            let m = Message::from_vec(&read_frame(&mut s).await.unwrap()).unwrap();
            assert_eq!(m.metadata.id, 100 + i as u16, "{n}");
            assert_eq!(m.queries[0].name().to_ascii(), format!("{n}."));
        }
        assert_eq!(ctx.metrics.snapshot().tcp_queries, 4);
    }

    #[tokio::test]
    async fn tcp_connections_are_bounded_idle_ones_closed_and_queries_capped() {
        let l = Limits {
            tcp_connections: 2,
            tcp_idle: Duration::from_millis(300),
            tcp_queries: 3,
            ..limits()
        };
        let (l, ctx) = serve(l, vec![]);
        let mut a = TcpStream::connect(l.local).await.unwrap();
        let mut b = TcpStream::connect(l.local).await.unwrap();
        // Both are served.
        for s in [&mut a, &mut b] {
            s.write_all(&frame(&query(1, "web.internal", RecordType::AAAA)))
                .await
                .unwrap();
            read_frame(s).await.unwrap();
        }
        // A third is closed at once.
        let mut c = TcpStream::connect(l.local).await.unwrap();
        let mut byte = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(1), c.read(&mut byte))
            .await
            .expect("the third connection was not closed");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        assert_eq!(ctx.metrics.snapshot().tcp_rejected, 1);
        // Idle connections are closed after the idle timeout…
        let t0 = Instant::now();
        let r = a.read(&mut byte).await;
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        let idle = t0.elapsed();
        assert!(idle < Duration::from_secs(2), "closed after {idle:?}");
        drop((a, b));
        tokio::time::sleep(Duration::from_millis(50)).await;
        // …which frees their slots; a connection gets `tcp_queries` answers.
        let mut d = TcpStream::connect(l.local).await.unwrap();
        for i in 0..4 {
            d.write_all(&frame(&query(i, "web.internal", RecordType::AAAA)))
                .await
                .unwrap();
        }
        for _ in 0..3 {
            read_frame(&mut d).await.unwrap();
        }
        assert!(read_frame(&mut d).await.is_err(), "a 4th answer");
    }

    /// Builds a response to `q` with one AAAA answer `2001:db8::7`.
    fn fake_reply(q: &[u8]) -> Vec<u8> {
        let end = question_end(q).unwrap();
        let mut r = q[..end].to_vec();
        r[2] |= 0x80;
        r[3] = 0x80;
        r[6..8].copy_from_slice(&1u16.to_be_bytes());
        r[10..12].copy_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&[0xC0, 0x0C, 0, 28, 0, 1, 0, 0, 0, 60, 0, 16]);
        r.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        r
    }

    /// Replies to send before the right one: `(from the spoofer?, bytes)`.
    type BeforeReply = fn(&[u8]) -> Vec<(bool, Vec<u8>)>;

    /// A UDP upstream on `[::1]` that, for each query, first sends the
    /// replies `before(query)` gives (from `spoofer` when asked), then the
    /// right one. Returns its address and the IDs it saw.
    async fn fake_upstream(before: BeforeReply) -> (SocketAddr, Arc<Mutex<Vec<u16>>>) {
        let s = UdpSocket::bind("[::1]:0").await.unwrap();
        let spoofer = UdpSocket::bind("[::1]:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            loop {
                let (n, from) = s.recv_from(&mut buf).await.unwrap();
                let q = buf[..n].to_vec();
                seen2.lock().unwrap().push(be16(&q, 0).unwrap());
                for (spoof, junk) in before(&q) {
                    let sock = if spoof { &spoofer } else { &s };
                    sock.send_to(&junk, from).await.unwrap();
                }
                s.send_to(&fake_reply(&q), from).await.unwrap();
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn forwarding_rewrites_the_id_and_drops_replies_that_do_not_match() {
        let (up, seen) = fake_upstream(|q| {
            let right = fake_reply(q);
            let mut wrong_id = right.clone();
            wrong_id[0] ^= 0xFF;
            let mut wrong_q = right.clone();
            wrong_q[13] ^= 0x01; // a letter of the name
            let mut not_response = right.clone();
            not_response[2] &= 0x7F;
            vec![
                (false, b"\x01\x02\x03".to_vec()),
                (false, wrong_id),
                (false, wrong_q),
                (false, not_response),
                (true, right),
            ]
        })
        .await;
        let (l, ctx) = serve(limits(), vec![up]);
        let m = udp_ask(
            l.local,
            &query(0x4242, "Example.COM", RecordType::AAAA),
            Duration::from_secs(2),
        )
        .await
        .expect("no forwarded answer");
        assert_eq!(m.metadata.id, 0x4242);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(aaaa(&m), ["2001:db8::7".parse::<Ipv6Addr>().unwrap()]);
        assert_eq!(m.queries[0].name().to_ascii(), "Example.COM.");
        let ids = seen.lock().unwrap().clone();
        assert_eq!(ids.len(), 1);
        assert_ne!(ids[0], 0x4242, "the query ID was not rewritten");
        let got = ctx.metrics.snapshot();
        assert_eq!((got.forwarded, got.forward_failed), (1, 0));
        assert!(ctx.forwarder.pending.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_silent_upstream_is_skipped_and_all_silent_is_servfail() {
        let silent = UdpSocket::bind("[::1]:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let (good, _) = fake_upstream(|_| vec![]).await;
        let (l, _) = serve(limits(), vec![silent_addr, good]);
        let t0 = Instant::now();
        let m = udp_ask(
            l.local,
            &query(1, "example.com", RecordType::AAAA),
            Duration::from_secs(3),
        )
        .await
        .unwrap();
        let took = t0.elapsed();
        assert_eq!(aaaa(&m).len(), 1);
        assert!(took >= Duration::from_millis(280), "{took:?}");

        let (l2, ctx) = serve(limits(), vec![silent_addr, silent_addr]);
        let t0 = Instant::now();
        let m = udp_ask(
            l2.local,
            &query(2, "example.com", RecordType::AAAA),
            Duration::from_secs(3),
        )
        .await
        .unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(m.queries.len(), 1);
        assert!(t0.elapsed() >= Duration::from_millis(580));
        assert_eq!(ctx.metrics.snapshot().forward_failed, 1);
        assert!(ctx.forwarder.pending.lock().unwrap().is_empty());
        drop((l, silent));
    }

    #[tokio::test]
    async fn forwards_beyond_the_limit_get_servfail_at_once() {
        let silent = UdpSocket::bind("[::1]:0").await.unwrap();
        let l = Limits {
            max_forwards: 1,
            forward_timeout: Duration::from_secs(2),
            ..limits()
        };
        let (l, ctx) = serve(l, vec![silent.local_addr().unwrap()]);
        let s = UdpSocket::bind("[::1]:0").await.unwrap();
        s.send_to(&query(1, "one.example", RecordType::AAAA), l.local)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t0 = Instant::now();
        let m = udp_ask(
            l.local,
            &query(2, "two.example", RecordType::AAAA),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert!(t0.elapsed() < Duration::from_millis(500));
        assert_eq!(ctx.metrics.snapshot().forward_rejected, 1);
    }

    #[tokio::test]
    async fn tcp_queries_are_forwarded_over_tcp() {
        let up = TcpListener::bind("[::1]:0").await.unwrap();
        let up_addr = up.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = up.accept().await.unwrap();
                tokio::spawn(async move {
                    let q = read_frame(&mut s).await.unwrap();
                    s.write_all(&frame(&fake_reply(&q))).await.unwrap();
                });
            }
        });
        let (l, _) = serve(limits(), vec![up_addr]);
        let mut s = TcpStream::connect(l.local).await.unwrap();
        s.write_all(&frame(&query(77, "example.com", RecordType::AAAA)))
            .await
            .unwrap();
        s.write_all(&frame(&query(78, "web.internal", RecordType::AAAA)))
            .await
            .unwrap();
        let m = Message::from_vec(&read_frame(&mut s).await.unwrap()).unwrap();
        assert_eq!(m.metadata.id, 77);
        assert_eq!(aaaa(&m), ["2001:db8::7".parse::<Ipv6Addr>().unwrap()]);
        let m = Message::from_vec(&read_frame(&mut s).await.unwrap()).unwrap();
        assert_eq!((m.metadata.id, aaaa(&m)), (78, vec![web_addr()]));
    }

    #[tokio::test]
    async fn the_service_follows_snapshots_with_listeners_and_zones() {
        let mut settings =
            DnsSettings::new("lhr-1".parse().unwrap(), "lhr".parse().unwrap(), vec![]);
        // Port 0: no privileges needed; IPV6_FREEBIND lets the ::3
        // addresses be bound although no interface has them.
        settings.port = 0;
        let dns = DnsService::start(settings);
        let zones = dns.zones();
        let (snap_tx, snap_rx) = watch::channel(None);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        // Observe the listeners from inside by wrapping `apply`.
        let task = tokio::spawn(async move {
            let mut dns = dns;
            let mut snaps: watch::Receiver<Option<Arc<Snapshot>>> = snap_rx;
            let mut stop = stop_rx;
            loop {
                tokio::select! {
                    r = snaps.changed() => {
                        if r.is_err() { break; }
                        let s = snaps.borrow_and_update().clone();
                        if let Some(s) = s {
                            dns.apply(s).await;
                            let _ = seen_tx.send(dns.listening());
                        }
                    }
                    _ = stop.changed() => break,
                }
            }
            dns.stop().await;
        });

        let acme3 = Ipv6Addr::new(0xfdaa, 0, 0x18, 0, 0, 0, 0, 3);
        let t0 = Instant::now();
        snap_tx.send_replace(Some(Arc::new(snapshot(1, true))));
        let l = seen_rx.recv().await.unwrap();
        println!("snapshot to zone and listeners: {:?}", t0.elapsed());
        // acme has a peer here; other's only peer is on iad-1.
        assert_eq!(l.len(), 1, "{l:?}");
        assert_eq!(l[0].ip(), IpAddr::V6(acme3));
        assert_eq!(zones.load().revision(), 1);

        snap_tx.send_replace(Some(Arc::new(snapshot(2, false))));
        assert!(seen_rx.recv().await.unwrap().is_empty());
        assert_eq!(zones.load().revision(), 2);
        // And back: the address can be bound again at once.
        snap_tx.send_replace(Some(Arc::new(snapshot(3, true))));
        assert_eq!(seen_rx.recv().await.unwrap().len(), 1);
        stop_tx.send_replace(true);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn run_swaps_the_zone_within_100_ms_and_stops_on_shutdown() {
        let mut settings =
            DnsSettings::new("lhr-1".parse().unwrap(), "lhr".parse().unwrap(), vec![]);
        settings.port = 0;
        let dns = DnsService::start(settings);
        let zones = dns.zones();
        let metrics = dns.metrics();
        let (snap_tx, snap_rx) = watch::channel(None);
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(dns.run(snap_rx, stop_rx));
        for rev in 1..=3u64 {
            let t0 = Instant::now();
            snap_tx.send_replace(Some(Arc::new(snapshot(rev, true))));
            while zones.load().revision() != rev {
                assert!(t0.elapsed() < Duration::from_millis(100), "rev {rev}");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        assert_eq!(metrics.snapshot().zone_swaps, 3);
        stop_tx.send_replace(true);
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("run did not stop")
            .unwrap();
    }

    #[test]
    fn resolv_conf_nameservers() {
        let got = parse_resolv_conf(
            "# comment\nsearch example.net\nnameserver 127.0.0.53\n\
             nameserver  2001:db8::53 \nnameserver fe80::1%1\nnameserver fe80::2%nosuchif0\n\
             nameserver bogus\noptions edns0\n",
        );
        assert_eq!(
            got,
            vec![
                "127.0.0.53:53".parse().unwrap(),
                "[2001:db8::53]:53".parse().unwrap(),
                SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 53, 0, 1)),
            ]
        );
        assert_eq!(
            upstreams_or_resolv_conf(&["[::1]:5353".parse().unwrap()]),
            vec!["[::1]:5353".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn servfail_echoes_id_flags_and_question() {
        let q = query(0xBEEF, "example.com", RecordType::AAAA);
        let mut out = Vec::new();
        assert!(servfail(&q, &mut out));
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.metadata.id, 0xBEEF);
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert!(m.metadata.recursion_desired && m.metadata.recursion_available);
        assert_eq!(m.queries.len(), 1);
        assert!(!servfail(b"short", &mut out));
        // A header with a garbled question: header only.
        let mut bad = q.clone();
        bad[12] = 0xC0;
        assert!(servfail(&bad, &mut out));
        assert_eq!(out.len(), HEADER_LEN);
    }
}
