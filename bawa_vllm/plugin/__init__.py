"""vLLM plugin: registers the ``bawa-sparse`` quantization method (entry point ``vllm.general_plugins``).

vLLM calls :func:`register` in every process it starts (API server, engine core, each worker),
possibly more than once per process, so it is idempotent. Nothing here is imported until vLLM
loads the plugin, so importing ``bawa_vllm`` never imports vLLM.
"""

from __future__ import annotations

_REGISTERED = False


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from .config import BawaSparseConfig

    register_quantization_config(BawaSparseConfig.NAME)(BawaSparseConfig)
    _REGISTERED = True
