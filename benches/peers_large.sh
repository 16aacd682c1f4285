#!/usr/bin/env bash
# Side by side: large objects copied by s3-backfill, rclone and (when installed) s3sync, in
# one run, on Ceph RGW clusters started for the run (issue 18's cases):
#   - server-side on one RGW: N single-part sources, then N multipart sources;
#   - streamed between two RGW clusters (two providers): the same sources.
#
#   bash benches/peers_large.sh [N] [SIZE_MIB]    default 8 objects of 128 MiB
#
# Settings (environment):
#   PEERS_PART_MIB=8          part size of the multipart sources (the AWS CLI's default)
#   PEERS_CONCURRENCY=8       objects in flight for every tool
#   PEERS_TOOLS="s3-backfill rclone s3sync"   which tools (missing ones are said and skipped);
#                            "s3-backfill-before" runs S3_BACKFILL_BEFORE too (another build)
#   PEERS_CASES="server-single server-multipart stream-single stream-multipart"
#   PEERS_REPEAT=1            runs of each tool and case (each into a fresh bucket); the run
#                            with the median wall time is printed (server-side cases take
#                            a fraction of a second: repeat them to see past the noise)
#   PEERS_BACKFILL=replicate  how s3-backfill runs: `replicate` (one process that lists and
#                            copies, as the peers do) or `plan-run` (two processes)
#   S3_BACKFILL=PATH         the s3-backfill binary (default: target/release/s3-backfill, built when missing)
#   S3_BACKFILL_BEFORE=PATH  a second s3-backfill binary to compare with (tool s3-backfill-before)
#   S3_BACKFILL_FLAGS="..."  extra plan flags for s3-backfill (e.g. --max-memory is a run flag:
#                            S3_BACKFILL_RUN_FLAGS="--max-memory 512MiB")
#   RGW_SH=PATH              the RGW script (default: scripts/rgw.sh of this repository)
#   PEERS_DIR=DIR            work directory (default: a fresh temporary one, removed at the end)
#
# Each tool copies the same source bucket into its own fresh versioned destination bucket (for
# the streamed cases on a destination cluster started afresh for each run: a cluster slows
# down as its in-memory store fills, which favoured whichever tool ran first), under
# GNU time (`/usr/bin/time`): wall time, user+system CPU, peak RSS. With PEERS_BACKFILL=plan-run
# s3-backfill's `plan` and `run` are two processes: times and CPU add up, the larger RSS
# counts. Then every destination
# object's ETag is compared with its source's (ListObjects): "ETags kept" counts the equal
# ones. Peers are installed by hand (`apt-get install rclone`, `cargo install s3sync`); rclone
# 1.60 fails when AWS_CA_BUNDLE is set, so it runs without it.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
N="${1:-8}"
SIZE_MIB="${2:-128}"
PART_MIB="${PEERS_PART_MIB:-8}"
CONC="${PEERS_CONCURRENCY:-8}"
TOOLS="${PEERS_TOOLS:-s3-backfill rclone s3sync}"
REPEAT="${PEERS_REPEAT:-1}"
BACKFILL="${PEERS_BACKFILL:-replicate}"
CASES="${PEERS_CASES:-server-single server-multipart stream-single stream-multipart}"
BIN="${S3_BACKFILL:-$ROOT/target/release/s3-backfill}"
BEFORE="${S3_BACKFILL_BEFORE:-}"
RGW_SH="${RGW_SH:-$ROOT/scripts/rgw.sh}"
KEY=testing
SECRET=testing-secret

die() {
  echo "peers-large: error: $*" >&2
  exit 1
}

[ -x /usr/bin/time ] || die "GNU time is missing: apt-get install time"
[ -f "$RGW_SH" ] || die "no RGW script at $RGW_SH (set RGW_SH)"
command -v curl >/dev/null || die "curl is missing"
if [ ! -x "$BIN" ]; then
  echo "peers-large: building $BIN (cargo build --release)"
  (cd "$ROOT" && cargo build --release --bin s3-backfill) >&2
fi

if [ -n "${PEERS_DIR:-}" ]; then
  WORK="$PEERS_DIR"
  mkdir -p "$WORK"
  KEEP=1
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/peers-large.XXXXXX")"
  KEEP=0
