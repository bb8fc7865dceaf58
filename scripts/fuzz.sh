#!/usr/bin/env bash
# Fuzzes the DNS query path (fuzz/fuzz_targets/dns_answer.rs) for a bounded
# time: SECS seconds (default 60). Needs a nightly toolchain and cargo-fuzz
# (`cargo install cargo-fuzz`); without them it says so and exits 0, unless
# FUZZ_REQUIRED=1. The proptests in src/dns/handler.rs cover the same path
# on stable in every `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
export PATH="$HOME/.cargo/bin:$PATH"
SECS=${SECS:-60}
if ! cargo +nightly --version >/dev/null 2>&1 || ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: needs rustup's nightly toolchain and cargo-fuzz; skipping" >&2
  [ "${FUZZ_REQUIRED:-0}" = 1 ] && exit 1
  exit 0
fi
target_dir=${CARGO_TARGET_DIR:-$PWD/target}/fuzz
# A scratch corpus seeded from the committed seeds; new inputs stay out of git.
corpus=$(mktemp -d /tmp/sixpn-fuzz-corpus.XXXXXX)
trap 'rm -rf "$corpus"' EXIT
cp corpus/dns_answer/seed-* "$corpus/"
cargo +nightly fuzz run --target-dir "$target_dir" dns_answer "$corpus" -- \
  -max_total_time="$SECS" -dict=dns.dict -print_final_stats=1
