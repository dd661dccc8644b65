"""LLM-BIP structured pruning: scores, equivalence to zeroing, uniform counts, loadable configs."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bawa_vllm.calibration import calibration_windows, load_documents
from bawa_vllm.cli.export import main as export_main
from bawa_vllm.pruning.structured import ffn_scores, head_scores, plan_counts

from .conftest import CALIB_TEXT, make_config, save_model


def test_scores_bruteforce():
    g = torch.Generator().manual_seed(0)
    hidden, inter, heads, hd = 4, 6, 2, 2
    q = torch.randn(heads * hd, hidden, generator=g)
    o = torch.randn(hidden, heads * hd, generator=g)
    gate, up = torch.randn(inter, hidden, generator=g), torch.randn(inter, hidden, generator=g)
    down = torch.randn(hidden, inter, generator=g)
    xu, xh = torch.rand(inter, generator=g), torch.rand(heads * hd, generator=g)
    fs = ffn_scores("llm-bip", xu, gate, up, down)
    for j in range(inter):
        assert fs[j].item() == pytest.approx(float(xu[j]) * sum(abs(float(down[i, j])) for i in range(hidden)), rel=1e-5)
    # s_j^H = ||X_j||_1 * sum of |W^O_j| (I + |W^U||W^D|), with W in (in, out) layout and |W^U| = |up| + |gate|
    wu = (up.abs() + gate.abs()).T.double()  # [hidden, inter]
    wd = down.abs().T.double()  # [inter, hidden]
    bound = torch.eye(hidden, dtype=torch.float64) + wu @ wd
    hs = head_scores("llm-bip", xh, q, o, gate, up, down, hd)
    for h in range(heads):
        ref = sum(float(xh[j]) * float((o[:, j].abs().double() @ bound).sum()) for j in range(h * hd, (h + 1) * hd))
        assert hs[h].item() == pytest.approx(ref, rel=1e-5)
    mag = head_scores("magnitude", xh, q, o, gate, up, down, hd)
    assert mag[1].item() == pytest.approx(float(q[2:4].abs().sum() + o[:, 2:4].abs().sum()), rel=1e-5)


def test_plan_hits_the_ratio():
    cfg = make_config("llama", hidden=256, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2)
    for ratio in (0.2, 0.5):
        plan = plan_counts(cfg, ratio)
        assert plan["keep_intermediate"] % 8 == 0
        assert plan["removed_fraction"] == pytest.approx(ratio, abs=0.02)


def _zeroed_reference(src, report):
    """The original model with the removed heads' o_proj columns and channels' down_proj columns zeroed."""
    model = AutoModelForCausalLM.from_pretrained(src, attn_implementation="sdpa").eval()
    hd = report["plan"]["head_dim"]
    with torch.no_grad():
        for b, layer in zip(report["blocks"], model.model.layers):
            o = layer.self_attn.o_proj.weight
            keep = torch.zeros(o.shape[1], dtype=torch.bool)
            for h in b["kept_heads"]:
                keep[h * hd : (h + 1) * hd] = True
            o[:, ~keep] = 0
            d = layer.mlp.down_proj.weight
            keep = torch.zeros(d.shape[1], dtype=torch.bool)
            keep[b["kept_channels"]] = True
            d[:, ~keep] = 0
    return model


NSAMPLES, SEQLEN = 4, 32


@torch.no_grad()
def _reference_kept(src, plan: dict, method: str) -> list[tuple[list[int], list[int]]]:
    """(kept heads, kept channels) per block, recomputed on the full in-memory model: the L1 norms of the
    o_proj and down_proj inputs over the calibration windows, taken with the earlier blocks' removed heads
    and channels zeroed (by this reference's own choice), the scores (checked by brute force above), and
    the top-scoring heads of every KV group and channels overall."""
    model = AutoModelForCausalLM.from_pretrained(src, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    ids = calibration_windows(load_documents(str(CALIB_TEXT)), tokenizer, NSAMPLES, SEQLEN)
    hd, kv, group = plan["head_dim"], plan["kv_heads"], plan["heads_per_group"]
    kept = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        l1 = {"o": torch.zeros(attn.o_proj.in_features), "down": torch.zeros(mlp.down_proj.in_features)}

        def hook(name):
            def pre(_module, args) -> None:  # returns None: a pre-hook's return value would replace the input
                l1[name] += args[0].reshape(-1, args[0].shape[-1]).float().abs().sum(0)
            return pre

        handles = [attn.o_proj.register_forward_pre_hook(hook("o")),
                   mlp.down_proj.register_forward_pre_hook(hook("down"))]
        model(ids)
        for h in handles:
            h.remove()
        weights = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        hs = head_scores(method, l1["o"], attn.q_proj.weight, attn.o_proj.weight, *weights, hd).view(kv, group)
        in_group = hs.topk(plan["keep_heads_per_group"], dim=1).indices
        heads = sorted((in_group + torch.arange(kv).unsqueeze(1) * group).flatten().tolist())
        channels = sorted(ffn_scores(method, l1["down"], *weights).topk(plan["keep_intermediate"]).indices.tolist())
        kept.append((heads, channels))
        removed_rows = torch.ones(attn.o_proj.in_features, dtype=torch.bool)
        for h in heads:
            removed_rows[h * hd : (h + 1) * hd] = False
        attn.o_proj.weight[:, removed_rows] = 0
        removed = torch.ones(mlp.down_proj.in_features, dtype=torch.bool)
        removed[channels] = False
        mlp.down_proj.weight[:, removed] = 0
    return kept


@pytest.mark.slow  # six exports
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["llm-bip", "structured-magnitude", "structured-random"])
def test_pruned_equals_zeroed_original(arch, method, tmp_path, tokenizer_dir):
    """The smaller model equals the original with the reported heads and channels zeroed, and (for the
    deterministic methods) those are the top-scoring ones, recomputed from scratch."""
    src = save_model(make_config(arch, layers=3, num_attention_heads=8, num_key_value_heads=2, hidden=64,
                                 intermediate_size=256), tmp_path / "src", tokenizer_dir)
    out = tmp_path / "out"
    assert export_main(["--model", str(src), "--out", str(out), "--method", method, "--sparsity", "0.5",
                        "--calib", str(CALIB_TEXT), "--nsamples", str(NSAMPLES),
                        "--seqlen", str(SEQLEN)]) == 0
    report = json.loads((out / "bawa_report.json").read_text())
    if method != "structured-random":
        expected = _reference_kept(src, report["plan"], method.removeprefix("structured-"))
        assert [(b["kept_heads"], b["kept_channels"]) for b in report["blocks"]] == expected
    pruned = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    cfg = json.loads((out / "config.json").read_text())
    heads = {len(b["kept_heads"]) for b in report["blocks"]}
    channels = {len(b["kept_channels"]) for b in report["blocks"]}
    assert heads == {cfg["num_attention_heads"]} and channels == {cfg["intermediate_size"]}
    assert cfg["num_attention_heads"] == (4 if arch == "llama" else 8)  # Qwen2 keeps its heads
    assert report["params_after"] < report["params_before"]
    assert report["plan"]["removed_fraction"] == pytest.approx(0.5, abs=0.05)
    ref = _zeroed_reference(src, report)
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_structured_rejects_nm(tmp_path, capsys, llama_dir):
    assert export_main(["--model", str(llama_dir), "--out", str(tmp_path / "o"), "--method", "llm-bip",
                        "--sparsity", "2:4", "--calib", str(CALIB_TEXT)]) == 2
    assert "removes whole heads and channels" in capsys.readouterr().err
