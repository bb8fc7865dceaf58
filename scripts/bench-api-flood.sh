#!/usr/bin/env bash
# The control API under a slow-connection flood (issue 12's probe): a
# gateway whose open-files limit is 1,024 (soft and hard, as on a stock
# host) gets FLOOD (default 1100) TCP connections to its API that each send
# one byte a second and never finish a request. Meanwhile the unix socket
# is timed: `orgs list` 20 times and `wireguard create … stdout` 3 times.
# Prints p50/max in ms for each.
#
#   scripts/bench-api-flood.sh [SIXPN_BINARY]     (default target/release/sixpn)
#
# Run it with an older binary for the side-by-side figure. Root; needs ip,
# wireguard-go, python3. Everything runs in its own network namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$(realpath "${1:-target/release/sixpn}")"
FLOOD="${FLOOD:-1100}"
NS="sxflood$$"
DIR="$(mktemp -d /tmp/sixpn-flood.XXXXXX)"
IF="sxf$$"
PORT=4280
GW_PID=""
cleanup() {
  [ -n "$GW_PID" ] && kill "$GW_PID" 2>/dev/null && wait "$GW_PID" 2>/dev/null || true
  pkill -f "$DIR/flood.py" 2>/dev/null || true
  ip netns pids "$NS" 2>/dev/null | xargs -r kill 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

ip netns add "$NS"
ip -n "$NS" link set lo up
cat >"$DIR/gateway.toml" <<EOF
[gateway]
name = "lhr-1"
region = "lhr"
host_id = "a7b:d6b"
interface = "$IF"
endpoint = "127.0.0.1:51820"
listen_port = 51820
private_key_file = "$DIR/gw.key"
backend = "userspace"
[store]
path = "$DIR/state.db"
[api]
socket = "$DIR/api.sock"
listen = "[::1]:$PORT"
admin_token_file = "$DIR/admin.token"
EOF
ip netns exec "$NS" prlimit --nofile=1024:1024 "$BIN" gateway --config "$DIR/gateway.toml" \
  >"$DIR/gateway.log" 2>&1 &
GW_PID=$!
cli() { ip netns exec "$NS" "$BIN" --api "$DIR/api.sock" "$@"; }
for _ in $(seq 100); do cli orgs list >/dev/null 2>&1 && break; sleep 0.1; done
cli orgs create acme >/dev/null

cat >"$DIR/flood.py" <<'EOF'
import socket, sys, time, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
n, port = int(sys.argv[1]), int(sys.argv[2])
socks = []
for _ in range(n):
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("::1", port))
        socks.append(s)
    except OSError:
        break
print(f"flood: {len(socks)} connections", flush=True)
end = time.time() + 120
while time.time() < end:
    for s in socks:
        try:
            s.send(b"G")
        except OSError:
            pass
    time.sleep(1)
EOF
ip netns exec "$NS" python3 "$DIR/flood.py" "$FLOOD" "$PORT" >"$DIR/flood.log" 2>&1 &
sleep 3
cat "$DIR/flood.log"

ms() { # runs "$@", prints its wall time in ms
  local t0 t1
  t0=$(date +%s%N)
  "$@" >/dev/null 2>&1 || echo "failed: $*" >&2
  t1=$(date +%s%N)
  echo $(((t1 - t0) / 1000000))
}
stats() { # name, then numbers on stdin
  sort -n | awk -v name="$1" '{ v[NR] = $1 } END { printf "%s: n=%d p50=%d ms max=%d ms\n", name, NR, v[int((NR + 1) / 2)], v[NR] }'
}
for i in $(seq 20); do ms cli orgs list; done | stats "unix orgs list during flood"
for i in $(seq 3); do ms cli wireguard create acme lhr "p$i" stdout; done |
  stats "unix wireguard create during flood"
grep -c "Too many open files" "$DIR/gateway.log" | sed 's/^/"Too many open files" log lines: /' || true
echo "binary: $BIN"
