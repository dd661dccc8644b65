#!/usr/bin/env bash
# The main job on the shipped demo model: set up, prune with BaWA at 2:4, evaluate dense vs pruned.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
BIN="${BAWA_VENV:-.venv}/bin"
OUT="${OUT:-out/demo-bawa-2of4}"
"$BIN/bawa-export" --model demo/model --out "$OUT" --method bawa --sparsity 2:4 \
    --calib demo/data/calib.txt --nsamples 64 --seqlen 256 --overwrite
echo "== perplexity on held-out text, dense:"
"$BIN/bawa-eval" --model demo/model --data demo/data/eval.txt --seqlen 256 --json "$OUT.dense-eval.json"
echo "== perplexity on held-out text, BaWA 2:4:"
"$BIN/bawa-eval" --model "$OUT" --data demo/data/eval.txt --seqlen 256 --json "$OUT.eval.json"
echo "== serving the packed 2:4 model with vLLM (bawa-sparse plugin) and querying it through the OpenAI API:"
"$BIN/python" tools/serve_demo.py "$OUT"
