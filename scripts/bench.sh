#!/usr/bin/env bash
# Runs every benchmark of the project and prints one table of figures and ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh mdl_bench
BUILD_DIR=${MDL_BUILD_DIR:-build}
"$BUILD_DIR/mdl_bench" "$@"
