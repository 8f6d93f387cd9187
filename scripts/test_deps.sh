#!/usr/bin/env bash
# What the test suite needs beyond `pip install ".[dev]"` (part of the README's test command):
#   - nginx, the real HTTP server with range requests that the remote-reading tests start on a
#     free port (from the distribution's packages: Debian/Ubuntu apt, as root or with sudo);
#   - vLLM's patch module, unmodified from its PyPI wheel (scripts/fetch_vllm.py says why).
# Usage: bash scripts/test_deps.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  if ! command -v apt-get >/dev/null; then
    echo "test_deps: nginx is missing and there is no apt-get: install nginx with this system's package manager" >&2
    exit 1
  fi
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get install -y nginx-light >/dev/null 2>&1 \
    || { $sudo apt-get update >/dev/null && $sudo apt-get install -y nginx-light >/dev/null; }
fi
python3 scripts/fetch_vllm.py
