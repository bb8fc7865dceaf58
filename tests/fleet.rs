//! A fleet: two gateways in two regions sharing a 3-member etcd cluster.
//! Root; namespaces; real `etcd`, `wireguard-go`, `wg`.
//!
//! Topology, each a network namespace:
//!
//! ```text
//!              store (3 etcd members, clients on [fd53:e::1]:port,
//!                     peers on [::1] inside the namespace)
//!                br0 fd53:e::1/64
//!               /                \
//!   veth fd53:e::2/64         veth fd53:e::3/64
//!   iad (gateway iad-1,       lhr (gateway lhr-1,
//!        host a7b:1)               host a7b:2)
//! ```
//!
//! etcd can't listen on the host's loopback for this: a gateway's namespace
//! can't reach it. So the members live in their own namespace, bridged to
//! each gateway's.
//!
//! The ignored `bench_write_to_wg_show_on_the_other_gateway` and
//! `bench_write_to_dns_answer_on_the_other_gateway` print the figures for
//! the closing note (`scripts/bench-fleet.sh`): a write on iad until lhr's
//! WireGuard has the peer, and until lhr's DNS answers the new instance.

#[macro_use]
mod common;

use std::net::{Ipv6Addr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{aaaa_query, enter_netns, veth, wait_for, Gateway, Netns};
use hickory_proto::op::Message;
use sixpn::api::client::Client;
use sixpn::api::{AddInstance, CreatePeer, PeerState};
use sixpn::model::{MachineId, OrgName, PrivateKey};

/// One etcd member in the store namespace.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A 3-member cluster in its own namespace; every member killed on drop
/// (and the namespace's processes with it).
struct Cluster {
    members: Vec<Member>,
    dir: tempfile::TempDir,
    ns: Netns,
    /// Clients over TLS with client certificates (`Cluster::start_tls`).
    tls: bool,
}

const STORE_ADDR: &str = "fd53:e::1";

/// Org `acme` is network 1, `fdaa:0:1::/48`: its DNS server, and the probe
/// host's address ([`Fleet::probe`]).
const ACME_DNS: &str = "fdaa:0:1::3";
const PROBE_ADDR: &str = "fdaa:0:1::99";

impl Cluster {
    fn start() -> Self {
        Self::start_with(false)
    }

    /// Members that serve clients only over TLS and require a client
    /// certificate signed by the cluster's CA (`--client-cert-auth`).
    fn start_tls() -> Self {
        Self::start_with(true)
    }

    /// The TLS files in the cluster's directory: `ca.pem`, `member.*`,
    /// `client.*` (from the cluster's CA) and `stranger.*` (another CA's).
    fn tls_file(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    /// `[store]` lines for a client with `cert` (`client` or `stranger`).
    fn tls_toml(&self, cert: &str) -> String {
        format!(
            "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
            self.tls_file("ca.pem"),
            self.tls_file(&format!("{cert}.pem")),
            self.tls_file(&format!("{cert}.key"))
        )
    }

    fn start_with(tls: bool) -> Self {
        let ns = Netns::new();
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.add_addr("br0", &format!("{STORE_ADDR}/64"));
        ns.ip(&["link", "set", "br0", "up"]);
        // Ports are per namespace: fixed ones can't clash with the host's.
        let members: Vec<Member> = (0..3)
            .map(|i| Member {
                name: format!("e{i}"),
                client_port: 23790 + i,
                peer_port: 23800 + i,
                child: None,
            })
            .collect();
        let mut c = Self {
            members,
            dir: tempfile::tempdir().unwrap(),
            ns,
            tls,
        };
        if tls {
            let d = c.dir.path().to_owned();
            use sixpn::testkit::certs::{make_ca, make_leaf};
            make_ca(&d, "ca");
            make_leaf(&d, "ca", "member", STORE_ADDR);
            make_leaf(&d, "ca", "client", STORE_ADDR);
            make_ca(&d, "other-ca");
            make_leaf(&d, "other-ca", "stranger", STORE_ADDR);
        }
        for i in 0..3 {
            c.start_member(i);
        }
        for i in 0..3 {
            c.wait_healthy(i);
        }
        c
    }

    fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}://[{STORE_ADDR}]:{}", self.scheme(), m.client_port))
            .collect()
    }

    fn endpoints_toml(&self) -> String {
        let list: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        format!("endpoints = [{}]", list.join(", "))
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("e{i}.log"))
    }

    fn start_member(&mut self, i: usize) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://[::1]:{}", m.name, m.peer_port))
            .collect();
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .unwrap();
        let mut cmd = self.ns.cmd("etcd");
        let scheme = self.scheme();
        cmd.args(["--name", &m.name, "--data-dir"])
            .arg(self.dir.path().join(&m.name))
            .arg(format!(
                "--listen-client-urls={scheme}://[{STORE_ADDR}]:{}",
                m.client_port
            ))
            .arg(format!(
                "--advertise-client-urls={scheme}://[{STORE_ADDR}]:{}",
                m.client_port
            ))
            .arg(format!("--listen-peer-urls=http://[::1]:{}", m.peer_port))
            .arg(format!(
                "--initial-advertise-peer-urls=http://[::1]:{}",
                m.peer_port
            ))
            .arg(format!("--initial-cluster={}", initial.join(",")))
            .args(["--initial-cluster-token", "sixpn-fleet-test"]);
        if self.tls {
            cmd.arg(format!("--cert-file={}", self.tls_file("member.pem")))
                .arg(format!("--key-file={}", self.tls_file("member.key")))
                .arg(format!("--trusted-ca-file={}", self.tls_file("ca.pem")))
                .arg("--client-cert-auth");
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let child = cmd.spawn().expect("start etcd");
        self.members[i].child = Some(child);
    }

    fn wait_healthy(&self, i: usize) {
        let url = format!(
            "{}://[{STORE_ADDR}]:{}/health",
            self.scheme(),
            self.members[i].client_port
        );
        let (ca, cert, key) = (
            self.tls_file("ca.pem"),
            self.tls_file("client.pem"),
            self.tls_file("client.key"),
        );
        let mut curl = vec!["curl", "-fsS", "-m", "1"];
        if self.tls {
            curl.extend(["--cacert", &ca, "--cert", &cert, "--key", &key]);
        }
        curl.push(&url);
        let ok = wait_for(Duration::from_secs(30), || {
            let out = self.ns.run(&curl);
            common::stdout_of(&out)
                .contains("\"health\":\"true\"")
                .then_some(())
        });
        assert!(
            ok.is_some(),
            "etcd member {i} not healthy; log:\n{}",
            std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
        );
    }

    fn stop_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            common::terminate(&mut c, Duration::from_secs(3));
        }
    }

    /// Joins `gw_ns` to the store's bridge with address `addr`.
    fn join(&self, gw_ns: &Netns, port: &str, addr: &str) {
        veth(
            gw_ns,
            "to-store",
            &[&format!("{addr}/64")],
            &self.ns,
            port,
            &[],
        );
        self.ns.ip(&["link", "set", port, "master", "br0"]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.stop_member(i);
        }
    }
}

