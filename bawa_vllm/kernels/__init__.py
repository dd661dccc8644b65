"""2:4 sparse linear kernels behind one op, ``torch.ops.bawa_sparse.linear``: one packed copy, a backend per platform.

The design every backend follows (the rule of issues 10 and 11):

- A loaded layer holds **one packed copy** of its weight: the on-disk ``weight_values [N, K/2]`` and
  ``weight_meta [N, K/8]`` (docs/FORMAT.md), or a re-tiled form of them that the backend makes at load,
  of the same size. Never the dense weight next to it. (The only exception is opt-in: ``cusparselt``
  prefill adds the library's compressed copy, ≈ 9/16 more, because users asked to trade memory for it.)
- :func:`prepare` turns the loaded ``(values, meta)`` into the backend's layout, in place where it can;
  :func:`linear` (the op) computes ``y = x Wᵀ + bias`` from it. The op has a fake implementation and no
  host synchronisation, so ``torch.compile(fullgraph=True)`` traces it as one call and CUDA graphs
  capture it.
- Backends, each a module of this package:

  ========== ============================ =========================================================
  code       module                       where
  ========== ============================ =========================================================
  ``cpu``    :mod:`.cpu` (C++, AVX-512)   x86 CPUs with AVX-512 (built at first use, see there)
  ``triton`` :mod:`.triton_24`            NVIDIA GPUs (reads the packed layout directly)
  ``dense``  :mod:`.dense`                anywhere: the dense weight rebuilt once (fallback / A/B)
  ========== ============================ =========================================================

``BAWA_SPARSE_BACKEND=auto|cpu|triton|dense`` forces one; ``auto`` takes the first that can run the layer,
and a backend that cannot (no compiler, no AVX-512, no GPU, a failed build) says why, once.

This package does not import vLLM.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from . import dense as _dense

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu", "triton", "dense")
DENSE, CPU, TRITON = 0, 1, 2
_CODE = {"dense": DENSE, "cpu": CPU, "triton": TRITON}
_LOGGED: set[str] = set()


def log_once(message: str, level: int = logging.INFO) -> None:
    """Log ``message`` once per process (every layer asks the same question at load)."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.log(level, message)


def backend_name(code: int) -> str:
    return next(name for name, c in _CODE.items() if c == code)


def requested_backend() -> str:
    name = os.environ.get("BAWA_SPARSE_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"BAWA_SPARSE_BACKEND={name!r}: choose one of {', '.join(BACKENDS)}")
    return name


def _module(code: int):
    """The backend's module, imported on first use (the GPU one needs triton, the CPU one a compiler)."""
    if code == CPU:
        from . import cpu

        return cpu
    if code == TRITON:
        from . import triton_24

        return triton_24
    if code == DENSE:
        return _dense
    raise ValueError(f"bawa_sparse: unknown backend code {code} (choose one of {sorted(_CODE.values())})")


def supported(code: int, device: torch.device, dtype: torch.dtype, n: int, k: int) -> tuple[bool, str]:
    """Whether backend ``code`` can run a [n, k] weight of ``dtype`` on ``device``, and why not."""
    try:
        return _module(code).supported(device, dtype, n, k)
    except ImportError as err:  # e.g. triton not installed
        return False, f"{backend_name(code)} is not importable ({err})"


def choose_backend(device: torch.device, dtype: torch.dtype, n: int, k: int) -> tuple[int, str]:
    """The backend for one layer: the requested one if it can run, else dense, with the reason."""
    requested = requested_backend()
    if requested == "dense":
        return DENSE, "BAWA_SPARSE_BACKEND=dense"
    order = [CPU, TRITON] if requested == "auto" else [_CODE[requested]]
    reasons = []
    for code in order:
        if code == CPU and device.type != "cpu" or code == TRITON and device.type != "cuda":
            if requested != "auto":
                reasons.append(f"{backend_name(code)}: runs on {'cpu' if code == CPU else 'cuda'}, not {device.type}")
            continue
        ok, why = supported(code, device, dtype, n, k)
        if ok:
            return code, ""
        reasons.append(f"{backend_name(code)}: {why}")
    return DENSE, "; ".join(reasons) or f"no sparse kernel for {device.type}"


@dataclass
class PackedLinear:
    """What a loaded layer keeps: the backend's packed tensors (``aux`` only for opt-in extras)."""

    backend: int
    out_features: int
    values: torch.Tensor
    meta: torch.Tensor
    aux: torch.Tensor | None = None
    aux_min_m: int = 0

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {"values": self.values, "meta": self.meta}
        if self.aux is not None:
            named["aux"] = self.aux
        return named

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.bawa_sparse.linear(x, self.values, self.meta, bias, self.out_features, self.backend,
                                            self.aux, self.aux_min_m)


def prepare(values: torch.Tensor, meta: torch.Tensor, name: str = "layer", backend: int | None = None) -> PackedLinear:
    """The layer's one packed copy in the chosen backend's layout, made from the loaded ``(values, meta)``.

    ``values``/``meta`` must already be validated (``format.check_packed``); they may be consumed (changed
    in place or freed), so the caller keeps only what this returns.
    """
    n, k = values.shape[0], values.shape[1] * 2
    if backend is None:
        backend, why = choose_backend(values.device, values.dtype, n, k)
        if why:
            log_once(f"bawa-sparse: dense fallback on {values.device.type} ({why})", logging.WARNING
                     if requested_backend() != "dense" else logging.INFO)
    try:
        return _module(backend).prepare(values, meta, n)
    except Exception as err:  # a runtime kernel failure at load must not abort serving: fall back, say why
        if backend == DENSE:
            raise
        log_once(f"bawa-sparse: {backend_name(backend)} backend failed at load of {name} ({err!r}); "
                 "using the dense fallback", logging.WARNING)
        return _dense.prepare(values, meta, n)


def python_body(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                out_features: int, backend: int, aux: torch.Tensor | None = None, aux_min_m: int = 0) -> torch.Tensor:
    """``x @ Wᵀ + bias`` for a 2:4 ``W`` held as :func:`prepare` left it; any leading dims of ``x``.

    The op's Python body: the GPU backends, and the dense fallback until the CPU kernel is loaded. For CPU
    tensors the CPU kernel's library registers a C++ implementation of the op (``sparse24.cpp``,
    ``op_linear``) that the dispatcher prefers, so a ``cpu`` layer pays no Python per decode call; it runs
    the ``cpu`` code itself and hands any other code (the dense fallback, Triton's interpreter on CPU
    tensors) back to this function."""
    if backend == CPU:  # its kernel is C++ only: here only if CPU code meets tensors of another device
        raise RuntimeError(f"bawa_sparse::linear: the cpu backend runs on CPU tensors only, got {x.device}")
    x2 = x.reshape(-1, x.shape[-1])
    y = _module(backend).linear(x2, values, meta, bias, out_features, aux, aux_min_m)
    return y.reshape(*x.shape[:-1], out_features)


linear = torch.library.custom_op("bawa_sparse::linear", python_body, mutates_args=())


@linear.register_fake
def _(x, values, meta, bias, out_features, backend, aux=None, aux_min_m=0):
    return x.new_empty((*x.shape[:-1], out_features))
