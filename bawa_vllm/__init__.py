"""bawa-vllm: prune LLMs to 2:4 sparsity with BaWA and serve them in vLLM.

Rooms: ``pruning`` (metrics, masks, Θ search, methods, the block driver), ``calibration``,
``modeling`` (streamed checkpoint reading/writing, one decoder block at a time), ``evaluation``,
``cli``. Importing this package imports nothing heavy.
"""

__version__ = "0.1.0"
