//! One org's listeners on `[<org>::3]:53`: the UDP hot path with batched
//! receive and send, and TCP connections with their bounds.

use super::*;

pub(super) fn if_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// What every listener task shares.
pub(super) struct Ctx {
    pub(super) zones: Arc<SharedZones>,
    pub(super) metrics: Arc<DnsMetrics>,
    pub(super) forwarder: Arc<Forwarder>,
    pub(super) limits: Limits,
    /// Tests on loopback: the source address the handler sees.
    #[cfg(test)]
    pub(super) pretend_src: Option<IpAddr>,
}

impl Ctx {
    #[inline]
    pub(super) fn source(&self, from: SocketAddr) -> IpAddr {
        #[cfg(test)]
        if let Some(a) = self.pretend_src {
            return a;
        }
        from.ip()
    }
}

pub(super) fn bind_udp(addr: SocketAddr, freebind: bool) -> io::Result<UdpSocket> {
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

pub(super) fn bind_tcp(addr: SocketAddr, freebind: bool) -> io::Result<TcpListener> {
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
pub(super) struct Listener {
    pub(super) udp: JoinHandle<()>,
    pub(super) tcp: JoinHandle<()>,
    pub(super) local: SocketAddr,
}

impl Listener {
    /// Binds `addr` (UDP and TCP, with IPV6_FREEBIND) and serves the org
    /// whose /48 is `prefix` on it.
    pub(super) fn start(prefix: OrgPrefix, addr: SocketAddr, ctx: &Arc<Ctx>) -> io::Result<Self> {
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
    pub(super) async fn stop(mut self) {
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
/// reused buffers, the answers in one `sendmmsg` (see [`crate::dns::batch`]).
pub(super) async fn serve_udp(sock: Arc<UdpSocket>, prefix: OrgPrefix, ctx: Arc<Ctx>) {
    let fd = sock.as_raw_fd();
    let mut rx = RecvBatch::new();
    let mut tx = SendBatch::new(usize::from(crate::dns::MAX_UDP_PAYLOAD));
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
                    if !forward_udp(&ctx, &sock, prefix, query, from) && servfail(query, out) {
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
pub(super) fn forward_udp(
    ctx: &Arc<Ctx>,
    sock: &Arc<UdpSocket>,
    org: OrgPrefix,
    query: &[u8],
    from: SocketAddr,
) -> bool {
    let Some(permit) = ctx.forwarder.permit(org) else {
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

pub(super) async fn serve_tcp(listener: TcpListener, prefix: OrgPrefix, ctx: Arc<Ctx>) {
    let slots = Arc::new(Semaphore::new(ctx.limits.tcp_connections));
    // One source (a peer) may hold only its share of the listener, so it
    // can't lock the rest of its org out of TCP DNS.
    let per_source = ctx.limits.tcp_connections_per_source.max(1);
    let mut by_source: HashMap<IpAddr, usize> = HashMap::new();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, from)) => {
                    let held = by_source.get(&from.ip()).copied().unwrap_or(0);
                    let slot = (held < per_source)
                        .then(|| slots.clone().try_acquire_owned().ok())
                        .flatten();
                    match slot {
                        Some(slot) => {
                            *by_source.entry(from.ip()).or_insert(0) += 1;
                            let ctx = ctx.clone();
                            conns.spawn(async move {
                                serve_conn(stream, from, prefix, ctx, slot).await;
                                from.ip()
                            });
                        }
                        None => {
                            inc(&ctx.metrics.tcp_rejected);
                            // Reset rather than linger: the client learns at once.
                            let _ = stream.set_zero_linger();
                            drop(stream);
                        }
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    debug!(error = %e, "DNS TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Ok(ip) = done {
                    if let std::collections::hash_map::Entry::Occupied(mut e) = by_source.entry(ip) {
                        *e.get_mut() -= 1;
                        if *e.get() == 0 {
                            e.remove();
                        }
                    }
                }
            }
        }
    }
}

/// One TCP connection: queries answered one by one, in order.
pub(super) async fn serve_conn(
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
                let reply = match ctx.forwarder.permit(prefix) {
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
