//! DNS for `.internal` (docs/architecture.md "DNS"): the per-org zone and the query
//! handler, with no sockets.
//!
//! - [`zone`] builds a [`ZoneIndex`] from a store snapshot: one [`OrgZone`]
//!   per org, every answer pre-encoded as wire bytes.
//! - [`handler`] answers one query given as bytes, with the source address
//!   and transport it came on: it writes the response, says the query must
//!   be forwarded upstream (a name outside `.internal`), or says to drop it.
//! - [`SharedZones`] is the atomic swap between the reconciler, which builds
//!   a new index on every store change, and the listeners, which read it.
//!
//! - [`server`] is the socket layer: [`DnsService`] follows the reconciler's
//!   snapshots, swaps the index in and runs one UDP and one TCP listener per
//!   org with peers on this gateway, forwarding names outside `.internal`
//!   upstream, with bounded TCP connections and in-flight forwards.

mod batch;
pub mod handler;
pub mod server;
pub mod zone;

use std::sync::{Arc, RwLock};

pub use handler::{answer, Outcome, Rcode, Transport, MAX_UDP_PAYLOAD};
pub use server::{DnsMetrics, DnsService, DnsSettings, Limits, MetricsSnapshot};
pub use zone::{BadCoordinates, OrgZone, RegionDistances, ZoneIndex, TTL};

/// The current [`ZoneIndex`], replaced whole on every store change.
///
/// Readers take an `Arc` of the index and keep using it for the whole query,
/// so a swap never shows them half a change. A `RwLock` held only to clone
/// or replace the `Arc` is enough at the query rates we serve; an
/// `arc-swap` would remove the shared lock word if it ever shows up in a
/// profile.
#[derive(Debug, Default)]
pub struct SharedZones {
    current: RwLock<Arc<ZoneIndex>>,
}

impl SharedZones {
    /// Starts with `index`.
    pub fn new(index: ZoneIndex) -> Self {
        Self {
            current: RwLock::new(Arc::new(index)),
        }
    }

    /// The index in force now.
    pub fn load(&self) -> Arc<ZoneIndex> {
        // A poisoned lock still holds a complete index: the only writer
        // replaces the Arc in one assignment.
        match self.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Makes `index` the one in force; queries already running finish on
    /// the old one.
    pub fn store(&self, index: ZoneIndex) {
        let new = Arc::new(index);
        match self.current.write() {
            Ok(mut g) => *g = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }
}
