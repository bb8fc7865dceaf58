//! Organization isolation with real packets (docs/architecture.md "Test tiers", tier 2,
//! tier 3 runs it under a real kernel with `SIXPN_TEST_BACKEND=kernel`).
//!
//! Topology, each a network namespace, joined by veth pairs:
//!
//! ```text
//!  client-a (acme peer)   fd53:1::/64 ─┐             ┌─ fd53:2::/64  inst-a (acme instance)
//!  client-b (globex peer) fd53:3::/64 ─┤   gateway   ├─ fd53:4::/64  inst-b (globex instance)
//!  evil (acme key, claims  fd53:5::/64 ─┘  (sixpn)    │
//!        a globex address)                            │
//! ```
//!
//! The clients' wg-quick files are edited to route all of `fdaa::/16` into
//! the tunnel (as a hostile client would), so cross-org packets really reach
//! the gateway and it is the gateway's ruleset that stops them.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{scaled, Client, ClientConf, Netns, RunningTopology, Topology};
use sixpn::dataplane::nft_codec::counter_packets;
use sixpn::plan::nft::{FORWARD_DROPPED, INPUT_DROPPED};

/// Moves the calling thread into `ns` (a thread of our own: setns(2) on it
/// changes only that thread).
fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("open netns");
    // SAFETY: setns on a valid namespace fd; affects this thread only.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// Runs `f` on a fresh thread inside `ns`.
fn in_ns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let name = ns.name().to_owned();
    std::thread::spawn(move || {
        enter(&name);
        f()
    })
    .join()
    .expect("thread in netns")
}

const PORT: u16 = 8080;

/// TCP and UDP echo servers on `[::]:PORT` (and `[addr]:53` extra binds)
/// in a namespace, stopped on drop.
struct Echo {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Echo {
    fn start(ns: &Netns, udp_addrs: &[SocketAddr], tcp_addrs: &[SocketAddr]) -> Self {
        Self::start_with(ns, udp_addrs, tcp_addrs, false)
    }

    /// Like [`Echo::start`], but an address already served (the daemon's
    /// own DNS listener on `::3`, once it has one) is left to its server.
    fn start_unless_served(ns: &Netns, udp: &[SocketAddr], tcp: &[SocketAddr]) -> Self {
        Self::start_with(ns, udp, tcp, true)
    }

