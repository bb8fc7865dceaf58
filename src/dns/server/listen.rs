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
    let latency = ctx.metrics.latency(prefix);
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
        let t0 = std::time::Instant::now();
        let (mut answered, mut refused) = (0u64, 0u64);
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
                    if rcode == Rcode::Refused {
                        refused += 1;
                    } else {
                        answered += 1;
                    }
                    tx.push(raw_from);
                }
                Outcome::Drop => inc(&ctx.metrics.dropped),
                Outcome::Forward => {
                    let forwarded = forward_udp(&ctx, &sock, prefix, query, from, &latency, t0);
                    if !forwarded && servfail(query, out) {
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
        latency.observe(Answer::Answered, t0.elapsed(), answered);
        latency.observe(Answer::Refused, t0.elapsed(), refused);
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
    latency: &Arc<Latency>,
    t0: std::time::Instant,
) -> bool {
    let Some(permit) = ctx.forwarder.permit(org) else {
        return false;
    };
    let (ctx, sock, query) = (ctx.clone(), sock.clone(), query.to_vec());
    let latency = latency.clone();
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
        latency.observe(Answer::Forwarded, t0.elapsed(), 1);
    });
    true
}

/// How long a full listener waits for an evicted connection's slot
/// before it gives up and rejects the new one. The evicted task is parked
/// on its read and lets go within microseconds; this only bounds how long
/// an overloaded runtime can stall the accept loop.
const EVICT_WAIT: Duration = Duration::from_millis(200);

/// [`Conn::idle_since`] while a query is being read, answered, forwarded
/// or written.
const BUSY: u64 = 0;
/// [`Conn::idle_since`] once the accept loop has claimed the connection.
const EVICTED: u64 = u64::MAX;

/// One connection as its listener's accept loop sees it. The connection
/// writes `idle_since` once per query (idle when it waits for the next
/// one, [`BUSY`] when the first byte arrives); the accept loop reads it
/// only when the listener is full.
pub(super) struct Conn {
    /// When the connection began waiting for its next query (nanoseconds
    /// since the listener started, from 1), or [`BUSY`], or [`EVICTED`].
    /// Eviction and the start of a query race on this one word: whichever
    /// swaps it first wins, so a connection that has begun a query is never
    /// closed for a newcomer.
    idle_since: AtomicU64,
    /// Wakes the connection's idle read once it has been evicted.
    evict: tokio::sync::Notify,
}

impl Conn {
    fn new(now: u64) -> Self {
        Self {
            idle_since: AtomicU64::new(now),
            evict: tokio::sync::Notify::new(),
        }
    }
}

/// The listener's clock for [`Conn::idle_since`]: never [`BUSY`] or
/// [`EVICTED`].
fn stamp(epoch: tokio::time::Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
        .min(EVICTED - 1)
}

/// Claims the connection idle longest, if any is idle, and wakes it so it
/// closes. A connection that starts a query while we look is passed over.
fn evict_idlest(conns: &HashMap<tokio::task::Id, (IpAddr, Arc<Conn>)>) -> bool {
    // Each lost race means that connection just went busy; a few tries
    // are plenty, and the loop can't spin on a client flipping fast.
    for _ in 0..4 {
        let idlest = conns
            .values()
            .map(|(_, c)| (c.idle_since.load(Ordering::Relaxed), c))
            .filter(|(t, _)| *t != BUSY && *t != EVICTED)
            .min_by_key(|(t, _)| *t);
        let Some((t, c)) = idlest else {
            return false;
        };
        if c.idle_since
            .compare_exchange(t, EVICTED, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            c.evict.notify_one();
            return true;
        }
    }
    false
}

