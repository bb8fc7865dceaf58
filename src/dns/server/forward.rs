//! Forwarding names outside `.internal` to the upstream resolvers (see
//! "Forwarding" in the parent module): shared UDP sockets with fresh IDs,
//! replies checked against what was sent, TCP for TCP queries.

use super::*;

/// A forward waiting for its reply.
pub(super) struct Pending {
    pub(super) upstream: SocketAddr,
    pub(super) question: Box<[u8]>,
    pub(super) reply: oneshot::Sender<Vec<u8>>,
}

pub(super) type PendingMap = Arc<Mutex<HashMap<u16, Pending>>>;

/// Sends non-`.internal` queries upstream; see the module docs.
pub(super) struct Forwarder {
    pub(super) upstreams: Vec<SocketAddr>,
    pub(super) timeout: Duration,
    /// `[IPv6, IPv4]` sockets, for the families the upstreams use.
    pub(super) sockets: [Option<Arc<UdpSocket>>; 2],
    pub(super) pending: PendingMap,
    pub(super) permits: Arc<Semaphore>,
    /// Forwards in flight per org, each at most `per_org`.
    pub(super) by_org: Arc<Mutex<HashMap<OrgPrefix, usize>>>,
    pub(super) per_org: usize,
    pub(super) metrics: Arc<DnsMetrics>,
}

/// Removes a pending entry when the forward finishes or is cancelled.
pub(super) struct PendingGuard<'a> {
    pub(super) map: &'a PendingMap,
    pub(super) id: u16,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(&self.id);
        }
    }
}

pub(super) fn family(addr: &SocketAddr) -> usize {
    match addr {
        SocketAddr::V6(_) => 0,
        SocketAddr::V4(_) => 1,
    }
}

impl Forwarder {
    /// Binds the forwarding sockets and starts their receive tasks (returned
    /// so the service can end them).
    pub(super) fn start(
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
            by_org: Arc::default(),
            per_org: limits.max_forwards_per_org.max(1),
            metrics,
        });
        (f, tasks)
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

    /// Forwards `query` over UDP; the reply carries the query's ID.
    pub(super) async fn udp(&self, query: &[u8]) -> Option<Vec<u8>> {
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
    pub(super) fn register(
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
    pub(super) async fn tcp(&self, query: &[u8]) -> Option<Vec<u8>> {
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
pub(super) fn is_reply_to(reply: &[u8], id: u16, q: &[u8]) -> bool {
    reply.len() >= HEADER_LEN
        && be16(reply, 0) == Some(id)
        && reply[2] & 0x80 != 0
        && question(reply).is_some_and(|rq| rq.eq_ignore_ascii_case(q))
}

/// An IPv4-mapped address as the IPv4 address it is.
pub(super) fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Reads upstream replies from one forwarding socket and hands each to the
/// forward waiting for it; anything else is dropped.
pub(super) async fn receive_replies(sock: Arc<UdpSocket>, pending: PendingMap) {
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
