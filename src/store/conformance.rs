//! The behaviour every [`Store`] backend must share, as test bodies each
//! backend's tests run against its own store: SQLite on a scratch file,
//! etcd on a loopback cluster. A backend-specific test stays with its
//! backend.
//!
//! Every check starts from a store holding one gateway, `lhr-1` in region
//! `lhr` on host `a7b:d6b`, and nothing else ([`gateway`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::model::{HostId, OrgName, PrivateKey, TokenId};

/// Declares, in a backend's tests, one `#[tokio::test]` per single-store
/// check of this suite, so a check added here runs on every backend.
/// `$setup` is an async fn from the test's name to `Option<(guard, store)>`
/// (`None`: skipped, having said why); the store has [`first_gateway`].
macro_rules! single_store_checks {
    ($setup:path) => {
        $crate::store::conformance::single_store_checks!(@each $setup;
            peers_get_distinct_addresses_and_reuse_freed_slots,
            bad_writes_change_nothing,
            instances_and_tokens,
            gateway_host_ids_are_unique_and_stable,
            ephemeral_peers_keep_their_ttl);
    };
    (@each $setup:path; $($name:ident),*) => {
        $(
            #[tokio::test]
            async fn $name() {
                let Some((_guard, store)) = $setup(stringify!($name)).await else {
                    return;
                };
                $crate::store::conformance::$name(&store).await;
            }
        )*
    };
}
pub(crate) use single_store_checks;

/// A gateway `name` of `region` on `host`, with a fresh key.
pub fn gateway(name: &str, region: &str, host: &str) -> Gateway {
    Gateway {
        name: name.parse().unwrap(),
        region: region.parse().unwrap(),
        host_id: host.parse().unwrap(),
        endpoint: format!("{name}.example.net:51820").parse().unwrap(),
        public_key: PrivateKey::generate().public_key(),
    }
}

/// The gateway every check starts with.
pub fn first_gateway() -> Gateway {
    gateway("lhr-1", "lhr", "a7b:d6b")
}

/// A peer `name` of `org` in lhr with a fresh key.
pub fn new_peer(org: &str, name: &str) -> NewPeer {
    NewPeer {
        org: org.parse().unwrap(),
        name: name.parse().unwrap(),
        region: "lhr".parse().unwrap(),
        public_key: PrivateKey::generate().public_key(),
        ephemeral: None,
    }
}

/// Peers get distinct addresses in their org, slot after slot (256 go in
/// group `0:a`, then `0:b`), and a removed peer's slot is the next one
/// handed out.
pub async fn peers_get_distinct_addresses_and_reuse_freed_slots(store: &dyn Store) {
    let org = store
        .create_org(&"personal".parse().unwrap())
        .await
        .unwrap();
    let mut seen = HashSet::new();
    for i in 0..300 {
        let (p, _) = store
            .create_peer(&new_peer("personal", &format!("p{i}")))
            .await
            .unwrap();
        assert_eq!(p.slot.index(), i);
        assert!(org.prefix().contains(p.net.peer_addr()));
        assert!(seen.insert(p.net));
    }
    let snap = store.snapshot().await.unwrap();
    assert_eq!(snap.peers.len(), 300);
    let p256 = snap
        .peers
        .iter()
        .find(|p| p.name.as_str() == "p256")
        .unwrap();
    assert_eq!(p256.net.peer_addr().to_string(), "fdaa:0:1:a7b:d6b:0:b:2");
    let gone = store
        .remove_peer(&org.name, &"p7".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(gone.slot.index(), 7);
    let (again, _) = store
        .create_peer(&new_peer("personal", "again"))
        .await
        .unwrap();
    assert_eq!(again.slot.index(), 7);
}

/// An ephemeral peer keeps its time to live through the create, the
/// snapshot and the remove; a plain peer beside it stays a normal one.
pub async fn ephemeral_peers_keep_their_ttl(store: &dyn Store) {
    let org = store.create_org(&"ci".parse().unwrap()).await.unwrap();
    let mut req = new_peer("ci", "job-1");
    req.ephemeral = Some(3_600);
    let (eph, _) = store.create_peer(&req).await.unwrap();
    assert_eq!(eph.ephemeral, Some(3_600));
    let (plain, _) = store.create_peer(&new_peer("ci", "laptop")).await.unwrap();
    assert_eq!(plain.ephemeral, None);
    let snap = store.snapshot().await.unwrap();
    let ttl = |name: &str| {
        snap.peers
            .iter()
            .find(|p| p.name.as_str() == name)
            .map(|p| p.ephemeral)
    };
    assert_eq!(ttl("job-1"), Some(Some(3_600)));
    assert_eq!(ttl("laptop"), Some(None));
    assert!(snap.peers.contains(&eph) && snap.peers.contains(&plain));
    let gone = store.remove_peer(&org.name, &eph.name).await.unwrap();
    assert_eq!(gone, eph);
}

/// Concurrent creates through two handles (`b` registers a second lhr
/// gateway) get distinct addresses, spread over both gateways.
pub async fn concurrent_creates_never_collide(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    b.register_gateway(&gateway("lhr-2", "lhr", "a7b:2"))
        .await
        .unwrap();
    a.create_org(&"acme".parse().unwrap()).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..60 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.spawn(async move { s.create_peer(&new_peer("acme", &format!("c{i}"))).await });
    }
    let mut nets = HashSet::new();
    while let Some(r) = tasks.join_next().await {
        let (p, _) = r.unwrap().unwrap();
        assert!(nets.insert(p.net), "duplicate {}", p.net);
    }
    let snap = a.snapshot().await.unwrap();
    assert_eq!(snap.peers.len(), 60);
    // Both gateways of the region got peers (least loaded).
    let on_1 = snap
        .peers
        .iter()
        .filter(|p| p.gateway.as_str() == "lhr-1")
        .count();
    assert!((20..=40).contains(&on_1), "lhr-1 got {on_1} of 60");
}

