"""compressed-tensors sparse-24-bitmask checkpoints (as llm-compressor <= 0.10 wrote them) convert exactly."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bawa_vllm.cli.convert import main as convert_main
from bawa_vllm.cli.export import main as export_main
from bawa_vllm.modeling.checkpoint import Checkpoint
from bawa_vllm.sparse.format import unpack_24

from .conftest import CALIB_TEXT, make_config, save_model


def write_sparse24_bitmask(dense_dir, out):
    """The compressed-tensors layout, written independently with numpy.packbits (bitorder little)."""
    shutil.copytree(dense_dir, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    new_map = {}
    for fname in sorted(set(index["weight_map"].values())):
        tensors = load_file(out / fname)
        result = {}
        for k, v in tensors.items():
            if k.endswith("_proj.weight") and ".layers." in k:
                p = k[: -len(".weight")]
                mask = (v != 0).numpy()
                result[f"{p}.compressed"] = v[v != 0].reshape(v.shape[0], -1).contiguous()
                result[f"{p}.bitmask"] = torch.from_numpy(np.packbits(mask, axis=-1, bitorder="little"))
                result[f"{p}.shape"] = torch.tensor(v.shape).reshape(-1, 1)
            else:
                result[k] = v
        save_file(result, out / fname, metadata={"format": "pt"})
        new_map.update({k: fname for k in result})
    index["weight_map"] = new_map
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "version": "0.9.4",
                                  "sparsity_config": {"format": "sparse-24-bitmask", "global_sparsity": 0.45,
                                                      "sparsity_structure": "2:4", "targets": ["Linear"],
                                                      "ignore": ["lm_head"]}}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_convert_round_trip(tmp_path, tokenizer_dir):
    src = save_model(make_config("qwen2"), tmp_path / "src", tokenizer_dir, dtype=torch.bfloat16, shard="40KB")
    dense = tmp_path / "dense"
    assert export_main(["--model", str(src), "--out", str(dense), "--method", "wanda", "--sparsity", "2:4",
                        "--calib", str(CALIB_TEXT), "--nsamples", "4", "--seqlen", "16", "--format", "dense"]) == 0
    ct = write_sparse24_bitmask(dense, tmp_path / "ct")
    out = tmp_path / "converted"
    assert convert_main(["--model", str(ct), "--out", str(out)]) == 0
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "bawa-sparse" and q["ignore"] == ["lm_head"]
    conv, ref = Checkpoint(out), Checkpoint(dense)
    for key in ref.weight_map:
        if key.endswith("_proj.weight") and ".layers." in key:
            m = key[: -len(".weight")]
            t = conv.read([f"{m}.weight_values", f"{m}.weight_meta"])
            assert torch.equal(unpack_24(t[f"{m}.weight_values"], t[f"{m}.weight_meta"]), ref.read([key])[key])
        else:
            assert torch.equal(conv.read([key])[key], ref.read([key])[key])


def test_refuses_other_checkpoints(tmp_path, capsys, llama_dir):
    assert convert_main(["--model", str(llama_dir), "--out", str(tmp_path / "o")]) == 2
    assert "not a compressed-tensors sparse-24-bitmask checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_quantized_sparse_refused(tmp_path, capsys, llama_dir):
    d = tmp_path / "q"
    shutil.copytree(llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {}},
                                  "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4"}}
    (d / "config.json").write_text(json.dumps(cfg))
    assert convert_main(["--model", str(d), "--out", str(tmp_path / "o")]) == 2
    assert "quantized sparse-24 checkpoints" in capsys.readouterr().err


def test_bitmask_value_count_mismatch():
    from bawa_vllm.sparse.compressed_tensors import bitmask_to_dense

    with pytest.raises(ValueError, match="bitmask marks 2 values"):
        bitmask_to_dense(torch.ones(1, 3), torch.tensor([[0b11]], dtype=torch.uint8), torch.tensor([[1], [8]]), "p")
