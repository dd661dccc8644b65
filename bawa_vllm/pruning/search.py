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

Coarse stage (:func:`coarse_search`, before the zeroth-order steps): every block forward of the
zeroth-order search costs as much as the block's share of a calibration pass, and on a real model
(SmolLM2-135M) six such steps per block moved the block loss by 0.2 % at 7x Wanda's export time.
A candidate Θ of one linear only changes that linear's mask, and its layer-output error
``||(W − Ŵ)X||² = tr(ΔW XᵀX ΔWᵀ)`` needs only the Gram matrix ``XᵀX`` the engine collects anyway:
one [C_out, C_in] x [C_in, C_in] product, no block forward. The layers of a block are independent
under that error, so each linear gets its own compass search (from the best of Wanda's point
(0, 0, 1), the initial Θ and magnitude's (0, 0, 0); coordinate steps that halve when no move
improves), with Wanda's point always among the candidates: the returned Θ's layer error is never
above Wanda's on the same statistics.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor | None], float]
# Θ, window indices (None: all) -> the loss of each of those windows, in their order
WindowLossFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class SearchConfig:
    """The three stages' settings. The zeroth-order stage keeps the paper's ε 0.01, lr 0.2 and batch of 16
    windows, but is off by default (``epochs`` 0): on SmolLM2-135M its block forwards cost 7x Wanda's
    export for no held-out gain over the two cheaper stages (README, "The Θ search")."""

    epochs: int = 0
    batch_size: int = 16
    lr: float = 0.2
    eps: float = 0.01
    max_step: float = 0.1
    patience: int = 2
    holdout: float = 0.25
    seed: int = 0
    # coarse stage: layer-output-error evaluations per linear (0: skip it), its coordinate steps, and the
    # fraction of each linear's output rows whose error the search estimates from (the seeds and the result
    # are then scored on all rows)
    coarse_evals: int = 16
    coarse_steps: tuple[float, ...] = (0.25, 0.125, 0.0625)
    coarse_rows: float = 0.25
    # block stage: points on the segment from the coarse Θ to the initial Θ scored by the block loss on the
    # held-out windows (0 or 1: skip it)
    line_points: int = 5
    # line stage: 0 takes the point of lowest held-out loss; g > 0 reads each held-out window's loss apart and
    # leaves the start only for a point whose mean per-window loss change against it, plus g standard errors
    # of that change, is below zero (the windows must agree, not just their sum). g = 2 against 0, SmolLM2,
    # development split, seed 0 (benchmarks/results/search-ablation-guard-smollm2): 2:4 134.57 vs 145.98,
    # 4:8 70.42 vs 72.95, 50 % 38.50 vs 38.21, 60 % 105.73 vs 112.58, 70 % 933.51 vs 945.66
    line_guard: float = 2.0

    def __post_init__(self):
        self.coarse_steps = tuple(float(x) for x in self.coarse_steps)
        if (self.epochs < 0 or self.batch_size < 1 or self.eps <= 0 or self.lr < 0 or self.max_step <= 0
                or not 0 <= self.holdout < 1 or self.coarse_evals < 0 or not 0 < self.coarse_rows <= 1
                or self.line_points < 0 or self.line_guard < 0
                or not all(x > 0 for x in self.coarse_steps)):
            raise ValueError(f"invalid search settings: {self}")


@dataclass
class SearchResult:
    theta: torch.Tensor  # [m, 3]: the best Θ seen
    initial_loss: float
    best_loss: float
    epoch_losses: list[float] = field(default_factory=list)  # full-calibration loss after each epoch
    steps: int = 0