/// Every refused write says why and leaves the snapshot as it was.
pub async fn bad_writes_change_nothing(store: &dyn Store) {
    store.create_org(&"acme".parse().unwrap()).await.unwrap();
    let (first, _) = store
        .create_peer(&new_peer("acme", "laptop"))
        .await
        .unwrap();
    let before = store.snapshot().await.unwrap();

    let dup = store
        .create_peer(&new_peer("acme", "laptop"))
        .await
        .unwrap_err();
    assert!(matches!(dup, StoreError::Conflict(_)), "{dup}");
    let mut same_key = new_peer("acme", "other");
    same_key.public_key = first.public_key;
    assert!(matches!(
        store.create_peer(&same_key).await.unwrap_err(),
        StoreError::Conflict(_)
    ));
    assert!(matches!(
        store.create_peer(&new_peer("nope", "x")).await.unwrap_err(),
        StoreError::NotFound(_)
    ));
    let mut far = new_peer("acme", "far");
    far.region = "syd".parse().unwrap();
    let e = store.create_peer(&far).await.unwrap_err();
    assert!(e.to_string().contains("no gateway in region 'syd'"), "{e}");
    assert!(matches!(
        store
            .create_org(&"acme".parse().unwrap())
            .await
            .unwrap_err(),
        StoreError::Conflict(_)
    ));
    let outside = NewInstance {
        org: "acme".parse().unwrap(),
        app: "web".parse().unwrap(),
        id: None,
        region: "lhr".parse().unwrap(),
        address: InstanceAddress::Address("fdaa:0:99::2".parse().unwrap()),
        process_group: None,
        started: true,
    };
    assert!(matches!(
        store.add_instance(&outside).await.unwrap_err(),
        StoreError::Invalid(_)
    ));
    assert_eq!(*store.snapshot().await.unwrap(), *before);
}

/// An instance's address and id derive from host and machine; an address
/// is one instance's until it is removed; org tokens resolve to their org.
pub async fn instances_and_tokens(store: &dyn Store) {
    for i in 0..0x18 {
        store
            .create_org(&format!("o{i}").parse().unwrap())
            .await
            .unwrap();
    }
    let req = NewInstance {
        org: "o23".parse().unwrap(),
        app: "paulgra-ham".parse().unwrap(),
        id: None,
        region: "iad".parse().unwrap(),
        address: InstanceAddress::HostMachine {
            host: "a7b:7d".parse().unwrap(),
            machine: "f066:b83b".parse().unwrap(),
        },
        process_group: Some("web".parse().unwrap()),
        started: true,
    };
    let inst = store.add_instance(&req).await.unwrap();
    assert_eq!(inst.address.to_string(), "fdaa:0:18:a7b:7d:f066:b83b:2");
    assert_eq!(inst.id.as_str(), "f066b83b");
    let mut again = req.clone();
    again.id = Some("other".parse().unwrap());
    let e = store.add_instance(&again).await.unwrap_err();
    assert!(e.to_string().contains("already used by instance"), "{e}");
    assert_eq!(
        store.snapshot().await.unwrap().instances,
        vec![inst.clone()]
    );
    let gone = store
        .remove_instance(&inst.org, &inst.app, &inst.id)
        .await
        .unwrap();
    assert_eq!(gone, inst);
    assert!(store.add_instance(&req).await.is_ok(), "address freed");

    tokens_list_expire_and_revoke(store).await;
}

