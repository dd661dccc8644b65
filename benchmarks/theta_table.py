"""Where BaWA's Θ ended, per operator, in a few blocks: the layout of the paper's Tables 14–16 (LLaMA2-7B,
blocks 2, 15 and 28), from a ``bawa_report.json`` or a ``quality.json`` row, as Markdown.

    python benchmarks/theta_table.py out/demo-smollm2-bawa-2of4/bawa_report.json --blocks 2 15 28
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def thetas_of(path: Path, method: str, sparsity: str) -> list[dict[str, list[float]]]:
    """Per block, layer name -> Θ: from an export's report, or from a quality.json row (method, sparsity)."""
    data = json.loads(path.read_text())
    if "blocks" in data:
        return [{n: layer["theta"] for n, layer in b["layers"].items() if "theta" in layer} for b in data["blocks"]]
    row = next((r for r in data["rows"] if r["method"] == method and r["sparsity"] == sparsity
                and "theta_blocks" in r), None)
    if row is None:
        raise SystemExit(f"{path}: no {method} {sparsity} row with per-block Θ")
    return row["theta_blocks"]


def markdown(blocks: list[dict[str, list[float]]], chosen: list[int]) -> str:
    names = list(blocks[chosen[0]])
    head = " | ".join(f"block {b}: θ_in, θ_out, θ_act" for b in chosen)
    lines = [f"| operator | {head} |", "|---|" + "---|" * len(chosen)]
    for n in names:
        cells = " | ".join(", ".join(f"{v:.2f}" for v in blocks[b][n]) for b in chosen)
        lines.append(f"| {n} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="a bawa_report.json, or a quality.json with per-block Θ")
    ap.add_argument("--blocks", type=int, nargs="+", default=[2, 15, 28])
    ap.add_argument("--method", default="bawa", help="the quality.json row (default: %(default)s)")
    ap.add_argument("--sparsity", default="2:4", help="the quality.json row (default: %(default)s)")
    args = ap.parse_args(argv)
    blocks = thetas_of(args.source, args.method, args.sparsity)
    chosen = [b for b in args.blocks if b < len(blocks)]
    print(markdown(blocks, chosen), end="")


if __name__ == "__main__":
    main()
