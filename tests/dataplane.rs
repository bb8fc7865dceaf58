//! The kernel dataplane through real tunnels (docs/architecture.md "Test tiers", tier 2; tier 3 runs
//! the same file under a real kernel with `SIXPN_TEST_BACKEND=kernel`).
//!
//! Topology, each a network namespace:
//!
//! ```text
//!  client ── veth fd53:1::/64 ── gateway ── veth fd53:2::/64 ── instance host
//!  (wg-quick up on the file        (sixpn gateway)                (an instance address
//!   `sixpn wireguard create` wrote)                                 routed behind the gateway)
//! ```

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{backend, scaled, wait_for, Gateway, Netns, RunningTopology, Topology};

struct Topo {
    gw: Gateway,
    client: Netns,
    inst: Netns,
    gw_ns: Netns,
    dir: tempfile::TempDir,
    script: PathBuf,
    conf: PathBuf,
    client_iface: String,
    dns: String,
    inst_addr: String,
    peer_addr: String,
    peer_net: String,
    peer_key: String,
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Gateway, client and instance host, org `acme` with instance `web` and the
/// client's tunnel up.
fn topo() -> Topo {
    let RunningTopology {
        gw,
        gw_ns,
        mut instances,
        mut clients,
        dir,
        script,
        ..
    } = Topology::new()
        .org("acme")
        .client("acme", "laptop")
        .instance("acme", "web")
        .start();
    let inst = instances.remove(0);
    let inst_addr = inst.addr.to_string();
    assert!(inst_addr.starts_with("fdaa:0:1:a7b:7d:"), "{inst_addr}");
    let client = clients.remove(0);
    let err = &client.create_stderr;
    assert!(
        !err.contains("has not installed"),
        "create returned before the peer was installed: {err}"
    );
    let peers = gw.cli_json(&["wireguard", "list", "acme"]);
    let p = &peers[0];
    let dns = p["dns"].as_str().unwrap().to_owned();
    let peer_addr = p["address"].as_str().unwrap().to_owned();
    let peer_net = p["network"].as_str().unwrap().to_owned();
    let peer_key = p["public_key"].as_str().unwrap().to_owned();
    Topo {
        gw,
        client: client.ns,
        inst: inst.ns,
        gw_ns,
        dir,
        script,
        conf: client.conf,
        client_iface: client.iface,
        dns,
        inst_addr,
        peer_addr,
        peer_net,
        peer_key,
    }
}

impl Topo {
    fn iface(&self) -> &str {
        &self.gw.interface
    }

    fn wg_show(&self) -> String {
        self.gw_ns.run_ok(&["wg", "show", self.iface()])
    }

    /// `ping -c N` from the client; true if all N came back in time.
    fn ping(&self, addr: &str, count: u32, deadline: u32) -> bool {
        self.client
            .run(&[
                "ping",
                "-6",
                "-n",
                "-q",
                "-c",
                &count.to_string(),
                "-i",
                "0.2",
                "-w",
                &deadline.to_string(),
                addr,
            ])
            .status
            .success()
    }

    fn our_routes(&self) -> String {
        self.gw_ns
            .ip(&["-6", "route", "show", "dev", self.iface(), "proto", "110"])
    }

    fn addresses(&self) -> String {
        self.gw_ns.ip(&["-6", "addr", "show", "dev", self.iface()])
    }

