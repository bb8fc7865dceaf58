//! The userspace backend's process supervision: starting, adopting and
//! watching the wireguard-go that serves one interface (see the parent
//! module's doc for why it runs in its own session and logs to a file).

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::dataplane::KernelError;
use crate::model::InterfaceName;

/// The userspace implementation we start.
pub(super) const WIREGUARD_GO: &str = "wireguard-go";
/// Where wireguard-go puts its UAPI sockets (its compiled-in path).
pub(super) const SOCKET_DIR: &str = "/var/run/wireguard";
/// How long a fresh wireguard-go may take to serve its socket.
pub(super) const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the supervisor checks a child it can `wait` on.
pub(super) const CHILD_POLL: Duration = Duration::from_millis(100);
/// How often it probes the socket of an adopted process.
pub(super) const ADOPTED_POLL: Duration = Duration::from_millis(500);
/// Restart backoff: first delay, cap, and the uptime that resets it.
pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(5);
pub(super) const STABLE_UPTIME: Duration = Duration::from_secs(10);
/// How long a SIGTERMed wireguard-go gets before SIGKILL.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(2);

/// How long one UAPI exchange may take (wireguard-go answers in
/// microseconds; this only keeps a wedged one from holding a thread).
pub(super) const UAPI_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) fn socket_path(iface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{iface}.sock"))
}

/// Sends one UAPI `set` with `lines` (`key=value`, each ending in a
/// newline) to the wireguard-go on `sock`; its refusal comes back as the
/// OS error it names (see [`uapi_reply`]). Connecting never starts a
/// wireguard-go: a missing one is ENOENT or ECONNREFUSED.
/// <https://www.wireguard.com/xplatform/#configuration-protocol>
pub(super) fn uapi_set(sock: &Path, lines: &str) -> io::Result<()> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(UAPI_TIMEOUT))?;
    s.set_write_timeout(Some(UAPI_TIMEOUT))?;
    s.write_all(format!("set=1\n{lines}\n").as_bytes())?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply)?;
    uapi_reply(&reply)
}

/// wireguard-go's answer to a `set`: `errno=0`, or `errno=-N` for OS error
/// N — `-98` (EADDRINUSE) when it can't bind the listen port
/// (`IpcErrorPortInUse` in wireguard-go's `ipc/uapi_unix.go`).
pub(super) fn uapi_reply(line: &str) -> io::Result<()> {
    let errno = line
        .trim_end()
        .strip_prefix("errno=")
        .and_then(|n| n.parse::<i32>().ok());
    match errno {
        Some(0) => Ok(()),
        Some(n) => Err(io::Error::from_raw_os_error(n.saturating_abs())),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected UAPI reply {line:?}"),
        )),
    }
}

/// The pid of the process serving the UAPI socket, if one accepts.
pub(super) fn serving_pid(sock: &Path) -> Option<u32> {
    let s = UnixStream::connect(sock).ok()?;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of a `ucred`, which is
    // what SO_PEERCRED stores; the fd is open for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // A listening socket reports the credentials of the process that called
    // listen(): wireguard-go itself.
    (rc == 0 && cred.pid > 0).then_some(cred.pid as u32)
}

/// Whether `pid` lives in our thread's network namespace. The UAPI socket
/// path is global, so a wireguard-go of the same name in another netns must
/// not be adopted. Unknown (unreadable) counts as yes.
pub(super) fn same_netns(pid: u32) -> bool {
    let ino = |p: String| fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    match (
        ino(format!("/proc/{pid}/ns/net")),
        ino("/proc/thread-self/ns/net".into()),
    ) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

/// Whether `pid` is gone: reaped now (if it was our child), absent, or a
/// zombie someone else will reap.
pub(super) fn pid_gone(pid: u32) -> bool {
    // SAFETY: waitpid with WNOHANG and a null status pointer only reaps
    // `pid` if it is our exited child.
    if unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), libc::WNOHANG) }
        == pid as libc::pid_t
    {
        return true;
    }
    let zombie = match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => return true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    };
    // A zombie leader may still have threads exiting (holding the socket
    // and the TUN); gone means they are too.
    zombie && fs::read_dir(format!("/proc/{pid}/task")).map_or(true, |d| d.count() <= 1)
}

