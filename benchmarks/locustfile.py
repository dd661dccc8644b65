"""Locust user for any OpenAI-compatible server: streamed completions and chat completions.

    locust -f benchmarks/locustfile.py --headless --host http://127.0.0.1:8000 -u 8 -r 8 -t 30s --csv out/run

Per request it measures the time to first token (TTFT), the time per output token after the first
(TPOT = (latency − TTFT) / (output tokens − 1), the mean inter-token latency, as vLLM's benchmarks
define it), the output tokens and errors. They appear in locust's own
statistics and CSV as the pseudo-requests ``METRIC ttft`` and ``METRIC tpot`` (milliseconds), and,
if ``BAWA_BENCH_RECORDS`` is set, one JSON line per request is appended to that file.

Options (environment variables, with defaults):

- ``BAWA_BENCH_MODEL``: model name; default: the first entry of ``/v1/models``.
- ``BAWA_BENCH_ENDPOINT`` = ``mixed``: ``completions``, ``chat`` or ``mixed`` (alternating). Unless it is
  ``completions``, one chat request is sent when the test starts: a server that refuses it with HTTP 400 (a
  base model whose tokenizer has no chat template) gets completions only under ``mixed``, with one warning
  line that says why, and stops the test under ``chat`` (exit status 1).
- ``BAWA_BENCH_PROMPTS``: a text file of prompts (paragraphs separated by blank lines); unset: synthetic.
- ``BAWA_BENCH_PROMPT_TOKENS`` = 128: synthetic prompt length (completions get exactly this many token
  ids; chat gets this many words).
- ``BAWA_BENCH_MAX_TOKENS`` = 64: output tokens per request (``ignore_eos`` keeps the length fixed).
- ``BAWA_BENCH_SEED`` = 0: seeds the prompt choice of each user.
- ``BAWA_BENCH_RECORDS``: path of a JSON-lines file for per-request records.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import sys
import threading
import time
from pathlib import Path

from locust import HttpUser, events, task
from locust.runners import MasterRunner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bawa_vllm.serving import chat_refusal  # noqa: E402

MODEL = os.environ.get("BAWA_BENCH_MODEL")
ENDPOINT = os.environ.get("BAWA_BENCH_ENDPOINT", "mixed")
PROMPTS_FILE = os.environ.get("BAWA_BENCH_PROMPTS")
PROMPT_TOKENS = int(os.environ.get("BAWA_BENCH_PROMPT_TOKENS", "128"))
MAX_TOKENS = int(os.environ.get("BAWA_BENCH_MAX_TOKENS", "64"))
SEED = int(os.environ.get("BAWA_BENCH_SEED", "0"))
RECORDS = os.environ.get("BAWA_BENCH_RECORDS")
_WORDS = ("time year people way day man thing woman life child world school state family student group country "
          "problem hand part place case week company system program question work government number night point "
          "home water room mother area money story fact month lot right study book eye job word business issue").split()
_user_ids = itertools.count()
_records_lock = threading.Lock()
if ENDPOINT not in ("completions", "chat", "mixed"):
    raise ValueError(f"BAWA_BENCH_ENDPOINT={ENDPOINT!r}: choose completions, chat or mixed")
_endpoint = ENDPOINT  # what the users send: "mixed" becomes "completions" where the server refuses chat


@events.test_start.add_listener
def check_chat(environment, **_kwargs) -> None:
    """Before any load: one chat request, so that a server that refuses chat is said once, not counted as a
    quarter of all requests failed (``mixed``) or all of them (``chat``)."""
    global _endpoint
    _endpoint = ENDPOINT
    if ENDPOINT == "completions" or isinstance(environment.runner, MasterRunner):
        return  # in a distributed run the workers send the requests, and each checks for itself
    refusal = chat_refusal(environment.host, MODEL)
    if refusal is None:
        return
    if ENDPOINT == "mixed":
        _endpoint = "completions"
        logging.warning("%s refuses chat requests (%s): measuring completions only; set "
                        "BAWA_BENCH_ENDPOINT=completions to skip this check", environment.host, refusal)
        return
    logging.error("BAWA_BENCH_ENDPOINT=chat, but %s refuses chat requests (%s); the model has no chat template? "
                  "set BAWA_BENCH_ENDPOINT=completions", environment.host, refusal)
    environment.process_exit_code = 1
    environment.runner.quit()


def _text_prompts() -> list[str] | None:
    if not PROMPTS_FILE:
        return None
    with open(PROMPTS_FILE, encoding="utf-8") as f:
        prompts = [p.strip() for p in f.read().split("\n\n") if p.strip()]
    if not prompts:
        raise ValueError(f"BAWA_BENCH_PROMPTS={PROMPTS_FILE}: no prompts in the file")
    return prompts


TEXT_PROMPTS = _text_prompts()


def _record(row: dict) -> None:
    if RECORDS:
        with _records_lock, open(RECORDS, "a") as f:
            f.write(json.dumps(row) + "\n")


class OpenAIUser(HttpUser):
    """One simulated client: sends streamed requests back to back."""

    def on_start(self) -> None:
        self.rng = random.Random(SEED * 100_003 + next(_user_ids))
        self.turn = 0
        self.model = MODEL or self.client.get("/v1/models", name="/v1/models").json()["data"][0]["id"]

    def _prompt_text(self) -> str:
        if TEXT_PROMPTS:
            return self.rng.choice(TEXT_PROMPTS)
        return " ".join(self.rng.choice(_WORDS) for _ in range(PROMPT_TOKENS))

    def _body(self, kind: str) -> dict:
        body = {"model": self.model, "max_tokens": MAX_TOKENS, "temperature": 0.0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": self._prompt_text()}]
        elif TEXT_PROMPTS:
            body["prompt"] = self._prompt_text()
        else:  # exact length: token ids that every vocabulary has
            body["prompt"] = [self.rng.randrange(100, 1000) for _ in range(PROMPT_TOKENS)]
        return body

    @task
    def generate(self) -> None:
        kind = _endpoint if _endpoint != "mixed" else ("completions", "chat")[self.turn % 2]
        self.turn += 1
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        start = time.perf_counter()
        token_times: list[float] = []
        usage_tokens = None
        error = None
        with self.client.post(path, json=self._body(kind), stream=True, catch_response=True, name=path) as resp:
            try:
                if resp.status_code != 200:
                    raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
                for line in resp.iter_lines():
                    if not line or not line.startswith(b"data: "):
                        continue
                    data = line[6:]
                    if data == b"[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        usage_tokens = chunk["usage"].get("completion_tokens")
                    for choice in chunk.get("choices", []):
                        piece = choice.get("text") if kind == "completions" else choice.get("delta", {}).get("content")
                        if piece:
                            token_times.append(time.perf_counter())
                if not token_times:
                    raise RuntimeError("the stream ended without any output token")
                resp.success()
            except Exception as err:  # noqa: BLE001 - every failure is counted as one, with its cause
                error = str(err)
                resp.failure(error)
        end = time.perf_counter()
        row = {"endpoint": kind, "start": start, "latency_s": end - start, "error": error}
        if error is None:
            ttft = token_times[0] - start
            tokens = usage_tokens or len(token_times)
            # as vLLM's own serving benchmark defines it: (latency - TTFT) / (output tokens - 1)
            tpot = (end - start - ttft) / (tokens - 1) if tokens > 1 else 0.0
            row.update(ttft_s=ttft, tpot_s=tpot, output_tokens=tokens)
            for name, value in (("ttft", ttft), ("tpot", tpot)):
                events.request.fire(request_type="METRIC", name=name, response_time=value * 1000,
                                    response_length=0, exception=None, context={})
        _record(row)
