//! Peer address allocation in the SQLite store: 10,000 peers in one org on
//! one gateway, each create its own transaction (as the API does).
//!
//! `cargo bench --bench alloc` (prints a table; no timing assertions).

use std::time::Instant;

use sixpn::model::PrivateKey;
use sixpn::store::sqlite::SqliteStore;
use sixpn::store::{Gateway, NewPeer, Store};

fn main() {
    let n: usize = std::env::var("SIXPN_BENCH_PEERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(dir.path().join("bench.db")).expect("open");
        store
            .register_gateway(&Gateway {
                name: "lhr-1".parse().unwrap(),
                region: "lhr".parse().unwrap(),
                host_id: "a7b:d6b".parse().unwrap(),
                endpoint: "gw.example.net:51820".parse().unwrap(),
                public_key: PrivateKey::generate().public_key(),
            })
            .await
            .expect("gateway");
        store
            .create_org(&"bench".parse().unwrap())
            .await
            .expect("org");
        let keys: Vec<_> = (0..n)
            .map(|_| PrivateKey::generate().public_key())
            .collect();
        let mut lat = Vec::with_capacity(n);
        let t0 = Instant::now();
        for (i, k) in keys.into_iter().enumerate() {
            let t = Instant::now();
            store
                .create_peer(&NewPeer {
                    org: "bench".parse().unwrap(),
                    name: format!("p{i}").parse().unwrap(),
                    region: "lhr".parse().unwrap(),
                    public_key: k,
                    ephemeral: None,
                })
                .await
                .expect("create");
            lat.push(t.elapsed());
        }
        let total = t0.elapsed();
        lat.sort();
        let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
        let t = Instant::now();
        let snap = store.snapshot().await.expect("snapshot");
        let snap_time = t.elapsed();
        println!("allocate {n} peers in one org on one gateway (SQLite, one transaction each)");
        println!("  total        {:>10.3} s", total.as_secs_f64());
        println!(
            "  per create   {:>10.1} µs median, {:.1} µs p99",
            pct(0.5).as_secs_f64() * 1e6,
            pct(0.99).as_secs_f64() * 1e6
        );
        println!(
            "  snapshot of {} peers: {:.1} ms",
            snap.peers.len(),
            snap_time.as_secs_f64() * 1e3
        );
    });
}
