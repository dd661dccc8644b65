"""The Triton 2:4 kernels (``bawa_vllm.kernels.triton_24``) and the unpack/validate memory bound.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` on CPU tensors: the same kernel code, checked for
correctness only (speed is a GPU matter, ``tools/gpu_check.py``). Shapes stay small: the interpreter
executes every program of the grid in Python.

Tolerances: the kernels multiply in the input dtype's exact products and add in fp32, like the fp32
reference up to summation order, so the result differs from the fp32 reference by the final rounding to
the output dtype (≤ 1 ulp: round-to-nearest on GPUs is ½ ulp, the interpreter's bf16 cast may truncate)
plus fp32 reordering error (K · 2⁻²⁴ · Σ|w x|, < 1e-4 here). A wrong position, a dropped group, a
missed split or bias is off by whole weights (≫ 1 ulp).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

triton = pytest.importorskip("triton")

from bawa_vllm import kernels  # noqa: E402
from bawa_vllm.kernels import triton_24  # noqa: E402

if not torch.cuda.is_available() and not triton_24._interpreting():
    # Triton reads TRITON_INTERPRET when it decorates a kernel: rebuild the module's kernels for the CPU
    # interpreter, then leave the variable as it was for the rest of the process
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        importlib.reload(triton_24)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
from bawa_vllm.sparse.format import (  # noqa: E402
    PackedFormatError,
    check_packed,
    check_packed_shards,
    pack_24,
    unpack_24,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ULP = {torch.float32: 2.0**-20, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # fp32: reordering only

def sparse_weight(n: int, k: int, dtype: torch.dtype, seed: int = 0, thin: bool = True) -> torch.Tensor:
    """A random 2:4 weight; with ``thin`` every row also has groups with exactly 0 and 1 non-zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    keep = torch.rand(n, k // 4, 4, generator=g).argsort(-1) < 2  # 2 random positions per group
    if thin:
        keep[:, 0::3] = False  # every third group empty
        keep[:, 1::3, :] &= torch.arange(4) == keep[:, 1::3, :].float().argmax(-1, keepdim=True)  # one kept
    return (w * keep.reshape(n, k)).to(dtype).to(DEVICE)


def check_close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    err = (y.float() - ref).abs()
    bound = ULP[dtype] * ref.abs() + 1e-4 * (1 + ref.abs().max())
    worst = int(err.argmax())
    assert bool((err <= bound).all()), f"error {float(err.max()):.3g} > {float(bound.flatten()[worst]):.3g}"


M_VALUES = (1, 3, 16, 17, 33, 65, 130)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernels_equal_dense_masked_linear(dtype, m, with_bias):
    """Every M-range variant (see test_every_variant_is_exercised) equals F.linear on the unpacked weight,
    with groups of 0, 1 and 2 non-zeros in every row."""
    n, k = 80, 264  # N not a multiple of any tile, K not a multiple of BLOCK_K: the masked paths
    w = sparse_weight(n, k, dtype, seed=m)
    values, meta = pack_24(w)
    g = torch.Generator().manual_seed(100 + m)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=g).to(dtype).to(DEVICE) if with_bias else None
    y = triton_24.triton_linear(x, values, meta, bias)
    ref = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    assert y.shape == (m, n) and y.dtype == dtype and y.is_contiguous()
    check_close(y, ref, dtype)


def test_every_variant_is_exercised():
    """The M values above reach each kernel family and tile range (a new range needs a new M there)."""
    assert {triton_24.variant(m) for m in M_VALUES} == set(triton_24.VARIANTS)


@pytest.mark.parametrize("m", [1, 2, 5, 20, 40, 100, 200])
def test_split_k_and_even_k(m):
    """Forced K splits (fp32 partials + ordered reduce) give the same result as one pass, bias included,
    with K a multiple of every BLOCK_K (the unmasked EVEN_K loads)."""
    dtype = torch.float16
    n, k = 48, 512
    w = sparse_weight(n, k, dtype, seed=7)
    values, meta = pack_24(w)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=g).to(dtype).to(DEVICE)
    ref = F.linear(x.float(), w.float(), bias.float())
    one = triton_24.triton_linear(x, values, meta, bias, split=1)
    two = triton_24.triton_linear(x, values, meta, bias, split=2)
    check_close(one, ref, dtype)
    check_close(two, ref, dtype)


def test_default_split_uses_the_grid():
    """With the SM count of the device, a short N splits K (and the result is still right)."""
    tiles = triton.cdiv(32, triton_24.GEMV_TILE[0])
    split, steps = triton_24._split(tiles, 4, 2)
    assert split == 4 and steps == 1  # 2 tiles on 2 "SMs" want 8 programs: 4 splits of 1 step
    assert triton_24._split(1000, 8, 132) == (1, 8)  # enough tiles: no split
    assert triton_24._split(3, 7, 132) == (7, 1)  # never more splits than steps, none empty


