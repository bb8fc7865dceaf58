#!/usr/bin/env bash
# Issue-5 figures: sixpn's `.internal` DNS against NSD and Unbound serving
# the same data (APPS apps × 3 instances with their TXT records, PEERS
# peers), all three in one network namespace in one run, queried by
# dnsperf. Reports QPS and each server's CPU time per query (utime+stime
# from /proc/PID/stat over the run, divided by the queries answered), then
# the daemon's memory with BIG (default 100,000) instances.
#
# The zone file NSD and Unbound load is made from sixpn's own answers on the
# same store (examples/dns_bench_data.rs), so all three serve the same
# RRsets. Needs root; installs nsd, unbound, dnsperf, wireguard-go, dig if
# missing. Leaves nothing behind (namespace, processes, temp dir).
#
#   scripts/bench-dns.sh                      # defaults
#   APPS=1000 PEERS=1000 SECS=10 BIG=100000 scripts/bench-dns.sh
set -euo pipefail
cd "$(dirname "$0")/.."
APPS=${APPS:-1000}
PEERS=${PEERS:-1000}
SECS=${SECS:-10}
BIG=${BIG:-100000}
export PATH="$HOME/.cargo/bin:$PATH"

[ "$(id -u)" = 0 ] || { echo "bench-dns.sh: needs root (network namespace, port 53)" >&2; exit 1; }
missing=()
for t in nsd:nsd unbound:unbound dnsperf:dnsperf wireguard-go:wireguard-go dig:dnsutils wg:wireguard-tools; do
  command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

TARGET=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release --quiet --bin sixpn --example dns_bench_data
BIN="$TARGET/release/sixpn"
GEN="$TARGET/release/examples/dns_bench_data"

DIR=$(mktemp -d /tmp/sixpn-dnsbench.XXXXXX)
chmod 755 "$DIR"
NS=sxdns-$$
IFACE=sxdns$(( $$ % 100000 ))
CLIENT=fdaa:0:1:ffff::1      # inside org bench's /48: sixpn refuses others
SIXPN_ADDR=fdaa:0:1::3
NSD_ADDR=fd00:b::1
UNBOUND_ADDR=fd00:b::2
HZ=$(getconf CLK_TCK)
GW_PID=""; NSD_PID=""; UNBOUND_PID=""

cleanup() {
  set +e
  for p in $GW_PID $NSD_PID $UNBOUND_PID; do kill "$p" 2>/dev/null; done
  for p in $GW_PID $NSD_PID $UNBOUND_PID; do wait "$p" 2>/dev/null; done
  # Whatever else runs in our namespace (wireguard-go, nsd's children).
  for p in $(ip netns pids "$NS" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
  ip netns del "$NS" 2>/dev/null
  rm -f "/var/run/wireguard/$IFACE.sock"
  rm -rf "$DIR"
}
trap cleanup EXIT

ip netns add "$NS"
ip -n "$NS" link set lo up
for a in $CLIENT $NSD_ADDR $UNBOUND_ADDR; do
  ip -n "$NS" -6 addr add "$a/128" dev lo nodad
done
in_ns() { ip netns exec "$NS" "$@"; }

echo "== data: $APPS apps × 3 instances, $PEERS peers"
"$GEN" --db "$DIR/state.db" --apps "$APPS" --per-app 3 --peers "$PEERS" \
  --zone "$DIR/internal.zone" --queries "$DIR/queries.txt"

start_gateway() { # DB
  cat > "$DIR/gw.toml" <<TOML
[gateway]
name = "bench-1"
region = "lhr"
host_id = "a7b:d6b"
interface = "$IFACE"
endpoint = "[::1]:51820"
private_key_file = "$DIR/gw.key"
backend = "userspace"
[store]
path = "$1"
[api]
socket = "$DIR/api.sock"
[dns]
upstream = ["[::1]:1"]
TOML
  SIXPN_LOG=warn,sixpn::dns=debug ip netns exec "$NS" "$BIN" gateway --config "$DIR/gw.toml" \
    >>"$DIR/gw.log" 2>&1 &
  GW_PID=$!
}

# Waits until SERVER answers NAME (AAAA) with NOERROR and data.
wait_answer() { # SERVER NAME [TRIES]
  for _ in $(seq "${3:-200}"); do
    if in_ns dig -b "$CLIENT" "@$1" +time=1 +tries=1 +short "$2" AAAA 2>/dev/null | grep -q :; then
      return 0
    fi
    sleep 0.1
  done
  echo "no answer for $2 from $1" >&2
  return 1
}

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

# Total RSS (KiB) of the processes in the namespace of program $1.
rss_comm() {
  local sum=0 p
  for p in $(ip netns pids "$NS"); do
    is_prog "$p" "$1" && sum=$(( sum + $(rss_kib "$p") ))
  done
  echo "$sum"
}

# Whether process $1 is program $2 (NSD renames its processes "nsd: main",
# "nsd: server 1", "nsd: xfrd").
is_prog() {
  case "$(cat "/proc/$1/comm" 2>/dev/null)" in "$2" | "$2: "*) return 0 ;; esac
  return 1
}

