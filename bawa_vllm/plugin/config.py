"""``BawaSparseConfig``: vLLM picks it from ``config.json``'s ``quantization_config`` (or ``--quantization bawa-sparse``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped

from ..sparse.format import FORMAT_NAME, FORMAT_VERSION, check_checkpoint_headers


class BawaSparseConfig(QuantizationConfig):
    """2:4-packed linears (``docs/FORMAT.md``); the modules in ``ignore`` are plain dense layers."""

    NAME = "bawa-sparse"

    def __init__(self, ignore: list[str] | None = None, pattern: str = "2:4", format_version: int = FORMAT_VERSION):
        super().__init__()
        if pattern != "2:4":
            raise ValueError(f"bawa-sparse serves 2:4 checkpoints, not pattern {pattern!r}")
        if not isinstance(format_version, int) or not 1 <= format_version <= FORMAT_VERSION:
            raise ValueError(f"bawa-sparse format_version {format_version!r} is not supported by this plugin "
                             f"(supports 1..{FORMAT_VERSION}); upgrade bawa-vllm")
        self.ignore = list(ignore or [])

    def __repr__(self) -> str:
        return f"BawaSparseConfig(ignore={self.ignore})"

    def get_name(self) -> str:
        return self.NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # Not 80: older GPUs still load the model and run the dense fallback; kernels are chosen per layer.
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BawaSparseConfig:
        fmt = config.get("format", FORMAT_NAME)
        if fmt != FORMAT_NAME:
            raise ValueError(f"bawa-sparse: unknown format {fmt!r} in quantization_config (expected {FORMAT_NAME!r})")
        ignore = cls.get_from_keys_or(config, ["ignore"], [])
        if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
            raise ValueError(f"bawa-sparse: quantization_config 'ignore' must be a list of module names, got {ignore!r}")
        return cls(ignore=ignore, pattern=cls.get_from_keys_or(config, ["pattern"], "2:4"),
                   format_version=cls.get_from_keys_or(config, ["format_version"], FORMAT_VERSION))

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        """Check the packed tensors' names, dtypes and shapes from the safetensors headers before loading.

        vLLM leaves a parameter that no checkpoint tensor filled silently uninitialised, so a missing or
        mis-shaped ``weight_meta`` must be caught here, with the tensor's name.
        """
        del hf_config, revision
        if Path(model_name).is_dir():
            check_checkpoint_headers(model_name)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None
        if is_layer_skipped(prefix, self.ignore, self.packed_modules_mapping):
            return UnquantizedLinearMethod()
        from .linear import BawaSparseLinearMethod

        return BawaSparseLinearMethod(self)
