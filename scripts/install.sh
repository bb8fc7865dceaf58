#!/usr/bin/env bash
# Installs sixpn on this host as a systemd service: the release binary in
# /usr/local/bin, the unit, and an example config in /etc/sixpn (kept if one
# is there). Then: edit /etc/sixpn/gateway.toml; systemctl enable --now
# sixpn-gateway; sixpn doctor.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked
install -m 0755 target/release/sixpn /usr/local/bin/sixpn
install -m 0644 systemd/sixpn-gateway.service /etc/systemd/system/sixpn-gateway.service
install -d -m 0755 /etc/sixpn
[ -e /etc/sixpn/gateway.toml ] || install -m 0644 systemd/gateway.toml.example /etc/sixpn/gateway.toml
if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
echo "installed: /usr/local/bin/sixpn, sixpn-gateway.service, /etc/sixpn/gateway.toml"
echo "next: edit /etc/sixpn/gateway.toml, then: systemctl enable --now sixpn-gateway && sixpn doctor"
