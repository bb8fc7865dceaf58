//! The control API over HTTPS: the real daemon with a certificate made by
//! `openssl` for the test, driven by the real CLI with `SIXPN_CA` and an
//! org token; a CA that didn't sign it; a certificate renewed under a
//! running daemon; and plain HTTP off loopback refused at start.

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{stderr_of, stdout_of, Gateway, Netns};

/// A CA (`NAME.pem`, `NAME.key`) in `dir`; its certificate's path.
fn ca(dir: &Path, name: &str) -> PathBuf {
    sixpn::testkit::certs::make_ca(dir, name);
    dir.join(format!("{name}.pem"))
}

/// A server certificate for 127.0.0.1 signed by `ca`, written to
/// `server.pem` / `server.key` (0600); returns its serial as openssl prints it.
fn server_cert(dir: &Path, ca_name: &str) -> String {
    sixpn::testkit::certs::make_leaf(dir, ca_name, "server", "127.0.0.1");
    serial_of(&std::fs::read(dir.join("server.pem")).unwrap())
}

/// `serial=…` of a PEM certificate.
fn serial_of(pem: &[u8]) -> String {
    let mut c = Command::new("openssl");
    c.args(["x509", "-noout", "-serial"]);
    common::run_with_input(&mut c, std::str::from_utf8(pem).unwrap())
        .trim()
        .to_owned()
}

/// The serial of the certificate the server at `addr` in `ns` presents now.
fn served_serial(ns: &Netns, addr: &str) -> String {
    let mut c = ns.cmd("openssl");
    c.args(["s_client", "-connect", addr, "-showcerts"]);
    let shown = common::run_with_input(&mut c, "");
    let start = shown
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a certificate");
    let end = shown.find("-----END CERTIFICATE-----").expect("its end") + 25;
    serial_of(&shown.as_bytes()[start..end])
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_cli_works_over_https_with_an_org_token_and_a_renewed_certificate() {
    require_root!();
    require_tools!("ip", "wireguard-go", "openssl");
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    let ca_pem = ca(dir, "ca");
    let other_ca = ca(dir, "other-ca");
    let first = server_cert(dir, "ca");
    let port = free_port();
    // The API listens on the namespace's loopback; the CLI runs there too.
    let ns = Netns::new();
    let gw = Gateway::builder()
        .netns(&ns)
        .gateway_toml("backend = \"userspace\"")
        .extra_toml(&format!(
            "listen = \"127.0.0.1:{port}\"\ntls_cert_file = {:?}\ntls_key_file = {:?}",
            dir.join("server.pem"),
            dir.join("server.key")
        ))
        .start();
    assert!(gw.log().contains("API listening on HTTPS"), "{}", gw.log());
    gw.cli_ok(&["orgs", "create", "acme"]);
    let token = gw.cli_ok(&["orgs", "token", "acme"]).trim().to_owned();
    let api = format!("https://127.0.0.1:{port}");
    let in_ns = |args: &[&str]| {
        let mut c = ns.cmd(common::SIXPN);
        c.args(args)
            .env_remove("SIXPN_LOG")
            .stdin(std::process::Stdio::null());
        c
    };
    let cli = |ca: &Path, args: &[&str]| {
        let mut c = in_ns(args);
        c.env("SIXPN_API", &api)
            .env("SIXPN_TOKEN", &token)
            .env("SIXPN_CA", ca);
        c.output().unwrap()
    };

    let out = cli(
        &ca_pem,
        &["wireguard", "create", "acme", "lhr", "laptop", "stdout"],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(stdout_of(&out).contains("[Interface]"));
    let out = cli(&ca_pem, &["wireguard", "list", "acme", "--json"]);
    assert!(stdout_of(&out).contains("laptop"), "{}", stderr_of(&out));
    let out = cli(&ca_pem, &["wireguard", "remove", "acme", "laptop"]);
    assert!(out.status.success(), "{}", stderr_of(&out));

    // A CA that didn't sign the API's certificate: one line, nothing sent.
    let out = cli(
        &other_ca,
        &["wireguard", "create", "acme", "lhr", "evil", "stdout"],
    );
    assert!(!out.status.success());
    let err = stderr_of(&out);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("Error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        errors[0].contains("TLS") && errors[0].contains("SIXPN_CA"),
        "{err}"
    );
    assert!(!gw
        .cli_ok(&["wireguard", "list", "acme", "--json"])
        .contains("evil"));
    // Plain HTTP to the HTTPS port gets nothing done either.
    let mut c = in_ns(&["orgs", "list"]);
    c.env("SIXPN_API", format!("http://127.0.0.1:{port}"))
        .env("SIXPN_TOKEN", &token);
    assert!(!c.output().unwrap().status.success());

    // A renewed certificate: SIGHUP, and new connections get it.
    let addr = format!("127.0.0.1:{port}");
    assert_eq!(served_serial(&ns, &addr), first);
    let renewed = server_cert(dir, "ca");
    assert_ne!(renewed, first);
    let pid = gw.pid().unwrap() as i32;
    unsafe {
        libc::kill(pid, libc::SIGHUP);
    }
    let swapped = common::wait_for_every(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(5),
        || (served_serial(&ns, &addr) == renewed).then_some(()),
    );
    assert!(
        swapped.is_some(),
        "still the old certificate:\n{}",
        gw.log()
    );
    let out = cli(&ca_pem, &["orgs", "list"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(gw.pid(), Some(pid as u32));
}

#[test]
fn plain_http_off_loopback_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_string_lossy();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nregion = \"lhr\"\nhost_id = \"a7b:d6b\"\nendpoint = \"127.0.0.1:51820\"\n\
             private_key_file = \"{d}/gw.key\"\n[store]\npath = \"{d}/state.db\"\n\
             [api]\nsocket = \"{d}/api.sock\"\nlisten = \"[::]:4280\"\n"
        ),
    )
    .unwrap();
    let out = Command::new(common::SIXPN)
        .args(["gateway", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("insecure_http") && err.contains("tls_cert_file"),
        "{err}"
    );
    assert!(!dir.path().join("state.db").exists(), "nothing was started");
}
