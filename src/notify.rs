//! systemd's notify protocol (`sd_notify(3)`), without libsystemd: one
//! datagram per state to `$NOTIFY_SOCKET`.
//!
//! - `READY=1` once the first reconcile pass has made the kernel match the
//!   store (so `Type=notify` units are "started" only when peers work), or
//!   [`DEGRADED_READY`] after a first pass that left some peers out (a route
//!   in the way that someone else owns): those are retried and named in
//!   `STATUS=` and the log, and the rest of the gateway serves, rather than
//!   systemd restarting it over and over for one peer;
//! - `WATCHDOG=1` at a third of `$WATCHDOG_USEC`, but only while the
//!   reconcile loop keeps making passes: a wedged loop gets the daemon
//!   restarted by systemd;
//! - `STOPPING=1` at shutdown.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::reconcile::{Counters, Installed};

/// How long after a first pass that left peers out the gateway still waits
/// for its retries before it reports ready anyway.
pub const DEGRADED_READY: Duration = Duration::from_secs(5);

/// Sends `state` to `$NOTIFY_SOCKET`; does nothing outside systemd.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket address.
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// The watchdog interval systemd asked for, if any.
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Tells systemd when the gateway is ready and keeps the watchdog fed while
/// the reconcile loop is alive.
pub async fn supervise(
    mut installed: watch::Receiver<Arc<Installed>>,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) {
    let mut first_pass = installed.clone();
    let degraded = async move {
        // A pass that got as far as publishing what it installed.
        let _ = first_pass.wait_for(|i| i.published()).await;
        tokio::time::sleep(DEGRADED_READY).await;
        first_pass.borrow().missing.len()
    };
    tokio::select! {
        _ = installed.wait_for(|i| i.last_sync.is_some()) => {
            notify("READY=1\nSTATUS=kernel matches the store");
            tracing::info!("ready: first sync done");
        }
        missing = degraded => {
            notify(&format!(
                "READY=1\nSTATUS=serving; {missing} peers not installed yet, retrying (see the log)"
            ));
            tracing::warn!(missing, "ready, but some peers are not installed yet; retrying");
        }
        _ = stop.wait_for(|s| *s) => return,
    }
    let Some(interval) = watchdog_interval() else {
        return;
    };
    let mut tick = tokio::time::interval(interval / 3);
    let mut last = counters.passes.load(Ordering::Relaxed);
    let mut idle_ticks = 0u32;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => {
                notify("STOPPING=1");
                return;
            }
        }
        let now = counters.passes.load(Ordering::Relaxed);
        // The loop passes at least every 30 s; allow for that when the
        // watchdog is short, but never feed a loop that stopped passing.
        if now != last || idle_ticks < 2 {
            notify("WATCHDOG=1");
        }
        idle_ticks = if now != last { 0 } else { idle_ticks + 1 };
        last = now;
    }
}
