#!/usr/bin/env bash
# Throughput benchmark: every kernel at 1 and 2 threads as a ratio to a memory baseline (a
# loop reading 2 bytes and writing 1 over the same input) measured in the same run; the
# numpy versions of the kernels when a Python with numpy is at hand; and `compress` of a
# generated ~1 GB Llama-shaped bf16 checkpoint against copying its files.
#
#   scripts/bench.sh [--no-numpy] [--no-e2e] [-- extra `shardpress bench` arguments]
#
# The checkpoint is generated once into target/bench/ (never committed). numpy comes from
# SHARDPRESS_PYTHON or, when unset, the venv of scripts/python-env.sh. Nothing is asserted:
# the figures are printed, with their targets.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

numpy=1
e2e=1
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --no-numpy) numpy=0 ;;
        --no-e2e) e2e=0 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

echo "==> build (release)" >&2
cargo build --release --locked -p shardpress-cli -p shardpress-testkit --bins >&2
bin="$PWD/target/release/shardpress"

args=()
if [[ "$e2e" == 1 ]]; then
    model="$PWD/target/bench/llama-1g"
    if [[ ! -f "$model/.complete" ]]; then
        echo "==> generating $model" >&2
        rm -rf "$model"
        target/release/synth-llama "$model" vocab=32000 hidden=2048 intermediate=5632 \
            layers=10 heads=16 kv_heads=4 >&2
        touch "$model/.complete"
    fi
    args+=(--checkpoint "$model" --scratch "$PWD/target/bench")
fi
if [[ "$numpy" == 1 && -z "${SHARDPRESS_PYTHON:-}" ]]; then
    SHARDPRESS_PYTHON="$(scripts/python-env.sh | tail -n 1)"
    export SHARDPRESS_PYTHON
fi
if [[ "$numpy" == 0 ]]; then
    unset SHARDPRESS_PYTHON
fi

echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p')" >&2
"$bin" bench "${args[@]}" "${extra[@]}"
