import math

import pytest
import torch

from bawa_vllm.pruning.masks import SparsityPattern, keep_mask
from bawa_vllm.pruning.metrics import bawa_scores, magnitude_scores, wanda_scores


def _data(seed=0, rows=6, cols=8):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    # non-uniform activations with an outlier channel: sqrt vs no-sqrt and powers rank differently
    x = torch.randn(40, cols, generator=g) * torch.linspace(0.1, 3.0, cols)
    x[:, 3] *= 20
    return w, x


def test_wanda_bruteforce():
    w, x = _data()
    s = wanda_scores(w, x.pow(2).sum(0))
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            xn = math.sqrt(sum(float(x[t, j]) ** 2 for t in range(x.shape[0])))
            assert s[i, j].item() == pytest.approx(abs(float(w[i, j])) * xn, rel=1e-5)


@pytest.mark.parametrize("theta", [(1.0, 1.0, 0.5), (0.3, 0.6, 0.4), (-0.2, 1.5, 2.0)])
def test_bawa_bruteforce(theta):
    w, x = _data(1)
    t_in, t_out, t_act = theta
    s = bawa_scores(w, x.pow(2).sum(0), theta)
    rows, cols = w.shape
    for i in range(rows):
        row_norm = math.sqrt(sum(float(w[i, k]) ** 2 for k in range(cols)))
        for j in range(cols):
            col_norm = math.sqrt(sum(float(w[k, j]) ** 2 for k in range(rows)))
            act_norm = math.sqrt(sum(float(x[t, j]) ** 2 for t in range(x.shape[0])))
            ref = abs(float(w[i, j])) * (col_norm ** -t_in + row_norm ** -t_out) * act_norm ** t_act
            assert s[i, j].item() == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("spec", ["2:4", "4:8", "0.5", "0.7"])
def test_identities(spec):
    """θ = (0, 0, 1) is Wanda's mask and θ = (0, 0, 0) magnitude's, exactly."""
    pattern = SparsityPattern.parse(spec)
    for seed in range(5):
        w, x = _data(seed, rows=32, cols=64)
        act = x.pow(2).sum(0)
        assert torch.equal(keep_mask(bawa_scores(w, act, (0, 0, 1)), pattern),
                           keep_mask(wanda_scores(w, act), pattern))
        assert torch.equal(keep_mask(bawa_scores(w, act, (0, 0, 0)), pattern),
                           keep_mask(magnitude_scores(w), pattern))
    # and the default Θ differs from Wanda's on outlier data, so the identity test can fail
    assert not torch.equal(keep_mask(bawa_scores(w, act, (1, 1, 0.5)), pattern),
                           keep_mask(wanda_scores(w, act), pattern))


@pytest.mark.parametrize("theta", [(1.0, 1.0, 0.5), (1.1, 1.0, 0.5), (2.0, 1.0, 0.5), (3.0, 1.0, 0.5),
                                   (1.0, 1.1, 0.5), (1.0, 2.0, 0.5), (1.0, 3.0, 0.5), (3.0, 3.0, 2.0)])
def test_zero_column_and_row_score_lowest(theta):
    """An all-zero input column (and output row) scores 0 at every Θ, never NaN, and 2:4 never keeps it.

    θ > 1 is where a norm clamped to the smallest float overflowed to inf, and 0 · inf = NaN then
    sorted above every real weight; the search starts at θ = 1 and steps past it.
    """
    w, x = _data(rows=8, cols=8)
    w[:, 2] = 0
    w[5, :] = 0
    s = bawa_scores(w, x.pow(2).sum(0), theta)
    assert torch.isfinite(s).all()
    assert (s[:, 2] == 0).all() and (s[5] == 0).all()
    live = torch.ones_like(w, dtype=torch.bool)
    live[:, 2] = live[5] = False
    assert (s[live] > 0).all()
    keep = keep_mask(s, SparsityPattern.parse("2:4"))
    # in the rows with weights, the zero column's group keeps two of its three real weights
    assert not keep[live.any(1), 2].any()


def test_dead_input_channel_scores_lowest():
    """A channel with all-zero activations scores 0, even where its tiny column norm overflows to inf at
    θ_in = 2 (inf · 0 would be NaN); θ_act = 0 ignores X and stays magnitude."""
    w, x = _data()
    w[:, 1] = 1e-20
    x[:, 1] = 0
    act = x.pow(2).sum(0)
    s = bawa_scores(w, act, (2.0, 1.0, 0.5))
    assert (s[:, 1] == 0).all() and (s[:, [0, *range(2, 8)]] > 0).all()
    assert torch.equal(bawa_scores(w, act, (0, 0, 0))[:, 1], 2 * w[:, 1].abs())
