//! The SQLite backend on scratch files: the shared conformance suite, and
//! what only SQLite has (other processes on one file, migrations, the
//! cache against whole reads).

use super::*;
use std::collections::HashSet;

use crate::model::HostId;
use crate::store::conformance::{self as suite, new_peer};
use crate::store::InstanceAddress;

async fn store_with_gateway(dir: &Path) -> SqliteStore {
    let store = SqliteStore::open(dir.join("state.db")).unwrap();
    store
        .register_gateway(&suite::first_gateway())
        .await
        .unwrap();
    store
}

/// A fresh store in a scratch file, for the shared suite.
async fn suite_store(_test: &str) -> Option<(tempfile::TempDir, SqliteStore)> {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_gateway(dir.path()).await;
    Some((dir, store))
}

suite::single_store_checks!(suite_store);

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_creates_from_two_processes_never_collide() {
    let dir = tempfile::tempdir().unwrap();
    let a = Arc::new(store_with_gateway(dir.path()).await);
    let b = Arc::new(SqliteStore::open(dir.path().join("state.db")).unwrap());
    suite::concurrent_creates_never_collide(a, b).await;
}

#[tokio::test]
async fn change_feed_sees_writes_from_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let a = store_with_gateway(dir.path()).await;
    // A second handle on the same file stands in for another process:
    // it has its own connections and learns only through data_version.
    let b = SqliteStore::open(dir.path().join("state.db")).unwrap();
    suite::change_feed_sees_writes_through_another_handle(&a, &b).await;
}

#[tokio::test]
async fn sync_reports_reach_another_process_and_move_no_revision() {
    let dir = tempfile::tempdir().unwrap();
    let a = store_with_gateway(dir.path()).await;
    let b = SqliteStore::open(dir.path().join("state.db")).unwrap();
    let gw = a.snapshot().await.unwrap().gateways[0].name.clone();
    suite::sync_reports(&a, &b, &gw).await;
    // A reopened store starts from the reports on disk.
    drop(a);
    let c = SqliteStore::open(dir.path().join("state.db")).unwrap();
    assert!(c.sync_reports().borrow().contains_key(&gw));
}

#[tokio::test]
async fn schema_from_the_future_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    drop(SqliteStore::open(&path).unwrap());
    let c = Connection::open(&path).unwrap();
    c.pragma_update(None, "user_version", 99).unwrap();
    drop(c);
    let e = SqliteStore::open(&path).unwrap_err();
    assert!(e.to_string().contains("newer than this sixpn"), "{e}");
}

