"""tools/gpu_check.py: its --dry-run (CPU, Triton interpreter, tiny shapes) runs end to end, and its
crossover rule picks the right token count from timings."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

# not imported here: tests/test_triton_kernels.py must set TRITON_INTERPRET before triton's first import
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "gpu_check.py"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(shape: str, times: dict[int, tuple[float, float]]) -> list[dict]:
    return [{"shape": shape, "tp": 1, "M": m, "triton_ms": t, "cusparselt_ms": c}
            for m, (t, c) in times.items()]


def test_crossover_rule():
    gc = _gpu_check()
    rows = (_rows("a", {1: (1, 5), 128: (2, 3), 512: (4, 3), 2048: (9, 8)})  # from 512
            + _rows("b", {1: (1, 5), 128: (2, 1), 512: (4, 5), 2048: (9, 8)})  # a win at 128 does not count
            + _rows("c", {1: (1, 5), 128: (2, 3), 512: (4, 5), 2048: (9, 10)}))  # never
    result = gc.crossover(rows)
    assert result["per_shape"] == {"a TP=1": 512, "b TP=1": 2048, "c TP=1": None}
    assert result["min_m"] == 2048  # the median of (512, 2048, never)
    assert gc.crossover(_rows("d", {1: (1, None)})) == {"per_shape": {}, "min_m": None}


def test_shapes_are_per_rank():
    gc = _gpu_check()
    shapes = {(name, tp): (n, k) for name, tp, n, k in gc.linear_shapes(1) + gc.linear_shapes(8)}
    assert shapes["Llama-3-8B qkv", 1] == (6144, 4096) and shapes["Llama-3-8B down", 8] == (4096, 1792)
    assert shapes["Llama-2-70B gate_up", 8] == (7168, 8192)


@pytest.mark.slow
def test_dry_run(tmp_path):
    """The same code paths as on a GPU (correctness, compile, bytes, timings, tables) on CPU tensors."""
    out = tmp_path / "gc"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["dry_run"] and result["arch"] == "interpreter"
    checked = {(r["path"], r["dtype"]): r for r in result["correctness"]}
    for dtype in ("bfloat16", "float16"):
        for path in ("triton", "dense"):
            row = checked[path, dtype]
            assert row["ran"] and row["ok"] and row["row_major"] and row["compile_ok"], row
        assert not checked["cusparselt", dtype]["ran"]  # no CUDA here: reported, not faked
    assert {r["path"]: r["held_over_dense"] for r in result["memory"]}["triton"] == 0.5625
    assert {r["M"] for r in result["timings"]} == set(_gpu_check().DRY_M_VALUES)
    assert {(r["shape"], r["M"]) for r in result["decode_kernels"]} == {
        (name, m) for name, *_ in _gpu_check().DRY_SHAPES for m in (1, 2, 4)}
    assert "Speed-up over dense" in out.with_suffix(".md").read_text()
