//! Forwarding names outside `.internal` to the upstream resolvers (see
//! "Forwarding" in the parent module): a fresh socket, port and ID for each
//! UDP query (RFC 5452), replies checked against what was sent, the next
//! upstream after a SERVFAIL or REFUSED, TCP for TCP queries.

use super::*;
use crate::dns::MAX_UDP_PAYLOAD;
use hickory_proto::op::{Edns, Message};

/// Sends non-`.internal` queries upstream; see the module docs.
pub(super) struct Forwarder {
    pub(super) upstreams: Vec<SocketAddr>,
    pub(super) timeout: Duration,
    pub(super) permits: Arc<Semaphore>,
    /// Forwards in flight per org, each at most `per_org`.
    pub(super) by_org: Arc<Mutex<HashMap<OrgPrefix, usize>>>,
    pub(super) per_org: usize,
    pub(super) metrics: Arc<DnsMetrics>,
    /// Upstreams that last failed to answer in time, until when they are
    /// tried only after the others.
    down: Mutex<HashMap<SocketAddr, std::time::Instant>>,
}

/// How long an upstream that didn't answer in time is asked only after
/// the others; the first query after that tries it first again.
const DOWN_FOR: Duration = Duration::from_secs(30);

/// SERVFAIL and REFUSED: this upstream can't or won't answer; another may.
const RCODE_SERVFAIL: u8 = 2;
const RCODE_REFUSED: u8 = 5;

impl Forwarder {
    /// A forwarder to `upstreams`, within `limits`.
    pub(super) fn start(
        upstreams: Vec<SocketAddr>,
        limits: &Limits,
        metrics: Arc<DnsMetrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            upstreams,
            timeout: limits.forward_timeout,
            permits: Arc::new(Semaphore::new(limits.max_forwards)),
            by_org: Arc::default(),
            per_org: limits.max_forwards_per_org.max(1),
            metrics,
            down: Mutex::default(),
        })
    }

    /// A permit for one forward of `org`'s, or `None` when the org's share
    /// or the overall limit is reached.
    pub(super) fn permit(&self, org: OrgPrefix) -> Option<ForwardPermit> {
        let p = self.try_permit(org);
        if p.is_none() {
            inc(&self.metrics.forward_rejected);
        }
        p
    }

    fn try_permit(&self, org: OrgPrefix) -> Option<ForwardPermit> {
        let mut by_org = self.by_org.lock().ok()?;
        let n = by_org.entry(org).or_insert(0);
        if *n >= self.per_org {
            return None;
        }
        let global = self.permits.clone().try_acquire_owned().ok()?;
        *n += 1;
        Some(ForwardPermit {
            _global: global,
            org,
            by_org: self.by_org.clone(),
        })
    }

    /// Forwards a query that came over UDP: the reply carries the query's
    /// ID and fits what the client can take (else it is truncated, TC set,
    /// so the client asks again over TCP).
    pub(super) async fn udp(&self, query: &[u8]) -> Option<Vec<u8>> {
        self.forward(query, Over::Udp).await
    }

    /// Forwards a query that came over TCP, over TCP (a connection per
    /// query): the reply is relayed whole.
    pub(super) async fn tcp(&self, query: &[u8]) -> Option<Vec<u8>> {
        self.forward(query, Over::Tcp).await
    }

    /// Asks each upstream in turn until one answers with something other
    /// than SERVFAIL or REFUSED; `None` when none does. EDNS is per hop
    /// (RFC 6891 §6.1.1): the upstream gets sixpn's OPT, not the client's,
    /// and the client gets sixpn's OPT (if it sent one), not the upstream's.
    async fn forward(&self, query: &[u8], over: Over) -> Option<Vec<u8>> {
        inc(&self.metrics.forwarded);
        // The handler forwards only queries it could read; hickory-proto
        // reads them again to rebuild the OPT.
        let client = Message::from_vec(query).ok()?;
        let client_edns = client.edns.clone();
        let dnssec_ok = client_edns.as_ref().is_some_and(|e| e.flags().dnssec_ok);
        let mut ask = client.clone();
        ask.edns = Some(own_edns(dnssec_ok));
        for up in self.in_order() {
            let id: u16 = rand::random();
            ask.metadata.id = id;
            let bytes = ask.to_vec().ok()?;
            let q = question(&bytes)?;
            let exchange = async {
                match over {
                    Over::Udp => exchange_udp(up, &bytes, id, q).await,
                    Over::Tcp => exchange_tcp(up, &bytes, id, q).await,
                }
            };
            match tokio::time::timeout(self.timeout, exchange).await {
                Ok(Ok(reply)) => {
                    if let Ok(mut d) = self.down.lock() {
                        d.remove(&up);
                    }
                    let rcode = reply[3] & 0x0F;
                    if matches!(rcode, RCODE_SERVFAIL | RCODE_REFUSED) {
                        debug!(upstream = %up, rcode, "forward: upstream can't answer; next");
                        continue;
                    }
                    match relay(&reply, client.metadata.id, client_edns.as_ref(), over) {
                        Some(r) => return Some(r),
                        None => debug!(upstream = %up, "forward: unreadable reply"),
                    }
                }
                Ok(Err(e)) => debug!(upstream = %up, error = %e, "forward failed"),
                Err(_) => {
                    debug!(upstream = %up, "forward: no reply in time; asked last for a while");
                    if let Ok(mut d) = self.down.lock() {
                        d.insert(up, std::time::Instant::now() + DOWN_FOR);
                    }
                    continue;
                }
            }
        }
        inc(&self.metrics.forward_failed);
        None
    }

    /// The upstreams in the order to ask them: in configured order, those
    /// that recently didn't answer in time last (they still answer when
    /// all others fail). An upstream whose time is up is first again, and
    /// one query decides whether it is back.
    fn in_order(&self) -> Vec<SocketAddr> {
        let now = std::time::Instant::now();
        let Ok(mut down) = self.down.lock() else {
            return self.upstreams.clone();
        };
        down.retain(|_, until| *until > now);
        let (up, late): (Vec<SocketAddr>, Vec<SocketAddr>) =
            self.upstreams.iter().partition(|u| !down.contains_key(*u));
        up.into_iter().chain(late).collect()
    }
}

