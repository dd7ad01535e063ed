#!/usr/bin/env bash
# `make bench-serve` loads the servers with Debian's hey (a Go HTTP load generator: little CPU taken
# from the servers it measures, exact per-request latencies in its CSV); a test checks how the benchmark
# reads hey's output. Install it when it is missing and we are allowed to (root); otherwise say how
# (the benchmark then stops with the same advice, the test is skipped).
set -euo pipefail
if [ -x /usr/bin/hey ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing hey for the serving benchmark (apt-get)..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hey >/dev/null
else
  echo "hey is missing and this user cannot install it: run \`sudo apt-get install -y hey\`" >&2
fi
