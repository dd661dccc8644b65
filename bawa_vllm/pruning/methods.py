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
from .metrics import BawaNorms, magnitude_scores, ria_scores, wanda_scores
from .reconstruction import admm_update, awp_pgd, sparsegpt
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
    gram: dict[str, torch.Tensor] | None = None  # name -> XᵀX (fp32), for methods with needs_gram
    n_tokens: int = 0
    # loss(masks, window indices or None for all) -> block loss with those masks applied
    loss: Callable[[dict[str, torch.Tensor], torch.Tensor | None], float] | None = None


@dataclass
class BlockMasks:
    masks: dict[str, torch.Tensor]
    theta: dict[str, list[float]] = field(default_factory=dict)
    search: dict | None = None  # initial/best loss, epochs, steps
    weights: dict[str, torch.Tensor] | None = None  # updated (reconstructed) weights, already sparse


class PruningMethod(ABC):
    name: str
    needs_calibration: bool = True
    needs_gram: bool = False  # the engine then accumulates XᵀX per target

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


class Ria(PruningMethod):
    """Relative importance and activations (Zhang et al., 2024), per-row masks."""

    name = "ria"

    def __init__(self, power: float = 0.5):
        self.power = power

    def prune_block(self, job: BlockJob) -> BlockMasks:
        return BlockMasks({n: keep_mask(ria_scores(w, job.act_sum_sq[n], self.power), job.pattern, n)
                           for n, w in job.dense.items()})


class SparseGPT(PruningMethod):
    """OBS prune-and-update (Frantar & Alistarh, 2023): its own masks and weights."""

    name = "sparsegpt"
    needs_gram = True

    def __init__(self, blocksize: int = 128, damp: float = 0.01):
        self.blocksize, self.damp = blocksize, damp

    def prune_block(self, job: BlockJob) -> BlockMasks:
        masks, weights = {}, {}
        for n, w in job.dense.items():
            weights[n], masks[n] = sparsegpt(w, job.gram[n], job.pattern, self.blocksize, self.damp)
        return BlockMasks(masks, weights=weights)


class Awp(PruningMethod):
    """AWP as a pruning method: projected gradient descent onto the sparsity set, from another method's mask."""

    name = "awp"
    needs_gram = True

    def __init__(self, init: PruningMethod, iters: int = 200, tol: float = 1e-5):
        self.init, self.iters, self.tol = init, iters, tol
        self.search = getattr(init, "search", None)

    def prune_block(self, job: BlockJob) -> BlockMasks:
        start = self.init.prune_block(job)
        masks, weights = {}, {}
        for n, w in job.dense.items():
            weights[n], masks[n] = awp_pgd(w, job.gram[n], job.n_tokens, pattern=job.pattern,
                                           init=w.masked_fill(~start.masks[n], 0.0), iters=self.iters, tol=self.tol)
        return BlockMasks(masks, start.theta, start.search, weights)


class Reconstructed(PruningMethod):
    """Any mask method followed by a weight update on its fixed masks (ADMM or AWP's PGD)."""

    needs_gram = True

    def __init__(self, base: PruningMethod, kind: str, iters: int | None = None, **options):
        if kind not in RECONSTRUCTIONS[1:]:
            raise ValueError(f"unknown reconstruction {kind!r}; choose one of {', '.join(RECONSTRUCTIONS)}")
        self.base, self.kind, self.iters, self.options = base, kind, iters, options
        self.name = f"{base.name}+{kind}"
        self.search = getattr(base, "search", None)

    def prune_block(self, job: BlockJob) -> BlockMasks:
        result = self.base.prune_block(job)
        weights = {}
        kw = {**({"iters": self.iters} if self.iters is not None else {}), **self.options}
        for n, w in job.dense.items():
            start = result.weights[n] if result.weights else w
            if self.kind == "admm":
                weights[n] = admm_update(start, result.masks[n], job.gram[n], **kw)
            else:
                weights[n], _ = awp_pgd(start, job.gram[n], job.n_tokens, mask=result.masks[n], **kw)
        result.weights = weights
        return result


def make_method(name: str, search: SearchConfig | None = None, reconstruct: str = "none",
                awp_init: str = "wanda", iters: int | None = None) -> PruningMethod:
    """``search`` applies to BaWA (``None`` = ``--no-search``); ``reconstruct`` wraps any mask method."""
    if name == "magnitude":
        method = Magnitude()
    elif name == "wanda":
        method = Wanda()
    elif name == "bawa":
        method = Bawa(search)
    elif name == "ria":
        method = Ria()
    elif name == "sparsegpt":
        method = SparseGPT()
    elif name == "awp":
        if awp_init not in ("wanda", "bawa"):
            raise ValueError(f"--awp-init {awp_init!r}: choose wanda or bawa")
        method = Awp(make_method(awp_init, search), **({"iters": iters} if iters else {}))
    else:
        raise ValueError(f"unknown pruning method {name!r}; choose one of {', '.join(METHODS)}")
    if reconstruct != "none":
        if name in ("sparsegpt", "awp"):
            raise ValueError(f"--reconstruct applies to mask methods; {name} already updates the weights")
        method = Reconstructed(method, reconstruct, iters)
    return method


METHODS = ("magnitude", "wanda", "bawa", "ria", "sparsegpt", "awp")
RECONSTRUCTIONS = ("none", "admm", "awp")
