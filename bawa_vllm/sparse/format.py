"""The 2:4-packed weight format (``docs/FORMAT.md``): kept values plus 2-bit positions, row-local.

A 2:4 weight ``W [N, K]`` is stored as

- ``weight_values [N, K/2]``, model dtype: the 2 kept values of every group of 4 along K, in order;
- ``weight_meta [N, K/8]``, uint8: the positions of each group as a nibble ``p0 | p1 << 2``
  (``p0 < p1``), two groups per byte, the even group in the low nibble.

Two groups per byte (rather than one) makes the metadata K/8 bytes per row, so values plus metadata
are 9/16 of the dense bytes in 16-bit dtypes (0.5625 ≤ 0.57); it still shards under vLLM's
row-parallel loader whenever ``K / tp`` divides by 8. Everything is row-local, so column-parallel
and merged (QKV, gate_up) shards are plain row slices.

A group with fewer than 2 non-zeros is stored with its zero-valued positions filled in from the
lowest index, so every group has exactly two (position, value) pairs. A group with more than 2
non-zeros is not 2:4: packing raises an error naming the tensor and the first bad group, it never
re-prunes.
"""

from __future__ import annotations

from typing import NoReturn

import torch

FORMAT_NAME = "2of4-rowpacked"
FORMAT_VERSION = 1
GROUP = 4
KEPT = 2
VALUES_SUFFIX = "weight_values"
META_SUFFIX = "weight_meta"


class PackedFormatError(ValueError):
    """A tensor is not 2:4, or its packed form is malformed."""


def _check_2d(weight: torch.Tensor, name: str) -> tuple[int, int]:
    if weight.dim() != 2:
        raise PackedFormatError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if k % (2 * GROUP):
        raise PackedFormatError(f"{name}: 2:4 packing needs the input dimension to divide by 8, got {k}")
    return n, k


