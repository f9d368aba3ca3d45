#!/usr/bin/env bash
# Memory benchmark: peak RSS of `shardpress compress` and of a worker on a synthetic
# Llama-shaped bf16 checkpoint whose embedding (1 GiB) is at least 4x the memory limit, with
# and without --memory-limit. Prints peak RSS / (limit + 64 MiB) per run; it must stay <= 1.0.
#
#   scripts/bench-memory.sh [--limit 256MiB] [--presets "w8a16 w4a16 ..."] [--no-worker]
#                           [--coordinator-only]
#
# The checkpoint (about 1.7 GB) is generated once into ${SHARDPRESS_CACHE:-~/.cache/shardpress}/bench.
# The worker part runs PostgreSQL (the machine's, started if down), s3s-fs and a coordinator
# on 127.0.0.1, like deploy/local/cluster.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

limit=256MiB
presets="bf16 w8a16 w4a16 fp8 sparse50 bench/recipes/all-int4.toml bench/recipes/all-sparse50.toml"
worker_presets="w4a16 bench/recipes/all-int4.toml"
run_worker=1
run_compress=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --limit) limit="$2"; shift ;;
        --presets) presets="$2"; shift ;;
        --worker-presets) worker_presets="$2"; shift ;;
        --no-worker) run_worker=0 ;;
        --coordinator-only) run_compress=0 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

cache="${SHARDPRESS_CACHE:-$HOME/.cache/shardpress}"
bench="$cache/bench"
model="$bench/llama-synth"
work="$bench/work"
mkdir -p "$bench" "$work"

echo "==> build (release)" >&2
cargo build --release --locked -p shardpress-cli -p shardpress-testkit --bins >&2
bin="$PWD/target/release/shardpress"

if [[ "$run_compress" == 1 && ! -f "$model/.complete" ]]; then
    echo "==> generating $model" >&2
    rm -rf "$model"
    target/release/synth-llama "$model" vocab=131072 hidden=4096 intermediate=11008 layers=2 >&2
    touch "$model/.complete"
fi

limit_bytes="$(python3 -c '
import re, sys
t = sys.argv[1].strip()
m = re.fullmatch(r"([0-9.]+)\s*([A-Za-z]*)", t)
units = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
         "ki": 1024, "kib": 1024, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30}
print(int(float(m.group(1)) * units[m.group(2).lower()]))' "$limit")"
allowed=$((limit_bytes + 64 * 1024 * 1024))
if [[ "$run_compress" == 1 ]]; then
largest="$(python3 -c '
import json, struct, sys
with open(sys.argv[1], "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    h = json.loads(f.read(n))
print(max(v["data_offsets"][1] - v["data_offsets"][0] for k, v in h.items() if k != "__metadata__"))' "$model/model.safetensors")"
echo "checkpoint: $(du -sh "$model" | cut -f1), largest tensor $((largest >> 20)) MiB = $(python3 -c "print(round($largest / $limit_bytes, 1))")x the limit of $limit"
echo

# Peak RSS in KiB of a command (GNU time's maximum resident set size).
peak_kib() {
    local log="$work/time.log"
    /usr/bin/time -f '%M %e' -o "$log" "$@" >/dev/null
    cat "$log"
}

ratio() { python3 -c "print(f'{$1 * 1024 / $allowed:.2f}')"; }

printf '%-10s %-13s %12s %8s %20s %12s\n' "compress" "recipe" "peak RSS" "secs" "peak/(limit+64MiB)" "no-limit"
for p in $presets; do
    name="$(basename "$p" .toml)"
    read -r rss secs < <(peak_kib "$bin" compress "$model" --recipe "$p" --out "$work/out" \
        --overwrite --quiet --memory-limit "$limit")
    read -r free_rss free_secs < <(peak_kib "$bin" compress "$model" --recipe "$p" \
        --out "$work/out-free" --overwrite --quiet)
    if ! cmp -s "$work/out/model.safetensors.index.json" "$work/out-free/model.safetensors.index.json" \
        || ! diff -rq "$work/out" "$work/out-free" >/dev/null; then
        echo "$name: output differs with and without the limit" >&2
        exit 1
    fi
    printf '%-10s %-13s %8s MiB %8s %20s %8s MiB\n' "" "$name" "$((rss / 1024))" "$secs" \
        "$(ratio "$rss")" "$((free_rss / 1024))"
done
rm -rf "$work/out" "$work/out-free"
fi

if [[ "$run_worker" == 0 && "$run_compress" == 1 ]]; then
    exit 0
fi

echo
echo "==> worker runs (coordinator, s3s-fs and PostgreSQL on 127.0.0.1)" >&2
state="$work/cluster"
rm -rf "$state"
mkdir -p "$state/s3/bench-in" "$state/s3/bench-out" "$state/logs"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start
    for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi
PGOPTIONS='--client-min-messages=warning' psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS shardpress_bench"
psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE shardpress_bench"
export AWS_ACCESS_KEY_ID=shardpress-bench AWS_SECRET_ACCESS_KEY=shardpress-bench-secret AWS_REGION=us-east-1
s3_port="${SHARDPRESS_BENCH_S3_PORT:-9310}"
grpc_port="${SHARDPRESS_BENCH_GRPC_PORT:-50061}"
endpoint="http://127.0.0.1:$s3_port"
export SHARDPRESS_COORDINATOR="http://127.0.0.1:$grpc_port"
s3fs="$(bash scripts/s3-server.sh | tail -n 1)"
"$s3fs" --host 127.0.0.1 --port "$s3_port" --access-key "$AWS_ACCESS_KEY_ID" \
    --secret-key "$AWS_SECRET_ACCESS_KEY" "$state/s3" > "$state/logs/s3.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$s3_port") 2>/dev/null && break; sleep 0.1; done