    /// `wg show IFACE DUMP-FIELD` for our peer.
    fn peer_field(&self, field: &str) -> Option<String> {
        let out = self.gw_ns.run_ok(&["wg", "show", self.iface(), field]);
        out.lines()
            .find(|l| l.starts_with(&self.peer_key))
            .map(|l| l[self.peer_key.len()..].trim().to_owned())
    }
}

/// Polls `f` every 10 ms up to `limit`; returns how long it took.
fn within(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    wait_for(limit, || f().then_some(())).map(|_| t0.elapsed())
}

#[test]
fn peer_is_live_through_a_real_tunnel_and_removal_takes_it_down() {
    require_root!();
    require_tools!("ip", "wg", "wg-quick", "wireguard-go", "ping");
    let t = topo();

    // Installed within the create call: no waiting here.
    let show = t.wg_show();
    assert!(show.contains(&format!("peer: {}", t.peer_key)), "{show}");
    assert!(
        show.contains(&format!("allowed ips: {}", t.peer_net)),
        "{show}"
    );
    assert!(t.our_routes().contains(&t.peer_net), "{}", t.our_routes());
    assert!(
        t.addresses().contains(&format!("{}/128", t.dns)),
        "{}",
        t.addresses()
    );
    let link = t.gw_ns.ip(&["-d", "link", "show", t.iface()]);
    assert!(link.contains("mtu 1420") && link.contains("UP"), "{link}");
    if backend() == "kernel" {
        // The real-kernel run: the module's link, not a TUN device.
        assert!(
            link.contains("wireguard"),
            "not a kernel wireguard link:\n{link}"
        );
    } else {
        assert!(
            link.contains("tun"),
            "not wireguard-go's TUN device:\n{link}"
        );
    }
    let fwd = t
        .gw_ns
        .run_ok(&["sysctl", "-n", "net.ipv6.conf.all.forwarding"]);
    assert_eq!(fwd.trim(), "1", "the gateway turns IPv6 forwarding on");

    assert!(t.ping(&t.dns, 3, 10), "client can't reach {}", t.dns);
    assert!(
        t.ping(&t.inst_addr, 3, 10),
        "client can't reach the instance {}",
        t.inst_addr
    );
    // The instance sees the peer's own address, not the gateway's.
    let back = t.inst.run(&[
        "ping",
        "-6",
        "-c",
        "1",
        "-w",
        "5",
        "-I",
        &t.inst_addr,
        &t.peer_addr,
    ]);
    assert!(back.status.success(), "instance can't reach the peer");

    // `sixpn doctor` on the gateway host agrees.
    let mut doctor = t.gw_ns.cmd(env!("CARGO_BIN_EXE_sixpn"));
    doctor.args(["doctor", "--config", path(&t.gw.config_path)]);
    let out = common::run(&mut doctor);
    let text = common::stdout_of(&out);
    assert!(
        out.status.success(),
        "doctor failed:\n{text}{}",
        common::stderr_of(&out)
    );
    for want in [
        "[ok  ] API",
        "1 of 1 peers installed",
        "[ok  ] DNS addresses",
        "[ok  ] IPv6 forwarding",
        "[ok  ] isolation",
        "[ok  ] isolation guard",
    ] {
        assert!(text.contains(want), "doctor lacks {want:?}:\n{text}");
    }

    let status = t.gw.cli_json(&["wireguard", "status", "acme", "laptop"]);
    assert!(status["latest_handshake"].as_u64().is_some(), "{status}");
    assert!(status["rx_bytes"].as_u64().unwrap() > 0, "{status}");
    assert!(status["endpoint"].as_str().unwrap().contains("fd53:1::2"));
    assert_eq!(status["peer"]["state"], "installed");

    t.gw.cli_ok(&["wireguard", "remove", "acme", "laptop"]);
    let took = within(scaled(Duration::from_secs(1)), || {
        !t.wg_show().contains(&t.peer_key) && !t.our_routes().contains(&t.peer_net)
    });
    assert!(
        took.is_some(),
        "peer or route still there:\n{}\n{}",
        t.wg_show(),
        t.our_routes()
    );
    // The org has no peers here any more: its ::3 goes too.
    assert!(!t.addresses().contains(&format!("{}/128", t.dns)));
    assert!(
        !t.ping(&t.inst_addr, 2, 3),
        "ping still passes after remove"
    );
    common::wg_quick(&t.client, &t.script, &["down", path(&t.conf)]);
    let _ = (&t.dir, &t.client_iface);
}

#[test]
fn kill_9_and_restart_disturbs_no_session() {
    require_root!();
    require_tools!("ip", "wg", "wg-quick", "wireguard-go", "ping");
    let mut t = topo();
    assert!(t.ping(&t.inst_addr, 2, 10), "tunnel not up");
    let handshake = t.peer_field("latest-handshakes").unwrap();
    let rx_before: u64 = t
        .peer_field("transfer")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();

    // 250 pings 20 ms apart; kill -9 the daemon a second in and restart it.
    let mut ping = t.client.cmd("ping");
    ping.args(["-6", "-n", "-q", "-c", "250", "-i", "0.02", &t.inst_addr])
        .stdout(std::process::Stdio::piped());
    let ping = ping.spawn().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let pid = t.gw.pid().unwrap();
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    t.gw.restart();
    let out = ping.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary: {text}"));
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(2)
        .map(|s| s.parse().unwrap())
        .collect();
    let (sent, got) = (nums[0], nums[1]);
    let loss = (sent - got) as f64 / sent as f64;
    eprintln!(
        "restart under load: {got}/{sent} pings answered ({:.1}% loss)",
        loss * 100.0
    );
    assert!(
        loss <= 0.01,
        "lost {:.1}% across a restart: {line}",
        loss * 100.0
    );

    // Same session: the handshake was not redone and counters kept going.
    let after = t.peer_field("latest-handshakes").unwrap();
    assert_eq!(after, handshake, "the peer was re-added (new handshake)");
    let rx_after: u64 = t
        .peer_field("transfer")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        rx_after > rx_before,
        "counters reset: {rx_before} -> {rx_after}"
    );
    assert!(
        !t.gw.log().contains("peer removed"),
        "the restarted daemon removed a peer:\n{}",
        t.gw.log()
    );
}

