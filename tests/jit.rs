//! Just-in-time peers through real tunnels (docs/architecture.md "Just-in-time
//! peers"): a gateway with `peers = "jit"` holds no peer until its
//! handshake, installs exactly the one that initiates, evicts it when idle
//! and installs it again on its next handshake; a restart keeps it.
//!
//! Here (wireguard-go, a kernel without nft's `queue`) initiations are
//! copied, so the client's own retry (about 5 s) completes the first
//! handshake; in the real-kernel VM (`SIXPN_TEST_BACKEND=kernel`) they are
//! held, so the first one completes and exactly one is sent. The flood test
//! runs here only: the VM emulates its CPU, too slowly for 10,000 packets a
//! second.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::{backend, scaled, wait_for, ClientConf, RunningTopology, Topology};

/// A table of the test's own that counts WireGuard handshake initiations
/// reaching the gateway, ahead of sixpn's capture.
const COUNTER: &str = "table inet sxcount {
  chain seen {
    type filter hook input priority -20; policy accept;
    udp dport 51820 udp length 156 @th,64,32 0x1000000 counter
  }
}";

fn initiations(t: &RunningTopology) -> u64 {
    let out = t
        .gw_ns
        .run_ok(&["nft", "list", "chain", "inet", "sxcount", "seen"]);
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {out}"))
}

fn gateway_peers(t: &RunningTopology) -> Vec<String> {
    t.gw_ns
        .run_ok(&["wg", "show", &t.gw.interface, "peers"])
        .lines()
        .map(str::to_owned)
        .collect()
}

fn metric(t: &RunningTopology, line_start: &str) -> Option<f64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = sixpn::api::client::Client::new(t.gw.api(), None).unwrap();
    let (_, body) = rt
        .block_on(client.raw(hyper::Method::GET, "/metrics", Vec::new()))
        .unwrap();
    String::from_utf8_lossy(&body)
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn held() -> bool {
    backend() == "kernel"
}

fn ping(t: &RunningTopology, client: &str, to: &str, wait_s: u32) -> bool {
    t.client(client)
        .ns
        .run(&["ping", "-6", "-c", "1", "-W", &wait_s.to_string(), to])
        .status
        .success()
}

