"""The streamed, block-sequential pruning driver behind ``bawa-export``.

For each decoder block in turn: build it from the config and fill it from the checkpoint; run the
calibration windows through it densely while hooks accumulate per-input-channel squared norms
(fp32); let the method choose the masks (BaWA may search Θ against the block loss); run the
windows again through the *pruned* block to produce the next block's inputs (errors propagate, as
in Wanda and SparseGPT); write the block's shard; free it. Only one block, the calibration hidden
states and the dense block outputs are ever in memory.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..calibration import calibration_windows, load_documents
from ..modeling.checkpoint import (INDEX_FILE, PROGRESS_FILE, CheckpointWriter, partial_dir, publish,
                                   remove_stale_old)
from ..modeling.decoder import StreamedDecoder, linear_modules, parse_dtype
from ..sparse.format import pack_state_dict, quantization_config
from .masks import SparsityPattern, apply_mask_
from .methods import BlockJob, PruningMethod
from .reconstruction import output_error
from .search import theta_summary

logger = logging.getLogger(__name__)

LOSS_TARGETS = ("model", "block")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class ExportConfig:
    model: str
    out: str
    pattern: SparsityPattern
    calib: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    device: str = "cpu"
    dtype: str | None = None
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    overwrite: bool = False
    forward_batch: int = 8  # calibration windows per block forward
    format: str = "auto"  # packed (2:4 only), dense, or auto = packed for 2:4
    loss_target: str = "model"  # what the block loss compares with: see BlockPruner
    resume: bool = False  # continue the unfinished export of `out` from its last finished block
    compute_dtype: str | None = None  # default: float32 on CPU (bf16 matmuls are slow there), else the output dtype

    def __post_init__(self):
        if self.format not in ("auto", "packed", "dense"):
            raise ValueError(f"--format {self.format!r}: choose auto, packed or dense")
        if self.format == "packed" and not self.pattern.is_24:
            raise ValueError(f"--format packed stores 2:4 only, not {self.pattern}; use --format dense")

    @property
    def packed(self) -> bool:
        return self.pattern.is_24 and self.format != "dense"


def is_ignored(name: str, patterns: list[str]) -> bool:
    """``name`` is a full module name; a pattern matches it whole, as a dotted suffix, or as a glob."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def rms_normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True).clamp_min(1e-12))


