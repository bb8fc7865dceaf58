//! `sixpn doctor`: checks a host for what the gateway needs and says what to
//! do about each failure. It only reads: nothing on the host changes.

use std::net::{Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::api::client::Client;
use crate::config::{Backend, Config};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but something deserves a look.
    Warn,
    /// The gateway can't work like this.
    Fail,
}

/// One check's result.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// The outcome.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about it (for Warn/Fail).
    pub fix: Option<String>,
}

fn check(name: &'static str, status: Status, detail: impl Into<String>) -> Check {
    Check {
        name,
        status,
        detail: detail.into(),
        fix: None,
    }
}

impl Check {
    fn fix(mut self, f: impl Into<String>) -> Self {
        self.fix = Some(f.into());
        self
    }
}

fn on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Where the kernel would load WireGuard from, if it can.
fn kernel_wireguard() -> Result<&'static str, String> {
    if Path::new("/sys/module/wireguard").exists() {
        return Ok("loaded");
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let dir = PathBuf::from(format!("/lib/modules/{release}"));
    let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    if builtin.contains("/wireguard.ko") {
        return Ok("built in");
    }
    let deps = std::fs::read_to_string(dir.join("modules.dep")).unwrap_or_default();
    if deps.contains("/wireguard.ko") {
        return Ok("available as a module (loads on first use)");
    }
    Err(format!("no wireguard module for kernel {release}"))
}

fn wireguard(config: Option<&Config>) -> Check {
    let backend = config.map_or(Backend::Auto, |c| c.gateway.backend);
    let kernel = kernel_wireguard();
    let go = on_path("wireguard-go");
    match (backend, kernel, go) {
        (Backend::Userspace, _, Some(p)) => check(
            "WireGuard",
            Status::Ok,
            format!("userspace backend: {}", p.display()),
        ),
        (Backend::Userspace, _, None) => check(
            "WireGuard",
            Status::Fail,
            "backend = \"userspace\" but no wireguard-go",
        )
        .fix("apt-get install wireguard-go"),
        (_, Ok(how), _) => check("WireGuard", Status::Ok, format!("kernel module {how}")),
        (Backend::Kernel, Err(e), _) => check("WireGuard", Status::Fail, e).fix(
            "install a kernel with the WireGuard module (Linux >= 5.6), or set backend = \"auto\"",
        ),
        (Backend::Auto, Err(e), Some(p)) => check(
            "WireGuard",
            Status::Warn,
            format!("{e}; auto will use wireguard-go ({})", p.display()),
        )
        .fix("the kernel module is faster; wireguard-go works"),
        (Backend::Auto, Err(e), None) => check("WireGuard", Status::Fail, e)
            .fix("apt-get install wireguard-go, or use a kernel with the WireGuard module"),
    }
}

