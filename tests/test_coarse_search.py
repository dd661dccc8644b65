"""The coarse stage of the Θ search (layer-output error from XᵀX) and --theta-init."""

from __future__ import annotations

import json

import pytest
import torch

from bawa_vllm.cli.export import main as export_main
from bawa_vllm.pruning.masks import SparsityPattern, keep_mask
from bawa_vllm.pruning.methods import Bawa, BlockJob, make_method
from bawa_vllm.pruning.metrics import bawa_scores, wanda_scores
from bawa_vllm.pruning.search import (BAWA_INIT_THETA, WANDA_THETA, SearchConfig, coarse_search, parse_theta_init,
                                      theta_summary)

from .conftest import CALIB_TEXT


def _error(weight: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W − Ŵ)X||² straight from the definition: the removed weights through XᵀX."""
    d = weight * (~mask)
    return float(torch.einsum("ij,jk,ik->", d.double(), gram.double(), d.double()))


def _job(pattern: str, seed: int = 0, outliers: bool = True) -> BlockJob:
    """A block of three linears with real-LLM-like inputs: a few input channels carry large activations."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"self_attn.q_proj": (32, 64), "mlp.up_proj": (48, 64), "mlp.down_proj": (64, 48)}
    dense, act, gram, targets = {}, {}, {}, {}
    for name, (out_f, in_f) in shapes.items():
        x = torch.randn(512, in_f, generator=gen)
        if outliers:
            x[:, torch.randperm(in_f, generator=gen)[:3]] *= 20.0
        x = x @ (torch.eye(in_f) + 0.3 * torch.randn(in_f, in_f, generator=gen))  # correlated channels
        dense[name] = torch.randn(out_f, in_f, generator=gen) * torch.rand(1, in_f, generator=gen)
        act[name] = x.pow(2).sum(0)
        gram[name] = x.T @ x
        targets[name] = torch.nn.Linear(in_f, out_f, bias=False)
    return BlockJob(index=0, targets=targets, dense=dense, act_sum_sq=act, pattern=SparsityPattern.parse(pattern),
                    n_samples=4, gram=gram, n_tokens=512)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "0.5", "0.7"])
@pytest.mark.parametrize("seed", [0, 1])
def test_coarse_stage_never_worse_than_wanda_on_the_same_statistics(pattern, seed):
    job = _job(pattern, seed)
    result = Bawa(SearchConfig(epochs=0, coarse_evals=16)).prune_block(job)
    improved = 0
    for name, weight in job.dense.items():
        wanda = _error(weight, keep_mask(wanda_scores(weight, job.act_sum_sq[name]), job.pattern), job.gram[name])
        chosen = _error(weight, result.masks[name], job.gram[name])
        assert chosen <= wanda * (1 + 1e-6), (name, chosen, wanda)
        improved += chosen < wanda * (1 - 1e-4)
        # the reported Θ is the one whose masks were applied
        assert torch.equal(result.masks[name],
                           keep_mask(bawa_scores(weight, job.act_sum_sq[name], tuple(result.theta[name])), job.pattern))
        assert result.search["coarse"][name]["error_vs_wanda"] <= 1.0 + 1e-6
    assert improved >= 1  # the search is not just "return Wanda's point"


def test_coarse_stage_finds_a_better_theta_than_every_fixed_start():
    """On outlier-heavy inputs the chosen Θ beats Wanda, magnitude and the initial Θ on the layer error."""
    job = _job("2:4", seed=3)
    result = Bawa(SearchConfig(epochs=0, coarse_evals=32, coarse_rows=1.0)).prune_block(job)
    for name, weight in job.dense.items():
        chosen = _error(weight, result.masks[name], job.gram[name])
        for start in [WANDA_THETA, (0.0, 0.0, 0.0), (1.0, 1.0, 0.5)]:
            fixed = keep_mask(bawa_scores(weight, job.act_sum_sq[name], start), job.pattern)
            assert chosen <= _error(weight, fixed, job.gram[name]) * (1 + 1e-6)


def test_coarse_search_keeps_best_seed_and_budget():
    calls = []

    def bowl(theta):
        calls.append(theta)
        return sum((t - c) ** 2 for t, c in zip(theta, (0.3, 0.7, 0.4)))

    seeds = {"wanda": WANDA_THETA, "init": (1.0, 1.0, 0.5)}
    res = coarse_search(bowl, seeds, max_evals=12)
    assert res.evals == len(calls) == 12  # distinct evaluations only, capped
    assert set(res.seed_errors) == {"wanda", "init"}
    assert res.error <= min(res.seed_errors.values()) and res.error == bowl(res.theta)
    assert res == coarse_search(bowl, seeds, max_evals=12)  # deterministic
    far = coarse_search(bowl, seeds, max_evals=200)
    assert far.error < 0.01 and far.error <= res.error


