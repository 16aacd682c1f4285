#!/usr/bin/env bash
# A throwaway single-node Ceph RADOS Gateway (RGW) on 127.0.0.1, for the tests and by hand.
#
#   bash scripts/rgw.sh install                  apt packages when missing (ceph-mon ceph-osd radosgw ceph-common)
#   bash scripts/rgw.sh start DIR [--owner PID]  a fresh cluster in DIR; the endpoint is the last stdout line
#   bash scripts/rgw.sh stop DIR                 kills the daemons started in DIR, drops their data, keeps the logs
#
# The cluster: one monitor, one OSD with the in-memory object store (memstore: nothing on disk
# but the monitor's small store and the logs), one radosgw, no manager, cephx off (S3 requests
# are still signed and checked by RGW). Every port is free-picked on 127.0.0.1, so several
# clusters run side by side (each one is a separate S3 provider). S3 users:
#   testing  / testing-secret    (default tenant; what tests/support uses)
#   testing2 / testing2-secret   (tenant "tenant2": a separate bucket namespace, like a second account)
# Storage classes: STANDARD and STANDARD_IA. Region us-east-1, path-style, SigV4, plain http.
#
# With --owner PID a watchdog stops the cluster when process PID goes away (the test harness
# passes its own pid, so nothing outlives a killed test binary). DIR keeps every daemon's log
# (mon.a.log, osd.0.log, client.rgw.a.log, *.out) after `stop`.
set -euo pipefail

SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
PACKAGES=(ceph-mon ceph-osd radosgw ceph-common curl)
BINARIES=(ceph ceph-mon ceph-osd radosgw radosgw-admin monmaptool curl)
# Seconds to wait for each daemon before giving up (a cold start takes ~3-6 s in all).
WAIT_LIMIT="${RGW_WAIT_LIMIT:-60}"
# Ports are picked in this range (below Linux's ephemeral range, so an outgoing connection
# cannot hold one); the OSD takes a window of OSD_PORTS ports.
PORT_LOW=20000
PORT_HIGH=32000
OSD_PORTS=12

say() { echo "rgw: $*"; }
die() {
  echo "rgw: error: $*" >&2
  exit 1
}

missing_binaries() {
  local b
  for b in "${BINARIES[@]}"; do
    command -v "$b" >/dev/null 2>&1 || echo "$b"
  done
}

cmd_install() {
  if [ -z "$(missing_binaries)" ]; then
    return 0
  fi
  say "installing ${PACKAGES[*]} with apt (about 20-45 s the first time)"
  bash "$(dirname "$SELF")/apt-install.sh" "${PACKAGES[@]}"
  [ -z "$(missing_binaries)" ] || die "still missing after apt: $(missing_binaries | tr '\n' ' ')"
  say "installed $(ceph --version | awk '{print $1, $2, $3}')"
}

