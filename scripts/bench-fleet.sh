#!/usr/bin/env bash
# Fleet figures, each over SIXPN_BENCH_N changes (default 1000)
# made through the API of the iad gateway, printed as p50/p99/max:
#   - write → the create answered `installed` for a peer placed on the lhr
#     gateway (it waits for lhr's sync report; `wg show` on lhr confirms);
#   - write → lhr's DNS answering the new instance's `<app>.internal` with
#     its address (UDP queries from a probe host routed to lhr, ~1 a ms).
# Root; etcd, wireguard-go, wg. Each bench starts its own fleet; they run
# one after the other (one cargo call each, so the figure line isn't
# interleaved with libtest's `test … ok`).
#
#   scripts/bench-fleet.sh          # plaintext etcd
#   scripts/bench-fleet.sh tls      # etcd over TLS with client certificates (needs openssl)
set -euo pipefail
cd "$(dirname "$0")/.."
export SIXPN_BENCH_N="${SIXPN_BENCH_N:-1000}"
if [ "${1:-}" = tls ]; then
  export SIXPN_BENCH_TLS=1
fi
for bench in bench_write_to_wg_show_on_the_other_gateway \
  bench_write_to_dns_answer_on_the_other_gateway; do
  cargo test --release --test fleet -- --ignored --nocapture --exact "$bench" \
    2>&1 | grep -E '^fleet|test result|panicked'
done
