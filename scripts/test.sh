#!/usr/bin/env bash
# Runs every test against moto, then the integration suites again against Ceph RGW (unit and
# doc tests do not touch a server, so they run once). Installs what each server needs first:
# moto into .venv (scripts/setup-moto.sh), Ceph's apt packages when missing (scripts/rgw.sh),
# and PostgreSQL 15's for the PostgreSQL manifest's tests, which run in both passes (scripts/pg.sh).
# The tests start their servers themselves (one per test binary) and stop them when they end.
# Every pass runs to its end (--no-fail-fast); the exit status is non-zero if any test failed.
#
#   S3_BACKFILL_TEST_SERVERS="moto rgw"   which passes to run (default both, in this order)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/pg.sh install
failed=()
for server in ${S3_BACKFILL_TEST_SERVERS:-moto rgw}; do
  case "$server" in
    moto)
      bash scripts/setup-moto.sh
      echo "== every test, against moto"
      S3_BACKFILL_TEST_SERVER=moto cargo test --no-fail-fast -- --test-threads 2 || failed+=(moto)
      ;;
    rgw)
      bash scripts/rgw.sh install
      echo "== integration tests, against Ceph RGW"
      S3_BACKFILL_TEST_SERVER=rgw cargo test --no-fail-fast --test '*' -- --test-threads 2 ||
        failed+=(rgw)
      ;;
    *)
      echo "unknown server $server in S3_BACKFILL_TEST_SERVERS (expected moto, rgw)" >&2
      exit 2
      ;;
  esac
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "== tests failed against: ${failed[*]}" >&2
  exit 1
fi
echo "== all tests passed"
