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

    _route_logs()

    register_quantization_config(BawaSparseConfig.NAME)(BawaSparseConfig)
    _REGISTERED = True


def _route_logs() -> None:
    """Print the kernels' messages (backend chosen, build time, fallback reasons) through vLLM's log handlers.

    ``bawa_vllm`` logs with the standard library under its own name so that it never imports vLLM; inside a
    vLLM process those records would otherwise be dropped (INFO). vLLM configures its handlers on the ``vllm``
    logger when an engine starts, which may be after this runs, so records are forwarded at emit time.
    """
    import logging

    class _ToVllm(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logging.getLogger("vllm.bawa_sparse").handle(record)

    ours = logging.getLogger("bawa_vllm")
    if not any(type(h).__name__ == "_ToVllm" for h in ours.handlers):  # register() runs once per process
        ours.addHandler(_ToVllm())
        ours.setLevel(logging.INFO)
        ours.propagate = False
