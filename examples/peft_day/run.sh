#!/usr/bin/env bash
# A PEFT user's day with mdl, the README's walk-through as written: a classifier LoRA with its new head
# trained on a JSONL file, evaluated, merged with a second one, exported to PEFT, served and asked to
# classify. Usage: examples/peft_day/run.sh [WORK_DIR]  (mdl on PATH, or MDL=/path/to/mdl; curl)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mdl() { "${MDL:-mdl}" "$@"; }
work="${1:-peft_day}"
rm -rf "$work" && mkdir -p "$work" && cd "$work"
cp "$here"/*.jsonl .
mdl init-model --arch llama --preset tiny --out base
cp -r base cls && sed -i 's/LlamaForCausalLM/LlamaForSequenceClassification/' cls/config.json
cat > run.json <<'JSON'
{"model": "cls",
 "modules": {"sentiment": {"type": "lora", "seed": 1, "options": {"r": 8, "lora_alpha": 16}}},
 "train_data": "train.jsonl", "eval_data": "test.jsonl", "data": {"kind": "classification"},
 "options": {"steps": 80, "batch_size": 16, "out_dir": "run", "schedule": {"lr": 0.005}}}
JSON
mdl train --config run.json
mdl eval --model cls --modules run/modules/sentiment --data test.jsonl
sed 's/"sentiment"/"sentiment2"/; s/"seed": 1/"seed": 2/; s/"out_dir": "run"/"out_dir": "run2"/' run.json > run2.json
mdl train --config run2.json
mdl merge --method linear --inputs run/modules/sentiment run2/modules/sentiment2 --base cls --out merged
mdl eval --model cls --modules merged --data test.jsonl
mdl convert run/modules/sentiment --model cls --to peft --out sentiment-peft
mkdir served && cp -r merged sentiment-peft served/
# The README uses --port 8080; here any free port, read from the port file once the server listens.
"${MDL:-mdl}" serve --model cls --modules served --port 0 --port-file port &  # $!: the server itself
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
until [[ -s port ]] && curl -s "localhost:$(cat port)/health" > /dev/null; do sleep 0.1; done
curl -s "localhost:$(cat port)/v1/classify" -H 'Content-Type: application/json' \
  -d '{"model": "sentiment-peft", "input": ["the plot was superb", "the ending was dull"]}'
echo
