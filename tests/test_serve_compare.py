"""Smoke test of the dense-vs-sparse serving comparison on the demo model with a tiny load (not timed)."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytest.importorskip("locust")

from bawa_vllm.cli.export import main as export_main  # noqa: E402

from .conftest import CALIB_TEXT, REPO  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
import serve_compare  # noqa: E402


def test_serve_compare_smoke(tmp_path):
    sparse = tmp_path / "demo-2of4"
    assert export_main(["--model", str(REPO / "demo/model"), "--out", str(sparse), "--method", "bawa", "--no-search",
                        "--sparsity", "2:4", "--calib", str(CALIB_TEXT), "--nsamples", "8", "--seqlen", "128"]) == 0
    out = tmp_path / "report"
    rc = serve_compare.main(["--dense", str(REPO / "demo/model"), "--sparse", str(sparse), "--concurrency", "2",
                             "--duration", "8", "--prompt-tokens", "16", "--max-tokens", "8", "--out", str(out),
                             "--serve-args", "--max-model-len 256 --gpu-memory-utilization 0.2 --max-num-seqs 4"])
    report = json.loads((out / "serve_compare.json").read_text())
    assert rc == 0, report
    for side in ("dense", "sparse"):
        level = report[side]["levels"][0]
        assert level["errors"] == 0 and level["requests"] > 0 and level["output_tokens_per_s"] > 0
        assert level["ttft_ms_p50"] > 0 and level["tpot_ms_p50"] > 0
    assert "CPU backend" in report["sparse"]["backend"]
    assert Path(out / "serve_compare.md").read_text().count("sparse/dense") == 1
    assert (out / "serve_compare.png").stat().st_size > 0
