"""Smoke test of the dense-vs-sparse serving comparison on the demo model with a tiny load (not timed).

The models are the demo model without its chat template, as most base checkpoints come: under the default
``--endpoint mixed`` vLLM refuses every chat request, which must show as one warning and completions only,
not as failed requests."""

import json
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytest.importorskip("locust")

from bawa_vllm.cli.export import main as export_main  # noqa: E402

from .conftest import CALIB_TEXT, REPO  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
import serve_compare  # noqa: E402


@pytest.mark.slow  # two vLLM servers
def test_serve_compare_smoke(tmp_path, capsys):
    base = tmp_path / "demo-base"
    shutil.copytree(REPO / "demo/model", base, ignore=shutil.ignore_patterns("chat_template*"))
    assert "chat_template" not in (base / "tokenizer_config.json").read_text()
    sparse = tmp_path / "demo-2of4"
    assert export_main(["--model", str(base), "--out", str(sparse), "--method", "bawa", "--no-search",
                        "--sparsity", "2:4", "--calib", str(CALIB_TEXT), "--nsamples", "8", "--seqlen", "128"]) == 0
    out = tmp_path / "report"
    rc = serve_compare.main(["--dense", str(base), "--sparse", str(sparse), "--concurrency", "2",
                             "--duration", "8", "--prompt-tokens", "16", "--max-tokens", "8", "--out", str(out),
                             "--serve-args", "--max-model-len 256 --gpu-memory-utilization 0.2 --max-num-seqs 4"])
    report = json.loads((out / "serve_compare.json").read_text())
    assert rc == 0, report
    assert report["load"]["endpoint"] == "mixed"  # the default
    warnings = [line for line in capsys.readouterr().out.splitlines() if "refuses chat requests" in line]
    assert len(warnings) == 1 and "measuring completions only" in warnings[0], warnings
    assert "chat template" in report["dense"]["chat_refused"]  # vLLM's reason, passed on
    for side in ("dense", "sparse"):
        level = report[side]["levels"][0]
        assert level["errors"] == 0 and level["requests"] > 0 and level["output_tokens_per_s"] > 0
        assert level["ttft_ms_p50"] > 0 and level["tpot_ms_p50"] > 0
        assert report[side]["endpoints"] == level["endpoints"] == ["completions"]
    assert report["sparse"]["backend"].startswith("cpu backend cpu")  # served by the AVX-512 kernel
    table = Path(out / "serve_compare.md").read_text()
    assert table.count("sparse/dense") == 1
    assert "- dense measured on: completions (chat refused: HTTP 400" in table
    assert "- sparse measured on: completions\n" in table
    assert (out / "serve_compare.png").stat().st_size > 0
