"""End to end: export -> transformers load -> logits equal an in-memory, full-model reference."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from bawa_vllm.calibration import calibration_windows, load_documents
from bawa_vllm.cli.export import main as export_main
from bawa_vllm.pruning.masks import SparsityPattern, apply_mask_, keep_mask
from bawa_vllm.pruning.metrics import bawa_scores, wanda_scores

from .conftest import CALIB_TEXT, make_config, save_model

# Three forward batches (3 + 3 + 2 windows): statistics that only counted one batch would give other masks.
NSAMPLES, SEQLEN, FORWARD_BATCH = 8, 24, 3


def _export(model_dir, out, *extra):
    args = ["--model", str(model_dir), "--out", str(out), "--calib", str(CALIB_TEXT), "--nsamples", str(NSAMPLES),
            "--seqlen", str(SEQLEN), "--forward-batch", str(FORWARD_BATCH), *extra]
    assert export_main(args) == 0
    return json.loads((out / "bawa_report.json").read_text())


def _full_model(path):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    return model.eval()


Scores = Callable[[int, str, torch.Tensor, torch.Tensor], torch.Tensor]  # (block, linear, W, Σx²) -> S


@torch.no_grad()
def reference_prune(model_dir, pattern: SparsityPattern, scores: Scores):
    """Prune the full in-memory model block after block by ``scores``, each block's activation statistics
    taken with the earlier blocks already pruned (what the streamed driver must reproduce). The windows run
    in the export's forward batches, so the fp32 sums add up in the same order and agree bit for bit."""
    model = _full_model(model_dir)
    ids = calibration_windows(load_documents(str(CALIB_TEXT)), AutoTokenizer.from_pretrained(model_dir),
                              NSAMPLES, SEQLEN, seed=0)
    for i, layer in enumerate(model.model.layers):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        sums = {n: torch.zeros(m.in_features) for n, m in linears.items()}

        def hook(_module, args, name):
            sums[name] += args[0].reshape(-1, args[0].shape[-1]).float().pow(2).sum(0)

        hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: hook(mod, a, n)) for n, m in linears.items()]
        for start in range(0, NSAMPLES, FORWARD_BATCH):
            model(ids[start : start + FORWARD_BATCH])
        for h in hooks:
            h.remove()
        for n, m in linears.items():
            apply_mask_(m.weight.data, keep_mask(scores(i, n, m.weight.data, sums[n]), pattern))
    return model


def reference_wanda(model_dir, pattern: SparsityPattern):
    return reference_prune(model_dir, pattern, lambda _block, _name, w, act: wanda_scores(w, act))


def _assert_same_model(exported, reference):
    ref_sd, exp_sd = reference.state_dict(), exported.state_dict()
    for k, v in ref_sd.items():
        assert torch.equal(v, exp_sd[k]), k
    ids = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, reference(ids).logits)


ARCHS = {
    "llama": dict(),
    "llama-tied": dict(tie_word_embeddings=True),
    "mistral-sliding": dict(sliding_window=8),
    "qwen2-bias": dict(),
    "qwen2-tied-sliding": dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=8,
                               max_window_layers=1),
}


@pytest.mark.slow  # five exports and five full-model references
@pytest.mark.parametrize("variant", list(ARCHS))
def test_wanda_export_matches_in_memory_reference(variant, tmp_path, tokenizer_dir):
    arch = variant.split("-")[0]
    src = save_model(make_config(arch, layers=3, **ARCHS[variant]), tmp_path / "src", tokenizer_dir, shard="50KB")
    out = tmp_path / "out"
    report = _export(src, out, "--method", "wanda", "--sparsity", "2:4", "--format", "dense")
    assert report["sparsity"] == pytest.approx(0.5)
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").exists()

    exported, info = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    _assert_same_model(exported, reference_wanda(src, SparsityPattern.parse("2:4")))
    if ARCHS[variant].get("tie_word_embeddings"):
        assert exported.lm_head.weight is exported.model.embed_tokens.weight
    # pruned zeros are +0.0
    q = exported.model.layers[0].self_attn.q_proj.weight
    assert not torch.signbit(q[q == 0]).any()


