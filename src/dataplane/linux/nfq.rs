//! Consumers for the packets sixpn's table hands to userspace for
//! just-in-time peers: WireGuard handshake initiations to the listen port.
//!
//! - [`Queue`]: an nfnetlink_queue instance (`queue num N bypass`). The
//!   kernel *holds* each packet until [`Queue::verdict`] says accept or
//!   drop. Bound in copy-packet mode (the first [`COPY_RANGE`] bytes), with
//!   `NFQA_CFG_F_FAIL_OPEN`: when the queue is full, or our socket's receive
//!   buffer is, the kernel accepts the packet instead of dropping it.
//! - [`LogGroup`]: an nfnetlink_log group (`log group N`), for kernels
//!   without nft's `queue` expression: a copy of each packet, the original
//!   goes on untouched.
//! - [`parse_udp`]: the UDP datagram in an IPv4 or IPv6 packet as both give
//!   it (the IP header first).
//!
//! What they own: one `NETLINK_NETFILTER` socket each, bound to that one
//! queue number or log group in the netns of the thread that binds. The
//! kernel ties the instance to the socket's port id: another socket asking
//! for the same number gets `EPERM`, and closing the socket destroys the
//! instance (`NETLINK_URELEASE`), so dropping a [`Queue`] or [`LogGroup`]
//! unbinds it. For a queue the kernel then *drops* whatever is still held
//! (it flushes with `NF_DROP`), so [`Queue`]'s `Drop` first accepts every
//! held packet with one batch verdict: fail open, as the rule's `bypass`
//! does once nobody is bound.
//!
//! Framing: neli 0.7 gives the socket ([`NlSocket`]: open, bind, send,
//! receive, close on drop), but it has no `nfgenmsg` header type and no
//! nfnetlink_queue constants at all (only a few nfnetlink_log ones), so the
//! messages are built and read here by hand, as `nft.rs` does for
//! nf_tables: `nlmsghdr`, the 4-byte `nfgenmsg`, then attributes. Every
//! length is checked; a malformed message is skipped and counted, never a
//! panic.
//!
//! Lost messages: the socket keeps ENOBUFS reporting on (no
//! `NETLINK_NO_ENOBUFS`) so that an overrun is seen: it is counted
//! ([`Queue::overflows`], [`LogGroup::overflows`]) and reading goes on. For
//! the queue an overrun means initiations the kernel let through without
//! asking (fail-open); for the log, copies that never arrived.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use neli::consts::socket::{Msg as RecvFlags, NlFamily};
use neli::socket::NlSocket;
use neli::utils::Groups;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::super::KernelError;

/// Bytes of each packet the kernel copies to us: a full initiation (IPv6
/// 40 + UDP 8 + 148 = 196 bytes) fits with room to spare.
pub const COPY_RANGE: u32 = 256;

// linux/netlink.h
const NLMSG_HDRLEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLA_TYPE_MASK: u16 = 0x3fff;

// linux/netfilter/nfnetlink.h: message type = subsystem << 8 | message.
const NFNL_SUBSYS_QUEUE: u16 = libc::NFNL_SUBSYS_QUEUE as u16;
const NFNL_SUBSYS_ULOG: u16 = libc::NFNL_SUBSYS_ULOG as u16;
/// `sizeof(struct nfgenmsg)`: family, version, res_id (big-endian).
const NFGENMSG_LEN: usize = 4;

// linux/netfilter/nfnetlink_queue.h
const NFQNL_MSG_PACKET: u16 = libc::NFQNL_MSG_PACKET as u16;
const NFQNL_MSG_VERDICT: u16 = libc::NFQNL_MSG_VERDICT as u16;
const NFQNL_MSG_CONFIG: u16 = libc::NFQNL_MSG_CONFIG as u16;
const NFQNL_MSG_VERDICT_BATCH: u16 = libc::NFQNL_MSG_VERDICT_BATCH as u16;
const NFQA_PACKET_HDR: u16 = libc::NFQA_PACKET_HDR as u16;
const NFQA_VERDICT_HDR: u16 = libc::NFQA_VERDICT_HDR as u16;
const NFQA_PAYLOAD: u16 = libc::NFQA_PAYLOAD as u16;
const NFQA_CFG_CMD: u16 = libc::NFQA_CFG_CMD as u16;
const NFQA_CFG_PARAMS: u16 = libc::NFQA_CFG_PARAMS as u16;
const NFQA_CFG_QUEUE_MAXLEN: u16 = libc::NFQA_CFG_QUEUE_MAXLEN as u16;
const NFQA_CFG_MASK: u16 = libc::NFQA_CFG_MASK as u16;
const NFQA_CFG_FLAGS: u16 = libc::NFQA_CFG_FLAGS as u16;
const NFQA_CFG_F_FAIL_OPEN: u32 = libc::NFQA_CFG_F_FAIL_OPEN as u32;
const NFQNL_CFG_CMD_BIND: u8 = libc::NFQNL_CFG_CMD_BIND as u8;
const NFQNL_COPY_PACKET: u8 = libc::NFQNL_COPY_PACKET as u8;