def first_bad_group(weight: torch.Tensor) -> tuple[int, int] | None:
    """(row, group) of the first group of 4 along K with more than 2 non-zeros, or None if 2:4."""
    n, k = weight.shape
    bad = ((weight.reshape(n, k // GROUP, GROUP) != 0).sum(-1) > KEPT).nonzero()
    return None if bad.numel() == 0 else (int(bad[0, 0]), int(bad[0, 1]))


def validate_24(weight: torch.Tensor, name: str = "weight") -> None:
    _check_2d(weight, name)
    bad = first_bad_group(weight)
    if bad is not None:
        row, group = bad
        cols = weight[row, group * GROUP : (group + 1) * GROUP].tolist()
        raise PackedFormatError(
            f"{name} is not 2:4 sparse: row {row}, group {group} (columns {group * GROUP}-{group * GROUP + 3}) "
            f"has {sum(v != 0 for v in cols)} non-zeros: {cols}"
        )


def pack_24(weight: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [N, K/2], meta [N, K/8] uint8)`` of a 2:4 weight ``[N, K]``."""
    validate_24(weight, name)
    n, k = weight.shape
    groups = weight.reshape(n, k // GROUP, GROUP)
    position = torch.arange(GROUP, device=weight.device)
    # non-zeros first (key 0..3), then zero positions (4..7), lowest index first within each
    key = (groups == 0).to(torch.int64) * GROUP + position
    idx = key.topk(KEPT, dim=-1, largest=False).indices.sort(dim=-1).values  # [N, K/4, 2], p0 < p1
    values = groups.gather(-1, idx).reshape(n, k // 2)
    nibbles = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)  # [N, K/4]
    meta = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return values.contiguous(), meta.contiguous()


# Rows per pass of the unpack/validate loops: every transient is bounded by this many bytes, not by N × K
# (a 70B gate_up at TP=1 is 57344 × 8192; int64 positions of it were 5 GB).
_CHUNK_BYTES = 1 << 26


def _row_chunks(n: int, bytes_per_row: int):
    """``(start, stop)`` row ranges whose transients stay under ``_CHUNK_BYTES``."""
    rows = max(1, _CHUNK_BYTES // max(1, bytes_per_row))
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def _nibbles(meta: torch.Tensor) -> torch.Tensor:
    """The group nibbles ``[rows, K/4]`` (uint8) of ``meta [rows, K/8]``: even group from the low nibble."""
    return torch.stack((meta & 0xF, meta >> 4), dim=-1).reshape(meta.shape[0], -1)


def positions(meta: torch.Tensor) -> torch.Tensor:
    """The kept positions ``[N, K/4, 2]`` (uint8, ``p0`` then ``p1``) encoded in ``meta [N, K/8]``."""
    nibbles = _nibbles(meta)
    return torch.stack((nibbles & 3, nibbles >> 2), dim=-1)


def first_bad_meta(meta: torch.Tensor) -> tuple[int, int] | None:
    """(row, group) of the first nibble with ``p0 >= p1``, or None; uint8 work in row chunks, one pass.

    The search stays in uint8/bool tensors of at most ``_CHUNK_BYTES`` (no int64 index tensor: a zeroed
    ``weight_meta``, e.g. from ``--load-format dummy``, would make ``nonzero`` list every group).
    """
    groups = 2 * meta.shape[1]
    for start, stop in _row_chunks(meta.shape[0], 6 * meta.shape[1]):
        nibbles = _nibbles(meta[start:stop])
        bad = (nibbles & 3) >= (nibbles >> 2)
        if bool(bad.any()):
            flat = int(bad.reshape(-1).to(torch.uint8).argmax())  # the first maximum: row-major order
            return start + flat // groups, flat % groups
    return None


def _check_shapes(values: torch.Tensor, meta: torch.Tensor, name: str, shape: tuple[int, int] | None) -> None:
    if meta.dtype != torch.uint8:
        raise PackedFormatError(f"{name}.{META_SUFFIX}: expected dtype uint8, got {meta.dtype}")
    if values.dim() != 2 or meta.dim() != 2:
        raise PackedFormatError(f"{name}: packed tensors must be 2-D, got values {tuple(values.shape)}, "
                                f"meta {tuple(meta.shape)}")
    n, half_k = values.shape
    if meta.shape != (n, half_k // 4) or half_k % 4:
        raise PackedFormatError(f"{name}: {META_SUFFIX} has shape {tuple(meta.shape)}, expected "
                                f"{(n, half_k // 4)} for {VALUES_SUFFIX} of shape {tuple(values.shape)}")
    if shape is not None and (n, 2 * half_k) != tuple(shape):
        raise PackedFormatError(f"{name}: packed shape {(n, 2 * half_k)} does not match the layer's {tuple(shape)}")


def _raise_bad_group(meta: torch.Tensor, name: str, row: int, group: int) -> NoReturn:
    nibble = (int(meta[row, group // 2]) >> (4 * (group % 2))) & 0xF
    raise PackedFormatError(f"{name}: {META_SUFFIX} row {row}, group {group} has invalid positions "
                            f"{[nibble & 3, nibble >> 2]} (need p0 < p1)")


def check_packed(values: torch.Tensor, meta: torch.Tensor, name: str = "weight",
                 shape: tuple[int, int] | None = None) -> None:
    """Shapes and dtypes agree with each other (and with the dense ``shape``), and every nibble is valid."""
    _check_shapes(values, meta, name, shape)
    bad = first_bad_meta(meta)
    if bad is not None:
        _raise_bad_group(meta, name, *bad)


def check_packed_shards(values: torch.Tensor, meta: torch.Tensor, name: str, shape: tuple[int, int] | None,
                        shards: list[tuple[str, int, int]]) -> None:
    """:func:`check_packed` of a fused layer in one pass over its metadata, naming the shard of a bad row.

    ``shards`` are ``(label, first row, rows)`` of the logical matrices fused into the layer (q/k/v,
    gate/up); a bad group is reported as ``check_packed(values[rows], meta[rows], label)`` would report
    it, with the row counted from the shard's start. Rows outside every shard are named after ``name``.
    """
    _check_shapes(values, meta, name, shape)
    bad = first_bad_meta(meta)
    if bad is None:
        return
    row, group = bad
    for label, start, rows in shards:
        if start <= row < start + rows:
            _raise_bad_group(meta[start : start + rows], label, row - start, group)
    _raise_bad_group(meta, name, row, group)


def unpack_24(values: torch.Tensor, meta: torch.Tensor, name: str = "weight",
              validate: bool = True) -> torch.Tensor:
    """The dense ``[N, K]`` weight (zeros elsewhere, +0.0) from its packed form.

    Built in row chunks with uint8 positions and selects (no int64 scatter index), straight into the
    output. ``validate=False`` skips :func:`check_packed` for callers that already ran it on this layer.
    """
    if validate:
        check_packed(values, meta, name)
    n, half_k = values.shape
    dense = torch.empty(n, half_k // 2, GROUP, dtype=values.dtype, device=values.device)
    column = torch.arange(GROUP, dtype=torch.uint8, device=values.device)
    meta = meta.to(values.device)
    for start, stop in _row_chunks(n, 8 * half_k * values.element_size()):
        nibbles = _nibbles(meta[start:stop]).unsqueeze(-1)  # [rows, K/4, 1]
        pair = values[start:stop].reshape(stop - start, half_k // 2, KEPT)
        # nested selects keep each value's bits (a kept -0.0 stays -0.0); +0.0 at the two other columns
        torch.where((nibbles & 3) == column, pair[..., :1],
                    torch.where((nibbles >> 2) == column, pair[..., 1:], 0), out=dense[start:stop])
    return dense.reshape(n, 2 * half_k)


def pack_state_dict(state: dict[str, torch.Tensor], modules: list[str]) -> dict[str, torch.Tensor]:
    """``state`` with ``<m>.weight`` replaced by ``<m>.weight_values`` / ``<m>.weight_meta`` for each module ``m``."""
    out = dict(state)
    for m in modules:
        values, meta = pack_24(out.pop(f"{m}.weight"), f"{m}.weight")
        out[f"{m}.{VALUES_SUFFIX}"], out[f"{m}.{META_SUFFIX}"] = values, meta
    return out


def unpack_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`pack_state_dict`: every packed pair becomes a dense ``<m>.weight``."""
    out = dict(state)
    for key in [k for k in state if k.endswith("." + VALUES_SUFFIX)]:
        module = key[: -len(VALUES_SUFFIX) - 1]
        meta_key = f"{module}.{META_SUFFIX}"
        if meta_key not in out:
            raise PackedFormatError(f"{module}: {VALUES_SUFFIX} without {META_SUFFIX} in the checkpoint")
        out[f"{module}.weight"] = unpack_24(out.pop(key), out.pop(meta_key), module)
    orphans = [k for k in out if k.endswith("." + META_SUFFIX)]
    if orphans:
        raise PackedFormatError(f"{orphans[0]}: {META_SUFFIX} without {VALUES_SUFFIX} in the checkpoint")
    return out


def quantization_config(pattern: str, ignore: list[str], method: str) -> dict:
    """The ``quantization_config`` entry of ``config.json`` that makes vLLM pick the ``bawa-sparse`` plugin."""
    return {"quant_method": "bawa-sparse", "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "pattern": pattern, "ignore": sorted(ignore), "pruning_method": method}


def check_checkpoint_headers(path) -> int:
    """Check every packed pair in a checkpoint directory from the safetensors headers alone (no data read).

    Returns the number of packed linears; raises :class:`PackedFormatError` naming the first bad tensor.
    """
    from ..modeling.checkpoint import Checkpoint

    ckpt = Checkpoint(path)
    headers: dict[str, tuple[str, list[int]]] = {}
    by_file: dict[str, list[str]] = {}
    for key, fname in ckpt.weight_map.items():
        if key.endswith(("." + VALUES_SUFFIX, "." + META_SUFFIX)):
            by_file.setdefault(fname, []).append(key)
    for fname, keys in by_file.items():
        with ckpt.open(fname) as f:
            present = set(f.keys())
            for key in keys:
                if key not in present:
                    raise PackedFormatError(f"{key}: listed in the index but missing from {fname}")
                s = f.get_slice(key)
                headers[key] = (s.get_dtype(), s.get_shape())
    count = 0
    for key, (dtype, shape) in headers.items():
        if key.endswith("." + META_SUFFIX):
            module = key[: -len(META_SUFFIX) - 1]
            if f"{module}.{VALUES_SUFFIX}" not in headers:
                raise PackedFormatError(f"{key}: {META_SUFFIX} without {module}.{VALUES_SUFFIX}")
            continue
        module = key[: -len(VALUES_SUFFIX) - 1]
        meta_key = f"{module}.{META_SUFFIX}"
        if meta_key not in headers:
            raise PackedFormatError(f"{key}: no {meta_key} in the checkpoint (packed weights need both)")
        meta_dtype, meta_shape = headers[meta_key]
        if len(shape) != 2 or dtype not in ("BF16", "F16", "F32"):
            raise PackedFormatError(f"{key}: expected a 2-D bf16/fp16/fp32 tensor, got {dtype} {shape}")
        if meta_dtype != "U8" or meta_shape != [shape[0], shape[1] // 4] or shape[1] % 4:
            raise PackedFormatError(f"{meta_key}: expected uint8 of shape {[shape[0], shape[1] // 4]} for "
                                    f"{VALUES_SUFFIX} {shape}, got {meta_dtype} {meta_shape}")
        count += 1
    return count
