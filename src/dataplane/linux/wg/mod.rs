//! [`LinuxWg`]: the WireGuard interface through wireguard-control.
//!
//! **Kernel backend**: wireguard-control's kernel `apply` creates the link
//! itself (`RTM_NEWLINK` kind `wireguard`, EEXIST ignored) before every
//! `WG_CMD_SET_DEVICE`, so [`WgDevice::ensure`] is an empty apply.
//!
//! **Userspace backend**: we run `wireguard-go -f IFACE` and talk UAPI to
//! `/var/run/wireguard/IFACE.sock`. The process is the interface: when it
//! exits, the TUN link with its addresses and routes vanishes. Hence:
//! - it runs in its own session (`setsid`), so it survives the daemon dying,
//!   even by `kill -9`; dropping a [`LinuxWg`] stops *supervising* but never
//!   kills it. Only [`LinuxWg::shutdown_interface`] removes the interface.
//! - [`WgDevice::ensure`] **adopts** a wireguard-go already serving the socket
//!   (the previous daemon instance's), so live sessions survive restarts. Its
//!   pid comes from `SO_PEERCRED` on the UAPI socket.
//! - a supervisor thread watches the process (our child: `try_wait` every
//!   100 ms; an adopted one we can't wait on: a connect probe every 500 ms),
//!   restarts it with backoff (100 ms doubling to 5 s, reset after 10 s of
//!   uptime) and bumps [`WgDevice::restarts`] so the reconciler resyncs.
//! - its stdout/stderr go to `/var/run/wireguard/IFACE.log`, not to a pipe:
//!   Go exits on SIGPIPE when it writes to a broken stdout/stderr, so a pipe
//!   into our logs would kill the process once the daemon is gone.
//! - wireguard-control's userspace `apply` silently starts its *own*
//!   daemonized wireguard-go when the socket refuses connections (stale
//!   socket after a crash). That process would be unsupervised, so we point
//!   `WG_USERSPACE_IMPLEMENTATION` at `/bin/false` for the whole process
//!   ([`forbid_userspace_autospawn`]): such an apply then fails cleanly and
//!   the supervisor does the restart. An env var is the only hook the crate
//!   offers; a liveness check before `apply` would leave a window.
//!
//! wireguard-control is blocking: every call runs on `spawn_blocking`. Its
//! userspace backend `println!`s `ERROR n` on stdout when wireguard-go
//! rejects a `set` and returns a bare `InvalidInput` (and prints `got
//! unsupported info` for unknown `get` keys). Because that loses the errno,
//! [`WgDevice::configure`] on wireguard-go speaks UAPI itself
//! ([`userspace::uapi_set`]): a listen port someone else holds comes back
//! as EADDRINUSE from either backend (netlink's errno, wireguard-go's
//! `errno=-98`) and is reported as that ([`LinuxWg::port_in_use`]).

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;

use async_trait::async_trait;
use tokio::sync::watch;
use wireguard_control as wgc;

use crate::config::Backend;
use crate::dataplane::{AllowedIp, DeviceState, KernelError, ObservedPeer, PeerUpsert, WgDevice};
use crate::model::{InterfaceName, PrivateKey, PublicKey};

const KERNEL_NAME: &str = "kernel";
const USERSPACE_NAME: &str = "userspace (wireguard-go)";

/// Makes wireguard-control's userspace `apply` unable to start a
/// wireguard-go of its own (see the module doc). Idempotent. Call it early in
/// `main`, before threads that might call `getenv` from C exist;
/// [`LinuxWg::new`] calls it too.
pub fn forbid_userspace_autospawn() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| std::env::set_var("WG_USERSPACE_IMPLEMENTATION", "/bin/false"));
}

/// The WireGuard interface: the kernel module or a supervised wireguard-go.
pub struct LinuxWg {
    name: wgc::InterfaceName,
    backend: Resolved,
    restarts: Arc<watch::Sender<u64>>,
    port_in_use: watch::Sender<Option<KernelError>>,
}

enum Resolved {
    Kernel,
    Userspace {
        sup: Arc<Supervisor>,
        thread: Mutex<Option<JoinHandle<()>>>,
    },
}

