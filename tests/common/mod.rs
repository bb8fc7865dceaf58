//! Shared harness for the integration tests that drive real processes: the
//! `sixpn` binary (daemon and CLI), network namespaces, veth pairs and
//! wireguard-go (docs/architecture.md "Test tiers", tier 2). This file holds
//! the skip rule and the time scale; the rest is by job: `process` (child
//! processes, logs, waiting), `netns` (namespaces, veth, commands in a
//! namespace), `wireguard` (client keys, wireguard-go, wg-quick clients),
//! `gateway` (the daemon under test and its API) and `topology` (the one
//! builder of gateway, orgs, instance hosts and clients a test asks for).
//!
//! Use it from a test crate with
//!
//! ```ignore
//! #[macro_use]
//! mod common;
//! use common::Topology;
//! ```
//!
//! Rules every fixture follows:
//!
//! - Names that are global on the host are unique per test process *and* per
//!   test: namespaces are `sxt-<pid>-<n>`, interface names `sxt<pid%10000><n>`
//!   (the wireguard-go UAPI socket `/var/run/wireguard/IFACE.sock` is global
//!   across namespaces). Tests run in parallel.
//! - Every fixture cleans up on `Drop`, also when the test panics: daemons get
//!   SIGTERM then SIGKILL, namespaces lose their processes and are deleted.
//!   Child processes also get SIGTERM if the test thread dies
//!   (`PR_SET_PDEATHSIG`), so keep fixtures on the thread that made them.
//! - A missing prerequisite (root, a tool) skips the test loudly, printing
//!   `SKIPPED <test>: <reason>` straight to stderr (not captured by libtest),
//!   but under CI (`CI` set, and not `0`/`false`) it fails the test instead:
//!   CI runs everything.

// Each test crate uses a different part of the harness.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The binary under test, built by cargo for integration tests.
pub const SIXPN: &str = env!("CARGO_BIN_EXE_sixpn");

/// Where wireguard-go (and `wg`) keep UAPI sockets; global across namespaces.
pub const WG_SOCKET_DIR: &str = "/var/run/wireguard";

/// How long a daemon may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How much slower everything is here: 1 natively, 8 inside the emulated
/// real-kernel VM (`scripts/vm-run.sh` sets `SIXPN_IN_VM=1`), where software
/// emulation runs some 35x slower.
pub fn slowdown() -> u32 {
    if std::env::var_os("SIXPN_IN_VM").is_some() {
        8
    } else {
        1
    }
}

/// A timeout scaled by [`slowdown`].
pub fn scaled(d: Duration) -> Duration {
    d * slowdown()
}

// ---------------------------------------------------------------------------
// Prerequisites and skipping

#[allow(unused_imports)] // each test crate uses a different part
pub use sixpn::testkit::{in_ci, is_root};

/// The path of `tool` on `PATH` (or the absolute path itself), if executable.
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let executable = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if tool.contains('/') {
        let p = PathBuf::from(tool);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| executable(p))
}

/// Decides whether a test may go on (the one rule: [`sixpn::testkit::prerequisite`]).
///
/// Prefer the macros [`skip_unless!`], [`require_root!`], [`require_tools!`].
pub use sixpn::testkit::prerequisite;

/// The current test function's path, e.g. `e2e_cli::list_and_remove`.
#[macro_export]
macro_rules! test_name {
    () => {{
        fn here() {}
        let name = std::any::type_name_of_val(&here);
        name.strip_suffix("::here").unwrap_or(name)
    }};
}

/// `skip_unless!(condition, "reason {}", args…)`: returns from the test
/// (skipping loudly) when `condition` is false, or panics under CI.
#[macro_export]
macro_rules! skip_unless {
    ($cond:expr, $($reason:tt)+) => {
        if !$crate::common::prerequisite($crate::test_name!(), $cond, format!($($reason)+)) {
            return;
        }
    };
}

/// Skips the test unless it runs as root (fails under CI).
#[macro_export]
macro_rules! require_root {
    () => {
        $crate::skip_unless!(
            $crate::common::is_root(),
            "needs root (network namespaces, wireguard-go); run as root, CI does"
        )
    };
}

/// `require_tools!("wg", "ip", …)`: skips the test unless each is on PATH
/// (fails under CI).
#[macro_export]
macro_rules! require_tools {
    ($($tool:expr),+ $(,)?) => {
        $(
            $crate::skip_unless!(
                $crate::common::find_tool($tool).is_some(),
                "needs `{}` on PATH (apt-get install wireguard-tools wireguard-go iproute2)",
                $tool
            );
        )+
    };
}

mod gateway;
mod netns;
mod process;
mod topology;
mod wireguard;

// Each test crate uses a different part of the harness.
#[allow(unused_imports)]
pub use gateway::*;
#[allow(unused_imports)]
pub use netns::*;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use topology::*;
#[allow(unused_imports)]
pub use wireguard::*;

/// A DNS query for `name`'s AAAA records, in wire format, with id `id`.
pub fn aaaa_query(id: u16, name: &str) -> Vec<u8> {
    let mut m = hickory_proto::op::Message::query();
    m.metadata.id = id;
    m.add_query(hickory_proto::op::Query::query(
        hickory_proto::rr::Name::from_ascii(name).unwrap(),
        hickory_proto::rr::RecordType::AAAA,
    ));
    m.to_vec().unwrap()
}