#[test]
fn drift_is_repaired_and_foreign_state_left_alone() {
    require_root!();
    require_tools!("ip", "wg", "wg-quick", "wireguard-go", "ping");
    let t = topo();
    let iface = t.iface().to_owned();

    // Someone else's peer and route on our interface: not ours to remove.
    let foreign_key = common::wg_pubkey(&common::wg_genkey());
    t.gw_ns.run_ok(&[
        "wg",
        "set",
        &iface,
        "peer",
        &foreign_key,
        "allowed-ips",
        "10.77.0.0/24",
    ]);
    t.gw_ns.ip(&[
        "-6",
        "route",
        "add",
        "2001:db8:77::/64",
        "dev",
        &iface,
        "proto",
        "static",
    ]);

    let mut report = Vec::new();
    // 1. Our route deleted by hand.
    t.gw_ns.ip(&[
        "-6",
        "route",
        "del",
        &t.peer_net,
        "dev",
        &iface,
        "proto",
        "110",
    ]);
    let took = within(scaled(Duration::from_secs(3)), || {
        t.our_routes().contains(&t.peer_net)
    })
    .expect("route not restored");
    report.push(format!("route deleted by hand: restored in {took:?}"));
    assert!(
        took <= scaled(Duration::from_secs(1)),
        "route took {took:?}"
    );

    // 2. Our ::3 deleted by hand.
    let dns128 = format!("{}/128", t.dns);
    t.gw_ns.ip(&["-6", "addr", "del", &dns128, "dev", &iface]);
    let took = within(scaled(Duration::from_secs(3)), || {
        t.addresses().contains(&dns128)
    })
    .expect("address not restored");
    report.push(format!("::3 deleted by hand: restored in {took:?}"));
    assert!(
        took <= scaled(Duration::from_secs(1)),
        "address took {took:?}"
    );
    // The session never broke.
    assert!(t.ping(&t.dns, 2, 10));

    // 3. Our peer removed by hand. Its session is gone with it (WireGuard
    // keeps keys per peer), so the client re-handshakes on its own timer;
    // what we check is that the peer is back within the second.
    t.gw_ns
        .run_ok(&["wg", "set", &iface, "peer", &t.peer_key, "remove"]);
    let took = within(scaled(Duration::from_secs(3)), || {
        t.wg_show().contains(&t.peer_key)
    })
    .expect("peer not restored");
    report.push(format!("peer removed by hand: restored in {took:?}"));
    assert!(
        took <= scaled(Duration::from_millis(1500)),
        "peer took {took:?}"
    );

    for r in &report {
        eprintln!("drift: {r}");
    }
    // The foreign state is still there after several resyncs.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(t.wg_show().contains(&foreign_key), "foreign peer removed");
    let routes = t.gw_ns.ip(&["-6", "route", "show", "dev", &iface]);
    assert!(
        routes.contains("2001:db8:77::/64"),
        "foreign route removed:\n{routes}"
    );
}

