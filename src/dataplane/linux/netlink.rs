//! [`LinuxNetlink`]: links, IPv6 addresses, our routes and change events
//! through rtnetlink. Netlink types are named only through
//! `rtnetlink::packet_route` (wireguard-control pulls an older
//! netlink-packet-route whose types are not interchangeable).
//!
//! Our routes: IPv6, in the main table, out of our interface, carrying
//! [`ROUTE_PROTOCOL`]. Adds are exclusive (`NLM_F_CREATE|NLM_F_EXCL`): a
//! replace would silently take over an operator's route to the same prefix
//! and metric, whatever its device or protocol. On `EEXIST` one dump tells
//! whose route is there: ours is success (idempotent), anyone else's is an
//! error and stays untouched. Deletes name the protocol, which IPv6 route
//! deletion matches on, so a foreign route to the same prefix survives them.
//!
//! Addresses are different: `add_address` keeps `NLM_F_REPLACE`, because the
//! kernel looks the address up on the one link named (the same address on
//! another link is a separate entry), and that link is our interface, which
//! sixpn owns whole.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkUnspec, MulticastGroup, RouteMessageBuilder};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::super::{KernelError, LinkState, NetEvent, Netlink, ROUTE_PROTOCOL};
use super::{rtnl_errno, rtnl_error};

/// How many route requests are in flight at once in `add_routes` /
/// `del_routes`: enough to hide the round trip, few enough to keep the
/// socket's receive buffer from overflowing with acks.
const PIPELINE: usize = 64;
/// Capacity of a subscriber's event queue. When full, events are dropped:
/// any event already queued makes the reconciler look anyway.
const EVENT_QUEUE: usize = 256;
/// Receive buffer of the event socket (bursts: 10k routes at once).
const EVENT_RCVBUF: usize = 4 << 20;
const FORWARDING: &str = "/proc/sys/net/ipv6/conf/all/forwarding";
/// The metric the kernel gives an IPv6 route added without one
/// (`IP6_RT_PRIO_USER`): our routes', so the one an exclusive add of ours
/// collides with.
const DEFAULT_METRIC: u32 = 1024;

/// rtnetlink in the network namespace of the thread that created it.
pub struct LinuxNetlink {
    handle: Handle,
    connection: JoinHandle<()>,
}

impl LinuxNetlink {
    /// Opens the netlink socket and spawns its connection task on the
    /// current tokio runtime (so call it inside one).
    pub fn new() -> Result<Self, KernelError> {
        let op = "open rtnetlink";
        tokio::runtime::Handle::try_current()
            .map_err(|e| KernelError::new(op, format!("needs a tokio runtime: {e}")))?;
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| KernelError::io(op, &e))?;
        Ok(Self {
            handle,
            connection: tokio::spawn(conn),
        })
    }
}

impl Drop for LinuxNetlink {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

fn route_message(index: u32, addr: Ipv6Addr, len: u8) -> RouteMessage {
    RouteMessageBuilder::<Ipv6Addr>::new()
        .destination_prefix(addr, len)
        .output_interface(index)
        .protocol(RouteProtocol::from(ROUTE_PROTOCOL))
        .build()
}

/// The route's table: the header's u8, or RTA_TABLE for ids above 255.
fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

fn route_oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn route_destination(r: &RouteMessage) -> (Ipv6Addr, u8) {
    let addr = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(*ip),
            _ => None,
        })
        .unwrap_or(Ipv6Addr::UNSPECIFIED);
    (addr, r.header.destination_prefix_length)
}

fn route_metric(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(DEFAULT_METRIC)
}

/// Whether `r` is one of our routes on link `index`.
fn is_ours(r: &RouteMessage, index: u32) -> bool {
    r.header.address_family == AddressFamily::Inet6
        && r.header.protocol == RouteProtocol::from(ROUTE_PROTOCOL)
        && route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN)
        && route_oif(r) == Some(index)
}

