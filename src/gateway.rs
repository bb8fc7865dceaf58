//! `sixpn gateway`: the daemon's wiring. Loads the key, opens the store,
//! registers this gateway, runs the reconciler and, following its snapshots,
//! the DNS listeners, serves the control API, and stops cleanly on
//! SIGTERM/SIGINT.
//!
//! Start-up order matters: everything that can fail on bad local state (key
//! file, store, sockets) is checked before the gateway announces itself.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::api::server::{self, ApiState};
use crate::api::tls::ServerTls;
use crate::config::{Config, StoreKind};
use crate::dataplane::{Firewall, KernelError, Netlink, WgDevice};
use crate::dns::server::{upstreams_or_resolv_conf, DnsService, DnsSettings};
use crate::model::PrivateKey;
use crate::plan::Identity;
use crate::reconcile::{Reconciler, Settings};
use crate::store::etcd::{EtcdAccess, EtcdStore};
use crate::store::sqlite::SqliteStore;
use crate::store::{Gateway, Snapshot, Store, StoreError};

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A key or token file problem.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An API listener failed.
    #[error(transparent)]
    Listen(#[from] server::ListenError),
    /// The kernel adapters could not start.
    #[error("dataplane: {0}")]
    Kernel(#[from] KernelError),
    /// Something else at start.
    #[error("{0}")]
    Other(String),
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> GatewayError {
    GatewayError::File {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// A secret file must be the daemon user's and readable by no one else:
/// otherwise someone else may have read or replaced it.
fn check_secret_file(path: &Path) -> Result<(), GatewayError> {
    let meta = std::fs::metadata(path).map_err(|e| file_err(path, e))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(file_err(
            path,
            format!(
                "owned by uid {}, not by the daemon's user (uid {me}): someone else \
                 can replace this secret; chown it",
                meta.uid()
            ),
        ));
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(file_err(
            path,
            format!(
                "mode {:o} lets others read a secret; chmod 600 it",
                mode & 0o777
            ),
        ));
    }
    Ok(())
}

/// The API's TLS certificate, if `[api]` asks for HTTPS; the key file is
/// a secret like the others.
fn load_api_tls(api: &crate::config::ApiConfig) -> Result<Option<Arc<ServerTls>>, GatewayError> {
    let Some((cert, key)) = api.tls() else {
        return Ok(None);
    };
    check_secret_file(key)?;
    ServerTls::load(cert, key)
        .map(Some)
        .map_err(|e| GatewayError::Other(e.to_string()))
}

/// Reads a secret file, creating it with `make()` (mode 0600) if missing.
/// A file readable by others is refused for private keys: it may have leaked.
fn load_or_create_secret(
    path: &Path,
    make: impl FnOnce() -> String,
) -> Result<(String, bool), GatewayError> {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            check_secret_file(path)?;
            Ok((s.trim().to_owned(), false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
            }
            let value = make();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| file_err(path, e))?;
            writeln!(f, "{value}")
                .and_then(|_| f.sync_all())
                .map_err(|e| file_err(path, e))?;
            Ok((value, true))
        }
        Err(e) => Err(file_err(path, e)),
    }
}

/// A generous estimate of a token's entropy: its length times the bits per
/// character of the smallest usual alphabet holding every character it
/// uses (digits, hex, one-case letters and digits, base64, printable).
fn token_entropy_bits(token: &str) -> u32 {
    let all = |f: fn(char) -> bool| token.chars().all(f);
    let per_char: f64 = if all(|c| c.is_ascii_digit()) {
        10f64.log2()
    } else if all(|c| c.is_ascii_hexdigit()) {
        4.0
    } else if all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        || all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
    {
        36f64.log2()
    } else if all(|c| c.is_ascii_alphanumeric() || "+/=-_".contains(c)) {
        6.0
    } else {
        95f64.log2()
    };
    let distinct = token
        .chars()
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    // One character repeated is no secret, whatever its length.
    if distinct < 4 {
        return 0;
    }
    (token.chars().count() as f64 * per_char) as u32
}

/// Loads the gateway's private key, creating it 0600 if missing.
pub fn load_or_create_key(path: &Path) -> Result<PrivateKey, GatewayError> {
    let (text, created) = load_or_create_secret(path, || PrivateKey::generate().to_base64())?;
    let key: PrivateKey = text.parse().map_err(|e| file_err(path, e))?;
    if created {
        tracing::info!(path = %path.display(), public_key = %key.public_key(), "created gateway key");
    }
    Ok(key)
}

/// Opens the configured store.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, GatewayError> {
    match config.store.kind {
        StoreKind::Sqlite => Ok(Arc::new(SqliteStore::open(&config.store.path)?)),
        StoreKind::Etcd => {
            let s = &config.store;
            let read = |p: &Path| std::fs::read(p).map_err(|e| file_err(p, e));
            let mut access = EtcdAccess {
                server_name: s.tls_server_name.clone(),
                ..EtcdAccess::default()
            };
            if let Some(ca) = &s.ca_file {
                access.ca_pem = Some(read(ca)?);
            }
            if let (Some(cert), Some(key)) = (&s.cert_file, &s.key_file) {
                check_secret_file(key)?;
                access.identity = Some((read(cert)?, read(key)?));
            }
            if let (Some(user), Some(pw)) = (&s.user, &s.password_file) {
                check_secret_file(pw)?;
                let password = String::from_utf8(read(pw)?)
                    .map_err(|_| file_err(pw, "not UTF-8"))?
                    .trim()
                    .to_owned();
                access.user = Some((user.clone(), password));
            }
            Ok(Arc::new(
                EtcdStore::connect_with(&s.endpoints, &s.prefix, &access).await?,
            ))
        }
    }
}

