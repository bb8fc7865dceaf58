#!/usr/bin/env bash
# The README's first command: installs what is missing, builds sixpn, and runs
# a gateway on the embedded SQLite store inside a self-contained sandbox of
# network namespaces, with a demo org, app instance and WireGuard peer.
#
#   sixpn-demo-gw      runs `sixpn gateway` (its API socket is in $DEMO)
#   sixpn-demo-client  a "laptop" that loads the wg-quick file sixpn wrote
#   sixpn-demo-host    an instance host with the demo app's instance
#
# It stays up until Ctrl-C (or exits at once with DEMO_EXIT=1), then removes
# everything it made.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "== building sixpn"
cargo build --quiet
BIN="$PWD/target/debug/sixpn"
DEMO=${DEMO:-/tmp/sixpn-demo}
GW=sixpn-demo-gw
CL=sixpn-demo-client
HOST=sixpn-demo-host
GW_PID=
CL_WG_PID=

cleanup() {
  set +e
  for pid in $GW_PID $CL_WG_PID; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
  for ns in $CL $HOST $GW; do
    ip netns pids $ns 2>/dev/null | xargs -r kill -9 2>/dev/null
    ip netns del $ns 2>/dev/null
  done
}
trap cleanup EXIT
cleanup
rm -rf "$DEMO"; mkdir -p "$DEMO"

echo "== sandbox: namespaces $CL -- $GW -- $HOST joined by veth pairs"
for ns in $GW $CL $HOST; do ip netns add $ns; ip -n $ns link set lo up; done
ip link add to-client netns $GW type veth peer name to-gw netns $CL
ip link add to-host netns $GW type veth peer name to-gw netns $HOST
ip -n $GW addr add fd53:7078::1/64 dev to-client nodad
ip -n $CL addr add fd53:7078::2/64 dev to-gw nodad
ip -n $GW addr add fd53:7079::1/64 dev to-host nodad
ip -n $HOST addr add fd53:7079::2/64 dev to-gw nodad
for l in "$GW to-client" "$GW to-host" "$CL to-gw" "$HOST to-gw"; do set -- $l; ip -n $1 link set $2 up; done

cat > "$DEMO/gateway.toml" <<TOML
[gateway]
name = "lhr-1"
region = "lhr"
host_id = "a7b:d6b"
interface = "sixpn-demo0"
endpoint = "[fd53:7078::1]:51820"
private_key_file = "$DEMO/gateway.key"
backend = "auto"
peers = "jit"

[store]
path = "$DEMO/state.db"

[api]
socket = "$DEMO/api.sock"
TOML

echo "== starting: sixpn gateway --config $DEMO/gateway.toml (log: $DEMO/gateway.log)"
ip netns exec $GW "$BIN" gateway --config "$DEMO/gateway.toml" >"$DEMO/gateway.log" 2>&1 &
GW_PID=$!
export SIXPN_API="$DEMO/api.sock"
for _ in $(seq 100); do "$BIN" orgs list >/dev/null 2>&1 && break; sleep 0.1; done

run() { echo "\$ $*"; "$@"; }
echo
sixpn() { "$BIN" "$@"; }
run sixpn orgs create demo
run sixpn instances add demo hello lhr --host a7b:7d --machine f066:b83b
INSTANCE=$("$BIN" instances list demo --json | jq -r '.[0].address')
# The instance host: its 6PN address, routed behind the gateway.
ip -n $HOST -6 addr add "$INSTANCE/128" dev lo
ip -n $HOST -6 route add fdaa::/16 via fd53:7079::1
ip -n $GW -6 route add "${INSTANCE%:*:*:*}::/80" via fd53:7079::2
run sixpn wireguard create demo lhr laptop "$DEMO/laptop.conf"
run cat "$DEMO/laptop.conf"
run sixpn wireguard list demo

echo
echo "== the client loads the file (DNS line kept away from this host's resolv.conf)"
wg-quick strip "$DEMO/laptop.conf" > "$DEMO/laptop.wg"
# wireguard-go stays our child (not self-daemonized) so cleanup can reap it.
LOG_LEVEL=error ip netns exec $CL wireguard-go -f sixpn-demo-c >/dev/null 2>&1 &
CL_WG_PID=$!
for _ in $(seq 100); do [ -S /var/run/wireguard/sixpn-demo-c.sock ] && break; sleep 0.05; done
ip netns exec $CL wg setconf sixpn-demo-c "$DEMO/laptop.wg"
ip -n $CL -6 addr add "$(awk '/^Address/ {print $3}' "$DEMO/laptop.conf")" dev sixpn-demo-c
ip -n $CL link set sixpn-demo-c up
DNS_ADDR=$(awk '/^DNS/ {print $3}' "$DEMO/laptop.conf")
ip -n $CL -6 route add "$(awk '/^AllowedIPs/ {print $3}' "$DEMO/laptop.conf")" dev sixpn-demo-c
echo
echo "== the first handshake installs the peer on the gateway (peers = \"jit\": only active peers are in the kernel)"
for _ in $(seq 15); do ip netns exec $CL ping -6 -c 1 -W 1 "$DNS_ADDR" >/dev/null 2>&1 && break; done
echo
echo "== through the tunnel: the org's DNS address and the app instance"
run ip netns exec $CL ping -6 -c 2 -i 0.3 "$DNS_ADDR"
run ip netns exec $CL ping -6 -c 2 -i 0.3 "$INSTANCE"
run ip netns exec $CL wg show sixpn-demo-c
echo
echo "== on the gateway"
run ip netns exec $GW wg show sixpn-demo0
run ip -n $GW -6 route show dev sixpn-demo0
run ip -n $GW -6 addr show dev sixpn-demo0
run sixpn wireguard status demo laptop
echo
echo "== isolation: sixpn's nftables table on the gateway"
run ip netns exec $GW nft list table inet sixpn
echo
echo "== .internal DNS through the tunnel, at the file's DNS address"
run ip netns exec $CL dig +short aaaa hello.internal "@$DNS_ADDR"
run ip netns exec $CL dig +short txt _apps.internal "@$DNS_ADDR"
run ip netns exec $CL dig +short txt _peer.internal "@$DNS_ADDR"
run ip netns exec $CL dig +short aaaa laptop._peer.internal "@$DNS_ADDR"

echo
echo "sixpn is running in namespace $GW. Try:"
echo "  SIXPN_API=$DEMO/api.sock $BIN wireguard list demo"
echo "  ip netns exec $CL wg show"
if [ "${DEMO_EXIT:-0}" = 1 ]; then exit 0; fi
echo "Ctrl-C stops the gateway and removes the sandbox."
wait "$GW_PID"
