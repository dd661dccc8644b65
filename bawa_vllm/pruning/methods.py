"""Pruning methods, one class per algorithm, all driven by the same block-sequential engine.

A method sees one block at a time through a :class:`BlockJob` (its target linears, their dense
weights, the calibration statistics and a block-loss oracle) and returns a mask per target.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .masks import SparsityPattern, keep_mask
from .metrics import BawaNorms, magnitude_scores, wanda_scores
from .search import SearchConfig, zeroth_order_search

BAWA_INIT_THETA = (1.0, 1.0, 0.5)


@dataclass
class BlockJob:
    """What a method may use to prune one block."""

    index: int
    targets: dict[str, nn.Linear]  # name inside the block -> module
    dense: dict[str, torch.Tensor]  # name -> the unpruned weight (the modules may be overwritten)
    act_sum_sq: dict[str, torch.Tensor]  # name -> per-input-channel sum of squared inputs (fp32)
    pattern: SparsityPattern
    n_samples: int
    # loss(masks, window indices or None for all) -> block loss with those masks applied
    loss: Callable[[dict[str, torch.Tensor], torch.Tensor | None], float] | None = None


@dataclass
class BlockMasks:
    masks: dict[str, torch.Tensor]
    theta: dict[str, list[float]] = field(default_factory=dict)
    search: dict | None = None  # initial/best loss, epochs, steps


class PruningMethod(ABC):
    name: str
    needs_calibration: bool = True

    @abstractmethod
    def prune_block(self, job: BlockJob) -> BlockMasks: ...


class Magnitude(PruningMethod):
    """|W|: needs no calibration data."""

    name = "magnitude"
    needs_calibration = False

    def prune_block(self, job: BlockJob) -> BlockMasks:
        return BlockMasks({n: keep_mask(magnitude_scores(w), job.pattern, n) for n, w in job.dense.items()})


class Wanda(PruningMethod):
    """|W_ij| * ||X_j||_2 (Sun et al., 2024)."""

    name = "wanda"

    def prune_block(self, job: BlockJob) -> BlockMasks:
        return BlockMasks({
            n: keep_mask(wanda_scores(w, job.act_sum_sq[n]), job.pattern, n) for n, w in job.dense.items()
        })


class Bawa(PruningMethod):
    """BaWA: magnitude normalisation + outlier regularisation, with Θ searched per layer per block."""

    name = "bawa"

    def __init__(self, search: SearchConfig | None = None, init: tuple[float, float, float] = BAWA_INIT_THETA):
        self.search = search  # None: keep the initial Θ (--no-search)
        self.init = init

    def prune_block(self, job: BlockJob) -> BlockMasks:
        names = list(job.dense)
        norms = {n: BawaNorms.of(job.dense[n], job.act_sum_sq[n]) for n in names}

        def masks_at(theta: torch.Tensor) -> dict[str, torch.Tensor]:
            return {n: keep_mask(norms[n].scores(*theta[k].tolist()), job.pattern, n) for k, n in enumerate(names)}

        theta0 = torch.tensor([self.init] * len(names), dtype=torch.float64)
        info = None
        theta = theta0
        if self.search is not None and job.loss is not None:
            result = zeroth_order_search(
                lambda th, idx: job.loss(masks_at(th), idx), theta0, job.n_samples, self.search,
                desc=f"search block {job.index}",
            )
            theta = result.theta
            info = {"initial_loss": result.initial_loss, "best_loss": result.best_loss,
                    "epoch_losses": result.epoch_losses, "steps": result.steps}
        return BlockMasks(masks_at(theta), {n: [round(v, 6) for v in theta[k].tolist()] for k, n in enumerate(names)},
                          info)


def make_method(name: str, search: SearchConfig | None = None) -> PruningMethod:
    """``search`` applies to BaWA only (``None`` = ``--no-search``)."""
    if name == "magnitude":
        return Magnitude()
    if name == "wanda":
        return Wanda()
    if name == "bawa":
        return Bawa(search)
    raise ValueError(f"unknown pruning method {name!r}; choose one of {', '.join(METHODS)}")


METHODS = ("magnitude", "wanda", "bawa")
