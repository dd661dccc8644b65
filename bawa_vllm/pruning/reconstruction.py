"""Weight reconstruction for pruned layers, and SparseGPT: plain functions over tensors.

All work in float32 on the layer's Gram matrix ``H = Xᵀ X`` [C_in, C_in] (calibration inputs X
[tokens, C_in]); the objective of every method is the layer-output error ``||(W − Ŵ) Xᵀ||²`` =
``tr((W − Ŵ) H (W − Ŵ)ᵀ)``, subject to Ŵ's sparsity.

- :func:`admm_update`: ADMM (Boža 2024, "Fast and optimal weight update for pruned LLMs"): the quadratic
  has a closed-form step, the mask a projection; the penalty ρ grows geometrically. The mask is fixed, or
  re-chosen in the first iterations by a mask method's metric of the iterate.
- :func:`awp_pgd`: AWP's activation-aware projected gradient descent, ``Z = Θ + η (W − Θ) C``,
  ``Θ ← Proj(Z)`` with ``C = H / n`` and ``η = 1 / λ_max(C)``, onto a fixed mask or onto the sparsity
  pattern itself (top-k per row, N:M per group).
- :func:`sparsegpt`: OBS prune-and-update column block by column block (Frantar & Alistarh 2023).

Each reconstruction returns its result only if it does not increase the error of the masked weight
it started from (a numerical safety net; in exact arithmetic they cannot).
"""

from __future__ import annotations


from collections.abc import Callable

import torch

from .masks import SparsityPattern, keep_mask

F32 = torch.float32


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """``||(W − Ŵ) Xᵀ||² / ||W Xᵀ||²`` from ``H = Xᵀ X``."""
    w, d = weight.to(F32), (weight.to(F32) - approx.to(F32))
    denom = torch.einsum("ij,jk,ik->", w, gram, w).item()
    return torch.einsum("ij,jk,ik->", d, gram, d).item() / denom if denom > 0 else 0.0


def _damped(gram: torch.Tensor, damp: float) -> torch.Tensor:
    h = gram.to(F32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.mean(torch.diag(h)).item())
    return h


def _no_worse(weight, start, result, gram) -> bool:
    """Whether ``result`` is at least as good as ``start`` (the safety net every reconstruction applies)."""
    return output_error(weight, result, gram) <= output_error(weight, start, gram)


