#!/bin/bash
# Headline rows re-measured with the line stage's guard as the default (fresh out dir; merged into
# benchmarks/results/smollm2 with --report-only --reuse out/qg). Priority order; each row is saved as it ends.
cd /work/main
Q=".venv/bin/python benchmarks/quality.py --model $HOME/.cache/bawa-vllm/SmolLM2-135M-Instruct --calib ../shared/data/wiki-summaries/wiki.train.txt --eval demo/data/eval.txt --seqlen 512 --nsamples 16 --max-windows 12 --out out/qg"
set -x
$Q --sparsities 2:4 4:8 0.5 0.6 0.7 --methods bawa
$Q --sparsities 0.7 2:4 --methods bawa+admm
$Q --sparsities 2:4 --methods bawa --extra-seeds 1 2 --seed-methods bawa --seed-sparsities 2:4
$Q --sparsities 4:8 0.5 0.6 --methods bawa+admm
$Q --sparsities 2:4 0.5 --methods wanda
echo BATCH DONE
