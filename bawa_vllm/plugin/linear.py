"""``BawaSparseLinearMethod``: packed parameters in, one packed copy in the backend's layout kept after loading."""

from __future__ import annotations

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import ModelWeightParameter
from vllm.platforms import current_platform

from .. import kernels
from ..sparse.format import META_SUFFIX, VALUES_SUFFIX, check_packed_shards, unpack_24


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
        # 0x44: positions (0, 1) in both groups, a valid value for `--load-format dummy`, which fills floats only.
        meta = ModelWeightParameter(data=torch.full((rows, input_size_per_partition // 8), 0x44, dtype=torch.uint8),
                                    input_dim=1, output_dim=0, weight_loader=weight_loader)
        layer.register_parameter(VALUES_SUFFIX, values)
        layer.register_parameter(META_SUFFIX, meta)
        layer.bawa_shape = (rows, input_size_per_partition)
        layer.bawa_partitions = list(output_partition_sizes)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Validate the packed weight, then keep it packed in the chosen backend's layout (one copy).

        Only where no sparse kernel can run (the reason is logged once) is the dense weight rebuilt, and on
        CPU it then goes through vLLM's own CPU GEMM dispatch, exactly as an unpruned model would.
        """
        values, meta = getattr(layer, VALUES_SUFFIX).data, getattr(layer, META_SUFFIX).data
        name = getattr(layer, "prefix", None) or type(layer).__name__
        # one pass over the metadata, naming the checkpoint module (q/k/v, gate/up) of a bad row
        check_packed_shards(values, meta, name, layer.bawa_shape, list(self._shards(layer, name)))
        delattr(layer, VALUES_SUFFIX)
        delattr(layer, META_SUFFIX)
        n, k = layer.bawa_shape
        backend, why = kernels.choose_backend(values.device, values.dtype, n, k)
        if backend == kernels.DENSE and current_platform.is_cpu():
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            layer.weight = torch.nn.Parameter(unpack_24(values, meta, name, validate=False), requires_grad=False)
            dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
            layer.bawa_backend = None
            kernels.log_once(f"bawa-sparse: CPU backend = dense weight through vLLM's CPU GEMM ({why})")
            return
        if backend == kernels.DENSE:
            kernels.log_once(f"bawa-sparse: dense fallback on {values.device.type} ({why})")
        device = values.device.type
        packed = kernels.prepare(values, meta, name, backend)
        del values, meta
        for attr, tensor in packed.tensors().items():
            layer.register_buffer(f"bawa_{attr}", tensor, persistent=False)
        if packed.aux is None:
            layer.bawa_aux = None
        layer.bawa_backend, layer.bawa_out, layer.bawa_aux_min_m = packed.backend, packed.out_features, packed.aux_min_m
        kernels.log_once(f"bawa-sparse: {device} backend {kernels.backend_name(packed.backend)} "
                         f"(requested {kernels.requested_backend()})")

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
        if layer.bawa_backend is None:  # CPU without the sparse kernel: vLLM's dense CPU GEMM
            return layer.cpu_linear(x, layer.weight, bias)
        return torch.ops.bawa_sparse.linear(x, layer.bawa_values, layer.bawa_meta, bias, layer.bawa_out,
                                            layer.bawa_backend, layer.bawa_aux, layer.bawa_aux_min_m)