port_busy() {
  (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# A random port such that PORT..PORT+COUNT-1 are all free.
free_ports() {
  local count="$1" tries p i ok
  for tries in $(seq 200); do
    p=$((PORT_LOW + RANDOM % (PORT_HIGH - PORT_LOW - count)))
    ok=1
    for i in $(seq 0 $((count - 1))); do
      if port_busy $((p + i)); then
        ok=0
        break
      fi
    done
    if [ "$ok" = 1 ]; then
      echo "$p"
      return 0
    fi
  done
  die "no free port range of $count on 127.0.0.1"
}

write_conf() {
  local dir="$1" fsid="$2" mon="$3" osd="$4" rgw="$5"
  cat >"$dir/ceph.conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$mon]
mon initial members = a
public addr = 127.0.0.1
ms bind ipv4 = true
ms bind ipv6 = false
ms bind msgr1 = false
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc secure
ms client mode = crc secure
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
run dir = $dir/run
log file = $dir/\$name.log
admin socket = $dir/run/\$name.\$pid.asok
keyring = /dev/null
[mon]
mon data = $dir/mon
paxos propose interval = 0.05
mon data avail warn = 1
mon data avail crit = 0
[osd]
osd data = $dir/osd
osd objectstore = memstore
memstore device bytes = ${RGW_MEMSTORE_BYTES:-6442450944}
ms bind port min = $osd
ms bind port max = $((osd + OSD_PORTS - 1))
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$rgw tcp_nodelay=1
rgw data = $dir/rgw
rgw crypt require ssl = false
EOF
}

# Starts a daemon in its own session (so a terminal's Ctrl-C or a killed parent does not take
# it down half-way; `stop` and the watchdog do) and records its pid.
spawn() {
  local dir="$1" name="$2"
  shift 2
  # The watchdog (or a `stop`) ended the cluster while it was starting: start nothing more.
  [ -e "$dir/pids" ] || die "stopped while starting"
  setsid "$@" -c "$dir/ceph.conf" -f >"$dir/$name.out" 2>&1 </dev/null 9>&- &
  echo "$! $name" >>"$dir/pids"
}

# Runs a command for at most WAIT_LIMIT seconds; on failure shows the named log's tail.
bounded() {
  local log="$1"
  shift
  if ! timeout "$WAIT_LIMIT" "$@"; then
    echo "rgw: '$*' failed or timed out; last lines of $log:" >&2
    tail -n 20 "$log" >&2 || true
    return 1
  fi
}

wait_for() {
  local what="$1" log="$2"
  shift 2
  local end=$((SECONDS + WAIT_LIMIT))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$end" ]; then
      echo "rgw: $what did not come up within ${WAIT_LIMIT}s; last lines of $log:" >&2
      tail -n 20 "$log" >&2 || true
      return 1
    fi
    sleep 0.05
  done
}

start_mon() {
  local dir="$1" fsid="$2" mon="$3"
  monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon]" "$dir/monmap" >/dev/null
  ceph-mon -c "$dir/ceph.conf" --mkfs -i a --monmap "$dir/monmap" >"$dir/mon-mkfs.out" 2>&1
  spawn "$dir" mon.a ceph-mon -i a
  wait_for "the monitor" "$dir/mon.a.log" port_busy "$mon"
}

start_osd() {
  local dir="$1" uuid id
  uuid="$(cat /proc/sys/kernel/random/uuid)"
  id="$(bounded "$dir/mon.a.log" ceph -c "$dir/ceph.conf" osd new "$uuid")"
  ceph-osd -c "$dir/ceph.conf" -i "$id" --mkfs --osd-uuid "$uuid" >"$dir/osd-mkfs.out" 2>&1
  spawn "$dir" "osd.$id" ceph-osd -i "$id"
}

# S3 users and the extra storage class. radosgw-admin waits for the OSD (its first write
# creates the RGW pools), so this also waits until the OSD is up.
setup_rgw() {
  local dir="$1"
  local admin=(radosgw-admin -c "$dir/ceph.conf" -n client.rgw.a)
  bounded "$dir/osd.0.log" "${admin[@]}" user create --uid testing --display-name testing \
    --access-key testing --secret testing-secret >/dev/null
  bounded "$dir/client.rgw.a.log" "${admin[@]}" user create --tenant tenant2 --uid testing2 \
    --display-name testing2 --access-key testing2 --secret testing2-secret >/dev/null
  # STANDARD_IA shares the data pool: a label for tests, no extra pool to create.
  bounded "$dir/client.rgw.a.log" "${admin[@]}" zonegroup placement add --rgw-zonegroup default \
    --placement-id default-placement --storage-class STANDARD_IA >/dev/null
  bounded "$dir/client.rgw.a.log" "${admin[@]}" zone placement add --rgw-zone default \
    --placement-id default-placement --storage-class STANDARD_IA \
    --data-pool default.rgw.buckets.data >/dev/null
}

s3() {
  curl -sf -o /dev/null --aws-sigv4 "aws:amz:us-east-1:s3" --user testing:testing-secret \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$@"
}

# One round trip of each kind that creates pools (bucket index, data, multipart), so that
# the first test does not pay for it; then the bucket goes away.
warm_up() {
  local ep="$1" b="warm-up-$RANDOM$RANDOM" upload
  s3 -X PUT "$ep/$b"
  s3 -X PUT --data-binary warm "$ep/$b/object"
  upload="$(curl -sf --aws-sigv4 "aws:amz:us-east-1:s3" --user testing:testing-secret \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -X POST "$ep/$b/multipart?uploads=" |
    sed -n 's:.*<UploadId>\(.*\)</UploadId>.*:\1:p')"
  [ -n "$upload" ] || return 1
  s3 -X DELETE "$ep/$b/multipart?uploadId=$upload"
  s3 -X DELETE "$ep/$b/object"
  s3 -X DELETE "$ep/$b"
}