struct Fleet {
    iad: Gateway,
    lhr: Gateway,
    iad_ns: Netns,
    lhr_ns: Netns,
    cluster: Cluster,
    dir: tempfile::TempDir,
}

/// The address lhr's tunnel clients dial it on (see [`Fleet::tunnel`]).
const LHR_ENDPOINT: &str = "fd53:c1::1";

fn gateway(ns: &Netns, cluster: &Cluster, name: &str, region: &str, host: &str) -> Gateway {
    let tls = if cluster.tls {
        cluster.tls_toml("client")
    } else {
        String::new()
    };
    Gateway::builder()
        .netns(ns)
        .name(name)
        .region(region)
        .host_id(host)
        .listen_port(51820)
        .endpoint(&format!("[{LHR_ENDPOINT}]:51820"))
        .gateway_toml("backend = \"userspace\"")
        .store_toml("kind = \"etcd\"")
        .store_toml(&cluster.endpoints_toml())
        .store_toml("prefix = \"/sixpn-fleet/\"")
        .store_toml(&tls)
        .start()
}

fn fleet() -> Fleet {
    fleet_on(Cluster::start())
}

/// The benches' fleet: over TLS with client certificates when
/// `SIXPN_BENCH_TLS` is set (`scripts/bench-fleet.sh tls`).
fn bench_fleet() -> Fleet {
    if std::env::var_os("SIXPN_BENCH_TLS").is_some() {
        fleet_on(Cluster::start_tls())
    } else {
        fleet()
    }
}