# Uploaded through the S3 API so the server records each object's checksum once (it would
# hash the whole file on every ranged read of a file placed in its directory by hand).
if [[ "$run_compress" == 1 ]]; then
echo "==> upload the checkpoint to s3://bench-in/llama/" >&2
aws --endpoint-url "$endpoint" s3 cp --recursive --only-show-errors \
    --exclude .complete "$model" s3://bench-in/llama/
fi
"$bin" coordinator --listen "127.0.0.1:$grpc_port" \
    --database-url "postgres://postgres@127.0.0.1:5432/shardpress_bench" \
    --s3-endpoint "$endpoint" --s3-path-style > "$state/logs/coordinator.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do "$bin" list >/dev/null 2>&1 && break; sleep 0.2; done

# Runs one job on a fresh worker and prints the worker's peak RSS in KiB.
worker_job() {
    local recipe="$1" tag="$2"; shift 2
    "$bin" worker --s3-endpoint "$endpoint" --s3-path-style --worker-id "bench-$tag" "$@" \
        > "$state/logs/worker-$tag.log" 2>&1 &
    local wpid=$!
    local job
    job="$("$bin" submit s3://bench-in/llama/ --recipe "$recipe" --out "s3://bench-out/$tag/")"
    "$bin" watch "$job" >/dev/null 2>&1 || true
    local state_line
    state_line="$("$bin" status "$job" | head -n 3 | tr '\n' ' ')"
    local hwm
    hwm="$(awk '/VmHWM/ {print $2}' "/proc/$wpid/status")"
    kill "$wpid"; wait "$wpid" 2>/dev/null || true
    case "$state_line" in
        *succeeded*) ;;
        *) echo "job $job did not succeed: $state_line" >&2; exit 1 ;;
    esac
    echo "$hwm"
}

if [[ "$run_compress" == 1 ]]; then
printf '%-10s %-13s %12s %8s %20s %12s\n' "worker" "recipe" "peak RSS" "" "peak/(limit+64MiB)" "no-limit"
i=0
for p in $worker_presets; do
    name="$(basename "$p" .toml)"
    i=$((i + 1))
    rss="$(worker_job "$p" "limit-$i" --memory-limit "$limit")"
    free_rss="$(worker_job "$p" "free-$i")"
    if ! diff -rq "$state/s3/bench-out/limit-$i" "$state/s3/bench-out/free-$i" >/dev/null; then
        echo "$name: worker output differs with and without the limit" >&2
        exit 1
    fi
    printf '%-10s %-13s %8s MiB %8s %20s %8s MiB\n' "" "$name" "$((rss / 1024))" "" \
        "$(ratio "$rss")" "$((free_rss / 1024))"
    rm -rf "$state/s3/bench-out/limit-$i" "$state/s3/bench-out/free-$i"
done
fi

# Coordinator planning: only headers are read, so its memory follows the number of tensors,
# not the bytes. Plans checkpoints of 400 and 4000 small shards (one layer each) and prints
# the coordinator's peak resident memory after each plan.
make_shards() {
    python3 - "$1" "$2" <<'PY'
import json, os, struct, sys
out, n = sys.argv[1], int(sys.argv[2])
os.makedirs(out, exist_ok=True)
total = n * 4 * 64 * 64
weight_map = {}
for i in range(n):
    name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    tensor = f"model.layers.{i}.mlp.down_proj.weight"
    header = {tensor: {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 64 * 64 * 4]}}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(out, name), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + bytes(64 * 64 * 4))
    weight_map[tensor] = name
with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
PY
}

echo
base="$(awk '/VmHWM/ {print $2}' "/proc/${pids[1]}/status")"
printf '%-10s %-13s %12s\n' "coordinator" "shards" "peak RSS"
printf '%-10s %-13s %8s MiB\n' "" "(before)" "$((base / 1024))"
for n in 400 4000; do
    make_shards "$state/s3/bench-in/shards-$n" "$n"
    job="$("$bin" submit "s3://bench-in/shards-$n/" --recipe w8a16 --out "s3://bench-out/shards-$n/")"
    for _ in $(seq 600); do
        total="$("$bin" status "$job" --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)["tasks_total"])')"
        [[ "$total" -gt 0 ]] && break
        sleep 0.2
    done
    rss="$(awk '/VmHWM/ {print $2}' "/proc/${pids[1]}/status")"
    "$bin" cancel "$job" >/dev/null
    printf '%-10s %-13s %8s MiB\n' "" "$n" "$((rss / 1024))"
done
