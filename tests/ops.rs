//! Operating sixpn: the systemd unit verifies, the Vagrantfile parses, the
//! daemon speaks systemd's notify protocol (ready after the first sync,
//! watchdog fed by the reconcile loop, reload on SIGHUP), and `/metrics` and
//! `/healthz` tell an operator what the gateway is doing.

#[macro_use]
mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{run, stderr_of, stdout_of, Gateway, Netns};

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/sixpn-gateway.service");

#[test]
fn systemd_unit_verifies() {
    require_tools!("systemd-analyze");
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart's binary exists: point it at this build.
    let text = std::fs::read_to_string(UNIT)
        .unwrap()
        .replace("/usr/local/bin/sixpn", env!("CARGO_BIN_EXE_sixpn"));
    for want in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=always",
        "ExecReload=",
        "KillMode=process",
        "ProtectSystem=strict",
        "StateDirectory=sixpn",
        "RuntimeDirectory=sixpn",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
    ] {
        assert!(text.contains(want), "unit lacks {want}");
    }
    let unit = dir.path().join("sixpn-gateway.service");
    std::fs::write(&unit, text).unwrap();
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&unit));
    assert!(
        out.status.success() && stderr_of(&out).trim().is_empty(),
        "systemd-analyze verify:\n{}{}",
        stdout_of(&out),
        stderr_of(&out)
    );
}

#[test]
fn vagrantfile_parses() {
    require_tools!("ruby");
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("vagrant/Vagrantfile");
    let out = run(Command::new("ruby").arg("-c").arg(&file));
    assert!(out.status.success(), "ruby -c: {}", stderr_of(&out));
    for script in [
        "provision-gateway.sh",
        "provision-host.sh",
        "provision-client.sh",
    ] {
        let p = file.with_file_name(script);
        let out = run(Command::new("bash").arg("-n").arg(&p));
        assert!(
            out.status.success(),
            "bash -n {script}: {}",
            stderr_of(&out)
        );
    }
}

