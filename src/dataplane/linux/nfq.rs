//! nfnetlink_queue and nfnetlink_log consumers (placeholder).