impl LinuxWg {
    /// The adapter for `iface`, with `backend` resolved: `auto` picks the
    /// kernel when `iface` already is a kernel WireGuard link, userspace when
    /// a wireguard-go already serves `iface` (we adopt it), else tries to
    /// create the kernel link and falls back to userspace on EOPNOTSUPP.
    /// Blocking (netlink); the probe may leave the kernel link created.
    pub fn new(iface: InterfaceName, backend: Backend) -> Result<Self, KernelError> {
        let name: wgc::InterfaceName = iface
            .as_str()
            .parse()
            .map_err(|e| KernelError::new(format!("interface name {iface}"), e))?;
        let kernel = match backend {
            Backend::Kernel => {
                // Asked for by name: without the module that is a start-up
                // error, not a retry for ever.
                let (kernel, why) = probe_kernel(&iface, &name)?;
                if !kernel {
                    return Err(KernelError {
                        op: format!("backend = \"kernel\" for {iface}"),
                        message: format!(
                            "{why}; load the wireguard module, or set backend = \"userspace\" \
                             (wireguard-go) or \"auto\""
                        ),
                        errno: Some(libc::EOPNOTSUPP),
                    });
                }
                true
            }
            Backend::Userspace => false,
            Backend::Auto => {
                let (kernel, why) = probe_kernel(&iface, &name)?;
                tracing::info!(
                    %iface,
                    backend = if kernel { KERNEL_NAME } else { USERSPACE_NAME },
                    why,
                    "chose the WireGuard backend"
                );
                kernel
            }
        };
        let restarts = Arc::new(watch::channel(0).0);
        let backend = if kernel {
            Resolved::Kernel
        } else {
            forbid_userspace_autospawn();
            let sup = Arc::new(Supervisor::new(iface.clone(), restarts.clone()));
            let s = sup.clone();
            // The thread inherits our network namespace: restarts happen there.
            let thread = std::thread::Builder::new()
                .name(format!("wg-go {iface}"))
                .spawn(move || s.run())
                .map_err(|e| KernelError::io("start the wireguard-go supervisor", &e))?;
            Resolved::Userspace {
                sup,
                thread: Mutex::new(Some(thread)),
            }
        };
        Ok(Self {
            name,
            backend,
            restarts,
            port_in_use: watch::channel(None).0,
        })
    }

    /// The last [`WgDevice::configure`]'s error while its listen port is
    /// held by someone else (`None` once a configure succeeds): the daemon
    /// fails its start on it, since retrying can't help.
    pub fn port_in_use(&self) -> watch::Receiver<Option<KernelError>> {
        self.port_in_use.subscribe()
    }

    /// The pid of the wireguard-go we run or adopted (None: kernel backend,
    /// or no process right now).
    pub fn pid(&self) -> Option<u32> {
        match &self.backend {
            Resolved::Kernel => None,
            Resolved::Userspace { sup, .. } => sup.lock().proc.pid(),
        }
    }

    /// Stops supervising; wireguard-go keeps running and the interface stays
    /// (the next daemon adopts it). Dropping does this. Idempotent.
    pub fn stop(&self) {
        if let Resolved::Userspace { sup, thread } = &self.backend {
            sup.lock().stop = true;
            sup.wake.notify_all();
            let handle = lock(thread).take();
            if let Some(h) = handle {
                let _ = h.join();
            }
        }
    }

    /// Removes the interface: deletes the kernel link, or stops wireguard-go
    /// (SIGTERM, SIGKILL after 2 s) — also one we never adopted — and removes
    /// its socket. For tests and teardown; blocking. A later `ensure` starts
    /// afresh.
    pub fn shutdown_interface(&self) -> Result<(), KernelError> {
        match &self.backend {
            Resolved::Kernel => kernel_delete(self.name),
            Resolved::Userspace { sup, .. } => {
                sup.shutdown();
                Ok(())
            }
        }
    }

    fn wg_backend(&self) -> wgc::Backend {
        match self.backend {
            Resolved::Kernel => wgc::Backend::Kernel,
            Resolved::Userspace { .. } => wgc::Backend::Userspace,
        }
    }