/// The main-table IPv6 routes at our metric, by destination: the routes an
/// exclusive add of ours collides with.
fn at_our_metric(dump: &[RouteMessage]) -> HashMap<(Ipv6Addr, u8), Vec<&RouteMessage>> {
    let mut by_dst: HashMap<_, Vec<_>> = HashMap::new();
    for r in dump.iter().filter(|r| {
        r.header.address_family == AddressFamily::Inet6
            && route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN)
            && route_metric(r) == DEFAULT_METRIC
    }) {
        by_dst.entry(route_destination(r)).or_default().push(r);
    }
    by_dst
}

/// Whose route blocked an add of ours with `EEXIST`, given what holds the
/// destination (see [`at_our_metric`]): `Ok` if ours (the add is done);
/// otherwise what to tell the operator.
fn whose_route(holders: Option<&Vec<&RouteMessage>>, index: u32) -> Result<(), String> {
    let Some(holders) = holders.filter(|h| !h.is_empty()) else {
        return Err("a route to it existed but was gone when checked".into());
    };
    // More than one only for multipath siblings; any foreign one conflicts.
    let Some(r) = holders.iter().find(|r| !is_ours(r, index)) else {
        return Ok(());
    };
    let (addr, len) = route_destination(r);
    let kind = format!("{:?}", r.header.kind).to_lowercase();
    let dev = match route_oif(r) {
        Some(i) => format!("ifindex {i}"),
        None => "no single device".into(),
    };
    Err(format!(
        "a route to {addr}/{len} not owned by sixpn exists ({kind} route, proto {}, {dev}, \
         metric {DEFAULT_METRIC}); left untouched",
        r.header.protocol
    ))
}

/// Runs one request per net, `PIPELINE` at a time, results in order.
async fn pipelined<F, Fut, T>(nets: &[(Ipv6Addr, u8)], f: F) -> Vec<T>
where
    F: Fn(Ipv6Addr, u8) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    // Owned items: a closure over `&(Ipv6Addr, u8)` trips async_trait's
    // higher-ranked Send check.
    futures::stream::iter(nets.to_vec())
        .map(|(a, l)| f(a, l))
        .buffered(PIPELINE)
        .collect()
        .await
}

impl LinuxNetlink {
    /// Every IPv6 route. Without strict checking the dump returns every
    /// table; callers filter.
    async fn dump_routes(&self) -> Result<Vec<RouteMessage>, rtnetlink::Error> {
        self.handle
            .route()
            .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
            .execute()
            .try_collect()
            .await
    }
}

