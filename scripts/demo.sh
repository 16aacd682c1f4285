#!/usr/bin/env bash
# The local demo: installs and starts a local S3 server (moto; or Ceph RGW with
# DEMO_SERVER=rgw), seeds a versioned bucket with versions, delete markers and odd keys,
# replicates it with s3-backfill, shows status and verifies the destination against the
# source. Everything stays on 127.0.0.1, and the server stops when the demo ends.
set -euo pipefail
cd "$(dirname "$0")/.."
SERVER="${DEMO_SERVER:-moto}"
WORK="$(mktemp -d)"
STEPS=6
step() { echo "== [$1/$STEPS] $2"; }

cleanup() {
  if [ -n "${MOTO:-}" ]; then kill "$MOTO" 2>/dev/null || true; fi
  if [ "$SERVER" = rgw ]; then bash scripts/rgw.sh stop "$WORK/rgw" >/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

step 1 "installing the local S3 server ($SERVER) if needed"
bash scripts/setup-moto.sh # the seeding below uses boto3 from moto's .venv
if [ "$SERVER" = rgw ]; then bash scripts/rgw.sh install; fi

step 2 "building s3-backfill and its tests (the first build takes about 10 min on 2 cores; later builds take seconds)"
# The build the tests use (cargo builds dependencies with other features for a plain
# `cargo build`), so that scripts/test.sh does not build everything a second time.
cargo test --no-run
BIN=target/debug/s3-backfill

step 3 "starting $SERVER on 127.0.0.1"
case "$SERVER" in
  moto)
    PORT="${DEMO_PORT:-4599}"
    EP="http://127.0.0.1:$PORT"
    .venv/bin/moto_server -H 127.0.0.1 -p "$PORT" >"$WORK/moto.log" 2>&1 &
    MOTO=$!
    for _ in $(seq 100); do curl -s -o /dev/null "$EP" && break; sleep 0.1; done
    ;;
  rgw)
    # A single-node cluster (~3 s); the watchdog stops it if this script is killed.
    EP="$(bash scripts/rgw.sh start "$WORK/rgw" --owner $$ | tail -n 1)"
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
echo "== done: the replica is identical (the server stops now)"
