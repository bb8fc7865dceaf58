#!/usr/bin/env bash
# The gateway VM: sixpn from the synced tree as its systemd unit, a demo org,
# app instance and peer; the peer's wg-quick file is left in /sixpn/vagrant.
set -euo pipefail
/sixpn/scripts/install.sh
sed -i -e 's/^endpoint = .*/endpoint = "[fd53:1::1]:51820"/' /etc/sixpn/gateway.toml
systemctl enable --now sixpn-gateway
for _ in $(seq 60); do sixpn orgs list >/dev/null 2>&1 && break; sleep 1; done
sixpn orgs list | grep -q '^demo ' || sixpn orgs create demo
sixpn instances list demo | grep -q hello || \
  sixpn instances add demo hello lhr --host a7b:7d --machine f066:b83b
ip -6 route replace fdaa:0:1:a7b:7d::/80 via fd53:2::2
rm -f /sixpn/vagrant/laptop.conf
sixpn wireguard list demo | grep -q '^laptop ' && sixpn wireguard remove demo laptop
sixpn wireguard create demo lhr laptop /sixpn/vagrant/laptop.conf
sixpn doctor
