"""2:4 exports are packed by default: smaller on disk, same model."""

import json

import pytest
import torch
from safetensors import safe_open

from bawa_vllm.calibration import evaluation_windows, load_documents
from bawa_vllm.cli.export import main as export_main
from bawa_vllm.evaluation import streamed_perplexity
from bawa_vllm.modeling.checkpoint import Checkpoint
from bawa_vllm.sparse.format import unpack_24

from .conftest import CALIB_TEXT, EVAL_TEXT, make_config, save_model


def _export(src, out, *extra):
    assert export_main(["--model", str(src), "--out", str(out), "--calib", str(CALIB_TEXT), "--nsamples", "4",
                        "--seqlen", "16", "--method", "wanda", "--sparsity", "2:4", *extra]) == 0


def _linear_bytes(path):
    ckpt = Checkpoint(path)
    total = 0
    for key in ckpt.keys("model.layers."):
        if "_proj." in key:
            total += sum(t.numel() * t.element_size() for t in ckpt.read([key]).values())
    return total


def test_packed_is_default_for_24_and_matches_dense(tmp_path, tokenizer_dir):
    src = save_model(make_config("qwen2", layers=2), tmp_path / "src", tokenizer_dir, dtype=torch.bfloat16)
    _export(src, tmp_path / "packed", "--ignore", "lm_head,model.layers.1.mlp.down_proj")
    _export(src, tmp_path / "dense", "--format", "dense", "--ignore", "lm_head,model.layers.1.mlp.down_proj")
    cfg = json.loads((tmp_path / "packed" / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "bawa-sparse" and q["pattern"] == "2:4" and q["format_version"] == 1
    assert q["ignore"] == ["lm_head", "model.layers.1.mlp.down_proj"] and q["pruning_method"] == "wanda"
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())

    packed, dense = Checkpoint(tmp_path / "packed"), Checkpoint(tmp_path / "dense")
    assert "model.layers.0.self_attn.q_proj.weight" not in packed.weight_map
    assert "model.layers.1.mlp.down_proj.weight" in packed.weight_map  # ignored: stays dense
    assert "model.layers.0.self_attn.q_proj.bias" in packed.weight_map  # biases stored as usual
    for key in dense.keys("model.layers.0."):
        if key.endswith("_proj.weight"):
            module = key[: -len(".weight")]
            t = packed.read([f"{module}.weight_values", f"{module}.weight_meta"])
            assert torch.equal(unpack_24(t[f"{module}.weight_values"], t[f"{module}.weight_meta"]),
                               dense.read([key])[key])
    # bytes of the pruned linears: 9/16 of dense
    with safe_open(tmp_path / "dense" / dense.weight_map["model.layers.1.mlp.down_proj.weight"], "pt") as f:
        ignored = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    ignored_bytes = ignored.numel() * ignored.element_size()
    ratio = (_linear_bytes(tmp_path / "packed") - ignored_bytes) / (_linear_bytes(tmp_path / "dense") - ignored_bytes)
    assert ratio <= 0.57
    # the streamed evaluation reads packed checkpoints too, and sees the same model
    from transformers import AutoTokenizer

    windows = evaluation_windows(load_documents(str(EVAL_TEXT)), AutoTokenizer.from_pretrained(src), 32, 4)
    assert streamed_perplexity(str(tmp_path / "packed"), windows)["perplexity"] == pytest.approx(
        streamed_perplexity(str(tmp_path / "dense"), windows)["perplexity"], rel=0, abs=0)


def test_packed_needs_24(tmp_path, capsys, llama_dir):
    assert export_main(["--model", str(llama_dir), "--out", str(tmp_path / "o"), "--method", "magnitude",
                        "--sparsity", "4:8", "--format", "packed"]) == 2
    assert "stores 2:4 only" in capsys.readouterr().err
