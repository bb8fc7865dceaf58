//! sixpn: a gateway agent for private IPv6 networks in the style of Fly.io's
//! 6PN. See docs/architecture.md for the architecture; each module's doc says what it
//! owns.

pub mod api;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod dns;
pub mod doctor;
pub mod gateway;
pub mod jit;
pub mod liveness;
pub mod lock;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod plan;
pub mod reconcile;
pub mod report;
pub mod store;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
