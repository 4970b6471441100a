#!/usr/bin/env bash
# Brings up everything Nura needs on this machine and runs the whole system in one process:
# PostgreSQL and nats-server (installed if missing), the database `nura`, a development JWT
# secret, then `nura serve` (HTTP API, relay and projectors) on $LISTEN_ADDR (127.0.0.1:8080).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh

psql "$DATABASE_URL_ADMIN" -Atc "SELECT 1 FROM pg_database WHERE datname = 'nura'" | grep -q 1 \
  || psql "$DATABASE_URL_ADMIN" -qc "CREATE DATABASE nura"
export DATABASE_URL="${DATABASE_URL:-${DATABASE_URL_ADMIN%/*}/nura}"

# A per-machine development secret, kept so tokens stay valid across restarts.
if [ -z "${JWT_SECRET:-}" ]; then
  [ -s "$STATE_DIR/jwt-secret" ] || head -c 48 /dev/urandom | base64 | tr -d '\n=+/' >"$STATE_DIR/jwt-secret"
  JWT_SECRET="$(cat "$STATE_DIR/jwt-secret")"
  export JWT_SECRET
fi
export LISTEN_ADDR="${LISTEN_ADDR:-127.0.0.1:8080}"

cargo build --release --locked --bin nura
echo "==> nura serve on http://$LISTEN_ADDR  (token: JWT_SECRET=\$(cat $STATE_DIR/jwt-secret) target/release/nura token --tenant acme --user alice)" >&2
exec target/release/nura serve
