//! The gateway's TOML configuration (docs/architecture.md "Configuration and CLI", a contract).
//!
//! Parsing is the validation: every field has a type that can't hold a bad
//! value, unknown keys are rejected, and the error names the key and line.
//! Every key has a default except `gateway.region`, `gateway.host_id` and
//! `gateway.endpoint`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::{Endpoint, GatewayName, HostId, InterfaceName, RegionName};

/// Why the configuration can't be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file can't be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key, or a bad value.
    #[error("invalid config {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// toml's message, which names the key and shows the line.
        message: String,
    },
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[gateway]`: who this gateway is.
    pub gateway: GatewayConfig,
    /// `[store]`: where state lives.
    #[serde(default)]
    pub store: StoreConfig,
    /// `[api]`: the control API.
    #[serde(default)]
    pub api: ApiConfig,
    /// `[dns]`: the per-org resolvers.
    #[serde(default)]
    pub dns: DnsConfig,
}

/// Which WireGuard implementation drives the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The kernel module if it is there, else wireguard-go.
    #[default]
    Auto,
    /// The kernel module (fails start without it).
    Kernel,
    /// wireguard-go, started and supervised by the daemon.
    Userspace,
}

/// `[gateway]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Unique per gateway; defaults to the host name when it is a valid name.
    #[serde(default = "default_gateway_name")]
    pub name: GatewayName,
    /// The region this gateway serves.
    pub region: RegionName,
    /// The 32-bit host id in peer addresses (`a7b:d6b`).
    pub host_id: HostId,
    /// The WireGuard interface this daemon owns.
    #[serde(default = "default_interface")]
    pub interface: InterfaceName,
    /// UDP port WireGuard listens on.
    #[serde(default = "default_listen_port")]
    pub listen_port: u16,
    /// What peers dial (`host:port`).
    pub endpoint: Endpoint,
    /// The gateway's private key, created 0600 if missing.
    #[serde(default = "default_key_file")]
    pub private_key_file: PathBuf,
    /// kernel | userspace | auto.
    #[serde(default)]
    pub backend: Backend,
    /// all | jit: which registered peers the kernel holds. A file without
    /// the key keeps "all" (an upgrade doesn't change what the kernel
    /// holds); the configs sixpn writes say "jit".
    #[serde(default)]
    pub peers: PeerMode,
    /// In jit mode: a peer with no handshake for this long is removed from
    /// the kernel (not the store); its next initiation installs it again.
    /// `15m`, `90s`, `1h` or seconds.
    #[serde(default = "default_idle_evict")]
    pub idle_evict: Seconds,
    /// In jit mode: how initiations of peers not installed reach the daemon:
    /// "queue" holds them (nft `queue`, the first handshake completes),
    /// "log" copies them (nft `log`, the client's retry completes it),
    /// "auto" holds them where the kernel has nft's queue expression.
    #[serde(default)]
    pub capture: CaptureKind,
    /// The NFQUEUE number (queue) or nfnetlink_log group (log) sixpn uses.
    #[serde(default = "default_capture_queue")]
    pub capture_queue: u16,
}

/// Which registered peers the kernel holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PeerMode {
    /// Every registered peer (wireguard-go holds at most 65,536).
    #[default]
    All,
    /// Only peers that handshook recently; others on their first
    /// initiation.
    Jit,
}

/// How handshake initiations are captured in jit mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CaptureKind {
    /// Queue where the kernel can, else log.
    #[default]
    Auto,
    /// Held in an NFQUEUE until the peer is installed.
    Queue,
    /// Copied over nfnetlink_log; the client's retry completes.
    Log,
}

/// A duration in whole seconds, written `15m`, `90s`, `2h`, `1d` or as a
/// number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub u64);

impl Seconds {
    /// As a [`std::time::Duration`].
    pub fn duration(self) -> std::time::Duration {
        std::time::Duration::from_secs(self.0)
    }

