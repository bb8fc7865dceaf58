#!/usr/bin/env bash
# Just-in-time peers vs all peers, side by side, on one gateway with N
# registered peers (default N = 10,000, 100,000 and 1,000,000), wireguard-go
# backend (`backend = "userspace"`), SQLite store, unix API socket, release
# build, each run in a throwaway network namespace (root).
#
# For each N the store is populated once by a bulk SQL insert (not N CLI
# creates) and copied for each mode (`peers = "all"`, `peers = "jit"`).
# Each row of the table is one daemon start:
#   start      exec to the log line "ready: first sync done" (or the degraded
#              "ready, but …" line), or to the exit when it refuses to start
#              (expected for "all" past wireguard-go's 65,536 peers; the
#              error line is printed under the table)
#   rss        VmRSS of the daemon and of its wireguard-go, idle, after ready
#   cpu        the daemon's (and wireguard-go's) utime+stime over IDLE_S
#              seconds idle, as % of one core
#   kpeers     peers on the interface (`wg show IFACE peers`) after ready
#   create     `sixpn wireguard create` p50 / p99 over CREATES creates in a
#              row (CLI process start to exit)
#
# Run:  SIZES="10000 100000" scripts/bench-jit.sh
# Knobs: SIZES (default "10000 100000 1000000"), MODES ("all jit"),
#        CREATES (200), IDLE_S (10), READY_TIMEOUT (s, 900),
#        POPULATE_TIMEOUT (s, 900).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-10000 100000 1000000}
MODES=${MODES:-all jit}
CREATES=${CREATES:-200}
IDLE_S=${IDLE_S:-10}
READY_TIMEOUT=${READY_TIMEOUT:-900}
POPULATE_TIMEOUT=${POPULATE_TIMEOUT:-900}
command -v sqlite3 >/dev/null || { echo "needs sqlite3" >&2; exit 1; }
command -v python3 >/dev/null || { echo "needs python3" >&2; exit 1; }
command -v wireguard-go >/dev/null || { echo "needs wireguard-go" >&2; exit 1; }
cargo build --release --quiet
BIN="$PWD/target/release/sixpn"
DIR=$(mktemp -d /tmp/sixpn-bench-jit.XXXXXX)
NS=sixpn-jit-$$
IFACE=sxjit$$
IFACE=${IFACE:0:15}
PID=
TCK=$(getconf CLK_TCK)
export SIXPN_API="$DIR/api.sock"

