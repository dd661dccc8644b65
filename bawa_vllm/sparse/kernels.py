"""2:4 sparse linear kernels behind one torch.library op, ``torch.ops.bawa_sparse.linear``.

Backends (``BAWA_SPARSE_BACKEND=auto|cusparselt|cutlass|dense``):

- ``cusparselt``: ``torch._cslt_compress`` once at load, ``torch._cslt_sparse_mm`` per call; NVIDIA sm80+.
- ``cutlass``: ``torch._to_sparse_semi_structured`` once, ``torch._sparse_semi_structured_mm``; sm8x only.
- ``dense``: the dense weight rebuilt once; ``F.linear`` (vLLM's CPU GEMM dispatch is used by the plugin on CPU).

A sparse kernel is slower than dense at small token counts (decode), so each sparse layer keeps a
``min_sparse_m``: below it the op runs the dense weight. ``choose_min_sparse_m`` measures the
crossover at load time on the layer's own shape (cached per shape and dtype). When the sparse
kernel never wins, the layer runs dense only; when it always wins, no dense copy is kept.

The op has no host synchronisation (no ``.item()``, no scalar ``alpha``) and a fake implementation,
so ``torch.compile(fullgraph=True)`` traces it and CUDA graphs capture it; M is padded to the
kernels' minimum multiple and sliced back. This module does not import vLLM.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cusparselt", "cutlass", "dense")
DENSE, CUSPARSELT, CUTLASS = 0, 1, 2
_CODE = {"dense": DENSE, "cusparselt": CUSPARSELT, "cutlass": CUTLASS}
# Token-count multiple and (N, K) minimum multiples per kernel for 16-bit dtypes
# (torch/sparse/semi_structured.py: cuSPARSELt (16, 16, 8, 8), CUTLASS (32, 64, 8, 8)).
_M_MULTIPLE = 8
_SHAPE_MULTIPLE = {CUSPARSELT: (16, 16), CUTLASS: (32, 64)}
_SPARSE_DTYPES = (torch.float16, torch.bfloat16)


def _pad_rows(x2: torch.Tensor) -> torch.Tensor:
    pad = (-x2.shape[0]) % _M_MULTIPLE
    return F.pad(x2, (0, 0, 0, pad)) if pad else x2


def _sparse_mm(x2: torch.Tensor, packed: torch.Tensor, meta: torch.Tensor | None, bias: torch.Tensor | None,
               backend: int) -> torch.Tensor:
    m = x2.shape[0]
    xp = _pad_rows(x2)
    if backend == CUSPARSELT:
        # (W · Xᵀ)ᵀ = X Wᵀ as [M_pad, N]; x.t() of a contiguous x selects the transposed descriptor (no copy)
        y = torch._cslt_sparse_mm(packed, xp.t(), bias=bias, transpose_result=True)
    else:
        y = torch._sparse_semi_structured_mm(packed, meta, xp.t()).t()
        if bias is not None:
            y = y + bias
    return y[:m]


@torch.library.custom_op("bawa_sparse::linear", mutates_args=())
def sparse_linear(x: torch.Tensor, packed: torch.Tensor | None, meta: torch.Tensor | None,
                  dense: torch.Tensor | None, bias: torch.Tensor | None, out_features: int, backend: int,
                  min_sparse_m: int) -> torch.Tensor:
    """``x @ Wᵀ + bias`` for a 2:4 ``W``: sparse kernel from ``min_sparse_m`` tokens up, dense below."""
    x2 = x.reshape(-1, x.shape[-1])
    if backend == DENSE or x2.shape[0] < min_sparse_m:
        y = F.linear(x2, dense, bias)
    else:
        y = _sparse_mm(x2.contiguous(), packed, meta, bias, backend)
    return y.reshape(*x.shape[:-1], out_features)


@sparse_linear.register_fake
def _(x, packed, meta, dense, bias, out_features, backend, min_sparse_m):
    return x.new_empty((*x.shape[:-1], out_features))


@dataclass
class PreparedWeight:
    """What a layer keeps after loading: the kernel's own layout and/or the dense weight."""

    backend: int
    out_features: int
    packed: torch.Tensor | None = None
    meta: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    min_sparse_m: int = 0

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.bawa_sparse.linear(x, self.packed, self.meta, self.dense, bias, self.out_features,
                                            self.backend, self.min_sparse_m)