/// Accepts connections up to [`Limits::tcp_connections`] (and
/// [`Limits::tcp_connections_per_source`] for one source). When the
/// listener is full, the connection idle longest is closed to make room;
/// only when none is idle is the newcomer reset.
pub(super) async fn serve_tcp(listener: TcpListener, prefix: OrgPrefix, ctx: Arc<Ctx>) {
    let slots = Arc::new(Semaphore::new(ctx.limits.tcp_connections));
    // One source (a peer) may hold only its share of the listener, so it
    // can't lock the rest of its org out of TCP DNS.
    let per_source = ctx.limits.tcp_connections_per_source.max(1);
    let mut by_source: HashMap<IpAddr, usize> = HashMap::new();
    let epoch = tokio::time::Instant::now();
    // Keyed by task, so that one which panicked is forgotten too.
    let mut live: HashMap<tokio::task::Id, (IpAddr, Arc<Conn>)> = HashMap::new();
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, from)) => {
                    let held = by_source.get(&from.ip()).copied().unwrap_or(0);
                    let slot = if held >= per_source {
                        None
                    } else if let Ok(slot) = slots.clone().try_acquire_owned() {
                        Some(slot)
                    } else if evict_idlest(&live) {
                        inc(&ctx.metrics.tcp_evicted);
                        // Only this loop acquires, so the slot the evicted
                        // task lets go of is ours.
                        tokio::time::timeout(EVICT_WAIT, slots.clone().acquire_owned())
                            .await
                            .ok()
                            .and_then(Result::ok)
                    } else {
                        None
                    };
                    match slot {
                        Some(slot) => {
                            *by_source.entry(from.ip()).or_insert(0) += 1;
                            let (ctx, conn) = (ctx.clone(), Arc::new(Conn::new(stamp(epoch))));
                            let ours = conn.clone();
                            let task = tasks.spawn(async move {
                                serve_conn(stream, from, prefix, ctx, slot, &ours, epoch).await;
                            });
                            live.insert(task.id(), (from.ip(), conn));
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
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let id = done.map_or_else(|e| e.id(), |(id, ())| id);
                if let Some((ip, _)) = live.remove(&id) {
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

/// Forwards one TCP connection may have in flight; the next forwarded
/// query on it waits (and reading pauses) until one is done.
pub const TCP_FORWARDS_PER_CONNECTION: usize = 16;

/// How long a connection that reached its query cap keeps reading (and
/// dropping) what the client still sends after our FIN, so that closing
/// it is not a reset over queries unread.
const TCP_LINGER: Duration = Duration::from_secs(2);

/// One TCP connection. Queries are read in order; a `.internal` answer
/// goes out at once and a forwarded one when its upstream answers, so a
/// slow forward holds up nothing behind it (RFC 7766 §6.2.1.1, §7: answers
/// may come out of order, each with its query's ID). After
/// [`Limits::tcp_queries`] it reads only what has already arrived, answers
/// all of it, sends FIN and drains the rest before closing.
pub(super) async fn serve_conn(
    stream: TcpStream,
    from: SocketAddr,
    prefix: OrgPrefix,
    ctx: Arc<Ctx>,
    _slot: OwnedSemaphorePermit,
    conn: &Conn,
    epoch: tokio::time::Instant,
) {
    let _ = stream.set_nodelay(true);
    let idle = ctx.limits.tcp_idle;
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(4096, rd);
    let (tx, rx) = tokio::sync::mpsc::channel(TCP_FORWARDS_PER_CONNECTION + 1);
    let reader = read_queries(&mut rd, from, prefix, &ctx, conn, epoch, tx);
    let (evicted, wr) = tokio::join!(reader, write_answers(wr, rx, idle));
    if evicted {
        return;
    }
    if let Some(mut wr) = wr {
        let _ = wr.shutdown().await;
        let mut sink = [0u8; 1024];
        let _ = tokio::time::timeout(TCP_LINGER, async {
            while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}

/// Reads and answers queries until the cap, EOF, an idle timeout or
/// eviction (`true`); answers go to `tx`.
async fn read_queries(
    rd: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    from: SocketAddr,
    prefix: OrgPrefix,
    ctx: &Arc<Ctx>,
    conn: &Conn,
    epoch: tokio::time::Instant,
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
) -> bool {
    let idle = ctx.limits.tcp_idle;
    let forwards = Arc::new(Semaphore::new(TCP_FORWARDS_PER_CONNECTION));
    let latency = ctx.metrics.latency(prefix);
    let mut query = Vec::new();
    let mut out = Vec::with_capacity(512);
    let src = ctx.source(from);
    for i in 0.. {
        // Idle until the first byte of the next message is here (pipelined
        // ones already are); the accept loop may close us meanwhile. Past
        // the cap, only what has arrived already is taken.
        if i > 0 {
            conn.idle_since.store(stamp(epoch), Ordering::Relaxed);
        }
        let wait = if i < ctx.limits.tcp_queries {
            idle
        } else {
            Duration::ZERO
        };
        tokio::select! {
            biased;
            () = conn.evict.notified() => return true,
            r = tokio::time::timeout(wait, rd.fill_buf()) => match r {
                Ok(Ok(b)) if !b.is_empty() => {}
                _ => return false,
            },
        }
        if conn.idle_since.swap(BUSY, Ordering::Relaxed) == EVICTED {
            return true;
        }
        let read = async {
            let mut len = [0u8; 2];
            rd.read_exact(&mut len).await?;
            query.resize(usize::from(u16::from_be_bytes(len)), 0);
            rd.read_exact(&mut query).await
        };
        match tokio::time::timeout(idle, read).await {
            Ok(Ok(_)) => {}
            _ => return false,
        }
        inc(&ctx.metrics.tcp_queries);
        let t0 = std::time::Instant::now();
        let outcome = {
            let zones = ctx.zones.load();
            answer(&zones, prefix, src, &query, Transport::Tcp, &mut out)
        };
        match outcome {
            Outcome::Answered(rcode) => {
                ctx.metrics.response(rcode.code());
                if tx.send(out.clone()).await.is_err() {
                    return false;
                }
                let kind = match rcode {
                    Rcode::Refused => Answer::Refused,
                    _ => Answer::Answered,
                };
                latency.observe(kind, t0.elapsed(), 1);
            }
            Outcome::Drop => inc(&ctx.metrics.dropped),
            Outcome::Forward => {
                let Ok(slot) = forwards.clone().acquire_owned().await else {
                    return false;
                };
                let permit = ctx.forwarder.permit(prefix);
                let (ctx, tx, query) = (ctx.clone(), tx.clone(), query.clone());
                let latency = latency.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let reply = match permit {
                        Some(_permit) => ctx.forwarder.tcp(&query).await,
                        None => None,
                    };
                    let out = reply.unwrap_or_else(|| {
                        let mut o = Vec::new();
                        servfail(&query, &mut o);
                        o
                    });
                    ctx.metrics.response(rcode_of(&out));
                    let _ = tx.send(out).await;
                    latency.observe(Answer::Forwarded, t0.elapsed(), 1);
                });
            }
        }
    }
    false
}

/// Writes each answer as it comes, framed; ends when every sender is gone
/// (the reader and its forwards), giving the write half back, or when the
/// client stops taking them.
async fn write_answers(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    idle: Duration,
) -> Option<tokio::net::tcp::OwnedWriteHalf> {
    let mut frame = Vec::with_capacity(514);
    while let Some(response) = rx.recv().await {
        let Ok(n) = u16::try_from(response.len()) else {
            continue;
        };
        frame.clear();
        frame.extend_from_slice(&n.to_be_bytes());
        frame.extend_from_slice(&response);
        match tokio::time::timeout(idle, wr.write_all(&frame)).await {
            Ok(Ok(())) => {}
            _ => return None,
        }
    }
    Some(wr)
}
