//! The real kernel adapters: [`LinuxWg`] (wireguard-control: the kernel
//! module, or a wireguard-go we start, supervise and adopt),
//! [`LinuxNetlink`] (rtnetlink: links, IPv6 addresses, our routes, events)
//! and [`LinuxFirewall`] (`table inet sixpn`: nft -j and nfnetlink).
//!
//! Like every adapter they decide nothing: they read state and carry out
//! instructions. What they own:
//! - the WireGuard interface and, in userspace mode, its wireguard-go
//!   process, which deliberately outlives the daemon (a restart or a
//!   `kill -9` of sixpn must not drop sessions; see [`LinuxWg`]);
//! - routes carrying [`super::ROUTE_PROTOCOL`] on that interface in the main
//!   table; nothing else is ever listed as ours;
//! - the nftables table `inet sixpn`; no other table is listed or changed;
//! - the nfnetlink_queue instance and nfnetlink_log group that [`nfq`] binds
//!   for just-in-time peers (one number each, released when dropped).
//!
//! Both are per network namespace: sockets, links and `/proc/sys/net` follow
//! the netns of the thread that opens them. The daemon lives in one netns;
//! the root tests give each test thread its own (see `testns`).

mod netlink;
pub mod nfq;
mod nft;
mod tc;
mod wg;

#[cfg(test)]
mod testns;

pub use netlink::LinuxNetlink;
pub use nft::{ElementPath, LinuxFirewall};
pub use wg::{forbid_userspace_autospawn, LinuxWg};

use super::KernelError;

/// An rtnetlink error as a [`KernelError`], keeping the errno: netlink
/// reports `-errno` in its error message.
fn rtnl_error(op: impl Into<String>, e: &rtnetlink::Error) -> KernelError {
    match e {
        rtnetlink::Error::NetlinkError(m) => {
            let errno = -m.raw_code();
            KernelError {
                op: op.into(),
                message: std::io::Error::from_raw_os_error(errno).to_string(),
                errno: Some(errno),
            }
        }
        other => KernelError::new(op, other),
    }
}

/// The errno of an rtnetlink error, if it is one from the kernel.
fn rtnl_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}