def window_losses(dense_out: torch.Tensor, pruned_out: torch.Tensor) -> torch.Tensor:
    """Per window [B]: the mean over its tokens of ||RMSNorm(dense) − RMSNorm(pruned)||² (summed over hidden).
    Windows have one length, so the block loss of several windows is the mean of theirs."""
    diff = rms_normalize(dense_out) - rms_normalize(pruned_out)
    return diff.pow(2).sum(dim=-1).mean(dim=-1).double()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class BlockPruner:
    """Holds the calibration hidden states and runs one block at a time through stats, masks and propagation."""

    def __init__(self, decoder: StreamedDecoder, hidden: torch.Tensor | None, forward_batch: int,
                 target: str = "block"):
        self.decoder = decoder
        self.hidden = hidden  # [N, S, H] inputs of the current block (None: no calibration)
        self.dense_out = torch.empty_like(hidden) if hidden is not None else None
        self.forward_batch = forward_batch
        # target "model": the loss compares with the *dense model's* block output on its own dense inputs,
        # carried alongside in dense_hidden; "block": the dense block on the pruned inputs (Eq. 7 read literally).
        if target not in LOSS_TARGETS:
            raise ValueError(f"loss target {target!r}: choose one of {', '.join(LOSS_TARGETS)}")
        self.dense_hidden = hidden.clone() if target == "model" and hidden is not None else None

    def save(self, path: Path) -> None:
        """The calibration hidden states (the next block's inputs), written atomically."""
        if self.hidden is None:
            return
        tensors = {"hidden": self.hidden.contiguous()}
        if self.dense_hidden is not None:
            tensors["dense_hidden"] = self.dense_hidden.contiguous()
        part = path.with_name(path.name + ".tmp")
        save_file({k: v.cpu() for k, v in tensors.items()}, part)
        os.replace(part, path)

    @classmethod
    def restore(cls, decoder: StreamedDecoder, path: Path, forward_batch: int, target: str) -> BlockPruner:
        """The runner :meth:`save` wrote to ``path``; a missing file is an error, never "no calibration"."""
        if not path.exists():
            raise FileNotFoundError(f"--resume: {path}, the calibration inputs the progress record names, is "
                                    "missing; rerun without --resume to start over")
        state = load_file(path, device=str(decoder.device))
        runner = cls(decoder, state["hidden"], forward_batch, target)
        if runner.dense_hidden is not None:
            runner.dense_hidden = state["dense_hidden"]
        return runner

    def _batches(self, idx: torch.Tensor | None):
        n = self.hidden.shape[0]
        idx = torch.arange(n) if idx is None else idx
        for s in range(0, idx.numel(), self.forward_batch):
            yield idx[s : s + self.forward_batch].to(self.hidden.device)

    @torch.no_grad()
    def collect(self, layer, i: int, targets: dict, gram: bool = False) -> tuple[dict, dict | None, int]:
        """Dense forward of every window; returns each target's per-input-channel sum of squares, its
        Gram matrix XᵀX if ``gram`` (fp32; one per distinct input, since q/k/v and gate/up share theirs),
        and the token count."""
        dev = self.hidden.device
        sums: dict[str, torch.Tensor] = {}
        grams: dict[str, torch.Tensor] | None = {} if gram else None
        owner: dict[str, str] = {}  # target -> the target whose statistics it shares (the same input tensor)
        last: dict = {"x": None, "owner": None}

        def hook(name, features):
            def pre(_module, args):
                if name not in owner:  # decided on the first batch: q/k/v and gate/up get one tensor object
                    owner[name] = last["owner"] if args[0] is last["x"] else name
                    if owner[name] == name:
                        sums[name] = torch.zeros(features, dtype=torch.float32, device=dev)
                        if grams is not None:
                            grams[name] = torch.zeros(features, features, dtype=torch.float32, device=dev)
                last["x"], last["owner"] = args[0], owner[name]
                if owner[name] != name:
                    return
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                sums[name] += x.pow(2).sum(dim=0)
                if grams is not None:
                    grams[name].addmm_(x.T, x)
            return pre

        handles = [m.register_forward_pre_hook(hook(n, m.in_features)) for n, m in targets.items()]
        try:
            for b in self._batches(None):
                self.dense_out[b] = self.decoder.run_block(layer, i, self.hidden[b])
        finally:
            for h in handles:
                h.remove()
            last.clear()
        for name, src in owner.items():  # shared inputs share one (read-only) statistics tensor
            sums[name] = sums[src]
            if grams is not None:
                grams[name] = grams[src]
        if self.dense_hidden is not None:
            for b in self._batches(None):
                self.dense_out[b] = self.dense_hidden[b] = self.decoder.run_block(layer, i, self.dense_hidden[b])
        return sums, grams, self.hidden.shape[0] * self.hidden.shape[1]

    def loss(self, layer, i: int, idx: torch.Tensor | None) -> torch.Tensor:
        """The block loss of each window of ``idx`` (None: all) with the layer's current weights, in the order
        of ``idx``: windows are forwarded ``forward_batch`` at a time, and the line stage's guard still sees
        each window's own loss."""
        return self._run(layer, i, idx, write_back=False)

    def propagate(self, layer, i: int) -> float:
        """Pruned forward: the outputs become the next block's inputs; returns the block loss."""
        return float(self._run(layer, i, None, write_back=True).mean())

    @torch.no_grad()
    def _run(self, layer, i: int, idx: torch.Tensor | None, write_back: bool) -> torch.Tensor:
        losses = []
        for b in self._batches(idx):
            out = self.decoder.run_block(layer, i, self.hidden[b])
            losses.append(window_losses(self.dense_out[b], out).cpu())
            if write_back:
                self.hidden[b] = out
        return torch.cat(losses)


