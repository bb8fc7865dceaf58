//! The etcd backend against a real single-member etcd on loopback: the
//! shared conformance suite and what only etcd has (the watch, paging,
//! compaction, outages).

use super::*;
use crate::store::conformance::{self as suite, gateway, new_peer};
use crate::store::InstanceAddress;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// A single-member etcd on loopback with a temp data dir and free ports;
/// killed on drop.
struct TestEtcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client: u16,
    peer: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

use crate::testkit::in_ci;

fn etcd_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
}

/// A peer record written before peers could be ephemeral reads as a
/// normal peer; a normal peer's record is written as before (no field), an
/// ephemeral one's carries its TTL.
#[test]
fn peer_records_without_a_ttl_are_normal_peers() {
    let key = crate::model::PrivateKey::generate().public_key();
    let old = format!(r#"{{"gateway":"lhr-1","slot":3,"public_key":"{key}","created_at":7}}"#);
    let rec: PeerRecord = serde_json::from_str(&old).unwrap();
    assert_eq!((rec.slot, rec.created_at, rec.ephemeral), (3, 7, None));
    let plain = String::from_utf8(encode(&rec).unwrap()).unwrap();
    assert!(!plain.contains("ephemeral"), "{plain}");
    let eph = PeerRecord {
        ephemeral: Some(3_600),
        ..rec
    };
    let text = encode(&eph).unwrap();
    let back: PeerRecord = serde_json::from_slice(&text).unwrap();
    assert_eq!(back.ephemeral, Some(3_600));
}

impl TestEtcd {
    /// Starts one, or returns `None` after a loud SKIPPED line when the
    /// `etcd` binary is missing (a failure under CI).
    async fn start(test: &str) -> Option<Self> {
        if etcd_binary().is_none() {
            assert!(
                !in_ci(),
                "{test}: `etcd` is not installed (apt etcd-server) and CI is set"
            );
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr().lock(),
                "\n****\nSKIPPED {test}: `etcd` not found (apt-get install etcd-server)\n****"
            );
            return None;
        }
        let mut e = Self {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            client: free_port(),
            peer: free_port(),
        };
        e.spawn().await;
        Some(e)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }

    async fn spawn(&mut self) {
        let (c, p) = (self.client, self.peer);
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).unwrap();
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args([
                &format!("--listen-client-urls=http://127.0.0.1:{c}"),
                &format!("--advertise-client-urls=http://127.0.0.1:{c}"),
                &format!("--listen-peer-urls=http://127.0.0.1:{p}"),
                &format!("--initial-advertise-peer-urls=http://127.0.0.1:{p}"),
                &format!("--initial-cluster=t=http://127.0.0.1:{p}"),
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let client = Client::connect([self.url()], None).await.unwrap();
        let t0 = Instant::now();
        loop {
            let mut kv = client.kv_client();
            if tokio::time::timeout(Duration::from_secs(1), kv.get("x", None))
                .await
                .is_ok_and(|r| r.is_ok())
            {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "etcd did not come up: {}",
                std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn store(&self) -> EtcdStore {
        EtcdStore::connect(&[self.url()], "/sixpn/").await.unwrap()
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        self.stop();
    }
}

macro_rules! etcd_or_skip {
    ($test:expr) => {
        match TestEtcd::start($test).await {
            Some(e) => e,
            None => return,
        }
    };
}

async fn with_gateway(etcd: &TestEtcd) -> EtcdStore {
    let store = etcd.store().await;
    store
        .register_gateway(&suite::first_gateway())
        .await
        .unwrap();
    store
}

/// A fresh loopback etcd with the first gateway, for the shared suite.
async fn suite_store(test: &str) -> Option<(TestEtcd, EtcdStore)> {
    let etcd = TestEtcd::start(&format!("etcd::{test}")).await?;
    let store = with_gateway(&etcd).await;
    Some((etcd, store))
}

suite::single_store_checks!(suite_store);

#[tokio::test]
async fn concurrent_creates_from_two_clients_never_collide() {
    let etcd = etcd_or_skip!("etcd::concurrent_creates_from_two_clients_never_collide");
    let a = Arc::new(with_gateway(&etcd).await);
    let b = Arc::new(etcd.store().await);
    suite::concurrent_creates_never_collide(a, b).await;
}

#[tokio::test]
async fn change_feed_sees_writes_from_another_client() {
    let etcd = etcd_or_skip!("etcd::change_feed_sees_writes_from_another_client");
    let a = with_gateway(&etcd).await;
    let b = etcd.store().await;
    suite::change_feed_sees_writes_through_another_handle(&a, &b).await;
}

#[tokio::test]
async fn sync_reports_reach_another_client_and_move_no_revision() {
    let etcd = etcd_or_skip!("etcd::sync_reports_reach_another_client_and_move_no_revision");
    let a = with_gateway(&etcd).await;
    let b = etcd.store().await;
    let gw: GatewayName = "lhr-1".parse().unwrap();
    suite::sync_reports(&a, &b, &gw).await;
    // A new client starts from the reports in the cluster.
    let c = etcd.store().await;
    let mut reports = c.sync_reports();
    tokio::time::timeout(
        Duration::from_secs(5),
        reports.wait_for(|r| r.contains_key(&gw)),
    )
    .await
    .expect("a new client loads the reports")
    .unwrap();
}

#[tokio::test]
async fn a_compacted_watch_reloads_and_follows_on() {
    let etcd = etcd_or_skip!("etcd::a_compacted_watch_reloads_and_follows_on");
    let store = with_gateway(&etcd).await;
    for i in 0..5 {
        store
            .create_org(&format!("c{i}").parse().unwrap())
            .await
            .unwrap();
    }
    let rev = store.snapshot().await.unwrap().revision as i64;
    let mut kv = store.kv.clone();
    kv.compact(rev, None).await.unwrap();
    // A watcher that last saw revision 1: its next revision is compacted.
    let feeds = Feeds::new();
    let mut rx = feeds.revision.subscribe();
    let client = Client::connect([etcd.url()], None).await.unwrap();
    let task = tokio::spawn(watch_loop(client, store.keys.clone(), feeds.clone(), 2));
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|r| *r as i64 >= rev))
        .await
        .expect("reloaded to the compacted revision")
        .unwrap();
    store.create_org(&"after".parse().unwrap()).await.unwrap();
    tokio::time::timeout(Duration::from_millis(500), rx.wait_for(|r| *r as i64 > rev))
        .await
        .expect("follows on after the reload")
        .unwrap();
    // The snapshot it follows has everything, the write after included.
    let followed = feeds.lock().snapshot().expect("a followed snapshot");
    let names: Vec<&str> = followed.orgs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["after", "c0", "c1", "c2", "c3", "c4"]);
    task.abort();
}

#[test]
fn prefix_ends() {
    assert_eq!(prefix_end(b"/sixpn/peers/"), b"/sixpn/peers0");
    assert_eq!(prefix_end(b"a\xff"), b"b");
    assert_eq!(prefix_end(b"\xff\xff"), [0]);
}

/// A snapshot's content, without the revision it was taken at.
fn content(s: &Snapshot) -> Snapshot {
    Snapshot {
        revision: 0,
        ..s.clone()
    }
}

/// Random writes through two clients; after each, both clients'
/// snapshots match a whole read (so one client sees the other's
/// acknowledged write at once), and the writes handed out since the
/// previous snapshot lead from it to the new one.
#[tokio::test]
async fn followed_snapshots_match_whole_reads() {
    use rand::Rng;
    let etcd = etcd_or_skip!("etcd::followed_snapshots_match_whole_reads");
    let a = with_gateway(&etcd).await;
    let b = etcd.store().await;
    b.register_gateway(&gateway("iad-1", "iad", "a7b:1"))
        .await
        .unwrap();
    let stores = [&a, &b];
    let mut prev = [a.snapshot().await.unwrap(), b.snapshot().await.unwrap()];
    let whole_before = [&a, &b].map(|s| s.whole_reads.load(Ordering::Relaxed));
    let mut rng = rand::thread_rng();
    let (mut followed, mut writes, mut gateways) = (0, 0, 0);
    for i in 0..200 {
        let writer = rng.gen_range(0..2);
        let w = stores[writer];
        let snap = w.snapshot().await.unwrap();
        let org = |rng: &mut rand::rngs::ThreadRng| -> Option<OrgName> {
            let n = snap.orgs.len();
            (n > 0).then(|| snap.orgs[rng.gen_range(0..n)].name.clone())
        };
        match rng.gen_range(0..100) {
            0..10 => {
                w.create_org(&format!("o{i}").parse().unwrap())
                    .await
                    .unwrap();
            }
            10..45 => {
                let Some(o) = org(&mut rng) else { continue };
                let mut req = new_peer(o.as_str(), &format!("p{i}"));
                if rng.gen_bool(0.5) {
                    req.region = "iad".parse().unwrap();
                }
                w.create_peer(&req).await.unwrap();
            }
            45..60 => {
                let n = snap.peers.len();
                if n == 0 {
                    continue;
                }
                let p = &snap.peers[rng.gen_range(0..n)];
                w.remove_peer(&p.org, &p.name).await.unwrap();
            }
            60..80 => {
                let Some(o) = org(&mut rng) else { continue };
                let prefix = snap.org(&o).unwrap().prefix();
                let address = crate::model::instance_addr(
                    prefix,
                    "a7b:d6b".parse().unwrap(),
                    crate::model::MachineId::from_u32(rng.gen_range(1..u32::MAX)),
                );
                let req = NewInstance {
                    org: o,
                    app: ["api", "web"][rng.gen_range(0..2)].parse().unwrap(),
                    id: None,
                    region: "lhr".parse().unwrap(),
                    address: InstanceAddress::Address(address),
                    process_group: None,
                    started: true,
                };
                w.add_instance(&req).await.unwrap();
            }
            80..90 => {
                let n = snap.instances.len();
                if n == 0 {
                    continue;
                }
                let x = &snap.instances[rng.gen_range(0..n)];
                w.remove_instance(&x.org, &x.app, &x.id).await.unwrap();
            }
            90..95 => {
                let Some(o) = org(&mut rng) else { continue };
                w.add_org_token(&crate::store::NewOrgToken {
                    org: o,
                    sha256: rand::random(),
                    created_at: 1,
                    expires_at: None,
                })
                .await
                .unwrap();
            }
            95..98 => {
                // A restart registers again: no change.
                w.register_gateway(snap.gateways.first().unwrap())
                    .await
                    .unwrap();
            }
            _ => {
                // A new gateway: read whole.
                gateways += 1;
                let g = gateway(&format!("fra-{i}"), "fra", &format!("a7b:{:x}", 100 + i));
                w.register_gateway(&g).await.unwrap();
            }
        }
        writes += 1;
        // The other client first: right after the write was answered.
        for j in [1 - writer, writer] {
            let (r, prev) = (stores[j], &mut prev[j]);
            let (now, deltas) = r.snapshot_since(prev.revision).await.unwrap();
            // In pages of 3 keys: pages end anywhere in a range.
            let (_, whole) = read_whole_paged(&r.kv, &r.keys, 3).await.unwrap();
            let (whole, _) = whole.unwrap();
            assert_eq!(content(&now), content(&whole), "after write {i}");
            assert!(now.revision >= prev.revision);
            if let Some(deltas) = deltas {
                let mut led = Snapshot::clone(prev);
                for d in deltas {
                    led.apply(d);
                }
                assert_eq!(content(&led), content(&now), "deltas after write {i}");
                followed += 1;
            }
            *prev = now;
        }
    }
    let whole = [&a, &b].map(|s| s.whole_reads.load(Ordering::Relaxed));
    eprintln!(
        "{writes} writes: {followed} of {} snapshots followed; whole reads {:?} → {whole:?} \
         ({gateways} new gateways)",
        2 * writes,
        whole_before
    );
    assert!(followed >= 2 * (writes - 2 * gateways) - 4, "{followed}");
    for (w, before) in whole.iter().zip(whole_before) {
        assert!(*w - before <= 2 * gateways + 1, "{w} whole reads");
    }
}

/// Fills the store through `a` with `orgs` orgs of `per_org` peers (on
/// lhr-1) and as many instances each: plain puts of the records and
/// keys the writes would make, 100 to a transaction.
async fn fill(a: &EtcdStore, orgs: u32, per_org: u32) {
    let mut kv = a.kv.clone();
    let gw: GatewayName = "lhr-1".parse().unwrap();
    let mut ops = Vec::new();
    for o in 0..orgs {
        let org: OrgName = format!("o{o}").parse().unwrap();
        let rec = Org {
            name: org.clone(),
            network_id: NetworkId::new(o + 1).unwrap(),
        };
        ops.push(put(a.keys.org(&org), encode(&rec).unwrap()));
        for i in 0..per_org {
            let name: PeerName = format!("p{i}").parse().unwrap();
            let rec = PeerRecord {
                gateway: gw.clone(),
                slot: i,
                public_key: crate::model::PrivateKey::generate().public_key(),
                created_at: 0,
                ephemeral: None,
            };
            ops.push(put(a.keys.peer(&org, &name), encode(&rec).unwrap()));
            ops.push(put(a.keys.slot(&org, &gw, i), name.as_str()));
            ops.push(put(a.keys.key(&rec.public_key), format!("{org}/{name}")));
            let address = crate::model::instance_addr(
                rec_prefix(NetworkId::new(o + 1).unwrap()),
                "a7b:d6b".parse().unwrap(),
                crate::model::MachineId::from_u32(i + 1),
            );
            let inst = InstanceRecord {
                region: "lhr".parse().unwrap(),
                address,
                process_group: None,
                started: true,
            };
            let id = format!("{:x}", i + 1);
            ops.push(put(
                a.keys
                    .instance(&org, &"api".parse().unwrap(), &id.parse().unwrap()),
                encode(&inst).unwrap(),
            ));
            // The other keys real writes make, for a whole read's size.
            ops.push(put(a.keys.addr(address), format!("{org}/api/{id}")));
            if ops.len() >= 100 {
                kv.txn(Txn::new().and_then(std::mem::take(&mut ops)))
                    .await
                    .unwrap();
            }
        }
    }
    if !ops.is_empty() {
        kv.txn(Txn::new().and_then(ops)).await.unwrap();
    }
}

/// A store bigger than one response the client takes (4 MiB) still
/// loads: a whole read takes only the ranges a snapshot is made of, in
/// pages (which `followed_snapshots_match_whole_reads` pages finely).
#[tokio::test(flavor = "multi_thread")]
async fn a_store_bigger_than_one_response_loads() {
    let etcd = etcd_or_skip!("etcd::a_store_bigger_than_one_response_loads");
    let a = with_gateway(&etcd).await;
    fill(&a, 100, 100).await;
    let mut kv = a.kv.clone();
    let one = kv
        .get(
            a.keys.prefix.as_str(),
            Some(GetOptions::new().with_prefix()),
        )
        .await;
    assert!(one.is_err(), "the store should outgrow one response");
    let b = etcd.store().await;
    let snap = b.snapshot().await.unwrap();
    assert_eq!((snap.peers.len(), snap.instances.len()), (10_000, 10_000));
    a.create_org(&"after".parse().unwrap()).await.unwrap();
    let (snap, deltas) = b.snapshot_since(snap.revision).await.unwrap();
    assert_eq!(deltas.map(|d| d.len()), Some(1));
    assert_eq!(snap.orgs.len(), 101);
}

/// The cost of one peer create in an empty store and at 10,000 peers
/// (allocation reads every slot key): `cargo test --release --lib
/// bench_create_at_10k -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark"]
async fn bench_create_at_10k() {
    let etcd = etcd_or_skip!("etcd::bench_create_at_10k");
    let a = with_gateway(&etcd).await;
    let mut at = Vec::new();
    for (label, fill_orgs) in [("empty", 0), ("10k peers", 100)] {
        fill(&a, fill_orgs, 100).await;
        let org = format!("b{fill_orgs}");
        a.create_org(&org.parse().unwrap()).await.unwrap();
        let mut t = Vec::new();
        for i in 0..100 {
            let t0 = Instant::now();
            a.create_peer(&new_peer(&org, &format!("p{i}")))
                .await
                .unwrap();
            t.push(t0.elapsed());
        }
        t.sort();
        at.push(format!("{label}: p50 {:?} p99 {:?}", t[50], t[99]));
    }
    eprintln!("etcd create_peer, 100 creates: {}", at.join("; "));
}

/// The cost of a snapshot after one write by another client, followed
/// against read whole, in a store of 10,000 peers and 10,000
/// instances in 100 orgs: `cargo test --release --lib
/// bench_snapshot_after_one_write -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark"]
async fn bench_snapshot_after_one_write() {
    let etcd = etcd_or_skip!("etcd::bench_snapshot_after_one_write");
    let a = with_gateway(&etcd).await;
    let b = etcd.store().await;
    fill(&a, 100, 100).await;
    let mut prev = b.snapshot().await.unwrap();
    assert_eq!((prev.peers.len(), prev.instances.len()), (10_000, 10_000));
    let n = 200;
    let (mut followed, mut whole) = (Vec::new(), Vec::new());
    for i in 0..n {
        a.create_org(&format!("n{i}").parse().unwrap())
            .await
            .unwrap();
        let t0 = Instant::now();
        let (snap, deltas) = b.snapshot_since(prev.revision).await.unwrap();
        followed.push(t0.elapsed());
        assert!(deltas.is_some());
        let t0 = Instant::now();
        let (_, w) = read_whole(&b.kv, &b.keys).await.unwrap();
        whole.push(t0.elapsed());
        assert_eq!(w.unwrap().0.orgs.len(), snap.orgs.len());
        prev = snap;
    }
    followed.sort();
    whole.sort();
    let p = |v: &[Duration], q: usize| v[(v.len() - 1) * q / 100];
    eprintln!(
        "etcd snapshot after one write, 10k peers + 10k instances, {n} writes: \
         followed p50 {:?} p99 {:?}; read whole p50 {:?} p99 {:?}; ratio p50 {:.3}",
        p(&followed, 50),
        p(&followed, 99),
        p(&whole, 50),
        p(&whole, 99),
        p(&followed, 50).as_secs_f64() / p(&whole, 50).as_secs_f64()
    );
}

fn rec_prefix(id: NetworkId) -> crate::model::OrgPrefix {
    Org {
        name: "x".parse().unwrap(),
        network_id: id,
    }
    .prefix()
}

/// With the watch stalled, a snapshot still shows a write another
/// client had answered: it waits for the watch, then reads whole, and
/// follows on from that read.
#[tokio::test]
async fn a_stalled_watch_never_serves_an_older_snapshot() {
    let etcd = etcd_or_skip!("etcd::a_stalled_watch_never_serves_an_older_snapshot");
    let a = with_gateway(&etcd).await;
    let b = etcd.store().await;
    assert!(b.snapshot().await.unwrap().orgs.is_empty());
    b.watcher.abort();
    a.create_org(&"late".parse().unwrap()).await.unwrap();
    let whole = b.whole_reads.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let snap = b.snapshot().await.unwrap();
    assert!(
        snap.org(&"late".parse().unwrap()).is_some(),
        "a stale snapshot"
    );
    assert!(t0.elapsed() >= CATCH_UP, "{:?}", t0.elapsed());
    assert_eq!(b.whole_reads.load(Ordering::Relaxed), whole + 1);
    // No write since: served from that read, without waiting.
    let t1 = Instant::now();
    assert_eq!(b.snapshot().await.unwrap().orgs.len(), 1);
    assert!(t1.elapsed() < CATCH_UP / 2, "{:?}", t1.elapsed());
    assert_eq!(b.whole_reads.load(Ordering::Relaxed), whole + 1);
}

/// Writes of others under another prefix in the same cluster move the
/// revision but not our keys: snapshots stay followed and don't wait.
#[tokio::test]
async fn writes_outside_the_prefix_cost_no_whole_read() {
    let etcd = etcd_or_skip!("etcd::writes_outside_the_prefix_cost_no_whole_read");
    let store = with_gateway(&etcd).await;
    store.create_org(&"mine".parse().unwrap()).await.unwrap();
    store.snapshot().await.unwrap();
    let whole = store.whole_reads.load(Ordering::Relaxed);
    let mut kv = store.kv.clone();
    for i in 0..20 {
        kv.put(format!("/other/{i}"), "x", None).await.unwrap();
        let t0 = Instant::now();
        let snap = store.snapshot().await.unwrap();
        assert!(t0.elapsed() < CATCH_UP / 2, "waited {:?}", t0.elapsed());
        assert_eq!(snap.orgs.len(), 1);
    }
    assert_eq!(store.whole_reads.load(Ordering::Relaxed), whole);
}

#[tokio::test]
async fn outage_is_unavailable_fast_and_the_feed_reconnects() {
    let mut etcd = etcd_or_skip!("etcd::outage_is_unavailable_fast_and_the_feed_reconnects");
    let a = with_gateway(&etcd).await;
    let b = etcd.store().await;
    let mut feed = b.subscribe();
    tokio::time::timeout(Duration::from_secs(5), feed.wait_for(|r| *r > 0))
        .await
        .unwrap()
        .unwrap();
    etcd.stop();
    let t0 = Instant::now();
    let e = a.create_org(&"down".parse().unwrap()).await.unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    let e = a.snapshot().await.unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
    etcd.spawn().await;
    let before = *feed.borrow_and_update();
    // The writer's client reconnects on its own; the first request may
    // still find the old connection broken.
    let t0 = Instant::now();
    loop {
        match a.create_org(&"back".parse().unwrap()).await {
            Ok(_) => break,
            Err(StoreError::Unavailable(_)) if t0.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    tokio::time::timeout(Duration::from_secs(10), feed.wait_for(|r| *r > before))
        .await
        .expect("the feed follows again after the outage")
        .unwrap();
}

#[tokio::test]
async fn tls_with_client_certificates_works_and_a_wrong_certificate_fails_in_one_line() {
    use crate::testkit::certs::{have_openssl, make_ca, make_leaf};
    if etcd_binary().is_none() || !have_openssl() {
        assert!(!in_ci(), "etcd and openssl are needed under CI");
        eprintln!("SKIPPED tls_with_client_certificates…: no etcd or openssl");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_ca(d, "ca");
    make_leaf(d, "ca", "member", "127.0.0.1");
    make_leaf(d, "ca", "client", "127.0.0.1");
    make_ca(d, "other-ca");
    make_leaf(d, "other-ca", "stranger", "127.0.0.1");
    let (c, p) = (free_port(), free_port());
    let log = std::fs::File::create(d.join("etcd.log")).unwrap();
    let path = |f: &str| d.join(f).to_string_lossy().into_owned();
    let mut child = Command::new("etcd")
        .args(["--name", "t", "--data-dir", &path("data")])
        .args([
            &format!("--listen-client-urls=https://127.0.0.1:{c}"),
            &format!("--advertise-client-urls=https://127.0.0.1:{c}"),
            &format!("--listen-peer-urls=http://127.0.0.1:{p}"),
            &format!("--initial-advertise-peer-urls=http://127.0.0.1:{p}"),
            &format!("--initial-cluster=t=http://127.0.0.1:{p}"),
            &format!("--cert-file={}", path("member.pem")),
            &format!("--key-file={}", path("member.key")),
            &format!("--trusted-ca-file={}", path("ca.pem")),
            "--client-cert-auth",
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start etcd");
    let read = |f: &str| std::fs::read(d.join(f)).unwrap();
    let good = EtcdAccess {
        ca_pem: Some(read("ca.pem")),
        identity: Some((read("client.pem"), read("client.key"))),
        user: None,
        server_name: None,
    };
    let url = format!("https://127.0.0.1:{c}");
    let t0 = Instant::now();
    let store = loop {
        match EtcdStore::connect_with(std::slice::from_ref(&url), "/sixpn/", &good).await {
            Ok(s) => break s,
            Err(e) if t0.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!(
                "{e}\n{}",
                std::fs::read_to_string(d.join("etcd.log")).unwrap_or_default()
            ),
        }
    };
    store.create_org(&"acme".parse().unwrap()).await.unwrap();
    assert_eq!(store.snapshot().await.unwrap().orgs.len(), 1);

    // A client certificate the cluster doesn't trust; a cluster
    // certificate we don't trust; plaintext to a TLS-only port: each one
    // error, naming the endpoint.
    let stranger = EtcdAccess {
        identity: Some((read("stranger.pem"), read("stranger.key"))),
        ..good.clone()
    };
    let distrust = EtcdAccess {
        ca_pem: Some(read("other-ca.pem")),
        ..good.clone()
    };
    for (what, access, endpoint) in [
        ("a stranger's client certificate", stranger, url.clone()),
        ("a CA that didn't sign the cluster", distrust, url.clone()),
        (
            "plaintext",
            EtcdAccess::default(),
            format!("http://127.0.0.1:{c}"),
        ),
    ] {
        let t0 = Instant::now();
        let r = match EtcdStore::connect_with(std::slice::from_ref(&endpoint), "/sixpn/", &access)
            .await
        {
            Ok(s) => s.snapshot().await.map(|_| ()),
            Err(e) => Err(e),
        };
        let e = r.expect_err(what).to_string();
        assert!(!e.contains('\n'), "{what}: one line: {e}");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: {:?}",
            t0.elapsed()
        );
        if what != "plaintext" {
            assert!(e.contains(&format!("127.0.0.1:{c}")), "{what}: {e}");
        }
        eprintln!("{what}: {e}");
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn the_tls_name_is_the_shared_host_or_configured() {
    let eps = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let d = |v: &[&str], c: Option<&str>| tls_domain(&eps(v), c);
    assert_eq!(
        d(&["https://[fd53:e::1]:1", "https://[fd53:e::1]:2"], None)
            .unwrap()
            .as_deref(),
        Some("fd53:e::1")
    );
    assert_eq!(
        d(&["https://10.0.0.1:2379"], None).unwrap().as_deref(),
        Some("10.0.0.1")
    );
    assert_eq!(
        d(&["https://a.example:1", "https://b.example:1"], None).unwrap(),
        None
    );
    assert!(d(&["https://[fd53::1]:1", "https://[fd53::2]:1"], None).is_err());
    assert_eq!(
        d(
            &["https://[fd53::1]:1", "https://[fd53::2]:1"],
            Some("etcd.internal")
        )
        .unwrap()
        .as_deref(),
        Some("etcd.internal")
    );
}
