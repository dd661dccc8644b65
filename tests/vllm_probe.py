"""Run a packed checkpoint in-process with vLLM's ``LLM`` and print, as JSON, what each bawa-sparse layer holds.

    python tests/vllm_probe.py MODEL DTYPE [PROMPT ...]

Output: ``{"layers": {name: {"bytes", "dense_bytes", "backend"}}, "tokens": [[ids...] per prompt]}``, the tokens
of greedy completions. Used by tests/test_cpu_serving.py in a subprocess, so that vLLM's process-wide state
(thread binding, plugins, environment) never leaks into the test process.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: apply_model sees the real layers
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def layer_bytes(model) -> dict:
    """Bytes of every distinct tensor each bawa-sparse layer holds (parameters and buffers)."""
    out = {}
    for name, module in model.named_modules():
        if not hasattr(module, "bawa_shape"):
            continue
        tensors = {t.data_ptr(): t for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]}
        n, k = module.bawa_shape
        out[name] = {"bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                     "dense_bytes": n * k * next(iter(tensors.values())).element_size() if tensors else 0,
                     "backend": module.bawa_backend}
    return out


def main() -> None:
    from vllm import LLM, SamplingParams

    model, dtype, prompts = sys.argv[1], sys.argv[2], sys.argv[3:]
    llm = LLM(model=model, dtype=dtype, max_model_len=128, gpu_memory_utilization=0.2, max_num_seqs=4)
    layers = llm.apply_model(layer_bytes)[0]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=False)
    print("PROBE " + json.dumps({"layers": layers, "tokens": [list(o.outputs[0].token_ids) for o in outputs]}))


if __name__ == "__main__":
    main()
