#!/usr/bin/env bash
# Fuzzes the parsers of untrusted input (safetensors headers, sharded checkpoints with an
# index, recipe files) with libFuzzer for a fixed time per target, then prints the figures.
#
#   scripts/fuzz.sh [seconds per target, default 60] [targets, default: header checkpoint recipe]
#
# Installs cargo-fuzz into ${SHARDPRESS_CACHE:-~/.cache/shardpress}/tools if missing. The
# toolchain is stable, so the few unstable compiler flags cargo-fuzz passes are allowed with
# RUSTC_BOOTSTRAP=1. Seeds are generated into fuzz/corpus/ (not committed); crashing inputs
# land in fuzz/artifacts/TARGET/ and make the script exit non-zero.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds="${1:-60}"
shift || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(header checkpoint recipe)

cache="${SHARDPRESS_CACHE:-$HOME/.cache/shardpress}"
tools="$cache/tools"
if [[ ! -x "$tools/bin/cargo-fuzz" ]]; then
    echo "==> installing cargo-fuzz into $tools (takes a few minutes)" >&2
    cargo install cargo-fuzz --version 0.13.1 --locked --root "$tools" >&2
fi
export PATH="$tools/bin:$PATH" RUSTC_BOOTSTRAP=1

echo "==> seeds" >&2
presets=(w4a16 w8a8 fp8 2of4-w4a16 sparse50)
mkdir -p fuzz/seeds-tmp
for p in "${presets[@]}"; do
    cargo run -q --release --locked --bin shardpress -- recipes "$p" > "fuzz/seeds-tmp/$p.toml"
done
python3 - fuzz/corpus fuzz/seeds-tmp/*.toml <<'PY'
import json, os, struct, sys
root = sys.argv[1]

def st(tensors, pad=0, meta=None):
    header, data, at = {}, b"", 0
    if meta is not None:
        header["__metadata__"] = meta
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(raw)]}
        data += raw
        at += len(raw)
    h = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(h)) + h + data

f32 = lambda n: struct.pack(f"<{n}f", *[i / 7 for i in range(n)])
seeds = {
    "header": {
        "two": st([("a.weight", "F32", [2, 3], f32(6)), ("a.bias", "BF16", [3], bytes(6))]),
        "scalar-empty": st([("s", "F32", [], f32(1)), ("z", "F16", [0, 4], b"")], pad=5),
        "meta": st([("w", "I64", [2], bytes(16))], meta={"format": "pt"}),
        "lfs": b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n",
    },
    "recipe": {},
}
# The checkpoint target reads the first half of its input as the index and splits the rest
# into two shards; pad so the halves line up.
index = json.dumps({"metadata": {"total_size": 32}, "weight_map": {
    "model.layers.0.w": "model-00001-of-00002.safetensors",
    "model.layers.1.w": "model-00002-of-00002.safetensors"}}).encode()
pad = 0
while True:
    a = st([("model.layers.0.w", "F32", [2, 2], f32(4))], pad=pad)
    b = st([("model.layers.1.w", "F32", [2, 2], f32(4))], pad=pad)
    if len(a) + len(b) >= len(index):
        break
    pad += 1
seeds["checkpoint"] = {"two-shards": index + b" " * (len(a) + len(b) - len(index)) + a + b}
for path in sys.argv[2:]:
    with open(path, "rb") as f:
        seeds["recipe"][os.path.basename(path)] = f.read()
for target, files in seeds.items():
    os.makedirs(os.path.join(root, target), exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(root, target, name), "wb") as f:
            f.write(data)
PY
rm -rf fuzz/seeds-tmp

failed=0
printf '%-12s %12s %10s %10s %8s\n' target runs "runs/s" corpus crashes
for t in "${targets[@]}"; do
    log="fuzz/fuzz-$t.log"
    status=0
    cargo fuzz run --fuzz-dir fuzz --sanitizer none "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -max_len=65536 -print_final_stats=1 > "$log" 2>&1 || status=$?
    runs="$(grep -oE 'Done [0-9]+ runs' "$log" | awk '{print $2}' | tail -n 1)"
    rate="$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$log" | awk '{print $2}' | tail -n 1)"
    corpus="$(find "fuzz/corpus/$t" -type f | wc -l)"
    crashes="$(find "fuzz/artifacts/$t" -type f 2>/dev/null | wc -l)"
    printf '%-12s %12s %10s %10s %8s\n' "$t" "${runs:-?}" "${rate:-?}" "$corpus" "$crashes"
    if [[ "$status" -ne 0 || "$crashes" -ne 0 ]]; then
        failed=1
        echo "$t: fuzzing failed (exit $status); see $log and fuzz/artifacts/$t" >&2
    fi
done
exit "$failed"
