"""``bawa-eval``: streamed WikiText-2-protocol perplexity of a checkpoint on a text file or dataset."""

from __future__ import annotations

import argparse
import json
import logging

from ..calibration import evaluation_windows, load_documents
from ..evaluation import streamed_perplexity
from ._common import HelpFormatter, description, run_cli, setup_logging

logger = logging.getLogger("bawa_vllm.eval")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bawa-eval", description=description(__doc__), formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="local Hugging Face checkpoint directory")
    ap.add_argument("--data", required=True, help=".txt / .jsonl(.gz) file, or a dataset name such as wikitext2")
    ap.add_argument("--seqlen", type=int, default=2048,
                    help="tokens per evaluation window (the text is cut into non-overlapping windows)")
    ap.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per block forward (memory vs speed)")
    ap.add_argument("--json", default=None, help="also write the result to this JSON file")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()

    def run():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
        windows = evaluation_windows(load_documents(args.data), tokenizer, args.seqlen, args.max_windows)
        logger.info("perplexity of %s on %d windows of %d tokens of %s, one block at a time ...", args.model,
                    windows.shape[0], windows.shape[1], args.data)
        result = {"model": args.model, "data": args.data,
                  **streamed_perplexity(args.model, windows, args.device, args.dtype, args.batch_size)}
        print(json.dumps(result, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)

    return run_cli(run)


if __name__ == "__main__":
    raise SystemExit(main())
