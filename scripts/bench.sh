#!/usr/bin/env bash
# Measures skep against baselines taken in the same run; writes docs/BENCHMARKS.md and
# docs/benchmarks.json. Release build. Not part of the test suite: timings are never asserted.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
cargo build --release --workspace --bins
target/release/skep-bench --out docs --date "$(date -u +%F)" "$@"
