//! End-to-end CLI tests: the real `sixpn gateway` daemon on a temp config,
//! driven by the real `sixpn` binary as a user would (docs/architecture.md "Configuration and CLI"), and
//! the wg-quick file it writes checked with the stock WireGuard tools.
//!
//! Needs `wg` (wireguard-tools). The test that loads the file into a
//! wireguard-go interface also needs root, `ip`, `wg-quick` and
//! `wireguard-go`; without them it is skipped loudly, or fails under CI.

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::net::Ipv6Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{run_ok, stderr_of, stdout_of, Gateway, Netns};
use serde_json::Value;

const WROTE: &str = "Wrote WireGuard configuration to";
const WARNING: &str = "WARNING: Output includes private key. Private keys cannot be recovered";

/// A gateway with the org `personal`; returns it and the org's /48.
fn gateway_with_org() -> (Gateway, String) {
    let gw = Gateway::start();
    let out = gw.cli_ok(&["orgs", "create", "personal"]);
    assert!(out.starts_with("Created org personal"), "{out}");
    let prefix = org_prefix(&gw, "personal");
    (gw, prefix)
}

/// The org's /48 from `orgs list --json`.
fn org_prefix(gw: &Gateway, org: &str) -> String {
    let orgs = gw.cli_json(&["orgs", "list"]);
    let o = orgs
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == org)
        .unwrap_or_else(|| panic!("org {org} not in {orgs}"));
    o["prefix"].as_str().unwrap().to_owned()
}

/// The org's DNS address, `<prefix>::3`, derived here from the /48.
fn dns_of(prefix: &str) -> Ipv6Addr {
    let (net, len) = prefix.split_once('/').unwrap();
    assert_eq!(len, "48", "{prefix}");
    let mut s = net.parse::<Ipv6Addr>().unwrap().segments();
    assert!(s[3..].iter().all(|&g| g == 0), "{prefix} has host bits");
    s[7] = 3;
    Ipv6Addr::from(s)
}

fn in_prefix(addr: Ipv6Addr, prefix: &str) -> bool {
    let net: Ipv6Addr = prefix.split_once('/').unwrap().0.parse().unwrap();
    addr.segments()[..3] == net.segments()[..3]
}

/// `wireguard list ORG --json`.
fn peers(gw: &Gateway, org: &str) -> Value {
    gw.cli_json(&["wireguard", "list", org])
}

fn peer<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("peer {name} not in {list}"))
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Checks a failed command's stderr: exactly one `Error:` line, the last
/// one, mentioning every needle; no panic.
fn assert_one_error_line(stderr: &str, needles: &[&str]) {
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("Error")).collect();
    assert_eq!(errors.len(), 1, "want one error line, got:\n{stderr}");
    assert!(errors[0].starts_with("Error: "), "{stderr}");
    assert_eq!(
        stderr.lines().rfind(|l| !l.trim().is_empty()),
        Some(errors[0]),
        "the error should be the last line:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(
            errors[0].contains(n),
            "error line should mention {n:?}: {}",
            errors[0]
        );
    }
}

/// The value of `key = value` in a wg-quick file.
fn field<'a>(conf: &'a str, key: &str) -> Option<&'a str> {
    conf.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim())
    })
}

/// A table printed by the CLI: columns separated by two or more spaces.
fn table(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

#[test]
fn create_writes_the_contract_file() {
    require_root!();
    require_tools!("wg");
    let (gw, prefix) = gateway_with_org();
    let file = gw.dir().join("basic.conf");
    let out = gw.cli(&[
        "wireguard",
        "create",
        "personal",
        "lhr",
        "basic",
        path_str(&file),
    ]);
    let (stdout, stderr) = (stdout_of(&out), stderr_of(&out));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stdout,
        format!(
            "Wrote WireGuard configuration to '{}'; load in your WireGuard client\n",
            file.display()
        )
    );
    assert!(
        stderr.contains(WARNING),
        "no private key warning:\n{stderr}"
    );
    assert!(!stderr.contains("Error"), "{stderr}");

    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the file holds a private key: mode {mode:o}");

    let conf = std::fs::read_to_string(&file).unwrap();
    let list = peers(&gw, "personal");
    let p = peer(&list, "basic");
    assert_eq!(p["region"], "lhr");
    assert_eq!(p["gateway"], gw.name.as_str());
    let address: Ipv6Addr = p["address"].as_str().unwrap().parse().unwrap();
    // The first peer of this gateway: slot 0 of `0:a`, `…:a7b:d6b:0:a:2`.
    let s = address.segments();
    assert!(in_prefix(address, &prefix), "{address} not in {prefix}");
    assert_eq!(s[3..], [0xa7b, 0xd6b, 0, 0xa, 2], "{address}");

    let private = field(&conf, "PrivateKey")
        .expect("no PrivateKey")
        .to_owned();
    let gateway_public = common::wg_pubkey(&gw.private_key());
    let expected = format!(
        "[Interface]\n\
         PrivateKey = {private}\n\
         Address = {address}/120\n\
         DNS = {dns}\n\
         \n\
         [Peer]\n\
         PublicKey = {gateway_public}\n\
         AllowedIPs = {prefix}\n\
         Endpoint = {endpoint}\n\
         PersistentKeepalive = 15\n",
        dns = dns_of(&prefix),
        endpoint = gw.endpoint,
    );
    assert_eq!(conf, expected);
    assert_eq!(p["gateway_public_key"], gateway_public.as_str());
    // The registered key is the public half of the key in the file.
    assert_eq!(p["public_key"], common::wg_pubkey(&private).as_str());
}

