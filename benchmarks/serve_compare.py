"""Dense vs sparse serving under the same load: ``vllm serve`` each model in turn, locust against it.

For each model directory: start ``vllm serve`` on loopback with identical settings, wait for health,
warm up, run ``benchmarks/locustfile.py`` headless at each concurrency level (users = spawn rate =
level, same duration), stop the server. Writes ``serve_compare.json`` (every figure and every
request), ``serve_compare.md`` (requests/s, output tokens/s, TTFT p50/p99, TPOT p50/p99, errors, and
sparse/dense ratios) and ``serve_compare.png`` (throughput and latency vs concurrency). A server that
does not start, or a level whose requests all fail, is reported as a failure, never as figures.

Unless ``--endpoint completions``, each server gets one chat request first. A server that refuses it (HTTP
400: a base model whose tokenizer has no chat template) is measured on completions only under ``mixed``
(one warning line; the other model then gets completions only too, so that both see the same load), and is
a failure under ``chat``. The report says which endpoints each side was measured on.

    python benchmarks/serve_compare.py --dense /models/llama-dense --sparse /models/llama-bawa-2of4 \\
        --concurrency 1 4 16 64 --duration 60 --out benchmarks/results/serve
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bawa_vllm.serving import ServerFailed, VllmServer, tree_rss_mib, chat_refusal  # noqa: E402

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    pos = (len(values) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def summarise(records: list[dict]) -> dict:
    ok = [r for r in records if r["error"] is None]
    errors = [r["error"] for r in records if r["error"] is not None]
    out = {"requests": len(ok), "errors": len(errors), "error_examples": sorted(set(errors))[:3],
           "endpoints": sorted({r["endpoint"] for r in records})}
    if not ok:
        return {**out, "failed": "no request succeeded"}
    wall = max(r["start"] + r["latency_s"] for r in records) - min(r["start"] for r in records)
    ttft = [r["ttft_s"] * 1000 for r in ok]
    tpot = [r["tpot_s"] * 1000 for r in ok if r["output_tokens"] > 1]
    return {**out, "wall_s": wall, "requests_per_s": len(ok) / wall,
            "output_tokens_per_s": sum(r["output_tokens"] for r in ok) / wall,
            "ttft_ms_p50": percentile(ttft, 0.5), "ttft_ms_p99": percentile(ttft, 0.99),
            "tpot_ms_p50": percentile(tpot, 0.5), "tpot_ms_p99": percentile(tpot, 0.99),
            "mean_output_tokens": statistics.mean(r["output_tokens"] for r in ok)}


def run_locust(url: str, users: int, duration: int, records: Path, env: dict, log: Path) -> list[dict]:
    records.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url, "-u", str(users),
           "-r", str(users), "-t", f"{duration}s", "--stop-timeout", "30", "--only-summary"]
    with open(log, "w") as f:
        subprocess.run(cmd, env={**env, "BAWA_BENCH_RECORDS": str(records)}, stdout=f, stderr=subprocess.STDOUT,
                       check=False, timeout=duration + 300)
    if not records.exists():
        return []
    return [json.loads(line) for line in records.read_text().splitlines() if line.strip()]


def warm_up(url: str, n: int = 3) -> None:
    model = json.load(urllib.request.urlopen(f"{url}/v1/models", timeout=30))["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 8}).encode()
    for _ in range(n):
        req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=300).read()


def server_rss(server) -> float | None:
    """The server's process-tree RSS in MiB, or None for a server this process did not start."""
    proc = getattr(server, "proc", None)
    return None if proc is None else round(tree_rss_mib(proc.pid), 1)


def backend_of(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if "bawa-sparse: " in line and " backend" in line]
    return lines[0].split("bawa-sparse: ", 1)[1] if lines else "vLLM's own dense linears (no quantization)"


def bench_model(label: str, model: str, args, out: Path, env: dict) -> dict:
    """Serve ``model`` and run the load at each level, on the endpoints ``env["BAWA_BENCH_ENDPOINT"]`` names.

    If the dense model (served first) refuses chat under ``mixed``, that becomes ``completions`` for both
    models, so that both see the same load; a refusal under ``chat``, or by the sparse model only, is a failure.
    """
    result = {"label": label, "model": model, "endpoints": [], "levels": []}  # endpoints: those measured
    log = out / f"{label}.server.log"
    try:
        with VllmServer(model, log, shlex.split(args.serve_args), env=env, timeout=args.start_timeout) as server:
            warm_up(server.url)
            result["rss_mib_warm"] = server_rss(server)
            refusal = None if env["BAWA_BENCH_ENDPOINT"] == "completions" else chat_refusal(server.url)
            if refusal is not None:
                result["chat_refused"] = refusal
                if args.endpoint == "chat" or label != "dense":
                    unlike = "" if args.endpoint == "chat" else "the dense model answered them, so the two would " \
                                                                "not see the same load; "
                    result["failed"] = f"{label} refuses chat requests ({refusal}); {unlike}rerun with --endpoint " \
                                       "completions"
                    return result
                print(f"warning: {label} refuses chat requests ({refusal}): measuring completions only, for both "
                      "models (--endpoint completions skips this check)", flush=True)
                env["BAWA_BENCH_ENDPOINT"] = "completions"
            for users in args.concurrency:
                records = run_locust(server.url, users, args.duration, out / f"{label}-u{users}.jsonl", env,
                                     out / f"{label}-u{users}.locust.log")
                result["levels"].append({"concurrency": users, **summarise(records)})
                result["endpoints"] = sorted({*result["endpoints"], *result["levels"][-1]["endpoints"]})
                print(f"{label} u={users}: {result['levels'][-1]}", flush=True)
            result["rss_mib_after_load"] = server_rss(server)
        result["backend"] = backend_of(log)
    except (ServerFailed, OSError) as err:
        result["failed"] = f"server: {err}"
    return result