def holdout_split(n_samples: int, cfg: SearchConfig, gen: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out, step) window indices: a seeded ``cfg.holdout`` share of the windows selects, the rest steps."""
    gen = gen or torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(n_samples, generator=gen)
    n_val = int(n_samples * cfg.holdout) if n_samples >= 4 else 0
    return perm[:n_val], perm[n_val:]


@dataclass
class LineResult:
    t: float  # 0: the start (coarse) Θ, 1: the other end (initial) Θ
    theta: torch.Tensor
    losses: list[float]  # block loss on the held-out windows at each point


def line_search(loss_fn: WindowLossFn, start: torch.Tensor, end: torch.Tensor, n_samples: int, cfg: SearchConfig
                ) -> LineResult:
    """The best of ``cfg.line_points`` evenly spaced points of the segment ``start`` → ``end`` under the
    block loss of the held-out windows (all windows if there are too few). Why: under the layer-output
    error, the coarse stage's Θ sits next to Wanda's point on a real LLM, while what the masks do to the
    *block* (attention's softmax, the SwiGLU product, several pruned layers at once) and to the dense
    model's output is only seen by the block loss; one direction, towards the initial Θ (BaWA's
    normalised, outlier-damped prior), scored on windows no step has seen, costs a few forwards of a
    quarter of the windows. Ties keep the point nearest ``start``; with ``cfg.line_guard`` (the default) a
    point must also beat ``start`` on the windows one by one (:func:`_agreed_moves`)."""
    val, _ = holdout_split(n_samples, cfg)
    idx = val if val.numel() else None
    ts = [k / (cfg.line_points - 1) for k in range(cfg.line_points)]
    # one call per point: its masks are built once and its windows forwarded together
    per = torch.stack([loss_fn(start + t * (end - start), idx).to(torch.float64) for t in ts])
    losses = per.mean(dim=1).tolist()
    if cfg.line_guard > 0 and per.shape[1] >= 2:
        admissible = _agreed_moves(per, cfg.line_guard)
    else:
        admissible = [True] * len(ts)
    best = 0
    for k in range(1, len(ts)):
        if admissible[k] and losses[k] < losses[best]:
            best = k
    return LineResult(t=ts[best], theta=start + ts[best] * (end - start), losses=losses)


def _agreed_moves(per: torch.Tensor, guard: float) -> list[bool]:
    """``SearchConfig.line_guard``, for per-window losses ``per`` [points, windows]: why — the lowest of five
    noisy held-out losses is biased low, so with a few windows the stage could move on noise; a point may
    replace the start only if it beats it on the windows one by one (paired differences), by more than
    ``guard`` standard errors of their mean."""
    diff = per - per[0]
    upper = diff.mean(dim=1) + guard * diff.std(dim=1) / math.sqrt(per.shape[1])
    return [k == 0 or bool(upper[k] < 0) for k in range(per.shape[0])]


def zeroth_order_search(loss_fn: LossFn, theta0: torch.Tensor, n_samples: int, cfg: SearchConfig,
                        desc: str = "search") -> SearchResult:
    """Minimise ``loss_fn(Θ, window_indices)`` over Θ from ``theta0``; ``None`` indices = all windows."""
    gen = torch.Generator().manual_seed(cfg.seed)
    theta = theta0.detach().to(torch.float64).clone()
    val, train = holdout_split(n_samples, cfg, gen)
    n_val = val.numel()

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


Theta = tuple[float, float, float]
BAWA_INIT_THETA: Theta = (1.0, 1.0, 0.5)  # the paper's initialisation: weight norms 1, activation norm 0.5
WANDA_THETA: Theta = (0.0, 0.0, 1.0)
MAGNITUDE_THETA: Theta = (0.0, 0.0, 0.0)
THETA_BOUNDS = (-1.0, 2.0)  # the coarse stage's box for every coordinate


@dataclass
class CoarseResult:
    theta: Theta
    error: float  # the layer-output error at ``theta``
    seed_errors: dict[str, float]  # label -> error of each starting point (Wanda's included)
    evals: int


def coarse_search(error_fn: Callable[[Theta], float], seeds: dict[str, Theta], max_evals: int,
                  steps: Iterable[float] = (0.25, 0.125, 0.0625), bounds: tuple[float, float] = THETA_BOUNDS,
                  confirm_fn: Callable[[Theta], float] | None = None) -> CoarseResult:
    """Minimise ``error_fn`` over one linear's Θ: the best seed, then a compass search.

    Every seed is evaluated (whatever ``max_evals``), so the result is never worse than any of them,
    Wanda's point included. From the best seed, each coordinate tries ``+step`` then ``−step``
    (clamped to ``bounds``); a move is taken only if it lowers the error, and the step halves, through
    ``steps``, once a sweep over the three coordinates moves nothing. Stops after ``max_evals``
    distinct evaluations. Deterministic: ties keep the earlier candidate. A NaN error counts as +inf.

    ``confirm_fn``: when ``error_fn`` is a cheaper estimate (the error of a subset of the rows), the first
    seed (Wanda's point) and the search's best are scored again with this exact error and the better one
    under it is returned, so the result is never worse than the first seed exactly; ``error`` and the first
    seed's entry of ``seed_errors`` are then exact, the other seeds' entries estimates.
    """
    cache: dict[Theta, float] = {}

    def f(theta: Iterable[float]) -> tuple[Theta, float]:
        key = tuple(round(min(max(float(t), bounds[0]), bounds[1]), 6) for t in theta)
        if key not in cache:
            err = float(error_fn(key))
            cache[key] = math.inf if math.isnan(err) else err
        return key, cache[key]

    seed_errors = {}
    best, best_err = None, math.inf
    for label, theta in seeds.items():
        key, err = f(theta)
        seed_errors[label] = err
        if best is None or err < best_err:
            best, best_err = key, err
    for step in steps:
        moved = True
        while moved and len(cache) < max_evals:
            moved = False
            for c in range(3):
                for sign in (1.0, -1.0):
                    if len(cache) >= max_evals:
                        break
                    trial = list(best)
                    trial[c] += sign * step
                    key, err = f(trial)
                    if err < best_err:
                        best, best_err, moved = key, err, True
                        break
    evals = len(cache)
    if confirm_fn is not None:
        cache, error_fn = {}, confirm_fn
        label, theta = next(iter(seeds.items()))
        first = f(theta)
        seed_errors[label] = first[1]
        best, best_err = min([first, f(best)], key=lambda c: c[1])  # first minimum: the seed wins a tie
    return CoarseResult(theta=best, error=best_err, seed_errors=seed_errors, evals=evals)


@dataclass(frozen=True)
class ThetaInit:
    """The initial Θ of every linear: one triple for all, or per layer type (a name inside the block,
    matched whole or as a dotted suffix: ``q_proj`` matches ``self_attn.q_proj``; ``default`` for the rest)."""

    default: Theta = BAWA_INIT_THETA
    per_type: tuple[tuple[str, Theta], ...] = ()

    def for_layer(self, name: str) -> Theta:
        for key, theta in self.per_type:
            if name == key or name.endswith("." + key):
                return theta
        return self.default

    def check_names(self, names: Iterable[str]) -> None:
        """A per-type key that matches none of the block's linears is a typo: say so before any work."""
        names = list(names)
        unknown = [k for k, _ in self.per_type if not any(n == k or n.endswith("." + k) for n in names)]
        if unknown:
            raise ValueError(f"--theta-init: {', '.join(unknown)} match no linear of the block "
                             f"(the block's linears: {', '.join(names)})")

    def to_json(self) -> dict:
        return {"default": list(self.default), **{k: list(v) for k, v in self.per_type}}


def _theta_triple(value, where: str) -> Theta:
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"--theta-init: {where} must be three numbers (θ_in, θ_out, θ_act), got {value!r}")
    if not all(math.isfinite(v) for v in value):
        raise ValueError(f"--theta-init: {where} has a non-finite value: {value!r}")
    return tuple(float(v) for v in value)


