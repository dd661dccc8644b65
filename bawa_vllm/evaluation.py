"""Perplexity, streamed block by block so that it runs on models larger than memory.

WikiText-2 protocol: the test text joined with blank lines, tokenised once, cut into
non-overlapping windows of ``seqlen``; perplexity is exp of the mean next-token NLL over every
predicted token. Hidden states stay in the model dtype between blocks, as in the full model, so
the result equals a full-model evaluation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .modeling.decoder import StreamedDecoder


@torch.no_grad()
def streamed_perplexity(model: str, windows: torch.Tensor, device: str = "cpu", dtype: str | None = None,
                        batch_size: int = 8) -> dict:
    decoder = StreamedDecoder(model, dtype=dtype, device=device)
    hidden = decoder.embed(windows)
    for i in tqdm(range(decoder.num_layers), desc="eval blocks", leave=False, disable=None):
        layer = decoder.load_block(i)
        for s in range(0, hidden.shape[0], batch_size):
            hidden[s : s + batch_size] = decoder.run_block(layer, i, hidden[s : s + batch_size])
        del layer
    norm, head = decoder.head()
    nll, count = 0.0, 0
    targets = windows.to(decoder.device)
    for s in range(hidden.shape[0]):
        logits = F.linear(norm(hidden[s]), head).float()
        nll += F.cross_entropy(logits[:-1], targets[s, 1:], reduction="sum").item()
        count += targets.shape[1] - 1
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count,
            "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1])}