// linux/netfilter/nfnetlink_log.h
const NFULNL_MSG_PACKET: u16 = libc::NFULNL_MSG_PACKET as u16;
const NFULNL_MSG_CONFIG: u16 = libc::NFULNL_MSG_CONFIG as u16;
const NFULA_PAYLOAD: u16 = libc::NFULA_PAYLOAD as u16;
const NFULA_CFG_CMD: u16 = libc::NFULA_CFG_CMD as u16;
const NFULA_CFG_MODE: u16 = libc::NFULA_CFG_MODE as u16;
const NFULA_CFG_TIMEOUT: u16 = libc::NFULA_CFG_TIMEOUT as u16;
const NFULA_CFG_QTHRESH: u16 = libc::NFULA_CFG_QTHRESH as u16;
const NFULNL_CFG_CMD_BIND: u8 = libc::NFULNL_CFG_CMD_BIND as u8;
const NFULNL_COPY_PACKET: u8 = libc::NFULNL_COPY_PACKET as u8;

// linux/netfilter.h
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;

/// Receive buffer asked for (`SO_RCVBUFFORCE`, else `SO_RCVBUF`, which
/// `net.core.rmem_max` caps): some 8000 queued initiations.
const RCVBUF: libc::c_int = 4 << 20;
/// One `recv` reads one kernel skb: a queued packet, or a log batch of at
/// most the group's buffer size (4 KiB by default).
const RECV_BUF: usize = 64 << 10;
/// At most this many packets per [`Queue::recv`]/[`LogGroup::recv`]; the
/// rest wait for the next call.
const MAX_BATCH: usize = 1024;

/// A packet the kernel holds for our verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The kernel's id for it, to answer with [`Queue::verdict`].
    pub id: u32,
    /// The IP packet (from the IP header) as `NFQA_PAYLOAD` gives it: at
    /// most [`COPY_RANGE`] bytes; empty if the kernel sent none.
    pub packet: Vec<u8>,
}

/// A UDP datagram read out of an IP packet by [`parse_udp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Udp<'a> {
    /// Source address and port.
    pub src: SocketAddr,
    /// Destination address and port.
    pub dst: SocketAddr,
    /// The UDP payload, as long as the UDP header says.
    pub payload: &'a [u8],
}

/// The UDP datagram in an IPv4 or IPv6 packet; `None` for anything else,
/// or if a length doesn't fit: a fragment, an IPv6 packet with extension
/// headers before UDP, or a copy cut short by the copy range. Bytes after
/// the IP total length are ignored. Never panics.
pub fn parse_udp(packet: &[u8]) -> Option<Udp<'_>> {
    match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let total = usize::from(be16(packet, 2)?);
            if ihl < 20 || total < ihl || total > packet.len() {
                return None;
            }
            // More fragments, or a fragment offset: not a whole datagram.
            if be16(packet, 6)? & 0x3fff != 0 || packet[9] != libc::IPPROTO_UDP as u8 {
                return None;
            }
            let src = Ipv4Addr::from(<[u8; 4]>::try_from(packet.get(12..16)?).ok()?);
            let dst = Ipv4Addr::from(<[u8; 4]>::try_from(packet.get(16..20)?).ok()?);
            udp(&packet[ihl..total], src.into(), dst.into())
        }
        6 => {
            if packet.len() < 40 || packet[6] != libc::IPPROTO_UDP as u8 {
                return None;
            }
            let len = usize::from(be16(packet, 4)?);
            let body = packet.get(40..40 + len)?;
            let src = Ipv6Addr::from(<[u8; 16]>::try_from(packet.get(8..24)?).ok()?);
            let dst = Ipv6Addr::from(<[u8; 16]>::try_from(packet.get(24..40)?).ok()?);
            udp(body, src.into(), dst.into())
        }
        _ => None,
    }
}

/// The datagram in `body` (the UDP header first).
fn udp(body: &[u8], src: std::net::IpAddr, dst: std::net::IpAddr) -> Option<Udp<'_>> {
    let len = usize::from(be16(body, 4)?);
    if len < 8 || len > body.len() {
        return None;
    }
    Some(Udp {
        src: SocketAddr::new(src, be16(body, 0)?),
        dst: SocketAddr::new(dst, be16(body, 2)?),
        payload: &body[8..len],
    })
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn ne16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn ne32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The attributes after the `nfgenmsg` of an nfnetlink payload, as
/// (type, value); stops at the first one that doesn't fit.
fn attrs(payload: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = NFGENMSG_LEN;
    std::iter::from_fn(move || {
        let len = usize::from(ne16(payload, off)?);
        let kind = ne16(payload, off + 2)? & NLA_TYPE_MASK;
        let value = payload.get(off + 4..off.checked_add(len)?)?;
        if len < 4 {
            return None;
        }
        off += (len + 3) & !3;
        Some((kind, value))
    })
}

