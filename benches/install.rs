//! Issue-3 figures: installing peers through sixpn (store → plan → one
//! wireguard update + routes + addresses) side by side with `wg setconf` /
//! `wg set` of the same peers on the same backend (wireguard-go here), in
//! one run, in a throwaway network namespace. Needs root.
//!
//! `cargo bench --bench install` (SIXPN_BENCH_SIZES=1000,10000 by default).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sixpn::config::Backend;
use sixpn::dataplane::linux::{LinuxNetlink, LinuxWg};
use sixpn::model::PrivateKey;
use sixpn::reconcile::rig::{self, Rig};
use sixpn::store::{NewPeer, Store};

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ms(d: Duration) -> String {
    format!("{:>9.1} ms", d.as_secs_f64() * 1e3)
}

async fn one_size(n: usize, round: usize) {
    let rig = Rig::new().await;
    let (dir, store, key) = (&rig.dir, rig.store.clone(), rig.key.clone());
    let mut conf = format!(
        "[Interface]\nPrivateKey = {}\nListenPort = 51821\n",
        key.to_base64()
    );
    for i in 0..n {
        let (p, _) = store
            .create_peer(&NewPeer {
                org: rig::ORG.parse().unwrap(),
                name: format!("p{i}").parse().unwrap(),
                region: rig::REGION.parse().unwrap(),
                public_key: PrivateKey::generate().public_key(),
                ephemeral: None,
            })
            .await
            .unwrap();
        conf.push_str(&format!(
            "[Peer]\nPublicKey = {}\nAllowedIPs = {}\n",
            p.public_key, p.net
        ));
    }
    let conf_path = dir.path().join("peers.conf");
    std::fs::write(&conf_path, conf).unwrap();

    // sixpn: one full pass into an empty interface.
    let ours: sixpn::model::InterfaceName = format!("sxbi{round}a").parse().unwrap();
    // Both sides start from an empty interface.
    let wg = Arc::new(LinuxWg::new(ours.clone(), Backend::Userspace).unwrap());
    sixpn::dataplane::WgDevice::ensure(&*wg).await.unwrap();
    let mut rec = rig.reconciler(
        wg.clone(),
        Arc::new(LinuxNetlink::new().unwrap()),
        // The isolation ruleset is not what this measures (benches/nft.rs).
        Arc::new(sixpn::dataplane::fake::FakeKernel::new()),
        ours.clone(),
    );
    let t = Instant::now();
    assert!(rec.pass_all().await);
    let bulk_ours = t.elapsed();
    let peers = sh(&["wg", "show", ours.as_str(), "peers"]).lines().count();
    assert_eq!(peers, n);

    // wg setconf of the same peers into an empty wireguard-go interface.
    let theirs = format!("sxbi{round}b");
    let mut wggo = Command::new("wireguard-go")
        .args(["-f", &theirs])
        .env("LOG_LEVEL", "error")
        .spawn()
        .unwrap();
    let sock = format!("/var/run/wireguard/{theirs}.sock");
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let t = Instant::now();
    sh(&["wg", "setconf", &theirs, conf_path.to_str().unwrap()]);
    let bulk_wg = t.elapsed();

    println!(
        "{n:>6} peers into an empty interface:  sixpn {}   wg setconf {}   ratio {:.2}",
        ms(bulk_ours),
        ms(bulk_wg),
        bulk_ours.as_secs_f64() / bulk_wg.as_secs_f64()
    );

    // One more peer on an interface holding n: sixpn's store-change pass vs `wg set`.
    let mut ours_one = Vec::new();
    let mut wg_one = Vec::new();
    for j in 0..20 {
        let (p, _) = store
            .create_peer(&NewPeer {
                org: rig::ORG.parse().unwrap(),
                name: format!("extra{j}").parse().unwrap(),
                region: rig::REGION.parse().unwrap(),
                public_key: PrivateKey::generate().public_key(),
                ephemeral: None,
            })
            .await
            .unwrap();
        let t = Instant::now();
        assert!(rec.pass_store_change().await);
        ours_one.push(t.elapsed());
        let k = PrivateKey::generate().public_key().to_base64();
        let t = Instant::now();
        sh(&[
            "wg",
            "set",
            &theirs,
            "peer",
            &k,
            "allowed-ips",
            &p.net.to_string(),
        ]);
        wg_one.push(t.elapsed());
    }
    ours_one.sort();
    wg_one.sort();
    println!(
        "{n:>6} + 1 peer (median of 20):          sixpn {}   wg set     {}   ratio {:.2}",
        ms(ours_one[10]),
        ms(wg_one[10]),
        ours_one[10].as_secs_f64() / wg_one[10].as_secs_f64()
    );
    println!("         (sixpn's pass includes reading the {n}-peer snapshot from SQLite)");

    wg.shutdown_interface().unwrap();
    let _ = wggo.kill();
    let _ = wggo.wait();
    let _ = std::fs::remove_file(&sock);
}

fn main() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED install bench: needs root");
        return;
    }
    let sizes: Vec<usize> = std::env::var("SIXPN_BENCH_SIZES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    // Our own network namespace, so nothing touches the host's.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
    sixpn::dataplane::linux::forbid_userspace_autospawn();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (round, n) in sizes.into_iter().enumerate() {
        rt.block_on(one_size(n, round));
    }
}