def _fmt(v, spec=".2f"):
    return "—" if v is None else format(v, spec)


METRICS = [("requests_per_s", "req/s"), ("output_tokens_per_s", "out tok/s"), ("ttft_ms_p50", "TTFT p50 ms"),
           ("ttft_ms_p99", "TTFT p99 ms"), ("tpot_ms_p50", "TPOT p50 ms"), ("tpot_ms_p99", "TPOT p99 ms")]


def markdown(report: dict) -> str:
    dense, sparse = report["dense"], report["sparse"]
    lines = [f"Dense `{dense['model']}` vs sparse `{sparse['model']}`; load: {report['load']}.", "",
             f"- dense backend: {dense.get('backend', '—')}", f"- sparse backend: {sparse.get('backend', '—')}"]
    for side in (dense, sparse):
        refused = f" (chat refused: {side['chat_refused']})" if "chat_refused" in side else ""
        lines.append(f"- {side['label']} measured on: {', '.join(side['endpoints']) or 'nothing'}{refused}")
    if dense.get("rss_mib_after_load") and sparse.get("rss_mib_after_load"):
        d, sp = dense["rss_mib_after_load"], sparse["rss_mib_after_load"]
        lines.append(f"- server RSS (process tree) after the load: dense {d:.0f} MiB, sparse {sp:.0f} MiB "
                     f"(sparse − dense {sp - d:+.0f} MiB)")
    lines.append("")
    for side in (dense, sparse):
        if "failed" in side:
            lines.append(f"**{side['label']} failed**: {side['failed'].splitlines()[0]}")
    header = "| users | model | " + " | ".join(h for _, h in METRICS) + " | errors |"
    lines += [header, "|" + "---|" * (len(METRICS) + 3)]
    for d, s in zip(dense.get("levels", []), sparse.get("levels", [])):
        for side, row in (("dense", d), ("sparse", s)):
            cells = " | ".join(_fmt(row.get(k)) for k, _ in METRICS)
            lines.append(f"| {row['concurrency']} | {side} | {cells} | {row['errors']} |")
        ratios = " | ".join(_fmt(s[k] / d[k] if s.get(k) and d.get(k) else None, ".3f") + "x" for k, _ in METRICS)
        lines.append(f"| {d['concurrency']} | sparse/dense | {ratios} | |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for side in ("dense", "sparse"):
        levels = [lv for lv in report[side].get("levels", []) if "failed" not in lv]
        xs = [lv["concurrency"] for lv in levels]
        for ax, key, title in zip(axes, ("output_tokens_per_s", "ttft_ms_p50", "tpot_ms_p50"),
                                  ("output tokens/s", "TTFT p50 (ms)", "TPOT p50 (ms)")):
            ax.plot(xs, [lv[key] for lv in levels], marker="o", label=side)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent users")
            ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", required=True, help="dense model directory (e.g. the original checkpoint)")
    ap.add_argument("--sparse", required=True, help="bawa-sparse (packed 2:4) model directory")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--duration", type=int, default=30, help="seconds of load per concurrency level")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", default=None, help="text file of prompts (default: synthetic)")
    ap.add_argument("--endpoint", choices=("completions", "chat", "mixed"), default="mixed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve-args", default="", help="extra `vllm serve` arguments, identical for both models")
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "BAWA_BENCH_PROMPT_TOKENS": str(args.prompt_tokens),
           "BAWA_BENCH_MAX_TOKENS": str(args.max_tokens), "BAWA_BENCH_ENDPOINT": args.endpoint,
           "BAWA_BENCH_SEED": str(args.seed), **({"BAWA_BENCH_PROMPTS": args.prompts} if args.prompts else {})}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    report = {"load": {"concurrency": args.concurrency, "duration_s": args.duration, "prompt_tokens": args.prompt_tokens,
                       "max_tokens": args.max_tokens, "endpoint": args.endpoint, "prompts": args.prompts or "synthetic",
                       "serve_args": args.serve_args},
              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    report["dense"] = bench_model("dense", args.dense, args, args.out, env)
    report["sparse"] = bench_model("sparse", args.sparse, args, args.out, env)
    (args.out / "serve_compare.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (args.out / "serve_compare.md").write_text(table)
    plot(report, args.out / "serve_compare.png")
    print(table)
    failed = any("failed" in report[s] or any("failed" in lv for lv in report[s]["levels"]) for s in ("dense", "sparse"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
