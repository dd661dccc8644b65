"""Soak: one served model under a steady locust load for several minutes, with the server's memory sampled.

Reports every request's outcome (the run passes only with zero failed requests) and the resident
memory of the server's whole process tree (API server, engine core, workers) every ``--sample`` seconds,
with its growth from the first sample after warm-up to the last. Writes ``soak.json`` and ``soak.md``.

    python benchmarks/soak.py --model out/demo-bawa-2of4 --minutes 5 --users 4 \\
        --serve-args "--max-model-len 512 --gpu-memory-utilization 0.2" --out benchmarks/results/soak
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import threading
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from serve_compare import run_locust, summarise, warm_up  # noqa: E402

from bawa_vllm.serving import VllmServer, tree_rss_mib  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--sample", type=float, default=10, help="seconds between memory samples")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--serve-args", default="")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/soak"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "BAWA_BENCH_PROMPT_TOKENS": str(args.prompt_tokens),
           "BAWA_BENCH_MAX_TOKENS": str(args.max_tokens)}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    samples: list[tuple[float, float]] = []
    with VllmServer(args.model, args.out / "server.log", shlex.split(args.serve_args), env=env) as server:
        warm_up(server.url)
        stop = threading.Event()
        t0 = time.time()

        def sample():
            while not stop.is_set():
                samples.append((round(time.time() - t0, 1), round(tree_rss_mib(server.proc.pid), 1)))
                stop.wait(args.sample)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        records = run_locust(server.url, args.users, int(args.minutes * 60), args.out / "requests.jsonl", env,
                             args.out / "locust.log")
        stop.set()
        sampler.join()
        healthy = server.proc.poll() is None
    summary = summarise(records)
    rss = [r for _, r in samples]
    result = {"model": args.model, "minutes": args.minutes, "users": args.users, "server_alive_at_end": healthy,
              **summary, "rss_mib_samples": samples, "rss_mib_first": rss[0], "rss_mib_last": rss[-1],
              "rss_mib_max": max(rss), "rss_growth_mib": rss[-1] - rss[0]}
    (args.out / "soak.json").write_text(json.dumps(result, indent=2))
    md = (f"Soak of `{args.model}`: {args.minutes:g} min, {args.users} users, {summary['requests']} requests, "
          f"{summary['errors']} failed; server alive at the end: {healthy}.\n\n"
          f"Server process-tree RSS: first {rss[0]:.0f} MiB, last {rss[-1]:.0f} MiB, max {max(rss):.0f} MiB "
          f"(growth {rss[-1] - rss[0]:+.0f} MiB over {len(rss)} samples).\n")
    (args.out / "soak.md").write_text(md)
    print(md)
    return 0 if summary["errors"] == 0 and summary["requests"] > 0 and healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