fn get(gw: &Gateway, path: &str) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = sixpn::api::client::Client::new(gw.api(), None).unwrap();
    let (status, body) = rt
        .block_on(client.raw(hyper::Method::GET, path, Vec::new()))
        .unwrap();
    (status.as_u16(), String::from_utf8_lossy(&body).into_owned())
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn notify_readiness_watchdog_reload_metrics_and_healthz() {
    require_root!();
    require_tools!("ip", "wireguard-go");
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let ns = Netns::new();
    // Started with the usual soft limit of 1024 open files (inherited from
    // us), the daemon raises it to the hard limit.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write `lim`.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    let ours = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max.min(1024);
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    let mut gw = Gateway::builder()
        .netns(&ns)
        .gateway_toml("backend = \"userspace\"")
        .env("NOTIFY_SOCKET", sock_path.to_str().unwrap())
        .env("WATCHDOG_USEC", "1500000")
        .start();
    lim.rlim_cur = ours;
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    let mut seen = Vec::new();
    assert!(
        common::await_notify(&sock, "READY=1", Duration::from_secs(10), &mut seen),
        "no READY=1; got {seen:?}\n{}",
        gw.log()
    );
    // The watchdog is fed at a third of WATCHDOG_USEC while the loop runs.
    assert!(
        common::await_notify(&sock, "WATCHDOG=1", Duration::from_secs(3), &mut seen),
        "no WATCHDOG=1; got {seen:?}"
    );

    let limits = std::fs::read_to_string(format!("/proc/{}/limits", gw.pid().unwrap())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        open_files[3],
        lim.rlim_max.to_string(),
        "soft limit not raised to the hard one: {open_files:?}"
    );

    let (code, body) = get(&gw, "/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"last_sync\""), "{body}");

    gw.cli_ok(&["orgs", "create", "acme"]);
    gw.cli_ok(&["wireguard", "create", "acme", "lhr", "laptop", "stdout"]);
    let (code, text) = get(&gw, "/metrics");
    assert_eq!(code, 200);
    assert_eq!(metric(&text, "sixpn_peers_installed"), Some(1.0), "{text}");
    assert_eq!(metric(&text, "sixpn_peers_registered"), Some(1.0), "{text}");
    assert!(metric(&text, "sixpn_reconcile_passes_total").unwrap() >= 2.0);
    assert!(metric(&text, "sixpn_kernel_changes_total").unwrap() >= 3.0);
    assert!(
        text.contains("sixpn_org_peers_installed{org=\"acme\"} 1"),
        "{text}"
    );
    assert!(text.contains("# TYPE sixpn_peer_handshake_age_seconds histogram"));
    assert!(
        text.contains("sixpn_dns_queries_total{transport=\"udp\"}"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE sixpn_firewall_dropped_packets_total counter"),
        "{text}"
    );
    assert!(
        text.contains("sixpn_firewall_dropped_packets_total{counter=\"forward_dropped\"}"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE sixpn_guard_dropped_packets_total counter"),
        "{text}"
    );

    // SIGHUP re-reads the config: RELOADING=1 then READY=1, still running.
    let pid = gw.pid().unwrap() as i32;
    unsafe {
        libc::kill(pid, libc::SIGHUP);
    }
    assert!(common::await_notify(
        &sock,
        "RELOADING=1",
        Duration::from_secs(3),
        &mut seen
    ));
    assert!(common::await_notify(
        &sock,
        "READY=1",
        Duration::from_secs(3),
        &mut seen
    ));
    assert!(
        gw.log()
            .contains("reload: configuration valid and unchanged"),
        "{}",
        gw.log()
    );
    gw.cli_ok(&["orgs", "list"]);

    // A broken config on reload is reported; the daemon keeps going.
    let good = std::fs::read_to_string(&gw.config_path).unwrap();
    std::fs::write(&gw.config_path, format!("{good}\nbogus_key = 1\n")).unwrap();
    unsafe {
        libc::kill(pid, libc::SIGHUP);
    }
    assert!(common::await_notify(
        &sock,
        "READY=1",
        Duration::from_secs(3),
        &mut seen
    ));
    assert!(
        gw.log().contains("keeping the running configuration"),
        "{}",
        gw.log()
    );
    gw.cli_ok(&["orgs", "list"]);
    std::fs::write(&gw.config_path, good).unwrap();

    let status = gw.stop().unwrap();
    assert!(status.success(), "SIGTERM exit: {status}");
    assert!(
        common::await_notify(&sock, "STOPPING=1", Duration::from_secs(1), &mut seen)
            || seen.iter().any(|m| m.contains("STOPPING=1"))
    );
}

#[test]
fn a_second_daemon_on_the_same_interface_refuses_to_start() {
    require_root!();
    require_tools!("ip", "wireguard-go");
    let ns = Netns::new();
    let gw = Gateway::builder()
        .netns(&ns)
        .gateway_toml("backend = \"userspace\"")
        .start();
    gw.cli_ok(&["orgs", "create", "acme"]);
    let first = gw.pid().expect("the first daemon runs");

    // A second daemon, its own key, store and socket, the same interface.
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(&gw.config_path)
        .unwrap()
        .replace(gw.dir().to_str().unwrap(), dir.path().to_str().unwrap());
    let second = dir.path().join("gateway.toml");
    std::fs::write(&second, config).unwrap();
    let err = refused_start(&ns, &second);
    assert!(err.contains(&gw.interface), "{err}");
    assert!(err.contains(&format!("pid {first}")), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    // The first one never noticed: it goes on to match the store.
    assert_eq!(gw.pid(), Some(first));
    let healthy = common::wait_for(Duration::from_secs(10), || {
        common::health(&gw.socket).then_some(())
    });
    assert!(healthy.is_some(), "{}", gw.log());
    assert!(!gw.log().contains("already managed"), "{}", gw.log());
}

/// A second daemon's config: `gw`'s, with its own dir for key, socket and
/// token, the store shared unless `own_store`; then `edit` on the text.
fn second_config(gw: &Gateway, dir: &Path, edit: impl Fn(String) -> String) -> std::path::PathBuf {
    let db = gw.db_path.to_str().unwrap().to_owned();
    let text = std::fs::read_to_string(&gw.config_path)
        .unwrap()
        .replace(&db, "@DB@")
        .replace(gw.dir().to_str().unwrap(), dir.to_str().unwrap())
        .replace("@DB@", &db);
    let path = dir.join("gateway.toml");
    std::fs::write(&path, edit(text)).unwrap();
    path
}

/// The gateways registered in `gw`'s store: name, key, endpoint, a line each.
fn gateways(gw: &Gateway) -> String {
    let out = run(Command::new("sqlite3")
        .arg(&gw.db_path)
        .arg("SELECT name, public_key, endpoint FROM gateways ORDER BY name"));
    stdout_of(&out)
}

/// Runs `sixpn gateway --config CONFIG` in `ns`, which must refuse to start
/// (exit non-zero, not run until killed); its stderr.
fn refused_start(ns: &Netns, config: &Path) -> String {
    let out = run_gateway(ns, config, &[]);
    let err = stderr_of(&out);
    assert!(!out.status.success(), "it started: {err}");
    assert_ne!(out.status.code(), Some(124), "it ran until killed: {err}");
    err
}

/// A config in `dir` for a gateway of its own (own store, socket and a
/// fresh interface name); returns its path.
fn lone_config(dir: &Path, name: &str, host_id: &str, port: u16, backend: &str) -> PathBuf {
    let d = dir.to_str().unwrap();
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nname = \"{name}\"\nregion = \"lhr\"\nhost_id = \"{host_id}\"\n\
             interface = \"{}\"\nendpoint = \"127.0.0.1:{port}\"\nlisten_port = {port}\n\
             private_key_file = \"{d}/gw.key\"\nbackend = \"{backend}\"\n\
             [store]\npath = \"{d}/state.db\"\n[api]\nsocket = \"{d}/api.sock\"\n",
            common::unique_ifname()
        ),
    )
    .unwrap();
    config
}

