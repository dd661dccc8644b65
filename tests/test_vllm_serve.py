"""End to end through vLLM (CPU build): prune -> packed export -> ``vllm serve`` -> OpenAI API.

The packed checkpoint served through the plugin must answer token for token, with the same logprobs,
like the dense-masked export served by stock vLLM (Llama) or run by transformers (Qwen2 with q/k/v
biases, Mistral). Every server runs on loopback on a free port and is always torn down. Every test here
starts vLLM servers, minutes each on CPU: they are marked ``slow``.
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

pytestmark = pytest.mark.slow

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
            "logprobs": [c.choices[0].logprobs.token_logprobs for c in completions],
            "text": [c.choices[0].text for c in completions],
            "chat": chat.choices[0].message.content}


# Packed (plugin) vs dense-masked (stock vLLM), bf16. With the plugin's dense CPU path both run the same
# weight through the same GEMM and the logprobs are bit-identical (measured: 0.0). A 2:4 kernel may round
# each layer's bf16 output differently: bf16 keeps 8 significant bits, so one rounding step of a logit of
# magnitude <= 2 moves its logprob by <= 2^-7 ~ 0.008 nats; 0.01 allows that and no more.
BF16_LOGPROB_TOL = 0.01


def _assert_same_answers(packed: dict, dense: dict) -> None:
    """Tokens, text and chat equal; logprobs (12 per completion, all present) within BF16_LOGPROB_TOL."""
    def exact(answers: dict) -> dict:
        return {k: v for k, v in answers.items() if k != "logprobs"}

    assert exact(packed) == exact(dense)
    for got, want in zip(packed["logprobs"], dense["logprobs"], strict=True):
        assert len(got) == len(want) == 12 and all(v <= 0 for v in got)
        assert max(abs(g - w) for g, w in zip(got, want)) <= BF16_LOGPROB_TOL, (got, want)


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
    _assert_same_answers(packed, dense)
    assert all(len(tokens) == 12 for tokens in packed["completions"])
    log = (tmp_path / "packed.log").read_text()
    assert "quantization=bawa-sparse" in log
    assert "bawa-sparse: cpu backend cpu" in log  # the AVX-512 kernel served it, not a dense fallback


def test_tensor_parallel_2(exports, tmp_path):
    tp = ["--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"]
    _assert_same_answers(_serve(exports["packed"], tmp_path / "tp2.log", tp),
                         _serve(exports["dense"], tmp_path / "d2.log", tp))


# vLLM serving the packed checkpoint (plugin, float32) vs transformers running the dense-masked export
# (float32): the same weights through two implementations whose kernels sum in different orders. float32
# logprobs then differ by rounding only (measured: 5e-7 nats), so 1e-4 leaves a 200x margin; serving Qwen2
# without its q/k/v biases moves them by far more (and passed with the biases at their noise scale of 0.02).
FP32_LOGPROB_TOL = 1e-4


@pytest.mark.parametrize("arch,overrides", [("qwen2", {}), ("mistral", {"sliding_window": 8})])
def test_packed_qwen2_and_mistral_serve_like_transformers(arch, overrides, tmp_path, tokenizer_dir):
    """Qwen2 (q/k/v with biases: the packed qkv_proj loads its bias rows too) and Mistral, served packed,
    generate the dense-masked export's greedy tokens with its logprobs as transformers computes them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bawa_vllm.modeling.checkpoint import Checkpoint

    src = save_model(make_config(arch, layers=2, hidden=128, **overrides), tmp_path / "src", tokenizer_dir)
    if arch == "qwen2":  # biases of the weights' scale (noise of 0.02 otherwise), so that dropping them shows
        tensors = load_file(src / "model.safetensors")
        save_file({k: v * 50 if k.endswith("_proj.bias") else v for k, v in tensors.items()},
                  src / "model.safetensors", metadata={"format": "pt"})
    for fmt in ("packed", "dense"):
        assert export_main(["--model", str(src), "--out", str(tmp_path / fmt), "--method", "wanda",
                            "--sparsity", "2:4", "--calib", str(CALIB_TEXT), "--nsamples", "4",
                            "--seqlen", "32", "--format", fmt]) == 0
    packed_keys = Checkpoint(tmp_path / "packed").weight_map
    assert ("model.layers.0.self_attn.q_proj.bias" in packed_keys) == (arch == "qwen2")
    assert "model.layers.0.self_attn.q_proj.weight_values" in packed_keys
    with VllmServer(tmp_path / "packed", tmp_path / "packed.log", [*SERVE_ARGS, "--dtype", "float32"],
                    env=ENV) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        model_id = client.models.list().data[0].id
        served = [client.completions.create(model=model_id, prompt=p, max_tokens=12, temperature=0.0,
                                            logprobs=0, extra_body={"return_tokens_as_token_ids": True}).choices[0]
                  for p in PROMPTS]
    assert "quantization=bawa-sparse" in (tmp_path / "packed.log").read_text()
    tok = AutoTokenizer.from_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", attn_implementation="sdpa").eval()
    for prompt, choice in zip(PROMPTS, served, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
            logprobs = model(gen).logits[0, ids.shape[1] - 1 : -1].float().log_softmax(-1)
        new = gen[0, ids.shape[1] :]
        # token ids, not text: vLLM holds back a trailing partial UTF-8 sequence that decode() shows as U+FFFD
        assert [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens] == new.tolist()
        want = logprobs.gather(1, new.unsqueeze(1)).squeeze(1).tolist()
        got = choice.logprobs.token_logprobs
        assert len(got) == len(want) == 12
        assert max(abs(g - w) for g, w in zip(got, want)) <= FP32_LOGPROB_TOL, (got, want)


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