/// What one netlink message in a datagram was.
enum Message<'a> {
    /// An nfnetlink message: type and payload (from the `nfgenmsg`).
    Nf(u16, &'a [u8]),
    /// An error or ack: the request's sequence number and the errno (0:
    /// an ack).
    Error(u32, i32),
    /// The kernel said messages were lost.
    Overrun,
}

/// Calls `f` for each message in `buf`; returns false if the datagram was
/// malformed (the rest of it is skipped).
fn messages<'a>(buf: &'a [u8], mut f: impl FnMut(Message<'a>)) -> bool {
    let mut off = 0;
    while off < buf.len() {
        let (Some(len), Some(kind), Some(seq)) =
            (ne32(buf, off), ne16(buf, off + 4), ne32(buf, off + 8))
        else {
            return false;
        };
        let len = len as usize;
        let Some(body) = off
            .checked_add(len)
            .filter(|_| len >= NLMSG_HDRLEN)
            .and_then(|end| buf.get(off + NLMSG_HDRLEN..end))
        else {
            return false;
        };
        match kind {
            NLMSG_NOOP | NLMSG_DONE => {}
            NLMSG_OVERRUN => f(Message::Overrun),
            NLMSG_ERROR => match ne32(body, 0) {
                Some(code) => f(Message::Error(seq, (code as i32).wrapping_neg())),
                None => return false,
            },
            _ => f(Message::Nf(kind, body)),
        }
        off += (len + 3) & !3;
    }
    true
}

/// A request: `nlmsghdr`, `nfgenmsg`, attributes.
struct Request {
    buf: Vec<u8>,
}