pub(super) fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory effects; a stale pid yields ESRCH.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// SIGTERM, then SIGKILL after [`STOP_GRACE`]; waits until it is gone.
pub(super) fn terminate(pid: u32) {
    for (sig, grace) in [(libc::SIGTERM, STOP_GRACE), (libc::SIGKILL, STOP_GRACE)] {
        signal(pid, sig);
        let t = Instant::now();
        while t.elapsed() < grace {
            if pid_gone(pid) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    tracing::warn!(pid, "wireguard-go did not exit after SIGKILL");
}

/// The end of the wireguard-go log, for messages, without the boxed
/// "kernel has first class support" banner it prints at start.
pub(super) fn log_tail(path: &Path) -> String {
    let text = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with(['│', '┌', '└']) && !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(5)..].join(" / ")
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What wireguard-go process we have.
pub(super) enum Proc {
    /// None started or adopted yet (or shut down): nothing to supervise.
    Idle,
    /// Our child.
    Own { child: Child, since: Instant },
    /// Found serving the socket; not our child.
    Adopted { pid: u32, since: Instant },
    /// It died; the supervisor starts a new one at `retry_at`.
    Down { retry_at: Instant },
}

impl Proc {
    pub(super) fn pid(&self) -> Option<u32> {
        match self {
            Proc::Own { child, .. } => Some(child.id()),
            Proc::Adopted { pid, .. } => Some(*pid),
            Proc::Idle | Proc::Down { .. } => None,
        }
    }
}

pub(super) struct State {
    pub(super) proc: Proc,
    /// Supervision ends (the [`LinuxWg`] was dropped or stopped).
    pub(super) stop: bool,
    /// A process ran before: a new one means the device was lost.
    ever_ran: bool,
    /// The next restart delay.
    backoff: Duration,
}

/// Starts, adopts and watches the wireguard-go for one interface. `ensure`,
/// `shutdown` and the supervisor thread all act under the one lock.
pub(super) struct Supervisor {
    iface: InterfaceName,
    sock: PathBuf,
    log: PathBuf,
    state: Mutex<State>,
    pub(super) wake: Condvar,
    restarts: Arc<watch::Sender<u64>>,
}

impl Supervisor {
    pub(super) fn new(iface: InterfaceName, restarts: Arc<watch::Sender<u64>>) -> Self {
        Self {
            sock: socket_path(iface.as_str()),
            log: Path::new(SOCKET_DIR).join(format!("{iface}.log")),
            iface,
            state: Mutex::new(State {
                proc: Proc::Idle,
                stop: false,
                ever_ran: false,
                backoff: BACKOFF_MIN,
            }),
            wake: Condvar::new(),
            restarts,
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Makes sure a wireguard-go serves the interface: keeps a live one,
    /// adopts a foreign one, or starts ours now (a pending backoff is no
    /// reason to keep the caller waiting).
    pub(super) fn ensure(&self) -> Result<(), KernelError> {
        let mut st = self.lock();
        // Here also our own child's socket is probed: alive but unreachable
        // (its socket file deleted) is as useless as dead.
        if let Some(why) = self.died(&mut st.proc, true) {
            self.mark_down(&mut st, &why);
        }
        match st.proc {
            Proc::Own { .. } | Proc::Adopted { .. } => Ok(()),
            Proc::Idle | Proc::Down { .. } => self.start(&mut st),
        }
    }

    /// Why the process is gone or useless, if it is. Our child is waited
    /// for, and its socket probed only if `probe_own`; an adopted process
    /// can only be probed.
    fn died(&self, proc: &mut Proc, probe_own: bool) -> Option<String> {
        match proc {
            Proc::Own { child, .. } => match child.try_wait() {
                Ok(None) if probe_own => UnixStream::connect(&self.sock)
                    .err()
                    .map(|e| format!("pid {} stopped serving its socket: {e}", child.id())),
                Ok(None) => None,
                Ok(Some(status)) => Some(format!("exited ({status})")),
                Err(e) => Some(format!("cannot be waited for: {e}")),
            },
            Proc::Adopted { pid, .. } => match UnixStream::connect(&self.sock) {
                Ok(_) => None,
                Err(e) => Some(format!("adopted pid {pid} stopped serving its socket: {e}")),
            },
            Proc::Idle | Proc::Down { .. } => None,
        }
    }

    /// Records a death: cleans up and schedules the restart.
    fn mark_down(&self, st: &mut State, why: &str) {
        let uptime = match &st.proc {
            Proc::Own { since, .. } | Proc::Adopted { since, .. } => since.elapsed(),
            _ => Duration::ZERO,
        };
        // Alive but not serving is no use, and it holds the TUN name.
        match &mut st.proc {
            Proc::Own { child, .. } => {
                if let Ok(None) = child.try_wait() {
                    terminate(child.id());
                    let _ = child.wait();
                }
            }
            Proc::Adopted { pid, .. } => {
                if !pid_gone(*pid) {
                    terminate(*pid);
                }
            }
            Proc::Idle | Proc::Down { .. } => {}
        }
        if uptime >= STABLE_UPTIME {
            st.backoff = BACKOFF_MIN;
        }
        tracing::warn!(
            iface = %self.iface,
            uptime_ms = uptime.as_millis() as u64,
            restart_in_ms = st.backoff.as_millis() as u64,
            log = %log_tail(&self.log),
            "wireguard-go {why}; the interface is gone, restarting it"
        );
        st.proc = Proc::Down {
            retry_at: Instant::now() + st.backoff,
        };
        st.backoff = (st.backoff * 2).min(BACKOFF_MAX);
    }

    /// Adopts the wireguard-go serving the socket, or starts one and waits
    /// until it serves. On success the state holds it; after an earlier
    /// process the restart counter is bumped.
    fn start(&self, st: &mut State) -> Result<(), KernelError> {
        let op = || format!("start wireguard-go for {}", self.iface);
        if let Some(pid) = serving_pid(&self.sock) {
            if !same_netns(pid) {
                return Err(KernelError::new(
                    op(),
                    format!(
                        "{} is served by pid {pid} in another network namespace",
                        self.sock.display()
                    ),
                ));
            }
            tracing::info!(iface = %self.iface, pid, "adopting the running wireguard-go");
            st.proc = Proc::Adopted {
                pid,
                since: Instant::now(),
            };
        } else {
            let child = self.spawn().map_err(|e| KernelError::io(op(), &e))?;
            tracing::info!(iface = %self.iface, pid = child.id(), "started wireguard-go");
            st.proc = Proc::Own {
                child,
                since: Instant::now(),
            };
        }
        if st.ever_ran {
            self.restarts.send_modify(|n| *n += 1);
        }
        st.ever_ran = true;
        self.wake.notify_all();
        Ok(())
    }

    /// `wireguard-go -f IFACE` in its own session, ready when its socket
    /// accepts a connection.
    fn spawn(&self) -> io::Result<Child> {
        fs::create_dir_all(SOCKET_DIR)?;
        // A SIGKILLed wireguard-go leaves its socket; without it the
        // readiness probe below is unambiguous.
        let _ = fs::remove_file(&self.sock);
        let log = fs::File::create(&self.log)?;
        let mut cmd = Command::new(WIREGUARD_GO);
        cmd.arg("-f")
            .arg(self.iface.as_str())
            .env("LOG_LEVEL", "error")
            .env_remove("WG_TUN_FD")
            .env_remove("WG_UAPI_FD")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: setsid is async-signal-safe and touches no memory of ours.
        // Its own session keeps wireguard-go alive when the daemon dies and
        // out of reach of terminal signals meant for the daemon.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let t = Instant::now();
        loop {
            if UnixStream::connect(&self.sock).is_ok() {
                return Ok(child);
            }
            if let Some(status) = child.try_wait()? {
                return Err(io::Error::other(format!(
                    "wireguard-go exited ({status}): {}",
                    log_tail(&self.log)
                )));
            }
            if t.elapsed() > READY_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "wireguard-go did not serve {} within {READY_TIMEOUT:?}",
                        self.sock.display()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The supervisor thread: watch, restart, until `stop`.
    pub(super) fn run(&self) {
        let mut st = self.lock();
        loop {
            if st.stop {
                return;
            }
            let wait = match &st.proc {
                Proc::Idle => None,
                Proc::Own { .. } => Some(CHILD_POLL),
                Proc::Adopted { .. } => Some(ADOPTED_POLL),
                Proc::Down { retry_at } => Some(retry_at.saturating_duration_since(Instant::now())),
            };
            st = match wait {
                None => self.wake.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    self.wake
                        .wait_timeout(st, d)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
            if st.stop {
                return;
            }
            match st.proc {
                Proc::Own { .. } | Proc::Adopted { .. } => {
                    if let Some(why) = self.died(&mut st.proc, false) {
                        self.mark_down(&mut st, &why);
                    }
                }
                Proc::Down { retry_at } if Instant::now() >= retry_at => {
                    if let Err(e) = self.start(&mut st) {
                        tracing::warn!(
                            iface = %self.iface,
                            retry_in_ms = st.backoff.as_millis() as u64,
                            "restarting wireguard-go failed: {e}"
                        );
                        st.proc = Proc::Down {
                            retry_at: Instant::now() + st.backoff,
                        };
                        st.backoff = (st.backoff * 2).min(BACKOFF_MAX);
                    }
                }
                Proc::Idle | Proc::Down { .. } => {}
            }
        }
    }

    /// Stops whatever wireguard-go serves the interface and forgets it.
    pub(super) fn shutdown(&self) {
        let mut st = self.lock();
        match std::mem::replace(&mut st.proc, Proc::Idle) {
            Proc::Own { mut child, .. } => {
                terminate(child.id());
                let _ = child.wait();
            }
            Proc::Adopted { pid, .. } => terminate(pid),
            Proc::Idle | Proc::Down { .. } => {}
        }
        // One we never adopted (a previous instance's) goes too.
        if let Some(pid) = serving_pid(&self.sock) {
            if same_netns(pid) {
                terminate(pid);
            }
        }
        let _ = fs::remove_file(&self.sock);
        let _ = fs::remove_file(&self.log);
        st.backoff = BACKOFF_MIN;
        tracing::info!(iface = %self.iface, "removed the wireguard-go interface");
    }
}