def _state_path(tmp: Path, block: int) -> Path:
    """Block ``block``'s calibration inputs in the partial export. Named by block, so that a kill between
    writing the next block's inputs and the progress record leaves the recorded block's inputs intact."""
    return tmp / f"calibration_state-{block:05d}.safetensors"


def _drop_states(tmp: Path, keep: Path | None) -> None:
    """Remove every calibration-input file but ``keep`` (older blocks', or one newer than the record)."""
    for path in tmp.glob("calibration_state-*.safetensors"):
        if path != keep:
            path.unlink()


def _arguments(cfg: ExportConfig, method: PruningMethod) -> dict:
    """The export's arguments as the report records them (JSON types: they compare with a read-back)."""
    search = getattr(method, "search", None)
    theta_init = getattr(method, "theta_init", None)
    return json.loads(json.dumps({**asdict(cfg), "pattern": str(cfg.pattern), "method": method.name,
                                  "search": asdict(search) if search else None,
                                  "theta_init": theta_init.to_json() if theta_init else None,
                                  "reconstruction": getattr(method, "reconstruction", None)}))


def _fingerprint(arguments: dict) -> dict:
    """Everything that decides the output bytes: a resumed run must match it exactly."""
    return {k: v for k, v in arguments.items() if k not in ("overwrite", "resume")}


def _changed(fingerprint: dict, other: dict) -> list[str]:
    """The names of the arguments in which two fingerprints differ."""
    return sorted(k for k in fingerprint.keys() | other.keys() if fingerprint.get(k) != other.get(k))


def _complete_export(directory: Path) -> dict | None:
    """The fingerprint of the export in ``directory`` if it is complete (its index is written last, after the
    report), else None."""
    report = directory / "bawa_report.json"
    if not (directory / INDEX_FILE).is_file() or not report.is_file():
        return None
    try:
        return _fingerprint(json.loads(report.read_text())["arguments"])
    except (ValueError, KeyError) as err:
        raise ValueError(f"{report}: not a readable bawa-export report ({err!r})") from None


def _recorded_fingerprint(partial: Path) -> dict | None:
    """The fingerprint of an unfinished export: from its progress record, or from its report once complete."""
    progress = partial / PROGRESS_FILE
    if progress.is_file():
        return json.loads(progress.read_text())["progress"]["fingerprint"]
    return _complete_export(partial)


def _finish_earlier_run(cfg: ExportConfig, fingerprint: dict) -> Path | None:
    """With ``--resume``: an earlier run of this very export that got past its last block, if there is one.

    Either ``out`` is already that export (the run was killed after its rename, or this is a retry of a run
    that succeeded): nothing is redone, leftovers of the rename are removed. Or ``.<out>.partial`` is complete
    (index written, progress record dropped) and only the rename is missing: it is renamed now. Returns the
    path of the report, or None when the export has to run.
    """
    out = Path(cfg.out)
    partial = partial_dir(out)
    done = _complete_export(out)
    if done is not None:
        changed = _changed(fingerprint, done)
        if changed and not cfg.overwrite:
            raise FileExistsError(f"output {out} already exists, an export made with other arguments "
                                  f"({', '.join(changed)}); pass --overwrite to replace it")
        if changed:
            return None
        logger.info("--resume: %s is already a finished export with these arguments; nothing to do", out)
        remove_stale_old(out)
        if partial.exists():
            other = _recorded_fingerprint(partial)
            if other is None or other == fingerprint:
                logger.info("removing %s, a stale copy of the same export", partial)
                shutil.rmtree(partial)
            else:
                logger.warning("leaving %s alone: an unfinished export with other arguments (%s)", partial,
                               ", ".join(_changed(fingerprint, other)))
        return out / "bawa_report.json"
    if (partial / PROGRESS_FILE).exists():
        return None
    complete = _complete_export(partial)
    if complete is None:
        return None
    changed = _changed(fingerprint, complete)
    if changed:
        raise ValueError(f"--resume: the unfinished export in {partial} was made with other arguments "
                         f"({', '.join(changed)}); rerun without --resume to start over")
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"output {out} already exists; pass --overwrite to replace it")
    logger.info("--resume: %s is complete, only its rename was missing; moving it to %s", partial, out)
    publish(partial, out)
    return out / "bawa_report.json"


