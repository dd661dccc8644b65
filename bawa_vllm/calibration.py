"""Calibration and evaluation text: where it comes from and how it becomes token windows.

Sources: a local ``.txt`` (paragraphs separated by blank lines), ``.jsonl`` / ``.jsonl.gz`` (field
``"text"``), or a Hugging Face ``datasets`` name (``c4`` is the papers' C4 shard
``en/c4-train.00000-of-01024.json.gz``). Calibration follows the papers: random documents longer
than ``seqlen``, one random window each, seeded. Short-document corpora (such as article summaries)
have too few long documents, so then the windows are drawn from the documents joined with blank
lines, tokenised once.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

C4_DATA_FILE = "en/c4-train.00000-of-01024.json.gz"
_DATASET_ALIASES = {
    "c4": ("allenai/c4", {"train": C4_DATA_FILE}, "train", None),
    "wikitext2": ("wikitext", None, "test", "wikitext-2-raw-v1"),
}


def load_documents(source: str, split: str | None = None) -> list[str]:
    """Documents (strings) from a local file or a ``datasets`` name; empty ones are dropped."""
    path = Path(source)
    if path.exists():
        return _read_local(path)
    if path.suffix or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"text file not found: {source}")
    return _read_dataset(source, split)


def _read_local(path: Path) -> list[str]:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        docs = []
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'text' field") from err
    elif name.endswith(".txt"):
        docs = path.read_text(encoding="utf-8").split("\n\n")
    else:
        raise ValueError(f"{path}: unsupported text format; use .txt, .jsonl or .jsonl.gz (field 'text')")
    docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise ValueError(f"{path}: no text in the file")
    return docs


def _read_dataset(name: str, split: str | None) -> list[str]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"{name!r} is neither a local file nor loadable: install `datasets` (pip install 'bawa-vllm[datasets]')"
        ) from err
    repo, data_files, default_split, subset = _DATASET_ALIASES.get(name, (name, None, "train", None))
    ds = datasets.load_dataset(repo, subset, data_files=data_files, split=split or default_split)
    if name == "wikitext2":  # the protocol joins every line, empty ones included
        return list(ds["text"])
    return [t for t in ds["text"] if t and t.strip()]


def calibration_windows(
    documents: list[str], tokenizer, nsamples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """``nsamples`` token windows [nsamples, seqlen], seeded, from ``documents``."""
    rng = random.Random(seed)
    order = list(range(len(documents)))
    rng.shuffle(order)
    windows: list[torch.Tensor] = []
    for idx in order:
        ids = tokenizer(documents[idx], return_tensors="pt").input_ids[0]
        if ids.numel() > seqlen:
            start = rng.randint(0, ids.numel() - seqlen - 1)
            windows.append(ids[start : start + seqlen])
            if len(windows) == nsamples:
                return torch.stack(windows)
    logger.info(
        "only %d documents are longer than %d tokens; drawing %d windows from the joined text instead",
        len(windows), seqlen, nsamples,
    )
    stream = tokenize_joined(documents, tokenizer)
    if stream.numel() < seqlen + 1:
        raise ValueError(
            f"calibration text too short: {stream.numel()} tokens, but one window needs {seqlen + 1}; "
            "give more text or a smaller --seqlen"
        )
    if stream.numel() < nsamples * seqlen:
        logger.warning(
            "calibration text has %d tokens, fewer than nsamples x seqlen = %d: windows will overlap",
            stream.numel(), nsamples * seqlen,
        )
    starts = [rng.randint(0, stream.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([stream[s : s + seqlen] for s in starts])


def tokenize_joined(documents: list[str], tokenizer) -> torch.Tensor:
    """The WikiText-2 protocol: documents joined with blank lines, tokenised once."""
    return tokenizer("\n\n".join(documents), return_tensors="pt").input_ids[0]


def evaluation_windows(documents: list[str], tokenizer, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` over the joined text; the tail shorter than a window is dropped."""
    stream = tokenize_joined(documents, tokenizer)
    n = stream.numel() // seqlen
    if n == 0:
        raise ValueError(f"evaluation text too short: {stream.numel()} tokens, one window needs {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return stream[: n * seqlen].view(n, seqlen)
