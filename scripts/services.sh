#!/usr/bin/env bash
# Makes sure the programs the service tests start are installed: PostgreSQL server binaries
# (tests run throwaway clusters on private ports) and the S3-compatible server s3s-fs.
# Prints `KEY=VALUE` lines for the test environment on stdout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf 'services: %s\n' "$*" >&2; }

pg_bin=""
for d in /usr/lib/postgresql/*/bin; do
    if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then
        pg_bin="$d"
    fi
done
if [[ -z "$pg_bin" ]]; then
    log "installing PostgreSQL server binaries (Debian package postgresql)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x "$d/initdb" ]] && pg_bin="$d"
    done
fi
[[ -n "$pg_bin" ]] || { log "no PostgreSQL binaries found"; exit 1; }
log "PostgreSQL binaries in $pg_bin"

s3_bin="$(bash scripts/s3-server.sh | tail -n 1)"
log "s3s-fs at $s3_bin"

echo "SHARDPRESS_TEST_PG_BIN=$pg_bin"
echo "SHARDPRESS_S3FS_BIN=$s3_bin"