def _set_masked(targets: dict, dense: dict, masks: dict, weights: dict | None = None) -> None:
    for n, m in targets.items():
        m.weight.data.copy_(weights[n] if weights else dense[n])
        apply_mask_(m.weight.data, masks[n])


def check_shapes(decoder: StreamedDecoder, expected: dict[str, list[int]], pattern: SparsityPattern) -> None:
    """Fail before any work if a target's stored dtype or shape is not what the config implies, or if an
    N:M group does not divide its input dimension (headers only; no tensor data is read)."""
    for key, want in expected.items():
        wkey = f"{key}.weight"
        if wkey not in decoder.ckpt.weight_map:
            raise ValueError(f"{decoder.ckpt.path}: tensor {wkey} is missing from the checkpoint")
        dtype, shape = decoder.ckpt.header(wkey)
        if dtype not in ("F32", "BF16", "F16"):
            raise ValueError(f"{decoder.ckpt.path}: {wkey} is stored as {dtype}, not a float32/bf16/fp16 weight")
        if shape != want:
            raise ValueError(f"{decoder.ckpt.path}: {wkey} has shape {shape}, but the config implies {want}")
        pattern.check_shape(shape[1], wkey)


def open_decoder(cfg: ExportConfig) -> tuple[StreamedDecoder, torch.dtype]:
    """The streamed model in its compute dtype, and the output dtype (``--dtype``, default the checkpoint's).

    Compute defaults to float32 on CPU (bf16 matmuls are several times slower there), else the output dtype.
    """
    decoder = StreamedDecoder(cfg.model, device=cfg.device)
    out_dtype = parse_dtype(cfg.dtype) or decoder.stored_dtype
    decoder.dtype = parse_dtype(cfg.compute_dtype) or (torch.float32 if decoder.device.type == "cpu" else out_dtype)
    return decoder, out_dtype


def calibration_hidden(decoder: StreamedDecoder, cfg: ExportConfig) -> torch.Tensor | None:
    """Block 0's inputs for the calibration windows, or None without ``--calib``."""
    if not cfg.calib:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(decoder.ckpt.path, trust_remote_code=False)
    ids = calibration_windows(load_documents(cfg.calib), tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)
    logger.info("calibration: %d windows of %d tokens from %s", ids.shape[0], ids.shape[1], cfg.calib)
    return decoder.embed(ids)


def write_non_block(decoder: StreamedDecoder, writer: CheckpointWriter, out_dtype: torch.dtype) -> None:
    """Embeddings, final norm and head (whatever is outside the blocks), cast to the output dtype, as one shard."""
    tensors = decoder.ckpt.read(decoder.non_block_keys())
    writer.write_shard({k: v.to(out_dtype) if v.is_floating_point() else v for k, v in tensors.items()})


