"""benchmarks/cpu_instructions.py compiles, runs and reports every sequence (timings are not checked: machines are
noisy; the benchmark prints them)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from bawa_vllm.kernels import cpu

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import cpu_instructions  # noqa: E402


def _why_not() -> str | None:
    if shutil.which("g++") is None:
        return "needs g++"
    try:
        flags = cpu._cpu_flags()
    except OSError:
        return "cannot read /proc/cpuinfo"
    return None if "avx512_bf16" in flags else "needs a CPU with AVX512_BF16"


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))


def test_reports_every_sequence_relative_to_dense(tmp_path, capsys):
    cpu_instructions.main(["--out", str(tmp_path)])
    report = json.loads((tmp_path / "cpu_instructions.json").read_text())
    assert [r["sequence"] for r in report["rows"]] == cpu_instructions.NAMES
    assert all(r["ns_per_32_kept"] > 0 for r in report["rows"])
    assert report["rows"][0]["vs_dense"] == 1.0
    assert (tmp_path / "cpu_instructions.png").stat().st_size > 0
    assert "gather (vpermt2w)" in capsys.readouterr().out
