#!/usr/bin/env bash
# --max-bandwidth measured: a streamed copy between two Ceph RGW clusters (two providers), once
# with the limit and once without, each direction counted on the wire.
#
#   bash benches/bandwidth.sh [N] [SIZE_MIB]     default 12 objects of 64 MiB (768 MiB)
#
# Settings (environment):
#   BW_LIMIT=20M             the limit (any --max-bandwidth value); the default copies for ~38 s
#   BW_RUN_FLAGS="..."       extra run flags for both runs (e.g. "--max-memory 512MiB")
#   BW_PLAN_FLAGS="..."      extra plan flags (e.g. "--multipart-threshold 16MiB": parts of 16 MiB
#                            instead of one request per 64 MiB object)
#   S3_BACKFILL=PATH         the binary (default: target/release/s3-backfill, else target/debug)
#   RGW_SH=PATH              the RGW script (default: scripts/rgw.sh of this repository)
#   BW_DIR=DIR               work directory (default: a fresh temporary one, removed at the end)
#
# Both clusters are reached through one counting TCP proxy (Python, a port per cluster): bytes
# from the source's RGW to s3-backfill are "down", bytes from s3-backfill to the destination's
# RGW are "up" (bodies and headers, as the link sees them), sampled every 0.5 s. For each run:
# the rate per direction = its bytes / the wall time of `run` (the copy phase: `plan` is a
# separate process before it; `run`'s own start, ~1 s, is in it), and the peak RSS of `run`
# (GNU time); for the limited run also the rate from each direction's first body byte to its
# last, and its slowest and fastest 10 s and 30 s windows. Then every destination object's ETag is
# compared with its source's.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
N="${1:-12}"
SIZE_MIB="${2:-64}"
LIMIT="${BW_LIMIT:-20M}"
RGW_SH="${RGW_SH:-$ROOT/scripts/rgw.sh}"
KEY=testing
SECRET=testing-secret

die() {
  echo "bandwidth: error: $*" >&2
  exit 1
}

BIN="${S3_BACKFILL:-}"
if [ -z "$BIN" ]; then
  BIN="$ROOT/target/release/s3-backfill"
  [ -x "$BIN" ] || BIN="$ROOT/target/debug/s3-backfill"
fi
[ -x "$BIN" ] || die "no binary at $BIN (cargo build --release, or set S3_BACKFILL)"
[ -x /usr/bin/time ] || die "GNU time is missing: apt-get install time"
[ -f "$RGW_SH" ] || die "no RGW script at $RGW_SH (set RGW_SH)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=/work/main/.venv/bin/python
"$PYTHON" -c 'import boto3' 2>/dev/null || die "no python with boto3 (set PYTHON)"

if [ -n "${BW_DIR:-}" ]; then
  WORK="$BW_DIR"
  mkdir -p "$WORK"
  KEEP=1
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/bandwidth.XXXXXX")"
  KEEP=0