    /// Runs one `DeviceUpdate` off the async threads.
    async fn apply(&self, op: String, update: wgc::DeviceUpdate) -> Result<(), KernelError> {
        let (name, backend) = (self.name, self.wg_backend());
        blocking(&op.clone(), move || {
            update
                .apply(&name, backend)
                .map_err(|e| apply_error(op, &name, backend, &e))
        })
        .await
    }
}

impl Drop for LinuxWg {
    fn drop(&mut self) {
        self.stop();
    }
}

#[async_trait]
impl WgDevice for LinuxWg {
    async fn ensure(&self) -> Result<(), KernelError> {
        match &self.backend {
            Resolved::Kernel => {
                let name = self.name;
                blocking("create the kernel WireGuard link", move || {
                    kernel_create(name)
                })
                .await
            }
            Resolved::Userspace { sup, .. } => {
                let sup = sup.clone();
                blocking("start wireguard-go", move || sup.ensure()).await
            }
        }
    }

    async fn get(&self) -> Result<Option<DeviceState>, KernelError> {
        let (name, backend) = (self.name, self.wg_backend());
        let op = format!("read WireGuard device {}", name.as_str_lossy());
        let got = blocking(&op.clone(), move || {
            match wgc::Device::get(&name, backend) {
                Ok(d) => Ok(Some(d)),
                Err(e) if is_absent(backend, &e) => Ok(None),
                Err(e) => Err(KernelError::io(op, &e)),
            }
        })
        .await?;
        got.map(device_state).transpose()
    }

    async fn configure(&self, key: &PrivateKey, listen_port: u16) -> Result<(), KernelError> {
        let (name, backend) = (self.name, self.wg_backend());
        let op = format!("configure {}", name.as_str_lossy());
        let key = *key.as_bytes();
        let result = blocking(&op.clone(), move || {
            let sent = match backend {
                // Not wireguard-control's apply: it drops wireguard-go's errno.
                wgc::Backend::Userspace => {
                    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
                    let sock = userspace::socket_path(&name.as_str_lossy());
                    userspace::uapi_set(
                        &sock,
                        &format!("private_key={hex}\nlisten_port={listen_port}\n"),
                    )
                }
                _ => wgc::DeviceUpdate::new()
                    .set_private_key(wgc::Key(key))
                    .set_listen_port(listen_port)
                    .apply(&name, backend),
            };
            sent.map_err(|e| configure_error(op, &name, backend, listen_port, &e))
        })
        .await;
        let taken = match &result {
            Err(e) if e.errno == Some(libc::EADDRINUSE) => Some(e.clone()),
            _ => None,
        };
        self.port_in_use.send_replace(taken);
        result
    }

    async fn update_peers(
        &self,
        upserts: &[PeerUpsert],
        removes: &[PublicKey],
    ) -> Result<(), KernelError> {
        if upserts.is_empty() && removes.is_empty() {
            return Ok(());
        }
        // One update; removes first, as in the fake, so a key both removed
        // and upserted ends up freshly added. Never `replace_peers()`.
        let mut update = wgc::DeviceUpdate::new();
        for k in removes {
            update = update.remove_peer_by_key(&wgc::Key(*k.as_bytes()));
        }
        for u in upserts {
            let net = AllowedIp::from(u.net);
            update = update.add_peer(
                wgc::PeerConfigBuilder::new(&wgc::Key(*u.public_key.as_bytes()))
                    .replace_allowed_ips()
                    .add_allowed_ip(net.addr, net.len),
            );
        }
        let op = format!("update peers (+{} -{})", upserts.len(), removes.len());
        self.apply(op, update).await
    }

    fn restarts(&self) -> watch::Receiver<u64> {
        self.restarts.subscribe()
    }

    fn backend_name(&self) -> &'static str {
        match self.backend {
            Resolved::Kernel => KERNEL_NAME,
            Resolved::Userspace { .. } => USERSPACE_NAME,
        }
    }

    fn max_peers(&self) -> Option<usize> {
        match self.backend {
            Resolved::Kernel => None,
            Resolved::Userspace { .. } => Some(crate::dataplane::WIREGUARD_GO_MAX_PEERS),
        }
    }
}

