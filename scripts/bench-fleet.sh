#!/usr/bin/env bash
# Fleet figures (issue 7): from an API write on the iad gateway to the peer
# in `wg show` on the lhr gateway, over SIXPN_BENCH_N changes (default
# 1000); prints p50/p99/max. Root; etcd, wireguard-go, wg.
set -euo pipefail
cd "$(dirname "$0")/.."
export SIXPN_BENCH_N="${SIXPN_BENCH_N:-1000}"
cargo test --release --test fleet -- --ignored --nocapture \
  bench_write_to_wg_show_on_the_other_gateway 2>&1 | grep -E '^fleet|test result|panicked'
