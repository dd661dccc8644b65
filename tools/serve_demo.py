"""Serve a pruned checkpoint with vLLM (the bawa-sparse plugin) on loopback and query it through the OpenAI API.

    python tools/serve_demo.py out/demo-bawa-2of4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bawa_vllm.serving import VllmServer  # noqa: E402

CPU_ARGS = ["--max-model-len", "512", "--gpu-memory-utilization", "0.2", "--max-num-seqs", "8"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("--prompt", default="The Roman Empire was")
    ap.add_argument("--log", default=None, help="server log file (default: MODEL.serve.log)")
    args = ap.parse_args(argv)
    import openai

    log = args.log or f"{args.model.rstrip('/')}.serve.log"
    with VllmServer(args.model, log, CPU_ARGS, env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        model = client.models.list().data[0].id
        completion = client.completions.create(model=model, prompt=args.prompt, max_tokens=40, temperature=0)
        print(f"[completion] {args.prompt}{completion.choices[0].text}")
        chat = client.chat.completions.create(model=model, max_tokens=40, temperature=0,
                                              messages=[{"role": "user", "content": "What is a volcano?"}])
        print(f"[chat] {chat.choices[0].message.content}")
    backend = [line for line in Path(log).read_text().splitlines() if "bawa-sparse: " in line]
    print(backend[0].split("] ", 1)[-1] if backend else "(backend line not found in the server log)")


if __name__ == "__main__":
    main()
