import torch

from bawa_vllm.pruning.search import SearchConfig, zeroth_order_search


def _piecewise_quadratic(target):
    """A loss that, like the mask loss, is piecewise constant in Θ (quantised to a 0.02 grid)."""
    def loss(theta, idx):
        q = torch.round(theta / 0.02) * 0.02
        noise = 0.0 if idx is None else 0.01 * float(idx.float().mean()) / 100  # batch-dependent
        return float(((q - target) ** 2).sum()) + 0.1 + noise
    return loss


def test_search_moves_towards_minimum_and_keeps_best():
    theta0 = torch.tensor([[1.0, 1.0, 0.5]] * 4, dtype=torch.float64)
    target = torch.tensor([[0.4, 0.6, 0.3]] * 4, dtype=torch.float64)
    loss = _piecewise_quadratic(target)
    res = zeroth_order_search(loss, theta0, n_samples=128, cfg=SearchConfig(epochs=6, batch_size=16, eps=0.05))
    assert res.best_loss < 0.5 * res.initial_loss
    assert loss(res.theta, None) < 0.5 * loss(theta0, None)
    # the returned Θ is one of the scored candidates (selected on the held-out windows), never worse than Θ0
    assert res.best_loss in res.epoch_losses and res.best_loss <= res.initial_loss


def test_search_never_returns_worse_than_initial():
    theta0 = torch.zeros(3, 3, dtype=torch.float64)
    calls = {"n": 0}

    def adversarial(theta, idx):  # every move away from Θ0 is worse on the full set
        calls["n"] += 1
        step_batch = idx is not None and idx.numel() == 16
        return float(torch.rand(1)) if step_batch else 1.0 + float(theta.abs().sum())

    res = zeroth_order_search(adversarial, theta0, 80, SearchConfig(epochs=3, patience=5))
    assert torch.equal(res.theta, theta0) and res.best_loss == res.initial_loss == 1.0
    assert res.steps == 9  # 60 of the 80 windows take steps (20 held out): 3 batches of 16, 3 epochs


def test_holdout_selects_on_unseen_windows():
    """A Θ that only the step batches like (the held-out windows do not) is never returned."""
    theta0 = torch.zeros(1, 3, dtype=torch.float64)
    seen_batches = set()

    def loss(theta, idx):
        if idx is not None and idx.numel() <= 16:
            seen_batches.update(idx.tolist())
        return 1.0 + float(theta.sum()) if idx is None or idx.numel() != 16 else 1.0 - float(theta.sum())

    res = zeroth_order_search(loss, theta0, 80, SearchConfig(epochs=2, batch_size=16, holdout=0.25))
    assert torch.equal(res.theta, theta0)


def test_trust_region_caps_each_step():
    seen = []

    def steep(theta, idx):
        seen.append(theta.clone())
        return 1e6 * float(theta.sum()) + 1.0

    zeroth_order_search(steep, torch.zeros(2, 3, dtype=torch.float64), 16,
                        SearchConfig(epochs=1, batch_size=16, max_step=0.1, eps=0.01))
    # evaluations: initial, +, -, end of epoch -> the update is the difference of the first and last
    assert (seen[-1] - seen[0]).abs().max() <= 0.1 + 1e-12
