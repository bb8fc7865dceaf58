//! The one test topology: a gateway namespace running the daemon, orgs, and
//! instance hosts and wg-quick clients each in a namespace of its own,
//! joined to the gateway by a veth (docs/architecture.md "Test tiers").
//!
//! ```ignore
//! let t = Topology::new()
//!     .org("acme")
//!     .instance("acme", "web")
//!     .client("acme", "laptop")
//!     .start();
//! t.client("laptop").ns.run_ok(&["ping", "-6", "-c", "1", &t.instance("acme", "web").addr.to_string()]);
//! ```
//!
//! The address plan: link n (counted from one, in the order the builder was
//! told) is `fd53:n::1/64` on the gateway's end and `fd53:n::2/64` on the far
//! end. The gateway's WireGuard endpoint is `[fd53:1::1]:51820`; a client on
//! another link gets a route to `fd53:1::/64` through its own. Instance hosts
//! get the ids `a7b:7d`, `a7b:7e`, … in order, every instance the machine
//! `f066:b83b`; the host's address sits on its `lo` with 6PN routed back
//! through the gateway, and the gateway routes the host's /80 over the link.

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};

use super::*;

/// The backend the gateway uses: wireguard-go here, the kernel module in
/// the real-kernel VM (`SIXPN_TEST_BACKEND`).
pub fn backend() -> String {
    std::env::var("SIXPN_TEST_BACKEND").unwrap_or_else(|_| "userspace".into())
}

/// How a client's wg-quick file is used.
#[derive(Debug, Clone)]
pub enum ClientConf {
    /// As `sixpn wireguard create` wrote it, less the `DNS =` line.
    AsCreated,
    /// Made hostile: all of 6PN into the tunnel (`AllowedIPs = fdaa::/16`),
    /// the address as a /120, and optionally someone else's address claimed.
    AllOf6pn { claim: Option<String> },
}

#[derive(Debug, Clone)]
enum Node {
    Instance {
        org: String,
        name: String,
    },
    Client {
        org: String,
        name: String,
        conf: ClientConf,
    },
}

/// Builds a [`RunningTopology`]; see the module docs.
#[must_use]
pub struct Topology {
    gateway: GatewayBuilder,
    gw_ns: Option<Netns>,
    backend: String,
    orgs: Vec<String>,
    nodes: Vec<Node>,
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Topology {
    /// A gateway on the configured [`backend`] with no orgs yet.
    pub fn new() -> Self {
        Self {
            gateway: Gateway::builder()
                .endpoint("[fd53:1::1]:51820")
                .listen_port(51820),
            gw_ns: None,
            backend: backend(),
            orgs: Vec::new(),
            nodes: Vec::new(),
        }
    }

    /// Changes the gateway's configuration before it starts.
    pub fn gateway(mut self, f: impl FnOnce(GatewayBuilder) -> GatewayBuilder) -> Self {
        self.gateway = f(self.gateway);
        self
    }

    /// The WireGuard backend instead of [`backend`]'s.
    pub fn backend(mut self, name: &str) -> Self {
        self.backend = name.to_owned();
        self
    }

    /// Runs the gateway in `ns`, made (and perhaps linked to more) by the
    /// test beforehand, instead of a new namespace.
    pub fn gateway_netns(mut self, ns: Netns) -> Self {
        self.gw_ns = Some(ns);
        self
    }

    /// `sixpn orgs create NAME`, in order.
    pub fn org(mut self, name: &str) -> Self {
        self.orgs.push(name.to_owned());
        self
    }

    /// An instance `name` of `org` (region `lhr`) on a host of its own.
    pub fn instance(mut self, org: &str, name: &str) -> Self {
        self.nodes.push(Node::Instance {
            org: org.to_owned(),
            name: name.to_owned(),
        });
        self
    }

    /// A wg-quick client `name` of `org` with its file as created, tunnel up.
    pub fn client(self, org: &str, name: &str) -> Self {
        self.client_with(org, name, ClientConf::AsCreated)
    }

    /// A wg-quick client `name` of `org` with its file made as `conf` says.
    pub fn client_with(mut self, org: &str, name: &str, conf: ClientConf) -> Self {
        self.nodes.push(Node::Client {
            org: org.to_owned(),
            name: name.to_owned(),
            conf,
        });
        self
    }

    /// Builds the namespaces and links, starts the gateway, creates the
    /// orgs, then the instances and clients in the order given.
    pub fn start(self) -> RunningTopology {
        let gw_ns = self.gw_ns.unwrap_or_default();
        let gw = self
            .gateway
            .gateway_toml(&format!("backend = \"{}\"", self.backend))
            .netns(&gw_ns)
            .start();
        let dir = tempfile::tempdir().expect("cannot create the topology's temp dir");
        let script = wg_quick_userspace_script(dir.path());
        let mut t = RunningTopology {
            gw,
            gw_ns,
            instances: Vec::new(),
            clients: Vec::new(),
            dir,
            script,
            links: 0,
        };
        for org in &self.orgs {
            t.gw.cli_ok(&["orgs", "create", org]);
        }
        for node in self.nodes {
            match node {
                Node::Instance { org, name } => {
                    t.add_instance(&org, &name);
                }
                Node::Client { org, name, conf } => {
                    t.add_client(&org, &name, conf);
                }
            }
        }
        t
    }
}

/// An instance host: a namespace holding the instance's address.
pub struct Instance {
    pub org: String,
    pub name: String,
    pub ns: Netns,
    pub addr: Ipv6Addr,
}

/// A wg-quick client in a namespace of its own, its tunnel up.
pub struct Client {
    pub org: String,
    pub name: String,
    pub ns: Netns,
    /// The wg-quick file (named after the unique interface).
    pub conf: PathBuf,
    /// Its WireGuard interface, unique on the host.
    pub iface: String,
    /// The `Address =` of the file as used (a claimed one if so made).
    pub addr: Ipv6Addr,
    /// The `DNS =` the file had (dropped from it before `wg-quick up`).
    pub dns: Option<String>,
    /// What `sixpn wireguard create` said on stderr.
    pub create_stderr: String,
}

/// A started [`Topology`]. Dropping it stops the gateway first, then deletes
/// the namespaces with whatever runs in them.
pub struct RunningTopology {
    pub gw: Gateway,
    pub gw_ns: Netns,
    pub instances: Vec<Instance>,
    pub clients: Vec<Client>,
    pub dir: tempfile::TempDir,
    /// The `WG_QUICK_USERSPACE_IMPLEMENTATION` for [`wg_quick`].
    pub script: PathBuf,
    links: usize,
}

impl RunningTopology {
    /// The instance `name` of `org`.
    pub fn instance(&self, org: &str, name: &str) -> &Instance {
        self.instances
            .iter()
            .find(|i| i.org == org && i.name == name)
            .unwrap_or_else(|| panic!("no instance {org}/{name} in the topology"))
    }