/// Runs `sixpn gateway --config CONFIG ARGS…` in `ns` for at most 20 s,
/// with the usual soft open-files limit of 1024 below a higher hard one (as
/// on a stock host), so the daemon has a limit to raise.
fn run_gateway(ns: &Netns, config: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = ns.cmd("prlimit");
    cmd.args([
        "--nofile=1024:4096",
        "timeout",
        "20",
        common::SIXPN,
        "gateway",
        "--config",
    ])
    .arg(config)
    .args(args);
    run(&mut cmd)
}

#[test]
fn a_gateway_name_is_an_identity_a_clone_cannot_take() {
    require_root!();
    require_tools!("ip", "wireguard-go");
    let gw = Gateway::builder()
        .gateway_toml("backend = \"userspace\"")
        .start();
    gw.cli_ok(&["orgs", "create", "acme"]);
    let before = gateways(&gw);
    // A cloned VM: the same name, another key, the same store.
    let dir = tempfile::tempdir().unwrap();
    let clone = second_config(&gw, dir.path(), |t| t);
    let ns = Netns::new();
    let err = refused_start(&ns, &clone);
    assert!(
        err.contains(&format!("gateway name '{}'", gw.name)),
        "{err}"
    );
    assert!(err.contains("--take-over"), "{err}");
    let first_key: String = common::wg_pubkey(&gw.private_key())
        .chars()
        .take(8)
        .collect();
    assert!(
        err.contains(&first_key),
        "the registered key's fingerprint: {err}"
    );
    // The first gateway's registration is untouched.
    assert_eq!(gateways(&gw), before);
}