impl Request {
    fn new(kind: u16, flags: u16, seq: u32, res_id: u16) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        buf.push(libc::AF_UNSPEC as u8); // nfgen_family
        buf.push(0); // NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Self { buf }
    }

    /// Adds an attribute; every one sent here is a few bytes.
    fn attr(mut self, kind: u16, data: &[u8]) -> Self {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// The socket both consumers read, with what they count.
struct Socket {
    fd: AsyncFd<NlSocket>,
    seq: AtomicU32,
    overflows: AtomicU64,
    malformed: AtomicU64,
    errors: AtomicU64,
}

fn set_int(fd: libc::c_int, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> bool {
    // SAFETY: a valid fd and a pointer to a c_int of the given size.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

impl Socket {
    /// A nonblocking `NETLINK_NETFILTER` socket in the calling thread's
    /// netns, registered with the current tokio runtime.
    fn open(op: &str) -> Result<Self, KernelError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(KernelError::new(op, "needs a tokio runtime"));
        }
        let sock = NlSocket::connect(NlFamily::Netfilter, None, Groups::empty())
            .map_err(|e| KernelError::io(op, &e))?;
        let raw = sock.as_raw_fd();
        if !set_int(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RCVBUF)
            && !set_int(raw, libc::SOL_SOCKET, libc::SO_RCVBUF, RCVBUF)
        {
            let e = std::io::Error::last_os_error();
            return Err(KernelError::io(op, &e));
        }
        sock.nonblock().map_err(|e| KernelError::io(op, &e))?;
        // SAFETY: NlSocket owns its fd, closes it only when dropped (with
        // the AsyncFd that holds it) and always reports the same one.
        let fd = unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) }
            .map_err(|e| KernelError::io(op, &std::io::Error::from(e)))?;
        Ok(Self {
            fd,
            seq: AtomicU32::new(0),
            overflows: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })
    }

    fn next_seq(&self) -> u32 {
        self.seq.fetch_add(1, Ordering::Relaxed).wrapping_add(1)
    }

    fn send(&self, msg: &[u8]) -> std::io::Result<()> {
        self.fd.get_ref().send(msg, RecvFlags::empty()).map(|_| ())
    }

    /// Reads one datagram if there is one: `Ok(None)` when nothing is
    /// readable. ENOBUFS is counted and reading goes on.
    fn read_one<'b>(&self, buf: &'b mut [u8]) -> std::io::Result<Option<&'b [u8]>> {
        loop {
            match self.fd.get_ref().recv(&mut *buf, RecvFlags::TRUNC) {
                Ok((n, _)) if n > buf.len() => {
                    // Cut short: can't be read safely; count it.
                    self.malformed.fetch_add(1, Ordering::Relaxed);
                }
                Ok((n, _)) => return Ok(Some(&buf[..n])),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    self.overflows.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Feeds one datagram's messages to `decode`, collecting into `out`;
    /// returns the errno of the ack for `seq`, if one was in it.
    fn dispatch<T>(
        &self,
        datagram: &[u8],
        decode: fn(u16, &[u8]) -> Option<T>,
        out: &mut Vec<T>,
        seq: Option<u32>,
    ) -> Option<i32> {
        let mut ack = None;
        let ok = messages(datagram, |m| match m {
            Message::Nf(kind, body) => match decode(kind, body) {
                Some(t) => out.push(t),
                None => {
                    self.malformed.fetch_add(1, Ordering::Relaxed);
                }
            },
            Message::Error(s, errno) if Some(s) == seq => ack = Some(errno),
            // An error for a request nobody waits for (a verdict).
            Message::Error(_, 0) => {}
            Message::Error(_, _) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
            Message::Overrun => {
                self.overflows.fetch_add(1, Ordering::Relaxed);
            }
        });
        if !ok {
            self.malformed.fetch_add(1, Ordering::Relaxed);
        }
        ack
    }

    /// Sends a config request and waits for its ack; packets read on the
    /// way go to `stash`. nfnetlink handles a request inside `send`, so the
    /// ack is queued by the time it returns.
    fn configure<T>(
        &self,
        msg: impl FnOnce(u32) -> Vec<u8>,
        decode: fn(u16, &[u8]) -> Option<T>,
        stash: &mut Vec<T>,
    ) -> std::io::Result<()> {
        let seq = self.next_seq();
        self.send(&msg(seq))?;
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            let Some(d) = self.read_one(&mut buf)? else {
                return Err(std::io::Error::other("the kernel did not answer"));
            };
            match self.dispatch(d, decode, stash, Some(seq)) {
                Some(0) => return Ok(()),
                Some(errno) => return Err(std::io::Error::from_raw_os_error(errno)),
                None => {}
            }
        }
    }

    /// Waits until something is readable, then reads everything that is
    /// (up to [`MAX_BATCH`]). Cancel-safe: nothing is read before the only
    /// await returns.
    async fn recv<T>(
        &self,
        op: &str,
        decode: fn(u16, &[u8]) -> Option<T>,
    ) -> Result<Vec<T>, KernelError> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            let mut guard = self
                .fd
                .readable()
                .await
                .map_err(|e| KernelError::io(op, &e))?;
            loop {
                match self.read_one(&mut buf) {
                    Ok(Some(d)) => {
                        self.dispatch(d, decode, &mut out, None);
                        if out.len() >= MAX_BATCH {
                            return Ok(out);
                        }
                    }
                    Ok(None) => {
                        guard.clear_ready();
                        break;
                    }
                    Err(e) => return Err(KernelError::io(op, &e)),
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}

/// A packet message of the queue: its id and payload. A message without a
/// readable id can't be answered and is skipped (counted); without payload
/// it is still returned, so that it gets its verdict.
fn decode_queued(kind: u16, body: &[u8]) -> Option<Held> {
    if kind != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
        return None;
    }
    let mut id = None;
    let mut packet = Vec::new();
    for (t, v) in attrs(body) {
        match t {
            NFQA_PACKET_HDR => id = be32(v, 0),
            NFQA_PAYLOAD => packet = v.to_vec(),
            _ => {}
        }
    }
    Some(Held { id: id?, packet })
}

/// A packet message of the log group: its payload.
fn decode_logged(kind: u16, body: &[u8]) -> Option<Vec<u8>> {
    if kind != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET {
        return None;
    }
    attrs(body)
        .find(|(t, _)| *t == NFULA_PAYLOAD)
        .map(|(_, v)| v.to_vec())
}

/// What a failed bind says, naming the number and the likely cause.
fn bind_error(op: String, what: &str, e: &std::io::Error) -> KernelError {
    let mut err = KernelError::io(op, e);
    if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EBUSY)) {
        err.message = format!(
            "{}: {what} is already bound by another socket (another sixpn, or a tool \
             such as nfqueue/ulogd), or we lack CAP_NET_ADMIN",
            err.message
        );
    }
    err
}

/// An nfnetlink_queue instance bound to one queue number: read the packets
/// the kernel holds ([`Queue::recv`]) and answer each ([`Queue::verdict`]).
/// A packet never answered stays held until the queue is dropped.
pub struct Queue {
    sock: Socket,
    num: u16,
    /// Packets read during bind, handed out by the first recv.
    pending: Mutex<Vec<Held>>,
    /// The newest id handed out, for the fail-open flush on drop.
    newest: AtomicU32,
}

impl Queue {
    /// Binds queue `num` in the calling thread's netns (within a tokio
    /// runtime): copy-packet mode with [`COPY_RANGE`], at most `max_len`
    /// packets held (`NFQA_CFG_QUEUE_MAXLEN`; the kernel's default is
    /// 1024) and `NFQA_CFG_F_FAIL_OPEN` (beyond that, or when our receive
    /// buffer is full, the kernel accepts instead of dropping). All in one
    /// request, so the queue never exists without its copy mode (the kernel
    /// would drop packets queued then, `bypass` or not). A number another
    /// socket holds fails with `EPERM`, named in the message.
    pub fn bind(num: u16, max_len: u32) -> Result<Queue, KernelError> {
        let op = format!("bind nfqueue {num}");
        let sock = Socket::open(&op)?;
        let mut params = COPY_RANGE.to_be_bytes().to_vec();
        params.push(NFQNL_COPY_PACKET);
        let mut pending = Vec::new();
        sock.configure(
            |seq| {
                Request::new(
                    (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG,
                    NLM_F_ACK,
                    seq,
                    num,
                )
                // struct nfqnl_msg_config_cmd: command, pad, pf (unused).
                .attr(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0])
                // struct nfqnl_msg_config_params (packed): range, mode.
                .attr(NFQA_CFG_PARAMS, &params)
                .attr(NFQA_CFG_QUEUE_MAXLEN, &max_len.to_be_bytes())
                .attr(NFQA_CFG_MASK, &NFQA_CFG_F_FAIL_OPEN.to_be_bytes())
                .attr(NFQA_CFG_FLAGS, &NFQA_CFG_F_FAIL_OPEN.to_be_bytes())
                .finish()
            },
            decode_queued,
            &mut pending,
        )
        .map_err(|e| bind_error(op, &format!("queue {num}"), &e))?;
        let newest = pending.last().map_or(0, |h| h.id);
        Ok(Queue {
            sock,
            num,
            pending: Mutex::new(pending),
            newest: AtomicU32::new(newest),
        })
    }

