"""Pruning metrics: a score per weight, higher means more important.

All metrics are computed in float32 from the weight ``W`` [C_out, C_in] and ``act_sum_sq`` [C_in],
the per-input-channel sum of squared calibration activations (so ``||X_j||_2 = sqrt(act_sum_sq_j)``).

BaWA (Liu et al., ICML 2025, Eq. 5 as the project reads it)::

    S_ij = |W_ij| * (||W[:, j]||_2^-θ_in + ||W[i, :]||_2^-θ_out) * ||X_j||_2^θ_act

With θ = (0, 0, 1) it orders weights exactly as Wanda, with θ = (0, 0, 0) exactly as magnitude
(the factor 2 is exact in floating point), which the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METRIC_DTYPE = torch.float32
# RIA's sums are clamped here before dividing, so that an all-zero channel gives 0 / tiny = 0, not NaN.
_TINY = torch.finfo(METRIC_DTYPE).tiny


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.to(METRIC_DTYPE).abs()


def wanda_scores(weight: torch.Tensor, act_sum_sq: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (Sun et al., 2024)."""
    return weight.to(METRIC_DTYPE).abs() * act_sum_sq.to(METRIC_DTYPE).sqrt().unsqueeze(0)


def ria_scores(weight: torch.Tensor, act_sum_sq: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    """RIA (Zhang et al., 2024): (|W|/Σ_col|W| + |W|/Σ_row|W|) · ||X_j||_2^power."""
    a = weight.to(METRIC_DTYPE).abs()
    col = a.sum(dim=0, keepdim=True).clamp_min(_TINY)
    row = a.sum(dim=1, keepdim=True).clamp_min(_TINY)
    return (a / col + a / row) * act_sum_sq.to(METRIC_DTYPE).sqrt().pow(power).unsqueeze(0)


@dataclass
class BawaNorms:
    """The θ-independent parts of the BaWA metric of one layer, computed once and reused by the search."""

    abs_weight: torch.Tensor  # [C_out, C_in]
    col_norm: torch.Tensor  # [C_in]   ||W[:, j]||_2, input-channel norm
    row_norm: torch.Tensor  # [C_out]  ||W[i, :]||_2, output-channel norm
    act_norm: torch.Tensor  # [C_in]   ||X_j||_2

    @classmethod
    def of(cls, weight: torch.Tensor, act_sum_sq: torch.Tensor) -> BawaNorms:
        w = weight.to(METRIC_DTYPE)
        return cls(
            abs_weight=w.abs(),
            col_norm=w.norm(dim=0),
            row_norm=w.norm(dim=1),
            act_norm=act_sum_sq.to(METRIC_DTYPE).sqrt(),
        )

    def scores(self, theta_in: float, theta_out: float, theta_act: float) -> torch.Tensor:
        """S at Θ; a weight that is zero, or whose input channel's activation factor is zero, scores 0.

        A zero column or row norm raised to a negative power is +inf (so is a tiny one: clamping the norm
        to the smallest float only moved the overflow to θ > 1), and IEEE 0 · inf is NaN, which
        ``keep_mask`` ranks above every number, so a zero column was kept in every N:M group. A zero
        weight, or one on a dead input channel, costs nothing to prune: its product is read as 0, the
        lowest score, for every Θ. Nonzero weights keep the literal product (+inf at worst, never NaN).
        """
        col = self.col_norm.pow(-theta_in).unsqueeze(0)
        row = self.row_norm.pow(-theta_out).unsqueeze(1)
        act = self.act_norm.pow(theta_act).unsqueeze(0)
        return (self.abs_weight * (col + row) * act).masked_fill((self.abs_weight == 0) | (act == 0), 0.0)


def bawa_scores(weight: torch.Tensor, act_sum_sq: torch.Tensor, theta: tuple[float, float, float]) -> torch.Tensor:
    """BaWA scores for one layer at power factors ``theta = (θ_in, θ_out, θ_act)``."""
    return BawaNorms.of(weight, act_sum_sq).scores(*theta)