fi
PROXY_PID=
cleanup() {
  [ -z "$PROXY_PID" ] || kill "$PROXY_PID" 2>/dev/null || true
  bash "$RGW_SH" stop "$WORK/rgw1" >/dev/null 2>&1 || true
  bash "$RGW_SH" stop "$WORK/rgw2" >/dev/null 2>&1 || true
  [ "$KEEP" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT

# boto3 against endpoint $2: make (versioned bucket), put (key file), etags (key etag lines).
py() {
  AWS_ACCESS_KEY_ID="$KEY" AWS_SECRET_ACCESS_KEY="$SECRET" "$PYTHON" - "$@" <<'PY'
import sys, boto3
from botocore.config import Config
op, ep, bucket = sys.argv[1:4]
c = boto3.client("s3", endpoint_url=ep, region_name="us-east-1",
                 config=Config(s3={"addressing_style": "path"}))
if op == "make":
    c.create_bucket(Bucket=bucket)
    c.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
elif op == "put":  # one PutObject per key, the same body
    path, keys = sys.argv[4], sys.argv[5:]
    body = open(path, "rb").read()
    for k in keys:
        c.put_object(Bucket=bucket, Key=k, Body=body)
elif op == "etags":
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            print(o["Key"], o["ETag"])
PY
}

# The counting proxy: `proxy LOG HOST:PORT...` listens on a free port per upstream (printed
# one per line, in order, then "ready"), forwards, and appends "seconds up down" every 0.5 s
# per upstream to LOG.N (up: client to upstream, down: upstream to client).
start_proxy() {
  "$PYTHON" -u - "$WORK/wire" "$@" >"$WORK/proxy.out" 2>"$WORK/proxy.err" <<'PY' &
import asyncio, sys, time
log, ups = sys.argv[1], sys.argv[2:]
counts = [[0, 0] for _ in ups]

async def pipe(r, w, c, i):
    try:
        while True:
            b = await r.read(1 << 16)
            if not b:
                break
            c[i] += len(b)
            w.write(b)
            await w.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            w.close()
        except Exception:
            pass

def serve(n):
    host, port = ups[n].rsplit(":", 1)
    async def handle(cr, cw):
        try:
            ur, uw = await asyncio.open_connection(host, int(port))
        except OSError:
            cw.close()
            return
        await asyncio.gather(pipe(cr, uw, counts[n], 0), pipe(ur, cw, counts[n], 1))
    return handle

async def main():
    servers = []
    for n in range(len(ups)):
        s = await asyncio.start_server(serve(n), "127.0.0.1", 0)
        servers.append(s)
        print(s.sockets[0].getsockname()[1])
    print("ready")
    files = [open(f"{log}.{n}", "a", buffering=1) for n in range(len(ups))]
    while True:
        now = time.monotonic()
        for f, c in zip(files, counts):
            f.write(f"{now:.3f} {c[0]} {c[1]}\n")
        await asyncio.sleep(0.5)

asyncio.run(main())
PY
  PROXY_PID=$!
  local i
  for i in $(seq 100); do
    grep -q ready "$WORK/proxy.out" 2>/dev/null && return 0
    sleep 0.1
  done
  die "the counting proxy did not start: $(cat "$WORK/proxy.err")"
}

# The proxy's counters now: "up down" of upstream $1 (0: source, 1: destination).
wire_now() {
  tail -n 1 "$WORK/wire.$1" | awk '{ print $2, $3 }'
}

mono() {
  "$PYTHON" -c 'import time; print(f"{time.monotonic():.3f}")'
}

# One copy: plan, then run (timed) with extra run flags; prints a result line to results.
copy() {
  local name="$1"
  shift
  local dst="dst-$name" m="$WORK/$name.db"
  py make "$P2" "$dst"
  local env=(env AWS_ACCESS_KEY_ID="$KEY" AWS_SECRET_ACCESS_KEY="$SECRET" AWS_REGION=us-east-1
    AWS_EC2_METADATA_DISABLED=true)
  # shellcheck disable=SC2086
  "${env[@]}" "$BIN" plan --source s3://src --dest "s3://$dst" --manifest "$m" \
    --source-endpoint "$P1" --dest-endpoint "$P2" --path-style --copy-mode stream \
    --no-progress ${BW_PLAN_FLAGS:-} >"$WORK/$name-plan.log" 2>&1 || die "$name: plan failed: $(tail -n 3 "$WORK/$name-plan.log")"
  sleep 1 # a sample of the counters before the run
  local down0 up0 t0 t1 code=0
  read -r _ down0 <<<"$(wire_now 0)"
  read -r up0 _ <<<"$(wire_now 1)"
  t0="$(mono)"
  # shellcheck disable=SC2086
  /usr/bin/time -o "$WORK/$name.time" -f '%e %M' "${env[@]}" "$BIN" run --manifest "$m" \
    --no-progress ${BW_RUN_FLAGS:-} "$@" >"$WORK/$name-run.log" 2>&1 || code=$?
  t1="$(mono)"
  [ "$code" = 0 ] || die "$name: run exited with $code: $(tail -n 3 "$WORK/$name-run.log")"
  sleep 1 # the counters' next sample
  local down1 up1 wall rss kept flags="${*:-none}"
  read -r _ down1 <<<"$(wire_now 0)"
  read -r up1 _ <<<"$(wire_now 1)"
  read -r wall rss <"$WORK/$name.time"
  kept="$(join <(py etags "$EP1" src | sort) <(py etags "$EP2" "$dst" | sort) | awk '$2 == $3' | wc -l)"
  awk -v name="$name" -v flags="${flags// /=}" -v wall="$wall" -v rss="$rss" -v down=$((down1 - down0)) \
    -v up=$((up1 - up0)) -v kept="$kept" -v n="$N" -v mib="$SIZE_MIB" 'BEGIN {
      M = 1048576
      printf "%-10s %-22s %8.2f %10.1f %10.1f %10.2f %10.2f %9.1f %6d/%d\n", name, flags, wall,
        down / M, up / M, down / M / wall, up / M / wall, rss / 1024, kept, n
    }' >>"$WORK/results"
  echo "$t0 $t1" >"$WORK/$name.span"
}

# Per direction of run $1: the rate from its first body byte to its last (the samples where
# the counter first moved by 1 MiB and where it reached its final value; 0.5 s apart), and
# the slowest and fastest windows of 10 s and of 30 s in between, in MiB/s.
windows() {
  local t0 t1
  read -r t0 t1 <"$WORK/$1.span"
  for side in 0 1; do
    awk -v t0="$t0" -v t1="$t1" -v side="$side" '
      BEGIN { n = 0 }
      $1 >= t0 - 1 && $1 <= t1 + 1 { t[n] = $1; b[n] = (side == 0 ? $3 : $2); n++ }
      function window(w,    i, j, r, lo, hi) {
        lo = -1; hi = 0
        for (i = first; i <= last; i++) for (j = i; j <= last; j++) if (t[j] - t[i] >= w) {
          r = (b[j] - b[i]) / (t[j] - t[i]) / 1048576
          if (r > hi) hi = r
          if (lo < 0 || r < lo) lo = r
          break
        }
        return lo < 0 ? sprintf("none (shorter than %d s)", w) : sprintf("%.2f to %.2f", lo, hi)
      }
      END {
        for (i = 0; i < n && b[i] - b[0] < 1048576; i++) {}
        first = (i > 0 ? i - 1 : 0)
        for (last = n - 1; last > 0 && b[last - 1] == b[n - 1]; last--) {}
        span = t[last] - t[first]
        printf "  %-4s first to last byte: %.1f MiB in %.1f s = %.2f MiB/s; 10 s windows %s, 30 s windows %s MiB/s\n",
          (side == 0 ? "down" : "up"), (b[last] - b[first]) / 1048576, span,
          (span > 0 ? (b[last] - b[first]) / span / 1048576 : 0), window(10), window(30)
      }' "$WORK/wire.$side"
  done
}

echo "bandwidth: machine: $(nproc) cores; binary: $BIN ($("$BIN" --version | head -n 1))"
EP1="$(bash "$RGW_SH" start "$WORK/rgw1" --owner $$ | tail -n 1)"
EP2="$(bash "$RGW_SH" start "$WORK/rgw2" --owner $$ | tail -n 1)"
for ep in "$EP1" "$EP2"; do
  case "$ep" in http://*) ;; *) die "rgw.sh start did not print an endpoint (got: $ep)" ;; esac
done
start_proxy "${EP1#http://}" "${EP2#http://}"
P1="http://127.0.0.1:$(sed -n 1p "$WORK/proxy.out")"
P2="http://127.0.0.1:$(sed -n 2p "$WORK/proxy.out")"
echo "bandwidth: RGW clusters at $EP1 and $EP2, counted through $P1 and $P2"

py make "$EP1" src
echo "bandwidth: uploading $N objects of $SIZE_MIB MiB"
head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom >"$WORK/body"
py put "$EP1" src "$WORK/body" $(seq -f 'obj-%03g' 1 "$N")
rm -f "$WORK/body"
[ "$(py etags "$EP1" src | wc -l)" = "$N" ] || die "src does not hold $N objects"

: >"$WORK/results"
echo "bandwidth: streamed copy without a limit"
copy unlimited
echo "bandwidth: streamed copy with --max-bandwidth $LIMIT"
copy limited --max-bandwidth "$LIMIT"

limit_mib="$("$PYTHON" - "$LIMIT" <<'PY'
import sys
v = sys.argv[1].split(":")[0].strip().lower().removesuffix("/s")
units = {"b": 1, "k": 1 << 10, "ki": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mi": 1 << 20,
         "mib": 1 << 20, "g": 1 << 30, "gi": 1 << 30, "gib": 1 << 30, "": 1 << 10}
num = v.rstrip("abcdefghijklmnopqrstuvwxyz")
print(f"{float(num) * units[v[len(num):]] / (1 << 20):.2f}")
PY
)"
echo
echo "$N x $SIZE_MIB MiB streamed from one RGW to another${BW_PLAN_FLAGS:+ (plan: $BW_PLAN_FLAGS)}; limit $LIMIT = $limit_mib MiB/s per direction"
printf "%-10s %-22s %8s %10s %10s %10s %10s %9s %8s\n" run flags "wall s" "down MiB" "up MiB" \
  "down MiB/s" "up MiB/s" "peak MiB" ETags
cat "$WORK/results"
awk -v lim="$limit_mib" '$1 == "limited" {
  printf "limited run: down %.1f%%, up %.1f%% of the limit\n", 100 * $6 / lim, 100 * $7 / lim
}' "$WORK/results"
echo "limited run, per direction:"
windows limited
