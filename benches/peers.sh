#!/usr/bin/env bash
# Side by side: the same server-side copy of N small objects by s3-backfill, rclone and (when
# installed) s3sync, against one Ceph RGW started for the run, in one run.
#
#   bash benches/peers.sh [N]         N objects of 1 KiB (default 3000; 2,000-5,000 is the aim)
#
# Settings (environment):
#   PEERS_SIZE=1024          bytes per object
#   PEERS_CONCURRENCY=32     requests in flight for every tool
#   PEERS_TOOLS="s3-backfill s3-backfill-1req rclone s3sync"   which tools to run (missing ones
#                            are skipped; s3-backfill-1req: --no-stamp --sse bucket-default)
#   S3_BACKFILL=PATH         the s3-backfill binary (default: target/release/s3-backfill, built when missing)
#   S3_BACKFILL_BEFORE=PATH  another s3-backfill build to compare with, as tools
#                            s3-backfill-before and s3-backfill-1req-before
#   RGW_SH=PATH              the RGW script (default: scripts/rgw.sh of this repository)
#   PEERS_DIR=DIR            work directory (default: a fresh temporary one, removed at the end)
#
# Each tool copies the same source bucket (versioned, one version per key) into its own fresh,
# versioned destination bucket. Every tool runs under GNU time (`/usr/bin/time`, apt package
# `time`), which gives wall time, user+system CPU and peak RSS; s3-backfill's `plan` and `run`
# are two processes: their times and CPU add up and the larger RSS counts. The destination is
# then counted (ListObjectsV2) so that a fast tool that copied nothing cannot win. Peers are
# installed by hand: `apt-get install rclone`, `cargo install s3sync`; nothing of theirs is in
# this repository. rclone 1.60 fails when AWS_CA_BUNDLE is set, so it runs without it.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
N="${1:-3000}"
SIZE="${PEERS_SIZE:-1024}"
CONC="${PEERS_CONCURRENCY:-32}"
TOOLS="${PEERS_TOOLS:-s3-backfill s3-backfill-1req rclone s3sync}"
BIN="${S3_BACKFILL:-$ROOT/target/release/s3-backfill}"
BEFORE="${S3_BACKFILL_BEFORE:-}"
RGW_SH="${RGW_SH:-$ROOT/scripts/rgw.sh}"
KEY=testing
SECRET=testing-secret
SRC=peers-src

die() {
  echo "peers: error: $*" >&2
  exit 1
}

[ -x /usr/bin/time ] || die "GNU time is missing: apt-get install time"
[ -f "$RGW_SH" ] || die "no RGW script at $RGW_SH (set RGW_SH)"
command -v curl >/dev/null || die "curl is missing"
if [ ! -x "$BIN" ]; then
  echo "peers: building $BIN (cargo build --release)"
  (cd "$ROOT" && cargo build --release --bin s3-backfill) >&2
fi

if [ -n "${PEERS_DIR:-}" ]; then
  WORK="$PEERS_DIR"
  mkdir -p "$WORK"
  KEEP=1
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/peers.XXXXXX")"
  KEEP=0