# "utime stime" (ticks) of all processes in the namespace of program $1.
cpu_ticks() {
  local u=0 s=0 p f
  for p in $(ip netns pids "$NS"); do
    is_prog "$p" "$1" || continue
    # Fields 14 and 15, counted after the ")" that ends the command name.
    read -r -a f <<<"$(sed 's/.*) //' "/proc/$p/stat")"
    u=$(( u + f[11] )); s=$(( s + f[12] ))
  done
  echo "$u $s"
}
ticks_sum() { echo $(( $1 + $2 )); }

echo "== sixpn"
start_gateway "$DIR/state.db"
wait_answer "$SIXPN_ADDR" "app-$(printf %05d $((APPS - 1))).internal"
LAST_APP="app-$(printf %05d $((APPS - 1)))"

echo "== nsd $(nsd -v 2>&1 | head -1 | awk '{print $3}')"
cat > "$DIR/nsd.conf" <<CONF
server:
  ip-address: $NSD_ADDR
  port: 53
  server-count: 1
  username: ""
  chroot: ""
  zonesdir: "$DIR"
  pidfile: "$DIR/nsd.pid"
  database: ""
  zonelistfile: "$DIR/zone.list"
  xfrdfile: "$DIR/xfrd.state"
  xfrdir: "$DIR"
  logfile: "$DIR/nsd.log"
  verbosity: 0
remote-control:
  control-enable: no
zone:
  name: "internal"
  zonefile: "$DIR/internal.zone"
CONF
in_ns nsd -d -c "$DIR/nsd.conf" >>"$DIR/nsd.log" 2>&1 &
NSD_PID=$!
wait_answer "$NSD_ADDR" "$LAST_APP.internal" || { cat "$DIR/nsd.log"; exit 1; }

echo "== unbound $(unbound -V 2>&1 | head -1 | awk '{print $2}')"
cat > "$DIR/unbound.conf" <<CONF
server:
  interface: $UNBOUND_ADDR
  port: 53
  do-ip4: no
  num-threads: 1
  chroot: ""
  username: ""
  directory: "$DIR"
  pidfile: "$DIR/unbound.pid"
  use-syslog: no
  logfile: "$DIR/unbound.log"
  verbosity: 0
  access-control: ::/0 allow
  local-zone: "internal." nodefault
auth-zone:
  name: "internal."
  zonefile: "$DIR/internal.zone"
  for-downstream: yes
  for-upstream: no
  fallback-enabled: no
CONF
in_ns unbound -d -c "$DIR/unbound.conf" >>"$DIR/unbound.log" 2>&1 &
UNBOUND_PID=$!
wait_answer "$UNBOUND_ADDR" "$LAST_APP.internal" || { cat "$DIR/unbound.log"; exit 1; }

echo "== same answers from all three"
for q in "$LAST_APP.internal AAAA" "top2.nearest.of.app-00007.internal AAAA" \
         "i5x2.vm.app-00005.internal AAAA" "vms.app-00042.internal TXT" \
         "peer-0017._peer.internal AAAA" "_apps.internal TXT"; do
  ref=""
  for s in $SIXPN_ADDR $NSD_ADDR $UNBOUND_ADDR; do
    # shellcheck disable=SC2086
    got=$(in_ns dig -b "$CLIENT" "@$s" +tcp +time=2 +tries=1 +short $q | sort | md5sum)
    if [ -z "$ref" ]; then ref=$got; elif [ "$got" != "$ref" ]; then
      echo "MISMATCH for $q from $s" >&2; exit 1
    fi
  done
  echo "  $q: identical"