fn nftables() -> Check {
    let Some(nft) = on_path("nft") else {
        return check("nftables", Status::Fail, "no nft binary").fix("apt-get install nftables");
    };
    match std::process::Command::new(&nft)
        .args(["list", "tables"])
        .output()
    {
        Ok(o) if o.status.success() => check(
            "nftables",
            Status::Ok,
            format!("{} talks to the kernel's nf_tables", nft.display()),
        ),
        Ok(o) => check(
            "nftables",
            Status::Fail,
            format!(
                "nft list tables failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        )
        .fix("run as root; the kernel needs nf_tables (CONFIG_NF_TABLES)"),
        Err(e) => check("nftables", Status::Fail, format!("cannot run nft: {e}")),
    }
}

fn forwarding() -> Check {
    match std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding") {
        Ok(v) if v.trim() == "1" => check("IPv6 forwarding", Status::Ok, "on"),
        Ok(_) => check(
            "IPv6 forwarding",
            Status::Warn,
            "off (the gateway turns it on when it starts)",
        )
        .fix("sysctl -w net.ipv6.conf.all.forwarding=1 to make it permanent in /etc/sysctl.d"),
        Err(e) => check(
            "IPv6 forwarding",
            Status::Fail,
            format!("IPv6 is unavailable: {e}"),
        )
        .fix("boot with IPv6 enabled (no ipv6.disable=1)"),
    }
}

fn listen_port(config: &Config, daemon_up: bool) -> Check {
    let port = config.gateway.listen_port;
    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    match UdpSocket::bind(addr) {
        Ok(_) if daemon_up => check(
            "listen port",
            Status::Warn,
            format!("UDP {port} is free, but the gateway is running: is its interface up?"),
        )
        .fix("check `wg show` and the gateway's log"),
        Ok(_) => check("listen port", Status::Ok, format!("UDP {port} is free")),
        Err(_) if daemon_up => check(
            "listen port",
            Status::Ok,
            format!("UDP {port} in use (by the gateway's WireGuard interface)"),
        ),
        Err(e) => check("listen port", Status::Fail, format!("UDP {port}: {e}"))
            .fix("another process holds the port; pick another gateway.listen_port"),
    }
}

fn store(config: &Config) -> Check {
    match config.store.kind {
        crate::config::StoreKind::Sqlite => {
            let p = &config.store.path;
            if !p.exists() {
                return check(
                    "store",
                    Status::Ok,
                    format!("{} will be created at start", p.display()),
                );
            }
            match crate::store::sqlite::SqliteStore::open(p) {
                Ok(_) => check("store", Status::Ok, format!("SQLite {} opens", p.display())),
                Err(e) => check("store", Status::Fail, e.to_string())
                    .fix("check the path's permissions and free disk space"),
            }
        }
        crate::config::StoreKind::Etcd => check(
            "store",
            Status::Ok,
            format!("etcd at {}", config.store.endpoints.join(", ")),
        ),
    }
}

/// Runs every check. `api` is where the daemon's API should answer.
pub async fn run(config_path: &Path, api: &str) -> Vec<Check> {
    let mut out = Vec::new();
    let config = match Config::load(config_path) {
        Ok(c) => {
            out.push(check(
                "config",
                Status::Ok,
                format!("{} is valid", config_path.display()),
            ));
            Some(c)
        }
        Err(e) => {
            out.push(
                check("config", Status::Fail, e.to_string())
                    .fix("fix the key named above; every key is in the README's config reference"),
            );
            None
        }
    };
    out.push(wireguard(config.as_ref()));
    out.push(nftables());
    out.push(forwarding());
    let socket = config
        .as_ref()
        .map_or_else(|| api.to_owned(), |c| c.api.socket.display().to_string());
    let health = match Client::new(&socket, None) {
        Ok(client) => tokio::time::timeout(Duration::from_secs(2), client.health())
            .await
            .map_err(|_| "timed out".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string())),
        Err(e) => Err(e.to_string()),
    };
    let daemon_up = health.is_ok();
    if let Some(c) = &config {
        out.push(listen_port(c, daemon_up));
        out.push(store(c));
    }
    match &health {
        Ok(h) => {
            let dp = h.dataplane.as_ref();
            out.push(check(
                "API",
                Status::Ok,
                format!(
                    "gateway {} ({}) answers at {socket}; {} of {} peers installed",
                    h.gateway,
                    h.region,
                    dp.map_or(0, |d| d.installed_peers),
                    dp.map_or(0, |d| d.registered_peers)
                ),
            ));
        }
        Err(e) => out.push(
            check("API", Status::Warn, format!("no answer at {socket}: {e}"))
                .fix("start the gateway: systemctl start sixpn-gateway"),
        ),
    }
    if let (Some(c), true) = (&config, daemon_up) {
        out.push(dns_addresses(c, &socket).await);
        out.push(isolation(c));
        out.push(guard(c));
    }
    out
}

/// The isolation guard (tc, under the table) is attached at both hooks of
/// the interface, exactly as this sixpn renders it.
fn guard(config: &Config) -> Check {
    let name = "isolation guard";
    let iface = config.gateway.interface.as_str();
    let want = crate::plan::guard::tc_bytecode();
    let mut missing = Vec::new();
    for hook in ["ingress", "egress"] {
        let out = std::process::Command::new("tc")
            .args(["filter", "show", "dev", iface, hook])
            .output();
        match out {
            Ok(o) if String::from_utf8_lossy(&o.stdout).contains(&want) => {}
            Ok(_) => missing.push(hook),
            Err(e) => return check(name, Status::Fail, format!("cannot run tc: {e}")),
        }
    }
    if missing.is_empty() {
        check(
            name,
            Status::Ok,
            format!(
                "tc filter on {iface} ingress and egress (drops: tc -s qdisc show dev {iface})"
            ),
        )
    } else {
        check(
            name,
            Status::Fail,
            format!("not attached at {} of {iface}", missing.join(" and ")),
        )
        .fix("the daemon attaches it within a second: check its log (the kernel needs cls_bpf and sch_ingress)")
    }
}