def admm_update(weight: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor, iters: int = 20,
                rho: float = 0.1, rho_growth: float = 1.3, damp: float = 0.01,
                metric: Callable[[torch.Tensor], torch.Tensor] | None = None,
                pattern: SparsityPattern | None = None, reselect: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruct ``weight``: min ||(W − Ŵ)Xᵀ||² s.t. Ŵ = 0 off the mask; returns ``(Ŵ, mask)``.

    Preconditioned by the activation norms (H → D⁻¹HD⁻¹, W → WD), with ρ relative to mean(diag H)
    and multiplied by ``rho_growth`` every iteration, so the iterate is pushed onto the mask; the
    result is the projection Z, exactly sparse.

    With ``metric`` (a mask method's score as a function of a weight), ``pattern`` and ``reselect`` > 0, the
    first ``reselect`` iterations choose the mask again, by ``metric`` of the iterate X + U, before projecting
    (Boža 2024 re-selects by magnitude in the preconditioned space, which is Wanda's score). A mask chosen
    on the dense weight cannot know which weights the update will make important once their neighbours are
    gone; at high sparsity that is most of the error (SmolLM2 at 70 %: perplexity 159 on BaWA's fixed mask,
    78 with its metric re-applied to the iterate). Without them ``mask`` stays fixed.
    """
    if reselect and (metric is None or pattern is None):
        raise ValueError("admm_update: reselect needs the metric and the sparsity pattern")
    w = weight.to(F32)
    start = w * mask
    if iters <= 0 or bool(mask.all()):
        return start.to(weight.dtype), mask
    h = _damped(gram, damp)
    norm = torch.sqrt(torch.diag(h)).clamp_min(1e-8)
    hn = h / norm[:, None] / norm[None, :]
    wt = (w * norm).T  # [C_in, C_out]: columns are output rows
    hw = hn @ wt
    m = mask.T.to(F32)
    z, u = wt * m, torch.zeros_like(wt)
    eye = torch.eye(hn.shape[0], dtype=F32, device=hn.device)
    r = rho * torch.mean(torch.diag(hn)).item()
    for i in range(iters):
        chol = torch.linalg.cholesky(hn + r * eye)
        v = torch.cholesky_solve(hw + r * (z - u), chol) + u  # X + U
        if i < reselect:
            m = keep_mask(metric(v.T / norm), pattern).T.to(F32)
        z = v * m
        u = v - z
        r *= rho_growth
    result = (z.T / norm).to(F32)
    if _no_worse(w, start, result, gram):
        return result.to(weight.dtype), m.T.bool()
    return start.to(weight.dtype), mask


def awp_pgd(weight: torch.Tensor, gram: torch.Tensor, n_tokens: int, mask: torch.Tensor | None = None,
            pattern: SparsityPattern | None = None, init: torch.Tensor | None = None, iters: int = 200,
            tol: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """AWP projected gradient descent; returns ``(Ŵ, mask)``.

    Projects onto ``mask`` (reconstruction) or, with ``pattern``, onto the sparsity set itself (AWP as a
    pruning method: top-k by magnitude per row, or N of every M), starting from ``init`` (a masked weight).
    Stops when the relative change of Θ falls below ``tol`` or after ``iters`` steps.
    """
    if (mask is None) == (pattern is None):
        raise ValueError("awp_pgd: give exactly one of mask (fixed support) or pattern (sparsity set)")
    w = weight.to(F32)
    c = gram.to(F32) / max(n_tokens, 1)
    lam = torch.linalg.eigvalsh(c).max().item()
    start = (w * mask) if mask is not None else init.to(F32)
    if lam <= 0:
        return start.to(weight.dtype), start != 0 if mask is None else mask
    eta = 1.0 / lam

    def project(z):
        keep = mask if mask is not None else keep_mask(z.abs(), pattern)
        return z.masked_fill(~keep, 0.0), keep

    theta, keep = project(start)
    for _ in range(iters):
        new, keep = project(theta + eta * (w - theta) @ c)
        change = (new - theta).norm() / theta.norm().clamp_min(1e-12)
        theta = new
        if change < tol:
            break
    if mask is not None:
        return (theta if _no_worse(w, start, theta, gram) else start).to(weight.dtype), mask
    return theta.to(weight.dtype), keep


def sparsegpt(weight: torch.Tensor, gram: torch.Tensor, pattern: SparsityPattern | None, blocksize: int = 128,
              damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT prune-and-update; returns ``(Ŵ, mask)``. ``pattern=None`` prunes nothing (Ŵ = W).

    Hessian 2XᵀX up to scale (the scale cancels), dampening ``damp`` × mean diagonal, column blocks of
    ``blocksize`` with lazy batch updates; unstructured masks are chosen per block across rows
    (adaptive mask selection), N:M masks per group of M columns on the already-updated weights.
    """
    w = weight.to(F32).clone()
    rows, cols = w.shape
    if pattern is None:
        return weight.clone(), torch.ones_like(weight, dtype=torch.bool)
    pattern.check_shape(cols)
    h = _damped(gram, damp)
    w[:, torch.diag(gram.to(F32)) == 0] = 0
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    mask = torch.zeros_like(w, dtype=torch.bool)  # True = pruned, while building
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        d = torch.diag(hinv1)
        if not pattern.is_nm:
            scores = w1**2 / d.unsqueeze(0) ** 2
            k = int(scores.numel() * pattern.ratio)
            mask1 = torch.zeros_like(scores, dtype=torch.bool)
            if k:
                mask1.view(-1)[torch.topk(scores.flatten(), k, largest=False).indices] = True
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            col = w1[:, i]
            if pattern.is_nm and i % pattern.m == 0:
                s = w1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m].unsqueeze(0) ** 2
                pruned = torch.topk(s, pattern.m - pattern.n, dim=1, largest=False).indices
                mask1[:, i : i + pattern.m].scatter_(1, pruned, True)
            q = col.masked_fill(mask1[:, i], 0.0)
            e = (col - q) / d[i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        mask[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    keep = ~mask
    return w.masked_fill(mask, 0.0).to(weight.dtype), keep


def least_squares_on_mask(weight: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """The exact optimum for a fixed mask, row by row: ŵ_S = H_SS⁻¹ H_S: w (for tests and small layers)."""
    w, h = weight.to(torch.float64), gram.to(torch.float64)
    out = torch.zeros_like(w)
    for i in range(w.shape[0]):
        s = mask[i].nonzero().flatten()
        if s.numel():
            out[i, s] = torch.linalg.solve(h[s][:, s], h[s] @ w[i])
    return out.to(weight.dtype)


__all__ = ["output_error", "admm_update", "awp_pgd", "sparsegpt", "least_squares_on_mask"]