    fn start_with(
        ns: &Netns,
        udp_addrs: &[SocketAddr],
        tcp_addrs: &[SocketAddr],
        optional: bool,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &a in udp_addrs {
            let (name, stop) = (ns.name().to_owned(), stop.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            threads.push(std::thread::spawn(move || {
                enter(&name);
                let s = match UdpSocket::bind(a) {
                    Ok(s) => s,
                    Err(e) if optional && e.kind() == std::io::ErrorKind::AddrInUse => {
                        tx.send(()).unwrap();
                        return;
                    }
                    Err(e) => panic!("bind udp {a}: {e}"),
                };
                s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                tx.send(()).unwrap();
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(&buf[..n], from);
                    }
                }
            }));
            rx.recv().expect("udp echo started");
        }
        for &a in tcp_addrs {
            let (name, stop) = (ns.name().to_owned(), stop.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            threads.push(std::thread::spawn(move || {
                enter(&name);
                let l = match TcpListener::bind(a) {
                    Ok(l) => l,
                    Err(e) if optional && e.kind() == std::io::ErrorKind::AddrInUse => {
                        tx.send(()).unwrap();
                        return;
                    }
                    Err(e) => panic!("bind tcp {a}: {e}"),
                };
                l.set_nonblocking(true).unwrap();
                tx.send(()).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut c, _)) => {
                            let _ = c.set_nonblocking(false);
                            let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
                            let mut buf = [0u8; 64];
                            if let Ok(n) = c.read(&mut buf) {
                                let _ = c.write_all(&buf[..n]);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
            rx.recv().expect("tcp echo started");
        }
        Self { stop, threads }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A DNS query for `_peer.internal` TXT: what the probes of the org DNS
/// addresses send, so that the echo stand-ins and a real DNS server on
/// `::3` both answer it.
const DNS_QUERY: &[u8] = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\
\x05_peer\x08internal\x00\x00\x10\x00\x01";

/// Whether a TCP connection from `ns` to `addr` gets an answer (a DNS query
/// for port 53, else an echo).
fn tcp_ok(ns: &Netns, addr: SocketAddr) -> bool {
    let msg: Vec<u8> = if addr.port() == 53 {
        let mut m = (DNS_QUERY.len() as u16).to_be_bytes().to_vec();
        m.extend_from_slice(DNS_QUERY);
        m
    } else {
        b"hello".to_vec()
    };
    in_ns(ns, move || {
        let Ok(mut c) = TcpStream::connect_timeout(&addr, scaled(Duration::from_millis(1500)))
        else {
            return false;
        };
        let _ = c.set_read_timeout(Some(scaled(Duration::from_secs(1))));
        let mut buf = [0u8; 2];
        c.write_all(&msg).is_ok() && c.read_exact(&mut buf).is_ok()
    })
}

/// Whether a UDP datagram from `ns` to `addr` gets an answer (3 tries).
fn udp_ok(ns: &Netns, addr: SocketAddr) -> bool {
    let msg: &'static [u8] = if addr.port() == 53 {
        DNS_QUERY
    } else {
        b"ping"
    };
    in_ns(ns, move || {
        let s = UdpSocket::bind("[::]:0").unwrap();
        s.set_read_timeout(Some(scaled(Duration::from_millis(300))))
            .unwrap();
        let mut buf = [0u8; 512];
        (0..3).any(|_| s.send_to(msg, addr).is_ok() && s.recv_from(&mut buf).is_ok())
    })
}

fn ping(ns: &Netns, addr: &str) -> bool {
    ns.run(&[
        "ping", "-6", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "1", "-w", "3", addr,
    ])
    .status
    .success()
}

fn sock(addr: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::new(addr.into(), port)
}

struct Topo {
    net: RunningTopology,
    inst_a: Ipv6Addr,
    inst_b: Ipv6Addr,
}

const DNS_A: &str = "fdaa:0:1::3";
const DNS_B: &str = "fdaa:0:2::3";

/// Client files made hostile: all of 6PN into the tunnel.
fn all_of_6pn() -> ClientConf {
    ClientConf::AllOf6pn { claim: None }
}

fn topo() -> Topo {
    let net = Topology::new()
        .org("acme")
        .org("globex")
        .client_with("acme", "laptop-a", all_of_6pn())
        .instance("acme", "web")
        .client_with("globex", "laptop-b", all_of_6pn())
        .instance("globex", "web")
        .start();
    let inst_a = net.instance("acme", "web").addr;
    let inst_b = net.instance("globex", "web").addr;
    assert!(inst_a.to_string().starts_with("fdaa:0:1:"), "{inst_a}");
    assert!(inst_b.to_string().starts_with("fdaa:0:2:"), "{inst_b}");
    Topo {
        net,
        inst_a,
        inst_b,
    }
}

impl std::ops::Deref for Topo {
    type Target = RunningTopology;
    fn deref(&self) -> &RunningTopology {
        &self.net
    }
}

impl Topo {
    fn a(&self) -> &Client {
        self.net.client("laptop-a")
    }

    fn b(&self) -> &Client {
        self.net.client("laptop-b")
    }

    fn inst_a_ns(&self) -> &Netns {
        &self.net.instance("acme", "web").ns
    }

    fn inst_b_ns(&self) -> &Netns {
        &self.net.instance("globex", "web").ns
    }

    /// (forward_dropped, input_dropped) packet counts.
    fn counters(&self) -> (u64, u64) {
        let json = self
            .gw_ns
            .run_ok(&["nft", "-j", "list", "counters", "table", "inet", "sixpn"]);
        (
            counter_packets(&json, FORWARD_DROPPED).expect("forward counter"),
            counter_packets(&json, INPUT_DROPPED).expect("input counter"),
        )
    }

    /// Packets the guard dropped, as `tc -s qdisc show` reports for the
    /// interface's clsact qdisc.
    fn guard_dropped(&self) -> u64 {
        let shown = self
            .gw_ns
            .run_ok(&["tc", "-s", "qdisc", "show", "dev", &self.gw.interface]);
        let after = shown
            .split("qdisc clsact")
            .nth(1)
            .unwrap_or_else(|| panic!("no clsact qdisc: {shown}"));
        after
            .split("(dropped ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no drop count: {shown}"))
    }
}

fn dns(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

#[test]
fn only_same_org_traffic_crosses_the_gateway() {
    require_root!();
    require_tools!("ip", "wg", "wg-quick", "wireguard-go", "ping", "nft", "tc");
    let mut t = topo();
    let listing = t.gw_ns.run_ok(&["nft", "list", "table", "inet", "sixpn"]);
    assert!(
        listing.contains("comment \"acme\"") && listing.contains("comment \"globex\""),
        "{listing}"
    );
    eprintln!("---- nft list table inet sixpn ----\n{listing}");

    // Bound to the instance addresses: a UDP reply from `[::]` would leave
    // with the host's underlay address, which is not 6PN.
    let (ia, ib) = ([sock(t.inst_a, PORT)], [sock(t.inst_b, PORT)]);
    let _ea = Echo::start(t.inst_a_ns(), &ia, &ia);
    let _eb = Echo::start(t.inst_b_ns(), &ib, &ib);
    // Stand-ins for the org DNS servers on the gateway, and one more port.
    let on_gw: Vec<SocketAddr> = [DNS_A, DNS_B].iter().map(|d| sock(dns(d), 53)).collect();
    let other: Vec<SocketAddr> = [DNS_A, DNS_B].iter().map(|d| sock(dns(d), 22)).collect();
    let tcp_gw: Vec<SocketAddr> = on_gw.iter().chain(&other).copied().collect();
    let _eg = Echo::start_unless_served(&t.gw_ns, &on_gw, &tcp_gw);

    // Same org: ping, TCP, DNS (UDP and TCP) all pass.
    for (c, inst, d) in [(t.a(), t.inst_a, DNS_A), (t.b(), t.inst_b, DNS_B)] {
        assert!(ping(&c.ns, &inst.to_string()), "same-org ping to {inst}");
        assert!(tcp_ok(&c.ns, sock(inst, PORT)), "same-org TCP to {inst}");
        assert!(udp_ok(&c.ns, sock(inst, PORT)), "same-org UDP to {inst}");
        assert!(ping(&c.ns, d), "ping own DNS {d}");
        assert!(udp_ok(&c.ns, sock(dns(d), 53)), "own DNS over UDP {d}");
        assert!(tcp_ok(&c.ns, sock(dns(d), 53)), "own DNS over TCP {d}");
    }
    // Same-org instance to peer (the instance side starts it).
    assert!(in_ns(t.inst_a_ns(), {
        let peer = t.a().addr;
        let inst = t.inst_a;
        move || {
            let s = UdpSocket::bind(sock(inst, 0)).unwrap();
            s.send_to(b"x", sock(peer, 9)).is_ok()
        }
    }));

    // Cross org: every one dropped and counted.
    let (fwd0, in0) = t.counters();
    let guard0 = t.guard_dropped();
    let mut report = Vec::new();
    for (c, other_inst, other_peer, other_dns, own_dns) in [
        (t.a(), t.inst_b, t.b().addr, DNS_B, DNS_A),
        (t.b(), t.inst_a, t.a().addr, DNS_A, DNS_B),
    ] {
        assert!(
            !ping(&c.ns, &other_inst.to_string()),
            "cross-org ping to {other_inst} passed"
        );
        assert!(
            !tcp_ok(&c.ns, sock(other_inst, PORT)),
            "cross-org TCP to {other_inst} passed"
        );
        assert!(
            !ping(&c.ns, &other_peer.to_string()),
            "peer to other org's peer passed"
        );
        assert!(
            !udp_ok(&c.ns, sock(dns(other_dns), 53)),
            "DNS to {other_dns} passed"
        );
        assert!(
            !tcp_ok(&c.ns, sock(dns(other_dns), 53)),
            "TCP DNS to {other_dns} passed"
        );
        assert!(!ping(&c.ns, other_dns), "ping to {other_dns} passed");
        assert!(
            !tcp_ok(&c.ns, sock(dns(own_dns), 22)),
            "another port on {own_dns} passed"
        );
        // And not to a non-6PN address behind the gateway either.
        assert!(!tcp_ok(&c.ns, "[fd53:4::2]:8080".parse().unwrap()));
    }
    let (fwd1, in1) = t.counters();
    let guard1 = t.guard_dropped();
    report.push(format!(
        "dropped and counted: guard {guard0} -> {guard1}, forward_dropped {fwd0} -> {fwd1}, \
         input_dropped {in0} -> {in1}"
    ));
    // Everything outside the sender's /48 stops at the guard, before the
    // table: ping 2 × 2, the other org's DNS and ::3, the non-6PN address,
    // with TCP SYN retries: at least one per attempt above.
    assert!(
        guard1 + fwd1 >= guard0 + fwd0 + 12,
        "cross-org drops not counted: guard {guard0} -> {guard1}, forward {fwd0} -> {fwd1}"
    );
    // Another port on the sender's own ::3 is within its /48: the table's.
    assert!(in1 >= in0 + 2, "input drops not counted: {in0} -> {in1}");

    // Same org still fine afterwards.
    assert!(ping(&t.a().ns, &t.inst_a.to_string()));

    // A client of acme whose config claims a globex address gets nothing
    // through: WireGuard drops its packets (source outside its allowed-ips)
    // and the set would drop them anyway.
    let claimed = "fdaa:0:2:a7b:d6b:0:a:7702";
    t.net.add_client(
        "acme",
        "evil",
        ClientConf::AllOf6pn {
            claim: Some(claimed.into()),
        },
    );
    let evil = t.net.client("evil");
    for target in [
        t.inst_b.to_string(),
        t.inst_a.to_string(),
        DNS_B.into(),
        DNS_A.into(),
    ] {
        assert!(!ping(&evil.ns, &target), "spoofing client reached {target}");
    }
    assert!(!tcp_ok(&evil.ns, sock(t.inst_b, PORT)));
    assert!(!udp_ok(&evil.ns, sock(dns(DNS_B), 53)));
    common::wg_quick(&evil.ns, &t.script, &["down", evil.conf.to_str().unwrap()]);
    for r in &report {
        eprintln!("isolation: {r}");
    }
}

/// Sends a UDP probe from `ns` to `to` every 5 ms for `total`, and returns
/// when (since the start) echoes came back.
fn probe(ns: &Netns, to: SocketAddr, total: Duration) -> JoinHandle<Vec<Duration>> {
    let name = ns.name().to_owned();
    std::thread::spawn(move || {
        enter(&name);
        let s = UdpSocket::bind("[::]:0").unwrap();
        s.set_nonblocking(true).unwrap();
        let t0 = Instant::now();
        let mut replies = Vec::new();
        let mut buf = [0u8; 16];
        while t0.elapsed() < total {
            let _ = s.send_to(b"probe", to);
            std::thread::sleep(Duration::from_millis(5));
            while s.recv_from(&mut buf).is_ok() {
                replies.push(t0.elapsed());
            }
        }
        replies
    })
}

#[test]
fn no_cross_org_packet_crosses_while_the_table_or_the_guard_is_gone() {
    require_root!();
    require_tools!("ip", "wg", "wg-quick", "wireguard-go", "ping", "nft", "tc");
    let t = topo();
    // Bound to the instance address: a reply from `[::]` would leave with
    // the host's underlay address, which is not 6PN.
    let echo = [sock(t.inst_b, PORT)];
    let _eb = Echo::start(t.inst_b_ns(), &echo, &echo);
    let cross = sock(t.inst_b, PORT);
    // Both tunnels up (the first packet waits for the handshake).
    assert!(ping(&t.a().ns, &t.inst_a.to_string()));
    assert!(ping(&t.b().ns, &t.inst_b.to_string()));
    assert!(
        !udp_ok(&t.a().ns, cross),
        "cross-org UDP passes before the flush"
    );
    assert!(udp_ok(&t.b().ns, cross), "same-org UDP must pass");

    let mut report = Vec::new();
    for how in [
        &["flush", "ruleset"][..],
        &["delete", "table", "inet", "sixpn"][..],
        &["flush", "table", "inet", "sixpn"][..],
    ] {
        let (fwd0, _) = t.counters();
        // Probes from acme to globex's instance, every 5 ms, across the cut.
        let probes = probe(&t.a().ns, cross, scaled(Duration::from_millis(1600)));
        std::thread::sleep(Duration::from_millis(100));
        let cut = Instant::now();
        let mut c = t.gw_ns.cmd("nft");
        c.args(how);
        common::run_ok(&mut c);
        // Each poll spawns `nft`; in the emulated VM that takes a vCPU from
        // the daemon being timed, so poll as much less often as it is slower.
        let every = Duration::from_millis(20) * common::slowdown();
        let restored = common::wait_for_every(every, scaled(Duration::from_secs(3)), || {
            let listing = t.gw_ns.run(&["nft", "list", "table", "inet", "sixpn"]);
            let text = common::stdout_of(&listing);
            (listing.status.success() && text.contains("@same_org48 accept")).then(|| cut.elapsed())
        })
        .unwrap_or_else(|| {
            panic!(
                "`nft {}` not repaired in 3 s:\n{}",
                how.join(" "),
                t.gw.log()
            )
        });
        let replies = probes.join().unwrap();
        let since_cut: Vec<Duration> = replies
            .iter()
            .filter_map(|r| r.checked_sub(Duration::from_millis(100)))
            .collect();
        let window = since_cut.last().copied().unwrap_or_default();
        let (fwd1, _) = t.counters();
        report.push(format!(
            "nft {}: table back after {restored:?}; {} cross-org echoes got through, \
             the last {window:?} after the cut; forward_dropped {fwd0} -> {fwd1} (reset by a replace)",
            how.join(" "),
            since_cut.len()
        ));
        assert!(
            restored < scaled(Duration::from_secs(1)),
            "restore took {restored:?}"
        );
        // The guard under the table (tc on the interface) held meanwhile.
        assert!(
            since_cut.is_empty(),
            "{} cross-org echoes crossed while the table was gone, the last {window:?} after the cut",
            since_cut.len()
        );
        assert!(
            !udp_ok(&t.a().ns, cross),
            "cross-org UDP passes after the repair"
        );
        assert!(
            udp_ok(&t.b().ns, cross),
            "same-org UDP broken after the repair"
        );
    }

    // The other way round: the guard gone, the table alone isolates, and
    // the guard is back within the second.
    let iface = t.gw.interface.clone();
    let probes = probe(&t.a().ns, cross, scaled(Duration::from_millis(1000)));
    std::thread::sleep(Duration::from_millis(100));
    let cut = Instant::now();
    t.gw_ns
        .run_ok(&["tc", "qdisc", "del", "dev", &iface, "clsact"]);
    let every = Duration::from_millis(20) * common::slowdown();
    let back = common::wait_for_every(every, scaled(Duration::from_secs(3)), || {
        let shown = t
            .gw_ns
            .run(&["tc", "filter", "show", "dev", &iface, "egress"]);
        common::stdout_of(&shown)
            .contains("bytecode")
            .then(|| cut.elapsed())
    })
    .unwrap_or_else(|| panic!("the guard was not put back in 3 s:\n{}", t.gw.log()));
    let crossed = probes.join().unwrap();
    assert!(
        crossed.is_empty(),
        "{} echoes crossed with the table alone",
        crossed.len()
    );
    report.push(format!(
        "tc qdisc del clsact: guard back after {back:?}; 0 echoes crossed"
    ));
    assert!(
        back < scaled(Duration::from_secs(1)),
        "guard back after {back:?}"
    );
    assert!(
        udp_ok(&t.b().ns, cross),
        "same-org UDP broken after the guard came back"
    );
    for r in &report {
        eprintln!("restore: {r}");
    }
    assert!(t.gw.log().contains("isolation ruleset installed"));
    assert!(t.gw.log().contains("isolation guard attached"));
}
