"""``bawa-export``: prune a Hugging Face checkpoint block by block and write the pruned checkpoint."""

from __future__ import annotations

import argparse
import json
import logging

from ..pruning.engine import ExportConfig, prune_checkpoint
from ..pruning.masks import SparsityPattern
from ..pruning.methods import ADMM_RESELECT, METHODS, RECONSTRUCTIONS, make_method
from ..pruning.search import SearchConfig, parse_theta_init
from ..pruning.structured import CLI_METHODS, prune_structured
from ._common import HelpFormatter, description, run_cli, setup_logging

logger = logging.getLogger("bawa_vllm.export")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bawa-export", description=description(__doc__), formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="local Hugging Face checkpoint directory (safetensors)")
    ap.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    ap.add_argument("--method", choices=(*METHODS, *CLI_METHODS), default="bawa",
                    help="unstructured / N:M methods, or structured: llm-bip, structured-magnitude, "
                         "structured-random (--sparsity is then the fraction of block parameters removed)")
    ap.add_argument("--sparsity", default="2:4", help="pruned fraction (0.5, 70%%) or N:M kept (2:4, 4:8)")
    ap.add_argument("--no-search", action="store_true", help="BaWA at the initial Θ (--theta-init), no search")
    ap.add_argument("--theta-init", default="1,1,0.5", type=_theta_init,
                    help="BaWA's initial Θ = (θ_in, θ_out, θ_act): three numbers for every linear; or JSON, inline "
                         "or in a file, of layer type -> three numbers, e.g. '{\"down_proj\": [0.5, 0.5, 0.5], "
                         "\"default\": [1, 1, 0.5]}'; or an earlier export's bawa_report.json (the mean Θ per layer "
                         "type it found)"),
    ap.add_argument("--reconstruct", choices=RECONSTRUCTIONS, default="none",
                    help="weight update on the chosen masks: ADMM (Boža 2024) or AWP's projected gradient descent")
    ap.add_argument("--awp-init", choices=("wanda", "bawa"), default="wanda", help="initial mask of --method awp")
    ap.add_argument("--recon-iters", type=int, default=None,
                    help="iterations of ADMM (default 20) or of AWP's PGD (default 200)")
    ap.add_argument("--admm-reselect", type=int, default=ADMM_RESELECT,
                    help="ADMM iterations that choose the mask again, by the method's own metric applied to the "
                         "updated weights; 0 keeps the method's mask fixed")
    ap.add_argument("--calib", default=None, help=".txt / .jsonl(.gz) file, or a dataset name such as c4")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window")
    ap.add_argument("--seed", type=int, default=0,
                    help="seeds the choice of calibration windows and the zeroth-order search's noise")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default=None, help="output dtype (default: the checkpoint's)")
    ap.add_argument("--compute-dtype", default=None,
                    help="dtype of the calibration forward (default: float32 on CPU, where bf16 matmuls are "
                         "slow, else the output dtype); masks are exact either way")
    ap.add_argument("--ignore", default="lm_head",
                    help="comma-separated modules to leave dense: full names, dotted suffixes or globs")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out (only once the new export "
                                                             "is complete)")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted export of --out from its last finished block (same arguments); "
                         "safe on every attempt: starts over if no block was finished, does nothing if --out is "
                         "already finished with these arguments")
    ap.add_argument("--format", choices=("auto", "packed", "dense"), default="auto",
                    help="packed: 2:4-packed values + metadata for the vLLM plugin (default for 2:4); "
                         "dense: masked dense weights that any loader reads")
    ap.add_argument("--forward-batch", type=int, default=8, help="calibration windows per block forward")
    s = ap.add_argument_group("BaWA search of Θ: a coarse stage on each layer's output error, a line stage and "
                              "(optional) zeroth-order SGD on the block loss")
    d = SearchConfig()
    s.add_argument("--coarse-evals", type=int, default=d.coarse_evals,
                   help="coarse stage: layer-output-error evaluations of Θ per linear, from the Gram matrix XᵀX "
                        "(no block forward); 0 skips the stage")
    s.add_argument("--line-points", type=int, default=d.line_points,
                   help="line stage: points on the segment from the coarse-stage Θ to --theta-init, scored by the "
                        "block loss on the held-out windows (a block forward of those windows each); 0 skips it")
    s.add_argument("--line-guard", type=float, default=d.line_guard,
                   help="line stage: leave the coarse-stage Θ only for a point that lowers the block loss on the "
                        "held-out windows one by one, by more than this many standard errors of the mean change; "
                        "0 takes the point of lowest held-out loss")
    s.add_argument("--search-epochs", type=int, default=d.epochs,
                   help="zeroth-order stage: epochs over the calibration windows (block forwards); 0 skips it")
    s.add_argument("--search-batch", type=int, default=d.batch_size, help="calibration windows per step")
    s.add_argument("--search-lr", type=float, default=d.lr, help="zeroth-order step size on the relative loss")
    s.add_argument("--search-eps", type=float, default=d.eps, help="perturbation scale ε")
    s.add_argument("--search-max-step", type=float, default=d.max_step, help="per-coordinate trust region")
    s.add_argument("--search-patience", type=int, default=d.patience,
                   help="zeroth-order epochs without improvement before stopping")
    s.add_argument("--search-holdout", type=float, default=d.holdout,
                   help="fraction of calibration windows held out of the steps to select the best Θ")
    s.add_argument("--search-target", choices=("model", "block"), default="model",
                   help="zeroth-order loss; model: match the dense model's block output on its own dense inputs; "
                        "block: the dense block on the pruned inputs (the paper's Eq. 7 read literally)")
    return ap


