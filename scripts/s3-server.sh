#!/usr/bin/env bash
# Installs the S3-compatible test server s3s-fs (a single binary serving a local directory
# over the S3 API) into the Shardpress cache, unless it is already there.
#
# Version 0.14.1 is pinned: releases from 0.15 on need a newer rustc than the pinned toolchain.
#
# Environment:
#   SHARDPRESS_CACHE  cache root (default: $HOME/.cache/shardpress); the binary goes to
#                     $SHARDPRESS_CACHE/tools/bin/s3s-fs
#   CARGO             cargo executable (default: cargo)
#
# Progress goes to stderr; the last line on stdout is the path of the binary.
set -euo pipefail

VERSION="0.14.1"
CARGO="${CARGO:-cargo}"
cache="${SHARDPRESS_CACHE:-${HOME:-/tmp}/.cache/shardpress}"
root="$cache/tools"
bin="$root/bin/s3s-fs"

log() { printf 's3-server: %s\n' "$*" >&2; }

installed_version() {
    # `s3s-fs --version` prints e.g. "s3s-fs 0.14.1".
    "$bin" --version 2>/dev/null | awk '{print $2}'
}

if [[ -x "$bin" && "$(installed_version)" == "$VERSION" ]]; then
    log "s3s-fs $VERSION already installed"
else
    log "installing s3s-fs $VERSION into $root (takes a few minutes)"
    mkdir -p "$root"
    "$CARGO" install s3s-fs --version "$VERSION" --features binary --locked --root "$root" >&2
    if [[ ! -x "$bin" ]]; then
        log "cargo install finished but $bin is missing"
        exit 1
    fi
fi

printf '%s\n' "$bin"