def prune_checkpoint(cfg: ExportConfig, method: PruningMethod) -> dict:
    """Prune ``cfg.model`` into ``cfg.out`` (dense, +0.0 at pruned weights); returns the report."""
    t_start = time.time()
    decoder, out_dtype = open_decoder(cfg)
    with torch.device("meta"):
        probe = decoder._layer_cls(decoder.config, layer_idx=0)
    linears = linear_modules(probe)
    block_linears = list(linears)
    shapes = {n: list(m.weight.shape) for n, m in linears.items()}
    del probe, linears
    targets_of = {
        i: [n for n in block_linears if not is_ignored(f"{decoder.block_prefix(i)}{n}", cfg.ignore)]
        for i in range(decoder.num_layers)
    }
    check_shapes(decoder, {f"{decoder.block_prefix(i)}{n}": shapes[n] for i, ns in targets_of.items() for n in ns},
                 cfg.pattern)
    if method.needs_calibration and not cfg.calib:
        raise ValueError(f"--method {method.name} needs calibration text: pass --calib FILE or a dataset name")
    method.check_targets(block_linears)

    arguments = _arguments(cfg, method)
    fingerprint = _fingerprint(arguments)
    if cfg.resume and (finished := _finish_earlier_run(cfg, fingerprint)) is not None:
        return json.loads(finished.read_text())
    writer = CheckpointWriter(cfg.out, num_shards=decoder.num_layers + 1, overwrite=cfg.overwrite,
                              resumable=True, resume=cfg.resume)
    try:
        progress = writer.progress
        if progress is not None and progress["fingerprint"] != fingerprint:
            changed = _changed(fingerprint, progress["fingerprint"])
            raise ValueError(f"--resume: the unfinished export in {writer.tmp} was made with other arguments "
                             f"({', '.join(changed)}); rerun without --resume to start over")
        searching = method.needs_block_loss  # only then is the block loss (and its target) ever evaluated
        target = cfg.loss_target if searching else "block"
        if progress is not None:
            done = progress["blocks_done"]
            logger.info("--resume: continuing %s at block %d of %d", cfg.out, done, decoder.num_layers)
            state = _state_path(writer.tmp, done)
            if cfg.calib and done < decoder.num_layers:
                runner = BlockPruner.restore(decoder, state, cfg.forward_batch, target)
            else:
                runner = BlockPruner(decoder, None, cfg.forward_batch, target)
            _drop_states(writer.tmp, keep=state)
        else:
            runner = BlockPruner(decoder, calibration_hidden(decoder, cfg), cfg.forward_batch, target)
            write_non_block(decoder, writer, out_dtype)
            progress = {"fingerprint": fingerprint, "blocks_done": 0, "blocks": []}
            runner.save(_state_path(writer.tmp, 0))
            writer.save_progress(progress)

        blocks = progress["blocks"]
        for i in tqdm(range(progress["blocks_done"], decoder.num_layers), desc=f"prune {method.name} {cfg.pattern}",
                      disable=None, initial=progress["blocks_done"], total=decoder.num_layers):
            blocks.append(_prune_block(decoder, runner, method, cfg, i, targets_of[i], writer, out_dtype))
            state = _state_path(writer.tmp, i + 1) if i + 1 < decoder.num_layers else None
            if state is not None:
                runner.save(state)  # the next block's inputs, then the record that names them
            writer.save_progress({**progress, "blocks_done": i + 1, "blocks": blocks})
            _drop_states(writer.tmp, keep=state)

        writer.copy_side_files(decoder.ckpt.path)
        config = decoder.ckpt.config_dict()
        config.pop("torch_dtype", None)
        config["dtype"] = _DTYPE_NAMES[out_dtype]
        if cfg.packed:
            dense_linears = [f"{decoder.block_prefix(i)}{n}" for i in range(decoder.num_layers)
                             for n in block_linears if n not in targets_of[i]]
            config["quantization_config"] = quantization_config(str(cfg.pattern), ["lm_head", *dense_linears],
                                                                method.name)
        writer.write_json("config.json", config)
        report = {
            "bawa_vllm_version": _version(),
            "arguments": arguments,
            "model_type": decoder.config.model_type,
            "num_blocks": decoder.num_layers,
            "dtype": _DTYPE_NAMES[out_dtype],
            "compute_dtype": _DTYPE_NAMES[decoder.dtype],
            "loss_target": cfg.loss_target if searching else "block",
            "format": "packed-2:4" if cfg.packed else "dense",
            "sparsity": _overall_sparsity(blocks),
            "blocks": blocks,
            "theta_summary": theta_summary(blocks),
            "seconds": round(time.time() - t_start, 3),
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        }
        writer.write_json("bawa_report.json", report)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    logger.info("wrote %s in %.1f s (overall sparsity %.4f)", cfg.out, report["seconds"], report["sparsity"])
    return report


