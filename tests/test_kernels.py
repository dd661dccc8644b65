"""The one op ``torch.ops.bawa_sparse.linear`` and its CPU backend (the AVX-512 kernel, built here at first use).

The reference is dense-masked ``F.linear`` in fp32. The kernel accumulates in fp32 too, so the only
differences are the order of the fp32 sums and the final rounding to the model dtype: fp32 within 1e-4
relative to the output's scale, bf16/fp16 within a few units of the last place of that dtype
(rounding of the output alone is 2^-8 relative for bf16, 2^-11 for fp16).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from bawa_vllm import kernels
from bawa_vllm.kernels import cpu
from bawa_vllm.pruning.masks import SparsityPattern, apply_mask_, keep_mask
from bawa_vllm.sparse.format import PackedFormatError, pack_24

pytestmark = pytest.mark.skipif(cpu._cpu_reason() is not None, reason=f"CPU kernel cannot run: {cpu._cpu_reason()}")

TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}


def _weight(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A 2:4 weight with groups of 0 and 1 non-zeros too (the format allows them; kernels must not assume 2)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w = apply_mask_(w, keep_mask(w.abs(), SparsityPattern.parse("2:4")))
    w[0, :4] = 0  # a group with no non-zero
    w[min(1, n - 1), 4:8] = torch.tensor([0.0, 1.5, 0.0, 0.0])  # a group with one
    w[-1, -4:] = torch.tensor([0.0, 0.0, 0.0, -2.0])  # one, at the last column of the last row
    return w.to(dtype)


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert y.dtype == x.dtype and y.shape == ref.shape and y.is_contiguous()
    scale = ref.abs().max().clamp_min(1.0)
    err = (y.float() - ref).abs().max() / scale
    assert err <= TOL[x.dtype], f"max relative error {err:.3g} > {TOL[x.dtype]:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(5, 8), (33, 40), (64, 96), (48, 280), (130, 512), (7, 120), (22, 1096), (20, 4168)])
def test_op_matches_dense_masked(dtype, n, k, monkeypatch):
    """Every M regime, K tails of 8/16/24, with/without bias. bf16: row lanes at every M on every CPU with
    AVX512_BF16 (forced, as AMX CPUs send prefill to oneDNN), their controls made as they go below 6 tokens and
    stored from 6; a last pass of 1 token (17, 33), blocks of 128 tokens (129, 257, 2100), K in more than one
    chunk with a tail (4168 = 65 words + 8), rows after the blocks of 16 for the GEMV (blocks of 4 and single
    rows: 33, 130, 22, 20, 5, 7). Other dtypes: GEMV, and panels above cpu.SMALL_M_MAX."""
    w = _weight(n, k, dtype)
    values, meta = pack_24(w)
    packed = kernels.prepare(values.clone(), meta.clone(), backend=kernels.CPU)
    assert packed.backend == kernels.CPU
    monkeypatch.setenv("BAWA_CPU_PREFILL", "lanes")
    try:
        cpu.apply_dispatch()
        for m in (1, 3, 5, 6, 9, 16, 17, 33, cpu.SMALL_M_MAX, cpu.SMALL_M_MAX + 1, 129, 257, 2100):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
            bias = torch.randn(n).to(dtype)
            _check(packed(x, bias), x, w, bias)
            _check(packed(x), x, w, None)
    finally:
        monkeypatch.undo()
        cpu.apply_dispatch()
    x3 = torch.randn(2, 3, k).to(dtype)  # leading dims are kept
    assert packed(x3).shape == (2, 3, n)


def _force(monkeypatch, **attrs) -> None:
    """Set the crossovers in kernels/cpu (and BAWA_CPU_PREFILL, given as prefill=) and hand them to the kernel."""
    for name, value in attrs.items():
        if name == "prefill":
            monkeypatch.setenv("BAWA_CPU_PREFILL", value)
        else:
            monkeypatch.setattr(cpu, name, value)
    cpu.apply_dispatch()


def test_lanes_and_panels_agree(monkeypatch):
    """bf16's two paths on the same input: the panels (forced from 1 token), which decompress the lanes layout
    back to rows, give the lanes' answer (rows 96: six blocks of lanes and nothing left over; 100: four rows for
    the GEMV after them)."""
    for n in (96, 100):
        w = _weight(n, 520, torch.bfloat16)
        packed = kernels.prepare(*pack_24(w), backend=kernels.CPU)
        x = torch.randn(4, 520).bfloat16()
        lanes = packed(x)
        _check(lanes, x, w, None)
        try:
            _force(monkeypatch, ONEDNN_MIN_M=1, prefill="onednn")
            panel = packed(x)
        finally:
            monkeypatch.undo()
            cpu.apply_dispatch()
        torch.testing.assert_close(lanes.float(), panel.float(), rtol=2 ** -7, atol=2 ** -7)


def _tiled(t: torch.Tensor, word: int, tail: int, rows: int = 4) -> torch.Tensor:
    """Reference of the CPU layout's row tiling: blocks of `rows` rows interleaved word by word (64 columns: 32
    values, 8 metadata bytes), the K % 64 tail after the whole words, the last rows (N % rows) row-major."""
    n, length = t.shape
    blocks, words = n // rows, (length - tail) // word
    head = t[: blocks * rows].reshape(blocks, rows, length)
    whole = head[:, :, : words * word].reshape(blocks, rows, words, word).permute(0, 2, 1, 3)
    rest = head[:, :, words * word :].reshape(blocks, rows * tail)
    tiled = torch.cat([whole.reshape(blocks, rows * words * word), rest], dim=1)
    return torch.cat([tiled.reshape(-1), t[blocks * rows :].reshape(-1)]).reshape(n, length)


def _lanes(values: torch.Tensor, k: int) -> torch.Tensor:
    """Reference of the row lanes from row-major values (16-bit, N a multiple of 16): per block of 16 rows and
    word, group g's kept pair (a dword) of row l at dword 16 g + l; the tail's groups likewise after the words."""
    d = values.view(torch.int32)  # a dword per group
    n, groups = d.shape
    words, blocks = k // 64, d.reshape(n // 16, 16, groups)
    whole = blocks[:, :, : words * 16].reshape(n // 16, 16, words, 16).permute(0, 2, 3, 1)
    tail = blocks[:, :, words * 16 :].permute(0, 2, 1)
    whole, tail = whole.reshape(n // 16, 256 * words), tail.reshape(n // 16, 16 * (groups - 16 * words))
    return torch.cat([whole, tail], dim=1).reshape(n, groups).view(values.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_one_packed_copy_in_tiled_layout(dtype):
    """The layer keeps the on-disk values and metadata, rows re-tiled in place: 9/16 of the dense bytes, nothing
    else. bf16 on CPUs with AVX512_BF16: the first N // 16 * 16 rows as row lanes (metadata in blocks of 16 rows),
    the rest as every other dtype, in blocks of 4 rows and then row-major."""
    n, k = 70, 296  # 64 rows of lanes, a block of 4, 2 rows; K % 64 columns (40) left over
    w = _weight(n, k, dtype)
    values, meta = pack_24(w)
    lanes = dtype == torch.bfloat16 and "avx512_bf16" in cpu._cpu_flags()
    lr = n // 16 * 16 if lanes else 0
    tv, tm = (k % 64) // 2, (k % 64) // 8
    expected_values = torch.cat([_lanes(values[:lr], k), _tiled(values[lr:], 32, tv)])
    expected_meta = torch.cat([_tiled(meta[:lr], 8, tm, rows=16), _tiled(meta[lr:], 8, tm)])
    packed = kernels.prepare(values, meta, backend=kernels.CPU)
    assert packed.values.data_ptr() == values.data_ptr() and packed.meta.data_ptr() == meta.data_ptr()  # in place
    held = sum(t.numel() * t.element_size() for t in packed.tensors().values())
    assert held / (w.numel() * w.element_size()) == pytest.approx(9 / 16)
    assert torch.equal(packed.meta, expected_meta)
    assert torch.equal(packed.values, expected_values)


def test_invalid_nibble_is_named_and_leaves_meta_unchanged():
    values, meta = pack_24(_weight(8, 64, torch.float32))
    meta[3, 2] = 0x4F  # group 4 valid (0xF has p0 = 3 >= p1 = 3: invalid), group 5 = 4 valid
    before = meta.clone()
    with pytest.raises(PackedFormatError, match="row 3, group 4"):
        cpu.prepare(values, meta, 8)
    assert torch.equal(meta, before)


def test_opcheck_and_fullgraph_compile():
    w = _weight(32, 64, torch.bfloat16)
    packed = kernels.prepare(*pack_24(w), backend=kernels.CPU)
    x = torch.randn(7, 64).bfloat16()
    bias = torch.randn(32).bfloat16()
    torch.library.opcheck(torch.ops.bawa_sparse.linear,
                          (x, packed.values, packed.meta, bias, 32, kernels.CPU, None, 0))

    def f(x):
        return packed(x, bias).relu()

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(x), f(x))
    assert compiled(torch.randn(9, 64).bfloat16()).shape == (9, 32)


def test_cpu_tensors_run_the_ops_cpp_kernel_and_hand_other_codes_back():
    """The kernel's library registers the op's CPU implementation in C++ (no Python per decode call); it
    serves the cpu layout, with leading dims, and hands other codes back to the Python body: the dense
    fallback's layout gives F.linear's answer there, and an unknown code is refused by name."""
    cpu.load()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("bawa_sparse::linear", "CPU")
    w = _weight(24, 40, torch.bfloat16)
    sparse = kernels.prepare(*pack_24(w), backend=kernels.CPU)
    dense = kernels.prepare(*pack_24(w), backend=kernels.DENSE)
    x = torch.randn(2, 3, 40).bfloat16()
    bias = torch.randn(24).bfloat16()
    with torch.inference_mode():  # as vLLM runs it
        y_sparse, y_dense = sparse(x, bias), dense(x, bias)
    assert y_sparse.shape == y_dense.shape == (2, 3, 24)
    _check(y_sparse.reshape(6, 24), x.reshape(6, 40), w, bias)
    torch.testing.assert_close(y_dense, F.linear(x, w, bias))
    with pytest.raises(Exception, match="unknown backend code 7"):
        torch.ops.bawa_sparse.linear(x, sparse.values, sparse.meta, None, 24, 7)


@pytest.mark.parametrize("dtype,m", [(torch.float32, 100), (torch.bfloat16, 600)])
def test_panels_run_on_worker_threads_under_inference_mode(monkeypatch, dtype, m):
    """vLLM runs the model under torch.inference_mode; the panels (fp32 above 64 tokens; bf16 prefill on AMX CPUs,
    forced here by BAWA_CPU_PREFILL=onednn) write their results with tensor ops on torch's worker
    threads, which must run in the caller's mode (a worker outside it may not update the inference tensor y in
    place). Small panels force several tasks."""
    w = _weight(130, 96, dtype)
    packed = kernels.prepare(*pack_24(w), backend=kernels.CPU)
    x = torch.randn(m, 96).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _force(monkeypatch, PANEL_BYTES=1, prefill="onednn")  # 4 row groups per panel: 9 panels
        assert cpu.load().parallel_threads() == 2
        with torch.inference_mode():
            y = packed(x)
    finally:
        torch.set_num_threads(threads)
        monkeypatch.undo()
        cpu.apply_dispatch()
    _check(y, x, w, None)


def test_auto_picks_cpu_and_dense_is_forced_by_env(monkeypatch):
    monkeypatch.delenv("BAWA_SPARSE_BACKEND", raising=False)
    assert kernels.choose_backend(torch.device("cpu"), torch.bfloat16, 64, 64) == (kernels.CPU, "")
    monkeypatch.setenv("BAWA_SPARSE_BACKEND", "dense")
    code, why = kernels.choose_backend(torch.device("cpu"), torch.bfloat16, 64, 64)
    assert code == kernels.DENSE and "BAWA_SPARSE_BACKEND=dense" in why
    w = _weight(16, 64, torch.float32)
    dense = kernels.prepare(*pack_24(w))
    assert dense.backend == kernels.DENSE and torch.equal(dense.values, w)


def test_failed_build_falls_back_with_reason(monkeypatch, tmp_path, caplog):
    """No compiler (simulated): the backend says why, ``auto`` picks dense, results stay the same."""
    monkeypatch.setattr(cpu, "_module", None)
    monkeypatch.setattr(cpu, "_error", None)
    monkeypatch.setenv("BAWA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-bawa")
    monkeypatch.delenv("BAWA_SPARSE_BACKEND", raising=False)
    code, why = kernels.choose_backend(torch.device("cpu"), torch.bfloat16, 64, 64)
    assert code == kernels.DENSE and "no C++ compiler" in why and "no-such-compiler-bawa" in why
    w = _weight(16, 64, torch.float32)
    x = torch.randn(3, 64)
    with caplog.at_level(logging.INFO, logger="bawa_vllm"):
        packed = kernels.prepare(*pack_24(w), name="layer0")
    assert packed.backend == kernels.DENSE
    assert any("dense fallback" in r.message and "no C++ compiler" in r.message for r in caplog.records)
    _check(packed(x), x, w, None)


def test_bad_backend_env(monkeypatch):
    monkeypatch.setenv("BAWA_SPARSE_BACKEND", "magic")
    with pytest.raises(ValueError, match="BAWA_SPARSE_BACKEND='magic'"):
        kernels.requested_backend()


def test_kernel_runs_on_torchs_thread_pool():
    """at::parallel_for in an extension runs serially unless it is compiled with OpenMP (it was, silently, until
    this test): with two threads set in torch, two threads of torch's pool must run the kernel's tasks."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu.load().parallel_threads() == 2
        torch.set_num_threads(1)
        assert cpu.load().parallel_threads() == 1
    finally:
        torch.set_num_threads(before)


