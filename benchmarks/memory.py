"""Peak host memory of ``bawa-export`` versus model depth: it must not grow with the number of blocks.

Builds random Llama checkpoints that differ only in depth (default 4 and 16 blocks; hidden 512,
intermediate 2048, 8 heads / 4 KV heads, vocab 8000, fp32), prunes each with BaWA 2:4 in a fresh
process under GNU ``/usr/bin/time -v``, and prints the maximum resident set size of each run, the
checkpoint size, and the ratio deep/shallow. Writes ``memory.json`` under ``--out``.

    python benchmarks/memory.py --calib demo/data/calib.txt --out benchmarks/results/memory
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parent.parent


def build(path: Path, layers: int) -> int:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=2048, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="20MB")
    shutil.copy(REPO / "demo/model/tokenizer.json", path)
    shutil.copy(REPO / "demo/model/tokenizer_config.json", path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def measure(model: Path, out: Path, args) -> float:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "bawa_vllm.cli.export", "--model", str(model),
           "--out", str(out), "--method", "bawa", "--sparsity", "2:4", "--calib", args.calib,
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--search-epochs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return kib / 1024


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/memory"))
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth in args.depths:
            src = Path(tmp) / f"llama-{depth}"
            size = build(src, depth)
            rss = measure(src, Path(tmp) / f"out-{depth}", args)
            rows.append({"blocks": depth, "checkpoint_mib": round(size / 2**20, 1), "max_rss_mib": round(rss, 1)})
            print(f"{depth:3d} blocks: checkpoint {size / 2**20:7.1f} MiB, bawa-export max RSS {rss:7.1f} MiB",
                  flush=True)
    ratio = rows[-1]["max_rss_mib"] / rows[0]["max_rss_mib"]
    size_ratio = rows[-1]["checkpoint_mib"] / rows[0]["checkpoint_mib"]
    print(f"max RSS ratio {rows[-1]['blocks']}/{rows[0]['blocks']} blocks: {ratio:.3f} "
          f"(checkpoint size ratio {size_ratio:.2f})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps({"rows": rows, "rss_ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
