#!/bin/bash
# Rows re-measured after the search's speed-up (masks by selection, the line stage's windows forwarded together),
# one after another on an otherwise idle machine (fresh out dir; merged into benchmarks/results/smollm2 with
# --report-only --reuse out/qs). Priority order: BaWA and Wanda at every pattern first (the time ratio), then
# the rows whose times were measured on a busy machine before. Each row is saved as it ends.
cd /work/main
Q=".venv/bin/python benchmarks/quality.py --model $HOME/.cache/bawa-vllm/SmolLM2-135M-Instruct --calib ../shared/data/wiki-summaries/wiki.train.txt --eval demo/data/eval.txt --seqlen 512 --nsamples 16 --max-windows 12 --out out/qs"
set -x
$Q --sparsities 2:4 4:8 0.5 0.6 0.7 --methods bawa wanda
$Q --sparsities 2:4 4:8 0.5 0.6 0.7 --methods bawa+admm
$Q --sparsities 2:4 --methods bawa --extra-seeds 1 2 --seed-methods bawa --seed-sparsities 2:4
$Q --sparsities 2:4 4:8 0.5 0.6 0.7 --methods sparsegpt "bawa --no-search"
echo BATCH DONE
