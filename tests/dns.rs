//! `.internal` DNS through real tunnels (docs/architecture.md "DNS", tier 2): `dig`
//! from client namespaces, through their wg-quick tunnels, at the `DNS =`
//! address of their files.
//!
//! ```text
//!  client A (acme) ── veth fd53:1::/64 ──┐
//!                                        gateway ── veth fd53:9::/64 ── upstream
//!  client B (other) ─ veth fd53:2::/64 ──┘ (sixpn)                      (dnsmasq: example.test)
//! ```

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::net::{Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{
    aaaa_query, enter_netns, veth, ClientConf, Gateway, Netns, RunningTopology, Topology,
};
use hickory_proto::op::{Message, ResponseCode};

/// The upstream resolver's address and the name it serves.
const UPSTREAM: &str = "fd53:9::2";
const UPSTREAM_AAAA: &str = "2001:db8::7";
const UPSTREAM_A: &str = "192.0.2.7";

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A client namespace with its tunnel up.
struct Client {
    ns: Netns,
    /// The `DNS =` address of its wg-quick file.
    dns: String,
    /// Its address.
    addr: Ipv6Addr,
    iface: String,
}

struct Topo {
    gw: Gateway,
    gw_ns: Netns,
    a: Client,
    b: Client,
    _upstream: Netns,
    _dnsmasq: Child,
    dir: tempfile::TempDir,
    script: PathBuf,
    /// acme's instances: id → address.
    inst: Vec<(&'static str, Ipv6Addr)>,
    /// acme's second peer (registered with a public key, no tunnel).
    ci_addr: Ipv6Addr,
}

/// A client of the topology, its `DNS =` address required.
fn client(c: common::Client) -> Client {
    Client {
        ns: c.ns,
        dns: c.dns.expect("no DNS line in the wg-quick file"),
        addr: c.addr,
        iface: c.iface,
    }
}

fn add_instance(gw: &Gateway, args: &[&str]) -> Ipv6Addr {
    let mut a = vec!["instances", "add"];
    a.extend_from_slice(args);
    let out = gw.cli_ok(&a);
    out.split_whitespace()
        .last()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no address in {out:?}"))
}

/// Gateway, two org clients, and an upstream resolver; acme seeded with app
/// `web` (3 started instances in lhr and iad, 1 stopped in ams, process
/// groups `app` and `worker`) and peers `laptop` (client A) and `ci`; org
/// `other` with app `secret` and peer `spy` (client B).
fn topo() -> Topo {
    let gw_ns = Netns::new();
    let upstream = Netns::new();
    veth(
        &gw_ns,
        "to-up",
        &["fd53:9::1/64"],
        &upstream,
        "to-gw",
        &[&format!("{UPSTREAM}/64")],
    );

    let mut dnsmasq = upstream.cmd("dnsmasq");
    dnsmasq
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--pid-file=",
            "--bind-interfaces",
            "--port=53",
            "--local=/test/",
            "--log-facility=-",
        ])
        .arg(format!("--listen-address={UPSTREAM}"))
        .arg(format!(
            "--host-record=example.test,{UPSTREAM_A},{UPSTREAM_AAAA}"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let dnsmasq = dnsmasq.spawn().expect("cannot start dnsmasq");
    // Ready when it answers (from the gateway's side).
    let up = common::wait_for(Duration::from_secs(5), || {
        let out = gw_ns.run(&[
            "dig",
            &format!("@{UPSTREAM}"),
            "+time=1",
            "+tries=1",
            "example.test",
            "A",
        ]);
        common::stdout_of(&out)
            .contains("status: NOERROR")
            .then_some(())
    });
    assert!(up.is_some(), "dnsmasq did not come up");

    let mut net = Topology::new()
        .gateway_netns(gw_ns)
        .backend("userspace")
        .gateway(|g| g.extra_toml(&format!("[dns]\nupstream = [\"[{UPSTREAM}]:53\"]")))
        .org("acme")
        .org("other")
        .start();
    let gw = &net.gw;
    let web = |id: &'static str, region: &str, machine: &str, group: &str, stopped: bool| {
        let mut args = vec![
            "acme",
            "web",
            region,
            "--host",
            "a7b:7d",
            "--machine",
            machine,
            "--id",
            id,
            "--process-group",
            group,
        ];
        if stopped {
            args.push("--stopped");
        }
        (id, add_instance(gw, &args))
    };
    let inst = vec![
        web("w1", "lhr", "0:a1", "app", false),
        web("w2", "lhr", "0:a2", "worker", false),
        web("w3", "iad", "0:a3", "app", false),
        web("w4", "ams", "0:a4", "worker", true),
    ];
    add_instance(
        gw,
        &[
            "other",
            "secret",
            "lhr",
            "--host",
            "a7b:7d",
            "--machine",
            "0:b1",
            "--id",
            "s1",
        ],
    );
    let ci_key = common::wg_pubkey(&common::wg_genkey());
    gw.cli_ok(&[
        "wireguard",
        "create",
        "acme",
        "lhr",
        "ci",
        "stdout",
        "--public-key",
        &ci_key,
    ]);
    let peers = gw.cli_json(&["wireguard", "list", "acme"]);
    let ci_addr = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "ci")
        .and_then(|p| p["address"].as_str())
        .unwrap()
        .parse()
        .unwrap();

    net.add_client("acme", "laptop", ClientConf::AsCreated);
    net.add_client("other", "spy", ClientConf::AsCreated);
    let RunningTopology {
        gw,
        gw_ns,
        clients,
        dir,
        script,
        ..
    } = net;
    let mut clients = clients.into_iter().map(client);
    let (a, b) = (clients.next().unwrap(), clients.next().unwrap());
    Topo {
        gw,
        gw_ns,
        a,
        b,
        _upstream: upstream,
        _dnsmasq: dnsmasq,
        dir,
        script,
        inst,
        ci_addr,
    }
}

