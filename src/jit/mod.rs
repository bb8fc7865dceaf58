//! Just-in-time peers (docs/architecture.md "Just-in-time peers"): the
//! kernel holds only the peers that handshook recently, the store holds all.
//! A handshake initiation from a registered peer that isn't installed is
//! captured (held in an NFQUEUE, or copied over nfnetlink_log where the
//! kernel lacks nft's `queue`), its initiator recovered ([`noise`]), the peer
//! installed, and the held packet released.

pub mod capture;
pub mod noise;

pub use capture::{Capture, Source};
