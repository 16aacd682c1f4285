#!/usr/bin/env bash
# The local demo: installs and starts a local S3 (moto), seeds a versioned bucket with
# versions, delete markers and odd keys, replicates it with s3-backfill, shows status and
# verifies the destination against the source. Everything stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${DEMO_PORT:-4599}"
EP="http://127.0.0.1:$PORT"
WORK="$(mktemp -d)"
bash scripts/setup-moto.sh
cargo build --quiet
BIN=target/debug/s3-backfill

.venv/bin/moto_server -H 127.0.0.1 -p "$PORT" >"$WORK/moto.log" 2>&1 &
MOTO=$!
trap 'kill $MOTO 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do curl -s -o /dev/null "$EP" && break; sleep 0.1; done

export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo-secret AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true

echo "== seeding s3://demo-source (versioned) on $EP"
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

echo "== replicate s3://demo-source -> s3://demo-dest/backup/"
"$BIN" replicate --source s3://demo-source --dest s3://demo-dest/backup/ \
  --manifest "$WORK/job.db" --source-endpoint "$EP" --dest-endpoint "$EP" --path-style \
  --delete-markers --concurrency 16
echo "== status"
"$BIN" status --manifest "$WORK/job.db"
echo "== verify"
"$BIN" verify --manifest "$WORK/job.db"
