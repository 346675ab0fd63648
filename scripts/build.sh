#!/usr/bin/env bash
# Configures and builds mdl (Release, Ninja, ccache when present). Usage: scripts/build.sh [targets...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# ccache and precompiled headers: ccache must ignore the PCH's timestamps.
export CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
BUILD_DIR=${MDL_BUILD_DIR:-build}
if [[ ! -f "$BUILD_DIR/build.ninja" ]]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release
fi
if (($#)); then
  cmake --build "$BUILD_DIR" --target "$@"
else
  cmake --build "$BUILD_DIR"
fi
