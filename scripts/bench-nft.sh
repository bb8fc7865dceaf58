#!/usr/bin/env bash
# Organization isolation figures, as root:
#   - full ruleset load at 10k / 100k orgs, listing it back;
#   - one org's element added at 10,000 orgs: nfnetlink batch vs an nft
#     process per change, and store write -> element live end to end;
#   - UDP packet rate and ping RTT through a forwarding namespace with the
#     sixpn set at 10 / 10k / 100k orgs, side by side with one rule per org.
# Traffic stays inside network namespaces this creates (sxb-<pid>-*) and
# deletes. Knobs: SIXPN_BENCH=control|forward, SIXPN_BENCH_SECS (flood
# length, default 3), SIXPN_BENCH_RULES_MAX (cap the baseline, default 100000).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "bench-nft.sh: needs root (network namespaces, nftables)" >&2
  exit 1
fi
command -v nft >/dev/null || { echo "bench-nft.sh: needs nft (apt-get install nftables)" >&2; exit 1; }
export PATH="$HOME/.cargo/bin:$PATH"
echo "kernel $(uname -r), $(nft --version), $(nproc) CPUs"
exec cargo bench --bench nft
