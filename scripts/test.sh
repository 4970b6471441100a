#!/usr/bin/env bash
# Runs the whole test suite against real PostgreSQL and NATS (installed and started if missing):
# formatting, clippy, then every unit, integration and fault test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
export DATABASE_URL="${DATABASE_URL:-$DATABASE_URL_ADMIN}"

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --all-targets --locked --no-fail-fast