#[test]
fn a_jit_gateway_installs_a_peer_on_its_first_handshake_evicts_it_idle_and_keeps_it_over_a_restart()
{
    require_root!();
    require_tools!("ip", "wg", "nft", "wireguard-go", "ping");
    let mut t = Topology::new()
        .gateway(|g| {
            g.gateway_toml("peers = \"jit\"")
                .gateway_toml("idle_evict = \"30s\"")
        })
        .org("acme")
        .instance("acme", "web")
        .start();
    common::run_with_input(t.gw_ns.cmd("nft").args(["-f", "-"]), COUNTER);
    let log = t.gw.log();
    let mode = if held() {
        "held until they are"
    } else {
        "copied"
    };
    assert!(
        log.contains(mode),
        "the start says how initiations are captured:\n{log}"
    );

    // A registered peer that never connected is not in the kernel.
    t.gw.cli_ok(&["wireguard", "create", "acme", "lhr", "idle-one", "stdout"]);
    assert!(gateway_peers(&t).is_empty(), "nothing installed at create");

    // The client's tunnel comes up (its keepalive initiates at once).
    let web = t.instance("acme", "web").addr.to_string();
    t.add_client("acme", "laptop", ClientConf::AsCreated);
    let t0 = Instant::now();
    let first = wait_for(scaled(Duration::from_secs(12)), || {
        ping(&t, "laptop", &web, 1).then_some(())
    });
    let took = t0.elapsed();
    assert!(
        first.is_some(),
        "no ping through the tunnel:\n{}",
        t.gw.log()
    );
    let sent = initiations(&t);
    eprintln!("first ping answered {took:?} after wg-quick up; {sent} initiation(s) sent");
    if held() {
        assert!(
            took < scaled(Duration::from_secs(2)),
            "held: answered in {took:?}"
        );
        assert_eq!(
            sent, 1,
            "held: the first initiation completes the handshake"
        );
    } else {
        assert!(
            took < scaled(Duration::from_secs(9)),
            "copied: answered in {took:?}"
        );
        assert!(sent >= 1);
    }
    let peers = gateway_peers(&t);
    assert_eq!(peers.len(), 1, "exactly the active peer: {peers:?}");
    assert_eq!(
        metric(&t, "sixpn_jit_initiations_total{outcome=\"installed\"}"),
        Some(1.0),
        "one install"
    );
    assert_eq!(metric(&t, "sixpn_peers_registered "), Some(2.0));
    assert_eq!(
        metric(&t, "sixpn_jit_installs_total{cause=\"handshake\"}"),
        Some(1.0)
    );
    assert_eq!(metric(&t, "sixpn_peers_installed "), Some(1.0));
    let status = t.gw.cli_ok(&["wireguard", "status", "acme", "laptop"]);
    assert!(status.contains("by handshake"), "{status}");
    let status = t.gw.cli_ok(&["wireguard", "status", "acme", "idle-one"]);
    assert!(status.contains("Registered"), "{status}");

    // A restart keeps the active peer: nothing removed, nothing re-added,
    // pings go on.
    t.gw.restart();
    assert_eq!(gateway_peers(&t), peers, "kept over the restart");
    assert!(ping(&t, "laptop", &web, 2), "pings flow after the restart");
    let log = t.gw.log();
    let after_restart = log.rsplit("WireGuard backend chosen").next().unwrap_or("");
    assert!(
        !after_restart.contains("peer removed"),
        "nothing removed at the restart:\n{after_restart}"
    );
    assert_eq!(
        metric(&t, "sixpn_jit_initiations_total{outcome=\"installed\"}"),
        Some(0.0),
        "nothing re-installed"
    );
    assert_eq!(
        metric(&t, "sixpn_jit_installs_total{cause=\"start\"}"),
        Some(1.0),
        "kept at the start"
    );

    // The laptop closes: nothing received (not even its keepalives, every
    // 15 s) for idle_evict, it leaves the kernel (not the store) with its
    // route.
    let client = t.client("laptop");
    common::wg_quick(
        &client.ns,
        &t.script,
        &["down", client.conf.to_str().unwrap()],
    );
    let evicted = wait_for(scaled(Duration::from_secs(60)), || {
        gateway_peers(&t).is_empty().then_some(())
    });
    assert!(evicted.is_some(), "not evicted:\n{}", t.gw.log());
    assert_eq!(metric(&t, "sixpn_jit_evictions_total "), Some(1.0));
    let status = t.gw.cli_ok(&["wireguard", "status", "acme", "laptop"]);
    assert!(status.contains("evicted"), "{status}");
    let routes = t
        .gw_ns
        .run_ok(&["ip", "-6", "route", "show", "dev", &t.gw.interface]);
    assert!(!routes.contains("/120"), "its route went with it: {routes}");

    // It opens again: the next handshake installs it again.
    let client = t.client("laptop");
    common::wg_quick(
        &client.ns,
        &t.script,
        &["up", client.conf.to_str().unwrap()],
    );
    let back = wait_for(scaled(Duration::from_secs(15)), || {
        ping(&t, "laptop", &web, 1).then_some(())
    });
    assert!(back.is_some(), "not installed again:\n{}", t.gw.log());
    assert_eq!(gateway_peers(&t).len(), 1);
}

