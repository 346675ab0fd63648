#!/usr/bin/env bash
# Fails when a C++ file differs from what clang-format (Debian 12's clang-format 14, the repository's
# .clang-format) makes of it, naming the files; `scripts/check_format.sh --fix` rewrites them instead.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v clang-format >/dev/null || bash scripts/setup.sh
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  mapfile -t files < <(git ls-files --cached --others --exclude-standard 'src/*.h' 'src/*.cpp' 'tests/*.h' 'tests/*.cpp' \
    'benchmarks/*.h' 'benchmarks/*.cpp')
else  # a source tree without git (an unpacked archive)
  mapfile -t files < <(find src tests benchmarks -name '*.h' -o -name '*.cpp' | sort)
fi
((${#files[@]})) || { echo "[format] found no C++ files under src, tests, benchmarks" >&2; exit 1; }
if [[ "${1:-}" == "--fix" ]]; then
  clang-format -i "${files[@]}"
  exit 0
fi
bad=()
for f in "${files[@]}"; do
  if ! clang-format --dry-run --Werror "$f" >/dev/null 2>&1; then bad+=("$f"); fi
done
if ((${#bad[@]})); then
  echo "[format] ${#bad[@]} file(s) differ from clang-format's layout (.clang-format): ${bad[*]}" >&2
  echo "[format] run: bash scripts/check_format.sh --fix" >&2
  exit 1
fi
echo "[format] ${#files[@]} files follow .clang-format"
