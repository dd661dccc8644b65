"""vLLM (CPU build) with the AVX-512 kernel: what a loaded layer holds, and the fallback when it cannot be built.

Each run is a subprocess (tests/vllm_probe.py) that loads the packed checkpoint with vLLM's ``LLM`` and reports
the bytes every bawa-sparse layer holds after loading plus greedy completions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from bawa_vllm.cli.export import main as export_main  # noqa: E402
from bawa_vllm.kernels import CPU, cpu  # noqa: E402

from .conftest import make_config, save_model  # noqa: E402

pytestmark = pytest.mark.slow
PROMPTS = ["The history of the city", "In physics, energy is"]
PROBE = Path(__file__).with_name("vllm_probe.py")


@pytest.fixture(scope="module")
def packed_model(tmp_path_factory, tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("cpu-serving")
    # down_proj has K = 264: a tail of 8 columns past the last 64-column word (head_dim 64, as vLLM's CPU
    # attention needs). float32 (served as such, vLLM's CPU default would be bf16): the kernel and vLLM's dense
    # GEMM then differ by fp32 summation order only
    # (~1e-6), so greedy tokens of this random model cannot flip between them; in bf16 the output rounding makes
    # near-ties of a random model's logits flip (seen once). bf16 serving is compared in test_vllm_serve.py.
    src = save_model(make_config("llama", layers=2, hidden=256, intermediate_size=264, num_attention_heads=4),
                     root / "src", tokenizer_dir, dtype=torch.float32)
    assert export_main(["--model", str(src), "--out", str(root / "packed"), "--method", "magnitude",
                        "--sparsity", "2:4"]) == 0
    return root / "packed"


def _probe(model: Path, env: dict[str, str] | None = None) -> tuple[dict, str]:
    run = subprocess.run([sys.executable, str(PROBE), str(model), "float32", *PROMPTS], capture_output=True, text=True,
                         timeout=600, env={**os.environ, **(env or {})})
    line = next((l for l in run.stdout.splitlines() if l.startswith("PROBE ")), None)
    assert run.returncode == 0 and line, run.stderr[-3000:]
    return json.loads(line[len("PROBE "):]), run.stderr + run.stdout


@pytest.mark.skipif(cpu._cpu_reason() is not None, reason="the CPU kernel cannot run here")
def test_layers_hold_one_packed_copy_and_fallback_serves_the_same(packed_model, tmp_path):
    kernel, log = _probe(packed_model)
    layers = kernel["layers"]
    assert len(layers) == 2 * 4  # qkv, o, gate_up, down per block
    for name, held in layers.items():
        assert held["backend"] == CPU, (name, held)
        assert held["bytes"] <= 0.60 * held["dense_bytes"], (name, held)  # values + metadata only (fp32: 17/32)
    assert "bawa-sparse: cpu backend cpu" in log

    # The build fails (its cache directory cannot be made; vLLM itself needs the compiler for torch.compile,
    # so that is the failure to simulate here): the plugin logs why and serves through vLLM's dense GEMM.
    (tmp_path / "file").write_text("")
    fallback, log = _probe(packed_model, {"BAWA_CACHE_DIR": str(tmp_path / "file" / "cache")})
    assert all(held["backend"] is None for held in fallback["layers"].values())
    assert "bawa-sparse: CPU backend = dense weight through vLLM's CPU GEMM" in log
    assert "could not be built (NotADirectoryError" in log
    assert fallback["tokens"] == kernel["tokens"]
    assert all(len(t) == 12 for t in kernel["tokens"])
