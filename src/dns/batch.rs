//! Batched UDP I/O for the listeners: `recvmmsg` to take every queued query
//! in one call, `sendmmsg` to send the answers in one call.
//!
//! Measured with dnsperf (100 queries outstanding) against a listener doing
//! one `recv_from` and one `send_to` per query: most of the CPU per query
//! was kernel time in the two calls, largely waking the client once per
//! response. Batching divides the per-call part by the batch size when
//! queries queue up and costs nothing extra when they don't (a batch of 1).
//!
//! The buffers are allocated once per listener; nothing here allocates per
//! query. All the `unsafe` is the two system calls, whose arrays are built
//! on the stack from these buffers for the duration of the call.

use std::io;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::RawFd;

/// Datagrams taken or sent per system call.
pub(crate) const BATCH: usize = 32;

/// The largest UDP query read whole. A DNS query is a few hundred bytes at
/// most; a datagram longer than this is dropped.
pub(crate) const MAX_QUERY: usize = 4096;

/// An IPv6 socket address as the kernel writes it (`sockaddr_in6`).
type RawAddr = libc::sockaddr_in6;

fn zero_addr() -> RawAddr {
    // SAFETY: sockaddr_in6 is plain integers; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// The `SocketAddr` of a kernel-written `sockaddr_in6`.
pub(crate) fn to_socket_addr(a: &RawAddr) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::from(a.sin6_addr.s6_addr),
        u16::from_be(a.sin6_port),
        u32::from_be(a.sin6_flowinfo),
        a.sin6_scope_id,
    ))
}

/// Queries received by one `recvmmsg`.
pub(crate) struct RecvBatch {
    bufs: Box<[u8]>,
    lens: [usize; BATCH],
    truncated: [bool; BATCH],
    addrs: [RawAddr; BATCH],
    n: usize,
}

impl RecvBatch {
    pub(crate) fn new() -> Self {
        Self {
            bufs: vec![0u8; BATCH * MAX_QUERY].into_boxed_slice(),
            lens: [0; BATCH],
            truncated: [false; BATCH],
            addrs: [zero_addr(); BATCH],
            n: 0,
        }
    }

    /// Reads up to [`BATCH`] datagrams from the non-blocking IPv6 UDP
    /// socket `fd` without waiting; `WouldBlock` if none is queued.
    pub(crate) fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.n = 0;
        let mut iov: [libc::iovec; BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        // SAFETY: mmsghdr is plain integers and pointers; all-zero is valid
        // (null name and control, no iovecs) and every pointer used is set
        // below.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (buf, (v, (m, a))) in self.bufs.chunks_exact_mut(MAX_QUERY).zip(
            iov.iter_mut()
                .zip(msgs.iter_mut().zip(self.addrs.iter_mut())),
        ) {
            v.iov_base = buf.as_mut_ptr().cast();
            v.iov_len = MAX_QUERY;
            m.msg_hdr.msg_name = (a as *mut RawAddr).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<RawAddr>() as libc::socklen_t;
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `msgs` holds BATCH valid headers whose name and iovec
        // pointers point into `self.addrs`, `iov` and `self.bufs`, all alive
        // and exclusively borrowed for the call; the kernel writes at most
        // msg_namelen and iov_len bytes through them.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (r as usize).min(BATCH);
        for (i, m) in msgs.iter().take(n).enumerate() {
            self.lens[i] = (m.msg_len as usize).min(MAX_QUERY);
            self.truncated[i] = m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0
                || m.msg_hdr.msg_namelen as usize != std::mem::size_of::<RawAddr>();
        }
        self.n = n;
        Ok(n)
    }

    /// Datagram `i` of the last [`Self::recv`]: its bytes and sender, or
    /// `None` if it was cut short (longer than [`MAX_QUERY`]) or has no
    /// IPv6 sender.
    pub(crate) fn get(&self, i: usize) -> Option<(&[u8], &RawAddr)> {
        if i >= self.n || self.truncated[i] {
            return None;
        }
        let start = i * MAX_QUERY;
        Some((self.bufs.get(start..start + self.lens[i])?, &self.addrs[i]))
    }
}

/// Responses waiting for one `sendmmsg`.
pub(crate) struct SendBatch {
    bufs: Vec<Vec<u8>>,
    addrs: [RawAddr; BATCH],
    /// Responses queued.
    n: usize,
    /// Of those, sent.
    sent: usize,
}