/// What `dig` printed, parsed.
#[derive(Debug)]
struct Dig {
    /// `None`: no answer at all (timeout, unreachable).
    status: Option<String>,
    flags: String,
    /// (type, data) of each answer record.
    answers: Vec<(String, String)>,
    /// The TTL of each answer record.
    ttls: Vec<u32>,
    /// (ttl, type, data) of each AUTHORITY record.
    authority: Vec<(u32, String, String)>,
    raw: String,
}

impl Dig {
    fn aaaa(&self) -> BTreeSet<Ipv6Addr> {
        self.answers
            .iter()
            .filter(|(t, _)| t == "AAAA")
            .map(|(_, d)| d.parse().unwrap())
            .collect()
    }

    /// Each TXT record's strings, unquoted and concatenated.
    fn txt(&self) -> Vec<String> {
        self.answers
            .iter()
            .filter(|(t, _)| t == "TXT")
            .map(|(_, d)| {
                let mut out = String::new();
                let mut inside = false;
                let mut chars = d.chars();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => inside = !inside,
                        '\\' if inside => out.extend(chars.next()),
                        c if inside => out.push(c),
                        _ => {}
                    }
                }
                out
            })
            .collect()
    }
}

fn dig(ns: &Netns, server: &str, name: &str, rtype: &str, tcp: bool, time: u32) -> Dig {
    let mut args = vec![
        "dig".to_owned(),
        format!("@{server}"),
        format!("+time={time}"),
        "+tries=1".into(),
        name.into(),
        rtype.into(),
    ];
    if tcp {
        args.push("+tcp".into());
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let raw = common::stdout_of(&ns.run(&argv));
    let status = raw
        .split("status: ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .map(str::to_owned);
    let flags = raw
        .split(";; flags: ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap_or_default()
        .to_owned();
    let mut answers = Vec::new();
    let mut ttls = Vec::new();
    let mut authority = Vec::new();
    // 1: in ANSWER, 2: in AUTHORITY.
    let mut section = 0;
    for line in raw.lines() {
        if line.starts_with(";; ANSWER SECTION") {
            section = 1;
            continue;
        }
        if line.starts_with(";; AUTHORITY SECTION") {
            section = 2;
            continue;
        }
        if line.trim().is_empty() {
            section = 0;
        }
        if section == 0 {
            continue;
        }
        // name ttl class type data…
        let mut f = line.split_whitespace();
        let (_, ttl, _, t) = (f.next(), f.next(), f.next(), f.next());
        let ttl = ttl.and_then(|t| t.parse().ok()).unwrap_or(u32::MAX);
        let t = t.unwrap_or_default().to_owned();
        let data = f.collect::<Vec<&str>>().join(" ");
        if section == 1 {
            ttls.push(ttl);
            answers.push((t, data));
        } else {
            authority.push((ttl, t, data));
        }
    }
    Dig {
        status,
        flags,
        answers,
        ttls,
        authority,
        raw,
    }
}

/// The SOA data as `dig` prints it, for `serial`.
fn soa_data(serial: u32) -> String {
    format!("_api.internal. hostmaster.internal. {serial} 3600 600 1209600 5")
}

/// `internal. SOA`'s serial, asked over UDP and TCP (the same both ways),
/// checking the rest of the record.
fn soa_serial(ns: &Netns, server: &str) -> u32 {
    let mut serials = Vec::new();
    for tcp in [false, true] {
        let d = dig(ns, server, "internal.", "SOA", tcp, 3);
        if !tcp {
            eprintln!("dns: internal. SOA:\n{}", d.raw);
        }
        assert_eq!(d.status.as_deref(), Some("NOERROR"), "{}", d.raw);
        assert!(d.flags.contains("aa"), "{}", d.raw);
        assert_eq!(d.ttls, [5], "{}", d.raw);
        let [(t, data)] = &d.answers[..] else {
            panic!("not one answer: {}", d.raw);
        };
        assert_eq!(t, "SOA", "{}", d.raw);
        let serial: u32 = data
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no serial: {}", d.raw));
        assert!(serial > 0, "{}", d.raw);
        assert_eq!(*data, soa_data(serial), "{}", d.raw);
        serials.push(serial);
    }
    assert_eq!(serials[0], serials[1]);
    serials[0]
}

/// What a name should give.
#[derive(Debug, Clone)]
enum Expect {
    Aaaa(Vec<Ipv6Addr>),
    Txt(String),
    NoData,
    NxDomain,
}

fn check(d: &Dig, name: &str, rtype: &str, tcp: bool, want: &Expect) {
    let how = if tcp { "TCP" } else { "UDP" };
    let ctx = || format!("{name} {rtype} over {how}:\n{}", d.raw);
    let status = d
        .status
        .as_deref()
        .unwrap_or_else(|| panic!("no answer: {}", ctx()));
    match want {
        Expect::NxDomain => assert_eq!(status, "NXDOMAIN", "{}", ctx()),
        _ => assert_eq!(status, "NOERROR", "{}", ctx()),
    }
    match want {
        Expect::Aaaa(addrs) => {
            let want: BTreeSet<Ipv6Addr> = addrs.iter().copied().collect();
            assert_eq!(d.aaaa(), want, "{}", ctx());
            assert_eq!(d.answers.len(), addrs.len(), "{}", ctx());
        }
        Expect::Txt(v) => assert_eq!(d.txt(), vec![v.clone()], "{}", ctx()),
        Expect::NoData | Expect::NxDomain => assert!(d.answers.is_empty(), "{}", ctx()),
    }
    if name.ends_with(".internal") {
        assert!(d.flags.contains("aa"), "not authoritative: {}", ctx());
        assert!(d.ttls.iter().all(|&t| t == 5), "TTL is not 5: {}", ctx());
    }
}

/// acme's names table (docs/architecture.md "DNS") with what each must answer.
fn names_table(t: &Topo) -> Vec<(String, &'static str, Expect)> {
    let ip = |id: &str| t.inst.iter().find(|(i, _)| *i == id).unwrap().1;
    let (w1, w2, w3, w4) = (ip("w1"), ip("w2"), ip("w3"), ip("w4"));
    let started = vec![w1, w2, w3];
    let inst =
        |id: &str, region: &str| format!("instance={id},app=web,ip={},region={region}", ip(id));
    let s = |x: &str| x.to_owned();
    vec![
        (s("web.internal"), "AAAA", Expect::Aaaa(started.clone())),
        (
            s("global.web.internal"),
            "AAAA",
            Expect::Aaaa(started.clone()),
        ),
        (s("lhr.web.internal"), "AAAA", Expect::Aaaa(vec![w1, w2])),
        (s("iad.web.internal"), "AAAA", Expect::Aaaa(vec![w3])),
        (s("ams.web.internal"), "AAAA", Expect::NoData),
        // This gateway is in lhr: lhr first (by id), then iad.
        (
            s("top1.nearest.of.web.internal"),
            "AAAA",
            Expect::Aaaa(vec![w1]),
        ),
        (
            s("top2.nearest.of.web.internal"),
            "AAAA",
            Expect::Aaaa(vec![w1, w2]),
        ),
        (
            s("top3.nearest.of.web.internal"),
            "AAAA",
            Expect::Aaaa(started.clone()),
        ),
        (
            s("top9.nearest.of.web.internal"),
            "AAAA",
            Expect::Aaaa(started.clone()),
        ),
        (s("w1.vm.web.internal"), "AAAA", Expect::Aaaa(vec![w1])),
        (s("w4.vm.web.internal"), "AAAA", Expect::Aaaa(vec![w4])),
        (
            s("app.process.web.internal"),
            "AAAA",
            Expect::Aaaa(vec![w1, w3]),
        ),
        (
            s("worker.process.web.internal"),
            "AAAA",
            Expect::Aaaa(vec![w2]),
        ),
        (s("regions.web.internal"), "TXT", Expect::Txt(s("iad,lhr"))),
        (
            s("all.regions.web.internal"),
            "TXT",
            Expect::Txt(s("ams,iad,lhr")),
        ),
        (
            s("vms.web.internal"),
            "TXT",
            Expect::Txt(s("w1 lhr,w2 lhr,w3 iad")),
        ),
        (
            s("all.vms.web.internal"),
            "TXT",
            Expect::Txt(s("w1 lhr,w2 lhr,w3 iad,w4 ams")),
        ),
        (s("_apps.internal"), "TXT", Expect::Txt(s("web"))),
        (
            s("_instances.internal"),
            "TXT",
            Expect::Txt([inst("w1", "lhr"), inst("w2", "lhr"), inst("w3", "iad")].join(";")),
        ),
        (
            s("all._instances.internal"),
            "TXT",
            Expect::Txt(
                [
                    inst("w1", "lhr"),
                    inst("w2", "lhr"),
                    inst("w3", "iad"),
                    inst("w4", "ams"),
                ]
                .join(";"),
            ),
        ),
        (s("_peer.internal"), "TXT", Expect::Txt(s("ci,laptop"))),
        (
            s("laptop._peer.internal"),
            "AAAA",
            Expect::Aaaa(vec![t.a.addr]),
        ),
        (
            s("ci._peer.internal"),
            "AAAA",
            Expect::Aaaa(vec![t.ci_addr]),
        ),
        // What flyctl probes: the org's API address, here its ::3.
        (
            s("_api.internal"),
            "AAAA",
            Expect::Aaaa(vec![t.a.dns.parse().unwrap()]),
        ),
        // Case-insensitive, the question echoed as asked.
        (s("WEB.Internal"), "AAAA", Expect::Aaaa(started.clone())),
        // No-data vs NXDOMAIN.
        (s("web.internal"), "A", Expect::NoData),
        (s("web.internal"), "TXT", Expect::NoData),
        (s("nope.internal"), "AAAA", Expect::NxDomain),
        (s("w9.vm.web.internal"), "AAAA", Expect::NxDomain),
        // The other org's names don't exist in acme's view.
        (s("secret.internal"), "AAAA", Expect::NxDomain),
        (s("spy._peer.internal"), "AAAA", Expect::NxDomain),
        // Outside .internal: the upstream resolver's answer.
        (
            s("example.test"),
            "AAAA",
            Expect::Aaaa(vec![UPSTREAM_AAAA.parse().unwrap()]),
        ),
    ]
}

#[test]
fn every_name_over_udp_and_tcp_through_the_tunnel_org_scoped_and_fresh_within_100ms() {
    require_root!();
    require_tools!("ip", "wg", "wg-quick", "wireguard-go", "dig", "dnsmasq");
    let t = topo();
    assert_eq!(t.a.dns, "fdaa:0:1::3");
    assert_eq!(t.b.dns, "fdaa:0:2::3");

    // 1. Every name of the table, over UDP and TCP, from client A through
    // its tunnel at its DNS address.
    let table = names_table(&t);
    for tcp in [false, true] {
        for (name, rtype, want) in &table {
            let d = dig(&t.a.ns, &t.a.dns, name, rtype, tcp, 3);
            check(&d, name, rtype, tcp, want);
        }
    }
    eprintln!(
        "dns: {} names checked over UDP and TCP from {}",
        table.len(),
        t.a.addr
    );
    // The zone's SOA, its serial the store revision; the same SOA in the
    // AUTHORITY of NXDOMAIN and no-data.
    let serial_before = soa_serial(&t.a.ns, &t.a.dns);
    for (name, rtype, status) in [
        ("nope.internal", "AAAA", "NXDOMAIN"),
        ("web.internal", "A", "NOERROR"),
    ] {
        let d = dig(&t.a.ns, &t.a.dns, name, rtype, false, 3);
        if name == "nope.internal" {
            eprintln!("dns: {name} {rtype}:\n{}", d.raw);
        }
        assert_eq!(d.status.as_deref(), Some(status), "{}", d.raw);
        assert_eq!(
            d.authority,
            [(5, "SOA".to_owned(), soa_data(serial_before))],
            "{}",
            d.raw
        );
    }
    let d = dig(&t.a.ns, &t.a.dns, "internal.", "NS", true, 3);
    assert_eq!(
        d.answers,
        [("NS".to_owned(), "_api.internal.".to_owned())],
        "{}",
        d.raw
    );

    // The upstream's A record too, and an upstream NXDOMAIN relayed.
    let d = dig(&t.a.ns, &t.a.dns, "example.test", "A", false, 3);
    assert_eq!(
        d.answers,
        [("A".to_owned(), UPSTREAM_A.to_owned())],
        "{}",
        d.raw
    );
    let d = dig(&t.a.ns, &t.a.dns, "nope.example.test", "AAAA", true, 3);
    assert_eq!(d.status.as_deref(), Some("NXDOMAIN"), "{}", d.raw);

    // 2. Org B sees its own view only.
    let d = dig(&t.b.ns, &t.b.dns, "secret.internal", "AAAA", false, 3);
    assert_eq!(d.status.as_deref(), Some("NOERROR"), "{}", d.raw);
    assert_eq!(d.aaaa().len(), 1);
    let d = dig(&t.b.ns, &t.b.dns, "_peer.internal", "TXT", false, 3);
    assert_eq!(d.txt(), ["spy"], "{}", d.raw);
    let d = dig(&t.b.ns, &t.b.dns, "web.internal", "AAAA", false, 3);
    assert_eq!(d.status.as_deref(), Some("NXDOMAIN"), "{}", d.raw);

    // 3. The other org's ::3 is unreachable from A: its tunnel only routes
    // acme's /48, and even a route into the tunnel goes nowhere (no peer
    // allows that destination).
    for tcp in [false, true] {
        let d = dig(&t.a.ns, &t.b.dns, "secret.internal", "AAAA", tcp, 1);
        assert!(d.status.is_none(), "org B's DNS answered A:\n{}", d.raw);
    }
    t.a.ns
        .ip(&["-6", "route", "add", "fdaa:0:2::/48", "dev", &t.a.iface]);
    let d = dig(&t.a.ns, &t.b.dns, "secret.internal", "AAAA", false, 1);
    assert!(d.status.is_none(), "org B's DNS answered A:\n{}", d.raw);
    // A client that widens its own AllowedIPs does get a packet to B's
    // listener: it is REFUSED there, and nothing of B's leaks.
    let gw_key = common::wg_pubkey(&t.gw.private_key());
    t.a.ns.run_ok(&[
        "wg",
        "set",
        &t.a.iface,
        "peer",
        &gw_key,
        "allowed-ips",
        "fdaa:0:1::/48,fdaa:0:2::/48",
    ]);
    // (Once the nftables input chain admits only a peer's own org's ::3,
    // these time out instead: either way nothing of B's is answered.)
    for tcp in [false, true] {
        for name in ["secret.internal", "example.test"] {
            let d = dig(&t.a.ns, &t.b.dns, name, "AAAA", tcp, 2);
            if let Some(status) = &d.status {
                assert_eq!(status, "REFUSED", "{}", d.raw);
                assert!(d.answers.is_empty(), "{}", d.raw);
            }
            eprintln!(
                "dns: A (widened AllowedIPs) → B's ::3, {name} over {}: {}",
                if tcp { "TCP" } else { "UDP" },
                d.status.as_deref().unwrap_or("no answer")
            );
        }
    }

    // 4. A new instance is answerable within 100 ms of `instances add`
    // returning, measured by a poller in client A's namespace that asks
    // every millisecond through the tunnel.
    let server: SocketAddr = format!("[{}]:53", t.a.dns).parse().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let poller = {
        let ns = t.a.ns.name().to_owned();
        std::thread::spawn(move || {
            enter_netns(&ns);
            let sock = UdpSocket::bind("[::]:0").unwrap();
            sock.connect(server).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(2)))
                .unwrap();
            let q = aaaa_query(0x5151, "w5.vm.web.internal.");
            let mut buf = [0u8; 1500];
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut warm = false;
            while Instant::now() < deadline {
                sock.send(&q).unwrap();
                if let Ok(n) = sock.recv(&mut buf) {
                    let m = Message::from_vec(&buf[..n]).unwrap();
                    if !warm {
                        // The first answer (NXDOMAIN): the path is up.
                        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
                        warm = true;
                        ready_tx.send(()).unwrap();
                    } else if !m.answers.is_empty() {
                        return Some(Instant::now());
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            None
        })
    };
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the poller got no answer at all");
    let t0 = Instant::now();
    add_instance(
        &t.gw,
        &[
            "acme",
            "web",
            "lhr",
            "--host",
            "a7b:7d",
            "--machine",
            "0:a5",
            "--id",
            "w5",
        ],
    );
    let cli_done = Instant::now();
    let answered = poller.join().unwrap().expect("w5 never became answerable");
    let after_cli = answered.saturating_duration_since(cli_done);
    eprintln!(
        "dns: new instance answerable {:?} after `instances add` returned \
         ({:?} after it started; the CLI call took {:?})",
        after_cli,
        answered - t0,
        cli_done - t0
    );
    assert!(
        after_cli <= Duration::from_millis(100),
        "took {after_cli:?} after the write"
    );
    // And it shows in the names that list instances.
    let d = dig(&t.a.ns, &t.a.dns, "lhr.web.internal", "AAAA", false, 3);
    assert_eq!(d.answers.len(), 3, "{}", d.raw);
    // The change rebuilt acme's zone: a later revision, a larger serial.
    let serial_after = soa_serial(&t.a.ns, &t.a.dns);
    assert!(
        serial_after > serial_before,
        "{serial_before} → {serial_after}"
    );

    // A 3,000-byte query (EDNS padding) leaves the laptop in IPv6
    // fragments through the 1420-byte tunnel: the fragments after the
    // first reach ::3 too, and it is answered.
    let script = format!(
        "import socket, struct\n\
         pad = 2900\n\
         q = struct.pack('>HHHHHH', 0x5a5a, 0x0100, 1, 0, 0, 1)\n\
         q += bytes([3]) + b'web' + bytes([8]) + b'internal' + bytes([0]) + struct.pack('>HH', 28, 1)\n\
         q += bytes([0]) + struct.pack('>HHIH', 41, 1232, 0, 4 + pad) + struct.pack('>HH', 12, pad) + bytes(pad)\n\
         s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
         s.settimeout(3)\n\
         s.sendto(q, ('{}', 53))\n\
         r = s.recv(4096)\n\
         print(len(q), r[:2].hex(), r[3] & 15, struct.unpack('>H', r[6:8])[0])\n",
        t.a.dns
    );
    let out = t.a.ns.run(&["python3", "-c", &script]);
    let said = common::stdout_of(&out);
    let f: Vec<&str> = said.split_whitespace().collect();
    assert!(
        f.get(1..3) == Some(&["5a5a", "0"][..]) && f.get(3).is_some_and(|n| *n != "0"),
        "fragmented query ({} bytes) not answered: {said}{}",
        f.first().unwrap_or(&"?"),
        common::stderr_of(&out)
    );

    common::wg_quick(
        &t.a.ns,
        &t.script,
        &[
            "down",
            path(&t.dir.path().join(format!("{}.conf", t.a.iface))),
        ],
    );
    let _ = (&t.gw_ns, &t.b.iface);
}

#[test]
fn removing_the_last_peer_stops_the_listener_and_a_new_one_starts_it() {
    require_root!();
    require_tools!("ip", "wg", "wireguard-go", "dig");
    let gw_ns = Netns::new();
    let gw = Gateway::builder()
        .netns(&gw_ns)
        .listen_port(51820)
        .gateway_toml("backend = \"userspace\"")
        .extra_toml("[dns]\nupstream = [\"[::1]:1\"]")
        .start();
    gw.cli_ok(&["orgs", "create", "acme"]);
    // The gateway's own namespace asks from a source inside the org.
    gw_ns.ip(&[
        "-6",
        "addr",
        "add",
        "fdaa:0:1:ffff::1/128",
        "dev",
        "lo",
        "nodad",
    ]);
    let ask = |tcp: bool| {
        let mut args = vec![
            "dig",
            "@fdaa:0:1::3",
            "-b",
            "fdaa:0:1:ffff::1",
            "+time=1",
            "+tries=1",
            "_peer.internal",
            "TXT",
        ];
        if tcp {
            args.push("+tcp");
        }
        common::stdout_of(&gw_ns.run(&args))
    };
    let key = common::wg_pubkey(&common::wg_genkey());
    gw.cli_ok(&[
        "wireguard",
        "create",
        "acme",
        "lhr",
        "p1",
        "stdout",
        "--public-key",
        &key,
    ]);
    let up = common::wait_for(Duration::from_secs(3), || {
        ask(false).contains("\"p1\"").then_some(())
    });
    assert!(
        up.is_some(),
        "no listener after the first peer:\n{}",
        ask(false)
    );
    assert!(ask(true).contains("\"p1\""));

    gw.cli_ok(&["wireguard", "remove", "acme", "p1"]);
    let down = common::wait_for(Duration::from_secs(3), || {
        (!ask(false).contains("status:")).then_some(())
    });
    assert!(down.is_some(), "listener still answers:\n{}", ask(false));
    assert!(gw.log().contains("DNS listener stopped"), "{}", gw.log());

    let key = common::wg_pubkey(&common::wg_genkey());
    gw.cli_ok(&[
        "wireguard",
        "create",
        "acme",
        "lhr",
        "p2",
        "stdout",
        "--public-key",
        &key,
    ]);
    let back = common::wait_for(Duration::from_secs(3), || {
        ask(true).contains("\"p2\"").then_some(())
    });
    assert!(
        back.is_some(),
        "no listener after a new peer:\n{}",
        ask(true)
    );
    // Forwarding to an upstream that isn't there: SERVFAIL, not a hang.
    let out = common::stdout_of(&gw_ns.run(&[
        "dig",
        "@fdaa:0:1::3",
        "-b",
        "fdaa:0:1:ffff::1",
        "+time=5",
        "+tries=1",
        "example.test",
    ]));
    assert!(out.contains("status: SERVFAIL"), "{out}");
}
