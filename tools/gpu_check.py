"""GPU check of the bawa-sparse kernels: one command for the day a CUDA machine is lent (one H200: minutes).

    python tools/gpu_check.py --out gpu_check          # writes gpu_check.json and gpu_check.md, prints both
    python tools/gpu_check.py --dry-run --out /tmp/gc  # CPU, TRITON_INTERPRET=1, tiny shapes: same code paths

Needs torch with CUDA, triton and (for the prefill columns) cuSPARSELt; no vLLM, no network. It runs:

1. Correctness of every path against dense-masked ``F.linear`` in fp32: the Triton kernels at M values
   that reach each tile variant (not multiples of 8 included), cuSPARSELt prefill (``BAWA_SPARSE_PREFILL``
   with crossover 0), and the dense fallback; bf16 and fp16; weights with groups of 0, 1 and 2 non-zeros;
   with a bias. The output must also be contiguous row-major (the op's fake).
2. ``torch.compile(fullgraph=True)`` of a function around the op (inductor on GPU: its stride asserts come
   from the fake), and CUDA-graph capture + replay with new inputs, for each path.
3. Bytes per layer after ``kernels.prepare``: the tensors the layer keeps, and the allocator's view (GPU):
   Triton ≤ 0.60 × dense, with cuSPARSELt prefill ≤ 1.15 × dense.
4. Timing, bf16, Llama-3-8B and Llama-2-70B linear shapes whole (TP=1) and as TP=8 slices, M in
   {1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192}: dense ``F.linear`` (cuBLAS), Triton, cuSPARSELt; each
   captured in a CUDA graph, L2 flushed before every replay, median of ``--repeats`` (CUDA events).
5. Decode kernels compared: at M = 1, 2, 4 the gather GEMV (what runs) against the decompress + ``tl.dot``
   kernel with M padded to 16, so that ``GEMV_MAX_M`` in ``triton_24.py`` can be set from measurements.
6. The cuSPARSELt crossover for this GPU's architecture: per shape the smallest M from which cuSPARSELt
   beats the Triton kernel at every larger M measured; the architecture's value is the median over shapes.
   The line to paste into ``bawa_vllm/kernels/triton_24.py`` (``CUSPARSELT_MIN_M``) is printed.

``--dry-run`` runs 1-6 on CPU tensors under the Triton interpreter with tiny shapes (CUDA graphs and
cuSPARSELt reported as not run, timings from a wall clock, not a speed): CI runs it so that this script
cannot rot. Its figures say nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

M_VALUES = (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192)
MODELS = {  # hidden, intermediate, heads, kv heads, head_dim
    "Llama-3-8B": (4096, 14336, 32, 8, 128),
    "Llama-2-70B": (8192, 28672, 64, 8, 128),
}
CHECK_M = (1, 3, 4, 5, 16, 17, 33, 64, 65, 130, 333, 2048)
DRY_CHECK_M = (1, 3, 5, 16, 17, 33, 65, 130)
DRY_SHAPES = [("tiny qkv", 1, 96, 256), ("tiny down", 1, 64, 520)]
DRY_M_VALUES = (1, 4, 16, 64, 128, 512)
TRITON_BYTES_MAX, CUSPARSELT_BYTES_MAX = 0.60, 1.15
TARGETS = "decode (M <= 16) >= 1.4x dense; M >= 2048 >= 1.1x with cuSPARSELt prefill; no M below 0.95x"


def linear_shapes(tp: int) -> list[tuple[str, int, int, int]]:
    """(name, TP, N, K) per rank: qkv and gate_up are column-parallel, o and down row-parallel."""
    out = []
    for model, (h, inter, heads, kv, hd) in MODELS.items():
        out += [(f"{model} qkv", tp, (heads + 2 * kv) * hd // tp, h), (f"{model} o", tp, h, heads * hd // tp),
                (f"{model} gate_up", tp, 2 * inter // tp, h), (f"{model} down", tp, h, inter // tp)]
    return out


class Env:
    """Device, dtype helpers and timing for the GPU run or the CPU dry run."""

    def __init__(self, dry_run: bool, repeats: int):
        import torch

        self.torch = torch
        self.dry = dry_run
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.repeats = 1 if dry_run else repeats
        self.flush = None if dry_run else torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")

    def sparse_weight(self, n: int, k: int, dtype, seed: int = 0):
        """A random 2:4 weight on the device with groups of 0, 1 and 2 non-zeros (a third of each)."""
        torch = self.torch
        g = torch.Generator(device=self.device).manual_seed(seed)
        w = torch.randn(n, k, generator=g, device=self.device)
        keep = torch.rand(n, k // 4, 4, generator=g, device=self.device).argsort(-1) < 2
        keep[:, 0::3] = False
        first = keep[:, 1::3, :].float().argmax(-1, keepdim=True)
        keep[:, 1::3, :] &= torch.arange(4, device=self.device) == first
        return (w * keep.reshape(n, k)).to(dtype)

    def time_ms(self, fn) -> float:
        """Median ms of ``fn``: on GPU a CUDA graph of one call, L2 flushed before each replay, events."""
        torch = self.torch
        if self.dry:
            fn()
            times = []
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        fn()  # compile / plan outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        events = []
        for _ in range(self.repeats):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        del graph
        return statistics.median(s.elapsed_time(e) for s, e in events)


def prepared(env: Env, w, backend: str, prefill_min_m: int | None = None):
    """``kernels.prepare`` of ``w``'s packed form with ``backend`` (``cusparselt``: Triton + cuSPARSELt aux
    from ``prefill_min_m`` tokens)."""
    from bawa_vllm import kernels
    from bawa_vllm.kernels import triton_24
    from bawa_vllm.sparse.format import pack_24

    values, meta = pack_24(w)
    code = {"dense": kernels.DENSE, "triton": kernels.TRITON, "cusparselt": kernels.TRITON}[backend]
    saved = {k: os.environ.get(k) for k in (triton_24.PREFILL_ENV, triton_24.PREFILL_MIN_M_ENV)}
    try:
        os.environ[triton_24.PREFILL_ENV] = "cusparselt" if backend == "cusparselt" else "triton"
        if prefill_min_m is not None:
            os.environ[triton_24.PREFILL_MIN_M_ENV] = str(prefill_min_m)
        return kernels.prepare(values, meta, f"{backend} check", backend=code)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ran(packed, backend: str) -> bool:
    """Whether prepare kept what ``backend`` needs (cuSPARSELt can drop out at load, with a logged reason)."""
    from bawa_vllm import kernels

    if backend == "cusparselt":
        return packed.backend == kernels.TRITON and packed.aux is not None
    return packed.backend == (kernels.TRITON if backend == "triton" else kernels.DENSE)


def correctness(env: Env) -> list[dict]:
    torch = env.torch
    import torch.nn.functional as F

    n, k = (80, 264) if env.dry else (1024, 2056)  # neither a multiple of the tiles: the masked paths too
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        w = env.sparse_weight(n, k, dtype, seed=1)
        bias = torch.randn(n, device=env.device).to(dtype)
        ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
        for backend in ("triton", "cusparselt", "dense"):
            p = prepared(env, w, backend, prefill_min_m=0)
            row = {"path": backend, "dtype": str(dtype).removeprefix("torch."), "ran": ran(p, backend)}
            if not row["ran"]:
                row["note"] = "not available here (see the log)"
                rows.append(row)
                continue
            worst, strides_ok = 0.0, True
            for m in DRY_CHECK_M if env.dry else CHECK_M:
                x = torch.randn(m, k, device=env.device).to(dtype)
                ref = F.linear(x.float(), w.float(), bias.float())
                y = p(x, bias)
                strides_ok &= y.shape == (m, n) and y.is_contiguous()
                err = ((y.float() - ref).abs() / (ulp * ref.abs() + 1e-3 * ref.abs().max())).max()
                worst = max(worst, float(err))
            row.update(max_err_over_bound=round(worst, 3), ok=worst <= 1.0 and strides_ok,
                       row_major=strides_ok)
            row.update(compile_and_graph(env, p, k, dtype))
            rows.append(row)
    return rows


def compile_and_graph(env: Env, p, k: int, dtype) -> dict:
    """fullgraph torch.compile of a function around the op, and CUDA-graph capture/replay (GPU only)."""
    torch = env.torch
    out: dict = {}
    try:
        fn = torch.compile(lambda t: p(t) * 2 + 1, fullgraph=True, dynamic=False,
                           backend="aot_eager" if env.dry else "inductor")
        x = torch.randn(17, k, device=env.device).to(dtype)
        out["compile_ok"] = bool(torch.allclose(fn(x), p(x) * 2 + 1, rtol=1e-2, atol=1e-2))
    except Exception as err:  # noqa: BLE001 - reported in the table, the check goes on
        out["compile_ok"], out["compile_error"] = False, repr(err)[:300]
    if env.dry:
        out["graph_ok"] = None
        return out
    ok = True
    for m in (1, 16, 130, 2048):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        p(x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = p(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        ok &= bool(torch.allclose(y.float(), p(x).float(), rtol=1e-2, atol=1e-2))
    out["graph_ok"] = ok
    return out


def memory(env: Env) -> list[dict]:
    """Bytes a prepared layer keeps vs its dense weight (and the allocator's growth and peak on GPU)."""
    torch = env.torch
    n, k = (96, 256) if env.dry else (14336 * 2, 4096)  # Llama-3-8B gate_up at TP=1
    dtype = torch.bfloat16
    w = env.sparse_weight(n, k, dtype, seed=2)
    dense_bytes = w.numel() * w.element_size()
    rows = []
    for backend, limit in (("triton", TRITON_BYTES_MAX), ("cusparselt", CUSPARSELT_BYTES_MAX)):
        from bawa_vllm.sparse.format import pack_24

        values, meta = pack_24(w)
        if not env.dry:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        from bawa_vllm import kernels
        from bawa_vllm.kernels import triton_24

        os.environ[triton_24.PREFILL_ENV] = backend if backend == "cusparselt" else "triton"
        try:
            p = kernels.prepare(values, meta, "memory check", backend=kernels.TRITON)
        finally:
            os.environ.pop(triton_24.PREFILL_ENV, None)
        del values, meta
        held = sum(t.numel() * t.element_size() for t in p.tensors().values())
        row = {"path": backend, "shape": [n, k], "ran": ran(p, backend),
               "held_over_dense": round(held / dense_bytes, 4), "limit": limit,
               "ok": held / dense_bytes <= limit}
        if not env.dry:
            torch.cuda.synchronize()
            growth, peak = torch.cuda.memory_allocated() - before, torch.cuda.max_memory_allocated() - before
            row["allocated_growth_over_dense"] = round(growth / dense_bytes, 4)
            row["peak_during_prepare_over_dense"] = round(peak / dense_bytes, 4)
        rows.append(row)
        del p
    return rows


def timings(env: Env, log) -> list[dict]:
    torch = env.torch
    import torch.nn.functional as F

    dtype = torch.bfloat16
    shapes = DRY_SHAPES if env.dry else linear_shapes(1) + linear_shapes(8)
    rows = []
    for name, tp, n, k in shapes:
        w = env.sparse_weight(n, k, dtype, seed=3)
        paths = {"triton": prepared(env, w, "triton"),
                 "cusparselt": prepared(env, w, "cusparselt", prefill_min_m=0)}
        if not ran(paths["cusparselt"], "cusparselt"):
            del paths["cusparselt"]
        for m in DRY_M_VALUES if env.dry else M_VALUES:
            x = torch.randn(m, k, device=env.device, dtype=dtype)
            row = {"shape": name, "tp": tp, "N": n, "K": k, "M": m,
                   "dense_ms": env.time_ms(lambda w=w, x=x: F.linear(x, w))}
            for path in ("triton", "cusparselt"):
                row[f"{path}_ms"] = env.time_ms(lambda p=paths[path], x=x: p(x)) if path in paths else None
            rows.append(row)
            log(f"  {name:22s} TP={tp} M={m:5d}  dense {row['dense_ms']:.4f} ms  "
                f"triton {row['triton_ms']:.4f} ms"
                + (f"  cusparselt {row['cusparselt_ms']:.4f} ms" if row["cusparselt_ms"] is not None else ""))
        del w, paths
        if not env.dry:
            torch.cuda.empty_cache()
    return rows


def decode_kernels(env: Env) -> list[dict]:
    """Median ms of the gather GEMV and of the tl.dot kernel (M padded to 16) at decode sizes, per shape."""
    torch = env.torch
    from bawa_vllm.kernels import triton_24

    dtype = torch.bfloat16
    shapes = DRY_SHAPES if env.dry else linear_shapes(1) + linear_shapes(8)
    rows = []
    for name, tp, n, k in shapes:
        p = prepared(env, env.sparse_weight(n, k, dtype, seed=4), "triton")
        for m in (1, 2, 4):
            x = torch.randn(m, k, device=env.device, dtype=dtype)
            row = {"shape": name, "tp": tp, "M": m, "gemv_ms": env.time_ms(lambda p=p, x=x: p(x))}
            saved = triton_24.GEMV_MAX_M
            triton_24.GEMV_MAX_M = 0  # every M through the tl.dot kernel
            try:
                row["dot_ms"] = env.time_ms(lambda p=p, x=x: p(x))
            finally:
                triton_24.GEMV_MAX_M = saved
            rows.append(row)
        del p
    return rows


def crossover(rows: list[dict]) -> dict:
    """Per shape: the smallest M from which cuSPARSELt beats Triton at every larger measured M (None: never);
    the architecture's value: the median over shapes, "never" counted as above every M."""
    per_shape: dict[str, int | None] = {}
    for key in dict.fromkeys((r["shape"], r["tp"]) for r in rows):
        mine = sorted((r for r in rows if (r["shape"], r["tp"]) == key), key=lambda r: r["M"])
        if any(r["cusparselt_ms"] is None for r in mine):
            continue
        threshold = None
        for r in reversed(mine):
            if r["cusparselt_ms"] >= r["triton_ms"]:
                break
            threshold = r["M"]
        per_shape[f"{key[0]} TP={key[1]}"] = threshold
    if not per_shape:
        return {"per_shape": {}, "min_m": None}
    never = 10**9
    med = statistics.median_low([never if t is None else t for t in per_shape.values()])
    return {"per_shape": per_shape, "min_m": None if med == never else med}


def markdown(result: dict) -> str:
    lines = [f"# bawa-sparse GPU check: {result['device']} ({result['arch']})", "",
             f"torch {result['torch']}, triton {result['triton']}, cuSPARSELt {result['cusparselt']}; "
             f"{result['seconds']:.0f} s"
             + ("; **dry run on CPU (Triton interpreter): not a speed**" if result["dry_run"] else ""), "",
             "## Correctness (error / bound: ≤ 1 passes; bound = 1 ulp of the output + 1e-3 · max|ref|)", "",
             "| path | dtype | ran | err/bound | row-major | torch.compile | CUDA graph | ok |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["correctness"]:
        lines.append(f"| {r['path']} | {r['dtype']} | {r['ran']} | {r.get('max_err_over_bound')} | "
                     f"{r.get('row_major')} | "
                     f"{r.get('compile_ok')} | {r.get('graph_ok')} | {r.get('ok')} |")
    lines += ["", "## Bytes per layer (over the dense weight's)", "",
              "| path | shape | held | allocator growth | peak during prepare | limit | ok |",
              "|---|---|---|---|---|---|---|"]
    for r in result["memory"]:
        lines.append(f"| {r['path']} | {r['shape']} | {r['held_over_dense']} | "
                     f"{r.get('allocated_growth_over_dense')} | "
                     f"{r.get('peak_during_prepare_over_dense')} | {r['limit']} | {r['ok']} |")
    lines += ["", "## Speed-up over dense (dense ms / path ms; > 1 is faster), bf16", "",
              f"Targets: {TARGETS}.", "",
              "| shape | TP | M | dense ms | Triton | cuSPARSELt | plugin (with crossover) |",
              "|---|---|---|---|---|---|---|"]
    cut = result["crossover"]["min_m"]
    for r in result["timings"]:
        def ratio(ms):
            return "n/a" if ms is None else f"{r['dense_ms'] / ms:.2f}x"
        plugin = r["cusparselt_ms"] if cut is not None and r["M"] >= cut else r["triton_ms"]
        lines.append(f"| {r['shape']} | {r['tp']} | {r['M']} | {r['dense_ms']:.4f} | "
                     f"{ratio(r['triton_ms'])} | "
                     f"{ratio(r['cusparselt_ms'])} | {ratio(plugin)} |")
    lines += ["", "## Decode kernels (ms): gather GEMV (used for M <= GEMV_MAX_M) vs decompress + tl.dot", "",
              "| shape | TP | M | GEMV | tl.dot (M padded to 16) |", "|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['tp']} | {r['M']} | {r['gemv_ms']:.4f} | {r['dot_ms']:.4f} |"
              for r in result["decode_kernels"]]
    if not result["crossover"]["per_shape"]:
        lines += ["", f"## cuSPARSELt crossover for {result['arch']}: not measured (cuSPARSELt did not run)"]
    else:
        lines += ["", f"## cuSPARSELt crossover for {result['arch']}: "
                  f"{'never' if cut is None else f'M >= {cut}'} (median over shapes)", "",
                  "| shape | from M |", "|---|---|"]
        lines += [f"| {s} | {'never' if t is None else t} |"
                  for s, t in result["crossover"]["per_shape"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check", help="output prefix for .json and .md")
    ap.add_argument("--repeats", type=int, default=20, help="timed replays per measurement (median)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU tensors under TRITON_INTERPRET=1, tiny shapes: checks the script, not the GPU")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported (read at decoration)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch
    import triton

    from bawa_vllm.kernels import triton_24

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device; none is visible (--dry-run checks it on CPU)")
    env = Env(args.dry_run, args.repeats)
    t0 = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {message}", flush=True)

    cslt = torch.backends.cusparselt.is_available()
    result = {"dry_run": args.dry_run, "torch": torch.__version__, "triton": triton.__version__,
              "device": "cpu (Triton interpreter)" if args.dry_run else torch.cuda.get_device_name(),
              "arch": "interpreter" if args.dry_run else triton_24.arch(env.device),
              "cusparselt": torch.backends.cusparselt.version() if cslt else None}
    log("correctness, torch.compile, CUDA graphs")
    result["correctness"] = correctness(env)
    log("bytes per layer")
    result["memory"] = memory(env)
    log("timings")
    result["timings"] = timings(env, log)
    result["crossover"] = crossover(result["timings"])
    log("decode kernels")
    result["decode_kernels"] = decode_kernels(env)
    result["seconds"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2, default=str))
    table = markdown(result)
    Path(f"{args.out}.md").write_text(table)
    print(table)
    cut = result["crossover"]["min_m"]
    if not args.dry_run and result["crossover"]["per_shape"]:
        print(f"paste into bawa_vllm/kernels/triton_24.py CUSPARSELT_MIN_M: {result['arch']!r}: "
              f"{'(never: leave cuSPARSELt off)' if cut is None else cut},")
    failed = [r for r in result["correctness"]
              if r["ran"] and not (r["ok"] and r["compile_ok"] and r["graph_ok"] is not False)]
    failed += [r for r in result["memory"] if r["ran"] and not r["ok"]]
    for r in failed:
        print(f"FAILED: {r}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
