"""Sparsity patterns and the masks that realise them from a score matrix.

A mask is a bool tensor shaped like the weight, ``True`` where the weight is *kept*. Scores are
compared within one output row (unstructured: every row loses the same fraction, as Wanda does) or
within each group of M consecutive input channels of a row (N:M: keep the N largest of every M).
Ties are broken by position, as a stable sort would (the lower input channel is pruned first in a row and
kept first in a group), so that two metrics that order the weights identically give identical masks.

Why no sort: the Θ search builds thousands of masks per model, and a stable sort of every row was 40 % of
a BaWA export's time on SmolLM2-135M. A row's k-th smallest score (a selection, linear in the row) and an
N:M group's ranks (M passes of comparisons) give the same masks several times faster.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsityPattern:
    """Either an unstructured per-row ratio of pruned weights, or N kept out of every M."""

    ratio: float
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    @property
    def is_24(self) -> bool:
        return (self.n, self.m) == (2, 4)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:g}"

    @classmethod
    def parse(cls, text: str | float) -> SparsityPattern:
        """Read ``"2:4"``, ``"4:8"``, ``"0.5"`` or ``"50%"``; anything else is a ``ValueError``."""
        s = str(text).strip()
        match = _NM.match(s)
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            if not 0 < n < m:
                raise ValueError(f"sparsity {s!r}: N:M needs 0 < N < M (N weights kept of every M)")
            return cls(ratio=1.0 - n / m, n=n, m=m)
        try:
            ratio = float(s[:-1]) / 100 if s.endswith("%") else float(s)
        except ValueError:
            raise ValueError(
                f"sparsity {s!r} does not parse: give a pruned fraction such as 0.5 or 70%, or N:M such as 2:4"
            ) from None
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"sparsity {s!r}: the pruned fraction must lie strictly between 0 and 1")
        return cls(ratio=ratio)

    def check_shape(self, in_features: int, name: str = "weight") -> None:
        """N:M groups run along the input dimension, so it must divide by M."""
        if self.is_nm and in_features % self.m:
            raise ValueError(
                f"{name}: {self} sparsity needs the input dimension to divide by {self.m}, got {in_features}"
            )


def keep_mask(scores: torch.Tensor, pattern: SparsityPattern, name: str = "weight") -> torch.Tensor:
    """The mask that keeps the highest-scoring weights of ``scores`` [C_out, C_in] under ``pattern``."""
    if scores.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D score matrix, got shape {tuple(scores.shape)}")
    rows, cols = scores.shape
    pattern.check_shape(cols, name)
    if scores.isnan().any():  # NaN ranks above every number, as in torch.sort; the fast paths do not see it
        return _keep_mask_by_sort(scores, pattern)
    if pattern.is_nm:
        return _keep_nm(scores, pattern.n, pattern.m)
    n_pruned = int(cols * pattern.ratio)
    if n_pruned == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    # the n_pruned-th smallest score of each row; everything below it goes, and of the scores equal to it,
    # the first ones by position until n_pruned are gone
    threshold = torch.kthvalue(scores, n_pruned, dim=1, keepdim=True).values
    tied = scores == threshold
    if int(tied.sum()) == rows:  # the threshold is unique in every row: the rest of the row is kept
        return scores > threshold
    below = scores < threshold
    room = n_pruned - below.sum(dim=1, keepdim=True)
    return ~(below | (tied & (tied.cumsum(dim=1) <= room)))


def _keep_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M by ranks: an entry is kept if fewer than N of its group come before it in a stable descending
    order (a larger score, or an equal one at a lower position). The groups are laid out position-major
    ([M, groups]), so that each of the M passes compares whole contiguous rows."""
    rows, cols = scores.shape
    by_pos = scores.reshape(-1, m).t().contiguous()  # [m, groups]
    rank = torch.zeros(by_pos.shape, dtype=torch.uint8, device=scores.device)
    for j in range(m):
        ahead = by_pos[j : j + 1] > by_pos  # entry j outranks these
        ahead[j + 1 :] |= by_pos[j : j + 1] == by_pos[j + 1 :]  # and wins ties against later positions
        rank += ahead
    return (rank < n).t().reshape(rows, cols)


def _keep_mask_by_sort(scores: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """The reference definition of :func:`keep_mask` by stable sorts (slow; used where scores hold NaN)."""
    rows, cols = scores.shape
    if pattern.is_nm:
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)
        order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., : pattern.n]
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
        return mask.reshape(rows, cols)
    order = torch.sort(scores, dim=-1, stable=True).indices[:, : int(cols * pattern.ratio)]
    return torch.ones_like(scores, dtype=torch.bool).scatter_(1, order, False)


def apply_mask_(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the pruned weights in place with +0.0 (``W * mask`` would leave -0.0 for negative weights)."""
    return weight.masked_fill_(~mask, 0.0)