def requested_backend() -> str:
    name = os.environ.get("BAWA_SPARSE_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"BAWA_SPARSE_BACKEND={name!r}: choose one of {', '.join(BACKENDS)}")
    return name


def supported(backend: int, device: torch.device, dtype: torch.dtype, n: int, k: int) -> tuple[bool, str]:
    """Whether ``backend`` can run a [n, k] weight of ``dtype`` on ``device``, and why not."""
    if backend == DENSE:
        return True, ""
    if device.type != "cuda":
        return False, f"{device.type} has no 2:4 sparse tensor cores"
    if dtype not in _SPARSE_DTYPES:
        return False, f"{dtype} is not fp16/bf16"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"sm{major}{minor} < sm80"
    if backend == CUSPARSELT and not torch.backends.cusparselt.is_available():
        return False, "this torch has no cuSPARSELt"
    if backend == CUTLASS and major != 8:
        return False, f"CUTLASS 2:4 kernels run on sm8x only, not sm{major}{minor}"
    rows, cols = _SHAPE_MULTIPLE[backend]
    if n % rows or k % cols:
        return False, f"shape [{n}, {k}] misses the kernel's multiples ({rows}, {cols})"
    return True, ""


def choose_backend(device: torch.device, dtype: torch.dtype, n: int, k: int) -> tuple[int, str]:
    """The backend for one layer: the requested one if it can run, else the best that can, else dense."""
    requested = requested_backend()
    order = [CUSPARSELT, CUTLASS] if requested == "auto" else [_CODE[requested]]
    reasons = []
    for code in order:
        ok, why = supported(code, device, dtype, n, k)
        if ok:
            return code, ""
        reasons.append(f"{backend_name(code)}: {why}")
    return DENSE, "; ".join(reasons)


def compress(dense: torch.Tensor, backend: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if backend == CUSPARSELT:
        return torch._cslt_compress(dense), None
    packed, meta = torch._to_sparse_semi_structured(dense)
    return packed, meta


_CROSSOVER_CACHE: dict[tuple, int] = {}
_PROBE_M = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@torch.no_grad()
def choose_min_sparse_m(prepared: PreparedWeight, k: int, repeats: int = 20) -> int:
    """Smallest token count from which the sparse kernel beats dense on every larger probed count.

    Returns 0 if sparse wins everywhere and ``2**31 - 1`` if it never wins. Cached per shape/dtype/backend.
    """
    dense = prepared.dense
    key = (prepared.backend, tuple(dense.shape), dense.dtype, dense.device.index)
    if key in _CROSSOVER_CACHE:
        return _CROSSOVER_CACHE[key]
    wins = []
    for m in _PROBE_M:
        x = torch.randn(m, k, device=dense.device, dtype=dense.dtype)
        t_dense = cuda_median_ms(lambda: F.linear(x, dense), repeats)
        t_sparse = cuda_median_ms(lambda: _sparse_mm(x, prepared.packed, prepared.meta, None, prepared.backend), repeats)
        wins.append(t_sparse < t_dense)
    threshold = 2**31 - 1
    for i in range(len(_PROBE_M) - 1, -1, -1):
        if not wins[i]:
            break
        threshold = 0 if i == 0 else _PROBE_M[i]
    _CROSSOVER_CACHE[key] = threshold
    return threshold


def cuda_median_ms(fn, repeats: int) -> float:
    """Median over ``repeats`` of ``fn``'s GPU time in ms (CUDA events), after warm-up calls."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def prepare(dense: torch.Tensor, name: str = "layer") -> PreparedWeight:
    """Build the kernel's layout for a dense 2:4 weight on its device (never stored on disk)."""
    n, k = dense.shape
    backend, why = choose_backend(dense.device, dense.dtype, n, k)
    if backend == DENSE:
        if why and requested_backend() != "dense":
            logger.debug("%s: dense fallback (%s)", name, why)
        return PreparedWeight(DENSE, n, dense=dense)
    packed, meta = compress(dense, backend)
    prepared = PreparedWeight(backend, n, packed=packed, meta=meta, dense=dense)
    if requested_backend() == "auto":
        prepared.min_sparse_m = choose_min_sparse_m(prepared, k)
        if prepared.min_sparse_m == 2**31 - 1:
            return PreparedWeight(DENSE, n, dense=dense)
    else:
        prepared.min_sparse_m = 0
    if prepared.min_sparse_m == 0:
        prepared.dense = None  # sparse wins at every size: keep only the compressed weight
    return prepared


def backend_name(code: int) -> str:
    return next(name for name, c in _CODE.items() if c == code)