/// How the client asked, and so how its answer travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Over {
    Udp,
    Tcp,
}

/// sixpn's OPT: its own UDP payload size, the client's DO bit, no options.
pub(super) fn own_edns(dnssec_ok: bool) -> Edns {
    let mut e = Edns::new();
    e.set_max_payload(MAX_UDP_PAYLOAD);
    e.set_dnssec_ok(dnssec_ok);
    e
}

/// The upstream's `reply` as the client gets it: the client's ID, sixpn's
/// OPT if the client sent one (the upstream's never), and over UDP no
/// bigger than the client takes (512 bytes without EDNS, its advertised
/// size up to sixpn's with) — else truncated to the question with TC set.
fn relay(reply: &[u8], id: u16, client_edns: Option<&Edns>, over: Over) -> Option<Vec<u8>> {
    let mut m = Message::from_vec(reply).ok()?;
    m.metadata.id = id;
    m.edns = client_edns.map(|c| own_edns(c.flags().dnssec_ok));
    let out = m.to_vec().ok()?;
    let limit = match (over, client_edns) {
        (Over::Tcp, _) => usize::from(u16::MAX),
        (Over::Udp, None) => 512,
        (Over::Udp, Some(e)) => usize::from(e.max_payload().clamp(512, MAX_UDP_PAYLOAD)),
    };
    if out.len() <= limit {
        return Some(out);
    }
    m.truncate().to_vec().ok()
}

/// One TCP exchange with `up` on a connection of its own.
async fn exchange_tcp(up: SocketAddr, msg: &[u8], id: u16, q: &[u8]) -> io::Result<Vec<u8>> {
    let len = u16::try_from(msg.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query too long for TCP"))?;
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    let mut s = TcpStream::connect(up).await?;
    s.write_all(&framed).await?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut reply).await?;
    if !is_reply_to(&reply, id, q) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the reply does not match the query",
        ));
    }
    Ok(reply)
}

/// Whether `reply` is a response with `id` to the question `q`.
pub(super) fn is_reply_to(reply: &[u8], id: u16, q: &[u8]) -> bool {
    reply.len() >= HEADER_LEN
        && be16(reply, 0) == Some(id)
        && reply[2] & 0x80 != 0
        && question(reply).is_some_and(|rq| rq.eq_ignore_ascii_case(q))
}

/// One UDP exchange with `up` from a socket of its own: an ephemeral port
/// the kernel picks at random, connected to `up` so that only its datagrams
/// arrive (an ICMP unreachable ends it at once). Datagrams that aren't the
/// reply to `id` and `q` — malformed, late, spoofed — are dropped and the
/// wait goes on; the caller bounds it.
async fn exchange_udp(up: SocketAddr, msg: &[u8], id: u16, q: &[u8]) -> io::Result<Vec<u8>> {
    let any: SocketAddr = match up {
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
    };
    let sock = UdpSocket::bind(any).await?;
    sock.connect(up).await?;
    sock.send(msg).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let n = sock.recv(&mut buf).await?;
        let reply = &buf[..n];
        if is_reply_to(reply, id, q) {
            return Ok(reply.to_vec());
        }
        debug!(upstream = %up, len = n, "forward: dropped a datagram that is not the reply");
    }
}

/// One forward in flight: a share of the overall limit and of its org's.
pub(super) struct ForwardPermit {
    _global: OwnedSemaphorePermit,
    org: OrgPrefix,
    by_org: Arc<Mutex<HashMap<OrgPrefix, usize>>>,
}

impl Drop for ForwardPermit {
    fn drop(&mut self) {
        if let Ok(mut by_org) = self.by_org.lock() {
            if let std::collections::hash_map::Entry::Occupied(mut e) = by_org.entry(self.org) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }
}
