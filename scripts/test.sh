#!/usr/bin/env bash
# Runs every test against moto, then the integration suites again against Ceph RGW (unit and
# doc tests do not touch a server, so they run once). Installs what each server needs first:
# moto into .venv (scripts/setup-moto.sh), Ceph's apt packages when missing (scripts/rgw.sh).
# The tests start their servers themselves (one per test binary) and stop them when they end.
#
#   S3_BACKFILL_TEST_SERVERS="moto rgw"   which passes to run (default both, in this order)
set -euo pipefail
cd "$(dirname "$0")/.."
for server in ${S3_BACKFILL_TEST_SERVERS:-moto rgw}; do
  case "$server" in
    moto)
      bash scripts/setup-moto.sh
      echo "== every test, against moto"
      S3_BACKFILL_TEST_SERVER=moto cargo test -- --test-threads 2
      ;;
    rgw)
      bash scripts/rgw.sh install
      echo "== integration tests, against Ceph RGW"
      S3_BACKFILL_TEST_SERVER=rgw cargo test --test '*' -- --test-threads 2
      ;;
    *)
      echo "unknown server $server in S3_BACKFILL_TEST_SERVERS (expected moto, rgw)" >&2
      exit 2
      ;;
  esac
done
