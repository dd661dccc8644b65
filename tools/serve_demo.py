"""Serve checkpoints with vLLM (the bawa-sparse plugin picks up packed 2:4 ones) and compare their answers.

Each model in turn: start an OpenAI-compatible vLLM server on loopback under the name given, send the
same prompts (greedy, a completion and a chat request each), stop it; then print the answers side by
side. While a server starts (about a minute on CPU) the last line of its log is shown every 10 s.

    python tools/serve_demo.py --model dense=~/.cache/bawa-vllm/SmolLM2-135M-Instruct \\
        --model smollm2-2of4=out/smollm2-bawa-2of4
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bawa_vllm.serving import VllmServer  # noqa: E402

CPU_ARGS = ["--max-model-len", "1024", "--gpu-memory-utilization", "0.2", "--max-num-seqs", "8"]
COMPLETIONS = ["The capital of France is", "The Roman Empire was"]
CHATS = ["What is a volcano? Answer in one sentence.", "Name three primary colours."]


def _watch(log: Path, stop: threading.Event, started: float) -> None:
    """Print the server log's last line every 10 s until ``stop`` (vLLM's start is otherwise silent here)."""
    while not stop.wait(10):
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        last = next((line for line in reversed(lines) if line.strip()), "(no output yet)")
        print(f"    ... {time.time() - started:3.0f} s: {last.strip()[-110:]}", flush=True)


def ask(name: str, path: str, log: Path, max_tokens: int) -> dict[str, str]:
    """Start a server for ``path`` under the model name ``name``, send every prompt, return prompt -> answer."""
    import openai

    print(f"== starting vLLM for {name} ({path}); log: {log}", flush=True)
    stop = threading.Event()
    started = time.time()
    watcher = threading.Thread(target=_watch, args=(log, stop, started), daemon=True)
    watcher.start()
    try:
        with VllmServer(path, log, [*CPU_ARGS, "--served-model-name", name],
                        env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as server:
            stop.set()
            print(f"   ready after {time.time() - started:.0f} s at {server.url}/v1, model name {name!r}", flush=True)
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
            answers = {}
            for prompt in COMPLETIONS:
                out = client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0)
                answers[prompt] = prompt + out.choices[0].text
            for prompt in CHATS:
                out = client.chat.completions.create(model=name, max_tokens=max_tokens, temperature=0,
                                                     messages=[{"role": "user", "content": prompt}])
                answers[f"[chat] {prompt}"] = out.choices[0].message.content
    finally:
        stop.set()
    backend = [line for line in log.read_text(errors="replace").splitlines() if "bawa-sparse: " in line]
    if backend:
        print("   " + backend[0].split("] ", 1)[-1], flush=True)
    return answers


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                    help="a model to serve under NAME (the `model` a client sends); repeat to compare")
    ap.add_argument("--max-tokens", type=int, default=32, help="(default: %(default)s)")
    ap.add_argument("--log-dir", type=Path, default=None, help="server logs (default: next to each model)")
    args = ap.parse_args(argv)
    models = []
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            ap.error(f"--model {spec!r}: expected NAME=DIR")
        models.append((name, str(Path(path).expanduser())))
    results = {}
    for name, path in models:
        log = (args.log_dir or Path(path).parent) / f"{Path(path).name}.serve.log"
        results[name] = ask(name, path, log, args.max_tokens)
    print("\n== the same prompts, greedy, side by side:")
    for prompt in results[models[0][0]]:
        print(f"\n--- {prompt}")
        label = max(len(name) for name, _ in models)
        for name, _ in models:
            lines = textwrap.wrap(" ".join(results[name][prompt].split()), width=90) or [""]
            for k, line in enumerate(lines):
                print(f"  {name if k == 0 else '':>{label}} | {line}")


if __name__ == "__main__":
    main()
