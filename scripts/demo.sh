#!/usr/bin/env bash
# The local demo: installs and starts a local S3 server (moto; or Ceph RGW with
# DEMO_SERVER=rgw), seeds a versioned bucket with versions, delete markers and odd keys,
# replicates it with s3-backfill, shows status and verifies the destination against the
# source. Everything stays on 127.0.0.1, and the server stops when the demo ends.
#
#   bash scripts/demo.sh --keep   the same, but the server keeps running afterwards with the
#                                 seeded buckets (a playground): the demo prints the environment
#                                 and commands to try next, and how to stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
SERVER="${DEMO_SERVER:-moto}"
KEEP=0
for arg in "$@"; do
  case "$arg" in
    --keep) KEEP=1 ;;
    *)
      echo "usage: bash scripts/demo.sh [--keep]" >&2
      exit 2
      ;;
  esac
done
WORK="$(mktemp -d)"
if [ "$KEEP" = 1 ]; then
  WORK="$PWD/demo"
  rm -rf "$WORK" && mkdir -p "$WORK"
fi
STEPS=6
step() { echo "== [$1/$STEPS] $2"; }

cleanup() {
  if [ -n "${TICKER:-}" ]; then kill "$TICKER" 2>/dev/null || true; fi
  [ "$KEEP" = 1 ] && return
  if [ -n "${MOTO:-}" ]; then kill "$MOTO" 2>/dev/null || true; fi
  if [ "$SERVER" = rgw ]; then bash scripts/rgw.sh stop "$WORK/rgw" >/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

step 1 "installing the local S3 server ($SERVER) if needed"
if [ ! -x .venv/bin/moto_server ]; then
  echo "installing moto into .venv with pip (about 10-40 s, quiet while it downloads)"
fi
bash scripts/setup-moto.sh # the seeding below uses boto3 from moto's .venv
if [ "$SERVER" = rgw ]; then bash scripts/rgw.sh install; fi

step 2 "building s3-backfill (the first build takes about 7 min on 2 cores; later builds take seconds)"
# The binary only: the dependencies are built with the features the tests use too (see
# Cargo.toml), so scripts/test.sh then builds the test binaries and nothing else again.
# cargo says nothing while it compiles and links the crate itself (a few minutes on the
# first build): a line every 30 s says the build is still going.
BUILD_START=$SECONDS
(while sleep 30; do echo "   ... still building ($((SECONDS - BUILD_START)) s so far)"; done) &
TICKER=$!
cargo build
kill "$TICKER" 2>/dev/null || true
TICKER=""
echo "   built in $((SECONDS - BUILD_START)) s"
BIN=target/debug/s3-backfill

step 3 "starting $SERVER on 127.0.0.1"
case "$SERVER" in
  moto)
    PORT="${DEMO_PORT:-4599}"
    EP="http://127.0.0.1:$PORT"
    if [ "$KEEP" = 1 ]; then
      # Left running after the demo: its own session, so it outlives this script.
      setsid .venv/bin/moto_server -H 127.0.0.1 -p "$PORT" >"$WORK/moto.log" 2>&1 < /dev/null &
    else
      .venv/bin/moto_server -H 127.0.0.1 -p "$PORT" >"$WORK/moto.log" 2>&1 &
    fi
    MOTO=$!
    for _ in $(seq 100); do curl -s -o /dev/null "$EP" && break; sleep 0.1; done
    ;;
  rgw)
    # A single-node cluster (~3 s); the watchdog stops it if this script is killed.
    if [ "$KEEP" = 1 ]; then
      EP="$(bash scripts/rgw.sh start "$WORK/rgw" | tail -n 1)"
    else
      EP="$(bash scripts/rgw.sh start "$WORK/rgw" --owner $$ | tail -n 1)"
    fi
    ;;
  *)
    echo "DEMO_SERVER=$SERVER: expected moto or rgw" >&2
    exit 2
    ;;
esac
echo "S3 endpoint: $EP"

# The user scripts/rgw.sh creates; moto accepts any keys.
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing-secret AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true

step 4 "seeding s3://demo-source (versioned): 3 rounds of versions and delete markers"
.venv/bin/python - "$EP" <<'PY'
import sys, time, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1")
for b in ("demo-source", "demo-dest"):
    s3.create_bucket(Bucket=b)
    s3.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": "Enabled"})
keys = [f"photos/{i:03}.jpg" for i in range(40)] + ["odd/space key+plus%pct?#.txt", "odd/ünïcødé.txt"]
for rnd in range(3):
    for i, k in enumerate(keys):
        if rnd == 2 and i % 4 == 0:
            s3.delete_object(Bucket="demo-source", Key=k)
        else:
            s3.put_object(Bucket="demo-source", Key=k, Body=f"{k} v{rnd}".encode() * (i + 1),
                          ContentType="image/jpeg", Metadata={"rev": str(rnd)}, Tagging=f"round={rnd}")
    time.sleep(1.1)
print(f"{len(keys)} keys, 3 rounds of versions and delete markers")
PY

step 5 "replicate s3://demo-source -> s3://demo-dest/backup/ (copying while it lists)"
"$BIN" replicate --source s3://demo-source --dest s3://demo-dest/backup/ \
  --manifest "$WORK/job.db" --source-endpoint "$EP" --dest-endpoint "$EP" --path-style \
  --delete-markers --concurrency 16
echo "-- status"
"$BIN" status --manifest "$WORK/job.db"

step 6 "verify: both buckets listed, every key's history compared"
"$BIN" verify --manifest "$WORK/job.db"
if [ "$KEEP" = 0 ]; then
  echo "== done: the replica is identical (the server stops now)"
  exit 0
fi
case "$SERVER" in
  moto) STOP="kill $MOTO" ;;
  rgw) STOP="bash scripts/rgw.sh stop $WORK/rgw" ;;
esac
cat <<EOF
== done: the replica is identical; the server keeps running at $EP
The job's manifest is $WORK/job.db. Try next, from $PWD:

  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing-secret AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
  B=$BIN EP=$EP
  \$B status --manifest $WORK/job.db --json
  \$B plan --source s3://demo-source --dest s3://demo-dest/again/ --manifest $WORK/again.db \\
     --source-endpoint \$EP --dest-endpoint \$EP --path-style --delete-markers --dry-run
  \$B replicate --source s3://demo-source --dest s3://demo-dest/again/ --manifest $WORK/again.db \\
     --source-endpoint \$EP --dest-endpoint \$EP --path-style --delete-markers
  \$B verify --manifest $WORK/again.db

Stop the server: $STOP
EOF
