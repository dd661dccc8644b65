import pytest
import torch

from bawa_vllm.pruning.masks import SparsityPattern, apply_mask_, keep_mask


def test_parse():
    assert SparsityPattern.parse("2:4") == SparsityPattern(0.5, 2, 4)
    assert SparsityPattern.parse(" 4:8 ").is_nm
    assert SparsityPattern.parse("0.7").ratio == pytest.approx(0.7)
    assert SparsityPattern.parse("60%").ratio == pytest.approx(0.6)
    for bad in ["abc", "2:", "4:2", "0:4", "1.5", "0", "1", "-0.2", "2:4:8"]:
        with pytest.raises(ValueError, match="sparsity"):
            SparsityPattern.parse(bad)


def test_hand_computed_24():
    w = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]])
    mask = keep_mask(w.abs(), SparsityPattern.parse("2:4"))
    assert mask.tolist() == [[False, False, True, True, False, False, True, True],
                             [True, True, False, False, True, True, False, False]]


@pytest.mark.parametrize("spec", ["2:4", "4:8", "1:4", "3:8"])
def test_nm_every_group(spec):
    pattern = SparsityPattern.parse(spec)
    scores = torch.rand(16, 64, generator=torch.Generator().manual_seed(1))
    mask = keep_mask(scores, pattern)
    groups = mask.reshape(16, -1, pattern.m)
    assert (groups.sum(-1) == pattern.n).all()
    # the kept ones are the group's largest
    g = scores.reshape(16, -1, pattern.m)
    kept_min = torch.where(groups, g, torch.inf).amin(-1)
    pruned_max = torch.where(groups, -torch.inf, g).amax(-1)
    assert (kept_min >= pruned_max).all()


@pytest.mark.parametrize("ratio", [0.5, 0.6, 0.7, 0.9])
def test_unstructured_per_row(ratio):
    scores = torch.randn(8, 50, generator=torch.Generator().manual_seed(2))
    mask = keep_mask(scores, SparsityPattern(ratio))
    n_pruned = int(50 * ratio)
    assert ((~mask).sum(1) == n_pruned).all()
    for r in range(8):
        assert scores[r][mask[r]].min() >= scores[r][~mask[r]].max()


def test_nm_must_divide():
    with pytest.raises(ValueError, match="divide by 8"):
        keep_mask(torch.rand(4, 12), SparsityPattern.parse("4:8"), "layer.weight")


def test_apply_mask_leaves_positive_zero():
    w = -torch.rand(4, 8) - 0.1
    mask = keep_mask(w.abs(), SparsityPattern.parse("2:4"))
    apply_mask_(w, mask)
    zeros = w == 0
    assert zeros.sum() == 16 and not torch.signbit(w[zeros]).any()


def _reference_mask(scores: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """keep_mask's definition, written out with Python's (stable) sorted: ties go by position."""
    rows, cols = scores.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        s = scores[r].tolist()
        if pattern.is_nm:
            for g in range(0, cols, pattern.m):
                for j in sorted(range(g, g + pattern.m), key=lambda j: (-s[j], j))[: pattern.n]:
                    mask[r, j] = True
        else:
            mask[r] = True
            for j in sorted(range(cols), key=lambda j: (s[j], j))[: int(cols * pattern.ratio)]:
                mask[r, j] = False
    return mask


@pytest.mark.parametrize("spec", ["0.5", "0.7", "0.05", "2:4", "4:8", "1:4", "3:8"])
@pytest.mark.parametrize("kind", ["distinct", "many ties", "infinities", "float64"])
def test_masks_break_ties_by_position_like_a_stable_sort(spec, kind):
    """The selection and rank shortcuts must give exactly the sorted definition's masks: the search's
    reproducibility (a reported Θ rebuilds its masks bit for bit) depends on it."""
    gen = torch.Generator().manual_seed(hash((spec, kind)) % 2**31)
    scores = torch.randn(7, 48, generator=gen)
    if kind == "many ties":
        scores = torch.randint(0, 3, (7, 48), generator=gen).float()
        scores[0] = 1.0  # one row all tied
    elif kind == "infinities":
        scores[scores > 0.8] = torch.inf
        scores[scores < -1.0] = 0.0
    elif kind == "float64":
        scores = scores.double()
    pattern = SparsityPattern.parse(spec)
    assert torch.equal(keep_mask(scores, pattern), _reference_mask(scores, pattern))


def test_nan_scores_rank_above_every_number():
    scores = torch.tensor([[0.1, float("nan"), 0.3, 0.2, 0.4, 0.5, 0.6, 0.7]])
    assert keep_mask(scores, SparsityPattern.parse("2:4")).tolist() == [[False, True, True, False] + [False, False, True, True]]
    assert keep_mask(scores, SparsityPattern(0.75))[0].nonzero().flatten().tolist() == [1, 7]
