//! WireGuard on the test side: client keys, wireguard-go as a gateway
//! device, and stock `wg-quick` clients run with wireguard-go underneath
//! (this machine has no WireGuard module; docs/architecture.md "Test tiers").

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::*;

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
