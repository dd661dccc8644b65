"""Convert compressed-tensors ``sparse-24-bitmask`` checkpoints (llm-compressor <= 0.10) to the bawa-sparse format.

Current vLLM refuses any compressed-tensors ``sparsity_config``, and current llm-compressor no longer
writes one, so existing 2:4 checkpoints of that format can only be served after conversion. Their
layout, per pruned linear ``P``: ``P.compressed [N, K/2]`` (kept values, row-major),
``P.bitmask [N, ceil(K/8)]`` uint8 (kept positions, ``numpy.packbits(..., bitorder="little")``) and
``P.shape`` (int64 ``[2, 1]``). The conversion streams shard by shard; everything that is not a
``P.*`` triple is copied unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from ..modeling.checkpoint import Checkpoint, CheckpointWriter
from .format import pack_24, quantization_config

logger = logging.getLogger(__name__)
_PARTS = ("compressed", "bitmask", "shape")


def bitmask_to_dense(compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor, name: str) -> torch.Tensor:
    n, k = (int(v) for v in shape.flatten().tolist())
    if bitmask.dtype != torch.uint8 or bitmask.shape != (n, (k + 7) // 8):
        raise ValueError(f"{name}.bitmask: expected uint8 {(n, (k + 7) // 8)}, got {bitmask.dtype} {tuple(bitmask.shape)}")
    bits = (bitmask.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1  # little bit order
    mask = bits.reshape(n, -1)[:, :k].bool()
    if int(mask.sum()) != compressed.numel():
        raise ValueError(f"{name}: bitmask marks {int(mask.sum())} values but {name}.compressed holds {compressed.numel()}")
    return torch.zeros(n, k, dtype=compressed.dtype).masked_scatter_(mask, compressed)


def _check_config(config: dict) -> dict:
    q = config.get("quantization_config") or {}
    sparsity = q.get("sparsity_config") or {}
    if q.get("quant_method", "").replace("_", "-") != "compressed-tensors" or \
            sparsity.get("format") != "sparse-24-bitmask":
        raise ValueError("not a compressed-tensors sparse-24-bitmask checkpoint: config.json's quantization_config "
                         "needs quant_method 'compressed-tensors' and sparsity_config.format 'sparse-24-bitmask'")
    if sparsity.get("sparsity_structure") != "2:4":
        raise ValueError(f"sparsity_structure {sparsity.get('sparsity_structure')!r} is not 2:4")
    if q.get("config_groups"):
        raise NotImplementedError("quantized sparse-24 checkpoints (config_groups) are not supported; "
                                  "only sparse, unquantized weights convert")
    return sparsity


def convert_compressed_tensors(src: str | Path, out: str | Path, overwrite: bool = False) -> int:
    """Write ``out`` in the bawa-sparse format from a ``sparse-24-bitmask`` checkpoint; returns the packed count."""
    ckpt = Checkpoint(src)
    config = ckpt.config_dict()
    _check_config(config)
    files = sorted(set(ckpt.weight_map.values()))
    writer = CheckpointWriter(out, num_shards=len(files), overwrite=overwrite)
    packed = 0
    dense_linears = []
    try:
        for fname in tqdm(files, desc="convert shards", disable=None):
            tensors = ckpt.read([k for k, f in ckpt.weight_map.items() if f == fname])
            modules = {k[: -len(".compressed")] for k in tensors if k.endswith(".compressed")}
            out_tensors = {}
            for module in sorted(modules):
                parts = {p: tensors.pop(f"{module}.{p}", None) for p in _PARTS}
                missing = [p for p, t in parts.items() if t is None]
                if missing:
                    raise ValueError(f"{module}: {', '.join(missing)} missing next to {module}.compressed in {fname}")
                dense = bitmask_to_dense(parts["compressed"], parts["bitmask"], parts["shape"], module)
                values, meta = pack_24(dense, f"{module}.weight")
                out_tensors[f"{module}.weight_values"], out_tensors[f"{module}.weight_meta"] = values, meta
                packed += 1
            for k, v in tensors.items():
                if k.endswith((".bitmask", ".shape")):
                    raise ValueError(f"{k}: no matching .compressed tensor in {fname}")
                if k.endswith("_proj.weight") and ".layers." in k:
                    dense_linears.append(k[: -len(".weight")])
                out_tensors[k] = v
            writer.write_shard(out_tensors)
        writer.copy_side_files(ckpt.path)
        config["quantization_config"] = quantization_config(
            "2:4", ["lm_head", *dense_linears], "compressed-tensors sparse-24-bitmask")
        writer.write_json("config.json", config)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    logger.info("converted %d packed linears into %s", packed, out)
    return packed
