//! Network namespaces (`sxt-<pid>-<n>`), veth pairs between them, running
//! commands inside one, the names unique per test process that live in the
//! host's global name spaces (interfaces, UDP ports).

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, Once};
use std::time::Duration;

use super::*;

/// Interface names handed out by [`unique_ifname`], for the stale-socket sweep.
pub(crate) static IFNAMES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// A network interface name unique to this process and call, at most 15
/// characters: `sxt` + the pid mod 10000 (4 digits) + a counter.
pub fn unique_ifname() -> String {
    let name = format!("sxt{:04}{}", std::process::id() % 10_000, next_n());
    assert!(name.len() <= 15, "interface name {name} too long");
    IFNAMES.lock().unwrap().push(name.clone());
    name
}

/// A UDP port that was free a moment ago (for listen ports of gateways that
/// share the host namespace).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("[::]:0")
        .or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("no free UDP port")
}

/// Deletes namespaces left by earlier runs of test processes that no longer
/// exist (e.g. a run killed by a timeout): `sxt-<dead pid>-<n>`.
pub(crate) fn sweep_stale_namespaces() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = std::fs::read_dir("/run/netns") else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("sxt-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            // SAFETY: signal 0 only checks that the process exists.
            let alive = unsafe { libc::kill(pid, 0) == 0 }
                || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
            if !alive {
                kill_namespace_processes(&name);
                let _ = Command::new("ip")
                    .args(["netns", "del", &name])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    });
}

pub(crate) fn namespace_pids(name: &str) -> Vec<libc::pid_t> {
    Command::new("ip")
        .args(["netns", "pids", name])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGTERM to every process in the namespace (wireguard-go then removes its
/// UAPI socket), up to 2 s to go, then SIGKILL for the rest.
pub(crate) fn kill_namespace_processes(name: &str) {
    let pids = namespace_pids(name);
    if pids.is_empty() {
        return;
    }
    for &p in &pids {
        signal(p as u32, libc::SIGTERM);
    }
    let gone = wait_for(Duration::from_secs(2), || {
        namespace_pids(name).is_empty().then_some(())
    });
    if gone.is_none() {
        // `ip netns pids NS | xargs -r kill -9`
        for p in namespace_pids(name) {
            signal(p as u32, libc::SIGKILL);
        }
        wait_for(Duration::from_secs(2), || {
            namespace_pids(name).is_empty().then_some(())
        });
    }
}

/// Removes UAPI sockets of interfaces this process named that nobody serves
/// any more (a wireguard-go that was SIGKILLed leaves its socket behind).
pub fn sweep_stale_wg_sockets() {
    let names = IFNAMES.lock().unwrap().clone();
    for name in names {
        let sock = Path::new(WG_SOCKET_DIR).join(format!("{name}.sock"));
        if sock.exists() && UnixStream::connect(&sock).is_err() {
            let _ = std::fs::remove_file(&sock);
        }
    }
}

/// A network namespace named `sxt-<pid>-<n>` with `lo` up, deleted (with
/// every process in it) on drop. Needs root.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace; panics if `ip netns add` fails.
    pub fn new() -> Self {
        sweep_stale_namespaces();
        let name = format!("sxt-{}-{}", std::process::id(), next_n());
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NS program` (add arguments, env, stdio and run it).
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `argv` in the namespace and returns its output.
    pub fn run(&self, argv: &[&str]) -> Output {
        let mut c = self.cmd(argv[0]);
        c.args(&argv[1..]);
        run(&mut c)
    }

    /// Runs `argv` in the namespace; panics unless it succeeds; returns stdout.
    pub fn run_ok(&self, argv: &[&str]) -> String {
        let mut c = self.cmd(argv[0]);
        c.args(&argv[1..]);
        run_ok(&mut c)
    }

    /// `ip -n NS ARGS…`; panics unless it succeeds; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Adds `addr` (`2001:db8::1/64` or `10.0.0.1/24`) to `dev`; IPv6
    /// addresses skip duplicate address detection so they work at once.
    pub fn add_addr(&self, dev: &str, addr: &str) {
        if addr.contains(':') {
            self.ip(&["-6", "addr", "add", addr, "dev", dev, "nodad"]);
        } else {
            self.ip(&["addr", "add", addr, "dev", dev]);
        }
    }

    /// Turns on IPv4 and IPv6 forwarding in the namespace (for a router).
    pub fn enable_forwarding(&self) {
        self.run_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        self.run_ok(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_namespace_processes(&self.name);
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .output();
        if let Ok(o) = out {
            if !o.status.success() {
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "warning: ip netns del {} failed: {}",
                    self.name,
                    stderr_of(&o).trim()
                );
            }
        }
        sweep_stale_wg_sockets();
    }
}

/// Joins two namespaces with a veth pair `a_if` (in `a`) ↔ `b_if` (in `b`),
/// adds the addresses (CIDR; IPv6 without DAD) and brings both ends up.
/// Interface names are per namespace, so they need not be unique.
pub fn veth(a: &Netns, a_if: &str, a_addrs: &[&str], b: &Netns, b_if: &str, b_addrs: &[&str]) {
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]);
    for (ns, dev, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            ns.add_addr(dev, addr);
        }
        ns.ip(&["link", "set", dev, "up"]);
    }
}

/// Moves the calling thread into the network namespace named `ns` (only this
/// thread: sockets it opens afterwards live in `ns`). Spawn a thread for it
/// and keep fixtures off that thread.
pub fn enter_netns(ns: &str) {
    let f = File::open(format!("/run/netns/{ns}")).unwrap();
    // SAFETY: setns only changes this thread's network namespace.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
}
