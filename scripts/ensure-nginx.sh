#!/usr/bin/env bash
# The slow-client drill and the deploy tests run the shipped nginx config (deploy/nginx/nginx.conf) with
# Debian's nginx. Install it when it is missing and we are allowed to (root); otherwise say how (those
# tests then fail and name this script).
set -euo pipefail
if command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing nginx for the slow-client drill (apt-get)..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
  # Only the binary is needed: the tests start their own nginx on free ports. Debian's package may
  # start a service on port 80 where an init system runs; stop it so nothing else listens.
  if command -v systemctl >/dev/null && systemctl is-active --quiet nginx 2>/dev/null; then
    systemctl stop nginx || true
  fi
else
  echo "nginx is missing and this user cannot install it: run \`sudo apt-get install -y nginx\`" >&2
  exit 1
fi
