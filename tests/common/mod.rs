//! Shared harness for the integration tests that drive real processes: the
//! `sixpn` binary (daemon and CLI), network namespaces, veth pairs and
//! wireguard-go (docs/architecture.md "Test tiers", tier 2).
//!
//! Use it from a test crate with
//!
//! ```ignore
//! #[macro_use]
//! mod common;
//! use common::{Gateway, Netns};
//! ```
//!
//! Rules every fixture follows:
//!
//! - Names that are global on the host are unique per test process *and* per
//!   test: namespaces are `sxt-<pid>-<n>`, interface names `sxt<pid%10000><n>`
//!   (the wireguard-go UAPI socket `/var/run/wireguard/IFACE.sock` is global
//!   across namespaces). Tests run in parallel.
//! - Every fixture cleans up on `Drop`, also when the test panics: daemons get
//!   SIGTERM then SIGKILL, namespaces lose their processes and are deleted.
//!   Child processes also get SIGTERM if the test thread dies
//!   (`PR_SET_PDEATHSIG`), so keep fixtures on the thread that made them.
//! - A missing prerequisite (root, a tool) skips the test loudly, printing
//!   `SKIPPED <test>: <reason>` straight to stderr (not captured by libtest),
//!   but under CI (`CI` set, and not `0`/`false`) it fails the test instead:
//!   CI runs everything.

// Each test crate uses a different part of the harness.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv6Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// The binary under test, built by cargo for integration tests.
pub const SIXPN: &str = env!("CARGO_BIN_EXE_sixpn");

/// Where wireguard-go (and `wg`) keep UAPI sockets; global across namespaces.
pub const WG_SOCKET_DIR: &str = "/var/run/wireguard";

/// How long a daemon may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How much slower everything is here: 1 natively, 8 inside the emulated
/// real-kernel VM (`scripts/vm-run.sh` sets `SIXPN_IN_VM=1`), where software
/// emulation runs some 35x slower.
pub fn slowdown() -> u32 {
    if std::env::var_os("SIXPN_IN_VM").is_some() {
        8
    } else {
        1
    }
}

/// A timeout scaled by [`slowdown`].
pub fn scaled(d: Duration) -> Duration {
    d * slowdown()
}

// ---------------------------------------------------------------------------
// Prerequisites and skipping

#[allow(unused_imports)] // each test crate uses a different part
pub use sixpn::testkit::{in_ci, is_root};

/// The path of `tool` on `PATH` (or the absolute path itself), if executable.
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let executable = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if tool.contains('/') {
        let p = PathBuf::from(tool);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| executable(p))
}

/// Decides whether a test may go on (the one rule: [`sixpn::testkit::prerequisite`]).
///
/// Prefer the macros [`skip_unless!`], [`require_root!`], [`require_tools!`].
pub use sixpn::testkit::prerequisite;

/// The current test function's path, e.g. `e2e_cli::list_and_remove`.
#[macro_export]
macro_rules! test_name {
    () => {{
        fn here() {}
        let name = std::any::type_name_of_val(&here);
        name.strip_suffix("::here").unwrap_or(name)
    }};
}

/// `skip_unless!(condition, "reason {}", args…)`: returns from the test
/// (skipping loudly) when `condition` is false, or panics under CI.
#[macro_export]
macro_rules! skip_unless {
    ($cond:expr, $($reason:tt)+) => {
        if !$crate::common::prerequisite($crate::test_name!(), $cond, format!($($reason)+)) {
            return;
        }
    };
}

/// Skips the test unless it runs as root (fails under CI).
#[macro_export]
macro_rules! require_root {
    () => {
        $crate::skip_unless!(
            $crate::common::is_root(),
            "needs root (network namespaces, wireguard-go); run as root, CI does"
        )
    };
}

