#!/usr/bin/env bash
# The instance host: the demo instance's 6PN address, 6PN routed via the gateway.
set -euo pipefail
ip -6 addr replace fdaa:0:1:a7b:7d:f066:b83b:2/128 dev lo
ip -6 route replace fdaa::/16 via fd53:2::1