fn fleet_on(cluster: Cluster) -> Fleet {
    let iad_ns = Netns::new();
    let lhr_ns = Netns::new();
    cluster.join(&iad_ns, "v-iad", "fd53:e::2");
    cluster.join(&lhr_ns, "v-lhr", "fd53:e::3");
    let iad = gateway(&iad_ns, &cluster, "iad-1", "iad", "a7b:1");
    let lhr = gateway(&lhr_ns, &cluster, "lhr-1", "lhr", "a7b:2");
    iad.cli_ok(&["orgs", "create", "acme"]);
    Fleet {
        iad,
        lhr,
        iad_ns,
        lhr_ns,
        cluster,
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Fleet {
    fn wg_peers(&self, gw: &Gateway) -> String {
        let ns = if gw.name == "iad-1" {
            &self.iad_ns
        } else {
            &self.lhr_ns
        };
        ns.run_ok(&["wg", "show", &gw.interface, "peers"])
    }

    /// `wireguard create acme REGION NAME` through `gw`; the public key.
    fn create(&self, gw: &Gateway, region: &str, name: &str) -> std::process::Output {
        let file = self.dir.path().join(format!("{name}.conf"));
        gw.cli(&[
            "wireguard",
            "create",
            "acme",
            region,
            name,
            file.to_str().unwrap(),
        ])
    }

    fn key_of(&self, gw: &Gateway, name: &str) -> String {
        let peers = gw.cli_json(&["wireguard", "list", "acme"]);
        peers
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in {}'s list: {peers}", gw.name))["public_key"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn live_on(&self, gw: &Gateway, key: &str, within: Duration) -> bool {
        wait_for(within, || self.wg_peers(gw).contains(key).then_some(())).is_some()
    }

    /// A laptop on the Internet side of lhr with the tunnel of peer `name`
    /// (created into lhr's region through [`Fleet::create`]) up.
    fn tunnel(&self, name: &str) -> Netns {
        let laptop = Netns::new();
        veth(
            &self.lhr_ns,
            "to-cli",
            &[&format!("{LHR_ENDPOINT}/64")],
            &laptop,
            "to-gw",
            &["fd53:c1::2/64"],
        );
        let conf = self.dir.path().join(format!("{name}.conf"));
        common::strip_dns_line(&conf);
        let script = common::wg_quick_userspace_script(self.dir.path());
        common::wg_quick(&laptop, &script, &["up", conf.to_str().unwrap()]);
        laptop
    }

    /// A probe host routed to lhr like an instance host: a namespace with
    /// [`PROBE_ADDR`] (in acme's /48) on its loopback and a veth to lhr, so
    /// it can ask lhr's DNS at [`ACME_DNS`].
    fn probe(&self) -> Netns {
        let probe = Netns::new();
        veth(
            &self.lhr_ns,
            "to-probe",
            &["fd53:77::1/64"],
            &probe,
            "to-gw",
            &["fd53:77::2/64"],
        );
        let host = format!("{PROBE_ADDR}/128");
        probe.ip(&["-6", "addr", "add", &host, "dev", "lo"]);
        probe.ip(&["-6", "route", "add", "fdaa::/16", "via", "fd53:77::1"]);
        self.lhr_ns
            .ip(&["-6", "route", "add", &host, "via", "fd53:77::2"]);
        probe
    }
}

#[test]
fn a_fleet_over_tls_with_client_certificates() {
    require_root!();
    require_tools!("ip", "wg", "wireguard-go", "etcd", "curl", "openssl");
    let f = fleet_on(Cluster::start_tls());

    // As over plaintext: created through iad for lhr, live on lhr when the
    // create returns.
    let out = f.create(&f.iad, "lhr", "laptop");
    assert!(out.status.success(), "{}", common::stderr_of(&out));
    assert!(
        !common::stderr_of(&out).contains("not installed"),
        "create returned pending: {}",
        common::stderr_of(&out)
    );
    let key = f.key_of(&f.iad, "laptop");
    assert!(f.wg_peers(&f.lhr).contains(&key), "{}", f.lhr.log());

    // The cluster refuses plaintext, and TLS without a client certificate.
    let health = format!(
        "https://[{STORE_ADDR}]:{}/health",
        f.cluster.members[0].client_port
    );
    let plain = health.replacen("https", "http", 1);
    let ca = f.cluster.tls_file("ca.pem");
    for argv in [
        vec!["curl", "-fsS", "-m", "2", plain.as_str()],
        vec!["curl", "-fsS", "-m", "2", "--cacert", &ca, &health],
    ] {
        let out = f.cluster.ns.run(&argv);
        assert!(
            !out.status.success(),
            "{argv:?}: {}",
            common::stdout_of(&out)
        );
    }

    // A gateway whose client certificate another CA signed fails start in
    // one line naming the endpoints; it never registers.
    let ns = Netns::new();
    f.cluster.join(&ns, "v-bad", "fd53:e::4");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_string_lossy();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nname = \"lhr-9\"\nregion = \"lhr\"\nhost_id = \"a7b:9\"\n\
             interface = \"{}\"\nendpoint = \"127.0.0.1:51820\"\n\
             private_key_file = \"{d}/gw.key\"\nbackend = \"userspace\"\n\
             [store]\nkind = \"etcd\"\n{}\nprefix = \"/sixpn-fleet/\"\n{}\n\
             [api]\nsocket = \"{d}/api.sock\"\n",
            common::unique_ifname(),
            f.cluster.endpoints_toml(),
            f.cluster.tls_toml("stranger")
        ),
    )
    .unwrap();
    let mut cmd = ns.cmd("timeout");
    cmd.args(["20", common::SIXPN, "gateway", "--config"])
        .arg(&config);
    let out = cmd.output().unwrap();
    let err = common::stderr_of(&out);
    assert!(
        !out.status.success() && out.status.code() != Some(124),
        "{err}"
    );
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("Error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains(&format!("[{STORE_ADDR}]:")), "{err}");
    assert!(errors[0].contains("cert_file"), "{err}");
    let mut curl = std::process::Command::new("curl");
    curl.args(["-fsS", "--unix-socket"])
        .arg(f.iad.api())
        .arg("http://localhost/v1/regions");
    let regions = common::run_ok(&mut curl);
    assert!(
        regions.contains("lhr-1") && !regions.contains("lhr-9"),
        "{regions}"
    );
}

#[test]
fn a_fleet_shares_one_etcd_cluster() {
    require_root!();
    require_tools!("ip", "wg", "wireguard-go", "etcd", "curl");
    let mut f = fleet();

    // Created through iad for lhr: the create returns once lhr has it live
    // (lhr reports it through the store), so it is in lhr's `wg show` at
    // once; not on iad; listed as installed by both.
    let t0 = Instant::now();
    let out = f.create(&f.iad, "lhr", "laptop");
    assert!(out.status.success(), "{}", common::stderr_of(&out));
    eprintln!("cross-region create returned after {:?}", t0.elapsed());
    assert!(
        !common::stderr_of(&out).contains("not installed"),
        "create returned pending: {}\n{}",
        common::stderr_of(&out),
        f.lhr.log()
    );
    let key = f.key_of(&f.iad, "laptop");
    assert!(
        f.wg_peers(&f.lhr).contains(&key),
        "create returned but the peer is not on lhr: {}",
        f.lhr.log()
    );
    assert!(!f.wg_peers(&f.iad).contains(&key), "also on iad");
    let from_lhr = f.lhr.cli_json(&["wireguard", "list", "acme"]);
    let p = &from_lhr[0];
    assert_eq!(p["gateway"], "lhr-1");
    assert_eq!(p["state"], "installed", "{p}");
    let from_iad = f.iad.cli_json(&["wireguard", "list", "acme"]);
    assert_eq!(from_iad[0]["state"], "installed", "{}", from_iad[0]);
    // The laptop's tunnel carries traffic to lhr's `::3`.
    let laptop = f.tunnel("laptop");
    laptop.run_ok(&["ping", "-6", "-c", "1", "-W", "3", ACME_DNS]);
    assert!(
        p["address"]
            .as_str()
            .unwrap()
            .starts_with("fdaa:0:1:a7b:2:"),
        "{p}"
    );

    // An instance registered through lhr is in iad's view (what iad's DNS
    // serves for `<app>.internal`).
    f.lhr.cli_ok(&[
        "instances",
        "add",
        "acme",
        "web",
        "lhr",
        "--host",
        "a7b:7d",
        "--machine",
        "1:2",
    ]);
    let seen = wait_for(Duration::from_secs(2), || {
        let list = f.iad.cli_json(&["instances", "list", "acme"]);
        list.to_string()
            .contains("fdaa:0:1:a7b:7d:1:2:2")
            .then_some(())
    });
    assert!(seen.is_some(), "instance not visible through iad");

    // DNS on lhr answers for the whole org, every region: a peer and an app
    // registered through iad (iad region) included. Asked from a probe host
    // with an address in the org's /48, routed to lhr like an instance host.
    let out = f.create(&f.iad, "iad", "desk");
    assert!(out.status.success(), "{}", common::stderr_of(&out));
    f.iad.cli_ok(&[
        "instances",
        "add",
        "acme",
        "api",
        "iad",
        "--host",
        "a7b:8e",
        "--machine",
        "3:4",
    ]);
    let probe = f.probe();
    let dig = |qtype: &str, name: &str| {
        probe.run(&[
            "dig",
            "+short",
            "+time=1",
            "+tries=2",
            "-b",
            PROBE_ADDR,
            &format!("@{ACME_DNS}"),
            qtype,
            name,
        ])
    };
    let answered = wait_for(Duration::from_secs(3), || {
        let peers = common::stdout_of(&dig("txt", "_peer.internal"));
        let api = common::stdout_of(&dig("aaaa", "api.internal"));
        (peers.contains("desk")
            && peers.contains("laptop")
            && api.contains("fdaa:0:1:a7b:8e:3:4:2"))
        .then_some((peers, api))
    });
    let (peers, api) = answered.unwrap_or_else(|| {
        panic!(
            "lhr's DNS lacks iad's records:\n{}\n{}\n{}\n_peer {:?} api {:?}",
            common::stdout_of(&f.lhr_ns.run(&["ss", "-lnu"])),
            common::stdout_of(&f.lhr_ns.run(&["nft", "list", "counters"])),
            common::stdout_of(&probe.run(&["ping", "-c1", "-W1", "fdaa:0:1::3"])),
            common::stdout_of(&dig("txt", "_peer.internal")),
            common::stdout_of(&dig("aaaa", "api.internal"))
        )
    });
    eprintln!(
        "lhr DNS: _peer.internal {} api.internal {}",
        peers.trim(),
        api.trim()
    );
    let web = common::stdout_of(&dig("aaaa", "web.internal"));
    assert!(
        web.contains("fdaa:0:1:a7b:7d:1:2:2"),
        "web.internal on lhr: {web}"
    );

    // 50 concurrent creates across both APIs, into both regions.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let created = rt.block_on(async {
        let clients = [
            Client::new(f.iad.api(), None).unwrap(),
            Client::new(f.lhr.api(), None).unwrap(),
        ];
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..50 {
            let c = clients[i % 2].clone();
            let region = if i % 3 == 0 { "iad" } else { "lhr" };
            tasks.spawn(async move {
                let req = CreatePeer {
                    region: region.parse().unwrap(),
                    name: format!("c{i}").parse().unwrap(),
                    public_key: PrivateKey::generate().public_key(),
                    ephemeral: None,
                };
                c.create_peer(&"acme".parse().unwrap(), &req).await
            });
        }
        let mut peers = Vec::new();
        while let Some(r) = tasks.join_next().await {
            peers.push(r.unwrap().expect("concurrent create"));
        }
        peers
    });
    let distinct: std::collections::HashSet<_> = created.iter().map(|p| p.address).collect();
    assert_eq!(distinct.len(), 50, "{created:?}");
    // Each returned installed, and is live on its own gateway only.
    let (on_iad, on_lhr) = (f.wg_peers(&f.iad), f.wg_peers(&f.lhr));
    for p in &created {
        assert_eq!(p.state, PeerState::Installed, "{} {}", p.name, p.gateway);
        let key = p.public_key.to_string();
        let (mine, other) = if p.gateway.as_str() == "iad-1" {
            (&on_iad, &on_lhr)
        } else {
            (&on_lhr, &on_iad)
        };
        assert!(mine.contains(&key) && !other.contains(&key), "{}", p.name);
    }

    // lhr's daemon down: a create for lhr waits its bound, then answers
    // pending; lhr, back, installs it without another request, and its
    // earlier peers stayed on the interface throughout.
    f.lhr.stop();
    let t0 = Instant::now();
    let out = f.create(&f.iad, "lhr", "while-down");
    let took = t0.elapsed();
    assert!(out.status.success(), "{}", common::stderr_of(&out));
    assert!(
        common::stderr_of(&out).contains("has not installed the peer yet"),
        "{}",
        common::stderr_of(&out)
    );
    assert!(
        (Duration::from_secs(4)..Duration::from_secs(8)).contains(&took),
        "pending after {took:?}"
    );
    eprintln!("create for a stopped gateway answered pending after {took:?}");
    assert!(
        f.wg_peers(&f.lhr).contains(&key),
        "lhr's peers went with it"
    );
    f.lhr.restart();
    let k = f.key_of(&f.iad, "while-down");
    assert!(
        f.live_on(&f.lhr, &k, Duration::from_secs(10)),
        "while-down not on lhr after its restart: {}",
        f.lhr.log()
    );

    // One member down: writes go on.
    f.cluster.stop_member(0);
    let t0 = Instant::now();
    let ok = wait_for(Duration::from_secs(10), || {
        f.create(&f.lhr, "iad", "one-down")
            .status
            .success()
            .then_some(())
    });
    assert!(ok.is_some(), "create failed with one member down");
    eprintln!("create with one member down took {:?}", t0.elapsed());
    let k = f.key_of(&f.lhr, "one-down");
    assert!(
        f.live_on(&f.iad, &k, Duration::from_secs(5)),
        "one-down not on iad"
    );
    // And in lhr's snapshot (its DNS), so the outage below starts from a
    // known last snapshot: lhr may still be retrying a read that went to
    // the stopped member.
    let seen = wait_for(Duration::from_secs(15), || {
        common::stdout_of(&dig("txt", "_peer.internal"))
            .contains("one-down")
            .then_some(())
    });
    assert!(seen.is_some(), "one-down never reached lhr's DNS");

    // All down: writes fail fast with 503; tunnels carry on (a ping runs
    // through the laptop's tunnel from here until the cluster is back and
    // converged) and DNS answers from the last snapshot.
    let ping = laptop
        .cmd("ping")
        .args(["-6", "-n", "-i", "0.2", "-W", "1", ACME_DNS])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    f.cluster.stop_member(1);
    f.cluster.stop_member(2);
    let t0 = Instant::now();
    let out = f.create(&f.iad, "lhr", "all-down");
    let took = t0.elapsed();
    assert!(!out.status.success(), "create succeeded with etcd down");
    let err = common::stderr_of(&out);
    assert!(
        err.contains("503") || err.to_lowercase().contains("unavailable"),
        "{err}"
    );
    assert!(took < Duration::from_secs(4), "503 took {took:?}");
    eprintln!("write with etcd down failed after {took:?}: {}", err.trim());
    std::thread::sleep(Duration::from_secs(2));
    assert!(f.wg_peers(&f.lhr).contains(&key), "lhr lost its peers");
    let peers = common::stdout_of(&dig("txt", "_peer.internal"));
    assert!(
        peers.contains("laptop") && peers.contains("one-down"),
        "lhr's DNS with etcd down: {peers:?}"
    );
    let api = common::stdout_of(&dig("aaaa", "api.internal"));
    assert!(api.contains("fdaa:0:1:a7b:8e:3:4:2"), "{api:?}");

    // Back: a change made now reaches both gateways.
    for i in 0..3 {
        f.cluster.start_member(i);
    }
    for i in 0..3 {
        f.cluster.wait_healthy(i);
    }
    let ok = wait_for(Duration::from_secs(15), || {
        f.create(&f.lhr, "iad", "after")
            .status
            .success()
            .then_some(())
    });
    assert!(ok.is_some(), "create failed after the cluster came back");
    let k = f.key_of(&f.lhr, "after");
    assert!(
        f.live_on(&f.iad, &k, Duration::from_secs(15)),
        "after not on iad: {}",
        f.iad.log()
    );
    assert!(f.wg_peers(&f.lhr).contains(&key), "lhr lost its peers");
    assert_eq!(f.key_of(&f.iad, "after"), k);
    // Not one ping lost across the outage and the recovery.
    // SAFETY: signals our own child.
    unsafe { libc::kill(ping.id() as i32, libc::SIGINT) };
    let out = ping.wait_with_output().unwrap();
    let stats = common::stdout_of(&out);
    let summary = stats
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary: {stats}"));
    eprintln!("ping through the outage: {summary}");
    let counts: Vec<u64> = summary
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(counts.len() >= 2 && counts[0] > 20, "{summary}");
    // The last echo may still be in flight when ping is interrupted.
    assert!(counts[0] - counts[1] <= 1, "lost pings: {summary}");
}

