"""The 2:4 op against dense GEMMs on the machine at hand, on real models' linear shapes.

    python benchmarks/gemm.py --out benchmarks/results/gemm-cpu          # CPU: 1 and 2 threads
    python benchmarks/gemm.py --device cuda --out benchmarks/results/gemm-gpu

For each shape and token count M it times, side by side in one run (median of repeats):
``dense``, ``F.linear`` on the dense-masked weight; on CPU also ``vllm``, the weight through vLLM's own
CPU GEMM dispatch (oneDNN with a prepacked weight, what a dense model is served with), when vLLM is
installed; and ``sparse``, ``torch.ops.bawa_sparse.linear`` on the packed weight as the plugin holds it
(backend chosen as the plugin would). Ratios are dense time / sparse time (> 1: sparse is faster).

Decode reads each layer's weight from DRAM once per token, because a model's weights exceed the caches.
A benchmark that calls one weight in a loop would time cache hits (a 2:4 weight of 18 MB fits the 32 MB
L3 where its dense 32 MB does not, which inflates the ratio). Every method therefore cycles through
enough copies of its weight to exceed ``--cache-mb`` (default 2× a typical L3) on each timed pass.

Everything runs under ``torch.inference_mode()``, as vLLM's model runner does: outside it, every op pays
autograd's dispatch as well, which a served model does not.

Writes ``gemm.json``, ``gemm.md`` and ``gemm.png`` (ratio against M, one line per shape and thread count).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bawa_vllm import kernels  # noqa: E402
from bawa_vllm.pruning.masks import SparsityPattern, apply_mask_, keep_mask  # noqa: E402
from bawa_vllm.sparse.format import pack_24  # noqa: E402

MODELS = {  # hidden, intermediate, query heads, kv heads, head dim
    "SmolLM2-135M": (576, 1536, 9, 3, 64),
    "Llama-3.2-1B": (2048, 8192, 32, 8, 64),
    "Llama-3-8B": (4096, 14336, 32, 8, 128),
}


def linear_shapes(model: str) -> list[tuple[str, int, int]]:
    """(name, N, K) of a block's four linears as vLLM fuses them (qkv, o, gate_up, down)."""
    h, inter, heads, kv, hd = MODELS[model]
    return [(f"{model} qkv", (heads + 2 * kv) * hd, h), (f"{model} o", h, heads * hd),
            (f"{model} gate_up", 2 * inter, h), (f"{model} down", h, inter)]


def median_ms(methods: dict[str, list], repeats: int, cuda: bool) -> dict[str, float]:
    """Per method, the median over ``repeats`` passes of the mean time of one call, each pass calling each of
    the method's fns once. The methods take turns within every pass: this VM's speed drifts by tens of percent
    over a minute, and timing one method's passes after the other's put that drift into their ratio."""
    for fns in methods.values():
        for fn in fns:
            fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fns in methods.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for fn in fns:
                fn()
            if cuda:
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) * 1000 / len(fns))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def vllm_dense(weight: torch.Tensor):
    """``weight`` behind vLLM's CPU GEMM dispatch, as ``UnquantizedLinearMethod`` serves it; None without vLLM."""
    try:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    except ImportError:
        return None
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    return lambda x: layer.cpu_linear(x, layer.weight, None)


