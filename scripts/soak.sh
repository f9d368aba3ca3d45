#!/usr/bin/env bash
# Crash soak: runs jobs on the real service (throwaway Postgres, s3s-fs, a coordinator and
# worker processes), SIGKILLs each job's only worker at a random moment, lets a second worker
# finish, and checks that every job succeeds with output identical to the local command.
# Prints each trial and `trials passed: P/T`; exits non-zero if any trial failed.
#
#   scripts/soak.sh [trials, default 20] [seed]
#
# The seed (printed at the start) repeats a run's kill moments.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export SHARDPRESS_SOAK_TRIALS="${1:-20}"
[[ -z "${2:-}" ]] || export SHARDPRESS_SOAK_SEED="$2"

SHARDPRESS_MODEL_DIR="$(bash scripts/fetch-model.sh | tail -n 1)"
export SHARDPRESS_MODEL_DIR
while IFS='=' read -r key value; do
    [[ -n "$key" ]] && export "$key=$value"
done <<< "$(bash scripts/services.sh)"

cargo test --locked -p shardpress-cli --test suite -- \
    --ignored --exact faults::soak_workers_killed_at_random_moments --nocapture