def _prune_block(decoder, runner: BlockPruner, method: PruningMethod, cfg: ExportConfig, i: int,
                 names: list[str], writer: CheckpointWriter, out_dtype: torch.dtype) -> dict:
    t0 = time.time()
    layer = decoder.load_block(i)
    modules = linear_modules(layer)
    targets = {n: modules[n] for n in names}
    dense = {n: m.weight.detach().clone() for n, m in targets.items()}
    # XᵀX is always collected with calibration data: reconstruction methods need it, and every method's
    # report gives the layer-output error ||(W − Ŵ)X||² / ||WX||², which it measures.
    act, gram, n_tokens = runner.collect(layer, i, targets, gram=True) if runner.hidden is not None \
        else ({}, None, 0)

    def loss(masks, idx):
        _set_masked(targets, dense, masks)
        return runner.loss(layer, i, idx)

    job = BlockJob(index=i, targets=targets, dense=dense, act_sum_sq=act, pattern=cfg.pattern,
                   n_samples=0 if runner.hidden is None else runner.hidden.shape[0],
                   loss=loss if runner.hidden is not None else None, gram=gram, n_tokens=n_tokens)
    t_method = time.time()
    result = method.prune_block(job)
    t_method = time.time() - t_method
    _set_masked(targets, dense, result.masks, result.weights)
    block_loss = runner.propagate(layer, i) if runner.hidden is not None else None

    prefix = decoder.block_prefix(i)
    state = {k: v.to(out_dtype) for k, v in layer.state_dict().items()}
    if cfg.packed:
        state = pack_state_dict(state, names)
    writer.write_shard({f"{prefix}{k}": v for k, v in state.items()})
    layers = {}
    for n, m in targets.items():
        w = m.weight
        layers[n] = {"shape": list(w.shape), "sparsity": round(1.0 - w.count_nonzero().item() / w.numel(), 6)}
        if n in result.theta:
            layers[n]["theta"] = result.theta[n]
        if gram is not None:  # ||(W − Ŵ)X||² / ||WX||²: the mask alone, then the method's weights
            layers[n]["recon_error"] = {"masked": output_error(dense[n], dense[n].masked_fill(~result.masks[n], 0.0),
                                                               gram[n]),
                                        "final": output_error(dense[n], w.detach(), gram[n])}
    entry = {"block": i, "loss": block_loss, "search": result.search, "layers": layers,
             "seconds": round(time.time() - t0, 3), "method_seconds": round(t_method, 3),
             "rss_mib": round(peak_rss_mib(), 1)}
    if result.search:
        s = result.search
        coarse = s.get("coarse")
        coarse_note = "" if not coarse else " coarse-stage layer error vs Wanda %.3f (mean of %d linears);" % (
            sum(c["error_vs_wanda"] or 1.0 for c in coarse.values()) / len(coarse), len(coarse))
        line_note = "" if "line" not in s else " line stage t = %g;" % s["line"]["t"]
        zo_note = "" if "initial_loss" not in s else " zeroth-order loss %.5g -> %.5g (%d steps);" % (
            s["initial_loss"], s["best_loss"], s["steps"])
        logger.info("block %d:%s%s%s loss %.5g, %.1f s", i, coarse_note, line_note, zo_note, block_loss,
                    entry["seconds"])
    else:
        logger.info("block %d: loss %s, %.1f s", i, "n/a" if block_loss is None else f"{block_loss:.5g}", entry["seconds"])
    del layer, modules, targets, dense, act, gram
    return entry


def _overall_sparsity(blocks: list[dict]) -> float:
    zeros = total = 0
    for b in blocks:
        for layer in b["layers"].values():
            n = layer["shape"][0] * layer["shape"][1]
            zeros += layer["sparsity"] * n
            total += n
    return round(zeros / total, 6) if total else 0.0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bawa-vllm")
    except PackageNotFoundError:
        return "unknown"


__all__ = ["ExportConfig", "prune_checkpoint", "is_ignored", "rms_normalize"]
