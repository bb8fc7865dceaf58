//! The first leg of Noise IK as WireGuard runs it (placeholder).
