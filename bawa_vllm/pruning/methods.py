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
from .search import (BAWA_INIT_THETA, MAGNITUDE_THETA, WANDA_THETA, SearchConfig, ThetaInit, coarse_search,
                     line_search, zeroth_order_search)

# ADMM iterations (of 20) that re-select the mask, as Boža 2024's gradual variant does (15 of 20): the last
# ones settle the weights on the final mask.
ADMM_RESELECT = 15


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
    # loss(masks, window indices or None for all) -> block loss of each of those windows with the masks applied
    loss: Callable[[dict[str, torch.Tensor], torch.Tensor | None], torch.Tensor] | None = None


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
    needs_block_loss: bool = False  # the engine then carries what the block-loss oracle compares with

    def check_targets(self, names: list[str]) -> None:
        """Called with the block's linear names before any work, to reject settings that name none of them;
        methods without such settings accept any."""

    @abstractmethod
    def prune_block(self, job: BlockJob) -> BlockMasks: ...

    def metric(self, job: BlockJob, name: str, result: BlockMasks) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """This method's score of linear ``name`` as a function of a weight (the calibration statistics and
        Θ of ``result`` fixed), so that a weight update can re-select the mask by it; None where the method
        has no such score."""
        return None


class Magnitude(PruningMethod):
    """|W|: needs no calibration data."""

    name = "magnitude"
    needs_calibration = False

    def prune_block(self, job: BlockJob) -> BlockMasks:
        return BlockMasks({n: keep_mask(magnitude_scores(w), job.pattern, n) for n, w in job.dense.items()})

    def metric(self, job: BlockJob, name: str, result: BlockMasks) -> Callable[[torch.Tensor], torch.Tensor]:
        return magnitude_scores


class Wanda(PruningMethod):
    """|W_ij| * ||X_j||_2 (Sun et al., 2024)."""

    name = "wanda"

    def prune_block(self, job: BlockJob) -> BlockMasks:
        return BlockMasks({
            n: keep_mask(wanda_scores(w, job.act_sum_sq[n]), job.pattern, n) for n, w in job.dense.items()
        })

    def metric(self, job: BlockJob, name: str, result: BlockMasks) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda w: wanda_scores(w, job.act_sum_sq[name])


_MIN_COARSE_ROWS = 64  # fewer rows estimate the layer error too noisily to rank Θ candidates