def test_confirmation_on_the_exact_error_keeps_wanda_when_the_estimate_misleads():
    """A row-subset estimate that prefers a Θ the exact error does not: Wanda's point is returned."""
    def exact(theta):
        return 1.0 + abs(theta[2] - 1.0)  # Wanda's θ_act is the exact optimum

    def estimate(theta):
        return 1.0 - theta[0]  # says: raise θ_in

    res = coarse_search(estimate, {"wanda": WANDA_THETA, "init": (1.0, 1.0, 0.5)}, max_evals=10, confirm_fn=exact)
    assert res.theta == WANDA_THETA and res.error == 1.0 and res.seed_errors["wanda"] == 1.0
    # when the estimate agrees, the search's best is kept
    res = coarse_search(exact, {"wanda": (0.0, 0.0, 0.5)}, max_evals=40, confirm_fn=exact)
    assert res.theta[2] == 1.0 and res.error == 1.0


def test_coarse_search_treats_nan_as_worst_and_stays_in_bounds():
    def f(theta):
        return float("nan") if theta[0] > 0.5 else 1.0 - 0.1 * theta[2]

    res = coarse_search(f, {"a": (0.0, 0.0, 1.0), "b": (1.0, 1.0, 1.0)}, max_evals=40)
    assert res.seed_errors["b"] == float("inf")
    assert res.theta[0] <= 0.5 and res.theta[2] == 2.0  # pushed to the upper bound of the box, not beyond


def test_no_coarse_stage_without_gram_or_when_disabled():
    job = _job("2:4")
    for cfg in (SearchConfig(epochs=0, coarse_evals=0), None):
        result = Bawa(cfg).prune_block(job)
        assert all(t == [1.0, 1.0, 0.5] for t in result.theta.values())
    job.gram = None
    assert Bawa(SearchConfig(epochs=0)).prune_block(job).search is None


@pytest.mark.parametrize("text,default,per_type", [
    ("1,1,0.5", (1.0, 1.0, 0.5), {}),
    ("0.5 0.4 0.3", (0.5, 0.4, 0.3), {}),
    ("[0, 0, 1]", (0.0, 0.0, 1.0), {}),
    ('{"down_proj": [0.5, 0.5, 0.5], "default": [1, 1, 0.25]}', (1.0, 1.0, 0.25), {"down_proj": (0.5, 0.5, 0.5)}),
    ('{"q_proj": [0, 0, 1]}', (1.0, 1.0, 0.5), {"q_proj": (0.0, 0.0, 1.0)}),
])
def test_parse_theta_init(text, default, per_type):
    init = parse_theta_init(text)
    assert init.default == default and dict(init.per_type) == per_type


@pytest.mark.parametrize("text,message", [
    ("1,2", "neither three numbers"),
    ("a,b,c", "not three numbers"),
    ("1,2,3,4", "neither three numbers"),
    ("[1, 2]", "must be three numbers"),
    ('{"q_proj": [1, 2, "x"]}', "'q_proj' must be three numbers"),
    ('{"q_proj": [1, 2, true]}', "must be three numbers"),
    ("nan,1,1", "non-finite"),
    ("[1, 2, Infinity]", "non-finite"),
    ("{}", "JSON must be"),
    ('"text"', "neither three numbers"),
    ('[[1, 2, 3]]', "must be three numbers"),
    ("{not json", "invalid JSON"),
    ("missing-file.json", "neither three numbers"),
])
def test_parse_theta_init_rejects_bad_input(text, message):
    with pytest.raises(ValueError, match=message):
        parse_theta_init(text)


