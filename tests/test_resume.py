"""A killed export (SIGKILL, no cleanup at all) resumes with --resume into byte-identical output, wherever it died.

The kills land at exact steps through ``tests/kill_export.py`` (which wraps one exporter function in the killed
subprocess); the resumed run then happens in this process, where the log and the calls can be checked.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bawa_vllm.cli.export import main as export_main
from bawa_vllm.pruning import engine

from .conftest import CALIB_TEXT, REPO, make_config, save_model

pytestmark = pytest.mark.slow  # about 20 exports, half of them in a fresh Python process

NUM_BLOCKS = 4  # shard 1 holds the non-block tensors, shard K + 2 block K


@pytest.fixture(scope="module")
def args(tmp_path_factory, tokenizer_dir) -> list[str]:
    """The export's arguments but --out: a tiny bf16 Llama of four blocks, computed in fp32, pruned with BaWA
    and its Θ search (the seeded part, which a resumed run has to reproduce too)."""
    model = save_model(make_config("llama", layers=NUM_BLOCKS), tmp_path_factory.mktemp("model"), tokenizer_dir,
                       dtype=torch.bfloat16)
    return ["--model", str(model), "--method", "bawa", "--sparsity", "2:4", "--calib", str(CALIB_TEXT),
            "--nsamples", "8", "--seqlen", "32", "--search-batch", "4"]


@pytest.fixture(scope="module")
def reference(args, tmp_path_factory) -> Path:
    """The same export, never interrupted."""
    ref = tmp_path_factory.mktemp("ref") / "ref"
    assert export_main([*args, "--out", str(ref)]) == 0
    return ref


def kill_at(args: list[str], point: str, out: Path, *extra: str) -> None:
    """Run the export in a subprocess that SIGKILLs itself at ``point`` (see tests/kill_export.py)."""
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "kill_export.py"), point, *args, "--out", str(out),
                           *extra], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {point}: rc {proc.returncode}\n{proc.stderr[-2000:]}"


def progress_of(out: Path) -> dict | None:
    path = out.parent / f".{out.name}.partial" / "progress.json"
    return json.loads(path.read_text())["progress"] if path.exists() else None


def assert_same_export(out: Path, ref: Path) -> None:
    """Every file byte-identical but the report (which holds timings), the report's per-layer figures equal,
    and nothing of the partial export or the replaced OUT left next to it."""
    names = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        if name != "bawa_report.json":
            assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    report, want = (json.loads((d / "bawa_report.json").read_text()) for d in (out, ref))
    assert [b["layers"] for b in report["blocks"]] == [b["layers"] for b in want["blocks"]]
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in directory.iterdir()}


def forbid_pruning(monkeypatch) -> None:
    def prune_block(*args, **kwargs):
        raise AssertionError("a finished export was pruned again")

    monkeypatch.setattr(engine, "_prune_block", prune_block)


# (kill point, what the partial export holds after the kill: blocks recorded, or None for no progress record)
KILLS = [
    ("calibration", None),  # the case: .OUT.partial exists, progress.json does not
    ("block:0", 0),  # calibration inputs and the non-block shard recorded, no block
    ("shard:3", 1),  # block 1's shard half-written
    ("record:2", 1),  # block 2's calibration inputs written, the record that names them not
    ("commit", NUM_BLOCKS),  # every block, config and report written; no index, no rename
]


@pytest.mark.parametrize(("point", "recorded"), KILLS, ids=[k[0] for k in KILLS])
def test_kill_then_resume_is_byte_identical(tmp_path, args, reference, caplog, point, recorded):
    out = tmp_path / "out"
    kill_at(args, point, out)
    assert not out.exists() and (tmp_path / ".out.partial").is_dir()
    progress = progress_of(out)
    assert (progress and progress["blocks_done"]) == recorded
    if point.startswith("shard:"):  # the kill really cut a shard short, one that no record names
        shard = tmp_path / ".out.partial" / f"model-{int(point[6:]):05d}-of-{NUM_BLOCKS + 1:05d}.safetensors"
        assert shard.exists() and shard.stat().st_size < (reference / shard.name).stat().st_size

    with caplog.at_level(logging.INFO):
        assert export_main([*args, "--out", str(out), "--resume"]) == 0
    if recorded is None:
        assert "starting from the first block" in caplog.text
    else:
        assert f"continuing {out} at block {recorded} of {NUM_BLOCKS}" in caplog.text
    assert_same_export(out, reference)


def test_kill_before_the_rename_is_renamed_not_redone(tmp_path, args, reference, monkeypatch, caplog):
    """Killed with the partial export complete (index written, progress record dropped): only the rename is left."""
    out = tmp_path / "out"
    kill_at(args, "publish", out)
    assert not out.exists() and progress_of(out) is None
    forbid_pruning(monkeypatch)
    with caplog.at_level(logging.INFO):
        assert export_main([*args, "--out", str(out), "--resume"]) == 0
    assert "only its rename was missing" in caplog.text
    assert_same_export(out, reference)


def test_kill_mid_swap_over_an_existing_out(tmp_path, args, reference, monkeypatch):
    """--overwrite: killed after the old OUT was moved aside and before the new one took its place."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the previous output")
    kill_at(args, "swap", out, "--overwrite")
    assert not out.exists() and [p.name for p in tmp_path.glob(".out.old-*")]
    forbid_pruning(monkeypatch)
    assert export_main([*args, "--out", str(out), "--overwrite", "--resume"]) == 0
    assert_same_export(out, reference)  # the new OUT in place, the old one removed