impl SendBatch {
    /// Buffers of `capacity` bytes each (grown if a response needs more).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            bufs: (0..BATCH).map(|_| Vec::with_capacity(capacity)).collect(),
            addrs: [zero_addr(); BATCH],
            n: 0,
            sent: 0,
        }
    }

    /// The buffer for the next response (there is always one: the batch
    /// holds as many as a [`RecvBatch`] delivers).
    pub(crate) fn next_buf(&mut self) -> &mut Vec<u8> {
        let i = self.n.min(BATCH - 1);
        &mut self.bufs[i]
    }

    /// Queues the buffer [`Self::next_buf`] returned, for `to`.
    pub(crate) fn push(&mut self, to: &RawAddr) {
        if self.n < BATCH {
            self.addrs[self.n] = *to;
            self.n += 1;
        }
    }

    /// Whether every queued response has been sent (or given up on).
    pub(crate) fn is_done(&self) -> bool {
        self.sent >= self.n
    }

    /// Forgets everything queued.
    pub(crate) fn clear(&mut self) {
        self.n = 0;
        self.sent = 0;
    }

    /// Sends what is queued and not yet sent, in one call. `WouldBlock`
    /// when the socket buffer is full. Any other error concerns the first
    /// unsent response, which is skipped (the caller logs and goes on).
    pub(crate) fn send(&mut self, fd: RawFd) -> io::Result<usize> {
        let pending = self.n.saturating_sub(self.sent);
        if pending == 0 {
            return Ok(0);
        }
        let mut iov: [libc::iovec; BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        // SAFETY: as in `RecvBatch::recv`: all-zero headers are valid.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for k in 0..pending {
            let i = self.sent + k;
            iov[k].iov_base = self.bufs[i].as_mut_ptr().cast();
            iov[k].iov_len = self.bufs[i].len();
            msgs[k].msg_hdr.msg_name = (&mut self.addrs[i] as *mut RawAddr).cast();
            msgs[k].msg_hdr.msg_namelen = std::mem::size_of::<RawAddr>() as libc::socklen_t;
            msgs[k].msg_hdr.msg_iov = &mut iov[k];
            msgs[k].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: the first `pending` headers point into `self.addrs`,
        // `iov` and `self.bufs`, alive for the call; the kernel only reads
        // through them.
        let r = unsafe {
            libc::sendmmsg(
                fd,
                msgs.as_mut_ptr(),
                pending as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                self.sent += 1;
            }
            return Err(e);
        }
        self.sent += r as usize;
        Ok(r as usize)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn a_batch_round_trips_and_long_datagrams_are_dropped() {
        let server = std::net::UdpSocket::bind("[::1]:0").unwrap();
        server.set_nonblocking(true).unwrap();
        let client = std::net::UdpSocket::bind("[::1]:0").unwrap();
        let to = server.local_addr().unwrap();
        let mut rb = RecvBatch::new();
        let e = rb.recv(server.as_raw_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);

        for i in 0..40u8 {
            client.send_to(&[i; 3], to).unwrap();
        }
        client.send_to(&[7; MAX_QUERY + 1], to).unwrap();
        let mut sb = SendBatch::new(512);
        let mut got = Vec::new();
        let mut dropped = 0;
        while got.len() + dropped < 41 {
            let n = rb.recv(server.as_raw_fd()).unwrap();
            assert!((1..=BATCH).contains(&n));
            sb.clear();
            for i in 0..n {
                match rb.get(i) {
                    Some((bytes, from)) => {
                        assert_eq!(to_socket_addr(from), client.local_addr().unwrap());
                        got.push(bytes.to_vec());
                        let out = sb.next_buf();
                        out.clear();
                        out.extend_from_slice(bytes);
                        out.push(0xEE);
                        sb.push(from);
                    }
                    None => dropped += 1,
                }
            }
            while !sb.is_done() {
                sb.send(server.as_raw_fd()).unwrap();
            }
        }
        assert_eq!(dropped, 1);
        assert_eq!(got.len(), 40);
        assert_eq!(got[39], [39; 3]);
        let mut buf = [0u8; 16];
        for i in 0..40u8 {
            let n = client.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[i, i, i, 0xEE]);
        }
    }
}