    /// Parses `15m`, `90s`, `2h`, `1d` or plain seconds; zero is refused.
    pub fn parse(s: &str) -> Option<Self> {
        let t = s.trim();
        let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
            Some(i) => t.split_at(i),
            None => (t, "s"),
        };
        let scale = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return None,
        };
        let n: u64 = num.parse().ok()?;
        n.checked_mul(scale).filter(|&v| v > 0).map(Seconds)
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Number(n) => n.to_string(),
            Raw::Text(t) => t,
        };
        Seconds::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?}: use e.g. 15m, 90s, 2h or a number of seconds"
            ))
        })
    }
}

fn default_idle_evict() -> Seconds {
    Seconds(15 * 60)
}
fn default_capture_queue() -> u16 {
    6161
}

/// Which store backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// The embedded SQLite file.
    #[default]
    Sqlite,
    /// An etcd cluster, for fleets.
    Etcd,
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// sqlite | etcd.
    #[serde(default)]
    pub kind: StoreKind,
    /// The SQLite file.
    #[serde(default = "default_db_path")]
    pub path: PathBuf,
    /// etcd endpoints.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// etcd key prefix.
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// etcd over TLS (`https://` endpoints): the CA that signed the
    /// members' certificates (PEM).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM) for clusters with `--client-cert-auth`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM, mode 0600, owned by the daemon's user).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The name the members' TLS certificates are checked against, when it
    /// isn't the endpoints' host (needed for IPv6 endpoints that differ).
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// An etcd user (RBAC), with `password_file`.
    #[serde(default)]
    pub user: Option<String>,
    /// The etcd user's password (mode 0600, owned by the daemon's user).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: StoreKind::default(),
            path: default_db_path(),
            endpoints: Vec::new(),
            prefix: default_etcd_prefix(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            tls_server_name: None,
            user: None,
            password_file: None,
        }
    }
}

/// `[api]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// The root-only unix socket (no token needed).
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Optional TCP listener; callers need a bearer token.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// The admin bearer token for TCP, created 0600 if missing.
    #[serde(default = "default_admin_token_file")]
    pub admin_token_file: PathBuf,
    /// The most TCP connections served at once; more are closed at accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// HTTPS on `listen`: the certificate chain (PEM), re-read on SIGHUP.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// HTTPS on `listen`: the private key (PEM, mode 0600, owned by the
    /// daemon's user), re-read on SIGHUP.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// Allow plain HTTP on a `listen` address that is not loopback (bearer
    /// tokens in the clear: only inside a network you trust).
    #[serde(default)]
    pub insecure_http: bool,
}

impl ApiConfig {
    /// The certificate and key files, when `listen` is HTTPS.
    pub fn tls(&self) -> Option<(&Path, &Path)> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        }
    }
}

/// The default TCP connection cap of the control API.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            socket: default_socket(),
            listen: None,
            admin_token_file: default_admin_token_file(),
            max_connections: default_max_connections(),
            tls_cert_file: None,
            tls_key_file: None,
            insecure_http: false,
        }
    }
}

/// `[dns]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Upstream resolvers for names outside `.internal`; empty: resolv.conf.
    #[serde(default)]
    pub upstream: Vec<SocketAddr>,
}

fn default_gateway_name() -> GatewayName {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .and_then(|h| h.trim().to_ascii_lowercase().parse().ok())
        .unwrap_or_else(|| GatewayName::from_static("gateway"))
}
fn default_interface() -> InterfaceName {
    InterfaceName::from_static("sixpn0")
}
fn default_listen_port() -> u16 {
    51820
}
fn default_key_file() -> PathBuf {
    "/var/lib/sixpn/gateway.key".into()
}
fn default_db_path() -> PathBuf {
    "/var/lib/sixpn/state.db".into()
}
fn default_etcd_prefix() -> String {
    "/sixpn/".into()
}
fn default_socket() -> PathBuf {
    "/run/sixpn/api.sock".into()
}
fn default_admin_token_file() -> PathBuf {
    "/var/lib/sixpn/admin.token".into()
}

