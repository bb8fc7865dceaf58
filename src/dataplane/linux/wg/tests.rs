//! The WireGuard adapter against real interfaces in a scratch network
//! namespace (root only; both backends where available).

use std::collections::BTreeMap;

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::userspace::{serving_pid, signal, socket_path, uapi_reply};
use super::*;
use crate::dataplane::linux::testns::{alive, iface, in_netns, need_root};
use crate::dataplane::linux::LinuxNetlink;
use crate::dataplane::{Netlink, MTU};
use crate::model::{HostId, NetworkId, PeerNet, PeerSlot};

fn net(slot: u32) -> PeerNet {
    let prefix = NetworkId::new(0x18).unwrap().prefix();
    PeerSlot::new(slot)
        .unwrap()
        .net(prefix, HostId::from_u32(1))
}

fn up(k: PublicKey, slot: u32) -> PeerUpsert {
    PeerUpsert {
        public_key: k,
        net: net(slot),
    }
}

fn key() -> PublicKey {
    PrivateKey::generate().public_key()
}

fn ips(d: &DeviceState) -> BTreeMap<PublicKey, Vec<AllowedIp>> {
    d.peers
        .iter()
        .map(|(k, p)| (*k, p.allowed_ips.clone()))
        .collect()
}

fn slots(pairs: &[(PublicKey, &[u32])]) -> BTreeMap<PublicKey, Vec<AllowedIp>> {
    pairs
        .iter()
        .map(|(k, s)| (*k, s.iter().map(|&i| AllowedIp::from(net(i))).collect()))
        .collect()
}

/// Removes the interface however the test ends: whatever serves the
/// name in this netns is stopped, even after the adapter was dropped.
struct Teardown(InterfaceName, Backend);
impl Drop for Teardown {
    fn drop(&mut self) {
        if let Ok(wg) = LinuxWg::new(self.0.clone(), self.1) {
            let _ = wg.shutdown_interface();
        }
    }
}

/// Waits for the restart counter to pass `seen`; returns the time taken.
async fn next_restart(rx: &mut watch::Receiver<u64>, seen: u64) -> Duration {
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|n| *n > seen))
        .await
        .expect("restart within 5 s")
        .expect("watch open");
    t.elapsed()
}

/// ensure → configure → peer deltas → shutdown, on either backend.
async fn exercise(wg: &LinuxWg, name: &InterfaceName) {
    let nl = LinuxNetlink::new().unwrap();
    assert_eq!(wg.get().await.unwrap(), None, "no interface yet");
    wg.ensure().await.unwrap();
    wg.ensure().await.unwrap();
    let link = nl.link(name.as_str()).await.unwrap().expect("link exists");
    assert_eq!(link.mtu, MTU);

    let d = wg.get().await.unwrap().expect("device");
    assert_eq!((d.public_key, d.peers.len()), (None, 0));

    let sk = PrivateKey::generate();
    wg.configure(&sk, 51820).await.unwrap();
    let (a, b, c) = (key(), key(), key());
    wg.update_peers(&[up(a, 0), up(b, 1), up(c, 2)], &[])
        .await
        .unwrap();
    let d = wg.get().await.unwrap().unwrap();
    assert_eq!(d.public_key, Some(sk.public_key()));
    assert_eq!(d.listen_port, 51820);
    assert_eq!(ips(&d), slots(&[(a, &[0]), (b, &[1]), (c, &[2])]));
    let p = &d.peers[&a];
    assert_eq!((p.endpoint, p.last_handshake, p.rx_bytes), (None, None, 0));

    // b claims a's /120: it moves (and b's old one is replaced).
    wg.update_peers(&[up(b, 0)], &[]).await.unwrap();
    let d = wg.get().await.unwrap().unwrap();
    assert_eq!(ips(&d), slots(&[(a, &[]), (b, &[0]), (c, &[2])]));

    // One update: a gets a new /120, c goes; b, key and port stay.
    wg.update_peers(&[up(a, 3)], &[c]).await.unwrap();
    let d = wg.get().await.unwrap().unwrap();
    assert_eq!(ips(&d), slots(&[(a, &[3]), (b, &[0])]));
    assert_eq!(d.public_key, Some(sk.public_key()));
    assert_eq!(d.listen_port, 51820);

    // Removing an unknown key is fine; an empty update is a no-op.
    wg.update_peers(&[], &[key()]).await.unwrap();
    wg.update_peers(&[], &[]).await.unwrap();
    assert_eq!(wg.get().await.unwrap().unwrap().peers.len(), 2);

    wg.shutdown_interface().unwrap();
    assert_eq!(wg.get().await.unwrap(), None);
    assert_eq!(nl.link(name.as_str()).await.unwrap(), None);
    wg.shutdown_interface().unwrap();
}