def test_strided_activations_and_leading_dims():
    """Non-contiguous x (a column slice of a fused tensor) and 3-D x through the op."""
    dtype = torch.bfloat16
    n, k = 32, 128
    w = sparse_weight(n, k, dtype, seed=3)
    values, meta = pack_24(w)
    big = torch.randn(2, 3, 2 * k).to(dtype).to(DEVICE)
    x = big[..., k:]
    y = torch.ops.bawa_sparse.linear(x, values, meta, None, n, kernels.TRITON)
    assert y.shape == (2, 3, n) and y.is_contiguous()
    check_close(y.reshape(-1, n), F.linear(x.reshape(-1, k).float(), w.float()), dtype)


def test_zero_tokens_and_dtype_mismatch():
    values, meta = pack_24(sparse_weight(16, 64, torch.float16))
    assert triton_24.triton_linear(torch.empty(0, 64, dtype=torch.float16, device=DEVICE), values, meta,
                                   None).shape == (0, 16)
    with pytest.raises(TypeError, match="activations are torch.float32"):
        triton_24.triton_linear(torch.randn(1, 64, device=DEVICE), values, meta, None)


def test_prepare_keeps_one_packed_copy(monkeypatch):
    """prepare keeps exactly the packed tensors (9/16 of dense bytes), self-tests, and the op matches."""
    monkeypatch.delenv(triton_24.PREFILL_ENV, raising=False)
    dtype = torch.bfloat16
    n, k = 64, 256
    w = sparse_weight(n, k, dtype, seed=5)
    values, meta = pack_24(w)
    packed = kernels.prepare(values, meta, "t", backend=kernels.TRITON)
    assert packed.backend == kernels.TRITON and packed.aux is None
    held = sum(t.numel() * t.element_size() for t in packed.tensors().values())
    assert held == values.numel() * 2 + meta.numel()
    assert held <= 0.60 * w.numel() * w.element_size()
    x = torch.randn(5, k).to(dtype).to(DEVICE)
    check_close(packed(x), F.linear(x.float(), w.float()), dtype)


def test_prepare_self_test_catches_a_broken_kernel(monkeypatch):
    """A kernel that computes garbage at load makes prepare raise (kernels.prepare then falls back)."""
    monkeypatch.setattr(triton_24, "_SELF_TESTED", set())
    monkeypatch.setattr(triton_24, "triton_linear", lambda x, v, m, b: torch.zeros(x.shape[0], v.shape[0],
                                                                                     dtype=x.dtype))
    values, meta = pack_24(sparse_weight(32, 64, torch.float16))
    with pytest.raises(RuntimeError, match="self-test failed"):
        triton_24.prepare(values, meta, 32)
    fallback = kernels.prepare(values, meta, "t", backend=kernels.TRITON)
    assert fallback.backend == kernels.DENSE


def test_prefill_env_is_validated(monkeypatch):
    monkeypatch.setenv(triton_24.PREFILL_ENV, "cutlass")
    with pytest.raises(ValueError, match="choose triton"):
        triton_24.prefill_mode()
    monkeypatch.setenv(triton_24.PREFILL_ENV, "cusparselt")
    assert triton_24.prefill_mode() == "cusparselt"


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU side of the cuSPARSELt opt-in")
def test_cusparselt_opt_in_off_cuda_keeps_triton_only(monkeypatch):
    """BAWA_SPARSE_PREFILL=cusparselt where cuSPARSELt cannot run: Triton kernels only, no aux."""
    monkeypatch.setenv(triton_24.PREFILL_ENV, "cusparselt")
    values, meta = pack_24(sparse_weight(32, 64, torch.float16))
    packed = triton_24.prepare(values, meta, 32)
    assert packed.aux is None and packed.aux_min_m == 0


def test_supported():
    assert not triton_24.supported(torch.device("cpu"), torch.int8, 16, 64)[0]
    assert not triton_24.supported(torch.device("cpu"), torch.float16, 16, 60)[0]
    if DEVICE == "cpu":
        assert triton_24.supported(torch.device("cpu"), torch.bfloat16, 16, 64)[0]  # interpreter


