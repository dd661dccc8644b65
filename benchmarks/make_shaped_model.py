"""A randomly initialised checkpoint with a real model's shapes, for speed and memory benchmarks.

    python benchmarks/make_shaped_model.py --shape llama-3.2-1b --tokenizer DIR --out out/llama1b-shaped

Speed and memory depend on shapes, not on trained values, and the package registry carries no 1B model,
so the serving comparison runs on this: transformers builds the model from its config (seeded), saved in
bf16 with the given tokenizer. Prune it like any checkpoint (``bawa-export --method magnitude --sparsity 2:4``
needs no calibration). Its text is meaningless; its timing and memory are those of the real shapes.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

SHAPES = {  # hidden, layers, query heads, kv heads, FFN, vocab, tied embeddings
    "llama-3.2-1b": (2048, 16, 32, 8, 8192, 49152, True),
    "llama-3.2-3b": (3072, 28, 24, 8, 8192, 49152, True),
    "llama-3-8b": (4096, 32, 32, 8, 14336, 49152, False),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="llama-3.2-1b")
    ap.add_argument("--tokenizer", type=Path, required=True, help="directory with the tokenizer files to copy")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, layers, heads, kv, ffn, vocab, tied = SHAPES[args.shape]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=ffn, vocab_size=vocab, tie_word_embeddings=tied,
                         max_position_embeddings=4096, rope_theta=500000.0, torch_dtype="bfloat16")
    torch.manual_seed(args.seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    tmp = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in args.tokenizer.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name in ("vocab.json", "merges.txt"):
            shutil.copy(f, tmp / f.name)
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    print(f"{args.shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters -> {args.out}")


if __name__ == "__main__":
    main()