def test_theta_init_per_layer_type_and_unknown_types():
    init = parse_theta_init('{"down_proj": [0.5, 0.5, 0.5], "self_attn.q_proj": [0, 0, 1], "default": [1, 1, 1]}')
    assert init.for_layer("mlp.down_proj") == (0.5, 0.5, 0.5)
    assert init.for_layer("self_attn.q_proj") == (0.0, 0.0, 1.0)
    assert init.for_layer("self_attn.k_proj") == (1.0, 1.0, 1.0)
    assert init.for_layer("mlp.xdown_proj") == (1.0, 1.0, 1.0)  # a suffix matches at a dot only
    init.check_names(["self_attn.q_proj", "mlp.down_proj"])
    with pytest.raises(ValueError, match="dwn_proj match no linear"):
        parse_theta_init('{"dwn_proj": [0, 0, 1]}').check_names(["mlp.down_proj"])
    # --no-search keeps the per-type initial Θ
    job = _job("2:4")
    result = make_method("bawa", None, theta_init=init).prune_block(job)
    assert result.theta["mlp.down_proj"] == [0.5, 0.5, 0.5] and result.theta["mlp.up_proj"] == [1.0, 1.0, 1.0]


def test_theta_init_from_a_report(tmp_path):
    blocks = [{"layers": {"mlp.down_proj": {"theta": [0.2, 0.4, 0.6]}, "self_attn.q_proj": {"theta": [1, 1, 1]}}},
              {"layers": {"mlp.down_proj": {"theta": [0.4, 0.6, 0.8]}, "self_attn.q_proj": {"theta": [0, 0, 1]}}}]
    summary = theta_summary(blocks)
    assert summary["mlp.down_proj"]["mean"] == [0.3, 0.5, 0.7] and summary["mlp.down_proj"]["blocks"] == 2
    path = tmp_path / "bawa_report.json"
    path.write_text(json.dumps({"theta_summary": summary}))
    init = parse_theta_init(str(path))
    assert init.for_layer("mlp.down_proj") == (0.3, 0.5, 0.7) and init.for_layer("self_attn.q_proj") == (0.5, 0.5, 1.0)


def test_cli_theta_init_errors_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--model", str(tmp_path / "absent"), "--out", str(tmp_path / "o"), "--theta-init", "1,x,2"])
    assert exit_info.value.code == 2
    assert "--theta-init" in capsys.readouterr().err


def test_cli_unknown_layer_type_is_refused_before_any_work(tmp_path, capsys, llama_dir):
    out = tmp_path / "out"
    code = export_main(["--model", str(llama_dir), "--out", str(out), "--calib", str(CALIB_TEXT), "--nsamples", "2",
                        "--seqlen", "16", "--theta-init", '{"gate": [0, 0, 1]}'])
    assert code == 2 and "gate match no linear" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("line_points,stages,target", [("0", {"coarse"}, "block"), ("3", {"coarse", "line"}, "model")])
def test_export_reports_theta_and_runs_only_the_stages_asked(line_points, stages, target, tmp_path, llama_dir):
    out = tmp_path / "out"
    assert export_main(["--model", str(llama_dir), "--out", str(out), "--calib", str(CALIB_TEXT), "--nsamples", "4",
                        "--seqlen", "32", "--method", "bawa", "--sparsity", "2:4", "--line-points", line_points,
                        "--coarse-evals", "8", "--theta-init", "0.5,0.5,0.5"]) == 0
    report = json.loads((out / "bawa_report.json").read_text())
    # the dense-model buffer for the block loss only when a block-loss stage runs; no zeroth-order by default
    assert report["loss_target"] == target
    assert report["arguments"]["theta_init"] == {"default": [0.5, 0.5, 0.5]}
    for block in report["blocks"]:
        assert set(block["search"]) == stages
        for name, layer in block["layers"].items():
            assert block["search"]["coarse"][name]["evals"] <= 8
            assert len(layer["theta"]) == 3
    assert set(report["theta_summary"]) == set(report["blocks"][0]["layers"])


def test_line_stage_scores_held_out_windows_and_picks_the_best_point():
    from bawa_vllm.pruning.search import holdout_split, line_search

    cfg = SearchConfig(line_points=5, holdout=0.25, seed=3, line_guard=0.0)
    seen = []

    def loss(theta, idx):
        seen.append(None if idx is None else sorted(idx.tolist()))
        return torch.full((len(idx),), float((theta[0, 2] - 0.6) ** 2))

    start = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    end = torch.tensor([[1.0, 1.0, 0.2]], dtype=torch.float64)  # θ_act 1.0 -> 0.2: t = 0.5 gives 0.6
    res = line_search(loss, start, end, n_samples=16, cfg=cfg)
    held, _ = holdout_split(16, cfg)
    assert all(s == sorted(held.tolist()) for s in seen) and len(seen) == 5 and len(held) == 4
    assert res.t == 0.5 and torch.allclose(res.theta, torch.tensor([[0.5, 0.5, 0.6]], dtype=torch.float64))
    # ties keep the point nearest the start
    flat = line_search(lambda th, idx: torch.ones(len(idx)), start, end, 16, cfg)
    assert flat.t == 0.0 and torch.equal(flat.theta, start)


