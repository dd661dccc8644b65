"""Perplexity of pruning methods side by side, in one run, on a given model and text.

Rows: dense, magnitude, wanda, ria, sparsegpt, bawa --no-search, bawa (searched Θ), bawa+admm,
bawa+awp (reconstruction on BaWA's masks) and awp (PGD onto the sparsity set from Wanda's masks), at
each sparsity given (default 50 %, 2:4, 4:8), with the export time of each. Every pruned model is exported with the real ``bawa-export`` pipeline
into a temporary directory and evaluated with the streamed ``bawa-eval`` perplexity on held-out
text. Writes ``quality.json``, ``quality.md`` and ``quality.png`` under ``--out``.

    python benchmarks/quality.py --model demo/model --calib demo/data/calib.txt --eval demo/data/eval.txt \
        --seqlen 256 --nsamples 64 --out benchmarks/results/demo
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from bawa_vllm.calibration import evaluation_windows, load_documents
from bawa_vllm.evaluation import streamed_perplexity
from bawa_vllm.pruning.engine import ExportConfig, prune_checkpoint
from bawa_vllm.pruning.masks import SparsityPattern
from bawa_vllm.pruning.methods import make_method
from bawa_vllm.pruning.search import SearchConfig
from bawa_vllm.pruning.structured import CLI_METHODS, prune_structured

VARIANTS = [  # (label, method, search?, reconstruction)
    ("magnitude", "magnitude", False, "none"),
    ("wanda", "wanda", False, "none"),
    ("ria", "ria", False, "none"),
    ("sparsegpt", "sparsegpt", False, "none"),
    ("bawa --no-search", "bawa", False, "none"),
    ("bawa", "bawa", True, "none"),
    ("bawa+admm", "bawa", True, "admm"),
    ("bawa+awp", "bawa", True, "awp"),
    ("awp", "awp", False, "none"),
]


def run(args) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    windows = evaluation_windows(load_documents(args.eval), tokenizer, args.seqlen, args.max_windows)
    rows = [{"method": "dense", "sparsity": "-", "seconds": 0.0,
             **streamed_perplexity(args.model, windows, args.device, args.eval_dtype)}]
    logging.info("dense: ppl %.3f", rows[0]["perplexity"])
    structured = run_structured(args, windows) if args.structured_ratios else None
    for spec in args.sparsities:
        for label, method, search, recon in VARIANTS:
            if args.methods and label not in args.methods:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                cfg = ExportConfig(model=args.model, out=str(Path(tmp) / "m"), pattern=SparsityPattern.parse(spec),
                                   calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                   device=args.device)
                t0 = time.time()
                report = prune_checkpoint(cfg, make_method(method, SearchConfig(seed=args.seed) if search else None,
                                                           recon))
                seconds = time.time() - t0
                ppl = streamed_perplexity(cfg.out, windows, args.device, args.eval_dtype)
            rows.append({"method": label, "sparsity": spec, "seconds": round(seconds, 2),
                         "measured_sparsity": report["sparsity"], **ppl})
            logging.info("%s %s: ppl %.3f (%.1f s)", label, spec, ppl["perplexity"], seconds)
    return {"model": args.model, "calib": args.calib, "eval": args.eval, "seqlen": args.seqlen,
            "nsamples": args.nsamples, "seed": args.seed, "eval_tokens": rows[0]["tokens"], "rows": rows,
            "structured": structured}


STRUCTURED = ["llm-bip", "structured-magnitude", "structured-random"]


def run_structured(args, windows) -> dict:
    """LLM-BIP against its baselines: perplexity and parameter counts at each structured ratio."""
    rows = []
    for ratio in args.structured_ratios:
        for label in STRUCTURED:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = ExportConfig(model=args.model, out=str(Path(tmp) / "m"), pattern=SparsityPattern(ratio),
                                   calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                   device=args.device)
                t0 = time.time()
                report = prune_structured(cfg, CLI_METHODS[label], ratio)
                seconds = time.time() - t0
                ppl = streamed_perplexity(cfg.out, windows, args.device, args.eval_dtype)
            rows.append({"method": label, "ratio": ratio, "seconds": round(seconds, 2),
                         "params_before": report["params_before"], "params_after": report["params_after"],
                         "removed_fraction": report["plan"]["removed_fraction"],
                         "heads": report["plan"]["keep_heads_per_group"] * report["plan"]["kv_heads"],
                         "intermediate": report["plan"]["keep_intermediate"], **ppl})
            logging.info("%s %g: ppl %.3f", label, ratio, ppl["perplexity"])
    return {"model": args.model, "eval": args.eval, "rows": rows}


def structured_markdown(result: dict, dense_ppl: float) -> str:
    lines = [f"Structured pruning of `{result['model']}`, perplexity on `{result['eval']}` (dense {dense_ppl:.3f}); "
             "parameters of the decoder blocks' linears.", "",
             "| method | ratio | removed | heads | intermediate | block-linear params | perplexity | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['ratio']:g} | {r['removed_fraction']:.3f} | {r['heads']} | "
                     f"{r['intermediate']} | {r['params_before']:,} → {r['params_after']:,} | {r['perplexity']:.3f} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    specs = list(dict.fromkeys(r["sparsity"] for r in result["rows"] if r["sparsity"] != "-"))
    dense = result["rows"][0]["perplexity"]
    lines = [f"Perplexity on `{result['eval']}` ({result['eval_tokens']} tokens, seqlen {result['seqlen']}); "
             f"calibration `{result['calib']}`, {result['nsamples']} windows; dense {dense:.3f}.", "",
             "| method | " + " | ".join(specs) + " | export time (s) |",
             "|---|" + "---|" * (len(specs) + 1)]
    for label, *_ in VARIANTS:
        cells = [r for r in result["rows"] if r["method"] == label]
        if not cells:
            continue
        ppl = " | ".join(f"{r['perplexity']:.3f}" for r in cells)
        secs = " / ".join(f"{r['seconds']:.0f}" for r in cells)
        lines.append(f"| {label} | {ppl} | {secs} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = list(dict.fromkeys(r["sparsity"] for r in result["rows"] if r["sparsity"] != "-"))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    labels = [v[0] for v in VARIANTS if any(r["method"] == v[0] for r in result["rows"])]
    width = 0.8 / len(labels)
    for k, label in enumerate(labels):
        vals = [next(r["perplexity"] for r in result["rows"] if r["method"] == label and r["sparsity"] == s)
                for s in specs]
        ax.bar([i + k * width for i in range(len(specs))], vals, width, label=label)
    ax.axhline(result["rows"][0]["perplexity"], color="k", ls="--", lw=1, label="dense")
    ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(specs))], specs)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(f"{Path(result['model']).name}: held-out perplexity by pruning method")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True, help="held-out text (not the calibration text)")
    ap.add_argument("--sparsities", nargs="*", default=["0.5", "2:4", "4:8"])
    ap.add_argument("--structured-ratios", type=float, nargs="*", default=[],
                    help="also compare LLM-BIP with structured magnitude and random at these ratios (e.g. 0.2 0.5)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eval-dtype", default=None, help="perplexity compute dtype (default: the checkpoint's)")
    ap.add_argument("--methods", nargs="+", default=None, help="only these rows (labels as in the table)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(result, indent=2))
    table = markdown(result) if args.sparsities else ""
    if result["structured"]:
        table += "\n" + structured_markdown(result["structured"], result["rows"][0]["perplexity"])
    (args.out / "quality.md").write_text(table)
    if args.sparsities:
        plot(result, args.out / "quality.png")
    print(table)


if __name__ == "__main__":
    main()