    /// The queue number.
    pub fn num(&self) -> u16 {
        self.num
    }

    /// Waits for held packets and returns every one readable now, in the
    /// kernel's order (ids increase). Cancel-safe.
    pub async fn recv(&self) -> Result<Vec<Held>, KernelError> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let held = if pending.is_empty() {
            self.sock
                .recv(&format!("read nfqueue {}", self.num), decode_queued)
                .await?
        } else {
            pending
        };
        if let Some(last) = held.last() {
            self.newest.store(last.id, Ordering::Relaxed);
        }
        Ok(held)
    }

    fn send_verdict(&self, kind: u16, id: u32, accept: bool) -> std::io::Result<()> {
        let verdict = if accept { NF_ACCEPT } else { NF_DROP };
        // struct nfqnl_msg_verdict_hdr: verdict, id (both big-endian).
        let mut hdr = verdict.to_be_bytes().to_vec();
        hdr.extend_from_slice(&id.to_be_bytes());
        let seq = self.sock.next_seq();
        let msg = Request::new((NFNL_SUBSYS_QUEUE << 8) | kind, 0, seq, self.num)
            .attr(NFQA_VERDICT_HDR, &hdr)
            .finish();
        self.sock.send(&msg)
    }

    /// Releases packet `id`: on (`NF_ACCEPT`) or dropped (`NF_DROP`). Does
    /// not wait for the kernel: an id it doesn't know (already answered)
    /// comes back later as an error, counted in [`Queue::errors`].
    pub fn verdict(&self, id: u32, accept: bool) -> Result<(), KernelError> {
        self.send_verdict(NFQNL_MSG_VERDICT, id, accept)
            .map_err(|e| KernelError::io(format!("verdict on nfqueue {} id {id}", self.num), &e))
    }

    /// Releases every held packet up to and including `id` (ids compare
    /// with wraparound) the same way, in one message.
    pub fn verdict_up_to(&self, id: u32, accept: bool) -> Result<(), KernelError> {
        self.send_verdict(NFQNL_MSG_VERDICT_BATCH, id, accept)
            .map_err(|e| {
                KernelError::io(
                    format!("batch verdict on nfqueue {} up to {id}", self.num),
                    &e,
                )
            })
    }

    /// Times the kernel reported lost messages (ENOBUFS): packets it
    /// accepted without asking us (fail-open).
    pub fn overflows(&self) -> u64 {
        self.sock.overflows.load(Ordering::Relaxed)
    }

    /// Messages or datagrams skipped as unreadable.
    pub fn malformed(&self) -> u64 {
        self.sock.malformed.load(Ordering::Relaxed)
    }

    /// Errors the kernel returned for verdicts (e.g. `ENOENT`: no such id).
    pub fn errors(&self) -> u64 {
        self.sock.errors.load(Ordering::Relaxed)
    }
}

impl Drop for Queue {
    /// Accepts everything still held, then the socket closes and the kernel
    /// destroys the instance (it would drop held packets).
    fn drop(&mut self) {
        // Every id within 2^31 after the newest we saw: all that can be held.
        let all = self
            .newest
            .load(Ordering::Relaxed)
            .wrapping_add(i32::MAX as u32);
        let _ = self.send_verdict(NFQNL_MSG_VERDICT_BATCH, all, true);
    }
}

/// An nfnetlink_log group: copies of the packets a `log group N` rule sees.
pub struct LogGroup {
    sock: Socket,
    group: u16,
    /// Packets read during bind, handed out by the first recv.
    pending: Mutex<Vec<Vec<u8>>>,
}