class Bawa(PruningMethod):
    """BaWA: magnitude normalisation + outlier regularisation, with Θ searched per layer per block.

    The search has three stages (each can be switched off in :class:`SearchConfig`): the coarse stage
    picks each linear's Θ by its layer-output error from the Gram matrix (no block forward, see
    :func:`coarse_search`); the line stage moves the whole block's Θ along the segment towards the initial
    Θ as far as the block loss on held-out windows says, window by window (:func:`line_search`, a few
    forwards of a quarter of the windows); the zeroth-order steps (off by default) refine all of the block's
    Θ together against the block loss, which needs many block forwards.
    """

    name = "bawa"

    def __init__(self, search: SearchConfig | None = None,
                 init: ThetaInit | tuple[float, float, float] = BAWA_INIT_THETA):
        self.search = search  # None: keep the initial Θ (--no-search)
        self.theta_init = init if isinstance(init, ThetaInit) else ThetaInit(default=tuple(init))

    @property
    def needs_block_loss(self) -> bool:
        """Only the line and zeroth-order stages run block forwards with candidate masks."""
        return self.search is not None and (self.search.epochs > 0 or self._line_stage)

    @property
    def _line_stage(self) -> bool:
        return self.search.line_points > 1 and self.search.coarse_evals > 0

    def check_targets(self, names: list[str]) -> None:
        self.theta_init.check_names(names)

    def prune_block(self, job: BlockJob) -> BlockMasks:
        names = list(job.dense)
        norms = {n: BawaNorms.of(job.dense[n], job.act_sum_sq[n]) for n in names}

        def mask_of(n: str, theta) -> torch.Tensor:
            return keep_mask(norms[n].scores(*theta), job.pattern, n)

        def masks_at(theta: torch.Tensor) -> dict[str, torch.Tensor]:
            return {n: mask_of(n, theta[k].tolist()) for k, n in enumerate(names)}

        theta = torch.tensor([self.theta_init.for_layer(n) for n in names], dtype=torch.float64)
        info: dict | None = None
        if self.search is not None and self.search.coarse_evals > 0 and job.gram is not None:
            info = {"coarse": {}}
            for k, n in enumerate(names):
                res = self._coarse(job, n, norms[n], tuple(theta[k].tolist()), k)
                theta[k] = torch.tensor(res.theta, dtype=torch.float64)
                wanda = res.seed_errors["wanda"]
                info["coarse"][n] = {"evals": res.evals,
                                     "error_vs_wanda": round(res.error / wanda, 6) if wanda else None}
        if info is not None and self._line_stage and job.loss is not None:
            init = torch.tensor([self.theta_init.for_layer(n) for n in names], dtype=torch.float64)
            line = line_search(lambda th, idx: job.loss(masks_at(th), idx), theta, init, job.n_samples, self.search)
            theta = line.theta
            info["line"] = {"t": line.t, "losses": line.losses}
        if self.search is not None and self.search.epochs > 0 and job.loss is not None:
            result = zeroth_order_search(
                lambda th, idx: float(job.loss(masks_at(th), idx).mean()), theta, job.n_samples, self.search,
                desc=f"search block {job.index}",
            )
            theta = result.theta
            info = {**(info or {}), "initial_loss": result.initial_loss, "best_loss": result.best_loss,
                    "epoch_losses": result.epoch_losses, "steps": result.steps}
        # Θ in full precision: the report's values must reproduce these masks exactly (a rounded Θ can flip
        # near-tied weights of a group).
        return BlockMasks(masks_at(theta), {n: theta[k].tolist() for k, n in enumerate(names)},
                          info)

    def metric(self, job: BlockJob, name: str, result: BlockMasks) -> Callable[[torch.Tensor], torch.Tensor]:
        """BaWA's score at the Θ this block's search found for ``name``; the norms are the given weight's."""
        return lambda w: BawaNorms.of(w, job.act_sum_sq[name]).scores(*result.theta[name])

    def _coarse(self, job: BlockJob, name: str, norms: BawaNorms, init: tuple[float, float, float], k: int):
        """The coarse stage for one linear: its layer-output error ||(W − Ŵ)X||² = Σ_rows δ G δᵀ, estimated
        during the search on a fixed, seeded subset of the output rows (masks are per row, so a row's mask
        and error do not depend on the others), then confirmed on all rows."""
        weight, gram = job.dense[name].float(), job.gram[name]
        n_rows = weight.shape[0]
        subset = min(n_rows, max(_MIN_COARSE_ROWS, round(n_rows * self.search.coarse_rows)))
        gen = torch.Generator().manual_seed(self.search.seed * 1_000_003 + job.index * 101 + k)
        rows = torch.randperm(n_rows, generator=gen)[:subset].sort().values
        part = BawaNorms(norms.abs_weight[rows], norms.col_norm, norms.row_norm[rows], norms.act_norm)
        part_weight = weight[rows]

        def error(th, norms=norms, weight=weight) -> float:
            removed = weight.masked_fill(keep_mask(norms.scores(*th), job.pattern, name), 0.0)  # ΔW = W − Ŵ
            return float(torch.mm(removed, gram).mul_(removed).sum())

        seeds = {"wanda": WANDA_THETA, "init": init, "magnitude": MAGNITUDE_THETA}
        estimate = (lambda th: error(th, part, part_weight)) if subset < n_rows else error
        return coarse_search(estimate, seeds, self.search.coarse_evals, self.search.coarse_steps,
                             confirm_fn=error if subset < n_rows else None)


class Ria(PruningMethod):
    """Relative importance and activations (Zhang et al., 2024), per-row masks."""

    name = "ria"

    def __init__(self, power: float = 0.5):
        self.power = power

    def prune_block(self, job: BlockJob) -> BlockMasks:
        return BlockMasks({n: keep_mask(ria_scores(w, job.act_sum_sq[n], self.power), job.pattern, n)
                           for n, w in job.dense.items()})

    def metric(self, job: BlockJob, name: str, result: BlockMasks) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda w: ria_scores(w, job.act_sum_sq[name], self.power)


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
        self.theta_init = getattr(init, "theta_init", None)
        self.needs_block_loss = init.needs_block_loss

    def check_targets(self, names: list[str]) -> None:
        self.init.check_targets(names)

    def prune_block(self, job: BlockJob) -> BlockMasks:
        start = self.init.prune_block(job)
        masks, weights = {}, {}
        for n, w in job.dense.items():
            weights[n], masks[n] = awp_pgd(w, job.gram[n], job.n_tokens, pattern=job.pattern,
                                           init=w.masked_fill(~start.masks[n], 0.0), iters=self.iters, tol=self.tol)
        return BlockMasks(masks, start.theta, start.search, weights)


