"""A killed export (SIGKILL, no cleanup at all) resumes with --resume into byte-identical output."""

import json
import os
import signal
import subprocess
import sys
import time

from bawa_vllm.cli.export import main as export_main

from .conftest import CALIB_TEXT, REPO

ARGS = ["--model", str(REPO / "demo/model"), "--method", "bawa", "--sparsity", "2:4", "--calib", str(CALIB_TEXT),
        "--nsamples", "16", "--seqlen", "128", "--search-batch", "4"]


def test_kill_mid_run_then_resume_is_byte_identical(tmp_path):
    out = tmp_path / "out"
    progress = tmp_path / ".out.partial" / "progress.json"
    proc = subprocess.Popen([sys.executable, "-m", "bawa_vllm.cli.export", *ARGS, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and json.loads(progress.read_text())["progress"]["blocks_done"] >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the export finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads(progress.read_text())["progress"]["blocks_done"]
    assert 2 <= done < 4 and not out.exists()

    assert export_main([*ARGS, "--out", str(out), "--resume"]) == 0
    assert export_main([*ARGS, "--out", str(tmp_path / "ref")]) == 0
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        if name != "bawa_report.json":
            assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    report = json.loads((out / "bawa_report.json").read_text())
    ref = json.loads((tmp_path / "ref" / "bawa_report.json").read_text())
    assert [b["layers"] for b in report["blocks"]] == [b["layers"] for b in ref["blocks"]]
