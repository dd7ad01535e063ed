#!/usr/bin/env bash
# Install the Debian packages the tests and benchmarks run, when they are missing and we may (root):
#   chromium  the browser tests drive Debian's Chromium through Playwright (it cannot download its own)
#   nginx     the slow-client drill and the deploy tests run the shipped deploy/nginx/nginx.conf
#   hey       `make bench-serve` loads the servers with it (a Go load generator: little CPU taken from
#             the servers it measures); tests/test_benchmark_report.py reads its real output
#   redis-server  tests/serving/test_ratelimit_redis.py shares rate limits through a real Redis
# Usage: ensure-debian-packages.sh PACKAGE... (a package named with a trailing "!" is required: its
# absence fails the script; the others only warn, and the tests that need them skip and say so).
# One `apt-get update` for all that are missing.
set -euo pipefail

binary_of() {
  case "$1" in
    chromium) echo /usr/bin/chromium ;;
    nginx) echo /usr/sbin/nginx ;;
    *) echo "/usr/bin/$1" ;;
  esac
}

missing=() required_missing=()
for spec in "$@"; do
  pkg="${spec%!}"
  if [ -x "$(binary_of "$pkg")" ] || command -v "$pkg" >/dev/null; then continue; fi
  missing+=("$pkg")
  if [ "$spec" != "$pkg" ]; then required_missing+=("$pkg"); fi
done
[ "${#missing[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing ${missing[*]} for the tests (apt-get)..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # Only nginx's binary is needed: the tests start their own on free ports. Debian's package may
  # start a service on port 80 where an init system runs; stop it so nothing else listens.
  # The same for redis-server (port 6379).
  for service in nginx redis-server; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$service" 2>/dev/null; then
      systemctl stop "$service" || true
    fi
  done
  exit 0
fi
echo "missing and this user cannot install them: ${missing[*]}; run \`sudo apt-get install -y ${missing[*]}\`" >&2
if [ "${#required_missing[@]}" -gt 0 ]; then exit 1; fi
