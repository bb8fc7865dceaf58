//! Root-test harness: each test runs on its own OS thread that has
//! `unshare(CLONE_NEWNET)`ed into a fresh network namespace, with a
//! current-thread tokio runtime, so every socket, link, `/proc/sys/net`
//! access and child process (all inherit the thread's netns) lands there.
//! No `ip netns`, nothing left behind when the thread ends.
//!
//! The wireguard-go UAPI socket path is global, so interface names are
//! unique per test and process ([`iface`]).

use std::future::Future;
use std::process::Command;

use crate::model::InterfaceName;

pub use crate::testkit::need_root;

/// Runs `f` in a fresh network namespace; panics propagate.
pub fn in_netns<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let r = std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespaces.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
        run(&["link", "set", "lo", "up"]);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f());
    })
    .join();
    if let Err(panic) = r {
        std::panic::resume_unwind(panic);
    }
}

/// An interface name unique to this test process: `sx<pid%10000><tag>`.
pub fn iface(tag: &str) -> InterfaceName {
    format!("sx{}{tag}", std::process::id() % 10_000)
        .parse()
        .expect("interface name")
}

/// Runs `ip ARGS` (in the calling thread's netns); panics on failure.
pub fn run(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether a process with this pid exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}