@pytest.mark.parametrize("arch,spec", [("llama", "2:4"), ("qwen2", "0.6")])
def test_bawa_export_matches_in_memory_reference(arch, spec, tmp_path, tokenizer_dir):
    """BaWA's masks, recomputed from each layer's reported Θ and the activation statistics, are the export's.

    Large search steps, selected on all windows, move the layers' Θ apart from their common start in at
    least one block (asserted), so a Θ applied to another layer than its own gives other masks there.
    """
    src = save_model(make_config(arch, layers=3), tmp_path / "src", tokenizer_dir)
    out = tmp_path / "out"
    report = _export(src, out, "--method", "bawa", "--sparsity", spec, "--format", "dense",
                     "--search-epochs", "2", "--search-batch", "2", "--search-lr", "1", "--search-max-step", "0.25",
                     "--search-holdout", "0")
    theta = {(b["block"], n): layer["theta"] for b in report["blocks"] for n, layer in b["layers"].items()}
    assert any(len({tuple(t) for (b, _), t in theta.items() if b == block}) == 7 for block in range(3)), theta
    reference = reference_prune(src, SparsityPattern.parse(spec),
                                lambda block, name, w, act: bawa_scores(w, act, theta[block, name]))
    _assert_same_model(AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa"), reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints(dtype, tmp_path, tokenizer_dir):
    src = save_model(make_config("llama"), tmp_path / "src", tokenizer_dir, dtype=dtype)
    out = tmp_path / "out"
    report = _export(src, out, "--method", "bawa", "--sparsity", "4:8", "--search-epochs", "1")
    assert report["dtype"] == str(dtype).removeprefix("torch.")
    assert json.loads((out / "config.json").read_text())["dtype"] == report["dtype"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == dtype
    w = model.model.layers[1].mlp.down_proj.weight
    assert ((w.reshape(w.shape[0], -1, 8) != 0).sum(-1) <= 4).all()


def test_dtype_override_and_magnitude_without_calibration(tmp_path, tokenizer_dir, llama_dir):
    out = tmp_path / "out"
    assert export_main(["--model", str(llama_dir), "--out", str(out), "--method", "magnitude",
                        "--sparsity", "0.6", "--dtype", "bfloat16"]) == 0
    report = json.loads((out / "bawa_report.json").read_text())
    assert report["blocks"][0]["loss"] is None
    src = _full_model(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    for name, layer in report["blocks"][0]["layers"].items():
        assert layer["sparsity"] == pytest.approx(int(layer["shape"][1] * 0.6) / layer["shape"][1])
    ref = src.model.layers[0].mlp.up_proj.weight.detach().clone()  # masks from the fp32 weights, then cast
    ref = apply_mask_(ref, keep_mask(ref.abs(), SparsityPattern(0.6))).to(torch.bfloat16)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, ref)
    # non-target tensors are copied (cast) unchanged
    assert torch.equal(model.lm_head.weight, src.lm_head.weight.to(torch.bfloat16))


def test_ignore_leaves_modules_dense(tmp_path, llama_dir):
    out = tmp_path / "out"
    report = _export(llama_dir, out, "--method", "wanda", "--sparsity", "0.5",
                     "--ignore", "lm_head,down_proj,model.layers.1.self_attn.q_proj")
    assert "down_proj" not in report["blocks"][0]["layers"]
    assert "self_attn.q_proj" not in report["blocks"][1]["layers"]
    assert "self_attn.q_proj" in report["blocks"][0]["layers"]
    with safe_open(out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][
            "model.layers.0.mlp.down_proj.weight"], "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").count_nonzero() > 0.99 * 128 * 64


def test_search_lowers_block_loss(tmp_path, llama_dir):
    report = _export(llama_dir, tmp_path / "out", "--method", "bawa", "--sparsity", "2:4",
                     "--search-epochs", "4", "--search-batch", "2")
    searches = [b["search"] for b in report["blocks"]]
    assert all(s["best_loss"] <= s["initial_loss"] for s in searches)
    assert sum(s["best_loss"] for s in searches) < sum(s["initial_loss"] for s in searches)
    # the final block loss is the searched one, and Θ is reported per layer
    for b in report["blocks"]:
        assert b["loss"] == pytest.approx(b["search"]["best_loss"], rel=1e-4)
        assert len(b["layers"]["mlp.down_proj"]["theta"]) == 3


def test_no_search_uses_initial_theta(tmp_path, llama_dir):
    report = _export(llama_dir, tmp_path / "out", "--method", "bawa", "--sparsity", "0.7", "--no-search")
    for b in report["blocks"]:
        assert b["search"] is None
        assert all(layer["theta"] == [1.0, 1.0, 0.5] for layer in b["layers"].values())
        assert all(layer["sparsity"] == pytest.approx(0.7, abs=0.02) for layer in b["layers"].values())


@pytest.mark.slow  # sixteen exports
@pytest.mark.parametrize("method,extra", [
    ("ria", []), ("sparsegpt", []), ("awp", []), ("awp", ["--awp-init", "bawa", "--no-search"]),
    ("wanda", ["--reconstruct", "admm"]), ("bawa", ["--reconstruct", "awp", "--no-search"]),
    ("magnitude", ["--reconstruct", "admm"]), ("bawa", ["--reconstruct", "admm", "--admm-reselect", "0"]),
])
@pytest.mark.parametrize("spec", ["2:4", "0.6"])
def test_reconstruction_methods_end_to_end(method, extra, spec, tmp_path, llama_dir):
    """A weight update must lower every layer's output error well below its mask alone's (measured here:
    final / masked <= 0.83 for every layer of every case); "no worse" would hold for any update, since the
    reconstructions fall back to the masked weight. A mask-only method must leave the kept weights as they
    were in the source."""
    out = tmp_path / "out"
    report = _export(llama_dir, out, "--method", method, "--sparsity", spec, "--format", "dense", *extra)
    model = AutoModelForCausalLM.from_pretrained(out)
    pattern = SparsityPattern.parse(spec)
    updates = "--reconstruct" in extra or method in ("sparsegpt", "awp")
    for b in report["blocks"]:
        for name, layer in b["layers"].items():
            err = layer["recon_error"]
            assert err["masked"] > 0, (name, err)
            if updates:
                assert err["final"] < 0.9 * err["masked"], (name, err)
    if not updates:
        src = _full_model(llama_dir).state_dict()
        for key, w in model.state_dict().items():
            if key.endswith("_proj.weight"):
                assert torch.equal(w, src[key].masked_fill(w == 0, 0.0)), key
    w = model.model.layers[1].mlp.down_proj.weight
    if pattern.is_nm:
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    elif method == "sparsegpt":  # adaptive mask selection: per column block across rows
        assert (w == 0).float().mean().item() == pytest.approx(0.6, abs=0.01)
    else:
        assert ((w == 0).sum(1) >= int(w.shape[1] * 0.6)).all()


def test_negative_admm_reselect_refused(tmp_path, capsys, llama_dir):
    assert export_main(["--model", str(llama_dir), "--out", str(tmp_path / "o"), "--method", "wanda",
                        "--reconstruct", "admm", "--admm-reselect", "-1", "--calib", str(CALIB_TEXT)]) == 2
    assert "--admm-reselect must be 0 or more" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_reconstruct_refused_for_weight_updating_methods(tmp_path, capsys, llama_dir):
    assert export_main(["--model", str(llama_dir), "--out", str(tmp_path / "o"), "--method", "sparsegpt",
                        "--reconstruct", "admm", "--calib", str(CALIB_TEXT)]) == 2
    assert "already updates the weights" in capsys.readouterr().err


def test_shared_inputs_share_statistics(llama_dir):
    """q/k/v (and gate/up) see one input tensor: one XᵀX for them, equal to the direct computation over all
    windows, which the pruner runs in three forward batches (2 + 2 + 1)."""
    from bawa_vllm.modeling.decoder import StreamedDecoder, linear_modules
    from bawa_vllm.pruning.engine import BlockPruner

    dec = StreamedDecoder(llama_dir)
    hidden = dec.embed(torch.randint(3, 512, (5, 10), generator=torch.Generator().manual_seed(0)))
    layer = dec.load_block(0)
    targets = linear_modules(layer)
    inputs = {}

    def keep(name, args):
        inputs[name] = args[0].reshape(-1, args[0].shape[-1])  # returns None: the input is left as it is

    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: keep(n, a)) for n, m in targets.items()]
    with torch.no_grad():
        dec.run_block(layer, 0, hidden)
    for h in hooks:
        h.remove()
    sums, grams, n_tokens = BlockPruner(dec, hidden, forward_batch=2).collect(layer, 0, targets, gram=True)
    assert n_tokens == 50
    assert grams["self_attn.k_proj"] is grams["self_attn.q_proj"] is grams["self_attn.v_proj"]
    assert grams["mlp.up_proj"] is grams["mlp.gate_proj"] and grams["mlp.down_proj"] is not grams["mlp.up_proj"]
    for n, x in inputs.items():
        torch.testing.assert_close(grams[n], x.float().T @ x.float())
        torch.testing.assert_close(sums[n], x.float().pow(2).sum(0))
