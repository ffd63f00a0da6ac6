#!/usr/bin/env bash
# The GPU backend's check (issue #16), in two halves:
#
#   scripts/gpu-check.sh build   here, with Rust: builds skep-worker and skep-gpu-check with the
#                                `cuda` feature for x86-64-v3 (the GPU machine's CPU differs, so
#                                not `native`), stripped, into .gpu-bin/ (about 30 MiB, to carry)
#   scripts/gpu-check.sh run     on the GPU machine (no Rust, no network, ~5 minutes): writes the
#                                synthetic models, compares the GPU engine with the CPU engine,
#                                measures speed; figures go to $OUT (default ./gpu-check-out)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.gpu-bin

case "${1:-}" in
build)
  scripts/install-deps.sh >/dev/null
  RUSTFLAGS="-C target-cpu=x86-64-v3" cargo build -j"${CARGO_BUILD_JOBS:-2}" --release \
    --target-dir target/gpu -p skep-worker --features cuda --bin skep-worker --bin skep-gpu-check
  mkdir -p "$bin"
  for b in skep-worker skep-gpu-check; do
    cp target/gpu/release/$b "$bin/$b"
    strip "$bin/$b"
  done
  du -sh "$bin"/*
  ;;
run)
  out="${OUT:-$PWD/gpu-check-out}"
  work="$(mktemp -d /tmp/skep-gpu-check.XXXXXX)"
  mkdir -p "$out"
  { date -u +%FT%TZ; git rev-parse HEAD 2>/dev/null || cat .gpu-bin/COMMIT 2>/dev/null || true; } >"$out/when.txt"
  nvidia-smi --query-gpu=name,memory.total,compute_cap,driver_version --format=csv >"$out/nvidia-smi.csv" 2>&1 || true
  # The fallback path first: the worker's own probe (what skep-pool --device cuda:0 runs).
  "$bin/skep-worker" --probe-device cuda:0 | tee "$out/probe.txt"
  set +e
  timeout 290 "$bin/skep-gpu-check" --out "$work" 2>&1 | tee "$out/gpu-check.txt"
  rc=${PIPESTATUS[0]}
  set -e
  cp "$work/gpu-check.json" "$out/" 2>/dev/null || true
  rm -rf "$work"
  exit "$rc"
  ;;
*)
  echo "usage: scripts/gpu-check.sh build|run" >&2
  exit 2
  ;;
esac