/// Runs blocking wireguard-control work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    op: &str,
    f: impl FnOnce() -> Result<T, KernelError> + Send + 'static,
) -> Result<T, KernelError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| KernelError::new(op, format!("blocking task failed: {e}")))?
}

/// Whether a `Device::get` error means "there is no such interface".
pub(super) fn is_absent(backend: wgc::Backend, e: &io::Error) -> bool {
    match backend {
        // No socket file (or no socket directory at all), or a stale socket.
        wgc::Backend::Userspace => {
            matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ECONNREFUSED))
                || (e.raw_os_error().is_none() && e.kind() == io::ErrorKind::NotFound)
        }
        // No such link; ENOENT: no "wireguard" genetlink family (no module),
        // so no such link either.
        _ => matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ENOENT)),
    }
}

fn apply_error(
    op: String,
    name: &wgc::InterfaceName,
    backend: wgc::Backend,
    e: &io::Error,
) -> KernelError {
    if matches!(backend, wgc::Backend::Userspace) && e.raw_os_error().is_none() {
        let iface = name.as_str_lossy();
        let message = match e.kind() {
            // Our /bin/false stood in for the auto-spawned wireguard-go.
            io::ErrorKind::AddrNotAvailable | io::ErrorKind::NotFound => {
                format!("wireguard-go is not serving {iface} (the supervisor restarts it)")
            }
            io::ErrorKind::InvalidInput => {
                format!("wireguard-go rejected the update on {iface}")
            }
            _ => e.to_string(),
        };
        return KernelError::new(op, message);
    }
    KernelError::io(op, e)
}

/// A failed [`WgDevice::configure`] as the operator needs to hear it: a
/// listen port held by someone else (EADDRINUSE from netlink, or
/// wireguard-go's `errno=-98`) says which port and what to do; a
/// wireguard-go that isn't there is one the supervisor restarts.
pub(super) fn configure_error(
    op: String,
    name: &wgc::InterfaceName,
    backend: wgc::Backend,
    listen_port: u16,
    e: &io::Error,
) -> KernelError {
    let iface = name.as_str_lossy();
    let message = match e.raw_os_error() {
        Some(libc::EADDRINUSE) => format!(
            "UDP port {listen_port} is already in use on this host (another WireGuard \
             interface or program holds it); choose another [gateway] listen_port"
        ),
        _ if matches!(backend, wgc::Backend::Userspace) && is_absent(backend, e) => {
            format!("wireguard-go is not serving {iface} (the supervisor restarts it)")
        }
        _ if matches!(backend, wgc::Backend::Userspace) => {
            format!("wireguard-go on {iface}: {e}")
        }
        _ => e.to_string(),
    };
    KernelError {
        op,
        message,
        errno: e.raw_os_error(),
    }
}

/// Converts wireguard-control's device into ours.
fn device_state(d: wgc::Device) -> Result<DeviceState, KernelError> {
    let key = |k: &wgc::Key| {
        PublicKey::from_bytes(k.0).map_err(|e| KernelError::new("read WireGuard device", e))
    };
    let mut peers = BTreeMap::new();
    for p in d.peers {
        let mut allowed_ips: Vec<AllowedIp> = p
            .config
            .allowed_ips
            .iter()
            .map(|a| AllowedIp {
                addr: a.address,
                len: a.cidr,
            })
            .collect();
        allowed_ips.sort();
        peers.insert(
            key(&p.config.public_key)?,
            ObservedPeer {
                allowed_ips,
                endpoint: p.config.endpoint,
                last_handshake: p.stats.last_handshake_time,
                rx_bytes: p.stats.rx_bytes,
                tx_bytes: p.stats.tx_bytes,
            },
        );
    }
    Ok(DeviceState {
        public_key: d.public_key.as_ref().map(key).transpose()?,
        listen_port: d.listen_port.unwrap_or(0),
        peers,
    })
}

mod kernel;
mod userspace;

use kernel::{kernel_create, kernel_delete, probe_kernel};
use userspace::{lock, Supervisor};

#[cfg(test)]
mod tests;
