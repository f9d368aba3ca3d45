#!/usr/bin/env bash
# The project's test command: fetches the real test model, prepares the Python
# environment of the output verifier, installs the service test dependencies (PostgreSQL
# binaries, the s3s-fs S3 server), then runs every Rust test.
#
#   scripts/test.sh [extra cargo test arguments]
#
# Downloads are cached under ${SHARDPRESS_CACHE:-$HOME/.cache/shardpress}.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

section() { printf '\n==> %s\n' "$*"; }

section "test model (all-MiniLM-L6-v2)"
SHARDPRESS_MODEL_DIR="$(bash scripts/fetch-model.sh | tail -n 1)"
echo "SHARDPRESS_MODEL_DIR=$SHARDPRESS_MODEL_DIR"

section "python environment of the verifier"
SHARDPRESS_PYTHON="$(bash scripts/python-env.sh | tail -n 1)"
echo "SHARDPRESS_PYTHON=$SHARDPRESS_PYTHON"

section "service dependencies (PostgreSQL binaries, S3 server)"
service_env="$(bash scripts/services.sh)"
while IFS='=' read -r key value; do
    [[ -n "$key" ]] || continue
    export "$key=$value"
    echo "$key=$value"
done <<< "$service_env"

export SHARDPRESS_MODEL_DIR SHARDPRESS_PYTHON

section "python checker self-tests"
"$SHARDPRESS_PYTHON" -m unittest discover -s tests/python -q

section "cargo test --workspace --locked"
cargo test --workspace --locked "$@"