def run_shape(name: str, n: int, k: int, ms: list[int], dtype: torch.dtype, device: torch.device,
              threads: int, cache_mb: float, with_vllm: bool) -> list[dict]:
    w = torch.randn(n, k, device=device)
    w = apply_mask_(w, keep_mask(w.abs(), SparsityPattern.parse("2:4"))).to(dtype)
    copies = max(2, int(cache_mb * 2**20 // (n * k * w.element_size())) + 1)
    dense = [w.clone() for _ in range(copies)]
    values, meta = pack_24(w)
    sparse = [kernels.prepare(values.clone(), meta.clone(), name) for _ in range(copies)]
    vllm = [vllm_dense(w) for _ in range(copies)] if with_vllm else []
    vllm = [] if any(v is None for v in vllm) else vllm
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=device).to(dtype)
        flops = 2 * m * n * k
        repeats = max(3, min(15, int(2e10 / flops / copies)))  # about 20 GFLOP per method and M, at least 3 passes
        row = {"shape": name, "N": n, "K": k, "M": m, "threads": threads, "copies": copies,
               "backend": kernels.backend_name(sparse[0].backend)}
        methods = {"dense": [lambda d=d: F.linear(x, d) for d in dense], "sparse": [lambda p=p: p(x) for p in sparse]}
        if vllm:
            methods["vllm"] = [lambda f=f: f(x) for f in vllm]
        for method, ms_ in median_ms(methods, repeats, device.type == "cuda").items():
            row[f"{method}_ms"] = ms_
        row["sparse_vs_dense"] = row["dense_ms"] / row["sparse_ms"]
        if vllm:
            row["sparse_vs_vllm"] = row["vllm_ms"] / row["sparse_ms"]
        rows.append(row)
        extra = f", vs vLLM dispatch {row['sparse_vs_vllm']:.2f}x" if vllm else ""
        print(f"[{threads} thr] {name} [{n}x{k}] M={m}: dense {row['dense_ms']:.3f} ms, sparse {row['sparse_ms']:.3f} ms "
              f"({row['backend']}): {row['sparse_vs_dense']:.2f}x{extra}", flush=True)
    return rows


def write_report(rows: list[dict], out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemm.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    has_vllm = any("vllm_ms" in r for r in rows)
    head = "| shape | N x K | M | threads | dense ms | sparse ms | sparse vs F.linear |" + \
        (" sparse vs vLLM dispatch |" if has_vllm else "")
    lines = [f"{meta['device']}, {meta['dtype']}, torch {meta['torch']}; ratio = other time / sparse time "
             "(> 1: the packed 2:4 op is faster). vLLM's dispatch is timed at one thread only: its OpenMP runtime "
             "does not follow torch.set_num_threads outside a vLLM server."
             + (f" {meta['cpu_prefill']}." if "cpu_prefill" in meta else ""), "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| {r['shape']} | {r['N']}x{r['K']} | {r['M']} | {r['threads']} | {r['dense_ms']:.3f} | "
                f"{r['sparse_ms']:.3f} | {r['sparse_vs_dense']:.2f}x |")
        if has_vllm:
            line += f" {r['sparse_vs_vllm']:.2f}x |" if "sparse_vs_vllm" in r else " - |"
        lines.append(line)
    (out / "gemm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no gemm.png")
        return
    fig, ax = plt.subplots(figsize=(9, 5))
    for (shape, threads) in sorted({(r["shape"], r["threads"]) for r in rows}):
        sel = [r for r in rows if r["shape"] == shape and r["threads"] == threads]
        ax.plot([r["M"] for r in sel], [r["sparse_vs_dense"] for r in sel], marker="o",
                linestyle="-" if threads == 1 else "--", label=f"{shape} ({threads} thr)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per call (M)")
    ax.set_ylabel("dense F.linear time / packed 2:4 time")
    ax.set_title(f"2:4 op vs dense, {meta['device']}, {meta['dtype']}")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "gemm.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 512, 2048])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cache-mb", type=float, default=64.0,
                    help="each method cycles through copies of its weight totalling at least this (default: 64)")
    ap.add_argument("--no-vllm", action="store_true", help="skip vLLM's CPU dispatch column")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gemm"))
    args = ap.parse_args(argv)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    with_vllm = device.type == "cpu" and not args.no_vllm
    threads = args.threads if device.type == "cpu" else [torch.get_num_threads()]
    with torch.inference_mode():
        rows = measure(args, threads, dtype, device, with_vllm)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor() or platform.machine()}"
    meta = {"device": dev, "dtype": args.dtype, "torch": torch.__version__, "cache_mb": args.cache_mb,
            "inference_mode": True}
    if device.type == "cpu":  # which GEMM the bf16 prefill range ran on (tiles, or oneDNN panels on AMX CPUs)
        from bawa_vllm.kernels import cpu

        meta["cpu_prefill"] = cpu.prefill_summary(*cpu.prefill_path())
    write_report(rows, args.out, meta)


def measure(args, threads: list[int], dtype: torch.dtype, device: torch.device, with_vllm: bool) -> list[dict]:
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        for model in args.models:
            for name, n, k in linear_shapes(model):
                # vLLM's CPU GEMM runs on vLLM's own OpenMP runtime, which torch.set_num_threads does not reach
                # (measured: the same time at 1 and 2 threads, where F.linear halves); a served model binds its
                # threads itself. So the vLLM column is only measured at one thread, where both sides agree.
                rows += run_shape(name, n, k, args.m, dtype, device, t, args.cache_mb, with_vllm and t == 1)
    return rows


if __name__ == "__main__":
    main()
