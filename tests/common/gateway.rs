//! The `sixpn gateway` daemon under test: its configuration, start-up and
//! shutdown in a namespace, its CLI and control API, and its sd_notify
//! messages.

use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::*;

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
    pub fn netns(mut self, ns: &Netns) -> Self {
        self.netns = Some(ns.name().to_owned());
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
            this.netns = Some(ns.name().to_owned());
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
