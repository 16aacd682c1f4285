#!/usr/bin/env bash
# A throwaway PostgreSQL 15 cluster on 127.0.0.1, for the tests and by hand.
#
#   bash scripts/pg.sh install                        apt packages when missing (postgresql-15)
#   bash scripts/pg.sh start DIR [PORT] [--owner PID] a cluster in DIR; prints its DSN (one stdout line)
#   bash scripts/pg.sh stop DIR                       stops it (fast shutdown); fine if not running
#   bash scripts/pg.sh restart DIR [fast|immediate]   stops and starts it again, same port and data;
#                                                     immediate: as a crash (no checkpoint; the
#                                                     server recovers from its WAL on start)
#   bash scripts/pg.sh status DIR                     exit 0 and the DSN when running, 3 when not
#
# The cluster: initdb with trust authentication for everyone (nothing listens beyond
# 127.0.0.1 and the socket directory DIR/run), UTF8, superuser `postgres`; the port given or a
# free one; fsync and synchronous commit on (tests kill processes and restart the server: what
# was committed must stay), small WAL (wal_level minimal) and memory (shared_buffers 64MB),
# max_connections 200. The DSN is postgres://postgres@127.0.0.1:PORT/postgres, also kept in
# DIR/dsn. The server's log is DIR/log (initdb's output too).
#
# PostgreSQL refuses to run as root: run as root, the script runs the server as the
# unprivileged user `postgres` (created by Debian's package; created here if missing) and
# gives it DIR; run as anyone else, it runs the server as that user.
#
# `start` on a DIR whose cluster was stopped starts that cluster again (its data kept); on a
# new DIR it runs initdb. With --owner PID a watchdog stops the cluster and drops its data
# (keeping DIR/log) when process PID goes away (the test harness passes its own pid, so
# nothing outlives a killed test binary).
set -euo pipefail

SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
PACKAGES=(postgresql-15 postgresql-client-15)
DEBIAN_BIN=/usr/lib/postgresql/15/bin
# Seconds pg_ctl waits for the server to start or stop.
WAIT_LIMIT="${PG_WAIT_LIMIT:-60}"
# Ports are picked in this range: below Linux's ephemeral range (so an outgoing connection
# cannot hold one) and apart from scripts/rgw.sh's 20000-32000.
PORT_LOW=15000
PORT_HIGH=19999
RUN_AS=postgres

say() { echo "pg: $*" >&2; }
die() {
  echo "pg: error: $*" >&2
  exit 1
}

# The directory of initdb, pg_ctl and psql: Debian's, else the ones on PATH.
bin_dir() {
  if [ -x "$DEBIAN_BIN/initdb" ]; then
    echo "$DEBIAN_BIN"
  elif command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v initdb)"
  else
    return 1
  fi
}

cmd_install() {
  [ -x "$DEBIAN_BIN/initdb" ] && return 0
  say "installing ${PACKAGES[*]} with apt"
  bash "$(dirname "$SELF")/apt-install.sh" "${PACKAGES[@]}"
  [ -x "$DEBIAN_BIN/initdb" ] || die "still no $DEBIAN_BIN/initdb after apt"
  say "installed $("$DEBIAN_BIN/postgres" --version)"
}

# Runs a command as the cluster's user: as `postgres` when we are root, else as ourselves.
# From DIR, so that a working directory the user cannot read (/root) does not matter.
as_owner() {
  local dir="$1"
  shift
  if [ "$(id -u)" = 0 ]; then
    (cd "$dir" && runuser -u "$RUN_AS" -- "$@")
  else
    (cd "$dir" && "$@")
  fi
}

# As root: the unprivileged user exists, owns DIR and can reach it.
prepare_owner() {
  local dir="$1"
  [ "$(id -u)" = 0 ] || return 0
  if ! id -u "$RUN_AS" >/dev/null 2>&1; then
    say "creating the system user $RUN_AS (PostgreSQL does not run as root)"
    useradd --system --user-group --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin "$RUN_AS"
  fi
  chown -R "$RUN_AS:" "$dir"
  runuser -u "$RUN_AS" -- test -w "$dir" ||
    die "user $RUN_AS cannot write $dir (a parent directory is closed to it); use a DIR under /tmp"
}