AMX = ["avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_tile", "amx_bf16"]


def test_prefill_path_follows_amx_and_env(monkeypatch):
    monkeypatch.delenv("BAWA_CPU_PREFILL", raising=False)
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: AMX)
    assert cpu.prefill_path()[0] == "onednn"
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: AMX[:5])
    assert cpu.prefill_path()[0] == "lanes"
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: AMX[:4])  # no AVX512_BF16: the kernel's panels, as it does itself
    assert cpu.prefill_path() == ("onednn", "the CPU lacks AVX512_BF16, which the lanes need")
    assert cpu.prefill_summary(*cpu.prefill_path()).startswith(f"bf16 from {cpu.SMALL_M_MAX + 1} tokens runs on oneDNN")
    monkeypatch.setenv("BAWA_CPU_PREFILL", "lanes")  # asked for, but not on this CPU: the log says what runs
    assert cpu.prefill_path() == ("onednn", "the CPU lacks AVX512_BF16, which the lanes need")
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: AMX)
    assert cpu.prefill_path() == ("lanes", "BAWA_CPU_PREFILL")
    monkeypatch.setenv("BAWA_CPU_PREFILL", "onednn")
    assert cpu.prefill_path() == ("onednn", "BAWA_CPU_PREFILL")
    monkeypatch.setenv("BAWA_CPU_PREFILL", "amx")
    with pytest.raises(ValueError, match="BAWA_CPU_PREFILL='amx'"):
        cpu.prefill_path()
    # at the first load, a bad value is an error of its own, not a failed build that falls back to dense
    monkeypatch.setattr(cpu, "_module", None)
    monkeypatch.setattr(cpu, "_error", None)
    with pytest.raises(ValueError, match="BAWA_CPU_PREFILL='amx'"):
        cpu.load()
    assert cpu._error is None and cpu._module is None