/// A database from before ephemeral peers (schema 3) takes migration 4:
/// its peers read as normal ones, and new peers can be ephemeral.
#[tokio::test]
async fn peers_from_before_ephemeral_peers_read_as_normal_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let gw = suite::first_gateway();
    let key = crate::model::PrivateKey::generate().public_key();
    {
        let mut c = Connection::open(&path).unwrap();
        let tx = c.transaction().unwrap();
        for sql in &MIGRATIONS[..3] {
            tx.execute_batch(sql).unwrap();
        }
        tx.pragma_update(None, "user_version", 3).unwrap();
        tx.execute(
            "INSERT INTO orgs (id, name, network_id) VALUES (1, 'old', 1)",
            [],
        )
        .unwrap();
        tx.execute(
            "INSERT INTO gateways (name, region, host_id, endpoint, public_key)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                gw.name.as_str(),
                gw.region.as_str(),
                gw.host_id.get(),
                gw.endpoint.to_string(),
                gw.public_key.to_base64()
            ],
        )
        .unwrap();
        tx.execute(
            "INSERT INTO peers (org_id, name, gateway, slot, public_key, created_at, revision)
             VALUES (1, 'laptop', ?1, 0, ?2, 5, 1)",
            params![gw.name.as_str(), key.to_base64()],
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let snap = store.snapshot().await.unwrap();
    assert_eq!(snap.peers.len(), 1);
    assert_eq!(
        (snap.peers[0].name.as_str(), snap.peers[0].ephemeral),
        ("laptop", None)
    );
    let mut req = new_peer("old", "job");
    req.ephemeral = Some(600);
    let (p, _) = store.create_peer(&req).await.unwrap();
    assert_eq!(p.ephemeral, Some(600));
    drop(store);
    let again = SqliteStore::open(&path).unwrap().snapshot().await.unwrap();
    assert!(again.peers.contains(&p), "the TTL survives a reopen");
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Create(u8, u8),
        Remove(u8, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..2, 0u8..40).prop_map(|(o, n)| Op::Create(o, n)),
            1 => (0u8..2, 0u8..40).prop_map(|(o, n)| Op::Remove(o, n)),
        ]
    }

    #[derive(Debug, Clone)]
    enum Write {
        Peer(u8, u8),
        Unpeer(u8, u8),
        Instance(u8, u8),
        Uninstance(u8, u8),
        Org(u8),
        Token(u8),
        /// A write by another process: the cache must notice.
        Foreign(u8),
    }

    fn write() -> impl Strategy<Value = Write> {
        prop_oneof![
            4 => (0u8..3, 0u8..20).prop_map(|(o, n)| Write::Peer(o, n)),
            2 => (0u8..3, 0u8..20).prop_map(|(o, n)| Write::Unpeer(o, n)),
            3 => (0u8..3, 0u8..20).prop_map(|(o, n)| Write::Instance(o, n)),
            1 => (0u8..3, 0u8..20).prop_map(|(o, n)| Write::Uninstance(o, n)),
            1 => (0u8..3).prop_map(Write::Org),
            1 => (0u8..3).prop_map(Write::Token),
            1 => (0u8..20).prop_map(Write::Foreign),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Whatever the writes, by this process or another, and however
        /// they interleave with snapshots: a snapshot equals what a full
        /// read of the file gives.
        #[test]
        fn cached_snapshots_equal_a_full_read(
            writes in proptest::collection::vec((write(), any::<bool>()), 1..60)
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("state.db");
                let store = store_with_gateway(dir.path()).await;
                let other = SqliteStore::open(&path).unwrap();
                let orgs = ["o0", "o1", "o2"];
                store.create_org(&"o0".parse().unwrap()).await.unwrap();
                let mut last = None;
                for (w, look) in writes {
                    let org = |o: u8| orgs[o as usize].parse::<OrgName>().unwrap();
                    let app: model::AppName = "web".parse().unwrap();
                    let id = |n: u8| format!("i{n}").parse::<model::InstanceId>().unwrap();
                    let instance = |o: u8, n: u8| {
                        NewInstance {
                            org: org(o),
                            app: app.clone(),
                            id: Some(id(n)),
                            region: "lhr".parse().unwrap(),
                            address: InstanceAddress::HostMachine {
                                host: HostId::from_u32(0x7d),
                                machine: model::MachineId::from_u32(u32::from(n) + 1),
                            },
                            process_group: None,
                            started: n % 2 == 0,
                        }
                    };
                    // Failures (a name taken, an org missing) are part
                    // of the sequence: they must change nothing.
                    let _ = match w {
                        Write::Peer(o, n) => store
                            .create_peer(&new_peer(orgs[o as usize], &format!("n{n}")))
                            .await
                            .map(|_| ()),
                        Write::Unpeer(o, n) => store
                            .remove_peer(&org(o), &format!("n{n}").parse().unwrap())
                            .await
                            .map(|_| ()),
                        Write::Instance(o, n) => {
                            store.add_instance(&instance(o, n)).await.map(|_| ())
                        }
                        Write::Uninstance(o, n) => {
                            store.remove_instance(&org(o), &app, &id(n)).await.map(|_| ())
                        }
                        Write::Org(o) => store.create_org(&org(o)).await.map(|_| ()),
                        Write::Token(o) => store
                            .add_org_token(&crate::store::NewOrgToken {
                                org: org(o),
                                sha256: [o; 32],
                                created_at: 1,
                                expires_at: None,
                            })
                            .await
                            .map(|_| ()),
                        Write::Foreign(n) => {
                            other.add_instance(&instance(0, n + 100)).await.map(|_| ())
                        }
                    };
                    if look {
                        let from = last.as_ref().map_or(0, |s: &Arc<Snapshot>| s.revision);
                        let (cached, deltas) = store.snapshot_since(from).await.unwrap();
                        let full = {
                            let mut conn = open_conn(&path).unwrap();
                            load_snapshot(&mut conn).unwrap()
                        };
                        prop_assert_eq!(&*cached, &full);
                        // The writes handed out lead from the last
                        // snapshot to this one.
                        if let (Some(deltas), Some(last)) = (deltas, &last) {
                            let mut followed = Snapshot::clone(last);
                            for d in deltas {
                                followed.apply(d);
                            }
                            followed.revision = cached.revision;
                            prop_assert_eq!(&followed, &full);
                        }
                        last = Some(cached);
                    }
                }
                Ok(())
            })?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Whatever the sequence of creates and removes: addresses never
        /// collide, stay inside the org's /48 under the gateway's host
        /// id, and each create takes the lowest free slot.
        #[test]
        fn allocation_invariants(ops in proptest::collection::vec(op(), 1..80)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let store = store_with_gateway(dir.path()).await;
                let orgs = ["o0", "o1"];
                for o in orgs { store.create_org(&o.parse().unwrap()).await.unwrap(); }
                for op in ops {
                    match op {
                        Op::Create(o, n) => {
                            let org = orgs[o as usize];
                            let snap = store.snapshot().await.unwrap();
                            let used: HashSet<u32> = snap.peers.iter()
                                .filter(|p| p.org.as_str() == org)
                                .map(|p| p.slot.index()).collect();
                            let lowest = (0..).find(|s| !used.contains(s)).unwrap();
                            match store.create_peer(&new_peer(org, &format!("n{n}"))).await {
                                Ok((p, _)) => {
                                    prop_assert_eq!(p.slot.index(), lowest);
                                    let prefix = snap.org(&p.org).unwrap().prefix();
                                    prop_assert!(prefix.contains(p.net.peer_addr()));
                                    let seg = p.net.peer_addr().segments();
                                    prop_assert_eq!((seg[3], seg[4]), (0xa7b, 0xd6b));
                                }
                                Err(StoreError::Conflict(_)) => {}
                                Err(e) => prop_assert!(false, "{e}"),
                            }
                        }
                        Op::Remove(o, n) => {
                            let _ = store.remove_peer(&orgs[o as usize].parse().unwrap(),
                                &format!("n{n}").parse().unwrap()).await;
                        }
                    }
                    let snap = store.snapshot().await.unwrap();
                    let nets: HashSet<_> = snap.peers.iter().map(|p| p.net).collect();
                    prop_assert_eq!(nets.len(), snap.peers.len());
                }
                Ok(())
            })?;
        }
    }
}

