"""LLM-BIP structured pruning (Wu, 2024): whole attention heads and FFN channels, block by block.

Scores from one calibration forward per block (inputs from the already pruned earlier blocks):

- FFN hidden channel j:        ``s_j^F = ||X_j^U||_1 · ||W^D_j||_1`` (X^U: the input of ``down_proj``,
  W^D_j: column j of ``down_proj``);
- attention output channel j:  ``s_j^H = ||X_j^H||_1 · ||W^O_j (I + |W^U||W^D|)||_1`` (X^H: the input of
  ``o_proj``, W^O_j: column j of ``o_proj``), an upper bound of the block output's L1 change when the
  channel is removed. For SwiGLU the gate and up branches both carry the input change into the
  product ``σ(gate)·up`` linearly (``σ'(g)u·Δg + σ(g)·Δu``), so ``|W^U|`` is read as ``|W^up| + |W^gate|``.
  A head's score is the sum of its channels'.

Baselines: ``magnitude`` (sum of |W| of the weights connected to the head or channel) and ``random``.

What the ratio means: the fraction of the target parameters (q, k, v, o, gate, up, down) removed.
Query heads go by whole heads, the same number in every KV group (so the config stays a standard GQA
one, and the KV cache keeps its size); FFN channels fill the rest, kept in multiples of 8. Both counts
are the same in every block, so the output is a standard config (fewer heads, smaller
``intermediate_size``) that transformers and stock vLLM load. Qwen2 keeps all heads (vLLM's Qwen2
derives head_dim from hidden_size / heads), so its ratio is carried by FFN channels alone.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm import tqdm

from ..modeling.checkpoint import CheckpointWriter
from .engine import (
    _DTYPE_NAMES,
    BlockPruner,
    ExportConfig,
    _version,
    calibration_hidden,
    open_decoder,
    peak_rss_mib,
    write_non_block,
)

logger = logging.getLogger(__name__)

STRUCTURED_METHODS = ("llm-bip", "magnitude", "random")
CLI_METHODS = {"llm-bip": "llm-bip", "structured-magnitude": "magnitude", "structured-random": "random"}
_HEAD_PRUNABLE = ("llama", "mistral")


def ffn_scores(method: str, x_up_l1: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
               gen: torch.Generator | None = None) -> torch.Tensor:
    """[intermediate] channel scores; weights in nn.Linear layout ([out, in])."""
    if method == "llm-bip":
        return x_up_l1 * down.float().abs().sum(dim=0)
    if method == "magnitude":
        return gate.float().abs().sum(1) + up.float().abs().sum(1) + down.float().abs().sum(0)
    return torch.rand(down.shape[1], generator=gen).to(down.device)


def head_scores(method: str, x_attn_l1: torch.Tensor, q: torch.Tensor, o: torch.Tensor, gate: torch.Tensor,
                up: torch.Tensor, down: torch.Tensor, head_dim: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """[num_heads] query-head scores (sum of the head's output-channel scores)."""
    n_heads = o.shape[1] // head_dim
    if method == "llm-bip":
        a = o.float().abs().T  # [heads*hd, hidden]: row j is |W^O_j|
        t = (up.float().abs() + gate.float().abs()).T @ down.float().abs().sum(dim=0)  # [hidden]
        channel = x_attn_l1 * (a.sum(dim=1) + a @ t)
        return channel.view(n_heads, head_dim).sum(1)
    if method == "magnitude":
        return (q.float().abs().sum(1) + o.float().abs().sum(0)).view(n_heads, head_dim).sum(1)
    return torch.rand(n_heads, generator=gen).to(o.device)


def plan_counts(config, ratio: float) -> dict:
    """How many query heads per KV group and FFN channels to keep so that ``ratio`` of the targets go."""
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or hidden // heads
    group = heads // kv
    attn_params = (2 * heads + 2 * kv) * hd * hidden
    ffn_params = 3 * hidden * inter
    total = attn_params + ffn_params
    remove = ratio * total
    keep_per_group = group
    if config.model_type in _HEAD_PRUNABLE:
        keep_per_group = max(1, group - int(ratio * group))  # whole heads, uniform per group, rounded down
    attn_removed = 2 * (group - keep_per_group) * kv * hd * hidden
    ffn_remove = max(0.0, remove - attn_removed)
    keep_inter = inter - int(ffn_remove / (3 * hidden))
    keep_inter = max(8, min(inter, 8 * round(keep_inter / 8)))
    kept = (2 * keep_per_group * kv + 2 * kv) * hd * hidden + 3 * hidden * keep_inter
    return {"head_dim": hd, "heads_per_group": group, "keep_heads_per_group": keep_per_group, "kv_heads": kv,
            "intermediate": inter, "keep_intermediate": keep_inter, "target_params": total, "kept_params": kept,
            "removed_fraction": 1 - kept / total}


def prune_structured(cfg: ExportConfig, method: str, ratio: float) -> dict:
    """Write a smaller dense checkpoint with the lowest-scoring heads and FFN channels removed."""
    if method not in STRUCTURED_METHODS:
        raise ValueError(f"structured method {method!r}: choose one of {', '.join(STRUCTURED_METHODS)}")
    if not 0 < ratio < 1:
        raise ValueError(f"structured ratio {ratio}: must lie strictly between 0 and 1")
    t_start = time.time()
    decoder, out_dtype = open_decoder(cfg)
    plan = plan_counts(decoder.config, ratio)
    if method == "llm-bip" and not cfg.calib:
        raise ValueError("--method llm-bip needs calibration text: pass --calib FILE or a dataset name")
    writer = CheckpointWriter(cfg.out, num_shards=decoder.num_layers + 1, overwrite=cfg.overwrite)
    gen = torch.Generator().manual_seed(cfg.seed)
    try:
        runner = BlockPruner(decoder, calibration_hidden(decoder, cfg), cfg.forward_batch)
        write_non_block(decoder, writer, out_dtype)
        blocks = [_prune_block(decoder, runner, method, plan, i, writer, out_dtype, gen)
                  for i in tqdm(range(decoder.num_layers), desc=f"{method} structured {ratio:g}", disable=None)]
        writer.copy_side_files(decoder.ckpt.path)
        config = decoder.ckpt.config_dict()
        config.pop("torch_dtype", None)
        config.update(dtype=_DTYPE_NAMES[out_dtype], intermediate_size=plan["keep_intermediate"],
                      num_attention_heads=plan["keep_heads_per_group"] * plan["kv_heads"])
        if decoder.config.model_type in _HEAD_PRUNABLE:
            config["head_dim"] = plan["head_dim"]  # no longer hidden_size / num_attention_heads
        writer.write_json("config.json", config)
        per_block = plan["target_params"]
        report = {"bawa_vllm_version": _version(), "method": method, "ratio": ratio, "plan": plan,
                  "arguments": {"model": cfg.model, "calib": cfg.calib, "nsamples": cfg.nsamples, "seqlen": cfg.seqlen,
                                "seed": cfg.seed},
                  "params_before": per_block * decoder.num_layers, "params_after": plan["kept_params"] * decoder.num_layers,
                  "macs_per_token_before": per_block * decoder.num_layers,
                  "macs_per_token_after": plan["kept_params"] * decoder.num_layers,
                  "blocks": blocks, "seconds": round(time.time() - t_start, 3), "peak_rss_mib": round(peak_rss_mib(), 1)}
        writer.write_json("bawa_report.json", report)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return report


@torch.no_grad()
def _prune_block(decoder, runner, method, plan, i, writer, out_dtype, gen) -> dict:
    layer = decoder.load_block(i)
    attn, mlp = layer.self_attn, layer.mlp
    x_l1 = {}
    if runner.hidden is not None:
        handles = []
        for name, mod in (("o", attn.o_proj), ("down", mlp.down_proj)):
            x_l1[name] = torch.zeros(mod.in_features, device=runner.hidden.device)

            def pre(_m, args, name=name):
                x_l1[name] += args[0].reshape(-1, args[0].shape[-1]).float().abs().sum(0)
            handles.append(mod.register_forward_pre_hook(pre))
        runner.collect(layer, i, {})
        for h in handles:
            h.remove()
    hd, kv, group = plan["head_dim"], plan["kv_heads"], plan["heads_per_group"]
    q, o = attn.q_proj.weight, attn.o_proj.weight
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    hs = head_scores(method, x_l1.get("o"), q, o, gate, up, down, hd, gen).view(kv, group)
    keep_in_group = hs.topk(plan["keep_heads_per_group"], dim=1).indices.sort(dim=1).values
    heads = (keep_in_group + torch.arange(kv, device=hs.device).unsqueeze(1) * group).flatten()
    fs = ffn_scores(method, x_l1.get("down"), gate, up, down, gen)
    channels = fs.topk(plan["keep_intermediate"]).indices.sort().values
    rows = (heads.unsqueeze(1) * hd + torch.arange(hd, device=heads.device)).flatten()
    # propagate through the equivalent dense block: removed heads/channels contribute exactly zero
    o_keep = torch.zeros(o.shape[1], dtype=torch.bool, device=o.device)
    o_keep[rows] = True
    d_keep = torch.zeros(down.shape[1], dtype=torch.bool, device=down.device)
    d_keep[channels] = True
    o.masked_fill_(~o_keep.unsqueeze(0), 0.0)
    down.masked_fill_(~d_keep.unsqueeze(0), 0.0)
    loss = runner.propagate(layer, i) if runner.hidden is not None else None
    state = dict(layer.state_dict())
    state["self_attn.q_proj.weight"] = state["self_attn.q_proj.weight"][rows]
    if "self_attn.q_proj.bias" in state:
        state["self_attn.q_proj.bias"] = state["self_attn.q_proj.bias"][rows]
    state["self_attn.o_proj.weight"] = state["self_attn.o_proj.weight"][:, rows]
    for k in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        state[k] = state[k][channels]
    state["mlp.down_proj.weight"] = state["mlp.down_proj.weight"][:, channels]
    prefix = decoder.block_prefix(i)
    writer.write_shard({f"{prefix}{k}": v.to(out_dtype).contiguous() for k, v in state.items()})
    logger.info("block %d: kept heads %s, %d FFN channels, loss %s", i, heads.tolist(), channels.numel(),
                "n/a" if loss is None else f"{loss:.5g}")
    return {"block": i, "kept_heads": heads.tolist(), "kept_channels": channels.tolist(), "loss": loss}
