"""End to end through vLLM (CPU build): prune -> packed export -> ``vllm serve`` -> OpenAI API.

The packed checkpoint served through the plugin must answer token for token like the dense-masked
export served by stock vLLM. Every server runs on loopback on a free port and is always torn down.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from safetensors.torch import load_file, save_file  # noqa: E402

from bawa_vllm.cli.export import main as export_main  # noqa: E402
from bawa_vllm.serving import ServerFailed, VllmServer  # noqa: E402

from .conftest import CALIB_TEXT, make_config, save_model  # noqa: E402

SERVE_ARGS = ["--max-model-len", "128", "--gpu-memory-utilization", "0.2", "--max-num-seqs", "4"]
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
PROMPTS = ["The history of the city", "In physics, energy is", "A river is"]
CHAT = [{"role": "user", "content": "Tell me about mountains."}]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("serve")
    src = save_model(make_config("llama", layers=2, hidden=128), root / "src", tokenizer_dir, dtype=torch.bfloat16)
    out = {}
    for fmt in ("packed", "dense"):
        out[fmt] = root / fmt
        assert export_main(["--model", str(src), "--out", str(out[fmt]), "--method", "wanda", "--sparsity", "2:4",
                            "--calib", str(CALIB_TEXT), "--nsamples", "4", "--seqlen", "32", "--format", fmt]) == 0
    return out


def _answers(server: VllmServer) -> dict:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    completions = [client.completions.create(model=model, prompt=p, max_tokens=12, temperature=0.0, logprobs=0)
                   for p in PROMPTS]
    chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0.0)
    return {"completions": [c.choices[0].logprobs.tokens for c in completions],
            "text": [c.choices[0].text for c in completions],
            "chat": chat.choices[0].message.content}


def _serve(model, log, extra=()):
    with VllmServer(model, log, [*SERVE_ARGS, *extra], env=ENV) as server:
        return _answers(server)


def _absurd_requests_are_refused(server: VllmServer) -> None:
    """vLLM refuses absurd parameters (4xx); the plugin must not add a way to crash the server."""
    import urllib.error
    import urllib.request

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    for kwargs in ({"max_tokens": 10**9}, {"max_tokens": -5}, {"temperature": -3.0}, {"logprobs": 10**6},
                   {"prompt": [10**9, 10**9 + 1]}, {"prompt": "x" * 10_000}):
        params = {"model": model, "prompt": "Hello", "max_tokens": 4, **kwargs}
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(**params)
        assert 400 <= err.value.status_code < 500, (kwargs, err.value)
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as r:
        assert r.status == 200
    assert client.completions.create(model=model, prompt="Hello", max_tokens=4).choices[0].text is not None


def test_packed_serves_like_dense_masked(exports, tmp_path):
    with VllmServer(exports["packed"], tmp_path / "packed.log", SERVE_ARGS, env=ENV) as server:
        packed = _answers(server)
        _absurd_requests_are_refused(server)
    dense = _serve(exports["dense"], tmp_path / "dense.log")
    assert packed == dense
    assert all(len(tokens) == 12 for tokens in packed["completions"])
    log = (tmp_path / "packed.log").read_text()
    assert "quantization=bawa-sparse" in log
    assert "bawa-sparse: cpu backend cpu" in log  # the AVX-512 kernel served it, not a dense fallback


def test_tensor_parallel_2(exports, tmp_path):
    tp = ["--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"]
    assert _serve(exports["packed"], tmp_path / "tp2.log", tp) == _serve(exports["dense"], tmp_path / "d2.log", tp)


def _corrupt(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    fname = index["weight_map"]["model.layers.0.self_attn.k_proj.weight_meta"]
    tensors = load_file(dst / fname)
    edit(tensors)
    save_file(tensors, dst / fname, metadata={"format": "pt"})
    index["weight_map"] = {k: f for k, f in index["weight_map"].items() if f != fname or k in tensors}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize("case,edit,message", [
    ("missing-meta", lambda t: t.pop("model.layers.0.self_attn.k_proj.weight_meta"),
     "model.layers.0.self_attn.k_proj.weight_values: no model.layers.0.self_attn.k_proj.weight_meta"),
    ("misshaped-meta", lambda t: t.update({"model.layers.0.self_attn.k_proj.weight_meta":
                                           t["model.layers.0.self_attn.k_proj.weight_meta"][:, :-1].contiguous()}),
     "model.layers.0.self_attn.k_proj.weight_meta: expected uint8 of shape"),
    ("bad-group", lambda t: t["model.layers.0.self_attn.k_proj.weight_meta"].__setitem__((3, 1), 0x55),
     "k_proj rows of model.layers.0.self_attn.qkv_proj: weight_meta row 3, group 2 has invalid positions"),
])
def test_malformed_packed_checkpoint_fails_at_load(exports, tmp_path, case, edit, message):
    bad = _corrupt(exports["packed"], tmp_path / case, edit)
    with pytest.raises(ServerFailed) as err:
        VllmServer(bad, tmp_path / f"{case}.log", SERVE_ARGS, env=ENV, timeout=300).start()
    assert message in str(err.value) or message in (tmp_path / f"{case}.log").read_text()


def test_structured_pruned_model_serves_like_transformers(tmp_path):
    """LLM-BIP's output is a plain smaller config: stock vLLM (no plugin involved) matches transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .conftest import REPO

    out = tmp_path / "bip"
    assert export_main(["--model", str(REPO / "demo/model"), "--out", str(out), "--method", "llm-bip",
                        "--sparsity", "0.5", "--calib", str(CALIB_TEXT), "--nsamples", "8", "--seqlen", "128",
                        "--dtype", "float32"]) == 0
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with VllmServer(out, tmp_path / "bip.log", [*SERVE_ARGS, "--dtype", "float32"], env=ENV) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        served = [client.completions.create(model=str(out), prompt=p, max_tokens=12, temperature=0.0)
                  .choices[0].text for p in PROMPTS]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    expected = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        expected.append(tok.decode(gen[0, ids.shape[1]:]))
    assert served == expected