impl Config {
    /// Parses and validates TOML text; `path` is only for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let config: Config = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if config.gateway.listen_port == 0 {
            return Err(invalid(
                "gateway.listen_port: must be a port number 1-65535".into(),
            ));
        }
        if config.store.kind == StoreKind::Etcd && config.store.endpoints.is_empty() {
            return Err(invalid(
                "store.endpoints: an etcd store needs at least one endpoint".into(),
            ));
        }
        let s = &config.store;
        if s.cert_file.is_some() != s.key_file.is_some() {
            return Err(invalid(
                "store.cert_file and store.key_file: set both (a client certificate) or neither"
                    .into(),
            ));
        }
        if s.user.is_some() != s.password_file.is_some() {
            return Err(invalid(
                "store.user and store.password_file: set both (etcd auth) or neither".into(),
            ));
        }
        let tls = s.ca_file.is_some() || s.cert_file.is_some();
        for e in &s.endpoints {
            let https = e.starts_with("https://");
            if https && s.ca_file.is_none() {
                return Err(invalid(format!(
                    "store.endpoints: {e} is https but store.ca_file (the cluster's CA) is not set"
                )));
            }
            if !https && tls {
                return Err(invalid(format!(
                    "store.endpoints: {e} is not https:// but TLS files are set; use https:// \
                     for every endpoint"
                )));
            }
        }
        let api = &config.api;
        if api.tls_cert_file.is_some() != api.tls_key_file.is_some() {
            return Err(invalid(
                "api.tls_cert_file and api.tls_key_file: set both (HTTPS) or neither".into(),
            ));
        }
        if let Some(addr) = api.listen {
            if api.tls().is_none() && !addr.ip().is_loopback() && !api.insecure_http {
                return Err(invalid(format!(
                    "api.listen = \"{addr}\" would send bearer tokens in the clear: set \
                     api.tls_cert_file and api.tls_key_file for HTTPS, or api.insecure_http = true \
                     if this network is trusted"
                )));
            }
        }
        Ok(config)
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.toml"))
    }

    const MINIMAL: &str = r#"
