#!/usr/bin/env bash
# Makes sure the programs the service tests start are installed: PostgreSQL server binaries
# (tests run throwaway clusters on private ports), the S3-compatible server s3s-fs, and a
# headless Chromium (Debian package chromium) that renders the HTML report in a test.
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

chromium="${SHARDPRESS_CHROMIUM:-$(command -v chromium || true)}"
if [[ -z "$chromium" ]]; then
    log "installing a headless browser (Debian package chromium)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends chromium >&2 \
        || { apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends chromium >&2; }
    chromium="$(command -v chromium)"
fi
log "chromium at $chromium"

echo "SHARDPRESS_TEST_PG_BIN=$pg_bin"
echo "SHARDPRESS_S3FS_BIN=$s3_bin"
echo "SHARDPRESS_CHROMIUM=$chromium"