def test_guarded_line_stage_moves_only_where_the_windows_agree():
    """line_guard > 0: each held-out window is scored alone; a point that is lower on average only because
    one window drops a lot stays at the start, a point lower on every window is taken."""
    from bawa_vllm.pruning.search import holdout_split, line_search

    cfg = SearchConfig(line_points=3, holdout=0.25, seed=1, line_guard=2.0)
    held, _ = holdout_split(16, cfg)
    start = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    end = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)

    def make(changes):  # per held-out window: the loss change at t = 0.5 and at t = 1 against t = 0
        def loss(theta, idx):  # each window's loss, in the order asked for, as the block loss gives them
            t = float(1.0 - theta[0, 2])
            rows = [held.tolist().index(int(i)) for i in idx]
            return torch.tensor([1.0 + changes[j] * ((t == 0.5) + 0.5 * (t == 1.0)) for j in rows])
        return loss

    noisy = line_search(make([-0.4, 0.05, 0.05, 0.05]), start, end, 16, cfg)  # mean -0.0625, one window
    assert noisy.t == 0.0 and len(noisy.losses) == 3
    agreed = line_search(make([-0.02, -0.03, -0.02, -0.025]), start, end, 16, cfg)
    assert agreed.t == 0.5 and agreed.losses[1] < agreed.losses[0]
    # without the guard the lowest mean wins, the noisy point included
    unguarded = SearchConfig(line_points=3, seed=1, line_guard=0.0)
    assert line_search(make([-0.4, 0.05, 0.05, 0.05]), start, end, 16, unguarded).t == 0.5
    # --search-holdout 0: every window is scored, and the guard still reads them one by one
    one_window = torch.tensor([1.0] + [0.0] * 7)

    def all_windows(theta, idx):
        assert idx is None
        return 1.0 + (float(1.0 - theta[0, 2]) == 0.5) * (0.02 - one_window)

    everyone = SearchConfig(line_points=3, holdout=0.0, line_guard=2.0)
    assert line_search(all_windows, start, end, 8, everyone).t == 0.0
    assert line_search(all_windows, start, end, 8, SearchConfig(line_points=3, holdout=0.0, line_guard=0.0)).t == 0.5


def test_bawa_line_stage_never_leaves_the_segment_and_records_losses():
    job = _job("2:4")
    calls = []

    def block_loss(masks, idx):
        calls.append(idx)
        return torch.ones(idx.numel())  # flat: ties keep t = 0

    job.loss = block_loss
    job.n_samples = 8
    result = Bawa(SearchConfig(epochs=0, coarse_evals=8, line_points=3)).prune_block(job)
    # one call per point, each on the held-out quarter of 8 windows (the guard reads their losses one by one)
    assert result.search["line"]["t"] == 0.0 and len(result.search["line"]["losses"]) == 3 and len(calls) == 3
    assert all(idx is not None and idx.numel() == 2 for idx in calls)
    assert len({tuple(idx.tolist()) for idx in calls}) == 1


def test_reported_theta_is_the_applied_theta_in_full_precision():
    """A line point such as t = 1/3 has more digits than any rounding keeps; the report must give the Θ whose
    masks were applied, to the last bit, so that --theta-init from it reproduces the export."""
    coarse = Bawa(SearchConfig(epochs=0, coarse_evals=8, line_points=1)).prune_block(_job("2:4")).theta
    job = _job("2:4")
    losses = iter([1.0, 0.5, 1.0, 1.0])  # t = 0, 1/3, 2/3, 1: the second point wins
    job.loss = lambda masks, idx: torch.full((idx.numel(),), next(losses))
    job.n_samples = 8
    result = Bawa(SearchConfig(epochs=0, coarse_evals=8, line_points=4, line_guard=0.0)).prune_block(job)
    assert result.search["line"]["t"] == 1 / 3
    init = torch.tensor(BAWA_INIT_THETA, dtype=torch.float64)
    for name, weight in job.dense.items():
        start = torch.tensor(coarse[name], dtype=torch.float64)
        assert result.theta[name] == (start + (1 / 3) * (init - start)).tolist()
        assert torch.equal(result.masks[name],
                           keep_mask(bawa_scores(weight, job.act_sum_sq[name], tuple(result.theta[name])), job.pattern))