/// Raises the soft limit on open descriptors to the hard one. Every org's
/// DNS sockets, every API connection and every netlink socket take one; the
/// usual soft default of 1024 is a limit a busy gateway reaches.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write `lim`.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    if !ok || lim.rlim_cur >= lim.rlim_max {
        return;
    }
    let before = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        tracing::info!(
            from = before,
            to = lim.rlim_max,
            "raised the open-files limit"
        );
    } else {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            soft = before,
            "could not raise the open-files limit"
        );
    }
}

/// How long the API waits at start for the dataplane's first pass before it
/// serves anyway (the gateway registers once the dataplane is up).
const DATAPLANE_UP: std::time::Duration = std::time::Duration::from_secs(30);

/// Registers (or re-registers) this gateway: from now on peers may be
/// placed on it.
async fn register(store: &dyn Store, me: &Gateway) -> Result<(), StoreError> {
    store.register_gateway(me).await?;
    tracing::info!(gateway = %me.name, region = %me.region, host_id = %me.host_id,
        endpoint = %me.endpoint, public_key = %me.public_key, "gateway registered");
    Ok(())
}

/// A gateway name is an identity: a daemon whose key differs from the one
/// the store has for its name is another machine (a cloned VM keeps the
/// host name, which is the default name) and must not overwrite the other
/// gateway's key and endpoint, unless the operator says so.
pub fn check_identity(snap: &Snapshot, me: &Gateway, take_over: bool) -> Result<(), GatewayError> {
    let Some(there) = snap.gateway(&me.name) else {
        return Ok(());
    };
    if there.public_key == me.public_key {
        return Ok(());
    }
    let short = |k: &crate::model::PublicKey| k.to_base64().chars().take(8).collect::<String>();
    if take_over {
        tracing::warn!(gateway = %me.name, old_key = %short(&there.public_key),
            new_key = %short(&me.public_key), "taking over the gateway name (--take-over)");
        return Ok(());
    }
    Err(GatewayError::Other(format!(
        "gateway name '{}' is registered with another key ({}…, endpoint {}); this daemon's key \
         is {}…. Another machine (a cloned VM?) uses this name: give this one its own \
         [gateway] name, or, if it replaces that gateway, start it once with --take-over",
        me.name,
        short(&there.public_key),
        there.endpoint,
        short(&me.public_key)
    )))
}

