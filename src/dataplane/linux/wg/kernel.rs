//! The kernel backend: the `wireguard` genetlink family and the link it
//! manages, through wireguard-control, and the `auto` probe that picks it
//! when the module is there.

use std::io;

use wireguard_control as wgc;

use super::is_absent;
use super::userspace::{serving_pid, socket_path};
use crate::dataplane::KernelError;
use crate::model::InterfaceName;

/// Whether `name` is a kernel WireGuard link, asked of the `wireguard`
/// genetlink family by name. No: no such link (ENODEV), no WireGuard in the
/// kernel (ENOENT: no such family), a link of another kind (EOPNOTSUPP).
/// (Not `Device::list`: it dumps every link through wireguard-control's older
/// netlink-packet-route, which logs warnings about newer kernels' attributes.)
pub(super) fn kernel_link_exists(name: wgc::InterfaceName) -> Result<bool, io::Error> {
    match wgc::Device::get(&name, wgc::Backend::Kernel) {
        Ok(_) => Ok(true),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENODEV | libc::ENOENT | libc::EOPNOTSUPP)
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Makes sure the kernel link exists. An empty apply only sends
/// `RTM_NEWLINK` (which also autoloads the module); the check after it is
/// needed because wireguard-control ignores EEXIST, which a link of another
/// kind with our name would give.
pub(super) fn kernel_create(name: wgc::InterfaceName) -> Result<(), KernelError> {
    let iface = name.as_str_lossy().into_owned();
    let op = || format!("create kernel WireGuard link {iface}");
    let exists = || kernel_link_exists(name).map_err(|e| KernelError::io(op(), &e));
    if exists()? {
        return Ok(());
    }
    wgc::DeviceUpdate::new()
        .apply(&name, wgc::Backend::Kernel)
        .map_err(|e| KernelError::io(op(), &e))?;
    if !exists()? {
        return Err(KernelError::new(
            op(),
            "a link of that name exists and is not a WireGuard link",
        ));
    }
    Ok(())
}

pub(super) fn kernel_delete(name: wgc::InterfaceName) -> Result<(), KernelError> {
    let op = || format!("delete WireGuard link {}", name.as_str_lossy());
    // `Device` is non-exhaustive: deleting goes through a fetched one.
    let device = match wgc::Device::get(&name, wgc::Backend::Kernel) {
        Ok(d) => d,
        Err(e) if is_absent(wgc::Backend::Kernel, &e) => return Ok(()),
        Err(e) => return Err(KernelError::io(op(), &e)),
    };
    match device.delete() {
        Err(e) if e.raw_os_error() != Some(libc::ENODEV) => Err(KernelError::io(op(), &e)),
        _ => Ok(()),
    }
}

/// `auto`: (kernel?, why).
pub(super) fn probe_kernel(
    iface: &InterfaceName,
    name: &wgc::InterfaceName,
) -> Result<(bool, &'static str), KernelError> {
    let op = || format!("probe the WireGuard kernel module for {iface}");
    if kernel_link_exists(*name).map_err(|e| KernelError::io(op(), &e))? {
        return Ok((true, "the interface is a kernel WireGuard link"));
    }
    if serving_pid(&socket_path(iface.as_str())).is_some() {
        return Ok((false, "a wireguard-go already serves the interface"));
    }
    match kernel_create(*name) {
        Ok(()) => Ok((true, "the kernel created a WireGuard link")),
        Err(e) if e.errno == Some(libc::EOPNOTSUPP) => {
            Ok((false, "the kernel has no WireGuard support (EOPNOTSUPP)"))
        }
        Err(e) => Err(e),
    }
}
