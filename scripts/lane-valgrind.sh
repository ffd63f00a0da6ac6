#!/usr/bin/env bash
# Runs skep-lane's hostile-peer tests under valgrind (memcheck) as a stand-in for miri/ASan,
# which need a nightly toolchain we do not have. Any invalid read/write, use of
# uninitialised memory or panic fails the script. Bounded to ~2 minutes.
#
# Usage: scripts/lane-valgrind.sh            (from anywhere inside the repo)
#        JOBS=4 scripts/lane-valgrind.sh     (override build parallelism; default 2)
set -euo pipefail

cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 2; }

# Build only this crate's hostile test binary and find its path from cargo's JSON output.
bins=$(cargo test -j"${JOBS:-2}" -p skep-lane --test hostile --no-run --message-format=json \
  | grep '"reason":"compiler-artifact"' \
  | grep '"name":"hostile"' \
  | grep -o '"executable":"[^"]*"' | cut -d'"' -f4)
bin=$(echo "$bins" | tail -n1)
[ -n "$bin" ] && [ -x "$bin" ] || { echo "could not locate the hostile test binary" >&2; exit 2; }

echo "valgrind: $bin"
# SKEP_LANE_FAST shrinks iteration counts (valgrind is ~50x slower); one test thread keeps
# valgrind's serialised scheduler predictable. timeout guards the 2-minute bound.
SKEP_LANE_FAST=1 timeout 150 valgrind \
  --quiet --error-exitcode=1 --leak-check=no --track-origins=no \
  "$bin" --test-threads=1
echo "valgrind: clean"