/// `require_tools!("wg", "ip", …)`: skips the test unless each is on PATH
/// (fails under CI).
#[macro_export]
macro_rules! require_tools {
    ($($tool:expr),+ $(,)?) => {
        $(
            $crate::skip_unless!(
                $crate::common::find_tool($tool).is_some(),
                "needs `{}` on PATH (apt-get install wireguard-tools wireguard-go iproute2)",
                $tool
            );
        )+
    };
}

// ---------------------------------------------------------------------------
// Running commands

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn next_n() -> usize {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Interface names handed out by [`unique_ifname`], for the stale-socket sweep.
static IFNAMES: Mutex<Vec<String>> = Mutex::new(Vec::new());

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

/// A command line for messages.
pub fn cmdline(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion with stdin from /dev/null.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", cmdline(cmd)))
}

/// Runs `cmd`, panics with its output unless it succeeds, returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "`{}` failed ({}):\nstdout: {}\nstderr: {}",
        cmdline(cmd),
        out.status,
        stdout_of(&out),
        stderr_of(&out)
    );
    stdout_of(&out)
}

/// Runs `cmd` with `input` on stdin; panics unless it succeeds; returns stdout.
pub fn run_with_input(cmd: &mut Command, input: &str) -> String {
    let line = cmdline(cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{line}`: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap_or_else(|e| panic!("cannot write to `{line}`: {e}"));
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "`{line}` failed ({}): {}",
        out.status,
        stderr_of(&out)
    );
    stdout_of(&out)
}

/// stdout as text.
pub fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr as text.
pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The public key of a base64 private key, computed by `wg pubkey`.
pub fn wg_pubkey(private_key: &str) -> String {
    run_with_input(
        Command::new("wg").arg("pubkey"),
        &format!("{}\n", private_key.trim()),
    )
    .trim()
    .to_owned()
}

/// A fresh private key from `wg genkey`.
pub fn wg_genkey() -> String {
    run_ok(Command::new("wg").arg("genkey")).trim().to_owned()
}

/// Makes the child get `sig` when the spawning thread dies, so a killed test
/// run leaves no daemons behind.
fn die_with_parent(cmd: &mut Command, sig: libc::c_int) {
    // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaps the child.
pub fn terminate(child: &mut Child, grace: Duration) -> ExitStatus {
    if let Ok(Some(status)) = child.try_wait() {
        return status;
    }
    signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    child.wait().expect("cannot reap child")
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, f: impl FnMut() -> Option<T>) -> Option<T> {
    wait_for_every(timeout, Duration::from_millis(20), f)
}

/// [`wait_for`], looking every `interval`: a check that is itself costly
/// (spawning `nft`) should leave the machine to what it is waiting for.
pub fn wait_for_every<T>(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(interval);
    }
}

/// An anonymous log file for a child's stdout and stderr.
struct LogFile(File);

impl LogFile {
    fn new() -> Self {
        Self(tempfile::tempfile().expect("cannot create a log file"))
    }
    fn stdio(&self) -> (Stdio, Stdio) {
        (
            Stdio::from(self.0.try_clone().unwrap()),
            Stdio::from(self.0.try_clone().unwrap()),
        )
    }
    /// Everything written so far. Reads with `pread`: the child's fds share
    /// the file offset, so seeking here would make it overwrite its log.
    fn text(&self) -> String {
        use std::os::unix::fs::FileExt;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match self.0.read_at(&mut chunk, buf.len() as u64) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

// ---------------------------------------------------------------------------
// Network namespaces

/// Deletes namespaces left by earlier runs of test processes that no longer
/// exist (e.g. a run killed by a timeout): `sxt-<dead pid>-<n>`.
fn sweep_stale_namespaces() {
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

fn namespace_pids(name: &str) -> Vec<libc::pid_t> {
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
fn kill_namespace_processes(name: &str) {
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
/// The underlay link `n` of a test topology: a veth from the gateway's
/// namespace (`gw_if`, `fd53:n::1/64`) to `other`'s `to-gw` (`fd53:n::2/64`).
pub fn underlay_link(gw_ns: &Netns, gw_if: &str, other: &Netns, n: u16) {
    let (gw_addr, other_addr) = (format!("fd53:{n:x}::1/64"), format!("fd53:{n:x}::2/64"));
    veth(gw_ns, gw_if, &[&gw_addr], other, "to-gw", &[&other_addr]);
}

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

/// A DNS query for `name`'s AAAA records, in wire format, with id `id`.
pub fn aaaa_query(id: u16, name: &str) -> Vec<u8> {
    let mut m = hickory_proto::op::Message::query();
    m.metadata.id = id;
    m.add_query(hickory_proto::op::Query::query(
        hickory_proto::rr::Name::from_ascii(name).unwrap(),
        hickory_proto::rr::RecordType::AAAA,
    ));
    m.to_vec().unwrap()
}

// ---------------------------------------------------------------------------
// wireguard-go

/// A `wireguard-go -f IFACE` running in a namespace; SIGTERM (then SIGKILL)
/// and reaped on drop, its UAPI socket removed.
pub struct WireguardGo {
    child: Option<Child>,
    iface: String,
    log: LogFile,
}

/// The UAPI socket path of `iface`.
pub fn wg_socket(iface: &str) -> PathBuf {
    Path::new(WG_SOCKET_DIR).join(format!("{iface}.sock"))
}

/// Starts `ip netns exec NS wireguard-go -f IFACE` and waits (up to 10 s)
/// until its UAPI socket accepts connections. `iface` must be unique on the
/// host (see [`unique_ifname`]): the socket directory is global.
pub fn start_wireguard_go(ns: &Netns, iface: &str) -> WireguardGo {
    assert!(iface.len() <= 15, "interface name {iface} too long");
    let sock = wg_socket(iface);
    if sock.exists() {
        assert!(
            UnixStream::connect(&sock).is_err(),
            "{} is in use by another wireguard-go: interface names must be unique",
            sock.display()
        );
        let _ = std::fs::remove_file(&sock);
    }
    let log = LogFile::new();
    let (out, err) = log.stdio();
    let mut cmd = ns.cmd("wireguard-go");
    cmd.args(["-f", iface])
        .env("LOG_LEVEL", "error")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    die_with_parent(&mut cmd, libc::SIGTERM);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", cmdline(&cmd)));
    let mut wg = WireguardGo {
        child: Some(child),
        iface: iface.to_owned(),
        log,
    };
    let ready = wait_for(scaled(READY_TIMEOUT), || {
        if let Ok(Some(status)) = wg.child.as_mut().unwrap().try_wait() {
            panic!(
                "wireguard-go -f {iface} exited ({status}) before it was ready:\n{}",
                wg.log.text()
            );
        }
        UnixStream::connect(&sock).ok().map(|_| ())
    });
    if ready.is_none() {
        panic!(
            "wireguard-go -f {iface}: {} did not accept connections within {:?}:\n{}",
            sock.display(),
            scaled(READY_TIMEOUT),
            wg.log.text()
        );
    }
    wg
}

impl WireguardGo {
    /// The interface name.
    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// The UAPI socket.
    pub fn socket(&self) -> PathBuf {
        wg_socket(&self.iface)
    }

    /// What wireguard-go printed so far.
    pub fn log(&self) -> String {
        self.log.text()
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(2));
        }
        let sock = self.socket();
        if sock.exists() && UnixStream::connect(&sock).is_err() {
            let _ = std::fs::remove_file(sock);
        }
    }
}

/// Writes `DIR/wg-userspace.sh`, a `WG_QUICK_USERSPACE_IMPLEMENTATION` for
/// stock `wg-quick up` on hosts without the WireGuard module: it runs
/// `setsid wireguard-go -f IFACE` in the background (wireguard-go's own
/// daemonizing mode is fragile) and waits for the UAPI socket. The process
/// lives in wg-quick's namespace, so dropping the [`Netns`] ends it.
pub fn wg_quick_userspace_script(dir: &Path) -> PathBuf {
    let path = dir.join("wg-userspace.sh");
    std::fs::write(
        &path,
        r#"#!/bin/sh
# WG_QUICK_USERSPACE_IMPLEMENTATION for tests: wireguard-go in the foreground,
# detached from wg-quick, ready once its UAPI socket exists.
iface="$1"
sock="/var/run/wireguard/$iface.sock"
LOG_LEVEL="${LOG_LEVEL:-error}" setsid wireguard-go -f "$iface" </dev/null >/dev/null 2>&1 &
i=0
while [ "$i" -lt 200 ]; do
    [ -S "$sock" ] && exit 0
    sleep 0.05
    i=$((i + 1))
done
echo "wg-userspace.sh: wireguard-go did not create $sock" >&2
exit 1
"#,
    )
    .expect("cannot write the wg-quick userspace script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Receives sd_notify datagrams on `sock` until one has the line `want` or
/// `limit` passes; every datagram seen is appended to `seen`.
pub fn await_notify(
    sock: &UnixDatagram,
    want: &str,
    limit: Duration,
    seen: &mut Vec<String>,
) -> bool {
    let t0 = Instant::now();
    let mut buf = [0u8; 512];
    while t0.elapsed() < limit {
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = msg.lines().any(|l| l == want);
            seen.push(msg);
            if hit {
                return true;
            }
        }
    }
    false
}

/// Drops the `DNS =` line from a wg-quick file: wg-quick would hand it to
/// resolvconf, which changes the host.
pub fn strip_dns_line(conf: &Path) {
    let text = std::fs::read_to_string(conf).unwrap();
    let kept: String = text
        .lines()
        .filter(|l| !l.starts_with("DNS"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(conf, kept).unwrap();
}

/// `ip netns exec NS wg-quick ARGS…` with the userspace `script`; panics
/// unless it succeeds. Drop the `DNS =` line from the file first: wg-quick
/// would hand it to resolvconf, which changes the host.
pub fn wg_quick(ns: &Netns, script: &Path, args: &[&str]) -> String {
    let mut c = ns.cmd("wg-quick");
    c.args(args)
        .env("WG_QUICK_USERSPACE_IMPLEMENTATION", script)
        .env("LOG_LEVEL", "error");
    run_ok(&mut c)
}

// ---------------------------------------------------------------------------
// The gateway daemon

/// Builds a [`Gateway`]: `Gateway::builder().netns(&ns).start()`.
#[derive(Debug, Clone)]
pub struct GatewayBuilder {
    name: String,
    region: String,
    host_id: String,
    endpoint: Option<String>,
    interface: Option<String>,
    listen_port: Option<u16>,
    gateway_toml: Vec<String>,
    extra_toml: String,
    netns: Option<String>,
    store_path: Option<PathBuf>,
    store_toml: Vec<String>,
    env: Vec<(String, String)>,
}

impl Default for GatewayBuilder {
    fn default() -> Self {
        Self {
            name: "lhr-1".into(),
            region: "lhr".into(),
            host_id: "a7b:d6b".into(),
            endpoint: None,
            interface: None,
            listen_port: None,
            gateway_toml: Vec::new(),
            extra_toml: String::new(),
            netns: None,
            store_path: None,
            store_toml: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// Quotes a TOML basic string.
pub fn toml_str(s: &str) -> String {
    let mut q = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

impl GatewayBuilder {
    /// `gateway.name` (default `lhr-1`).
    pub fn name(mut self, v: &str) -> Self {
        self.name = v.into();
        self
    }
    /// `gateway.region` (default `lhr`).
    pub fn region(mut self, v: &str) -> Self {
        self.region = v.into();
        self
    }
    /// `gateway.host_id` (default `a7b:d6b`).
    pub fn host_id(mut self, v: &str) -> Self {
        self.host_id = v.into();
        self
    }
    /// `gateway.endpoint` (default `127.0.0.1:<listen port>`).
    pub fn endpoint(mut self, v: &str) -> Self {
        self.endpoint = Some(v.into());
        self
    }
    /// `gateway.interface` (default: a fresh [`unique_ifname`]).
    pub fn interface(mut self, v: &str) -> Self {
        self.interface = Some(v.into());
        self
    }
    /// `gateway.listen_port` (default: 51820 in a namespace, else a free port).
    pub fn listen_port(mut self, v: u16) -> Self {
        self.listen_port = Some(v);
        self
    }
    /// A raw `key = value` line for the `[gateway]` table, e.g.
    /// `backend = "userspace"`.
    pub fn gateway_toml(mut self, line: &str) -> Self {
        self.gateway_toml.push(line.into());
        self
    }
    /// TOML appended after the generated file, e.g. `[dns]\nupstream = […]`
    /// (start with a table header: the file ends inside `[api]`).
    pub fn extra_toml(mut self, text: &str) -> Self {
        self.extra_toml.push('\n');
        self.extra_toml.push_str(text);
        self.extra_toml.push('\n');
        self
    }
    /// Runs the daemon inside `ns` (`ip netns exec NS sixpn gateway …`). The
    /// API socket is a file, so the CLI still reaches it from the host.
    /// The usual test gateway: in `ns`, dialled at `[fd53:1::1]:51820` (the
    /// gateway end of the first underlay veth), on the WireGuard backend
    /// the tier asks for ([`test_backend`]).
    pub fn underlay(self, ns: &Netns) -> Self {
        self.netns(ns)
            .endpoint("[fd53:1::1]:51820")
            .listen_port(51820)
            .gateway_toml(&format!("backend = \"{}\"", test_backend()))
    }

    pub fn netns(mut self, ns: &Netns) -> Self {
        self.netns = Some(ns.name.clone());
        self
    }
    /// `store.path` (default: `state.db` in the gateway's temp dir); share a
    /// file between gateways with this.
    pub fn store_path(mut self, p: impl Into<PathBuf>) -> Self {
        self.store_path = Some(p.into());
        self
    }
    /// A raw `key = value` line for the `[store]` table, e.g.
    /// `kind = "etcd"`.
    pub fn store_toml(mut self, line: &str) -> Self {
        self.store_toml.push(line.into());
        self
    }
    /// An environment variable for the daemon (e.g. `SIXPN_LOG=debug`).
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Writes the config, starts the daemon and waits until its API answers
    /// (up to 10 s); panics with the daemon's log if it doesn't.
    pub fn start(self) -> Gateway {
        let dir = tempfile::Builder::new()
            .prefix("sixpn-test-")
            .tempdir()
            .expect("cannot create a temp dir");
        let d = dir.path();
        // The daemon owns a WireGuard interface: unless the test chose a
        // namespace, give it a private one so nothing lands in the host's.
        let mut this = self;
        let own_ns = if this.netns.is_none() {
            assert!(
                is_root(),
                "a gateway needs root (it creates its WireGuard interface); \
                 call require_root!() first"
            );
            let ns = Netns::new();
            this.netns = Some(ns.name.clone());
            Some(ns)
        } else {
            None
        };
        let self_ = this;
        let interface = self_.interface.clone().unwrap_or_else(unique_ifname);
        let listen_port = self_.listen_port.unwrap_or_else(|| {
            if self_.netns.is_some() {
                51820
            } else {
                free_udp_port()
            }
        });
        let endpoint = self_
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:{listen_port}"));
        let key_file = d.join("gw.key");
        let db_path = self_
            .store_path
            .clone()
            .unwrap_or_else(|| d.join("state.db"));
        let socket = d.join("api.sock");
        let config_path = d.join("gateway.toml");
        let mut toml = format!(
            "[gateway]\nname = {}\nregion = {}\nhost_id = {}\ninterface = {}\n\
             listen_port = {listen_port}\nendpoint = {}\nprivate_key_file = {}\n",
            toml_str(&self_.name),
            toml_str(&self_.region),
            toml_str(&self_.host_id),
            toml_str(&interface),
            toml_str(&endpoint),
            toml_str(&key_file.to_string_lossy()),
        );
        for line in &self_.gateway_toml {
            toml.push_str(line);
            toml.push('\n');
        }
        toml.push_str(&format!(
            "\n[store]\npath = {}\n",
            toml_str(&db_path.to_string_lossy())
        ));
        for line in &self_.store_toml {
            toml.push_str(line);
            toml.push('\n');
        }
        toml.push_str(&format!(
            "\n[api]\nsocket = {}\nadmin_token_file = {}\n",
            toml_str(&socket.to_string_lossy()),
            toml_str(&d.join("admin.token").to_string_lossy()),
        ));
        toml.push_str(&self_.extra_toml);
        std::fs::write(&config_path, &toml).expect("cannot write the gateway config");

        let mut gw = Gateway {
            name: self_.name.clone(),
            region: self_.region.clone(),
            host_id: self_.host_id.clone(),
            endpoint,
            interface,
            listen_port,
            config_path,
            key_file,
            db_path,
            socket,
            netns: self_.netns.clone(),
            env: self_.env.clone(),
            child: None,
            own_ns,
            log: LogFile::new(),
            dir,
        };
        gw.spawn();
        gw
    }
}

/// A running `sixpn gateway` with its own temp dir (config, key, store, API
/// socket). SIGTERM then SIGKILL on drop; its log is printed if the test is
/// failing.
pub struct Gateway {
    /// `gateway.name`.
    pub name: String,
    /// `gateway.region`.
    pub region: String,
    /// `gateway.host_id`.
    pub host_id: String,
    /// `gateway.endpoint`.
    pub endpoint: String,
    /// `gateway.interface`.
    pub interface: String,
    /// `gateway.listen_port`.
    pub listen_port: u16,
    /// The TOML file.
    pub config_path: PathBuf,
    /// `gateway.private_key_file` (created by the daemon).
    pub key_file: PathBuf,
    /// `store.path`.
    pub db_path: PathBuf,
    /// `api.socket`.
    pub socket: PathBuf,
    netns: Option<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// The namespace the fixture made for the daemon (deleted after it stops).
    own_ns: Option<Netns>,
    log: LogFile,
    dir: tempfile::TempDir,
}

/// The WireGuard backend the tests run the gateway on: `userspace`
/// (wireguard-go) unless the tier sets `SIXPN_TEST_BACKEND` (the VM tier:
/// `kernel`).
pub fn test_backend() -> String {
    std::env::var("SIXPN_TEST_BACKEND").unwrap_or_else(|_| "userspace".into())
}

/// Makes the instance at `addr` live on `inst`: the address on its `lo`,
/// 6PN back through the gateway at `gw_side`, and the gateway's route to
/// the instance host's /80 via `inst_side`.
pub fn host_instance(
    gw_ns: &Netns,
    inst: &Netns,
    addr: Ipv6Addr,
    (gw_side, inst_side): (&str, &str),
) {
    inst.ip(&["-6", "addr", "add", &format!("{addr}/128"), "dev", "lo"]);
    inst.ip(&["-6", "route", "add", "fdaa::/16", "via", gw_side]);
    let s = addr.segments();
    let net = Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], 0, 0, 0);
    gw_ns.ip(&["-6", "route", "add", &format!("{net}/80"), "via", inst_side]);
}

impl Gateway {
    /// A builder with defaults (`lhr-1` in `lhr`, host id `a7b:d6b`).
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder::default()
    }

    /// Starts a gateway with the defaults.
    pub fn start() -> Self {
        Self::builder().start()
    }

    /// The gateway's temp dir (a good place for test files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The value for `SIXPN_API`.
    pub fn api(&self) -> &str {
        self.socket.to_str().expect("socket path is UTF-8")
    }

    /// The daemon's pid (the `ip netns exec` process execs into it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the daemon logged so far (stdout and stderr).
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// The gateway's private key file contents.
    pub fn private_key(&self) -> String {
        std::fs::read_to_string(&self.key_file)
            .expect("cannot read the gateway key")
            .trim()
            .to_owned()
    }

    fn spawn(&mut self) {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, SIXPN]);
                c
            }
            None => Command::new(SIXPN),
        };
        cmd.arg("gateway")
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("SIXPN_API")
            .env_remove("SIXPN_TOKEN")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let (out, err) = self.log.stdio();
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        die_with_parent(&mut cmd, libc::SIGTERM);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", cmdline(&cmd)));
        self.child = Some(child);
        let ready = wait_for(scaled(READY_TIMEOUT), || {
            if let Ok(Some(status)) = self.child.as_mut().unwrap().try_wait() {
                panic!(
                    "sixpn gateway exited ({status}) before it was ready.\nconfig:\n{}\nlog:\n{}",
                    std::fs::read_to_string(&self.config_path).unwrap_or_default(),
                    self.log()
                );
            }
            health(&self.socket).then_some(())
        });
        if ready.is_none() {
            panic!(
                "sixpn gateway: API at {} did not answer within {:?}; log:\n{}",
                self.socket.display(),
                scaled(READY_TIMEOUT),
                self.log()
            );
        }
    }

    /// SIGTERM, then SIGKILL after 5 s; returns how the daemon exited.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.child
            .take()
            .map(|mut c| terminate(&mut c, Duration::from_secs(5)))
    }

    /// Stops the daemon and starts it again on the same config and files.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The CLI command `sixpn ARGS…` with `SIXPN_API` pointing at this
    /// gateway and stdin from /dev/null (so it never prompts).
    pub fn cli_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(SIXPN);
        c.args(args)
            .env("SIXPN_API", self.api())
            .env_remove("SIXPN_TOKEN")
            .env_remove("SIXPN_LOG")
            .stdin(Stdio::null());
        c
    }

    /// Runs `sixpn ARGS…` against this gateway.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut c = self.cli_cmd(args);
        c.output()
            .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", cmdline(&c)))
    }

    /// `sixpn instances add ARGS…`; the instance's address.
    pub fn add_instance(&self, args: &[&str]) -> Ipv6Addr {
        let mut a = vec!["instances", "add"];
        a.extend_from_slice(args);
        let out = self.cli_ok(&a);
        out.split_whitespace()
            .last()
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("no address in {out:?}"))
    }

    /// Runs `sixpn ARGS…`; panics unless it succeeds; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "`sixpn {}` failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            stdout_of(&out),
            stderr_of(&out)
        );
        stdout_of(&out)
    }

    /// Runs `sixpn ARGS…`; panics if it succeeds; returns stderr.
    pub fn cli_fail(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "`sixpn {}` should have failed:\nstdout: {}\nstderr: {}",
            args.join(" "),
            stdout_of(&out),
            stderr_of(&out)
        );
        stderr_of(&out)
    }

    /// `sixpn ARGS… --json`, parsed.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli_ok(&a);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("`sixpn {}` printed bad JSON ({e}): {out}", a.join(" ")))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            // Captured by libtest and shown with the failure.
            eprintln!(
                "---- sixpn gateway {} log ----\n{}---- end of log ----",
                self.name,
                self.log()
            );
        }
    }
}

/// Whether a unix-socket API answers `GET /v1/health` with 200.
pub fn health(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: sixpn\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    buf[..n].starts_with(b"HTTP/1.1 200")
}
