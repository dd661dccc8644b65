"""Bad input gets one clear error line (exit status 2) and leaves nothing behind."""

from __future__ import annotations

import json

import pytest

from bawa_vllm.cli.export import main as export_main
from bawa_vllm.pruning import engine

from .conftest import CALIB_TEXT, make_config, save_model


def _run(model, out, *extra):
    return export_main(["--model", str(model), "--out", str(out), "--calib", str(CALIB_TEXT),
                        "--nsamples", "4", "--seqlen", "16", *extra])


def _assert_clean(parent, out):
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary dir left behind"


def _fails(capsys, tmp_path, model, match, *extra, out_name="out"):
    out = tmp_path / out_name
    assert _run(model, out, *extra) == 2
    err = capsys.readouterr().err
    assert match in err, err
    _assert_clean(tmp_path, out)


def test_missing_model_dir(tmp_path, capsys):
    _fails(capsys, tmp_path, tmp_path / "nope", "model directory not found")


def test_no_weights(tmp_path, capsys, llama_dir):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text((llama_dir / "config.json").read_text())
    _fails(capsys, tmp_path, d, "no model.safetensors")


def test_missing_shard(tmp_path, capsys, tokenizer_dir):
    src = save_model(make_config("llama"), tmp_path / "src", tokenizer_dir, shard="40KB")
    next(src.glob("model-00002-*.safetensors")).unlink()
    _fails(capsys, tmp_path, src, "shard files named by model.safetensors.index.json are missing")


def test_unsupported_architecture(tmp_path, capsys, tokenizer_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=512)).save_pretrained(d)
    _fails(capsys, tmp_path, d, "unsupported architecture model_type='gpt2'; supported are llama, mistral, qwen2")


@pytest.mark.parametrize("spec", ["abc", "3:2", "1.5"])
def test_bad_sparsity(spec, tmp_path, capsys, llama_dir):
    _fails(capsys, tmp_path, llama_dir, "sparsity", "--sparsity", spec)


def test_nm_does_not_divide(tmp_path, capsys, tokenizer_dir):
    src = save_model(make_config("llama", hidden=36, intermediate_size=72, num_attention_heads=2, num_key_value_heads=1), tmp_path / "src", tokenizer_dir)
    _fails(capsys, tmp_path, src, "self_attn.q_proj.weight: 4:8 sparsity needs the input dimension to divide by 8, got 36",
           "--sparsity", "4:8")


def test_too_little_calibration_text(tmp_path, capsys, llama_dir):
    short = tmp_path / "short.txt"
    short.write_text("Hello world.\n\nA second tiny paragraph.\n")
    out = tmp_path / "out"
    assert export_main(["--model", str(llama_dir), "--out", str(out), "--calib", str(short),
                        "--seqlen", "64", "--method", "wanda"]) == 2
    assert "calibration text too short" in capsys.readouterr().err
    _assert_clean(tmp_path, out)


def test_missing_calibration(tmp_path, capsys, llama_dir):
    out = tmp_path / "out"
    assert export_main(["--model", str(llama_dir), "--out", str(out), "--method", "bawa"]) == 2
    assert "needs calibration text" in capsys.readouterr().err
    _assert_clean(tmp_path, out)
    _fails(capsys, tmp_path, llama_dir, "text file not found", "--calib", str(tmp_path / "missing.txt"))


def test_bad_jsonl(tmp_path, capsys, llama_dir):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    _fails(capsys, tmp_path, llama_dir, "c.jsonl:2: expected a JSON object with a 'text' field",
           "--calib", str(bad), "--method", "wanda")


def test_existing_out_refused_then_overwritten(tmp_path, capsys, llama_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _run(llama_dir, out, "--method", "magnitude") == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert _run(llama_dir, out, "--method", "magnitude", "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "bawa_report.json").exists()


@pytest.mark.slow  # four exports
def test_failure_mid_run_leaves_no_output_and_resumes(tmp_path, llama_dir, monkeypatch):
    """An interrupted run leaves no OUT, only its progress in .OUT.partial, which --resume finishes."""
    calls = {"n": 0}
    real = engine._prune_block

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in block 1
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_prune_block", failing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _run(llama_dir, out, "--method", "wanda")
    assert not out.exists() and (tmp_path / ".out.partial" / "progress.json").exists()
    monkeypatch.setattr(engine, "_prune_block", real)
    assert _run(llama_dir, out, "--method", "bawa", "--resume") == 2  # other arguments: refused, partial kept
    assert _run(llama_dir, out, "--method", "wanda", "--resume") == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert not (out / "progress.json").exists() and not list(out.glob("calibration_state*"))
    assert _run(llama_dir, tmp_path / "ref", "--method", "wanda") == 0
    for f in sorted(p.name for p in (tmp_path / "ref").iterdir()):
        if f != "bawa_report.json":  # the report holds timings
            assert (out / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f


def test_resume_without_partial_starts_over(tmp_path, caplog, llama_dir):
    """--resume is safe on every retry of a job: with nothing to resume it runs the export from the start."""
    with caplog.at_level("INFO"):
        assert _run(llama_dir, tmp_path / "out", "--method", "wanda", "--resume") == 0
    assert "no unfinished export" in caplog.text and "starting from the first block" in caplog.text
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_jsonl_gz_calibration(tmp_path, llama_dir):
    """50 paragraphs as .jsonl.gz prune exactly as the same paragraphs as .txt, and not as the whole file."""
    import gzip

    paragraphs = CALIB_TEXT.read_text().split("\n\n")[:50]
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for para in paragraphs:
            f.write(json.dumps({"text": para}) + "\n")
    (tmp_path / "c.txt").write_text("\n\n".join(paragraphs))
    for name, calib in (("gz", path), ("txt", tmp_path / "c.txt"), ("all", CALIB_TEXT)):
        assert _run(llama_dir, tmp_path / name, "--method", "wanda", "--format", "dense", "--calib", str(calib)) == 0

    def weights(out):
        return {f.name: f.read_bytes() for f in out.glob("*.safetensors")}

    assert weights(tmp_path / "gz") == weights(tmp_path / "txt")
    assert weights(tmp_path / "gz") != weights(tmp_path / "all")
