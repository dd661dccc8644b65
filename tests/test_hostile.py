"""Hostile checkpoints: clear errors, nothing executed from the checkpoint, no pickle."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bawa_vllm.cli.evaluate import main as eval_main
from bawa_vllm.cli.export import main as export_main

from .conftest import CALIB_TEXT, EVAL_TEXT, make_config, save_model


def _fails(capsys, tmp_path, model, match):
    out = tmp_path / "out"
    assert export_main(["--model", str(model), "--out", str(out), "--method", "wanda", "--calib", str(CALIB_TEXT),
                        "--nsamples", "2", "--seqlen", "16"]) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.fixture
def model(tmp_path, tokenizer_dir):
    return save_model(make_config("llama"), tmp_path / "m", tokenizer_dir, shard="40KB")


def test_malformed_config_json(tmp_path, capsys, model):
    (model / "config.json").write_text('{"model_type": "llama", ')
    _fails(capsys, tmp_path, model, "config.json is not valid JSON")


def test_invalid_config_values(tmp_path, capsys, model):
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_attention_heads"] = 3  # head_dim 64/3 is not an integer, rope needs an even one
    cfg.pop("head_dim", None)
    (model / "config.json").write_text(json.dumps(cfg))
    _fails(capsys, tmp_path, model, "invalid llama config")


def test_malformed_index(tmp_path, capsys, model):
    (model / "model.safetensors.index.json").write_text('{"metadata": {}}')
    _fails(capsys, tmp_path, model, "not a safetensors index")
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {"a": "../x"}}))
    _fails(capsys, tmp_path, model, "shard names must be plain file names")


def test_truncated_safetensors(tmp_path, capsys, model):
    shard = sorted(model.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    _fails(capsys, tmp_path, model, "not a readable safetensors file")


def test_wrong_shape_and_dtype(tmp_path, capsys, model):
    index = json.loads((model / "model.safetensors.index.json").read_text())
    key = "model.layers.0.mlp.up_proj.weight"
    fname = model / index["weight_map"][key]
    tensors = load_file(fname)
    tensors[key] = torch.zeros(7, 3)
    save_file(tensors, fname)
    _fails(capsys, tmp_path, model, "model.layers.0.mlp.up_proj.weight has shape [7, 3], but the config implies [128, 64]")
    tensors[key] = torch.zeros(128, 64, dtype=torch.int32)
    save_file(tensors, fname)
    _fails(capsys, tmp_path, model, "model.layers.0.mlp.up_proj.weight is stored as I32")
    tensors[key] = torch.zeros(128, 64)
    save_file(tensors, fname)
    norm = "model.layers.0.input_layernorm.weight"
    nfile = model / index["weight_map"][norm]
    norm_tensors = load_file(nfile)
    norm_tensors[norm] = torch.zeros(5)
    save_file(norm_tensors, nfile)
    _fails(capsys, tmp_path, model, "block 0 does not match its config")


def test_remote_code_is_never_run(tmp_path, capsys, model):
    marker = tmp_path / "ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import LlamaConfig\n"
                                   "class EvilConfig(LlamaConfig):\n    pass\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(cfg))
    assert eval_main(["--model", str(model), "--data", str(EVAL_TEXT), "--seqlen", "16", "--max-windows", "1"]) == 0
    cfg["model_type"] = "evil"
    (model / "config.json").write_text(json.dumps(cfg))
    _fails(capsys, tmp_path, model, "unsupported architecture model_type='evil'")
    assert not marker.exists()


def test_pickle_checkpoints_refused(tmp_path, capsys, model):
    for f in model.glob("model*.safetensors*"):
        f.unlink()
    torch.save({"x": torch.zeros(1)}, model / "pytorch_model.bin")
    _fails(capsys, tmp_path, model, "only safetensors checkpoints are supported")


def test_plugin_rejects_malformed_quantization_config():
    pytest.importorskip("vllm")
    from bawa_vllm.plugin.config import BawaSparseConfig

    for bad, match in [({"ignore": "lm_head"}, "must be a list"), ({"format_version": 99}, "not supported"),
                       ({"pattern": "4:8"}, "serves 2:4"), ({"format": "other"}, "unknown format")]:
        with pytest.raises(ValueError, match=match):
            BawaSparseConfig.from_config({"quant_method": "bawa-sparse", **bad})
    assert BawaSparseConfig.from_config({"quant_method": "bawa-sparse"}).ignore == []
