//! One daemon per interface: a lock held for the process's lifetime.
//!
//! Two daemons on one interface (same network namespace) would each make
//! the kernel match their own idea of it, flipping keys, ports, routes and
//! addresses for ever. So the daemon takes an exclusive `flock` on a file
//! named after the interface and the namespace (its inode, as `ip netns
//! identify` tells namespaces apart) in the runtime directory, writes its
//! PID there, and keeps the descriptor open until it exits; the kernel
//! drops the lock with the process, however it ends. The same interface
//! name in another namespace is another interface and another lock.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::model::InterfaceName;

/// Where the locks live (systemd's `RuntimeDirectory=sixpn`).
pub const RUNTIME_DIR: &str = "/run/sixpn";

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another daemon holds it.
    #[error(
        "interface {interface} is already managed by another sixpn daemon (pid {pid}) in this \
         network namespace; stop that one first (lock {path})"
    )]
    Held {
        /// The interface.
        interface: InterfaceName,
        /// The holder's PID, as it wrote it (`?` if unreadable).
        pid: String,
        /// The lock file.
        path: PathBuf,
    },
    /// The lock file could not be opened or locked.
    #[error("lock {path}: {error}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// What failed.
        error: std::io::Error,
    },
}

/// The held lock; dropping it (or exiting) releases it.
#[derive(Debug)]
pub struct InterfaceLock {
    _file: File,
    path: PathBuf,
}

impl InterfaceLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The lock file for `interface` in the calling thread's network namespace.
pub fn lock_path(dir: &Path, interface: &InterfaceName) -> Result<PathBuf, std::io::Error> {
    let netns = std::fs::metadata("/proc/thread-self/ns/net")?.ino();
    Ok(dir.join(format!("{interface}.{netns}.lock")))
}

/// Takes the lock for `interface` under `dir`, or says who holds it.
pub fn lock_interface(dir: &Path, interface: &InterfaceName) -> Result<InterfaceLock, LockError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |error| LockError::Io { path, error }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = lock_path(dir, interface).map_err(io(dir))?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io(&path))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(LockError::Io { path, error: e });
        }
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        let pid = pid.trim();
        return Err(LockError::Held {
            interface: interface.clone(),
            pid: if pid.is_empty() {
                "?".into()
            } else {
                pid.into()
            },
            path,
        });
    }
    let write = |f: &mut File| -> std::io::Result<()> {
        f.set_len(0)?;
        f.rewind()?;
        writeln!(f, "{}", std::process::id())?;
        f.flush()
    };
    write(&mut file).map_err(io(&path))?;
    Ok(InterfaceLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_interface_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let ifname: InterfaceName = "sixpn0".parse().unwrap();
        let held = lock_interface(dir.path(), &ifname).unwrap();
        let text = std::fs::read_to_string(held.path()).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        // flock locks belong to the open file: a second open is a second
        // daemon, even in this process.
        let e = lock_interface(dir.path(), &ifname).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, LockError::Held { .. }), "{msg}");
        assert!(msg.contains("sixpn0"), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        // Another interface is another lock; a released one can be taken.
        let other = lock_interface(dir.path(), &"sixpn1".parse().unwrap()).unwrap();
        drop(held);
        lock_interface(dir.path(), &ifname).unwrap();
        drop(other);
    }
}
