#!/usr/bin/env bash
# Installs the moto S3 server into .venv (once). Used by the demo, the tests and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/moto_server ]; then
  exit 0
fi
if ! python3 -m venv .venv 2>/dev/null; then
  # Debian's python3 needs the venv package.
  apt-get update -qq && apt-get install -y -qq python3-venv
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check 'moto[s3]' flask flask-cors
echo "moto installed in .venv ($(.venv/bin/pip show moto | sed -n 's/^Version: //p'))"