fi
cleanup() {
  bash "$RGW_SH" stop "$WORK/rgw1" >/dev/null 2>&1 || true
  bash "$RGW_SH" stop "$WORK/rgw2" >/dev/null 2>&1 || true
  [ "$KEEP" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT

# Signed S3 request with curl to endpoint $1; extra arguments follow.
s3() {
  local ep="$1"
  shift
  curl -sf --aws-sigv4 "aws:amz:us-east-1:s3" --user "$KEY:$SECRET" \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$@"
}

make_bucket() {
  s3 "$1" -X PUT "$1/$2" >/dev/null
  s3 "$1" -X PUT --data-binary \
    '<VersioningConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Status>Enabled</Status></VersioningConfiguration>' \
    "$1/$2?versioning=" >/dev/null
}

# The S3 helper: boto3 (PYTHON, default: the tests' moto virtualenv, which has it).
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=/work/main/.venv/bin/python
"$PYTHON" -c 'import boto3' 2>/dev/null || die "no python with boto3 (set PYTHON)"
py() {
  AWS_ACCESS_KEY_ID="$KEY" AWS_SECRET_ACCESS_KEY="$SECRET" "$PYTHON" - "$@" <<'PY'
import sys, boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
op, ep, bucket = sys.argv[1:4]
c = boto3.client("s3", endpoint_url=ep, region_name="us-east-1",
                 config=Config(s3={"addressing_style": "path"}))
if op == "etags":  # "key etag" per current object
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            print(o["Key"], o["ETag"])
elif op == "put":  # key file mode part_mib: one PutObject, or multipart in parts of part_mib
    key, path, mode, part = sys.argv[4], sys.argv[5], sys.argv[6], int(sys.argv[7]) << 20
    if mode == "single":
        with open(path, "rb") as f:
            c.put_object(Bucket=bucket, Key=key, Body=f)
    else:
        cfg = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=4)
        c.upload_file(path, bucket, key, Config=cfg)
PY
}

# "key etag" lines of a bucket's current objects.
etags() {
  py etags "$1" "$2"
}

put_single() {
  local ep="$1" bucket="${2%%/*}" key="${2#*/}"
  py put "$ep" "$bucket" "$key" "$3" single "$PART_MIB"
}

put_multipart() {
  local ep="$1" bucket="${2%%/*}" key="${2#*/}"
  py put "$ep" "$bucket" "$key" "$3" multipart "$PART_MIB"
}

# Runs a command under GNU time; appends "wall user sys maxrss_kib exit" to $2.
timed() {
  local name="$1" out="$2"
  shift 2
  local code=0
  /usr/bin/time -o "$WORK/$name.time" -f '%e %U %S %M' "$@" >"$WORK/$name.log" 2>&1 || code=$?
  echo "$(tail -n 1 "$WORK/$name.time") $code" >>"$out"
  if [ "$code" != 0 ]; then
    echo "peers-large: $name exited with $code; last lines of its output:" >&2
    tail -n 5 "$WORK/$name.log" >&2
  fi
}

# A destination endpoint for one run: a streamed case's destination cluster is started
# afresh for every run (an RGW cluster slows down as its in-memory store fills, which would
# favour whichever tool runs first); a server-side case's is the source's.
fresh_dest() {
  local dep="$1"
  if [ "$dep" = "$EP1" ]; then
    echo "$dep"
    return
  fi
  bash "$RGW_SH" stop "$WORK/rgw2" >/dev/null 2>&1 || true
  bash "$RGW_SH" start "$WORK/rgw2" --owner $$ | tail -n 1
}

# How many of the source's objects have their ETag at the destination: written to $1.
count_kept() {
  local out="$1" sep="$2" src="$3" dep="$4" dst="$5"
  join <(etags "$sep" "$src" | sort) <(etags "$dep" "$dst" | sort) | awk '$2 == $3' | wc -l >"$out"
}

# One result line: tool, case, the run (of PEERS_REPEAT) with the median wall time (figures
# summed over its processes), and the ETags it kept. Each run's figures are in $3.<r>, the
# ETags it kept in $3.<r>.kept.
report() {
  local tool="$1" case="$2" figures="$3" version="$4" kept median
  median="$(for r in $(seq 1 "$REPEAT"); do
    awk -v r="$r" '{ wall += $1 } END { print wall, r }' "$figures.$r"
  done | sort -n | awk -v n="$REPEAT" 'NR == int((n + 1) / 2) { print $2 }')"
  kept="$(cat "$figures.$median.kept")"
  awk -v tool="$tool" -v case="$case" -v n="$N" -v mib="$SIZE_MIB" -v kept="$kept" -v version="$version" \
    -v runs="$REPEAT" '
    { wall += $1; cpu += $2 + $3; if ($4 > rss) rss = $4; if ($5 != 0) failed = 1 }
    END {
      gib = n * mib / 1024
      printf "%-18s %-17s %8.2f %8.1f %9.2f %10.2f %9.1f %6d/%d%s   %s%s\n", tool, case, wall,
        (wall > 0 ? n * mib / wall : 0), cpu, cpu / gib, rss / 1024, kept, n,
        (failed ? " (exit != 0)" : ""), version, (runs > 1 ? " (median of " runs " runs)" : "")
    }' "$figures.$median" >>"$WORK/results"
}

