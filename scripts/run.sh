#!/usr/bin/env bash
# The main job. Until `mdl demo` lands: create tiny GPT-2 and Llama checkpoints, inspect one, generate
# text from both, show that the cached and uncached decoders agree, then attach a LoRA module, generate
# with it unmerged and merged.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh mdl_cli
BUILD_DIR=${MDL_BUILD_DIR:-build}
MDL="$BUILD_DIR/mdl"
OUT=${MDL_OUT:-out}
mkdir -p "$OUT"
echo "== mdl init-model: random checkpoints in the Hugging Face layout"
"$MDL" init-model --arch gpt2 --preset tiny --seed 1 --out "$OUT/tiny-gpt2"
"$MDL" init-model --arch llama --preset tiny --seed 1 --out "$OUT/tiny-llama"
echo
echo "== mdl inspect $OUT/tiny-llama"
"$MDL" inspect "$OUT/tiny-llama" --limit 12
echo
echo "== mdl tokenize"
"$MDL" tokenize --model "$OUT/tiny-llama" --text "Modular deep learning, one module at a time."
echo
echo "== mdl generate (untrained weights: the text is noise, the machinery is real)"
"$MDL" generate --model "$OUT/tiny-gpt2" --prompt "The router decides" --max-tokens 24 --temperature 0.8 --seed 7
"$MDL" generate --model "$OUT/tiny-llama" --prompt "The router decides" --max-tokens 24
"$MDL" generate --model "$OUT/tiny-llama" --prompt "The router decides" --max-tokens 24 --no-cache
echo
echo "== modules: a LoRA on every projection (random B so it changes the output), used unmerged, then merged"
"$MDL" init-module --model "$OUT/tiny-llama" --out "$OUT/lora-demo" \
  --config '{"type":"lora","options":{"r":4,"init_lora_weights":false},"targets":{"target_modules":"all-linear"}}'
"$MDL" inspect "$OUT/lora-demo"
"$MDL" generate --model "$OUT/tiny-llama" --prompt "The router decides" --max-tokens 16 --modules "$OUT/lora-demo"
"$MDL" merge-into-base --model "$OUT/tiny-llama" --modules "$OUT/lora-demo" --out "$OUT/tiny-llama-merged"
"$MDL" generate --model "$OUT/tiny-llama-merged" --prompt "The router decides" --max-tokens 16
echo
echo "done: checkpoints and modules are in $OUT/ (try: $MDL --help)"
