#!/usr/bin/env bash
# Regenerates src/jit/testdata/initiation.txt: one WireGuard handshake
# initiation made by wireguard-go (a real implementation, not ours), with
# the keys needed to open it. The noise tests read the file with
# include_str!, so the capture runs once, by hand, as root:
#
#   sudo scripts/capture-initiation.sh [out-file]
#
# How: in a throwaway network namespace, wireguard-go runs an interface
# whose one peer (the "responder") sits at 127.0.0.1:51820; a ping into the
# peer's allowed IP makes wireguard-go send a handshake initiation there,
# where a UDP listener keeps the first datagram. Needs wireguard-go, wg,
# ip, python3. The namespace and the daemon are removed on exit.
set -euo pipefail

out=${1:-src/jit/testdata/initiation.txt}
ns=sxnoise
ifname=sxn0
port=51820

if [ "$(id -u)" != 0 ]; then
    echo "capture-initiation: needs root (network namespace, tun device)" >&2
    exit 1
fi
for tool in wireguard-go wg ip python3; do
    command -v "$tool" >/dev/null || { echo "capture-initiation: $tool not found" >&2; exit 1; }
done
if ip netns list | grep -qw "$ns"; then
    echo "capture-initiation: namespace $ns already exists; delete it first" >&2
    exit 1
fi

tmp=$(mktemp -d)
wgpid=""
lpid=""
cleanup() {
    [ -n "$wgpid" ] && kill "$wgpid" 2>/dev/null || true
    [ -n "$lpid" ] && kill "$lpid" 2>/dev/null || true
    [ -n "$wgpid" ] && wait "$wgpid" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

(umask 077 && wg genkey >"$tmp/initiator.key" && wg genkey >"$tmp/responder.key")
initiator_pub=$(wg pubkey <"$tmp/initiator.key")
responder_pub=$(wg pubkey <"$tmp/responder.key")

ip netns add "$ns"
ip netns exec "$ns" ip link set lo up

# The listener: the first datagram to the responder's port, as hex.
ip netns exec "$ns" python3 - "$port" >"$tmp/msg.hex" <<'PY' &
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.settimeout(20)
data, _ = s.recvfrom(4096)
print(data.hex())
PY
lpid=$!

# `ip netns exec` execs the daemon, so $! is wireguard-go's own PID.
WG_PROCESS_FOREGROUND=1 ip netns exec "$ns" wireguard-go "$ifname" >"$tmp/wg.log" 2>&1 &
wgpid=$!
for _ in $(seq 50); do
    ip netns exec "$ns" wg show "$ifname" >/dev/null 2>&1 && break
    sleep 0.1
done
ip netns exec "$ns" wg set "$ifname" private-key "$tmp/initiator.key" \
    peer "$responder_pub" endpoint "127.0.0.1:$port" allowed-ips fd00::2/128
ip netns exec "$ns" ip -6 addr add fd00::1/64 dev "$ifname" nodad
ip netns exec "$ns" ip link set "$ifname" up
sleep 0.2
ip netns exec "$ns" ping -6 -c1 -W1 fd00::2 >/dev/null 2>&1 || true

wait "$lpid"
lpid=""
hex=$(tr -d '\n' <"$tmp/msg.hex")
if [ "${#hex}" != 296 ] || [ "${hex:0:8}" != 01000000 ]; then
    echo "capture-initiation: expected a 148-byte type-1 message, got: $hex" >&2
    exit 1
fi

mkdir -p "$(dirname "$out")"
cat >"$out" <<TXT
# A WireGuard handshake initiation captured from $(wireguard-go --version | head -1)
# by scripts/capture-initiation.sh: wireguard-go, holding the initiator key,
# had one peer (the responder key) at 127.0.0.1:$port and a ping made it
# send this message. Test keys only, made for this capture.
message = $hex
initiator_private = $(cat "$tmp/initiator.key")
initiator_public = $initiator_pub
responder_private = $(cat "$tmp/responder.key")
responder_public = $responder_pub
TXT
echo "capture-initiation: wrote $out"