#[test]
fn created_file_loads_into_wireguard_go() {
    require_root!();
    require_tools!("ip", "wg", "wg-quick", "wireguard-go");
    // The gateway runs in a namespace of its own, as later dataplane tests do.
    let gw_ns = Netns::new();
    let gw = Gateway::builder().netns(&gw_ns).start();
    gw.cli_ok(&["orgs", "create", "personal"]);
    let prefix = org_prefix(&gw, "personal");
    let dir = tempfile::tempdir().unwrap();
    // wg-quick takes the interface name from the file name.
    let file = dir.path().join("basic.conf");
    gw.cli_ok(&[
        "wireguard",
        "create",
        "personal",
        "lhr",
        "basic",
        path_str(&file),
    ]);
    let list = peers(&gw, "personal");
    let p = peer(&list, "basic");
    let address = p["address"].as_str().unwrap();
    let gateway_public = common::wg_pubkey(&gw.private_key());

    // `wg-quick strip` keeps what `wg setconf` takes.
    let stripped = run_ok(Command::new("wg-quick").arg("strip").arg(&file));
    for gone in ["Address", "DNS"] {
        assert!(field(&stripped, gone).is_none(), "{gone} in\n{stripped}");
    }
    let stripped_file = dir.path().join("stripped.conf");
    std::fs::write(&stripped_file, &stripped).unwrap();

    let client = Netns::new();
    let iface = common::unique_ifname();
    let wgo = common::start_wireguard_go(&client, &iface);
    client.run_ok(&["wg", "setconf", &iface, path_str(&stripped_file)]);
    let show = client.run_ok(&["wg", "show", &iface]);
    for want in [
        format!("peer: {gateway_public}"),
        format!("endpoint: {}", gw.endpoint),
        format!("allowed ips: {prefix}"),
        "persistent keepalive: every 15 seconds".to_owned(),
    ] {
        assert!(show.contains(&want), "`wg show` lacks {want:?}:\n{show}");
    }
    let public = client.run_ok(&["wg", "show", &iface, "public-key"]);
    assert_eq!(public.trim(), p["public_key"].as_str().unwrap());
    drop(wgo);
    assert!(
        !common::wg_socket(&iface).exists(),
        "wireguard-go left its socket"
    );

    // Stock `wg-quick up` (userspace) takes the file as written, minus the
    // DNS line, which would make it call resolvconf on the host.
    let up_ns = Netns::new();
    let up_iface = common::unique_ifname();
    let up_file = dir.path().join(format!("{up_iface}.conf"));
    std::fs::copy(&file, &up_file).unwrap();
    common::strip_dns_line(&up_file);
    std::fs::set_permissions(&up_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let script = common::wg_quick_userspace_script(dir.path());
    common::wg_quick(&up_ns, &script, &["up", path_str(&up_file)]);
    let addrs = up_ns.ip(&["-6", "addr", "show", "dev", &up_iface]);
    assert!(addrs.contains(&format!("{address}/120")), "{addrs}");
    let routes = up_ns.ip(&["-6", "route", "show", "dev", &up_iface]);
    assert!(routes.contains(&prefix), "no route to {prefix}:\n{routes}");
    let show = up_ns.run_ok(&["wg", "show", &up_iface]);
    assert!(show.contains(&format!("peer: {gateway_public}")), "{show}");
    common::wg_quick(&up_ns, &script, &["down", path_str(&up_file)]);
}

#[test]
fn create_refuses_an_existing_file() {
    require_root!();
    let (gw, _) = gateway_with_org();
    let file = gw.dir().join("peer.conf");
    let f = path_str(&file);
    gw.cli_ok(&["wireguard", "create", "personal", "lhr", "first", f]);
    let before_list = peers(&gw, "personal");
    let before_file = std::fs::read(&file).unwrap();

    let out = gw.cli(&["wireguard", "create", "personal", "lhr", "second", f]);
    assert!(!out.status.success());
    assert!(!stdout_of(&out).contains(WROTE), "{}", stdout_of(&out));
    assert_one_error_line(&stderr_of(&out), &[f, "exists"]);
    assert_eq!(std::fs::read(&file).unwrap(), before_file, "file changed");
    assert_eq!(peers(&gw, "personal"), before_list, "something registered");
}

#[test]
fn create_refuses_a_duplicate_name() {
    require_root!();
    let (gw, _) = gateway_with_org();
    let first = gw.dir().join("first.conf");
    let again = gw.dir().join("again.conf");
    gw.cli_ok(&[
        "wireguard",
        "create",
        "personal",
        "lhr",
        "basic",
        path_str(&first),
    ]);
    let before = peers(&gw, "personal");
    let stderr = gw.cli_fail(&[
        "wireguard",
        "create",
        "personal",
        "lhr",
        "basic",
        path_str(&again),
    ]);
    assert_one_error_line(&stderr, &["basic", "already exists"]);
    assert!(
        !again.exists(),
        "a file was left behind for a failed create"
    );
    assert_eq!(peers(&gw, "personal"), before);
}

#[test]
fn create_rejects_unknown_org_region_and_bad_names() {
    require_root!();
    let (gw, _) = gateway_with_org();
    let orgs_before = gw.cli_json(&["orgs", "list"]);
    let peers_before = peers(&gw, "personal");
    let file = gw.dir().join("x.conf");
    let f = path_str(&file);
    let cases: [(&[&str], &[&str]); 5] = [
        (&["nope", "lhr", "x", f], &["nope", "not found"]),
        (&["personal", "fra", "x", f], &["fra"]),
        (&["personal", "lhr", "Bad_Name", f], &["Bad_Name"]),
        (&["Bad_Org", "lhr", "x", f], &["Bad_Org"]),
        (&["personal", "LHR", "x", f], &["LHR"]),
    ];
    for (args, needles) in cases {
        let mut a = vec!["wireguard", "create"];
        a.extend_from_slice(args);
        let stderr = gw.cli_fail(&a);
        assert_one_error_line(&stderr, needles);
        assert!(!file.exists(), "`{}` left {f} behind", a.join(" "));
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let stderr = gw.cli_fail(&[
        "wireguard",
        "create",
        "personal",
        "lhr",
        "x",
        f,
        "--public-key",
        "not-a-key",
    ]);
    assert_one_error_line(&stderr, &["not-a-key"]);
    assert!(!file.exists());
    assert_eq!(gw.cli_json(&["orgs", "list"]), orgs_before);
    assert_eq!(peers(&gw, "personal"), peers_before);
}

#[test]
fn missing_arguments_are_named_when_stdin_is_not_a_terminal() {
    require_root!();
    let (gw, _) = gateway_with_org();
    let before = peers(&gw, "personal");
    let cases: [(&[&str], &str); 7] = [
        (&["wireguard", "create"], "ORG"),
        (&["wireguard", "create", "personal"], "REGION"),
        (&["wireguard", "create", "personal", "lhr"], "NAME"),
        (&["wireguard", "create", "personal", "lhr", "x"], "FILE"),
        (&["wireguard", "list"], "ORG"),
        (&["wireguard", "remove", "personal"], "NAME"),
        (&["orgs", "create"], "NAME"),
    ];
    for (args, missing) in cases {
        // A pipe, not /dev/null: any non-terminal stdin.
        let mut cmd = gw.cli_cmd(args);
        cmd.stdin(std::process::Stdio::piped());
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "`{}` succeeded", args.join(" "));
        assert_one_error_line(&stderr_of(&out), &["missing argument", missing]);
    }
    assert_eq!(peers(&gw, "personal"), before, "a create registered a peer");
    assert_eq!(gw.cli_json(&["orgs", "list"]).as_array().unwrap().len(), 1);
}

#[test]
fn public_key_registers_an_existing_key() {
    require_root!();
    require_tools!("wg");
    let (gw, prefix) = gateway_with_org();
    let private = common::wg_genkey();
    let public = common::wg_pubkey(&private);
    let file = gw.dir().join("mine.conf");
    let out = gw.cli(&[
        "wireguard",
        "create",
        "personal",
        "lhr",
        "mine",
        path_str(&file),
        "--public-key",
        &public,
    ]);
    let stderr = stderr_of(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout_of(&out).contains(WROTE));
    assert!(
        !stderr.contains(WARNING),
        "no private key, no warning:\n{stderr}"
    );
    let conf = std::fs::read_to_string(&file).unwrap();
    assert!(field(&conf, "PrivateKey").is_none(), "{conf}");
    assert!(!conf.contains(&private));
    let list = peers(&gw, "personal");
    let p = peer(&list, "mine");
    assert_eq!(p["public_key"], public.as_str());
    assert_eq!(
        field(&conf, "Address"),
        Some(format!("{}/120", p["address"].as_str().unwrap()).as_str())
    );
    assert_eq!(field(&conf, "AllowedIPs"), Some(prefix.as_str()));
    assert_eq!(
        field(&conf, "PublicKey"),
        Some(common::wg_pubkey(&gw.private_key()).as_str())
    );
    assert_eq!(field(&conf, "PersistentKeepalive"), Some("15"));
}

#[test]
fn list_shows_peers_and_remove_removes_them() {
    require_root!();
    let (gw, _) = gateway_with_org();
    for name in ["alpha", "beta"] {
        let f = gw.dir().join(format!("{name}.conf"));
        gw.cli_ok(&["wireguard", "create", "personal", "lhr", name, path_str(&f)]);
    }
    let json = peers(&gw, "personal");
    let rows = table(&gw.cli_ok(&["wireguard", "list", "personal"]));
    assert_eq!(
        rows[0],
        ["NAME", "REGION", "GATEWAY", "PEER IP", "EPHEMERAL"]
    );
    assert_eq!(rows.len(), 3, "{rows:?}");
    for name in ["alpha", "beta"] {
        let p = peer(&json, name);
        let row = rows
            .iter()
            .find(|r| r[0] == name)
            .unwrap_or_else(|| panic!("{name} not listed: {rows:?}"));
        assert_eq!(
            row,
            &[
                name,
                "lhr",
                gw.name.as_str(),
                p["address"].as_str().unwrap(),
                "-"
            ]
        );
    }

    let out = gw.cli_ok(&["wireguard", "remove", "personal", "alpha"]);
    assert!(out.contains("alpha"), "{out}");
    let rows = table(&gw.cli_ok(&["wireguard", "list", "personal"]));
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[1][0], "beta");
    let json = peers(&gw, "personal");
    assert_eq!(json.as_array().unwrap().len(), 1);

    // Removing it again says so.
    let stderr = gw.cli_fail(&["wireguard", "remove", "personal", "alpha"]);
    assert_one_error_line(&stderr, &["alpha"]);
}

