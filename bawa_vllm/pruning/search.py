"""Zeroth-order search of BaWA's power factors Θ for one block (SPSA / MeZO two-point estimate).

The masks are a top-k of the metric, so the block loss is piecewise constant in Θ and has no
usable gradient; the two-point estimate ``g = (L(Θ+εz) − L(Θ−εz)) / (2ε) · z`` with
``z ~ N(0, I)`` drives plain SGD.

Step scaling (the issue this module answers): the raw loss's scale depends on the hidden size,
the block and the model, so a fixed ``lr`` means a different step everywhere (summed over the
hidden dimension, lr 0.2 overshoots; averaged over elements, Θ hardly moves). The search therefore
minimises the loss *relative to the initial Θ's loss on the whole calibration set*: ``L(Θ)/L(Θ0)``
starts at 1 in every block, so ``lr`` reads as "Θ change per unit of relative loss slope" and the
paper's lr 0.2 transfers across models. Each update is also clipped to a trust region
(``max_step`` per coordinate), because one noisy two-point estimate in 3m dimensions can otherwise
throw Θ far from where the estimate was valid.

Stopping: after every epoch the candidate is scored on the whole calibration set, and the best
Θ seen (the initial one included) is returned, so the search never hands back a Θ whose
calibration loss is worse than the initial one. ``patience`` epochs without improvement stop it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor | None], float]


@dataclass
class SearchConfig:
    """Paper defaults: ε 0.01, lr 0.2, batch 16 calibration windows, 2 epochs."""

    epochs: int = 2
    batch_size: int = 16
    lr: float = 0.2
    eps: float = 0.01
    max_step: float = 0.1
    patience: int = 2
    holdout: float = 0.25
    seed: int = 0

    def __post_init__(self):
        if (self.epochs < 0 or self.batch_size < 1 or self.eps <= 0 or self.lr < 0 or self.max_step <= 0
                or not 0 <= self.holdout < 1):
            raise ValueError(f"invalid search settings: {self}")


@dataclass
class SearchResult:
    theta: torch.Tensor  # [m, 3]: the best Θ seen
    initial_loss: float
    best_loss: float
    epoch_losses: list[float] = field(default_factory=list)  # full-calibration loss after each epoch
    steps: int = 0


def zeroth_order_search(loss_fn: LossFn, theta0: torch.Tensor, n_samples: int, cfg: SearchConfig,
                        desc: str = "search") -> SearchResult:
    """Minimise ``loss_fn(Θ, window_indices)`` over Θ from ``theta0``; ``None`` indices = all windows."""
    gen = torch.Generator().manual_seed(cfg.seed)
    theta = theta0.detach().to(torch.float64).clone()
    perm = torch.randperm(n_samples, generator=gen)
    n_val = int(n_samples * cfg.holdout) if n_samples >= 4 else 0
    val, train = perm[:n_val], perm[n_val:]

    def score(th: torch.Tensor) -> tuple[float, float]:
        """(selection loss, full-calibration loss): held-out windows select, all windows guarantee."""
        if n_val == 0:
            full = loss_fn(th, None)
            return full, full
        lv, lt = loss_fn(th, val), loss_fn(th, train)
        return lv, (lv * n_val + lt * train.numel()) / n_samples

    initial_sel, initial = score(theta)
    result = SearchResult(theta=theta.clone(), initial_loss=initial, best_loss=initial)
    if initial == 0.0 or cfg.epochs == 0:
        return result
    best_sel = initial_sel
    batches_per_epoch = max(1, train.numel() // cfg.batch_size)
    stale = 0
    bar = tqdm(total=cfg.epochs * batches_per_epoch, desc=desc, leave=False, disable=None)
    for _epoch in range(cfg.epochs):
        order = train[torch.randperm(train.numel(), generator=gen)]
        for b in range(batches_per_epoch):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            z = torch.randn(theta.shape, generator=gen, dtype=theta.dtype)
            plus = loss_fn(theta + cfg.eps * z, idx)
            minus = loss_fn(theta - cfg.eps * z, idx)
            grad = (plus - minus) / (2 * cfg.eps * initial) * z
            theta -= (cfg.lr * grad).clamp(-cfg.max_step, cfg.max_step)
            result.steps += 1
            bar.update(1)
        sel, full = score(theta)
        result.epoch_losses.append(full)
        if sel < best_sel and full <= initial:
            best_sel, result.best_loss, result.theta, stale = sel, full, theta.clone(), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
        bar.set_postfix(rel=f"{result.best_loss / initial:.4f}")
    bar.close()
    return result
