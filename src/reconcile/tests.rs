//! The reconciler against the fake kernel and a real SQLite store.

use std::net::Ipv6Addr;
use std::time::Duration;

use super::*;
use crate::dataplane::fake::{peer_ips, FakeKernel};
use crate::model::PeerName;
use crate::store::sqlite::SqliteStore;
use crate::store::NewPeer;

struct Rig {
    _base: rig::Rig,
    kernel: FakeKernel,
    store: Arc<SqliteStore>,
    rec: Reconciler,
}

async fn rig() -> Rig {
    let base = rig::Rig::new().await;
    let kernel = FakeKernel::new();
    let rec = base.on_fake(&kernel);
    Rig {
        store: base.store.clone(),
        _base: base,
        kernel,
        rec,
    }
}

async fn add_peer(store: &SqliteStore, name: &str) -> PublicKey {
    rig::add_peer(store, rig::ORG, name).await.public_key
}

#[tokio::test]
async fn first_pass_builds_everything_and_second_changes_nothing() {
    let mut r = rig().await;
    let a = add_peer(&r.store, "a").await;
    assert!(r.rec.pass_all().await);
    let calls = r.kernel.take_calls();
    assert!(calls.contains(&"create interface".to_string()));
    let at = |c: &str| calls.iter().position(|x| x == c);
    assert!(
        at("attach guard") < at("link up mtu 1420") && at("attach guard").is_some(),
        "the guard holds before the link is up: {calls:?}"
    );
    assert!(calls.contains(&"configure port 51820".to_string()));
    assert!(calls.contains(&"add address fdaa:0:1::3/128".to_string()));
    assert!(calls.contains(&"add route fdaa:0:1:a7b:d6b:0:a:0/120".to_string()));
    assert!(r.kernel.state().forwarding);
    assert_eq!(peer_ips(&r.kernel).len(), 1);
    assert!(r.rec.installed().borrow().peers.contains_key(&a));

    assert!(r.rec.pass_all().await);
    assert_eq!(r.kernel.take_calls(), Vec::<String>::new());
}

/// Store changes on a kernel in sync are followed write by write, and
/// end where comparing everything would: a full pass afterwards finds
/// nothing to do, and what is published matches.
#[tokio::test]
async fn store_changes_are_followed_and_end_where_a_full_pass_would() {
    let mut r = rig().await;
    for i in 0..5 {
        add_peer(&r.store, &format!("p{i}")).await;
    }
    assert!(r.rec.pass_all().await);
    r.kernel.take_calls();
    let followed = || r.rec.counters.followed.load(Ordering::Relaxed);
    assert_eq!(followed(), 0);

    // One add: one peer, one route, nothing else looked at or changed.
    let k = add_peer(&r.store, "new").await;
    assert!(r.rec.pass_store_change().await);
    assert_eq!(r.rec.counters.followed.load(Ordering::Relaxed), 1);
    let calls = r.kernel.take_calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(r.rec.installed().borrow().peers.contains_key(&k));

    // Several writes between passes, a removal of the org's last peers
    // on the way, and a new org: still followed, still exact.
    for name in ["p0", "p1", "p2", "p3", "p4", "new"] {
        r.store
            .remove_peer(&"acme".parse().unwrap(), &name.parse().unwrap())
            .await
            .unwrap();
    }
    r.store
        .create_org(&"globex".parse().unwrap())
        .await
        .unwrap();
    let g = PrivateKey::generate().public_key();
    r.store
        .create_peer(&NewPeer {
            org: "globex".parse().unwrap(),
            name: "g".parse().unwrap(),
            region: "lhr".parse().unwrap(),
            public_key: g,
            ephemeral: None,
        })
        .await
        .unwrap();
    assert!(r.rec.pass_store_change().await);
    assert_eq!(r.rec.counters.followed.load(Ordering::Relaxed), 2);
    let published = r.rec.installed().borrow().clone();
    assert_eq!(published.peers.keys().collect::<Vec<_>>(), vec![&g]);
    assert!(published.missing.is_empty() && published.last_sync.is_some());
    {
        let state = r.kernel.state();
        assert_eq!(state.device.peers.len(), 1);
        assert_eq!(state.routes.len(), 1);
        // acme's ::3 went with its last peer; globex's came.
        assert_eq!(
            state
                .addresses
                .iter()
                .map(|a| a.0.to_string())
                .collect::<Vec<_>>(),
            vec!["fdaa:0:2::3"]
        );
        let elements = state.firewall.as_ref().map_or(0, |t| t.element_count());
        assert_eq!(elements, 2, "both orgs in the isolation set");
    }

    r.kernel.take_calls();
    assert!(r.rec.pass_all().await);
    assert_eq!(r.kernel.take_calls(), Vec::<String>::new());
}