impl LogGroup {
    /// Binds log group `group` in the calling thread's netns (within a tokio
    /// runtime): copy-packet mode with [`COPY_RANGE`], each packet sent on
    /// at once (queue threshold 1, flush timeout 10 ms). A group another
    /// socket holds fails with `EPERM`, named in the message.
    pub fn bind(group: u16) -> Result<LogGroup, KernelError> {
        let op = format!("bind nflog group {group}");
        let sock = Socket::open(&op)?;
        // struct nfulnl_msg_config_mode (packed): range, mode, pad.
        let mut mode = COPY_RANGE.to_be_bytes().to_vec();
        mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
        let mut pending = Vec::new();
        sock.configure(
            |seq| {
                Request::new(
                    (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG,
                    NLM_F_ACK,
                    seq,
                    group,
                )
                .attr(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND])
                .attr(NFULA_CFG_MODE, &mode)
                .attr(NFULA_CFG_QTHRESH, &1u32.to_be_bytes())
                // In hundredths of a second.
                .attr(NFULA_CFG_TIMEOUT, &1u32.to_be_bytes())
                .finish()
            },
            decode_logged,
            &mut pending,
        )
        .map_err(|e| bind_error(op, &format!("log group {group}"), &e))?;
        Ok(LogGroup {
            sock,
            group,
            pending: Mutex::new(pending),
        })
    }

    /// The group number.
    pub fn group(&self) -> u16 {
        self.group
    }