#[test]
fn absent_means_no_socket_or_no_link() {
    let os = io::Error::from_raw_os_error;
    let (us, k) = (wgc::Backend::Userspace, wgc::Backend::Kernel);
    assert!(is_absent(us, &os(libc::ECONNREFUSED)));
    assert!(is_absent(us, &os(libc::ENOENT)));
    assert!(is_absent(us, &io::ErrorKind::NotFound.into()));
    assert!(!is_absent(us, &os(libc::EACCES)));
    assert!(is_absent(k, &os(libc::ENODEV)));
    assert!(!is_absent(k, &os(libc::EPERM)));
}

#[test]
fn uapi_replies_carry_wireguard_go_errno() {
    assert!(uapi_reply("errno=0\n").is_ok());
    let e = uapi_reply("errno=-98\n").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE));
    let e = uapi_reply("").unwrap_err();
    assert_eq!(
        (e.raw_os_error(), e.kind()),
        (None, io::ErrorKind::InvalidData)
    );
}

#[test]
fn a_taken_listen_port_is_named_on_both_backends() {
    let name: wgc::InterfaceName = "wg0".parse().unwrap();
    let os = io::Error::from_raw_os_error;
    for backend in [wgc::Backend::Kernel, wgc::Backend::Userspace] {
        let e = configure_error("configure wg0".into(), &name, backend, 51820, &os(98));
        assert_eq!(e.errno, Some(libc::EADDRINUSE));
        assert!(
            e.message.contains("UDP port 51820 is already in use"),
            "{e}"
        );
        assert!(e.message.contains("[gateway] listen_port"), "{e}");
    }
    let e = configure_error(
        "configure wg0".into(),
        &name,
        wgc::Backend::Userspace,
        51820,
        &os(libc::ECONNREFUSED),
    );
    assert!(e.message.contains("not serving wg0"), "{e}");
}

#[test]
fn a_listen_port_held_by_another_program_is_eaddrinuse_on_wireguard_go() {
    if !need_root("a_listen_port_held_by_another_program_is_eaddrinuse_on_wireguard_go") {
        return;
    }
    in_netns(|| async {
        let name = iface("p");
        let _t = Teardown(name.clone(), Backend::Userspace);
        let wg = LinuxWg::new(name.clone(), Backend::Userspace).unwrap();
        let taken = wg.port_in_use();
        wg.ensure().await.unwrap();
        // Dual-stack: v4 is held too.
        let holder = std::net::UdpSocket::bind("[::]:51823").unwrap();
        let sk = PrivateKey::generate();
        let e = wg.configure(&sk, 51823).await.unwrap_err();
        assert_eq!(e.errno, Some(libc::EADDRINUSE), "{e}");
        assert!(
            e.message.contains("UDP port 51823 is already in use"),
            "{e}"
        );
        assert_eq!(taken.borrow().as_ref().map(|e| e.errno), Some(e.errno));
        // Freed, it configures, and the conflict is cleared.
        drop(holder);
        wg.configure(&sk, 51823).await.unwrap();
        assert!(taken.borrow().is_none());
        let d = wg.get().await.unwrap().unwrap();
        assert_eq!(
            (d.listen_port, d.public_key),
            (51823, Some(sk.public_key()))
        );
        wg.shutdown_interface().unwrap();
    });
}