/// Runs the daemon until SIGTERM or SIGINT.
///
/// `take_over`: register under the configured name even if the store holds
/// it under another key (otherwise that refuses to start, see
/// [`check_identity`]).
pub async fn run(config: Config, config_path: &Path, take_over: bool) -> Result<(), GatewayError> {
    // Signals first, so a SIGTERM during start-up stops us cleanly too.
    let signal = |kind, name: &str| {
        tokio::signal::unix::signal(kind)
            .map_err(|e| GatewayError::Other(format!("cannot watch {name}: {e}")))
    };
    use tokio::signal::unix::SignalKind;
    let mut term = signal(SignalKind::terminate(), "SIGTERM")?;
    let mut int = signal(SignalKind::interrupt(), "SIGINT")?;
    let mut hup = signal(SignalKind::hangup(), "SIGHUP")?;
    // Everything we create (keys, tokens, sockets) is private by default.
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
    // Before anything else touches the interface: one daemon per interface.
    // A refused start says one line and changes nothing, not even limits.
    let _lock = crate::lock::lock_interface(
        Path::new(crate::lock::RUNTIME_DIR),
        &config.gateway.interface,
    )
    .map_err(|e| GatewayError::Other(e.to_string()))?;
    raise_open_files_limit();
    let key = load_or_create_key(&config.gateway.private_key_file)?;
    let store = open_store(&config).await?;
    let me = Gateway {
        name: config.gateway.name.clone(),
        region: config.gateway.region.clone(),
        host_id: config.gateway.host_id,
        endpoint: config.gateway.endpoint.clone(),
        public_key: key.public_key(),
    };
    // Claim the API socket before announcing ourselves: a second daemon on
    // the same host stops here, having changed nothing.
    let unix = server::bind_unix(&config.api.socket)?;
    tracing::info!(socket = %config.api.socket.display(), "API listening on unix socket");
    check_identity(&*store.snapshot().await?, &me, take_over)?;
    // A bad certificate or key stops the start here, before we register.
    let api_tls = load_api_tls(&config.api)?;

    let admin_token_sha256 = match config.api.listen {
        Some(_) => {
            let (token, created) =
                load_or_create_secret(&config.api.admin_token_file, server::new_token)?;
            let bits = token_entropy_bits(&token);
            if bits < 128 {
                return Err(file_err(
                    &config.api.admin_token_file,
                    format!(
                        "the admin token has about {bits} bits of entropy, fewer than 128; \
                         remove the file to have a strong one generated"
                    ),
                ));
            }
            if created {
                tracing::info!(path = %config.api.admin_token_file.display(), "created admin API token");
            }
            Some(server::token_sha256(&token))
        }
        None => None,
    };

    let ((wg, nl, fw), mut port_in_use) = linux_dataplane(&config)?;
    tracing::info!(backend = wg.backend_name(), interface = %config.gateway.interface,
        "WireGuard backend chosen");
    // Just-in-time peers: the capture socket is bound before the rule that
    // feeds it goes in (a queue rule's `bypass` covers the moment between).
    let jit = config.gateway.peers == crate::config::PeerMode::Jit;
    let capture = match jit {
        true => Some(choose_capture(&config, fw.as_ref()).await?),
        false => None,
    };
    let source = match capture {
        Some(c) => Some(crate::jit::Source::bind(c.mode)?),
        None => None,
    };
    let responder = crate::jit::noise::Responder::new(&key);
    if let (false, Some(cap)) = (jit, wg.max_peers()) {
        let snap = store.snapshot().await?;
        let here = snap.peers.iter().filter(|p| p.gateway == me.name).count();
        if here > cap {
            return Err(GatewayError::Other(format!(
                "{here} peers are registered on gateway '{}', more than {} holds ({cap}): use \
                 the kernel module (backend = \"kernel\") or peers = \"jit\", which installs \
                 only the active ones",
                me.name,
                wg.backend_name()
            )));
        }
    }

    let reconciler = Reconciler::new(
        wg,
        nl,
        fw,
        store.clone(),
        Settings {
            gateway: me.name.clone(),
            interface: config.gateway.interface.clone(),
            identity: Identity {
                public_key: key.public_key(),
                listen_port: config.gateway.listen_port,
                host_id: config.gateway.host_id,
            },
            private_key: key,
            jit: jit.then(|| crate::reconcile::JitSettings {
                idle_evict: config.gateway.idle_evict.duration(),
            }),
            capture,
        },
    );
    // DNS follows the snapshots the reconciler works from: the zone and the
    // set of listeners change with the same store state as the kernel.
    let upstreams = upstreams_or_resolv_conf(&config.dns.upstream);
    tracing::info!(upstreams = ?upstreams, "DNS forwards names outside .internal");
    let dns = DnsService::start(DnsSettings::new(
        me.name.clone(),
        me.region.clone(),
        upstreams,
    ));
    let capture = match (source, reconciler.admitter()) {
        (Some(source), Some(admitter)) => Some(crate::jit::Capture::new(
            source,
            responder,
            admitter,
            reconciler.installed(),
            config.gateway.listen_port,
        )),
        _ => None,
    };
    let mut metrics = vec![reconciler.metrics(), dns.metrics()];
    metrics.extend(capture.as_ref().map(crate::jit::Capture::metrics));
    let state = Arc::new(ApiState {
        store: store.clone(),
        gateway: me.name.clone(),
        region: me.region.clone(),
        admin_token_sha256,
        dataplane: Some(reconciler.view()),
        metrics,
    });
    let router = server::router(state);

    let snapshots = reconciler.snapshots();
    let mut first_pass = reconciler.installed();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let installed = reconciler.installed();
    let counters = reconciler.counters();
    let dns_task = tokio::spawn(dns.run(snapshots, stop_rx.clone()));
    // Other gateways' APIs learn from these reports when a peer they placed
    // here is live.
    tokio::spawn(crate::report::run(
        store.clone(),
        me.name.clone(),
        installed.clone(),
        stop_rx.clone(),
    ));
    let reconcile_task = tokio::spawn(reconciler.run(stop_rx.clone()));
    let capture_task = capture.map(|c| tokio::spawn(c.run(stop_rx.clone())));
    // Only once the dataplane is up (a pass has put the interface in place)
    // is this gateway one that new peers may be placed on: a daemon whose
    // dataplane fails is never chosen. The API waits for that, briefly.
    // (A fresh store is at revision 0, which `published` doesn't count; a
    // complete first pass does.)
    let up = |i: &Arc<crate::reconcile::Installed>| i.published() || i.last_sync.is_some();
    // A listen port someone else holds won't free itself: that fails the
    // start, in one line and unregistered, instead of a retry for ever. The
    // pass sets it before it publishes, so `biased` sees it first.
    let taken = async {
        let taken = port_in_use.wait_for(Option::is_some).await;
        taken.ok().and_then(|e| e.clone())
    };
    let dataplane_up = tokio::select! {
        biased;
        Some(e) = taken => return Err(GatewayError::Kernel(e)),
        r = tokio::time::timeout(DATAPLANE_UP, first_pass.wait_for(up)) => r.is_ok_and(|r| r.is_ok()),
    };
    if dataplane_up {
        register(store.as_ref(), &me).await?;
    } else {
        tracing::error!(interface = %config.gateway.interface, wait = ?DATAPLANE_UP,
            "the dataplane is not up; this gateway stays unregistered (no new peers placed \
             here) until it is");
        let (store, me) = (store.clone(), me.clone());
        tokio::spawn(async move {
            if first_pass.wait_for(up).await.is_ok() {
                if let Err(e) = register(store.as_ref(), &me).await {
                    tracing::error!(error = %e, "registering the gateway failed");
                }
            }
        });
    }
    tokio::spawn(crate::notify::supervise(
        installed,
        counters,
        stop_rx.clone(),
    ));
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(server::serve_unix(unix, router.clone(), stopped()));
    if let Some(addr) = config.api.listen {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| server::ListenError::Io {
                what: addr.to_string(),
                source,
            })?;
        if api_tls.is_some() {
            tracing::info!(%addr, "API listening on HTTPS (bearer tokens)");
        } else {
            tracing::warn!(%addr, "API listening on plain HTTP: bearer tokens cross the network \
                in the clear; set [api] tls_cert_file and tls_key_file for HTTPS");
        }
        let limits = server::TcpLimits {
            max_connections: config.api.max_connections,
            ..server::TcpLimits::default()
        };
        tasks.spawn(server::serve_tcp(
            tcp,
            router,
            limits,
            api_tls.clone(),
            stopped(),
        ));
    }

    tracing::info!("gateway serving");
    let result = loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break Ok(()) }
            _ = hup.recv() => reload(config_path, &config, api_tls.as_deref()),
            Some(done) = tasks.join_next() => break match done {
                Ok(Ok(())) => Err(GatewayError::Other("an API listener stopped unexpectedly".into())),
                Ok(Err(e)) => Err(GatewayError::Other(format!("API listener failed: {e}"))),
                Err(e) => Err(GatewayError::Other(format!("API task failed: {e}"))),
            },
        }
    };
    crate::notify::notify("STOPPING=1");
    let _ = stop_tx.send(true);
    // Give in-flight requests a moment to finish, then go.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let _ = reconcile_task.await;
    if let Some(t) = capture_task {
        let _ = t.await;
    }
    let _ = dns_task.await;
    // After the last writer: the store's files are whole on their own.
    if let Err(e) = store.close().await {
        tracing::warn!(error = %e, "the store could not be closed cleanly");
    }
    let _ = std::fs::remove_file(&config.api.socket);
    // The interface, its peers, addresses and routes stay: a restarted
    // daemon adopts them and live sessions continue.
    tracing::info!("stopped");
    result
}