fi
cleanup() {
  bash "$RGW_SH" stop "$WORK/rgw" >/dev/null 2>&1 || true
  [ "$KEEP" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT

# Signed S3 request to the RGW with curl; extra arguments follow.
s3() {
  curl -sf --aws-sigv4 "aws:amz:us-east-1:s3" --user "$KEY:$SECRET" \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$@"
}

make_bucket() {
  s3 -X PUT "$EP/$1" >/dev/null
  s3 -X PUT --data-binary \
    '<VersioningConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Status>Enabled</Status></VersioningConfiguration>' \
    "$EP/$1?versioning=" >/dev/null
}

# Number of current objects in a bucket (ListObjects v1, paged by marker: curl 7.88's SigV4
# signs a query of one pre-encoded parameter correctly, not more).
count_objects() {
  local bucket="$1" total=0 marker="" page n
  while :; do
    page="$(s3 "$EP/$bucket${marker:+?marker=$marker}")"
    n="$(grep -o '<Key>' <<<"$page" | wc -l)"
    total=$((total + n))
    grep -q '<IsTruncated>true</IsTruncated>' <<<"$page" || break
    marker="$(grep -o '<Key>[^<]*</Key>' <<<"$page" | tail -n 1 | sed 's:<Key>\(.*\)</Key>:\1:; s:/:%2F:g')"
  done
  echo "$total"
}

# Uploads N objects of SIZE bytes under keys obj/NNNNNN, 32 at a time, with curl.
seed_source() {
  local dir="$WORK/bodies" cfg="$WORK/upload.curl" i
  mkdir -p "$dir"
  : >"$cfg"
  for i in $(seq -f '%06g' 1 "$N"); do
    head -c "$SIZE" /dev/urandom >"$dir/$i"
    printf 'upload-file = "%s"\nurl = "%s/%s/obj/%s"\n' "$dir/$i" "$EP" "$SRC" "$i" >>"$cfg"
  done
  curl -sf --no-progress-meter --parallel --parallel-max 32 --aws-sigv4 "aws:amz:us-east-1:s3" \
    --user "$KEY:$SECRET" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -K "$cfg" -o /dev/null
  rm -rf "$dir"
}

# Runs a command under GNU time; appends "wall user sys maxrss_kib exit" to $2.
timed() {
  local name="$1" out="$2"
  shift 2
  local code=0
  /usr/bin/time -o "$WORK/$name.time" -f '%e %U %S %M' "$@" >"$WORK/$name.log" 2>&1 || code=$?
  # GNU time writes "Command exited with non-zero status N" before the figures.
  echo "$(tail -n 1 "$WORK/$name.time") $code" >>"$out"
  if [ "$code" != 0 ]; then
    echo "peers: $name exited with $code; last lines of its output:" >&2
    tail -n 5 "$WORK/$name.log" >&2
  fi
}

# s3-backfill as tool $1, binary $2, with plan flags $3.. (s3-backfill: the default job, HEAD +
# CopyObject per object; s3-backfill-1req: --no-stamp --sse bucket-default, one CopyObject
# per object).
run_backfill() {
  local tool="$1" bin="$2"
  shift 2
  [ -x "$bin" ] || {
    echo "peers: $tool: no binary (${bin:-set S3_BACKFILL_BEFORE}): skipped"
    return
  }
  local out="$WORK/$tool.figures" dst="peers-$tool"
  make_bucket "$dst"
  : >"$out"
  local common=(env AWS_ACCESS_KEY_ID="$KEY" AWS_SECRET_ACCESS_KEY="$SECRET" AWS_REGION=us-east-1
    AWS_EC2_METADATA_DISABLED=true "$bin")
  timed backfill-plan "$out" "${common[@]}" plan --source "s3://$SRC" --dest "s3://$dst" \
    --manifest "$WORK/$tool.db" --source-endpoint "$EP" --dest-endpoint "$EP" --path-style "$@"
  timed backfill-run "$out" "${common[@]}" run --manifest "$WORK/$tool.db" \
    --concurrency "$CONC" --no-progress
  report "$tool" "$out" "$dst" "$("$bin" --version 2>/dev/null | head -n 1)"
  awk -v tool="$tool" '{ printf "%s%s %.2f s wall, %.2f s CPU, %.1f MiB", (NR == 1 ? tool ": " : "; "),
    (NR == 1 ? "plan" : "run"), $1, $2 + $3, $4 / 1024 } END { print "" }' "$out" >>"$WORK/s3-backfill.detail"
  echo "$tool requests: $("$bin" status --manifest "$WORK/$tool.db" --json | grep -o '"requests":{[^}]*}')" >>"$WORK/s3-backfill.detail"
}

run_rclone() {
  command -v rclone >/dev/null || {
    echo "peers: rclone not installed (apt-get install rclone): skipped"
    return
  }
  local out="$WORK/rclone.figures" dst="peers-rclone"
  make_bucket "$dst"
  : >"$out"
  # A remote defined by environment only; same remote on both sides means server-side copy.
  timed rclone "$out" env -u AWS_CA_BUNDLE RCLONE_CONFIG_RGW_TYPE=s3 \
    RCLONE_CONFIG_RGW_PROVIDER=Ceph RCLONE_CONFIG_RGW_ACCESS_KEY_ID="$KEY" \
    RCLONE_CONFIG_RGW_SECRET_ACCESS_KEY="$SECRET" RCLONE_CONFIG_RGW_ENDPOINT="$EP" \
    RCLONE_CONFIG_RGW_REGION=us-east-1 \
    rclone copy "rgw:$SRC" "rgw:$dst" --transfers "$CONC" --checkers "$CONC" \
    --s3-no-check-bucket
  report rclone "$out" "$dst" "$(rclone version 2>/dev/null | head -n 1)"
}

run_s3sync() {
  command -v s3sync >/dev/null || {
    echo "peers: s3sync not installed (cargo install s3sync): skipped"
    return
  }
  local out="$WORK/s3sync.figures" dst="peers-s3sync"
  make_bucket "$dst"
  : >"$out"
  timed s3sync "$out" s3sync --source-access-key "$KEY" --source-secret-access-key "$SECRET" \
    --target-access-key "$KEY" --target-secret-access-key "$SECRET" \
    --source-region us-east-1 --target-region us-east-1 \
    --source-endpoint-url "$EP" --target-endpoint-url "$EP" \
    --source-force-path-style --target-force-path-style \
    --server-side-copy --worker-size "$CONC" "s3://$SRC" "s3://$dst"
  report s3sync "$out" "$dst" "$(s3sync --version 2>/dev/null | awk 'NR == 1 { print $1, $2 }')"
}

# Sums a tool's figures (one line per process) into one result line.
report() {
  local tool="$1" figures="$2" dst="$3" version="$4" copied
  copied="$(count_objects "$dst")"
  awk -v tool="$tool" -v n="$N" -v copied="$copied" -v version="$version" '
    { wall += $1; cpu += $2 + $3; if ($4 > rss) rss = $4; if ($5 != 0) failed = 1 }
    END {
      printf "%-24s %7d %8.2f %10.0f %9.2f %12.3f %11.1f %8d%s   %s\n", tool, n, wall,
        (wall > 0 ? n / wall : 0), cpu, cpu * 1000 / n, rss / 1024, copied,
        (failed ? " (exit != 0)" : ""), version
    }' "$figures" >>"$WORK/results"
}

echo "peers: machine: $(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n 1)"
echo "peers: starting Ceph RGW in $WORK/rgw"
EP="$(bash "$RGW_SH" start "$WORK/rgw" --owner $$ | tail -n 1)"
case "$EP" in http://*) ;; *) die "rgw.sh start did not print an endpoint (got: $EP)" ;; esac
echo "peers: RGW at $EP ($(ceph --version 2>/dev/null | awk '{print $1, $2, $3}'))"
make_bucket "$SRC"
echo "peers: uploading $N objects of $SIZE bytes"
seed_source
have="$(count_objects "$SRC")"
[ "$have" = "$N" ] || die "the source holds $have objects, not $N"

: >"$WORK/results"
for tool in $TOOLS; do
  echo "peers: running $tool ($CONC in flight)"
  case "$tool" in
    s3-backfill) run_backfill s3-backfill "$BIN" ;;
    s3-backfill-1req) run_backfill s3-backfill-1req "$BIN" --no-stamp --sse bucket-default ;;
    s3-backfill-before) run_backfill s3-backfill-before "$BEFORE" ;;
    s3-backfill-1req-before)
      run_backfill s3-backfill-1req-before "$BEFORE" --no-stamp --sse bucket-default
      ;;
    rclone) run_rclone ;;
    s3sync) run_s3sync ;;
    *) echo "peers: unknown tool $tool: skipped" ;;
  esac
done

echo
echo "server-side copy of $N x $SIZE B on one Ceph RGW, $CONC in flight; CPU = user+system of the tool's processes"
printf "%-24s %7s %8s %10s %9s %12s %11s %8s   %s\n" tool objects "wall s" objects/s "CPU s" "CPU ms/obj" "peak MiB" copied version
cat "$WORK/results"
[ ! -s "$WORK/s3-backfill.detail" ] || { echo "s3-backfill by step:"; cat "$WORK/s3-backfill.detail"; }
