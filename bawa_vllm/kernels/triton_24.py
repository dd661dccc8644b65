"""The ``triton`` backend: Triton kernels that read the packed 2:4 weight directly (NVIDIA GPUs).

Layout. The kernels read the on-disk layout as loaded (``docs/FORMAT.md``): ``values [N, K/2]`` in the
model dtype and ``meta [N, K/8]`` uint8, both row-major; :func:`prepare` does not re-tile. Every kernel
walks a ``[BLOCK_N rows, BLOCK_K columns]`` tile per step, i.e. ``BLOCK_K/2`` contiguous values
(128-256 bytes) and ``BLOCK_K/8`` contiguous metadata bytes per row: the loads are already wide and
coalesced along K, and a re-tiled copy would buy little while costing a second format that the dense
fallback, the cuSPARSELt conversion and the load-time validation would all have to understand. Byte ``b``
of a row holds the positions of values ``4b .. 4b+3`` (2 bits each, in order), so value ``j`` sits at
column ``4 (j // 2) + ((meta[j // 4] >> 2 (j % 4)) & 3)``.

Kernels, by token count M (``x2 [M, K]``; fixed tiles per range, no autotuning, so the launch for a given
M is the same on every rank and every restart, and CUDA graphs capture one launch per size):

- ``M <= 4`` (decode): a GEMV. Each program streams a ``[16, 256]`` slice of the weight, decodes the
  2-bit positions in registers and gathers the matching ``x`` entries (the activations are a few KiB and
  stay in L1/L2), accumulating ``value * x`` in fp32. Split-K over the grid's second axis keeps all SMs
  busy when N is small (TP slices, ``o_proj``).
- ``4 < M <= 64`` (small batches) and ``M > 64`` (prefill): decompress a ``[BLOCK_N, BLOCK_K]`` tile of the
  weight into registers (two selects per column, +0.0 elsewhere), then ``tl.dot`` with the ``x`` tile
  (tensor cores, fp32 accumulator). Tiles: 16×64×128, 32×64×128, 64×64×64 (M×N×K) for the small-batch
  ranges with split-K as above; 64/128×128×64 with grouped tile order for prefill.
- Split-K writes fp32 partial sums ``[split, M, N]`` (``torch.empty`` from the caching allocator, so
  graph-safe, no zeroing) and a second kernel adds them in a fixed order with the bias: deterministic
  (the same result for the same input in every batch position), no atomics, no zeroed buffer to keep.

Opt-in prefill through cuSPARSELt (``BAWA_SPARSE_PREFILL=cusparselt``): :func:`prepare` also keeps
``torch._cslt_compress`` of the weight as ``aux`` (≈ 9/16 of dense more; the dense weight exists only
transiently, one layer at a time) and :func:`linear` runs ``torch._cslt_sparse_mm`` from ``aux_min_m``
tokens on. ``aux_min_m`` comes from :data:`CUSPARSELT_MIN_M`, a table per GPU architecture measured by
``tools/gpu_check.py`` (or ``BAWA_SPARSE_PREFILL_MIN_M``), never from timing at load, so every TP rank
and every restart switches at the same M. A cuSPARSELt failure at load drops ``aux`` (logged once) and
keeps the Triton kernels; a Triton failure at load raises, and ``kernels.prepare`` falls back to dense.

Every path returns a contiguous row-major ``[M, N]`` tensor (the op's fake), syncs nothing with the host
and allocates only through torch's caching allocator. With ``TRITON_INTERPRET=1`` the same kernels run on
CPU tensors (slowly): that is how the tests check them without a GPU.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..sparse.format import unpack_24

PREFILL_ENV = "BAWA_SPARSE_PREFILL"
PREFILL_MIN_M_ENV = "BAWA_SPARSE_PREFILL_MIN_M"
# Token count from which cuSPARSELt beats this module's prefill kernel, per GPU architecture ("sm90"),
# as measured by tools/gpu_check.py (its "crossover" table). An architecture missing here uses
# DEFAULT_CUSPARSELT_MIN_M, a prior from published figures (torchao #1460: cuSPARSELt 0.68x dense at
# M = 512, 1.35x at 1280), and says so once in the log.
CUSPARSELT_MIN_M: dict[str, int] = {}
DEFAULT_CUSPARSELT_MIN_M = 1024

GEMV_MAX_M = 4  # up to here the gather GEMV, above it tl.dot (tools/gpu_check.py times both at M <= 4)
# The tl.dot kernel's tiles by M range: (max M, name, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages,
# split-K allowed). Fixed rather than autotuned (see the module docstring); tools/gpu_check.py times them.
DOT_TILES = (
    (16, "dot-m16", 16, 64, 128, 4, 3, True),
    (32, "dot-m32", 32, 64, 128, 4, 3, True),
    (64, "dot-m64", 64, 64, 64, 4, 3, True),
    (128, "prefill-m128", 64, 128, 64, 4, 3, False),
    (None, "prefill", 128, 128, 64, 8, 3, False),
)
GEMV_TILE = (16, 256, 4)  # BLOCK_N, BLOCK_K, num_warps
_WAVES = 4  # split-K aims at this many programs per SM
_INTERPRETER_SMS = 2  # the "SM count" under TRITON_INTERPRET (CPU), small so that tests reach split-K
_SPARSE_DTYPES = (torch.float16, torch.bfloat16)
_DTYPES = _SPARSE_DTYPES + (torch.float32,)
_CSLT_M_MULTIPLE = 8  # cuSPARSELt's row multiple for 16-bit dense operands (torch/sparse/semi_structured.py)
_CSLT_SHAPE_MULTIPLE = 16  # its N and K multiple for 16-bit dtypes

_SELF_TESTED: set[tuple[str, torch.dtype]] = set()
_SM_COUNT: dict[int, int] = {}


# ----------------------------------------------------------------------------------------------- kernels
# Only Triton builtins and this module's own jit functions are called (tl.full, not tl.zeros; tl.reduce with
# _add, not tl.sum; no tl.cdiv): those of triton.language.standard are themselves jit functions, which the
# CPU interpreter can run only if TRITON_INTERPRET was set before triton's first import in the process, while
# this module's kernels need it only when this module is imported (tests, tools/gpu_check.py --dry-run).


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _dense_tile(v_ptr, m_ptr, offs_n, n_mask, k0, stride_vn, stride_mn, K,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The dense ``[BLOCK_N, BLOCK_K]`` tile at columns ``k0 ..`` of the weight, decompressed in registers."""
    offs_v = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    offs_b = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    v_ptrs = v_ptr + offs_n[:, None] * stride_vn + offs_v[None, :]
    b_ptrs = m_ptr + offs_n[:, None] * stride_mn + offs_b[None, :]
    if EVEN_K:
        v = tl.load(v_ptrs, mask=n_mask[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=n_mask[:, None], other=0)
    else:  # masked columns read value 0 (its positions then do not matter)
        v = tl.load(v_ptrs, mask=n_mask[:, None] & (offs_v[None, :] < K // 2), other=0.0)
        b = tl.load(b_ptrs, mask=n_mask[:, None] & (offs_b[None, :] < K // 8), other=0)
    nib = tl.reshape(tl.join(b & 15, b >> 4), (BLOCK_N, BLOCK_K // 4))  # group g = 2 byte + (0 low, 1 high)
    v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_K // 4, 2)))  # the two kept values of each group
    col = tl.arange(0, 4)[None, None, :]
    zero = tl.full((BLOCK_N, BLOCK_K // 4, 4), 0, v.dtype)
    w = tl.where((nib & 3)[:, :, None] == col, v0[:, :, None],
                 tl.where((nib >> 2)[:, :, None] == col, v1[:, :, None], zero))
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _gemv_kernel(x_ptr, v_ptr, m_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_xk, stride_vn, stride_mn,
                 stride_os, steps_per_split,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``out[s, m, n] = sum over split s's columns of W[n, k] x[m, k]`` for ``M <= BLOCK_M <= 4``.

    Reads ``BLOCK_N`` rows × ``BLOCK_K/2`` values per step, gathers ``x`` at the decoded columns, keeps a
    ``[BLOCK_N, BLOCK_K/2, BLOCK_M]`` fp32 accumulator and reduces it once at the end. Without K splits it
    writes the final output (bias added, cast); with them (``PARTIAL``) fp32 partials for
    :func:`_splitk_reduce_kernel`. The split count is a runtime value: one compiled kernel serves them all.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    j = tl.arange(0, BLOCK_K // 2)  # value index within the step
    base_col = 4 * (j // 2)  # first column of the value's group
    shift = 2 * (j % 4)  # its 2 bits in the metadata byte j // 4
    acc = tl.full((BLOCK_N, BLOCK_K // 2, BLOCK_M), 0, tl.float32)
    step_end = tl.minimum((pid_s + 1) * steps_per_split, (K + BLOCK_K - 1) // BLOCK_K)
    for step in range(pid_s * steps_per_split, step_end):
        offs_v = step * (BLOCK_K // 2) + j
        offs_b = step * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
        v_ptrs = v_ptr + offs_n[:, None] * stride_vn + offs_v[None, :]
        b_ptrs = m_ptr + offs_n[:, None] * stride_mn + offs_b[None, :]
        if EVEN_K:
            w_mask = n_mask[:, None]
            b_mask = n_mask[:, None]
        else:
            w_mask = n_mask[:, None] & (offs_v[None, :] < K // 2)
            b_mask = n_mask[:, None] & (offs_b[None, :] < K // 8)
        v = tl.load(v_ptrs, mask=w_mask, other=0.0).to(tl.float32)
        # the metadata bytes load contiguously; each is then repeated for its 4 values in registers
        b4 = tl.load(b_ptrs, mask=b_mask, other=0)
        b = tl.reshape(tl.broadcast_to(b4[:, :, None], (BLOCK_N, BLOCK_K // 8, 4)), (BLOCK_N, BLOCK_K // 2))
        b = b.to(tl.int32)
        cols = step * BLOCK_K + base_col[None, :] + ((b >> shift[None, :]) & 3)  # [BLOCK_N, BLOCK_K/2]
        x_ptrs = x_ptr + offs_m[None, None, :] * stride_xm + cols[:, :, None] * stride_xk
        xg = tl.load(x_ptrs, mask=w_mask[:, :, None] & m_mask[None, None, :], other=0.0).to(tl.float32)
        acc += v[:, :, None] * xg
    y = tl.reduce(acc, 1, _add)  # [BLOCK_N, BLOCK_M]
    out_ptrs = out_ptr + pid_s * stride_os + offs_m[None, :] * N + offs_n[:, None]
    out_mask = n_mask[:, None] & m_mask[None, :]
    if not PARTIAL:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptrs, y, mask=out_mask)


@triton.jit
def _dot_kernel(x_ptr, v_ptr, m_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_xk, stride_vn, stride_mn,
                stride_os, steps_per_split,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_M: tl.constexpr, F32_DOT: tl.constexpr):
    """``x Wᵀ`` by ``[BLOCK_M, BLOCK_N]`` output tiles: decompress each weight tile, then ``tl.dot``.

    Tile order is grouped by ``GROUP_M`` rows of tiles (the weight tiles stay in L2 across them); the
    grid's second axis splits K (``PARTIAL``: fp32 partials, see :func:`_gemv_kernel`). ``F32_DOT``: the
    operands are multiplied in full fp32 (fp32 weights: not TF32; see :func:`triton_linear` for bf16).
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    tiles_n = (N + BLOCK_N - 1) // BLOCK_N
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_m
    pid_n = (pid % (GROUP_M * tiles_n)) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    rows = offs_m.to(tl.int64)  # M x N and M x K offsets pass 2**31 at prefill sizes
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    step_end = tl.minimum((pid_s + 1) * steps_per_split, (K + BLOCK_K - 1) // BLOCK_K)
    for step in range(pid_s * steps_per_split, step_end):
        k0 = step * BLOCK_K
        x_ptrs = x_ptr + rows[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=m_mask[:, None] & ((k0 + offs_k)[None, :] < K), other=0.0)
        w = _dense_tile(v_ptr, m_ptr, offs_n, n_mask, k0, stride_vn, stride_mn, K, BLOCK_N, BLOCK_K, EVEN_K)
        if F32_DOT:
            acc = tl.dot(x.to(tl.float32), tl.trans(w).to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    out_ptrs = out_ptr + pid_s * stride_os + rows[:, None] * N + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if not PARTIAL:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit
def _splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, MN, N, split, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr):
    """``out = sum_s part[s] (+ bias)``, in split order (deterministic), cast to the output dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    y = tl.full((BLOCK,), 0, tl.float32)
    for s in range(split):
        y += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------ launch


def _interpreting() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return not isinstance(_gemv_kernel, triton.runtime.JITFunction)


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (cached: a property read, no sync)."""
    if device.type != "cuda":
        return _INTERPRETER_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _split(tiles: int, k_steps: int, sms: int) -> tuple[int, int]:
    """``(split, steps per split)``: enough programs for ``_WAVES`` per SM, every split non-empty."""
    want = max(1, min(k_steps, -(-_WAVES * sms // tiles)))
    steps = -(-k_steps // want)
    return -(-k_steps // steps), steps


def _dot_entry(m: int) -> tuple:
    for entry in DOT_TILES:
        if entry[0] is None or m <= entry[0]:
            return entry
    raise AssertionError("DOT_TILES ends with an open range")


def dot_tile(m: int) -> tuple[int, int, int, int, int, bool]:
    """The ``tl.dot`` kernel's (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, split-K) for ``m``."""
    return tuple(_dot_entry(m)[2:])


def variant(m: int) -> str:
    """Which kernel and tile range runs ``m`` tokens without cuSPARSELt: ``gemv`` or a DOT_TILES name."""
    return "gemv" if m <= GEMV_MAX_M else _dot_entry(m)[1]


VARIANTS = ("gemv",) + tuple(entry[1] for entry in DOT_TILES)


def triton_linear(x2: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                  split: int | None = None) -> torch.Tensor:
    """``x2 Wᵀ + bias`` with the Triton kernels: contiguous ``[M, N]`` in ``x2``'s dtype.

    ``split`` forces the number of K splits (tests); by default it follows the SM count.
    """
    if x2.dtype != values.dtype:
        raise TypeError(f"bawa-sparse triton: activations are {x2.dtype}, the weight {values.dtype}")
    m, k = x2.shape
    n = values.shape[0]
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0:
        return out
    bias_arg = bias if bias is not None else out  # never read when HAS_BIAS is False
    if m <= GEMV_MAX_M:
        block_m = triton.next_power_of_2(m)
        block_n, block_k, warps = GEMV_TILE
        stages, can_split = 1, True
        tiles = triton.cdiv(n, block_n)
    else:
        block_m, block_n, block_k, warps, stages, can_split = dot_tile(m)
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_steps = triton.cdiv(k, block_k)
    if split is None:
        split, steps = _split(tiles, k_steps, _sm_count(x2.device)) if can_split else (1, k_steps)
    else:
        steps = triton.cdiv(k_steps, split)
        split = triton.cdiv(k_steps, steps)
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x2.device)
    args = (x2, values, meta, bias_arg, target, m, n, k, x2.stride(0), x2.stride(1), values.stride(0),
            meta.stride(0), m * n, steps)
    common = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
                  PARTIAL=split > 1, HAS_BIAS=bias is not None, num_warps=warps, num_stages=stages)
    if m <= GEMV_MAX_M:
        _gemv_kernel[(tiles, split)](*args, **common)
    else:
        # fp32 operands for fp32 weights, and for bf16 under the interpreter, whose bf16 tl.dot returns
        # garbage (triton 3.9); bf16 products are exact in fp32, so the arithmetic is the tensor cores'
        f32_dot = x2.dtype == torch.float32 or (x2.dtype == torch.bfloat16 and x2.device.type == "cpu")
        _dot_kernel[(tiles, split)](*args, GROUP_M=8, F32_DOT=f32_dot, **common)
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](target, bias_arg, out, m * n, n, split,
                                                             HAS_BIAS=bias is not None, BLOCK=block)
    return out


def _cslt_linear(x2: torch.Tensor, aux: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x2 Wᵀ + bias`` with cuSPARSELt: M padded to its multiple, no ``alpha`` (a scalar one syncs)."""
    m = x2.shape[0]
    pad = (-m) % _CSLT_M_MULTIPLE
    xp = F.pad(x2, (0, 0, 0, pad)) if pad else x2.contiguous()
    # (W xᵀ)ᵀ = x Wᵀ as [M_pad, N]; xp.t() of a contiguous xp picks the transposed descriptor (no copy)
    y = torch._cslt_sparse_mm(aux, xp.t(), bias=bias, transpose_result=True)
    return y[:m].contiguous()  # a row slice of a row-major result: no copy unless the library changes layout


# ----------------------------------------------------------------------------------------- backend API


def supported(device: torch.device, dtype: torch.dtype, n: int, k: int) -> tuple[bool, str]:
    """The Triton kernels run fp16/bf16/fp32 on CUDA sm80+ (bf16 ``tl.dot``), any N and K % 8 == 0."""
    del n
    if dtype not in _DTYPES:
        return False, f"{dtype} is not fp16/bf16/fp32"
    if k % 8:
        return False, f"K = {k} does not divide by 8"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return False, f"sm{major}{minor} < sm80 (Triton's bf16 tensor-core dot)"
        return True, ""
    if device.type == "cpu" and _interpreting():
        return True, "TRITON_INTERPRET=1: the kernels run on CPU tensors (slow; tests only)"
    return False, f"the Triton kernels run on CUDA, not {device.type}"


def arch(device: torch.device) -> str:
    """``sm<major><minor>`` of a CUDA device: the key of :data:`CUSPARSELT_MIN_M`."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def prefill_min_m(device: torch.device) -> int:
    """From how many tokens cuSPARSELt runs: the env override, the measured table, else the prior."""
    override = os.environ.get(PREFILL_MIN_M_ENV, "").strip()
    if override:
        return int(override)
    key = arch(device)
    if key in CUSPARSELT_MIN_M:
        return CUSPARSELT_MIN_M[key]
    _log_once(f"bawa-sparse: no measured cuSPARSELt crossover for {key} (run tools/gpu_check.py); cuSPARSELt "
              f"prefill from M >= {DEFAULT_CUSPARSELT_MIN_M}, a prior from published figures",
              logging.WARNING)
    return DEFAULT_CUSPARSELT_MIN_M


def prefill_mode() -> str:
    mode = os.environ.get(PREFILL_ENV, "triton").strip().lower() or "triton"
    if mode not in ("triton", "cusparselt"):
        raise ValueError(f"{PREFILL_ENV}={mode!r}: choose triton (default) or cusparselt")
    return mode


def _log_once(message: str, level: int = logging.INFO) -> None:
    from . import log_once

    log_once(message, level)


def _self_test(values: torch.Tensor, meta: torch.Tensor) -> None:
    """Run each kernel family once on this layer's first rows against the unpacked weight (once per device
    and dtype): a Triton that cannot compile or miscompiles for this GPU raises here, at load, where
    ``kernels.prepare`` falls back to dense, instead of in the first forward."""
    key = (str(values.device), values.dtype)
    if key in _SELF_TESTED:
        return
    rows, k = min(values.shape[0], 64), values.shape[1] * 2
    w = unpack_24(values[:rows], meta[:rows], validate=False).float()
    gen = torch.Generator(device=values.device).manual_seed(0)
    for m in (1, GEMV_MAX_M + 1):
        x = torch.randn(m, k, generator=gen, device=values.device).to(values.dtype)
        got = triton_linear(x, values[:rows], meta[:rows], None).float()
        ref = x.float() @ w.t()
        tol = 1e-2 * float(ref.abs().max()) + 1e-3
        if not bool(torch.isfinite(got).all()) or float((got - ref).abs().max()) > tol:
            raise RuntimeError(f"Triton kernel self-test failed ({variant(m)}, M = {m}, {values.dtype}): "
                               f"max error {float((got - ref).abs().max()):.3g} > {tol:.3g}")
    _SELF_TESTED.add(key)


def _cusparselt_aux(values: torch.Tensor, meta: torch.Tensor, n: int) -> tuple[torch.Tensor, int] | None:
    """cuSPARSELt's compressed weight and its ``aux_min_m``, or None (the reason logged once)."""
    k = values.shape[1] * 2
    why = ""
    if values.device.type != "cuda":
        why = f"runs on CUDA, not {values.device.type}"
    elif not torch.backends.cusparselt.is_available():
        why = "this torch build has no cuSPARSELt"
    elif values.dtype not in _SPARSE_DTYPES:
        why = f"{values.dtype} is not fp16/bf16"
    elif n % _CSLT_SHAPE_MULTIPLE or k % _CSLT_SHAPE_MULTIPLE:
        why = f"shape [{n}, {k}] misses its multiple of {_CSLT_SHAPE_MULTIPLE}"
    if why:
        _log_once(f"bawa-sparse: {PREFILL_ENV}=cusparselt not used for some layers ({why}); "
                  "Triton kernels only", logging.WARNING)
        return None
    try:
        dense = unpack_24(values, meta, validate=False)  # transient: one layer's dense weight at a time
        aux = torch._cslt_compress(dense)
        del dense
        # the library can fail at run time (e.g. an architecture it was not built for): find out now
        x = torch.randn(_CSLT_M_MULTIPLE, k, device=values.device, dtype=values.dtype)
        got = _cslt_linear(x, aux, None).float()
        ref = triton_linear(x, values, meta, None).float()
        if float((got - ref).abs().max()) > 1e-2 * float(ref.abs().max()) + 1e-3:
            raise RuntimeError("cuSPARSELt result differs from the Triton kernel's")
    except Exception as err:  # noqa: BLE001 - any library failure means: serve without it
        _log_once(f"bawa-sparse: cuSPARSELt prefill disabled ({err!r}); Triton kernels only", logging.WARNING)
        return None
    return aux, prefill_min_m(values.device)


def prepare(values: torch.Tensor, meta: torch.Tensor, n: int):
    """The layer as this backend keeps it: the loaded ``values``/``meta`` (contiguous), plus cuSPARSELt's
    copy as ``aux`` when ``BAWA_SPARSE_PREFILL=cusparselt``. Raises if the kernels fail here."""
    from . import TRITON, PackedLinear

    values, meta = values.contiguous(), meta.contiguous()
    _self_test(values, meta)
    packed = PackedLinear(TRITON, n, values, meta)
    if prefill_mode() == "cusparselt":
        extra = _cusparselt_aux(values, meta, n)
        if extra is not None:
            packed.aux, packed.aux_min_m = extra
    return packed


def linear(x2: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
           out_features: int, aux: torch.Tensor | None, aux_min_m: int) -> torch.Tensor:
    """The op's body: cuSPARSELt from ``aux_min_m`` tokens when ``aux`` is kept, else the Triton kernels."""
    del out_features
    if aux is not None and x2.shape[0] >= aux_min_m:
        return _cslt_linear(x2, aux, bias)
    return triton_linear(x2, values, meta, bias)