/// How many changes a benchmark times: `SIXPN_BENCH_N`, default 1000.
fn bench_n() -> usize {
    std::env::var("SIXPN_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Prints `fleet WHAT, n=N: p50 … p99 … max …` (what scripts/bench-fleet.sh
/// keeps).
fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let n = samples.len();
    println!(
        "fleet {what}, n={n}: p50 {:?} p99 {:?} max {:?}",
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        samples[n - 1]
    );
}

/// From an API write on iad to its answer that the peer is live on lhr
/// (in lhr's `wg show`), N times (`SIXPN_BENCH_N`, default 1000). Prints
/// p50/p99/max.
#[test]
#[ignore = "benchmark: scripts/bench-fleet.sh"]
fn bench_write_to_wg_show_on_the_other_gateway() {
    require_root!();
    require_tools!("ip", "wg", "wireguard-go", "etcd", "curl");
    let n = bench_n();
    let f = bench_fleet();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = Client::new(f.iad.api(), None).unwrap();
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let key = PrivateKey::generate().public_key();
        let b64 = key.to_string();
        let t0 = Instant::now();
        let peer = rt
            .block_on(client.create_peer(
                &"acme".parse().unwrap(),
                &CreatePeer {
                    region: "lhr".parse().unwrap(),
                    name: format!("b{i}").parse().unwrap(),
                    public_key: key,
                    ephemeral: None,
                },
            ))
            .expect("create");
        // The create answers once lhr reports the peer live: that is the
        // measurement; `wg show` on lhr confirms it (untimed).
        samples.push(t0.elapsed());
        assert_eq!(peer.state, PeerState::Installed, "peer {i}");
        let out = f.lhr_ns.run(&["wg", "show", &f.lhr.interface, "peers"]);
        assert!(
            common::stdout_of(&out).contains(&b64),
            "peer {i} not on lhr"
        );
    }
    report(
        "write→create answered installed (in wg show) on the other gateway",
        samples,
    );
}