def _theta_init(text: str):
    """argparse type: a bad --theta-init is a usage error before anything is loaded."""
    try:
        return parse_theta_init(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--theta-init").lstrip(": ")) from None


def config_from_args(args: argparse.Namespace) -> tuple[ExportConfig, SearchConfig | None]:
    pattern = SparsityPattern.parse(args.sparsity)
    cfg = ExportConfig(
        model=args.model, out=args.out, pattern=pattern, calib=args.calib, nsamples=args.nsamples,
        seqlen=args.seqlen, seed=args.seed, device=args.device, dtype=args.dtype,
        ignore=[p.strip() for p in args.ignore.split(",") if p.strip()], overwrite=args.overwrite,
        forward_batch=args.forward_batch, format=args.format, loss_target=args.search_target,
        compute_dtype=args.compute_dtype, resume=args.resume,
    )
    search = None if args.no_search else SearchConfig(
        epochs=args.search_epochs, batch_size=args.search_batch, lr=args.search_lr, eps=args.search_eps,
        max_step=args.search_max_step, patience=args.search_patience, holdout=args.search_holdout, seed=args.seed,
        coarse_evals=args.coarse_evals, line_points=args.line_points, line_guard=args.line_guard,
    )
    return cfg, search


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()

    def run():
        cfg, search = config_from_args(args)
        if args.method in CLI_METHODS:
            if cfg.pattern.is_nm:
                raise ValueError(f"--method {args.method} removes whole heads and channels: give a fraction "
                                 f"such as 0.2, not {cfg.pattern}")
            report = prune_structured(cfg, CLI_METHODS[args.method], cfg.pattern.ratio)
            print(json.dumps({"out": cfg.out, "removed_fraction": report["plan"]["removed_fraction"],
                              "seconds": report["seconds"]}))
            return
        report = prune_checkpoint(cfg, make_method(args.method, search, args.reconstruct, args.awp_init,
                                                   args.recon_iters, theta_init=args.theta_init,
                                                   reselect=args.admm_reselect))
        print(json.dumps({"out": cfg.out, "sparsity": report["sparsity"], "seconds": report["seconds"],
                          "peak_rss_mib": report["peak_rss_mib"]}))

    return run_cli(run)


if __name__ == "__main__":
    raise SystemExit(main())