/// SIGHUP (`systemctl reload`): re-reads and validates the configuration.
/// A bad file is reported and the running configuration stays; every key
/// sixpn has today shapes the interface, store or sockets it already holds,
/// so a changed key is named as needing a restart rather than half-applied.
fn reload(path: &Path, running: &Config, tls: Option<&ServerTls>) {
    crate::notify::notify("RELOADING=1");
    // Renewed certificates: new connections get them, open ones go on.
    if let Some(tls) = tls {
        let checked = running
            .api
            .tls()
            .map_or(Ok(()), |(_, key)| check_secret_file(key));
        match checked
            .map_err(|e| e.to_string())
            .and_then(|()| tls.reload().map_err(|e| e.to_string()))
        {
            Ok(()) => tracing::info!("reload: API TLS certificate re-read"),
            Err(e) => tracing::error!(error = %e, "reload: keeping the API's TLS certificate"),
        }
    }
    match Config::load(path) {
        Err(e) => tracing::error!(error = %e, "reload: keeping the running configuration"),
        Ok(new) => {
            let changed = config_differences(running, &new);
            if changed.is_empty() {
                tracing::info!(path = %path.display(), "reload: configuration valid and unchanged");
            } else {
                tracing::warn!(keys = %changed.join(", "),
                    "reload: configuration valid; these changes take effect on restart");
            }
        }
    }
    crate::notify::notify("READY=1");
}