/// CPU seconds (user + system) process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn a_flood_of_initiations_from_strangers_installs_nothing_and_the_known_peer_keeps_its_pings() {
    require_root!();
    require_tools!("ip", "wg", "nft", "wireguard-go", "ping");
    use sixpn::jit::noise;
    use sixpn::model::PrivateKey;

    let t = Topology::new()
        .gateway(|g| g.gateway_toml("peers = \"jit\""))
        .org("acme")
        .instance("acme", "web")
        .client("acme", "laptop")
        .start();
    let web = t.instance("acme", "web").addr.to_string();
    let up = wait_for(scaled(Duration::from_secs(12)), || {
        ping(&t, "laptop", &web, 1).then_some(())
    });
    assert!(
        up.is_some(),
        "the known peer's tunnel is up:\n{}",
        t.gw.log()
    );

    // Well-formed initiations from 256 made-up keys, mac1 valid for the
    // gateway (so each reaches the Diffie-Hellman step), sent from 256
    // source addresses on the laptop's link.
    let gateway_key: PrivateKey = t.gw.private_key().parse().unwrap();
    let gateway_pub = gateway_key.public_key();
    let messages: Vec<[u8; 148]> = (0..256u32)
        .map(|i| {
            let stranger = PrivateKey::generate();
            let ephemeral: [u8; 32] = rand::random();
            noise::initiation(&stranger, &gateway_pub, &ephemeral, i, [0; 12])
        })
        .collect();
    let laptop = &t.client("laptop").ns;
    let link = laptop.run_ok(&[
        "ip", "-6", "-o", "addr", "show", "dev", "to-gw", "scope", "global",
    ]);
    let own = link
        .split_whitespace()
        .find(|w| w.starts_with("fd53:"))
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no link address in {link}"))
        .to_owned();
    let prefix = own.trim_end_matches("::2").to_owned();
    let batch: String = (0..256)
        .map(|i| format!("addr add {prefix}::1:{i:x}/64 dev to-gw nodad\n"))
        .collect();
    common::run_with_input(laptop.cmd("ip").args(["-batch", "-"]), &batch);

    let pid = t.gw.pid().unwrap();
    let cpu0 = cpu_seconds(pid);
    let ns = laptop.name().to_owned();
    let sources: Vec<String> = (0..256).map(|i| format!("{prefix}::1:{i:x}")).collect();
    let flood = std::thread::spawn(move || {
        common::enter_netns(&ns);
        let socks: Vec<std::net::UdpSocket> = sources
            .iter()
            .map(|a| std::net::UdpSocket::bind(format!("[{a}]:0")).unwrap())
            .collect();
        let to: std::net::SocketAddr = "[fd53:1::1]:51820".parse().unwrap();
        let start = Instant::now();
        let mut sent = 0u64;
        // 10,000 a second for 10 s, in bursts of 100 every 10 ms.
        while start.elapsed() < Duration::from_secs(10) {
            let due = (start.elapsed().as_secs_f64() * 10_000.0) as u64;
            while sent < due {
                let i = sent as usize;
                let _ = socks[i % socks.len()].send_to(&messages[i % messages.len()], to);
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        sent
    });
    let pings = t
        .client("laptop")
        .ns
        .run(&["ping", "-6", "-c", "100", "-i", "0.1", "-W", "1", &web]);
    let sent = flood.join().unwrap();
    let cpu = cpu_seconds(pid) - cpu0;
    let out = String::from_utf8_lossy(&pings.stdout).into_owned();
    let loss: f64 = out
        .split(',')
        .find(|f| f.contains("packet loss"))
        .and_then(|f| f.trim().split('%').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no loss figure in {out}"));
    let outcome = |o: &str| {
        metric(
            &t,
            &format!("sixpn_jit_initiations_total{{outcome=\"{o}\"}}"),
        )
        .unwrap_or(0.0)
    };
    eprintln!(
        "flood: {sent} initiations in 10 s; the daemon used {cpu:.2} CPU-seconds ({:.0}% of a core); \
         known peer's ping loss {loss}%; outcomes: installed {} unknown {} invalid {} limited {} \
         unjudged {}; capture overflows {}",
        cpu * 10.0,
        outcome("installed"),
        outcome("unknown"),
        outcome("invalid"),
        outcome("limited"),
        outcome("unjudged"),
        metric(&t, "sixpn_jit_capture_overflows_total ").unwrap_or(0.0),
    );
    assert!(sent >= 90_000, "the generator kept up: {sent}");
    assert!(
        loss <= 1.0,
        "the known peer lost {loss}% of its pings:\n{out}"
    );
    assert_eq!(gateway_peers(&t).len(), 1, "no stranger installed");
    assert_eq!(
        outcome("installed"),
        1.0,
        "only the known peer was ever installed"
    );
    assert!(outcome("unknown") + outcome("limited") + outcome("unjudged") > 0.0);
    // The expensive step is bounded whatever the flood: at most the
    // Diffie-Hellman budget (2,000 a second, a burst of as many) reach it.
    let judged = outcome("unknown") + outcome("installed") + outcome("invalid");
    assert!(
        judged <= 2_000.0 * 11.0 + 300.0,
        "{judged} initiations reached the Diffie-Hellman step in 10 s"
    );
}