stop_daemon() {
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
    kill -TERM "$PID" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$PID" 2>/dev/null || true
  fi
  [ -n "$PID" ] && wait "$PID" 2>/dev/null || true
  PID=
  if ip netns list | grep -qw "$NS"; then
    ip netns pids "$NS" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    sleep 0.2
    ip netns del "$NS" 2>/dev/null || true
  fi
  rm -f "/var/run/wireguard/$IFACE.sock"
}
cleanup() {
  set +e
  stop_daemon
  rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

config() { # $1 mode, $2 db
  cat > "$DIR/gw.toml" <<TOML
[gateway]
name = "bench-1"
region = "lhr"
host_id = "a7b:d6b"
interface = "$IFACE"
endpoint = "[::1]:51820"
private_key_file = "$DIR/gw.key"
backend = "userspace"
peers = "$1"
[store]
path = "$2"
[api]
socket = "$DIR/api.sock"
TOML
}

start_daemon() { # $1 log; sets PID, T0 (ns)
  ip netns add "$NS"
  ip -n "$NS" link set lo up
  rm -f "$DIR/api.sock"
  T0=$(date +%s%N)
  SIXPN_LOG=info ip netns exec "$NS" "$BIN" gateway --config "$DIR/gw.toml" >"$1" 2>&1 &
  PID=$!
}

cputicks() { # utime+stime of $1
  awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo -; }
wgpid() {
  local p
  for p in $(ip netns pids "$NS" 2>/dev/null); do
    [ "$(cat /proc/"$p"/comm 2>/dev/null)" = wireguard-go ] && { echo "$p"; return; }
  done
  echo ""
}
mib() { [ "$1" = - ] && echo - || awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }

# --- the base store: schema, the gateway registered, one org -------------
config all "$DIR/base.db"
start_daemon "$DIR/base.log"
for _ in $(seq 600); do "$BIN" orgs list >/dev/null 2>&1 && break; sleep 0.05; done
"$BIN" orgs create bench >/dev/null
stop_daemon
sqlite3 "$DIR/base.db" "PRAGMA wal_checkpoint(TRUNCATE);" >/dev/null

populate() { # $1 N, $2 db
  cp "$DIR/base.db" "$2"
  timeout "$POPULATE_TIMEOUT" python3 - "$2" "$1" <<'PY'
import base64, hashlib, sqlite3, sys, time
db, n = sys.argv[1], int(sys.argv[2])
c = sqlite3.connect(db, isolation_level=None)
c.execute("PRAGMA journal_mode = DELETE")
c.execute("PRAGMA synchronous = OFF")
c.execute("PRAGMA cache_size = -1000000")
(org,) = c.execute("SELECT id FROM orgs WHERE name = 'bench'").fetchone()
(gw,) = c.execute("SELECT name FROM gateways").fetchone()
now = int(time.time())
c.execute("BEGIN IMMEDIATE")
(rev,) = c.execute(
    "UPDATE meta SET value = value + 1 WHERE key = 'revision' RETURNING value").fetchone()
# One org holds (0x10000 - 0xa) * 256 slots per gateway: 1M fits in one.
rows = ((org, "p%d" % i, gw, i,
         base64.b64encode(hashlib.sha256(b"sixpn-bench-%d" % i).digest()).decode(),
         now, rev) for i in range(n))
c.executemany("INSERT INTO peers (org_id, name, gateway, slot, public_key, created_at, revision)"
              " VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
c.execute("COMMIT")
c.execute("PRAGMA journal_mode = WAL")
c.close()
PY
}

printf '%-8s %-4s %9s %10s %10s %8s %8s %8s %9s %9s\n' \
  N mode start_s sixpn_MiB wg-go_MiB cpu_%1c wgcpu_% kpeers create50 create99 \
  > "$DIR/table"
: > "$DIR/notes"

for N in $SIZES; do
  t=$(date +%s%N)
  populate "$N" "$DIR/pop.db"
  echo "N=$N: populated the store in $(( ($(date +%s%N) - t) / 1000000 )) ms ($(du -m "$DIR/pop.db" | cut -f1) MiB)" | tee -a "$DIR/notes"
  for MODE in $MODES; do
    cp "$DIR/pop.db" "$DIR/run.db"
    config "$MODE" "$DIR/run.db"
    LOG="$DIR/gw-$N-$MODE.log"
    start_daemon "$LOG"
    state=timeout
    deadline=$(( $(date +%s) + READY_TIMEOUT ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
      if grep -q "ready: first sync done\|ready, but" "$LOG" 2>/dev/null; then state=ready; break; fi
      kill -0 "$PID" 2>/dev/null || { state=exited; break; }
      sleep 0.02
    done
    t1=$(date +%s%N)
    start_s=$(awk -v d=$(( t1 - T0 )) 'BEGIN {printf "%.2f", d / 1e9}')
    # Anything the daemon said about the store or an error, whatever the state.
    grep -iE "error|warn" "$LOG" | grep -v "capture" | head -5 | sed "s/^/  N=$N $MODE: /" >> "$DIR/notes" || true
    grep -iE "capture|bulk|ready" "$LOG" | head -4 | sed "s/^/  N=$N $MODE log: /" >> "$DIR/notes" || true
    if [ "$state" != ready ]; then
      rc=-
      if [ "$state" = exited ]; then wait "$PID" && rc=0 || rc=$?; PID=; fi
      echo "  N=$N $MODE: $state after ${start_s} s (exit $rc); last log line: $(tail -n 1 "$LOG")" >> "$DIR/notes"
      printf '%-8s %-4s %9s %10s %10s %8s %8s %8s %9s %9s\n' \
        "$N" "$MODE" "$state:$start_s" - - - - - - - >> "$DIR/table"
      stop_daemon
      continue
    fi
    sleep 1
    WG=$(wgpid)
    d_rss=$(rss "$PID"); w_rss=-; [ -n "$WG" ] && w_rss=$(rss "$WG")
    c0=$(cputicks "$PID"); w0=0; [ -n "$WG" ] && w0=$(cputicks "$WG")
    sleep "$IDLE_S"
    c1=$(cputicks "$PID"); w1=0; [ -n "$WG" ] && w1=$(cputicks "$WG")
    cpu=$(awk -v d=$(( c1 - c0 )) -v t="$TCK" -v s="$IDLE_S" 'BEGIN {printf "%.2f", 100 * d / t / s}')
    wcpu=$(awk -v d=$(( w1 - w0 )) -v t="$TCK" -v s="$IDLE_S" 'BEGIN {printf "%.2f", 100 * d / t / s}')
    kpeers=$( (timeout 120 ip netns exec "$NS" wg show "$IFACE" peers 2>/dev/null || true) | wc -l)
    health=$(curl -s --max-time 10 --unix-socket "$DIR/api.sock" http://x/healthz || true)
    echo "  N=$N $MODE healthz: $health" >> "$DIR/notes"
    : > "$DIR/times"
    failed=0
    for i in $(seq 1 "$CREATES"); do
      c_0=$(date +%s%N)
      if ! timeout 60 "$BIN" wireguard create bench lhr "c$i" stdout >/dev/null 2>"$DIR/err"; then
        failed=$((failed + 1))
        [ "$failed" -eq 1 ] && echo "  N=$N $MODE: create c$i failed: $(head -c 300 "$DIR/err")" >> "$DIR/notes"
        [ "$failed" -ge 5 ] && break
        continue
      fi
      c_1=$(date +%s%N)
      echo $(( (c_1 - c_0) / 1000 )) >> "$DIR/times"
    done
    grep -q "has not installed" "$DIR/err" && echo "  N=$N $MODE: last create returned pending" >> "$DIR/notes"
    n=$(wc -l < "$DIR/times")
    if [ "$n" -gt 0 ]; then
      sort -n "$DIR/times" > "$DIR/sorted"
      p50=$(awk -v n="$n" 'NR==int((n+1)/2) {printf "%.1fms", $1/1000}' "$DIR/sorted")
      p99=$(awk -v n="$n" 'NR==(int(n*0.99) > 0 ? int(n*0.99) : 1) {printf "%.1fms", $1/1000}' "$DIR/sorted")
    else
      p50=-; p99=-
    fi
    [ "$n" -ne "$CREATES" ] && echo "  N=$N $MODE: only $n of $CREATES creates succeeded" >> "$DIR/notes"
    d_rss2=$(rss "$PID")
    echo "  N=$N $MODE: daemon RSS after the creates $(mib "$d_rss2") MiB" >> "$DIR/notes"
    printf '%-8s %-4s %9s %10s %10s %8s %8s %8s %9s %9s\n' \
      "$N" "$MODE" "$start_s" "$(mib "$d_rss")" "$(mib "$w_rss")" "$cpu" "$wcpu" "$kpeers" "$p50" "$p99" >> "$DIR/table"
    stop_daemon
    tail -n 1 "$DIR/table"
  done
  rm -f "$DIR"/pop.db* "$DIR"/run.db*
done

echo
echo "sixpn $(git rev-parse --short HEAD), wireguard-go backend, one gateway, $(nproc) cores"
cat "$DIR/table"
echo
cat "$DIR/notes"
