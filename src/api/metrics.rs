//! Prometheus text exposition for `/metrics`. Each part of the daemon
//! (reconciler, DNS, firewall) contributes a [`MetricsSource`]; the API
//! concatenates them. Cheap by design: counters are atomics, and per-org
//! series only where the org count, not the peer count, sets the size.

pub use crate::metrics::{family, header, sample, MetricsSource};