/// Unmounts a test's tmpfs, lazily, whatever happened.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn mount(args: &[&str], at: &Path) {
    let ok = std::process::Command::new("mount")
        .args(args)
        .arg(at)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount {args:?} {}", at.display());
}

#[tokio::test]
async fn a_full_or_read_only_disk_is_unavailable_not_internal() {
    let test = "store::sqlite::a_full_or_read_only_disk_is_unavailable_not_internal";
    if !crate::testkit::need_root(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    mount(&["-t", "tmpfs", "-o", "size=1m", "sixpn-test"], dir.path());
    let _unmount = Mounted(dir.path().to_owned());
    let store = store_with_gateway(dir.path()).await;
    store.create_org(&"acme".parse().unwrap()).await.unwrap();

    // Fill the disk, then write.
    let fill = dir.path().join("fill");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&fill).unwrap();
        while f.write_all(&[0u8; 4096]).is_ok() {}
        let _ = f.sync_all();
    }
    let mut full = None;
    for i in 0..200 {
        if let Err(e) = store.create_org(&format!("o{i}").parse().unwrap()).await {
            full = Some(e);
            break;
        }
    }
    let e = full.expect("a write on a full disk fails");
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    assert!(e.to_string().contains("full"), "{e}");
    // Room again: writes go on.
    std::fs::remove_file(&fill).unwrap();
    store.create_org(&"after".parse().unwrap()).await.unwrap();

    // A read-only file or an I/O error is the same kind of failure (a
    // tmpfs with the store open can't be remounted read-only to show it).
    for code in [rusqlite::ffi::SQLITE_READONLY, rusqlite::ffi::SQLITE_IOERR] {
        let e = internal(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            None,
        ));
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    }
    assert!(store.snapshot().await.is_ok());
}
