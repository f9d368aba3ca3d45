#!/usr/bin/env bash
# Creates (or reuses) the Python virtual environment used by the verifier
# tests/python/verify_output.py: numpy and safetensors from PyPI, pinned in
# tests/python/requirements.txt; plus the packages of tests/python/test_deploy.py.
#
# Environment:
#   SHARDPRESS_CACHE  cache root (default: $HOME/.cache/shardpress)
#   PYTHON            base interpreter (default: python3)
#
# Progress goes to stderr; the last line on stdout is the venv's python.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirements="$repo/tests/python/requirements.txt"
PYTHON="${PYTHON:-python3}"
cache="${SHARDPRESS_CACHE:-${HOME:-/tmp}/.cache/shardpress}"
venv="$cache/venv"
py="$venv/bin/python"
# tests/python/test_deploy.py: PyYAML, and kubernetes-validate, which bundles the Kubernetes
# JSON schemas so the manifests are validated offline.
deploy_packages=(PyYAML==6.0.3 kubernetes-validate==1.37.0)
# Written after a successful install; holds the requirements it was made from.
stamp="$venv/.shardpress-requirements"

wanted() { cat "$requirements"; printf '%s\n' "${deploy_packages[@]}"; }

log() { printf 'python-env: %s\n' "$*" >&2; }

usable() {
    [[ -x "$py" ]] &&
        "$py" -c 'import numpy, safetensors.numpy, yaml, kubernetes_validate' >/dev/null 2>&1 &&
        [[ -f "$stamp" ]] && cmp -s "$stamp" <(wanted)
}

if usable; then
    log "reusing $venv"
    printf '%s\n' "$py"
    exit 0
fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    log "$PYTHON not found; install Python 3 (e.g. apt-get install -y python3 python3-venv)"
    exit 1
fi

try_venv() {
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv" >&2 && [[ -x "$py" ]] && "$py" -m pip --version >/dev/null 2>&1
}

try_apt_venv() {
    # Debian ships ensurepip separately in python3-venv; only useful when the
    # base interpreter is Debian's own.
    local resolved
    resolved="$(readlink -f "$(command -v "$PYTHON")")"
    [[ "$resolved" == /usr/bin/* ]] || return 1
    command -v apt-get >/dev/null 2>&1 || return 1
    [[ "$(id -u)" == 0 ]] || return 1
    log "installing Debian's python3-venv"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2; then
        apt-get update -qq >&2 || return 1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2 || return 1
    fi
    try_venv
}

try_virtualenv() {
    if ! "$PYTHON" -m virtualenv --version >/dev/null 2>&1; then
        log "installing virtualenv with pip --user"
        "$PYTHON" -m pip install --user --quiet --disable-pip-version-check virtualenv >&2 ||
            "$PYTHON" -m pip install --user --quiet --disable-pip-version-check \
                --break-system-packages virtualenv >&2 ||
            return 1
    fi
    rm -rf "$venv"
    "$PYTHON" -m virtualenv --quiet "$venv" >&2 && [[ -x "$py" ]]
}

mkdir -p "$cache"
log "creating $venv"
if ! try_venv; then
    log "'$PYTHON -m venv' failed (ensurepip missing?); trying fallbacks"
    if ! try_apt_venv && ! try_virtualenv; then
        rm -rf "$venv"
        log "could not create a virtual environment; install python3-venv or virtualenv"
        exit 1
    fi
fi

log "installing $(grep -v '^#' "$requirements" | tr '\n' ' ')${deploy_packages[*]}"
"$py" -m pip install --quiet --disable-pip-version-check --only-binary=:all: \
    -r "$requirements" "${deploy_packages[@]}" >&2
"$py" -c 'import numpy, safetensors.numpy, yaml, kubernetes_validate' >&2
wanted > "$stamp"
printf '%s\n' "$py"