_TRIPLE = re.compile(r"^\s*([^,\s]+)\s*[,\s]\s*([^,\s]+)\s*[,\s]\s*([^,\s]+)\s*$")


def parse_theta_init(text: str) -> ThetaInit:
    """``"1,1,0.5"`` / ``"1 1 0.5"``; a JSON list of three numbers; a JSON object of layer type ->
    three numbers (``"default"`` for the rest); or a path to a file holding such JSON, or to a
    ``bawa_report.json`` (its ``theta_summary``: the mean Θ per layer type that an earlier run found)."""
    match = _TRIPLE.match(text)
    if match and not text.lstrip().startswith(("[", "{")) and not Path(text).is_file():
        try:
            values = [float(g) for g in match.groups()]
        except ValueError:
            raise ValueError(f"--theta-init {text!r}: not three numbers (θ_in, θ_out, θ_act)") from None
        return ThetaInit(default=_theta_triple(values, "the value"))
    source = text
    path = Path(text)
    if not text.lstrip().startswith(("[", "{")):
        if not path.is_file():
            raise ValueError(f"--theta-init {text!r}: neither three numbers, JSON, nor an existing file")
        source = path.read_text(encoding="utf-8")
    try:
        data = json.loads(source)
    except json.JSONDecodeError as err:
        raise ValueError(f"--theta-init: invalid JSON ({err})") from None
    if isinstance(data, dict) and "theta_summary" in data:  # a bawa_report.json
        data = {k: v["mean"] for k, v in data["theta_summary"].items()}
    if isinstance(data, list):
        return ThetaInit(default=_theta_triple(data, "the list"))
    if not isinstance(data, dict) or not data:
        raise ValueError("--theta-init: JSON must be a list of three numbers or an object of layer type -> three "
                         "numbers")
    default = _theta_triple(data["default"], "'default'") if "default" in data else BAWA_INIT_THETA
    per_type = tuple((str(k), _theta_triple(v, repr(k))) for k, v in data.items() if k != "default")
    return ThetaInit(default=default, per_type=per_type)


def theta_summary(blocks: list[dict]) -> dict:
    """Per layer type, the Θ the export ended with: mean, min and max over the blocks (3 numbers each)."""
    by_type: dict[str, list[list[float]]] = {}
    for block in blocks:
        for name, layer in block["layers"].items():
            if "theta" in layer:
                by_type.setdefault(name, []).append(layer["theta"])
    out = {}
    for name, thetas in by_type.items():
        cols = list(zip(*thetas))
        out[name] = {"mean": [round(sum(c) / len(c), 4) for c in cols], "min": [min(c) for c in cols],
                     "max": [max(c) for c in cols], "blocks": len(thetas)}
    return out