[gateway]
region = "lhr"
host_id = "a7b:d6b"
endpoint = "gw-lhr.example.net:51820"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.gateway.interface.as_str(), "sixpn0");
        assert_eq!(c.gateway.listen_port, 51820);
        assert_eq!(c.gateway.backend, Backend::Auto);
        assert_eq!(c.gateway.peers, PeerMode::All);
        assert_eq!(c.gateway.idle_evict, Seconds(900));
        assert_eq!(c.gateway.capture, CaptureKind::Auto);
        assert_eq!(c.store.kind, StoreKind::Sqlite);
        assert_eq!(c.store.path, Path::new("/var/lib/sixpn/state.db"));
        assert_eq!(c.api.socket, Path::new("/run/sixpn/api.sock"));
        assert!(c.api.listen.is_none());
        assert!(c.dns.upstream.is_empty());
    }

    #[test]
    fn jit_settings_parse_and_bad_durations_are_refused() {
        let c = parse(&format!(
            "{MINIMAL}peers = \"jit\"\nidle_evict = \"2m\"\ncapture = \"log\"\ncapture_queue = 7\n"
        ))
        .unwrap();
        assert_eq!(c.gateway.peers, PeerMode::Jit);
        assert_eq!(c.gateway.idle_evict.duration().as_secs(), 120);
        assert_eq!(c.gateway.capture, CaptureKind::Log);
        assert_eq!(c.gateway.capture_queue, 7);
        assert_eq!(
            parse(&format!("{MINIMAL}idle_evict = 30\n"))
                .unwrap()
                .gateway
                .idle_evict,
            Seconds(30)
        );
        for bad in ["\"0m\"", "\"15 minutes\"", "\"-1\"", "0"] {
            let e = parse(&format!("{MINIMAL}idle_evict = {bad}\n")).unwrap_err();
            assert!(e.to_string().contains("idle_evict"), "{bad}: {e}");
        }
        assert!(parse(&format!("{MINIMAL}peers = \"some\"\n")).is_err());
    }

    #[test]
    fn full_design_example_parses() {
        let c = parse(
            r#"
[gateway]
name = "lhr-1"
region = "lhr"
host_id = "a7b:d6b"
interface = "sixpn0"
listen_port = 51820
endpoint = "gw-lhr.example.net:51820"
private_key_file = "/var/lib/sixpn/gateway.key"
backend = "userspace"
[store]
kind = "sqlite"
path = "/var/lib/sixpn/state.db"
[api]
socket = "/run/sixpn/api.sock"
listen = "[::1]:4280"
[dns]
upstream = ["127.0.0.1:53", "[2001:db8::53]:53"]
"#,
        )
        .unwrap();
        assert_eq!(c.gateway.name.as_str(), "lhr-1");
        assert_eq!(c.gateway.backend, Backend::Userspace);
        assert_eq!(c.dns.upstream.len(), 2);
    }

    #[test]
    fn etcd_tls_settings_go_together() {
        let with = |store: &str| parse(&format!("{MINIMAL}[store]\nkind = \"etcd\"\n{store}"));
        let tls = "ca_file = \"/ca.pem\"\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\n";
        assert!(with(&format!("endpoints = [\"https://10.0.0.1:2379\"]\n{tls}")).is_ok());
        for (bad, says) in [
            (
                "endpoints = [\"https://10.0.0.1:2379\"]\n".to_owned(),
                "ca_file",
            ),
            (
                format!("endpoints = [\"http://10.0.0.1:2379\"]\n{tls}"),
                "https://",
            ),
            (
                "endpoints = [\"https://a:1\"]\nca_file = \"/ca\"\ncert_file = \"/c\"\n".to_owned(),
                "set both",
            ),
            (
                "endpoints = [\"http://a:1\"]\nuser = \"sixpn\"\n".to_owned(),
                "password_file",
            ),
        ] {
            let e = with(&bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn plain_http_off_loopback_needs_saying_so() {
        let with = |api: &str| parse(&format!("{MINIMAL}[api]\n{api}"));
        assert!(with("listen = \"[::1]:4280\"\n").is_ok());
        assert!(with("listen = \"127.0.0.1:4280\"\n").is_ok());
        let e = with("listen = \"[::]:4280\"\n").unwrap_err().to_string();
        assert!(
            e.contains("api.listen") && e.contains("insecure_http"),
            "{e}"
        );
        assert!(with("listen = \"[::]:4280\"\ninsecure_http = true\n").is_ok());
        let tls = "tls_cert_file = \"/c.pem\"\ntls_key_file = \"/k.pem\"\n";
        let c = with(&format!("listen = \"[::]:4280\"\n{tls}")).unwrap();
        assert!(c.api.tls().is_some());
        let e = with("listen = \"[::]:4280\"\ntls_cert_file = \"/c.pem\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("set both"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (format!("{MINIMAL}colour = 1\n"), "colour"),
            (MINIMAL.replace("\"lhr\"", "\"LHR\""), "region"),
            (MINIMAL.replace("a7b:d6b", "zzz"), "host id"),
            (MINIMAL.replace("endpoint = ", "#"), "endpoint"),
            (format!("{MINIMAL}[store]\nkind = \"redis\"\n"), "redis"),
            (format!("{MINIMAL}listen_port = 0\n"), "listen_port"),
            (
                format!("{MINIMAL}[store]\nkind = \"etcd\"\n"),
                "store.endpoints",
            ),
        ];
        for (text, needle) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle:?} not in {e}");
        }
    }
}