class Reconstructed(PruningMethod):
    """Any mask method followed by a weight update: ADMM, which re-selects the mask by the method's own metric
    in its first ``reselect`` iterations (0: the mask stays fixed), or AWP's PGD on the fixed mask."""

    needs_gram = True

    def __init__(self, base: PruningMethod, kind: str, iters: int | None = None, reselect: int = ADMM_RESELECT,
                 **options):
        if kind not in RECONSTRUCTIONS[1:]:
            raise ValueError(f"unknown reconstruction {kind!r}; choose one of {', '.join(RECONSTRUCTIONS)}")
        if reselect < 0:
            raise ValueError(f"--admm-reselect must be 0 or more, got {reselect}")
        self.base, self.kind, self.iters, self.options = base, kind, iters, options
        self.reselect = reselect if kind == "admm" else 0
        self.name = f"{base.name}+{kind}"
        self.search = getattr(base, "search", None)
        self.theta_init = getattr(base, "theta_init", None)
        self.needs_block_loss = base.needs_block_loss

    @property
    def reconstruction(self) -> dict:
        """What the report and --resume's fingerprint record of the update (the name says only its kind)."""
        return {"kind": self.kind, "iters": self.iters, "reselect": self.reselect, **self.options}

    def check_targets(self, names: list[str]) -> None:
        self.base.check_targets(names)

    def prune_block(self, job: BlockJob) -> BlockMasks:
        result = self.base.prune_block(job)
        weights = {}
        kw = {**({"iters": self.iters} if self.iters is not None else {}), **self.options}
        for n, w in job.dense.items():
            start = result.weights[n] if result.weights else w
            if self.kind == "admm":
                metric = self.base.metric(job, n, result) if self.reselect else None
                weights[n], result.masks[n] = admm_update(
                    start, result.masks[n], job.gram[n], metric=metric, pattern=job.pattern,
                    reselect=self.reselect if metric is not None else 0, **kw)
            else:
                weights[n], _ = awp_pgd(start, job.gram[n], job.n_tokens, mask=result.masks[n], **kw)
        result.weights = weights
        return result


def make_method(name: str, search: SearchConfig | None = None, reconstruct: str = "none",
                awp_init: str = "wanda", iters: int | None = None, theta_init: ThetaInit | None = None,
                reselect: int = ADMM_RESELECT) -> PruningMethod:
    """``search`` and ``theta_init`` apply to BaWA (``search=None`` = ``--no-search``: Θ stays at
    ``theta_init``); ``reconstruct`` wraps any mask method, ``reselect`` is ADMM's mask re-selection."""
    if name == "magnitude":
        method = Magnitude()
    elif name == "wanda":
        method = Wanda()
    elif name == "bawa":
        method = Bawa(search, theta_init or ThetaInit())
    elif name == "ria":
        method = Ria()
    elif name == "sparsegpt":
        method = SparseGPT()
    elif name == "awp":
        if awp_init not in ("wanda", "bawa"):
            raise ValueError(f"--awp-init {awp_init!r}: choose wanda or bawa")
        method = Awp(make_method(awp_init, search, theta_init=theta_init), **({"iters": iters} if iters else {}))
    else:
        raise ValueError(f"unknown pruning method {name!r}; choose one of {', '.join(METHODS)}")
    if reconstruct != "none":
        if name in ("sparsegpt", "awp"):
            raise ValueError(f"--reconstruct applies to mask methods; {name} already updates the weights")
        method = Reconstructed(method, reconstruct, iters, reselect)
    return method


METHODS = ("magnitude", "wanda", "bawa", "ria", "sparsegpt", "awp")
RECONSTRUCTIONS = ("none", "admm", "awp")