/// What [`DnsPoller`] is asked: poll until `name` has AAAA `want`, then say
/// when on `answered` (`None`: not within [`DnsPoller::PATIENCE`]).
struct Watch {
    name: String,
    want: Ipv6Addr,
    answered: mpsc::Sender<Option<Instant>>,
}

/// Asks lhr's DNS from a thread inside a probe namespace: real UDP queries
/// from [`PROBE_ADDR`], about one a millisecond, no process per poll (a
/// `dig` costs milliseconds itself). The thread ends when the poller is
/// dropped.
struct DnsPoller {
    watches: Option<mpsc::Sender<Watch>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DnsPoller {
    /// How long one name may take to appear.
    const PATIENCE: Duration = Duration::from_secs(10);

    fn start(probe: &Netns) -> Self {
        let ns = probe.name().to_owned();
        let (watches, rx) = mpsc::channel::<Watch>();
        let thread = std::thread::spawn(move || {
            enter_netns(&ns);
            // Made after setns, so it lives in the probe namespace.
            let sock = UdpSocket::bind(format!("[{PROBE_ADDR}]:0")).unwrap();
            sock.connect(format!("[{ACME_DNS}]:53")).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(2)))
                .unwrap();
            for (id, w) in (0..=u16::MAX).cycle().zip(rx) {
                let at = Self::poll(&sock, id, &w.name, w.want);
                let _ = w.answered.send(at);
            }
        });
        Self {
            watches: Some(watches),
            thread: Some(thread),
        }
    }

    /// Starts polling for `name` → `want` at once; the receiver gets the
    /// instant the first query that saw it was answered.
    fn watch(&self, name: &str, want: Ipv6Addr) -> mpsc::Receiver<Option<Instant>> {
        let (answered, rx) = mpsc::channel();
        let w = Watch {
            name: name.to_owned(),
            want,
            answered,
        };
        self.watches.as_ref().unwrap().send(w).unwrap();
        rx
    }

    fn poll(sock: &UdpSocket, id: u16, name: &str, want: Ipv6Addr) -> Option<Instant> {
        let q = aaaa_query(id, name);
        let mut buf = [0u8; 1500];
        let deadline = Instant::now() + Self::PATIENCE;
        while Instant::now() < deadline {
            let sent = Instant::now();
            sock.send(&q).unwrap();
            // A reply with another id is a late one to an earlier watch.
            while let Ok(n) = sock.recv(&mut buf) {
                let m = Message::from_vec(&buf[..n]).unwrap();
                if m.metadata.id != id {
                    continue;
                }
                if m.answers
                    .iter()
                    .any(|r| r.data.ip_addr() == Some(want.into()))
                {
                    return Some(Instant::now());
                }
                break;
            }
            let tick = Duration::from_millis(1);
            std::thread::sleep(tick.saturating_sub(sent.elapsed()));
        }
        None
    }
}

