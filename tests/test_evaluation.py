import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bawa_vllm.calibration import evaluation_windows, load_documents
from bawa_vllm.cli.evaluate import main as eval_main
from bawa_vllm.evaluation import streamed_perplexity

from .conftest import EVAL_TEXT, make_config, save_model


@pytest.mark.parametrize("arch,kw", [("llama", {}), ("mistral", {"sliding_window": 8}), ("qwen2", {})])
def test_streamed_equals_full_model(arch, kw, tmp_path, tokenizer_dir):
    src = save_model(make_config(arch, **kw), tmp_path / arch, tokenizer_dir, shard="40KB")
    windows = evaluation_windows(load_documents(str(EVAL_TEXT)), AutoTokenizer.from_pretrained(src), 32,
                                 max_windows=6)
    streamed = streamed_perplexity(str(src), windows, batch_size=4)
    model = AutoModelForCausalLM.from_pretrained(src, attn_implementation="sdpa").eval()
    with torch.no_grad():
        nll = sum(model(w[None], labels=w[None]).loss.item() for w in windows) / len(windows)
    assert streamed["tokens"] == 6 * 31
    assert streamed["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_windows_are_non_overlapping_prefix(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs = load_documents(str(EVAL_TEXT))
    w = evaluation_windows(docs, tok, 50)
    stream = tok("\n\n".join(docs), return_tensors="pt").input_ids[0]
    assert w.shape == (stream.numel() // 50, 50)
    assert torch.equal(w.flatten(), stream[: w.numel()])


def test_eval_cli(tmp_path, llama_dir, capsys):
    """The CLI's perplexity is the full model's on the first 3 windows of 32 tokens, run in batches of 2;
    it prints the JSON it writes."""
    assert eval_main(["--model", str(llama_dir), "--data", str(EVAL_TEXT), "--seqlen", "32", "--max-windows", "3",
                      "--batch-size", "2", "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert json.loads(capsys.readouterr().out) == result
    windows = evaluation_windows(load_documents(str(EVAL_TEXT)), AutoTokenizer.from_pretrained(llama_dir), 32,
                                 max_windows=3)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, attn_implementation="sdpa").eval()
    with torch.no_grad():
        nll = sum(model(w[None], labels=w[None]).loss.item() for w in windows) / len(windows)
    assert result["tokens"] == 3 * 31
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert eval_main(["--model", str(llama_dir), "--data", str(tmp_path / "nope.txt")]) == 2
    assert "not found" in capsys.readouterr().err
