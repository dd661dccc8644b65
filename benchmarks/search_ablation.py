"""Does the Θ search beat ``--no-search`` on held-out text? Seeds x settings, BaWA at the given sparsities.

Variants: no search; the default search (relative loss, lr 0.2, trust region 0.1, held-out selection,
dense-model target); the same with the literal block target (``--search-target block``); and large steps
(lr 1, trust region 0.25, 6 epochs). Each seed changes the calibration windows and the search's noise.
Writes ``search_ablation.json`` and ``search_ablation.md``.

    python benchmarks/search_ablation.py --model demo/model --calib demo/data/calib.txt \\
        --eval demo/data/eval.txt --out benchmarks/results/search-ablation
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from bawa_vllm.calibration import evaluation_windows, load_documents
from bawa_vllm.evaluation import streamed_perplexity
from bawa_vllm.pruning.engine import ExportConfig, prune_checkpoint
from bawa_vllm.pruning.masks import SparsityPattern
from bawa_vllm.pruning.methods import make_method
from bawa_vllm.pruning.search import SearchConfig

VARIANTS = {  # label -> (search settings or None, loss target)
    "no-search": (None, "model"),
    "search (default)": ({}, "model"),
    "search, block target": ({}, "block"),
    "search, large steps": ({"lr": 1.0, "max_step": 0.25, "epochs": 6, "patience": 6}, "model"),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--sparsities", nargs="+", default=["2:4", "0.7"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/search-ablation"))
    args = ap.parse_args(argv)
    windows = evaluation_windows(load_documents(args.eval), AutoTokenizer.from_pretrained(args.model), args.seqlen)
    rows = []
    for spec in args.sparsities:
        for seed in args.seeds:
            for label, (search, target) in VARIANTS.items():
                with tempfile.TemporaryDirectory() as tmp:
                    cfg = ExportConfig(model=args.model, out=f"{tmp}/m", pattern=SparsityPattern.parse(spec),
                                       calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=seed,
                                       format="dense", loss_target=target)
                    method = make_method("bawa", None if search is None else SearchConfig(seed=seed, **search))
                    report = prune_checkpoint(cfg, method)
                    ppl = streamed_perplexity(cfg.out, windows, dtype="float32")["perplexity"]
                rel = [b["search"]["best_loss"] / b["search"]["initial_loss"] for b in report["blocks"]] \
                    if search is not None else None
                rows.append({"sparsity": spec, "seed": seed, "variant": label, "perplexity": ppl,
                             "block_loss_ratio": rel})
                print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "search_ablation.json").write_text(json.dumps(rows, indent=2))
    lines = ["Held-out perplexity of BaWA (fp32 evaluation); block-loss ratio = searched / initial calibration loss "
             "per block.", "", "| sparsity | seed | " + " | ".join(VARIANTS) + " |", "|---|---|" + "---|" * len(VARIANTS)]
    for spec in args.sparsities:
        for seed in args.seeds:
            cells = [next(r for r in rows if r["sparsity"] == spec and r["seed"] == seed and r["variant"] == v)
                     for v in VARIANTS]
            lines.append(f"| {spec} | {seed} | " + " | ".join(f"{c['perplexity']:.3f}" for c in cells) + " |")
    (args.out / "search_ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