def _mm_calls(fn) -> int:
    """How many aten::mm calls (the panels' oneDNN GEMM) running fn made."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::mm_out"))


def test_amx_sends_bf16_prefill_to_onednn_panels(monkeypatch, caplog):
    """On a CPU with AMX-BF16 (simulated) bf16 from cpu.ONEDNN_MIN_M tokens runs the `at::mm` panels (oneDNN uses
    AMX there), gives the same answer, and the choice is logged; below it the GEMV and the lanes are unchanged."""
    w = _weight(96, 520, torch.bfloat16)
    packed = kernels.prepare(*pack_24(w), backend=kernels.CPU)
    x = torch.randn(cpu.ONEDNN_MIN_M + 4, 520).bfloat16()
    try:
        monkeypatch.delenv("BAWA_CPU_PREFILL", raising=False)
        _force(monkeypatch, _cpu_flags=lambda: AMX[:5])  # AVX512_BF16, no AMX: the lanes
        lanes = packed(x)
        assert _mm_calls(lambda: packed(x)) == 0
        monkeypatch.setattr(cpu, "_cpu_flags", lambda: AMX)
        with caplog.at_level(logging.INFO, logger=cpu.__name__):
            cpu.apply_dispatch()
        onednn = packed(x)
        assert _mm_calls(lambda: packed(x)) > 0
        assert _mm_calls(lambda: packed(x[:4])) == 0
        assert _mm_calls(lambda: packed(x[: cpu.ONEDNN_MIN_M - 1])) == 0
    finally:
        monkeypatch.undo()
        cpu.apply_dispatch()
    assert "oneDNN" in caplog.text and "AMX-BF16" in caplog.text
    _check(onednn, x, w, None)
    torch.testing.assert_close(lanes.float(), onednn.float(), rtol=2 ** -7, atol=2 ** -7)
