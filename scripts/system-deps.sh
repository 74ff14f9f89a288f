#!/usr/bin/env bash
# Installs the real binaries the tests run against (Debian packages: the Prometheus tools, wrk,
# redis-server), or says how.
# Called by `make test`; safe to run again: it installs only what is missing.
set -euo pipefail

need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v amtool >/dev/null || need+=(prometheus-alertmanager)
command -v prometheus-pushgateway >/dev/null || [ -x /usr/bin/prometheus-pushgateway ] || need+=(prometheus-pushgateway)
command -v wrk >/dev/null || need+=(wrk)
command -v redis-server >/dev/null || need+=(redis-server)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "tokenbooth tests need: ${need[*]} (Debian/Ubuntu packages)." >&2
  echo "Install them with: sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "tokenbooth tests need the Prometheus tools (${need[*]}); install them with your package manager." >&2
  exit 1
fi
echo "installing ${need[*]} ..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# --no-install-recommends: the binaries only; the packages' services are not started here (no systemd)
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
