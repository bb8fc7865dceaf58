#!/usr/bin/env bash
# Tier 3 (docs/architecture.md "Test tiers"): the dataplane tests again, under
# Debian's real kernel with the WireGuard module, booted with virtme-ng under
# QEMU (scripts/vm-run.sh), with the kernel backend. The test binaries are
# built on the host and run inside the VM, which shares the filesystem.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

exe() { # the test executable of a cargo target
  cargo test --locked --no-run --message-format=json "$@" 2>/dev/null |
    jq -r 'select(.profile.test == true and .executable != null) | .executable' | tail -n 1
}
cargo build --locked --quiet
lib=$(exe --lib)
dataplane=$(exe --test dataplane)
isolation=$(exe --test isolation)
jit=$(exe --test jit)
[ -x "$lib" ] && [ -x "$dataplane" ] && [ -x "$isolation" ] && [ -x "$jit" ] || { echo "test-vm: cannot find the test binaries" >&2; exit 1; }

echo "== real kernel (virtme-ng): kernel adapters, the dataplane, isolation and just-in-time tests, backend = kernel"
export SIXPN_TEST_BACKEND=kernel CI=true
VM_TIMEOUT="${VM_TIMEOUT:-1800}" scripts/vm-run.sh sh -c "
  set -e
  echo \"kernel \$(uname -r), wireguard module: \$(cat /sys/module/wireguard/version 2>/dev/null || echo built-in)\"
  '$lib' dataplane::linux --test-threads=1
  '$dataplane' --test-threads=1
  '$isolation' --test-threads=1
  '$jit' --test-threads=1 --nocapture --skip a_flood
"
