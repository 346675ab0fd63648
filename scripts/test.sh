#!/usr/bin/env bash
# Installs what is missing, builds everything and runs the whole test suite (CTest + GoogleTest).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/build.sh
BUILD_DIR=${MDL_BUILD_DIR:-build}
echo "[test] build finished in $(( $(date +%s) - start )) s"
# One test binary at a time: each uses the whole thread budget (torch 1 x OpenBLAS all cores).
ctest --test-dir "$BUILD_DIR" --output-on-failure
bash scripts/check_format.sh  # every C++ file in the layout .clang-format describes (clang-format 14, Debian 12)
echo "[test] total $(( $(date +%s) - start )) s"
