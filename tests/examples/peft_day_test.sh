#!/usr/bin/env bash
# The README's walk-through as written (examples/peft_day/run.sh) ends with the PEFT export served and both
# test sentences classified by the label names trained with the module.
# Usage: peft_day_test.sh MDL_BINARY WORK_DIR
set -euo pipefail

out="$(MDL="$1" "$(dirname "$0")/../../examples/peft_day/run.sh" "$2" 2>&1)" || { echo "$out"; exit 1; }
echo "$out" | tail -5
grep -q '"index":0,"label":"positive"' <<< "$out" || { echo "FAIL: 'the plot was superb' is not positive"; exit 1; }
grep -q '"index":1,"label":"negative"' <<< "$out" || { echo "FAIL: 'the ending was dull' is not negative"; exit 1; }
grep -q 'modules_to_save' "$2/sentiment-peft/adapter_config.json" || { echo "FAIL: no modules_to_save"; exit 1; }
