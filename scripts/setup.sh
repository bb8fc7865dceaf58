#!/usr/bin/env bash
# Installs what sixpn's build, demo and tests need on a Debian/Ubuntu machine
# (run as root). Idempotent: installs only what is missing.
set -euo pipefail

pkgs=(
  build-essential pkg-config ca-certificates curl   # building the crate
  iproute2 iputils-ping procps psmisc               # namespaces, ping, pkill
  wireguard-tools wireguard-go                      # wg, wg-quick, userspace WireGuard
  nftables                                          # nft
  dnsutils dnsmasq-base                             # dig; an upstream resolver for the DNS tests
  sqlite3 jq                                        # inspecting state in tests and the demo
  systemd ruby                                      # systemd-analyze verify; ruby -c on the Vagrantfile
  etcd-server protobuf-compiler                     # the fleet store: etcd for tests, protoc for etcd-client
  openssl util-linux                                # test certificates for the HTTPS API; prlimit
)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: installing the Rust toolchain with rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
  export PATH="$HOME/.cargo/bin:$PATH"
fi