/// Org tokens resolve to their org, with their times; each org lists only
/// its own, without the secret; a revoked token resolves to nothing, and
/// revoking needs the right org and id.
async fn tokens_list_expire_and_revoke(store: &dyn Store) {
    let (o3, o4): (OrgName, OrgName) = ("o3".parse().unwrap(), "o4".parse().unwrap());
    let new = |org: &OrgName, sha: [u8; 32], expires_at| NewOrgToken {
        org: org.clone(),
        sha256: sha,
        created_at: 1_000,
        expires_at,
    };
    let (a, b, c) = ([7u8; 32], [8u8; 32], [9u8; 32]);
    assert_eq!(store.token_org(a).await.unwrap(), None);
    let ra = store.add_org_token(&new(&o3, a, None)).await.unwrap();
    assert_eq!(ra.id, TokenId::of(&a));
    assert_eq!(
        (ra.org.as_str(), ra.created_at, ra.expires_at),
        ("o3", 1_000, None)
    );
    let rb = store
        .add_org_token(&new(&o3, b, Some(2_000)))
        .await
        .unwrap();
    store.add_org_token(&new(&o4, c, None)).await.unwrap();
    assert_eq!(store.token_org(a).await.unwrap(), Some(ra.clone()));
    let got_b = store.token_org(b).await.unwrap().unwrap();
    assert!(!got_b.expired(1_999) && got_b.expired(2_000), "{got_b:?}");
    let e = store.add_org_token(&new(&o4, a, None)).await.unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e}");
    let e = store
        .add_org_token(&new(&"nope".parse().unwrap(), [1; 32], None))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NotFound(_)), "{e}");

    let mut listed = store.org_tokens(&o3).await.unwrap();
    listed.sort_by_key(|t| t.id);
    let mut want = vec![ra.clone(), rb.clone()];
    want.sort_by_key(|t| t.id);
    assert_eq!(listed, want);
    assert_eq!(store.org_tokens(&o4).await.unwrap().len(), 1);
    assert!(matches!(
        store
            .org_tokens(&"nope".parse().unwrap())
            .await
            .unwrap_err(),
        StoreError::NotFound(_)
    ));

    // Another org's token can't be revoked through this org.
    let e = store.revoke_org_token(&o4, &ra.id).await.unwrap_err();
    assert!(matches!(e, StoreError::NotFound(_)), "{e}");
    assert_eq!(store.revoke_org_token(&o3, &ra.id).await.unwrap(), ra);
    assert_eq!(store.token_org(a).await.unwrap(), None);
    assert!(matches!(
        store.revoke_org_token(&o3, &ra.id).await.unwrap_err(),
        StoreError::NotFound(_)
    ));
    assert_eq!(store.org_tokens(&o3).await.unwrap(), vec![rb]);
}

/// A host id is one gateway's, and a gateway keeps its host id; a restart
/// re-registers unchanged. Peers spread to the least-loaded gateway.
pub async fn gateway_host_ids_are_unique_and_stable(store: &dyn Store) {
    let mut other = gateway("lhr-2", "lhr", "a7b:d6b");
    let e = store.register_gateway(&other).await.unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e}");
    other.host_id = HostId::from_u32(2);
    store.register_gateway(&other).await.unwrap();
    store.register_gateway(&other).await.unwrap();
    store.create_org(&"a".parse().unwrap()).await.unwrap();
    let (a, _) = store.create_peer(&new_peer("a", "one")).await.unwrap();
    let (b, _) = store.create_peer(&new_peer("a", "two")).await.unwrap();
    assert_ne!(a.gateway, b.gateway);
    other.host_id = HostId::from_u32(3);
    let e = store.register_gateway(&other).await.unwrap_err();
    assert!(e.to_string().contains("old host id"), "{e}");
}

