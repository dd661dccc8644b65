"""benchmarks/quality.py keeps every row it measured in --out, across runs with the same settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .conftest import CALIB_TEXT, EVAL_TEXT

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402


def test_a_second_run_with_other_rows_keeps_the_first_runs_rows(tmp_path, llama_dir):
    common = ["--model", str(llama_dir), "--calib", str(CALIB_TEXT), "--eval", str(EVAL_TEXT), "--seqlen", "32",
              "--nsamples", "4", "--max-windows", "2", "--out", str(tmp_path / "q"), "--tmp", str(tmp_path)]
    quality.main(common + ["--sparsities", "2:4", "--methods", "magnitude"])
    quality.main(common + ["--sparsities", "0.5", "--methods", "wanda"])
    rows = json.loads((tmp_path / "q" / "quality.json").read_text())["rows"]
    assert [(r["method"], r["sparsity"]) for r in rows] == [("dense", "-"), ("wanda", "0.5"), ("magnitude", "2:4")]
    table = (tmp_path / "q" / "quality.md").read_text()
    assert "| magnitude |" in table and "| wanda |" in table
    # a rerun of the same row is not exported again: its figures are the first run's
    first = next(r for r in rows if r["method"] == "wanda")
    quality.main(common + ["--sparsities", "0.5", "--methods", "wanda"])
    again = json.loads((tmp_path / "q" / "quality.json").read_text())["rows"]
    assert next(r for r in again if r["method"] == "wanda") == first and len(again) == 3
    # --report-only without --sparsities reports every pattern and seed the results hold, not only the default
    # three patterns, nor only the seeds of the default --seed-methods
    quality.main(common + ["--sparsities", "0.6", "--methods", "magnitude", "--extra-seeds", "1",
                           "--seed-methods", "magnitude", "--seed-sparsities", "0.6"])
    held = json.loads((tmp_path / "q" / "quality.json").read_text())["rows"]
    quality.main(common[:-4] + ["--out", str(tmp_path / "merged"), "--reuse", str(tmp_path / "q"), "--report-only"])
    merged = json.loads((tmp_path / "merged" / "quality.json").read_text())["rows"]
    def keys(rows):
        return sorted((r["method"], r["sparsity"], r.get("seed", 0)) for r in rows)
    assert keys(merged) == keys(held)
    assert ("magnitude", "0.6", 1) in keys(merged)