port_busy() {
  (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

free_port() {
  local tries p
  for tries in $(seq 200); do
    p=$((PORT_LOW + RANDOM % (PORT_HIGH - PORT_LOW)))
    if ! port_busy "$p"; then
      echo "$p"
      return 0
    fi
  done
  die "no free port on 127.0.0.1 in $PORT_LOW-$PORT_HIGH"
}

dsn_of() {
  echo "postgres://postgres@127.0.0.1:$1/postgres"
}

# DIR as an absolute path (it must exist).
absolute() {
  [ -d "$1" ] || die "no directory $1"
  (cd "$1" && pwd)
}

running() {
  local dir="$1"
  [ -e "$dir/data/postmaster.pid" ] &&
    as_owner "$dir" "$BIN/pg_ctl" status -D "$dir/data" >/dev/null 2>&1
}

write_conf() {
  local dir="$1" port="$2"
  cat >>"$dir/data/postgresql.conf" <<EOF

# scripts/pg.sh: a throwaway cluster, durable but small.
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir/run'
max_connections = 200
shared_buffers = 64MB
huge_pages = off
fsync = on
synchronous_commit = on
full_page_writes = on
wal_level = minimal
max_wal_senders = 0
max_wal_size = 1GB
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
EOF
}

# Polls every 0.5 s; stops the cluster and drops its data once the owner is gone.
start_watchdog() {
  local dir="$1" owner="$2" q_dir q_self
  printf -v q_dir %q "$dir"
  printf -v q_self %q "$SELF"
  setsid bash -c "while kill -0 $owner 2>/dev/null && [ -e $q_dir/data ]; do sleep 0.5; done
    bash $q_self stop $q_dir; rm -rf $q_dir/data $q_dir/run" >"$dir/watchdog.out" 2>&1 </dev/null 9>&- &
}

cmd_start() {
  local dir="" port="" owner=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --owner)
        owner="${2:?--owner needs a pid}"
        shift 2
        ;;
      *)
        if [ -z "$dir" ]; then
          dir="$1"
        elif [ -z "$port" ]; then
          port="$1"
        else
          die "usage: pg.sh start DIR [PORT] [--owner PID]"
        fi
        shift
        ;;
    esac
  done
  [ -n "$dir" ] || die "usage: pg.sh start DIR [PORT] [--owner PID]"
  if [ -n "$port" ]; then
    [[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] ||
      die "port $port is not a number in 1..65535"
  fi
  BIN="$(bin_dir)" || die "no initdb/pg_ctl ($DEBIAN_BIN or PATH); run: bash scripts/pg.sh install"
  mkdir -p "$dir"
  dir="$(absolute "$dir")"
  if running "$dir"; then
    die "$dir already holds a running cluster ($(cat "$dir/dsn" 2>/dev/null)); stop it first"
  fi
  mkdir -p "$dir/run"
  prepare_owner "$dir"

  # The port is picked and bound under a lock, so that clusters starting at once never pick
  # the same one.
  exec 9>"${TMPDIR:-/tmp}/s3-backfill-pg-ports.$(id -u).lock"
  flock 9
  if [ -e "$dir/data/PG_VERSION" ]; then
    # A stopped cluster: start it again on its port (or the one given now).
    if [ -n "$port" ]; then
      sed -i "s/^port = .*/port = $port/" "$dir/data/postgresql.conf"
    else
      port="$(sed -n 's/^port = \([0-9]*\).*/\1/p' "$dir/data/postgresql.conf" | tail -n 1)"
    fi
    say "starting the cluster in $dir/data again"
  else
    [ -n "$port" ] || port="$(free_port)"
    say "initdb in $dir/data"
    rm -rf "$dir/data"
    as_owner "$dir" "$BIN/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C \
      --no-sync --no-instructions >>"$dir/log" 2>&1 ||
      {
        tail -n 20 "$dir/log" >&2
        die "initdb failed; its output is in $dir/log"
      }
    write_conf "$dir" "$port"
  fi
  port_busy "$port" && die "port $port on 127.0.0.1 is in use"
  [ -z "$owner" ] || start_watchdog "$dir" "$owner"
  # The log file must be the server user's to append to.
  touch "$dir/log"
  [ "$(id -u)" != 0 ] || chown "$RUN_AS:" "$dir/log"
  if ! as_owner "$dir" "$BIN/pg_ctl" start -D "$dir/data" -l "$dir/log" -w -t "$WAIT_LIMIT" \
    >/dev/null 2>&1 9>&-; then
    tail -n 20 "$dir/log" >&2
    die "the server did not start; its log is $dir/log"
  fi
  flock -u 9
  dsn_of "$port" >"$dir/dsn"
  say "PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$port, socket in $dir/run, log $dir/log"
  cat "$dir/dsn"
}

cmd_stop() {
  local dir="${1:?usage: pg.sh stop DIR}"
  [ -d "$dir/data" ] || return 0
  dir="$(absolute "$dir")"
  BIN="$(bin_dir)" || die "no pg_ctl ($DEBIAN_BIN or PATH)"
  if running "$dir"; then
    as_owner "$dir" "$BIN/pg_ctl" stop -D "$dir/data" -m fast -w -t "$WAIT_LIMIT" >/dev/null
    say "stopped the cluster in $dir"
  fi
}

cmd_restart() {
  local dir="${1:?usage: pg.sh restart DIR [fast|immediate]}" mode="${2:-fast}"
  case "$mode" in
    fast | immediate) ;;
    *) die "restart mode $mode: expected fast or immediate" ;;
  esac
  dir="$(absolute "$dir")"
  [ -e "$dir/data/PG_VERSION" ] || die "no cluster in $dir (start one first)"
  BIN="$(bin_dir)" || die "no pg_ctl ($DEBIAN_BIN or PATH)"
  # Every setting is in postgresql.conf, so the port and socket stay what they were.
  if ! as_owner "$dir" "$BIN/pg_ctl" restart -D "$dir/data" -m "$mode" -l "$dir/log" -w \
    -t "$WAIT_LIMIT" >/dev/null 2>&1; then
    tail -n 20 "$dir/log" >&2
    die "the server did not restart; its log is $dir/log"
  fi
  say "restarted the cluster in $dir ($mode)"
  cat "$dir/dsn"
}

cmd_status() {
  local dir="${1:?usage: pg.sh status DIR}"
  [ -d "$dir" ] || die "no directory $dir"
  dir="$(absolute "$dir")"
  BIN="$(bin_dir)" || die "no pg_ctl ($DEBIAN_BIN or PATH)"
  if running "$dir"; then
    cat "$dir/dsn"
  else
    say "no cluster running in $dir"
    return 3
  fi
}

case "${1:-}" in
  install) cmd_install ;;
  start)
    shift
    cmd_start "$@"
    ;;
  stop) cmd_stop "${2:-}" ;;
  restart) cmd_restart "${2:-}" "${3:-fast}" ;;
  status) cmd_status "${2:-}" ;;
  *) die "usage: pg.sh install | start DIR [PORT] [--owner PID] | stop DIR | restart DIR [fast|immediate] | status DIR" ;;
esac
