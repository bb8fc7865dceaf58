//! `sixpn gateway`: the daemon's wiring. Loads the key, opens the store,
//! registers this gateway, runs the reconciler and, following its snapshots,
//! the DNS listeners, serves the control API, and stops cleanly on
//! SIGTERM/SIGINT.
//!
//! Start-up order matters: everything that can fail on bad local state (key
//! file, store, sockets) is checked before the gateway announces itself.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::api::server::{self, ApiState};
use crate::config::{Config, StoreKind};
use crate::dataplane::{KernelError, Netlink, WgDevice};
use crate::dns::server::{upstreams_or_resolv_conf, DnsService, DnsSettings};
use crate::model::PrivateKey;
use crate::plan::Identity;
use crate::reconcile::{Reconciler, Settings};
use crate::store::sqlite::SqliteStore;
use crate::store::{Gateway, Store, StoreError};

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

/// Reads a secret file, creating it with `make()` (mode 0600) if missing.
/// A file readable by others is refused for private keys: it may have leaked.
fn load_or_create_secret(
    path: &Path,
    make: impl FnOnce() -> String,
) -> Result<(String, bool), GatewayError> {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let mode = std::fs::metadata(path)
                .map_err(|e| file_err(path, e))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(file_err(
                    path,
                    format!(
                        "mode {:o} lets others read a secret; chmod 600 it",
                        mode & 0o777
                    ),
                ));
            }
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
pub fn open_store(config: &Config) -> Result<Arc<dyn Store>, GatewayError> {
    match config.store.kind {
        StoreKind::Sqlite => Ok(Arc::new(SqliteStore::open(&config.store.path)?)),
        StoreKind::Etcd => Err(GatewayError::Other(
            "store.kind = \"etcd\" is not available in this build yet; use \"sqlite\"".into(),
        )),
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), GatewayError> {
    // Everything we create (keys, tokens, sockets) is private by default.
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
    let key = load_or_create_key(&config.gateway.private_key_file)?;
    let store = open_store(&config)?;
    let me = Gateway {
        name: config.gateway.name.clone(),
        region: config.gateway.region.clone(),
        host_id: config.gateway.host_id,
        endpoint: config.gateway.endpoint.clone(),
        public_key: key.public_key(),
    };
    store.register_gateway(&me).await?;
    tracing::info!(gateway = %me.name, region = %me.region, host_id = %me.host_id,
        endpoint = %me.endpoint, public_key = %me.public_key, "gateway registered");

    let admin_token_sha256 = match config.api.listen {
        Some(_) => {
            let (token, created) = load_or_create_secret(&config.api.admin_token_file, || {
                use base64::Engine as _;
                let raw: [u8; 32] = rand::random();
                format!(
                    "sixpn_{}",
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
                )
            })?;
            if created {
                tracing::info!(path = %config.api.admin_token_file.display(), "created admin API token");
            }
            Some(server::token_sha256(&token))
        }
        None => None,
    };

    let (wg, nl) = linux_dataplane(&config)?;
    tracing::info!(backend = wg.backend_name(), interface = %config.gateway.interface,
        "WireGuard backend chosen");
    let reconciler = Reconciler::new(
        wg,
        nl,
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
        },
    );
    let state = Arc::new(ApiState {
        store: store.clone(),
        gateway: me.name.clone(),
        region: me.region.clone(),
        admin_token_sha256,
        dataplane: Some(reconciler.view()),
    });
    let router = server::router(state);

    // DNS follows the snapshots the reconciler works from: the zone and the
    // set of listeners change with the same store state as the kernel.
    let upstreams = upstreams_or_resolv_conf(&config.dns.upstream);
    tracing::info!(upstreams = ?upstreams, "DNS forwards names outside .internal");
    let dns = DnsService::start(DnsSettings::new(
        me.name.clone(),
        me.region.clone(),
        upstreams,
    ));
    let snapshots = reconciler.snapshots();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let dns_task = tokio::spawn(dns.run(snapshots, stop_rx.clone()));
    let reconcile_task = tokio::spawn(reconciler.run(stop_rx.clone()));
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let unix = server::bind_unix(&config.api.socket)?;
    tracing::info!(socket = %config.api.socket.display(), "API listening on unix socket");
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(server::serve_unix(unix, router.clone(), stopped()));
    if let Some(addr) = config.api.listen {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| server::ListenError::Io {
                what: addr.to_string(),
                source,
            })?;
        tracing::info!(%addr, "API listening on TCP (bearer tokens)");
        tasks.spawn(server::serve_tcp(tcp, router, stopped()));
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| GatewayError::Other(format!("cannot watch SIGTERM: {e}")))?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| GatewayError::Other(format!("cannot watch SIGINT: {e}")))?;
    tracing::info!("gateway ready");
    let result = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); Ok(()) }
        _ = int.recv() => { tracing::info!("SIGINT: shutting down"); Ok(()) }
        Some(done) = tasks.join_next() => match done {
            Ok(Ok(())) => Err(GatewayError::Other("an API listener stopped unexpectedly".into())),
            Ok(Err(e)) => Err(GatewayError::Other(format!("API listener failed: {e}"))),
            Err(e) => Err(GatewayError::Other(format!("API task failed: {e}"))),
        },
    };
    let _ = stop_tx.send(true);
    // Give in-flight requests a moment to finish, then go.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let _ = reconcile_task.await;
    let _ = dns_task.await;
    let _ = std::fs::remove_file(&config.api.socket);
    // The interface, its peers, addresses and routes stay: a restarted
    // daemon adopts them and live sessions continue.
    tracing::info!("stopped");
    result
}

/// The two kernel adapters the reconciler drives.
type Adapters = (Arc<dyn WgDevice>, Arc<dyn Netlink>);

/// The Linux adapters for the configured interface and backend.
fn linux_dataplane(config: &Config) -> Result<Adapters, GatewayError> {
    let wg = crate::dataplane::linux::LinuxWg::new(
        config.gateway.interface.clone(),
        config.gateway.backend,
    )?;
    let nl = crate::dataplane::linux::LinuxNetlink::new()?;
    Ok((Arc::new(wg), Arc::new(nl)))
}
