"""Perplexity and export time of pruning methods side by side, in one run, on a given model and text.

Rows: dense, magnitude, wanda, ria, sparsegpt, bawa --no-search, bawa (searched Θ), bawa+admm (ADMM that
re-selects BaWA's masks; ``--admm-reselect 0`` rows keep them fixed), bawa+awp (reconstruction on BaWA's masks) and awp (PGD onto the sparsity set from Wanda's masks), at
each sparsity given (default 50 %, 2:4, 4:8), with the export wall time and CPU time of each (CPU time:
this process's user + system seconds, which other jobs on a shared machine inflate less than wall
time) and the bawa / wanda time ratio. ``--extra-seeds`` repeats ``--seed-methods`` at
``--seed-sparsities`` with other seeds (other calibration windows). Every pruned model is exported
with the real ``bawa-export`` pipeline into a temporary directory and evaluated with the streamed
``bawa-eval`` perplexity on held-out text. Writes ``quality.json`` (after every row, so a run that is
stopped keeps what it measured; a rerun with the same settings skips the rows already there),
``quality.md`` and ``quality.png`` under ``--out``.

    python benchmarks/quality.py --model demo/model --calib demo/data/calib.txt --eval demo/data/eval.txt \
        --seqlen 256 --nsamples 64 --out benchmarks/results/demo
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from bawa_vllm.calibration import evaluation_windows, load_documents
from bawa_vllm.evaluation import streamed_perplexity
from bawa_vllm.pruning.engine import ExportConfig, prune_checkpoint
from bawa_vllm.pruning.masks import SparsityPattern
from bawa_vllm.pruning.methods import ADMM_RESELECT, make_method
from bawa_vllm.pruning.search import SearchConfig
from bawa_vllm.pruning.structured import CLI_METHODS, prune_structured

VARIANTS = [  # (label, method, search?, reconstruction, ADMM iterations that re-select the mask)
    ("magnitude", "magnitude", False, "none", 0),
    ("wanda", "wanda", False, "none", 0),
    ("ria", "ria", False, "none", 0),
    ("sparsegpt", "sparsegpt", False, "none", 0),
    ("bawa --no-search", "bawa", False, "none", 0),
    ("bawa", "bawa", True, "none", 0),
    ("bawa+admm", "bawa", True, "admm", ADMM_RESELECT),
    # the same reconstruction on the unsearched mask: does a better BaWA mask make BaWA + ADMM better?
    ("bawa --no-search+admm", "bawa", False, "admm", ADMM_RESELECT),
    # ADMM on BaWA's masks as they are, never re-selected: what the re-selection adds
    ("bawa+admm --admm-reselect 0", "bawa", True, "admm", 0),
    ("bawa --no-search+admm --admm-reselect 0", "bawa", False, "admm", 0),
    ("bawa+awp", "bawa", True, "awp", 0),
    ("awp", "awp", False, "none", 0),
]


SETTINGS = ("model", "calib", "eval", "seqlen", "nsamples", "max_windows", "eval_dtype", "device")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _export_and_eval(args, windows, label: str, method: str, search: bool, recon: str, reselect: int, spec: str,
                     seed: int) -> dict:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        cfg = ExportConfig(model=args.model, out=str(Path(tmp) / "m"), pattern=SparsityPattern.parse(spec),
                           calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=seed,
                           device=args.device)
        t0, c0 = time.time(), cpu_seconds()
        report = prune_checkpoint(cfg, make_method(method, SearchConfig(seed=seed) if search else None, recon,
                                                   reselect=reselect))
        seconds, cpu = time.time() - t0, cpu_seconds() - c0
        ppl = streamed_perplexity(cfg.out, windows, args.device, args.eval_dtype)
    row = {"method": label, "sparsity": spec, "seed": seed, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
           "measured_sparsity": report["sparsity"], **ppl}
    if report.get("theta_summary"):
        row["theta_summary"] = report["theta_summary"]
        row["theta_blocks"] = [{n: layer["theta"] for n, layer in b["layers"].items()} for b in report["blocks"]]
    searches = [b["search"] for b in report["blocks"] if b["search"]]
    if searches:  # what each stage of BaWA's search did, block by block
        row["search"] = {
            "coarse_error_vs_wanda": [round(sum(c["error_vs_wanda"] or 1.0 for c in s_["coarse"].values())
                                            / len(s_["coarse"]), 5) for s_ in searches if "coarse" in s_],
            "line_t": [s_["line"]["t"] for s_ in searches if "line" in s_],
        }
    return row


def run(args) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    windows = evaluation_windows(load_documents(args.eval), tokenizer, args.seqlen, args.max_windows)
    settings = {k: str(getattr(args, k)) if getattr(args, k) is not None else None for k in SETTINGS}
    path = args.out / "quality.json"
    done, own = {}, {}
    for source in [path, *(Path(d) / "quality.json" for d in args.reuse)]:
        previous = json.loads(source.read_text()) if source.exists() else None
        if previous is not None and previous.get("settings") == settings:
            rows = {(r["method"], r["sparsity"], r.get("seed", previous["seed"])): r for r in previous["rows"]}
            logging.info("reusing %d rows of %s (same settings)", len(rows), source)
            done.update(rows)
            if source == path:
                own = rows
    result = {"model": args.model, "calib": args.calib, "eval": args.eval, "seqlen": args.seqlen,
              "nsamples": args.nsamples, "seed": args.seed, "settings": settings, "rows": [], "structured": None}

    def merged() -> dict:
        """This run's rows, then the rows --out already held that this run did not redo (other methods or
        sparsities of an earlier run with the same settings): a second run asking for other rows must not drop
        the first run's from quality.json."""
        added = {(r["method"], r["sparsity"], r.get("seed", args.seed)) for r in result["rows"]}
        return {**result, "rows": result["rows"] + [r for key, r in own.items() if key not in added]}

    def add(row: dict) -> None:
        result["rows"].append(row)
        result["eval_tokens"] = result["rows"][0]["tokens"]
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(merged(), indent=2))

    if args.report_only and ("dense", "-", args.seed) not in done:
        raise SystemExit("--report-only: no dense row with these settings in --out or --reuse")
    dense = done.get(("dense", "-", args.seed)) or {
        "method": "dense", "sparsity": "-", "seed": args.seed, "seconds": 0.0, "cpu_seconds": 0.0,
        **streamed_perplexity(args.model, windows, args.device, args.eval_dtype)}
    add(dense)
    logging.info("dense: ppl %.3f", dense["perplexity"])
    result["structured"] = run_structured(args, windows) if args.structured_ratios else None
    if args.sparsities is None:  # a merge must not drop the patterns nobody named
        args.sparsities = (list(dict.fromkeys(spec for _, spec, _ in done if spec != "-")) if args.report_only
                           else ["0.5", "2:4", "4:8"])
    for spec in args.sparsities:
        seeds = [args.seed] + (args.extra_seeds if spec in args.seed_sparsities else [])
        if args.report_only:  # every seed the sources hold for this pattern
            seeds += sorted({sd for _, sp, sd in done if sp == spec and sd not in seeds})
        for seed in seeds:
            variants = {v[0]: v for v in VARIANTS}
            for label in args.methods or list(variants):  # in the order given: the first ones matter most
                _, method, search, recon, reselect = variants[label]
                # a merge reports every method's seeds the sources hold, whatever --seed-methods says
                if seed != args.seed and label not in args.seed_methods and not args.report_only:
                    continue
                if args.report_only and (label, spec, seed) not in done:
                    continue
                row = done.get((label, spec, seed)) or _export_and_eval(args, windows, label, method, search, recon,
                                                                        reselect, spec, seed)
                add(row)
                logging.info("%s %s seed %d: ppl %.3f (%.1f s wall, %.1f s CPU)", label, spec, seed,
                             row["perplexity"], row["seconds"], row["cpu_seconds"])
    return merged()


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


