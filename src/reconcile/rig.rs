//! A reconciler rig: a SQLite store in a scratch directory with this
//! gateway registered and one org created, and the reconciler settings that
//! go with it. The adapters are the caller's: the fake kernel in unit tests,
//! real ones in the benches. Test-only (the `testkit` feature).

use std::sync::Arc;

use super::{Reconciler, Settings};
use crate::dataplane::fake::FakeKernel;
use crate::dataplane::{Firewall, Netlink, WgDevice};
use crate::model::{HostId, InterfaceName, PrivateKey, PublicKey};
use crate::plan::Identity;
use crate::store::sqlite::SqliteStore;
use crate::store::{Gateway, NewPeer, Peer, Store};

/// The gateway's name in the rig's store.
pub const GATEWAY: &str = "lhr-1";
/// Its region.
pub const REGION: &str = "lhr";
/// The org the rig creates.
pub const ORG: &str = "acme";

/// A store with this gateway and [`ORG`] in it.
pub struct Rig {
    /// Holds the database; dropped with the rig.
    pub dir: tempfile::TempDir,
    /// The store.
    pub store: Arc<SqliteStore>,
    /// The gateway's key.
    pub key: PrivateKey,
    /// The gateway's host id.
    pub host: HostId,
}

impl Rig {
    /// A fresh store, this gateway registered and [`ORG`] created.
    pub async fn new() -> Self {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let store = Arc::new(SqliteStore::open(dir.path().join("s.db")).expect("open the store"));
        let key = PrivateKey::generate();
        let host: HostId = "a7b:d6b".parse().expect("a host id");
        store
            .register_gateway(&Gateway {
                name: GATEWAY.parse().expect("a gateway name"),
                region: REGION.parse().expect("a region"),
                host_id: host,
                endpoint: "gw:51820".parse().expect("an endpoint"),
                public_key: key.public_key(),
            })
            .await
            .expect("register the gateway");
        store
            .create_org(&ORG.parse().expect("an org name"))
            .await
            .expect("create the org");
        Self {
            dir,
            store,
            key,
            host,
        }
    }

    /// The reconciler's settings for this gateway on `interface`.
    pub fn settings(&self, interface: InterfaceName) -> Settings {
        Settings {
            gateway: GATEWAY.parse().expect("a gateway name"),
            interface,
            identity: Identity {
                public_key: self.key.public_key(),
                listen_port: 51820,
                host_id: self.host,
            },
            private_key: self.key.clone(),
            jit: None,
            capture: None,
        }
    }

    /// A reconciler for this gateway over the given adapters.
    pub fn reconciler(
        &self,
        wg: Arc<dyn WgDevice>,
        nl: Arc<dyn Netlink>,
        fw: Arc<dyn Firewall>,
        interface: InterfaceName,
    ) -> Reconciler {
        Reconciler::new(wg, nl, fw, self.store.clone(), self.settings(interface))
    }

    /// A reconciler for this gateway on `sixpn0` of `kernel`.
    pub fn on_fake(&self, kernel: &FakeKernel) -> Reconciler {
        self.reconciler(
            Arc::new(kernel.clone()),
            Arc::new(kernel.clone()),
            Arc::new(kernel.clone()),
            "sixpn0".parse().expect("an interface name"),
        )
    }

    /// Registers a peer `name` of [`ORG`]; returns its key.
    pub async fn add_peer(&self, name: &str) -> PublicKey {
        add_peer(self.store.as_ref(), ORG, name).await.public_key
    }
}

/// Registers a peer `name` of `org` in the rig's region, with a fresh key.
pub async fn add_peer(store: &dyn Store, org: &str, name: &str) -> Peer {
    let (peer, _) = store
        .create_peer(&NewPeer {
            org: org.parse().expect("an org name"),
            name: name.parse().expect("a peer name"),
            region: REGION.parse().expect("a region"),
            public_key: PrivateKey::generate().public_key(),
            ephemeral: None,
        })
        .await
        .expect("create the peer");
    peer
}