#[test]
fn userspace_device_lifecycle() {
    if !need_root("userspace_device_lifecycle") {
        return;
    }
    in_netns(|| async {
        let name = iface("a");
        let _t = Teardown(name.clone(), Backend::Userspace);
        let wg = LinuxWg::new(name.clone(), Backend::Userspace).unwrap();
        assert_eq!(wg.backend_name(), USERSPACE_NAME);
        assert_eq!(wg.pid(), None);
        exercise(&wg, &name).await;
        assert_eq!(wg.pid(), None);
    });
}

#[test]
fn kernel_device_lifecycle_when_the_module_exists() {
    if !need_root("kernel_device_lifecycle_when_the_module_exists") {
        return;
    }
    in_netns(|| async {
        let name = iface("k");
        let wg = match LinuxWg::new(name.clone(), Backend::Kernel) {
            Err(e) if e.errno == Some(libc::EOPNOTSUPP) => {
                eprintln!("SKIPPED kernel_device_lifecycle: no WireGuard in this kernel");
                return;
            }
            r => r.unwrap(),
        };
        assert_eq!(wg.backend_name(), KERNEL_NAME);
        match wg.ensure().await {
            Err(e) if e.errno == Some(libc::EOPNOTSUPP) => {
                eprintln!("SKIPPED kernel_device_lifecycle: no WireGuard in this kernel");
                return;
            }
            r => r.unwrap(),
        }
        wg.shutdown_interface().unwrap();
        exercise(&wg, &name).await;
    });
}

#[test]
fn auto_backend_works_with_whatever_it_picks() {
    if !need_root("auto_backend_works_with_whatever_it_picks") {
        return;
    }
    in_netns(|| async {
        let name = iface("u");
        let _t = Teardown(name.clone(), Backend::Userspace);
        let wg = LinuxWg::new(name.clone(), Backend::Auto).unwrap();
        eprintln!("auto picked {}", wg.backend_name());
        if !Path::new("/sys/module/wireguard").exists() {
            assert_eq!(wg.backend_name(), USERSPACE_NAME);
        }
        let _k = Teardown(name.clone(), Backend::Kernel);
        // Probing for the kernel module may have created the link.
        wg.shutdown_interface().unwrap();
        exercise(&wg, &name).await;
    });
}

#[test]
fn killed_wireguard_go_is_restarted_and_counted() {
    if !need_root("killed_wireguard_go_is_restarted_and_counted") {
        return;
    }
    in_netns(|| async {
        let name = iface("r");
        let _t = Teardown(name.clone(), Backend::Userspace);
        let nl = LinuxNetlink::new().unwrap();
        let wg = LinuxWg::new(name.clone(), Backend::Userspace).unwrap();
        let mut rx = wg.restarts();
        wg.ensure().await.unwrap();
        wg.configure(&PrivateKey::generate(), 51821).await.unwrap();
        wg.update_peers(&[up(key(), 0)], &[]).await.unwrap();
        let pid = wg.pid().unwrap();
        assert_eq!(*rx.borrow_and_update(), 0);

        for round in 1..=2 {
            let before = wg.pid().unwrap();
            signal(before, libc::SIGKILL);
            let took = next_restart(&mut rx, round - 1).await;
            eprintln!("restart {round} noticed after {took:?}");
            // Natively ~0.2 s; under TCG emulation up to ~1.9 s.
            assert!(took < Duration::from_secs(3), "{took:?}");
            assert_eq!(*rx.borrow(), round);
            let now = wg.pid().expect("restarted");
            assert_ne!(now, before);
            assert!(!alive(before), "the killed one is reaped");
            // Back, and empty: the reconciler must resync.
            let d = wg.get().await.unwrap().expect("device back");
            assert_eq!((d.public_key, d.peers.len()), (None, 0));
            assert!(nl.link(name.as_str()).await.unwrap().is_some());
        }
        wg.update_peers(&[up(key(), 1)], &[]).await.unwrap();

        // Alive but unreachable (socket file deleted): the supervisor
        // can't tell, ensure can, and replaces it.
        let before = wg.pid().unwrap();
        fs::remove_file(socket_path(name.as_str())).unwrap();
        assert_eq!(wg.get().await.unwrap(), None);
        wg.ensure().await.unwrap();
        assert_eq!(*rx.borrow_and_update(), 3);
        assert_ne!(wg.pid(), Some(before));
        assert!(!alive(before));
        assert!(wg.get().await.unwrap().is_some());

        wg.shutdown_interface().unwrap();
        assert!(!alive(pid));
    });
}