#[tokio::test]
async fn drift_is_repaired_and_counted() {
    let mut r = rig().await;
    let a = add_peer(&r.store, "a").await;
    r.rec.pass_all().await;
    r.kernel.take_calls();
    {
        let mut s = r.kernel.state();
        s.device.peers.remove(&a);
        s.routes.clear();
        s.addresses.clear();
        if let Some(l) = s.link.as_mut() {
            l.guarded = false;
        }
    }
    assert!(
        r.rec
            .pass(Need {
                wg: true,
                net: true,
                ..Need::NONE
            })
            .await
    );
    let calls = r.kernel.take_calls();
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert!(calls.contains(&"attach guard".to_string()), "{calls:?}");
    assert_eq!(r.rec.counters.drift_repairs.load(Ordering::Relaxed), 4);
}

#[tokio::test]
async fn a_failed_item_does_not_stop_the_others_and_is_retried() {
    let mut r = rig().await;
    add_peer(&r.store, "a").await;
    add_peer(&r.store, "b").await;
    r.kernel.state().fail_route_adds = 1;
    assert!(!r.rec.pass_all().await);
    assert_eq!(r.kernel.state().routes.len(), 1, "the other route went in");
    assert_eq!(peer_ips(&r.kernel).len(), 2, "peers went in");
    assert!(r.rec.pass_all().await);
    assert_eq!(r.kernel.state().routes.len(), 2);
}

#[tokio::test]
async fn a_foreign_route_in_the_way_is_reported_not_taken_and_others_go_in() {
    let mut r = rig().await;
    let a = add_peer(&r.store, "a").await;
    // The next peer's /120 (slots are handed out from the lowest free).
    let net_b: Ipv6Addr = "fdaa:0:1:a7b:d6b:0:a:100".parse().unwrap();
    r.kernel.state().foreign_routes.insert((net_b, 120));
    let b = add_peer(&r.store, "b").await;
    let snap = r.store.snapshot().await.unwrap();
    let got = snap.peers.iter().find(|p| p.public_key == b).unwrap().net;
    assert_eq!(got.network(), net_b, "the layout this test assumes");

    let installed = r.rec.installed();
    assert!(!r.rec.pass_all().await);
    assert_eq!(r.rec.counters.errors.load(Ordering::Relaxed), 1);
    {
        let s = r.kernel.state();
        assert!(s.foreign_routes.contains(&(net_b, 120)), "left alone");
        assert!(!s.routes.contains(&(net_b, 120)));
        assert_eq!(s.routes.len(), 1, "a's route went in");
    }
    assert_eq!(peer_ips(&r.kernel).len(), 2);
    // a is live and published despite the failed pass; b, whose traffic
    // the foreign route takes, is not; the kernel does not match the
    // store, so no sync time.
    let now = installed.borrow().clone();
    assert!(now.peers.contains_key(&a));
    assert!(!now.peers.contains_key(&b));
    assert_eq!(now.last_sync, None);

    // Retries keep failing the same way, without counting phantom
    // changes; then the operator removes the route and b goes in.
    let changes = r.rec.counters.changes.load(Ordering::Relaxed);
    assert!(!r.rec.pass_all().await);
    assert!(!r.rec.pass_all().await);
    assert_eq!(r.rec.counters.errors.load(Ordering::Relaxed), 3);
    assert_eq!(r.rec.counters.changes.load(Ordering::Relaxed), changes);
    assert_eq!(r.rec.counters.drift_repairs.load(Ordering::Relaxed), 0);
    r.kernel.state().foreign_routes.clear();
    assert!(r.rec.pass_all().await);
    assert!(r.kernel.state().routes.contains(&(net_b, 120)));
    let now = installed.borrow().clone();
    assert!(now.peers.contains_key(&b));
    assert!(now.last_sync.is_some());
}

