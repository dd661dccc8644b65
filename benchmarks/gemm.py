"""Dense vs each 2:4 backend for given linear shapes and token counts, on the machine at hand.

    python benchmarks/gemm.py --shapes 4096x4096 11008x4096 4096x11008 --m 1 16 128 2048 --out benchmarks/results/gemm

Shapes are ``NxK`` (outputs x inputs). For every backend (cuSPARSELt, CUTLASS, and ``auto`` as the
plugin runs it, with its load-time crossover) it reports the median time and the speed-up over
dense ``F.linear``, or why the backend cannot run here (on CPU: no 2:4 sparse tensor cores, so the
plugin computes densely and the ratio is about 1). Writes ``gemm.json`` and ``gemm.md``.
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


def median_ms(fn, repeats: int, cuda: bool) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "4096x11008"])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 128, 1024])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gemm"))
    args = ap.parse_args(argv)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    cuda = device.type == "cuda"
    rows = []
    for shape in args.shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        w = torch.randn(n, k, device=device, dtype=dtype)
        w = apply_mask_(w, keep_mask(w.float().abs(), SparsityPattern.parse("2:4")))
        prepared, why = {}, {}
        for backend in ("cusparselt", "cutlass", "auto"):
            os.environ["BAWA_SPARSE_BACKEND"] = backend
            p = kernels.prepare(w)
            if backend != "auto" and kernels.backend_name(p.backend) != backend:
                why[backend] = kernels.choose_backend(device, dtype, n, k)[1]
            else:
                prepared[backend] = p
        for m in args.m:
            x = torch.randn(m, k, device=device, dtype=dtype)
            row = {"N": n, "K": k, "M": m, "dense_ms": median_ms(lambda: F.linear(x, w), args.repeats, cuda)}
            for backend in ("cusparselt", "cutlass", "auto"):
                if backend in prepared:
                    p = prepared[backend]
                    row[f"{backend}_ms"] = median_ms(lambda p=p: p(x), args.repeats, cuda)
                    row[f"{backend}_ran"] = kernels.backend_name(p.backend)
                else:
                    row[f"{backend}_ms"], row[f"{backend}_ran"] = None, f"unavailable: {why[backend]}"
            rows.append(row)
            print(row, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} threads visible)"
    result = {"device": device_name, "dtype": args.dtype, "torch": torch.__version__, "rows": rows}
    (args.out / "gemm.json").write_text(json.dumps(result, indent=2))
    lines = [f"{device_name}, {args.dtype}, torch {torch.__version__}; speed-up = dense time / backend time.", "",
             "| N | K | M | dense ms | cuSPARSELt | CUTLASS | auto (plugin) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for b in ("cusparselt", "cutlass", "auto"):
            cells.append(f"{r['dense_ms'] / r[f'{b}_ms']:.2f}x ({r[f'{b}_ran']})" if r[f"{b}_ms"] else r[f"{b}_ran"])
        lines.append(f"| {r['N']} | {r['K']} | {r['M']} | {r['dense_ms']:.3f} | " + " | ".join(cells) + " |")
    (args.out / "gemm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
