#!/usr/bin/env bash
# Makes sure PostgreSQL and nats-server (with JetStream) are installed and running on this
# machine, and prints the environment Nura needs. Sourced by up.sh and test.sh.
# Works on Debian/Ubuntu as root or as a sudo user. Idempotent.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

PG_PORT="${PG_PORT:-5432}"
NATS_PORT="${NATS_PORT:-4222}"
STATE_DIR="${NURA_STATE_DIR:-$HOME/.local/share/nura}"
mkdir -p "$STATE_DIR"

as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

apt_install() {
  echo "==> installing $*" >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

ensure_postgres() {
  if ! port_open "$PG_PORT"; then
    if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then apt_install postgresql; fi
    echo "==> starting PostgreSQL" >&2
    if command -v pg_ctlcluster >/dev/null 2>&1; then
      local ver
      ver=$(ls /etc/postgresql | sort -V | tail -n1)
      $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main start >&2 2>/dev/null \
        || $SUDO pg_ctlcluster "$ver" main start >&2 || true
    fi
    port_open "$PG_PORT" || $SUDO service postgresql start >&2 || true
    for _ in $(seq 1 60); do port_open "$PG_PORT" && break; sleep 0.5; done
    port_open "$PG_PORT" || { echo "PostgreSQL did not start on port $PG_PORT" >&2; exit 1; }
  fi
  # A fresh Debian cluster asks TCP clients for a password: give the postgres role a known dev
  # password if we cannot log in over TCP yet (machines with trust auth are left alone).
  if ! PGPASSWORD=postgres psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
    echo "==> setting the postgres role's development password" >&2
    as_postgres psql -p "$PG_PORT" -qc "ALTER ROLE postgres PASSWORD 'postgres'" >&2
  fi
}

ensure_nats() {
  if port_open "$NATS_PORT"; then return; fi
  if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then apt_install nats-server; fi
  local bin
  bin=$(command -v nats-server || echo /usr/sbin/nats-server)
  echo "==> starting nats-server with JetStream (store: $STATE_DIR/nats)" >&2
  mkdir -p "$STATE_DIR/nats"
  nohup "$bin" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$STATE_DIR/nats" >"$STATE_DIR/nats-server.log" 2>&1 &
  for _ in $(seq 1 60); do port_open "$NATS_PORT" && break; sleep 0.25; done
  port_open "$NATS_PORT" || { echo "nats-server did not start; see $STATE_DIR/nats-server.log" >&2; exit 1; }
}

ensure_tools() {
  command -v psql >/dev/null 2>&1 || apt_install postgresql-client
  command -v cc >/dev/null 2>&1 || apt_install build-essential
  command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }
}

ensure_tools
ensure_postgres
ensure_nats

export DATABASE_URL_ADMIN="${DATABASE_URL_ADMIN:-postgres://postgres:postgres@127.0.0.1:$PG_PORT/postgres}"
export NATS_URL="${NATS_URL:-nats://127.0.0.1:$NATS_PORT}"
