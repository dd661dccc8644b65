"""``BawaSparseLinearMethod``: packed parameters in, the kernel's own layout built after loading."""

from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import ModelWeightParameter
from vllm.platforms import current_platform

from ..sparse import kernels
from ..sparse.format import META_SUFFIX, VALUES_SUFFIX, check_packed, unpack_24

# Under vLLM's "vllm" logger namespace, so that vLLM's log handlers print it.
logger = init_logger("vllm.plugins.bawa_sparse")
_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.info(message)


@register_weight_loader_v2_supported_method
class BawaSparseLinearMethod(LinearMethodBase):
    """Linear layer whose weight is stored 2:4-packed.

    Sharding is vLLM's: both tensors are row-local ``ModelWeightParameter``s (output dim 0, input dim 1),
    so column, merged (QKV, gate_up) and row-parallel loaders slice them like a dense weight whose input
    dimension is divided by 2 (values) and 8 (metadata).
    """

    def __init__(self, quant_config):
        self.quant_config = quant_config

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        del input_size, output_size
        if input_size_per_partition % 8:
            raise ValueError(f"bawa-sparse: the per-rank input size {input_size_per_partition} must divide by 8; "
                             "use a tensor-parallel size that keeps it so")
        weight_loader = extra_weight_attrs.pop("weight_loader")
        rows = sum(output_partition_sizes)
        values = ModelWeightParameter(data=torch.empty(rows, input_size_per_partition // 2, dtype=params_dtype),
                                      input_dim=1, output_dim=0, weight_loader=weight_loader)
        meta = ModelWeightParameter(data=torch.zeros(rows, input_size_per_partition // 8, dtype=torch.uint8),
                                    input_dim=1, output_dim=0, weight_loader=weight_loader)
        layer.register_parameter(VALUES_SUFFIX, values)
        layer.register_parameter(META_SUFFIX, meta)
        layer.bawa_shape = (rows, input_size_per_partition)
        layer.bawa_partitions = list(output_partition_sizes)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        values, meta = getattr(layer, VALUES_SUFFIX).data, getattr(layer, META_SUFFIX).data
        name = getattr(layer, "prefix", None) or type(layer).__name__
        for shard, start, size in self._shards(layer, name):  # name the checkpoint module of a bad row
            check_packed(values[start : start + size], meta[start : start + size], shard)
        check_packed(values, meta, name, shape=layer.bawa_shape)
        dense = unpack_24(values, meta, name)
        delattr(layer, VALUES_SUFFIX)
        delattr(layer, META_SUFFIX)
        if current_platform.is_cpu():
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            layer.weight = torch.nn.Parameter(dense, requires_grad=False)
            dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
            _log_once("bawa-sparse: CPU backend = dense weight through vLLM's CPU GEMM dispatch (oneDNN)")
            return
        p = kernels.prepare(dense, name)
        for attr in ("packed", "meta", "dense"):
            layer.register_buffer(f"bawa_{attr}", getattr(p, attr), persistent=False)
        layer.bawa_backend, layer.bawa_min_m, layer.bawa_out = p.backend, p.min_sparse_m, p.out_features
        _log_once(f"bawa-sparse: backend {kernels.backend_name(p.backend)} (requested "
                  f"{kernels.requested_backend()}); first layer {tuple(dense.shape)} sparse from M >= {p.min_sparse_m}")

    def _shards(self, layer: torch.nn.Module, name: str):
        """(name, first row, rows) of each logical matrix fused into this layer (q/k/v, gate/up)."""
        parts = layer.bawa_partitions
        fused = self.quant_config.packed_modules_mapping.get(name.rsplit(".", 1)[-1], [])
        labels = [f"{f} rows of {name}" for f in fused] if len(fused) == len(parts) else [name] * len(parts)
        start = 0
        for label, size in zip(labels, parts):
            yield label, start, size
            start += size

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if current_platform.is_cpu():
            return layer.cpu_linear(x, layer.weight, bias)
        return torch.ops.bawa_sparse.linear(x, layer.bawa_packed, layer.bawa_meta, layer.bawa_dense, bias,
                                            layer.bawa_out, layer.bawa_backend, layer.bawa_min_m)
