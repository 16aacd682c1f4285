#!/usr/bin/env bash
# Runs every test: installs moto if needed (the tests start it themselves), then cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-moto.sh
cargo test -- --test-threads 2
