#!/usr/bin/env bash
# Issue-2 figures: `sixpn wireguard create` end to end (N in a row, default
# 1,000; each returns once the peer is live on the gateway's interface), the
# daemon's memory idle and after, and the store's allocation of 10,000 peers.
# Runs the release build in a throwaway network namespace (root).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000}
cargo build --release --quiet
cargo build --release --quiet --bench alloc 2>/dev/null || true
BIN="$PWD/target/release/sixpn"
DIR=$(mktemp -d /tmp/sixpn-bench.XXXXXX)
NS=sixpn-bench-$$
IFACE=sxbench$$
cleanup() {
  set +e
  [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  ip netns pids $NS 2>/dev/null | xargs -r kill -9 2>/dev/null
  ip netns del $NS 2>/dev/null
  rm -f "/var/run/wireguard/$IFACE.sock"
  rm -rf "$DIR"
}
trap cleanup EXIT
ip netns add $NS
ip -n $NS link set lo up
cat > "$DIR/gw.toml" <<TOML
[gateway]
name = "bench-1"
region = "lhr"
host_id = "a7b:d6b"
interface = "${IFACE:0:15}"
endpoint = "[::1]:51820"
private_key_file = "$DIR/gw.key"
backend = "userspace"
[store]
path = "$DIR/state.db"
[api]
socket = "$DIR/api.sock"
TOML
SIXPN_LOG=warn ip netns exec $NS "$BIN" gateway --config "$DIR/gw.toml" 2>"$DIR/gw.log" &
PID=$!
export SIXPN_API="$DIR/api.sock"
for _ in $(seq 200); do "$BIN" orgs list >/dev/null 2>&1 && break; sleep 0.05; done
"$BIN" orgs create bench >/dev/null
sleep 1
rss() { awk '/VmRSS/ {print $2}' /proc/$PID/status; }
echo "daemon RSS idle: $(rss) KiB"

: > "$DIR/times"
for i in $(seq 1 "$N"); do
  t0=$(date +%s%N)
  "$BIN" wireguard create bench lhr "p$i" stdout >/dev/null 2>"$DIR/err" || { cat "$DIR/err"; exit 1; }
  t1=$(date +%s%N)
  echo $(( (t1 - t0) / 1000 )) >> "$DIR/times"
done
grep -q "has not installed" "$DIR/err" && echo "warning: last create returned pending"
sort -n "$DIR/times" > "$DIR/sorted"
med=$(awk -v n="$N" 'NR==int((n+1)/2) {print $1}' "$DIR/sorted")
p99=$(awk -v n="$N" 'NR==int(n*0.99) {print $1}' "$DIR/sorted")
echo "wireguard create, $N in a row (CLI process start to exit, peer live on the interface):"
echo "  median ${med} µs   p99 ${p99} µs"
echo "peers on the interface: $(ip netns exec $NS wg show "${IFACE:0:15}" peers | wc -l)"
echo "daemon RSS after $N peers: $(rss) KiB"
echo
if [ -x target/release/deps/alloc-* ] 2>/dev/null || ls target/release/deps/alloc-* >/dev/null 2>&1; then
  cargo bench --quiet --bench alloc 2>/dev/null | sed 's/^/  /'
fi