run_backfill() {
  local tool="$1" bin="$2" case="$3" sep="$4" src="$5" dep="$6" mode="$7"
  local out="$WORK/$tool-$case.figures" dst="d-$tool-$case" r
  [ -x "$bin" ] || {
    echo "peers-large: $tool: no binary ($bin): skipped"
    return
  }
  local common=(env AWS_ACCESS_KEY_ID="$KEY" AWS_SECRET_ACCESS_KEY="$SECRET" AWS_REGION=us-east-1
    AWS_EC2_METADATA_DISABLED=true "$bin")
  for r in $(seq 1 "$REPEAT"); do
    local d db="$WORK/$tool-$case-$r.db" job
    d="$(fresh_dest "$dep")"
    make_bucket "$d" "$dst-$r"
    : >"$out.$r"
    job=(--source "s3://$src" --dest "s3://$dst-$r" --manifest "$db" --source-endpoint "$sep"
      --dest-endpoint "$d" --path-style --copy-mode "$mode")
    if [ "$BACKFILL" = plan-run ]; then
      # shellcheck disable=SC2086
      timed "$tool-$case-$r-plan" "$out.$r" "${common[@]}" plan "${job[@]}" ${S3_BACKFILL_FLAGS:-}
      # shellcheck disable=SC2086
      timed "$tool-$case-$r-run" "$out.$r" "${common[@]}" run --manifest "$db" \
        --concurrency "$CONC" --no-progress ${S3_BACKFILL_RUN_FLAGS:-}
    else
      # shellcheck disable=SC2086
      timed "$tool-$case-$r" "$out.$r" "${common[@]}" replicate "${job[@]}" \
        --concurrency "$CONC" --no-progress ${S3_BACKFILL_FLAGS:-} ${S3_BACKFILL_RUN_FLAGS:-}
    fi
    count_kept "$out.$r.kept" "$sep" "$src" "$d" "$dst-$r"
  done
  report "$tool" "$case" "$out" "$("$bin" --version 2>/dev/null | head -n 1)"
  echo "$tool $case: $("$bin" status --manifest "$WORK/$tool-$case-1.db" | grep -A3 '^etags' | tr '\n' ' ')" >>"$WORK/detail"
}

run_rclone() {
  local case="$1" sep="$2" src="$3" dep="$4"
  command -v rclone >/dev/null || {
    echo "peers-large: rclone not installed (apt-get install rclone): skipped"
    return
  }
  local out="$WORK/rclone-$case.figures" dst="d-rclone-$case" r
  for r in $(seq 1 "$REPEAT"); do
    local d
    d="$(fresh_dest "$dep")"
    make_bucket "$d" "$dst-$r"
    : >"$out.$r"
    timed "rclone-$case-$r" "$out.$r" env -u AWS_CA_BUNDLE \
    RCLONE_CONFIG_A_TYPE=s3 RCLONE_CONFIG_A_PROVIDER=Ceph RCLONE_CONFIG_A_ACCESS_KEY_ID="$KEY" \
    RCLONE_CONFIG_A_SECRET_ACCESS_KEY="$SECRET" RCLONE_CONFIG_A_ENDPOINT="$sep" \
    RCLONE_CONFIG_A_REGION=us-east-1 \
    RCLONE_CONFIG_B_TYPE=s3 RCLONE_CONFIG_B_PROVIDER=Ceph RCLONE_CONFIG_B_ACCESS_KEY_ID="$KEY" \
    RCLONE_CONFIG_B_SECRET_ACCESS_KEY="$SECRET" RCLONE_CONFIG_B_ENDPOINT="$d" \
    RCLONE_CONFIG_B_REGION=us-east-1 \
    rclone copy "a:$src" "$([ "$sep" = "$dep" ] && echo a || echo b):$dst-$r" --transfers "$CONC" \
    --s3-no-check-bucket
    count_kept "$out.$r.kept" "$sep" "$src" "$d" "$dst-$r"
  done
  report rclone "$case" "$out" "$(rclone version 2>/dev/null | head -n 1)"
}

