#!/usr/bin/env bash
# Installs the system tools skep's scripts use, if they are missing. Idempotent.
set -euo pipefail

need=()
command -v valgrind >/dev/null || need+=(valgrind)
command -v python3 >/dev/null || need+=(python3 python3-pip)
# `systemd-analyze verify` checks the shipped units (integration/tests/systemd.rs).
command -v systemd-analyze >/dev/null || need+=(systemd)
# `ip` is for scripts/netns-cluster.sh, which needs root anyway: without root it is skipped, not
# a reason to fail here.
if ! command -v ip >/dev/null && [ "$(id -u)" -eq 0 ]; then need+=(iproute2); fi
if ((${#need[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing: ${need[*]}; install them (e.g. sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt 2>/dev/null || true

# The HTTP door's tests (integration/tests/http.rs) drive the queen with curl and with the real
# `openai` Python client, pinned, in a venv at the repository root (.venv-openai/, gitignored).
OPENAI_VERSION=1.109.1
http_need=()
command -v curl >/dev/null || http_need+=(curl)
python3 -c 'import ensurepip, venv' 2>/dev/null || http_need+=(python3-venv)
if ((${#http_need[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing: ${http_need[*]}; install them (e.g. sudo apt-get install ${http_need[*]})" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${http_need[@]}"
fi
venv="$(cd "$(dirname "$0")/.." && pwd)/.venv-openai"
if ! "$venv/bin/python" -c "import sys, openai; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "openai==$OPENAI_VERSION"
fi

# The CUDA backend (skep-cuda's `cuda` feature; scripts/ptx-check.sh) compiles its kernels with
# NVRTC and checks the PTX with ptxas, both from NVIDIA's wheels, pinned, in a venv at the
# repository root (.venv-cuda/, gitignored; cuda/build.rs looks there). The runtime wheel is
# only for its headers (cuda_fp16.h): NVRTC ships none. No GPU or driver is needed for any of it.
NVRTC_VERSION=12.9.86
CUDA_RUNTIME_VERSION=12.9.79
cuda_venv="$(cd "$(dirname "$0")/.." && pwd)/.venv-cuda"
cuda_pins=(
  "nvidia-cuda-nvrtc-cu12==$NVRTC_VERSION"
  "nvidia-cuda-nvcc-cu12==$NVRTC_VERSION"
  "nvidia-cuda-runtime-cu12==$CUDA_RUNTIME_VERSION"
)
if ! "$cuda_venv/bin/python" - "${cuda_pins[@]}" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
sys.exit(any(version(n) != v for n, v in (p.split("==") for p in sys.argv[1:])))
PY
then
  python3 -m venv "$cuda_venv"
  "$cuda_venv/bin/pip" install -q "${cuda_pins[@]}"
fi

# The status page's browser test (integration/tests/status_page.rs) drives Debian's headless
# Chromium through chromedriver (WebDriver over loopback).
browser_need=()
[ -x /usr/bin/chromium ] || browser_need+=(chromium)
[ -x /usr/bin/chromedriver ] || browser_need+=(chromium-driver)
if ((${#browser_need[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing: ${browser_need[*]}; install them (e.g. sudo apt-get install ${browser_need[*]})" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${browser_need[@]}"
fi
