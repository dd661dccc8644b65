"""GPU check of the bawa-sparse kernels (one CUDA machine, under 8 minutes on one H200).

For each backend (cuSPARSELt, CUTLASS): the op's output against dense-masked ``F.linear`` in bf16 and
fp16, CUDA-graph capture and replay of the op, then a timing table dense vs sparse (CUDA events,
median of repeats) for M in {1, 8, 32, 128, 512, 2048, 8192} on the linear shapes of Llama-2-7B,
Llama-3-8B and Llama-2-70B, whole (TP=1) and as TP=8 slices. The ``auto`` column is the op as the
plugin runs it: the backend chosen per layer with the load-time crossover (dense below ``min_sparse_m``).

    python tools/gpu_check.py --out gpu_check     # writes gpu_check.json and gpu_check.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bawa_vllm.pruning.masks import SparsityPattern, apply_mask_, keep_mask  # noqa: E402
from bawa_vllm.sparse import kernels  # noqa: E402

M_VALUES = (1, 8, 32, 128, 512, 2048, 8192)
MODELS = {  # hidden, intermediate, heads, kv heads, head_dim
    "Llama-2-7B": (4096, 11008, 32, 32, 128),
    "Llama-3-8B": (4096, 14336, 32, 8, 128),
    "Llama-2-70B": (8192, 28672, 64, 8, 128),
}


def linear_shapes(tp: int) -> list[tuple[str, int, int]]:
    """(name, N, K) per rank: qkv and gate_up are column-parallel, o and down row-parallel."""
    out = []
    for model, (h, inter, heads, kv, hd) in MODELS.items():
        out += [(f"{model} qkv", (heads + 2 * kv) * hd // tp, h), (f"{model} o", h, heads * hd // tp),
                (f"{model} gate_up", 2 * inter // tp, h), (f"{model} down", h, inter // tp)]
    return out


def pruned(n: int, k: int, dtype) -> torch.Tensor:
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    return apply_mask_(w, keep_mask(w.float().abs(), SparsityPattern.parse("2:4")))


def with_backend(name: str, w: torch.Tensor) -> kernels.PreparedWeight:
    os.environ["BAWA_SPARSE_BACKEND"] = name
    return kernels.prepare(w)


def correctness() -> list[dict]:
    rows = []
    for backend in ("cusparselt", "cutlass"):
        for dtype in (torch.bfloat16, torch.float16):
            w = pruned(1024, 2048, dtype)
            bias = torch.randn(1024, device="cuda", dtype=dtype)
            p = with_backend(backend, w)
            ran = kernels.backend_name(p.backend)
            row = {"backend": backend, "dtype": str(dtype), "ran": ran, "max_rel_err": None, "graph": None}
            if ran != backend:
                row["note"] = kernels.choose_backend(w.device, dtype, *w.shape)[1]
                rows.append(row)
                continue
            errs = []
            for m in (1, 5, 64, 333, 2048):
                x = torch.randn(m, 2048, device="cuda", dtype=dtype)
                ref = F.linear(x.float(), w.float(), bias.float())
                errs.append(((p(x, bias).float() - ref).abs().max() / ref.abs().max()).item())
            row["max_rel_err"] = max(errs)
            x = torch.randn(16, 2048, device="cuda", dtype=dtype)
            static_out = p(x, bias)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = p(x, bias)
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.cuda.synchronize()
            row["graph"] = bool(torch.allclose(static_out, p(x, bias), rtol=1e-2, atol=1e-2))
            rows.append(row)
    return rows


def timings(repeats: int) -> list[dict]:
    rows = []
    dtype = torch.bfloat16
    for tp in (1, 8):
        for name, n, k in linear_shapes(tp):
            w = pruned(n, k, dtype)
            prepared = {b: with_backend(b, w) for b in ("cusparselt", "cutlass", "auto")}
            for m in M_VALUES:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                row = {"shape": name, "tp": tp, "N": n, "K": k, "M": m,
                       "dense_ms": kernels.cuda_median_ms(lambda: F.linear(x, w), repeats)}
                for b, p in prepared.items():
                    ran = kernels.backend_name(p.backend)
                    if b != "auto" and ran != b:
                        row[f"{b}_ms"] = None
                        continue
                    row[f"{b}_ms"] = kernels.cuda_median_ms(lambda p=p: p(x), repeats)
                row["auto_min_sparse_m"] = prepared["auto"].min_sparse_m
                rows.append(row)
            del w, prepared
            torch.cuda.empty_cache()
    return rows


def markdown(result: dict) -> str:
    lines = [f"GPU: {result['device']}, torch {result['torch']}, cuSPARSELt {result['cusparselt']}", "",
             "| backend | dtype | ran | max rel err | CUDA graph |", "|---|---|---|---|---|"]
    for r in result["correctness"]:
        lines.append(f"| {r['backend']} | {r['dtype']} | {r['ran']} | {r['max_rel_err']} | {r['graph']} |")
    lines += ["", "Speed-up over dense (dense time / sparse time; >1 is faster), bf16:", "",
              "| shape | TP | M | dense ms | cuSPARSELt | CUTLASS | auto (plugin) |", "|---|---|---|---|---|---|---|"]
    for r in result["timings"]:
        def ratio(key):
            return "n/a" if r[key] is None else f"{r['dense_ms'] / r[key]:.2f}x"
        lines.append(f"| {r['shape']} | {r['tp']} | {r['M']} | {r['dense_ms']:.4f} | {ratio('cusparselt_ms')} | "
                     f"{ratio('cutlass_ms')} | {ratio('auto_ms')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check", help="output prefix for .json and .md")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device; none is visible")
    t0 = time.time()
    result = {"device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
              "torch": torch.__version__,
              "cusparselt": torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None,
              "correctness": correctness()}
    result["timings"] = timings(args.repeats)
    result["seconds"] = time.time() - t0
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2, default=str))
    table = markdown(result)
    Path(f"{args.out}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