    /// The client `name`.
    pub fn client(&self, name: &str) -> &Client {
        self.clients
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no client {name} in the topology"))
    }

    /// A new namespace on the next link: returns it and the gateway's
    /// address on that link.
    fn link(&mut self) -> (Netns, String) {
        self.links += 1;
        let n = self.links;
        let ns = Netns::new();
        let (gw_side, far_side) = (format!("fd53:{n}::1"), format!("fd53:{n}::2"));
        veth(
            &self.gw_ns,
            &format!("link{n}"),
            &[&format!("{gw_side}/64")],
            &ns,
            "to-gw",
            &[&format!("{far_side}/64")],
        );
        (ns, gw_side)
    }

    /// Registers instance `name` of `org` on the next host and makes it
    /// live on a new instance host namespace.
    pub fn add_instance(&mut self, org: &str, name: &str) -> &Instance {
        let host = format!("a7b:{:x}", 0x7d + self.instances.len());
        let (ns, gw_side) = self.link();
        let far_side = gw_side.replace("::1", "::2");
        let added = self.gw.cli_ok(&[
            "instances",
            "add",
            org,
            name,
            "lhr",
            "--host",
            &host,
            "--machine",
            "f066:b83b",
        ]);
        let addr: Ipv6Addr = added
            .split_whitespace()
            .last()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in `instances add`: {added}"));
        ns.ip(&["-6", "addr", "add", &format!("{addr}/128"), "dev", "lo"]);
        ns.ip(&["-6", "route", "add", "fdaa::/16", "via", &gw_side]);
        let s = addr.segments();
        let net = Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], 0, 0, 0);
        self.gw_ns
            .ip(&["-6", "route", "add", &format!("{net}/80"), "via", &far_side]);
        self.instances.push(Instance {
            org: org.to_owned(),
            name: name.to_owned(),
            ns,
            addr,
        });
        self.instances.last().expect("just pushed")
    }

    /// `sixpn wireguard create ORG lhr NAME FILE` in a new namespace on the
    /// next link, the file made as `conf` says, then `wg-quick up`.
    pub fn add_client(&mut self, org: &str, name: &str, conf: ClientConf) -> &Client {
        let (ns, gw_side) = self.link();
        if gw_side != "fd53:1::1" {
            // The gateway's endpoint address is on link 1.
            ns.ip(&["-6", "route", "add", "fd53:1::/64", "via", &gw_side]);
        }
        let iface = unique_ifname();
        let file = self.dir.path().join(format!("{iface}.conf"));
        let out = self
            .gw
            .cli(&["wireguard", "create", org, "lhr", name, path_str(&file)]);
        assert!(out.status.success(), "{}", stderr_of(&out));
        let dns = std::fs::read_to_string(&file)
            .expect("cannot read the wg-quick file")
            .lines()
            .find_map(|l| l.strip_prefix("DNS = "))
            .map(|d| d.trim().to_owned());
        let addr = edit_client_conf(&file, &conf);
        wg_quick(&ns, &self.script, &["up", path_str(&file)]);
        self.clients.push(Client {
            org: org.to_owned(),
            name: name.to_owned(),
            ns,
            conf: file,
            iface,
            addr,
            dns,
            create_stderr: stderr_of(&out),
        });
        self.clients.last().expect("just pushed")
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// Rewrites the wg-quick file at `path` as `conf` says (never keeping the
/// `DNS =` line: wg-quick would hand it to resolvconf, which changes the
/// host); returns the address it now has.
fn edit_client_conf(path: &Path, conf: &ClientConf) -> Ipv6Addr {
    let text = std::fs::read_to_string(path).expect("cannot read the wg-quick file");
    let mut addr = None;
    let edited: String = text
        .lines()
        .filter(|l| !l.starts_with("DNS"))
        .map(|l| {
            if let Some(a) = l.strip_prefix("Address = ") {
                let a = a.split('/').next().unwrap_or(a).to_owned();
                match conf {
                    ClientConf::AsCreated => {
                        addr = a.parse().ok();
                        format!("{l}\n")
                    }
                    ClientConf::AllOf6pn { claim } => {
                        let a = claim.clone().unwrap_or(a);
                        addr = a.parse().ok();
                        format!("Address = {a}/120\n")
                    }
                }
            } else if l.starts_with("AllowedIPs") && matches!(conf, ClientConf::AllOf6pn { .. }) {
                "AllowedIPs = fdaa::/16\n".to_owned()
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(path, edited).expect("cannot write the wg-quick file");
    addr.unwrap_or_else(|| panic!("no Address in {}:\n{text}", path.display()))
}