#[async_trait]
impl Netlink for LinuxNetlink {
    async fn link(&self, name: &str) -> Result<Option<LinkState>, KernelError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        let msg = match links.try_next().await {
            Ok(m) => m,
            Err(e) if rtnl_errno(&e) == Some(libc::ENODEV) => None,
            Err(e) => return Err(rtnl_error(format!("get link {name}"), &e)),
        };
        let Some(m) = msg else { return Ok(None) };
        let guarded = super::tc::guarded(&self.handle, m.header.index).await?;
        Ok(Some(LinkState {
            index: m.header.index,
            guarded,
            up: m.header.flags.contains(LinkFlags::Up),
            mtu: m
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::Mtu(mtu) => Some(*mtu),
                    _ => None,
                })
                .unwrap_or(0),
        }))
    }

    async fn attach_guard(&self, index: u32) -> Result<(), KernelError> {
        super::tc::attach(&self.handle, index).await
    }

    async fn guard_dropped(&self, index: u32) -> Result<Option<u64>, KernelError> {
        super::tc::dropped(&self.handle, index).await
    }

    async fn set_link_up(&self, index: u32, mtu: u32) -> Result<(), KernelError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().mtu(mtu).build())
            .execute()
            .await
            .map_err(|e| rtnl_error(format!("set link {index} up, mtu {mtu}"), &e))
    }

    async fn addresses(&self, index: u32) -> Result<Vec<(Ipv6Addr, u8)>, KernelError> {
        let op = || format!("list addresses of link {index}");
        let mut req = self.handle.address().get().set_link_index_filter(index);
        // Ask the kernel for IPv6 only; the index filter is applied here.
        req.message_mut().header.family = AddressFamily::Inet6;
        let mut msgs = req.execute();
        let mut out = Vec::new();
        while let Some(m) = msgs.try_next().await.map_err(|e| rtnl_error(op(), &e))? {
            // IPv6 addresses come as IFA_ADDRESS (IFA_LOCAL only with a peer).
            let addr = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V6(ip)) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = addr {
                out.push((ip, m.header.prefix_len));
            }
        }
        out.sort();
        Ok(out)
    }

    async fn add_address(&self, index: u32, addr: Ipv6Addr) -> Result<(), KernelError> {
        let mut req = self
            .handle
            .address()
            .add(index, IpAddr::V6(addr), 128)
            .replace();
        // IFA_F_NODAD: usable at once, no duplicate address detection.
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        req.execute()
            .await
            .map_err(|e| rtnl_error(format!("add address {addr}/128 to link {index}"), &e))
    }

    async fn del_address(&self, index: u32, addr: Ipv6Addr, len: u8) -> Result<(), KernelError> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet6;
        msg.header.prefix_len = len;
        msg.header.index = index;
        msg.attributes
            .push(AddressAttribute::Address(IpAddr::V6(addr)));
        match self.handle.address().del(msg).execute().await {
            // Not there, or the link itself is gone: absent either way.
            Err(e) if matches!(rtnl_errno(&e), Some(libc::EADDRNOTAVAIL | libc::ENODEV)) => Ok(()),
            r => r.map_err(|e| {
                rtnl_error(format!("delete address {addr}/{len} from link {index}"), &e)
            }),
        }
    }

    async fn routes(&self, index: u32) -> Result<Vec<(Ipv6Addr, u8)>, KernelError> {
        let all = self
            .dump_routes()
            .await
            .map_err(|e| rtnl_error(format!("list routes of link {index}"), &e))?;
        let mut ours: Vec<(Ipv6Addr, u8)> = all
            .iter()
            .filter(|r| is_ours(r, index))
            .map(route_destination)
            .collect();
        ours.sort();
        Ok(ours)
    }

    async fn add_routes(
        &self,
        index: u32,
        nets: &[(Ipv6Addr, u8)],
    ) -> Vec<Result<(), KernelError>> {
        // No `.replace()`: rtnetlink then sends NLM_F_CREATE|NLM_F_EXCL, and
        // the kernel answers EEXIST when the main table holds any route to
        // the prefix at our metric (fib6_add_rt2) instead of taking it over.
        let sent = pipelined(nets, |addr, len| {
            let req = self.handle.route().add(route_message(index, addr, len));
            async move { req.execute().await }
        })
        .await;
        // The common case costs nothing more; conflicts cost one dump.
        let conflicts = sent
            .iter()
            .any(|r| matches!(r, Err(e) if rtnl_errno(e) == Some(libc::EEXIST)));
        let dump = if conflicts {
            Some(self.dump_routes().await)
        } else {
            None
        };
        let holders = dump
            .as_ref()
            .map(|d| d.as_ref().map(|all| at_our_metric(all)));
        sent.into_iter()
            .zip(nets)
            .map(|(r, &(addr, len))| {
                let Err(e) = r else { return Ok(()) };
                let err = rtnl_error(format!("add route {addr}/{len} dev {index}"), &e);
                match &holders {
                    Some(Ok(by_dst)) if err.errno == Some(libc::EEXIST) => {
                        whose_route(by_dst.get(&(addr, len)), index)
                            .map_err(|message| KernelError { message, ..err })
                    }
                    Some(Err(d)) if err.errno == Some(libc::EEXIST) => Err(KernelError {
                        message: format!("{}; can't tell whose route it is: {d}", err.message),
                        ..err
                    }),
                    _ => Err(err),
                }
            })
            .collect()
    }

    async fn del_routes(
        &self,
        index: u32,
        nets: &[(Ipv6Addr, u8)],
    ) -> Vec<Result<(), KernelError>> {
        pipelined(nets, |addr, len| {
            let req = self.handle.route().del(route_message(index, addr, len));
            async move {
                match req.execute().await {
                    // Not there, or the link is gone (and its routes with it).
                    Err(e) if matches!(rtnl_errno(&e), Some(libc::ESRCH | libc::ENODEV)) => Ok(()),
                    r => r.map_err(|e| {
                        rtnl_error(format!("delete route {addr}/{len} dev {index}"), &e)
                    }),
                }
            }
        })
        .await
    }

    async fn ensure_forwarding(&self) -> Result<bool, KernelError> {
        // Per netns: /proc/sys/net follows the calling thread's namespace.
        // Two tiny procfs operations; not worth a blocking-pool hop.
        let on = std::fs::read_to_string(FORWARDING)
            .map_err(|e| KernelError::io(format!("read {FORWARDING}"), &e))?;
        if on.trim() == "1" {
            return Ok(false);
        }
        std::fs::write(FORWARDING, "1")
            .map_err(|e| KernelError::io(format!("write {FORWARDING}"), &e))?;
        Ok(true)
    }

    fn subscribe(&self) -> Result<mpsc::Receiver<NetEvent>, KernelError> {
        let op = "subscribe to rtnetlink events";
        let (mut conn, _handle, mut events) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Ipv6Ifaddr,
            MulticastGroup::Ipv6Route,
            // Qdiscs and filters: the isolation guard.
            MulticastGroup::Tc,
        ])
        .map_err(|e| KernelError::io(op, &e))?;
        {
            use rtnetlink::sys::AsyncSocket as _;
            // Best effort: a bigger buffer makes overruns rarer; they are
            // handled either way.
            let _ = conn.socket_mut().socket_mut().set_rx_buf_sz(EVENT_RCVBUF);
        }
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let connection = tokio::spawn(conn);
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    _ = tx.closed() => break,
                    item = events.next() => item,
                };
                let Some((msg, _)) = item else { break };
                let ev = match msg.payload {
                    NetlinkPayload::InnerMessage(m) => match m {
                        RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l) => {
                            NetEvent::Changed(l.header.index)
                        }
                        RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => {
                            NetEvent::Changed(a.header.index)
                        }
                        RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
                            // 0: a route without a single output interface.
                            NetEvent::Changed(route_oif(&r).unwrap_or(0))
                        }
                        RouteNetlinkMessage::NewQueueDiscipline(t)
                        | RouteNetlinkMessage::DelQueueDiscipline(t)
                        | RouteNetlinkMessage::NewTrafficFilter(t)
                        | RouteNetlinkMessage::DelTrafficFilter(t) => {
                            NetEvent::Changed(u32::try_from(t.header.index).unwrap_or(0))
                        }
                        _ => continue,
                    },
                    NetlinkPayload::Overrun(_) => NetEvent::Overrun,
                    _ => continue,
                };
                match tx.try_send(ev) {
                    // Full: an event already waits, which triggers a look.
                    Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
            // Ends on unsubscribe (receiver dropped) or a dead socket; the
            // receiver then sees the channel close.
            connection.abort();
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::dataplane::linux::testns::{in_netns, need_root, run};
    use crate::dataplane::MTU;

    /// A veth pair (no dummy driver everywhere); returns the up end's index.
    async fn veth(nl: &LinuxNetlink) -> u32 {
        run(&[
            "link", "add", "sxv0", "type", "veth", "peer", "name", "sxv1",
        ]);
        let l = nl.link("sxv0").await.unwrap().expect("veth");
        assert!(!l.up);
        // IPv6 refuses routes via a link that is down (ENETDOWN).
        nl.set_link_up(l.index, MTU).await.unwrap();
        l.index
    }

    fn a(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn links_addresses_and_forwarding() {
        if !need_root("links_addresses_and_forwarding") {
            return;
        }
        in_netns(|| async {
            let nl = LinuxNetlink::new().unwrap();
            assert_eq!(nl.link("sxnope0").await.unwrap(), None);
            let idx = veth(&nl).await;
            let l = nl.link("sxv0").await.unwrap().unwrap();
            assert_eq!((l.index, l.up, l.mtu), (idx, true, MTU));
            let e = nl.set_link_up(999_999, MTU).await.unwrap_err();
            assert_eq!(e.errno, Some(libc::ENODEV), "{e}");

            let dns = a("fdaa:0:18::3");
            nl.add_address(idx, dns).await.unwrap();
            nl.add_address(idx, dns).await.unwrap(); // idempotent
            assert!(nl.addresses(idx).await.unwrap().contains(&(dns, 128)));
            let shown = run(&["-6", "addr", "show", "dev", "sxv0"]);
            let line = shown
                .lines()
                .find(|l| l.contains("fdaa:0:18::3/128"))
                .unwrap();
            assert!(line.contains("nodad"), "{line}");
            // Another link's and IPv4 addresses are not listed.
            run(&["addr", "add", "10.9.9.9/32", "dev", "sxv0"]);
            run(&["-6", "addr", "add", "fd00::9/128", "dev", "lo"]);
            assert!(nl
                .addresses(idx)
                .await
                .unwrap()
                .iter()
                .all(|(ip, _)| *ip != a("fd00::9") && ip.segments()[0] != 0));
            nl.del_address(idx, dns, 128).await.unwrap();
            nl.del_address(idx, dns, 128).await.unwrap(); // absent is fine
            assert!(!nl.addresses(idx).await.unwrap().contains(&(dns, 128)));

            // A fresh netns starts with forwarding off.
            assert!(nl.ensure_forwarding().await.unwrap());
            assert!(!nl.ensure_forwarding().await.unwrap());
            let on = std::fs::read_to_string(FORWARDING).unwrap();
            assert_eq!(on.trim(), "1");
        });
    }

    fn tc(args: &[&str]) -> String {
        let out = std::process::Command::new("tc")
            .args(args)
            .output()
            .expect("run tc");
        assert!(
            out.status.success(),
            "tc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn the_guard_is_attached_observed_and_put_back_whole() {
        if !need_root("the_guard_is_attached_observed_and_put_back_whole") {
            return;
        }
        in_netns(|| async {
            let nl = LinuxNetlink::new().unwrap();
            // A layer-3 device, as the WireGuard interface is.
            run(&["tuntap", "add", "dev", "sxg0", "mode", "tun"]);
            let l = nl.link("sxg0").await.unwrap().unwrap();
            assert!(!l.guarded, "no qdisc yet");
            nl.attach_guard(l.index).await.unwrap();
            nl.attach_guard(l.index).await.unwrap(); // idempotent
            assert!(nl.link("sxg0").await.unwrap().unwrap().guarded);
            for hook in ["ingress", "egress"] {
                let shown = tc(&["filter", "show", "dev", "sxg0", hook]);
                let ours: Vec<&str> = shown.lines().filter(|l| l.contains("bytecode")).collect();
                assert_eq!(ours.len(), 1, "{hook}: {shown}");
                assert!(
                    ours[0].contains("pref 1 ") && ours[0].contains("direct-action"),
                    "{shown}"
                );
                assert!(
                    ours[0].contains(&crate::plan::guard::tc_bytecode()),
                    "{shown}"
                );
            }

            // One hook lost: not guarded, and attaching puts it back.
            tc(&["filter", "del", "dev", "sxg0", "egress"]);
            assert!(!nl.link("sxg0").await.unwrap().unwrap().guarded);
            nl.attach_guard(l.index).await.unwrap();
            assert!(nl.link("sxg0").await.unwrap().unwrap().guarded);
            // Another program in our place: replaced.
            tc(&[
                "filter",
                "replace",
                "dev",
                "sxg0",
                "ingress",
                "pref",
                "1",
                "handle",
                "1",
                "bpf",
                "da",
                "bytecode",
                "1,6 0 0 0,",
            ]);
            assert!(!nl.link("sxg0").await.unwrap().unwrap().guarded);
            nl.attach_guard(l.index).await.unwrap();
            assert!(nl.link("sxg0").await.unwrap().unwrap().guarded);
            // The whole qdisc gone: back too.
            tc(&["qdisc", "del", "dev", "sxg0", "clsact"]);
            assert!(!nl.link("sxg0").await.unwrap().unwrap().guarded);
            nl.attach_guard(l.index).await.unwrap();
            assert!(nl.link("sxg0").await.unwrap().unwrap().guarded);
        });
    }

    #[test]
    fn routes_lists_and_deletes_only_ours() {
        if !need_root("routes_lists_and_deletes_only_ours") {
            return;
        }
        in_netns(|| async {
            let nl = LinuxNetlink::new().unwrap();
            let idx = veth(&nl).await;
            let ours = vec![
                (a("fdaa:0:18:0:1:0:a:0"), 120),
                (a("fdaa:0:18:0:1:0:a:100"), 120),
                (a("fdaa:0:19:0:1:0:a:0"), 120),
            ];
            assert!(nl.add_routes(idx, &ours).await.iter().all(Result::is_ok));
            assert!(nl.add_routes(idx, &ours).await.iter().all(Result::is_ok));
            // Foreign: another protocol; ours but in another table; ours on
            // another link.
            run(&[
                "-6",
                "route",
                "add",
                "fd00:99::/120",
                "dev",
                "sxv0",
                "proto",
                "static",
            ]);
            run(&[
                "-6",
                "route",
                "add",
                "fd00:98::/120",
                "dev",
                "sxv0",
                "proto",
                "110",
                "table",
                "100",
            ]);
            run(&[
                "-6",
                "route",
                "add",
                "fd00:97::/120",
                "dev",
                "lo",
                "proto",
                "110",
            ]);
            assert_eq!(nl.routes(idx).await.unwrap(), ours);
            let shown = run(&["-6", "route", "show", "dev", "sxv0"]);
            assert!(
                shown.contains("fdaa:0:18:0:1:0:a:0/120 proto 110"),
                "{shown}"
            );

            let gone = [ours[0], ours[0]];
            assert!(nl.del_routes(idx, &gone).await.iter().all(Result::is_ok));
            assert_eq!(nl.routes(idx).await.unwrap(), ours[1..]);
            // Deleting a foreign route's prefix leaves it alone: the delete
            // names our protocol.
            let r = nl.del_routes(idx, &[(a("fd00:99::"), 120)]).await;
            assert!(r[0].is_ok(), "{r:?}");
            let shown = run(&["-6", "route", "show", "proto", "static"]);
            assert!(shown.contains("fd00:99::/120"), "{shown}");
            // A route via a missing link fails with its errno, in place.
            let r = nl.add_routes(999_999, &ours[..1]).await;
            assert_eq!(r[0].as_ref().unwrap_err().errno, Some(libc::ENODEV));
        });
    }

    #[test]
    fn adds_never_take_over_a_foreign_route() {
        if !need_root("adds_never_take_over_a_foreign_route") {
            return;
        }
        in_netns(|| async {
            let nl = LinuxNetlink::new().unwrap();
            let idx = veth(&nl).await;
            let net = |g: u16| (a(&format!("fdaa:0:18:0:1:0:b:{g:x}")), 120u8);
            // Someone else's, at our metric: on another device; on ours with
            // another protocol; a blackhole (no device at all).
            let foreign = [
                (net(0x000), vec!["dev", "lo"]),
                (net(0x100), vec!["dev", "sxv0", "proto", "static"]),
                (net(0x200), vec!["blackhole"]),
            ];
            // Not in the way: another table; another metric.
            let beside = [
                (net(0x300), vec!["dev", "lo", "table", "100"]),
                (net(0x400), vec!["dev", "lo", "metric", "100"]),
            ];
            let show = |n: (Ipv6Addr, u8)| {
                run(&[
                    "-6",
                    "route",
                    "show",
                    "table",
                    "all",
                    &format!("{}/{}", n.0, n.1),
                ])
            };
            for (n, how) in foreign.iter().chain(&beside) {
                let dst = format!("{}/{}", n.0, n.1);
                let mut args = vec!["-6", "route", "add"];
                match how[0] {
                    "blackhole" => args.extend(["blackhole", dst.as_str()]),
                    _ => {
                        args.push(&dst);
                        args.extend(how.iter().copied());
                    }
                }
                run(&args);
            }
            let before: Vec<String> = foreign.iter().map(|(n, _)| show(*n)).collect();

            let ours = net(0x500);
            let nets = [
                ours,
                foreign[0].0,
                foreign[1].0,
                foreign[2].0,
                beside[0].0,
                beside[1].0,
            ];
            let r = nl.add_routes(idx, &nets).await;
            assert!(r[0].is_ok() && r[4].is_ok() && r[5].is_ok(), "{r:?}");
            for (i, (n, _)) in foreign.iter().enumerate() {
                let e = r[i + 1].as_ref().unwrap_err();
                let text = e.to_string();
                assert_eq!(e.errno, Some(libc::EEXIST), "{text}");
                assert!(
                    text.contains(&format!("{}/120 not owned by sixpn", n.0)),
                    "{text}"
                );
            }
            let after: Vec<String> = foreign.iter().map(|(n, _)| show(*n)).collect();
            assert_eq!(before, after, "a foreign route changed");
            assert!(after[0].contains("dev lo") && after[1].contains("proto static"));
            let mut want = vec![ours, beside[0].0, beside[1].0];
            want.sort();
            assert_eq!(nl.routes(idx).await.unwrap(), want);
            // Ours already there: success, nothing changes.
            let again = nl.add_routes(idx, &[ours, beside[1].0]).await;
            assert!(again.iter().all(Result::is_ok), "{again:?}");
            assert_eq!(nl.routes(idx).await.unwrap(), want);
        });
    }

    #[test]
    fn ten_thousand_routes() {
        if !need_root("ten_thousand_routes") {
            return;
        }
        in_netns(|| async {
            let nl = LinuxNetlink::new().unwrap();
            let idx = veth(&nl).await;
            let nets: Vec<(Ipv6Addr, u8)> = (0..10_000u32)
                .map(|i| {
                    let g = 0xa + (i / 256) as u16;
                    (
                        Ipv6Addr::new(0xfdaa, 0, 0x18, 0, 1, 0, g, ((i % 256) << 8) as u16),
                        120,
                    )
                })
                .collect();
            let t = Instant::now();
            let r = nl.add_routes(idx, &nets).await;
            let add = t.elapsed();
            assert!(r.iter().all(Result::is_ok));
            let t = Instant::now();
            let listed = nl.routes(idx).await.unwrap();
            let list = t.elapsed();
            let mut want = nets.clone();
            want.sort();
            assert_eq!(listed, want);
            let t = Instant::now();
            let again = nl.add_routes(idx, &nets).await;
            let readd = t.elapsed();
            assert!(again.iter().all(Result::is_ok));
            let t = Instant::now();
            let r = nl.del_routes(idx, &nets).await;
            let del = t.elapsed();
            assert!(r.iter().all(Result::is_ok));
            assert!(nl.routes(idx).await.unwrap().is_empty());
            // Timing is printed, not asserted: emulated VMs are 100x slower.
            eprintln!(
                "10k routes: add {add:?}, list {list:?}, re-add (all exist, ours) {readd:?}, delete {del:?}"
            );
        });
    }

    #[test]
    fn subscribe_reports_changes_on_the_link() {
        if !need_root("subscribe_reports_changes_on_the_link") {
            return;
        }
        in_netns(|| async {
            let nl = LinuxNetlink::new().unwrap();
            let idx = veth(&nl).await;
            let mut rx = nl.subscribe().unwrap();
            // Let the link-up burst pass, then make one change.
            tokio::time::sleep(Duration::from_millis(100)).await;
            while rx.try_recv().is_ok() {}
            run(&[
                "-6",
                "addr",
                "add",
                "fdaa:0:18::3/128",
                "dev",
                "sxv0",
                "nodad",
            ]);
            let got = tokio::time::timeout(Duration::from_secs(2), async {
                while let Some(ev) = rx.recv().await {
                    if ev == NetEvent::Changed(idx) {
                        return true;
                    }
                }
                false
            })
            .await;
            assert_eq!(got, Ok(true), "an event for link {idx}");
            // Route events carry the route's output link.
            run(&[
                "-6",
                "route",
                "add",
                "fd00:1::/120",
                "dev",
                "sxv0",
                "proto",
                "110",
            ]);
            let ev = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await;
            assert!(
                matches!(ev, Ok(Some(NetEvent::Changed(i))) if i == idx),
                "{ev:?}"
            );
            // Dropping the receiver ends the forwarder (no leak, no panic).
            drop(rx);
            run(&["link", "del", "sxv0"]);
            tokio::time::sleep(Duration::from_millis(50)).await;
        });
    }
}