impl Drop for DnsPoller {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop (after its current
        // watch, at most PATIENCE).
        self.watches.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// From an API write on iad (an instance, in iad or lhr) to lhr's DNS
/// answering the instance's `<app>.internal` with its address, N times
/// (`SIXPN_BENCH_N`, default 1000). Prints p50/p99/max.
#[test]
#[ignore = "benchmark: scripts/bench-fleet.sh"]
fn bench_write_to_dns_answer_on_the_other_gateway() {
    require_root!();
    require_tools!("ip", "wg", "wireguard-go", "etcd", "curl");
    let n = bench_n();
    let f = bench_fleet();
    let probe = f.probe();
    let poller = DnsPoller::start(&probe);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = Client::new(f.iad.api(), None).unwrap();
    let acme: OrgName = "acme".parse().unwrap();

    // lhr serves acme's DNS only while acme has a peer there. Its own name
    // answering from the probe shows the whole path is up before timing.
    let peer = rt
        .block_on(client.create_peer(
            &acme,
            &CreatePeer {
                region: "lhr".parse().unwrap(),
                name: "probe".parse().unwrap(),
                public_key: PrivateKey::generate().public_key(),
                ephemeral: None,
            },
        ))
        .expect("create the probe's peer");
    let up = poller.watch("probe._peer.internal.", peer.address);
    up.recv().unwrap().unwrap_or_else(|| {
        panic!(
            "lhr's DNS never answered the probe:\n{}\n{}",
            common::stdout_of(&f.lhr_ns.run(&["ss", "-lnu"])),
            f.lhr.log()
        )
    });

    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let app = format!("bench{i}");
        let machine = i as u32 + 1;
        let want: Ipv6Addr = format!(
            "fdaa:0:1:a7b:7d:{:x}:{:x}:2",
            machine >> 16,
            machine & 0xffff
        )
        .parse()
        .unwrap();
        let region = if i % 2 == 0 { "iad" } else { "lhr" };
        let answered = poller.watch(&format!("{app}.internal."), want);
        let t0 = Instant::now();
        let added = rt
            .block_on(client.add_instance(
                &acme,
                &AddInstance {
                    app: app.parse().unwrap(),
                    region: region.parse().unwrap(),
                    address: None,
                    host: Some("a7b:7d".parse().unwrap()),
                    machine: Some(MachineId::from_u32(machine)),
                    id: None,
                    process_group: None,
                    started: true,
                },
            ))
            .expect("add instance");
        assert_eq!(added.address, want, "{app}");
        let at = answered.recv().unwrap();
        let at = at.unwrap_or_else(|| panic!("{app}.internal never answered on lhr"));
        samples.push(at.saturating_duration_since(t0));
    }
    report("write→DNS answer on the other gateway", samples);
}