/// Writes through `a` move `b`'s change feed within 100 ms each, and `b`'s
/// snapshot is at its feed's revision.
pub async fn change_feed_sees_writes_through_another_handle(a: &dyn Store, b: &dyn Store) {
    let mut feed = b.subscribe();
    // Let b's follower get established.
    tokio::time::timeout(Duration::from_secs(5), feed.wait_for(|r| *r > 0))
        .await
        .unwrap()
        .unwrap();
    for i in 0..20 {
        let before = *feed.borrow_and_update();
        let t0 = std::time::Instant::now();
        a.create_org(&format!("x{i}").parse().unwrap())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_millis(100), feed.changed())
            .await
            .expect("change seen within 100 ms")
            .unwrap();
        assert!(*feed.borrow() > before);
        if i == 0 {
            eprintln!("cross-handle change seen after {:?}", t0.elapsed());
        }
    }
    let snap = b.snapshot().await.unwrap();
    assert_eq!(snap.revision, *feed.borrow());
}

/// Waits, at most `timeout`, for `store`'s reports to say `peer` is
/// installed on its gateway.
async fn reported(store: &dyn Store, peer: &Peer, timeout: Duration) -> bool {
    let mut reports = store.sync_reports();
    let covered = |r: &Arc<SyncReports>| r.get(&peer.gateway).is_some_and(|s| s.covers(peer));
    tokio::time::timeout(timeout, reports.wait_for(covered))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// `a` and `b` are two handles on one store (two processes, or two
/// gateways' clients); `a` has the lhr gateway `gateway` registered.
/// A peer carries the revision that registered it; a report written
/// through `a` reaches `b`, says which peers are live, and doesn't move
/// `b`'s change feed.
pub async fn sync_reports(a: &dyn Store, b: &dyn Store, gateway: &GatewayName) {
    a.create_org(&"rep".parse().unwrap()).await.unwrap();
    let (peer, gw) = a
        .create_peer(&NewPeer {
            org: "rep".parse().unwrap(),
            name: "p".parse().unwrap(),
            region: "lhr".parse().unwrap(),
            public_key: PrivateKey::generate().public_key(),
            ephemeral: None,
        })
        .await
        .unwrap();
    assert_eq!(&gw.name, gateway);
    let snap = a.snapshot().await.unwrap();
    assert_eq!(peer.revision, snap.revision, "the create's own revision");
    let mut feed = b.subscribe();
    tokio::time::timeout(
        Duration::from_secs(5),
        feed.wait_for(|r| *r >= peer.revision),
    )
    .await
    .expect("b follows the create")
    .unwrap();
    let seen = b.snapshot().await.unwrap();
    let in_b = seen.peers.iter().find(|p| p.name == peer.name).unwrap();
    assert_eq!(in_b.revision, peer.revision);
    let feed_before = *feed.borrow_and_update();

    // Not yet reported: b doesn't wait long for it.
    assert!(!reported(b, &peer, Duration::from_millis(50)).await);
    let older = SyncReport {
        revision: peer.revision - 1,
        missing: vec![],
    };
    a.report_sync(gateway, &older).await.unwrap();
    assert!(!reported(b, &peer, Duration::from_millis(200)).await);
    let failed = SyncReport {
        revision: peer.revision,
        missing: vec![peer.public_key],
    };
    a.report_sync(gateway, &failed).await.unwrap();
    assert!(!reported(b, &peer, Duration::from_millis(200)).await);
    let live = SyncReport {
        revision: peer.revision,
        missing: vec![],
    };
    let t0 = std::time::Instant::now();
    a.report_sync(gateway, &live).await.unwrap();
    assert!(
        reported(b, &peer, Duration::from_secs(2)).await,
        "the report never reached b"
    );
    eprintln!("report seen by the other handle after {:?}", t0.elapsed());
    assert_eq!(b.sync_reports().borrow().get(gateway), Some(&live));

    // Reports changed nothing that is planned from.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!feed.has_changed().unwrap(), "a report moved the feed");
    assert_eq!(*feed.borrow(), feed_before);
}
