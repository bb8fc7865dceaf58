#!/usr/bin/env bash
# The client: stock wg-quick on the file the gateway's `sixpn wireguard create`
# wrote (run `vagrant provision client` after the gateway is up).
set -euo pipefail
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wireguard-tools
if [ -f /sixpn/vagrant/laptop.conf ]; then
  install -m 0600 /sixpn/vagrant/laptop.conf /etc/wireguard/laptop.conf
  sed -i '/^DNS/d' /etc/wireguard/laptop.conf
  wg-quick down laptop 2>/dev/null || true
  wg-quick up laptop
  ping -6 -c 3 fdaa:0:1::3
fi
