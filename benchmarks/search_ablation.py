"""Which stages of the Θ search pay off on held-out text, and what each costs? BaWA variants vs Wanda.

Variants (``--variants``, default the first four):

- ``wanda``: the baseline, Θ fixed at (0, 0, 1);
- ``no-search``: BaWA at the initial Θ (1, 1, 0.5), the paper's initialisation;
- ``coarse``: the coarse stage only (each linear's Θ by its Gram-matrix output error; no block forward);
- ``coarse+line``: the default search: the coarse stage, then the line stage (the block's Θ moved towards
  the initial Θ as far as the block loss on held-out windows says);
- ``coarse+line-all``: the same, the line stage scored on all calibration windows (``--search-holdout 0``),
  taking the lowest mean; ``coarse+line-all-guard``: the same with the default guard;
- ``coarse+line-block-target``: the default with the block loss against the dense block on the pruned inputs
  (``--search-target block``) rather than the dense model's output of the block;
- ``coarse+line+zo``: the default, then the paper's zeroth-order steps (2 epochs, lr 0.2, model target);
- ``zo-only``: the zeroth-order steps alone from the initial Θ (the search before this issue).

Each row: held-out perplexity, export wall time and CPU time (this process's user + system seconds,
which a machine shared with other jobs inflates less than wall time), and the mean over the model's
linears of the final Θ's layer-output error relative to Wanda's. Each seed changes the calibration
windows (and the zeroth-order noise). Writes ``search_ablation.json`` and ``search_ablation.md``.

    python benchmarks/search_ablation.py --model ~/.cache/bawa-vllm/SmolLM2-135M-Instruct \\
        --calib ../shared/data/wiki-summaries/wiki.train.txt --eval out/data/wiki-dev.txt \\
        --sparsities 2:4 --nsamples 32 --seqlen 512 --max-windows 24 --out benchmarks/results/search-ablation-smollm2
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
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

VARIANTS = {  # label -> (method, search settings or None for no search)
    "wanda": ("wanda", None),
    "no-search": ("bawa", None),
    "coarse": ("bawa", {"epochs": 0, "line_points": 0}),
    "coarse+line": ("bawa", {}),  # the default: since this variant's ablation, with the guard below
    # the line stage taking the point of lowest held-out loss (the default before the guard)
    "coarse+line-unguarded": ("bawa", {"line_guard": 0.0}),
    # the line stage scored on every calibration window instead of the held-out quarter (--search-holdout 0),
    # taking the lowest mean, and with the guard (the windows must agree, one by one)
    "coarse+line-all": ("bawa", {"holdout": 0.0, "line_guard": 0.0}),
    "coarse+line-all-guard": ("bawa", {"holdout": 0.0}),
    # the line stage leaves the coarse Θ only where the held-out windows agree, one by one (2 standard errors):
    # the same settings as "coarse+line" since it became the default; the label its ablation was measured under
    "coarse+line-guard": ("bawa", {"line_guard": 2.0}),
    # the default search with the block loss against the dense block on the pruned inputs (--search-target
    # block) instead of the dense model's block output
    "coarse+line-block-target": ("bawa", {}),
    "coarse+line+zo": ("bawa", {"epochs": 2}),
    "zo-only": ("bawa", {"epochs": 2, "coarse_evals": 0}),
}
DEFAULT_VARIANTS = ["wanda", "no-search", "coarse", "coarse+line"]
LOSS_TARGET = {"coarse+line-block-target": "block"}  # other variants: ExportConfig's default ("model")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def mean_masked_error(report: dict) -> float:
    """Mean over linears of ||(W − Ŵ)X||² / ||WX||² with the mask alone (each block's own inputs)."""
    errors = [layer["recon_error"]["masked"] for b in report["blocks"] for layer in b["layers"].values()]
    return sum(errors) / len(errors)


def run_variant(args, spec: str, seed: int, label: str, windows) -> dict:
    method_name, search = VARIANTS[label]
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        cfg = ExportConfig(model=args.model, out=f"{tmp}/m", pattern=SparsityPattern.parse(spec), calib=args.calib,
                           nsamples=args.nsamples, seqlen=args.seqlen, seed=seed, format="dense",
                           **({"loss_target": LOSS_TARGET[label]} if label in LOSS_TARGET else {}))
        method = make_method(method_name, None if search is None else SearchConfig(seed=seed, **search))
        t0, c0 = time.time(), cpu_seconds()
        report = prune_checkpoint(cfg, method)
        wall, cpu = time.time() - t0, cpu_seconds() - c0
        ppl = streamed_perplexity(cfg.out, windows, dtype="float32")["perplexity"]
    row = {"sparsity": spec, "seed": seed, "variant": label, "perplexity": ppl, "seconds": round(wall, 1),
           "cpu_seconds": round(cpu, 1), "mean_layer_error": mean_masked_error(report)}
    coarse = [c["error_vs_wanda"] for b in report["blocks"] if b["search"] and "coarse" in b["search"]
              for c in b["search"]["coarse"].values() if c["error_vs_wanda"] is not None]
    if coarse:
        row["coarse_error_vs_wanda"] = sum(coarse) / len(coarse)
    if report.get("theta_summary"):
        row["theta_summary"] = report["theta_summary"]
    return row


def markdown(rows: list[dict], args) -> str:
    lines = [f"Held-out perplexity (`{args.eval}`, seqlen {args.seqlen}, fp32) of BaWA search variants on "
             f"`{Path(args.model).name}`; calibration {args.nsamples} x {args.seqlen} tokens of `{args.calib}`. "
             "Time: export wall / CPU seconds; layer error: mean over linears of ||(W − Ŵ)X||² / ||WX||².", "",
             "| sparsity | seed | variant | perplexity | vs wanda | wall (s) | CPU (s) | layer error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = next((w for w in rows if w["variant"] == "wanda" and w["sparsity"] == r["sparsity"]
                    and w["seed"] == r["seed"]), None)
        rel = f"{100 * (r['perplexity'] / ref['perplexity'] - 1):+.1f} %" if ref else "-"
        lines.append(f"| {r['sparsity']} | {r['seed']} | {r['variant']} | {r['perplexity']:.2f} | {rel} | "
                     f"{r['seconds']:.0f} | {r['cpu_seconds']:.0f} | {r['mean_layer_error']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True, help="development text (never the final evaluation text)")
    ap.add_argument("--sparsities", nargs="+", default=["2:4"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    ap.add_argument("--tmp", default=None, help="where the temporary exports go (default: the system's)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/search-ablation"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    windows = evaluation_windows(load_documents(args.eval), AutoTokenizer.from_pretrained(args.model), args.seqlen,
                                 args.max_windows)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.sparsities:
        for seed in args.seeds:
            for label in args.variants:
                rows.append(run_variant(args, spec, seed, label, windows))
                logging.info("%s", {k: v for k, v in rows[-1].items() if k != "theta_summary"})
                (args.out / "search_ablation.json").write_text(json.dumps(rows, indent=2))  # partial results too
                (args.out / "search_ablation.md").write_text(markdown(rows, args))
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