def _cell(result: dict, label: str, spec: str, seed: int | None = None) -> dict | None:
    seed = result["seed"] if seed is None else seed
    return next((r for r in result["rows"] if r["method"] == label and r["sparsity"] == spec
                 and r.get("seed", result["seed"]) == seed), None)


def markdown(result: dict) -> str:
    specs = list(dict.fromkeys(r["sparsity"] for r in result["rows"] if r["sparsity"] != "-"))
    dense = result["rows"][0]["perplexity"]
    labels = [v[0] for v in VARIANTS if any(r["method"] == v[0] for r in result["rows"])]
    lines = [f"Perplexity on `{result['eval']}` ({result['eval_tokens']} tokens, seqlen {result['seqlen']}); "
             f"calibration `{result['calib']}`, {result['nsamples']} windows of {result['seqlen']} tokens, seed "
             f"{result['seed']}; dense {dense:.3f}.", "",
             "| method | " + " | ".join(specs) + " |", "|---|" + "---|" * len(specs)]
    for label in labels:
        cells = [_cell(result, label, s) for s in specs]
        lines.append(f"| {label} | " + " | ".join(f"{c['perplexity']:.2f}" if c else "-" for c in cells) + " |")
    lines += ["", "Export time, wall seconds (CPU seconds of the process):", "",
              "| method | " + " | ".join(specs) + " |", "|---|" + "---|" * len(specs)]
    for label in labels:
        cells = [_cell(result, label, s) for s in specs]
        lines.append(f"| {label} | " + " | ".join(f"{c['seconds']:.0f} ({c['cpu_seconds']:.0f})" if c else "-"
                                                   for c in cells) + " |")
    ratios = []
    for s in specs:
        b, w = _cell(result, "bawa", s), _cell(result, "wanda", s)
        ratios.append(f"{b['seconds'] / w['seconds']:.2f}x ({b['cpu_seconds'] / w['cpu_seconds']:.2f}x)"
                      if b and w and w["seconds"] and w["cpu_seconds"] else "-")
    if any(r != "-" for r in ratios):
        lines.append("| **bawa / wanda** | " + " | ".join(ratios) + " |")
    seeded = sorted({(r["method"], r["sparsity"]) for r in result["rows"]
                     if r.get("seed", result["seed"]) != result["seed"]})
    if seeded:
        seeds = sorted({r.get("seed", result["seed"]) for r in result["rows"] if r["sparsity"] != "-"})
        lines += ["", "Seeds (other calibration windows):", "",
                  "| method | sparsity | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
                  "|---|---|" + "---|" * (len(seeds) + 1)]
        for label, spec in sorted(seeded, key=lambda k: (k[1], labels.index(k[0]) if k[0] in labels else 0)):
            cells = [_cell(result, label, spec, s) for s in seeds]
            vals = [c["perplexity"] for c in cells if c]
            lines.append(f"| {label} | {spec} | " + " | ".join(f"{c['perplexity']:.2f}" if c else "-" for c in cells)
                         + f" | {statistics.mean(vals):.2f} |")
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
        cells = [_cell(result, label, s) for s in specs]
        ax.bar([i + k * width for i, c in enumerate(cells) if c], [c["perplexity"] for c in cells if c], width,
               label=label)
    ax.set_yscale("log")
    ax.axhline(result["rows"][0]["perplexity"], color="k", ls="--", lw=1, label="dense")
    ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(specs))], specs)
    ax.set_ylabel("perplexity, log scale (lower is better)")
    ax.set_title(f"{Path(result['model']).name}: held-out perplexity by pruning method")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True, help="held-out text (not the calibration text)")
    ap.add_argument("--sparsities", nargs="*", default=None,
                    help="patterns to run (default: 0.5 2:4 4:8; with --report-only, every pattern the sources hold)")
    ap.add_argument("--structured-ratios", type=float, nargs="*", default=[],
                    help="also compare LLM-BIP with structured magnitude and random at these ratios (e.g. 0.2 0.5)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra-seeds", type=int, nargs="*", default=[],
                    help="more seeds (calibration windows) for --seed-methods at --seed-sparsities")
    ap.add_argument("--seed-methods", nargs="*", default=["wanda", "bawa"])
    ap.add_argument("--seed-sparsities", nargs="*", default=["2:4"])
    ap.add_argument("--tmp", default=None, help="where the temporary exports go (default: the system's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eval-dtype", default=None, help="perplexity compute dtype (default: the checkpoint's)")
    ap.add_argument("--methods", nargs="+", default=None, choices=[v[0] for v in VARIANTS],
                    help="only these rows (labels as in the table), run in this order")
    ap.add_argument("--reuse", nargs="*", default=[],
                    help="result directories of earlier runs whose rows with the same settings are taken, not rerun")
    ap.add_argument("--report-only", action="store_true",
                    help="export nothing: tables and plot from the rows of --out and --reuse (e.g. merging runs)")
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