#[test]
fn a_foreign_route_to_a_peer_net_is_left_alone_and_reported() {
    require_root!();
    require_tools!("ip", "wg", "wireguard-go");
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    let gw_ns = Netns::new();
    let mut gw = Gateway::builder()
        .netns(&gw_ns)
        .endpoint("[fd53:1::1]:51820")
        .listen_port(51820)
        .gateway_toml(&format!("backend = \"{}\"", backend()))
        .env("NOTIFY_SOCKET", notify_path.to_str().unwrap())
        .start();
    let iface = gw.interface.clone();
    gw.cli_ok(&["orgs", "create", "acme"]);
    let mut seen = Vec::new();
    let ready = |seen: &mut Vec<String>, within| {
        common::await_notify(&notify, "READY=1", scaled(within), seen)
    };
    assert!(ready(&mut seen, Duration::from_secs(10)), "{seen:?}");
    let conf = |name: &str| dir.path().join(format!("{name}.conf"));
    // Creates a peer; returns its /120 and whether create saw it installed.
    let create = |name: &str| {
        let out = gw.cli(&[
            "wireguard",
            "create",
            "acme",
            "lhr",
            name,
            path(&conf(name)),
        ]);
        assert!(out.status.success(), "{}", common::stderr_of(&out));
        let status = gw.cli_json(&["wireguard", "status", "acme", name]);
        let net = status["peer"]["network"].as_str().unwrap().to_owned();
        let pending = common::stderr_of(&out).contains("has not installed");
        (
            net,
            pending,
            status["peer"]["state"].as_str().unwrap().to_owned(),
        )
    };
    let our_routes = || gw_ns.ip(&["-6", "route", "show", "dev", &iface, "proto", "110"]);

    // The /120 the next peer will get: the lowest free slot, freed again.
    let (net, _, _) = create("first");
    gw.cli_ok(&["wireguard", "remove", "acme", "first"]);
    wait_for(scaled(Duration::from_secs(3)), || {
        (!our_routes().contains(&net)).then_some(())
    })
    .expect("first peer's route not removed");
    // An operator's route to it, at the default metric like ours.
    gw_ns.ip(&["-6", "route", "add", &net, "dev", "lo", "proto", "static"]);
    let foreign = || gw_ns.ip(&["-6", "route", "show", "table", "all", &net]);
    let before = foreign();
    assert!(before.contains("dev lo proto static"), "{before}");

    let (blocked_net, pending, state) = create("blocked");
    assert_eq!(blocked_net, net, "slot not reused; the test's premise");
    assert!(
        pending,
        "create reported a peer whose route is someone else's as installed"
    );
    assert_eq!(state, "pending");
    // Retried (backoff) without ever touching it.
    std::thread::sleep(scaled(Duration::from_secs(2)));
    assert_eq!(foreign(), before, "the foreign route changed");
    assert!(!our_routes().contains(&net), "{}", our_routes());
    let log = gw.log();
    assert!(
        log.contains(&format!("{net} not owned by sixpn"))
            && log.contains("peer blocked of org acme"),
        "the conflict is not reported:\n{log}"
    );

    // The daemon lives on and installs the next peer as usual.
    assert!(common::health(&gw.socket), "daemon not answering");
    let (next_net, pending, state) = create("next");
    assert_ne!(next_net, net);
    assert!(!pending, "the next peer was not installed in time");
    assert_eq!(state, "installed");
    assert!(our_routes().contains(&next_net), "{}", our_routes());
    let show = gw_ns.run_ok(&["wg", "show", &iface, "allowed-ips"]);
    assert!(show.contains(&next_net), "{show}");
    assert_eq!(foreign(), before, "the foreign route changed");

    // A restart with the route still in the way: the gateway reports ready
    // (naming what is missing) instead of never, which under systemd would
    // mean a restart every TimeoutStartSec for one peer.
    gw.restart();
    seen.clear();
    assert!(
        ready(&mut seen, Duration::from_secs(15)),
        "no READY=1 with one peer blocked: {seen:?}\n{}",
        gw.log()
    );
    assert!(
        seen.iter().any(|m| m.contains("1 peers not installed")),
        "{seen:?}"
    );
    assert_eq!(foreign(), before, "the foreign route changed");

    // Once the operator's route goes, the blocked peer gets ours.
    gw_ns.ip(&["-6", "route", "del", &net, "dev", "lo", "proto", "static"]);
    wait_for(scaled(Duration::from_secs(8)), || {
        our_routes().contains(&net).then_some(())
    })
    .expect("blocked peer's route not added after the foreign one went");
}
