"""``bawa-convert``: turn a compressed-tensors ``sparse-24-bitmask`` 2:4 checkpoint into a bawa-sparse one."""

from __future__ import annotations

import argparse

from ..sparse.compressed_tensors import convert_compressed_tensors
from ._common import HelpFormatter, description, run_cli, setup_logging


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bawa-convert", description=description(__doc__), formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="compressed-tensors checkpoint directory (llm-compressor <= 0.10)")
    ap.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    setup_logging()

    def run():
        n = convert_compressed_tensors(args.model, args.out, args.overwrite)
        print(f"{args.out}: {n} linears packed; serve with: vllm serve {args.out}")

    return run_cli(run)


if __name__ == "__main__":
    raise SystemExit(main())
