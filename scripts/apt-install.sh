#!/usr/bin/env bash
# Installs Debian packages quietly, as root or through sudo: the install step that
# scripts/rgw.sh and scripts/pg.sh share (each checks first whether it is needed).
#
#   bash scripts/apt-install.sh PACKAGE...
set -euo pipefail
[ $# -gt 0 ] || {
  echo "usage: apt-install.sh PACKAGE..." >&2
  exit 2
}
sudo=()
if [ "$(id -u)" != 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "error: installing $* needs root (or sudo)" >&2
    exit 1
  fi
  sudo=(sudo)
fi
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  "$@" >/dev/null
