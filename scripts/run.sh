#!/usr/bin/env bash
# The main job: `mdl demo` — the modular pipeline end to end on real data (Fashion-MNIST, MNIST digits,
# fortune cookies in eight languages), with a report of tables and plots under out/demo. Installs what is
# missing and builds first. Extra arguments go to `mdl demo` (e.g. --full, --no-cache, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh mdl_cli
BUILD_DIR=${MDL_BUILD_DIR:-build}
OUT=${MDL_OUT:-out/demo}
"$BUILD_DIR/mdl" demo --out "$OUT" "$@"
echo "report: $OUT/report.html (and report.md, results.json)"