def test_fake_strides_match_and_compile_traces():
    """The op's fake output strides equal the real output's, and fullgraph compile traces the op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    dtype = torch.float16
    n, k = 48, 128
    w = sparse_weight(n, k, dtype, seed=11)
    values, meta = pack_24(w)
    x = torch.randn(2, 3, k).to(dtype).to(DEVICE)
    real = torch.ops.bawa_sparse.linear(x, values, meta, None, n, kernels.TRITON)
    with FakeTensorMode() as mode:
        fake = torch.ops.bawa_sparse.linear(mode.from_tensor(x), mode.from_tensor(values),
                                            mode.from_tensor(meta), None, n, kernels.TRITON)
    assert fake.shape == real.shape and fake.stride() == real.stride()
    fn = torch.compile(lambda t: torch.ops.bawa_sparse.linear(t, values, meta, None, n, kernels.TRITON) * 2,
                       fullgraph=True, backend="aot_eager")
    check_close(fn(x).reshape(-1, n) / 2, F.linear(x.reshape(-1, k).float(), w.float()), dtype)


# ------------------------------------------------------------------------------ format: memory bounds


class _Int64Watch(TorchDispatchMode):
    """Records the largest int64 tensor any aten op makes (the unpack/validate bound)."""

    def __init__(self):
        super().__init__()
        self.largest_int64 = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.int64:
                self.largest_int64 = max(self.largest_int64, t.numel())
        return out


def test_unpack_and_check_make_no_int64_tensor_of_the_weight_size():
    n, k = 64, 512
    w = sparse_weight(n, k, torch.bfloat16, seed=2).cpu()
    values, meta = pack_24(w)
    bad = meta.clone()
    bad.zero_()  # a dummy-loaded meta: every group invalid, the worst case for the error search
    with _Int64Watch() as watch:
        dense = unpack_24(values, meta)
        check_packed(values, meta, "x", shape=(n, k))
        with pytest.raises(PackedFormatError, match="row 0, group 0 has invalid positions"):
            check_packed(values, bad, "x")
    assert torch.equal(dense, w)
    assert watch.largest_int64 <= 16  # arange/argmax scalars only; the old code made 3 × N × K/2


def test_unpack_runs_in_bounded_row_chunks(monkeypatch):
    """With a tiny chunk budget the unpack/validate loops still give the same results (several chunks)."""
    import bawa_vllm.sparse.format as fmt

    w = sparse_weight(40, 64, torch.float16, seed=4).cpu()
    values, meta = pack_24(w)
    bad = meta.clone()
    bad[37, 3] = 0x4F  # group 7 (high nibble 4: fine), group 6 (low nibble 15: p0 = 3, p1 = 3)
    monkeypatch.setattr(fmt, "_CHUNK_BYTES", 64)  # a few rows per chunk
    assert torch.equal(unpack_24(values, meta), w)
    with pytest.raises(PackedFormatError, match=r"row 37, group 6 has invalid positions \[3, 3\]"):
        check_packed(values, bad, "x")


def test_check_packed_shards_names_the_shard():
    w = sparse_weight(24, 32, torch.float16, seed=6).cpu()
    values, meta = pack_24(w)
    shards = [("q rows of qkv", 0, 8), ("k rows of qkv", 8, 8), ("v rows of qkv", 16, 8)]
    check_packed_shards(values, meta, "qkv", (24, 32), shards)
    bad = meta.clone()
    bad[11, 1] = 0x0C | (0x03 << 4)  # row 11 = k row 3; group 2 ok (12), group 3 bad (3: p0 = 3, p1 = 0)
    with pytest.raises(PackedFormatError, match=r"k rows of qkv: weight_meta row 3, group 3 has invalid "
                                                r"positions \[3, 0\]"):
        check_packed_shards(values, bad, "qkv", (24, 32), shards)
    with pytest.raises(PackedFormatError, match="does not match the layer"):
        check_packed_shards(values, meta, "qkv", (24, 64), shards)


# ------------------------------------------------------------------------------------------ GPU only


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_graph_capture_and_replay():
    dtype = torch.bfloat16
    n, k = 256, 512
    w = sparse_weight(n, k, dtype, seed=8)
    packed = kernels.prepare(*pack_24(w), "t", backend=kernels.TRITON)
    for m in (1, 16, 200):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        packed(x)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = packed(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        check_close(y, F.linear(x.float(), w.float()), dtype)


@cuda
def test_cusparselt_prefill_on_gpu(monkeypatch):
    if not torch.backends.cusparselt.is_available():
        pytest.skip("this torch has no cuSPARSELt")
    monkeypatch.setenv(triton_24.PREFILL_ENV, "cusparselt")
    monkeypatch.setenv(triton_24.PREFILL_MIN_M_ENV, "64")
    dtype = torch.float16
    n, k = 256, 512
    w = sparse_weight(n, k, dtype, seed=9)
    packed = triton_24.prepare(*pack_24(w), n)
    assert packed.aux is not None and packed.aux_min_m == 64
    for m in (8, 64, 100):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        y = packed(x)
        assert y.is_contiguous()
        check_close(y, F.linear(x.float(), w.float()), dtype)
