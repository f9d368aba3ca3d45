#!/usr/bin/env bash
# Runs the whole service on this machine and compresses the real test checkpoint through it:
# PostgreSQL (the machine's, started if down), the s3s-fs S3 server, one coordinator and N
# workers, all on 127.0.0.1. The checkpoint is uploaded, a job is submitted with the CLI and
# followed until it ends.
#
#   deploy/local/cluster.sh [up] [--workers N] [--recipe R]   start everything and run a job
#   deploy/local/cluster.sh down                              stop what `up` started
#
# State (logs, S3 data, pids) lives in ${SHARDPRESS_CACHE:-$HOME/.cache/shardpress}/local-cluster.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

cache="${SHARDPRESS_CACHE:-$HOME/.cache/shardpress}"
state="$cache/local-cluster"
pids="$state/pids"
workers=2
recipe=w8a16
cmd=up
while [[ $# -gt 0 ]]; do
    case "$1" in
        up|down) cmd="$1" ;;
        --workers) workers="$2"; shift ;;
        --recipe) recipe="$2"; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

stop_all() {
    if [[ -f "$pids" ]]; then
        while read -r pid; do kill "$pid" 2>/dev/null || true; done < "$pids"
        rm -f "$pids"
    fi
}

if [[ "$cmd" == down ]]; then
    stop_all
    echo "stopped"
    exit 0
fi

stop_all
mkdir -p "$state/s3/shardpress-in" "$state/s3/shardpress-out" "$state/logs"

s3_port="${SHARDPRESS_LOCAL_S3_PORT:-9300}"
grpc_port="${SHARDPRESS_LOCAL_GRPC_PORT:-50051}"
export AWS_ACCESS_KEY_ID=shardpress-local AWS_SECRET_ACCESS_KEY=shardpress-local-secret AWS_REGION=us-east-1
export SHARDPRESS_COORDINATOR="http://127.0.0.1:$grpc_port"
endpoint="http://127.0.0.1:$s3_port"

echo "==> PostgreSQL on 127.0.0.1:5432"
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start
    for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi
psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'shardpress'" | grep -q 1 \
    || psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE shardpress"
database_url="postgres://postgres@127.0.0.1:5432/shardpress"

echo "==> build"
cargo build --release --locked -p shardpress-cli
bin="$PWD/target/release/shardpress"
s3fs="$(bash scripts/s3-server.sh | tail -n 1)"
model="$(bash scripts/fetch-model.sh | tail -n 1)"

echo "==> S3 server on $endpoint"
"$s3fs" --host 127.0.0.1 --port "$s3_port" --access-key "$AWS_ACCESS_KEY_ID" \
    --secret-key "$AWS_SECRET_ACCESS_KEY" "$state/s3" > "$state/logs/s3.log" 2>&1 &
echo $! >> "$pids"
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$s3_port") 2>/dev/null && break; sleep 0.1; done

echo "==> coordinator on 127.0.0.1:$grpc_port"
"$bin" coordinator --listen "127.0.0.1:$grpc_port" --database-url "$database_url" \
    --s3-endpoint "$endpoint" --s3-path-style > "$state/logs/coordinator.log" 2>&1 &
echo $! >> "$pids"
for _ in $(seq 100); do "$bin" list >/dev/null 2>&1 && break; sleep 0.2; done

echo "==> $workers worker(s)"
for i in $(seq "$workers"); do
    "$bin" worker --s3-endpoint "$endpoint" --s3-path-style --worker-id "local-$i" \
        > "$state/logs/worker-$i.log" 2>&1 &
    echo $! >> "$pids"
done

echo "==> upload $model to s3://shardpress-in/minilm/"
rm -rf "$state/s3/shardpress-in/minilm" "$state/s3/shardpress-out/minilm-$recipe"
aws --endpoint-url "$endpoint" s3 sync --only-show-errors "$model" s3://shardpress-in/minilm/

echo "==> submit"
job="$("$bin" submit s3://shardpress-in/minilm/ --recipe "$recipe" --out "s3://shardpress-out/minilm-$recipe/")"
echo "job $job"
"$bin" watch "$job"
"$bin" status "$job"
echo
echo "output: $state/s3/shardpress-out/minilm-$recipe/   logs: $state/logs/"
echo "the service keeps running; stop it with: deploy/local/cluster.sh down"
