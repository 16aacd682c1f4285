#!/usr/bin/env bash
# `follow` under a steady writer: replication lag, copies/s and CPU, with events and with
# polling, one line per server and mode.
#
#   bash benches/follow.sh
#
# Settings (environment):
#   FOLLOW_BENCH_SERVERS="rgw moto"   servers to run on: rgw (events: an RGW topic pushing to
#                                     follow's HTTP endpoint), moto (events: S3 -> SQS)
#   FOLLOW_BENCH_MODES="events events-drop5 poll"
#                                     events: every event reaches follow (the event path's
#                                     own lag); events-drop5: the relay drops 5% as in the
#                                     tests and a reconcile every FOLLOW_BENCH_RECONCILE
#                                     seconds (default 15) finds what they missed; poll:
#                                     --poll-interval 2
#   FOLLOW_TEST_SECS=60               how long the writer writes
#   FOLLOW_TEST_RATE=20               writes per second (puts of new keys, overwrites, deletes)
#   FOLLOW_BENCH_PROFILE=release      cargo profile of the test binary and of s3-backfill
#
# Each line is one run of the scenario of tests/follow.rs (`bench_steady_write`, ignored in the
# suite): a backfill of 30 keys, then `follow` (never killed here) while the writer writes,
# then `follow --until-caught-up`, and the replica check of every key's history. The servers
# are the ones the tests start (scripts/rgw.sh, the moto of scripts/setup-moto.sh; one per
# run), the notifications are wired by scripts/events.py. Figures:
#   lag p50/p99/p99.9/max   from `status --json` (lag.since_start): destination write done -
#                           source version's last-modified, for every version follow wrote
#   copies/s                versions follow copied / seconds from its start to caught up
#                           (bounded by the writer's rate: this is a steady state, not a peak)
#   cpu                     user + system seconds of every follow process (wait4), and that
#                           over the same wall time
#   catch-up                seconds `follow --until-caught-up` took after the writer stopped
#                           (it waits for a clean reconcile, a full listing)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SERVERS="${FOLLOW_BENCH_SERVERS:-rgw moto}"
MODES="${FOLLOW_BENCH_MODES:-events events-drop5 poll}"
SECS="${FOLLOW_TEST_SECS:-60}"
RATE="${FOLLOW_TEST_RATE:-20}"
PROFILE="${FOLLOW_BENCH_PROFILE:-release}"

die() {
  echo "follow bench: error: $*" >&2
  exit 1
}

cd "$ROOT"
for server in $SERVERS; do
  case "$server" in
    moto) bash scripts/setup-moto.sh >&2 ;;
    rgw) bash scripts/rgw.sh install >&2 ;;
    *) die "unknown server $server in FOLLOW_BENCH_SERVERS (expected rgw, moto)" ;;
  esac
done
echo "follow bench: building the test binary ($PROFILE)" >&2
cargo test --profile "$PROFILE" --test follow --no-run >&2

WORK="$(mktemp -d "${TMPDIR:-/tmp}/follow-bench.XXXXXX")"
printf '%-5s %-12s %9s %9s %9s %9s %9s %8s %10s %9s %9s\n' server mode "p50 ms" "p99 ms" \
  "p99.9 ms" "max ms" "copies/s" "writes/s" "cpu s" "cpu %" "catch-up"
failed=0
for server in $SERVERS; do
  for mode in $MODES; do
    log="$WORK/$server-$mode.log"
    if ! S3_BACKFILL_TEST_SERVER="$server" FOLLOW_BENCH_MODE="$mode" FOLLOW_TEST_SECS="$SECS" \
      FOLLOW_TEST_RATE="$RATE" cargo test -q --profile "$PROFILE" --test follow -- \
      --ignored --exact bench_steady_write --nocapture >"$log" 2>&1; then
      echo "follow bench: $server $mode failed; last lines:" >&2
      tail -n 30 "$log" >&2
      failed=1
      continue
    fi
    line="$(grep '^BENCH ' "$log" | tail -n 1)"
    if [ -z "$line" ]; then
      echo "follow bench: $server $mode printed no figures; last lines:" >&2
      tail -n 30 "$log" >&2
      failed=1
      continue
    fi
    # key=value fields of the BENCH line.
    get() { tr ' ' '\n' <<<"$line" | sed -n "s/^$1=//p"; }
    printf '%-5s %-12s %9s %9s %9s %9s %9s %8s %10s %9s %8ss\n' "$server" "$mode" \
      "$(get lag_p50_ms)" "$(get lag_p99_ms)" "$(get lag_p999_ms)" "$(get lag_max_ms)" \
      "$(get copies_per_s)" "$(get write_rate | tr -d /s)" "$(get follow_cpu_s)" \
      "$(get follow_cpu_pct)" "$(get catchup_s)"
  done
done
if [ "$failed" = 0 ]; then
  rm -rf "$WORK"
else
  echo "follow bench: the runs' output is in $WORK" >&2
fi
exit "$failed"
