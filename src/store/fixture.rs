//! Snapshot builders for tests (test-only, the `testkit` feature): records
//! made the way the store would make them, without a store.

use super::{Gateway, Peer};
use crate::model::{OrgPrefix, PeerSlot, PrivateKey};

/// Peer `name` of `org` (whose /48 is `prefix`) in slot `slot` on gateway
/// `g`, with a fresh key, at revision 0.
pub fn peer_on(g: &Gateway, org: &str, prefix: OrgPrefix, name: &str, slot: u32) -> Peer {
    let slot = PeerSlot::new(slot).expect("a slot in range");
    Peer {
        org: org.parse().expect("an org name"),
        name: name.parse().expect("a peer name"),
        gateway: g.name.clone(),
        region: g.region.clone(),
        slot,
        net: slot.net(prefix, g.host_id),
        public_key: PrivateKey::generate().public_key(),
        created_at: 0,
        ephemeral: None,
        revision: 0,
    }
}
