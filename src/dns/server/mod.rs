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
//! listener and [`Limits::tcp_connections_per_source`] for one source
//! address in it (more are closed at accept; a full listener first closes
//! the connection idle longest, one waiting for its next query, never one
//! mid-query), [`Limits::tcp_idle`] for every read
//! and write (a silent or slow client is dropped), and
//! [`Limits::tcp_queries`] per connection, after which it answers what it
//! already received, sends FIN and drains (never a reset over unread
//! queries). Answers on a connection go out as each is ready: a forward
//! in flight (at most [`listen::TCP_FORWARDS_PER_CONNECTION`]) holds up no
//! `.internal` answer behind it.
//!
//! # Forwarding
//!
//! A name outside `.internal` ([`Outcome::Forward`]) goes to the upstream
//! resolvers (`[dns] upstream`, or the `nameserver`s of `/etc/resolv.conf`
//! when that list is empty), tried in order, each for
//! [`Limits::forward_timeout`]; when all fail the client gets SERVFAIL.
//! Over UDP each query leaves from a socket of its own — a random ephemeral
//! port, connected to the upstream — with a fresh random ID (RFC 5452 §9.2:
//! a spoofer must guess both); a reply is accepted only from the upstream
//! and port it was sent to, with that ID and the same question
//! (case-insensitively), and is relayed with the client's ID. Anything else
//! arriving there — malformed, late, spoofed — is dropped. An upstream's
//! SERVFAIL or REFUSED, or its silence, moves on to the next upstream.
//! EDNS is per hop (RFC 6891 §6.1.1), through hickory-proto: the upstream
//! gets sixpn's OPT (payload [`crate::dns::MAX_UDP_PAYLOAD`], the client's
//! DO bit, no options), the client gets sixpn's OPT back if it sent one and
//! never the upstream's; over UDP an answer bigger than the client takes
//! (512 bytes without EDNS) is sent truncated to its question with TC set,
//! so the client asks again over TCP, where it arrives whole. A query that came over TCP is forwarded over
//! TCP (a fresh connection per query), so large answers arrive whole. At
//! most [`Limits::max_forwards`] forwards are in flight across all
//! listeners, and [`Limits::max_forwards_per_org`] for any one org (so an
//! org flooding names whose servers never answer leaves the others their
//! lookups); beyond that clients get SERVFAIL at once.
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
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use super::batch::{self, RecvBatch, SendBatch};
use super::handler::{answer, Outcome, Rcode, Transport};
use super::zone::{RegionDistances, ZoneIndex};
use super::SharedZones;
use crate::model::{GatewayName, OrgPrefix, RegionName};
use crate::plan::Desired;
use crate::store::Snapshot;

mod forward;
mod listen;
mod metrics;
mod service;
mod wire;

use forward::*;
use listen::*;
use metrics::*;
pub use metrics::{DnsMetrics, MetricsSnapshot};
use service::*;
pub use service::{
    parse_resolv_conf, upstreams_or_resolv_conf, DnsService, DnsSettings, Limits, DNS_PORT,
    FORWARD_TIMEOUT, MAX_FORWARDS, TCP_CONNECTIONS_PER_LISTENER, TCP_IDLE_TIMEOUT,
    TCP_QUERIES_PER_CONNECTION,
};
use wire::*;

#[cfg(test)]
mod tests;