/// The keys whose values differ between two configurations.
fn config_differences(a: &Config, b: &Config) -> Vec<&'static str> {
    let g = (&a.gateway, &b.gateway);
    let mut out = Vec::new();
    let mut cmp = |name, same: bool| {
        if !same {
            out.push(name);
        }
    };
    cmp("gateway.name", g.0.name == g.1.name);
    cmp("gateway.region", g.0.region == g.1.region);
    cmp("gateway.host_id", g.0.host_id == g.1.host_id);
    cmp("gateway.interface", g.0.interface == g.1.interface);
    cmp("gateway.listen_port", g.0.listen_port == g.1.listen_port);
    cmp("gateway.endpoint", g.0.endpoint == g.1.endpoint);
    cmp(
        "gateway.private_key_file",
        g.0.private_key_file == g.1.private_key_file,
    );
    cmp("gateway.backend", g.0.backend == g.1.backend);
    cmp(
        "store",
        format!("{:?}", a.store) == format!("{:?}", b.store),
    );
    cmp("api", format!("{:?}", a.api) == format!("{:?}", b.api));
    cmp("dns", format!("{:?}", a.dns) == format!("{:?}", b.dns));
    out
}

/// The kernel adapters the reconciler drives.
type Adapters = (Arc<dyn WgDevice>, Arc<dyn Netlink>, Arc<dyn Firewall>);

/// [`crate::dataplane::linux::LinuxWg::port_in_use`].
type PortInUse = tokio::sync::watch::Receiver<Option<KernelError>>;