done

# The daemon's own background work (reconcile passes, WireGuard reads) over
# one run's length, to know what part of its CPU isn't DNS.
# shellcheck disable=SC2046
idle0=$(ticks_sum $(cpu_ticks sixpn)); sleep "$SECS"
# shellcheck disable=SC2046
idle1=$(ticks_sum $(cpu_ticks sixpn))
idle_ms=$(( (idle1 - idle0) * 1000 / HZ ))

echo "== dnsperf: $SECS s each, $(wc -l < "$DIR/queries.txt") query lines (AAAA of apps, regions, top1, instances, peers; TXT of vms), from $CLIENT"
printf '%-10s %10s %10s %8s %12s %14s %18s\n' server QPS completed lost "latency ms" "CPU µs/query" "(user + sys)"
declare -A RESULT
for entry in "sixpn $SIXPN_ADDR" "nsd $NSD_ADDR" "unbound $UNBOUND_ADDR"; do
  read -r name addr <<<"$entry"
  comm=$name
  read -r u0 s0 <<<"$(cpu_ticks "$comm")"
  in_ns dnsperf -s "$addr" -a "$CLIENT" -d "$DIR/queries.txt" -l "$SECS" >"$DIR/perf-$name.txt" 2>&1
  read -r u1 s1 <<<"$(cpu_ticks "$comm")"
  done_q=$(awk '/Queries completed:/ {print $3}' "$DIR/perf-$name.txt")
  lost=$(awk '/Queries lost:/ {print $3}' "$DIR/perf-$name.txt")
  qps=$(awk '/Queries per second:/ {printf "%.0f", $4}' "$DIR/perf-$name.txt")
  lat=$(awk '/Average Latency/ {printf "%.3f", $4 * 1000}' "$DIR/perf-$name.txt")
  per_q() { awk -v t="$1" -v hz="$HZ" -v n="$done_q" 'BEGIN {printf "%.2f", t * 1e6 / hz / n}'; }
  us=$(per_q $(( u1 - u0 + s1 - s0 )))
  split="$(per_q $(( u1 - u0 ))) + $(per_q $(( s1 - s0 )))"
  RESULT[$name]=$us
  printf '%-10s %10s %10s %8s %12s %14s %18s\n' "$name" "$qps" "$done_q" "$lost" "$lat" "$us" "($split)"
done
echo "  (sixpn's background work while idle: ${idle_ms} ms CPU per ${SECS} s, included above)"
awk -v s="${RESULT[sixpn]}" -v n="${RESULT[nsd]}" -v u="${RESULT[unbound]}" \
  'BEGIN {printf "  sixpn CPU per query: %.2f× NSD, %.2f× Unbound\n", s / n, s / u}'
echo "  RSS: sixpn $(rss_kib "$GW_PID") KiB, nsd $(rss_comm nsd) KiB (all its processes), unbound $(rss_comm unbound) KiB"

[ "$BIG" -gt 0 ] || exit 0
echo "== memory with $BIG instances"
kill "$GW_PID"; wait "$GW_PID" 2>/dev/null || true; GW_PID=""
rm -f "$DIR/api.sock"
PER=10
"$GEN" --db "$DIR/big.db" --apps $((BIG / PER)) --per-app "$PER" --peers "$PEERS"
: > "$DIR/gw.log"
start_gateway "$DIR/big.db"
wait_answer "$SIXPN_ADDR" "app-$(printf %05d $((BIG / PER - 1))).internal" 600
sleep 1
echo "  sixpn RSS with $((BIG / PER)) apps × $PER instances ($BIG) and $PEERS peers: $(rss_kib "$GW_PID") KiB"
grep -o 'took_us=[0-9]*' "$DIR/gw.log" | tail -1 | sed 's/took_us=/  zone rebuild (build, swap, heap trim): /; s/$/ µs/'
