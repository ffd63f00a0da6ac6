#!/usr/bin/env bash
# Checks the CUDA backend's PTX without a GPU: assembles every embedded module (exactly what the
# backend loads, written out by skep-ptx) with ptxas for each GPU generation we support, from
# Pascal to Hopper. ptxas rejects an instruction newer than the module's declared PTX ISA, so
# this is also the check on cuda/build.rs's PTX_ISA. Exits non-zero on any error.
set -euo pipefail
cd "$(dirname "$0")/.."

ARCHS=(sm_61 sm_75 sm_86 sm_90)

ptxas="$(ls .venv-cuda/lib/python3*/site-packages/nvidia/cuda_nvcc/bin/ptxas 2>/dev/null | head -n 1)"
if [ -z "$ptxas" ]; then
  echo "ptx-check: no ptxas in .venv-cuda: run scripts/install-deps.sh" >&2
  exit 1
fi

cargo build -j2 -q -p skep-cuda --features cuda --bin skep-ptx
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
"$target_dir/debug/skep-ptx" "$dir" >/dev/null

shopt -s nullglob
files=("$dir"/*.ptx)
if ((${#files[@]} == 0)); then
  echo "ptx-check: FAILED: skep-ptx wrote no PTX" >&2
  exit 1
fi

failed=0
for arch in "${ARCHS[@]}"; do
  summary=()
  arch_failed=0
  for ptx in "${files[@]}"; do
    name="$(basename "$ptx" .ptx)"
    if ! out="$("$ptxas" -arch="$arch" -v -o /dev/null "$ptx" 2>&1)"; then
      echo "ptx-check: FAILED: ptxas -arch=$arch $name.ptx:" >&2
      echo "$out" >&2
      arch_failed=1
      continue
    fi
    # ptxas -v says "Compiling entry function 'K' for 'sm_XX'", then "Used N registers, ...".
    regs="$(awk -F"'" '/Compiling entry function/ { k = $2 }
      match($0, /Used [0-9]+ registers/) {
        printf "%s%s=%s", sep, k, substr($0, RSTART + 5, RLENGTH - 15); sep = " " }' <<<"$out")"
    summary+=("$name: ${regs:-no kernels}")
  done
  if ((arch_failed)); then
    failed=1
    echo "$arch FAILED"
  else
    printf '%s ok, registers per kernel: %s\n' "$arch" "$(IFS=';'; echo "${summary[*]}")"
  fi
done
if ((failed)); then
  echo "ptx-check: FAILED (see above)" >&2
  exit 1
fi
echo "ptx-check: ${#files[@]} module(s) assemble for ${ARCHS[*]}"
