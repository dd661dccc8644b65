"""The dense fallback: the 2:4 weight rebuilt once as a dense tensor and run by ``F.linear``.

Used where no sparse kernel can run (the reason is logged once) and for A/B runs
(``BAWA_SPARSE_BACKEND=dense``). It breaks the one-packed-copy rule on purpose: it *is* today's dense path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sparse.format import unpack_24


def supported(device: torch.device, dtype: torch.dtype, n: int, k: int) -> tuple[bool, str]:
    del device, dtype, n, k
    return True, ""


def prepare(values: torch.Tensor, meta: torch.Tensor, n: int):
    from . import DENSE, PackedLinear

    dense = unpack_24(values, meta, validate=False)  # the caller validated the packed form
    return PackedLinear(DENSE, n, dense, torch.empty(0, dtype=torch.uint8, device=dense.device))


def linear(x2: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
           out_features: int, aux: torch.Tensor | None, aux_min_m: int) -> torch.Tensor:
    del meta, out_features, aux, aux_min_m
    return F.linear(x2, values, bias)