#[test]
fn apply_never_spawns_an_unsupervised_wireguard_go() {
    if !need_root("apply_never_spawns_an_unsupervised_wireguard_go") {
        return;
    }
    in_netns(|| async {
        let name = iface("g");
        let _t = Teardown(name.clone(), Backend::Userspace);
        let wg = LinuxWg::new(name.clone(), Backend::Userspace).unwrap();
        wg.ensure().await.unwrap();
        let pid = wg.pid().unwrap();
        wg.stop(); // nobody restarts it now
        signal(pid, libc::SIGKILL);
        // Not `alive`: a Go process's leader is a zombie while its other
        // threads still exit and hold the socket.
        while UnixStream::connect(socket_path(name.as_str())).is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The socket file is stale: wireguard-control would start its
        // own daemonized wireguard-go here without our guard.
        assert!(socket_path(name.as_str()).exists());
        let e = wg.update_peers(&[up(key(), 0)], &[]).await.unwrap_err();
        assert!(e.message.contains("not serving"), "{e}");
        assert_eq!(serving_pid(&socket_path(name.as_str())), None);
        assert_eq!(wg.get().await.unwrap(), None);
        wg.shutdown_interface().unwrap();
    });
}

#[test]
fn a_new_instance_adopts_the_running_wireguard_go() {
    if !need_root("a_new_instance_adopts_the_running_wireguard_go") {
        return;
    }
    in_netns(|| async {
        let name = iface("d");
        let _t = Teardown(name.clone(), Backend::Userspace);
        let sk = PrivateKey::generate();
        let (a, b) = (key(), key());
        let first = {
            let wg = LinuxWg::new(name.clone(), Backend::Userspace).unwrap();
            wg.ensure().await.unwrap();
            wg.configure(&sk, 51822).await.unwrap();
            wg.update_peers(&[up(a, 0), up(b, 1)], &[]).await.unwrap();
            wg.pid().unwrap()
            // Dropped without shutdown, like a daemon that exits.
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(alive(first), "wireguard-go outlives the adapter");

        // auto: the running wireguard-go decides, even with a module.
        let wg = LinuxWg::new(name.clone(), Backend::Auto).unwrap();
        assert_eq!(wg.backend_name(), USERSPACE_NAME);
        let mut rx = wg.restarts();
        wg.ensure().await.unwrap();
        assert_eq!(wg.pid(), Some(first), "adopted, not restarted");
        let d = wg.get().await.unwrap().unwrap();
        assert_eq!(d.public_key, Some(sk.public_key()));
        assert_eq!(ips(&d), slots(&[(a, &[0]), (b, &[1])]));
        assert_eq!(*rx.borrow_and_update(), 0);

        // An adopted process is watched through its socket.
        signal(first, libc::SIGKILL);
        let took = next_restart(&mut rx, 0).await;
        eprintln!("adopted process death noticed and restarted after {took:?}");
        let second = wg.pid().unwrap();
        assert_ne!(second, first);
        assert!(!alive(first));
        assert_eq!(wg.get().await.unwrap().unwrap().peers.len(), 0);

        wg.shutdown_interface().unwrap();
        assert!(!alive(second));
    });
}