#[test]
fn parallel_creates_get_distinct_addresses() {
    require_root!();
    const N: usize = 20;
    let (gw, prefix) = gateway_with_org();
    let files: Vec<PathBuf> = (0..N)
        .map(|i| gw.dir().join(format!("p{i}.conf")))
        .collect();
    let outs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let gw = &gw;
                s.spawn(move || {
                    let name = format!("p{i}");
                    gw.cli(&["wireguard", "create", "personal", "lhr", &name, path_str(f)])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, out) in outs.iter().enumerate() {
        assert!(
            out.status.success(),
            "create p{i} failed: {}",
            stderr_of(out)
        );
    }
    let mut from_files = BTreeSet::new();
    for f in &files {
        let conf = std::fs::read_to_string(f).unwrap();
        let addr = field(&conf, "Address").unwrap().to_owned();
        let ip: Ipv6Addr = addr.strip_suffix("/120").unwrap().parse().unwrap();
        assert!(in_prefix(ip, &prefix), "{ip} not in {prefix}");
        assert_eq!(ip.segments()[7] & 0xff, 2, "{ip} is not a …SS02 address");
        from_files.insert(ip);
    }
    assert_eq!(from_files.len(), N, "duplicate addresses: {from_files:?}");
    let list = peers(&gw, "personal");
    let listed: BTreeSet<Ipv6Addr> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["address"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(listed, from_files);
    // Distinct /120s: the slot byte differs.
    let slots: BTreeSet<(u16, u16)> = from_files
        .iter()
        .map(|a| (a.segments()[6], a.segments()[7] >> 8))
        .collect();
    assert_eq!(slots.len(), N);
}

#[test]
fn stdout_as_file_prints_the_config() {
    require_root!();
    require_tools!("wg");
    let (gw, prefix) = gateway_with_org();
    let cwd = tempfile::tempdir().unwrap();
    let mut cmd = gw.cli_cmd(&["wireguard", "create", "personal", "lhr", "s", "stdout"]);
    cmd.current_dir(cwd.path());
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (stdout_of(&out), stderr_of(&out));
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(WARNING), "{stderr}");
    assert!(!stdout.contains(WROTE), "{stdout}");
    assert!(stdout.starts_with("[Interface]\nPrivateKey = "), "{stdout}");
    assert!(stdout.ends_with("PersistentKeepalive = 15\n"), "{stdout}");
    assert_eq!(field(&stdout, "AllowedIPs"), Some(prefix.as_str()));
    let dns = dns_of(&prefix).to_string();
    assert_eq!(field(&stdout, "DNS"), Some(dns.as_str()));
    let private = field(&stdout, "PrivateKey").unwrap();
    let list = peers(&gw, "personal");
    assert_eq!(
        peer(&list, "s")["public_key"],
        common::wg_pubkey(private).as_str()
    );
    assert_eq!(
        std::fs::read_dir(cwd.path()).unwrap().count(),
        0,
        "`stdout` must not be a file"
    );
}

#[test]
fn a_stdout_that_cannot_take_the_config_leaves_no_peer() {
    require_root!();
    let (gw, _) = gateway_with_org();
    // A full device, and a pipe whose reader is gone (EPIPE).
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut to_full = gw.cli_cmd(&["wireguard", "create", "personal", "lhr", "full", "stdout"]);
    to_full.stdout(full);
    let mut to_closed = gw.cli_cmd(&["wireguard", "create", "personal", "lhr", "gone", "stdout"]);
    to_closed
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let closed = {
        let mut child = to_closed.spawn().unwrap();
        drop(child.stdout.take());
        child.wait_with_output().unwrap()
    };
    for (name, out) in [("full", to_full.output().unwrap()), ("gone", closed)] {
        let stderr = stderr_of(&out);
        assert!(!out.status.success(), "{name}: exit 0\n{stderr}");
        assert_one_error_line(&stderr, &["stdout"]);
        let list = peers(&gw, "personal");
        assert!(
            list.as_array().unwrap().iter().all(|p| p["name"] != name),
            "{name} stayed registered: {list}"
        );
    }
}

#[test]
fn peers_survive_a_gateway_restart() {
    require_root!();
    let (mut gw, _) = gateway_with_org();
    let f = gw.dir().join("keep.conf");
    gw.cli_ok(&[
        "wireguard",
        "create",
        "personal",
        "lhr",
        "keep",
        path_str(&f),
    ]);
    let before = peers(&gw, "personal");
    let key = gw.private_key();
    let status = gw.stop().expect("the gateway was running");
    assert!(status.success(), "SIGTERM should stop it cleanly: {status}");
    assert!(!gw.socket.exists(), "the API socket outlived the daemon");
    // A clean stop checkpoints the write-ahead log: the database file alone
    // is a complete backup.
    let wal = gw.db_path.with_extension("db-wal");
    assert!(
        std::fs::metadata(&wal).map_or(true, |m| m.len() == 0),
        "{} still holds writes after a clean stop",
        wal.display()
    );
    let copy = tempfile::tempdir().unwrap();
    let alone = copy.path().join("state.db");
    std::fs::copy(&gw.db_path, &alone).unwrap();
    let mut count = Command::new("sqlite3");
    count.arg(&alone).arg("SELECT name FROM peers");
    assert_eq!(run_ok(&mut count).trim(), "keep");
    gw.restart();
    assert_eq!(peers(&gw, "personal"), before);
    assert_eq!(gw.private_key(), key, "the gateway key changed");
}

#[test]
fn org_tokens_are_minted_listed_without_secrets_and_revoked() {
    require_root!();
    let (gw, _) = gateway_with_org();
    let out = gw.cli(&["orgs", "token", "personal", "--expires", "30d"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let token = stdout_of(&out).trim().to_owned();
    assert!(
        token.starts_with("sixpn_"),
        "only the token on stdout: {token}"
    );
    let note = stderr_of(&out);
    assert!(note.contains("expires"), "{note}");
    let forever = gw.cli_ok(&["orgs", "token", "personal"]).trim().to_owned();

    let listing = gw.cli_ok(&["orgs", "token", "personal", "--list"]);
    assert!(
        !listing.contains(&token) && !listing.contains(&forever),
        "{listing}"
    );
    let rows = table(&listing);
    assert_eq!(rows.len(), 3, "a header and two tokens: {listing}");
    assert!(
        listing.contains("never") && listing.contains("UTC"),
        "{listing}"
    );
    let json = gw.cli_json(&["orgs", "token", "personal", "--list"]);
    let ids: Vec<String> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 2);

    let out = gw.cli(&["orgs", "token", "personal", "--revoke", &ids[0]]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let left = gw.cli_json(&["orgs", "token", "personal", "--list"]);
    assert_eq!(left.as_array().unwrap().len(), 1, "{left}");
    // Again, or a bad id: one clear error line, nothing changed.
    let out = gw.cli(&["orgs", "token", "personal", "--revoke", &ids[0]]);
    assert!(!out.status.success());
    assert_one_error_line(&stderr_of(&out), &["no token", &ids[0]]);
    let out = gw.cli(&["orgs", "token", "personal", "--revoke", "zz"]);
    assert!(!out.status.success());
    assert_one_error_line(&stderr_of(&out), &["token id"]);
    let out = gw.cli(&["orgs", "token", "personal", "--expires", "soon"]);
    assert!(!out.status.success());
    assert_one_error_line(&stderr_of(&out), &["invalid duration"]);
    assert_eq!(gw.cli_json(&["orgs", "token", "personal", "--list"]), left);
}

/// A stand-in API on a unix socket that takes one `POST …/peers` and
/// closes the connection without an answer (a daemon dying mid-request),
/// then answers `GET …/peers` with the peer it was sent (`registered`) or
/// with none. Returns the socket path.
fn dying_api(dir: &Path, registered: bool) -> PathBuf {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::UnixListener;
    let path = dir.join("api.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let record = dir.join("sent.key");
    std::thread::spawn(move || {
        let mut sent_key: Option<String> = None;
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let mut rd = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if rd.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let mut body = vec![0; len];
            let _ = rd.read_exact(&mut body);
            if head.starts_with("POST /v1/orgs/personal/peers") {
                let v: Value = serde_json::from_slice(&body).unwrap();
                sent_key = v["public_key"].as_str().map(str::to_owned);
                std::fs::write(&record, sent_key.as_deref().unwrap_or("")).unwrap();
                continue; // dropped unanswered
            }
            let peers = match (&sent_key, registered) {
                (Some(k), true) => serde_json::json!([{
                    "org": "personal", "name": "basic", "region": "lhr", "gateway": "lhr-1",
                    "address": "fdaa:0:1:a7b:d6b:0:a:2", "network": "fdaa:0:1:a7b:d6b:0:a:0/120",
                    "org_prefix": "fdaa:0:1::/48", "dns": "fdaa:0:1::3", "public_key": k,
                    "gateway_public_key": "CVYS9pwG7RqUYJIuDskQQj+lYEIU2nwAqeE5IJbYLDE=",
                    "endpoint": "127.0.0.1:51820", "state": "installed"
                }]),
                _ => serde_json::json!([]),
            };
            let body = peers.to_string();
            let mut w = stream;
            let _ = write!(
                w,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    path
}

#[test]
fn a_create_whose_answer_is_lost_ends_with_both_peer_and_file_or_neither() {
    for registered in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let api = dying_api(dir.path(), registered);
        let file = dir.path().join("basic.conf");
        let out = Command::new(common::SIXPN)
            .arg("--api")
            .arg(&api)
            .args(["wireguard", "create", "personal", "lhr", "basic"])
            .arg(&file)
            .output()
            .unwrap();
        let err = stderr_of(&out);
        if registered {
            assert!(out.status.success(), "{err}");
            let conf = std::fs::read_to_string(&file).unwrap();
            assert!(conf.contains("fdaa:0:1:a7b:d6b:0:a:2"), "{conf}");
            // The file's key is the one the registered peer has.
            let private = field(&conf, "PrivateKey").unwrap();
            let sent = std::fs::read_to_string(dir.path().join("sent.key")).unwrap();
            assert_eq!(common::wg_pubkey(private), sent);
            assert!(err.contains("was registered"), "{err}");
        } else {
            assert!(!out.status.success(), "{err}");
            assert!(!file.exists(), "a file without a peer");
            assert_one_error_line(&err, &["answer was lost", "not registered"]);
        }
    }
}