run_s3sync() {
  local case="$1" sep="$2" src="$3" dep="$4"
  command -v s3sync >/dev/null || {
    echo "peers-large: s3sync not installed (cargo install s3sync): skipped"
    return
  }
  local out="$WORK/s3sync-$case.figures" dst="d-s3sync-$case" server=() r
  [ "$sep" = "$dep" ] && server=(--server-side-copy)
  for r in $(seq 1 "$REPEAT"); do
    local d
    d="$(fresh_dest "$dep")"
    make_bucket "$d" "$dst-$r"
    : >"$out.$r"
    timed "s3sync-$case-$r" "$out.$r" s3sync --source-access-key "$KEY" --source-secret-access-key "$SECRET" \
    --target-access-key "$KEY" --target-secret-access-key "$SECRET" \
    --source-region us-east-1 --target-region us-east-1 \
    --source-endpoint-url "$sep" --target-endpoint-url "$d" \
    --source-force-path-style --target-force-path-style \
    "${server[@]}" --worker-size "$CONC" "s3://$src" "s3://$dst-$r"
    count_kept "$out.$r.kept" "$sep" "$src" "$d" "$dst-$r"
  done
  report s3sync "$case" "$out" "$(s3sync --version 2>/dev/null | awk 'NR == 1 { print $1, $2 }')"
}

echo "peers-large: machine: $(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n 1)"
EP1="$(bash "$RGW_SH" start "$WORK/rgw1" --owner $$ | tail -n 1)"
EP2="$(bash "$RGW_SH" start "$WORK/rgw2" --owner $$ | tail -n 1)"
for ep in "$EP1" "$EP2"; do
  case "$ep" in http://*) ;; *) die "rgw.sh start did not print an endpoint (got: $ep)" ;; esac
done
echo "peers-large: RGW clusters at $EP1 and $EP2"
make_bucket "$EP1" src-single
make_bucket "$EP1" src-multipart
echo "peers-large: uploading $N single-part and $N multipart ($PART_MIB MiB parts) objects of $SIZE_MIB MiB"
for i in $(seq -f '%03g' 1 "$N"); do
  head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom >"$WORK/body"
  put_single "$EP1" "src-single/obj-$i" "$WORK/body"
  put_multipart "$EP1" "src-multipart/obj-$i" "$WORK/body"
done
rm -f "$WORK/body" "$WORK/part"
[ "$(etags "$EP1" src-single | wc -l)" = "$N" ] || die "src-single does not hold $N objects"
[ "$(etags "$EP1" src-multipart | grep -c -- '-[0-9]*"$')" = "$N" ] || die "src-multipart does not hold $N multipart objects"

: >"$WORK/results"
: >"$WORK/detail"
for case in $CASES; do
  case "$case" in
    server-single) sep="$EP1" src=src-single dep="$EP1" mode=server-side ;;
    server-multipart) sep="$EP1" src=src-multipart dep="$EP1" mode=server-side ;;
    stream-single) sep="$EP1" src=src-single dep="$EP2" mode=stream ;;
    stream-multipart) sep="$EP1" src=src-multipart dep="$EP2" mode=stream ;;
    *)
      echo "peers-large: unknown case $case: skipped"
      continue
      ;;
  esac
  for tool in $TOOLS; do
    echo "peers-large: $case: $tool ($CONC in flight)"
    case "$tool" in
      s3-backfill) run_backfill s3-backfill "$BIN" "$case" "$sep" "$src" "$dep" "$mode" ;;
      s3-backfill-before) run_backfill s3-backfill-before "$BEFORE" "$case" "$sep" "$src" "$dep" "$mode" ;;
      rclone) run_rclone "$case" "$sep" "$src" "$dep" ;;
      s3sync) run_s3sync "$case" "$sep" "$src" "$dep" ;;
      *) echo "peers-large: unknown tool $tool: skipped" ;;
    esac
  done
done

echo
echo "$N x $SIZE_MIB MiB ($PART_MIB MiB parts for multipart sources), $CONC in flight; server-side on one RGW, streamed between two; s3-backfill as $BACKFILL; CPU = user+system of the tool's processes"
printf "%-18s %-17s %8s %8s %9s %10s %9s %8s   %s\n" tool case "wall s" "MiB/s" "CPU s" "CPU s/GiB" "peak MiB" "ETags" version
cat "$WORK/results"
[ ! -s "$WORK/detail" ] || { echo "s3-backfill's status (etags):"; cat "$WORK/detail"; }