#[tokio::test]
async fn the_loop_backs_off_while_a_foreign_route_stays_in_the_way() {
    let r = rig().await;
    let net_a: Ipv6Addr = "fdaa:0:1:a7b:d6b:0:a:0".parse().unwrap();
    r.kernel.state().foreign_routes.insert((net_a, 120));
    add_peer(&r.store, "a").await;
    let view = r.rec.view();
    let counters = r.rec.counters();
    let (stop_tx, stop_rx) = watch::channel(false);
    let store = r.store.clone();
    let task = tokio::spawn(r.rec.run(stop_rx));
    // Another peer arriving meanwhile is installed at once.
    let b = add_peer(&store, "b").await;
    assert!(view.wait_installed(&b, Duration::from_secs(2)).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Backoff from 100 ms doubling: a handful of passes, not hundreds.
    let passes = counters.passes.load(Ordering::Relaxed);
    assert!((3..=10).contains(&passes), "{passes} passes in 1.5 s");
    assert_eq!(counters.errors.load(Ordering::Relaxed), passes);
    stop_tx.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn restart_of_the_device_is_rebuilt() {
    let mut r = rig().await;
    add_peer(&r.store, "a").await;
    r.rec.pass_all().await;
    r.kernel.restart_device();
    assert!(r.rec.pass_all().await);
    let s = r.kernel.state();
    assert!(s.link.unwrap().up);
    assert_eq!(s.device.peers.len(), 1);
    assert_eq!(s.routes.len(), 1);
    assert_eq!(s.addresses.len(), 1);
}

fn position(calls: &[String], prefix: &str) -> usize {
    calls
        .iter()
        .position(|c| c.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in {calls:?}"))
}

#[tokio::test]
async fn the_firewall_goes_in_before_the_interface() {
    let mut r = rig().await;
    add_peer(&r.store, "a").await;
    assert!(r.rec.pass_all().await);
    let calls = r.kernel.take_calls();
    assert_eq!(calls[0], "firewall replace (1 orgs)", "{calls:?}");
    assert!(position(&calls, "firewall") < position(&calls, "create interface"));
    let table = r.kernel.state().firewall.clone().unwrap();
    assert_eq!(table.element_count(), 1, "acme's element");
    assert!(r.rec.pass_all().await);
    assert_eq!(r.kernel.take_calls(), Vec::<String>::new());
}

#[tokio::test]
async fn no_firewall_no_interface() {
    let mut r = rig().await;
    add_peer(&r.store, "a").await;
    r.kernel.state().fail_firewall = 1;
    assert!(!r.rec.pass_all().await);
    let calls = r.kernel.take_calls();
    assert!(
        calls.is_empty(),
        "nothing may happen without the firewall: {calls:?}"
    );
    assert!(r.kernel.state().link.is_none());
    assert!(r.rec.pass_all().await);
    let calls = r.kernel.take_calls();
    assert_eq!(calls[0], "firewall replace (1 orgs)");
    assert!(calls.contains(&"create interface".to_string()));
}

#[tokio::test]
async fn a_new_org_is_one_element_update_and_a_failure_forces_a_replace() {
    let mut r = rig().await;
    assert!(r.rec.pass_all().await);
    r.kernel.take_calls();
    r.store
        .create_org(&"globex".parse().unwrap())
        .await
        .unwrap();
    let store_only = Need {
        snapshot: true,
        ..Need::NONE
    };
    assert!(r.rec.pass(store_only).await);
    assert_eq!(r.kernel.take_calls(), vec!["firewall update +1 -0"]);
    assert_eq!(
        r.kernel.state().firewall.as_ref().unwrap().element_count(),
        2
    );

    // A rejected transaction: the table stays, the next change is a
    // full replace.
    r.store
        .create_org(&"initech".parse().unwrap())
        .await
        .unwrap();
    r.kernel.state().fail_firewall = 1;
    assert!(!r.rec.pass(store_only).await);
    assert_eq!(
        r.kernel.state().firewall.as_ref().unwrap().element_count(),
        2
    );
    assert!(r.rec.pass(store_only).await);
    assert_eq!(r.kernel.take_calls(), vec!["firewall replace (3 orgs)"]);
}

#[tokio::test]
async fn a_flushed_ruleset_is_replaced_and_counted_as_drift() {
    let mut r = rig().await;
    add_peer(&r.store, "a").await;
    assert!(r.rec.pass_all().await);
    r.kernel.take_calls();
    r.kernel.flush_ruleset();
    let fw_only = Need {
        fw: true,
        ..Need::NONE
    };
    assert!(r.rec.pass(fw_only).await);
    assert_eq!(r.kernel.take_calls(), vec!["firewall replace (1 orgs)"]);
    assert_eq!(r.rec.counters.drift_repairs.load(Ordering::Relaxed), 1);
    // Someone flushed the rules only: same.
    r.kernel.state().firewall.as_mut().unwrap().flush_rules();
    assert!(r.rec.pass(fw_only).await);
    assert_eq!(r.kernel.take_calls(), vec!["firewall replace (1 orgs)"]);
}

#[tokio::test]
async fn the_loop_restores_a_flushed_ruleset_on_the_event() {
    let r = rig().await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let kernel = r.kernel.clone();
    let task = tokio::spawn(r.rec.run(stop_rx));
    let present = || kernel.state().firewall.is_some();
    for _ in 0..100 {
        if present() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(present());
    kernel.flush_ruleset();
    let t0 = std::time::Instant::now();
    while !present() && t0.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(present(), "not restored");
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    stop_tx.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn the_loop_follows_the_store_and_the_api_can_wait() {
    let r = rig().await;
    let view = r.rec.view();
    let (stop_tx, stop_rx) = watch::channel(false);
    let store = r.store.clone();
    let kernel = r.kernel.clone();
    let task = tokio::spawn(r.rec.run(stop_rx));
    let k = add_peer(&store, "live").await;
    assert!(view.wait_installed(&k, Duration::from_secs(2)).await);
    assert!(view.peer_stats(&k).await.is_some());
    store
        .remove_peer(
            &"acme".parse().unwrap(),
            &"live".parse::<PeerName>().unwrap(),
        )
        .await
        .unwrap();
    for _ in 0..100 {
        if kernel.state().device.peers.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(kernel.state().device.peers.is_empty());
    assert!(kernel.state().routes.is_empty());
    stop_tx.send(true).unwrap();
    task.await.unwrap();
}

/// A reconciler on `kernel` that installs peers just in time.
fn jit_reconciler(base: &rig::Rig, kernel: &FakeKernel, idle_evict: Duration) -> Reconciler {
    let mut settings = base.settings("sixpn0".parse().unwrap());
    settings.jit = Some(JitSettings { idle_evict });
    Reconciler::new(
        Arc::new(kernel.clone()),
        Arc::new(kernel.clone()),
        Arc::new(kernel.clone()),
        base.store.clone(),
        settings,
    )
}

async fn admit(rec: &mut Reconciler, key: PublicKey) -> AdmitOutcome {
    let (reply, rx) = tokio::sync::oneshot::channel();
    rec.admit_batch(vec![AdmitRequest { key, reply }]).await;
    rx.await.unwrap()
}

#[tokio::test]
async fn just_in_time_a_start_installs_no_peer_and_a_handshake_installs_exactly_its_own() {
    let base = rig::Rig::new().await;
    let kernel = FakeKernel::new();
    let (a, b) = (base.add_peer("a").await, base.add_peer("b").await);
    let mut rec = jit_reconciler(&base, &kernel, Duration::from_secs(900));
    assert!(rec.pass_all().await);
    assert!(peer_ips(&kernel).is_empty(), "nothing installed at start");
    assert!(
        kernel
            .state()
            .addresses
            .contains(&("fdaa:0:1::3".parse().unwrap(), 128)),
        "the org's DNS server is up before its first peer arrives"
    );
    assert_eq!(rec.installed().borrow().registered, 2);
    assert!(
        rec.installed().borrow().last_sync.is_some(),
        "in sync with nothing installed"
    );
    kernel.take_calls();

    assert_eq!(admit(&mut rec, a).await, AdmitOutcome::Installed);
    let calls = kernel.take_calls();
    assert_eq!(
        calls.len(),
        2,
        "the peer and its route, nothing else: {calls:?}"
    );
    assert_eq!(
        peer_ips(&kernel).keys().copied().collect::<Vec<_>>(),
        vec![a]
    );
    assert!(rec.installed().borrow().peers.contains_key(&a));
    assert!(!rec.installed().borrow().peers.contains_key(&b));

    assert_eq!(admit(&mut rec, a).await, AdmitOutcome::AlreadyInstalled);
    let stranger = crate::model::PrivateKey::generate().public_key();
    assert_eq!(admit(&mut rec, stranger).await, AdmitOutcome::Unknown);
    assert_eq!(kernel.take_calls(), Vec::<String>::new());
    let c = rec.jit_counters().unwrap();
    assert_eq!(c.installs_handshake.load(Ordering::Relaxed), 1);
    assert_eq!(c.unknown.load(Ordering::Relaxed), 1);

    // A full pass keeps the admitted peer and adds none.
    assert!(rec.pass_all().await);
    assert_eq!(kernel.take_calls(), Vec::<String>::new());
    // So does a store change, and its new peer waits for its handshake.
    let c_key = base.add_peer("c").await;
    assert!(rec.pass_store_change().await);
    assert!(!peer_ips(&kernel).contains_key(&c_key));
    assert!(peer_ips(&kernel).contains_key(&a));
}

#[tokio::test]
async fn just_in_time_an_idle_peer_leaves_the_kernel_and_its_next_handshake_brings_it_back() {
    let base = rig::Rig::new().await;
    let kernel = FakeKernel::new();
    let a = base.add_peer("a").await;
    let mut rec = jit_reconciler(&base, &kernel, Duration::from_millis(300));
    assert!(rec.pass_all().await);
    assert_eq!(admit(&mut rec, a).await, AdmitOutcome::Installed);
    assert!(rec.pass_all().await);
    assert!(peer_ips(&kernel).contains_key(&a), "not idle yet");

    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(rec.pass_all().await);
    assert!(!peer_ips(&kernel).contains_key(&a), "evicted when idle");
    let net = peer_ips_net(&base, "a").await;
    assert!(
        !kernel.state().routes.contains(&(net, 120)),
        "its route went with it"
    );
    let book = rec.jit_book().unwrap();
    assert!(book.lock().unwrap().evicted.contains_key(&a));
    assert_eq!(
        rec.jit_counters()
            .unwrap()
            .evictions
            .load(Ordering::Relaxed),
        1
    );
    assert_eq!(rec.installed().borrow().registered, 1, "still registered");

    assert_eq!(admit(&mut rec, a).await, AdmitOutcome::Installed);
    assert!(peer_ips(&kernel).contains_key(&a));
    assert!(!book.lock().unwrap().evicted.contains_key(&a));

    // A peer that handshakes stays: its handshake, not its admission, counts.
    kernel
        .state()
        .device
        .peers
        .get_mut(&a)
        .unwrap()
        .last_handshake = Some(std::time::SystemTime::now() + Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(rec.pass_all().await);
    assert!(peer_ips(&kernel).contains_key(&a), "active peers stay");
}

async fn peer_ips_net(base: &rig::Rig, name: &str) -> Ipv6Addr {
    let snap = base.store.snapshot().await.unwrap();
    snap.peers
        .iter()
        .find(|p| p.name.as_str() == name)
        .unwrap()
        .net
        .network()
}

#[tokio::test]
async fn switching_to_just_in_time_or_restarting_in_it_keeps_the_installed_peers() {
    let base = rig::Rig::new().await;
    let kernel = FakeKernel::new();
    let (a, b) = (base.add_peer("a").await, base.add_peer("b").await);
    let mut all = base.on_fake(&kernel);
    assert!(all.pass_all().await);
    assert_eq!(peer_ips(&kernel).len(), 2);
    kernel.take_calls();

    for _restart in 0..2 {
        let mut rec = jit_reconciler(&base, &kernel, Duration::from_secs(900));
        assert!(rec.pass_all().await);
        assert_eq!(
            kernel.take_calls(),
            Vec::<String>::new(),
            "nothing removed, nothing re-added"
        );
        let book = rec.jit_book().unwrap();
        let book = book.lock().unwrap();
        assert_eq!(book.admitted.len(), 2);
        assert!(book
            .admitted
            .values()
            .all(|a| a.cause == crate::plan::jit::Cause::Start));
        assert!(rec.installed().borrow().peers.contains_key(&a));
        assert!(rec.installed().borrow().peers.contains_key(&b));
    }

    // An admitted peer unregistered leaves the kernel and the book.
    let mut rec = jit_reconciler(&base, &kernel, Duration::from_secs(900));
    assert!(rec.pass_all().await);
    base.store
        .remove_peer(&rig::ORG.parse().unwrap(), &"a".parse().unwrap())
        .await
        .unwrap();
    assert!(rec.pass_store_change().await);
    assert!(!peer_ips(&kernel).contains_key(&a));
    assert!(!rec
        .jit_book()
        .unwrap()
        .lock()
        .unwrap()
        .admitted
        .contains_key(&a));
}