/// The Linux adapters for the configured interface and backend, all in the
/// daemon's network namespace (nftables events are per namespace too).
/// How this gateway captures initiations in jit mode: held in a queue
/// where the kernel has nft's `queue` expression (or copied where it
/// hasn't, with `capture = "auto"`), said in one line at start.
async fn choose_capture(
    config: &Config,
    fw: &dyn crate::dataplane::Firewall,
) -> Result<crate::plan::nft::Capture, GatewayError> {
    use crate::config::CaptureKind;
    use crate::plan::nft::{Capture, CaptureMode};
    let g = &config.gateway;
    let queue_ok = match g.capture {
        CaptureKind::Log => false,
        CaptureKind::Queue | CaptureKind::Auto => fw.queue_supported().await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not tell whether nft has its queue expression; \
                copying initiations instead");
            false
        }),
    };
    let mode = match (g.capture, queue_ok) {
        (CaptureKind::Queue, false) => {
            return Err(GatewayError::Other(
                "gateway.capture = \"queue\" but this kernel has no nft queue expression \
                 (CONFIG_NFT_QUEUE): use capture = \"log\" (the client's retry completes the \
                 first handshake) or \"auto\""
                    .into(),
            ))
        }
        (_, true) => CaptureMode::Queue {
            num: g.capture_queue,
        },
        (_, false) => CaptureMode::Log {
            group: g.capture_queue,
        },
    };
    match mode {
        CaptureMode::Queue { num } => {
            tracing::info!(queue = num, idle_evict = ?g.idle_evict.duration(),
            "just-in-time peers: initiations of peers not installed are held until they are \
             (nft queue)")
        }
        CaptureMode::Log { group } => {
            tracing::info!(log_group = group, idle_evict = ?g.idle_evict.duration(),
            "just-in-time peers: initiations of peers not installed are copied (nft log; no queue \
             expression here), the client's retry completes the first handshake")
        }
    }
    Ok(Capture {
        listen_port: g.listen_port,
        mode,
    })
}

fn linux_dataplane(config: &Config) -> Result<(Adapters, PortInUse), GatewayError> {
    let wg = crate::dataplane::linux::LinuxWg::new(
        config.gateway.interface.clone(),
        config.gateway.backend,
    )?;
    let port_in_use = wg.port_in_use();
    let nl = crate::dataplane::linux::LinuxNetlink::new()?;
    let fw = crate::dataplane::linux::LinuxFirewall::new()?;
    Ok(((Arc::new(wg), Arc::new(nl), Arc::new(fw)), port_in_use))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_admin_tokens_fall_short_of_128_bits() {
        for weak in [
            "admin-secret-token",
            "hunter2",
            "0123456789abcdef0123456789abcde",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ] {
            assert!(token_entropy_bits(weak) < 128, "{weak}");
        }
        for strong in [
            server::new_token(),
            "3f1c9a7e5b2d4c6a8e0f1b3d5c7a9e2f4b6d8c0a".into(),
            "Correct-Horse-Battery-Staple-Xylophone-9".into(),
        ] {
            assert!(token_entropy_bits(&strong) >= 128, "{strong}");
        }
    }

    #[test]
    fn a_malformed_key_file_is_refused_without_quoting_it() {
        let dir = tempfile::tempdir().unwrap();
        let real = PrivateKey::generate().to_base64();
        for (name, text) in [
            ("short", real[..40].to_owned()),
            ("long", format!("{real}xyz")),
            ("junk", format!("{}!!!!", &real[..40])),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, &text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let e = load_or_create_key(&path).unwrap_err().to_string();
            assert!(e.contains("private key"), "{e}");
            assert!(
                !e.contains(&text[..20]),
                "{name}: the error quotes the key: {e}"
            );
        }
    }

    #[test]
    fn a_secret_readable_by_others_or_owned_by_someone_else_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, PrivateKey::generate().to_base64()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create_key(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load_or_create_key(&path).is_ok());
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            let e = load_or_create_key(&path).unwrap_err().to_string();
            assert!(e.contains("not by the daemon's user"), "{e}");
        }
    }
}