# Polls every 0.5 s; ends by itself once the cluster is stopped (DIR/pids gone).
start_watchdog() {
  local dir="$1" owner="$2" q_dir q_self
  printf -v q_dir %q "$dir"
  printf -v q_self %q "$SELF"
  setsid bash -c "while kill -0 $owner 2>/dev/null && [ -e $q_dir/pids ]; do sleep 0.5; done
    [ -e $q_dir/pids ] && exec bash $q_self stop $q_dir" >"$dir/watchdog.out" 2>&1 </dev/null &
}

# On a failed start: stop what did start, and say where the logs are.
start_failed() {
  echo "rgw: start failed; the daemons' logs are in $START_DIR" >&2
  cmd_stop "$START_DIR" >/dev/null
}

cmd_start() {
  local dir="" owner=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --owner)
        owner="${2:?--owner needs a pid}"
        shift 2
        ;;
      *)
        [ -z "$dir" ] || die "usage: rgw.sh start DIR [--owner PID]"
        dir="$1"
        shift
        ;;
    esac
  done
  [ -n "$dir" ] || die "usage: rgw.sh start DIR [--owner PID]"
  cmd_install
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  [ ! -e "$dir/pids" ] || die "$dir already holds a cluster (stop it first)"
  rm -rf "$dir/mon" "$dir/osd" "$dir/rgw" "$dir/run" "$dir/monmap"
  mkdir -p "$dir/mon" "$dir/osd" "$dir/rgw" "$dir/run"
  : >"$dir/pids"
  START_DIR="$dir"
  trap start_failed EXIT
  [ -z "$owner" ] || start_watchdog "$dir" "$owner"

  # Ports are picked and bound under a lock, so that clusters starting at once never pick
  # the same ones.
  exec 9>"${TMPDIR:-/tmp}/s3-backfill-rgw-ports.lock"
  flock 9
  local mon osd rgw fsid ep
  mon="$(free_ports 1)"
  osd="$(free_ports "$OSD_PORTS")"
  rgw="$(free_ports 1)"
  while [ "$rgw" = "$mon" ] || { [ "$rgw" -ge "$osd" ] && [ "$rgw" -lt $((osd + OSD_PORTS)) ]; }; do
    rgw="$(free_ports 1)"
  done
  fsid="$(cat /proc/sys/kernel/random/uuid)"
  ep="http://127.0.0.1:$rgw"
  write_conf "$dir" "$fsid" "$mon" "$osd" "$rgw"

  say "monitor on 127.0.0.1:$mon"
  start_mon "$dir" "$fsid" "$mon"
  say "OSD (memstore) on 127.0.0.1:$osd-$((osd + OSD_PORTS - 1))"
  start_osd "$dir"
  say "S3 users testing, tenant2\$testing2; storage class STANDARD_IA"
  setup_rgw "$dir"
  say "radosgw on $ep"
  spawn "$dir" client.rgw.a radosgw -n client.rgw.a
  wait_for "radosgw" "$dir/client.rgw.a.log" curl -s -o /dev/null "$ep/"
  flock -u 9
  wait_for "the warm-up round trip" "$dir/client.rgw.a.log" warm_up "$ep"
  trap - EXIT
  echo "$ep" >"$dir/endpoint"
  echo "$ep"
}

# Kills a recorded daemon only if it is still the process started with DIR's config.
cmd_stop() {
  local dir="${1:?usage: rgw.sh stop DIR}" pid name
  [ -e "$dir/pids" ] || return 0
  while read -r pid name; do
    if grep -qsF "$dir/ceph.conf" "/proc/$pid/cmdline" 2>/dev/null; then
      # SIGKILL: memstore would otherwise write the whole object store to disk on exit.
      kill -9 "$pid" 2>/dev/null || true
      say "stopped $name (pid $pid)"
    fi
  done <"$dir/pids"
  rm -f "$dir/pids" "$dir/endpoint"
  rm -rf "$dir/mon" "$dir/osd" "$dir/rgw" "$dir/run" "$dir/monmap"
}

case "${1:-}" in
  install) cmd_install ;;
  start)
    shift
    cmd_start "$@"
    ;;
  stop) cmd_stop "${2:-}" ;;
  *) die "usage: rgw.sh install | start DIR [--owner PID] | stop DIR" ;;
esac