#[test]
fn a_gateway_that_fails_to_start_is_never_chosen_for_new_peers() {
    require_root!();
    require_tools!("ip", "wireguard-go");
    let gw = Gateway::builder()
        .gateway_toml("backend = \"userspace\"")
        .start();
    gw.cli_ok(&["orgs", "create", "acme"]);
    // Another gateway of the region, on an interface it can't own.
    let dir = tempfile::tempdir().unwrap();
    let broken = second_config(&gw, dir.path(), |t| {
        t.replace(&format!("name = \"{}\"", gw.name), "name = \"lhr-9\"")
            .replace(
                &format!("host_id = \"{}\"", gw.host_id),
                "host_id = \"a7b:99\"",
            )
            .replace(
                &format!("interface = \"{}\"", gw.interface),
                "interface = \"lo\"",
            )
    });
    let ns = Netns::new();
    let out = run_gateway(&ns, &broken, &[]);
    assert!(!out.status.success(), "{}", stderr_of(&out));
    let registered = gateways(&gw);
    assert!(
        !registered.contains("lhr-9"),
        "the failed gateway is registered: {registered}"
    );
    for i in 0..4 {
        gw.cli_ok(&[
            "wireguard",
            "create",
            "acme",
            "lhr",
            &format!("p{i}"),
            "stdout",
        ]);
    }
    let peers = gw.cli_json(&["wireguard", "list", "acme"]).to_string();
    assert!(!peers.contains("lhr-9"), "{peers}");
}

#[test]
fn backend_kernel_without_the_module_fails_start_in_one_line() {
    require_root!();
    if Path::new("/sys/module/wireguard").exists() {
        eprintln!("SKIPPED backend_kernel_without_the_module_fails_start_in_one_line: this kernel has WireGuard");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = lone_config(dir.path(), "kt-1", "a7b:42", 51821, "kernel");
    let ns = Netns::new();
    let t0 = std::time::Instant::now();
    let err = refused_start(&ns, &config);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("Error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("backend = \"kernel\""), "{err}");
    assert!(errors[0].contains("userspace"), "{err}");
    // Never registered: no new peer is ever placed on it.
    let db = dir.path().join("state.db");
    if db.exists() {
        let out = run(Command::new("sqlite3")
            .arg(&db)
            .arg("SELECT name FROM gateways"));
        assert_eq!(stdout_of(&out).trim(), "", "registered");
    }
}

/// A child process killed (and reaped) however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_listen_port_in_use_fails_start_in_one_line() {
    require_root!();
    require_tools!("ip", "wireguard-go", "python3");
    let port = 51_830;
    let ns = Netns::new();
    // Another program holds the UDP port (v6 and, dual-stack, v4) there.
    let holder = format!(
        "import socket, time\n\
         s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
         s.bind(('::', {port}))\n\
         print('bound', flush=True)\n\
         time.sleep(60)\n"
    );
    let mut holder = KillOnDrop(
        ns.cmd("python3")
            .args(["-c", &holder])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    let out = holder.0.stdout.take().unwrap();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).unwrap();
    assert_eq!(line.trim(), "bound");

    let dir = tempfile::tempdir().unwrap();
    let config = lone_config(dir.path(), "pt-1", "a7b:43", port, "userspace");
    let t0 = std::time::Instant::now();
    let err = refused_start(&ns, &config);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("Error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains(&format!("UDP port {port}")), "{err}");
    assert!(errors[0].contains("in use"), "{err}");
    assert!(errors[0].contains("listen_port"), "{err}");
    // Never registered: no new peer is ever placed on it.
    let out = run(Command::new("sqlite3")
        .arg(dir.path().join("state.db"))
        .arg("SELECT name FROM gateways"));
    assert_eq!(stdout_of(&out).trim(), "", "registered");
    drop(holder);
}