def test_kill_after_the_rename_is_not_redone(tmp_path, args, reference, monkeypatch, caplog):
    out = tmp_path / "out"
    kill_at(args, "published", out)
    assert_same_export(out, reference)
    before = snapshot(out)
    forbid_pruning(monkeypatch)
    with caplog.at_level(logging.INFO):
        assert export_main([*args, "--out", str(out), "--resume"]) == 0
    assert "already a finished export with these arguments; nothing to do" in caplog.text
    assert snapshot(out) == before


def test_finished_out_with_a_stale_partial(tmp_path, args, reference, monkeypatch, capsys):
    """A finished OUT next to a stale .OUT.partial of the same export: OUT untouched, the stale copy removed;
    other arguments are refused with their names, and a partial export of other arguments is not touched."""
    out, partial, saved = tmp_path / "out", tmp_path / ".out.partial", tmp_path / "saved-partial"
    kill_at(args, "block:2", out)
    shutil.copytree(partial, saved)
    assert export_main([*args, "--out", str(out), "--resume"]) == 0
    assert_same_export(out, reference)
    shutil.copytree(saved, partial)
    before = snapshot(out)

    forbid_pruning(monkeypatch)
    assert export_main([*args, "--out", str(out), "--resume"]) == 0
    assert snapshot(out) == before and not partial.exists()

    assert export_main([*args, "--out", str(out), "--resume", "--nsamples", "4"]) == 2
    assert "made with other arguments (nsamples); pass --overwrite" in capsys.readouterr().err
    assert snapshot(out) == before

    shutil.copytree(saved, partial)
    progress = json.loads((partial / "progress.json").read_text())
    progress["progress"]["fingerprint"]["nsamples"] = 4  # a partial export of another --nsamples
    (partial / "progress.json").write_text(json.dumps(progress))
    assert export_main([*args, "--out", str(out), "--resume"]) == 0
    assert snapshot(out) == before and (partial / "progress.json").read_text() == json.dumps(progress)


def test_other_arguments_refused_by_name_and_no_resume_starts_over(tmp_path, args, reference, capsys, caplog):
    out = tmp_path / "out"
    kill_at(args, "block:2", out)
    recorded = (tmp_path / ".out.partial" / "progress.json").read_bytes()
    assert export_main([*args, "--out", str(out), "--resume", "--sparsity", "4:8", "--search-lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "was made with other arguments (pattern, search); rerun without --resume" in err, err
    assert (tmp_path / ".out.partial" / "progress.json").read_bytes() == recorded and not out.exists()

    with caplog.at_level(logging.INFO):
        assert export_main([*args, "--out", str(out)]) == 0  # without --resume: discarded, started over
    assert "discarding the unfinished export" in caplog.text
    assert_same_export(out, reference)


def test_weight_update_settings_are_part_of_the_fingerprint():
    """--recon-iters and --admm-reselect change the output bytes but not the method's name, so the fingerprint
    must carry them: a --resume with another value is refused by name, not continued with mixed blocks."""
    from bawa_vllm.pruning.engine import ExportConfig, _arguments, _changed, _fingerprint
    from bawa_vllm.pruning.masks import SparsityPattern
    from bawa_vllm.pruning.methods import make_method

    cfg = ExportConfig(model="m", out="o", pattern=SparsityPattern.parse("2:4"))
    base = _fingerprint(_arguments(cfg, make_method("wanda", reconstruct="admm")))
    assert _changed(base, _fingerprint(_arguments(cfg, make_method("wanda", reconstruct="admm", reselect=0)))) \
        == ["reconstruction"]
    assert _changed(base, _fingerprint(_arguments(cfg, make_method("wanda", reconstruct="admm", iters=30)))) \
        == ["reconstruction"]
    assert _fingerprint(_arguments(cfg, make_method("wanda")))["reconstruction"] is None