/// The daemon's `table inet sixpn` is in place and built for this
/// interface, with its drop counters (the daemon restores it on its own;
/// this says whether it is there now).
fn isolation(config: &Config) -> Check {
    use crate::plan::nft;
    let name = "isolation";
    let out = std::process::Command::new("nft")
        .args(["-j", "list", "table", "inet", nft::TABLE])
        .output();
    let json =
        match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
            Ok(o) => return check(
                name,
                Status::Fail,
                format!(
                    "no table inet sixpn: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            )
            .fix("the daemon installs it at start and restores it within a second: check its log"),
            Err(e) => return check(name, Status::Fail, format!("cannot run nft: {e}")),
        };
    // Just in time, the table also captures initiations: held (queue) or
    // copied (log), whichever the daemon found the kernel can do.
    let g = &config.gateway;
    let captures: Vec<(Option<nft::Capture>, &str)> = match g.peers {
        crate::config::PeerMode::All => vec![(None, "")],
        crate::config::PeerMode::Jit => [
            (
                nft::CaptureMode::Queue {
                    num: g.capture_queue,
                },
                "; initiations of peers not installed held (nft queue)",
            ),
            (
                nft::CaptureMode::Log {
                    group: g.capture_queue,
                },
                "; initiations of peers not installed copied (nft log)",
            ),
        ]
        .into_iter()
        .map(|(mode, says)| {
            (
                Some(nft::Capture {
                    listen_port: g.listen_port,
                    mode,
                }),
                says,
            )
        })
        .collect(),
    };
    let matching = |t: &nft::ObservedTable| {
        captures.iter().find_map(|(c, says)| {
            let want = nft::Ruleset::new(g.interface.as_str(), Default::default(), *c);
            t.skeleton_matches(&want).then_some(*says)
        })
    };
    match crate::dataplane::nft_codec::parse_listing(&json) {
        Ok(t) if matching(&t).is_some() => check(
            name,
            Status::Ok,
            format!(
                "table inet sixpn: {} orgs in {}; dropped so far: {} forwarded, {} to the gateway{}",
                t.elements.len(),
                nft::SET,
                crate::dataplane::nft_codec::counter_packets(&json, nft::FORWARD_DROPPED).unwrap_or(0),
                crate::dataplane::nft_codec::counter_packets(&json, nft::INPUT_DROPPED).unwrap_or(0),
                matching(&t).unwrap_or_default(),
            ),
        ),
        Ok(_) => check(
            name,
            Status::Warn,
            "table inet sixpn differs from this sixpn's ruleset (another version or edited by hand)",
        )
        .fix("the daemon replaces it on its next resync; restart it to do so now"),
        Err(e) => check(name, Status::Fail, format!("unreadable table inet sixpn: {e}")),
    }
}

/// Every org with peers here should have its `::3` on the interface.
async fn dns_addresses(config: &Config, socket: &str) -> Check {
    let Ok(client) = Client::new(socket, None) else {
        return check("DNS addresses", Status::Warn, "no API client");
    };
    let Ok(orgs) = client.orgs().await else {
        return check("DNS addresses", Status::Warn, "cannot list orgs");
    };
    let mut want = Vec::new();
    for o in orgs {
        if let Ok(peers) = client.peers(&o.name).await {
            if peers.iter().any(|p| p.gateway == config.gateway.name) {
                want.push(o.dns);
            }
        }
    }
    let have = std::process::Command::new("ip")
        .args([
            "-6",
            "-o",
            "addr",
            "show",
            "dev",
            config.gateway.interface.as_str(),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let missing: Vec<String> = want
        .iter()
        .filter(|a| !have.contains(&format!("{a}/128")))
        .map(|a| a.to_string())
        .collect();
    if missing.is_empty() {
        check(
            "DNS addresses",
            Status::Ok,
            format!(
                "{} org DNS addresses on {}",
                want.len(),
                config.gateway.interface
            ),
        )
    } else {
        check(
            "DNS addresses",
            Status::Fail,
            format!(
                "missing on {}: {}",
                config.gateway.interface,
                missing.join(", ")
            ),
        )
        .fix("the reconciler restores them within a second; if not, read the gateway's log")
    }
}

/// Prints the checks; returns whether none failed.
pub fn print(checks: &[Check]) -> bool {
    for c in checks {
        let mark = match c.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        println!("[{mark}] {:<16} {}", c.name, c.detail);
        if let Some(f) = &c.fix {
            println!("       {:<16} → {f}", "");
        }
    }
    checks.iter().all(|c| c.status != Status::Fail)
}