    /// Waits for logged packets and returns every one readable now (IP
    /// packets, at most [`COPY_RANGE`] bytes each). Cancel-safe.
    pub async fn recv(&self) -> Result<Vec<Vec<u8>>, KernelError> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if !pending.is_empty() {
            return Ok(pending);
        }
        self.sock
            .recv(&format!("read nflog group {}", self.group), decode_logged)
            .await
    }

    /// Times the kernel reported lost messages (ENOBUFS): copies lost.
    pub fn overflows(&self) -> u64 {
        self.sock.overflows.load(Ordering::Relaxed)
    }

    /// Messages or datagrams skipped as unreadable.
    pub fn malformed(&self) -> u64 {
        self.sock.malformed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::linux::testns::{in_netns, need_root};
    use std::io::Write;
    use std::net::IpAddr;
    use std::process::Command;
    use std::time::Duration;
    use tokio::net::UdpSocket;

    const PORT: u16 = 51999;
    const WAIT: Duration = Duration::from_secs(5);
    /// Long enough for a datagram on lo that is coming to have come.
    const QUIET: Duration = Duration::from_millis(300);

    /// Loads `ruleset` with `nft -f -`: the stderr on failure.
    fn nft(ruleset: &str) -> Result<(), String> {
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("run nft: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(ruleset.as_bytes())
                .map_err(|e| format!("write to nft: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("wait for nft: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn table(action: &str) -> String {
        format!(
            "table inet sxnfqtest {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    udp dport {PORT} {action}\n  }}\n}}\n"
        )
    }

    /// A handshake-initiation-shaped payload (148 bytes, first byte 1).
    fn initiation(tag: u8) -> Vec<u8> {
        let mut p = vec![tag; 148];
        p[0] = 1;
        p
    }

    struct Ends {
        listen: UdpSocket,
        send: UdpSocket,
    }

    async fn ends(ip: IpAddr) -> Ends {
        Ends {
            listen: UdpSocket::bind((ip, PORT)).await.unwrap(),
            send: UdpSocket::bind((ip, 0)).await.unwrap(),
        }
    }

    impl Ends {
        async fn send(&self, payload: &[u8]) {
            let to = self.listen.local_addr().unwrap();
            self.send.send_to(payload, to).await.unwrap();
        }

        /// The next datagram the listener gets within `within`.
        async fn delivered(&self, within: Duration) -> Option<Vec<u8>> {
            let mut buf = [0u8; 2048];
            let r = tokio::time::timeout(within, self.listen.recv_from(&mut buf)).await;
            r.ok().map(|r| buf[..r.unwrap().0].to_vec())
        }

        fn check(&self, packet: &[u8], payload: &[u8]) {
            let udp = parse_udp(packet).expect("a UDP packet");
            assert_eq!(udp.src, self.send.local_addr().unwrap());
            assert_eq!(udp.dst, self.listen.local_addr().unwrap());
            assert_eq!(udp.payload, payload);
        }
    }

    #[test]
    fn log_group_copies_initiations_and_delivery_goes_on() {
        if !need_root("log_group_copies_initiations_and_delivery_goes_on") {
            return;
        }
        in_netns(|| async {
            nft(&table("log group 7")).unwrap();
            let log = LogGroup::bind(7).unwrap();
            assert_eq!(log.group(), 7);
            for (ip, tag) in [
                (IpAddr::from(Ipv4Addr::LOCALHOST), 4u8),
                (Ipv6Addr::LOCALHOST.into(), 6),
            ] {
                let ends = ends(ip).await;
                let payload = initiation(tag);
                ends.send(&payload).await;
                // The copy doesn't stop delivery.
                assert_eq!(ends.delivered(WAIT).await.as_deref(), Some(&payload[..]));
                let got = tokio::time::timeout(WAIT, log.recv())
                    .await
                    .expect("a logged packet in time")
                    .unwrap();
                assert_eq!(got.len(), 1, "{ip}: {got:?}");
                ends.check(&got[0], &payload);
            }
            assert_eq!(log.overflows(), 0);
            assert_eq!(log.malformed(), 0);
        });
    }

    #[test]
    fn log_group_is_exclusive_and_dropping_unbinds() {
        if !need_root("log_group_is_exclusive_and_dropping_unbinds") {
            return;
        }
        in_netns(|| async {
            let first = LogGroup::bind(7).unwrap();
            let e = LogGroup::bind(7).err().expect("group 7 is taken");
            assert_eq!(e.errno, Some(libc::EPERM), "{e:?}");
            assert!(
                e.op.contains("group 7") && e.message.contains("group 7"),
                "{e:?}"
            );
            drop(first);
            LogGroup::bind(7).expect("free again once the holder is dropped");
        });
    }

    #[test]
    fn queue_is_exclusive_and_dropping_unbinds() {
        if !need_root("queue_is_exclusive_and_dropping_unbinds") {
            return;
        }
        in_netns(|| async {
            let first = Queue::bind(7, 16).unwrap();
            assert_eq!(first.num(), 7);
            let e = Queue::bind(7, 16).err().expect("queue 7 is taken");
            assert_eq!(e.errno, Some(libc::EPERM), "{e:?}");
            assert!(
                e.op.contains("queue 7") && e.message.contains("queue 7"),
                "{e:?}"
            );
            // Another number is free.
            let other = Queue::bind(8, 16).unwrap();
            drop(first);
            Queue::bind(7, 16).expect("free again once the holder is dropped");
            drop(other);
        });
    }

    /// Whether this kernel has nft's `queue` expression: loading a rule
    /// with it fails without. Only on this case does the queue test skip,
    /// and only outside the kernel tier.
    fn queue_expression(test: &str, loaded: Result<(), String>) -> bool {
        let Err(why) = loaded else {
            return true;
        };
        let kernel_tier = std::env::var("SIXPN_TEST_BACKEND").is_ok_and(|v| v == "kernel");
        assert!(
            !kernel_tier,
            "{test}: SIXPN_TEST_BACKEND=kernel but nft can't load a queue rule: {why}"
        );
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED {test}: no nft queue expression in this kernel; runs in the VM tier ({})",
            why.trim()
        );
        false
    }

    #[test]
    fn queue_holds_initiations_until_the_verdict() {
        let test = "queue_holds_initiations_until_the_verdict";
        if !need_root(test) {
            return;
        }
        in_netns(move || async move {
            if !queue_expression(test, nft(&table("queue num 7 bypass"))) {
                return;
            }
            for (ip, tag) in [
                (IpAddr::from(Ipv4Addr::LOCALHOST), 4u8),
                (Ipv6Addr::LOCALHOST.into(), 6),
            ] {
                let ends = ends(ip).await;
                // Nobody bound: `bypass` lets it through.
                let payload = initiation(tag);
                ends.send(&payload).await;
                assert_eq!(ends.delivered(WAIT).await.as_deref(), Some(&payload[..]));

                let queue = Queue::bind(7, 16).unwrap();
                // Held until accepted.
                ends.send(&payload).await;
                let held = tokio::time::timeout(WAIT, queue.recv())
                    .await
                    .expect("a held packet in time")
                    .unwrap();
                assert_eq!(held.len(), 1, "{ip}: {held:?}");
                ends.check(&held[0].packet, &payload);
                assert_eq!(
                    ends.delivered(QUIET).await,
                    None,
                    "{ip}: delivered while held"
                );
                queue.verdict(held[0].id, true).unwrap();
                assert_eq!(ends.delivered(WAIT).await.as_deref(), Some(&payload[..]));

                // Dropped: never arrives.
                let dropped = initiation(tag + 1);
                ends.send(&dropped).await;
                let held = tokio::time::timeout(WAIT, queue.recv())
                    .await
                    .expect("a held packet in time")
                    .unwrap();
                assert_eq!(held.len(), 1, "{ip}: {held:?}");
                ends.check(&held[0].packet, &dropped);
                queue.verdict(held[0].id, false).unwrap();
                assert_eq!(
                    ends.delivered(QUIET).await,
                    None,
                    "{ip}: a dropped packet arrived"
                );

                // Two held, released by one batch verdict.
                ends.send(&payload).await;
                ends.send(&payload).await;
                let mut ids = Vec::new();
                while ids.len() < 2 {
                    let held = tokio::time::timeout(WAIT, queue.recv())
                        .await
                        .expect("held packets in time")
                        .unwrap();
                    ids.extend(held.iter().map(|h| h.id));
                }
                queue.verdict_up_to(ids[1], true).unwrap();
                for _ in 0..2 {
                    assert_eq!(ends.delivered(WAIT).await.as_deref(), Some(&payload[..]));
                }

                // One left held when the queue is dropped: accepted then.
                ends.send(&payload).await;
                let held = tokio::time::timeout(WAIT, queue.recv())
                    .await
                    .expect("a held packet in time")
                    .unwrap();
                assert_eq!(held.len(), 1);
                drop(queue);
                assert_eq!(ends.delivered(WAIT).await.as_deref(), Some(&payload[..]));
            }
        });
    }

    fn ipv4(proto: u8, payload: &[u8]) -> Vec<u8> {
        let total = (20 + 8 + payload.len()) as u16;
        let mut p = vec![0x45, 0];
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]); // DF
        p.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 7]);
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&51820u16.to_be_bytes());
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        p
    }

    fn ipv6(next: u8, payload: &[u8]) -> Vec<u8> {
        let len = (8 + payload.len()) as u16;
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&"fdaa::1".parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&"fdaa::2".parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&51820u16.to_be_bytes());
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn parse_udp_reads_ipv4() {
        let payload = initiation(9);
        let mut p = ipv4(17, &payload);
        // Ethernet padding after the total length is ignored.
        p.extend_from_slice(&[0; 6]);
        let udp = parse_udp(&p).unwrap();
        assert_eq!(udp.src, "192.0.2.1:40000".parse().unwrap());
        assert_eq!(udp.dst, "198.51.100.7:51820".parse().unwrap());
        assert_eq!(udp.payload, &payload[..]);
    }

    #[test]
    fn parse_udp_reads_ipv6() {
        let payload = initiation(9);
        let p = ipv6(17, &payload);
        let udp = parse_udp(&p).unwrap();
        assert_eq!(udp.src, "[fdaa::1]:40000".parse().unwrap());
        assert_eq!(udp.dst, "[fdaa::2]:51820".parse().unwrap());
        assert_eq!(udp.payload, &payload[..]);
    }

    #[test]
    fn parse_udp_refuses_truncated_packets() {
        for p in [ipv4(17, &initiation(1)), ipv6(17, &initiation(1))] {
            for cut in 0..p.len() {
                assert_eq!(parse_udp(&p[..cut]), None, "cut at {cut}");
            }
        }
        // A UDP length beyond the IP payload.
        let mut p = ipv6(17, b"abc");
        p[44..46].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(parse_udp(&p), None);
        // A UDP length below its own header.
        let mut p = ipv4(17, b"abc");
        p[24..26].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(parse_udp(&p), None);
    }

    #[test]
    fn parse_udp_refuses_other_protocols_and_fragments() {
        assert_eq!(parse_udp(&ipv4(6, b"tcp?")), None);
        assert_eq!(parse_udp(&ipv6(6, b"tcp?")), None);
        // A hop-by-hop header first: not followed.
        assert_eq!(parse_udp(&ipv6(0, b"hbh")), None);
        // More fragments.
        let mut p = ipv4(17, b"frag");
        p[6] = 0x20;
        assert_eq!(parse_udp(&p), None);
        // Not IP at all.
        assert_eq!(parse_udp(&[0x52; 60]), None);
        assert_eq!(parse_udp(&[]), None);
    }

    #[test]
    fn packet_messages_decode_and_malformed_ones_are_skipped() {
        let packet = ipv6(17, &initiation(2));
        let mut msg = Request::new((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET, 0, 0, 7)
            .attr(NFQA_PACKET_HDR, &[0, 0, 0, 42, 0x86, 0xdd, 1])
            .attr(NFQA_PAYLOAD, &packet)
            .finish();
        let mut got = Vec::new();
        assert!(messages(&msg, |m| {
            if let Message::Nf(k, b) = m {
                got.extend(decode_queued(k, b));
            }
        }));
        assert_eq!(got, vec![Held { id: 42, packet }]);
        // A header claiming more than is there.
        msg[0] = msg[0].wrapping_add(8);
        assert!(!messages(&msg, |_| {}));
        // A log message is not a queue message.
        let log = Request::new((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET, 0, 0, 7)
            .attr(NFULA_PAYLOAD, b"x")
            .finish();
        let body = &log[NLMSG_HDRLEN..];
        assert_eq!(decode_queued(ne16(&log, 4).unwrap(), body), None);
        assert_eq!(
            decode_logged(ne16(&log, 4).unwrap(), body),
            Some(b"x".to_vec())
        );
    }

    proptest::proptest! {
        #[test]
        fn parse_udp_never_panics(p in proptest::collection::vec(proptest::num::u8::ANY, 0..120)) {
            let _ = parse_udp(&p);
        }

        #[test]
        fn parse_udp_never_panics_on_ip_like_input(
            version in proptest::sample::select(vec![0x45u8, 0x4f, 0x60]),
            rest in proptest::collection::vec(proptest::num::u8::ANY, 0..120),
        ) {
            let mut p = vec![version];
            p.extend(rest);
            if let Some(u) = parse_udp(&p) {
                proptest::prop_assert!(u.payload.len() <= p.len());
            }
        }

        #[test]
        fn netlink_reading_never_panics(b in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = messages(&b, |m| {
                if let Message::Nf(k, body) = m {
                    let _ = decode_queued(k, body);
                    let _ = decode_logged(k, body);
                    let _ = attrs(body).count();
                }
            });
            let _ = attrs(&b).count();
        }
    }
}
