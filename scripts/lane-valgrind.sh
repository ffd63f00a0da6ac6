#!/usr/bin/env bash
# Runs skep-lane's unit, hostile-peer and sealed-lane tests under valgrind (memcheck) as a stand-in for miri/ASan,
# which need a nightly toolchain we do not have. Any invalid read/write, use of
# uninitialised memory or panic fails the script. Bounded to ~2 minutes.
#
# Usage: scripts/lane-valgrind.sh            (from anywhere inside the repo)
#        JOBS=4 scripts/lane-valgrind.sh     (override build parallelism; default 2)
set -euo pipefail

cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 2; }

# Build only this crate's unit tests and hostile test binary; take their paths from cargo's
# JSON output (test artifacts are the ones with a non-null "executable").
# Valgrind 3.19 decodes AVX2 but not AVX-512, and the workspace builds for the host CPU
# (.cargo/config.toml). These binaries are built for baseline x86-64 instead, in their own
# target dir so that the main build is not invalidated.
if [[ "$(uname -m)" == x86_64 ]]; then
  export RUSTFLAGS="-C target-cpu=x86-64"
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/valgrind"
fi

# `sealed` covers the memfd lanes and the fd hand-over to a child (its pre_exec hook).
mapfile -t bins < <(cargo test -j"${JOBS:-2}" -p skep-lane --lib --test hostile --test sealed --no-run \
    --message-format=json \
  | grep '"reason":"compiler-artifact"' \
  | grep -o '"executable":"[^"]*"' | cut -d'"' -f4)
[ "${#bins[@]}" -eq 3 ] || { echo "expected 3 test binaries, got: ${bins[*]:-none}" >&2; exit 2; }

for bin in "${bins[@]}"; do
  echo "valgrind: $bin"
  # SKEP_LANE_FAST shrinks iteration counts (valgrind is ~50x slower); one test thread keeps
  # valgrind's serialised scheduler predictable. timeout guards the 2-minute bound.
  SKEP_LANE_FAST=1 timeout 100 valgrind \
    --quiet --error-exitcode=1 --leak-check=no \
    "$bin" --test-threads=1
done
echo "valgrind: clean"
